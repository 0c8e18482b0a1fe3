//! Describing guest crashes: the exception name, what the guest touched, where it was (RIP
//! symbolized from the guest ELF), and a hint for the common cases (null pointer, stack
//! overflow, privileged instruction).

use std::fmt;

use pvrun_abi::exception_name;

use crate::arch::USER_CS;
use crate::layout::{GUEST_IMAGE_BASE, PAGE_SIZE};
use crate::loader::GuestImage;
use crate::memory::MemoryMap;

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
        [0xcd, ..] => "int n",
        [0x0f, 0x22, ..] => "mov to a control register",
        [0x0f, 0x20, ..] => "mov from a control register",
        [0x0f, 0x30, ..] => "wrmsr",
        [0x0f, 0x32, ..] => "rdmsr",
        [0x0f, 0x01, m, ..] if (m >> 3) & 7 == 2 || (m >> 3) & 7 == 3 => "lgdt/lidt",
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

/// Describes an exception the stub reported.
pub fn describe(
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    cr2: u64,
    image: &GuestImage,
    map: &MemoryMap,
) -> Fault {
    let name = exception_name(vector);
    let location = match image.symbolize(rip) {
        Some(sym) => format!("at rip {rip:#x} ({sym})"),
        None => format!("at rip {rip:#x}"),
    };
    let mut what = String::new();
    let mut address = None;
    if vector == 14 {
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
        if let Some(insn) = image.code_at(rip, 8).and_then(privileged_instruction) {
            what = format!(": privileged instruction `{insn}` is not allowed in ring 3");
        } else if error_code != 0 {
            what = format!(" (error code {error_code:#x})");
        }
    } else if vector == 6 {
        what = ": invalid or undefined instruction (ud2?)".to_string();
    } else if vector == 0 {
        what = ": integer division by zero or overflow".to_string();
    }
    let ring = if cs & 3 == (USER_CS as u64 & 3) {
        ""
    } else {
        " [in the host's ring-0 stub]"
    };
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
    use super::privileged_instruction;

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
    }
}
