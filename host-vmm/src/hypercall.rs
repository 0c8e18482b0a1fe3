//! Hypercall dispatch: decode a call, copy its argument struct out of guest memory once,
//! validate every address and length against the guest memory map, act, return a status.
//!
//! Nothing here trusts the guest: the argument address must be 8-byte aligned and lie in
//! memory the guest itself may read; buffers must lie in guest-readable regions (never the
//! host's page tables or descriptor tables); lengths are bounded before anything is copied.

use std::io::Write;

use pvrun_abi::{
    ABORT_MESSAGE_MAX, Abort, CONSOLE_WRITE_MAX, ConsoleWrite, Exit, Wait, call, status, stream,
};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::{AccessError, MemoryMap};

/// What the run loop does after a hypercall.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Resume the guest with this status in `rax`.
    Return(i64),
    /// The guest exits with this code.
    Exit(i32),
    /// The guest aborted (panicked) with this message.
    Abort(String),
    /// Sleep until this guest-monotonic deadline (ns), then resume with `rax` = 0.
    Wait(u64),
}

/// Where guest console output goes.
pub struct Console {
    /// Guest stdout.
    pub stdout: Box<dyn Write + Send>,
    /// Guest stderr.
    pub stderr: Box<dyn Write + Send>,
    scratch: Vec<u8>,
}

impl Console {
    /// A console writing to the given sinks.
    pub fn new(stdout: Box<dyn Write + Send>, stderr: Box<dyn Write + Send>) -> Self {
        Console {
            stdout,
            stderr,
            scratch: Vec::new(),
        }
    }
}

/// The guest memory and map a hypercall may touch.
pub struct GuestView<'a> {
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// What the guest may access.
    pub map: &'a MemoryMap,
}

impl GuestView<'_> {
    /// Copies the argument struct at `addr` out of guest memory, once.
    pub fn read_args<T: ByteValued>(&self, addr: u64) -> Result<T, i64> {
        if addr % 8 != 0 {
            return Err(status::UNALIGNED);
        }
        self.map
            .check_user(addr, size_of::<T>() as u64, false)
            .map_err(|_| status::BAD_ADDRESS)?;
        self.mem
            .read_obj(GuestAddress(addr))
            .map_err(|_| status::BAD_ADDRESS)
    }

    /// Copies `len` bytes at `addr` (guest-readable memory only) into `out`.
    pub fn read_buf(&self, addr: u64, len: u64, max: u64, out: &mut Vec<u8>) -> Result<(), i64> {
        if len > max {
            return Err(status::BAD_LENGTH);
        }
        self.map.check_user(addr, len, false).map_err(|e| match e {
            AccessError::Overflow => status::BAD_LENGTH,
            AccessError::Outside => status::BAD_ADDRESS,
        })?;
        out.clear();
        out.resize(len as usize, 0);
        self.mem
            .read_slice(out, GuestAddress(addr))
            .map_err(|_| status::BAD_ADDRESS)
    }
}

/// Runs hypercall `nr` with argument address `arg`.
pub fn dispatch(nr: u16, arg: u64, guest: &GuestView<'_>, console: &mut Console) -> Action {
    let r = match nr {
        call::CONSOLE_WRITE => console_write(arg, guest, console),
        call::EXIT => match guest.read_args::<Exit>(arg) {
            Ok(a) => return Action::Exit(a.code),
            Err(e) => Err(e),
        },
        call::ABORT => return abort(arg, guest),
        call::WAIT => match guest.read_args::<Wait>(arg) {
            Ok(a) => return Action::Wait(a.deadline_ns),
            Err(e) => Err(e),
        },
        _ => Err(status::UNKNOWN_CALL),
    };
    Action::Return(r.unwrap_or_else(|e| e))
}

fn console_write(arg: u64, guest: &GuestView<'_>, console: &mut Console) -> Result<i64, i64> {
    let a: ConsoleWrite = guest.read_args(arg)?;
    if a.reserved != 0 {
        return Err(status::BAD_ARGUMENT);
    }
    let sink = match a.stream {
        stream::STDOUT => &mut console.stdout,
        stream::STDERR => &mut console.stderr,
        _ => return Err(status::BAD_ARGUMENT),
    };
    let mut buf = std::mem::take(&mut console.scratch);
    let r = guest.read_buf(a.buf, a.len, CONSOLE_WRITE_MAX, &mut buf);
    if r.is_ok() {
        // Host-side output errors (a closed pipe) are not the guest's fault; drop the bytes.
        let _ = sink.write_all(&buf).and_then(|_| sink.flush());
    }
    console.scratch = buf;
    r.map(|_| a.len as i64)
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
