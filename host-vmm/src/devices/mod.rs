//! Attached devices: where their rings live in guest memory, how the guest's doorbells
//! reach them, and the I/O threads that serve them.
//!
//! Each device gets a ring in the device area and a doorbell port. The doorbell is
//! registered as a KVM ioeventfd, so the guest's `out` is completed inside the kernel
//! (~8.5 µs here against ~25 µs for an exit to host user space) and wakes the device's I/O
//! thread; if the kernel refuses the ioeventfd, the run loop forwards doorbell exits
//! instead. I/O threads publish responses and wake a guest sleeping in `wait` through a
//! shared [`Notify`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use pvrun_abi::layout::{DEVICE_AREA_ADDR, DEVICE_AREA_END, PAGE_SIZE};
use pvrun_abi::{
    BlockRequest, DeviceInfo, HYPERCALL_PORT_BASE, RING_SLOT_SIZE, RING_SLOTS_OFFSET, call, device,
};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub(crate) mod block;
pub(crate) mod net;
pub(crate) mod ring;

use crate::error::Error;
use crate::layout::align_up;
use crate::memory::MemoryMap;
use block::{Disk, DiskConfig, MAX_REQUEST, SECTOR_SIZE};
use net::{NetConfig, NetWorker, Tap};
use ring::Ring;

/// Slots per ring.
pub const RING_SLOTS: u32 = 256;
/// Bytes of guest memory per ring (header and slots, page aligned).
pub const RING_BYTES: u64 =
    (RING_SLOTS_OFFSET + RING_SLOTS as u64 * RING_SLOT_SIZE).next_multiple_of(PAGE_SIZE);

pub(crate) use crate::runtime::notify::Notify;

/// Counters of one device, for benchmarks and reports.
#[derive(Default)]
pub struct DeviceStats {
    /// Doorbells the guest rang.
    pub doorbells: AtomicU64,
    /// Requests served.
    pub requests: AtomicU64,
    /// Times the I/O thread woke up.
    pub wakeups: AtomicU64,
    /// Requests refused and dropped (network frames with a bad length or address).
    pub dropped: AtomicU64,
}

/// A snapshot of [`DeviceStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceCounters {
    /// Doorbells the guest rang.
    pub doorbells: u64,
    /// Requests served.
    pub requests: u64,
    /// Times the I/O thread woke up.
    pub wakeups: u64,
    /// Requests refused and dropped (network frames with a bad length or address).
    pub dropped: u64,
}

struct Running {
    name: String,
    doorbell: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<DeviceStats>,
}

/// The devices of one VM. Dropping it stops and joins the I/O threads, which must happen
/// before the guest memory goes away (the `Vm` field order guarantees it).
#[derive(Default)]
pub struct Devices {
    running: Vec<Running>,
    /// True when doorbells are KVM ioeventfds (false: the run loop forwards them).
    pub ioeventfd: bool,
}

/// An opened back end.
enum Backend {
    Block(Disk),
    Net(Tap, u32),
}

/// A device set up but not yet started: what goes into boot info and the memory map.
pub struct Planned {
    /// Boot-info entries.
    pub infos: Vec<DeviceInfo>,
    /// End of the used device area (page aligned), or the area start if none.
    pub area_end: u64,
    backends: Vec<(String, Backend)>,
}

/// Opens the disks and TAP interfaces and lays their rings out in the device area.
pub fn plan(disks: &[DiskConfig], nets: &[NetConfig]) -> Result<Planned, Error> {
    let mut infos = Vec::new();
    let mut backends = Vec::new();
    let mut at = DEVICE_AREA_ADDR;
    let names: Vec<&str> = disks
        .iter()
        .map(|d| d.name.as_str())
        .chain(nets.iter().map(|n| n.name.as_str()))
        .collect();
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) {
            return Err(Error::Config(format!("two devices are named `{name}`")));
        }
    }
    // Reserves `rings` rings in the device area for the next device and fills in what
    // every device has; the caller adds the kind-specific facts.
    let mut next = |infos: &[DeviceInfo], name: &str, kind: u32, rings: u64| {
        if infos.len() >= pvrun_abi::MAX_DEVICES || at + rings * RING_BYTES > DEVICE_AREA_END {
            return Err(Error::Config(format!(
                "too many devices (at most {}, and their rings must fit in the device area)",
                pvrun_abi::MAX_DEVICES
            )));
        }
        let mut info = DeviceInfo::zeroed();
        info.name[..name.len()].copy_from_slice(name.as_bytes());
        info.kind = kind;
        info.index = infos.len() as u32;
        info.ring = at;
        if rings > 1 {
            info.ring2 = at + RING_BYTES;
        }
        info.slots = RING_SLOTS;
        info.slot_size = RING_SLOT_SIZE as u32;
        at += rings * RING_BYTES;
        Ok(info)
    };
    for cfg in disks {
        let mut info = next(&infos, &cfg.name, device::BLOCK, 1)?;
        let disk = Disk::open(cfg)?;
        if disk.read_only {
            info.flags = device::FLAG_READ_ONLY;
        }
        info.sector_size = SECTOR_SIZE as u32;
        info.capacity = disk.capacity;
        info.max_request = MAX_REQUEST;
        infos.push(info);
        backends.push((cfg.name.clone(), Backend::Block(disk)));
    }
    for cfg in nets {
        let mut info = next(&infos, &cfg.name, device::NET, 2)?;
        let tap = Tap::open(cfg)?;
        info.mac[..6].copy_from_slice(&cfg.mac);
        if let Some((ip, prefix)) = cfg.ip {
            info.ipv4 = ip;
            info.prefix_len = prefix as u32;
        }
        info.gateway = cfg.gateway.unwrap_or([0; 4]);
        info.mtu = cfg.mtu;
        infos.push(info);
        backends.push((cfg.name.clone(), Backend::Net(tap, cfg.mtu)));
    }
    Ok(Planned {
        infos,
        area_end: align_up(at, PAGE_SIZE).unwrap_or(at),
        backends,
    })
}

/// The doorbell port of device `index`.
pub fn doorbell_port(index: u32) -> u16 {
    HYPERCALL_PORT_BASE + call::DOORBELL_BASE + index as u16
}

impl Devices {
    /// Starts the planned devices: initialises rings, registers doorbells, starts threads.
    pub fn start(
        planned: Planned,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        map: &MemoryMap,
        notify: &Arc<Notify>,
        use_ioeventfd: bool,
    ) -> Result<Devices, Error> {
        let mut devs = Devices {
            running: Vec::new(),
            ioeventfd: use_ioeventfd,
        };
        for ((name, backend), info) in planned.backends.into_iter().zip(planned.infos) {
            let doorbell = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(Error::Io)?);
            if devs.ioeventfd
                && vm
                    .register_ioevent(
                        &doorbell,
                        &IoEventAddress::Pio(doorbell_port(info.index) as u64),
                        NoDatamatch,
                    )
                    .is_err()
            {
                devs.ioeventfd = false;
            }
            let stop = Arc::new(AtomicBool::new(false));
            let stats = Arc::new(DeviceStats::default());
            let thread = match backend {
                Backend::Block(disk) => {
                    let worker = BlockWorker {
                        name: name.clone(),
                        disk,
                        ring: Ring::new(mem, info.ring, info.slots),
                        mem: mem.clone(),
                        map: map.clone(),
                        doorbell: doorbell.clone(),
                        stop: stop.clone(),
                        notify: notify.clone(),
                        stats: stats.clone(),
                    };
                    std::thread::Builder::new()
                        .name(format!("pvrun-blk-{name}"))
                        .spawn(move || worker.run())
                }
                Backend::Net(tap, mtu) => {
                    let worker = NetWorker {
                        name: name.clone(),
                        tap,
                        tx: Ring::new(mem, info.ring, info.slots),
                        rx: Ring::new(mem, info.ring2, info.slots),
                        mtu,
                        mem: mem.clone(),
                        map: map.clone(),
                        doorbell: doorbell.clone(),
                        stop: stop.clone(),
                        notify: notify.clone(),
                        stats: stats.clone(),
                    };
                    std::thread::Builder::new()
                        .name(format!("pvrun-net-{name}"))
                        .spawn(move || worker.run())
                }
            }
            .map_err(Error::Io)?;
            devs.running.push(Running {
                name,
                doorbell,
                stop,
                thread: Some(thread),
                stats,
            });
        }
        Ok(devs)
    }

    /// Forwards a doorbell that arrived as a VM exit (when ioeventfd is off). False if
    /// the port belongs to no device.
    pub fn ring_doorbell(&self, port: u16) -> bool {
        let base = doorbell_port(0);
        match port
            .checked_sub(base)
            .and_then(|i| self.running.get(i as usize))
        {
            Some(d) => {
                let _ = d.doorbell.write(1);
                true
            }
            None => false,
        }
    }

    /// Whether no device is attached.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Counters of every device, by name.
    pub fn counters(&self) -> Vec<(String, DeviceCounters)> {
        self.running
            .iter()
            .map(|d| {
                (
                    d.name.clone(),
                    DeviceCounters {
                        doorbells: d.stats.doorbells.load(Ordering::Relaxed),
                        requests: d.stats.requests.load(Ordering::Relaxed),
                        wakeups: d.stats.wakeups.load(Ordering::Relaxed),
                        dropped: d.stats.dropped.load(Ordering::Relaxed),
                    },
                )
            })
            .collect()
    }
}

impl Drop for Devices {
    fn drop(&mut self) {
        for d in &self.running {
            d.stop.store(true, Ordering::SeqCst);
            let _ = d.doorbell.write(1);
        }
        for d in &mut self.running {
            if let Some(t) = d.thread.take() {
                let _ = t.join();
            }
        }
    }
}

struct BlockWorker {
    name: String,
    disk: Disk,
    ring: Ring,
    mem: GuestMemoryMmap,
    map: MemoryMap,
    doorbell: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    notify: Arc<Notify>,
    stats: Arc<DeviceStats>,
}

impl BlockWorker {
    /// Waits for the doorbell (or a stop) without spinning.
    fn wait_doorbell(&self) {
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&*self.doorbell),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one descriptor we own, with a valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, -1) };
        if let Ok(n) = self.doorbell.read() {
            self.stats.doorbells.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn run(mut self) {
        crate::seccomp::confine_io_thread();
        loop {
            self.wait_doorbell();
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            self.stats.wakeups.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.serve() {
                // The guest corrupted its ring: stop serving it and say so once.
                self.ring.mark_broken(&self.mem);
                self.notify.signal();
                eprintln!("pvrun: device `{}` broken: {}", self.name, e.0);
                while !self.stop.load(Ordering::SeqCst) {
                    self.wait_doorbell();
                }
                return;
            }
        }
    }

    /// Serves requests until the ring is empty and the guest was told to ring again.
    fn serve(&mut self) -> Result<(), ring::RingError> {
        loop {
            let n = self.ring.pending(&self.mem)?;
            if n == 0 {
                if self.ring.idle_check(&self.mem)? {
                    continue;
                }
                return Ok(());
            }
            for _ in 0..n {
                let req: BlockRequest = self.ring.take(&self.mem)?;
                let rsp = self.disk.handle(&req, &self.mem, &self.map);
                self.ring.respond(&self.mem, rsp);
            }
            self.stats.requests.fetch_add(n as u64, Ordering::Relaxed);
            self.ring.publish(&self.mem);
            self.notify.signal();
        }
    }
}
