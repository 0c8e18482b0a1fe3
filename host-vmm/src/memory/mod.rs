//! Guest memory: the host mapping that backs it ([`GuestRam`]), the guest's memory map
//! ([`MemoryMap`], what ring 3 may read, write or execute), frozen copies for sandboxes
//! ([`MemorySnapshot`]), and the only accessors the host uses on the guest's behalf
//! ([`UserMemory`], which take a checked [`UserRange`]).

mod map;
mod ram;
mod snapshot;

pub use map::{AccessError, HOST_ONLY, MemoryMap, Region, UserRange};
pub use ram::GuestRam;
pub use snapshot::MemorySnapshot;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

/// Guest-memory access on the guest's behalf: every method takes a [`UserRange`], so it can
/// only touch bytes the memory map allowed for this kind of access.
pub trait UserMemory {
    /// Copies the whole range into `out` (which must be exactly as long).
    fn read_user(&self, range: &UserRange, out: &mut [u8]) -> Result<(), AccessError>;
    /// Stores `data` at the start of the range (writable ranges only; `data` must fit).
    fn write_user(&self, range: &UserRange, data: &[u8]) -> Result<(), AccessError>;
    /// The range as a volatile slice, for the kernel to copy into or out of directly
    /// (`pread`/`read` into it need a writable range).
    fn user_slice(&self, range: &UserRange) -> Result<VolatileSlice<'_>, AccessError>;
}

impl UserMemory for GuestMemoryMmap {
    fn read_user(&self, range: &UserRange, out: &mut [u8]) -> Result<(), AccessError> {
        if out.len() as u64 != range.len() {
            return Err(AccessError::Overflow);
        }
        self.read_slice(out, GuestAddress(range.addr()))
            .map_err(|_| AccessError::Outside)
    }

    fn write_user(&self, range: &UserRange, data: &[u8]) -> Result<(), AccessError> {
        if !range.writable() {
            return Err(AccessError::Outside);
        }
        if data.len() as u64 > range.len() {
            return Err(AccessError::Overflow);
        }
        self.write_slice(data, GuestAddress(range.addr()))
            .map_err(|_| AccessError::Outside)
    }

    fn user_slice(&self, range: &UserRange) -> Result<VolatileSlice<'_>, AccessError> {
        let len = usize::try_from(range.len()).map_err(|_| AccessError::Overflow)?;
        self.get_slice(GuestAddress(range.addr()), len)
            .map_err(|_| AccessError::Outside)
    }
}
