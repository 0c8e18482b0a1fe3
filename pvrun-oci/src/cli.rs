//! The `package` subcommand shared by `pvrun package` and `cargo pvrun package`.

use std::path::{Path, PathBuf};

use clap::Parser;

use crate::{Format, GuestInfo, GuestKind, PackageOptions, package};

/// Where and how to write the image (everything but the guest).
#[derive(clap::Args, Debug)]
pub struct PackageArgs {
    /// Where to write the image: a directory (oci-dir) or a tar file.
    #[arg(short, long, value_name = "OUT")]
    pub output: PathBuf,
    /// Image format: oci-dir, oci-archive or docker-archive (default: oci-archive when
    /// OUT ends in .tar, else oci-dir).
    #[arg(long, value_parser = |s: &str| s.parse::<Format>())]
    pub format: Option<Format>,
    /// Image reference (default pvrun/NAME:latest, i.e. docker.io/pvrun/NAME:latest).
    #[arg(long, value_name = "REF")]
    pub name: Option<String>,
    /// Guest kind: program or function (served over HTTP on $PORT under
    /// the containerd shim; the image's Env gets PVRUN_KIND=function). Default: what the
    /// ELF says (`pvrun::export_functions!`'s marker symbol means function); a stripped
    /// ELF is a program.
    #[arg(long, value_parser = |s: &str| s.parse::<GuestKind>())]
    pub kind: Option<GuestKind>,
    /// An environment variable of the image config (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Default arguments for the guest (the image's Cmd): the caller's `-- ARGS`.
    #[arg(skip)]
    pub cmd: Vec<String>,
}

/// `pvrun package`: packages an existing guest ELF as an OCI image.
#[derive(Parser, Debug)]
#[command(name = "pvrun package", version)]
struct PvrunPackage {
    #[command(flatten)]
    args: PackageArgs,
    /// The guest ELF.
    guest: PathBuf,
    /// Default arguments for the guest (the image's Cmd, after `--`).
    #[arg(last = true)]
    cmd: Vec<String>,
}

/// How a caller validates a guest ELF and reads its facts (host-vmm's loader: this crate
/// does not depend on host-vmm, whose `pvrun` binary uses it). The error is one line.
pub type Inspect<'a> = &'a dyn Fn(&Path, &[u8]) -> Result<GuestInfo, String>;

/// Packages `elf` as `args` say. Returns the line to print on stdout (reference, manifest
/// digest, kind, ABI, where), or the one-line error.
pub fn run(elf: &Path, args: PackageArgs, inspect: Inspect<'_>) -> Result<String, String> {
    let format = args.format.unwrap_or_else(|| {
        if args.output.extension().is_some_and(|e| e == "tar") {
            Format::OciArchive
        } else {
            Format::OciDir
        }
    });
    let opts = PackageOptions {
        name: args.name,
        kind: args.kind,
        env: args.env,
        cmd: args.cmd,
    };
    let bytes =
        std::fs::read(elf).map_err(|e| format!("cannot read guest `{}`: {e}", elf.display()))?;
    let info = inspect(elf, &bytes)?;
    let p =
        package(elf, &bytes, info, &args.output, format, &opts).map_err(|e| format!("{e:#}"))?;
    Ok(format!(
        "{} {} ({} guest, ABI v{}) -> {}",
        p.reference,
        p.manifest_digest,
        p.info.kind.as_str(),
        p.info.abi_version,
        args.output.display()
    ))
}

/// `pvrun package ...` from its argv (`argv[0]` is `package`): the guest and the result of
/// [`run`].
pub fn parse_pvrun_package(argv: &[String]) -> (PathBuf, PackageArgs) {
    let mut cli = PvrunPackage::parse_from(argv);
    cli.args.cmd = cli.cmd;
    (cli.guest, cli.args)
}
