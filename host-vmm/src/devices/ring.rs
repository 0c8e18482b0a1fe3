//! The host side of a shared ring (Xen `ring.h` style, layout in `pvrun_abi::RingHeader`).
//!
//! The guest produces requests into fixed slots and advances `req_prod`; the host consumes
//! each slot exactly once (one copy, then validation of the copy), writes the response
//! into the same slot and advances `rsp_prod`. The host keeps its own `req_cons` and
//! `rsp_prod` and never reads them back from guest memory, so a guest scribbling on the
//! header can only make the host refuse the ring ([`RingError`]), never misbehave.
//!
//! Memory ordering: the host loads `req_prod` and then (after an acquire fence) the
//! slots; it writes responses and then (after a release fence) `rsp_prod`. Before going
//! idle it publishes `req_event = req_cons + 1`, issues a full fence and re-checks
//! `req_prod`, so a request published concurrently is never missed.

use std::sync::atomic::{Ordering, fence};

use pvrun_abi::{RING_BROKEN, RING_SLOT_SIZE, RING_SLOTS_OFFSET};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

/// Offsets of the header fields (see `pvrun_abi::RingHeader`).
const REQ_PROD: u64 = 0;
const REQ_EVENT: u64 = 64;
const RSP_PROD: u64 = 128;
const STATUS: u64 = 192;

/// Why the host gave up on a ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingError(pub String);

/// The host's private state of one ring.
pub struct Ring {
    header: u64,
    slots: u32,
    req_cons: u32,
    rsp_prod: u32,
}

impl Ring {
    /// A ring whose header is at guest address `header`, with `slots` slots (a power of
    /// two). Initialises the header so the first request rings the doorbell.
    pub fn new(mem: &GuestMemoryMmap, header: u64, slots: u32) -> Self {
        let r = Ring {
            header,
            slots,
            req_cons: 0,
            rsp_prod: 0,
        };
        let _ = mem.write_obj(1u32, GuestAddress(header + REQ_EVENT));
        r
    }

    fn slot_addr(&self, idx: u32) -> GuestAddress {
        GuestAddress(self.header + RING_SLOTS_OFFSET + (idx % self.slots) as u64 * RING_SLOT_SIZE)
    }

    /// How many new requests the guest has published. An index that runs further ahead
    /// than the ring has slots is an error.
    pub fn pending(&mut self, mem: &GuestMemoryMmap) -> Result<u32, RingError> {
        let prod: u32 = mem
            .read_obj(GuestAddress(self.header + REQ_PROD))
            .map_err(|e| RingError(format!("ring header unreadable: {e}")))?;
        fence(Ordering::Acquire);
        let n = prod.wrapping_sub(self.req_cons);
        if n > self.slots {
            return Err(RingError(format!(
                "req_prod {prod} is {n} requests ahead of the host's consumer index {}, more than the ring's {} slots",
                self.req_cons, self.slots
            )));
        }
        Ok(n)
    }

    /// Copies the next request out of its slot (once) and consumes it.
    pub fn take<T: ByteValued>(&mut self, mem: &GuestMemoryMmap) -> Result<T, RingError> {
        let v = mem
            .read_obj(self.slot_addr(self.req_cons))
            .map_err(|e| RingError(format!("ring slot unreadable: {e}")))?;
        self.req_cons = self.req_cons.wrapping_add(1);
        Ok(v)
    }

    /// Copies the next request out of its slot without consuming it (see [`Ring::advance`]).
    pub fn peek<T: ByteValued>(&self, mem: &GuestMemoryMmap) -> Result<T, RingError> {
        mem.read_obj(self.slot_addr(self.req_cons))
            .map_err(|e| RingError(format!("ring slot unreadable: {e}")))
    }

    /// Consumes the request [`Ring::peek`] returned.
    pub fn advance(&mut self) {
        self.req_cons = self.req_cons.wrapping_add(1);
    }

    /// Writes the response to the oldest unanswered request (not yet visible to the guest).
    pub fn respond<T: ByteValued>(&mut self, mem: &GuestMemoryMmap, rsp: T) {
        let _ = mem.write_obj(rsp, self.slot_addr(self.rsp_prod));
        self.rsp_prod = self.rsp_prod.wrapping_add(1);
    }

    /// Makes the written responses visible to the guest.
    pub fn publish(&self, mem: &GuestMemoryMmap) {
        fence(Ordering::Release);
        let _ = mem.write_obj(self.rsp_prod, GuestAddress(self.header + RSP_PROD));
    }

    /// Before going idle: asks the guest to ring the doorbell for its next request, then
    /// checks once more for requests published meanwhile. True if there are some.
    pub fn idle_check(&mut self, mem: &GuestMemoryMmap) -> Result<bool, RingError> {
        let _ = mem.write_obj(
            self.req_cons.wrapping_add(1),
            GuestAddress(self.header + REQ_EVENT),
        );
        fence(Ordering::SeqCst);
        Ok(self.pending(mem)? > 0)
    }

    /// Marks the ring as no longer served (the guest sees `RING_BROKEN` in its header).
    pub fn mark_broken(&self, mem: &GuestMemoryMmap) {
        let _ = mem.write_obj(RING_BROKEN, GuestAddress(self.header + STATUS));
    }
}
