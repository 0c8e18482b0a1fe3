//! Cost of symbolizing a crash report: the DWARF of a guest parsed and a 10-frame
//! backtrace rendered, beside reading the ELF file in the same run, for two guests: the
//! biggest release example guest (line tables only), and the target case, a
//! ~10 MB debug ELF (the `ecosystem` guest, many crates.io dependencies, built with the dev
//! profile's full debug info). Target: at most 50 ms for the 10 MB ELF. Median of N runs.
//! `cargo bench -p host-vmm --bench symbolize`.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use host_vmm::{Backtrace, GuestImage};
use support::{Bar, Report, median};

const RUNS: usize = 21;
/// The target for the 10 MB debug ELF.
const TARGET_MS: f64 = 50.0;

fn build(dir: &Path, name: &str, release: bool) -> PathBuf {
    let req = guest_build::BuildRequest {
        manifest_path: Some(dir.join("Cargo.toml")),
        package: Some(name.to_string()),
        release,
        quiet: true,
        ..Default::default()
    };
    guest_build::build(&req).expect("build guest").elf
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Adds the table rows of one guest (load and symbolize beside reading the file);
/// returns the render median in ms.
fn measure(report: &mut Report, elf: &Path, what: &str, target: &str) -> f64 {
    let size = std::fs::metadata(elf).unwrap().len();
    let image = GuestImage::from_file(elf).unwrap();
    // Ten return addresses spread over the text segment.
    let text = image.segments.iter().find(|s| s.perm & 4 != 0).unwrap();
    let pcs: Vec<u64> = (0..10)
        .map(|i| text.vaddr + 16 + (text.filesz - 32) * i / 10)
        .collect();
    let bt = Backtrace { pcs, stopped: None };
    let mut read = Vec::new();
    let mut load = Vec::new();
    let mut render = Vec::new();
    let mut lines = 0;
    let mut located = 0;
    for _ in 0..RUNS {
        let t = Instant::now();
        let bytes = std::fs::read(elf).unwrap();
        read.push(t.elapsed());
        std::hint::black_box(bytes);
        let t = Instant::now();
        let img = GuestImage::from_file(elf).unwrap();
        load.push(t.elapsed());
        let t = Instant::now();
        let out = bt.render(&img);
        render.push(t.elapsed());
        lines = out.lines().count();
        located = out.lines().filter(|l| l.contains(" at ")).count();
    }
    let name = elf.file_name().unwrap().to_string_lossy();
    let (read, load, render) = (median(read), median(load), median(render));
    let cell = |d: Duration| format!("{:.2} ms", ms(d));
    let base = "read the ELF file";
    report.row(
        vec![
            format!("{name} ({what}, {:.1} MB)", size as f64 / 1e6),
            format!("baseline: {base}"),
            cell(read),
        ],
        Vec::new(),
    );
    let op = "load and validate the image (boot path, no DWARF)";
    report.row(
        vec![name.to_string(), op.into(), cell(load)],
        vec![Bar::times(&format!("{name}: {op}"), load, base, read)],
    );
    let op = format!(
        "symbolize a 10-frame crash report ({lines} lines, {located} with file:line; DWARF parsed from scratch)"
    );
    report.row(
        vec![name.to_string(), op.clone(), cell(render)],
        vec![Bar::times(&format!("{name}: {op}"), render, base, read).target(target)],
    );
    ms(render)
}

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-examples");
    let mut biggest: Option<(u64, PathBuf)> = None;
    for name in [
        "http-hello",
        "kvstore",
        "echo",
        "blockbench",
        "crashes",
        "hello",
    ] {
        let elf = build(&dir, name, true);
        let size = std::fs::metadata(&elf).unwrap().len();
        if biggest.as_ref().is_none_or(|(s, _)| size > *s) {
            biggest = Some((size, elf));
        }
    }
    let (_, release_elf) = biggest.unwrap();
    // The 10 MB case: a dependency-heavy guest with the dev profile's full debug info.
    let debug_elf = build(&dir, "ecosystem", false);
    let mut report = Report::with_columns(
        "symbolize",
        format!("median of {RUNS} runs"),
        &["guest", "operation", "time"],
    );
    measure(&mut report, &release_elf, "release, line tables", "-");
    let big = measure(
        &mut report,
        &debug_elf,
        "dev profile, full DWARF",
        &format!("<= {TARGET_MS} ms"),
    );
    let size = std::fs::metadata(&debug_elf).unwrap().len() as f64 / 1e6;
    report.note(format!(
        "target: symbolizing a report of a {size:.1} MB debug ELF in <= {TARGET_MS} ms: {big:.2} ms ({})",
        if big <= TARGET_MS { "met" } else { "MISSED" }
    ));
    report.finish();
}
