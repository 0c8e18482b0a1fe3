//! Block request validation (one test per rejection), execution against a real file, and
//! random batches through ring, parser and disk.

use super::*;
use crate::devices::worker::test_map;
use crate::memory::GuestRam;
use vm_memory::{Bytes, GuestAddress};

const CAPACITY: u64 = 64 << 20;
/// A buffer the guest may read and write.
const BUF: u64 = 0x40_0000;

fn req(op: u32, sector: u64, addr: u64, len: u64) -> BlockRequest {
    BlockRequest {
        id: 7,
        op,
        reserved: 0,
        sector,
        addr,
        len,
        reserved2: [0; 3],
    }
}

fn parse(r: &BlockRequest) -> Result<BlockOp, i64> {
    BlockOp::parse(r, CAPACITY, false, &test_map())
}

fn parse_ro(r: &BlockRequest) -> Result<BlockOp, i64> {
    BlockOp::parse(r, CAPACITY, true, &test_map())
}

#[test]
fn good_requests_parse() {
    let map = test_map();
    let read = parse(&req(block_op::READ, 2, BUF, 1024)).unwrap();
    assert_eq!(
        read,
        BlockOp::Read {
            offset: 1024,
            buf: map.check_user(BUF, 1024, true).unwrap()
        }
    );
    let write = parse(&req(block_op::WRITE, 1, BUF, 512)).unwrap();
    assert!(matches!(write, BlockOp::Write { offset: 512, buf } if !buf.writable()));
    // Writes may come from read-only memory; reads of a read-only disk are fine.
    assert!(parse(&req(block_op::WRITE, 0, 0x10_0000, 512)).is_ok());
    assert!(parse_ro(&req(block_op::READ, 0, BUF, 512)).is_ok());
    // The last sector, and the largest request.
    assert!(parse(&req(block_op::READ, CAPACITY / 512 - 1, BUF, 512)).is_ok());
    assert!(parse(&req(block_op::READ, 0, BUF, MAX_REQUEST)).is_ok());
    assert_eq!(parse(&req(block_op::FLUSH, 9, 0, 3)), Ok(BlockOp::Flush));
}

#[test]
fn reserved_fields_must_be_zero() {
    let mut r = req(block_op::READ, 0, BUF, 512);
    r.reserved = 1;
    assert_eq!(parse(&r), Err(status::BAD_ARGUMENT));
    let mut r = req(block_op::READ, 0, BUF, 512);
    r.reserved2[2] = 1;
    assert_eq!(parse(&r), Err(status::BAD_ARGUMENT));
}

#[test]
fn an_unknown_op_is_refused() {
    assert_eq!(parse(&req(0, 0, BUF, 512)), Err(status::BAD_ARGUMENT));
    assert_eq!(parse(&req(99, 0, BUF, 512)), Err(status::BAD_ARGUMENT));
}

#[test]
fn a_zero_length_is_refused() {
    assert_eq!(
        parse(&req(block_op::READ, 0, BUF, 0)),
        Err(status::BAD_LENGTH)
    );
}

#[test]
fn a_length_that_is_not_whole_sectors_is_refused() {
    assert_eq!(
        parse(&req(block_op::READ, 0, BUF, 513)),
        Err(status::BAD_LENGTH)
    );
    assert_eq!(
        parse(&req(block_op::WRITE, 0, BUF, 100)),
        Err(status::BAD_LENGTH)
    );
}

#[test]
fn a_length_over_max_request_is_refused() {
    let r = req(block_op::READ, 0, BUF, MAX_REQUEST + SECTOR_SIZE);
    assert_eq!(parse(&r), Err(status::BAD_LENGTH));
}

#[test]
fn a_sector_whose_offset_overflows_is_refused() {
    // u64::MAX / 256 * 512 wraps to a small offset if multiplied unchecked.
    let sector = (1u64 << 55) + 1;
    assert_eq!(sector.wrapping_mul(SECTOR_SIZE), 512);
    assert_eq!(
        parse(&req(block_op::READ, sector, BUF, 512)),
        Err(status::OUT_OF_RANGE)
    );
}

#[test]
fn a_range_past_the_end_is_refused() {
    let last = CAPACITY / SECTOR_SIZE;
    assert_eq!(
        parse(&req(block_op::READ, last, BUF, 512)),
        Err(status::OUT_OF_RANGE)
    );
    assert_eq!(
        parse(&req(block_op::READ, last - 1, BUF, 1024)),
        Err(status::OUT_OF_RANGE)
    );
    // offset + len overflows.
    assert_eq!(
        parse(&req(block_op::READ, u64::MAX / SECTOR_SIZE, BUF, 1024)),
        Err(status::OUT_OF_RANGE)
    );
}

#[test]
fn a_write_to_a_read_only_disk_is_refused() {
    assert_eq!(
        parse_ro(&req(block_op::WRITE, 0, BUF, 512)),
        Err(status::READ_ONLY)
    );
}

#[test]
fn a_buffer_outside_guest_memory_is_refused() {
    for addr in [0, 0x1000, 0xc0_0000, 0xbf_ff00, 0xdead_0000_0000] {
        assert_eq!(
            parse(&req(block_op::READ, 0, addr, 512)),
            Err(status::BAD_ADDRESS),
            "{addr:#x}"
        );
        assert_eq!(
            parse(&req(block_op::WRITE, 0, addr, 512)),
            Err(status::BAD_ADDRESS),
            "{addr:#x}"
        );
    }
}

#[test]
fn a_read_into_read_only_memory_is_refused() {
    for addr in [0x10_0000, 0x20_0000, 0x3f_ff00] {
        assert_eq!(
            parse(&req(block_op::READ, 0, addr, 512)),
            Err(status::BAD_ADDRESS),
            "{addr:#x}"
        );
    }
}

#[test]
fn a_buffer_whose_end_overflows_is_refused() {
    let r = req(block_op::READ, 0, u64::MAX - 511, 1024);
    assert_eq!(parse(&r), Err(status::BAD_LENGTH));
}

fn disk(tag: &str, read_only: bool) -> (Disk, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!("pvrun-blk-{tag}-{}.img", std::process::id()));
    std::fs::write(&path, vec![0u8; 8192]).unwrap();
    let cfg = DiskConfig {
        name: "d".into(),
        path: path.clone(),
        read_only,
    };
    (Disk::open(&cfg).unwrap(), path)
}

#[test]
fn validated_requests_move_data_and_bad_ones_touch_nothing() {
    let ram = GuestRam::new(16 << 20).unwrap();
    let mem = ram.mem();
    let map = test_map();
    let (disk, path) = disk("rw", false);
    assert_eq!(disk.capacity, 8192);
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    mem.write_slice(&data, GuestAddress(BUF)).unwrap();
    let rsp = disk.handle(&req(block_op::WRITE, 3, BUF, 1024), mem, &map);
    assert_eq!((rsp.id, rsp.status), (7, 1024));
    let rsp = disk.handle(&req(block_op::READ, 3, BUF + 4096, 1024), mem, &map);
    assert_eq!(rsp.status, 1024);
    let mut back = vec![0u8; 1024];
    mem.read_slice(&mut back, GuestAddress(BUF + 4096)).unwrap();
    assert_eq!(back, data);
    assert_eq!(
        disk.handle(&req(block_op::FLUSH, 0, 0, 0), mem, &map)
            .status,
        0
    );
    // A read into text leaves the text alone.
    mem.write_slice(&[0xcc; 512], GuestAddress(0x20_0000))
        .unwrap();
    let rsp = disk.handle(&req(block_op::READ, 3, 0x20_0000, 512), mem, &map);
    assert_eq!(rsp.status, status::BAD_ADDRESS);
    let mut text = [0u8; 512];
    mem.read_slice(&mut text, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(text, [0xcc; 512]);
    drop(disk);
    let _ = std::fs::remove_file(path);
}

#[test]
fn random_requests_through_the_ring_never_panic_and_all_get_answers() {
    use crate::devices::worker::{DeviceStats, Notify};
    use std::sync::Arc;
    let ram = GuestRam::new(16 << 20).unwrap();
    let mem = ram.mem();
    let (disk, path) = disk("fuzz", false);
    let ring_at = 0xd0_0000;
    let slots = 16u32;
    let mut service = BlockService {
        disk,
        ring: Ring::new(mem, ring_at, slots),
    };
    let dev = DeviceCtx {
        name: "d".into(),
        mem: mem.clone(),
        map: test_map(),
        notify: Arc::new(Notify::new().unwrap()),
        stats: Arc::new(DeviceStats::default()),
    };
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let pick = |choices: &[u64], next: &mut dyn FnMut() -> u64| {
        let r = next();
        choices
            .get((r % (choices.len() as u64 + 1)) as usize)
            .copied()
            .unwrap_or_else(&mut *next)
    };
    let mut prod = 0u32;
    let mut answered = 0u64;
    for _ in 0..500 {
        let batch = (next() % u64::from(slots)) as u32 + 1;
        for _ in 0..batch {
            let r = BlockRequest {
                id: u64::from(prod),
                op: pick(&[0, 1, 2, 3, 4, u64::from(u32::MAX)], &mut next) as u32,
                reserved: if next() % 8 == 0 { 1 } else { 0 },
                sector: pick(
                    &[0, 1, 15, 16, u64::MAX, u64::MAX / 512, 1 << 55],
                    &mut next,
                ),
                addr: pick(
                    &[
                        BUF,
                        0,
                        0x1000,
                        0x20_0000,
                        0xbf_fe00,
                        0xc0_0000,
                        u64::MAX - 511,
                    ],
                    &mut next,
                ),
                len: pick(
                    &[0, 512, 513, 8192, MAX_REQUEST, MAX_REQUEST + 512],
                    &mut next,
                ),
                reserved2: [0; 3],
            };
            let slot = ring_at
                + pvrun_abi::RING_SLOTS_OFFSET
                + u64::from(prod % slots) * pvrun_abi::RING_SLOT_SIZE;
            mem.write_obj(r, GuestAddress(slot)).unwrap();
            prod = prod.wrapping_add(1);
        }
        mem.write_obj(prod, GuestAddress(ring_at)).unwrap();
        service.serve(&dev, true, 0).unwrap();
        answered += u64::from(batch);
        let header: pvrun_abi::RingHeader = mem.read_obj(GuestAddress(ring_at)).unwrap();
        assert_eq!(header.rsp_prod, prod);
        assert_eq!(header.req_event, prod.wrapping_add(1));
    }
    assert_eq!(dev.stats.counters().requests, answered);
    // A producer too far ahead is a ring error, not a panic.
    mem.write_obj(prod.wrapping_add(slots + 1), GuestAddress(ring_at))
        .unwrap();
    assert!(service.serve(&dev, true, 0).is_err());
    drop(service);
    let _ = std::fs::remove_file(path);
}
