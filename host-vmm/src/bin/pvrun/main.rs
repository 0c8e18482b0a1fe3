//! `pvrun`: boot a guest ELF in a fresh KVM VM and exit with its status (`pvrun run`, also
//! the implicit subcommand), serve a function guest's functions over HTTP (`pvrun serve`),
//! or call one of them from the shell (`pvrun call`); `pvrun snapshot` writes a snapshot
//! file that `pvrun serve --snapshot` and `pvrun call --snapshot` start from; `pvrun
//! package` makes an OCI image of a guest.

#[cfg(not(feature = "cli"))]
fn main() {
    // Never `eprintln!`: it panics when stderr is closed.
    host_vmm::eprint_line(
        "pvrun: error: this pvrun was built without the `cli` feature; build it with `cargo build -p host-vmm --features cli` (or from the workspace root)",
    );
    std::process::exit(125);
}

#[cfg(feature = "cli")]
fn main() {
    cli_main::real_main()
}

#[cfg(feature = "cli")]
mod cli_main {
    use std::path::PathBuf;

    use clap::{CommandFactory, Parser, Subcommand};
    use host_vmm::cli::{
        self, CallInput, CallOptions, ServeOptions, VmOptions, call_and_exit, run_and_exit,
        serve_and_exit,
    };

    /// Run pvrun unikernels (guest ELF files built with `cargo pvrun`) in KVM VMs.
    ///
    /// `pvrun GUEST [-- ARGS...]` is `pvrun run GUEST [-- ARGS...]`.
    ///
    /// Exit status: the guest's exit code; 101 if it panicked; 139 if it crashed (CPU
    /// exception); 124 if it ran past --timeout; 130/143 on SIGINT/SIGTERM; 125 if the host
    /// could not start it or the command line is wrong. `pvrun call`: 0 when the function
    /// returned output, 1 when it returned an error, 101/139/124 as above, 125 otherwise.
    #[derive(Parser)]
    #[command(name = "pvrun", bin_name = "pvrun", version, propagate_version = true)]
    #[command(subcommand_required = true, arg_required_else_help = true)]
    struct Cli {
        /// Show what the host does on stderr: -v for ELF segments, the memory map,
        /// devices and how the run ended; -vv adds every VM exit. RUST_LOG works too.
        #[arg(short, long, action = clap::ArgAction::Count, global = true)]
        verbose: u8,
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Subcommand)]
    enum Command {
        /// Boot a guest ELF and exit with its status (the default subcommand).
        Run(RunArgs),
        /// Serve a function guest's functions over HTTP.
        ///
        /// `POST /NAME` with the input as body calls NAME in a sandbox reset to its
        /// initialised state, and answers with the output (200), or 404 (no such function),
        /// 413 (input too large), 422 (the function returned an error), 500 (it panicked or
        /// crashed), 502 (output too large), 504 (timeout), 503 with Retry-After
        /// (overloaded). `GET /healthz` and `GET /readyz` report liveness and readiness,
        /// `GET /metrics` the counters (Prometheus text format).
        /// SIGTERM or SIGINT stops accepting, lets calls in flight finish and exits 0.
        ///
        /// Several guests: `--guest NAME=PATH[,KEY=VALUE...]` (repeatable) or `--config
        /// FILE`; calls are then `POST /NAME/FUNCTION`, `GET /NAME` lists a guest's
        /// functions and `GET /` the guests; each guest's pool grows under load up to its
        /// max and shrinks back after its idle time, and calls beyond its concurrency get
        /// 429 with Retry-After.
        Serve(ServeArgs),
        /// Call one function of a function guest and print its output.
        ///
        /// Boots the guest to its ready point, calls NAME with INPUT (the argument's bytes;
        /// `-` reads stdin; none is empty input), writes the output to stdout unchanged and
        /// exits 0. Exit status 1: the function returned an error (its message on stderr);
        /// 101 panicked; 139 crashed; 124 timed out; 125 no such function, input too
        /// large, not a function guest, or a host error. With `--snapshot FILE` it starts
        /// from a snapshot file (`pvrun snapshot`) instead of booting.
        #[command(
            override_usage = "pvrun call [OPTIONS] <GUEST> <NAME> [INPUT|-] [-- <ARGS>...]\n       pvrun call [OPTIONS] --snapshot <FILE> <NAME> [INPUT|-]"
        )]
        Call(CallArgs),
        /// Boot a function guest, run its initialisation and write a snapshot file.
        ///
        /// The file (format: docs/SNAPSHOT.md) is what `pvrun serve --snapshot FILE`
        /// starts from without booting: mapped copy-on-write, shared by every sandbox on
        /// the machine. Exit status 0 when written, 125 otherwise.
        Snapshot(cli::snapshot::SnapshotArgs),
        /// Package a guest ELF as an OCI image: one layer with the ELF, a config whose
        /// entrypoint is the guest, labels saying it is a pvrun guest (ABI version, kind,
        /// memory, devices). The same ELF and options give the same digest.
        Package(PackageCmd),
    }

    #[derive(clap::Args)]
    struct PackageCmd {
        #[command(flatten)]
        image: host_vmm::cli::package::PackageArgs,
        /// The guest ELF.
        guest: PathBuf,
        /// Default arguments for the guest (the image's Cmd, after `--`).
        #[arg(last = true)]
        cmd: Vec<String>,
    }

    #[derive(clap::Args)]
    struct RunArgs {
        #[command(flatten)]
        vm: VmOptions,
        /// The guest ELF.
        guest: PathBuf,
        /// Arguments for the guest (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    }

    #[derive(clap::Args)]
    struct ServeArgs {
        #[command(flatten)]
        opts: ServeOptions,
        #[command(flatten)]
        several: cli::GuestsOptions,
        /// Serve from a snapshot file written by `pvrun snapshot` instead of booting a guest
        /// ELF (its memory size, arguments and environment are the file's).
        #[arg(long, value_name = "FILE", conflicts_with_all = ["guest", "args", "mem", "env", "guests", "config"])]
        snapshot: Option<PathBuf>,
        /// The function guest ELF (one guest: calls are `POST /FUNCTION`).
        #[arg(required_unless_present_any = ["snapshot", "guests", "config"], conflicts_with_all = ["guests", "config"])]
        guest: Option<PathBuf>,
        /// Arguments for the guest's initialisation (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    }

    #[derive(clap::Args)]
    struct CallArgs {
        #[command(flatten)]
        opts: CallOptions,
        /// Call from a snapshot file written by `pvrun snapshot` instead of booting a guest
        /// ELF: then give NAME [INPUT|-] without GUEST (memory size, arguments and
        /// environment are the file's).
        #[arg(long, value_name = "FILE", conflicts_with_all = ["args", "mem", "env"])]
        snapshot: Option<PathBuf>,
        /// The function guest ELF (not with --snapshot), the function to call, and its
        /// input: these bytes, or `-` for stdin (default: empty).
        #[arg(value_name = "GUEST NAME [INPUT|-]", num_args = 1..=3, required = true)]
        operands: Vec<String>,
        /// Arguments for the guest's initialisation (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    }

    /// `argv` with `run` inserted when the first argument is neither a subcommand nor a
    /// top-level flag: `pvrun GUEST` and `pvrun --mem 1G GUEST` mean `pvrun run ...`.
    fn with_implicit_run(mut argv: Vec<String>) -> Vec<String> {
        let cmd = Cli::command();
        let Some(first) = argv.get(1) else {
            return argv;
        };
        let is_sub = first == "help" || cmd.get_subcommands().any(|s| s.get_name() == first);
        let top_level = matches!(first.as_str(), "-h" | "--help" | "-V" | "--version");
        if !is_sub && !top_level {
            argv.insert(1, "run".into());
        }
        argv
    }

    pub fn real_main() {
        let argv: Vec<String> = std::env::args().collect();
        let cli: Cli = cli::parse_or_exit(with_implicit_run(argv));
        let sink = match cli.command {
            Command::Serve(_) => cli::logging::Sink::Gateway,
            _ => cli::logging::Sink::Stderr,
        };
        cli::logging::init_to(cli.verbose, sink);
        match cli.command {
            Command::Run(r) => {
                host_vmm::stop_guest_on_signals();
                let mut args = vec![r.guest.display().to_string()];
                args.extend(r.args);
                let (config, debug) = r.vm.into_parts(args);
                run_and_exit(&r.guest, config, &debug)
            }
            Command::Serve(s) if s.several.any() => {
                if !s.args.is_empty() {
                    cli::usage_error(
                        "arguments after `--` are for one guest; with --guest or --config give each guest's `args` in the config file",
                    )
                }
                cli::serve_guests_and_exit(s.several, s.opts)
            }
            Command::Serve(s) => match (s.snapshot, s.guest) {
                (Some(file), _) => cli::snapshot::serve_snapshot_and_exit(&file, s.opts),
                (None, guest) => {
                    // clap requires the guest without --snapshot.
                    let guest = guest.unwrap_or_default();
                    let mut args = vec![guest.display().to_string()];
                    args.extend(s.args);
                    serve_and_exit(&guest, s.opts, args)
                }
            },
            Command::Package(p) => {
                let mut image = p.image;
                image.cmd = p.cmd;
                host_vmm::cli::package::package_and_exit(&p.guest, image)
            }
            Command::Call(c) => {
                let (guest, snapshot, rest) = match &c.snapshot {
                    Some(file) => (file.clone(), true, &c.operands[..]),
                    None => match c.operands.split_first() {
                        Some((g, rest)) => (PathBuf::from(g), false, rest),
                        None => (PathBuf::new(), false, &[][..]),
                    },
                };
                let (name, input) = match rest {
                    [name] => (name, None),
                    [name, input] => (name, Some(input.as_str())),
                    _ => cli::usage_error(if snapshot {
                        "pvrun call --snapshot FILE takes NAME [INPUT|-]: the function and its input (no guest ELF)"
                    } else {
                        "pvrun call takes GUEST NAME [INPUT|-]: the guest ELF, the function and its input"
                    }),
                };
                let mut args = vec![guest.display().to_string()];
                args.extend(c.args);
                let input = CallInput::from_arg(input);
                if snapshot {
                    cli::function::call_source_and_exit(&guest, true, name, input, c.opts, args)
                } else {
                    call_and_exit(&guest, name, input, c.opts, args)
                }
            }
            Command::Snapshot(a) => cli::snapshot::snapshot_and_exit(a),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn argv(a: &[&str]) -> Vec<String> {
            a.iter().map(|s| s.to_string()).collect()
        }

        #[test]
        fn run_is_implicit() {
            assert_eq!(
                with_implicit_run(argv(&["pvrun", "g.elf"])),
                argv(&["pvrun", "run", "g.elf"])
            );
            assert_eq!(
                with_implicit_run(argv(&["pvrun", "--mem", "1G", "g.elf"])),
                argv(&["pvrun", "run", "--mem", "1G", "g.elf"])
            );
            for a in ["serve", "call", "run", "snapshot", "help", "--help", "-V"] {
                assert_eq!(with_implicit_run(argv(&["pvrun", a])), argv(&["pvrun", a]));
            }
            Cli::command().debug_assert();
        }
    }
}
