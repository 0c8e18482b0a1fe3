//! Hypercall dispatch: decode a call, copy its argument struct out of guest memory once,
//! validate every address and length against the guest memory map, act, return a status.
//!
//! Nothing here trusts the guest: the argument address must be 8-byte aligned and lie in
//! memory the guest itself may read; buffers must lie in guest-readable regions (never the
//! host's page tables or descriptor tables); lengths are bounded before anything is copied.
//! The console lives in [`console`], the function-call ABI in [`crate::function`].

pub(crate) mod console;
pub(crate) mod guest;

use pvrun_abi::{ABORT_MESSAGE_MAX, Abort, Exit, Wait, call, status};

pub(crate) use console::Console;
pub(crate) use guest::GuestView;

use crate::function::{self, Exports, FnContext};

/// What the run loop does after a hypercall.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Resume the guest with this status in `rax`.
    Return(i64),
    /// The guest exits with this code.
    Exit(i32),
    /// The guest aborted (panicked) with this message.
    Abort(String),
    /// Sleep until this guest-monotonic deadline (ns), then resume with `rax` = 0.
    Wait(u64),
    /// The guest broke the protocol badly enough to be stopped (a corrupt console ring).
    Fault(String),
    /// A function guest is initialised and ready for calls (`FN_READY`).
    Ready(Exports),
    /// A function guest finished a call (`FN_RETURN`): its status and output, or the
    /// output's length when it is larger than allowed.
    Returned {
        /// 0 for a result, otherwise an error with a message as output.
        status: i64,
        /// The output (`Err(len)`: larger than the limit, not copied).
        output: Result<Vec<u8>, u64>,
    },
}

/// Runs hypercall `nr` with argument address `arg`.
pub(crate) fn dispatch(
    nr: u16,
    arg: u64,
    guest: &GuestView<'_>,
    console: &mut Console,
    fns: &mut FnContext,
) -> Action {
    let r = match nr {
        call::FN_READY => match function::fn_ready(arg, guest, fns) {
            Ok(e) => return Action::Ready(e),
            Err(e) => Err(e),
        },
        call::FN_RETURN => return function::fn_return(arg, guest, fns),
        call::HOST_CALL => function::host_call(arg, guest, fns),
        call::FN_MAILBOX => function::fn_mailbox(arg, guest, fns),
        call::FN_NOTIFY => Ok(function::fn_notify(fns)),
        call::CONSOLE_WRITE => console::console_write(arg, guest, console),
        call::EXIT => match guest.read_args::<Exit>(arg) {
            Ok(a) if a.reserved != 0 => Err(status::BAD_ARGUMENT),
            Ok(a) => return Action::Exit(a.code),
            Err(e) => Err(e),
        },
        call::ABORT => return abort(arg, guest),
        call::CONSOLE_FLUSH => match console.drain(guest.mem) {
            Ok(()) => Ok(0),
            Err(e) => return Action::Fault(e),
        },
        call::WAIT => match guest.read_args::<Wait>(arg) {
            Ok(a) => return Action::Wait(a.deadline_ns),
            Err(e) => Err(e),
        },
        _ => Err(status::UNKNOWN_CALL),
    };
    Action::Return(r.unwrap_or_else(|e| e))
}

fn abort(arg: u64, guest: &GuestView<'_>) -> Action {
    let a: Abort = match guest.read_args(arg) {
        Ok(a) => a,
        Err(_) => return Action::Abort("<abort arguments unreadable: bad address>".into()),
    };
    let len = a.len.min(ABORT_MESSAGE_MAX);
    let mut buf = Vec::new();
    match guest.read_buf(a.msg, len, ABORT_MESSAGE_MAX, &mut buf) {
        Ok(()) => Action::Abort(String::from_utf8_lossy(&buf).into_owned()),
        Err(_) => Action::Abort(format!(
            "<message unreadable: {len} bytes at {:#x} are outside guest memory>",
            a.msg
        )),
    }
}

#[cfg(test)]
mod tests;
