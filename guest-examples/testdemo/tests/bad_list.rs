//! A misbehaving test binary: it serves the harness's functions itself and returns a test
//! list that claims far more tests than it holds. `cargo pvrun test` must report it
//! clearly, not trust it.
#![no_std]
#![no_main]

extern crate alloc;
use alloc::string::String;
use alloc::vec::Vec;

#[unsafe(no_mangle)]
pub extern "C" fn __pvrun_main() -> i32 {
    pvrun::function::serve(&[("__pvrun_test_list", list), ("__pvrun_test_run", run)])
}

fn list(_: &[u8]) -> Result<Vec<u8>, String> {
    let mut v = b"PVTEST1\n".to_vec();
    v.extend_from_slice(&1000u32.to_le_bytes());
    v.push(0);
    v.extend_from_slice(&u32::MAX.to_le_bytes());
    v.extend_from_slice(b"short");
    Ok(v)
}

fn run(_: &[u8]) -> Result<Vec<u8>, String> {
    Ok(Vec::new())
}
