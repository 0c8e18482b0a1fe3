//! Console output: the `print!`/`println!`/`eprint!`/`eprintln!` macros and raw writes.
//!
//! Formatted output is collected in a 1 KiB stack buffer and sent with one
//! `CONSOLE_WRITE` hypercall per macro call (more only if the text is longer than the
//! buffer), because every hypercall is a VM exit. Writes longer than
//! [`CONSOLE_WRITE_MAX`] are split.

use core::fmt::{self, Write};

use pvrun_abi::{CONSOLE_WRITE_MAX, ConsoleWrite, stream};

use crate::hypercall::call;

/// Size of the stack buffer formatted output is collected in.
const BUF_SIZE: usize = 1024;

/// Writes `bytes` to the console stream `stream`; returns false if the host refused them.
fn write_stream(stream: u32, mut bytes: &[u8]) -> bool {
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
