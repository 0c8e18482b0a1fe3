//! `-v/--verbose` and `RUST_LOG`: what the host did (ELF segments, memory map, devices,
//! VM exits), as `tracing` events written to stderr.
//!
//! Why `tracing` + `tracing-subscriber`: the library emits structured events at the few
//! places that matter (`loader`, `builder`, `devices`, the run loop) at `debug`/`trace`
//! level, and an embedder can collect them with its own subscriber; without one an event
//! costs a relaxed load. `tracing-subscriber`'s `EnvFilter` gives `RUST_LOG` its usual
//! meaning (`RUST_LOG=host_vmm=trace`, `RUST_LOG=host_vmm::runtime=trace`, ...).
//!
//! Every line goes through [`crate::StdStream`] (a closed stderr drops log output, never
//! panics, and a stalled one never holds a stopping guest), or, for `serve`, through the
//! gateway's bounded log queue ([`Sink::Gateway`]), which never blocks a call at all.

use std::io::Write;
use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

/// Where log lines go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sink {
    /// Straight to stderr.
    #[default]
    Stderr,
    /// Through the gateway's log queue (`serve`: lines are dropped, counted, rather than
    /// ever blocking a call).
    Gateway,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// A `MakeWriter` over the host's stderr that never panics.
struct Stderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(Vec::new())
    }
}

/// Collects one event and writes it whole when dropped (lines of concurrent threads do
/// not interleave); errors are dropped.
struct LineWriter(Vec<u8>);

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        match SINK.get().copied().unwrap_or_default() {
            Sink::Stderr => {
                let _ = crate::StdStream::stderr().write_all(&self.0);
            }
            Sink::Gateway => {
                let text = String::from_utf8_lossy(&self.0);
                super::gateway::log_line(text.trim_end_matches('\n'));
            }
        }
    }
}

/// Installs the stderr logger: `verbose` 0 logs what `RUST_LOG` asks for (nothing when it
/// is unset), 1 (`-v`) adds pvrun's `debug` events, 2 or more (`-vv`) its `trace` events
/// (every VM exit). Does nothing when neither asks for anything, so a quiet run pays
/// nothing. A `RUST_LOG` that does not parse is reported once and ignored.
pub fn init(verbose: u8) {
    init_to(verbose, Sink::Stderr)
}

/// [`init`], writing to `sink`.
pub fn init_to(verbose: u8, sink: Sink) {
    let _ = SINK.set(sink);
    let rust_log = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty());
    if verbose == 0 && rust_log.is_none() {
        return;
    }
    let mut filter = EnvFilter::default().add_directive(LevelFilter::OFF.into());
    if let Some(spec) = &rust_log {
        match EnvFilter::try_new(spec) {
            Ok(f) => filter = f,
            Err(e) => crate::eprint_line(&format!(
                "pvrun: warning: ignoring RUST_LOG `{}`: {e}",
                crate::escape_controls(spec)
            )),
        }
    }
    let level: &[&str] = match verbose {
        0 => &[],
        1 => &["host_vmm=debug", "pvrun::access=info"],
        _ => &["host_vmm=trace", "pvrun::access=info"],
    };
    for d in level.iter().filter_map(|d| d.parse().ok()) {
        filter = filter.add_directive(d);
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Stderr)
        .with_ansi(false)
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .with_target(true)
        .try_init();
}
