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
use x86_64::structures::paging::{PageTable, PageTableFlags, PageTableIndex};
use x86_64::{PhysAddr, VirtAddr};

use crate::error::Error;
use crate::layout::{LARGE_PAGE_SIZE, PAGE_SIZE, PAGE_TABLES_ADDR, PAGE_TABLES_END};
use crate::memory::{GuestRam, MemoryMap, Region};

/// Flags of a non-leaf entry: permissive, so the leaf decides.
const TABLE_FLAGS: PageTableFlags = PageTableFlags::PRESENT
    .union(PageTableFlags::WRITABLE)
    .union(PageTableFlags::USER_ACCESSIBLE)
    .union(PageTableFlags::ACCESSED);

/// One page-table page being built in host memory before it is copied to the guest.
struct Table {
    gpa: u64,
    entries: Box<PageTable>,
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
            entries: Box::new(PageTable::new()),
        });
        self.next += PAGE_SIZE;
        Ok(self.tables.len() - 1)
    }

    /// Returns the index of the next-level table under entry `index` of `table`,
    /// creating it.
    fn child(&mut self, table: usize, index: PageTableIndex) -> Result<usize, Error> {
        let e = &self.tables[table].entries[index];
        if e.flags().contains(PageTableFlags::PRESENT) {
            return Ok(((e.addr().as_u64() - PAGE_TABLES_ADDR) / PAGE_SIZE) as usize);
        }
        let child = self.alloc()?;
        let gpa = PhysAddr::new(self.tables[child].gpa);
        self.tables[table].entries[index].set_addr(gpa, TABLE_FLAGS);
        Ok(child)
    }
}

fn leaf_flags(r: &Region) -> PageTableFlags {
    let mut f = PageTableFlags::PRESENT | PageTableFlags::ACCESSED;
    if r.perm & perm::W != 0 {
        f |= PageTableFlags::WRITABLE | PageTableFlags::DIRTY;
    }
    f.set(PageTableFlags::USER_ACCESSIBLE, r.user);
    f.set(PageTableFlags::NO_EXECUTE, r.perm & perm::X == 0);
    f
}

/// One page of a host-owned structure: its guest address and its 4 KiB.
pub type HostPage = (u64, Vec<u8>);

/// Builds the page tables for `map` in guest memory and returns the PML4 address (CR3).
pub fn build(ram: &GuestRam, map: &MemoryMap) -> Result<u64, Error> {
    let (cr3, tables) = tables(map)?;
    for (gpa, bytes) in &tables {
        ram.mem()
            .write_slice(bytes, GuestAddress(*gpa))
            .map_err(|e| Error::Layout(format!("cannot write page tables: {e}")))?;
    }
    Ok(cr3)
}

/// The page tables for `map`: the PML4 address (CR3) and every table page, by guest
/// address. (A snapshot file's tables are checked against these.)
pub fn tables(map: &MemoryMap) -> Result<(u64, Vec<HostPage>), Error> {
    let mut b = Builder {
        tables: Vec::new(),
        next: PAGE_TABLES_ADDR,
    };
    let pml4 = b.alloc()?;
    for r in map.regions() {
        let mut addr = r.start;
        while addr < r.end {
            let va = VirtAddr::new(addr);
            let pdpt = b.child(pml4, va.p4_index())?;
            let pd = b.child(pdpt, va.p3_index())?;
            let pa = PhysAddr::new(addr);
            if addr.is_multiple_of(LARGE_PAGE_SIZE) && addr + LARGE_PAGE_SIZE <= r.end {
                let flags = leaf_flags(r) | PageTableFlags::HUGE_PAGE;
                b.tables[pd].entries[va.p2_index()].set_addr(pa, flags);
                addr += LARGE_PAGE_SIZE;
            } else {
                let pt = b.child(pd, va.p2_index())?;
                b.tables[pt].entries[va.p1_index()].set_addr(pa, leaf_flags(r));
                addr += PAGE_SIZE;
            }
        }
    }
    let pages = b
        .tables
        .iter()
        .map(|t| {
            let bytes: Vec<u8> = t
                .entries
                .iter()
                .flat_map(|e| (e.addr().as_u64() | e.flags().bits()).to_le_bytes())
                .collect();
            (t.gpa, bytes)
        })
        .collect();
    Ok((b.tables[pml4].gpa, pages))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::*;
    use crate::memory::HOST_ONLY;
    use pvrun_abi::region;
    use sha2::{Digest, Sha256};

    /// A map like the builder's: host structures, console, boot info, devices, a 2 MiB
    /// text segment, an unaligned text tail, rodata, a small data segment, heap, and a
    /// stack with a 2 MiB guard below it.
    fn sample_map(mem: u64) -> MemoryMap {
        let h = |start, end, perm| Region {
            start,
            end,
            kind: HOST_ONLY,
            perm,
            user: false,
        };
        let u = |start, end, kind, perm| Region {
            start,
            end,
            kind,
            perm,
            user: true,
        };
        let (r, w, x) = (perm::R, perm::W, perm::X);
        MemoryMap::new(vec![
            h(GDT_ADDR, GDT_ADDR + PAGE_SIZE, r | w),
            h(IDT_ADDR, IDT_ADDR + PAGE_SIZE, r),
            h(TSS_ADDR, TSS_ADDR + PAGE_SIZE, r | w),
            h(STUBS_ADDR, STUBS_ADDR + PAGE_SIZE, r | x),
            h(R0_STACK_BOTTOM, R0_STACK_TOP, r | w),
            u(
                CONSOLE_RING_ADDR,
                CONSOLE_DATA_ADDR + CONSOLE_DATA_SIZE,
                region::CONSOLE,
                r | w,
            ),
            u(BOOT_INFO_ADDR, BOOT_INFO_END, region::BOOT_INFO, r),
            u(DEVICE_AREA_ADDR, 0x6_0000, region::DEVICES, r | w),
            u(0x20_0000, 0x40_0000, region::TEXT, r | x),
            u(0x40_0000, 0x40_3000, region::TEXT, r | x),
            u(0x60_0000, 0x80_0000, region::RODATA, r),
            u(0x80_0000, 0x80_5000, region::DATA, r | w),
            u(0xa0_0000, mem - 2 * LARGE_PAGE_SIZE, region::HEAP, r | w),
            u(mem - LARGE_PAGE_SIZE, mem, region::STACK, r | w),
        ])
        .unwrap()
    }

    fn read_u64(ram: &GuestRam, addr: u64) -> u64 {
        ram.mem().read_obj(GuestAddress(addr)).unwrap()
    }

    /// The leaf entry mapping `va` and its page size, by walking the tables in guest
    /// memory; `None` where nothing is mapped.
    fn walk(ram: &GuestRam, cr3: u64, va: u64) -> Option<(PageTableFlags, u64)> {
        let mut table = cr3;
        for (level, shift) in [(4, 39), (3, 30), (2, 21), (1, 12)] {
            let e = read_u64(ram, table + ((va >> shift) & 511) * 8);
            let flags = PageTableFlags::from_bits_truncate(e);
            if !flags.contains(PageTableFlags::PRESENT) {
                return None;
            }
            let addr = e & 0x000f_ffff_ffff_f000;
            if level == 1 || flags.contains(PageTableFlags::HUGE_PAGE) {
                let size = 1u64 << shift;
                assert_eq!(addr, va & !(size - 1), "identity mapping at {va:#x}");
                return Some((flags, size));
            }
            assert_eq!(flags, TABLE_FLAGS, "intermediate entries are permissive");
            table = addr;
        }
        unreachable!()
    }

    fn built(mem: u64) -> (GuestRam, MemoryMap, u64) {
        let ram = GuestRam::new(mem).unwrap();
        let map = sample_map(mem);
        let cr3 = build(&ram, &map).unwrap();
        (ram, map, cr3)
    }

    #[test]
    fn tables_are_the_old_bytes() {
        // Captured from the bare-bit-literal builder this module replaced.
        for (mem, sha) in [
            (
                64 << 20,
                "78586fbc1e4c6d59014125479c0f81428aec72417cf708160512b3a105939f16",
            ),
            (
                3 << 30,
                "5ce56a470032a7749e5af35384d08f8e2c8bfb23869630a9e7cbd2733f0add45",
            ),
        ] {
            let (ram, _, cr3) = built(mem);
            assert_eq!(cr3, PAGE_TABLES_ADDR);
            let mut area = vec![0u8; (PAGE_TABLES_END - PAGE_TABLES_ADDR) as usize];
            ram.mem()
                .read_slice(&mut area, GuestAddress(PAGE_TABLES_ADDR))
                .unwrap();
            assert_eq!(format!("{:x}", Sha256::digest(&area)), sha, "{mem:#x}");
        }
    }

    #[test]
    fn every_page_has_exactly_its_regions_permissions() {
        let mem = 64 << 20;
        let (ram, map, cr3) = built(mem);
        for va in (0..mem).step_by(PAGE_SIZE as usize) {
            let got = walk(&ram, cr3, va).map(|(f, _)| f);
            let want = map.find(va).map(leaf_flags);
            assert_eq!(got.map(|f| f - PageTableFlags::HUGE_PAGE), want, "{va:#x}");
        }
    }

    #[test]
    fn null_page_stack_guard_and_page_tables_are_unmapped() {
        let mem = 64 << 20;
        let (ram, map, cr3) = built(mem);
        assert_eq!(walk(&ram, cr3, 0), None, "null page");
        let (lo, hi) = map.stack_guard().unwrap();
        assert_eq!(hi - lo, STACK_GUARD_SIZE);
        for va in (lo..hi).step_by(PAGE_SIZE as usize) {
            assert_eq!(walk(&ram, cr3, va), None, "stack guard {va:#x}");
        }
        for va in (PAGE_TABLES_ADDR..PAGE_TABLES_END).step_by(PAGE_SIZE as usize) {
            assert_eq!(walk(&ram, cr3, va), None, "page tables {va:#x}");
        }
    }

    #[test]
    fn writable_is_nx_and_executable_is_read_only() {
        let mem = 64 << 20;
        let (ram, _, cr3) = built(mem);
        let mut seen = (0, 0);
        for va in (0..mem).step_by(PAGE_SIZE as usize) {
            let Some((f, _)) = walk(&ram, cr3, va) else {
                continue;
            };
            if f.contains(PageTableFlags::WRITABLE) {
                assert!(
                    f.contains(PageTableFlags::NO_EXECUTE),
                    "W page {va:#x} is NX"
                );
                seen.0 += 1;
            } else if !f.contains(PageTableFlags::NO_EXECUTE) {
                seen.1 += 1;
            }
        }
        assert!(seen.0 > 0 && seen.1 > 0, "both kinds present: {seen:?}");
        // Spot checks: the stubs and the text are executable and not writable.
        for va in [STUBS_ADDR, 0x20_0000, 0x40_2000] {
            let (f, _) = walk(&ram, cr3, va).unwrap();
            assert!(
                !f.contains(PageTableFlags::NO_EXECUTE),
                "{va:#x} executable"
            );
            assert!(
                !f.contains(PageTableFlags::WRITABLE),
                "{va:#x} not writable"
            );
        }
        let (heap, _) = walk(&ram, cr3, 0xa0_0000).unwrap();
        assert!(heap.contains(PageTableFlags::WRITABLE | PageTableFlags::NO_EXECUTE));
    }

    #[test]
    fn host_structures_are_supervisor_only() {
        let (ram, map, cr3) = built(64 << 20);
        let host: Vec<_> = map
            .regions()
            .iter()
            .filter(|r| r.kind == HOST_ONLY)
            .collect();
        assert_eq!(host.len(), 5);
        for r in host {
            for va in (r.start..r.end).step_by(PAGE_SIZE as usize) {
                let (f, _) = walk(&ram, cr3, va).unwrap();
                assert!(!f.contains(PageTableFlags::USER_ACCESSIBLE), "{va:#x}");
            }
        }
        let (console, _) = walk(&ram, cr3, CONSOLE_RING_ADDR).unwrap();
        assert!(console.contains(PageTableFlags::USER_ACCESSIBLE));
    }

    #[test]
    fn large_pages_where_a_region_covers_a_whole_chunk() {
        let mem = 64 << 20;
        let (ram, map, cr3) = built(mem);
        for va in (0..mem).step_by(PAGE_SIZE as usize) {
            let Some((_, size)) = walk(&ram, cr3, va) else {
                continue;
            };
            let chunk = va & !(LARGE_PAGE_SIZE - 1);
            let whole = map
                .find(chunk)
                .is_some_and(|r| r.start <= chunk && chunk + LARGE_PAGE_SIZE <= r.end);
            let want = if whole { LARGE_PAGE_SIZE } else { PAGE_SIZE };
            assert_eq!(size, want, "{va:#x}");
        }
        // The text chunk, rodata, heap and stack are single 2 MiB pages.
        for va in [0x20_0000, 0x60_0000, 0xa0_0000, mem - LARGE_PAGE_SIZE] {
            assert_eq!(walk(&ram, cr3, va).unwrap().1, LARGE_PAGE_SIZE, "{va:#x}");
        }
        // The first chunk (host structures) and the unaligned tails use 4 KiB pages.
        for va in [GDT_ADDR, BOOT_INFO_ADDR, 0x40_0000, 0x80_4000] {
            assert_eq!(walk(&ram, cr3, va).unwrap().1, PAGE_SIZE, "{va:#x}");
        }
    }
}
