//! The global allocator: a linked-list heap over the memory region the host hands over.
//!
//! `alloc` (`Box`, `Vec`, `String`, ...) works out of the box. When the heap is exhausted
//! the default allocation-error handler panics with "memory allocation of N bytes failed",
//! which ends the guest through the panic handler.

use linked_list_allocator::LockedHeap;

/// The allocator behind `alloc`.
#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Gives the allocator the host's heap region; called once by the start code.
pub(crate) fn init(start: u64, len: u64) {
    // Too small to hold even the allocator's bookkeeping: leave the heap empty.
    if start == 0 || len < 4096 {
        return;
    }
    // SAFETY: the host guarantees [start, start + len) is mapped read-write, owned by the
    // guest and used by nothing else; this runs once, before any allocation.
    unsafe { HEAP.lock().init(start as *mut u8, len as usize) };
}

/// A snapshot of heap usage in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Bytes currently allocated.
    pub used: usize,
    /// Bytes still free.
    pub free: usize,
    /// Total heap size.
    pub size: usize,
}

/// Returns the current heap usage.
pub fn stats() -> Stats {
    let heap = HEAP.lock();
    Stats {
        used: heap.used(),
        free: heap.free(),
        size: heap.size(),
    }
}
