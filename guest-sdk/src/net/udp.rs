//! UDP: [`UdpSocket`], blocking like `std::net`, plus non-blocking `try_*` calls.
//!
//! Datagrams are not fragmented: a payload must fit in one frame (MTU minus 28 bytes).

use alloc::vec;
use core::time::Duration;

use smoltcp::socket::udp as sudp;
use smoltcp::wire::{IpAddress, IpEndpoint};

use super::{Error, Result, SocketAddr, SocketAddrV4, Stack, ToSocketAddr, block, with};

/// Datagrams each direction's buffer holds.
const PACKETS: usize = 128;
/// Payload bytes each direction's buffer holds.
const BYTES: usize = 256 * 1024;

/// A UDP socket bound to a local port.
#[derive(Debug)]
pub struct UdpSocket {
    id: u64,
    port: u16,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

impl UdpSocket {
    /// Binds to `port` of every local address (0: a free port).
    pub fn bind(port: u16) -> Result<UdpSocket> {
        with(|s| {
            let port = if port == 0 { s.ephemeral_port()? } else { port };
            if s.udp_port_in_use(port) {
                return Err(Error::AddrInUse);
            }
            let mut sock = sudp::Socket::new(
                sudp::PacketBuffer::new(vec![sudp::PacketMetadata::EMPTY; PACKETS], vec![0; BYTES]),
                sudp::PacketBuffer::new(vec![sudp::PacketMetadata::EMPTY; PACKETS], vec![0; BYTES]),
            );
            sock.bind(port).map_err(|_| Error::InvalidInput)?;
            let h = s.sockets.add(sock);
            let id = s.new_id();
            s.socks.insert(id, h);
            Ok(UdpSocket {
                id,
                port,
                read_timeout: None,
                write_timeout: None,
            })
        })
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

    /// Sends `buf` as one datagram to `addr` and transmits it at once; waits while the send
    /// buffer is full.
    pub fn send_to(&self, buf: &[u8], addr: impl ToSocketAddr) -> Result<usize> {
        let addr = addr.to_socket_addr()?;
        let n = block(self.write_timeout, |s| s.udp_send(self.id, buf, addr))?;
        super::poll()?;
        Ok(n)
    }

    /// Queues `buf` as one datagram to `addr`, or fails with [`Error::WouldBlock`]; it leaves
    /// at the next poll.
    pub fn try_send_to(&self, buf: &[u8], addr: impl ToSocketAddr) -> Result<usize> {
        let addr = addr.to_socket_addr()?;
        with(|s| {
            s.udp_send(self.id, buf, addr)
                .unwrap_or(Err(Error::WouldBlock))
        })
    }

    /// Waits for a datagram, copies it into `buf` (cut to `buf.len()`) and returns its
    /// full length and sender.
    pub fn recv_from(&self, buf: &mut [u8]) -> Result<(usize, SocketAddr)> {
        block(self.read_timeout, |s| s.udp_recv(self.id, buf))
    }

    /// Like [`recv_from`](Self::recv_from), or fails with [`Error::WouldBlock`] if no
    /// datagram has arrived.
    pub fn try_recv_from(&self, buf: &mut [u8]) -> Result<(usize, SocketAddr)> {
        with(|s| s.udp_recv(self.id, buf).unwrap_or(Err(Error::WouldBlock)))
    }

    /// Makes `recv_from` fail with [`Error::TimedOut`] after `timeout` (`None`: forever).
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) -> Result<()> {
        if timeout == Some(Duration::ZERO) {
            return Err(Error::InvalidInput);
        }
        self.read_timeout = timeout;
        Ok(())
    }

    /// Makes `send_to` fail with [`Error::TimedOut`] after `timeout` (`None`: forever).
    pub fn set_write_timeout(&mut self, timeout: Option<Duration>) -> Result<()> {
        if timeout == Some(Duration::ZERO) {
            return Err(Error::InvalidInput);
        }
        self.write_timeout = timeout;
        Ok(())
    }

    /// This socket's object id.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for UdpSocket {
    fn drop(&mut self) {
        let _ = with(|s| {
            if let Some(h) = s.socks.remove(&self.id) {
                s.sockets.remove(h);
            }
            Ok(())
        });
    }
}

impl Stack {
    /// Queues a datagram on UDP socket `id`; `None` if its buffer is full.
    fn udp_send(&mut self, id: u64, buf: &[u8], addr: SocketAddrV4) -> Option<Result<usize>> {
        if buf.len() > self.max_udp_payload() {
            return Some(Err(Error::TooLarge));
        }
        if addr.port() == 0 || addr.ip().is_unspecified() {
            return Some(Err(Error::InvalidInput));
        }
        if self.config.address.is_unspecified() {
            return Some(Err(Error::NoAddress));
        }
        let h = match self.handle(id) {
            Ok(h) => h,
            Err(e) => return Some(Err(e)),
        };
        let ep = IpEndpoint::new(IpAddress::Ipv4(*addr.ip()), addr.port());
        match self.sockets.get_mut::<sudp::Socket>(h).send_slice(buf, ep) {
            Ok(()) => Some(Ok(buf.len())),
            Err(sudp::SendError::BufferFull) => None,
            Err(sudp::SendError::Unaddressable) => Some(Err(Error::InvalidInput)),
        }
    }

    /// Takes a datagram from UDP socket `id`; `None` if none has arrived.
    fn udp_recv(&mut self, id: u64, buf: &mut [u8]) -> Option<Result<(usize, SocketAddr)>> {
        let h = match self.handle(id) {
            Ok(h) => h,
            Err(e) => return Some(Err(e)),
        };
        let (data, meta) = self.sockets.get_mut::<sudp::Socket>(h).recv().ok()?;
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        let IpAddress::Ipv4(ip) = meta.endpoint.addr;
        Some(Ok((
            data.len(),
            SocketAddr::V4(SocketAddrV4::new(ip, meta.endpoint.port)),
        )))
    }

    /// Readiness of UDP socket `id`: (readable, writable); `None` if it is gone.
    pub(crate) fn udp_readiness(&self, id: u64) -> Option<(bool, bool)> {
        let sock = self.sockets.get::<sudp::Socket>(*self.socks.get(&id)?);
        Some((sock.can_recv(), sock.can_send()))
    }
}
