//! What every benchmark needs: the example guests, the raw KVM exit floor measured in
//! the same run, medians, a console sink that keeps what a guest printed, and the
//! [`Report`] that prints a benchmark's table and writes its SVG chart (`report.rs`).
#![allow(dead_code)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use host_vmm::testing::{self as raw_guest, EXIT_LOOP, RawElf};
use host_vmm::{GuestImage, Vm, VmConfig};

// The tests' support: building the example guests (once per run), network namespaces.
#[path = "../../tests/common/mod.rs"]
mod common;
#[allow(unused_imports)] // each benchmark uses a part
pub use common::{Netns, NsGuest, guest};

// The table and the chart of a benchmark's results.
mod report;
#[allow(unused_imports)]
pub use report::{Bar, Baseline, Ratio, Report, Unit, ms, us};

/// The median.
pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Per-exit time of a CPL3 `out` loop with nothing behind it: the median of 15 batch
/// averages of 2,000 exits each.
pub fn exit_floor() -> Duration {
    let img = Arc::new(
        GuestImage::from_bytes(
            Path::new("floor"),
            raw_guest::elf(EXIT_LOOP, RawElf::default()),
        )
        .unwrap(),
    );
    let mut vm = Vm::new(img, VmConfig::default()).expect("KVM is needed for the benchmark");
    vm.raw_exit_loop(2000).unwrap();
    median(
        (0..15)
            .map(|_| vm.raw_exit_loop(2000).unwrap() / 2000)
            .collect(),
    )
}

/// A console sink that keeps what the guest printed.
#[derive(Clone, Default)]
pub struct Capture(pub Arc<Mutex<Vec<u8>>>);

impl Capture {
    /// Everything written so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
