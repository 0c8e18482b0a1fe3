//! The guest ELF checks that keep a hostile or mislinked image from loading: empty
//! segments, extended header numbering, note framing, device names, and anything that
//! needs a dynamic linker. Every refusal is one line naming the file.

use std::path::Path;
use std::sync::Arc;

use host_vmm::testing::{
    self as raw_guest, EXIT_LOOP, PHDR_OFFSET, PHDR_SIZE, RAW_TEXT, RawElf, RawSection,
};
use host_vmm::{Error, GuestImage, Outcome, Vm, VmConfig};

fn image(bytes: Vec<u8>) -> Result<GuestImage, Error> {
    GuestImage::from_bytes(Path::new("bad.elf"), bytes)
}

fn refused(bytes: Vec<u8>) -> String {
    match image(bytes) {
        Ok(_) => panic!("a broken guest image was accepted"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with("guest `bad.elf` "), "{msg}");
            assert!(!msg.contains('\n') && !msg.contains('\x1b'), "{msg:?}");
            msg
        }
    }
}

fn with(opts: RawElf) -> Vec<u8> {
    raw_guest::elf(EXIT_LOOP, opts)
}

/// A note owned by "pvrun" of type `ty` with descriptor `desc` (4-byte padded).
const fn pvrun_note<const N: usize>(ty: u8, desc: &[u8]) -> [u8; N] {
    let mut n = [0u8; N];
    n[0] = 6;
    n[4] = desc.len() as u8;
    n[8] = ty;
    let name = b"pvrun\0";
    let mut i = 0;
    while i < name.len() {
        n[12 + i] = name[i];
        i += 1;
    }
    let mut i = 0;
    while i < desc.len() {
        n[20 + i] = desc[i];
        i += 1;
    }
    n
}

const fn device<const N: usize>(name: &[u8]) -> [u8; N] {
    let mut d = [0u8; 36];
    d[0] = 1;
    let mut i = 0;
    while i < name.len() {
        d[4 + i] = name[i];
        i += 1;
    }
    pvrun_note(2, &d)
}

#[test]
fn an_empty_segment_with_file_bytes_is_refused() {
    // p_memsz 0 used to skip every check while linux-loader still copied the file bytes to
    // p_paddr: here, the boot-info page.
    let r = refused(with(RawElf {
        memsz: Some(0),
        paddr: Some(0x1_0000),
        vaddr: 0x1_0000,
        second_load: Some((RAW_TEXT, 5)),
        entry: Some(RAW_TEXT),
        ..RawElf::default()
    }));
    assert!(r.contains("file size larger than memory size"), "{r}");
}

#[test]
fn an_empty_segment_without_file_bytes_is_never_loaded() {
    let mut b = raw_guest::elf(
        EXIT_7,
        RawElf {
            second_load: Some((0x1_0000, 6)),
            ..RawElf::default()
        },
    );
    // Make the second PT_LOAD (in the host's boot-info page) empty: p_filesz = p_memsz = 0.
    let ph = (PHDR_OFFSET + PHDR_SIZE) as usize;
    b[ph + 32..ph + 48].fill(0);
    let img = image(b.clone()).unwrap();
    assert_eq!(img.segments.len(), 1);
    assert_eq!(img.segments[0].vaddr, RAW_TEXT);
    // The empty segment sits on the boot info (no bytes of it are written) and the guest
    // boots.
    assert_eq!(boot_bytes(b), Outcome::Exited(7));
}

/// `lea rdi,[rip+9]; mov dx,0x502; out dx,al; ud2; .quad 7`: exit with status 7.
const EXIT_7: &[u8] = &[
    0x48, 0x8d, 0x3d, 0x09, 0x00, 0x00, 0x00, 0x66, 0xba, 0x02, 0x05, 0xee, 0x0f, 0x0b, 0x90, 0x90,
    7, 0, 0, 0, 0, 0, 0, 0,
];

fn boot(code: &[u8], opts: RawElf) -> Outcome {
    boot_bytes(raw_guest::elf(code, opts))
}

fn boot_bytes(bytes: Vec<u8>) -> Outcome {
    let img = image(bytes).unwrap();
    let mut vm = Vm::new(Arc::new(img), VmConfig::default()).expect("boot (needs /dev/kvm)");
    vm.run().unwrap()
}

#[test]
fn extended_program_header_numbering_is_refused() {
    let mut b = with(RawElf::default());
    b[56..58].copy_from_slice(&0xffffu16.to_le_bytes());
    let r = refused(b);
    assert!(r.contains("PN_XNUM"), "{r}");
}

#[test]
fn header_counts_and_sizes_are_bounded() {
    let mut b = with(RawElf::default());
    b[56..58].copy_from_slice(&65u16.to_le_bytes());
    assert!(refused(b).contains("65 program headers"));
    let mut b = with(RawElf::default());
    b[54..56].copy_from_slice(&64u16.to_le_bytes());
    assert!(refused(b).contains("program headers of 64 bytes"));
    // Offsets and sizes that overflow are errors, not panics.
    let mut b = with(RawElf::default());
    let ph = PHDR_OFFSET as usize;
    b[ph + 8..ph + 16].copy_from_slice(&u64::MAX.to_le_bytes()); // p_offset
    assert!(refused(b).contains("past the end of the file"));
    let mut b = with(RawElf::default());
    b[40..48].copy_from_slice(&u64::MAX.to_le_bytes()); // e_shoff
    b[60..62].copy_from_slice(&3u16.to_le_bytes());
    assert!(refused(b).contains("malformed ELF"));
    let mut b = with(RawElf::default());
    b.truncate(40);
    assert!(refused(b).contains("malformed ELF"));
}

#[test]
fn a_big_endian_file_is_refused_as_such() {
    let mut b = with(RawElf::default());
    b[5] = 2;
    assert!(refused(b).contains("is big-endian"));
}

#[test]
fn junk_in_the_note_segment_is_never_read_as_a_version() {
    // What a guest linked against libc got: relocations and symbol versions after the ABI
    // note in the note segment. They must not be parsed as notes.
    const JUNK: &[u8] = &[0, 0, 1, 0, 0xff, 0xff, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    let r = refused(with(RawElf {
        extra_notes: JUNK,
        ..RawElf::default()
    }));
    assert!(r.contains("malformed note segment"), "{r}");
    assert!(!r.contains("ABI v"), "{r}");
    // Trailing zero padding shorter than a note header is fine.
    image(with(RawElf {
        extra_notes: &[0; 8],
        ..RawElf::default()
    }))
    .unwrap();
}

#[test]
fn only_notes_owned_by_exactly_pvrun_count() {
    // "pvrunX" and "pvru" owners with a type-1, 4-byte descriptor: not ABI notes.
    const PVRUNX: &[u8] = &[
        7, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0, 0, b'p', b'v', b'r', b'u', b'n', b'X', 0, 0, 9, 0, 0, 0,
    ];
    const PVRU: &[u8] = &[
        5, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0, 0, b'p', b'v', b'r', b'u', 0, 0, 0, 0, 9, 0, 0, 0,
    ];
    for other in [PVRUNX, PVRU] {
        image(with(RawElf {
            extra_notes: other,
            ..RawElf::default()
        }))
        .unwrap();
        let r = refused(with(RawElf {
            abi_version: None,
            extra_notes: other,
            ..RawElf::default()
        }));
        assert!(r.contains("not a pvrun guest"), "{r}");
    }
}

#[test]
fn pvrun_notes_must_have_their_exact_size() {
    const LONG: [u8; 28] = pvrun_note(1, &[2, 0, 0, 0, 0, 0, 0, 0]);
    let r = refused(with(RawElf {
        abi_version: None,
        extra_notes: &LONG,
        ..RawElf::default()
    }));
    assert!(
        r.contains("malformed pvrun ABI note") && r.contains("n_descsz 8"),
        "{r}"
    );
    const SHORT_DEV: [u8; 24] = pvrun_note(2, &[1, 0, 0, 0]);
    let r = refused(with(RawElf {
        extra_notes: &SHORT_DEV,
        ..RawElf::default()
    }));
    assert!(r.contains("malformed pvrun device note"), "{r}");
    const OTHER: [u8; 24] = pvrun_note(1, &[99, 0, 0, 0]);
    let r = refused(with(RawElf {
        extra_notes: &OTHER,
        ..RawElf::default()
    }));
    assert!(r.contains("two pvrun ABI notes that disagree"), "{r}");
}

#[test]
fn device_names_are_checked_and_never_printed_raw() {
    const OK: [u8; 56] = device(b"disk0");
    let img = image(with(RawElf {
        extra_notes: &OK,
        ..RawElf::default()
    }))
    .unwrap();
    assert_eq!(img.required_devices, [(1, "disk0".to_string())]);

    const ESC: [u8; 56] = device(b"a\x1b[2Jb\n");
    let r = refused(with(RawElf {
        extra_notes: &ESC,
        ..RawElf::default()
    }));
    assert!(
        r.contains("control characters") && r.contains("a\\u{1b}[2Jb\\n"),
        "{r}"
    );
    const NOT_UTF8: [u8; 56] = device(b"d\xffk");
    let r = refused(with(RawElf {
        extra_notes: &NOT_UTF8,
        ..RawElf::default()
    }));
    assert!(r.contains("not UTF-8") && r.contains("d\\xffk"), "{r}");
    const EMPTY: [u8; 56] = device(b"");
    assert!(
        refused(with(RawElf {
            extra_notes: &EMPTY,
            ..RawElf::default()
        }))
        .contains("empty name")
    );
    const UNPADDED: [u8; 56] = device(b"a\0b");
    assert!(
        refused(with(RawElf {
            extra_notes: &UNPADDED,
            ..RawElf::default()
        }))
        .contains("not NUL-padded")
    );
}

#[test]
fn undefined_symbols_are_named() {
    let r = refused(with(RawElf {
        undefined: &["getrandom"],
        ..RawElf::default()
    }));
    assert!(
        r.contains("links symbol `getrandom` that nothing in the image defines")
            && r.contains("platform backend"),
        "{r}"
    );
    let r = refused(with(RawElf {
        undefined: &["a", "b", "c", "d", "e"],
        ..RawElf::default()
    }));
    assert!(r.contains("`a`, `b`, `c` and 2 more"), "{r}");
    let r = refused(with(RawElf {
        undefined: &["evil\x1b]0;owned\x07"],
        ..RawElf::default()
    }));
    assert!(r.contains("evil\\u{1b}]0;owned\\u{7}"), "{r}");
    // Weak undefined symbols resolve to 0 and are fine.
    image(with(RawElf {
        weak_undefined: &["__gmon_start__"],
        text_symbol: Some("_start"),
        ..RawElf::default()
    }))
    .unwrap();
}

#[test]
fn dynamic_sections_relocations_and_plts_are_refused() {
    let rela = refused(with(RawElf {
        text_symbol: Some("getrandom"),
        extra_section: Some(RawSection {
            name: ".rela.plt",
            sh_type: 4,
            flags: 2,
        }),
        ..RawElf::default()
    }));
    assert!(
        rela.contains("run-time relocations (`.rela.plt` for `getrandom`)"),
        "{rela}"
    );
    let dynamic = refused(with(RawElf {
        text_symbol: Some("_start"),
        extra_section: Some(RawSection {
            name: ".dynamic",
            sh_type: 6,
            flags: 3,
        }),
        ..RawElf::default()
    }));
    assert!(
        dynamic.contains("dynamically linked") && dynamic.contains("`.dynamic`"),
        "{dynamic}"
    );
    let plt = refused(with(RawElf {
        text_symbol: Some("_start"),
        extra_section: Some(RawSection {
            name: ".plt",
            sh_type: 1,
            flags: 6,
        }),
        ..RawElf::default()
    }));
    assert!(plt.contains("procedure linkage table (`.plt`)"), "{plt}");
    // The same sections outside memory (a relocatable leftover) do not matter.
    image(with(RawElf {
        text_symbol: Some("_start"),
        extra_section: Some(RawSection {
            name: ".rela.debug",
            sh_type: 4,
            flags: 0,
        }),
        ..RawElf::default()
    }))
    .unwrap();
}

#[test]
fn symbol_names_are_escaped_in_crash_reports() {
    let img = image(with(RawElf {
        text_symbol: Some("f\x1b[31m"),
        ..RawElf::default()
    }))
    .unwrap();
    assert_eq!(
        img.symbolize(RAW_TEXT + 2).as_deref(),
        Some("f\\u{1b}[31m+0x2")
    );
    assert_eq!(img.code_at(RAW_TEXT + 1, 100), Some(&EXIT_LOOP[1..]));
    assert_eq!(img.code_at(RAW_TEXT + 100, 1), None);
}

#[test]
fn a_checked_image_still_boots() {
    let opts = RawElf {
        text_symbol: Some("_start"),
        weak_undefined: &["__gmon_start__"],
        bss: 100,
        ..RawElf::default()
    };
    assert_eq!(boot(EXIT_7, opts), Outcome::Exited(7));
}
