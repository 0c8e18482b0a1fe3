//! Exceptions: the IDT (one 64-bit interrupt gate per exception vector) and the ring-0
//! stubs the gates point at.
//!
//! The guest never runs ring-0 code of its own. Its only way into ring 0 is an exception,
//! which lands in a 10-12 byte stub (SSE-free, as ring-0 code is emulated on PVM hosts)
//! that pushes the vector and `rdx` and reports it to the host with one `out` to
//! [`EXCEPTION_PORT`]. A debugger resumes the guest through the [`RESUME_ADDR`]
//! trampoline: `pop rdx ; add rsp, 16 ; iretq` back to ring 3.

use pvrun_abi::EXCEPTION_PORT;
use x86_64::PrivilegeLevel;
use x86_64::structures::gdt::SegmentSelector;
use x86_64::structures::idt::ExceptionVector;

use super::gdt::KERNEL_CS;
use crate::layout::{STUB_SIZE, STUBS_ADDR};

/// Where the resume trampoline sits (right after the last stub, in the stubs page): with
/// `rsp` at a stub's frame it restores `rdx` and returns to the frame's `rip` in ring 3.
pub const RESUME_ADDR: u64 = STUBS_ADDR + IDT_ENTRIES * STUB_SIZE;
/// `pop rdx ; add rsp, 16 ; iretq`.
const RESUME: [u8; 8] = [0x5a, 0x48, 0x83, 0xc4, 0x10, 0x48, 0xcf, HLT];
/// Words the stub leaves on the ring-0 stack: `[rdx, vector, error code]` above the CPU's
/// `[rip, cs, rflags, rsp, ss]`.
pub const FRAME_WORDS: u64 = 8;

/// Number of IDT entries (the exception vectors).
pub const IDT_ENTRIES: u64 = 32;
/// IDTR limit: one less than the table's size in bytes.
pub const IDT_LIMIT: u16 = (IDT_ENTRIES * GATE_SIZE - 1) as u16;
/// Bytes per 64-bit gate.
const GATE_SIZE: u64 = 16;

/// Exception vectors for which the CPU pushes an error code.
const HAS_ERROR_CODE: [ExceptionVector; 10] = [
    ExceptionVector::Double,
    ExceptionVector::InvalidTss,
    ExceptionVector::SegmentNotPresent,
    ExceptionVector::Stack,
    ExceptionVector::GeneralProtection,
    ExceptionVector::Page,
    ExceptionVector::AlignmentCheck,
    ExceptionVector::ControlProtection,
    ExceptionVector::VmmCommunication,
    ExceptionVector::Security,
];

// The option word of a gate, bit for bit as the crate's `idt::EntryOptions` sets it.
// `idt::Entry`/`EntryOptions` themselves cannot be used here: without the `instructions`
// feature the crate offers no way to set a handler address (`set_handler_addr` reads the
// current CS with an instruction), their fields are private, and their bytes could only
// be reached by transmuting.
/// Gate type 0b1110: 64-bit interrupt gate (IF cleared on entry).
const INTERRUPT_GATE: u16 = 0b1110 << 8;
/// Present bit.
const GATE_PRESENT: u16 = 1 << 15;
/// First bit of the DPL field.
const GATE_DPL_SHIFT: u16 = 13;

/// One 64-bit IDT gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Gate {
    /// Handler address.
    handler: u64,
    /// Code segment the handler runs in.
    selector: SegmentSelector,
    /// Lowest CPL that may reach the gate with `int n`.
    dpl: PrivilegeLevel,
    /// Interrupt stack table slot, 1-based (0: no stack switch beyond RSP0).
    ist: u8,
}

impl Gate {
    fn to_bytes(self) -> [u8; GATE_SIZE as usize] {
        let options = INTERRUPT_GATE
            | GATE_PRESENT
            | ((self.dpl as u16) << GATE_DPL_SHIFT)
            | u16::from(self.ist & 0x7);
        let lo = (self.handler & 0xffff)
            | (u64::from(self.selector.0) << 16)
            | (u64::from(options) << 32)
            | (((self.handler >> 16) & 0xffff) << 48);
        let hi = self.handler >> 32;
        let mut b = [0; GATE_SIZE as usize];
        b[..8].copy_from_slice(&lo.to_le_bytes());
        b[8..].copy_from_slice(&hi.to_le_bytes());
        b
    }
}

// The stub's instructions.
/// `push imm8` (sign-extended to 64 bits).
const PUSH_IMM8: u8 = 0x6a;
/// `push rdx` (the `mov` below clobbers it; a debugger restores it).
const PUSH_RDX: u8 = 0x52;
/// `mov dx, imm16`.
const MOV_DX_IMM16: [u8; 2] = [0x66, 0xba];
/// `out dx, al`.
const OUT_DX_AL: u8 = 0xee;
/// `hlt`.
const HLT: u8 = 0xf4;
/// `jmp` back to the `hlt` before it.
const JMP_BACK_TO_HLT: [u8; 2] = [0xeb, 0xfd];
/// `int3`: fills the space between stubs.
const INT3: u8 = 0xcc;

/// The stub for `vector`: `[push 0] ; push vector ; push rdx ; mov dx, EXCEPTION_PORT ;
/// out dx, al ; hlt ; jmp hlt`. Vectors without an error code push a 0 so every frame has one.
fn stub(vector: u8) -> Vec<u8> {
    let mut code = Vec::with_capacity(STUB_SIZE as usize);
    let has_error_code = HAS_ERROR_CODE.iter().any(|v| *v as u8 == vector);
    if !has_error_code {
        code.extend_from_slice(&[PUSH_IMM8, 0]);
    }
    code.extend_from_slice(&[PUSH_IMM8, vector, PUSH_RDX]);
    code.extend_from_slice(&MOV_DX_IMM16);
    code.extend_from_slice(&EXCEPTION_PORT.to_le_bytes());
    code.extend_from_slice(&[OUT_DX_AL, HLT]);
    code.extend_from_slice(&JMP_BACK_TO_HLT);
    code
}

/// The exception stubs as bytes, one per [`STUB_SIZE`] slot, for [`STUBS_ADDR`], then the
/// resume trampoline at [`RESUME_ADDR`].
pub fn stubs_bytes() -> Vec<u8> {
    let mut stubs = vec![INT3; (IDT_ENTRIES * STUB_SIZE) as usize];
    stubs.extend_from_slice(&RESUME);
    for v in 0..IDT_ENTRIES {
        let at = (v * STUB_SIZE) as usize;
        let code = stub(v as u8);
        stubs[at..at + code.len()].copy_from_slice(&code);
    }
    stubs
}

/// The IDT as bytes: an interrupt gate per vector to its stub, DPL 0 (so `int n` from
/// ring 3 is a #GP), on IST1.
pub fn idt_bytes() -> Vec<u8> {
    (0..IDT_ENTRIES)
        .flat_map(|v| {
            Gate {
                handler: STUBS_ADDR + v * STUB_SIZE,
                selector: KERNEL_CS,
                dpl: PrivilegeLevel::Ring0,
                ist: 1,
            }
            .to_bytes()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    /// SHA-256 of `bytes` padded with zeros to a page, as guest memory holds it.
    fn page_sha(bytes: &[u8]) -> String {
        let mut page = bytes.to_vec();
        page.resize(4096, 0);
        format!("{:x}", Sha256::digest(&page))
    }

    #[test]
    fn tables_are_the_old_bytes() {
        // Captured from the hand-assembled tables this module replaced (the stubs' page
        // since: each stub pushes rdx, and the resume trampoline follows them).
        assert_eq!(
            page_sha(&idt_bytes()),
            "7ccf6c32ba612270f24eeaf537406bf25edc471d7999aa66da652963748400db"
        );
        assert_eq!(
            page_sha(&stubs_bytes()),
            "13ebb71d7455988e1abe3cdcdbc0dc03497d78d533401a85aef242ca0243b3d4"
        );
        assert_eq!(IDT_LIMIT, 511);
    }

    #[test]
    fn gates_are_present_interrupt_gates_to_kernel_code_at_dpl0() {
        let idt = idt_bytes();
        assert_eq!(idt.len() as u64, IDT_ENTRIES * GATE_SIZE);
        for (v, gate) in idt.chunks(GATE_SIZE as usize).enumerate() {
            let lo = u64::from_le_bytes(gate[..8].try_into().unwrap());
            let hi = u64::from_le_bytes(gate[8..].try_into().unwrap());
            let handler = (lo & 0xffff) | (((lo >> 48) & 0xffff) << 16) | (hi << 32);
            assert_eq!(handler, STUBS_ADDR + v as u64 * STUB_SIZE, "vector {v}");
            assert_eq!((lo >> 16) as u16, KERNEL_CS.0, "selector");
            assert_eq!(KERNEL_CS.0, 0x08);
            assert_eq!((lo >> 47) & 1, 1, "present");
            assert_eq!((lo >> 45) & 3, 0, "DPL 0");
            assert_eq!((lo >> 40) & 0xf, 0xe, "64-bit interrupt gate");
            assert_eq!((lo >> 32) & 7, 1, "IST1");
        }
    }

    #[test]
    fn the_resume_trampoline_follows_the_stubs() {
        let stubs = stubs_bytes();
        let at = (RESUME_ADDR - STUBS_ADDR) as usize;
        assert_eq!(at as u64, IDT_ENTRIES * STUB_SIZE);
        // pop rdx ; add rsp, 16 ; iretq
        assert_eq!(
            &stubs[at..at + 7],
            &[0x5a, 0x48, 0x83, 0xc4, 0x10, 0x48, 0xcf]
        );
        assert!(stubs.len() as u64 <= 4096);
        // Every stub saves rdx right before clobbering it.
        for v in 0..IDT_ENTRIES as u8 {
            let code = stub(v);
            let mov = code.windows(2).position(|w| w == MOV_DX_IMM16).unwrap();
            assert_eq!(code[mov - 1], PUSH_RDX, "vector {v}");
        }
    }

    #[test]
    fn stubs_fit_and_report_their_vector() {
        let stubs = stubs_bytes();
        for v in 0..IDT_ENTRIES as u8 {
            let code = stub(v);
            assert!(code.len() as u64 <= STUB_SIZE);
            let has_error_code = [8, 10, 11, 12, 13, 14, 17, 21, 29, 30].contains(&v);
            assert_eq!(code.len(), if has_error_code { 11 } else { 13 });
            let at = v as usize * STUB_SIZE as usize;
            assert_eq!(&stubs[at..at + code.len()], &code[..]);
            let [lo, hi] = EXCEPTION_PORT.to_le_bytes();
            assert!(code.windows(4).any(|w| w == [0x66, 0xba, lo, hi]));
        }
    }
}
