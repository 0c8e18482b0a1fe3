//! Block storage over shared rings: the kvstore unikernel keeps its data across reboots
//! and crashes, data round-trips byte-exactly, read-only disks stay untouched, and
//! guests that scribble on their rings cannot hurt the host.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Run, guest, pvrun};

/// A disk image in its own temporary directory, removed (with the directory) on drop.
struct TempImage(PathBuf);

impl std::ops::Deref for TempImage {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempImage {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A fresh disk image of `mib` MiB in a per-test temporary directory.
fn image(test: &str, mib: u64) -> TempImage {
    let dir = std::env::temp_dir().join(format!("pvrun-block-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(mib << 20).unwrap();
    TempImage(path)
}

fn disk_opt(name: &str, path: &Path, ro: bool) -> String {
    format!("{name}={}{}", path.display(), if ro { ",ro" } else { "" })
}

fn kv(img: &Path, args: &[&str]) -> Run {
    let d = disk_opt("data", img, false);
    pvrun(&guest("kvstore"), &["--timeout", "60", "--disk", &d], args)
}

#[test]
fn kvstore_keeps_data_across_reboots() {
    let img = image("reboot", 16);
    let r = kv(
        &img,
        &[
            "put",
            "alpha",
            "1",
            ";",
            "put",
            "beta",
            "two words",
            ";",
            "get",
            "alpha",
        ],
    );
    assert_eq!(r.status, 0, "{} {}", r.stdout, r.stderr);
    assert!(r.stdout.contains("recovered 0 records"), "{}", r.stdout);
    assert!(r.stdout.contains("alpha=1\n"), "{}", r.stdout);

    let r = kv(
        &img,
        &["get", "beta", ";", "del", "alpha", ";", "get", "alpha"],
    );
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("recovered 2 records, 2 keys"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("beta=two words\n"), "{}", r.stdout);
    assert!(r.stdout.contains("alpha not found\n"), "{}", r.stdout);

    let r = kv(&img, &["list", ";", "count"]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("recovered 3 records, 1 keys"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.ends_with("beta=two words\n1\n"), "{}", r.stdout);
}

#[test]
fn kvstore_survives_a_host_side_kill_in_the_middle_of_writes() {
    let img = image("crash", 32);
    let d = disk_opt("data", &img, false);
    let mut child = Command::new(common::pvrun_bin())
        .args(["--timeout", "120", "--disk", &d])
        .arg(guest("kvstore"))
        .args(["--", "fill", "100000", "k"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut last = None;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let t = Instant::now();
    while let Some(Ok(line)) = lines.next() {
        if let Some(k) = line.strip_prefix("flushed k-") {
            last = Some(k.parse::<u64>().unwrap());
            if last >= Some(300) {
                break;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(60), "fill is too slow");
    }
    // SIGKILL: no chance to finish the write in progress or flush anything.
    child.kill().unwrap();
    child.wait().unwrap();
    let flushed = last.expect("the guest reported no flushed key") + 1;

    let r = kv(&img, &["verify", "100000", "k"]);
    assert_eq!(r.status, 0, "{} {}", r.stdout, r.stderr);
    let v = r
        .stdout
        .lines()
        .find(|l| l.starts_with("verified "))
        .unwrap();
    let n: u64 = v.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(
        n >= flushed,
        "only {n} keys survived but {flushed} were reported flushed: {v}"
    );
    assert!(
        v.contains(" bad 0"),
        "corrupted values after the crash: {v}"
    );
    assert!(!v.contains("gap"), "a hole in the recovered log: {v}");
    // The store still works after recovery.
    let r = kv(&img, &["put", "after", "crash", ";", "get", "after"]);
    assert!(
        r.stdout.contains("after=crash\n"),
        "{} {}",
        r.stdout,
        r.stderr
    );
}

#[test]
fn a_guest_that_declares_a_disk_does_not_boot_without_it() {
    let r = pvrun(&guest("kvstore"), &[], &["count"]);
    assert_eq!(r.status, 125, "{}", r.stderr);
    assert!(
        r.stderr.contains("needs a block device named `data`") && r.stderr.contains("--disk data="),
        "{}",
        r.stderr
    );
}

#[test]
fn disk_image_problems_are_one_clear_line() {
    let missing = Path::new("/nonexistent/disk.img");
    let r = pvrun(
        &guest("kvstore"),
        &["--disk", &disk_opt("data", missing, false)],
        &["count"],
    );
    assert_eq!(r.status, 125);
    assert!(
        r.stderr
            .contains("does not exist (create one with `truncate -s 64M"),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);

    // The same image cannot be attached read-write to two VMs at once.
    let img = image("locked", 4);
    let d = disk_opt("data", &img, false);
    let mut first = Command::new(common::pvrun_bin())
        .args(["--timeout", "20", "--disk", &d])
        .arg(guest("misbehave"))
        .args(["--", "sleep-forever"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(first.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "sleeping\n");
    let r = kv(&img, &["count"]);
    first.kill().unwrap();
    first.wait().unwrap();
    assert_eq!(r.status, 125, "{}", r.stderr);
    assert!(r.stderr.contains("in use by another VM"), "{}", r.stderr);
}

fn blk(mode: &[&str], ro: bool) -> Run {
    let img = image(&format!("{}-{ro}", mode[0]), 4);
    std::fs::write(&img, vec![0xabu8; 4 << 20]).unwrap();
    let d = disk_opt("disk", &img, ro);
    let r = pvrun(
        &guest("misbehave"),
        &["--timeout", "20", "--disk", &d],
        mode,
    );
    if ro {
        let after = std::fs::read(&img).unwrap();
        assert!(
            after.iter().all(|&b| b == 0xab),
            "a read-only image was modified"
        );
    }
    r
}

#[test]
fn requests_with_bad_buffers_get_bad_address_and_touch_nothing() {
    for mode in ["blk-bad-addr", "blk-pagetables", "blk-text", "blk-bootinfo"] {
        let r = blk(&[mode], false);
        assert_eq!(r.status, 0, "{mode}: {}", r.stderr);
        assert_eq!(r.stdout, "status=-2\n", "{mode}");
    }
}

#[test]
fn requests_with_bad_lengths_ranges_or_ops_get_errors() {
    assert_eq!(
        blk(&["blk-len-overflow"], false).stdout,
        "status=-3 -3 -3\n"
    );
    assert_eq!(blk(&["blk-past-end"], false).stdout, "status=-8 -8\n");
    assert_eq!(blk(&["blk-bad-op"], false).stdout, "status=-5\n");
}

#[test]
fn read_only_disks_refuse_writes() {
    assert_eq!(blk(&["blk-write"], true).stdout, "status=-7\n");
    assert_eq!(blk(&["blk-write"], false).stdout, "status=512\n");
}

#[test]
fn ring_indices_far_ahead_break_only_that_ring() {
    for mode in ["blk-idx-far", "blk-overflow-queue"] {
        let r = blk(&[mode], false);
        assert_eq!(r.status, 0, "{mode}: {}", r.stderr);
        assert_eq!(r.stdout, "ring status=1\n", "{mode}: {}", r.stderr);
        assert!(
            r.stderr.contains("pvrun: device `disk` broken: req_prod"),
            "{mode}: {}",
            r.stderr
        );
    }
}

#[test]
fn a_doorbell_storm_is_harmless() {
    let r = blk(&["blk-doorbell-storm", "100000"], false);
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "storm done status=512\n");
}

#[test]
fn a_guest_rewriting_its_ring_while_the_host_reads_it_cannot_hurt_the_host() {
    let r = blk(&["blk-scribble"], false);
    assert_eq!(r.status, 0, "{} {}", r.stdout, r.stderr);
    assert!(
        r.stdout.starts_with("scribble done ring status="),
        "{}",
        r.stdout
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn garbage_in_every_slot_gets_an_answer_and_the_ring_keeps_working() {
    let r = blk(&["blk-scribble-slots"], false);
    assert_eq!(r.status, 0, "{} {}", r.stdout, r.stderr);
    let line = r.stdout.trim();
    let field = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {line}"))
    };
    assert!(field("requests=") > 10, "{line}");
    assert_eq!(field("requests="), field("answered="), "{line}");
    assert!(line.ends_with("ring status=0"), "{line}");
}

#[test]
fn an_in_process_vm_with_a_disk_stops_its_confined_io_thread_cleanly() {
    // The I/O thread runs under a seccomp filter; a system call it may not make (say, on
    // its way out) would kill this whole test process.
    let img = image("inproc", 8);
    let elf = std::sync::Arc::new(host_vmm::GuestImage::from_file(&guest("kvstore")).unwrap());
    for round in 0..3 {
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let cfg = host_vmm::VmConfig {
            args: vec![
                "kvstore".into(),
                "put".into(),
                format!("k{round}"),
                "v".into(),
                ";".into(),
                "count".into(),
            ],
            stdout: Box::new(Sink(out.clone())),
            disks: vec![host_vmm::DiskConfig {
                name: "data".into(),
                path: img.to_path_buf(),
                read_only: false,
            }],
            ..host_vmm::VmConfig::default()
        };
        let mut vm = host_vmm::Vm::new(elf.clone(), cfg).unwrap();
        assert_eq!(vm.run().unwrap(), host_vmm::Outcome::Exited(0));
        drop(vm); // joins the I/O thread, which closes the image on its way out
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        assert!(text.ends_with(&format!("{}\n", round + 1)), "{text}");
    }
}

#[test]
fn odd_sizes_offsets_and_batches_round_trip_and_the_whole_disk_reads_back() {
    let img = image("roundtrip", 16);
    let d = disk_opt("bench", &img, false);
    // The SDK self-test: unaligned and past-end requests refused, a transfer larger than
    // the largest request split and read back identical, a batch of more requests than
    // the ring has slots with a flush in the middle, a dropped batch writing nothing.
    let r = pvrun(
        &guest("blockbench"),
        &["--timeout", "60", "--disk", &d],
        &["selftest"],
    );
    assert_eq!(r.status, 0, "{} {}", r.stdout, r.stderr);
    assert!(r.stdout.contains("selftest ok"), "{}", r.stdout);
    // What the guest wrote is on the disk, byte for byte: first a pattern over 8 MiB +
    // 3 sectors (two 4 MiB requests and a partial one), then sector k = byte k for the
    // 517 sectors of the batch.
    let on_disk = std::fs::read(&img).unwrap();
    let batch = 517 * 512;
    for (k, sector) in on_disk[..batch].chunks(512).enumerate() {
        assert!(sector.iter().all(|&b| b == k as u8), "sector {k} differs");
    }
    let big = (8 << 20) + 3 * 512;
    for (i, &b) in on_disk.iter().enumerate().take(big).skip(batch) {
        assert_eq!(
            b,
            (i as u8).wrapping_mul(31).wrapping_add(7),
            "byte {i} differs"
        );
    }
    // A full-disk sequential read, in 1 MiB requests.
    let r = pvrun(
        &guest("blockbench"),
        &["--timeout", "60", "--disk", &d],
        &["seq-read", "16", "1024"],
    );
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .starts_with(&format!("seq-read bytes={} reqs=16 ", 16 << 20)),
        "{}",
        r.stdout
    );
}
