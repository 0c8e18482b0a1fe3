//! `Sandbox::trim`: an idle sandbox gives back its memory (its private pages, the host
//! page tables over them and KVM's memory slot) and answers its next call exactly as a
//! freshly reset one would, with fresh randomness. Real guests on real KVM.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::guest;
use host_vmm::{CallError, Sandbox, SandboxConfig};

fn config() -> SandboxConfig {
    SandboxConfig {
        call_timeout: Some(Duration::from_secs(5)),
        console: Arc::new(Mutex::new(Box::new(std::io::sink()))),
        ..SandboxConfig::default()
    }
}

fn text(r: Result<Vec<u8>, CallError>) -> String {
    String::from_utf8(r.expect("call failed")).unwrap()
}

fn rss_anon_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with("RssAnon:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn a_trimmed_sandbox_answers_like_a_reset_one() {
    let first = Sandbox::new(&guest("badfunctions"), config()).expect("needs /dev/kvm");
    let mut sb = Sandbox::from_template(first.template()).unwrap();
    assert_eq!(text(sb.call_keep_state("counter", b"")), "1");
    assert_eq!(text(sb.call_keep_state("counter", b"")), "2");
    let before = text(sb.call_keep_state("random", b""));
    assert!(
        sb.trim().unwrap(),
        "a sandbox made from a template can be trimmed"
    );
    // Trimming twice is harmless.
    assert!(sb.trim().unwrap());
    // Nothing of the calls before survives: the counter starts again, and what the
    // initialisation left is there.
    assert_eq!(text(sb.call_keep_state("counter", b"")), "1");
    assert_eq!(text(sb.call("init-state", b"")), "42");
    // A trimmed sandbox does not repeat the randomness it had before the trim, nor share
    // another trimmed sandbox's.
    let after = text(sb.call("random", b""));
    let mut other = Sandbox::from_template(first.template()).unwrap();
    other.call("echo", b"x").unwrap();
    assert!(other.trim().unwrap());
    let theirs = text(other.call("random", b""));
    let fields = |s: &str| s.split(' ').map(str::to_string).collect::<Vec<_>>();
    let (b, a, t) = (fields(&before), fields(&after), fields(&theirs));
    assert_eq!(a.len(), 3, "{after}");
    for i in 0..3 {
        assert_ne!(
            b[i], a[i],
            "field {i} repeated across the trim: {before} / {after}"
        );
        assert_ne!(
            a[i], t[i],
            "field {i} shared by two sandboxes: {after} / {theirs}"
        );
    }
    // Many pages touched again after a trim are all there.
    assert_eq!(text(sb.call("touch-pages", b"200")), "ok");
    assert_eq!(text(sb.call("echo", b"still here")), "still here");
}

#[test]
fn trimmed_sandboxes_still_time_out_fault_and_recover() {
    let first = Sandbox::new(&guest("badfunctions"), config()).expect("needs /dev/kvm");
    let mut sb = Sandbox::from_template(first.template()).unwrap();
    sb.set_call_timeout(Some(Duration::from_millis(300)));
    assert!(sb.trim().unwrap());
    assert!(matches!(sb.call("spin", b""), Err(CallError::Timeout(_))));
    assert!(sb.trim().unwrap());
    assert!(matches!(sb.call("fault", b""), Err(CallError::Fault(_))));
    assert!(sb.trim().unwrap());
    assert_eq!(text(sb.call("echo", b"ok")), "ok");
}

#[test]
fn trim_gives_back_the_pages_calls_wrote() {
    let first = Sandbox::new(&guest("badfunctions"), config()).expect("needs /dev/kvm");
    const N: usize = 16;
    const PAGES: u64 = 200;
    let mut many: Vec<Sandbox> = (0..N)
        .map(|_| Sandbox::from_template(first.template()).unwrap())
        .collect();
    for sb in &mut many {
        assert_eq!(
            text(sb.call("touch-pages", PAGES.to_string().as_bytes())),
            "ok"
        );
        // A reset copies the snapshot back into the written pages: they stay private.
        sb.reset().unwrap();
    }
    let held = rss_anon_kib();
    for sb in &mut many {
        assert!(sb.trim().unwrap());
    }
    let freed = held.saturating_sub(rss_anon_kib());
    let expected = N as u64 * PAGES * 4;
    assert!(
        freed >= expected * 9 / 10,
        "trimming {N} sandboxes that each wrote {PAGES} pages freed {freed} KiB, expected about {expected} KiB"
    );
    for sb in &mut many {
        assert_eq!(text(sb.call("init-state", b"")), "42");
    }
}

#[test]
fn the_booted_sandbox_is_reset_but_not_trimmed() {
    // Its memory is its own (not a view of the snapshot): dropping pages would zero them.
    let mut sb = Sandbox::new(&guest("badfunctions"), config()).expect("needs /dev/kvm");
    assert_eq!(text(sb.call_keep_state("counter", b"")), "1");
    assert!(!sb.trim().unwrap());
    assert_eq!(text(sb.call_keep_state("counter", b"")), "1");
    assert_eq!(text(sb.call("init-state", b"")), "42");
}

#[test]
fn a_trimmed_sandbox_can_go_warm() {
    // Its warm vCPU thread runs under the vCPU filter and registers the memory slot again
    // there.
    let first = Sandbox::new(&guest("badfunctions"), config()).expect("needs /dev/kvm");
    let mut sb = Sandbox::from_template(first.template()).unwrap();
    assert_eq!(text(sb.call_keep_state("counter", b"")), "1");
    assert!(sb.trim().unwrap());
    let mut warm = sb.into_warm(host_vmm::WarmOptions::default()).unwrap();
    assert_eq!(text(warm.call("counter", b"")), "1");
    assert_eq!(text(warm.call("counter", b"")), "2");
    assert_eq!(text(warm.call("init-state", b"")), "42");
}
