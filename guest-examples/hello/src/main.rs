//! The hello-world guest: prints its arguments, an environment variable, uses the heap,
//! sleeps, draws random bytes and reads the wall clock.
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

    let start = Instant::now();
    pvrun::time::sleep(Duration::from_millis(5));
    let slept = start.elapsed();
    println!("slept: {} ms (asked 5)", slept.as_millis());
    if slept >= Duration::from_millis(5) {
        println!("slept-ok");
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

    args.windows(2)
        .find(|w| w[0] == "--exit")
        .and_then(|w| w[1].parse::<i32>().ok())
        .unwrap_or(0)
}
