//! Per-VM counters: VM exits by kind, hypercalls by name, console bytes, and the devices'
//! ring counters ([`Vm::stats`]; `pvrun --stats` prints them at exit).

use pvrun_abi::call;

use super::Vm;
use crate::devices::DeviceCounters;

/// Hypercall numbers counted one by one (the rest are counted as unknown).
const NAMED: [(u16, &str); 10] = [
    (call::CONSOLE_WRITE, "console_write"),
    (call::EXIT, "exit"),
    (call::ABORT, "abort"),
    (call::WAIT, "wait"),
    (call::CONSOLE_FLUSH, "console_flush"),
    (call::FN_READY, "fn_ready"),
    (call::FN_RETURN, "fn_return"),
    (call::HOST_CALL, "host_call"),
    (call::FN_MAILBOX, "fn_mailbox"),
    (call::FN_NOTIFY, "fn_notify"),
];

/// What the run loop counts as it goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub hypercall_exits: u64,
    pub doorbell_exits: u64,
    pub exception_exits: u64,
    pub interrupted_exits: u64,
    pub other_exits: u64,
    pub hypercalls: [u64; NAMED.len()],
    pub unknown_hypercalls: u64,
}

impl Counts {
    pub fn hypercall(&mut self, nr: u16) {
        match NAMED.iter().position(|&(n, _)| n == nr) {
            Some(i) => self.hypercalls[i] += 1,
            None => self.unknown_hypercalls += 1,
        }
    }
}

/// Counters of one VM since it was created.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmStats {
    /// VM exits to host user space.
    pub exits: u64,
    /// Of which hypercalls.
    pub hypercall_exits: u64,
    /// Of which doorbells served by the vCPU thread (not by an ioeventfd).
    pub doorbell_exits: u64,
    /// Of which CPU exceptions reported by the ring-0 stub.
    pub exception_exits: u64,
    /// Of which interruptions (signals, kicks, timeouts).
    pub interrupted_exits: u64,
    /// Of which anything else (port reads, MMIO, shutdown, halt).
    pub other_exits: u64,
    /// Hypercalls by name, in ABI order.
    pub hypercalls: Vec<(&'static str, u64)>,
    /// Hypercalls with a number the ABI does not define.
    pub unknown_hypercalls: u64,
    /// Bytes the guest wrote to its console (ring and `CONSOLE_WRITE`).
    pub console_bytes: u64,
    /// Ring counters of each device, by name.
    pub devices: Vec<(String, DeviceCounters)>,
}

impl VmStats {
    /// The counters as report lines (`pvrun: stats: ...`).
    pub fn lines(&self) -> Vec<String> {
        let calls: Vec<String> = self
            .hypercalls
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| format!("{name} {n}"))
            .chain(
                (self.unknown_hypercalls > 0)
                    .then(|| format!("unknown {}", self.unknown_hypercalls)),
            )
            .collect();
        let mut out = vec![
            format!(
                "pvrun: stats: exits {} (hypercall {}, doorbell {}, exception {}, interrupted {}, other {})",
                self.exits,
                self.hypercall_exits,
                self.doorbell_exits,
                self.exception_exits,
                self.interrupted_exits,
                self.other_exits
            ),
            format!(
                "pvrun: stats: hypercalls {} ({})",
                self.hypercall_exits,
                if calls.is_empty() {
                    "none".to_string()
                } else {
                    calls.join(", ")
                }
            ),
            format!("pvrun: stats: console {} bytes", self.console_bytes),
        ];
        for (name, d) in &self.devices {
            out.push(format!(
                "pvrun: stats: device {}: {} requests, {} doorbells, {} wakeups, {} dropped",
                crate::output::escape_controls(name),
                d.requests,
                d.doorbells,
                d.wakeups,
                d.dropped
            ));
        }
        out
    }
}

/// Names of the exit kinds of [`Vm::exit_kinds`], in order.
pub const EXIT_KINDS: [&str; 5] = ["hypercall", "doorbell", "exception", "interrupted", "other"];

impl Vm {
    /// VM exits so far by kind, in [`EXIT_KINDS`] order (cheap: no device counters).
    pub fn exit_kinds(&self) -> [u64; 5] {
        let c = &self.counts;
        [
            c.hypercall_exits,
            c.doorbell_exits,
            c.exception_exits,
            c.interrupted_exits,
            c.other_exits,
        ]
    }

    /// This VM's counters so far.
    pub fn stats(&self) -> VmStats {
        let c = &self.counts;
        VmStats {
            exits: self.exits,
            hypercall_exits: c.hypercall_exits,
            doorbell_exits: c.doorbell_exits,
            exception_exits: c.exception_exits,
            interrupted_exits: c.interrupted_exits,
            other_exits: c.other_exits,
            hypercalls: NAMED
                .iter()
                .zip(c.hypercalls)
                .map(|(&(_, name), n)| (name, n))
                .collect(),
            unknown_hypercalls: c.unknown_hypercalls,
            console_bytes: self.console.bytes(),
            devices: self.device_counters(),
        }
    }
}
