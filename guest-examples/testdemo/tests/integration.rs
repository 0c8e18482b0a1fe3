//! An integration test of the test demo, run in a pvrun guest by `cargo pvrun test`.
#![no_std]
#![no_main]

#[pvrun::test]
fn uses_the_library() {
    assert_eq!(testdemo::add(40, 2), 42);
}

#[pvrun::test]
#[ignore]
fn ignored_in_integration() {}

/// Prints more than the runner keeps of one test's output (1 MiB), then fails.
#[pvrun::test]
fn chatty_fails() {
    let line = [b'x'; 1023];
    for _ in 0..2048 {
        pvrun::console::write_stdout(&line);
        pvrun::console::write_stdout(b"\n");
    }
    panic!("chatty failed");
}

/// Exists only with `--features extra`.
#[cfg(feature = "extra")]
#[pvrun::test]
fn only_with_extra() {}
