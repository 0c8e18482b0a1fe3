//! The guest side of a shared ring (Xen `ring.h` style, layout in [`RingHeader`]).
//!
//! The guest writes requests into fixed slots and publishes them by advancing `req_prod`;
//! the host answers each request in the slot it came from and advances `rsp_prod`. The
//! guest keeps its own `req_prod_pvt` and `rsp_cons` and never has more than `slots`
//! requests unanswered. Doorbells are suppressed with the host's `req_event` (ring only
//! when `req_prod` moves past it), and completions are awaited by spinning briefly and
//! then sleeping in `WAIT`, which the host ends early when any ring has new responses.
//!
//! This module is the only place with the volatile accesses to ring memory. It checks the
//! ring geometry the host announced once, in [`Ring::new`], so every access stays inside
//! the device area.

use core::sync::atomic::{Ordering, fence};

use pvrun_abi::layout::{DEVICE_AREA_ADDR, DEVICE_AREA_END};
use pvrun_abi::{
    DeviceInfo, HYPERCALL_PORT_COUNT, RING_BROKEN, RING_SLOT_SIZE, RING_SLOTS_OFFSET, RingHeader,
    Wait, call as nr,
};

use crate::hypercall::{call, hypercall};
use crate::time::monotonic_ns;

/// Offsets of the header fields (see [`RingHeader`]).
const REQ_PROD: u64 = core::mem::offset_of!(RingHeader, req_prod) as u64;
const REQ_EVENT: u64 = core::mem::offset_of!(RingHeader, req_event) as u64;
const RSP_PROD: u64 = core::mem::offset_of!(RingHeader, rsp_prod) as u64;
const STATUS: u64 = core::mem::offset_of!(RingHeader, status) as u64;

/// How long to spin on `rsp_prod` before sleeping in `WAIT`.
const SPIN_NS: u64 = 20_000;
/// Deadline of each `WAIT` while completions are outstanding (the host wakes the guest
/// earlier as soon as responses arrive).
const WAIT_NS: u64 = 10_000_000;

/// A real `mfence` (Rust's `fence(SeqCst)` becomes `lock or [rsp], 0` on x86-64, which
/// orders ordinary memory too, but the ABI asks for `mfence`).
#[inline(always)]
fn mfence() {
    // SAFETY: `mfence` only orders memory accesses; no `nomem`, so it is also a compiler
    // barrier.
    unsafe { core::arch::asm!("mfence", options(nostack, preserves_flags)) };
}

/// Counters of ring activity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Requests published.
    pub requests: u64,
    /// Times `req_prod` was published (batches).
    pub publishes: u64,
    /// Doorbells rung (publishes the host asked to be told about).
    pub doorbells: u64,
    /// `WAIT` hypercalls made while waiting for responses.
    pub waits: u64,
}

/// The ring was marked broken by the host (it stopped serving it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Broken;

/// The guest's private state of one ring.
pub(crate) struct Ring {
    header: u64,
    slots: u32,
    doorbell: u16,
    req_prod_pvt: u32,
    rsp_cons: u32,
    stats: RingStats,
}

impl Ring {
    /// The (first) ring of device `dev`, or `None` if the host announced a ring that does not
    /// lie inside the device area, a slot count that is not a power of two, an unexpected
    /// slot size or a doorbell outside the hypercall window.
    pub(crate) fn new(dev: &DeviceInfo) -> Option<Ring> {
        let slots = dev.slots;
        if slots == 0 || !slots.is_power_of_two() || dev.slot_size as u64 != RING_SLOT_SIZE {
            return None;
        }
        let bytes = RING_SLOTS_OFFSET + slots as u64 * RING_SLOT_SIZE;
        let end = dev.ring.checked_add(bytes)?;
        if dev.ring < DEVICE_AREA_ADDR || end > DEVICE_AREA_END || !dev.ring.is_multiple_of(64) {
            return None;
        }
        let doorbell = u16::try_from(dev.index)
            .ok()?
            .checked_add(nr::DOORBELL_BASE)?;
        if doorbell >= HYPERCALL_PORT_COUNT {
            return None;
        }
        let mut ring = Ring {
            header: dev.ring,
            slots,
            doorbell,
            req_prod_pvt: 0,
            rsp_cons: 0,
            stats: RingStats::default(),
        };
        // Continue where an earlier user of the ring stopped (everything it published has
        // been answered unless the ring broke).
        let prod = ring.load(REQ_PROD);
        ring.req_prod_pvt = prod;
        ring.rsp_cons = prod;
        Some(ring)
    }

    /// Volatile load of a header field.
    fn load(&self, field: u64) -> u32 {
        // SAFETY: `new` checked that the header lies inside the device area, which the
        // host maps read-write for the guest for its whole life; the host writes these
        // fields concurrently, hence the volatile access.
        unsafe { ((self.header + field) as *const u32).read_volatile() }
    }

    /// Volatile store to a header field.
    fn store(&self, field: u64, v: u32) {
        // SAFETY: as in `load`.
        unsafe { ((self.header + field) as *mut u32).write_volatile(v) }
    }

    /// Address of the slot of free-running index `idx`.
    fn slot(&self, idx: u32) -> u64 {
        self.header + RING_SLOTS_OFFSET + (idx % self.slots) as u64 * RING_SLOT_SIZE
    }

    /// Number of slots.
    pub(crate) fn slots(&self) -> u32 {
        self.slots
    }

    /// Requests published or queued and not yet answered.
    pub(crate) fn outstanding(&self) -> u32 {
        self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// Slots free for new requests.
    pub(crate) fn free(&self) -> u32 {
        self.slots.saturating_sub(self.outstanding())
    }

    /// True once the host has marked the ring broken.
    pub(crate) fn is_broken(&self) -> bool {
        self.load(STATUS) == RING_BROKEN
    }

    /// Counters so far.
    pub(crate) fn stats(&self) -> RingStats {
        self.stats
    }

    /// Writes `req` into the next free slot (not yet visible to the host: see
    /// [`publish`](Self::publish)). The caller makes sure a slot is free.
    pub(crate) fn queue<T: Copy>(&mut self, req: T) {
        const { assert!(core::mem::size_of::<T>() as u64 <= RING_SLOT_SIZE) };
        debug_assert!(self.free() > 0);
        // SAFETY: the slot lies inside the ring `new` checked, the host does not look at it
        // before `req_prod` covers it, and slots are 64-byte aligned.
        unsafe { (self.slot(self.req_prod_pvt) as *mut T).write_volatile(req) };
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        self.stats.requests += 1;
    }

    /// Publishes the queued requests and rings the doorbell if the host asked for it.
    pub(crate) fn publish(&mut self) {
        let new = self.req_prod_pvt;
        let old = self.load(REQ_PROD);
        if new == old {
            return;
        }
        // The slots must be visible before the index that covers them.
        fence(Ordering::Release);
        self.store(REQ_PROD, new);
        // A full fence: the store to req_prod must be visible before req_event is read, or
        // the host could go idle without us ringing.
        mfence();
        let event = self.load(REQ_EVENT);
        self.stats.publishes += 1;
        if new.wrapping_sub(event) < new.wrapping_sub(old) {
            self.stats.doorbells += 1;
            // SAFETY: doorbells take no argument and touch no guest memory; the host
            // leaves rax unchanged, so the result means nothing.
            unsafe { hypercall(self.doorbell, 0) };
        }
    }

    /// The next response, if the host has published one: `(ring index, value)`.
    pub(crate) fn take_response<T: Copy>(&mut self) -> Option<(u32, T)> {
        const { assert!(core::mem::size_of::<T>() as u64 <= RING_SLOT_SIZE) };
        if self.rsp_cons == self.req_prod_pvt {
            return None;
        }
        let prod = self.load(RSP_PROD);
        // Only trust rsp_prod as far as requests were published.
        if prod == self.rsp_cons || prod.wrapping_sub(self.rsp_cons) > self.outstanding() {
            return None;
        }
        // Read the response only after seeing the index that covers it.
        fence(Ordering::Acquire);
        let idx = self.rsp_cons;
        // SAFETY: as in `queue`; the host finished writing this slot before it published
        // rsp_prod past it.
        let v = unsafe { (self.slot(idx) as *const T).read_volatile() };
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        Some((idx, v))
    }

    /// True if the host published responses not yet taken.
    fn has_responses(&self) -> bool {
        let prod = self.load(RSP_PROD);
        prod != self.rsp_cons && prod.wrapping_sub(self.rsp_cons) <= self.outstanding()
    }

    /// Blocks until a response is available (spinning for a short while, then sleeping in
    /// `WAIT`), or fails if the host marked the ring broken. Returns at once if nothing is
    /// outstanding.
    pub(crate) fn wait_response(&mut self) -> Result<(), Broken> {
        if self.outstanding() == 0 || self.has_responses() {
            return Ok(());
        }
        let spin_until = monotonic_ns().saturating_add(SPIN_NS);
        loop {
            if self.has_responses() {
                return Ok(());
            }
            if self.is_broken() {
                return Err(Broken);
            }
            if monotonic_ns() >= spin_until {
                break;
            }
            core::hint::spin_loop();
        }
        loop {
            self.stats.waits += 1;
            call(&Wait {
                deadline_ns: monotonic_ns().saturating_add(WAIT_NS),
            });
            if self.has_responses() {
                return Ok(());
            }
            if self.is_broken() {
                return Err(Broken);
            }
        }
    }
}
