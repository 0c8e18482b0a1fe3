//! `pvrun`: boot a guest ELF in a fresh KVM VM and exit with its status; or, with
//! `pvrun serve`, serve a function guest's functions over HTTP.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use host_vmm::cli::{VmOptions, parse_env, parse_mem, parse_timeout, run_and_exit};
use host_vmm::{Sandbox, SandboxConfig, SandboxPool};

/// Run a pvrun unikernel (a guest ELF built with `cargo pvrun`) in a KVM VM.
///
/// Exit status: the guest's exit code; 101 if it panicked; 139 if it crashed (CPU
/// exception); 124 if it ran past --timeout; 125 if the host could not start it.
/// `pvrun serve --help` describes the function gateway.
#[derive(Parser)]
#[command(name = "pvrun", version)]
struct Cli {
    #[command(flatten)]
    vm: VmOptions,
    /// The guest ELF.
    guest: PathBuf,
    /// Arguments for the guest (after `--`).
    #[arg(last = true)]
    args: Vec<String>,
}

/// Serve the functions of a function guest over HTTP: `POST /NAME` with the input as
/// body calls NAME in a sandbox reset to its initialised state, and answers with the
/// output (200), or 404 (no such function), 413 (input too large), 422 (the function
/// returned an error), 500 (it panicked or crashed), 502 (output too large), 504 (timeout).
#[derive(Parser)]
#[command(name = "pvrun serve", version)]
struct ServeCli {
    /// Address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// Sandboxes kept ready (and concurrent calls served).
    #[arg(long, default_value_t = 4)]
    pool: usize,
    /// Guest memory size per sandbox.
    #[arg(long, default_value = "64M", value_parser = parse_mem)]
    mem: u64,
    /// Stop a call after this many seconds (HTTP 504).
    #[arg(long, default_value = "10", value_parser = parse_timeout)]
    timeout: Duration,
    /// Largest output a call may return.
    #[arg(long, default_value = "16M", value_parser = parse_mem)]
    max_output: u64,
    /// Set an environment variable for the guest's initialisation (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// The function guest ELF.
    guest: PathBuf,
    /// Arguments for the guest's initialisation (after `--`).
    #[arg(last = true)]
    args: Vec<String>,
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("serve") {
        serve(ServeCli::parse_from(&argv[1..]));
    }
    let cli = Cli::parse();
    host_vmm::stop_guest_on_signals();
    let mut args = vec![cli.guest.display().to_string()];
    args.extend(cli.args);
    let (config, debug) = cli.vm.into_parts(args);
    run_and_exit(&cli.guest, config, &debug)
}

fn serve(cli: ServeCli) -> ! {
    let fail = |e: &dyn std::fmt::Display| -> ! {
        eprintln!("pvrun: error: {e}");
        std::process::exit(host_vmm::EXIT_HOST_ERROR)
    };
    let mut args = vec![cli.guest.display().to_string()];
    args.extend(cli.args);
    let config = SandboxConfig {
        mem_size: cli.mem,
        args,
        env: cli.env,
        call_timeout: Some(cli.timeout),
        max_output: cli.max_output,
        ..SandboxConfig::default()
    };
    let first = Sandbox::new(&cli.guest, config).unwrap_or_else(|e| fail(&e));
    let pool = SandboxPool::new(first, cli.pool.max(1)).unwrap_or_else(|e| fail(&e));
    let functions = pool.functions().join(", ");
    let gateway = host_vmm::cli::gateway::Gateway::bind(&cli.listen, Arc::new(pool))
        .unwrap_or_else(|e| fail(&e));
    let addr = gateway
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or(cli.listen.clone());
    eprintln!(
        "pvrun: serving {functions} from {} on http://{addr}/ with {} sandboxes",
        cli.guest.display(),
        cli.pool.max(1)
    );
    gateway.serve()
}
