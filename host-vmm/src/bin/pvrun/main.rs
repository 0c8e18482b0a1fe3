//! `pvrun`: boot a guest ELF in a fresh KVM VM and exit with its status (`pvrun run`, also
//! the implicit subcommand), serve a function guest's functions over HTTP (`pvrun serve`),
//! or call one of them from the shell (`pvrun call`).

#[cfg(not(feature = "cli"))]
fn main() {
    eprintln!(
        "pvrun: error: this pvrun was built without the `cli` feature; build it with `cargo build -p host-vmm --features cli` (or from the workspace root)"
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
        /// (overloaded). `GET /healthz` and `GET /readyz` report liveness and readiness.
        /// SIGTERM or SIGINT stops accepting, lets calls in flight finish and exits 0.
        Serve(ServeArgs),
        /// Call one function of a function guest and print its output.
        ///
        /// Boots the guest to its ready point, calls NAME with INPUT (the argument's bytes;
        /// `-` reads stdin; none is empty input), writes the output to stdout unchanged and
        /// exits 0. Exit status 1: the function returned an error (its message on stderr);
        /// 101 panicked; 139 crashed; 124 timed out; 125 no such function, input too
        /// large, not a function guest, or a host error.
        Call(CallArgs),
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
        /// The function guest ELF.
        guest: PathBuf,
        /// Arguments for the guest's initialisation (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    }

    #[derive(clap::Args)]
    struct CallArgs {
        #[command(flatten)]
        opts: CallOptions,
        /// The function guest ELF.
        guest: PathBuf,
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
            Command::Serve(s) => {
                let mut args = vec![s.guest.display().to_string()];
                args.extend(s.args);
                serve_and_exit(&s.guest, s.opts, args)
            }
            Command::Package(p) => {
                let mut image = p.image;
                image.cmd = p.cmd;
                host_vmm::cli::package::package_and_exit(&p.guest, image)
            }
            Command::Call(c) => {
                let mut args = vec![c.guest.display().to_string()];
                args.extend(c.args);
                let input = CallInput::from_arg(c.input.as_deref());
                call_and_exit(&c.guest, &c.name, input, c.opts, args)
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
        fn run_is_implicit() {
            assert_eq!(
                with_implicit_run(argv(&["pvrun", "g.elf"])),
                argv(&["pvrun", "run", "g.elf"])
            );
            assert_eq!(
                with_implicit_run(argv(&["pvrun", "--mem", "1G", "g.elf"])),
                argv(&["pvrun", "run", "--mem", "1G", "g.elf"])
            );
            for a in ["serve", "call", "run", "help", "--help", "-V"] {
                assert_eq!(with_implicit_run(argv(&["pvrun", a])), argv(&["pvrun", a]));
            }
            Cli::command().debug_assert();
        }
    }
}
