//! `GET /metrics` of `pvrun serve`: the output parses as the Prometheus/OpenMetrics text
//! format (a strict line parser: every line a comment of a known kind or a well-formed
//! sample, `# EOF` last) and its counters match the calls made.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::prom::{Metrics, buckets, parse};
use common::{guest, pvrun_bin};

struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(args: &[&str], source: &[PathBuf]) -> Server {
        let mut child = Command::new(pvrun_bin())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .args(source)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pvrun serve");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut addr = String::new();
        let mut seen = Vec::new();
        while addr.is_empty() && Instant::now() < deadline {
            match lines.next() {
                Some(Ok(l)) => {
                    if let Some(rest) = l.split("http://").nth(1) {
                        addr = rest.split('/').next().unwrap().to_string();
                    }
                    seen.push(l);
                }
                _ => break,
            }
        }
        std::thread::spawn(move || for _ in lines.by_ref() {});
        let s = Server { child, addr };
        assert!(
            !s.addr.is_empty(),
            "pvrun serve did not get ready: {seen:?}"
        );
        s
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> (u16, HashMap<String, String>, Vec<u8>) {
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
        let split = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&resp[..split]).into_owned();
        let status = head[9..12].parse().unwrap();
        let headers = head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        (status, headers, resp[split + 4..].to_vec())
    }

    fn metrics(&self) -> Metrics {
        let (status, headers, body) = self.request("GET", "/metrics", b"");
        assert_eq!(status, 200);
        assert!(
            headers["content-type"].starts_with("application/openmetrics-text"),
            "{headers:?}"
        );
        parse(&String::from_utf8(body).expect("metrics are UTF-8"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn metrics_parse_and_count_the_calls_made() {
    let s = Server::start(&["--pool", "2"], &[guest("functions")]);
    let before = s.metrics();
    assert_eq!(before.get("pvrun_pool_sandboxes{guest=functions}"), 2.0);
    assert_eq!(before.get("pvrun_sandbox_creations_total{source=elf}"), 1.0);
    assert_eq!(
        before.get("pvrun_sandbox_creations_total{source=snapshot}"),
        1.0
    );
    assert_eq!(before.get("pvrun_resets_total{guest=functions}"), 0.0);

    for i in 0..5 {
        let (st, _, body) = s.request("POST", "/upper", format!("call {i}").as_bytes());
        assert_eq!((st, body), (200, format!("CALL {i}").into_bytes()));
    }
    for _ in 0..2 {
        assert_eq!(s.request("POST", "/json-transform", b"{nope").0, 422);
    }
    assert_eq!(s.request("POST", "/no-such-function", b"").0, 404);
    assert_eq!(s.request("POST", "/%1b%5b31m", b"").0, 404);

    let m = s.metrics();
    assert_eq!(m.types["pvrun_calls"], "counter");
    assert_eq!(m.types["pvrun_call_duration_seconds"], "histogram");
    assert_eq!(m.types["pvrun_pool_sandboxes"], "gauge");
    assert_eq!(
        m.get("pvrun_calls_total{function=upper,guest=functions,outcome=ok}"),
        5.0
    );
    assert_eq!(
        m.get("pvrun_calls_total{function=json-transform,guest=functions,outcome=failed}"),
        2.0
    );
    // Unknown names share one label value: a client cannot add series.
    assert_eq!(
        m.get("pvrun_calls_total{function=-,guest=functions,outcome=unknown}"),
        2.0
    );
    let calls = m.sum("pvrun_calls_total");
    assert_eq!(calls, 9.0);
    assert_eq!(
        m.get("pvrun_call_duration_seconds_count{function=upper,guest=functions}"),
        5.0
    );
    let sum = m.get("pvrun_call_duration_seconds_sum{function=upper,guest=functions}");
    assert!(sum > 0.0 && sum < 50.0, "latency sum {sum}");
    let b = buckets(
        &m,
        "pvrun_call_duration_seconds",
        "function=upper,guest=functions",
    );
    assert!(b.len() > 5, "{b:?}");
    assert!(
        b.windows(2).all(|w| w[0].1 <= w[1].1),
        "buckets must be cumulative: {b:?}"
    );
    assert_eq!(b.last().unwrap(), &(f64::INFINITY, 5.0));
    // Every call that ran was followed by a reset that copied pages back.
    assert_eq!(m.get("pvrun_resets_total{guest=functions}"), 7.0);
    assert_eq!(m.get("pvrun_reset_dirty_pages_count{guest=functions}"), 7.0);
    assert!(m.get("pvrun_reset_dirty_pages_sum{guest=functions}") >= 7.0);
    assert_eq!(m.get("pvrun_pool_busy_sandboxes{guest=functions}"), 0.0);
    // Each call that ran ended with an FN_RETURN hypercall exit; none crashed.
    assert!(m.get("pvrun_vm_exits_total{guest=functions,kind=hypercall}") >= 7.0);
    assert_eq!(
        m.get("pvrun_vm_exits_total{guest=functions,kind=exception}"),
        0.0
    );
    assert_eq!(m.get("pvrun_sandbox_creations_total{source=elf}"), 1.0);
}

#[test]
fn metrics_of_a_server_started_from_a_snapshot_file() {
    let dir = std::env::temp_dir().join(format!("pvrun-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let file = dir.join("functions.snap");
    let out = Command::new(pvrun_bin())
        .args(["snapshot", "-o"])
        .arg(&file)
        .arg(guest("functions"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = Server::start(&["--pool", "3", "--snapshot"], &[file]);
    assert_eq!(s.request("POST", "/upper", b"x").0, 200);
    let m = s.metrics();
    assert_eq!(m.get("pvrun_snapshot_files_loaded_total"), 1.0);
    assert_eq!(m.get("pvrun_sandbox_creations_total{source=elf}"), 0.0);
    // The first sandbox uses the VM the file's registers were checked in.
    assert_eq!(m.get("pvrun_sandbox_creations_total{source=shell}"), 1.0);
    assert_eq!(m.get("pvrun_sandbox_creations_total{source=snapshot}"), 2.0);
    assert_eq!(
        m.get("pvrun_calls_total{function=upper,guest=functions,outcome=ok}"),
        1.0
    );
    assert_eq!(m.get("pvrun_pool_sandboxes{guest=functions}"), 3.0);
}
