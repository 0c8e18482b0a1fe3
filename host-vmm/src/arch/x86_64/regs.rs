//! vCPU registers: the state that enters the guest at CPL3 in 64-bit mode (segments,
//! CR0/CR4/EFER, RFLAGS, FPU, XCR0), and the state a snapshot captures and restores
//! ([`VcpuState`]).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave};
use kvm_ioctls::VcpuFd;
use x86_64::registers::control::{Cr0Flags, Cr4Flags};
use x86_64::registers::model_specific::EferFlags;
use x86_64::registers::mxcsr::MxCsr;
use x86_64::registers::rflags::RFlags;
use x86_64::registers::xcontrol::XCr0Flags;

use super::cpuid::{CpuSetup, Policy};
use super::gdt::{self, GDT_LIMIT, TSS_SEL, USER_CS_SEL, USER_DS};
use super::interrupts::IDT_LIMIT;
use crate::error::Error;
use crate::layout::{GDT_ADDR, IDT_ADDR};

/// CR0: protected mode, paging, write protection for ring 0, native x87 errors.
const CR0: Cr0Flags = Cr0Flags::PROTECTED_MODE_ENABLE
    .union(Cr0Flags::MONITOR_COPROCESSOR)
    .union(Cr0Flags::EXTENSION_TYPE)
    .union(Cr0Flags::NUMERIC_ERROR)
    .union(Cr0Flags::WRITE_PROTECT)
    .union(Cr0Flags::PAGING);
/// CR4 every host must accept: PAE paging and SSE (FXSAVE and SIMD exceptions).
const CR4_MINIMUM: Cr4Flags = Cr4Flags::PHYSICAL_ADDRESS_EXTENSION
    .union(Cr4Flags::OSFXSR)
    .union(Cr4Flags::OSXMMEXCPT_ENABLE);
/// EFER: 64-bit mode, and NX so the page tables can forbid execution.
const EFER: EferFlags = EferFlags::LONG_MODE_ENABLE
    .union(EferFlags::LONG_MODE_ACTIVE)
    .union(EferFlags::NO_EXECUTE_ENABLE);
/// RFLAGS at entry: IF=0 and IOPL=0, so `cli`/`sti`/`hlt` and port I/O outside the TSS
/// bitmap #GP. Bit 1 is reserved and always one; `RFlags` has no name for it.
const ENTRY_RFLAGS: RFlags = RFlags::from_bits_retain(1 << 1);
/// x87 control word after `fninit`: all exceptions masked, 64-bit precision, round to
/// nearest (the x86_64 crate has no type for it).
const FCW_DEFAULT: u16 = 0x37f;

impl Policy {
    /// CR4 with everything this CPU supports.
    fn cr4(&self) -> Cr4Flags {
        let mut cr4 = CR4_MINIMUM | Cr4Flags::PAGE_GLOBAL | self.cr4_extra;
        cr4.set(Cr4Flags::OSXSAVE, self.xsave);
        cr4
    }

    /// CR4 for hosts that refuse optional bits: the architectural minimum.
    fn cr4_fallback(&self) -> Cr4Flags {
        let mut cr4 = CR4_MINIMUM;
        cr4.set(Cr4Flags::OSXSAVE, self.xsave);
        cr4
    }

    /// The system registers that enter the guest at CPL3, paging through `cr3`, on top of
    /// the vCPU's current `sregs`.
    fn entry_sregs(&self, mut sregs: kvm_sregs, cr3: u64) -> kvm_sregs {
        let data = gdt::kvm_segment(USER_DS);
        sregs.cs = gdt::kvm_segment(USER_CS_SEL);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = gdt::kvm_segment(TSS_SEL);
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = GDT_LIMIT;
        sregs.idt.base = IDT_ADDR;
        sregs.idt.limit = IDT_LIMIT;
        sregs.cr0 = CR0.bits();
        sregs.cr3 = cr3;
        sregs.cr4 = self.cr4().bits();
        sregs.efer = EFER.bits();
        sregs
    }

    /// XCR0 to load, if any: x87 and SSE plus the chosen components.
    fn xcr0(&self) -> Option<XCr0Flags> {
        (self.xsave && !self.xcr0.is_empty()).then(|| self.xcr0 | XCr0Flags::X87 | XCr0Flags::SSE)
    }
}

/// The FPU state at entry.
fn entry_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: FCW_DEFAULT,
        mxcsr: MxCsr::default().bits(),
        ..Default::default()
    }
}

/// The general registers at entry.
fn entry_regs(entry: u64, rsp: u64, arg: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp,
        rdi: arg,
        rflags: ENTRY_RFLAGS.bits(),
        ..Default::default()
    }
}

/// The vCPU state a snapshot keeps: general registers, system registers, FPU/SSE state.
pub struct VcpuState {
    /// General registers (RIP at the instruction that exited).
    pub regs: kvm_regs,
    /// Segments, control registers, descriptor tables.
    pub sregs: kvm_sregs,
    /// x87/SSE state and MXCSR.
    pub fpu: kvm_fpu,
    /// The whole extended state (x87, SSE, AVX, AVX-512, ...) where KVM offers
    /// `KVM_GET_XSAVE`: restoring only `fpu` would let vector registers beyond SSE carry
    /// data from one call into the next.
    pub xsave: Option<Box<kvm_xsave>>,
    /// Pending exceptions, NMI and interrupt-shadow state, where KVM offers it: a call
    /// stopped in the middle of delivering an exception must not leave it pending.
    pub events: Option<kvm_vcpu_events>,
}

/// Whether a KVM error means "this KVM does not have that call" (fallback is fine) rather
/// than a failure (which must be loud).
fn unsupported(e: &kvm_ioctls::Error) -> bool {
    matches!(
        e.errno(),
        libc::EINVAL | libc::ENOTTY | libc::ENOSYS | libc::EOPNOTSUPP
    )
}

impl VcpuState {
    /// Reads the state of a vCPU.
    pub fn capture(vcpu: &VcpuFd) -> Result<Self, Error> {
        Ok(VcpuState {
            regs: vcpu.get_regs().map_err(|e| Error::Kvm("KVM_GET_REGS", e))?,
            sregs: vcpu
                .get_sregs()
                .map_err(|e| Error::Kvm("KVM_GET_SREGS", e))?,
            fpu: vcpu.get_fpu().map_err(|e| Error::Kvm("KVM_GET_FPU", e))?,
            // Without KVM_GET_XSAVE the guest has no state beyond x87/SSE (KVM enables
            // none), so the FPU area is all there is; any other failure is an error,
            // never a silent fallback that would let YMM/ZMM registers carry over.
            xsave: match vcpu.get_xsave() {
                Ok(x) => Some(Box::new(x)),
                Err(e) if unsupported(&e) => None,
                Err(e) => return Err(Error::Kvm("KVM_GET_XSAVE", e)),
            },
            events: match vcpu.get_vcpu_events() {
                Ok(ev) => Some(ev),
                Err(e) if unsupported(&e) => None,
                Err(e) => return Err(Error::Kvm("KVM_GET_VCPU_EVENTS", e)),
            },
        })
    }

    /// Loads the FPU and vector state into a vCPU (the whole XSAVE area when captured),
    /// and the vCPU events with `events`. Fails loudly if any cannot be loaded.
    pub fn load_extended(&self, vcpu: &VcpuFd, events: bool) -> Result<(), Error> {
        if events && let Some(ev) = &self.events {
            vcpu.set_vcpu_events(ev)
                .map_err(|e| Error::Kvm("KVM_SET_VCPU_EVENTS", e))?;
        }
        match &self.xsave {
            // SAFETY: the area came from KVM_GET_XSAVE on a vCPU of the same host.
            Some(x) => unsafe { vcpu.set_xsave(x) }.map_err(|e| Error::Kvm("KVM_SET_XSAVE", e)),
            None => vcpu
                .set_fpu(&self.fpu)
                .map_err(|e| Error::Kvm("KVM_SET_FPU", e)),
        }
    }
}

impl CpuSetup {
    /// Puts a fresh vCPU into 64-bit mode at CPL3 at `entry` with stack `rsp` and `rdi` =
    /// `arg`, paging through `cr3`.
    pub fn setup_vcpu(
        &self,
        vcpu: &VcpuFd,
        cr3: u64,
        entry: u64,
        rsp: u64,
        arg: u64,
    ) -> Result<(), Error> {
        self.set_cpuid(vcpu)?;
        let sregs = vcpu
            .get_sregs()
            .map_err(|e| Error::Kvm("KVM_GET_SREGS", e))?;
        let mut sregs = self.policy.entry_sregs(sregs, cr3);
        if vcpu.set_sregs(&sregs).is_err() {
            // Some hosts refuse optional CR4 bits; retry with the architectural minimum.
            sregs.cr4 = self.policy.cr4_fallback().bits();
            vcpu.set_sregs(&sregs)
                .map_err(|e| Error::Kvm("KVM_SET_SREGS", e))?;
        }
        self.set_xcr0(vcpu)?;
        vcpu.set_fpu(&entry_fpu())
            .map_err(|e| Error::Kvm("KVM_SET_FPU", e))?;
        vcpu.set_regs(&entry_regs(entry, rsp, arg))
            .map_err(|e| Error::Kvm("KVM_SET_REGS", e))?;
        Ok(())
    }

    /// Puts a fresh vCPU into a state captured from another (a snapshot).
    pub fn restore_vcpu(&self, vcpu: &VcpuFd, state: &VcpuState) -> Result<(), Error> {
        self.set_cpuid(vcpu)?;
        self.load_state(vcpu, state)
    }

    /// Loads captured registers into a vCPU that has its CPUID table.
    pub fn load_state(&self, vcpu: &VcpuFd, state: &VcpuState) -> Result<(), Error> {
        vcpu.set_sregs(&state.sregs)
            .map_err(|e| Error::Kvm("KVM_SET_SREGS", e))?;
        self.set_xcr0(vcpu)?;
        state.load_extended(vcpu, true)?;
        vcpu.set_regs(&state.regs)
            .map_err(|e| Error::Kvm("KVM_SET_REGS", e))?;
        Ok(())
    }

    fn set_xcr0(&self, vcpu: &VcpuFd) -> Result<(), Error> {
        if let Some(xcr0) = self.policy.xcr0() {
            let mut xcrs = kvm_xcrs {
                nr_xcrs: 1,
                ..Default::default()
            };
            xcrs.xcrs[0].xcr = 0;
            xcrs.xcrs[0].value = xcr0.bits();
            vcpu.set_xcrs(&xcrs)
                .map_err(|e| Error::Kvm("KVM_SET_XCRS", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::cpuid::tests::sample_leaves;
    use sha2::{Digest, Sha256};

    #[test]
    fn policy_and_entry_sregs_are_the_old_ones() {
        // Captured from the code this module replaced: for each sample, the policy
        // (xsave, xcr0, extra CR4 bits, features), then the entry sregs (from default
        // sregs, CR3 0x10_0000) and the fallback CR4.
        let mut h = Sha256::new();
        for l in sample_leaves() {
            let p = Policy::new(&l);
            let r = (p.xsave, p.xcr0.bits(), p.cr4_extra.bits(), p.features);
            h.update(format!("{r:?}"));
            let s = p.entry_sregs(kvm_sregs::default(), 0x10_0000);
            h.update(format!("{s:?}{}", p.cr4_fallback().bits()));
        }
        assert_eq!(
            format!("{:x}", h.finalize()),
            "026c20985cdbda2ce86135e4d0d4e6451dc9aeb072ca4a81ebcffaf92db6946c"
        );
    }

    #[test]
    fn entry_registers_are_the_old_values() {
        let p = Policy {
            xsave: true,
            xcr0: XCr0Flags::AVX,
            cr4_extra: Cr4Flags::FSGSBASE,
            features: 0,
        };
        let s = p.entry_sregs(kvm_sregs::default(), 0x10_0000);
        assert_eq!(s.cr0, 0x8001_0033);
        assert_eq!(s.cr4, 0x5_06a0);
        assert_eq!(p.cr4_fallback().bits(), 0x4_0620);
        assert_eq!(s.efer, 0xd00);
        assert_eq!((s.gdt.base, s.gdt.limit), (GDT_ADDR, 55));
        assert_eq!((s.idt.base, s.idt.limit), (IDT_ADDR, 511));
        assert_eq!(
            (s.cs.selector, s.ss.selector, s.tr.selector),
            (0x23, 0x1b, 0x28)
        );
        assert_eq!(p.xcr0().map(|x| x.bits()), Some(0x7));
        let fpu = entry_fpu();
        assert_eq!((fpu.fcw, fpu.mxcsr), (0x37f, 0x1f80));
        let r = entry_regs(0x20_1000, 0x400_0000, 0x1_0000);
        assert_eq!(
            (r.rip, r.rsp, r.rdi, r.rflags),
            (0x20_1000, 0x400_0000, 0x1_0000, 0x2)
        );
        let flags = RFlags::from_bits_retain(r.rflags);
        assert!(!flags.intersects(RFlags::INTERRUPT_FLAG | RFlags::IOPL_HIGH | RFlags::IOPL_LOW));
    }
}
