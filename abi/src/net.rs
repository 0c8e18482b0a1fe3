//! Network devices: the transmit, receive and response slots of their two rings.

use crate::RING_SLOT_SIZE;

/// Bytes of an Ethernet header (destination MAC, source MAC, EtherType). Frames carry no
/// FCS, so a frame is `ETH_HEADER ..= ETH_HEADER + mtu` bytes
/// ([`DeviceInfo::mtu`](crate::DeviceInfo::mtu)).
pub const ETH_HEADER: u32 = 14;

/// A network transmit request (64-byte slot of the `ring` of a NET device): send the
/// Ethernet frame at `addr`. The response ([`NetResponse`]) carries the bytes sent or a
/// negative status.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetTxRequest {
    /// Chosen by the guest; copied into the response.
    pub id: u64,
    /// Guest address of the frame (destination MAC first, no FCS).
    pub addr: u64,
    /// Frame length: 14 ..= 14 + mtu bytes.
    pub len: u32,
    /// Must be zero.
    pub flags: u32,
    /// Must be zero.
    pub reserved: [u64; 5],
}

/// A network receive buffer (64-byte slot of the `ring2` of a NET device): the guest
/// posts empty buffers; the host answers each with one received frame ([`NetResponse`]
/// with the frame length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetRxRequest {
    /// Chosen by the guest; copied into the response.
    pub id: u64,
    /// Guest address of the buffer (guest-writable memory).
    pub addr: u64,
    /// Capacity: at least 14 + mtu bytes.
    pub len: u32,
    /// Must be zero.
    pub flags: u32,
    /// Must be zero.
    pub reserved: [u64; 5],
}

/// Response to a [`NetTxRequest`] or [`NetRxRequest`] (64 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetResponse {
    /// The request's `id`.
    pub id: u64,
    /// Frame length (>= 0), or a negative [`status`](crate::status).
    pub status: i64,
    /// Zero.
    pub reserved: [u64; 6],
}

// Layout checks: every ring slot is exactly one slot.
const _: () = assert!(core::mem::size_of::<NetTxRequest>() as u64 == RING_SLOT_SIZE);
const _: () = assert!(core::mem::size_of::<NetRxRequest>() as u64 == RING_SLOT_SIZE);
const _: () = assert!(core::mem::size_of::<NetResponse>() as u64 == RING_SLOT_SIZE);

// With the `vm-memory` feature (the host's), these structs can be read from and written
// to guest memory through vm-memory's checked accessors.
// SAFETY: `#[repr(C)]` plain old data with explicit padding fields, no references and no
// invalid bit patterns.
#[cfg(feature = "vm-memory")]
unsafe impl vm_memory::ByteValued for NetTxRequest {}
#[cfg(feature = "vm-memory")]
unsafe impl vm_memory::ByteValued for NetRxRequest {}
#[cfg(feature = "vm-memory")]
unsafe impl vm_memory::ByteValued for NetResponse {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_have_the_documented_layout() {
        // docs/ABI.md §7: one ring slot each.
        assert_eq!(RING_SLOT_SIZE, 64);
        assert_layout!(NetTxRequest {
            size: RING_SLOT_SIZE as usize,
            align: 8,
            id: 0,
            addr: 8,
            len: 16,
            flags: 20,
            reserved: 24,
        });
        assert_layout!(NetRxRequest {
            size: RING_SLOT_SIZE as usize,
            align: 8,
            id: 0,
            addr: 8,
            len: 16,
            flags: 20,
            reserved: 24,
        });
        assert_layout!(NetResponse {
            size: RING_SLOT_SIZE as usize,
            align: 8,
            id: 0,
            status: 8,
            reserved: 16
        });
    }

    #[test]
    fn ethernet_header_is_two_macs_and_an_ethertype() {
        assert_eq!(ETH_HEADER, 6 + 6 + 2);
    }
}
