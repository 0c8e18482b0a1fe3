//! The guest memory map: which ranges the guest may read, write or execute.
//!
//! [`MemoryMap`] is the list of guest-accessible regions the page tables are built from.
//! Every guest buffer the host touches on the guest's behalf is checked against it
//! ([`MemoryMap::check_user`]), which yields a [`UserRange`]: the only way to name guest
//! memory to the host's guest-facing accessors. A guest therefore cannot make the host
//! read or write host-owned structures (page tables, descriptor tables) on its behalf.

use pvrun_abi::{perm, region};

use crate::error::Error;
use crate::layout::PAGE_SIZE;

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

impl AccessError {
    /// The hypercall/ring status a guest gets for this refusal.
    pub fn status(self) -> i64 {
        match self {
            AccessError::Overflow => pvrun_abi::status::BAD_LENGTH,
            AccessError::Outside => pvrun_abi::status::BAD_ADDRESS,
        }
    }
}

/// A guest range that [`MemoryMap::check_user`] found ring 3 may read (and, if
/// [`UserRange::writable`], write). Its fields are private: only the check makes one, so
/// every host access on the guest's behalf is to exactly the bytes that were checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserRange {
    addr: u64,
    len: u64,
    writable: bool,
}

impl UserRange {
    /// First guest address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the guest may write the range (so the host may store into it for the guest).
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The part from `offset` on (`None` past the end).
    pub fn skip(&self, offset: u64) -> Option<UserRange> {
        (offset <= self.len).then_some(UserRange {
            addr: self.addr + offset,
            len: self.len - offset,
            writable: self.writable,
        })
    }
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
    /// `[addr, addr+len)`, and returns the range as a [`UserRange`], the proof the host's
    /// guest-facing accessors take. A zero-length range is always allowed.
    pub fn check_user(&self, addr: u64, len: u64, write: bool) -> Result<UserRange, AccessError> {
        let range = UserRange {
            addr,
            len,
            writable: write,
        };
        if len == 0 {
            return Ok(range);
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
        Ok(range)
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
        assert_eq!(
            m.check_user(0x5ffff0, 0x20, true)
                .map(|r| (r.addr(), r.len(), r.writable())),
            Ok((0x5ffff0, 0x20, true))
        );
        assert_eq!(
            m.check_user(0x7ffff0, 0x20, false),
            Err(AccessError::Outside)
        );
        assert_eq!(m.check_user(0x10000, 8, true), Err(AccessError::Outside));
        assert_eq!(
            m.check_user(0x10000, 8, false)
                .map(|r| (r.addr(), r.len(), r.writable())),
            Ok((0x10000, 8, false))
        );
        assert_eq!(m.check_user(0x1000, 8, false), Err(AccessError::Outside));
        assert_eq!(m.check_user(0, 8, false), Err(AccessError::Outside));
        assert_eq!(
            m.check_user(u64::MAX - 3, 8, false),
            Err(AccessError::Overflow)
        );
        assert_eq!(
            m.check_user(0xdead, 0, false)
                .map(|r| (r.addr(), r.len(), r.writable())),
            Ok((0xdead, 0, false))
        );
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
