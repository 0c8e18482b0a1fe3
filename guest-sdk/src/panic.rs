//! The panic handler: formats "panicked at FILE:LINE:COL:\nMESSAGE" into a fixed stack
//! buffer (no allocation, truncated if too long) and stops the guest with `ABORT`, which the
//! host reports and turns into exit status 101.

use core::fmt::{self, Write};
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

/// Size of the buffer the panic message is formatted into.
const MSG_MAX: usize = 2048;

/// Set on the first panic, to catch a panic inside panic handling.
static PANICKING: AtomicBool = AtomicBool::new(false);

/// A fixed buffer that silently truncates (on a character boundary) when full.
struct Truncating {
    len: usize,
    buf: [u8; MSG_MAX],
}

impl Write for Truncating {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = MSG_MAX - self.len;
        let mut n = s.len().min(room);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    if PANICKING.swap(true, Ordering::Relaxed) {
        crate::process::abort("panicked while processing a panic");
    }
    let mut w = Truncating {
        len: 0,
        buf: [0; MSG_MAX],
    };
    match info.location() {
        Some(l) => {
            let _ = write!(
                w,
                "panicked at {}:{}:{}:\n{}",
                l.file(),
                l.line(),
                l.column(),
                info.message()
            );
        }
        None => {
            let _ = write!(w, "panicked:\n{}", info.message());
        }
    }
    // Only whole characters were copied, so this cannot fail.
    let msg = core::str::from_utf8(&w.buf[..w.len]).unwrap_or("panicked");
    crate::process::abort(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[crate::test]
    fn the_message_buffer_truncates_on_a_character_boundary() {
        let mut w = Truncating {
            len: 0,
            buf: [0; MSG_MAX],
        };
        let _ = w.write_str(&"a".repeat(MSG_MAX - 1));
        let _ = w.write_str("é and more");
        // "é" is two bytes and only one is left: nothing of it is copied.
        assert_eq!(w.len, MSG_MAX - 1);
        assert!(core::str::from_utf8(&w.buf[..w.len]).is_ok());
    }

    #[crate::test]
    #[should_panic(expected = "the panic handler reports this")]
    fn a_panic_reaches_the_host_with_its_message() {
        panic!("the panic handler reports this");
    }
}
