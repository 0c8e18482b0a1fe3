//! One test per rejection of the ELF checks, each built with `crate::testing::elf`.

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
    let b = with(ok());
    let c = checked(&b).unwrap();
    let off = c.segments[0].offset;
    assert_eq!(&b[off as usize..][..EXIT_LOOP.len()], EXIT_LOOP);
    assert_eq!(
        c.segments,
        [Segment {
            vaddr: RAW_TEXT,
            offset: off,
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
fn version_3_guests_are_still_accepted_and_keep_their_version() {
    // ABI v4 only added the exitless mailbox: a v3 guest runs unchanged (and its boot info
    // says 3, since its SDK refuses anything else).
    let c = checked(&with(RawElf {
        abi_version: Some(3),
        ..ok()
    }))
    .expect("a v3 guest");
    assert_eq!(c.abi_version, 3);
    for v in [2, ABI_VERSION + 1] {
        assert!(
            matches!(
                checked(&with(RawElf {
                    abi_version: Some(v),
                    ..ok()
                })),
                Err(Error::AbiMismatch { guest, .. }) if guest == v
            ),
            "version {v} accepted"
        );
    }
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
