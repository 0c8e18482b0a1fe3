//! ELF core files of a crashed or panicked guest, in the layout Linux writes for a
//! process, so that `gdb GUEST CORE` shows its stack (`bt`) and registers.
//!
//! A core file is an `ET_CORE`/`EM_X86_64` ELF with a `PT_NOTE` holding `NT_PRSTATUS`
//! (`struct elf_prstatus`, whose `pr_reg` is the x86-64 `user_regs_struct`) and
//! `NT_PRPSINFO` (the program name), and one `PT_LOAD` per run of guest pages that hold
//! anything: pages that are all zero (never written) are left out, which bounds the size by
//! what the guest touched. Guest memory is read through the memory map's checked accessors,
//! region by region, like every other host access to it.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use pvrun_abi::perm;

use crate::layout::PAGE_SIZE;
use crate::memory::{MemoryMap, UserMemory};
use crate::runtime::backtrace::{Crash, Registers};

const ET_CORE: u16 = 4;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const NT_PRSTATUS: u32 = 1;
const NT_PRPSINFO: u32 = 3;
/// `sizeof(struct elf_prstatus)` on x86-64.
const PRSTATUS_SIZE: usize = 336;
/// `sizeof(struct elf_prpsinfo)` on x86-64.
const PRPSINFO_SIZE: usize = 136;
/// Fewer than `PN_XNUM` program headers, so `e_phnum` holds the count.
const MAX_SEGMENTS: usize = 60_000;

/// One run of guest pages to dump.
struct Run {
    start: u64,
    len: u64,
    flags: u32,
}

/// `user_regs_struct` in Linux's order.
fn user_regs(r: &Registers) -> [u64; 27] {
    [
        r.r15,
        r.r14,
        r.r13,
        r.r12,
        r.rbp,
        r.rbx,
        r.r11,
        r.r10,
        r.r9,
        r.r8,
        r.rax,
        r.rcx,
        r.rdx,
        r.rsi,
        r.rdi,
        u64::MAX, // orig_rax: not in a system call
        r.rip,
        r.cs,
        r.rflags,
        r.rsp,
        r.ss,
        r.fs_base,
        r.gs_base,
        r.ds,
        r.es,
        r.fs,
        r.gs,
    ]
}

fn note(out: &mut Vec<u8>, ty: u32, desc: &[u8]) {
    out.extend_from_slice(&5u32.to_le_bytes());
    out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(b"CORE\0\0\0\0");
    out.extend_from_slice(desc);
    out.resize(out.len().next_multiple_of(4), 0);
}

fn prstatus(crash: &Crash, pid: u32) -> Vec<u8> {
    let mut d = vec![0u8; PRSTATUS_SIZE];
    let sig = crash.kind.signal();
    d[0..4].copy_from_slice(&sig.to_le_bytes()); // pr_info.si_signo
    d[12..14].copy_from_slice(&(sig as u16).to_le_bytes()); // pr_cursig
    d[32..36].copy_from_slice(&pid.to_le_bytes()); // pr_pid
    for (i, v) in user_regs(&crash.regs).iter().enumerate() {
        d[112 + 8 * i..120 + 8 * i].copy_from_slice(&v.to_le_bytes());
    }
    d
}

fn prpsinfo(name: &str, pid: u32) -> Vec<u8> {
    let mut d = vec![0u8; PRPSINFO_SIZE];
    d[1] = b'R'; // pr_sname
    d[24..28].copy_from_slice(&pid.to_le_bytes());
    let n = name.as_bytes();
    let f = n.len().min(15);
    d[40..40 + f].copy_from_slice(&n[..f]); // pr_fname
    let a = n.len().min(79);
    d[56..56 + a].copy_from_slice(&n[..a]); // pr_psargs
    d
}

/// The runs of non-zero pages of the guest's user regions.
fn runs(mem: &impl UserMemory, map: &MemoryMap) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for r in map.user_regions() {
        if r.perm & perm::R == 0 {
            continue;
        }
        let mut flags = 4; // PF_R
        if r.perm & perm::W != 0 {
            flags |= 2;
        }
        if r.perm & perm::X != 0 {
            flags |= 1;
        }
        let mut a = r.start;
        while a < r.end {
            let nonzero = map
                .check_user(a, PAGE_SIZE, false)
                .ok()
                .and_then(|range| mem.read_user(&range, &mut page).ok())
                .is_some_and(|()| page.iter().any(|&b| b != 0));
            if nonzero {
                let full = out.len() >= MAX_SEGMENTS;
                match out.last_mut() {
                    Some(last) if last.start + last.len == a && last.flags == flags => {
                        last.len += PAGE_SIZE
                    }
                    _ if full => return out,
                    _ => out.push(Run {
                        start: a,
                        len: PAGE_SIZE,
                        flags,
                    }),
                }
            }
            a += PAGE_SIZE;
        }
    }
    out
}

/// Where a core dump asked for at `path` goes: `path` itself, or `core.NAME.PID` in it
/// when it is a directory.
pub fn core_path(path: &Path, name: &str) -> PathBuf {
    if path.is_dir() {
        path.join(format!("core.{name}.{}", std::process::id()))
    } else {
        path.to_path_buf()
    }
}

/// Writes the core file of `crash` to `path` (see [`core_path`]); an existing file is
/// replaced only with `overwrite`. Returns the path written.
pub fn write(
    path: &Path,
    overwrite: bool,
    name: &str,
    crash: &Crash,
    mem: &impl UserMemory,
    map: &MemoryMap,
) -> io::Result<PathBuf> {
    let path = core_path(path, name);
    let pid = std::process::id();
    let runs = runs(mem, map);
    let mut notes = Vec::new();
    note(&mut notes, NT_PRSTATUS, &prstatus(crash, pid));
    note(&mut notes, NT_PRPSINFO, &prpsinfo(name, pid));

    let phnum = 1 + runs.len();
    let notes_off = 64 + 56 * phnum as u64;
    let mut off = (notes_off + notes.len() as u64).next_multiple_of(PAGE_SIZE);
    let mut head = Vec::with_capacity(notes_off as usize);
    head.extend_from_slice(b"\x7fELF");
    head.extend_from_slice(&[2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    head.extend_from_slice(&ET_CORE.to_le_bytes());
    head.extend_from_slice(&EM_X86_64.to_le_bytes());
    head.extend_from_slice(&1u32.to_le_bytes()); // e_version
    head.extend_from_slice(&0u64.to_le_bytes()); // e_entry
    head.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    head.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    head.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    head.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    head.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    head.extend_from_slice(&(phnum as u16).to_le_bytes());
    head.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    head.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    head.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    let mut ph = |ty: u32, flags: u32, off: u64, vaddr: u64, size: u64, align: u64| {
        head.extend_from_slice(&ty.to_le_bytes());
        head.extend_from_slice(&flags.to_le_bytes());
        head.extend_from_slice(&off.to_le_bytes());
        head.extend_from_slice(&vaddr.to_le_bytes());
        head.extend_from_slice(&0u64.to_le_bytes()); // p_paddr
        head.extend_from_slice(&size.to_le_bytes());
        head.extend_from_slice(&size.to_le_bytes());
        head.extend_from_slice(&align.to_le_bytes());
    };
    ph(PT_NOTE, 0, notes_off, 0, notes.len() as u64, 4);
    for r in &runs {
        ph(PT_LOAD, r.flags, off, r.start, r.len, PAGE_SIZE);
        off += r.len;
    }

    let file = File::options()
        .write(true)
        .create_new(!overwrite)
        .create(overwrite)
        .truncate(overwrite)
        .open(&path)?;
    let result = (|| {
        let mut w = BufWriter::with_capacity(1 << 16, &file);
        w.write_all(&head)?;
        w.write_all(&notes)?;
        let pad = (notes_off + notes.len() as u64).next_multiple_of(PAGE_SIZE)
            - (notes_off + notes.len() as u64);
        w.write_all(&vec![0u8; pad as usize])?;
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for r in &runs {
            let mut a = r.start;
            while a < r.start + r.len {
                let ok = map
                    .check_user(a, PAGE_SIZE, false)
                    .ok()
                    .and_then(|range| mem.read_user(&range, &mut page).ok());
                if ok.is_none() {
                    page.fill(0);
                }
                w.write_all(&page)?;
                a += PAGE_SIZE;
            }
        }
        w.flush()
    })();
    if let Err(e) = result {
        drop(file);
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}
