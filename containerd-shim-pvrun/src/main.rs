//! `containerd-shim-pvrun-v1`: a containerd runtime v2 shim (runtime type
//! `io.containerd.pvrun.v1`) that runs pvrun guests packaged with `pvrun package`.
//!
//! containerd starts this binary (found on its PATH) once per container; it serves the
//! task API over ttrpc (the `containerd-shim` crate of containerd's rust-extensions does
//! the protocol, the reaper and the event publisher). Each container's guest runs in a
//! child process: this same binary re-executed as `containerd-shim-pvrun-v1 run-guest`,
//! which builds the VM at `create` and boots it at `start` (see `guest.rs`).

mod guest;
mod plan;
mod podnet;
mod service;
mod stats;

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(guest::RUN_GUEST) {
        guest::main(&argv[1..]);
    }
    if argv.get(1).map(String::as_str) == Some(guest::SERVE_GUEST) {
        guest::serve_main(&argv[1..]);
    }
    if argv.get(1).map(String::as_str) == Some(guest::POD_SANDBOX) {
        guest::pod_sandbox();
    }
    containerd_shim::run::<service::Service>(service::RUNTIME_ID, None)
}
