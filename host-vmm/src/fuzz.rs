//! Bounded fuzzing of the parsers of untrusted bytes, run as property tests by `cargo
//! test` on the stock toolchain (no nightly, no cargo-fuzz): a seeded generator mutates
//! and invents inputs, and each target checks that the parser never panics and that what
//! it accepts obeys its contract. `PVRUN_FUZZ_ITERS=N` runs N iterations per target
//! instead of the default, and `PVRUN_FUZZ_SEED=S` starts elsewhere; a failure prints the
//! seed and iteration that reproduce it.
//!
//! Targets here: hypercall decoding (every call number, argument structs at every kind of
//! address, random memory), console-ring records, and ELF validation (mutated valid
//! images and random bytes). Device rings and requests are fuzzed next to their parsers
//! in `devices/`; the guest-side fuzzer (`guest-examples/fuzz`) attacks the whole host.

use std::sync::Arc;

use pvrun_abi::layout::{CONSOLE_DATA_ADDR, CONSOLE_DATA_SIZE, CONSOLE_RING_ADDR};
use pvrun_abi::{perm, region};
use vm_memory::{Bytes, GuestAddress};

use crate::function::FnContext;
use crate::hypercall::{Action, Console, GuestView, dispatch};
use crate::loader::GuestImage;
use crate::memory::{GuestRam, HOST_ONLY, MemoryMap, Region};

/// SplitMix64: small, seedable, good enough to drive mutations.
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    /// A value biased towards the edges that break parsers.
    pub fn edgy(&mut self) -> u64 {
        match self.below(8) {
            0 => 0,
            1 => u64::MAX - self.below(16),
            2 => self.below(64),
            3 => 1 << self.below(64),
            4 => (1u64 << self.below(64)).wrapping_sub(1),
            _ => self.next(),
        }
    }
}

/// Iterations per target and the first seed (from the environment, for long runs).
pub(crate) fn budget(default: u64) -> (u64, u64) {
    let iters = std::env::var("PVRUN_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    let seed = std::env::var("PVRUN_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    (iters, seed)
}

/// Runs `target(rng)` `iters` times, each from its own seed, and names the seed that
/// panicked.
pub(crate) fn run(name: &str, default_iters: u64, mut target: impl FnMut(&mut Rng)) {
    let (iters, seed) = budget(default_iters);
    for i in 0..iters {
        let s = seed.wrapping_add(i);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(&mut Rng::new(s))));
        if r.is_err() {
            panic!(
                "fuzz target {name} failed at iteration {i}: rerun with PVRUN_FUZZ_SEED={s} PVRUN_FUZZ_ITERS=1"
            );
        }
    }
}

const DATA: u64 = 0x20_0000;
const TEXT: u64 = 0x40_0000;

fn fuzz_map() -> MemoryMap {
    let r = |start, end, kind, perm, user| Region {
        start,
        end,
        kind,
        perm,
        user,
    };
    MemoryMap::new(vec![
        r(0x1000, 0x2000, HOST_ONLY, perm::R | perm::W, false),
        r(
            CONSOLE_RING_ADDR,
            CONSOLE_DATA_ADDR + CONSOLE_DATA_SIZE,
            region::CONSOLE,
            perm::R | perm::W,
            true,
        ),
        r(
            DATA,
            DATA + 0x20_0000,
            region::DATA,
            perm::R | perm::W,
            true,
        ),
        r(
            TEXT,
            TEXT + 0x20_0000,
            region::TEXT,
            perm::R | perm::X,
            true,
        ),
    ])
    .unwrap()
}

/// An address a hostile guest would try.
fn address(rng: &mut Rng) -> u64 {
    let base = [
        0,
        0x1000,
        CONSOLE_RING_ADDR,
        0x10_0000,
        DATA,
        TEXT,
        TEXT + 0x20_0000,
    ];
    let b = base[rng.below(base.len() as u64) as usize];
    match rng.below(4) {
        0 => rng.edgy(),
        1 => b.wrapping_add(rng.below(0x20_0000)),
        2 => b.wrapping_sub(rng.below(64)),
        _ => (b + rng.below(0x1000)) & !7,
    }
}

#[test]
fn fuzz_hypercall_decoding() {
    let ram = GuestRam::new(8 << 20).unwrap();
    let map = fuzz_map();
    let mut console = Console::new(Box::new(std::io::sink()), Box::new(std::io::sink()));
    let upper: crate::HostFn = Arc::new(|i: &[u8]| Ok(i.to_ascii_uppercase()));
    let mut fns = FnContext {
        host_fns: Arc::new([("f".to_string(), upper)].into_iter().collect()),
        max_output: 1 << 16,
        host_writes: Vec::new(),
        ..FnContext::default()
    };
    run("hypercall", 20_000, |rng| {
        // Random argument words at a random argument address (sometimes one that holds
        // pointers to other interesting addresses).
        let arg = address(rng);
        let mut words = [0u64; 8];
        for w in &mut words {
            *w = if rng.below(2) == 0 {
                address(rng)
            } else {
                rng.edgy()
            };
        }
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let _ = ram.mem().write_slice(&bytes, GuestAddress(arg));
        let nr = rng.below(0x40) as u16;
        fns.host_writes.clear();
        let view = GuestView {
            mem: ram.mem(),
            map: &map,
        };
        let action = dispatch(nr, arg, &view, &mut console, &mut fns);
        // Whatever the host wrote on the guest's behalf lies in guest-writable memory.
        for &(start, len) in &fns.host_writes {
            assert!(
                map.check_user(start, len, true).is_ok(),
                "host wrote {start:#x}+{len}"
            );
        }
        match action {
            Action::Return(s) => assert!(s >= -11, "unknown status {s}"),
            // Bounded: at most the limit, each invalid byte becoming U+FFFD (3 bytes).
            Action::Abort(m) => assert!(m.len() <= 3 * 4096 + 128),
            _ => {}
        }
    });
}

#[test]
fn fuzz_console_records() {
    let ram = GuestRam::new(8 << 20).unwrap();
    run("console", 5_000, |rng| {
        let mut console = Console::new(Box::new(std::io::sink()), Box::new(std::io::sink()));
        let consumed = rng.edgy();
        console.set_consumed(consumed);
        // Plausible records mixed with garbage.
        let mut bytes = Vec::new();
        while bytes.len() < rng.below(600) as usize {
            if rng.below(4) == 0 {
                bytes.push(rng.next() as u8);
            } else {
                let len = rng.below(40) as u16;
                bytes.push(1 + rng.below(2) as u8);
                bytes.extend_from_slice(&len.to_le_bytes());
                bytes.extend((0..len).map(|_| b'a'));
            }
        }
        for (i, b) in bytes.iter().enumerate() {
            let off = (consumed.wrapping_add(i as u64)) % CONSOLE_DATA_SIZE;
            ram.mem()
                .write_obj(*b, GuestAddress(CONSOLE_DATA_ADDR + off))
                .unwrap();
        }
        let producer = match rng.below(4) {
            0 => rng.edgy(),
            _ => consumed.wrapping_add(rng.below(bytes.len() as u64 + 1)),
        };
        ram.mem()
            .write_obj(producer, GuestAddress(CONSOLE_RING_ADDR))
            .unwrap();
        let r = console.drain(ram.mem());
        // Accepted output is consumed entirely; an impossible producer is an error (the
        // run loop then stops the guest) and moves nothing.
        match r {
            Ok(()) => assert_eq!(console.consumed(), producer),
            Err(e) if e.contains("ahead of the consumer") => {
                assert_eq!(console.consumed(), consumed)
            }
            Err(_) => assert_eq!(console.consumed(), producer),
        }
    });
}

#[test]
fn fuzz_elf_validation() {
    let valid = crate::testing::elf(crate::testing::EXIT_LOOP, crate::testing::RawElf::default());
    let path = std::path::Path::new("fuzz.elf");
    GuestImage::from_bytes(path, valid.clone()).expect("the seed image is valid");
    run("elf", 20_000, |rng| {
        let mut bytes = valid.clone();
        match rng.below(10) {
            // Random bytes of random length.
            0 => {
                bytes = (0..rng.below(512)).map(|_| rng.next() as u8).collect();
                if rng.below(2) == 0 && bytes.len() >= 4 {
                    bytes[..4].copy_from_slice(b"\x7fELF");
                }
            }
            // Truncation.
            1 => bytes.truncate(rng.below(bytes.len() as u64) as usize),
            // Overwrite header/program-header words with edge values.
            _ => {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(bytes.len().saturating_sub(8) as u64) as usize;
                    let v = rng.edgy().to_le_bytes();
                    let n = [1, 2, 4, 8][rng.below(4) as usize];
                    bytes[at..at + n].copy_from_slice(&v[..n]);
                }
            }
        }
        if let Ok(img) = GuestImage::from_bytes(path, bytes) {
            // An accepted image stays inside guest memory above the host area and keeps W^X.
            for s in &img.segments {
                assert!(s.page_start >= pvrun_abi::layout::GUEST_IMAGE_BASE);
                assert!(s.page_end > s.page_start);
                assert!(!(s.perm & perm::W != 0 && s.perm & perm::X != 0));
            }
        }
    });
}
