//! `-v/--verbose` and `RUST_LOG`: what the host did (ELF segments, memory map, devices,
//! VM exits), as `tracing` events written to stderr.
//!
//! Why `tracing` + `tracing-subscriber`: the library emits structured events at the few
//! places that matter (`loader`, `builder`, `devices`, the run loop) at `debug`/`trace`
//! level, and an embedder can collect them with its own subscriber; without one an event
//! costs a relaxed load. `tracing-subscriber`'s `EnvFilter` gives `RUST_LOG` its usual
//! meaning (`RUST_LOG=host_vmm=trace`, `RUST_LOG=host_vmm::runtime=trace`, ...).
//!
//! Every line goes through [`crate::StdStream`]: a closed or stalled stderr drops log
//! output, never panics or blocks a stopping guest.

use std::io::Write;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

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
        let _ = crate::StdStream::stderr().write_all(&self.0);
    }
}

/// Installs the stderr logger: `verbose` 0 logs what `RUST_LOG` asks for (nothing when it
/// is unset), 1 (`-v`) adds pvrun's `debug` events, 2 or more (`-vv`) its `trace` events
/// (every VM exit). Does nothing when neither asks for anything, so a quiet run pays
/// nothing. A `RUST_LOG` that does not parse is reported once and ignored.
pub fn init(verbose: u8) {
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
    let level = match verbose {
        0 => None,
        1 => Some("host_vmm=debug"),
        _ => Some("host_vmm=trace"),
    };
    if let Some(d) = level.and_then(|d| d.parse().ok()) {
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
