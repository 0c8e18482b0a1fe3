//! Ending the guest: normal exit with a code, abnormal abort with a message, and the
//! [`Termination`] trait that turns `main`'s return value into an exit code.

use core::fmt::Debug;

use pvrun_abi::{Abort, Exit};

use crate::hypercall::call;

/// Stops the guest with exit `code` (the host process exits with `code & 0xff`).
pub fn exit(code: i32) -> ! {
    call(&Exit { code, reserved: 0 });
    // The host never resumes a guest after EXIT; if it somehow does, go no further.
    loop {
        core::hint::spin_loop();
    }
}

/// Stops the guest abnormally with `msg` (reported like a panic; the run exits with 101).
pub fn abort(msg: &str) -> ! {
    call(&Abort {
        msg: msg.as_ptr() as u64,
        len: msg.len() as u64,
    });
    // ABORT does not return; if the host rejected it, still stop with the panic status.
    exit(101)
}

/// A value `main` may return; [`report`](Termination::report) turns it into the exit code.
pub trait Termination {
    /// Consumes the value and returns the exit code (printing an error if there is one).
    fn report(self) -> i32;
}

impl Termination for () {
    fn report(self) -> i32 {
        0
    }
}

impl Termination for i32 {
    fn report(self) -> i32 {
        self
    }
}

impl Termination for core::convert::Infallible {
    fn report(self) -> i32 {
        match self {}
    }
}

impl<T: Termination, E: Debug> Termination for Result<T, E> {
    fn report(self) -> i32 {
        match self {
            Ok(v) => v.report(),
            Err(e) => {
                crate::eprintln!("Error: {e:?}");
                1
            }
        }
    }
}
