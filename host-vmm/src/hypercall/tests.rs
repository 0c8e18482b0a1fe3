//! The dispatcher and the console parser against every kind of bad input a guest can
//! hand them. No KVM: guest memory is a plain `GuestRam` with a hand-made memory map.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pvrun_abi::layout::{CONSOLE_DATA_ADDR, CONSOLE_DATA_SIZE, CONSOLE_RING_ADDR};
use pvrun_abi::{
    ABORT_MESSAGE_MAX, Abort, CONSOLE_WRITE_MAX, ConsoleWrite, Exit, FnReady, FnReturn, HostCall,
    Wait, call, perm, region, status, stream,
};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::{Action, Console, GuestView, dispatch};
use crate::function::{FnContext, HostFn};
use crate::memory::{GuestRam, HOST_ONLY, MemoryMap, Region};

const DATA: u64 = 0x20_0000;
const TEXT: u64 = 0x40_0000;
const HOST: u64 = 0x1000;

/// A writer tests can read back.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

struct Fixture {
    ram: GuestRam,
    map: MemoryMap,
    console: Console,
    out: Capture,
    err: Capture,
    fns: FnContext,
}

fn region(start: u64, end: u64, kind: u32, perm: u32, user: bool) -> Region {
    Region {
        start,
        end,
        kind,
        perm,
        user,
    }
}

fn fixture() -> Fixture {
    let ram = GuestRam::new(8 << 20).unwrap();
    let map = MemoryMap::new(vec![
        region(HOST, HOST + 0x1000, HOST_ONLY, perm::R | perm::W, false),
        region(
            CONSOLE_RING_ADDR,
            CONSOLE_DATA_ADDR + CONSOLE_DATA_SIZE,
            region::CONSOLE,
            perm::R | perm::W,
            true,
        ),
        region(
            DATA,
            DATA + 0x20_0000,
            region::DATA,
            perm::R | perm::W,
            true,
        ),
        region(
            TEXT,
            TEXT + 0x20_0000,
            region::TEXT,
            perm::R | perm::X,
            true,
        ),
    ])
    .unwrap();
    let out = Capture::default();
    let err = Capture::default();
    Fixture {
        ram,
        map,
        console: Console::new(Box::new(out.clone()), Box::new(err.clone())),
        out,
        err,
        fns: FnContext {
            host_fns: Arc::default(),
            max_output: 1024,
            host_writes: Vec::new(),
            ..FnContext::default()
        },
    }
}

impl Fixture {
    fn put<T: ByteValued>(&self, addr: u64, v: T) {
        self.ram.mem().write_obj(v, GuestAddress(addr)).unwrap();
    }
    fn put_bytes(&self, addr: u64, b: &[u8]) {
        self.ram.mem().write_slice(b, GuestAddress(addr)).unwrap();
    }
    fn call(&mut self, nr: u16, arg: u64) -> Action {
        let view = GuestView {
            mem: self.ram.mem(),
            map: &self.map,
        };
        dispatch(nr, arg, &view, &mut self.console, &mut self.fns)
    }
    fn status(&mut self, nr: u16, arg: u64) -> i64 {
        match self.call(nr, arg) {
            Action::Return(s) => s,
            other => panic!("expected a status, got {other:?}"),
        }
    }
}

#[test]
fn an_unknown_call_number_is_refused() {
    let mut f = fixture();
    assert_eq!(f.status(0x1f, DATA), status::UNKNOWN_CALL);
    assert_eq!(f.status(0, 0), status::UNKNOWN_CALL);
}

#[test]
fn argument_structs_must_be_aligned_and_guest_readable() {
    let mut f = fixture();
    f.put(
        DATA,
        Exit {
            code: 7,
            reserved: 0,
        },
    );
    assert_eq!(f.call(call::EXIT, DATA), Action::Exit(7));
    assert_eq!(f.status(call::EXIT, DATA + 4), status::UNALIGNED);
    // Unmapped, host-only, past the end of mapped memory, wrapping.
    assert_eq!(f.status(call::EXIT, 0x10_0000), status::BAD_ADDRESS);
    assert_eq!(f.status(call::EXIT, HOST), status::BAD_ADDRESS);
    assert_eq!(f.status(call::EXIT, TEXT + 0x20_0000), status::BAD_ADDRESS);
    assert_eq!(f.status(call::EXIT, u64::MAX - 7), status::BAD_ADDRESS);
    // Readable text is fine for arguments.
    f.put(
        TEXT,
        Exit {
            code: 3,
            reserved: 0,
        },
    );
    assert_eq!(f.call(call::EXIT, TEXT), Action::Exit(3));
}

#[test]
fn exit_with_a_nonzero_reserved_field_is_refused() {
    let mut f = fixture();
    f.put(
        DATA,
        Exit {
            code: 1,
            reserved: 1,
        },
    );
    assert_eq!(f.status(call::EXIT, DATA), status::BAD_ARGUMENT);
}

#[test]
fn console_write_checks_stream_reserved_length_and_buffer() {
    let mut f = fixture();
    let args = |stream, reserved, buf, len| ConsoleWrite {
        stream,
        reserved,
        buf,
        len,
    };
    f.put_bytes(DATA + 0x1000, b"hello");
    f.put(DATA, args(stream::STDOUT, 0, DATA + 0x1000, 5));
    assert_eq!(f.status(call::CONSOLE_WRITE, DATA), 5);
    assert_eq!(f.out.text(), "hello");
    f.put(DATA, args(stream::STDERR, 0, DATA + 0x1000, 4));
    assert_eq!(f.status(call::CONSOLE_WRITE, DATA), 4);
    assert_eq!(f.err.text(), "hell");
    f.put(DATA, args(9, 0, DATA + 0x1000, 5));
    assert_eq!(f.status(call::CONSOLE_WRITE, DATA), status::BAD_ARGUMENT);
    f.put(DATA, args(stream::STDOUT, 1, DATA + 0x1000, 5));
    assert_eq!(f.status(call::CONSOLE_WRITE, DATA), status::BAD_ARGUMENT);
    f.put(DATA, args(stream::STDOUT, 0, DATA, CONSOLE_WRITE_MAX + 1));
    assert_eq!(f.status(call::CONSOLE_WRITE, DATA), status::BAD_LENGTH);
    f.put(DATA, args(stream::STDOUT, 0, u64::MAX - 2, 8));
    assert_eq!(f.status(call::CONSOLE_WRITE, DATA), status::BAD_LENGTH);
    f.put(DATA, args(stream::STDOUT, 0, HOST, 8));
    assert_eq!(f.status(call::CONSOLE_WRITE, DATA), status::BAD_ADDRESS);
    f.put(DATA, args(stream::STDOUT, 0, TEXT + 0x20_0000 - 4, 8));
    assert_eq!(f.status(call::CONSOLE_WRITE, DATA), status::BAD_ADDRESS);
    // Nothing more reached the sinks.
    assert_eq!(f.out.text(), "hello");
}

#[test]
fn abort_reports_the_message_cut_to_the_limit_or_says_it_is_unreadable() {
    let mut f = fixture();
    f.put_bytes(DATA + 0x1000, b"it broke");
    f.put(
        DATA,
        Abort {
            msg: DATA + 0x1000,
            len: 8,
        },
    );
    assert_eq!(f.call(call::ABORT, DATA), Action::Abort("it broke".into()));
    f.put(
        DATA,
        Abort {
            msg: DATA + 0x1000,
            len: u64::MAX,
        },
    );
    match f.call(call::ABORT, DATA) {
        Action::Abort(m) => assert_eq!(m.len() as u64, ABORT_MESSAGE_MAX),
        other => panic!("{other:?}"),
    }
    f.put(DATA, Abort { msg: HOST, len: 8 });
    match f.call(call::ABORT, DATA) {
        Action::Abort(m) => assert!(m.contains("unreadable"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Even unreadable arguments end the guest with a report.
    match f.call(call::ABORT, HOST) {
        Action::Abort(m) => assert!(m.contains("unreadable"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn wait_passes_the_deadline() {
    let mut f = fixture();
    f.put(DATA, Wait { deadline_ns: 12345 });
    assert_eq!(f.call(call::WAIT, DATA), Action::Wait(12345));
    assert_eq!(f.status(call::WAIT, HOST), status::BAD_ADDRESS);
}

#[test]
fn fn_ready_needs_a_writable_aligned_input_buffer() {
    let mut f = fixture();
    f.put_bytes(DATA + 0x1000, b"one\0two\0\0");
    let ready = |inbuf, inbuf_len| FnReady {
        exports: DATA + 0x1000,
        exports_len: 9,
        inbuf,
        inbuf_len,
    };
    f.put(DATA, ready(DATA + 0x2000, 4096));
    match f.call(call::FN_READY, DATA) {
        Action::Ready(e) => {
            assert_eq!(e.names, ["one", "two"]);
            assert_eq!((e.inbuf, e.inbuf_len), (DATA + 0x2000, 4096));
        }
        other => panic!("{other:?}"),
    }
    // Text is readable but not writable: the host would write call input there.
    f.put(DATA, ready(TEXT, 4096));
    assert_eq!(f.status(call::FN_READY, DATA), status::BAD_ADDRESS);
    f.put(DATA, ready(DATA + 0x2000, 8));
    assert_eq!(f.status(call::FN_READY, DATA), status::BAD_ARGUMENT);
    f.put(DATA, ready(DATA + 0x2004, 4096));
    assert_eq!(f.status(call::FN_READY, DATA), status::BAD_ARGUMENT);
    f.put(DATA, ready(u64::MAX - 0xfff, 0x2000));
    assert_eq!(f.status(call::FN_READY, DATA), status::BAD_ADDRESS);
}

#[test]
fn fn_mailbox_needs_aligned_writable_memory_apart_from_the_input_buffer() {
    let mut f = fixture();
    // Null, unaligned, read-only (text), host-only, and running off the end of memory.
    assert_eq!(f.status(call::FN_MAILBOX, 0), status::BAD_ADDRESS);
    assert_eq!(f.status(call::FN_MAILBOX, DATA + 8), status::UNALIGNED);
    assert_eq!(f.status(call::FN_MAILBOX, TEXT), status::BAD_ADDRESS);
    assert_eq!(f.status(call::FN_MAILBOX, HOST), status::BAD_ADDRESS);
    assert_eq!(
        f.status(call::FN_MAILBOX, DATA + 0x20_0000 - 64),
        status::BAD_ADDRESS
    );
    assert_eq!(f.fns.mailbox, 0, "nothing recorded for a refused mailbox");
    assert_eq!(f.status(call::FN_MAILBOX, DATA + 0x3000), status::OK);
    assert_eq!(f.fns.mailbox, DATA + 0x3000);
    // FN_READY carries it into the exports, unless it overlaps the input buffer.
    f.put_bytes(DATA + 0x1000, b"one\0");
    let ready = |inbuf| FnReady {
        exports: DATA + 0x1000,
        exports_len: 4,
        inbuf,
        inbuf_len: 4096,
    };
    f.put(DATA, ready(DATA + 0x2000));
    match f.call(call::FN_READY, DATA) {
        Action::Ready(e) => assert_eq!(e.mailbox, DATA + 0x3000),
        other => panic!("{other:?}"),
    }
    for inbuf in [DATA + 0x3000 - 4096 + 8, DATA + 0x3000 + 120] {
        f.put(DATA, ready(inbuf));
        assert_eq!(f.status(call::FN_READY, DATA), status::BAD_ARGUMENT);
    }
    // FN_NOTIFY without a warm sandbox is harmless.
    assert_eq!(f.status(call::FN_NOTIFY, 0), status::OK);
}

#[test]
fn fn_return_copies_the_output_or_reports_its_size() {
    let mut f = fixture();
    f.put_bytes(DATA + 0x1000, b"result");
    let ret = |out, out_len| FnReturn {
        status: 0,
        out,
        out_len,
    };
    f.put(DATA, ret(DATA + 0x1000, 6));
    assert_eq!(
        f.call(call::FN_RETURN, DATA),
        Action::Returned {
            status: 0,
            output: Ok(b"result".to_vec())
        }
    );
    // Over the host's limit (1024 here): only the length is reported.
    f.put(DATA, ret(DATA + 0x1000, 5000));
    assert_eq!(
        f.call(call::FN_RETURN, DATA),
        Action::Returned {
            status: 0,
            output: Err(5000)
        }
    );
    f.put(DATA, ret(HOST, 6));
    assert_eq!(f.status(call::FN_RETURN, DATA), status::BAD_ADDRESS);
}

#[test]
fn host_call_validates_before_running_the_function() {
    let mut f = fixture();
    let ran = Arc::new(AtomicBool::new(false));
    let ran2 = ran.clone();
    let upper: HostFn = Arc::new(move |input: &[u8]| {
        ran2.store(true, Ordering::SeqCst);
        if input == b"fail" {
            Err("no such person".into())
        } else {
            Ok(input.to_ascii_uppercase())
        }
    });
    f.fns.host_fns = Arc::new(HashMap::from([("upper".to_string(), upper)]));
    f.put_bytes(DATA + 0x1000, b"upper");
    f.put_bytes(DATA + 0x1100, b"abc");
    let hc = |name_len, input, input_len, output, output_cap| HostCall {
        name: DATA + 0x1000,
        name_len,
        input,
        input_len,
        output,
        output_cap,
    };
    f.put(DATA, hc(5, DATA + 0x1100, 3, DATA + 0x2000, 16));
    assert_eq!(f.status(call::HOST_CALL, DATA), 3);
    let mut got = [0u8; 3];
    f.ram
        .mem()
        .read_slice(&mut got, GuestAddress(DATA + 0x2000))
        .unwrap();
    assert_eq!(&got, b"ABC");
    // The host's write is recorded, so a sandbox reset undoes it.
    assert_eq!(f.fns.host_writes, [(DATA + 0x2000, 3)]);

    ran.store(false, Ordering::SeqCst);
    f.put(DATA, hc(4, DATA + 0x1100, 3, DATA + 0x2000, 16));
    assert_eq!(f.status(call::HOST_CALL, DATA), status::NOT_FOUND);
    // An output buffer the guest may not write is refused before the function runs.
    f.put(DATA, hc(5, DATA + 0x1100, 3, TEXT, 16));
    assert_eq!(f.status(call::HOST_CALL, DATA), status::BAD_ADDRESS);
    f.put(DATA, hc(5, DATA + 0x1100, 3, u64::MAX - 4, 16));
    assert_eq!(f.status(call::HOST_CALL, DATA), status::BAD_LENGTH);
    f.put(DATA, hc(5, HOST, 3, DATA + 0x2000, 16));
    assert_eq!(f.status(call::HOST_CALL, DATA), status::BAD_ADDRESS);
    f.put(DATA, hc(300, DATA + 0x1100, 3, DATA + 0x2000, 16));
    assert_eq!(f.status(call::HOST_CALL, DATA), status::BAD_LENGTH);
    assert!(
        !ran.load(Ordering::SeqCst),
        "the host function ran on bad input"
    );

    // Output larger than the buffer, and the function's own error (NUL-terminated).
    f.put(DATA, hc(5, DATA + 0x1100, 3, DATA + 0x2000, 2));
    assert_eq!(f.status(call::HOST_CALL, DATA), status::BAD_LENGTH);
    f.put_bytes(DATA + 0x1100, b"fail");
    f.put(DATA, hc(5, DATA + 0x1100, 4, DATA + 0x2000, 64));
    assert_eq!(f.status(call::HOST_CALL, DATA), status::HOST_FN_FAILED);
    let mut msg = [0u8; 15];
    f.ram
        .mem()
        .read_slice(&mut msg, GuestAddress(DATA + 0x2000))
        .unwrap();
    assert_eq!(&msg, b"no such person\0");
}

/// Writes console records at ring offset `start` (wrapping) and publishes `producer`.
fn publish(f: &Fixture, start: u64, bytes: &[u8], producer: u64) {
    for (i, b) in bytes.iter().enumerate() {
        let off = (start + i as u64) % CONSOLE_DATA_SIZE;
        f.put(CONSOLE_DATA_ADDR + off, *b);
    }
    f.put(CONSOLE_RING_ADDR, producer);
}

fn record(stream: u8, payload: &[u8]) -> Vec<u8> {
    let mut r = vec![stream, payload.len() as u8, (payload.len() >> 8) as u8];
    r.extend_from_slice(payload);
    r
}

#[test]
fn console_records_are_delivered_in_order_per_stream() {
    let mut f = fixture();
    let mut bytes = record(stream::STDOUT as u8, b"out1 ");
    bytes.extend(record(stream::STDERR as u8, b"err"));
    bytes.extend(record(stream::STDOUT as u8, b"out2"));
    publish(&f, 0, &bytes, bytes.len() as u64);
    f.console.drain(f.ram.mem()).unwrap();
    assert_eq!(f.out.text(), "out1 out2");
    assert_eq!(f.err.text(), "err");
    // The host published its consumer index for the guest.
    let consumer: u64 = f
        .ram
        .mem()
        .read_obj(GuestAddress(CONSOLE_RING_ADDR + 64))
        .unwrap();
    assert_eq!(consumer, bytes.len() as u64);
    // Nothing new: nothing delivered.
    f.console.drain(f.ram.mem()).unwrap();
    assert_eq!(f.out.text(), "out1 out2");
}

#[test]
fn a_record_that_wraps_around_the_ring_end_is_whole() {
    let mut f = fixture();
    let start = CONSOLE_DATA_SIZE - 4;
    f.console.set_consumed(start);
    let bytes = record(stream::STDOUT as u8, b"wrapped line");
    publish(&f, start, &bytes, start + bytes.len() as u64);
    f.console.drain(f.ram.mem()).unwrap();
    assert_eq!(f.out.text(), "wrapped line");
}

#[test]
fn a_torn_or_oversized_record_is_an_error_after_the_good_ones() {
    // A header cut short.
    let mut f = fixture();
    let mut bytes = record(stream::STDOUT as u8, b"good");
    bytes.extend([stream::STDOUT as u8, 5]);
    publish(&f, 0, &bytes, bytes.len() as u64);
    let e = f.console.drain(f.ram.mem()).unwrap_err();
    assert!(e.contains("cut short"), "{e}");
    assert_eq!(f.out.text(), "good");
    // A record longer than what was published.
    let mut f = fixture();
    let mut bytes = record(stream::STDOUT as u8, b"good");
    bytes.extend([stream::STDOUT as u8, 0xff, 0x00, b'x']);
    publish(&f, 0, &bytes, bytes.len() as u64);
    let e = f.console.drain(f.ram.mem()).unwrap_err();
    assert!(e.contains("extends past"), "{e}");
    assert_eq!(f.out.text(), "good");
    // An unknown stream.
    let mut f = fixture();
    let bytes = record(7, b"x");
    publish(&f, 0, &bytes, bytes.len() as u64);
    let e = f.console.drain(f.ram.mem()).unwrap_err();
    assert!(e.contains("unknown stream"), "{e}");
    assert_eq!(f.out.text(), "");
}

#[test]
fn a_producer_index_too_far_ahead_is_an_error_and_consumes_everything() {
    let mut f = fixture();
    publish(&f, 0, &[], CONSOLE_DATA_SIZE + 1);
    let e = f.console.drain(f.ram.mem()).unwrap_err();
    assert!(e.contains("ahead of the consumer"), "{e}");
    assert_eq!(f.out.text(), "");
    // A producer behind the consumer (wrapping subtraction) is just as impossible.
    let mut f = fixture();
    f.console.set_consumed(100);
    publish(&f, 0, &[], 50);
    assert!(f.console.drain(f.ram.mem()).is_err());
}
