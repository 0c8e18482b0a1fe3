//! The guests one `pvrun serve` serves: `--guest NAME=PATH[,KEY=VALUE...]` (repeatable)
//! and `--config FILE` (TOML), turned into validated [`GuestSpec`]s.
//!
//! Why TOML through `toml` + `serde`: it is the format Rust users already write
//! (`Cargo.toml`), it has comments, and `serde`'s `deny_unknown_fields` turns a misspelt
//! key into an error that names it and the line, instead of a key silently ignored. The
//! file:
//!
//! ```toml
//! [[guest]]
//! name = "fns"                # URL-safe: letters, digits, `-`, `_`, `.`
//! elf = "functions"           # the guest ELF, or `snapshot = "fns.snap"` (relative
//!                             # paths are relative to the file's directory)
//! mem = "64M"                 # guest memory (ELF only; a snapshot has its own)
//! args = ["--flag"]           # initialisation arguments after argv[0] (ELF only)
//! env = { GREETING = "hi" }   # initialisation environment (ELF only)
//! min = 1                     # sandboxes kept however idle
//! max = 8                     # sandboxes the pool grows to under load
//! idle = 60                   # seconds an extra sandbox may stay idle
//! timeout = 10                # seconds a call may run (504)
//! concurrency = 32            # calls in flight (running or waiting); 429 beyond
//! ```
//!
//! `--guest` takes the same keys after the ELF path (`NAME=PATH,max=8,idle=30`) or with
//! `snapshot=FILE` in its place (`NAME=snapshot=FILE,...`); a path with a comma needs the
//! file. Every error is one line naming the guest or the file's line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{parse_mem, parse_timeout};

/// Where a guest's sandboxes come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestSource {
    /// Boot this ELF.
    Elf(PathBuf),
    /// Load this snapshot file (`pvrun snapshot`).
    Snapshot(PathBuf),
}

/// One guest of a multi-guest `pvrun serve`, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct GuestSpec {
    /// Its name in URLs (`POST /NAME/FN`), metrics and logs.
    pub name: String,
    /// Its ELF or snapshot file.
    pub source: GuestSource,
    /// Guest memory (ELF only).
    pub mem: u64,
    /// Initialisation arguments after `argv[0]` (ELF only).
    pub args: Vec<String>,
    /// Initialisation environment (ELF only).
    pub env: Vec<(String, String)>,
    /// Pool sizes.
    pub min: usize,
    /// See `min`.
    pub max: usize,
    /// Idle time after which a sandbox beyond `min` is dropped.
    pub idle: Duration,
    /// Call timeout.
    pub timeout: Duration,
    /// Calls in flight (running or waiting for a sandbox) beyond which calls get 429.
    pub concurrency: usize,
}

/// Values a guest takes when it does not set them (from `pvrun serve`'s options).
#[derive(Clone, Copy, Debug)]
pub struct Defaults {
    /// `--mem`.
    pub mem: u64,
    /// `--timeout`.
    pub timeout: Duration,
    /// `--idle-timeout`.
    pub idle: Duration,
    /// `--pool`: the default `max` (`min` defaults to 1).
    pub max: usize,
}

/// The largest pool a guest may ask for (each sandbox is a VM and a call thread).
pub const MAX_POOL: usize = 256;
/// The largest concurrency a guest may ask for.
pub const MAX_CONCURRENCY: usize = 65_536;

/// Names that are routes of their own (`GET /metrics` and so on) and cannot be guests.
const RESERVED: &[&str] = &["healthz", "readyz", "metrics"];

/// Checks a guest name: 1 to 64 of `A-Z a-z 0-9 - _ .`, not starting with `.`, not a
/// route of the gateway's own.
pub fn check_name(name: &str) -> Result<(), String> {
    let shown = crate::escape_controls(name);
    if name.is_empty() || name.len() > 64 {
        return Err(format!(
            "guest name `{shown}` must be 1 to 64 characters long"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        || name.starts_with('.')
    {
        return Err(format!(
            "guest name `{shown}` may hold only letters, digits, `-`, `_` and `.` (and not start with `.`): it is part of the URL"
        ));
    }
    if RESERVED.contains(&name) {
        return Err(format!(
            "guest name `{name}` is taken by the gateway's own GET /{name}; choose another"
        ));
    }
    Ok(())
}

/// A guest's settings before defaults, as both forms give them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    name: String,
    elf: Option<PathBuf>,
    snapshot: Option<PathBuf>,
    mem: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
    min: Option<usize>,
    max: Option<usize>,
    idle: Option<f64>,
    timeout: Option<f64>,
    concurrency: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    guest: Vec<Raw>,
}

fn seconds(what: &str, v: f64) -> Result<Duration, String> {
    parse_timeout(&v.to_string()).map_err(|e| format!("`{what}`: {e}"))
}

impl Raw {
    fn finish(self, d: &Defaults, base: Option<&Path>) -> Result<GuestSpec, String> {
        check_name(&self.name)?;
        let name = self.name;
        let at = |p: PathBuf| match base {
            Some(b) if p.is_relative() => b.join(p),
            _ => p,
        };
        let source = match (self.elf, self.snapshot) {
            (Some(e), None) => GuestSource::Elf(at(e)),
            (None, Some(s)) => GuestSource::Snapshot(at(s)),
            (Some(_), Some(_)) => {
                return Err(format!(
                    "guest `{name}`: give its ELF or its snapshot file, not both"
                ));
            }
            (None, None) => {
                return Err(format!(
                    "guest `{name}`: give its ELF (`elf`) or its snapshot file (`snapshot`)"
                ));
            }
        };
        if matches!(source, GuestSource::Snapshot(_))
            && (self.mem.is_some() || !self.args.is_empty() || !self.env.is_empty())
        {
            return Err(format!(
                "guest `{name}`: `mem`, `args` and `env` are the snapshot file's; they cannot be set for a snapshot"
            ));
        }
        let mem = match self.mem {
            Some(m) => parse_mem(&m).map_err(|e| format!("guest `{name}`: `mem`: {e}"))?,
            None => d.mem,
        };
        let min = self.min.unwrap_or(1);
        let max = self.max.unwrap_or(d.max.max(min));
        if min == 0 || max < min || max > MAX_POOL {
            return Err(format!(
                "guest `{name}`: the pool needs 1 <= min <= max <= {MAX_POOL} (got min {min}, max {max})"
            ));
        }
        let concurrency = self.concurrency.unwrap_or(4 * max);
        if concurrency == 0 || concurrency > MAX_CONCURRENCY {
            return Err(format!(
                "guest `{name}`: `concurrency` must be 1 to {MAX_CONCURRENCY} (got {concurrency})"
            ));
        }
        let idle = match self.idle {
            Some(v) => seconds("idle", v).map_err(|e| format!("guest `{name}`: {e}"))?,
            None => d.idle,
        };
        let timeout = match self.timeout {
            Some(v) => seconds("timeout", v).map_err(|e| format!("guest `{name}`: {e}"))?,
            None => d.timeout,
        };
        Ok(GuestSpec {
            name,
            source,
            mem,
            args: self.args,
            env: self.env.into_iter().collect(),
            min,
            max,
            idle,
            timeout,
            concurrency,
        })
    }
}

/// Parses one `--guest NAME=PATH[,KEY=VALUE...]` (or `NAME=snapshot=FILE[,...]`).
pub fn parse_guest_arg(arg: &str, d: &Defaults) -> Result<GuestSpec, String> {
    let shown = crate::escape_controls(arg);
    let Some((name, rest)) = arg.split_once('=') else {
        return Err(format!(
            "--guest `{shown}` is not NAME=PATH[,KEY=VALUE...] (e.g. fns=./functions,max=8)"
        ));
    };
    let mut raw = Raw {
        name: name.to_string(),
        ..Raw::default()
    };
    check_name(name)?;
    let mut items = rest.split(',');
    let first = items.next().unwrap_or("");
    let mut items: Vec<&str> = items.collect();
    if first.starts_with("snapshot=") {
        items.insert(0, first);
    } else if first.is_empty() {
        return Err(format!("--guest `{shown}`: the ELF path is empty"));
    } else {
        raw.elf = Some(PathBuf::from(first));
    }
    let num = |k: &str, v: &str| -> Result<usize, String> {
        v.parse()
            .map_err(|_| format!("--guest `{name}`: `{k}={v}` is not a whole number"))
    };
    let secs = |k: &str, v: &str| -> Result<f64, String> {
        v.parse()
            .map_err(|_| format!("--guest `{name}`: `{k}={v}` is not a number of seconds"))
    };
    for item in items {
        let Some((k, v)) = item.split_once('=') else {
            return Err(format!(
                "--guest `{name}`: `{}` is not KEY=VALUE",
                crate::escape_controls(item)
            ));
        };
        match k {
            "snapshot" if raw.snapshot.is_none() => raw.snapshot = Some(PathBuf::from(v)),
            "mem" => raw.mem = Some(v.to_string()),
            "min" => raw.min = Some(num(k, v)?),
            "max" => raw.max = Some(num(k, v)?),
            "pool" => {
                let n = num(k, v)?;
                raw.min = Some(n);
                raw.max = Some(n);
            }
            "idle" => raw.idle = Some(secs(k, v)?),
            "timeout" => raw.timeout = Some(secs(k, v)?),
            "concurrency" => raw.concurrency = Some(num(k, v)?),
            _ => {
                return Err(format!(
                    "--guest `{name}`: unknown key `{}` (known: snapshot, mem, min, max, pool, idle, timeout, concurrency)",
                    crate::escape_controls(k)
                ));
            }
        }
    }
    raw.finish(d, None)
}

/// Reads and checks a `--config` file.
pub fn read_config(path: &Path, d: &Defaults) -> Result<Vec<GuestSpec>, String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the config file {shown}: {e}"))?;
    let file: File = toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let msg = e.message().replace(['\n', '\r'], " ");
        let msg = crate::escape_controls(msg.trim()).into_owned();
        match line {
            Some(l) => format!("config file {shown}, line {l}: {msg}"),
            None => format!("config file {shown}: {msg}"),
        }
    })?;
    if file.guest.is_empty() {
        return Err(format!(
            "config file {shown} names no guest (add a [[guest]] table with `name` and `elf`)"
        ));
    }
    let base = path.parent().unwrap_or(Path::new("."));
    file.guest
        .into_iter()
        .map(|g| {
            g.finish(d, Some(base))
                .map_err(|e| format!("config file {shown}: {e}"))
        })
        .collect()
}

/// Rejects a name given twice (across `--guest` and `--config`).
pub fn check_unique(guests: &[GuestSpec]) -> Result<(), String> {
    let mut seen = HashMap::new();
    for g in guests {
        if seen.insert(g.name.as_str(), ()).is_some() {
            return Err(format!(
                "guest name `{}` is given twice; each guest needs its own name",
                g.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Defaults = Defaults {
        mem: 64 << 20,
        timeout: Duration::from_secs(10),
        idle: Duration::from_secs(60),
        max: 4,
    };

    #[test]
    fn guest_args_parse_with_defaults() {
        let g = parse_guest_arg("fns=./f,max=8,idle=2.5,concurrency=3", &D).unwrap();
        assert_eq!(g.name, "fns");
        assert_eq!(g.source, GuestSource::Elf("./f".into()));
        assert_eq!((g.min, g.max, g.concurrency), (1, 8, 3));
        assert_eq!(g.idle, Duration::from_millis(2500));
        assert_eq!(g.timeout, D.timeout);
        let g = parse_guest_arg("s=snapshot=a.snap,pool=2", &D).unwrap();
        assert_eq!(g.source, GuestSource::Snapshot("a.snap".into()));
        assert_eq!((g.min, g.max, g.concurrency), (2, 2, 8));
    }

    #[test]
    fn bad_guest_args_are_one_line_errors() {
        for (arg, want) in [
            ("nope", "is not NAME=PATH"),
            ("a b=x", "may hold only"),
            ("metrics=x", "taken by the gateway"),
            ("a=x,frob=1", "unknown key `frob`"),
            ("a=x,max=lots", "not a whole number"),
            ("a=x,min=3,max=2", "1 <= min <= max"),
            ("a=x,idle=0", "positive"),
            ("a=", "ELF path is empty"),
            ("a=snapshot=s,mem=1G", "are the snapshot file's"),
            ("a=x,snapshot=s", "not both"),
            ("\x1b[31m=x", "\\u{1b}"),
        ] {
            let e = parse_guest_arg(arg, &D).unwrap_err();
            assert!(e.contains(want), "{arg}: {e}");
            assert!(!e.contains('\n') && !e.contains('\x1b'), "{e:?}");
        }
    }

    #[test]
    fn names_are_url_safe() {
        for ok in ["a", "fns-1", "A_b.c", &"x".repeat(64)] {
            check_name(ok).unwrap();
        }
        for bad in [
            "",
            ".hidden",
            "a/b",
            "a%2f",
            "é",
            "healthz",
            &"x".repeat(65),
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
