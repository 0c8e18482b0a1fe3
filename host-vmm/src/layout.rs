//! Guest physical memory layout: where the host puts its own structures and where the
//! guest's image, heap and stack go. Guest virtual addresses equal guest physical ones.
//!
//! ```text
//! 0x0000_0000  null guard page (never mapped)
//! 0x0000_1000  GDT                  supervisor-only
//! 0x0000_2000  IDT                  supervisor-only
//! 0x0000_3000  TSS + I/O bitmap     supervisor-only
//! 0x0000_4000  ring-0 exception stubs (supervisor-only, R+X)
//! 0x0000_5000  ring-0 stack (3 pages, supervisor-only, RW+NX)
//! 0x0000_8000  console ring header, then 16 KiB of ring data (user RW+NX)
//! 0x0001_0000  boot info, argv, env (user read-only)
//! 0x0010_0000  page tables (not mapped at all)
//! 0x0020_0000  guest ELF segments (2 MiB aligned), then the heap
//! top-4 MiB    stack guard (2 MiB, unmapped), then the stack (2 MiB) up to the top
//! ```

pub use pvrun_abi::layout::*;

/// Global descriptor table.
pub const GDT_ADDR: u64 = 0x1000;
/// Interrupt descriptor table.
pub const IDT_ADDR: u64 = 0x2000;
/// Task-state segment (with the I/O permission bitmap right after it).
pub const TSS_ADDR: u64 = 0x3000;
/// Ring-0 exception stubs, 16 bytes per vector.
pub const STUBS_ADDR: u64 = 0x4000;
/// Bytes per exception stub.
pub const STUB_SIZE: u64 = 16;
/// Lowest address of the ring-0 exception stack.
pub const R0_STACK_BOTTOM: u64 = 0x5000;
/// Top of the ring-0 exception stack (TSS.RSP0 and IST1).
pub const R0_STACK_TOP: u64 = 0x8000;
/// Start of the page-table area (never mapped for the guest).
pub const PAGE_TABLES_ADDR: u64 = 0x10_0000;
/// End (exclusive) of the page-table area.
pub const PAGE_TABLES_END: u64 = 0x20_0000;

/// Smallest guest memory we accept: what the smallest SDK guest needs (the 2 MiB host
/// area, its text, rodata and data in a 2 MiB-aligned page each, the minimum heap, the
/// stack guard and the stack, 2 MiB each). A guest with a larger image needs more, and
/// the error says how much.
pub const MIN_MEM_SIZE: u64 = 14 << 20;
/// Largest guest memory we accept (bounded by the page-table area).
pub const MAX_MEM_SIZE: u64 = 64 << 30;
/// Default guest memory size.
pub const DEFAULT_MEM_SIZE: u64 = 64 << 20;
/// Minimum heap the host leaves between the image and the stack guard.
pub const MIN_HEAP_SIZE: u64 = LARGE_PAGE_SIZE;

/// Rounds `x` up to a multiple of `align` (a power of two); `None` on overflow.
pub fn align_up(x: u64, align: u64) -> Option<u64> {
    Some(x.checked_add(align - 1)? & !(align - 1))
}

/// Rounds `x` down to a multiple of `align` (a power of two).
pub fn align_down(x: u64, align: u64) -> u64 {
    x & !(align - 1)
}
