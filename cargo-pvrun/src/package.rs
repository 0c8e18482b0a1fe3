//! `cargo pvrun package`: build a guest crate, then package its ELF as an OCI image (the
//! same image `pvrun package` makes from the ELF).

use std::path::PathBuf;

use clap::Parser;
use host_vmm::cli::package::{PackageArgs, package_and_exit};

/// Build a pvrun guest crate (release profile unless --profile says otherwise) and package
/// it as an OCI image: one layer with the guest ELF, labels saying it is a pvrun guest.
///
/// Exit status: 0; 125 if it could not be built or packaged.
#[derive(Parser)]
#[command(
    name = "cargo pvrun package",
    bin_name = "cargo pvrun package",
    version
)]
struct Cli {
    /// Package to build.
    #[arg(short, long, value_name = "SPEC")]
    package: Option<String>,
    /// Name of the bin target.
    #[arg(long, value_name = "NAME")]
    bin: Option<String>,
    /// Name of the example target.
    #[arg(long, value_name = "NAME")]
    example: Option<String>,
    /// Build with the given profile (default: release).
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
    #[command(flatten)]
    image: PackageArgs,
    /// Default arguments for the guest (the image's Cmd, after `--`).
    #[arg(last = true)]
    cmd: Vec<String>,
}

/// `argv[0]` is `package`.
pub fn main(argv: &[String]) -> ! {
    let mut cli = Cli::parse_from(argv);
    cli.image.cmd = std::mem::take(&mut cli.cmd);
    let mut extra = Vec::new();
    if cli.locked {
        extra.push("--locked".to_string());
    }
    if cli.offline {
        extra.push("--offline".to_string());
    }
    let req = guest_build::BuildRequest {
        manifest_path: cli.manifest_path,
        cwd: None,
        package: cli.package,
        bin: cli.bin,
        example: cli.example,
        release: cli.profile.is_none(),
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
    match guest_build::build(&req) {
        Ok(built) => package_and_exit(&built.elf, cli.image),
        Err(e) => {
            host_vmm::eprint_line(&format!("error: {e:#}"));
            std::process::exit(host_vmm::EXIT_HOST_ERROR)
        }
    }
}
