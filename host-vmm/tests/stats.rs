//! `pvrun --stats`: the VM's counters at exit (exits by kind, hypercalls by name, console
//! bytes, device ring requests) match what the guest did.

mod common;

use std::collections::HashMap;
use std::process::Command;

use common::{guest, pvrun, pvrun_bin};

/// The `pvrun: stats:` lines of `stderr`, as `key -> number` (`exits`, `exits.hypercall`,
/// `hypercalls.exit`, `console`, `device.data.requests`, ...).
fn stats(stderr: &str) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for line in stderr.lines() {
        let Some(rest) = line.strip_prefix("pvrun: stats: ") else {
            continue;
        };
        let num = |s: &str| -> u64 { s.parse().unwrap_or_else(|_| panic!("`{s}` in `{line}`")) };
        if let Some(r) = rest.strip_prefix("exits ") {
            let (total, kinds) = r.split_once(" (").unwrap();
            out.insert("exits".into(), num(total));
            for kv in kinds.trim_end_matches(')').split(", ") {
                let (k, v) = kv.split_once(' ').unwrap();
                out.insert(format!("exits.{k}"), num(v));
            }
        } else if let Some(r) = rest.strip_prefix("hypercalls ") {
            let (total, names) = r.split_once(" (").unwrap();
            out.insert("hypercalls".into(), num(total));
            for kv in names
                .trim_end_matches(')')
                .split(", ")
                .filter(|s| *s != "none")
            {
                let (k, v) = kv.split_once(' ').unwrap();
                out.insert(format!("hypercalls.{k}"), num(v));
            }
        } else if let Some(r) = rest.strip_prefix("console ") {
            out.insert("console".into(), num(r.trim_end_matches(" bytes")));
        } else if let Some(r) = rest.strip_prefix("device ") {
            let (name, counts) = r.split_once(": ").unwrap();
            for kv in counts.split(", ") {
                let (v, k) = kv.split_once(' ').unwrap();
                out.insert(format!("device.{name}.{k}"), num(v));
            }
        } else {
            panic!("unknown stats line `{line}`");
        }
    }
    out
}

#[test]
fn stats_count_exits_hypercalls_and_console_bytes() {
    let r = pvrun(&guest("hello"), &["--stats"], &["a", "b"]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    let s = stats(&r.stderr);
    let kinds: u64 = ["hypercall", "doorbell", "exception", "interrupted", "other"]
        .iter()
        .map(|k| s[&format!("exits.{k}")])
        .sum();
    assert_eq!(kinds, s["exits"], "{s:?}");
    assert!(s["exits.hypercall"] >= 1, "{s:?}");
    assert_eq!(s["hypercalls"], s["exits.hypercall"]);
    assert_eq!(s["hypercalls.exit"], 1, "{s:?}");
    assert_eq!(s["exits.exception"], 0);
    // Everything the guest printed went through the console and was counted.
    assert_eq!(s["console"], r.stdout.len() as u64, "stdout {:?}", r.stdout);
    // Without --stats: no such lines.
    let quiet = pvrun(&guest("hello"), &[], &[]);
    assert!(!quiet.stderr.contains("pvrun: stats:"), "{}", quiet.stderr);
}

#[test]
fn a_crash_counts_as_an_exception_exit() {
    let r = pvrun(
        &guest("crashes"),
        &["--stats", "--timeout", "20"],
        &["fault"],
    );
    assert_eq!(r.status, 139, "{}", r.stderr);
    let s = stats(&r.stderr);
    assert_eq!(s["exits.exception"], 1, "{s:?}");
    assert_eq!(s.get("hypercalls.exit"), None, "{s:?}");
}

#[test]
fn device_ring_requests_are_counted() {
    let dir = std::env::temp_dir().join(format!("pvrun-stats-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _c = Cleanup(dir.clone());
    let img = dir.join("kv.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let out = Command::new(pvrun_bin())
        .args(["--stats", "--timeout", "60", "--disk"])
        .arg(format!("data={}", img.display()))
        .arg(guest("kvstore"))
        .args(["--", "put", "a", "1", ";", "put", "b", "2", ";", "get", "a"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let s = stats(&err);
    assert!(s["device.data.requests"] >= 2, "{s:?}");
    assert!(s["device.data.doorbells"] >= 1, "{s:?}");
    assert_eq!(s["device.data.dropped"], 0, "{s:?}");
}
