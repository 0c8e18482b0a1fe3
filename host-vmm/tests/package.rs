//! `pvrun package`: guest ELFs as OCI images (one layer with the ELF, a config whose
//! entrypoint is the guest and whose labels say what it is), reproducible byte for byte.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use common::{TempDir, guest, pvrun_bin};
use sha2::{Digest, Sha256};

/// A temporary directory removed on drop.
struct Out {
    status: i32,
    stdout: String,
    stderr: String,
}

/// `pvrun package OPTS -o OUT ELF [-- CMD]` (`opts` may end with `--` and the Cmd).
fn package(elf: &Path, out: &Path, opts: &[&str]) -> Out {
    let split = opts.iter().position(|a| *a == "--").unwrap_or(opts.len());
    let o = Command::new(pvrun_bin())
        .arg("package")
        .args(&opts[..split])
        .arg("-o")
        .arg(out)
        .arg(elf)
        .args(&opts[split..])
        .output()
        .unwrap();
    Out {
        status: o.status.code().unwrap(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn sha256(b: &[u8]) -> String {
    let h = Sha256::digest(b);
    format!(
        "sha256:{}",
        h.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// The entries of a tar: path -> (mode, mtime, uid, bytes), in archive order.
fn untar(bytes: &[u8]) -> Vec<(String, u32, u64, u64, Vec<u8>)> {
    let mut a = tar::Archive::new(bytes);
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let h = e.header().clone();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            (
                e.path().unwrap().display().to_string(),
                h.mode().unwrap(),
                h.mtime().unwrap(),
                h.uid().unwrap(),
                data,
            )
        })
        .collect()
}

fn json(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b).unwrap()
}

/// Reads blob `digest` of an OCI layout held as path -> bytes, checking it is
/// content-addressed.
fn blob<'a>(files: &'a BTreeMap<String, Vec<u8>>, digest: &str) -> &'a [u8] {
    let path = format!("blobs/sha256/{}", digest.strip_prefix("sha256:").unwrap());
    let b = files.get(&path).unwrap_or_else(|| panic!("no blob {path}"));
    assert_eq!(sha256(b), digest, "blob {path} is not content-addressed");
    b
}

fn dir_files(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    fn walk(root: &Path, d: &Path, m: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, m);
            } else {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                m.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    walk(root, root, &mut m);
    m
}

#[test]
fn oci_dir_has_one_layer_with_the_elf_and_labels_from_the_elf() {
    let elf = guest("hello");
    let tmp = TempDir::new("package-dir");
    let out = tmp.0.join("img");
    let r = package(
        &elf,
        &out,
        &["--env", "GREETING=packaged", "--", "--exit", "3"],
    );
    assert_eq!(r.status, 0, "{}", r.stderr);
    let files = dir_files(&out);
    assert_eq!(
        json(&files["oci-layout"]),
        serde_json::json!({"imageLayoutVersion": "1.0.0"})
    );
    let index = json(&files["index.json"]);
    let m = &index["manifests"][0];
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(
        m["annotations"]["io.containerd.image.name"],
        "docker.io/pvrun/hello:latest"
    );
    assert_eq!(
        m["annotations"]["org.opencontainers.image.ref.name"],
        "latest"
    );
    assert_eq!(m["platform"]["architecture"], "amd64");
    let digest = m["digest"].as_str().unwrap();
    // The printed line names the reference and the manifest digest.
    assert_eq!(
        r.stdout.trim(),
        format!(
            "docker.io/pvrun/hello:latest {digest} (program guest, ABI v{}) -> {}",
            pvrun_abi::ABI_VERSION,
            out.display()
        )
    );
    let manifest = json(blob(&files, digest));
    assert_eq!(m["size"], blob(&files, digest).len());
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let ann = &manifest["annotations"];
    assert_eq!(ann["io.pvrun.guest"], "/hello");
    assert_eq!(
        ann["io.pvrun.abi-version"],
        pvrun_abi::ABI_VERSION.to_string()
    );
    assert_eq!(ann["io.pvrun.kind"], "program");
    assert_eq!(ann["io.pvrun.mem"], (64u64 << 20).to_string());
    assert_eq!(ann["io.pvrun.min-mem"], (14u64 << 20).to_string());
    assert_eq!(ann["io.pvrun.devices"], "");

    let config = json(blob(&files, manifest["config"]["digest"].as_str().unwrap()));
    assert_eq!(config["os"], "linux");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/hello"])
    );
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["--exit", "3"]));
    assert_eq!(
        config["config"]["Env"],
        serde_json::json!(["GREETING=packaged"])
    );
    assert_eq!(config["config"]["Labels"], *ann);

    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let gz = blob(&files, layers[0]["digest"].as_str().unwrap());
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut tar)
        .unwrap();
    assert_eq!(
        config["rootfs"]["diff_ids"],
        serde_json::json!([sha256(&tar)])
    );
    let entries = untar(&tar);
    assert_eq!(entries.len(), 1, "the layer holds the ELF alone");
    let (path, mode, mtime, uid, data) = &entries[0];
    assert_eq!(path, "hello");
    assert_eq!((*mode, *mtime, *uid), (0o755, 0, 0));
    assert_eq!(*data, std::fs::read(&elf).unwrap());
}

#[test]
fn same_elf_gives_the_same_digest_and_bytes_whatever_its_path_or_mtime() {
    let elf = guest("hello");
    let tmp = TempDir::new("package-repro");
    // A copy elsewhere, with another mtime.
    let copy_dir = tmp.0.join("elsewhere");
    std::fs::create_dir_all(&copy_dir).unwrap();
    let copy = copy_dir.join("hello");
    std::fs::copy(&elf, &copy).unwrap();
    let f = std::fs::File::options().write(true).open(&copy).unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000))
        .unwrap();
    drop(f);

    let mut digests = Vec::new();
    let mut archives = Vec::new();
    for (i, src) in [&elf, &copy, &elf].into_iter().enumerate() {
        let out = tmp.0.join(format!("img{i}.tar"));
        let r = package(src, &out, &[]);
        assert_eq!(r.status, 0, "{}", r.stderr);
        digests.push(r.stdout.split_whitespace().nth(1).unwrap().to_string());
        archives.push(std::fs::read(&out).unwrap());
    }
    assert!(digests[0].starts_with("sha256:"));
    assert_eq!(digests[0], digests[1]);
    assert_eq!(digests[0], digests[2]);
    assert_eq!(archives[0], archives[1]);
    assert_eq!(archives[0], archives[2]);

    // Entries sorted, mtime 0, and the same layout as the directory form.
    let entries = untar(&archives[0]);
    let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert!(entries.iter().all(|e| e.2 == 0 && e.3 == 0));
    assert!(names.contains(&"index.json") && names.contains(&"oci-layout"));
    let dir = tmp.0.join("dir");
    assert_eq!(package(&elf, &dir, &[]).status, 0);
    let from_tar: BTreeMap<String, Vec<u8>> = entries
        .into_iter()
        .filter(|e| !e.0.ends_with('/'))
        .map(|e| (e.0, e.4))
        .collect();
    assert_eq!(from_tar, dir_files(&dir));

    // Different content or options give a different image.
    let named = tmp.0.join("named.tar");
    let r = package(&elf, &named, &["--name", "registry.example/team/hello:1.0"]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert!(
        r.stdout.starts_with("registry.example/team/hello:1.0 "),
        "{}",
        r.stdout
    );
    let other = package(&elf, &tmp.0.join("cmd.tar"), &["--", "x"]);
    assert_ne!(other.stdout.split_whitespace().nth(1).unwrap(), digests[0]);
}

#[test]
fn docker_archive_has_docker_manifest_over_the_same_blobs() {
    let elf = guest("hello");
    let tmp = TempDir::new("package-docker");
    let out = tmp.0.join("img.tar");
    let r = package(
        &elf,
        &out,
        &["--format", "docker-archive", "--name", "hello"],
    );
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert!(r.stdout.starts_with("docker.io/library/hello:latest "));
    let files: BTreeMap<String, Vec<u8>> = untar(&std::fs::read(&out).unwrap())
        .into_iter()
        .filter(|e| !e.0.ends_with('/'))
        .map(|e| (e.0, e.4))
        .collect();
    let dm = json(&files["manifest.json"]);
    assert_eq!(dm[0]["RepoTags"], serde_json::json!(["hello:latest"]));
    let config_path = dm[0]["Config"].as_str().unwrap();
    let config = json(&files[config_path]);
    assert_eq!(config["config"]["Labels"]["io.pvrun.guest"], "/hello");
    let layer_path = dm[0]["Layers"][0].as_str().unwrap();
    assert!(files.contains_key(layer_path));
    assert!(files.contains_key("index.json"));
}

#[test]
fn declared_devices_and_function_guests_are_labelled() {
    let tmp = TempDir::new("package-kinds");
    let labels = |name: &str, opts: &[&str]| {
        let out = tmp.0.join(name);
        let r = package(&guest(name), &out, opts);
        assert_eq!(r.status, 0, "{}", r.stderr);
        let files = dir_files(&out);
        let index = json(&files["index.json"]);
        let manifest = json(blob(
            &files,
            index["manifests"][0]["digest"].as_str().unwrap(),
        ));
        (r.stdout, manifest["annotations"].clone())
    };
    let (_, kv) = labels("kvstore", &[]);
    assert_eq!(kv["io.pvrun.devices"], "block:data");
    assert_eq!(kv["io.pvrun.kind"], "program");
    let (line, f) = labels("functions", &["--kind", "function"]);
    assert_eq!(f["io.pvrun.kind"], "function", "{line}");
    assert!(line.contains("(function guest"), "{line}");
}

#[test]
fn the_kind_defaults_to_what_the_elf_says() {
    let tmp = TempDir::new("package-kind-default");
    let kind = |elf: &Path, name: &str, opts: &[&str]| {
        let out = tmp.0.join(name);
        let r = package(elf, &out, opts);
        assert_eq!(r.status, 0, "{}", r.stderr);
        let files = dir_files(&out);
        let index = json(&files["index.json"]);
        let manifest = json(blob(
            &files,
            index["manifests"][0]["digest"].as_str().unwrap(),
        ));
        (
            manifest["annotations"]["io.pvrun.kind"]
                .as_str()
                .unwrap()
                .to_string(),
            r,
        )
    };
    // The functions guest (pvrun::export_functions!) is a function without --kind ...
    let (k, r) = kind(&guest("functions"), "functions", &[]);
    assert_eq!(k, "function", "{}", r.stdout);
    assert!(r.stdout.contains("(function guest"), "{}", r.stdout);
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    // ... hello (no export_functions!) is a program, and an explicit flag wins.
    assert_eq!(kind(&guest("hello"), "hello", &[]).0, "program");
    assert_eq!(
        kind(&guest("functions"), "forced", &["--kind", "program"]).0,
        "program"
    );
    // A stripped function guest: no symbols, so a program, with a note saying so.
    let stripped = tmp.0.join("functions-stripped");
    let o = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(guest("functions"))
        .output()
        .expect("strip (binutils) is needed");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (k, r) = kind(&stripped, "stripped", &[]);
    assert_eq!(k, "program");
    assert!(
        r.stderr.contains("has no symbol table") && r.stderr.contains("--kind function"),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
}

#[test]
fn elfs_pvrun_would_refuse_are_not_packaged() {
    let tmp = TempDir::new("package-refuse");
    let out = tmp.0.join("img.tar");
    // A host program: not a pvrun guest.
    let r = package(Path::new("/bin/true"), &out, &[]);
    assert_eq!(r.status, 125);
    assert!(
        r.stderr.starts_with("pvrun package: error: "),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("position-independent"), "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(!out.exists());
    // Not a file at all, and a bad name.
    let r = package(&tmp.0.join("missing"), &out, &[]);
    assert_eq!(r.status, 125);
    assert!(r.stderr.contains("cannot read guest"), "{}", r.stderr);
    let r = package(&guest("hello"), &out, &["--name", "Bad\u{1b}[31mName"]);
    assert_eq!(r.status, 125);
    assert!(
        r.stderr.contains("is not an image reference"),
        "{}",
        r.stderr
    );
    assert!(
        !r.stderr.contains('\u{1b}'),
        "control text escaped: {:?}",
        r.stderr
    );
    assert!(!out.exists());
}
