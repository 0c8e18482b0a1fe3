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

use pvrun_abi::{BlockRequest, BlockResponse, block_op, status};
use vm_memory::GuestMemoryMmap;

use crate::error::Error;
use crate::memory::{MemoryMap, UserMemory};

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
        check_device_name(name)?;
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

/// Checks a device name: 1-31 bytes of `[A-Za-z0-9_.-]`.
pub fn check_device_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 31
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    {
        return Err(format!(
            "device name `{name}` must be 1-31 characters of letters, digits, `_`, `.`, `-`"
        ));
    }
    Ok(())
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
            name: cfg.name.clone(),
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
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            return Err(fail(
                "the image is in use by another VM (it is locked)".into(),
            ));
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
        let status = self.execute(req, mem, map).unwrap_or_else(|e| e);
        BlockResponse {
            id: req.id,
            status,
            reserved: [0; 6],
        }
    }

    fn execute(
        &self,
        req: &BlockRequest,
        mem: &GuestMemoryMmap,
        map: &MemoryMap,
    ) -> Result<i64, i64> {
        if req.reserved != 0 || req.reserved2 != [0; 3] {
            return Err(status::BAD_ARGUMENT);
        }
        let write = match req.op {
            block_op::READ => false,
            block_op::WRITE => true,
            block_op::FLUSH => {
                // SAFETY: fdatasync on a descriptor we own.
                return if unsafe { libc::fdatasync(self.file.as_raw_fd()) } == 0 {
                    Ok(0)
                } else {
                    Err(status::IO_ERROR)
                };
            }
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
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.capacity)
        {
            return Err(status::OUT_OF_RANGE);
        }
        if write && self.read_only {
            return Err(status::READ_ONLY);
        }
        // A read stores into guest memory: the buffer must be memory the guest may write.
        let range = map
            .check_user(req.addr, len, !write)
            .map_err(|e| e.status())?;
        let slice = mem.user_slice(&range).map_err(|e| e.status())?;
        let fd = self.file.as_raw_fd();
        let mut done = 0usize;
        let total = len as usize;
        while done < total {
            // The pointer comes from vm-memory's checked slice of the validated range, and
            // the kernel copies directly between the file and guest memory.
            let n = if write {
                let guard = slice.ptr_guard();
                // SAFETY: [ptr+done, ptr+total) lies in the validated guest slice.
                unsafe {
                    libc::pwrite(
                        fd,
                        guard.as_ptr().add(done).cast(),
                        total - done,
                        (offset + done as u64) as libc::off_t,
                    )
                }
            } else {
                let guard = slice.ptr_guard_mut();
                // SAFETY: as above; the guest may write this memory, so may the kernel.
                unsafe {
                    libc::pread(
                        fd,
                        guard.as_ptr().add(done).cast(),
                        total - done,
                        (offset + done as u64) as libc::off_t,
                    )
                }
            };
            match n {
                n if n > 0 => done += n as usize,
                0 if !write => {
                    // The image shrank under us: the rest reads as zeroes.
                    let rest = range.skip(done as u64).ok_or(status::IO_ERROR)?;
                    mem.write_user(&rest, &vec![0; total - done])
                        .map_err(|_| status::IO_ERROR)?;
                    done = total;
                }
                _ => {
                    if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(status::IO_ERROR);
                }
            }
        }
        Ok(len as i64)
    }
}
