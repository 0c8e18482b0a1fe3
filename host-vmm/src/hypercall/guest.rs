//! What a hypercall may touch: guest memory through the memory map's checks. Argument
//! structs and buffers are copied out once; nothing is read from guest memory twice.

use pvrun_abi::status;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::{MemoryMap, UserMemory, UserRange};

/// The guest memory and map a hypercall may touch.
pub(crate) struct GuestView<'a> {
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// What the guest may access.
    pub map: &'a MemoryMap,
}

impl GuestView<'_> {
    /// Copies the argument struct at `addr` out of guest memory, once. The address must be
    /// 8-byte aligned and the whole struct guest-readable.
    pub fn read_args<T: ByteValued>(&self, addr: u64) -> Result<T, i64> {
        if !addr.is_multiple_of(8) {
            return Err(status::UNALIGNED);
        }
        self.map
            .check_user(addr, size_of::<T>() as u64, false)
            .map_err(|_| status::BAD_ADDRESS)?;
        self.mem
            .read_obj(GuestAddress(addr))
            .map_err(|_| status::BAD_ADDRESS)
    }

    /// Checks `[addr, addr+len)` for reading (`write` false) or writing by the guest,
    /// with the status a guest gets for a refusal.
    pub fn check(&self, addr: u64, len: u64, write: bool) -> Result<UserRange, i64> {
        self.map
            .check_user(addr, len, write)
            .map_err(|e| e.status())
    }

    /// Copies `len` bytes at `addr` (guest-readable memory only, at most `max`) into `out`.
    pub fn read_buf(&self, addr: u64, len: u64, max: u64, out: &mut Vec<u8>) -> Result<(), i64> {
        if len > max {
            return Err(status::BAD_LENGTH);
        }
        let range = self.check(addr, len, false)?;
        out.clear();
        out.resize(len as usize, 0);
        self.mem.read_user(&range, out).map_err(|e| e.status())
    }
}
