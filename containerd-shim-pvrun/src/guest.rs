//! The guest process of one container: `containerd-shim-pvrun-v1 run-guest [VM OPTIONS]
//! ELF -- ARGV0 ARGS...`. It validates the ELF and builds the VM, then waits for one byte
//! on stdin (the shim writes it at `start`) before booting the guest; end of file (the
//! shim went away, or the task was deleted unstarted) exits 125 without running it. From
//! then on it is `pvrun`: stdout/stderr are containerd's FIFOs, SIGTERM/SIGINT stop the
//! guest (143/130), and it exits with the guest's status.
//!
//! Why a process per guest rather than a VM inside the shim: the guest's vCPU thread is
//! confined by a seccomp filter and its stop path is process-wide signals (SIGTERM,
//! the kick signal), `exit_process` skips KVM's slow teardown, and a host bug in one guest
//! can at worst end that guest's process. The shim stays a small, unconfined ttrpc server.

use std::io::Read;
use std::path::PathBuf;

use clap::Parser;
use host_vmm::cli::{VmOptions, run_and_exit_when};

/// argv[1] that selects this mode.
pub const RUN_GUEST: &str = "run-guest";

/// argv[1] of a function guest served over HTTP: see [`serve_main`].
pub const SERVE_GUEST: &str = "serve-guest";

/// `containerd-shim-pvrun-v1 serve-guest --listen ADDR --mem SIZE [--env K=V]... ELF --
/// ARGV...`: `pvrun serve` for a function guest (POST /NAME calls NAME in a sandbox reset
/// between calls; GET /healthz and /readyz for the kubelet's probes), started at the
/// task's `start`. SIGTERM lets calls in flight finish and exits 0.
#[derive(Parser)]
#[command(name = "containerd-shim-pvrun-v1 serve-guest")]
struct ServeCli {
    #[arg(long)]
    listen: String,
    #[arg(long, value_parser = host_vmm::cli::parse_mem)]
    mem: u64,
    #[arg(long, default_value_t = 2)]
    pool: usize,
    #[arg(long = "env", value_parser = host_vmm::cli::parse_env)]
    env: Vec<(String, String)>,
    guest: PathBuf,
    #[arg(last = true)]
    argv: Vec<String>,
}

pub fn serve_main(argv: &[String]) -> ! {
    use host_vmm::cli::gateway;
    use host_vmm::{Sandbox, SandboxConfig, SandboxPool};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    let cli = ServeCli::parse_from(argv);
    let mut go = [0u8; 1];
    if !matches!(std::io::stdin().read(&mut go), Ok(1)) {
        std::process::exit(host_vmm::EXIT_HOST_ERROR);
    }
    let pool = cli.pool.max(1);
    let config = SandboxConfig {
        mem_size: cli.mem,
        args: cli.argv,
        env: cli.env,
        call_timeout: Some(Duration::from_secs(10)),
        console: Arc::new(Mutex::new(Box::new(gateway::GuestConsole::new()))),
        ..SandboxConfig::default()
    };
    let opts = gateway::Options {
        listen: cli.listen,
        header_timeout: Duration::from_secs(10),
        body_timeout: Duration::from_secs(10),
        max_connections: 1024,
        max_inflight: 4 * pool,
        max_buffered: 256 << 20,
        shutdown_timeout: Duration::from_secs(30),
    };
    let guest = cli.guest.clone();
    gateway::serve(opts, cli.guest.display().to_string(), move || {
        let first = Sandbox::new(&guest, config)?;
        SandboxPool::new(first, pool)?.confine_callers()
    })
}

/// argv[1] of a Kubernetes pod's sandbox ("pause") container: see [`pod_sandbox`].
pub const POD_SANDBOX: &str = "pod-sandbox";

/// The pod sandbox the kubelet asks for before a pod's containers (CRI marks it with the
/// annotation `io.kubernetes.cri.container-type: sandbox`; its image is the pause image,
/// not a pvrun guest). Like `pause`, it waits for `start`, then does nothing until SIGTERM
/// or SIGINT, and exits 0.
pub fn pod_sandbox() -> ! {
    // SAFETY: plain signal-set calls on local sets; the signals are blocked before we
    // wait for them, so none is lost.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut go = [0u8; 1];
        if !matches!(std::io::stdin().read(&mut go), Ok(1)) {
            std::process::exit(host_vmm::EXIT_HOST_ERROR);
        }
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
    std::process::exit(0)
}

#[derive(Parser)]
#[command(name = "containerd-shim-pvrun-v1 run-guest")]
struct Cli {
    #[command(flatten)]
    vm: VmOptions,
    /// The guest ELF.
    guest: PathBuf,
    /// argv of the guest, argv[0] first (after `--`).
    #[arg(last = true)]
    argv: Vec<String>,
}

pub fn main(argv: &[String]) -> ! {
    let cli = Cli::parse_from(argv);
    host_vmm::stop_guest_on_signals();
    let (config, debug) = cli.vm.into_parts(cli.argv);
    run_and_exit_when(&cli.guest, config, &debug, || {
        let mut go = [0u8; 1];
        // A signal before `start` interrupts the read (no SA_RESTART): not started.
        matches!(std::io::stdin().read(&mut go), Ok(1))
    })
}
