//! Function guests: the call ABI (`FN_READY`, `FN_RETURN`, `HOST_CALL`), the snapshot a
//! sandbox is reset to, and the sandboxes built on it.
//!
//! Everything that carries state from one call to the next is in this module:
//! [`snapshot`] takes and restores it (memory, vCPU registers and vector state, the console
//! position, the host's own writes into guest memory), and [`sandbox`] decides when.

pub(crate) mod console;
pub(crate) mod sandbox;
pub(crate) mod snapfile;
pub(crate) mod snapshot;
pub(crate) mod warm;

use std::collections::HashMap;
use std::sync::Arc;

use pvrun_abi::{FnCall, FnReady, FnReturn, HostCall, mailbox, status};

use crate::hypercall::{Action, GuestView};
use crate::memory::UserMemory;

/// What a function guest declared at `FN_READY`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exports {
    /// Exported function names, in index order.
    pub names: Vec<String>,
    /// Guest address of the input buffer (validated guest-writable).
    pub inbuf: u64,
    /// Size of the input buffer.
    pub inbuf_len: u64,
    /// Guest address of the exitless-call mailbox declared with `FN_MAILBOX` before
    /// `FN_READY` (validated: 64-byte aligned, guest-writable, apart from the input
    /// buffer), or 0 when the guest declared none (ABI v3 guests never do).
    pub mailbox: u64,
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
    /// The source of the fresh seed each reset gives the guest.
    pub entropy: crate::builder::boot_info::Entropy,
    /// The last run ended at `FN_READY` or `FN_RETURN` (an `out` the guest chose to
    /// make): no exception, NMI or interrupt shadow can be pending, so a reset need not
    /// load the snapshot's vCPU events.
    pub clean_exit: bool,
    /// The mailbox the guest declared with `FN_MAILBOX` (0: none), which `FN_READY` puts
    /// into the [`Exports`].
    pub mailbox: u64,
    /// Set while a [`warm::WarmSandbox`] runs this VM: `FN_NOTIFY` and `WAIT` report to it.
    pub warm: Option<Arc<warm::Link>>,
}

/// `FN_RETURN`: the call's status and output (or the output's length when it is over the
/// limit).
pub(crate) fn fn_return(arg: u64, guest: &GuestView<'_>, fns: &FnContext) -> Action {
    let a: FnReturn = match guest.read_args(arg) {
        Ok(a) => a,
        Err(e) => return Action::Return(e),
    };
    let mut buf = Vec::new();
    let output = match guest.read_buf(a.out, a.out_len, fns.max_output, &mut buf) {
        Ok(()) => Ok(buf),
        Err(status::BAD_LENGTH) if a.out_len > fns.max_output => Err(a.out_len),
        Err(e) => return Action::Return(e),
    };
    Action::Returned {
        status: a.status,
        output,
    }
}

/// `FN_MAILBOX`: the exitless-call mailbox, `arg` being its address. Checked here (64-byte
/// aligned, the whole 128 bytes guest-writable) and again against the input buffer at
/// `FN_READY`; only recorded, nothing in it is read now.
pub(crate) fn fn_mailbox(arg: u64, guest: &GuestView<'_>, fns: &mut FnContext) -> Result<i64, i64> {
    if arg == 0 {
        return Err(status::BAD_ADDRESS);
    }
    if !arg.is_multiple_of(mailbox::ALIGN) {
        return Err(status::UNALIGNED);
    }
    guest.check(arg, mailbox::SIZE, true)?;
    fns.mailbox = arg;
    Ok(0)
}

/// `FN_NOTIFY`: wakes the caller of a warm sandbox waiting for a result; 0 elsewhere.
pub(crate) fn fn_notify(fns: &FnContext) -> i64 {
    if let Some(link) = &fns.warm {
        link.notified();
    }
    status::OK
}

/// `FN_READY`: the export list and the input buffer the host writes each call into.
pub(crate) fn fn_ready(arg: u64, guest: &GuestView<'_>, fns: &FnContext) -> Result<Exports, i64> {
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
    let mailbox = fns.mailbox;
    if mailbox != 0 {
        // The host writes the input buffer and the mailbox's host line independently: they
        // must not overlap (inbuf_len fits guest memory, checked above).
        let apart =
            mailbox + pvrun_abi::mailbox::SIZE <= a.inbuf || a.inbuf + a.inbuf_len <= mailbox;
        if !apart {
            return Err(status::BAD_ARGUMENT);
        }
    }
    Ok(Exports {
        names,
        inbuf: a.inbuf,
        inbuf_len: a.inbuf_len,
        mailbox,
    })
}

pub(crate) fn host_call(arg: u64, guest: &GuestView<'_>, fns: &mut FnContext) -> Result<i64, i64> {
    let a: HostCall = guest.read_args(arg)?;
    let mut name = Vec::new();
    guest.read_buf(a.name, a.name_len, 256, &mut name)?;
    let name = String::from_utf8(name).map_err(|_| status::BAD_ARGUMENT)?;
    let f = fns.host_fns.get(&name).ok_or(status::NOT_FOUND)?.clone();
    let mut input = Vec::new();
    guest.read_buf(a.input, a.input_len, FN_DATA_MAX, &mut input)?;
    // Validate the output buffer before running anything on the guest's behalf.
    let output = guest.check(a.output, a.output_cap, true)?;
    let out = match f(&input) {
        Ok(out) => out,
        Err(msg) => {
            // The error message goes into the output buffer, NUL-terminated and cut to fit.
            let keep = msg.len().min(a.output_cap.saturating_sub(1) as usize);
            let mut bytes = msg.as_bytes()[..keep].to_vec();
            if (a.output_cap as usize) > keep {
                bytes.push(0);
            }
            if guest.mem.write_user(&output, &bytes).is_ok() {
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
        .write_user(&output, &out)
        .map_err(|e| e.status())?;
    fns.host_writes.push((a.output, out.len() as u64));
    Ok(out.len() as i64)
}
