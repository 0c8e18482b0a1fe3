//! `ctr run --rm` of the hello guest through the pvrun shim, beside `ctr run --rm` of a
//! static hello binary with runc (containerd's default runtime), from the same private
//! containerd in the same run: from `ctr` starting to `ctr` exiting, medians of
//! alternating runs. Target: the pvrun guest within 1.2x of runc. Needs root, /dev/kvm,
//! containerd and a C compiler (for the static hello).

#[path = "../tests/support/mod.rs"]
mod support;

// The table and chart every benchmark prints and writes (host-vmm's benchmark support).
#[path = "../../host-vmm/benches/support/report.rs"]
mod report;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use report::{Baseline, Ratio, Report, ms};
use support::{Containerd, RUNTIME, hello, text};

const RUNC: &str = "io.containerd.runc.v2";

/// A static hello with no libc: write(2) and exit(2), for runc.
const STATIC_HELLO: &str = r#"
void _start(void) {
    static const char m[] = "Hello from runc!\n";
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(1), "D"(1), "S"(m), "d"(sizeof m - 1) : "rcx", "r11", "memory");
    __asm__ volatile("syscall" : : "a"(60), "D"(0) : "rcx", "r11", "memory");
    __builtin_unreachable();
}
"#;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let c = Containerd::start("bench");
    let pvrun_image = c.import_guest(&hello(), "hello");

    let src = c.dir.join("hello.c");
    std::fs::write(&src, STATIC_HELLO).unwrap();
    let bin = c.dir.join("static-hello");
    let cc = Command::new("cc")
        .args(["-O2", "-static", "-nostdlib", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("a C compiler (cc) is needed for runc's static hello");
    assert!(cc.status.success(), "{}", text(&cc.stderr));
    let tar = c.dir.join("static-hello.tar");
    let info = pvrun_oci::GuestInfo {
        abi_version: 0,
        kind: pvrun_oci::GuestKind::Program,
        min_mem: 0,
        default_mem: 0,
        devices: vec![],
    };
    let opts = pvrun_oci::PackageOptions {
        name: Some("pvrun-test/static-hello".into()),
        ..Default::default()
    };
    let runc_image = pvrun_oci::package(
        Path::new("static-hello"),
        &std::fs::read(&bin).unwrap(),
        info,
        &tar,
        pvrun_oci::Format::OciArchive,
        &opts,
    )
    .unwrap()
    .reference;
    c.import(&tar);

    let mut n = 0;
    let mut once = |runtime: &str, image: &str, want: &str| {
        n += 1;
        let id = format!("bench-{n}");
        let start = Instant::now();
        let o = c.run_on(runtime, &[], image, &id, &[]);
        let took = start.elapsed();
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        assert!(text(&o.stdout).contains(want), "{}", text(&o.stdout));
        took
    };
    for _ in 0..2 {
        once(RUNTIME, &pvrun_image, "Hello from pvrun!");
        once(RUNC, &runc_image, "Hello from runc!");
    }
    let (mut pv, mut rc) = (Vec::new(), Vec::new());
    for _ in 0..11 {
        pv.push(once(RUNTIME, &pvrun_image, "Hello from pvrun!"));
        rc.push(once(RUNC, &runc_image, "Hello from runc!"));
    }
    let (pv, rc) = (median(pv), median(rc));
    let runc = Baseline::new("runc", rc, ms(rc));
    let mut r = Report::with_columns(
        "ctr",
        "ctr run --rm to exit (medians of 11 alternating runs, same containerd)",
        &["measurement", "median", "runc", "ratio", "target"],
    )
    .time_cells(ms);
    r.floor_row("runc, static hello (io.containerd.runc.v2)", &runc);
    r.compare(
        "pvrun shim, hello guest (io.containerd.pvrun.v1)",
        pv,
        &runc,
        Ratio::Times,
        "<= 1.2x runc",
    );
    r.finish();
}
