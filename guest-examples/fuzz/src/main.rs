//! A guest-side fuzzer of the host: seeded random hypercalls, argument structs and ring
//! traffic, to check that the host answers every one of them with a documented status
//! (or marks a device ring broken) and never crashes, hangs or touches memory outside
//! what the guest may access.
//!
//! Modes:
//! - `fuzz SEED ITERATIONS [--disk]`: ITERATIONS random actions. Each picks a hypercall
//!   number in `0..0x40` with `rdi` from null, small ints, unaligned values, random u64,
//!   the edges of every region of the boot-info memory map, host-only memory and the page
//!   tables; or an argument struct of a real call filled with edge-case fields; with
//!   `--disk`, also random block requests and index games on the ring of the device
//!   named `disk`. Ends with `fuzz done iterations=N seed=S errors=E ok=K` and
//!   `fuzz violations=V` (answers that contradict docs/ABI.md; each of the first ones is
//!   printed as `violation: ...`), and exits 0.
//! - `fuzz-console SEED`: random writes into the console ring header and data, flushed,
//!   until the host stops the guest with a protocol fault (status 139); exits 3 if the
//!   host never does.
//!
//! The guest stays memory safe: random addresses are only handed to the host, never
//! dereferenced here, and every argument that would make the host write guest memory
//! (block reads, host-call outputs) and that names memory the guest may write is
//! redirected into a scratch buffer kept for that. Calls that would end the run when
//! valid (EXIT, ABORT, FN_READY, FN_RETURN) or sleep (WAIT) only get arguments the host
//! must refuse (ABORT is never issued) or a deadline at most 1 ms away.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::vec;
use alloc::vec::Vec;
use core::arch::asm;
use core::sync::atomic::{Ordering, fence};

use pvrun::abi::{
    self, BlockRequest, BlockResponse, ConsoleWrite, Exit, FnReady, FnReturn, HostCall, Wait,
    block_op, call as nr, perm, status,
};
use pvrun::println;

pvrun::entry!(main);

/// SplitMix64: a seeded, tiny, good-enough PRNG.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `1/n`.
    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

/// Canary values for the registers a hypercall must not change.
const CANARY: [u64; 7] = [
    0x1111_2222_3333_4444,
    0x5555_6666_7777_8888,
    0x9999_aaaa_bbbb_cccc,
    0xdddd_eeee_ffff_0001,
    0x0123_4567_89ab_cdef,
    0xfedc_ba98_7654_3210,
    0x0f0f_0f0f_f0f0_f0f0,
];

/// The value `rax` holds going in: doorbells of attached devices must leave it unchanged.
const RAX_IN: u64 = 0x7a7a_7a7a_7a7a_7a7a;

/// Issues hypercall `nr` with `rdi = arg`; returns `rax` and whether every other register
/// the asm can observe (rdi, rdx, rcx, rsi, r8-r11) came back unchanged.
///
/// # Safety
/// The host may read, and for some calls write, the memory `arg` names.
unsafe fn hypercall(nr: u16, arg: u64) -> (i64, bool) {
    let port = (abi::HYPERCALL_PORT_BASE + nr) as u64;
    let mut rax = RAX_IN;
    let (mut rdi, mut rdx) = (arg, port);
    let [mut rcx, mut rsi, mut r8, mut r9, mut r10, mut r11, _] = CANARY;
    // SAFETY: `out` to a hypercall port exits to the host; the caller vouches for `arg`.
    unsafe {
        asm!(
            "out dx, al",
            inout("rax") rax,
            inout("rdi") rdi,
            inout("rdx") rdx,
            inout("rcx") rcx,
            inout("rsi") rsi,
            inout("r8") r8,
            inout("r9") r9,
            inout("r10") r10,
            inout("r11") r11,
            options(nostack, preserves_flags),
        );
    }
    let kept = rdi == arg
        && rdx == port
        && [rcx, rsi, r8, r9, r10, r11]
            == [
                CANARY[0], CANARY[1], CANARY[2], CANARY[3], CANARY[4], CANARY[5],
            ];
    (rax as i64, kept)
}

/// A region of the guest memory map (from boot info).
#[derive(Clone, Copy)]
struct Region {
    start: u64,
    end: u64,
    flags: u32,
}

/// An 8-aligned buffer that argument structs are built in.
#[repr(C, align(64))]
struct ArgBuf([u8; 256]);

/// The raw ring of the block device `disk`.
struct Ring {
    header: u64,
    slots: u32,
    doorbell: u16,
    capacity: u64,
    max_request: u64,
    /// Requests published (our `req_prod_pvt`); also the host's consumer once answered.
    prod: u32,
    broken: bool,
}

impl Ring {
    fn load(&self, off: u64) -> u32 {
        // SAFETY: the ring header lies in the device area, mapped read-write for us.
        unsafe { ((self.header + off) as *const u32).read_volatile() }
    }

    fn store(&self, off: u64, v: u32) {
        // SAFETY: as in `load`; scribbling on the header is part of the fuzzing.
        unsafe { ((self.header + off) as *mut u32).write_volatile(v) }
    }

    fn slot(&self, idx: u32) -> u64 {
        self.header + abi::RING_SLOTS_OFFSET + (idx % self.slots) as u64 * abi::RING_SLOT_SIZE
    }

    fn write_slot(&self, idx: u32, words: [u64; 8]) {
        let p = self.slot(idx) as *mut u64;
        for (i, w) in words.iter().enumerate() {
            // SAFETY: the slot lies inside the ring in the device area.
            unsafe { p.add(i).write_volatile(*w) };
        }
    }

    fn publish(&self, new: u32) {
        fence(Ordering::Release);
        self.store(0, new);
        // SAFETY: mfence only orders memory accesses.
        unsafe { asm!("mfence", options(nostack, preserves_flags)) };
    }
}

/// A block request as 8 words (the slot layout of `BlockRequest`).
fn block_words(r: &BlockRequest) -> [u64; 8] {
    [
        r.id,
        r.op as u64 | (r.reserved as u64) << 32,
        r.sector,
        r.addr,
        r.len,
        r.reserved2[0],
        r.reserved2[1],
        r.reserved2[2],
    ]
}

struct Fuzz {
    rng: Rng,
    regions: Vec<Region>,
    mem_size: u64,
    stack_start: u64,
    /// Where host writes into guest-writable memory are redirected.
    scratch: Vec<u8>,
    args: alloc::boxed::Box<ArgBuf>,
    /// Doorbell numbers of attached devices.
    doorbells: Vec<u16>,
    ring: Option<Ring>,
    errors: u64,
    ok: u64,
    violations: u64,
    next_id: u64,
    /// Print details of the calls that may end the run (`--trace`).
    trace: bool,
}

/// A status docs/ABI.md defines.
fn documented(s: i64) -> bool {
    s >= 0 || (status::HOST_FN_FAILED..=status::UNKNOWN_CALL).contains(&s)
}

const MAX_VIOLATION_REPORTS: u64 = 20;

impl Fuzz {
    fn violation(&mut self, what: core::fmt::Arguments<'_>) {
        self.violations += 1;
        if self.violations <= MAX_VIOLATION_REPORTS {
            println!("violation: {what}");
        }
    }

    /// True if every byte of `[addr, addr+len)` lies in regions with all of `need` (an
    /// empty range always does, as for the host).
    fn covered(&self, addr: u64, len: u64, need: u32) -> bool {
        if len == 0 {
            return true;
        }
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        let mut cur = addr;
        while cur < end {
            match self
                .regions
                .iter()
                .find(|r| r.start <= cur && cur < r.end && r.flags & need == need)
            {
                Some(r) => cur = r.end,
                None => return false,
            }
        }
        true
    }

    fn readable_struct(&self, addr: u64, size: u64) -> bool {
        addr.is_multiple_of(8) && self.covered(addr, size, perm::R)
    }

    /// End of the region holding `addr`, if any.
    fn region_end(&self, addr: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| r.start <= addr && addr < r.end)
            .map(|r| r.end)
    }

    /// A guest address for an object of `size` bytes, from the interesting classes.
    fn ptr(&mut self, size: u64) -> u64 {
        let size = size.max(1);
        match self.rng.below(10) {
            0 => self.rng.pick(&[0, 1, 8, 16, 0x40, 0xff8, 0xfff]),
            1 => self.rng.below(0x1000),
            2 => {
                let p = self.ptr(size);
                p.wrapping_add(1 + self.rng.below(7))
            }
            3 => self.rng.next(),
            4..=6 => {
                let r = self.regions[self.rng.below(self.regions.len() as u64) as usize];
                let len = r.end - r.start;
                let inside = r.start + (self.rng.below(len.max(1)) & !7);
                self.rng.pick(&[
                    r.start,
                    r.start.wrapping_sub(size),
                    r.start.wrapping_sub(8),
                    inside,
                    inside,
                    r.end.wrapping_sub(size),
                    r.end.wrapping_sub(size).wrapping_add(8),
                    r.end.wrapping_sub(8),
                    r.end,
                    r.end.wrapping_add(8),
                ])
            }
            7 => 0x1000 + (self.rng.below(0x7000) & !7),
            8 => 0x10_0000 + (self.rng.below(0x10_0000) & !7),
            _ => self.rng.pick(&[
                self.mem_size - 8,
                self.mem_size,
                self.mem_size.wrapping_sub(size),
                self.stack_start - 8,
                self.stack_start - 0x10_0000,
                0x7fff_ffff_f000,
                u64::MAX - 7,
                u64::MAX,
                1 << 47,
                0x8000_0000_0000_0000,
            ]),
        }
    }

    /// A length for a buffer at `addr` whose call allows at most `max` bytes.
    fn len(&mut self, addr: u64, max: u64) -> u64 {
        let fit = self.region_end(addr).map_or(512, |e| e - addr);
        match self.rng.below(16) {
            0 => 0,
            1 => 1,
            2 => self.rng.pick(&[2, 7, 8, 15, 16, 24, 511, 512, 513, 4096]),
            3 => max,
            4 => max + 1,
            5 => max.saturating_sub(1),
            6 => u64::MAX,
            7 => u64::MAX - addr,
            8 => 0u64.wrapping_sub(addr),
            9 | 10 => fit,
            11 => fit + 1,
            12 => fit.saturating_sub(1),
            13 => self.rng.next(),
            _ => 1 + self.rng.below(max.max(1) * 2),
        }
    }

    /// `addr` unless the host may legitimately write `[addr, addr+len)` (then a place of
    /// the same alignment inside the scratch buffer), so host writes land only there.
    fn write_target(&mut self, addr: u64, len: u64) -> u64 {
        if len == 0 || !self.covered(addr, len, perm::R | perm::W) {
            return addr;
        }
        let base = self.scratch.as_ptr() as u64;
        let room = (self.scratch.len() as u64).saturating_sub(len);
        base + (self.rng.below(room / 512 + 1) * 512 + (addr & 511)).min(room)
    }

    /// An address the host cannot read an object of `size` bytes at (so a call that would
    /// act on valid arguments is refused).
    fn unreadable_ptr(&mut self, size: u64) -> u64 {
        for _ in 0..32 {
            let p = self.ptr(size);
            if !self.readable_struct(p, size) {
                return p;
            }
        }
        0
    }

    /// A buffer address the host cannot read `len` (> 0) bytes at.
    fn unreadable_buf(&mut self, len: u64) -> u64 {
        for _ in 0..32 {
            let p = self.ptr(len);
            if !self.covered(p, len, perm::R) {
                return p;
            }
        }
        0
    }

    /// Records status `s` of a call: documented, and consistent with `expect_ok` (`None`:
    /// no prediction).
    fn record(&mut self, what: &str, nr: u16, s: i64, kept: bool, expect_ok: Option<bool>) {
        if s < 0 {
            self.errors += 1;
        } else {
            self.ok += 1;
        }
        if !kept {
            self.violation(format_args!("call {nr:#x} ({what}) changed a register"));
        }
        if !documented(s) {
            self.violation(format_args!(
                "call {nr:#x} ({what}) returned undocumented {s}"
            ));
        }
        if let Some(ok) = expect_ok
            && ok != (s >= 0)
        {
            self.violation(format_args!(
                "call {nr:#x} ({what}) returned {s}, expected {}",
                if ok { "success" } else { "an error" }
            ));
        }
    }

    /// Places `bytes` in the argument buffer, 8-aligned or (sometimes) not; returns its
    /// address and whether it is aligned.
    fn place(&mut self, bytes: &[u8]) -> (u64, bool) {
        let off = if self.rng.one_in(6) {
            1 + self.rng.below(7) as usize
        } else {
            0
        };
        self.args.0.fill(0);
        self.args.0[off..off + bytes.len()].copy_from_slice(bytes);
        (self.args.0.as_ptr() as u64 + off as u64, off == 0)
    }

    fn raw_call(&mut self) {
        let mut n = self.rng.below(abi::HYPERCALL_PORT_COUNT as u64) as u16;
        while n == nr::ABORT {
            n = self.rng.below(abi::HYPERCALL_PORT_COUNT as u64) as u16;
        }
        // Calls that act on valid arguments in ways that end or stall the run, or print
        // the guest's bytes on stderr, only get addresses the host cannot read them at.
        let dangerous = [
            nr::CONSOLE_WRITE,
            nr::EXIT,
            nr::WAIT,
            nr::FN_READY,
            nr::FN_RETURN,
        ];
        let size = match n {
            nr::EXIT | nr::WAIT => 8,
            nr::CONSOLE_WRITE | nr::FN_RETURN => 24,
            nr::FN_READY => 32,
            _ => 48,
        };
        let arg = if dangerous.contains(&n) {
            self.unreadable_ptr(size)
        } else {
            self.ptr(48)
        };
        if self.trace && dangerous.contains(&n) {
            println!("raw {n} at {arg:#x}");
        }
        // SAFETY: the host validates `arg`; the calls that write guest memory are not
        // issued here with readable arguments (HOST_CALL has no host functions to run in
        // the `pvrun` runner and so writes nothing).
        let (s, kept) = unsafe { hypercall(n, arg) };
        let device = n >= nr::DOORBELL_BASE && self.doorbells.contains(&n);
        if device {
            if s as u64 != RAX_IN {
                self.violation(format_args!("doorbell {n:#x} changed rax to {s:#x}"));
            }
            if !kept {
                self.violation(format_args!("doorbell {n:#x} changed a register"));
            }
            self.ok += 1;
            return;
        }
        let known = matches!(
            n,
            nr::CONSOLE_WRITE
                | nr::EXIT
                | nr::WAIT
                | nr::CONSOLE_FLUSH
                | nr::FN_READY
                | nr::FN_RETURN
                | nr::HOST_CALL
                | nr::FN_MAILBOX
                | nr::FN_NOTIFY
        );
        if !known && s != status::UNKNOWN_CALL {
            self.violation(format_args!("unknown call {n:#x} returned {s}"));
        }
        let expect = match n {
            nr::CONSOLE_FLUSH => Some(true),
            _ if dangerous.contains(&n) => Some(false),
            nr::HOST_CALL => Some(false),
            _ => None,
        };
        let what = format!("raw rdi={arg:#x}");
        self.record(&what, n, s, kept, expect);
    }

    fn console_write(&mut self) {
        let buf = self.ptr(16);
        let len = self.len(buf, abi::CONSOLE_WRITE_MAX);
        let any = self.rng.next() as u32;
        let mut a = ConsoleWrite {
            stream: self.rng.pick(&[1, 1, 1, 0, 2, 3, 7, u32::MAX, any]),
            reserved: if self.rng.one_in(8) {
                1 + self.rng.below(u32::MAX as u64) as u32
            } else {
                0
            },
            buf,
            len,
        };
        let mut fields_ok =
            a.reserved == 0 && a.len <= abi::CONSOLE_WRITE_MAX && self.covered(buf, len, perm::R);
        // Never print guest bytes on stderr, and keep stdout small.
        if fields_ok && (a.stream == 2 || (a.len > 256 && !self.rng.one_in(16))) {
            a.stream = 3;
        }
        fields_ok &= a.stream == 1 || a.stream == 2;
        // SAFETY: ConsoleWrite is plain old data.
        let bytes = unsafe { as_bytes(&a) };
        let (p, aligned) = self.place(bytes);
        // SAFETY: the host only reads the struct and the buffer.
        let (s, kept) = unsafe { hypercall(nr::CONSOLE_WRITE, p) };
        let valid = aligned && fields_ok;
        self.record("console_write", nr::CONSOLE_WRITE, s, kept, Some(valid));
        if valid && s >= 0 && s as u64 != len {
            self.violation(format_args!("console_write of {len} bytes returned {s}"));
        }
    }

    fn exit_bad(&mut self) {
        let a = Exit {
            code: self.rng.next() as i32,
            reserved: 1 + self.rng.below(u32::MAX as u64) as u32,
        };
        // SAFETY: Exit is plain old data.
        let (p, _) = self.place(unsafe { as_bytes(&a) });
        // SAFETY: reserved is not zero: the host must refuse this EXIT.
        let (s, kept) = unsafe { hypercall(nr::EXIT, p) };
        self.record("exit", nr::EXIT, s, kept, Some(false));
    }

    fn wait(&mut self) {
        let now = pvrun::time::monotonic_ns();
        let soon = now + self.rng.below(1_000_000);
        let deadline = self
            .rng
            .pick(&[0, 1, now, now.saturating_sub(1), soon])
            .min(now + 1_000_000);
        let a = Wait {
            deadline_ns: deadline,
        };
        // SAFETY: Wait is plain old data.
        let (p, aligned) = self.place(unsafe { as_bytes(&a) });
        let t = pvrun::time::monotonic_ns();
        // SAFETY: the host only reads the struct; the deadline is at most 1 ms away.
        let (s, kept) = unsafe { hypercall(nr::WAIT, p) };
        let slept = pvrun::time::monotonic_ns() - t;
        self.record("wait", nr::WAIT, s, kept, Some(aligned));
        if slept > 1_000_000_000 {
            self.violation(format_args!("WAIT until {deadline} slept {slept} ns"));
        }
    }

    fn fn_ready_bad(&mut self) {
        let exports = self.ptr(16);
        let exports_len = self.len(exports, 64 * 1024);
        let inbuf = self.ptr(64);
        let mut a = FnReady {
            exports,
            exports_len,
            inbuf,
            inbuf_len: self.len(inbuf, 4096),
        };
        let valid = |f: &Self, a: &FnReady| {
            a.exports_len <= 64 * 1024
                && f.covered(a.exports, a.exports_len, perm::R)
                && a.inbuf_len >= 16
                && a.inbuf.is_multiple_of(8)
                && f.covered(a.inbuf, a.inbuf_len, perm::R | perm::W)
        };
        if valid(self, &a) {
            if self.rng.one_in(2) {
                a.inbuf_len = self.rng.below(16);
            } else {
                a.inbuf |= 1 + self.rng.below(7);
            }
        }
        // SAFETY: FnReady is plain old data.
        let (p, _) = self.place(unsafe { as_bytes(&a) });
        if self.trace {
            println!("fn_ready at {p:#x}: {a:x?}");
        }
        // SAFETY: the arguments are invalid, so the host must refuse them and not act.
        let (s, kept) = unsafe { hypercall(nr::FN_READY, p) };
        self.record("fn_ready", nr::FN_READY, s, kept, Some(false));
    }

    fn fn_return_bad(&mut self) {
        let out = self.ptr(16);
        let mut out_len = self.len(out, 4096);
        // A FN_RETURN the host accepts, or one over its output limit, ends the run.
        if out_len == 0 || out_len > 1 << 20 {
            out_len = 1 + self.rng.below(4096);
        }
        let out = if self.covered(out, out_len, perm::R) {
            self.unreadable_buf(out_len)
        } else {
            out
        };
        let a = FnReturn {
            status: self.rng.next() as i64,
            out,
            out_len,
        };
        // SAFETY: FnReturn is plain old data.
        let (p, _) = self.place(unsafe { as_bytes(&a) });
        if self.trace {
            println!("fn_return at {p:#x}: {a:x?}");
        }
        // SAFETY: the output is unreadable, so the host must refuse the call.
        let (s, kept) = unsafe { hypercall(nr::FN_RETURN, p) };
        self.record("fn_return", nr::FN_RETURN, s, kept, Some(false));
    }

    fn host_call(&mut self) {
        let name = self.ptr(8);
        let name_len = self.len(name, 256);
        let input = self.ptr(8);
        let input_len = self.len(input, 16 << 20);
        let output = self.ptr(64);
        let output_cap = self.len(output, 4096);
        let output = self.write_target(output, output_cap);
        let a = HostCall {
            name,
            name_len,
            input,
            input_len,
            output,
            output_cap,
        };
        // SAFETY: HostCall is plain old data.
        let (p, _) = self.place(unsafe { as_bytes(&a) });
        // SAFETY: the output range is not memory the guest uses (scratch or invalid), and
        // the `pvrun` runner offers no host functions.
        let (s, kept) = unsafe { hypercall(nr::HOST_CALL, p) };
        self.record("host_call", nr::HOST_CALL, s, kept, Some(false));
    }

    fn structured_call(&mut self) {
        match self.rng.below(8) {
            0 | 1 => self.console_write(),
            2 => self.exit_bad(),
            3 => self.wait(),
            4 => self.fn_ready_bad(),
            5 => self.fn_return_bad(),
            6 => self.host_call(),
            _ => {
                // SAFETY: CONSOLE_FLUSH takes no argument.
                let (s, kept) = unsafe { hypercall(nr::CONSOLE_FLUSH, self.rng.next()) };
                self.record("flush", nr::CONSOLE_FLUSH, s, kept, Some(true));
            }
        }
    }

    /// A random block request, and whether the host must serve it successfully.
    fn block_request(&mut self, sector_size: u64) -> (BlockRequest, bool) {
        let ring = self.ring.as_ref().unwrap();
        let (cap, max) = (ring.capacity, ring.max_request);
        let sectors = cap / sector_size;
        let any = self.rng.next();
        let op = self.rng.pick(&[
            block_op::READ,
            block_op::READ,
            block_op::WRITE,
            block_op::WRITE,
            block_op::FLUSH,
            0,
            4,
            any as u32,
        ]);
        let inside = self.rng.below(sectors.max(1));
        let sector = self.rng.pick(&[
            0,
            0,
            inside,
            sectors.saturating_sub(1),
            sectors,
            sectors + 1,
            u64::MAX / sector_size,
            u64::MAX,
            any,
        ]);
        let addr = self.ptr(512);
        let len = if self.rng.one_in(3) {
            self.len(addr, max)
        } else {
            let some = 512 * (1 + self.rng.below(64));
            self.rng.pick(&[512, 1024, 4096, 8 * 512, some, max])
        };
        let addr = if op == block_op::READ {
            self.write_target(addr, len)
        } else {
            addr
        };
        let reserved = if self.rng.one_in(16) {
            self.rng.next() as u32
        } else {
            0
        };
        let reserved2 = if self.rng.one_in(16) {
            [self.rng.next(), 0, 0]
        } else {
            [0; 3]
        };
        self.next_id += 1;
        let r = BlockRequest {
            id: self.next_id,
            op,
            reserved,
            sector,
            addr,
            len,
            reserved2,
        };
        let in_disk = sector
            .checked_mul(sector_size)
            .and_then(|o| o.checked_add(len))
            .is_some_and(|e| e <= cap);
        let shape = len > 0 && len.is_multiple_of(sector_size) && len <= max && in_disk;
        let valid = reserved == 0
            && reserved2 == [0; 3]
            && match op {
                block_op::FLUSH => true,
                block_op::READ => shape && self.covered(addr, len, perm::R | perm::W),
                block_op::WRITE => shape && self.covered(addr, len, perm::R),
                _ => false,
            };
        (r, valid)
    }

    /// Rings the doorbell of the disk (counted as an ok call; checks rax is kept).
    fn doorbell(&mut self) {
        let d = self.ring.as_ref().unwrap().doorbell;
        // SAFETY: doorbells take no argument.
        let (s, kept) = unsafe { hypercall(d, 0) };
        if s as u64 != RAX_IN || !kept {
            self.violation(format_args!(
                "doorbell {d:#x} changed registers (rax {s:#x})"
            ));
        }
        self.ok += 1;
    }

    /// Waits (up to 10 s: a batch may hold several `fdatasync`s, slow on a busy shared
    /// disk) until the host answered every published request or marked the ring broken;
    /// a hang is a violation.
    fn await_ring(&mut self, why: &str) -> bool {
        let ring = self.ring.as_ref().unwrap();
        let want = ring.prod;
        let deadline = pvrun::time::monotonic_ns() + 10_000_000_000;
        loop {
            let ring = self.ring.as_ref().unwrap();
            if ring.load(0x80) == want {
                fence(Ordering::Acquire);
                return true;
            }
            if ring.load(0xc0) != 0 {
                self.ring.as_mut().unwrap().broken = true;
                return false;
            }
            let now = pvrun::time::monotonic_ns();
            if now > deadline {
                let (rsp, ev, st) = (ring.load(0x80), ring.load(0x40), ring.load(0xc0));
                self.violation(format_args!(
                    "ring hang after {why}: rsp_prod={rsp} want {want} req_event={ev} status={st}"
                ));
                // Give up on the ring rather than report the same hang again.
                self.ring.as_mut().unwrap().broken = true;
                return false;
            }
            pvrun::hypercall::call(&Wait {
                deadline_ns: now + 1_000_000,
            });
        }
    }

    /// Publishes up to `requests` (their slots already written) plus `stale` untouched
    /// slots, rings as the protocol says (sometimes more), and waits for the answers.
    fn submit(&mut self, sent: &[(u32, u64, bool, u64)], extra: u32, why: &str) {
        let ring = self.ring.as_mut().unwrap();
        let old = ring.prod;
        let new = old.wrapping_add(sent.len() as u32 + extra);
        ring.prod = new;
        ring.publish(new);
        let event = ring.load(0x40);
        let need = new.wrapping_sub(event) < new.wrapping_sub(old);
        if need || self.rng.one_in(4) {
            self.doorbell();
        }
        if !self.await_ring(why) {
            return;
        }
        let ring = self.ring.as_ref().unwrap();
        let mut bad = Vec::new();
        for &(idx, id, valid, len) in sent {
            // SAFETY: the slot lies inside the ring; the host wrote its response there.
            let rsp = unsafe { (ring.slot(idx) as *const BlockResponse).read_volatile() };
            let wrong_len = valid && rsp.status >= 0 && rsp.status as u64 != len;
            if rsp.id != id || !documented(rsp.status) || valid != (rsp.status >= 0) || wrong_len {
                bad.push((idx, id, valid, rsp.id, rsp.status));
            }
            if rsp.status < 0 {
                self.errors += 1;
            } else {
                self.ok += 1;
            }
        }
        for (idx, id, valid, rid, st) in bad {
            self.violation(format_args!(
                "block slot {idx} request id {id} (valid={valid}) answered id {rid} status {st}"
            ));
        }
    }

    fn ring_action(&mut self, late: bool) {
        let ring = self.ring.as_ref().unwrap();
        if ring.broken {
            self.doorbell();
            return;
        }
        let slots = ring.slots;
        let sector_size = 512;
        match self.rng.below(100) {
            0..=49 => {
                let k = 1 + self.rng.below(32.min(slots as u64)) as u32;
                let mut sent = Vec::new();
                for i in 0..k {
                    let (r, valid) = self.block_request(sector_size);
                    let ring = self.ring.as_ref().unwrap();
                    let idx = ring.prod.wrapping_add(i);
                    ring.write_slot(idx, block_words(&r));
                    let len = if r.op == block_op::FLUSH { 0 } else { r.len };
                    sent.push((idx, r.id, valid, len));
                }
                self.submit(&sent, 0, "request batch");
            }
            50..=64 => {
                // Slots full of random words (a READ among them only into scratch).
                let k = 1 + self.rng.below(8) as u32;
                for i in 0..k {
                    let mut w = [0u64; 8];
                    for x in w.iter_mut() {
                        *x = self.rng.next();
                    }
                    if w[1] as u32 == block_op::READ {
                        w[3] = self.write_target(w[3], w[4]);
                    }
                    let ring = self.ring.as_ref().unwrap();
                    ring.write_slot(ring.prod.wrapping_add(i), w);
                }
                self.submit(&[], k, "random slots");
            }
            65..=74 => {
                for _ in 0..self.rng.below(200) {
                    self.doorbell();
                }
                self.one_request("doorbell storm");
            }
            75..=84 => {
                // Garbage in the fields the host owns; it must not trust them.
                let v = self.rng.next() as u32;
                let ring = self.ring.as_ref().unwrap();
                ring.store(if self.rng.one_in(2) { 0x40 } else { 0x80 }, v);
                self.doorbell();
                self.one_request("host field garbage");
            }
            85..=92 => {
                // Stale slots (old responses) published as requests.
                let k = 1 + self.rng.below(slots as u64) as u32;
                self.submit(&[], k, "stale slots");
            }
            93..=97 => {
                let ring = self.ring.as_ref().unwrap();
                ring.publish(ring.prod);
                self.doorbell();
            }
            _ if late && self.rng.one_in(50) => self.break_ring(),
            _ => self.one_request("single request"),
        }
    }

    fn one_request(&mut self, why: &str) {
        let (r, valid) = self.block_request(512);
        let ring = self.ring.as_ref().unwrap();
        let idx = ring.prod;
        ring.write_slot(idx, block_words(&r));
        let len = if r.op == block_op::FLUSH { 0 } else { r.len };
        self.submit(&[(idx, r.id, valid, len)], 0, why);
    }

    /// Moves req_prod more than a ring ahead of (or behind) the host: it must mark the
    /// ring broken.
    fn break_ring(&mut self) {
        let slots = self.ring.as_ref().unwrap().slots;
        let jump = match self.rng.below(3) {
            0 => slots + 1 + self.rng.below(1 << 20) as u32,
            1 => 0u32.wrapping_sub(1 + self.rng.below(slots as u64) as u32),
            _ => (slots + 1).max(self.rng.next() as u32),
        };
        let ring = self.ring.as_mut().unwrap();
        let new = ring.prod.wrapping_add(jump);
        ring.publish(new);
        self.doorbell();
        let deadline = pvrun::time::monotonic_ns() + 2_000_000_000;
        while self.ring.as_ref().unwrap().load(0xc0) == 0 {
            let now = pvrun::time::monotonic_ns();
            if now > deadline {
                self.violation(format_args!(
                    "req_prod moved by {jump:#x} and the ring is not marked broken"
                ));
                break;
            }
            pvrun::hypercall::call(&Wait {
                deadline_ns: now + 1_000_000,
            });
        }
        self.ring.as_mut().unwrap().broken = true;
        println!("ring broken on purpose (req_prod moved by {jump:#x})");
    }
}

/// The bytes of a plain-old-data ABI struct.
///
/// # Safety
/// `T` must have no padding (the ABI structs spell theirs out).
unsafe fn as_bytes<T>(v: &T) -> &[u8] {
    // SAFETY: v is a live T; the caller vouches it has no uninitialised padding.
    unsafe { core::slice::from_raw_parts(v as *const T as *const u8, size_of::<T>()) }
}

fn parse_u64(s: Option<&&str>) -> Option<u64> {
    let s = s?;
    if let Some(h) = s.strip_prefix("0x") {
        u64::from_str_radix(h, 16).ok()
    } else {
        s.parse().ok()
    }
}

fn setup(seed: u64, disk: bool) -> Fuzz {
    let bi = pvrun::boot_info();
    let regions = bi.regions[..(bi.region_count as usize).min(abi::MAX_REGIONS)]
        .iter()
        .map(|r| Region {
            start: r.start,
            end: r.start.saturating_add(r.len),
            flags: r.flags,
        })
        .collect();
    let devices = &bi.devices[..(bi.device_count as usize).min(abi::MAX_DEVICES)];
    let doorbells = devices
        .iter()
        .map(|d| nr::DOORBELL_BASE + d.index as u16)
        .collect();
    let ring = if disk {
        devices.iter().find(|d| d.name() == "disk").map(|d| {
            // SAFETY: the ring header lies in the device area.
            let prod = unsafe { (d.ring as *const u32).read_volatile() };
            Ring {
                header: d.ring,
                slots: d.slots.max(1),
                doorbell: nr::DOORBELL_BASE + d.index as u16,
                capacity: d.capacity,
                max_request: d.max_request,
                prod,
                broken: false,
            }
        })
    } else {
        None
    };
    let max_request = ring.as_ref().map_or(0, |r| r.max_request);
    Fuzz {
        rng: Rng(seed),
        regions,
        mem_size: bi.mem_size,
        stack_start: bi.stack_start,
        scratch: vec![0; (max_request.max(64 * 1024) + 4096) as usize],
        args: alloc::boxed::Box::new(ArgBuf([0; 256])),
        doorbells,
        ring,
        errors: 0,
        ok: 0,
        violations: 0,
        next_id: seed << 32,
        trace: pvrun::env::args().any(|a| a == "--trace"),
    }
}

fn fuzz(seed: u64, iterations: u64, disk: bool) -> i32 {
    let mut f = setup(seed, disk);
    if f.trace {
        for r in &f.regions {
            println!("region {:#x}..{:#x} flags {}", r.start, r.end, r.flags);
        }
    }
    if disk && f.ring.is_none() {
        println!("no device named `disk` (attach one with --disk disk=IMAGE)");
        return 2;
    }
    for i in 0..iterations {
        let late = i >= iterations / 2;
        let roll = f.rng.below(100);
        if disk {
            match roll {
                0..=29 => f.raw_call(),
                30..=59 => f.structured_call(),
                _ => f.ring_action(late),
            }
        } else {
            match roll {
                0..=44 => f.raw_call(),
                _ => f.structured_call(),
            }
        }
    }
    if disk && !f.ring.as_ref().unwrap().broken {
        f.one_request("final request");
        if !f.ring.as_ref().unwrap().broken {
            f.break_ring();
        }
    }
    // A valid EXIT with reserved = 0 ends the run; before it, one refused EXIT.
    f.exit_bad();
    let Fuzz {
        errors,
        ok,
        violations,
        ..
    } = f;
    // A newline first: valid console writes put arbitrary guest bytes on stdout.
    println!();
    println!("fuzz done iterations={iterations} seed={seed} errors={errors} ok={ok}");
    println!("fuzz violations={violations}");
    pvrun::console::flush();
    pvrun::hypercall::call(&Exit {
        code: 0,
        reserved: 0,
    });
    1
}

/// Corrupts the console ring at random until the host stops the guest.
fn fuzz_console(seed: u64) -> i32 {
    let bi = pvrun::boot_info();
    let header = bi.console_ring;
    let data = bi.console_data;
    let size = bi.console_size;
    let mut rng = Rng(seed);
    println!("console fuzz seed={seed}");
    pvrun::console::flush();
    // No byte 2 anywhere in the data: no record the host might parse can name stderr,
    // so no guest bytes reach the host's stderr (stdout gets some garbage).
    let byte = |rng: &mut Rng| match rng.next() as u8 {
        2 => 0x42,
        b => b,
    };
    for i in 0..size {
        // SAFETY: the console data area is guest memory, and everything in it was
        // delivered by the flush above.
        unsafe { ((data + i) as *mut u8).write_volatile(byte(&mut rng)) };
    }
    let prod_p = header as *mut u64;
    for _ in 0..100_000 {
        // SAFETY (all accesses below): the console ring header and data are guest memory;
        // corrupting them is the point of this mode.
        unsafe {
            match rng.below(6) {
                0 => {
                    for _ in 0..1 + rng.below(64) {
                        let at = data + rng.below(size);
                        (at as *mut u8).write_volatile(byte(&mut rng));
                    }
                }
                1 => {
                    let p = prod_p.read_volatile();
                    prod_p.write_volatile(p.wrapping_add(rng.below(64)));
                }
                2 => {
                    let p = prod_p.read_volatile();
                    let any = rng.next();
                    let v = rng.pick(&[
                        p.wrapping_add(size + 1),
                        p.wrapping_sub(1),
                        any,
                        u64::MAX,
                        0,
                    ]);
                    prod_p.write_volatile(v);
                }
                3 => {
                    let c = (header + 64) as *mut u64;
                    c.write_volatile(rng.next());
                }
                4 => {
                    let off = rng.below(128) & !7;
                    ((header + off) as *mut u64).write_volatile(rng.next());
                }
                _ => {}
            }
        }
        // SAFETY: CONSOLE_FLUSH takes no argument.
        unsafe { hypercall(nr::CONSOLE_FLUSH, 0) };
    }
    // Reached only if the host never noticed. The ring may be corrupt: exit directly.
    pvrun::hypercall::call(&Exit {
        code: 3,
        reserved: 0,
    });
    3
}

fn main() -> i32 {
    let args: Vec<&'static str> = pvrun::env::args().collect();
    let mode = args.get(1).copied().unwrap_or("");
    let seed = parse_u64(args.get(2));
    match (mode, seed) {
        ("fuzz", Some(seed)) => {
            let iterations = parse_u64(args.get(3)).unwrap_or(10_000);
            let disk = args.contains(&"--disk");
            fuzz(seed, iterations, disk)
        }
        ("fuzz-console", Some(seed)) => fuzz_console(seed),
        _ => {
            println!("usage: fuzz SEED ITERATIONS [--disk] | fuzz-console SEED");
            2
        }
    }
}
