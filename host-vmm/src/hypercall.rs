//! Hypercall dispatch: decode a call, copy its argument struct out of guest memory once,
//! validate every address and length against the guest memory map, act, return a status.
//!
//! Nothing here trusts the guest: the argument address must be 8-byte aligned and lie in
//! memory the guest itself may read; buffers must lie in guest-readable regions (never the
//! host's page tables or descriptor tables); lengths are bounded before anything is copied.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use pvrun_abi::layout::{CONSOLE_DATA_ADDR, CONSOLE_DATA_SIZE, CONSOLE_RING_ADDR};
use pvrun_abi::{
    ABORT_MESSAGE_MAX, Abort, CONSOLE_RECORD_HEADER, CONSOLE_WRITE_MAX, ConsoleWrite, Exit, FnCall,
    FnReady, FnReturn, HostCall, Wait, call, status, stream,
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

/// What a function guest declared at `FN_READY`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exports {
    /// Exported function names, in index order.
    pub names: Vec<String>,
    /// Guest address of the input buffer (validated guest-writable).
    pub inbuf: u64,
    /// Size of the input buffer.
    pub inbuf_len: u64,
}

/// A function the host offers to guests by name: bytes in, bytes out.
pub type HostFn = Arc<dyn Fn(&[u8]) -> Result<Vec<u8>, String> + Send + Sync>;

/// Largest host-function input, and largest function output by default.
pub const FN_DATA_MAX: u64 = 16 << 20;

/// Per-VM context of the function-call hypercalls.
#[derive(Default)]
pub struct FnContext {
    /// Host functions by name.
    pub host_fns: Arc<HashMap<String, HostFn>>,
    /// Largest output a call may return.
    pub max_output: u64,
    /// Guest ranges the host wrote since the last snapshot restore (they are not in KVM's
    /// dirty log, but must be restored too).
    pub host_writes: Vec<(u64, u64)>,
}

/// Where guest console output goes.
pub struct Console {
    /// Guest stdout.
    pub stdout: Box<dyn Write + Send>,
    /// Guest stderr.
    pub stderr: Box<dyn Write + Send>,
    scratch: Vec<u8>,
    /// Bytes of the console ring consumed so far. The host keeps its own count and never
    /// trusts the copy it publishes to the guest.
    consumed: u64,
}

impl Console {
    /// A console writing to the given sinks.
    pub fn new(stdout: Box<dyn Write + Send>, stderr: Box<dyn Write + Send>) -> Self {
        Console {
            stdout,
            stderr,
            scratch: Vec::new(),
            consumed: 0,
        }
    }

    /// Bytes of the console ring consumed so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Resets the consumed count (when guest memory is reset to a snapshot).
    pub fn set_consumed(&mut self, consumed: u64) {
        self.consumed = consumed;
    }

    /// Copies every complete record out of the guest's console ring to the sinks. An error
    /// (an impossible producer index, a record with a bad stream or cut short) means the
    /// guest corrupted the ring; the caller stops it.
    pub fn drain(&mut self, mem: &GuestMemoryMmap) -> Result<(), String> {
        let producer: u64 = mem
            .read_obj(GuestAddress(CONSOLE_RING_ADDR))
            .map_err(|e| format!("console ring unreadable: {e}"))?;
        if producer == self.consumed {
            return Ok(());
        }
        // Pairs with the guest's release store of `producer`: the bytes are read after it.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let avail = producer.wrapping_sub(self.consumed);
        if avail > CONSOLE_DATA_SIZE {
            return Err(format!(
                "console ring corrupted: producer index {producer} is {avail} bytes ahead of the consumer {} (ring size {CONSOLE_DATA_SIZE})",
                self.consumed
            ));
        }
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        buf.resize(avail as usize, 0);
        let start = self.consumed % CONSOLE_DATA_SIZE;
        let first = (CONSOLE_DATA_SIZE - start).min(avail) as usize;
        let r = mem
            .read_slice(&mut buf[..first], GuestAddress(CONSOLE_DATA_ADDR + start))
            .and_then(|_| mem.read_slice(&mut buf[first..], GuestAddress(CONSOLE_DATA_ADDR)));
        let result = match r {
            Err(e) => Err(format!("console ring unreadable: {e}")),
            Ok(()) => self.deliver(&mut buf),
        };
        self.scratch = buf;
        // Everything published is consumed, even a corrupt tail, so the guest never spins.
        self.consumed = producer;
        let _ = mem.write_obj(producer, GuestAddress(CONSOLE_RING_ADDR + 64));
        result
    }

    /// Writes the records in `buf` (the host's copy of the ring) to their streams, joining
    /// runs of records for the same stream into one write. The payloads are packed in place
    /// over the record headers, so delivering copies nothing more.
    fn deliver(&mut self, buf: &mut [u8]) -> Result<(), String> {
        let h = CONSOLE_RECORD_HEADER as usize;
        let (mut read, mut write, mut run_start) = (0usize, 0usize, 0usize);
        let mut run_stream = stream::STDOUT;
        let mut result = Ok(());
        while read < buf.len() {
            let Some(&[stream, lo, hi]) = buf.get(read..read + h) else {
                result = Err("console ring corrupted: a record header is cut short".into());
                break;
            };
            let (stream, len) = (stream as u32, u16::from_le_bytes([lo, hi]) as usize);
            if read + h + len > buf.len() {
                result = Err(format!(
                    "console ring corrupted: a record of {len} bytes extends past the published data"
                ));
                break;
            }
            if stream != stream::STDOUT && stream != stream::STDERR {
                result = Err(format!(
                    "console ring corrupted: record for unknown stream {stream}"
                ));
                break;
            }
            if stream != run_stream {
                self.emit(run_stream, &buf[run_start..write]);
                run_start = write;
                run_stream = stream;
            }
            buf.copy_within(read + h..read + h + len, write);
            write += len;
            read += h + len;
        }
        // Records before a corrupt one are still delivered.
        self.emit(run_stream, &buf[run_start..write]);
        result
    }

    fn emit(&mut self, stream: u32, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let sink = if stream == stream::STDERR {
            &mut self.stderr
        } else {
            &mut self.stdout
        };
        // Host-side output errors (a closed pipe) are not the guest's fault.
        let _ = sink.write_all(data).and_then(|_| sink.flush());
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
        if !addr.is_multiple_of(8) {
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
pub fn dispatch(
    nr: u16,
    arg: u64,
    guest: &GuestView<'_>,
    console: &mut Console,
    fns: &mut FnContext,
) -> Action {
    let r = match nr {
        call::FN_READY => match fn_ready(arg, guest) {
            Ok(e) => return Action::Ready(e),
            Err(e) => Err(e),
        },
        call::FN_RETURN => match guest.read_args::<FnReturn>(arg) {
            Ok(a) => {
                let mut buf = Vec::new();
                let output = match guest.read_buf(a.out, a.out_len, fns.max_output, &mut buf) {
                    Ok(()) => Ok(buf),
                    Err(status::BAD_LENGTH) if a.out_len > fns.max_output => Err(a.out_len),
                    Err(e) => return Action::Return(e),
                };
                return Action::Returned {
                    status: a.status,
                    output,
                };
            }
            Err(e) => Err(e),
        },
        call::HOST_CALL => host_call(arg, guest, fns),
        call::CONSOLE_WRITE => console_write(arg, guest, console),
        call::EXIT => match guest.read_args::<Exit>(arg) {
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

fn fn_ready(arg: u64, guest: &GuestView<'_>) -> Result<Exports, i64> {
    let a: FnReady = guest.read_args(arg)?;
    let mut list = Vec::new();
    guest.read_buf(a.exports, a.exports_len, 64 * 1024, &mut list)?;
    let names: Vec<String> = list
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    if a.inbuf_len < size_of::<FnCall>() as u64 || !a.inbuf.is_multiple_of(8) {
        return Err(status::BAD_ARGUMENT);
    }
    // The host writes every call's input there: it must be memory the guest may write.
    guest
        .map
        .check_user(a.inbuf, a.inbuf_len, true)
        .map_err(|_| status::BAD_ADDRESS)?;
    Ok(Exports {
        names,
        inbuf: a.inbuf,
        inbuf_len: a.inbuf_len,
    })
}

fn host_call(arg: u64, guest: &GuestView<'_>, fns: &mut FnContext) -> Result<i64, i64> {
    let a: HostCall = guest.read_args(arg)?;
    let mut name = Vec::new();
    guest.read_buf(a.name, a.name_len, 256, &mut name)?;
    let name = String::from_utf8(name).map_err(|_| status::BAD_ARGUMENT)?;
    let f = fns.host_fns.get(&name).ok_or(status::NOT_FOUND)?.clone();
    let mut input = Vec::new();
    guest.read_buf(a.input, a.input_len, FN_DATA_MAX, &mut input)?;
    // Validate the output buffer before running anything on the guest's behalf.
    guest
        .map
        .check_user(a.output, a.output_cap, true)
        .map_err(|e| match e {
            AccessError::Overflow => status::BAD_LENGTH,
            AccessError::Outside => status::BAD_ADDRESS,
        })?;
    let out = match f(&input) {
        Ok(out) => out,
        Err(msg) => {
            // The error message goes into the output buffer, NUL-terminated and cut to fit.
            let keep = msg.len().min(a.output_cap.saturating_sub(1) as usize);
            let mut bytes = msg.as_bytes()[..keep].to_vec();
            if (a.output_cap as usize) > keep {
                bytes.push(0);
            }
            if guest
                .mem
                .write_slice(&bytes, GuestAddress(a.output))
                .is_ok()
            {
                fns.host_writes.push((a.output, bytes.len() as u64));
            }
            return Err(status::HOST_FN_FAILED);
        }
    };
    if out.len() as u64 > a.output_cap {
        return Err(status::BAD_LENGTH);
    }
    guest
        .mem
        .write_slice(&out, GuestAddress(a.output))
        .map_err(|_| status::BAD_ADDRESS)?;
    fns.host_writes.push((a.output, out.len() as u64));
    Ok(out.len() as i64)
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
