//! The console device: the guest's byte ring of stdout/stderr records (drained at every
//! exit, so printing costs no exit) and the `CONSOLE_WRITE` hypercall for large writes.

use std::io::Write;

use pvrun_abi::layout::{CONSOLE_DATA_ADDR, CONSOLE_DATA_SIZE, CONSOLE_RING_ADDR};
use pvrun_abi::{CONSOLE_RECORD_HEADER, CONSOLE_WRITE_MAX, ConsoleWrite, status, stream};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::GuestView;

/// Where guest console output goes.
pub struct Console {
    /// Guest stdout.
    pub(crate) stdout: Box<dyn Write + Send>,
    /// Guest stderr.
    pub(crate) stderr: Box<dyn Write + Send>,
    scratch: Vec<u8>,
    /// Bytes of the console ring consumed so far. The host keeps its own count and never
    /// trusts the copy it publishes to the guest.
    consumed: u64,
    /// Payload bytes the guest wrote (ring records and `CONSOLE_WRITE`), for statistics.
    bytes: u64,
}

impl Console {
    /// A console writing to the given sinks.
    pub fn new(stdout: Box<dyn Write + Send>, stderr: Box<dyn Write + Send>) -> Self {
        Console {
            stdout,
            stderr,
            scratch: Vec::new(),
            consumed: 0,
            bytes: 0,
        }
    }

    /// Bytes the guest wrote to its console so far (ring and `CONSOLE_WRITE`).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes of the console ring consumed so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Resets the consumed count (when guest memory is reset to a snapshot).
    pub fn set_consumed(&mut self, consumed: u64) {
        self.consumed = consumed;
    }

    /// Copies every complete record out of the guest's console ring to the sinks. An error
    /// (an impossible producer index, a record with a bad stream or cut short) means the
    /// guest corrupted the ring; the caller stops it.
    pub fn drain(&mut self, mem: &GuestMemoryMmap) -> Result<(), String> {
        let producer: u64 = mem
            .read_obj(GuestAddress(CONSOLE_RING_ADDR))
            .map_err(|e| format!("console ring unreadable: {e}"))?;
        if producer == self.consumed {
            return Ok(());
        }
        // Pairs with the guest's release store of `producer`: the bytes are read after it.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let avail = producer.wrapping_sub(self.consumed);
        if avail > CONSOLE_DATA_SIZE {
            return Err(format!(
                "console ring corrupted: producer index {producer} is {avail} bytes ahead of the consumer {} (ring size {CONSOLE_DATA_SIZE})",
                self.consumed
            ));
        }
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        buf.resize(avail as usize, 0);
        let start = self.consumed % CONSOLE_DATA_SIZE;
        let first = (CONSOLE_DATA_SIZE - start).min(avail) as usize;
        let r = mem
            .read_slice(&mut buf[..first], GuestAddress(CONSOLE_DATA_ADDR + start))
            .and_then(|_| mem.read_slice(&mut buf[first..], GuestAddress(CONSOLE_DATA_ADDR)));
        let result = match r {
            Err(e) => Err(format!("console ring unreadable: {e}")),
            Ok(()) => self.deliver(&mut buf),
        };
        self.scratch = buf;
        // Everything published is consumed, even a corrupt tail, so the guest never spins.
        self.consumed = producer;
        let _ = mem.write_obj(producer, GuestAddress(CONSOLE_RING_ADDR + 64));
        result
    }

    /// Writes the records in `buf` (the host's copy of the ring) to their streams, joining
    /// runs of records for the same stream into one write. The payloads are packed in place
    /// over the record headers, so delivering copies nothing more.
    fn deliver(&mut self, buf: &mut [u8]) -> Result<(), String> {
        let h = CONSOLE_RECORD_HEADER as usize;
        let (mut read, mut write, mut run_start) = (0usize, 0usize, 0usize);
        let mut run_stream = stream::STDOUT;
        let mut result = Ok(());
        while read < buf.len() {
            let Some(&[stream, lo, hi]) = buf.get(read..read + h) else {
                result = Err("console ring corrupted: a record header is cut short".into());
                break;
            };
            let (stream, len) = (stream as u32, u16::from_le_bytes([lo, hi]) as usize);
            if read + h + len > buf.len() {
                result = Err(format!(
                    "console ring corrupted: a record of {len} bytes extends past the published data"
                ));
                break;
            }
            if stream != stream::STDOUT && stream != stream::STDERR {
                result = Err(format!(
                    "console ring corrupted: record for unknown stream {stream}"
                ));
                break;
            }
            if stream != run_stream {
                self.emit(run_stream, &buf[run_start..write]);
                run_start = write;
                run_stream = stream;
            }
            buf.copy_within(read + h..read + h + len, write);
            write += len;
            read += h + len;
        }
        // Records before a corrupt one are still delivered.
        self.emit(run_stream, &buf[run_start..write]);
        result
    }

    fn emit(&mut self, stream: u32, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.bytes += data.len() as u64;
        let sink = if stream == stream::STDERR {
            &mut self.stderr
        } else {
            &mut self.stdout
        };
        // Host-side output errors (a closed pipe) are not the guest's fault.
        let _ = sink.write_all(data).and_then(|_| sink.flush());
    }
}

/// `CONSOLE_WRITE`: copies one buffer out of guest memory to a stream.
pub(super) fn console_write(
    arg: u64,
    guest: &GuestView<'_>,
    console: &mut Console,
) -> Result<i64, i64> {
    let a: ConsoleWrite = guest.read_args(arg)?;
    if a.reserved != 0 {
        return Err(status::BAD_ARGUMENT);
    }
    let sink = match a.stream {
        stream::STDOUT => &mut console.stdout,
        stream::STDERR => &mut console.stderr,
        _ => return Err(status::BAD_ARGUMENT),
    };
    let mut buf = std::mem::take(&mut console.scratch);
    let r = guest.read_buf(a.buf, a.len, CONSOLE_WRITE_MAX, &mut buf);
    if r.is_ok() {
        console.bytes += a.len;
        // Host-side output errors (a closed pipe) are not the guest's fault; drop the bytes.
        let _ = sink.write_all(&buf).and_then(|_| sink.flush());
    }
    console.scratch = buf;
    r.map(|_| a.len as i64)
}
