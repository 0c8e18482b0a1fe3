//! The process-wide KVM handle and CPU policy, opened once with a clear error.

use std::sync::OnceLock;

use kvm_ioctls::{Cap, Kvm};

use crate::arch::CpuSetup;
use crate::error::Error;

static KVM: OnceLock<Kvm> = OnceLock::new();
static CPU: OnceLock<CpuPolicy> = OnceLock::new();

/// What every vCPU of this process gets: the CPU setup (CPUID, features) and whether KVM
/// shares registers through the `kvm_run` sync area.
pub(crate) struct CpuPolicy {
    /// CPUID table and feature bits.
    pub setup: CpuSetup,
    /// `KVM_CAP_SYNC_REGS`: registers travel in `kvm_run` instead of extra ioctls.
    pub sync_regs: bool,
}

/// The process-wide KVM handle, opened on first use with a clear error. The device is
/// `/dev/kvm`, or the path in `PVRUN_KVM_DEVICE` (for tests of the error paths).
pub fn kvm() -> Result<&'static Kvm, Error> {
    if let Some(k) = KVM.get() {
        return Ok(k);
    }
    let path = std::env::var("PVRUN_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".into());
    let cpath = std::ffi::CString::new(path.clone())
        .map_err(|_| Error::KvmOpen(path.clone(), std::io::ErrorKind::InvalidInput.into()))?;
    let k = Kvm::new_with_path(cpath).map_err(|e| match e.errno() {
        libc::ENOENT => Error::NoKvm(path.clone()),
        libc::EACCES | libc::EPERM => Error::KvmPermission(path.clone()),
        _ => Error::KvmOpen(path.clone(), std::io::Error::from_raw_os_error(e.errno())),
    })?;
    if k.get_api_version() != 12 {
        return Err(Error::KvmOpen(
            path,
            std::io::Error::other("it is not a KVM device (KVM_GET_API_VERSION did not answer 12)"),
        ));
    }
    Ok(KVM.get_or_init(|| k))
}

/// The CPU policy, probed on first use (~0.3 ms on PVM hosts).
pub(crate) fn cpu_policy(kvm: &Kvm) -> Result<&'static CpuPolicy, Error> {
    if let Some(c) = CPU.get() {
        return Ok(c);
    }
    let setup = CpuSetup::new(kvm)?;
    let sync_regs = kvm.check_extension(Cap::SyncRegs);
    Ok(CPU.get_or_init(|| CpuPolicy { setup, sync_regs }))
}

/// Whether the CPU policy has been probed already (so a VM need not probe it in parallel).
pub(crate) fn cpu_policy_ready() -> bool {
    CPU.get().is_some()
}
