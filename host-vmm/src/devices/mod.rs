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
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use pvrun_abi::layout::{DEVICE_AREA_ADDR, DEVICE_AREA_END, PAGE_SIZE};
use pvrun_abi::{DeviceInfo, HYPERCALL_PORT_BASE, RING_SLOT_SIZE, RING_SLOTS_OFFSET, call, device};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

pub(crate) mod block;
pub(crate) mod net;
pub(crate) mod ring;
pub(crate) mod worker;

use crate::error::Error;
use crate::layout::align_up;
use crate::memory::MemoryMap;
use block::{BlockService, Disk, DiskConfig, MAX_REQUEST, SECTOR_SIZE};
use net::{NetConfig, NetService, Tap};
use ring::Ring;
pub(crate) use worker::Notify;
pub use worker::{DeviceCounters, DeviceStats};
use worker::{DeviceCtx, IoWorker, Service};

/// Slots per ring.
pub const RING_SLOTS: u32 = 256;
/// Bytes of guest memory per ring (header and slots, page aligned).
pub const RING_BYTES: u64 =
    (RING_SLOTS_OFFSET + RING_SLOTS as u64 * RING_SLOT_SIZE).next_multiple_of(PAGE_SIZE);

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
    Net(Tap, NetConfig),
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
        // Configurations built in code skip the option parsers: check names here too
        // (they are copied into the 32-byte `DeviceInfo::name` and printed in reports).
        worker::check_device_name(name).map_err(Error::Config)?;
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
        tracing::debug!(
            name = %cfg.name,
            path = %cfg.path.display(),
            bytes = disk.capacity,
            read_only = disk.read_only,
            ring = format_args!("{:#x}", info.ring),
            doorbell = format_args!("{:#x}", doorbell_port(info.index)),
            "block device"
        );
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
        tracing::debug!(
            name = %cfg.name,
            tap = %crate::output::escape_controls(&cfg.tap),
            mtu = cfg.mtu,
            tx_ring = format_args!("{:#x}", info.ring),
            rx_ring = format_args!("{:#x}", info.ring2),
            doorbell = format_args!("{:#x}", doorbell_port(info.index)),
            "network device"
        );
        infos.push(info);
        backends.push((cfg.name.clone(), Backend::Net(tap, cfg.clone())));
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
            let doorbell = Arc::new(new_doorbell().map_err(Error::Io)?);
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
            let dev = DeviceCtx {
                name: name.clone(),
                mem: mem.clone(),
                map: map.clone(),
                notify: notify.clone(),
                stats: stats.clone(),
            };
            let thread = match backend {
                Backend::Block(disk) => {
                    let ring = Ring::new(mem, info.ring, info.slots);
                    spawn("blk", &doorbell, &stop, dev, BlockService { disk, ring })
                }
                Backend::Net(tap, cfg) => {
                    let tx = Ring::new(mem, info.ring, info.slots);
                    let rx = Ring::new(mem, info.ring2, info.slots);
                    spawn(
                        "net",
                        &doorbell,
                        &stop,
                        dev,
                        NetService::new(&cfg, tap, tx, rx),
                    )
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
            .map(|d| (d.name.clone(), d.stats.counters()))
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

/// A doorbell eventfd: non-blocking, and closed in programs the host starts (a `pvrun`
/// embedded in a larger program must not leak a guest's doorbells into its children).
fn new_doorbell() -> std::io::Result<EventFd> {
    EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)
}

/// Starts the I/O thread `pvrun-KIND-NAME` serving `service`.
fn spawn<S: Service>(
    kind: &str,
    doorbell: &Arc<EventFd>,
    stop: &Arc<AtomicBool>,
    dev: DeviceCtx,
    service: S,
) -> std::io::Result<JoinHandle<()>> {
    let worker = IoWorker {
        doorbell: doorbell.clone(),
        stop: stop.clone(),
        dev,
        service,
    };
    std::thread::Builder::new()
        .name(format!("pvrun-{kind}-{}", worker.dev.name))
        .spawn(move || worker.run())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn bad_device_names_are_refused_before_anything_is_opened() {
        for name in ["x".repeat(40), "a\nb".into(), String::new()] {
            let disk = DiskConfig {
                name: name.clone(),
                path: "/nonexistent/image".into(),
                read_only: true,
            };
            match plan(&[disk], &[]) {
                Err(Error::Config(e)) => {
                    assert!(e.contains("device name"), "{e}");
                    assert!(!e.chars().any(|c| c.is_control()), "{e:?}");
                }
                Err(e) => panic!("{name:?}: {e}"),
                Ok(_) => panic!("{name:?} accepted"),
            }
        }
        let mut net = NetConfig::parse("eth0=tap:tap0").unwrap();
        net.tap = "a-very-long-interface-name".into();
        assert!(matches!(plan(&[], &[net]), Err(Error::Net { .. })));
    }

    #[test]
    fn doorbells_are_close_on_exec_and_non_blocking() {
        let fd = new_doorbell().unwrap();
        // SAFETY: fcntl queries on a descriptor we own.
        let (fd_flags, fl_flags) = unsafe {
            (
                libc::fcntl(fd.as_raw_fd(), libc::F_GETFD),
                libc::fcntl(fd.as_raw_fd(), libc::F_GETFL),
            )
        };
        assert!(fd_flags & libc::FD_CLOEXEC != 0, "{fd_flags:#x}");
        assert!(fl_flags & libc::O_NONBLOCK != 0, "{fl_flags:#x}");
    }
}
