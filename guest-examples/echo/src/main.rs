//! TCP and UDP echo, plus throughput tools, over `pvrun::net`.
//!
//! Modes (first argument):
//! - none: echo on TCP port 7 and UDP port 7, byte for byte, any number of connections at
//!   once from one thread (`Poller`); prints `echo listening on <ip>`.
//! - `sink PORT`: accept TCP connections one after another, discard what they send, and
//!   print `sink: <bytes> bytes in <s> s = <MB/s> MB/s (<Mbit/s> Mbit/s) from <peer>` when
//!   each closes.
//! - `source HOST:PORT MB`: connect, send MB megabytes (10^6 bytes), wait until the peer
//!   acknowledged them, print `source: sent <bytes> bytes in <s> s = <MB/s> MB/s
//!   (<Mbit/s> Mbit/s) to <peer>` and exit.
//!
//! The throughput modes also print the NIC counters:
//! `net: rx_frames=.. tx_frames=.. doorbells=.. waits=.. polls=..`.
//! The NIC must be named `eth0` (`pvrun --net eth0=tap:...`).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use core::time::Duration;

use pvrun::net::{self, Error, Interest, Poller, Shutdown, TcpListener, TcpStream, UdpSocket};
use pvrun::println;
use pvrun::time::Instant;

pvrun::require_device!(net, "eth0");
pvrun::entry!(main);

/// Echo port.
const PORT: u16 = 7;
/// Poller tokens; connections count up from `FIRST_CONN`.
const LISTENER: usize = 0;
const UDP: usize = 1;
const FIRST_CONN: usize = 2;
/// Bytes read from a connection before they are written back.
const CHUNK: usize = 64 * 1024;

/// An echo connection: bytes read and not yet written back.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    eof: bool,
}

impl Conn {
    /// Echoes what it can without blocking; false when the connection is done.
    fn drive(&mut self) -> bool {
        loop {
            if self.pos == self.len && !self.eof {
                match self.stream.try_read(&mut self.buf) {
                    Ok(0) => self.eof = true,
                    Ok(n) => {
                        self.pos = 0;
                        self.len = n;
                    }
                    Err(Error::WouldBlock) => return true,
                    Err(_) => return false,
                }
            }
            while self.pos < self.len {
                match self.stream.try_write(&self.buf[self.pos..self.len]) {
                    Ok(n) => self.pos += n,
                    Err(Error::WouldBlock) => return true,
                    Err(_) => return false,
                }
            }
            if self.eof {
                // Everything is echoed: close our side (the FIN follows the data).
                let _ = self.stream.shutdown(Shutdown::Write);
                return false;
            }
        }
    }

    /// What to wait for next.
    fn interest(&self) -> Interest {
        if self.pos < self.len {
            Interest::WRITABLE
        } else {
            Interest::READABLE
        }
    }
}

/// Echo server on TCP and UDP port 7.
fn serve() -> Result<(), Error> {
    let config = net::init()?;
    let listener = TcpListener::bind(PORT)?;
    let udp = UdpSocket::bind(PORT)?;
    println!("echo listening on {}", config.address);

    let mut poller = Poller::new();
    poller.register(&listener, LISTENER, Interest::READABLE);
    poller.register(&udp, UDP, Interest::READABLE);
    let mut conns: BTreeMap<usize, Conn> = BTreeMap::new();
    let mut next = FIRST_CONN;
    let mut events = Vec::new();
    let mut dgram = vec![0u8; 65536];
    loop {
        poller.wait(&mut events, None)?;
        for ev in &events {
            match ev.token {
                LISTENER => {
                    while let Ok((stream, _)) = listener.try_accept() {
                        let mut conn = Conn {
                            stream,
                            buf: vec![0; CHUNK],
                            pos: 0,
                            len: 0,
                            eof: false,
                        };
                        if conn.drive() {
                            poller.register(&conn.stream, next, conn.interest());
                            conns.insert(next, conn);
                            next += 1;
                        }
                    }
                }
                UDP => {
                    while let Ok((n, from)) = udp.try_recv_from(&mut dgram) {
                        // A full send buffer drops the datagram, as UDP may.
                        let _ = udp.try_send_to(&dgram[..n.min(dgram.len())], from);
                    }
                }
                token => {
                    let Some(conn) = conns.get_mut(&token) else {
                        continue;
                    };
                    if conn.drive() {
                        poller.reregister(token, conn.interest());
                    } else {
                        poller.deregister(token);
                        conns.remove(&token);
                    }
                }
            }
        }
    }
}

/// Prints a throughput line and the NIC counters.
fn report(what: &str, bytes: u64, secs: f64, peer: &dyn core::fmt::Display) {
    let secs = if secs > 0.0 { secs } else { 1e-9 };
    let mbs = bytes as f64 / secs / 1e6;
    println!(
        "{what} {bytes} bytes in {secs:.3} s = {mbs:.2} MB/s ({:.1} Mbit/s) {} {peer}",
        mbs * 8.0,
        if what.starts_with("sink") {
            "from"
        } else {
            "to"
        }
    );
    let s = net::stats();
    println!(
        "net: rx_frames={} tx_frames={} doorbells={} waits={} polls={}",
        s.nic.rx_frames, s.nic.tx_frames, s.nic.doorbells, s.waits, s.polls
    );
}

/// Accepts connections one after another and discards their data.
fn sink(port: u16) -> Result<(), Error> {
    let config = net::init()?;
    let listener = TcpListener::bind_with(
        port,
        net::TcpOptions {
            rx_buffer: 256 * 1024,
            ..Default::default()
        },
    )?;
    println!("sink listening on {}:{}", config.address, port);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let (mut stream, peer) = listener.accept()?;
        let start = Instant::now();
        let mut total = 0u64;
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(e) => {
                    println!("sink: {e}");
                    break;
                }
            }
        }
        report("sink:", total, start.elapsed().as_secs_f64(), &peer);
    }
}

/// Connects to `addr` and sends `mb` megabytes.
fn source(addr: &str, mb: u64) -> Result<(), Error> {
    net::init()?;
    let mut stream = TcpStream::connect_with(
        addr,
        net::TcpOptions {
            tx_buffer: 256 * 1024,
            ..Default::default()
        },
        net::CONNECT_TIMEOUT,
    )?;
    let peer = stream.peer_addr()?;
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let total = mb * 1_000_000;
    let start = Instant::now();
    let mut left = total;
    while left > 0 {
        let n = (left as usize).min(chunk.len());
        stream.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    stream.wait_acked(Some(Duration::from_secs(60)))?;
    let secs = start.elapsed().as_secs_f64();
    stream.shutdown(Shutdown::Write)?;
    // Wait for the peer to close its side too: our FIN has then arrived, and exiting the
    // guest cannot cut it off (the peer would wait for it forever).
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = [0u8; 512];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
    report("source: sent", total, secs, &peer);
    Ok(())
}

fn main() -> i32 {
    let args: Vec<&str> = pvrun::env::args().collect();
    let result = match args.get(1).copied() {
        None | Some("serve") => serve(),
        Some("sink") => match args.get(2).and_then(|p| p.parse().ok()) {
            Some(port) => sink(port),
            None => {
                println!("usage: echo sink PORT");
                return 2;
            }
        },
        Some("source") => match (args.get(2), args.get(3).and_then(|m| m.parse().ok())) {
            (Some(addr), Some(mb)) => source(addr, mb),
            _ => {
                println!("usage: echo source HOST:PORT MB");
                return 2;
            }
        },
        Some(other) => {
            println!("unknown mode {other} (modes: serve, sink PORT, source HOST:PORT MB)");
            return 2;
        }
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            pvrun::eprintln!("echo: {e}");
            1
        }
    }
}
