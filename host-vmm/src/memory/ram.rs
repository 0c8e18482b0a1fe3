//! The host mapping behind guest memory.
//!
//! [`GuestRam`] is one anonymous mapping, 2 MiB aligned in the host so that ranges advised
//! `MADV_HUGEPAGE` line up with the guest's 2 MiB pages. All access goes through
//! vm-memory's checked accessors; accesses on the guest's behalf take a
//! [`UserRange`](super::UserRange), which only the memory map's access check makes.

use std::ptr::NonNull;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use super::snapshot::MemorySnapshot;
use crate::error::Error;
use crate::layout::{LARGE_PAGE_SIZE, PAGE_SIZE};

/// Owns the raw host mapping behind the guest memory and unmaps it on drop.
struct HostMapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory; access is coordinated through vm-memory.
unsafe impl Send for HostMapping {}
// SAFETY: as above; the struct itself holds no interior state.
unsafe impl Sync for HostMapping {}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // SAFETY: we created this mapping in `GuestRam::new` and nothing refers to it once
        // the GuestMemoryMmap (dropped first, see field order) is gone.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// The guest's physical memory.
pub struct GuestRam {
    // Field order matters: `mem` must drop before `_mapping` unmaps the memory.
    mem: GuestMemoryMmap,
    _mapping: HostMapping,
    size: u64,
}

impl GuestRam {
    /// Maps `size` bytes of zeroed guest memory at guest address 0.
    pub fn new(size: u64) -> Result<Self, Error> {
        Self::map(size, None)
    }

    /// Maps guest memory as a private copy-on-write view of a snapshot: pages come from
    /// the snapshot until the guest (or host) writes them.
    pub fn from_snapshot(snap: &MemorySnapshot) -> Result<Self, Error> {
        Self::map(snap.size, Some(&snap.fd))
    }

    fn map(size: u64, backing: Option<&std::fs::File>) -> Result<Self, Error> {
        let len = usize::try_from(size).map_err(|_| Error::BadMemSize(size))?;
        let align = LARGE_PAGE_SIZE as usize;
        let reserve = len + align;
        // SAFETY: a fresh private anonymous mapping; the result is checked below.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(Error::Mmap(std::io::Error::last_os_error()));
        }
        // Trim the reservation to a 2 MiB aligned window so guest large pages can be backed
        // by host huge pages.
        let raw_addr = raw as usize;
        let base = raw_addr.next_multiple_of(align);
        let head = base - raw_addr;
        let tail = reserve - head - len;
        // SAFETY: both ranges are inside the reservation we just made and not used.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((base + len) as *mut libc::c_void, tail);
            }
        }
        if let Some(file) = backing {
            use std::os::fd::AsRawFd;
            // SAFETY: replaces our own reserved window with a private mapping of the file.
            let m = unsafe {
                libc::mmap(
                    base as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    file.as_raw_fd(),
                    0,
                )
            };
            if m == libc::MAP_FAILED {
                let e = std::io::Error::last_os_error();
                // SAFETY: unmapping our own reservation.
                unsafe { libc::munmap(base as *mut libc::c_void, len) };
                return Err(Error::Mmap(e));
            }
        }
        let mapping = HostMapping {
            base: NonNull::new(base as *mut u8).expect("mmap returned a non-null address"),
            len,
        };
        // SAFETY: [base, base+len) is a valid mapping we own for as long as `mapping` lives,
        // and `mapping` outlives the region (field order in GuestRam).
        let region = unsafe {
            MmapRegion::build_raw(
                mapping.base.as_ptr(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            )
        }
        .map_err(|e| Error::Mmap(std::io::Error::other(e.to_string())))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| Error::Mmap(std::io::Error::other("guest region overflows")))?;
        let mem = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| Error::Mmap(std::io::Error::other(e.to_string())))?;
        Ok(GuestRam {
            mem,
            _mapping: mapping,
            size,
        })
    }

    /// The vm-memory view, for checked reads and writes.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host address of guest address 0 (only for registering the memory slot with KVM).
    pub fn host_base(&self) -> u64 {
        self._mapping.base.as_ptr() as u64
    }

    /// Advises `[start, start+len)` as `MADV_HUGEPAGE`, so the guest's 2 MiB pages there are
    /// backed by host huge pages: a first touch then costs ~0.5 µs per 4 KiB instead of
    /// ~4-10 µs, but the first touch of each 2 MiB chunk zeroes all of it (~150 µs).
    pub fn advise_huge(&self, start: u64, len: u64) {
        let Some(end) = start.checked_add(len) else {
            return;
        };
        if end > self.size || len == 0 {
            return;
        }
        let addr = self.host_base() + start;
        // SAFETY: the range lies inside our own mapping; the advice does not change contents.
        unsafe {
            libc::madvise(addr as *mut libc::c_void, len as usize, libc::MADV_HUGEPAGE);
        }
    }

    /// Replaces the (untouched) memory with a copy-on-write view of `snap`, at the same
    /// host address, so a KVM memory slot already registered over it stays valid.
    pub fn map_snapshot(&self, snap: &MemorySnapshot) -> Result<(), Error> {
        use std::os::fd::AsRawFd;
        if snap.size != self.size {
            return Err(Error::Layout("snapshot and memory sizes differ".into()));
        }
        // SAFETY: replaces our own mapping, at its own address and length, with a private
        // mapping of the snapshot file.
        let m = unsafe {
            libc::mmap(
                self.host_base() as *mut libc::c_void,
                self.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                snap.fd.as_raw_fd(),
                0,
            )
        };
        if m == libc::MAP_FAILED {
            return Err(Error::Mmap(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Copies every page the guest or host has touched into a new memory snapshot.
    pub fn snapshot(&self) -> Result<MemorySnapshot, Error> {
        let pages = (self.size / PAGE_SIZE) as usize;
        let mut resident = vec![0u8; pages];
        // SAFETY: mincore reads page residency of our own mapping into a vector of the
        // right length (one byte per page).
        let r = unsafe {
            libc::mincore(
                self.host_base() as *mut libc::c_void,
                self.size as usize,
                resident.as_mut_ptr(),
            )
        };
        if r != 0 {
            return Err(Error::Mmap(std::io::Error::last_os_error()));
        }
        let mut snap = MemorySnapshot::create(self.size)?;
        for (i, _) in resident.iter().enumerate().filter(|(_, r)| **r & 1 != 0) {
            let off = i as u64 * PAGE_SIZE;
            let dst = &mut snap.view_mut()[off as usize..(off + PAGE_SIZE) as usize];
            self.mem
                .read_slice(dst, GuestAddress(off))
                .map_err(|e| Error::Layout(format!("snapshot copy: {e}")))?;
        }
        snap.seal();
        Ok(snap)
    }

    /// Restores the 4 KiB pages set in `bitmap` (bit `i` = page `i`) from `snap`; returns
    /// how many pages it copied.
    pub fn restore_pages(&self, snap: &MemorySnapshot, bitmap: &[u64]) -> usize {
        let mut n = 0;
        for (w, &word) in bitmap.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let page = (w as u64 * 64 + b) * PAGE_SIZE;
                self.restore_range(snap, page, PAGE_SIZE);
                n += 1;
            }
        }
        n
    }

    /// Restores `[start, start+len)` (clipped to memory) from `snap`.
    pub fn restore_range(&self, snap: &MemorySnapshot, start: u64, len: u64) {
        let end = start.saturating_add(len).min(self.size).min(snap.size);
        if start >= end {
            return;
        }
        let src = &snap.view()[start as usize..end as usize];
        let _ = self.mem.write_slice(src, GuestAddress(start));
    }
}
