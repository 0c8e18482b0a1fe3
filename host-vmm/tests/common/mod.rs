//! Shared test support: builds the example guests once per test binary and runs them.
#![allow(dead_code)]

pub mod prom;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

/// The `pvrun` runner binary. It needs the `cli` feature, which `cargo test` from the
/// workspace root turns on (cargo-pvrun depends on it); alone, use
/// `cargo test -p host-vmm --features cli` (without it the binary says so and exits 125).
pub fn pvrun_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pvrun")
}

/// The guest-examples workspace.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-examples")
}

/// Builds (once) and returns the ELF of example guest `name` (release profile).
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut map = built.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = map.get(name) {
        return p.clone();
    }
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests boot real guests and need /dev/kvm"
    );
    let req = guest_build::BuildRequest {
        manifest_path: Some(examples_dir().join("Cargo.toml")),
        package: Some(name.to_string()),
        release: true,
        quiet: true,
        ..Default::default()
    };
    let elf = guest_build::build(&req)
        .unwrap_or_else(|e| panic!("building guest {name}: {e:#}"))
        .elf;
    map.insert(name.to_string(), elf.clone());
    elf
}

/// A fresh temporary directory (`pvrun-TAG-PID` under the system's), removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("pvrun-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Output of one `pvrun` process.
pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            status: o.status.code().expect("pvrun was killed by a signal"),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs the `pvrun` binary with `opts` before the guest and `args` after `--`.
pub fn pvrun(elf: &Path, opts: &[&str], args: &[&str]) -> Run {
    let out = Command::new(pvrun_bin())
        .args(opts)
        .arg(elf)
        .arg("--")
        .args(args)
        .output()
        .expect("cannot run pvrun");
    out.into()
}

/// Runs the `misbehave` guest in mode `mode` with a safety timeout.
pub fn misbehave(args: &[&str]) -> Run {
    pvrun(&guest("misbehave"), &["--timeout", "20"], args)
}

/// A network namespace for a test, removed (with its devices) on drop. Traffic in it never
/// leaves it.
pub struct Netns {
    pub name: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("the `ip` command (iproute2) is needed");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// Creates namespace `pvrun-TAG-PID` with loopback up.
    pub fn new(tag: &str) -> Netns {
        let name = format!("pvt-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// Adds TAP device `dev`, with address `addr` (CIDR) unless empty, and brings it up.
    pub fn tap(&self, dev: &str, addr: &str) {
        ip(&["-n", &self.name, "tuntap", "add", "dev", dev, "mode", "tap"]);
        if !addr.is_empty() {
            ip(&["-n", &self.name, "addr", "add", addr, "dev", dev]);
        }
        ip(&["-n", &self.name, "link", "set", dev, "up"]);
    }

    /// Adds bridge `br` with address `addr` and enslaves `ports`.
    pub fn bridge(&self, br: &str, addr: &str, ports: &[&str]) {
        ip(&["-n", &self.name, "link", "add", br, "type", "bridge"]);
        ip(&["-n", &self.name, "addr", "add", addr, "dev", br]);
        ip(&["-n", &self.name, "link", "set", br, "up"]);
        for p in ports {
            ip(&["-n", &self.name, "link", "set", p, "master", br]);
        }
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `f` on a thread that has entered the namespace (threads it spawns inherit it).
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let ns = std::fs::File::open(&path).expect("open the namespace");
            // SAFETY: setns on a namespace descriptor affects only this thread.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("the thread in the namespace panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A guest running inside a namespace, its output read line by line; killed on drop.
pub struct NsGuest {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl NsGuest {
    /// Starts guest `name` in `ns` with `pvrun` options `opts` and guest arguments `args`.
    pub fn start(ns: &Netns, name: &str, opts: &[&str], args: &[&str]) -> NsGuest {
        use std::io::BufRead;
        let mut child = ns
            .command(pvrun_bin())
            .args(opts)
            .arg(guest(name))
            .arg("--")
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        NsGuest { child, lines }
    }

    /// Waits for a line containing `what` (up to 20 s); returns it.
    pub fn wait_for(&self, what: &str) -> String {
        loop {
            match self.lines.recv_timeout(std::time::Duration::from_secs(20)) {
                Ok(l) if l.contains(what) => return l,
                Ok(_) => {}
                Err(_) => panic!("the guest never printed `{what}`"),
            }
        }
    }
}

impl Drop for NsGuest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
