//! A running VM: the [`Vm`] itself, its run loop ([`run_loop`]), how runs end
//! ([`outcome`], [`fault`]) and how they are stopped ([`control`]).

pub(crate) mod control;
pub(crate) mod fault;
pub(crate) mod notify;
pub(crate) mod outcome;
mod run_loop;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;

use crate::config::VmConfig;
use crate::devices::Devices;
use crate::error::Error;
use crate::function::FnContext;
use crate::hypercall::Console;
use crate::loader::GuestImage;
use crate::memory::{GuestRam, MemoryMap};
use crate::vstate::vcpu::Vcpu;
use control::RunControl;
use outcome::Outcome;

/// A booted VM, ready to run its guest. Built by [`Vm::new`] or
/// from a snapshot ([`Vm::from_snapshot`]).
pub struct Vm {
    // Drop order: device threads, vcpu, then the VM, then memory.
    pub(crate) devices: Devices,
    pub(crate) vcpu: Vcpu,
    pub(crate) vm: VmFd,
    pub(crate) ram: GuestRam,
    pub(crate) map: MemoryMap,
    pub(crate) image: Arc<GuestImage>,
    pub(crate) console: Console,
    pub(crate) control: Arc<RunControl>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) watchdog: Option<std::thread::JoinHandle<()>>,
    /// The host instant at which the guest's monotonic clock read 0.
    pub(crate) boot_instant: Instant,
    pub(crate) tsc_hz: u64,
    pub(crate) tsc_at_boot: u64,
    pub(crate) exits: u64,
    pub(crate) fns: FnContext,
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.control.quit();
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
    }
}

impl Vm {
    /// Creates the VM, loads the image, writes boot info and sets the vCPU at the entry.
    pub fn new(image: Arc<GuestImage>, config: VmConfig) -> Result<Vm, Error> {
        crate::builder::build(image, config)
    }
}

/// Loads `path`, boots it with `config` and runs it to the end.
pub fn run_file(path: &Path, config: VmConfig) -> Result<Outcome, Error> {
    let image = Arc::new(GuestImage::from_file(path)?);
    let mut vm = Vm::new(image, config)?;
    vm.run()
}
