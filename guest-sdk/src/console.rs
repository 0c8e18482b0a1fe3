//! Console output: the `print!`/`println!`/`eprint!`/`eprintln!` macros and raw writes.
//!
//! Output goes into the console ring the host set up (see `pvrun_abi::ConsoleRing`):
//! writing costs no VM exit. The host delivers the ring's contents at the guest's next
//! exit of any kind (a hypercall, `sleep`, `exit`, a panic or a crash), so nothing is lost
//! and output stays in order with crash reports; [`flush`] delivers it at once, and a
//! write more than 50 ms after the last flush flushes, so progress printed by a guest
//! that computes without exits still shows up promptly. Only when
//! the ring is full does a write cost an exit (a flush). Without a ring (an older host),
//! each macro call is one `CONSOLE_WRITE` hypercall; writes longer than
//! [`CONSOLE_WRITE_MAX`] are split.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU64, Ordering, fence};

use pvrun_abi::{CONSOLE_RECORD_HEADER, CONSOLE_WRITE_MAX, ConsoleWrite, call as nr, stream};

use crate::hypercall::{call, hypercall};

/// Asks the host to deliver everything in the console ring now (one VM exit).
pub fn flush() {
    LAST_FLUSH_NS.store(crate::time::monotonic_ns(), Ordering::Relaxed);
    // SAFETY: CONSOLE_FLUSH takes no arguments and touches only the console ring.
    unsafe { hypercall(nr::CONSOLE_FLUSH, 0) };
}

/// Output older than this is delivered at the next write even if the guest makes no other
/// exit: a guest that prints progress while computing shows it at most this late.
const FLUSH_AFTER_NS: u64 = 50_000_000;

/// Guest clock at the last explicit flush.
static LAST_FLUSH_NS: AtomicU64 = AtomicU64::new(0);

/// Copies `src` into the ring data area (`size` bytes at `data`) from free-running index
/// `at`, wrapping at the end in at most two copies; returns the index after it. Nothing is
/// visible to the host before the producer index moves, so plain copies suffice.
fn copy_in(data: *mut u8, size: u64, at: u64, src: &[u8]) -> u64 {
    let off = (at % size) as usize;
    let first = src.len().min(size as usize - off);
    // SAFETY: `off + first <= size` and `src.len() - first <= size - first` (a record never
    // exceeds the ring): both copies stay inside the data area the host mapped for us.
    unsafe {
        core::ptr::copy_nonoverlapping(src.as_ptr(), data.add(off), first);
        core::ptr::copy_nonoverlapping(src.as_ptr().add(first), data, src.len() - first);
    }
    at.wrapping_add(src.len() as u64)
}

/// Appends `bytes` to the console ring as records for `stream`; false if there is no ring.
fn ring_write(stream: u32, mut bytes: &[u8]) -> bool {
    let bi = crate::boot_info();
    let size = bi.console_size;
    if bi.console_ring == 0 || size < 2 * CONSOLE_RECORD_HEADER || !size.is_power_of_two() {
        return false;
    }
    let prod_ptr = bi.console_ring as *mut u64;
    // `consumer` sits on the header's second cache line (offset 64).
    let cons_ptr = (bi.console_ring + 64) as *const u64;
    let data = bi.console_data as *mut u8;
    let max_chunk = (size - CONSOLE_RECORD_HEADER).min(u16::MAX as u64) as usize;
    while !bytes.is_empty() {
        let chunk = bytes.len().min(max_chunk);
        let need = CONSOLE_RECORD_HEADER + chunk as u64;
        // SAFETY: the host mapped the ring header read-write for the guest at this address.
        let producer = unsafe { prod_ptr.read_volatile() };
        let mut tries = 0;
        loop {
            // SAFETY: as above; the host updates `consumer`, so it is read volatile.
            let consumer = unsafe { cons_ptr.read_volatile() };
            if size - producer.wrapping_sub(consumer) >= need {
                break;
            }
            if tries == 2 {
                return false; // the host does not drain: fall back to CONSOLE_WRITE
            }
            flush();
            tries += 1;
        }
        let len = (chunk as u16).to_le_bytes();
        let at = copy_in(data, size, producer, &[stream as u8, len[0], len[1]]);
        let at = copy_in(data, size, at, &bytes[..chunk]);
        // Publish the record only after its bytes (pairs with the host's acquire).
        fence(Ordering::Release);
        // SAFETY: as above.
        unsafe { prod_ptr.write_volatile(at) };
        bytes = &bytes[chunk..];
    }
    // One rdtsc per write keeps output timely without an exit per line.
    let now = crate::time::monotonic_ns();
    if now.wrapping_sub(LAST_FLUSH_NS.load(Ordering::Relaxed)) > FLUSH_AFTER_NS {
        flush();
    }
    true
}

/// Size of the stack buffer formatted output is collected in.
const BUF_SIZE: usize = 1024;

/// Writes `bytes` to the console stream `stream`; returns false if the host refused them.
fn write_stream(stream: u32, mut bytes: &[u8]) -> bool {
    if ring_write(stream, bytes) {
        return true;
    }
    while !bytes.is_empty() {
        let chunk = bytes.len().min(CONSOLE_WRITE_MAX as usize);
        let r = call(&ConsoleWrite {
            stream,
            reserved: 0,
            buf: bytes.as_ptr() as u64,
            len: chunk as u64,
        });
        if r <= 0 {
            return false;
        }
        bytes = &bytes[(r as usize).min(chunk)..];
    }
    true
}

/// Writes raw bytes to standard output; returns false if the host refused them.
pub fn write_stdout(bytes: &[u8]) -> bool {
    write_stream(stream::STDOUT, bytes)
}

/// Writes raw bytes to standard error; returns false if the host refused them.
pub fn write_stderr(bytes: &[u8]) -> bool {
    write_stream(stream::STDERR, bytes)
}

/// A [`fmt::Write`] sink that buffers on the stack and flushes to one console stream.
struct BufferedWriter {
    stream: u32,
    len: usize,
    buf: [u8; BUF_SIZE],
}

impl BufferedWriter {
    fn new(stream: u32) -> Self {
        BufferedWriter {
            stream,
            len: 0,
            buf: [0; BUF_SIZE],
        }
    }

    fn flush(&mut self) {
        if self.len > 0 {
            write_stream(self.stream, &self.buf[..self.len]);
            self.len = 0;
        }
    }
}

impl Write for BufferedWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let bytes = s.as_bytes();
        if bytes.len() > BUF_SIZE - self.len {
            self.flush();
            if bytes.len() >= BUF_SIZE {
                write_stream(self.stream, bytes);
                return Ok(());
            }
        }
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
        Ok(())
    }
}

/// Formats `args` to `stream` with as few hypercalls as possible.
fn print_to(stream: u32, args: fmt::Arguments<'_>) {
    if let Some(s) = args.as_str() {
        write_stream(stream, s.as_bytes());
        return;
    }
    let mut w = BufferedWriter::new(stream);
    let _ = w.write_fmt(args);
    w.flush();
}

/// Implementation of [`print!`](crate::print) and [`println!`](crate::println).
#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    print_to(stream::STDOUT, args);
}

/// Implementation of [`eprint!`](crate::eprint) and [`eprintln!`](crate::eprintln).
#[doc(hidden)]
pub fn _eprint(args: fmt::Arguments<'_>) {
    print_to(stream::STDERR, args);
}

/// Prints to standard output, like `std::print!`.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(::core::format_args!($($arg)*)) };
}

/// Prints to standard output with a newline, like `std::println!`.
#[macro_export]
macro_rules! println {
    () => { $crate::console::_print(::core::format_args!("\n")) };
    ($($arg:tt)*) => {
        $crate::console::_print(::core::format_args!("{}\n", ::core::format_args!($($arg)*)))
    };
}

/// Prints to standard error, like `std::eprint!`.
#[macro_export]
macro_rules! eprint {
    ($($arg:tt)*) => { $crate::console::_eprint(::core::format_args!($($arg)*)) };
}

/// Prints to standard error with a newline, like `std::eprintln!`.
#[macro_export]
macro_rules! eprintln {
    () => { $crate::console::_eprint(::core::format_args!("\n")) };
    ($($arg:tt)*) => {
        $crate::console::_eprint(::core::format_args!("{}\n", ::core::format_args!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[crate::test]
    fn copy_in_wraps_around_the_end_of_the_ring() {
        let mut ring = [0u8; 8];
        let next = copy_in(ring.as_mut_ptr(), 8, 14, b"abcd");
        assert_eq!(next, 18);
        // Index 14 is offset 6: "ab" at the end, "cd" at the start.
        assert_eq!(&ring, b"cd\0\0\0\0ab");
        let next = copy_in(ring.as_mut_ptr(), 8, u64::MAX, b"z");
        assert_eq!(next, 0);
        assert_eq!(ring[7], b'z');
    }
}
