//! x86-64 4-level page tables built by the host from the guest memory map.
//!
//! Every 2 MiB chunk that one region covers entirely becomes a single 2 MiB page; chunks
//! with mixed permissions or holes (the first 2 MiB with the host structures, unaligned
//! segments of foreign ELFs) get a 4 KiB page table. Permissions are enforced at the leaf:
//! user bit only for guest regions, writable only for W regions, NX for everything not
//! executable. Accessed/dirty bits are preset so the CPU never writes the tables. The
//! tables live in [`PAGE_TABLES_ADDR`]..[`PAGE_TABLES_END`], which is not mapped at all.

use pvrun_abi::perm;
use vm_memory::{Bytes, GuestAddress};

use crate::error::Error;
use crate::layout::{LARGE_PAGE_SIZE, PAGE_SIZE, PAGE_TABLES_ADDR, PAGE_TABLES_END};
use crate::memory::{GuestRam, MemoryMap, Region};

const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const NX: u64 = 1 << 63;

/// One page-table page being built in host memory before it is copied to the guest.
struct Table {
    gpa: u64,
    entries: Box<[u64; 512]>,
}

struct Builder {
    tables: Vec<Table>,
    next: u64,
}

impl Builder {
    fn alloc(&mut self) -> Result<usize, Error> {
        if self.next >= PAGE_TABLES_END {
            return Err(Error::Layout(
                "guest memory map needs more page tables than the host reserves".into(),
            ));
        }
        self.tables.push(Table {
            gpa: self.next,
            entries: Box::new([0; 512]),
        });
        self.next += PAGE_SIZE;
        Ok(self.tables.len() - 1)
    }

    /// Returns the index of the next-level table under `entry` of `table`, creating it.
    fn child(&mut self, table: usize, index: usize) -> Result<usize, Error> {
        let e = self.tables[table].entries[index];
        if e & P != 0 {
            let gpa = e & 0x000f_ffff_ffff_f000;
            return Ok(((gpa - PAGE_TABLES_ADDR) / PAGE_SIZE) as usize);
        }
        let child = self.alloc()?;
        // Intermediate levels are permissive; the leaf decides.
        self.tables[table].entries[index] = self.tables[child].gpa | P | RW | US | A;
        Ok(child)
    }
}

fn leaf_flags(r: &Region) -> u64 {
    let mut f = P | A;
    if r.perm & perm::W != 0 {
        f |= RW | D;
    }
    if r.user {
        f |= US;
    }
    if r.perm & perm::X == 0 {
        f |= NX;
    }
    f
}

/// Builds the page tables for `map` in guest memory and returns the PML4 address (CR3).
pub fn build(ram: &GuestRam, map: &MemoryMap) -> Result<u64, Error> {
    let mut b = Builder {
        tables: Vec::new(),
        next: PAGE_TABLES_ADDR,
    };
    let pml4 = b.alloc()?;
    let regions = map.regions();
    let mut i = 0;
    while i < regions.len() {
        let r = regions[i];
        let mut addr = r.start;
        while addr < r.end {
            let l4 = ((addr >> 39) & 511) as usize;
            let l3 = ((addr >> 30) & 511) as usize;
            let l2 = ((addr >> 21) & 511) as usize;
            let pdpt = b.child(pml4, l4)?;
            let pd = b.child(pdpt, l3)?;
            if addr.is_multiple_of(LARGE_PAGE_SIZE) && addr + LARGE_PAGE_SIZE <= r.end {
                b.tables[pd].entries[l2] = addr | leaf_flags(&r) | PS;
                addr += LARGE_PAGE_SIZE;
            } else {
                let pt = b.child(pd, l2)?;
                let l1 = ((addr >> 12) & 511) as usize;
                b.tables[pt].entries[l1] = addr | leaf_flags(&r);
                addr += PAGE_SIZE;
            }
        }
        i += 1;
    }
    for t in &b.tables {
        let bytes: Vec<u8> = t.entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        ram.mem()
            .write_slice(&bytes, GuestAddress(t.gpa))
            .map_err(|e| Error::Layout(format!("cannot write page tables: {e}")))?;
    }
    Ok(b.tables[pml4].gpa)
}
