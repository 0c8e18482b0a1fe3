//! `cargo pvrun test` overhead: a generated guest crate of 1,000 trivial `#[pvrun::test]`
//! functions, run by the same runner `cargo pvrun test` uses (boot once, one call and one
//! reset per test), beside the raw KVM exit floor from the same run.
//! Run with `cargo bench -p host-vmm --features cli --bench test_overhead`.

mod support;

use support::{Bar, Baseline, Ratio, Report, Unit, exit_floor, median};

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use host_vmm::cli::test_runner::{HarnessOptions, list, run_binary};
use host_vmm::{Sandbox, SandboxConfig};

const TESTS: usize = 1000;

/// The generated crate's directory, removed when dropped (also when the benchmark fails).
struct TempCrate(PathBuf);

impl Drop for TempCrate {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a guest library whose tests are `TESTS` trivial functions.
fn generate() -> TempCrate {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = root.canonicalize().unwrap();
    let dir = std::env::temp_dir().join(format!("pvrun-bench-tests-{}", std::process::id()));
    let guard = TempCrate(dir.clone());
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::create_dir_all(dir.join(".cargo")).unwrap();
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            r#"[package]
name = "pvrun-bench-tests"
version = "0.1.0"
edition = "2024"

[lib]
harness = false

[dependencies]
guest-sdk = {{ path = "{sdk}" }}

[workspace]

[profile.dev]
panic = "abort"

[profile.release]
panic = "abort"
debug = false
strip = "debuginfo"
"#,
            sdk = root.join("guest-sdk").display()
        ),
    )
    .unwrap();
    // Same dependency versions and build directory as the examples: nothing is rebuilt
    // but this crate.
    std::fs::copy(
        root.join("guest-examples/Cargo.lock"),
        dir.join("Cargo.lock"),
    )
    .unwrap();
    std::fs::write(
        dir.join(".cargo/config.toml"),
        format!(
            "[build]\ntarget-dir = \"{}\"\n",
            root.join("guest-examples/target").display()
        ),
    )
    .unwrap();
    let mut src = String::from(
        "#![no_std]\n#![cfg_attr(test, no_main)]\n\n#[cfg(test)]\nmod tests {\n    /// Expands to one trivial test per name.\n    macro_rules! trivial {\n        ($($n:ident)*) => { $(#[pvrun::test] fn $n() { assert_eq!(core::hint::black_box(2) + 2, 4); })* };\n    }\n    trivial! {",
    );
    for i in 0..TESTS {
        if i % 10 == 0 {
            src.push_str("\n       ");
        }
        write!(src, " t{i:04}").unwrap();
    }
    src.push_str("\n    }\n}\n");
    std::fs::write(dir.join("src/lib.rs"), src).unwrap();
    guard
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let runs = if quick { 3 } else { 15 };
    let krate = generate();
    let req = guest_build::BuildRequest {
        manifest_path: Some(krate.0.join("Cargo.toml")),
        release: true,
        quiet: true,
        ..Default::default()
    };
    let sel = guest_build::TestSelection {
        lib: true,
        ..Default::default()
    };
    let built = guest_build::build_tests(&req, &sel).expect("building the generated tests");
    let elf = built[0].elf.clone();
    let floor = exit_floor();

    let opts = |threads: usize, only_first: bool| HarnessOptions {
        threads,
        timeout: Duration::from_secs(60),
        filters: if only_first {
            vec!["tests::t0000".into()]
        } else {
            Vec::new()
        },
        exact: only_first,
        ..HarnessOptions::default()
    };
    let time = |o: &HarnessOptions, expect: usize| {
        let mut report = Vec::new();
        let sum = run_binary(&elf, "bench", o, &mut report)
            .unwrap_or_else(|_| panic!("run failed:\n{}", String::from_utf8_lossy(&report)));
        assert_eq!(sum.passed, expect, "{}", String::from_utf8_lossy(&report));
        median(
            (0..runs)
                .map(|_| {
                    let mut sink = std::io::sink();
                    let t = Instant::now();
                    let s = run_binary(&elf, "bench", o, &mut sink).ok().unwrap();
                    let e = t.elapsed();
                    assert_eq!(s.passed, expect);
                    e
                })
                .collect(),
        )
    };
    let one = time(&opts(1, true), 1);
    let all1 = time(&opts(1, false), TESTS);
    let all2 = time(&opts(2, false), TESTS);
    // The same tests as bare sandbox calls (reset + call, no runner), in a sandbox made
    // from the template as the runner's are: what the runner adds is the difference.
    let config = SandboxConfig {
        env: vec![(list::HARNESS_ENV.into(), "1".into())],
        console: std::sync::Arc::new(std::sync::Mutex::new(Box::new(std::io::sink()))),
        ..SandboxConfig::default()
    };
    let mut first = Sandbox::new(&elf, config).unwrap();
    let mut sb = Sandbox::from_template(first.template()).unwrap();
    let bare_in = |sb: &mut Sandbox| {
        median(
            (0..runs)
                .map(|_| {
                    let t = Instant::now();
                    for i in 0..TESTS as u32 {
                        sb.call(list::RUN_FUNCTION, &i.to_le_bytes()).unwrap();
                    }
                    t.elapsed() / TESTS as u32
                })
                .collect(),
        )
    };
    let bare = bare_in(&mut sb);
    sb.call(list::RUN_FUNCTION, &0u32.to_le_bytes()).unwrap();
    let pages = sb.reset().unwrap();
    let bare_first = bare_in(&mut first);
    let per1 = all1.saturating_sub(one) / (TESTS as u32 - 1);
    let per2 = all2.saturating_sub(one) / (TESTS as u32 - 1);
    let floor = Baseline::floor(floor);
    let total = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);

    let mut r = Report::new(
        "test_overhead",
        format!(
            "cargo pvrun test overhead ({TESTS} trivial tests; medians of {runs} runs; raw KVM exit floor measured in this run)"
        ),
    );
    r.floor_row("raw KVM exit floor (CPL3 `out` round trip)", &floor);
    r.compare(
        "first boot: load, boot + init + snapshot, list, 1 test",
        one,
        &floor,
        Ratio::Exits,
        "-",
    );
    let label = format!("run phase, {TESTS} tests, 1 thread (total)");
    r.alone(
        total(all1),
        Bar::alone(&label, Unit::Seconds, all1.as_secs_f64()),
        "-",
    );
    r.compare(
        "per trivial test beyond the first boot, 1 thread (call + reset + report)",
        per1,
        &floor,
        Ratio::Times,
        "<= 100 µs",
    );
    r.compare(
        &format!(
            "of which a bare sandbox call + reset of the same test (no runner; {pages} pages copied per reset)"
        ),
        bare,
        &floor,
        Ratio::Times,
        "-",
    );
    r.compare(
        "the same in the sandbox booted from the ELF (not a template copy)",
        bare_first,
        &floor,
        Ratio::Times,
        "-",
    );
    let label = format!("run phase, {TESTS} tests, 2 threads (total)");
    r.alone(
        total(all2),
        Bar::alone(&label, Unit::Seconds, all2.as_secs_f64()),
        "-",
    );
    r.compare(
        "per trivial test beyond the first boot, 2 threads (wall time)",
        per2,
        &floor,
        Ratio::Times,
        "<= 100 µs",
    );
    r.finish();
}
