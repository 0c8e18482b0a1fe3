//! What the README shows is real: its networking example is the `tcp-echo` guest, which
//! echoes over a TAP device in a network namespace (as root, like `net.rs`), and the SDK
//! documentation command it gives works without a rustdoc warning.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Netns, NsGuest, examples_dir};

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap()
}

/// The first fenced code block of type `lang` after `heading` in the README.
fn block_after(readme: &str, heading: &str, lang: &str) -> String {
    let from = readme
        .find(heading)
        .unwrap_or_else(|| panic!("README has no `{heading}`"));
    let fence = format!("```{lang}\n");
    let start = readme[from..].find(&fence).expect("no code block") + from + fence.len();
    let end = readme[start..].find("```\n").expect("unclosed code block") + start;
    readme[start..end].to_string()
}

#[test]
fn the_readme_networking_example_is_the_tcp_echo_guest_verbatim() {
    let shown = block_after(&readme(), "## Networking", "rust");
    let real = std::fs::read_to_string(examples_dir().join("tcp-echo/src/main.rs")).unwrap();
    assert_eq!(
        shown, real,
        "README and guest-examples/tcp-echo drifted apart"
    );
    let code_lines = real
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("#!") && !l.starts_with("use "))
        .count();
    assert!(
        code_lines <= 16,
        "{code_lines} lines is no longer a short example"
    );
}

#[test]
fn the_tcp_echo_guest_echoes_over_a_tap_device() {
    let ns = Netns::new("rdme");
    ns.tap("tap0", "10.77.9.1/24");
    let g = NsGuest::start(
        &ns,
        "tcp-echo",
        &["--timeout", "60", "--net", "eth0=tap:tap0,ip=10.77.9.2/24"],
        &[],
    );
    assert_eq!(g.wait_for("echo on"), "echo on 10.77.9.2:7");
    let answers = ns.run_in(|| {
        // Two connections one after the other: the server goes back to `accept`.
        (0..2)
            .map(|i| {
                let mut s = TcpStream::connect("10.77.9.2:7").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let msg = format!("hello {i} from the host\n").repeat(1000);
                s.write_all(msg.as_bytes()).unwrap();
                s.shutdown(std::net::Shutdown::Write).unwrap();
                let mut back = String::new();
                s.read_to_string(&mut back).unwrap();
                back == msg
            })
            .collect::<Vec<_>>()
    });
    assert_eq!(answers, [true, true]);
}

#[test]
fn the_sdk_docs_build_with_the_readme_command_and_no_warnings() {
    let readme = readme();
    let cmd = "cargo doc --manifest-path guest-sdk/Cargo.toml --no-deps";
    assert!(
        readme.replace("\n", " ").contains(cmd),
        "README no longer gives `{cmd}`"
    );
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdk-doc");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "doc",
            "--manifest-path",
            "guest-sdk/Cargo.toml",
            "--no-deps",
        ])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .env("CARGO_TARGET_DIR", &target)
        .env("RUSTDOCFLAGS", "-Dwarnings")
        .env_remove("RUSTFLAGS")
        .output()
        .expect("cannot run cargo doc");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let index = std::fs::read_to_string(target.join("doc/pvrun/index.html")).unwrap();
    assert!(
        index.contains("platform") && index.contains("log"),
        "{index}"
    );
}
