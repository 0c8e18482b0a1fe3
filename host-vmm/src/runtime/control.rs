//! Stopping a running guest from another thread or a signal: the per-VM [`RunControl`]
//! with its watchdog (timeouts), [`KillHandle`], and the process's SIGINT/SIGTERM (and, for
//! the `pvrun` runner, SIGQUIT) handling.
//!
//! Stopping records the reason and sends the vCPU thread a real-time signal ("kick"). The
//! kick's handler runs on the vCPU thread and sets that vCPU's `immediate_exit` flag (as
//! Firecracker does: no other thread writes into `kvm_run` behind the vCPU's back), so
//! `KVM_RUN` returns whether the guest is in the middle of an instruction loop or about to
//! enter; a guest sleeping in `WAIT` is woken through [`Notify`] and by the signal
//! interrupting its `poll`.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::{JoinHandle, Thread};
use std::time::Instant;

use kvm_bindings::kvm_run;

use super::notify::Notify;
use crate::error::Error;

/// Why a run was asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// The run's deadline passed.
    Timeout,
    /// A [`KillHandle`] was used.
    Kill,
    /// The process got this terminating signal.
    Signal(i32),
}

const STOP_NONE: u8 = 0;
const STOP_TIMEOUT: u8 = 1;
const STOP_KILL: u8 = 2;

/// The running vCPU thread, as another thread needs it to interrupt `KVM_RUN`.
struct Target {
    tid: libc::pthread_t,
    thread: Thread,
}

/// The watchdog's schedule.
#[derive(Default)]
struct Deadline {
    /// When the current run must stop.
    stop_at: Option<Instant>,
    /// When the watchdog will next wake up on its own (None: it sleeps until notified).
    wakes_at: Option<Instant>,
}

/// Per-VM stop state, shared with the watchdog and every [`KillHandle`].
pub(crate) struct RunControl {
    reason: AtomicU8,
    target: Mutex<Option<Target>>,
    notify: Arc<Notify>,
    deadline: Mutex<Deadline>,
    deadline_cv: Condvar,
    /// Tells the watchdog thread to end.
    quit: AtomicBool,
    /// A debugger asked the running guest to stop (see [`Self::debug_break`]).
    debug_break: AtomicBool,
}

impl RunControl {
    /// Stop state for a VM whose sleeping guest is woken through `notify`.
    pub fn new(notify: Arc<Notify>) -> Arc<RunControl> {
        install_kick_handler();
        Arc::new(RunControl {
            reason: AtomicU8::new(STOP_NONE),
            target: Mutex::new(None),
            notify,
            deadline: Mutex::new(Deadline::default()),
            deadline_cv: Condvar::new(),
            quit: AtomicBool::new(false),
            debug_break: AtomicBool::new(false),
        })
    }

    /// What wakes a guest sleeping in `wait` (devices signal it too).
    pub fn notify(&self) -> &Notify {
        &self.notify
    }

    /// The same, shared.
    pub fn notify_arc(&self) -> Arc<Notify> {
        self.notify.clone()
    }

    fn stop(&self, reason: u8) {
        let _ = self
            .reason
            .compare_exchange(STOP_NONE, reason, Ordering::SeqCst, Ordering::SeqCst);
        self.kick();
    }

    /// Asks a guest running under a debugger to stop at its next exit (the kick makes
    /// one); the run loop in debug mode returns [`super::run_loop::Event::Break`].
    pub fn debug_break(&self) {
        self.debug_break.store(true, Ordering::SeqCst);
        self.kick();
    }

    /// Whether a debugger asked for a stop since the last call (and forgets it).
    pub fn take_debug_break(&self) -> bool {
        self.debug_break.swap(false, Ordering::SeqCst)
    }

    /// Wakes a sleeping guest and makes the running vCPU leave (or not enter) `KVM_RUN`.
    fn kick(&self) {
        let guard = self.target.lock().unwrap_or_else(|p| p.into_inner());
        self.notify.signal();
        if let Some(t) = guard.as_ref() {
            t.thread.unpark();
            // SAFETY: the thread is alive while registered (it deregisters under this
            // mutex before it ends); the handler only sets its own vCPU's immediate_exit.
            unsafe { libc::pthread_kill(t.tid, kick_signal()) };
        }
    }

    /// Registers the calling thread as the one running the vCPU whose `kvm_run` area is
    /// `run` (until [`Self::leave`]).
    pub fn enter(&self, run: *mut kvm_run) {
        KVM_RUN.with(|r| r.set(run));
        // SAFETY: pthread_self has no preconditions.
        let tid = unsafe { libc::pthread_self() };
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = Some(Target {
            tid,
            thread: std::thread::current(),
        });
        register_vcpu_thread(tid as u64);
    }

    /// The vCPU thread is no longer running the guest.
    pub fn leave(&self) {
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // SAFETY: pthread_self has no preconditions.
        unregister_vcpu_thread(unsafe { libc::pthread_self() } as u64);
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
    }

    /// Whether (and why) the current run must stop.
    pub fn stopped(&self) -> Option<StopReason> {
        let sig = INTERRUPTED.load(Ordering::SeqCst);
        if sig != 0 {
            return Some(StopReason::Signal(sig));
        }
        match self.reason.load(Ordering::SeqCst) {
            STOP_TIMEOUT => Some(StopReason::Timeout),
            STOP_KILL => Some(StopReason::Kill),
            _ => None,
        }
    }

    /// Forgets a kill or timeout request.
    pub fn clear(&self) {
        self.reason.store(STOP_NONE, Ordering::SeqCst);
    }

    /// Sets (or clears) the deadline. The watchdog is woken only when it would otherwise
    /// sleep past the new deadline: arming each call of a sandbox costs no thread wake-up.
    pub fn arm(&self, deadline: Option<Instant>) {
        let mut st = self.deadline.lock().unwrap_or_else(|p| p.into_inner());
        st.stop_at = deadline;
        let wake = match (deadline, st.wakes_at) {
            (Some(new), Some(wakes_at)) => new < wakes_at,
            (Some(_), None) => true,
            (None, _) => false,
        };
        drop(st);
        if wake || self.quit.load(Ordering::SeqCst) {
            self.deadline_cv.notify_all();
        }
    }

    /// Starts the watchdog thread: one per VM (on the first run with a timeout), so a
    /// timed call costs no thread spawn.
    pub fn start_watchdog(self: &Arc<Self>) -> Result<JoinHandle<()>, Error> {
        let control = self.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let handle = std::thread::Builder::new()
            .name("pvrun-watchdog".into())
            .spawn(move || {
                crate::seccomp::confine_or_exit(crate::seccomp::ThreadKind::Watchdog);
                let _ = ready_tx.send(());
                control.watchdog()
            })
            .map_err(Error::Io)?;
        // Return only once the thread is confined: no host thread runs unconfined, not
        // even for the moment after it starts.
        let _ = ready_rx.recv();
        Ok(handle)
    }

    /// Makes this stop state fit for a new VM: no stop request, no deadline, no debugger
    /// break, no pending wake-up (the watchdog thread, if any, keeps serving it).
    pub fn reset_for_reuse(&self) {
        self.clear();
        self.debug_break.store(false, Ordering::SeqCst);
        self.arm(None);
        self.notify.clear();
    }

    /// Ends the watchdog thread (the caller joins it).
    pub fn quit(&self) {
        self.quit.store(true, Ordering::SeqCst);
        self.arm(None);
    }

    /// The watchdog thread: stops the guest when the armed deadline passes.
    fn watchdog(self: Arc<Self>) {
        let mut d = self.deadline.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if self.quit.load(Ordering::SeqCst) {
                return;
            }
            match d.stop_at {
                None => {
                    d.wakes_at = None;
                    d = self.deadline_cv.wait(d).unwrap_or_else(|p| p.into_inner());
                }
                Some(t) => {
                    let now = Instant::now();
                    if now >= t {
                        d.stop_at = None;
                        drop(d);
                        self.stop(STOP_TIMEOUT);
                        d = self.deadline.lock().unwrap_or_else(|p| p.into_inner());
                    } else {
                        d.wakes_at = Some(t);
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
pub struct KillHandle(pub(crate) Arc<RunControl>);

impl KillHandle {
    /// Stops the guest; its run ends with [`crate::Outcome::Killed`]. Harmless if it has
    /// ended.
    pub fn kill(&self) {
        self.0.stop(STOP_KILL);
    }
}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

thread_local! {
    /// The `kvm_run` area of the vCPU this thread is running (null: none). Const-initialised
    /// and without a destructor, so the kick handler may read it.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick: on the vCPU thread itself, make the vCPU leave (or not enter) the guest.
extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own vCPU's kvm_run mapping, registered while
        // the vCPU is alive and running on this thread; a volatile byte store.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Whether the run on this thread has been asked to stop (a kick arrived, or the process
/// got a terminating signal): for host work done on the vCPU thread that could block, such
/// as writing guest output.
pub(crate) fn stop_pending() -> bool {
    if INTERRUPTED.load(Ordering::SeqCst) != 0 {
        return true;
    }
    let run = KVM_RUN.with(|r| r.get());
    // SAFETY: this thread's own vCPU's kvm_run mapping, alive while registered.
    !run.is_null() && unsafe { std::ptr::addr_of!((*run).immediate_exit).read_volatile() } != 0
}

/// The terminating signal the process got, if any (0: none). A process-wide fact: once a
/// program asked for [`stop_guest_on_signals`] and got SIGINT/SIGTERM, every guest stops.
static INTERRUPTED: AtomicI32 = AtomicI32::new(0);

/// The terminating signal the process got since [`stop_guest_on_signals`] (0: none), for
/// host work outside a run that must stop too (reading a call's input from stdin).
pub(crate) fn terminating_signal() -> i32 {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Threads running a vCPU in this process, for the terminating-signal handler to kick
/// (0: free slot). A thread beyond the slots still stops: it sees [`INTERRUPTED`] at its
/// next exit, and a `WAIT` sleeps at most one second at a time.
static VCPU_THREADS: [AtomicU64; 64] = [const { AtomicU64::new(0) }; 64];

fn register_vcpu_thread(tid: u64) {
    for slot in &VCPU_THREADS {
        if slot
            .compare_exchange(0, tid, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return;
        }
    }
}

fn unregister_vcpu_thread(tid: u64) {
    for slot in &VCPU_THREADS {
        if slot
            .compare_exchange(tid, 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return;
        }
    }
}

extern "C" fn on_terminate(sig: libc::c_int) {
    INTERRUPTED.store(sig, Ordering::SeqCst);
    for slot in &VCPU_THREADS {
        let t = slot.load(Ordering::SeqCst);
        if t != 0 {
            // SAFETY: pthread_kill is async-signal-safe; a registered thread is alive (it
            // unregisters before it stops running a vCPU).
            unsafe { libc::pthread_kill(t as libc::pthread_t, kick_signal()) };
        }
    }
}

/// Makes SIGINT and SIGTERM stop the running guest cleanly (its console output is
/// delivered and the run ends with [`crate::Outcome::Interrupted`]) instead of killing
/// the process. For single-VM programs such as the `pvrun` runner.
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

/// Makes SIGQUIT stop the running guest too ([`crate::Outcome::Interrupted`] with
/// `SIGQUIT`, exit status 131), with the guest's registers and call stack at the stop kept
/// in [`crate::Vm::crash`] (for its report and a core file), instead of the default
/// core-dumping kill of the host process. For the single-VM `pvrun` runner.
pub fn stop_guest_on_quit() {
    install_kick_handler();
    // SAFETY: as in `stop_guest_on_signals`.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_terminate as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGQUIT, &sa, std::ptr::null_mut());
    }
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Without SA_RESTART, so KVM_RUN returns EINTR.
        let _ = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick);
    });
}

/// A VM's stop state with its watchdog thread already running, kept apart from any VM so
/// a pool can give it to a sandbox it creates later on a confined thread (which cannot
/// start the watchdog thread or create the eventfd itself). See
/// `SandboxPool::confine_callers`.
pub(crate) struct SpareControl {
    pub control: Arc<RunControl>,
    pub watchdog: JoinHandle<()>,
}

impl SpareControl {
    /// A new stop state and its watchdog (on an unconfined thread: it creates an eventfd
    /// and starts a thread).
    pub fn new() -> Result<SpareControl, Error> {
        let control = RunControl::new(Arc::new(Notify::new()?));
        let watchdog = control.start_watchdog()?;
        Ok(SpareControl { control, watchdog })
    }

    /// Ends the watchdog thread and waits for it.
    pub fn end(self) {
        self.control.quit();
        let _ = self.watchdog.join();
    }
}
