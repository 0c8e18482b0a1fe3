//! Random numbers: the CPU's `rdrand` when available, else ChaCha20 keyed by the host's seed.
//!
//! `rdrand` is used when both CPUID (leaf 1, ECX bit 30) and the host's boot-info feature
//! bits say it works. Otherwise bytes come from a ChaCha20 keystream keyed with the 32
//! random bytes the host put in [`BootInfo::random_seed`](pvrun_abi::BootInfo::random_seed),
//! one fresh 64-byte block per request (never reused). Not for use before start-up.
//!
//! A function sandbox is reset to its snapshot after each call and copied into new
//! sandboxes, which would replay the keystream; the host therefore gives every reset and
//! copy a new [`generation`] with fresh seed bytes, and the keystream is rekeyed (seed XOR
//! generation seed, counter from 0) whenever the generation changes.

use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use pvrun_abi::feature;

use crate::boot_info;

/// Source choice: 0 = not decided yet, 1 = rdrand, 2 = ChaCha20.
static SOURCE: AtomicU8 = AtomicU8::new(0);
/// Next ChaCha20 block counter (within the current generation).
static COUNTER: AtomicU64 = AtomicU64::new(0);
/// The VM generation the counter belongs to (0: none yet).
static KEYED_GENERATION: AtomicU64 = AtomicU64::new(0);

const SOURCE_RDRAND: u8 = 1;
const SOURCE_CHACHA: u8 = 2;

/// Decides (once) whether `rdrand` can be used.
fn source() -> u8 {
    let s = SOURCE.load(Ordering::Relaxed);
    if s != 0 {
        return s;
    }
    // SAFETY: `cpuid` is available on every x86_64 CPU and has no side effects.
    #[allow(unused_unsafe)]
    let leaf1 = unsafe { core::arch::x86_64::__cpuid(1) };
    let cpu_has = leaf1.ecx & (1 << 30) != 0;
    let host_says = boot_info().features & feature::RDRAND != 0;
    let s = if cpu_has && host_says {
        SOURCE_RDRAND
    } else {
        SOURCE_CHACHA
    };
    SOURCE.store(s, Ordering::Relaxed);
    s
}

/// One 64-bit value from `rdrand`, retrying up to 10 times (callers must check CPU support).
#[target_feature(enable = "rdrand")]
fn rdrand64() -> Option<u64> {
    for _ in 0..10 {
        let mut v = 0u64;
        if core::arch::x86_64::_rdrand64_step(&mut v) == 1 {
            return Some(v);
        }
    }
    None
}

/// One 64-bit value from `rdrand` if the source is `rdrand` and it delivers.
fn hw_u64() -> Option<u64> {
    if source() == SOURCE_RDRAND {
        // SAFETY: `source()` checked CPUID for rdrand.
        unsafe { rdrand64() }
    } else {
        None
    }
}

/// Fills `buf` with random bytes.
pub fn fill_bytes(buf: &mut [u8]) {
    let mut rest = &mut buf[..];
    while !rest.is_empty() {
        if let Some(v) = hw_u64() {
            let n = rest.len().min(8);
            rest[..n].copy_from_slice(&v.to_le_bytes()[..n]);
            rest = &mut rest[n..];
        } else {
            let block = chacha_next();
            let n = rest.len().min(64);
            rest[..n].copy_from_slice(&block[..n]);
            rest = &mut rest[n..];
        }
    }
}

/// Fills `buf` from the ChaCha20 fallback alone, even where `rdrand` works (for tests of
/// the fallback's rekeying; use [`fill_bytes`]).
#[doc(hidden)]
pub fn fill_bytes_keystream(buf: &mut [u8]) {
    for chunk in buf.chunks_mut(64) {
        let block = chacha_next();
        chunk.copy_from_slice(&block[..chunk.len()]);
    }
}

/// A random `u64`.
pub fn u64() -> u64 {
    let mut b = [0u8; 8];
    fill_bytes(&mut b);
    u64::from_le_bytes(b)
}

/// The VM generation (see `BootInfo::generation` in docs/ABI.md): 1 after boot, and a new
/// value in every function call after a sandbox reset and in every copy of a sandbox. A
/// program that seeded its own PRNG (or derived keys) during initialisation should reseed
/// when this differs from the value it seeded under.
pub fn generation() -> u64 {
    // SAFETY: a field of the boot-info block, which is mapped for the whole run; volatile
    // because the host rewrites it between runs.
    unsafe { core::ptr::addr_of!(boot_info().generation).read_volatile() }
}

/// The next unused ChaCha20 keystream block under the host's seed for this generation.
fn chacha_next() -> [u8; 64] {
    let info = boot_info();
    let generation = generation();
    if KEYED_GENERATION.swap(generation, Ordering::Relaxed) != generation {
        COUNTER.store(0, Ordering::Relaxed);
    }
    // SAFETY: as in `generation`.
    let gen_seed: [u8; 32] = unsafe { core::ptr::addr_of!(info.generation_seed).read_volatile() };
    let mut key = [0u32; 8];
    for ((k, c), g) in key
        .iter_mut()
        .zip(info.random_seed.chunks_exact(4))
        .zip(gen_seed.chunks_exact(4))
    {
        *k = u32::from_le_bytes([c[0] ^ g[0], c[1] ^ g[1], c[2] ^ g[2], c[3] ^ g[3]]);
    }
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // 64-bit block counter split over the counter word and the first nonce word.
    chacha20_block(&key, n as u32, [(n >> 32) as u32, 0, 0])
}

/// The ChaCha20 quarter round (RFC 8439 section 2.1).
#[inline(always)]
fn quarter_round(s: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize) {
    s[a] = s[a].wrapping_add(s[b]);
    s[d] = (s[d] ^ s[a]).rotate_left(16);
    s[c] = s[c].wrapping_add(s[d]);
    s[b] = (s[b] ^ s[c]).rotate_left(12);
    s[a] = s[a].wrapping_add(s[b]);
    s[d] = (s[d] ^ s[a]).rotate_left(8);
    s[c] = s[c].wrapping_add(s[d]);
    s[b] = (s[b] ^ s[c]).rotate_left(7);
}

/// The ChaCha20 block function (RFC 8439 section 2.3): 64 keystream bytes.
pub(crate) fn chacha20_block(key: &[u32; 8], counter: u32, nonce: [u32; 3]) -> [u8; 64] {
    let mut init = [0u32; 16];
    init[..4].copy_from_slice(&[0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574]);
    init[4..12].copy_from_slice(key);
    init[12] = counter;
    init[13..].copy_from_slice(&nonce);
    let mut s = init;
    for _ in 0..10 {
        quarter_round(&mut s, 0, 4, 8, 12);
        quarter_round(&mut s, 1, 5, 9, 13);
        quarter_round(&mut s, 2, 6, 10, 14);
        quarter_round(&mut s, 3, 7, 11, 15);
        quarter_round(&mut s, 0, 5, 10, 15);
        quarter_round(&mut s, 1, 6, 11, 12);
        quarter_round(&mut s, 2, 7, 8, 13);
        quarter_round(&mut s, 3, 4, 9, 14);
    }
    let mut out = [0u8; 64];
    for (i, chunk) in out.chunks_exact_mut(4).enumerate() {
        chunk.copy_from_slice(&s[i].wrapping_add(init[i]).to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8439 section 2.3.2: the ChaCha20 block function test vector.
    #[crate::test]
    fn chacha20_block_matches_rfc_8439() {
        let mut key = [0u32; 8];
        for (i, k) in key.iter_mut().enumerate() {
            let b = (4 * i) as u8;
            *k = u32::from_le_bytes([b, b + 1, b + 2, b + 3]);
        }
        let out = chacha20_block(&key, 1, [0x0900_0000, 0x4a00_0000, 0]);
        let expected: [u8; 64] = [
            0x10, 0xf1, 0xe7, 0xe4, 0xd1, 0x3b, 0x59, 0x15, 0x50, 0x0f, 0xdd, 0x1f, 0xa3, 0x20,
            0x71, 0xc4, 0xc7, 0xd1, 0xf4, 0xc7, 0x33, 0xc0, 0x68, 0x03, 0x04, 0x22, 0xaa, 0x9a,
            0xc3, 0xd4, 0x6c, 0x4e, 0xd2, 0x82, 0x64, 0x46, 0x07, 0x9f, 0xaa, 0x09, 0x14, 0xc2,
            0xd7, 0x05, 0xd9, 0x8b, 0x02, 0xa2, 0xb5, 0x12, 0x9c, 0xd1, 0xde, 0x16, 0x4e, 0xb9,
            0xcb, 0xd0, 0x83, 0xe8, 0xa2, 0x50, 0x3c, 0x4e,
        ];
        assert_eq!(out, expected);
    }

    #[crate::test]
    fn the_keystream_never_repeats_a_block() {
        let mut a = [0u8; 128];
        let mut b = [0u8; 128];
        fill_bytes_keystream(&mut a);
        fill_bytes_keystream(&mut b);
        assert_ne!(a, b);
        assert_ne!(a[..64], a[64..]);
    }
}
