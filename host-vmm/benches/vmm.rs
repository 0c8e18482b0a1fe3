//! Boot and hypercall benchmarks: prints a table of medians, each beside the raw KVM exit
//! floor (or the fork+exec floor) measured in the same run, so ratios mean the same thing
//! on any machine. Run with `cargo bench -p host-vmm --bench vmm`.

mod support;

use support::{Baseline, Capture, Ratio, Report, exit_floor, guest, median, us};

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use host_vmm::{GuestImage, Outcome, Vm, VmConfig};

fn hypercall(bench: &Path) -> Duration {
    let img = Arc::new(GuestImage::from_file(bench).unwrap());
    let err = Capture::default();
    let cfg = VmConfig {
        args: vec![
            "bench".into(),
            "hypercall".into(),
            "15".into(),
            "2000".into(),
        ],
        stdout: Box::new(std::io::sink()),
        stderr: Box::new(err.clone()),
        ..VmConfig::default()
    };
    let out = Vm::new(img, cfg).unwrap().run().unwrap();
    assert_eq!(out, Outcome::Exited(0));
    let text = String::from_utf8(err.0.lock().unwrap().clone()).unwrap();
    let ns: u64 = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("median="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bench guest said: {text}"));
    Duration::from_nanos(ns)
}

/// A temporary directory, removed on drop (also when the benchmark panics).
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let p = std::env::temp_dir().join(format!("pvrun-bench-vmm-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Medians of whole `pvrun call` processes of function `upper` on input `hello`: (from the
/// snapshot file `pvrun snapshot` wrote of `functions`, with a fresh boot + init of it).
/// Each process starts, boots or maps, calls, prints the answer and exits.
fn call_processes(pvrun: &Path, functions: &Path, runs: usize) -> (Duration, Duration) {
    let dir = TempDir::new();
    let file = dir.0.join("functions.snap");
    let out = Command::new(pvrun)
        .args([
            "snapshot".as_ref(),
            "-o".as_ref(),
            file.as_os_str(),
            functions.as_os_str(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "pvrun snapshot: {out:?}");
    // Both answer the same (checked once, outside the timing).
    let answer = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(pvrun)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "pvrun {args:?}: {out:?}");
        out.stdout
    };
    let snap_args = [
        "call".as_ref(),
        "--snapshot".as_ref(),
        file.as_os_str(),
        "upper".as_ref(),
        "hello".as_ref(),
    ];
    let boot_args = [
        "call".as_ref(),
        functions.as_os_str(),
        "upper".as_ref(),
        "hello".as_ref(),
    ];
    assert_eq!(answer(&snap_args), b"HELLO");
    assert_eq!(answer(&boot_args), b"HELLO");
    (
        spawn(pvrun, &snap_args, runs),
        spawn(pvrun, &boot_args, runs),
    )
}

/// Medians of (VM creation .. guest exit, the same including the ELF read, VM teardown).
fn boot_in_process(hello: &Path, runs: usize) -> (Duration, Duration, Duration) {
    let img = Arc::new(GuestImage::from_file(hello).unwrap());
    // Returns (create..exit, teardown).
    let run = |img: Arc<GuestImage>, t: Instant| {
        let cfg = VmConfig {
            args: vec!["hello".into()],
            stdout: Box::new(std::io::sink()),
            ..VmConfig::default()
        };
        let mut vm = Vm::new(img, cfg).unwrap();
        assert_eq!(vm.run().unwrap(), Outcome::Exited(0));
        let booted = t.elapsed();
        let t = Instant::now();
        drop(vm);
        (booted, t.elapsed())
    };
    run(img.clone(), Instant::now());
    let (warm, teardown): (Vec<_>, Vec<_>) =
        (0..runs).map(|_| run(img.clone(), Instant::now())).unzip();
    let with_elf = (0..runs)
        .map(|_| {
            let t = Instant::now();
            run(Arc::new(GuestImage::from_file(hello).unwrap()), t).0
        })
        .collect();
    (median(warm), median(with_elf), median(teardown))
}

fn spawn<A: AsRef<std::ffi::OsStr>>(cmd: &Path, args: &[A], runs: usize) -> Duration {
    let once = || {
        let t = Instant::now();
        let st = Command::new(cmd)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(
            st.success(),
            "{} {:?}: {st}",
            cmd.display(),
            args.iter().map(|a| a.as_ref()).collect::<Vec<_>>()
        );
        t.elapsed()
    };
    once();
    median((0..runs).map(|_| once()).collect())
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not: keep that run short.
    let quick = !std::env::args().any(|a| a == "--bench");
    let runs = if quick { 3 } else { 51 };
    let hello = guest("hello");
    let bench = guest("bench");

    let floor = exit_floor();
    let hc = hypercall(&bench);
    let (boot, boot_elf, teardown) = boot_in_process(&hello, runs);
    let pvrun = Path::new(env!("CARGO_BIN_EXE_pvrun"));
    let whole = spawn(pvrun, &[&hello], runs);
    let fork_exec = spawn::<&str>(Path::new("/bin/true"), &[], runs);
    let (call_snap, call_boot) = call_processes(pvrun, &guest("functions"), runs);

    let floor = Baseline::floor(floor);
    let fork_exec = Baseline::new(
        "fork+exec /bin/true",
        fork_exec,
        format!("{} (fork+exec /bin/true)", us(fork_exec)),
    );
    let mut r = Report::new(
        "vmm",
        "pvrun benchmark (medians; floors measured in this run)",
    );
    r.floor_row("raw KVM exit floor (CPL3 `out` round trip)", &floor);
    r.compare(
        "console-write hypercall round trip",
        hc,
        &floor,
        Ratio::Times,
        "<= 1.1x floor",
    );
    r.compare(
        "boot-to-exit `hello`, in-process (VM create .. exit)",
        boot,
        &floor,
        Ratio::Exits,
        "<= 1 ms",
    );
    r.compare(
        "same, including reading + validating the ELF",
        boot_elf,
        &floor,
        Ratio::Exits,
        "-",
    );
    r.compare(
        "VM teardown after exit (KVM VM destroy; not part of boot)",
        teardown,
        &floor,
        Ratio::Exits,
        "-",
    );
    r.compare(
        "whole process `pvrun hello`",
        whole,
        &fork_exec,
        Ratio::Times,
        "<= 3 ms",
    );
    r.compare(
        "whole process `pvrun call --snapshot FILE upper hello` (`functions`)",
        call_snap,
        &fork_exec,
        Ratio::Times,
        "<= 3 ms",
    );
    r.compare(
        "whole process `pvrun call functions upper hello` (fresh boot + init)",
        call_boot,
        &fork_exec,
        Ratio::Times,
        "-",
    );
    r.finish();
}
