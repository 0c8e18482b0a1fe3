//! `GET /metrics`: the gateway's counters in the Prometheus/OpenMetrics text format,
//! written by the `prometheus-client` crate (the Prometheus project's Rust client).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `pvrun_calls_total` | counter | `function`, `outcome` (the `X-Pvrun-Outcome` value) |
//! | `pvrun_call_duration_seconds` | histogram | `function` |
//! | `pvrun_pool_sandboxes` | gauge | |
//! | `pvrun_pool_busy_sandboxes` | gauge | |
//! | `pvrun_resets_total` | counter | |
//! | `pvrun_reset_dirty_pages` | histogram (pages copied back per reset) | |
//! | `pvrun_vm_exits_total` | counter (exits of the calls made) | `kind`: `hypercall`, `doorbell`, `exception`, `interrupted`, `other` |
//! | `pvrun_sandbox_creations_total` | counter | `source`: `elf`, `snapshot`, `shell` |
//! | `pvrun_snapshot_files_loaded_total` | counter | |
//!
//! Label values are only names the guest exports (or `-` for a path that names none), so a
//! client cannot grow the label space.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::{PoolStats, SandboxCreations};

type Labels = Vec<(&'static str, String)>;

/// Everything `/metrics` reports.
pub(super) struct Metrics {
    registry: Registry,
    calls: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
    pool_size: Gauge,
    pool_busy: Gauge,
    resets: Counter,
    reset_pages: Histogram,
    creations: Family<Labels, Counter>,
    files_loaded: Counter,
    exits: Family<Labels, Counter>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pvrun");
        let calls = Family::<Labels, Counter>::default();
        registry.register(
            "calls",
            "Function calls by function and outcome",
            calls.clone(),
        );
        // 20 µs to ~10 s.
        let latency = Family::<Labels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(20e-6, 2.0, 20))) as fn() -> Histogram,
        );
        registry.register(
            "call_duration_seconds",
            "Time from admission to the call's result, by function",
            latency.clone(),
        );
        let pool_size = Gauge::default();
        registry.register("pool_sandboxes", "Sandboxes in the pool", pool_size.clone());
        let pool_busy = Gauge::default();
        registry.register(
            "pool_busy_sandboxes",
            "Sandboxes running a call or being reset",
            pool_busy.clone(),
        );
        let resets = Counter::default();
        registry.register("resets", "Sandbox resets after calls", resets.clone());
        let reset_pages = Histogram::new(exponential_buckets(1.0, 2.0, 16));
        registry.register(
            "reset_dirty_pages",
            "Pages copied back per reset",
            reset_pages.clone(),
        );
        let creations = Family::<Labels, Counter>::default();
        registry.register(
            "sandbox_creations",
            "Sandboxes created in this process, by source (elf, snapshot, shell)",
            creations.clone(),
        );
        let exits = Family::<Labels, Counter>::default();
        registry.register(
            "vm_exits",
            "VM exits of the calls made, by kind",
            exits.clone(),
        );
        let files_loaded = Counter::default();
        registry.register(
            "snapshot_files_loaded",
            "Snapshot files loaded",
            files_loaded.clone(),
        );
        Metrics {
            registry,
            calls,
            latency,
            pool_size,
            pool_busy,
            resets,
            reset_pages,
            creations,
            files_loaded,
            exits,
        }
    }

    /// One call that reached a function (or was refused before it): its outcome and, when
    /// it ran, its latency and the pages its reset copied.
    pub fn call(&self, function: &str, outcome: &str, seconds: Option<f64>, reset_pages: usize) {
        self.calls
            .get_or_create(&vec![
                ("function", function.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
        if let Some(s) = seconds {
            self.latency
                .get_or_create(&vec![("function", function.to_string())])
                .observe(s);
        }
        if reset_pages > 0 {
            self.resets.inc();
            self.reset_pages.observe(reset_pages as f64);
        }
    }

    /// The text exposition, with the pool's and the process's current figures.
    pub fn render(&self, pool: Option<PoolStats>) -> String {
        if let Some(p) = pool {
            self.pool_size.set(p.size as i64);
            self.pool_busy.set(p.busy as i64);
            for (kind, n) in crate::EXIT_KINDS.iter().zip(p.exits) {
                self.exits
                    .get_or_create(&vec![("kind", kind.to_string())])
                    .inner()
                    .store(n, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let c = SandboxCreations::now();
        for (source, n) in [("elf", c.elf), ("snapshot", c.snapshot), ("shell", c.shell)] {
            let counter = self
                .creations
                .get_or_create(&vec![("source", source.to_string())]);
            counter
                .inner()
                .store(n, std::sync::atomic::Ordering::Relaxed);
        }
        self.files_loaded
            .inner()
            .store(c.files_loaded, std::sync::atomic::Ordering::Relaxed);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_buckets_come_out_in_the_text_format() {
        let m = Metrics::new();
        m.call("upper", "ok", Some(0.000_05), 3);
        m.call("upper", "ok", Some(0.002), 5);
        m.call("upper", "failed", Some(0.001), 1);
        m.call("-", "unknown", None, 0);
        let t = m.render(Some(PoolStats {
            size: 4,
            busy: 1,
            resets: 3,
            reset_pages: 9,
            exits: [5, 0, 1, 0, 0],
        }));
        assert!(
            t.contains(r#"pvrun_vm_exits_total{kind="hypercall"} 5"#),
            "{t}"
        );
        assert!(
            t.contains(r#"pvrun_vm_exits_total{kind="exception"} 1"#),
            "{t}"
        );
        assert!(
            t.contains(r#"pvrun_calls_total{function="upper",outcome="ok"} 2"#),
            "{t}"
        );
        assert!(t.contains(r#"pvrun_calls_total{function="upper",outcome="failed"} 1"#));
        assert!(t.contains(r#"pvrun_calls_total{function="-",outcome="unknown"} 1"#));
        assert!(t.contains(r#"pvrun_call_duration_seconds_count{function="upper"} 3"#));
        assert!(t.contains("pvrun_resets_total 3"));
        assert!(t.contains("pvrun_reset_dirty_pages_sum 9.0"), "{t}");
        assert!(t.contains("pvrun_pool_sandboxes 4"));
        assert!(t.contains("pvrun_pool_busy_sandboxes 1"));
        assert!(t.trim_end().ends_with("# EOF"));
    }

    #[test]
    fn a_guest_chosen_function_name_cannot_forge_lines() {
        // Export names are the guest's: quotes, backslashes and newlines are escaped, so a
        // name can never end its label or start a sample of its own.
        let m = Metrics::new();
        m.call("x\"} 999\npvrun_resets_total 7\n\\", "ok", Some(0.001), 0);
        let t = m.render(None);
        assert!(
            !t.lines().any(|l| l.starts_with("pvrun_resets_total 7")),
            "{t}"
        );
        assert!(
            t.contains(r#"function="x\"} 999\npvrun_resets_total 7\n\\""#),
            "{t}"
        );
        assert_eq!(
            t.lines()
                .filter(|l| l.starts_with("pvrun_calls_total"))
                .count(),
            1
        );
    }
}
