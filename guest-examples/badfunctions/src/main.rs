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
//! | `init-host` | with `PVRUN_INIT_HOST_CALL` set at initialisation, the init called host function `init-probe` once | that call's answer (empty without the variable) |
//! | `init-state` | reads a global the initialisation set to 42 | `42` (`0` if init had not run) |
//! | `random` | draws 16 bytes from `pvrun::random` and 16 from its ChaCha20 fallback | `GENERATION HEX HEX` |
//! | `print` | input: a decimal line count N (empty: 1000); prints N lines to stdout | `printed N` |
//! | `avx-set` | input: a pattern byte (empty: 0xa5); writes it into all of `ymm15` where AVX is on, and also into all of `zmm15`, `zmm31` and the opmask `k7` where AVX-512 is on (checked with `cpuid` and `xgetbv`) | `set none`, `set avx` or `set avx512` |
//! | `avx-get` | reads the registers `avx-set` writes | `none`, `avx ymm15=HEX` or `avx512 ymm15=HEX zmm15=HEX zmm31=HEX k7=HEX` |
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
    "init-host" => init_host,
    "xmm-set" => xmm_set,
    "xmm-get" => xmm_get,
    "avx-set" => avx_set,
    "avx-get" => avx_get,
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
    // With `PVRUN_INIT_HOST_CALL` in the environment, call host function `init-probe`
    // once during the initialisation and keep its answer for `init-host`.
    if pvrun::env::var("PVRUN_INIT_HOST_CALL").is_some() {
        let answer = pvrun::function::call_host("init-probe", b"")
            .unwrap_or_else(|_| b"host call failed".to_vec());
        let n = answer.len().min(INIT_ANSWER.len());
        for (slot, b) in INIT_ANSWER.iter().zip(&answer[..n]) {
            slot.store(*b, Ordering::Relaxed);
        }
        INIT_ANSWER_LEN.store(n as u64, Ordering::Relaxed);
    }
}

/// What `init-probe` answered during the initialisation (see [`init`]).
static INIT_ANSWER: [AtomicU8; 64] = [const { AtomicU8::new(0) }; 64];
static INIT_ANSWER_LEN: AtomicU64 = AtomicU64::new(0);

/// The answer of the host call the initialisation made, if it made one.
fn init_host(_input: &[u8]) -> Result<Vec<u8>, String> {
    let n = INIT_ANSWER_LEN.load(Ordering::Relaxed) as usize;
    Ok(INIT_ANSWER[..n]
        .iter()
        .map(|b| b.load(Ordering::Relaxed))
        .collect())
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

/// Vector state beyond SSE that the CPU has and the host enabled in XCR0.
#[derive(Clone, Copy, PartialEq, PartialOrd)]
enum Vector {
    None,
    Avx,
    Avx512,
}

fn vector_level() -> Vector {
    use core::arch::x86_64::__cpuid_count;
    #[allow(unused_unsafe)]
    // SAFETY: cpuid is always available in 64-bit mode.
    let leaf1 = unsafe { __cpuid_count(1, 0) };
    let (osxsave, avx) = (leaf1.ecx & (1 << 27) != 0, leaf1.ecx & (1 << 28) != 0);
    if !osxsave || !avx {
        return Vector::None;
    }
    let (lo, _hi): (u32, u32);
    // SAFETY: CR4.OSXSAVE is set (cpuid.1:ecx.27), so xgetbv(0) is defined at CPL3.
    unsafe {
        core::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") _hi,
            options(nomem, nostack));
    }
    // XCR0: SSE (1) and AVX (2) state; opmask (5), ZMM_Hi256 (6), Hi16_ZMM (7).
    if lo & 0x6 != 0x6 {
        return Vector::None;
    }
    #[allow(unused_unsafe)]
    // SAFETY: as above.
    let leaf7 = unsafe { __cpuid_count(7, 0) };
    if leaf7.ebx & (1 << 16) != 0 && lo & 0xe6 == 0xe6 {
        Vector::Avx512
    } else {
        Vector::Avx
    }
}

/// Loads all of `ymm15` from `v` and leaves it set (no compiled code here uses VEX
/// registers: the guest is built for the x86-64 baseline).
#[target_feature(enable = "avx")]
unsafe fn ymm15_load(v: &[u8; 64]) {
    // SAFETY: reads 32 bytes of `v`; writes only ymm15, on purpose.
    unsafe {
        core::arch::asm!("vmovdqu ymm15, [{p}]", p = in(reg) v.as_ptr(), options(nostack, readonly))
    };
}

#[target_feature(enable = "avx")]
unsafe fn ymm15_store(out: &mut [u8; 64]) {
    // SAFETY: writes 32 bytes of `out`.
    unsafe {
        core::arch::asm!("vmovdqu [{p}], ymm15", p = in(reg) out.as_mut_ptr(), options(nostack))
    };
}

/// Loads all of `zmm15` and `zmm31` from `v` and `k7` from `k`, and leaves them set.
#[target_feature(enable = "avx512f")]
unsafe fn zmm_load(v: &[u8; 64], k: u16) {
    // SAFETY: reads 64 bytes of `v`; writes only zmm15, zmm31 and k7, on purpose.
    unsafe {
        core::arch::asm!(
            "vmovdqu64 zmm15, [{p}]",
            "vmovdqu64 zmm31, [{p}]",
            "kmovw k7, {k:e}",
            p = in(reg) v.as_ptr(),
            k = in(reg) k as u32,
            options(nostack, readonly),
        )
    };
}

#[target_feature(enable = "avx512f")]
unsafe fn zmm_store(z15: &mut [u8; 64], z31: &mut [u8; 64]) -> u16 {
    let k: u32;
    // SAFETY: writes 64 bytes of each buffer.
    unsafe {
        core::arch::asm!(
            "vmovdqu64 [{a}], zmm15",
            "vmovdqu64 [{b}], zmm31",
            "kmovw {k:e}, k7",
            a = in(reg) z15.as_mut_ptr(),
            b = in(reg) z31.as_mut_ptr(),
            k = out(reg) k,
            options(nostack),
        )
    };
    k as u16
}

/// Leaves the input's first byte (0xa5 if empty) in every byte of `ymm15` and, with
/// AVX-512, of `zmm15`, `zmm31` and `k7`: a would-be leak through vector state beyond
/// SSE, which only the XSAVE area carries.
fn avx_set(input: &[u8]) -> Result<Vec<u8>, String> {
    let b = input.first().copied().unwrap_or(0xa5);
    let v = [b; 64];
    let level = vector_level();
    // SAFETY: each feature was checked (CPU and XCR0) before its instructions run.
    unsafe {
        if level >= Vector::Avx {
            ymm15_load(&v);
        }
        if level == Vector::Avx512 {
            zmm_load(&v, u16::from_le_bytes([b, b]));
        }
    }
    Ok(match level {
        Vector::None => b"set none".to_vec(),
        Vector::Avx => b"set avx".to_vec(),
        Vector::Avx512 => b"set avx512".to_vec(),
    })
}

/// The registers [`avx_set`] writes, in hex.
fn avx_get(_input: &[u8]) -> Result<Vec<u8>, String> {
    let hex = |v: &[u8]| v.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let level = vector_level();
    if level == Vector::None {
        return Ok(b"none".to_vec());
    }
    let mut y = [0u8; 64];
    // SAFETY: AVX was checked.
    unsafe { ymm15_store(&mut y) };
    let mut out = format!("avx ymm15={}", hex(&y[..32]));
    if level == Vector::Avx512 {
        let (mut z15, mut z31) = ([0u8; 64], [0u8; 64]);
        // SAFETY: AVX-512F was checked.
        let k = unsafe { zmm_store(&mut z15, &mut z31) };
        out = format!(
            "avx512 ymm15={} zmm15={} zmm31={} k7={k:04x}",
            hex(&y[..32]),
            hex(&z15),
            hex(&z31)
        );
    }
    Ok(out.into_bytes())
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
