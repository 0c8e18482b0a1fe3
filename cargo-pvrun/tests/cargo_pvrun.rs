//! `cargo pvrun` builds guest crates like `cargo run` and boots them; its exit status is
//! the guest's.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-examples")
}

fn cargo_pvrun(dir: &Path, args: &[&str]) -> Output {
    assert!(
        Path::new("/dev/kvm").exists(),
        "cargo pvrun tests boot guests and need /dev/kvm"
    );
    Command::new(env!("CARGO_BIN_EXE_cargo-pvrun"))
        .arg("pvrun")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("cannot run cargo-pvrun")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn runs_the_guest_crate_in_the_current_directory_with_args_env_and_exit_code() {
    let out = cargo_pvrun(
        &examples().join("hello"),
        &[
            "--release",
            "--env",
            "GREETING=hi",
            "--",
            "x",
            "--exit",
            "5",
        ],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(
        stdout.starts_with("Hello from pvrun!\nargc=4\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("arg[1]=x\n") && stdout.contains("GREETING=hi\n"),
        "{stdout}"
    );
    // Cargo's own progress stays visible, followed by our Running line.
    assert!(
        stderr.contains("Finished") && stderr.contains("Running `pvrun "),
        "{stderr}"
    );
}

#[test]
fn selects_a_package_with_p_from_the_workspace_root() {
    let out = cargo_pvrun(
        &examples(),
        &["-q", "--release", "-p", "misbehave", "--", "exit", "9"],
    );
    assert_eq!(out.status.code(), Some(9), "{}", text(&out.stderr));
    assert!(
        out.stderr.is_empty(),
        "quiet run printed: {}",
        text(&out.stderr)
    );
}

#[test]
fn panics_crashes_and_timeouts_become_the_exit_status() {
    let root = examples();
    let run = |args: &[&str]| {
        cargo_pvrun(
            &root,
            &[&["-q", "--release", "-p", "misbehave"], args].concat(),
        )
    };
    assert_eq!(run(&["--", "panic"]).status.code(), Some(101));
    assert_eq!(run(&["--", "null-read"]).status.code(), Some(139));
    assert_eq!(
        run(&["--timeout", "0.2", "--", "loop"]).status.code(),
        Some(124)
    );
}

#[test]
fn a_workspace_with_several_guests_needs_p() {
    let out = cargo_pvrun(&examples(), &["-q"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("several guest packages") && stderr.contains("-p NAME"),
        "{stderr}"
    );
}

#[test]
fn a_crate_that_is_not_a_guest_gets_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("pvrun-not-a-guest-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(
        dir.join("Cargo.toml"),
        "[package]\nname = \"plain\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[workspace]\n",
    )
    .unwrap();
    std::fs::write(dir.join("src/main.rs"), "fn main() {}\n").unwrap();
    let out = cargo_pvrun(&dir, &[]);
    let stderr = text(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("package `plain` is not a pvrun guest"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn outside_any_crate_says_so() {
    let out = cargo_pvrun(Path::new("/"), &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("could not find `Cargo.toml`"), "{stderr}");
}

#[test]
fn gdb_debugs_a_guest_started_with_cargo_pvrun_gdb() {
    use std::io::BufRead;
    assert!(Path::new("/dev/kvm").exists(), "needs /dev/kvm");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cargo-pvrun"))
        .args([
            "pvrun",
            "--release",
            "-p",
            "debuggee",
            "--gdb",
            "127.0.0.1:0",
        ])
        .args(["--timeout", "60"])
        .current_dir(examples())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cannot run cargo-pvrun");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut child = Kill(child);
    // Cargo's own lines may come first.
    let (port, elf) = loop {
        let mut line = String::new();
        assert_ne!(err.read_line(&mut line).unwrap(), 0, "no waiting line");
        if let Some(rest) = line.strip_prefix("pvrun: waiting for gdb on 127.0.0.1:") {
            let port: u16 = rest.split(' ').next().unwrap().parse().unwrap();
            let elf = rest
                .split("(gdb ")
                .nth(1)
                .unwrap()
                .split(" -ex")
                .next()
                .unwrap();
            break (port, elf.to_string());
        }
    };
    let out = Command::new("timeout")
        .args(["60", "gdb", "-batch", "-nx", &elf])
        .args(["-ex", &format!("target remote :{port}")])
        .args([
            "-ex",
            "break debuggee::middle",
            "-ex",
            "continue",
            "-ex",
            "bt",
        ])
        .args(["-ex", "continue"])
        .output()
        .expect("gdb is needed (apt-get install gdb)");
    let text = text(&out.stdout);
    assert!(
        text.contains("Breakpoint 1, debuggee::middle (n=5)"),
        "{text}"
    );
    assert!(text.contains("debuggee::outer (n=4)"), "{text}");
    assert!(text.contains("exited with code 040"), "{text}");
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(32));
}
