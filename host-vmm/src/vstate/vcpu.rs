//! The vCPU: every register access goes through here, through the `kvm_run` sync area
//! when KVM offers it (no extra ioctl per hypercall) and through ioctls otherwise.

use kvm_bindings::{Msrs, kvm_msr_entry, kvm_regs, kvm_run, kvm_sregs};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};

use super::kvm::CpuPolicy;
use crate::error::Error;

/// `IA32_TIME_STAMP_COUNTER`.
const MSR_TSC: u32 = 0x10;

/// One vCPU and how its registers are reached.
pub(crate) struct Vcpu {
    fd: VcpuFd,
    sync_regs: bool,
}

impl Vcpu {
    /// Wraps a new vCPU; with sync registers, asks KVM to share them at every exit.
    pub fn new(mut fd: VcpuFd, policy: &CpuPolicy) -> Vcpu {
        if policy.sync_regs {
            fd.set_sync_valid_reg(SyncReg::Register);
        }
        Vcpu {
            fd,
            sync_regs: policy.sync_regs,
        }
    }

    /// The KVM descriptor, for the one-time setup ioctls (CPUID, MSRs, vector state).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Enters the guest until the next exit.
    pub fn run(&mut self) -> Result<VcpuExit<'_>, kvm_ioctls::Error> {
        self.fd.run()
    }

    /// The shared `kvm_run` area (for another thread to set `immediate_exit`).
    pub fn kvm_run_ptr(&mut self) -> *mut kvm_run {
        self.fd.get_kvm_run() as *mut kvm_run
    }

    /// Sets `kvm_run.immediate_exit`.
    pub fn set_immediate_exit(&mut self, v: u8) {
        self.fd.set_kvm_immediate_exit(v);
    }

    /// `rdi`: the hypercall argument address.
    pub fn rdi(&mut self) -> Result<u64, Error> {
        if self.sync_regs {
            Ok(self.fd.sync_regs_mut().regs.rdi)
        } else {
            Ok(self.regs()?.rdi)
        }
    }

    /// Sets `rax` (a hypercall's answer) for the next entry.
    pub fn set_rax(&mut self, v: u64) -> Result<(), Error> {
        if self.sync_regs {
            self.fd.sync_regs_mut().regs.rax = v;
            self.fd.set_sync_dirty_reg(SyncReg::Register);
            Ok(())
        } else {
            let mut regs = self.regs()?;
            regs.rax = v;
            self.fd
                .set_regs(&regs)
                .map_err(|e| Error::Kvm("KVM_SET_REGS", e))
        }
    }

    /// The general registers, read with an ioctl (exact at any exit).
    pub fn regs(&self) -> Result<kvm_regs, Error> {
        self.fd
            .get_regs()
            .map_err(|e| Error::Kvm("KVM_GET_REGS", e))
    }

    /// The system registers, read with an ioctl.
    pub fn sregs(&self) -> Result<kvm_sregs, Error> {
        self.fd
            .get_sregs()
            .map_err(|e| Error::Kvm("KVM_GET_SREGS", e))
    }

    /// Loads general and system registers for the next entry.
    pub fn load_regs(&mut self, regs: &kvm_regs, sregs: &kvm_sregs) -> Result<(), Error> {
        if self.sync_regs {
            let sync = self.fd.sync_regs_mut();
            sync.regs = *regs;
            sync.sregs = *sregs;
            self.fd.set_sync_dirty_reg(SyncReg::Register);
            self.fd.set_sync_dirty_reg(SyncReg::SystemRegister);
            Ok(())
        } else {
            self.fd
                .set_sregs(sregs)
                .map_err(|e| Error::Kvm("KVM_SET_SREGS", e))?;
            self.fd
                .set_regs(regs)
                .map_err(|e| Error::Kvm("KVM_SET_REGS", e))
        }
    }

    /// Fills the sync area with registers already loaded by ioctl, so an edit made before
    /// the first `KVM_RUN` (a call's `rax`) starts from the real values. The sync area is
    /// otherwise only filled by `KVM_RUN`.
    pub fn prime_sync_regs(&mut self, regs: &kvm_regs, sregs: &kvm_sregs) {
        if self.sync_regs {
            let sync = self.fd.sync_regs_mut();
            sync.regs = *regs;
            sync.sregs = *sregs;
        }
    }

    /// Lets KVM complete the instruction the vCPU exited at (it finishes an `out` on the
    /// next `KVM_RUN`) without running the guest: a `KVM_RUN` with `immediate_exit` set.
    pub fn finish_pending_exit(&mut self) -> Result<(), Error> {
        self.fd.set_kvm_immediate_exit(1);
        let r = self.fd.run().map(|_| ()).map_err(|e| e.errno());
        self.fd.set_kvm_immediate_exit(0);
        match r {
            Err(libc::EINTR) => Ok(()),
            Err(e) => Err(Error::Kvm("KVM_RUN", kvm_ioctls::Error::new(e))),
            Ok(()) => Err(Error::Layout(
                "the vCPU ran although immediate_exit was set".into(),
            )),
        }
    }

    /// The guest's TSC now.
    pub fn tsc(&self) -> Result<u64, Error> {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_TSC,
            ..Default::default()
        }])
        .map_err(|_| Error::Layout("MSR list".into()))?;
        self.fd
            .get_msrs(&mut msrs)
            .map_err(|e| Error::Kvm("KVM_GET_MSRS", e))?;
        Ok(msrs.as_slice()[0].data)
    }

    /// Sets the guest's TSC.
    pub fn set_tsc(&self, tsc: u64) -> Result<(), Error> {
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_TSC,
            data: tsc,
            ..Default::default()
        }])
        .map_err(|_| Error::Layout("MSR list".into()))?;
        self.fd
            .set_msrs(&msrs)
            .map_err(|e| Error::Kvm("KVM_SET_MSRS", e))?;
        Ok(())
    }

    /// The guest TSC frequency in Hz.
    pub fn tsc_hz(&self) -> Result<u64, Error> {
        Ok(self
            .fd
            .get_tsc_khz()
            .map_err(|e| Error::Kvm("KVM_GET_TSC_KHZ", e))? as u64
            * 1000)
    }
}

impl std::os::fd::AsRawFd for Vcpu {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}
