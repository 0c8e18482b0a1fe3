//! Test and benchmark support, not part of the documented API. Hand-assembled guests:
//! minimal ELF images around a few bytes of machine code.
//!
//! They measure the raw KVM exit floor (a CPL3 `out` loop with nothing behind it) in the
//! same process and VM setup as real guests, and let tests build deliberately broken ELF
//! files (wrong machine, PIE, segments in host memory, W+X) without a toolchain.

use pvrun_abi::{ABI_VERSION, NOTE_TYPE_ABI_VERSION};

/// Address of the text segment of a raw guest.
pub const RAW_TEXT: u64 = 0x20_0000;

/// CPL3 code that executes `out` to an unassigned hypercall port forever:
/// `mov dx, 0x53f; l: out dx, al; jmp l`.
pub const EXIT_LOOP: &[u8] = &[0x66, 0xba, 0x3f, 0x05, 0xee, 0xeb, 0xfd];

/// Knobs for [`elf`], to build broken images on purpose.
#[derive(Clone, Copy, Debug)]
pub struct RawElf {
    /// `e_type` (2 = ET_EXEC).
    pub e_type: u16,
    /// `e_machine` (62 = x86-64).
    pub machine: u16,
    /// Load address of the text segment.
    pub vaddr: u64,
    /// `p_flags` of the segment (5 = R+X).
    pub flags: u32,
    /// ABI version in the note, or `None` for no note.
    pub abi_version: Option<u32>,
    /// Extra bytes of memory size beyond the code (BSS).
    pub bss: u64,
}

impl Default for RawElf {
    fn default() -> Self {
        RawElf {
            e_type: 2,
            machine: 62,
            vaddr: RAW_TEXT,
            flags: 5,
            abi_version: Some(ABI_VERSION),
            bss: 0,
        }
    }
}

/// Builds a static ELF whose single PT_LOAD holds `code` at `opts.vaddr` (the entry point).
pub fn elf(code: &[u8], opts: RawElf) -> Vec<u8> {
    let phnum: u16 = if opts.abi_version.is_some() { 2 } else { 1 };
    let ehsize = 64u64;
    let phsize = 56u64;
    let note_off = ehsize + phsize * phnum as u64;
    let note: Vec<u8> = match opts.abi_version {
        Some(v) => {
            let mut n = Vec::new();
            n.extend_from_slice(&6u32.to_le_bytes());
            n.extend_from_slice(&4u32.to_le_bytes());
            n.extend_from_slice(&NOTE_TYPE_ABI_VERSION.to_le_bytes());
            n.extend_from_slice(b"pvrun\0\0\0");
            n.extend_from_slice(&v.to_le_bytes());
            n
        }
        None => Vec::new(),
    };
    let code_off = (note_off + note.len() as u64).next_multiple_of(16);
    let mut out = Vec::new();
    // ELF header.
    out.extend_from_slice(b"\x7fELF");
    out.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, SysV
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&opts.e_type.to_le_bytes());
    out.extend_from_slice(&opts.machine.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&opts.vaddr.to_le_bytes()); // e_entry
    out.extend_from_slice(&ehsize.to_le_bytes()); // e_phoff
    out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    out.extend_from_slice(&(ehsize as u16).to_le_bytes());
    out.extend_from_slice(&(phsize as u16).to_le_bytes());
    out.extend_from_slice(&phnum.to_le_bytes());
    out.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    // PT_LOAD.
    let ph = |out: &mut Vec<u8>,
              ty: u32,
              flags: u32,
              off: u64,
              vaddr: u64,
              filesz: u64,
              memsz: u64,
              align: u64| {
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&off.to_le_bytes());
        out.extend_from_slice(&vaddr.to_le_bytes());
        out.extend_from_slice(&vaddr.to_le_bytes());
        out.extend_from_slice(&filesz.to_le_bytes());
        out.extend_from_slice(&memsz.to_le_bytes());
        out.extend_from_slice(&align.to_le_bytes());
    };
    let len = code.len() as u64;
    ph(
        &mut out,
        1,
        opts.flags,
        code_off,
        opts.vaddr,
        len,
        len + opts.bss,
        0x1000,
    );
    if !note.is_empty() {
        ph(
            &mut out,
            4,
            4,
            note_off,
            0,
            note.len() as u64,
            note.len() as u64,
            4,
        );
    }
    out.extend_from_slice(&note);
    out.resize(code_off as usize, 0);
    out.extend_from_slice(code);
    out
}

/// The process-wide KVM handle (for tests that probe the device directly).
pub use crate::vstate::kvm::kvm;
