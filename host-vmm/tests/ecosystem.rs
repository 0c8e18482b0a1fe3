//! crates.io crates work unmodified in a guest: the `ecosystem` guest uses rand, getrandom
//! 0.2, uuid, hashbrown, serde_json, chrono, libm, critical-section and log over the SDK's
//! platform hooks; these tests boot it and check what it printed.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{Run, guest, pvrun};

fn ecosystem(opts: &[&str]) -> Run {
    let run = pvrun(
        &guest("ecosystem"),
        &[&["--timeout", "20"], opts].concat(),
        &[],
    );
    assert_eq!(
        run.status, 0,
        "the guest reported failed checks or did not run:\n{}\n{}",
        run.stdout, run.stderr
    );
    assert!(
        !run.stdout.contains("FAIL "),
        "failed checks:\n{}",
        run.stdout
    );
    assert!(run.stdout.contains("failures: 0\n"), "{}", run.stdout);
    run
}

/// The details of check `name` (`ok NAME: DETAILS`).
fn detail<'a>(run: &'a Run, name: &str) -> &'a str {
    let prefix = format!("ok {name}: ");
    run.stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no `ok {name}` line in:\n{}", run.stdout))
}

/// A version-4, RFC 4122 UUID in its hyphenated lower-case form.
fn is_v4_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && [8, 13, 18, 23].iter().all(|&i| b[i] == b'-')
        && b.iter()
            .enumerate()
            .all(|(i, c)| [8, 13, 18, 23].contains(&i) || matches!(c, b'0'..=b'9' | b'a'..=b'f'))
        && b[14] == b'4'
        && matches!(b[19], b'8' | b'9' | b'a' | b'b')
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm), to check
/// chrono's calendar against an independent computation.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

#[test]
fn every_crate_check_passes_and_randomness_differs_between_boots() {
    let a = ecosystem(&[]);
    let b = ecosystem(&[]);
    for run in [&a, &b] {
        let u1 = detail(run, "uuid");
        let u2 = detail(run, "uuid-parse");
        assert!(is_v4_uuid(u1) && is_v4_uuid(u2), "{u1} {u2}");
        assert_ne!(u1, u2);
        let bytes = detail(run, "getrandom02");
        assert_eq!(bytes.len(), 64, "{bytes}");
    }
    for check in ["uuid", "rand-stdrng", "rand-osrng", "getrandom02"] {
        assert_ne!(
            detail(&a, check),
            detail(&b, check),
            "`{check}` repeated across two boots"
        );
    }
    // serde: the JSON it round-tripped is what serde_json writes for the struct.
    assert_eq!(
        detail(&a, "serde-roundtrip"),
        r#"{"id":42,"customer":"Ada \"the first\" Lovelace","items":[{"sku":"tea","quantity":2,"price":3.25},{"sku":"sconeé","quantity":1,"price":0.1}],"note":null}"#
    );
    assert_eq!(
        detail(&a, "serde-value"),
        r#"{"a":[1,2,{"b":null}],"c":"é","d":1500.0}"#
    );
    assert_eq!(detail(&a, "hashbrown"), "500 entries after retain");
    assert!(detail(&a, "libm").starts_with("sqrt(2)=1.414214 sin(pi/2)=1 fmod(10.5,3)=1.5"));
    assert_eq!(detail(&a, "critical-section"), "counter=20");
}

#[test]
fn chrono_formats_the_guest_wall_clock_like_the_host() {
    let run = ecosystem(&[]);
    let host = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    // "2026-12-02T00:57:32Z unix=1796172775"
    let d = detail(&run, "chrono-now");
    let (stamp, unix) = d.split_once(" unix=").expect(d);
    let unix: i64 = unix.parse().expect(d);
    assert!((unix - host).abs() < 60, "guest clock {unix}, host {host}");
    let n = |r: std::ops::Range<usize>| stamp[r].parse::<i64>().expect(stamp);
    let secs = days_from_civil(n(0..4), n(5..7), n(8..10)) * 86400
        + n(11..13) * 3600
        + n(14..16) * 60
        + n(17..19);
    assert_eq!(secs, unix, "chrono formatted {unix} as {stamp}");
    assert!(stamp.ends_with('Z') && stamp.len() == 20, "{stamp}");
}

#[test]
fn log_lines_are_filtered_by_rust_log_from_the_guest_environment() {
    let lines = |run: &Run| -> Vec<String> {
        run.stderr
            .lines()
            .filter(|l| l.starts_with('['))
            .map(str::to_string)
            .collect()
    };
    // Unset: errors only, as with env_logger.
    assert_eq!(lines(&ecosystem(&[])), ["[ERROR ecosystem] log error line"]);
    // A default level and one target turned off.
    assert_eq!(
        lines(&ecosystem(&["--env", "RUST_LOG=info,ecosystem::noisy=off"])),
        [
            "[ERROR ecosystem] log error line",
            "[WARN  ecosystem] log warn line",
            "[INFO  ecosystem] log info line",
        ]
    );
    // Only one target, at debug: nothing else.
    assert_eq!(
        lines(&ecosystem(&["--env", "RUST_LOG=ecosystem::noisy=debug"])),
        [
            "[INFO  ecosystem::noisy] noisy info",
            "[DEBUG ecosystem::noisy] noisy debug",
        ]
    );
    // Everything, case-insensitively.
    let all = lines(&ecosystem(&["--env", "RUST_LOG=TRACE"]));
    assert_eq!(all.len(), 7, "{all:?}");
    assert!(all.contains(&"[TRACE ecosystem] log trace line".to_string()));
}

/// guest-build's post-link check reads the same things as the host's loader: the
/// hand-assembled images of `loader.rs`, checked before any build would boot them.
mod post_link_check {
    use host_vmm::testing::{self as raw_guest, EXIT_LOOP, RawElf, RawSection};

    fn problems(opts: RawElf) -> guest_build::check::Problems {
        // One directory per test thread, so no test removes another's.
        let dir = std::env::temp_dir().join(format!(
            "pvrun-postlink-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("guest.elf");
        std::fs::write(&path, raw_guest::elf(EXIT_LOOP, opts)).unwrap();
        let p = guest_build::check::problems(&path);
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_dir(&dir);
        p.unwrap()
    }

    #[test]
    fn a_static_image_passes_and_weak_symbols_are_fine() {
        let p = problems(RawElf {
            text_symbol: Some("_start"),
            weak_undefined: &["__gmon_start__"],
            ..RawElf::default()
        });
        assert_eq!(p, Default::default());
    }

    #[test]
    fn undefined_symbols_are_named_and_escaped() {
        let p = problems(RawElf {
            undefined: &["getrandom", "evil\x1b]0;x\x07"],
            ..RawElf::default()
        });
        assert_eq!(p.undefined, ["getrandom", "evil\\u{1b}]0;x\\u{7}"]);
    }

    #[test]
    fn plt_relocations_and_dynamic_parts_are_found() {
        for (name, sh_type, flags) in [(".rela.plt", 4, 2), (".dynamic", 6, 3), (".plt", 1, 6)] {
            let p = problems(RawElf {
                text_symbol: Some("_start"),
                extra_section: Some(RawSection {
                    name,
                    sh_type,
                    flags,
                }),
                ..RawElf::default()
            });
            assert_eq!(p.dynamic, [format!("`{name}`")], "{name}");
        }
        // Not in memory: a relocatable leftover does not matter.
        let p = problems(RawElf {
            text_symbol: Some("_start"),
            extra_section: Some(RawSection {
                name: ".rela.debug",
                sh_type: 4,
                flags: 0,
            }),
            ..RawElf::default()
        });
        assert!(p.dynamic.is_empty(), "{p:?}");
        let p = problems(RawElf {
            text_symbol: Some("_start"),
            extra_phdr: Some(3), // PT_INTERP
            ..RawElf::default()
        });
        assert_eq!(p.dynamic, ["PT_INTERP"]);
    }
}
