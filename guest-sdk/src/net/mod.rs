//! Networking: TCP and UDP sockets over the network device the host attached with
//! `pvrun --net NAME=tap:IFNAME[,mac=..][,ip=A.B.C.D/N,gw=A.B.C.D]`.
//!
//! The stack is [smoltcp](https://docs.rs/smoltcp) over a zero-copy driver for the device's
//! rings. The guest is single-threaded, so there is one stack, driven by one poll loop
//! inside the SDK: every blocking call runs it until its condition holds, and sleeps in one
//! `WAIT` hypercall when there is nothing to do (the host wakes the guest as soon as a
//! frame arrives or a transmission completes).
//!
//! It provides:
//! - [`init`] (also done lazily by the first socket call) and [`config`]: the address comes
//!   from the device (`ip=`/`gw=`), or from DHCP when the host gave none;
//! - [`TcpListener`] and [`TcpStream`], [`UdpSocket`]: blocking, `std::net`-like, with
//!   read and write timeouts;
//! - a non-blocking layer for serving many connections from one thread: `try_accept`,
//!   `try_read`, `try_write`, `try_recv_from`, and the readiness [`Poller`];
//! - [`stats`]: frame, doorbell and wait counters for benchmarks.
//!
//! ```ignore
//! use pvrun::net::{TcpListener, Poller, Interest};
//!
//! // One connection at a time, blocking:
//! let listener = TcpListener::bind(7)?;
//! loop {
//!     let (mut stream, _peer) = listener.accept()?;
//!     let mut buf = [0u8; 4096];
//!     loop {
//!         let n = stream.read(&mut buf)?;
//!         if n == 0 { break; }
//!         stream.write_all(&buf[..n])?;
//!     }
//! }
//!
//! // Many connections, one thread: register, wait, handle whatever is ready.
//! let mut poller = Poller::new();
//! poller.register(&listener, 0, Interest::READABLE);
//! let mut events = Vec::new();
//! loop {
//!     poller.wait(&mut events, None)?;
//!     for ev in &events { /* try_accept / try_read / try_write without blocking */ }
//! }
//! ```
//!
//! Only IPv4 is supported. The `try_*` calls never drive the stack; [`Poller::wait`],
//! [`poll`], [`wait`] and every blocking call do, so data written with `try_write` leaves
//! at the next of those.

mod nic;
mod poller;
mod tcp;
mod udp;

use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::fmt;
use core::time::Duration;

pub use core::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use pvrun_abi::{DeviceInfo, Wait, device};
use smoltcp::iface::{
    Config as IfaceConfig, Interface, PollIngressSingleResult, SocketHandle, SocketSet,
};
use smoltcp::socket::{Socket, dhcpv4, tcp as stcp};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Cidr};

use crate::hypercall::call;
use crate::time::monotonic_ns;

pub use nic::NicStats;
pub use poller::{Event, Interest, Pollable, Poller};
pub use tcp::{CONNECT_TIMEOUT, Shutdown, TcpListener, TcpOptions, TcpStream};
pub use udp::UdpSocket;

/// How long [`init`] waits for a DHCP lease.
pub const DHCP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a dropped connection may take to close gracefully before it is reset.
const CLOSE_TIMEOUT_NS: u64 = 30_000_000_000;
/// Heap left free when listeners make sockets for incoming connections.
const HEAP_RESERVE: usize = 4 * 1024 * 1024;
/// First port handed out for outgoing connections and unbound UDP sockets.
const EPHEMERAL_FIRST: u16 = 49152;

/// Why a network operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// No network device is attached (`pvrun --net NAME=...`), or none with that name.
    NoDevice,
    /// The host described the device inconsistently (ring outside the device area, ...).
    BadDevice,
    /// The host stopped serving the device's rings (see `pvrun: device NAME broken`).
    DeviceBroken,
    /// The interface has no IPv4 address (DHCP has not answered yet).
    NoAddress,
    /// The operation did not complete before its timeout.
    TimedOut,
    /// A non-blocking call found nothing to do.
    WouldBlock,
    /// The peer refused the connection (answered the SYN with a reset).
    ConnectionRefused,
    /// The connection was reset (by the peer, or by a timeout).
    ConnectionReset,
    /// The socket is not connected, or its sending half was shut down.
    NotConnected,
    /// Another socket is bound to this port.
    AddrInUse,
    /// An address or argument is invalid (port 0, unspecified address, not IPv4, ...).
    InvalidInput,
    /// A datagram is larger than the interface can send unfragmented.
    TooLarge,
    /// `write_all` could not write everything (the connection closed).
    WriteZero,
    /// No free local port.
    NoPorts,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Error::NoDevice => "no network device attached",
            Error::BadDevice => "the host described the network device inconsistently",
            Error::DeviceBroken => "the network device is broken",
            Error::NoAddress => "the interface has no IPv4 address",
            Error::TimedOut => "timed out",
            Error::WouldBlock => "operation would block",
            Error::ConnectionRefused => "connection refused",
            Error::ConnectionReset => "connection reset",
            Error::NotConnected => "not connected",
            Error::AddrInUse => "address in use",
            Error::InvalidInput => "invalid address or argument",
            Error::TooLarge => "datagram too large",
            Error::WriteZero => "failed to write the whole buffer",
            Error::NoPorts => "no free local port",
        })
    }
}

impl core::error::Error for Error {}

/// Result of a network operation.
pub type Result<T> = core::result::Result<T, Error>;

/// The interface configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Device name (`--net NAME=...`).
    pub device: String,
    /// MAC address.
    pub mac: [u8; 6],
    /// IPv4 address (unspecified until DHCP answers).
    pub address: Ipv4Addr,
    /// Prefix length of the local network.
    pub prefix_len: u8,
    /// Default gateway, if any.
    pub gateway: Option<Ipv4Addr>,
    /// MTU: the largest IP packet.
    pub mtu: usize,
    /// True if the address came (or is to come) from DHCP.
    pub dhcp: bool,
}

/// Counters for benchmarks: the NIC's, plus how often the stack ran and slept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Ring and frame counters.
    pub nic: NicStats,
    /// Passes of the poll loop.
    pub polls: u64,
    /// `WAIT` hypercalls (sleeps).
    pub waits: u64,
    /// smoltcp sockets: connections (also those still closing), listen backlogs, UDP.
    pub sockets: usize,
}

/// Anything that names a remote IPv4 socket address: `SocketAddr`, `SocketAddrV4`,
/// `(Ipv4Addr, u16)`, `([u8; 4], u16)`, or a string like `"10.0.0.1:80"`.
pub trait ToSocketAddr {
    /// The address, or [`Error::InvalidInput`].
    fn to_socket_addr(&self) -> Result<SocketAddrV4>;
}

impl ToSocketAddr for SocketAddrV4 {
    fn to_socket_addr(&self) -> Result<SocketAddrV4> {
        Ok(*self)
    }
}

impl ToSocketAddr for SocketAddr {
    fn to_socket_addr(&self) -> Result<SocketAddrV4> {
        match self {
            SocketAddr::V4(a) => Ok(*a),
            SocketAddr::V6(_) => Err(Error::InvalidInput),
        }
    }
}

impl ToSocketAddr for (Ipv4Addr, u16) {
    fn to_socket_addr(&self) -> Result<SocketAddrV4> {
        Ok(SocketAddrV4::new(self.0, self.1))
    }
}

impl ToSocketAddr for ([u8; 4], u16) {
    fn to_socket_addr(&self) -> Result<SocketAddrV4> {
        Ok(SocketAddrV4::new(Ipv4Addr::from(self.0), self.1))
    }
}

impl ToSocketAddr for &str {
    fn to_socket_addr(&self) -> Result<SocketAddrV4> {
        self.parse::<SocketAddrV4>()
            .map_err(|_| Error::InvalidInput)
    }
}

impl ToSocketAddr for String {
    fn to_socket_addr(&self) -> Result<SocketAddrV4> {
        self.as_str().to_socket_addr()
    }
}

impl<T: ToSocketAddr + ?Sized> ToSocketAddr for &T {
    fn to_socket_addr(&self) -> Result<SocketAddrV4> {
        (**self).to_socket_addr()
    }
}

/// A listening port: a few sockets in `Listen` (the backlog), connections in the handshake,
/// and established connections waiting for `accept`.
struct Listener {
    port: u16,
    opts: TcpOptions,
    listening: Vec<SocketHandle>,
    handshaking: Vec<SocketHandle>,
    ready: VecDeque<SocketHandle>,
}

/// The one network stack of the guest.
pub(crate) struct Stack {
    iface: Interface,
    sockets: SocketSet<'static>,
    nic: nic::Nic,
    dhcp: Option<SocketHandle>,
    config: Config,
    /// TCP streams and UDP sockets owned by user objects, by object id.
    socks: BTreeMap<u64, SocketHandle>,
    /// Listeners owned by [`TcpListener`]s, by object id.
    listeners: BTreeMap<u64, Listener>,
    /// Dropped connections still closing, with the deadline after which they are reset.
    closing: Vec<(SocketHandle, u64)>,
    next_id: u64,
    next_port: u16,
    polls: u64,
    waits: u64,
}

/// The stack's cell: the guest is single-threaded and has no interrupts, and nothing
/// re-enters the SDK while the stack is borrowed.
struct Global(RefCell<Option<core::result::Result<Stack, Error>>>);

// SAFETY: pvrun guests have exactly one thread and no interrupts or signals, so the cell is
// never accessed concurrently.
unsafe impl Sync for Global {}

static STACK: Global = Global(RefCell::new(None));

/// smoltcp's timestamp for the guest monotonic clock.
fn now() -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros((monotonic_ns() / 1000) as i64)
}

/// Deadline in monotonic ns for a timeout (`None`: never).
fn deadline(timeout: Option<Duration>) -> u64 {
    match timeout {
        Some(t) => monotonic_ns().saturating_add(t.as_nanos().min(u64::MAX as u128) as u64),
        None => u64::MAX,
    }
}

/// Runs `f` on the stack, setting it up on first use (without waiting for DHCP).
pub(crate) fn with<R>(f: impl FnOnce(&mut Stack) -> Result<R>) -> Result<R> {
    let mut g = STACK.0.borrow_mut();
    if g.is_none() {
        *g = Some(Stack::new(None));
    }
    match g.as_mut() {
        Some(Ok(stack)) => f(stack),
        Some(Err(e)) => Err(*e),
        None => Err(Error::NoDevice),
    }
}

/// Runs `f` on the stack until it returns `Some`, driving the network and sleeping in
/// between; fails with [`Error::TimedOut`] once `timeout` has passed.
pub(crate) fn block<R>(
    timeout: Option<Duration>,
    mut f: impl FnMut(&mut Stack) -> Option<Result<R>>,
) -> Result<R> {
    let deadline = deadline(timeout);
    with(|s| {
        if let Some(r) = f(s) {
            return r;
        }
        loop {
            s.poll();
            if let Some(r) = f(s) {
                return r;
            }
            if s.nic.is_broken() {
                return Err(Error::DeviceBroken);
            }
            if monotonic_ns() >= deadline {
                return Err(Error::TimedOut);
            }
            s.sleep(deadline);
        }
    })
}

/// Sets up the network on the first network device and waits (up to [`DHCP_TIMEOUT`]) until
/// it has an address; returns the configuration. Later calls return the configuration.
pub fn init() -> Result<Config> {
    wait_configured(Some(DHCP_TIMEOUT))
}

/// Sets up the network on the network device named `name` (instead of the first one) and
/// waits up to `timeout` for an address. Fails if the stack already runs on a device.
pub fn init_device(name: &str, timeout: Option<Duration>) -> Result<Config> {
    {
        let mut g = STACK.0.borrow_mut();
        match g.as_ref() {
            None => *g = Some(Stack::new(Some(name))),
            Some(Ok(s)) if s.config.device == name => {}
            Some(Ok(_)) => return Err(Error::InvalidInput),
            Some(Err(e)) => return Err(*e),
        }
    }
    wait_configured(timeout)
}

/// Waits until the interface has an IPv4 address (at once with a static address).
pub fn wait_configured(timeout: Option<Duration>) -> Result<Config> {
    block(timeout, |s| {
        (!s.config.address.is_unspecified()).then(|| Ok(s.config.clone()))
    })
    .map_err(|e| {
        if e == Error::TimedOut {
            Error::NoAddress
        } else {
            e
        }
    })
}

/// The current configuration (setting up the stack if needed, without waiting).
pub fn config() -> Result<Config> {
    with(|s| Ok(s.config.clone()))
}

/// Runs the stack once without sleeping: receives, processes timers, transmits.
pub fn poll() -> Result<()> {
    with(|s| {
        s.poll();
        Ok(())
    })
}

/// Runs the stack, sleeping until something happens on the network or `timeout` passes.
/// Returns true if the state of some socket may have changed.
pub fn wait(timeout: Option<Duration>) -> Result<bool> {
    let deadline = deadline(timeout);
    with(|s| {
        if s.poll() {
            return Ok(true);
        }
        s.sleep(deadline);
        Ok(s.poll())
    })
}

/// The counters so far (zero before the stack is set up).
pub fn stats() -> Stats {
    with(|s| {
        Ok(Stats {
            nic: s.nic.stats(),
            polls: s.polls,
            waits: s.waits,
            sockets: s.sockets.iter().count() - s.dhcp.is_some() as usize,
        })
    })
    .unwrap_or_default()
}

/// The first network device, or the one named `name`.
fn find_device(name: Option<&str>) -> Option<&'static DeviceInfo> {
    let bi = crate::boot_info();
    let n = (bi.device_count as usize).min(bi.devices.len());
    bi.devices[..n]
        .iter()
        .find(|d| d.kind == device::NET && name.is_none_or(|n| d.name() == n))
}

/// A new TCP socket with the buffer sizes and options of `opts`.
fn new_tcp(opts: &TcpOptions) -> stcp::Socket<'static> {
    let mut s = stcp::Socket::new(
        stcp::SocketBuffer::new(vec![0u8; opts.rx_buffer.max(1024)]),
        stcp::SocketBuffer::new(vec![0u8; opts.tx_buffer.max(1024)]),
    );
    s.set_nagle_enabled(!opts.nodelay);
    s.set_keep_alive(opts.keep_alive.map(Into::into));
    s
}

impl Stack {
    /// Sets up the stack on network device `name` (or the first one).
    fn new(name: Option<&str>) -> core::result::Result<Stack, Error> {
        let dev = find_device(name).ok_or(Error::NoDevice)?;
        let mut nic = nic::Nic::new(dev).map_err(|_| Error::BadDevice)?;
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&dev.mac[..6]);
        let mut cfg = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        cfg.random_seed = crate::random::u64();
        let mut iface = Interface::new(cfg, &mut nic, now());
        let mut sockets = SocketSet::new(Vec::new());
        let address = Ipv4Addr::from(dev.ipv4);
        let dhcp = address.is_unspecified();
        let gateway = Some(Ipv4Addr::from(dev.gateway)).filter(|g| !g.is_unspecified());
        let prefix_len = (dev.prefix_len.min(32)) as u8;
        let dhcp_handle = if dhcp {
            Some(sockets.add(dhcpv4::Socket::new()))
        } else {
            iface.update_ip_addrs(|addrs| {
                let _ = addrs.push(IpCidr::Ipv4(Ipv4Cidr::new(address, prefix_len)));
            });
            if let Some(gw) = gateway {
                let _ = iface.routes_mut().add_default_ipv4_route(gw);
            }
            None
        };
        let config = Config {
            device: String::from(dev.name()),
            mac,
            address,
            prefix_len: if dhcp { 0 } else { prefix_len },
            gateway: if dhcp { None } else { gateway },
            mtu: if dev.mtu == 0 { 1500 } else { dev.mtu as usize },
            dhcp,
        };
        let mut stack = Stack {
            iface,
            sockets,
            nic,
            dhcp: dhcp_handle,
            config,
            socks: BTreeMap::new(),
            listeners: BTreeMap::new(),
            closing: Vec::new(),
            next_id: 1,
            next_port: (crate::random::u64() % 16384) as u16,
            polls: 0,
            waits: 0,
        };
        stack.poll();
        Ok(stack)
    }

    /// One pass of the poll loop: take back sent buffers, process every received frame
    /// (refilling listen backlogs between frames, so a burst of SYNs finds listeners),
    /// transmit everything the sockets have, publish it all with one doorbell. Returns
    /// true if the state of some socket may have changed.
    fn poll(&mut self) -> bool {
        self.polls += 1;
        let ts = now();
        self.nic.reap();
        self.iface.poll_maintenance(ts);
        let mut changed = false;
        loop {
            match self
                .iface
                .poll_ingress_single(ts, &mut self.nic, &mut self.sockets)
            {
                PollIngressSingleResult::None => break,
                PollIngressSingleResult::PacketProcessed => {}
                PollIngressSingleResult::SocketStateChanged => {
                    changed = true;
                    self.refill_listeners();
                }
            }
        }
        loop {
            match self.iface.poll_egress(ts, &mut self.nic, &mut self.sockets) {
                smoltcp::iface::PollResult::None => break,
                smoltcp::iface::PollResult::SocketStateChanged => changed = true,
            }
        }
        self.poll_dhcp();
        self.refill_listeners();
        self.reap_closing();
        self.nic.flush();
        changed
    }

    /// Sleeps in `WAIT` until the stack needs attention (a timer, a frame) or `deadline`.
    fn sleep(&mut self, deadline: u64) {
        let now_ns = monotonic_ns();
        let mut wake = deadline;
        if let Some(d) = self.iface.poll_delay(now(), &self.sockets) {
            let mut d_ns = d.total_micros() * 1000;
            if d_ns == 0 && self.nic.tx_exhausted() {
                // Output waits for transmit buffers: the host wakes us when some complete.
                d_ns = 1_000_000;
            }
            wake = wake.min(now_ns.saturating_add(d_ns));
        }
        if !self.closing.is_empty() {
            wake = wake.min(now_ns.saturating_add(1_000_000_000));
        }
        if wake <= now_ns || self.nic.rx_ready() {
            return;
        }
        self.nic.flush_all();
        self.waits += 1;
        if call(&Wait { deadline_ns: wake }) < 0 {
            // The host refused to wait: never turn that into a hot loop of exits.
            while monotonic_ns() < wake {
                core::hint::spin_loop();
            }
        }
    }

    /// Applies DHCP results to the interface.
    fn poll_dhcp(&mut self) {
        let Some(h) = self.dhcp else { return };
        let update = match self.sockets.get_mut::<dhcpv4::Socket>(h).poll() {
            None => return,
            Some(dhcpv4::Event::Configured(c)) => Some((c.address, c.router)),
            Some(dhcpv4::Event::Deconfigured) => None,
        };
        self.iface.update_ip_addrs(|addrs| {
            addrs.clear();
            if let Some((cidr, _)) = update {
                let _ = addrs.push(IpCidr::Ipv4(cidr));
            }
        });
        self.iface.routes_mut().remove_default_ipv4_route();
        match update {
            Some((cidr, router)) => {
                if let Some(gw) = router {
                    let _ = self.iface.routes_mut().add_default_ipv4_route(gw);
                }
                self.config.address = cidr.address();
                self.config.prefix_len = cidr.prefix_len();
                self.config.gateway = router;
            }
            None => {
                self.config.address = Ipv4Addr::UNSPECIFIED;
                self.config.prefix_len = 0;
                self.config.gateway = None;
            }
        }
    }

    /// Moves connections out of each listener's backlog as they arrive, and keeps the
    /// backlog full while the accept queue has room.
    fn refill_listeners(&mut self) {
        for l in self.listeners.values_mut() {
            let mut i = 0;
            while i < l.listening.len() {
                let h = l.listening[i];
                if self.sockets.get::<stcp::Socket>(h).is_listening() {
                    i += 1;
                } else {
                    l.listening.swap_remove(i);
                    l.handshaking.push(h);
                }
            }
            let mut i = 0;
            while i < l.handshaking.len() {
                let h = l.handshaking[i];
                let s = self.sockets.get::<stcp::Socket>(h);
                match s.state() {
                    stcp::State::SynReceived => i += 1,
                    // A reset during the handshake puts the socket back to listening.
                    stcp::State::Listen => {
                        l.handshaking.swap_remove(i);
                        l.listening.push(h);
                    }
                    stcp::State::Closed => {
                        l.handshaking.swap_remove(i);
                        self.sockets.remove(h);
                    }
                    _ => {
                        l.handshaking.swap_remove(i);
                        l.ready.push_back(h);
                    }
                }
            }
            // Each socket allocates its buffers up front: never let a burst of SYNs exhaust
            // the heap (that would end the guest), whatever the accept queue allows.
            let cost = l.opts.rx_buffer + l.opts.tx_buffer;
            while l.listening.len() < l.opts.backlog.max(1)
                && l.handshaking.len() + l.ready.len() < l.opts.accept_queue.max(1)
                && crate::heap::stats().free > cost + HEAP_RESERVE
            {
                let mut s = new_tcp(&l.opts);
                if s.listen(l.port).is_err() {
                    break;
                }
                l.listening.push(self.sockets.add(s));
            }
        }
    }

    /// Removes dropped connections that finished closing, and resets those that take
    /// too long.
    fn reap_closing(&mut self) {
        if self.closing.is_empty() {
            return;
        }
        let now_ns = monotonic_ns();
        let mut i = 0;
        while i < self.closing.len() {
            let (h, limit) = self.closing[i];
            let s = self.sockets.get_mut::<stcp::Socket>(h);
            match s.state() {
                stcp::State::Closed | stcp::State::TimeWait => {
                    self.sockets.remove(h);
                    self.closing.swap_remove(i);
                }
                _ if now_ns >= limit => {
                    // The reset goes out at the next poll; the socket is removed after.
                    s.abort();
                    self.closing[i].1 = 0;
                    i += 1;
                }
                _ => i += 1,
            }
        }
    }

    /// A fresh object id.
    fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// True if a TCP socket or listener uses local port `port`.
    fn tcp_port_in_use(&self, port: u16) -> bool {
        self.listeners.values().any(|l| l.port == port)
            || self.sockets.iter().any(|(_, s)| match s {
                Socket::Tcp(t) => {
                    t.listen_endpoint().port == port
                        || t.local_endpoint().is_some_and(|e| e.port == port)
                }
                _ => false,
            })
    }

    /// True if a UDP socket is bound to local port `port`.
    fn udp_port_in_use(&self, port: u16) -> bool {
        self.sockets.iter().any(|(_, s)| match s {
            Socket::Udp(u) => u.endpoint().port == port,
            _ => false,
        })
    }

    /// A free local port for an outgoing connection or an unbound UDP socket.
    fn ephemeral_port(&mut self) -> Result<u16> {
        let range = u16::MAX - EPHEMERAL_FIRST + 1;
        for _ in 0..range {
            let port = EPHEMERAL_FIRST + self.next_port % range;
            self.next_port = self.next_port.wrapping_add(1);
            if !self.tcp_port_in_use(port) && !self.udp_port_in_use(port) {
                return Ok(port);
            }
        }
        Err(Error::NoPorts)
    }

    /// The socket handle of stream or UDP object `id`.
    fn handle(&self, id: u64) -> Result<SocketHandle> {
        self.socks.get(&id).copied().ok_or(Error::NotConnected)
    }

    /// Largest UDP payload the interface sends unfragmented.
    fn max_udp_payload(&self) -> usize {
        self.config.mtu.saturating_sub(20 + 8)
    }
}
