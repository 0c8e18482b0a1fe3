//! How a guest run ended ([`Outcome`]), and the process exit status of each ending.

use std::time::Duration;

use crate::function::Exports;
use crate::loader::GuestImage;
use crate::runtime::backtrace::{Crash, escape_controls};
use crate::runtime::fault::Fault;

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
    /// The guest was killed through a [`KillHandle`](crate::KillHandle).
    Killed,
    /// The host process got this signal (SIGINT, SIGTERM) and stopped the guest.
    Interrupted(i32),
    /// A function guest finished initialising and waits for calls (it can be resumed
    /// with [`Vm::start_call`](crate::Vm::start_call)).
    Ready(Exports),
    /// A function guest finished a call (it can be resumed with [`Vm::start_call`](crate::Vm::start_call)).
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

    /// The one-line report for stderr, if the outcome is not a normal exit. Control
    /// characters in it (from a guest's message or symbol names) are escaped.
    pub fn report(&self) -> Option<String> {
        self.raw_report()
            .map(|r| crate::output::escape_controls(&r).into_owned())
    }

    fn raw_report(&self) -> Option<String> {
        match self {
            Outcome::Exited(_) => None,
            Outcome::Panicked(m) if m.starts_with("panicked") => {
                Some(format!("pvrun: guest {}", escape_controls(m, true)))
            }
            Outcome::Panicked(m) => Some(format!(
                "pvrun: guest aborted: {}",
                escape_controls(m, true)
            )),
            Outcome::Fault(f) => Some(format!("pvrun: guest crashed: {f}")),
            Outcome::TimedOut(t) => Some(format!(
                "pvrun: guest timed out after {:.3} s and was stopped",
                t.as_secs_f64()
            )),
            Outcome::Killed => Some("pvrun: guest was killed".into()),
            Outcome::Interrupted(libc::SIGQUIT) => Some(format!(
                "pvrun: quit by signal {} (SIGQUIT); guest stopped",
                libc::SIGQUIT
            )),
            Outcome::Interrupted(sig) => {
                Some(format!("pvrun: interrupted by signal {sig}; guest stopped"))
            }
            Outcome::Ready(_) | Outcome::Returned { .. } => Some(
                "pvrun: error: this guest is a function sandbox (it waits for calls); serve it with `pvrun serve --listen ADDR GUEST` (`cargo pvrun serve`), or call one function with `pvrun call GUEST NAME` (`cargo pvrun call`)"
                    .into(),
            ),
        }
    }

    /// [`Outcome::report`] followed by the guest's call stack, one indented frame a line
    /// (`   0: function at file:line:col`), when the run ended in a crash (always), a
    /// quit on SIGQUIT (always) or a panic (with `panic_backtrace`) and `crash` holds the guest's state at that point
    /// ([`crate::Vm::crash`]). The DWARF of `image` is parsed here, not before.
    pub fn report_with_backtrace(
        &self,
        crash: Option<&Crash>,
        image: &GuestImage,
        panic_backtrace: bool,
    ) -> Option<String> {
        let mut report = self.report()?;
        let wanted = match self {
            Outcome::Fault(f) => f.vector.is_some(),
            Outcome::Panicked(_) => panic_backtrace,
            // A quit on request shows where the guest was (like a thread dump).
            Outcome::Interrupted(libc::SIGQUIT) => true,
            _ => false,
        };
        if let (true, Some(crash)) = (wanted, crash) {
            report.push('\n');
            report.push_str(crash.backtrace.render(image).trim_end());
        }
        Some(report)
    }
}
