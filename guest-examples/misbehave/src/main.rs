//! A guest that misbehaves on purpose, one way per mode (first argument), to test that the
//! host contains every kind of fault and rejects every bad hypercall.
//!
//! Modes that should stop the guest do exactly one bad thing. Modes that probe hypercall
//! validation print the host's status (`status=<n>`) and exit 0. An unknown mode prints
//! `unknown mode` and exits 2.
//!
//! The `blk-*` modes abuse the ring of a block device named `disk` (attached with
//! `--disk disk=IMAGE[,ro]`, not required: without it they print a note and exit 2). They
//! print `status=<n>` of the responses (`blk-bad-addr`, `blk-pagetables`, `blk-text`,
//! `blk-bootinfo`, `blk-bad-op`, `blk-write`; `blk-len-overflow` prints three,
//! `blk-past-end` two), `ring status=<n>` after corrupting the ring (`blk-idx-far`,
//! `blk-overflow-queue`), `storm done status=<n>` (`blk-doorbell-storm [N]`) or
//! `scribble done ring status=<n>` (`blk-scribble`).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::arch::asm;
use core::hint::black_box;

use pvrun::abi::{
    self, Abort, BlockRequest, BlockResponse, ConsoleWrite, block_op, layout, stream,
};
use pvrun::hypercall::{call, hypercall};
use pvrun::println;

pvrun::entry!(main);

/// A static string whose address the hypercall probes use.
static MESSAGE: &str = "a real static string\n";

/// Code buffer in `.data` for `exec-data`.
static mut DATA_CODE: [u8; 16] = [0; 16];

/// Reads a u64 from `addr` with an explicit `mov` the compiler cannot remove or check.
fn peek(addr: u64) -> u64 {
    let v: u64;
    // SAFETY: deliberately not safe: this is meant to fault.
    unsafe { asm!("mov {v}, qword ptr [{a}]", a = in(reg) addr, v = out(reg) v, options(nostack)) };
    v
}

/// Writes a u64 to `addr` with an explicit `mov` the compiler cannot remove or check.
fn poke(addr: u64, value: u64) {
    // SAFETY: deliberately not safe: this is meant to fault.
    unsafe {
        asm!("mov qword ptr [{a}], {v}", a = in(reg) addr, v = in(reg) value, options(nostack))
    };
}

/// Calls the code at `addr` as `extern "C" fn()`.
fn call_at(addr: *const u8) {
    // SAFETY: deliberately not safe: the code lies in non-executable memory.
    let f: extern "C" fn() = unsafe { core::mem::transmute(black_box(addr)) };
    f();
}

/// Recurses without bound, using a page of stack per frame (the depth check never fires).
fn recurse(depth: u64) -> u64 {
    let mut frame = [0u8; 4096];
    frame[(depth % 4096) as usize] = depth as u8;
    black_box(&mut frame);
    if depth == u64::MAX {
        return 0;
    }
    recurse(depth + 1).wrapping_add(frame[(depth % 7) as usize] as u64)
}

/// Executes the instruction named by `mode`, which ring 3 may not (or should not) run.
fn privileged(mode: &str) {
    // SAFETY: deliberately not safe: each of these must fault in ring 3.
    unsafe {
        match mode {
            "cli" => asm!("cli", options(nomem, nostack)),
            "hlt" => asm!("hlt", options(nomem, nostack)),
            "mov-cr3" => asm!("mov cr3, rax", in("rax") 0x10_0000u64, options(nostack)),
            "wrmsr" => {
                asm!("wrmsr", in("ecx") 0x10u32, in("eax") 0u32, in("edx") 0u32, options(nostack))
            }
            "rdmsr" => {
                asm!("rdmsr", in("ecx") 0x10u32, out("eax") _, out("edx") _, options(nostack))
            }
            "out-port" => asm!("out 0x80, al", in("al") 0u8, options(nomem, nostack)),
            "int3" => asm!("int3", options(nomem, nostack)),
            "ud2" => asm!("ud2", options(nomem, nostack)),
            _ => {}
        }
    }
}

/// A CONSOLE_WRITE to stdout with the given buffer and length (no validation by the SDK).
fn console_write(buf: u64, len: u64) -> i64 {
    call(&ConsoleWrite {
        stream: stream::STDOUT,
        reserved: 0,
        buf,
        len,
    })
}

/// Square root by Newton's iteration (core has no `f64::sqrt`).
fn sqrt(x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    let mut r = if x > 1.0 { x / 2.0 } else { 1.0 };
    for _ in 0..64 {
        let next = 0.5 * (r + x / r);
        if next == r {
            break;
        }
        r = next;
    }
    r
}

/// Raw access to the ring of the device named `disk`, bypassing every check of the SDK's
/// `Disk` (for the `blk-*` modes). The device is deliberately not declared with
/// `require_device!`: misbehave must boot without disks.
struct RawRing {
    header: u64,
    slots: u32,
    doorbell: u16,
    capacity: u64,
}

impl RawRing {
    /// The ring of the device `disk`, or `None` if no such device is attached.
    fn open() -> Option<RawRing> {
        let bi = pvrun::boot_info();
        let dev = bi.devices[..(bi.device_count as usize).min(abi::MAX_DEVICES)]
            .iter()
            .find(|d| d.name() == "disk")?;
        Some(RawRing {
            header: dev.ring,
            slots: dev.slots.max(1),
            doorbell: abi::call::DOORBELL_BASE + dev.index as u16,
            capacity: dev.capacity,
        })
    }

    fn load(&self, field: u64) -> u32 {
        // SAFETY: the ring header lies in the device area the host maps for the guest.
        unsafe { ((self.header + field) as *const u32).read_volatile() }
    }

    fn store(&self, field: u64, v: u32) {
        // SAFETY: as in `load`; corrupting the header is what some modes are for.
        unsafe { ((self.header + field) as *mut u32).write_volatile(v) }
    }

    fn req_prod(&self) -> u32 {
        self.load(0)
    }

    fn set_req_prod(&self, v: u32) {
        core::sync::atomic::fence(core::sync::atomic::Ordering::Release);
        self.store(0, v);
        // SAFETY: mfence has no effect but ordering.
        unsafe { asm!("mfence", options(nostack, preserves_flags)) };
    }

    fn rsp_prod(&self) -> u32 {
        self.load(128)
    }

    fn status(&self) -> u32 {
        self.load(192)
    }

    fn slot(&self, idx: u32) -> u64 {
        self.header + abi::RING_SLOTS_OFFSET + (idx % self.slots) as u64 * abi::RING_SLOT_SIZE
    }

    fn write_slot(&self, idx: u32, req: BlockRequest) {
        // SAFETY: the slot lies inside the ring in the device area.
        unsafe { (self.slot(idx) as *mut BlockRequest).write_volatile(req) };
    }

    fn ring(&self) {
        // SAFETY: doorbells take no argument.
        unsafe { hypercall(self.doorbell, 0) };
    }

    /// Waits (WAIT loop) until `done()` or `ms` milliseconds passed; returns `done()`.
    fn wait_for(&self, ms: u64, done: impl Fn(&Self) -> bool) -> bool {
        let deadline = pvrun::time::monotonic_ns() + ms * 1_000_000;
        while !done(self) {
            let now = pvrun::time::monotonic_ns();
            if now >= deadline {
                return false;
            }
            call(&abi::Wait {
                deadline_ns: (now + 10_000_000).min(deadline),
            });
        }
        true
    }

    /// Publishes one request, rings the doorbell and waits (up to 2 s) for its response;
    /// returns its status as text (`timeout` or `broken` if there is none).
    fn request(&self, op: u32, sector: u64, addr: u64, len: u64) -> alloc::string::String {
        let idx = self.req_prod();
        self.write_slot(
            idx,
            BlockRequest {
                id: 0x1234_0000 + idx as u64,
                op,
                reserved: 0,
                sector,
                addr,
                len,
                reserved2: [0; 3],
            },
        );
        self.set_req_prod(idx.wrapping_add(1));
        self.ring();
        let answered = |r: &Self| r.rsp_prod().wrapping_sub(idx) as i32 > 0 || r.status() != 0;
        if !self.wait_for(2000, answered) {
            return "timeout".into();
        }
        if self.rsp_prod().wrapping_sub(idx) as i32 <= 0 {
            return "broken".into();
        }
        core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
        // SAFETY: as in `write_slot`; the host wrote the response there.
        let rsp = unsafe { (self.slot(idx) as *const BlockResponse).read_volatile() };
        alloc::format!("{}", rsp.status)
    }
}

/// A pseudo-random number generator for the scribble mode (xorshift64).
fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// The `blk-*` modes: adversarial use of the ring of the disk named `disk`.
fn block_mode(mode: &str, args: &[&str]) -> i32 {
    let Some(r) = RawRing::open() else {
        println!("no device named `disk` (attach one with --disk disk=IMAGE)");
        return 2;
    };
    let mut buf: Vec<u8> = vec![0; 8192];
    let good = buf.as_mut_ptr() as u64;
    let read = |addr: u64| r.request(block_op::READ, 0, addr, 512);
    match mode {
        "blk-bad-addr" => println!("status={}", read(0xdead_beef_0000)),
        "blk-pagetables" => println!("status={}", read(0x10_0000)),
        "blk-text" => println!("status={}", read(main as *const () as u64)),
        "blk-bootinfo" => println!("status={}", read(layout::BOOT_INFO_ADDR)),
        "blk-len-overflow" => {
            let a = r.request(block_op::READ, 0, good, u64::MAX);
            let b = r.request(block_op::READ, 0, good, 0);
            let c = r.request(block_op::READ, 0, good, 1000);
            println!("status={a} {b} {c}");
        }
        "blk-past-end" => {
            let a = r.request(block_op::READ, r.capacity / 512, good, 512);
            let b = r.request(block_op::READ, u64::MAX / 512, good, 4096);
            println!("status={a} {b}");
        }
        "blk-bad-op" => println!("status={}", r.request(99, 0, good, 512)),
        "blk-write" => {
            buf[..512].fill(b'W');
            println!("status={}", r.request(block_op::WRITE, 0, good, 512));
        }
        "blk-idx-far" => {
            r.set_req_prod(r.req_prod().wrapping_add(1_000_000));
            r.ring();
            r.wait_for(2000, |r| r.status() == abi::RING_BROKEN);
            println!("ring status={}", r.status());
        }
        "blk-doorbell-storm" => {
            let n = args
                .get(2)
                .and_then(|a| a.parse::<u64>().ok())
                .unwrap_or(100_000);
            for _ in 0..n {
                r.ring();
            }
            println!("storm done status={}", read(good));
        }
        "blk-scribble" => {
            let mut seed = pvrun::random::u64() | 1;
            let end = pvrun::time::monotonic_ns() + 50_000_000;
            let mut rounds = 0u64;
            while pvrun::time::monotonic_ns() < end {
                for i in 0..r.slots {
                    let p = r.slot(i) as *mut u64;
                    for w in 0..(abi::RING_SLOT_SIZE / 8) as usize {
                        // SAFETY: inside the slot; scribbling on it is the point.
                        unsafe { p.add(w).write_volatile(xorshift(&mut seed)) };
                    }
                }
                r.set_req_prod(xorshift(&mut seed) as u32);
                r.ring();
                rounds += 1;
            }
            black_box(rounds);
            r.wait_for(500, |r| r.status() == abi::RING_BROKEN);
            println!("scribble done ring status={}", r.status());
        }
        "blk-scribble-slots" => {
            // Indices stay valid while every slot the host reads is garbage: each garbage
            // request must get an answer (almost always an error), and the ring must
            // keep being served.
            let mut seed = pvrun::random::u64() | 1;
            let end = pvrun::time::monotonic_ns() + 50_000_000;
            let (mut requests, mut answered) = (0u64, 0u64);
            while pvrun::time::monotonic_ns() < end {
                let prod = r.req_prod();
                let p = r.slot(prod % r.slots) as *mut u64;
                for w in 0..(abi::RING_SLOT_SIZE / 8) as usize {
                    // SAFETY: inside the slot; garbage in it is the point.
                    unsafe { p.add(w).write_volatile(xorshift(&mut seed)) };
                }
                r.set_req_prod(prod.wrapping_add(1));
                r.ring();
                requests += 1;
                if r.wait_for(1000, |r| r.rsp_prod() == prod.wrapping_add(1)) {
                    answered += 1;
                }
            }
            println!(
                "slots-scribble done requests={requests} answered={answered} ring status={}",
                r.status()
            );
        }
        "blk-overflow-queue" => {
            let start = r.req_prod();
            for i in 0..r.slots {
                r.write_slot(
                    start.wrapping_add(i),
                    BlockRequest {
                        id: i as u64,
                        op: block_op::READ,
                        reserved: 0,
                        sector: 0,
                        addr: good,
                        len: 512,
                        reserved2: [0; 3],
                    },
                );
            }
            r.set_req_prod(start.wrapping_add(2 * r.slots));
            r.ring();
            r.wait_for(2000, |r| r.status() == abi::RING_BROKEN);
            println!("ring status={}", r.status());
        }
        _ => {
            println!("unknown mode");
            return 2;
        }
    }
    black_box(&mut buf);
    0
}

/// `net-garbage`: for about a second, floods the transmit ring of the NIC named `eth0`
/// (deliberately not declared) with invalid frames: oversized, empty, past the end of
/// guest memory, at address 0, random bytes in whole slots, and random frame contents.
/// Prints `garbage done sent=<n> errors=<n>` (requests published, error responses).
fn net_garbage() -> i32 {
    let bi = pvrun::boot_info();
    let Some(dev) = bi.devices[..(bi.device_count as usize).min(abi::MAX_DEVICES)]
        .iter()
        .find(|d| d.kind == abi::device::NET && d.name() == "eth0")
    else {
        println!("no network device named `eth0` (attach one with --net eth0=tap:IF)");
        return 2;
    };
    let header = dev.ring;
    let slots = dev.slots.max(1);
    let doorbell = abi::call::DOORBELL_BASE + dev.index as u16;
    // SAFETY (all header accesses): the ring header lies in the device area the host maps
    // read-write for the guest; the host writes rsp_prod and status concurrently.
    let load = |off: u64| unsafe { ((header + off) as *const u32).read_volatile() };
    let slot =
        |idx: u32| header + abi::RING_SLOTS_OFFSET + (idx % slots) as u64 * abi::RING_SLOT_SIZE;
    let mut frame = vec![0u8; 2048];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ pvrun::random::u64();
    let start = pvrun::time::monotonic_ns();
    let mut prod = load(0);
    let mut cons = prod;
    let (mut sent, mut errors) = (0u64, 0u64);
    let reap = |cons: &mut u32, prod: u32, errors: &mut u64| {
        let rsp_prod = load(0x80);
        // Trust rsp_prod only as far as requests were published.
        if rsp_prod.wrapping_sub(*cons) > prod.wrapping_sub(*cons) {
            return;
        }
        core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
        while *cons != rsp_prod {
            // SAFETY: the slot lies inside the ring; the host wrote its response there.
            let rsp = unsafe { (slot(*cons) as *const abi::NetResponse).read_volatile() };
            if rsp.status < 0 {
                *errors += 1;
            }
            *cons = cons.wrapping_add(1);
        }
    };
    while pvrun::time::monotonic_ns() - start < 1_000_000_000 && load(0xc0) == 0 {
        let mut n = 0;
        while prod.wrapping_sub(cons) < slots && n < 64 {
            let kind = sent % 6;
            let frame_addr = frame.as_ptr() as u64;
            let req = match kind {
                0 => Some((frame_addr, 100_000)),
                1 => Some((frame_addr, 0)),
                2 => Some((bi.mem_size - 16, 1514)),
                3 => Some((0, 60)),
                4 => {
                    for b in frame.iter_mut().take(1514) {
                        *b = xorshift(&mut seed) as u8;
                    }
                    Some((frame_addr, 14 + xorshift(&mut seed) % 1500))
                }
                _ => None,
            };
            match req {
                Some((addr, len)) => {
                    let r = abi::NetTxRequest {
                        id: sent,
                        addr,
                        len: len as u32,
                        flags: 0,
                        reserved: [0; 5],
                    };
                    // SAFETY: the slot lies inside the ring in the device area.
                    unsafe { (slot(prod) as *mut abi::NetTxRequest).write_volatile(r) };
                }
                None => {
                    for i in 0..8u64 {
                        // SAFETY: as above; a slot full of random bytes is the point.
                        unsafe {
                            ((slot(prod) + 8 * i) as *mut u64).write_volatile(xorshift(&mut seed))
                        };
                    }
                }
            }
            prod = prod.wrapping_add(1);
            sent += 1;
            n += 1;
        }
        core::sync::atomic::fence(core::sync::atomic::Ordering::Release);
        // SAFETY: as for `load`.
        unsafe { (header as *mut u32).write_volatile(prod) };
        // SAFETY: mfence only orders; doorbells take no argument (rung every time, on purpose).
        unsafe {
            asm!("mfence", options(nostack, preserves_flags));
            hypercall(doorbell, 0);
        }
        reap(&mut cons, prod, &mut errors);
        if prod.wrapping_sub(cons) >= slots {
            call(&abi::Wait {
                deadline_ns: pvrun::time::monotonic_ns() + 1_000_000,
            });
        }
    }
    // Collect the last answers (up to a second).
    let end = pvrun::time::monotonic_ns() + 1_000_000_000;
    while cons != prod && load(0xc0) == 0 && pvrun::time::monotonic_ns() < end {
        reap(&mut cons, prod, &mut errors);
        if cons != prod {
            call(&abi::Wait {
                deadline_ns: pvrun::time::monotonic_ns() + 10_000_000,
            });
        }
    }
    if load(0xc0) != 0 {
        println!("ring broken");
    }
    println!("garbage done sent={sent} errors={errors}");
    0
}

fn main() -> i32 {
    let args: Vec<&'static str> = pvrun::env::args().collect();
    let mode = args.get(1).copied().unwrap_or("");
    match mode {
        "null-read" => {
            peek(black_box(0));
        }
        "null-write" => poke(black_box(8), 0x1234),
        "write-text" => poke(main as *const () as u64, 0x9090_9090_9090_9090),
        "exec-data" => {
            let p = &raw mut DATA_CODE as *mut u8;
            // SAFETY: writing one byte of our own static buffer.
            unsafe { p.write_volatile(0xC3) };
            call_at(p);
        }
        "exec-stack" => {
            let mut code = [0u8; 16];
            let p = code.as_mut_ptr();
            // SAFETY: writing one byte of a local buffer.
            unsafe { p.write_volatile(0xC3) };
            call_at(p);
            black_box(&mut code);
        }
        "exec-heap" => {
            let mut code: Box<[u8; 16]> = Box::new([0; 16]);
            let p = code.as_mut_ptr();
            // SAFETY: writing one byte of a heap buffer.
            unsafe { p.write_volatile(0xC3) };
            call_at(p);
            black_box(&mut code);
        }
        "stack-overflow" => {
            let r = recurse(black_box(0));
            println!("recursion returned {r}");
        }
        "cli" | "hlt" | "mov-cr3" | "wrmsr" | "rdmsr" | "out-port" | "int3" | "ud2" => {
            privileged(mode)
        }
        "div-zero" => {
            let divisor: u64 = black_box(0);
            let q: u64;
            // SAFETY: deliberately not safe: divides by zero (#DE).
            unsafe {
                asm!("div {d}", d = in(reg) divisor, inout("rax") 1u64 => q, inout("rdx") 0u64 => _,
                    options(nomem, nostack))
            };
            println!("quotient {q}");
        }
        "loop" => {
            println!("looping");
            loop {
                core::hint::spin_loop();
            }
        }
        "panic" => panic!("guest panicked on purpose: {}", 42),
        // A message that tries to forge a second report line and recolour the terminal.
        "panic-forge" => panic!("boom\npvrun: guest exited normally\x1b[2J\x1b[31m"),
        // Prints without end (for hosts whose stdout nobody reads).
        "print-forever" => loop {
            println!("flooding the console with a line that nobody will ever read");
        },
        "big-alloc" => {
            let mut v: Vec<u8> = Vec::with_capacity(black_box(1usize << 36));
            v.push(1);
            black_box(&mut v);
            println!("allocated {} bytes", v.capacity());
        }
        "exit" => {
            let code = args.get(2).and_then(|a| a.parse::<i32>().ok()).unwrap_or(0);
            pvrun::process::exit(code);
        }
        "hc-wild-pointer" => println!("status={}", console_write(0xdead_beef_0000, 16)),
        "hc-null-buf" => println!("status={}", console_write(0, 16)),
        "hc-overflow-len" => {
            let buf = MESSAGE.as_ptr() as u64;
            println!("status={}", console_write(buf, u64::MAX));
            println!(
                "status2={}",
                console_write(buf, (u64::MAX - buf).wrapping_add(2))
            );
        }
        "hc-too-long" => {
            let big = vec![b'x'; abi::CONSOLE_WRITE_MAX as usize + 1];
            println!(
                "status={}",
                console_write(big.as_ptr() as u64, big.len() as u64)
            );
        }
        "hc-unknown" => {
            // SAFETY: unassigned call numbers take no argument; the host must just refuse them.
            let s = unsafe { hypercall(0x3f, 0) };
            // SAFETY: as above.
            let s0 = unsafe { hypercall(0, 0) };
            println!("status={s}");
            println!("status0={s0}");
        }
        "hc-unaligned" => {
            #[repr(C, align(8))]
            struct Buf([u8; 64]);
            let mut b = Buf([0; 64]);
            let args = ConsoleWrite {
                stream: stream::STDOUT,
                reserved: 0,
                buf: MESSAGE.as_ptr() as u64,
                len: MESSAGE.len() as u64,
            };
            let p = b.0.as_mut_ptr().wrapping_add(4);
            // SAFETY: p..p+24 lies inside the 64-byte buffer; unaligned write on purpose.
            unsafe { (p as *mut ConsoleWrite).write_unaligned(args) };
            // SAFETY: the struct is valid, only misaligned; the host must refuse it.
            let s = unsafe { hypercall(abi::call::CONSOLE_WRITE, black_box(p) as u64) };
            black_box(&mut b);
            println!("status={s}");
        }
        "hc-arg-outside" => {
            // SAFETY: the argument addresses are outside guest memory; the host must refuse them.
            let s = unsafe { hypercall(abi::call::CONSOLE_WRITE, 0x7fff_ffff_f000) };
            // SAFETY: as above.
            let s2 = unsafe { hypercall(abi::call::CONSOLE_WRITE, u64::MAX - 7) };
            println!("status={s}");
            println!("status2={s2}");
        }
        "hc-host-region" => {
            println!("status={}", console_write(0x10_0000, 64));
            println!("status2={}", console_write(0x1000, 64));
        }
        "hc-bad-stream" => {
            let s = call(&ConsoleWrite {
                stream: 7,
                reserved: 0,
                buf: MESSAGE.as_ptr() as u64,
                len: MESSAGE.len() as u64,
            });
            println!("status={s}");
        }
        "hc-exit-bad-arg" => {
            // SAFETY: the argument address is outside guest memory; the host must refuse it.
            let s = unsafe { hypercall(abi::call::EXIT, 0x7fff_ffff_f000) };
            println!("status={s}");
            pvrun::process::exit(0);
        }
        "hc-abort-wild" => {
            let s = call(&Abort {
                msg: 0xdead_beef_0000,
                len: 10,
            });
            // Only reached if the host let the guest continue after ABORT (it should not).
            println!("status={s}");
            return 1;
        }
        "sse" => {
            let mut sum = 0.0f64;
            for i in 0..1000 {
                sum += sqrt(black_box(i as f64));
            }
            println!("sse={sum:.3}");
        }
        "sleep-forever" => {
            println!("sleeping");
            let s = call(&pvrun::abi::Wait {
                deadline_ns: u64::MAX,
            });
            println!("woke status={s}");
        }
        "hc-wait-past" => {
            let t = pvrun::time::Instant::now();
            let s = call(&pvrun::abi::Wait { deadline_ns: 0 });
            println!("status={s} waited_ms={}", t.elapsed().as_millis());
        }
        "hc-storm" => {
            // Many bad and empty calls in a row: the host must answer each, not degrade.
            let n = args
                .get(2)
                .and_then(|a| a.parse::<u64>().ok())
                .unwrap_or(10_000);
            let mut bad = 0u64;
            for i in 0..n {
                let nr = (i % 64) as u16;
                if nr == abi::call::ABORT {
                    continue; // an abort ends the guest whatever its arguments
                }
                // SAFETY: wild arguments on purpose; the host validates them.
                let s = unsafe { hypercall(nr, black_box(i.wrapping_mul(0x9e37_79b9_7f4a_7c15))) };
                if s < 0 {
                    bad += 1;
                }
                if console_write(MESSAGE.as_ptr() as u64, 0) != 0 {
                    return 3;
                }
            }
            println!("storm calls={} errors={bad}", 2 * n);
        }
        "print-lots" => {
            for i in 0..2000 {
                println!("line {i}");
            }
            let long: Vec<u8> = vec![b'x'; 100_000];
            pvrun::console::write_stdout(&long);
            println!();
            pvrun::eprintln!("to stderr");
            println!("done");
        }
        "print-then-crash" => {
            println!("before crash");
            pvrun::eprintln!("stderr before crash");
            peek(black_box(0));
        }
        "ring-huge-producer" => {
            let p = pvrun::boot_info().console_ring as *mut u64;
            // SAFETY: the ring header is guest memory; corrupting it is the point.
            unsafe { p.write_volatile(p.read_volatile().wrapping_add(1 << 40)) };
            pvrun::console::flush();
            println!("survived");
        }
        "ring-bad-stream" | "ring-cut-record" => {
            let bi = pvrun::boot_info();
            let p = bi.console_ring as *mut u64;
            let data = bi.console_data as *mut u8;
            let size = bi.console_size;
            // SAFETY: guest memory of the ring; publishing a broken record is the point.
            unsafe {
                let prod = p.read_volatile();
                let rec: [u8; 5] = if mode == "ring-bad-stream" {
                    [9, 2, 0, b'h', b'i']
                } else {
                    [1, 100, 0, b'h', b'i'] // claims 100 bytes, publishes 2
                };
                for (i, b) in rec.iter().enumerate() {
                    data.add(((prod + i as u64) % size) as usize)
                        .write_volatile(*b);
                }
                p.write_volatile(prod + rec.len() as u64);
            }
            pvrun::console::flush();
            println!("survived");
        }
        "ring-scribble-consumer" => {
            let c = (pvrun::boot_info().console_ring + 64) as *mut u64;
            // SAFETY: guest memory of the ring header; scribbling on it is the point.
            unsafe { c.write_volatile(0xdead_beef_dead_beef) };
            println!("after scribble");
            pvrun::console::flush();
            println!("still here");
        }
        "progress" => {
            // Prints while computing without any hypercall in between: the output must
            // reach the host while the guest still runs, not only at its exit.
            for i in 0..6 {
                println!("tick {i}");
                let t = pvrun::time::Instant::now();
                while t.elapsed().as_millis() < 300 {
                    core::hint::spin_loop();
                }
            }
        }
        "write-bootinfo" => poke(layout::BOOT_INFO_ADDR, 0),
        "read-pagetables" => {
            let v = peek(black_box(0x10_0000));
            println!("read {v:#x}");
        }
        m if m.starts_with("blk-") => return block_mode(m, &args),
        "net-garbage" => return net_garbage(),
        _ => {
            println!("unknown mode");
            return 2;
        }
    }
    // Reached only by modes that print a status, or if a fault did not happen.
    0
}
