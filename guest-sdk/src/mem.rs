//! The C memory functions and unwinding stubs the prebuilt `core` of the
//! `x86_64-unknown-linux-gnu` target links against.
//!
//! On that target `compiler_builtins` does not export `memcpy` and friends (libc normally
//! does), so the SDK defines them. `memcpy`/`memmove`/`memset` use `rep movsb`/`rep stosb`
//! (fast on every CPU with ERMSB); `memcmp`/`bcmp` are plain loops over volatile-free code
//! that LLVM has no idiom to turn back into a call to themselves. The prebuilt `core` was
//! compiled with unwinding, so it also references `rust_eh_personality` and
//! `_Unwind_Resume`; with `panic = "abort"` neither is ever called.

use core::arch::asm;

/// Copies `n` bytes from `src` to `dest` (the ranges must not overlap).
///
/// # Safety
/// The C contract: both ranges valid for `n` bytes and not overlapping.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller upholds memcpy's contract; DF is clear per the SysV ABI.
    unsafe {
        asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags),
        );
    }
    dest
}

/// Copies `n` bytes from `src` to `dest`; the ranges may overlap.
///
/// # Safety
/// The C contract: both ranges valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if n == 0 {
        return dest;
    }
    let (d, s) = (dest as usize, src as usize);
    if d <= s || d >= s.wrapping_add(n) {
        // No harmful overlap: the forward copy of memcpy is correct.
        // SAFETY: the caller upholds the contract; a forward copy is safe when dest <= src.
        unsafe { memcpy(dest, src, n) };
    } else {
        // dest overlaps the tail of src: copy backwards, then restore DF.
        // SAFETY: as above; the last bytes are copied first so nothing is overwritten early.
        unsafe {
            asm!(
                "std",
                "rep movsb",
                "cld",
                inout("rcx") n => _,
                inout("rdi") dest.add(n - 1) => _,
                inout("rsi") src.add(n - 1) => _,
                options(nostack),
            );
        }
    }
    dest
}

/// Sets `n` bytes at `dest` to the byte `c`.
///
/// # Safety
/// The C contract: `dest` valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller upholds memset's contract; DF is clear per the SysV ABI.
    unsafe {
        asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            in("al") c as u8,
            options(nostack, preserves_flags),
        );
    }
    dest
}

/// Compares `n` bytes; returns <0, 0 or >0 like C's `memcmp`.
///
/// # Safety
/// The C contract: both ranges valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    // Compare 8 bytes at a time while they are equal, then find the first differing byte.
    while i + 8 <= n {
        // SAFETY: i + 8 <= n, within both ranges; unaligned reads are fine on x86.
        let (x, y) = unsafe {
            (
                (a.add(i) as *const u64).read_unaligned(),
                (b.add(i) as *const u64).read_unaligned(),
            )
        };
        if x != y {
            break;
        }
        i += 8;
    }
    while i < n {
        // SAFETY: i < n, within both ranges.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// Compares `n` bytes for equality; returns 0 if equal, non-zero otherwise.
///
/// # Safety
/// The C contract: both ranges valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// Personality routine the prebuilt `core` refers to; never called with `panic = "abort"`.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

/// Unwinder entry the prebuilt `core`'s landing pads refer to; unreachable with `panic = "abort"`.
#[unsafe(no_mangle)]
pub extern "C" fn _Unwind_Resume() -> ! {
    crate::process::abort("_Unwind_Resume called: unwinding is not supported")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[crate::test]
    fn memmove_handles_overlap_in_both_directions() {
        let mut b = *b"0123456789";
        // SAFETY: both ranges lie inside `b`.
        unsafe { memmove(b.as_mut_ptr().add(2), b.as_ptr(), 6) };
        assert_eq!(&b, b"0101234589");
        let mut c = *b"0123456789";
        // SAFETY: as above.
        unsafe { memmove(c.as_mut_ptr(), c.as_ptr().add(3), 7) };
        assert_eq!(&c, b"3456789789");
    }

    #[crate::test]
    fn memset_and_memcmp() {
        let mut b = [0u8; 5];
        // SAFETY: inside `b`.
        unsafe { memset(b.as_mut_ptr().add(1), 0x1ab, 3) };
        assert_eq!(b, [0, 0xab, 0xab, 0xab, 0]);
        // SAFETY: 3 readable bytes each.
        unsafe {
            assert_eq!(memcmp(b"abc".as_ptr(), b"abc".as_ptr(), 3), 0);
            assert!(memcmp(b"abc".as_ptr(), b"abd".as_ptr(), 3) < 0);
            assert!(memcmp(b"b".as_ptr(), b"a".as_ptr(), 1) > 0);
            assert_ne!(bcmp(b"xyz".as_ptr(), b"xyw".as_ptr(), 3), 0);
        }
    }
}
