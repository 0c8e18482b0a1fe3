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
fn package_builds_the_crate_and_writes_a_reproducible_oci_image() {
    let dir = std::env::temp_dir().join(format!("cargo-pvrun-package-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let mut digests = Vec::new();
    for name in ["a.tar", "b.tar"] {
        let out = dir.join(name);
        let o = cargo_pvrun(
            &examples().join("hello"),
            &[
                "package",
                "-q",
                "-o",
                out.to_str().unwrap(),
                "--",
                "--exit",
                "2",
            ],
        );
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        let line = text(&o.stdout);
        assert!(
            line.starts_with("docker.io/pvrun/hello:latest sha256:"),
            "{line}"
        );
        assert!(line.contains("(program guest, ABI v"), "{line}");
        digests.push(line.split_whitespace().nth(1).unwrap().to_string());
        assert!(out.is_file());
    }
    assert_eq!(digests[0], digests[1]);
    assert_eq!(
        std::fs::read(dir.join("a.tar")).unwrap(),
        std::fs::read(dir.join("b.tar")).unwrap()
    );
    // A build failure is one error and 125, and writes nothing.
    let o = cargo_pvrun(
        &dir,
        &[
            "package",
            "-q",
            "--manifest-path",
            "/nonexistent/Cargo.toml",
            "-o",
            "x.tar",
        ],
    );
    assert_eq!(o.status.code(), Some(125), "{}", text(&o.stderr));
    assert!(!dir.join("x.tar").exists());
}
