//! The pvrun guest/host ABI, shared by `host-vmm` and `guest-sdk` so the two can never drift.
//!
//! `docs/ABI.md` is the human-readable specification of exactly what this crate defines:
//! the memory layout a guest finds at entry, the boot-info block, the hypercall
//! convention and call numbers, the argument structs, the status codes and the ELF note
//! that marks a guest binary. Everything here is `#[repr(C)]` with explicit padding and
//! fixed-width fields so a guest in any language can use it.
#![no_std]

/// The ABI version this crate describes. A guest carries it in its `.note.pvrun` ELF note;
/// the host refuses a guest whose version it does not speak.
pub const ABI_VERSION: u32 = 2;

/// Magic value at the start of [`BootInfo`] (`"PVRUNBI\0"` little-endian).
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"PVRUNBI\0");

/// ELF note owner name (`n_name`) of the ABI-version note, without the trailing NUL.
pub const NOTE_NAME: &[u8] = b"pvrun";
/// ELF note type (`n_type`) of the ABI-version note; its descriptor is one little-endian `u32`.
pub const NOTE_TYPE_ABI_VERSION: u32 = 1;
/// ELF note type of a device the guest requires; its descriptor is a [`DeviceNote`].
pub const NOTE_TYPE_DEVICE: u32 = 2;

/// Descriptor of a [`NOTE_TYPE_DEVICE`] note: the host refuses to boot the guest unless a
/// device of this kind and name is attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceNote {
    /// A [`device`] kind.
    pub kind: u32,
    /// The device name, UTF-8, NUL-padded.
    pub name: [u8; 32],
}
/// Section the SDK places the ABI note in.
pub const NOTE_SECTION: &str = ".note.pvrun";

/// Guest memory layout. Guest virtual addresses equal guest physical addresses.
pub mod layout {
    /// Size of a small page.
    pub const PAGE_SIZE: u64 = 0x1000;
    /// Size of a large page; big regions are aligned to it and mapped with 2 MiB pages.
    pub const LARGE_PAGE_SIZE: u64 = 0x20_0000;
    /// Guest address of the [`ConsoleRing`](crate::ConsoleRing) header (user read-write).
    pub const CONSOLE_RING_ADDR: u64 = 0x8000;
    /// Guest address of the console ring's data bytes (user read-write).
    pub const CONSOLE_DATA_ADDR: u64 = 0x9000;
    /// Size of the console ring's data area (a power of two).
    pub const CONSOLE_DATA_SIZE: u64 = 0x4000;
    /// Guest physical address of the [`BootInfo`](crate::BootInfo) block (user read-only).
    /// Argument, environment and memory-map data follow it in the same region.
    pub const BOOT_INFO_ADDR: u64 = 0x1_0000;
    /// End (exclusive) of the read-only boot-info region.
    pub const BOOT_INFO_END: u64 = 0x4_0000;
    /// Start of the device-ring area (user read-write): each device's rings live here.
    pub const DEVICE_AREA_ADDR: u64 = 0x4_0000;
    /// End (exclusive) of the device-ring area.
    pub const DEVICE_AREA_END: u64 = 0x10_0000;
    /// Lowest address a guest ELF segment may occupy: everything below belongs to the host
    /// (null guard page, descriptor tables, ring-0 stub, boot info, page tables).
    pub const GUEST_IMAGE_BASE: u64 = 0x20_0000;
    /// Size of the guest stack (top of guest memory). A 2 MiB unmapped guard lies below it.
    pub const STACK_SIZE: u64 = 0x20_0000;
    /// Size of the unmapped guard region below the stack.
    pub const STACK_GUARD_SIZE: u64 = 0x20_0000;
}

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

/// Device kinds in [`DeviceInfo::kind`].
pub mod device {
    /// A block device (a disk): [`BlockRequest`](crate::BlockRequest) ring.
    pub const BLOCK: u32 = 1;
    /// A network interface: transmit and receive rings.
    pub const NET: u32 = 2;
    /// [`DeviceInfo::flags`] bit: the device is read-only.
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
    /// Address of the device's (first) [`RingHeader`] (block: requests; net: transmit).
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

/// Header of a shared ring (Xen `ring.h` style), followed at offset [`RING_SLOTS_OFFSET`]
/// by `slots` fixed-size slots. Each index sits on its own cache line. Indices are
/// free-running `u32` counters; slot `i` is at `i % slots`. The guest produces requests,
/// the host consumes each request slot once and writes its response into the same slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingHeader {
    /// Requests produced by the guest.
    pub req_prod: u32,
    /// Padding to the next cache line.
    pub pad0: [u32; 15],
    /// Written by the host: the guest rings the doorbell when it moves `req_prod` past
    /// this value (event-index notification suppression).
    pub req_event: u32,
    /// Padding to the next cache line.
    pub pad1: [u32; 15],
    /// Responses produced by the host.
    pub rsp_prod: u32,
    /// Padding to the next cache line.
    pub pad2: [u32; 15],
    /// Written by the host: 0 while the ring is served, [`RING_BROKEN`] once the host gave
    /// up on it because the guest corrupted it.
    pub status: u32,
    /// Padding to the next cache line.
    pub pad3: [u32; 15],
}

/// [`RingHeader::status`] value of a ring the host no longer serves.
pub const RING_BROKEN: u32 = 1;
/// Offset of the first slot from the ring header.
pub const RING_SLOTS_OFFSET: u64 = 256;
/// Bytes per slot of every ring.
pub const RING_SLOT_SIZE: u64 = 64;

/// Block operations for [`BlockRequest::op`].
pub mod block_op {
    /// Read `len` bytes at `sector` into guest memory at `addr`.
    pub const READ: u32 = 1;
    /// Write `len` bytes from guest memory at `addr` to `sector`.
    pub const WRITE: u32 = 2;
    /// Make every completed write durable (the host calls `fdatasync`).
    pub const FLUSH: u32 = 3;
}

/// A network transmit request (64-byte slot of the `ring` of a NET device): send the
/// Ethernet frame at `addr`. The response ([`NetResponse`]) carries the bytes sent or a
/// negative status.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetTxRequest {
    /// Chosen by the guest; copied into the response.
    pub id: u64,
    /// Guest address of the frame (destination MAC first, no FCS).
    pub addr: u64,
    /// Frame length: 14 ..= 14 + mtu bytes.
    pub len: u32,
    /// Must be zero.
    pub flags: u32,
    /// Must be zero.
    pub reserved: [u64; 5],
}

/// A network receive buffer (64-byte slot of the `ring2` of a NET device): the guest
/// posts empty buffers; the host answers each with one received frame ([`NetResponse`]
/// with the frame length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetRxRequest {
    /// Chosen by the guest; copied into the response.
    pub id: u64,
    /// Guest address of the buffer (guest-writable memory).
    pub addr: u64,
    /// Capacity: at least 14 + mtu bytes.
    pub len: u32,
    /// Must be zero.
    pub flags: u32,
    /// Must be zero.
    pub reserved: [u64; 5],
}

/// Response to a [`NetTxRequest`] or [`NetRxRequest`] (64 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetResponse {
    /// The request's `id`.
    pub id: u64,
    /// Frame length (>= 0), or a negative [`status`].
    pub status: i64,
    /// Zero.
    pub reserved: [u64; 6],
}

/// A block request slot (64 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockRequest {
    /// Chosen by the guest; copied into the response.
    pub id: u64,
    /// A [`block_op`].
    pub op: u32,
    /// Must be zero.
    pub reserved: u32,
    /// First sector.
    pub sector: u64,
    /// Guest address of the data buffer (writable guest memory for reads).
    pub addr: u64,
    /// Bytes: a multiple of the sector size, at most `max_request`.
    pub len: u64,
    /// Must be zero.
    pub reserved2: [u64; 3],
}

/// A block response slot (64 bytes), written over the request it answers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockResponse {
    /// The request's `id`.
    pub id: u64,
    /// Bytes transferred (>= 0), or a negative [`status`].
    pub status: i64,
    /// Zero.
    pub reserved: [u64; 6],
}

/// Console streams for [`ConsoleWrite::stream`].
pub mod stream {
    /// Standard output.
    pub const STDOUT: u32 = 1;
    /// Standard error.
    pub const STDERR: u32 = 2;
}

/// Largest buffer one [`call::CONSOLE_WRITE`] accepts; longer writes fail with
/// [`status::BAD_LENGTH`] (the SDK splits them).
pub const CONSOLE_WRITE_MAX: u64 = 64 * 1024;
/// Largest message one [`call::ABORT`] reports; longer messages are truncated by the host.
pub const ABORT_MESSAGE_MAX: u64 = 4096;

/// Header of the console ring: a single-producer byte ring in guest memory that carries
/// console output without a VM exit per write. The guest appends records at `producer`;
/// the host copies them out at every VM exit (any hypercall, exit, crash, timeout) and on
/// [`call::CONSOLE_FLUSH`], then sets `consumer`. Indices are free-running byte counts;
/// byte `i` lives at `data[i % size]`. A record is a 3-byte header (stream as `u8`, length
/// as little-endian `u16`) followed by that many bytes; records may wrap around the end.
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

/// Arguments of [`call::FN_READY`].
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

/// Arguments of [`call::FN_RETURN`].
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

/// Arguments of [`call::HOST_CALL`].
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

/// Arguments of [`call::CONSOLE_WRITE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsoleWrite {
    /// [`stream::STDOUT`] or [`stream::STDERR`].
    pub stream: u32,
    /// Must be zero.
    pub reserved: u32,
    /// Guest address of the bytes.
    pub buf: u64,
    /// Number of bytes (at most [`CONSOLE_WRITE_MAX`]).
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
    /// Deadline in nanoseconds of the guest monotonic clock (see [`BootInfo::tsc_at_boot`]);
    /// `u64::MAX` waits for an event only. A deadline in the past returns at once.
    pub deadline_ns: u64,
}

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

/// Boot information the host writes at [`layout::BOOT_INFO_ADDR`] before entry; `rdi` holds
/// its address at entry. All pointers are guest addresses inside the boot-info region.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`] of the host.
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
    /// Guest address of the [`ConsoleRing`] header (0: no ring, use `CONSOLE_WRITE`).
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
}

impl BootInfo {
    /// An all-zero boot info (the host fills it in).
    pub const fn zeroed() -> Self {
        // SAFETY: every field is an integer or an array of integers (or of such structs):
        // all-zero bytes are a valid value.
        unsafe { core::mem::zeroed() }
    }
}

/// Exception vectors the host reports (see `docs/ABI.md`); the names printed for them.
pub fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "divide error (#DE)",
        1 => "debug exception (#DB)",
        2 => "non-maskable interrupt (NMI)",
        3 => "breakpoint (#BP)",
        4 => "overflow (#OF)",
        5 => "bound range exceeded (#BR)",
        6 => "invalid opcode (#UD)",
        7 => "device not available (#NM)",
        8 => "double fault (#DF)",
        10 => "invalid TSS (#TS)",
        11 => "segment not present (#NP)",
        12 => "stack-segment fault (#SS)",
        13 => "general protection fault (#GP)",
        14 => "page fault (#PF)",
        16 => "x87 floating-point error (#MF)",
        17 => "alignment check (#AC)",
        18 => "machine check (#MC)",
        19 => "SIMD floating-point exception (#XM)",
        20 => "virtualization exception (#VE)",
        21 => "control protection exception (#CP)",
        _ => "reserved exception",
    }
}

// Layout checks: these sizes are part of the ABI.
const _: () = assert!(core::mem::size_of::<ConsoleWrite>() == 24);
const _: () = assert!(core::mem::size_of::<Exit>() == 8);
const _: () = assert!(core::mem::size_of::<Abort>() == 16);
const _: () = assert!(core::mem::size_of::<Wait>() == 8);
const _: () = assert!(core::mem::size_of::<MemRegion>() == 24);
const _: () = assert!(core::mem::size_of::<Str>() == 16);
const _: () = assert!(core::mem::size_of::<ConsoleRing>() == 128);
const _: () = assert!(core::mem::size_of::<DeviceInfo>() == 128);
const _: () = assert!(core::mem::size_of::<FnReady>() == 32);
const _: () = assert!(core::mem::size_of::<FnCall>() == 16);
const _: () = assert!(core::mem::size_of::<FnReturn>() == 24);
const _: () = assert!(core::mem::size_of::<HostCall>() == 48);
const _: () = assert!(core::mem::size_of::<DeviceNote>() == 36);
const _: () = assert!(core::mem::size_of::<RingHeader>() as u64 == RING_SLOTS_OFFSET);
const _: () = assert!(core::mem::size_of::<BlockRequest>() as u64 == RING_SLOT_SIZE);
const _: () = assert!(core::mem::size_of::<BlockResponse>() as u64 == RING_SLOT_SIZE);
const _: () = assert!(core::mem::size_of::<NetTxRequest>() as u64 == RING_SLOT_SIZE);
const _: () = assert!(core::mem::size_of::<NetRxRequest>() as u64 == RING_SLOT_SIZE);
const _: () = assert!(core::mem::size_of::<NetResponse>() as u64 == RING_SLOT_SIZE);
const _: () =
    assert!(core::mem::size_of::<BootInfo>() == 184 + 24 * MAX_REGIONS + 128 * MAX_DEVICES);

// With the `vm-memory` feature (the host's), the structs can be read from and written to
// guest memory through vm-memory's checked accessors.
#[cfg(feature = "vm-memory")]
mod byte_valued {
    use super::*;
    // SAFETY: all of these are `#[repr(C)]` plain old data with explicit padding fields, no
    // references and no invalid bit patterns.
    unsafe impl vm_memory::ByteValued for ConsoleWrite {}
    unsafe impl vm_memory::ByteValued for Exit {}
    unsafe impl vm_memory::ByteValued for Abort {}
    unsafe impl vm_memory::ByteValued for Wait {}
    unsafe impl vm_memory::ByteValued for MemRegion {}
    unsafe impl vm_memory::ByteValued for Str {}
    unsafe impl vm_memory::ByteValued for BootInfo {}
    unsafe impl vm_memory::ByteValued for ConsoleRing {}
    unsafe impl vm_memory::ByteValued for DeviceInfo {}
    unsafe impl vm_memory::ByteValued for FnReady {}
    unsafe impl vm_memory::ByteValued for FnCall {}
    unsafe impl vm_memory::ByteValued for FnReturn {}
    unsafe impl vm_memory::ByteValued for HostCall {}
    unsafe impl vm_memory::ByteValued for DeviceNote {}
    unsafe impl vm_memory::ByteValued for RingHeader {}
    unsafe impl vm_memory::ByteValued for BlockRequest {}
    unsafe impl vm_memory::ByteValued for BlockResponse {}
    unsafe impl vm_memory::ByteValued for NetTxRequest {}
    unsafe impl vm_memory::ByteValued for NetRxRequest {}
    unsafe impl vm_memory::ByteValued for NetResponse {}
}
