//! The example guests boot on real KVM and behave: output, arguments, environment, exit
//! codes, heap, clocks and the compute example's result.

mod common;

use common::{guest, pvrun};

#[test]
fn hello_prints_args_env_and_exits_with_the_chosen_code() {
    let elf = guest("hello");
    let r = pvrun(
        &elf,
        &["--env", "GREETING=bonjour"],
        &["one", "two words", "--exit", "42"],
    );
    assert_eq!(r.status, 42, "stderr: {}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], "Hello from pvrun!");
    assert_eq!(lines[1], "argc=5");
    assert_eq!(lines[2], format!("arg[0]={}", elf.display()));
    assert_eq!(lines[3], "arg[1]=one");
    assert_eq!(lines[4], "arg[2]=two words");
    assert_eq!(lines[5], "arg[3]=--exit");
    assert_eq!(lines[6], "arg[4]=42");
    assert_eq!(lines[7], "GREETING=bonjour");
    assert_eq!(lines[8], "heap: sum=500500 string=pvrun-42");
    assert!(
        !r.stdout.contains("slept"),
        "slept without --sleep: {}",
        r.stdout
    );
    assert!(r.stderr.is_empty(), "unexpected stderr: {}", r.stderr);
}

#[test]
fn hello_defaults_exit_zero_and_unset_env() {
    let r = pvrun(&guest("hello"), &[], &[]);
    assert_eq!(r.status, 0, "stderr: {}", r.stderr);
    assert!(r.stdout.contains("argc=1\n"));
    assert!(r.stdout.contains("GREETING=(unset)\n"));
}

#[test]
fn hello_clocks_random_and_wall_time_are_sane() {
    let r = pvrun(&guest("hello"), &[], &["--sleep", "5"]);
    assert!(r.stdout.contains("\nslept-ok\n"), "{}", r.stdout);
    let field = |name: &str| -> String {
        r.stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {}", r.stdout))
            .to_string()
    };
    let slept: u64 = field("slept: ").split(' ').next().unwrap().parse().unwrap();
    assert!(
        (5..1000).contains(&slept),
        "slept {slept} ms for a 5 ms sleep"
    );
    let random = field("random: ");
    assert_eq!(random.len(), 32);
    assert!(random.chars().all(|c| c.is_ascii_hexdigit()));
    let r2 = pvrun(&guest("hello"), &[], &[]);
    assert!(
        !r2.stdout.contains(&random),
        "two boots produced the same random bytes"
    );
    let wall: u64 = field("wall: ").parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        wall.abs_diff(now) < 60,
        "guest wall clock {wall} vs host {now}"
    );
}

#[test]
fn exit_codes_round_trip() {
    let elf = guest("misbehave");
    for code in [0, 1, 7, 100, 255] {
        let r = pvrun(&elf, &[], &["exit", &code.to_string()]);
        assert_eq!(r.status, code);
    }
}

#[test]
fn compute_hashes_a_generated_buffer_correctly() {
    use sha2::Digest;
    let mib = 4usize;
    let r = pvrun(&guest("compute"), &[], &[&mib.to_string()]);
    assert_eq!(r.status, 0, "stderr: {}", r.stderr);
    let buf: Vec<u8> = (0..mib << 20)
        .map(|i| ((i as u64).wrapping_mul(2654435761) >> 7) as u8)
        .collect();
    let want = format!("{:x}", sha2::Sha256::digest(&buf));
    assert!(
        r.stdout.contains(&format!("sha256={want}\n")),
        "want {want}, got: {}",
        r.stdout
    );
    assert!(r.stdout.contains("throughput="));
}

#[test]
fn sse_floating_point_works_in_the_guest() {
    let r = pvrun(&guest("misbehave"), &[], &["sse"]);
    assert_eq!(r.status, 0, "stderr: {}", r.stderr);
    // Sum of sqrt(i) for i < 1000, computed with SSE double arithmetic.
    assert_eq!(r.stdout, "sse=21065.833\n");
}
