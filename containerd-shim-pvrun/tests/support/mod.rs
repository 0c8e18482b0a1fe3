//! Shared by the containerd tests and the `ctr run` benchmark: a private containerd
//! (its own config, root, state dir and sockets in a temporary directory, the shim first
//! on its PATH), `ctr` bounded in time, images made with `pvrun package`'s code, and a
//! guard that removes everything.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const RUNTIME: &str = "io.containerd.pvrun.v1";
pub const NS: &str = "pvrun-test";

pub fn shim_bin() -> &'static str {
    env!("CARGO_BIN_EXE_containerd-shim-pvrun-v1")
}

/// Example guest `name`, built once (release).
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<std::sync::Mutex<std::collections::HashMap<String, PathBuf>>> =
        OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    built
        .entry(name.to_string())
        .or_insert_with(|| {
            assert!(
                Path::new("/dev/kvm").exists(),
                "these tests boot guests and need /dev/kvm"
            );
            let req = guest_build::BuildRequest {
                manifest_path: Some(
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-examples/Cargo.toml"),
                ),
                package: Some(name.into()),
                release: true,
                quiet: true,
                ..Default::default()
            };
            guest_build::build(&req).expect("building the guest").elf
        })
        .clone()
}

pub fn hello() -> PathBuf {
    guest("hello")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A private containerd, stopped (with every task, container, image and mount it made)
/// on drop.
pub struct Containerd {
    pub dir: PathBuf,
    pub sock: PathBuf,
    daemon: Option<Child>,
    /// Container ids used (their shims' sockets are checked and removed at the end).
    pub ids: std::sync::Mutex<Vec<String>>,
}

impl Containerd {
    pub fn start(tag: &str) -> Containerd {
        for tool in ["containerd", "ctr"] {
            assert!(
                Command::new(tool)
                    .arg("--version")
                    .output()
                    .is_ok_and(|o| o.status.success()),
                "`{tool}` is missing: apt-get install containerd (.ci/run does)"
            );
        }
        let dir = std::env::temp_dir().join(format!("pvrun-ctd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("fifo")).unwrap();
        let sock = dir.join("c.sock");
        let d = dir.display();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{d}/c.sock"
[ttrpc]
  address = "{d}/c.sock.ttrpc"
[debug]
  address = "{d}/debug.sock"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let shim_dir = Path::new(shim_bin()).parent().unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let daemon = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .env(
                "PATH",
                format!(
                    "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    shim_dir.display()
                ),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start containerd");
        let c = Containerd {
            dir,
            sock,
            daemon: Some(daemon),
            ids: Default::default(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if c.sock.exists() && c.ctr(&["version"]).status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not come up: {}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// The ttrpc socket the shim of container `id` listens on.
    pub fn shim_socket(&self, id: &str) -> PathBuf {
        let a = containerd_shim::socket_address(self.sock.to_str().unwrap(), NS, id);
        PathBuf::from(a.strip_prefix("unix://").unwrap())
    }

    /// Shim processes serving this containerd (by their `-address`).
    pub fn shims(&self) -> Vec<i32> {
        let want = self.sock.display().to_string();
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
                args.first()
                    .is_some_and(|a| a.ends_with(b"containerd-shim-pvrun-v1"))
                    && args
                        .windows(2)
                        .any(|w| w[0] == b"-address" && w[1] == want.as_bytes())
            })
            .collect()
    }

    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("-a").arg(&self.sock).arg("-n").arg(NS).args(args);
        cmd.stdin(Stdio::null());
        cmd
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        // Every ctr call is bounded: a hang fails the test instead of the suite.
        let mut child = self
            .ctr_cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run ctr");
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("ctr {args:?} hung");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait_with_output().unwrap()
    }

    /// `ctr run --rm` of `image` as container `id` with `extra` options and the command
    /// `args` (which replaces the image's entrypoint, as ctr does).
    pub fn run(&self, extra: &[&str], image: &str, id: &str, args: &[&str]) -> Output {
        self.run_on(RUNTIME, extra, image, id, args)
    }

    /// [`Containerd::run`] with another runtime (e.g. `io.containerd.runc.v2`).
    pub fn run_on(
        &self,
        runtime: &str,
        extra: &[&str],
        image: &str,
        id: &str,
        args: &[&str],
    ) -> Output {
        let fifo = self.dir.join("fifo");
        let fifo = fifo.to_str().unwrap();
        let mut a = vec!["run", "--runtime", runtime, "--rm", "--fifo-dir", fifo];
        a.extend_from_slice(extra);
        a.push(image);
        a.push(id);
        a.extend_from_slice(args);
        self.ids.lock().unwrap().push(id.to_string());
        self.ctr(&a)
    }

    /// Packages `elf` with `pvrun package`'s code and imports it; returns the reference.
    pub fn import_guest(&self, elf: &Path, name: &str) -> String {
        self.import_guest_as(elf, name, None)
    }

    /// [`Containerd::import_guest`] with `pvrun package --kind`.
    pub fn import_guest_as(
        &self,
        elf: &Path,
        name: &str,
        kind: Option<pvrun_oci::GuestKind>,
    ) -> String {
        let out = self.dir.join(format!("{name}.tar"));
        let args = pvrun_oci::cli::PackageArgs {
            output: out.clone(),
            format: Some(pvrun_oci::Format::OciArchive),
            name: Some(format!("pvrun-test/{name}")),
            kind,
            env: vec!["GREETING=from-image".into()],
            cmd: vec![],
        };
        let line = pvrun_oci::cli::run(elf, args, &host_vmm::cli::package::inspect)
            .expect("pvrun package");
        self.import(&out);
        line.split_whitespace().next().unwrap().to_string()
    }

    pub fn import(&self, tar: &Path) {
        let o = self.ctr(&["images", "import", tar.to_str().unwrap()]);
        assert!(
            o.status.success(),
            "import failed: {}{}",
            text(&o.stdout),
            text(&o.stderr)
        );
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Tasks, containers, images: what a failed test may have left.
        let list = |what: &[&str]| -> Vec<String> {
            text(&self.ctr(what).stdout)
                .lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                .collect()
        };
        if self.daemon.is_some() {
            for t in list(&["tasks", "ls"]) {
                let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", &t]);
                let deadline = Instant::now() + Duration::from_secs(5);
                while !self.ctr(&["tasks", "delete", &t]).status.success()
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            for c in list(&["containers", "ls"]) {
                let _ = self.ctr(&["containers", "delete", &c]);
            }
            for i in list(&["images", "ls", "-q"]).into_iter().chain(
                text(&self.ctr(&["images", "ls", "-q"]).stdout)
                    .lines()
                    .map(str::to_string),
            ) {
                let _ = self.ctr(&["images", "rm", &i]);
            }
        }
        if let Some(mut d) = self.daemon.take() {
            // SAFETY: SIGTERM to the containerd we started.
            unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while d.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
        // Shims a failed test left running (they would wait for a containerd that is gone).
        for pid in self.shims() {
            // SAFETY: SIGKILL to a shim of the containerd we started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for id in self.ids.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = std::fs::remove_file(self.shim_socket(id));
        }
        // Anything still mounted under our directory (snapshots, rootfs), deepest first.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| Path::new(m).starts_with(&self.dir))
            .collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            let c = std::ffi::CString::new(m).unwrap();
            // SAFETY: unmounting a path under our own temporary directory.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
