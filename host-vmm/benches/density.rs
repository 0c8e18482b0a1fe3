//! Density: host memory per idle function sandbox, with many sandboxes from one template
//! (10,000 in a full run), beside what the kernel's KVM structures alone cost per VM (bare
//! VMs with one vCPU and no memory, made in the same run), and the raw KVM exit floor
//! beside the first call of a trimmed sandbox.
//! Run with `cargo bench -p host-vmm --bench density` (`-- --bench` for 10,000;
//! `PVRUN_BENCH_SANDBOXES=N` and `PVRUN_BENCH_MEM_MIB=M` change the count and the
//! sandboxes' memory size).
//!
//! Memory is whole-machine (`MemAvailable`, `MemFree`), so run it on a quiet machine; the
//! kernel's share is split by `/proc/meminfo` category.

mod support;

use support::{Bar, Baseline, Ratio, Report, Unit, exit_floor, guest, median, us};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use host_vmm::{Sandbox, SandboxConfig};

/// The `/proc/meminfo` fields the table splits the cost into.
const FIELDS: &[&str] = &[
    "MemAvailable",
    "MemFree",
    "Slab",
    "VmallocUsed",
    "KernelStack",
    "PageTables",
    "SecPageTables",
    "AnonPages",
];

fn meminfo() -> Vec<i64> {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap();
    FIELDS
        .iter()
        .map(|f| {
            s.lines()
                .find(|l| l.split(':').next() == Some(f))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        })
        .collect()
}

/// KiB per item of each field, from two readings (a drop in MemAvailable/MemFree, a rise
/// in the others, counts as a cost).
fn per_item(before: &[i64], after: &[i64], n: usize) -> Vec<f64> {
    FIELDS
        .iter()
        .zip(before.iter().zip(after))
        .map(|(f, (b, a))| {
            let d = if f.starts_with("Mem") { b - a } else { a - b };
            d as f64 / n as f64
        })
        .collect()
}

fn status_kib(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn count_dir(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// This process's own threads (not the kernel's per-VM `kvm-nx-lpage-recovery` workers,
/// which the kernel counts as tasks of the process that made the VM).
fn host_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| !c.starts_with("kvm-nx-lpage"))
                })
                .count()
        })
        .unwrap_or(0)
}

fn maps() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// Lets the memory numbers settle: KVM frees a memory slot's structures after an RCU
/// grace period, and they showed in MemFree only seconds later (300 ms was too short).
fn settle() {
    std::thread::sleep(Duration::from_millis(3000));
}

/// Environment variable that makes this binary a worker: `FILE,COUNT` (sandboxes from a
/// snapshot file), driven by lines on stdin.
const WORKER: &str = "PVRUN_BENCH_DENSITY_WORKER";

fn config(mem_mib: u64) -> SandboxConfig {
    SandboxConfig {
        mem_size: mem_mib << 20,
        call_timeout: Some(Duration::from_secs(10)),
        console: Arc::new(Mutex::new(Box::new(std::io::sink()))),
        ..SandboxConfig::default()
    }
}

/// Raises this process's open-files limit to `want` (up to the hard limit).
fn want_descriptors(want: u64) {
    // SAFETY: plain system calls on local structs.
    unsafe {
        let mut cur: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur);
        if cur.rlim_cur < want {
            cur.rlim_cur = want.min(cur.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &cur);
        }
    }
}

/// A worker process: `count` sandboxes from the snapshot file, each after one call and its
/// reset; then, one stdin line at a time: `trim`, `calls` (first call after the trim and
/// the next, medians in ns), `quit`. Answers each with one line.
fn worker(spec: &str) -> ! {
    use std::io::BufRead;
    let (file, count) = spec.split_once(',').unwrap();
    let count: usize = count.parse().unwrap();
    want_descriptors(3 * count as u64 + 256);
    let template =
        host_vmm::Template::from_snapshot_file(std::path::Path::new(file), config(0)).unwrap();
    let (anon0, fds0, maps0, threads0) = (
        status_kib("RssAnon:"),
        count_dir("/proc/self/fd"),
        maps(),
        host_threads(),
    );
    let mut many: Vec<Sandbox> = (0..count)
        .map(|_| {
            let mut s = Sandbox::from_template(&template).unwrap();
            s.call("echo", b"warm").unwrap();
            s.reset().unwrap();
            s
        })
        .collect();
    let per = |a: usize, b: usize| (a as f64 - b as f64) / count as f64;
    println!(
        "ready {:.1} {:.2} {:.2} {}",
        (status_kib("RssAnon:") as f64 - anon0 as f64) / count as f64,
        per(count_dir("/proc/self/fd"), fds0),
        per(maps(), maps0),
        host_threads() as i64 - threads0 as i64
    );
    for line in std::io::stdin().lock().lines() {
        match line.unwrap().as_str() {
            "trim" => {
                let t = Instant::now();
                for s in &mut many {
                    assert!(s.trim().unwrap());
                }
                println!("trimmed {}", (t.elapsed() / count as u32).as_nanos());
            }
            "calls" => {
                let k = count.min(201);
                let timed = |many: &mut Vec<Sandbox>| {
                    median(
                        many.iter_mut()
                            .take(k)
                            .map(|s| {
                                let t = Instant::now();
                                s.call_keep_state("echo", b"again").unwrap();
                                t.elapsed()
                            })
                            .collect(),
                    )
                };
                let first = timed(&mut many);
                let next = timed(&mut many);
                println!("calls {} {}", first.as_nanos(), next.as_nanos());
            }
            _ => break,
        }
    }
    std::process::exit(0)
}

struct Worker {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Worker {
    fn ask(&mut self, what: &str) -> Vec<String> {
        use std::io::{BufRead, Write};
        if !what.is_empty() {
            let stdin = self.child.stdin.as_mut().unwrap();
            writeln!(stdin, "{what}").unwrap();
            stdin.flush().unwrap();
        }
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        if line.is_empty() {
            panic!("density worker died: {:?}", self.child.wait());
        }
        line.split_whitespace()
            .skip(1)
            .map(str::to_string)
            .collect()
    }
}

fn main() {
    if let Ok(spec) = std::env::var(WORKER) {
        worker(&spec);
    }
    let quick = !std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("PVRUN_BENCH_SANDBOXES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 200 } else { 10_000 });
    let mem_mib: u64 = std::env::var("PVRUN_BENCH_MEM_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    // Each sandbox holds three descriptors (VM, vCPU, wake-up eventfd); a process may
    // hold 20,000 here (and cannot raise its hard limit): the sandboxes are spread over
    // worker processes of at most 5,000, which share the snapshot file's pages.
    let per_process = 5_000;
    let workers = n.div_ceil(per_process).max(1);
    let floor = exit_floor();
    let first = Sandbox::new(&guest("badfunctions"), config(mem_mib)).unwrap();
    let dir = std::env::temp_dir().join(format!("pvrun-density-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("badfunctions.pvsnap");
    first.template().write_snapshot_file(&file).unwrap();
    drop(first);

    // What KVM alone keeps per VM: a VM and its vCPU, no memory slot, never run.
    let bare_n = n.min(per_process);
    want_descriptors(2 * bare_n as u64 + 256);
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    settle();
    let m0 = meminfo();
    let bare: Vec<_> = (0..bare_n)
        .map(|_| {
            let vm = kvm.create_vm().unwrap();
            let vcpu = vm.create_vcpu(0).unwrap();
            (vm, vcpu)
        })
        .collect();
    settle();
    let bare_cost = per_item(&m0, &meminfo(), bare_n);
    drop(bare);
    settle();

    // Idle sandboxes, each after one call and its reset, in worker processes.
    let me = std::env::current_exe().unwrap();
    let m0 = meminfo();
    let t = Instant::now();
    let mut pool: Vec<Worker> = (0..workers)
        .map(|i| {
            let count = per_process.min(n - i * per_process);
            let mut child = std::process::Command::new(&me)
                .env(WORKER, format!("{},{count}", file.display()))
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let out = std::io::BufReader::new(child.stdout.take().unwrap());
            Worker { child, out }
        })
        .collect();
    let ready: Vec<Vec<String>> = pool.iter_mut().map(|w| w.ask("")).collect();
    let made = t.elapsed();
    settle();
    let idle_cost = per_item(&m0, &meminfo(), n);
    let stat = |i: usize| ready[0][i].clone();

    let m1 = meminfo();
    let trim_ns: Vec<u64> = pool
        .iter_mut()
        .map(|w| w.ask("trim")[0].parse().unwrap())
        .collect();
    settle();
    let trimmed = per_item(&m1, &meminfo(), n);
    let trimmed_cost: Vec<f64> = idle_cost.iter().zip(&trimmed).map(|(a, b)| a + b).collect();
    let calls = pool[0].ask("calls");
    let (first_call, next_call) = (
        Duration::from_nanos(calls[0].parse().unwrap()),
        Duration::from_nanos(calls[1].parse().unwrap()),
    );
    for mut w in pool {
        // Closing its stdin ends the worker.
        drop(w.child.stdin.take());
        let _ = w.child.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);

    let mut cols = vec!["per VM, KiB"];
    cols.extend_from_slice(FIELDS);
    cols.push("target");
    let mut r = Report::with_columns(
        "density",
        format!(
            "pvrun density benchmark: {n} idle sandboxes of one snapshot file ({mem_mib} MiB guest memory each) \
             in {workers} process(es), made in {:.1} s; KiB per VM from /proc/meminfo (whole machine: run it quiet)",
            made.as_secs_f64()
        ),
        &cols,
    );
    let cells = |label: &str, v: &[f64], target: &str| {
        let mut c = vec![label.to_string()];
        c.extend(v.iter().map(|x| format!("{x:.0}")));
        c.push(target.into());
        c
    };
    let bare_label = format!("bare KVM VM + vCPU ({bare_n}; kernel only: no memory, never run)");
    // The chart: MemAvailable per sandbox beside what KVM alone keeps per VM.
    let bar = |label: &str, v: &[f64]| {
        Bar::vs(label, Unit::KiB, v[0], "bare KVM VM + vCPU", bare_cost[0]).target("<= 512 KiB")
    };
    r.row(cells(&bare_label, &bare_cost, "-"), Vec::new());
    let idle_label = "idle sandbox (after one call and its reset)";
    r.row(
        cells(idle_label, &idle_cost, "<= 512 (MemAvailable)"),
        vec![bar(idle_label, &idle_cost)],
    );
    let trim_label = "idle sandbox, trimmed (`Sandbox::trim`)";
    r.row(
        cells(trim_label, &trimmed_cost, "<= 512 (MemAvailable)"),
        vec![bar(trim_label, &trimmed_cost)],
    );
    let trim_each = Duration::from_nanos(trim_ns.iter().sum::<u64>() / trim_ns.len() as u64);
    r.note(format!(
        "\n| per sandbox | value |\n|---|---|\n\
         | its process's anonymous memory (RssAnon), untrimmed | {} KiB |\n\
         | descriptors | {} |\n| mappings | {} |\n\
         | host threads added for {} sandboxes | {} |\n| trim | {} |",
        stat(0),
        stat(1),
        stat(2),
        per_process.min(n),
        stat(3),
        us(trim_each)
    ));
    r.finish();

    let base = Baseline::floor(floor);
    let mut c = Report::new(
        "density-calls",
        "pvrun density benchmark: what a trim costs the next call (medians; raw KVM exit floor measured in this run)",
    );
    c.floor_row("raw KVM exit floor (CPL3 `out` round trip)", &base);
    c.compare(
        "first call after a trim (slot registered again, pages faulted back)",
        first_call,
        &base,
        Ratio::Times,
        "-",
    );
    c.compare(
        "the call after it (warm)",
        next_call,
        &base,
        Ratio::Times,
        "-",
    );
    c.finish();
}
