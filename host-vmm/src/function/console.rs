//! Console output of many sandboxes: a call never waits for it.
//!
//! Every sandbox of a template writes into one bounded queue that a writer thread drains
//! into the template's sink, so a slow or stalled sink (a log pipe nobody reads) delays
//! only the output, never a call; and each sandbox has its own rate limit, so one tenant
//! flooding its console cannot crowd out the others' lines or grow the host's memory.
//! Output over the limit, or that finds the queue full, is dropped and counted, and the
//! writer says so in one line.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Chunks of output the queue holds before new output is dropped.
const QUEUE_CHUNKS: usize = 1024;

/// The queue of one template's console and its writer thread.
pub(crate) struct ConsoleHub {
    tx: SyncSender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
    /// Bytes per second each sandbox may write (0: unlimited).
    rate: u64,
}

impl ConsoleHub {
    /// Starts the writer thread for `sink`; it ends when the hub and every sandbox console
    /// made from it are gone. With `confine`, the thread runs under the writer seccomp
    /// filter from before it takes its first chunk (and before this returns).
    pub fn new(
        sink: Arc<Mutex<Box<dyn Write + Send>>>,
        rate: u64,
        confine: bool,
    ) -> Arc<ConsoleHub> {
        let (tx, rx) = sync_channel(QUEUE_CHUNKS);
        let dropped = Arc::new(AtomicU64::new(0));
        let d = dropped.clone();
        let (ready_tx, ready_rx) = sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name("pvrun-console".into())
            .spawn(move || {
                if confine {
                    crate::seccomp::confine_or_exit(crate::seccomp::ThreadKind::Writer);
                }
                let _ = ready_tx.send(());
                writer(rx, sink, d)
            });
        // Without a writer thread, output is dropped (and counted), calls go on.
        if spawned.is_ok() {
            let _ = ready_rx.recv();
        }
        Arc::new(ConsoleHub { tx, dropped, rate })
    }

    /// A console for one sandbox, with its own rate limit.
    pub fn sandbox_console(self: &Arc<Self>) -> SandboxConsole {
        SandboxConsole {
            hub: self.clone(),
            tokens: self.rate as f64,
            last: Instant::now(),
        }
    }

    /// Bytes of guest output dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

fn writer(rx: Receiver<Vec<u8>>, sink: Arc<Mutex<Box<dyn Write + Send>>>, dropped: Arc<AtomicU64>) {
    let mut reported = 0;
    while let Ok(chunk) = rx.recv() {
        let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
        let _ = s.write_all(&chunk).and_then(|_| s.flush());
        let now = dropped.load(Ordering::Relaxed);
        if now != reported {
            let _ = writeln!(
                s,
                "pvrun: {} bytes of guest console output dropped (rate limit or a slow sink)",
                now - reported
            );
            reported = now;
        }
    }
}

/// One sandbox's console: never blocks, limited to the hub's rate (a token bucket with a
/// one-second burst).
pub(crate) struct SandboxConsole {
    hub: Arc<ConsoleHub>,
    tokens: f64,
    last: Instant,
}

impl Write for SandboxConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let len = buf.len() as u64;
        if self.hub.rate > 0 {
            let now = Instant::now();
            let rate = self.hub.rate as f64;
            self.tokens =
                (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(rate);
            self.last = now;
            if self.tokens < len as f64 {
                self.hub.dropped.fetch_add(len, Ordering::Relaxed);
                return Ok(buf.len());
            }
            self.tokens -= len as f64;
        }
        match self.hub.tx.try_send(buf.to_vec()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.hub.dropped.fetch_add(len, Ordering::Relaxed);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A sink that never returns from a write.
    struct Stalled;
    impl Write for Stalled {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            std::thread::sleep(Duration::from_secs(3600));
            Ok(0)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_sink_never_blocks_a_writer_and_drops_are_counted() {
        let hub = ConsoleHub::new(Arc::new(Mutex::new(Box::new(Stalled))), 0, true);
        let mut c = hub.sandbox_console();
        let t = Instant::now();
        for _ in 0..(QUEUE_CHUNKS + 100) {
            c.write_all(b"line\n").unwrap();
        }
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(hub.dropped() >= 5 * 99, "dropped {}", hub.dropped());
    }

    #[test]
    fn each_sandbox_is_held_to_its_rate() {
        let out = Arc::new(Mutex::new(Vec::new()));
        struct Shared(Arc<Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let hub = ConsoleHub::new(
            Arc::new(Mutex::new(Box::new(Shared(out.clone())))),
            1000,
            true,
        );
        let mut flood = hub.sandbox_console();
        let mut quiet = hub.sandbox_console();
        for _ in 0..100 {
            flood.write_all(&[b'x'; 100]).unwrap();
        }
        quiet.write_all(b"still heard\n").unwrap();
        // ~1000 bytes of burst pass, the rest is dropped; the quiet sandbox is unaffected.
        assert!(hub.dropped() >= 8000, "dropped {}", hub.dropped());
        let t = Instant::now();
        while !String::from_utf8_lossy(&out.lock().unwrap()).contains("still heard") {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the quiet line never arrived"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
