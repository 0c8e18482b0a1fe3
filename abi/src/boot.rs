//! The boot-info block the host writes before entry: the memory map ([`MemRegion`]),
//! argument and environment strings ([`Str`]), CPU features and the device list
//! ([`DeviceInfo`]).

/// Magic value at the start of [`BootInfo`] (`"PVRUNBI\0"` little-endian).
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"PVRUNBI\0");

/// Kinds of [`MemRegion`].
pub mod region {
    /// ELF segment with R+X permissions.
    pub const TEXT: u32 = 1;
    /// ELF segment, read-only.
    pub const RODATA: u32 = 2;
    /// ELF segment, read-write (data and bss).
    pub const DATA: u32 = 3;
    /// The heap: read-write, free for the guest allocator.
    pub const HEAP: u32 = 4;
    /// The stack: read-write; `rsp` starts at its end.
    pub const STACK: u32 = 5;
    /// The boot-info region: read-only.
    pub const BOOT_INFO: u32 = 6;
    /// The console ring (header and data): read-write.
    pub const CONSOLE: u32 = 7;
    /// The device rings: read-write.
    pub const DEVICES: u32 = 8;
}

/// Permission bits of [`MemRegion::flags`].
pub mod perm {
    /// Readable.
    pub const R: u32 = 1;
    /// Writable.
    pub const W: u32 = 2;
    /// Executable.
    pub const X: u32 = 4;
}

/// One guest-accessible memory region. Everything not listed is unmapped for the guest.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemRegion {
    /// First address.
    pub start: u64,
    /// Length in bytes (a multiple of 4 KiB).
    pub len: u64,
    /// One of the [`region`] kinds.
    pub kind: u32,
    /// [`perm`] bits.
    pub flags: u32,
}

/// A byte string in guest memory (used for argv and environment entries).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Str {
    /// Guest address of the first byte (UTF-8, not NUL-terminated).
    pub ptr: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Feature bits of [`BootInfo::features`].
pub mod feature {
    /// The CPU has `rdrand` usable at CPL3.
    pub const RDRAND: u64 = 1 << 0;
    /// The CPU has `rdseed` usable at CPL3.
    pub const RDSEED: u64 = 1 << 1;
    /// The TSC is invariant (constant rate); clocks read it without exits.
    pub const INVARIANT_TSC: u64 = 1 << 2;
    /// AVX state is enabled in XCR0.
    pub const AVX: u64 = 1 << 3;
}

/// Maximum number of entries in [`BootInfo::regions`].
pub const MAX_REGIONS: usize = 16;
/// Maximum number of entries in [`BootInfo::devices`].
pub const MAX_DEVICES: usize = 16;

/// Boot information the host writes at
/// [`layout::BOOT_INFO_ADDR`](crate::layout::BOOT_INFO_ADDR) before entry; `rdi` holds its
/// address at entry. All pointers are guest addresses inside the boot-info region.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`](crate::ABI_VERSION) of the host.
    pub abi_version: u32,
    /// Size of this struct in bytes (for forward compatibility).
    pub size: u32,
    /// [`feature`] bits.
    pub features: u64,
    /// Total guest memory in bytes.
    pub mem_size: u64,
    /// Start of the heap (2 MiB aligned).
    pub heap_start: u64,
    /// Length of the heap in bytes.
    pub heap_len: u64,
    /// Lowest stack address (the guard region lies below).
    pub stack_start: u64,
    /// Length of the stack; the initial `rsp` is `stack_start + stack_len`.
    pub stack_len: u64,
    /// TSC ticks per second.
    pub tsc_hz: u64,
    /// TSC value at the boot instant; the guest monotonic clock is
    /// `(rdtsc - tsc_at_boot) / tsc_hz` seconds.
    pub tsc_at_boot: u64,
    /// Wall-clock time at the boot instant, nanoseconds since the UNIX epoch (UTC).
    pub wall_ns_at_boot: u64,
    /// 32 random bytes from the host, for seeding when the CPU has no `rdrand`.
    pub random_seed: [u8; 32],
    /// Number of argument strings.
    pub argc: u64,
    /// Guest address of `argc` [`Str`] entries.
    pub argv: u64,
    /// Number of environment strings.
    pub envc: u64,
    /// Guest address of `envc` [`Str`] entries, each `KEY=VALUE`.
    pub envp: u64,
    /// Guest address of the [`ConsoleRing`](crate::ConsoleRing) header (0: no ring, use
    /// `CONSOLE_WRITE`).
    pub console_ring: u64,
    /// Guest address of the console ring's data bytes.
    pub console_data: u64,
    /// Size of the console ring's data area (a power of two).
    pub console_size: u64,
    /// Number of valid entries in `regions`.
    pub region_count: u32,
    /// Number of valid entries in `devices`.
    pub device_count: u32,
    /// The guest-accessible memory map.
    pub regions: [MemRegion; MAX_REGIONS],
    /// The attached devices.
    pub devices: [DeviceInfo; MAX_DEVICES],
    /// The VM generation: 1 at boot, and a new value every time the host resets a function
    /// sandbox to its snapshot or makes a new sandbox from one (like VMGenID). Memory is
    /// the snapshot's again then, so anything random the guest derived before (a PRNG
    /// state, hash keys, nonces) is shared with every other copy: when this changes, rekey
    /// from [`generation_seed`](Self::generation_seed). The host rewrites it between runs
    /// only; read it with a volatile load.
    pub generation: u64,
    /// Fresh random bytes from the host for each generation.
    pub generation_seed: [u8; 32],
}

impl BootInfo {
    /// An all-zero boot info (the host fills it in).
    pub const fn zeroed() -> Self {
        // SAFETY: every field is an integer or an array of integers (or of such structs):
        // all-zero bytes are a valid value.
        unsafe { core::mem::zeroed() }
    }
}

/// Device kinds in [`DeviceInfo::kind`].
pub mod device {
    /// A block device (a disk): [`BlockRequest`](crate::BlockRequest) ring.
    pub const BLOCK: u32 = 1;
    /// A network interface: transmit and receive rings.
    pub const NET: u32 = 2;
    /// [`DeviceInfo::flags`](crate::DeviceInfo::flags) bit: the device is read-only.
    pub const FLAG_READ_ONLY: u32 = 1;
}

/// One attached device, as listed in [`BootInfo::devices`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device name (`--disk NAME=...`), UTF-8, NUL-padded.
    pub name: [u8; 32],
    /// A [`device`] kind.
    pub kind: u32,
    /// Device number: its doorbell is call number `call::DOORBELL_BASE + index`.
    pub index: u32,
    /// Address of the device's (first) [`RingHeader`](crate::RingHeader) (block: requests;
    /// net: transmit).
    pub ring: u64,
    /// Address of a second ring (net: receive), or 0.
    pub ring2: u64,
    /// Number of slots in each ring (a power of two).
    pub slots: u32,
    /// Bytes per slot.
    pub slot_size: u32,
    /// [`device`] flag bits.
    pub flags: u32,
    /// Block: bytes per sector.
    pub sector_size: u32,
    /// Block: capacity in bytes (a multiple of the sector size).
    pub capacity: u64,
    /// Block: the largest request in bytes.
    pub max_request: u64,
    /// Net: the MAC address (6 bytes, then zero).
    pub mac: [u8; 8],
    /// Net: the static IPv4 address, or all zero for DHCP.
    pub ipv4: [u8; 4],
    /// Net: the IPv4 gateway, or all zero for none.
    pub gateway: [u8; 4],
    /// Net: the IPv4 prefix length (0 with DHCP).
    pub prefix_len: u32,
    /// Net: the MTU (the largest IP packet; frames carry 14 more bytes).
    pub mtu: u32,
    /// Zero.
    pub reserved: [u64; 2],
}

impl DeviceInfo {
    /// An all-zero entry.
    pub const fn zeroed() -> Self {
        // SAFETY: every field is an integer or an array of integers (or of such structs):
        // all-zero bytes are a valid value.
        unsafe { core::mem::zeroed() }
    }

    /// The name as a string (up to the first NUL).
    pub fn name(&self) -> &str {
        let n = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        core::str::from_utf8(&self.name[..n]).unwrap_or("")
    }
}

// Layout checks: these sizes are part of the ABI.
const _: () = assert!(core::mem::size_of::<MemRegion>() == 24);
const _: () = assert!(core::mem::size_of::<Str>() == 16);
const _: () = assert!(core::mem::size_of::<DeviceInfo>() == 128);
const _: () =
    assert!(core::mem::size_of::<BootInfo>() == 184 + 24 * MAX_REGIONS + 128 * MAX_DEVICES + 40);

// With the `vm-memory` feature (the host's), these structs can be read from and written
// to guest memory through vm-memory's checked accessors.
// SAFETY: `#[repr(C)]` plain old data with explicit padding fields, no references and no
// invalid bit patterns.
#[cfg(feature = "vm-memory")]
unsafe impl vm_memory::ByteValued for MemRegion {}
#[cfg(feature = "vm-memory")]
unsafe impl vm_memory::ByteValued for Str {}
#[cfg(feature = "vm-memory")]
unsafe impl vm_memory::ByteValued for BootInfo {}
#[cfg(feature = "vm-memory")]
unsafe impl vm_memory::ByteValued for DeviceInfo {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_info_has_the_documented_layout() {
        // docs/ABI.md §4: 2656 bytes in ABI v3.
        assert_layout!(BootInfo {
            size: 2656,
            align: 8,
            magic: 0x000,
            abi_version: 0x008,
            size: 0x00c,
            features: 0x010,
            mem_size: 0x018,
            heap_start: 0x020,
            heap_len: 0x028,
            stack_start: 0x030,
            stack_len: 0x038,
            tsc_hz: 0x040,
            tsc_at_boot: 0x048,
            wall_ns_at_boot: 0x050,
            random_seed: 0x058,
            argc: 0x078,
            argv: 0x080,
            envc: 0x088,
            envp: 0x090,
            console_ring: 0x098,
            console_data: 0x0a0,
            console_size: 0x0a8,
            region_count: 0x0b0,
            device_count: 0x0b4,
            regions: 0x0b8,
            devices: 0x238,
            generation: 0xa38,
            generation_seed: 0xa40,
        });
        assert_eq!(MAX_REGIONS, 16);
        assert_eq!(MAX_DEVICES, 16);
    }

    #[test]
    fn boot_info_entries_have_the_documented_layout() {
        assert_layout!(MemRegion {
            size: 24,
            align: 8,
            start: 0,
            len: 8,
            kind: 16,
            flags: 20
        });
        assert_layout!(Str {
            size: 16,
            align: 8,
            ptr: 0,
            len: 8
        });
    }

    #[test]
    fn device_info_has_the_documented_layout() {
        // docs/ABI.md §7.
        assert_layout!(DeviceInfo {
            size: 128,
            align: 8,
            name: 0x00,
            kind: 0x20,
            index: 0x24,
            ring: 0x28,
            ring2: 0x30,
            slots: 0x38,
            slot_size: 0x3c,
            flags: 0x40,
            sector_size: 0x44,
            capacity: 0x48,
            max_request: 0x50,
            mac: 0x58,
            ipv4: 0x60,
            gateway: 0x64,
            prefix_len: 0x68,
            mtu: 0x6c,
            reserved: 0x70,
        });
    }

    #[test]
    fn magic_is_pvrunbi() {
        assert_eq!(BOOT_INFO_MAGIC, 0x0049_424e_5552_5650);
        assert_eq!(&BOOT_INFO_MAGIC.to_le_bytes(), b"PVRUNBI\0");
    }

    #[test]
    fn kinds_and_bits_are_the_documented_ones() {
        assert_eq!(
            [
                region::TEXT,
                region::RODATA,
                region::DATA,
                region::HEAP,
                region::STACK,
                region::BOOT_INFO,
                region::CONSOLE,
                region::DEVICES,
            ],
            [1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!([perm::R, perm::W, perm::X], [1, 2, 4]);
        assert_eq!(
            [
                feature::RDRAND,
                feature::RDSEED,
                feature::INVARIANT_TSC,
                feature::AVX
            ],
            [1, 2, 4, 8]
        );
        assert_eq!(
            [device::BLOCK, device::NET, device::FLAG_READ_ONLY],
            [1, 2, 1]
        );
    }

    #[test]
    fn device_name_stops_at_the_first_nul() {
        let mut d = DeviceInfo::zeroed();
        assert_eq!(d.name(), "");
        d.name[..4].copy_from_slice(b"disk");
        assert_eq!(d.name(), "disk");
        d.name = [b'x'; 32];
        assert_eq!(d.name().len(), 32);
        d.name[0] = 0xff;
        assert_eq!(d.name(), "", "invalid UTF-8 gives the empty name");
    }
}
