//! `pvrun --gdb`: Debian's gdb in batch mode against the `debuggee` guest (breakpoints,
//! backtraces, locals, stepping, registers, memory writes, exit status, crashes, panics,
//! detach, kill, the timeout), and hand-written remote-protocol clients for what gdb's
//! batch mode cannot do (Ctrl-C) or would never do (garbage, host addresses, hanging up).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::guest;
use host_vmm::{EXIT_FAULT, EXIT_HOST_ERROR, EXIT_KILLED, EXIT_PANIC};

/// `debuggee/src/main.rs:LINE` for the line marked `// MARK: {mark}`.
fn marked(mark: &str) -> String {
    let src = common::examples_dir().join("debuggee/src/main.rs");
    let text = std::fs::read_to_string(&src).unwrap();
    let tag = format!("// MARK: {mark}");
    let line = text
        .lines()
        .position(|l| l.trim_end().ends_with(&tag))
        .unwrap_or_else(|| panic!("no `{tag}` in {}", src.display()))
        + 1;
    format!("main.rs:{line}")
}

/// A `pvrun --gdb` process waiting for (or serving) a debugger; killed on drop.
struct Pvrun {
    child: Child,
    port: u16,
    stderr: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Pvrun {
    /// Starts the debuggee in `mode` under `--gdb 127.0.0.1:0` with `opts`, and waits for
    /// its `waiting for gdb` line.
    fn start(mode: &str, opts: &[&str]) -> Pvrun {
        let mut child = Command::new(common::pvrun_bin())
            .args(["--gdb", "127.0.0.1:0"])
            .args(opts)
            .arg(guest("debuggee"))
            .arg("--")
            .arg(mode)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run pvrun");
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut first = String::new();
        err.read_line(&mut first).unwrap();
        let port = first
            .strip_prefix("pvrun: waiting for gdb on 127.0.0.1:")
            .and_then(|r| r.split(' ').next())
            .and_then(|p| p.parse::<u16>().ok())
            .unwrap_or_else(|| panic!("unexpected first line: {first:?}"));
        assert!(
            first.trim_end().ends_with(&format!(
                "(gdb {} -ex 'target remote :{port}')",
                guest("debuggee").display()
            )),
            "{first}"
        );
        let stderr = Arc::new(Mutex::new(String::new()));
        let s = stderr.clone();
        let reader = std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = err.read_to_string(&mut rest);
            s.lock().unwrap().push_str(&rest);
        });
        Pvrun {
            child,
            port,
            stderr,
            reader: Some(reader),
        }
    }

    /// Waits (at most 30 s) for pvrun to exit: its status, stdout and stderr.
    fn finish(mut self) -> (i32, String, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "pvrun did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let err = self.stderr.lock().unwrap().clone();
        (status.code().expect("pvrun died of a signal"), out, err)
    }

    /// Runs `gdb -batch` on the debuggee, connected to this pvrun, with `cmds`; returns
    /// what gdb printed (stdout then stderr).
    fn gdb(&self, cmds: &[&str]) -> String {
        let mut c = Command::new("timeout");
        c.args(["60", "gdb", "-batch", "-nx"]);
        c.arg(guest("debuggee"));
        for e in ["set confirm off", "set pagination off"]
            .iter()
            .copied()
            .chain(std::iter::once(
                format!("target remote :{}", self.port).as_str(),
            ))
            .chain(cmds.iter().copied())
        {
            c.args(["-ex", e]);
        }
        let out = c.output().expect("gdb is needed (apt-get install gdb)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_ne!(out.status.code(), Some(124), "gdb timed out:\n{text}");
        text
    }
}

impl Drop for Pvrun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The position of `needle` in `hay`, or a failure showing both.
fn find(hay: &str, needle: &str) -> usize {
    hay.find(needle)
        .unwrap_or_else(|| panic!("no `{needle}` in:\n{hay}"))
}

#[test]
fn gdb_breaks_steps_prints_and_runs_the_guest_to_its_exit_status() {
    let p = Pvrun::start("run", &["--timeout", "60"]);
    let out = p.gdb(&[
        "break debuggee::add_scaled",
        "continue",
        "bt",
        "print value",
        "print factor",
        "info registers rip",
        "info registers mxcsr",
        "set var value = 20",
        "maint flush dcache",
        "print value",
        "next",
        "print scaled",
        "set var $rax = 100",
        "stepi",
        "print $rax",
        "print $xmm15.v2_int64[0] = 77",
        "print $xmm15.v2_int64[0]",
        "up",
        "print doubled",
        "continue",
    ]);
    // The breakpoint, then the call stack innermost first, with file:line.
    let hit = find(
        &out,
        "Breakpoint 1, debuggee::add_scaled (value=10, factor=3)",
    );
    let bt0 = find(&out, "#0  debuggee::add_scaled (value=10, factor=3) at ");
    let bt1 = find(&out, "debuggee::middle (n=5) at ");
    let bt2 = find(&out, "debuggee::outer (n=4) at ");
    assert!(hit < bt0 && bt0 < bt1 && bt1 < bt2, "{out}");
    assert!(out.contains(&marked("middle")), "{out}");
    assert!(out.contains(&marked("outer")), "{out}");
    assert!(out.contains("$1 = 10") && out.contains("$2 = 3"), "{out}");
    // rip is in add_scaled; MXCSR has the value the host loads at entry.
    let rip = out
        .lines()
        .find(|l| l.starts_with("rip "))
        .unwrap_or_else(|| panic!("no rip line:\n{out}"));
    assert!(rip.contains("<debuggee::add_scaled+"), "{rip}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("mxcsr") && l.contains("0x1f80")),
        "{out}"
    );
    // The argument's stack slot was written in guest memory (read back past gdb's
    // cache); `next` ran the multiplication (from the argument's register).
    assert!(out.contains("$3 = 20"), "{out}");
    assert!(out.contains("$4 = 30"), "{out}");
    // rax (scaled, about to get its + 1) was written, and `stepi` ran the add.
    assert!(out.contains("$5 = 101"), "{out}");
    // An SSE register written and read back.
    assert!(out.contains("$7 = 77"), "{out}");
    // `up` selects middle's frame: its local.
    assert!(out.contains("$8 = 10"), "{out}");
    // 101 + 1 = 102 is the exit status (octal in gdb's message).
    assert!(
        out.contains("exited with code 0146"),
        "gdb did not see the exit:\n{out}"
    );
    let (status, stdout, stderr) = p.finish();
    assert_eq!(status, 102, "{stderr}");
    assert!(stdout.contains("result 102"), "{stdout}");
}

#[test]
fn next_steps_over_a_hypercall() {
    let p = Pvrun::start("run", &["--timeout", "60"]);
    let line = marked("print");
    let out = p.gdb(&[
        "break debuggee::add_scaled",
        &format!("break {line}"),
        "continue",
        "finish",
        "continue",
        "next",
        "info line",
        "print result",
        "continue",
    ]);
    // `finish` ran to the return (a temporary breakpoint at the return address).
    let finish = find(&out, "Value returned is $1 = 31");
    let hit = find(
        &out,
        &format!("Breakpoint 2, debuggee::main () at debuggee/src/{line}"),
    );
    assert!(finish < hit, "{out}");
    // `next` single-stepped and ran the console hypercalls to the following line.
    let after = find(
        &out,
        &format!(
            "{}\t",
            line.trim_start_matches("main.rs:").parse::<u32>().unwrap() + 1
        ),
    );
    assert!(hit < after, "{out}");
    assert!(out.contains("$2 = 32"), "{out}");
    assert!(out.contains("exited with code 040"), "{out}");
    let (status, stdout, stderr) = p.finish();
    assert_eq!(status, 32, "{stderr}");
    assert_eq!(stdout, "result 32\n");
}

#[test]
fn a_crash_stops_gdb_with_sigsegv_at_the_faulting_function() {
    let p = Pvrun::start("fault", &["--timeout", "60"]);
    let out = p.gdb(&["continue", "bt", "info registers rip", "continue"]);
    let sig = find(&out, "received signal SIGSEGV");
    let frame = find(&out, "debuggee::read_at (addr=0)");
    let caller = find(&out, "debuggee::fault_outer (addr=0)");
    assert!(sig < frame && frame < caller, "{out}");
    assert!(out.contains(&marked("fault")), "{out}");
    assert!(out.contains(&marked("fault-outer")), "{out}");
    assert!(
        out.contains("terminated with signal SIGSEGV"),
        "continuing after the fault ends the run:\n{out}"
    );
    let (status, _, stderr) = p.finish();
    assert_eq!(status, EXIT_FAULT, "{stderr}");
    assert!(
        stderr.contains("pvrun: guest crashed: page fault (#PF) reading 0x0: null pointer"),
        "{stderr}"
    );
}

#[test]
fn a_panic_stops_gdb_with_sigabrt_in_the_panicking_function() {
    let p = Pvrun::start("panic", &["--timeout", "60"]);
    let out = p.gdb(&["continue", "bt", "continue"]);
    let sig = find(&out, "received signal SIGABRT");
    let inner = find(&out, "debuggee::panic_inner (n=2)");
    let outer = find(&out, "debuggee::panic_outer (n=1)");
    assert!(sig < inner && inner < outer, "{out}");
    assert!(out.contains("terminated with signal SIGABRT"), "{out}");
    let (status, _, stderr) = p.finish();
    assert_eq!(status, EXIT_PANIC, "{stderr}");
    assert!(stderr.contains("debuggee panicked (2)"), "{stderr}");
}

#[test]
fn detach_lets_the_guest_run_on_and_kill_stops_it() {
    let p = Pvrun::start("run", &["--timeout", "60"]);
    let out = p.gdb(&["break debuggee::add_scaled", "continue", "detach"]);
    assert!(out.contains("Breakpoint 1, debuggee::add_scaled"), "{out}");
    let (status, stdout, stderr) = p.finish();
    assert_eq!(status, 32, "the breakpoint is gone after detach: {stderr}");
    assert!(stdout.contains("result 32"), "{stdout}");

    let p = Pvrun::start("run", &["--timeout", "60"]);
    let out = p.gdb(&["break debuggee::middle", "continue", "kill"]);
    assert!(out.contains("Breakpoint 1, debuggee::middle"), "{out}");
    let (status, stdout, stderr) = p.finish();
    assert_eq!(status, EXIT_KILLED, "{stderr}");
    assert!(!stdout.contains("result"), "{stdout}");
    assert!(stderr.contains("pvrun: guest was killed"), "{stderr}");
}

#[test]
fn the_timeout_does_not_run_while_the_guest_is_stopped() {
    // 2 s of --timeout, 3 s at the breakpoint: the guest still finishes.
    let p = Pvrun::start("run", &["--timeout", "2"]);
    let out = p.gdb(&[
        "break debuggee::add_scaled",
        "continue",
        "shell sleep 3",
        "continue",
    ]);
    assert!(out.contains("exited with code 040"), "{out}");
    let (status, _, stderr) = p.finish();
    assert_eq!(status, 32, "{stderr}");

    // Running, it still counts: a spinning guest is stopped at 2 s.
    let p = Pvrun::start("spin", &["--timeout", "2"]);
    let out = p.gdb(&["continue"]);
    assert!(out.contains("terminated with signal SIGKILL"), "{out}");
    let (status, _, stderr) = p.finish();
    assert_eq!(status, 124, "{stderr}");
}

/// A hand-written remote-protocol client.
struct Rsp(TcpStream);

impl Rsp {
    fn connect(port: u16) -> Rsp {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Rsp(s)
    }

    /// Sends packet `body` and returns the reply's body (acks skipped).
    fn ask(&mut self, body: &str) -> String {
        self.send(body);
        self.reply()
    }

    fn send(&mut self, body: &str) {
        let sum = body.bytes().fold(0u8, |a, b| a.wrapping_add(b));
        write!(self.0, "${body}#{sum:02x}").unwrap();
    }

    fn reply(&mut self) -> String {
        let mut b = [0u8];
        loop {
            self.0.read_exact(&mut b).expect("no reply from the stub");
            if b[0] == b'$' {
                break;
            }
        }
        let mut body = Vec::new();
        loop {
            self.0.read_exact(&mut b).unwrap();
            if b[0] == b'#' {
                break;
            }
            body.push(b[0]);
        }
        let mut sum = [0u8; 2];
        self.0.read_exact(&mut sum).unwrap();
        self.0.write_all(b"+").unwrap();
        // Run-length encoding: `X*n` is X and n - 29 more copies of it.
        let mut out = Vec::new();
        let mut i = 0;
        while i < body.len() {
            if body[i] == b'*' && i + 1 < body.len() {
                let last = *out.last().unwrap();
                out.extend(std::iter::repeat_n(last, body[i + 1] as usize - 29));
                i += 2;
            } else {
                out.push(body[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }
}

#[test]
fn ctrl_c_stops_a_running_and_a_sleeping_guest() {
    for mode in ["spin", "sleep"] {
        let p = Pvrun::start(mode, &["--timeout", "60"]);
        let mut c = Rsp::connect(p.port);
        assert!(c.ask("?").starts_with('S') || c.ask("?").starts_with('T'));
        c.send("c");
        std::thread::sleep(Duration::from_millis(500));
        c.0.write_all(&[0x03]).unwrap();
        let stop = c.reply();
        assert!(
            stop.starts_with("T02") || stop.starts_with("S02"),
            "{mode}: not a SIGINT stop: {stop}"
        );
        // The registers are the guest's, in ring 3: CS (after 16 GPRs, rip, eflags).
        let g = c.ask("g");
        let cs = u32::from_str_radix(&g[16 * 16 + 16 + 8..16 * 16 + 16 + 16], 16).unwrap();
        assert_eq!(cs.swap_bytes() & 3, 3, "{mode}: cs {cs:#x} in {g}");
        // Resumes, stops again, then gdb kills it.
        c.send("c");
        std::thread::sleep(Duration::from_millis(200));
        c.0.write_all(&[0x03]).unwrap();
        let again = c.reply();
        assert!(
            again.starts_with("T02") || again.starts_with("S02"),
            "{again}"
        );
        c.send("k");
        let (status, _, stderr) = p.finish();
        assert_eq!(status, EXIT_KILLED, "{mode}: {stderr}");
    }
}

#[test]
fn sigint_to_pvrun_ends_a_session_stopped_in_gdb() {
    let p = Pvrun::start("run", &["--timeout", "60"]);
    let mut c = Rsp::connect(p.port);
    let stop = c.ask("?");
    assert!(stop.starts_with('S') || stop.starts_with('T'), "{stop}");
    let st = Command::new("kill")
        .args(["-INT", &p.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let (status, stdout, stderr) = p.finish();
    assert_eq!(status, 130, "{stderr}");
    assert!(!stdout.contains("result"), "{stdout}");
    assert!(stderr.contains("interrupted by signal 2"), "{stderr}");
}

#[test]
fn gdb_cannot_read_or_write_host_memory_or_guest_text() {
    let p = Pvrun::start("run", &["--timeout", "60"]);
    let mut c = Rsp::connect(p.port);
    assert!(!c.ask("?").is_empty());
    // With gdb attached, every thread (the vCPU thread, the socket poller) runs under
    // its seccomp filter.
    let tasks = std::fs::read_dir(format!("/proc/{}/task", p.child.id())).unwrap();
    let mut n = 0;
    for t in tasks {
        let status = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap();
        assert!(
            status.lines().any(|l| l == "Seccomp:\t2"),
            "a thread is not confined:\n{status}"
        );
        n += 1;
    }
    assert!(n >= 2, "the vCPU and poller threads");
    // The GDT, IDT, ring-0 stubs and stack, the page tables, page 0, past the end.
    for addr in [
        "0",
        "1000",
        "2000",
        "4000",
        "5000",
        "100000",
        "ffffffff00000000",
    ] {
        let r = c.ask(&format!("m{addr},10"));
        assert!(r.starts_with('E'), "read at {addr}: {r}");
        let w = c.ask(&format!("M{addr},4:cccccccc"));
        assert!(w.starts_with('E'), "write at {addr}: {w}");
    }
    // Guest text is readable but not writable through memory writes.
    let r = c.ask("m200000,4");
    assert_eq!(r.len(), 8, "{r}");
    assert!(c.ask("M200000,1:cc").starts_with('E'));
    assert_eq!(c.ask("m200000,4"), r, "text unchanged");
    // A breakpoint outside guest text is refused.
    assert!(!c.ask("Z0,4000,1").starts_with("OK"));
    assert!(!c.ask("Z0,10000,1").starts_with("OK"));
    // Segment registers are the host's: a `G` that changes CS is refused.
    let g = c.ask("g");
    let at = 16 * 16 + 16 + 8;
    let mut bad = g.clone();
    bad.replace_range(at..at + 8, "08000000");
    assert!(c.ask(&format!("G{bad}")).starts_with('E'));
    assert_eq!(c.ask("g"), g, "registers unchanged");
    c.send("c");
    let exit = c.reply();
    assert_eq!(exit, "W20", "the guest ran normally: {exit}");
    let (status, stdout, stderr) = p.finish();
    assert_eq!(status, 32, "{stderr}");
    assert!(stdout.contains("result 32"));
}

#[test]
fn a_client_sending_garbage_or_hanging_up_leaves_the_guest_to_run_on() {
    // Garbage, then the connection closes: the guest runs to its end, with a message.
    let p = Pvrun::start("run", &["--timeout", "60"]);
    let mut c = Rsp::connect(p.port);
    c.0.write_all(b"hello\x00\xff$zz#00$m0,zz#ff+-+--$")
        .unwrap();
    c.0.write_all(&[b'x'; 10000]).unwrap();
    let _ = c.0.write_all(b"$qSupported:xyz#00");
    drop(c);
    let (status, stdout, stderr) = p.finish();
    assert_eq!(status, 32, "{stderr}");
    assert!(stdout.contains("result 32"), "{stdout}");
    assert!(
        stderr.contains("the guest goes on without the debugger"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    // Hanging up at a breakpoint: the breakpoint is removed and the guest finishes.
    let p = Pvrun::start("run", &["--timeout", "60"]);
    let mut c = Rsp::connect(p.port);
    let sym = guest_symbol("debuggee::add_scaled");
    assert_eq!(c.ask(&format!("Z0,{sym:x},1")), "OK");
    c.send("c");
    let stop = c.reply();
    assert!(stop.starts_with("T05") || stop.starts_with("S05"), "{stop}");
    drop(c);
    let (status, stdout, stderr) = p.finish();
    assert_eq!(status, 32, "{stderr}");
    assert!(stdout.contains("result 32"), "{stdout}");
    assert!(
        stderr.contains("gdb closed the connection; the guest goes on without the debugger"),
        "{stderr}"
    );

    // Hanging up while the guest runs: the poller notices, the guest runs on (here to
    // its timeout, since it spins).
    let p = Pvrun::start("spin", &["--timeout", "3"]);
    let mut c = Rsp::connect(p.port);
    c.send("c");
    std::thread::sleep(Duration::from_millis(300));
    drop(c);
    let (status, _, stderr) = p.finish();
    assert_eq!(status, 124, "{stderr}");
    assert!(
        stderr.contains(
            "pvrun: gdb: gdb closed the connection; the guest goes on without the debugger"
        ),
        "{stderr}"
    );
}

/// The address of function `name` in the debuggee (from `nm`-like lookup with gdb).
fn guest_symbol(name: &str) -> u64 {
    let out = Command::new("gdb")
        .args(["-batch", "-nx", "-ex"])
        .arg(format!("info address {name}"))
        .arg(guest("debuggee"))
        .output()
        .expect("gdb is needed");
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text
        .split("0x")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_hexdigit()).next())
        .unwrap_or_else(|| panic!("no address in {text}"));
    u64::from_str_radix(hex, 16).unwrap()
}

#[test]
fn a_port_in_use_is_a_one_line_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = Command::new(common::pvrun_bin())
        .args(["--gdb", &port.to_string()])
        .arg(guest("debuggee"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_HOST_ERROR), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "pvrun: error: cannot listen for gdb on 127.0.0.1:{port}: "
        )) && stderr.contains("pick another --gdb port"),
        "{stderr}"
    );
    let out = Command::new(common::pvrun_bin())
        .args(["--gdb", "not-a-port"])
        .arg(guest("debuggee"))
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not PORT or ADDR:PORT"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
