//! The boot-info block: what the guest learns from the host before its first instruction
//! (ABI version, memory map, heap and stack, argv, environment, clock calibration, a random
//! seed, feature bits), written into the user read-only region at [`BOOT_INFO_ADDR`].

use pvrun_abi::{BOOT_INFO_MAGIC, BootInfo, DeviceInfo, MAX_REGIONS, MemRegion, Str};
use vm_memory::{Bytes, GuestAddress};

use crate::error::Error;
use crate::layout::{
    BOOT_INFO_ADDR, BOOT_INFO_END, CONSOLE_DATA_ADDR, CONSOLE_DATA_SIZE, CONSOLE_RING_ADDR,
};
use crate::memory::{GuestRam, MemoryMap};

/// Clock calibration and other per-boot facts.
pub struct BootFacts {
    /// TSC ticks per second.
    pub tsc_hz: u64,
    /// Guest TSC at the boot instant.
    pub tsc_at_boot: u64,
    /// Wall clock at the boot instant (ns since the UNIX epoch).
    pub wall_ns_at_boot: u64,
    /// Feature bits.
    pub features: u64,
    /// The ABI version the guest was built for (its ELF note).
    pub abi_version: u32,
}

/// Bump allocator over the boot-info region, after the fixed struct.
struct Area {
    bytes: Vec<u8>,
}

impl Area {
    fn addr(&self) -> u64 {
        BOOT_INFO_ADDR + self.bytes.len() as u64
    }
    fn align8(&mut self) {
        while !self.bytes.len().is_multiple_of(8) {
            self.bytes.push(0);
        }
    }
    /// Appends strings and then their [`Str`] table; returns the table's address.
    fn strings<'a>(&mut self, items: impl Iterator<Item = &'a [u8]> + Clone) -> u64 {
        let mut table = Vec::new();
        for s in items {
            table.push(Str {
                ptr: self.addr(),
                len: s.len() as u64,
            });
            self.bytes.extend_from_slice(s);
        }
        self.align8();
        let at = self.addr();
        for t in table {
            self.bytes.extend_from_slice(&t.ptr.to_le_bytes());
            self.bytes.extend_from_slice(&t.len.to_le_bytes());
        }
        at
    }
}

/// The heap and stack ranges, as `(start, end)`.
pub struct Ranges {
    /// The heap.
    pub heap: (u64, u64),
    /// The stack.
    pub stack: (u64, u64),
}

/// Writes boot info for the given map, heap, stack, argv and environment.
pub fn write(
    ram: &GuestRam,
    map: &MemoryMap,
    ranges: Ranges,
    args: &[String],
    env: &[(String, String)],
    devices: &[DeviceInfo],
    facts: &BootFacts,
) -> Result<(), Error> {
    let mut info = BootInfo::zeroed();
    info.magic = BOOT_INFO_MAGIC;
    // The guest's own version (3 or 4): the boot info is the same in both, and a v3
    // guest's SDK refuses any other number.
    info.abi_version = facts.abi_version;
    info.size = size_of::<BootInfo>() as u32;
    info.features = facts.features;
    info.mem_size = ram.size();
    let Ranges { heap, stack } = ranges;
    info.heap_start = heap.0;
    info.heap_len = heap.1 - heap.0;
    info.stack_start = stack.0;
    info.stack_len = stack.1 - stack.0;
    info.tsc_hz = facts.tsc_hz;
    info.tsc_at_boot = facts.tsc_at_boot;
    info.wall_ns_at_boot = facts.wall_ns_at_boot;
    info.console_ring = CONSOLE_RING_ADDR;
    info.console_data = CONSOLE_DATA_ADDR;
    info.console_size = CONSOLE_DATA_SIZE;
    fill_random(&mut info.random_seed)?;
    info.generation = 1;
    fill_random(&mut info.generation_seed)?;
    let count = map.user_regions().count();
    if count > MAX_REGIONS {
        return Err(Error::Config(format!(
            "the guest's memory map has {count} regions, but boot info lists at most {MAX_REGIONS}: the guest ELF has too many segments (link it with the SDK's linker script)"
        )));
    }
    let mut n = 0;
    for r in map.user_regions() {
        info.regions[n] = MemRegion {
            start: r.start,
            len: r.end - r.start,
            kind: r.kind,
            flags: r.perm,
        };
        n += 1;
    }
    info.region_count = n as u32;
    for (slot, d) in info.devices.iter_mut().zip(devices) {
        *slot = *d;
    }
    info.device_count = devices.len().min(info.devices.len()) as u32;

    let mut area = Area {
        bytes: vec![0u8; size_of::<BootInfo>()],
    };
    info.argc = args.len() as u64;
    info.argv = area.strings(args.iter().map(|a| a.as_bytes()));
    let env_strings: Vec<Vec<u8>> = env
        .iter()
        .map(|(k, v)| format!("{k}={v}").into_bytes())
        .collect();
    info.envc = env_strings.len() as u64;
    info.envp = area.strings(env_strings.iter().map(|e| e.as_slice()));
    let total = area.bytes.len() as u64;
    if BOOT_INFO_ADDR + total > BOOT_INFO_END {
        return Err(Error::ArgsTooLarge(total));
    }
    // SAFETY-free: BootInfo is ByteValued (repr(C), no padding holes).
    area.bytes[..size_of::<BootInfo>()].copy_from_slice(vm_memory::ByteValued::as_slice(&info));
    ram.mem()
        .write_slice(&area.bytes, GuestAddress(BOOT_INFO_ADDR))
        .map_err(|e| Error::Layout(format!("cannot write boot info: {e}")))?;
    Ok(())
}

/// Fills `buf` from the kernel's CSPRNG.
pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), Error> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: getrandom writes at most `buf.len() - done` bytes into the rest of `buf`.
        let got = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Io(e));
        }
        done += got as usize;
    }
    Ok(())
}

/// The next VM generation of this process (boot is 1).
static NEXT_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(2);

/// Where a VM's fresh generation seeds come from: ChaCha20 (`rand_chacha`, the rand
/// project's implementation) keyed once per VM from the kernel's CSPRNG, on its first use.
/// Every seed is the next 32 bytes of that VM's keystream, so seeds never repeat (within a
/// VM: one stream; across VMs: independent keys), and a reset costs no system call.
#[derive(Default)]
pub(crate) struct Entropy(Option<rand_chacha::ChaCha20Rng>);

impl Entropy {
    /// Fills `buf` with the next bytes of the stream, keying it first if needed.
    pub fn fill(&mut self, buf: &mut [u8]) -> Result<(), Error> {
        use rand_chacha::rand_core::{RngCore, SeedableRng};
        let rng = match &mut self.0 {
            Some(rng) => rng,
            None => {
                let mut key = [0u8; 32];
                fill_random(&mut key)?;
                self.0.insert(rand_chacha::ChaCha20Rng::from_seed(key))
            }
        };
        rng.fill_bytes(buf);
        Ok(())
    }
}

/// Gives the guest a new VM generation and seed (after a reset to a snapshot, or in a new
/// VM made from one), the seed drawn from `entropy`.
pub(crate) fn new_generation(ram: &GuestRam, entropy: &mut Entropy) -> Result<u64, Error> {
    let generation = NEXT_GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut seed = [0u8; 32];
    entropy.fill(&mut seed)?;
    let base = BOOT_INFO_ADDR;
    let mem = ram.mem();
    mem.write_obj(
        seed,
        GuestAddress(base + std::mem::offset_of!(BootInfo, generation_seed) as u64),
    )
    .and_then(|_| {
        mem.write_obj(
            generation,
            GuestAddress(base + std::mem::offset_of!(BootInfo, generation) as u64),
        )
    })
    .map_err(|e| Error::Layout(format!("cannot write the VM generation: {e}")))?;
    Ok(generation)
}
