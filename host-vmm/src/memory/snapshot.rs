//! Frozen copies of guest memory: what a function sandbox is reset to and what new
//! sandboxes map copy-on-write.

use std::ptr::NonNull;

use crate::error::Error;

/// A frozen copy of guest memory in a memfd, shared by every VM made from it (each maps
/// it copy-on-write) and read back when a VM is reset to it.
pub struct MemorySnapshot {
    pub(super) fd: std::fs::File,
    view: NonNull<u8>,
    pub(super) size: u64,
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
        })
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
