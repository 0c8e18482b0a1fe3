//! The shared request/response rings of the devices.

/// Header of a shared ring (Xen `ring.h` style), followed at offset [`RING_SLOTS_OFFSET`]
/// by `slots` fixed-size slots. Each index sits on its own cache line. Indices are
/// free-running `u32` counters; slot `i` is at `i % slots`. The guest produces requests,
/// the host consumes each request slot once and writes its response into the same slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingHeader {
    /// Requests produced by the guest.
    pub req_prod: u32,
    /// Padding to the next cache line.
    pub pad0: [u32; 15],
    /// Written by the host: the guest rings the doorbell when it moves `req_prod` past
    /// this value (event-index notification suppression).
    pub req_event: u32,
    /// Padding to the next cache line.
    pub pad1: [u32; 15],
    /// Responses produced by the host.
    pub rsp_prod: u32,
    /// Padding to the next cache line.
    pub pad2: [u32; 15],
    /// Written by the host: 0 while the ring is served, [`RING_BROKEN`] once the host gave
    /// up on it because the guest corrupted it.
    pub status: u32,
    /// Padding to the next cache line.
    pub pad3: [u32; 15],
}

/// [`RingHeader::status`] value of a ring the host no longer serves.
pub const RING_BROKEN: u32 = 1;
/// Offset of the first slot from the ring header.
pub const RING_SLOTS_OFFSET: u64 = 256;
/// Bytes per slot of every ring.
pub const RING_SLOT_SIZE: u64 = 64;

// Layout checks: these sizes are part of the ABI.
const _: () = assert!(core::mem::size_of::<RingHeader>() as u64 == RING_SLOTS_OFFSET);

// With the `vm-memory` feature (the host's), this struct can be read from and written to
// guest memory through vm-memory's checked accessors.
// SAFETY: `#[repr(C)]` plain old data with explicit padding fields, no references and no
// invalid bit patterns.
#[cfg(feature = "vm-memory")]
unsafe impl vm_memory::ByteValued for RingHeader {}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn ring_header_has_the_documented_layout() {
        // docs/ABI.md §7.
        assert_layout!(RingHeader {
            size: 256,
            align: 4,
            req_prod: 0x00,
            pad0: 0x04,
            req_event: 0x40,
            pad1: 0x44,
            rsp_prod: 0x80,
            pad2: 0x84,
            status: 0xc0,
            pad3: 0xc4,
        });
        assert_eq!(RING_SLOTS_OFFSET, 0x100);
        assert_eq!(RING_SLOT_SIZE, 64);
        assert_eq!(RING_BROKEN, 1);
    }

    #[test]
    fn ring_indices_sit_on_separate_cache_lines() {
        const LINE: usize = 64;
        let fields = [
            ("req_prod", offset_of!(RingHeader, req_prod)),
            ("req_event", offset_of!(RingHeader, req_event)),
            ("rsp_prod", offset_of!(RingHeader, rsp_prod)),
            ("status", offset_of!(RingHeader, status)),
        ];
        for (i, (name, off)) in fields.iter().enumerate() {
            // Each field lies within one line ...
            assert_eq!(
                off / LINE,
                (off + size_of::<u32>() - 1) / LINE,
                "{name} straddles a cache line"
            );
            // ... that no other field shares.
            for (other, off2) in &fields[i + 1..] {
                assert_ne!(
                    off / LINE,
                    off2 / LINE,
                    "{name} and {other} share a cache line"
                );
            }
        }
    }

    #[test]
    fn slots_follow_the_header_on_cache_line_boundaries() {
        assert_eq!(size_of::<RingHeader>() as u64, RING_SLOTS_OFFSET);
        assert!(RING_SLOTS_OFFSET.is_multiple_of(64));
        assert!(RING_SLOT_SIZE.is_multiple_of(64));
    }
}
