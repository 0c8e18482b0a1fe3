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
    /// Mapped from a snapshot file (its pages hold data before they are touched).
    file_backed: bool,
    /// A private copy-on-write view of a snapshot (from [`GuestRam::from_snapshot`] or
    /// [`GuestRam::map_snapshot`]): dropping a page brings back the snapshot's copy.
    snapshot_view: std::sync::atomic::AtomicBool,
}

impl GuestRam {
    /// Maps `size` bytes of zeroed guest memory at guest address 0.
    pub fn new(size: u64) -> Result<Self, Error> {
        Self::map(size, None, 0)
    }

    /// Maps guest memory as a private copy-on-write view of a snapshot: pages come from
    /// the snapshot until the guest (or host) writes them.
    pub fn from_snapshot(snap: &MemorySnapshot) -> Result<Self, Error> {
        Self::map(snap.size, Some(&snap.fd), snap.offset)
    }

    fn map(size: u64, backing: Option<&std::fs::File>, offset: u64) -> Result<Self, Error> {
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
                    offset as libc::off_t,
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
            file_backed: backing.is_some(),
            snapshot_view: std::sync::atomic::AtomicBool::new(backing.is_some()),
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
                snap.offset as libc::off_t,
            )
        };
        if m == libc::MAP_FAILED {
            return Err(Error::Mmap(std::io::Error::last_os_error()));
        }
        self.snapshot_view
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Whether this is a private copy-on-write view of a snapshot.
    pub fn is_snapshot_view(&self) -> bool {
        self.snapshot_view
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// For a copy-on-write view of a snapshot whose contents equal the snapshot's again
    /// (just reset): drops every private copy and the host page tables over them, so the
    /// memory holds nothing of its own until the guest next writes (KVM's mappings of the
    /// range are dropped with them, through its MMU notifier). Returns false, doing
    /// nothing, for memory that is not such a view (dropping its pages would zero them).
    pub fn drop_private_pages(&self) -> Result<bool, Error> {
        if !self
            .snapshot_view
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(false);
        }
        // SAFETY: our own mapping, whole; for a private file mapping MADV_DONTNEED only
        // discards private copies, so every page reads as the snapshot's copy again.
        let r = unsafe {
            libc::madvise(
                self.host_base() as *mut libc::c_void,
                self.size as usize,
                libc::MADV_DONTNEED,
            )
        };
        if r != 0 {
            return Err(Error::Mmap(std::io::Error::last_os_error()));
        }
        Ok(true)
    }

    /// Copies every page that holds data into a new memory snapshot. Which pages those are
    /// comes from `/proc/self/pagemap`: present in RAM *or swapped out* (`mincore`, used
    /// before, reports a swapped-out anonymous page as absent, and it became zeroes in
    /// every sandbox). Memory mapped from a snapshot file is copied whole, since its pages
    /// hold data even where they were never faulted in.
    pub fn snapshot(&self) -> Result<MemorySnapshot, Error> {
        let mut snap = MemorySnapshot::create(self.size)?;
        let pages = self.size / PAGE_SIZE;
        let copy = |page: u64, snap: &mut MemorySnapshot| -> Result<(), Error> {
            let off = page * PAGE_SIZE;
            let dst = &mut snap.view_mut()[off as usize..(off + PAGE_SIZE) as usize];
            self.mem
                .read_slice(dst, GuestAddress(off))
                .map_err(|e| Error::Layout(format!("snapshot copy: {e}")))
        };
        if self.file_backed {
            for page in 0..pages {
                copy(page, &mut snap)?;
            }
        } else {
            let pagemap = std::fs::File::open("/proc/self/pagemap").map_err(Error::Mmap)?;
            const CHUNK: u64 = 8192;
            let mut entries = vec![0u8; (CHUNK * 8) as usize];
            let mut first = 0;
            while first < pages {
                let n = CHUNK.min(pages - first);
                let buf = &mut entries[..(n * 8) as usize];
                let at = (self.host_base() / PAGE_SIZE + first) * 8;
                std::os::unix::fs::FileExt::read_exact_at(&pagemap, buf, at)
                    .map_err(Error::Mmap)?;
                for i in pages_with_data(buf) {
                    copy(first + i as u64, &mut snap)?;
                }
                first += n;
            }
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

/// The pages (indices into `entries`, 8 little-endian bytes per page as in
/// `/proc/PID/pagemap`) that hold data: present (bit 63) or swapped out (bit 62).
fn pages_with_data(entries: &[u8]) -> impl Iterator<Item = usize> + '_ {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    entries
        .chunks_exact(8)
        .enumerate()
        .filter(|(_, e)| {
            let v = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            v & (PRESENT | SWAPPED) != 0
        })
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn present_and_swapped_pages_are_copied_and_absent_ones_are_not() {
        let mut e = Vec::new();
        for v in [
            0u64,
            1 << 63,
            1 << 62,
            (1 << 63) | 0x1234,
            0x55, /* pfn bits only */
        ] {
            e.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(pages_with_data(&e).collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn a_snapshot_holds_every_page_written_and_only_those() {
        let ram = GuestRam::new(8 << 20).unwrap();
        let pages = [3u64, 700, 2047];
        for p in pages {
            ram.mem()
                .write_obj(
                    0xabu8.wrapping_add(p as u8),
                    GuestAddress(p * PAGE_SIZE + 17),
                )
                .unwrap();
        }
        let snap = ram.snapshot().unwrap();
        for p in pages {
            assert_eq!(
                snap.view()[(p * PAGE_SIZE + 17) as usize],
                0xabu8.wrapping_add(p as u8)
            );
        }
        // A snapshot of a copy (file-backed memory) keeps them too.
        let copy = GuestRam::from_snapshot(&snap).unwrap();
        let again = copy.snapshot().unwrap();
        for p in pages {
            assert_eq!(
                again.view()[(p * PAGE_SIZE + 17) as usize],
                0xabu8.wrapping_add(p as u8)
            );
        }
    }
}
