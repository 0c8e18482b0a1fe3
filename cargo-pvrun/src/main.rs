//! `cargo pvrun`: build a guest crate for pvrun and boot it, the way `cargo run` runs a
//! program (`cargo pvrun [run]`); build only (`build`); serve or call a function guest
//! (`serve`, `call`); create a new guest crate (`new`); run a guest crate's tests in VMs
//! like `cargo test` (`test`, in `test.rs`, which parses its own arguments).
//!
//! Adding a subcommand: a variant in [`Command`] with its `clap::Args` struct and an arm
//! in [`main`]; the implicit `run` and the usage-error mapping need nothing.

mod new;
mod package;
mod test;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use host_vmm::cli::{
    self, CallInput, CallOptions, Program, ServeOptions, VmOptions, call_and_exit, run_and_exit_as,
    serve_and_exit,
};

/// Build pvrun guest crates and run them in KVM VMs (like `cargo run`).
///
/// `cargo pvrun [OPTIONS] [-- ARGS...]` is `cargo pvrun run [OPTIONS] [-- ARGS...]`.
///
/// Exit status: the guest's exit code; 101 if it panicked; 139 if it crashed; 124 if it
/// ran past --timeout; 125 if it could not be built or started, or the command line is
/// wrong. `cargo pvrun call`: 0 when the function returned output, 1 when it returned an
/// error, 101/139/124 as above, 125 otherwise.
#[derive(Parser)]
#[command(
    name = "cargo pvrun",
    bin_name = "cargo pvrun",
    version,
    propagate_version = true
)]
#[command(subcommand_required = true)]
struct Cli {
    /// Verbose: cargo's `-v` (repeatable), and what the host does (-v: ELF segments,
    /// memory map, devices, how the run ended; -vv: every VM exit). RUST_LOG works too.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the guest crate and boot it (the default subcommand).
    Run(RunArgs),
    /// Build the guest crate and print the path of its ELF.
    Build(BuildArgs),
    /// Build a function guest and serve its functions over HTTP (see `pvrun help serve`).
    Serve(ServeArgs),
    /// Build a function guest and call one of its functions (see `pvrun help call`).
    Call(CallArgs),
    /// Build the guest crate (release) and package it as an OCI image: one layer with the
    /// guest ELF, labels saying it is a pvrun guest (see `pvrun package --help`).
    Package(package::PackageCmd),
    /// Create a new guest crate that builds and runs as created.
    New(new::NewArgs),
    /// Build the guest crate's tests and run them in VMs, like `cargo test` (see `cargo
    /// pvrun test --help`).
    #[command(disable_help_flag = true)]
    Test {
        /// Options and harness arguments (see `cargo pvrun test --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Which crate and how to build it: the options `cargo run` takes.
#[derive(clap::Args, Debug, Clone)]
struct BuildOpts {
    /// Package to build.
    #[arg(short, long, value_name = "SPEC")]
    package: Option<String>,
    /// Name of the bin target to build.
    #[arg(long, value_name = "NAME")]
    bin: Option<String>,
    /// Name of the example target to build.
    #[arg(long, value_name = "NAME")]
    example: Option<String>,
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
    /// Directory for the build (the guest builds in DIR/pvrun).
    #[arg(long, value_name = "DIR")]
    target_dir: Option<PathBuf>,
    /// Number of parallel cargo jobs.
    #[arg(short, long, value_name = "N")]
    jobs: Option<String>,
    /// Coloring of cargo's output.
    #[arg(long, value_name = "WHEN", value_parser = ["auto", "always", "never"])]
    color: Option<String>,
    /// Do not print cargo log messages (nor the `Running` line).
    #[arg(short, long)]
    quiet: bool,
    /// Require Cargo.lock to be up to date.
    #[arg(long)]
    locked: bool,
    /// Run without accessing the network.
    #[arg(long)]
    offline: bool,
    /// Both --locked and --offline.
    #[arg(long)]
    frozen: bool,
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    build: BuildOpts,
    #[command(flatten)]
    vm: VmOptions,
    /// Arguments for the guest (after `--`).
    #[arg(last = true)]
    args: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum MessageFormat {
    /// The ELF path on a line of its own.
    Human,
    /// One JSON object: `{"reason":"guest-built","elf":...,"package":...,"target":...,"kind":...}`.
    Json,
}

#[derive(clap::Args)]
struct BuildArgs {
    #[command(flatten)]
    build: BuildOpts,
    /// How to report the built guest on stdout.
    #[arg(long, value_name = "FMT", default_value = "human")]
    message_format: MessageFormat,
}

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    build: BuildOpts,
    #[command(flatten)]
    opts: ServeOptions,
    /// Arguments for the guest's initialisation (after `--`).
    #[arg(last = true)]
    args: Vec<String>,
}

#[derive(clap::Args)]
struct CallArgs {
    #[command(flatten)]
    build: BuildOpts,
    #[command(flatten)]
    opts: CallOptions,
    /// The function to call.
    name: String,
    /// The input: these bytes, or `-` for stdin (default: empty).
    #[arg(value_name = "INPUT|-")]
    input: Option<String>,
    /// Arguments for the guest's initialisation (after `--`).
    #[arg(last = true)]
    args: Vec<String>,
}

/// `argv` with `run` inserted when the first argument is neither a subcommand nor a
/// top-level flag: `cargo pvrun --release -- x` means `cargo pvrun run --release -- x`.
fn with_implicit_run(mut argv: Vec<String>) -> Vec<String> {
    let cmd = Cli::command();
    let first = argv.get(1).cloned().unwrap_or_default();
    let is_sub = first == "help" || cmd.get_subcommands().any(|s| s.get_name() == first);
    let top_level = matches!(first.as_str(), "-h" | "--help" | "-V" | "--version");
    if !is_sub && !top_level {
        argv.insert(1, "run".into());
    }
    argv
}

fn fail(msg: &str) -> ! {
    host_vmm::eprint_line(&format!("error: {msg}"));
    std::process::exit(host_vmm::EXIT_HOST_ERROR)
}

/// Builds the guest (cargo's output on stderr); exits 125 with cargo's reason on failure.
fn build_guest(b: &BuildOpts, verbose: u8) -> guest_build::BuiltGuest {
    let mut extra = Vec::new();
    for (on, flag) in [
        (b.locked, "--locked"),
        (b.offline, "--offline"),
        (b.frozen, "--frozen"),
    ] {
        if on {
            extra.push(flag.to_string());
        }
    }
    if let Some(j) = &b.jobs {
        extra.extend(["--jobs".to_string(), j.clone()]);
    }
    if let Some(c) = &b.color {
        extra.extend(["--color".to_string(), c.clone()]);
    }
    extra.extend((0..verbose.min(2)).map(|_| "-v".to_string()));
    let req = guest_build::BuildRequest {
        manifest_path: b.manifest_path.clone(),
        cwd: None,
        package: b.package.clone(),
        bin: b.bin.clone(),
        example: b.example.clone(),
        release: b.release,
        profile: b.profile.clone(),
        features: b
            .features
            .iter()
            .flat_map(|f| f.split([' ', ',']))
            .filter(|f| !f.is_empty())
            .map(str::to_string)
            .collect(),
        all_features: b.all_features,
        no_default_features: b.no_default_features,
        quiet: b.quiet,
        extra_cargo_args: extra,
        target_dir: b.target_dir.clone(),
    };
    guest_build::build(&req).unwrap_or_else(|e| fail(&format!("{e:#}")))
}

fn check_kvm() {
    // Fail before a long build if the guest could not run anyway.
    if let Err(e) = host_vmm::check_kvm() {
        fail(&e.to_string());
    }
}

/// Shell-quotes one word for a command line someone pastes.
fn quote(w: &str) -> String {
    shlex::try_quote(w)
        .map(|c| c.into_owned())
        .unwrap_or_else(|_| format!("{w:?}"))
}

/// The options among `args` that the user gave on the command line, as `--long VALUE`
/// words (values as typed), in the order clap declares them.
fn given_flags<'a>(m: &ArgMatches, args: impl Iterator<Item = &'a clap::Arg>) -> Vec<String> {
    let mut words = Vec::new();
    for a in args {
        let id = a.get_id().as_str();
        let Some(long) = a.get_long() else { continue };
        if m.value_source(id) != Some(clap::parser::ValueSource::CommandLine) {
            continue;
        }
        if a.get_action().takes_values() {
            for v in m.get_raw(id).into_iter().flatten() {
                words.push(format!("--{long}"));
                words.push(v.to_string_lossy().into_owned());
            }
        } else if matches!(a.get_action(), clap::ArgAction::SetTrue) && m.get_flag(id) {
            words.push(format!("--{long}"));
        }
    }
    words
}

/// The `pvrun` program beside this one or on PATH, if there is one.
fn pvrun_program() -> Option<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("pvrun")));
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("pvrun"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    beside
        .into_iter()
        .chain(on_path)
        .find(|p| p.is_file())
        .and_then(|p| p.canonicalize().ok())
}

/// The `Running` line: a command that does what is about to happen, to paste into a
/// shell: the `pvrun` program (full path) with the VM options as typed, the ELF and the
/// guest's arguments; or, without a `pvrun` program, the `cargo pvrun` command itself.
fn running_line(
    sub: &str,
    m: &ArgMatches,
    elf: &Path,
    vm_args: &[clap::Arg],
    tail: &[String],
) -> String {
    let mut words: Vec<String>;
    if let Some(p) = pvrun_program() {
        words = vec![p.display().to_string(), sub.to_string()];
        words.extend(given_flags(m, vm_args.iter()));
        words.push(elf.display().to_string());
    } else {
        words = vec!["cargo".into(), "pvrun".into(), sub.to_string()];
        let sub_cmd = Cli::command();
        let sub_def = sub_cmd
            .find_subcommand(sub)
            .map(|c| c.get_arguments().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        words.extend(given_flags(m, sub_def.iter()));
    }
    if !tail.is_empty() {
        words.push("--".into());
        words.extend(tail.iter().cloned());
    }
    words.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ")
}

fn say_running(quiet: bool, line: &str) {
    if !quiet {
        host_vmm::eprint_line(&format!("     Running `{line}`"));
    }
}

/// Arguments the host-side options of `T` declare (for the `Running` line).
fn args_of<T: clap::Args>() -> Vec<clap::Arg> {
    T::augment_args(clap::Command::new("x"))
        .get_arguments()
        .cloned()
        .collect()
}

fn main() {
    // Invoked by cargo as `cargo-pvrun pvrun ARGS...`; also runnable directly.
    let mut argv: Vec<String> = std::env::args_os()
        .map(|a: OsString| a.to_string_lossy().into_owned())
        .collect();
    if argv.get(1).map(String::as_str) == Some("pvrun") {
        argv.remove(1);
    }
    if argv.get(1).map(String::as_str) == Some("test") {
        test::main(argv);
    }
    let matches = Cli::command()
        .try_get_matches_from(with_implicit_run(argv))
        .unwrap_or_else(|e| cli::exit_on_clap_error(e));
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| cli::exit_on_clap_error(e));
    let verbose = cli.verbose;
    let sink = match cli.command {
        Command::Serve(_) => cli::logging::Sink::Gateway,
        _ => cli::logging::Sink::Stderr,
    };
    cli::logging::init_to(verbose, sink);
    let sub_matches = matches
        .subcommand()
        .map(|(_, m)| m.clone())
        .unwrap_or_default();
    match cli.command {
        Command::Run(r) => {
            check_kvm();
            let elf = build_guest(&r.build, verbose).elf;
            let line = running_line("run", &sub_matches, &elf, &args_of::<VmOptions>(), &r.args);
            say_running(r.build.quiet, &line);
            host_vmm::stop_guest_on_signals();
            let mut args = vec![elf.display().to_string()];
            args.extend(r.args);
            let (config, debug) = r.vm.into_parts(args);
            let build_options = given_flags(&sub_matches, args_of::<BuildOpts>().iter())
                .iter()
                .filter(|w| *w != "--quiet")
                .map(|w| quote(w))
                .collect::<Vec<_>>()
                .join(" ");
            let program = Program::CargoPvrun { build_options };
            run_and_exit_as(&elf, config, &debug, &program)
        }
        Command::Build(b) => {
            let built = build_guest(&b.build, verbose);
            let image = host_vmm::GuestImage::from_file(&built.elf)
                .unwrap_or_else(|e| fail(&e.to_string()));
            let out = match b.message_format {
                MessageFormat::Human => built.elf.display().to_string(),
                MessageFormat::Json => serde_json::json!({
                    "reason": "guest-built",
                    "elf": built.elf,
                    "package": built.package,
                    "target": built.target,
                    "kind": match image.looks_like_function_guest() {
                        Some(true) => "function",
                        Some(false) => "program",
                        None => "unknown",
                    },
                    "abi_version": image.abi_version,
                })
                .to_string(),
            };
            let mut so = host_vmm::StdStream::stdout();
            use std::io::Write;
            if writeln!(so, "{out}").is_err() {
                std::process::exit(host_vmm::EXIT_HOST_ERROR);
            }
        }
        Command::Serve(s) => {
            check_kvm();
            let elf = build_guest(&s.build, verbose).elf;
            let line = running_line(
                "serve",
                &sub_matches,
                &elf,
                &args_of::<ServeOptions>(),
                &s.args,
            );
            say_running(s.build.quiet, &line);
            let mut args = vec![elf.display().to_string()];
            args.extend(s.args);
            serve_and_exit(&elf, s.opts, args)
        }
        Command::Call(c) => {
            check_kvm();
            let elf = build_guest(&c.build, verbose).elf;
            let mut tail = vec![c.name.clone()];
            tail.extend(c.input.clone());
            let mut line = running_line("call", &sub_matches, &elf, &args_of::<CallOptions>(), &[]);
            line.push(' ');
            line.push_str(&tail.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" "));
            if !c.args.is_empty() {
                line.push_str(" -- ");
                line.push_str(
                    &c.args
                        .iter()
                        .map(|w| quote(w))
                        .collect::<Vec<_>>()
                        .join(" "),
                );
            }
            say_running(c.build.quiet, &line);
            let mut args = vec![elf.display().to_string()];
            args.extend(c.args);
            let input = CallInput::from_arg(c.input.as_deref());
            call_and_exit(&elf, &c.name, input, c.opts, args)
        }
        Command::New(n) => new::run(n),
        Command::Package(p) => package::run(p, verbose),
        // `main` hands `test` to `test::main` before parsing; this arm is reached only
        // through an abbreviation clap resolved, so pass the arguments on the same way.
        Command::Test { args } => {
            let mut argv = vec!["cargo-pvrun".to_string(), "test".to_string()];
            argv.extend(args);
            test::main(argv)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn run_is_implicit_and_the_cli_is_consistent() {
        assert_eq!(
            with_implicit_run(argv(&["cargo-pvrun"])),
            argv(&["cargo-pvrun", "run"])
        );
        assert_eq!(
            with_implicit_run(argv(&["cargo-pvrun", "--release", "--", "x"])),
            argv(&["cargo-pvrun", "run", "--release", "--", "x"])
        );
        for a in ["build", "serve", "call", "new", "run", "help", "--help"] {
            assert_eq!(
                with_implicit_run(argv(&["cargo-pvrun", a])),
                argv(&["cargo-pvrun", a])
            );
        }
        Cli::command().debug_assert();
    }

    #[test]
    fn given_flags_echo_what_was_typed_and_quote() {
        let m = Cli::command()
            .try_get_matches_from(argv(&[
                "cargo-pvrun",
                "run",
                "--mem",
                "14M",
                "--env",
                "A=b c",
                "--backtrace",
                "--release",
            ]))
            .unwrap();
        let sub = m.subcommand().unwrap().1;
        let words = given_flags(sub, args_of::<VmOptions>().iter());
        assert_eq!(
            words,
            argv(&["--mem", "14M", "--env", "A=b c", "--backtrace"])
        );
        assert_eq!(quote("A=b c"), "'A=b c'");
    }
}
