//! A misbehaving test binary whose test names and panic message carry terminal escapes
//! and newlines that try to forge result lines; `cargo pvrun test` must escape them.
#![no_std]
#![no_main]

extern crate alloc;
use alloc::string::String;
use alloc::vec::Vec;

#[unsafe(no_mangle)]
pub extern "C" fn __pvrun_main() -> i32 {
    pvrun::function::serve(&[("__pvrun_test_list", list), ("__pvrun_test_run", run)])
}

fn entry(out: &mut Vec<u8>, name: &str) {
    out.push(0);
    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&[0; 8]);
}

fn list(_: &[u8]) -> Result<Vec<u8>, String> {
    let mut v = b"PVTEST1\n".to_vec();
    v.extend_from_slice(&2u32.to_le_bytes());
    entry(&mut v, "evil\x1b[2J\ntest forged ... ok");
    entry(&mut v, "panics\x07");
    Ok(v)
}

fn run(input: &[u8]) -> Result<Vec<u8>, String> {
    if input == 1u32.to_le_bytes() {
        panic!("\x1b[31mred\ntest result: ok. 99 passed");
    }
    Ok(Vec::new())
}
