//! A guest that crashes on purpose, one way per mode (first argument), a few calls deep, so
//! that the host's backtraces, crash causes and core dumps can be checked against this
//! source. The lines the tests look for carry a `MARK:` comment.
//!
//! Modes: `fault` (null read three calls deep), `panic` (panic three calls deep),
//! `corrupt` (scribbles over the saved frame pointer, then faults), `loop-chain` (makes
//! the saved frame pointer point at itself, then faults), `syscall`, `sysenter`, `int80`
//! (Linux system calls, nr 39 = getpid), `noncanonical` (reads a non-canonical address),
//! `xsetbv`, `spin` (prints `spinning`, then loops forever two calls deep) and `sleep`
//! (prints `sleeping`, then sleeps forever two calls deep; both for SIGQUIT tests). An
//! unknown mode prints `unknown mode` and exits 2.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::arch::asm;
use core::hint::black_box;

pvrun::entry!(main);

/// Reads a u64 from `addr` with an explicit `mov`.
#[inline(always)]
fn peek(addr: u64) -> u64 {
    let v: u64;
    // SAFETY: deliberately not safe: this is meant to fault.
    unsafe { asm!("mov {v}, qword ptr [{a}]", a = in(reg) addr, v = out(reg) v, options(nostack)) };
    v
}

#[inline(never)]
fn fault_inner(addr: u64) -> u64 {
    peek(black_box(addr)) + 1 // MARK: fault
}

#[inline(never)]
fn fault_middle(addr: u64) -> u64 {
    fault_inner(black_box(addr)) + 2 // MARK: fault-middle
}

#[inline(never)]
fn fault_outer(addr: u64) -> u64 {
    fault_middle(black_box(addr)) + 3 // MARK: fault-outer
}

#[inline(never)]
fn panic_inner(n: u64) -> u64 {
    if black_box(n) > 2 {
        panic!("panicked three calls deep ({n})"); // MARK: panic
    }
    n
}

#[inline(never)]
fn panic_middle(n: u64) -> u64 {
    panic_inner(black_box(n) + 1) + 2 // MARK: panic-middle
}

#[inline(never)]
fn panic_outer(n: u64) -> u64 {
    panic_middle(black_box(n) + 1) + 3 // MARK: panic-outer
}

#[inline(never)]
fn spin_inner(n: u64) -> u64 {
    let mut x = n;
    loop {
        x = black_box(x.wrapping_mul(3).wrapping_add(1));
    }
}

#[inline(never)]
fn spin_outer(n: u64) -> u64 {
    spin_inner(black_box(n)) + 1 // MARK: spin-outer
}

#[inline(never)]
fn sleep_inner() {
    loop {
        pvrun::time::sleep(core::time::Duration::from_secs(3600));
    }
}

#[inline(never)]
fn sleep_outer() {
    sleep_inner();
    black_box(());
}

/// Overwrites the frame pointer this function saved for its caller with `value` (or with
/// the address of the slot itself, a loop), then faults.
#[inline(never)]
fn corrupt_then_fault(value: Option<u64>) -> u64 {
    // SAFETY: deliberately not safe: the frame chain is broken on purpose; the function
    // never returns (the fault below stops the guest).
    unsafe {
        match value {
            Some(v) => asm!("mov qword ptr [rbp], {v}", v = in(reg) v, options(nostack)),
            None => asm!("mov qword ptr [rbp], rbp", options(nostack)),
        }
    }
    peek(black_box(0)) // MARK: corrupt
}

#[inline(never)]
fn linux_syscall(how: &str) {
    // SAFETY: deliberately not safe: pvrun guests cannot make system calls.
    unsafe {
        match how {
            "syscall" => {
                asm!("syscall", in("rax") 39u64, lateout("rcx") _, lateout("r11") _, options(nostack))
            }
            "sysenter" => asm!("sysenter", in("rax") 39u64, options(nostack)),
            _ => asm!("int 0x80", in("rax") 39u64, options(nostack)),
        }
    }
}

fn main() -> i32 {
    let args: Vec<&'static str> = pvrun::env::args().collect();
    let mode = args.get(1).copied().unwrap_or("");
    match mode {
        "fault" => {
            black_box(fault_outer(0));
        }
        "panic" => {
            black_box(panic_outer(1));
        }
        "corrupt" => {
            black_box(corrupt_then_fault(Some(0x4141_4141_4141_4141)));
        }
        "loop-chain" => {
            black_box(corrupt_then_fault(None));
        }
        "syscall" | "sysenter" | "int80" => linux_syscall(mode),
        "spin" => {
            pvrun::println!("spinning");
            // Console output is delivered at the guest's exits: a spinning guest makes none.
            pvrun::console::flush();
            black_box(spin_outer(7));
        }
        "sleep" => {
            pvrun::println!("sleeping");
            pvrun::console::flush();
            sleep_outer();
        }
        "noncanonical" => {
            black_box(peek(black_box(0x8000_0000_0000_1000)));
        }
        // SAFETY: deliberately not safe: ring 3 may not set XCR0.
        "xsetbv" => unsafe {
            asm!("xor ecx, ecx", "xor edx, edx", "mov eax, 3", "xsetbv", out("eax") _, out("ecx") _, out("edx") _, options(nostack))
        },
        _ => {
            pvrun::println!("unknown mode");
            return 2;
        }
    }
    pvrun::println!("survived {mode}");
    1
}
