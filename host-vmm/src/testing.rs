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
    /// `e_entry`, if not `vaddr`.
    pub entry: Option<u64>,
    /// `p_paddr` of the text segment, if not `vaddr`.
    pub paddr: Option<u64>,
    /// `p_memsz` of the text segment, if not the code length plus `bss`.
    pub memsz: Option<u64>,
    /// A second PT_LOAD with the same file bytes: (address, `p_flags`).
    pub second_load: Option<(u64, u32)>,
    /// An extra, empty program header of this `p_type` (PT_INTERP, PT_DYNAMIC, PT_TLS...).
    pub extra_phdr: Option<u32>,
    /// Raw bytes appended to the note segment after the ABI note (more notes, or junk).
    pub extra_notes: &'static [u8],
    /// A defined function symbol at the entry point (sets up section headers and .symtab).
    pub text_symbol: Option<&'static str>,
    /// Undefined global symbols in .symtab (as a guest linked against a C library has).
    pub undefined: &'static [&'static str],
    /// Undefined weak symbols in .symtab (harmless: they resolve to 0).
    pub weak_undefined: &'static [&'static str],
    /// One more section. A `SHT_RELA` one holds an `R_X86_64_JUMP_SLOT` relocation against
    /// the first .symtab symbol; others hold 16 zero bytes.
    pub extra_section: Option<RawSection>,
}

/// A section for [`RawElf::extra_section`].
#[derive(Clone, Copy, Debug)]
pub struct RawSection {
    /// Its name (`.rela.plt`, `.dynamic`, `.plt`...).
    pub name: &'static str,
    /// `sh_type`.
    pub sh_type: u32,
    /// `sh_flags` (2 = SHF_ALLOC).
    pub flags: u64,
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
            entry: None,
            paddr: None,
            memsz: None,
            second_load: None,
            extra_phdr: None,
            extra_notes: &[],
            text_symbol: None,
            undefined: &[],
            weak_undefined: &[],
            extra_section: None,
        }
    }
}

/// Offset of the program headers in an image from [`elf`].
pub const PHDR_OFFSET: u64 = 64;
/// Size of one program header.
pub const PHDR_SIZE: u64 = 56;

/// Builds a static ELF whose first PT_LOAD holds `code` at `opts.vaddr` (the entry point),
/// followed by the knobs' optional headers: a second PT_LOAD, an extra header, the note.
pub fn elf(code: &[u8], opts: RawElf) -> Vec<u8> {
    let mut note = Vec::new();
    if let Some(v) = opts.abi_version {
        note.extend_from_slice(&6u32.to_le_bytes());
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&NOTE_TYPE_ABI_VERSION.to_le_bytes());
        note.extend_from_slice(b"pvrun\0\0\0");
        note.extend_from_slice(&v.to_le_bytes());
    }
    note.extend_from_slice(opts.extra_notes);
    let phnum = 1
        + u16::from(opts.second_load.is_some())
        + u16::from(opts.extra_phdr.is_some())
        + u16::from(!note.is_empty());
    let ehsize = 64u64;
    let note_off = PHDR_OFFSET + PHDR_SIZE * phnum as u64;
    let code_off = (note_off + note.len() as u64).next_multiple_of(16);
    let mut out = Vec::new();
    // ELF header.
    out.extend_from_slice(b"\x7fELF");
    out.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, SysV
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&opts.e_type.to_le_bytes());
    out.extend_from_slice(&opts.machine.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&opts.entry.unwrap_or(opts.vaddr).to_le_bytes()); // e_entry
    out.extend_from_slice(&PHDR_OFFSET.to_le_bytes()); // e_phoff
    out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    out.extend_from_slice(&(ehsize as u16).to_le_bytes());
    out.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
    out.extend_from_slice(&phnum.to_le_bytes());
    out.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    #[allow(clippy::too_many_arguments)]
    fn ph(
        out: &mut Vec<u8>,
        ty: u32,
        flags: u32,
        off: u64,
        vaddr: u64,
        paddr: u64,
        filesz: u64,
        memsz: u64,
        align: u64,
    ) {
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&off.to_le_bytes());
        out.extend_from_slice(&vaddr.to_le_bytes());
        out.extend_from_slice(&paddr.to_le_bytes());
        out.extend_from_slice(&filesz.to_le_bytes());
        out.extend_from_slice(&memsz.to_le_bytes());
        out.extend_from_slice(&align.to_le_bytes());
    }
    let len = code.len() as u64;
    ph(
        &mut out,
        1,
        opts.flags,
        code_off,
        opts.vaddr,
        opts.paddr.unwrap_or(opts.vaddr),
        len,
        opts.memsz.unwrap_or(len + opts.bss),
        0x1000,
    );
    if let Some((vaddr, flags)) = opts.second_load {
        ph(&mut out, 1, flags, code_off, vaddr, vaddr, len, len, 0x1000);
    }
    if let Some(ty) = opts.extra_phdr {
        ph(&mut out, ty, 4, 0, 0, 0, 0, 0, 8);
    }
    if !note.is_empty() {
        let n = note.len() as u64;
        ph(&mut out, 4, 4, note_off, 0, 0, n, n, 4);
    }
    out.extend_from_slice(&note);
    out.resize(code_off as usize, 0);
    out.extend_from_slice(code);
    if opts.text_symbol.is_some()
        || !opts.undefined.is_empty()
        || !opts.weak_undefined.is_empty()
        || opts.extra_section.is_some()
    {
        sections(&mut out, code_off, len, &opts);
    }
    out
}

/// Appends .text, .symtab, .strtab, .shstrtab (and the extra section) with their headers,
/// and points the ELF header at them.
fn sections(out: &mut Vec<u8>, code_off: u64, code_len: u64, opts: &RawElf) {
    let mut strtab = vec![0u8];
    let mut symtab = vec![0u8; 24];
    let mut sym = |name: &str, info: u8, shndx: u16, value: u64, size: u64| {
        symtab.extend_from_slice(&(strtab.len() as u32).to_le_bytes());
        strtab.extend_from_slice(name.as_bytes());
        strtab.push(0);
        symtab.push(info);
        symtab.push(0);
        symtab.extend_from_slice(&shndx.to_le_bytes());
        symtab.extend_from_slice(&value.to_le_bytes());
        symtab.extend_from_slice(&size.to_le_bytes());
    };
    for name in opts.undefined {
        sym(name, 0x10, 0, 0, 0); // STB_GLOBAL, STT_NOTYPE, SHN_UNDEF
    }
    for name in opts.weak_undefined {
        sym(name, 0x20, 0, 0, 0); // STB_WEAK
    }
    if let Some(name) = opts.text_symbol {
        sym(name, 0x12, 1, opts.vaddr, code_len); // STB_GLOBAL, STT_FUNC, in .text
    }
    let mut shstrtab = vec![0u8];
    let mut shname = |name: &str| {
        let off = shstrtab.len() as u32;
        shstrtab.extend_from_slice(name.as_bytes());
        shstrtab.push(0);
        off
    };
    let names = [
        shname(".text"),
        shname(".symtab"),
        shname(".strtab"),
        shname(".shstrtab"),
        opts.extra_section.map_or(0, |x| shname(x.name)),
    ];
    let extra: Vec<u8> = match opts.extra_section {
        Some(x) if x.sh_type == 4 => {
            let mut r = Vec::new();
            r.extend_from_slice(&opts.vaddr.to_le_bytes()); // r_offset
            r.extend_from_slice(&((1u64 << 32) | 7).to_le_bytes()); // sym 1, JUMP_SLOT
            r.extend_from_slice(&0i64.to_le_bytes());
            r
        }
        Some(_) => vec![0; 16],
        None => Vec::new(),
    };
    let place = |out: &mut Vec<u8>, data: &[u8]| {
        out.resize(out.len().next_multiple_of(8), 0);
        let off = out.len() as u64;
        out.extend_from_slice(data);
        off
    };
    let symtab_off = place(out, &symtab);
    let strtab_off = place(out, &strtab);
    let shstrtab_off = place(out, &shstrtab);
    let extra_off = place(out, &extra);
    out.resize(out.len().next_multiple_of(8), 0);
    let shoff = out.len() as u64;
    #[allow(clippy::too_many_arguments)]
    fn sh(
        out: &mut Vec<u8>,
        name: u32,
        ty: u32,
        flags: u64,
        addr: u64,
        off: u64,
        size: u64,
        link: u32,
        info: u32,
        entsize: u64,
    ) {
        out.extend_from_slice(&name.to_le_bytes());
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&off.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&link.to_le_bytes());
        out.extend_from_slice(&info.to_le_bytes());
        out.extend_from_slice(&8u64.to_le_bytes()); // sh_addralign
        out.extend_from_slice(&entsize.to_le_bytes());
    }
    sh(out, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    sh(out, names[0], 1, 6, opts.vaddr, code_off, code_len, 0, 0, 0);
    let sym_len = symtab.len() as u64;
    sh(out, names[1], 2, 0, 0, symtab_off, sym_len, 3, 1, 24);
    let str_len = strtab.len() as u64;
    sh(out, names[2], 3, 0, 0, strtab_off, str_len, 0, 0, 0);
    let shstr_len = shstrtab.len() as u64;
    sh(out, names[3], 3, 0, 0, shstrtab_off, shstr_len, 0, 0, 0);
    let mut shnum = 5u16;
    if let Some(x) = opts.extra_section {
        let entsize = if x.sh_type == 4 { 24 } else { 0 };
        let extra_len = extra.len() as u64;
        sh(
            out, names[4], x.sh_type, x.flags, 0, extra_off, extra_len, 2, 0, entsize,
        );
        shnum += 1;
    }
    out[40..48].copy_from_slice(&shoff.to_le_bytes()); // e_shoff
    out[60..62].copy_from_slice(&shnum.to_le_bytes()); // e_shnum
    out[62..64].copy_from_slice(&4u16.to_le_bytes()); // e_shstrndx
}

/// The process-wide KVM handle (for tests that probe the device directly).
pub use crate::vstate::kvm::kvm;
