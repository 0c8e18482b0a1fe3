//! The `pvrun` command line: clear one-line errors with status 125 for everything that
//! stops a guest from starting.

mod common;

use std::process::Command;

use common::{guest, pvrun};

fn host_error(args: &[&str]) -> String {
    let out = Command::new(common::pvrun_bin())
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(125), "args {args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.starts_with("pvrun: error: "), "{stderr}");
    stderr
}

#[test]
fn missing_file_is_one_clear_line() {
    let e = host_error(&["/nonexistent/guest.elf"]);
    assert!(
        e.contains("cannot read guest `/nonexistent/guest.elf`") && e.contains("No such file"),
        "{e}"
    );
}

#[test]
fn non_elf_file_is_one_clear_line() {
    let e = host_error(&[concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")]);
    assert!(e.contains("is not an ELF file"), "{e}");
}

#[test]
fn a_host_program_is_refused_as_pie_or_not_a_guest() {
    // /bin/true on Debian is a PIE; either way it is not a pvrun guest.
    let e = host_error(&["/bin/true"]);
    assert!(
        e.contains("position-independent") || e.contains("not a pvrun guest"),
        "{e}"
    );
}

#[test]
fn too_little_memory_says_to_raise_mem() {
    let e = host_error(&["--mem", "4M", guest("hello").to_str().unwrap()]);
    assert!(
        e.contains("memory size") && e.contains("out of range"),
        "{e}"
    );
}

#[test]
fn usage_errors_exit_125_and_help_and_version_exit_0() {
    for args in [
        &["--mem", "lots", "x.elf"][..],
        &["run", "--bogus", "x.elf"],
        &["serve", "x.elf"], // no --listen
        &["call", "x.elf"],  // no function name
        &["call", "--host-fn", "lookup", "x.elf", "f"],
        &["call", "--host-fn", "f=cat 'open", "x.elf", "f"],
        &[],
    ] {
        let out = Command::new(common::pvrun_bin())
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {stderr}");
        assert!(!stderr.is_empty(), "{args:?}: no message");
    }
    let out = Command::new(common::pvrun_bin())
        .args(["--mem", "lots", "x.elf"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a size"));
    for args in [
        &["--help"][..],
        &["--version"],
        &["help"],
        &["help", "call"],
        &["run", "--help"],
    ] {
        let out = Command::new(common::pvrun_bin())
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(!out.stdout.is_empty(), "{args:?}");
    }
}

fn stdout_of(args: &[&str]) -> String {
    let out = Command::new(common::pvrun_bin())
        .args(args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{args:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn help_lists_the_subcommands_and_help_serve_describes_serve() {
    let help = stdout_of(&["--help"]);
    for sub in ["run", "serve", "call", "snapshot", "help"] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{sub} "))),
            "`{sub}` missing from:\n{help}"
        );
    }
    assert!(help.contains("Usage: pvrun [OPTIONS] <COMMAND>"), "{help}");
    let serve = stdout_of(&["help", "serve"]);
    assert!(
        serve.contains("Usage: pvrun serve [OPTIONS] --listen <ADDR> [GUEST]"),
        "{serve}"
    );
    for opt in [
        "--snapshot <FILE>",
        "--pool",
        "--host-fn <NAME=CMD>",
        "--host-fn-timeout",
        "--max-inflight",
    ] {
        assert!(serve.contains(opt), "{opt} missing from:\n{serve}");
    }
    assert_eq!(serve, stdout_of(&["serve", "--help"]));
    let call = stdout_of(&["help", "call"]);
    assert!(
        call.contains("Usage: pvrun call [OPTIONS] <GUEST> <NAME> [INPUT|-]"),
        "{call}"
    );
    // The README's "Command line" section shows the same usage lines.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    for l in [
        "pvrun [run] [OPTIONS] GUEST",
        "pvrun serve [OPTIONS] --listen ADDR (GUEST [-- ARGS...] | --snapshot FILE",
        "| (--guest NAME=PATH[,KEY=VALUE...])... [--config FILE]",
        "pvrun call [OPTIONS] GUEST NAME [INPUT|-]",
        "pvrun snapshot -o FILE",
    ] {
        assert!(readme.contains(l), "README lacks `{l}`");
    }
}

#[test]
fn run_is_explicit_or_implicit() {
    let elf = guest("hello");
    let elf = elf.to_str().unwrap();
    for form in [&["run", elf][..], &[elf]] {
        let out = Command::new(common::pvrun_bin())
            .args(form)
            .args(["--", "x", "--exit", "7"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(7), "{form:?}: {stdout}");
        assert!(stdout.contains("arg[1]=x\n"), "{stdout}");
    }
    // Options before the guest, with and without `run`.
    let r = Command::new(common::pvrun_bin())
        .args(["--env", "GREETING=hey", elf])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&r.stdout).contains("GREETING=hey"));
}

#[test]
fn memory_option_changes_the_guest_heap() {
    // 4 MiB fits the heap of a 64 MiB guest but not of a 14 MiB one (2 MiB of heap).
    let elf = guest("compute");
    assert_eq!(pvrun(&elf, &["--mem", "64M"], &["4"]).status, 0);
    let small = pvrun(&elf, &["--mem", "14M"], &["4"]);
    assert_eq!(small.status, 101, "{}", small.stderr);
    assert!(
        small.stderr.contains("memory allocation of"),
        "{}",
        small.stderr
    );
}

/// Runs `pvrun hello` with `device` as the KVM device; checks a one-line host error.
fn with_kvm_device(device: &str) -> String {
    let out = Command::new(common::pvrun_bin())
        .env("PVRUN_KVM_DEVICE", device)
        .arg(guest("hello"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    stderr
}

#[test]
fn missing_kvm_is_one_clear_line() {
    let e = with_kvm_device("/nonexistent/kvm");
    assert!(
        e.contains("/nonexistent/kvm does not exist: KVM is not available"),
        "{e}"
    );
}

#[test]
fn a_device_that_is_not_kvm_is_one_clear_line() {
    let e = with_kvm_device("/dev/null");
    assert!(
        e.contains("cannot open /dev/null: it is not a KVM device"),
        "{e}"
    );
}

#[test]
fn the_smallest_guest_boots_at_the_documented_minimum_and_sizes_echo_the_option() {
    let r = pvrun(&guest("hello"), &["--mem", "14M"], &[]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    let e = host_error(&["--mem", "3M", guest("hello").to_str().unwrap()]);
    assert!(e.contains("3M") && e.contains("14M"), "{e}");
}

/// Runs `pvrun call OPTS GUEST NAME [INPUT]` with `stdin` on its standard input.
fn call(
    opts: &[&str],
    guest_name: &str,
    name: &str,
    input: Option<&str>,
    stdin: &[u8],
) -> (i32, Vec<u8>, String) {
    use std::io::Write;
    let mut child = Command::new(common::pvrun_bin())
        .arg("call")
        .args(opts)
        .arg(guest(guest_name))
        .arg(name)
        .args(input)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut i = child.stdin.take().unwrap();
    let _ = i.write_all(stdin);
    drop(i);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().expect("pvrun call was killed"),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn call_prints_the_output_raw_and_maps_errors_to_statuses() {
    let (st, out, err) = call(&[], "functions", "upper", Some("hello"), b"");
    assert_eq!((st, out.as_slice()), (0, &b"HELLO"[..]), "{err}");
    // `-` reads stdin; the output is written unchanged (no newline added).
    let (st, out, err) = call(&[], "functions", "sha256", Some("-"), b"abc");
    assert_eq!(st, 0, "{err}");
    assert_eq!(
        out,
        b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let (st, out, _) = call(&[], "badfunctions", "echo", None, b"ignored");
    assert_eq!((st, out.len()), (0, 0), "no INPUT is empty input");
    // The function's own error: status 1, its message on stderr.
    let (st, out, err) = call(&[], "functions", "json-transform", Some("[1]"), b"");
    assert_eq!(st, 1, "{err}");
    assert!(out.is_empty());
    assert_eq!(
        err.trim_end(),
        "pvrun: function `json-transform` failed: expected a JSON object, found an array"
    );
    // No such function: 125, naming what the guest exports.
    let (st, _, err) = call(&[], "functions", "nope", None, b"");
    assert_eq!(st, 125, "{err}");
    assert!(
        err.contains("exports no function `nope`") && err.contains("upper, sha256"),
        "{err}"
    );
    // Panics, crashes and timeouts get the run statuses.
    let (st, _, err) = call(&[], "badfunctions", "panic", None, b"");
    assert_eq!(st, 101, "{err}");
    assert!(err.contains("function panicked on purpose"), "{err}");
    let (st, _, err) = call(&[], "badfunctions", "fault", None, b"");
    assert_eq!(st, 139, "{err}");
    assert!(err.starts_with("pvrun: guest crashed: page fault"), "{err}");
    let (st, _, err) = call(&["--timeout", "0.3"], "badfunctions", "spin", None, b"");
    assert_eq!(st, 124, "{err}");
    assert!(err.contains("call timed out after"), "{err}");
    // Input beyond the guest's limit (1 MiB) from stdin.
    let (st, _, err) = call(
        &[],
        "badfunctions",
        "echo",
        Some("-"),
        &vec![b'x'; (1 << 20) + 100],
    );
    assert_eq!(st, 125, "{err}");
    assert!(err.contains("larger than"), "{err}");
    // A program guest is not a function guest.
    let (st, _, err) = call(&[], "hello", "f", None, b"");
    assert_eq!(st, 125, "{err}");
    assert!(err.contains("not a function guest"), "{err}");
}

#[test]
fn running_a_function_guest_says_how_to_serve_or_call_it() {
    let e = host_error(&[guest("functions").to_str().unwrap()]);
    assert!(
        e.contains("is a function guest")
            && e.contains("pvrun serve --listen ADDR")
            && e.contains("pvrun call "),
        "{e}"
    );
}

/// Whether a process with exactly this command line is running.
fn process_running(cmdline: &[&str]) -> bool {
    let want: Vec<u8> = cmdline
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want))
}

#[test]
fn host_fn_commands_answer_fail_and_are_killed_on_timeout() {
    let greet = |opts: &[&str]| call(opts, "functions", "greet-via-host", Some("bob"), b"");
    let (st, out, err) = greet(&["--host-fn", "lookup=tr a-z A-Z"]);
    assert_eq!((st, out.as_slice()), (0, &b"hello, BOB"[..]), "{err}");
    // The command is executed directly: shell syntax in it is just arguments.
    let (st, out, err) = greet(&["--host-fn", "lookup=echo $HOME; id"]);
    assert_eq!(
        (st, out.as_slice()),
        (0, &b"hello, $HOME; id\n"[..]),
        "{err}"
    );
    // A failing command: the guest's call fails, the command's stderr is logged escaped.
    let (st, _, err) = greet(&[
        "--host-fn",
        "lookup=sh -c 'printf \"no\\033]0;x\\n\" >&2; exit 3'",
    ]);
    assert_eq!(st, 1, "{err}");
    assert!(
        err.contains("pvrun: host function `lookup` stderr: no\\u{1b}]0;x\n"),
        "{err}"
    );
    assert!(!err.contains('\x1b'), "{err}");
    assert!(
        err.contains(
            "failed: host function lookup: host function failed: the command exited with status 3"
        ),
        "{err}"
    );
    // A command that hangs (and a child holding its stdout) is killed at the timeout.
    let t = std::time::Instant::now();
    let (st, _, err) = greet(&[
        "--host-fn",
        "lookup=sh -c 'sleep 987; true'",
        "--host-fn-timeout",
        "0.5",
    ]);
    assert_eq!(st, 1, "{err}");
    assert!(
        err.contains("the command timed out after 0.500 s and was killed"),
        "{err}"
    );
    assert!(
        t.elapsed() < std::time::Duration::from_secs(8),
        "{:?}",
        t.elapsed()
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        !process_running(&["sleep", "987"]),
        "the hung command survived"
    );
    // A command never outlives the call's own --timeout.
    let t = std::time::Instant::now();
    let (st, _, err) = greet(&["--host-fn", "lookup=sleep 988", "--timeout", "0.4"]);
    assert_eq!(st, 124, "{err}");
    assert!(
        err.contains("host function `lookup` timed out after 0.400 s; killed"),
        "{err}"
    );
    assert!(err.contains("pvrun: call timed out after"), "{err}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(4),
        "{:?}",
        t.elapsed()
    );
    // Too much output.
    let (st, _, err) = greet(&["--host-fn", "lookup=yes", "--host-fn-max-output", "4K"]);
    assert_eq!(st, 1, "{err}");
    assert!(err.contains("larger than 4096 bytes"), "{err}");
    // A command that cannot start.
    let (st, _, err) = greet(&["--host-fn", "lookup=/nonexistent/lookup"]);
    assert_eq!(st, 1, "{err}");
    assert!(err.contains("cannot run `/nonexistent/lookup`"), "{err}");
}

/// A `pvrun serve` process on a free port; killed and reaped on drop.
struct Server {
    child: std::process::Child,
    addr: String,
}

impl Server {
    fn start(opts: &[&str], guest_name: &str) -> Server {
        use std::io::BufRead;
        let mut child = Command::new(common::pvrun_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--pool", "1"])
            .args(opts)
            .arg(guest(guest_name))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let mut server = Server {
            child,
            addr: String::new(),
        };
        while server.addr.is_empty() {
            line.clear();
            assert!(
                err.read_line(&mut line).unwrap() > 0,
                "pvrun serve exited before serving"
            );
            if let Some(rest) = line.split("http://").nth(1) {
                server.addr = rest.split('/').next().unwrap().to_string();
            }
        }
        // Keep draining the log so the server never blocks on it.
        std::thread::spawn(move || for _ in err.lines() {});
        server
    }

    /// `POST /NAME` with `body`; the status and the body of the answer.
    fn post(&self, name: &str, body: &[u8]) -> (u16, Vec<u8>) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        write!(
            s,
            "POST /{name} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(body).unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).unwrap();
        let text = String::from_utf8_lossy(&resp);
        let status = text.split(' ').nth(1).unwrap().parse().unwrap();
        let at = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        (status, resp[at..].to_vec())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn serve_with_host_fn_answers_greet_via_host() {
    let server = Server::start(&["--host-fn", "lookup=tr a-z A-Z"], "functions");
    assert_eq!(
        server.post("greet-via-host", b"world"),
        (200, b"hello, WORLD".to_vec())
    );
    drop(server);
    // A failing command is the function's error: 422.
    let server = Server::start(&["--host-fn", "lookup=false"], "functions");
    let (status, body) = server.post("greet-via-host", b"world");
    assert_eq!(status, 422, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("exited with status 1"));
}

#[test]
fn verbose_shows_segments_memory_map_devices_and_the_end() {
    let img = std::env::temp_dir().join(format!("pvrun-cli-v-{}.img", std::process::id()));
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let disk = format!("data={}", img.display());
    let r = pvrun(&guest("hello"), &["-v", "--disk", &disk], &[]);
    let _ = std::fs::remove_file(&img);
    assert_eq!(r.status, 0, "{}", r.stderr);
    for what in [
        "host_vmm::loader: ELF segment vaddr=0x200000",
        "perm=r-x",
        "host_vmm::builder: memory map start=0x200000",
        "kind=\"text\"",
        "kind=\"heap\"",
        "kind=\"stack\"",
        "host_vmm::devices: block device name=data",
        "guest run ended outcome=Exited(0)",
    ] {
        assert!(
            r.stderr.contains(what),
            "`{what}` missing from:\n{}",
            r.stderr
        );
    }
    // Quiet without -v and RUST_LOG; -vv adds the exits; RUST_LOG selects by module.
    let quiet = Command::new(common::pvrun_bin())
        .env_remove("RUST_LOG")
        .arg(guest("hello"))
        .output()
        .unwrap();
    assert!(
        quiet.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&quiet.stderr)
    );
    let vv = pvrun(&guest("hello"), &["-vv"], &[]);
    assert!(vv.stderr.contains("VM exit exit=1"), "{}", vv.stderr);
    let env = Command::new(common::pvrun_bin())
        .env("RUST_LOG", "host_vmm::loader=debug")
        .arg(guest("hello"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&env.stderr);
    assert!(
        e.contains("ELF segment") && !e.contains("memory map"),
        "{e}"
    );
}

#[test]
fn a_disk_the_guest_never_opens_gets_a_warning_and_a_used_one_does_not() {
    let dir = std::env::temp_dir().join(format!("pvrun-cli-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _c = Cleanup(dir.clone());
    let img = dir.join("a.img");
    std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
    let spare = dir.join("b.img");
    std::fs::write(&spare, vec![0u8; 1 << 20]).unwrap();
    let r = pvrun(
        &guest("kvstore"),
        &[
            "--disk",
            &format!("data={}", img.display()),
            "--disk",
            &format!("spare={}", spare.display()),
        ],
        &["put", "k", "v"],
    );
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert_eq!(
        r.stderr.trim_end(),
        "pvrun: warning: disk `spare` was attached but the guest never opened it (it sent no request)"
    );
}

#[test]
fn serve_verbose_logs_through_the_queue_so_a_stalled_stderr_never_holds_calls() {
    use std::io::BufRead;
    // -vv logs every exit of every call; stderr is read up to the banner, then never.
    let mut child = Command::new(common::pvrun_bin())
        .args(["serve", "-vv", "--listen", "127.0.0.1:0", "--pool", "1"])
        .arg(guest("badfunctions"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut server = Server {
        child,
        addr: String::new(),
    };
    let mut log = String::new();
    while server.addr.is_empty() {
        let mut l = String::new();
        assert!(err.read_line(&mut l).unwrap() > 0, "no banner: {log}");
        log.push_str(&l);
        if let Some(rest) = l.split("http://").nth(1) {
            server.addr = rest.split('/').next().unwrap().to_string();
        }
    }
    assert!(log.contains("host_vmm::builder: memory map"), "{log}");
    let t = std::time::Instant::now();
    for i in 0..1500 {
        let (status, body) = server.post("echo", b"x");
        assert_eq!((status, body.as_slice()), (200, &b"x"[..]), "call {i}");
        assert!(
            t.elapsed() < std::time::Duration::from_secs(60),
            "stalled at call {i}"
        );
    }
    drop(err);
}

/// `pvrun call GUEST NAME -` blocked in reading a stdin nobody closes still stops on
/// SIGINT, with status 130 (it used to retry the interrupted read and hang until EOF).
#[test]
fn call_reading_stdin_stops_on_sigint() {
    use std::time::{Duration, Instant};
    let mut child = Command::new(common::pvrun_bin())
        .arg("call")
        .arg(guest("functions"))
        .args(["upper", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Keep stdin open (never written, never closed) until the end of the test.
    let _stdin = child.stdin.take();
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pvrun call kept reading stdin after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted by signal 2"), "{err}");
    assert!(out.stdout.is_empty());
}
