//! Command-line pieces shared by `pvrun` and `cargo pvrun`: option parsing helpers,
//! running a guest to a process exit status, serving and calling function guests
//! ([`function`]), host functions from the command line ([`hostfn`]), `-v`/`RUST_LOG`
//! ([`logging`]), running guest tests ([`test_runner`]), and mapping clap's errors onto
//! the exit-status contract.

pub mod function;
pub mod gateway;
pub mod guests;
pub mod hostfn;
pub mod logging;
pub mod package;
pub mod snapshot;
pub mod test_runner;

pub use function::{
    CallInput, CallOptions, EXIT_CALL_FAILED, GuestsOptions, HostFnOptions, ServeOptions,
    call_and_exit, serve_and_exit, serve_guests_and_exit,
};

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use crate::{DiskConfig, EXIT_HOST_ERROR, GuestImage, NetConfig, Vm, VmConfig};

/// The options that shape a guest's VM, shared by `pvrun` and `cargo pvrun`.
#[derive(clap::Args, Debug)]
pub struct VmOptions {
    /// Guest memory size (e.g. 64M, 1G).
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_mem)]
    pub mem: u64,
    /// Stop the guest after this many seconds (exit status 124).
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
    /// Set an environment variable for the guest (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Attach a disk image as block device NAME (repeatable; `,ro` for read-only).
    #[arg(long = "disk", value_name = "NAME=PATH[,ro]", value_parser = DiskConfig::parse)]
    pub disks: Vec<DiskConfig>,
    /// Attach a TAP interface as network device NAME (repeatable), e.g.
    /// `eth0=tap:tap0,ip=10.0.0.2/24,gw=10.0.0.1` (without `ip=` the guest uses DHCP).
    #[arg(long = "net", value_name = "NAME=tap:IF[,mac=..][,ip=..][,gw=..][,mtu=..][,mac-spoof=allow]", value_parser = NetConfig::parse)]
    pub nets: Vec<NetConfig>,
    /// Print the guest's call stack when it panics too (crashes always print it); also
    /// on when RUST_BACKTRACE is set to 1 or full.
    #[arg(long)]
    pub backtrace: bool,
    /// Write an ELF core file when the guest crashes or panics, or when pvrun gets
    /// SIGQUIT (the guest's state at that stop; exit status 131) (a directory: write
    /// `core.GUEST.PID` in it); `gdb GUEST CORE` reads it.
    #[arg(long, value_name = "PATH")]
    pub core_dump: Option<PathBuf>,
    /// Replace an existing file at the --core-dump path.
    #[arg(long, requires = "core_dump")]
    pub core_dump_overwrite: bool,
    /// Print the VM's counters on stderr when the guest ends: VM exits by kind,
    /// hypercalls by name, console bytes, and each device's ring requests.
    #[arg(long)]
    pub stats: bool,
    /// Wait for gdb on this port (127.0.0.1) or ADDR:PORT before the guest's first
    /// instruction, and let it debug the guest (see README "Debugging a guest").
    #[arg(long, value_name = "[ADDR:]PORT", value_parser = crate::parse_gdb_addr)]
    pub gdb: Option<std::net::SocketAddr>,
}

/// What to do beyond the one-line report when a guest crashes or panics.
#[derive(Clone, Debug, Default)]
pub struct DebugOptions {
    /// Print the call stack of a panic too (crashes always get one).
    pub panic_backtrace: bool,
    /// Write a core file here.
    pub core_dump: Option<PathBuf>,
    /// Replace an existing core file.
    pub core_dump_overwrite: bool,
    /// Print the VM's counters at exit (`--stats`).
    pub stats: bool,
    /// Run the guest under gdb, listening here.
    pub gdb: Option<std::net::SocketAddr>,
}

/// Whether `RUST_BACKTRACE` asks for backtraces (any value but `0`, like std).
pub fn rust_backtrace_env() -> bool {
    std::env::var_os("RUST_BACKTRACE").is_some_and(|v| !v.is_empty() && v != "0")
}

impl VmOptions {
    /// The VM configuration (see [`VmOptions::into_config`]) and the crash options.
    pub fn into_parts(self, args: Vec<String>) -> (VmConfig, DebugOptions) {
        let debug = DebugOptions {
            panic_backtrace: self.backtrace || rust_backtrace_env(),
            core_dump: self.core_dump.clone(),
            core_dump_overwrite: self.core_dump_overwrite,
            stats: self.stats,
            gdb: self.gdb,
        };
        (self.into_config(args), debug)
    }

    /// The VM configuration for these options, with `args` (`argv[0]` first).
    pub fn into_config(self, args: Vec<String>) -> VmConfig {
        VmConfig {
            mem_size: self.mem,
            args,
            env: self.env,
            timeout: self.timeout,
            disks: self.disks,
            nets: self.nets,
            ..VmConfig::default()
        }
    }
}

/// Parses a memory size: bytes, or a number with K/M/G (KiB/MiB/GiB) suffix.
pub fn parse_mem(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let (num, mult) = if let Some(n) = lower.strip_suffix("gib").or(lower.strip_suffix("g")) {
        (n, 1u64 << 30)
    } else if let Some(n) = lower.strip_suffix("mib").or(lower.strip_suffix("m")) {
        (n, 1 << 20)
    } else if let Some(n) = lower.strip_suffix("kib").or(lower.strip_suffix("k")) {
        (n, 1 << 10)
    } else {
        (lower.as_str(), 1)
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size (use e.g. 64M or 1G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Parses a timeout in seconds (fractions allowed).
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!(
            "timeout `{s}` must be a positive number of seconds"
        ));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

/// Parses `KEY=VALUE`.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

/// Parses the command line into `P`, or exits the way the exit-status contract says:
/// `--help` and `--version` print to stdout and exit 0; every usage error (unknown
/// option, bad value, missing argument) prints clap's message and exits 125, not clap's
/// default 2.
pub fn parse_or_exit<P: clap::Parser>(argv: impl IntoIterator<Item = String>) -> P {
    match P::try_parse_from(argv) {
        Ok(p) => p,
        Err(e) => exit_on_clap_error(e),
    }
}

/// Prints a clap error or help text and exits 0 (help, version) or 125 (usage errors).
pub fn exit_on_clap_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    let code = match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
        _ => EXIT_HOST_ERROR,
    };
    let _ = e.print();
    std::process::exit(code)
}

/// A usage error found after parsing: one `pvrun: error:` line and exit status 125, like
/// clap's own.
pub fn usage_error(msg: &str) -> ! {
    crate::eprint_line(&format!("pvrun: error: {msg}"));
    std::process::exit(EXIT_HOST_ERROR)
}

/// Which program runs the guest, for the commands its messages suggest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Program {
    /// `pvrun GUEST`.
    #[default]
    Pvrun,
    /// `cargo pvrun` in a guest crate, with these crate-selection and build options
    /// (shell-quoted, e.g. `--release -p functions`; may be empty).
    CargoPvrun {
        /// The options, to repeat in the suggested commands.
        build_options: String,
    },
}

impl Program {
    /// The one-line error for a function guest that was run as a program.
    pub fn function_guest_hint(&self, elf: &Path) -> String {
        match self {
            Program::Pvrun => format!(
                "pvrun: error: `{}` is a function guest (it waits for calls); serve it with `pvrun serve --listen ADDR {0}`, or call one function with `pvrun call {0} NAME [INPUT|-]`",
                elf.display()
            ),
            Program::CargoPvrun { build_options } => {
                let opts = if build_options.is_empty() {
                    String::new()
                } else {
                    format!(" {build_options}")
                };
                format!(
                    "pvrun: error: this crate is a function guest (it waits for calls); serve it with `cargo pvrun serve{opts} --listen ADDR`, or call one function with `cargo pvrun call{opts} NAME [INPUT|-]`"
                )
            }
        }
    }
}

/// Boots `elf` with `config`, prints the outcome's report (if any, with the guest's call
/// stack for a crash or a SIGQUIT) on stderr, writes a core file if `debug` asks for one
/// (after a crash, a panic, or a SIGQUIT, which stops the guest and exits 131), and exits
/// the process with the documented status. Host errors are one `pvrun: error:` line and
/// status 125; a core file that cannot be written is one `pvrun: warning:` line and
/// changes no status.
pub fn run_and_exit(elf: &Path, config: VmConfig, debug: &DebugOptions) -> ! {
    run_and_exit_as(elf, config, debug, &Program::Pvrun)
}

/// [`run_and_exit`], but the guest starts only once the VM is built and `go()` returns
/// true; if it returns false, the process exits 125 without running the guest. (The
/// containerd shim builds the VM at `create` and runs it at `start`.)
pub fn run_and_exit_when(
    elf: &Path,
    config: VmConfig,
    debug: &DebugOptions,
    go: impl FnOnce() -> bool,
) -> ! {
    run_and_exit_when_as(elf, config, debug, &Program::Pvrun, go)
}

/// [`run_and_exit`], with the hints `program` gives (a function guest is told how to
/// serve or call it with that program). A disk the guest never sent a request to gets a
/// `pvrun: warning:` line at exit (a misspelt name in the guest is the usual cause).
pub fn run_and_exit_as(elf: &Path, config: VmConfig, debug: &DebugOptions, program: &Program) -> ! {
    run_and_exit_when_as(elf, config, debug, program, || true)
}

fn run_and_exit_when_as(
    elf: &Path,
    config: VmConfig,
    debug: &DebugOptions,
    program: &Program,
    go: impl FnOnce() -> bool,
) -> ! {
    // SIGQUIT stops the guest with its state kept (a core file with --core-dump).
    crate::stop_guest_on_quit();
    let disks: Vec<String> = config.disks.iter().map(|d| d.name.clone()).collect();
    let vm = GuestImage::from_file(elf).and_then(|image| Vm::new(Arc::new(image), config));
    let mut vm = match vm {
        Ok(vm) => vm,
        Err(e) => host_error(e),
    };
    if !go() {
        std::process::exit(EXIT_HOST_ERROR)
    }
    // With --gdb: listen and wait for gdb before the first instruction (the session's
    // socket and poller thread exist before the thread is confined).
    let session = debug.gdb.map(|addr| {
        let listener = crate::GdbListener::bind(addr).unwrap_or_else(|e| host_error(e));
        crate::eprint_line(&listener.waiting_line(elf));
        listener.accept(&vm).unwrap_or_else(|e| host_error(e))
    });
    // From here on this thread only runs the guest: confine it (fails closed). A core
    // dump is a file the host creates after the crash, which the filter forbids: with
    // `--core-dump` (a debugging session) the vCPU thread runs without its filter.
    if debug.core_dump.is_none()
        && let Err(e) = vm.confine_thread()
    {
        host_error(e)
    }
    let outcome = match session {
        Some(session) => vm.run_gdb(session),
        None => vm.run(),
    };
    match outcome {
        Ok(outcome @ (crate::Outcome::Ready(_) | crate::Outcome::Returned { .. })) => {
            crate::eprint_line(&program.function_guest_hint(elf));
            vm.exit_process(outcome.exit_status())
        }
        Ok(outcome) => {
            tracing::debug!(?outcome, exits = vm.exits(), "guest run ended");
            if let Some(report) =
                outcome.report_with_backtrace(vm.crash(), vm.image(), debug.panic_backtrace)
            {
                crate::eprint_line(&report);
            }
            if debug.stats {
                for line in vm.stats().lines() {
                    crate::eprint_line(&line);
                }
            }
            if let (Some(path), Some(_)) = (&debug.core_dump, vm.crash())
                && let Err(e) = vm.write_core_dump(path, debug.core_dump_overwrite)
            {
                crate::eprint_line(&format!(
                    "pvrun: warning: cannot write core dump {}: {e}",
                    path.display()
                ));
            }
            for (name, c) in vm.device_counters() {
                if disks.contains(&name) && c.requests == 0 && c.doorbells == 0 {
                    crate::eprint_line(&format!(
                        "pvrun: warning: disk `{name}` was attached but the guest never opened it (it sent no request)"
                    ));
                }
            }
            vm.exit_process(outcome.exit_status())
        }
        Err(e) => host_error(e),
    }
}

fn host_error(e: crate::Error) -> ! {
    crate::eprint_line(&format!("pvrun: error: {e}"));
    std::process::exit(EXIT_HOST_ERROR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_mem("64M"), Ok(64 << 20));
        assert_eq!(parse_mem("1g"), Ok(1 << 30));
        assert_eq!(parse_mem("2MiB"), Ok(2 << 20));
        assert_eq!(parse_mem("4096"), Ok(4096));
        assert!(parse_mem("lots").is_err());
        assert!(parse_mem("99999999999999G").is_err());
        assert!(parse_timeout("0").is_err());
        assert_eq!(parse_timeout("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_env("=x").is_err());
    }
}
