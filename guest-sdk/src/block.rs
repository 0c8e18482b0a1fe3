//! Block devices (disks) attached with `pvrun --disk NAME=PATH[,ro]`.
//!
//! ```ignore
//! pvrun::require_device!(block, "data"); // the host refuses to boot without it
//!
//! let mut disk = pvrun::block::Disk::open("data")?;
//! let mut buf = alloc::vec![0u8; 4096];
//! disk.read(0, &mut buf)?;
//! disk.write(4096, &buf)?;
//! disk.flush()?;
//!
//! // Many requests, one doorbell: the batch borrows the buffers until it is finished.
//! let (mut a, mut b) = ([0u8; 512], [0u8; 512]);
//! let mut batch = disk.batch();
//! batch.read(0, &mut a)?;
//! batch.read(512, &mut b)?;
//! for result in batch.finish()? {
//!     result?;
//! }
//! ```
//!
//! Offsets and lengths are in bytes and must be multiples of the sector size. Large
//! transfers are split into requests of at most [`Disk::max_request`] bytes, and as many
//! requests as the ring has slots are in flight at once, published with one doorbell
//! (fewer when the host is busy: it asks for doorbells only when it runs out of work).
//! Data moves directly between the image file and the caller's buffer.
//!
//! Nothing reaches the ring before [`Batch::finish`], and every blocking call returns
//! only once the host has answered all its requests, so the host never touches a buffer
//! that is no longer borrowed — even if a batch is leaked with `mem::forget`.

use alloc::vec::Vec;
use core::fmt;
use core::marker::PhantomData;
use core::sync::atomic::{AtomicU32, Ordering};

use pvrun_abi::{BlockRequest, BlockResponse, DeviceInfo, MAX_DEVICES, block_op, device, status};

use crate::boot_info;
use crate::ring::{Broken, Ring};

pub use crate::ring::RingStats as Stats;

/// Devices (by position in the boot-info device list) currently opened, one bit each.
static OPEN: AtomicU32 = AtomicU32::new(0);

/// Why a block operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// No device has this name.
    NotFound,
    /// The device is not a block device.
    NotBlock,
    /// The device is already open (a [`Disk`] is the only user of its ring).
    AlreadyOpen,
    /// The host described the device inconsistently (ring outside the device area, ...).
    BadDevice,
    /// An offset or length is not a multiple of the sector size (checked by the SDK).
    Unaligned,
    /// The host refused the buffer: not memory the guest may use for this transfer
    /// ([`status::BAD_ADDRESS`]).
    BadAddress,
    /// The host refused the length ([`status::BAD_LENGTH`]).
    BadLength,
    /// The host refused the request: unknown operation or a reserved field set
    /// ([`status::BAD_ARGUMENT`]).
    BadArgument,
    /// The host's I/O on the image file failed ([`status::IO_ERROR`]).
    Io,
    /// A write to a read-only disk ([`status::READ_ONLY`]; also checked by the SDK).
    ReadOnly,
    /// The request reaches past the end of the disk ([`status::OUT_OF_RANGE`]; also
    /// checked by the SDK).
    OutOfRange,
    /// The host stopped serving the device's ring because it was corrupted
    /// ([`status::BROKEN`] or the ring's `RING_BROKEN` status). The disk is unusable.
    Broken,
    /// The host answered a request that was not asked (wrong id or length). The disk is
    /// unusable afterwards.
    Protocol,
    /// Another negative status from the host.
    Status(i64),
}

impl Error {
    /// The error for a negative host status.
    pub fn from_status(s: i64) -> Error {
        match s {
            status::BAD_ADDRESS => Error::BadAddress,
            status::BAD_LENGTH => Error::BadLength,
            status::BAD_ARGUMENT => Error::BadArgument,
            status::IO_ERROR => Error::Io,
            status::READ_ONLY => Error::ReadOnly,
            status::OUT_OF_RANGE => Error::OutOfRange,
            status::BROKEN => Error::Broken,
            s => Error::Status(s),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotFound => f.write_str("no device with this name is attached"),
            Error::NotBlock => f.write_str("the device is not a block device"),
            Error::AlreadyOpen => f.write_str("the device is already open"),
            Error::BadDevice => f.write_str("the host described the device inconsistently"),
            Error::Unaligned => {
                f.write_str("offset or length is not a multiple of the sector size")
            }
            Error::BadAddress => f.write_str("the host refused the buffer address (BAD_ADDRESS)"),
            Error::BadLength => f.write_str("the host refused the request length (BAD_LENGTH)"),
            Error::BadArgument => f.write_str("the host refused the request (BAD_ARGUMENT)"),
            Error::Io => f.write_str("I/O error on the host's disk image (IO_ERROR)"),
            Error::ReadOnly => f.write_str("the disk is read-only (READ_ONLY)"),
            Error::OutOfRange => f.write_str("request past the end of the disk (OUT_OF_RANGE)"),
            Error::Broken => f.write_str("the host stopped serving the device (BROKEN)"),
            Error::Protocol => f.write_str("the host answered a request that was not asked"),
            Error::Status(s) => write!(f, "host status {s}"),
        }
    }
}

impl From<Broken> for Error {
    fn from(_: Broken) -> Error {
        Error::Broken
    }
}

/// One ring request of a transfer (a transfer is split into requests of at most
/// `max_request` bytes).
#[derive(Clone, Copy, Debug)]
struct Chunk {
    op: u32,
    sector: u64,
    addr: u64,
    len: u64,
    /// The caller's request this chunk belongs to (an index into the batch results).
    owner: usize,
}

/// An open block device.
pub struct Disk {
    /// Position in the boot-info device list (the bit in [`OPEN`]).
    pos: usize,
    info: &'static DeviceInfo,
    ring: Ring,
    /// Bytes per request, a multiple of the sector size.
    chunk: u64,
    next_id: u64,
    /// Set once the ring is unusable ([`Error::Broken`] or [`Error::Protocol`]).
    failed: Option<Error>,
}

impl fmt::Debug for Disk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Disk")
            .field("name", &self.name())
            .field("capacity", &self.capacity())
            .field("sector_size", &self.sector_size())
            .field("read_only", &self.read_only())
            .finish()
    }
}

impl Disk {
    /// Opens the block device `name` (attached with `--disk NAME=PATH`).
    pub fn open(name: &str) -> Result<Disk, Error> {
        let bi = boot_info();
        let count = (bi.device_count as usize).min(MAX_DEVICES);
        let (pos, info) = bi.devices[..count]
            .iter()
            .enumerate()
            .find(|(_, d)| d.name() == name)
            .ok_or(Error::NotFound)?;
        if info.kind != device::BLOCK {
            return Err(Error::NotBlock);
        }
        let ss = info.sector_size as u64;
        if ss == 0
            || !ss.is_power_of_two()
            || !info.capacity.is_multiple_of(ss)
            || info.max_request < ss
        {
            return Err(Error::BadDevice);
        }
        let ring = Ring::new(info).ok_or(Error::BadDevice)?;
        if ring.is_broken() {
            return Err(Error::Broken);
        }
        let bit = 1u32 << pos;
        if OPEN.fetch_or(bit, Ordering::Relaxed) & bit != 0 {
            return Err(Error::AlreadyOpen);
        }
        Ok(Disk {
            pos,
            info,
            ring,
            chunk: info.max_request / ss * ss,
            next_id: 1,
            failed: None,
        })
    }

    /// The device name.
    pub fn name(&self) -> &'static str {
        self.info.name()
    }

    /// Capacity in bytes (a multiple of the sector size).
    pub fn capacity(&self) -> u64 {
        self.info.capacity
    }

    /// Bytes per sector: offsets and lengths must be multiples of it.
    pub fn sector_size(&self) -> u64 {
        self.info.sector_size as u64
    }

    /// True if the disk was attached read-only.
    pub fn read_only(&self) -> bool {
        self.info.flags & device::FLAG_READ_ONLY != 0
    }

    /// The largest single request in bytes (longer transfers are split).
    pub fn max_request(&self) -> u64 {
        self.info.max_request
    }

    /// Number of ring slots: how many requests can be in flight at once.
    pub fn slots(&self) -> u32 {
        self.ring.slots()
    }

    /// Counters of requests, publishes, doorbells and waits since the disk was opened.
    pub fn stats(&self) -> Stats {
        self.ring.stats()
    }

    /// Reads `buf.len()` bytes at byte `offset` (both multiples of the sector size).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let (addr, len) = (buf.as_mut_ptr() as u64, buf.len() as u64);
        self.transfer(block_op::READ, offset, addr, len)
    }

    /// Writes `buf` at byte `offset` (both multiples of the sector size).
    pub fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), Error> {
        let (addr, len) = (buf.as_ptr() as u64, buf.len() as u64);
        self.transfer(block_op::WRITE, offset, addr, len)
    }

    /// Makes every completed write durable (the host calls `fdatasync`).
    pub fn flush(&mut self) -> Result<(), Error> {
        let c = Chunk {
            op: block_op::FLUSH,
            sector: 0,
            addr: 0,
            len: 0,
            owner: 0,
        };
        let mut result = Ok(());
        self.run(
            1,
            |_| c,
            |_, s| {
                if s < 0 {
                    result = Err(Error::from_status(s));
                }
            },
        )?;
        result
    }

    /// Starts a batch of requests that go out together (see [`Batch`]).
    pub fn batch<'b>(&mut self) -> Batch<'_, 'b> {
        Batch {
            disk: self,
            chunks: Vec::new(),
            ops: 0,
            _bufs: PhantomData,
        }
    }

    /// Checks a transfer and returns the number of requests it takes.
    fn check(&self, op: u32, offset: u64, len: u64) -> Result<u64, Error> {
        let ss = self.sector_size();
        if !offset.is_multiple_of(ss) || !len.is_multiple_of(ss) {
            return Err(Error::Unaligned);
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.capacity())
        {
            return Err(Error::OutOfRange);
        }
        if op == block_op::WRITE && self.read_only() {
            return Err(Error::ReadOnly);
        }
        Ok(len.div_ceil(self.chunk))
    }

    /// Request `i` of the transfer `offset, addr, len`.
    fn chunk_of(&self, op: u32, offset: u64, addr: u64, len: u64, i: u64, owner: usize) -> Chunk {
        let at = i * self.chunk;
        Chunk {
            op,
            sector: (offset + at) / self.sector_size(),
            addr: addr + at,
            len: (len - at).min(self.chunk),
            owner,
        }
    }

    /// A blocking read or write of the buffer at `addr, len` (borrowed by the caller for
    /// the duration of the call).
    fn transfer(&mut self, op: u32, offset: u64, addr: u64, len: u64) -> Result<(), Error> {
        let n = self.check(op, offset, len)?;
        let (ss, chunk) = (self.sector_size(), self.chunk);
        let mut result = Ok(());
        self.run(
            n as usize,
            |i| Chunk {
                op,
                sector: (offset + i as u64 * chunk) / ss,
                addr: addr + i as u64 * chunk,
                len: (len - i as u64 * chunk).min(chunk),
                owner: 0,
            },
            |c, s| {
                if result.is_ok() {
                    if s < 0 {
                        result = Err(Error::from_status(s));
                    } else if s as u64 != c.len {
                        result = Err(Error::Protocol);
                    }
                }
            },
        )?;
        result
    }

    /// Runs requests `chunk(0..n)` through the ring, keeping as many in flight as there
    /// are slots, and calls `done` with each request and its status. A flush waits for
    /// everything before it and holds back everything after it until it completes.
    ///
    /// Returns only when the host answered every published request (or stopped serving
    /// the ring), so the buffers the requests name are free again.
    fn run(
        &mut self,
        n: usize,
        chunk: impl Fn(usize) -> Chunk,
        mut done: impl FnMut(&Chunk, i64),
    ) -> Result<(), Error> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let base = self.next_id;
        self.next_id = self.next_id.wrapping_add(n as u64);
        let (mut next, mut completed) = (0usize, 0usize);
        let mut flush_in_flight = false;
        while completed < n {
            let mut queued = false;
            while next < n && self.ring.free() > 0 && !flush_in_flight {
                let c = chunk(next);
                if c.op == block_op::FLUSH {
                    if self.ring.outstanding() > 0 {
                        break; // a flush covers only completed writes
                    }
                    flush_in_flight = true;
                }
                self.ring.queue(BlockRequest {
                    id: base.wrapping_add(next as u64),
                    op: c.op,
                    reserved: 0,
                    sector: c.sector,
                    addr: c.addr,
                    len: c.len,
                    reserved2: [0; 3],
                });
                next += 1;
                queued = true;
            }
            if queued {
                self.ring.publish();
            }
            if let Err(e) = self.ring.wait_response() {
                self.failed = Some(Error::Broken);
                return Err(e.into());
            }
            while let Some((_, rsp)) = self.ring.take_response::<BlockResponse>() {
                // The host answers in order, each request in its own slot.
                if rsp.id != base.wrapping_add(completed as u64) {
                    return Err(self.fail_protocol());
                }
                let c = chunk(completed);
                if c.op == block_op::FLUSH {
                    flush_in_flight = false;
                }
                done(&c, rsp.status);
                completed += 1;
            }
        }
        Ok(())
    }

    /// After a response that answers no request: wait until the host has answered
    /// everything published (it may still write into the buffers), then give up on the
    /// disk.
    fn fail_protocol(&mut self) -> Error {
        self.failed = Some(Error::Protocol);
        while self.ring.outstanding() > 0 {
            if self.ring.wait_response().is_err() {
                break;
            }
            while self.ring.take_response::<BlockResponse>().is_some() {}
        }
        Error::Protocol
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        OPEN.fetch_and(!(1u32 << self.pos), Ordering::Relaxed);
    }
}

/// A batch of reads, writes and flushes that go to the host together.
///
/// The batch borrows its buffers until it is finished. [`finish`](Batch::finish) publishes
/// up to a ring's worth of requests with one doorbell, keeps the ring full as responses
/// come in and returns when every request is answered, with one result per request
/// (in the order they were added): the bytes transferred or the error. Requests in a batch
/// may be served in any order, except that a flush waits for every request before it and
/// holds back every request after it.
///
/// Nothing is sent before `finish`; a batch dropped without `finish` performs nothing.
#[must_use = "a batch does nothing until `finish` is called"]
pub struct Batch<'d, 'b> {
    disk: &'d mut Disk,
    chunks: Vec<Chunk>,
    ops: usize,
    _bufs: PhantomData<&'b mut [u8]>,
}

impl<'d, 'b> Batch<'d, 'b> {
    /// Adds a read of `buf.len()` bytes at `offset` into `buf`; returns the request's index
    /// in the results. Fails at once if the offset or length is not sector aligned or the
    /// range lies past the end of the disk.
    pub fn read(&mut self, offset: u64, buf: &'b mut [u8]) -> Result<usize, Error> {
        let (addr, len) = (buf.as_mut_ptr() as u64, buf.len() as u64);
        self.add(block_op::READ, offset, addr, len)
    }

    /// Adds a write of `buf` at `offset`; returns the request's index in the results.
    /// Fails at once if the offset or length is not sector aligned, the range lies past the
    /// end of the disk or the disk is read-only.
    pub fn write(&mut self, offset: u64, buf: &'b [u8]) -> Result<usize, Error> {
        let (addr, len) = (buf.as_ptr() as u64, buf.len() as u64);
        self.add(block_op::WRITE, offset, addr, len)
    }

    /// Adds a flush: it starts when every earlier request of the batch has completed and
    /// makes the completed writes durable; later requests start after it. Returns the
    /// request's index in the results.
    pub fn flush(&mut self) -> usize {
        let owner = self.ops;
        self.ops += 1;
        self.chunks.push(Chunk {
            op: block_op::FLUSH,
            sector: 0,
            addr: 0,
            len: 0,
            owner,
        });
        owner
    }

    /// Number of requests added so far.
    pub fn len(&self) -> usize {
        self.ops
    }

    /// True if no request was added.
    pub fn is_empty(&self) -> bool {
        self.ops == 0
    }

    fn add(&mut self, op: u32, offset: u64, addr: u64, len: u64) -> Result<usize, Error> {
        let n = self.disk.check(op, offset, len)?;
        let owner = self.ops;
        self.ops += 1;
        self.chunks.reserve(n as usize);
        for i in 0..n {
            let c = self.disk.chunk_of(op, offset, addr, len, i, owner);
            self.chunks.push(c);
        }
        Ok(owner)
    }

    /// Sends every request and waits for all of them. Returns one result per request, in
    /// the order they were added: `Ok(bytes transferred)` or the request's error; the
    /// outer error means the device failed as a whole ([`Error::Broken`],
    /// [`Error::Protocol`]).
    pub fn finish(mut self) -> Result<Vec<Result<usize, Error>>, Error> {
        let chunks = core::mem::take(&mut self.chunks);
        let mut results: Vec<Result<usize, Error>> = alloc::vec![Ok(0); self.ops];
        self.disk.run(
            chunks.len(),
            |i| chunks[i],
            |c, s| {
                let r = &mut results[c.owner];
                if let Ok(n) = r {
                    *r = if s >= 0 {
                        Ok(*n + s as usize)
                    } else {
                        Err(Error::from_status(s))
                    };
                }
            },
        )?;
        Ok(results)
    }
}

impl fmt::Debug for Batch<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("disk", &self.disk.name())
            .field("requests", &self.ops)
            .finish()
    }
}
