//! The run loop: enter the guest, and turn each VM exit into the next step — a hypercall
//! answered, a doorbell forwarded, a sleep in `wait`, or the [`Outcome`] that ends the run.

use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;
use pvrun_abi::{EXCEPTION_PORT, HYPERCALL_PORT_BASE, HYPERCALL_PORT_COUNT};
use vm_memory::{Bytes, GuestAddress};

use super::Vm;
use super::backtrace::{self, Crash, CrashKind, Registers};
use super::control::{KillHandle, StopReason};
use super::fault::{self, Fault};
use super::outcome::Outcome;
use crate::arch::FRAME_WORDS;
use crate::devices::DeviceCounters;
use crate::error::Error;
use crate::hypercall::{self, Action, GuestView};
use crate::layout::{R0_STACK_BOTTOM, R0_STACK_TOP};
use crate::vstate::vm as kvm_vm;

/// Where a run under a debugger ([`Vm::run_events`] with `debug`) stops.
pub(crate) enum Event {
    /// The run ended.
    Outcome(Outcome),
    /// The ring-0 stub reported an exception; its frame is on the ring-0 stack
    /// ([`Vm::exception_frame`]) and nothing has been decoded yet.
    Exception,
    /// The debugger asked for a stop ([`super::control::RunControl::debug_break`]).
    Break,
    /// The same, while the guest slept in `WAIT` until this guest-clock deadline: the
    /// sleep goes on when the guest is resumed ([`Vm::resume_wait`]).
    BreakInWait(u64),
}

/// What one `KVM_RUN` came back with, copied out of `kvm_run`.
#[derive(Debug)]
enum Exit {
    Out(u16),
    In(u16),
    Mmio(u64),
    Shutdown,
    Hlt,
    Interrupted,
    Other(String),
}

/// How a `WAIT` ended.
enum Waited {
    /// At its deadline or a device event: the guest goes on.
    Done,
    /// The run was stopped.
    Stopped(Outcome),
    /// A debugger asked for a stop.
    Break,
}

impl Vm {
    /// Sets how long each later [`Vm::run`] may take.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// Forgets an earlier stop request (kill or timeout), so the next run proceeds.
    pub fn clear_stop(&mut self) {
        self.control.clear();
        self.vcpu.set_immediate_exit(0);
    }

    /// Confines the calling thread with the vCPU thread's seccomp filter: from now on it
    /// may only run and reset this VM (and others already created), write output, wait
    /// and exit; any other system call kills the process. Permanent for the thread, so
    /// call it on a thread dedicated to running VMs (the `pvrun` runner does, right after
    /// creating its VM). If the VM has a timeout, the watchdog thread is started first,
    /// since a confined thread cannot start threads: set the timeout before this.
    pub fn confine_thread(&mut self) -> Result<(), Error> {
        // Only a VM with a timeout needs the watchdog (a run without one costs no thread).
        if self.timeout.is_some() {
            self.ensure_watchdog()?;
        }
        crate::seccomp::confine(crate::seccomp::ThreadKind::Vcpu)
    }

    /// Starts the watchdog thread now if it is not running (a confined thread cannot
    /// start it later).
    pub(crate) fn ensure_watchdog(&mut self) -> Result<(), Error> {
        super::control::ensure_watchdog()
    }

    /// A handle that stops this VM's guest from another thread.
    pub fn kill_handle(&self) -> KillHandle {
        KillHandle(self.control.clone())
    }

    /// Runs the guest until it exits, crashes, times out or is killed.
    pub fn run(&mut self) -> Result<Outcome, Error> {
        let started = Instant::now();
        self.crash = None;
        if self.slot_removed {
            crate::vstate::vm::add_slot(&self.vm, &self.ram, true)?;
            self.slot_removed = false;
        }
        self.control.enter(self.vcpu.kvm_run_ptr());
        // Deregister on every way out (an early error, an unwinding panic): the kick
        // handler must never see a stale kvm_run pointer.
        struct Leave(std::sync::Arc<super::control::RunControl>);
        impl Drop for Leave {
            fn drop(&mut self) {
                self.0.leave();
            }
        }
        let _leave = Leave(self.control.clone());
        if let Some(t) = self.timeout {
            super::control::ensure_watchdog()?;
            self.control.arm(Some(started + t));
        }
        let r = self.run_loop();
        // A quit on request (SIGQUIT): keep the guest's state at the stop, for its call
        // stack and a core file, as for a crash.
        if let Ok(Outcome::Interrupted(sig @ libc::SIGQUIT)) = r {
            self.crash = self.capture(CrashKind::Signal(sig), None);
        }
        if self.timeout.is_some() {
            self.control.arm(None);
        }
        self.fns.clean_exit = matches!(r, Ok(Outcome::Returned { .. } | Outcome::Ready(_)));
        r.map(|o| match o {
            Outcome::TimedOut(_) => Outcome::TimedOut(started.elapsed()),
            o => o,
        })
    }

    pub(crate) fn stopped(&self) -> Option<Outcome> {
        self.control.stopped().map(|r| match r {
            StopReason::Signal(sig) => Outcome::Interrupted(sig),
            StopReason::Timeout => Outcome::TimedOut(Duration::ZERO),
            StopReason::Kill => Outcome::Killed,
        })
    }

    fn run_loop(&mut self) -> Result<Outcome, Error> {
        match self.run_events(false)? {
            Event::Outcome(o) => Ok(o),
            _ => Err(Error::Layout("a debugger event without a debugger".into())),
        }
    }

    /// Runs the guest until its run ends or, with `debug` (a debugger is attached), until
    /// an exception or a stop the debugger asked for.
    pub(crate) fn run_events(&mut self, debug: bool) -> Result<Event, Error> {
        loop {
            if let Some(o) = self.stopped() {
                return Ok(Event::Outcome(o));
            }
            if debug && self.control.take_debug_break() {
                return Ok(Event::Break);
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
            tracing::trace!(exit = self.exits, kind = ?exit, "VM exit");
            // Console output travels in the ring; deliver it at every exit, before anything
            // else happens, so it is never lost or reordered against a crash report.
            if let Err(msg) = self.console.drain(self.ram.mem()) {
                return Ok(Event::Outcome(Outcome::Fault(Fault::protocol(msg))));
            }
            if let Some(event) = self.handle(exit, debug)? {
                return Ok(event);
            }
        }
    }

    /// Acts on one exit; `Some` ends the run (or, with `debug`, stops it).
    fn handle(&mut self, exit: Exit, debug: bool) -> Result<Option<Event>, Error> {
        let protocol = |msg: String| Ok(Some(Event::Outcome(Outcome::Fault(Fault::protocol(msg)))));
        // A doorbell that was not served in the kernel: hand it to the device.
        if let Exit::Out(port) = exit
            && self.devices.ring_doorbell(port)
        {
            self.counts.doorbell_exits += 1;
            return Ok(None);
        }
        let c = &mut self.counts;
        match &exit {
            Exit::Out(port)
                if (HYPERCALL_PORT_BASE..HYPERCALL_PORT_BASE + HYPERCALL_PORT_COUNT)
                    .contains(port) =>
            {
                c.hypercall_exits += 1;
                c.hypercall(port - HYPERCALL_PORT_BASE);
            }
            Exit::Out(EXCEPTION_PORT) => c.exception_exits += 1,
            Exit::Interrupted => c.interrupted_exits += 1,
            _ => c.other_exits += 1,
        }
        match exit {
            Exit::Out(port)
                if (HYPERCALL_PORT_BASE..HYPERCALL_PORT_BASE + HYPERCALL_PORT_COUNT)
                    .contains(&port) =>
            {
                self.hypercall(port - HYPERCALL_PORT_BASE, debug)
            }
            Exit::Out(EXCEPTION_PORT) if debug => Ok(Some(Event::Exception)),
            Exit::Out(EXCEPTION_PORT) => Ok(Some(Event::Outcome(Outcome::Fault(self.exception())))),
            Exit::Out(port) => protocol(format!("unexpected write to I/O port {port:#x}")),
            Exit::In(port) => protocol(format!(
                "read from I/O port {port:#x} (hypercalls use `out`)"
            )),
            Exit::Mmio(addr) => protocol(format!(
                "access to unbacked guest-physical address {addr:#x}"
            )),
            Exit::Shutdown => {
                protocol("triple fault (the CPU could not deliver an exception)".into())
            }
            Exit::Hlt => protocol("halted".into()),
            Exit::Interrupted => {
                if let Some(o) = self.stopped() {
                    return Ok(Some(Event::Outcome(o)));
                }
                self.vcpu.set_immediate_exit(0);
                if debug && self.control.take_debug_break() {
                    return Ok(Some(Event::Break));
                }
                Ok(None)
            }
            Exit::Other(what) => protocol(format!("unexpected VM exit {what}")),
        }
    }

    /// Serves hypercall `nr` (its argument address is in `rdi`).
    fn hypercall(&mut self, nr: u16, debug: bool) -> Result<Option<Event>, Error> {
        let rdi = self.vcpu.rdi()?;
        let view = GuestView {
            mem: self.ram.mem(),
            map: &self.map,
        };
        let action = hypercall::dispatch(nr, rdi, &view, &mut self.console, &mut self.fns);
        tracing::trace!(nr, arg = format_args!("{rdi:#x}"), "hypercall");
        let outcome = match action {
            Action::Return(v) => {
                self.vcpu.set_rax(v as u64)?;
                None
            }
            Action::Exit(code) => Some(Outcome::Exited(code)),
            Action::Abort(msg) => {
                // The SDK function that issued ABORT is the innermost frame.
                self.crash = self.capture(CrashKind::Abort, None);
                Some(Outcome::Panicked(msg))
            }
            Action::Fault(msg) => Some(Outcome::Fault(Fault::protocol(msg))),
            Action::Ready(exports) => Some(Outcome::Ready(exports)),
            Action::Returned { status, output } => Some(Outcome::Returned { status, output }),
            Action::Wait(deadline_ns) => match self.wait_warm(deadline_ns, debug) {
                Waited::Stopped(o) => Some(o),
                Waited::Break => return Ok(Some(Event::BreakInWait(deadline_ns))),
                Waited::Done => {
                    self.vcpu.set_rax(0)?;
                    None
                }
            },
        };
        Ok(outcome.map(Event::Outcome))
    }

    /// Goes on with a `WAIT` a debugger stop interrupted ([`Event::BreakInWait`]), after
    /// the debugger let the guest run again: `None` once the sleep is over (the guest may
    /// be entered; the call's 0 is in `rax`), or why the run stops again.
    pub(crate) fn resume_wait(&mut self, deadline_ns: u64) -> Result<Option<Event>, Error> {
        match self.wait(deadline_ns, true) {
            Waited::Stopped(o) => Ok(Some(Event::Outcome(o))),
            Waited::Break => Ok(Some(Event::BreakInWait(deadline_ns))),
            Waited::Done => {
                let mut regs = self.vcpu.regs()?;
                regs.rax = 0;
                let sregs = self.vcpu.sregs()?;
                self.vcpu.load_regs(&regs, &sregs)?;
                Ok(None)
            }
        }
    }

    /// [`Vm::wait`], telling a warm sandbox ([`crate::function::warm`]) that its guest
    /// sleeps, so its idle deadline is off meanwhile.
    fn wait_warm(&mut self, deadline_ns: u64, debug: bool) -> Waited {
        let Some(link) = self.fns.warm.clone() else {
            return self.wait(deadline_ns, debug);
        };
        link.guest_sleeps();
        let waited = self.wait(deadline_ns, debug);
        link.guest_wakes();
        waited
    }

    /// Sleeps until the guest deadline, a device event, or a stop (with `debug`, also a
    /// debugger's break).
    fn wait(&mut self, deadline_ns: u64, debug: bool) -> Waited {
        let target = self
            .boot_instant
            .checked_add(Duration::from_nanos(deadline_ns));
        loop {
            if let Some(o) = self.stopped() {
                return Waited::Stopped(o);
            }
            if debug && self.control.take_debug_break() {
                return Waited::Break;
            }
            let now = Instant::now();
            // At most a second at a time, so a stop that no signal announced is still seen.
            let left = match target {
                Some(t) if now >= t => return Waited::Done,
                Some(t) => (t - now).min(Duration::from_secs(1)),
                None => Duration::from_secs(1),
            };
            if self.control.notify().wait(left) {
                // A device published responses (or a stop was requested).
                if let Some(o) = self.stopped() {
                    return Waited::Stopped(o);
                }
                if debug && self.control.take_debug_break() {
                    return Waited::Break;
                }
                return Waited::Done;
            }
        }
    }

    /// The guest's registers and call stack now; `frame` is the exception frame
    /// `[rip, cs, rflags, rsp, ss]` the CPU pushed, for an exception.
    fn capture(&self, kind: CrashKind, frame: Option<[u64; 5]>) -> Option<Crash> {
        let r = self.vcpu.regs().ok()?;
        let s = self.vcpu.sregs().ok()?;
        let mut regs = Registers::from_kvm(&r, &s);
        if let Some([rip, cs, rflags, rsp, ss]) = frame {
            regs.rip = rip;
            regs.cs = cs;
            regs.rflags = rflags;
            regs.rsp = rsp;
            regs.ss = ss;
        }
        let backtrace = backtrace::walk(self.ram.mem(), &self.map, regs.rip, regs.rbp);
        Some(Crash {
            kind,
            regs,
            backtrace,
        })
    }

    /// The frame the ring-0 stub left for the exception being reported: `(rsp, words)`
    /// with `words` = `[rdx, vector, error code, rip, cs, rflags, rsp, ss]`, all on the
    /// host-owned ring-0 stack.
    pub(crate) fn exception_frame(&self) -> Result<(u64, [u64; 8]), String> {
        let rsp = self
            .vcpu
            .regs()
            .map_err(|e| format!("cannot read registers: {e}"))?
            .rsp;
        if !(R0_STACK_BOTTOM..=R0_STACK_TOP - FRAME_WORDS * 8).contains(&rsp) {
            return Err(format!("exception stub ran with a bad stack {rsp:#x}"));
        }
        let mut frame = [0u64; FRAME_WORDS as usize];
        for (i, slot) in frame.iter_mut().enumerate() {
            *slot = self
                .ram
                .mem()
                .read_obj::<u64>(GuestAddress(rsp + 8 * i as u64))
                .unwrap_or(0);
        }
        Ok((rsp, frame))
    }

    /// Reads the exception frame the ring-0 stub left and describes the fault.
    pub(crate) fn exception(&mut self) -> Fault {
        let cr2 = self.vcpu.sregs().map(|s| s.cr2).unwrap_or(0);
        let frame = match self.exception_frame() {
            Ok((_, f)) => f,
            Err(msg) => return Fault::protocol(msg),
        };
        let [rdx, vector, error_code, rip, cs, rflags, rsp, ss] = frame;
        self.crash = self.capture(
            CrashKind::Exception(vector),
            Some([rip, cs, rflags, rsp, ss]),
        );
        if let Some(c) = self.crash.as_mut() {
            c.regs.rdx = rdx;
        }
        let frame = [vector, error_code, rip, cs];
        let fault = fault::describe(
            fault::Exception {
                vector: frame[0],
                error_code: frame[1],
                rip: frame[2],
                cs: frame[3],
                cr2,
                regs: self.crash.as_ref().map(|c| c.regs),
            },
            &self.image,
            &self.map,
        );
        // A `syscall` that jumped to 0: the backtrace starts at the instruction itself.
        if let (Some(pc), Some(rip)) = (
            self.crash
                .as_mut()
                .and_then(|c| c.backtrace.pcs.first_mut()),
            fault.rip,
        ) {
            *pc = rip;
        }
        fault
    }

    /// Test and benchmark support: re-enters the guest for `n` exits of any kind without
    /// handling them, and returns the time taken. With the `testing` module's exit-loop
    /// guest this is the raw KVM exit floor of this machine.
    #[doc(hidden)]
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

    /// The guest pages written since the last call (KVM dirty log; needs
    /// [`crate::VmConfig::dirty_log`]), as a bitmap of 4 KiB pages.
    pub fn take_dirty_log(&self) -> Result<Vec<u64>, Error> {
        kvm_vm::dirty_log(&self.vm, self.ram.size())
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
