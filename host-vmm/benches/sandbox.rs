//! Function-sandbox benchmark: create, call, reset, host calls and memory per sandbox,
//! beside the raw KVM exit floor from the same run.
//! Run with `cargo bench -p host-vmm --bench sandbox`.

mod support;

use support::{Bar, Baseline, Ratio, Report, Unit, exit_floor, guest, median};

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

/// Environment variable that makes this binary a child which times one thing: creating
/// the first sandbox of its process from the snapshot file it names, then exits.
const COLD_CHILD: &str = "PVRUN_BENCH_SNAPFILE_COLD";

/// In a child process: the first sandbox of the process from a snapshot file (KVM opened,
/// CPU policy probed, file checked and mapped, VM created): prints the microseconds.
fn cold_child(path: &str) -> ! {
    let config = SandboxConfig {
        console: Arc::new(Mutex::new(Box::new(std::io::sink()))),
        ..SandboxConfig::default()
    };
    let t = Instant::now();
    let sb = Sandbox::from_snapshot_file(std::path::Path::new(path), config).unwrap();
    let e = t.elapsed();
    std::hint::black_box(&sb);
    println!("{}", e.as_nanos());
    std::process::exit(0)
}

/// Median over `runs` child processes of [`cold_child`].
fn cold_from_file(path: &std::path::Path, runs: usize) -> Duration {
    let me = std::env::current_exe().unwrap();
    median(
        (0..runs)
            .map(|_| {
                let out = std::process::Command::new(&me)
                    .env(COLD_CHILD, path)
                    .output()
                    .unwrap();
                let ns: u64 = String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("cold child: {out:?}"));
                Duration::from_nanos(ns)
            })
            .collect(),
    )
}

fn main() {
    if let Ok(path) = std::env::var(COLD_CHILD) {
        cold_child(&path);
    }
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

    // Snapshot files: the same guest written to a file, then sandboxes from it.
    let dir = std::env::temp_dir().join(format!("pvrun-bench-snapfile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("badfunctions.snap");
    let info = template.write_snapshot_file(&file).unwrap();
    let file_cold = cold_from_file(&file, if quick { 3 } else { 21 });
    let file_load = time(if quick { 2 } else { 51 }, || {
        Sandbox::from_snapshot_file(&file, config()).unwrap()
    });
    let file_template = host_vmm::Template::from_snapshot_file(&file, config()).unwrap();
    file_template.prepare_shells(shells).unwrap();
    let file_shell = time(shells - 1, || {
        Sandbox::from_template(&file_template).unwrap()
    });
    drop(file_template);
    let _ = std::fs::remove_dir_all(&dir);

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

    let floor = Baseline::floor(floor);
    let mut r = Report::new(
        "sandbox",
        "pvrun sandbox benchmark (medians; raw KVM exit floor measured in this run)",
    );
    r.floor_row("raw KVM exit floor (CPL3 `out` round trip)", &floor);
    r.compare(
        "create sandbox from ELF (boot + init + snapshot)",
        create_elf,
        &floor,
        Ratio::Exits,
        "-",
    );
    r.compare(
        "create sandbox from snapshot",
        create_snap,
        &floor,
        Ratio::Exits,
        "<= 300 µs",
    );
    r.compare(
        "create sandbox from snapshot into a pre-created VM (`prepare_shells`)",
        create_shell,
        &floor,
        Ratio::Exits,
        "<= 300 µs",
    );
    r.compare(
        &format!(
            "create from a snapshot file, cold: first sandbox of a new process ({} KiB stored)",
            info.data_bytes >> 10
        ),
        file_cold,
        &floor,
        Ratio::Exits,
        "<= 300 µs",
    );
    r.compare(
        "create from a snapshot file, file checked again (`Sandbox::from_snapshot_file`, warm process)",
        file_load,
        &floor,
        Ratio::Exits,
        "-",
    );
    r.compare(
        "create from a snapshot file's template into a pre-created VM",
        file_shell,
        &floor,
        Ratio::Exits,
        "<= 60 µs",
    );
    r.compare(
        "warm call (`echo`, 1 byte, no reset)",
        warm,
        &floor,
        Ratio::Times,
        "<= 1.3x floor",
    );
    r.compare("call + reset", call_reset, &floor, Ratio::Times, "-");
    r.compare(
        &format!("reset after a call that dirtied 16 pages ({pages} pages copied)"),
        reset16,
        &floor,
        Ratio::Times,
        "<= 20 µs",
    );
    r.compare(
        "call that makes one host-function call",
        host_call,
        &floor,
        Ratio::Times,
        "-",
    );
    r.alone(
        format!("{per_total:.0} KiB"),
        Bar::alone(
            &format!("host memory per idle sandbox ({n} sandboxes; whole machine)"),
            Unit::KiB,
            per_total,
        ),
        "<= 1 MiB",
    );
    r.alone(
        format!("{per_rss:.0} KiB"),
        Bar::alone("of which this process's RSS", Unit::KiB, per_rss),
        "-",
    );
    r.finish();
}
