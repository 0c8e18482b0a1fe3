//! Clocks and sleeping: a monotonic clock and wall clock read from the TSC without exits.
//!
//! The host passes the TSC frequency, the TSC value at boot and the wall-clock time at boot
//! in the boot info, so reading a clock is one `rdtsc` (no VM exit). Sleeping is one `WAIT`
//! hypercall with a deadline on the monotonic clock.

use core::ops::{Add, AddAssign, Sub, SubAssign};
use core::sync::atomic::{AtomicU64, Ordering};
use core::time::Duration;

use pvrun_abi::Wait;

use crate::boot_info;
use crate::hypercall::call;

/// TSC ticks per second, cached at start (never 0).
static TSC_HZ: AtomicU64 = AtomicU64::new(1_000_000_000);
/// TSC value at the boot instant, cached at start.
static TSC_AT_BOOT: AtomicU64 = AtomicU64::new(0);

/// Caches the clock parameters from the boot info; called once by the start code.
pub(crate) fn init() {
    let bi = boot_info();
    if bi.tsc_hz != 0 {
        TSC_HZ.store(bi.tsc_hz, Ordering::Relaxed);
    }
    TSC_AT_BOOT.store(bi.tsc_at_boot, Ordering::Relaxed);
}

/// Reads the time-stamp counter.
#[inline]
fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` is allowed at CPL3 (the host leaves CR4.TSD clear) and has no effects.
    #[allow(unused_unsafe)]
    unsafe {
        core::arch::x86_64::_rdtsc()
    }
}

/// The raw TSC, for loops that compare ticks (see [`ns_to_ticks`]).
#[inline]
pub(crate) fn ticks() -> u64 {
    rdtsc()
}

/// `ns` nanoseconds in TSC ticks.
pub(crate) fn ns_to_ticks(ns: u64) -> u64 {
    let t = ns as u128 * TSC_HZ.load(Ordering::Relaxed) as u128 / 1_000_000_000;
    t.min(u64::MAX as u128) as u64
}

/// Nanoseconds of the guest monotonic clock (0 at the boot instant).
pub fn monotonic_ns() -> u64 {
    let ticks = rdtsc().saturating_sub(TSC_AT_BOOT.load(Ordering::Relaxed));
    let ns = ticks as u128 * 1_000_000_000 / TSC_HZ.load(Ordering::Relaxed) as u128;
    ns.min(u64::MAX as u128) as u64
}

/// Time since the UNIX epoch (UTC), from the host's wall clock at boot plus the monotonic clock.
pub fn wall_clock() -> Duration {
    Duration::from_nanos(boot_info().wall_ns_at_boot.saturating_add(monotonic_ns()))
}

/// Blocks for at least `d` (one `WAIT` hypercall unless the host wakes the guest early).
pub fn sleep(d: Duration) {
    let deadline = monotonic_ns().saturating_add(d.as_nanos().min(u64::MAX as u128) as u64);
    sleep_until_ns(deadline);
}

/// Blocks until the monotonic clock reaches `deadline_ns`.
fn sleep_until_ns(deadline_ns: u64) {
    while monotonic_ns() < deadline_ns {
        if call(&Wait { deadline_ns }) < 0 {
            // The host refused to wait: do not turn that into a hot loop of exits.
            while monotonic_ns() < deadline_ns {
                core::hint::spin_loop();
            }
        }
    }
}

/// A point on the monotonic clock, like `std::time::Instant`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant {
    ns: u64,
}

impl Instant {
    /// The current instant.
    pub fn now() -> Instant {
        Instant { ns: monotonic_ns() }
    }

    /// Time since this instant.
    pub fn elapsed(&self) -> Duration {
        Instant::now().duration_since(*self)
    }

    /// Time from `earlier` to this instant (zero if `earlier` is later).
    pub fn duration_since(&self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.ns.saturating_sub(earlier.ns))
    }

    /// Nanoseconds since boot at this instant.
    pub fn as_nanos_since_boot(&self) -> u64 {
        self.ns
    }

    /// Blocks until this instant has passed.
    pub fn sleep_until(&self) {
        sleep_until_ns(self.ns);
    }
}

/// Converts a duration to nanoseconds, saturating.
fn dur_ns(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

impl Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, d: Duration) -> Instant {
        Instant {
            ns: self.ns.saturating_add(dur_ns(d)),
        }
    }
}

impl AddAssign<Duration> for Instant {
    fn add_assign(&mut self, d: Duration) {
        *self = *self + d;
    }
}

impl Sub<Duration> for Instant {
    type Output = Instant;
    fn sub(self, d: Duration) -> Instant {
        Instant {
            ns: self.ns.saturating_sub(dur_ns(d)),
        }
    }
}

impl SubAssign<Duration> for Instant {
    fn sub_assign(&mut self, d: Duration) {
        *self = *self - d;
    }
}

impl Sub<Instant> for Instant {
    type Output = Duration;
    fn sub(self, earlier: Instant) -> Duration {
        self.duration_since(earlier)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[crate::test]
    fn durations_saturate_and_the_clock_moves_forward() {
        assert_eq!(dur_ns(Duration::from_micros(3)), 3000);
        assert_eq!(dur_ns(Duration::MAX), u64::MAX);
        let a = Instant::now();
        let b = a + Duration::from_millis(5);
        assert_eq!(b - a, Duration::from_millis(5));
        assert_eq!(
            a - b,
            Duration::ZERO,
            "an earlier instant saturates at zero"
        );
        assert!(Instant::now() >= a);
    }
}
