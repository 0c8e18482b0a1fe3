//! Snapshots of function guests, and everything that resets a VM between calls.
//!
//! [`Vm::snapshot`] freezes a guest paused at `FN_READY`: its memory (into a memfd), vCPU
//! registers and vector state, console position and clocks. [`Vm::restore`] puts exactly
//! that back: the pages KVM's dirty log says the guest wrote, the ranges the host itself
//! wrote (call input, host-call output; they are not in the dirty log), the console
//! header, every register and the XSAVE area, and it forgets any pending stop.
//! [`Vm::from_snapshot`] makes a new VM over a copy-on-write view of the snapshot.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::{Exports, FnContext, HostFn};
use crate::arch::VcpuState;
use crate::builder::boot_info;
use crate::devices::Devices;
use crate::error::Error;
use crate::hypercall::Console;
use crate::layout::{CONSOLE_RING_ADDR, PAGE_SIZE};
use crate::loader::GuestImage;
use crate::memory::{GuestRam, MemoryMap, MemorySnapshot};
use crate::runtime::Vm;
use crate::runtime::control::RunControl;
use crate::runtime::notify::Notify;
use crate::vstate::kvm::{cpu_policy, kvm};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm as kvm_vm;

/// A function guest frozen at its `FN_READY` exit: what a sandbox is reset to between
/// calls, and what new sandboxes start from. See [`Vm::snapshot`].
pub struct Snapshot {
    pub(super) memory: MemorySnapshot,
    pub(super) image: Arc<GuestImage>,
    pub(super) map: MemoryMap,
    pub(super) vcpu: VcpuState,
    pub(super) console_consumed: u64,
    /// What the guest exports.
    pub exports: Exports,
    pub(super) guest_tsc: u64,
    pub(super) tsc_hz: u64,
    pub(super) tsc_at_boot: u64,
    pub(super) taken: Instant,
    pub(super) host_functions: Arc<HashMap<String, HostFn>>,
    pub(super) max_output: u64,
    /// SHA-256 of the guest ELF, when the snapshot came from a file (an ELF-booted
    /// snapshot hashes its image's bytes when it is written out).
    pub(super) elf_sha256: Option<[u8; 32]>,
}

impl Snapshot {
    /// Bytes of guest memory the snapshot holds (the guest's memory size).
    pub fn mem_size(&self) -> u64 {
        self.memory.size()
    }
}

/// A KVM VM and vCPU created ahead of time over empty memory of a given size (with dirty
/// logging), to be turned into a sandbox from a snapshot later without waiting for KVM
/// to create them (~0.4 ms on PVM hosts).
pub struct VmShell {
    // Drop order: vCPU, VM, memory.
    pub(super) vcpu: Vcpu,
    pub(super) vm: kvm_ioctls::VmFd,
    pub(super) ram: GuestRam,
}

impl VmShell {
    /// Creates a VM, a vCPU with its CPUID table, and `mem_size` bytes of memory.
    pub fn new(mem_size: u64) -> Result<VmShell, Error> {
        let kvm = kvm()?;
        let policy = cpu_policy(kvm)?;
        let ram = GuestRam::new(mem_size)?;
        let (vm, fd) = kvm_vm::create(kvm, &ram, true)?;
        let vcpu = Vcpu::new(fd, policy);
        policy.setup.set_cpuid(vcpu.fd())?;
        Ok(VmShell { vcpu, vm, ram })
    }
}

impl Vm {
    /// Freezes a function guest paused at its `FN_READY` exit ([`crate::Outcome::Ready`]):
    /// its memory, vCPU state and console position. The VM can then be reset to it
    /// ([`Vm::restore`]) and new VMs made from it ([`Vm::from_snapshot`]). Needs
    /// [`crate::VmConfig::dirty_log`].
    pub fn snapshot(&mut self, exports: Exports) -> Result<Snapshot, Error> {
        // Device threads write guest memory behind the dirty log's back, and their rings
        // and back ends cannot be copied into another VM: refuse rather than snapshot a
        // state that a reset would not really restore.
        if !self.devices.is_empty() {
            return Err(Error::Config(format!(
                "guest `{}` has devices attached; a VM with devices cannot be snapshotted",
                self.image.path
            )));
        }
        // Resuming means: after the `out` of FN_READY, with rax = 0. Let KVM finish that
        // `out` first (some KVMs, PVM among them, have already moved RIP past it at the
        // exit; others do it on the next entry), so RIP is past it on every host.
        self.vcpu.set_rax(0)?;
        self.vcpu.finish_pending_exit()?;
        let vcpu = VcpuState::capture(self.vcpu.fd())?;
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
        let guest_tsc = self.vcpu.tsc()?;
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
            elf_sha256: None,
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
        self.vcpu.finish_pending_exit()?;
        self.vcpu.load_regs(&snap.vcpu.regs, &snap.vcpu.sregs)?;
        // A call that ended at its own `out` leaves no event pending (one KVM request
        // less per reset); any other end (a fault, a stop) gets the snapshot's events.
        snap.vcpu
            .load_extended(self.vcpu.fd(), !self.fns.clean_exit)?;
        self.fns.clean_exit = false;
        self.clear_stop();
        // Memory is the snapshot's again: a new generation, so randomness is not replayed.
        boot_info::new_generation(&self.ram, &mut self.fns.entropy)?;
        // A wake-up left from the last call (a stop, a device) must not end the next
        // call's first WAIT.
        self.control.notify().clear();
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
        Self::from_snapshot_with(shell, &mut None, snap, stdout, stderr, timeout)
    }

    /// Like [`Vm::from_snapshot_in`], with the stop state and watchdog of `spare` when one
    /// is given (then nothing here creates a descriptor or starts a thread: a pool's
    /// confined grower thread makes sandboxes this way). `spare` is taken only when the VM
    /// is made.
    pub(crate) fn from_snapshot_with(
        shell: Option<VmShell>,
        spare: &mut Option<crate::runtime::control::SpareControl>,
        snap: &Arc<Snapshot>,
        stdout: Box<dyn Write + Send>,
        stderr: Box<dyn Write + Send>,
        timeout: Option<Duration>,
    ) -> Result<Vm, Error> {
        let kvm = kvm()?;
        let policy = cpu_policy(kvm)?;
        let (ram, vm, mut vcpu) = match shell {
            Some(shell) if shell.ram.size() == snap.mem_size() => {
                shell.ram.map_snapshot(&snap.memory)?;
                policy.setup.load_state(shell.vcpu.fd(), &snap.vcpu)?;
                (shell.ram, shell.vm, shell.vcpu)
            }
            _ => {
                let ram = GuestRam::from_snapshot(&snap.memory)?;
                let (vm, fd) = kvm_vm::create(kvm, &ram, true)?;
                let vcpu = Vcpu::new(fd, policy);
                policy.setup.restore_vcpu(vcpu.fd(), &snap.vcpu)?;
                (ram, vm, vcpu)
            }
        };
        vcpu.prime_sync_regs(&snap.vcpu.regs, &snap.vcpu.sregs);
        // Guest time goes on: the TSC continues from the snapshot plus the time since.
        let elapsed = snap.taken.elapsed();
        let ticks = (elapsed.as_nanos() * snap.tsc_hz as u128 / 1_000_000_000) as u64;
        let tsc = snap.guest_tsc.wrapping_add(ticks);
        vcpu.set_tsc(tsc)?;
        let now_ns = (tsc.wrapping_sub(snap.tsc_at_boot) as u128 * 1_000_000_000
            / snap.tsc_hz.max(1) as u128) as u64;
        let boot_instant = Instant::now()
            .checked_sub(Duration::from_nanos(now_ns))
            .unwrap_or_else(Instant::now);
        // A copy of the snapshot: its own generation (and its own seed stream), so it
        // shares no randomness.
        let mut entropy = boot_info::Entropy::default();
        boot_info::new_generation(&ram, &mut entropy)?;
        let mut console = Console::new(stdout, stderr);
        console.set_consumed(snap.console_consumed);
        let (control, watchdog) = match spare.take() {
            Some(s) => {
                s.control.reset_for_reuse();
                (s.control, Some(s.watchdog))
            }
            None => (RunControl::new(Arc::new(Notify::new()?)), None),
        };
        Ok(Vm {
            devices: Devices::default(),
            vcpu,
            vm,
            ram,
            map: snap.map.clone(),
            image: snap.image.clone(),
            console,
            control,
            timeout,
            watchdog,
            boot_instant,
            tsc_hz: snap.tsc_hz,
            tsc_at_boot: snap.tsc_at_boot,
            exits: 0,
            counts: Default::default(),
            fns: FnContext {
                host_fns: snap.host_functions.clone(),
                max_output: snap.max_output,
                host_writes: Vec::new(),
                entropy,
                clean_exit: false,
            },
            crash: None,
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
        self.vcpu.set_rax(0)
    }
}
