//! TCP: [`TcpListener`] and [`TcpStream`], blocking like `std::net`, plus non-blocking
//! `try_*` calls for serving many connections from one thread with a
//! [`Poller`](super::Poller).
//!
//! A listener keeps a backlog of sockets listening on its port and refills it between
//! received frames, so a burst of clients connecting at once finds a socket for each of
//! them (up to [`TcpOptions::accept_queue`] waiting connections). Dropping a stream closes
//! it gracefully in the background: data still queued is sent, then the FIN.

use core::cell::Cell;
use core::fmt;
use core::time::Duration;

use smoltcp::socket::tcp as stcp;
use smoltcp::wire::IpAddress;

use super::{
    CLOSE_TIMEOUT_NS, Error, Listener, Result, SocketAddr, SocketAddrV4, Stack, ToSocketAddr,
    block, new_tcp, with,
};
use crate::time::monotonic_ns;

/// How long [`TcpStream::connect`] waits for the handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Buffer sizes and options of TCP sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpOptions {
    /// Receive buffer per connection, in bytes (the advertised window; window scaling is
    /// used above 64 KiB).
    pub rx_buffer: usize,
    /// Send buffer per connection, in bytes.
    pub tx_buffer: usize,
    /// Send small segments at once (Nagle's algorithm off); on by default.
    pub nodelay: bool,
    /// Send keep-alive probes after this much idle time (`None`: never).
    pub keep_alive: Option<Duration>,
    /// Listeners: sockets kept listening, ready for simultaneous connection attempts.
    pub backlog: usize,
    /// Listeners: connections (in the handshake or established) waiting for `accept`;
    /// beyond this, or when the heap runs low (4 MiB kept free), new connection attempts
    /// are refused.
    pub accept_queue: usize,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            rx_buffer: 64 * 1024,
            tx_buffer: 64 * 1024,
            nodelay: true,
            keep_alive: None,
            backlog: 16,
            accept_queue: 1024,
        }
    }
}

/// Which halves of a connection [`TcpStream::shutdown`] closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    /// Reads return end of file from now on.
    Read,
    /// Queued data is sent, then a FIN; writes fail from now on.
    Write,
    /// Both.
    Both,
}

/// The IPv4 socket address of a smoltcp endpoint.
fn v4(ep: smoltcp::wire::IpEndpoint) -> SocketAddr {
    let IpAddress::Ipv4(ip) = ep.addr;
    SocketAddr::V4(SocketAddrV4::new(ip, ep.port))
}

/// A TCP socket listening for connections on a port of every local address.
#[derive(Debug)]
pub struct TcpListener {
    id: u64,
    port: u16,
}

impl TcpListener {
    /// Listens on `port` (0: a free port) with the default [`TcpOptions`].
    pub fn bind(port: u16) -> Result<TcpListener> {
        Self::bind_with(port, TcpOptions::default())
    }

    /// Listens on `port` (0: a free port); `opts` also applies to the accepted streams.
    pub fn bind_with(port: u16, opts: TcpOptions) -> Result<TcpListener> {
        with(|s| {
            let port = if port == 0 { s.ephemeral_port()? } else { port };
            if s.tcp_port_in_use(port) {
                return Err(Error::AddrInUse);
            }
            let id = s.new_id();
            s.listeners.insert(
                id,
                Listener {
                    port,
                    opts,
                    listening: alloc::vec::Vec::new(),
                    handshaking: alloc::vec::Vec::new(),
                    ready: alloc::collections::VecDeque::new(),
                },
            );
            s.refill_listeners();
            Ok(TcpListener { id, port })
        })
    }

    /// The port listened on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The local address (the interface address, unspecified before DHCP answers).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        with(|s| {
            Ok(SocketAddr::V4(SocketAddrV4::new(
                s.config.address,
                self.port,
            )))
        })
    }

    /// Waits for a connection and returns it with the peer's address.
    pub fn accept(&self) -> Result<(TcpStream, SocketAddr)> {
        block(None, |s| s.take_ready(self.id))
    }

    /// Like [`accept`](Self::accept), failing with [`Error::TimedOut`] after `timeout`.
    pub fn accept_timeout(&self, timeout: Duration) -> Result<(TcpStream, SocketAddr)> {
        block(Some(timeout), |s| s.take_ready(self.id))
    }

    /// Returns a connection that is already established, or [`Error::WouldBlock`].
    pub fn try_accept(&self) -> Result<(TcpStream, SocketAddr)> {
        with(|s| s.take_ready(self.id).unwrap_or(Err(Error::WouldBlock)))
    }

    /// True if `try_accept` would return a connection.
    pub(crate) fn ready(s: &Stack, id: u64) -> bool {
        s.listeners.get(&id).is_some_and(|l| !l.ready.is_empty())
    }

    /// This listener's object id.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        let _ = with(|s| {
            let Some(l) = s.listeners.remove(&self.id) else {
                return Ok(());
            };
            for h in l.listening {
                s.sockets.remove(h);
            }
            let limit = monotonic_ns();
            for h in l.handshaking.into_iter().chain(l.ready) {
                s.sockets.get_mut::<stcp::Socket>(h).abort();
                s.closing.push((h, limit));
            }
            Ok(())
        });
    }
}

impl Stack {
    /// Takes the next established connection of listener `id`, if any.
    fn take_ready(&mut self, id: u64) -> Option<Result<(TcpStream, SocketAddr)>> {
        let Some(l) = self.listeners.get_mut(&id) else {
            return Some(Err(Error::NotConnected));
        };
        while let Some(h) = l.ready.pop_front() {
            let sock = self.sockets.get::<stcp::Socket>(h);
            let Some(peer) = sock.remote_endpoint() else {
                // Reset while waiting in the queue.
                self.sockets.remove(h);
                continue;
            };
            let sid = self.next_id;
            self.next_id += 1;
            self.socks.insert(sid, h);
            self.refill_listeners();
            return Some(Ok((TcpStream::new(sid), v4(peer))));
        }
        None
    }

    /// Reads from stream `id` into `buf`; `None` if that would block.
    fn tcp_recv(&mut self, id: u64, buf: &mut [u8]) -> Option<Result<usize>> {
        let h = match self.handle(id) {
            Ok(h) => h,
            Err(e) => return Some(Err(e)),
        };
        let sock = self.sockets.get_mut::<stcp::Socket>(h);
        match sock.recv_slice(buf) {
            Ok(0) if !buf.is_empty() => None,
            Ok(n) => Some(Ok(n)),
            Err(stcp::RecvError::Finished) => Some(Ok(0)),
            Err(stcp::RecvError::InvalidState) => Some(Err(match sock.state() {
                stcp::State::SynSent | stcp::State::SynReceived => return None,
                stcp::State::Closed => Error::ConnectionReset,
                _ => Error::NotConnected,
            })),
        }
    }

    /// Writes `buf` to stream `id`'s send buffer; `None` if it is full.
    fn tcp_send(&mut self, id: u64, buf: &[u8]) -> Option<Result<usize>> {
        let h = match self.handle(id) {
            Ok(h) => h,
            Err(e) => return Some(Err(e)),
        };
        let sock = self.sockets.get_mut::<stcp::Socket>(h);
        if buf.is_empty() {
            return Some(Ok(0));
        }
        if sock.can_send() {
            return Some(sock.send_slice(buf).map_err(|_| Error::NotConnected));
        }
        if sock.may_send() {
            return None;
        }
        match sock.state() {
            stcp::State::SynSent | stcp::State::SynReceived => None,
            stcp::State::Closed => Some(Err(Error::ConnectionReset)),
            _ => Some(Err(Error::NotConnected)),
        }
    }

    /// Readiness of stream `id`: (readable, writable, hung up); `None` if it is gone.
    pub(crate) fn tcp_readiness(&self, id: u64) -> Option<(bool, bool, bool)> {
        let sock = self.sockets.get::<stcp::Socket>(*self.socks.get(&id)?);
        let connecting = matches!(
            sock.state(),
            stcp::State::SynSent | stcp::State::SynReceived
        );
        if connecting {
            return Some((false, false, false));
        }
        let readable = sock.can_recv() || !sock.may_recv();
        let writable = sock.can_send() || !sock.may_send();
        let hangup = !sock.may_recv() && !sock.can_recv();
        Some((readable, writable, hangup))
    }
}

/// A TCP connection.
pub struct TcpStream {
    id: u64,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    read_shut: Cell<bool>,
}

impl fmt::Debug for TcpStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpStream")
            .field("peer", &self.peer_addr().ok())
            .finish()
    }
}

impl TcpStream {
    /// A stream owning object `id`.
    fn new(id: u64) -> TcpStream {
        TcpStream {
            id,
            read_timeout: None,
            write_timeout: None,
            read_shut: Cell::new(false),
        }
    }

    /// Connects to `addr` (waiting up to [`CONNECT_TIMEOUT`]).
    pub fn connect(addr: impl ToSocketAddr) -> Result<TcpStream> {
        Self::connect_with(addr, TcpOptions::default(), CONNECT_TIMEOUT)
    }

    /// Connects to `addr`, failing with [`Error::TimedOut`] after `timeout`.
    pub fn connect_timeout(addr: impl ToSocketAddr, timeout: Duration) -> Result<TcpStream> {
        Self::connect_with(addr, TcpOptions::default(), timeout)
    }

    /// Connects to `addr` with socket options `opts`, failing after `timeout`.
    pub fn connect_with(
        addr: impl ToSocketAddr,
        opts: TcpOptions,
        timeout: Duration,
    ) -> Result<TcpStream> {
        let addr = addr.to_socket_addr()?;
        if addr.port() == 0 || addr.ip().is_unspecified() || addr.ip().is_broadcast() {
            return Err(Error::InvalidInput);
        }
        let start = monotonic_ns();
        super::wait_configured(Some(timeout))?;
        let id = with(|s| {
            let port = s.ephemeral_port()?;
            let mut sock = new_tcp(&opts);
            sock.connect(
                s.iface.context(),
                (IpAddress::Ipv4(*addr.ip()), addr.port()),
                port,
            )
            .map_err(|_| Error::InvalidInput)?;
            let h = s.sockets.add(sock);
            let id = s.new_id();
            s.socks.insert(id, h);
            Ok(id)
        })?;
        let stream = TcpStream::new(id);
        let left = timeout.saturating_sub(Duration::from_nanos(monotonic_ns() - start));
        block(Some(left), |s| {
            let h = match s.handle(id) {
                Ok(h) => h,
                Err(e) => return Some(Err(e)),
            };
            match s.sockets.get::<stcp::Socket>(h).state() {
                stcp::State::SynSent | stcp::State::SynReceived => None,
                stcp::State::Closed => Some(Err(Error::ConnectionRefused)),
                _ => Some(Ok(())),
            }
        })?;
        Ok(stream)
    }

    /// Reads into `buf`, waiting until data arrives; 0 means the peer closed its side.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        if self.read_shut.get() {
            return Ok(0);
        }
        block(self.read_timeout, |s| s.tcp_recv(self.id, buf))
    }

    /// Reads what has arrived, or fails with [`Error::WouldBlock`] (never drives the stack).
    pub fn try_read(&mut self, buf: &mut [u8]) -> Result<usize> {
        if self.read_shut.get() {
            return Ok(0);
        }
        with(|s| s.tcp_recv(self.id, buf).unwrap_or(Err(Error::WouldBlock)))
    }

    /// Reads exactly `buf.len()` bytes (fails with [`Error::ConnectionReset`] at an early
    /// end of file).
    pub fn read_exact(&mut self, mut buf: &mut [u8]) -> Result<()> {
        while !buf.is_empty() {
            match self.read(buf)? {
                0 => return Err(Error::ConnectionReset),
                n => buf = &mut buf[n..],
            }
        }
        Ok(())
    }

    /// Writes part of `buf` into the send buffer, waiting while it is full; returns the
    /// bytes taken. Data leaves at the next blocking call, `flush` or poll.
    pub fn write(&mut self, buf: &[u8]) -> Result<usize> {
        block(self.write_timeout, |s| s.tcp_send(self.id, buf))
    }

    /// Writes what fits in the send buffer now, or fails with [`Error::WouldBlock`].
    pub fn try_write(&mut self, buf: &[u8]) -> Result<usize> {
        with(|s| s.tcp_send(self.id, buf).unwrap_or(Err(Error::WouldBlock)))
    }

    /// Writes all of `buf`, waiting for room as needed.
    pub fn write_all(&mut self, mut buf: &[u8]) -> Result<()> {
        while !buf.is_empty() {
            match self.write(buf)? {
                0 => return Err(Error::WriteZero),
                n => buf = &buf[n..],
            }
        }
        Ok(())
    }

    /// Sends what is in the send buffer now (as far as the peer's window allows), without
    /// waiting for acknowledgements.
    pub fn flush(&mut self) -> Result<()> {
        super::poll()
    }

    /// Waits until the peer has acknowledged everything written (or `timeout` passes).
    pub fn wait_acked(&mut self, timeout: Option<Duration>) -> Result<()> {
        block(timeout, |s| {
            let h = match s.handle(self.id) {
                Ok(h) => h,
                Err(e) => return Some(Err(e)),
            };
            let sock = s.sockets.get::<stcp::Socket>(h);
            match sock.state() {
                stcp::State::Closed => Some(Err(Error::ConnectionReset)),
                _ if sock.send_queue() == 0 => Some(Ok(())),
                _ => None,
            }
        })
    }

    /// Shuts down the reading half, the writing half (a FIN after queued data), or both.
    pub fn shutdown(&self, how: Shutdown) -> Result<()> {
        if how != Shutdown::Write {
            self.read_shut.set(true);
        }
        if how != Shutdown::Read {
            with(|s| {
                let h = s.handle(self.id)?;
                s.sockets.get_mut::<stcp::Socket>(h).close();
                s.poll();
                Ok(())
            })?;
        }
        Ok(())
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> Result<SocketAddr> {
        with(|s| {
            let h = s.handle(self.id)?;
            s.sockets
                .get::<stcp::Socket>(h)
                .remote_endpoint()
                .map(v4)
                .ok_or(Error::NotConnected)
        })
    }

    /// The local address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        with(|s| {
            let h = s.handle(self.id)?;
            s.sockets
                .get::<stcp::Socket>(h)
                .local_endpoint()
                .map(v4)
                .ok_or(Error::NotConnected)
        })
    }

    /// Makes `read` fail with [`Error::TimedOut`] after `timeout` (`None`: wait forever).
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) -> Result<()> {
        if timeout == Some(Duration::ZERO) {
            return Err(Error::InvalidInput);
        }
        self.read_timeout = timeout;
        Ok(())
    }

    /// Makes `write` fail with [`Error::TimedOut`] after `timeout` (`None`: wait forever).
    pub fn set_write_timeout(&mut self, timeout: Option<Duration>) -> Result<()> {
        if timeout == Some(Duration::ZERO) {
            return Err(Error::InvalidInput);
        }
        self.write_timeout = timeout;
        Ok(())
    }

    /// The read timeout.
    pub fn read_timeout(&self) -> Option<Duration> {
        self.read_timeout
    }

    /// The write timeout.
    pub fn write_timeout(&self) -> Option<Duration> {
        self.write_timeout
    }

    /// Turns Nagle's algorithm off (`true`, the default here) or on.
    pub fn set_nodelay(&self, nodelay: bool) -> Result<()> {
        with(|s| {
            let h = s.handle(self.id)?;
            s.sockets
                .get_mut::<stcp::Socket>(h)
                .set_nagle_enabled(!nodelay);
            Ok(())
        })
    }

    /// Bytes received and not read yet.
    pub fn available(&self) -> usize {
        with(|s| {
            Ok(s.sockets
                .get::<stcp::Socket>(s.handle(self.id)?)
                .recv_queue())
        })
        .unwrap_or(0)
    }

    /// This stream's object id.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        let _ = with(|s| {
            let Some(h) = s.socks.remove(&self.id) else {
                return Ok(());
            };
            let sock = s.sockets.get_mut::<stcp::Socket>(h);
            sock.close();
            if sock.state() == stcp::State::Closed {
                s.sockets.remove(h);
            } else {
                s.closing
                    .push((h, monotonic_ns().saturating_add(CLOSE_TIMEOUT_NS)));
            }
            Ok(())
        });
    }
}

impl fmt::Write for TcpStream {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_all(s.as_bytes()).map_err(|_| fmt::Error)
    }
}
