//! Function guests from the command line: `serve` (the HTTP gateway) and `call` (one call
//! from the shell), with the options `pvrun` and `cargo pvrun` share.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::gateway;
use super::guests::{Defaults, GuestSource, GuestSpec, check_unique, parse_guest_arg, read_config};
use super::hostfn::{HostCommand, HostFnLimits, HostFnRunner, LogFn};
use super::{parse_env, parse_mem, parse_timeout};
use crate::{
    CallError, EXIT_FAULT, EXIT_HOST_ERROR, EXIT_KILLED, EXIT_PANIC, EXIT_TIMEOUT, HostFn,
    PoolLimits, Sandbox, SandboxConfig, SandboxPool,
};

/// `pvrun call` exit status when the function returned an error (its message is on stderr).
pub const EXIT_CALL_FAILED: i32 = 1;

/// Host functions offered to the guest from the command line.
#[derive(clap::Args, Debug, Clone)]
pub struct HostFnOptions {
    /// Offer the guest host function NAME, which runs CMD with the call's input on stdin
    /// and answers with its stdout (repeatable). CMD is split like a shell splits words and
    /// run directly, not through a shell; a non-zero exit, a timeout or too much output is
    /// an error for the guest. CMD's stderr goes to the log.
    #[arg(long = "host-fn", value_name = "NAME=CMD", value_parser = HostCommand::parse)]
    pub host_fns: Vec<HostCommand>,
    /// Seconds a --host-fn command may run before it is killed (with its process group);
    /// at most the call's --timeout.
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_timeout)]
    pub host_fn_timeout: Duration,
    /// Largest output a --host-fn command may write; more kills it.
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_mem)]
    pub host_fn_max_output: u64,
}

impl HostFnOptions {
    /// Starts the runner (before any thread is confined) and returns the functions. A
    /// command never outlives `call_timeout`: the guest's call waits for it outside
    /// `KVM_RUN`, where the call's own timeout cannot interrupt it.
    fn functions(
        &self,
        log: LogFn,
        call_timeout: Duration,
    ) -> Result<std::collections::HashMap<String, HostFn>, String> {
        if self.host_fns.is_empty() {
            return Ok(Default::default());
        }
        let runner = HostFnRunner::start(
            HostFnLimits {
                timeout: self.host_fn_timeout.min(call_timeout),
                max_output: usize::try_from(self.host_fn_max_output).unwrap_or(usize::MAX),
            },
            log,
        )
        .map_err(|e| format!("cannot start the host-function runner: {e}"))?;
        let fns = runner.functions(&self.host_fns)?;
        // The functions hold the runner's channel; the runner thread lives as long as they.
        drop(runner);
        Ok(fns)
    }
}

/// Options of `serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on, e.g. 127.0.0.1:8080 (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// Sandboxes kept ready (and concurrent calls served); with `pvrun serve --guest` or
    /// `--config`, a guest's default `max`.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub pool: usize,
    /// Guest memory size per sandbox.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_mem)]
    pub mem: u64,
    /// Stop a call after this many seconds (HTTP 504).
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_timeout)]
    pub timeout: Duration,
    /// Largest output a call may return (HTTP 502 beyond).
    #[arg(long, value_name = "SIZE", default_value = "16M", value_parser = parse_mem)]
    pub max_output: u64,
    /// Seconds a client has to send a request's headers (and an idle keep-alive
    /// connection to start its next request) before it is disconnected; also how long it
    /// may stop reading a response.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_timeout)]
    pub header_timeout: Duration,
    /// Seconds a client has to send a request's body once its headers are in (HTTP 408).
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_timeout)]
    pub body_timeout: Duration,
    /// Connections open at once; more are answered 503 and closed.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_connections: usize,
    /// Calls running or waiting for a sandbox at once; more are answered 503
    /// (default: 4 x --pool).
    #[arg(long, value_name = "N")]
    pub max_inflight: Option<usize>,
    /// Bytes of request bodies and call outputs held in memory at once (a body from
    /// before it is read until its call ends, an output until it is sent); requests
    /// beyond are answered 503 with Retry-After.
    #[arg(long, value_name = "BYTES", default_value = "256M", value_parser = parse_mem)]
    pub max_buffered: u64,
    /// Seconds a shutdown (SIGTERM/SIGINT) waits for calls in flight.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_timeout)]
    pub shutdown_timeout: Duration,
    /// Set an environment variable for the guest's initialisation (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    #[command(flatten)]
    pub host: HostFnOptions,
}

/// Options of `call`.
#[derive(clap::Args, Debug, Clone)]
pub struct CallOptions {
    /// Guest memory size.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_mem)]
    pub mem: u64,
    /// Stop the call after this many seconds (exit status 124).
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_timeout)]
    pub timeout: Duration,
    /// Largest output the call may return.
    #[arg(long, value_name = "SIZE", default_value = "16M", value_parser = parse_mem)]
    pub max_output: u64,
    /// Set an environment variable for the guest's initialisation (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    #[command(flatten)]
    pub host: HostFnOptions,
}

/// Serves the function guest at `guest` over HTTP (see [`gateway::serve`]); `args` are
/// its initialisation's arguments (`argv[0]` first). Never returns.
pub fn serve_and_exit(guest: &Path, opts: ServeOptions, args: Vec<String>) -> ! {
    serve_source_and_exit(guest, false, opts, args)
}

/// [`serve_and_exit`] from the guest ELF at `source`, or with `snapshot` from the snapshot
/// file there (then `args`, `opts.mem` and `opts.env` are unused: they are the file's).
pub(crate) fn serve_source_and_exit(
    source: &Path,
    snapshot: bool,
    opts: ServeOptions,
    args: Vec<String>,
) -> ! {
    let pool_size = opts.pool.max(1);
    // Host-function commands log through the gateway's queue: a stalled stderr never
    // holds a call.
    let log: LogFn = Arc::new(|l: &str| gateway::log_line(l));
    let host_functions = match opts.host.functions(log, opts.timeout) {
        Ok(f) => f,
        Err(e) => usage_exit(&e),
    };
    let config = SandboxConfig {
        mem_size: opts.mem,
        args,
        env: opts.env,
        host_functions,
        call_timeout: Some(opts.timeout),
        max_output: opts.max_output,
        // Guest console text goes to the log escaped, one `guest: ` line at a time.
        console: Arc::new(Mutex::new(Box::new(gateway::GuestConsole::new()))),
        // The guest's initialisation runs confined too, like every call.
        confine_init: true,
        ..SandboxConfig::default()
    };
    let gw = gateway::Options {
        listen: opts.listen,
        header_timeout: opts.header_timeout,
        body_timeout: opts.body_timeout,
        max_connections: opts.max_connections,
        max_inflight: opts.max_inflight.unwrap_or(4 * pool_size),
        max_buffered: opts.max_buffered,
        shutdown_timeout: opts.shutdown_timeout,
    };
    let path = source.to_path_buf();
    gateway::serve(gw, source.display().to_string(), move || {
        let first = if snapshot {
            Sandbox::from_snapshot_file(&path, config)?
        } else {
            Sandbox::new(&path, config)?
        };
        // Calls run on the gateway's call threads, which then only run calls: confine them.
        SandboxPool::new(first, pool_size)?.confine_callers()
    })
}

/// The options of a `pvrun serve` of several guests (`pvrun serve --guest ...` or
/// `--config FILE`), besides [`ServeOptions`].
#[derive(clap::Args, Debug, Clone, Default)]
pub struct GuestsOptions {
    /// Serve guest NAME (repeatable): `NAME=PATH[,KEY=VALUE...]` with the guest ELF, or
    /// `NAME=snapshot=FILE[,...]`; keys: mem, min, max (pool sizes; default 1 and
    /// --pool), pool (min = max), idle (seconds an extra sandbox may stay idle; default
    /// --idle-timeout), timeout, concurrency (calls in flight, running or waiting for a
    /// sandbox, beyond which calls get 429; default 4 x max). Calls are then
    /// `POST /NAME/FUNCTION`.
    #[arg(long = "guest", value_name = "NAME=PATH[,KEY=VALUE...]")]
    pub guests: Vec<String>,
    /// Serve the guests a TOML file lists (`[[guest]]` tables with the same keys, plus
    /// `elf`/`snapshot`, `args` and `env`; see README "Serving several guests").
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// Seconds a sandbox beyond a pool's min may stay idle before it is dropped.
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_timeout)]
    pub idle_timeout: Duration,
}

impl GuestsOptions {
    /// Whether several-guest serving was asked for.
    pub fn any(&self) -> bool {
        !self.guests.is_empty() || self.config.is_some()
    }

    /// The guests, validated (every error is one line).
    pub fn specs(&self, opts: &ServeOptions) -> Result<Vec<GuestSpec>, String> {
        let d = Defaults {
            mem: opts.mem,
            timeout: opts.timeout,
            idle: self.idle_timeout,
            max: opts.pool.clamp(1, super::guests::MAX_POOL),
        };
        let mut specs = Vec::new();
        if let Some(file) = &self.config {
            specs.extend(read_config(file, &d)?);
        }
        for g in &self.guests {
            specs.push(parse_guest_arg(g, &d)?);
        }
        check_unique(&specs)?;
        Ok(specs)
    }
}

/// Serves several guests (`POST /GUEST/FUNCTION`), each with its own elastic pool and
/// concurrency limit; a bad `--guest` or `--config` is one line and status 125. `opts.env`
/// applies to every ELF guest before its own `env`. Never returns.
pub fn serve_guests_and_exit(guests: GuestsOptions, opts: ServeOptions) -> ! {
    let specs = match guests.specs(&opts) {
        Ok(s) => s,
        Err(e) => usage_exit(&e),
    };
    let log: LogFn = Arc::new(|l: &str| gateway::log_line(l));
    let host_functions = match opts.host.functions(log, opts.timeout) {
        Ok(f) => f,
        Err(e) => usage_exit(&e),
    };
    let gw = gateway::Options {
        listen: opts.listen.clone(),
        header_timeout: opts.header_timeout,
        body_timeout: opts.body_timeout,
        max_connections: opts.max_connections,
        max_inflight: opts
            .max_inflight
            .unwrap_or_else(|| specs.iter().map(|g| g.concurrency).sum()),
        max_buffered: opts.max_buffered,
        shutdown_timeout: opts.shutdown_timeout,
    };
    let builds = specs
        .into_iter()
        .map(|g| {
            let (path, snapshot) = match &g.source {
                GuestSource::Elf(p) => (p.clone(), false),
                GuestSource::Snapshot(p) => (p.clone(), true),
            };
            let mut args = vec![path.display().to_string()];
            args.extend(g.args.iter().cloned());
            let mut env = opts.env.clone();
            env.extend(g.env.iter().cloned());
            let config = SandboxConfig {
                mem_size: g.mem,
                args,
                env,
                host_functions: host_functions.clone(),
                call_timeout: Some(g.timeout),
                max_output: opts.max_output,
                console: Arc::new(Mutex::new(Box::new(gateway::GuestConsole::named(&g.name)))),
                confine_init: true,
                ..SandboxConfig::default()
            };
            let limits = PoolLimits {
                min: g.min,
                max: g.max,
                idle: g.idle,
            };
            gateway::GuestBuild {
                name: g.name.clone(),
                from: path.display().to_string(),
                concurrency: Some(g.concurrency),
                build: Box::new(move || {
                    let first = if snapshot {
                        Sandbox::from_snapshot_file(&path, config)?
                    } else {
                        Sandbox::new(&path, config)?
                    };
                    SandboxPool::elastic(first, limits)?.confine_callers()
                }),
            }
        })
        .collect();
    gateway::serve_guests(gw, true, builds)
}

/// Where `call` takes its input from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallInput {
    /// No input.
    Empty,
    /// These bytes (the command-line argument).
    Bytes(Vec<u8>),
    /// Standard input (`-`), read to its end (at most the guest's input limit).
    Stdin,
}

impl CallInput {
    /// The `[INPUT|-]` argument: absent is empty, `-` is stdin, anything else the bytes.
    pub fn from_arg(arg: Option<&str>) -> CallInput {
        match arg {
            None => CallInput::Empty,
            Some("-") => CallInput::Stdin,
            Some(s) => CallInput::Bytes(s.as_bytes().to_vec()),
        }
    }
}

fn usage_exit(msg: &str) -> ! {
    crate::eprint_line(&format!("pvrun: error: {msg}"));
    std::process::exit(EXIT_HOST_ERROR)
}

/// Boots the function guest at `guest` to its ready point, calls `name` once with `input`,
/// writes the output to stdout as it is (no newline added) and exits:
///
/// | status | when |
/// |---|---|
/// | 0 | the function returned output |
/// | 1 | the function returned an error (its message on stderr) |
/// | 101 / 139 / 124 | the guest panicked / crashed / ran past `--timeout` |
/// | 137 | the call was stopped by a signal |
/// | 125 | no such function, input or output too large, not a function guest, host error |
///
/// The guest's console output (from initialisation and the call) goes to stderr.
pub fn call_and_exit(
    guest: &Path,
    name: &str,
    input: CallInput,
    opts: CallOptions,
    args: Vec<String>,
) -> ! {
    call_source_and_exit(guest, false, name, input, opts, args)
}

/// [`call_and_exit`] from the guest ELF at `guest`, or with `snapshot` from the snapshot
/// file there (written by `pvrun snapshot`; then `args`, `opts.mem` and `opts.env` are
/// unused: they are the file's, and nothing boots).
pub fn call_source_and_exit(
    guest: &Path,
    snapshot: bool,
    name: &str,
    input: CallInput,
    opts: CallOptions,
    args: Vec<String>,
) -> ! {
    let log: LogFn = Arc::new(|l: &str| crate::eprint_line(l));
    let host_functions = match opts.host.functions(log, opts.timeout) {
        Ok(f) => f,
        Err(e) => usage_exit(&e),
    };
    let config = SandboxConfig {
        mem_size: opts.mem,
        args,
        env: opts.env,
        host_functions,
        call_timeout: Some(opts.timeout),
        max_output: opts.max_output,
        // The guest's initialisation runs confined, like the call.
        confine_init: true,
        ..SandboxConfig::default()
    };
    crate::stop_guest_on_signals();
    let first = if snapshot {
        Sandbox::from_snapshot_file(guest, config)
    } else {
        Sandbox::new(guest, config)
    };
    let pool = first
        .and_then(|first| SandboxPool::new(first, 1))
        .and_then(SandboxPool::confine_callers);
    let pool = match pool {
        Ok(p) => p,
        Err(e) => usage_exit(&e.to_string()),
    };
    let shown = crate::escape_controls(name).into_owned();
    if !pool.functions().iter().any(|f| f == name) {
        let list: Vec<String> = pool
            .functions()
            .iter()
            .map(|f| crate::escape_controls(f).into_owned())
            .collect();
        usage_exit(&format!(
            "`{}` exports no function `{shown}` (it exports: {})",
            guest.display(),
            list.join(", ")
        ));
    }
    let max = pool.max_input();
    let bytes = match input {
        CallInput::Empty => Vec::new(),
        CallInput::Bytes(b) => b,
        CallInput::Stdin => {
            let b = match read_stdin(max + 1) {
                Ok(b) => b,
                Err(StdinError::Signal(sig)) => {
                    crate::eprint_line(&format!(
                        "pvrun: interrupted by signal {sig} while reading the input"
                    ));
                    std::process::exit(128 + sig)
                }
                Err(StdinError::Io(e)) => {
                    usage_exit(&format!("cannot read the input from stdin: {e}"))
                }
            };
            if b.len() as u64 > max {
                usage_exit(&format!(
                    "the input on stdin is larger than the {max} bytes `{shown}` accepts"
                ));
            }
            b
        }
    };
    let result = pool.call(name, &bytes);
    let (status, line) = match result {
        Ok(out) => {
            let mut so = crate::StdStream::stdout();
            if let Err(e) = so.write_all(&out).and_then(|()| so.flush()) {
                (
                    EXIT_HOST_ERROR,
                    Some(format!("pvrun: error: cannot write the output: {e}")),
                )
            } else {
                (0, None)
            }
        }
        Err(CallError::Failed(msg)) => (
            EXIT_CALL_FAILED,
            Some(format!(
                "pvrun: function `{shown}` failed: {}",
                crate::escape_controls(&msg)
            )),
        ),
        Err(CallError::Panic(m)) => (
            EXIT_PANIC,
            Some(format!("pvrun: guest {}", crate::escape_controls(&m))),
        ),
        Err(CallError::Fault(f)) => (EXIT_FAULT, Some(format!("pvrun: guest crashed: {f}"))),
        Err(CallError::Timeout(t)) => (
            EXIT_TIMEOUT,
            Some(format!(
                "pvrun: call timed out after {:.3} s and was stopped",
                t.as_secs_f64()
            )),
        ),
        Err(CallError::Killed) => (
            EXIT_KILLED,
            Some("pvrun: the call was stopped by a signal".to_string()),
        ),
        Err(CallError::Exited(c)) => (
            EXIT_HOST_ERROR,
            Some(format!(
                "pvrun: error: the guest exited with status {c} during the call (a function must return its output)"
            )),
        ),
        Err(e @ CallError::InputTooLarge { .. }) => (
            EXIT_HOST_ERROR,
            Some(format!("pvrun: error: {e} (`{shown}` was not called)")),
        ),
        Err(e) => (
            EXIT_HOST_ERROR,
            Some(format!(
                "pvrun: error: {}",
                crate::escape_controls(&e.to_string())
            )),
        ),
    };
    if let Some(l) = line {
        crate::eprint_line(&l);
    }
    let _ = std::io::stderr().flush();
    // Not dropping the pool: destroying its VM costs ~0.5 ms and changes nothing.
    std::process::exit(status)
}

enum StdinError {
    Signal(i32),
    Io(std::io::Error),
}

/// Reads stdin to its end, at most `limit` bytes. Unlike `read_to_end`, which retries an
/// interrupted read, it gives up when SIGINT/SIGTERM arrived (the handlers are installed
/// without `SA_RESTART`, so the blocked `read` returns `EINTR`): a stdin nobody closes never
/// makes `pvrun call -` deaf to Ctrl-C.
fn read_stdin(limit: u64) -> Result<Vec<u8>, StdinError> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut stdin = std::io::stdin().lock();
    while (out.len() as u64) < limit {
        let want = buf.len().min((limit - out.len() as u64) as usize);
        match stdin.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StdinError::Io(e)),
        }
        let sig = crate::runtime::control::terminating_signal();
        if sig != 0 {
            return Err(StdinError::Signal(sig));
        }
    }
    Ok(out)
}
