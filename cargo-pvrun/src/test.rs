//! `cargo pvrun test`: build a guest crate's tests (`#[pvrun::test]`, with `cfg(test)`)
//! and run them inside pvrun VMs the way `cargo test` runs them on the host.
//!
//! Each test binary (the library's unit tests, each binary's, each integration test under
//! `tests/`) boots once into a function sandbox; each test is then one call from the same
//! snapshot, so a test that panics, crashes, loops or scribbles memory fails alone. Output
//! and exit status follow libtest and cargo: 0 when every test passed, 101 when a test
//! failed, 125 when the tests could not be built, the host failed, or the command line is wrong
//! (the project's exit-status contract, not libtest's 101 for a bad option).
//! The runner itself is `host_vmm::cli::test_runner`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use host_vmm::cli::test_runner::{self as runner, HarnessOptions, RunError};

/// Build a pvrun guest crate's tests and run them in KVM VMs (like `cargo test`).
///
/// Test functions are marked `#[pvrun::test]`; test targets need `harness = false`.
/// Arguments after `--` go to the test harness, as with libtest.
///
/// Exit status: 0 if every test passed; 101 if a test failed; 125 if the tests could not
/// be built or run, or the command line is wrong.
#[derive(Parser)]
#[command(name = "cargo pvrun test", bin_name = "cargo pvrun test", version)]
struct TestCli {
    /// Package to test.
    #[arg(short, long, value_name = "SPEC")]
    package: Option<String>,
    /// Test only this package's library.
    #[arg(long)]
    lib: bool,
    /// Test all binaries.
    #[arg(long)]
    bins: bool,
    /// Test only the specified binary (repeatable).
    #[arg(long, value_name = "NAME")]
    bin: Vec<String>,
    /// Test all integration tests.
    #[arg(long)]
    tests: bool,
    /// Test only the specified integration test (repeatable).
    #[arg(long, value_name = "NAME")]
    test: Vec<String>,
    /// Build with the release profile.
    #[arg(short, long)]
    release: bool,
    /// Build with the given profile.
    #[arg(long, value_name = "PROFILE-NAME")]
    profile: Option<String>,
    /// Features to activate (space or comma separated; repeatable).
    #[arg(short = 'F', long)]
    features: Vec<String>,
    /// Activate all features.
    #[arg(long)]
    all_features: bool,
    /// Do not activate the `default` feature.
    #[arg(long)]
    no_default_features: bool,
    /// Path to Cargo.toml.
    #[arg(long, value_name = "PATH")]
    manifest_path: Option<PathBuf>,
    /// Do not print cargo log messages.
    #[arg(short, long)]
    quiet: bool,
    /// Run every test binary even after one had failures.
    #[arg(long)]
    no_fail_fast: bool,
    /// Stop a test that runs longer than this and fail it (seconds).
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_secs)]
    test_timeout: Duration,
    /// Directory for all generated artifacts (the guest builds go to `DIR/pvrun`).
    #[arg(long, value_name = "DIR")]
    target_dir: Option<PathBuf>,
    /// Number of parallel build jobs.
    #[arg(short, long, value_name = "N")]
    jobs: Option<String>,
    /// Require Cargo.lock to be up to date.
    #[arg(long)]
    locked: bool,
    /// Run without accessing the network.
    #[arg(long)]
    offline: bool,
    /// Both --locked and --offline.
    #[arg(long)]
    frozen: bool,
    /// Arguments for the test harness (after `--`), as libtest takes them.
    #[arg(last = true)]
    args: Vec<String>,
}

/// The libtest arguments `cargo pvrun test -- ...` accepts.
#[derive(Parser)]
#[command(
    name = "test harness",
    no_binary_name = true,
    disable_version_flag = true
)]
struct HarnessCli {
    /// Run only tests whose names contain one of these (or equal them, with --exact).
    filters: Vec<String>,
    /// Match filters and --skip exactly.
    #[arg(long)]
    exact: bool,
    /// Skip tests whose names contain this (repeatable).
    #[arg(long, value_name = "FILTER")]
    skip: Vec<String>,
    /// List the tests instead of running them.
    #[arg(long)]
    list: bool,
    /// Print the tests' output as they run instead of capturing it.
    #[arg(long)]
    nocapture: bool,
    /// Print the captured output of passing tests too.
    #[arg(long)]
    show_output: bool,
    /// Run only the ignored tests.
    #[arg(long)]
    ignored: bool,
    /// Run the ignored tests too.
    #[arg(long)]
    include_ignored: bool,
    /// Number of tests run in parallel, each in its own VM (default: the CPUs, or
    /// RUST_TEST_THREADS).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    test_threads: Option<u32>,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !(v > 0.0 && v <= 1e6) {
        return Err(format!("`{s}` is not between 0 and 1000000 seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

fn fail(msg: &str, code: i32) -> ! {
    host_vmm::eprint_line(msg);
    std::process::exit(code)
}

/// The `cargo test` argument that selects a target again.
fn rerun_arg(t: &guest_build::BuiltTest) -> String {
    match t.kind.as_str() {
        "lib" => "--lib".to_string(),
        "bin" => format!("--bin {}", t.target),
        "test" => format!("--test {}", t.target),
        k => format!("--{k} {}", t.target),
    }
}

/// Runs `cargo pvrun test`; `argv` starts with the program name, then `test`.
pub fn main(mut argv: Vec<String>) -> ! {
    argv.remove(1);
    let cli =
        TestCli::try_parse_from(argv).unwrap_or_else(|e| host_vmm::cli::exit_on_clap_error(e));
    let harness = HarnessCli::try_parse_from(&cli.args)
        .unwrap_or_else(|e| host_vmm::cli::exit_on_clap_error(e));
    if harness.ignored && harness.include_ignored {
        fail(
            "error: --ignored and --include-ignored cannot be used together",
            host_vmm::EXIT_HOST_ERROR,
        );
    }
    let threads = harness
        .test_threads
        .map(|n| n as usize)
        .or_else(|| {
            std::env::var("RUST_TEST_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&n| n > 0)
        })
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
    let opts = HarnessOptions {
        filters: harness.filters,
        exact: harness.exact,
        skip: harness.skip,
        list: harness.list,
        nocapture: harness.nocapture,
        show_output: harness.show_output,
        ignored: harness.ignored,
        include_ignored: harness.include_ignored,
        threads,
        timeout: cli.test_timeout,
    };

    if let Err(e) = host_vmm::check_kvm() {
        fail(&format!("error: {e}"), host_vmm::EXIT_HOST_ERROR);
    }
    let mut extra = Vec::new();
    for (on, flag) in [
        (cli.locked, "--locked"),
        (cli.offline, "--offline"),
        (cli.frozen, "--frozen"),
    ] {
        if on {
            extra.push(flag.to_string());
        }
    }
    if let Some(j) = &cli.jobs {
        extra.extend(["--jobs".to_string(), j.clone()]);
    }
    let req = guest_build::BuildRequest {
        target_dir: cli.target_dir,
        manifest_path: cli.manifest_path,
        cwd: None,
        package: cli.package,
        bin: None,
        example: None,
        release: cli.release,
        profile: cli.profile,
        features: cli
            .features
            .iter()
            .flat_map(|f| f.split([' ', ',']))
            .filter(|f| !f.is_empty())
            .map(str::to_string)
            .collect(),
        all_features: cli.all_features,
        no_default_features: cli.no_default_features,
        quiet: cli.quiet,
        extra_cargo_args: extra,
    };
    let sel = guest_build::TestSelection {
        lib: cli.lib,
        bins: cli.bins,
        bin: cli.bin,
        tests: cli.tests,
        test: cli.test,
    };
    let built = match guest_build::build_tests(&req, &sel) {
        Ok(b) => b,
        Err(e) => fail(&format!("error: {e:#}"), host_vmm::EXIT_HOST_ERROR),
    };

    let mut failed_targets = Vec::new();
    for t in &built {
        if !cli.quiet {
            let shown = std::env::current_dir()
                .ok()
                .and_then(|d| t.elf.strip_prefix(d).ok().map(PathBuf::from))
                .unwrap_or_else(|| t.elf.clone());
            let what = if t.kind == "test" { "" } else { "unittests " };
            host_vmm::eprint_line(&format!(
                "     Running {what}{} ({})",
                t.source.display(),
                shown.display()
            ));
        }
        match runner::run_binary(&t.elf, &t.target, &opts, &mut std::io::stdout()) {
            Ok(sum) if sum.failed == 0 => {}
            Ok(_) => failed_targets.push(rerun_arg(t)),
            Err(RunError::Host(m)) => fail(&format!("error: {m}"), host_vmm::EXIT_HOST_ERROR),
            Err(RunError::Binary(m)) => {
                host_vmm::eprint_line(&format!(
                    "error: test binary `{}` ({}) did not run: {m}",
                    t.target,
                    t.source.display()
                ));
                failed_targets.push(rerun_arg(t));
            }
        }
        if !failed_targets.is_empty() && !cli.no_fail_fast {
            break;
        }
    }
    match failed_targets.as_slice() {
        [] => std::process::exit(0),
        [one] => fail(
            &format!("error: test failed, to rerun pass `{one}`"),
            host_vmm::EXIT_PANIC,
        ),
        many => {
            let mut m = format!("error: {} targets failed:", many.len());
            for a in many {
                m.push_str(&format!("\n    `{a}`"));
            }
            fail(&m, host_vmm::EXIT_PANIC)
        }
    }
}
