//! Seccomp filters, one per kind of host thread, in Firecracker's style: each thread may
//! make only the system calls its job needs, with argument filters where an allowed call
//! could still do harm (`ioctl` only with the KVM requests the thread uses, `mmap` and
//! `mprotect` never executable, `tgkill` only within this process, `clone` only the
//! teardown child). Any other call kills the process, so a bug that let a guest steer a
//! host thread still could not open files, start programs or make connections.
//!
//! A few calls that a Rust panic or backtrace report makes (`openat`, `getcwd`, `readlink`,
//! `statx`...) fail with `EPERM` instead of killing: a report must never become a kill.
//!
//! Confining fails closed: a thread whose filter cannot be installed stops the process
//! with an error ([`confine_or_exit`]); it never runs unconfined. Installing a filter
//! also sets `no_new_privs`.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

use crate::error::Error;

/// The kinds of host thread, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ThreadKind {
    /// Runs a vCPU: hypercalls, console, exception decoding, resets between calls.
    Vcpu,
    /// Serves one device's rings.
    Io,
    /// Stops a run at its deadline.
    Watchdog,
    /// Serves HTTP: `pvrun serve`'s main thread once it serves, and its tokio workers.
    /// Sockets that already exist only (accept, read, write, epoll); no KVM, no files.
    #[cfg_attr(not(feature = "cli"), allow(dead_code))]
    Gateway,
    /// Creates VMs ahead of time for new sandboxes (`Template::keep_shells_ready`): the
    /// KVM requests that create a VM, its memory slot and vCPU, and set its CPUID.
    Shells,
    /// Grows and shrinks an elastic sandbox pool (`SandboxPool::elastic`'s `pvrun-grow`
    /// thread): what `Shells` may, plus loading a snapshot's vCPU state into the new VM
    /// (the `KVM_SET_*` requests, never `KVM_RUN`) and its wake-up eventfd; dropping VMs
    /// needs nothing more.
    Grower,
    /// Writes queued output to a descriptor it already holds: the sandboxes' console
    /// writer and the gateway's log writer.
    Writer,
}

/// Every kind (for tests and filter caches).
#[cfg(test)]
const ALL_KINDS: [ThreadKind; 7] = [
    ThreadKind::Vcpu,
    ThreadKind::Io,
    ThreadKind::Watchdog,
    ThreadKind::Gateway,
    ThreadKind::Shells,
    ThreadKind::Grower,
    ThreadKind::Writer,
];

/// Calls every kind may make: memory, waiting, time, signals, its own exit.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_futex,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    // A wait with a timeout (futex, nanosleep, poll) that a signal (the stop kick)
    // interrupts resumes through restart_syscall; the call it restarts passed this filter.
    libc::SYS_restart_syscall,
    libc::SYS_sigaltstack,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Extra calls of a device thread: its image and TAP file.
const IO_EXTRA: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
];

/// Extra calls of a vCPU thread: the deferred-teardown child (`close_range`, waiting for
/// the parent) and `fcntl(F_GETFD)` below.
const VCPU_EXTRA: &[i64] = &[libc::SYS_close_range, libc::SYS_getppid];

/// Extra calls of a pool's grower thread: the wake-up eventfd of each VM it makes.
const GROWER_EXTRA: &[i64] = &[libc::SYS_eventfd2];

/// Extra calls of a gateway thread: sockets it already has, and epoll. It creates no
/// socket (the listener exists before it is confined) and starts no thread.
const GATEWAY_EXTRA: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_epoll_ctl,
    libc::SYS_accept4,
    libc::SYS_accept,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
];

/// Calls a panic report or backtrace makes, answered with `EPERM` instead of a kill.
const REPORT_ONLY: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_open,
    libc::SYS_getcwd,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_lseek,
];

const KVMIO: u64 = 0xAE;

/// `_IOC(dir, KVMIO, nr, size)` as Linux computes an ioctl request number.
const fn kvm_ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
const fn io(nr: u64) -> u64 {
    kvm_ioc(0, nr, 0)
}
const fn iow<T>(nr: u64) -> u64 {
    kvm_ioc(1, nr, size_of::<T>())
}
const fn ior<T>(nr: u64) -> u64 {
    kvm_ioc(2, nr, size_of::<T>())
}
const fn iowr<T>(nr: u64) -> u64 {
    kvm_ioc(3, nr, size_of::<T>())
}

/// The KVM requests a vCPU thread makes while running and resetting a VM.
fn vcpu_ioctls() -> Vec<u64> {
    use kvm_bindings::*;
    vec![
        io(0x80),                     // KVM_RUN
        ior::<kvm_regs>(0x81),        // KVM_GET_REGS
        iow::<kvm_regs>(0x82),        // KVM_SET_REGS
        ior::<kvm_sregs>(0x83),       // KVM_GET_SREGS
        iow::<kvm_sregs>(0x84),       // KVM_SET_SREGS
        iowr::<kvm_msrs>(0x88),       // KVM_GET_MSRS
        iow::<kvm_msrs>(0x89),        // KVM_SET_MSRS
        ior::<kvm_fpu>(0x8c),         // KVM_GET_FPU
        iow::<kvm_fpu>(0x8d),         // KVM_SET_FPU
        ior::<kvm_vcpu_events>(0x9f), // KVM_GET_VCPU_EVENTS
        iow::<kvm_vcpu_events>(0xa0), // KVM_SET_VCPU_EVENTS
        io(0xa3),                     // KVM_GET_TSC_KHZ
        ior::<kvm_xsave>(0xa4),       // KVM_GET_XSAVE
        iow::<kvm_xsave>(0xa5),       // KVM_SET_XSAVE
        iow::<kvm_dirty_log>(0x42),   // KVM_GET_DIRTY_LOG (on the VM fd)
        // KVM_SET_USER_MEMORY_REGION (on the VM fd): a trimmed sandbox's next call
        // registers its memory slot again (`Sandbox::trim`).
        iow::<kvm_userspace_memory_region>(0x46),
    ]
}

/// The KVM requests that create a VM shell (`VmShell::new`): nothing that runs a vCPU.
fn shell_ioctls() -> Vec<u64> {
    use kvm_bindings::*;
    vec![
        io(0x01),                                 // KVM_CREATE_VM
        io(0x03),                                 // KVM_CHECK_EXTENSION
        io(0x04),                                 // KVM_GET_VCPU_MMAP_SIZE
        io(0x41),                                 // KVM_CREATE_VCPU
        iow::<kvm_userspace_memory_region>(0x46), // KVM_SET_USER_MEMORY_REGION
        iow::<kvm_cpuid2>(0x90),                  // KVM_SET_CPUID2
    ]
}

/// The KVM requests that make a sandbox from a snapshot in a new VM (`VmShell::new`,
/// then loading the snapshot's vCPU state): a shell's, and setting (never running) a vCPU.
fn grower_ioctls() -> Vec<u64> {
    use kvm_bindings::*;
    let mut v = shell_ioctls();
    v.extend(
        vcpu_ioctls()
            .into_iter()
            .filter(|&nr| nr != io(0x80) && nr != iow::<kvm_dirty_log>(0x42)),
    );
    v.push(iow::<kvm_xcrs>(0xa7)); // KVM_SET_XCRS
    v
}

fn cond(
    arg: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    v: u64,
) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, len, op, v).map_err(|e| e.to_string())
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, String> {
    SeccompRule::new(conds).map_err(|e| e.to_string())
}

/// A thread's filters: the main one (allow-list, kill otherwise) and the report one
/// (`EPERM` for [`REPORT_ONLY`], which the main one allows). The kernel runs both and the
/// strictest verdict wins.
#[derive(Clone)]
struct Filters {
    main: BpfProgram,
    report: BpfProgram,
}

/// The filters of `kind` for process `pid` (tgkill may target only it).
fn build(kind: ThreadKind, pid: u32) -> Result<Filters, String> {
    use SeccompCmpArgLen::{Dword, Qword};
    let mut allow: BTreeMap<i64, Vec<SeccompRule>> = COMMON
        .iter()
        .chain(REPORT_ONLY)
        .map(|&nr| (nr, vec![]))
        .collect();
    let extra: &[i64] = match kind {
        ThreadKind::Vcpu => VCPU_EXTRA,
        ThreadKind::Io => IO_EXTRA,
        ThreadKind::Gateway => GATEWAY_EXTRA,
        // The grower makes whole sandboxes: each VM's wake-up eventfd too.
        ThreadKind::Grower => GROWER_EXTRA,
        ThreadKind::Watchdog | ThreadKind::Shells | ThreadKind::Writer => &[],
    };
    allow.extend(extra.iter().map(|&nr| (nr, vec![])));
    // Memory may be mapped, never executable.
    let no_exec = || {
        rule(vec![cond(
            2,
            Dword,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )?])
    };
    allow.insert(libc::SYS_mmap, vec![no_exec()?]);
    allow.insert(libc::SYS_mprotect, vec![no_exec()?]);
    // Signals only to threads of this process (the stop kick).
    allow.insert(
        libc::SYS_tgkill,
        vec![rule(vec![cond(0, Dword, SeccompCmpOp::Eq, pid as u64)?])?],
    );
    // Debug builds of std check a descriptor with fcntl(F_GETFD) before closing it.
    allow.insert(
        libc::SYS_fcntl,
        vec![rule(vec![cond(
            1,
            Dword,
            SeccompCmpOp::Eq,
            libc::F_GETFD as u64,
        )?])?],
    );
    let ioctls = match kind {
        ThreadKind::Vcpu => vcpu_ioctls(),
        ThreadKind::Shells => shell_ioctls(),
        ThreadKind::Grower => grower_ioctls(),
        _ => vec![],
    };
    if !ioctls.is_empty() {
        let ioctls = ioctls
            .into_iter()
            .map(|nr| rule(vec![cond(1, Dword, SeccompCmpOp::Eq, nr)?]))
            .collect::<Result<Vec<_>, _>>()?;
        allow.insert(libc::SYS_ioctl, ioctls);
    }
    if kind == ThreadKind::Vcpu {
        // The deferred-teardown child shares our memory and nothing else.
        allow.insert(
            libc::SYS_clone,
            vec![rule(vec![cond(
                0,
                Qword,
                SeccompCmpOp::Eq,
                libc::CLONE_VM as u64,
            )?])?],
        );
    }
    let arch: seccompiler::TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())?;
    let compile = |f: SeccompFilter| -> Result<BpfProgram, String> {
        f.try_into()
            .map_err(|e: seccompiler::BackendError| e.to_string())
    };
    let main = compile(
        SeccompFilter::new(
            allow,
            SeccompAction::KillProcess,
            SeccompAction::Allow,
            arch,
        )
        .map_err(|e| e.to_string())?,
    )?;
    let report = compile(
        SeccompFilter::new(
            REPORT_ONLY.iter().map(|&nr| (nr, vec![])).collect(),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
            arch,
        )
        .map_err(|e| e.to_string())?,
    )?;
    Ok(Filters { main, report })
}

fn apply(f: &Filters) -> Result<(), String> {
    // Set first: a thread that has even part of a filter may no longer start threads.
    CONFINED.with(|c| c.set(true));
    seccompiler::apply_filter(&f.report).map_err(|e| e.to_string())?;
    seccompiler::apply_filter(&f.main).map_err(|e| e.to_string())
}

thread_local! {
    /// This thread runs under a filter (of any kind): it cannot start threads.
    static CONFINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread has confined itself (so it must not try to start a thread:
/// its filter would kill the process).
pub(crate) fn thread_confined() -> bool {
    CONFINED.with(|c| c.get())
}

fn cached(kind: ThreadKind) -> Result<&'static Filters, String> {
    static VCPU: OnceLock<Result<Filters, String>> = OnceLock::new();
    static IO: OnceLock<Result<Filters, String>> = OnceLock::new();
    static WATCHDOG: OnceLock<Result<Filters, String>> = OnceLock::new();
    static GATEWAY: OnceLock<Result<Filters, String>> = OnceLock::new();
    static SHELLS: OnceLock<Result<Filters, String>> = OnceLock::new();
    static GROWER: OnceLock<Result<Filters, String>> = OnceLock::new();
    static WRITER: OnceLock<Result<Filters, String>> = OnceLock::new();
    let cell = match kind {
        ThreadKind::Vcpu => &VCPU,
        ThreadKind::Io => &IO,
        ThreadKind::Watchdog => &WATCHDOG,
        ThreadKind::Gateway => &GATEWAY,
        ThreadKind::Shells => &SHELLS,
        ThreadKind::Grower => &GROWER,
        ThreadKind::Writer => &WRITER,
    };
    cell.get_or_init(|| build(kind, std::process::id()))
        .as_ref()
        .map_err(Clone::clone)
}

/// Confines the calling thread as a `kind` thread.
pub(crate) fn confine(kind: ThreadKind) -> Result<(), Error> {
    let prog = cached(kind)
        .map_err(|e| Error::Config(format!("cannot build the {kind:?} seccomp filter: {e}")))?;
    apply(prog).map_err(|e| {
        Error::Config(format!(
            "cannot install the {kind:?} thread's seccomp filter: {e}"
        ))
    })
}

/// Confines the calling thread, or ends the process with status 125 and one line on
/// stderr if that fails: a host thread never runs unconfined.
pub(crate) fn confine_or_exit(kind: ThreadKind) {
    if let Err(e) = confine(kind) {
        crate::output::eprint_line(&format!("pvrun: error: {e}"));
        // SAFETY: _exit ends the process at once.
        unsafe { libc::_exit(125) }
    }
}

/// Confines the calling thread as a device I/O thread (fails closed).
pub(crate) fn confine_io_thread() -> bool {
    confine_or_exit(ThreadKind::Io);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forks; the child installs `kind`'s filters (built before the fork: the child makes
    /// only raw system calls), runs `body` and exits 0. Returns the raw wait status.
    fn in_child(kind: ThreadKind, body: impl Fn()) -> i32 {
        // The child's pid is unknown here; only tgkill depends on it, and the test of
        // tgkill expects a kill anyway.
        let filters = build(kind, 0).expect("the filters compile");
        // SAFETY: the child only applies the prebuilt filters and makes system calls.
        unsafe {
            let pid = libc::fork();
            if pid == 0 {
                if apply(&filters).is_err() {
                    libc::_exit(3);
                }
                body();
                libc::_exit(0);
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            status
        }
    }

    fn exited_ok(s: i32) -> bool {
        libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0
    }

    fn killed(s: i32) -> bool {
        libc::WIFSIGNALED(s) && libc::WTERMSIG(s) == libc::SIGSYS
    }

    #[test]
    fn every_filter_compiles() {
        for kind in ALL_KINDS {
            build(kind, 1).unwrap();
        }
    }

    #[test]
    fn each_thread_kind_is_killed_by_what_it_may_not_do() {
        // SAFETY (all bodies): raw system calls only.
        let write0 = || unsafe {
            libc::syscall(libc::SYS_write, 1, c"".as_ptr(), 0);
        };
        for kind in ALL_KINDS {
            assert!(exited_ok(in_child(kind, write0)), "{kind:?}: allowed call");
            // A wait interrupted by the stop kick resumes through restart_syscall.
            let restart = || unsafe {
                libc::syscall(libc::SYS_restart_syscall);
            };
            assert!(
                exited_ok(in_child(kind, restart)),
                "{kind:?}: restart_syscall"
            );
            // Starting a program, a socket: never.
            let execve = || unsafe {
                libc::syscall(libc::SYS_execve, c"/bin/true".as_ptr(), 0, 0);
            };
            assert!(killed(in_child(kind, execve)), "{kind:?}: execve");
            let socket = || unsafe {
                libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0);
            };
            assert!(killed(in_child(kind, socket)), "{kind:?}: socket");
            // Executable memory: never.
            let mmap_exec = || unsafe {
                libc::syscall(
                    libc::SYS_mmap,
                    0,
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
            };
            assert!(
                killed(in_child(kind, mmap_exec)),
                "{kind:?}: PROT_EXEC mmap"
            );
            let mmap_rw = || unsafe {
                libc::syscall(
                    libc::SYS_mmap,
                    0,
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
            };
            assert!(exited_ok(in_child(kind, mmap_rw)), "{kind:?}: RW mmap");
            // A report's file lookups fail softly instead of killing.
            let open = || unsafe {
                let fd = libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    c"/etc/hostname".as_ptr(),
                    0,
                );
                if fd != -1 {
                    libc::_exit(4);
                }
            };
            assert!(
                exited_ok(in_child(kind, open)),
                "{kind:?}: openat must fail with EPERM"
            );
        }
        // Only a vCPU thread may use KVM, and only with the requests it needs.
        let kvm_run = || unsafe {
            libc::syscall(libc::SYS_ioctl, -1, io(0x80));
        };
        assert!(exited_ok(in_child(ThreadKind::Vcpu, kvm_run)));
        assert!(killed(in_child(ThreadKind::Io, kvm_run)));
        let create_vm = || unsafe {
            libc::syscall(libc::SYS_ioctl, -1, io(0x01));
        };
        assert!(
            killed(in_child(ThreadKind::Vcpu, create_vm)),
            "KVM_CREATE_VM"
        );
        // A device thread may read its image; a watchdog may not.
        let pread = || unsafe {
            libc::syscall(libc::SYS_pread64, -1, 0, 0, 0);
        };
        assert!(exited_ok(in_child(ThreadKind::Io, pread)));
        assert!(killed(in_child(ThreadKind::Watchdog, pread)));
        // tgkill to another process: never (pid 0 here is not ours).
        let tgkill = || unsafe {
            libc::syscall(libc::SYS_tgkill, 1, 1, 0);
        };
        assert!(killed(in_child(ThreadKind::Watchdog, tgkill)));
        // Only the vCPU and shell threads use KVM at all; the shell thread may create a
        // VM but never run one, the vCPU thread the reverse.
        for kind in [
            ThreadKind::Gateway,
            ThreadKind::Writer,
            ThreadKind::Watchdog,
        ] {
            assert!(killed(in_child(kind, create_vm)), "{kind:?}: KVM_CREATE_VM");
            assert!(killed(in_child(kind, kvm_run)), "{kind:?}: KVM_RUN");
        }
        assert!(exited_ok(in_child(ThreadKind::Shells, create_vm)));
        assert!(
            killed(in_child(ThreadKind::Shells, kvm_run)),
            "shells: KVM_RUN"
        );
        // The grower creates VMs and loads vCPU state, and never runs a vCPU either.
        assert!(exited_ok(in_child(ThreadKind::Grower, create_vm)));
        let set_xcrs = || unsafe {
            libc::syscall(libc::SYS_ioctl, -1, iow::<kvm_bindings::kvm_xcrs>(0xa7));
        };
        assert!(exited_ok(in_child(ThreadKind::Grower, set_xcrs)));
        let eventfd = || unsafe {
            libc::syscall(libc::SYS_eventfd2, 0, libc::EFD_CLOEXEC);
        };
        assert!(exited_ok(in_child(ThreadKind::Grower, eventfd)));
        assert!(killed(in_child(ThreadKind::Watchdog, eventfd)));
        assert!(
            killed(in_child(ThreadKind::Grower, kvm_run)),
            "grower: KVM_RUN"
        );
        assert!(killed(in_child(ThreadKind::Shells, set_xcrs)));
        // Sockets: the gateway serves the ones it has; no other kind touches one.
        let accept = || unsafe {
            libc::syscall(libc::SYS_accept4, -1, 0, 0, 0);
        };
        let send = || unsafe {
            libc::syscall(libc::SYS_sendto, -1, 0, 0, 0, 0, 0);
        };
        let epoll = || unsafe {
            libc::syscall(libc::SYS_epoll_pwait, -1, 0, 0, 0, 0, 0);
        };
        for body in [&accept as &dyn Fn(), &send, &epoll] {
            assert!(exited_ok(in_child(ThreadKind::Gateway, body)));
            for kind in [
                ThreadKind::Vcpu,
                ThreadKind::Writer,
                ThreadKind::Shells,
                ThreadKind::Grower,
            ] {
                assert!(killed(in_child(kind, body)), "{kind:?}: a socket call");
            }
        }
        // No kind but the vCPU thread starts anything (the teardown child).
        let clone_thread = || unsafe {
            libc::syscall(
                libc::SYS_clone,
                libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND,
                0,
                0,
                0,
                0,
            );
        };
        for kind in ALL_KINDS {
            assert!(
                killed(in_child(kind, clone_thread)),
                "{kind:?}: thread clone"
            );
        }
    }
}
