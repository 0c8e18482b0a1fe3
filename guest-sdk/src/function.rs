//! Function sandboxes: a guest that exports named functions which the host calls, each
//! call starting from the same initialised, snapshotted state.
//!
//! A function guest runs its initialisation, then [`serve`]s: it declares its exports and
//! an input buffer with the `FN_READY` hypercall. The host snapshots the guest at that
//! exit; for every call it restores the snapshot (or keeps the state, if it chooses),
//! writes an [`FnCall`] header and the input into the buffer and resumes the guest, which
//! runs the function and hands the output back with `FN_RETURN`. A function may call
//! functions the host offers by name with [`call_host`].
//!
//! Most guests use [`export_functions!`](crate::export_functions), which generates the
//! entry point:
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! extern crate alloc;
//! use alloc::{string::String, vec::Vec};
//!
//! pvrun::export_functions! {
//!     "upper" => upper,
//! }
//!
//! fn upper(input: &[u8]) -> Result<Vec<u8>, String> {
//!     Ok(input.to_ascii_uppercase())
//! }
//! ```
//!
//! A function returns `Ok(output)`, or `Err(message)`, which the host receives as an error
//! (status 1 with the message as output). A panic or a CPU fault inside a function stops
//! the guest; the host reports it for that call and resets the sandbox.
//!
//! **Exitless calls (ABI v4).** [`serve`] also declares a mailbox (`FN_MAILBOX`) before
//! `FN_READY`. A host that keeps the guest's state between calls may switch it to exitless
//! calls (the host library's `WarmSandbox`): calls then arrive through the mailbox, and
//! results go back through it, without a VM exit. After each call the guest spins on the
//! mailbox for at most the host's `spin_ns`, then sleeps in `WAIT`: an idle sandbox costs
//! no CPU. The budget adapts: after a gap between calls longer than `spin_ns` it halves
//! (down to 1/16), and it is back to `spin_ns` as soon as a call comes within `spin_ns`.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering, fence};

use pvrun_abi::{
    FnCall, FnReady, FnReturn, HYPERCALL_PORT_BASE, HostCall, Wait, call, mailbox, status,
};

use crate::hypercall::hypercall;

/// A function a guest exports: input bytes in, `Ok(output)` or `Err(message)` out.
pub type Function = fn(&[u8]) -> Result<Vec<u8>, String>;

/// Size of the [`FnCall`] header at the start of the input buffer.
const HEADER: usize = size_of::<FnCall>();

/// Largest input [`serve`] accepts: 1 MiB.
pub const DEFAULT_MAX_INPUT: usize = 1 << 20;

/// First output buffer size [`call_host`] offers the host function.
const HOST_OUTPUT_START: usize = 4 << 10;
/// Largest output buffer [`call_host`] grows to.
const HOST_OUTPUT_MAX: usize = 16 << 20;

/// Serves calls to `exports` (name and function) forever, with inputs of up to
/// [`DEFAULT_MAX_INPUT`] bytes.
pub fn serve(exports: &[(&str, Function)]) -> ! {
    serve_with_max_input(exports, DEFAULT_MAX_INPUT)
}

/// Serves calls to `exports` forever, with inputs of up to `max_input` bytes.
///
/// Declares the exports and an input buffer with `FN_READY` (the host snapshots the guest
/// there), then runs each call the host makes and returns its output with `FN_RETURN`.
/// Panics if a name is empty, contains a NUL byte or appears twice. If the host answers
/// `FN_READY` or `FN_RETURN` with an error, prints it to stderr and exits with code 1.
pub fn serve_with_max_input(exports: &[(&str, Function)], max_input: usize) -> ! {
    let names = export_list(exports);
    // The buffer the host writes each call into: 8-aligned (u64 words), header plus input.
    // It is left uninitialised (no page is touched before the snapshot); only bytes the
    // host has written are ever read.
    let words = (HEADER + max_input).div_ceil(8);
    let mut inbuf: Vec<u64> = Vec::with_capacity(words);
    let inbuf_ptr = inbuf.as_mut_ptr().cast::<u8>();
    let inbuf_len = words * 8;
    // The exitless mailbox; a host that does not know FN_MAILBOX answers UNKNOWN_CALL and
    // never switches to exitless calls, so the status does not matter.
    // SAFETY: MAILBOX is a 64-aligned static of 128 bytes that lives forever; the host only
    // records its address.
    let _ = unsafe { hypercall(call::FN_MAILBOX, &MAILBOX as *const Mailbox as u64) };
    let ready = FnReady {
        exports: names.as_ptr() as u64,
        exports_len: names.len() as u64,
        inbuf: inbuf_ptr as u64,
        inbuf_len: inbuf_len as u64,
    };
    // SAFETY: `ready` is a live FnReady naming the export list (read by the host) and the
    // input buffer, which stays allocated for the life of the guest (this never returns).
    let mut st = unsafe { snapshot_hypercall(call::FN_READY, &ready as *const FnReady as u64) };
    let mut what = "FN_READY";
    loop {
        if st != status::OK {
            crate::eprintln!("pvrun: {what} failed: {}", status_name(st));
            crate::process::exit(1);
        }
        if MAILBOX.exitless.load(Ordering::SeqCst) != 0 {
            // SAFETY: as for run_call below; from now on the host posts calls only through
            // the mailbox.
            unsafe { serve_exitless(exports, inbuf_ptr, inbuf_len) }
        }
        // SAFETY: the host wrote a call into the buffer before resuming the guest, and the
        // buffer is `inbuf_len` bytes of live memory that nothing else references.
        let result = unsafe { run_call(exports, inbuf_ptr, inbuf_len) };
        let (code, output) = match result {
            Ok(out) => (0, out),
            Err(msg) => (1, msg.into_bytes()),
        };
        let ret = FnReturn {
            status: code,
            out: output.as_ptr() as u64,
            out_len: output.len() as u64,
        };
        // SAFETY: `ret` is a live FnReturn naming `output`, which the host only reads.
        st = unsafe { snapshot_hypercall(call::FN_RETURN, &ret as *const FnReturn as u64) };
        what = "FN_RETURN";
        drop(output);
    }
}

/// The exitless-call mailbox ([`pvrun_abi::FnMailbox`], docs/ABI.md §5), as atomics: the
/// host reads and writes it while the guest runs.
#[repr(C, align(64))]
struct Mailbox {
    call_seq: AtomicU64,
    spin_ns: AtomicU64,
    host_sleeping: AtomicU32,
    exitless: AtomicU32,
    _reserved_host: [AtomicU64; 5],
    done_seq: AtomicU64,
    status: AtomicI64,
    out: AtomicU64,
    out_len: AtomicU64,
    guest_sleeping: AtomicU32,
    _reserved_guest0: AtomicU32,
    _reserved_guest: [AtomicU64; 3],
}

const _: () = {
    assert!(size_of::<Mailbox>() as u64 == mailbox::SIZE);
    assert!(core::mem::offset_of!(Mailbox, call_seq) as u64 == mailbox::CALL_SEQ);
    assert!(core::mem::offset_of!(Mailbox, spin_ns) as u64 == mailbox::SPIN_NS);
    assert!(core::mem::offset_of!(Mailbox, host_sleeping) as u64 == mailbox::HOST_SLEEPING);
    assert!(core::mem::offset_of!(Mailbox, exitless) as u64 == mailbox::EXITLESS);
    assert!(core::mem::offset_of!(Mailbox, done_seq) as u64 == mailbox::DONE_SEQ);
    assert!(core::mem::offset_of!(Mailbox, status) as u64 == mailbox::STATUS);
    assert!(core::mem::offset_of!(Mailbox, out) as u64 == mailbox::OUT);
    assert!(core::mem::offset_of!(Mailbox, out_len) as u64 == mailbox::OUT_LEN);
    assert!(core::mem::offset_of!(Mailbox, guest_sleeping) as u64 == mailbox::GUEST_SLEEPING);
};

/// The mailbox (in `.bss`: all zero until the host writes it).
static MAILBOX: Mailbox = Mailbox {
    call_seq: AtomicU64::new(0),
    spin_ns: AtomicU64::new(0),
    host_sleeping: AtomicU32::new(0),
    exitless: AtomicU32::new(0),
    _reserved_host: [const { AtomicU64::new(0) }; 5],
    done_seq: AtomicU64::new(0),
    status: AtomicI64::new(0),
    out: AtomicU64::new(0),
    out_len: AtomicU64::new(0),
    guest_sleeping: AtomicU32::new(0),
    _reserved_guest0: AtomicU32::new(0),
    _reserved_guest: [const { AtomicU64::new(0) }; 3],
};

/// Serves calls through the mailbox forever (the host set `exitless`).
///
/// # Safety
/// As for [`run_call`]: `inbuf` is the `inbuf_len`-byte input buffer declared at
/// `FN_READY`, which only the host writes.
unsafe fn serve_exitless(exports: &[(&str, Function)], inbuf: *const u8, inbuf_len: usize) -> ! {
    let mb = &MAILBOX;
    let mut served = mb.done_seq.load(Ordering::SeqCst);
    let full = crate::time::ns_to_ticks(mb.spin_ns.load(Ordering::SeqCst));
    let mut budget = full;
    // The last output stays alive until the next call arrives: the host copies it before
    // it posts another call.
    let mut output: Vec<u8> = Vec::new();
    loop {
        // Adaptive: the full budget while calls come within it (also when one came just
        // after a sleep began), halved after each longer gap, down to 1/16.
        let done_at = crate::time::ticks();
        let spun = wait_for_call(mb, served, budget);
        let gap = crate::time::ticks().wrapping_sub(done_at);
        budget = if spun || gap <= full {
            full
        } else {
            (budget / 2).max(full / 16)
        };
        let seq = mb.call_seq.load(Ordering::SeqCst);
        drop(core::mem::take(&mut output));
        // SAFETY: the host wrote the call before it stored `call_seq` (caller's contract).
        let result = unsafe { run_call(exports, inbuf, inbuf_len) };
        let code = match result {
            Ok(out) => {
                output = out;
                0
            }
            Err(msg) => {
                output = msg.into_bytes();
                1
            }
        };
        mb.status.store(code, Ordering::Relaxed);
        mb.out.store(output.as_ptr() as u64, Ordering::Relaxed);
        mb.out_len.store(output.len() as u64, Ordering::Relaxed);
        mb.done_seq.store(seq, Ordering::SeqCst);
        served = seq;
        // Dekker with the host's `host_sleeping` store: one of us sees the other.
        fence(Ordering::SeqCst);
        if mb.host_sleeping.load(Ordering::SeqCst) != 0 {
            // SAFETY: FN_NOTIFY takes no arguments and touches no guest memory.
            unsafe { hypercall(call::FN_NOTIFY, 0) };
        }
    }
}

/// Waits until `call_seq` moves past `served`: spins for `budget` TSC ticks, then sleeps in
/// `WAIT`. True if the call arrived while spinning.
fn wait_for_call(mb: &Mailbox, served: u64, budget: u64) -> bool {
    let start = crate::time::ticks();
    let mut n = 0u32;
    loop {
        if mb.call_seq.load(Ordering::Acquire) != served {
            return true;
        }
        n = n.wrapping_add(1);
        if n.is_multiple_of(16) && crate::time::ticks().wrapping_sub(start) >= budget {
            break;
        }
        core::hint::spin_loop();
    }
    mb.guest_sleeping.store(1, Ordering::SeqCst);
    // Dekker with the host's `call_seq` store: flag, full fence, look again.
    fence(Ordering::SeqCst);
    while mb.call_seq.load(Ordering::SeqCst) == served {
        let st = crate::hypercall::call(&Wait {
            deadline_ns: u64::MAX,
        });
        if st < 0 {
            // The host refused to wait: poll instead of a hot loop of exits.
            core::hint::spin_loop();
        }
    }
    mb.guest_sleeping.store(0, Ordering::SeqCst);
    false
}

/// Builds the NUL-separated export list the host reads at `FN_READY`.
fn export_list(exports: &[(&str, Function)]) -> Vec<u8> {
    let mut names = Vec::new();
    for (i, (name, _)) in exports.iter().enumerate() {
        assert!(
            !name.is_empty() && !name.contains('\0'),
            "exported function name {name:?} is empty or contains a NUL byte"
        );
        assert!(
            !exports[..i].iter().any(|(n, _)| n == name),
            "function {name:?} is exported twice"
        );
        names.extend_from_slice(name.as_bytes());
        names.push(0);
    }
    names
}

/// Runs the call the host wrote into the input buffer and returns its result.
///
/// # Safety
/// `inbuf` must point at `inbuf_len` (>= 16) bytes, 8-aligned, which the host has written
/// an [`FnCall`] header and the input into, and which nothing else references.
unsafe fn run_call(
    exports: &[(&str, Function)],
    inbuf: *const u8,
    inbuf_len: usize,
) -> Result<Vec<u8>, String> {
    // SAFETY: the caller guarantees the header is there and aligned; volatile because the
    // host, not this program, wrote it.
    let header: FnCall = unsafe { inbuf.cast::<FnCall>().read_volatile() };
    let max_input = (inbuf_len - HEADER) as u64;
    let Some((_, function)) = exports.get(header.index as usize) else {
        return Err(alloc::format!(
            "bad call: function index {} but only {} functions are exported",
            header.index,
            exports.len()
        ));
    };
    if header.input_len > max_input {
        return Err(alloc::format!(
            "bad call: input of {} bytes does not fit the {max_input}-byte input buffer",
            header.input_len
        ));
    }
    // SAFETY: checked above: the input lies inside the buffer, which the host wrote.
    let input =
        unsafe { core::slice::from_raw_parts(inbuf.add(HEADER), header.input_len as usize) };
    function(input)
}

/// Issues `FN_READY` or `FN_RETURN`, the two hypercalls at which the host may snapshot the
/// guest or restore it to an earlier snapshot.
///
/// The instruction is exactly the one-byte `out dx, al` (the host resumes after it), and
/// every caller-saved register, vector state included, is declared clobbered: after a
/// restore the guest continues with the registers of the `FN_READY` exit, so no live
/// value may be kept in a register the host could reset.
///
/// # Safety
/// `arg` must be the address of the call's live, 8-aligned argument struct.
#[inline(never)]
unsafe fn snapshot_hypercall(nr: u16, arg: u64) -> i64 {
    let rax: i64;
    // SAFETY: the caller vouches for `arg`; the host may read and write guest memory
    // (hence no `nomem`) and resumes right after the `out`.
    unsafe {
        core::arch::asm!(
            "out dx, al",
            in("dx") HYPERCALL_PORT_BASE.wrapping_add(nr),
            in("rdi") arg,
            lateout("rax") rax,
            clobber_abi("C"),
            options(nostack),
        );
    }
    rax
}

/// Why a [`call_host`] failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostCallError {
    /// The host offers no function of this name.
    NotFound,
    /// The host function ran and reported an error.
    Failed(String),
    /// The host rejected an address (a bug in the SDK or a hostile host).
    BadAddress,
    /// Any other status (for example an output larger than 16 MiB).
    Other(i64),
}

impl fmt::Display for HostCallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostCallError::NotFound => f.write_str("no such host function"),
            HostCallError::Failed(msg) => write!(f, "host function failed: {msg}"),
            HostCallError::BadAddress => f.write_str("the host rejected an address"),
            HostCallError::Other(st) => write!(f, "host call failed: {}", status_name(*st)),
        }
    }
}

impl core::error::Error for HostCallError {}

/// Calls the host function `name` with `input` and returns its output.
///
/// The output buffer starts at 4 KiB and doubles (up to 16 MiB) while the host answers that
/// the output does not fit; the host function then runs again.
pub fn call_host(name: &str, input: &[u8]) -> Result<Vec<u8>, HostCallError> {
    let mut cap = HOST_OUTPUT_START;
    loop {
        let mut output = vec![0u8; cap];
        let args = HostCall {
            name: name.as_ptr() as u64,
            name_len: name.len() as u64,
            input: input.as_ptr() as u64,
            input_len: input.len() as u64,
            output: output.as_mut_ptr() as u64,
            output_cap: cap as u64,
        };
        // SAFETY: `args` is a live HostCall naming `name` and `input` (read by the host) and
        // `output`, `cap` writable bytes that nothing else references during the call.
        let st = unsafe { hypercall(call::HOST_CALL, &args as *const HostCall as u64) };
        match st {
            n if n >= 0 && n as u64 <= cap as u64 => {
                output.truncate(n as usize);
                return Ok(output);
            }
            status::BAD_LENGTH if cap < HOST_OUTPUT_MAX => cap *= 2,
            status::NOT_FOUND => return Err(HostCallError::NotFound),
            status::HOST_FN_FAILED => {
                // The host leaves the function's error message NUL-terminated in `output`.
                let end = output.iter().position(|&b| b == 0).unwrap_or(output.len());
                let msg = String::from_utf8_lossy(&output[..end]).into_owned();
                return Err(HostCallError::Failed(if msg.is_empty() {
                    alloc::format!("host function `{name}` reported an error")
                } else {
                    msg
                }));
            }
            status::BAD_ADDRESS => return Err(HostCallError::BadAddress),
            other => return Err(HostCallError::Other(other)),
        }
    }
}

/// A readable name for a hypercall status.
fn status_name(st: i64) -> String {
    let name = match st {
        status::UNKNOWN_CALL => "unknown call (the host does not serve functions)",
        status::BAD_ADDRESS => "bad address",
        status::BAD_LENGTH => "bad length",
        status::UNALIGNED => "unaligned arguments",
        status::BAD_ARGUMENT => "bad argument",
        status::NOT_FOUND => "not found",
        status::HOST_FN_FAILED => "host function failed",
        _ => "",
    };
    if name.is_empty() {
        alloc::format!("status {st}")
    } else {
        alloc::format!("{name} (status {st})")
    }
}

/// Declares a function guest: generates its entry point, which runs an optional
/// initialisation function and then [`serve`](crate::function::serve)s the exported
/// functions.
///
/// ```ignore
/// pvrun::export_functions! {
///     "upper" => upper,
///     "sha256" => sha256,
/// }
/// // or, with initialisation that runs before the snapshot, and an input limit:
/// pvrun::export_functions! {
///     init = setup;
///     max_input = 4 << 20;
///     "lookup" => lookup,
/// }
/// ```
///
/// Each function is a [`Function`](crate::function::Function). `init` returns a
/// [`Termination`](crate::process::Termination) type (`()`, `i32`, `Result<(), E>`); a
/// non-zero code ends the guest with that code instead of serving. `max_input` defaults to
/// [`DEFAULT_MAX_INPUT`](crate::function::DEFAULT_MAX_INPUT).
#[macro_export]
macro_rules! export_functions {
    (
        $(init = $init:path;)?
        $(max_input = $max:expr;)?
        $($name:literal => $f:path),+ $(,)?
    ) => {
        /// The guest entry called by the SDK's start code (generated by
        /// `pvrun::export_functions!`).
        #[cfg(not(test))]
        #[doc(hidden)]
        #[unsafe(no_mangle)]
        pub extern "C" fn __pvrun_main() -> i32 {
            /// Marks the ELF as a function guest for tools that read its symbols
            /// (`cargo pvrun build --message-format json`'s `kind`, `pvrun package`).
            #[doc(hidden)]
            #[unsafe(no_mangle)]
            #[inline(never)]
            pub extern "C" fn __pvrun_function_guest() {}
            ::core::hint::black_box(__pvrun_function_guest as extern "C" fn());
            $(
                let code = $crate::process::Termination::report($init());
                if code != 0 {
                    return code;
                }
            )?
            #[allow(unused_mut, unused_assignments)]
            let mut max_input = $crate::function::DEFAULT_MAX_INPUT;
            $(max_input = $max;)?
            $crate::function::serve_with_max_input(
                &[$(($name, $f as $crate::function::Function)),+],
                max_input,
            )
        }
        /// Under `cfg(test)` the entry serves the tests instead (`cargo pvrun test`).
        #[cfg(test)]
        #[doc(hidden)]
        #[unsafe(no_mangle)]
        pub extern "C" fn __pvrun_main() -> i32 {
            $(let _init = $init;)?
            $(let _max: usize = $max;)?
            let _exports = [$(($name, $f as $crate::function::Function)),+];
            $crate::testing::main()
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo(i: &[u8]) -> Result<Vec<u8>, String> {
        Ok(i.to_vec())
    }

    #[crate::test]
    fn the_export_list_is_nul_separated() {
        assert_eq!(export_list(&[("a", echo), ("bc", echo)]), b"a\0bc\0");
    }

    #[crate::test]
    #[should_panic(expected = "exported twice")]
    fn a_name_exported_twice_is_refused() {
        export_list(&[("a", echo), ("a", echo)]);
    }

    #[crate::test]
    #[should_panic(expected = "NUL byte")]
    fn a_name_with_a_nul_is_refused() {
        export_list(&[("a\0b", echo)]);
    }

    #[crate::test]
    fn statuses_have_names() {
        assert_eq!(status_name(status::NOT_FOUND), "not found (status -10)");
        assert_eq!(status_name(-77), "status -77");
    }
}
