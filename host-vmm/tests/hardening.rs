//! The host against guests that try to outlast, confuse or outwit it: signals while the
//! guest sleeps, state carried from one call into the next, output it cannot write,
//! text meant to forge reports. Every test boots real guests on /dev/kvm.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::guest;
use host_vmm::{CallError, Sandbox, SandboxConfig};

fn sandbox(name: &str) -> Sandbox {
    let config = SandboxConfig {
        host_functions: HashMap::new(),
        call_timeout: Some(Duration::from_secs(5)),
        console: Arc::new(Mutex::new(Box::new(std::io::sink()))),
        ..SandboxConfig::default()
    };
    Sandbox::new(&guest(name), config).expect("boot the function guest (needs /dev/kvm)")
}

/// Starts `pvrun misbehave MODE` and waits for its first stdout line.
fn started(mode: &str) -> (std::process::Child, String) {
    let mut child = Command::new(common::pvrun_bin())
        .args(["--timeout", "30"])
        .arg(guest("misbehave"))
        .args(["--", mode])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line)
}

fn wait_with_deadline(child: &mut std::process::Child, limit: Duration) -> Option<i32> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn sigterm_and_sigint_stop_a_guest_sleeping_in_wait() {
    for (sig, status) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let (mut child, line) = started("sleep-forever");
        assert_eq!(line, "sleeping\n");
        std::thread::sleep(Duration::from_millis(100));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let code = wait_with_deadline(&mut child, Duration::from_secs(3));
        assert_eq!(
            code,
            Some(status),
            "signal {sig} did not stop the sleeping guest"
        );
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(
            err.contains(&format!("interrupted by signal {sig}")),
            "{err}"
        );
    }
}

#[test]
fn a_wake_up_from_a_timed_out_call_does_not_reach_the_next_call() {
    let mut sb = sandbox("badfunctions");
    sb.set_call_timeout(Some(Duration::from_millis(300)));
    // A call that sleeps forever is stopped by its timeout (the stop wakes it)...
    assert!(matches!(sb.call("wait", b""), Err(CallError::Timeout(_))));
    // ...and so is one that spins.
    assert!(matches!(sb.call("spin", b""), Err(CallError::Timeout(_))));
    // The next call's sleep lasts as long as it asked.
    sb.set_call_timeout(Some(Duration::from_secs(5)));
    let out = String::from_utf8(sb.call("wait", b"200").unwrap()).unwrap();
    let ms: u64 = out.trim_start_matches("waited ").parse().unwrap();
    assert!(
        ms >= 195,
        "the call woke after {ms} ms: a stale wake-up reached it"
    );
}

#[test]
fn a_guest_message_cannot_forge_report_lines_or_drive_the_terminal() {
    let r = common::misbehave(&["panic-forge"]);
    assert_eq!(r.status, 101, "{}", r.stderr);
    let report: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("pvrun:"))
        .collect();
    assert_eq!(report.len(), 1, "one report line, got {report:?}");
    assert!(
        report[0].contains("boom\\npvrun: guest exited normally\\u{1b}[2J\\u{1b}[31m"),
        "{}",
        report[0]
    );
    assert!(!r.stderr.contains('\x1b'), "an escape reached the terminal");
}

#[test]
fn a_closed_stderr_does_not_turn_a_crash_into_a_host_panic() {
    for (mode, status) in [
        ("null-read", 139),
        ("panic", 101),
        ("print-then-crash", 139),
    ] {
        let out = Command::new(common::pvrun_bin())
            .args(["--timeout", "20"])
            .arg(guest("misbehave"))
            .args(["--", mode])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                // Close the read end at once: every write to stderr fails with EPIPE.
                drop(c.stderr.take());
                c.wait()
            })
            .unwrap();
        assert_eq!(out.code(), Some(status), "{mode}: {out:?}");
    }
}

#[test]
fn a_stdout_nobody_reads_does_not_defeat_the_timeout() {
    let mut child = Command::new(common::pvrun_bin())
        .args(["--timeout", "0.5"])
        .arg(guest("misbehave"))
        .args(["--", "print-forever"])
        // A pipe we never read: it fills after 64 KiB and every write then blocks.
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let code = wait_with_deadline(&mut child, Duration::from_secs(5));
    assert_eq!(code, Some(124), "the guest was not stopped at its timeout");
}

#[test]
fn every_call_and_every_copy_of_a_sandbox_gets_fresh_randomness() {
    let mut first = sandbox("badfunctions");
    let mut second = Sandbox::from_template(first.template()).unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut generations = std::collections::HashSet::new();
    for sb in [&mut first, &mut second] {
        for _ in 0..3 {
            let out = String::from_utf8(sb.call("random", b"").unwrap()).unwrap();
            let parts: Vec<&str> = out.split(' ').collect();
            assert_eq!(parts.len(), 3, "{out}");
            assert!(
                generations.insert(parts[0].to_string()),
                "generation repeated: {out}"
            );
            // Neither the CPU source nor the ChaCha20 fallback may repeat across resets
            // and copies.
            assert!(
                seen.insert(parts[1].to_string()),
                "random bytes repeated: {out}"
            );
            assert!(
                seen.insert(parts[2].to_string()),
                "keystream repeated: {out}"
            );
        }
    }
}

#[test]
fn every_thread_of_a_running_pvrun_is_confined() {
    let (mut child, line) = started("sleep-forever");
    assert_eq!(line, "sleeping\n");
    let mut seen = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{}/task", child.id())).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .map(str::trim)
            .unwrap_or("?")
            .to_string();
        seen.push((comm.trim().to_string(), mode));
    }
    let _ = child.kill();
    let _ = child.wait();
    // The vCPU (main) thread and the watchdog run under a filter (mode 2); kernel-side
    // KVM helper threads are not ours and are skipped.
    let ours: Vec<_> = seen
        .iter()
        .filter(|(c, _)| c == "pvrun" || c.starts_with("pvrun-"))
        .collect();
    assert!(ours.iter().any(|(c, _)| c == "pvrun"), "{seen:?}");
    assert!(ours.iter().any(|(c, _)| c == "pvrun-watchdog"), "{seen:?}");
    for (comm, mode) in ours {
        assert_eq!(mode, "2", "thread {comm} is not confined: {seen:?}");
    }
}

#[test]
fn a_library_configuration_cannot_make_the_host_panic() {
    use host_vmm::{DiskConfig, GuestImage, NetConfig, Vm, VmConfig};
    let image = Arc::new(GuestImage::from_file(&guest("hello")).unwrap());
    let net = |f: &dyn Fn(&mut NetConfig)| {
        let mut n = NetConfig::parse("eth0=tap:tap0").unwrap();
        f(&mut n);
        n
    };
    let bad: Vec<(VmConfig, &str)> = vec![
        (
            VmConfig {
                disks: vec![DiskConfig {
                    name: "d".repeat(100),
                    path: "/dev/null".into(),
                    read_only: true,
                }],
                ..VmConfig::default()
            },
            "device name",
        ),
        (
            VmConfig {
                nets: vec![net(&|n| n.name = "n".repeat(64))],
                ..VmConfig::default()
            },
            "device name",
        ),
        (
            VmConfig {
                nets: vec![net(&|n| n.tap = "t".repeat(40))],
                ..VmConfig::default()
            },
            "TAP name",
        ),
        (
            VmConfig {
                nets: vec![net(&|n| n.mtu = u32::MAX)],
                ..VmConfig::default()
            },
            "MTU",
        ),
        (
            VmConfig {
                nets: vec![net(&|n| n.ip = Some(([10, 0, 0, 2], 200)))],
                ..VmConfig::default()
            },
            "prefix",
        ),
    ];
    for (cfg, what) in bad {
        let e = Vm::new(image.clone(), cfg).err().expect("refused");
        assert!(e.to_string().contains(what), "{e}");
    }
}

/// A console sink that never returns from a write (a log pipe nobody reads).
struct Stalled;

impl std::io::Write for Stalled {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        std::thread::sleep(Duration::from_secs(3600));
        Ok(0)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_stalled_console_sink_never_delays_a_call_and_floods_are_dropped() {
    let config = SandboxConfig {
        call_timeout: Some(Duration::from_secs(5)),
        console: Arc::new(Mutex::new(Box::new(Stalled))),
        ..SandboxConfig::default()
    };
    let mut sb = Sandbox::new(&guest("badfunctions"), config).unwrap();
    let t = Instant::now();
    for _ in 0..3 {
        assert_eq!(sb.call("print", b"20000").unwrap(), b"printed 20000");
    }
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "calls waited for the console: {:?}",
        t.elapsed()
    );
    assert!(sb.template().console_dropped() > 0);
}

#[test]
fn a_tap_interface_that_does_not_exist_is_an_error_and_is_never_created() {
    let r = common::pvrun(&guest("hello"), &["--net", "eth0=tap:pvt-nosuch0"], &[]);
    assert_eq!(r.status, 125, "{}", r.stderr);
    assert!(
        r.stderr.contains("no such interface") && r.stderr.contains("ip tuntap add"),
        "{}",
        r.stderr
    );
    let exists = Command::new("ip")
        .args(["link", "show", "pvt-nosuch0"])
        .output()
        .expect("the `ip` command (iproute2) is needed")
        .status
        .success();
    assert!(!exists, "pvrun created the TAP interface");
}

/// This process's threads named `name`, each with its `Seccomp:` mode.
fn threads_named(name: &str) -> Vec<String> {
    let mut modes = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        modes.push(
            status
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .map(|m| m.trim().to_string())
                .unwrap_or_default(),
        );
    }
    modes
}

#[test]
fn the_console_writer_and_the_shell_thread_run_confined() {
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let out = Arc::new(Mutex::new(Vec::new()));
    let config = SandboxConfig {
        call_timeout: Some(Duration::from_secs(5)),
        console: Arc::new(Mutex::new(Box::new(Shared(out.clone())))),
        ..SandboxConfig::default()
    };
    let mut first = Sandbox::new(&guest("badfunctions"), config).unwrap();
    first.template().keep_shells_ready(2);
    // Both threads are confined by the time their constructors return.
    let console = threads_named("pvrun-console");
    let shells = threads_named("pvrun-shells");
    assert!(
        !console.is_empty() && !shells.is_empty(),
        "{console:?} {shells:?}"
    );
    for mode in console.iter().chain(&shells) {
        assert_eq!(mode, "2", "console {console:?}, shells {shells:?}");
    }
    // And they still do their jobs: shells are made (and used) under the filter, and
    // console output reaches the sink.
    let t = Instant::now();
    let mut made = Vec::new();
    for _ in 0..4 {
        let mut sb = Sandbox::from_template(first.template()).unwrap();
        assert_eq!(sb.call("echo", b"from a shell").unwrap(), b"from a shell");
        made.push(sb);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(t.elapsed() < Duration::from_secs(20));
    assert_eq!(first.call("print", b"2").unwrap(), b"printed 2");
    let t = Instant::now();
    while out.lock().unwrap().iter().filter(|&&b| b == b'\n').count() < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "no console output arrived"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn with_confine_init_the_guest_initialisation_runs_under_the_vcpu_filter() {
    // A host function the guest's initialisation calls, run on the thread that runs the
    // initialisation: it reports that thread's seccomp mode. Under the filter, opening a
    // file fails with EPERM (a report-only call), which proves the filter by itself.
    let probe: host_vmm::HostFn = Arc::new(|_: &[u8]| {
        Ok(match std::fs::read_to_string("/proc/thread-self/status") {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => b"filtered".to_vec(),
            Err(e) => format!("error {e}").into_bytes(),
            Ok(s) => s
                .lines()
                .find(|l| l.starts_with("Seccomp:"))
                .unwrap_or("none")
                .as_bytes()
                .to_vec(),
        })
    });
    for (confine, expect) in [(true, "filtered"), (false, "Seccomp:\t0")] {
        let config = SandboxConfig {
            host_functions: HashMap::from([("init-probe".to_string(), probe.clone())]),
            env: vec![("PVRUN_INIT_HOST_CALL".into(), "1".into())],
            console: Arc::new(Mutex::new(Box::new(std::io::sink()))),
            confine_init: confine,
            ..SandboxConfig::default()
        };
        let mut sb = Sandbox::new(&guest("badfunctions"), config).unwrap();
        let seen = String::from_utf8(sb.call("init-host", b"").unwrap()).unwrap();
        assert_eq!(seen, expect, "confine_init: {confine}");
        // The sandbox works as usual afterwards (calls on this, unconfined, thread).
        assert_eq!(sb.call("echo", b"after").unwrap(), b"after");
    }
}
