//! Function guests: the argument structs of `FN_READY`, `FN_RETURN` and `HOST_CALL`, the
//! header of each call's input, and the exitless-call mailbox of `FN_MAILBOX` (ABI v4).

/// Arguments of [`call::FN_READY`](crate::call::FN_READY).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FnReady {
    /// Guest address of the exported function names, each followed by a NUL byte.
    pub exports: u64,
    /// Length of that list in bytes.
    pub exports_len: u64,
    /// Guest address of the input buffer (guest-writable): the host writes an
    /// [`FnCall`] header there, followed by the call's input bytes.
    pub inbuf: u64,
    /// Size of the input buffer in bytes (at least the header).
    pub inbuf_len: u64,
}

/// Header the host writes at the start of the input buffer for each call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FnCall {
    /// Index of the function in the export list.
    pub index: u32,
    /// Zero.
    pub reserved: u32,
    /// Length of the input, which follows this header.
    pub input_len: u64,
}

/// Arguments of [`call::FN_RETURN`](crate::call::FN_RETURN).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FnReturn {
    /// 0 for a result; any other value reports an error (the output is then a UTF-8
    /// message).
    pub status: i64,
    /// Guest address of the output.
    pub out: u64,
    /// Output length in bytes.
    pub out_len: u64,
}

/// Arguments of [`call::HOST_CALL`](crate::call::HOST_CALL).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostCall {
    /// Guest address of the host function's name (UTF-8).
    pub name: u64,
    /// Length of the name.
    pub name_len: u64,
    /// Guest address of the input.
    pub input: u64,
    /// Input length.
    pub input_len: u64,
    /// Guest address of the output buffer (guest-writable).
    pub output: u64,
    /// Capacity of the output buffer.
    pub output_cap: u64,
}

/// The exitless-call mailbox a function guest declares with
/// [`call::FN_MAILBOX`](crate::call::FN_MAILBOX) (ABI v4): two cache lines in guest-writable
/// memory, 64-byte aligned. The first line is written only by the host, the second only by
/// the guest; each side reads the other's line with plain (atomic, aligned) loads.
///
/// Once the host sets [`exitless`](Self::exitless) to 1 (it never clears it again), calls
/// no longer go through `FN_RETURN`: the host writes the [`FnCall`] header and input into
/// the input buffer, then stores the call's number in [`call_seq`](Self::call_seq); the
/// guest runs the call, stores the result fields and then [`done_seq`](Self::done_seq) =
/// that number. See docs/ABI.md §5 "Exitless calls" for the whole protocol.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FnMailbox {
    /// Host: the number of the latest call posted (1, 2, 3, ...; 0: none yet).
    pub call_seq: u64,
    /// Host: how long the guest may spin on `call_seq` after a call before it sleeps, in
    /// nanoseconds (0: sleep at once).
    pub spin_ns: u64,
    /// Host: 1 while the caller sleeps instead of polling `done_seq`; the guest then makes
    /// the [`call::FN_NOTIFY`](crate::call::FN_NOTIFY) hypercall after publishing a result.
    pub host_sleeping: u32,
    /// Host: 1 once calls go through this mailbox (0: exit-based calls, as in ABI v3).
    pub exitless: u32,
    /// Zero.
    pub reserved_host: [u64; 5],
    /// Guest: the number of the latest call answered.
    pub done_seq: u64,
    /// Guest: that call's status, as in [`FnReturn::status`].
    pub status: i64,
    /// Guest: guest address of its output.
    pub out: u64,
    /// Guest: output length in bytes.
    pub out_len: u64,
    /// Guest: 1 while it sleeps in `WAIT` waiting for a call (the host then wakes it).
    pub guest_sleeping: u32,
    /// Zero.
    pub reserved_guest0: u32,
    /// Zero.
    pub reserved_guest: [u64; 3],
}

/// Byte offsets of the [`FnMailbox`] fields, for the host's atomic accesses.
pub mod mailbox {
    /// [`FnMailbox::call_seq`](crate::FnMailbox::call_seq).
    pub const CALL_SEQ: u64 = 0x00;
    /// [`FnMailbox::spin_ns`](crate::FnMailbox::spin_ns).
    pub const SPIN_NS: u64 = 0x08;
    /// [`FnMailbox::host_sleeping`](crate::FnMailbox::host_sleeping).
    pub const HOST_SLEEPING: u64 = 0x10;
    /// [`FnMailbox::exitless`](crate::FnMailbox::exitless).
    pub const EXITLESS: u64 = 0x14;
    /// [`FnMailbox::done_seq`](crate::FnMailbox::done_seq).
    pub const DONE_SEQ: u64 = 0x40;
    /// [`FnMailbox::status`](crate::FnMailbox::status).
    pub const STATUS: u64 = 0x48;
    /// [`FnMailbox::out`](crate::FnMailbox::out).
    pub const OUT: u64 = 0x50;
    /// [`FnMailbox::out_len`](crate::FnMailbox::out_len).
    pub const OUT_LEN: u64 = 0x58;
    /// [`FnMailbox::guest_sleeping`](crate::FnMailbox::guest_sleeping).
    pub const GUEST_SLEEPING: u64 = 0x60;
    /// Size of the mailbox (two cache lines).
    pub const SIZE: u64 = 128;
    /// Required alignment of the mailbox.
    pub const ALIGN: u64 = 64;
}

// Layout checks: these sizes are part of the ABI.
const _: () = assert!(core::mem::size_of::<FnMailbox>() == 128);
const _: () = assert!(core::mem::size_of::<FnReady>() == 32);
const _: () = assert!(core::mem::size_of::<FnCall>() == 16);
const _: () = assert!(core::mem::size_of::<FnReturn>() == 24);
const _: () = assert!(core::mem::size_of::<HostCall>() == 48);

// With the `vm-memory` feature (the host's), these structs can be read from and written
// to guest memory through vm-memory's checked accessors.
// SAFETY: `#[repr(C)]` plain old data with explicit padding fields, no references and no
// invalid bit patterns.
#[cfg(feature = "vm-memory")]
unsafe impl vm_memory::ByteValued for FnReady {}
#[cfg(feature = "vm-memory")]
unsafe impl vm_memory::ByteValued for FnCall {}
#[cfg(feature = "vm-memory")]
unsafe impl vm_memory::ByteValued for FnReturn {}
#[cfg(feature = "vm-memory")]
unsafe impl vm_memory::ByteValued for HostCall {}
#[cfg(feature = "vm-memory")]
unsafe impl vm_memory::ByteValued for FnMailbox {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_have_the_documented_layout() {
        // docs/ABI.md §5.
        assert_layout!(FnReady {
            size: 32,
            align: 8,
            exports: 0,
            exports_len: 8,
            inbuf: 16,
            inbuf_len: 24
        });
        assert_layout!(FnCall {
            size: 16,
            align: 8,
            index: 0,
            reserved: 4,
            input_len: 8
        });
        assert_layout!(FnReturn {
            size: 24,
            align: 8,
            status: 0,
            out: 8,
            out_len: 16
        });
        assert_layout!(HostCall {
            size: 48,
            align: 8,
            name: 0,
            name_len: 8,
            input: 16,
            input_len: 24,
            output: 32,
            output_cap: 40,
        });
        assert_layout!(FnMailbox {
            size: 128,
            align: 64,
            call_seq: 0x00,
            spin_ns: 0x08,
            host_sleeping: 0x10,
            exitless: 0x14,
            reserved_host: 0x18,
            done_seq: 0x40,
            status: 0x48,
            out: 0x50,
            out_len: 0x58,
            guest_sleeping: 0x60,
            reserved_guest0: 0x64,
            reserved_guest: 0x68,
        });
        use core::mem::offset_of;
        assert_eq!(offset_of!(FnMailbox, call_seq) as u64, mailbox::CALL_SEQ);
        assert_eq!(offset_of!(FnMailbox, spin_ns) as u64, mailbox::SPIN_NS);
        assert_eq!(
            offset_of!(FnMailbox, host_sleeping) as u64,
            mailbox::HOST_SLEEPING
        );
        assert_eq!(offset_of!(FnMailbox, exitless) as u64, mailbox::EXITLESS);
        assert_eq!(offset_of!(FnMailbox, done_seq) as u64, mailbox::DONE_SEQ);
        assert_eq!(offset_of!(FnMailbox, status) as u64, mailbox::STATUS);
        assert_eq!(offset_of!(FnMailbox, out) as u64, mailbox::OUT);
        assert_eq!(offset_of!(FnMailbox, out_len) as u64, mailbox::OUT_LEN);
        assert_eq!(
            offset_of!(FnMailbox, guest_sleeping) as u64,
            mailbox::GUEST_SLEEPING
        );
        assert_eq!(size_of::<FnMailbox>() as u64, mailbox::SIZE);
        assert_eq!(align_of::<FnMailbox>() as u64, mailbox::ALIGN);
    }
}
