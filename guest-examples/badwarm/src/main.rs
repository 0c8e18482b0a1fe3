//! A function guest that speaks the exitless-call protocol (docs/ABI.md §5, "Exitless
//! calls") itself, from the ABI's types and raw hypercalls only, as a guest in another
//! language would, and breaks it on request. Exit-based calls (before the host switches it
//! to the mailbox) answer every function with `FN_RETURN` as `echo` would, except
//! `counter`.
//!
//! | function | what it does in exitless mode |
//! |---|---|
//! | `echo` | answers with the input |
//! | `counter` | increments a global counter, answers its value in decimal |
//! | `wrong-seq` | publishes `done_seq` = the call's number + 7 |
//! | `bad-out` | names 64 output bytes at `0x1000` (host structures) |
//! | `huge-len` | names 2^40 output bytes at a real buffer |
//! | `spin-after` | answers `ok`, then spins forever without looking at the mailbox |
//! | `never` | never answers (spins) |
//! | `panic` | panics |
//! | `slow-no-notify` | input: a decimal millisecond count; busy-waits that long, answers `slow`, and never makes `FN_NOTIFY` |
//! | `wake-loop-after` | answers `ok`, then makes `WAIT` calls with a past deadline forever |
//! | `fn-return` | answers with `FN_RETURN` although the host switched to exitless calls |
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{Ordering, fence};

use pvrun::abi::{FnCall, FnMailbox, FnReady, FnReturn, Wait, call, status};
use pvrun::hypercall::hypercall;

pvrun::entry!(main);

const NAMES: &[&str] = &[
    "echo",
    "counter",
    "wrong-seq",
    "bad-out",
    "huge-len",
    "spin-after",
    "never",
    "panic",
    "slow-no-notify",
    "wake-loop-after",
    "fn-return",
];

/// The mailbox, shared with the host.
struct Shared(UnsafeCell<FnMailbox>);
// SAFETY: one guest thread; the host's accesses are what the volatile accesses are for.
unsafe impl Sync for Shared {}
static MAILBOX: Shared = Shared(UnsafeCell::new(FnMailbox {
    call_seq: 0,
    spin_ns: 0,
    host_sleeping: 0,
    exitless: 0,
    reserved_host: [0; 5],
    done_seq: 0,
    status: 0,
    out: 0,
    out_len: 0,
    guest_sleeping: 0,
    reserved_guest0: 0,
    reserved_guest: [0; 3],
}));

fn mb() -> *mut FnMailbox {
    MAILBOX.0.get()
}

macro_rules! get {
    ($f:ident) => {
        // SAFETY: an aligned field of the live static mailbox.
        unsafe { addr_of!((*mb()).$f).read_volatile() }
    };
}
macro_rules! set {
    ($f:ident, $v:expr) => {
        // SAFETY: an aligned field of the live static mailbox.
        unsafe { addr_of_mut!((*mb()).$f).write_volatile($v) }
    };
}

/// Calls of `counter`.
static mut COUNTER: u64 = 0;

/// The input buffer: header plus 64 KiB.
const INBUF_WORDS: usize = (16 + 65536) / 8;
static mut INBUF: [u64; INBUF_WORDS] = [0; INBUF_WORDS];

fn rdtsc() -> u64 {
    // SAFETY: rdtsc is allowed at CPL3.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn ms_to_ticks(ms: u64) -> u64 {
    let hz = pvrun::boot_info().tsc_hz;
    (ms as u128 * hz as u128 / 1000) as u64
}

/// The call in the input buffer: (index, input).
fn current_call() -> (u32, Vec<u8>) {
    let base = addr_of!(INBUF) as *const u8;
    // SAFETY: the host wrote a header and input_len bytes into the buffer.
    let h: FnCall = unsafe { base.cast::<FnCall>().read_volatile() };
    let len = (h.input_len as usize).min(INBUF_WORDS * 8 - 16);
    // SAFETY: inside the buffer.
    let input = unsafe { core::slice::from_raw_parts(base.add(16), len) }.to_vec();
    (h.index, input)
}

fn forever() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

fn main() {
    let mut names = Vec::new();
    for n in NAMES {
        names.extend_from_slice(n.as_bytes());
        names.push(0);
    }
    // SAFETY: the mailbox is a 64-aligned static that lives forever.
    let st = unsafe { hypercall(call::FN_MAILBOX, mb() as u64) };
    assert_eq!(st, status::OK, "FN_MAILBOX failed");
    let ready = FnReady {
        exports: names.as_ptr() as u64,
        exports_len: names.len() as u64,
        inbuf: addr_of!(INBUF) as u64,
        inbuf_len: (INBUF_WORDS * 8) as u64,
    };
    // SAFETY: a live FnReady; the host writes only the input buffer.
    let mut st = unsafe { hypercall(call::FN_READY, &ready as *const FnReady as u64) };
    // Exit-based calls until the host switches to the mailbox.
    let mut out: Vec<u8>;
    loop {
        assert_eq!(st, status::OK, "FN_READY/FN_RETURN failed");
        fence(Ordering::SeqCst);
        if get!(exitless) != 0 {
            break;
        }
        let (index, input) = current_call();
        out = if index == 1 {
            // SAFETY: one guest thread.
            unsafe { COUNTER += 1 };
            format!("{}", unsafe { COUNTER }).into_bytes()
        } else {
            input
        };
        let ret = FnReturn {
            status: 0,
            out: out.as_ptr() as u64,
            out_len: out.len() as u64,
        };
        // SAFETY: a live FnReturn naming `out`.
        st = unsafe { hypercall(call::FN_RETURN, &ret as *const FnReturn as u64) };
    }
    let mut served = get!(done_seq);
    let mut scratch = [0u8; 64];
    loop {
        // Wait for a call: spin for spin_ns, then sleep.
        let budget =
            (get!(spin_ns) as u128 * pvrun::boot_info().tsc_hz as u128 / 1_000_000_000) as u64;
        let start = rdtsc();
        while get!(call_seq) == served && rdtsc() - start < budget {
            core::hint::spin_loop();
        }
        if get!(call_seq) == served {
            set!(guest_sleeping, 1);
            fence(Ordering::SeqCst);
            while get!(call_seq) == served {
                let _ = pvrun::hypercall::call(&Wait {
                    deadline_ns: u64::MAX,
                });
            }
            set!(guest_sleeping, 0);
        }
        fence(Ordering::SeqCst);
        let seq = get!(call_seq);
        let (index, input) = current_call();
        let mut done = seq;
        let mut notify = true;
        let mut after: fn() = || {};
        out = match NAMES.get(index as usize).copied().unwrap_or("") {
            "echo" => input,
            "counter" => {
                // SAFETY: one guest thread.
                unsafe { COUNTER += 1 };
                format!("{}", unsafe { COUNTER }).into_bytes()
            }
            "wrong-seq" => {
                done = seq + 7;
                b"wrong".to_vec()
            }
            "bad-out" => {
                set!(status, 0);
                set!(out, 0x1000);
                set!(out_len, 64);
                fence(Ordering::SeqCst);
                set!(done_seq, seq);
                served = seq;
                fence(Ordering::SeqCst);
                if get!(host_sleeping) != 0 {
                    // SAFETY: no arguments.
                    unsafe { hypercall(call::FN_NOTIFY, 0) };
                }
                continue;
            }
            "huge-len" => {
                set!(status, 0);
                set!(out, scratch.as_mut_ptr() as u64);
                set!(out_len, 1 << 40);
                fence(Ordering::SeqCst);
                set!(done_seq, seq);
                served = seq;
                fence(Ordering::SeqCst);
                if get!(host_sleeping) != 0 {
                    // SAFETY: no arguments.
                    unsafe { hypercall(call::FN_NOTIFY, 0) };
                }
                continue;
            }
            "spin-after" => {
                after = || forever();
                b"ok".to_vec()
            }
            "never" => forever(),
            "panic" => panic!("exitless call panicked on purpose"),
            "slow-no-notify" => {
                let ms = core::str::from_utf8(&input)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .unwrap_or(10);
                let t0 = rdtsc();
                while rdtsc() - t0 < ms_to_ticks(ms) {
                    core::hint::spin_loop();
                }
                notify = false;
                b"slow".to_vec()
            }
            "wake-loop-after" => {
                after = || loop {
                    let _ = pvrun::hypercall::call(&Wait { deadline_ns: 0 });
                };
                b"ok".to_vec()
            }
            "fn-return" => {
                let ret = FnReturn {
                    status: 0,
                    out: scratch.as_ptr() as u64,
                    out_len: 4,
                };
                // SAFETY: a live FnReturn naming `scratch`.
                unsafe { hypercall(call::FN_RETURN, &ret as *const FnReturn as u64) };
                forever()
            }
            _ => b"unknown".to_vec(),
        };
        set!(status, 0);
        set!(out, out.as_ptr() as u64);
        set!(out_len, out.len() as u64);
        fence(Ordering::SeqCst);
        set!(done_seq, done);
        served = seq;
        fence(Ordering::SeqCst);
        if notify && get!(host_sleeping) != 0 {
            // SAFETY: no arguments.
            unsafe { hypercall(call::FN_NOTIFY, 0) };
        }
        after();
    }
}
