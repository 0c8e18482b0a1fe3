//! A guest for the gdb tests (host-vmm/tests/gdb.rs), built with full debug info and
//! without optimization (see the workspace's profile for it), so gdb can name every
//! argument and local. The lines the tests look for carry a `MARK:` comment.
//!
//! Modes (first argument): `run` (default: `outer(4)` -> `middle(5)` -> `add_scaled(10, 3)`,
//! prints `result 32` and exits 32), `spin` (loops forever), `sleep` (sleeps forever in
//! `WAIT`), `fault` (null read two calls deep), `panic` (panics two calls deep).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::hint::black_box;

pvrun::entry!(main);

#[inline(never)]
fn add_scaled(value: u64, factor: u64) -> u64 {
    let scaled = value * factor; // MARK: add_scaled
    scaled + 1
}

#[inline(never)]
fn middle(n: u64) -> u64 {
    let doubled = n * 2;
    add_scaled(doubled, 3) + 1 // MARK: middle
}

#[inline(never)]
fn outer(n: u64) -> u64 {
    middle(n + 1) // MARK: outer
}

#[inline(never)]
fn spin() -> ! {
    let mut turns = 0u64;
    loop {
        turns = black_box(turns.wrapping_add(1)); // MARK: spin
    }
}

#[inline(never)]
fn read_at(addr: usize) -> u64 {
    // SAFETY: deliberately not safe: this is meant to fault.
    unsafe { core::ptr::read_volatile(addr as *const u64) } // MARK: fault
}

#[inline(never)]
fn fault_outer(addr: usize) -> u64 {
    read_at(black_box(addr)) + 1 // MARK: fault-outer
}

#[inline(never)]
fn panic_inner(n: u64) -> u64 {
    if black_box(n) > 0 {
        panic!("debuggee panicked ({n})"); // MARK: panic
    }
    n
}

#[inline(never)]
fn panic_outer(n: u64) -> u64 {
    panic_inner(n + 1) + 1 // MARK: panic-outer
}

fn main() -> i32 {
    let args: Vec<&'static str> = pvrun::env::args().collect();
    match args.get(1).copied().unwrap_or("run") {
        "run" => {
            let result = outer(black_box(4));
            pvrun::println!("result {result}"); // MARK: print
            result as i32
        }
        "spin" => spin(),
        "sleep" => loop {
            pvrun::time::sleep(core::time::Duration::from_secs(3600));
        },
        "fault" => black_box(fault_outer(0)) as i32,
        "panic" => black_box(panic_outer(1)) as i32,
        _ => {
            pvrun::println!("unknown mode");
            2
        }
    }
}
