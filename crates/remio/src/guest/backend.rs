//! The backend VM of `remio run --dispatcher c-driver`: the posted Bao I/O dispatcher driver,
//! built at `remio guest build` time from the patch text, our x86 supplements (guest/backend/),
//! and an initramfs whose `/init` loads them and runs `remio dm --kernel-driver`.
//!
//! Built into the guest directory (`target/guest/`) next to the frontend, same kernel:
//! - `backend-initramfs.cpio`: busybox, virtio_pci + virtio_blk and their dependencies,
//!   `remio_backend.ko` (guest/backend/glue), `bao-io-dispatcher.ko` (the driver), virtio_net,
//!   tun and bridge (loaded only when the frontend has net: `remio.bridge=`),
//!   `/usr/bin/baodefect` (guest/backend/tools, static: shows the driver's defects), the shared
//!   libraries of the `remio` binary that ran the build (with the dynamic loader), and
//!   `guest/backend/init`. Not in it: `/usr/bin/remio` and `/etc/remio/dm.toml`, which
//!   [`backend_overlay`] packs into a second newc archive to append at run time (the kernel
//!   unpacks concatenated archives in order).
//! - `remio_backend.ko`, `bao-io-dispatcher.ko`: the two modules, for inspection.
//!
//! When the patch is missing the backend is skipped, loudly, and the manifest says why; the
//! frontend build is not affected. The patch's sha256 is an input of the backend build, so a
//! changed patch rebuilds it. guest/README.md ("The backend VM") documents the QEMU devices the
//! backend expects and the lines its `/init` prints.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context as _};
use serde::{Deserialize, Serialize};

use super::host_tools::{output, run_shown, tool};
use super::initramfs::{Cpio, SKELETON_DIRS};
use super::manifest::{
    artifact, artifacts_intact, read_manifest, sha256_hex, write_atomic, Artifact,
};
use super::modules::{module_order, read_module};
use super::patch::{driver_sources, DriverSources};
use super::{step, KERNEL};

/// Guest sources of the backend, embedded like the frontend's (any change rebuilds `remio` and
/// changes the recipe hash).
const GLUE_C: &str = include_str!("../../../../guest/backend/glue/remio_backend.c");
const GLUE_KBUILD: &str = include_str!("../../../../guest/backend/glue/Kbuild");
const HC_H: &str = include_str!("../../../../guest/backend/remio-hc.h");
const ASM_BAO_H: &str = include_str!("../../../../guest/backend/include/asm/bao.h");
const COMPAT_H: &str = include_str!("../../../../guest/backend/compat.h");
const DRIVER_KBUILD: &str = include_str!("../../../../guest/backend/driver.Kbuild");
const INIT: &str = include_str!("../../../../guest/backend/init");
pub(super) const BAODEFECT_C: &str = include_str!("../../../../guest/backend/tools/baodefect.c");

/// Bumped whenever the backend recipe changes in a way the hashed sources do not show.
const FORMAT: u32 = 2;

/// The kernel modules of the backend's own devices (dependencies are added from modules.dep).
const WANTED_MODULES: &[&str] = &["virtio_pci", "virtio_blk"];
/// The modules `/init` loads only for `remio.bridge=` (the frontend's net): the backend's NIC
/// on the host TAP, the device model's TAP, and the bridge between them (dependencies added,
/// those of [`WANTED_MODULES`] left out).
const NET_MODULES: &[&str] = &["virtio_net", "tun", "bridge"];

/// Our glue module and the driver, as `/init` loads them (after [`WANTED_MODULES`]).
pub const GLUE_MODULE: &str = "remio_backend";
/// The driver's module file stem (lsmod shows it as `bao_io_dispatcher`).
pub const DRIVER_MODULE: &str = "bao-io-dispatcher";

/// File names inside the guest directory.
pub const BACKEND_INITRAMFS: &str = "backend-initramfs.cpio";
const GLUE_KO: &str = "remio_backend.ko";
const DRIVER_KO: &str = "bao-io-dispatcher.ko";

/// Where the backend VM's `remio` binary and device-model config go (see [`backend_overlay`]).
pub const GUEST_REMIO: &str = "usr/bin/remio";
/// The config `/init` passes to `remio dm --kernel-driver --config`.
pub const GUEST_DM_CONFIG: &str = "etc/remio/dm.toml";
/// Sourced by `/init`, when present, just before it starts `remio dm` (a test hook).
pub const GUEST_HOOK: &str = "etc/remio/backend.sh";

/// The patch's file name beside this repository (`../shared/spec/`).
const PATCH_FILE: &str = "bao-io-dispatcher-patch.txt";
/// Environment variable naming the patch (after `--c-driver-patch`).
pub const PATCH_ENV: &str = "REMIO_C_DRIVER_PATCH";

/// Everything the backend build depends on besides the frontend's inputs (kernel, headers,
/// busybox, gcc-12), which the manifest records already.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct BackendInputs {
    format: u32,
    /// sha256 over guest/backend's sources and the module list.
    recipe_sha256: String,
    /// Where the patch was looked for.
    patch_path: String,
    /// sha256 of the patch text; None when it was missing.
    patch_sha256: Option<String>,
    /// Host libraries packed for `remio` (guest path, sha256), from `ldd` of the building binary.
    libraries: Vec<(String, String)>,
}

/// The backend part of the manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct BackendRecord {
    inputs: BackendInputs,
    #[serde(flatten)]
    state: BackendState,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
enum BackendState {
    /// Built: the outputs (backend initramfs, glue, driver) and the modules /init loads.
    Built {
        outputs: Vec<Artifact>,
        modules: Vec<String>,
        build_seconds: f64,
    },
    /// Not built, and why.
    Skipped { reason: String },
}

/// The patch: `--c-driver-patch`, else `$REMIO_C_DRIVER_PATCH`, else [`default_patch_path`].
pub fn patch_path(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_owned();
    }
    match std::env::var_os(PATCH_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => default_patch_path(),
    }
}

/// `../shared/spec/bao-io-dispatcher-patch.txt` relative to the workspace root.
pub fn default_patch_path() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or(manifest_dir);
    workspace.join("../shared/spec").join(PATCH_FILE)
}

fn recipe_hash() -> String {
    let mut text = String::new();
    for part in [
        GLUE_C,
        GLUE_KBUILD,
        HC_H,
        ASM_BAO_H,
        COMPAT_H,
        DRIVER_KBUILD,
        INIT,
        BAODEFECT_C,
    ] {
        text.push_str(&format!("{}\0", part.len()));
        text.push_str(part);
    }
    text.push_str(&WANTED_MODULES.join(","));
    text.push(';');
    text.push_str(&NET_MODULES.join(","));
    sha256_hex(text.as_bytes())
}

/// The shared libraries (and the dynamic loader) `exe` needs, as absolute host paths, from
/// `ldd` (glibc's, in libc-bin).
pub(super) fn shared_libraries(exe: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let text = output(Command::new("ldd").arg(exe))
        .with_context(|| format!("listing the shared libraries of {}", exe.display()))?;
    Ok(parse_ldd(&text))
}

/// Paths in `ldd` output: `name => /path (addr)` and `/path (addr)`; the vDSO has no file.
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    let mut libs = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.insert(PathBuf::from(p));
        }
    }
    libs.into_iter().collect()
}

/// Reads each library (following symlinks) with its guest path (the host path without the
/// leading '/').
pub(super) fn read_libraries(libs: &[PathBuf]) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    libs.iter()
        .map(|p| {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            let guest = p.to_string_lossy().trim_start_matches('/').to_owned();
            Ok((guest, bytes))
        })
        .collect()
}

/// Builds (or finds current) the backend VM's artifacts; returns the manifest record. `root`
/// gives the directory of the extracted kernel packages (extracting them if they are gone),
/// `abi` is their ABI.
pub(super) fn build(
    dir: &Path,
    root: &dyn Fn() -> anyhow::Result<PathBuf>,
    abi: &str,
    previous: Option<&BackendRecord>,
    force: bool,
    patch: &Path,
) -> anyhow::Result<BackendRecord> {
    let started = Instant::now();
    let exe = std::env::current_exe().context("locating the remio binary")?;
    let lib_paths = shared_libraries(&exe)?;
    let libraries = read_libraries(&lib_paths)?;
    let patch_text = match std::fs::read_to_string(patch) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", patch.display())),
    };
    let inputs = BackendInputs {
        format: FORMAT,
        recipe_sha256: recipe_hash(),
        patch_path: std::fs::canonicalize(patch)
            .unwrap_or_else(|_| patch.to_owned())
            .display()
            .to_string(),
        patch_sha256: patch_text.as_deref().map(|t| sha256_hex(t.as_bytes())),
        libraries: libraries
            .iter()
            .map(|(g, b)| (g.clone(), sha256_hex(b)))
            .collect(),
    };
    if let Some(prev) = previous.filter(|p| !force && p.inputs == inputs) {
        let current = match &prev.state {
            BackendState::Skipped { .. } => true,
            BackendState::Built { outputs, .. } => artifacts_intact(dir, outputs),
        };
        if current {
            match &prev.state {
                BackendState::Built { .. } => println!("guest: backend VM up to date"),
                BackendState::Skipped { reason } => {
                    println!("guest: backend VM SKIPPED (unchanged): {reason}");
                }
            }
            return Ok(prev.clone());
        }
    }
    // A half-done backend build must not look current.
    let _ = std::fs::remove_file(dir.join(BACKEND_INITRAMFS));
    let Some(patch_text) = patch_text else {
        let reason = format!(
            "no C driver patch at {} (pass --c-driver-patch PATH or set {PATCH_ENV}); \
             `remio run --dispatcher c-driver` is unavailable",
            patch.display()
        );
        println!("guest: backend VM SKIPPED: {reason}");
        return Ok(BackendRecord {
            inputs,
            state: BackendState::Skipped { reason },
        });
    };
    let sources = driver_sources(&patch_text)
        .with_context(|| format!("extracting the driver from {}", patch.display()))?;

    let root = root()?;
    let headers = root.join("usr/src").join(format!("linux-headers-{abi}"));
    let glue_dir = build_glue(dir, &headers, abi)?;
    let driver_dir = build_driver(dir, &headers, abi, &sources, &glue_dir)?;
    write_atomic(&dir.join(GLUE_KO), &std::fs::read(glue_dir.join(GLUE_KO))?)?;
    write_atomic(
        &dir.join(DRIVER_KO),
        &std::fs::read(driver_dir.join(DRIVER_KO))?,
    )?;

    let modules_dir = root.join("lib/modules").join(abi);
    let order = module_order(&modules_dir, WANTED_MODULES)?;
    let mut modules: Vec<(String, Vec<u8>)> = order
        .iter()
        .map(|(stem, rel)| Ok((stem.clone(), read_module(&modules_dir.join(rel))?)))
        .collect::<anyhow::Result<_>>()?;
    modules.push((GLUE_MODULE.to_owned(), std::fs::read(dir.join(GLUE_KO))?));
    modules.push((
        DRIVER_MODULE.to_owned(),
        std::fs::read(dir.join(DRIVER_KO))?,
    ));
    let net_modules: Vec<(String, Vec<u8>)> = module_order(&modules_dir, NET_MODULES)?
        .iter()
        .filter(|(stem, _)| !order.iter().any(|(s, _)| s == stem))
        .map(|(stem, rel)| Ok((stem.clone(), read_module(&modules_dir.join(rel))?)))
        .collect::<anyhow::Result<_>>()?;
    step(&format!(
        "packing the backend initramfs ({} + {} net modules, {} libraries)",
        modules.len(),
        net_modules.len(),
        libraries.len()
    ));
    let baodefect = build_baodefect(dir)?;
    let cpio = pack(INIT, abi, &modules, &net_modules, &libraries, &baodefect)?;
    write_atomic(&dir.join(BACKEND_INITRAMFS), &cpio)?;
    let record = BackendRecord {
        inputs,
        state: BackendState::Built {
            outputs: vec![
                artifact("backend_initramfs", &dir.join(BACKEND_INITRAMFS))?,
                artifact("backend_glue_module", &dir.join(GLUE_KO))?,
                artifact("driver_module", &dir.join(DRIVER_KO))?,
            ],
            modules: modules.iter().map(|(s, _)| s.clone()).collect(),
            build_seconds: started.elapsed().as_secs_f64(),
        },
    };
    println!(
        "guest: built the backend VM in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        dir.join(BACKEND_INITRAMFS).display()
    );
    Ok(record)
}

/// Runs `make -C headers M=dir modules` and checks the module's vermagic.
fn make_module(
    headers: &Path,
    build_dir: &Path,
    extra: &[String],
    ko: &str,
    abi: &str,
) -> anyhow::Result<()> {
    let build_abs = std::fs::canonicalize(build_dir)?;
    run_shown(
        Command::new(tool("make")?)
            .arg("-s")
            .arg("-C")
            .arg(headers)
            .arg(format!("M={}", build_abs.display()))
            .args(extra)
            .arg("modules"),
    )?;
    let vermagic = output(
        Command::new(tool("modinfo")?)
            .args(["-F", "vermagic"])
            .arg(build_dir.join(ko)),
    )?;
    ensure!(
        vermagic.starts_with(&format!("{abi} ")),
        "{ko}: vermagic {vermagic:?} does not match {abi}"
    );
    Ok(())
}

/// A fresh build directory `<dir>/backend/<name>`.
fn fresh_dir(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let d = dir.join("backend").join(name);
    if d.exists() {
        std::fs::remove_dir_all(&d).with_context(|| format!("removing {}", d.display()))?;
    }
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

fn build_glue(dir: &Path, headers: &Path, abi: &str) -> anyhow::Result<PathBuf> {
    step("building the backend glue module");
    let d = fresh_dir(dir, "glue")?;
    std::fs::write(d.join("remio_backend.c"), GLUE_C)?;
    std::fs::write(d.join("Kbuild"), GLUE_KBUILD)?;
    std::fs::write(d.join("remio-hc.h"), HC_H)?;
    make_module(headers, &d, &[], GLUE_KO, abi)?;
    Ok(d)
}

/// The driver's Kbuild: ours, plus its object list (every .c file of the patch's directory).
fn driver_kbuild(sources: &DriverSources) -> String {
    format!(
        "{DRIVER_KBUILD}bao-io-dispatcher-objs := {}\n",
        sources.objects().join(" ")
    )
}

fn build_driver(
    dir: &Path,
    headers: &Path,
    abi: &str,
    sources: &DriverSources,
    glue_dir: &Path,
) -> anyhow::Result<PathBuf> {
    step("building the Bao I/O dispatcher driver (extracted from the patch)");
    let d = fresh_dir(dir, "driver")?;
    for (name, text) in &sources.files {
        std::fs::write(d.join(name), text)?;
    }
    std::fs::create_dir_all(d.join("include/linux"))?;
    std::fs::create_dir_all(d.join("include/asm"))?;
    std::fs::write(d.join("include/linux/bao.h"), &sources.uapi_header)?;
    std::fs::write(d.join("include/asm/bao.h"), ASM_BAO_H)?;
    std::fs::write(d.join("include/remio-hc.h"), HC_H)?;
    std::fs::write(d.join("compat.h"), COMPAT_H)?;
    std::fs::write(d.join("Kbuild"), driver_kbuild(sources))?;
    // The driver's <asm/bao.h> stand-in uses symbols of the glue module: modpost needs them.
    let symvers = std::fs::canonicalize(glue_dir.join("Module.symvers"))?;
    make_module(
        headers,
        &d,
        &[format!("KBUILD_EXTRA_SYMBOLS={}", symvers.display())],
        DRIVER_KO,
        abi,
    )
    .context("building the driver (sources extracted from the patch, guest/backend/compat.h)")?;
    Ok(d)
}

/// Builds guest/backend/tools/baodefect.c statically (the driver's defects shown from the
/// backend VM; docs/c-driver.md).
pub(super) fn build_baodefect(dir: &Path) -> anyhow::Result<Vec<u8>> {
    step("building baodefect (static)");
    let d = fresh_dir(dir, "tools")?;
    let src = d.join("baodefect.c");
    std::fs::write(&src, BAODEFECT_C)?;
    let bin = d.join("baodefect");
    run_shown(
        Command::new(tool("gcc")?)
            .args(["-O2", "-static", "-Wall", "-o"])
            .arg(&bin)
            .arg(&src),
    )
    .context("building baodefect (needs libc6-dev)")?;
    std::fs::read(&bin).with_context(|| format!("reading {}", bin.display()))
}

/// The backend initramfs: `init` as `/init`, busybox, `/usr/bin/baodefect`, `modules` (loaded
/// by `/init` in this order, listed in `/etc/remio/modules`) and `net_modules`
/// (`/etc/remio/modules-net`) under `/lib/modules/<abi>`, and the shared libraries of `remio`.
/// The c-driver backend and the rust-kmod one (`rust_kmod::backend`) both pack with it.
pub(super) fn pack(
    init: &str,
    abi: &str,
    modules: &[(String, Vec<u8>)],
    net_modules: &[(String, Vec<u8>)],
    libraries: &[(String, Vec<u8>)],
    baodefect: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let mut c = Cpio::default();
    let mut dirs = BTreeSet::new();
    for d in SKELETON_DIRS {
        dirs.insert(d.to_owned());
    }
    dirs.insert(format!("lib/modules/{abi}"));
    for (guest, _) in libraries {
        dirs.extend(parents(guest));
    }
    for d in &dirs {
        c.dir(d)?;
    }
    c.chardev("dev/console", 0o600, 5, 1)?;
    c.chardev("dev/null", 0o666, 1, 3)?;
    c.file("init", 0o755, init.as_bytes())?;
    c.file("bin/busybox", 0o755, &std::fs::read("/bin/busybox")?)?;
    c.file("usr/bin/baodefect", 0o755, baodefect)?;
    let mut list = String::new();
    for (stem, bytes) in modules {
        c.file(&format!("lib/modules/{abi}/{stem}.ko"), 0o644, bytes)?;
        list.push_str(stem);
        list.push('\n');
    }
    c.file("etc/remio/modules", 0o644, list.as_bytes())?;
    let mut net_list = String::new();
    for (stem, bytes) in net_modules {
        c.file(&format!("lib/modules/{abi}/{stem}.ko"), 0o644, bytes)?;
        net_list.push_str(stem);
        net_list.push('\n');
    }
    c.file("etc/remio/modules-net", 0o644, net_list.as_bytes())?;
    c.file("etc/remio/abi", 0o644, format!("{abi}\n").as_bytes())?;
    for (guest, bytes) in libraries {
        c.file(guest, 0o755, bytes)?;
    }
    c.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?;
    c.file("etc/group", 0o644, b"root:x:0:\n")?;
    c.finish()
}

/// Every ancestor directory of a relative guest path, outermost first ("a/b/c" -> a, a/b).
fn parents(guest: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut prefix = String::new();
    let parts: Vec<&str> = guest.split('/').collect();
    for part in parts.iter().take(parts.len().saturating_sub(1)) {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(part);
        out.push(prefix.clone());
    }
    out
}

/// A guest path as a cpio member name: relative, no empty, `.` or `..` component.
fn member_name(path: &str) -> anyhow::Result<String> {
    let rel = path.trim_start_matches('/');
    ensure!(
        !rel.is_empty()
            && rel
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".."),
        "bad guest path {path:?}"
    );
    Ok(rel.to_owned())
}

/// `exe` with its debug information stripped (`strip --strip-debug`, binutils), to keep the
/// archive and the guest's RAM small; the file as it is when `strip` is missing or fails.
fn read_stripped(exe: &Path) -> anyhow::Result<Vec<u8>> {
    let Some(strip) = super::find_tool("strip") else {
        log::warn!(
            "`strip` not found (binutils): packing {} with its debug info",
            exe.display()
        );
        return std::fs::read(exe).with_context(|| format!("reading {}", exe.display()));
    };
    let dir = TempFiles::new()?;
    let tmp = dir.path("remio.stripped");
    let status = Command::new(strip)
        .arg("--strip-debug")
        .arg("-o")
        .arg(&tmp)
        .arg(exe)
        .status();
    let bytes = match status {
        Ok(s) if s.success() => std::fs::read(&tmp),
        _ => {
            log::warn!(
                "strip --strip-debug {} failed: packing it as it is",
                exe.display()
            );
            std::fs::read(exe)
        }
    };
    bytes.with_context(|| format!("reading {}", exe.display()))
}

/// The run-time part of the backend VM's initramfs, to append to the cached
/// `backend-initramfs.cpio` (`cat base overlay`; the kernel unpacks both, later members
/// replacing earlier ones): `/usr/bin/remio` (`remio_exe`, debug info stripped),
/// `/etc/remio/dm.toml` (`dm_config`, the `remio dm --config` of the backend's devices), and
/// `extra_files` as (guest path, contents, permission bits), e.g. `/etc/remio/backend.sh`
/// ([`GUEST_HOOK`]) or a disk image. Directories are created as needed. The result is a
/// complete newc archive whose length is a multiple of 4.
pub fn backend_overlay(
    remio_exe: &Path,
    dm_config: &str,
    extra_files: &[(String, Vec<u8>, u32)],
) -> anyhow::Result<Vec<u8>> {
    let remio = read_stripped(remio_exe)?;
    overlay_archive(&remio, dm_config, extra_files)
}

fn overlay_archive(
    remio: &[u8],
    dm_config: &str,
    extra_files: &[(String, Vec<u8>, u32)],
) -> anyhow::Result<Vec<u8>> {
    let mut files: Vec<(&str, &[u8], u32)> = vec![
        (GUEST_REMIO, remio, 0o755),
        (GUEST_DM_CONFIG, dm_config.as_bytes(), 0o644),
    ];
    files.extend(
        extra_files
            .iter()
            .map(|(path, bytes, mode)| (path.as_str(), bytes.as_slice(), *mode)),
    );
    files_archive(&files)
}

/// A complete newc archive (length a multiple of 4) of `files` as (guest path, contents,
/// permission bits), their parent directories created first: an overlay to append to an
/// initramfs (later members replace earlier ones). Fails on a path with an empty, `.` or `..`
/// component and on a mode with more than permission bits.
pub fn files_archive(files: &[(&str, &[u8], u32)]) -> anyhow::Result<Vec<u8>> {
    let mut members = Vec::with_capacity(files.len());
    for (path, bytes, mode) in files {
        ensure!(
            mode & !0o7777 == 0,
            "{path}: mode {mode:#o} is more than permission bits"
        );
        members.push((member_name(path)?, *bytes, *mode));
    }
    let mut dirs = BTreeSet::new();
    for (name, _, _) in &members {
        dirs.extend(parents(name));
    }
    let mut c = Cpio::default();
    for d in &dirs {
        c.dir(d)?;
    }
    for (name, bytes, mode) in &members {
        c.file(name, *mode, bytes)?;
    }
    c.finish()
}

/// The backend VM's boot files, from a current build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendArtifacts {
    /// The kernel (the frontend's `vmlinuz`).
    pub kernel: PathBuf,
    /// `backend-initramfs.cpio`: append [`backend_overlay`]'s archive to it.
    pub initramfs: PathBuf,
    /// Module stems in the order `/init` loads them (each gets a `REMIO-BACKEND-STEP` line).
    pub modules: Vec<String>,
    /// sha256 of the patch the driver was built from.
    pub patch_sha256: String,
}

/// The backend artifacts in `dir`, or why there are none (no build, backend skipped, files
/// modified since the build). Checks the files' hashes against the manifest.
pub fn backend_status(dir: &Path) -> Result<BackendArtifacts, String> {
    let manifest = read_manifest(dir).ok_or_else(|| {
        format!(
            "no guest build in {} (run `remio guest build`)",
            dir.display()
        )
    })?;
    let record = manifest.backend.ok_or_else(|| {
        format!(
            "the guest build in {} predates the backend VM (run `remio guest build`)",
            dir.display()
        )
    })?;
    match record.state {
        BackendState::Skipped { reason } => Err(format!("the backend VM was not built: {reason}")),
        BackendState::Built {
            outputs, modules, ..
        } => {
            let kernel_ok =
                artifacts_intact(dir, manifest.outputs.iter().filter(|a| a.file == KERNEL));
            if !kernel_ok || !artifacts_intact(dir, &outputs) {
                return Err(format!(
                    "the guest in {} was modified since it was built (run `remio guest build`)",
                    dir.display()
                ));
            }
            Ok(BackendArtifacts {
                kernel: dir.join(KERNEL),
                initramfs: dir.join(BACKEND_INITRAMFS),
                modules,
                patch_sha256: record.inputs.patch_sha256.unwrap_or_default(),
            })
        }
    }
}

/// [`backend_status`] as an option; the reason there is none is logged (warn).
pub fn backend_artifacts(dir: &Path) -> Option<BackendArtifacts> {
    backend_status(dir)
        .map_err(|why| log::warn!("backend VM unavailable: {why}"))
        .ok()
}

/// The backend's line of `remio guest info`.
pub(super) fn describe(dir: &Path) -> String {
    match backend_status(dir) {
        Ok(a) => format!(
            "backend:   {} (modules: {})",
            a.initramfs.display(),
            a.modules.join(" ")
        ),
        Err(why) => format!("backend:   unavailable: {why}"),
    }
}

/// The `REMIO-BACKEND-*` markers of one console line (kernel messages may precede them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    /// `REMIO-BACKEND-STEP <name> ok`.
    Step(String),
    /// `REMIO-BACKEND-FAILED <name>`.
    Failed(String),
    /// `REMIO-BACKEND-DM-START`.
    DmStart,
    /// `REMIO-BACKEND-DM-EXIT <status>`.
    DmExit(i32),
}

/// Parses the backend `/init`'s marker in `line`, if any.
pub fn marker(line: &str) -> Option<Marker> {
    let rest = &line[line.find("REMIO-BACKEND-")? + "REMIO-BACKEND-".len()..];
    let mut words = rest.split_whitespace();
    match words.next()? {
        "STEP" => {
            let name = words.next()?;
            (words.next() == Some("ok")).then(|| Marker::Step(name.to_owned()))
        }
        "FAILED" => words.next().map(|n| Marker::Failed(n.to_owned())),
        "DM-START" => Some(Marker::DmStart),
        "DM-EXIT" => words.next()?.parse().ok().map(Marker::DmExit),
        _ => None,
    }
}

/// How much RAM `remio guest boot --backend` gives the backend VM (the initramfs holds a
/// `remio` binary).
const BOOT_RAM_MIB: u64 = 512;
/// Size of the stand-in for the frontend's RAM behind the ivshmem-plain (a power of two).
const BOOT_SHMEM_MIB: u64 = 16;
/// Doorbell vectors of the smoke boot.
const BOOT_VECTORS: usize = 2;

/// `remio guest boot --backend`: boots the backend VM alone under QEMU TCG with an
/// ivshmem-plain and an ivshmem-doorbell but no hypercall proxy, prints its console, and
/// succeeds only if `remio dm` ran and exited 0 (never without a proxy: its /init then stops at
/// `REMIO-BACKEND-FAILED /dev/bao-io-dispatcher`, which this reports as the error).
pub(super) fn boot(
    dir: &Path,
    dm_config: Option<&Path>,
    hook: Option<&Path>,
    timeout: u64,
) -> anyhow::Result<()> {
    use std::io::{BufRead as _, Write as _};

    let artifacts = backend_artifacts(dir)
        .ok_or_else(|| anyhow!("no usable backend VM in {} (see above)", dir.display()))?;
    let qemu = super::find_tool("qemu-system-x86_64").ok_or_else(|| {
        anyhow!("`qemu-system-x86_64` not found: install the Debian package `qemu-system-x86`")
    })?;
    let config = match dm_config {
        None => String::new(),
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
    };
    let exe = std::env::current_exe().context("locating the remio binary")?;
    let mut initrd_bytes = std::fs::read(&artifacts.initramfs)
        .with_context(|| format!("reading {}", artifacts.initramfs.display()))?;
    let mut extra = Vec::new();
    if let Some(h) = hook {
        let script = std::fs::read(h).with_context(|| format!("reading {}", h.display()))?;
        extra.push((format!("/{GUEST_HOOK}"), script, 0o644));
    }
    initrd_bytes.extend(backend_overlay(&exe, &config, &extra)?);
    let tmp = TempFiles::new()?;
    let initrd = tmp.path("initrd.cpio");
    std::fs::write(&initrd, &initrd_bytes)?;
    let sock = tmp.path("doorbell.sock");
    let _doorbell = remio_frontend::qemu::ivshmem::IvshmemServer::start(&sock, BOOT_VECTORS)
        .context("starting the ivshmem server")?;

    let mut cmd = Command::new(qemu);
    cmd.args(remio_frontend::qemu::launch::guest_args(
        "q35",
        BOOT_RAM_MIB,
        &artifacts.kernel,
        &initrd,
        "",
    ));
    cmd.arg("-object")
        .arg(format!(
            "memory-backend-memfd,id=remio-fe,size={BOOT_SHMEM_MIB}M,share=on"
        ))
        .args(["-device", "ivshmem-plain,memdev=remio-fe"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=remio-biv,path={}",
            sock.display().to_string().replace(',', ",,")
        ))
        .arg("-device")
        .arg(format!(
            "ivshmem-doorbell,chardev=remio-biv,vectors={BOOT_VECTORS}"
        ));
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting QEMU")?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no QEMU stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + std::time::Duration::from_secs(timeout);
    let mut out = std::io::stdout().lock();
    let mut last = None;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                let _ = writeln!(out, "{line}");
                if let Some(m @ (Marker::Failed(_) | Marker::DmExit(_))) = marker(&line) {
                    last = Some(m);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the backend VM did not power off within {timeout} s");
            }
        }
    }
    let qemu_status = child.wait()?;
    match last {
        Some(Marker::DmExit(0)) => Ok(()),
        Some(Marker::DmExit(s)) => bail!("remio dm in the backend VM exited with status {s}"),
        Some(Marker::Failed(step)) => bail!("the backend VM's /init failed at step {step}"),
        _ => bail!("QEMU ({qemu_status}) ended without a REMIO-BACKEND-DM-EXIT or -FAILED line"),
    }
}

/// A private temporary directory, removed on drop.
struct TempFiles(PathBuf);

impl TempFiles {
    fn new() -> anyhow::Result<Self> {
        let base = std::env::temp_dir();
        for n in 0..100u32 {
            let d = base.join(format!("remio-backend-boot-{}-{n}", std::process::id()));
            match std::fs::create_dir(&d) {
                Ok(()) => return Ok(Self(d)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e).with_context(|| format!("creating {}", d.display())),
            }
        }
        bail!("cannot create a temporary directory in {}", base.display())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The members of a newc archive: (name, mode, data).
    fn members(mut buf: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let field = |h: &[u8], i: usize| {
            let s = std::str::from_utf8(&h[6 + i * 8..14 + i * 8]).expect("hex");
            u32::from_str_radix(s, 16).expect("hex")
        };
        let pad = |n: usize| n.div_ceil(4) * 4;
        let mut out = Vec::new();
        loop {
            assert_eq!(&buf[..6], b"070701", "newc magic");
            let mode = field(buf, 1);
            let size = usize::try_from(field(buf, 6)).expect("usize");
            let namesize = usize::try_from(field(buf, 11)).expect("usize");
            let name = String::from_utf8(buf[110..110 + namesize - 1].to_vec()).expect("name");
            let data_at = pad(110 + namesize);
            let data = buf[data_at..data_at + size].to_vec();
            buf = &buf[pad(data_at + size)..];
            if name == "TRAILER!!!" {
                assert!(buf.is_empty(), "nothing after the trailer");
                return out;
            }
            out.push((name, mode, data));
        }
    }

    #[test]
    fn overlay_holds_remio_the_config_and_the_extra_files_with_their_directories() {
        let extra = vec![
            (
                "/etc/remio/backend.sh".to_owned(),
                b"echo hi\n".to_vec(),
                0o644,
            ),
            ("/srv/disks/d0.img".to_owned(), vec![7u8; 5], 0o600),
        ];

        let buf = overlay_archive(b"\x7fELF", "[[device]]\n", &extra).expect("packs");

        assert_eq!(buf.len() % 4, 0);
        let m = members(&buf);
        let names: Vec<&str> = m.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "etc",
                "etc/remio",
                "srv",
                "srv/disks",
                "usr",
                "usr/bin",
                "usr/bin/remio",
                "etc/remio/dm.toml",
                "etc/remio/backend.sh",
                "srv/disks/d0.img"
            ]
        );
        assert_eq!(
            m[6],
            ("usr/bin/remio".into(), 0o100755, b"\x7fELF".to_vec())
        );
        assert_eq!(m[7].2, b"[[device]]\n");
        assert_eq!(m[9], ("srv/disks/d0.img".into(), 0o100600, vec![7u8; 5]));
        assert_eq!(m[0].1, 0o040755);
    }

    #[test]
    fn overlay_refuses_paths_that_leave_the_root_and_modes_beyond_permissions() {
        for bad in ["", "/", "/etc/../x", "a//b", "./x"] {
            let extra = vec![(bad.to_owned(), Vec::new(), 0o644)];
            assert!(
                overlay_archive(b"", "", &extra).is_err(),
                "{bad:?} accepted"
            );
        }
        let extra = vec![("/x".to_owned(), Vec::new(), 0o100644)];
        assert!(overlay_archive(b"", "", &extra).is_err());
    }

    #[test]
    fn overlay_appended_to_a_base_archive_starts_on_a_header_boundary() {
        let mut base = Cpio::default();
        base.file("init", 0o755, b"x").expect("file");
        let mut both = base.finish().expect("base");
        let base_len = both.len();

        both.extend(overlay_archive(b"ab", "c", &[]).expect("overlay"));

        assert_eq!(base_len % 4, 0);
        assert_eq!(&both[base_len..base_len + 6], b"070701");
    }

    #[test]
    fn ldd_output_gives_libraries_and_the_loader_but_not_the_vdso() {
        let text = "\
\tlinux-vdso.so.1 (0x00007ffd)
\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007fc1)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fc2)
\t/lib64/ld-linux-x86-64.so.2 (0x00007fc3)
";
        assert_eq!(
            parse_ldd(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn markers_are_found_after_interleaved_kernel_output() {
        assert_eq!(
            marker("[    4.1] foo REMIO-BACKEND-STEP bao-io-dispatcher ok"),
            Some(Marker::Step("bao-io-dispatcher".into()))
        );
        assert_eq!(
            marker("REMIO-BACKEND-FAILED /dev/bao-io-dispatcher"),
            Some(Marker::Failed("/dev/bao-io-dispatcher".into()))
        );
        assert_eq!(marker("REMIO-BACKEND-DM-START"), Some(Marker::DmStart));
        assert_eq!(marker("REMIO-BACKEND-DM-EXIT 3"), Some(Marker::DmExit(3)));
        assert_eq!(marker("REMIO-BACKEND-STEP virtio"), None);
        assert_eq!(marker("REMIO-BACKEND-DM-EXIT x"), None);
        assert_eq!(marker("REMIO-EXIT 0"), None);
    }

    #[test]
    fn parents_lists_each_ancestor_outermost_first() {
        assert_eq!(
            parents("lib/x86_64-linux-gnu/libc.so.6"),
            ["lib", "lib/x86_64-linux-gnu"]
        );
        assert!(parents("init").is_empty());
    }

    #[test]
    fn patch_path_prefers_the_flag() {
        let flag = Path::new("/x/p.txt");
        assert_eq!(patch_path(Some(flag)), flag);
        assert!(default_patch_path().ends_with("shared/spec/bao-io-dispatcher-patch.txt"));
    }

    #[test]
    fn driver_kbuild_lists_every_c_file_as_an_object() {
        let sources = DriverSources {
            files: vec![
                ("a.c".into(), String::new()),
                ("b.h".into(), String::new()),
                ("c.c".into(), String::new()),
            ],
            uapi_header: String::new(),
        };
        let kbuild = driver_kbuild(&sources);
        assert!(kbuild.starts_with(DRIVER_KBUILD));
        assert!(
            kbuild.ends_with("bao-io-dispatcher-objs := a.o c.o\n"),
            "{kbuild}"
        );
    }

    /// `#define NAME value` of remio-hc.h as a number.
    fn header_value(name: &str) -> u64 {
        let line = HC_H
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name) && l.starts_with("#define"))
            .unwrap_or_else(|| panic!("{name} not in remio-hc.h"));
        let v = line.split_whitespace().nth(2).expect("a value");
        let v = v.trim_end_matches("ULL");
        match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).expect("hex"),
            None => v.parse().expect("decimal"),
        }
    }

    #[test]
    fn remio_hc_h_matches_the_platform_side_abi() {
        use remio_abi::hcwindow::{self as w, BankField as F};
        let pairs = [
            ("REMIO_HC_VENDOR_ID", u64::from(w::PCI_VENDOR_ID)),
            ("REMIO_HC_DEVICE_ID", u64::from(w::PCI_DEVICE_ID)),
            ("REMIO_HC_BAR_SIZE", w::BAR0_SIZE),
            ("REMIO_HC_MAGIC", w::REG_MAGIC),
            ("REMIO_HC_VERSION", w::REG_VERSION),
            ("REMIO_HC_DM_COUNT", w::REG_DM_COUNT),
            ("REMIO_HC_BANK_COUNT", w::REG_BANK_COUNT),
            ("REMIO_HC_MAGIC_VALUE", w::MAGIC),
            ("REMIO_HC_VERSION_VALUE", w::VERSION),
            ("REMIO_HC_BANK_BASE", w::BANK_BASE),
            ("REMIO_HC_BANK_STRIDE", w::BANK_STRIDE),
            ("REMIO_HC_MAX_BANKS", w::BANK_COUNT),
            ("REMIO_HC_B_DM_ID", F::DmId as u64),
            ("REMIO_HC_B_ADDR", F::Addr as u64),
            ("REMIO_HC_B_OP", F::Op as u64),
            ("REMIO_HC_B_VALUE", F::Value as u64),
            ("REMIO_HC_B_REQUEST_ID", F::RequestId as u64),
            ("REMIO_HC_B_ACCESS_WIDTH", F::AccessWidth as u64),
            ("REMIO_HC_B_HAS_PENDING", F::HasPending as u64),
            ("REMIO_HC_B_CALL", F::Call as u64),
        ];
        for (name, value) in pairs {
            assert_eq!(header_value(name), value, "{name}");
        }
        assert_eq!(w::bank_offset(3, F::Call), Some(0x100 + 3 * 0x40 + 0x38));
    }
}
