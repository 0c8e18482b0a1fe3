//! Boots hand-assembled guests: the exit loop, and broken ELF files the host must refuse.

use std::path::Path;
use std::sync::Arc;

use host_vmm::testing::{self as raw_guest, EXIT_LOOP, RawElf};
use host_vmm::{Error, GuestImage, Outcome, Vm, VmConfig};

fn image(code: &[u8], opts: RawElf) -> Result<GuestImage, Error> {
    GuestImage::from_bytes(Path::new("raw.elf"), raw_guest::elf(code, opts))
}

#[test]
fn raw_out_loop_exits_once_per_out_and_keeps_running() {
    let img = Arc::new(image(EXIT_LOOP, RawElf::default()).unwrap());
    let cfg = VmConfig {
        timeout: Some(std::time::Duration::from_millis(200)),
        ..VmConfig::default()
    };
    let mut vm = Vm::new(img, cfg).expect("boot (needs /dev/kvm)");
    // Fails unless each of the 1000 entries ends in a port-I/O exit.
    vm.raw_exit_loop(1000).unwrap();
    // Served by the run loop, the `out` is an unassigned hypercall: answered with an
    // error, the guest goes on looping until the timeout stops it.
    assert!(matches!(vm.run().unwrap(), Outcome::TimedOut(_)));
    assert!(vm.exits() > 100, "only {} exits in 200 ms", vm.exits());
}

#[test]
fn exit_hypercall_with_code_from_raw_guest() {
    // lea rdi,[rip+args]; mov dx,0x502; out dx,al; ud2; args: .quad 7
    let code = [
        0x48, 0x8d, 0x3d, 0x09, 0x00, 0x00, 0x00, // lea rdi, [rip+9]
        0x66, 0xba, 0x02, 0x05, // mov dx, 0x502
        0xee, // out dx, al
        0x0f, 0x0b, // ud2
        0x90, 0x90, // pad to 8-byte alignment of args at 0x200010
        7, 0, 0, 0, 0, 0, 0, 0,
    ];
    let img = Arc::new(image(&code, RawElf::default()).unwrap());
    let mut vm = Vm::new(img, VmConfig::default()).unwrap();
    assert_eq!(vm.run().unwrap(), Outcome::Exited(7));
}

fn refused(bytes: Vec<u8>) -> String {
    match GuestImage::from_bytes(Path::new("bad.elf"), bytes) {
        Ok(_) => panic!("a broken guest image was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn broken_elf_files_are_refused_with_a_reason() {
    let ok = RawElf::default();
    assert!(refused(b"#!/bin/sh\necho hi\n".to_vec()).contains("is not an ELF file"));
    assert!(refused(Vec::new()).contains("is not an ELF file"));
    let mut elf32 = raw_guest::elf(EXIT_LOOP, ok);
    elf32[4] = 1;
    assert!(refused(elf32).contains("32-bit"));
    let arm = refused(raw_guest::elf(EXIT_LOOP, RawElf { machine: 183, ..ok }));
    assert!(arm.contains("another architecture"), "{arm}");
    let pie = refused(raw_guest::elf(EXIT_LOOP, RawElf { e_type: 3, ..ok }));
    assert!(pie.contains("position-independent"), "{pie}");
    let rel = refused(raw_guest::elf(EXIT_LOOP, RawElf { e_type: 1, ..ok }));
    assert!(rel.contains("relocatable"), "{rel}");
    let no_note = refused(raw_guest::elf(
        EXIT_LOOP,
        RawElf {
            abi_version: None,
            ..ok
        },
    ));
    assert!(no_note.contains("not a pvrun guest"), "{no_note}");
    let future = refused(raw_guest::elf(
        EXIT_LOOP,
        RawElf {
            abi_version: Some(99),
            ..ok
        },
    ));
    assert!(
        future.contains("ABI v99") && future.contains("rebuild"),
        "{future}"
    );
    let low = refused(raw_guest::elf(
        EXIT_LOOP,
        RawElf {
            vaddr: 0x1000,
            ..ok
        },
    ));
    assert!(low.contains("below 0x200000"), "{low}");
    let null = refused(raw_guest::elf(EXIT_LOOP, RawElf { vaddr: 0, ..ok }));
    assert!(null.contains("below 0x200000"), "{null}");
    let wx = refused(raw_guest::elf(EXIT_LOOP, RawElf { flags: 7, ..ok }));
    assert!(wx.contains("W^X"), "{wx}");
    let wrap = refused(raw_guest::elf(
        EXIT_LOOP,
        RawElf {
            vaddr: u64::MAX - 0xfff,
            ..ok
        },
    ));
    assert!(wrap.contains("overflows"), "{wrap}");
    // Truncated file: the segment claims bytes past the end.
    let mut cut = raw_guest::elf(EXIT_LOOP, ok);
    cut.truncate(cut.len() - 3);
    assert!(refused(cut).contains("past the end of the file"));
}

#[test]
fn a_guest_larger_than_memory_is_refused_before_boot() {
    let img = Arc::new(
        image(
            EXIT_LOOP,
            RawElf {
                bss: 1 << 30,
                ..RawElf::default()
            },
        )
        .unwrap(),
    );
    let err = Vm::new(img.clone(), VmConfig::default())
        .err()
        .expect("must not fit");
    assert!(err.to_string().contains("raise --mem"), "{err}");
    // With enough memory the same image boots.
    let cfg = VmConfig {
        mem_size: 2 << 30,
        ..VmConfig::default()
    };
    assert!(Vm::new(img, cfg).is_ok());
}

#[test]
fn bad_memory_sizes_are_refused() {
    let img = Arc::new(image(EXIT_LOOP, RawElf::default()).unwrap());
    for size in [0, 4 << 20, (64 << 20) + 4096, 1 << 40] {
        let cfg = VmConfig {
            mem_size: size,
            ..VmConfig::default()
        };
        let err = Vm::new(img.clone(), cfg).err().expect("bad size accepted");
        assert!(matches!(err, Error::BadMemSize(_)), "{err}");
    }
}
