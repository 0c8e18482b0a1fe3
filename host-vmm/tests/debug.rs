//! Debugging a crashed guest like a Rust program: backtraces with `function at file:line`,
//! the Linux-system-call cause, and core files that Debian's gdb reads.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{Run, guest, pvrun};

/// Runs the `crashes` guest in `mode` with extra `pvrun` options and environment.
fn crashes(mode: &str, opts: &[&str], backtrace_env: bool) -> Run {
    let mut c = Command::new(common::pvrun_bin());
    c.args(["--timeout", "20"]).args(opts);
    c.arg(guest("crashes")).arg("--").arg(mode);
    if backtrace_env {
        c.env("RUST_BACKTRACE", "1");
    } else {
        c.env_remove("RUST_BACKTRACE");
    }
    c.output().expect("cannot run pvrun").into()
}

/// `crashes/src/main.rs:LINE`, where LINE is the line carrying `// MARK: {mark}`.
fn marked(mark: &str) -> String {
    let src = common::examples_dir().join("crashes/src/main.rs");
    let text = std::fs::read_to_string(&src).unwrap();
    let tag = format!("// MARK: {mark}");
    let line = text
        .lines()
        .position(|l| l.trim_end().ends_with(&tag))
        .unwrap_or_else(|| panic!("no `{tag}` in {}", src.display()))
        + 1;
    format!("crashes/src/main.rs:{line}:")
}

/// The frame lines of a report (after the first line), checked to be indented.
fn frames(stderr: &str) -> Vec<&str> {
    let lines: Vec<&str> = stderr
        .lines()
        .skip_while(|l| !l.starts_with("   0: "))
        .collect();
    for l in &lines {
        assert!(l.starts_with(' '), "frame line not indented: {l}\n{stderr}");
    }
    lines
}

/// Index of the first frame that names `function` at `location`.
fn frame_at(frames: &[&str], function: &str, location: &str) -> usize {
    frames
        .iter()
        .position(|f| f.contains(&format!(": {function} at ")) && f.contains(location))
        .unwrap_or_else(|| {
            panic!(
                "no frame `{function} at ...{location}` in:\n{}",
                frames.join("\n")
            )
        })
}

#[test]
fn a_fault_three_calls_deep_prints_the_call_stack() {
    let r = crashes("fault", &[], false);
    assert_eq!(r.status, 139, "{}", r.stderr);
    let first = r.stderr.lines().next().unwrap();
    assert!(
        first.starts_with(
            "pvrun: guest crashed: page fault (#PF) reading 0x0: null pointer dereference, at rip 0x"
        ) && first.ends_with(")")
            && first.contains("(crashes::fault_inner+0x"),
        "{first}"
    );
    let f = frames(&r.stderr);
    let inner = frame_at(&f, "crashes::fault_inner", &marked("fault"));
    let middle = frame_at(&f, "crashes::fault_middle", &marked("fault-middle"));
    let outer = frame_at(&f, "crashes::fault_outer", &marked("fault-outer"));
    assert!(inner < middle && middle < outer, "{}", r.stderr);
    assert!(f[0].starts_with("   0: "), "innermost first: {}", r.stderr);
    assert!(!r.stderr.contains("backtrace stopped"), "{}", r.stderr);
}

#[test]
fn a_panic_prints_the_call_stack_with_rust_backtrace() {
    let r = crashes("panic", &[], true);
    assert_eq!(r.status, 101, "{}", r.stderr);
    assert!(
        r.stderr
            .starts_with(&format!("pvrun: guest panicked at {}", marked("panic"))),
        "{}",
        r.stderr
    );
    let f = frames(&r.stderr);
    // The innermost frame is the SDK function that reported the panic to the host.
    assert!(f[0].contains("pvrun::process::abort"), "{}", r.stderr);
    let inner = frame_at(&f, "crashes::panic_inner", &marked("panic"));
    let middle = frame_at(&f, "crashes::panic_middle", &marked("panic-middle"));
    let outer = frame_at(&f, "crashes::panic_outer", &marked("panic-outer"));
    assert!(inner < middle && middle < outer, "{}", r.stderr);

    // Without RUST_BACKTRACE a panic is the message alone; --backtrace asks for the stack.
    let r = crashes("panic", &[], false);
    assert_eq!(r.status, 101);
    assert!(frames(&r.stderr).is_empty(), "{}", r.stderr);
    let r = crashes("panic", &["--backtrace"], false);
    assert!(!frames(&r.stderr).is_empty(), "{}", r.stderr);
}

#[test]
fn a_corrupt_frame_chain_ends_the_walk_cleanly() {
    for mode in ["corrupt", "loop-chain"] {
        let r = crashes(mode, &[], false);
        assert_eq!(r.status, 139, "{mode}: {}", r.stderr);
        let first = r.stderr.lines().next().unwrap();
        assert!(
            first.starts_with("pvrun: guest crashed: page fault (#PF) reading 0x0: null pointer dereference, at rip 0x")
                && first.contains("(crashes::corrupt_then_fault+0x"),
            "{mode}: {first}"
        );
        let f = frames(&r.stderr);
        frame_at(&f, "crashes::corrupt_then_fault", &marked("corrupt"));
        assert!(f.len() <= 66, "{mode}: {}", r.stderr);
        assert!(
            f.last()
                .unwrap()
                .contains("(backtrace stopped: frame pointer"),
            "{mode}: {}",
            r.stderr
        );
    }
}

#[test]
fn a_linux_system_call_is_named() {
    for (mode, insn) in [
        ("syscall", "syscall"),
        ("sysenter", "sysenter"),
        ("int80", "int 0x80"),
    ] {
        let r = crashes(mode, &[], false);
        assert_eq!(r.status, 139, "{mode}: {}", r.stderr);
        let first = r.stderr.lines().next().unwrap();
        assert!(first.starts_with("pvrun: guest crashed: "), "{first}");
        assert!(
            first.contains(
                "the guest executed a Linux system call (nr 39) at crashes::linux_syscall+0x"
            ) && first.contains(&format!(
                "(`{insn}`); pvrun guests cannot make system calls"
            )),
            "{mode}: {first}"
        );
        assert!(
            !first.contains("null pointer") && !first.contains("rip 0x0,"),
            "{first}"
        );
        frame_at(
            &frames(&r.stderr),
            "crashes::linux_syscall",
            "crashes/src/main.rs:",
        );
    }
}

#[test]
fn non_canonical_addresses_and_xsetbv_get_their_own_causes() {
    let r = crashes("noncanonical", &[], false);
    assert_eq!(r.status, 139);
    assert!(
        r.stderr
            .contains("(#GP) accessing 0x8000000000001000: non-canonical address"),
        "{}",
        r.stderr
    );
    let r = crashes("xsetbv", &[], false);
    assert_eq!(r.status, 139);
    assert!(
        r.stderr.contains("privileged instruction `xsetbv`"),
        "{}",
        r.stderr
    );
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<std::path::Path> for TempDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir(tag: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("pvrun-debug-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

#[test]
fn a_core_dump_is_read_back_by_gdb() {
    let dir = tempdir("gdb");
    let r = crashes("fault", &["--core-dump", dir.to_str().unwrap()], false);
    assert_eq!(r.status, 139, "{}", r.stderr);
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
    let cores: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(cores.len(), 1, "{cores:?}");
    let name = cores[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("core.crashes."), "{name}");
    let size = std::fs::metadata(&cores[0]).unwrap().len();
    assert!(
        size < 4 << 20,
        "core of {size} bytes: zero pages must be left out"
    );
    let out = Command::new("gdb")
        .args(["-nx", "-batch", "-ex", "bt", "-ex", "info registers rip"])
        .arg(guest("crashes"))
        .arg(&cores[0])
        .output()
        .expect("gdb is needed (apt-get install gdb)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("signal SIGSEGV"), "{text}");
    let inner = text.find("fault_inner").unwrap_or_else(|| panic!("{text}"));
    let outer = text.find("fault_outer").unwrap_or_else(|| panic!("{text}"));
    assert!(inner < outer, "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("rip") && l.contains("fault_inner")),
        "{text}"
    );

    // A panic writes one too.
    let file = dir.join("panic.core");
    let r = crashes("panic", &["--core-dump", file.to_str().unwrap()], false);
    assert_eq!(r.status, 101, "{}", r.stderr);
    let out = Command::new("gdb")
        .args(["-nx", "-batch", "-ex", "bt"])
        .arg(guest("crashes"))
        .arg(&file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("SIGABRT") && text.contains("panic_inner"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn core_dump_failures_warn_and_keep_the_status() {
    let dir = tempdir("nowrite");
    // A path whose parent does not exist cannot be written.
    let bad = dir.join("missing/core");
    let r = crashes("fault", &["--core-dump", bad.to_str().unwrap()], false);
    assert_eq!(r.status, 139, "{}", r.stderr);
    assert!(
        r.stderr.starts_with("pvrun: guest crashed: "),
        "{}",
        r.stderr
    );
    let warning = format!("pvrun: warning: cannot write core dump {}: ", bad.display());
    assert_eq!(
        r.stderr.lines().filter(|l| l.starts_with(&warning)).count(),
        1,
        "{}",
        r.stderr
    );

    // An existing file is kept, unless --core-dump-overwrite.
    let existing = dir.join("core");
    std::fs::write(&existing, b"precious").unwrap();
    let r = crashes("panic", &["--core-dump", existing.to_str().unwrap()], false);
    assert_eq!(r.status, 101, "{}", r.stderr);
    assert!(
        r.stderr.contains("pvrun: warning: cannot write core dump"),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::read(&existing).unwrap(), b"precious");
    let r = crashes(
        "panic",
        &[
            "--core-dump",
            existing.to_str().unwrap(),
            "--core-dump-overwrite",
        ],
        false,
    );
    assert_eq!(r.status, 101, "{}", r.stderr);
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
    assert!(std::fs::read(&existing).unwrap().starts_with(b"\x7fELF"));

    // A normal exit writes nothing.
    let none = dir.join("none");
    let r = pvrun(
        &guest("hello"),
        &["--core-dump", none.to_str().unwrap()],
        &[],
    );
    assert_eq!(r.status, 0);
    assert!(!none.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts the `crashes` guest in `mode` (`spin` or `sleep`) under `pvrun` with `opts`,
/// waits for its first line (`started`), sends pvrun SIGQUIT and returns what it printed.
fn quit_while(mode: &str, started: &str, opts: &[&str]) -> Run {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;
    let mut child = Command::new(common::pvrun_bin())
        .args(["--timeout", "60"])
        .args(opts)
        .arg(guest("crashes"))
        .arg("--")
        .arg(mode)
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run pvrun");
    // Killed on every way out of this function, so a failing test leaves no guest behind.
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut stderr = child.stderr.take().unwrap();
    let mut child = Reap(child);
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert_eq!(first.trim_end(), started, "the guest did not start");
    // Let it get into its loop (or its sleep).
    std::thread::sleep(std::time::Duration::from_millis(200));
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(
        unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGQUIT) },
        0
    );
    let status = child.0.wait().unwrap();
    let mut err = String::new();
    stderr.read_to_string(&mut err).unwrap();
    let mut out = first;
    stdout.read_to_string(&mut out).unwrap();
    Run {
        status: status.code().unwrap_or(-1),
        stdout: out,
        stderr: err,
    }
}

#[test]
fn sigquit_writes_a_core_of_a_spinning_guest() {
    let dir = tempdir("quit");
    let file = dir.join("spin.core");
    let r = quit_while("spin", "spinning", &["--core-dump", file.to_str().unwrap()]);
    assert_eq!(r.status, 131, "{}", r.stderr);
    assert!(
        r.stderr
            .starts_with("pvrun: quit by signal 3 (SIGQUIT); guest stopped\n"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
    // The report shows where the guest was.
    let fr = frames(&r.stderr);
    // The innermost frame is the loop (which of its lines depends on where the stop
    // landed); the caller's is the call's line.
    let inner = frame_at(&fr, "crashes::spin_inner", "crashes/src/main.rs:");
    let outer = frame_at(&fr, "crashes::spin_outer", &marked("spin-outer"));
    assert!(inner < outer, "{}", r.stderr);
    let out = Command::new("gdb")
        .args(["-nx", "-batch", "-ex", "bt", "-ex", "info registers rip"])
        .arg(guest("crashes"))
        .arg(&file)
        .output()
        .expect("gdb is needed (apt-get install gdb)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("signal SIGQUIT"), "{text}");
    let inner = text.find("spin_inner").unwrap_or_else(|| panic!("{text}"));
    let outer = text.find("spin_outer").unwrap_or_else(|| panic!("{text}"));
    assert!(inner < outer, "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("rip") && l.contains("spin_inner")),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigquit_of_a_sleeping_guest_and_without_core_dump() {
    // A guest asleep in WAIT is stopped too; its core shows the sleep's caller.
    let dir = tempdir("quitsleep");
    let r = quit_while("sleep", "sleeping", &["--core-dump", dir.to_str().unwrap()]);
    assert_eq!(r.status, 131, "{}", r.stderr);
    let cores: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(cores.len(), 1, "{cores:?}\n{}", r.stderr);
    let out = Command::new("gdb")
        .args(["-nx", "-batch", "-ex", "bt"])
        .arg(guest("crashes"))
        .arg(&cores[0])
        .output()
        .expect("gdb is needed (apt-get install gdb)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("SIGQUIT") && text.contains("sleep_inner") && text.contains("sleep_outer"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);

    // Without --core-dump: the same stop, report and status (131, not a host process
    // killed by the signal: that would have no exit code).
    let r = quit_while("spin", "spinning", &[]);
    assert_eq!(r.status, 131, "{}", r.stderr);
    assert!(
        r.stderr
            .starts_with("pvrun: quit by signal 3 (SIGQUIT); guest stopped\n"),
        "{}",
        r.stderr
    );
    let fr = frames(&r.stderr);
    frame_at(&fr, "crashes::spin_outer", &marked("spin-outer"));
}
