//! Misbehaving guests are contained: every crash is reported in one clear line with the
//! documented exit status, every bad hypercall gets an error status back, and the host
//! never panics, hangs or touches memory outside the guest.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{guest, misbehave};
use host_vmm::{GuestImage, Outcome, Vm, VmConfig};

/// Runs a mode that must crash the guest; checks status 139 and the report's words.
fn crashes(mode: &str, words: &[&str]) {
    let r = misbehave(&[mode]);
    assert_eq!(
        r.status, 139,
        "{mode}: status {} stderr {}",
        r.status, r.stderr
    );
    // The report is one line; the guest's call stack may follow, indented.
    let mut lines = r.stderr.trim_end().lines();
    let line = lines.next().unwrap_or("");
    for frame in lines {
        assert!(frame.starts_with(" "), "{mode}: not a frame line: {frame}");
    }
    assert!(line.starts_with("pvrun: guest crashed: "), "{mode}: {line}");
    for w in words {
        assert!(line.contains(w), "{mode}: report lacks `{w}`: {line}");
    }
}

#[test]
fn null_pointer_dereference_is_reported() {
    crashes(
        "null-read",
        &[
            "page fault (#PF)",
            "reading 0x0",
            "null pointer",
            "misbehave::",
        ],
    );
    crashes("null-write", &["writing 0x8", "null pointer"]);
}

#[test]
fn writing_to_text_is_refused() {
    crashes(
        "write-text",
        &["page fault", "writing", "read-only", "misbehave::main+0x"],
    );
}

#[test]
fn executing_data_stack_or_heap_is_refused() {
    crashes("exec-data", &["executing 0x6", "not executable (W^X)"]);
    crashes("exec-stack", &["executing", "not executable (W^X)"]);
    crashes("exec-heap", &["executing", "not executable (W^X)"]);
}

#[test]
fn stack_overflow_hits_the_guard() {
    crashes(
        "stack-overflow",
        &["stack overflow", "guard", "misbehave::recurse"],
    );
}

#[test]
fn privileged_instructions_fault_in_ring_3() {
    crashes("cli", &["general protection fault (#GP)", "`cli`"]);
    crashes("hlt", &["#GP", "`hlt`"]);
    crashes("mov-cr3", &["#GP", "control register"]);
    crashes("wrmsr", &["#GP", "`wrmsr`"]);
    crashes("rdmsr", &["#GP", "`rdmsr`"]);
    crashes("out-port", &["#GP", "port I/O outside the hypercall ports"]);
}

#[test]
fn other_exceptions_are_named() {
    crashes("int3", &["breakpoint (#BP)"]);
    crashes("ud2", &["invalid opcode (#UD)"]);
    crashes("div-zero", &["divide error (#DE)"]);
}

#[test]
fn host_structures_are_out_of_reach() {
    crashes("write-bootinfo", &["writing 0x10000", "read-only"]);
    crashes(
        "read-pagetables",
        &["reading 0x100000", "belongs to the host"],
    );
}

#[test]
fn panic_reports_message_and_location_with_status_101() {
    let r = misbehave(&["panic"]);
    assert_eq!(r.status, 101);
    assert!(
        r.stderr.contains("panicked at misbehave/src/main.rs:"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("guest panicked on purpose: 42"),
        "{}",
        r.stderr
    );
}

#[test]
fn allocation_larger_than_the_heap_panics_cleanly() {
    let r = misbehave(&["big-alloc"]);
    assert_eq!(r.status, 101, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("memory allocation of 68719476736 bytes failed"),
        "{}",
        r.stderr
    );
}

#[test]
fn infinite_loop_is_stopped_by_the_timeout() {
    let t = Instant::now();
    let r = common::pvrun(&guest("misbehave"), &["--timeout", "0.3"], &["loop"]);
    assert_eq!(r.status, 124, "{}", r.stderr);
    assert!(r.stdout.contains("looping"));
    assert!(r.stderr.contains("timed out after"), "{}", r.stderr);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the timeout did not stop the guest"
    );
}

#[test]
fn a_guest_sleeping_forever_is_stopped_by_the_timeout() {
    let r = common::pvrun(
        &guest("misbehave"),
        &["--timeout", "0.2"],
        &["sleep-forever"],
    );
    assert_eq!(r.status, 124, "{}", r.stderr);
    assert!(r.stdout.contains("sleeping") && !r.stdout.contains("woke"));
}

#[test]
fn a_running_guest_can_be_killed_from_another_thread() {
    let image = Arc::new(GuestImage::from_file(&guest("misbehave")).unwrap());
    for mode in ["loop", "sleep-forever"] {
        let cfg = VmConfig {
            args: vec!["misbehave".into(), mode.into()],
            stdout: Box::new(std::io::sink()),
            ..VmConfig::default()
        };
        let mut vm = Vm::new(image.clone(), cfg).unwrap();
        let kill = vm.kill_handle();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            kill.kill();
        });
        assert_eq!(vm.run().unwrap(), Outcome::Killed, "{mode}");
        killer.join().unwrap();
    }
}

/// Runs a hypercall-probe mode and returns its stdout (the guest must exit 0).
fn probe(mode: &str) -> String {
    let r = misbehave(&[mode]);
    assert_eq!(r.status, 0, "{mode}: {} {}", r.stdout, r.stderr);
    r.stdout
}

#[test]
fn hypercalls_with_wild_pointers_get_bad_address() {
    assert_eq!(probe("hc-wild-pointer"), "status=-2\n");
    assert_eq!(probe("hc-null-buf"), "status=-2\n");
    assert_eq!(probe("hc-arg-outside"), "status=-2\nstatus2=-2\n");
    assert_eq!(probe("hc-host-region"), "status=-2\nstatus2=-2\n");
}

#[test]
fn hypercalls_with_overflowing_or_huge_lengths_get_bad_length() {
    assert_eq!(probe("hc-overflow-len"), "status=-3\nstatus2=-3\n");
    assert_eq!(probe("hc-too-long"), "status=-3\n");
}

#[test]
fn unknown_calls_unaligned_structs_and_bad_fields_get_errors() {
    assert_eq!(probe("hc-unknown"), "status=-1\nstatus0=-1\n");
    assert_eq!(probe("hc-unaligned"), "status=-4\n");
    assert_eq!(probe("hc-bad-stream"), "status=-5\n");
    assert_eq!(probe("hc-exit-bad-arg"), "status=-2\n");
}

#[test]
fn abort_with_an_unreadable_message_still_stops_the_guest() {
    let r = misbehave(&["hc-abort-wild"]);
    assert_eq!(r.status, 101);
    assert!(r.stderr.contains("message unreadable"), "{}", r.stderr);
    assert!(!r.stdout.contains("status="));
}

#[test]
fn wait_with_a_past_deadline_returns_at_once() {
    let out = probe("hc-wait-past");
    assert!(out.starts_with("status=0 waited_ms="), "{out}");
}

#[test]
fn a_storm_of_bad_hypercalls_is_answered_one_by_one() {
    let out = probe("hc-storm");
    // 10,000 rounds of a wild call (aborts skipped) and an empty write.
    assert!(out.starts_with("storm calls=20000 errors="), "{out}");
    let errors: u64 = out.trim().rsplit('=').next().unwrap().parse().unwrap();
    assert!(errors > 9000, "{out}");
}

#[test]
fn console_ring_output_arrives_complete_and_in_order() {
    let r = misbehave(&["print-lots"]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    let mut lines = r.stdout.lines();
    for i in 0..2000 {
        assert_eq!(lines.next(), Some(format!("line {i}").as_str()));
    }
    let long = lines.next().unwrap();
    assert_eq!(long.len(), 100_000);
    assert!(long.bytes().all(|b| b == b'x'));
    assert_eq!(lines.next(), Some("done"));
    assert_eq!(lines.next(), None);
    assert_eq!(r.stderr, "to stderr\n");
}

#[test]
fn output_written_before_a_crash_is_delivered_before_the_report() {
    let r = misbehave(&["print-then-crash"]);
    assert_eq!(r.status, 139);
    assert_eq!(r.stdout, "before crash\n");
    let mut err = r.stderr.lines();
    assert_eq!(err.next(), Some("stderr before crash"));
    assert!(err.next().unwrap().contains("null pointer dereference"));
}

#[test]
fn a_corrupted_console_ring_stops_the_guest_with_a_report() {
    for (mode, words) in [
        ("ring-huge-producer", "ahead of the consumer"),
        ("ring-bad-stream", "unknown stream 9"),
        ("ring-cut-record", "extends past the published data"),
    ] {
        let r = misbehave(&[mode]);
        assert_eq!(r.status, 139, "{mode}: {}", r.stderr);
        assert!(
            r.stderr.contains("console ring corrupted") && r.stderr.contains(words),
            "{mode}: {}",
            r.stderr
        );
        assert!(!r.stdout.contains("survived"), "{mode}");
    }
}

#[test]
fn a_scribbled_consumer_index_does_not_confuse_the_host() {
    // The host keeps its own consumer count; the guest's copy is only advice to the guest.
    let r = misbehave(&["ring-scribble-consumer"]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "after scribble\nstill here\n");
}

#[test]
fn progress_printed_while_computing_arrives_while_the_guest_runs() {
    use std::io::BufRead;
    let mut child = std::process::Command::new(common::pvrun_bin())
        .args(["--timeout", "20"])
        .arg(guest("misbehave"))
        .args(["--", "progress"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "tick 0");
    let first = start.elapsed();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let total = start.elapsed();
    assert!(child.wait().unwrap().success());
    assert_eq!(rest, ["tick 1", "tick 2", "tick 3", "tick 4", "tick 5"]);
    // The guest computes ~1.8 s in all; its first line must not wait for the end.
    assert!(
        first + Duration::from_millis(900) < total,
        "first line after {first:?}, guest done after {total:?}"
    );
}
