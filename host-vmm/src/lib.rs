//! host-vmm: the pvrun host, a minimal KVM VMM for ring-3 Rust unikernels.
//!
//! The host owns ring 0. It validates and loads a static guest ELF, builds page tables
//! (W^X, null guard, stack guard, host structures out of the guest's reach), GDT, TSS with
//! an I/O bitmap that opens exactly the hypercall ports, and an IDT whose tiny ring-0 stubs
//! report exceptions; then it enters the guest at CPL3 and serves hypercalls until the guest
//! exits. No device is emulated. See `docs/ABI.md` for the guest-facing contract and
//! `docs/ARCHITECTURE.md` for the map of this crate.
//!
//! Programs: [`Vm`] boots a guest from a [`GuestImage`] and a [`VmConfig`] and runs it to
//! an [`Outcome`]. Function guests: [`Sandbox`] calls functions in a guest reset to its
//! initialised state between calls; [`Template`] makes more of them; [`SandboxPool`] serves
//! concurrent callers; [`WarmSandbox`] keeps its state and takes calls without VM exits.
//!
//! ```no_run
//! use host_vmm::{VmConfig, run_file};
//! let outcome = run_file("hello.elf".as_ref(), VmConfig::default()).unwrap();
//! std::process::exit(outcome.exit_status());
//! ```
//!
//! The `cli` feature (off by default) adds [`cli`]: the command-line options and the HTTP
//! gateway shared by the `pvrun` and `cargo pvrun` programs.

mod arch;
mod builder;
mod config;
mod devices;
mod error;
mod function;
#[cfg(test)]
mod fuzz;
mod hypercall;
mod layout;
mod loader;
mod memory;
mod output;
mod process;
mod runtime;
mod seccomp;
mod vstate;

#[cfg(feature = "cli")]
pub mod cli;

#[doc(hidden)]
pub mod testing;

pub use config::VmConfig;
pub use devices::block::DiskConfig;
pub use devices::net::NetConfig;
pub use devices::{DeviceCounters, DeviceStats};
pub use error::Error;
pub use function::sandbox::{
    CallError, PoolLimits, PoolStats, Sandbox, SandboxConfig, SandboxCreations, SandboxPool,
    Template,
};
pub use function::snapfile::{FORMAT_VERSION as SNAPSHOT_FORMAT_VERSION, SnapshotFileInfo};
pub use function::snapshot::{Snapshot, VmShell};
pub use function::warm::{WarmOptions, WarmSandbox, WarmStats};
pub use function::{Exports, FN_DATA_MAX, HostFn};
pub use loader::{GuestImage, Segment};
pub use output::{StdStream, eprint_line, escape_controls};
pub use runtime::backtrace::{Backtrace, Crash, CrashKind, Registers};
pub use runtime::control::{KillHandle, stop_guest_on_quit, stop_guest_on_signals};
pub use runtime::fault::Fault;
pub use runtime::gdb::{GdbListener, GdbSession, parse_gdb_addr};
pub use runtime::outcome::{
    EXIT_FAULT, EXIT_HOST_ERROR, EXIT_KILLED, EXIT_PANIC, EXIT_TIMEOUT, Outcome,
};
pub use runtime::stats::{EXIT_KINDS, VmStats};
pub use runtime::{Vm, run_file};

/// Checks that the KVM device can be opened (the error says what to do when it cannot).
pub fn check_kvm() -> Result<(), Error> {
    vstate::kvm::kvm().map(|_| ())
}
