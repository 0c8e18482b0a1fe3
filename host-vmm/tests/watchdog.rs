//! The process's one watchdog thread must exist before a thread that runs a VM with a
//! timeout confines itself. A VM given its timeout only after its thread confined itself
//! gets a clear error, not a process killed by its own seccomp filter. (One test alone in
//! its binary, so no other test has started the watchdog.)

mod common;

use std::sync::Arc;
use std::time::Duration;

use host_vmm::{GuestImage, Vm, VmConfig};

#[test]
fn a_timeout_set_after_confinement_is_an_error_not_a_killed_process() {
    let image = Arc::new(GuestImage::from_file(&common::guest("hello")).unwrap());
    let mut vm = Vm::new(
        image,
        VmConfig {
            stdout: Box::new(std::io::sink()),
            ..VmConfig::default()
        },
    )
    .expect("needs /dev/kvm");
    let r = std::thread::spawn(move || {
        vm.confine_thread().unwrap();
        vm.set_timeout(Some(Duration::from_secs(5)));
        vm.run().map(|o| o.exit_status())
    })
    .join()
    .expect("the confined thread panicked");
    let err = r.expect_err("a run with a timeout but no watchdog thread started");
    assert!(
        err.to_string().contains("watchdog") && err.to_string().contains("before"),
        "{err}"
    );
}
