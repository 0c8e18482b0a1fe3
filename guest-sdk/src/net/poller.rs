//! The readiness [`Poller`]: serve many sockets from one thread.
//!
//! Register listeners, streams and UDP sockets with a token and an [`Interest`];
//! [`Poller::wait`] drives the network and sleeps until at least one of them is ready,
//! then reports which. Readiness is level-triggered (like `poll(2)`): a socket is reported
//! for as long as it is ready, so register write interest only while there is output
//! waiting, and handle each event with the non-blocking `try_*` calls.
//!
//! ```ignore
//! let mut poller = Poller::new();
//! poller.register(&listener, LISTENER, Interest::READABLE);
//! let mut events = Vec::new();
//! loop {
//!     poller.wait(&mut events, None)?;
//!     for ev in &events {
//!         if ev.token == LISTENER {
//!             while let Ok((stream, _)) = listener.try_accept() {
//!                 poller.register(&stream, next_token, Interest::READABLE);
//!                 conns.insert(next_token, stream);
//!                 next_token += 1;
//!             }
//!         } else { /* try_read / try_write on conns[ev.token] */ }
//!     }
//! }
//! ```

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::ops::BitOr;
use core::time::Duration;

use super::{Error, Result, Stack, TcpListener, TcpStream, UdpSocket, deadline, with};
use crate::time::monotonic_ns;

/// What a registration waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interest {
    read: bool,
    write: bool,
}

impl Interest {
    /// Data to read, a connection to accept, or the peer closed.
    pub const READABLE: Interest = Interest {
        read: true,
        write: false,
    };
    /// Room in the send buffer.
    pub const WRITABLE: Interest = Interest {
        read: false,
        write: true,
    };
    /// Both.
    pub const BOTH: Interest = Interest {
        read: true,
        write: true,
    };
    /// Nothing but hang-ups (a registration kept quiet for a while).
    pub const NONE: Interest = Interest {
        read: false,
        write: false,
    };

    /// True if it includes [`Interest::READABLE`].
    pub fn is_readable(self) -> bool {
        self.read
    }

    /// True if it includes [`Interest::WRITABLE`].
    pub fn is_writable(self) -> bool {
        self.write
    }
}

impl BitOr for Interest {
    type Output = Interest;
    fn bitor(self, o: Interest) -> Interest {
        Interest {
            read: self.read || o.read,
            write: self.write || o.write,
        }
    }
}

/// One ready registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// The token it was registered with.
    pub token: usize,
    /// A read (or accept) would not block.
    pub readable: bool,
    /// A write would not block.
    pub writable: bool,
    /// The peer closed or reset the connection (reads return 0 or an error); reported
    /// whatever the interest.
    pub hangup: bool,
}

mod sealed {
    /// What a [`Pollable`](super::Pollable) is, for the stack.
    #[derive(Clone, Copy, Debug)]
    pub enum Source {
        /// A TCP stream, by object id.
        Stream(u64),
        /// A TCP listener, by object id.
        Listener(u64),
        /// A UDP socket, by object id.
        Udp(u64),
    }

    /// Keeps [`Pollable`](super::Pollable) implemented only here.
    pub trait Sealed {
        /// The source to watch.
        fn source(&self) -> Source;
    }
}

use sealed::Source;

/// A socket a [`Poller`] can watch: [`TcpListener`], [`TcpStream`], [`UdpSocket`].
pub trait Pollable: sealed::Sealed {}

impl sealed::Sealed for TcpListener {
    fn source(&self) -> Source {
        Source::Listener(self.id())
    }
}
impl sealed::Sealed for TcpStream {
    fn source(&self) -> Source {
        Source::Stream(self.id())
    }
}
impl sealed::Sealed for UdpSocket {
    fn source(&self) -> Source {
        Source::Udp(self.id())
    }
}
impl Pollable for TcpListener {}
impl Pollable for TcpStream {}
impl Pollable for UdpSocket {}

/// Waits for readiness of many sockets at once.
#[derive(Debug, Default)]
pub struct Poller {
    regs: BTreeMap<usize, (Source, Interest)>,
}

impl Poller {
    /// An empty poller.
    pub fn new() -> Poller {
        Poller::default()
    }

    /// Watches `socket` for `interest`, reported under `token` (replacing any registration
    /// with the same token). A dropped socket's registration disappears by itself.
    pub fn register(&mut self, socket: &impl Pollable, token: usize, interest: Interest) {
        self.regs.insert(token, (socket.source(), interest));
    }

    /// Changes the interest of registration `token`; false if there is none.
    pub fn reregister(&mut self, token: usize, interest: Interest) -> bool {
        match self.regs.get_mut(&token) {
            Some(r) => {
                r.1 = interest;
                true
            }
            None => false,
        }
    }

    /// Stops watching registration `token`.
    pub fn deregister(&mut self, token: usize) {
        self.regs.remove(&token);
    }

    /// Number of registrations.
    pub fn len(&self) -> usize {
        self.regs.len()
    }

    /// True if nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.regs.is_empty()
    }

    /// Drives the network until some registration is ready or `timeout` passes (`None`:
    /// no limit); fills `events` (cleared first) and returns how many there are (0 on
    /// timeout).
    pub fn wait(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> Result<usize> {
        events.clear();
        let deadline = deadline(timeout);
        with(|s| {
            loop {
                s.poll();
                self.collect(s, events);
                if !events.is_empty() || monotonic_ns() >= deadline {
                    return Ok(events.len());
                }
                if s.nic.is_broken() {
                    return Err(Error::DeviceBroken);
                }
                s.sleep(deadline);
            }
        })
    }

    /// Adds an event for every ready registration; drops registrations of dropped sockets.
    fn collect(&mut self, s: &Stack, events: &mut Vec<Event>) {
        self.regs.retain(|&token, &mut (source, interest)| {
            let (readable, writable, hangup) = match source {
                Source::Stream(id) => match s.tcp_readiness(id) {
                    Some(r) => r,
                    None => return false,
                },
                Source::Listener(id) => {
                    if !s.listeners.contains_key(&id) {
                        return false;
                    }
                    (TcpListener::ready(s, id), false, false)
                }
                Source::Udp(id) => match s.udp_readiness(id) {
                    Some((r, w)) => (r, w, false),
                    None => return false,
                },
            };
            let readable = readable && interest.read;
            let writable = writable && interest.write;
            if readable || writable || hangup {
                events.push(Event {
                    token,
                    readable,
                    writable,
                    hangup,
                });
            }
            true
        });
    }
}
