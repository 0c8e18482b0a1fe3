//! Function guests: the argument structs of `FN_READY`, `FN_RETURN` and `HOST_CALL` and
//! the header of each call's input.

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

// Layout checks: these sizes are part of the ABI.
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
    }
}
