//! Raw and typed hypercalls: the only way the guest talks to the host.
//!
//! A hypercall is `out dx, al` with `dx` = [`HYPERCALL_PORT_BASE`] + call number and `rdi`
//! = the guest address of the call's `#[repr(C)]` argument struct; the host answers in
//! `rax` with a [`status`](pvrun_abi::status) value. The typed [`call`] is safe because every
//! call it allows only reads the guest memory the arguments name; [`hypercall`] is the raw,
//! unchecked form.

use pvrun_abi::{Abort, ConsoleWrite, Exit, HYPERCALL_PORT_BASE, Wait, call as nr};

/// Issues hypercall `nr` with `arg` in `rdi` and returns the host's status from `rax`.
///
/// # Safety
/// `arg` must be what the call expects (usually the address of its argument struct); the
/// host may read, and for some calls write, the guest memory it names.
#[inline(always)]
pub unsafe fn hypercall(nr: u16, arg: u64) -> i64 {
    let mut rax: i64 = 0;
    // SAFETY: `out` to a hypercall port exits to the host, which changes no register but
    // rax and may access guest memory (hence no `nomem`); the caller vouches for `arg`.
    unsafe {
        core::arch::asm!(
            "out dx, al",
            in("dx") HYPERCALL_PORT_BASE.wrapping_add(nr),
            in("rdi") arg,
            inout("rax") rax,
            options(nostack, preserves_flags),
        );
    }
    rax
}

/// An argument struct of a hypercall that only reads guest memory; implemented for the ABI
/// structs of such calls.
pub trait Args: sealed::Sealed {
    /// The call number this struct is the argument of.
    const NR: u16;
}

mod sealed {
    /// Prevents implementations of [`Args`](super::Args) outside this crate.
    pub trait Sealed {}
    impl Sealed for pvrun_abi::ConsoleWrite {}
    impl Sealed for pvrun_abi::Exit {}
    impl Sealed for pvrun_abi::Abort {}
    impl Sealed for pvrun_abi::Wait {}
}

impl Args for ConsoleWrite {
    const NR: u16 = nr::CONSOLE_WRITE;
}
impl Args for Exit {
    const NR: u16 = nr::EXIT;
}
impl Args for Abort {
    const NR: u16 = nr::ABORT;
}
impl Args for Wait {
    const NR: u16 = nr::WAIT;
}

/// Wrapper that gives an argument struct the 8-byte alignment the ABI requires (`Exit` alone
/// is only 4-aligned).
#[repr(C, align(8))]
struct Aligned<A>(A);

/// Issues the hypercall whose argument struct is `args` and returns the host's status.
#[inline]
pub fn call<A: Args + Copy>(args: &A) -> i64 {
    let aligned = Aligned(*args);
    // SAFETY: `aligned` is a live, 8-aligned ABI struct of the right call, and these calls
    // only read guest memory, which the host validates.
    unsafe { hypercall(A::NR, &aligned as *const Aligned<A> as u64) }
}
