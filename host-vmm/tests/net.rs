//! Networking over TAP devices in a network namespace each test creates and removes:
//! curl gets a page, ping answers, a 10 MB TCP echo comes back byte-identical, 50
//! concurrent connections complete, two guests talk over a bridge, and a guest sending
//! garbage frames disturbs neither the host nor the other guest.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Netns, NsGuest, guest};

/// Starts guest `name` in `ns` with the network option `net` and arguments `args`.
fn start(ns: &Netns, name: &str, net: &str, args: &[&str]) -> NsGuest {
    NsGuest::start(ns, name, &["--timeout", "120", "--net", net], args)
}

#[test]
fn curl_gets_the_page_and_ping_answers() {
    let ns = Netns::new("http");
    ns.tap("tap0", "10.77.1.1/24");
    let g = start(
        &ns,
        "http-hello",
        "eth0=tap:tap0,ip=10.77.1.2/24,gw=10.77.1.1",
        &[],
    );
    g.wait_for("listening on");
    let out = ns
        .command("curl")
        .args(["-s", "-m", "10", "http://10.77.1.2/"])
        .output()
        .expect("curl is needed");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Hello from pvrun!\n");
    let out = ns
        .command("curl")
        .args([
            "-s",
            "-m",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://10.77.1.2/nope",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    let ping = ns
        .command("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "2", "10.77.1.2"])
        .output()
        .expect("ping (iputils-ping) is needed");
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );
}

#[test]
fn a_ten_megabyte_tcp_echo_comes_back_identical() {
    let ns = Netns::new("echo");
    ns.tap("tap0", "10.77.2.1/24");
    let g = start(&ns, "echo", "eth0=tap:tap0,ip=10.77.2.2/24", &[]);
    g.wait_for("echo listening");
    let data: Vec<u8> = (0..10_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    let back = ns.run_in(move || {
        let s = TcpStream::connect("10.77.2.2:7").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut w = s.try_clone().unwrap();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            w.write_all(&sent).unwrap();
            w.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        let mut r = s;
        r.read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        (back == data, back.len())
    });
    assert!(back.0, "echo differed (got {} bytes)", back.1);
}

#[test]
fn fifty_concurrent_connections_all_complete() {
    let ns = Netns::new("conc");
    ns.tap("tap0", "10.77.3.1/24");
    let g = start(&ns, "http-hello", "eth0=tap:tap0,ip=10.77.3.2/24", &[]);
    g.wait_for("listening on");
    let ok = ns.run_in(|| {
        let clients: Vec<_> = (0..50)
            .map(|_| {
                std::thread::spawn(|| {
                    let mut s = TcpStream::connect("10.77.3.2:80").unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    let mut n = 0;
                    for _ in 0..5 {
                        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
                        let mut buf = [0u8; 512];
                        let mut got = Vec::new();
                        while !got.ends_with(b"Hello from pvrun!\n") {
                            let k = s.read(&mut buf).unwrap();
                            assert!(k > 0, "connection closed early");
                            got.extend_from_slice(&buf[..k]);
                        }
                        assert!(got.starts_with(b"HTTP/1.1 200"));
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        clients.into_iter().map(|c| c.join().unwrap()).sum::<u32>()
    });
    assert_eq!(ok, 250);
}

/// Runs a guest to completion inside the namespace; returns (status, stdout).
fn run_to_end(ns: &Netns, name: &str, net: &str, args: &[&str]) -> (i32, String) {
    let out = ns
        .command(common::pvrun_bin())
        .args(["--timeout", "60", "--net", net])
        .arg(guest(name))
        .arg("--")
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), format!("{stdout}{stderr}"))
}

#[test]
fn two_guests_talk_over_a_bridge_and_garbage_frames_hurt_nobody() {
    let ns = Netns::new("bridge");
    for t in ["tap0", "tap1", "tap2"] {
        ns.tap(t, "");
    }
    ns.bridge("br0", "10.77.4.1/24", &["tap0", "tap1", "tap2"]);
    let sink = start(
        &ns,
        "echo",
        "eth0=tap:tap0,ip=10.77.4.2/24",
        &["sink", "9000"],
    );
    sink.wait_for("sink listening");
    let web = start(&ns, "http-hello", "eth0=tap:tap2,ip=10.77.4.4/24", &[]);
    web.wait_for("listening on");

    // Guest to guest over the bridge: 4 MB from the source guest into the sink guest.
    let (code, out) = run_to_end(
        &ns,
        "echo",
        "eth0=tap:tap1,ip=10.77.4.3/24",
        &["source", "10.77.4.2:9000", "4"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("source: sent 4000000 bytes"), "{out}");
    assert!(sink.wait_for("sink: ").contains("sink: 4000000 bytes"));

    // A guest on the same bridge sends garbage frames for a second.
    let (code, out) = run_to_end(
        &ns,
        "misbehave",
        "eth0=tap:tap1,ip=10.77.4.3/24",
        &["net-garbage"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("garbage done sent="), "{out}");

    // Nobody else noticed: the web guest serves, the sink takes another transfer.
    let page = ns
        .command("curl")
        .args(["-s", "-m", "10", "http://10.77.4.4/"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&page.stdout), "Hello from pvrun!\n");
    let (code, out) = run_to_end(
        &ns,
        "echo",
        "eth0=tap:tap1,ip=10.77.4.3/24",
        &["source", "10.77.4.2:9000", "1"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(sink.wait_for("sink: ").contains("sink: 1000000 bytes"));
}

#[test]
fn network_setup_problems_are_one_clear_line() {
    // `lo` exists but is no TAP device (nothing is sent anywhere: the open fails).
    let r = common::pvrun(&guest("http-hello"), &["--net", "eth0=tap:lo"], &[]);
    assert_eq!(r.status, 125, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("TAP `lo`): it exists but is not a TAP device"),
        "{}",
        r.stderr
    );
    // A guest that declares its NIC does not boot without one.
    let r = common::pvrun(&guest("http-hello"), &[], &[]);
    assert_eq!(r.status, 125, "{}", r.stderr);
    assert!(
        r.stderr.contains("needs a network device named `eth0`")
            && r.stderr.contains("--net eth0="),
        "{}",
        r.stderr
    );
}

/// Runs `misbehave net-garbage` in an in-process VM in `ns` with NIC option `net`; returns
/// the NIC's counters.
fn garbage_in_process(ns: &Netns, net: &'static str) -> host_vmm::DeviceCounters {
    let elf = guest("misbehave");
    let out = ns.run_in(move || {
        let image = std::sync::Arc::new(host_vmm::GuestImage::from_file(&elf).unwrap());
        let cfg = host_vmm::VmConfig {
            args: vec!["misbehave".into(), "net-garbage".into()],
            stdout: Box::new(std::io::sink()),
            nets: vec![host_vmm::NetConfig::parse(net).unwrap()],
            ..host_vmm::VmConfig::default()
        };
        let mut vm = host_vmm::Vm::new(image, cfg).unwrap();
        let outcome = vm.run().unwrap();
        let counters = vm.device_counters();
        drop(vm);
        (outcome, counters)
    });
    assert_eq!(out.0, host_vmm::Outcome::Exited(0));
    let (name, c) = &out.1[0];
    assert_eq!(name, "eth0");
    *c
}

#[test]
fn an_in_process_vm_with_a_nic_stops_its_confined_io_thread_cleanly() {
    // The NIC's I/O thread runs under a seccomp filter; a system call it may not make
    // (say, closing the TAP device on its way out) would kill this whole test process.
    let ns = Netns::new("inproc");
    ns.tap("tap0", "10.77.5.1/24");
    // The garbage frames were refused and counted, not sent: the random ones too, as
    // their source MAC addresses are not the NIC's.
    let c = garbage_in_process(&ns, "eth0=tap:tap0,ip=10.77.5.2/24");
    assert!(c.dropped > 1000 && c.dropped == c.requests, "{c:?}");
    // With spoofing allowed, the random frames of a valid length go out.
    let c = garbage_in_process(&ns, "eth0=tap:tap0,ip=10.77.5.2/24,mac-spoof=allow");
    assert!(c.dropped > 1000 && c.dropped < c.requests, "{c:?}");
}

/// CPU time (user + system, in clock ticks) of thread `comm` of process `pid`.
fn thread_cpu_ticks(pid: u32, comm: &str) -> Option<u64> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let dir = task.ok()?.path();
        if std::fs::read_to_string(dir.join("comm")).ok()?.trim_end() != comm {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let utime: u64 = rest.get(11)?.parse().ok()?;
        let stime: u64 = rest.get(12)?.parse().ok()?;
        return Some(utime + stime);
    }
    None
}

#[test]
fn a_tap_that_disappears_is_reported_once_and_its_thread_goes_idle() {
    use std::io::BufRead;
    use std::process::Stdio;
    let ns = Netns::new("gone");
    ns.tap("tap0", "10.77.6.1/24");
    let mut child = ns
        .command(common::pvrun_bin())
        .args(["--timeout", "60", "--net", "eth0=tap:tap0,ip=10.77.6.2/24"])
        .arg(guest("http-hello"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `ip netns exec` execs pvrun itself: the child is the VM process.
    let pid = child.id();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("listening on") {
        line.clear();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "the guest ended");
    }
    let ping = ns
        .command("ping")
        .args(["-c", "1", "-W", "5", "10.77.6.2"])
        .output()
        .unwrap();
    assert!(ping.status.success(), "the NIC never worked");

    let del = ns
        .command("ip")
        .args(["link", "del", "tap0"])
        .output()
        .unwrap();
    assert!(
        del.status.success(),
        "{}",
        String::from_utf8_lossy(&del.stderr)
    );
    std::thread::sleep(Duration::from_millis(300));
    let before = thread_cpu_ticks(pid, "pvrun-net-eth0").expect("no NIC thread");
    std::thread::sleep(Duration::from_secs(1));
    let after = thread_cpu_ticks(pid, "pvrun-net-eth0").expect("the NIC thread ended");
    assert!(
        child.try_wait().unwrap().is_none(),
        "the guest stopped when its TAP went away"
    );
    let _ = child.kill();
    let _ = child.wait();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    // A busy loop would use about 100 ticks (1 s) here.
    assert!(
        after - before < 15,
        "the NIC thread used {} ticks in a second; stderr: {stderr}",
        after - before
    );
    assert_eq!(
        stderr
            .matches("pvrun: device `eth0`: TAP `tap0` is gone (")
            .count(),
        1,
        "{stderr}"
    );
}
