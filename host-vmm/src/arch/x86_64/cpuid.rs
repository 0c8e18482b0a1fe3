//! CPUID policy: what KVM and the host CPU support decides the guest's CPUID table, the
//! optional CR4 bits, the XSAVE state components, and the [`pvrun_abi::feature`] bits in
//! boot info. Decided once per process ([`CpuSetup`]).

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2};
use kvm_ioctls::{Kvm, VcpuFd};
use pvrun_abi::feature;
use x86_64::registers::control::Cr4Flags;
use x86_64::registers::xcontrol::XCr0Flags;

use crate::error::Error;

// CPUID bits the policy reads. The x86_64 crate has no CPUID types, so they are named
// here (leaf, register, bit).
/// Leaf 1 ECX: XSAVE/XRSTOR and XCR0.
const L1_ECX_XSAVE: u32 = 1 << 26;
/// Leaf 1 ECX: RDRAND.
const L1_ECX_RDRAND: u32 = 1 << 30;
/// Leaf 7.0 EBX: RDFSBASE and friends.
const L7_EBX_FSGSBASE: u32 = 1 << 0;
/// Leaf 7.0 EBX: supervisor-mode execution prevention.
const L7_EBX_SMEP: u32 = 1 << 7;
/// Leaf 7.0 EBX: RDSEED.
const L7_EBX_RDSEED: u32 = 1 << 18;
/// Leaf 7.0 ECX: user-mode instruction prevention.
const L7_ECX_UMIP: u32 = 1 << 2;
/// Leaf 0x8000_0007 EDX: the TSC runs at a constant rate in all states.
const LX7_EDX_INVARIANT_TSC: u32 = 1 << 8;

/// The XSAVE state components the guest may enable, as far as supported: x87, SSE, AVX,
/// and the three AVX-512 components.
const XCR0_ALLOWED: XCr0Flags = XCr0Flags::X87
    .union(XCr0Flags::SSE)
    .union(XCr0Flags::AVX)
    .union(XCr0Flags::OPMASK)
    .union(XCr0Flags::ZMM_HI256)
    .union(XCr0Flags::HI16_ZMM);

/// CPU facts the host decides once per process.
#[derive(Clone)]
pub struct CpuSetup {
    pub(super) cpuid: CpuId,
    pub(super) policy: Policy,
    /// [`pvrun_abi::feature`] bits for boot info.
    pub features: u64,
}

/// The choices the vCPU registers follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Policy {
    /// XSAVE is available, so CR4.OSXSAVE is set and XCR0 loaded.
    pub xsave: bool,
    /// The XSAVE components the guest gets beyond x87/SSE (empty without XSAVE).
    pub xcr0: XCr0Flags,
    /// Optional CR4 bits the CPU supports.
    pub cr4_extra: Cr4Flags,
    /// [`pvrun_abi::feature`] bits.
    pub features: u64,
}

/// The CPUID registers the policy reads.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Leaves {
    /// KVM's leaf 1 ECX.
    pub l1_ecx: u32,
    /// KVM's leaf 7.0 EBX.
    pub l7_ebx: u32,
    /// KVM's leaf 7.0 ECX.
    pub l7_ecx: u32,
    /// KVM's leaf 0xD.0 EAX (supported XCR0 bits, low half).
    pub ld_eax: u32,
    /// KVM's leaf 0x8000_0007 EDX, if KVM has that leaf.
    pub lx7_edx: Option<u32>,
    /// The host CPU's own leaf 1 ECX.
    pub host_l1_ecx: u32,
    /// The host CPU's own leaf 7.0 EBX.
    pub host_l7_ebx: u32,
    /// The host's own XCR0 (0 without OSXSAVE).
    pub host_xcr0: u64,
}

/// The host's XCR0, if the host OS enabled XSAVE (CPUID.1:ECX.OSXSAVE).
fn host_xcr0(host_l1_ecx: u32) -> u64 {
    #[target_feature(enable = "xsave")]
    fn xgetbv0() -> u64 {
        // SAFETY: only called when OSXSAVE is set, so `xgetbv` is allowed at CPL3.
        unsafe { std::arch::x86_64::_xgetbv(0) }
    }
    if host_l1_ecx & (1 << 27) != 0 {
        // SAFETY: OSXSAVE implies the CPU supports XSAVE (the target feature).
        unsafe { xgetbv0() }
    } else {
        0
    }
}

impl Policy {
    /// Decides the guest CPU configuration from what is supported.
    pub(super) fn new(l: &Leaves) -> Policy {
        let xsave = l.l1_ecx & L1_ECX_XSAVE != 0;
        let xcr0 = if xsave {
            XCr0Flags::from_bits_retain(u64::from(l.ld_eax)) & XCR0_ALLOWED
        } else {
            XCr0Flags::empty()
        };
        let mut cr4_extra = Cr4Flags::empty();
        // FSGSBASE: the guest may set its own FS/GS base.
        cr4_extra.set(Cr4Flags::FSGSBASE, l.l7_ebx & L7_EBX_FSGSBASE != 0);
        // SMEP: ring 0 never executes guest pages.
        cr4_extra.set(
            Cr4Flags::SUPERVISOR_MODE_EXECUTION_PROTECTION,
            l.l7_ebx & L7_EBX_SMEP != 0,
        );
        // UMIP: no sgdt/sidt/str from ring 3.
        cr4_extra.set(
            Cr4Flags::USER_MODE_INSTRUCTION_PREVENTION,
            l.l7_ecx & L7_ECX_UMIP != 0,
        );
        // rdrand/rdseed are unprivileged and run natively at CPL3 (on PVM hosts even where
        // KVM's supported CPUID omits them), so the host CPU's own CPUID decides.
        let mut features = 0;
        if l.host_l1_ecx & L1_ECX_RDRAND != 0 {
            features |= feature::RDRAND;
        }
        if l.host_l7_ebx & L7_EBX_RDSEED != 0 {
            features |= feature::RDSEED;
        }
        if l.lx7_edx
            .is_some_and(|edx| edx & LX7_EDX_INVARIANT_TSC != 0)
        {
            features |= feature::INVARIANT_TSC;
        }
        // On PVM hosts KVM reports no XSAVE, yet ring-3 guest code runs on the host CPU
        // with the host's XCR0, and AVX works: report the state the guest really has.
        let effective = if xsave {
            xcr0
        } else {
            XCr0Flags::from_bits_retain(l.host_xcr0) & XCR0_ALLOWED
        };
        if effective.contains(XCr0Flags::AVX) {
            features |= feature::AVX;
        }
        Policy {
            xsave,
            xcr0,
            cr4_extra,
            features,
        }
    }
}

fn leaf(cpuid: &CpuId, function: u32, index: u32) -> Option<kvm_cpuid_entry2> {
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
        let (n1, n7) = (
            std::arch::x86_64::__cpuid(1),
            std::arch::x86_64::__cpuid_count(7, 0),
        );
        let policy = Policy::new(&Leaves {
            l1_ecx: l1.ecx,
            l7_ebx: l7.ebx,
            l7_ecx: l7.ecx,
            ld_eax: ld.eax,
            lx7_edx: leaf(&cpuid, 0x8000_0007, 0).map(|l| l.edx),
            host_l1_ecx: n1.ecx,
            host_l7_ebx: n7.ebx,
            host_xcr0: host_xcr0(n1.ecx),
        });
        Ok(CpuSetup {
            cpuid,
            policy,
            features: policy.features,
        })
    }

    /// Gives a fresh vCPU its CPUID table (the part of [`CpuSetup::restore_vcpu`] that
    /// can be done ahead of time).
    pub fn set_cpuid(&self, vcpu: &VcpuFd) -> Result<(), Error> {
        vcpu.set_cpuid2(&self.cpuid)
            .map_err(|e| Error::Kvm("KVM_SET_CPUID2", e))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// 512 combinations of every bit the policy reads (and some it must ignore).
    pub(in super::super) fn sample_leaves() -> Vec<Leaves> {
        (0u32..512)
            .map(|m| {
                let b = |i: u32, val: u32| if m & (1 << i) != 0 { val } else { 0 };
                Leaves {
                    l1_ecx: b(0, 1 << 26) | 0x0040_0000,
                    l7_ebx: b(1, 1) | b(2, 1 << 7) | 0x10,
                    l7_ecx: b(3, 1 << 2) | 0x1,
                    ld_eax: if m & (1 << 4) != 0 { 0x2ff } else { 0x3 },
                    host_l1_ecx: b(5, 1 << 30) | 0x8,
                    host_l7_ebx: b(6, 1 << 18) | 0x4,
                    host_xcr0: 0,
                    lx7_edx: match (m >> 7) & 3 {
                        0 => None,
                        1 => Some(0),
                        2 => Some(1 << 8),
                        _ => Some(0xffff_ffff),
                    },
                }
            })
            .collect()
    }

    #[test]
    fn policy_follows_each_bit() {
        let all = Policy::new(&Leaves {
            l1_ecx: !0,
            l7_ebx: !0,
            l7_ecx: !0,
            ld_eax: !0,
            lx7_edx: Some(!0),
            host_l1_ecx: !0,
            host_l7_ebx: !0,
            host_xcr0: 0,
        });
        assert!(all.xsave);
        assert_eq!(all.xcr0.bits(), 0xe7);
        assert_eq!(all.cr4_extra.bits(), (1 << 16) | (1 << 20) | (1 << 11));
        assert_eq!(
            all.features,
            feature::RDRAND | feature::RDSEED | feature::INVARIANT_TSC | feature::AVX
        );
        let none = Policy::new(&Leaves {
            ld_eax: !0,
            ..Leaves::default()
        });
        assert!(!none.xsave);
        assert!(none.xcr0.is_empty(), "no XCR0 without XSAVE");
        assert!(none.cr4_extra.is_empty());
        assert_eq!(none.features, 0);
    }
}

#[cfg(test)]
mod avx_tests {
    use super::*;

    #[test]
    fn avx_is_reported_where_the_guest_really_has_it() {
        // A PVM host: KVM offers no XSAVE, but the host's XCR0 has AVX (and AVX-512).
        let pvm = Policy::new(&Leaves {
            host_xcr0: 0xe7,
            ..Leaves::default()
        });
        assert!(pvm.xcr0.is_empty(), "XCR0 is not set through KVM there");
        assert_ne!(pvm.features & feature::AVX, 0);
        // No AVX anywhere: no bit.
        let none = Policy::new(&Leaves {
            host_xcr0: 0x3,
            ..Leaves::default()
        });
        assert_eq!(none.features & feature::AVX, 0);
    }
}
