//! Exitless warm calls: a sandbox that keeps its state between calls and takes them through
//! a shared mailbox instead of a VM exit (ABI v4, docs/ABI.md §5 "Exitless calls").
//!
//! [`Sandbox::into_warm`](super::sandbox::Sandbox::into_warm) hands the VM to a dedicated
//! vCPU thread (`pvrun-warm`, under the vCPU seccomp filter) that runs the guest for the
//! sandbox's whole life. A call writes the [`FnCall`](pvrun_abi::FnCall) header and input
//! into the guest's input buffer, then the call's number into the mailbox's `call_seq`;
//! the guest, spinning on `call_seq` since its last call, runs the function, publishes the
//! result and `done_seq`, and goes back to spinning. The caller polls `done_seq`: a call
//! that needs neither side to sleep makes no VM exit at all.
//!
//! Sleeping on both sides keeps idle sandboxes free:
//!
//! - the guest spins at most `spin_ns` ([`WarmOptions::guest_spin`]) after a call, less
//!   while calls come slower than that (the SDK halves its budget after each sleep, down to
//!   1/16), then sets `guest_sleeping` and sleeps in `WAIT`; a call posted to a sleeping
//!   guest wakes it through the VM's [`Notify`](crate::runtime::notify::Notify);
//! - the caller polls at most [`WarmOptions::host_spin`], then sets `host_sleeping` and
//!   sleeps on a condition variable; the guest makes the `FN_NOTIFY` hypercall (one exit)
//!   when it sees the flag after publishing, and the caller also looks again every 50 ms,
//!   so a guest that never notifies only makes its own calls slow.
//!
//! Both flags follow the Dekker pattern: store the flag, full fence, re-check the other
//! side's word, so a wake-up is never lost.
//!
//! **CPU cost**: after each call the guest's vCPU thread spins for at most `guest_spin`
//! (100 µs by default) and the calling thread for at most `host_spin` (200 µs) while the
//! call runs; an idle warm sandbox sleeps and uses no CPU.
//!
//! **Nothing in the mailbox is trusted.** Each field is read once with an atomic load
//! through the host mapping; a `done_seq` other than the last or the current call's number,
//! or an output outside the memory the guest may read, stops the guest with a report (the
//! call gets [`CallError::Fault`], later calls [`CallError::Host`] saying the sandbox is
//! stopped); an output over the limit is [`CallError::OutputTooLarge`] as for exit-based
//! calls. A guest that neither sleeps nor has a call for longer than `guest_spin` +
//! [`WarmOptions::idle_slack`] after a call is stopped the same way: it cannot burn a
//! host core between calls. A call past its timeout kills the guest
//! ([`CallError::Timeout`]); a panic or a fault mid-call is [`CallError::Panic`] or
//! [`CallError::Fault`]. In every such case the sandbox is stopped for good: make a new one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pvrun_abi::{FnCall, mailbox};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::Exports;
use super::sandbox::{CallError, Template};
use crate::error::Error;
use crate::memory::{MemoryMap, UserMemory};
use crate::runtime::Vm;
use crate::runtime::control::{KillHandle, RunControl};
use crate::runtime::fault::Fault;
use crate::runtime::outcome::Outcome;

/// How a [`WarmSandbox`] takes its calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WarmOptions {
    /// The guest's spin budget after a call (the mailbox's `spin_ns`): how long it polls
    /// for the next call before it sleeps in `WAIT`. Zero: it sleeps at once (every call
    /// then wakes it, at the cost of about one VM exit). Capped at one second.
    pub guest_spin: Duration,
    /// How long the caller polls for a result before it sleeps (calls that take longer
    /// cost the guest an `FN_NOTIFY` exit). Capped at one second.
    pub host_spin: Duration,
    /// How far past `guest_spin` a guest may go on running after a call without either
    /// sleeping in `WAIT` or getting a call, before the host stops it.
    pub idle_slack: Duration,
    /// Per-call timeout; `None` keeps the sandbox's own (its [`super::sandbox::SandboxConfig`]
    /// `call_timeout`).
    pub call_timeout: Option<Duration>,
}

impl Default for WarmOptions {
    fn default() -> Self {
        WarmOptions {
            guest_spin: Duration::from_micros(100),
            host_spin: Duration::from_micros(200),
            idle_slack: Duration::from_millis(500),
            call_timeout: None,
        }
    }
}

/// What a [`WarmSandbox`] has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WarmStats {
    /// Calls posted.
    pub calls: u64,
    /// Of which found the guest asleep (the host woke it: a `WAIT` ended).
    pub guest_wakeups: u64,
    /// Of which outlasted the caller's spin (the caller slept).
    pub host_sleeps: u64,
    /// `FN_NOTIFY` hypercalls the guest made.
    pub notifies: u64,
    /// `WAIT` hypercalls the guest made (each is a VM exit).
    pub guest_waits: u64,
}

/// How the vCPU thread's run ended, as the caller learns it.
struct Ended {
    outcome: Result<Outcome, String>,
}

/// The state the caller and the vCPU thread share, under [`Link::state`].
#[derive(Default)]
struct State {
    /// A call is posted and not yet answered.
    in_call: bool,
    /// The guest is in `WAIT`.
    guest_waiting: bool,
    /// Between calls: when the guest must be asleep by.
    idle_deadline: Option<Instant>,
    /// The run ended (set by the vCPU thread, once).
    ended: Option<Ended>,
}

/// The link between a warm sandbox's caller and its vCPU thread; the run loop reaches it
/// through [`super::FnContext::warm`] at `FN_NOTIFY` and around `WAIT`.
pub(crate) struct Link {
    state: Mutex<State>,
    cv: Condvar,
    control: Arc<RunControl>,
    /// The run ended (a cheap check for the caller's spin).
    ended: AtomicBool,
    notifies: AtomicU64,
    guest_waits: AtomicU64,
}

impl Link {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `FN_NOTIFY`: wake the caller (it re-reads the mailbox).
    pub(crate) fn notified(&self) {
        self.notifies.fetch_add(1, Ordering::Relaxed);
        let _st = self.lock();
        self.cv.notify_all();
    }

    /// The guest enters `WAIT`: between calls it is now asleep, so the idle deadline is off.
    pub(crate) fn guest_sleeps(&self) {
        self.guest_waits.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        st.guest_waiting = true;
        if !st.in_call {
            self.control.arm(None);
        }
    }

    /// The guest leaves `WAIT`: between calls the idle deadline of the last call applies
    /// again (it is not extended: a guest that keeps waking itself is stopped too).
    pub(crate) fn guest_wakes(&self) {
        let mut st = self.lock();
        st.guest_waiting = false;
        if !st.in_call {
            self.control.arm(st.idle_deadline);
        }
    }
}

/// What [`Sandbox::into_warm`](super::sandbox::Sandbox::into_warm) hands over.
pub(crate) struct WarmParts {
    /// The VM, stopped at an `FN_READY` or `FN_RETURN` exit (resumable).
    pub vm: Vm,
    pub exports: Exports,
    pub max_output: u64,
    pub call_timeout: Option<Duration>,
    pub template: Arc<Template>,
}

/// A sandbox that keeps its state between calls and takes them without VM exits (see the
/// module docs of `function::warm`, and docs/ABI.md §5 "Exitless calls"). Made by
/// [`Sandbox::into_warm`](super::sandbox::Sandbox::into_warm); needs a guest built with an
/// SDK of ABI v4 or later (one that declares a mailbox).
///
/// CPU cost: after each call the guest spins up to [`WarmOptions::guest_spin`] on its own
/// vCPU thread, and each call's caller spins up to [`WarmOptions::host_spin`]; an idle warm
/// sandbox uses no CPU. Host functions the guest calls run on the sandbox's vCPU thread,
/// under the vCPU seccomp filter. Guest console output reaches the sink when the guest next
/// exits (at the latest when it goes to sleep after its spin budget).
///
/// Dropping it stops the guest and joins its thread.
pub struct WarmSandbox {
    link: Arc<Link>,
    thread: Option<JoinHandle<Vm>>,
    /// The VM once the thread ended (for [`WarmSandbox::crash`]).
    vm: Option<Vm>,
    mem: GuestMemoryMmap,
    map: MemoryMap,
    exports: Exports,
    max_output: u64,
    timeout: Option<Duration>,
    options: WarmOptions,
    template: Arc<Template>,
    /// The last call's number.
    seq: u64,
    /// Why the sandbox stopped, once it has.
    stopped: Option<String>,
    tid: i32,
    calls: u64,
    guest_wakeups: u64,
    host_sleeps: u64,
}

const SPIN_MAX: Duration = Duration::from_secs(1);
/// How long the caller spins before it starts yielding its core now and then.
const YIELD_AFTER: Duration = Duration::from_micros(10);
/// How often a sleeping caller looks at the mailbox without being notified.
const RECHECK: Duration = Duration::from_millis(50);

/// Why waiting for a result ended without one.
enum NoResult {
    /// The guest broke the protocol: stop it with this report.
    Protocol(String),
    /// The run ended.
    Ended,
}

impl WarmSandbox {
    pub(crate) fn start(parts: WarmParts, options: WarmOptions) -> Result<WarmSandbox, Error> {
        let WarmParts {
            mut vm,
            exports,
            max_output,
            call_timeout,
            template,
        } = parts;
        if exports.mailbox == 0 {
            return Err(Error::Config(format!(
                "guest `{}` declared no exitless mailbox (FN_MAILBOX, ABI v4): rebuild it with the current guest SDK, or use Sandbox::call_keep_state",
                vm.image().path
            )));
        }
        let options = WarmOptions {
            guest_spin: options.guest_spin.min(SPIN_MAX),
            host_spin: options.host_spin.min(SPIN_MAX),
            ..options
        };
        let timeout = options.call_timeout.or(call_timeout);
        let mem = vm.ram.mem().clone();
        let map = vm.map.clone();
        let mb = exports.mailbox;
        // The host's line: spin budget, no caller asleep, calls through the mailbox from
        // now on. `call_seq` stays as the guest found it (0): the first call is 1.
        let host_line = |mem: &GuestMemoryMmap| -> Result<(), vm_memory::GuestMemoryError> {
            mem.store(0u64, GuestAddress(mb + mailbox::CALL_SEQ), Ordering::SeqCst)?;
            mem.store(
                options.guest_spin.as_nanos() as u64,
                GuestAddress(mb + mailbox::SPIN_NS),
                Ordering::SeqCst,
            )?;
            mem.store(
                0u32,
                GuestAddress(mb + mailbox::HOST_SLEEPING),
                Ordering::SeqCst,
            )?;
            mem.store(1u32, GuestAddress(mb + mailbox::EXITLESS), Ordering::SeqCst)
        };
        host_line(&mem).map_err(|e| Error::Layout(format!("cannot write the mailbox: {e}")))?;
        let link = Arc::new(Link {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            control: vm.control.clone(),
            ended: AtomicBool::new(false),
            notifies: AtomicU64::new(0),
            guest_waits: AtomicU64::new(0),
        });
        // The thread arms the deadlines itself; the run loop must not.
        vm.set_timeout(None);
        vm.fns.warm = Some(link.clone());
        // The guest resumes from its FN_READY / FN_RETURN with 0: it then finds `exitless`
        // set and waits for calls in the mailbox.
        vm.vcpu.set_rax(0)?;
        vm.ensure_watchdog()?;
        {
            let mut st = link.lock();
            st.idle_deadline = Some(Instant::now() + options.guest_spin + options.idle_slack);
            link.control.arm(st.idle_deadline);
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<i32, String>>(1);
        let thread_link = link.clone();
        let thread = std::thread::Builder::new()
            .name("pvrun-warm".into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                if let Err(e) = vm.confine_thread() {
                    let _ = tx.send(Err(e.to_string()));
                    return vm;
                }
                let _ = tx.send(Ok(tid));
                let outcome = vm.run().map_err(|e| e.to_string());
                let mut st = thread_link.lock();
                if !st.in_call {
                    // Nobody waits for this run: say now why it ended (the next call
                    // reports it too).
                    match &outcome {
                        Ok(Outcome::TimedOut(_)) => tracing::warn!(
                            "stopped a warm sandbox's guest: it kept running between calls past its spin budget without sleeping in WAIT"
                        ),
                        Ok(Outcome::Killed) => {}
                        other => tracing::warn!(
                            outcome = ?other,
                            "a warm sandbox's guest stopped between calls"
                        ),
                    }
                }
                st.ended = Some(Ended { outcome });
                thread_link.ended.store(true, Ordering::SeqCst);
                thread_link.cv.notify_all();
                drop(st);
                vm
            })
            .map_err(Error::Io)?;
        let tid = match rx.recv() {
            Ok(Ok(tid)) => tid,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(Error::Config(format!(
                    "cannot confine the warm sandbox's vCPU thread: {e}"
                )));
            }
            Err(_) => {
                let _ = thread.join();
                return Err(Error::Config(
                    "the warm sandbox's vCPU thread ended at its start".into(),
                ));
            }
        };
        Ok(WarmSandbox {
            link,
            thread: Some(thread),
            vm: None,
            mem,
            map,
            exports,
            max_output,
            timeout,
            options,
            template,
            seq: 0,
            stopped: None,
            tid,
            calls: 0,
            guest_wakeups: 0,
            host_sleeps: 0,
        })
    }

    /// The exported function names.
    pub fn functions(&self) -> &[String] {
        &self.exports.names
    }

    /// The template the sandbox was made from (new exit-based sandboxes come from it).
    pub fn template(&self) -> &Arc<Template> {
        &self.template
    }

    /// The options in effect (spins capped at one second, the timeout resolved).
    pub fn options(&self) -> WarmOptions {
        WarmOptions {
            call_timeout: self.timeout,
            ..self.options
        }
    }

    /// The Linux thread id of the sandbox's vCPU thread (for its CPU time in
    /// `/proc/self/task/TID/stat`).
    pub fn vcpu_thread_id(&self) -> i32 {
        self.tid
    }

    /// Counters so far.
    pub fn stats(&self) -> WarmStats {
        WarmStats {
            calls: self.calls,
            guest_wakeups: self.guest_wakeups,
            host_sleeps: self.host_sleeps,
            notifies: self.link.notifies.load(Ordering::Relaxed),
            guest_waits: self.link.guest_waits.load(Ordering::Relaxed),
        }
    }

    /// Why the sandbox stopped, if it has (every later call fails). A guest stopped
    /// between calls (for running past its spin budget, say) shows here at once; the next
    /// call gets the full report.
    pub fn stopped(&self) -> Option<String> {
        if let Some(why) = &self.stopped {
            return Some(why.clone());
        }
        self.link
            .ended
            .load(Ordering::SeqCst)
            .then(|| "the guest stopped between calls; the next call reports why".to_string())
    }

    /// The guest's registers and call stack at the panic or crash that stopped the
    /// sandbox, if that is how it stopped.
    pub fn crash(&self) -> Option<&crate::Crash> {
        self.vm.as_ref().and_then(|vm| vm.crash())
    }

    /// A handle that stops the sandbox (a running call ends with [`CallError::Killed`]).
    pub fn kill_handle(&self) -> KillHandle {
        KillHandle(self.link.control.clone())
    }

    fn load<T: vm_memory::AtomicAccess>(&self, off: u64) -> Option<T> {
        self.mem
            .load(GuestAddress(self.exports.mailbox + off), Ordering::SeqCst)
            .ok()
    }

    fn store<T: vm_memory::AtomicAccess>(&self, off: u64, v: T) {
        let _ = self.mem.store(
            v,
            GuestAddress(self.exports.mailbox + off),
            Ordering::SeqCst,
        );
    }

    /// Calls function `name` with `input`; the guest sees what earlier calls left behind.
    pub fn call(&mut self, name: &str, input: &[u8]) -> Result<Vec<u8>, CallError> {
        if let Some(why) = &self.stopped {
            return Err(CallError::Host(format!(
                "the warm sandbox is stopped ({why}); make a new sandbox"
            )));
        }
        let index = self
            .exports
            .names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| CallError::UnknownFunction(name.to_string()))?;
        let hsize = size_of::<FnCall>() as u64;
        let max = self.exports.inbuf_len.saturating_sub(hsize);
        if input.len() as u64 > max {
            return Err(CallError::InputTooLarge {
                len: input.len() as u64,
                max,
            });
        }
        let seq = self.seq + 1;
        let started = Instant::now();
        {
            let mut st = self.link.lock();
            if st.ended.is_some() {
                drop(st);
                return Err(self.ended(started, false));
            }
            st.in_call = true;
            self.link.control.arm(self.timeout.map(|t| started + t));
        }
        // The input, then the call's number: the guest reads the buffer only after it sees
        // `call_seq` change (SeqCst stores: nothing is reordered past them).
        let header = FnCall {
            index: index as u32,
            reserved: 0,
            input_len: input.len() as u64,
        };
        let written = self
            .mem
            .write_obj(header, GuestAddress(self.exports.inbuf))
            .and_then(|_| {
                self.mem
                    .write_slice(input, GuestAddress(self.exports.inbuf + hsize))
            });
        if let Err(e) = written {
            return Err(self.stop(format!("cannot write the call's input: {e}")));
        }
        self.seq = seq;
        self.calls += 1;
        fence(Ordering::SeqCst);
        self.store(mailbox::CALL_SEQ, seq);
        fence(Ordering::SeqCst);
        if self.load::<u32>(mailbox::GUEST_SLEEPING).unwrap_or(0) != 0 {
            self.guest_wakeups += 1;
            self.link.control.notify().signal();
        }
        match self.wait_done(seq) {
            Ok(()) => {}
            Err(NoResult::Protocol(msg)) => return Err(self.stop(msg)),
            Err(NoResult::Ended) => return Err(self.ended(started, true)),
        }
        // The result fields, each read once.
        let status = self.load::<i64>(mailbox::STATUS).unwrap_or(0);
        let out = self.load::<u64>(mailbox::OUT).unwrap_or(0);
        let out_len = self.load::<u64>(mailbox::OUT_LEN).unwrap_or(0);
        {
            let mut st = self.link.lock();
            st.in_call = false;
            let now = Instant::now();
            st.idle_deadline = Some(now + self.options.guest_spin + self.options.idle_slack);
            self.link.control.arm(if st.guest_waiting {
                None
            } else {
                st.idle_deadline
            });
        }
        if out_len > self.max_output {
            return Err(CallError::OutputTooLarge {
                len: out_len,
                max: self.max_output,
            });
        }
        let range = match self.map.check_user(out, out_len, false) {
            Ok(r) => r,
            Err(_) => {
                return Err(self.stop(
                    format!(
                        "exitless call {seq}: the guest's result names {out_len} bytes at {out:#x}, outside the memory it may read"
                    ),
                ));
            }
        };
        let mut buf = vec![0u8; out_len as usize];
        if let Err(e) = self.mem.read_user(&range, &mut buf) {
            return Err(self.stop(format!(
                "exitless call {seq}: cannot read the result: {e:?}"
            )));
        }
        if status == 0 {
            Ok(buf)
        } else {
            Err(CallError::Failed(
                String::from_utf8_lossy(&buf).into_owned(),
            ))
        }
    }

    /// Waits until the guest publishes `done_seq == seq`: spinning first, then asleep.
    fn wait_done(&mut self, seq: u64) -> Result<(), NoResult> {
        let check = |this: &Self| -> Result<bool, NoResult> {
            match this.load::<u64>(mailbox::DONE_SEQ) {
                Some(d) if d == seq => Ok(true),
                Some(d) if d == seq - 1 => Ok(false),
                Some(d) => Err(NoResult::Protocol(format!(
                    "exitless call {seq}: the guest published done_seq {d} (expected {seq}, or {} while the call runs)",
                    seq - 1
                ))),
                None => Err(NoResult::Protocol("the mailbox is unreadable".into())),
            }
        };
        let start = Instant::now();
        let spin_until = start + self.options.host_spin;
        let mut n = 0u32;
        loop {
            if check(self)? {
                return Ok(());
            }
            n = n.wrapping_add(1);
            if n.is_multiple_of(64) {
                if self.link.ended.load(Ordering::SeqCst) {
                    return Err(NoResult::Ended);
                }
                let now = Instant::now();
                if now >= spin_until {
                    break;
                }
                // Past the first microseconds, let the guest's vCPU thread have this core
                // if it shares it (a no-op system call otherwise).
                if now - start > YIELD_AFTER {
                    std::thread::yield_now();
                }
            }
            std::hint::spin_loop();
        }
        // Asleep: flag, full fence, look again (the guest checks the flag after it
        // publishes `done_seq`, so one of the two sees the other).
        self.host_sleeps += 1;
        self.store(mailbox::HOST_SLEEPING, 1u32);
        fence(Ordering::SeqCst);
        let r = (|| {
            let mut st = self.link.lock();
            loop {
                if check(self)? {
                    return Ok(());
                }
                if st.ended.is_some() {
                    return Err(NoResult::Ended);
                }
                st = self
                    .link
                    .cv
                    .wait_timeout(st, RECHECK)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        })();
        self.store(mailbox::HOST_SLEEPING, 0u32);
        r
    }

    /// Stops the guest for `why` (a protocol error) and returns the error for the call.
    fn stop(&mut self, why: String) -> CallError {
        tracing::warn!(reason = %why, "stopping a warm sandbox");
        self.stopped = Some(why.clone());
        self.kill_handle().kill();
        self.join();
        CallError::Fault(Fault::protocol(why))
    }

    /// The run ended on its own (or by the timeout, a kill or a signal): the error for the
    /// call (`in_call`: one was running).
    fn ended(&mut self, started: Instant, in_call: bool) -> CallError {
        self.join();
        let outcome = self
            .link
            .lock()
            .ended
            .as_ref()
            .map(|e| e.outcome.clone())
            .unwrap_or_else(|| Err("the vCPU thread ended".into()));
        let spin = self.options.guest_spin;
        let limit = spin + self.options.idle_slack;
        let err = match outcome {
            Err(e) => CallError::Host(e),
            Ok(Outcome::TimedOut(_)) if !in_call => CallError::Fault(Fault::protocol(format!(
                "the guest kept running for over {limit:?} after exitless call {} without sleeping in WAIT (its spin budget is {spin:?}); it was stopped",
                self.seq
            ))),
            Ok(Outcome::TimedOut(_)) => CallError::Timeout(started.elapsed()),
            Ok(Outcome::Panicked(m)) => CallError::Panic(m),
            Ok(Outcome::Fault(f)) => CallError::Fault(f),
            Ok(Outcome::Killed | Outcome::Interrupted(_)) => CallError::Killed,
            Ok(Outcome::Exited(c)) => CallError::Exited(c),
            Ok(Outcome::Returned { .. }) => CallError::Fault(Fault::protocol(
                "the guest used FN_RETURN after the host switched it to exitless calls".into(),
            )),
            Ok(Outcome::Ready(_)) => CallError::Fault(Fault::protocol(
                "the guest re-initialised (FN_READY) during exitless calls".into(),
            )),
        };
        self.stopped = Some(err.to_string());
        err
    }

    /// Waits for the vCPU thread to end and keeps its VM.
    fn join(&mut self) {
        if let Some(t) = self.thread.take()
            && let Ok(vm) = t.join()
        {
            self.vm = Some(vm);
        }
    }
}

impl Drop for WarmSandbox {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.kill_handle().kill();
            self.join();
        }
        // The VM (and with it the guest memory `mem` points into) goes before `mem`, which
        // is not used again.
        self.vm = None;
    }
}
