//! What every device I/O thread shares: the counters ([`DeviceStats`]), the guest wake-up
//! ([`Notify`]), and the one loop ([`IoWorker`]) that waits for the doorbell, serves the
//! device's rings through its [`Service`], and shuts a corrupted ring down: mark it
//! broken, wake the guest, say so once, then wait for the stop.

use std::fmt;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::ring::RingError;
use crate::memory::MemoryMap;

pub(crate) use crate::runtime::notify::Notify;

/// Counters of one device, for benchmarks and reports.
#[derive(Default)]
pub struct DeviceStats {
    /// Doorbells the guest rang.
    pub doorbells: AtomicU64,
    /// Requests served.
    pub requests: AtomicU64,
    /// Times the I/O thread woke up.
    pub wakeups: AtomicU64,
    /// Requests refused and dropped (network frames with a bad length, address or source).
    pub dropped: AtomicU64,
}

/// A snapshot of [`DeviceStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceCounters {
    /// Doorbells the guest rang.
    pub doorbells: u64,
    /// Requests served.
    pub requests: u64,
    /// Times the I/O thread woke up.
    pub wakeups: u64,
    /// Requests refused and dropped (network frames with a bad length, address or source).
    pub dropped: u64,
}

impl DeviceStats {
    /// The current values.
    pub fn counters(&self) -> DeviceCounters {
        DeviceCounters {
            doorbells: self.doorbells.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            wakeups: self.wakeups.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

/// `s` with control characters escaped, for reports on the terminal.
pub fn printable(s: &str) -> String {
    crate::output::escape_controls(s).into_owned()
}

/// Checks a device name: 1-31 bytes of `[A-Za-z0-9_.-]`.
pub fn check_device_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 31
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    {
        return Err(format!(
            "device name `{}` must be 1-31 characters of letters, digits, `_`, `.`, `-`",
            printable(name)
        ));
    }
    Ok(())
}

/// One report line about device `name`: `pvrun: device `NAME`<what>`.
pub fn report_line(name: &str, what: fmt::Arguments<'_>) -> String {
    printable(&format!("pvrun: device `{name}`{what}"))
}

/// What an I/O thread works with besides its back end.
pub struct DeviceCtx {
    /// Device name (from the host's configuration).
    pub name: String,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// What the guest may access.
    pub map: MemoryMap,
    /// Wakes a waiting guest.
    pub notify: Arc<Notify>,
    /// Counters.
    pub stats: Arc<DeviceStats>,
}

impl DeviceCtx {
    /// Prints one report line about the device on stderr.
    pub fn report(&self, what: fmt::Arguments<'_>) {
        crate::output::eprint_line(&report_line(&self.name, what));
    }
}

/// A device back end served by an [`IoWorker`].
pub trait Service: Send + 'static {
    /// A descriptor to wait on besides the doorbell, and the poll events wanted from it
    /// (errors and hang-ups are always reported), or `None`.
    fn watch(&self) -> Option<(RawFd, i16)> {
        None
    }

    /// Serves the rings after a wake-up. `rang`: the doorbell rang; `revents`: what
    /// `poll` reported for the [`Service::watch`] descriptor (0 if none).
    fn serve(&mut self, dev: &DeviceCtx, rang: bool, revents: i16) -> Result<(), RingError>;

    /// Marks every ring of the device broken.
    fn mark_broken(&self, mem: &GuestMemoryMmap);
}

/// The I/O thread of one device.
pub struct IoWorker<S> {
    /// Shared facts.
    pub dev: DeviceCtx,
    /// The doorbell.
    pub doorbell: Arc<EventFd>,
    /// Set to end the thread (then the doorbell is rung).
    pub stop: Arc<AtomicBool>,
    /// The back end.
    pub service: S,
}

impl<S: Service> IoWorker<S> {
    /// Serves the device until stopped; a corrupted ring is reported once and abandoned.
    pub fn run(mut self) {
        crate::seccomp::confine_io_thread();
        loop {
            let (rang, revents) = self.wait(self.service.watch());
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            self.dev.stats.wakeups.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.service.serve(&self.dev, rang, revents) {
                // The guest corrupted a ring: stop serving the device and say so once.
                self.service.mark_broken(&self.dev.mem);
                self.dev.notify.signal();
                self.dev.report(format_args!(" broken: {}", e.0));
                while !self.stop.load(Ordering::SeqCst) {
                    self.wait(None);
                }
                return;
            }
        }
    }

    /// Waits (without spinning) for the doorbell, a stop, or an event on `watch`.
    /// Returns whether the doorbell rang and the events of `watch`.
    fn wait(&self, watch: Option<(RawFd, i16)>) -> (bool, i16) {
        let (fd, events) = watch.unwrap_or((-1, 0));
        let mut fds = [
            libc::pollfd {
                fd: self.doorbell.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            // A negative descriptor is ignored by poll.
            libc::pollfd {
                fd,
                events,
                revents: 0,
            },
        ];
        // SAFETY: poll on descriptors we own, with valid pollfds.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        let rang = fds[0].revents & libc::POLLIN != 0;
        if rang && let Ok(n) = self.doorbell.read() {
            self.dev.stats.doorbells.fetch_add(n, Ordering::Relaxed);
        }
        (rang, fds[1].revents)
    }
}

/// A memory map for tests: host-only `0x1000..0x2000`, read-only `0x10_0000..0x20_0000`,
/// text `0x20_0000..0x40_0000`, read-write `0x40_0000..0xc0_0000` (8 MiB).
#[cfg(test)]
pub(crate) fn test_map() -> MemoryMap {
    use crate::memory::{HOST_ONLY, Region};
    use pvrun_abi::{perm, region};
    let r = |start, end, kind, perm, user| Region {
        start,
        end,
        kind,
        perm,
        user,
    };
    MemoryMap::new(vec![
        r(0x1000, 0x2000, HOST_ONLY, perm::R | perm::W, false),
        r(0x10_0000, 0x20_0000, region::RODATA, perm::R, true),
        r(0x20_0000, 0x40_0000, region::TEXT, perm::R | perm::X, true),
        r(0x40_0000, 0xc0_0000, region::DATA, perm::R | perm::W, true),
    ])
    .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_escape_control_characters() {
        let line = report_line(
            "eth\n0\x1b[31m",
            format_args!(": TAP `t\r\u{7f}` is gone\u{2028}"),
        );
        assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
        assert!(!line.contains('\u{2028}'), "{line:?}");
        assert_eq!(
            line,
            "pvrun: device `eth\\n0\\u{1b}[31m`: TAP `t\\r\\u{7f}` is gone\\u{2028}"
        );
        assert_eq!(printable("disk-0.a_b"), "disk-0.a_b");
    }
}
