//! Cost of symbolizing a crash report: the DWARF of a guest parsed and a 10-frame
//! backtrace rendered, beside reading the ELF file in the same run, for two guests: the
//! biggest release example guest (line tables only), and the target case, a
//! ~10 MB debug ELF (the `ecosystem` guest, many crates.io dependencies, built with the dev
//! profile's full debug info). Target: at most 50 ms for the 10 MB ELF. Median of N runs.
//! `cargo bench -p host-vmm --bench symbolize`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use host_vmm::{Backtrace, GuestImage};

const RUNS: usize = 21;
/// The target for the 10 MB debug ELF.
const TARGET_MS: f64 = 50.0;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

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

/// Prints the table rows of one guest; returns the render median in ms.
fn measure(elf: &Path, what: &str) -> f64 {
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
    println!(
        "| {name} ({what}, {:.1} MB) | baseline: read the ELF file | {:.2} ms |",
        size as f64 / 1e6,
        ms(median(read))
    );
    println!(
        "| {name} | load and validate the image (boot path, no DWARF) | {:.2} ms |",
        ms(median(load))
    );
    let r = ms(median(render));
    println!(
        "| {name} | symbolize a 10-frame crash report ({lines} lines, {located} with file:line; DWARF parsed from scratch) | {r:.2} ms |"
    );
    r
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
    println!("median of {RUNS} runs");
    println!("| guest | operation | time |");
    println!("|---|---|---|");
    measure(&release_elf, "release, line tables");
    let big = measure(&debug_elf, "dev profile, full DWARF");
    let size = std::fs::metadata(&debug_elf).unwrap().len() as f64 / 1e6;
    println!(
        "target: symbolizing a report of a {size:.1} MB debug ELF in <= {TARGET_MS} ms: {big:.2} ms ({})",
        if big <= TARGET_MS { "met" } else { "MISSED" }
    );
}
