//! Function-sandbox benchmark: create, call, reset, host calls and memory per sandbox,
//! beside the raw KVM exit floor from the same run.
//! Run with `cargo bench -p host-vmm --bench sandbox`.

mod support;

use support::{exit_floor, guest, median, us};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use host_vmm::HostFn;
use host_vmm::{Sandbox, SandboxConfig};

/// Median time of `f`, not counting the drop of what it returns (destroying a VM is
/// teardown, not creation).
fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> Duration {
    f();
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                let v = std::hint::black_box(f());
                let e = t.elapsed();
                drop(v);
                e
            })
            .collect(),
    )
}

fn meminfo_available_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap();
    s.lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    s.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let runs = if quick { 5 } else { 201 };
    let elf = guest("badfunctions");
    let lookup: HostFn = Arc::new(|i: &[u8]| Ok(i.to_vec()));
    let config = || SandboxConfig {
        host_functions: HashMap::from([("lookup".to_string(), lookup.clone())]),
        console: Arc::new(Mutex::new(Box::new(std::io::sink()))),
        ..SandboxConfig::default()
    };
    let floor = exit_floor();

    let create_elf = time(if quick { 2 } else { 21 }, || {
        Sandbox::new(&elf, config()).unwrap()
    });
    let mut sb = Sandbox::new(&elf, config()).unwrap();
    let template = sb.template().clone();
    let create_snap = time(if quick { 2 } else { 51 }, || {
        Sandbox::from_template(&template).unwrap()
    });
    // The same into a VM created ahead of time (one per creation, made before timing it).
    let shells = if quick { 3 } else { 52 };
    template.prepare_shells(shells).unwrap();
    let create_shell = time(shells - 1, || Sandbox::from_template(&template).unwrap());

    let warm = time(runs, || sb.call_keep_state("echo", b"x").unwrap());
    sb.reset().unwrap();
    let call_reset = time(runs, || {
        sb.call("echo", b"x").unwrap();
        sb.reset().unwrap()
    });
    let mut pages = 0;
    let reset16 = median(
        (0..runs)
            .map(|_| {
                sb.call("touch-pages", b"16").unwrap();
                let t = Instant::now();
                pages = sb.reset().unwrap();
                t.elapsed()
            })
            .collect(),
    );
    let fsb = Sandbox::new(&guest("functions"), config());
    let host_call = match fsb {
        Ok(mut f) => {
            f.call("greet-via-host", b"x").unwrap();
            time(runs, || f.call_keep_state("greet-via-host", b"x").unwrap())
        }
        Err(e) => panic!("functions guest: {e}"),
    };

    // Memory per idle sandbox: many sandboxes from one snapshot, each after one call.
    let n = if quick { 20 } else { 1000 };
    let (avail0, rss0) = (meminfo_available_kib(), rss_kib());
    let mut many = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = Sandbox::from_template(&template).unwrap();
        s.call("echo", b"warm").unwrap();
        s.reset().unwrap();
        many.push(s);
    }
    let (avail1, rss1) = (meminfo_available_kib(), rss_kib());
    let per_total = avail0.saturating_sub(avail1) as f64 / n as f64;
    let per_rss = rss1.saturating_sub(rss0) as f64 / n as f64;
    drop(many);

    let f = floor.as_secs_f64();
    println!("pvrun sandbox benchmark (medians; raw KVM exit floor measured in this run)");
    println!();
    println!("| measurement | median | floor | ratio | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| raw KVM exit floor (CPL3 `out` round trip) | {} | - | 1.00x | - |",
        us(floor)
    );
    println!(
        "| create sandbox from ELF (boot + init + snapshot) | {} | {} | {:.0} exits | - |",
        us(create_elf),
        us(floor),
        create_elf.as_secs_f64() / f
    );
    println!(
        "| create sandbox from snapshot | {} | {} | {:.0} exits | <= 300 µs |",
        us(create_snap),
        us(floor),
        create_snap.as_secs_f64() / f
    );
    println!(
        "| create sandbox from snapshot into a pre-created VM (`prepare_shells`) | {} | {} | {:.0} exits | <= 300 µs |",
        us(create_shell),
        us(floor),
        create_shell.as_secs_f64() / f
    );
    println!(
        "| warm call (`echo`, 1 byte, no reset) | {} | {} | {:.2}x | <= 1.3x floor |",
        us(warm),
        us(floor),
        warm.as_secs_f64() / f
    );
    println!(
        "| call + reset | {} | {} | {:.2}x | - |",
        us(call_reset),
        us(floor),
        call_reset.as_secs_f64() / f
    );
    println!(
        "| reset after a call that dirtied 16 pages ({pages} pages copied) | {} | {} | {:.2}x | <= 20 µs |",
        us(reset16),
        us(floor),
        reset16.as_secs_f64() / f
    );
    println!(
        "| call that makes one host-function call | {} | {} | {:.2}x | - |",
        us(host_call),
        us(floor),
        host_call.as_secs_f64() / f
    );
    println!(
        "| host memory per idle sandbox ({n} sandboxes; whole machine) | {:.0} KiB | - | - | <= 1 MiB |",
        per_total
    );
    println!(
        "| of which this process's RSS | {:.0} KiB | - | - | - |",
        per_rss
    );
}
