//! The `pvrun` command line: clear one-line errors with status 125 for everything that
//! stops a guest from starting.

mod common;

use std::process::Command;

use common::{guest, pvrun};

fn host_error(args: &[&str]) -> String {
    let out = Command::new(common::pvrun_bin())
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(125), "args {args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.starts_with("pvrun: error: "), "{stderr}");
    stderr
}

#[test]
fn missing_file_is_one_clear_line() {
    let e = host_error(&["/nonexistent/guest.elf"]);
    assert!(
        e.contains("cannot read guest `/nonexistent/guest.elf`") && e.contains("No such file"),
        "{e}"
    );
}

#[test]
fn non_elf_file_is_one_clear_line() {
    let e = host_error(&[concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")]);
    assert!(e.contains("is not an ELF file"), "{e}");
}

#[test]
fn a_host_program_is_refused_as_pie_or_not_a_guest() {
    // /bin/true on Debian is a PIE; either way it is not a pvrun guest.
    let e = host_error(&["/bin/true"]);
    assert!(
        e.contains("position-independent") || e.contains("not a pvrun guest"),
        "{e}"
    );
}

#[test]
fn too_little_memory_says_to_raise_mem() {
    let e = host_error(&["--mem", "4M", guest("hello").to_str().unwrap()]);
    assert!(
        e.contains("memory size") && e.contains("out of range"),
        "{e}"
    );
}

#[test]
fn bad_option_values_are_usage_errors() {
    let out = Command::new(common::pvrun_bin())
        .args(["--mem", "lots", "x.elf"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a size"));
}

#[test]
fn memory_option_changes_the_guest_heap() {
    // 4 MiB fits the heap of a 64 MiB guest but not of a 14 MiB one (2 MiB of heap).
    let elf = guest("compute");
    assert_eq!(pvrun(&elf, &["--mem", "64M"], &["4"]).status, 0);
    let small = pvrun(&elf, &["--mem", "14M"], &["4"]);
    assert_eq!(small.status, 101, "{}", small.stderr);
    assert!(
        small.stderr.contains("memory allocation of"),
        "{}",
        small.stderr
    );
}

/// Runs `pvrun hello` with `device` as the KVM device; checks a one-line host error.
fn with_kvm_device(device: &str) -> String {
    let out = Command::new(common::pvrun_bin())
        .env("PVRUN_KVM_DEVICE", device)
        .arg(guest("hello"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    stderr
}

#[test]
fn missing_kvm_is_one_clear_line() {
    let e = with_kvm_device("/nonexistent/kvm");
    assert!(
        e.contains("/nonexistent/kvm does not exist: KVM is not available"),
        "{e}"
    );
}

#[test]
fn a_device_that_is_not_kvm_is_one_clear_line() {
    let e = with_kvm_device("/dev/null");
    assert!(
        e.contains("cannot open /dev/null: it is not a KVM device"),
        "{e}"
    );
}

#[test]
fn the_smallest_guest_boots_at_the_documented_minimum_and_sizes_echo_the_option() {
    let r = pvrun(&guest("hello"), &["--mem", "14M"], &[]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    let e = host_error(&["--mem", "3M", guest("hello").to_str().unwrap()]);
    assert!(e.contains("3M") && e.contains("14M"), "{e}");
}
