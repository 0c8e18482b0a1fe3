//! The gateway's log: one line per event on stderr, never a panic when stderr is gone,
//! control characters in guest- or client-chosen text escaped, bursts rate limited.

use std::fmt::Write as _;
use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The log queue: lines go to a writer thread, so a stderr nobody reads (a full pipe)
/// stalls only that thread, never a connection, a call or shutdown. A full queue drops the
/// line and counts it; the writer reports the count.
struct LogQueue {
    tx: std::sync::mpsc::SyncSender<String>,
    /// Lines queued and not yet written.
    pending: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    dropped: std::sync::Arc<AtomicU64>,
}

fn queue() -> &'static LogQueue {
    static Q: std::sync::OnceLock<LogQueue> = std::sync::OnceLock::new();
    Q.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(4096);
        let pending = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let dropped = std::sync::Arc::new(AtomicU64::new(0));
        let (p, d) = (pending.clone(), dropped.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name("pvrun-log".into())
            .spawn(move || {
                // It writes to stderr and nothing else.
                crate::seccomp::confine_or_exit(crate::seccomp::ThreadKind::Writer);
                let _ = ready_tx.send(());
                let mut reported = 0;
                while let Ok(l) = rx.recv() {
                    // Errors are ignored: a closed stderr must not take the server down,
                    // which `eprintln!` would.
                    let mut e = std::io::stderr().lock();
                    let now = d.load(Ordering::Relaxed);
                    if now != reported {
                        let _ = writeln!(
                            e,
                            "pvrun: {} log lines dropped (stderr too slow)",
                            now - reported
                        );
                        reported = now;
                    }
                    let _ = e.write_all(l.as_bytes());
                    p.fetch_sub(1, Ordering::SeqCst);
                }
            });
        // Return once the writer is confined. Without a writer, lines queue up to the
        // cap and are then dropped (and counted).
        if spawned.is_ok() {
            let _ = ready_rx.recv();
        }
        LogQueue {
            tx,
            pending,
            dropped,
        }
    })
}

/// Starts the log writer thread now (before any thread that may log is confined: a
/// confined thread cannot start threads).
pub fn start() {
    let _ = queue();
}

/// Logs one line on stderr without ever blocking the caller.
pub fn line(msg: std::fmt::Arguments<'_>) {
    let mut s = String::with_capacity(128);
    let _ = s.write_fmt(msg);
    s.push('\n');
    let q = queue();
    q.pending.fetch_add(1, Ordering::SeqCst);
    if q.tx.try_send(s).is_err() {
        q.pending.fetch_sub(1, Ordering::SeqCst);
        q.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// Gives the log up to `within` to reach stderr, then ends the process with `code`.
pub fn exit(code: i32, within: Duration) -> ! {
    let deadline = Instant::now() + within;
    while queue().pending.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    std::process::exit(code)
}

/// `text` with control characters (and backslashes) escaped and cut to `max` characters,
/// so that text a guest or a client chose cannot forge or garble log lines.
pub fn escape(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 8);
    for (n, c) in text.chars().enumerate() {
        if n == max {
            out.push_str("...");
            break;
        }
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if crate::output::needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// At most `per_second` lines a second for one kind of event; the rest are counted and
/// the count is reported with the next line that gets through.
pub struct RateLimited {
    per_second: u32,
    state: Mutex<(Instant, u32, u64)>,
}

impl RateLimited {
    pub fn new(per_second: u32) -> Self {
        RateLimited {
            per_second,
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// Logs `msg` unless this second's budget is spent.
    pub fn line(&self, msg: std::fmt::Arguments<'_>) {
        let suppressed = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.0.elapsed() >= Duration::from_secs(1) {
                *st = (Instant::now(), 0, st.2);
            }
            if st.1 >= self.per_second {
                st.2 += 1;
                return;
            }
            st.1 += 1;
            std::mem::take(&mut st.2)
        };
        if suppressed > 0 {
            line(format_args!(
                "{msg} ({suppressed} similar lines suppressed)"
            ));
        } else {
            line(msg);
        }
    }
}

/// Request ids: a per-process prefix (so ids from two runs do not collide in one log)
/// and a counter.
pub struct RequestIds {
    prefix: u32,
    next: AtomicU64,
}

impl RequestIds {
    pub fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
            .unwrap_or(0);
        RequestIds {
            prefix: nanos ^ std::process::id().rotate_left(16),
            next: AtomicU64::new(1),
        }
    }

    pub fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{:08x}-{n}", self.prefix)
    }
}

/// The guests' console as `pvrun serve` logs it: every line prefixed `guest: `, control
/// characters other than the newline escaped, write errors ignored.
pub struct GuestConsole {
    at_line_start: bool,
    prefix: String,
}

impl GuestConsole {
    /// Lines start with `guest: `.
    pub fn new() -> Self {
        GuestConsole {
            at_line_start: true,
            prefix: "guest: ".into(),
        }
    }

    /// Lines start with `guest NAME: ` (a multi-guest gateway's guests; NAME is checked
    /// URL-safe).
    pub fn named(name: &str) -> Self {
        GuestConsole {
            at_line_start: true,
            prefix: format!("guest {}: ", escape(name, 64)),
        }
    }
}

impl Default for GuestConsole {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for GuestConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let mut out = String::with_capacity(buf.len() + 16);
        for piece in text.split_inclusive('\n') {
            if self.at_line_start {
                out.push_str(&self.prefix);
            }
            let (body, newline) = match piece.strip_suffix('\n') {
                Some(b) => (b, true),
                None => (piece, false),
            };
            out.push_str(&escape(body, usize::MAX));
            if newline {
                out.push('\n');
            }
            self.at_line_start = newline;
        }
        let _ = std::io::stderr().lock().write_all(out.as_bytes());
        Ok(buf.len())
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
        assert_eq!(escape("a\nb\r\x1b[2J\\", 100), "a\\nb\\r\\u{1b}[2J\\\\");
        assert_eq!(escape("abcdef", 3), "abc...");
    }
}
