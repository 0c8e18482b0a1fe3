//! `cargo pvrun` builds guest crates like `cargo run` and boots them; its exit status is
//! the guest's.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-examples")
}

fn cargo_pvrun(dir: &Path, args: &[&str]) -> Output {
    assert!(
        Path::new("/dev/kvm").exists(),
        "cargo pvrun tests boot guests and need /dev/kvm"
    );
    Command::new(env!("CARGO_BIN_EXE_cargo-pvrun"))
        .arg("pvrun")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("cannot run cargo-pvrun")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn runs_the_guest_crate_in_the_current_directory_with_args_env_and_exit_code() {
    let out = cargo_pvrun(
        &examples().join("hello"),
        &[
            "--release",
            "--env",
            "GREETING=hi",
            "--",
            "x",
            "--exit",
            "5",
        ],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(
        stdout.starts_with("Hello from pvrun!\nargc=4\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("arg[1]=x\n") && stdout.contains("GREETING=hi\n"),
        "{stdout}"
    );
    // Cargo's own progress stays visible, followed by our Running line: a command that,
    // pasted into a shell, does the same.
    assert!(stderr.contains("Finished"), "{stderr}");
    let line = running_line(&stderr);
    assert!(
        line.contains("GREETING=hi") && line.ends_with("-- x --exit 5"),
        "{line}"
    );
    let words = shlex::split(&line).expect("the Running line is shell syntax");
    let again = Command::new(&words[0])
        .args(&words[1..])
        .current_dir(examples().join("hello"))
        .output()
        .unwrap();
    assert_eq!(
        again.status.code(),
        Some(5),
        "{line}: {}",
        text(&again.stderr)
    );
    // The same output, but for the random bytes and the clock.
    let stable = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| !l.starts_with("random:") && !l.starts_with("wall:"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(stable(&text(&again.stdout)), stable(&stdout), "{line}");
}

/// The command in cargo pvrun's `     Running `...`` line.
fn running_line(stderr: &str) -> String {
    let l = stderr
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("Running `"))
        .unwrap_or_else(|| panic!("no Running line in: {stderr}"));
    let line = l.strip_suffix('`').unwrap().to_string();
    // `cargo pvrun ...` is pasteable as such; the test runs it through this binary.
    match line.strip_prefix("cargo pvrun ") {
        Some(rest) => format!("{} pvrun {rest}", env!("CARGO_BIN_EXE_cargo-pvrun")),
        None => line,
    }
}

#[test]
fn selects_a_package_with_p_from_the_workspace_root() {
    let out = cargo_pvrun(
        &examples(),
        &["-q", "--release", "-p", "misbehave", "--", "exit", "9"],
    );
    assert_eq!(out.status.code(), Some(9), "{}", text(&out.stderr));
    assert!(
        out.stderr.is_empty(),
        "quiet run printed: {}",
        text(&out.stderr)
    );
}

#[test]
fn panics_crashes_and_timeouts_become_the_exit_status() {
    let root = examples();
    let run = |args: &[&str]| {
        cargo_pvrun(
            &root,
            &[&["-q", "--release", "-p", "misbehave"], args].concat(),
        )
    };
    assert_eq!(run(&["--", "panic"]).status.code(), Some(101));
    assert_eq!(run(&["--", "null-read"]).status.code(), Some(139));
    assert_eq!(
        run(&["--timeout", "0.2", "--", "loop"]).status.code(),
        Some(124)
    );
}

#[test]
fn a_workspace_with_several_guests_needs_p() {
    let out = cargo_pvrun(&examples(), &["-q"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("several guest packages") && stderr.contains("-p NAME"),
        "{stderr}"
    );
}

#[test]
fn a_crate_that_is_not_a_guest_gets_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("pvrun-not-a-guest-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(
        dir.join("Cargo.toml"),
        "[package]\nname = \"plain\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[workspace]\n",
    )
    .unwrap();
    std::fs::write(dir.join("src/main.rs"), "fn main() {}\n").unwrap();
    let out = cargo_pvrun(&dir, &[]);
    let stderr = text(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("package `plain` is not a pvrun guest"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn outside_any_crate_says_so() {
    let out = cargo_pvrun(Path::new("/"), &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("could not find `Cargo.toml`"), "{stderr}");
}

#[test]
fn package_builds_the_crate_and_writes_a_reproducible_oci_image() {
    let dir = std::env::temp_dir().join(format!("cargo-pvrun-package-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let mut digests = Vec::new();
    for name in ["a.tar", "b.tar"] {
        let out = dir.join(name);
        let o = cargo_pvrun(
            &examples().join("hello"),
            &[
                "package",
                "-q",
                "-o",
                out.to_str().unwrap(),
                "--",
                "--exit",
                "2",
            ],
        );
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        let line = text(&o.stdout);
        assert!(
            line.starts_with("docker.io/pvrun/hello:latest sha256:"),
            "{line}"
        );
        assert!(line.contains("(program guest, ABI v"), "{line}");
        digests.push(line.split_whitespace().nth(1).unwrap().to_string());
        assert!(out.is_file());
    }
    assert_eq!(digests[0], digests[1]);
    assert_eq!(
        std::fs::read(dir.join("a.tar")).unwrap(),
        std::fs::read(dir.join("b.tar")).unwrap()
    );
    // A build failure is one error and 125, and writes nothing.
    let o = cargo_pvrun(
        &dir,
        &[
            "package",
            "-q",
            "--manifest-path",
            "/nonexistent/Cargo.toml",
            "-o",
            "x.tar",
        ],
    );
    assert_eq!(o.status.code(), Some(125), "{}", text(&o.stderr));
    assert!(!dir.join("x.tar").exists());
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn build_prints_the_elf_path_or_one_json_object() {
    let out = cargo_pvrun(
        &examples(),
        &["build", "-q", "--release", "-p", "functions"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let path = text(&out.stdout);
    let path = Path::new(path.trim_end());
    assert!(path.is_absolute() && path.is_file(), "{path:?}");
    assert!(path.ends_with("release/functions"), "{path:?}");
    assert!(std::fs::read(path).unwrap().starts_with(b"\x7fELF"));
    for (pkg, kind) in [("functions", "function"), ("hello", "program")] {
        let out = cargo_pvrun(
            &examples(),
            &[
                "build",
                "-q",
                "--release",
                "-p",
                pkg,
                "--message-format",
                "json",
            ],
        );
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert_eq!(stdout.lines().count(), 1, "{stdout}");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(v["reason"], "guest-built");
        assert_eq!(v["package"], pkg);
        assert_eq!(v["kind"], kind, "{stdout}");
        assert!(Path::new(v["elf"].as_str().unwrap()).is_file(), "{stdout}");
    }
    let out = cargo_pvrun(&examples(), &["build", "--message-format", "xml"]);
    assert_eq!(out.status.code(), Some(125));
    // -v and --color reach cargo: it lists the fresh units, in colour.
    let out = cargo_pvrun(
        &examples(),
        &[
            "build",
            "-v",
            "--color",
            "always",
            "--release",
            "-p",
            "hello",
        ],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("Fresh") && stderr.contains("guest-sdk"),
        "{stderr}"
    );
    assert!(stderr.contains("\x1b["), "{stderr}");
    let out = cargo_pvrun(
        &examples(),
        &["build", "-q", "--color", "never", "-p", "hello"],
    );
    assert!(!text(&out.stderr).contains('\x1b'));
}

#[test]
fn call_builds_and_calls_a_function_and_run_points_at_serve_and_call() {
    let dir = examples().join("functions");
    let out = cargo_pvrun(&dir, &["call", "-q", "--release", "upper", "hello"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(out.stdout, b"HELLO");
    let out = cargo_pvrun(
        &dir,
        &[
            "call",
            "-q",
            "--release",
            "--host-fn",
            "lookup=tr a-z A-Z",
            "greet-via-host",
            "ann",
        ],
    );
    assert_eq!(
        (out.status.code(), out.stdout.as_slice()),
        (Some(0), &b"hello, ANN"[..]),
        "{}",
        text(&out.stderr)
    );
    let out = cargo_pvrun(&dir, &["call", "-q", "--release", "json-transform", "x"]);
    assert_eq!(out.status.code(), Some(1));
    let out = cargo_pvrun(&dir, &["-q", "--release"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("cargo pvrun serve --release --listen ADDR")
            && stderr.contains("cargo pvrun call --release NAME"),
        "{stderr}"
    );
}

#[test]
fn serve_builds_and_serves_over_http() {
    use std::io::{BufRead, Read, Write};
    let mut child = Command::new(env!("CARGO_BIN_EXE_cargo-pvrun"))
        .args([
            "pvrun",
            "serve",
            "--release",
            "--listen",
            "127.0.0.1:0",
            "--pool",
            "1",
        ])
        .args(["--host-fn", "lookup=tr a-z A-Z"])
        .current_dir(examples().join("functions"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let _guard = Kill(child);
    let mut addr = String::new();
    let mut log = String::new();
    while addr.is_empty() {
        let mut l = String::new();
        assert!(
            err.read_line(&mut l).unwrap() > 0,
            "exited before serving: {log}"
        );
        log.push_str(&l);
        if let Some(rest) = l.split("http://").nth(1) {
            addr = rest.split('/').next().unwrap().to_string();
        }
    }
    assert!(log.contains("Running `"), "{log}");
    std::thread::spawn(move || for _ in err.lines() {});
    let post = |name: &str, body: &str| {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        write!(s, "POST /{name} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r
    };
    let r = post("upper", "abc");
    assert!(
        r.starts_with("HTTP/1.1 200") && r.ends_with("\r\n\r\nABC"),
        "{r}"
    );
    let r = post("greet-via-host", "bo");
    assert!(
        r.starts_with("HTTP/1.1 200") && r.ends_with("\r\n\r\nhello, BO"),
        "{r}"
    );
}

/// `cargo pvrun new` with `template` flags in `root`, then `cargo pvrun ARGS` in the crate.
fn new_crate(root: &Path, name: &str, template: &[&str]) -> PathBuf {
    let out = cargo_pvrun(root, &[&["new", name][..], template].concat());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let dir = root.join(name);
    for f in ["Cargo.toml", "src/main.rs", "README.md", ".gitignore"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    // Inside this repository the SDK is a path dependency on it.
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../guest-sdk")
        .canonicalize()
        .unwrap();
    assert!(
        manifest.contains(&format!("guest-sdk = {{ path = \"{}\" }}", sdk.display())),
        "{manifest}"
    );
    assert!(manifest.contains("panic = \"abort\""), "{manifest}");
    dir
}

#[test]
fn new_makes_crates_that_build_and_run_as_created() {
    // Created inside this repository (so the SDK is found by path), in a temporary
    // directory; one target directory for all four, so the SDK builds once.
    let root = TempDir(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("../target/new-test-{}", std::process::id())),
    );
    let _ = std::fs::remove_dir_all(&root.0);
    std::fs::create_dir_all(&root.0).unwrap();
    let target = root.0.join("target");
    let target = target.to_str().unwrap();
    let build = ["-q", "--target-dir", target, "-j", "2"];

    let dir = new_crate(&root.0, "my-guest", &[]);
    let out = cargo_pvrun(&dir, &[&build[..], &["--", "reader"]].concat());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello, reader, from my-guest\n");
    assert!(
        Path::new(target)
            .join("pvrun/x86_64-unknown-linux-gnu/debug/my-guest")
            .is_file()
    );
    // The crate is ready for `cargo pvrun test`: its one test passes in a guest.
    let out = cargo_pvrun(&dir, &[&["test"][..], &build].concat());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("test tests::greets_by_name ... ok")
            && stdout.contains("test result: ok. 1 passed; 0 failed;"),
        "{stdout}"
    );

    let dir = new_crate(&root.0, "my-fn", &["--function"]);
    let out = cargo_pvrun(&dir, &[&["call"][..], &build, &["hello", "you"]].concat());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(out.stdout, b"hello, you");
    let out = cargo_pvrun(&dir, &[&["call"][..], &build, &["upper", "abc"]].concat());
    assert_eq!(out.stdout, b"ABC");
    let out = cargo_pvrun(&dir, &[&["test"][..], &build].concat());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("test result: ok. 1 passed; 0 failed;"),
        "{}",
        text(&out.stdout)
    );

    let dir = new_crate(&root.0, "my-disk", &["--disk"]);
    let img = root.0.join("data.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let disk = format!("data={}", img.display());
    let out = cargo_pvrun(&dir, &[&build[..], &["--disk", &disk]].concat());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "my-disk: wrote and read back 512 bytes of data (1048576 bytes)\n"
    );
    assert!(
        std::fs::read(&img)
            .unwrap()
            .starts_with(b"hello from my-disk")
    );

    let dir = new_crate(&root.0, "my-net", &["--net"]);
    let out = cargo_pvrun(&dir, &[&["build"][..], &build].concat());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // Without a NIC the host refuses it, naming the option.
    let out = cargo_pvrun(&dir, &build);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("--net eth0="), "{stderr}");
    // With a TAP in a network namespace it echoes TCP on port 7.
    net_guest_echoes(&dir, &build);

    // A second `new` at the same path, and a bad name, are one-line errors.
    let out = cargo_pvrun(&root.0, &["new", "my-guest"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("already exists"));
    let out = cargo_pvrun(&root.0, &["new", "9lives"]);
    assert_eq!(out.status.code(), Some(125));
    let out = cargo_pvrun(&root.0, &["new", "x", "--net", "--disk"]);
    assert_eq!(out.status.code(), Some(125));
}

/// Runs the `--net` template crate in `dir` in a network namespace with a TAP and checks
/// that it echoes over TCP. Needs root (like the host's network tests).
fn net_guest_echoes(dir: &Path, build: &[&str]) {
    use std::io::{BufRead, Read, Write};
    let ip = |args: &[&str]| {
        let out = Command::new("ip")
            .args(args)
            .output()
            .expect("the `ip` command (iproute2) is needed");
        assert!(out.status.success(), "ip {args:?}: {}", text(&out.stderr));
    };
    struct Netns(String);
    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        }
    }
    let ns = Netns(format!("pvt-new-{}", std::process::id()));
    let _ = Command::new("ip").args(["netns", "del", &ns.0]).output();
    ip(&["netns", "add", &ns.0]);
    ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
    ip(&["-n", &ns.0, "tuntap", "add", "dev", "tap0", "mode", "tap"]);
    ip(&["-n", &ns.0, "addr", "add", "10.0.0.1/24", "dev", "tap0"]);
    ip(&["-n", &ns.0, "link", "set", "tap0", "up"]);
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            env!("CARGO_BIN_EXE_cargo-pvrun"),
            "pvrun",
        ])
        .args(build)
        .args([
            "--offline",
            "--timeout",
            "60",
            "--net",
            "eth0=tap:tap0,ip=10.0.0.2/24",
        ])
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Kill(child);
    let mut out = std::io::BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("my-net: echo on "), "{line:?}");
    let path = format!("/var/run/netns/{}", ns.0);
    let echoed = std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on a namespace descriptor affects only this thread.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let timeout = std::time::Duration::from_secs(10);
        let mut s =
            std::net::TcpStream::connect_timeout(&"10.0.0.2:7".parse().unwrap(), timeout).unwrap();
        s.set_read_timeout(Some(timeout)).unwrap();
        s.write_all(b"ping over pvrun").unwrap();
        let mut buf = [0u8; 15];
        s.read_exact(&mut buf).unwrap();
        buf
    })
    .join()
    .unwrap();
    assert_eq!(&echoed, b"ping over pvrun");
}

#[test]
fn serve_under_cargo_shuts_down_cleanly_when_cargo_gets_sigterm() {
    use std::io::BufRead;
    // The real `cargo pvrun`: cargo finds this cargo-pvrun on PATH and runs it (on Unix
    // cargo replaces itself with it, so a supervisor's SIGTERM to cargo reaches serve).
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_cargo-pvrun"))
        .parent()
        .unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(cargo)
        .args([
            "pvrun",
            "serve",
            "-q",
            "--release",
            "--listen",
            "127.0.0.1:0",
            "--pool",
            "1",
        ])
        .env("PATH", path)
        .current_dir(examples().join("functions"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut addr = String::new();
    while addr.is_empty() {
        let mut l = String::new();
        if err.read_line(&mut l).unwrap() == 0 {
            let _ = child.kill();
            panic!("cargo pvrun serve exited before serving");
        }
        if let Some(rest) = l.split("http://").nth(1) {
            addr = rest.split('/').next().unwrap().to_string();
        }
    }
    // SIGTERM to the pid we started (not its process group), as a supervisor sends it.
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let mut rest = String::new();
    for l in err.lines().map_while(Result::ok) {
        rest.push_str(&l);
        rest.push('\n');
    }
    // The server's stderr reached end of file: it exited, after a clean shutdown.
    assert!(
        rest.contains("pvrun: got signal 15") && rest.contains("shut down cleanly"),
        "{rest}"
    );
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "still listening on {addr}"
    );
}

#[test]
fn gdb_debugs_a_guest_started_with_cargo_pvrun_gdb() {
    use std::io::BufRead;
    assert!(Path::new("/dev/kvm").exists(), "needs /dev/kvm");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cargo-pvrun"))
        .args([
            "pvrun",
            "--release",
            "-p",
            "debuggee",
            "--gdb",
            "127.0.0.1:0",
        ])
        .args(["--timeout", "60"])
        .current_dir(examples())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cannot run cargo-pvrun");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut child = Kill(child);
    // Cargo's own lines may come first.
    let (port, elf) = loop {
        let mut line = String::new();
        assert_ne!(err.read_line(&mut line).unwrap(), 0, "no waiting line");
        if let Some(rest) = line.strip_prefix("pvrun: waiting for gdb on 127.0.0.1:") {
            let port: u16 = rest.split(' ').next().unwrap().parse().unwrap();
            let elf = rest
                .split("(gdb ")
                .nth(1)
                .unwrap()
                .split(" -ex")
                .next()
                .unwrap();
            break (port, elf.to_string());
        }
    };
    let out = Command::new("timeout")
        .args(["60", "gdb", "-batch", "-nx", &elf])
        .args(["-ex", &format!("target remote :{port}")])
        .args([
            "-ex",
            "break debuggee::middle",
            "-ex",
            "continue",
            "-ex",
            "bt",
        ])
        .args(["-ex", "continue"])
        .output()
        .expect("gdb is needed (apt-get install gdb)");
    let text = text(&out.stdout);
    assert!(
        text.contains("Breakpoint 1, debuggee::middle (n=5)"),
        "{text}"
    );
    assert!(text.contains("debuggee::outer (n=4)"), "{text}");
    assert!(text.contains("exited with code 040"), "{text}");
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(32));
}
