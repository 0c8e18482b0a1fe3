//! The platform hooks that crates.io crates expect from an operating system, so that they
//! work in a guest unmodified.
//!
//! Nothing here needs calling: linking the SDK (with its default features) is enough.
//!
//! | crate | what the SDK provides | feature |
//! |---|---|---|
//! | [`getrandom`](https://docs.rs/getrandom) 0.3 and 0.4 (behind `rand` 0.9, `uuid`, `ahash`, ...) | the custom backend `__getrandom_v03_custom` over [`random::fill_bytes`](crate::random::fill_bytes); `cargo pvrun` sets `--cfg getrandom_backend="custom"` for guest builds | `getrandom` |
//! | `getrandom` 0.2 (behind `rand` 0.8, older crates) | 0.2 ignores its `custom` feature on Linux targets, so the SDK turns on its `linux_disable_fallback` feature and answers the C calls it then makes: `syscall(SYS_getrandom, buf, len, flags)` (any other system call fails with `ENOSYS`), `__errno_location` and, for its error messages, `strerror_r` | `getrandom` |
//! | [`critical-section`](https://docs.rs/critical-section) 1.x (behind `once_cell`'s and `portable-atomic`'s `critical-section` features, `heapless`, embedded crates) | an implementation for one vCPU without interrupts (see below) | `critical-section` |
//! | [`log`](https://docs.rs/log) 0.4 | a console logger filtered by `RUST_LOG`: [`log::init`](crate::log::init) | `log` |
//!
//! A guest that wants its own implementation of one of them turns the SDK's off with
//! `default-features = false` (and picks the features it keeps); two implementations of
//! the same hook in one guest are a link error.
//!
//! # Why the critical section does nothing
//!
//! A critical section must keep everything else that could run from running: other CPUs
//! and interrupt handlers. A pvrun guest has exactly one vCPU and runs in ring 3, where
//! no interrupt is ever delivered to it (the host injects none, and there is no interrupt
//! controller to program); the SDK has no threads and no preemption. Nothing can
//! interleave with the code inside the section, so acquiring it only has to stop the
//! compiler from moving memory accesses across its edges (a compiler fence), and the
//! restore state carries nothing. Nesting is therefore trivially correct too.
//!
//! # Floating-point functions
//!
//! `f64::sqrt`, `sin`, `powf`, `exp`, ... are methods of `std`, not `core` (the `%`
//! operator on floats works: it calls the `fmod` that `compiler_builtins` provides). In a
//! guest use the
//! [`libm`](https://docs.rs/libm) crate (pure Rust, `no_std`, a port of musl's libm):
//! `libm::sqrt(2.0)`, `libm::sinf(x)`, `libm::fmod(a, b)`; or `num-traits` with
//! `default-features = false, features = ["libm"]` for the `Float` trait's methods. The
//! `ecosystem` example guest uses both ways.

#[cfg(feature = "getrandom")]
mod random_hooks {
    /// The custom backend of `getrandom` 0.3 and 0.4 (both call this symbol when built
    /// with `--cfg getrandom_backend="custom"`, which guest-build passes).
    ///
    /// # Safety
    /// `dest` is valid for writes of `len` bytes (getrandom's contract for this hook).
    #[unsafe(no_mangle)]
    unsafe extern "Rust" fn __getrandom_v03_custom(
        dest: *mut u8,
        len: usize,
    ) -> Result<(), getrandom::Error> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the caller hands over `len` writable bytes, possibly uninitialised;
        // zeroing them first makes the slice below valid.
        let buf = unsafe {
            core::ptr::write_bytes(dest, 0, len);
            core::slice::from_raw_parts_mut(dest, len)
        };
        crate::random::fill_bytes(buf);
        Ok(())
    }

    // The C functions below exist only in real guest builds: in the host program a plain
    // `cargo build` links (see `start.rs`), they would interpose the C library's own.

    /// `SYS_getrandom` on x86_64 Linux.
    const SYS_GETRANDOM: i64 = 318;
    /// `ENOSYS`: function not implemented.
    const ENOSYS: i32 = 38;
    /// `EFAULT`: bad address.
    const EFAULT: i32 = 14;

    /// The C library's `errno`: one vCPU, no threads, so one cell.
    static mut ERRNO: i32 = 0;

    /// glibc's `errno` accessor, which `getrandom` 0.2 reads after a failed call.
    #[cfg(pvrun_guest)]
    #[unsafe(no_mangle)]
    extern "C" fn __errno_location() -> *mut i32 {
        &raw mut ERRNO
    }

    /// The C library's `syscall(number, ...)`, as `getrandom` 0.2 calls it on Linux (with
    /// its `linux_disable_fallback` feature, which the SDK turns on): only `SYS_getrandom`
    /// is answered, from [`crate::random`]; any other number fails with `ENOSYS`.
    ///
    /// C's `syscall` is variadic; on x86_64 the System V ABI passes the integer arguments
    /// of a variadic call in the same registers as a fixed one, so these six fixed
    /// parameters receive them.
    ///
    /// # Safety
    /// For `SYS_getrandom`, `a1` points at `a2` writable bytes.
    #[cfg(pvrun_guest)]
    #[unsafe(no_mangle)]
    unsafe extern "C" fn syscall(number: i64, a1: usize, a2: usize, _a3: usize) -> isize {
        let fail = |e: i32| {
            // SAFETY: single vCPU, no threads: nothing else touches ERRNO concurrently.
            unsafe { ERRNO = e };
            -1
        };
        if number != SYS_GETRANDOM {
            return fail(ENOSYS);
        }
        let (ptr, len) = (a1 as *mut u8, a2.min(isize::MAX as usize));
        if len == 0 {
            return 0;
        }
        if ptr.is_null() {
            return fail(EFAULT);
        }
        // SAFETY: the caller passes a buffer of `len` writable bytes (getrandom(2)'s
        // contract); zeroed first because it may be uninitialised.
        let buf = unsafe {
            core::ptr::write_bytes(ptr, 0, len);
            core::slice::from_raw_parts_mut(ptr, len)
        };
        crate::random::fill_bytes(buf);
        len as isize
    }

    /// glibc's POSIX `strerror_r` (what the `libc` crate's `strerror_r` links to), which
    /// `getrandom` 0.2 calls to print its errors: the text of the two errors [`syscall`]
    /// returns, `EINVAL` (22) for any other number (getrandom then prints the number).
    ///
    /// # Safety
    /// `buf` is valid for writes of `len` bytes.
    #[cfg(pvrun_guest)]
    #[unsafe(no_mangle)]
    unsafe extern "C" fn __xpg_strerror_r(errnum: i32, buf: *mut u8, len: usize) -> i32 {
        let text: &[u8] = match errnum {
            ENOSYS => b"Function not implemented",
            EFAULT => b"Bad address",
            _ => return 22,
        };
        if buf.is_null() || len <= text.len() {
            return 34; // ERANGE
        }
        // SAFETY: `len` bytes are writable and `text.len() + 1 <= len`.
        unsafe {
            core::ptr::copy_nonoverlapping(text.as_ptr(), buf, text.len());
            buf.add(text.len()).write(0);
        }
        0
    }
}

#[cfg(feature = "critical-section")]
mod critical {
    use core::sync::atomic::{Ordering, compiler_fence};

    use critical_section::RawRestoreState;

    /// One vCPU in ring 3 with no interrupts: see the module docs for why a compiler
    /// fence is the whole implementation.
    struct SingleVcpu;

    critical_section::set_impl!(SingleVcpu);

    // SAFETY: nothing can run concurrently with the guest's one thread of execution (one
    // vCPU, no interrupts, no preemption), so every section is exclusive by construction;
    // the fences keep the compiler from moving accesses out of it.
    unsafe impl critical_section::Impl for SingleVcpu {
        unsafe fn acquire() -> RawRestoreState {
            compiler_fence(Ordering::SeqCst);
            // Whatever restore-state type a crate selected, there is nothing to restore.
            <RawRestoreState as Default>::default()
        }

        unsafe fn release(_state: RawRestoreState) {
            compiler_fence(Ordering::SeqCst);
        }
    }
}
