//! `pvrun serve` against hostile clients, over real sockets on 127.0.0.1: slow headers,
//! slow bodies, thousands of idle connections, a connection cap, oversized bodies,
//! garbage, a pipelined flood, running out of file descriptors, and a shutdown with a
//! call in flight. While an attack runs, a well-behaved client's calls must keep
//! succeeding, each within [`GOOD_LATENCY`].
//!
//! Every loop here is bounded in count and time, and every server is killed on drop.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::guest;

/// The slowest a well-behaved client's call may be while an attack runs.
const GOOD_LATENCY: Duration = Duration::from_secs(2);

/// The tests here run one at a time: each measures latencies under an attack, and two
/// attacks at once on two cores would measure each other.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A `pvrun serve` process; killed (and reaped) on drop.
struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(guest_name: &str, opts: &[&str]) -> Server {
        let child = Command::new(common::pvrun_bin())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(opts)
            .arg(guest(guest_name))
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pvrun serve");
        Server::wait_ready(child)
    }

    fn wait_ready(mut child: Child) -> Server {
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(l.clone());
                sink.lock().unwrap().push(l);
            }
        });
        let mut server = Server {
            child,
            addr: String::new(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.addr.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => {
                    if let Some(rest) = l.split("http://").nth(1) {
                        server.addr = rest.split('/').next().unwrap().to_string();
                    }
                }
                Err(_) => panic!("pvrun serve did not get ready: {:?}", server.log()),
            }
        }
        server
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits up to `within` for a log line containing `what`.
    fn wait_log(&self, what: &str, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(l) = self.log().into_iter().find(|l| l.contains(what)) {
                return Some(l);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(&self.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One parsed response.
#[derive(Clone, Debug)]
struct Resp {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one response (Content-Length framed, as the gateway's all are).
fn read_response(r: &mut impl BufRead) -> std::io::Result<Resp> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(ErrorKind::UnexpectedEof.into());
    }
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidData, line.clone()))?;
    let mut headers = HashMap::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(Resp {
        status,
        headers,
        body,
    })
}

fn request_bytes(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

/// One request on a fresh connection.
fn call(addr: &str, method: &str, path: &str, body: &[u8]) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(&request_bytes(method, path, body))?;
    read_response(&mut BufReader::new(s))
}

/// A well-behaved client calling `POST /upper` in a loop (a fresh connection each time)
/// until stopped; at most 2,000 calls and 120 s.
struct GoodClient {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Result<Duration, String>>>,
}

impl GoodClient {
    fn start(addr: &str) -> GoodClient {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, addr) = (stop.clone(), addr.to_string());
        let thread = std::thread::spawn(move || {
            let mut results = Vec::new();
            let begin = Instant::now();
            for i in 0..2000 {
                if flag.load(Ordering::Relaxed) || begin.elapsed() > Duration::from_secs(120) {
                    break;
                }
                let input = format!("good client call {i}");
                let t = Instant::now();
                results.push(match call(&addr, "POST", "/upper", input.as_bytes()) {
                    Ok(r) if r.status == 200 && r.body == input.to_uppercase().as_bytes() => {
                        Ok(t.elapsed())
                    }
                    Ok(r) => Err(format!("call {i}: {} {}", r.status, r.text())),
                    Err(e) => Err(format!("call {i}: {e}")),
                });
                std::thread::sleep(Duration::from_millis(50));
            }
            results
        });
        GoodClient { stop, thread }
    }

    /// Stops the client, asserts every call succeeded within [`GOOD_LATENCY`], and returns
    /// (calls, median, max).
    fn finish(self, what: &str) -> (usize, Duration, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let results = self.thread.join().expect("good client panicked");
        let mut ok: Vec<Duration> = Vec::new();
        for r in &results {
            match r {
                Ok(d) => ok.push(*d),
                Err(e) => panic!("{what}: a well-behaved call failed: {e}"),
            }
        }
        assert!(!ok.is_empty(), "{what}: no good call ran");
        ok.sort();
        let (median, max) = (ok[ok.len() / 2], *ok.last().unwrap());
        eprintln!(
            "{what}: {} well-behaved calls during the attack, median {:.1} ms, max {:.1} ms",
            ok.len(),
            median.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3
        );
        assert!(
            max < GOOD_LATENCY,
            "{what}: a well-behaved call took {max:?} (limit {GOOD_LATENCY:?})"
        );
        (ok.len(), median, max)
    }
}

/// Whether the server has closed `s` (a non-blocking read sees end of file or a reset).
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1024];
    let r = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue, // a response (e.g. 408) before the close: keep reading
            Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
    };
    s.set_nonblocking(false).unwrap();
    r
}

/// Drips `prefix` then one byte of `drip` every `every` on each of `conns` connections
/// until the server closes them all or `limit` passes; returns how long each lasted.
fn drip(
    server: &Server,
    conns: usize,
    prefix: &[u8],
    drip: u8,
    every: Duration,
    limit: Duration,
) -> Vec<Option<Duration>> {
    let start = Instant::now();
    let mut streams: Vec<Option<TcpStream>> = (0..conns)
        .map(|_| {
            let mut s = server.connect();
            s.write_all(prefix).unwrap();
            Some(s)
        })
        .collect();
    let mut lasted = vec![None; conns];
    while start.elapsed() < limit && streams.iter().any(Option::is_some) {
        std::thread::sleep(every);
        for (i, slot) in streams.iter_mut().enumerate() {
            if let Some(s) = slot
                && (closed_by_server(s) || s.write_all(&[drip]).is_err())
            {
                lasted[i] = Some(start.elapsed());
                *slot = None;
            }
        }
    }
    lasted
}

#[test]
fn slow_headers_are_cut_off_at_the_header_deadline() {
    let _serial = serial();
    let server = Server::start("functions", &["--header-timeout", "1", "--pool", "1"]);
    let good = GoodClient::start(&server.addr);
    // 50 connections sending a header a byte every 200 ms, for at most 8 s.
    let lasted = drip(
        &server,
        50,
        b"POST /upper HTTP/1.1\r\nHost: test\r\nX-Slow: ",
        b'a',
        Duration::from_millis(200),
        Duration::from_secs(8),
    );
    let stats = good.finish("slow headers");
    let worst = lasted
        .iter()
        .map(|l| l.expect("a slow-header connection was never cut off"))
        .max()
        .unwrap();
    eprintln!(
        "slow headers: 50 connections cut off, the last after {:.2} s (deadline 1 s)",
        worst.as_secs_f64()
    );
    assert!(worst < Duration::from_millis(2500), "{worst:?}");
    assert!(stats.0 >= 3);
    // An idle keep-alive connection is held to the same deadline.
    let mut idle = server.connect();
    idle.write_all(&request_bytes("POST", "/upper", b"x"))
        .unwrap();
    let mut r = BufReader::new(idle.try_clone().unwrap());
    assert_eq!(read_response(&mut r).unwrap().status, 200);
    let t = Instant::now();
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "idle keep-alive lasted {:?}",
        t.elapsed()
    );
}

#[test]
fn slow_bodies_get_408_and_never_hold_a_sandbox() {
    let _serial = serial();
    // One sandbox: if a slow body held it, the good client would stall.
    let server = Server::start(
        "functions",
        &["--body-timeout", "1", "--pool", "1", "--max-inflight", "2"],
    );
    let good = GoodClient::start(&server.addr);
    let start = Instant::now();
    let mut slow: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = server.connect();
            s.write_all(b"POST /upper HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    // Drip body bytes until each gets its answer (bounded: 40 rounds of 100 ms).
    let mut answered = vec![None; slow.len()];
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(100));
        for (i, s) in slow.iter_mut().enumerate() {
            if answered[i].is_none() {
                let _ = s.write_all(b"z");
                s.set_nonblocking(true).unwrap();
                let mut peek = [0u8; 1];
                let ready = matches!(s.peek(&mut peek), Ok(n) if n > 0);
                s.set_nonblocking(false).unwrap();
                if ready {
                    let r = read_response(&mut BufReader::new(s.try_clone().unwrap())).unwrap();
                    answered[i] = Some((start.elapsed(), r));
                }
            }
        }
        if answered.iter().all(Option::is_some) {
            break;
        }
    }
    good.finish("slow bodies");
    let mut worst = Duration::ZERO;
    for a in answered {
        let (t, r) = a.expect("a slow body was never answered");
        assert_eq!(r.status, 408, "{}", r.text());
        assert_eq!(r.header("x-pvrun-outcome"), "body-timeout");
        assert_eq!(r.header("connection"), "close");
        worst = worst.max(t);
    }
    eprintln!(
        "slow bodies: 20 answered 408, the last after {:.2} s (deadline 1 s)",
        worst.as_secs_f64()
    );
    assert!(worst < Duration::from_millis(2500), "{worst:?}");
}

/// Raises this process's soft RLIMIT_NOFILE to at least `want` (bounded by the hard limit).
fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only `lim`.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
    lim.rlim_cur
}

#[test]
fn two_thousand_idle_connections_do_not_starve_a_good_client() {
    let _serial = serial();
    let limit = raise_nofile(2000 + 512);
    assert!(limit >= 2300, "RLIMIT_NOFILE hard limit too low: {limit}");
    let server = Server::start(
        "functions",
        &["--max-connections", "2200", "--header-timeout", "60"],
    );
    let before = server.open_fds();
    let t = Instant::now();
    let idle: Vec<TcpStream> = (0..2000).map(|_| server.connect()).collect();
    let opened = t.elapsed();
    let good = GoodClient::start(&server.addr);
    std::thread::sleep(Duration::from_secs(2));
    let (calls, median, max) = good.finish("2,000 idle connections");
    let fds = server.open_fds();
    eprintln!(
        "2,000 idle connections opened in {:.2} s; server fds {before} -> {fds}; {calls} good calls, median {median:?}, max {max:?}",
        opened.as_secs_f64()
    );
    assert!(
        fds >= before + 1900,
        "the server did not hold the connections: {fds} fds"
    );
    // The server is one process with a bounded thread count, whatever the connections.
    let threads = std::fs::read_dir(format!("/proc/{}/task", server.pid()))
        .unwrap()
        .count();
    assert!(threads < 64, "{threads} threads for 2,000 connections");
    drop(idle);
}

#[test]
fn connections_beyond_the_cap_are_answered_503_and_closed() {
    let _serial = serial();
    let server = Server::start(
        "functions",
        &["--max-connections", "20", "--header-timeout", "30"],
    );
    let base = server.open_fds();
    let held: Vec<TcpStream> = (0..20).map(|_| server.connect()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let mut refused = 0;
    for _ in 0..200 {
        let mut s = server.connect();
        let _ = s.write_all(&request_bytes("POST", "/upper", b"x"));
        let r = read_response(&mut BufReader::new(s.try_clone().unwrap()))
            .expect("a connection beyond the cap got no answer");
        assert_eq!(r.status, 503);
        assert_eq!(r.header("retry-after"), "1");
        assert_eq!(r.header("x-pvrun-outcome"), "busy");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty(), "the server kept talking after its 503");
        refused += 1;
    }
    let fds = server.open_fds();
    eprintln!(
        "cap of 20: {refused} connections beyond it answered 503 in {:.2} s; server fds {base} -> {fds}",
        t.elapsed().as_secs_f64()
    );
    assert!(fds < base + 20 + 70, "server fds grew to {fds}");
    assert!(
        server
            .wait_log("answering 503", Duration::from_secs(1))
            .is_some()
    );
    // Once the held connections close, a client gets in again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = call(&server.addr, "POST", "/upper", b"back").unwrap();
        if r.status == 200 {
            assert_eq!(r.body, b"BACK");
            break;
        }
        assert!(Instant::now() < deadline, "never got back in: {}", r.status);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn too_many_calls_in_flight_get_503() {
    let _serial = serial();
    let server = Server::start(
        "badfunctions",
        &["--pool", "1", "--max-inflight", "2", "--timeout", "1.5"],
    );
    let spins: Vec<_> = (0..2)
        .map(|_| {
            let addr = server.addr.clone();
            std::thread::spawn(move || call(&addr, "POST", "/spin", b"").unwrap())
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let r = call(&server.addr, "POST", "/echo", b"x").unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), "1");
    assert_eq!(r.header("x-pvrun-outcome"), "busy");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    for s in spins {
        assert_eq!(s.join().unwrap().status, 504);
    }
    assert_eq!(
        call(&server.addr, "POST", "/echo", b"x").unwrap().status,
        200
    );
}

#[test]
fn oversized_bodies_get_413_before_they_are_read() {
    let _serial = serial();
    let server = Server::start("functions", &[]);
    // 1 GiB declared, not a byte sent: the answer cannot have waited for the body.
    let mut s = server.connect();
    s.write_all(b"POST /upper HTTP/1.1\r\nHost: test\r\nContent-Length: 1073741824\r\n\r\n")
        .unwrap();
    let t = Instant::now();
    let r = read_response(&mut BufReader::new(s.try_clone().unwrap())).unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.header("x-pvrun-outcome"), "too-large");
    assert_eq!(r.header("connection"), "close");
    assert!(t.elapsed() < Duration::from_secs(1));
    // The limit is the guest's real one: its input buffer minus the call header.
    let max: usize = r
        .text()
        .split("than the ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no limit in {}", r.text()));
    assert_eq!(max, 1 << 20, "the functions guest takes 1 MiB");
    let exact = vec![b'a'; max];
    let r = call(&server.addr, "POST", "/upper", &exact).unwrap();
    assert_eq!((r.status, r.body.len()), (200, max));
    let r = call(&server.addr, "POST", "/upper", &vec![b'a'; max + 1]).unwrap();
    assert_eq!(r.status, 413);
    // A chunked body is counted as it arrives: 413 once it passes the limit.
    let mut s = server.connect();
    s.write_all(b"POST /upper HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    let chunk = vec![b'b'; 64 << 10];
    let mut sent = 0;
    while sent <= max + (256 << 10) {
        let mut c = format!("{:x}\r\n", chunk.len()).into_bytes();
        c.extend_from_slice(&chunk);
        c.extend_from_slice(b"\r\n");
        if s.write_all(&c).is_err() {
            break;
        }
        sent += chunk.len();
    }
    let r = read_response(&mut BufReader::new(s)).unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    eprintln!(
        "oversized: 1 GiB Content-Length refused in {:.1} ms without reading; limit {max} bytes",
        t.elapsed().as_secs_f64() * 1e3
    );
}

#[test]
fn garbage_requests_get_400_and_never_crash_the_server() {
    let _serial = serial();
    let server = Server::start("functions", &[]);
    let good = GoodClient::start(&server.addr);
    let long_header = format!("GET / HTTP/1.1\r\nX-Long: {}\r\n\r\n", "a".repeat(100_000));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not http", b"GARBAGE\r\n\r\n".to_vec()),
        ("binary", b"\x00\x01\x02\xff\xfe\r\n\r\n".to_vec()),
        ("bad version", b"GET / HTTP/9.9\r\n\r\n".to_vec()),
        ("no path", b"POST\r\n\r\n".to_vec()),
        (
            "bad length",
            b"POST /upper HTTP/1.1\r\nContent-Length: abc\r\n\r\n".to_vec(),
        ),
        (
            "two lengths",
            b"POST /upper HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello".to_vec(),
        ),
        (
            "bad chunk",
            b"POST /upper HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
        ),
        ("header too long", long_header.into_bytes()),
    ];
    for (what, bytes) in &cases {
        let mut s = server.connect();
        let _ = s.write_all(bytes);
        let r = read_response(&mut BufReader::new(s))
            .unwrap_or_else(|e| panic!("{what}: no response: {e}"));
        assert!(
            r.status == 400 || (*what == "header too long" && r.status == 431),
            "{what}: {} {}",
            r.status,
            r.text()
        );
    }
    // Random bytes (a fixed-seed generator), each on its own connection.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..200 {
        let mut s = server.connect();
        let len = 1 + (x % 300) as usize;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let _ = s.write_all(&bytes);
        let _ = s.write_all(b"\r\n\r\n");
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    good.finish("garbage");
    let r = call(&server.addr, "GET", "/healthz", b"").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        call(&server.addr, "POST", "/upper", b"ok").unwrap().body,
        b"OK"
    );
}

#[test]
fn a_pipelined_flood_of_100_requests_on_one_connection() {
    let _serial = serial();
    let server = Server::start("functions", &[]);
    let good = GoodClient::start(&server.addr);
    let mut s = server.connect();
    let mut all = Vec::new();
    for i in 0..100 {
        all.extend(request_bytes(
            "POST",
            "/upper",
            format!("req {i}").as_bytes(),
        ));
    }
    let mut r = BufReader::new(s.try_clone().unwrap());
    // Ten floods back to back, each written at once before a response is read.
    let mut took = Duration::ZERO;
    for round in 0..10 {
        let t = Instant::now();
        s.write_all(&all).unwrap();
        for i in 0..100 {
            let resp =
                read_response(&mut r).unwrap_or_else(|e| panic!("round {round} response {i}: {e}"));
            assert_eq!(resp.status, 200);
            assert_eq!(resp.body, format!("REQ {i}").as_bytes());
        }
        took = took.max(t.elapsed());
    }
    eprintln!(
        "pipelined: 10 floods of 100 requests answered in order, the slowest flood in {:.1} ms",
        took.as_secs_f64() * 1e3
    );
    assert!(took < Duration::from_secs(10));
    good.finish("pipelined flood");
    // The connection is still usable (keep-alive).
    s.write_all(&request_bytes("GET", "/healthz", b"")).unwrap();
    assert_eq!(read_response(&mut r).unwrap().status, 200);
}

#[test]
fn running_out_of_file_descriptors_pauses_accepting_then_recovers() {
    let _serial = serial();
    let server = Server::start("functions", &["--pool", "1", "--header-timeout", "30"]);
    let base = server.open_fds() as u64;
    // Leave the server room for a few connections only.
    let lim = libc::rlimit {
        rlim_cur: base + 6,
        rlim_max: base + 6,
    };
    // SAFETY: prlimit on our own child; `lim` is read only.
    let rc = unsafe {
        libc::prlimit(
            server.pid(),
            libc::RLIMIT_NOFILE,
            &lim,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let hogs: Vec<TcpStream> = (0..40).map(|_| server.connect()).collect();
    let line = server
        .wait_log("cannot accept connections", Duration::from_secs(5))
        .expect("the server never reported the accept error");
    eprintln!("out of fds: {line}");
    std::thread::sleep(Duration::from_millis(1500));
    let reports = server
        .log()
        .iter()
        .filter(|l| l.contains("cannot accept connections"))
        .count();
    assert_eq!(reports, 1, "one line per burst: {:?}", server.log());
    let mut child_status = None;
    // SAFETY: waitpid with WNOHANG on our own child only peeks.
    let r = unsafe { libc::waitpid(server.pid(), &mut 0, libc::WNOHANG) };
    if r != 0 {
        child_status = Some(r);
    }
    assert!(child_status.is_none(), "the server died");
    // Free the descriptors: the queued connections are taken, then a new client is served.
    drop(hogs);
    let t = Instant::now();
    let r = call(&server.addr, "POST", "/upper", b"recovered").unwrap();
    assert_eq!(r.body, b"RECOVERED");
    eprintln!(
        "out of fds: served again {:.2} s after the descriptors were freed",
        t.elapsed().as_secs_f64()
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(
        server
            .wait_log("accepting connections again", Duration::from_secs(2))
            .is_some()
    );
}

#[test]
fn sigterm_lets_the_call_in_flight_finish_then_exits_0() {
    let _serial = serial();
    let mut server = Server::start("badfunctions", &["--pool", "1", "--timeout", "2"]);
    // An idle keep-alive connection: closed by the shutdown, not waited for.
    let mut idle = server.connect();
    idle.write_all(&request_bytes("POST", "/echo", b"hi"))
        .unwrap();
    let mut idle_r = BufReader::new(idle.try_clone().unwrap());
    assert_eq!(read_response(&mut idle_r).unwrap().body, b"hi");
    // A slow call: `spin` runs until the 2 s call timeout stops it.
    let addr = server.addr.clone();
    let t = Instant::now();
    let slow = std::thread::spawn(move || call(&addr, "POST", "/spin", b""));
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: a signal to our own child.
    assert_eq!(unsafe { libc::kill(server.pid(), libc::SIGTERM) }, 0);
    assert!(
        server
            .wait_log("stopped accepting", Duration::from_secs(2))
            .is_some()
    );
    // No new connections once it stopped accepting.
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        TcpStream::connect(&server.addr).is_err(),
        "still accepting after SIGTERM"
    );
    let r = slow
        .join()
        .unwrap()
        .expect("the call in flight was cut off");
    assert_eq!((r.status, r.header("x-pvrun-outcome")), (504, "timeout"));
    let mut rest = Vec::new();
    let _ = idle_r.read_to_end(&mut rest);
    // The process exits 0 once the call is done.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = t.elapsed();
    eprintln!(
        "SIGTERM: call answered, server exited {status} {:.2} s after the call started",
        took.as_secs_f64()
    );
    assert_eq!(status.code(), Some(0), "{:?}", server.log());
    assert!(
        took >= Duration::from_secs(2),
        "exited before the call ended"
    );

    // SIGINT with nothing in flight: straight to exit 0.
    let mut server = Server::start("functions", &["--pool", "1"]);
    // SAFETY: a signal to our own child.
    assert_eq!(unsafe { libc::kill(server.pid(), libc::SIGINT) }, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not exit on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn responses_carry_request_ids_and_no_host_details() {
    let _serial = serial();
    let server = Server::start("badfunctions", &["--pool", "1"]);
    let health = call(&server.addr, "GET", "/healthz", b"").unwrap();
    assert_eq!(health.status, 200);
    assert_eq!(
        call(&server.addr, "GET", "/readyz", b"").unwrap().status,
        200
    );
    let a = call(&server.addr, "POST", "/echo", b"x").unwrap();
    let b = call(&server.addr, "POST", "/echo", b"x").unwrap();
    assert!(!a.header("x-request-id").is_empty());
    assert_ne!(a.header("x-request-id"), b.header("x-request-id"));
    let f = call(&server.addr, "POST", "/fault", b"").unwrap();
    assert_eq!((f.status, f.header("x-pvrun-outcome")), (500, "fault"));
    let id = f.header("x-request-id").to_string();
    let body = f.text();
    assert!(!body.contains("0x") && !body.contains("rip"), "{body}");
    assert!(body.contains(&id), "{body}");
    // The details are in the log, under the same id.
    let line = server
        .wait_log(&format!("request {id}:"), Duration::from_secs(2))
        .expect("no log line for the crash");
    assert!(line.contains("rip"), "{line}");
    let p = call(&server.addr, "POST", "/panic", b"").unwrap();
    assert_eq!((p.status, p.header("x-pvrun-outcome")), (500, "panic"));
    assert!(p.text().contains("function panicked on purpose"));
}

#[test]
fn a_client_that_stops_reading_is_cut_off() {
    let _serial = serial();
    let server = Server::start("functions", &["--header-timeout", "1"]);
    let good = GoodClient::start(&server.addr);
    // Pipelined 1 MiB requests whose 1 MiB answers are never read: the socket buffers
    // fill, the server's writes stall, and the stall deadline ends the connection. At
    // most 128 requests (128 MiB) and 20 s.
    let s = server.connect();
    let req = request_bytes("POST", "/upper", &vec![b'q'; 1 << 20]);
    let t = Instant::now();
    let mut w = s.try_clone().unwrap();
    let mut sent = 0;
    let cut = loop {
        if sent == 128 || t.elapsed() > Duration::from_secs(20) {
            break None;
        }
        match w.write_all(&req) {
            Ok(()) => sent += 1,
            Err(_) => break Some(t.elapsed()),
        }
    };
    let (_, median, max) = good.finish("a client that stops reading");
    let cut = cut.unwrap_or_else(|| panic!("never cut off ({sent} requests sent)"));
    eprintln!(
        "slow reader: cut off {:.2} s after it started ({sent} MiB of requests sent; stall deadline 1 s); good calls median {median:?}, max {max:?}",
        cut.as_secs_f64()
    );
    assert!(cut < Duration::from_secs(10), "{cut:?}");
}

/// Every thread of process `pid` that is ours (named `pvrun` or `pvrun-*`; kernel-side
/// KVM helper threads are skipped) with its `Seccomp:` mode.
fn our_threads(pid: i32) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let comm = comm.trim().to_string();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .map(str::trim)
            .unwrap_or("?")
            .to_string();
        if comm == "pvrun" || comm.starts_with("pvrun-") {
            seen.push((comm, mode));
        }
    }
    seen
}

#[test]
fn every_thread_of_pvrun_serve_is_confined_and_it_still_serves() {
    let _g = serial();
    let mut server = Server::start("badfunctions", &["--pool", "2", "--timeout", "1"]);
    // Serving, resetting (fresh randomness each call), a crash, a timeout, console output:
    // every path a call takes, under the filters.
    let echo = call(&server.addr, "POST", "/echo", b"abc").unwrap();
    assert_eq!((echo.status, echo.body.as_slice()), (200, &b"abc"[..]));
    let a = call(&server.addr, "POST", "/random", b"").unwrap();
    let b = call(&server.addr, "POST", "/random", b"").unwrap();
    assert_eq!((a.status, b.status), (200, 200));
    assert_ne!(a.body, b.body, "two calls drew the same random bytes");
    let c = call(&server.addr, "POST", "/counter", b"").unwrap();
    assert_eq!(c.text(), "1", "the counter survived a reset");
    let f = call(&server.addr, "POST", "/fault", b"").unwrap();
    assert_eq!((f.status, f.header("x-pvrun-outcome")), (500, "fault"));
    let t = call(&server.addr, "POST", "/spin", b"").unwrap();
    assert_eq!((t.status, t.header("x-pvrun-outcome")), (504, "timeout"));
    let p = call(&server.addr, "POST", "/print", b"3").unwrap();
    assert_eq!(p.text(), "printed 3");
    let after = call(&server.addr, "POST", "/echo", b"still").unwrap();
    assert_eq!(after.body, b"still", "{:?}", server.log());
    assert!(
        server.wait_log("guest: ", Duration::from_secs(2)).is_some(),
        "the console writer wrote nothing: {:?}",
        server.log()
    );

    let seen = our_threads(server.pid());
    let count = |name: &str| seen.iter().filter(|(c, _)| c == name).count();
    // The main thread (accepting), tokio's two workers, one call thread per sandbox,
    // the process's one watchdog (shared by every sandbox), the console writer and the
    // log writer.
    assert_eq!(count("pvrun"), 1, "{seen:?}");
    assert_eq!(count("pvrun-gateway"), 2, "{seen:?}");
    assert_eq!(count("pvrun-call"), 2, "{seen:?}");
    assert_eq!(count("pvrun-watchdog"), 1, "{seen:?}");
    assert_eq!(count("pvrun-console"), 1, "{seen:?}");
    assert_eq!(count("pvrun-log"), 1, "{seen:?}");
    for (comm, mode) in &seen {
        assert_eq!(mode, "2", "thread {comm} is not confined: {seen:?}");
    }

    // A graceful shutdown under the filters: the call in flight finishes, exit 0.
    let addr = server.addr.clone();
    let slow = std::thread::spawn(move || call(&addr, "POST", "/spin", b""));
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: a signal to our own child.
    assert_eq!(unsafe { libc::kill(server.pid(), libc::SIGTERM) }, 0);
    let r = slow
        .join()
        .unwrap()
        .expect("the call in flight was cut off");
    assert_eq!(r.status, 504);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{status:?} {:?}", server.log());
    assert!(
        server
            .wait_log("shut down cleanly", Duration::from_secs(2))
            .is_some(),
        "{:?}",
        server.log()
    );
}

#[test]
fn a_stderr_nobody_reads_never_stalls_calls_or_shutdown() {
    let _g = serial();
    let mut child = Command::new(common::pvrun_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--pool",
            "2",
            "--timeout",
            "2",
        ])
        .arg(guest("badfunctions"))
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pvrun serve");
    // Read up to the banner, then never again: the 64 KiB pipe fills and every write to
    // stderr would block from then on.
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut addr = String::new();
    let mut l = String::new();
    while addr.is_empty() {
        l.clear();
        assert!(err.read_line(&mut l).unwrap() > 0, "no banner");
        if let Some(rest) = l.split("http://").nth(1) {
            addr = rest.split('/').next().unwrap().to_string();
        }
    }
    // Fill the pipe with guest console output, then make calls that log (panics).
    for _ in 0..4 {
        let r = call(&addr, "POST", "/print", b"20000").unwrap();
        assert_eq!(r.status, 200);
    }
    let t = Instant::now();
    for _ in 0..50 {
        let r = call(&addr, "POST", "/panic", b"").unwrap();
        assert_eq!(r.status, 500);
        let r = call(&addr, "POST", "/echo", b"still here").unwrap();
        assert_eq!(r.body, b"still here");
    }
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "calls stalled: {:?}",
        t.elapsed()
    );
    // And SIGTERM still ends the server.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.is_some(),
        "SIGTERM did not end a server whose stderr is stalled"
    );
    drop(err);
}

/// Opens a connection and sends the headers of a `POST /PATH` with `Content-Length: len`
/// and the first `sent` bytes of its body, which it then holds back.
fn held_body(server: &Server, path: &str, len: usize, sent: usize) -> TcpStream {
    let mut s = server.connect();
    let head = format!("POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {len}\r\n\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&vec![b'h'; sent]).unwrap();
    s
}

/// A POST without a body holds none of the `--max-buffered` budget. It used to be charged
/// the most a body may be (as a chunked one is), and refused 503 whenever less than that
/// was free (found while fuzzing the budget decision, `handler.rs`'s `body_share`).
#[test]
fn a_post_without_a_body_holds_none_of_the_budget() {
    let _serial = serial();
    // A 1 MiB budget, and the guest takes inputs of up to 1 MiB.
    let server = Server::start(
        "functions",
        &[
            "--pool",
            "1",
            "--max-buffered",
            "1M",
            "--body-timeout",
            "20",
        ],
    );
    // A body of 1 MiB less 1,000 bytes, half sent, holds all but 1,000 bytes.
    let held = held_body(&server, "/sha256", (1 << 20) - 1000, 1000);
    std::thread::sleep(Duration::from_millis(300));
    let mut s = server.connect();
    s.write_all(b"POST /sha256 HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let empty = read_response(&mut BufReader::new(s)).unwrap();
    assert_eq!(empty.status, 200, "{}", empty.text());
    assert_eq!(
        empty.text(),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    // A chunked body may be up to 1 MiB: it still does not fit.
    let mut s = server.connect();
    s.write_all(b"POST /sha256 HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    let r = read_response(&mut BufReader::new(s)).unwrap();
    assert_eq!(
        (r.status, r.header("x-pvrun-outcome")),
        (503, "busy"),
        "{}",
        r.text()
    );
    drop(held);
}

#[test]
fn bytes_in_flight_are_capped_and_beyond_the_cap_requests_get_503() {
    let _serial = serial();
    // 3 MiB for bodies and outputs; the guest takes inputs of up to 1 MiB.
    let server = Server::start(
        "functions",
        &[
            "--pool",
            "1",
            "--max-buffered",
            "3M",
            "--body-timeout",
            "20",
        ],
    );
    let mib = 1 << 20;
    // Three concurrent 1 MiB bodies, half sent: each holds 1 MiB of the budget from its
    // headers on.
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| held_body(&server, "/sha256", mib, mib / 2))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // A fourth is refused at once, before its body is read, and so is any other call
    // while the budget is spent.
    let t = Instant::now();
    let mut fourth = held_body(&server, "/sha256", mib, 0);
    let r = read_response(&mut BufReader::new(fourth.try_clone().unwrap())).unwrap();
    assert_eq!(
        (r.status, r.header("x-pvrun-outcome")),
        (503, "busy"),
        "{}",
        r.text()
    );
    assert_eq!(r.header("retry-after"), "1");
    assert_eq!(r.header("connection"), "close");
    assert!(r.text().contains("bytes"), "{}", r.text());
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let _ = fourth.write_all(b"x");
    let small = call(&server.addr, "POST", "/sha256", b"abc").unwrap();
    assert_eq!(small.status, 503, "{}", small.text());
    // The held bodies complete and are served; then the budget is free again.
    let rest = vec![b'h'; mib - mib / 2];
    for s in &mut held {
        s.write_all(&rest).unwrap();
    }
    let digests: Vec<Resp> = held
        .into_iter()
        .map(|s| read_response(&mut BufReader::new(s)).unwrap())
        .collect();
    for d in &digests {
        assert_eq!(d.status, 200, "{}", d.text());
        assert_eq!(d.body, digests[0].body);
    }
    let again = call(&server.addr, "POST", "/sha256", b"abc").unwrap();
    assert_eq!(again.status, 200, "{}", again.text());
    // A body larger than the whole budget can never fit: 413 (not a 503 to retry).
    drop(server);
    let server = Server::start("functions", &["--pool", "1", "--max-buffered", "512K"]);
    let r = call(&server.addr, "POST", "/sha256", &vec![b'a'; 600_000]).unwrap();
    assert_eq!(
        (r.status, r.header("x-pvrun-outcome")),
        (413, "too-large"),
        "{}",
        r.text()
    );
    assert!(r.text().contains("--max-buffered"), "{}", r.text());
    // A chunked body (no declared length) may be as large as the budget, no larger.
    let chunked = |total: usize| {
        let mut s = server.connect();
        s.write_all(b"POST /sha256 HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap();
        let chunk = vec![b'c'; 50_000];
        let mut sent = 0;
        while sent < total {
            let mut c = format!("{:x}\r\n", chunk.len()).into_bytes();
            c.extend_from_slice(&chunk);
            c.extend_from_slice(b"\r\n");
            if s.write_all(&c).is_err() {
                break;
            }
            sent += chunk.len();
        }
        let _ = s.write_all(b"0\r\n\r\n");
        read_response(&mut BufReader::new(s)).unwrap()
    };
    assert_eq!(chunked(100_000).status, 200);
    let r = chunked(700_000);
    assert_eq!(
        (r.status, r.header("x-pvrun-outcome")),
        (413, "too-large"),
        "{}",
        r.text()
    );
    drop(server);

    // Outputs count too, until they are sent: with 1 MiB of a 1.5 MiB budget held by a
    // body, a 600 KB output does not fit and its call is answered 503.
    let server = Server::start(
        "badfunctions",
        &[
            "--pool",
            "1",
            "--max-buffered",
            "1536K",
            "--body-timeout",
            "20",
        ],
    );
    let holder = held_body(&server, "/echo", mib, 10);
    std::thread::sleep(Duration::from_millis(300));
    let r = call(&server.addr, "POST", "/big-output", b"600000").unwrap();
    assert_eq!(
        (r.status, r.header("x-pvrun-outcome")),
        (503, "busy"),
        "{}",
        r.text()
    );
    assert!(
        server
            .wait_log(
                "an output of 600000 bytes does not fit",
                Duration::from_secs(2)
            )
            .is_some(),
        "{:?}",
        server.log()
    );
    drop(holder);
    std::thread::sleep(Duration::from_millis(300));
    let r = call(&server.addr, "POST", "/big-output", b"600000").unwrap();
    assert_eq!((r.status, r.body.len()), (200, 600_000), "{}", r.text());
}
