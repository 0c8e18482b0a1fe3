//! Command-line pieces shared by `pvrun` and `cargo pvrun`: option parsing helpers and
//! running a guest to a process exit status.

pub mod gateway;
pub mod package;

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use crate::{DiskConfig, EXIT_HOST_ERROR, GuestImage, NetConfig, Vm, VmConfig};

/// The options that shape a guest's VM, shared by `pvrun` and `cargo pvrun`.
#[derive(clap::Args, Debug)]
pub struct VmOptions {
    /// Guest memory size (e.g. 64M, 1G).
    #[arg(long, default_value = "64M", value_parser = parse_mem)]
    pub mem: u64,
    /// Stop the guest after this many seconds (exit status 124).
    #[arg(long, value_parser = parse_timeout)]
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
    /// Write an ELF core file when the guest crashes or panics (a directory: write
    /// `core.GUEST.PID` in it); `gdb GUEST CORE` reads it.
    #[arg(long, value_name = "PATH")]
    pub core_dump: Option<PathBuf>,
    /// Replace an existing file at the --core-dump path.
    #[arg(long, requires = "core_dump")]
    pub core_dump_overwrite: bool,
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

/// Boots `elf` with `config`, prints the outcome's report (if any, with the guest's call
/// stack for a crash) on stderr, writes a core file if `debug` asks for one, and exits the
/// process with the documented status. Host errors are one `pvrun: error:` line and
/// status 125; a core file that cannot be written is one `pvrun: warning:` line and
/// changes no status.
pub fn run_and_exit(elf: &Path, config: VmConfig, debug: &DebugOptions) -> ! {
    run_and_exit_when(elf, config, debug, || true)
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
    let vm = GuestImage::from_file(elf).and_then(|image| Vm::new(Arc::new(image), config));
    let mut vm = match vm {
        Ok(vm) => vm,
        Err(e) => host_error(e),
    };
    if !go() {
        std::process::exit(EXIT_HOST_ERROR)
    }
    // From here on this thread only runs the guest: confine it (fails closed). A core
    // dump is a file the host creates after the crash, which the filter forbids: with
    // `--core-dump` (a debugging session) the vCPU thread runs without its filter.
    if debug.core_dump.is_none()
        && let Err(e) = vm.confine_thread()
    {
        host_error(e)
    }
    match vm.run() {
        Ok(outcome) => {
            if let Some(report) =
                outcome.report_with_backtrace(vm.crash(), vm.image(), debug.panic_backtrace)
            {
                crate::eprint_line(&report);
            }
            if let (Some(path), Some(_)) = (&debug.core_dump, vm.crash())
                && let Err(e) = vm.write_core_dump(path, debug.core_dump_overwrite)
            {
                eprintln!(
                    "pvrun: warning: cannot write core dump {}: {e}",
                    path.display()
                );
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
