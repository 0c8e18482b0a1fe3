//! Block devices: the request and response slots of their ring.

use crate::RING_SLOT_SIZE;

/// Block operations for [`BlockRequest::op`].
pub mod block_op {
    /// Read `len` bytes at `sector` into guest memory at `addr`.
    pub const READ: u32 = 1;
    /// Write `len` bytes from guest memory at `addr` to `sector`.
    pub const WRITE: u32 = 2;
    /// Make every completed write durable (the host calls `fdatasync`).
    pub const FLUSH: u32 = 3;
}

/// A block request slot (64 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockRequest {
    /// Chosen by the guest; copied into the response.
    pub id: u64,
    /// A [`block_op`].
    pub op: u32,
    /// Must be zero.
    pub reserved: u32,
    /// First sector.
    pub sector: u64,
    /// Guest address of the data buffer (writable guest memory for reads).
    pub addr: u64,
    /// Bytes: a multiple of the sector size, at most `max_request`.
    pub len: u64,
    /// Must be zero.
    pub reserved2: [u64; 3],
}

/// A block response slot (64 bytes), written over the request it answers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockResponse {
    /// The request's `id`.
    pub id: u64,
    /// Bytes transferred (>= 0), or a negative [`status`](crate::status).
    pub status: i64,
    /// Zero.
    pub reserved: [u64; 6],
}

// Layout checks: every ring slot is exactly one slot.
const _: () = assert!(core::mem::size_of::<BlockRequest>() as u64 == RING_SLOT_SIZE);
const _: () = assert!(core::mem::size_of::<BlockResponse>() as u64 == RING_SLOT_SIZE);

// With the `vm-memory` feature (the host's), these structs can be read from and written
// to guest memory through vm-memory's checked accessors.
// SAFETY: `#[repr(C)]` plain old data with explicit padding fields, no references and no
// invalid bit patterns.
#[cfg(feature = "vm-memory")]
unsafe impl vm_memory::ByteValued for BlockRequest {}
#[cfg(feature = "vm-memory")]
unsafe impl vm_memory::ByteValued for BlockResponse {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_have_the_documented_layout() {
        // docs/ABI.md §7: one ring slot each.
        assert_eq!(RING_SLOT_SIZE, 64);
        assert_layout!(BlockRequest {
            size: RING_SLOT_SIZE as usize,
            align: 8,
            id: 0,
            op: 8,
            reserved: 12,
            sector: 16,
            addr: 24,
            len: 32,
            reserved2: 40,
        });
        assert_layout!(BlockResponse {
            size: RING_SLOT_SIZE as usize,
            align: 8,
            id: 0,
            status: 8,
            reserved: 16
        });
    }

    #[test]
    fn operations_are_the_documented_ones() {
        assert_eq!(
            [block_op::READ, block_op::WRITE, block_op::FLUSH],
            [1, 2, 3]
        );
    }
}
