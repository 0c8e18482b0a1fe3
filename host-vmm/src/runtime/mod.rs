//! A running VM: the [`Vm`] itself, its run loop ([`run_loop`]), how runs end
//! ([`outcome`], [`fault`]) and how they are stopped ([`control`]).

pub(crate) mod backtrace;
pub(crate) mod control;
pub(crate) mod core_dump;
pub(crate) mod fault;
pub(crate) mod gdb;
pub(crate) mod notify;
pub(crate) mod outcome;
mod run_loop;
pub(crate) mod stats;

use std::path::{Path, PathBuf};
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
    pub(crate) counts: stats::Counts,
    pub(crate) fns: FnContext,
    /// The guest's state at the crash or panic that ended the last run, if it did.
    pub(crate) crash: Option<backtrace::Crash>,
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
    /// Takes this VM's stop state and watchdog thread away from it (for a later VM, see
    /// [`control::SpareControl`]); the VM must not run again. None if it has no watchdog.
    pub(crate) fn take_control(&mut self) -> Option<control::SpareControl> {
        let watchdog = self.watchdog.take()?;
        // A stop state of its own, never run: dropping the VM quits this one.
        let own = RunControl::new(self.control.notify_arc());
        let control = std::mem::replace(&mut self.control, own);
        control.reset_for_reuse();
        Some(control::SpareControl { control, watchdog })
    }
}

impl Vm {
    /// The guest's registers and call stack at the crash, panic or SIGQUIT stop
    /// ([`crate::stop_guest_on_quit`]) that ended the last [`Vm::run`] (`None` if it did
    /// not end that way).
    pub fn crash(&self) -> Option<&backtrace::Crash> {
        self.crash.as_ref()
    }

    /// Writes an ELF core file of the guest as it was at the crash or panic that ended
    /// the last run (see [`core_dump::write`]): to `path`, or to `core.NAME.PID` in it when
    /// it is a directory; an existing file is replaced only with `overwrite`. Returns the
    /// path written.
    pub fn write_core_dump(&self, path: &Path, overwrite: bool) -> std::io::Result<PathBuf> {
        let crash = self
            .crash
            .as_ref()
            .ok_or_else(|| std::io::Error::other("the guest did not crash or panic"))?;
        core_dump::write(
            path,
            overwrite,
            &self.image.name(),
            crash,
            self.ram.mem(),
            &self.map,
        )
    }

    /// The image this VM runs.
    pub fn image(&self) -> &GuestImage {
        &self.image
    }

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
