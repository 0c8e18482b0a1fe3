//! Snapshot files (`pvrun snapshot`, `Sandbox::from_snapshot_file`, `pvrun serve
//! --snapshot`): a call from a file answers like one from a fresh boot; randomness differs
//! per sandbox and per call; every kind of damaged or tampered file is refused with one
//! line (exit 125 from the command line) and never a panic; two processes share the
//! file's pages; the file is sparse.
//!
//! The tampering cases edit the file as docs/SNAPSHOT.md describes it and recompute its
//! checksums, so they reach the checks behind the checksums.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{guest, pvrun_bin};
use host_vmm::{CallError, Error, HostFn, Sandbox, SandboxConfig, Template};
use sha2::{Digest, Sha256};

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("pvrun-snapfile-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config() -> SandboxConfig {
    let lookup: HostFn = Arc::new(|input: &[u8]| Ok([b"dear ".as_slice(), input].concat()));
    SandboxConfig {
        host_functions: HashMap::from([("lookup".to_string(), lookup)]),
        call_timeout: Some(Duration::from_secs(5)),
        console: Arc::new(Mutex::new(Box::new(std::io::sink()))),
        ..SandboxConfig::default()
    }
}

/// Runs `pvrun snapshot` on guest `name` into `file`; returns its stderr.
fn snapshot_cli(name: &str, file: &Path) -> String {
    let out = Command::new(pvrun_bin())
        .args(["snapshot", "-o"])
        .arg(file)
        .arg(guest(name))
        .output()
        .expect("run pvrun snapshot");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "pvrun snapshot failed: {err}");
    err
}

/// A snapshot file of guest `name` in a temporary directory (removed when the returned
/// guard drops), written by `pvrun snapshot`.
fn snapfile(name: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new(name);
    let file = dir.join(&format!("{name}.snap"));
    let said = snapshot_cli(name, &file);
    assert!(said.starts_with("pvrun: wrote "), "{said}");
    assert_eq!(said.lines().count(), 1, "{said}");
    (dir, file)
}

fn text(r: Result<Vec<u8>, CallError>) -> String {
    String::from_utf8(r.expect("call failed")).unwrap()
}

#[test]
fn a_call_from_a_file_answers_like_one_from_a_fresh_boot() {
    let (_dir, file) = snapfile("functions");
    let mut fresh = Sandbox::new(&guest("functions"), config()).expect("boot (needs /dev/kvm)");
    let template = Template::from_snapshot_file(&file, config()).expect("load the snapshot file");
    assert_eq!(template.mem_size(), 64 << 20);
    let mut a = Sandbox::from_template(&template).unwrap();
    let mut b = Sandbox::from_snapshot_file(&file, config()).unwrap();
    assert_eq!(a.functions(), fresh.functions());
    let data: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8 / 8).collect();
    let calls: [(&str, &[u8]); 6] = [
        ("sha256", b"abc"),
        ("upper", b"Hello, pvrun"),
        (
            "json-transform",
            br#"{"name":"Ada","langs":["rust","c"],"age":36}"#,
        ),
        ("greet-via-host", b"Ada"),
        ("compress", &data),
        ("json-transform", b"{not json"),
    ];
    for round in 0..3 {
        for (name, input) in calls {
            let want = fresh.call(name, input);
            assert_eq!(a.call(name, input), want, "{name}, round {round}");
            assert_eq!(b.call(name, input), want, "{name}, round {round}");
        }
    }
    assert_eq!(
        text(a.call("sha256", b"abc")),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let packed = a.call("compress", &data).unwrap();
    assert_eq!(b.call("decompress", &packed).unwrap(), data);
    // A template loaded from a file can be written out again, and the copy loads too.
    let dir = TempDir::new("again");
    let copy = dir.join("copy.snap");
    template.write_snapshot_file(&copy).unwrap();
    let mut c = Sandbox::from_snapshot_file(&copy, config()).unwrap();
    assert_eq!(text(c.call("upper", b"again")), "AGAIN");
}

#[test]
fn random_bytes_differ_per_sandbox_and_per_call() {
    let (_dir, file) = snapfile("badfunctions");
    let template = Template::from_snapshot_file(&file, config()).unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..3 {
        let mut sb = Sandbox::from_template(&template).unwrap();
        for _ in 0..3 {
            let out = text(sb.call("random", b""));
            let parts: Vec<&str> = out.split(' ').collect();
            assert_eq!(parts.len(), 3, "{out}");
            assert!(
                seen.insert(parts[1].to_string()),
                "fill_bytes repeated: {out}"
            );
            assert!(
                seen.insert(parts[2].to_string()),
                "keystream repeated: {out}"
            );
        }
    }
    // Another template from the same file (as another process would make) repeats none.
    let other = Sandbox::from_snapshot_file(&file, config());
    let out = text(other.unwrap().call("random", b""));
    for part in out.split(' ').skip(1) {
        assert!(
            seen.insert(part.to_string()),
            "repeated across templates: {out}"
        );
    }
}

/// The file's layout, read the way docs/SNAPSHOT.md describes it.
struct Layout {
    meta_offset: usize,
    meta_len: usize,
    data_offset: usize,
    /// Offset (in the file) of the general registers.
    regs: usize,
    /// Offset of the segment selectors.
    selectors: usize,
    /// Offset of the first segment (page_start, page_end, perm).
    segments: usize,
    /// Offset of inbuf, inbuf_len.
    inbuf: usize,
    /// Offset of the exitless mailbox's address.
    mailbox: usize,
    /// Offset of the XSAVE area and its length (0: none).
    xsave: (usize, usize),
    /// (guest address, length) of the stored pages.
    extents: Vec<(u64, u64)>,
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn layout(b: &[u8]) -> Layout {
    let meta_offset = u64_at(b, 24) as usize;
    let meta_len = u64_at(b, 32) as usize;
    let data_offset = u64_at(b, 40) as usize;
    let nseg = u32_at(b, meta_offset + 8) as usize;
    let segments = meta_offset + 12;
    let regs = segments + 20 * nseg;
    let selectors = regs + 18 * 8;
    let fpu = selectors + 12 + 16;
    let xsave_len = fpu + 411;
    let xsave = (xsave_len + 4, u32_at(b, xsave_len) as usize);
    let mut at = xsave_len + 4 + u32_at(b, xsave_len) as usize;
    at += 8; // console consumed
    let inbuf = at;
    at += 16;
    let mailbox = at;
    at += 8;
    let nnames = u32_at(b, at);
    at += 4;
    for _ in 0..nnames {
        at += 4 + u32_at(b, at) as usize;
    }
    at += 32; // tsc, tsc_hz, tsc_at_boot, taken
    let next = u32_at(b, at) as usize;
    at += 4;
    let extents = (0..next)
        .map(|i| (u64_at(b, at + 16 * i), u64_at(b, at + 16 * i + 8)))
        .collect();
    assert_eq!(at + 16 * next, meta_offset + meta_len, "metadata layout");
    Layout {
        meta_offset,
        meta_len,
        data_offset,
        regs,
        selectors,
        segments,
        inbuf,
        mailbox,
        xsave,
        extents,
    }
}

/// Recomputes the header/metadata digest and the pages' CRC after an edit.
fn reseal(b: &mut [u8]) {
    let l = layout(b);
    let mut crc = crc32fast::Hasher::new();
    for &(start, len) in &l.extents {
        let at = l.data_offset + start as usize;
        crc.update(&b[at..at + len as usize]);
    }
    let crc = crc.finalize();
    b[56..60].copy_from_slice(&crc.to_le_bytes());
    let mut h = Sha256::new();
    h.update(&b[..96]);
    h.update(&b[l.meta_offset..l.meta_offset + l.meta_len]);
    let d: [u8; 32] = h.finalize().into();
    b[96..128].copy_from_slice(&d);
}

/// Loads `bytes` as a snapshot file and expects a one-line [`Error::BadSnapshot`]
/// containing `want`.
fn refused(dir: &TempDir, case: &str, bytes: &[u8], want: &str) -> String {
    let path = dir.join(&format!("{case}.snap"));
    std::fs::write(&path, bytes).unwrap();
    let r = Template::from_snapshot_file(&path, config());
    let msg = match r {
        Err(e @ Error::BadSnapshot { .. }) => e.to_string(),
        Err(other) => panic!("{case}: expected BadSnapshot, got {other}"),
        Ok(_) => panic!("{case}: a damaged file was accepted"),
    };
    assert!(!msg.contains('\n'), "{case}: not one line: {msg}");
    assert!(msg.contains(want), "{case}: `{msg}` does not say `{want}`");
    let _ = std::fs::remove_file(&path);
    msg
}

#[test]
fn every_damaged_or_tampered_file_is_refused_with_one_line() {
    let (_shared, good_file) = snapfile("functions");
    let good = std::fs::read(&good_file).unwrap();
    let l = layout(&good);
    let dir = TempDir::new("corrupt");
    // Sanity: the untouched bytes load, and a resealed copy does too.
    let mut same = good.clone();
    reseal(&mut same);
    assert_eq!(same, good, "reseal must reproduce the writer's checksums");

    // Truncated at several points, and extended.
    let first_page = l.data_offset + l.extents[0].0 as usize;
    for cut in [
        0,
        7,
        100,
        4096,
        l.meta_offset + l.meta_len / 2,
        l.data_offset,
        first_page + 10,
        good.len() - 4096,
        good.len() - 1,
    ] {
        refused(&dir, &format!("cut{cut}"), &good[..cut], "truncated");
    }
    let mut long = good.clone();
    long.extend_from_slice(&[0; 4096]);
    refused(&dir, "long", &long, "too long");

    // One flipped byte: header, metadata, a stored page.
    let flip = |at: usize| {
        let mut b = good.clone();
        b[at] ^= 0x20;
        b
    };
    refused(&dir, "magic", &flip(2), "not a pvrun snapshot file");
    refused(
        &dir,
        "hdr-crc",
        &flip(57),
        "checksum of its header and metadata",
    );
    refused(
        &dir,
        "hdr-elf",
        &flip(70),
        "checksum of its header and metadata",
    );
    refused(
        &dir,
        "hdr-digest",
        &flip(100),
        "checksum of its header and metadata",
    );
    refused(&dir, "hdr-size", &flip(19), "");
    for at in [
        l.meta_offset + 3,
        l.regs + 5,
        l.meta_offset + l.meta_len - 1,
    ] {
        refused(
            &dir,
            &format!("meta{at}"),
            &flip(at),
            "checksum of its header and metadata",
        );
    }
    for (start, len) in [l.extents[0], *l.extents.last().unwrap()] {
        let at = l.data_offset + (start + len / 2) as usize;
        refused(
            &dir,
            &format!("page{at}"),
            &flip(at),
            "checksum of its memory pages",
        );
    }

    // Another format version or ABI version, checksums recomputed.
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        reseal(&mut b);
        b
    };
    refused(&dir, "format", &edit(&|b| b[8] = 1), "format version 1");
    refused(&dir, "abi", &edit(&|b| b[12] = 2), "ABI v2");
    refused(&dir, "memsize", &edit(&|b| b[18] ^= 0x10), "truncated");

    // Registers a fresh boot would never produce, checksums recomputed.
    let set64 =
        |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    let rip = l.regs + 16 * 8;
    let rsp = l.regs + 6 * 8;
    let rflags = l.regs + 17 * 8;
    refused(
        &dir,
        "cs-ring0",
        &edit(&|b| b[l.selectors] = 0x08),
        "segment selectors",
    );
    refused(
        &dir,
        "ss-ring0",
        &edit(&|b| b[l.selectors + 2] = 0x10),
        "segment selectors",
    );
    refused(
        &dir,
        "rip-stub",
        &edit(&|b| set64(b, rip, 0x4000)),
        "instruction pointer",
    );
    refused(
        &dir,
        "rip-outside",
        &edit(&|b| set64(b, rip, 1 << 40)),
        "instruction pointer",
    );
    refused(
        &dir,
        "rip-stack",
        &edit(&|b| set64(b, rip, (64 << 20) - 64)),
        "instruction pointer",
    );
    refused(
        &dir,
        "rsp-r0",
        &edit(&|b| set64(b, rsp, 0x6000)),
        "stack pointer",
    );
    refused(
        &dir,
        "rsp-outside",
        &edit(&|b| set64(b, rsp, u64::MAX)),
        "stack pointer",
    );
    refused(
        &dir,
        "rsp-text",
        &edit(&|b| set64(b, rsp, 0x20_2000)),
        "stack pointer",
    );
    refused(&dir, "iopl", &edit(&|b| set64(b, rflags, 0x3002)), "flags");
    refused(&dir, "if", &edit(&|b| set64(b, rflags, 0x202)), "flags");
    refused(&dir, "rax", &edit(&|b| set64(b, l.regs, 5)), "FN_READY");
    refused(
        &dir,
        "fsbase",
        &edit(&|b| set64(b, l.selectors + 12, 1 << 50)),
        "canonical",
    );
    // Vector state KVM refuses: an XSAVE header naming every state component, or an MXCSR
    // with reserved bits.
    if l.xsave.1 == 4096 {
        let bv = l.xsave.0 + 512;
        refused(
            &dir,
            "xstate-bv",
            &edit(&|b| set64(b, bv, u64::MAX)),
            "vCPU state",
        );
        refused(
            &dir,
            "xsave-mxcsr",
            &edit(&|b| b[l.xsave.0 + 27] = 0xff),
            "MXCSR",
        );
    }
    // A writable and executable segment, a segment in the host's area, an input buffer in
    // read-only memory.
    refused(
        &dir,
        "wx",
        &edit(&|b| b[l.segments + 16] = 7),
        "image segment",
    );
    refused(
        &dir,
        "lowseg",
        &edit(&|b| set64(b, l.segments, 0x1000)),
        "image segment",
    );
    refused(
        &dir,
        "inbuf",
        &edit(&|b| set64(b, l.inbuf, 0x1_0000)),
        "input buffer",
    );
    refused(
        &dir,
        "inbuf-len",
        &edit(&|b| set64(b, l.inbuf + 8, 1 << 40)),
        "input buffer",
    );
    // The exitless mailbox (ABI v4): unaligned, in read-only memory, over the input buffer.
    assert_ne!(u64_at(&good, l.mailbox), 0, "the SDK declares a mailbox");
    refused(
        &dir,
        "mailbox-unaligned",
        &edit(&|b| {
            let m = u64_at(b, l.mailbox);
            set64(b, l.mailbox, m + 8)
        }),
        "exitless mailbox",
    );
    refused(
        &dir,
        "mailbox-bootinfo",
        &edit(&|b| set64(b, l.mailbox, 0x1_0000)),
        "exitless mailbox",
    );
    refused(
        &dir,
        "mailbox-inbuf",
        &edit(&|b| {
            let i = u64_at(b, l.inbuf);
            set64(b, l.mailbox, i & !63)
        }),
        "exitless mailbox",
    );
    // Host structures changed (an extra PML4 entry mapping the tables' own memory, a stub
    // rewritten, a descriptor's privilege level): the page checksum is recomputed, the
    // tables are not what this host builds.
    refused(
        &dir,
        "pagetable",
        &edit(&|b| b[l.data_offset + 0x10_0000 + 8] = 0x07),
        "host structures",
    );
    refused(
        &dir,
        "stub",
        &edit(&|b| b[l.data_offset + 0x4000] = 0x90),
        "host structures",
    );
    refused(
        &dir,
        "gdt",
        &edit(&|b| b[l.data_offset + 0x1000 + 0x1d] ^= 0x60),
        "host structures",
    );
    // The extent list: as many bytes as the header says, inside memory.
    refused(&dir, "extent-len", &edit(&|b| b[48] ^= 0x10), "page list");

    // A file anyone may write (and so change running sandboxes' memory) is refused.
    let open = dir.join("open.snap");
    std::fs::write(&open, &good).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    match Template::from_snapshot_file(&open, config()) {
        Err(e) => assert!(e.to_string().contains("writable by every user"), "{e}"),
        Ok(_) => panic!("a world-writable snapshot file was accepted"),
    }
    // A directory, a missing file.
    for p in [dir.0.clone(), dir.join("missing.snap")] {
        let e = Template::from_snapshot_file(&p, config())
            .err()
            .expect("refused");
        assert!(matches!(e, Error::BadSnapshot { .. }), "{e}");
    }

    // From the command line: one `pvrun: error:` line and exit 125.
    let bad = dir.join("bad.snap");
    std::fs::write(&bad, edit(&|b| b[l.selectors] = 0x08)).unwrap();
    let out = Command::new(pvrun_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--snapshot"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("pvrun: error: snapshot file"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn snapshotting_a_guest_that_is_not_a_function_guest_fails_with_one_line() {
    let dir = TempDir::new("notfn");
    let file = dir.join("hello.snap");
    let out = Command::new(pvrun_bin())
        .args(["snapshot", "-o"])
        .arg(&file)
        .arg(guest("hello"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.starts_with("pvrun: error:") && last.contains("not a function guest"),
        "{err}"
    );
    assert!(!file.exists());
}

#[test]
fn the_file_is_sparse() {
    let (_dir, file) = snapfile("functions");
    let st = std::fs::metadata(&file).unwrap();
    let allocated = st.blocks() * 512;
    assert!(st.len() > 64 << 20, "apparent size {}", st.len());
    assert!(
        allocated * 8 < st.len(),
        "{allocated} bytes allocated of {}: untouched pages must be holes",
        st.len()
    );
    // The stored pages are page aligned in the file: the data starts on a page boundary.
    let b = std::fs::read(&file).unwrap();
    assert_eq!(u64_at(&b, 40) % 4096, 0);
}

/// A `pvrun serve --snapshot` process; killed (and reaped) on drop.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(file: &Path) -> Server {
        let mut child = Command::new(pvrun_bin())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--pool",
                "2",
                "--snapshot",
            ])
            .arg(file)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pvrun serve");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut addr = String::new();
        let mut seen = Vec::new();
        while addr.is_empty() && Instant::now() < deadline {
            match lines.next() {
                Some(Ok(l)) => {
                    if let Some(rest) = l.split("http://").nth(1) {
                        addr = rest.split('/').next().unwrap().to_string();
                    }
                    seen.push(l);
                }
                _ => break,
            }
        }
        // Keep draining the log so the server never blocks on it.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        let server = Server { child, addr };
        assert!(
            !server.addr.is_empty(),
            "pvrun serve did not get ready: {seen:?}"
        );
        server
    }

    fn post(&self, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(body).unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).unwrap();
        let split = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let status = std::str::from_utf8(&resp[9..12]).unwrap().parse().unwrap();
        (status, resp[split + 4..].to_vec())
    }

    /// The process's mappings of `file`: (permissions, Shared_Clean KiB) per mapping.
    fn mappings_of(&self, file: &Path) -> Vec<(String, u64)> {
        let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", self.child.id())).unwrap();
        let name = file.canonicalize().unwrap().display().to_string();
        let mut out = Vec::new();
        let mut current: Option<String> = None;
        for line in smaps.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() >= 5 && fields[0].contains('-') && !line.ends_with(" kB") {
                current = (fields.len() >= 6 && fields[5..].join(" ") == name)
                    .then(|| fields[1].to_string());
            } else if let (Some(perms), Some(kb)) = (&current, line.strip_prefix("Shared_Clean:")) {
                let kb = kb.trim().trim_end_matches("kB").trim().parse().unwrap();
                out.push((perms.clone(), kb));
            }
        }
        out
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn two_processes_share_the_file_pages() {
    // Its own copy: the other tests' processes must not count as sharers here.
    let dir = TempDir::new("share");
    let file = dir.join("functions.snap");
    snapshot_cli("functions", &file);
    let a = Server::start(&file);
    let b = Server::start(&file);
    for s in [&a, &b] {
        assert_eq!(s.post("/upper", b"shared"), (200, b"SHARED".to_vec()));
        assert_eq!(s.post("/sha256", b"abc").0, 200);
    }
    for s in [&a, &b] {
        let maps = s.mappings_of(&file);
        assert!(!maps.is_empty(), "the snapshot file is not mapped");
        // Every mapping of the file is private (copy-on-write), never shared-writable.
        for (perms, _) in &maps {
            assert!(
                perms.ends_with('p'),
                "mapping {perms} is not MAP_PRIVATE: {maps:?}"
            );
        }
        // Pages of the file that both processes use are counted as shared (mapped by more
        // than one process): the page cache's copy, not a copy each.
        let shared: u64 = maps.iter().map(|m| m.1).sum();
        assert!(
            shared >= 64,
            "only {shared} KiB of the file shared: {maps:?}"
        );
    }
    // A third process that is gone shares nothing afterwards: drop one, the other still
    // serves from its mapping.
    drop(a);
    assert_eq!(b.post("/upper", b"still"), (200, b"STILL".to_vec()));
}

#[test]
fn sandboxes_from_a_file_reset_and_recover_like_booted_ones() {
    let (_dir, file) = snapfile("badfunctions");
    let template = Template::from_snapshot_file(&file, config()).unwrap();
    let mut sb = Sandbox::from_template(&template).unwrap();
    // The initialisation ran before the snapshot; every call starts from it.
    assert_eq!(text(sb.call("init-state", b"")), "42");
    for _ in 0..3 {
        assert_eq!(text(sb.call("counter", b"")), "1");
    }
    assert_eq!(text(sb.call_keep_state("counter", b"")), "2");
    assert_eq!(text(sb.call_keep_state("counter", b"")), "3");
    assert_eq!(text(sb.call("counter", b"")), "1");
    // Dirtied pages come back from the file's pages.
    sb.call("touch-pages", b"64").unwrap();
    assert!(sb.reset().unwrap() >= 64);
    assert_eq!(text(sb.call("counter", b"")), "1");
    // Vector registers are reset to the file's state.
    let clean = sb.call("xmm-get", b"").unwrap();
    assert_eq!(text(sb.call("xmm-set", b"secret!!")), "set");
    assert_eq!(
        sb.call("xmm-get", b"").unwrap(),
        clean,
        "xmm leaked across a reset"
    );
    // Faults, panics and timeouts end the call, not the sandbox.
    assert!(matches!(sb.call("fault", b""), Err(CallError::Fault(_))));
    assert_eq!(text(sb.call("counter", b"")), "1");
    assert!(matches!(sb.call("panic", b""), Err(CallError::Panic(_))));
    sb.set_call_timeout(Some(Duration::from_millis(200)));
    assert!(matches!(sb.call("spin", b""), Err(CallError::Timeout(_))));
    assert_eq!(text(sb.call("echo", b"alive")), "alive");
    // A second sandbox of the template shares nothing of the first's calls.
    let mut other = Sandbox::from_template(&template).unwrap();
    assert_eq!(text(other.call_keep_state("counter", b"")), "1");
}

/// `pvrun call --snapshot FILE NAME [INPUT|-]`: the one-shot call from a file answers like
/// `pvrun call GUEST NAME` does, a damaged file is one line and 125, and giving a guest ELF
/// as well is a usage error.
#[test]
fn pvrun_call_from_a_snapshot_file_answers_like_one_from_the_elf() {
    let (dir, file) = snapfile("functions");
    let call = |args: &[&str]| {
        let out = Command::new(pvrun_bin())
            .arg("call")
            .args(args)
            .output()
            .expect("run pvrun call");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let f = file.to_str().unwrap();
    let elf = guest("functions");
    let elf = elf.to_str().unwrap();
    let (code, out, err) = call(&["--snapshot", f, "upper", "snapshot me"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "SNAPSHOT ME");
    let (code, from_elf, err) = call(&[elf, "upper", "snapshot me"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, from_elf);
    // stdin input, and a function that is not there.
    let mut child = Command::new(pvrun_bin())
        .args(["call", "--snapshot", f, "sha256", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"abc").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let (code, _, err) = call(&["--snapshot", f, "nope"]);
    assert_eq!(code, Some(125), "{err}");
    assert!(err.contains("exports no function `nope`"), "{err}");
    // A truncated file: one line, 125, nothing on stdout.
    let bytes = std::fs::read(&file).unwrap();
    let bad = dir.join("truncated.snap");
    std::fs::write(&bad, &bytes[..bytes.len() / 3]).unwrap();
    let (code, out, err) = call(&["--snapshot", bad.to_str().unwrap(), "upper", "x"]);
    assert_eq!(code, Some(125), "{err}");
    assert!(out.is_empty());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("pvrun: error: "), "{err}");
    // A guest ELF as well as --snapshot, or no function name: usage errors.
    let (code, _, err) = call(&["--snapshot", f, elf, "upper", "x", "extra"]);
    assert_eq!(code, Some(125), "{err}");
    let (code, _, err) = call(&["--snapshot", f]);
    assert_eq!(code, Some(125), "{err}");
}
