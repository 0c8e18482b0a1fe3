//! `cargo pvrun new NAME [--function|--net|--disk]`: a guest crate that builds and runs as
//! created, like `cargo new` makes a program.
//!
//! The SDK is not on crates.io, so the crate depends on it by path: `--sdk PATH` if given;
//! else the pvrun checkout around the current directory; else the checkout this
//! `cargo-pvrun` was built from, if it still exists. Without any, the dependency line
//! points at `../pvrun/guest-sdk` with a comment saying to fix it, and a note says so.

use std::fs;
use std::path::{Path, PathBuf};

use clap::ArgGroup;

/// Options of `cargo pvrun new`.
#[derive(clap::Args, Debug)]
#[command(group(ArgGroup::new("kind").args(["function", "net", "disk"])))]
pub struct NewArgs {
    /// Directory to create; its last component is the package name.
    path: PathBuf,
    /// A function guest (serve it with `cargo pvrun serve`, call it with `cargo pvrun call`).
    #[arg(long)]
    function: bool,
    /// A network service: a TCP echo server on port 7 (needs `--net eth0=tap:IF,...`).
    #[arg(long)]
    net: bool,
    /// A storage guest: writes and reads back a block of disk `data` (needs `--disk data=IMG`).
    #[arg(long)]
    disk: bool,
    /// The guest SDK to depend on (the `guest-sdk` directory of a pvrun checkout).
    #[arg(long, value_name = "PATH")]
    sdk: Option<PathBuf>,
    /// Package name (default: the directory's name).
    #[arg(long)]
    name: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Program,
    Function,
    Net,
    Disk,
}

fn fail(msg: &str) -> ! {
    host_vmm::eprint_line(&format!("error: {msg}"));
    std::process::exit(host_vmm::EXIT_HOST_ERROR)
}

fn is_sdk(dir: &Path) -> bool {
    fs::read_to_string(dir.join("Cargo.toml"))
        .is_ok_and(|t| t.lines().any(|l| l.trim() == "name = \"guest-sdk\""))
}

/// The SDK to depend on, absolute, if one can be found.
fn find_sdk(explicit: Option<&Path>, start: &Path) -> Option<PathBuf> {
    if let Some(p) = explicit {
        let p = p.canonicalize().unwrap_or_else(|e| {
            fail(&format!("--sdk {}: {e}", p.display()));
        });
        if !is_sdk(&p) {
            fail(&format!(
                "--sdk {}: not the guest SDK (no Cargo.toml with name = \"guest-sdk\")",
                p.display()
            ));
        }
        return Some(p);
    }
    let mut dir = Some(start);
    while let Some(d) = dir {
        if is_sdk(&d.join("guest-sdk")) {
            return d.join("guest-sdk").canonicalize().ok();
        }
        dir = d.parent();
    }
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk");
    is_sdk(&built_from)
        .then(|| built_from.canonicalize().ok())
        .flatten()
}

/// A valid package name from `name`, or an error saying what is wrong.
fn check_name(name: &str) -> Result<(), String> {
    let ok_start = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !ok_start
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "`{}` is not a valid package name: use letters, digits, `-` and `_`, starting with a letter (or pass --name)",
            host_vmm::escape_controls(name)
        ));
    }
    if matches!(
        name,
        "pvrun" | "guest-sdk" | "core" | "alloc" | "std" | "test"
    ) {
        return Err(format!(
            "`{name}` would clash with a crate the guest uses; choose another name"
        ));
    }
    Ok(())
}

fn manifest(name: &str, dep: &str) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

# `cargo pvrun test` runs the crate's `#[pvrun::test]` functions in pvrun VMs with the
# SDK's harness (libtest needs std).
[[bin]]
name = "{name}"
path = "src/main.rs"
harness = false

[dependencies]
{dep}

# Guests abort on panic (the host reports the message and location), and keep their
# symbol table so crash reports name functions.
[profile.dev]
panic = "abort"

[profile.release]
panic = "abort"
strip = "debuginfo"

# A guest crate is its own workspace: it builds only for the guest, through `cargo pvrun`.
[workspace]
"#
    )
}

fn main_rs(kind: Kind, name: &str) -> String {
    match kind {
        Kind::Program => format!(
            r#"//! {name}: a pvrun guest. `cargo pvrun -- NAME` builds it and boots it.
#![no_std]
#![no_main]

extern crate alloc;

use pvrun::println;

pvrun::entry!(main);

fn main() -> i32 {{
    let who = pvrun::env::args().nth(1).unwrap_or("world");
    println!("{{}}", greeting(who));
    0 // the exit status; `()` and `Result<(), E: Debug>` work too
}}

fn greeting(who: &str) -> alloc::string::String {{
    alloc::format!("hello, {{who}}, from {name}")
}}

// `cargo pvrun test` runs these in a pvrun VM.
#[cfg(test)]
mod tests {{
    use super::*;

    #[pvrun::test]
    fn greets_by_name() {{
        assert_eq!(greeting("you"), "hello, you, from {name}");
    }}
}}
"#
        ),
        Kind::Function => format!(
            r#"//! {name}: a pvrun function guest. Serve it with `cargo pvrun serve --listen
//! 127.0.0.1:8080` and `curl -d hi http://127.0.0.1:8080/upper`, or call one function
//! with `cargo pvrun call upper hi`.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;

pvrun::export_functions! {{
    "upper" => upper,
    "hello" => hello,
}}

/// The input with ASCII letters upper-cased.
fn upper(input: &[u8]) -> Result<Vec<u8>, String> {{
    Ok(input.to_ascii_uppercase())
}}

/// `hello, INPUT`; an error for input that is not UTF-8.
fn hello(input: &[u8]) -> Result<Vec<u8>, String> {{
    let who = core::str::from_utf8(input).map_err(|e| alloc::format!("not UTF-8: {{e}}"))?;
    Ok(alloc::format!("hello, {{who}}").into_bytes())
}}

// `cargo pvrun test` runs these in a pvrun VM.
#[cfg(test)]
mod tests {{
    use super::*;

    #[pvrun::test]
    fn upper_upper_cases_ascii() {{
        assert_eq!(upper(b"abc-1").unwrap(), b"ABC-1");
    }}
}}
"#
        ),
        Kind::Net => format!(
            r#"//! {name}: a pvrun network service, a TCP echo server on port 7. Run it with a TAP:
//! `cargo pvrun --net eth0=tap:tap0,ip=10.0.0.2/24` (without `ip=` it uses DHCP).
#![no_std]
#![no_main]

extern crate alloc;

use pvrun::net::TcpListener;
use pvrun::println;

pvrun::require_device!(net, "eth0");
pvrun::entry!(main);

fn main() -> Result<(), pvrun::net::Error> {{
    let listener = TcpListener::bind(7)?;
    println!("{name}: echo on {{:?}}", listener.local_addr()?);
    loop {{
        let (mut conn, _peer) = listener.accept()?;
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = conn.read(&mut buf) {{
            if conn.write_all(&buf[..n]).is_err() {{
                break;
            }}
        }}
    }}
}}

// `cargo pvrun test` runs these in a pvrun VM (a test binary gets no devices).
#[cfg(test)]
mod tests {{
    #[pvrun::test]
    fn it_works() {{
        assert_eq!(2 + 2, 4);
    }}
}}
"#
        ),
        Kind::Disk => format!(
            r#"//! {name}: a pvrun storage guest. It writes a block to disk `data`, flushes it and
//! reads it back: `truncate -s 1M data.img && cargo pvrun --disk data=data.img`.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec;

use pvrun::block::Disk;
use pvrun::println;

pvrun::require_device!(block, "data");
pvrun::entry!(main);

fn main() -> Result<(), pvrun::block::Error> {{
    let mut disk = Disk::open("data")?;
    let sector = disk.sector_size() as usize;
    let mut block = vec![0u8; sector];
    let text = b"hello from {name}";
    block[..text.len()].copy_from_slice(text);
    disk.write(0, &block)?;
    disk.flush()?;
    let mut back = vec![0u8; sector];
    disk.read(0, &mut back)?;
    assert_eq!(back, block, "the disk returned other bytes");
    println!("{name}: wrote and read back {{sector}} bytes of {{}} ({{}} bytes)", disk.name(), disk.capacity());
    Ok(())
}}

// `cargo pvrun test` runs these in a pvrun VM (a test binary gets no devices).
#[cfg(test)]
mod tests {{
    #[pvrun::test]
    fn it_works() {{
        assert_eq!(2 + 2, 4);
    }}
}}
"#
        ),
    }
}

fn readme(kind: Kind, name: &str) -> String {
    let how = match kind {
        Kind::Program => "`cargo pvrun` builds it and boots it in a KVM VM (`cargo pvrun -- ARGS` passes arguments).".to_string(),
        Kind::Function => "`cargo pvrun serve --listen 127.0.0.1:8080` serves its functions over HTTP (`curl -d hi http://127.0.0.1:8080/upper`); `cargo pvrun call upper hi` calls one from the shell.".to_string(),
        Kind::Net => "`cargo pvrun --net eth0=tap:tap0,ip=10.0.0.2/24` boots it on TAP `tap0` (create it with `ip tuntap add dev tap0 mode tap`); it echoes TCP on port 7.".to_string(),
        Kind::Disk => "`truncate -s 1M data.img && cargo pvrun --disk data=data.img` boots it with `data.img` as its disk `data`.".to_string(),
    };
    format!(
        "# {name}\n\nA pvrun guest: {how}\n\n`cargo pvrun test` runs its `#[pvrun::test]` functions in pvrun VMs.\n"
    )
}

/// Creates the crate; exits 125 with one line on any error.
pub fn run(a: NewArgs) -> ! {
    let kind = match (a.function, a.net, a.disk) {
        (true, _, _) => Kind::Function,
        (_, true, _) => Kind::Net,
        (_, _, true) => Kind::Disk,
        _ => Kind::Program,
    };
    let dir = &a.path;
    let name = match &a.name {
        Some(n) => n.clone(),
        None => dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    if let Err(e) = check_name(&name) {
        fail(&e);
    }
    if dir.exists() {
        fail(&format!(
            "destination `{}` already exists (choose another path)",
            dir.display()
        ));
    }
    let cwd = std::env::current_dir()
        .unwrap_or_else(|e| fail(&format!("cannot read the current directory: {e}")));
    let abs = cwd.join(dir);
    let parent = abs.parent().unwrap_or(&cwd).to_path_buf();
    let sdk = find_sdk(a.sdk.as_deref(), &parent);
    let dep = match &sdk {
        Some(p) => format!(
            "guest-sdk = {{ path = {} }}   # the crate is `pvrun` in code",
            toml_string(&p.display().to_string())
        ),
        None => "# Point this at the guest-sdk directory of your pvrun checkout.\nguest-sdk = { path = \"../pvrun/guest-sdk\" }   # the crate is `pvrun` in code".to_string(),
    };
    let write = |rel: &str, text: &str| {
        let p = abs.join(rel);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d)
                .unwrap_or_else(|e| fail(&format!("cannot create {}: {e}", d.display())));
        }
        fs::write(&p, text).unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", p.display())));
    };
    write("Cargo.toml", &manifest(&name, &dep));
    write("src/main.rs", &main_rs(kind, &name));
    write("README.md", &readme(kind, &name));
    write(".gitignore", "/target\n");
    let what = match kind {
        Kind::Program => "guest",
        Kind::Function => "function guest",
        Kind::Net => "network guest",
        Kind::Disk => "storage guest",
    };
    host_vmm::eprint_line(&format!(
        "     Created {what} `{name}` in {}",
        dir.display()
    ));
    if sdk.is_none() {
        host_vmm::eprint_line(
            "note: the pvrun guest SDK was not found (not inside a pvrun checkout); edit the `guest-sdk` line in Cargo.toml, or pass --sdk PATH",
        );
    }
    std::process::exit(0)
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("my-guest_2").is_ok());
        assert!(check_name("2fast").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name("pvrun").is_err());
        assert_eq!(toml_string("a\"b\\c"), r#""a\"b\\c""#);
    }
}
