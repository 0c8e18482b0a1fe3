//! Block I/O benchmark on the disk `bench`, timed inside the guest with the TSC.
//!
//! ```text
//! truncate -s 256M bench.img
//! pvrun --disk bench=bench.img blockbench -- seq-read 64 256
//! ```
//!
//! - `seq-read MIB REQ_KIB`: reads the first MIB MiB in REQ_KIB KiB requests, a ring's
//!   worth (at most 32 MiB of buffers) per batch, reusing one buffer per slot;
//! - `seq-write MIB REQ_KIB`: the same with writes (a flush follows, outside the timing);
//! - `rand-read QD COUNT`: COUNT 4 KiB reads at random sector-aligned offsets, QD per batch.
//!
//! - `selftest`: checks the `Disk` API (errors, splitting, batches larger than the ring,
//!   flush ordering, data round trips); prints `selftest ok` or `selftest FAILED: ...`.
//!
//! Each benchmark prints one line:
//! `<mode> bytes=<n> reqs=<n> ns=<elapsed ns> doorbells=<n> waits=<n>`
//! (requests, doorbells and `WAIT` calls counted over the timed part). Exit status 0; 1 on a
//! disk error; 2 on a usage error.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;

use pvrun::block::{Disk, Error};
use pvrun::time::Instant;
use pvrun::{eprintln, println};

pvrun::require_device!(block, "bench");
pvrun::entry!(main);

/// Largest total size of the buffers of one batch.
const BUFFER_BUDGET: u64 = 32 << 20;
/// Size of a random read.
const RAND_SIZE: usize = 4096;

const USAGE: &str =
    "usage: blockbench seq-read MIB REQ_KIB | seq-write MIB REQ_KIB | rand-read QD COUNT";

fn num(args: &[&str], i: usize) -> Option<u64> {
    args.get(i)?.parse().ok().filter(|&n| n > 0)
}

/// Checks every result of a batch.
fn check(results: Vec<Result<usize, Error>>) -> Result<(), Error> {
    results.into_iter().try_for_each(|r| r.map(|_| ()))
}

/// The buffers of a sequential run: one per slot of a batch, filled (so every page is
/// touched before the timed part starts).
fn sequential_buffers(disk: &Disk, write: bool, total: u64, req: u64) -> Vec<Vec<u8>> {
    let nreq = total.div_ceil(req);
    let depth = (disk.slots() as u64)
        .min(nreq)
        .min((BUFFER_BUDGET / req).max(1));
    (0..depth)
        .map(|i| vec![if write { b'a' + (i % 26) as u8 } else { 1 }; req as usize])
        .collect()
}

/// Sequential reads or writes of `total` bytes in `req`-byte requests.
fn sequential(
    disk: &mut Disk,
    bufs: &mut [Vec<u8>],
    write: bool,
    total: u64,
    req: u64,
) -> Result<(), Error> {
    let mut off = 0u64;
    while off < total {
        let mut batch = disk.batch();
        for buf in bufs.iter_mut() {
            if off >= total {
                break;
            }
            let n = req.min(total - off) as usize;
            if write {
                batch.write(off, &buf[..n])?;
            } else {
                batch.read(off, &mut buf[..n])?;
            }
            off += n as u64;
        }
        check(batch.finish()?)?;
    }
    Ok(())
}

/// `count` random 4 KiB reads, `qd` per batch, into `bufs` (`qd` buffers).
fn random(disk: &mut Disk, bufs: &mut [Vec<u8>], count: u64) -> Result<(), Error> {
    let ss = disk.sector_size();
    let sectors = (disk.capacity() - RAND_SIZE as u64) / ss + 1;
    let mut rng = pvrun::random::u64() | 1;
    let mut done = 0u64;
    while done < count {
        let mut batch = disk.batch();
        for buf in bufs.iter_mut() {
            if done >= count {
                break;
            }
            // xorshift64
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            batch.read((rng % sectors) * ss, buf)?;
            done += 1;
        }
        check(batch.finish()?)?;
    }
    Ok(())
}

/// Checks one expectation of `selftest`, printing what failed.
fn expect(ok: bool, what: &str, failures: &mut u32) {
    if !ok {
        println!("selftest FAILED: {what}");
        *failures += 1;
    }
}

/// `selftest`: exercises the `Disk` API (errors, splitting, batches over the ring size,
/// flush barriers) and checks the data read back. Needs a writable disk of at least 16 MiB.
/// Prints `selftest ok` (exit 0) or `selftest FAILED: ...` lines (exit 1).
fn selftest(disk: &mut Disk) -> i32 {
    let mut f = 0;
    let ss = disk.sector_size() as usize;
    expect(
        matches!(Disk::open("bench"), Err(Error::AlreadyOpen)),
        "second open",
        &mut f,
    );
    expect(
        matches!(Disk::open("no-such-disk"), Err(Error::NotFound)),
        "missing disk",
        &mut f,
    );
    let mut small = vec![0u8; 1000];
    expect(
        disk.read(0, &mut small) == Err(Error::Unaligned),
        "unaligned length",
        &mut f,
    );
    expect(
        disk.read(100, &mut small[..512]) == Err(Error::Unaligned),
        "unaligned offset",
        &mut f,
    );
    expect(
        disk.read(disk.capacity(), &mut small[..512]) == Err(Error::OutOfRange),
        "read past the end",
        &mut f,
    );
    expect(disk.read(0, &mut []) == Ok(()), "empty read", &mut f);
    // A transfer larger than max_request is split; the data must round-trip.
    let big_len = (disk.max_request() as usize * 2 + 3 * ss).min(16 << 20);
    let pattern = |i: usize, salt: u8| (i as u8).wrapping_mul(31).wrapping_add(salt);
    let big: Vec<u8> = (0..big_len).map(|i| pattern(i, 7)).collect();
    let mut back = vec![0u8; big_len];
    expect(disk.write(0, &big).is_ok(), "big write", &mut f);
    expect(disk.read(0, &mut back).is_ok(), "big read", &mut f);
    expect(back == big, "big read returns the written data", &mut f);
    drop((big, back));
    // A batch with more requests than the ring has slots, a flush in the middle.
    let n = disk.slots() as usize * 2 + 5;
    let out: Vec<Vec<u8>> = (0..n).map(|k| vec![k as u8; ss]).collect();
    let mut inp: Vec<Vec<u8>> = (0..n).map(|_| vec![0xee; ss]).collect();
    let before = disk.stats();
    let mut batch = disk.batch();
    let mut ok = true;
    for (k, b) in out.iter().enumerate() {
        ok &= batch.write((k * ss) as u64, b).is_ok();
    }
    let fl = batch.flush();
    for (k, b) in inp.iter_mut().enumerate() {
        ok &= batch.read((k * ss) as u64, b).is_ok();
    }
    expect(ok && batch.len() == 2 * n + 1, "batch building", &mut f);
    match batch.finish() {
        Ok(results) => {
            expect(results.len() == 2 * n + 1, "one result per request", &mut f);
            expect(results[fl] == Ok(0), "flush result", &mut f);
            expect(
                results
                    .iter()
                    .enumerate()
                    .all(|(i, r)| i == fl || *r == Ok(ss)),
                "batch results",
                &mut f,
            );
        }
        Err(e) => expect(false, &alloc::format!("batch failed: {e}"), &mut f),
    }
    expect(inp == out, "batch reads see the batch writes", &mut f);
    let st = disk.stats();
    expect(
        st.requests - before.requests == 2 * n as u64 + 1,
        "request counter",
        &mut f,
    );
    // A dropped, unfinished batch performs nothing.
    let junk = vec![0x55u8; ss];
    let mut b2 = disk.batch();
    expect(b2.write(0, &junk).is_ok(), "unfinished batch", &mut f);
    drop(b2);
    let mut first = vec![0u8; ss];
    expect(disk.read(0, &mut first).is_ok(), "read after drop", &mut f);
    expect(first == out[0], "a dropped batch wrote nothing", &mut f);
    expect(disk.flush().is_ok(), "flush", &mut f);
    if f == 0 {
        println!("selftest ok");
        0
    } else {
        1
    }
}

fn main() -> i32 {
    let args: Vec<&str> = pvrun::env::args().collect();
    let mode = args.get(1).copied().unwrap_or("");
    if mode == "selftest" {
        return match Disk::open("bench") {
            Ok(mut d) => selftest(&mut d),
            Err(e) => {
                eprintln!("blockbench: cannot open disk `bench`: {e}");
                1
            }
        };
    }
    let (Some(a), Some(b)) = (num(&args, 2), num(&args, 3)) else {
        eprintln!("{USAGE}");
        return 2;
    };
    if !matches!(mode, "seq-read" | "seq-write" | "rand-read") {
        eprintln!("{USAGE}");
        return 2;
    }
    let mut disk = match Disk::open("bench") {
        Ok(d) => d,
        Err(e) => {
            eprintln!("blockbench: cannot open disk `bench`: {e}");
            return 1;
        }
    };
    let (bytes, total_check) = match mode {
        "rand-read" => (b * RAND_SIZE as u64, RAND_SIZE as u64),
        _ => (a << 20, a << 20),
    };
    if total_check > disk.capacity() {
        eprintln!(
            "blockbench: the disk holds {} bytes, {total_check} needed",
            disk.capacity()
        );
        return 1;
    }
    if mode != "rand-read" && ((b << 10) % disk.sector_size() != 0) {
        eprintln!("blockbench: REQ_KIB must be a multiple of the sector size");
        return 2;
    }
    // Buffers are allocated and touched before the clock starts: the timed part is I/O.
    let mut bufs = match mode {
        "seq-read" => sequential_buffers(&disk, false, a << 20, b << 10),
        "seq-write" => sequential_buffers(&disk, true, a << 20, b << 10),
        _ => (0..a.min(b)).map(|_| vec![1u8; RAND_SIZE]).collect(),
    };
    let before = disk.stats();
    let t = Instant::now();
    let r = match mode {
        "seq-read" => sequential(&mut disk, &mut bufs, false, a << 20, b << 10),
        "seq-write" => sequential(&mut disk, &mut bufs, true, a << 20, b << 10),
        _ => random(&mut disk, &mut bufs, b),
    };
    let ns = t.elapsed().as_nanos();
    let after = disk.stats();
    if let Err(e) = r.and_then(|()| {
        if mode == "seq-write" {
            disk.flush()
        } else {
            Ok(())
        }
    }) {
        eprintln!("blockbench: {mode}: {e}");
        return 1;
    }
    println!(
        "{mode} bytes={bytes} reqs={} ns={ns} doorbells={} waits={}",
        after.requests - before.requests,
        after.doorbells - before.doorbells,
        after.waits - before.waits
    );
    0
}
