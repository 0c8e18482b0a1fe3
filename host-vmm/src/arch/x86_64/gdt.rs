//! Segmentation: the GDT (flat ring-0/ring-3 segments and the TSS descriptor), the TSS
//! with its I/O permission bitmap, and the `kvm_segment` views of both that the vCPU
//! is loaded with.
//!
//! The I/O bitmap opens exactly the hypercall ports: RFLAGS.IOPL is ignored at CPL3 on
//! PVM hosts, and the bitmap is the stricter choice on bare metal too.

use std::mem::{offset_of, size_of};

use kvm_bindings::kvm_segment;
use pvrun_abi::{EXCEPTION_PORT, HYPERCALL_PORT_BASE, HYPERCALL_PORT_COUNT};
use x86_64::structures::gdt::{
    Descriptor, DescriptorFlags, GlobalDescriptorTable, SegmentSelector,
};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::{PrivilegeLevel, VirtAddr};

use crate::layout::{R0_STACK_TOP, TSS_ADDR};

/// Kernel code selector (0x08).
pub const KERNEL_CS: SegmentSelector = SegmentSelector::new(1, PrivilegeLevel::Ring0);
/// Kernel data selector (0x10).
pub const KERNEL_DS: SegmentSelector = SegmentSelector::new(2, PrivilegeLevel::Ring0);
/// User data selector, RPL 3 (0x1b).
pub const USER_DS: SegmentSelector = SegmentSelector::new(3, PrivilegeLevel::Ring3);
/// User code selector, RPL 3 (0x23), as the raw value the rest of the host compares with.
pub const USER_CS: u16 = USER_CS_SEL.0;
/// [`USER_CS`] as a selector.
pub const USER_CS_SEL: SegmentSelector = SegmentSelector::new(4, PrivilegeLevel::Ring3);
/// TSS selector (0x28).
pub const TSS_SEL: SegmentSelector = SegmentSelector::new(5, PrivilegeLevel::Ring0);

/// GDT entries: null, four flat segments, and the two-entry TSS descriptor.
const GDT_ENTRIES: usize = 7;

/// Offset of the I/O bitmap inside the TSS: right after the 104-byte TSS proper.
pub const IOPB_OFFSET: usize = size_of::<TaskStateSegment>();
/// Bytes of I/O bitmap: enough to cover every port up to the exception port, plus the
/// trailing 0xFF byte the CPU may read past the last covered port.
pub const IOPB_BYTES: usize = (EXCEPTION_PORT as usize + 1).div_ceil(8) + 1;
/// TSS limit (inclusive): the TSS, the bitmap and its trailing 0xFF byte.
pub const TSS_LIMIT: u64 = (IOPB_OFFSET + IOPB_BYTES - 1) as u64;

/// Type field of a busy 64-bit TSS (0b1011), as the TR loaded through `KVM_SET_SREGS`
/// has it. `DescriptorFlags` only names code/data-segment bits, and the crate's
/// `Descriptor::tss_segment*` constructors cannot be used: they take a host pointer to a
/// `&'static TaskStateSegment` as the base (ours is a guest address) and write the
/// "available" type 0b1001.
const TSS_TYPE_BUSY: u64 = 0b1011 << TYPE_SHIFT;
/// First bit of the 4-bit type field in a descriptor.
const TYPE_SHIFT: u32 = 40;
/// First bit of the DPL field in a descriptor.
const DPL_SHIFT: u32 = 45;

/// The GDT. Built at compile time; the asserts pin each selector to its slot.
const GDT: GlobalDescriptorTable<GDT_ENTRIES> = {
    let mut gdt = GlobalDescriptorTable::empty();
    assert!(gdt.append(Descriptor::kernel_code_segment()).0 == KERNEL_CS.0);
    assert!(gdt.append(Descriptor::kernel_data_segment()).0 == KERNEL_DS.0);
    assert!(gdt.append(Descriptor::user_data_segment()).0 == USER_DS.0);
    assert!(gdt.append(Descriptor::user_code_segment()).0 == USER_CS_SEL.0);
    assert!(gdt.append(tss_descriptor(TSS_ADDR, TSS_LIMIT)).0 == TSS_SEL.0);
    gdt
};

/// A present, busy 64-bit TSS descriptor for a TSS at guest address `base`.
const fn tss_descriptor(base: u64, limit: u64) -> Descriptor {
    let low = DescriptorFlags::PRESENT.bits()
        | TSS_TYPE_BUSY
        | masked(limit, DescriptorFlags::LIMIT_0_15)
        | masked(limit << 32, DescriptorFlags::LIMIT_16_19)
        | masked(base << 16, DescriptorFlags::BASE_0_23)
        | masked(base << 32, DescriptorFlags::BASE_24_31);
    Descriptor::SystemSegment(low, base >> 32)
}

/// `bits` restricted to the bits of `flag`.
const fn masked(bits: u64, flag: DescriptorFlags) -> u64 {
    bits & flag.bits()
}

/// GDTR limit: one less than the table's size in bytes.
pub const GDT_LIMIT: u16 = GDT.limit();

/// The GDT as bytes.
pub fn gdt_bytes() -> Vec<u8> {
    GDT.entries()
        .iter()
        .flat_map(|e| e.raw().to_le_bytes())
        .collect()
}

/// The TSS: RSP0 and IST1 point at the ring-0 stack; the I/O bitmap follows it.
fn tss() -> TaskStateSegment {
    let mut tss = TaskStateSegment::new();
    tss.privilege_stack_table[0] = VirtAddr::new(R0_STACK_TOP);
    tss.interrupt_stack_table[0] = VirtAddr::new(R0_STACK_TOP);
    tss.iomap_base = IOPB_OFFSET as u16;
    tss
}

/// The TSS and its I/O bitmap as bytes (`TSS_LIMIT + 1` of them).
pub fn tss_bytes() -> Vec<u8> {
    let tss = tss();
    // TaskStateSegment is `repr(C, packed(4))`: copy each field out and store it at its
    // offset (the reserved fields stay zero).
    let mut bytes = vec![0u8; IOPB_OFFSET];
    let mut put = |at: usize, b: &[u8]| bytes[at..at + b.len()].copy_from_slice(b);
    let (psp, ist, iomap) = (
        tss.privilege_stack_table,
        tss.interrupt_stack_table,
        tss.iomap_base,
    );
    for (i, a) in psp.iter().enumerate() {
        put(
            offset_of!(TaskStateSegment, privilege_stack_table) + 8 * i,
            &a.as_u64().to_le_bytes(),
        );
    }
    for (i, a) in ist.iter().enumerate() {
        put(
            offset_of!(TaskStateSegment, interrupt_stack_table) + 8 * i,
            &a.as_u64().to_le_bytes(),
        );
    }
    put(
        offset_of!(TaskStateSegment, iomap_base),
        &iomap.to_le_bytes(),
    );
    bytes.extend_from_slice(&io_bitmap());
    bytes
}

/// The I/O permission bitmap: a set bit denies its port, so all are set except the
/// hypercall window.
fn io_bitmap() -> [u8; IOPB_BYTES] {
    let mut map = [0xff; IOPB_BYTES];
    for port in HYPERCALL_PORT_BASE..HYPERCALL_PORT_BASE + HYPERCALL_PORT_COUNT {
        let bit = port as usize;
        map[bit / 8] &= !(1 << (bit % 8));
    }
    map
}

/// The `kvm_segment` a segment register holds once loaded with `sel`, read from the GDT
/// descriptor `sel` names (as Firecracker's `kvm_segment_from_gdt`).
pub fn kvm_segment(sel: SegmentSelector) -> kvm_segment {
    let entries = GDT.entries();
    let index = sel.index() as usize;
    let raw = entries[index].raw();
    let flags = DescriptorFlags::from_bits_retain(raw);
    let has = |f: DescriptorFlags| u8::from(flags.contains(f));
    let system = !flags.contains(DescriptorFlags::USER_SEGMENT);
    let base_low = ((raw & DescriptorFlags::BASE_0_23.bits()) >> 16)
        | ((raw & DescriptorFlags::BASE_24_31.bits()) >> 32);
    let base_high = if system {
        entries[index + 1].raw() << 32
    } else {
        0
    };
    let limit = (raw & DescriptorFlags::LIMIT_0_15.bits())
        | ((raw & DescriptorFlags::LIMIT_16_19.bits()) >> 32);
    let limit = if flags.contains(DescriptorFlags::GRANULARITY) {
        (limit << 12) | 0xfff
    } else {
        limit
    };
    kvm_segment {
        base: base_low | base_high,
        limit: limit as u32,
        selector: sel.0,
        type_: ((raw >> TYPE_SHIFT) & 0xf) as u8,
        present: has(DescriptorFlags::PRESENT),
        dpl: ((raw & DescriptorFlags::DPL_RING_3.bits()) >> DPL_SHIFT) as u8,
        db: has(DescriptorFlags::DEFAULT_SIZE),
        s: has(DescriptorFlags::USER_SEGMENT),
        l: has(DescriptorFlags::LONG_MODE),
        g: has(DescriptorFlags::GRANULARITY),
        avl: has(DescriptorFlags::AVAILABLE),
        unusable: u8::from(!flags.contains(DescriptorFlags::PRESENT)),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_is_the_old_table() {
        // Captured from the hand-written table this module replaced.
        let old: [u64; 7] = [
            0,
            0x00af_9b00_0000_ffff,
            0x00cf_9300_0000_ffff,
            0x00cf_f300_0000_ffff,
            0x00af_fb00_0000_ffff,
            0x0000_8b00_3000_0128,
            0,
        ];
        let old: Vec<u8> = old.iter().flat_map(|d| d.to_le_bytes()).collect();
        assert_eq!(gdt_bytes(), old);
        assert_eq!(GDT_LIMIT, 55);
    }

    #[test]
    fn user_selectors_are_dpl3_and_kernel_ones_dpl0() {
        assert_eq!((USER_DS.0, USER_CS), (0x1b, 0x23));
        for sel in [USER_DS, USER_CS_SEL] {
            assert_eq!(sel.rpl(), PrivilegeLevel::Ring3);
            let desc = GDT.entries()[sel.index() as usize].raw();
            assert_eq!(
                desc & DescriptorFlags::DPL_RING_3.bits(),
                DescriptorFlags::DPL_RING_3.bits()
            );
            assert_eq!(kvm_segment(sel).dpl, 3);
        }
        for sel in [KERNEL_CS, KERNEL_DS, TSS_SEL] {
            assert_eq!(sel.rpl(), PrivilegeLevel::Ring0);
            assert_eq!(kvm_segment(sel).dpl, 0);
        }
        assert_eq!(KERNEL_CS.0, 0x08);
        assert_eq!(TSS_SEL.0, 0x28);
    }

    #[test]
    fn segments_are_the_old_registers() {
        let code = kvm_segment(USER_CS_SEL);
        let old_code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x23,
            type_: 0xb,
            present: 1,
            dpl: 3,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        assert_eq!(code, old_code);
        let old_data = kvm_segment {
            selector: 0x1b,
            type_: 0x3,
            db: 1,
            l: 0,
            ..old_code
        };
        assert_eq!(kvm_segment(USER_DS), old_data);
        let old_tr = kvm_segment {
            base: TSS_ADDR,
            limit: 0x128,
            selector: 0x28,
            type_: 0xb,
            present: 1,
            ..Default::default()
        };
        assert_eq!(kvm_segment(TSS_SEL), old_tr);
    }

    #[test]
    fn io_bitmap_opens_exactly_the_hypercall_ports() {
        let tss = tss_bytes();
        assert_eq!(
            tss.len() as u64,
            TSS_LIMIT + 1,
            "the limit covers the bitmap"
        );
        assert_eq!(
            u16::from_le_bytes([tss[102], tss[103]]) as usize,
            IOPB_OFFSET
        );
        assert_eq!(IOPB_OFFSET, 0x68);
        let map = &tss[IOPB_OFFSET..];
        let open = |port: u16| map[port as usize / 8] & (1 << (port % 8)) == 0;
        let window = HYPERCALL_PORT_BASE..HYPERCALL_PORT_BASE + HYPERCALL_PORT_COUNT;
        assert_eq!(window, 0x500..0x540);
        for port in 0..=EXCEPTION_PORT {
            assert_eq!(open(port), window.contains(&port), "port {port:#x}");
        }
        assert!(!open(0x5ff), "the exception port is the stubs' alone");
        assert_eq!(*map.last().unwrap(), 0xff, "trailing 0xFF byte");
        assert_eq!(map.len(), (EXCEPTION_PORT as usize + 1) / 8 + 1);
    }

    #[test]
    fn tss_stacks_are_the_ring0_stack() {
        let tss = tss_bytes();
        let at = |o: usize| u64::from_le_bytes(tss[o..o + 8].try_into().unwrap());
        assert_eq!(at(4), R0_STACK_TOP, "RSP0");
        assert_eq!(at(36), R0_STACK_TOP, "IST1");
        assert!(
            tss[..IOPB_OFFSET]
                .iter()
                .enumerate()
                .all(|(i, b)| (4..12).contains(&i) || (36..44).contains(&i) || i >= 102 || *b == 0)
        );
    }
}
