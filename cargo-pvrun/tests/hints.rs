//! The well-known ways a guest build goes wrong end with one line saying what to do, and a
//! guest that the linker resolved against the C library is refused at build time with the
//! symbol and the crate named. Each test writes a broken guest crate into a temporary
//! directory and builds it with `cargo pvrun` (or plain `cargo run`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A temporary directory of crates, removed on drop (also when the test fails).
struct TempCrates(PathBuf);

impl TempCrates {
    fn new(name: &str) -> TempCrates {
        let dir = std::env::temp_dir().join(format!("pvrun-hints-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempCrates(dir)
    }

    /// Writes crate `name` (a guest if `main` is given, else a library with `lib`).
    fn add(&self, name: &str, deps: &str, file: &str, source: &str) -> PathBuf {
        let dir = self.0.join(name);
        std::fs::create_dir_all(dir.join("src")).unwrap();
        let manifest = format!(
            "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[dependencies]\n{deps}\n\n[profile.dev]\npanic = \"abort\"\n"
        );
        std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
        std::fs::write(dir.join("src").join(file), source).unwrap();
        dir
    }

    /// Writes guest crate `name`, depending on the SDK and on `deps`, in a workspace of
    /// its own (with the examples' lock file, so no new versions are resolved).
    fn guest(&self, name: &str, deps: &str, main: &str) -> PathBuf {
        let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk");
        let deps = format!(
            "guest-sdk = {{ path = {:?} }}\n{deps}",
            sdk.display().to_string()
        );
        let dir = self.add(name, &deps, "main.rs", main);
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        std::fs::write(dir.join("Cargo.toml"), format!("{manifest}\n[workspace]\n")).unwrap();
        std::fs::copy(examples().join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
        dir
    }
}

impl Drop for TempCrates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-examples")
}

/// One target directory for every crate these tests build, so the SDK and its
/// dependencies compile once.
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("hint-guests")
}

fn cargo_pvrun(dir: &Path) -> Output {
    assert!(
        Path::new("/dev/kvm").exists(),
        "cargo pvrun tests boot guests and need /dev/kvm"
    );
    Command::new(env!("CARGO_BIN_EXE_cargo-pvrun"))
        .arg("pvrun")
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target_dir())
        .output()
        .expect("cannot run cargo-pvrun")
}

/// Runs `cargo pvrun` in `dir`, expects the build to fail with 125 and returns stderr.
fn failed_build(dir: &Path) -> String {
    let out = cargo_pvrun(dir);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        !stderr.contains("Running `"),
        "a broken guest was started:\n{stderr}"
    );
    stderr
}

/// Asserts that `hint` is a line of `stderr`, after cargo's own "could not compile".
fn assert_hint_after_cargo(stderr: &str, hint: &str) {
    let lines: Vec<&str> = stderr.lines().collect();
    let at = lines
        .iter()
        .position(|l| *l == hint)
        .unwrap_or_else(|| panic!("no line `{hint}` in:\n{stderr}"));
    let cargo = lines
        .iter()
        .position(|l| l.starts_with("error: could not compile"))
        .unwrap_or_else(|| panic!("cargo's error is missing:\n{stderr}"));
    assert!(
        cargo < at,
        "the hint comes before cargo's output:\n{stderr}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("hint: ")).count(),
        1,
        "{stderr}"
    );
}

#[test]
fn a_guest_without_an_entry_point_is_told_to_add_entry() {
    let t = TempCrates::new("noentry");
    let dir = t.guest(
        "noentry",
        "",
        "#![no_std]\n#![no_main]\n\nfn main() {\n    pvrun::println!(\"hi\");\n}\n",
    );
    let stderr = failed_build(&dir);
    assert_hint_after_cargo(
        &stderr,
        "hint: the guest has no entry point: add `pvrun::entry!(main);` to src/main.rs (or `pvrun::export_functions! { \"name\" => function }` for a function guest)",
    );
}

#[test]
fn a_guest_without_no_std_is_told_to_add_it() {
    let t = TempCrates::new("nostd");
    let dir = t.guest(
        "nostd",
        "",
        "#![no_main]\npvrun::entry!(main);\nfn main() {}\n",
    );
    assert_hint_after_cargo(
        &failed_build(&dir),
        "hint: the guest links the standard library, which pvrun guests do not have: put `#![no_std]` and `#![no_main]` at the top of src/main.rs",
    );
}

#[test]
fn a_guest_without_no_main_is_told_to_add_it() {
    let t = TempCrates::new("nomain");
    let dir = t.guest(
        "nomain",
        "",
        "#![no_std]\npvrun::entry!(main);\nfn main() {}\n",
    );
    assert_hint_after_cargo(
        &failed_build(&dir),
        "hint: put `#![no_main]` at the top of src/main.rs: the SDK provides the entry point, and `pvrun::entry!(main);` names your `main`",
    );
}

#[test]
fn a_dependency_that_needs_std_is_named() {
    let t = TempCrates::new("usesstd");
    t.add(
        "wordcount",
        "",
        "lib.rs",
        "pub fn distinct(words: &[&str]) -> usize {\n    words.iter().collect::<std::collections::HashSet<_>>().len()\n}\n",
    );
    let dir = t.guest(
        "usesstd",
        "wordcount = { path = \"../wordcount\" }",
        "#![no_std]\n#![no_main]\npvrun::entry!(main);\nfn main() -> i32 {\n    wordcount::distinct(&[\"a\", \"b\", \"a\"]) as i32\n}\n",
    );
    assert_hint_after_cargo(
        &failed_build(&dir),
        "hint: dependency `wordcount` needs the standard library, which pvrun guests do not have: turn off its `std` feature (`wordcount = { version = \"...\", default-features = false }` in Cargo.toml) or use a `no_std` crate instead",
    );
}

#[test]
fn a_guest_linked_against_the_c_library_is_refused_naming_symbol_and_crate() {
    let t = TempCrates::new("libc");
    // A `no_std` dependency that calls the C library's getrandom(3) (as `getrandom` 0.2's
    // fallback or a `libc`-based crate would); `-lc` lets the link "succeed" with a PLT.
    t.add(
        "cdep",
        "",
        "lib.rs",
        "#![no_std]\n#[link(name = \"c\")]\nunsafe extern \"C\" {\n    fn getrandom(buf: *mut u8, len: usize, flags: u32) -> isize;\n}\npub fn random_byte() -> u8 {\n    let mut b = 0u8;\n    unsafe { getrandom(&mut b, 1, 0) };\n    b\n}\n",
    );
    let dir = t.guest(
        "libcguest",
        "cdep = { path = \"../cdep\" }",
        "#![no_std]\n#![no_main]\npvrun::entry!(main);\nfn main() -> i32 {\n    cdep::random_byte() as i32\n}\n",
    );
    let stderr = failed_build(&dir);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: guest `libcguest` uses `getrandom` (referenced by `cdep 0.1.0`), which no crate of the guest defines")
            && last.contains("default-features = false"),
        "{stderr}"
    );
}

#[test]
fn plain_cargo_run_in_a_guest_crate_says_to_use_cargo_pvrun() {
    let t = TempCrates::new("plain");
    let dir = t.guest(
        "plainrun",
        "",
        "#![no_std]\n#![no_main]\npvrun::entry!(main);\nfn main() {\n    pvrun::println!(\"hi\");\n}\n",
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .arg("build")
        .current_dir(&dir)
        .env("CARGO_TARGET_DIR", target_dir())
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .expect("cannot run cargo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.lines().any(|l| l.ends_with("built for the host, not as a pvrun guest: a guest crate built this way only says to use `cargo pvrun`; build and run guests with `cargo pvrun`")),
        "{stderr}"
    );
    let out = Command::new(cargo)
        .args(["run", "-q"])
        .current_dir(&dir)
        .env("CARGO_TARGET_DIR", target_dir())
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .expect("cannot run cargo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert_eq!(
        stderr.lines().last(),
        Some(
            "error: this is a pvrun guest, which `cargo build`/`cargo run` built as a host program: build and run it with `cargo pvrun` instead"
        ),
        "{stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
