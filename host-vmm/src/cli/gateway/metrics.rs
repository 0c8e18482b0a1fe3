//! `GET /metrics`: the gateway's counters in the Prometheus/OpenMetrics text format,
//! written by the `prometheus-client` crate (the Prometheus project's Rust client).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `pvrun_calls_total` | counter | `guest`, `function`, `outcome` (the `X-Pvrun-Outcome` value) |
//! | `pvrun_call_duration_seconds` | histogram | `guest`, `function` |
//! | `pvrun_pool_sandboxes` | gauge (sandboxes now) | `guest` |
//! | `pvrun_pool_busy_sandboxes` | gauge (running a call or being reset) | `guest` |
//! | `pvrun_pool_min_sandboxes`, `pvrun_pool_max_sandboxes` | gauge | `guest` |
//! | `pvrun_pool_grown_total`, `pvrun_pool_shrunk_total` | counter (sandboxes made under load, dropped after their idle time) | `guest` |
//! | `pvrun_pool_grow_failures_total` | counter | `guest` |
//! | `pvrun_calls_in_flight`, `pvrun_concurrency_limit` | gauge (calls admitted now, running or queued for a sandbox, and the limit beyond which calls get 429; in flight minus busy sandboxes is the queue) | `guest` (only guests with a limit) |
//! | `pvrun_resets_total` | counter | `guest` |
//! | `pvrun_reset_dirty_pages` | histogram (pages copied back per reset) | `guest` |
//! | `pvrun_vm_exits_total` | counter (exits of the calls made) | `guest`, `kind`: `hypercall`, `doorbell`, `exception`, `interrupted`, `other` |
//! | `pvrun_sandbox_creations_total` | counter (in this process) | `source`: `elf`, `snapshot`, `shell` (a sandbox an elastic pool grew is a `shell`: a VM made for it) |
//! | `pvrun_snapshot_files_loaded_total` | counter | |
//!
//! Label values are only guest names (checked URL-safe, or the single guest's file name)
//! and names the guests export, or `-` for a path that names none, so a client cannot grow
//! the label space.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::handler::Guest;
use crate::SandboxCreations;

type Labels = Vec<(&'static str, String)>;

fn guest_label(guest: &str) -> Labels {
    vec![("guest", guest.to_string())]
}

/// Everything `/metrics` reports.
pub(super) struct Metrics {
    registry: Registry,
    calls: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
    pool_size: Family<Labels, Gauge>,
    pool_busy: Family<Labels, Gauge>,
    pool_min: Family<Labels, Gauge>,
    pool_max: Family<Labels, Gauge>,
    grown: Family<Labels, Counter>,
    shrunk: Family<Labels, Counter>,
    grow_failures: Family<Labels, Counter>,
    in_flight: Family<Labels, Gauge>,
    limit: Family<Labels, Gauge>,
    resets: Family<Labels, Counter>,
    reset_pages: Family<Labels, Histogram>,
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
            "Function calls by guest, function and outcome",
            calls.clone(),
        );
        // 20 µs to ~10 s.
        let latency = Family::<Labels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(20e-6, 2.0, 20))) as fn() -> Histogram,
        );
        registry.register(
            "call_duration_seconds",
            "Time from admission to the call's result, by guest and function",
            latency.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Family::<Labels, Gauge>::default();
            registry.register(name, help, g.clone());
            g
        };
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Family::<Labels, Counter>::default();
            registry.register(name, help, c.clone());
            c
        };
        let pool_size = gauge(
            &mut registry,
            "pool_sandboxes",
            "Sandboxes in the guest's pool",
        );
        let pool_busy = gauge(
            &mut registry,
            "pool_busy_sandboxes",
            "Sandboxes running a call or being reset",
        );
        let pool_min = gauge(&mut registry, "pool_min_sandboxes", "The pool's least size");
        let pool_max = gauge(
            &mut registry,
            "pool_max_sandboxes",
            "The pool's largest size",
        );
        let grown = counter(
            &mut registry,
            "pool_grown",
            "Sandboxes made because every sandbox of the guest was busy",
        );
        let shrunk = counter(
            &mut registry,
            "pool_shrunk",
            "Sandboxes dropped after their idle time",
        );
        let grow_failures = counter(
            &mut registry,
            "pool_grow_failures",
            "Sandboxes the pool failed to make while growing",
        );
        let in_flight = gauge(
            &mut registry,
            "calls_in_flight",
            "Calls of the guest running or waiting for a sandbox",
        );
        let limit = gauge(
            &mut registry,
            "concurrency_limit",
            "Calls of the guest in flight beyond which calls get 429",
        );
        let resets = counter(&mut registry, "resets", "Sandbox resets after calls");
        let reset_pages = Family::<Labels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(1.0, 2.0, 16))) as fn() -> Histogram,
        );
        registry.register(
            "reset_dirty_pages",
            "Pages copied back per reset",
            reset_pages.clone(),
        );
        let creations = counter(
            &mut registry,
            "sandbox_creations",
            "Sandboxes created in this process, by source (elf, snapshot, shell)",
        );
        let exits = counter(
            &mut registry,
            "vm_exits",
            "VM exits of the calls made, by kind",
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
            pool_min,
            pool_max,
            grown,
            shrunk,
            grow_failures,
            in_flight,
            limit,
            resets,
            reset_pages,
            creations,
            files_loaded,
            exits,
        }
    }

    /// One call that reached a function (or was refused before it): its outcome and, when
    /// it ran, its latency and the pages its reset copied.
    pub fn call(
        &self,
        guest: &str,
        function: &str,
        outcome: &str,
        seconds: Option<f64>,
        reset_pages: usize,
    ) {
        self.calls
            .get_or_create(&vec![
                ("guest", guest.to_string()),
                ("function", function.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
        if let Some(s) = seconds {
            self.latency
                .get_or_create(&vec![
                    ("guest", guest.to_string()),
                    ("function", function.to_string()),
                ])
                .observe(s);
        }
        if reset_pages > 0 {
            self.resets.get_or_create(&guest_label(guest)).inc();
            self.reset_pages
                .get_or_create(&guest_label(guest))
                .observe(reset_pages as f64);
        }
    }

    /// The text exposition, with the pools' and the process's current figures.
    pub fn render(&self, guests: &[Guest]) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        for g in guests {
            let l = guest_label(&g.name);
            if let Some((n, limit)) = g.occupancy() {
                self.in_flight.get_or_create(&l).set(n as i64);
                self.limit.get_or_create(&l).set(limit as i64);
            }
            // Every guest has its series from the start, even before its pool is built.
            let _ = self.resets.get_or_create(&l);
            let Some(ready) = g.pool.get() else {
                continue;
            };
            let p = ready.pool.stats();
            self.pool_size.get_or_create(&l).set(p.size as i64);
            self.pool_busy.get_or_create(&l).set(p.busy as i64);
            self.pool_min.get_or_create(&l).set(p.min as i64);
            self.pool_max.get_or_create(&l).set(p.max as i64);
            for (family, n) in [
                (&self.grown, p.grown),
                (&self.shrunk, p.shrunk),
                (&self.grow_failures, p.grow_failures),
            ] {
                family.get_or_create(&l).inner().store(n, Relaxed);
            }
            for (kind, n) in crate::EXIT_KINDS.iter().zip(p.exits) {
                self.exits
                    .get_or_create(&vec![("guest", g.name.clone()), ("kind", kind.to_string())])
                    .inner()
                    .store(n, Relaxed);
            }
        }
        let c = SandboxCreations::now();
        for (source, n) in [("elf", c.elf), ("snapshot", c.snapshot), ("shell", c.shell)] {
            let counter = self
                .creations
                .get_or_create(&vec![("source", source.to_string())]);
            counter.inner().store(n, Relaxed);
        }
        self.files_loaded.inner().store(c.files_loaded, Relaxed);
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
        m.call("g", "upper", "ok", Some(0.000_05), 3);
        m.call("g", "upper", "ok", Some(0.002), 5);
        m.call("g", "upper", "failed", Some(0.001), 1);
        m.call("h", "upper", "ok", Some(0.001), 1);
        m.call("-", "-", "unknown", None, 0);
        let t = m.render(&[]);
        assert!(
            t.contains(r#"pvrun_calls_total{guest="g",function="upper",outcome="ok"} 2"#),
            "{t}"
        );
        assert!(t.contains(r#"pvrun_calls_total{guest="g",function="upper",outcome="failed"} 1"#));
        assert!(t.contains(r#"pvrun_calls_total{guest="h",function="upper",outcome="ok"} 1"#));
        assert!(t.contains(r#"pvrun_calls_total{guest="-",function="-",outcome="unknown"} 1"#));
        assert!(t.contains(r#"pvrun_call_duration_seconds_count{guest="g",function="upper"} 3"#));
        assert!(t.contains(r#"pvrun_resets_total{guest="g"} 3"#), "{t}");
        assert!(
            t.contains(r#"pvrun_reset_dirty_pages_sum{guest="g"} 9.0"#),
            "{t}"
        );
        assert!(t.trim_end().ends_with("# EOF"));
    }

    #[test]
    fn a_guest_chosen_function_name_cannot_forge_lines() {
        // Export names are the guest's: quotes, backslashes and newlines are escaped, so a
        // name can never end its label or start a sample of its own.
        let m = Metrics::new();
        m.call(
            "g",
            "x\"} 999\npvrun_resets_total 7\n\\",
            "ok",
            Some(0.001),
            0,
        );
        let t = m.render(&[]);
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
