//! Function sandboxes: call a function in an untrusted guest, one VM per sandbox, and
//! reset the VM to its initialised state between calls.
//!
//! A function guest (see `pvrun::function` in the SDK) initialises, declares its exports
//! and stops at `FN_READY`. [`Sandbox::new`] boots it to that point and takes a
//! [`Snapshot`]. [`Sandbox::call`] writes the input into the guest and resumes it; the
//! call costs one VM exit (`FN_RETURN`). Before the next call the sandbox is reset to the
//! snapshot: only the pages the call dirtied (KVM's dirty log) are copied back, so a reset
//! costs in proportion to what the call touched, not to the memory size.
//! [`Sandbox::from_snapshot`] makes more sandboxes from one snapshot (copy-on-write
//! memory), and [`SandboxPool`] keeps several ready for concurrent callers.
//!
//! Whatever a call does (loop, fault, panic, return too much), the caller gets a typed
//! [`CallError`] and the sandbox recovers with the next reset.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::console::ConsoleHub;
use super::snapfile::SnapshotFileInfo;
use super::snapshot::{Snapshot, VmShell};
use super::{FN_DATA_MAX, HostFn};
use crate::config::VmConfig;
use crate::error::Error;
use crate::loader::GuestImage;
use crate::runtime::Vm;
use crate::runtime::control::KillHandle;
use crate::runtime::fault::Fault;
use crate::runtime::outcome::Outcome;

/// How sandboxes are built.
pub struct SandboxConfig {
    /// Guest memory size.
    pub mem_size: u64,
    /// Arguments the guest's initialisation sees.
    pub args: Vec<String>,
    /// Environment the guest's initialisation sees.
    pub env: Vec<(String, String)>,
    /// Functions the guest may call by name.
    pub host_functions: HashMap<String, HostFn>,
    /// Stop a call (or the initialisation) that runs longer than this.
    pub call_timeout: Option<Duration>,
    /// Largest output a call may return.
    pub max_output: u64,
    /// Where the guests' console output goes (shared by every sandbox of a snapshot,
    /// through a queue: a slow sink never delays a call).
    pub console: Arc<Mutex<Box<dyn Write + Send>>>,
    /// Console bytes per second each sandbox may write, with a one-second burst; output
    /// beyond it is dropped and counted (0: unlimited).
    pub console_rate: u64,
    /// Run the console writer thread (`pvrun-console`, which calls the sink's `write`)
    /// under a seccomp filter that allows writing to descriptors it already holds and
    /// nothing else (no `open`, no socket calls, no KVM); a forbidden call kills the
    /// process. On by default; turn it off for a sink that needs more (one that opens
    /// files or sends on sockets itself).
    pub console_confined: bool,
    /// Run the guest's initialisation (up to `FN_READY`) on a thread of its own under the
    /// vCPU seccomp filter, as calls from a [`SandboxPool::confine_callers`] pool run, so
    /// no guest instruction ever runs beside an unconfined host thread's state. Host
    /// functions the initialisation calls then run under that filter too. Off by default
    /// (it costs a thread start per [`Sandbox::new`]); `pvrun serve` turns it on.
    pub confine_init: bool,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            mem_size: 64 << 20,
            args: vec!["function".into()],
            env: Vec::new(),
            host_functions: HashMap::new(),
            call_timeout: Some(Duration::from_secs(10)),
            max_output: FN_DATA_MAX,
            console: Arc::new(Mutex::new(Box::new(crate::output::StdStream::stderr()))),
            console_rate: 1 << 20,
            console_confined: true,
            confine_init: false,
        }
    }
}

/// Why a call produced no output.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The guest exports no function of this name.
    #[error("no function named `{0}`")]
    UnknownFunction(String),
    /// The input does not fit the guest's input buffer.
    #[error("input of {len} bytes is larger than the {max} bytes the function accepts")]
    InputTooLarge {
        /// Input size.
        len: u64,
        /// Limit.
        max: u64,
    },
    /// The output is larger than the configured limit.
    #[error("output of {len} bytes is larger than the {max}-byte limit")]
    OutputTooLarge {
        /// Output size.
        len: u64,
        /// Limit.
        max: u64,
    },
    /// The function returned an error.
    #[error("function failed: {0}")]
    Failed(String),
    /// The guest panicked.
    #[error("guest {0}")]
    Panic(String),
    /// The guest crashed.
    #[error("guest crashed: {0}")]
    Fault(Fault),
    /// The call ran past its timeout and was stopped.
    #[error("call timed out after {0:?}")]
    Timeout(Duration),
    /// The call was killed from another thread.
    #[error("call was killed")]
    Killed,
    /// The guest exited instead of returning.
    #[error("guest exited with status {0} during the call")]
    Exited(i32),
    /// The host failed (a KVM error).
    #[error("host error: {0}")]
    Host(String),
}

/// Sandboxes created in this process so far, by where they came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SandboxCreations {
    /// Booted from a guest ELF ([`Sandbox::new`], [`Sandbox::from_image`]).
    pub elf: u64,
    /// Made from a snapshot in a new VM ([`Sandbox::from_template`] without a shell).
    pub snapshot: u64,
    /// Made from a snapshot in a VM created ahead of time ([`Template::prepare_shells`];
    /// a template loaded from a file has one for its first sandbox).
    pub shell: u64,
    /// Snapshot files loaded ([`Template::from_snapshot_file`]).
    pub files_loaded: u64,
}

static CREATED: [std::sync::atomic::AtomicU64; 4] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 4];

fn count_creation(i: usize) {
    CREATED[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

impl SandboxCreations {
    /// The counts so far in this process.
    pub fn now() -> SandboxCreations {
        let g = |i: usize| CREATED[i].load(std::sync::atomic::Ordering::Relaxed);
        SandboxCreations {
            elf: g(0),
            snapshot: g(1),
            shell: g(2),
            files_loaded: g(3),
        }
    }
}

/// A snapshot plus what sandboxes made from it need.
pub struct Template {
    snapshot: Arc<Snapshot>,
    console: Arc<ConsoleHub>,
    call_timeout: Option<Duration>,
    max_output: u64,
    /// VMs created ahead of time for new sandboxes, and how many to keep ready.
    shells: Mutex<(Vec<VmShell>, usize)>,
    shell_taken: Condvar,
}

impl Template {
    /// The exported function names.
    pub fn functions(&self) -> &[String] {
        &self.snapshot.exports.names
    }

    /// Bytes of guest console output dropped so far by the sandboxes of this template
    /// (over their rate limit, or while the sink was too slow).
    pub fn console_dropped(&self) -> u64 {
        self.console.dropped()
    }

    /// Loads a snapshot file written by [`Template::write_snapshot_file`] (`pvrun
    /// snapshot`): its memory is mapped copy-on-write (`MAP_PRIVATE`), so every sandbox in
    /// every process shares the page cache's copy, and resets copy back from those pages.
    /// The file is checked as a fresh boot would check an ELF (see docs/SNAPSHOT.md); a
    /// damaged, foreign or tampered file is an [`Error::BadSnapshot`]. The memory size,
    /// arguments and environment are the file's; `config` gives the rest (host functions,
    /// timeout, output limit, console).
    pub fn from_snapshot_file(path: &Path, config: SandboxConfig) -> Result<Arc<Template>, Error> {
        let (snapshot, shell) =
            super::snapfile::load(path, Arc::new(config.host_functions), config.max_output)?;
        count_creation(3);
        Ok(Arc::new(Template {
            snapshot: Arc::new(snapshot),
            console: ConsoleHub::new(
                config.console.clone(),
                config.console_rate,
                config.console_confined,
            ),
            call_timeout: config.call_timeout,
            max_output: config.max_output,
            // The VM the file's vCPU state was checked in makes the first sandbox.
            shells: Mutex::new((vec![shell], 0)),
            shell_taken: Condvar::new(),
        }))
    }

    /// Writes the template's snapshot to a snapshot file (format: docs/SNAPSHOT.md).
    pub fn write_snapshot_file(&self, path: &Path) -> Result<SnapshotFileInfo, Error> {
        super::snapfile::write(&self.snapshot, path)
    }

    /// Guest memory size of the template's sandboxes.
    pub fn mem_size(&self) -> u64 {
        self.snapshot.mem_size()
    }

    /// Creates `n` VMs now for later [`Sandbox::from_template`] calls, which then only map
    /// the snapshot and load registers instead of waiting for KVM to create a VM.
    pub fn prepare_shells(&self, n: usize) -> Result<(), Error> {
        for _ in 0..n {
            let shell = VmShell::new(self.snapshot.mem_size())?;
            self.shells
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .0
                .push(shell);
        }
        Ok(())
    }

    /// Keeps `n` pre-created VMs ready on a background thread (which ends when the
    /// template is dropped), so creating sandboxes stays fast under a steady demand.
    ///
    /// The thread (`pvrun-shells`) runs under its own seccomp filter from its first
    /// instruction on: the KVM requests that create a VM and nothing else (it never runs
    /// one). If the thread cannot be started, no shells are kept ready (sandboxes are
    /// then created on the spot, as without this call).
    pub fn keep_shells_ready(self: &Arc<Self>, n: usize) {
        self.shells.lock().unwrap_or_else(|p| p.into_inner()).1 = n;
        let weak = Arc::downgrade(self);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name("pvrun-shells".into())
            .spawn(move || {
                crate::seccomp::confine_or_exit(crate::seccomp::ThreadKind::Shells);
                let _ = ready_tx.send(());
                Self::refill_shells(weak)
            });
        // Return once the thread is confined (it never runs unconfined, not even briefly).
        if spawned.is_ok() {
            let _ = ready_rx.recv();
        }
    }

    /// The `pvrun-shells` thread: tops the ready shells up to the wanted number.
    fn refill_shells(weak: std::sync::Weak<Self>) {
        while let Some(t) = weak.upgrade() {
            let missing = {
                let st = t.shells.lock().unwrap_or_else(|p| p.into_inner());
                let st = if st.0.len() >= st.1 {
                    t.shell_taken
                        .wait_timeout(st, Duration::from_millis(500))
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                } else {
                    st
                };
                st.1.saturating_sub(st.0.len())
            };
            if missing > 0 && t.prepare_shells(1).is_err() {
                return;
            }
        }
    }

    fn take_shell(&self) -> Option<VmShell> {
        let shell = self
            .shells
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .pop();
        self.shell_taken.notify_one();
        shell
    }
}

/// One function guest in its own VM.
pub struct Sandbox {
    vm: Vm,
    template: Arc<Template>,
    /// The VM ran since the last reset.
    dirty: bool,
    /// The vCPU is paused at `FN_READY`/`FN_RETURN` and can take a call without a reset.
    resumable: bool,
}

impl Sandbox {
    /// Boots the guest ELF at `path` until it is ready for calls and snapshots it.
    pub fn new(path: &Path, config: SandboxConfig) -> Result<Sandbox, Error> {
        Self::from_image(Arc::new(GuestImage::from_file(path)?), config)
    }

    /// Like [`Sandbox::new`], from an image already loaded.
    pub fn from_image(image: Arc<GuestImage>, config: SandboxConfig) -> Result<Sandbox, Error> {
        let hub = ConsoleHub::new(
            config.console.clone(),
            config.console_rate,
            config.console_confined,
        );
        let vm_config = VmConfig {
            mem_size: config.mem_size,
            args: config.args,
            env: config.env,
            timeout: config.call_timeout,
            stdout: Box::new(hub.sandbox_console()),
            stderr: Box::new(hub.sandbox_console()),
            host_functions: Arc::new(config.host_functions),
            max_output: config.max_output,
            dirty_log: true,
            ..VmConfig::default()
        };
        let path = image.path.clone();
        let mut vm = Vm::new(image, vm_config)?;
        let init = if config.confine_init {
            // A scoped thread that confines itself, runs the initialisation and ends; the
            // snapshot (memfds, /proc/self/pagemap) is taken back on this thread.
            let vm = &mut vm;
            std::thread::scope(|scope| {
                std::thread::Builder::new()
                    .name("pvrun-init".into())
                    .spawn_scoped(scope, move || {
                        vm.confine_thread()?;
                        vm.run()
                    })
                    .map_err(Error::Io)?
                    .join()
                    .unwrap_or_else(|_| {
                        Err(Error::Config(
                            "the guest's initialisation thread panicked".into(),
                        ))
                    })
            })?
        } else {
            vm.run()?
        };
        let exports = match init {
            Outcome::Ready(e) => e,
            other => {
                let what = other
                    .report()
                    .unwrap_or_else(|| format!("exited with status {}", other.exit_status()));
                return Err(Error::Config(format!(
                    "guest `{path}` is not a function guest: it did not become ready for calls ({what})"
                )));
            }
        };
        let snapshot = Arc::new(vm.snapshot(exports)?);
        count_creation(0);
        Ok(Sandbox {
            vm,
            template: Arc::new(Template {
                snapshot,
                console: hub,
                call_timeout: config.call_timeout,
                max_output: config.max_output,
                shells: Mutex::new((Vec::new(), 0)),
                shell_taken: Condvar::new(),
            }),
            dirty: false,
            resumable: true,
        })
    }

    /// A sandbox from a snapshot file (see [`Template::from_snapshot_file`]); more come
    /// from its [`Sandbox::template`].
    pub fn from_snapshot_file(path: &Path, config: SandboxConfig) -> Result<Sandbox, Error> {
        Self::from_template(&Template::from_snapshot_file(path, config)?)
    }

    /// A new sandbox from the same snapshot as this one (copy-on-write memory), in a VM
    /// created ahead of time when the template has one ready.
    pub fn from_template(template: &Arc<Template>) -> Result<Sandbox, Error> {
        let shell = template.take_shell();
        let source = if shell.is_some() { 2 } else { 1 };
        let vm = Vm::from_snapshot_in(
            shell,
            &template.snapshot,
            Box::new(template.console.sandbox_console()),
            Box::new(template.console.sandbox_console()),
            template.call_timeout,
        )?;
        count_creation(source);
        Ok(Sandbox {
            vm,
            template: template.clone(),
            dirty: false,
            resumable: true,
        })
    }

    /// Like [`Sandbox::from_template`], with this sandbox's console output going to its own
    /// `stdout` and `stderr` sinks instead of the template's shared queue: written
    /// synchronously at the guest's exits, so when a call returns its output is in the
    /// sinks (`cargo pvrun test` captures each test's output this way). The sinks must not
    /// block for long; they are not rate-limited.
    pub fn from_template_with_console(
        template: &Arc<Template>,
        stdout: Box<dyn Write + Send>,
        stderr: Box<dyn Write + Send>,
    ) -> Result<Sandbox, Error> {
        let vm = Vm::from_snapshot_in(
            template.take_shell(),
            &template.snapshot,
            stdout,
            stderr,
            template.call_timeout,
        )?;
        Ok(Sandbox {
            vm,
            template: template.clone(),
            dirty: false,
            resumable: true,
        })
    }

    /// What new sandboxes can be made from.
    pub fn template(&self) -> &Arc<Template> {
        &self.template
    }

    /// The exported function names.
    pub fn functions(&self) -> &[String] {
        self.template.functions()
    }

    /// The guest's registers and call stack at the panic or crash that ended the last
    /// call, if it ended that way (until the next call): for a report with a backtrace
    /// (`crash.backtrace.render(sandbox.image())`).
    pub fn crash(&self) -> Option<&crate::Crash> {
        self.vm.crash()
    }

    /// The image this sandbox runs.
    pub fn image(&self) -> &GuestImage {
        self.vm.image()
    }

    /// A handle to stop the running call from another thread.
    pub fn kill_handle(&self) -> KillHandle {
        self.vm.kill_handle()
    }

    /// Sets the timeout of later calls.
    pub fn set_call_timeout(&mut self, timeout: Option<Duration>) {
        self.vm.set_timeout(timeout);
    }

    /// Resets the sandbox to its snapshot if a call ran since; returns the pages copied.
    pub fn reset(&mut self) -> Result<usize, Error> {
        if !self.dirty {
            return Ok(0);
        }
        let n = self.vm.restore(&self.template.snapshot)?;
        self.dirty = false;
        self.resumable = true;
        Ok(n)
    }

    /// Resets the sandbox and gives back the memory it holds of its own: the pages its
    /// calls wrote, the host page tables over them, and KVM's memory slot (its reverse
    /// maps, write tracking and shadow page tables, about 3 KiB per MiB of guest memory).
    /// For a sandbox that will sit idle: its next call registers the slot again and pays
    /// a page fault for each page it touches (see `benches/density.rs`). Returns false,
    /// after the reset, for a sandbox whose memory is not a copy-on-write view of its
    /// template (the one [`Sandbox::new`] booted).
    pub fn trim(&mut self) -> Result<bool, Error> {
        self.reset()?;
        self.vm.release_private_pages()
    }

    /// Turns this sandbox into a [`WarmSandbox`](super::warm::WarmSandbox): it keeps its
    /// state between calls, as [`Sandbox::call_keep_state`] does, and takes calls through
    /// the guest's exitless mailbox instead of a VM exit each (docs/ABI.md §5 "Exitless
    /// calls"). Needs a guest that declared a mailbox (SDK of ABI v4); the sandbox goes on
    /// from the state its last call left (reset first if that call crashed). Starts the
    /// sandbox's vCPU thread, so the calling thread must not be confined.
    pub fn into_warm(
        mut self,
        options: super::warm::WarmOptions,
    ) -> Result<super::warm::WarmSandbox, Error> {
        if !self.resumable {
            self.reset()?;
        }
        let parts = super::warm::WarmParts {
            exports: self.template.snapshot.exports.clone(),
            max_output: self.template.max_output,
            call_timeout: self.template.call_timeout,
            template: self.template,
            vm: self.vm,
        };
        super::warm::WarmSandbox::start(parts, options)
    }

    /// Calls function `name` with `input`, starting from the clean snapshot state (the
    /// sandbox is reset first if an earlier call ran).
    pub fn call(&mut self, name: &str, input: &[u8]) -> Result<Vec<u8>, CallError> {
        self.reset().map_err(|e| CallError::Host(e.to_string()))?;
        self.call_keep_state(name, input)
    }

    /// Calls function `name` without resetting first: the guest sees what earlier calls
    /// left behind. (For trusted, stateful use, and to measure a call alone.)
    pub fn call_keep_state(&mut self, name: &str, input: &[u8]) -> Result<Vec<u8>, CallError> {
        let exports = &self.template.snapshot.exports;
        let index = exports
            .names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| CallError::UnknownFunction(name.to_string()))?;
        let max = exports.inbuf_len.saturating_sub(16);
        if input.len() as u64 > max {
            return Err(CallError::InputTooLarge {
                len: input.len() as u64,
                max,
            });
        }
        if !self.resumable {
            // A call that crashed, panicked or timed out left the vCPU unusable: reset.
            self.reset().map_err(|e| CallError::Host(e.to_string()))?;
        }
        // An Arc clone, not a copy of the export list: this is every call's path.
        let template = self.template.clone();
        self.vm
            .start_call(&template.snapshot.exports, index as u32, input)
            .map_err(|e| CallError::Host(e.to_string()))?;
        self.dirty = true;
        self.resumable = false;
        let outcome = self.vm.run().map_err(|e| CallError::Host(e.to_string()))?;
        enum Kind {
            Returned,
            Stopped,
        }
        let outcome_kind = if matches!(outcome, Outcome::Returned { .. }) {
            Kind::Returned
        } else {
            Kind::Stopped
        };
        let result = match outcome {
            Outcome::Returned {
                status: 0,
                output: Ok(out),
            } => Ok(out),
            Outcome::Returned {
                output: Ok(msg), ..
            } => Err(CallError::Failed(
                String::from_utf8_lossy(&msg).into_owned(),
            )),
            Outcome::Returned {
                output: Err(len), ..
            } => Err(CallError::OutputTooLarge {
                len,
                max: self.template.max_output,
            }),
            Outcome::Panicked(m) => Err(CallError::Panic(m)),
            Outcome::Fault(f) => Err(CallError::Fault(f)),
            Outcome::TimedOut(t) => Err(CallError::Timeout(t)),
            Outcome::Killed | Outcome::Interrupted(_) => Err(CallError::Killed),
            Outcome::Exited(c) => Err(CallError::Exited(c)),
            Outcome::Ready(_) => Err(CallError::Host(
                "the guest re-initialised during a call".into(),
            )),
        };
        self.resumable = matches!(outcome_kind, Kind::Returned);
        result
    }
}

/// How a [`SandboxPool`] grows and shrinks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolLimits {
    /// Sandboxes made when the pool is built and kept however idle they are (at least 1).
    pub min: usize,
    /// Sandboxes the pool grows to when every one is busy and callers wait (at least
    /// `min`).
    pub max: usize,
    /// A sandbox beyond `min` that took no call for this long is dropped.
    pub idle: Duration,
}

impl PoolLimits {
    /// A pool of exactly `n` sandboxes (it never grows or shrinks).
    pub fn fixed(n: usize) -> PoolLimits {
        PoolLimits {
            min: n.max(1),
            max: n.max(1),
            idle: Duration::from_secs(60),
        }
    }
}

/// Sandboxes of one template, ready for concurrent callers: each call takes an idle
/// sandbox, runs, resets it and puts it back. A caller that finds none idle waits for one;
/// an elastic pool ([`SandboxPool::elastic`]) meanwhile makes another from the template
/// (up to its `max`), on its own `pvrun-grow` thread, which keeps one VM created ahead of
/// time for that while the pool is below `max`, and drops sandboxes beyond `min` that
/// stayed idle for the pool's idle time.
pub struct SandboxPool {
    inner: Arc<PoolInner>,
    /// The `pvrun-grow` thread (elastic pools only).
    grower: Option<std::thread::JoinHandle<()>>,
}

struct PoolInner {
    template: Arc<Template>,
    state: Mutex<PoolState>,
    /// A sandbox went back to the idle list (callers wait on it).
    available: Condvar,
    /// A caller started waiting, or the pool is dropped (the grower waits on it).
    wanted: Condvar,
    limits: PoolLimits,
    /// Confine each thread that makes a call (see [`SandboxPool::confine_callers`]).
    confine: std::sync::atomic::AtomicBool,
    /// Resets done, and pages they copied.
    resets: std::sync::atomic::AtomicU64,
    reset_pages: std::sync::atomic::AtomicU64,
    /// VM exits of the calls made, by kind (see [`PoolStats::exits`]).
    exits: [std::sync::atomic::AtomicU64; 5],
}

struct PoolState {
    /// Idle sandboxes, each with the moment it went idle (the last one is the most
    /// recently used, and the next one taken: the oldest age out first).
    idle: Vec<(Sandbox, std::time::Instant)>,
    /// Sandboxes that exist (idle or busy).
    size: usize,
    /// Callers waiting for an idle sandbox.
    waiting: usize,
    /// Sandboxes made by growing, and dropped after their idle time.
    grown: u64,
    shrunk: u64,
    /// Creations that failed (the pool then serves with the sandboxes it has).
    grow_failures: u64,
    /// A VM the grower created ahead of time for the next sandbox it makes (while the
    /// pool is below `max`), so a waiting caller does not wait for KVM to create one.
    shell: Option<VmShell>,
    /// The pool is being dropped: the grower ends.
    quit: bool,
}

/// What a [`SandboxPool`] has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Sandboxes in the pool.
    pub size: usize,
    /// Sandboxes running a call (or being reset) now.
    pub busy: usize,
    /// Callers waiting for a sandbox now.
    pub waiting: usize,
    /// The pool's least and largest size.
    pub min: usize,
    /// See `min`.
    pub max: usize,
    /// Sandboxes made because every sandbox was busy, and dropped after their idle time.
    pub grown: u64,
    /// See `grown`.
    pub shrunk: u64,
    /// Sandboxes the pool failed to make while growing.
    pub grow_failures: u64,
    /// Resets after calls.
    pub resets: u64,
    /// Pages those resets copied back.
    pub reset_pages: u64,
    /// VM exits of the calls made, by kind: hypercall, doorbell, exception, interrupted,
    /// other (as in [`crate::VmStats`]).
    pub exits: [u64; 5],
}

thread_local! {
    /// Whether this thread already runs under the vCPU seccomp filter.
    static CONFINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Puts the calling thread under the vCPU seccomp filter unless it already is (the
/// filter of a thread that makes [`SandboxPool`] calls; permanent for the thread).
pub(crate) fn confine_caller() -> Result<(), Error> {
    if !CONFINED.with(|c| c.get()) {
        crate::seccomp::confine(crate::seccomp::ThreadKind::Vcpu)?;
        CONFINED.with(|c| c.set(true));
    }
    Ok(())
}

impl SandboxPool {
    /// A pool of `size` sandboxes: `first` and `size - 1` more made from its template.
    pub fn new(first: Sandbox, size: usize) -> Result<SandboxPool, Error> {
        Self::build(first, PoolLimits::fixed(size))
    }

    /// A pool that starts with `limits.min` sandboxes (`first` and more from its
    /// template), grows up to `limits.max` while callers wait for a sandbox, and drops
    /// sandboxes beyond `min` idle for `limits.idle`. Growing and shrinking happen on a
    /// `pvrun-grow` thread started here, under its own seccomp filter (it may create VMs
    /// and load a vCPU's state, never run one), and the process's watchdog thread is
    /// started too, so call this on a thread that is not confined. With `max == min` it
    /// is [`SandboxPool::new`].
    pub fn elastic(first: Sandbox, limits: PoolLimits) -> Result<SandboxPool, Error> {
        let mut limits = limits;
        limits.min = limits.min.max(1);
        limits.max = limits.max.max(limits.min);
        let mut pool = Self::build(first, limits)?;
        if limits.max == limits.min {
            return Ok(pool);
        }
        // Grown sandboxes' timeouts need the watchdog, which the confined grower cannot
        // start.
        crate::runtime::control::ensure_watchdog()?;
        let inner = pool.inner.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let grower = std::thread::Builder::new()
            .name("pvrun-grow".into())
            .spawn(move || {
                crate::seccomp::confine_or_exit(crate::seccomp::ThreadKind::Grower);
                let _ = ready_tx.send(());
                inner.grow_and_shrink()
            })
            .map_err(Error::Io)?;
        // Return once the thread is confined (it never runs unconfined, not even briefly).
        let _ = ready_rx.recv();
        pool.grower = Some(grower);
        Ok(pool)
    }

    fn build(first: Sandbox, limits: PoolLimits) -> Result<SandboxPool, Error> {
        let template = first.template.clone();
        let now = std::time::Instant::now();
        let mut idle = vec![(first, now)];
        for _ in 1..limits.min.max(1) {
            idle.push((Sandbox::from_template(&template)?, now));
        }
        Ok(SandboxPool {
            inner: Arc::new(PoolInner {
                template,
                state: Mutex::new(PoolState {
                    size: idle.len(),
                    idle,
                    waiting: 0,
                    grown: 0,
                    shrunk: 0,
                    grow_failures: 0,
                    shell: None,
                    quit: false,
                }),
                available: Condvar::new(),
                wanted: Condvar::new(),
                limits,
                confine: false.into(),
                resets: Default::default(),
                reset_pages: Default::default(),
                exits: Default::default(),
            }),
            grower: None,
        })
    }

    /// Makes every thread that calls [`SandboxPool::call`] run under the vCPU thread's
    /// seccomp filter from its first call on (permanent for the thread: use it where
    /// threads are dedicated to calls, as `pvrun serve`'s blocking threads are). The
    /// process's watchdog thread is started now, since a confined thread cannot start
    /// threads.
    pub fn confine_callers(self) -> Result<SandboxPool, Error> {
        {
            let mut st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
            for (sb, _) in st.idle.iter_mut() {
                sb.vm.ensure_watchdog()?;
            }
        }
        self.inner
            .confine
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(self)
    }

    /// The exported function names.
    pub fn functions(&self) -> &[String] {
        self.inner.template.functions()
    }

    /// Number of sandboxes now.
    pub fn size(&self) -> usize {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .size
    }

    /// How the pool grows and shrinks.
    pub fn limits(&self) -> PoolLimits {
        self.inner.limits
    }

    /// The largest input a call takes: the guest's input buffer minus the call header.
    /// Larger inputs fail with [`CallError::InputTooLarge`].
    pub fn max_input(&self) -> u64 {
        self.inner
            .template
            .snapshot
            .exports
            .inbuf_len
            .saturating_sub(16)
    }

    /// Sizes and counters, for metrics.
    pub fn stats(&self) -> PoolStats {
        let i = &self.inner;
        let st = i.state.lock().unwrap_or_else(|p| p.into_inner());
        PoolStats {
            size: st.size,
            busy: st.size.saturating_sub(st.idle.len()),
            waiting: st.waiting,
            min: i.limits.min,
            max: i.limits.max,
            grown: st.grown,
            shrunk: st.shrunk,
            grow_failures: st.grow_failures,
            resets: i.resets.load(std::sync::atomic::Ordering::Relaxed),
            reset_pages: i.reset_pages.load(std::sync::atomic::Ordering::Relaxed),
            exits: std::array::from_fn(|k| i.exits[k].load(std::sync::atomic::Ordering::Relaxed)),
        }
    }

    /// Calls `name` with `input` in an idle sandbox, from its clean state.
    pub fn call(&self, name: &str, input: &[u8]) -> Result<Vec<u8>, CallError> {
        self.call_and_reset(name, input).0
    }

    /// Like [`SandboxPool::call`], and also says how many pages the reset after the call
    /// copied back (0 if nothing ran).
    pub fn call_and_reset(&self, name: &str, input: &[u8]) -> (Result<Vec<u8>, CallError>, usize) {
        match self.inner.call(name, input) {
            Ok((r, pages)) => (r, pages),
            Err(e) => (Err(e), 0),
        }
    }
}

impl Drop for SandboxPool {
    fn drop(&mut self) {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .quit = true;
        self.inner.wanted.notify_all();
        if let Some(g) = self.grower.take() {
            let _ = g.join();
        }
    }
}

impl PoolInner {
    fn call(
        &self,
        name: &str,
        input: &[u8],
    ) -> Result<(Result<Vec<u8>, CallError>, usize), CallError> {
        if self.confine.load(std::sync::atomic::Ordering::Relaxed) {
            confine_caller().map_err(|e| CallError::Host(e.to_string()))?;
        }
        let mut sb = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some((sb, _)) = st.idle.pop() {
                    break sb;
                }
                st.waiting += 1;
                if st.size < self.limits.max {
                    self.wanted.notify_one();
                }
                st = self.available.wait(st).unwrap_or_else(|p| p.into_inner());
                st.waiting -= 1;
            }
        };
        let before = sb.vm.exit_kinds();
        let r = sb.call(name, input);
        let after = sb.vm.exit_kinds();
        for (i, counter) in self.exits.iter().enumerate() {
            counter.fetch_add(
                after[i].saturating_sub(before[i]),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        // Reset before the sandbox goes back, so the next caller does not wait for it.
        let reset = sb.reset();
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .idle
            .push((sb, std::time::Instant::now()));
        self.available.notify_one();
        let pages = reset.map_err(|e| CallError::Host(e.to_string()))?;
        if pages > 0 {
            self.resets
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.reset_pages
                .fetch_add(pages as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Ok((r, pages))
    }

    /// The `pvrun-grow` thread: makes a sandbox whenever callers wait and none is idle
    /// (up to `max`), and drops those beyond `min` idle for the idle time, until the pool
    /// is dropped.
    fn grow_and_shrink(&self) {
        let idle_time = self.limits.idle;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut failed_at: Option<std::time::Instant> = None;
        loop {
            if st.quit {
                return;
            }
            // A failed creation is retried after a second (the pool serves meanwhile).
            let may_grow = failed_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
            // Callers beyond the idle sandboxes (which waiting callers are about to take) need
            // another one.
            if st.waiting > st.idle.len() && st.size < self.limits.max && may_grow {
                st.size += 1;
                let shell = st.shell.take();
                drop(st);
                let made = Sandbox::grown(&self.template, shell);
                st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                match made {
                    Ok(sb) => {
                        st.idle.push((sb, std::time::Instant::now()));
                        st.grown += 1;
                        failed_at = None;
                        self.available.notify_one();
                    }
                    Err(e) => {
                        st.size -= 1;
                        st.grow_failures += 1;
                        failed_at = Some(std::time::Instant::now());
                        tracing::warn!(target: "pvrun::pool", error = %e, "cannot make another sandbox; serving with {}", st.size);
                    }
                }
                continue;
            }
            // Shrink: the oldest idle sandboxes beyond `min` whose idle time is over.
            let now = std::time::Instant::now();
            let mut expired = Vec::new();
            while st.size > self.limits.min
                && st
                    .idle
                    .first()
                    .is_some_and(|(_, t)| now.duration_since(*t) >= idle_time)
            {
                expired.push(st.idle.remove(0).0);
                st.size -= 1;
                st.shrunk += 1;
            }
            if !expired.is_empty() {
                drop(st);
                drop(expired);
                st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // Have a VM ready for the next growth (nobody waits for this one).
            if st.shell.is_none() && st.size < self.limits.max && may_grow {
                drop(st);
                let shell = VmShell::new(self.template.snapshot.mem_size());
                st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                match shell {
                    Ok(shell) => st.shell = Some(shell),
                    Err(e) => {
                        failed_at = Some(std::time::Instant::now());
                        tracing::warn!(target: "pvrun::pool", error = %e, "cannot create a VM ahead of time");
                    }
                }
                continue;
            }
            // Sleep until the next idle sandbox's time is over (or a caller waits).
            let next = if st.size > self.limits.min {
                st.idle
                    .first()
                    .map(|(_, t)| (*t + idle_time).saturating_duration_since(now))
            } else {
                None
            };
            let nap = next
                .unwrap_or(Duration::from_secs(1))
                .clamp(Duration::from_millis(10), Duration::from_secs(1));
            st = self
                .wanted
                .wait_timeout(st, nap)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Sandbox {
    /// A sandbox for an elastic pool's grower: in `shell` (the VM it created ahead of
    /// time) or a VM created now (never one of the template's shells), the snapshot
    /// mapped.
    fn grown(template: &Arc<Template>, shell: Option<VmShell>) -> Result<Sandbox, Error> {
        let shell = match shell {
            Some(s) => s,
            None => VmShell::new(template.snapshot.mem_size())?,
        };
        let vm = Vm::from_snapshot_in(
            Some(shell),
            &template.snapshot,
            Box::new(template.console.sandbox_console()),
            Box::new(template.console.sandbox_console()),
            template.call_timeout,
        )?;
        count_creation(2);
        Ok(Sandbox {
            vm,
            template: template.clone(),
            dirty: false,
            resumable: true,
        })
    }
}
