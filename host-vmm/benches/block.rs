//! Block storage benchmark: sequential and random I/O from the page cache through the
//! ring, with exits per request, beside the raw KVM exit floor from the same run.
//! Run with `cargo bench -p host-vmm --bench block`.

mod support;

use support::{Bar, Capture, Report, Unit, exit_floor, guest};

use std::path::Path;
use std::sync::Arc;

use host_vmm::DiskConfig;
use host_vmm::{GuestImage, Outcome, Vm, VmConfig};

struct Result {
    bytes: f64,
    reqs: f64,
    ns: f64,
    exits_per_req: f64,
}

fn run(elf: &Path, disk: &Path, args: &[&str], ioeventfd: bool) -> Result {
    let out = Capture::default();
    let cfg = VmConfig {
        mem_size: 256 << 20,
        args: std::iter::once("blockbench")
            .chain(args.iter().copied())
            .map(String::from)
            .collect(),
        stdout: Box::new(out.clone()),
        disks: vec![DiskConfig {
            name: "bench".into(),
            path: disk.into(),
            read_only: false,
        }],
        ioeventfd,
        ..VmConfig::default()
    };
    let mut vm = Vm::new(Arc::new(GuestImage::from_file(elf).unwrap()), cfg).unwrap();
    let o = vm.run().unwrap();
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    assert_eq!(o, Outcome::Exited(0), "blockbench {args:?}: {text}");
    let field = |k: &str| -> f64 {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {text}"))
    };
    let doorbells: u64 = vm.device_counters().iter().map(|(_, c)| c.doorbells).sum();
    let reqs = field("reqs=");
    Result {
        bytes: field("bytes="),
        reqs,
        ns: field("ns="),
        // Exits to user space plus doorbells served in the kernel, per request.
        // (Doorbells served as exits are already among `exits`.)
        exits_per_req: (vm.exits() as f64
            + if vm.ioeventfd() {
                doorbells as f64
            } else {
                0.0
            })
            / reqs,
    }
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let mib: u64 = if quick { 8 } else { 64 };
    let elf = guest("blockbench");
    let dir = std::env::temp_dir().join(format!("pvrun-blockbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("bench.img");
    // A filled image, read once so the reads below come from the page cache.
    let data: Vec<u8> = (0..(mib + 16) << 20)
        .map(|i: u64| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&disk, &data).unwrap();
    drop(std::fs::read(&disk).unwrap());

    let floor = exit_floor();
    let m = mib.to_string();
    let seq_r = run(&elf, &disk, &["seq-read", &m, "1024"], true);
    let seq_w = run(&elf, &disk, &["seq-write", &m, "1024"], true);
    let count = if quick { "2000" } else { "20000" };
    let qd1 = run(&elf, &disk, &["rand-read", "1", count], true);
    let qd32 = run(&elf, &disk, &["rand-read", "32", count], true);
    let qd1_exit = run(&elf, &disk, &["rand-read", "1", count], false);
    let qd32_exit = run(&elf, &disk, &["rand-read", "32", count], false);
    let _ = std::fs::remove_dir_all(&dir);

    let gbs = |r: &Result| r.bytes / r.ns; // bytes per ns = GB/s
    let iops = |r: &Result| r.reqs / r.ns * 1e9;
    let us = |r: &Result| r.ns / r.reqs / 1e3;
    let floor_us = floor.as_nanos() as f64 / 1e3;
    let mut report = Report::with_columns(
        "block",
        format!(
            "pvrun block benchmark ({mib} MiB image in the page cache; raw KVM exit floor {floor_us:.1} µs in this run)"
        ),
        &[
            "measurement",
            "result",
            "per request",
            "exits/request",
            "floor",
            "target",
        ],
    );
    // Each row: its throughput (GB/s or IOPS) alone, and its time per request beside
    // the exit floor.
    let mut row = |label: &str, r: &Result, throughput: bool, floor_cell: &str, target: &str| {
        let (result, bar) = if throughput {
            (
                format!("{:.2} GB/s", gbs(r)),
                Bar::alone(label, Unit::Rate("GB/s"), gbs(r)),
            )
        } else {
            (
                format!("{:.0} IOPS", iops(r)),
                Bar::alone(label, Unit::Rate("IOPS"), iops(r)),
            )
        };
        let per_request = Bar::vs(
            &format!(
                "{label}: time per request ({:.3} exits/request)",
                r.exits_per_req
            ),
            Unit::Seconds,
            us(r) / 1e6,
            "raw KVM exit floor",
            floor.as_secs_f64(),
        );
        report.row(
            vec![
                label.into(),
                result,
                format!("{:.1} µs", us(r)),
                format!("{:.3}", r.exits_per_req),
                floor_cell.into(),
                target.into(),
            ],
            vec![bar.target(target), per_request],
        );
    };
    let f = format!("{floor_us:.1} µs");
    row(
        "sequential read, 1 MiB requests",
        &seq_r,
        true,
        &f,
        ">= 1 GB/s",
    );
    row("sequential write, 1 MiB requests", &seq_w, true, "", "-");
    row("4 KiB random read, QD1", &qd1, false, "", "-");
    row(
        "4 KiB random read, QD32",
        &qd32,
        false,
        "",
        ">= 50,000 IOPS, <= 0.1 exits/req",
    );
    row(
        "same, QD1, doorbells as exits (no ioeventfd)",
        &qd1_exit,
        false,
        "",
        "-",
    );
    row(
        "same, QD32, doorbells as exits (no ioeventfd)",
        &qd32_exit,
        false,
        "",
        "-",
    );
    report.finish();
}
