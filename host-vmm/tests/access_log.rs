//! The per-request access log of `pvrun serve`: with `RUST_LOG=pvrun::access=info` one
//! `tracing` line per request (request id, guest, method, path, function, status,
//! outcome, latency, input/output bytes), text escaped; without it, none.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{guest, pvrun_bin};

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `pvrun serve` whose stderr lines are kept; killed on drop.
struct Server {
    child: Child,
    addr: String,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(rust_log: Option<&str>, source: &Path) -> Server {
        Server::start_with(&[], rust_log, source)
    }

    fn start_with(extra: &[&str], rust_log: Option<&str>, source: &Path) -> Server {
        let mut cmd = Command::new(pvrun_bin());
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--pool", "1"])
            .args(extra)
            .arg(source)
            .stderr(Stdio::piped())
            .env_remove("RUST_LOG");
        if let Some(l) = rust_log {
            cmd.env("RUST_LOG", l);
        }
        let mut child = cmd.spawn().expect("start pvrun serve");
        let mut reader = BufReader::new(child.stderr.take().unwrap());
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut addr = String::new();
        let mut seen = Vec::new();
        while addr.is_empty() && Instant::now() < deadline {
            let mut l = Vec::new();
            match reader.read_until(b'\n', &mut l) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let l = String::from_utf8_lossy(&l).into_owned();
                    if let Some(rest) = l.split("http://").nth(1) {
                        addr = rest.split('/').next().unwrap().to_string();
                    }
                    seen.push(l);
                }
            }
        }
        let lines = Arc::new(Mutex::new(Vec::new()));
        let keep = lines.clone();
        std::thread::spawn(move || {
            loop {
                let mut l = Vec::new();
                match reader.read_until(b'\n', &mut l) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => keep
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&l).into_owned()),
                }
            }
        });
        let s = Server { child, addr, lines };
        assert!(
            !s.addr.is_empty(),
            "pvrun serve did not get ready: {seen:?}"
        );
        s
    }

    /// Status and `x-request-id` of one request.
    fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(body).unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).unwrap();
        let head = String::from_utf8_lossy(&resp).into_owned();
        let id = head
            .lines()
            .find_map(|l| l.strip_prefix("x-request-id: "))
            .unwrap_or_else(|| panic!("no request id: {head}"))
            .trim()
            .to_string();
        (head[9..12].parse().unwrap(), id)
    }

    /// The access lines logged so far, waiting up to 5 s for `n` of them.
    fn access_lines(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got: Vec<String> = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains("pvrun::access"))
                .cloned()
                .collect();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `key=` in a log line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let pat = format!(" {key}=");
    let at = line
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key} in {line:?}"));
    line[at + pat.len()..].split(' ').next().unwrap().trim_end()
}

/// The functions guest under a name with an escape sequence in it (text the log must not
/// pass to a terminal raw).
fn oddly_named_guest() -> (TempDir, PathBuf) {
    let dir = TempDir(std::env::temp_dir().join(format!("pvrun-access-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let link = dir.0.join("fn\x1b[31mctions");
    std::os::unix::fs::symlink(guest("functions"), &link).unwrap();
    (dir, link)
}

#[test]
fn one_access_line_per_request_with_its_fields_escaped() {
    let (_dir, elf) = oddly_named_guest();
    let s = Server::start(Some("pvrun::access=info"), &elf);
    let (st1, id1) = s.request("POST", "/upper", b"hello");
    let (st2, id2) = s.request("POST", "/nope", b"xyz");
    let (st3, id3) = s.request("GET", "/healthz", b"");
    let (st4, id4) = s.request("POST", "/json-transform", b"not json");
    assert_eq!((st1, st2, st3, st4), (200, 404, 200, 422));
    let lines = s.access_lines(4);
    assert_eq!(lines.len(), 4, "{lines:?}");
    for l in &lines {
        assert!(!l.contains('\x1b'), "raw escape in {l:?}");
        assert!(l.contains(" INFO pvrun::access: request "), "{l:?}");
        assert!(field(l, "guest").ends_with("fn\\u{1b}[31mctions"), "{l:?}");
        let latency: u64 = field(l, "latency_us").parse().unwrap();
        assert!(latency < 10_000_000, "{l:?}");
    }
    let by_id = |id: &str| {
        lines
            .iter()
            .find(|l| field(l, "request_id") == id)
            .unwrap_or_else(|| panic!("no line for {id}: {lines:?}"))
    };
    let expect = [
        (&id1, "POST", "/upper", "upper", "200", "ok", "5", "5"),
        (&id2, "POST", "/nope", "nope", "404", "unknown", "0", ""),
        (&id3, "GET", "/healthz", "-", "200", "ok", "0", "5"),
        (
            &id4,
            "POST",
            "/json-transform",
            "json-transform",
            "422",
            "failed",
            "8",
            "",
        ),
    ];
    for (id, method, path, function, status, outcome, input, output) in expect {
        let l = by_id(id);
        assert_eq!(field(l, "method"), method, "{l:?}");
        assert_eq!(field(l, "path"), path, "{l:?}");
        assert_eq!(field(l, "function"), function, "{l:?}");
        assert_eq!(field(l, "status"), status, "{l:?}");
        assert_eq!(field(l, "outcome"), outcome, "{l:?}");
        assert_eq!(field(l, "input_bytes"), input, "{l:?}");
        if !output.is_empty() {
            assert_eq!(field(l, "output_bytes"), output, "{l:?}");
        } else {
            assert!(
                field(l, "output_bytes").parse::<u64>().unwrap() > 0,
                "{l:?}"
            );
        }
    }
}

#[test]
fn no_access_lines_without_rust_log() {
    let s = Server::start(None, &guest("functions"));
    assert_eq!(s.request("POST", "/upper", b"hello").0, 200);
    assert_eq!(s.request("GET", "/healthz", b"").0, 200);
    // A line would be on its way by now; the queue's writer is quick.
    std::thread::sleep(Duration::from_millis(300));
    let all = s.lines.lock().unwrap().clone();
    assert!(all.iter().all(|l| !l.contains("pvrun::access")), "{all:?}");
    // Other logging that does not ask for the access target leaves it off too.
    drop(s);
    let s = Server::start(Some("host_vmm=info"), &guest("functions"));
    assert_eq!(s.request("POST", "/upper", b"hello").0, 200);
    std::thread::sleep(Duration::from_millis(300));
    assert!(s.access_lines(0).is_empty());
}

#[test]
fn verbose_turns_the_access_log_on() {
    let s = Server::start_with(&["-v"], None, &guest("functions"));
    let (st, id) = s.request("POST", "/upper", b"hi");
    assert_eq!(st, 200);
    let lines = s.access_lines(1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(field(&lines[0], "request_id"), id, "{lines:?}");
    assert_eq!(field(&lines[0], "output_bytes"), "2", "{lines:?}");
}
