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

mod tap;
mod worker;

use pvrun_abi::{NetRxRequest, NetTxRequest, status};

use super::worker::check_device_name;
use crate::memory::{MemoryMap, UserRange};

pub use tap::{Tap, check_tap_name, is_gone};
pub use worker::NetService;

/// Default MTU (largest IP packet).
pub const DEFAULT_MTU: u32 = 1500;
/// Ethernet header bytes before the IP packet.
pub const ETH_HEADER: u32 = pvrun_abi::ETH_HEADER;

/// A `--net NAME=tap:IFNAME[,mac=..][,ip=A.B.C.D/N][,gw=A.B.C.D][,mtu=N][,mac-spoof=allow]`
/// option.
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
    /// Forward frames whatever their source MAC address (`mac-spoof=allow`). By default
    /// a frame whose source is not [`NetConfig::mac`] is dropped and counted, so a guest
    /// cannot impersonate other hosts on the TAP's network.
    pub allow_mac_spoof: bool,
}

fn parse_ipv4(s: &str) -> Result<[u8; 4], String> {
    let a: std::net::Ipv4Addr = s
        .parse()
        .map_err(|_| format!("`{s}` is not an IPv4 address"))?;
    Ok(a.octets())
}

impl NetConfig {
    /// Parses `NAME=tap:IFNAME[,mac=..][,ip=A.B.C.D/N][,gw=A.B.C.D][,mtu=N][,mac-spoof=allow]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}` is not NAME=tap:IFNAME[,mac=..][,ip=..][,gw=..]"))?;
        check_device_name(name)?;
        let mut parts = rest.split(',');
        let tap = parts
            .next()
            .and_then(|t| t.strip_prefix("tap:"))
            .filter(|t| !t.is_empty() && t.len() < 16)
            .ok_or_else(|| format!("network `{name}` needs `tap:IFNAME` (an interface name of at most 15 characters)"))?;
        check_tap_name(tap)?;
        let mut cfg = NetConfig {
            name: name.to_string(),
            tap: tap.to_string(),
            mac: random_mac(),
            ip: None,
            gateway: None,
            mtu: DEFAULT_MTU,
            allow_mac_spoof: false,
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
                "mac-spoof" => {
                    cfg.allow_mac_spoof = match v {
                        "allow" => true,
                        "deny" => false,
                        _ => return Err(format!("mac-spoof `{v}` must be `allow` or `deny`")),
                    }
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

/// The largest frame for `mtu`: an Ethernet header and an IP packet of `mtu` bytes.
pub fn max_frame(mtu: u32) -> u64 {
    u64::from(ETH_HEADER) + u64::from(mtu)
}

/// A transmit request that passed validation: the frame's bytes in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxFrame {
    /// The frame (14 ..= 14 + mtu bytes the guest may read).
    pub buf: UserRange,
}

impl TxFrame {
    /// Validates a transmit request copied out of its slot: flags and reserved fields
    /// zero, a length of 14 ..= 14 + `mtu`, a buffer the guest may read.
    pub fn parse(req: &NetTxRequest, mtu: u32, map: &MemoryMap) -> Result<TxFrame, i64> {
        if req.flags != 0 || req.reserved != [0; 5] {
            return Err(status::BAD_ARGUMENT);
        }
        let len = u64::from(req.len);
        if len < u64::from(ETH_HEADER) || len > max_frame(mtu) {
            return Err(status::BAD_LENGTH);
        }
        let buf = map
            .check_user(req.addr, len, false)
            .map_err(|e| e.status())?;
        Ok(TxFrame { buf })
    }
}

/// Checks the source MAC address of a copied frame (at least [`ETH_HEADER`] bytes, as
/// [`TxFrame::parse`] ensures): with `required` set, it must be that address.
pub fn check_source_mac(frame: &[u8], required: Option<[u8; 6]>) -> Result<(), i64> {
    match required {
        None => Ok(()),
        Some(mac) if frame.get(6..12) == Some(&mac[..]) => Ok(()),
        Some(_) => Err(status::BAD_ARGUMENT),
    }
}

/// A receive buffer that passed validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxBuffer {
    /// The buffer (at least 14 + mtu bytes the guest may write).
    pub buf: UserRange,
}

impl RxBuffer {
    /// Validates a receive request copied out of its slot: flags and reserved fields zero,
    /// room for a whole frame (14 + `mtu` bytes or more), memory the guest may write.
    pub fn parse(req: &NetRxRequest, mtu: u32, map: &MemoryMap) -> Result<RxBuffer, i64> {
        if req.flags != 0 || req.reserved != [0; 5] {
            return Err(status::BAD_ARGUMENT);
        }
        let len = u64::from(req.len);
        if len < max_frame(mtu) {
            return Err(status::BAD_LENGTH);
        }
        // The kernel writes the frame straight into guest memory the guest may write.
        let buf = map
            .check_user(req.addr, len, true)
            .map_err(|e| e.status())?;
        Ok(RxBuffer { buf })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::worker::test_map;

    const BUF: u64 = 0x40_0000;
    const MTU: u32 = 1500;

    fn tx(addr: u64, len: u32) -> NetTxRequest {
        NetTxRequest {
            id: 1,
            addr,
            len,
            flags: 0,
            reserved: [0; 5],
        }
    }

    fn rx(addr: u64, len: u32) -> NetRxRequest {
        NetRxRequest {
            id: 2,
            addr,
            len,
            flags: 0,
            reserved: [0; 5],
        }
    }

    #[test]
    fn good_frames_and_buffers_parse() {
        let map = test_map();
        let f = TxFrame::parse(&tx(BUF, 60), MTU, &map).unwrap();
        assert_eq!((f.buf.addr(), f.buf.len()), (BUF, 60));
        assert!(TxFrame::parse(&tx(BUF, 14), MTU, &map).is_ok());
        assert!(TxFrame::parse(&tx(BUF, 1514), MTU, &map).is_ok());
        // Frames may come from read-only memory.
        assert!(TxFrame::parse(&tx(0x10_0000, 60), MTU, &map).is_ok());
        let b = RxBuffer::parse(&rx(BUF, 2048), MTU, &map).unwrap();
        assert_eq!(
            (b.buf.addr(), b.buf.len(), b.buf.writable()),
            (BUF, 2048, true)
        );
        assert!(RxBuffer::parse(&rx(BUF, 1514), MTU, &map).is_ok());
    }

    #[test]
    fn frames_from_another_source_mac_are_refused_unless_allowed() {
        let mac = [0x02, 1, 2, 3, 4, 5];
        let mut frame = [0u8; 60];
        frame[..6].fill(0xff);
        frame[6..12].copy_from_slice(&mac);
        assert_eq!(check_source_mac(&frame, Some(mac)), Ok(()));
        assert_eq!(check_source_mac(&frame, None), Ok(()));
        for i in 6..12 {
            let mut spoofed = frame;
            spoofed[i] ^= 1;
            assert_eq!(
                check_source_mac(&spoofed, Some(mac)),
                Err(status::BAD_ARGUMENT),
                "byte {i}"
            );
            assert_eq!(check_source_mac(&spoofed, None), Ok(()));
        }
        // The destination does not count.
        let mut to_self = frame;
        to_self[..6].copy_from_slice(&mac);
        to_self[6..12].fill(0xff);
        assert_eq!(
            check_source_mac(&to_self, Some(mac)),
            Err(status::BAD_ARGUMENT)
        );
        assert_eq!(
            check_source_mac(&frame[..8], Some(mac)),
            Err(status::BAD_ARGUMENT)
        );
    }

    #[test]
    fn odd_tap_names_are_refused() {
        assert!(NetConfig::parse("eth0=tap:a b").is_err());
        assert!(NetConfig::parse("eth0=tap:a/b").is_err());
        let e = NetConfig::parse("eth0=tap:a\x1bb").unwrap_err();
        assert!(!e.chars().any(|c| c.is_control()), "{e:?}");
        assert!(check_tap_name(&"t".repeat(16)).is_err());
        assert!(check_tap_name("tap0").is_ok());
    }

    #[test]
    fn source_mac_checking_is_the_default_and_can_be_turned_off() {
        let c = NetConfig::parse("eth0=tap:tap0,mac=02:00:00:00:00:01").unwrap();
        assert_eq!(c.mac, [2, 0, 0, 0, 0, 1]);
        assert!(!c.allow_mac_spoof);
        assert!(
            NetConfig::parse("eth0=tap:tap0,mac-spoof=allow")
                .unwrap()
                .allow_mac_spoof
        );
        assert!(
            !NetConfig::parse("eth0=tap:tap0,mac-spoof=deny")
                .unwrap()
                .allow_mac_spoof
        );
        assert!(NetConfig::parse("eth0=tap:tap0,mac-spoof=yes").is_err());
    }

    #[test]
    fn tx_flags_and_reserved_fields_must_be_zero() {
        let map = test_map();
        let mut r = tx(BUF, 60);
        r.flags = 1;
        assert_eq!(TxFrame::parse(&r, MTU, &map), Err(status::BAD_ARGUMENT));
        let mut r = tx(BUF, 60);
        r.reserved[4] = 1;
        assert_eq!(TxFrame::parse(&r, MTU, &map), Err(status::BAD_ARGUMENT));
    }

    #[test]
    fn tx_frames_shorter_than_a_header_are_refused() {
        let map = test_map();
        for len in [0, 1, 13] {
            assert_eq!(
                TxFrame::parse(&tx(BUF, len), MTU, &map),
                Err(status::BAD_LENGTH),
                "{len}"
            );
        }
    }

    #[test]
    fn tx_frames_over_the_mtu_are_refused() {
        let map = test_map();
        assert_eq!(
            TxFrame::parse(&tx(BUF, 1515), MTU, &map),
            Err(status::BAD_LENGTH)
        );
        assert_eq!(
            TxFrame::parse(&tx(BUF, u32::MAX), MTU, &map),
            Err(status::BAD_LENGTH)
        );
        assert_eq!(
            TxFrame::parse(&tx(BUF, 1515), 1501, &map).map(|f| f.buf.len()),
            Ok(1515)
        );
    }

    #[test]
    fn tx_frames_outside_guest_memory_are_refused() {
        let map = test_map();
        for addr in [0, 0x1000, 0xc0_0000, 0xbf_ffd0] {
            assert_eq!(
                TxFrame::parse(&tx(addr, 60), MTU, &map),
                Err(status::BAD_ADDRESS),
                "{addr:#x}"
            );
        }
        assert_eq!(
            TxFrame::parse(&tx(u64::MAX - 10, 60), MTU, &map),
            Err(status::BAD_LENGTH)
        );
    }

    #[test]
    fn rx_flags_and_reserved_fields_must_be_zero() {
        let map = test_map();
        let mut r = rx(BUF, 2048);
        r.flags = 0x8000_0000;
        assert_eq!(RxBuffer::parse(&r, MTU, &map), Err(status::BAD_ARGUMENT));
        let mut r = rx(BUF, 2048);
        r.reserved[0] = 1;
        assert_eq!(RxBuffer::parse(&r, MTU, &map), Err(status::BAD_ARGUMENT));
    }

    #[test]
    fn rx_buffers_smaller_than_a_whole_frame_are_refused() {
        let map = test_map();
        for len in [0, 14, 1500, 1513] {
            assert_eq!(
                RxBuffer::parse(&rx(BUF, len), MTU, &map),
                Err(status::BAD_LENGTH),
                "{len}"
            );
        }
        assert_eq!(
            RxBuffer::parse(&rx(BUF, 9013), 9000, &map),
            Err(status::BAD_LENGTH)
        );
    }

    #[test]
    fn rx_buffers_the_guest_may_not_write_are_refused() {
        let map = test_map();
        // Read-only data, text, host structures, unmapped, running off the end.
        for addr in [0x10_0000, 0x20_0000, 0x1000, 0, 0xc0_0000, 0xbf_fc00] {
            assert_eq!(
                RxBuffer::parse(&rx(addr, 2048), MTU, &map),
                Err(status::BAD_ADDRESS),
                "{addr:#x}"
            );
        }
        assert_eq!(
            RxBuffer::parse(&rx(u64::MAX - 100, 2048), MTU, &map),
            Err(status::BAD_LENGTH)
        );
    }
}

/// Bounded fuzzing of what a guest hands a network device (see `crate::fuzz` for the
/// harness and `PVRUN_FUZZ_ITERS` / `PVRUN_FUZZ_SEED`): transmit and receive requests
/// against an independent model of what must be accepted, source-MAC checks on random
/// frames, and a hostile guest driving both rings with scribbled indices and slots.
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::devices::ring::Ring;
    use crate::devices::worker::test_map;
    use crate::fuzz::{Rng, run};
    use crate::memory::GuestRam;
    use pvrun_abi::{NetResponse, RING_SLOT_SIZE, RING_SLOTS_OFFSET, RingHeader};
    use vm_memory::{Bytes, GuestAddress};

    /// `test_map`'s user memory: readable `[1 MiB, 12 MiB)`, writable from 4 MiB.
    const READ: (u64, u64) = (0x10_0000, 0xc0_0000);
    const WRITE: (u64, u64) = (0x40_0000, 0xc0_0000);

    fn mtu(rng: &mut Rng) -> u32 {
        match rng.below(4) {
            0 => DEFAULT_MTU,
            1 => 68 + rng.below(9000) as u32,
            2 => rng.edgy() as u32,
            _ => [0, 1, 9000, 65535, u32::MAX][rng.below(5) as usize],
        }
    }

    /// An address near the map's edges, or anywhere.
    fn addr(rng: &mut Rng) -> u64 {
        let edges = [0, 0x1000, READ.0, 0x20_0000, WRITE.0, READ.1, u64::MAX];
        match rng.below(3) {
            0 => edges[rng.below(edges.len() as u64) as usize]
                .wrapping_add(rng.below(0x4000))
                .wrapping_sub(0x2000),
            1 => READ.0 + rng.below(READ.1 - READ.0),
            _ => rng.edgy(),
        }
    }

    fn len(rng: &mut Rng, mtu: u32) -> u32 {
        match rng.below(3) {
            0 => (max_frame(mtu) as u32)
                .wrapping_add(rng.below(5) as u32)
                .wrapping_sub(2),
            1 => ETH_HEADER.wrapping_add(rng.below(5) as u32).wrapping_sub(2),
            _ => rng.edgy() as u32,
        }
    }

    /// Mostly-zero flags and reserved fields (a rare non-zero one must be refused).
    fn junk(rng: &mut Rng) -> (u32, [u64; 5]) {
        let mut reserved = [0u64; 5];
        let flags = if rng.below(8) == 0 {
            rng.edgy() as u32
        } else {
            0
        };
        if rng.below(8) == 0 {
            reserved[rng.below(5) as usize] = rng.edgy();
        }
        (flags, reserved)
    }

    fn inside(addr: u64, len: u64, (lo, hi): (u64, u64)) -> bool {
        addr.checked_add(len)
            .is_some_and(|end| addr >= lo && end <= hi)
    }

    #[test]
    fn fuzz_tx_frames_match_the_model() {
        let map = test_map();
        run("net tx frames", 20_000, |rng| {
            let mtu = mtu(rng);
            let (flags, reserved) = junk(rng);
            let req = NetTxRequest {
                id: rng.next(),
                addr: addr(rng),
                len: len(rng, mtu),
                flags,
                reserved,
            };
            let l = u64::from(req.len);
            let valid = flags == 0
                && reserved == [0; 5]
                && l >= u64::from(ETH_HEADER)
                && l <= max_frame(mtu)
                && inside(req.addr, l, READ);
            match TxFrame::parse(&req, mtu, &map) {
                Ok(f) => {
                    assert!(valid, "accepted {req:?} (mtu {mtu})");
                    assert_eq!((f.buf.addr(), f.buf.len()), (req.addr, l));
                }
                Err(s) => {
                    assert!(!valid, "refused {req:?} (mtu {mtu}): {s}");
                    assert!(
                        [
                            status::BAD_ARGUMENT,
                            status::BAD_LENGTH,
                            status::BAD_ADDRESS
                        ]
                        .contains(&s),
                        "status {s}"
                    );
                }
            }
        });
    }

    #[test]
    fn fuzz_rx_buffers_match_the_model() {
        let map = test_map();
        run("net rx buffers", 20_000, |rng| {
            let mtu = mtu(rng);
            let (flags, reserved) = junk(rng);
            let req = NetRxRequest {
                id: rng.next(),
                addr: addr(rng),
                len: len(rng, mtu),
                flags,
                reserved,
            };
            let l = u64::from(req.len);
            let valid = flags == 0
                && reserved == [0; 5]
                && l >= max_frame(mtu)
                && inside(req.addr, l, WRITE);
            match RxBuffer::parse(&req, mtu, &map) {
                Ok(b) => {
                    assert!(valid, "accepted {req:?} (mtu {mtu})");
                    assert!(b.buf.writable());
                    assert_eq!((b.buf.addr(), b.buf.len()), (req.addr, l));
                }
                Err(s) => {
                    assert!(!valid, "refused {req:?} (mtu {mtu}): {s}");
                    assert!(
                        [
                            status::BAD_ARGUMENT,
                            status::BAD_LENGTH,
                            status::BAD_ADDRESS
                        ]
                        .contains(&s),
                        "status {s}"
                    );
                }
            }
        });
    }

    #[test]
    fn fuzz_source_mac_checks() {
        run("net source mac", 20_000, |rng| {
            let n = rng.below(40) as usize;
            let frame: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            let mut mac = [0u8; 6];
            mac.iter_mut().for_each(|b| *b = rng.next() as u8);
            if n >= 12 && rng.below(2) == 0 {
                mac.copy_from_slice(&frame[6..12]);
            }
            let r = check_source_mac(&frame, Some(mac));
            assert_eq!(
                r.is_ok(),
                n >= 12 && frame[6..12] == mac,
                "{frame:?} {mac:?}"
            );
            assert!(check_source_mac(&frame, None).is_ok());
        });
    }

    /// A guest that scribbles on both rings' headers and slots between the host's steps:
    /// the host sees exactly `req_prod - its own consumer index` new requests (never more
    /// than a ring holds: more breaks the ring), publishes its own `rsp_prod` and
    /// `req_event` whatever the guest wrote there, acts only on requests its parser
    /// accepted, and never panics.
    #[test]
    fn fuzz_hostile_guest_on_the_net_rings() {
        const TX: u64 = 0x50_0000;
        const RX: u64 = 0x60_0000;
        const SLOTS: u32 = 16;
        let ram = GuestRam::new(16 << 20).unwrap();
        let map = test_map();
        run("net rings", 2_000, |rng| {
            let mem = ram.mem();
            let mtu = mtu(rng);
            let start = rng.edgy() as u32;
            let mut rings = [
                (TX, Ring::new(mem, TX, SLOTS)),
                (RX, Ring::new(mem, RX, SLOTS)),
            ];
            // Both rings start at the guest's chosen index (header writes by the guest).
            let mut prod = [start, start];
            // The host's private consumer index, as a model.
            let mut cons = [0u32; 2];
            for (base, _) in &rings {
                let h = RingHeader {
                    req_prod: start,
                    ..Default::default()
                };
                mem.write_obj(h, GuestAddress(*base)).unwrap();
            }
            let mut broken = [false; 2];
            // The host's rings start at 0: a guest start far from it must break them.
            for _ in 0..64 {
                let which = rng.below(2) as usize;
                let base = rings[which].0;
                match rng.below(6) {
                    // Publish a well-formed or mangled request.
                    0..=2 => {
                        let (flags, reserved) = junk(rng);
                        let slot = base
                            + RING_SLOTS_OFFSET
                            + u64::from(prod[which] % SLOTS) * RING_SLOT_SIZE;
                        let req = NetTxRequest {
                            id: rng.next(),
                            addr: addr(rng),
                            len: len(rng, mtu),
                            flags,
                            reserved,
                        };
                        mem.write_obj(req, GuestAddress(slot)).unwrap();
                        prod[which] = prod[which].wrapping_add(1);
                        mem.write_obj(prod[which], GuestAddress(base)).unwrap();
                    }
                    // Scribble on the header or a slot.
                    3 => {
                        let off = rng.below(RING_SLOTS_OFFSET + u64::from(SLOTS) * RING_SLOT_SIZE);
                        mem.write_obj(rng.next() as u8, GuestAddress(base + off))
                            .unwrap();
                    }
                    // Jump the producer index anywhere.
                    4 => {
                        prod[which] = rng.edgy() as u32;
                        mem.write_obj(prod[which], GuestAddress(base)).unwrap();
                    }
                    // The host serves the ring.
                    _ => {
                        if broken[which] {
                            continue;
                        }
                        let ring = &mut rings[which].1;
                        let h: RingHeader = mem.read_obj(GuestAddress(base)).unwrap();
                        let expect = h.req_prod.wrapping_sub(cons[which]);
                        match ring.pending(mem) {
                            Err(_) => {
                                assert!(expect > SLOTS, "refused {expect} pending");
                                ring.mark_broken(mem);
                                broken[which] = true;
                            }
                            Ok(n) => {
                                assert_eq!(n, expect, "pending");
                                assert!(n <= SLOTS, "{n} pending in a {SLOTS}-slot ring");
                                for _ in 0..n {
                                    let status = if which == 0 {
                                        let req: NetTxRequest = ring.take(mem).unwrap();
                                        TxFrame::parse(&req, mtu, &map).map(|f| {
                                            assert!(inside(f.buf.addr(), f.buf.len(), READ));
                                            f.buf.len() as i64
                                        })
                                    } else {
                                        let req: NetRxRequest = ring.take(mem).unwrap();
                                        RxBuffer::parse(&req, mtu, &map).map(|b| {
                                            assert!(inside(b.buf.addr(), b.buf.len(), WRITE));
                                            0
                                        })
                                    };
                                    let status = status.unwrap_or_else(|e| e);
                                    ring.respond(
                                        mem,
                                        NetResponse {
                                            id: 0,
                                            status,
                                            reserved: [0; 6],
                                        },
                                    );
                                }
                                cons[which] = cons[which].wrapping_add(n);
                                ring.publish(mem);
                                let _ = ring.idle_check(mem);
                                let h: RingHeader = mem.read_obj(GuestAddress(base)).unwrap();
                                assert_eq!(h.rsp_prod, cons[which], "rsp_prod");
                                assert_eq!(h.req_event, cons[which].wrapping_add(1), "req_event");
                            }
                        }
                    }
                }
            }
        });
    }
}
