//! The console: the [`ConsoleRing`] that carries output without a VM exit per write, its
//! record format, and the streams and limit of the `CONSOLE_WRITE` call.

/// Console streams for [`ConsoleWrite::stream`](crate::ConsoleWrite::stream).
pub mod stream {
    /// Standard output.
    pub const STDOUT: u32 = 1;
    /// Standard error.
    pub const STDERR: u32 = 2;
}

/// Largest buffer one [`call::CONSOLE_WRITE`](crate::call::CONSOLE_WRITE) accepts; longer
/// writes fail with [`status::BAD_LENGTH`](crate::status::BAD_LENGTH) (the SDK splits them).
pub const CONSOLE_WRITE_MAX: u64 = 64 * 1024;

/// Header of the console ring: a single-producer byte ring in guest memory that carries
/// console output without a VM exit per write. The guest appends records at `producer`;
/// the host copies them out at every VM exit (any hypercall, exit, crash, timeout) and on
/// [`call::CONSOLE_FLUSH`](crate::call::CONSOLE_FLUSH), then sets `consumer`. Indices are
/// free-running byte counts; byte `i` lives at `data[i % size]`. A record is a 3-byte header
/// (stream as `u8`, length as little-endian `u16`) followed by that many bytes; records may
/// wrap around the end.
/// Ordering: the guest writes the record bytes, then stores `producer` (release); the host
/// loads `producer` (acquire), then reads the bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsoleRing {
    /// Bytes ever published by the guest.
    pub producer: u64,
    /// Keeps `consumer` on its own cache line.
    pub pad0: [u64; 7],
    /// Bytes ever consumed by the host.
    pub consumer: u64,
    /// Pads the header to two cache lines.
    pub pad1: [u64; 7],
}

/// Size of a console record header: stream (`u8`) and length (`u16` LE).
pub const CONSOLE_RECORD_HEADER: u64 = 3;

// Layout checks: these sizes are part of the ABI.
const _: () = assert!(core::mem::size_of::<ConsoleRing>() == 128);

// With the `vm-memory` feature (the host's), this struct can be read from and written to
// guest memory through vm-memory's checked accessors.
// SAFETY: `#[repr(C)]` plain old data with explicit padding fields, no references and no
// invalid bit patterns.
#[cfg(feature = "vm-memory")]
unsafe impl vm_memory::ByteValued for ConsoleRing {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_ring_has_the_documented_layout() {
        // docs/ABI.md §6: two cache lines, `producer` and `consumer` one on each.
        assert_layout!(ConsoleRing {
            size: 128,
            align: 8,
            producer: 0x00,
            pad0: 0x08,
            consumer: 0x40,
            pad1: 0x48
        });
    }

    #[test]
    fn records_and_limits_are_the_documented_ones() {
        assert_eq!(stream::STDOUT, 1);
        assert_eq!(stream::STDERR, 2);
        // Stream as `u8`, length as `u16`.
        assert_eq!(CONSOLE_RECORD_HEADER, 3);
        assert_eq!(CONSOLE_WRITE_MAX, 65_536);
    }
}
