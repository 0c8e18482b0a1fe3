//! Elastic sandbox pools (`SandboxPool::elastic`, what `pvrun serve --guest` uses): a call
//! that finds an idle sandbox, a call that has to wait for the pool to grow (every sandbox
//! busy, the `pvrun-grow` thread makes one in a new VM), and the grower's drop of an idle
//! sandbox, beside the raw KVM exit floor from the same run.
//! Run with `cargo bench -p host-vmm --bench pool` (`-- --bench` for the full run).

mod support;

use support::{Bar, Baseline, Ratio, Report, Unit, exit_floor, guest, median, us};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use host_vmm::{PoolLimits, Sandbox, SandboxConfig, SandboxPool};

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let runs = if quick { 5 } else { 201 };
    let grows = if quick { 3 } else { 31 };
    let config = || SandboxConfig {
        console: Arc::new(Mutex::new(Box::new(std::io::sink()))),
        ..SandboxConfig::default()
    };
    let floor = exit_floor();
    let first = Sandbox::new(&guest("badfunctions"), config()).unwrap();
    let template = first.template().clone();
    // The parts of growing, apart: a sandbox from the snapshot into a VM created ahead of
    // time (what the grower does for a waiting call), and the first call in it.
    let mut create = Vec::new();
    let mut first_call = Vec::new();
    for _ in 0..grows {
        template.prepare_shells(1).unwrap();
        let t = Instant::now();
        let mut sb = Sandbox::from_template(&template).unwrap();
        create.push(t.elapsed());
        let t = Instant::now();
        sb.call("echo", b"x").unwrap();
        first_call.push(t.elapsed());
    }
    let create = median(create);
    let first_call = median(first_call);
    let idle = Duration::from_millis(20);
    let pool = Arc::new(
        SandboxPool::elastic(
            first,
            PoolLimits {
                min: 1,
                max: 2,
                idle,
            },
        )
        .unwrap(),
    );

    // A call with an idle sandbox (the pool at its min, nothing else running).
    pool.call("echo", b"x").unwrap();
    let idle_call = median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                pool.call("echo", b"x").unwrap();
                t.elapsed()
            })
            .collect(),
    );

    // A call while the only sandbox is busy: it waits for the grower to make a second one.
    // Then the pool shrinks back (idle time 20 ms) before the next round; the time from
    // that call's end to the drop is the shrink latency (idle time plus the grower's
    // timer slack).
    let mut grow_call = Vec::new();
    let mut shrink = Vec::new();
    for _ in 0..grows {
        let holder = {
            let pool = pool.clone();
            std::thread::spawn(move || pool.call("wait", b"300").unwrap())
        };
        while pool.stats().busy == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let before = pool.stats().grown;
        let t = Instant::now();
        pool.call("echo", b"x").unwrap();
        grow_call.push(t.elapsed());
        assert_eq!(
            pool.stats().grown,
            before + 1,
            "the call did not grow the pool"
        );
        // The new sandbox is idle from here on (the holder still has the other one).
        let done = Instant::now();
        while pool.stats().size > 1 {
            std::thread::sleep(Duration::from_micros(200));
        }
        shrink.push(done.elapsed());
        holder.join().unwrap();
    }
    let grow_call = median(grow_call);
    let shrink = median(shrink);
    let stats = pool.stats();

    let base = Baseline::floor(floor);
    let mut r = Report::new(
        "pool",
        format!(
            "pvrun elastic-pool benchmark (medians; raw KVM exit floor measured in this run; {grows} growths)"
        ),
    );
    r.floor_row("raw KVM exit floor (CPL3 `out` round trip)", &base);
    r.compare(
        "pool call (`echo`, 1 byte) with an idle sandbox, reset included",
        idle_call,
        &base,
        Ratio::Times,
        "-",
    );
    r.compare(
        "pool call while every sandbox is busy: waits for the grower's new sandbox (new VM + snapshot mapped), then runs",
        grow_call,
        &base,
        Ratio::Exits,
        "-",
    );
    r.compare(
        "of which growing (minus the idle-sandbox call)",
        grow_call.saturating_sub(idle_call),
        &base,
        Ratio::Exits,
        "-",
    );
    r.compare(
        "its parts: a sandbox from the snapshot into a VM created ahead of time",
        create,
        &base,
        Ratio::Exits,
        "-",
    );
    r.compare(
        "its parts: the first call in a new sandbox (`echo`, no reset)",
        first_call,
        &base,
        Ratio::Exits,
        "-",
    );
    r.alone(
        us(shrink),
        Bar::alone(
            &format!(
                "shrink: from the extra sandbox's last call to its drop (idle time {} ms)",
                idle.as_millis()
            ),
            Unit::Seconds,
            shrink.as_secs_f64(),
        ),
        "-",
    );
    r.note(format!(
        "pool after the run: {} grown, {} shrunk, {} failures",
        stats.grown, stats.shrunk, stats.grow_failures
    ));
    r.finish();
}
