//! host-vmm: the pvrun host, a minimal KVM VMM for ring-3 Rust unikernels.
//!
//! The host owns ring 0. It validates and loads a static guest ELF, builds page tables
//! (W^X, null guard, stack guard, host structures out of the guest's reach), GDT, TSS with
//! an I/O bitmap that opens exactly the hypercall ports, and an IDT whose tiny ring-0 stubs
//! report exceptions; then it enters the guest at CPL3 and serves hypercalls until the guest
//! exits. No device is emulated. See `docs/ABI.md` for the guest-facing contract.
//!
//! ```no_run
//! use host_vmm::{VmConfig, run_file};
//! let outcome = run_file("hello.elf".as_ref(), VmConfig::default()).unwrap();
//! std::process::exit(outcome.exit_status());
//! ```

pub mod arch;
pub mod block;
pub mod boot;
pub mod cli;
pub mod devices;
pub mod elf;
pub mod error;
pub mod fault;
pub mod gateway;
pub mod hypercall;
pub mod layout;
pub mod memory;
pub mod net;
pub mod raw_guest;
pub mod ring;
pub mod sandbox;
pub mod seccomp;
pub mod vm;

pub use elf::GuestImage;
pub use error::Error;
pub use fault::Fault;
pub use vm::{
    EXIT_FAULT, EXIT_HOST_ERROR, EXIT_KILLED, EXIT_PANIC, EXIT_TIMEOUT, KillHandle, Outcome, Vm,
    VmConfig, run_file,
};
