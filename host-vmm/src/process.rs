//! Ending a one-shot runner process fast: exit without waiting for KVM to destroy the VM.

use std::io::Write;

use crate::runtime::Vm;

impl Vm {
    /// Ends the process with `status` without waiting for KVM to destroy the VM (~0.5 ms
    /// on PVM hosts): a child sharing our memory keeps a copy of the VM's file descriptors,
    /// waits until this process is gone and only then lets them close. For one-shot
    /// command-line runners; falls back to a plain exit if the child cannot be made.
    pub fn exit_process(self, status: i32) -> ! {
        use std::os::fd::AsRawFd;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        deferred_teardown([self.vcpu.as_raw_fd(), self.vm.as_raw_fd()]);
        // SAFETY: _exit ends the process; nothing else runs afterwards.
        unsafe { libc::_exit(status) }
    }
}

/// What the teardown child needs: the parent's pid and the two descriptors to keep.
#[repr(C)]
struct TeardownArgs {
    parent: libc::pid_t,
    keep: [libc::c_int; 2],
}

/// The child of [`Vm::exit_process`]: it holds a copy of the parent's descriptors, closes
/// all but the VM's and the vCPU's (so pipes see EOF and disk images are unlocked at
/// once), waits for the parent to exit, and then exits itself, which destroys the VM.
extern "C" fn teardown_child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: the parent passed a pointer to a TeardownArgs that it never frees (it exits).
    let args = unsafe { &*(arg as *const TeardownArgs) };
    let mut keep = args.keep;
    keep.sort_unstable();
    // SAFETY: only raw system calls; the child touches no Rust state of the parent.
    unsafe {
        let mut first = 0;
        for k in keep {
            if k > first {
                libc::syscall(
                    libc::SYS_close_range,
                    first as libc::c_uint,
                    (k - 1) as libc::c_uint,
                    0,
                );
            }
            first = k + 1;
        }
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            0,
        );
        while libc::getppid() == args.parent {
            libc::usleep(100);
        }
    }
    0
}

fn deferred_teardown(keep: [libc::c_int; 2]) {
    // Leaked on purpose: the parent exits right after, the child reads it.
    let args = Box::leak(Box::new(TeardownArgs {
        // SAFETY: getpid has no preconditions.
        parent: unsafe { libc::getpid() },
        keep,
    }));
    const STACK: usize = 64 * 1024;
    // SAFETY: a fresh private stack for the child; checked below. CLONE_VM shares memory
    // (no copy of the guest's pages); the descriptor table is copied, not shared.
    unsafe {
        let stack = libc::mmap(
            std::ptr::null_mut(),
            STACK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if stack == libc::MAP_FAILED {
            return;
        }
        let top = (stack as *mut u8).add(STACK).cast::<libc::c_void>();
        libc::clone(
            teardown_child,
            top,
            libc::CLONE_VM,
            (args as *mut TeardownArgs).cast(),
        );
    }
}
