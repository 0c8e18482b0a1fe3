//! A [`log`](https://docs.rs/log) logger that writes to the guest's stderr (the console),
//! filtered like `env_logger` by the guest's `RUST_LOG` variable.
//!
//! ```ignore
//! pvrun::log::init();            // reads RUST_LOG from the guest's environment
//! log::info!("listening on {addr}");
//! ```
//!
//! Run the guest with `cargo pvrun --env RUST_LOG=debug` (or `pvrun --env ...`). Each record
//! is one line on stderr: `[INFO  my_guest::net] listening on 10.0.0.2:80`.
//!
//! `RUST_LOG` is a comma-separated list of directives, as in `env_logger`:
//! - `LEVEL` (`off`, `error`, `warn`, `info`, `debug`, `trace`, any case): the level for
//!   every target;
//! - `TARGET=LEVEL`: the level for a target (a module path such as `my_guest::net`, or a
//!   crate name) and everything under it; the longest matching target wins;
//! - `TARGET` alone: everything from that target.
//!
//! Without `RUST_LOG` (or with only unknown directives) only errors are logged, as with
//! `env_logger`. Unparsable directives are ignored. The logger is not installed
//! automatically, so a guest may install its own instead.

use alloc::boxed::Box;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use ::log::{Level, LevelFilter, Log, Metadata, Record};

/// The environment variable the filter is read from.
pub const ENV_VAR: &str = "RUST_LOG";

/// The console logger with its parsed filter.
struct ConsoleLogger {
    filter: Filter,
}

/// A parsed `RUST_LOG` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    /// The level for targets no directive names.
    default: LevelFilter,
    /// `(target, level)` directives, longest target first.
    targets: Vec<(String, LevelFilter)>,
}

impl Filter {
    /// Parses a `RUST_LOG`-style value (see the module docs).
    pub fn parse(spec: &str) -> Filter {
        let mut default = None;
        let mut targets: Vec<(String, LevelFilter)> = Vec::new();
        for directive in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            match directive.split_once('=') {
                Some((target, level)) => {
                    if let (false, Some(level)) = (target.trim().is_empty(), level_of(level)) {
                        targets.push((target.trim().to_string(), level));
                    }
                }
                None => match level_of(directive) {
                    Some(level) => default = Some(level),
                    None => targets.push((directive.to_string(), LevelFilter::Trace)),
                },
            }
        }
        // Longest first, so the most specific directive is found first; among equal
        // targets the later directive wins (stable sort keeps order, so reverse first).
        targets.reverse();
        targets.sort_by_key(|(t, _)| core::cmp::Reverse(t.len()));
        let default = default.unwrap_or(if targets.is_empty() {
            LevelFilter::Error
        } else {
            LevelFilter::Off
        });
        Filter { default, targets }
    }

    /// The most verbose level any directive lets through.
    pub fn max_level(&self) -> LevelFilter {
        self.targets
            .iter()
            .map(|(_, l)| *l)
            .fold(self.default, core::cmp::max)
    }

    /// Whether a record of `level` from `target` is logged.
    pub fn enabled(&self, target: &str, level: Level) -> bool {
        let limit = self
            .targets
            .iter()
            .find(|(t, _)| is_under(target, t))
            .map_or(self.default, |(_, l)| *l);
        level <= limit
    }
}

/// Whether `target` is `prefix` or a module path below it (`a::b` is under `a`, `ab` is not).
fn is_under(target: &str, prefix: &str) -> bool {
    match target.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with("::"),
        None => false,
    }
}

fn level_of(s: &str) -> Option<LevelFilter> {
    s.trim().parse().ok()
}

impl Log for ConsoleLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.filter.enabled(metadata.target(), metadata.level())
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            crate::eprintln!(
                "[{:<5} {}] {}",
                record.level(),
                record.target(),
                record.args()
            );
        }
    }

    fn flush(&self) {
        crate::console::flush();
    }
}

/// Installs the console logger with the filter from the guest's `RUST_LOG` (errors only
/// when it is unset). Does nothing if a logger is already installed; see [`try_init`].
pub fn init() {
    let _ = try_init();
}

/// Installs the console logger with the filter from `RUST_LOG`; fails if another logger
/// was installed first.
pub fn try_init() -> Result<(), ::log::SetLoggerError> {
    init_with_filter(Filter::parse(crate::env::var(ENV_VAR).unwrap_or("")))
}

/// Installs the console logger with the filter parsed from `spec` (ignoring `RUST_LOG`).
pub fn init_with_spec(spec: &str) -> Result<(), ::log::SetLoggerError> {
    init_with_filter(Filter::parse(spec))
}

fn init_with_filter(filter: Filter) -> Result<(), ::log::SetLoggerError> {
    let max = filter.max_level();
    let logger: &'static ConsoleLogger = Box::leak(Box::new(ConsoleLogger { filter }));
    ::log::set_logger(logger)?;
    ::log::set_max_level(max);
    Ok(())
}
