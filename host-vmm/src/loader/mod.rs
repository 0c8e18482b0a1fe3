//! Guest ELF images: validation, the ABI note, loading into guest memory, and symbols.
//!
//! A guest is a static `ET_EXEC` x86-64 ELF whose PT_LOAD segments lie above
//! [`GUEST_IMAGE_BASE`], are never both writable and executable, and which carries a
//! `pvrun` ABI-version note. Loading copies the segments with linux-loader (which checks
//! neither the type nor the machine, hence the checks here) and zeroes BSS.

pub mod debuginfo;

use std::io::Cursor;
use std::path::Path;

use linux_loader::loader::{KernelLoader, elf::Elf as ElfLoader};
use object::elf;
use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
use object::{Endianness, Object, ObjectSymbol, SymbolKind};
use pvrun_abi::{ABI_VERSION, NOTE_NAME, NOTE_TYPE_ABI_VERSION, NOTE_TYPE_DEVICE, perm};
use vm_memory::{Bytes, GuestAddress};

use crate::error::Error;
use crate::layout::{GUEST_IMAGE_BASE, PAGE_SIZE, align_down, align_up};
use crate::memory::GuestRam;

/// One PT_LOAD segment, page-rounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Virtual address in the ELF.
    pub vaddr: u64,
    /// Bytes present in the file.
    pub filesz: u64,
    /// Bytes in memory (the rest is BSS).
    pub memsz: u64,
    /// First page (4 KiB aligned).
    pub page_start: u64,
    /// End of the last page (4 KiB aligned, exclusive).
    pub page_end: u64,
    /// [`pvrun_abi::perm`] bits.
    pub perm: u32,
}

/// A function symbol, for naming fault addresses.
#[derive(Clone, Debug)]
struct Symbol {
    addr: u64,
    size: u64,
    name: String,
}

/// A validated guest image, ready to load into any number of VMs.
pub struct GuestImage {
    bytes: Vec<u8>,
    /// Entry point (`_start`).
    pub entry: u64,
    /// PT_LOAD segments sorted by address.
    pub segments: Vec<Segment>,
    /// The ABI version from the guest's note.
    pub abi_version: u32,
    /// Devices the guest declares it needs: (kind, name).
    pub required_devices: Vec<(u32, String)>,
    /// The path it was loaded from (for messages).
    pub path: String,
    symbols: Vec<Symbol>,
}

fn bad(path: &Path, what: impl Into<String>) -> Error {
    Error::BadElf {
        path: path.display().to_string(),
        reason: what.into(),
    }
}

impl GuestImage {
    /// Reads and validates a guest ELF file.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let bytes = std::fs::read(path).map_err(|e| Error::ReadGuest {
            path: path.display().to_string(),
            source: e,
        })?;
        Self::from_bytes(path, bytes)
    }

    /// Validates a guest ELF held in memory (`path` is only used in messages).
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self, Error> {
        if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
            return Err(bad(path, "is not an ELF file"));
        }
        if bytes.len() < 5 || bytes[4] != elf::ELFCLASS64.0 {
            return Err(bad(
                path,
                "is a 32-bit ELF; pvrun guests are x86-64 (ELFCLASS64) binaries",
            ));
        }
        let file = ElfFile64::<Endianness>::parse(&bytes[..])
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
        if endian != Endianness::Little {
            return Err(bad(
                path,
                "is big-endian; pvrun runs little-endian x86-64 guests",
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

        let mut segments = Vec::new();
        let mut abi_version = None;
        let mut required_devices = Vec::new();
        let phdrs = file.elf_program_headers();
        for ph in phdrs {
            match ph.p_type(endian) {
                elf::PT_LOAD => {
                    let vaddr = ph.p_vaddr(endian);
                    let paddr = ph.p_paddr(endian);
                    let filesz = ph.p_filesz(endian);
                    let memsz = ph.p_memsz(endian);
                    let offset = ph.p_offset(endian);
                    let flags = ph.p_flags(endian);
                    if memsz == 0 {
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
                    if filesz > memsz {
                        return Err(bad(
                            path,
                            format!("segment at {vaddr:#x} has file size larger than memory size"),
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
                    if let Ok(Some(mut notes)) = ph.notes(endian, &bytes[..]) {
                        while let Ok(Some(note)) = notes.next() {
                            if note.name() != NOTE_NAME {
                                continue;
                            }
                            let d = note.desc();
                            let ty = note.n_type(endian).0;
                            if ty == NOTE_TYPE_ABI_VERSION && d.len() >= 4 {
                                abi_version = Some(u32::from_le_bytes([d[0], d[1], d[2], d[3]]));
                            } else if ty == NOTE_TYPE_DEVICE && d.len() >= 36 {
                                let kind = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
                                let name = &d[4..36];
                                let end = name.iter().position(|&b| b == 0).unwrap_or(32);
                                let name = String::from_utf8_lossy(&name[..end]).into_owned();
                                required_devices.push((kind, name));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        let abi_version = abi_version.ok_or_else(|| {
            bad(
                path,
                "is not a pvrun guest: it has no `pvrun` ABI note (build it with `cargo pvrun` from a crate that uses guest-sdk)",
            )
        })?;
        if abi_version != ABI_VERSION {
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
            .any(|s| s.perm & perm::X != 0 && entry >= s.vaddr && entry < s.vaddr + s.memsz)
        {
            return Err(bad(
                path,
                format!("entry point {entry:#x} is not inside an executable segment"),
            ));
        }

        let mut symbols: Vec<Symbol> = file
            .symbols()
            .filter(|s| s.kind() == SymbolKind::Text && s.address() != 0)
            .filter_map(|s| {
                let name = s.name().ok()?;
                Some(Symbol {
                    addr: s.address(),
                    size: s.size(),
                    name: format!("{:#}", rustc_demangle::demangle(name)),
                })
            })
            .collect();
        symbols.sort_by_key(|s| s.addr);

        Ok(GuestImage {
            bytes,
            entry,
            segments,
            abi_version,
            required_devices,
            path: path.display().to_string(),
            symbols,
        })
    }

    /// End of the highest segment (page aligned).
    pub fn image_end(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.page_end)
            .max()
            .unwrap_or(GUEST_IMAGE_BASE)
    }

    /// Copies the segments into guest memory and zeroes their BSS.
    pub fn load(&self, ram: &GuestRam) -> Result<(), Error> {
        if self.image_end() > ram.size() {
            return Err(Error::DoesNotFit {
                needed: self.image_end(),
                available: ram.size(),
            });
        }
        ElfLoader::load(ram.mem(), None, &mut Cursor::new(&self.bytes[..]), None)
            .map_err(|e| Error::Layout(format!("cannot load the guest image: {e}")))?;
        for s in &self.segments {
            // linux-loader copies `filesz` bytes only; clear the rest of the segment. Pages of
            // a fresh VM are already zero, so only the partial page after the file data is
            // written (the memory is never reused between guests).
            let bss_start = s.vaddr + s.filesz;
            let bss_end =
                (s.vaddr + s.memsz).min(align_up(bss_start, PAGE_SIZE).unwrap_or(u64::MAX));
            if bss_end > bss_start {
                let zeros = vec![0u8; (bss_end - bss_start) as usize];
                ram.mem()
                    .write_slice(&zeros, GuestAddress(bss_start))
                    .map_err(|e| Error::Layout(format!("cannot clear BSS: {e}")))?;
            }
        }
        Ok(())
    }

    /// The name of the function containing `addr`, from the guest's symbol table.
    pub fn symbol_name(&self, addr: u64) -> Option<&str> {
        let i = self.symbols.partition_point(|s| s.addr <= addr);
        let s = self.symbols[..i].last()?;
        (s.size == 0 || addr - s.addr < s.size).then_some(s.name.as_str())
    }

    /// Names `addr` as `function+0xoffset` from the guest's symbol table, if it has one.
    pub fn symbolize(&self, addr: u64) -> Option<String> {
        let i = self.symbols.partition_point(|s| s.addr <= addr);
        let s = self.symbols[..i].last()?;
        let off = addr - s.addr;
        if s.size != 0 && off >= s.size {
            return None;
        }
        Some(format!("{}+{:#x}", s.name, off))
    }

    /// The image's DWARF, parsed now (for a report being printed), if it has any.
    pub fn debug_info(&self) -> Option<debuginfo::DebugInfo<'_>> {
        debuginfo::DebugInfo::load(&self.bytes)
    }

    /// The guest's name: the file name of its path without the extension.
    pub fn name(&self) -> String {
        Path::new(&self.path)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "guest".into())
    }

    /// The bytes of the image's memory at `addr` (up to `len`), from the file, for
    /// describing a faulting instruction without trusting guest memory.
    pub fn code_at(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let file = ElfFile64::<Endianness>::parse(&self.bytes[..]).ok()?;
        let endian = file.endian();
        for ph in file.elf_program_headers() {
            if ph.p_type(endian) != elf::PT_LOAD {
                continue;
            }
            let v = ph.p_vaddr(endian);
            let fs = ph.p_filesz(endian);
            if addr >= v && addr < v + fs {
                let off = (ph.p_offset(endian) + (addr - v)) as usize;
                let n = len.min((v + fs - addr) as usize);
                return self.bytes.get(off..off + n);
            }
        }
        None
    }
}
