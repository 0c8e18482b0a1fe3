//! Frozen copies of guest memory: what a function sandbox is reset to and what new
//! sandboxes map copy-on-write.

use std::ptr::NonNull;

use crate::error::Error;

/// A frozen copy of guest memory in a memfd (or a snapshot file), shared by every VM made
/// from it (each maps it copy-on-write) and read back when a VM is reset to it.
pub struct MemorySnapshot {
    pub(super) fd: std::fs::File,
    view: NonNull<u8>,
    pub(super) size: u64,
    /// Where guest address 0 is in `fd` (0 for a memfd; the data offset of a file).
    pub(super) offset: u64,
}

// SAFETY: after `seal` the view is read-only memory owned by this struct.
unsafe impl Send for MemorySnapshot {}
// SAFETY: as above: shared read-only access.
unsafe impl Sync for MemorySnapshot {}

impl MemorySnapshot {
    pub(super) fn create(size: u64) -> Result<Self, Error> {
        use std::os::fd::FromRawFd;
        // SAFETY: memfd_create with a static NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"pvrun-snapshot".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Mmap(std::io::Error::last_os_error()));
        }
        // SAFETY: a descriptor we just created and now own.
        let fd = unsafe { std::fs::File::from_raw_fd(fd) };
        fd.set_len(size).map_err(Error::Mmap)?;
        use std::os::fd::AsRawFd;
        // SAFETY: a shared mapping of our own memfd, checked below.
        let view = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if view == libc::MAP_FAILED {
            return Err(Error::Mmap(std::io::Error::last_os_error()));
        }
        Ok(MemorySnapshot {
            fd,
            view: NonNull::new(view.cast()).expect("mmap returned a non-null address"),
            size,
            offset: 0,
        })
    }

    /// Guest memory of `size` bytes stored in `file` from `offset` (page aligned) on: a
    /// read-only view of the file, which VMs map copy-on-write (`MAP_PRIVATE`), so all of
    /// them, in every process, share the page cache's copy. The caller has checked that
    /// the file holds `offset + size` bytes.
    pub fn from_file(file: std::fs::File, offset: u64, size: u64) -> Result<Self, Error> {
        use std::os::fd::AsRawFd;
        let len = usize::try_from(size).map_err(|_| Error::BadMemSize(size))?;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| Error::Layout("snapshot data offset out of range".into()))?;
        // SAFETY: a new read-only private mapping of a file we own; checked below.
        let view = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                off,
            )
        };
        if view == libc::MAP_FAILED {
            return Err(Error::Mmap(std::io::Error::last_os_error()));
        }
        Ok(MemorySnapshot {
            fd: file,
            view: NonNull::new(view.cast()).expect("mmap returned a non-null address"),
            size,
            offset,
        })
    }

    /// The guest memory, read-only.
    pub fn bytes(&self) -> &[u8] {
        self.view()
    }

    /// The 4 KiB pages that may hold data, as sorted `(first, end)` guest ranges: the
    /// backing file's data extents (`SEEK_DATA`/`SEEK_HOLE`); holes read as zeroes.
    pub fn data_ranges(&self) -> Vec<(u64, u64)> {
        use std::os::fd::AsRawFd;
        let fd = self.fd.as_raw_fd();
        let end = self.offset + self.size;
        let mut out = Vec::new();
        let mut at = self.offset;
        while at < end {
            // SAFETY: lseek on our own descriptor.
            let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
            if data < 0 || data as u64 >= end {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let hole = if hole < 0 {
                end
            } else {
                (hole as u64).min(end)
            };
            let first =
                (data as u64 - self.offset) / crate::layout::PAGE_SIZE * crate::layout::PAGE_SIZE;
            let last = (hole - self.offset).next_multiple_of(crate::layout::PAGE_SIZE);
            out.push((first, last.min(self.size)));
            at = hole.max(data as u64 + 1);
        }
        out
    }

    pub(super) fn view(&self) -> &[u8] {
        // SAFETY: `view` maps `size` bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.view.as_ptr(), self.size as usize) }
    }

    pub(super) fn view_mut(&mut self) -> &mut [u8] {
        // SAFETY: only used while building the snapshot, before `seal` makes it read-only.
        unsafe { std::slice::from_raw_parts_mut(self.view.as_ptr(), self.size as usize) }
    }

    pub(super) fn seal(&self) {
        // SAFETY: our own mapping; from now on it is only read.
        unsafe {
            libc::mprotect(
                self.view.as_ptr().cast(),
                self.size as usize,
                libc::PROT_READ,
            );
        }
    }

    /// Size of the memory it holds.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Drop for MemorySnapshot {
    fn drop(&mut self) {
        // SAFETY: unmapping our own view.
        unsafe { libc::munmap(self.view.as_ptr().cast(), self.size as usize) };
    }
}
