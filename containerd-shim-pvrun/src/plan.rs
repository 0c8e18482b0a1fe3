//! From an OCI bundle (its `config.json` and rootfs) to what the guest runs with: the ELF
//! on the host, argv, env and memory. Every error is one line an operator can act on
//! (containerd shows it as the task's failure, `kubectl describe` as the reason).

use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::Spec;
use pvrun_oci::GuestInfo;

/// How one container's guest runs.
#[derive(Debug)]
pub struct Plan {
    /// The guest ELF, on the host (inside the container's rootfs).
    pub elf: PathBuf,
    /// `process.args`: `argv[0]` (the ELF's path in the image) first.
    pub argv: Vec<String>,
    /// `process.env`, split at the first `=`.
    pub env: Vec<(String, String)>,
    /// Guest memory in bytes.
    pub mem: u64,
    /// What the ELF declares.
    pub info: GuestInfo,
    /// `--disk NAME=PATH[,ro]` for every disk the guest declares (see [`disks`]).
    pub disks: Vec<String>,
}

/// Where a mount offers a disk image for the guest's block device NAME: an OCI mount whose
/// destination is `/pvrun/disks/NAME` and whose source is a regular file on the host (a
/// bind mount: `ctr run --mount type=bind,src=IMG,dst=/pvrun/disks/NAME,options=rbind:rw`,
/// a Kubernetes `hostPath` volume of `type: File` mounted at that path) becomes `--disk
/// NAME=SOURCE`, read-only when the mount has the `ro` option.
pub const DISK_MOUNT_DIR: &str = "/pvrun/disks/";

const MIB: u64 = 1 << 20;
const LARGE_PAGE: u64 = 2 * MIB;

fn mib(bytes: u64) -> String {
    format!("{}M", bytes.div_ceil(MIB))
}

/// Reads the plan for the container whose spec is `spec` and whose root filesystem is at
/// `rootfs`; `inspect` validates the ELF (host-vmm's loader).
pub fn plan(
    spec: &Spec,
    rootfs: &Path,
    inspect: impl Fn(&Path, &[u8]) -> Result<GuestInfo, String>,
) -> Result<Plan, String> {
    let process = spec
        .process()
        .as_ref()
        .ok_or("the container spec has no process; pvrun runs the image's guest")?;
    if process.terminal().unwrap_or(false) {
        return Err(
            "pvrun guests have no terminal; run the container without a TTY (no -t / tty: false)"
                .into(),
        );
    }
    let argv: Vec<String> = process.args().clone().unwrap_or_default();
    let Some(argv0) = argv.first() else {
        return Err("the container has no command; a pvrun image's entrypoint is its guest (package it with `pvrun package`)".into());
    };
    let elf = resolve_in_root(rootfs, argv0)?;
    let bytes = std::fs::read(&elf).map_err(|e| {
        format!(
            "not a pvrun image: its command `{}` cannot be read in the image ({e}); package guests with `pvrun package`",
            argv0.escape_default()
        )
    })?;
    if !bytes.starts_with(b"\x7fELF") {
        return Err(format!(
            "not a pvrun image: its command `{}` is not an ELF guest; package guests with `pvrun package`",
            argv0.escape_default()
        ));
    }
    let info = inspect(Path::new(argv0), &bytes)
        .map_err(|e| format!("not a runnable pvrun image: {e}"))?;

    let mut env = Vec::new();
    for kv in process.env().clone().unwrap_or_default() {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => env.push((k.to_string(), v.to_string())),
            _ => {
                return Err(format!(
                    "environment entry `{}` is not KEY=VALUE",
                    kv.escape_default()
                ));
            }
        }
    }

    let limit = spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .filter(|l| *l > 0)
        .map(|l| l as u64);
    let mem = match limit {
        None => info.default_mem,
        Some(limit) => {
            let bounded = info.default_mem.min(limit / LARGE_PAGE * LARGE_PAGE);
            if bounded < info.min_mem {
                return Err(format!(
                    "the memory limit {} is below what this guest needs ({}); raise the container's memory limit to at least {}",
                    mib(limit),
                    mib(info.min_mem),
                    mib(info.min_mem)
                ));
            }
            bounded
        }
    };
    let disks = disks(spec, &info)?;
    Ok(Plan {
        elf,
        argv,
        env,
        mem,
        info,
        disks,
    })
}

/// The `--disk` options for the block devices `info` declares, from the spec's mounts at
/// [`DISK_MOUNT_DIR`]`NAME`. A declared disk with no such mount, a mount for a disk the
/// guest does not declare, and a source that is not a regular file are one-line errors.
pub fn disks(spec: &Spec, info: &GuestInfo) -> Result<Vec<String>, String> {
    let declared: Vec<&str> = info
        .devices
        .iter()
        .filter_map(|d| d.strip_prefix("block:"))
        .collect();
    let mut found: Vec<(String, String)> = Vec::new();
    for m in spec.mounts().as_deref().unwrap_or_default() {
        let dst = m.destination().to_string_lossy();
        let Some(name) = dst.strip_prefix(DISK_MOUNT_DIR) else {
            continue;
        };
        let name = name.trim_end_matches('/');
        if !declared.contains(&name) {
            return Err(format!(
                "the mount at `{}` offers a disk this guest does not declare (it declares: {}); mount disks at {DISK_MOUNT_DIR}NAME for its block devices",
                dst.escape_default(),
                if declared.is_empty() {
                    "none".to_string()
                } else {
                    declared.join(", ")
                }
            ));
        }
        let Some(source) = m.source().as_ref() else {
            return Err(format!(
                "the mount at `{}` has no source; bind-mount a disk image file there",
                dst.escape_default()
            ));
        };
        let src = source.to_string_lossy();
        match std::fs::metadata(source) {
            Ok(meta) if meta.is_file() => {}
            Ok(_) => {
                return Err(format!(
                    "disk `{name}`: the mount source `{}` is not a regular file; bind-mount a disk image file (create one with `truncate -s 64M FILE`)",
                    src.escape_default()
                ));
            }
            Err(e) => {
                return Err(format!(
                    "disk `{name}`: cannot open the mount source `{}` ({e}); bind-mount an existing disk image file",
                    src.escape_default()
                ));
            }
        }
        if src.contains(',') || src.contains('\n') {
            return Err(format!(
                "disk `{name}`: the mount source `{}` has a comma or newline in its path; move the image to a plainer path",
                src.escape_default()
            ));
        }
        let ro = m
            .options()
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|o| o == "ro");
        if found.iter().any(|(n, _)| n == name) {
            return Err(format!(
                "disk `{name}` is mounted twice at {DISK_MOUNT_DIR}{name}; mount it once"
            ));
        }
        found.push((
            name.to_string(),
            format!("{name}={src}{}", if ro { ",ro" } else { "" }),
        ));
    }
    let mut out = Vec::new();
    for name in declared {
        match found.iter().find(|(n, _)| n == name) {
            Some((_, opt)) => out.push(opt.clone()),
            None => {
                return Err(format!(
                    "this guest needs disk `{name}`: mount a disk image file at {DISK_MOUNT_DIR}{name} (e.g. `ctr run --mount type=bind,src=IMG,dst={DISK_MOUNT_DIR}{name},options=rbind:rw`)"
                ));
            }
        }
    }
    Ok(out)
}

/// `path` (absolute, as in the image) under `rootfs`, refusing `..` and any symlink that
/// leads out of the rootfs.
fn resolve_in_root(rootfs: &Path, path: &str) -> Result<PathBuf, String> {
    let p = Path::new(path);
    if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!(
            "not a pvrun image: its command `{}` is not an absolute path in the image",
            path.escape_default()
        ));
    }
    let joined = rootfs.join(p.strip_prefix("/").unwrap_or(p));
    let root = rootfs.canonicalize().map_err(|e| {
        format!(
            "cannot open the container's rootfs {}: {e}",
            rootfs.display()
        )
    })?;
    match joined.canonicalize() {
        Ok(real) if real.starts_with(&root) => Ok(real),
        Ok(_) => Err(format!(
            "not a pvrun image: its command `{}` leads outside the image",
            path.escape_default()
        )),
        Err(_) => Err(format!(
            "not a pvrun image: its command `{}` is not in the image; package guests with `pvrun package`",
            path.escape_default()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(min: u64) -> GuestInfo {
        GuestInfo {
            abi_version: 3,
            kind: pvrun_oci::GuestKind::Program,
            min_mem: min,
            default_mem: (64 * MIB).max(min),
            devices: vec![],
        }
    }

    fn spec(args: &[&str], limit: Option<i64>) -> Spec {
        let mut s: serde_json::Value = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": args, "env": ["A=1", "B=x=y"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
        });
        if let Some(l) = limit {
            s["linux"] = serde_json::json!({"resources": {"memory": {"limit": l}}});
        }
        serde_json::from_value(s).unwrap()
    }

    fn rootfs() -> tempdir::Dir {
        let d = tempdir::Dir::new();
        std::fs::write(d.0.join("hello"), b"\x7fELF....").unwrap();
        std::fs::write(d.0.join("sh"), b"#!/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.0.join("escape")).unwrap();
        d
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "pvrun-shim-plan-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn args_env_and_memory_limit_come_from_the_spec() {
        let root = rootfs();
        let ok = |_: &Path, _: &[u8]| Ok(info(14 * MIB));
        let p = plan(&spec(&["/hello", "a b"], None), &root.0, ok).unwrap();
        assert_eq!(p.argv, ["/hello", "a b"]);
        assert_eq!(
            p.env,
            [("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        assert_eq!(p.mem, 64 * MIB);
        // A limit below the default bounds the memory (rounded down to 2 MiB) ...
        let p = plan(&spec(&["/hello"], Some(33 * MIB as i64)), &root.0, ok).unwrap();
        assert_eq!(p.mem, 32 * MIB);
        // ... one above it does not raise it ...
        let p = plan(&spec(&["/hello"], Some(1 << 40)), &root.0, ok).unwrap();
        assert_eq!(p.mem, 64 * MIB);
        // ... and one below the guest's minimum is a one-line error.
        let e = plan(&spec(&["/hello"], Some(8 * MIB as i64)), &root.0, ok).unwrap_err();
        assert!(
            e.contains("memory limit 8M is below what this guest needs (14M)"),
            "{e}"
        );
    }

    #[test]
    fn non_pvrun_commands_are_refused_with_the_reason() {
        let root = rootfs();
        let ok = |_: &Path, _: &[u8]| Ok(info(14 * MIB));
        let cases: &[(&[&str], &str)] = &[
            (&["/bin/busybox"], "is not in the image"),
            (&["/sh"], "is not an ELF guest"),
            (&["/escape"], "leads outside the image"),
            (&["/../hello"], "not an absolute path"),
            (&["hello"], "not an absolute path"),
            (&[], "has no command"),
        ];
        for (args, want) in cases {
            let e = plan(&spec(args, None), &root.0, ok).unwrap_err();
            assert!(e.contains(want), "{args:?}: {e}");
            assert!(!e.contains('\n'));
        }
        let mut tty = spec(&["/hello"], None);
        let mut process = tty.process().clone().unwrap();
        process.set_terminal(Some(true));
        tty.set_process(Some(process));
        let e = plan(&tty, &root.0, ok).unwrap_err();
        assert!(e.contains("no terminal"), "{e}");
        let bad = |_: &Path, _: &[u8]| Err("guest `/hello` was built for pvrun ABI v2".to_string());
        let e = plan(&spec(&["/hello"], None), &root.0, bad).unwrap_err();
        assert!(e.contains("ABI v2"), "{e}");
    }

    #[test]
    fn declared_disks_come_from_mounts_at_pvrun_disks() {
        let root = rootfs();
        let img = root.0.join("disk.img");
        std::fs::write(&img, [0u8; 4096]).unwrap();
        let mut gi = info(14 * MIB);
        gi.devices = vec!["block:data".into(), "net:eth0".into()];
        let with_mounts = |mounts: serde_json::Value| {
            let mut v = serde_json::to_value(spec(&["/hello"], None)).unwrap();
            v["mounts"] = mounts;
            serde_json::from_value::<Spec>(v).unwrap()
        };
        let bind = |src: &Path, dst: &str, opts: &[&str]| serde_json::json!({"destination": dst, "type": "bind", "source": src, "options": opts});
        let ok = with_mounts(serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            bind(&img, "/pvrun/disks/data", &["rbind", "rw"]),
        ]));
        assert_eq!(
            disks(&ok, &gi).unwrap(),
            [format!("data={}", img.display())]
        );
        let ro = with_mounts(serde_json::json!([bind(
            &img,
            "/pvrun/disks/data",
            &["rbind", "ro"]
        )]));
        assert_eq!(
            disks(&ro, &gi).unwrap(),
            [format!("data={},ro", img.display())]
        );
        // The guest declares no disk: nothing needed, nothing attached.
        assert!(disks(&ok, &info(14 * MIB)).is_err());
        assert_eq!(
            disks(&spec(&["/hello"], None), &info(14 * MIB)).unwrap(),
            Vec::<String>::new()
        );
        let cases = [
            (
                spec(&["/hello"], None),
                "needs disk `data`: mount a disk image file at /pvrun/disks/data",
            ),
            (
                with_mounts(serde_json::json!([bind(
                    &root.0,
                    "/pvrun/disks/data",
                    &["rbind"]
                )])),
                "is not a regular file",
            ),
            (
                with_mounts(serde_json::json!([bind(
                    &root.0.join("none"),
                    "/pvrun/disks/data",
                    &["rbind"]
                )])),
                "cannot open the mount source",
            ),
            (
                with_mounts(serde_json::json!([bind(
                    &img,
                    "/pvrun/disks/logs",
                    &["rbind"]
                )])),
                "does not declare (it declares: data)",
            ),
            (
                with_mounts(serde_json::json!([
                    bind(&img, "/pvrun/disks/data", &[]),
                    bind(&img, "/pvrun/disks/data", &[])
                ])),
                "mounted twice",
            ),
        ];
        for (s, want) in cases {
            let e = disks(&s, &gi).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
