//! `cargo pvrun test` runs a guest crate's `#[pvrun::test]` functions inside pvrun VMs,
//! one call per test from one snapshot, and reports like libtest. These tests drive the
//! real command on real guests (guest-examples/testdemo, kvstore and the SDK itself) and
//! assert on what it prints and its exit status.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-examples")
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn cargo_pvrun_test(args: &[&str]) -> Run {
    assert!(
        Path::new("/dev/kvm").exists(),
        "cargo pvrun test boots guests and needs /dev/kvm"
    );
    let out: Output = Command::new(env!("CARGO_BIN_EXE_cargo-pvrun"))
        .args(["pvrun", "test", "-q", "--release"])
        .args(args)
        .current_dir(examples())
        .output()
        .expect("cannot run cargo-pvrun");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The `test NAME ... RESULT` lines, sorted (parallel runs finish in any order).
fn results(stdout: &str) -> Vec<String> {
    let mut v: Vec<String> = stdout
        .lines()
        .filter(|l| l.starts_with("test ") && l.contains(" ... "))
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// The `test result:` line, without its time.
fn summary(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter(|l| l.starts_with("test result: "))
        .map(|l| l.split("; finished in").next().unwrap().to_string())
        .collect()
}

/// The 1-based line of `path` (under guest-examples) that contains `needle`.
fn source_line(path: &str, needle: &str) -> usize {
    let text = std::fs::read_to_string(examples().join(path)).unwrap();
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no `{needle}` in {path}"))
        + 1
}

const LIB_RESULTS: &[&str] = &[
    "test tests::fails ... FAILED",
    "test tests::faults ... FAILED",
    "test tests::ignored ... ignored",
    "test tests::ignored_with_reason ... ignored, needs a disk",
    "test tests::loops ... FAILED",
    "test tests::panics ... FAILED",
    "test tests::passes ... ok",
    "test tests::returns_an_error ... FAILED",
    "test tests::scribble_a_first ... FAILED",
    "test tests::scribble_b_next_test_starts_clean ... ok",
    "test tests::should_panic_but_does_not ... FAILED",
    "test tests::should_panic_panics ... ok",
    "test tests::should_panic_with_another_message ... FAILED",
    "test tests::should_panic_with_the_message ... ok",
];

#[test]
fn every_kind_of_test_gets_its_verdict_and_a_crash_does_not_reach_the_next_test() {
    // One sandbox, tests in name order: the scribbler crashes right before the test that
    // checks the memory it overwrote.
    let r = cargo_pvrun_test(&[
        "-p",
        "testdemo",
        "--lib",
        "--test-timeout",
        "1",
        "--",
        "--test-threads",
        "1",
    ]);
    assert_eq!(r.code, Some(101), "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.starts_with("\nrunning 14 tests\n"), "{}", r.stdout);
    assert_eq!(results(&r.stdout), LIB_RESULTS, "{}", r.stdout);
    assert_eq!(
        summary(&r.stdout),
        ["test result: FAILED. 4 passed; 8 failed; 2 ignored; 0 measured; 0 filtered out"]
    );
    // The failures section: each failing test's output and report, in libtest's layout.
    let failures = r
        .stdout
        .split("\nfailures:\n")
        .nth(1)
        .expect("failures section");
    for want in [
        "---- tests::fails stdout ----\noutput of fails\npvrun: guest panicked at testdemo/src/lib.rs:",
        "assertion `left == right` failed: one and one\n    left: 2\n   right: 3",
        "---- tests::faults stdout ----\npvrun: guest crashed: page fault (#PF) reading 0x0: null pointer dereference",
        "---- tests::loops stdout ----\noutput of loops\npvrun: test timed out after 1.0",
        "---- tests::panics stdout ----\npvrun: guest panicked at testdemo/src/lib.rs:",
        "boom from panics",
        "---- tests::returns_an_error stdout ----\nError: \"it went wrong\"\nthe test returned exit code 1",
        "---- tests::scribble_a_first stdout ----\npvrun: guest crashed: page fault (#PF) writing 0x7fff00000000",
        "---- tests::should_panic_but_does_not stdout ----\nnote: test did not panic as expected",
        "note: panic did not contain expected string\n      panic message: \"the wrong message\"\n expected substring: \"another message\"",
    ] {
        assert!(failures.contains(want), "missing {want:?} in:\n{failures}");
    }
    // A panicking and a faulting test show their call stack, innermost first, with the
    // test function at its source line.
    for (test, needle) in [
        ("panics", "panic!(\"boom from panics\")"),
        (
            "faults",
            "core::ptr::read_volatile(core::ptr::null::<u64>())",
        ),
    ] {
        let block = failures
            .split("\n---- ")
            .find(|b| b.starts_with(&format!("tests::{test} stdout ----")))
            .unwrap_or_else(|| panic!("no block for {test} in:\n{failures}"));
        let frames: Vec<&str> = block
            .split("\nstack backtrace:\n")
            .nth(1)
            .unwrap_or_else(|| panic!("no backtrace for {test} in:\n{block}"))
            .lines()
            .take_while(|l| l.starts_with("   "))
            .collect();
        assert!(frames[0].starts_with("   0: "), "{block}");
        let line = source_line("testdemo/src/lib.rs", needle);
        // `testdemo::tests::NAME` from the symbol table, or the short `NAME` DWARF gives
        // an inlined function in a line-tables-only build (this release profile).
        let at = frames
            .iter()
            .position(|f| {
                let loc = format!("{test} at testdemo/src/lib.rs:{line}:");
                f.contains(&format!(": {loc}")) || f.contains(&format!("::{loc}"))
            })
            .unwrap_or_else(|| panic!("no frame of tests::{test} at lib.rs:{line} in:\n{block}"));
        // Innermost first: the harness that called the test is further down.
        let harness = frames
            .iter()
            .position(|f| f.contains("pvrun::testing::run"))
            .unwrap_or_else(|| panic!("no harness frame in:\n{block}"));
        assert!(at < harness, "{block}");
    }
    // A failure that is not a panic or a crash has no backtrace.
    let returns = failures
        .split("\n---- ")
        .find(|b| b.starts_with("tests::returns_an_error stdout"))
        .expect("returns_an_error block");
    assert!(!returns.contains("stack backtrace:"), "{returns}");
    let list = r
        .stdout
        .split("\nfailures:\n")
        .nth(2)
        .expect("failure list");
    assert!(
        list.starts_with("    tests::fails\n    tests::faults\n"),
        "{list}"
    );
    // Passing tests' output is captured and not shown.
    assert!(!r.stdout.contains("output of passes"), "{}", r.stdout);
    assert!(
        r.stderr
            .contains("error: test failed, to rerun pass `--lib`"),
        "{}",
        r.stderr
    );
}

#[test]
fn tests_run_in_parallel_sandboxes_with_the_same_verdicts() {
    let r = cargo_pvrun_test(&[
        "-p",
        "testdemo",
        "--lib",
        "--test-timeout",
        "1",
        "--",
        "--test-threads",
        "3",
    ]);
    assert_eq!(r.code, Some(101), "{}\n{}", r.stdout, r.stderr);
    assert_eq!(results(&r.stdout), LIB_RESULTS, "{}", r.stdout);
    assert_eq!(
        summary(&r.stdout),
        ["test result: FAILED. 4 passed; 8 failed; 2 ignored; 0 measured; 0 filtered out"]
    );
}

#[test]
fn filters_exact_skip_and_ignored_select_like_libtest() {
    let lib = |h: &[&str]| cargo_pvrun_test(&[&["-p", "testdemo", "--lib", "--"], h].concat());
    let r = lib(&["--exact", "tests::passes"]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert_eq!(results(&r.stdout), ["test tests::passes ... ok"]);
    assert_eq!(
        summary(&r.stdout),
        ["test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 13 filtered out"]
    );

    // A substring filter, and --skip (repeatable).
    let r = lib(&["should_panic", "--skip", "another", "--skip", "does_not"]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert_eq!(
        results(&r.stdout),
        [
            "test tests::should_panic_panics ... ok",
            "test tests::should_panic_with_the_message ... ok"
        ]
    );
    assert!(
        summary(&r.stdout)[0].ends_with("12 filtered out"),
        "{}",
        r.stdout
    );

    // --exact makes a partial name match nothing.
    let r = lib(&["--exact", "passes"]);
    assert_eq!(r.code, Some(0));
    assert!(r.stdout.contains("\nrunning 0 tests\n"), "{}", r.stdout);

    // --ignored runs only the ignored tests (one of which panics).
    let r = lib(&["--ignored"]);
    assert_eq!(r.code, Some(101), "{}\n{}", r.stdout, r.stderr);
    assert_eq!(
        results(&r.stdout),
        [
            "test tests::ignored ... FAILED",
            "test tests::ignored_with_reason ... ok"
        ]
    );
    assert!(r.stdout.contains("an ignored test ran"), "{}", r.stdout);
    assert!(summary(&r.stdout)[0].contains("1 passed; 1 failed; 0 ignored"));

    // --include-ignored runs them beside the others.
    let r = lib(&["ignored", "--include-ignored"]);
    assert_eq!(results(&r.stdout).len(), 2, "{}", r.stdout);
    assert!(
        summary(&r.stdout)[0]
            .contains("1 passed; 1 failed; 0 ignored; 0 measured; 12 filtered out")
    );
}

#[test]
fn list_show_output_and_nocapture() {
    let r = cargo_pvrun_test(&["-p", "testdemo", "--lib", "--", "--list", "scribble"]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert_eq!(
        r.stdout,
        "tests::scribble_a_first: test\ntests::scribble_b_next_test_starts_clean: test\n\n2 tests, 0 benchmarks\n"
    );
    let r = cargo_pvrun_test(&["-p", "testdemo", "--lib", "--", "--list", "--ignored"]);
    assert!(
        r.stdout.ends_with("\n2 tests, 0 benchmarks\n"),
        "{}",
        r.stdout
    );

    let r = cargo_pvrun_test(&[
        "-p",
        "testdemo",
        "--lib",
        "--",
        "--exact",
        "tests::passes",
        "--show-output",
    ]);
    assert_eq!(r.code, Some(0));
    assert!(
        r.stdout
            .contains("\nsuccesses:\n\n---- tests::passes stdout ----\noutput of passes\n"),
        "{}",
        r.stdout
    );

    // Uncaptured output appears before the test's result line.
    let r = cargo_pvrun_test(&[
        "-p",
        "testdemo",
        "--lib",
        "--",
        "--exact",
        "tests::fails",
        "--nocapture",
    ]);
    assert_eq!(r.code, Some(101));
    let out_at = r.stdout.find("output of fails").expect("uncaptured output");
    let line_at = r.stdout.find("test tests::fails ... FAILED").unwrap();
    assert!(out_at < line_at, "{}", r.stdout);
}

#[test]
fn integration_tests_and_binaries_are_selected_like_cargo() {
    let r = cargo_pvrun_test(&["-p", "testdemo", "--test", "integration"]);
    assert_eq!(r.code, Some(101), "{}\n{}", r.stdout, r.stderr);
    assert_eq!(
        results(&r.stdout),
        [
            "test chatty_fails ... FAILED",
            "test ignored_in_integration ... ignored",
            "test uses_the_library ... ok"
        ]
    );
    assert_eq!(
        summary(&r.stdout),
        ["test result: FAILED. 1 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out"]
    );
    assert!(
        r.stderr.contains("to rerun pass `--test integration`"),
        "{}",
        r.stderr
    );
    // 2 MiB of output: the report keeps the first MiB of it and says so.
    assert!(r.stdout.len() < (1 << 20) + 10_000, "{}", r.stdout.len());
    assert!(
        r.stdout
            .contains("[pvrun: 1048576 more bytes of this test's output were cut]\n"),
        "{}",
        &r.stdout[r.stdout.len().saturating_sub(2000)..]
    );
    assert!(r.stdout.contains("chatty failed"));
    // Features are passed to the build like cargo's.
    let only = |features: &[&str]| {
        cargo_pvrun_test(
            &[
                &["-p", "testdemo", "--test", "integration"],
                features,
                &["--", "--exact", "only_with_extra"],
            ]
            .concat(),
        )
    };
    let r = only(&["--features", "extra"]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert_eq!(results(&r.stdout), ["test only_with_extra ... ok"]);
    assert!(
        summary(&r.stdout)[0].ends_with("3 filtered out"),
        "{}",
        r.stdout
    );
    let r = only(&[]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("\nrunning 0 tests\n"), "{}", r.stdout);
    assert!(
        summary(&r.stdout)[0].ends_with("3 filtered out"),
        "{}",
        r.stdout
    );

    let r = cargo_pvrun_test(&["-p", "testdemo", "--bins"]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert_eq!(results(&r.stdout), ["test tests::bin_test_passes ... ok"]);
    // Without -q, cargo-like progress names each test binary on stderr.
    let out = Command::new(env!("CARGO_BIN_EXE_cargo-pvrun"))
        .args([
            "pvrun",
            "test",
            "--release",
            "-p",
            "testdemo",
            "--bins",
            "--test",
            "integration",
            "--",
            "--skip",
            "chatty",
        ])
        .current_dir(examples())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let bin = stderr
        .find("Running unittests src/main.rs (")
        .expect(&stderr);
    let it = stderr
        .find("Running tests/integration.rs (")
        .expect(&stderr);
    assert!(bin < it, "{stderr}");
}

#[test]
fn misbehaving_test_binaries_get_a_clear_report() {
    // A list that claims more than it holds: one line, the target fails, no host panic.
    let r = cargo_pvrun_test(&["-p", "testdemo", "--test", "bad_list"]);
    assert_eq!(r.code, Some(101), "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains(
            "error: test binary `bad_list` (tests/bad_list.rs) did not run: it returned a malformed test list"
        ),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);

    // Names and messages with terminal escapes and newlines cannot forge lines.
    let r = cargo_pvrun_test(&["-p", "testdemo", "--test", "evil_names"]);
    assert_eq!(r.code, Some(101), "{}\n{}", r.stdout, r.stderr);
    assert!(
        !r.stdout.contains('\x1b') && !r.stdout.contains('\x07'),
        "{:?}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("test evil\\u{1b}[2J\\ntest forged ... ok ... ok\n"),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.lines().any(|l| l == "test forged ... ok"));
    // A panic message's lines are indented, so it cannot forge a result line either.
    assert!(
        r.stdout
            .contains("\\u{1b}[31mred\n  test result: ok. 99 passed"),
        "{}",
        r.stdout
    );
    assert_eq!(
        summary(&r.stdout),
        ["test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out"]
    );
}

#[test]
fn bad_arguments_are_usage_errors() {
    let r = cargo_pvrun_test(&["-p", "testdemo", "--lib", "--", "--no-such-flag"]);
    assert_eq!(r.code, Some(125), "{}", r.stderr);
    let r = cargo_pvrun_test(&["-p", "testdemo", "--test", "nope"]);
    assert_eq!(r.code, Some(125), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("package `testdemo` has no integration test `nope`"),
        "{}",
        r.stderr
    );
    let r = cargo_pvrun_test(&["-p", "testdemo", "--test-timeout", "0"]);
    assert_eq!(r.code, Some(125), "{}", r.stderr);
}

/// The project's own in-guest tests: kvstore's log format and parser, and the SDK's pure
/// code, run through `cargo pvrun test` as part of `cargo test`.
#[test]
fn kvstore_and_sdk_tests_pass_in_guests() {
    let r = cargo_pvrun_test(&["-p", "kvstore"]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert!(
        results(&r.stdout).contains(
            &"test tests::a_record_round_trips_with_the_documented_layout ... ok".to_string()
        ),
        "{}",
        r.stdout
    );
    assert_eq!(
        summary(&r.stdout),
        ["test result: ok. 6 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out"]
    );
    let r = cargo_pvrun_test(&["-p", "guest-sdk"]);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert!(
        results(&r.stdout)
            .contains(&"test random::tests::chacha20_block_matches_rfc_8439 ... ok".to_string()),
        "{}",
        r.stdout
    );
    assert_eq!(
        summary(&r.stdout),
        ["test result: ok. 16 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out"]
    );
}

/// A temporary guest crate, removed when dropped (also when the test fails).
struct TempCrate(PathBuf);

impl Drop for TempCrate {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_test_target_without_harness_false_gets_told_what_to_change() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("pvrun-no-harness-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let guard = TempCrate(dir.clone());
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::create_dir_all(dir.join(".cargo")).unwrap();
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            "[package]\nname = \"noharness\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[dependencies]\nguest-sdk = {{ path = \"{}\" }}\n\n[workspace]\n\n[profile.release]\npanic = \"abort\"\ndebug = false\nstrip = \"debuginfo\"\n",
            root.join("guest-sdk").display()
        ),
    )
    .unwrap();
    // The examples' lock file and build directory: only this crate is compiled.
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
    std::fs::write(
        dir.join("src/lib.rs"),
        "#![no_std]\n#![cfg_attr(test, no_main)]\n#[cfg(test)]\nmod tests {\n    #[pvrun::test]\n    fn t() {}\n}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cargo-pvrun"))
        .args(["pvrun", "test", "-q", "--release", "--lib"])
        .current_dir(&guard.0)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("could not build the tests of `noharness`")
            && stderr.contains("needs `harness = false` in Cargo.toml"),
        "{stderr}"
    );
}
