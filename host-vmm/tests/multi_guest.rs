//! One `pvrun serve` of several guests (`--guest`, `--config`): routing by guest, elastic
//! pools that grow under load and shrink after their idle time (seen through `/metrics`),
//! 429 beyond a guest's concurrency limit, `/metrics` counters per guest, the access log's
//! guest field, the threads' filters, and one-line errors (status 125) for bad guests and
//! config files. Real guests on real KVM, the real `pvrun` binary, HTTP over loopback.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::prom::{Metrics, parse};
use common::{TempDir, guest, pvrun_bin};

struct Server {
    child: Child,
    addr: String,
    lines: Arc<Mutex<Vec<String>>>,
}

struct Resp {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Resp {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
}

fn request(addr: &str, method: &str, path: &str, body: &[u8]) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response to {method} {path}: {resp:?}"));
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    Resp {
        status: head[9..12].parse().unwrap(),
        headers: head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect(),
        body: resp[split + 4..].to_vec(),
    }
}

impl Server {
    /// `pvrun serve --listen 127.0.0.1:0 ARGS`, once it says it serves.
    fn start(args: &[&str], rust_log: Option<&str>) -> Server {
        let mut cmd = Command::new(pvrun_bin());
        cmd.args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .stderr(Stdio::piped());
        match rust_log {
            Some(l) => cmd.env("RUST_LOG", l),
            None => cmd.env_remove("RUST_LOG"),
        };
        let mut child = cmd.spawn().expect("start pvrun serve");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for l in stderr.lines() {
                let Ok(l) = l else { break };
                if let Some(rest) = l.split("http://").nth(1) {
                    let _ = tx.send(rest.split('/').next().unwrap().to_string());
                }
                sink.lock().unwrap().push(l);
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let s = Server { child, addr, lines };
        assert!(
            !s.addr.is_empty(),
            "pvrun serve did not get ready: {:?}",
            s.lines.lock().unwrap()
        );
        s
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn request(&self, method: &str, path: &str, body: &[u8]) -> Resp {
        request(&self.addr, method, path, body)
    }

    /// A call on its own thread (for calls that stay busy).
    fn call_in_background(&self, path: &str, body: &[u8]) -> std::thread::JoinHandle<Resp> {
        let (addr, path, body) = (self.addr.clone(), path.to_string(), body.to_vec());
        std::thread::spawn(move || request(&addr, "POST", &path, &body))
    }

    fn metrics(&self) -> Metrics {
        let r = self.request("GET", "/metrics", b"");
        assert_eq!(r.status, 200);
        assert!(
            r.header("content-type")
                .starts_with("application/openmetrics-text"),
            "{:?}",
            r.headers
        );
        parse(&String::from_utf8(r.body).expect("metrics are UTF-8"))
    }

    /// Polls `/metrics` until `sample` is `want` (or panics after `within`).
    fn wait_metric(&self, sample: &str, want: f64, within: Duration) -> Metrics {
        let deadline = Instant::now() + within;
        loop {
            let m = self.metrics();
            if m.samples.get(sample) == Some(&want) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "{sample} is {:?}, not {want}, after {within:?}",
                m.samples.get(sample)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn elf(name: &str) -> String {
    guest(name).display().to_string()
}

/// The value of `key=` in a `tracing` line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let pat = format!(" {key}=");
    let start = line
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        + pat.len();
    line[start..].split(' ').next().unwrap()
}

#[test]
fn two_guests_are_routed_to_their_own_functions_and_counted_apart() {
    let fns = format!("fns={}", elf("functions"));
    let bad = format!("bad={},pool=1", elf("badfunctions"));
    let s = Server::start(
        &["--guest", &fns, "--guest", &bad],
        Some("pvrun::access=info"),
    );
    assert_eq!(s.request("GET", "/readyz", b"").status, 200);
    let root = s.request("GET", "/", b"");
    assert_eq!((root.status, root.text()), (200, "fns\nbad\n".to_string()));
    let listing = s.request("GET", "/fns", b"").text();
    assert!(listing.lines().any(|l| l == "upper"), "{listing}");
    assert!(!listing.lines().any(|l| l == "echo"), "{listing}");
    assert!(
        s.request("GET", "/bad", b"")
            .text()
            .lines()
            .any(|l| l == "echo")
    );

    // Each guest answers with its own functions.
    let up = s.request("POST", "/fns/upper", b"hello");
    assert_eq!((up.status, up.text().as_str()), (200, "HELLO"));
    assert_eq!(up.header("x-pvrun-outcome"), "ok");
    for i in 0..3 {
        let e = s.request("POST", "/bad/echo", format!("echo {i}").as_bytes());
        assert_eq!((e.status, e.text()), (200, format!("echo {i}")));
    }
    let sha = s.request("POST", "/fns/sha256", b"abc");
    assert_eq!(
        sha.text(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    // A function of the other guest is not this guest's.
    let cross = s.request("POST", "/bad/upper", b"x");
    assert_eq!(cross.status, 404);
    assert!(
        cross.text().starts_with("no function named `upper`"),
        "{}",
        cross.text()
    );
    let nobody = s.request("POST", "/nobody/upper", b"x");
    assert_eq!(nobody.status, 404);
    assert_eq!(
        nobody.text(),
        "no guest named `nobody`; this server serves: fns, bad (POST /GUEST/FUNCTION)\n"
    );
    assert_eq!(s.request("GET", "/nobody", b"").status, 404);
    // The single-guest path form is not a route here.
    assert_eq!(s.request("POST", "/upper", b"x").status, 404);
    let get = s.request("GET", "/fns/upper", b"");
    assert_eq!((get.status, get.header("allow")), (405, "POST"));

    let m = s.metrics();
    assert_eq!(
        m.get("pvrun_calls_total{function=upper,guest=fns,outcome=ok}"),
        1.0
    );
    assert_eq!(
        m.get("pvrun_calls_total{function=sha256,guest=fns,outcome=ok}"),
        1.0
    );
    assert_eq!(
        m.get("pvrun_calls_total{function=echo,guest=bad,outcome=ok}"),
        3.0
    );
    assert_eq!(
        m.get("pvrun_calls_total{function=-,guest=bad,outcome=unknown}"),
        1.0
    );
    // POST /nobody/upper, GET /nobody and POST /upper name no guest.
    assert_eq!(
        m.get("pvrun_calls_total{function=-,guest=-,outcome=unknown}"),
        3.0
    );
    let calls = m.sum("pvrun_calls_total");
    assert_eq!(calls, 9.0);
    assert_eq!(
        m.get("pvrun_call_duration_seconds_count{function=echo,guest=bad}"),
        3.0
    );
    assert_eq!(m.get("pvrun_resets_total{guest=fns}"), 2.0);
    assert_eq!(m.get("pvrun_resets_total{guest=bad}"), 3.0);
    assert_eq!(m.get("pvrun_pool_sandboxes{guest=fns}"), 1.0);
    assert_eq!(m.get("pvrun_pool_max_sandboxes{guest=fns}"), 4.0);
    assert_eq!(m.get("pvrun_pool_max_sandboxes{guest=bad}"), 1.0);
    assert_eq!(m.get("pvrun_concurrency_limit{guest=bad}"), 4.0);
    assert_eq!(m.get("pvrun_calls_in_flight{guest=bad}"), 0.0);
    assert!(m.get("pvrun_vm_exits_total{guest=bad,kind=hypercall}") >= 3.0);
    assert_eq!(m.get("pvrun_sandbox_creations_total{source=elf}"), 2.0);

    // The access log names the guest and function of each call.
    let deadline = Instant::now() + Duration::from_secs(5);
    let access = loop {
        let a: Vec<String> = s
            .log()
            .into_iter()
            .filter(|l| l.contains("pvrun::access"))
            .collect();
        if a.iter().any(|l| l.contains("path=/metrics")) || Instant::now() > deadline {
            break a;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let line = |path: &str| {
        access
            .iter()
            .find(|l| field(l, "path") == path)
            .unwrap_or_else(|| panic!("no access line for {path}: {access:?}"))
    };
    let l = line("/fns/upper");
    assert_eq!(
        (field(l, "guest"), field(l, "function"), field(l, "status")),
        ("fns", "upper", "200"),
        "{l}"
    );
    assert_eq!(
        (field(l, "input_bytes"), field(l, "output_bytes")),
        ("5", "5")
    );
    let l = line("/nobody/upper");
    assert_eq!((field(l, "guest"), field(l, "function")), ("-", "-"), "{l}");
    let l = line("/bad/upper");
    assert_eq!(
        (field(l, "guest"), field(l, "outcome")),
        ("bad", "unknown"),
        "{l}"
    );
}

#[test]
fn a_pool_grows_under_load_and_shrinks_back_after_its_idle_time() {
    let bad = format!("bad={},min=1,max=3,idle=1.5", elf("badfunctions"));
    let s = Server::start(&["--guest", &bad], None);
    let m = s.metrics();
    assert_eq!(m.get("pvrun_pool_sandboxes{guest=bad}"), 1.0);
    assert_eq!(m.get("pvrun_pool_min_sandboxes{guest=bad}"), 1.0);
    assert_eq!(m.get("pvrun_pool_max_sandboxes{guest=bad}"), 3.0);
    assert_eq!(m.get("pvrun_pool_grown_total{guest=bad}"), 0.0);

    // Three calls that each hold a sandbox for 2 s: the pool grows to its max of 3 while
    // they run; a fourth waits (in the guest's queue) for one of them.
    let mut busy: Vec<_> = (0..3)
        .map(|_| s.call_in_background("/bad/wait", b"2000"))
        .collect();
    let m = s.wait_metric(
        "pvrun_pool_sandboxes{guest=bad}",
        3.0,
        Duration::from_millis(1800),
    );
    assert_eq!(m.get("pvrun_pool_grown_total{guest=bad}"), 2.0);
    s.wait_metric(
        "pvrun_pool_busy_sandboxes{guest=bad}",
        3.0,
        Duration::from_secs(1),
    );
    busy.push(s.call_in_background("/bad/wait", b"100"));
    let m = s.wait_metric(
        "pvrun_calls_in_flight{guest=bad}",
        4.0,
        Duration::from_secs(1),
    );
    assert_eq!(
        m.get("pvrun_pool_sandboxes{guest=bad}"),
        3.0,
        "never beyond max"
    );
    assert_eq!(m.get("pvrun_pool_busy_sandboxes{guest=bad}"), 3.0);
    assert_eq!(m.get("pvrun_sandbox_creations_total{source=shell}"), 2.0);
    for b in busy {
        let r = b.join().unwrap();
        assert_eq!(
            (r.status, r.header("x-pvrun-outcome")),
            (200, "ok"),
            "{}",
            r.text()
        );
        assert!(r.text().starts_with("waited "), "{}", r.text());
    }
    let idle_since = Instant::now();
    // Still there right after the load (their idle time is not over)...
    let m = s.metrics();
    assert_eq!(m.get("pvrun_pool_sandboxes{guest=bad}"), 3.0);
    assert_eq!(m.get("pvrun_pool_shrunk_total{guest=bad}"), 0.0);
    assert_eq!(m.get("pvrun_pool_grown_total{guest=bad}"), 2.0);
    assert_eq!(
        m.get("pvrun_calls_total{function=wait,guest=bad,outcome=ok}"),
        4.0
    );
    // ...and back to min once it is.
    let m = s.wait_metric(
        "pvrun_pool_sandboxes{guest=bad}",
        1.0,
        Duration::from_secs(6),
    );
    assert_eq!(m.get("pvrun_pool_shrunk_total{guest=bad}"), 2.0);
    assert!(
        idle_since.elapsed() >= Duration::from_millis(1000),
        "shrunk {:?} after the load, before the idle time",
        idle_since.elapsed()
    );
    // Never below min, however long it stays idle.
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(s.metrics().get("pvrun_pool_sandboxes{guest=bad}"), 1.0);

    // It grows again, and a grown sandbox still stops a call at the guest's timeout.
    let again: Vec<_> = (0..2)
        .map(|_| s.call_in_background("/bad/wait", b"1500"))
        .collect();
    let m = s.wait_metric(
        "pvrun_pool_sandboxes{guest=bad}",
        2.0,
        Duration::from_millis(1400),
    );
    assert_eq!(m.get("pvrun_pool_grown_total{guest=bad}"), 3.0);
    for b in again {
        assert_eq!(b.join().unwrap().status, 200);
    }
    let m = s.metrics();
    assert_eq!(m.get("pvrun_pool_grow_failures_total{guest=bad}"), 0.0);
    assert_eq!(
        m.get("pvrun_calls_total{function=wait,guest=bad,outcome=ok}"),
        6.0
    );
}

#[test]
fn grown_sandboxes_stop_calls_at_the_timeout_and_recover() {
    let bad = format!("bad={},min=1,max=3,timeout=1", elf("badfunctions"));
    let s = Server::start(&["--guest", &bad], None);
    // Three spinning calls at once: two of them run in sandboxes the pool grew.
    let spins: Vec<_> = (0..3)
        .map(|_| s.call_in_background("/bad/spin", b""))
        .collect();
    for sp in spins {
        let r = sp.join().unwrap();
        assert_eq!((r.status, r.header("x-pvrun-outcome")), (504, "timeout"));
    }
    let m = s.metrics();
    assert_eq!(m.get("pvrun_pool_grown_total{guest=bad}"), 2.0);
    assert_eq!(
        m.get("pvrun_calls_total{function=spin,guest=bad,outcome=timeout}"),
        3.0
    );
    // Every sandbox is reset and serves again.
    let echoes: Vec<_> = (0..3)
        .map(|i| s.call_in_background("/bad/echo", format!("e{i}").as_bytes()))
        .collect();
    for (i, e) in echoes.into_iter().enumerate() {
        assert_eq!(e.join().unwrap().text(), format!("e{i}"));
    }
}

#[test]
fn calls_beyond_a_guests_concurrency_limit_get_429_and_other_guests_go_on() {
    let bad = format!("bad={},pool=1,concurrency=2", elf("badfunctions"));
    let fns = format!("fns={},pool=1", elf("functions"));
    let s = Server::start(&["--guest", &bad, "--guest", &fns], None);
    // Two calls fill the limit: one runs, one waits for the only sandbox.
    let held: Vec<_> = (0..2)
        .map(|_| s.call_in_background("/bad/wait", b"1500"))
        .collect();
    s.wait_metric(
        "pvrun_calls_in_flight{guest=bad}",
        2.0,
        Duration::from_secs(1),
    );
    let r = s.request("POST", "/bad/echo", b"one too many");
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("retry-after"), "1");
    assert_eq!(r.header("x-pvrun-outcome"), "limited");
    assert_eq!(
        r.text(),
        "too many calls: guest `bad` has its limit of 2 calls in flight; retry later\n"
    );
    // The other guest is not held up by this one's load.
    let t = Instant::now();
    let up = s.request("POST", "/fns/upper", b"free");
    assert_eq!((up.status, up.text().as_str()), (200, "FREE"));
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "{:?}",
        t.elapsed()
    );
    for h in held {
        assert_eq!(h.join().unwrap().status, 200);
    }
    // Below the limit again.
    assert_eq!(s.request("POST", "/bad/echo", b"ok").text(), "ok");
    let m = s.metrics();
    assert_eq!(
        m.get("pvrun_calls_total{function=echo,guest=bad,outcome=limited}"),
        1.0
    );
    assert_eq!(
        m.get("pvrun_calls_total{function=echo,guest=bad,outcome=ok}"),
        1.0
    );
    assert_eq!(
        m.get("pvrun_calls_total{function=wait,guest=bad,outcome=ok}"),
        2.0
    );
    assert_eq!(m.get("pvrun_calls_in_flight{guest=bad}"), 0.0);
    assert!(
        s.log()
            .iter()
            .any(|l| l.contains("POST /bad/echo: 429 limited")),
        "{:?}",
        s.log()
    );
}

#[test]
fn a_config_file_serves_elf_and_snapshot_guests() {
    let dir = TempDir::new("multi-config");
    let snap = dir.0.join("fns.snap");
    let out = Command::new(pvrun_bin())
        .args(["snapshot", "-o"])
        .arg(&snap)
        .arg(guest("functions"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = dir.0.join("guests.toml");
    std::fs::write(
        &config,
        format!(
            r#"# Two guests: one booted from its ELF, one from a snapshot file next to this one.
[[guest]]
name = "bad"
elf = "{}"
min = 1
max = 2
timeout = 5
concurrency = 3
env = {{ GREETING = "hi" }}

[[guest]]
name = "fns.snap"
snapshot = "fns.snap"
max = 1
"#,
            elf("badfunctions")
        ),
    )
    .unwrap();
    let s = Server::start(&["--config", config.to_str().unwrap()], None);
    assert_eq!(s.request("GET", "/", b"").text(), "bad\nfns.snap\n");
    assert_eq!(s.request("POST", "/fns.snap/upper", b"snap").text(), "SNAP");
    assert_eq!(s.request("POST", "/bad/echo", b"elf").text(), "elf");
    let m = s.metrics();
    assert_eq!(m.get("pvrun_snapshot_files_loaded_total"), 1.0);
    assert_eq!(m.get("pvrun_pool_max_sandboxes{guest=bad}"), 2.0);
    assert_eq!(m.get("pvrun_concurrency_limit{guest=bad}"), 3.0);
    assert_eq!(m.get("pvrun_concurrency_limit{guest=fns.snap}"), 4.0);
    assert_eq!(
        m.get("pvrun_calls_total{function=upper,guest=fns.snap,outcome=ok}"),
        1.0
    );
}

#[test]
fn nothing_is_ready_until_every_guest_is_built() {
    // The second guest's initialisation calls a host function that takes 2 s.
    let dir = TempDir::new("multi-slow");
    let config = dir.0.join("guests.toml");
    std::fs::write(
        &config,
        format!(
            "[[guest]]\nname = \"fns\"\nelf = \"{}\"\n\n[[guest]]\nname = \"slow\"\nelf = \"{}\"\nenv = {{ PVRUN_INIT_HOST_CALL = \"1\" }}\n",
            elf("functions"),
            elf("badfunctions")
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(pvrun_bin())
        .args(["serve", "--listen", &addr, "--config"])
        .arg(&config)
        .args(["--host-fn", "init-probe=sh -c 'sleep 2; printf probed'"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _kill = Kill(&mut child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "the port never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Live, not ready: calls to the guest that is already built wait for the other one.
    assert_eq!(request(&addr, "GET", "/healthz", b"").status, 200);
    let r = request(&addr, "GET", "/readyz", b"");
    assert_eq!((r.status, r.header("retry-after")), (503, "1"));
    let early = request(&addr, "POST", "/fns/upper", b"early");
    assert_eq!(
        (early.status, early.header("x-pvrun-outcome")),
        (503, "starting")
    );
    let started = Instant::now();
    while request(&addr, "GET", "/readyz", b"").status != 200 {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        started.elapsed() > Duration::from_millis(500),
        "ready too soon"
    );
    assert_eq!(request(&addr, "POST", "/fns/upper", b"late").text(), "LATE");
    assert_eq!(
        request(&addr, "POST", "/slow/init-host", b"").text(),
        "probed"
    );
}

/// Runs `pvrun serve --listen 127.0.0.1:0 ARGS`, which must fail at once.
fn serve_fails(args: &[&str]) -> (i32, String) {
    let out = Command::new(pvrun_bin())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().expect("pvrun was killed"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_config_files_and_guest_options_are_one_line_errors_with_status_125() {
    let dir = TempDir::new("multi-errors");
    let functions = elf("functions");
    let write = |name: &str, text: &str| -> String {
        let p = dir.0.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let ok_guest = format!("[[guest]]\nname = \"a\"\nelf = \"{functions}\"\n");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--config".into(),
                dir.0.join("missing.toml").display().to_string(),
            ],
            "cannot read the config file",
        ),
        (
            vec![
                "--config".into(),
                write("syntax.toml", "[[guest]\nname = 1\n"),
            ],
            "syntax.toml, line 1:",
        ),
        (
            vec![
                "--config".into(),
                write("unknown.toml", &format!("{ok_guest}maxx = 3\n")),
            ],
            "line 4: unknown field `maxx`",
        ),
        (
            vec![
                "--config".into(),
                write("dup.toml", &format!("{ok_guest}{ok_guest}")),
            ],
            "guest name `a` is given twice",
        ),
        (
            vec![
                "--config".into(),
                write("dup2.toml", &ok_guest),
                "--guest".into(),
                format!("a={functions}"),
            ],
            "guest name `a` is given twice",
        ),
        (
            vec![
                "--config".into(),
                write("name.toml", &ok_guest.replace("\"a\"", "\"a/b\"")),
            ],
            "guest name `a/b` may hold only",
        ),
        (
            vec!["--config".into(), write("empty.toml", "# nothing\n")],
            "names no guest",
        ),
        (
            vec![
                "--config".into(),
                write("type.toml", &format!("{ok_guest}max = \"lots\"\n")),
            ],
            "line 4: invalid type",
        ),
        (
            vec![
                "--config".into(),
                write("sizes.toml", &format!("{ok_guest}min = 3\nmax = 2\n")),
            ],
            "1 <= min <= max",
        ),
        (
            vec!["--guest".into(), format!("metrics={functions}")],
            "taken by the gateway",
        ),
        (
            vec!["--guest".into(), format!("a={functions},colour=blue")],
            "unknown key `colour`",
        ),
        (
            vec![
                "--guest".into(),
                format!("a={functions}"),
                "--guest".into(),
                format!("a={functions}"),
            ],
            "guest name `a` is given twice",
        ),
        (
            vec!["--guest".into(), "a=/no/such/guest".into()],
            "guest `a`:",
        ),
        // A guest that boots but is no function guest stops the server before it serves,
        // naming the guest.
        (
            vec![
                "--guest".into(),
                format!("fns={functions}"),
                "--guest".into(),
                format!("prog={}", elf("hello")),
            ],
            "guest `prog`: ",
        ),
    ];
    for (args, want) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, stderr) = serve_fails(&args);
        assert_eq!(status, 125, "{args:?}: {stderr}");
        // (Besides what a guest printed while it booted, as `guest NAME: ` lines.)
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.starts_with("guest "))
            .collect();
        assert_eq!(lines.len(), 1, "{args:?}: not one line: {stderr}");
        assert!(lines[0].starts_with("pvrun: error: "), "{args:?}: {stderr}");
        assert!(
            lines[0].contains(want),
            "{args:?}: want `{want}` in {stderr}"
        );
    }
    // A guest ELF with --guest is a clap usage error (125 too).
    let (status, stderr) = serve_fails(&["--guest", &format!("a={functions}"), &functions]);
    assert_eq!(status, 125, "{stderr}");
}

/// Every thread of process `pid` that is ours, with its `Seccomp:` mode.
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
fn every_thread_of_a_multi_guest_server_is_confined() {
    let bad = format!("bad={},min=1,max=3", elf("badfunctions"));
    let fns = format!("fns={},pool=2", elf("functions"));
    let s = Server::start(&["--guest", &bad, "--guest", &fns], None);
    // Grow `bad` (the grower creates VMs under its filter), then look.
    let busy: Vec<_> = (0..3)
        .map(|_| s.call_in_background("/bad/wait", b"800"))
        .collect();
    s.wait_metric(
        "pvrun_pool_sandboxes{guest=bad}",
        3.0,
        Duration::from_secs(1),
    );
    let seen = our_threads(s.pid());
    for b in busy {
        assert_eq!(b.join().unwrap().status, 200);
    }
    let count = |name: &str| seen.iter().filter(|(c, _)| c == name).count();
    // One call thread per sandbox a pool may have (3 + 2), the process's one watchdog
    // (shared by every sandbox, grown ones too), one grower for the elastic pool only.
    assert_eq!(count("pvrun-call"), 5, "{seen:?}");
    assert_eq!(count("pvrun-watchdog"), 1, "{seen:?}");
    assert_eq!(count("pvrun-grow"), 1, "{seen:?}");
    for (comm, mode) in &seen {
        assert_eq!(mode, "2", "thread {comm} is not confined: {seen:?}");
    }
    assert_eq!(s.request("POST", "/fns/upper", b"x").text(), "X");
}

#[test]
fn single_guest_form_is_unchanged() {
    // `pvrun serve GUEST`: `POST /FN`, `GET /` lists functions, no 429.
    let s = Server::start(&["--pool", "1", &elf("functions")], None);
    assert_eq!(s.request("POST", "/upper", b"one").text(), "ONE");
    assert!(
        s.request("GET", "/", b"")
            .text()
            .lines()
            .any(|l| l == "upper")
    );
    assert_eq!(s.request("POST", "/functions/upper", b"x").status, 404);
    let m = s.metrics();
    assert_eq!(m.get("pvrun_pool_sandboxes{guest=functions}"), 1.0);
    assert!(
        !m.samples
            .keys()
            .any(|k| k.starts_with("pvrun_concurrency_limit"))
    );
}
