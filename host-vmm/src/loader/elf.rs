//! The checks a guest ELF must pass before it is loaded: header (64-bit, little-endian,
//! x86-64, `ET_EXEC`), program headers (PT_LOAD segments above [`GUEST_IMAGE_BASE`], in
//! the file, W^X, not sharing pages; no interpreter, dynamic section or TLS), the `pvrun`
//! ABI note and device notes, that nothing needs a dynamic linker (undefined symbols,
//! run-time relocations, a PLT), and the entry point. Header counts and sizes are
//! bounded, and every offset and size is checked; malformed input is an error, never a
//! panic.
//!
//! Every failure is an [`Error::BadElf`] (or [`Error::AbiMismatch`]) whose reason reads as
//! the end of a one-line sentence.
//!
//! (Over 500 lines on purpose: every check reads the same parsed headers, and keeping them
//! in one file keeps the order they run in visible. Its unit tests are in `elf/tests.rs`.)

use std::path::Path;

use object::Endianness;
use object::elf;
use object::read::elf::{ElfFile64, FileHeader, ProgramHeader, SectionHeader, Sym};
use pvrun_abi::{ABI_VERSION, NOTE_NAME, NOTE_TYPE_ABI_VERSION, NOTE_TYPE_DEVICE, perm};

use super::{Segment, needs_escape, printable};
use crate::error::Error;
use crate::layout::{GUEST_IMAGE_BASE, PAGE_SIZE, align_down, align_up};

/// What the checks found out about an image.
pub(super) struct Checked {
    pub entry: u64,
    pub segments: Vec<Segment>,
    pub abi_version: u32,
    pub required_devices: Vec<(u32, String)>,
}

fn bad(path: &Path, what: impl Into<String>) -> Error {
    Error::BadElf {
        path: path.display().to_string(),
        reason: what.into(),
    }
}

/// Most program headers a guest may have (ours have five).
pub(super) const MAX_PHDRS: u16 = 64;
/// Most section headers a guest may have.
pub(super) const MAX_SECTIONS: usize = 1 << 12;
/// How many unresolved symbols an error message names.
const NAMED_SYMBOLS: usize = 3;

fn u16_at(bytes: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([bytes[off], bytes[off + 1]])
}

fn u32_at(bytes: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([bytes[off], bytes[off + 1], bytes[off + 2], bytes[off + 3]])
}

/// Validates `bytes` as a guest image; returns what was found and the parsed file.
pub(super) fn check<'d>(
    path: &Path,
    bytes: &'d [u8],
) -> Result<(Checked, ElfFile64<'d, Endianness>), Error> {
    if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
        return Err(bad(path, "is not an ELF file"));
    }
    if bytes.len() < 5 || bytes[4] != elf::ELFCLASS64.0 {
        return Err(bad(
            path,
            "is a 32-bit ELF; pvrun guests are x86-64 (ELFCLASS64) binaries",
        ));
    }
    match bytes.get(5).copied() {
        Some(d) if d == elf::ELFDATA2LSB.0 => {}
        Some(d) if d == elf::ELFDATA2MSB.0 => {
            return Err(bad(
                path,
                "is big-endian; pvrun runs little-endian x86-64 guests",
            ));
        }
        d => {
            return Err(bad(
                path,
                format!(
                    "is a malformed ELF (data encoding {})",
                    d.map_or("missing".to_string(), |d| d.to_string())
                ),
            ));
        }
    }
    if bytes.len() < size_of::<elf::FileHeader64<Endianness>>() {
        return Err(bad(path, "is a malformed ELF (shorter than its header)"));
    }
    // The program-header count as every reader sees it: no extended numbering (PN_XNUM,
    // the real count in section 0), which the loader and other tools could read differently.
    let phentsize = u16_at(bytes, 54);
    let phnum = u16_at(bytes, 56);
    if phnum == elf::PN_XNUM {
        return Err(bad(
            path,
            "uses extended program-header numbering (e_phnum = PN_XNUM); pvrun guests have a handful of program headers",
        ));
    }
    if phnum > MAX_PHDRS {
        return Err(bad(
            path,
            format!("has {phnum} program headers; pvrun accepts at most {MAX_PHDRS}"),
        ));
    }
    if phnum != 0 && usize::from(phentsize) != size_of::<elf::ProgramHeader64<Endianness>>() {
        return Err(bad(
            path,
            format!("is a malformed ELF (program headers of {phentsize} bytes, not 56)"),
        ));
    }
    let file = ElfFile64::<Endianness>::parse(bytes)
        .map_err(|e| bad(path, format!("is a malformed ELF ({e})")))?;
    let hdr = file.elf_header();
    let endian = file.endian();
    let machine = hdr.e_machine(endian);
    if machine != elf::EM_X86_64 {
        return Err(bad(
            path,
            format!(
                "is built for another architecture (e_machine {machine}); pvrun runs x86-64 guests"
            ),
        ));
    }
    match hdr.e_type(endian) {
        elf::ET_EXEC => {}
        elf::ET_DYN => {
            return Err(bad(
                path,
                "is position-independent (ET_DYN, PIE or shared object); pvrun needs a static ET_EXEC guest built with `cargo pvrun`",
            ));
        }
        elf::ET_REL => {
            return Err(bad(
                path,
                "is a relocatable object (ET_REL), not a linked executable",
            ));
        }
        t => return Err(bad(path, format!("has ELF type {t}, not an executable"))),
    }
    let sections = file.elf_section_table().len();
    if sections > MAX_SECTIONS {
        return Err(bad(
            path,
            format!("has {sections} sections; pvrun accepts at most {MAX_SECTIONS}"),
        ));
    }

    let mut segments = Vec::new();
    let mut note_segments = Vec::new();
    let phdrs = file.elf_program_headers();
    if phdrs.len() != usize::from(phnum) {
        return Err(bad(path, "is a malformed ELF (program-header count)"));
    }
    for ph in phdrs {
        match ph.p_type(endian) {
            elf::PT_LOAD => {
                let vaddr = ph.p_vaddr(endian);
                let paddr = ph.p_paddr(endian);
                let filesz = ph.p_filesz(endian);
                let memsz = ph.p_memsz(endian);
                let offset = ph.p_offset(endian);
                let flags = ph.p_flags(endian);
                if filesz > memsz {
                    return Err(bad(
                        path,
                        format!("segment at {vaddr:#x} has file size larger than memory size"),
                    ));
                }
                if memsz == 0 {
                    // Nothing to load (and no file bytes, checked above): the segment is
                    // left out, and the loader only ever writes segments from this list.
                    continue;
                }
                if vaddr != paddr {
                    return Err(bad(
                        path,
                        format!(
                            "segment at {vaddr:#x} has a different physical address ({paddr:#x})"
                        ),
                    ));
                }
                if offset
                    .checked_add(filesz)
                    .is_none_or(|end| end > bytes.len() as u64)
                {
                    return Err(bad(
                        path,
                        format!("segment at {vaddr:#x} extends past the end of the file"),
                    ));
                }
                let end = vaddr
                    .checked_add(memsz)
                    .and_then(|e| align_up(e, PAGE_SIZE))
                    .ok_or_else(|| {
                        bad(
                            path,
                            format!("segment at {vaddr:#x} overflows the address space"),
                        )
                    })?;
                if vaddr < GUEST_IMAGE_BASE {
                    return Err(bad(
                        path,
                        format!(
                            "has a segment at {vaddr:#x}, below {GUEST_IMAGE_BASE:#x} where the host keeps its own structures (link it with `cargo pvrun`)"
                        ),
                    ));
                }
                let mut p = perm::R;
                if flags.0 & elf::PF_W.0 != 0 {
                    p |= perm::W;
                }
                if flags.0 & elf::PF_X.0 != 0 {
                    p |= perm::X;
                }
                if p & perm::W != 0 && p & perm::X != 0 {
                    return Err(bad(
                        path,
                        format!(
                            "segment at {vaddr:#x} is both writable and executable (pvrun enforces W^X)"
                        ),
                    ));
                }
                segments.push(Segment {
                    vaddr,
                    offset,
                    filesz,
                    memsz,
                    page_start: align_down(vaddr, PAGE_SIZE),
                    page_end: end,
                    perm: p,
                });
            }
            elf::PT_INTERP | elf::PT_DYNAMIC => {
                return Err(bad(
                    path,
                    "is dynamically linked; pvrun guests are static executables built with `cargo pvrun`",
                ));
            }
            elf::PT_TLS => {
                return Err(bad(
                    path,
                    "uses thread-local storage, which pvrun guests do not support",
                ));
            }
            elf::PT_NOTE => {
                note_segments.push((ph.p_offset(endian), ph.p_filesz(endian), ph.p_align(endian)))
            }
            _ => {}
        }
    }
    // Before the notes: a dynamically linked guest may have other data in its note segment.
    check_static(path, &file, bytes)?;

    let mut notes = Notes::default();
    for (offset, size, align) in note_segments {
        notes.parse(path, bytes, offset, size, align)?;
    }
    let abi_version = notes.abi_version.ok_or_else(|| {
        bad(
            path,
            "is not a pvrun guest: it has no `pvrun` ABI note (build it with `cargo pvrun` from a crate that uses guest-sdk)",
        )
    })?;
    // Version 3 guests differ only in lacking the exitless mailbox (FN_MAILBOX): they run
    // unchanged, and their boot info says 3.
    if !(pvrun_abi::ABI_VERSION_OLDEST..=ABI_VERSION).contains(&abi_version) {
        return Err(Error::AbiMismatch {
            path: path.display().to_string(),
            guest: abi_version,
            host: ABI_VERSION,
        });
    }
    if segments.is_empty() {
        return Err(bad(path, "has no loadable segments"));
    }
    segments.sort_by_key(|s| s.vaddr);
    for w in segments.windows(2) {
        if w[0].page_end > w[1].page_start {
            return Err(bad(
                path,
                format!(
                    "segments at {:#x} and {:#x} share a page (link with 4 KiB aligned segments)",
                    w[0].vaddr, w[1].vaddr
                ),
            ));
        }
    }
    let entry = hdr.e_entry(endian);
    if !segments
        .iter()
        .any(|s| s.perm & perm::X != 0 && entry >= s.vaddr && entry - s.vaddr < s.memsz)
    {
        return Err(bad(
            path,
            format!("entry point {entry:#x} is not inside an executable segment"),
        ));
    }
    Ok((
        Checked {
            entry,
            segments,
            abi_version,
            required_devices: notes.devices,
        },
        file,
    ))
}

/// Refuses a guest that would need a dynamic linker: undefined symbols, a dynamic section,
/// run-time relocations, or a PLT. The host loads the file as linked and relocates nothing,
/// so any of these means a call or load that jumps to (or reads) an address never filled.
fn check_static(path: &Path, file: &ElfFile64<'_, Endianness>, bytes: &[u8]) -> Result<(), Error> {
    let endian = file.endian();
    let mut undefined: Vec<String> = Vec::new();
    for table in [file.elf_symbol_table(), file.elf_dynamic_symbol_table()] {
        // Index 0 is the null symbol, undefined by definition.
        for (i, sym) in table.symbols().iter().enumerate().skip(1) {
            if sym.is_undefined(endian) && sym.st_bind() != elf::STB_WEAK {
                let name = match table.symbol_name(endian, sym) {
                    Ok(n) if !n.is_empty() => printable(n),
                    _ => format!("#{i}"),
                };
                if !undefined.contains(&name) {
                    undefined.push(name);
                }
            }
        }
    }
    if !undefined.is_empty() {
        let names = name_list(&undefined);
        let (what, verb) = if undefined.len() == 1 {
            ("symbol", "defines")
        } else {
            ("symbols", "define")
        };
        return Err(bad(
            path,
            format!(
                "links {what} {names} that nothing in the image {verb}: a dependency expects a C library or dynamic linker; give it a pvrun platform backend (see the README, 'Writing a guest') or drop it"
            ),
        ));
    }
    let table = file.elf_section_table();
    for sh in table.iter() {
        let ty = sh.sh_type(endian);
        let alloc = sh.sh_flags(endian).0 & elf::SHF_ALLOC.0 != 0;
        let name = table
            .section_name(endian, sh)
            .map(printable)
            .unwrap_or_default();
        if ty == elf::SHT_DYNAMIC {
            return Err(bad(
                path,
                format!(
                    "is dynamically linked (it has a `{name}` section); pvrun guests are static executables built with `cargo pvrun`"
                ),
            ));
        }
        if alloc && (ty == elf::SHT_RELA || ty == elf::SHT_REL) && sh.sh_size(endian) > 0 {
            let mut syms = Vec::new();
            if let Ok(Some((relas, link))) = sh.rela(endian, bytes)
                && let Ok(symtab) = table.symbol_table_by_index(endian, bytes, link)
            {
                for r in relas {
                    let ty = r.r_type(endian, false);
                    if ty != elf::R_X86_64_JUMP_SLOT && ty != elf::R_X86_64_GLOB_DAT {
                        continue;
                    }
                    let idx = object::SymbolIndex(r.r_sym(endian, false) as usize);
                    if let Ok(sym) = symtab.symbol(idx)
                        && let Ok(n) = symtab.symbol_name(endian, sym)
                    {
                        let n = printable(n);
                        if !n.is_empty() && !syms.contains(&n) {
                            syms.push(n);
                        }
                    }
                }
            }
            let of = if syms.is_empty() {
                String::new()
            } else {
                format!(" for {}", name_list(&syms))
            };
            return Err(bad(
                path,
                format!(
                    "needs run-time relocations (`{name}`{of}) that pvrun never applies: a dependency expects a dynamic linker; give it a pvrun platform backend or drop it"
                ),
            ));
        }
        if alloc
            && sh.sh_size(endian) > 0
            && matches!(name.as_str(), ".plt" | ".plt.got" | ".plt.sec")
        {
            return Err(bad(
                path,
                format!(
                    "has a procedure linkage table (`{name}`) whose entries nothing fills; pvrun guests are static executables built with `cargo pvrun`"
                ),
            ));
        }
        // A `.got.plt` alone (three reserved words in a static link) is harmless: entries
        // that need filling come with the JUMP_SLOT relocations refused above.
    }
    Ok(())
}

/// "`a`, `b`, `c` and 2 more".
fn name_list(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(NAMED_SYMBOLS)
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > NAMED_SYMBOLS {
        s.push_str(&format!(" and {} more", names.len() - NAMED_SYMBOLS));
    }
    s
}

/// What the `pvrun` notes say.
#[derive(Default)]
struct Notes {
    abi_version: Option<u32>,
    devices: Vec<(u32, String)>,
}

impl Notes {
    /// Reads the notes of one PT_NOTE segment (file range `offset..offset + size`). Notes of
    /// other owners are skipped; any note whose framing does not fit is an error, so no
    /// other data can be misread as a `pvrun` note.
    fn parse(
        &mut self,
        path: &Path,
        bytes: &[u8],
        offset: u64,
        size: u64,
        p_align: u64,
    ) -> Result<(), Error> {
        let malformed = |what: String| bad(path, format!("has a malformed note segment ({what})"));
        let align: u64 = match p_align {
            0 | 1 | 4 => 4,
            8 => 8,
            a => return Err(malformed(format!("alignment {a}, not 4"))),
        };
        if !offset.is_multiple_of(4) {
            return Err(malformed(format!(
                "offset {offset:#x} is not 4-byte aligned"
            )));
        }
        let data = offset
            .checked_add(size)
            .filter(|&end| end <= bytes.len() as u64)
            .map(|end| &bytes[offset as usize..end as usize])
            .ok_or_else(|| {
                malformed(format!(
                    "{size} bytes at {offset:#x} run past the end of the file"
                ))
            })?;
        let mut pos = 0u64;
        let len = data.len() as u64;
        while pos < len {
            let at = offset + pos;
            let rest = &data[pos as usize..];
            if rest.len() < 12 {
                if rest.iter().all(|&b| b == 0) {
                    break; // padding
                }
                return Err(malformed(format!("a truncated note at {at:#x}")));
            }
            let namesz = u64::from(u32_at(rest, 0));
            let descsz = u64::from(u32_at(rest, 4));
            let ty = u32_at(rest, 8);
            let name_end = 12 + namesz;
            let desc_start = align_up(name_end, align).unwrap_or(u64::MAX);
            let desc_end = desc_start.saturating_add(descsz);
            if desc_end > rest.len() as u64 {
                return Err(malformed(format!(
                    "the note at {at:#x} (n_namesz {namesz}, n_descsz {descsz}) runs past the segment"
                )));
            }
            let name = &rest[12..name_end as usize];
            let desc = &rest[desc_start as usize..desc_end as usize];
            pos += align_up(desc_end, align)
                .unwrap_or(u64::MAX)
                .min(rest.len() as u64);
            // The owner is exactly "pvrun" with its NUL (n_namesz 6).
            if name.strip_suffix(b"\0") != Some(NOTE_NAME) {
                continue;
            }
            match ty {
                NOTE_TYPE_ABI_VERSION => {
                    let d: [u8; 4] = desc.try_into().map_err(|_| {
                        bad(
                            path,
                            format!(
                                "has a malformed pvrun ABI note at {at:#x} (n_descsz {descsz}, not 4)"
                            ),
                        )
                    })?;
                    let v = u32::from_le_bytes(d);
                    match self.abi_version {
                        Some(old) if old != v => {
                            return Err(bad(
                                path,
                                format!("has two pvrun ABI notes that disagree (v{old} and v{v})"),
                            ));
                        }
                        _ => self.abi_version = Some(v),
                    }
                }
                NOTE_TYPE_DEVICE => {
                    if desc.len() != 36 {
                        return Err(bad(
                            path,
                            format!(
                                "has a malformed pvrun device note at {at:#x} (n_descsz {descsz}, not 36)"
                            ),
                        ));
                    }
                    let kind = u32_at(desc, 0);
                    let name = device_name(path, &desc[4..36])?;
                    self.devices.push((kind, name));
                }
                // Other types may come with later ABI versions; the version note decides.
                _ => {}
            }
        }
        Ok(())
    }
}

/// The NUL-padded name of a device note, which the host prints in messages: non-empty,
/// UTF-8, no control characters.
fn device_name(path: &Path, raw: &[u8]) -> Result<String, Error> {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let refuse = |why: &str| {
        bad(
            path,
            format!(
                "declares a device whose name {why} (`{}`)",
                printable(&raw[..end])
            ),
        )
    };
    if end == 0 {
        return Err(bad(path, "declares a device with an empty name"));
    }
    if raw[end..].iter().any(|&b| b != 0) {
        return Err(bad(
            path,
            format!(
                "declares a device whose name is not NUL-padded (`{}`)",
                printable(raw)
            ),
        ));
    }
    let name = std::str::from_utf8(&raw[..end]).map_err(|_| refuse("is not UTF-8"))?;
    if name.chars().any(needs_escape) {
        return Err(refuse("contains control characters"));
    }
    Ok(name.to_string())
}

#[cfg(test)]
mod tests;
