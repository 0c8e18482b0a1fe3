//! Host functions from the command line: `--host-fn NAME=CMD` offers the guest a host
//! function NAME that runs CMD with the call's input on stdin and answers with its stdout.
//!
//! CMD is split like a shell would split it (`shlex`: quotes and backslashes) and executed
//! directly, never through a shell, so nothing in an input can become a command. Each call
//! runs the command in its own process group; a command that runs past the timeout or
//! writes more than the output cap is killed with its whole group and reaped (no zombie),
//! and the call fails with a message for the guest. What the command writes on stderr goes
//! to the host's log, a line at a time, escaped.
//!
//! The guest calls host functions from its vCPU thread, which runs under a seccomp filter
//! that forbids `fork`/`execve`. So the commands are started by a runner thread created
//! before any thread is confined ([`HostFnRunner::start`]); the vCPU thread only sends it
//! the input and waits for the answer on a channel.
//!
//! Why `shlex`: it is the small, widely used crate (also inside cargo's own dependency
//! tree) that implements POSIX shell word splitting exactly, including the error for an
//! unterminated quote; hand-written splitting gets quoting wrong.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::time::{Duration, Instant};

use crate::HostFn;

/// `--host-fn NAME=CMD`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostCommand {
    /// The name the guest calls it by.
    pub name: String,
    /// The program and its arguments.
    pub argv: Vec<String>,
}

impl HostCommand {
    /// Parses `NAME=CMD`: NAME is 1-255 bytes without `=` or control characters, CMD is
    /// split shell-like (quotes, backslashes) into a program and its arguments.
    pub fn parse(s: &str) -> Result<HostCommand, String> {
        let Some((name, cmd)) = s.split_once('=') else {
            return Err(format!(
                "`{s}` is not NAME=COMMAND (e.g. --host-fn 'lookup=tr a-z A-Z')"
            ));
        };
        if name.is_empty() || name.len() > 255 || name.chars().any(|c| c.is_control()) {
            return Err(format!(
                "host function name `{}` must be 1-255 bytes without control characters",
                crate::escape_controls(name)
            ));
        }
        let argv = shlex::split(cmd).ok_or_else(|| {
            format!("cannot split the command of host function `{name}`: unbalanced quotes or a trailing backslash")
        })?;
        if argv.is_empty() {
            return Err(format!("host function `{name}` has an empty command"));
        }
        Ok(HostCommand {
            name: name.to_string(),
            argv,
        })
    }
}

/// Limits of every host-function command.
#[derive(Clone, Copy, Debug)]
pub struct HostFnLimits {
    /// A command still running after this is killed; the call fails.
    pub timeout: Duration,
    /// A command that writes more than this on stdout is killed; the call fails.
    pub max_output: usize,
}

/// Lines of a command's stderr logged per call (the rest is counted).
const STDERR_LINES: usize = 20;
/// Characters of one stderr line logged (the rest is cut, `...`).
const STDERR_LINE_MAX: usize = 400;
/// Bytes of a command's stderr read per call (the rest is discarded unread).
const STDERR_MAX: usize = 64 << 10;

/// Where log lines go (stderr, or the gateway's log queue).
pub type LogFn = Arc<dyn Fn(&str) + Send + Sync>;

struct Job {
    name: String,
    argv: Arc<[String]>,
    input: Vec<u8>,
    reply: SyncSender<Result<Vec<u8>, String>>,
}

/// The thread that starts host-function commands on behalf of (confined) vCPU threads.
pub struct HostFnRunner {
    jobs: Sender<Job>,
    limits: HostFnLimits,
}

/// How much longer than the command's timeout a guest's call waits for the runner's
/// answer (the runner kills and reaps in that time; past it, something is stuck, e.g. a
/// log line on a stalled stderr, and the call fails instead of hanging).
const ANSWER_GRACE: Duration = Duration::from_secs(2);

impl HostFnRunner {
    /// Starts the runner thread; call this before any thread is confined. Each job gets
    /// its own thread (started from this unconfined one), so calls from several sandboxes
    /// run their commands at the same time.
    pub fn start(limits: HostFnLimits, log: LogFn) -> std::io::Result<HostFnRunner> {
        let (jobs, rx): (Sender<Job>, Receiver<Job>) = mpsc::channel();
        std::thread::Builder::new()
            .name("pvrun-hostfn".into())
            .spawn(move || {
                for job in rx {
                    let call_log = log.clone();
                    let spawned = std::thread::Builder::new()
                        .name("pvrun-hostfn-call".into())
                        .spawn(move || {
                            let r =
                                run_command(&job.name, &job.argv, &job.input, limits, &call_log);
                            let _ = job.reply.send(r);
                        });
                    if let Err(e) = spawned {
                        // The job (and its reply sender) went with the failed closure: the
                        // caller sees a closed channel and reports it.
                        log(&format!("pvrun: cannot start a host-function thread: {e}"));
                    }
                }
            })?;
        Ok(HostFnRunner { jobs, limits })
    }

    /// The host functions for `commands`, each running its command through this runner.
    pub fn functions(&self, commands: &[HostCommand]) -> Result<HashMap<String, HostFn>, String> {
        let mut fns: HashMap<String, HostFn> = HashMap::new();
        for c in commands {
            let jobs = self.jobs.clone();
            let name = c.name.clone();
            let argv: Arc<[String]> = c.argv.clone().into();
            let wait = self.limits.timeout + ANSWER_GRACE;
            let f: HostFn = Arc::new(move |input: &[u8]| {
                let (reply, answer) = mpsc::sync_channel(1);
                let job = Job {
                    name: name.clone(),
                    argv: argv.clone(),
                    input: input.to_vec(),
                    reply,
                };
                // The jobs channel is unbounded: sending never blocks (a Mutex would
                // make the vCPU threads wait for each other).
                jobs.send(job)
                    .map_err(|_| "the host-function runner is gone".to_string())?;
                match answer.recv_timeout(wait) {
                    Ok(r) => r,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        Err("the host function did not answer in time".to_string())
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        Err("the host function could not be started".to_string())
                    }
                }
            });
            if fns.insert(c.name.clone(), f).is_some() {
                return Err(format!(
                    "host function `{}` is given twice (--host-fn)",
                    crate::escape_controls(&c.name)
                ));
            }
        }
        Ok(fns)
    }
}

/// Kills the child's whole process group (it leads it) and reaps the child.
fn kill_group(child: &mut Child) {
    // SAFETY: the child was started with `process_group(0)`, so its pid is its group id;
    // kill(-pgid) signals exactly that group.
    unsafe {
        libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
    }
    let _ = child.wait();
}

/// A child that is killed with its group and reaped on every way out.
struct Reaped(Option<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            kill_group(&mut c);
        }
    }
}

enum Piece {
    Out(Vec<u8>),
    OutDone,
    OutTooLarge,
    Err(Vec<u8>),
}

fn run_command(
    name: &str,
    argv: &[String],
    input: &[u8],
    limits: HostFnLimits,
    log: &LogFn,
) -> Result<Vec<u8>, String> {
    let started = Instant::now();
    let deadline = started + limits.timeout;
    let shown = crate::escape_controls(name).into_owned();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let child = cmd.spawn().map_err(|e| {
        log(&format!(
            "pvrun: host function `{shown}`: cannot run `{}`: {e}",
            crate::escape_controls(&argv[0])
        ));
        format!("cannot run the command: {e}")
    })?;
    let mut child = Reaped(Some(child));
    let c = child.0.as_mut().expect("just set");
    tracing::debug!(function = %shown, pid = c.id(), "host function command started");
    let (tx, rx) = mpsc::channel::<Piece>();
    // Input on a thread of its own: a command that writes before it reads must not
    // deadlock against us. A command that does not read it all gets EPIPE: ignored.
    if let Some(mut stdin) = c.stdin.take() {
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
    }
    if let Some(mut out) = c.stdout.take() {
        let tx = tx.clone();
        let cap = limits.max_output;
        std::thread::spawn(move || {
            let mut total = 0usize;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match out.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(Piece::OutDone);
                        return;
                    }
                    Ok(n) => {
                        total += n;
                        if total > cap {
                            let _ = tx.send(Piece::OutTooLarge);
                            return;
                        }
                        if tx.send(Piece::Out(buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    if let Some(err) = c.stderr.take() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut data = Vec::new();
            let _ = err.take(STDERR_MAX as u64).read_to_end(&mut data);
            let _ = tx.send(Piece::Err(data));
        });
    }
    drop(tx);
    let mut output = Vec::new();
    let mut stderr = None;
    let mut out_done = false;
    let timed_out = |log: &LogFn| {
        log(&format!(
            "pvrun: host function `{shown}` timed out after {:.3} s; killed",
            limits.timeout.as_secs_f64()
        ));
        Err(format!(
            "the command timed out after {:.3} s and was killed",
            limits.timeout.as_secs_f64()
        ))
    };
    // Stdout to its end (and stderr, briefly), within the deadline.
    while !out_done || stderr.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Piece::Out(b)) => output.extend_from_slice(&b),
            Ok(Piece::OutDone) => out_done = true,
            Ok(Piece::OutTooLarge) => {
                drop(child); // killed and reaped
                log(&format!(
                    "pvrun: host function `{shown}` wrote more than {} bytes; killed",
                    limits.max_output
                ));
                return Err(format!(
                    "the command's output is larger than {} bytes",
                    limits.max_output
                ));
            }
            Ok(Piece::Err(b)) => stderr = Some(b),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if out_done {
                    // Stdout is complete; a stderr held open by a grandchild is not worth
                    // the call's failure.
                    break;
                }
                drop(child);
                return timed_out(log);
            }
        }
    }
    // The command closed stdout: wait for it to exit, within the deadline.
    let c = child.0.as_mut().expect("still there");
    let status = loop {
        match c.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() >= deadline => {
                drop(child);
                return timed_out(log);
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => return Err(format!("cannot wait for the command: {e}")),
        }
    };
    // Reaped: nothing to kill (its group may still hold stragglers; kill them).
    let mut c = child.0.take().expect("still there");
    // SAFETY: as in kill_group; the leader is reaped, the group id stays reserved while
    // any member lives, and signalling an empty group only fails with ESRCH.
    unsafe {
        libc::kill(-(c.id() as libc::pid_t), libc::SIGKILL);
    }
    let _ = c.wait();
    if let Some(err) = stderr.filter(|e| !e.is_empty()) {
        let text = String::from_utf8_lossy(&err);
        let lines: Vec<&str> = text.lines().collect();
        for l in lines.iter().take(STDERR_LINES) {
            let mut l: String = crate::escape_controls(l).into_owned();
            if let Some((cut, _)) = l.char_indices().nth(STDERR_LINE_MAX) {
                l.truncate(cut);
                l.push_str("...");
            }
            log(&format!("pvrun: host function `{shown}` stderr: {l}"));
        }
        if lines.len() > STDERR_LINES {
            log(&format!(
                "pvrun: host function `{shown}` stderr: ... {} more lines",
                lines.len() - STDERR_LINES
            ));
        }
    }
    tracing::debug!(function = %shown, ?status, elapsed = ?started.elapsed(), bytes = output.len(), "host function command ended");
    if status.success() {
        return Ok(output);
    }
    let why = match (status.code(), status.signal()) {
        (Some(code), _) => format!("the command exited with status {code}"),
        (None, Some(sig)) => format!("the command was killed by signal {sig}"),
        _ => "the command failed".to_string(),
    };
    log(&format!("pvrun: host function `{shown}`: {why}"));
    Err(why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn commands_are_split_like_a_shell_and_names_are_checked() {
        let c = HostCommand::parse("lookup=tr 'a-z' \"A-Z\"").unwrap();
        assert_eq!(c.name, "lookup");
        assert_eq!(c.argv, ["tr", "a-z", "A-Z"]);
        let c = HostCommand::parse("f=echo a=b").unwrap();
        assert_eq!(c.argv, ["echo", "a=b"]);
        assert!(HostCommand::parse("noequals").is_err());
        assert!(HostCommand::parse("=cat").is_err());
        assert!(HostCommand::parse("f=").is_err());
        assert!(
            HostCommand::parse("f=cat 'open")
                .unwrap_err()
                .contains("quotes")
        );
        assert!(HostCommand::parse("a\nb=cat").is_err());
    }

    fn runner(timeout_ms: u64, max_output: usize) -> (HostFnRunner, Arc<Mutex<Vec<String>>>) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let log: LogFn = Arc::new(move |l: &str| sink.lock().unwrap().push(l.to_string()));
        let r = HostFnRunner::start(
            HostFnLimits {
                timeout: Duration::from_millis(timeout_ms),
                max_output,
            },
            log,
        )
        .unwrap();
        (r, lines)
    }

    fn call(r: &HostFnRunner, cmd: &str, input: &[u8]) -> Result<Vec<u8>, String> {
        let fns = r.functions(&[HostCommand::parse(cmd).unwrap()]).unwrap();
        fns.values().next().unwrap()(input)
    }

    #[test]
    fn input_on_stdin_output_from_stdout_stderr_logged_escaped() {
        let (r, log) = runner(5000, 1 << 20);
        assert_eq!(call(&r, "f=tr a-z A-Z", b"hello").unwrap(), b"HELLO");
        let out = call(&r, "f=sh -c 'cat; printf \"oops\\033[2J\\n\" >&2'", b"x").unwrap();
        assert_eq!(out, b"x");
        let log = log.lock().unwrap();
        assert!(
            log.iter()
                .any(|l| l == "pvrun: host function `f` stderr: oops\\u{1b}[2J"),
            "{log:?}"
        );
    }

    #[test]
    fn failures_timeouts_and_floods_are_errors_and_leave_no_process() {
        let (r, _log) = runner(300, 1000);
        let e = call(&r, "f=sh -c 'exit 3'", b"").unwrap_err();
        assert_eq!(e, "the command exited with status 3");
        let e = call(&r, "f=/nonexistent/cmd", b"").unwrap_err();
        assert!(e.starts_with("cannot run the command"), "{e}");
        let t = Instant::now();
        // The shell's child keeps stdout open: the group is killed, not just the shell.
        let e = call(&r, "f=sh -c 'sleep 30; echo late'", b"").unwrap_err();
        assert!(e.contains("timed out"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let e = call(&r, "f=yes", b"").unwrap_err();
        assert!(e.contains("larger than 1000 bytes"), "{e}");
        // No zombie or straggler is left among our children.
        std::thread::sleep(Duration::from_millis(100));
        let me = std::process::id().to_string();
        let kids: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| {
                let stat = std::fs::read_to_string(e.ok()?.path().join("stat")).ok()?;
                let after = stat.rsplit_once(") ")?.1.to_string();
                let f: Vec<&str> = after.split(' ').collect();
                (f.get(1) == Some(&me.as_str())
                    && (stat.contains("(sh)")
                        || stat.contains("(sleep)")
                        || stat.contains("(yes)")))
                .then_some(stat)
            })
            .collect();
        assert!(kids.is_empty(), "children left: {kids:?}");
    }
}
