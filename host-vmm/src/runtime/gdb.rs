//! `--gdb`: a GDB remote-serial-protocol stub on the `gdbstub` crate, so Debian's `gdb`
//! can debug a guest as it would a remote process.
//!
//! `gdbstub` (with `gdbstub_arch`'s `X86_64_SSE` register layout) is the maintained Rust
//! implementation of the protocol that crosvm and Firecracker's gdb support also use: it
//! parses every packet (with bounds on its buffer), so this module only maps its target
//! traits onto the vCPU and the guest's memory map.
//!
//! How the pieces fit this KVM (probed on our PVM hosts: `KVM_SET_GUEST_DEBUG` is accepted
//! but neither software breakpoints nor single-step reach the host through it, and debug
//! registers set with `KVM_SET_DEBUGREGS` never fire, so nothing here uses them and there
//! are no hardware breakpoints or watchpoints):
//!
//! - **Breakpoints** are `int3` bytes the host writes into guest text (the guest cannot
//!   write its text; the host can). The `#BP` goes through the IDT to the ring-0 stub
//!   like any exception, which reports it with one `out`.
//! - **Single-step** sets RFLAGS.TF in the guest; the `#DB` after one instruction takes
//!   the same path.
//! - **Resuming** from an exception: the stub saved `rdx` and the CPU saved `rip`, `cs`,
//!   `rflags`, `rsp`, `ss` on the ring-0 stack; the host writes the (possibly edited)
//!   values back into that frame and enters the stub page's resume trampoline
//!   (`pop rdx ; add rsp, 16 ; iretq`), so the CPU itself returns to ring 3.
//! - **Ctrl-C** from gdb: a small confined thread polls the socket while the guest runs
//!   and, when gdb sends something, kicks the vCPU ([`RunControl::debug_break`]); the
//!   run loop stops at the next exit (a guest asleep in `WAIT` stops too and goes on
//!   sleeping when resumed).
//! - **Faults and panics** stop the guest with `SIGSEGV` (`SIGILL`, `SIGFPE`, `SIGBUS`
//!   by vector) or `SIGABRT` at the faulting instruction or the SDK's abort call, so
//!   `bt` works; continuing ends the run as it would have ended without gdb.
//! - **The timeout** (`--timeout`) counts only the time the guest runs: it is disarmed
//!   while the guest is stopped in the debugger.
//! - **Confinement:** the session needs only `read`, `write` and `poll` on the socket
//!   (which the vCPU thread's seccomp filter allows) and the register ioctls it already
//!   has; the socket is set up (accept, `TCP_NODELAY`, a send timeout) before the thread
//!   is confined. The poller thread runs under the watchdog's filter.
//!
//! Every address gdb names is checked against the guest's memory map first: reads and
//! writes go through [`MemoryMap::check_user`] and [`UserMemory`], breakpoints only into
//! executable guest regions; the host's own structures answer `E` errors.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gdbstub::common::Signal;
use gdbstub::conn::{Connection, ConnectionExt};
use gdbstub::stub::run_blocking::{self, BlockingEventLoop, WaitForStopReasonError};
use gdbstub::stub::{DisconnectReason, GdbStub, SingleThreadStopReason};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::base::singlethread::{
    SingleThreadBase, SingleThreadResume, SingleThreadResumeOps, SingleThreadSingleStep,
    SingleThreadSingleStepOps,
};
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, SwBreakpoint, SwBreakpointOps,
};
use gdbstub::target::{Target, TargetError, TargetResult};
use gdbstub_arch::x86::X86_64_SSE;
use gdbstub_arch::x86::reg::X86_64CoreRegs;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use pvrun_abi::perm;
use vm_memory::{Bytes, GuestAddress};

use super::Vm;
use super::control::RunControl;
use super::fault::is_canonical;
use super::outcome::Outcome;
use super::run_loop::Event;
use crate::arch::RESUME_ADDR;
use crate::error::Error;
use crate::memory::UserMemory;

/// RFLAGS.TF (single-step).
const TF: u64 = 1 << 8;
/// The RFLAGS bits gdb may change: CF PF AF ZF SF TF DF OF AC ID. Never IOPL, NT, RF, VM,
/// VIF/VIP or IF: a debugger must not give the guest port access or change its mode.
const USER_FLAGS: u64 =
    0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x100 | 0x400 | 0x800 | 0x4_0000 | 0x20_0000;
/// How long a write to gdb may block before the session is given up (a client that
/// stopped reading must not hold the host).
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many software breakpoints at once (a client cannot grow host memory
/// without bound).
const MAX_BREAKPOINTS: usize = 4096;
/// How often the poller looks at the socket while the guest runs (it also wakes on data).
const POLL_MS: i32 = 100;

/// Parses `--gdb`: `PORT` (on 127.0.0.1) or `ADDR:PORT`.
pub fn parse_gdb_addr(s: &str) -> Result<SocketAddr, String> {
    let bad = || format!("`{s}` is not PORT or ADDR:PORT (e.g. 1234 or 127.0.0.1:1234)");
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.to_socket_addrs()
        .map_err(|_| bad())?
        .next()
        .ok_or_else(bad)
}

/// A socket gdb will connect to, bound before the guest's first instruction.
pub struct GdbListener {
    listener: TcpListener,
}

impl GdbListener {
    /// Listens on `addr` (port 0: one the system picks; see [`GdbListener::local_addr`]).
    pub fn bind(addr: SocketAddr) -> Result<GdbListener, Error> {
        TcpListener::bind(addr)
            .map(|listener| GdbListener { listener })
            .map_err(|e| {
                let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
                    " (another program uses it: pick another --gdb port)"
                } else {
                    ""
                };
                Error::Config(format!("cannot listen for gdb on {addr}: {e}{hint}"))
            })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.listener.local_addr().map_err(Error::Io)
    }

    /// The `pvrun: waiting for gdb ...` line, with the command that connects.
    pub fn waiting_line(&self, guest: &std::path::Path) -> String {
        let addr = match self.local_addr() {
            Ok(a) => a,
            Err(_) => return "pvrun: waiting for gdb".into(),
        };
        let target = if addr.ip().is_loopback() {
            format!(":{}", addr.port())
        } else {
            addr.to_string()
        };
        let guest = guest.display().to_string();
        let guest = crate::output::escape_controls(&guest);
        format!("pvrun: waiting for gdb on {addr} (gdb {guest} -ex 'target remote {target}')")
    }

    /// Waits for gdb to connect and prepares the session for `vm` (the poller thread is
    /// started here: call it before confining the vCPU thread).
    pub fn accept(&self, vm: &Vm) -> Result<GdbSession, Error> {
        let (stream, _) = self.listener.accept().map_err(Error::Io)?;
        GdbSession::new(stream, vm.control.clone())
    }
}

/// One connected gdb, ready for [`Vm::run_gdb`].
pub struct GdbSession {
    conn: Option<Conn>,
    poller: Arc<Poller>,
    poller_thread: Option<JoinHandle<()>>,
}

impl GdbSession {
    fn new(stream: TcpStream, control: Arc<RunControl>) -> Result<GdbSession, Error> {
        let _ = stream.set_nodelay(true);
        stream
            .set_write_timeout(Some(SEND_TIMEOUT))
            .map_err(Error::Io)?;
        let watch = OwnedFd::from(stream.try_clone().map_err(Error::Io)?);
        let poller = Arc::new(Poller::default());
        let p = poller.clone();
        let stops = control.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("pvrun-gdb-poll".into())
            .spawn(move || {
                crate::seccomp::confine_or_exit(crate::seccomp::ThreadKind::Watchdog);
                let _ = ready_tx.send(());
                p.watch(watch, control)
            })
            .map_err(Error::Io)?;
        let _ = ready_rx.recv();
        Ok(GdbSession {
            conn: Some(Conn {
                file: std::fs::File::from(OwnedFd::from(stream)),
                input: Vec::new(),
                at: 0,
                output: Vec::new(),
                control: stops,
            }),
            poller,
            poller_thread: Some(thread),
        })
    }
}

impl Drop for GdbSession {
    fn drop(&mut self) {
        self.poller.set(|s| s.quit = true);
        if let Some(t) = self.poller_thread.take() {
            let _ = t.join();
        }
    }
}

/// The gdb connection, on `read`/`write`/`poll` only (what the vCPU filter allows; std's
/// socket calls use `recvfrom`/`sendto`), buffered both ways.
struct Conn {
    file: std::fs::File,
    input: Vec<u8>,
    at: usize,
    output: Vec<u8>,
    /// Tells a real stop (SIGINT/SIGTERM, a kill) from a late debugger kick.
    control: Arc<RunControl>,
}

impl Conn {
    /// Fills the input buffer with one `read` (blocking); an error at end of stream.
    fn fill(&mut self) -> std::io::Result<()> {
        let mut buf = [0u8; 4096];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "gdb closed the connection",
                    ));
                }
                Ok(n) => {
                    self.input = buf[..n].to_vec();
                    self.at = 0;
                    return Ok(());
                }
                // A signal interrupts reads: a real stop (SIGINT/SIGTERM, a kill) ends the
                // session; a kick the poller sent as the guest stopped does not.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                    if self.control.stopped().is_some() {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether a byte can be read without blocking.
    fn readable(&self) -> bool {
        if self.at < self.input.len() {
            return true;
        }
        let mut p = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no timeout.
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        r > 0
    }
}

impl Connection for Conn {
    type Error = std::io::Error;

    fn write(&mut self, byte: u8) -> Result<(), Self::Error> {
        self.output.push(byte);
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8]) -> Result<(), Self::Error> {
        self.output.extend_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        let out = std::mem::take(&mut self.output);
        self.file.write_all(&out)
    }
}

impl ConnectionExt for Conn {
    fn read(&mut self) -> Result<u8, Self::Error> {
        if self.at >= self.input.len() {
            self.fill()?;
        }
        let b = self.input[self.at];
        self.at += 1;
        Ok(b)
    }

    fn peek(&mut self) -> Result<Option<u8>, Self::Error> {
        if self.at >= self.input.len() {
            if !self.readable() {
                return Ok(None);
            }
            self.fill()?;
        }
        Ok(Some(self.input[self.at]))
    }
}

/// What the poller thread is told.
#[derive(Default)]
struct PollState {
    /// The guest is running (the poller watches the socket).
    running: bool,
    /// Counts runs, so a kick is for the run it saw.
    generation: u64,
    quit: bool,
}

#[derive(Default)]
struct Poller {
    state: Mutex<PollState>,
    cv: Condvar,
}

impl Poller {
    fn set(&self, f: impl FnOnce(&mut PollState)) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut st);
        self.cv.notify_all();
    }

    /// The poller thread: while the guest runs, a readable (or closed) socket means gdb
    /// wants it stopped.
    fn watch(&self, fd: OwnedFd, control: Arc<RunControl>) {
        loop {
            let generation = {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                while !st.running && !st.quit {
                    st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                if st.quit {
                    return;
                }
                st.generation
            };
            let mut p = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut p, 1, POLL_MS) } <= 0 {
                continue;
            }
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.running && st.generation == generation {
                control.debug_break();
                // One kick per run: wait until the vCPU thread has stopped.
                while st.running && st.generation == generation && !st.quit {
                    st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }
}

/// The signal gdb is told for exception `vector`.
fn signal_for(vector: u64) -> Signal {
    match vector {
        0 | 16 | 19 => Signal::SIGFPE,
        6 => Signal::SIGILL,
        17 => Signal::SIGBUS,
        1 | 3 => Signal::SIGTRAP,
        _ => Signal::SIGSEGV,
    }
}

/// The guest as gdb sees it while stopped.
struct Debuggee<'a> {
    vm: &'a mut Vm,
    /// The guest's registers as gdb sees them (at an exception: as they were in ring 3).
    regs: kvm_regs,
    /// The vCPU's registers as they are (in the stub, at an exception).
    raw: kvm_regs,
    sregs: kvm_sregs,
    /// The stub's frame on the ring-0 stack, when stopped at an exception.
    frame: Option<u64>,
    /// CS and SS from that frame (the guest's, in ring 3).
    frame_segments: (u64, u64),
    /// Software breakpoints: address -> the byte the `int3` replaced.
    breakpoints: BTreeMap<u64, u8>,
    /// Single-step on the next resume.
    step: bool,
    /// Stopped in `WAIT` until this deadline: the sleep goes on when resumed.
    pending_wait: Option<u64>,
    /// Stopped at a crash or panic: resuming ends the run with this outcome.
    fatal: Option<Outcome>,
    /// The run ended with this outcome (gdb was told).
    ended: Option<Outcome>,
    /// What is left of `--timeout` (it runs only while the guest does).
    budget: Option<Duration>,
    poller: Arc<Poller>,
}

impl Debuggee<'_> {
    /// Records the stopped guest's state (after completing the exit it stopped at).
    fn load(&mut self) -> Result<(), Error> {
        self.vm.vcpu.finish_pending_exit()?;
        self.raw = self.vm.vcpu.regs()?;
        self.sregs = self.vm.vcpu.sregs()?;
        self.regs = self.raw;
        self.frame = None;
        Ok(())
    }

    /// As [`Self::load`], at an exception the stub reported: the guest's own registers
    /// come from the stub's frame.
    fn load_exception(&mut self) -> Result<u64, Error> {
        let (at, f) = self.vm.exception_frame().map_err(Error::Layout)?;
        self.load()?;
        let [rdx, vector, _error, rip, cs, rflags, rsp, ss] = f;
        self.frame_segments = (cs, ss);
        self.regs.rdx = rdx;
        self.regs.rip = rip;
        self.regs.rflags = rflags;
        self.regs.rsp = rsp;
        self.frame = Some(at);
        Ok(vector)
    }

    /// Hands the registers back to the vCPU for the next entry (TF as `step` says).
    fn store(&mut self) -> Result<(), Error> {
        let mut regs = self.regs;
        regs.rflags = if self.step {
            regs.rflags | TF
        } else {
            regs.rflags & !TF
        };
        if let Some(at) = self.frame.take() {
            // Back through the trampoline: rdx, rip, rflags and rsp from the frame.
            let mem = self.vm.ram.mem();
            for (slot, v) in [
                (0, regs.rdx),
                (3, regs.rip),
                (5, regs.rflags),
                (6, regs.rsp),
            ] {
                mem.write_obj(v, GuestAddress(at + 8 * slot))
                    .map_err(|e| Error::Layout(format!("cannot write the exception frame: {e}")))?;
            }
            regs.rip = RESUME_ADDR;
            regs.rsp = at;
            regs.rflags = self.raw.rflags;
        }
        self.vm
            .vcpu
            .fd()
            .set_regs(&regs)
            .map_err(|e| Error::Kvm("KVM_SET_REGS", e))?;
        self.raw = regs;
        Ok(())
    }

    /// Runs the guest until the next event gdb must hear about.
    fn run(
        &mut self,
        conn: &mut Conn,
    ) -> Result<run_blocking::Event<SingleThreadStopReason<u64>>, Error> {
        use SingleThreadStopReason as S;
        use run_blocking::Event as E;
        if let Some(o) = self.fatal.take() {
            let sig = match &o {
                Outcome::Panicked(_) => Signal::SIGABRT,
                Outcome::Fault(f) => f.vector.map(signal_for).unwrap_or(Signal::SIGSEGV),
                _ => Signal::SIGKILL,
            };
            self.ended = Some(o);
            return Ok(E::TargetStopped(S::Terminated(sig)));
        }
        self.store()?;
        // A kick that arrived while the guest was stopped is stale (gdb's data, if any,
        // is still in the socket, and the poller sees it on this run).
        self.vm.control.take_debug_break();
        self.vm.vcpu.set_immediate_exit(0);
        loop {
            let event = self.run_guest()?;
            match event {
                Event::Outcome(o) => return Ok(E::TargetStopped(self.outcome(o)?)),
                Event::Exception => {
                    let (_, f) = self.vm.exception_frame().map_err(Error::Layout)?;
                    let vector = f[1];
                    if vector == 1 || vector == 3 {
                        self.load_exception()?;
                        if vector == 3
                            && self
                                .breakpoints
                                .contains_key(&self.regs.rip.wrapping_sub(1))
                        {
                            self.regs.rip -= 1;
                            return Ok(E::TargetStopped(S::SwBreak(())));
                        }
                        if vector == 1 && self.step && self.regs.rflags & TF != 0 {
                            self.regs.rflags &= !TF;
                            return Ok(E::TargetStopped(S::DoneStep));
                        }
                        return Ok(E::TargetStopped(S::Signal(Signal::SIGTRAP)));
                    }
                    let fault = self.vm.exception();
                    self.load_exception()?;
                    self.fatal = Some(Outcome::Fault(fault));
                    return Ok(E::TargetStopped(S::Signal(signal_for(vector))));
                }
                Event::Break | Event::BreakInWait(_) => {
                    if let Event::BreakInWait(d) = event {
                        self.pending_wait = Some(d);
                    }
                    // Interrupted inside the stub: it reports its exception in a few
                    // instructions; stop there instead.
                    let s = self.vm.vcpu.sregs()?;
                    // Or a late kick for data already handled: run on.
                    if (s.cs.selector & 3 == 0 && self.pending_wait.is_none()) || !conn.readable() {
                        continue;
                    }
                    self.load()?;
                    let byte = conn
                        .read()
                        .map_err(|e| Error::Config(format!("gdb: {e}")))?;
                    return Ok(E::IncomingData(byte));
                }
            }
        }
    }

    /// One stretch of guest execution, with the timeout armed and the poller watching.
    fn run_guest(&mut self) -> Result<Event, Error> {
        let started = Instant::now();
        if let Some(b) = self.budget {
            self.vm.ensure_watchdog()?;
            self.vm.control.arm(Some(started + b));
        }
        self.poller.set(|s| {
            s.running = true;
            s.generation += 1;
        });
        let r = (|| {
            if let Some(d) = self.pending_wait {
                match self.vm.resume_wait(d)? {
                    None => self.pending_wait = None,
                    Some(Event::BreakInWait(d)) => return Ok(Event::BreakInWait(d)),
                    Some(e) => {
                        self.pending_wait = None;
                        return Ok(e);
                    }
                }
            }
            self.vm.run_events(true)
        })();
        self.poller.set(|s| s.running = false);
        if let Some(b) = self.budget {
            self.vm.control.arm(None);
            self.budget = Some(b.saturating_sub(started.elapsed()));
        }
        r
    }

    /// What gdb is told when the run ends (or stops at a panic).
    fn outcome(&mut self, o: Outcome) -> Result<SingleThreadStopReason<u64>, Error> {
        use SingleThreadStopReason as S;
        Ok(match o {
            Outcome::Exited(code) => {
                self.ended = Some(o);
                S::Exited(code as u8)
            }
            Outcome::Panicked(_) => {
                self.load()?;
                self.fatal = Some(o);
                S::Signal(Signal::SIGABRT)
            }
            Outcome::Fault(_) => {
                self.load()?;
                self.fatal = Some(o);
                S::Signal(Signal::SIGSEGV)
            }
            o => {
                self.ended = Some(o);
                S::Terminated(Signal::SIGKILL)
            }
        })
    }

    /// The x87/SSE state. From `KVM_GET_XSAVE` where KVM has it (on our PVM hosts
    /// `KVM_GET_FPU` reads zeros), else `KVM_GET_FPU`.
    fn fpu(&self) -> Result<kvm_fpu, Error> {
        let fd = self.vm.vcpu.fd();
        let Ok(x) = fd.get_xsave() else {
            return fd.get_fpu().map_err(|e| Error::Kvm("KVM_GET_FPU", e));
        };
        // The legacy region of the XSAVE area, as FXSAVE lays it out.
        let b: Vec<u8> = x.region[..128]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let mut f = kvm_fpu {
            fcw: u16_at(0),
            fsw: u16_at(2),
            ftwx: b[4],
            last_opcode: u16_at(6),
            last_ip: u64_at(8),
            last_dp: u64_at(16),
            mxcsr: u32::from_le_bytes([b[24], b[25], b[26], b[27]]),
            ..Default::default()
        };
        for i in 0..8 {
            f.fpr[i].copy_from_slice(&b[32 + 16 * i..48 + 16 * i]);
        }
        for i in 0..16 {
            f.xmm[i].copy_from_slice(&b[160 + 16 * i..176 + 16 * i]);
        }
        Ok(f)
    }

    /// Loads the x87/SSE state (into the XSAVE area where KVM has one).
    fn set_fpu(&self, f: &kvm_fpu) -> Result<(), Error> {
        let fd = self.vm.vcpu.fd();
        let Ok(mut x) = fd.get_xsave() else {
            return fd.set_fpu(f).map_err(|e| Error::Kvm("KVM_SET_FPU", e));
        };
        let mut b: Vec<u8> = x.region[..128]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        b[0..2].copy_from_slice(&f.fcw.to_le_bytes());
        b[2..4].copy_from_slice(&f.fsw.to_le_bytes());
        b[4] = f.ftwx;
        b[6..8].copy_from_slice(&f.last_opcode.to_le_bytes());
        b[8..16].copy_from_slice(&f.last_ip.to_le_bytes());
        b[16..24].copy_from_slice(&f.last_dp.to_le_bytes());
        b[24..28].copy_from_slice(&f.mxcsr.to_le_bytes());
        for i in 0..8 {
            b[32 + 16 * i..48 + 16 * i].copy_from_slice(&f.fpr[i]);
        }
        for i in 0..16 {
            b[160 + 16 * i..176 + 16 * i].copy_from_slice(&f.xmm[i]);
        }
        for (w, c) in x.region[..128].iter_mut().zip(b.chunks(4)) {
            *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        // XSTATE_BV: the x87 and SSE components are in use (else XRSTOR loads their
        // initial state and the edit is lost).
        x.region[128] |= 0b11;
        // SAFETY: the area is the one KVM_GET_XSAVE just returned, of the size it expects.
        unsafe { fd.set_xsave(&x) }.map_err(|e| Error::Kvm("KVM_SET_XSAVE", e))
    }

    /// Takes every breakpoint out of guest text.
    fn remove_breakpoints(&mut self) {
        for (addr, byte) in std::mem::take(&mut self.breakpoints) {
            let _ = self.vm.ram.mem().write_obj(byte, GuestAddress(addr));
        }
    }

    /// Whether `addr` is in guest text (a user region the guest may execute).
    fn in_text(&self, addr: u64) -> bool {
        self.vm
            .map
            .find(addr)
            .is_some_and(|r| r.user && r.perm & perm::X != 0)
    }
}

impl Target for Debuggee<'_> {
    type Arch = X86_64_SSE;
    type Error = Error;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::SingleThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }
}

impl SingleThreadBase for Debuggee<'_> {
    fn read_registers(&mut self, regs: &mut X86_64CoreRegs) -> TargetResult<(), Self> {
        let r = &self.regs;
        regs.regs = [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        regs.rip = r.rip;
        regs.eflags = r.rflags as u32;
        let s = &self.sregs;
        (regs.segments.cs, regs.segments.ss) = match self.frame {
            Some(_) => (self.frame_segments.0 as u32, self.frame_segments.1 as u32),
            None => (s.cs.selector as u32, s.ss.selector as u32),
        };
        regs.segments.ds = s.ds.selector as u32;
        regs.segments.es = s.es.selector as u32;
        regs.segments.fs = s.fs.selector as u32;
        regs.segments.gs = s.gs.selector as u32;
        let fpu = self.fpu().map_err(TargetError::Fatal)?;
        for (i, st) in regs.st.iter_mut().enumerate() {
            st.copy_from_slice(&fpu.fpr[i][..10]);
        }
        regs.fpu.fctrl = fpu.fcw as u32;
        regs.fpu.fstat = fpu.fsw as u32;
        // The abridged tag (a bit per register) as the full tag word (00 valid, 11 empty).
        regs.fpu.ftag = (0..8)
            .map(|i| {
                if fpu.ftwx >> i & 1 != 0 {
                    0
                } else {
                    3u32 << (2 * i)
                }
            })
            .sum();
        regs.fpu.fop = fpu.last_opcode as u32;
        regs.fpu.fioff = fpu.last_ip as u32;
        regs.fpu.fooff = fpu.last_dp as u32;
        for (i, x) in regs.xmm.iter_mut().enumerate() {
            *x = u128::from_le_bytes(fpu.xmm[i]);
        }
        regs.mxcsr = fpu.mxcsr;
        Ok(())
    }

    fn write_registers(&mut self, regs: &X86_64CoreRegs) -> TargetResult<(), Self> {
        // Segments are the host's: gdb writes back what it read, anything else is refused.
        let mut cur = X86_64CoreRegs::default();
        self.read_registers(&mut cur)?;
        if regs.segments != cur.segments || !is_canonical(regs.rip) {
            return Err(TargetError::NonFatal);
        }
        let g = regs.regs;
        let r = &mut self.regs;
        [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ] = g;
        r.rip = regs.rip;
        r.rflags = (r.rflags & !USER_FLAGS) | (regs.eflags as u64 & USER_FLAGS);
        let mut fpu = self.fpu().map_err(TargetError::Fatal)?;
        for (i, st) in regs.st.iter().enumerate() {
            fpu.fpr[i][..10].copy_from_slice(st);
        }
        fpu.fcw = regs.fpu.fctrl as u16;
        fpu.fsw = regs.fpu.fstat as u16;
        fpu.ftwx = (0..8)
            .filter(|i| (regs.fpu.ftag >> (2 * i)) & 3 != 3)
            .map(|i| 1u8 << i)
            .sum();
        for (i, x) in regs.xmm.iter().enumerate() {
            fpu.xmm[i] = x.to_le_bytes();
        }
        // Only the architected MXCSR bits: a reserved bit would make the state unloadable.
        fpu.mxcsr = regs.mxcsr & 0xffff;
        self.set_fpu(&fpu).map_err(TargetError::Fatal)?;
        Ok(())
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8]) -> TargetResult<usize, Self> {
        let mem = self.vm.ram.mem();
        let mut done = 0usize;
        while done < data.len() {
            let addr = start.wrapping_add(done as u64);
            let Some(region) = self.vm.map.find(addr) else {
                break;
            };
            let n = (region.end - addr).min((data.len() - done) as u64);
            let Ok(range) = self.vm.map.check_user(addr, n, false) else {
                break;
            };
            if mem
                .read_user(&range, &mut data[done..done + n as usize])
                .is_err()
            {
                break;
            }
            done += n as usize;
        }
        if done == 0 && !data.is_empty() {
            return Err(TargetError::Errno(libc::EFAULT as u8));
        }
        // gdb sees the original bytes under its breakpoints.
        for (&addr, &byte) in self
            .breakpoints
            .range(start..start.saturating_add(done as u64))
        {
            data[(addr - start) as usize] = byte;
        }
        Ok(done)
    }

    fn write_addrs(&mut self, start: u64, data: &[u8]) -> TargetResult<(), Self> {
        let range = self
            .vm
            .map
            .check_user(start, data.len() as u64, true)
            .map_err(|_| TargetError::Errno(libc::EFAULT as u8))?;
        self.vm
            .ram
            .mem()
            .write_user(&range, data)
            .map_err(|_| TargetError::Errno(libc::EFAULT as u8))
    }

    fn support_resume(&mut self) -> Option<SingleThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

impl SingleThreadResume for Debuggee<'_> {
    fn resume(&mut self, _signal: Option<Signal>) -> Result<(), Self::Error> {
        self.step = false;
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<SingleThreadSingleStepOps<'_, Self>> {
        Some(self)
    }
}

impl SingleThreadSingleStep for Debuggee<'_> {
    fn step(&mut self, _signal: Option<Signal>) -> Result<(), Self::Error> {
        self.step = true;
        Ok(())
    }
}

impl Breakpoints for Debuggee<'_> {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }
}

impl SwBreakpoint for Debuggee<'_> {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.breakpoints.contains_key(&addr) {
            return Ok(true);
        }
        if !self.in_text(addr) || self.breakpoints.len() >= MAX_BREAKPOINTS {
            return Ok(false);
        }
        let range = self
            .vm
            .map
            .check_user(addr, 1, false)
            .map_err(|_| TargetError::Errno(libc::EFAULT as u8))?;
        let mut orig = [0u8];
        let mem = self.vm.ram.mem();
        mem.read_user(&range, &mut orig)
            .map_err(|_| TargetError::Errno(libc::EFAULT as u8))?;
        // The host writes guest text (the guest cannot): checked above to be guest text.
        mem.write_obj(0xccu8, GuestAddress(addr))
            .map_err(|_| TargetError::Errno(libc::EFAULT as u8))?;
        self.breakpoints.insert(addr, orig[0]);
        Ok(true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        let Some(byte) = self.breakpoints.remove(&addr) else {
            return Ok(false);
        };
        self.vm
            .ram
            .mem()
            .write_obj(byte, GuestAddress(addr))
            .map_err(|_| TargetError::Errno(libc::EFAULT as u8))?;
        Ok(true)
    }
}

/// The event loop `run_blocking` drives: the guest runs on this (the vCPU) thread.
struct Loop<'a>(std::marker::PhantomData<&'a ()>);

impl<'a> BlockingEventLoop for Loop<'a> {
    type Target = Debuggee<'a>;
    type Connection = Conn;
    type StopReason = SingleThreadStopReason<u64>;

    #[allow(clippy::type_complexity)]
    fn wait_for_stop_reason(
        target: &mut Debuggee<'a>,
        conn: &mut Conn,
    ) -> Result<run_blocking::Event<Self::StopReason>, WaitForStopReasonError<Error, std::io::Error>>
    {
        target.run(conn).map_err(WaitForStopReasonError::Target)
    }

    fn on_interrupt(_target: &mut Debuggee<'a>) -> Result<Option<Self::StopReason>, Error> {
        Ok(Some(SingleThreadStopReason::Signal(Signal::SIGINT)))
    }
}

impl Vm {
    /// Runs the guest under gdb (connected with [`GdbListener::accept`]): stopped before
    /// its first instruction until gdb resumes it, to the end of the run. If gdb detaches
    /// or the connection fails, breakpoints are removed and the guest runs on without it
    /// (a failure is reported on stderr); gdb's `kill` ends the run with
    /// [`Outcome::Killed`].
    pub fn run_gdb(&mut self, mut session: GdbSession) -> Result<Outcome, Error> {
        self.crash = None;
        self.control.enter(self.vcpu.kvm_run_ptr());
        struct Leave(Arc<RunControl>);
        impl Drop for Leave {
            fn drop(&mut self) {
                self.0.leave();
            }
        }
        let _leave = Leave(self.control.clone());
        let conn = session
            .conn
            .take()
            .ok_or_else(|| Error::Config("the gdb session was already used".into()))?;
        let timeout = self.timeout;
        let mut d = Debuggee {
            vm: self,
            regs: kvm_regs::default(),
            raw: kvm_regs::default(),
            sregs: kvm_sregs::default(),
            frame: None,
            frame_segments: (0, 0),
            breakpoints: BTreeMap::new(),
            step: false,
            pending_wait: None,
            fatal: None,
            ended: None,
            budget: timeout,
            poller: session.poller.clone(),
        };
        d.load()?;
        let result = GdbStub::new(conn).run_blocking::<Loop<'_>>(&mut d);
        let timed_out = |o: Outcome| match o {
            Outcome::TimedOut(_) => Outcome::TimedOut(timeout.unwrap_or_default()),
            o => o,
        };
        match result {
            Ok(DisconnectReason::TargetExited(_)) | Ok(DisconnectReason::TargetTerminated(_)) => {
                if let Some(o) = d.ended.take() {
                    d.remove_breakpoints();
                    return Ok(timed_out(o));
                }
            }
            Ok(DisconnectReason::Kill) => {
                d.remove_breakpoints();
                return Ok(Outcome::Killed);
            }
            Ok(DisconnectReason::Disconnect) => {}
            Err(e) => {
                if let Some(o) = d.vm.stopped() {
                    return Ok(o);
                }
                let what = if e.is_target_error() {
                    match e.into_target_error() {
                        Some(Error::Config(m)) => m,
                        Some(e) => return Err(e),
                        None => "gdb session failed".into(),
                    }
                } else {
                    format!("gdb session failed: {e}")
                };
                crate::eprint_line(&format!(
                    "pvrun: {}; the guest goes on without the debugger",
                    crate::output::escape_controls(&what)
                ));
            }
        }
        // Detached (or the connection failed): the guest runs on as without gdb.
        drop(session);
        d.vm.control.take_debug_break();
        d.remove_breakpoints();
        d.step = false;
        if let Some(o) = d.fatal.take().or(d.ended.take()) {
            return Ok(o);
        }
        d.store()?;
        if let Some(b) = d.budget {
            d.vm.ensure_watchdog()?;
            d.vm.control.arm(Some(Instant::now() + b));
        }
        let r = (|| {
            if let Some(w) = d.pending_wait.take()
                && let Some(Event::Outcome(o)) = d.vm.resume_wait(w)?
            {
                return Ok(o);
            }
            loop {
                match d.vm.run_events(false)? {
                    Event::Outcome(o) => return Ok(o),
                    // A kick the poller sent as the session ended.
                    _ => continue,
                }
            }
        })();
        if d.budget.is_some() {
            d.vm.control.arm(None);
        }
        r.map(timed_out)
    }
}
