//! The hello-world guest: prints its arguments, an environment variable, uses the heap,
//! draws random bytes, reads the wall clock, sleeps with `--sleep MS` and exits with the
//! code given by `--exit N`.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::vec::Vec;
use core::time::Duration;

use pvrun::println;
use pvrun::time::Instant;

pvrun::entry!(main);

fn main() -> i32 {
    println!("Hello from pvrun!");

    let args: Vec<&str> = pvrun::env::args().collect();
    println!("argc={}", args.len());
    for (i, a) in args.iter().enumerate() {
        println!("arg[{i}]={a}");
    }

    println!(
        "GREETING={}",
        pvrun::env::var("GREETING").unwrap_or("(unset)")
    );

    let v: Vec<u64> = (1..=1000u64).collect();
    let sum: u64 = v.iter().sum();
    let s = format!("pvrun-{}", 42);
    println!("heap: sum={sum} string={s}");

    // `--sleep MS` exercises the clock and the host's wait call.
    if let Some(ms) = flag(&args, "--sleep") {
        let start = Instant::now();
        pvrun::time::sleep(Duration::from_millis(ms as u64));
        let slept = start.elapsed();
        println!("slept: {} ms (asked {ms})", slept.as_millis());
        if slept >= Duration::from_millis(ms as u64) {
            println!("slept-ok");
        }
    }

    let mut bytes = [0u8; 16];
    pvrun::random::fill_bytes(&mut bytes);
    let mut hex = [0u8; 32];
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        hex[2 * i] = DIGITS[(b >> 4) as usize];
        hex[2 * i + 1] = DIGITS[(b & 15) as usize];
    }
    println!("random: {}", core::str::from_utf8(&hex).unwrap_or("?"));

    println!("wall: {}", pvrun::time::wall_clock().as_secs());

    flag(&args, "--exit").unwrap_or(0)
}

/// The number after `name` in the arguments, if any.
fn flag(args: &[&str], name: &str) -> Option<i32> {
    args.windows(2)
        .find(|w| w[0] == name)
        .and_then(|w| w[1].parse::<i32>().ok())
}
