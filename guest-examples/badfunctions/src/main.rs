//! A function-sandbox guest for isolation tests (serve it with `pvrun serve`). Every
//! function's output is UTF-8 text unless noted:
//!
//! | function | what it does | output |
//! |---|---|---|
//! | `counter` | increments a global counter | its new value in decimal (`1` on a fresh snapshot) |
//! | `heap-grow` | leaks a 1 MiB heap buffer filled with the input's first byte (0 if empty) | the number of buffers leaked so far (`1` on a fresh snapshot) |
//! | `spin` | loops forever | - |
//! | `fault` | reads through a null pointer | - (a page fault) |
//! | `panic` | panics with `function panicked on purpose` | - |
//! | `big-output` | input: a decimal byte count N (empty: 2 MiB) | N bytes `x` |
//! | `echo` | | the input, unchanged (any bytes) |
//! | `touch-pages` | input: a decimal page count N (empty: 16, at most 256); writes one byte in each of N distinct 4 KiB pages of a 1 MiB static buffer | `ok` |
//! | `init-state` | reads a global the initialisation set to 42 | `42` (`0` if init had not run) |
//! | `random` | draws 16 bytes from `pvrun::random` and 16 from its ChaCha20 fallback | `GENERATION HEX HEX` |
//! | `print` | input: a decimal line count N (empty: 1000); prints N lines to stdout | `printed N` |
//! | `wait` | input: a decimal millisecond count N (empty: forever); one `WAIT` hypercall with a deadline N ms from now | `waited MS` (how long the host kept it asleep) |
//!
//! A bad decimal input is an error (`expected a decimal number, got ...`).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};

pvrun::export_functions! {
    init = init;
    "counter" => counter,
    "heap-grow" => heap_grow,
    "spin" => spin,
    "fault" => fault,
    "panic" => panic,
    "big-output" => big_output,
    "echo" => echo,
    "touch-pages" => touch_pages,
    "init-state" => init_state,
    "xmm-set" => xmm_set,
    "xmm-get" => xmm_get,
    "wait" => wait,
    "random" => random,
    "print" => print,
}

/// Calls of `counter` since the snapshot (or since boot, if the host never resets).
static COUNTER: AtomicU64 = AtomicU64::new(0);
/// Buffers `heap-grow` leaked.
static LEAKED: AtomicU64 = AtomicU64::new(0);
/// Set to 42 by [`init`], before the host's snapshot.
static INIT_STATE: AtomicU64 = AtomicU64::new(0);

/// Size of the buffer `heap-grow` leaks.
const LEAK_SIZE: usize = 1 << 20;
/// Size of a page.
const PAGE: usize = 4096;
/// Size of the static buffer `touch-pages` writes to.
const TOUCH_SIZE: usize = 1 << 20;
/// The buffer `touch-pages` dirties (in `.bss`: all zero, no page touched at boot).
static TOUCH: [AtomicU8; TOUCH_SIZE] = [const { AtomicU8::new(0) }; TOUCH_SIZE];

/// Runs once before the guest declares itself ready (the host snapshots after it).
fn init() {
    INIT_STATE.store(42, Ordering::Relaxed);
}

/// The input as a decimal number, or `default` when it is empty.
fn decimal(input: &[u8], default: usize) -> Result<usize, String> {
    if input.is_empty() {
        return Ok(default);
    }
    core::str::from_utf8(input)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| {
            format!(
                "expected a decimal number, got {:?}",
                String::from_utf8_lossy(&input[..input.len().min(64)])
            )
        })
}

/// Increments the global counter and returns its value.
fn counter(_input: &[u8]) -> Result<Vec<u8>, String> {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed) + 1;
    Ok(format!("{n}").into_bytes())
}

/// Leaks 1 MiB of heap and returns how many buffers have been leaked.
fn heap_grow(input: &[u8]) -> Result<Vec<u8>, String> {
    let fill = input.first().copied().unwrap_or(0);
    let buf: &'static mut [u8] = alloc::vec![fill; LEAK_SIZE].leak();
    core::hint::black_box(buf);
    let n = LEAKED.fetch_add(1, Ordering::Relaxed) + 1;
    Ok(format!("{n}").into_bytes())
}

/// Never returns.
fn spin(_input: &[u8]) -> Result<Vec<u8>, String> {
    loop {
        core::hint::spin_loop();
    }
}

/// Reads address 0 (unmapped: the guest stops with a page fault).
fn fault(_input: &[u8]) -> Result<Vec<u8>, String> {
    let value: u64;
    // SAFETY: not safe at all, on purpose: the null page is never mapped, so this faults
    // and the host stops the call.
    unsafe {
        core::arch::asm!(
            "mov {v}, qword ptr [{a}]",
            a = in(reg) core::hint::black_box(0u64),
            v = out(reg) value,
            options(nostack, readonly),
        );
    }
    Ok(format!("read {value} from address 0").into_bytes())
}

/// Panics.
fn panic(_input: &[u8]) -> Result<Vec<u8>, String> {
    panic!("function panicked on purpose")
}

/// Returns as many bytes as the input says (default 2 MiB).
fn big_output(input: &[u8]) -> Result<Vec<u8>, String> {
    let n = decimal(input, 2 << 20)?;
    let mut out = Vec::new();
    out.try_reserve_exact(n)
        .map_err(|_| format!("cannot allocate {n} bytes"))?;
    out.resize(n, b'x');
    Ok(out)
}

/// Returns the input.
fn echo(input: &[u8]) -> Result<Vec<u8>, String> {
    Ok(input.to_vec())
}

/// Leaves the first 8 input bytes in `xmm15` (a register no compiled code here uses):
/// a would-be leak to the next call through vector state.
fn xmm_set(input: &[u8]) -> Result<Vec<u8>, String> {
    let mut v = [0u8; 8];
    let n = input.len().min(8);
    v[..n].copy_from_slice(&input[..n]);
    let x = u64::from_le_bytes(v);
    // SAFETY: writes only xmm15, which no compiled code here relies on; it is left set on
    // purpose so the value reaches the host's reset.
    unsafe { core::arch::asm!("movq xmm15, {x}", x = in(reg) x, options(nomem, nostack)) };
    Ok(b"set".to_vec())
}

/// Returns the 8 bytes found in `xmm15`.
fn xmm_get(_input: &[u8]) -> Result<Vec<u8>, String> {
    let x: u64;
    // SAFETY: reads xmm15 only.
    unsafe { core::arch::asm!("movq {x}, xmm15", x = out(reg) x, options(nomem, nostack)) };
    Ok(x.to_le_bytes().to_vec())
}

/// Dirties N distinct pages of a static buffer.
fn touch_pages(input: &[u8]) -> Result<Vec<u8>, String> {
    let n = decimal(input, 16)?;
    if n > TOUCH_SIZE / PAGE {
        return Err(format!("at most {} pages, not {n}", TOUCH_SIZE / PAGE));
    }
    for page in 0..n {
        TOUCH[page * PAGE].fetch_add(1, Ordering::Relaxed);
    }
    Ok(b"ok".to_vec())
}

/// Returns the value the initialisation stored.
fn init_state(_input: &[u8]) -> Result<Vec<u8>, String> {
    Ok(format!("{}", INIT_STATE.load(Ordering::Relaxed)).into_bytes())
}

/// One `WAIT` with a deadline `input` ms from now (empty: never), and how long it took: a
/// wake-up left over from an earlier call would end it early.
fn wait(input: &[u8]) -> Result<Vec<u8>, String> {
    let start = pvrun::time::monotonic_ns();
    let deadline = if input.is_empty() {
        u64::MAX
    } else {
        start.saturating_add(decimal(input, 0)? as u64 * 1_000_000)
    };
    let _ = pvrun::hypercall::call(&pvrun::abi::Wait {
        deadline_ns: deadline,
    });
    let waited = (pvrun::time::monotonic_ns() - start) / 1_000_000;
    Ok(format!("waited {waited}").into_bytes())
}

/// The VM generation and random bytes from both of the SDK's sources.
fn random(_input: &[u8]) -> Result<Vec<u8>, String> {
    let mut a = [0u8; 16];
    let mut b = [0u8; 16];
    pvrun::random::fill_bytes(&mut a);
    pvrun::random::fill_bytes_keystream(&mut b);
    let hex = |v: &[u8]| v.iter().map(|x| format!("{x:02x}")).collect::<String>();
    Ok(format!("{} {} {}", pvrun::random::generation(), hex(&a), hex(&b)).into_bytes())
}

/// Prints `input` lines (a console flood).
fn print(input: &[u8]) -> Result<Vec<u8>, String> {
    let n = decimal(input, 1000)?;
    for i in 0..n {
        pvrun::println!("console line {i} from a function that prints a lot");
    }
    Ok(format!("printed {n}").into_bytes())
}
