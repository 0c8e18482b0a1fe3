//! The hypercall convention: the ports, the call numbers, the status codes, and the
//! argument structs of the `CONSOLE_WRITE`, `EXIT`, `ABORT` and `WAIT` calls (those of the
//! function-guest calls live with the other function-guest types).

/// Hypercall convention: `out dx, al` with `dx` = [`HYPERCALL_PORT_BASE`] + call number and
/// `rdi` = guest address of the call's argument struct (8-byte aligned, or 0 for calls
/// without arguments). The host answers in `rax` with a [`status`] value (0 or positive on
/// success, negative on error). No other register is changed.
pub const HYPERCALL_PORT_BASE: u16 = 0x500;
/// Number of hypercall ports open to the guest: `HYPERCALL_PORT_BASE .. + HYPERCALL_PORT_COUNT`.
/// An `out` to any other port raises #GP in the guest. A number inside this window that
/// names no call returns [`status::UNKNOWN_CALL`].
pub const HYPERCALL_PORT_COUNT: u16 = 0x40;
/// Port used only by the host's ring-0 exception stub; closed to ring 3.
pub const EXCEPTION_PORT: u16 = 0x5ff;

/// Hypercall numbers (port = [`HYPERCALL_PORT_BASE`] + number).
pub mod call {
    /// Write bytes to the console: args [`ConsoleWrite`](crate::ConsoleWrite). Returns the
    /// number of bytes written.
    pub const CONSOLE_WRITE: u16 = 1;
    /// Stop the guest with an exit code: args [`Exit`](crate::Exit). Does not return.
    pub const EXIT: u16 = 2;
    /// Stop the guest abnormally with a message (a panic): args [`Abort`](crate::Abort).
    /// Does not return; the run ends with exit status 101.
    pub const ABORT: u16 = 3;
    /// Sleep until a deadline or an event: args [`Wait`](crate::Wait). Returns 0.
    pub const WAIT: u16 = 4;
    /// First doorbell: `out` to call number `DOORBELL_BASE + i` tells the host that device
    /// `i` has new requests. No arguments; `rax` is left unchanged (the host may serve
    /// doorbells in the kernel, without returning to host user space).
    pub const DOORBELL_BASE: u16 = 0x20;
    /// Deliver everything in the console ring now (no arguments; `rdi` is ignored).
    /// Returns 0, or [`status::BAD_ARGUMENT`](crate::status::BAD_ARGUMENT) if the ring is
    /// corrupt (the host then stops the guest).
    pub const CONSOLE_FLUSH: u16 = 5;
    /// Function sandboxes: the guest finished initialising and is ready for calls: args
    /// [`FnReady`](crate::FnReady). Returns 0 when a call arrives (its [`FnCall`](crate::FnCall)
    /// header and input are then in the input buffer).
    pub const FN_READY: u16 = 6;
    /// Function sandboxes: the current call is done: args [`FnReturn`](crate::FnReturn).
    /// Returns 0 when the next call arrives (when the host does not reset the sandbox
    /// between calls; otherwise the guest resumes from its `FN_READY` instead).
    pub const FN_RETURN: u16 = 7;
    /// Call a function the host offers by name: args [`HostCall`](crate::HostCall).
    /// Returns the output length, or [`status::NOT_FOUND`](crate::status::NOT_FOUND),
    /// [`status::BAD_LENGTH`](crate::status::BAD_LENGTH) (output larger than the buffer),
    /// [`status::HOST_FN_FAILED`](crate::status::HOST_FN_FAILED).
    pub const HOST_CALL: u16 = 8;
    /// Function sandboxes (ABI v4): declare the exitless-call mailbox; `rdi` is the address
    /// of the guest's [`FnMailbox`](crate::FnMailbox) itself (64-byte aligned, 128 bytes,
    /// guest-writable, not overlapping the input buffer). Returns 0. Only the declaration
    /// in effect at `FN_READY` counts; a guest that never declares one gets exit-based
    /// calls only.
    pub const FN_MAILBOX: u16 = 9;
    /// Function sandboxes (ABI v4): wake the host, which sleeps waiting for an exitless
    /// call's result (`FnMailbox::host_sleeping` is 1). No arguments (`rdi` ignored).
    /// Returns 0.
    pub const FN_NOTIFY: u16 = 10;
}

/// Hypercall status values returned in `rax`.
pub mod status {
    /// Success.
    pub const OK: i64 = 0;
    /// The call number names no call.
    pub const UNKNOWN_CALL: i64 = -1;
    /// An address (the argument struct or a buffer it names) is outside the guest memory the
    /// guest may access for this purpose.
    pub const BAD_ADDRESS: i64 = -2;
    /// A length is too large or an address + length overflows.
    pub const BAD_LENGTH: i64 = -3;
    /// The argument struct is not 8-byte aligned.
    pub const UNALIGNED: i64 = -4;
    /// Some other field has an invalid value (an unknown stream, reserved bits set, ...).
    pub const BAD_ARGUMENT: i64 = -5;
    /// The host's I/O on the backing file failed.
    pub const IO_ERROR: i64 = -6;
    /// A write to a read-only device.
    pub const READ_ONLY: i64 = -7;
    /// A block request past the end of the device, or not sector aligned.
    pub const OUT_OF_RANGE: i64 = -8;
    /// The device is broken (the guest corrupted its ring); nothing more is served.
    pub const BROKEN: i64 = -9;
    /// No host function has this name.
    pub const NOT_FOUND: i64 = -10;
    /// The host function failed.
    pub const HOST_FN_FAILED: i64 = -11;
}

/// Largest message one [`call::ABORT`] reports; longer messages are truncated by the host.
pub const ABORT_MESSAGE_MAX: u64 = 4096;

/// Arguments of [`call::CONSOLE_WRITE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsoleWrite {
    /// [`stream::STDOUT`](crate::stream::STDOUT) or [`stream::STDERR`](crate::stream::STDERR).
    pub stream: u32,
    /// Must be zero.
    pub reserved: u32,
    /// Guest address of the bytes.
    pub buf: u64,
    /// Number of bytes (at most [`CONSOLE_WRITE_MAX`](crate::CONSOLE_WRITE_MAX)).
    pub len: u64,
}

/// Arguments of [`call::EXIT`].
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exit {
    /// The exit code; the host process exits with `code & 0xff`.
    pub code: i32,
    /// Must be zero.
    pub reserved: u32,
}

/// Arguments of [`call::ABORT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Abort {
    /// Guest address of a UTF-8 message (invalid UTF-8 is shown lossily).
    pub msg: u64,
    /// Length of the message in bytes (longer than [`ABORT_MESSAGE_MAX`] is truncated).
    pub len: u64,
}

/// Arguments of [`call::WAIT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wait {
    /// Deadline in nanoseconds of the guest monotonic clock (see
    /// [`BootInfo::tsc_at_boot`](crate::BootInfo::tsc_at_boot)); `u64::MAX` waits for an
    /// event only. A deadline in the past returns at once.
    pub deadline_ns: u64,
}

// Layout checks: these sizes are part of the ABI.
const _: () = assert!(core::mem::size_of::<ConsoleWrite>() == 24);
const _: () = assert!(core::mem::size_of::<Exit>() == 8);
const _: () = assert!(core::mem::size_of::<Abort>() == 16);
const _: () = assert!(core::mem::size_of::<Wait>() == 8);

// With the `vm-memory` feature (the host's), these structs can be read from and written
// to guest memory through vm-memory's checked accessors.
// SAFETY: `#[repr(C)]` plain old data with explicit padding fields, no references and no
// invalid bit patterns.
#[cfg(feature = "vm-memory")]
unsafe impl vm_memory::ByteValued for ConsoleWrite {}
#[cfg(feature = "vm-memory")]
unsafe impl vm_memory::ByteValued for Exit {}
#[cfg(feature = "vm-memory")]
unsafe impl vm_memory::ByteValued for Abort {}
#[cfg(feature = "vm-memory")]
unsafe impl vm_memory::ByteValued for Wait {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argument_structs_have_the_documented_layout() {
        // docs/ABI.md §5.
        assert_layout!(ConsoleWrite {
            size: 24,
            align: 8,
            stream: 0,
            reserved: 4,
            buf: 8,
            len: 16
        });
        assert_layout!(Exit {
            size: 8,
            align: 8,
            code: 0,
            reserved: 4
        });
        assert_layout!(Abort {
            size: 16,
            align: 8,
            msg: 0,
            len: 8
        });
        assert_layout!(Wait {
            size: 8,
            align: 8,
            deadline_ns: 0
        });
    }

    #[test]
    fn ports_are_the_documented_ones() {
        assert_eq!(HYPERCALL_PORT_BASE, 0x500);
        assert_eq!(HYPERCALL_PORT_COUNT, 0x40);
        assert_eq!(EXCEPTION_PORT, 0x5ff);
        // The exception port is not one the guest may use.
        assert!(
            !(HYPERCALL_PORT_BASE..HYPERCALL_PORT_BASE + HYPERCALL_PORT_COUNT)
                .contains(&EXCEPTION_PORT)
        );
    }

    #[test]
    fn call_numbers_are_the_documented_ones_and_fit_the_port_window() {
        let calls = [
            (call::CONSOLE_WRITE, 1),
            (call::EXIT, 2),
            (call::ABORT, 3),
            (call::WAIT, 4),
            (call::CONSOLE_FLUSH, 5),
            (call::FN_READY, 6),
            (call::FN_RETURN, 7),
            (call::HOST_CALL, 8),
            (call::FN_MAILBOX, 9),
            (call::FN_NOTIFY, 10),
        ];
        for (nr, want) in calls {
            assert_eq!(nr, want);
            assert!(
                nr < call::DOORBELL_BASE,
                "call {nr} collides with the doorbells"
            );
        }
        assert_eq!(call::DOORBELL_BASE, 0x20);
        // Every device's doorbell is a port inside the window.
        assert!(call::DOORBELL_BASE as usize + crate::MAX_DEVICES <= HYPERCALL_PORT_COUNT as usize);
    }

    #[test]
    fn status_codes_are_the_documented_ones() {
        let codes = [
            (status::OK, 0),
            (status::UNKNOWN_CALL, -1),
            (status::BAD_ADDRESS, -2),
            (status::BAD_LENGTH, -3),
            (status::UNALIGNED, -4),
            (status::BAD_ARGUMENT, -5),
            (status::IO_ERROR, -6),
            (status::READ_ONLY, -7),
            (status::OUT_OF_RANGE, -8),
            (status::BROKEN, -9),
            (status::NOT_FOUND, -10),
            (status::HOST_FN_FAILED, -11),
        ];
        for (code, want) in codes {
            assert_eq!(code, want);
        }
    }

    #[test]
    fn limits_are_the_documented_ones() {
        assert_eq!(ABORT_MESSAGE_MAX, 4096);
    }
}
