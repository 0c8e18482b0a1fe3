//! Cost of symbolizing a crash report: the DWARF of the biggest example guest (built with
//! debug info) parsed and a 10-frame backtrace rendered, beside reading the ELF file in the
//! same run. Median of N runs. `cargo bench -p host-vmm --bench symbolize`.

use std::path::Path;
use std::time::{Duration, Instant};

use host_vmm::{Backtrace, GuestImage};

const RUNS: usize = 21;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-examples");
    let mut biggest: Option<(u64, std::path::PathBuf)> = None;
    for name in [
        "http-hello",
        "kvstore",
        "echo",
        "blockbench",
        "crashes",
        "hello",
    ] {
        let req = guest_build::BuildRequest {
            manifest_path: Some(dir.join("Cargo.toml")),
            package: Some(name.to_string()),
            release: true,
            quiet: true,
            ..Default::default()
        };
        let elf = guest_build::build(&req).expect("build guest").elf;
        let size = std::fs::metadata(&elf).unwrap().len();
        if biggest.as_ref().is_none_or(|(s, _)| size > *s) {
            biggest = Some((size, elf));
        }
    }
    let (size, elf) = biggest.unwrap();
    let image = GuestImage::from_file(&elf).unwrap();
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
    for _ in 0..RUNS {
        let t = Instant::now();
        let bytes = std::fs::read(&elf).unwrap();
        read.push(t.elapsed());
        std::hint::black_box(bytes);
        let t = Instant::now();
        let img = GuestImage::from_file(&elf).unwrap();
        load.push(t.elapsed());
        let t = Instant::now();
        let out = bt.render(&img);
        render.push(t.elapsed());
        lines = out.lines().count();
    }
    println!(
        "guest {} ({:.1} MB, with DWARF), median of {RUNS} runs",
        elf.display(),
        size as f64 / 1e6
    );
    println!("| operation | time |");
    println!("|---|---|");
    println!(
        "| baseline: read the ELF file | {:.2} ms |",
        median(read).as_secs_f64() * 1e3
    );
    println!(
        "| load and validate the image (boot path, no DWARF) | {:.2} ms |",
        median(load).as_secs_f64() * 1e3
    );
    println!(
        "| symbolize a 10-frame crash report ({lines} lines, DWARF parsed from scratch) | {:.2} ms |",
        median(render).as_secs_f64() * 1e3
    );
}
