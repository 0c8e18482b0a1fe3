//! The I/O thread's half of a network device: the TAP interface and the two rings.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;

use pvrun_abi::{NetResponse, NetRxRequest, NetTxRequest};
use vm_memory::GuestMemoryMmap;

use super::{NetConfig, RxBuffer, Tap, TxFrame, check_source_mac, is_gone, max_frame};
use crate::devices::ring::{Ring, RingError};
use crate::devices::worker::{DeviceCtx, Service};
use crate::memory::UserMemory;

/// Serves the transmit and receive rings of one network device.
pub struct NetService {
    tap: Tap,
    tx: Ring,
    rx: Ring,
    mtu: u32,
    /// The source MAC address every frame must have (None: any).
    source_mac: Option<[u8; 6]>,
    /// The private copy of the frame being sent.
    frame: Vec<u8>,
    /// True while the guest has no receive buffer posted (the TAP is then not watched).
    rx_waiting: bool,
    /// The TAP interface went away: nothing is read from it any more, frames sent are
    /// dropped, receive buffers stay posted, and the thread wakes only for doorbells.
    gone: bool,
}

impl NetService {
    /// A service for device `cfg` over `tap`, with transmit ring `tx` and receive ring
    /// `rx`.
    pub fn new(cfg: &NetConfig, tap: Tap, tx: Ring, rx: Ring) -> Self {
        let frame = vec![0u8; usize::try_from(max_frame(cfg.mtu)).unwrap_or(0)];
        NetService {
            tap,
            tx,
            rx,
            mtu: cfg.mtu,
            source_mac: (!cfg.allow_mac_spoof).then_some(cfg.mac),
            frame,
            rx_waiting: false,
            gone: false,
        }
    }

    /// The TAP interface stopped working for good: stop using it and say so once.
    fn lose_tap(&mut self, dev: &DeviceCtx, why: std::fmt::Arguments<'_>) {
        if !self.gone {
            self.gone = true;
            dev.report(format_args!(
                ": TAP `{}` is gone ({why}); frames are dropped from now on",
                self.tap.name()
            ));
        }
    }

    /// Sends every posted frame; copies each out of guest memory once.
    fn transmit(&mut self, dev: &DeviceCtx) -> Result<(), RingError> {
        loop {
            let n = self.tx.pending(&dev.mem)?;
            if n == 0 {
                if self.tx.idle_check(&dev.mem)? {
                    continue;
                }
                return Ok(());
            }
            for _ in 0..n {
                let req: NetTxRequest = self.tx.take(&dev.mem)?;
                let status = TxFrame::parse(&req, self.mtu, &dev.map)
                    .and_then(|frame| self.send(dev, &frame))
                    .unwrap_or_else(|e| e);
                if status < 0 {
                    dev.stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
                self.tx.respond(
                    &dev.mem,
                    NetResponse {
                        id: req.id,
                        status,
                        reserved: [0; 6],
                    },
                );
            }
            dev.stats
                .requests
                .fetch_add(u64::from(n), Ordering::Relaxed);
            self.tx.publish(&dev.mem);
            dev.notify.signal();
        }
    }

    /// Sends one validated frame: the bytes sent, or a negative status.
    fn send(&mut self, dev: &DeviceCtx, frame: &TxFrame) -> Result<i64, i64> {
        let len = usize::try_from(frame.buf.len()).map_err(|_| pvrun_abi::status::BAD_LENGTH)?;
        let copy = self
            .frame
            .get_mut(..len)
            .ok_or(pvrun_abi::status::BAD_LENGTH)?;
        // One private copy: the guest cannot change the frame while it is being sent.
        dev.mem
            .read_user(&frame.buf, copy)
            .map_err(|e| e.status())?;
        // Checks of the frame's contents look at this copy only.
        check_source_mac(copy, self.source_mac)?;
        if self.gone {
            return Err(pvrun_abi::status::IO_ERROR);
        }
        // SAFETY: write from our own buffer to our own descriptor.
        let w = unsafe { libc::write(self.tap.as_raw_fd(), copy.as_ptr().cast(), len) };
        if w < 0 {
            // A full TAP queue or a down interface loses the frame, as a real link would;
            // an interface that is gone loses every frame from now on.
            let e = std::io::Error::last_os_error();
            if is_gone(&e) {
                self.lose_tap(dev, format_args!("sending failed: {e}"));
            }
            return Err(pvrun_abi::status::IO_ERROR);
        }
        Ok(i64::try_from(w).unwrap_or(i64::MAX))
    }

    /// Receives frames into posted buffers until the TAP device is empty or the buffers
    /// run out; returns true when it stopped for lack of buffers.
    fn receive(&mut self, dev: &DeviceCtx) -> Result<bool, RingError> {
        if self.gone {
            return Ok(false);
        }
        let mut received = 0u64;
        let waiting = loop {
            if self.rx.pending(&dev.mem)? == 0 {
                // Ask the guest to ring when it posts buffers, then look once more.
                if self.rx.idle_check(&dev.mem)? {
                    continue;
                }
                break true;
            }
            // Look at the next buffer without consuming it: it stays posted if no frame
            // is waiting. This one copy of the slot is the one acted on.
            let req: NetRxRequest = self.rx.peek(&dev.mem)?;
            let status = match RxBuffer::parse(&req, self.mtu, &dev.map) {
                Ok(buf) => match self.receive_one(dev, &buf) {
                    None => break false,
                    Some(s) => s,
                },
                Err(e) => e,
            };
            self.rx.advance();
            self.rx.respond(
                &dev.mem,
                NetResponse {
                    id: req.id,
                    status,
                    reserved: [0; 6],
                },
            );
            received += 1;
            if received.is_multiple_of(32) {
                self.rx.publish(&dev.mem);
                dev.notify.signal();
            }
        };
        if received > 0 {
            dev.stats.requests.fetch_add(received, Ordering::Relaxed);
            self.rx.publish(&dev.mem);
            dev.notify.signal();
        }
        Ok(waiting)
    }

    /// Reads one frame into a validated buffer: its length, a negative status, or `None`
    /// when no frame is waiting.
    fn receive_one(&mut self, dev: &DeviceCtx, buf: &RxBuffer) -> Option<i64> {
        let slice = match dev.mem.user_slice(&buf.buf) {
            Ok(s) => s,
            Err(e) => return Some(e.status()),
        };
        let guard = slice.ptr_guard_mut();
        // SAFETY: [ptr, ptr+len) is the validated guest slice, memory the guest may write.
        let r = unsafe { libc::read(self.tap.as_raw_fd(), guard.as_ptr().cast(), slice.len()) };
        if r < 0 {
            // Nothing waiting (EAGAIN), or the TAP interface is gone.
            let e = std::io::Error::last_os_error();
            if !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) {
                self.lose_tap(dev, format_args!("receiving failed: {e}"));
            }
            None
        } else {
            Some(i64::try_from(r).unwrap_or(i64::MAX))
        }
    }
}

impl Service for NetService {
    fn watch(&self) -> Option<(RawFd, i16)> {
        if self.gone {
            return None;
        }
        // Only listen to the TAP device while there are buffers to receive into.
        let events = if self.rx_waiting { 0 } else { libc::POLLIN };
        Some((self.tap.as_raw_fd(), events))
    }

    fn serve(&mut self, dev: &DeviceCtx, rang: bool, revents: i16) -> Result<(), RingError> {
        // poll reports these even when no event was asked for: without this check a TAP
        // interface deleted under us would wake the thread forever.
        if revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            let what = if revents & libc::POLLNVAL != 0 {
                "its descriptor is invalid"
            } else if revents & libc::POLLHUP != 0 {
                "poll reports a hang-up"
            } else {
                "poll reports an error"
            };
            self.lose_tap(dev, format_args!("{what}"));
        }
        if rang {
            self.rx_waiting = false;
        }
        self.transmit(dev)?;
        self.rx_waiting = self.receive(dev)?;
        Ok(())
    }

    fn mark_broken(&self, mem: &GuestMemoryMmap) {
        self.tx.mark_broken(mem);
        self.rx.mark_broken(mem);
    }
}
