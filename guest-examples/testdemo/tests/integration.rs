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
