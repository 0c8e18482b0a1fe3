//! Command-line pieces shared by `pvrun` and `cargo pvrun`: option parsing helpers and
//! running a guest to a process exit status.

pub mod gateway;

use std::path::Path;
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
}

impl VmOptions {
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

/// Boots `elf` with `config`, prints the outcome's report (if any) on stderr, and exits
/// the process with the documented status. Host errors are one `pvrun: error:` line and
/// status 125.
pub fn run_and_exit(elf: &Path, config: VmConfig) -> ! {
    let vm = GuestImage::from_file(elf).and_then(|image| Vm::new(Arc::new(image), config));
    let mut vm = match vm {
        Ok(vm) => vm,
        Err(e) => host_error(e),
    };
    // From here on this thread only runs the guest: confine it (fails closed).
    if let Err(e) = vm.confine_thread() {
        host_error(e)
    }
    match vm.run() {
        Ok(outcome) => {
            if let Some(report) = outcome.report() {
                crate::eprint_line(&report);
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
