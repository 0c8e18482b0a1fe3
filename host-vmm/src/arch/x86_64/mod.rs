//! x86-64: everything the host sets up in ring 0 before the guest's first instruction,
//! and the vCPU state that enters it at CPL3.
//!
//! | module | its job |
//! |---|---|
//! | [`gdt`] | GDT, TSS with the I/O permission bitmap, their `kvm_segment` views |
//! | [`interrupts`] | IDT and the ring-0 exception stubs |
//! | [`regs`] | entry registers (segments, CR0/CR4/EFER, RFLAGS, FPU, XCR0), snapshots |
//! | [`cpuid`] | CPUID policy: the guest's CPUID table, optional CR4 bits, features |
//! | [`paging`] | page tables from the guest memory map |
//!
//! Typed with the `x86_64` crate's structures and flags (its `instructions` feature off:
//! the host executes none of them).

pub(crate) mod cpuid;
pub(crate) mod gdt;
pub(crate) mod interrupts;
pub(crate) mod paging;
pub(crate) mod regs;

use vm_memory::{Bytes, GuestAddress};

use crate::error::Error;
use crate::layout::{GDT_ADDR, IDT_ADDR, STUBS_ADDR, TSS_ADDR};
use crate::memory::GuestRam;

pub(crate) use cpuid::CpuSetup;
pub(crate) use gdt::USER_CS;
pub(crate) use regs::VcpuState;

/// Writes the ring-0 structures into guest memory at boot: GDT, TSS and I/O bitmap, IDT,
/// exception stubs.
pub fn write_system_tables(ram: &GuestRam) -> Result<(), Error> {
    let mem = ram.mem();
    let w = |bytes: &[u8], at: u64| {
        mem.write_slice(bytes, GuestAddress(at))
            .map_err(|e| Error::Layout(format!("cannot write system tables: {e}")))
    };
    w(&gdt::gdt_bytes(), GDT_ADDR)?;
    w(&gdt::tss_bytes(), TSS_ADDR)?;
    w(&interrupts::stubs_bytes(), STUBS_ADDR)?;
    w(&interrupts::idt_bytes(), IDT_ADDR)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn system_tables_in_guest_memory_are_the_old_bytes() {
        // SHA-256 of each table's page after the old `write_system_tables`, captured
        // before it was replaced.
        let ram = GuestRam::new(8 << 20).unwrap();
        write_system_tables(&ram).unwrap();
        for (at, sha) in [
            (
                GDT_ADDR,
                "7837b3b3e590afe8877f0e1a617dda2651ab8d81d40ed6f7bd9c2ca6c3bb55d9",
            ),
            (
                IDT_ADDR,
                "7ccf6c32ba612270f24eeaf537406bf25edc471d7999aa66da652963748400db",
            ),
            (
                TSS_ADDR,
                "9114eb2f0047ad47b2895a51401a8c7f872b75dcbc8968d71b28d94c2ace6d15",
            ),
            (
                STUBS_ADDR,
                "13ebb71d7455988e1abe3cdcdbc0dc03497d78d533401a85aef242ca0243b3d4",
            ),
        ] {
            let mut page = [0u8; 4096];
            ram.mem().read_slice(&mut page, GuestAddress(at)).unwrap();
            assert_eq!(
                format!("{:x}", Sha256::digest(page)),
                sha,
                "table at {at:#x}"
            );
        }
    }
}
