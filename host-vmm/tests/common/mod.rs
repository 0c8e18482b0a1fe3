//! Shared test support: builds the example guests once per test binary and runs them.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

/// The guest-examples workspace.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-examples")
}

/// Builds (once) and returns the ELF of example guest `name` (release profile).
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut map = built.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = map.get(name) {
        return p.clone();
    }
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests boot real guests and need /dev/kvm"
    );
    let req = guest_build::BuildRequest {
        manifest_path: Some(examples_dir().join("Cargo.toml")),
        package: Some(name.to_string()),
        release: true,
        quiet: true,
        ..Default::default()
    };
    let elf = guest_build::build(&req)
        .unwrap_or_else(|e| panic!("building guest {name}: {e:#}"))
        .elf;
    map.insert(name.to_string(), elf.clone());
    elf
}

/// Output of one `pvrun` process.
pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            status: o.status.code().expect("pvrun was killed by a signal"),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs the `pvrun` binary with `opts` before the guest and `args` after `--`.
pub fn pvrun(elf: &Path, opts: &[&str], args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_pvrun"))
        .args(opts)
        .arg(elf)
        .arg("--")
        .args(args)
        .output()
        .expect("cannot run pvrun");
    out.into()
}

/// Runs the `misbehave` guest in mode `mode` with a safety timeout.
pub fn misbehave(args: &[&str]) -> Run {
    pvrun(&guest("misbehave"), &["--timeout", "20"], args)
}
