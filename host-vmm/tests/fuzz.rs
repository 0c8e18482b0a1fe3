//! Fuzzes the host from inside a guest (`guest-examples/fuzz`): seeded random hypercalls
//! with wild and edge-case arguments, console-ring corruption, and random block requests
//! and index games on a disk's ring. The host must answer every call with a documented
//! status (the guest checks, and counts contradictions as violations), mark a corrupt
//! ring broken, stop a guest that corrupts its console ring with a protocol fault, and
//! never panic, hang or fail itself.
//!
//! Bounded by default (4 seeds × 20,000 actions per mode, a few seconds). Long runs:
//!
//! ```sh
//! PVRUN_FUZZ_SEEDS=1000 PVRUN_FUZZ_ITERS=1000000 cargo test -p host-vmm --features cli --test fuzz -- --nocapture
//! ```
//!
//! `PVRUN_FUZZ_SEED` sets the first seed (default 1); seeds are consecutive from there.

mod common;

use std::time::Instant;

use common::{Run, guest, pvrun};

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
        Err(_) => default,
    }
}

/// The seeds to run: `PVRUN_FUZZ_SEEDS` of them from `PVRUN_FUZZ_SEED`.
fn seeds() -> std::ops::Range<u64> {
    let first = env_u64("PVRUN_FUZZ_SEED", 1);
    first..first + env_u64("PVRUN_FUZZ_SEEDS", 4)
}

fn iterations() -> u64 {
    env_u64("PVRUN_FUZZ_ITERS", 20_000)
}

/// A generous timeout for `iters` actions (each is one or a few VM exits, ~25 µs here).
fn timeout(iters: u64) -> String {
    (30 + iters / 2_000).to_string()
}

/// Checks what every fuzz run must satisfy: no host panic or host error status, and only
/// pvrun reports on stderr (`allowed` says which).
fn check_host(what: &str, r: &Run, allowed: &dyn Fn(&str) -> bool) {
    let ctx = || {
        format!(
            "{what}: status {}\nstderr:\n{}\nstdout (end):\n{}",
            r.status,
            r.stderr,
            tail(&r.stdout)
        )
    };
    assert!(
        !matches!(r.status, 101 | 124 | 125 | 134),
        "host failure or hang: {}",
        ctx()
    );
    assert!(!r.stderr.contains("panicked"), "host panic: {}", ctx());
    for line in r.stderr.lines() {
        assert!(allowed(line), "unexpected stderr line {line:?}: {}", ctx());
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

fn device_broken(line: &str) -> bool {
    line.starts_with("pvrun: device `disk` broken: ")
}

/// Runs `fuzz SEED ITERS [extra]` and checks a clean finish; returns the done line.
fn run_fuzz(seed: u64, iters: u64, opts: &[&str], extra: &[&str]) -> String {
    let elf = guest("fuzz");
    let t = timeout(iters);
    let mut o = vec!["--timeout", t.as_str()];
    o.extend_from_slice(opts);
    let (s, n) = (seed.to_string(), iters.to_string());
    let mut args = vec!["fuzz", s.as_str(), n.as_str()];
    args.extend_from_slice(extra);
    let r = pvrun(&elf, &o, &args);
    let what = format!("fuzz seed {seed} {extra:?}");
    check_host(&what, &r, &device_broken);
    let done = r
        .stdout
        .lines()
        .find_map(|l| l.find("fuzz done ").map(|i| &l[i..]))
        .unwrap_or_else(|| {
            panic!(
                "{what}: no `fuzz done` line, status {}\n{}",
                r.status,
                tail(&r.stdout)
            )
        })
        .to_string();
    let violations: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.contains("violation: "))
        .collect();
    assert!(
        r.stdout.lines().any(|l| l == "fuzz violations=0"),
        "{what}: the host contradicted the ABI:\n{}\n{done}",
        violations.join("\n")
    );
    assert_eq!(r.status, 0, "{what}: status {}\n{}", r.status, r.stderr);
    done
}

#[test]
fn fuzz_hypercalls() {
    let iters = iterations();
    let t = Instant::now();
    let mut total = 0;
    for seed in seeds() {
        let done = run_fuzz(seed, iters, &[], &[]);
        println!("{done}");
        total += iters;
    }
    println!(
        "fuzz_hypercalls: {total} actions over {} seeds in {:.1?}",
        seeds().count(),
        t.elapsed()
    );
}

#[test]
fn fuzz_console_ring() {
    let elf = guest("fuzz");
    let t = Instant::now();
    for seed in seeds() {
        let s = seed.to_string();
        let r = pvrun(&elf, &["--timeout", "30"], &["fuzz-console", &s]);
        let what = format!("fuzz-console seed {seed}");
        check_host(&what, &r, &|l| l.starts_with("pvrun: guest crashed: "));
        assert_eq!(r.status, 139, "{what}: {}\n{}", r.stderr, tail(&r.stdout));
        let reports = r
            .stderr
            .lines()
            .filter(|l| l.starts_with("pvrun: guest crashed: "))
            .count();
        assert_eq!(reports, 1, "{what}: {}", r.stderr);
        println!(
            "fuzz-console seed {seed}: {}",
            r.stderr.lines().next().unwrap_or("")
        );
    }
    println!(
        "fuzz_console_ring: {} seeds in {:.1?}",
        seeds().count(),
        t.elapsed()
    );
}

/// A temporary disk image, deleted on drop.
struct Image(std::path::PathBuf);

impl Image {
    fn new(tag: &str, size: u64) -> Image {
        let p = std::env::temp_dir().join(format!("pvrun-fuzz-{tag}-{}.img", std::process::id()));
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(size).unwrap();
        Image(p)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn fuzz_disk_ring() {
    let iters = iterations() / 2;
    let img = Image::new("disk", 1 << 20);
    let disk = format!("disk={}", img.0.display());
    let t = Instant::now();
    let mut total = 0;
    for seed in seeds() {
        let done = run_fuzz(seed, iters, &["--disk", &disk], &["--disk"]);
        println!("{done} (disk)");
        total += iters;
    }
    println!(
        "fuzz_disk_ring: {total} actions over {} seeds in {:.1?}",
        seeds().count(),
        t.elapsed()
    );
}
