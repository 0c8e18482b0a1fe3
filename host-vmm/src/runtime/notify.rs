//! Waking a guest that sleeps in `WAIT`: device threads and stop requests [`Notify::signal`],
//! the vCPU thread [`Notify::wait`]s.
//!
//! The sleep is a `poll` on an eventfd, not a condition variable, so a signal delivered to
//! the vCPU thread (SIGTERM, the stop kick) interrupts it at once: a guest idle in `WAIT`
//! stops as promptly as a running one. Every signal writes the eventfd (a version that
//! skipped the write while nobody slept measured 5-10x slower at QD1 block I/O here:
//! the device thread's write is what lets the vCPU thread see the response in time).
//!
//! [`Notify::clear`] forgets a pending wake-up; a sandbox reset calls it, so a wake-up
//! meant for one call (a device response, a stop) never reaches the next.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use crate::error::Error;

/// A one-bit wake-up for one sleeper.
pub(crate) struct Notify {
    /// Something happened since the last wait.
    pending: AtomicBool,
    efd: EventFd,
}

impl Notify {
    /// A wake-up with nothing pending.
    pub fn new() -> Result<Notify, Error> {
        Ok(Notify {
            pending: AtomicBool::new(false),
            efd: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::Io)?,
        })
    }

    /// Marks that something happened and wakes the sleeper, if any.
    pub fn signal(&self) {
        self.pending.store(true, Ordering::SeqCst);
        let _ = self.efd.write(1);
    }

    /// Forgets a pending wake-up. The eventfd is drained only when one was pending (a
    /// system call less per reset in the common case): a count left without `pending`
    /// (a signal whose write raced with a wait that had already taken `pending`) only
    /// makes the next wait's `ppoll` return early once, and that wait then sleeps again
    /// since nothing is pending (see the test below).
    pub fn clear(&self) {
        if self.pending.swap(false, Ordering::SeqCst) {
            let _ = self.efd.read();
        }
    }

    /// Waits until signalled, `timeout` passes, or a signal interrupts the thread; clears
    /// the wake-up. True if signalled.
    pub fn wait(&self, timeout: Duration) -> bool {
        if self.pending.swap(false, Ordering::SeqCst) {
            // Drain the write that came with it, so the next wait really sleeps (a signal
            // racing with this read leaves `pending` set, which the next wait sees).
            let _ = self.efd.read();
            return true;
        }
        {
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.efd),
                events: libc::POLLIN,
                revents: 0,
            };
            // ppoll, not poll: guest deadlines are often microseconds away, and poll's
            // millisecond timeout would turn each into a whole millisecond.
            let ts = libc::timespec {
                tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: timeout.subsec_nanos() as libc::c_long,
            };
            // SAFETY: ppoll on one descriptor we own with a valid pollfd and timespec, and
            // no signal mask change; EINTR (a signal) simply ends the wait.
            unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        }
        let _ = self.efd.read();
        self.pending.swap(false, Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn a_signal_before_the_wait_is_remembered() {
        let n = Notify::new().unwrap();
        n.signal();
        assert!(n.wait(Duration::from_secs(5)));
        // And consumed.
        let t = Instant::now();
        assert!(!n.wait(Duration::from_millis(20)));
        assert!(t.elapsed() >= Duration::from_millis(15));
    }

    #[test]
    fn clear_forgets_a_pending_signal() {
        let n = Notify::new().unwrap();
        n.signal();
        n.clear();
        assert!(!n.wait(Duration::from_millis(10)));
    }

    #[test]
    fn a_stale_count_without_a_pending_wake_up_does_not_end_a_wait() {
        let n = Notify::new().unwrap();
        // The eventfd holds a count that no pending wake-up goes with.
        n.efd.write(1).unwrap();
        n.clear();
        let t = Instant::now();
        assert!(!n.wait(Duration::from_millis(20)), "reported as a wake-up");
        // The stale count ended this ppoll early and was drained: the next wait sleeps.
        assert!(!n.wait(Duration::from_millis(20)));
        assert!(
            t.elapsed() >= Duration::from_millis(15),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn a_signal_from_another_thread_wakes_the_sleeper() {
        let n = Arc::new(Notify::new().unwrap());
        let n2 = n.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            n2.signal();
        });
        let start = Instant::now();
        assert!(n.wait(Duration::from_secs(10)));
        assert!(start.elapsed() < Duration::from_secs(5));
        t.join().unwrap();
    }
}
