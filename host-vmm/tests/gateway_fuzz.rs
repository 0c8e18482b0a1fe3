//! A seeded, bounded fuzzer for `pvrun serve`'s request handling, over real sockets on
//! 127.0.0.1 against a real server (the `functions` guest).
//!
//! Several connections at once send generated and mutated HTTP/1.1: random methods and
//! paths (long, percent-encoded, control bytes, `/..`, empty, non-UTF-8), header sets
//! (duplicated or conflicting `Content-Length`, chunked bodies with broken chunk sizes,
//! huge values, obsolete line folding, bare LF, NUL bytes), bodies shorter or longer than
//! declared, pipelined requests, hang-ups mid-request, and the health, readiness, listing
//! and function routes with random inputs (JSON, zlib, bytes).
//!
//! The oracle: every response read is well-formed HTTP/1.1 with a status from the
//! documented set, an `X-Pvrun-Outcome` that agrees with its status, and a body that
//! names no host address or source file and holds no raw control bytes (outputs of
//! successful calls excepted: they are the function's bytes); a request the generator
//! left intact gets the answer it asked for (`upper`'s and `sha256`'s exact output,
//! 404 for unknown names, 405 for other methods, 413 above the input limit, ...); the
//! server never exits, never logs `panicked` or a raw control byte; a well-behaved client
//! calling `POST /upper` throughout always gets its exact answer within [`GOOD_LATENCY`];
//! and SIGTERM at the end exits 0.
//!
//! `PVRUN_FUZZ_ITERS=N` sets the number of connections (default [`DEFAULT_ITERS`]) and
//! `PVRUN_FUZZ_SEED=S` the first case seed; connection `i` is case `S + i`, so a failure
//! (which prints its case seed and the request bytes, escaped, shrunk to the smallest
//! prefix-and-chunk deletion that still fails) replays with
//! `PVRUN_FUZZ_SEED=CASE PVRUN_FUZZ_ITERS=1`.

mod common;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Connections in a default run: a few seconds of traffic.
const DEFAULT_ITERS: u64 = 600;
/// Concurrent fuzzing connections.
const WORKERS: u64 = 4;
/// The slowest the well-behaved client's call may be while the fuzzer runs.
const GOOD_LATENCY: Duration = Duration::from_secs(3);
/// The server's input limit as the listing does not say it: a request declaring more than
/// this must be refused before its body is read (413). The `functions` guest's input
/// buffer is well below it.
const SURELY_TOO_LARGE: u64 = 1 << 40;

/// Statuses `pvrun serve` documents (hyper's own: 400, 414, 431, 501, 505).
const STATUSES: &[u16] = &[
    200, 400, 404, 405, 408, 413, 414, 422, 431, 500, 501, 502, 503, 504, 505,
];

const FUNCTIONS: &[&str] = &[
    "upper",
    "sha256",
    "json-transform",
    "compress",
    "decompress",
    "greet-via-host",
];

/// SplitMix64, as in `host-vmm/src/fuzz.rs` (in a `Cell`, so draws nest).
struct Rng(Cell<u64>);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(Cell::new(seed))
    }
    fn next(&self) -> u64 {
        self.0.set(self.0.get().wrapping_add(0x9e37_79b9_7f4a_7c15));
        let mut z = self.0.get();
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    fn chance(&self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
    fn pick<T: Copy>(&self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
    fn bytes(&self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn budget() -> (u64, u64) {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse().ok());
    (
        env("PVRUN_FUZZ_ITERS").unwrap_or(DEFAULT_ITERS),
        env("PVRUN_FUZZ_SEED").unwrap_or(0x6761_7465_7761_7900),
    )
}

/// Bytes as a Rust byte-string literal body, for replaying by hand.
fn escaped(b: &[u8]) -> String {
    let mut s = String::new();
    for &c in b {
        match c {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'\t' => s.push_str("\\t"),
            b'\\' => s.push_str("\\\\"),
            b'"' => s.push_str("\\\""),
            0x20..=0x7e => s.push(c as char),
            _ => {
                let _ = write!(s, "\\x{c:02x}");
            }
        }
    }
    s
}

/// What the generator knows about the answer to one intact request.
#[derive(Clone, Debug)]
enum Expect {
    /// Exactly this status (or 503 busy) and, if given, exactly this body.
    Exact(u16, Option<Vec<u8>>),
    /// One of these statuses (or 503 busy).
    OneOf(&'static [u16]),
    /// Exactly this status and body; not even 503 busy (the well-behaved client).
    Strict(u16, Vec<u8>),
}

/// One request on the wire and, if the generator left it intact, what it must get.
struct Req {
    bytes: Vec<u8>,
    head: bool,
    expect: Option<Expect>,
}

fn json_value(rng: &Rng, depth: u32) -> String {
    match rng.below(if depth > 3 { 4 } else { 7 }) {
        0 => rng.pick(&["null", "true", "false"]).to_string(),
        1 => format!("{}", rng.next() as i64 >> rng.below(64)),
        2 => rng
            .pick(&[
                "1e308",
                "-0",
                "3.25",
                "18446744073709551615",
                "1e999",
                "-1.5e-7",
            ])
            .to_string(),
        3 => {
            let s: String = (0..rng.below(12))
                .map(|_| rng.pick(&['a', 'Z', 'é', '\u{1f600}', ' ', '"', '\\', '\u{1}']))
                .collect();
            serde_like_string(&s)
        }
        4 => format!(
            "[{}]",
            (0..rng.below(4))
                .map(|_| json_value(rng, depth + 1))
                .collect::<Vec<_>>()
                .join(",")
        ),
        _ => json_object(rng, depth + 1),
    }
}

fn serde_like_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_object(rng: &Rng, depth: u32) -> String {
    format!(
        "{{{}}}",
        (0..rng.below(4))
            .map(|i| format!("\"k{i}{}\":{}", rng.below(100), json_value(rng, depth)))
            .collect::<Vec<_>>()
            .join(",")
    )
}

/// A function's input and what a call with it must answer.
fn input_for(rng: &Rng, name: &str) -> (Vec<u8>, Expect) {
    let len = match rng.below(6) {
        0 => 0,
        1 => rng.below(8) as usize,
        2 => 4096 + rng.below(70_000) as usize,
        // Sometimes the most a function takes (the caller makes some one byte more).
        3 if rng.chance(20) => 1 << 20,
        _ => rng.below(300) as usize,
    };
    match name {
        "upper" => {
            let b = rng.bytes(len);
            let up = b.to_ascii_uppercase();
            (b, Expect::Exact(200, Some(up)))
        }
        "sha256" => {
            let b = rng.bytes(len);
            let hex: String = Sha256::digest(&b)
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect();
            (b, Expect::Exact(200, Some(hex.into_bytes())))
        }
        "json-transform" => {
            let mut b = if rng.chance(3) {
                json_value(rng, 0).into_bytes()
            } else {
                json_object(rng, 0).into_bytes()
            };
            if rng.chance(3) && !b.is_empty() {
                let i = rng.below(b.len() as u64) as usize;
                b[i] = rng.next() as u8;
            }
            (b, Expect::OneOf(&[200, 422]))
        }
        "decompress" => {
            let mut b = vec![0x78, 0x9c];
            b.extend(rng.bytes(len.min(500)));
            (b, Expect::OneOf(&[200, 422]))
        }
        // No host functions are configured: greet-via-host fails (422) or the host
        // refuses; compress succeeds.
        "greet-via-host" => (rng.bytes(len.min(64)), Expect::OneOf(&[200, 422])),
        _ => (rng.bytes(len), Expect::Exact(200, None)),
    }
}

/// A random path: sometimes a route, sometimes something nasty.
fn nasty_path(rng: &Rng) -> Vec<u8> {
    let mut p: Vec<u8> = match rng.below(10) {
        0 => b"/..".to_vec(),
        1 => b"/../../etc/passwd".to_vec(),
        2 => format!("/{}", "%41%2F%00%ff".repeat(rng.below(20) as usize)).into_bytes(),
        3 => {
            let mut v = b"/".to_vec();
            v.extend(std::iter::repeat_n(b'a', 1 + rng.below(70_000) as usize));
            v
        }
        4 => Vec::new(),
        5 => b"*".to_vec(),
        6 => b"http://evil.example/upper?x=1#frag".to_vec(),
        7 => {
            let mut v = b"/".to_vec();
            v.extend(rng.bytes(1 + rng.below(20) as usize));
            v
        }
        8 => format!("/{}", rng.pick(FUNCTIONS)).into_bytes(),
        _ => b"/up\x01per\x1b[31m".to_vec(),
    };
    if rng.chance(4) {
        p.extend_from_slice(b"?q=%ZZ&\xc3\x28");
    }
    p
}

/// One request the generator knows the answer to.
fn good_request(rng: &Rng, max_input: u64) -> Req {
    if rng.chance(12) {
        // Declares more than the function takes: refused before a byte of it is sent.
        let len = max_input + 1 + rng.below(3) * rng.below(u64::MAX / 4);
        // Also as the same value twice (hyper takes it as that length) or as a list of
        // it (hyper refuses it: 400).
        let list = rng.chance(3);
        let value = match rng.below(2) {
            _ if list => format!("{len}, {len}"),
            1 => format!("{len}\r\nContent-Length: {len}"),
            _ => len.to_string(),
        };
        let bytes = format!(
            "POST /{} HTTP/1.1\r\nHost: fuzz\r\nContent-Length: {value}\r\n\r\n",
            rng.pick(FUNCTIONS)
        );
        return Req {
            bytes: bytes.into_bytes(),
            head: false,
            expect: Some(if list {
                Expect::OneOf(&[400, 413])
            } else {
                Expect::Exact(413, None)
            }),
        };
    }
    let mut expect;
    let (method, path, body): (&str, String, Vec<u8>) = match rng.below(9) {
        0 => {
            expect = Expect::Exact(200, Some(b"live\n".to_vec()));
            (rng.pick(&["GET", "HEAD"]), "/healthz".into(), Vec::new())
        }
        1 => {
            expect = Expect::Exact(200, Some(b"ready\n".to_vec()));
            (rng.pick(&["GET", "HEAD"]), "/readyz".into(), Vec::new())
        }
        2 => {
            expect = Expect::Exact(200, None);
            ("GET", "/".into(), Vec::new())
        }
        3 => {
            expect = Expect::Exact(405, None);
            let m = rng.pick(&["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "FOO"]);
            (m, format!("/{}", rng.pick(FUNCTIONS)), Vec::new())
        }
        4 => {
            expect = Expect::Exact(404, None);
            let name = rng.pick(&["Upper", "upper/", "up%70er", "nope", "upper%00", "..", "-"]);
            (
                "POST",
                format!("/{name}"),
                rng.bytes(rng.below(10) as usize),
            )
        }
        _ => {
            let name = rng.pick(FUNCTIONS);
            let (mut input, e) = input_for(rng, name);
            expect = e;
            if input.len() as u64 == max_input && rng.chance(2) {
                input.push(b'!');
            }
            ("POST", format!("/{name}"), input)
        }
    };
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: fuzz\r\n");
    let chunked = method == "POST" && rng.chance(4);
    if chunked && body.len() as u64 > max_input {
        expect = Expect::Exact(413, None);
    }
    if chunked {
        head.push_str("Transfer-Encoding: chunked\r\n");
    } else if method == "POST" && body.len() as u64 > max_input {
        // Larger than the function accepts: refused by its declared length.
        expect = Expect::Exact(413, None);
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    } else if !body.is_empty() || rng.chance(2) {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    if rng.chance(5) {
        head.push_str(&format!(
            "X-Junk: {}\r\n",
            "j".repeat(rng.below(2000) as usize)
        ));
    }
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(b"\r\n");
    if chunked {
        let mut rest = &body[..];
        while !rest.is_empty() {
            let n = (1 + rng.below(5000) as usize).min(rest.len());
            bytes.extend_from_slice(format!("{n:x}\r\n").as_bytes());
            bytes.extend_from_slice(&rest[..n]);
            bytes.extend_from_slice(b"\r\n");
            rest = &rest[n..];
        }
        bytes.extend_from_slice(b"0\r\n\r\n");
    } else {
        bytes.extend_from_slice(&body);
    }
    Req {
        bytes,
        head: method == "HEAD",
        expect: Some(expect),
    }
}

/// One hostile request: generated from nasty parts, or a good one mutated.
fn bad_request(rng: &Rng, max_input: u64) -> Req {
    if rng.chance(3) {
        let mut r = good_request(rng, max_input);
        if r.head {
            // A HEAD answer has no body: the reader must know, so only intact HEADs.
            r.bytes.splice(..4, *b"GET");
        }
        mutate(rng, &mut r.bytes);
        r.expect = None;
        r.head = false;
        return r;
    }
    let method: Vec<u8> = match rng.below(6) {
        0 => b"GET".to_vec(),
        1 => b"OPTIONS".to_vec(),
        2 => rng.bytes(1 + rng.below(8) as usize),
        3 => b"P\x00ST".to_vec(),
        4 => "X".repeat(1 + rng.below(100) as usize).into_bytes(),
        _ => b"POST".to_vec(),
    };
    let mut b = method.clone();
    b.push(b' ');
    b.extend(nasty_path(rng));
    b.extend_from_slice(rng.pick(&[
        &b" HTTP/1.1"[..],
        b" HTTP/1.0",
        b" HTTP/2.0",
        b" HTTP/1.1 extra",
        b"",
        b" HTTP/9",
    ]));
    let eol: &[u8] = if rng.chance(5) { b"\n" } else { b"\r\n" };
    b.extend_from_slice(eol);
    let declared = rng.below(200);
    let mut body_kind = 0;
    for _ in 0..rng.below(8) {
        let line: Vec<u8> = match rng.below(14) {
            0 => format!("Content-Length: {declared}").into_bytes(),
            1 => format!("Content-Length: {}", declared + 1 + rng.below(5)).into_bytes(),
            2 => rng
                .pick(&[
                    &b"Content-Length: -1"[..],
                    b"Content-Length: +5",
                    b"Content-Length: 18446744073709551616",
                    b"Content-Length: 1, 2",
                    b"Content-Length: 0x10",
                    b"Content-Length:",
                ])
                .to_vec(),
            3 => {
                body_kind = 1;
                b"Transfer-Encoding: chunked".to_vec()
            }
            4 => rng
                .pick(&[
                    &b"Transfer-Encoding: gzip, chunked"[..],
                    b"Transfer-Encoding: chunked, identity",
                    b"Transfer-Encoding: \x00chunked",
                ])
                .to_vec(),
            5 => format!("X-Huge: {}", "h".repeat(rng.below(100_000) as usize)).into_bytes(),
            6 => b"X-Folded: a\r\n  folded continuation".to_vec(),
            7 => b"X-Nul: a\x00b".to_vec(),
            8 => b"Bad Header Name: x".to_vec(),
            9 => b": no name".to_vec(),
            10 => format!("Content-Length: {SURELY_TOO_LARGE}").into_bytes(),
            11 => b"Connection: close".to_vec(),
            12 => b"Expect: 100-continue".to_vec(),
            _ => {
                let mut v = b"X-R: ".to_vec();
                v.extend(rng.bytes(rng.below(40) as usize));
                v
            }
        };
        b.extend(line);
        b.extend_from_slice(eol);
    }
    if rng.chance(3) {
        b.extend_from_slice(b"Host: fuzz\r\n");
    }
    b.extend_from_slice(eol);
    if body_kind == 1 {
        // Chunked with broken sizes.
        for _ in 0..rng.below(4) {
            let size: Vec<u8> = match rng.below(6) {
                0 => b"ffffffffffffffffff".to_vec(),
                1 => b"-1".to_vec(),
                2 => b"zz".to_vec(),
                3 => b"5;ext=\x01".to_vec(),
                _ => format!("{:x}", rng.below(50)).into_bytes(),
            };
            b.extend(size);
            b.extend_from_slice(b"\r\n");
            b.extend(rng.bytes(rng.below(60) as usize));
            b.extend_from_slice(b"\r\n");
        }
        if rng.chance(2) {
            b.extend_from_slice(b"0\r\n\r\n");
        }
    } else {
        // Shorter or longer than declared, or what was declared.
        let n = match rng.below(3) {
            0 => rng.below(declared + 1),
            1 => declared + rng.below(50),
            _ => declared,
        };
        b.extend(rng.bytes(n as usize));
    }
    Req {
        bytes: b,
        head: false,
        expect: None,
    }
}

fn mutate(rng: &Rng, b: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        if b.is_empty() {
            b.push(rng.next() as u8);
            continue;
        }
        let i = rng.below(b.len() as u64) as usize;
        match rng.below(7) {
            0 => b[i] = rng.next() as u8,
            1 => b[i] ^= 1 << rng.below(8),
            2 => {
                b.remove(i);
            }
            3 => b.insert(i, rng.pick(&[b'\r', b'\n', 0, b' ', b':', 0xff, b'\t'])),
            4 => b.truncate(i),
            5 => {
                let j = (i + rng.below(64) as usize).min(b.len());
                let piece = b[i..j].to_vec();
                for (k, c) in piece.into_iter().enumerate() {
                    b.insert(j + k, c);
                }
            }
            _ => {
                const DIGITS: &[&[u8]] = &[b"0", b"99999999999", b"-", b"4294967296"];
                let digits = rng.pick(DIGITS);
                for (k, &c) in digits.iter().enumerate() {
                    b.insert(i + k, c);
                }
            }
        }
    }
}

/// How a case ends on the client side.
#[derive(Clone, Copy, Debug)]
enum Ending {
    /// Read the answers.
    Read,
    /// Hang up after this many bytes, without reading.
    HangUp(usize),
}

/// One fuzzing connection: pipelined requests and how it ends.
struct Case {
    reqs: Vec<Req>,
    ending: Ending,
}

impl Case {
    fn generate(seed: u64, max_input: u64) -> Case {
        let rng = Rng::new(seed);
        let n = 1 + rng.below(if rng.chance(3) { 6 } else { 1 });
        let reqs = (0..n)
            .map(|_| {
                if rng.chance(2) {
                    good_request(&rng, max_input)
                } else {
                    bad_request(&rng, max_input)
                }
            })
            .collect::<Vec<_>>();
        let mut reqs = reqs;
        // Once a request is unknown, the reader cannot tell which answer is whose: no
        // bodiless HEAD answers after it.
        let mut unknown = false;
        for r in &mut reqs {
            if unknown && r.head {
                r.bytes.splice(..4, *b"GET");
                r.head = false;
            }
            unknown |= r.expect.is_none();
        }
        let total: usize = reqs.iter().map(|r| r.bytes.len()).sum();
        let ending = if rng.chance(6) {
            Ending::HangUp(rng.below(total as u64 + 1) as usize)
        } else {
            Ending::Read
        };
        Case { reqs, ending }
    }

    fn wire(&self) -> Vec<u8> {
        self.reqs.iter().flat_map(|r| r.bytes.clone()).collect()
    }
}

/// One response read off the wire.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response strictly; `Ok(None)` at a clean end of stream.
fn read_response(r: &mut impl BufRead, head: bool) -> Result<Option<Resp>, String> {
    let mut line = Vec::new();
    let read_line = |r: &mut dyn BufRead, line: &mut Vec<u8>| -> Result<usize, String> {
        line.clear();
        r.read_until(b'\n', line).map_err(|e| format!("read: {e}"))
    };
    if read_line(r, &mut line)? == 0 {
        return Ok(None);
    }
    let status_line = line
        .strip_suffix(b"\r\n")
        .ok_or_else(|| format!("status line without CRLF: {}", escaped(&line)))?;
    let status_line = std::str::from_utf8(status_line)
        .map_err(|_| format!("status line not UTF-8: {}", escaped(&line)))?;
    // HTTP/1.0 requests get HTTP/1.0 answers.
    let rest = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
        .ok_or_else(|| format!("not an HTTP/1.x status line: {status_line:?}"))?;
    let status: u16 = rest
        .get(..3)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status: {status_line:?}"))?;
    if status == 100 {
        // `Expect: 100-continue`: an interim answer, then the real one.
        loop {
            if read_line(r, &mut line)? == 0 {
                return Err("connection closed after 100 Continue".into());
            }
            if line == b"\r\n" {
                break;
            }
        }
        return read_response(r, head);
    }
    if !STATUSES.contains(&status) {
        return Err(format!("undocumented status {status}: {status_line:?}"));
    }
    let mut headers = Vec::new();
    loop {
        if read_line(r, &mut line)? == 0 {
            return Err("connection closed inside the response headers".into());
        }
        let l = line
            .strip_suffix(b"\r\n")
            .ok_or_else(|| format!("header line without CRLF: {}", escaped(&line)))?;
        if l.is_empty() {
            break;
        }
        let text =
            std::str::from_utf8(l).map_err(|_| format!("header not UTF-8: {}", escaped(l)))?;
        let (k, v) = text
            .split_once(": ")
            .ok_or_else(|| format!("malformed header: {text:?}"))?;
        if k.is_empty() || !k.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-') {
            return Err(format!("bad header name: {text:?}"));
        }
        if v.bytes().any(|c| c < 0x20 || c == 0x7f) {
            return Err(format!("control byte in header value: {text:?}"));
        }
        headers.push((k.to_ascii_lowercase(), v.to_string()));
    }
    let resp = Resp {
        status,
        headers,
        body: Vec::new(),
    };
    if resp.header("transfer-encoding").is_some() {
        return Err("the gateway's responses are Content-Length framed".into());
    }
    let len = match resp.header("content-length") {
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| format!("bad Content-Length {v:?}"))?,
        None => 0,
    };
    let mut resp = resp;
    if !head {
        resp.body = vec![0; len];
        r.read_exact(&mut resp.body)
            .map_err(|e| format!("body of {len} bytes cut short: {e}"))?;
    }
    Ok(Some(resp))
}

/// Whether `body` names a host address or a source file.
fn leaks(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    for marker in [
        ".rs:",
        "/home/",
        "/work/",
        "/root/",
        "RUST_BACKTRACE",
        "panicked",
    ] {
        if text.contains(marker) {
            return Some(format!("contains {marker:?}"));
        }
    }
    let b = body;
    for i in 0..b.len().saturating_sub(2) {
        if b[i] == b'0' && (b[i + 1] | 0x20) == b'x' {
            let hex = b[i + 2..]
                .iter()
                .take_while(|c| c.is_ascii_hexdigit())
                .count();
            if hex >= 8 {
                return Some(format!("names an address at byte {i}"));
            }
        }
    }
    None
}

fn outcome_ok(status: u16, outcome: &str) -> bool {
    matches!(
        (status, outcome),
        (200, "ok")
            | (422, "failed")
            | (404, "unknown")
            | (413, "too-large")
            | (502, "too-large")
            | (500, "panic" | "fault" | "error")
            | (504, "timeout")
            | (405, "error")
            | (400, "bad-request")
            | (408, "body-timeout")
            | (503, "busy" | "starting" | "killed")
    )
}

/// Responses read, by status and outcome (printed at the end, and checked for coverage).
static SEEN: Mutex<BTreeMap<(u16, String), u64>> = Mutex::new(BTreeMap::new());

/// Checks one response against the oracle.
fn check_response(r: &Resp, want: Option<&Expect>) -> Result<(), String> {
    let key = (
        r.status,
        r.header("x-pvrun-outcome").unwrap_or("-").to_string(),
    );
    *SEEN.lock().unwrap().entry(key).or_default() += 1;
    let outcome = r.header("x-pvrun-outcome");
    match outcome {
        Some(o) if !outcome_ok(r.status, o) => {
            return Err(format!("status {} with outcome {o:?}", r.status));
        }
        None if ![400, 414, 431, 501, 505].contains(&r.status) => {
            return Err(format!("status {} without X-Pvrun-Outcome", r.status));
        }
        _ => {}
    }
    if outcome.is_some() && r.header("x-request-id").is_none() {
        return Err("no X-Request-Id".into());
    }
    let binary = r.header("content-type") == Some("application/octet-stream");
    if !binary {
        if std::str::from_utf8(&r.body).is_err() {
            return Err(format!("text body is not UTF-8: {}", escaped(&r.body)));
        }
        if r.body
            .iter()
            .any(|&c| (c < 0x20 && c != b'\n') || c == 0x7f)
        {
            return Err(format!("raw control byte in body: {}", escaped(&r.body)));
        }
        if let Some(why) = leaks(&r.body) {
            return Err(format!("body {why}: {}", escaped(&r.body)));
        }
    }
    let busy = r.status == 503 && outcome == Some("busy");
    match want {
        Some(Expect::Exact(..) | Expect::OneOf(_)) if busy => {}
        None => {}
        Some(Expect::Exact(s, body)) => {
            if r.status != *s {
                return Err(format!(
                    "want status {s}, got {}: {}",
                    r.status,
                    escaped(&r.body)
                ));
            }
            if let Some(b) = body
                && !r.body.is_empty()
                && &r.body != b
            {
                return Err(format!(
                    "want body {}, got {}",
                    escaped(&b[..b.len().min(200)]),
                    escaped(&r.body[..r.body.len().min(200)])
                ));
            }
            if let Some(b) = body
                && r.body.is_empty()
                && !b.is_empty()
                && r.header("content-length") != Some(&b.len().to_string())
            {
                return Err(format!("want body {}, got none", escaped(b)));
            }
        }
        Some(Expect::Strict(s, b)) if r.status != *s || &r.body != b => {
            return Err(format!(
                "want {s} {}, got {} {}",
                escaped(b),
                r.status,
                escaped(&r.body)
            ));
        }
        Some(Expect::OneOf(set)) if !set.contains(&r.status) => {
            return Err(format!(
                "want one of {set:?}, got {}: {}",
                r.status,
                escaped(&r.body)
            ));
        }
        Some(Expect::Strict(..) | Expect::OneOf(_)) => {}
    }
    Ok(())
}

/// Runs one connection and checks everything it reads.
fn run_wire(
    addr: &str,
    wire: &[u8],
    reqs: &[(bool, Option<Expect>)],
    ending: Ending,
) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    let deadline = Duration::from_secs(6 + 3 * reqs.len() as u64);
    s.set_read_timeout(Some(deadline)).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    if let Ending::HangUp(n) = ending {
        let _ = s.write_all(&wire[..n.min(wire.len())]);
        return Ok(());
    }
    // The server may answer and close before it has read everything (a 400 or 413): a
    // write error then is not a failure.
    let writer = {
        let mut w = s.try_clone().unwrap();
        let wire = wire.to_vec();
        std::thread::spawn(move || {
            let _ = w.write_all(&wire);
        })
    };
    let started = Instant::now();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut got = 0;
    let mut known = true;
    let result = loop {
        // Which request this response answers is known while every one before it was
        // intact; after a mutated one, only well-formedness is checked.
        let (head, want) = match reqs.get(got) {
            Some((h, w)) if known => (*h, w.clone()),
            _ => (false, None),
        };
        if want.is_none() {
            known = false;
        }
        match read_response(&mut r, head) {
            Ok(None) => break Ok(()),
            Ok(Some(resp)) => {
                if let Err(e) = check_response(&resp, want.as_ref()) {
                    break Err(format!("response {got}: {e}"));
                }
                got += 1;
                if known && got == reqs.len() {
                    break Ok(());
                }
                if resp.header("connection") == Some("close") {
                    known = false;
                }
            }
            Err(e)
                if e.contains("WouldBlock")
                    || e.contains("timed out")
                    || e.contains("Resource temporarily") =>
            {
                break Err(format!(
                    "no complete answer within {:.1} s (response {got}): {e}",
                    started.elapsed().as_secs_f64()
                ));
            }
            // The server closed with unread bytes (after a 400 or 413), and the reset
            // overtook its last answer.
            Err(e) if e.contains("reset by peer") => break Ok(()),
            Err(e) => break Err(format!("response {got}: {e}")),
        }
    };
    let _ = s.shutdown(Shutdown::Both);
    let _ = writer.join();
    result
}

fn run_case(addr: &str, case: &Case) -> Result<(), String> {
    let reqs: Vec<_> = case
        .reqs
        .iter()
        .map(|r| (r.head, r.expect.clone()))
        .collect();
    run_wire(addr, &case.wire(), &reqs, case.ending)
}

/// The kind of a failure, to shrink towards the same one: its text without the
/// response's number, cut short.
fn kind(e: &str) -> String {
    let e = e
        .split_once(": ")
        .filter(|(a, _)| a.starts_with("response "))
        .map_or(e, |(_, b)| b);
    e.chars().take(24).collect()
}

/// Shrinks a failing connection's bytes (checked only for well-formedness, as mutated
/// traffic is): drops chunks while it still fails the same way, up to 150 tries.
/// First each request of the case alone (with what it must get), then the whole wire with
/// chunks dropped, within 40 s.
fn shrink(addr: &str, case: &Case, error: &str) -> Vec<u8> {
    let want = kind(error);
    for r in &case.reqs {
        let alone = run_wire(addr, &r.bytes, &[(r.head, r.expect.clone())], Ending::Read);
        if alone.is_err_and(|e| kind(&e) == want) {
            if r.expect.is_some() {
                return r.bytes.clone();
            }
            return shrink_bytes(addr, &r.bytes, &want);
        }
    }
    // The reader of shrunk bytes cannot know which answer is to a HEAD: none are.
    let wire: Vec<u8> = case
        .reqs
        .iter()
        .flat_map(|r| {
            let mut b = r.bytes.clone();
            if r.head {
                b.splice(..4, *b"GET");
            }
            b
        })
        .collect();
    shrink_bytes(addr, &wire, &want)
}

fn shrink_bytes(addr: &str, wire: &[u8], want: &str) -> Vec<u8> {
    let fails = |w: &[u8]| run_wire(addr, w, &[], Ending::Read).is_err_and(|e| kind(&e) == want);
    let mut best = wire.to_vec();
    if !fails(&best) {
        return best;
    }
    let mut tries = 0;
    let mut chunk = best.len() / 2;
    let until = Instant::now() + Duration::from_secs(40);
    while chunk >= 1 && tries < 150 && Instant::now() < until {
        let mut i = 0;
        let mut shrunk = false;
        while i + chunk <= best.len() && tries < 150 && Instant::now() < until {
            let mut cand = best[..i].to_vec();
            cand.extend_from_slice(&best[i + chunk..]);
            tries += 1;
            if fails(&cand) {
                best = cand;
                shrunk = true;
            } else {
                i += chunk;
            }
        }
        if !shrunk {
            chunk /= 2;
        }
    }
    best
}

/// A `pvrun serve` process; killed (and reaped) on drop. Its stderr is kept as bytes.
struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Server {
    fn start(opts: &[&str]) -> Server {
        let mut child = Command::new(common::pvrun_bin())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(opts)
            .arg(common::guest("functions"))
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pvrun serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut line = Vec::new();
            while r.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
                sink.lock().unwrap().push(std::mem::take(&mut line));
            }
        });
        let mut server = Server {
            child,
            addr: String::new(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while server.addr.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => {
                    if let Some(rest) = l.split("http://").nth(1) {
                        server.addr = rest.split('/').next().unwrap().to_string();
                    }
                }
                Err(_) => panic!("pvrun serve did not get ready: {}", server.log_text()),
            }
        }
        server
    }

    fn log_text(&self) -> String {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|l| escaped(l))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A problem with the server itself: exited, panicked, or logged a raw control byte.
    fn problem(&mut self) -> Option<String> {
        if let Ok(Some(st)) = self.child.try_wait() {
            return Some(format!("the server exited: {st}"));
        }
        for l in self.log.lock().unwrap().iter() {
            let body = l.strip_suffix(b"\n").unwrap_or(l);
            if String::from_utf8_lossy(body).contains("panicked") {
                return Some(format!("the server panicked: {}", escaped(l)));
            }
            if body.iter().any(|&c| (c < 0x20 && c != b'\t') || c == 0x7f) {
                return Some(format!(
                    "raw control byte in the server log: {}",
                    escaped(l)
                ));
            }
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The largest input the server takes, from a probe: the 413 message names it.
fn max_input(addr: &str) -> u64 {
    let req =
        format!("POST /upper HTTP/1.1\r\nHost: x\r\nContent-Length: {SURELY_TOO_LARGE}\r\n\r\n");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let r = read_response(&mut BufReader::new(s), false)
        .unwrap()
        .expect("an answer to the probe");
    assert_eq!(r.status, 413, "probe: {}", escaped(&r.body));
    let text = String::from_utf8_lossy(&r.body).into_owned();
    let n = text
        .split("than the ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse().ok());
    n.unwrap_or_else(|| panic!("probe: no limit in {text:?}"))
}

#[test]
fn gateway_survives_fuzzed_http() {
    let (iters, seed) = budget();
    let mut server = Server::start(&[
        "--pool",
        "2",
        "--header-timeout",
        "1",
        // Short, so bodies shorter than declared cost little; long enough for a 1 MiB
        // body on a loaded machine.
        "--body-timeout",
        "2",
        "--timeout",
        "3",
    ]);
    let addr = server.addr.clone();
    let limit = max_input(&addr);
    eprintln!(
        "gateway fuzz: seed {seed:#x}, {iters} connections, {WORKERS} at a time, input limit {limit} bytes"
    );

    // The well-behaved client, throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let good = {
        let (stop, addr) = (stop.clone(), addr.clone());
        std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            let mut calls = 0u64;
            let rng = Rng::new(seed ^ 0x600d);
            while !stop.load(Ordering::Relaxed) {
                let input = rng.bytes(1 + rng.below(200) as usize);
                let t = Instant::now();
                let reqs = [(false, Some(Expect::Strict(200, input.to_ascii_uppercase())))];
                let mut wire = format!(
                    "POST /upper HTTP/1.1\r\nHost: good\r\nContent-Length: {}\r\n\r\n",
                    input.len()
                )
                .into_bytes();
                wire.extend_from_slice(&input);
                // The good client never accepts busy: its own check, stricter than
                // the oracle's.
                let r = run_wire(&addr, &wire, &reqs, Ending::Read);
                let took = t.elapsed();
                worst = worst.max(took);
                calls += 1;
                if let Err(e) = r {
                    return Err(format!("good call {calls}: {e}"));
                }
                if took > GOOD_LATENCY {
                    return Err(format!(
                        "good call {calls} took {:.2} s (bound {GOOD_LATENCY:?})",
                        took.as_secs_f64()
                    ));
                }
                std::thread::sleep(Duration::from_millis(30));
            }
            Ok((calls, worst))
        })
    };

    let next = Arc::new(AtomicU64::new(0));
    // The first failure: its case seed, what was wrong, and the bytes it sent.
    type Failure = (u64, String, Vec<u8>);
    let failure: Arc<Mutex<Option<Failure>>> = Arc::new(Mutex::new(None));
    let started = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (next, failure, addr) = (next.clone(), failure.clone(), addr.clone());
            std::thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= iters || failure.lock().unwrap().is_some() {
                        break;
                    }
                    let case_seed = seed.wrapping_add(i);
                    let case = Case::generate(case_seed, limit);
                    if let Err(e) = run_case(&addr, &case) {
                        let mut f = failure.lock().unwrap();
                        if f.is_none() {
                            *f = Some((case_seed, e, case.wire()));
                        }
                        break;
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("fuzz worker panicked");
    }
    stop.store(true, Ordering::Relaxed);
    let good = good.join().expect("good client panicked");
    let elapsed = started.elapsed();

    if let Some((case_seed, e, wire)) = failure.lock().unwrap().take() {
        let problem = server.problem();
        let small = if problem.is_none() {
            shrink(&addr, &Case::generate(case_seed, limit), &e)
        } else {
            wire.clone()
        };
        panic!(
            "gateway fuzz failed at case seed {case_seed:#x} (replay: PVRUN_FUZZ_SEED={case_seed} \
             PVRUN_FUZZ_ITERS=1): {e}\nserver: {}\nrequest bytes ({} of {}): b\"{}\"\nserver log:\n{}",
            problem.as_deref().unwrap_or("still serving"),
            small.len(),
            wire.len(),
            escaped(&small),
            server.log_text()
        );
    }
    if let Some(p) = server.problem() {
        panic!("{p}\nserver log:\n{}", server.log_text());
    }
    let (calls, worst) = good.unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", server.log_text()));
    assert!(calls > 0, "the good client made no call");
    let seen = SEEN.lock().unwrap().clone();
    eprintln!("gateway fuzz: responses by status and outcome: {seen:?}");
    if iters >= 300 {
        // The traffic reaches every layer: hyper's parser, routing, the budget and calls.
        for status in [200, 400, 404, 405, 413, 422] {
            assert!(
                seen.keys().any(|(s, _)| *s == status),
                "no {status} in {iters} connections: {seen:?}"
            );
        }
    }
    eprintln!(
        "gateway fuzz: {iters} connections in {:.1} s; good client: {calls} calls, slowest {:.0} ms",
        elapsed.as_secs_f64(),
        worst.as_secs_f64() * 1000.0
    );

    // SIGTERM ends it with status 0.
    assert_eq!(
        unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) },
        0
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = server.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "no exit within 20 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        status.code(),
        Some(0),
        "exit after SIGTERM: {status}\n{}",
        server.log_text()
    );
    if let Some(p) = server
        .problem()
        .filter(|p| !p.starts_with("the server exited"))
    {
        panic!("{p}");
    }
}
