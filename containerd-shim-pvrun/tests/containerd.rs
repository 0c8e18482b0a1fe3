//! The shim under a real, private containerd: its own config, root, state dir and socket
//! in a temporary directory (no system config touched), the shim found on its PATH.
//! Images come from `pvrun package`'s code and go in with `ctr images import`; guests run
//! with `ctr run --runtime io.containerd.pvrun.v1`. Needs root, /dev/kvm and containerd
//! (`apt-get install containerd`; `.ci/run` installs it). Everything a test starts is
//! stopped and removed by guards, also when it fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const RUNTIME: &str = "io.containerd.pvrun.v1";
const NS: &str = "pvrun-test";

fn shim_bin() -> &'static str {
    env!("CARGO_BIN_EXE_containerd-shim-pvrun-v1")
}

/// Example guest `name`, built once (release).
fn guest(name: &str) -> PathBuf {
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

fn hello() -> PathBuf {
    guest("hello")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A private containerd, stopped (with every task, container, image and mount it made)
/// on drop.
struct Containerd {
    dir: PathBuf,
    sock: PathBuf,
    daemon: Option<Child>,
    /// Container ids used (their shims' sockets are checked and removed at the end).
    ids: std::sync::Mutex<Vec<String>>,
}

impl Containerd {
    fn start(tag: &str) -> Containerd {
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

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// The ttrpc socket the shim of container `id` listens on.
    fn shim_socket(&self, id: &str) -> PathBuf {
        let a = containerd_shim::socket_address(self.sock.to_str().unwrap(), NS, id);
        PathBuf::from(a.strip_prefix("unix://").unwrap())
    }

    /// Shim processes serving this containerd (by their `-address`).
    fn shims(&self) -> Vec<i32> {
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

    fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("-a").arg(&self.sock).arg("-n").arg(NS).args(args);
        cmd.stdin(Stdio::null());
        cmd
    }

    fn ctr(&self, args: &[&str]) -> Output {
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
    fn run(&self, extra: &[&str], image: &str, id: &str, args: &[&str]) -> Output {
        let fifo = self.dir.join("fifo");
        let fifo = fifo.to_str().unwrap();
        let mut a = vec!["run", "--runtime", RUNTIME, "--rm", "--fifo-dir", fifo];
        a.extend_from_slice(extra);
        a.push(image);
        a.push(id);
        a.extend_from_slice(args);
        self.ids.lock().unwrap().push(id.to_string());
        self.ctr(&a)
    }

    /// Packages `elf` with `pvrun package`'s code and imports it; returns the reference.
    fn import_guest(&self, elf: &Path, name: &str) -> String {
        let out = self.dir.join(format!("{name}.tar"));
        let args = pvrun_oci::cli::PackageArgs {
            output: out.clone(),
            format: Some(pvrun_oci::Format::OciArchive),
            name: Some(format!("pvrun-test/{name}")),
            kind: None,
            env: vec!["GREETING=from-image".into()],
            cmd: vec![],
        };
        let line = pvrun_oci::cli::run(elf, args, &host_vmm::cli::package::inspect)
            .expect("pvrun package");
        self.import(&out);
        line.split_whitespace().next().unwrap().to_string()
    }

    fn import(&self, tar: &Path) {
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

#[test]
fn hello_runs_with_args_env_output_and_exit_code() {
    let c = Containerd::start("hello");
    let image = c.import_guest(&hello(), "hello");
    assert_eq!(image, "docker.io/pvrun-test/hello:latest");
    // The image's entrypoint and env.
    let o = c.run(&[], &image, "hello-default", &[]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{}\n{}",
        text(&o.stdout),
        text(&o.stderr),
        c.log()
    );
    let out = text(&o.stdout);
    assert!(out.contains("Hello from pvrun!"), "{out}");
    assert!(out.contains("arg[0]=/hello"), "{out}");
    assert!(out.contains("argc=1"), "{out}");
    assert!(out.contains("GREETING=from-image"), "{out}");
    // Args and env given to ctr; the exit code is the task's.
    let o = c.run(
        &["--env", "GREETING=from-ctr"],
        &image,
        "hello-args",
        &["/hello", "one two", "--exit", "7"],
    );
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(7), "{out}{}", text(&o.stderr));
    assert!(out.contains("arg[1]=one two"), "{out}");
    assert!(out.contains("GREETING=from-ctr"), "{out}");
    // A memory limit the guest fits in runs; one below its minimum fails with the reason.
    let o = c.run(&["--memory-limit", "33554432"], &image, "hello-32m", &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = c.run(&["--memory-limit", "8388608"], &image, "hello-8m", &[]);
    assert_ne!(o.status.code(), Some(0));
    let err = text(&o.stderr);
    assert!(
        err.contains("memory limit 8M is below what this guest needs (14M)"),
        "{err}"
    );
    // Nothing left behind by --rm: no container, no shim, no shim socket.
    assert_eq!(text(&c.ctr(&["containers", "ls", "-q"]).stdout).trim(), "");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.shims().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        c.shims(),
        Vec::<i32>::new(),
        "shims outlived their containers"
    );
    for id in ["hello-default", "hello-args", "hello-32m", "hello-8m"] {
        assert!(!c.shim_socket(id).exists(), "socket of {id} left behind");
    }
}

#[test]
fn kill_stops_a_long_running_guest_and_two_run_at_once() {
    let c = Containerd::start("kill");
    let image = c.import_guest(&hello(), "hello");
    let fifo = c.dir.join("fifo");
    let spawn = |id: &str, args: &[&str]| {
        let mut a = vec![
            "run",
            "--runtime",
            RUNTIME,
            "--rm",
            "--fifo-dir",
            fifo.to_str().unwrap(),
            &image,
            id,
        ];
        a.extend_from_slice(args);
        c.ids.lock().unwrap().push(id.to_string());
        c.ctr_cmd(&a)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let started = Instant::now();
    let long = spawn("sleeper", &["/hello", "--sleep", "60000"]);
    let a = spawn("quick-a", &["/hello", "a", "--sleep", "300", "--exit", "3"]);
    let b = spawn("quick-b", &["/hello", "b", "--sleep", "300", "--exit", "4"]);
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert_eq!(a.status.code(), Some(3), "{}", text(&a.stderr));
    assert_eq!(b.status.code(), Some(4), "{}", text(&b.stderr));
    assert!(text(&a.stdout).contains("arg[1]=a") && text(&a.stdout).contains("slept-ok"));
    assert!(text(&b.stdout).contains("arg[1]=b") && text(&b.stdout).contains("slept-ok"));

    // The sleeper is running: the task is listed with its guest process.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ls = text(&c.ctr(&["tasks", "ls"]).stdout);
        if ls
            .lines()
            .any(|l| l.starts_with("sleeper") && l.contains("RUNNING"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "sleeper never ran: {ls}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let ps = text(&c.ctr(&["tasks", "ps", "sleeper"]).stdout);
    assert_eq!(ps.lines().count(), 2, "one process: {ps}");
    let metrics = c.ctr(&["tasks", "metrics", "sleeper"]);
    assert!(metrics.status.success(), "{}", text(&metrics.stderr));

    // SIGTERM stops the guest cleanly: 143, as `pvrun` documents.
    let k = c.ctr(&["tasks", "kill", "-s", "SIGTERM", "sleeper"]);
    assert!(k.status.success(), "{}", text(&k.stderr));
    let long = long.wait_with_output().unwrap();
    assert_eq!(long.status.code(), Some(143), "{}", text(&long.stderr));
    assert!(
        text(&long.stderr).contains("interrupted by signal 15"),
        "{}",
        text(&long.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(40));

    // A Kubernetes pod sandbox (CRI's annotation; its image is the pause image, here any
    // image) holds the pod until SIGTERM, then exits 0 like `pause`.
    let pause = c
        .ctr_cmd(&[
            "run",
            "--runtime",
            RUNTIME,
            "--rm",
            "--fifo-dir",
            fifo.to_str().unwrap(),
            "--annotation",
            "io.kubernetes.cri.container-type=sandbox",
            &image,
            "pod-sandbox",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.ids.lock().unwrap().push("pod-sandbox".into());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ls = text(&c.ctr(&["tasks", "ls"]).stdout);
        if ls
            .lines()
            .any(|l| l.starts_with("pod-sandbox") && l.contains("RUNNING"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "sandbox never ran: {ls}");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        c.ctr(&["tasks", "kill", "-s", "SIGTERM", "pod-sandbox"])
            .status
            .success()
    );
    let pause = pause.wait_with_output().unwrap();
    assert_eq!(pause.status.code(), Some(0), "{}", text(&pause.stderr));
}

#[test]
fn non_pvrun_images_fail_with_a_clear_reason() {
    let c = Containerd::start("refuse");
    // An image whose entrypoint is a host program (a Debian PIE), packaged with made-up
    // pvrun labels: the shim checks the ELF itself, not the labels.
    let fake = |src: &Path, name: &str, bytes: &[u8]| {
        let tar = c.dir.join(format!("{name}.tar"));
        let info = pvrun_oci::GuestInfo {
            abi_version: 3,
            kind: pvrun_oci::GuestKind::Program,
            min_mem: 14 << 20,
            default_mem: 64 << 20,
            devices: vec![],
        };
        let opts = pvrun_oci::PackageOptions {
            name: Some(format!("pvrun-test/{name}")),
            ..Default::default()
        };
        let p = pvrun_oci::package(src, bytes, info, &tar, pvrun_oci::Format::OciArchive, &opts)
            .unwrap();
        c.import(&tar);
        (p.reference, p.guest_path)
    };
    let (host_prog, path) = fake(
        Path::new("/bin/true"),
        "true",
        &std::fs::read("/bin/true").unwrap(),
    );
    let o = c.run(&[], &host_prog, "not-pvrun", &[]);
    assert_ne!(o.status.code(), Some(0));
    let err = text(&o.stderr);
    eprintln!("what ctr says for a host program: {err}");
    assert!(err.contains("not a runnable pvrun image"), "{err}");
    assert!(err.contains("position-independent"), "{err}");
    assert!(err.contains(&path), "{err}");
    let script = c.dir.join("script");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let (sh, _) = fake(&script, "script", b"#!/bin/sh\necho hi\n");
    let o = c.run(&[], &sh, "not-elf", &[]);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        text(&o.stderr).contains("is not an ELF guest"),
        "{}",
        text(&o.stderr)
    );
    // A command that is not in the image at all.
    let image = c.import_guest(&hello(), "hello");
    let o = c.run(&[], &image, "no-such", &["/bin/sh", "-c", "true"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        text(&o.stderr).contains("`/bin/sh` is not in the image"),
        "{}",
        text(&o.stderr)
    );
    // Function guests are not served by the shim yet: a clear refusal.
    let f = c.import_guest(&guest("functions"), "functions");
    let o = c.run(&[], &f, "function", &[]);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        text(&o.stderr).contains("function guest"),
        "{}",
        text(&o.stderr)
    );
}

fn ip(args: &[&str]) {
    let o = Command::new("ip")
        .args(args)
        .output()
        .expect("`ip` is needed (iproute2)");
    assert!(o.status.success(), "ip {args:?}: {}", text(&o.stderr));
}

/// A pod's network namespace prepared like a CNI plugin would (a veth pair: `eth0` with
/// 10.77.20.2/24 and a default route in the pod, the peer with 10.77.20.1/24 in a
/// namespace of its own standing for the node), both removed on drop.
struct PodNetns {
    pod: String,
    peer: String,
}

impl PodNetns {
    fn new() -> PodNetns {
        let id = std::process::id();
        let n = PodNetns {
            pod: format!("pvt-pod-{id}"),
            peer: format!("pvt-node-{id}"),
        };
        for ns in [&n.pod, &n.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&[
            "-n", &n.peer, "link", "add", "veth-pod", "type", "veth", "peer", "name", "eth0",
            "netns", &n.pod,
        ]);
        ip(&[
            "-n",
            &n.peer,
            "addr",
            "add",
            "10.77.20.1/24",
            "dev",
            "veth-pod",
        ]);
        ip(&["-n", &n.peer, "link", "set", "veth-pod", "up"]);
        ip(&["-n", &n.pod, "addr", "add", "10.77.20.2/24", "dev", "eth0"]);
        ip(&["-n", &n.pod, "link", "set", "eth0", "up"]);
        ip(&["-n", &n.pod, "route", "add", "default", "via", "10.77.20.1"]);
        n
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.pod)
    }

    fn in_pod(&self, tool: &str, args: &[&str]) -> String {
        let o = Command::new("ip")
            .args(["netns", "exec", &self.pod, tool])
            .args(args)
            .output()
            .unwrap();
        text(&o.stdout)
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

#[test]
fn a_network_guest_answers_on_the_pod_address_through_the_tc_redirect() {
    let net = PodNetns::new();
    let c = Containerd::start("net");
    let image = c.import_guest(&guest("http-hello"), "http-hello");
    let fifo = c.dir.join("fifo");
    let with_ns = format!("network:{}", net.path());
    c.ids.lock().unwrap().push("web".into());
    let web = c
        .ctr_cmd(&[
            "run",
            "--runtime",
            RUNTIME,
            "--rm",
            "--fifo-dir",
            fifo.to_str().unwrap(),
            "--with-ns",
            &with_ns,
            &image,
            "web",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // curl from the node's side of the veth, to the pod's address.
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let o = Command::new("ip")
            .args([
                "netns",
                "exec",
                &net.peer,
                "curl",
                "-s",
                "-m",
                "2",
                "http://10.77.20.2/",
            ])
            .output()
            .expect("curl is needed");
        if o.status.success() {
            break text(&o.stdout);
        }
        assert!(
            Instant::now() < deadline,
            "the guest never answered on 10.77.20.2"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(body, "Hello from pvrun!\n");
    // The guest has the pod interface's MAC: what the node resolved 10.77.20.2 to.
    let pod_mac = net.in_pod("cat", &["/sys/class/net/eth0/address"]);
    let neigh = Command::new("ip")
        .args(["-n", &net.peer, "neigh", "show", "10.77.20.2"])
        .output()
        .unwrap();
    assert!(
        text(&neigh.stdout).contains(pod_mac.trim()),
        "{} vs {pod_mac}",
        text(&neigh.stdout)
    );
    // The TAP lives in the pod's namespace while the guest runs ...
    let links = net.in_pod("ip", &["-o", "link", "show"]);
    assert!(links.contains("pvtap"), "{links}");

    assert!(
        c.ctr(&["tasks", "kill", "-s", "SIGTERM", "web"])
            .status
            .success()
    );
    let web = web.wait_with_output().unwrap();
    assert_eq!(web.status.code(), Some(143), "{}", text(&web.stderr));
    assert!(
        text(&web.stdout).contains("listening on 10.77.20.2:80"),
        "{}",
        text(&web.stdout)
    );
    // ... and is gone after delete, with the pod's interface as it was.
    let deadline = Instant::now() + Duration::from_secs(10);
    while net.in_pod("ip", &["-o", "link", "show"]).contains("pvtap") {
        assert!(Instant::now() < deadline, "TAP left behind");
        std::thread::sleep(Duration::from_millis(50));
    }
    let qdisc = net.in_pod("tc", &["qdisc", "show", "dev", "eth0"]);
    assert!(!qdisc.contains("ingress"), "{qdisc}");
}
