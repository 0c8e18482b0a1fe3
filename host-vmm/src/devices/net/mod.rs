//! The network device back end: a TAP interface served over two shared rings.
//!
//! The guest transmits by posting frames on the transmit ring; the I/O thread copies each
//! frame out of guest memory once, checks its length, and writes it to the TAP device. The
//! guest keeps the receive ring stocked with empty buffers; the I/O thread reads each
//! frame from the TAP device straight into the next posted buffer. Frames that are too
//! long, too short, or point outside the guest's memory are dropped and counted, never
//! forwarded half-read. With no receive buffer posted, frames wait in the kernel's TAP
//! queue (and the kernel drops them when it is full), and the host asks the guest to ring
//! the doorbell when it posts more.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use pvrun_abi::{NetResponse, NetRxRequest, NetTxRequest, status};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::ring::{Ring, RingError};
use super::{DeviceStats, Notify};
use crate::error::Error;
use crate::memory::{MemoryMap, UserMemory};

/// Default MTU (largest IP packet).
pub const DEFAULT_MTU: u32 = 1500;
/// Ethernet header bytes before the IP packet.
pub const ETH_HEADER: u32 = 14;

/// A `--net NAME=tap:IFNAME[,mac=..][,ip=A.B.C.D/N][,gw=A.B.C.D][,mtu=N]` option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The device name the guest looks up.
    pub name: String,
    /// The TAP interface.
    pub tap: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// Static IPv4 address and prefix length (None: the guest uses DHCP).
    pub ip: Option<([u8; 4], u8)>,
    /// IPv4 gateway.
    pub gateway: Option<[u8; 4]>,
    /// MTU.
    pub mtu: u32,
}

fn parse_ipv4(s: &str) -> Result<[u8; 4], String> {
    let a: std::net::Ipv4Addr = s
        .parse()
        .map_err(|_| format!("`{s}` is not an IPv4 address"))?;
    Ok(a.octets())
}

impl NetConfig {
    /// Parses `NAME=tap:IFNAME[,mac=..][,ip=A.B.C.D/N][,gw=A.B.C.D][,mtu=N]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}` is not NAME=tap:IFNAME[,mac=..][,ip=..][,gw=..]"))?;
        super::block::check_device_name(name)?;
        let mut parts = rest.split(',');
        let tap = parts
            .next()
            .and_then(|t| t.strip_prefix("tap:"))
            .filter(|t| !t.is_empty() && t.len() < 16)
            .ok_or_else(|| format!("network `{name}` needs `tap:IFNAME` (an interface name of at most 15 characters)"))?;
        let mut cfg = NetConfig {
            name: name.to_string(),
            tap: tap.to_string(),
            mac: random_mac(),
            ip: None,
            gateway: None,
            mtu: DEFAULT_MTU,
        };
        for p in parts {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| format!("`{p}` is not KEY=VALUE"))?;
            match k {
                "mac" => {
                    let b: Vec<u8> = v
                        .split(':')
                        .map(|x| u8::from_str_radix(x, 16))
                        .collect::<Result<_, _>>()
                        .map_err(|_| format!("`{v}` is not a MAC address"))?;
                    cfg.mac = b
                        .try_into()
                        .map_err(|_| format!("`{v}` is not a MAC address"))?;
                }
                "ip" => {
                    let (a, n) = v
                        .split_once('/')
                        .ok_or_else(|| format!("ip `{v}` needs a prefix, e.g. 10.0.0.2/24"))?;
                    let n: u8 = n
                        .parse()
                        .ok()
                        .filter(|n| *n <= 32)
                        .ok_or_else(|| format!("bad prefix in `{v}`"))?;
                    cfg.ip = Some((parse_ipv4(a)?, n));
                }
                "gw" => cfg.gateway = Some(parse_ipv4(v)?),
                "mtu" => {
                    cfg.mtu = v
                        .parse()
                        .ok()
                        .filter(|m| (576..=9000).contains(m))
                        .ok_or_else(|| format!("mtu `{v}` must be 576..=9000"))?
                }
                _ => return Err(format!("unknown network option `{k}`")),
            }
        }
        Ok(cfg)
    }
}

/// A locally administered, unicast MAC address.
fn random_mac() -> [u8; 6] {
    let mut m = [0u8; 6];
    // SAFETY: getrandom writes at most 6 bytes into the array.
    unsafe { libc::getrandom(m.as_mut_ptr().cast(), 6, 0) };
    m[0] = (m[0] & 0xfe) | 0x02;
    m
}

/// An opened TAP interface.
pub struct Tap {
    file: File,
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

impl Tap {
    /// Opens TAP interface `name` (without packet-information headers, non-blocking).
    pub fn open(cfg: &NetConfig) -> Result<Tap, Error> {
        let fail = |why: String| Error::Net {
            name: cfg.name.clone(),
            tap: cfg.tap.clone(),
            why,
        };
        let create = format!(
            "create it with `sudo ip tuntap add dev {0} mode tap user $USER && sudo ip link set {0} up`",
            cfg.tap
        );
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    fail("/dev/net/tun does not exist (load the `tun` kernel module)".into())
                }
                std::io::ErrorKind::PermissionDenied => {
                    fail(format!("no permission to open /dev/net/tun; {create}"))
                }
                _ => fail(format!("cannot open /dev/net/tun: {e}")),
            })?;
        #[repr(C)]
        struct IfReq {
            name: [u8; 16],
            flags: libc::c_short,
            pad: [u8; 22],
        }
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            pad: [0; 22],
        };
        req.name[..cfg.tap.len()].copy_from_slice(cfg.tap.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq-sized struct we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => {
                    fail(format!("no permission to use it; {create}"))
                }
                Some(libc::EBUSY) => fail("it is in use by another program".into()),
                Some(libc::EINVAL) => fail("it exists but is not a TAP device".into()),
                _ => fail(format!("cannot attach: {e}")),
            });
        }
        Ok(Tap { file })
    }
}

/// The I/O thread of one network device.
pub struct NetWorker {
    /// Device name.
    pub name: String,
    /// The TAP interface.
    pub tap: Tap,
    /// The transmit ring.
    pub tx: Ring,
    /// The receive ring.
    pub rx: Ring,
    /// MTU.
    pub mtu: u32,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// What the guest may access.
    pub map: MemoryMap,
    /// The doorbell.
    pub doorbell: Arc<EventFd>,
    /// Set to end the thread.
    pub stop: Arc<AtomicBool>,
    /// Wakes a waiting guest.
    pub notify: Arc<Notify>,
    /// Counters.
    pub stats: Arc<DeviceStats>,
}

impl NetWorker {
    /// Serves both rings until stopped; a corrupted ring is reported once and abandoned.
    pub fn run(mut self) {
        crate::seccomp::confine_io_thread();
        let mut frame = vec![0u8; (ETH_HEADER + self.mtu) as usize];
        let mut rx_waiting = false;
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.doorbell.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.tap.file.as_raw_fd(),
                    // Only listen to the TAP device while there are buffers to receive into.
                    events: if rx_waiting { 0 } else { libc::POLLIN },
                    revents: 0,
                },
            ];
            // SAFETY: poll on two descriptors we own, with valid pollfds.
            unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            if fds[0].revents & libc::POLLIN != 0 {
                if let Ok(n) = self.doorbell.read() {
                    self.stats.doorbells.fetch_add(n, Ordering::Relaxed);
                }
                rx_waiting = false;
            }
            self.stats.wakeups.fetch_add(1, Ordering::Relaxed);
            let r = self
                .transmit(&mut frame)
                .and_then(|_| self.receive().map(|waiting| rx_waiting = waiting));
            if let Err(e) = r {
                self.tx.mark_broken(&self.mem);
                self.rx.mark_broken(&self.mem);
                self.notify.signal();
                eprintln!("pvrun: device `{}` broken: {}", self.name, e.0);
                while !self.stop.load(Ordering::SeqCst) {
                    let mut pfd = libc::pollfd {
                        fd: self.doorbell.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: as above.
                    unsafe { libc::poll(&mut pfd, 1, -1) };
                    let _ = self.doorbell.read();
                }
                return;
            }
        }
    }

    /// Sends every posted frame; copies each out of guest memory once.
    fn transmit(&mut self, frame: &mut [u8]) -> Result<(), RingError> {
        loop {
            let n = self.tx.pending(&self.mem)?;
            if n == 0 {
                if self.tx.idle_check(&self.mem)? {
                    continue;
                }
                return Ok(());
            }
            for _ in 0..n {
                let req: NetTxRequest = self.tx.take(&self.mem)?;
                let status = self.send_one(&req, frame);
                if status < 0 {
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
                self.tx.respond(
                    &self.mem,
                    NetResponse {
                        id: req.id,
                        status,
                        reserved: [0; 6],
                    },
                );
            }
            self.stats.requests.fetch_add(n as u64, Ordering::Relaxed);
            self.tx.publish(&self.mem);
            self.notify.signal();
        }
    }

    fn send_one(&self, req: &NetTxRequest, frame: &mut [u8]) -> i64 {
        if req.flags != 0 || req.reserved != [0; 5] {
            return status::BAD_ARGUMENT;
        }
        let len = req.len as usize;
        if len < ETH_HEADER as usize || len > frame.len() {
            return status::BAD_LENGTH;
        }
        let range = match self.map.check_user(req.addr, len as u64, false) {
            Ok(r) => r,
            Err(e) => return e.status(),
        };
        // One private copy: the guest cannot change the frame while it is being sent.
        if let Err(e) = self.mem.read_user(&range, &mut frame[..len]) {
            return e.status();
        }
        // SAFETY: write from our own buffer to our own descriptor.
        let w = unsafe { libc::write(self.tap.file.as_raw_fd(), frame.as_ptr().cast(), len) };
        if w < 0 {
            // A full TAP queue or a down interface loses the frame, as a real link would.
            return status::IO_ERROR;
        }
        w as i64
    }

    /// Receives frames into posted buffers until the TAP device is empty or the buffers
    /// run out; returns true when it stopped for lack of buffers.
    fn receive(&mut self) -> Result<bool, RingError> {
        let mut received = 0u64;
        let waiting = loop {
            if self.rx.pending(&self.mem)? == 0 {
                // Ask the guest to ring when it posts buffers, then look once more.
                if self.rx.idle_check(&self.mem)? {
                    continue;
                }
                break true;
            }
            // Look at the next buffer without consuming it: it stays posted if no frame
            // is waiting. This one copy of the slot is the one acted on.
            let req: NetRxRequest = self.rx.peek(&self.mem)?;
            let status = match self.receive_one(&req) {
                None => break false,
                Some(s) => s,
            };
            self.rx.advance();
            self.rx.respond(
                &self.mem,
                NetResponse {
                    id: req.id,
                    status,
                    reserved: [0; 6],
                },
            );
            received += 1;
            if received.is_multiple_of(32) {
                self.rx.publish(&self.mem);
                self.notify.signal();
            }
        };
        if received > 0 {
            self.stats.requests.fetch_add(received, Ordering::Relaxed);
            self.rx.publish(&self.mem);
            self.notify.signal();
        }
        Ok(waiting)
    }

    /// Reads one frame into the guest buffer of `req`: its length, a negative status for
    /// a bad buffer, or `None` when no frame is waiting.
    fn receive_one(&self, req: &NetRxRequest) -> Option<i64> {
        let cap = req.len as u64;
        if req.flags != 0 || req.reserved != [0; 5] {
            return Some(status::BAD_ARGUMENT);
        }
        if cap < (ETH_HEADER + self.mtu) as u64 {
            return Some(status::BAD_LENGTH);
        }
        // The kernel writes the frame straight into guest memory the guest may write.
        let Ok(range) = self.map.check_user(req.addr, cap, true) else {
            return Some(status::BAD_ADDRESS);
        };
        let Ok(slice) = self.mem.user_slice(&range) else {
            return Some(status::BAD_ADDRESS);
        };
        let guard = slice.ptr_guard_mut();
        // SAFETY: [ptr, ptr+cap) is the validated guest slice.
        let r = unsafe {
            libc::read(
                self.tap.file.as_raw_fd(),
                guard.as_ptr().cast(),
                cap as usize,
            )
        };
        if r < 0 { None } else { Some(r as i64) }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}
