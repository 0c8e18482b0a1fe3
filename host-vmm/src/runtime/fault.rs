//! Describing guest crashes: the exception name, what the guest touched, where it was (RIP
//! symbolized from the guest ELF), and a hint for the common cases (null pointer, stack
//! overflow, privileged instruction).

use std::fmt;

use pvrun_abi::exception_name;

use crate::arch::USER_CS;
use crate::layout::{GUEST_IMAGE_BASE, PAGE_SIZE};
use crate::loader::GuestImage;
use crate::memory::MemoryMap;
use crate::runtime::backtrace::{Registers, escape_controls};

/// A guest crash, ready to print as one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The exception vector, when the crash was a CPU exception.
    pub vector: Option<u64>,
    /// The error code the CPU pushed (0 when it pushes none).
    pub error_code: u64,
    /// Guest RIP of the faulting instruction.
    pub rip: Option<u64>,
    /// The faulting address (CR2), for page faults.
    pub address: Option<u64>,
    /// The whole description.
    pub message: String,
}

impl Fault {
    /// A crash that is not a CPU exception (triple fault, unexpected exit, ...).
    pub fn protocol(message: String) -> Self {
        Fault {
            vector: None,
            error_code: 0,
            rip: None,
            address: None,
            message,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Names the instruction at `rip` when it is one ring 3 may not execute.
fn privileged_instruction(code: &[u8]) -> Option<&'static str> {
    // Skip legacy and REX prefixes.
    let mut i = 0;
    while i < code.len() && matches!(code[i], 0x66 | 0x67 | 0xf2 | 0xf3 | 0x40..=0x4f) {
        i += 1;
    }
    let c = &code[i..];
    Some(match c {
        [0xfa, ..] => "cli",
        [0xfb, ..] => "sti",
        [0xf4, ..] => "hlt",
        [0xe4..=0xe7, ..] | [0xec..=0xef, ..] | [0x6c..=0x6f, ..] => {
            "port I/O outside the hypercall ports"
        }
        [0x0f, 0x22, ..] => "mov to a control register",
        [0x0f, 0x20, ..] => "mov from a control register",
        [0x0f, 0x30, ..] => "wrmsr",
        [0x0f, 0x32, ..] => "rdmsr",
        [0x0f, 0x01, 0xd1, ..] => "xsetbv",
        [0x0f, 0x01, 0xc8, ..] => "monitor",
        [0x0f, 0x01, 0xc9, ..] => "mwait",
        [0x0f, 0x01, m, ..] if m >> 6 != 3 && (m >> 3) & 7 == 2 => "lgdt",
        [0x0f, 0x01, m, ..] if m >> 6 != 3 && (m >> 3) & 7 == 3 => "lidt",
        [0x0f, 0x01, m, ..] if (m >> 3) & 7 == 6 => "lmsw",
        [0x0f, 0x00, m, ..] if (m >> 3) & 7 == 3 => "ltr",
        [0x0f, 0x01, 0xf8, ..] => "swapgs",
        [0x0f, 0x07, ..] => "sysret",
        [0x0f, 0x09, ..] => "wbinvd",
        [0x0f, 0x08, ..] => "invd",
        [0x0f, 0x01, m, ..] if (m >> 3) & 7 == 7 && m >> 6 != 3 => "invlpg",
        [0x48, 0xcf, ..] | [0xcf, ..] => "iret",
        _ => return None,
    })
}

/// Skips legacy and REX prefixes; returns the REX byte (0 if none) and the rest.
fn strip_prefixes(code: &[u8]) -> (u8, &[u8]) {
    let mut i = 0;
    let mut rex = 0;
    while i < code.len() {
        match code[i] {
            0x66 | 0x67 | 0xf2 | 0xf3 | 0x2e | 0x36 | 0x3e | 0x26 | 0x64 | 0x65 | 0xf0 => rex = 0,
            b @ 0x40..=0x4f => rex = b,
            _ => break,
        }
        i += 1;
    }
    (rex, &code[i..])
}

/// The general register numbered `n` (x86 encoding order) in `regs`.
fn gpr(regs: &Registers, n: u8) -> u64 {
    [
        regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi, regs.r8,
        regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
    ][n as usize & 15]
}

/// The memory address the instruction `code` accesses, for the common one-operand-in-
/// memory forms (mov, arithmetic, movzx, SSE loads and stores, push/call/jmp through
/// memory); `None` when it has no memory operand or the form is not decoded.
fn memory_operand(code: &[u8], regs: &Registers) -> Option<u64> {
    let (rex, c) = strip_prefixes(code);
    let modrm_at = match c {
        [
            0x0f,
            0x10..=0x17
            | 0x28..=0x2f
            | 0x40..=0x4f
            | 0x6f
            | 0x7f
            | 0xaf
            | 0xb6
            | 0xb7
            | 0xbe
            | 0xbf
            | 0xd6
            | 0xe7,
            ..,
        ] => 2,
        [
            0x00..=0x03
            | 0x08..=0x0b
            | 0x10..=0x13
            | 0x18..=0x1b
            | 0x20..=0x23
            | 0x28..=0x2b
            | 0x30..=0x33
            | 0x38..=0x3b
            | 0x63
            | 0x69
            | 0x6b
            | 0x80..=0x8b
            | 0xc0
            | 0xc1
            | 0xc6
            | 0xc7
            | 0xd0..=0xd3
            | 0xf6
            | 0xf7
            | 0xfe
            | 0xff,
            ..,
        ] => 1,
        _ => return None,
    };
    let modrm = *c.get(modrm_at)?;
    let md = modrm >> 6;
    if md == 3 {
        return None;
    }
    let mut rm = modrm & 7;
    let mut at = modrm_at + 1;
    let mut addr: u64;
    if rm == 4 {
        let sib = *c.get(at)?;
        at += 1;
        let scale = 1u64 << (sib >> 6);
        let index = ((sib >> 3) & 7) | ((rex & 2) << 2);
        let base = (sib & 7) | ((rex & 1) << 3);
        addr = if index == 4 {
            0
        } else {
            gpr(regs, index).wrapping_mul(scale)
        };
        if sib & 7 == 5 && md == 0 {
            let d = c.get(at..at + 4)?;
            return Some(addr.wrapping_add(i32::from_le_bytes(d.try_into().ok()?) as i64 as u64));
        }
        addr = addr.wrapping_add(gpr(regs, base));
    } else if rm == 5 && md == 0 {
        return None; // rip-relative: always canonical
    } else {
        rm |= (rex & 1) << 3;
        addr = gpr(regs, rm);
    }
    let disp = match md {
        1 => *c.get(at)? as i8 as i64,
        2 => i32::from_le_bytes(c.get(at..at + 4)?.try_into().ok()?) as i64,
        _ => 0,
    };
    Some(addr.wrapping_add(disp as u64))
}

/// Whether bits 63..47 of `addr` are all equal (a 48-bit canonical address).
pub fn is_canonical(addr: u64) -> bool {
    let top = addr >> 47;
    top == 0 || top == (1 << 17) - 1
}

/// What the ring-0 stub reported about an exception.
#[derive(Clone, Copy, Debug)]
pub struct Exception {
    /// The vector.
    pub vector: u64,
    /// The error code (0 when the CPU pushes none).
    pub error_code: u64,
    /// RIP of the faulting instruction.
    pub rip: u64,
    /// CS at the fault.
    pub cs: u64,
    /// CR2 (the faulting address of a page fault).
    pub cr2: u64,
    /// The guest's registers, when they could be read.
    pub regs: Option<Registers>,
}

/// Describes an exception the stub reported.
pub fn describe(e: Exception, image: &GuestImage, map: &MemoryMap) -> Fault {
    let Exception {
        vector,
        error_code,
        rip,
        cs,
        cr2,
        regs,
    } = e;
    let name = exception_name(vector);
    let at = |addr: u64| match image.symbolize(addr) {
        Some(sym) => format!("{addr:#x} ({})", escape_controls(&sym, false)),
        None => format!("{addr:#x}"),
    };
    let code = image.code_at(rip, 16).unwrap_or(&[]);
    let syscall_at = |insn_rip: u64| -> Option<&'static str> {
        match strip_prefixes(image.code_at(insn_rip, 16).unwrap_or(&[])).1 {
            [0x0f, 0x05, ..] => Some("syscall"),
            [0x0f, 0x34, ..] => Some("sysenter"),
            [0xcd, 0x80, ..] => Some("int 0x80"),
            _ => None,
        }
    };
    // Where the guest ran a Linux system call instruction: it faults in place (#UD, #GP),
    // or, where the CPU lets `syscall` through, jumps to the unset LSTAR (0) with the
    // return address in rcx, and takes a page fault executing 0.
    let syscall = if matches!(vector, 6 | 13) {
        syscall_at(rip).map(|i| (i, rip))
    } else if vector == 14 && rip == 0 && error_code & 0x10 != 0 {
        regs.map(|r| r.rcx.wrapping_sub(2))
            .filter(|&at| image.code_at(at, 2) == Some(&[0x0f, 0x05][..]))
            .map(|at| ("syscall", at))
    } else {
        None
    };
    let mut what = String::new();
    let mut address = None;
    let mut syscall_rip = None;
    let software_interrupt = || -> Option<String> {
        Some(match strip_prefixes(code).1 {
            [0xcc, ..] => "int3".to_string(),
            [0xce, ..] => "into".to_string(),
            [0xf1, ..] => "int1".to_string(),
            [0xcd, n, ..] => format!("int {n:#x}"),
            _ => return None,
        })
    };
    if let Some((insn, at)) = syscall {
        let nr = regs.map(|r| format!(" (nr {})", r.rax)).unwrap_or_default();
        let sym = image
            .symbolize(at)
            .map(|s| escape_controls(&s, false))
            .unwrap_or_else(|| format!("{at:#x}"));
        syscall_rip = Some(at);
        what = format!(
            ": the guest executed a Linux system call{nr} at {sym} (`{insn}`); pvrun guests cannot make system calls (use the guest SDK)"
        );
    } else if vector == 14 {
        address = Some(cr2);
        let access = if error_code & 0x10 != 0 {
            "executing"
        } else if error_code & 0x2 != 0 {
            "writing"
        } else {
            "reading"
        };
        let cause = if cr2 < PAGE_SIZE {
            "null pointer dereference".to_string()
        } else if map
            .stack_guard()
            .is_some_and(|(lo, hi)| (lo..hi).contains(&cr2))
        {
            "stack overflow (hit the guard region below the stack)".to_string()
        } else if error_code & 0x1 == 0 {
            if cr2 < GUEST_IMAGE_BASE {
                "address belongs to the host and is not mapped for the guest".to_string()
            } else {
                "address is not mapped".to_string()
            }
        } else if error_code & 0x10 != 0 {
            "page is not executable (W^X)".to_string()
        } else if error_code & 0x2 != 0 {
            "page is read-only".to_string()
        } else {
            "protection violation".to_string()
        };
        what = format!(" {access} {cr2:#x}: {cause}");
    } else if vector == 13 {
        let noncanonical = regs
            .and_then(|r| memory_operand(code, &r))
            .filter(|&a| !is_canonical(a));
        if let Some(insn) = privileged_instruction(code) {
            what = format!(": privileged instruction `{insn}` is not allowed in ring 3");
        } else if let Some(a) = noncanonical {
            address = Some(a);
            what = format!(
                " accessing {a:#x}: non-canonical address (bits 63..47 differ; a corrupt or uninitialised pointer)"
            );
        } else if let Some(insn) = software_interrupt() {
            what = format!(": software interrupt `{insn}` is not allowed in ring 3");
        } else if error_code != 0 {
            what = format!(" (error code {error_code:#x})");
        }
    } else if vector == 6 {
        what = match strip_prefixes(code).1 {
            // The gates are DPL0, so the ABI says #GP; some hosts deliver #UD instead.
            _ if software_interrupt().is_some() => format!(
                ": software interrupt `{}` is not allowed in ring 3",
                software_interrupt().unwrap_or_default()
            ),
            [0x0f, 0x0b, ..] => ": `ud2` (an explicit trap, e.g. an intrinsic abort)".to_string(),
            [] => ": invalid or undefined instruction".to_string(),
            _ => ": invalid or undefined instruction (not available to the guest)".to_string(),
        };
    } else if vector == 0 {
        what = ": integer division by zero or overflow".to_string();
    }
    let ring = if cs & 3 == (USER_CS as u64 & 3) {
        ""
    } else {
        " [in the host's ring-0 stub]"
    };
    let rip = syscall_rip.unwrap_or(rip);
    let location = format!("at rip {}", at(rip));
    Fault {
        vector: Some(vector),
        error_code,
        rip: Some(rip),
        address,
        message: format!("{name}{what}, {location}{ring}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privileged_instructions_are_named() {
        assert_eq!(privileged_instruction(&[0xfa]), Some("cli"));
        assert_eq!(
            privileged_instruction(&[0x0f, 0x22, 0xd8]),
            Some("mov to a control register")
        );
        assert_eq!(privileged_instruction(&[0x0f, 0x30]), Some("wrmsr"));
        assert_eq!(
            privileged_instruction(&[0xe6, 0x80]),
            Some("port I/O outside the hypercall ports")
        );
        assert_eq!(privileged_instruction(&[0x90]), None);
        assert_eq!(privileged_instruction(&[0x0f, 0x01, 0xd1]), Some("xsetbv"));
        assert_eq!(privileged_instruction(&[0x0f, 0x01, 0x10]), Some("lgdt"));
        assert_eq!(privileged_instruction(&[0x0f, 0x01, 0x18]), Some("lidt"));
        assert_eq!(privileged_instruction(&[0x0f, 0x01, 0xd0]), None); // xgetbv
    }

    #[test]
    fn memory_operands_are_decoded() {
        let regs = Registers {
            rax: 0x8000_0000_0000_0000,
            rcx: 0x10,
            r9: 0x4000,
            ..Registers::default()
        };
        // mov rdx, [rax]
        assert_eq!(memory_operand(&[0x48, 0x8b, 0x10], &regs), Some(regs.rax));
        // mov [r9+0x8], ecx
        assert_eq!(
            memory_operand(&[0x41, 0x89, 0x49, 0x08], &regs),
            Some(0x4008)
        );
        // mov rax, [rax+rcx*4+0x100]
        assert_eq!(
            memory_operand(&[0x48, 0x8b, 0x84, 0x88, 0x00, 0x01, 0x00, 0x00], &regs),
            Some(regs.rax + 0x140)
        );
        // lea and register forms have no memory operand.
        assert_eq!(memory_operand(&[0x48, 0x8d, 0x10], &regs), None);
        assert_eq!(memory_operand(&[0x48, 0x89, 0xc8], &regs), None);
        assert!(!is_canonical(regs.rax));
        assert!(is_canonical(0xffff_8000_0000_0000));
        assert!(is_canonical(0x7fff_ffff_ffff));
    }
}
