//! The task service: containerd's create/start/state/wait/kill/delete/pids/stats calls
//! for the containers of this shim, each one a guest process (`guest.rs`).
//!
//! Exits: the `containerd-shim` crate reaps every child (the shim is a subreaper) and
//! reports `(pid, status)` to its monitor; one thread here takes those reports, records
//! the exit under the same lock `start` holds while it spawns (so an exit is never missed
//! or attributed before its pid is known), wakes `wait` and publishes `/tasks/exit`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use containerd_shim::api::{self, Status};
use containerd_shim::monitor::{Subject, Topic, monitor_subscribe};
use containerd_shim::protos::events::task::{TaskCreate, TaskDelete, TaskExit, TaskStart};
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{
    Config, Context, DeleteResponse, ExitSignal, Flags, TtrpcContext, TtrpcResult,
};
use log::{info, warn};
use oci_spec::runtime::Spec;

use crate::guest::{POD_SANDBOX, RUN_GUEST, SERVE_GUEST};
use crate::plan::plan;
use crate::podnet::{self, PodNet};

/// The runtime this shim implements (`ctr run --runtime io.containerd.pvrun.v1`).
pub const RUNTIME_ID: &str = "io.containerd.pvrun.v1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Created,
    Running,
    Stopped,
}

struct Container {
    bundle: String,
    stdin: String,
    stdout: String,
    stderr: String,
    /// Where we mounted the rootfs (to unmount at delete), if we did.
    mounted: Option<PathBuf>,
    pid: u32,
    /// The guest's connection to the pod's interface, if it has one.
    net: Option<PodNet>,
    /// The write end of the guest's start pipe (one byte starts it; closing it ends an
    /// unstarted guest).
    start: Option<File>,
    state: State,
    exit_status: u32,
    exited_at: Option<Timestamp>,
}

#[derive(Default)]
struct Shared {
    containers: Mutex<HashMap<String, Container>>,
    changed: Condvar,
}

#[derive(Clone)]
pub struct Service {
    namespace: String,
    /// Our ttrpc socket (`unix:///run/containerd/s/HASH`), removed when we exit.
    socket: String,
    exit: Arc<ExitSignal>,
    shared: Arc<Shared>,
    publisher: Option<Arc<Mutex<RemotePublisher>>>,
}

fn now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

/// A ttrpc error with `code` and a one-line message.
fn err(code: ttrpc::Code, msg: impl Into<String>) -> ttrpc::Error {
    let msg: String = msg.into();
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.replace('\n', " ")))
}

fn not_found(id: &str) -> ttrpc::Error {
    err(
        ttrpc::Code::NOT_FOUND,
        format!("container {} not found", id.escape_default()),
    )
}

fn no_exec() -> ttrpc::Error {
    err(
        ttrpc::Code::UNIMPLEMENTED,
        "pvrun guests have one process: exec is not supported",
    )
}

/// A stdio path from containerd: a FIFO (opened read-write, so opening never blocks and
/// writes never fail while containerd reopens its end) or, empty, nothing.
fn open_stdio(path: &str) -> std::io::Result<Stdio> {
    if path.is_empty() {
        return Ok(Stdio::null());
    }
    Ok(OpenOptions::new().read(true).write(true).open(path)?.into())
}

impl Service {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        self.shared
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Some(p) = &self.publisher {
            let p = p.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = p.publish(Context::default(), topic, &self.namespace, event) {
                warn!("cannot publish {topic}: {e}");
            }
        }
    }

    /// Takes the reaper's exit reports and records them (see the module comment).
    fn watch_exits(&self) {
        let sub = match monitor_subscribe(Topic::Pid) {
            Ok(s) => s,
            Err(e) => {
                warn!("cannot watch guest exits: {e}");
                return;
            }
        };
        // One thread records every exit at once (a helper command's `wait` may need it
        // while `create` holds the containers lock); a second matches them to containers.
        let (tx, rx) = std::sync::mpsc::channel::<(i32, i32)>();
        std::thread::spawn(move || {
            for ev in sub.rx.iter() {
                if let Subject::Pid(pid) = ev.subject {
                    record_reaped(pid, ev.exit_code);
                    if tx.send((pid, ev.exit_code)).is_err() {
                        return;
                    }
                }
            }
        });
        let me = self.clone();
        std::thread::spawn(move || {
            for (pid, exit_code) in rx.iter() {
                let mut exited = None;
                {
                    let mut map = me.lock();
                    for (id, c) in map.iter_mut() {
                        if c.pid as i32 == pid && c.state != State::Stopped {
                            c.state = State::Stopped;
                            c.exit_status = exit_code as u32;
                            c.exited_at = Some(now());
                            c.start = None;
                            exited = Some((id.clone(), c.exit_status, c.exited_at.clone()));
                        }
                    }
                }
                me.shared.changed.notify_all();
                if let Some((id, status, at)) = exited {
                    info!("guest of {id} (pid {pid}) exited with {status}");
                    me.publish(
                        topics::TASK_EXIT_EVENT_TOPIC,
                        Box::new(TaskExit {
                            container_id: id.clone(),
                            id,
                            pid: pid as u32,
                            exit_status: status,
                            exited_at: at.into(),
                            ..Default::default()
                        }),
                    );
                }
            }
        });
    }

    fn create_inner(&self, req: &api::CreateTaskRequest) -> Result<Container, String> {
        if req.terminal {
            return Err(
                "pvrun guests have no terminal; run the container without a TTY (no -t / tty: false)"
                    .into(),
            );
        }
        let bundle = Path::new(&req.bundle);
        let spec = Spec::load(bundle.join("config.json"))
            .map_err(|e| format!("cannot read the bundle's config.json: {e}"))?;
        let rootfs = match spec.root().as_ref().map(|r| r.path().clone()) {
            Some(p) if p.is_absolute() => p,
            Some(p) => bundle.join(p),
            None => bundle.join("rootfs"),
        };
        let mut mounted = None;
        if !req.rootfs.is_empty() {
            std::fs::create_dir_all(&rootfs)
                .map_err(|e| format!("cannot create {}: {e}", rootfs.display()))?;
            for m in &req.rootfs {
                containerd_shim::mount::mount_rootfs(
                    Some(m.type_.as_str()).filter(|t| !t.is_empty()),
                    Some(m.source.as_str()).filter(|s| !s.is_empty()),
                    &m.options,
                    &rootfs,
                )
                .map_err(|e| format!("cannot mount the container's rootfs: {e}"))?;
                mounted = Some(rootfs.clone());
            }
        }
        let result = self.spawn_guest(req, &spec, &rootfs);
        match result {
            Ok((pid, start, net)) => Ok(Container {
                bundle: req.bundle.clone(),
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                mounted,
                pid,
                net,
                start: Some(start),
                state: State::Created,
                exit_status: 0,
                exited_at: None,
            }),
            Err(e) => {
                if let Some(m) = &mounted {
                    let _ = containerd_shim::mount::umount_recursive(m.to_str(), 0);
                }
                Err(e)
            }
        }
    }

    /// Validates the guest and starts its process, which builds the VM and waits for
    /// `start`. Returns its pid and the write end of its start pipe.
    fn spawn_guest(
        &self,
        req: &api::CreateTaskRequest,
        spec: &Spec,
        rootfs: &Path,
    ) -> Result<(u32, File, Option<PodNet>), String> {
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find the shim binary: {e}"))?;
        let mut cmd = Command::new(exe);
        let mut net = None;
        if is_pod_sandbox(spec) {
            cmd.arg(POD_SANDBOX);
        } else {
            let plan = plan(spec, rootfs, host_vmm::cli::package::inspect)?;
            host_vmm::check_kvm().map_err(|e| format!("this node cannot run pvrun guests: {e}"))?;
            let function = plan
                .env
                .iter()
                .rev()
                .find(|(k, _)| k == pvrun_oci::ENV_KIND)
                .is_some_and(|(_, v)| v == "function");
            if function {
                if !plan.disks.is_empty() {
                    return Err("this function guest declares a disk; the shim serves function guests without block devices (run it as a program guest, or drop require_device!(block, ...))".into());
                }
                // `pvrun serve` on $PORT (default 8080), in the pod's network namespace.
                let port = match plan.env.iter().rev().find(|(k, _)| k == "PORT") {
                    None => 8080,
                    Some((_, v)) => v.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                        format!("PORT `{}` is not a port number", v.escape_default())
                    })?,
                };
                cmd.arg(SERVE_GUEST)
                    .arg(format!("--listen=0.0.0.0:{port}"))
                    .arg("--mem")
                    .arg(plan.mem.to_string());
                for (k, v) in &plan.env {
                    cmd.arg(format!("--env={k}={v}"));
                }
                cmd.arg(&plan.elf).arg("--").args(&plan.argv);
                let r = self.spawn(req, spec, cmd);
                return r.map(|(pid, start)| (pid, start, None));
            }
            cmd.arg(RUN_GUEST).arg("--mem").arg(plan.mem.to_string());
            for (k, v) in &plan.env {
                cmd.arg(format!("--env={k}={v}"));
            }
            for d in &plan.disks {
                cmd.arg(format!("--disk={d}"));
            }
            net = self.pod_net(req, spec, &plan)?;
            if let Some(n) = &net {
                cmd.arg("--net").arg(&n.net_option);
            }
            cmd.arg(&plan.elf).arg("--").args(&plan.argv);
        }
        let result = self.spawn(req, spec, cmd);
        if result.is_err()
            && let Some(n) = &net
        {
            podnet::disconnect(n);
        }
        result.map(|(pid, start)| (pid, start, net))
    }

    /// Connects the guest to the pod's interface when the container joins a network
    /// namespace and the guest declares a NIC (`require_device!(net, NAME)`).
    fn pod_net(
        &self,
        req: &api::CreateTaskRequest,
        spec: &Spec,
        plan: &crate::plan::Plan,
    ) -> Result<Option<PodNet>, String> {
        let Some(netns) = netns_path(spec) else {
            return Ok(None);
        };
        let Some(dev) = plan
            .info
            .devices
            .iter()
            .find_map(|d| d.strip_prefix("net:"))
        else {
            return Ok(None);
        };
        podnet::connect(&netns, &req.id, dev).map(Some)
    }

    /// Starts the prepared guest (or sandbox) process in the container's network
    /// namespace, if it has one.
    fn spawn(
        &self,
        req: &api::CreateTaskRequest,
        spec: &Spec,
        mut cmd: Command,
    ) -> Result<(u32, File), String> {
        if let Some(netns) = netns_path(spec) {
            let ns = File::open(&netns)
                .map_err(|e| format!("cannot open the pod's network namespace {netns}: {e}"))?;
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            let fd = ns.as_raw_fd();
            // SAFETY: between fork and exec the child only calls setns(2), which is
            // async-signal-safe; `ns` outlives the spawn below.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let r = self.spawn_in(req, cmd);
            drop(ns);
            return r;
        }
        self.spawn_in(req, cmd)
    }

    fn spawn_in(
        &self,
        req: &api::CreateTaskRequest,
        mut cmd: Command,
    ) -> Result<(u32, File), String> {
        let stdout = open_stdio(&req.stdout)
            .map_err(|e| format!("cannot open stdout {}: {e}", req.stdout))?;
        let stderr = open_stdio(&req.stderr)
            .map_err(|e| format!("cannot open stderr {}: {e}", req.stderr))?;
        let (rd, wr) = pipe().map_err(|e| format!("cannot create a pipe: {e}"))?;
        cmd.env_clear()
            .current_dir("/")
            .stdin(Stdio::from(rd))
            .stdout(stdout)
            .stderr(stderr);
        // The guest process is reaped by the shim's reaper (never by `Child::wait`), which
        // reports its exit to `watch_exits`.
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start the guest process: {e}"))?;
        Ok((child.id(), wr))
    }
}

/// The network namespace the container joins (a path), if any.
fn netns_path(spec: &Spec) -> Option<String> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)?
        .path()
        .as_ref()
        .map(|p| p.display().to_string())
        .filter(|p| !p.is_empty())
}

/// CRI's pod sandbox (the pause container), which holds the pod's namespaces.
fn is_pod_sandbox(spec: &Spec) -> bool {
    spec.annotations()
        .as_ref()
        .and_then(|a| a.get("io.kubernetes.cri.container-type"))
        .is_some_and(|t| t == "sandbox")
}

/// The last exits the reaper reported, for helper commands (`ip`, `tc`) whose `wait`
/// lost the race against the shim's reaper (ECHILD): (pid, status), newest last.
static REAPED: Mutex<std::collections::VecDeque<(i32, i32)>> =
    Mutex::new(std::collections::VecDeque::new());
static REAPED_CHANGED: Condvar = Condvar::new();

fn record_reaped(pid: i32, status: i32) {
    let mut r = REAPED.lock().unwrap_or_else(|p| p.into_inner());
    if r.len() >= 256 {
        r.pop_front();
    }
    r.push_back((pid, status));
    REAPED_CHANGED.notify_all();
}

/// The exit status of child `pid` as the reaper reported it, waiting up to `timeout`.
pub fn wait_reaped(pid: u32, timeout: std::time::Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + timeout;
    let mut r = REAPED.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if let Some(i) = r.iter().position(|(p, _)| *p == pid as i32) {
            return r.remove(i).map(|(_, s)| s);
        }
        let left = deadline.checked_duration_since(std::time::Instant::now())?;
        r = REAPED_CHANGED
            .wait_timeout(r, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

/// A pipe whose ends are close-on-exec (the child gets its end as stdin by dup2).
fn pipe() -> std::io::Result<(File, File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors, owned by nothing else.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

impl containerd_shim::Shim for Service {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Service {
            namespace: args.namespace.clone(),
            socket: args.socket.clone(),
            exit: Arc::new(ExitSignal::default()),
            shared: Arc::default(),
            publisher: None,
        }
    }

    fn start_shim(
        &mut self,
        opts: containerd_shim::StartOpts,
    ) -> Result<String, containerd_shim::Error> {
        // One shim per container (grouping by container id).
        let grouping = opts.id.clone();
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> Result<DeleteResponse, containerd_shim::Error> {
        // Called after a shim died: nothing of ours outlives the shim but the guest
        // process, which exits when its start pipe closes or has been reaped already.
        let mut r = DeleteResponse::new();
        r.exit_status = 137;
        r.exited_at = Some(now()).into();
        Ok(r)
    }

    fn wait(&mut self) {
        self.exit.wait();
        // The crate removes the socket through the bundle's `address` file, which
        // containerd has deleted by now; the listener keeps working without its path.
        if let Some(path) = self.socket.strip_prefix("unix://")
            && let Err(e) = std::fs::remove_file(path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!("cannot remove {path}: {e}");
        }
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let mut s = self.clone();
        s.publisher = Some(Arc::new(Mutex::new(publisher)));
        s.watch_exits();
        s
    }
}

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        info!("create {}", req.id);
        let mut map = self.lock();
        if map.contains_key(&req.id) {
            return Err(err(
                ttrpc::Code::ALREADY_EXISTS,
                format!("container {} already exists", req.id.escape_default()),
            ));
        }
        let c = self.create_inner(&req).map_err(|e| {
            warn!("create {}: {e}", req.id);
            err(ttrpc::Code::FAILED_PRECONDITION, format!("pvrun: {e}"))
        })?;
        let pid = c.pid;
        map.insert(req.id.clone(), c);
        drop(map);
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        if !req.exec_id.is_empty() {
            return Err(no_exec());
        }
        let mut map = self.lock();
        let c = map.get_mut(&req.id).ok_or_else(|| not_found(&req.id))?;
        if c.state != State::Created {
            return Err(err(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("container {} was started already", req.id.escape_default()),
            ));
        }
        let started = c.start.as_mut().is_some_and(|f| f.write_all(&[1]).is_ok());
        c.start = None;
        if !started {
            return Err(err(
                ttrpc::Code::FAILED_PRECONDITION,
                "the guest process ended before it started (its stderr says why)",
            ));
        }
        c.state = State::Running;
        let pid = c.pid;
        drop(map);
        self.publish(
            topics::TASK_START_EVENT_TOPIC,
            Box::new(TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        if !req.exec_id.is_empty() {
            return Err(no_exec());
        }
        let map = self.lock();
        let c = map.get(&req.id).ok_or_else(|| not_found(&req.id))?;
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.clone(),
            pid: c.pid,
            status: match c.state {
                State::Created => Status::CREATED,
                State::Running => Status::RUNNING,
                State::Stopped => Status::STOPPED,
            }
            .into(),
            stdin: c.stdin.clone(),
            stdout: c.stdout.clone(),
            stderr: c.stderr.clone(),
            terminal: false,
            exit_status: c.exit_status,
            exited_at: c.exited_at.clone().into(),
            ..Default::default()
        })
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        if !req.exec_id.is_empty() {
            return Err(no_exec());
        }
        let mut map = self.lock();
        loop {
            let c = map.get(&req.id).ok_or_else(|| not_found(&req.id))?;
            if c.state == State::Stopped {
                return Ok(api::WaitResponse {
                    exit_status: c.exit_status,
                    exited_at: c.exited_at.clone().into(),
                    ..Default::default()
                });
            }
            map = self
                .shared
                .changed
                .wait(map)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        if !req.exec_id.is_empty() {
            return Err(no_exec());
        }
        let mut map = self.lock();
        let c = map.get_mut(&req.id).ok_or_else(|| not_found(&req.id))?;
        let signal = match c.state {
            State::Stopped => {
                return Err(err(ttrpc::Code::NOT_FOUND, "process already finished"));
            }
            // Never booted: nothing to stop cleanly.
            State::Created => libc::SIGKILL,
            State::Running => i32::try_from(req.signal)
                .ok()
                .filter(|s| (1..=64).contains(s))
                .ok_or_else(|| {
                    err(
                        ttrpc::Code::INVALID_ARGUMENT,
                        format!("{} is not a signal", req.signal),
                    )
                })?,
        };
        info!("kill {} (pid {}) with signal {signal}", req.id, c.pid);
        // SAFETY: kill(2) on the guest process, which we have not reaped yet (its exit
        // would have marked it Stopped under this lock).
        if unsafe { libc::kill(c.pid as i32, signal) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(err(
                ttrpc::Code::INTERNAL,
                format!("cannot signal the guest: {e}"),
            ));
        }
        Ok(api::Empty::default())
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        if !req.exec_id.is_empty() {
            return Err(no_exec());
        }
        let mut map = self.lock();
        let c = map.get_mut(&req.id).ok_or_else(|| not_found(&req.id))?;
        match c.state {
            State::Running => {
                return Err(err(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!(
                        "container {} is running; kill it first",
                        req.id.escape_default()
                    ),
                ));
            }
            State::Created => {
                // Closing the start pipe ends the unstarted guest; wait for the reaper.
                c.start = None;
                // SAFETY: as in `kill`.
                unsafe { libc::kill(c.pid as i32, libc::SIGKILL) };
                while map.get(&req.id).is_some_and(|c| c.state != State::Stopped) {
                    let (m, timeout) = self
                        .shared
                        .changed
                        .wait_timeout(map, std::time::Duration::from_secs(5))
                        .unwrap_or_else(|p| p.into_inner());
                    map = m;
                    if timeout.timed_out() {
                        break;
                    }
                }
            }
            State::Stopped => {}
        }
        let Some(c) = map.remove(&req.id) else {
            return Err(not_found(&req.id));
        };
        let empty = map.is_empty();
        drop(map);
        if let Some(n) = &c.net {
            podnet::disconnect(n);
        }
        if let Some(m) = &c.mounted
            && let Err(e) = containerd_shim::mount::umount_recursive(m.to_str(), 0)
        {
            warn!("cannot unmount {}: {e}", m.display());
        }
        let _ = empty;
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: req.id.clone(),
                id: req.id.clone(),
                pid: c.pid,
                exit_status: c.exit_status,
                exited_at: c.exited_at.clone().into(),
                ..Default::default()
            }),
        );
        Ok(api::DeleteResponse {
            pid: c.pid,
            exit_status: c.exit_status,
            exited_at: c.exited_at.into(),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let map = self.lock();
        let c = map.get(&req.id).ok_or_else(|| not_found(&req.id))?;
        let mut r = api::PidsResponse::default();
        if c.state != State::Stopped {
            r.processes
                .push(containerd_shim::protos::types::task::ProcessInfo {
                    pid: c.pid,
                    ..Default::default()
                });
        }
        Ok(r)
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let pid = {
            let map = self.lock();
            let c = map.get(&req.id).ok_or_else(|| not_found(&req.id))?;
            if c.state == State::Stopped {
                return Err(err(ttrpc::Code::NOT_FOUND, "process already finished"));
            }
            c.pid
        };
        let metrics = crate::stats::metrics(pid).map_err(|e| {
            err(
                ttrpc::Code::INTERNAL,
                format!("cannot read the guest's usage: {e}"),
            )
        })?;
        let any = containerd_shim::util::convert_to_any(Box::new(metrics))
            .map_err(|e| err(ttrpc::Code::INTERNAL, e.to_string()))?;
        Ok(api::StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let map = self.lock();
        let task_pid = map.get(&req.id).map(|c| c.pid).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if self.lock().is_empty() {
            self.exit.signal();
        }
        Ok(api::Empty::default())
    }
}
