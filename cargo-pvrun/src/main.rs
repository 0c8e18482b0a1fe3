//! `cargo pvrun`: build a guest crate for pvrun and boot it, the way `cargo run` runs a
//! program. The guest's exit status becomes this command's.

use std::path::PathBuf;

use clap::Parser;

mod package;
use host_vmm::cli::{VmOptions, run_and_exit};

/// Build a pvrun guest crate and run it in a KVM VM (like `cargo run`).
///
/// Exit status: the guest's exit code; 101 if it panicked; 139 if it crashed; 124 if it
/// ran past --timeout; 125 if it could not be built or started.
#[derive(Parser)]
#[command(name = "cargo pvrun", bin_name = "cargo pvrun", version)]
struct Cli {
    /// Package to run.
    #[arg(short, long, value_name = "SPEC")]
    package: Option<String>,
    /// Name of the bin target to run.
    #[arg(long, value_name = "NAME")]
    bin: Option<String>,
    /// Name of the example target to run.
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
    /// Do not print cargo log messages.
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
    #[command(flatten)]
    vm: VmOptions,
    /// Arguments for the guest (after `--`).
    #[arg(last = true)]
    args: Vec<String>,
}

fn main() {
    // Invoked by cargo as `cargo-pvrun pvrun ARGS...`; also runnable directly.
    let mut argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("pvrun") {
        argv.remove(1);
    }
    if argv.get(1).map(String::as_str) == Some("package") {
        package::main(&argv[1..]);
    }
    let cli = Cli::parse_from(argv);

    // Fail before a long build if the guest could not run anyway.
    if let Err(e) = host_vmm::check_kvm() {
        host_vmm::eprint_line(&format!("error: {e}"));
        std::process::exit(host_vmm::EXIT_HOST_ERROR);
    }

    let mut extra = Vec::new();
    if cli.locked {
        extra.push("--locked".to_string());
    }
    if cli.offline {
        extra.push("--offline".to_string());
    }
    if cli.frozen {
        extra.push("--frozen".to_string());
    }
    let req = guest_build::BuildRequest {
        manifest_path: cli.manifest_path,
        cwd: None,
        package: cli.package,
        bin: cli.bin,
        example: cli.example,
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
    let built = match guest_build::build(&req) {
        Ok(b) => b,
        Err(e) => {
            host_vmm::eprint_line(&format!("error: {e:#}"));
            std::process::exit(host_vmm::EXIT_HOST_ERROR);
        }
    };
    let elf = built.elf;
    if !cli.quiet {
        let shown = std::env::current_dir()
            .ok()
            .and_then(|d| elf.strip_prefix(d).ok().map(PathBuf::from))
            .unwrap_or_else(|| elf.clone());
        host_vmm::eprint_line(&format!("     Running `pvrun {}`", shown.display()));
    }
    host_vmm::stop_guest_on_signals();
    let mut args = vec![elf.display().to_string()];
    args.extend(cli.args);
    let (config, debug) = cli.vm.into_parts(args);
    run_and_exit(&elf, config, &debug)
}
