//! Guest side of the host benchmarks (`cargo bench -p host-vmm`): timed loops of
//! hypercalls, measured with the TSC inside the guest.
//!
//! `bench hypercall BATCHES PER_BATCH`: BATCHES batches of PER_BATCH one-byte console
//! writes; prints `hypercall_ns median=<ns> min=<ns>` (per call, over batches) on stderr.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;

use pvrun::abi::{ConsoleWrite, stream};
use pvrun::eprintln;
use pvrun::hypercall::call;
use pvrun::time::Instant;

pvrun::entry!(main);

fn arg(args: &[&str], i: usize, default: u64) -> u64 {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

fn main() -> i32 {
    let args: Vec<&str> = pvrun::env::args().collect();
    match args.get(1).copied() {
        Some("hypercall") => {
            let batches = arg(&args, 2, 11).max(1);
            let per = arg(&args, 3, 1000).max(1);
            let byte = b"x";
            let req = ConsoleWrite {
                stream: stream::STDOUT,
                reserved: 0,
                buf: byte.as_ptr() as u64,
                len: 1,
            };
            let mut ns: Vec<u64> = Vec::new();
            for _ in 0..batches {
                let t = Instant::now();
                for _ in 0..per {
                    if call(&req) != 1 {
                        return 1;
                    }
                }
                ns.push(t.elapsed().as_nanos() as u64 / per);
            }
            ns.sort_unstable();
            eprintln!("hypercall_ns median={} min={}", ns[ns.len() / 2], ns[0]);
            0
        }
        _ => {
            eprintln!("usage: bench hypercall BATCHES PER_BATCH");
            2
        }
    }
}
