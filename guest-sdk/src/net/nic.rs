//! The network interface card: smoltcp's [`phy::Device`] over the device's two rings.
//!
//! The transmit ring (`DeviceInfo::ring`) carries frames to the host, the receive ring
//! (`DeviceInfo::ring2`) carries empty buffers to the host, which answers each with one
//! received frame. Frame buffers are allocated once, at start, and never move:
//! - a receive token lends smoltcp the buffer the host wrote the frame into, and posts the
//!   buffer back to the host when the token is consumed (zero copy);
//! - a transmit token lends smoltcp a free transmit buffer to build the frame in, and
//!   queues it on the ring; [`Nic::flush`] publishes everything queued with one doorbell.
//!
//! Responses are matched to buffers by their order (the host answers requests in order),
//! never by the `id` the host echoes, so a confused host cannot make the guest hand out a
//! buffer twice.

use alloc::alloc::{Layout, alloc_zeroed};
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::ptr::NonNull;

use pvrun_abi::{DeviceInfo, ETH_HEADER, NetResponse, NetRxRequest, NetTxRequest};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::ring::Ring;

/// Most frame buffers per ring (fewer if the ring has fewer slots).
const MAX_BUFFERS: u32 = 256;
/// Smallest frame buffer; bigger when the MTU needs it.
const MIN_BUFFER: usize = 2048;

/// Counters of the NIC, for benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NicStats {
    /// Frames received.
    pub rx_frames: u64,
    /// Bytes received (whole frames).
    pub rx_bytes: u64,
    /// Receive responses the guest discarded (a negative status or a bad length).
    pub rx_errors: u64,
    /// Frames queued for transmission.
    pub tx_frames: u64,
    /// Bytes queued for transmission (whole frames).
    pub tx_bytes: u64,
    /// Transmit responses with a negative status.
    pub tx_errors: u64,
    /// Frames smoltcp built that could not be sent (no free buffer, or too long).
    pub tx_dropped: u64,
    /// Times smoltcp asked for a transmit buffer while all were in flight.
    pub tx_full: u64,
    /// Doorbells rung, both rings together.
    pub doorbells: u64,
    /// Index publications, both rings together.
    pub publishes: u64,
}

/// A fixed set of equally sized frame buffers in one heap allocation that never moves.
///
/// Only raw pointers are kept: the host writes into posted buffers behind Rust's back, so
/// no reference to a buffer exists except while the guest owns it.
struct Buffers {
    base: NonNull<u8>,
    size: usize,
    count: u32,
}

impl Buffers {
    /// Allocates `count` buffers of `size` bytes (page aligned, zeroed); never freed.
    fn new(count: u32, size: usize) -> Buffers {
        let layout = Layout::from_size_align(size * count as usize, 4096)
            .unwrap_or_else(|_| panic!("net: bad buffer layout"));
        // SAFETY: the layout has a non-zero size (count and size are never 0).
        let p = unsafe { alloc_zeroed(layout) };
        let base = NonNull::new(p).unwrap_or_else(|| alloc::alloc::handle_alloc_error(layout));
        Buffers { base, size, count }
    }

    /// Guest address of buffer `i`.
    fn addr(&self, i: u32) -> u64 {
        self.base.as_ptr() as u64 + i as u64 * self.size as u64
    }

    /// The first `len` bytes of buffer `i`.
    ///
    /// # Safety
    /// The guest must own buffer `i` (not posted to the host) for the life of the slice.
    unsafe fn slice(&self, i: u32, len: usize) -> &[u8] {
        debug_assert!(i < self.count && len <= self.size);
        // SAFETY: in bounds of the allocation; the caller guarantees exclusive ownership.
        unsafe { core::slice::from_raw_parts(self.addr(i) as *const u8, len) }
    }

    /// The first `len` bytes of buffer `i`, writable.
    ///
    /// # Safety
    /// As for [`slice`](Self::slice).
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self, i: u32, len: usize) -> &mut [u8] {
        debug_assert!(i < self.count && len <= self.size);
        // SAFETY: as in `slice`.
        unsafe { core::slice::from_raw_parts_mut(self.addr(i) as *mut u8, len) }
    }
}

/// The receive half: the ring of posted buffers.
struct RxSide {
    ring: Ring,
    bufs: Buffers,
    /// Buffers posted, in ring order (the host answers in this order).
    posted: VecDeque<u32>,
    /// A response taken off the ring early (by [`Nic::rx_ready`]), not yet handed out.
    stash: Option<NetResponse>,
    /// Buffers re-posted but not yet published.
    unpublished: u32,
    stats: NicStats,
}

impl RxSide {
    /// Queues buffer `b` on the ring (published later, in batches).
    fn post(&mut self, b: u32) {
        self.posted.push_back(b);
        self.ring.queue(NetRxRequest {
            id: b as u64,
            addr: self.bufs.addr(b),
            len: self.bufs.size as u32,
            flags: 0,
            reserved: [0; 5],
        });
        self.unpublished += 1;
    }

    /// The next response, stashed or from the ring.
    fn take(&mut self) -> Option<NetResponse> {
        self.stash
            .take()
            .or_else(|| self.ring.take_response::<NetResponse>().map(|(_, r)| r))
    }

    /// The next received frame: `(buffer, length)`. Bad responses are counted and their
    /// buffers re-posted.
    fn next_frame(&mut self) -> Option<(u32, usize)> {
        loop {
            let rsp = self.take()?;
            // The ring never answers more requests than were published.
            let b = self.posted.pop_front()?;
            let len = rsp.status;
            if len < ETH_HEADER as i64 || len > self.bufs.size as i64 {
                self.stats.rx_errors += 1;
                self.post(b);
                continue;
            }
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += len as u64;
            return Some((b, len as usize));
        }
    }

    /// Publishes re-posted buffers when the host's supply runs low or many are waiting,
    /// so a busy receiver does not ring a doorbell per frame.
    fn publish(&mut self, force: bool) {
        if self.unpublished == 0 {
            return;
        }
        let host_has = self.ring.outstanding() - self.unpublished;
        if force || host_has < self.ring.slots() / 2 || self.unpublished >= 64 {
            self.ring.publish();
            self.unpublished = 0;
        }
    }
}

/// The transmit half: the ring of frames and the free buffers.
struct TxSide {
    ring: Ring,
    bufs: Buffers,
    /// Buffers queued, in ring order (the host answers in this order).
    queued: VecDeque<u32>,
    /// Buffers the guest owns.
    free: Vec<u32>,
    /// Scratch buffer for frames that cannot be sent (smoltcp always gets a buffer).
    scratch: Vec<u8>,
    /// Frames queued since the last publish.
    unpublished: u32,
    stats: NicStats,
}

impl TxSide {
    /// Takes back the buffers of answered transmit requests.
    fn reap(&mut self) {
        while let Some((_, rsp)) = self.ring.take_response::<NetResponse>() {
            let Some(b) = self.queued.pop_front() else {
                break;
            };
            self.free.push(b);
            if rsp.status < 0 {
                self.stats.tx_errors += 1;
            }
        }
    }

    /// Builds a frame of `len` bytes with `f` in a free buffer and queues it.
    fn send<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        if self.free.is_empty() {
            self.reap();
        }
        let b = match self.free.pop() {
            Some(b) if len <= self.bufs.size && len >= ETH_HEADER as usize => b,
            other => {
                if let Some(b) = other {
                    self.free.push(b);
                }
                self.stats.tx_dropped += 1;
                if self.scratch.len() < len {
                    self.scratch.resize(len, 0);
                }
                return f(&mut self.scratch[..len]);
            }
        };
        // SAFETY: `b` came off the free list: the host holds no request for it.
        let r = f(unsafe { self.bufs.slice_mut(b, len) });
        self.queued.push_back(b);
        self.ring.queue(NetTxRequest {
            id: b as u64,
            addr: self.bufs.addr(b),
            len: len as u32,
            flags: 0,
            reserved: [0; 5],
        });
        self.unpublished += 1;
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += len as u64;
        r
    }
}

/// The NIC: both rings of one network device.
pub(crate) struct Nic {
    rx: RxSide,
    tx: TxSide,
    /// Largest frame (Ethernet header included).
    max_frame: usize,
}

/// Why a device could not be used as a NIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BadDevice;

impl Nic {
    /// Sets up the NIC of network device `dev`: allocates the buffers and posts every
    /// receive buffer to the host.
    pub(crate) fn new(dev: &DeviceInfo) -> Result<Nic, BadDevice> {
        let tx_ring = Ring::new(dev).ok_or(BadDevice)?;
        let mut second = *dev;
        second.ring = dev.ring2;
        let rx_ring = Ring::new(&second).ok_or(BadDevice)?;
        let mtu = if dev.mtu == 0 { 1500 } else { dev.mtu as usize };
        if !(576..=65535).contains(&mtu) {
            return Err(BadDevice);
        }
        let max_frame = ETH_HEADER as usize + mtu;
        let size = max_frame.next_multiple_of(64).max(MIN_BUFFER);
        let rx_count = rx_ring.slots().min(MAX_BUFFERS);
        let tx_count = tx_ring.slots().min(MAX_BUFFERS);
        let mut nic = Nic {
            rx: RxSide {
                ring: rx_ring,
                bufs: Buffers::new(rx_count, size),
                posted: VecDeque::with_capacity(rx_count as usize),
                stash: None,
                unpublished: 0,
                stats: NicStats::default(),
            },
            tx: TxSide {
                ring: tx_ring,
                bufs: Buffers::new(tx_count, size),
                queued: VecDeque::with_capacity(tx_count as usize),
                free: (0..tx_count).rev().collect(),
                scratch: Vec::new(),
                unpublished: 0,
                stats: NicStats::default(),
            },
            max_frame,
        };
        for b in 0..rx_count {
            nic.rx.post(b);
        }
        nic.rx.publish(true);
        Ok(nic)
    }

    /// Takes back answered transmit buffers (cheap; no exit).
    pub(crate) fn reap(&mut self) {
        self.tx.reap();
    }

    /// Publishes queued transmit frames (one doorbell at most) and re-posted receive
    /// buffers when the host runs low.
    pub(crate) fn flush(&mut self) {
        if self.tx.unpublished > 0 {
            self.tx.ring.publish();
            self.tx.unpublished = 0;
        }
        self.rx.publish(false);
    }

    /// Publishes everything queued on both rings, every re-posted receive buffer included
    /// (before sleeping: the host must have all buffers while the guest is away).
    pub(crate) fn flush_all(&mut self) {
        self.flush();
        self.rx.publish(true);
    }

    /// True if the host has published frames the guest has not taken yet.
    pub(crate) fn rx_ready(&mut self) -> bool {
        if self.rx.stash.is_none() {
            self.rx.stash = self.rx.ring.take_response::<NetResponse>().map(|(_, r)| r);
        }
        self.rx.stash.is_some()
    }

    /// True if every transmit buffer is in flight.
    pub(crate) fn tx_exhausted(&self) -> bool {
        self.tx.free.is_empty()
    }

    /// True if the host marked either ring broken.
    pub(crate) fn is_broken(&self) -> bool {
        self.rx.ring.is_broken() || self.tx.ring.is_broken()
    }

    /// The counters so far.
    pub(crate) fn stats(&self) -> NicStats {
        let (r, t) = (&self.rx.stats, &self.tx.stats);
        let (rr, tr) = (self.rx.ring.stats(), self.tx.ring.stats());
        NicStats {
            rx_frames: r.rx_frames,
            rx_bytes: r.rx_bytes,
            rx_errors: r.rx_errors,
            tx_frames: t.tx_frames,
            tx_bytes: t.tx_bytes,
            tx_errors: t.tx_errors,
            tx_dropped: t.tx_dropped,
            tx_full: t.tx_full,
            doorbells: rr.doorbells + tr.doorbells,
            publishes: rr.publishes + tr.publishes,
        }
    }
}

/// Lends smoltcp one received frame in place; the buffer goes back to the host after.
pub(crate) struct RxToken<'a> {
    rx: &'a mut RxSide,
    buf: u32,
    len: usize,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        // SAFETY: the host answered the request for this buffer, so the guest owns it until
        // it is posted again below.
        let r = f(unsafe { self.rx.bufs.slice(self.buf, self.len) });
        self.rx.post(self.buf);
        r
    }
}

/// Lends smoltcp a free transmit buffer; the frame is queued on the ring after.
pub(crate) struct TxToken<'a> {
    tx: &'a mut TxSide,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        self.tx.send(len, f)
    }
}

impl phy::Device for Nic {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let (buf, len) = self.rx.next_frame()?;
        if self.tx.free.is_empty() {
            self.tx.reap();
        }
        Some((
            RxToken {
                rx: &mut self.rx,
                buf,
                len,
            },
            TxToken { tx: &mut self.tx },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        if self.tx.free.is_empty() {
            self.tx.reap();
            if self.tx.free.is_empty() {
                self.tx.stats.tx_full += 1;
                // The host cannot answer frames it has not seen.
                if self.tx.unpublished > 0 {
                    self.tx.ring.publish();
                    self.tx.unpublished = 0;
                }
                return None;
            }
        }
        Some(TxToken { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.max_frame;
        caps
    }
}
