//! `pvrun`: boot a guest ELF in a fresh KVM VM and exit with its status; or, with
//! `pvrun serve`, serve a function guest's functions over HTTP.

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
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use clap::Parser;
    use host_vmm::cli::gateway;
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
    /// returned an error), 500 (it panicked or crashed), 502 (output too large), 504
    /// (timeout), 503 with Retry-After (overloaded). `GET /healthz` and `GET /readyz` report
    /// liveness and readiness. SIGTERM or SIGINT stops accepting, lets calls in flight finish
    /// and exits 0.
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
        /// Seconds a client has to send a request's headers (and an idle keep-alive
        /// connection to start its next request) before it is disconnected; also how long it
        /// may stop reading a response.
        #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_timeout)]
        header_timeout: Duration,
        /// Seconds a client has to send a request's body once its headers are in (HTTP 408).
        #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_timeout)]
        body_timeout: Duration,
        /// Connections open at once; more are answered 503 and closed.
        #[arg(long, value_name = "N", default_value_t = 1024)]
        max_connections: usize,
        /// Calls running or waiting for a sandbox at once; more are answered 503
        /// (default: 4 x --pool).
        #[arg(long, value_name = "N")]
        max_inflight: Option<usize>,
        /// Seconds a shutdown (SIGTERM/SIGINT) waits for calls in flight.
        #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_timeout)]
        shutdown_timeout: Duration,
        /// Set an environment variable for the guest's initialisation (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// The function guest ELF.
        guest: PathBuf,
        /// Arguments for the guest's initialisation (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    }

    pub fn real_main() {
        let argv: Vec<String> = std::env::args().collect();
        if argv.get(1).map(String::as_str) == Some("serve") {
            serve(ServeCli::parse_from(&argv[1..]));
        }
        if argv.get(1).map(String::as_str) == Some("package") {
            host_vmm::cli::package::pvrun_package_main(&argv[1..]);
        }
        let cli = Cli::parse();
        host_vmm::stop_guest_on_signals();
        let mut args = vec![cli.guest.display().to_string()];
        args.extend(cli.args);
        let (config, debug) = cli.vm.into_parts(args);
        run_and_exit(&cli.guest, config, &debug)
    }

    fn serve(cli: ServeCli) -> ! {
        let pool_size = cli.pool.max(1);
        let mut args = vec![cli.guest.display().to_string()];
        args.extend(cli.args);
        let config = SandboxConfig {
            mem_size: cli.mem,
            args,
            env: cli.env,
            call_timeout: Some(cli.timeout),
            max_output: cli.max_output,
            // Guest console text goes to the log escaped, one `guest: ` line at a time.
            console: Arc::new(Mutex::new(Box::new(gateway::GuestConsole::new()))),
            ..SandboxConfig::default()
        };
        let opts = gateway::Options {
            listen: cli.listen,
            header_timeout: cli.header_timeout,
            body_timeout: cli.body_timeout,
            max_connections: cli.max_connections,
            max_inflight: cli.max_inflight.unwrap_or(4 * pool_size),
            shutdown_timeout: cli.shutdown_timeout,
        };
        let guest = cli.guest.clone();
        gateway::serve(opts, cli.guest.display().to_string(), move || {
            let first = Sandbox::new(&guest, config)?;
            // Calls run on tokio's blocking threads, which then only run calls: confine them.
            SandboxPool::new(first, pool_size)?.confine_callers()
        })
    }
}
