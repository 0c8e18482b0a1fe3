//! A VM running one guest: builds it from a validated image and a configuration, runs the
//! vCPU on the calling thread, dispatches hypercalls, and turns whatever the guest does
//! into an [`Outcome`].
//!
//! Stopping a running guest from another thread (a timeout, [`KillHandle::kill`]) sets the
//! vCPU's `immediate_exit` flag and sends the vCPU thread a real-time signal, so `KVM_RUN`
//! returns whether the guest is in the middle of an instruction loop, about to enter, or
//! sleeping in `wait`.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvm_bindings::{Msrs, kvm_msr_entry, kvm_run, kvm_userspace_memory_region};
use kvm_ioctls::{Cap, Kvm, SyncReg, VcpuExit, VcpuFd, VmFd};
use pvrun_abi::{EXCEPTION_PORT, HYPERCALL_PORT_BASE, HYPERCALL_PORT_COUNT, perm, region};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::cpu::{CpuSetup, VcpuState};
use crate::arch::paging;
use crate::block::DiskConfig;
use crate::boot::{self, BootFacts};
use crate::devices::{self, DeviceCounters, Devices, Notify};
use crate::elf::GuestImage;
use crate::error::Error;
use crate::fault::{self, Fault};
use crate::hypercall::{self, Action, Console, Exports, FN_DATA_MAX, FnContext, GuestView, HostFn};
use crate::layout::*;
use crate::memory::{GuestRam, HOST_ONLY, MemoryMap, MemorySnapshot, Region};

/// Exit status when the guest panics (or calls `abort`).
pub const EXIT_PANIC: i32 = 101;
/// Exit status when the guest takes a CPU exception or otherwise crashes.
pub const EXIT_FAULT: i32 = 139;
/// Exit status when the guest runs past its timeout.
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit status when the guest is killed from the host.
pub const EXIT_KILLED: i32 = 137;
/// Exit status when the host could not start the guest at all.
pub const EXIT_HOST_ERROR: i32 = 125;

/// How a VM is set up.
pub struct VmConfig {
    /// Guest memory in bytes (a multiple of 2 MiB).
    pub mem_size: u64,
    /// Arguments, including `argv[0]`.
    pub args: Vec<String>,
    /// Environment, as (key, value).
    pub env: Vec<(String, String)>,
    /// Stop the guest after this long.
    pub timeout: Option<Duration>,
    /// Where guest stdout goes.
    pub stdout: Box<dyn Write + Send>,
    /// Where guest stderr goes.
    pub stderr: Box<dyn Write + Send>,
    /// Disks to attach.
    pub disks: Vec<DiskConfig>,
    /// Network interfaces to attach.
    pub nets: Vec<crate::net::NetConfig>,
    /// Functions the guest may call by name (`HOST_CALL`).
    pub host_functions: Arc<HashMap<String, HostFn>>,
    /// Largest output a function call may return.
    pub max_output: u64,
    /// Serve doorbells through KVM ioeventfds (true) or as exits to the run loop (false;
    /// slower, for measurement).
    pub ioeventfd: bool,
    /// Track which guest pages are written (KVM dirty logging), for snapshot restore.
    pub dirty_log: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mem_size: DEFAULT_MEM_SIZE,
            args: vec!["guest".into()],
            env: Vec::new(),
            timeout: None,
            stdout: Box::new(std::io::stdout()),
            stderr: Box::new(std::io::stderr()),
            disks: Vec::new(),
            nets: Vec::new(),
            host_functions: Arc::default(),
            max_output: FN_DATA_MAX,
            ioeventfd: true,
            dirty_log: false,
        }
    }
}

/// How a guest run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest called `exit(code)`.
    Exited(i32),
    /// The guest panicked or aborted with this message.
    Panicked(String),
    /// The guest crashed (CPU exception, triple fault, protocol violation).
    Fault(Fault),
    /// The guest ran past its timeout and was stopped.
    TimedOut(Duration),
    /// The guest was killed through a [`KillHandle`].
    Killed,
    /// The host process got this signal (SIGINT, SIGTERM) and stopped the guest.
    Interrupted(i32),
    /// A function guest finished initialising and waits for calls (it can be resumed
    /// with [`Vm::start_call`]).
    Ready(Exports),
    /// A function guest finished a call (it can be resumed with [`Vm::start_call`]).
    Returned {
        /// 0 for a result, otherwise an error whose output is a message.
        status: i64,
        /// The output, or its length when it was over the limit.
        output: Result<Vec<u8>, u64>,
    },
}

impl Outcome {
    /// The process exit status of this outcome (see the README's contract).
    pub fn exit_status(&self) -> i32 {
        match self {
            Outcome::Exited(c) => *c,
            Outcome::Panicked(_) => EXIT_PANIC,
            Outcome::Fault(_) => EXIT_FAULT,
            Outcome::TimedOut(_) => EXIT_TIMEOUT,
            Outcome::Killed => EXIT_KILLED,
            Outcome::Interrupted(sig) => 128 + sig,
            Outcome::Ready(_) | Outcome::Returned { .. } => EXIT_HOST_ERROR,
        }
    }

    /// The one-line report for stderr, if the outcome is not a normal exit.
    pub fn report(&self) -> Option<String> {
        match self {
            Outcome::Exited(_) => None,
            Outcome::Panicked(m) if m.starts_with("panicked") => Some(format!("pvrun: guest {m}")),
            Outcome::Panicked(m) => Some(format!("pvrun: guest aborted: {m}")),
            Outcome::Fault(f) => Some(format!("pvrun: guest crashed: {f}")),
            Outcome::TimedOut(t) => Some(format!(
                "pvrun: guest timed out after {:.3} s and was stopped",
                t.as_secs_f64()
            )),
            Outcome::Killed => Some("pvrun: guest was killed".into()),
            Outcome::Interrupted(sig) => {
                Some(format!("pvrun: interrupted by signal {sig}; guest stopped"))
            }
            Outcome::Ready(_) | Outcome::Returned { .. } => Some(
                "pvrun: error: this guest is a function sandbox (it waits for calls); serve it with `pvrun serve GUEST --listen ADDR`"
                    .into(),
            ),
        }
    }
}

static KVM: OnceLock<Kvm> = OnceLock::new();
static CPU: OnceLock<(CpuSetup, bool)> = OnceLock::new();

/// The process-wide KVM handle, opened on first use with a clear error. The device is
/// `/dev/kvm`, or the path in `PVRUN_KVM_DEVICE` (for tests of the error paths).
pub fn kvm() -> Result<&'static Kvm, Error> {
    if let Some(k) = KVM.get() {
        return Ok(k);
    }
    let path = std::env::var("PVRUN_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".into());
    let cpath = std::ffi::CString::new(path.clone())
        .map_err(|_| Error::KvmOpen(path.clone(), std::io::ErrorKind::InvalidInput.into()))?;
    let k = Kvm::new_with_path(cpath).map_err(|e| match e.errno() {
        libc::ENOENT => Error::NoKvm(path.clone()),
        libc::EACCES | libc::EPERM => Error::KvmPermission(path.clone()),
        _ => Error::KvmOpen(path.clone(), std::io::Error::from_raw_os_error(e.errno())),
    })?;
    if k.get_api_version() != 12 {
        return Err(Error::KvmOpen(
            path,
            std::io::Error::other("it is not a KVM device (KVM_GET_API_VERSION did not answer 12)"),
        ));
    }
    Ok(KVM.get_or_init(|| k))
}

fn cpu_setup(kvm: &Kvm) -> Result<&'static (CpuSetup, bool), Error> {
    if let Some(c) = CPU.get() {
        return Ok(c);
    }
    let c = CpuSetup::new(kvm)?;
    let sync = kvm.check_extension(Cap::SyncRegs);
    Ok(CPU.get_or_init(|| (c, sync)))
}

const STOP_NONE: u8 = 0;
const STOP_TIMEOUT: u8 = 1;
const STOP_KILL: u8 = 2;

/// The running vCPU thread, as another thread needs it to interrupt `KVM_RUN`.
struct Target {
    tid: libc::pthread_t,
    run: *mut kvm_run,
    thread: Thread,
}

// SAFETY: `run` points at the vCPU's kvm_run mapping and is only used while the vCPU is
// alive (the target is cleared under the mutex before the vCPU can be dropped).
unsafe impl Send for Target {}

struct RunControl {
    reason: AtomicU8,
    target: Mutex<Option<Target>>,
    notify: Arc<Notify>,
    /// When the current run must stop, and when the watchdog will next wake up on its
    /// own (None: it sleeps until notified).
    deadline: Mutex<(Option<Instant>, Option<Instant>)>,
    deadline_cv: std::sync::Condvar,
    /// Tells the watchdog thread to end.
    quit: std::sync::atomic::AtomicBool,
}

impl RunControl {
    fn stop(&self, reason: u8) {
        let _ = self
            .reason
            .compare_exchange(STOP_NONE, reason, Ordering::SeqCst, Ordering::SeqCst);
        let guard = self.target.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = guard.as_ref() {
            // SAFETY: the vCPU (and its kvm_run mapping) is alive while `target` is set.
            unsafe { std::ptr::addr_of_mut!((*t.run).immediate_exit).write_volatile(1) };
            t.thread.unpark();
            self.notify.signal();
            // SAFETY: the thread is alive while registered; the signal's handler is a no-op.
            unsafe { libc::pthread_kill(t.tid, kick_signal()) };
        }
    }
}

impl RunControl {
    /// Sets (or clears) the deadline. The watchdog is woken only when it would otherwise
    /// sleep past the new deadline: arming each call of a sandbox costs no thread wake-up.
    fn arm(&self, deadline: Option<Instant>) {
        let mut st = self.deadline.lock().unwrap_or_else(|p| p.into_inner());
        st.0 = deadline;
        let wake = match (deadline, st.1) {
            (Some(new), Some(wakes_at)) => new < wakes_at,
            (Some(_), None) => true,
            (None, _) => false,
        };
        drop(st);
        if wake || self.quit.load(Ordering::SeqCst) {
            self.deadline_cv.notify_all();
        }
    }

    /// The watchdog thread: stops the guest when the armed deadline passes. One per VM
    /// (started on the first run with a timeout), so a timed call costs no thread spawn.
    fn watchdog(self: Arc<Self>) {
        let mut d = self.deadline.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if self.quit.load(Ordering::SeqCst) {
                return;
            }
            match d.0 {
                None => {
                    d.1 = None;
                    d = self.deadline_cv.wait(d).unwrap_or_else(|p| p.into_inner());
                }
                Some(t) => {
                    let now = Instant::now();
                    if now >= t {
                        d.0 = None;
                        drop(d);
                        self.stop(STOP_TIMEOUT);
                        d = self.deadline.lock().unwrap_or_else(|p| p.into_inner());
                    } else {
                        d.1 = Some(t);
                        d = self
                            .deadline_cv
                            .wait_timeout(d, t - now)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                }
            }
        }
    }
}

/// Stops a running guest from another thread.
#[derive(Clone)]
pub struct KillHandle(Arc<RunControl>);

impl KillHandle {
    /// Stops the guest; its run ends with [`Outcome::Killed`]. Harmless if it has ended.
    pub fn kill(&self) {
        self.0.stop(STOP_KILL);
    }
}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The terminating signal the process got, if any (0: none).
static INTERRUPTED: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
/// The thread running a vCPU in this process, for the signal handler to kick (0: none).
static VCPU_THREAD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

extern "C" fn on_terminate(sig: libc::c_int) {
    INTERRUPTED.store(sig, Ordering::SeqCst);
    let t = VCPU_THREAD.load(Ordering::SeqCst);
    if t != 0 {
        // SAFETY: pthread_kill is async-signal-safe; the kick handler does nothing.
        unsafe { libc::pthread_kill(t as libc::pthread_t, kick_signal()) };
    }
}

/// Makes SIGINT and SIGTERM stop the running guest cleanly (its console output is
/// delivered and the run ends with [`Outcome::Interrupted`]) instead of killing the
/// process. For single-VM programs such as the `pvrun` runner.
pub fn stop_guest_on_signals() {
    install_kick_handler();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a plain handler that only touches atomics and calls pthread_kill;
        // no SA_RESTART, so a blocking KVM_RUN returns EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_terminate as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Without SA_RESTART, so KVM_RUN returns EINTR.
        let _ = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick);
    });
}

/// A booted VM, ready to run its guest.
pub struct Vm {
    // Drop order: device threads, vcpu, then the VM, then memory.
    devices: Devices,
    vcpu: VcpuFd,
    _vm: VmFd,
    ram: GuestRam,
    map: MemoryMap,
    image: Arc<GuestImage>,
    console: Console,
    control: Arc<RunControl>,
    timeout: Option<Duration>,
    watchdog: Option<std::thread::JoinHandle<()>>,
    boot_instant: Instant,
    tsc_hz: u64,
    tsc_at_boot: u64,
    exits: u64,
    fns: FnContext,
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.control.quit.store(true, Ordering::SeqCst);
        self.control.arm(None);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
    }
}

impl Vm {
    /// Creates the VM, loads the image, writes boot info and sets the vCPU at the entry.
    pub fn new(image: Arc<GuestImage>, config: VmConfig) -> Result<Vm, Error> {
        let mem_size = config.mem_size;
        if !(MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&mem_size)
            || !mem_size.is_multiple_of(LARGE_PAGE_SIZE)
        {
            return Err(Error::BadMemSize(mem_size));
        }
        let kvm = kvm()?;
        // The first VM of a process asks KVM for its CPUID table (~0.3 ms on PVM hosts);
        // do that on another thread while this one creates the VM and loads memory.
        let cpu_pending = match CPU.get() {
            Some(_) => None,
            None => Some(std::thread::spawn(move || cpu_setup(kvm).map(|_| ()))),
        };

        // Layout: image, heap up to the guard, guard, stack at the top.
        let heap_start = align_up(image.image_end(), LARGE_PAGE_SIZE).unwrap_or(u64::MAX);
        let stack_start = mem_size - STACK_SIZE;
        let heap_end = stack_start - STACK_GUARD_SIZE;
        if heap_start.saturating_add(MIN_HEAP_SIZE) > heap_end {
            return Err(Error::DoesNotFit {
                needed: heap_start.saturating_add(MIN_HEAP_SIZE + STACK_GUARD_SIZE + STACK_SIZE),
                available: mem_size,
            });
        }
        let host = |start, end, perm| Region {
            start,
            end,
            kind: HOST_ONLY,
            perm,
            user: false,
        };
        let mut regions = vec![
            host(GDT_ADDR, GDT_ADDR + PAGE_SIZE, perm::R | perm::W),
            host(IDT_ADDR, IDT_ADDR + PAGE_SIZE, perm::R),
            host(TSS_ADDR, TSS_ADDR + PAGE_SIZE, perm::R | perm::W),
            host(STUBS_ADDR, STUBS_ADDR + PAGE_SIZE, perm::R | perm::X),
            host(R0_STACK_BOTTOM, R0_STACK_TOP, perm::R | perm::W),
            Region {
                start: CONSOLE_RING_ADDR,
                end: CONSOLE_DATA_ADDR + CONSOLE_DATA_SIZE,
                kind: region::CONSOLE,
                perm: perm::R | perm::W,
                user: true,
            },
            Region {
                start: BOOT_INFO_ADDR,
                end: BOOT_INFO_END,
                kind: region::BOOT_INFO,
                perm: perm::R,
                user: true,
            },
        ];
        for s in &image.segments {
            let kind = if s.perm & perm::X != 0 {
                region::TEXT
            } else if s.perm & perm::W != 0 {
                region::DATA
            } else {
                region::RODATA
            };
            regions.push(Region {
                start: s.page_start,
                end: s.page_end,
                kind,
                perm: s.perm,
                user: true,
            });
        }
        regions.push(Region {
            start: heap_start,
            end: heap_end,
            kind: region::HEAP,
            perm: perm::R | perm::W,
            user: true,
        });
        regions.push(Region {
            start: stack_start,
            end: mem_size,
            kind: region::STACK,
            perm: perm::R | perm::W,
            user: true,
        });
        // Devices: open the images and lay out their rings before anything is mapped.
        for (kind, name) in &image.required_devices {
            let attached = (*kind == pvrun_abi::device::BLOCK
                && config.disks.iter().any(|d| &d.name == name))
                || (*kind == pvrun_abi::device::NET && config.nets.iter().any(|n| &n.name == name));
            if !attached {
                let (kind, flag) = match *kind {
                    pvrun_abi::device::BLOCK => ("block", "--disk"),
                    pvrun_abi::device::NET => ("network", "--net"),
                    _ => ("unknown", "--disk"),
                };
                return Err(Error::MissingDevice {
                    path: image.path.clone(),
                    kind,
                    name: name.clone(),
                    flag,
                });
            }
        }
        let planned = devices::plan(&config.disks, &config.nets)?;
        if planned.area_end > DEVICE_AREA_ADDR {
            regions.push(Region {
                start: DEVICE_AREA_ADDR,
                end: planned.area_end,
                kind: region::DEVICES,
                perm: perm::R | perm::W,
                user: true,
            });
        }
        let map = MemoryMap::new(regions)?;

        let ram = GuestRam::new(mem_size)?;
        // Host huge pages pay off where a guest touches memory in bulk (a large heap), but
        // zeroing a whole 2 MiB chunk on first touch costs more than the few 4 KiB pages a
        // small guest touches in its image, stack and first heap chunk: measured here,
        // huge pages everywhere made `hello` boot 1.3 ms slower.
        let bulk_heap = heap_start + LARGE_PAGE_SIZE;
        if heap_end > bulk_heap {
            ram.advise_huge(bulk_heap, heap_end - bulk_heap);
        }
        image.load(&ram)?;
        crate::arch::cpu::write_system_tables(&ram)?;
        let cr3 = paging::build(&ram, &map)?;

        let (vm, mut vcpu) = create_kvm_vm(kvm, &ram, config.dirty_log)?;
        if let Some(pending) = cpu_pending {
            pending
                .join()
                .map_err(|_| Error::Layout("CPUID probe thread panicked".into()))??;
        }
        let (cpu, sync_regs) = cpu_setup(kvm)?;
        cpu.setup_vcpu(&vcpu, cr3, image.entry, mem_size, BOOT_INFO_ADDR)?;
        if *sync_regs {
            vcpu.set_sync_valid_reg(SyncReg::Register);
        }

        // Clock calibration: the guest TSC now, and the host clocks at the same instant.
        let tsc_hz = vcpu
            .get_tsc_khz()
            .map_err(|e| Error::Kvm("KVM_GET_TSC_KHZ", e))? as u64
            * 1000;
        let tsc_at_boot = guest_tsc(&vcpu)?;
        let boot_instant = Instant::now();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let facts = BootFacts {
            tsc_hz,
            tsc_at_boot,
            wall_ns_at_boot: wall,
            features: cpu.features,
        };
        boot::write(
            &ram,
            &map,
            boot::Ranges {
                heap: (heap_start, heap_end),
                stack: (stack_start, mem_size),
            },
            &config.args,
            &config.env,
            &planned.infos,
            &facts,
        )?;
        let notify = Arc::new(Notify::default());
        let devices = Devices::start(planned, &vm, ram.mem(), &map, &notify, config.ioeventfd)?;

        install_kick_handler();
        Ok(Vm {
            devices,
            vcpu,
            _vm: vm,
            ram,
            map,
            image,
            console: Console::new(config.stdout, config.stderr),
            control: Arc::new(RunControl {
                reason: AtomicU8::new(STOP_NONE),
                target: Mutex::new(None),
                notify,
                deadline: Mutex::new((None, None)),
                deadline_cv: std::sync::Condvar::new(),
                quit: std::sync::atomic::AtomicBool::new(false),
            }),
            timeout: config.timeout,
            watchdog: None,
            boot_instant,
            tsc_hz,
            tsc_at_boot,
            exits: 0,
            fns: FnContext {
                host_fns: config.host_functions,
                max_output: config.max_output,
                host_writes: Vec::new(),
            },
        })
    }

    /// Freezes a function guest paused at its `FN_READY` exit ([`Outcome::Ready`]): its
    /// memory, vCPU state and console position. The VM can then be reset to it
    /// ([`Vm::restore`]) and new VMs made from it ([`Vm::from_snapshot`]). Needs
    /// [`VmConfig::dirty_log`].
    pub fn snapshot(&mut self, exports: Exports) -> Result<Snapshot, Error> {
        // Resuming means: after the `out` of FN_READY, with rax = 0. Let KVM finish that
        // `out` first (some KVMs, PVM among them, have already moved RIP past it at the
        // exit; others do it on the next entry), so RIP is past it on every host.
        self.set_rax(0)?;
        self.finish_pending_exit()?;
        let vcpu = VcpuState::capture(&self.vcpu)?;
        let insn: u8 = self
            .ram
            .mem()
            .read_obj(GuestAddress(vcpu.regs.rip.wrapping_sub(1)))
            .unwrap_or(0);
        if insn != 0xee || vcpu.regs.rax != 0 {
            return Err(Error::Config(format!(
                "guest `{}` issued FN_READY with an instruction other than the one-byte `out dx, al`; it cannot be snapshotted",
                self.image.path
            )));
        }
        let guest_tsc = guest_tsc(&self.vcpu)?;
        let memory = self.ram.snapshot()?;
        // From here on, the dirty log lists exactly what calls change.
        self.take_dirty_log()?;
        self.fns.host_writes.clear();
        Ok(Snapshot {
            memory,
            image: self.image.clone(),
            map: self.map.clone(),
            vcpu,
            console_consumed: self.console.consumed(),
            exports,
            guest_tsc,
            tsc_hz: self.tsc_hz,
            tsc_at_boot: self.tsc_at_boot,
            taken: Instant::now(),
            host_functions: self.fns.host_fns.clone(),
            max_output: self.fns.max_output,
        })
    }

    /// Resets the VM to `snap` (which must be this VM's snapshot or one it was made from):
    /// the pages written since (KVM's dirty log plus the host's own writes) get their
    /// snapshot contents back, and the vCPU its registers. Returns the pages restored.
    pub fn restore(&mut self, snap: &Snapshot) -> Result<usize, Error> {
        let dirty = self.take_dirty_log()?;
        let mut pages = self.ram.restore_pages(&snap.memory, &dirty);
        for (start, len) in self.fns.host_writes.drain(..) {
            self.ram.restore_range(&snap.memory, start, len);
            pages += len.div_ceil(PAGE_SIZE) as usize;
        }
        // The host writes the console consumer index: put the header back too.
        self.ram
            .restore_range(&snap.memory, CONSOLE_RING_ADDR, PAGE_SIZE);
        self.console.set_consumed(snap.console_consumed);
        // Complete whatever exit the vCPU stopped at, so nothing of it is applied on top
        // of the registers restored below.
        self.clear_stop();
        self.finish_pending_exit()?;
        if CPU.get().is_some_and(|c| c.1) {
            let sync = self.vcpu.sync_regs_mut();
            sync.regs = snap.vcpu.regs;
            sync.sregs = snap.vcpu.sregs;
            self.vcpu.set_sync_dirty_reg(SyncReg::Register);
            self.vcpu.set_sync_dirty_reg(SyncReg::SystemRegister);
        } else {
            self.vcpu
                .set_sregs(&snap.vcpu.sregs)
                .map_err(|e| Error::Kvm("KVM_SET_SREGS", e))?;
            self.vcpu
                .set_regs(&snap.vcpu.regs)
                .map_err(|e| Error::Kvm("KVM_SET_REGS", e))?;
        }
        snap.vcpu.load_extended(&self.vcpu)?;
        self.clear_stop();
        Ok(pages)
    }

    /// Makes a new VM from a snapshot: its memory is a copy-on-write view of the snapshot
    /// and its vCPU resumes where the snapshot's stopped, with the guest clocks advanced
    /// by the time the snapshot was kept.
    pub fn from_snapshot(
        snap: &Arc<Snapshot>,
        stdout: Box<dyn Write + Send>,
        stderr: Box<dyn Write + Send>,
        timeout: Option<Duration>,
    ) -> Result<Vm, Error> {
        Self::from_snapshot_in(None, snap, stdout, stderr, timeout)
    }

    /// Like [`Vm::from_snapshot`], in a VM created ahead of time ([`VmShell`]) when one
    /// is given: what is left to do is mapping the snapshot and loading registers.
    pub fn from_snapshot_in(
        shell: Option<VmShell>,
        snap: &Arc<Snapshot>,
        stdout: Box<dyn Write + Send>,
        stderr: Box<dyn Write + Send>,
        timeout: Option<Duration>,
    ) -> Result<Vm, Error> {
        let kvm = kvm()?;
        let (cpu, sync_regs) = cpu_setup(kvm)?;
        let (ram, vm, mut vcpu) = match shell {
            Some(shell) if shell.ram.size() == snap.mem_size() => {
                shell.ram.map_snapshot(&snap.memory)?;
                cpu.load_state(&shell.vcpu, &snap.vcpu)?;
                (shell.ram, shell.vm, shell.vcpu)
            }
            _ => {
                let ram = GuestRam::from_snapshot(&snap.memory)?;
                let (vm, vcpu) = create_kvm_vm(kvm, &ram, true)?;
                cpu.restore_vcpu(&vcpu, &snap.vcpu)?;
                (ram, vm, vcpu)
            }
        };
        if *sync_regs {
            vcpu.set_sync_valid_reg(SyncReg::Register);
            // The shared register area is only filled by KVM_RUN; a call started before
            // the first run edits it, so it must hold the real registers already.
            let sync = vcpu.sync_regs_mut();
            sync.regs = snap.vcpu.regs;
            sync.sregs = snap.vcpu.sregs;
        }
        // Guest time goes on: the TSC continues from the snapshot plus the time since.
        let elapsed = snap.taken.elapsed();
        let ticks = (elapsed.as_nanos() * snap.tsc_hz as u128 / 1_000_000_000) as u64;
        let tsc = snap.guest_tsc.wrapping_add(ticks);
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: 0x10,
            data: tsc,
            ..Default::default()
        }])
        .map_err(|_| Error::Layout("MSR list".into()))?;
        vcpu.set_msrs(&msrs)
            .map_err(|e| Error::Kvm("KVM_SET_MSRS", e))?;
        let now_ns = (tsc.wrapping_sub(snap.tsc_at_boot) as u128 * 1_000_000_000
            / snap.tsc_hz.max(1) as u128) as u64;
        let boot_instant = Instant::now()
            .checked_sub(Duration::from_nanos(now_ns))
            .unwrap_or_else(Instant::now);
        let mut console = Console::new(stdout, stderr);
        console.set_consumed(snap.console_consumed);
        install_kick_handler();
        Ok(Vm {
            devices: Devices::default(),
            vcpu,
            _vm: vm,
            ram,
            map: snap.map.clone(),
            image: snap.image.clone(),
            console,
            control: Arc::new(RunControl {
                reason: AtomicU8::new(STOP_NONE),
                target: Mutex::new(None),
                notify: Arc::new(Notify::default()),
                deadline: Mutex::new((None, None)),
                deadline_cv: std::sync::Condvar::new(),
                quit: std::sync::atomic::AtomicBool::new(false),
            }),
            timeout,
            watchdog: None,
            boot_instant,
            tsc_hz: snap.tsc_hz,
            tsc_at_boot: snap.tsc_at_boot,
            exits: 0,
            fns: FnContext {
                host_fns: snap.host_functions.clone(),
                max_output: snap.max_output,
                host_writes: Vec::new(),
            },
        })
    }

    /// Starts function `index` of a function guest paused at `FN_READY` or `FN_RETURN`:
    /// writes the call header and input into the guest's input buffer. Run the VM next.
    pub fn start_call(&mut self, exports: &Exports, index: u32, input: &[u8]) -> Result<(), Error> {
        let header = pvrun_abi::FnCall {
            index,
            reserved: 0,
            input_len: input.len() as u64,
        };
        let hsize = size_of::<pvrun_abi::FnCall>() as u64;
        if hsize + input.len() as u64 > exports.inbuf_len {
            return Err(Error::Config(format!(
                "input of {} bytes does not fit the guest's {}-byte input buffer",
                input.len(),
                exports.inbuf_len - hsize
            )));
        }
        let mem = self.ram.mem();
        mem.write_obj(header, GuestAddress(exports.inbuf))
            .and_then(|_| mem.write_slice(input, GuestAddress(exports.inbuf + hsize)))
            .map_err(|e| Error::Layout(format!("cannot write the call input: {e}")))?;
        self.fns
            .host_writes
            .push((exports.inbuf, hsize + input.len() as u64));
        self.set_rax(0)
    }

    /// Lets KVM complete the instruction the vCPU exited at (it finishes an `out` on the
    /// next `KVM_RUN`) without running the guest: a `KVM_RUN` with `immediate_exit` set.
    fn finish_pending_exit(&mut self) -> Result<(), Error> {
        self.vcpu.set_kvm_immediate_exit(1);
        let r = self.vcpu.run().map(|_| ()).map_err(|e| e.errno());
        self.vcpu.set_kvm_immediate_exit(0);
        match r {
            Err(libc::EINTR) => Ok(()),
            Err(e) => Err(Error::Kvm("KVM_RUN", kvm_ioctls::Error::new(e))),
            Ok(()) => Err(Error::Layout(
                "the vCPU ran although immediate_exit was set".into(),
            )),
        }
    }

    /// Sets how long each later [`Vm::run`] may take.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// Forgets an earlier stop request (kill or timeout), so the next run proceeds.
    pub fn clear_stop(&mut self) {
        self.control.reason.store(STOP_NONE, Ordering::SeqCst);
        self.vcpu.set_kvm_immediate_exit(0);
    }

    /// A handle that stops this VM's guest from another thread.
    pub fn kill_handle(&self) -> KillHandle {
        KillHandle(self.control.clone())
    }

    /// Runs the guest until it exits, crashes, times out or is killed.
    pub fn run(&mut self) -> Result<Outcome, Error> {
        let started = Instant::now();
        {
            let mut t = self
                .control
                .target
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            *t = Some(Target {
                // SAFETY: pthread_self has no preconditions.
                tid: unsafe { libc::pthread_self() },
                run: self.vcpu.get_kvm_run() as *mut kvm_run,
                thread: std::thread::current(),
            });
        }
        // SAFETY: pthread_self has no preconditions.
        VCPU_THREAD.store(unsafe { libc::pthread_self() } as u64, Ordering::SeqCst);
        if let Some(t) = self.timeout {
            if self.watchdog.is_none() {
                let control = self.control.clone();
                self.watchdog = Some(
                    std::thread::Builder::new()
                        .name("pvrun-watchdog".into())
                        .spawn(move || control.watchdog())
                        .map_err(Error::Io)?,
                );
            }
            self.control.arm(Some(started + t));
        }
        let r = self.run_loop();
        if self.timeout.is_some() {
            self.control.arm(None);
        }
        *self
            .control
            .target
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        VCPU_THREAD.store(0, Ordering::SeqCst);
        r.map(|o| match o {
            Outcome::TimedOut(_) => Outcome::TimedOut(started.elapsed()),
            o => o,
        })
    }

    fn stopped(&self) -> Option<Outcome> {
        let sig = INTERRUPTED.load(Ordering::SeqCst);
        if sig != 0 {
            return Some(Outcome::Interrupted(sig));
        }
        match self.control.reason.load(Ordering::SeqCst) {
            STOP_TIMEOUT => Some(Outcome::TimedOut(Duration::ZERO)),
            STOP_KILL => Some(Outcome::Killed),
            _ => None,
        }
    }

    fn run_loop(&mut self) -> Result<Outcome, Error> {
        enum Exit {
            Out(u16),
            In(u16),
            Mmio(u64),
            Shutdown,
            Hlt,
            Interrupted,
            Other(String),
        }
        loop {
            if let Some(o) = self.stopped() {
                return Ok(o);
            }
            self.exits += 1;
            let exit = match self.vcpu.run() {
                Ok(VcpuExit::IoOut(port, _)) => Exit::Out(port),
                Ok(VcpuExit::IoIn(port, data)) => {
                    data.fill(0xff);
                    Exit::In(port)
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    data.fill(0xff);
                    Exit::Mmio(addr)
                }
                Ok(VcpuExit::MmioWrite(addr, _)) => Exit::Mmio(addr),
                Ok(VcpuExit::Shutdown) => Exit::Shutdown,
                Ok(VcpuExit::Hlt) => Exit::Hlt,
                Ok(VcpuExit::Intr) => Exit::Interrupted,
                Ok(other) => Exit::Other(format!("{other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    Exit::Interrupted
                }
                Err(e) => return Err(Error::Kvm("KVM_RUN", e)),
            };
            // Console output travels in the ring; deliver it at every exit, before anything
            // else happens, so it is never lost or reordered against a crash report.
            if let Err(msg) = self.console.drain(self.ram.mem()) {
                return Ok(Outcome::Fault(Fault::protocol(msg)));
            }
            match exit {
                // A doorbell that was not served in the kernel: hand it to the device.
                Exit::Out(port) if self.devices.ring_doorbell(port) => {}
                Exit::Out(port)
                    if (HYPERCALL_PORT_BASE..HYPERCALL_PORT_BASE + HYPERCALL_PORT_COUNT)
                        .contains(&port) =>
                {
                    let rdi = self.rdi()?;
                    let view = GuestView {
                        mem: self.ram.mem(),
                        map: &self.map,
                    };
                    let action = hypercall::dispatch(
                        port - HYPERCALL_PORT_BASE,
                        rdi,
                        &view,
                        &mut self.console,
                        &mut self.fns,
                    );
                    match action {
                        Action::Return(v) => self.set_rax(v as u64)?,
                        Action::Exit(code) => return Ok(Outcome::Exited(code)),
                        Action::Abort(msg) => return Ok(Outcome::Panicked(msg)),
                        Action::Fault(msg) => return Ok(Outcome::Fault(Fault::protocol(msg))),
                        Action::Ready(exports) => return Ok(Outcome::Ready(exports)),
                        Action::Returned { status, output } => {
                            return Ok(Outcome::Returned { status, output });
                        }
                        Action::Wait(deadline_ns) => {
                            if let Some(o) = self.wait(deadline_ns) {
                                return Ok(o);
                            }
                            self.set_rax(0)?;
                        }
                    }
                }
                Exit::Out(EXCEPTION_PORT) => return Ok(Outcome::Fault(self.exception())),
                Exit::Out(port) => {
                    return Ok(Outcome::Fault(Fault::protocol(format!(
                        "unexpected write to I/O port {port:#x}"
                    ))));
                }
                Exit::In(port) => {
                    return Ok(Outcome::Fault(Fault::protocol(format!(
                        "read from I/O port {port:#x} (hypercalls use `out`)"
                    ))));
                }
                Exit::Mmio(addr) => {
                    return Ok(Outcome::Fault(Fault::protocol(format!(
                        "access to unbacked guest-physical address {addr:#x}"
                    ))));
                }
                Exit::Shutdown => {
                    return Ok(Outcome::Fault(Fault::protocol(
                        "triple fault (the CPU could not deliver an exception)".into(),
                    )));
                }
                Exit::Hlt => {
                    return Ok(Outcome::Fault(Fault::protocol("halted".into())));
                }
                Exit::Interrupted => {
                    if let Some(o) = self.stopped() {
                        return Ok(o);
                    }
                    self.vcpu.set_kvm_immediate_exit(0);
                }
                Exit::Other(what) => {
                    return Ok(Outcome::Fault(Fault::protocol(format!(
                        "unexpected VM exit {what}"
                    ))));
                }
            }
        }
    }

    fn rdi(&mut self) -> Result<u64, Error> {
        if CPU.get().is_some_and(|c| c.1) {
            Ok(self.vcpu.sync_regs_mut().regs.rdi)
        } else {
            Ok(self
                .vcpu
                .get_regs()
                .map_err(|e| Error::Kvm("KVM_GET_REGS", e))?
                .rdi)
        }
    }

    fn set_rax(&mut self, v: u64) -> Result<(), Error> {
        if CPU.get().is_some_and(|c| c.1) {
            self.vcpu.sync_regs_mut().regs.rax = v;
            self.vcpu.set_sync_dirty_reg(SyncReg::Register);
            Ok(())
        } else {
            let mut regs = self
                .vcpu
                .get_regs()
                .map_err(|e| Error::Kvm("KVM_GET_REGS", e))?;
            regs.rax = v;
            self.vcpu
                .set_regs(&regs)
                .map_err(|e| Error::Kvm("KVM_SET_REGS", e))
        }
    }

    /// Sleeps until the guest deadline, a device event, or a stop; `Some` if stopped.
    fn wait(&mut self, deadline_ns: u64) -> Option<Outcome> {
        let target = self
            .boot_instant
            .checked_add(Duration::from_nanos(deadline_ns));
        loop {
            if let Some(o) = self.stopped() {
                return Some(o);
            }
            let now = Instant::now();
            let left = match target {
                Some(t) if now >= t => return None,
                Some(t) => t - now,
                None => Duration::from_secs(1),
            };
            if self.control.notify.wait(left) {
                // A device published responses (or a stop was requested: checked above
                // on the next turn).
                return self.stopped();
            }
        }
    }

    /// Reads the exception frame the ring-0 stub left and describes the fault.
    fn exception(&mut self) -> Fault {
        let rsp = match self.vcpu.get_regs() {
            Ok(r) => r.rsp,
            Err(e) => return Fault::protocol(format!("cannot read registers: {e}")),
        };
        let cr2 = self.vcpu.get_sregs().map(|s| s.cr2).unwrap_or(0);
        // The stub pushed [vector, error code] on top of the CPU's frame
        // [rip, cs, rflags, rsp, ss], all on the host-owned ring-0 stack.
        if !(R0_STACK_BOTTOM..=R0_STACK_TOP - 7 * 8).contains(&rsp) {
            return Fault::protocol(format!("exception stub ran with a bad stack {rsp:#x}"));
        }
        let mut frame = [0u64; 7];
        for (i, slot) in frame.iter_mut().enumerate() {
            *slot = self
                .ram
                .mem()
                .read_obj::<u64>(GuestAddress(rsp + 8 * i as u64))
                .unwrap_or(0);
        }
        fault::describe(
            frame[0],
            frame[1],
            frame[2],
            frame[3],
            cr2,
            &self.image,
            &self.map,
        )
    }

    /// Benchmark support: re-enters the guest for `n` exits of any kind without handling
    /// them, and returns the time taken. With [`crate::raw_guest::EXIT_LOOP`] as the guest
    /// this is the raw KVM exit floor of this machine.
    pub fn raw_exit_loop(&mut self, n: u64) -> Result<Duration, Error> {
        let t = Instant::now();
        for _ in 0..n {
            match self.vcpu.run() {
                Ok(VcpuExit::IoOut(..)) => {}
                Ok(other) => {
                    return Err(Error::Layout(format!(
                        "raw exit loop: unexpected exit {other:?}"
                    )));
                }
                Err(e) => return Err(Error::Kvm("KVM_RUN", e)),
            }
        }
        Ok(t.elapsed())
    }

    /// Ends the process with `status` without waiting for KVM to destroy the VM (~0.5 ms
    /// on PVM hosts): a child sharing our memory keeps a copy of the VM's file descriptors,
    /// waits until this process is gone and only then lets them close. For one-shot
    /// command-line runners; falls back to a plain exit if the child cannot be made.
    pub fn exit_process(self, status: i32) -> ! {
        use std::os::fd::AsRawFd;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        deferred_teardown([self.vcpu.as_raw_fd(), self._vm.as_raw_fd()]);
        // SAFETY: _exit ends the process; nothing else runs afterwards.
        unsafe { libc::_exit(status) }
    }

    /// The guest pages written since the last call (KVM dirty log; needs
    /// [`VmConfig::dirty_log`]), as a bitmap of 4 KiB pages.
    pub fn take_dirty_log(&self) -> Result<Vec<u64>, Error> {
        self._vm
            .get_dirty_log(0, self.ram.size() as usize)
            .map_err(|e| Error::Kvm("KVM_GET_DIRTY_LOG", e))
    }

    /// Counters of the attached devices, by name.
    pub fn device_counters(&self) -> Vec<(String, DeviceCounters)> {
        self.devices.counters()
    }

    /// VM exits to host user space so far (doorbells served by ioeventfds are not
    /// among them; see [`Vm::device_counters`]).
    pub fn exits(&self) -> u64 {
        self.exits
    }

    /// Whether doorbells are served by KVM ioeventfds.
    pub fn ioeventfd(&self) -> bool {
        self.devices.ioeventfd
    }
}

/// What the teardown child needs: the parent's pid and the two descriptors to keep.
#[repr(C)]
struct TeardownArgs {
    parent: libc::pid_t,
    keep: [libc::c_int; 2],
}

/// The child of [`Vm::exit_process`]: it holds a copy of the parent's descriptors, closes
/// all but the VM's and the vCPU's (so pipes see EOF and disk images are unlocked at
/// once), waits for the parent to exit, and then exits itself, which destroys the VM.
extern "C" fn teardown_child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: the parent passed a pointer to a TeardownArgs that it never frees (it exits).
    let args = unsafe { &*(arg as *const TeardownArgs) };
    let mut keep = args.keep;
    keep.sort_unstable();
    // SAFETY: only raw system calls; the child touches no Rust state of the parent.
    unsafe {
        let mut first = 0;
        for k in keep {
            if k > first {
                libc::syscall(
                    libc::SYS_close_range,
                    first as libc::c_uint,
                    (k - 1) as libc::c_uint,
                    0,
                );
            }
            first = k + 1;
        }
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            0,
        );
        while libc::getppid() == args.parent {
            libc::usleep(100);
        }
    }
    0
}

fn deferred_teardown(keep: [libc::c_int; 2]) {
    // Leaked on purpose: the parent exits right after, the child reads it.
    let args = Box::leak(Box::new(TeardownArgs {
        // SAFETY: getpid has no preconditions.
        parent: unsafe { libc::getpid() },
        keep,
    }));
    const STACK: usize = 64 * 1024;
    // SAFETY: a fresh private stack for the child; checked below. CLONE_VM shares memory
    // (no copy of the guest's pages); the descriptor table is copied, not shared.
    unsafe {
        let stack = libc::mmap(
            std::ptr::null_mut(),
            STACK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if stack == libc::MAP_FAILED {
            return;
        }
        let top = (stack as *mut u8).add(STACK).cast::<libc::c_void>();
        libc::clone(
            teardown_child,
            top,
            libc::CLONE_VM,
            (args as *mut TeardownArgs).cast(),
        );
    }
}

/// A KVM VM and vCPU created ahead of time over empty memory of a given size (with dirty
/// logging), to be turned into a sandbox from a snapshot later without waiting for KVM
/// to create them (~0.4 ms on PVM hosts).
pub struct VmShell {
    // Drop order: vCPU, VM, memory.
    vcpu: VcpuFd,
    vm: VmFd,
    ram: GuestRam,
}

impl VmShell {
    /// Creates a VM, a vCPU with its CPUID table, and `mem_size` bytes of memory.
    pub fn new(mem_size: u64) -> Result<VmShell, Error> {
        let kvm = kvm()?;
        let (cpu, _) = cpu_setup(kvm)?;
        let ram = GuestRam::new(mem_size)?;
        let (vm, vcpu) = create_kvm_vm(kvm, &ram, true)?;
        cpu.set_cpuid(&vcpu)?;
        Ok(VmShell { vcpu, vm, ram })
    }
}

/// A function guest frozen at its `FN_READY` exit: what a sandbox is reset to between
/// calls, and what new sandboxes start from. See [`Vm::snapshot`].
pub struct Snapshot {
    memory: MemorySnapshot,
    image: Arc<GuestImage>,
    map: MemoryMap,
    vcpu: VcpuState,
    console_consumed: u64,
    /// What the guest exports.
    pub exports: Exports,
    guest_tsc: u64,
    tsc_hz: u64,
    tsc_at_boot: u64,
    taken: Instant,
    host_functions: Arc<HashMap<String, HostFn>>,
    max_output: u64,
}

impl Snapshot {
    /// Bytes of guest memory the snapshot holds (the guest's memory size).
    pub fn mem_size(&self) -> u64 {
        self.memory.size()
    }
}

fn guest_tsc(vcpu: &VcpuFd) -> Result<u64, Error> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: 0x10, // IA32_TIME_STAMP_COUNTER
        ..Default::default()
    }])
    .map_err(|_| Error::Layout("MSR list".into()))?;
    vcpu.get_msrs(&mut msrs)
        .map_err(|e| Error::Kvm("KVM_GET_MSRS", e))?;
    Ok(msrs.as_slice()[0].data)
}

/// Creates a KVM VM over `ram` (slot 0 at guest address 0) and its vCPU.
fn create_kvm_vm(kvm: &Kvm, ram: &GuestRam, dirty_log: bool) -> Result<(VmFd, VcpuFd), Error> {
    let vm = kvm
        .create_vm()
        .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?;
    let slot = kvm_userspace_memory_region {
        slot: 0,
        flags: if dirty_log {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: 0,
        memory_size: ram.size(),
        userspace_addr: ram.host_base(),
    };
    // SAFETY: the region is our own mapping of exactly `ram.size()` bytes, and it outlives
    // the VM (field order of `Vm`).
    unsafe { vm.set_user_memory_region(slot) }
        .map_err(|e| Error::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
    Ok((vm, vcpu))
}

/// Loads `path`, boots it with `config` and runs it to the end.
pub fn run_file(path: &Path, config: VmConfig) -> Result<Outcome, Error> {
    let image = Arc::new(GuestImage::from_file(path)?);
    let mut vm = Vm::new(image, config)?;
    vm.run()
}
