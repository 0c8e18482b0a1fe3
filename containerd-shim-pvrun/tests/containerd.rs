//! The shim under a real, private containerd: its own config, root, state dir and socket
//! in a temporary directory (no system config touched), the shim found on its PATH.
//! Images come from `pvrun package`'s code and go in with `ctr images import`; guests run
//! with `ctr run --runtime io.containerd.pvrun.v1`. Needs root, /dev/kvm and containerd
//! (`apt-get install containerd`; `.ci/run` installs it). Everything a test starts is
//! stopped and removed by guards, also when it fails.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Containerd, RUNTIME, guest, hello, text};

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
    // Every rootfs the shim mounted (overlay snapshots under the state dir) is unmounted.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let state = format!("{}/state/", c.dir.display());
    assert!(
        !mounts.lines().any(|l| l.contains(&state)),
        "a rootfs is still mounted: {mounts}"
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
    // A function guest with a PORT that is no port.
    let f = c.import_guest_as(
        &guest("functions"),
        "functions",
        Some(pvrun_oci::GuestKind::Function),
    );
    let o = c.run(&["--env", "PORT=eighty"], &f, "function", &[]);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        text(&o.stderr).contains("PORT `eighty` is not a port number"),
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
/// 10.77.NET.2/24 and a default route in the pod, the peer with 10.77.NET.1/24 in a
/// namespace of its own standing for the node), both removed on drop.
struct PodNetns {
    pod: String,
    peer: String,
}

impl PodNetns {
    /// Namespaces for test `tag`, on 10.77.`net`.0/24.
    fn new(tag: &str, net: u8) -> PodNetns {
        let id = std::process::id();
        let n = PodNetns {
            pod: format!("pvt-pod{tag}-{id}"),
            peer: format!("pvt-node{tag}-{id}"),
        };
        let addr = |h: u8| format!("10.77.{net}.{h}");
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
            &format!("{}/24", addr(1)),
            "dev",
            "veth-pod",
        ]);
        ip(&["-n", &n.peer, "link", "set", "veth-pod", "up"]);
        ip(&[
            "-n",
            &n.pod,
            "addr",
            "add",
            &format!("{}/24", addr(2)),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &n.pod, "link", "set", "eth0", "up"]);
        ip(&["-n", &n.pod, "route", "add", "default", "via", &addr(1)]);
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
    let net = PodNetns::new("w", 20);
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
        if Instant::now() > deadline {
            let _ = c.ctr(&["tasks", "kill", "-s", "SIGKILL", "web"]);
            let o = web.wait_with_output().unwrap();
            panic!(
                "the guest never answered on 10.77.20.2: {}{}",
                text(&o.stdout),
                text(&o.stderr)
            );
        }
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

#[test]
fn a_function_guest_serves_http_on_port_in_the_pod_namespace() {
    let net = PodNetns::new("f", 21);
    let c = Containerd::start("fn");
    let image = c.import_guest_as(
        &guest("functions"),
        "functions",
        Some(pvrun_oci::GuestKind::Function),
    );
    let fifo = c.dir.join("fifo");
    let with_ns = format!("network:{}", net.path());
    c.ids.lock().unwrap().push("fn".into());
    let server = c
        .ctr_cmd(&[
            "run",
            "--runtime",
            RUNTIME,
            "--rm",
            "--fifo-dir",
            fifo.to_str().unwrap(),
            "--with-ns",
            &with_ns,
            "--env",
            "PORT=9090",
            &image,
            "fn",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let curl = |args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", &net.peer, "curl", "-s", "-m", "5"])
            .args(args)
            .output()
            .expect("curl is needed")
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://10.77.21.2:9090/readyz",
        ]);
        if text(&o.stdout) == "200" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never ready: {}",
            text(&o.stdout)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = curl(&[
        "-X",
        "POST",
        "--data-binary",
        "hello pod",
        "http://10.77.21.2:9090/upper",
    ]);
    assert_eq!(text(&o.stdout), "HELLO POD");
    let o = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "POST",
        "http://10.77.21.2:9090/nope",
    ]);
    assert_eq!(text(&o.stdout), "404");
    // SIGTERM: calls in flight finish, the server exits 0.
    assert!(
        c.ctr(&["tasks", "kill", "-s", "SIGTERM", "fn"])
            .status
            .success()
    );
    let server = server.wait_with_output().unwrap();
    assert_eq!(server.status.code(), Some(0), "{}", text(&server.stderr));
}

/// A temporary directory removed on drop (also when the test fails).
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_bind_mount_at_pvrun_disks_is_the_guests_disk_and_keeps_data_between_runs() {
    let c = Containerd::start("disk");
    let image = c.import_guest(&guest("kvstore"), "kvstore");
    let dir = TempDir(std::env::temp_dir().join(format!("pvrun-shim-disk-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let img = dir.0.join("data.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mount = |src: &Path, opts: &str| {
        format!(
            "type=bind,src={},dst=/pvrun/disks/data,options=rbind:{opts}",
            src.display()
        )
    };
    let rw = mount(&img, "rw");
    // First run writes, second run (a new container, a new guest) reads it back.
    let o = c.run(
        &["--mount", &rw],
        &image,
        "kv-write",
        &[
            "/kvstore",
            "put",
            "alpha",
            "1",
            ";",
            "put",
            "beta",
            "two words",
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    assert!(
        text(&o.stdout).contains("recovered 0 records"),
        "{}",
        text(&o.stdout)
    );
    let o = c.run(
        &["--mount", &rw],
        &image,
        "kv-read",
        &["/kvstore", "get", "beta", ";", "count"],
    );
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}{}", text(&o.stderr));
    assert!(out.contains("recovered 2 records, 2 keys"), "{out}");
    assert!(out.contains("beta=two words\n2\n"), "{out}");
    // Read-only: the guest reads, its writes are refused, the image is unchanged.
    let before = std::fs::read(&img).unwrap();
    let o = c.run(
        &["--mount", &mount(&img, "ro")],
        &image,
        "kv-ro",
        &["/kvstore", "get", "alpha", ";", "put", "gamma", "3"],
    );
    let out = text(&o.stdout);
    assert!(out.contains("alpha=1\n"), "{out}{}", text(&o.stderr));
    assert_ne!(
        o.status.code(),
        Some(0),
        "a write to a read-only disk succeeded: {out}"
    );
    assert!(
        std::fs::read(&img).unwrap() == before,
        "the read-only image changed"
    );
    // No mount for the declared disk, or a directory as its source: the task fails with
    // the reason.
    let o = c.run(&[], &image, "kv-none", &["/kvstore", "count"]);
    assert_ne!(o.status.code(), Some(0));
    let err = text(&o.stderr);
    assert!(
        err.contains("this guest needs disk `data`: mount a disk image file at /pvrun/disks/data"),
        "{err}"
    );
    let o = c.run(
        &["--mount", &mount(&dir.0, "rw")],
        &image,
        "kv-dir",
        &["/kvstore", "count"],
    );
    assert_ne!(o.status.code(), Some(0));
    let err = text(&o.stderr);
    assert!(err.contains("is not a regular file"), "{err}");
}
