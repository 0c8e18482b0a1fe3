//! The checks a guest ELF must pass before it is loaded: header (64-bit, little-endian,
//! x86-64, `ET_EXEC`), program headers (PT_LOAD segments above [`GUEST_IMAGE_BASE`], in
//! the file, W^X, not sharing pages; no interpreter, dynamic section or TLS), the `pvrun`
//! ABI note and device notes, and the entry point.
//!
//! Every failure is an [`Error::BadElf`] (or [`Error::AbiMismatch`]) whose reason reads as
//! the end of a one-line sentence.

use std::path::Path;

use object::Endianness;
use object::elf;
use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
use pvrun_abi::{ABI_VERSION, NOTE_NAME, NOTE_TYPE_ABI_VERSION, NOTE_TYPE_DEVICE, perm};

use super::Segment;
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
                if let Ok(Some(mut notes)) = ph.notes(endian, bytes) {
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
    Ok((
        Checked {
            entry,
            segments,
            abi_version,
            required_devices,
        },
        file,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{EXIT_LOOP, PHDR_OFFSET, RAW_TEXT, RawElf, elf as raw};

    fn checked(bytes: &[u8]) -> Result<Checked, Error> {
        check(Path::new("t.elf"), bytes).map(|(c, _)| c)
    }

    /// The reason of the `BadElf` error `bytes` must be refused with.
    fn reason(bytes: &[u8]) -> String {
        match checked(bytes) {
            Ok(_) => panic!("a broken image was accepted"),
            Err(Error::BadElf { reason, .. }) => reason,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    fn with(opts: RawElf) -> Vec<u8> {
        raw(EXIT_LOOP, opts)
    }

    fn ok() -> RawElf {
        RawElf::default()
    }

    #[test]
    fn a_well_formed_image_is_accepted() {
        let c = checked(&with(ok())).unwrap();
        assert_eq!(c.entry, RAW_TEXT);
        assert_eq!(c.abi_version, ABI_VERSION);
        assert_eq!(
            c.segments,
            [Segment {
                vaddr: RAW_TEXT,
                filesz: EXIT_LOOP.len() as u64,
                memsz: EXIT_LOOP.len() as u64,
                page_start: RAW_TEXT,
                page_end: RAW_TEXT + PAGE_SIZE,
                perm: perm::R | perm::X,
            }]
        );
        assert!(c.required_devices.is_empty());
    }

    #[test]
    fn not_an_elf() {
        assert_eq!(reason(b"#!/bin/sh\necho hi\n"), "is not an ELF file");
        assert_eq!(reason(b""), "is not an ELF file");
        assert_eq!(reason(b"\x7fEL"), "is not an ELF file");
    }

    #[test]
    fn thirty_two_bit() {
        let mut b = with(ok());
        b[4] = 1;
        assert!(reason(&b).starts_with("is a 32-bit ELF"));
        assert!(reason(b"\x7fELF").starts_with("is a 32-bit ELF"));
    }

    #[test]
    fn malformed_headers() {
        let mut b = with(ok());
        b[32..40].copy_from_slice(&(1u64 << 40).to_le_bytes()); // e_phoff past the end
        assert!(
            reason(&b).starts_with("is a malformed ELF"),
            "{}",
            reason(&b)
        );
    }

    #[test]
    fn wrong_machine() {
        let r = reason(&with(RawElf {
            machine: 183,
            ..ok()
        }));
        assert!(r.contains("another architecture (e_machine 183)"), "{r}");
    }

    #[test]
    fn position_independent() {
        let r = reason(&with(RawElf { e_type: 3, ..ok() }));
        assert!(r.contains("position-independent (ET_DYN"), "{r}");
    }

    #[test]
    fn relocatable_object() {
        let r = reason(&with(RawElf { e_type: 1, ..ok() }));
        assert!(r.contains("relocatable object (ET_REL)"), "{r}");
    }

    #[test]
    fn other_elf_type() {
        let r = reason(&with(RawElf { e_type: 4, ..ok() }));
        assert_eq!(r, "has ELF type 4, not an executable");
    }

    #[test]
    fn physical_address_differs() {
        let r = reason(&with(RawElf {
            paddr: Some(0x1000),
            ..ok()
        }));
        assert!(r.contains("different physical address (0x1000)"), "{r}");
    }

    #[test]
    fn file_size_larger_than_memory_size() {
        let r = reason(&with(RawElf {
            memsz: Some(3),
            ..ok()
        }));
        assert!(r.contains("file size larger than memory size"), "{r}");
    }

    #[test]
    fn segment_past_the_end_of_the_file() {
        let mut b = with(ok());
        b.truncate(b.len() - 3);
        assert!(reason(&b).contains("extends past the end of the file"));
    }

    #[test]
    fn segment_overflows_the_address_space() {
        let r = reason(&with(RawElf {
            vaddr: u64::MAX - 0xfff,
            ..ok()
        }));
        assert!(r.contains("overflows the address space"), "{r}");
    }

    #[test]
    fn segment_in_the_host_area() {
        for vaddr in [
            0,
            0x1000,
            crate::layout::PAGE_TABLES_ADDR,
            GUEST_IMAGE_BASE - PAGE_SIZE,
        ] {
            let r = reason(&with(RawElf { vaddr, ..ok() }));
            assert!(r.contains("below 0x200000"), "{vaddr:#x}: {r}");
        }
    }

    #[test]
    fn writable_and_executable() {
        let r = reason(&with(RawElf { flags: 7, ..ok() }));
        assert!(r.contains("W^X"), "{r}");
        let r = reason(&with(RawElf {
            second_load: Some((RAW_TEXT + 0x20_0000, 6 | 1)),
            ..ok()
        }));
        assert!(r.contains("W^X"), "{r}");
    }

    #[test]
    fn interpreter_or_dynamic_section() {
        for ty in [elf::PT_INTERP.0, elf::PT_DYNAMIC.0] {
            let r = reason(&with(RawElf {
                extra_phdr: Some(ty),
                ..ok()
            }));
            assert!(r.starts_with("is dynamically linked"), "{ty}: {r}");
        }
    }

    #[test]
    fn thread_local_storage() {
        let r = reason(&with(RawElf {
            extra_phdr: Some(elf::PT_TLS.0),
            ..ok()
        }));
        assert!(r.contains("thread-local storage"), "{r}");
    }

    #[test]
    fn no_abi_note() {
        let r = reason(&with(RawElf {
            abi_version: None,
            ..ok()
        }));
        assert!(r.starts_with("is not a pvrun guest"), "{r}");
    }

    #[test]
    fn wrong_abi_version() {
        match checked(&with(RawElf {
            abi_version: Some(99),
            ..ok()
        })) {
            Err(Error::AbiMismatch {
                guest: 99, host, ..
            }) => assert_eq!(host, ABI_VERSION),
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn no_loadable_segments() {
        let mut b = with(ok());
        let p = PHDR_OFFSET as usize;
        b[p..p + 4].copy_from_slice(&elf::PT_NULL.0.to_le_bytes());
        assert_eq!(reason(&b), "has no loadable segments");
    }

    #[test]
    fn segments_sharing_a_page() {
        let r = reason(&with(RawElf {
            second_load: Some((RAW_TEXT + 0x800, 4)),
            ..ok()
        }));
        assert!(r.contains("share a page"), "{r}");
        // A page apart is fine.
        checked(&with(RawElf {
            second_load: Some((RAW_TEXT + PAGE_SIZE, 4)),
            ..ok()
        }))
        .unwrap();
    }

    #[test]
    fn entry_outside_executable_code() {
        let r = reason(&with(RawElf {
            entry: Some(RAW_TEXT + 0x100),
            ..ok()
        }));
        assert!(r.contains("entry point 0x200100 is not inside"), "{r}");
        // Inside a segment, but not an executable one.
        let r = reason(&with(RawElf { flags: 4, ..ok() }));
        assert!(r.contains("not inside an executable segment"), "{r}");
    }

    #[test]
    fn device_notes_are_collected() {
        const NOTE: &[u8] = &{
            let mut n = [0u8; 12 + 8 + 36];
            n[0] = 6;
            n[4] = 36;
            n[8] = NOTE_TYPE_DEVICE as u8;
            let name = *b"pvrun\0\0\0";
            let mut i = 0;
            while i < 8 {
                n[12 + i] = name[i];
                i += 1;
            }
            n[20] = 1; // kind: block
            let dev = *b"disk";
            let mut i = 0;
            while i < 4 {
                n[24 + i] = dev[i];
                i += 1;
            }
            n
        };
        let c = checked(&with(RawElf {
            extra_notes: NOTE,
            ..ok()
        }))
        .unwrap();
        assert_eq!(c.required_devices, [(1, "disk".to_string())]);
    }
}
