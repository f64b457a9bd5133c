//! The build's manifest: the pinned inputs, the hashed outputs, and writing and checking them.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{backend, MANIFEST};

/// A Debian package pinned by version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Pkg {
    pub(super) name: String,
    pub(super) version: String,
}

/// Everything the build depends on; equal inputs and intact outputs mean nothing to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Inputs {
    pub(super) format: u32,
    pub(super) abi: String,
    /// Kernel, headers, common headers, kbuild.
    pub(super) packages: Vec<Pkg>,
    /// busybox-static and gcc-12 as installed on the build machine.
    pub(super) host_packages: Vec<Pkg>,
    pub(super) busybox_sha256: String,
    /// sha256 over the glue source, Kbuild, remio-ids.h, /init, the guest tools and the module list.
    pub(super) recipe_sha256: String,
    pub(super) glue_source_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Artifact {
    pub(super) name: String,
    pub(super) file: String,
    pub(super) bytes: u64,
    pub(super) sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Manifest {
    pub(super) inputs: Inputs,
    /// The downloaded .deb files.
    pub(super) debs: Vec<Artifact>,
    /// vmlinuz, initramfs.cpio, remio_glue.ko.
    pub(super) outputs: Vec<Artifact>,
    /// Module file stems in the order /init loads them.
    pub(super) modules: Vec<String>,
    pub(super) build_seconds: f64,
    /// [`apt_lists_fingerprint`](super::packages::apt_lists_fingerprint) when the packages were resolved.
    #[serde(default)]
    pub(super) apt_lists: String,
    /// The backend VM (`remio run --dispatcher c-driver`): built, or skipped and why. None in a
    /// manifest written before the backend existed, or while it is being built.
    #[serde(default)]
    pub(super) backend: Option<backend::BackendRecord>,
}

pub(super) fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in digest {
        let _ = write!(s, "{b:02x}");
    }
    s
}

pub(super) fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(sha256_hex(&bytes))
}

pub(super) fn artifact(name: &str, path: &Path) -> anyhow::Result<Artifact> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Artifact {
        name: name.to_owned(),
        file,
        bytes: bytes.len() as u64,
        sha256: sha256_hex(&bytes),
    })
}

/// Writes through a temporary file and a rename, so a QEMU started meanwhile (other tests use
/// these files) sees either the old or the new file, never half of one.
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", path.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

pub(super) fn write_manifest(dir: &Path, manifest: &Manifest) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(manifest)?;
    write_atomic(&dir.join(MANIFEST), format!("{json}\n").as_bytes())
}

pub(super) fn read_manifest(dir: &Path) -> Option<Manifest> {
    let text = std::fs::read_to_string(dir.join(MANIFEST)).ok()?;
    serde_json::from_str(&text).ok()
}

/// True when every (frontend) output in the manifest exists with its recorded hash.
pub(super) fn outputs_intact(dir: &Path, manifest: &Manifest) -> bool {
    artifacts_intact(dir, &manifest.outputs)
}

/// True when each artifact exists in `dir` with its recorded hash.
pub(super) fn artifacts_intact<'a>(
    dir: &Path,
    artifacts: impl IntoIterator<Item = &'a Artifact>,
) -> bool {
    artifacts.into_iter().all(|a| {
        sha256_file(&dir.join(&a.file))
            .map(|h| h == a.sha256)
            .unwrap_or(false)
    })
}
