//! `pvrun`: boot a guest ELF in a fresh KVM VM and exit with its status.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use host_vmm::VmConfig;
use host_vmm::cli::{parse_env, parse_mem, parse_timeout, run_and_exit};

/// Run a pvrun unikernel (a guest ELF built with `cargo pvrun`) in a KVM VM.
///
/// Exit status: the guest's exit code; 101 if it panicked; 139 if it crashed (CPU
/// exception); 124 if it ran past --timeout; 125 if the host could not start it.
#[derive(Parser)]
#[command(name = "pvrun", version)]
struct Cli {
    /// Guest memory size (e.g. 64M, 1G).
    #[arg(long, default_value = "64M", value_parser = parse_mem)]
    mem: u64,
    /// Stop the guest after this many seconds (exit status 124).
    #[arg(long, value_parser = parse_timeout)]
    timeout: Option<Duration>,
    /// Set an environment variable for the guest (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Attach a disk image as block device NAME (repeatable; `,ro` for read-only).
    #[arg(long = "disk", value_name = "NAME=PATH[,ro]", value_parser = host_vmm::block::DiskConfig::parse)]
    disks: Vec<host_vmm::block::DiskConfig>,
    /// The guest ELF.
    guest: PathBuf,
    /// Arguments for the guest (after `--`).
    #[arg(last = true)]
    args: Vec<String>,
}

fn main() {
    let cli = Cli::parse();
    host_vmm::vm::stop_guest_on_signals();
    let mut args = vec![cli.guest.display().to_string()];
    args.extend(cli.args);
    let config = VmConfig {
        mem_size: cli.mem,
        args,
        env: cli.env,
        timeout: cli.timeout,
        disks: cli.disks,
        ..VmConfig::default()
    };
    run_and_exit(&cli.guest, config)
}
