//! Ring-0 state the host owns: GDT, TSS with the I/O permission bitmap, IDT, the ring-0
//! exception stubs, and the vCPU registers that enter the guest at CPL3.
//!
//! The guest never runs ring-0 code of its own. Its only way into ring 0 is an exception,
//! which lands in a 10-12 byte stub (SSE-free, as ring-0 code is emulated on PVM hosts) that
//! pushes the vector and reports it to the host with one `out` to [`EXCEPTION_PORT`].

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd};
use pvrun_abi::{EXCEPTION_PORT, HYPERCALL_PORT_BASE, HYPERCALL_PORT_COUNT, feature};
use vm_memory::{Bytes, GuestAddress};

use crate::error::Error;
use crate::layout::{GDT_ADDR, IDT_ADDR, R0_STACK_TOP, STUB_SIZE, STUBS_ADDR, TSS_ADDR};
use crate::memory::GuestRam;

/// Kernel code selector.
pub const KERNEL_CS: u16 = 0x08;
/// User data selector (RPL 3).
pub const USER_DS: u16 = 0x1b;
/// User code selector (RPL 3).
pub const USER_CS: u16 = 0x23;
/// TSS selector.
pub const TSS_SEL: u16 = 0x28;

const GDT: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff, // 0x08 kernel code, 64-bit, DPL0
    0x00cf_9300_0000_ffff, // 0x10 kernel data, DPL0
    0x00cf_f300_0000_ffff, // 0x18 user data, DPL3
    0x00af_fb00_0000_ffff, // 0x20 user code, 64-bit, DPL3
];

/// Exception vectors that push an error code.
const HAS_ERROR_CODE: [u8; 10] = [8, 10, 11, 12, 13, 14, 17, 21, 29, 30];
/// Number of IDT entries (the exception vectors).
pub const IDT_ENTRIES: u64 = 32;

/// Bytes of I/O permission bitmap: enough to cover every port up to the exception port.
const IOPB_BYTES: u64 = (EXCEPTION_PORT as u64 + 1).div_ceil(8);
/// Offset of the I/O bitmap inside the TSS (right after the 104-byte TSS proper).
const IOPB_OFFSET: u64 = 0x68;
/// TSS limit: the TSS, the bitmap and the trailing 0xFF byte.
const TSS_LIMIT: u64 = IOPB_OFFSET + IOPB_BYTES;

/// The ring-0 structures as bytes, written into guest memory at boot.
pub fn write_system_tables(ram: &GuestRam) -> Result<(), Error> {
    let mem = ram.mem();
    let w = |bytes: &[u8], at: u64| {
        mem.write_slice(bytes, GuestAddress(at))
            .map_err(|e| Error::Layout(format!("cannot write system tables: {e}")))
    };

    // GDT: flat segments plus a 16-byte 64-bit TSS descriptor (type 0xB: busy, as loaded).
    let mut gdt: Vec<u8> = GDT.iter().flat_map(|d| d.to_le_bytes()).collect();
    let base = TSS_ADDR;
    let lo = (TSS_LIMIT & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x8b << 40)
        | (((TSS_LIMIT >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    let hi = base >> 32;
    gdt.extend_from_slice(&lo.to_le_bytes());
    gdt.extend_from_slice(&hi.to_le_bytes());
    w(&gdt, GDT_ADDR)?;

    // TSS: RSP0 and IST1 point at the ring-0 stack; the I/O bitmap denies every port except
    // the hypercall window (IOPL is ignored at CPL3 on PVM, and this is stricter anyway).
    let mut tss = vec![0u8; (TSS_LIMIT + 1) as usize];
    tss[4..12].copy_from_slice(&R0_STACK_TOP.to_le_bytes()); // RSP0
    tss[36..44].copy_from_slice(&R0_STACK_TOP.to_le_bytes()); // IST1
    tss[102..104].copy_from_slice(&(IOPB_OFFSET as u16).to_le_bytes());
    for b in &mut tss[IOPB_OFFSET as usize..] {
        *b = 0xff;
    }
    for port in HYPERCALL_PORT_BASE..HYPERCALL_PORT_BASE + HYPERCALL_PORT_COUNT {
        let bit = port as usize;
        tss[IOPB_OFFSET as usize + bit / 8] &= !(1 << (bit % 8));
    }
    w(&tss, TSS_ADDR)?;

    // Exception stubs: [push 0] ; push vector ; mov dx, EXCEPTION_PORT ; out dx, al ; hlt ; jmp hlt
    let mut stubs = vec![0xccu8; (IDT_ENTRIES * STUB_SIZE) as usize];
    let mut idt = Vec::with_capacity((IDT_ENTRIES * 16) as usize);
    for v in 0..IDT_ENTRIES {
        let at = (v * STUB_SIZE) as usize;
        let mut code = Vec::with_capacity(16);
        if !HAS_ERROR_CODE.contains(&(v as u8)) {
            code.extend_from_slice(&[0x6a, 0x00]);
        }
        let [plo, phi] = EXCEPTION_PORT.to_le_bytes();
        code.extend_from_slice(&[0x6a, v as u8, 0x66, 0xba, plo, phi, 0xee, 0xf4, 0xeb, 0xfd]);
        stubs[at..at + code.len()].copy_from_slice(&code);

        // 64-bit interrupt gate, DPL0 (so `int n` from ring 3 is a #GP), IST1.
        let off = STUBS_ADDR + v * STUB_SIZE;
        let lo = (off & 0xffff)
            | ((KERNEL_CS as u64) << 16)
            | (1 << 32)
            | (0x8e << 40)
            | (((off >> 16) & 0xffff) << 48);
        idt.extend_from_slice(&lo.to_le_bytes());
        idt.extend_from_slice(&(off >> 32).to_le_bytes());
    }
    w(&stubs, STUBS_ADDR)?;
    w(&idt, IDT_ADDR)?;
    Ok(())
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
            xsave: vcpu.get_xsave().ok().map(Box::new),
        })
    }

    /// Loads the FPU and vector state into a vCPU (the whole XSAVE area when captured).
    pub fn load_extended(&self, vcpu: &VcpuFd) -> Result<(), Error> {
        if let Some(x) = &self.xsave {
            // SAFETY: the area came from KVM_GET_XSAVE on a vCPU of the same host.
            if unsafe { vcpu.set_xsave(x) }.is_ok() {
                return Ok(());
            }
        }
        vcpu.set_fpu(&self.fpu)
            .map_err(|e| Error::Kvm("KVM_SET_FPU", e))
    }
}

/// CPU facts the host decides once per process.
#[derive(Clone)]
pub struct CpuSetup {
    cpuid: CpuId,
    xsave: bool,
    xcr0: u64,
    cr4_extra: u64,
    /// [`pvrun_abi::feature`] bits for boot info.
    pub features: u64,
}

fn leaf(cpuid: &CpuId, function: u32, index: u32) -> Option<kvm_bindings::kvm_cpuid_entry2> {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == function && e.index == index)
        .copied()
}

impl CpuSetup {
    /// Reads what KVM supports and chooses the guest's CPU configuration.
    pub fn new(kvm: &Kvm) -> Result<Self, Error> {
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let l1 = leaf(&cpuid, 1, 0).unwrap_or_default();
        let l7 = leaf(&cpuid, 7, 0).unwrap_or_default();
        let ld = leaf(&cpuid, 0xd, 0).unwrap_or_default();
        let xsave = l1.ecx & (1 << 26) != 0;
        // x87, SSE, AVX, and the AVX-512 state components, as far as supported.
        let xcr0 = if xsave { (ld.eax as u64) & 0xe7 } else { 0 };
        let mut cr4_extra = 0;
        if l7.ebx & (1 << 0) != 0 {
            cr4_extra |= 1 << 16; // FSGSBASE: the guest may set its own FS/GS base
        }
        if l7.ebx & (1 << 7) != 0 {
            cr4_extra |= 1 << 20; // SMEP: ring 0 never executes guest pages
        }
        if l7.ecx & (1 << 2) != 0 {
            cr4_extra |= 1 << 11; // UMIP: no sgdt/sidt/str from ring 3
        }
        // rdrand/rdseed are unprivileged and run natively at CPL3 (on PVM hosts even where
        // KVM's supported CPUID omits them), so the host CPU's own CPUID decides.
        let (n1, n7) = (
            std::arch::x86_64::__cpuid(1),
            std::arch::x86_64::__cpuid_count(7, 0),
        );
        let mut features = 0;
        if n1.ecx & (1 << 30) != 0 {
            features |= feature::RDRAND;
        }
        if n7.ebx & (1 << 18) != 0 {
            features |= feature::RDSEED;
        }
        if leaf(&cpuid, 0x8000_0007, 0).is_some_and(|l| l.edx & (1 << 8) != 0) {
            features |= feature::INVARIANT_TSC;
        }
        if xcr0 & 0x4 != 0 {
            features |= feature::AVX;
        }
        Ok(CpuSetup {
            cpuid,
            xsave,
            xcr0,
            cr4_extra,
            features,
        })
    }

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
        vcpu.set_cpuid2(&self.cpuid)
            .map_err(|e| Error::Kvm("KVM_SET_CPUID2", e))?;
        let mut sregs = vcpu
            .get_sregs()
            .map_err(|e| Error::Kvm("KVM_GET_SREGS", e))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: USER_CS,
            type_: 0xb,
            present: 1,
            dpl: 3,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let data = kvm_segment {
            selector: USER_DS,
            type_: 0x3,
            db: 1,
            l: 0,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = kvm_segment {
            base: TSS_ADDR,
            limit: TSS_LIMIT as u32,
            selector: TSS_SEL,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 0,
            s: 0,
            l: 0,
            g: 0,
            ..Default::default()
        };
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = (GDT.len() * 8 + 16 - 1) as u16;
        sregs.idt.base = IDT_ADDR;
        sregs.idt.limit = (IDT_ENTRIES * 16 - 1) as u16;
        // PE | MP | ET | NE | WP | PG
        sregs.cr0 = 1 | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31);
        sregs.cr3 = cr3;
        // PAE | PGE | OSFXSR | OSXMMEXCPT (+ OSXSAVE) (+ FSGSBASE/SMEP/UMIP if supported)
        let mut cr4 = (1 << 5) | (1 << 7) | (1 << 9) | (1 << 10) | self.cr4_extra;
        if self.xsave {
            cr4 |= 1 << 18;
        }
        sregs.cr4 = cr4;
        // LME | LMA | NXE
        sregs.efer = (1 << 8) | (1 << 10) | (1 << 11);
        if vcpu.set_sregs(&sregs).is_err() {
            // Some hosts refuse optional CR4 bits; retry with the architectural minimum.
            sregs.cr4 = (1 << 5) | (1 << 9) | (1 << 10) | if self.xsave { 1 << 18 } else { 0 };
            vcpu.set_sregs(&sregs)
                .map_err(|e| Error::Kvm("KVM_SET_SREGS", e))?;
        }
        self.set_xcr0(vcpu)?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        vcpu.set_fpu(&fpu)
            .map_err(|e| Error::Kvm("KVM_SET_FPU", e))?;
        let regs = kvm_regs {
            rip: entry,
            rsp,
            rdi: arg,
            rflags: 0x2, // IF=0, IOPL=0: cli/sti/hlt and port I/O outside the bitmap #GP
            ..Default::default()
        };
        vcpu.set_regs(&regs)
            .map_err(|e| Error::Kvm("KVM_SET_REGS", e))?;
        Ok(())
    }

    /// Puts a fresh vCPU into a state captured from another (a snapshot).
    pub fn restore_vcpu(&self, vcpu: &VcpuFd, state: &VcpuState) -> Result<(), Error> {
        self.set_cpuid(vcpu)?;
        self.load_state(vcpu, state)
    }

    /// Gives a fresh vCPU its CPUID table (the part of [`CpuSetup::restore_vcpu`] that
    /// can be done ahead of time).
    pub fn set_cpuid(&self, vcpu: &VcpuFd) -> Result<(), Error> {
        vcpu.set_cpuid2(&self.cpuid)
            .map_err(|e| Error::Kvm("KVM_SET_CPUID2", e))
    }

    /// Loads captured registers into a vCPU that has its CPUID table.
    pub fn load_state(&self, vcpu: &VcpuFd, state: &VcpuState) -> Result<(), Error> {
        vcpu.set_sregs(&state.sregs)
            .map_err(|e| Error::Kvm("KVM_SET_SREGS", e))?;
        self.set_xcr0(vcpu)?;
        state.load_extended(vcpu)?;
        vcpu.set_regs(&state.regs)
            .map_err(|e| Error::Kvm("KVM_SET_REGS", e))?;
        Ok(())
    }

    fn set_xcr0(&self, vcpu: &VcpuFd) -> Result<(), Error> {
        if self.xsave && self.xcr0 != 0 {
            let mut xcrs = kvm_xcrs {
                nr_xcrs: 1,
                ..Default::default()
            };
            xcrs.xcrs[0].xcr = 0;
            xcrs.xcrs[0].value = self.xcr0 | 0x3;
            vcpu.set_xcrs(&xcrs)
                .map_err(|e| Error::Kvm("KVM_SET_XCRS", e))?;
        }
        Ok(())
    }
}
