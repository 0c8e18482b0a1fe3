//! Writing reports for people: never panics on a closed or full stream, and never lets
//! guest-chosen text (a panic message, a symbol name, a device name) put control
//! characters on a terminal or into a log.

use std::borrow::Cow;
use std::io::Write;

/// Whether `c` must be escaped before a guest-chosen string is printed: control
/// characters, line and paragraph separators and other non-space whitespace, and invisible
/// or direction-changing marks (which could hide or reorder text on a terminal).
pub(crate) fn needs_escape(c: char) -> bool {
    c.is_control()
        || (c.is_whitespace() && c != ' ')
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

/// `s` with every control character (newline, escape, NUL, DEL...) written as a Rust
/// escape (`\n`, `\u{1b}`), so text a guest chose stays on one line and cannot drive a
/// terminal or forge a report line.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Writes `line` and a newline to stderr; an error (a closed pipe) is ignored: a report
/// that cannot be delivered must not turn into a host panic.
pub fn eprint_line(line: &str) {
    let mut e = std::io::stderr().lock();
    let _ = e.write_all(line.as_bytes());
    let _ = e.write_all(b"\n");
    let _ = e.flush();
}

/// The host's stdout or stderr as a guest console sink whose writes cannot hold a guest
/// past its stop: each write waits for the stream with `poll` (a signal, a timeout or a
/// kill interrupts the wait), writes at most one pipe buffer (`PIPE_BUF`, never blocks on
/// a pipe that has room), and gives up with an error once the guest's run must stop. A
/// reader that never reads therefore stalls only the guest's output, never the host's
/// `--timeout` or signal handling.
pub struct StdStream {
    fd: libc::c_int,
}

impl StdStream {
    /// The process's stdout.
    pub fn stdout() -> StdStream {
        StdStream { fd: 1 }
    }

    /// The process's stderr.
    pub fn stderr() -> StdStream {
        StdStream { fd: 2 }
    }
}

impl Write for StdStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let mut pfd = libc::pollfd {
                fd: self.fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: poll on one descriptor with a valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, 100) };
            if r <= 0 {
                // Not writable within the slice, or a signal: give up only if the guest's
                // run must stop (output that can be written is always delivered, also at
                // a stop).
                if crate::runtime::control::stop_pending() {
                    return Err(std::io::Error::other(
                        "the guest was stopped while its output was blocked",
                    ));
                }
                continue;
            }
            if pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
                && pfd.revents & libc::POLLOUT == 0
            {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            let n = buf.len().min(libc::PIPE_BUF);
            // SAFETY: writes from our own buffer of at least `n` bytes.
            let w = unsafe { libc::write(self.fd, buf.as_ptr().cast(), n) };
            if w >= 0 {
                return Ok(w as usize);
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock => continue,
                _ => return Err(e),
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_controls("plain text é"), "plain text é");
        assert_eq!(
            escape_controls("boom\npvrun: guest crashed: fake\x1b[31m\0"),
            "boom\\npvrun: guest crashed: fake\\u{1b}[31m\\u{0}"
        );
        assert_eq!(escape_controls("tab\there\u{7f}"), "tab\\there\\u{7f}");
    }
}
