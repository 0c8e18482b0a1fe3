//! pvrun-oci: packages a pvrun guest ELF as an OCI image (`pvrun package`, `cargo pvrun
//! package`), and reads back what such an image says about its guest.
//!
//! The image has one layer holding the guest ELF at `/NAME` (mode 0755, owner 0:0), an
//! image config whose entrypoint is `["/NAME"]`, and labels (in the config) and annotations
//! (on the manifest) saying it is a pvrun guest: [`ANNOTATION_GUEST`] and the others below.
//! Everything is reproducible: fixed mtimes (0), fixed owners, sorted entries and JSON keys,
//! no creation time, so the same ELF and options always give the same digests.
//!
//! The image types come from `oci-spec` (the OCI image-spec in Rust, kept by the youki /
//! containers community); tar and gzip from the `tar` and `flate2` crates.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, Digest, HistoryBuilder,
    ImageConfigurationBuilder, ImageIndexBuilder, ImageManifestBuilder, MediaType, Os,
    PlatformBuilder, RootFsBuilder,
};
use sha2::Sha256;

pub mod cli;

/// Label/annotation present on every pvrun image: the guest ELF's path in the image.
pub const ANNOTATION_GUEST: &str = "io.pvrun.guest";
/// The guest's pvrun ABI version (decimal).
pub const ANNOTATION_ABI: &str = "io.pvrun.abi-version";
/// `program` or `function`.
pub const ANNOTATION_KIND: &str = "io.pvrun.kind";
/// Default guest memory in bytes (what `pvrun` gives it without `--mem`, or the
/// guest's minimum if that is larger).
pub const ANNOTATION_MEM: &str = "io.pvrun.mem";
/// The least guest memory the image boots in, in bytes.
pub const ANNOTATION_MIN_MEM: &str = "io.pvrun.min-mem";
/// Devices the guest declares it needs: comma-separated `KIND:NAME` (`block:data`,
/// `net:eth0`); empty when none.
pub const ANNOTATION_DEVICES: &str = "io.pvrun.devices";

/// Environment variable a function image's config sets (`PVRUN_KIND=function`): how the
/// shim knows to serve it.
pub const ENV_KIND: &str = "PVRUN_KIND";

/// containerd's annotation naming an image in an archive (`ctr images import`).
const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// What kind of guest an ELF is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestKind {
    /// Runs once from `main` to an exit status.
    Program,
    /// Initialises, then serves function calls (`pvrun serve`).
    Function,
}

impl GuestKind {
    /// `program` or `function`.
    pub fn as_str(self) -> &'static str {
        match self {
            GuestKind::Program => "program",
            GuestKind::Function => "function",
        }
    }
}

impl FromStr for GuestKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "program" => Ok(GuestKind::Program),
            "function" => Ok(GuestKind::Function),
            _ => Err(format!("`{s}` is not a guest kind (program or function)")),
        }
    }
}

/// What a guest ELF says about itself, read with host-vmm's loader (every check `pvrun`
/// makes before booting it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestInfo {
    /// ABI version from the guest's note.
    pub abi_version: u32,
    /// Program or function guest (a function guest links the SDK's `function::serve`).
    pub kind: GuestKind,
    /// Least memory it boots in.
    pub min_mem: u64,
    /// Memory it gets by default: pvrun's default, or `min_mem` if larger.
    pub default_mem: u64,
    /// Declared devices, as `KIND:NAME`.
    pub devices: Vec<String>,
}

/// pvrun's default guest memory (`--mem`).
pub const DEFAULT_MEM: u64 = 64 << 20;

impl GuestInfo {
    /// The facts of a guest ELF that host-vmm's loader validated (`GuestImage`: its ABI
    /// version, required devices and `min_mem_size()`). The kind is `program` unless the
    /// packager says `function` ([`PackageOptions::kind`]): the symbol table does not tell
    /// reliably (every SDK guest links `function::serve`).
    /// Device names are validated by the loader; anything outside `[A-Za-z0-9._-]` would
    /// still be replaced by `?` here, so labels never carry control text.
    pub fn new(abi_version: u32, required_devices: &[(u32, String)], min_mem: u64) -> GuestInfo {
        let mut devices: Vec<String> = required_devices
            .iter()
            .map(|(kind, name)| {
                let kind = match *kind {
                    pvrun_abi::device::BLOCK => "block".to_string(),
                    pvrun_abi::device::NET => "net".to_string(),
                    k => format!("kind{k}"),
                };
                let name: String = name
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || "._-".contains(c) {
                            c
                        } else {
                            '?'
                        }
                    })
                    .collect();
                format!("{kind}:{name}")
            })
            .collect();
        devices.sort();
        GuestInfo {
            abi_version,
            kind: GuestKind::Program,
            min_mem,
            default_mem: DEFAULT_MEM.max(min_mem),
            devices,
        }
    }
}

/// How the image is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// An OCI image-layout directory.
    OciDir,
    /// An OCI image layout in a tar file (`ctr images import`, `skopeo copy oci-archive:`).
    OciArchive,
    /// A tar with both the OCI layout and Docker's `manifest.json` (`docker load`, `podman
    /// load`, `skopeo copy docker-archive:`, `ctr images import`).
    DockerArchive,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "oci-dir" => Ok(Format::OciDir),
            "oci-archive" => Ok(Format::OciArchive),
            "docker-archive" => Ok(Format::DockerArchive),
            _ => Err(format!(
                "`{s}` is not an image format (oci-dir, oci-archive or docker-archive)"
            )),
        }
    }
}

/// What to package.
#[derive(Clone, Debug, Default)]
pub struct PackageOptions {
    /// Image reference, e.g. `registry.example/team/hello:1.0` (default
    /// `pvrun/NAME:latest`); short names are normalised the way Docker does
    /// (`docker.io/pvrun/NAME:latest`).
    pub name: Option<String>,
    /// Override the detected guest kind.
    pub kind: Option<GuestKind>,
    /// Environment of the image config (`KEY=VALUE`).
    pub env: Vec<String>,
    /// Default arguments (the config's `Cmd`).
    pub cmd: Vec<String>,
}

/// The image that was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packaged {
    /// The full reference it is named by.
    pub reference: String,
    /// Digest of the manifest (the image's identity).
    pub manifest_digest: String,
    /// Digest of the config.
    pub config_digest: String,
    /// Digest of the (gzipped) layer.
    pub layer_digest: String,
    /// What the guest declares.
    pub info: GuestInfo,
    /// The guest's path inside the image.
    pub guest_path: String,
}

/// One content-addressed blob.
struct Blob {
    digest: String,
    bytes: Vec<u8>,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Blob {
        Blob {
            digest: sha256(&bytes),
            bytes,
        }
    }

    fn descriptor(&self, media_type: MediaType) -> Result<Descriptor> {
        Ok(Descriptor::new(
            media_type,
            self.bytes.len() as u64,
            Digest::from_str(&self.digest)?,
        ))
    }

    fn path(&self) -> String {
        format!("blobs/sha256/{}", &self.digest["sha256:".len()..])
    }
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    let hash = Sha256::digest(bytes);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in hash {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// JSON with every object's keys sorted (oci-spec keeps labels and annotations in
/// `HashMap`s, whose order changes from run to run).
fn canonical_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    fn sort(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(map) => {
                let mut entries: Vec<_> = map.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                serde_json::Value::Object(entries.into_iter().map(|(k, v)| (k, sort(v))).collect())
            }
            serde_json::Value::Array(a) => {
                serde_json::Value::Array(a.into_iter().map(sort).collect())
            }
            other => other,
        }
    }
    Ok(serde_json::to_vec(&sort(serde_json::to_value(value)?))?)
}

/// Normalises an image reference the way Docker and containerd's tools do: a first
/// component without `.` or `:` (and not `localhost`) gets `docker.io/`, a single
/// component also `library/`, and a missing tag `:latest`.
pub fn normalize_reference(name: &str) -> Result<String> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/:@".contains(&b))
        && !name.starts_with('/')
        && !name.ends_with('/')
        && !name.contains("//");
    if !ok {
        bail!(
            "`{}` is not an image reference (use lower-case letters, digits and ._-/: as in registry.example/team/hello:1.0)",
            name.escape_default()
        );
    }
    let (first, rest) = match name.split_once('/') {
        Some((f, r)) => (f, Some(r)),
        None => (name, None),
    };
    let mut full = match rest {
        Some(_) if first.contains('.') || first.contains(':') || first == "localhost" => {
            name.to_string()
        }
        Some(_) => format!("docker.io/{name}"),
        None => format!("docker.io/library/{name}"),
    };
    let last = full.rsplit('/').next().unwrap_or_default();
    if !last.contains(':') && !last.contains('@') {
        full.push_str(":latest");
    }
    Ok(full)
}

/// The ELF's file name as a path-safe image entry name.
fn entry_name(elf: &Path) -> String {
    let stem = elf
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let clean: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let clean = clean.trim_matches(|c| c == '.' || c == '-').to_string();
    if clean.is_empty() {
        "guest".to_string()
    } else {
        clean
    }
}

/// A tar header for a regular file or directory, the same on every machine.
fn header(path: &str, size: u64, mode: u32, dir: bool) -> Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path)?;
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_entry_type(if dir {
        tar::EntryType::Directory
    } else {
        tar::EntryType::Regular
    });
    h.set_cksum();
    Ok(h)
}

/// The layer: the guest ELF alone, at `/NAME`, mode 0755, owned by root, mtime 0.
fn layer_tar(name: &str, elf: &[u8]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    b.append(&header(name, elf.len() as u64, 0o755, false)?, elf)?;
    Ok(b.into_inner()?)
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    // No file name, mtime 0, OS "unknown": the same bytes wherever it runs.
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), flate2::Compression::best());
    gz.write_all(bytes)?;
    Ok(gz.finish()?)
}

/// Packages the guest ELF `elf` (its contents `bytes`, which `info` describes) as an image
/// written to `out` in `format`.
pub fn package(
    elf: &Path,
    bytes: &[u8],
    mut info: GuestInfo,
    out: &Path,
    format: Format,
    opts: &PackageOptions,
) -> Result<Packaged> {
    if let Some(kind) = opts.kind {
        info.kind = kind;
    }
    let name = entry_name(elf);
    let reference = normalize_reference(
        opts.name
            .as_deref()
            .unwrap_or(&format!("pvrun/{name}:latest")),
    )?;
    for e in &opts.env {
        if !e.contains('=') || e.starts_with('=') {
            bail!("`{}` is not KEY=VALUE", e.escape_default());
        }
    }
    let guest_path = format!("/{name}");
    // The shim reads the kind from the container's environment, where the image's Env
    // arrives (labels do not reach a runtime).
    let mut env = opts.env.clone();
    if info.kind == GuestKind::Function && !env.iter().any(|e| e.starts_with("PVRUN_KIND=")) {
        env.push(format!("{ENV_KIND}=function"));
    }

    let mut labels = HashMap::new();
    labels.insert(ANNOTATION_GUEST.to_string(), guest_path.clone());
    labels.insert(ANNOTATION_ABI.to_string(), info.abi_version.to_string());
    labels.insert(ANNOTATION_KIND.to_string(), info.kind.as_str().to_string());
    labels.insert(ANNOTATION_MEM.to_string(), info.default_mem.to_string());
    labels.insert(ANNOTATION_MIN_MEM.to_string(), info.min_mem.to_string());
    labels.insert(ANNOTATION_DEVICES.to_string(), info.devices.join(","));

    let tar = layer_tar(&name, bytes)?;
    let diff_id = sha256(&tar);
    let layer = Blob::new(gzip(&tar)?);

    let mut exec = ConfigBuilder::default()
        .entrypoint(vec![guest_path.clone()])
        .labels(labels.clone());
    if !env.is_empty() {
        exec = exec.env(env);
    }
    if !opts.cmd.is_empty() {
        exec = exec.cmd(opts.cmd.clone());
    }
    let config = ImageConfigurationBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(exec.build()?)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![diff_id])
                .build()?,
        )
        .history(vec![
            HistoryBuilder::default()
                .created_by(format!("pvrun package {name}"))
                .comment(format!(
                    "pvrun {} guest, ABI v{}",
                    info.kind.as_str(),
                    info.abi_version
                ))
                .build()?,
        ])
        .build()?;
    let config = Blob::new(canonical_json(&config)?);

    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config.descriptor(MediaType::ImageConfig)?)
        .layers(vec![layer.descriptor(MediaType::ImageLayerGzip)?])
        .annotations(labels)
        .build()?;
    let manifest = Blob::new(canonical_json(&manifest)?);

    let tag = reference
        .rsplit('/')
        .next()
        .and_then(|l| l.split_once(':'))
        .map(|(_, t)| t.to_string())
        .unwrap_or_else(|| "latest".to_string());
    let mut index_ann = HashMap::new();
    index_ann.insert(ANNOTATION_CONTAINERD_NAME.to_string(), reference.clone());
    index_ann.insert(
        oci_spec::image::ANNOTATION_REF_NAME.to_string(),
        tag.clone(),
    );
    let manifest_desc = DescriptorBuilder::default()
        .media_type(MediaType::ImageManifest)
        .size(manifest.bytes.len() as u64)
        .digest(Digest::from_str(&manifest.digest)?)
        .annotations(index_ann)
        .platform(
            PlatformBuilder::default()
                .architecture(Arch::Amd64)
                .os(Os::Linux)
                .build()?,
        )
        .build()?;
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest_desc])
        .build()?;

    // Every file of the image, by path (sorted: the order of a tar's entries is part of
    // its digest).
    let mut files: Vec<(String, Vec<u8>)> = vec![
        (
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ),
        ("index.json".into(), canonical_json(&index)?),
        (config.path(), config.bytes.clone()),
        (layer.path(), layer.bytes.clone()),
        (manifest.path(), manifest.bytes.clone()),
    ];
    if format == Format::DockerArchive {
        // Docker's `docker save` manifest, over the same blobs (as Docker 25 writes it).
        let short = reference
            .strip_prefix("docker.io/library/")
            .or_else(|| reference.strip_prefix("docker.io/"))
            .unwrap_or(&reference);
        let docker = serde_json::json!([{
            "Config": config.path(),
            "RepoTags": [short],
            "Layers": [layer.path()],
        }]);
        files.push(("manifest.json".into(), canonical_json(&docker)?));
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));

    match format {
        Format::OciDir => write_dir(out, &files)?,
        Format::OciArchive | Format::DockerArchive => write_archive(out, &files)?,
    }
    Ok(Packaged {
        reference,
        manifest_digest: manifest.digest,
        config_digest: config.digest,
        layer_digest: layer.digest,
        info,
        guest_path,
    })
}

fn write_dir(out: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    if out.exists() && !out.is_dir() {
        bail!("`{}` exists and is not a directory", out.display());
    }
    for (path, bytes) in files {
        let p = out.join(path);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("cannot create `{}`", parent.display()))?;
        }
        fs::write(&p, bytes).with_context(|| format!("cannot write `{}`", p.display()))?;
    }
    Ok(())
}

fn write_archive(out: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    let mut b = tar::Builder::new(Vec::new());
    for dir in ["blobs/", "blobs/sha256/"] {
        b.append(&header(dir, 0, 0o755, true)?, std::io::empty())?;
    }
    for (path, bytes) in files {
        b.append(
            &header(path, bytes.len() as u64, 0o644, false)?,
            bytes.as_slice(),
        )?;
    }
    let bytes = b.into_inner()?;
    // Write beside, then rename: a failed run never leaves half an archive under OUT.
    let tmp = PathBuf::from(format!("{}.tmp-{}", out.display(), std::process::id()));
    fs::write(&tmp, &bytes).with_context(|| format!("cannot write `{}`", tmp.display()))?;
    fs::rename(&tmp, out).with_context(|| {
        let _ = fs::remove_file(&tmp);
        format!("cannot write `{}`", out.display())
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalise_like_docker() {
        assert_eq!(
            normalize_reference("hello").unwrap(),
            "docker.io/library/hello:latest"
        );
        assert_eq!(
            normalize_reference("pvrun/hello").unwrap(),
            "docker.io/pvrun/hello:latest"
        );
        assert_eq!(
            normalize_reference("localhost:5000/a/b:1.0").unwrap(),
            "localhost:5000/a/b:1.0"
        );
        assert_eq!(
            normalize_reference("reg.example/x").unwrap(),
            "reg.example/x:latest"
        );
        assert!(normalize_reference("Bad Name").is_err());
        assert!(normalize_reference("a//b").is_err());
        assert!(normalize_reference("").is_err());
    }

    #[test]
    fn entry_names_are_path_safe() {
        assert_eq!(entry_name(Path::new("/x/hello")), "hello");
        assert_eq!(entry_name(Path::new("/x/../..")), "guest");
        assert_eq!(entry_name(Path::new("/x/a b\u{1b}")), "a-b");
    }

    #[test]
    fn json_keys_are_sorted() {
        let mut m = HashMap::new();
        for k in ["z", "a", "m", "b", "y"] {
            m.insert(k.to_string(), 1);
        }
        assert_eq!(
            String::from_utf8(canonical_json(&m).unwrap()).unwrap(),
            r#"{"a":1,"b":1,"m":1,"y":1,"z":1}"#
        );
    }
}
