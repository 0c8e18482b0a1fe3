//! Guest memory: the host mapping that backs it, and the guest's memory map (which ranges
//! the guest may read, write or execute).
//!
//! [`GuestRam`] is one anonymous mapping, 2 MiB aligned in the host so that ranges advised
//! `MADV_HUGEPAGE` line up with the guest's 2 MiB pages. All access goes through
//! vm-memory's checked accessors.
//!
//! [`MemoryMap`] is the list of guest-accessible regions the page tables are built from. The
//! hypercall layer checks every guest buffer against it, so a guest cannot make the host
//! read or write host-owned structures (page tables, descriptor tables) on its behalf.

use std::ptr::NonNull;

use pvrun_abi::{perm, region};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

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

/// A frozen copy of guest memory in a memfd, shared by every VM made from it (each maps
/// it copy-on-write) and read back when a VM is reset to it.
pub struct MemorySnapshot {
    fd: std::fs::File,
    view: NonNull<u8>,
    size: u64,
}

// SAFETY: after `seal` the view is read-only memory owned by this struct.
unsafe impl Send for MemorySnapshot {}
// SAFETY: as above: shared read-only access.
unsafe impl Sync for MemorySnapshot {}

impl MemorySnapshot {
    fn create(size: u64) -> Result<Self, Error> {
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

    fn view(&self) -> &[u8] {
        // SAFETY: `view` maps `size` bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.view.as_ptr(), self.size as usize) }
    }

    fn view_mut(&mut self) -> &mut [u8] {
        // SAFETY: only used while building the snapshot, before `seal` makes it read-only.
        unsafe { std::slice::from_raw_parts_mut(self.view.as_ptr(), self.size as usize) }
    }

    fn seal(&self) {
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

/// One region of the guest memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First address (4 KiB aligned).
    pub start: u64,
    /// End address, exclusive (4 KiB aligned).
    pub end: u64,
    /// A [`pvrun_abi::region`] kind, or [`HOST_ONLY`] for host structures.
    pub kind: u32,
    /// [`pvrun_abi::perm`] bits.
    pub perm: u32,
    /// Whether ring 3 may access it (false: supervisor-only host structures).
    pub user: bool,
}

/// Region kind of host-owned structures mapped supervisor-only (GDT, IDT, TSS, stubs).
pub const HOST_ONLY: u32 = 0x100;

/// Why a guest buffer was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessError {
    /// `addr + len` overflows.
    Overflow,
    /// Some byte is outside the regions the guest may access this way.
    Outside,
}

/// The guest memory map: every mapped region with its permissions, sorted by address.
#[derive(Clone, Debug, Default)]
pub struct MemoryMap {
    regions: Vec<Region>,
}

impl MemoryMap {
    /// Builds a map from regions; they must not overlap.
    pub fn new(mut regions: Vec<Region>) -> Result<Self, Error> {
        regions.sort_by_key(|r| r.start);
        for r in &regions {
            if r.start % PAGE_SIZE != 0 || r.end % PAGE_SIZE != 0 || r.end <= r.start {
                return Err(Error::Layout(format!(
                    "region {:#x}..{:#x} is not page aligned",
                    r.start, r.end
                )));
            }
        }
        for w in regions.windows(2) {
            if w[0].end > w[1].start {
                return Err(Error::Layout(format!(
                    "regions {:#x}..{:#x} and {:#x}..{:#x} overlap",
                    w[0].start, w[0].end, w[1].start, w[1].end
                )));
            }
        }
        Ok(MemoryMap { regions })
    }

    /// All regions, sorted by start address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The regions the guest can see (listed in boot info).
    pub fn user_regions(&self) -> impl Iterator<Item = &Region> {
        self.regions.iter().filter(|r| r.user)
    }

    /// The region containing `addr`, if any.
    pub fn find(&self, addr: u64) -> Option<&Region> {
        let i = self.regions.partition_point(|r| r.end <= addr);
        self.regions.get(i).filter(|r| r.start <= addr)
    }

    /// Checks that ring 3 may read (or, with `write`, write) every byte of
    /// `[addr, addr+len)`. A zero-length range is always allowed.
    pub fn check_user(&self, addr: u64, len: u64, write: bool) -> Result<(), AccessError> {
        if len == 0 {
            return Ok(());
        }
        let end = addr.checked_add(len).ok_or(AccessError::Overflow)?;
        let need = if write { perm::R | perm::W } else { perm::R };
        let mut cur = addr;
        while cur < end {
            let r = self.find(cur).ok_or(AccessError::Outside)?;
            if !r.user || r.perm & need != need {
                return Err(AccessError::Outside);
            }
            cur = r.end;
        }
        Ok(())
    }

    /// The stack guard range, if the map has a stack: the unmapped range right below it.
    pub fn stack_guard(&self) -> Option<(u64, u64)> {
        let stack = self.regions.iter().find(|r| r.kind == region::STACK)?;
        let below = self
            .regions
            .iter()
            .filter(|r| r.end <= stack.start)
            .map(|r| r.end)
            .max()
            .unwrap_or(0);
        Some((below, stack.start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> MemoryMap {
        MemoryMap::new(vec![
            Region {
                start: 0x1000,
                end: 0x2000,
                kind: HOST_ONLY,
                perm: perm::R | perm::W,
                user: false,
            },
            Region {
                start: 0x10000,
                end: 0x20000,
                kind: region::BOOT_INFO,
                perm: perm::R,
                user: true,
            },
            Region {
                start: 0x200000,
                end: 0x400000,
                kind: region::TEXT,
                perm: perm::R | perm::X,
                user: true,
            },
            Region {
                start: 0x400000,
                end: 0x600000,
                kind: region::DATA,
                perm: perm::R | perm::W,
                user: true,
            },
            Region {
                start: 0x600000,
                end: 0x800000,
                kind: region::HEAP,
                perm: perm::R | perm::W,
                user: true,
            },
            Region {
                start: 0xa00000,
                end: 0xc00000,
                kind: region::STACK,
                perm: perm::R | perm::W,
                user: true,
            },
        ])
        .unwrap()
    }

    #[test]
    fn user_ranges_span_adjacent_regions_but_not_gaps() {
        let m = map();
        assert_eq!(m.check_user(0x5ffff0, 0x20, true), Ok(()));
        assert_eq!(
            m.check_user(0x7ffff0, 0x20, false),
            Err(AccessError::Outside)
        );
        assert_eq!(m.check_user(0x10000, 8, true), Err(AccessError::Outside));
        assert_eq!(m.check_user(0x10000, 8, false), Ok(()));
        assert_eq!(m.check_user(0x1000, 8, false), Err(AccessError::Outside));
        assert_eq!(m.check_user(0, 8, false), Err(AccessError::Outside));
        assert_eq!(
            m.check_user(u64::MAX - 3, 8, false),
            Err(AccessError::Overflow)
        );
        assert_eq!(m.check_user(0xdead, 0, false), Ok(()));
        assert_eq!(m.stack_guard(), Some((0x800000, 0xa00000)));
    }

    #[test]
    fn overlapping_regions_are_refused() {
        let r = MemoryMap::new(vec![
            Region {
                start: 0x1000,
                end: 0x3000,
                kind: HOST_ONLY,
                perm: perm::R,
                user: false,
            },
            Region {
                start: 0x2000,
                end: 0x4000,
                kind: HOST_ONLY,
                perm: perm::R,
                user: false,
            },
        ]);
        assert!(r.is_err());
    }
}
