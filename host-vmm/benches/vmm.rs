//! Boot and hypercall benchmarks: prints a table of medians, each beside the raw KVM exit
//! floor (or the fork+exec floor) measured in the same run, so ratios mean the same thing
//! on any machine. Run with `cargo bench -p host-vmm --bench vmm`.

mod support;

use support::{Capture, exit_floor, guest, median, us};

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

    println!("pvrun benchmark (medians; floors measured in this run)");
    println!();
    println!("| measurement | median | floor | ratio | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| raw KVM exit floor (CPL3 `out` round trip) | {} | - | 1.00x | - |",
        us(floor)
    );
    println!(
        "| console-write hypercall round trip | {} | {} | {:.2}x | <= 1.1x floor |",
        us(hc),
        us(floor),
        hc.as_secs_f64() / floor.as_secs_f64()
    );
    println!(
        "| boot-to-exit `hello`, in-process (VM create .. exit) | {} | {} | {:.0} exits | <= 1 ms |",
        us(boot),
        us(floor),
        boot.as_secs_f64() / floor.as_secs_f64()
    );
    println!(
        "| same, including reading + validating the ELF | {} | {} | {:.0} exits | - |",
        us(boot_elf),
        us(floor),
        boot_elf.as_secs_f64() / floor.as_secs_f64()
    );
    println!(
        "| VM teardown after exit (KVM VM destroy; not part of boot) | {} | {} | {:.0} exits | - |",
        us(teardown),
        us(floor),
        teardown.as_secs_f64() / floor.as_secs_f64()
    );
    println!(
        "| whole process `pvrun hello` | {} | {} (fork+exec /bin/true) | {:.2}x | <= 3 ms |",
        us(whole),
        us(fork_exec),
        whole.as_secs_f64() / fork_exec.as_secs_f64()
    );
    println!(
        "| whole process `pvrun call --snapshot FILE upper hello` (`functions`) | {} | {} (fork+exec /bin/true) | {:.2}x | <= 3 ms |",
        us(call_snap),
        us(fork_exec),
        call_snap.as_secs_f64() / fork_exec.as_secs_f64()
    );
    println!(
        "| whole process `pvrun call functions upper hello` (fresh boot + init) | {} | {} (fork+exec /bin/true) | {:.2}x | - |",
        us(call_boot),
        us(fork_exec),
        call_boot.as_secs_f64() / fork_exec.as_secs_f64()
    );
}
