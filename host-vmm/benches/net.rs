//! Network benchmark, in a network namespace with a TAP device it creates and removes:
//! ping RTT, TCP throughput in both directions, and HTTP requests per second with wrk
//! against `http-hello`, beside the raw KVM exit floor from the same run.
//! Needs root (namespaces, TAP), `ip`, `ping` and `wrk` (`apt-get install iproute2
//! iputils-ping wrk`). Run with `cargo bench -p host-vmm --bench net`.

mod support;

use support::{Bar, Netns, NsGuest, Report, Unit, exit_floor, guest};

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

/// Starts a guest in the namespace and waits until it prints `ready`.
fn start(ns: &Netns, name: &str, net: &str, args: &[&str], ready: &str) -> NsGuest {
    let g = NsGuest::start(ns, name, &["--mem", "256M", "--net", net], args);
    g.wait_for(ready);
    g
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("net benchmark skipped: it needs root for network namespaces and TAP devices");
        return;
    }
    let floor = exit_floor();
    let ns = Netns::new("bench");
    ns.tap("tap0", "10.78.0.1/24");
    let net = "eth0=tap:tap0,ip=10.78.0.2/24,gw=10.78.0.1";

    // Ping RTT: median of the per-packet times.
    let web = start(&ns, "http-hello", net, &[], "listening on");
    let count = if quick { "20" } else { "200" };
    let out = ns
        .command("ping")
        .args(["-c", count, "-i", "0.005", "-W", "2", "10.78.0.2"])
        .output()
        .expect("ping (iputils-ping) is needed");
    let mut rtts: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split(' ').next()?.parse().ok())
        .collect();
    rtts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let ping_us = rtts.get(rtts.len() / 2).copied().unwrap_or(f64::NAN) * 1000.0;

    // HTTP requests per second with wrk (50 connections, keep-alive).
    let secs = if quick { "2" } else { "10" };
    let wrk = ns
        .command("wrk")
        .args(["-t2", "-c50", &format!("-d{secs}s"), "http://10.78.0.2/"])
        .output();
    let rps: f64 = match &wrk {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(f64::NAN),
        Err(_) => f64::NAN,
    };
    drop(web);

    // TCP host -> guest: send to the sink guest until it has everything.
    let mb: usize = if quick { 50 } else { 500 };
    let _sink = start(&ns, "echo", net, &["sink", "5001"], "sink listening");
    let to_guest = ns.run_in(move || {
        let chunk = vec![0x5au8; 1 << 20];
        let t = Instant::now();
        let mut s = TcpStream::connect("10.78.0.2:5001").unwrap();
        for _ in 0..mb {
            s.write_all(&chunk).unwrap();
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest); // the sink closes once it has read everything
        (mb << 20) as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e9
    });
    drop(_sink);

    // TCP guest -> host: the source guest sends to a listener in the namespace.
    let from_guest = ns.run_in(move || {
        let l = TcpListener::bind("10.78.0.1:5002").unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let t = Instant::now();
            let mut total = 0usize;
            loop {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                total += n;
            }
            total as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e9
        })
    });
    let src = ns
        .command(env!("CARGO_BIN_EXE_pvrun"))
        .args(["--mem", "256M", "--net", net])
        .arg(guest("echo"))
        .args([
            "--",
            "source",
            "10.78.0.1:5002",
            &(mb as u64 * 1_048_576 / 1_000_000).to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        src.status.success(),
        "{}",
        String::from_utf8_lossy(&src.stderr)
    );
    let from_guest = from_guest.join().unwrap();

    let floor_us = floor.as_nanos() as f64 / 1e3;
    let mut r = Report::with_columns(
        "net",
        format!(
            "pvrun network benchmark (TAP in a network namespace; raw KVM exit floor {floor_us:.1} µs in this run)"
        ),
        &["measurement", "result", "floor", "target"],
    );
    let label = format!("ping RTT (median of {count})");
    r.row(
        vec![
            label.clone(),
            format!("{ping_us:.0} µs"),
            format!("{floor_us:.1} µs"),
            "<= 150 µs".into(),
        ],
        vec![
            Bar::vs(
                &label,
                Unit::Seconds,
                ping_us / 1e6,
                "raw KVM exit floor",
                floor.as_secs_f64(),
            )
            .target("<= 150 µs"),
        ],
    );
    for (label, gbits) in [
        (format!("TCP host -> guest ({mb} MiB)"), to_guest),
        (format!("TCP guest -> host ({mb} MiB)"), from_guest),
    ] {
        r.row(
            vec![
                label.clone(),
                format!("{gbits:.2} Gbit/s"),
                String::new(),
                ">= 1 Gbit/s".into(),
            ],
            vec![Bar::alone(&label, Unit::Rate("Gbit/s"), gbits).target(">= 1 Gbit/s")],
        );
    }
    let label = "HTTP `GET /` with wrk, 50 connections, keep-alive";
    r.row(
        vec![
            label.into(),
            format!("{rps:.0} requests/s"),
            String::new(),
            ">= 10,000/s".into(),
        ],
        vec![Bar::alone(label, Unit::Rate("requests/s"), rps).target(">= 10,000/s")],
    );
    r.finish();
}
