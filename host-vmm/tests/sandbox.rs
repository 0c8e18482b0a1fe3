//! Function sandboxes: correct outputs, a clean state for every call, recovery from
//! loops, crashes and panics, flat host memory over many calls, a pool under concurrent
//! callers, and the HTTP gateway.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::guest;
use host_vmm::HostFn;
use host_vmm::{CallError, PoolLimits, Sandbox, SandboxConfig, SandboxPool};

fn config() -> SandboxConfig {
    let lookup: HostFn = Arc::new(|input: &[u8]| {
        if input == b"nobody" {
            Err("unknown person".into())
        } else {
            Ok([b"dear ".as_slice(), input].concat())
        }
    });
    SandboxConfig {
        host_functions: HashMap::from([("lookup".to_string(), lookup)]),
        call_timeout: Some(Duration::from_secs(5)),
        console: Arc::new(Mutex::new(Box::new(std::io::sink()))),
        ..SandboxConfig::default()
    }
}

fn sandbox(name: &str) -> Sandbox {
    Sandbox::new(&guest(name), config()).expect("boot the function guest (needs /dev/kvm)")
}

fn text(r: Result<Vec<u8>, CallError>) -> String {
    String::from_utf8(r.expect("call failed")).unwrap()
}

#[test]
fn functions_compute_correct_outputs() {
    let mut sb = sandbox("functions");
    assert_eq!(
        text(sb.call("sha256", b"abc")),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(text(sb.call("upper", b"Hello, pvrun")), "HELLO, PVRUN");
    let json = text(sb.call(
        "json-transform",
        br#"{"name":"Ada","langs":["rust","c"],"age":36}"#,
    ));
    assert_eq!(json, r#"{"age":72,"langs":["C","RUST"],"name":"ADA"}"#);
    assert!(
        matches!(sb.call("json-transform", b"{not json"), Err(CallError::Failed(m)) if m.contains("invalid JSON"))
    );
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8 / 8).collect();
    let packed = sb.call("compress", &data).unwrap();
    assert!(
        packed.len() < data.len() / 4,
        "compress did not compress: {}",
        packed.len()
    );
    assert_eq!(sb.call("decompress", &packed).unwrap(), data);
}

#[test]
fn a_function_can_call_a_host_function() {
    let mut sb = sandbox("functions");
    assert_eq!(text(sb.call("greet-via-host", b"Ada")), "hello, dear Ada");
    // The host function's own error message reaches the guest, which reports it.
    match sb.call("greet-via-host", b"nobody") {
        Err(CallError::Failed(m)) => assert!(m.contains("unknown person"), "{m}"),
        other => panic!("expected the function's error, got {other:?}"),
    }
    // Without the host function the guest gets NOT_FOUND and reports an error.
    let cfg = SandboxConfig {
        host_functions: HashMap::new(),
        ..config()
    };
    let mut bare = Sandbox::new(&guest("functions"), cfg).unwrap();
    assert!(matches!(
        bare.call("greet-via-host", b"Ada"),
        Err(CallError::Failed(_))
    ));
}

#[test]
fn every_call_starts_from_the_snapshot() {
    let mut sb = sandbox("badfunctions");
    for _ in 0..50 {
        assert_eq!(text(sb.call("counter", b"")), "1");
        assert_eq!(text(sb.call("heap-grow", b"x")), "1");
    }
    assert_eq!(text(sb.call("init-state", b"")), "42");
    // Without resets the same guest accumulates state: the reset is what isolates calls.
    sb.reset().unwrap();
    assert_eq!(text(sb.call_keep_state("counter", b"")), "1");
    assert_eq!(text(sb.call_keep_state("counter", b"")), "2");
    assert_eq!(text(sb.call_keep_state("counter", b"")), "3");
    assert_eq!(text(sb.call("counter", b"")), "1");
}

#[test]
fn a_previous_input_never_leaks_into_the_next_call() {
    let mut sb = sandbox("badfunctions");
    assert_eq!(sb.call("echo", &[b'S'; 4096]).unwrap(), vec![b'S'; 4096]);
    assert_eq!(sb.call("echo", b"short").unwrap(), b"short");
    assert_eq!(sb.call("echo", b"").unwrap(), b"");
}

#[test]
fn a_function_that_loops_forever_times_out_and_the_next_call_works() {
    let mut sb = sandbox("badfunctions");
    sb.set_call_timeout(Some(Duration::from_millis(200)));
    let t = Instant::now();
    assert!(matches!(sb.call("spin", b""), Err(CallError::Timeout(_))));
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(text(sb.call("counter", b"")), "1");
    assert!(matches!(sb.call("spin", b""), Err(CallError::Timeout(_))));
    assert_eq!(text(sb.call("echo", b"alive")), "alive");
}

#[test]
fn faults_and_panics_become_errors_and_the_sandbox_recovers() {
    let mut sb = sandbox("badfunctions");
    match sb.call("fault", b"") {
        Err(CallError::Fault(f)) => assert!(f.message.contains("null pointer"), "{f}"),
        other => panic!("expected a fault, got {other:?}"),
    }
    assert_eq!(text(sb.call("counter", b"")), "1");
    match sb.call("panic", b"") {
        Err(CallError::Panic(m)) => assert!(m.contains("function panicked on purpose"), "{m}"),
        other => panic!("expected a panic, got {other:?}"),
    }
    assert_eq!(text(sb.call("counter", b"")), "1");
}

#[test]
fn limits_and_unknown_functions_are_typed_errors() {
    let cfg = SandboxConfig {
        max_output: 1 << 20,
        ..config()
    };
    let mut sb = Sandbox::new(&guest("badfunctions"), cfg).unwrap();
    assert!(matches!(sb.call("nope", b""), Err(CallError::UnknownFunction(n)) if n == "nope"));
    assert!(matches!(
        sb.call("big-output", b"2097152"),
        Err(CallError::OutputTooLarge {
            len: 2097152,
            max: 1048576
        })
    ));
    assert_eq!(sb.call("big-output", b"1000").unwrap().len(), 1000);
    let huge = vec![0u8; 64 << 20];
    assert!(matches!(
        sb.call("echo", &huge),
        Err(CallError::InputTooLarge { .. })
    ));
    assert_eq!(text(sb.call("counter", b"")), "1");
}

#[test]
fn a_running_call_can_be_killed_from_another_thread() {
    let mut sb = sandbox("badfunctions");
    sb.set_call_timeout(None);
    let kill = sb.kill_handle();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        kill.kill();
    });
    assert!(matches!(sb.call("spin", b""), Err(CallError::Killed)));
    killer.join().unwrap();
    assert_eq!(text(sb.call("counter", b"")), "1");
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4
}

#[test]
fn ten_thousand_calls_with_resets_leave_host_memory_flat() {
    let mut sb = sandbox("badfunctions");
    for _ in 0..1000 {
        sb.call("heap-grow", b"y").unwrap();
    }
    let before = rss_kib();
    for _ in 0..10_000 {
        assert_eq!(text(sb.call("heap-grow", b"y")), "1");
    }
    let grew = rss_kib().saturating_sub(before);
    assert!(grew < 2048, "host RSS grew by {grew} KiB over 10,000 calls");
}

#[test]
fn sandboxes_made_from_a_snapshot_behave_like_the_original() {
    let first = sandbox("badfunctions");
    let mut copy = Sandbox::from_template(first.template()).unwrap();
    assert_eq!(text(copy.call("init-state", b"")), "42");
    assert_eq!(text(copy.call("counter", b"")), "1");
    assert_eq!(text(copy.call("counter", b"")), "1");
}

#[test]
fn a_pool_serves_eight_concurrent_callers() {
    let pool = Arc::new(SandboxPool::new(sandbox("badfunctions"), 4).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    let input = format!("caller {t} call {i}");
                    assert_eq!(
                        pool.call("echo", input.as_bytes()).unwrap(),
                        input.as_bytes()
                    );
                    assert_eq!(pool.call("counter", b"").unwrap(), b"1");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Threads of this process named `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter(|t| {
            let comm = t.as_ref().unwrap().path().join("comm");
            std::fs::read_to_string(comm).unwrap_or_default().trim() == name
        })
        .count()
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn an_elastic_pool_grows_while_callers_wait_and_shrinks_when_idle() {
    let limits = PoolLimits {
        min: 1,
        max: 3,
        idle: Duration::from_millis(300),
    };
    let pool = Arc::new(SandboxPool::elastic(sandbox("badfunctions"), limits).unwrap());
    assert_eq!((pool.size(), pool.limits()), (1, limits));
    assert_eq!(threads_named("pvrun-grow"), 1);
    // Four callers that each hold a sandbox for 600 ms: the pool grows to 3, not beyond.
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let pool = pool.clone();
            std::thread::spawn(move || pool.call("wait", b"600").unwrap())
        })
        .collect();
    wait_until("three busy sandboxes", Duration::from_secs(2), || {
        pool.stats().busy == 3
    });
    let st = pool.stats();
    assert_eq!((st.size, st.grown, st.waiting), (3, 2, 1), "{st:?}");
    for c in callers {
        assert!(
            String::from_utf8(c.join().unwrap())
                .unwrap()
                .starts_with("waited ")
        );
    }
    // Grown sandboxes start from the snapshot like the first.
    let counts: Vec<_> = (0..3)
        .map(|_| {
            let pool = pool.clone();
            std::thread::spawn(move || pool.call("counter", b"").unwrap())
        })
        .collect();
    for c in counts {
        assert_eq!(c.join().unwrap(), b"1");
    }
    wait_until("the pool back at min", Duration::from_secs(3), || {
        pool.size() == 1
    });
    let st = pool.stats();
    assert_eq!((st.shrunk, st.grow_failures), (2, 0), "{st:?}");
    assert_eq!(pool.call("echo", b"after").unwrap(), b"after");
    // Dropping the pool ends its grower.
    drop(Arc::into_inner(pool).unwrap());
    assert_eq!(threads_named("pvrun-grow"), 0);
}

#[test]
fn a_fixed_pool_never_grows() {
    let pool =
        Arc::new(SandboxPool::elastic(sandbox("badfunctions"), PoolLimits::fixed(2)).unwrap());
    let callers: Vec<_> = (0..3)
        .map(|_| {
            let pool = pool.clone();
            std::thread::spawn(move || pool.call("wait", b"300").unwrap())
        })
        .collect();
    wait_until("a caller waiting", Duration::from_secs(2), || {
        pool.stats().waiting == 1
    });
    for c in callers {
        c.join().unwrap();
    }
    let st = pool.stats();
    assert_eq!((st.size, st.min, st.max, st.grown), (2, 2, 2, 0), "{st:?}");
}

/// One HTTP/1.1 request on `stream` (kept alive); returns (status, outcome header, body).
fn http(stream: &mut TcpStream, method: &str, path: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(body).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status: u16 = line.split(' ').nth(1).unwrap().parse().unwrap();
    let (mut len, mut outcome) = (0usize, String::new());
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(": ").unwrap();
        match k.to_ascii_lowercase().as_str() {
            "content-length" => len = v.parse().unwrap(),
            "x-pvrun-outcome" => outcome = v.to_string(),
            _ => {}
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).unwrap();
    (status, outcome, body)
}

/// Kills the gateway process when the test ends, even when it fails.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_gateway_answers_http_clients() {
    let child = Command::new(common::pvrun_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--pool",
            "2",
            "--timeout",
            "0.5",
        ])
        .arg(guest("badfunctions"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    let mut line = String::new();
    BufReader::new(child.0.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| panic!("no address in: {line}"))
        .to_string();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    assert_eq!(
        http(&mut s, "POST", "/echo", b"over http"),
        (200, "ok".into(), b"over http".to_vec())
    );
    for _ in 0..20 {
        assert_eq!(http(&mut s, "POST", "/counter", b"").2, b"1");
    }
    assert_eq!(http(&mut s, "POST", "/missing", b"").0, 404);
    let (code, outcome, _) = http(&mut s, "POST", "/spin", b"");
    assert_eq!((code, outcome.as_str()), (504, "timeout"));
    let (code, outcome, body) = http(&mut s, "POST", "/panic", b"");
    assert_eq!((code, outcome.as_str()), (500, "panic"));
    assert!(String::from_utf8_lossy(&body).contains("function panicked on purpose"));
    assert_eq!(http(&mut s, "POST", "/fault", b"").0, 500);
    assert_eq!(http(&mut s, "GET", "/echo", b"").0, 405);
    let (code, _, list) = http(&mut s, "GET", "/", b"");
    assert_eq!(code, 200);
    assert!(
        String::from_utf8_lossy(&list)
            .lines()
            .any(|l| l == "counter")
    );
    assert_eq!(
        http(&mut s, "POST", "/echo", b"still fine").2,
        b"still fine"
    );
}

#[test]
fn the_gateway_reports_a_port_in_use_in_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(common::pvrun_bin())
        .args(["serve", "--listen", &addr])
        .arg(guest("badfunctions"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("already in use"), "{stderr}");
}

#[test]
fn a_guest_that_is_not_a_function_guest_is_refused_clearly() {
    match Sandbox::new(&guest("hello"), config()) {
        Err(e) => assert!(e.to_string().contains("is not a function guest"), "{e}"),
        Ok(_) => panic!("hello was accepted as a function guest"),
    }
    let r = common::pvrun(&guest("badfunctions"), &[], &[]);
    assert_eq!(r.status, 125);
    assert!(r.stderr.contains("pvrun serve"), "{}", r.stderr);
}

#[test]
fn sandboxes_made_in_pre_created_vms_behave_like_the_original() {
    let first = sandbox("badfunctions");
    first.template().prepare_shells(2).unwrap();
    for _ in 0..3 {
        // Two come from prepared VMs, the third is created on the spot.
        let mut sb = Sandbox::from_template(first.template()).unwrap();
        assert_eq!(text(sb.call("init-state", b"")), "42");
        assert_eq!(text(sb.call("counter", b"")), "1");
        assert_eq!(text(sb.call("counter", b"")), "1");
    }
    first.template().keep_shells_ready(1);
    std::thread::sleep(Duration::from_millis(200));
    let mut sb = Sandbox::from_template(first.template()).unwrap();
    assert_eq!(text(sb.call("echo", b"refilled")), "refilled");
}

#[test]
fn vector_registers_do_not_carry_data_into_the_next_call() {
    let mut sb = sandbox("badfunctions");
    let clean = sb.call("xmm-get", b"").unwrap();
    assert_eq!(text(sb.call("xmm-set", b"secret!!")), "set");
    assert_eq!(
        sb.call("xmm-get", b"").unwrap(),
        clean,
        "xmm15 leaked across a reset"
    );
    // Without a reset the value is still there: the test can see a leak.
    sb.reset().unwrap();
    sb.call_keep_state("xmm-set", b"secret!!").unwrap();
    assert_eq!(sb.call_keep_state("xmm-get", b"").unwrap(), b"secret!!");
}

#[test]
fn ymm_zmm_and_opmask_registers_do_not_carry_data_into_the_next_call() {
    let mut sb = sandbox("badfunctions");
    let clean = text(sb.call("avx-get", b""));
    eprintln!("vector state at the snapshot: {clean}");
    let set = text(sb.call("avx-set", b"\x5a"));
    assert!(set.starts_with("set "), "{set}");
    if set == "set none" {
        // No AVX on this CPU or host: there is no state beyond SSE to leak.
        assert_eq!(clean, "none");
        return;
    }
    let leaked = "5a5a5a5a5a5a5a5a";
    assert!(!clean.contains(leaked), "{clean}");
    let after = text(sb.call("avx-get", b""));
    assert_eq!(after, clean, "vector state leaked across a reset ({set})");
    // Without a reset the values are still there: the test can see a leak (every
    // register `avx-set` wrote, upper halves included).
    sb.reset().unwrap();
    sb.call_keep_state("avx-set", b"\x5a").unwrap();
    let kept = text(sb.call_keep_state("avx-get", b""));
    for field in kept.split(' ').skip(1) {
        let (name, value) = field.split_once('=').unwrap();
        let expect = if name == "k7" {
            "5a5a".to_string()
        } else {
            leaked.repeat(value.len() / 16)
        };
        assert_eq!(value, expect, "{name} was not kept without a reset: {kept}");
    }
    // A sandbox made from the template starts clean too.
    sb.reset().unwrap();
    sb.call_keep_state("avx-set", b"\x5a").unwrap();
    let mut copy = Sandbox::from_template(sb.template()).unwrap();
    assert_eq!(text(copy.call("avx-get", b"")), clean);
}

fn watchdog_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim() == "pvrun-watchdog")
        })
        .count()
}

#[test]
fn one_watchdog_thread_stops_every_sandbox_at_its_own_deadline() {
    let first = sandbox("badfunctions");
    let calls: Vec<_> = (0..6u64)
        .map(|i| {
            let template = first.template().clone();
            std::thread::spawn(move || {
                let mut sb = Sandbox::from_template(&template).unwrap();
                // A long deadline armed first, then a shorter one: the watchdog, which
                // would next look at this sandbox only when the long one passes, must be
                // told about the earlier one.
                sb.set_call_timeout(Some(Duration::from_secs(30)));
                assert_eq!(text(sb.call("echo", b"first")), "first");
                let limit = Duration::from_millis(200 + 150 * i);
                sb.set_call_timeout(Some(limit));
                let t = Instant::now();
                let r = sb.call("spin", b"");
                let took = t.elapsed();
                let after = sb.call("echo", b"after");
                (limit, took, r, after)
            })
        })
        .collect();
    for c in calls {
        let (limit, took, r, after) = c.join().unwrap();
        assert!(matches!(r, Err(CallError::Timeout(_))), "{r:?}");
        assert!(
            took >= limit,
            "stopped after {took:?}, before its {limit:?} deadline"
        );
        assert!(
            took < limit + Duration::from_secs(5),
            "a {limit:?} deadline stopped the call only after {took:?}"
        );
        assert_eq!(text(after), "after");
    }
    assert_eq!(
        watchdog_threads(),
        1,
        "one watchdog thread for every sandbox"
    );
}
