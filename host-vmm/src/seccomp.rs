//! Seccomp filters for the threads that handle guest-controlled data on their own: the
//! device I/O threads. Each is confined to the few system calls serving a ring needs
//! (reading and writing its file or TAP device and its doorbell, waiting, memory
//! management, closing its own descriptors and exiting); any other system call kills the
//! process, so a bug that let a guest steer such a thread could still not open files,
//! start programs or make network connections.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// System calls a device I/O thread may make.
const IO_THREAD_SYSCALLS: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_fdatasync,
    libc::SYS_close,
    libc::SYS_fsync,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_brk,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

fn io_thread_filter() -> Option<&'static BpfProgram> {
    static FILTER: OnceLock<Option<BpfProgram>> = OnceLock::new();
    FILTER
        .get_or_init(|| {
            let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
                IO_THREAD_SYSCALLS.iter().map(|&nr| (nr, vec![])).collect();
            // Debug builds of std check a descriptor with fcntl(F_GETFD) before closing it.
            let getfd = SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                libc::F_GETFD as u64,
            )
            .ok()?;
            rules.insert(libc::SYS_fcntl, vec![SeccompRule::new(vec![getfd]).ok()?]);
            let filter = SeccompFilter::new(
                rules,
                SeccompAction::KillProcess,
                SeccompAction::Allow,
                std::env::consts::ARCH.try_into().ok()?,
            )
            .ok()?;
            filter.try_into().ok()
        })
        .as_ref()
}

/// Confines the calling thread (a device I/O thread) to [`IO_THREAD_SYSCALLS`]. Returns
/// false if the kernel refused the filter (the thread then runs unconfined).
pub fn confine_io_thread() -> bool {
    match io_thread_filter() {
        Some(prog) => seccompiler::apply_filter(prog).is_ok(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_thread_is_killed_by_a_forbidden_system_call_and_allowed_ones_pass() {
        // Build the filter before forking: the child may only make raw system calls.
        assert!(io_thread_filter().is_some(), "the filter does not compile");
        let run = |forbidden: bool| -> i32 {
            // SAFETY: the child only applies the prebuilt filter and makes system calls.
            unsafe {
                let pid = libc::fork();
                if pid == 0 {
                    if !confine_io_thread() {
                        libc::_exit(3);
                    }
                    libc::syscall(libc::SYS_write, 1, c"".as_ptr(), 0);
                    if forbidden {
                        libc::syscall(libc::SYS_getppid);
                    }
                    libc::_exit(0);
                }
                let mut status = 0;
                libc::waitpid(pid, &mut status, 0);
                status
            }
        };
        let ok = run(false);
        assert!(
            libc::WIFEXITED(ok) && libc::WEXITSTATUS(ok) == 0,
            "status {ok:#x}"
        );
        let killed = run(true);
        assert!(
            libc::WIFSIGNALED(killed) && libc::WTERMSIG(killed) == libc::SIGSYS,
            "status {killed:#x}"
        );
    }
}
