//! `pvrun snapshot GUEST -o FILE [--mem SIZE] [--env K=V] [-- ARGS]`: boots a function
//! guest, runs its initialisation and writes a snapshot file at `FN_READY` (format:
//! docs/SNAPSHOT.md), which `pvrun serve --snapshot FILE` and
//! [`crate::Sandbox::from_snapshot_file`] start from without booting.

use std::path::PathBuf;
use std::time::Duration;

use super::{ServeOptions, parse_env, parse_mem, parse_timeout};
use crate::{EXIT_HOST_ERROR, Sandbox, SandboxConfig, eprint_line};

/// Boot a function guest, run its initialisation, and write a snapshot file at the point
/// where it is ready for calls. `pvrun serve --snapshot FILE` then starts from the file
/// (mapped copy-on-write, shared by every sandbox on the machine) instead of booting.
///
/// Exit status: 0 when the file is written; 125 if the guest is not a function guest, does
/// not become ready, or the file cannot be written.
#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    /// Where to write the snapshot file (replaced atomically if it exists).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,
    /// Guest memory size (e.g. 64M); sandboxes made from the file get the same.
    #[arg(long, default_value = "64M", value_parser = parse_mem)]
    pub mem: u64,
    /// Stop the initialisation after this many seconds.
    #[arg(long, default_value = "10", value_parser = parse_timeout)]
    pub timeout: Duration,
    /// Set an environment variable for the guest's initialisation (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// The function guest ELF.
    pub guest: PathBuf,
    /// Arguments for the guest's initialisation (after `--`).
    #[arg(last = true)]
    pub args: Vec<String>,
}

/// `pvrun serve --snapshot FILE`: serves the functions of the snapshot file at `file`.
pub fn serve_snapshot_and_exit(file: &std::path::Path, opts: ServeOptions) -> ! {
    super::function::serve_source_and_exit(file, true, opts, Vec::new())
}

/// Runs `pvrun snapshot` and exits.
pub fn snapshot_and_exit(cli: SnapshotArgs) -> ! {
    let mut args = vec![cli.guest.display().to_string()];
    args.extend(cli.args);
    let config = SandboxConfig {
        mem_size: cli.mem,
        args,
        env: cli.env,
        call_timeout: Some(cli.timeout),
        ..SandboxConfig::default()
    };
    let written = Sandbox::new(&cli.guest, config)
        .and_then(|sb| sb.template().write_snapshot_file(&cli.output));
    match written {
        Ok(info) => {
            let line = format!(
                "pvrun: wrote {}: {} MiB of guest memory, {} KiB stored (guest ELF sha256 {})",
                cli.output.display(),
                info.mem_size >> 20,
                info.data_bytes >> 10,
                info.elf_sha256
            );
            eprint_line(&line);
            std::process::exit(0)
        }
        Err(e) => {
            eprint_line(&format!("pvrun: error: {e}"));
            std::process::exit(EXIT_HOST_ERROR)
        }
    }
}
