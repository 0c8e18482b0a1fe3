//! The block device back end: a disk image file served over a shared ring.
//!
//! Requests carry many sectors each (up to [`MAX_REQUEST`]), many may be in flight, and
//! data moves straight between the file and guest memory with `pread`/`pwrite` (no bounce
//! buffer). Each request is copied out of its slot once and validated: operation, length
//! (a sector multiple, not zero, not over the limit), range (inside the disk, no
//! overflow), permission (no writes to a read-only disk) and the buffer (guest memory the
//! guest itself may write, for reads, or read, for writes). A bad request gets an error
//! status; it never reaches the file or host memory.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use std::sync::atomic::Ordering;

use pvrun_abi::{BlockRequest, BlockResponse, block_op, status};
use vm_memory::GuestMemoryMmap;

use super::ring::{Ring, RingError};
use super::worker::{DeviceCtx, Service};
use crate::error::Error;
use crate::memory::{MemoryMap, UserMemory, UserRange};

/// Bytes per sector.
pub const SECTOR_SIZE: u64 = 512;
/// Largest request in bytes.
pub const MAX_REQUEST: u64 = 4 << 20;

/// A `--disk NAME=PATH[,ro]` option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The device name the guest looks up.
    pub name: String,
    /// The image file.
    pub path: PathBuf,
    /// Refuse writes.
    pub read_only: bool,
}

impl DiskConfig {
    /// Parses `NAME=PATH[,ro]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}` is not NAME=PATH[,ro]"))?;
        let (path, read_only) = match rest.strip_suffix(",ro") {
            Some(p) => (p, true),
            None => (rest.strip_suffix(",rw").unwrap_or(rest), false),
        };
        super::worker::check_device_name(name)?;
        if path.is_empty() {
            return Err(format!("disk `{name}` has no image path"));
        }
        Ok(DiskConfig {
            name: name.to_string(),
            path: path.into(),
            read_only,
        })
    }
}

/// An opened disk image.
pub struct Disk {
    file: File,
    /// Capacity in bytes (the file size rounded down to a sector).
    pub capacity: u64,
    /// Refuse writes.
    pub read_only: bool,
}

impl Disk {
    /// Opens (and locks) the image of `cfg`.
    pub fn open(cfg: &DiskConfig) -> Result<Self, Error> {
        let fail = |why: String| Error::Disk {
            name: super::worker::printable(&cfg.name),
            path: cfg.path.display().to_string(),
            why,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.read_only)
            .open(&cfg.path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => fail(format!(
                    "the image does not exist (create one with `truncate -s 64M {}`)",
                    cfg.path.display()
                )),
                std::io::ErrorKind::PermissionDenied => fail(format!(
                    "permission denied{}",
                    if cfg.read_only {
                        ""
                    } else {
                        " (attach it with `,ro` to open it read-only)"
                    }
                )),
                _ => fail(e.to_string()),
            })?;
        let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
        if !meta.is_file() {
            return Err(fail("is not a regular file".into()));
        }
        let capacity = meta.len() / SECTOR_SIZE * SECTOR_SIZE;
        if capacity == 0 {
            return Err(fail(format!(
                "the image is smaller than one sector (grow it with `truncate -s 64M {}`)",
                cfg.path.display()
            )));
        }
        // Two VMs writing one image would corrupt it: take a lock like QEMU does.
        let op = if cfg.read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // A lock held a moment longer than its VM (a child forked elsewhere in this
        // process holds a copy of the descriptor until it execs) is waited out briefly;
        // a lock that stays is another VM's.
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
        // SAFETY: flock on a descriptor we own.
        while unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            if std::time::Instant::now() >= deadline {
                return Err(fail(
                    "the image is in use by another VM (it is locked)".into(),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(Disk {
            file,
            capacity,
            read_only: cfg.read_only,
        })
    }

    /// Validates and performs one request; returns the response.
    pub fn handle(
        &self,
        req: &BlockRequest,
        mem: &GuestMemoryMmap,
        map: &MemoryMap,
    ) -> BlockResponse {
        let status = BlockOp::parse(req, self.capacity, self.read_only, map)
            .and_then(|op| self.execute(&op, mem))
            .unwrap_or_else(|e| e);
        BlockResponse {
            id: req.id,
            status,
            reserved: [0; 6],
        }
    }

    /// Performs a validated request: the bytes transferred, or a negative status.
    pub fn execute(&self, op: &BlockOp, mem: &GuestMemoryMmap) -> Result<i64, i64> {
        let (write, offset, range) = match *op {
            BlockOp::Flush => {
                // SAFETY: fdatasync on a descriptor we own.
                return if unsafe { libc::fdatasync(self.file.as_raw_fd()) } == 0 {
                    Ok(0)
                } else {
                    Err(status::IO_ERROR)
                };
            }
            BlockOp::Read { offset, buf } => (false, offset, buf),
            BlockOp::Write { offset, buf } => (true, offset, buf),
        };
        let slice = mem.user_slice(&range).map_err(|e| e.status())?;
        let total = slice.len();
        let fd = self.file.as_raw_fd();
        let mut done = 0usize;
        while done < total {
            let at = u64::try_from(done)
                .ok()
                .and_then(|d| offset.checked_add(d))
                .and_then(|o| libc::off_t::try_from(o).ok())
                .ok_or(status::OUT_OF_RANGE)?;
            // The pointer comes from vm-memory's checked slice of the validated range, and
            // the kernel copies directly between the file and guest memory.
            let n = if write {
                let guard = slice.ptr_guard();
                // SAFETY: [ptr+done, ptr+total) lies in the validated guest slice.
                unsafe { libc::pwrite(fd, guard.as_ptr().add(done).cast(), total - done, at) }
            } else {
                let guard = slice.ptr_guard_mut();
                // SAFETY: as above; the guest may write this memory, so may the kernel.
                unsafe { libc::pread(fd, guard.as_ptr().add(done).cast(), total - done, at) }
            };
            match usize::try_from(n) {
                Ok(n) if n > 0 => done = done.saturating_add(n).min(total),
                Ok(_) if !write => {
                    // The image shrank under us: the rest reads as zeroes.
                    let rest = u64::try_from(done)
                        .ok()
                        .and_then(|d| range.skip(d))
                        .ok_or(status::IO_ERROR)?;
                    mem.write_user(&rest, &vec![0; total - done])
                        .map_err(|_| status::IO_ERROR)?;
                    done = total;
                }
                Ok(_) => return Err(status::IO_ERROR),
                Err(_) => {
                    if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(status::IO_ERROR);
                }
            }
        }
        i64::try_from(total).map_err(|_| status::BAD_LENGTH)
    }
}

/// A block request that passed validation: only these are executed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockOp {
    /// Read the disk from byte `offset` into `buf` (memory the guest may write).
    Read {
        /// Byte offset on the disk.
        offset: u64,
        /// The guest buffer.
        buf: UserRange,
    },
    /// Write `buf` (memory the guest may read) to the disk at byte `offset`.
    Write {
        /// Byte offset on the disk.
        offset: u64,
        /// The guest buffer.
        buf: UserRange,
    },
    /// Make every completed write durable.
    Flush,
}

impl BlockOp {
    /// Validates a request copied out of its slot, for a disk of `capacity` bytes:
    /// reserved fields, operation, length (a sector multiple, not zero, not over
    /// [`MAX_REQUEST`]), range (inside the disk, no overflow), permission, and the buffer
    /// (guest memory the guest itself may write, for reads, or read, for writes). Returns
    /// the status for the guest if the request is bad.
    pub fn parse(
        req: &BlockRequest,
        capacity: u64,
        read_only: bool,
        map: &MemoryMap,
    ) -> Result<BlockOp, i64> {
        if req.reserved != 0 || req.reserved2 != [0; 3] {
            return Err(status::BAD_ARGUMENT);
        }
        let write = match req.op {
            block_op::READ => false,
            block_op::WRITE => true,
            block_op::FLUSH => return Ok(BlockOp::Flush),
            _ => return Err(status::BAD_ARGUMENT),
        };
        let len = req.len;
        if len == 0 || !len.is_multiple_of(SECTOR_SIZE) || len > MAX_REQUEST {
            return Err(status::BAD_LENGTH);
        }
        let offset = req
            .sector
            .checked_mul(SECTOR_SIZE)
            .ok_or(status::OUT_OF_RANGE)?;
        if offset.checked_add(len).is_none_or(|end| end > capacity) {
            return Err(status::OUT_OF_RANGE);
        }
        if write && read_only {
            return Err(status::READ_ONLY);
        }
        // A read stores into guest memory: the buffer must be memory the guest may write.
        let buf = map
            .check_user(req.addr, len, !write)
            .map_err(|e| e.status())?;
        Ok(if write {
            BlockOp::Write { offset, buf }
        } else {
            BlockOp::Read { offset, buf }
        })
    }
}

/// The I/O thread's half of a block device: the disk and its request ring.
pub struct BlockService {
    /// The image.
    pub disk: Disk,
    /// The request ring.
    pub ring: Ring,
}

impl Service for BlockService {
    /// Serves requests until the ring is empty and the guest was told to ring again.
    fn serve(&mut self, dev: &DeviceCtx, _rang: bool, _revents: i16) -> Result<(), RingError> {
        loop {
            let n = self.ring.pending(&dev.mem)?;
            if n == 0 {
                if self.ring.idle_check(&dev.mem)? {
                    continue;
                }
                return Ok(());
            }
            for _ in 0..n {
                let req: BlockRequest = self.ring.take(&dev.mem)?;
                let rsp = self.disk.handle(&req, &dev.mem, &dev.map);
                self.ring.respond(&dev.mem, rsp);
            }
            dev.stats
                .requests
                .fetch_add(u64::from(n), Ordering::Relaxed);
            self.ring.publish(&dev.mem);
            dev.notify.signal();
        }
    }

    fn mark_broken(&self, mem: &GuestMemoryMmap) {
        self.ring.mark_broken(mem);
    }
}

#[cfg(test)]
mod tests;
