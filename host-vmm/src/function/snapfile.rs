//! Snapshot files: a function guest frozen at `FN_READY`, written once by `pvrun snapshot`
//! and mapped copy-on-write by every sandbox made from it, in any process. The format is
//! specified in `docs/SNAPSHOT.md`; this module writes it ([`write`]) and reads it back
//! ([`load`]) trusting nothing in it beyond what a fresh boot would trust:
//!
//! - the header and metadata are covered by a SHA-256 digest, the stored pages by a
//!   CRC-32 (both only catch damage: anyone who can change the file can recompute them);
//! - the memory map is rebuilt by the host's own code from the segment list, which gets
//!   the ELF loader's checks (aligned, above the host area, W^X, sorted, no overlap);
//! - every host-owned page (GDT, IDT, TSS, exception stubs, ring-0 stack, page tables) must
//!   hold exactly the bytes this host builds for that map;
//! - the system registers are the ones a boot sets, never the file's; RIP, RSP and RFLAGS
//!   are checked (ring-3 code, a writable stack, no IOPL/IF), the vector state by KVM;
//! - the export table gets the `FN_READY` checks.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_xsave};
use pvrun_abi::perm;
use sha2::{Digest, Sha256};

use super::snapshot::{Snapshot, VmShell};
use super::{Exports, HostFn};
use crate::arch::{self, FileVcpu, USER_CS, USER_DS, VcpuState};
use crate::builder::{Plan, memory_map};
use crate::error::Error;
use crate::layout::{
    GUEST_IMAGE_BASE, LARGE_PAGE_SIZE, MAX_MEM_SIZE, MIN_MEM_SIZE, PAGE_SIZE, R0_STACK_BOTTOM,
    R0_STACK_TOP, align_up,
};
use crate::loader::{GuestImage, Segment};
use crate::memory::{MemoryMap, MemorySnapshot};
use crate::vstate::kvm::{cpu_policy, kvm};

/// The file's first eight bytes.
pub const MAGIC: [u8; 8] = *b"PVRUNSNP";
/// The format version this host writes and reads.
pub const FORMAT_VERSION: u32 = 2;
/// Bytes of the fixed header.
const HEADER_LEN: usize = 128;
/// Offset of the digest in the header (it covers the bytes before it and the metadata).
const DIGEST_AT: usize = 96;
/// Where the metadata starts (the header page ends here).
const META_OFFSET: u64 = PAGE_SIZE;
/// Largest metadata accepted.
const META_MAX: u64 = 4 << 20;
/// Largest segment count accepted.
const MAX_SEGMENTS: u32 = 64;
/// Largest export table (as `FN_READY` accepts it).
const EXPORTS_MAX: u64 = 64 * 1024;
/// Size of KVM's XSAVE area.
const XSAVE_LEN: u32 = 4096;

/// What [`write`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotFileInfo {
    /// The file's apparent size (header, metadata, and the whole guest memory).
    pub file_size: u64,
    /// Bytes of guest memory actually stored (the rest are holes).
    pub data_bytes: u64,
    /// Guest memory size.
    pub mem_size: u64,
    /// SHA-256 of the guest ELF, hex.
    pub elf_sha256: String,
}

struct Header {
    format_version: u32,
    abi_version: u32,
    mem_size: u64,
    meta_offset: u64,
    meta_len: u64,
    data_offset: u64,
    data_bytes: u64,
    pages_crc: u32,
    elf_sha256: [u8; 32],
    digest: [u8; 32],
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&self.format_version.to_le_bytes());
        h[12..16].copy_from_slice(&self.abi_version.to_le_bytes());
        h[16..24].copy_from_slice(&self.mem_size.to_le_bytes());
        h[24..32].copy_from_slice(&self.meta_offset.to_le_bytes());
        h[32..40].copy_from_slice(&self.meta_len.to_le_bytes());
        h[40..48].copy_from_slice(&self.data_offset.to_le_bytes());
        h[48..56].copy_from_slice(&self.data_bytes.to_le_bytes());
        h[56..60].copy_from_slice(&self.pages_crc.to_le_bytes());
        h[64..96].copy_from_slice(&self.elf_sha256);
        h[96..128].copy_from_slice(&self.digest);
        h
    }

    fn decode(h: &[u8; HEADER_LEN]) -> Header {
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap_or([0; 8]));
        let mut elf_sha256 = [0u8; 32];
        elf_sha256.copy_from_slice(&h[64..96]);
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&h[96..128]);
        Header {
            format_version: u32_at(8),
            abi_version: u32_at(12),
            mem_size: u64_at(16),
            meta_offset: u64_at(24),
            meta_len: u64_at(32),
            data_offset: u64_at(40),
            data_bytes: u64_at(48),
            pages_crc: u32_at(56),
            elf_sha256,
            digest,
        }
    }
}

/// The SHA-256 that guards header and metadata.
fn digest(header: &[u8; HEADER_LEN], meta: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(&header[..DIGEST_AT]);
    h.update(meta);
    h.finalize().into()
}

/// Little-endian metadata being written.
#[derive(Default)]
struct Out(Vec<u8>);

impl Out {
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
}

/// Metadata being read: every read is bounds-checked and a short read is an error.
struct In<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> In<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| "has metadata that ends early".to_string())?;
        let s = &self.data[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

const GPRS: usize = 18;

fn regs_to_array(r: &kvm_regs) -> [u64; GPRS] {
    [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip, r.rflags,
    ]
}

fn regs_from_array(a: [u64; GPRS]) -> kvm_regs {
    kvm_regs {
        rax: a[0],
        rbx: a[1],
        rcx: a[2],
        rdx: a[3],
        rsi: a[4],
        rdi: a[5],
        rsp: a[6],
        rbp: a[7],
        r8: a[8],
        r9: a[9],
        r10: a[10],
        r11: a[11],
        r12: a[12],
        r13: a[13],
        r14: a[14],
        r15: a[15],
        rip: a[16],
        rflags: a[17],
    }
}

fn put_fpu(o: &mut Out, f: &kvm_fpu) {
    for r in &f.fpr {
        o.bytes(r);
    }
    o.u16(f.fcw);
    o.u16(f.fsw);
    o.0.push(f.ftwx);
    o.u16(f.last_opcode);
    o.u64(f.last_ip);
    o.u64(f.last_dp);
    for r in &f.xmm {
        o.bytes(r);
    }
    o.u32(f.mxcsr);
}

fn get_fpu(i: &mut In<'_>) -> Result<kvm_fpu, String> {
    let mut f = kvm_fpu::default();
    for r in f.fpr.iter_mut() {
        *r = i.array()?;
    }
    f.fcw = i.u16()?;
    f.fsw = i.u16()?;
    f.ftwx = i.u8()?;
    f.last_opcode = i.u16()?;
    f.last_ip = i.u64()?;
    f.last_dp = i.u64()?;
    for r in f.xmm.iter_mut() {
        *r = i.array()?;
    }
    f.mxcsr = i.u32()?;
    Ok(f)
}

/// Everything the metadata holds, decoded but not yet validated.
struct Meta {
    entry: u64,
    segments: Vec<(u64, u64, u32)>,
    regs: kvm_regs,
    selectors: [u16; 6],
    fs_base: u64,
    gs_base: u64,
    fpu: kvm_fpu,
    xsave: Option<Box<kvm_xsave>>,
    console_consumed: u64,
    inbuf: u64,
    inbuf_len: u64,
    mailbox: u64,
    names: Vec<String>,
    guest_tsc: u64,
    tsc_hz: u64,
    tsc_at_boot: u64,
    taken_wall_ns: u64,
    extents: Vec<(u64, u64)>,
}

fn encode_meta(snap: &Snapshot, extents: &[(u64, u64)], taken_wall_ns: u64) -> Vec<u8> {
    let mut o = Out::default();
    o.u64(snap.image.entry);
    o.u32(snap.image.segments.len() as u32);
    for s in &snap.image.segments {
        o.u64(s.page_start);
        o.u64(s.page_end);
        o.u32(s.perm);
    }
    for v in regs_to_array(&snap.vcpu.regs) {
        o.u64(v);
    }
    let sr = &snap.vcpu.sregs;
    for sel in [sr.cs, sr.ss, sr.ds, sr.es, sr.fs, sr.gs] {
        o.u16(sel.selector);
    }
    o.u64(sr.fs.base);
    o.u64(sr.gs.base);
    put_fpu(&mut o, &snap.vcpu.fpu);
    match &snap.vcpu.xsave {
        Some(x) => {
            o.u32(XSAVE_LEN);
            for w in x.region {
                o.u32(w);
            }
        }
        None => o.u32(0),
    }
    o.u64(snap.console_consumed);
    o.u64(snap.exports.inbuf);
    o.u64(snap.exports.inbuf_len);
    o.u64(snap.exports.mailbox);
    o.u32(snap.exports.names.len() as u32);
    for n in &snap.exports.names {
        o.u32(n.len() as u32);
        o.bytes(n.as_bytes());
    }
    o.u64(snap.guest_tsc);
    o.u64(snap.tsc_hz);
    o.u64(snap.tsc_at_boot);
    o.u64(taken_wall_ns);
    o.u32(extents.len() as u32);
    for &(start, len) in extents {
        o.u64(start);
        o.u64(len);
    }
    o.0
}

fn decode_meta(data: &[u8]) -> Result<Meta, String> {
    let mut i = In { data, at: 0 };
    let entry = i.u64()?;
    let nseg = i.u32()?;
    if nseg == 0 || nseg > MAX_SEGMENTS {
        return Err(format!(
            "lists {nseg} image segments (1 to {MAX_SEGMENTS} are valid)"
        ));
    }
    let mut segments = Vec::new();
    for _ in 0..nseg {
        segments.push((i.u64()?, i.u64()?, i.u32()?));
    }
    let mut gprs = [0u64; GPRS];
    for g in gprs.iter_mut() {
        *g = i.u64()?;
    }
    let mut selectors = [0u16; 6];
    for s in selectors.iter_mut() {
        *s = i.u16()?;
    }
    let fs_base = i.u64()?;
    let gs_base = i.u64()?;
    let fpu = get_fpu(&mut i)?;
    let xsave = match i.u32()? {
        0 => None,
        XSAVE_LEN => {
            let mut x = Box::<kvm_xsave>::default();
            for w in x.region.iter_mut() {
                *w = i.u32()?;
            }
            Some(x)
        }
        n => return Err(format!("has an XSAVE area of {n} bytes (0 or {XSAVE_LEN})")),
    };
    let console_consumed = i.u64()?;
    let inbuf = i.u64()?;
    let inbuf_len = i.u64()?;
    let mailbox = i.u64()?;
    let nnames = i.u32()?;
    let mut names = Vec::new();
    let mut table = 0u64;
    for _ in 0..nnames {
        let len = i.u32()?;
        table += u64::from(len) + 1;
        if table > EXPORTS_MAX {
            return Err(format!(
                "has an export table larger than {EXPORTS_MAX} bytes"
            ));
        }
        let raw = i.take(len as usize)?;
        if raw.is_empty() || raw.contains(&0) {
            return Err("has an empty export name or one with a NUL byte".into());
        }
        let name = std::str::from_utf8(raw)
            .map_err(|_| "has an export name that is not UTF-8".to_string())?;
        names.push(name.to_string());
    }
    let guest_tsc = i.u64()?;
    let tsc_hz = i.u64()?;
    let tsc_at_boot = i.u64()?;
    let taken_wall_ns = i.u64()?;
    let next = i.u32()?;
    // Each extent is at least a page: no more than the bytes left can describe.
    if next as usize > (data.len() - i.at) / 16 {
        return Err("has metadata that ends early".into());
    }
    let mut extents = Vec::with_capacity(next as usize);
    for _ in 0..next {
        extents.push((i.u64()?, i.u64()?));
    }
    if i.at != data.len() {
        return Err(format!(
            "has {} unexpected bytes after its metadata",
            data.len() - i.at
        ));
    }
    Ok(Meta {
        entry,
        segments,
        regs: regs_from_array(gprs),
        selectors,
        fs_base,
        gs_base,
        fpu,
        xsave,
        console_consumed,
        inbuf,
        inbuf_len,
        mailbox,
        names,
        guest_tsc,
        tsc_hz,
        tsc_at_boot,
        taken_wall_ns,
        extents,
    })
}

/// The stored extents of `mem`: runs of pages that hold a non-zero byte, minus the null
/// page and the ring-0 stack (scratch space with nothing to keep; a fresh boot zeroes it).
fn extents(mem: &MemorySnapshot) -> Vec<(u64, u64)> {
    let bytes = mem.bytes();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (first, end) in mem.data_ranges() {
        let mut page = first;
        while page < end {
            let skip = page < PAGE_SIZE || (R0_STACK_BOTTOM..R0_STACK_TOP).contains(&page);
            let data = &bytes[page as usize..(page + PAGE_SIZE) as usize];
            if !skip && data.iter().any(|&b| b != 0) {
                match out.last_mut() {
                    Some((s, l)) if *s + *l == page => *l += PAGE_SIZE,
                    _ => out.push((page, PAGE_SIZE)),
                }
            }
            page += PAGE_SIZE;
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes `snap` to `path` (through a temporary file in the same directory and a rename,
/// so a reader never sees half a file). Pages are written at their offsets; untouched
/// pages stay holes.
pub(crate) fn write(snap: &Snapshot, path: &Path) -> Result<SnapshotFileInfo, Error> {
    let io = |e: std::io::Error| Error::Config(format!("cannot write `{}`: {e}", path.display()));
    let elf_sha256: [u8; 32] = match snap.elf_sha256 {
        Some(d) => d,
        None => Sha256::digest(snap.image.file()).into(),
    };
    let mem = &snap.memory;
    let extents = extents(mem);
    let mut crc = crc32fast::Hasher::new();
    let mut data_bytes = 0;
    for &(start, len) in &extents {
        crc.update(&mem.bytes()[start as usize..(start + len) as usize]);
        data_bytes += len;
    }
    let taken_wall = SystemTime::now()
        .checked_sub(snap.taken.elapsed())
        .unwrap_or_else(SystemTime::now)
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let meta = encode_meta(snap, &extents, taken_wall);
    let data_offset = align_up(META_OFFSET + meta.len() as u64, PAGE_SIZE).unwrap_or(u64::MAX);
    let mut header = Header {
        format_version: FORMAT_VERSION,
        abi_version: pvrun_abi::ABI_VERSION,
        mem_size: mem.size(),
        meta_offset: META_OFFSET,
        meta_len: meta.len() as u64,
        data_offset,
        data_bytes,
        pages_crc: crc.finalize(),
        elf_sha256,
        digest: [0; 32],
    };
    header.digest = digest(&header.encode(), &meta);

    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let name = path
        .file_name()
        .ok_or_else(|| Error::Config(format!("`{}` is not a file name", path.display())))?;
    let tmp: PathBuf = dir.unwrap_or(Path::new(".")).join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&header.encode())?;
        f.write_all_at(&meta, META_OFFSET)?;
        for &(start, len) in &extents {
            f.write_all_at(
                &mem.bytes()[start as usize..(start + len) as usize],
                data_offset + start,
            )?;
        }
        f.set_len(data_offset + mem.size())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(SnapshotFileInfo {
        file_size: data_offset + mem.size(),
        data_bytes,
        mem_size: mem.size(),
        elf_sha256: hex(&elf_sha256),
    })
}

/// A snapshot file that passed every check except the ones KVM makes.
struct Checked {
    header: Header,
    meta: Meta,
    image: GuestImage,
    map: MemoryMap,
    cr3: u64,
    file: File,
}

/// Reads and checks a snapshot file: everything but the vCPU state KVM checks on load.
/// `sized` is called with the memory size as soon as the header has been checked (so the
/// caller can create the VM while the rest is checked).
fn check(path: &Path, sized: impl FnOnce(u64)) -> Result<Checked, Error> {
    let shown = path.display().to_string();
    let bad = |reason: String| Error::BadSnapshot {
        path: shown.clone(),
        reason,
    };
    let again = "make it again with `pvrun snapshot`";
    let file = File::open(path).map_err(|e| bad(format!("cannot be opened: {e}")))?;
    let st = file
        .metadata()
        .map_err(|e| bad(format!("cannot be read: {e}")))?;
    if !st.is_file() {
        return Err(bad("is not a regular file".into()));
    }
    // Sandboxes map the file: whoever may write it may change their memory (see
    // docs/SNAPSHOT.md, "Sharing").
    if std::os::unix::fs::PermissionsExt::mode(&st.permissions()) & 0o002 != 0 {
        return Err(bad(
            "is writable by every user, who could then change the memory of running sandboxes; `chmod o-w` it".into(),
        ));
    }
    let len = st.len();
    let mut raw = [0u8; HEADER_LEN];
    if len < HEADER_LEN as u64 {
        return Err(bad(format!(
            "is truncated ({len} bytes, shorter than its header); {again}"
        )));
    }
    file.read_exact_at(&mut raw, 0)
        .map_err(|e| bad(format!("cannot be read: {e}")))?;
    if raw[..8] != MAGIC {
        return Err(bad(
            "is not a pvrun snapshot file (bad magic); make one with `pvrun snapshot GUEST -o FILE`"
                .into(),
        ));
    }
    let h = Header::decode(&raw);
    if h.format_version != FORMAT_VERSION {
        return Err(bad(format!(
            "has format version {}, but this pvrun reads version {FORMAT_VERSION}; {again}",
            h.format_version
        )));
    }
    if h.abi_version != pvrun_abi::ABI_VERSION {
        return Err(bad(format!(
            "holds a guest of pvrun ABI v{}, but this host speaks v{}; rebuild the guest and {again}",
            h.abi_version,
            pvrun_abi::ABI_VERSION
        )));
    }
    let layout_ok = h.meta_offset >= HEADER_LEN as u64
        && h.meta_len <= META_MAX
        && h.data_offset.is_multiple_of(PAGE_SIZE)
        && h.meta_offset
            .checked_add(h.meta_len)
            .is_some_and(|e| e <= h.data_offset);
    if !layout_ok {
        return Err(bad(format!(
            "is corrupt (its header's layout is impossible); {again}"
        )));
    }
    let expected = h.data_offset.saturating_add(h.mem_size);
    if len != expected {
        let what = if len < expected {
            "truncated"
        } else {
            "too long"
        };
        return Err(bad(format!(
            "is {what}: {len} bytes, but its header says {expected}; {again}"
        )));
    }
    if !(MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&h.mem_size)
        || !h.mem_size.is_multiple_of(LARGE_PAGE_SIZE)
    {
        return Err(bad(format!(
            "has an impossible memory size ({} bytes); {again}",
            h.mem_size
        )));
    }
    sized(h.mem_size);
    let mut meta_raw = vec![0u8; h.meta_len as usize];
    file.read_exact_at(&mut meta_raw, h.meta_offset)
        .map_err(|e| bad(format!("cannot be read: {e}")))?;
    if digest(&raw, &meta_raw) != h.digest {
        return Err(bad(format!(
            "is corrupt: the checksum of its header and metadata does not match; {again}"
        )));
    }
    // From here on the metadata is what the writer wrote; it is still checked like
    // anything else that could come from a guest or another program.
    let meta = decode_meta(&meta_raw).map_err(|r| bad(format!("{r}; {again}")))?;
    let mem_size = h.mem_size;

    // The image layout, with the ELF loader's checks, then the memory map as a boot plans it.
    let mut segments = Vec::new();
    let mut prev_end = 0;
    for &(start, end, p) in &meta.segments {
        let ok = start.is_multiple_of(PAGE_SIZE)
            && end.is_multiple_of(PAGE_SIZE)
            && end > start
            && start >= GUEST_IMAGE_BASE
            && start >= prev_end
            && p & perm::R != 0
            && p & !(perm::R | perm::W | perm::X) == 0
            && !(p & perm::W != 0 && p & perm::X != 0);
        if !ok {
            return Err(bad(format!(
                "has an invalid image segment {start:#x}..{end:#x} (perm {p:#x}); {again}"
            )));
        }
        prev_end = end;
        segments.push(Segment {
            vaddr: start,
            offset: 0,
            filesz: 0,
            memsz: end - start,
            page_start: start,
            page_end: end,
            perm: p,
        });
    }
    if !segments
        .iter()
        .any(|s| s.perm & perm::X != 0 && (s.page_start..s.page_end).contains(&meta.entry))
    {
        return Err(bad(format!(
            "has an entry point outside executable memory; {again}"
        )));
    }
    let image = GuestImage::from_layout(shown.clone(), meta.entry, segments);
    let plan =
        Plan::new(image.image_end(), mem_size).map_err(|e| bad(format!("is invalid: {e}")))?;
    let map = memory_map(&image, &plan, 0).map_err(|e| bad(format!("is invalid: {e}")))?;

    // Registers: only what a ring-3 guest can reach, as the boot left them.
    let r = &meta.regs;
    let user_ds = USER_DS.0;
    let [cs, ss, ds, es, fs, gs] = meta.selectors;
    if cs != USER_CS || ss != user_ds || [ds, es, fs, gs].iter().any(|&s| s != user_ds && s != 0) {
        return Err(bad(format!(
            "has segment selectors other than ring 3's (cs {cs:#x}, ss {ss:#x}); {again}"
        )));
    }
    let executable = |a: u64| {
        map.find(a)
            .is_some_and(|reg| reg.user && reg.perm & perm::X != 0)
    };
    if r.rip == 0 || !executable(r.rip) || !executable(r.rip - 1) {
        return Err(bad(format!(
            "has an instruction pointer ({:#x}) outside the guest's executable memory; {again}",
            r.rip
        )));
    }
    let stack_ok = r
        .rsp
        .checked_sub(8)
        .is_some_and(|a| map.check_user(a, 8, true).is_ok());
    if !stack_ok {
        return Err(bad(format!(
            "has a stack pointer ({:#x}) outside the guest's writable memory; {again}",
            r.rsp
        )));
    }
    // Arithmetic flags, TF, DF, RF, AC, ID and the reserved one; never IF, IOPL, NT, VM.
    const RFLAGS_ALLOWED: u64 = 0x1
        | 0x2
        | 0x4
        | 0x10
        | 0x40
        | 0x80
        | 0x100
        | 0x400
        | 0x800
        | 0x1_0000
        | 0x4_0000
        | 0x20_0000;
    if r.rflags & !RFLAGS_ALLOWED != 0 || r.rflags & 0x2 == 0 {
        return Err(bad(format!(
            "has flags ({:#x}) a ring-3 guest cannot have (interrupts, I/O privilege); {again}",
            r.rflags
        )));
    }
    if r.rax != 0 {
        return Err(bad(format!(
            "was not taken at FN_READY (rax is not 0); {again}"
        )));
    }
    let canonical = |v: u64| ((v as i64) << 16 >> 16) as u64 == v;
    if !canonical(meta.fs_base) || !canonical(meta.gs_base) {
        return Err(bad(format!("has a non-canonical FS or GS base; {again}")));
    }
    let xsave_mxcsr = meta.xsave.as_ref().map(|x| x.region[6]).unwrap_or(0);
    if (meta.fpu.mxcsr | xsave_mxcsr) & !0xffff != 0 {
        return Err(bad(format!("has reserved MXCSR bits set; {again}")));
    }
    if !(1_000_000..=100_000_000_000).contains(&meta.tsc_hz) {
        return Err(bad(format!(
            "has an impossible TSC frequency ({} Hz); {again}",
            meta.tsc_hz
        )));
    }
    // The export table, as FN_READY checks it.
    if meta.inbuf_len < size_of::<pvrun_abi::FnCall>() as u64
        || !meta.inbuf.is_multiple_of(8)
        || map.check_user(meta.inbuf, meta.inbuf_len, true).is_err()
    {
        return Err(bad(format!(
            "has an input buffer outside the guest's writable memory; {again}"
        )));
    }
    // The exitless mailbox, as FN_MAILBOX and FN_READY check it.
    if meta.mailbox != 0 {
        let size = pvrun_abi::mailbox::SIZE;
        let apart = meta
            .mailbox
            .checked_add(size)
            .is_some_and(|e| e <= meta.inbuf)
            || meta.inbuf + meta.inbuf_len <= meta.mailbox;
        if !meta.mailbox.is_multiple_of(pvrun_abi::mailbox::ALIGN)
            || map.check_user(meta.mailbox, size, true).is_err()
            || !apart
        {
            return Err(bad(format!(
                "has an exitless mailbox outside the guest's writable memory; {again}"
            )));
        }
    }

    // Stored pages: sorted, aligned, inside memory, as many bytes as the header says, and
    // their CRC.
    let mut total = 0u64;
    let mut prev = 0u64;
    for &(start, l) in &meta.extents {
        let ok = start.is_multiple_of(PAGE_SIZE)
            && l.is_multiple_of(PAGE_SIZE)
            && l > 0
            && start >= prev
            && start.checked_add(l).is_some_and(|e| e <= mem_size);
        if !ok {
            return Err(bad(format!(
                "lists an invalid page range {start:#x}+{l:#x}; {again}"
            )));
        }
        prev = start + l;
        total += l;
    }
    if total != h.data_bytes {
        return Err(bad(format!(
            "is corrupt: its page list holds {total} bytes, its header says {}; {again}",
            h.data_bytes
        )));
    }
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    for &(start, l) in &meta.extents {
        let mut done = 0;
        while done < l {
            let n = (l - done).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], h.data_offset + start + done)
                .map_err(|e| bad(format!("cannot be read: {e}")))?;
            crc.update(&buf[..n]);
            done += n as u64;
        }
    }
    if crc.finalize() != h.pages_crc {
        return Err(bad(format!(
            "is corrupt: the checksum of its memory pages does not match; {again}"
        )));
    }

    // Host-owned pages: exactly what this host builds for that memory map.
    let (cr3, pages) = arch::host_pages(&map)?;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for (gpa, want) in &pages {
        file.read_exact_at(&mut page, h.data_offset + gpa)
            .map_err(|e| bad(format!("cannot be read: {e}")))?;
        if &page != want {
            return Err(bad(format!(
                "holds host structures (descriptor tables, stubs or page tables at {gpa:#x}) other than the ones this pvrun builds; {again}"
            )));
        }
    }
    Ok(Checked {
        header: h,
        meta,
        image,
        map,
        cr3,
        file,
    })
}

/// Loads a snapshot file into a new [`Snapshot`] and the VM it was first loaded into
/// (kept for the first sandbox). KVM accepted its vCPU state there; the snapshot keeps
/// what KVM then reports, so resets load exactly that.
pub(crate) fn load(
    path: &Path,
    host_functions: Arc<HashMap<String, HostFn>>,
    max_output: u64,
) -> Result<(Snapshot, VmShell), Error> {
    // KVM's VM creation (and, first in a process, its CPUID probe) is most of the cost:
    // do it on another thread while the file is checked.
    let mut pending = None;
    let c = check(path, |mem| {
        pending = std::thread::Builder::new()
            .name("pvrun-vm".into())
            .spawn(move || VmShell::new(mem))
            .ok();
    })?;
    let shown = path.display().to_string();
    let bad = |reason: String| Error::BadSnapshot {
        path: shown.clone(),
        reason,
    };
    let mem_size = c.header.mem_size;
    let shell = match pending {
        Some(t) => t
            .join()
            .map_err(|_| Error::Layout("the VM creation thread panicked".into()))??,
        None => VmShell::new(mem_size)?,
    };
    let host_hz = shell.vcpu.tsc_hz()?;
    // The guest's clocks assume the TSC rate in its boot info.
    if host_hz.abs_diff(c.meta.tsc_hz) > c.meta.tsc_hz / 1000 {
        return Err(bad(format!(
            "was made on a host whose TSC runs at {} kHz, but this one runs at {} kHz; make it again on this host",
            c.meta.tsc_hz / 1000,
            host_hz / 1000
        )));
    }
    let policy = cpu_policy(kvm()?)?;
    let file_vcpu = FileVcpu {
        regs: c.meta.regs,
        fs_base: c.meta.fs_base,
        gs_base: c.meta.gs_base,
        fpu: c.meta.fpu,
        xsave: c.meta.xsave,
    };
    policy
        .setup
        .load_file_state(shell.vcpu.fd(), c.cr3, &file_vcpu)
        .map_err(|e| bad(format!("has a vCPU state this host refuses ({e})")))?;
    let vcpu = VcpuState::capture(shell.vcpu.fd())?;
    let memory = MemorySnapshot::from_file(c.file, c.header.data_offset, mem_size)?;
    // The byte before RIP must be FN_READY's one-byte `out dx, al`, as when a snapshot is
    // taken.
    if memory.bytes().get(vcpu.regs.rip as usize - 1) != Some(&0xee) {
        return Err(bad(
            "was not taken at FN_READY (no `out` before its instruction pointer); make it again with `pvrun snapshot`".into(),
        ));
    }
    let now_wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let age = Duration::from_nanos(now_wall.saturating_sub(c.meta.taken_wall_ns));
    let taken = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
    Ok((
        Snapshot {
            memory,
            image: Arc::new(c.image),
            map: c.map,
            vcpu,
            console_consumed: c.meta.console_consumed,
            exports: Exports {
                names: c.meta.names,
                inbuf: c.meta.inbuf,
                inbuf_len: c.meta.inbuf_len,
                mailbox: c.meta.mailbox,
            },
            guest_tsc: c.meta.guest_tsc,
            tsc_hz: c.meta.tsc_hz,
            tsc_at_boot: c.meta.tsc_at_boot,
            taken,
            host_functions,
            max_output,
            elf_sha256: Some(c.header.elf_sha256),
        },
        shell,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_the_digest_covers_it() {
        let h = Header {
            format_version: 1,
            abi_version: 3,
            mem_size: 64 << 20,
            meta_offset: 4096,
            meta_len: 900,
            data_offset: 8192,
            data_bytes: 4096 * 7,
            pages_crc: 0xdead_beef,
            elf_sha256: [7; 32],
            digest: [9; 32],
        };
        let e = h.encode();
        let d = Header::decode(&e);
        assert_eq!(d.encode(), e);
        assert_eq!(&e[..8], b"PVRUNSNP");
        let mut other = e;
        other[20] ^= 1;
        assert_ne!(digest(&e, b"meta"), digest(&other, b"meta"));
        assert_ne!(digest(&e, b"meta"), digest(&e, b"metb"));
        // The digest field itself is not hashed.
        let mut same = e;
        same[100] ^= 1;
        assert_eq!(digest(&e, b"m"), digest(&same, b"m"));
    }

    #[test]
    fn short_metadata_is_an_error_not_a_panic() {
        for n in [0, 3, 8, 12, 40, 200, 1000] {
            let data = vec![1u8; n];
            assert!(decode_meta(&data).is_err(), "{n} bytes");
        }
    }
}
