//! HTTP requests per second to `http-hello` in a pod, beside the same guest on a plain
//! TAP, from the same run: the pod path is what Kubernetes traffic takes (the node's end
//! of a CNI-like veth pair -> the pod's `eth0` -> the shim's tc redirect -> the TAP in the
//! pod's namespace -> the guest), the direct path is `pvrun --net eth0=tap:tap0` with the
//! client on the TAP's host side (host-vmm/benches/net.rs's setup). Load: `wrk -t2 -c50`
//! (keep-alive), `-d2s` without `--bench`, `-d10s` with it, 3 alternating runs per path; both guests get the default
//! memory (64 MiB). Needs root, /dev/kvm,
//! containerd, `ip`, `curl` and `wrk` (`apt-get install wrk`; not needed by CI, which
//! does not run benchmarks). Run with `cargo bench -p containerd-shim-pvrun --bench
//! pod_http`.

#[path = "../tests/support/mod.rs"]
mod support;

// The table and chart every benchmark prints and writes (host-vmm's benchmark support).
#[path = "../../host-vmm/benches/support/report.rs"]
mod report;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use report::{Bar, Report, Unit};
use support::{Containerd, RUNTIME, guest, shim_bin, text};

fn ip(args: &[&str]) {
    let o = Command::new("ip")
        .args(args)
        .output()
        .expect("`ip` is needed");
    assert!(o.status.success(), "ip {args:?}: {}", text(&o.stderr));
}

/// Network namespaces removed on drop.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn add(&mut self, name: String) -> String {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        self.0.push(name.clone());
        name
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A child killed and reaped on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_http(ns: &str, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = Command::new("ip")
            .args(["netns", "exec", ns, "curl", "-s", "-m", "2", url])
            .output()
            .expect("curl is needed");
        if o.status.success() && text(&o.stdout) == "Hello from pvrun!\n" {
            return;
        }
        assert!(Instant::now() < deadline, "{url} never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// wrk from namespace `ns` against `url`: requests per second.
fn wrk(ns: &str, url: &str, secs: u32) -> f64 {
    let o = Command::new("ip")
        .args(["netns", "exec", ns, "wrk", "-t2", "-c50"])
        .arg(format!("-d{secs}s"))
        .arg(url)
        .output()
        .expect("wrk is needed (apt-get install wrk)");
    let out = text(&o.stdout);
    assert!(o.status.success(), "wrk: {out}{}", text(&o.stderr));
    assert!(!out.contains("Non-2xx"), "wrk saw errors: {out}");
    out.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in: {out}"))
}

const ROUNDS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let secs = if std::env::args().any(|a| a == "--bench") {
        10
    } else {
        2
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("pod_http benchmark skipped: it needs root (namespaces, TAP, containerd)");
        return;
    }
    let id = std::process::id();
    let mut nss = Namespaces(Vec::new());
    let elf = guest("http-hello");

    // Direct: the guest on tap0 in a namespace, wrk on the TAP's host side.
    let direct_ns = nss.add(format!("pvb-direct-{id}"));
    ip(&["-n", &direct_ns, "tuntap", "add", "tap0", "mode", "tap"]);
    ip(&[
        "-n",
        &direct_ns,
        "addr",
        "add",
        "10.79.0.1/24",
        "dev",
        "tap0",
    ]);
    ip(&["-n", &direct_ns, "link", "set", "tap0", "up"]);
    // The shim's `run-guest` is `pvrun` (it boots after one byte on stdin).
    let mut g = Killed(
        Command::new("ip")
            .args(["netns", "exec", &direct_ns, shim_bin(), "run-guest"])
            .args([
                "--mem",
                "256M",
                "--net",
                "eth0=tap:tap0,ip=10.79.0.2/24,gw=10.79.0.1",
            ])
            .arg(&elf)
            .args(["--", "/http-hello"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    g.0.stdin.as_mut().unwrap().write_all(b"g").unwrap();
    wait_http(&direct_ns, "http://10.79.0.2/");

    // Pod: CNI-like veth pair, the guest run by containerd through the shim.
    let pod = nss.add(format!("pvb-pod-{id}"));
    let node = nss.add(format!("pvb-node-{id}"));
    ip(&[
        "-n", &node, "link", "add", "veth-pod", "type", "veth", "peer", "name", "eth0", "netns",
        &pod,
    ]);
    ip(&[
        "-n",
        &node,
        "addr",
        "add",
        "10.79.1.1/24",
        "dev",
        "veth-pod",
    ]);
    ip(&["-n", &node, "link", "set", "veth-pod", "up"]);
    ip(&["-n", &pod, "addr", "add", "10.79.1.2/24", "dev", "eth0"]);
    ip(&["-n", &pod, "link", "set", "eth0", "up"]);
    ip(&["-n", &pod, "route", "add", "default", "via", "10.79.1.1"]);
    let c = Containerd::start("podhttp");
    let image = c.import_guest(&elf, "http-hello");
    let fifo = c.dir.join("fifo");
    let with_ns = format!("network:/var/run/netns/{pod}");
    c.ids.lock().unwrap().push("web".into());
    let web = Killed(
        c.ctr_cmd(&[
            "run",
            "--runtime",
            RUNTIME,
            "--rm",
            "--fifo-dir",
            fifo.to_str().unwrap(),
            "--with-ns",
            &with_ns,
            &image,
            "web",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    wait_http(&node, "http://10.79.1.2/");
    // Both guests up; alternate the two paths and take medians (the machine is shared).
    let (mut d, mut p) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        d.push(wrk(&direct_ns, "http://10.79.0.2/", secs));
        p.push(wrk(&node, "http://10.79.1.2/", secs));
    }
    let (direct, via_pod) = (median(d), median(p));
    drop(g);
    let _ = c.ctr(&["tasks", "kill", "-s", "SIGTERM", "web"]);
    drop(web);

    let mut r = Report::with_columns(
        "pod_http",
        format!(
            "http-hello, wrk -t2 -c50 -d{secs}s keep-alive, GET /: medians of {ROUNDS} alternating runs per path (same run; higher is better)"
        ),
        &["path", "requests/s", "direct TAP", "ratio"],
    );
    r.row(
        vec![
            "direct TAP (`pvrun --net eth0=tap:tap0`, client on the TAP's host side)".into(),
            format!("{direct:.0}"),
            "-".into(),
            "1.00x".into(),
        ],
        Vec::new(),
    );
    let label = "pod: node veth -> pod eth0 -> tc redirect -> TAP (containerd + pvrun shim)";
    r.row(
        vec![
            label.into(),
            format!("{via_pod:.0}"),
            format!("{direct:.0}"),
            format!("{:.2}x", via_pod / direct),
        ],
        vec![Bar::vs(
            label,
            Unit::Rate("requests/s"),
            via_pod,
            "direct TAP",
            direct,
        )],
    );
    r.finish();
}
