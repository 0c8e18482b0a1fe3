//! The guest's state at a crash or panic ([`Crash`]): its registers, and its call stack as
//! return addresses found by walking the frame-pointer chain (guest builds force frame
//! pointers: `rbp -> [saved rbp, return address]`).
//!
//! The walk reads guest memory only through the memory map's check
//! ([`MemoryMap::check_user`]) and [`UserMemory::read_user`], so a guest cannot make the host
//! read its own structures; a corrupt chain (unaligned, outside guest memory, not growing
//! toward the stack top, a loop, too deep, a return address outside guest code) ends the walk
//! with a note, never the host. Addresses are symbolized only when a report is printed
//! ([`Backtrace::render`]).

use std::fmt::Write;

use pvrun_abi::perm;

use crate::loader::GuestImage;
use crate::memory::{MemoryMap, UserMemory};

/// The most frames a walk collects.
pub const MAX_FRAMES: usize = 64;

/// The guest's general registers at a crash, as the guest had them (for an exception: the
/// faulting instruction's RIP, RSP and RFLAGS, not the host stub's). The ring-0 stub that
/// reports an exception loads the exception port into `dx`, so the low 16 bits of `rdx`
/// are the stub's at an exception.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Registers {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub rsp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
    pub cs: u64,
    pub ss: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
    pub fs_base: u64,
    pub gs_base: u64,
}

impl Registers {
    /// From the vCPU's registers (RIP/RSP/RFLAGS/CS/SS are patched by the caller for an
    /// exception).
    pub(crate) fn from_kvm(r: &kvm_bindings::kvm_regs, s: &kvm_bindings::kvm_sregs) -> Self {
        Registers {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rbp: r.rbp,
            rsp: r.rsp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
            cs: s.cs.selector as u64,
            ss: s.ss.selector as u64,
            ds: s.ds.selector as u64,
            es: s.es.selector as u64,
            fs: s.fs.selector as u64,
            gs: s.gs.selector as u64,
            fs_base: s.fs.base,
            gs_base: s.gs.base,
        }
    }
}

/// What the guest was stopped by, for a core file's signal number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashKind {
    /// A CPU exception with this vector.
    Exception(u64),
    /// A panic or abort (the `ABORT` hypercall).
    Abort,
    /// The host stopped the guest on request: it got this signal (SIGQUIT asks for the
    /// guest's state, like a core-dumping quit of a process).
    Signal(i32),
}

impl CrashKind {
    /// The Linux signal a process would have died of.
    pub fn signal(self) -> i32 {
        match self {
            CrashKind::Abort => libc::SIGABRT,
            CrashKind::Signal(sig) => sig,
            CrashKind::Exception(0 | 16 | 19) => libc::SIGFPE,
            CrashKind::Exception(1 | 3) => libc::SIGTRAP,
            CrashKind::Exception(6) => libc::SIGILL,
            CrashKind::Exception(17) => libc::SIGBUS,
            CrashKind::Exception(_) => libc::SIGSEGV,
        }
    }
}

/// The guest's state when it crashed or panicked, captured at that exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crash {
    /// What stopped it.
    pub kind: CrashKind,
    /// Its registers.
    pub regs: Registers,
    /// Its call stack.
    pub backtrace: Backtrace,
}

/// A call stack: the innermost PC first (the crashing instruction), then return addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backtrace {
    /// Frame 0 is the crashing instruction; the others are return addresses.
    pub pcs: Vec<u64>,
    /// Why the walk stopped before the outermost frame, if it did.
    pub stopped: Option<String>,
}

/// Walks the frame-pointer chain from `rip`/`rbp` through checked reads of guest memory.
pub fn walk(mem: &impl UserMemory, map: &MemoryMap, rip: u64, rbp: u64) -> Backtrace {
    let mut pcs = vec![rip];
    let mut fp = rbp;
    let is_code = |a: u64| map.find(a).is_some_and(|r| r.user && r.perm & perm::X != 0);
    let stopped = loop {
        if fp == 0 {
            break None; // `_start` clears rbp: the end of the chain.
        }
        if pcs.len() >= MAX_FRAMES {
            break Some(format!("more than {MAX_FRAMES} frames"));
        }
        if !fp.is_multiple_of(8) {
            break Some(format!("frame pointer {fp:#x} is not aligned"));
        }
        let Ok(range) = map.check_user(fp, 16, false) else {
            break Some(format!("frame pointer {fp:#x} is outside guest memory"));
        };
        let mut buf = [0u8; 16];
        if mem.read_user(&range, &mut buf).is_err() {
            break Some(format!("frame pointer {fp:#x} is outside guest memory"));
        }
        let saved = u64::from_le_bytes(buf[..8].try_into().unwrap_or_default());
        let ret = u64::from_le_bytes(buf[8..].try_into().unwrap_or_default());
        if ret == 0 {
            break None;
        }
        if !is_code(ret) {
            break Some(format!("return address {ret:#x} is not in guest code"));
        }
        pcs.push(ret);
        if saved != 0 && saved <= fp {
            break Some(format!(
                "frame pointer {saved:#x} does not lead up the stack from {fp:#x}"
            ));
        }
        fp = saved;
    };
    Backtrace { pcs, stopped }
}

/// `s` with control characters escaped (`\n`, `\u{1b}`, ...), for printing text the guest
/// chose; `keep_newlines` leaves line breaks alone.
pub fn escape_controls(s: &str, keep_newlines: bool) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c == '\n' && keep_newlines {
            out.push(c);
        } else if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

impl Backtrace {
    /// The frames as report lines (each ending in a newline), symbolized from the image:
    /// `   N: function at file:line:col` from DWARF (inlined frames too), `function+0xoff`
    /// from the symbol table without it, the bare address when neither names it.
    pub fn render(&self, image: &GuestImage) -> String {
        let debug = image.debug_info();
        let mut out = String::new();
        let mut n = 0;
        for (i, &pc) in self.pcs.iter().enumerate() {
            // A return address points after the call: look up the call itself.
            let probe = if i == 0 { pc } else { pc.saturating_sub(1) };
            let in_text = image
                .segments
                .iter()
                .any(|s| s.perm & perm::X != 0 && (s.vaddr..s.vaddr + s.memsz).contains(&pc));
            let frames = match &debug {
                Some(d) if in_text => d.frames(probe),
                _ => Vec::new(),
            };
            if frames.is_empty() {
                let name = image
                    .symbolize(pc)
                    .map(|s| escape_controls(&s, false))
                    .unwrap_or_else(|| "??".into());
                let _ = writeln!(out, "{n:>4}: {name} ({pc:#x})");
                n += 1;
                continue;
            }
            let last = frames.len() - 1;
            for (j, f) in frames.into_iter().enumerate() {
                // The function the code belongs to is named by the symbol table with its
                // full path; inlined ones only by DWARF (a short name in line-tables-only
                // builds).
                let symbol = (j == last).then(|| image.symbol_name(probe)).flatten();
                let name = match (symbol, f.function) {
                    (Some(s), _) => s.to_string(),
                    (None, Some(name)) => name,
                    (None, None) => image.symbolize(pc).unwrap_or_else(|| format!("{pc:#x}")),
                };
                let name = escape_controls(&name, false);
                match f.location {
                    Some(loc) => {
                        let _ = writeln!(out, "{n:>4}: {name} at {}", escape_controls(&loc, false));
                    }
                    None => {
                        let _ = writeln!(out, "{n:>4}: {name}");
                    }
                }
                n += 1;
            }
        }
        if let Some(why) = &self.stopped {
            let _ = writeln!(out, "      (backtrace stopped: {why})");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Region;
    use pvrun_abi::region;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn setup() -> (GuestMemoryMmap, MemoryMap) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let map = MemoryMap::new(vec![
            Region {
                start: 0x1000,
                end: 0x2000,
                kind: crate::memory::HOST_ONLY,
                perm: perm::R | perm::W,
                user: false,
            },
            Region {
                start: 0x20_0000,
                end: 0x30_0000,
                kind: region::TEXT,
                perm: perm::R | perm::X,
                user: true,
            },
            Region {
                start: 0x30_0000,
                end: 0x40_0000,
                kind: region::STACK,
                perm: perm::R | perm::W,
                user: true,
            },
        ])
        .unwrap();
        (mem, map)
    }

    fn frame(mem: &GuestMemoryMmap, at: u64, saved: u64, ret: u64) {
        mem.write_obj(saved, GuestAddress(at)).unwrap();
        mem.write_obj(ret, GuestAddress(at + 8)).unwrap();
    }

    #[test]
    fn a_good_chain_is_walked_to_its_end() {
        let (mem, map) = setup();
        frame(&mem, 0x3f_f000, 0x3f_f100, 0x20_1000);
        frame(&mem, 0x3f_f100, 0x3f_f200, 0x20_2000);
        frame(&mem, 0x3f_f200, 0, 0x20_3000);
        let bt = walk(&mem, &map, 0x20_0010, 0x3f_f000);
        assert_eq!(bt.pcs, [0x20_0010, 0x20_1000, 0x20_2000, 0x20_3000]);
        assert_eq!(bt.stopped, None);
    }

    #[test]
    fn corrupt_chains_end_the_walk() {
        let (mem, map) = setup();
        // Unaligned, outside guest memory, host-only memory.
        for fp in [0x3f_f003, 0x4141_4141_4141_4140, 0x1000, u64::MAX - 7] {
            let bt = walk(&mem, &map, 0x20_0010, fp);
            assert_eq!(bt.pcs, [0x20_0010], "{fp:#x}");
            assert!(bt.stopped.is_some(), "{fp:#x}");
        }
        // A loop.
        frame(&mem, 0x3f_f000, 0x3f_f000, 0x20_1000);
        let bt = walk(&mem, &map, 0x20_0010, 0x3f_f000);
        assert_eq!(bt.pcs.len(), 2);
        assert!(bt.stopped.unwrap().contains("does not lead up"));
        // A return address in data.
        frame(&mem, 0x3f_f000, 0x3f_f100, 0x3f_0000);
        let bt = walk(&mem, &map, 0x20_0010, 0x3f_f000);
        assert!(bt.stopped.unwrap().contains("not in guest code"));
        // Too deep (a chain of 100 frames).
        for i in 0..100u64 {
            frame(
                &mem,
                0x30_0000 + i * 16,
                0x30_0000 + (i + 1) * 16,
                0x20_1000,
            );
        }
        let bt = walk(&mem, &map, 0x20_0010, 0x30_0000);
        assert_eq!(bt.pcs.len(), MAX_FRAMES);
        assert!(bt.stopped.unwrap().contains("more than"));
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_controls("a\x1b[2Jb\n", false), "a\\u{1b}[2Jb\\n");
        assert_eq!(escape_controls("a\nb\r", true), "a\nb\\r");
        assert_eq!(escape_controls("plain", true), "plain");
    }
}
