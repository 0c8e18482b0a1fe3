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

use std::mem::offset_of;
use std::sync::atomic::{Ordering, fence};

use pvrun_abi::{RING_BROKEN, RING_SLOT_SIZE, RING_SLOTS_OFFSET, RingHeader};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

/// Offsets of the header fields.
const REQ_PROD: u64 = offset_of!(RingHeader, req_prod) as u64;
const REQ_EVENT: u64 = offset_of!(RingHeader, req_event) as u64;
const RSP_PROD: u64 = offset_of!(RingHeader, rsp_prod) as u64;
const STATUS: u64 = offset_of!(RingHeader, status) as u64;

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
    /// two, not zero). Initialises the header so the first request rings the doorbell.
    pub fn new(mem: &GuestMemoryMmap, header: u64, slots: u32) -> Self {
        Self::starting_at(mem, header, slots, 0)
    }

    /// A ring whose indices start at `idx` instead of 0 (tests of index wrap-around).
    fn starting_at(mem: &GuestMemoryMmap, header: u64, slots: u32, idx: u32) -> Self {
        let r = Ring {
            header,
            slots: slots.max(1),
            req_cons: idx,
            rsp_prod: idx,
        };
        r.store(mem, REQ_EVENT, idx.wrapping_add(1));
        r
    }

    fn field(&self, off: u64) -> GuestAddress {
        GuestAddress(self.header.wrapping_add(off))
    }

    fn store(&self, mem: &GuestMemoryMmap, off: u64, v: u32) {
        let _ = mem.write_obj(v, self.field(off));
    }

    fn slot_addr(&self, idx: u32) -> GuestAddress {
        // Cannot overflow for rings the host laid out (in the device area); wrapping keeps
        // a bad header address an unreadable one instead of a panic.
        let off = RING_SLOTS_OFFSET + u64::from(idx % self.slots) * RING_SLOT_SIZE;
        self.field(off)
    }

    /// How many new requests the guest has published. An index that runs further ahead
    /// than the ring has slots is an error.
    pub fn pending(&mut self, mem: &GuestMemoryMmap) -> Result<u32, RingError> {
        let prod: u32 = mem
            .read_obj(self.field(REQ_PROD))
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
        let v = self.peek(mem)?;
        self.advance();
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
        self.store(mem, RSP_PROD, self.rsp_prod);
    }

    /// Before going idle: asks the guest to ring the doorbell for its next request, then
    /// checks once more for requests published meanwhile. True if there are some.
    pub fn idle_check(&mut self, mem: &GuestMemoryMmap) -> Result<bool, RingError> {
        self.store(mem, REQ_EVENT, self.req_cons.wrapping_add(1));
        fence(Ordering::SeqCst);
        Ok(self.pending(mem)? > 0)
    }

    /// Marks the ring as no longer served (the guest sees `RING_BROKEN` in its header).
    pub fn mark_broken(&self, mem: &GuestMemoryMmap) {
        self.store(mem, STATUS, RING_BROKEN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;

    const HEADER: u64 = 0x1000;
    const SLOTS: u32 = 8;

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    struct Slot([u64; 8]);
    // SAFETY: plain old data.
    unsafe impl ByteValued for Slot {}

    fn ram() -> GuestRam {
        GuestRam::new(1 << 20).unwrap()
    }

    fn header(mem: &GuestMemoryMmap) -> RingHeader {
        mem.read_obj(GuestAddress(HEADER)).unwrap()
    }

    fn set_req_prod(mem: &GuestMemoryMmap, v: u32) {
        let mut h = header(mem);
        h.req_prod = v;
        mem.write_obj(h, GuestAddress(HEADER)).unwrap();
    }

    fn guest_slot(idx: u32) -> GuestAddress {
        GuestAddress(HEADER + RING_SLOTS_OFFSET + u64::from(idx % SLOTS) * RING_SLOT_SIZE)
    }

    #[test]
    fn the_header_fields_are_where_the_abi_puts_them() {
        let ram = ram();
        let mem = ram.mem();
        let ring = Ring::new(mem, HEADER, SLOTS);
        assert_eq!(header(mem).req_event, 1, "the first request must ring");
        ring.mark_broken(mem);
        assert_eq!(header(mem).status, RING_BROKEN);
    }

    #[test]
    fn a_producer_more_than_slots_ahead_breaks_the_ring() {
        let ram = ram();
        let mem = ram.mem();
        let mut ring = Ring::new(mem, HEADER, SLOTS);
        set_req_prod(mem, SLOTS);
        assert_eq!(ring.pending(mem), Ok(SLOTS), "a full ring is fine");
        set_req_prod(mem, SLOTS + 1);
        assert!(ring.pending(mem).is_err());
        // "Behind" the consumer is far ahead, too.
        set_req_prod(mem, u32::MAX);
        assert!(ring.pending(mem).is_err());
    }

    #[test]
    fn indices_wrap_around_u32() {
        let ram = ram();
        let mem = ram.mem();
        let start = u32::MAX - 2;
        let mut ring = Ring::starting_at(mem, HEADER, SLOTS, start);
        assert_eq!(header(mem).req_event, u32::MAX - 1);
        for i in 0..6u32 {
            let idx = start.wrapping_add(i);
            mem.write_obj(Slot([u64::from(idx); 8]), guest_slot(idx))
                .unwrap();
        }
        let prod = start.wrapping_add(6);
        set_req_prod(mem, prod);
        assert_eq!(ring.pending(mem), Ok(6));
        for i in 0..6u32 {
            let idx = start.wrapping_add(i);
            let s: Slot = ring.take(mem).unwrap();
            assert_eq!(s, Slot([u64::from(idx); 8]), "slot {idx} read in order");
            ring.respond(mem, Slot([u64::from(idx) | 1 << 40; 8]));
        }
        ring.publish(mem);
        assert_eq!(header(mem).rsp_prod, prod);
        assert_eq!(ring.pending(mem), Ok(0));
        assert_eq!(ring.idle_check(mem), Ok(false));
        assert_eq!(header(mem).req_event, prod.wrapping_add(1));
    }

    #[test]
    fn going_idle_sets_req_event_and_sees_late_requests() {
        let ram = ram();
        let mem = ram.mem();
        let mut ring = Ring::new(mem, HEADER, SLOTS);
        set_req_prod(mem, 3);
        assert_eq!(ring.pending(mem), Ok(3));
        for _ in 0..3 {
            let _: Slot = ring.take(mem).unwrap();
        }
        assert_eq!(ring.idle_check(mem), Ok(false));
        assert_eq!(header(mem).req_event, 4);
        // A request published after the last look is seen by the re-check.
        set_req_prod(mem, 4);
        assert_eq!(ring.idle_check(mem), Ok(true));
        // A peeked request stays pending until advanced.
        let _: Slot = ring.peek(mem).unwrap();
        assert_eq!(ring.pending(mem), Ok(1));
        ring.advance();
        assert_eq!(ring.pending(mem), Ok(0));
    }

    #[test]
    fn responses_go_into_the_request_slots_in_order_and_publish_later() {
        let ram = ram();
        let mem = ram.mem();
        let mut ring = Ring::new(mem, HEADER, SLOTS);
        set_req_prod(mem, 3);
        assert_eq!(ring.pending(mem), Ok(3));
        for i in 0..3u64 {
            let _: Slot = ring.take(mem).unwrap();
            ring.respond(mem, Slot([100 + i; 8]));
        }
        assert_eq!(header(mem).rsp_prod, 0, "not visible before publish");
        ring.publish(mem);
        assert_eq!(header(mem).rsp_prod, 3);
        for i in 0..3u32 {
            let s: Slot = mem.read_obj(guest_slot(i)).unwrap();
            assert_eq!(s, Slot([100 + u64::from(i); 8]));
        }
    }

    #[test]
    fn a_header_outside_guest_memory_is_an_error_not_a_panic() {
        let ram = ram();
        let mem = ram.mem();
        let mut ring = Ring::new(mem, 2 << 20, SLOTS);
        assert!(ring.pending(mem).is_err());
        assert!(ring.take::<Slot>(mem).is_err());
        ring.respond(mem, Slot::default());
        ring.publish(mem);
        ring.mark_broken(mem);
    }
}
