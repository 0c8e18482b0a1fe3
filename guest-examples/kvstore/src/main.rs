//! A persistent key-value store on the block device `data`: an append-only log with an
//! in-memory index rebuilt at boot.
//!
//! ```text
//! truncate -s 16M kv.img
//! pvrun --disk data=kv.img kvstore -- put a 1 ';' get a ';' list
//! ```
//!
//! Commands (several per run, separated by `;` as their own argument or inside one):
//! `put K V` (`ok`), `get K` (`K=V` or `K not found`), `del K` (`ok` or `K not found`),
//! `list` (`K=V` lines sorted by key), `count` (`<n>`), `fill N PREFIX` (puts
//! `PREFIX-<i>` = `v<i>-` and `i % 200` `x`s, flushing after every put and printing
//! `flushed PREFIX-<i>` once the flush completed), `verify N PREFIX` (`verified <ok>
//! missing <absent> bad <wrong value>`, plus ` gap` when a key exists after a missing one).
//! At boot it prints `recovered <records> records, <keys> keys, tail <bytes>`.
//!
//! Exit status: 0 on success; 1 on a disk error or a full disk (the message goes to
//! stderr); 2 on a usage error; 3 if `verify` found wrong values or a gap.
//!
//! Log format, records packed back to back from offset 0 (little-endian):
//!
//! ```text
//! 0  magic   u32  "PKV1"
//! 4  crc     u32  CRC-32 (IEEE) of bytes 8..len
//! 8  len     u32  whole record length (header, key, value)
//! 12 op      u8   1 put, 2 delete
//! 13 zero    u8
//! 14 key_len u16
//! 16 seq     u64  record number (0, 1, 2, ...): stale records past a torn one never match
//! 24 key, then value (len - 24 - key_len bytes)
//! ```
//!
//! Recovery reads the log from offset 0 and stops at the first record that does not
//! check out (bad magic, length, CRC, sequence number or UTF-8): that is the tail. The
//! sector holding the tail is kept in memory; each append rewrites it (same bytes, then
//! the new record, zero padding to the sector end) with whole-sector writes.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use pvrun::block::{self, Disk};
use pvrun::{eprintln, println};

pvrun::require_device!(block, "data");
pvrun::entry!(main);

const MAGIC: u32 = u32::from_le_bytes(*b"PKV1");
const HEADER: usize = 24;
/// Largest record (header, key and value).
const MAX_RECORD: usize = 1 << 20;
const OP_PUT: u8 = 1;
const OP_DEL: u8 = 2;
/// Bytes read at a time while recovering.
const WINDOW: u64 = 256 * 1024;

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320) lookup table.
const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// CRC-32 of `data` (the zlib/PNG checksum: `crc32(b"123456789") == 0xCBF43926`).
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Why a command failed.
#[derive(Debug)]
enum KvError {
    Disk(block::Error),
    Full { need: u64, free: u64 },
    TooLarge(usize),
}

impl From<block::Error> for KvError {
    fn from(e: block::Error) -> Self {
        KvError::Disk(e)
    }
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvError::Disk(e) => write!(f, "disk error: {e}"),
            KvError::Full { need, free } => write!(
                f,
                "disk full: the record needs {need} bytes, {free} bytes are left"
            ),
            KvError::TooLarge(n) => write!(
                f,
                "record too large: {n} bytes (at most {MAX_RECORD} with its header)"
            ),
        }
    }
}

/// A cached window of the disk, for reading the log sequentially.
struct Window {
    buf: Vec<u8>,
    start: u64,
}

impl Window {
    /// Bytes `off..off + n` of the disk (the caller checked they lie inside it).
    fn get(&mut self, disk: &mut Disk, off: u64, n: usize) -> Result<&[u8], block::Error> {
        let end = off + n as u64;
        if off < self.start || end > self.start + self.buf.len() as u64 {
            let ss = disk.sector_size();
            let start = off / ss * ss;
            let want = (end - start).next_multiple_of(ss).max(WINDOW);
            let len = want.min(disk.capacity() - start);
            self.buf.resize(len as usize, 0);
            self.start = start;
            disk.read(start, &mut self.buf)?;
        }
        let at = (off - self.start) as usize;
        Ok(&self.buf[at..at + n])
    }
}

/// A decoded record.
struct Record<'a> {
    op: u8,
    key: &'a str,
    value: &'a str,
}

/// Checks the header at the start of `h` (HEADER bytes); returns the record length.
fn header_len(h: &[u8], seq: u64, room: u64) -> Option<usize> {
    let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let len = u32_at(8) as usize;
    let key_len = u16::from_le_bytes([h[14], h[15]]) as usize;
    let rec_seq = u64::from_le_bytes(h[16..24].try_into().ok()?);
    let ok = u32_at(0) == MAGIC
        && (HEADER..=MAX_RECORD).contains(&len)
        && len as u64 <= room
        && (h[12] == OP_PUT || h[12] == OP_DEL)
        && h[13] == 0
        && key_len <= len - HEADER
        && rec_seq == seq;
    ok.then_some(len)
}

/// Decodes a whole record whose header passed [`header_len`].
fn decode(r: &[u8]) -> Option<Record<'_>> {
    let crc = u32::from_le_bytes([r[4], r[5], r[6], r[7]]);
    if crc32(&r[8..]) != crc {
        return None;
    }
    let key_len = u16::from_le_bytes([r[14], r[15]]) as usize;
    let key = core::str::from_utf8(&r[HEADER..HEADER + key_len]).ok()?;
    let value = core::str::from_utf8(&r[HEADER + key_len..]).ok()?;
    if r[12] == OP_DEL && !value.is_empty() {
        return None;
    }
    Some(Record {
        op: r[12],
        key,
        value,
    })
}

/// Encodes a record.
fn encode(op: u8, seq: u64, key: &str, value: &str) -> Vec<u8> {
    let len = HEADER + key.len() + value.len();
    let mut r = Vec::with_capacity(len);
    r.extend_from_slice(&MAGIC.to_le_bytes());
    r.extend_from_slice(&[0; 4]);
    r.extend_from_slice(&(len as u32).to_le_bytes());
    r.push(op);
    r.push(0);
    r.extend_from_slice(&(key.len() as u16).to_le_bytes());
    r.extend_from_slice(&seq.to_le_bytes());
    r.extend_from_slice(key.as_bytes());
    r.extend_from_slice(value.as_bytes());
    let crc = crc32(&r[8..]);
    r[4..8].copy_from_slice(&crc.to_le_bytes());
    r
}

/// The store: the disk, the index and the log's tail.
struct Store {
    disk: Disk,
    index: BTreeMap<String, String>,
    records: u64,
    /// Sequence number of the next record.
    seq: u64,
    /// Byte offset of the next record.
    tail: u64,
    /// The bytes of the tail's sector before the tail (`tail % sector_size` of them).
    tail_block: Vec<u8>,
    /// Writes since the last flush.
    dirty: bool,
}

impl Store {
    /// Rebuilds the index from the log.
    fn recover(mut disk: Disk) -> Result<Store, block::Error> {
        let cap = disk.capacity();
        let mut win = Window {
            buf: Vec::new(),
            start: 0,
        };
        let mut index = BTreeMap::new();
        let (mut off, mut seq) = (0u64, 0u64);
        while cap - off >= HEADER as u64 {
            let h = win.get(&mut disk, off, HEADER)?;
            let Some(len) = header_len(h, seq, cap - off) else {
                break;
            };
            let r = win.get(&mut disk, off, len)?;
            let Some(rec) = decode(r) else {
                break;
            };
            if rec.op == OP_PUT {
                index.insert(rec.key.to_string(), rec.value.to_string());
            } else {
                index.remove(rec.key);
            }
            off += len as u64;
            seq += 1;
        }
        let ss = disk.sector_size();
        let block_start = off / ss * ss;
        let tail_block = if off == block_start {
            Vec::new()
        } else {
            win.get(&mut disk, block_start, (off - block_start) as usize)?
                .to_vec()
        };
        Ok(Store {
            disk,
            index,
            records: seq,
            seq,
            tail: off,
            tail_block,
            dirty: false,
        })
    }

    /// Appends a record and writes the sectors it touches.
    fn append(&mut self, op: u8, key: &str, value: &str) -> Result<(), KvError> {
        let len = HEADER + key.len() + value.len();
        if len > MAX_RECORD || key.len() > u16::MAX as usize {
            return Err(KvError::TooLarge(len));
        }
        let free = self.disk.capacity() - self.tail;
        if len as u64 > free {
            return Err(KvError::Full {
                need: len as u64,
                free,
            });
        }
        let ss = self.disk.sector_size();
        let start = self.tail - self.tail_block.len() as u64;
        let mut buf = core::mem::take(&mut self.tail_block);
        buf.extend_from_slice(&encode(op, self.seq, key, value));
        let used = buf.len();
        buf.resize(used.next_multiple_of(ss as usize), 0);
        self.disk.write(start, &buf)?;
        self.dirty = true;
        buf.truncate(used);
        self.tail_block = buf.split_off(used / ss as usize * ss as usize);
        self.tail += len as u64;
        self.seq += 1;
        self.records += 1;
        Ok(())
    }

    fn put(&mut self, key: &str, value: &str) -> Result<(), KvError> {
        self.append(OP_PUT, key, value)?;
        self.index.insert(key.to_string(), value.to_string());
        Ok(())
    }

    /// Deletes `key`; false if it did not exist (nothing is written then).
    fn del(&mut self, key: &str) -> Result<bool, KvError> {
        if !self.index.contains_key(key) {
            return Ok(false);
        }
        self.append(OP_DEL, key, "")?;
        self.index.remove(key);
        Ok(true)
    }

    fn flush(&mut self) -> Result<(), KvError> {
        self.disk.flush()?;
        self.dirty = false;
        Ok(())
    }
}

/// The value `fill` stores under `PREFIX-<i>`.
fn fill_value(i: u64) -> String {
    let mut v = alloc::format!("v{i}-");
    v.extend(core::iter::repeat_n('x', (i % 200) as usize));
    v
}

/// A parsed command.
enum Cmd<'a> {
    Put(&'a str, &'a str),
    Get(&'a str),
    Del(&'a str),
    List,
    Count,
    Fill(u64, &'a str),
    Verify(u64, &'a str),
}

/// Splits the arguments into commands: `;` separates commands, as its own argument or
/// inside one (pieces around it are then split at whitespace). An argument without `;`
/// is one word, so values may contain spaces; a command word with spaces (`"put a 1"`)
/// is split too.
fn split_commands(args: &[&'static str]) -> Vec<Vec<&'static str>> {
    let mut cmds: Vec<Vec<&str>> = vec![Vec::new()];
    for &arg in args {
        if arg.contains(';') {
            for (i, piece) in arg.split(';').enumerate() {
                if i > 0 {
                    cmds.push(Vec::new());
                }
                cmds.last_mut().unwrap().extend(piece.split_whitespace());
            }
        } else {
            let cur = cmds.last_mut().unwrap();
            if cur.is_empty() && arg.trim().contains(char::is_whitespace) {
                cur.extend(arg.split_whitespace());
            } else {
                cur.push(arg);
            }
        }
    }
    cmds.retain(|c| !c.is_empty());
    cmds
}

fn parse<'a>(words: &[&'a str]) -> Result<Cmd<'a>, String> {
    let num = |s: &str| {
        s.parse::<u64>()
            .map_err(|_| alloc::format!("`{s}` is not a number"))
    };
    Ok(match *words {
        ["put", k, v] => Cmd::Put(k, v),
        ["get", k] => Cmd::Get(k),
        ["del", k] => Cmd::Del(k),
        ["list"] => Cmd::List,
        ["count"] => Cmd::Count,
        ["fill", n, p] => Cmd::Fill(num(n)?, p),
        ["verify", n, p] => Cmd::Verify(num(n)?, p),
        _ => return Err(alloc::format!("bad command `{}`", words.join(" "))),
    })
}

const USAGE: &str = "usage: kvstore CMD [; CMD ...] where CMD is put K V | get K | del K | list | count | fill N PREFIX | verify N PREFIX";

/// Runs one command; `Ok(false)` if `verify` found a problem.
fn run(store: &mut Store, cmd: &Cmd<'_>) -> Result<bool, KvError> {
    match *cmd {
        Cmd::Put(k, v) => {
            store.put(k, v)?;
            println!("ok");
        }
        Cmd::Get(k) => match store.index.get(k) {
            Some(v) => println!("{k}={v}"),
            None => println!("{k} not found"),
        },
        Cmd::Del(k) => {
            if store.del(k)? {
                println!("ok");
            } else {
                println!("{k} not found");
            }
        }
        Cmd::List => {
            for (k, v) in &store.index {
                println!("{k}={v}");
            }
        }
        Cmd::Count => println!("{}", store.index.len()),
        Cmd::Fill(n, prefix) => {
            for i in 0..n {
                let key = alloc::format!("{prefix}-{i}");
                store.put(&key, &fill_value(i))?;
                store.flush()?;
                println!("flushed {key}");
            }
        }
        Cmd::Verify(n, prefix) => {
            let (mut verified, mut missing, mut bad, mut gap) = (0u64, 0u64, 0u64, false);
            for i in 0..n {
                match store.index.get(&alloc::format!("{prefix}-{i}")) {
                    None => missing += 1,
                    Some(v) => {
                        gap |= missing > 0;
                        if *v == fill_value(i) {
                            verified += 1;
                        } else {
                            bad += 1;
                        }
                    }
                }
            }
            println!(
                "verified {verified} missing {missing} bad {bad}{}",
                if gap { " gap" } else { "" }
            );
            return Ok(bad == 0 && !gap);
        }
    }
    Ok(true)
}

fn main() -> i32 {
    let args: Vec<&'static str> = pvrun::env::args().skip(1).collect();
    let mut cmds = Vec::new();
    for words in split_commands(&args) {
        match parse(&words) {
            Ok(c) => cmds.push(c),
            Err(e) => {
                eprintln!("kvstore: {e}\n{USAGE}");
                return 2;
            }
        }
    }
    let disk = match Disk::open("data") {
        Ok(d) => d,
        Err(e) => {
            eprintln!("kvstore: cannot open disk `data`: {e}");
            return 1;
        }
    };
    let mut store = match Store::recover(disk) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kvstore: disk error while recovering: {e}");
            return 1;
        }
    };
    println!(
        "recovered {} records, {} keys, tail {}",
        store.records,
        store.index.len(),
        store.tail
    );
    let mut code = 0;
    for cmd in &cmds {
        match run(&mut store, cmd) {
            Ok(true) => {}
            Ok(false) => code = 3,
            Err(e) => {
                eprintln!("kvstore: {e}");
                // Keep what was written before the failure.
                if store.dirty {
                    let _ = store.flush();
                }
                return 1;
            }
        }
    }
    if store.dirty
        && let Err(e) = store.flush()
    {
        eprintln!("kvstore: {e}");
        return 1;
    }
    code
}

/// The log format and the command parser, tested inside a pvrun guest by
/// `cargo pvrun test -p kvstore` (no disk needed: a test binary boots without devices).
#[cfg(test)]
mod tests {
    use super::*;

    #[pvrun::test]
    fn crc32_is_the_ieee_checksum() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[pvrun::test]
    fn a_record_round_trips_with_the_documented_layout() {
        let r = encode(OP_PUT, 5, "key", "value");
        assert_eq!(r.len(), HEADER + 3 + 5);
        assert_eq!(&r[0..4], b"PKV1");
        assert_eq!(
            u32::from_le_bytes(r[8..12].try_into().unwrap()),
            r.len() as u32
        );
        assert_eq!(r[12], OP_PUT);
        assert_eq!(r[13], 0);
        assert_eq!(u16::from_le_bytes([r[14], r[15]]), 3);
        assert_eq!(u64::from_le_bytes(r[16..24].try_into().unwrap()), 5);
        assert_eq!(&r[24..], b"keyvalue");
        assert_eq!(
            u32::from_le_bytes(r[4..8].try_into().unwrap()),
            crc32(&r[8..])
        );
        assert_eq!(header_len(&r, 5, 1 << 20), Some(r.len()));
        let d = decode(&r).unwrap();
        assert_eq!((d.op, d.key, d.value), (OP_PUT, "key", "value"));
        let del = encode(OP_DEL, 6, "key", "");
        assert_eq!(decode(&del).unwrap().op, OP_DEL);
    }

    #[pvrun::test]
    fn recovery_rejects_every_kind_of_bad_header() {
        let r = encode(OP_PUT, 2, "k", "v");
        // A stale record (another sequence number) or one that does not fit.
        assert_eq!(header_len(&r, 3, 1 << 20), None);
        assert_eq!(header_len(&r, 2, r.len() as u64 - 1), None);
        let bad = |i: usize, v: u8| {
            let mut b = r.clone();
            b[i] = v;
            header_len(&b, 2, 1 << 20)
        };
        assert_eq!(bad(0, b'X'), None, "magic");
        assert_eq!(bad(12, 9), None, "op");
        assert_eq!(bad(13, 1), None, "zero byte");
        assert_eq!(bad(8, 3), None, "length below the header");
        assert_eq!(bad(14, 200), None, "key longer than the record");
    }

    #[pvrun::test]
    fn decode_rejects_a_bad_crc_bad_utf8_and_a_delete_with_a_value() {
        let mut r = encode(OP_PUT, 0, "k", "v");
        let last = r.len() - 1;
        r[last] ^= 1;
        assert!(decode(&r).is_none(), "crc");
        let mut u = encode(OP_PUT, 0, "k", "\u{e9}");
        let n = u.len();
        u[n - 1] = 0xff;
        let crc = crc32(&u[8..]);
        u[4..8].copy_from_slice(&crc.to_le_bytes());
        assert!(decode(&u).is_none(), "utf-8");
        assert!(decode(&encode(OP_DEL, 0, "k", "v")).is_none());
    }

    #[pvrun::test]
    fn commands_split_at_semicolons_and_parse() {
        let cmds = split_commands(&["put", "a", "one two", ";", "get a; list", "put b 2"]);
        assert_eq!(
            cmds,
            vec![
                vec!["put", "a", "one two"],
                vec!["get", "a"],
                vec!["list", "put b 2"],
            ]
        );
        assert!(matches!(parse(&["put", "k", "v"]), Ok(Cmd::Put("k", "v"))));
        assert!(matches!(
            parse(&["fill", "10", "p"]),
            Ok(Cmd::Fill(10, "p"))
        ));
        assert!(matches!(parse(&["fill", "x", "p"]), Err(e) if e.contains("not a number")));
        assert!(matches!(parse(&["frob"]), Err(e) if e.contains("bad command")));
    }

    #[pvrun::test]
    fn fill_values_grow_with_the_index() {
        assert_eq!(fill_value(0), "v0-");
        assert_eq!(fill_value(3), "v3-xxx");
        assert_eq!(fill_value(201).len(), "v201-".len() + 1);
    }
}
