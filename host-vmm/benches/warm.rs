//! Exitless warm calls: a keep-state call through the mailbox (`WarmSandbox`) beside the
//! exit-based keep-state call (`Sandbox::call_keep_state`, one VM exit) and the raw KVM
//! exit floor, all from the same run; plus the CPU the warm sandbox spends.
//! Run with `cargo bench -p host-vmm --bench warm` (add `-- --bench` for the full size).

mod support;

use support::{Baseline, Ratio, Report, exit_floor, guest, median};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use host_vmm::{Sandbox, SandboxConfig, WarmOptions};

/// Medians of `batches` batch averages of `n` calls each.
fn per_call(batches: usize, n: usize, mut f: impl FnMut()) -> Duration {
    for _ in 0..n {
        f();
    }
    median(
        (0..batches)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..n {
                    f();
                }
                t.elapsed() / n as u32
            })
            .collect(),
    )
}

/// One call's latency, each timed alone: the median and the 90th percentile.
fn single(runs: usize, mut f: impl FnMut()) -> (Duration, Duration) {
    f();
    let mut v: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    v.sort();
    (v[v.len() / 2], v[v.len() * 9 / 10])
}

/// CPU time (user + system) of thread `tid` of this process.
fn thread_cpu(tid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let (batches, n) = if quick { (9, 200) } else { (31, 2000) };
    let elf = guest("badfunctions");
    let config = || SandboxConfig {
        console: Arc::new(Mutex::new(Box::new(std::io::sink()))),
        ..SandboxConfig::default()
    };
    let floor = exit_floor();

    let mut sb = Sandbox::new(&elf, config()).unwrap();
    let exit_based = per_call(batches, n / 4, || {
        sb.call_keep_state("echo", b"x").unwrap();
    });
    let (exit_single, exit_p90) = single(batches * 20, || {
        sb.call_keep_state("echo", b"x").unwrap();
    });
    let mut w = sb.into_warm(WarmOptions::default()).unwrap();
    let tid = w.vcpu_thread_id();
    let s0 = w.stats();
    let warm = per_call(batches, n, || {
        w.call("echo", b"x").unwrap();
    });
    let (warm_single, warm_p90) = single(batches * 20, || {
        w.call("echo", b"x").unwrap();
    });
    let s1 = w.stats();
    let counter = per_call(batches, n, || {
        w.call("counter", b"").unwrap();
    });
    // A call after an idle second: the guest sleeps, the call wakes it.
    let woken = median(
        (0..if quick { 3 } else { 11 })
            .map(|_| {
                std::thread::sleep(Duration::from_millis(50));
                let t = Instant::now();
                w.call("echo", b"x").unwrap();
                t.elapsed()
            })
            .collect(),
    );
    // CPU of the vCPU thread while idle (after the spin budget), over one second.
    std::thread::sleep(Duration::from_millis(100));
    let c0 = thread_cpu(tid);
    std::thread::sleep(Duration::from_secs(1));
    let idle_cpu = thread_cpu(tid) - c0;

    let calls = s1.calls - s0.calls;
    let exits = (s1.guest_waits - s0.guest_waits) + (s1.notifies - s0.notifies);
    let base = Baseline::floor(floor);
    let mut r = Report::new(
        "warm",
        "pvrun warm-call benchmark (medians; raw KVM exit floor measured in this run)",
    );
    r.floor_row("raw KVM exit floor (CPL3 `out` round trip)", &base);
    let t = Ratio::Times;
    r.compare(
        "exit-based keep-state call (`call_keep_state`, `echo` 1 byte; batch average)",
        exit_based,
        &base,
        t,
        "-",
    );
    r.compare(
        "exit-based keep-state call, each timed alone",
        exit_single,
        &base,
        t,
        "-",
    );
    r.compare(
        "**exitless warm keep-state call** (`WarmSandbox::call`, `echo` 1 byte; batch average)",
        warm,
        &base,
        t,
        "<= 2 µs, <= 0.1x",
    );
    r.compare(
        "exitless warm keep-state call, each timed alone",
        warm_single,
        &base,
        t,
        "<= 2 µs, <= 0.1x",
    );
    r.compare(
        "exit-based keep-state call, each timed alone, 90th percentile",
        exit_p90,
        &base,
        t,
        "-",
    );
    r.compare(
        "exitless warm keep-state call, each timed alone, 90th percentile",
        warm_p90,
        &base,
        t,
        "-",
    );
    r.compare(
        "exitless warm call, `counter` (keeps state; batch average)",
        counter,
        &base,
        t,
        "-",
    );
    r.compare(
        "exitless call to a sleeping guest (50 ms idle: WAIT woken)",
        woken,
        &base,
        t,
        "-",
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    r.note(format!(
        "Exits during the {calls} timed exitless `echo` calls: {exits} (guest WAITs + FN_NOTIFYs). \
         CPU of the idle warm sandbox's vCPU thread over 1 s: {:?} (spin budget {:?} after each call). \
         Load average at the end: {}.",
        idle_cpu,
        w.options().guest_spin,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    ));
    r.finish();
}
