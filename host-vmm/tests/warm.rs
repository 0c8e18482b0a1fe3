//! Exitless warm calls (`WarmSandbox`, ABI v4 mailbox): the same outputs as exit-based
//! keep-state calls over long mixed runs, calls that really take no exit, an idle sandbox
//! that stops spinning, and guests that break the mailbox protocol.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::guest;
use host_vmm::{CallError, HostFn, Sandbox, SandboxConfig, WarmOptions, WarmSandbox};

fn config() -> SandboxConfig {
    let lookup: HostFn = Arc::new(|input: &[u8]| Ok([b"dear ".as_slice(), input].concat()));
    SandboxConfig {
        host_functions: HashMap::from([("lookup".to_string(), lookup)]),
        call_timeout: Some(Duration::from_secs(10)),
        console: Arc::new(Mutex::new(Box::new(std::io::sink()))),
        ..SandboxConfig::default()
    }
}

fn sandbox(name: &str) -> Sandbox {
    Sandbox::new(&guest(name), config()).expect("boot the function guest (needs /dev/kvm)")
}

fn warm(name: &str, options: WarmOptions) -> WarmSandbox {
    sandbox(name)
        .into_warm(options)
        .expect("start the warm sandbox")
}

/// A small deterministic PRNG (xorshift64*), so a failing run can be repeated.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A call's result in a comparable form.
fn shown(r: Result<Vec<u8>, CallError>) -> Result<Vec<u8>, String> {
    r.map_err(|e| e.to_string())
}

/// Runs `n` mixed calls from `pick` in an exit-based keep-state sandbox and in a warm one
/// of the same guest, and checks that every result is the same. The calls are drawn first,
/// so the warm run goes back to back; after about one in `pause_every` calls it waits longer
/// than the guest's spin budget, so the guest goes to sleep and the next call wakes it.
fn same_outputs(
    name: &str,
    n: usize,
    pause_every: u64,
    mut pick: impl FnMut(&mut Rng) -> (&'static str, Vec<u8>),
) -> host_vmm::WarmStats {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let calls: Vec<(&str, Vec<u8>, bool)> = (0..n)
        .map(|_| {
            let (f, input) = pick(&mut rng);
            (f, input, rng.below(pause_every) == 0)
        })
        .collect();
    let mut exit_based = sandbox(name);
    let want: Vec<_> = calls
        .iter()
        .map(|(f, input, _)| shown(exit_based.call_keep_state(f, input)))
        .collect();
    drop(exit_based);
    let mut warm = warm(name, WarmOptions::default());
    let mut got = Vec::with_capacity(n);
    for (f, input, pause) in &calls {
        got.push(shown(warm.call(f, input)));
        if *pause {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    for (i, ((want, got), (f, input, _))) in want.iter().zip(&got).zip(&calls).enumerate() {
        assert_eq!(
            got,
            want,
            "call {i}: {f} with {} input bytes differs",
            input.len()
        );
    }
    assert!(
        want.iter().any(|r| r.is_err()),
        "the run should include failing calls"
    );
    let stats = warm.stats();
    assert_eq!(stats.calls, n as u64);
    assert!(warm.stopped().is_none());
    stats
}

#[test]
fn exitless_calls_give_the_same_outputs_as_exit_based_ones_over_a_long_mixed_run() {
    // badfunctions keeps state: `counter` counts every call since the sandbox was made,
    // `touch-pages` writes pages, and the bad decimals are errors.
    let stats = same_outputs("badfunctions", 3000, 40, |rng| match rng.below(6) {
        0 | 1 => ("counter", Vec::new()),
        2 => {
            let len = match rng.below(4) {
                0 => 0,
                1 => rng.below(64) as usize,
                2 => rng.below(4096) as usize,
                _ => rng.below(60_000) as usize,
            };
            ("echo", rng.bytes(len))
        }
        3 => ("touch-pages", format!("{}", rng.below(300)).into_bytes()),
        4 => ("big-output", format!("{}", rng.below(100_000)).into_bytes()),
        _ => ("init-state", Vec::new()),
    });
    eprintln!("{stats:?}");
    // The pauses made the guest sleep, and the next call woke it.
    assert!(stats.guest_wakeups > 10, "{stats:?}");
}

#[test]
fn back_to_back_warm_calls_take_no_vm_exit() {
    // Spin budgets long enough that no preemption on a busy machine makes either side
    // sleep: then no call may exit (no WAIT, no FN_NOTIFY). (With a zero budget every
    // call does: see below.)
    let mut sb = sandbox("badfunctions");
    sb.call_keep_state("counter", b"").unwrap();
    let mut w = sb
        .into_warm(WarmOptions {
            guest_spin: Duration::from_secs(1),
            host_spin: Duration::from_secs(1),
            ..WarmOptions::default()
        })
        .unwrap();
    for i in 2..=500u32 {
        assert_eq!(w.call("counter", b"").unwrap(), i.to_string().as_bytes());
    }
    let s = w.stats();
    assert_eq!(s.calls, 499);
    assert_eq!(
        (s.guest_waits, s.notifies, s.host_sleeps),
        (0, 0, 0),
        "{s:?}"
    );
}

#[test]
fn exitless_calls_of_realistic_functions_match_including_host_calls() {
    let stats = same_outputs("functions", 1500, 30, |rng| match rng.below(7) {
        0 => {
            let n = rng.below(2000) as usize;
            ("upper", rng.bytes(n))
        }
        1 => {
            let n = rng.below(10_000) as usize;
            ("sha256", rng.bytes(n))
        }
        2 => (
            "json-transform",
            format!(
                r#"{{"n":{},"s":["a","b{}"]}}"#,
                rng.below(1000),
                rng.below(9)
            )
            .into_bytes(),
        ),
        3 => ("json-transform", b"{not json".to_vec()),
        4 => ("compress", vec![b'a'; rng.below(20_000) as usize]),
        5 => ("decompress", b"not zlib".to_vec()),
        _ => ("greet-via-host", b"Ada".to_vec()),
    });
    eprintln!("{stats:?}");
    assert!(stats.guest_wakeups > 10, "{stats:?}");
}

/// The CPU time (user + system) of thread `tid` of this process, in clock ticks.
fn cpu_ticks(tid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
        .expect("the vCPU thread's stat");
    // Fields after the command name (which is in parentheses): state is field 3, utime
    // field 14, stime field 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as u64 }
}

#[test]
fn an_idle_warm_sandbox_stops_spinning_after_its_budget() {
    let hz = ticks_per_second();
    let mut sb = warm(
        "badfunctions",
        WarmOptions {
            guest_spin: Duration::from_millis(800),
            ..WarmOptions::default()
        },
    );
    let tid = sb.vcpu_thread_id();
    // Two calls back to back: the second arrives while the guest spins, so it spins its
    // full budget after it.
    assert_eq!(sb.call("counter", b"").unwrap(), b"1");
    assert_eq!(sb.call("counter", b"").unwrap(), b"2");
    let t0 = Instant::now();
    let c0 = cpu_ticks(tid);
    std::thread::sleep(Duration::from_millis(500));
    let spinning = cpu_ticks(tid) - c0;
    // It spins: a good part of those 500 ms went to the guest (a busy machine gives the
    // thread less than all of it).
    assert!(
        spinning * 1000 >= 100 * hz,
        "the guest should spin after a call: {spinning} ticks in 500 ms"
    );
    // After its budget it sleeps in WAIT: no CPU at all.
    std::thread::sleep(Duration::from_millis(1000).saturating_sub(t0.elapsed()));
    let c1 = cpu_ticks(tid);
    std::thread::sleep(Duration::from_millis(1500));
    let idle = cpu_ticks(tid) - c1;
    assert!(
        idle * 1000 <= 20 * hz,
        "an idle warm sandbox used {idle} ticks in 1.5 s"
    );
    let waits = sb.stats().guest_waits;
    assert!(waits >= 1, "the guest should be asleep in WAIT");
    // And it still answers, and was woken for it.
    assert_eq!(sb.call("counter", b"").unwrap(), b"3");
    assert_eq!(sb.stats().guest_wakeups, 1, "{:?}", sb.stats());
}

#[test]
fn a_zero_spin_budget_sleeps_at_once_and_still_answers() {
    let mut sb = warm(
        "badfunctions",
        WarmOptions {
            guest_spin: Duration::ZERO,
            ..WarmOptions::default()
        },
    );
    for i in 1..=50u32 {
        assert_eq!(sb.call("counter", b"").unwrap(), i.to_string().as_bytes());
    }
    let s = sb.stats();
    assert!(s.guest_waits >= 45, "{s:?}");
}

#[test]
fn a_slow_call_wakes_the_sleeping_caller() {
    // `wait` sleeps 20 ms in the guest: the caller's spin runs out, it sleeps, and the
    // guest's FN_NOTIFY wakes it.
    let mut sb = warm("badfunctions", WarmOptions::default());
    let t = Instant::now();
    let out = String::from_utf8(sb.call("wait", b"20").unwrap()).unwrap();
    assert!(out.starts_with("waited "), "{out}");
    assert!(t.elapsed() < Duration::from_millis(45), "{:?}", t.elapsed());
    let s = sb.stats();
    assert_eq!(s.host_sleeps, 1, "{s:?}");
    assert_eq!(s.notifies, 1, "{s:?}");
    assert_eq!(sb.call("counter", b"").unwrap(), b"1");
}

#[test]
fn state_carries_over_from_exit_based_calls_into_warm_ones() {
    let mut sb = sandbox("badfunctions");
    assert_eq!(sb.call_keep_state("counter", b"").unwrap(), b"1");
    assert_eq!(sb.call_keep_state("counter", b"").unwrap(), b"2");
    let mut w = sb.into_warm(WarmOptions::default()).unwrap();
    assert_eq!(w.call("counter", b"").unwrap(), b"3");
    // A crashed exit-based call is reset before the sandbox goes warm.
    let mut sb = sandbox("badfunctions");
    assert_eq!(sb.call_keep_state("counter", b"").unwrap(), b"1");
    assert!(matches!(
        sb.call_keep_state("panic", b""),
        Err(CallError::Panic(_))
    ));
    let mut w = sb.into_warm(WarmOptions::default()).unwrap();
    assert_eq!(w.call("counter", b"").unwrap(), b"1");
}

#[test]
fn bad_calls_are_refused_before_they_reach_the_guest() {
    let mut sb = warm("badfunctions", WarmOptions::default());
    assert!(matches!(
        sb.call("nope", b""),
        Err(CallError::UnknownFunction(n)) if n == "nope"
    ));
    let big = vec![0u8; (1 << 20) + 1];
    assert!(matches!(
        sb.call("echo", &big),
        Err(CallError::InputTooLarge { .. })
    ));
    // Over the output limit: refused, and the sandbox goes on.
    assert!(matches!(
        sb.call("big-output", b"16777217"),
        Err(CallError::OutputTooLarge { len: 16777217, .. })
    ));
    assert_eq!(sb.call("counter", b"").unwrap(), b"1");
}

/// Asserts the sandbox is stopped: a later call says so.
fn assert_stopped(sb: &mut WarmSandbox) {
    match sb.call("echo", b"x") {
        Err(CallError::Host(m)) => assert!(m.contains("stopped"), "{m}"),
        other => panic!("a stopped sandbox answered {other:?}"),
    }
    assert!(sb.stopped().is_some());
}

#[test]
fn a_panic_or_a_fault_mid_call_is_reported_and_stops_the_sandbox() {
    let mut sb = warm("badfunctions", WarmOptions::default());
    assert_eq!(sb.call("counter", b"").unwrap(), b"1");
    match sb.call("panic", b"") {
        Err(CallError::Panic(m)) => assert!(m.contains("function panicked on purpose"), "{m}"),
        other => panic!("expected a panic, got {other:?}"),
    }
    assert!(sb.crash().is_some(), "the panic's registers are kept");
    assert_stopped(&mut sb);

    let mut sb = warm("badfunctions", WarmOptions::default());
    match sb.call("fault", b"") {
        Err(CallError::Fault(f)) => {
            assert_eq!(f.vector, Some(14), "{f}");
            assert!(f.to_string().contains("null pointer"), "{f}");
        }
        other => panic!("expected a page fault, got {other:?}"),
    }
    assert_stopped(&mut sb);
}

#[test]
fn a_call_past_its_timeout_is_stopped() {
    let mut sb = warm(
        "badfunctions",
        WarmOptions {
            call_timeout: Some(Duration::from_millis(300)),
            ..WarmOptions::default()
        },
    );
    assert_eq!(sb.call("counter", b"").unwrap(), b"1");
    let t = Instant::now();
    match sb.call("spin", b"") {
        Err(CallError::Timeout(d)) => assert!(d >= Duration::from_millis(290), "{d:?}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_stopped(&mut sb);
}

#[test]
fn a_kill_handle_stops_a_running_call() {
    let mut sb = warm("badfunctions", WarmOptions::default());
    let kill = sb.kill_handle();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        kill.kill();
    });
    assert!(matches!(sb.call("spin", b""), Err(CallError::Killed)));
    killer.join().unwrap();
    assert_stopped(&mut sb);
}

#[test]
fn dropping_a_warm_sandbox_ends_its_thread() {
    let sb = warm("badfunctions", WarmOptions::default());
    let tid = sb.vcpu_thread_id();
    let task = format!("/proc/self/task/{tid}");
    assert!(std::path::Path::new(&task).exists());
    drop(sb);
    assert!(
        !std::path::Path::new(&task).exists(),
        "the thread outlived its sandbox"
    );
}

// Guests that break the mailbox protocol (badwarm speaks it by hand).

fn badwarm(options: WarmOptions) -> WarmSandbox {
    let mut sb = sandbox("badwarm");
    // Exit-based calls work before the switch.
    assert_eq!(sb.call_keep_state("counter", b"").unwrap(), b"1");
    assert_eq!(sb.call_keep_state("echo", b"hi").unwrap(), b"hi");
    let mut w = sb.into_warm(options).unwrap();
    assert_eq!(w.call("echo", b"warm").unwrap(), b"warm");
    assert_eq!(w.call("counter", b"").unwrap(), b"2");
    w
}

fn protocol_error(r: Result<Vec<u8>, CallError>, want: &str) {
    match r {
        Err(CallError::Fault(f)) => {
            assert!(f.vector.is_none(), "{f}");
            assert!(f.to_string().contains(want), "{f}");
        }
        other => panic!("expected a protocol error with {want:?}, got {other:?}"),
    }
}

#[test]
fn a_wrong_done_seq_stops_the_guest() {
    let mut sb = badwarm(WarmOptions::default());
    protocol_error(sb.call("wrong-seq", b""), "done_seq 10");
    assert_stopped(&mut sb);
}

#[test]
fn an_output_outside_guest_memory_stops_the_guest() {
    let mut sb = badwarm(WarmOptions::default());
    protocol_error(sb.call("bad-out", b""), "64 bytes at 0x1000");
    assert_stopped(&mut sb);
}

#[test]
fn a_huge_output_length_is_refused_without_reading_it() {
    let mut sb = badwarm(WarmOptions::default());
    assert!(matches!(
        sb.call("huge-len", b""),
        Err(CallError::OutputTooLarge { len, .. }) if len == 1 << 40
    ));
    // As for exit-based calls, the sandbox goes on.
    assert_eq!(sb.call("counter", b"").unwrap(), b"3");
}

#[test]
fn a_guest_that_spins_between_calls_is_stopped() {
    let options = WarmOptions {
        guest_spin: Duration::from_millis(1),
        idle_slack: Duration::from_millis(200),
        ..WarmOptions::default()
    };
    for bad in ["spin-after", "wake-loop-after"] {
        let mut sb = badwarm(options);
        let tid = sb.vcpu_thread_id();
        assert_eq!(sb.call(bad, b"").unwrap(), b"ok", "{bad}");
        // It keeps the vCPU busy: stopped once the budget and the slack are over, and its
        // thread ends.
        let task = format!("/proc/self/task/{tid}");
        let t = Instant::now();
        while std::path::Path::new(&task).exists() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !std::path::Path::new(&task).exists(),
            "{bad}: still running after {:?}",
            t.elapsed()
        );
        assert!(
            t.elapsed() >= Duration::from_millis(150),
            "{bad}: {:?}",
            t.elapsed()
        );
        assert!(
            sb.stopped().is_some(),
            "{bad}: the stop shows before the next call"
        );
        protocol_error(sb.call("echo", b"x"), "without sleeping in WAIT");
        assert_stopped(&mut sb);
    }
}

#[test]
fn a_call_that_never_answers_times_out() {
    let mut sb = badwarm(WarmOptions {
        call_timeout: Some(Duration::from_millis(300)),
        ..WarmOptions::default()
    });
    assert!(matches!(sb.call("never", b""), Err(CallError::Timeout(_))));
    assert_stopped(&mut sb);
}

#[test]
fn a_guest_that_never_notifies_only_slows_its_own_calls() {
    let mut sb = badwarm(WarmOptions::default());
    let t = Instant::now();
    assert_eq!(sb.call("slow-no-notify", b"5").unwrap(), b"slow");
    // Found by the caller's periodic look at the mailbox, not by a notification.
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(sb.stats().notifies, 0);
    assert_eq!(sb.call("counter", b"").unwrap(), b"3");
}

#[test]
fn fn_return_in_exitless_mode_stops_the_guest() {
    let mut sb = badwarm(WarmOptions::default());
    protocol_error(sb.call("fn-return", b""), "FN_RETURN");
    assert_stopped(&mut sb);
}

#[test]
fn a_panic_in_a_hand_written_guest_is_reported() {
    let mut sb = badwarm(WarmOptions::default());
    match sb.call("panic", b"") {
        Err(CallError::Panic(m)) => assert!(m.contains("on purpose"), "{m}"),
        other => panic!("expected a panic, got {other:?}"),
    }
    assert_stopped(&mut sb);
}

/// Set in the child process of [`sigterm_stops_a_warm_call_and_its_thread`].
const SIGNAL_CHILD: &str = "PVRUN_WARM_SIGNAL_CHILD";

#[test]
fn sigterm_stops_a_warm_call_and_its_thread() {
    if std::env::var_os(SIGNAL_CHILD).is_some() {
        // The child: a warm call that never ends, under the process's signal handling.
        host_vmm::stop_guest_on_signals();
        let mut sb = warm("badfunctions", WarmOptions::default());
        assert_eq!(sb.call("counter", b"").unwrap(), b"1");
        println!("calling");
        let r = sb.call("spin", b"");
        println!("call ended: {r:?}");
        drop(sb);
        println!("dropped");
        return;
    }
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sigterm_stops_a_warm_call_and_its_thread",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(SIGNAL_CHILD, "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push(line.clone());
        // libtest's `test NAME ... ` precedes it on the same line.
        if line.ends_with("calling") {
            break;
        }
    }
    assert!(
        seen.last().is_some_and(|l| l.ends_with("calling")),
        "{seen:?}"
    );
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(
        rest.iter().any(|l| l == "call ended: Err(Killed)"),
        "{rest:?}"
    );
    assert!(rest.iter().any(|l| l == "dropped"), "{rest:?}");
    assert!(status.success(), "{status:?} {rest:?}");
}

#[test]
fn a_sandbox_from_a_snapshot_file_can_go_warm() {
    // The mailbox's address is part of the snapshot file.
    let dir = std::env::temp_dir().join(format!("pvrun-warm-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let file = dir.join("badfunctions.snap");
    sandbox("badfunctions")
        .template()
        .write_snapshot_file(&file)
        .unwrap();
    let sb = Sandbox::from_snapshot_file(&file, config()).unwrap();
    let mut w = sb.into_warm(WarmOptions::default()).unwrap();
    for i in 1..=20u32 {
        assert_eq!(w.call("counter", b"").unwrap(), i.to_string().as_bytes());
    }
}
