//! `remio guest`: builds the guest (Debian's cloud kernel, the glue module and a busybox
//! initramfs) from Debian packages, caches it under `target/guest/` keyed by a manifest, and can
//! boot it alone under QEMU TCG.
//!
//! `remio guest build` resolves `linux-image-cloud-amd64` to its ABI, downloads the kernel and
//! header packages with `apt-get download`, extracts them with `dpkg -x` (nothing is installed),
//! builds `guest/glue` against the extracted headers, and packs an uncompressed newc initramfs
//! with busybox, the virtio modules in dependency order, the glue module, the tools of
//! `guest/tools` (iobench, vsock, ...) and `guest/init`. The guest's command-line contract
//! (`remio.exec=`, `REMIO-EXIT`) is described in `guest/README.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub mod backend;
mod patch;
mod rust_kmod;

pub use backend::{backend_overlay, backend_status, files_archive};

/// Bumped whenever the build recipe changes in a way the hashed sources below do not show.
const FORMAT: u32 = 1;

/// The metapackage whose current dependency names the kernel ABI.
const META_PACKAGE: &str = "linux-image-cloud-amd64";

/// The modules the initramfs loads (their dependencies are added from `modules.dep`).
const WANTED_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "virtio-rng",
    "virtiofs",
    "vmw_vsock_virtio_transport",
];

/// Guest sources, embedded so that the binary alone can build the guest and so that any change
/// to them rebuilds `remio` and changes the recipe hash.
const GLUE_C: &str = include_str!("../../../../guest/glue/remio_glue.c");
const GLUE_KBUILD: &str = include_str!("../../../../guest/glue/Kbuild");
const IDS_H: &str = include_str!("../../../../guest/remio-ids.h");
const INIT: &str = include_str!("../../../../guest/init");
const IOBENCH_C: &str = include_str!("../../../../guest/tools/iobench.c");
const VSOCK_C: &str = include_str!("../../../../guest/tools/vsock.c");
const BLKVERIFY_C: &str = include_str!("../../../../guest/tools/blkverify.c");
/// The static tools of guest/tools, installed as /usr/bin/<name>.
const GUEST_TOOLS: &[(&str, &str)] = &[
    ("iobench", IOBENCH_C),
    ("vsock", VSOCK_C),
    ("blkverify", BLKVERIFY_C),
];

/// File names inside the guest directory.
const MANIFEST: &str = "manifest.json";
const KERNEL: &str = "vmlinuz";
const INITRAMFS: &str = "initramfs.cpio";
const GLUE_KO: &str = "remio_glue.ko";

/// Arguments of `remio guest`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: GuestCommand,
}

#[derive(Debug, clap::Subcommand)]
enum GuestCommand {
    /// Build the guest kernel and initramfs (does nothing when the cached build is current).
    Build(BuildArgs),
    /// Print the manifest of the cached build and the paths of its artifacts.
    Info(DirArgs),
    /// Boot the guest alone under QEMU TCG (no remio devices): a smoke test of the artifacts.
    Boot(BootArgs),
}

#[derive(Debug, clap::Args)]
struct DirArgs {
    /// Where the guest is cached [default: $REMIO_GUEST_DIR, else <workspace>/target/guest].
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct BuildArgs {
    /// Rebuild even when the manifest says the cached build is current.
    #[arg(long)]
    force: bool,
    /// The posted Bao I/O dispatcher patch the backend VM's driver is extracted from
    /// [default: $REMIO_C_DRIVER_PATCH, else ../shared/spec/bao-io-dispatcher-patch.txt beside
    /// the workspace]. Without it the backend VM is skipped (the frontend is built anyway).
    #[arg(long, value_name = "PATH")]
    c_driver_patch: Option<PathBuf>,
    /// Build only the Rust kernel module toolchain, kmod/ and its test VM (a trixie chroot,
    /// the trixie-backports 7.3 kernel, rust/ rebuilt; docs/kmod.md), cached in
    /// $REMIO_RUST_KMOD_DIR, else <workspace>/target/rust-kmod. Needs root.
    #[arg(long, conflicts_with_all = ["c_driver_patch", "dir"])]
    rust_kmod: bool,
    #[command(flatten)]
    dir: DirArgs,
}

#[derive(Debug, clap::Args)]
struct BootArgs {
    /// Shell command for the guest to run (passed as `remio.exec=<base64>`); without it the guest
    /// starts an interactive shell on the console.
    #[arg(long)]
    exec: Option<String>,
    /// Kill QEMU after this many seconds (only with --exec or --backend).
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Boot the backend VM instead (backend-initramfs.cpio plus this remio binary), alone: an
    /// ivshmem-doorbell and an ivshmem-plain but no hypercall proxy, so its /init stops after
    /// loading the driver (`REMIO-BACKEND-FAILED /dev/bao-io-dispatcher`). A smoke test.
    #[arg(long, conflicts_with = "exec")]
    backend: bool,
    /// Boot the 7.3 kernel with the Rust module's test initramfs (`remio guest build
    /// --rust-kmod`): loads kmod/, calls its ioctl, fails unless it prints REMIO-KMOD-RESULT PASS.
    #[arg(long, conflicts_with_all = ["exec", "backend"])]
    rust_kmod: bool,
    /// With --backend: the device-model config packed as /etc/remio/dm.toml.
    #[arg(long, value_name = "FILE", requires = "backend")]
    dm_config: Option<PathBuf>,
    /// With --backend: a shell script packed as /etc/remio/backend.sh (sourced by /init before
    /// `remio dm` starts).
    #[arg(long, value_name = "FILE", requires = "backend")]
    hook: Option<PathBuf>,
    #[command(flatten)]
    dir: DirArgs,
}

/// Runs `remio guest`.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        GuestCommand::Build(b) if b.rust_kmod => {
            rust_kmod::build(&rust_kmod::default_dir(), b.force)
        }
        GuestCommand::Boot(b) if b.rust_kmod => {
            rust_kmod::boot(&rust_kmod::default_dir(), b.timeout)
        }
        GuestCommand::Build(b) => {
            let dir = guest_dir(&b.dir);
            build(&dir, b.force, b.c_driver_patch.as_deref())
        }
        GuestCommand::Info(d) => info(&guest_dir(&d)),
        GuestCommand::Boot(b) if b.backend => backend::boot(
            &guest_dir(&b.dir),
            b.dm_config.as_deref(),
            b.hook.as_deref(),
            b.timeout,
        ),
        GuestCommand::Boot(b) => boot(&guest_dir(&b.dir), b.exec.as_deref(), b.timeout),
    }
}

fn guest_dir(args: &DirArgs) -> PathBuf {
    args.dir.clone().unwrap_or_else(default_dir)
}

/// Where the guest is cached unless a command says otherwise: `$REMIO_GUEST_DIR`, else
/// `<workspace>/target/guest`.
pub fn default_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("REMIO_GUEST_DIR") {
        return PathBuf::from(dir);
    }
    // crates/remio -> the workspace root.
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or(manifest_dir)
        .join("target/guest")
}

/// A Debian package pinned by version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pkg {
    name: String,
    version: String,
}

/// Everything the build depends on; equal inputs and intact outputs mean nothing to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Inputs {
    format: u32,
    abi: String,
    /// Kernel, headers, common headers, kbuild.
    packages: Vec<Pkg>,
    /// busybox-static and gcc-12 as installed on the build machine.
    host_packages: Vec<Pkg>,
    busybox_sha256: String,
    /// sha256 over the glue source, Kbuild, remio-ids.h, /init, the guest tools and the module list.
    recipe_sha256: String,
    glue_source_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Artifact {
    name: String,
    file: String,
    bytes: u64,
    sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    inputs: Inputs,
    /// The downloaded .deb files.
    debs: Vec<Artifact>,
    /// vmlinuz, initramfs.cpio, remio_glue.ko.
    outputs: Vec<Artifact>,
    /// Module file stems in the order /init loads them.
    modules: Vec<String>,
    build_seconds: f64,
    /// [`apt_lists_fingerprint`] when the packages were resolved.
    #[serde(default)]
    apt_lists: String,
    /// The backend VM (`remio run --dispatcher c-driver`): built, or skipped and why. None in a
    /// manifest written before the backend existed, or while it is being built.
    #[serde(default)]
    backend: Option<backend::BackendRecord>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in digest {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(sha256_hex(&bytes))
}

fn artifact(name: &str, path: &Path) -> anyhow::Result<Artifact> {
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

/// Tools the build runs, with the Debian package that provides each.
const TOOLS: &[(&str, &str)] = &[
    ("apt-get", "apt"),
    ("apt-cache", "apt"),
    ("dpkg-query", "dpkg"),
    ("dpkg", "dpkg"),
    ("depmod", "kmod"),
    ("modinfo", "kmod"),
    ("make", "make"),
    ("gcc-12", "gcc-12"),
    ("gcc", "gcc"),
    ("xz", "xz-utils"),
];

/// Finds `tool` on PATH or in the sbin directories (depmod lives in /sbin).
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn tool(name: &str) -> anyhow::Result<PathBuf> {
    find_tool(name).ok_or_else(|| {
        let pkg = TOOLS
            .iter()
            .find(|(t, _)| *t == name)
            .map_or("?", |(_, p)| p);
        anyhow!("`{name}` not found: install the Debian package `{pkg}` (scripts/setup does)")
    })
}

/// Runs a command, returning its stdout; on failure the error carries its stderr.
fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command with its output shown (long steps show their own progress).
fn run_shown(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed ({status})");
    Ok(())
}

/// `apt-cache show --no-all-versions PKG`: the candidate's (Version, Depends).
fn apt_candidate(name: &str) -> anyhow::Result<(String, String)> {
    let text = output(
        Command::new(tool("apt-cache")?)
            .args(["show", "--no-all-versions"])
            .arg(name),
    )
    .with_context(|| format!("no candidate for {name}: run `apt-get update`?"))?;
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_owned())
    };
    let version = field("Version:").ok_or_else(|| anyhow!("{name}: no Version field"))?;
    Ok((version, field("Depends:").unwrap_or_default()))
}

/// Package names in a Depends field (alternatives and version constraints dropped).
fn depends_names(depends: &str) -> Vec<String> {
    depends
        .split(',')
        .filter_map(|d| d.split('|').next())
        .filter_map(|d| d.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn installed_version(name: &str) -> anyhow::Result<String> {
    output(
        Command::new(tool("dpkg-query")?)
            .args(["-W", "-f", "${Version}"])
            .arg(name),
    )
    .with_context(|| format!("package {name} is not installed (scripts/setup installs it)"))
}

/// Resolves the current ABI and the exact packages to download.
fn resolve_packages() -> anyhow::Result<(String, Vec<Pkg>)> {
    let (_, meta_deps) = apt_candidate(META_PACKAGE)?;
    let image = depends_names(&meta_deps)
        .into_iter()
        .find(|d| d.starts_with("linux-image-"))
        .ok_or_else(|| anyhow!("{META_PACKAGE} depends on no linux-image-*: {meta_deps}"))?;
    let abi = image
        .strip_prefix("linux-image-")
        .unwrap_or_default()
        .to_owned();
    let headers = format!("linux-headers-{abi}");
    let (image_version, _) = apt_candidate(&image)?;
    let (headers_version, headers_deps) = apt_candidate(&headers)?;
    let mut pkgs = vec![
        Pkg {
            name: image,
            version: image_version,
        },
        Pkg {
            name: headers,
            version: headers_version,
        },
    ];
    for dep in depends_names(&headers_deps) {
        // The common headers and kbuild are needed; linux-compiler-gcc-* is only a dependency on
        // the compiler, which must be installed (gcc-12).
        if dep.starts_with("linux-headers-") || dep.starts_with("linux-kbuild-") {
            let (version, _) = apt_candidate(&dep)?;
            pkgs.push(Pkg { name: dep, version });
        }
    }
    Ok((abi, pkgs))
}

/// Names, sizes and mtimes of apt's package lists: changes whenever `apt-get update` fetched
/// something new. Empty when they cannot be read (then packages are always resolved afresh).
fn apt_lists_fingerprint() -> String {
    let Ok(entries) = std::fs::read_dir("/var/lib/apt/lists") else {
        return String::new();
    };
    let mut lists: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let meta = e.metadata().ok()?;
            (name.contains("_Packages") || name.ends_with("Release"))
                .then(|| format!("{name} {} {}", meta.len(), meta.mtime()))
        })
        .collect();
    lists.sort();
    if lists.is_empty() {
        return String::new();
    }
    sha256_hex(lists.join("\n").as_bytes())
}

fn recipe_hash() -> String {
    let mut h = Sha256::new();
    for part in [
        GLUE_C,
        GLUE_KBUILD,
        IDS_H,
        INIT,
        IOBENCH_C,
        VSOCK_C,
        BLKVERIFY_C,
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(WANTED_MODULES.join(",").as_bytes());
    sha256_hex(&h.finalize())
}

fn glue_source_hash() -> String {
    sha256_hex(format!("{GLUE_C}\0{GLUE_KBUILD}\0{IDS_H}").as_bytes())
}

/// Writes through a temporary file and a rename, so a QEMU started meanwhile (other tests use
/// these files) sees either the old or the new file, never half of one.
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", path.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

fn write_manifest(dir: &Path, manifest: &Manifest) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(manifest)?;
    write_atomic(&dir.join(MANIFEST), format!("{json}\n").as_bytes())
}

fn read_manifest(dir: &Path) -> Option<Manifest> {
    let text = std::fs::read_to_string(dir.join(MANIFEST)).ok()?;
    serde_json::from_str(&text).ok()
}

/// True when every (frontend) output in the manifest exists with its recorded hash.
fn outputs_intact(dir: &Path, manifest: &Manifest) -> bool {
    artifacts_intact(dir, &manifest.outputs)
}

/// True when each artifact exists in `dir` with its recorded hash.
fn artifacts_intact<'a>(dir: &Path, artifacts: impl IntoIterator<Item = &'a Artifact>) -> bool {
    artifacts.into_iter().all(|a| {
        sha256_file(&dir.join(&a.file))
            .map(|h| h == a.sha256)
            .unwrap_or(false)
    })
}

fn step(what: &str) {
    log::info!("guest: {what}");
}

fn build(dir: &Path, force: bool, patch_flag: Option<&Path>) -> anyhow::Result<()> {
    let started = Instant::now();
    for (t, _) in TOOLS {
        tool(t)?;
    }
    ensure!(
        Path::new("/bin/busybox").is_file(),
        "/bin/busybox not found: install the Debian package `busybox-static` (scripts/setup does)"
    );
    // Resolving with apt-cache costs about a second per call: reuse the cached resolution while
    // the apt package lists are unchanged.
    let lists = apt_lists_fingerprint();
    let cached = read_manifest(dir);
    let (abi, packages) = match &cached {
        Some(m) if !force && !lists.is_empty() && m.apt_lists == lists => {
            (m.inputs.abi.clone(), m.inputs.packages.clone())
        }
        _ => resolve_packages()?,
    };
    let inputs = Inputs {
        format: FORMAT,
        abi: abi.clone(),
        packages,
        host_packages: vec![
            Pkg {
                name: "busybox-static".into(),
                version: installed_version("busybox-static")?,
            },
            Pkg {
                name: "gcc-12".into(),
                version: installed_version("gcc-12")?,
            },
        ],
        busybox_sha256: sha256_file(Path::new("/bin/busybox"))?,
        recipe_sha256: recipe_hash(),
        glue_source_sha256: glue_source_hash(),
    };
    let patch = backend::patch_path(patch_flag);
    let frontend_current = !force
        && cached
            .as_ref()
            .is_some_and(|m| m.inputs == inputs && outputs_intact(dir, m));
    let mut manifest = match cached {
        Some(m) if frontend_current => {
            println!(
                "guest: up to date ({abi}, {}), nothing to do",
                dir.join(MANIFEST).display()
            );
            Manifest {
                apt_lists: lists,
                ..m
            }
        }
        cached => {
            if cached.is_some() && !force {
                step("inputs changed since the cached build: rebuilding");
            }
            build_frontend(dir, inputs, lists, started)?
        }
    };
    // The backend VM: its own inputs (patch, guest/backend sources, host libraries), same
    // kernel. Built after the frontend's manifest is written, so that a failing backend build
    // does not make the frontend look stale. A frontend rebuild (maybe a new kernel) rebuilds it.
    let previous = manifest.backend.take();
    write_manifest(dir, &manifest)?;
    let record = backend::build(
        dir,
        &|| ensure_root(dir, &manifest.inputs),
        &abi,
        previous.as_ref().filter(|_| frontend_current),
        force,
        &patch,
    )?;
    manifest.backend = Some(record);
    write_manifest(dir, &manifest)
}

/// Builds the frontend guest (kernel, glue, initramfs) and writes its manifest (no backend).
fn build_frontend(
    dir: &Path,
    inputs: Inputs,
    lists: String,
    started: Instant,
) -> anyhow::Result<Manifest> {
    let abi = inputs.abi.clone();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // A half-done build must not look current.
    let _ = std::fs::remove_file(dir.join(MANIFEST));

    let (root, debs) = extract_root(dir, &inputs)?;
    let kernel_src = root.join(format!("boot/vmlinuz-{abi}"));
    let kernel =
        std::fs::read(&kernel_src).with_context(|| format!("reading {}", kernel_src.display()))?;
    write_atomic(&dir.join(KERNEL), &kernel)?;

    let glue_ko = build_glue(dir, &root, &abi)?;
    let tools = GUEST_TOOLS
        .iter()
        .map(|(name, src)| Ok((*name, build_tool(dir, name, src)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let modules_dir = root.join("lib/modules").join(&abi);
    let order = module_order(&modules_dir, WANTED_MODULES)?;
    step(&format!(
        "packing the initramfs ({} modules + glue)",
        order.len()
    ));
    let cpio = pack_initramfs(&abi, &modules_dir, &order, &glue_ko, &tools)?;
    write_atomic(&dir.join(INITRAMFS), &cpio)?;

    let mut modules: Vec<String> = order.iter().map(|(n, _)| n.clone()).collect();
    modules.push("remio_glue".into());
    let manifest = Manifest {
        debs: debs
            .iter()
            .zip(&inputs.packages)
            .map(|(d, p)| artifact(&p.name, d))
            .collect::<anyhow::Result<_>>()?,
        outputs: vec![
            artifact("kernel", &dir.join(KERNEL))?,
            artifact("initramfs", &dir.join(INITRAMFS))?,
            artifact("glue_module", &dir.join(GLUE_KO))?,
        ],
        inputs,
        modules,
        build_seconds: started.elapsed().as_secs_f64(),
        apt_lists: lists,
        backend: None,
    };
    write_manifest(dir, &manifest)?;
    println!(
        "guest: built {abi} in {:.1} s: {} and {}",
        started.elapsed().as_secs_f64(),
        dir.join(KERNEL).display(),
        dir.join(INITRAMFS).display()
    );
    Ok(manifest)
}

/// Downloads the packages (unless present), extracts them afresh into `<dir>/root`, points the
/// headers at the extracted copy and runs depmod; returns the root and the .deb files.
fn extract_root(dir: &Path, inputs: &Inputs) -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
    let abi = &inputs.abi;
    let debs = download(dir, &inputs.packages)?;
    let root = dir.join("root");
    step("extracting the packages (dpkg -x)");
    if root.exists() {
        std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    std::fs::create_dir_all(&root)?;
    for deb in &debs {
        run_shown(Command::new(tool("dpkg")?).arg("-x").arg(deb).arg(&root))?;
    }
    point_headers_at_root(&root, abi)?;
    step("resolving module dependencies (depmod)");
    run_shown(Command::new(tool("depmod")?).arg("-b").arg(&root).arg(abi))?;
    Ok((root, debs))
}

/// The extracted packages of a current build, extracted again when someone removed them.
fn ensure_root(dir: &Path, inputs: &Inputs) -> anyhow::Result<PathBuf> {
    let root = dir.join("root");
    let abi = &inputs.abi;
    let headers = root.join(format!("usr/src/linux-headers-{abi}/Makefile"));
    let deps = root.join(format!("lib/modules/{abi}/modules.dep"));
    if headers.is_file() && deps.is_file() {
        return Ok(root);
    }
    step("the extracted kernel packages are gone: extracting them again");
    Ok(extract_root(dir, inputs)?.0)
}

/// Debian's per-flavour headers Makefile includes the common headers by absolute path under
/// /usr/src: points it at the extracted copy instead.
fn point_headers_at_root(root: &Path, abi: &str) -> anyhow::Result<()> {
    let makefile = root
        .join("usr/src")
        .join(format!("linux-headers-{abi}"))
        .join("Makefile");
    let text = std::fs::read_to_string(&makefile)
        .with_context(|| format!("reading {}", makefile.display()))?;
    let root_src = root.join("usr/src/");
    let patched = text.replace(
        "include /usr/src/",
        &format!("include {}", root_src.display()),
    );
    std::fs::write(&makefile, patched)?;
    Ok(())
}

/// `apt-get download`s each package into `<dir>/debs` unless already there; returns the files.
fn download(dir: &Path, packages: &[Pkg]) -> anyhow::Result<Vec<PathBuf>> {
    let debs_dir = dir.join("debs");
    std::fs::create_dir_all(&debs_dir)?;
    let find = |p: &Pkg| -> anyhow::Result<Option<PathBuf>> {
        // apt writes an epoch's ':' as "%3a".
        let prefix = format!("{}_{}_", p.name, p.version.replace(':', "%3a"));
        for entry in std::fs::read_dir(&debs_dir)? {
            let path = entry?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if name.is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb")) {
                return Ok(Some(path));
            }
        }
        Ok(None)
    };
    let missing: Vec<String> = packages
        .iter()
        .filter(|p| !matches!(find(p), Ok(Some(_))))
        .map(|p| format!("{}={}", p.name, p.version))
        .collect();
    if missing.is_empty() {
        step("packages already downloaded");
    } else {
        step(&format!("downloading {}", missing.join(" ")));
        let mut cmd = Command::new(tool("apt-get")?);
        // As root, apt drops to the `_apt` user, which cannot write into our directory.
        if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
            cmd.args(["-o", "APT::Sandbox::User=root"]);
        }
        run_shown(cmd.arg("download").args(&missing).current_dir(&debs_dir))?;
    }
    packages
        .iter()
        .map(|p| {
            find(p)?.ok_or_else(|| anyhow!("{}={} not found after download", p.name, p.version))
        })
        .collect()
}

/// Builds the glue module against the extracted headers; returns the .ko.
fn build_glue(dir: &Path, root: &Path, abi: &str) -> anyhow::Result<PathBuf> {
    step("building the glue module");
    let headers = root.join("usr/src").join(format!("linux-headers-{abi}"));

    let build_dir = dir.join("glue");
    if build_dir.exists() {
        std::fs::remove_dir_all(&build_dir)?;
    }
    std::fs::create_dir_all(&build_dir)?;
    std::fs::write(build_dir.join("remio_glue.c"), GLUE_C)?;
    std::fs::write(build_dir.join("Kbuild"), GLUE_KBUILD)?;
    std::fs::write(build_dir.join("remio-ids.h"), IDS_H)?;
    let build_abs = std::fs::canonicalize(&build_dir)?;
    run_shown(
        Command::new(tool("make")?)
            .arg("-s")
            .arg("-C")
            .arg(&headers)
            .arg(format!("M={}", build_abs.display()))
            .arg("modules"),
    )?;
    let ko = build_dir.join(GLUE_KO);
    let vermagic = output(
        Command::new(tool("modinfo")?)
            .args(["-F", "vermagic"])
            .arg(&ko),
    )?;
    ensure!(
        vermagic.starts_with(&format!("{abi} ")),
        "glue vermagic {vermagic:?} does not match {abi}"
    );
    write_atomic(&dir.join(GLUE_KO), &std::fs::read(&ko)?)?;
    Ok(ko)
}

/// Builds guest/tools/<name>.c statically (the initramfs has no shared libraries).
fn build_tool(dir: &Path, name: &str, source: &str) -> anyhow::Result<PathBuf> {
    step(&format!("building {name} (static)"));
    let build_dir = dir.join("tools");
    std::fs::create_dir_all(&build_dir)?;
    let src = build_dir.join(format!("{name}.c"));
    std::fs::write(&src, source)?;
    let bin = build_dir.join(name);
    run_shown(
        Command::new(tool("gcc")?)
            .args(["-O2", "-static", "-pthread", "-Wall", "-o"])
            .arg(&bin)
            .arg(&src),
    )
    .with_context(|| format!("building {name} (needs libc6-dev)"))?;
    Ok(bin)
}

/// Module stem with '-' and '_' treated alike, as the kernel does.
fn module_key(stem: &str) -> String {
    stem.replace('-', "_")
}

/// Strips `.ko`, `.ko.xz`, `.ko.zst`, `.ko.gz` from a module file name.
fn module_stem(file: &str) -> Option<&str> {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))
}

/// Reads `modules.dep` and returns `wanted` plus their dependencies, dependencies first, as
/// (stem, path relative to `modules_dir`). Modules built into the kernel are skipped.
fn module_order(modules_dir: &Path, wanted: &[&str]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let dep = std::fs::read_to_string(modules_dir.join("modules.dep"))?;
    let builtin = std::fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
    parse_module_order(&dep, &builtin, wanted)
}

fn parse_module_order(
    dep: &str,
    builtin: &str,
    wanted: &[&str],
) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let stem_of = |path: &str| -> Option<String> {
        let file = path.rsplit('/').next()?;
        module_stem(file).map(str::to_owned)
    };
    // key -> (stem, path, dependency paths)
    let mut table: BTreeMap<String, (String, String, Vec<String>)> = BTreeMap::new();
    for line in dep.lines() {
        let Some((path, deps)) = line.split_once(':') else {
            continue;
        };
        let Some(stem) = stem_of(path) else { continue };
        let deps = deps.split_whitespace().map(str::to_owned).collect();
        table.insert(module_key(&stem), (stem, path.to_owned(), deps));
    }
    let builtin: BTreeSet<String> = builtin
        .lines()
        .filter_map(stem_of)
        .map(|s| module_key(&s))
        .collect();

    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    // Depth-first, dependencies before dependants; `visiting` catches cycles.
    fn visit(
        key: &str,
        table: &BTreeMap<String, (String, String, Vec<String>)>,
        done: &mut BTreeSet<String>,
        visiting: &mut BTreeSet<String>,
        order: &mut Vec<(String, PathBuf)>,
        stem_of: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<()> {
        if done.contains(key) {
            return Ok(());
        }
        ensure!(visiting.insert(key.to_owned()), "dependency cycle at {key}");
        let (stem, path, deps) = table
            .get(key)
            .ok_or_else(|| anyhow!("module {key} is not in modules.dep"))?;
        for d in deps {
            let dkey = module_key(&stem_of(d).ok_or_else(|| anyhow!("bad dependency {d}"))?);
            visit(&dkey, table, done, visiting, order, stem_of)?;
        }
        visiting.remove(key);
        done.insert(key.to_owned());
        order.push((stem.clone(), PathBuf::from(path)));
        Ok(())
    }
    for w in wanted {
        let key = module_key(w);
        if !table.contains_key(&key) && builtin.contains(&key) {
            continue;
        }
        let mut visiting = BTreeSet::new();
        visit(&key, &table, &mut done, &mut visiting, &mut order, &stem_of)?;
    }
    Ok(order)
}

/// Reads a module, decompressing `.ko.xz` / `.ko.zst` / `.ko.gz` (the initramfs holds plain .ko).
fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let decompressor = if name.ends_with(".xz") {
        Some(("xz", "xz-utils"))
    } else if name.ends_with(".zst") {
        Some(("zstd", "zstd"))
    } else if name.ends_with(".gz") {
        Some(("gzip", "gzip"))
    } else {
        None
    };
    match decompressor {
        None => std::fs::read(path).with_context(|| format!("reading {}", path.display())),
        Some((prog, pkg)) => {
            let exe = find_tool(prog)
                .ok_or_else(|| anyhow!("`{prog}` not found: install the Debian package `{pkg}`"))?;
            let out = Command::new(exe)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| format!("decompressing {}", path.display()))?;
            ensure!(out.status.success(), "{prog} -dc {} failed", path.display());
            Ok(out.stdout)
        }
    }
}

/// A minimal writer of the newc cpio format the kernel unpacks (all mtimes 0, so the archive is
/// reproducible). See the kernel's Documentation/driver-api/early-userspace/buffer-format.rst.
#[derive(Debug, Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> anyhow::Result<()> {
        self.ino += 1;
        let size = u32::try_from(data.len()).context("cpio member over 4 GiB")?;
        let namesize = u32::try_from(name.len() + 1).context("cpio name too long")?;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
        Ok(())
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn dir(&mut self, name: &str) -> anyhow::Result<()> {
        self.entry(name, 0o040755, (0, 0), &[])
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> anyhow::Result<()> {
        self.entry(name, 0o100000 | perm, (0, 0), data)
    }

    fn chardev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> anyhow::Result<()> {
        self.entry(name, 0o020000 | perm, (major, minor), &[])
    }

    fn finish(mut self) -> anyhow::Result<Vec<u8>> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        Ok(self.buf)
    }
}

/// The directories of both initramfs skeletons (the frontend guest's adds `mnt`).
pub(crate) const SKELETON_DIRS: [&str; 15] = [
    "bin",
    "dev",
    "etc",
    "etc/remio",
    "lib",
    "lib/modules",
    "proc",
    "root",
    "run",
    "sbin",
    "sys",
    "tmp",
    "usr",
    "usr/bin",
    "usr/sbin",
];

fn pack_initramfs(
    abi: &str,
    modules_dir: &Path,
    order: &[(String, PathBuf)],
    glue_ko: &Path,
    tools: &[(&str, PathBuf)],
) -> anyhow::Result<Vec<u8>> {
    let mut c = Cpio::default();
    for d in SKELETON_DIRS.iter().chain(&["mnt"]) {
        c.dir(d)?;
    }
    let mdir = format!("lib/modules/{abi}");
    c.dir(&mdir)?;
    c.chardev("dev/console", 0o600, 5, 1)?;
    c.chardev("dev/null", 0o666, 1, 3)?;
    c.file("init", 0o755, INIT.as_bytes())?;
    c.file("bin/busybox", 0o755, &std::fs::read("/bin/busybox")?)?;
    for (name, bin) in tools {
        c.file(&format!("usr/bin/{name}"), 0o755, &std::fs::read(bin)?)?;
    }

    // Flat module directory with a matching modules.dep, so busybox modprobe works too.
    let mut list = String::new();
    let mut dep = String::new();
    for (stem, rel) in order {
        c.file(
            &format!("{mdir}/{stem}.ko"),
            0o644,
            &read_module(&modules_dir.join(rel))?,
        )?;
        list.push_str(stem);
        list.push('\n');
    }
    c.file(
        &format!("{mdir}/remio_glue.ko"),
        0o644,
        &std::fs::read(glue_ko)?,
    )?;
    list.push_str("remio_glue\n");
    // Each module depends on everything loaded before it that it needs; modules.dep lists
    // dependencies last-loaded-first, as depmod does. Derive from the real modules.dep.
    let real = std::fs::read_to_string(modules_dir.join("modules.dep"))?;
    let stems: BTreeSet<&str> = order.iter().map(|(s, _)| s.as_str()).collect();
    for line in real.lines() {
        let Some((path, deps)) = line.split_once(':') else {
            continue;
        };
        let Some(stem) = path.rsplit('/').next().and_then(module_stem) else {
            continue;
        };
        if !stems.contains(stem) {
            continue;
        }
        let _ = write!(dep, "{stem}.ko:");
        for d in deps.split_whitespace() {
            if let Some(ds) = d.rsplit('/').next().and_then(module_stem) {
                let _ = write!(dep, " {ds}.ko");
            }
        }
        dep.push('\n');
    }
    dep.push_str("remio_glue.ko:\n");
    c.file(&format!("{mdir}/modules.dep"), 0o644, dep.as_bytes())?;
    c.file("etc/remio/modules", 0o644, list.as_bytes())?;
    c.file("etc/remio/abi", 0o644, format!("{abi}\n").as_bytes())?;
    c.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?;
    c.file("etc/group", 0o644, b"root:x:0:\n")?;
    c.finish()
}

fn info(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no guest build at {} (run `remio guest build`)",
            path.display()
        )
    })?;
    let manifest: Manifest = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a manifest of this remio", path.display()))?;
    print!("{text}");
    let intact = outputs_intact(dir, &manifest);
    println!("manifest:  {}", path.display());
    println!("kernel:    {}", dir.join(KERNEL).display());
    println!("initramfs: {}", dir.join(INITRAMFS).display());
    println!("glue:      {}", dir.join(GLUE_KO).display());
    println!(
        "outputs:   {}",
        if intact {
            "intact (hashes match)"
        } else {
            "MODIFIED OR MISSING: run `remio guest build`"
        }
    );
    println!("{}", backend::describe(dir));
    Ok(())
}

/// Standard base64 (RFC 4648, with padding): the encoding of `remio.exec=`.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The `REMIO-EXIT <status>` marker in one line of guest output.
fn exit_marker(line: &str) -> Option<i32> {
    let rest = &line[line.find("REMIO-EXIT ")? + "REMIO-EXIT ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

fn boot(dir: &Path, exec: Option<&str>, timeout: u64) -> anyhow::Result<()> {
    let manifest = read_manifest(dir).ok_or_else(|| {
        anyhow!(
            "no guest build in {} (run `remio guest build`)",
            dir.display()
        )
    })?;
    ensure!(
        outputs_intact(dir, &manifest),
        "the guest in {} was modified: run `remio guest build`",
        dir.display()
    );
    let qemu = find_tool("qemu-system-x86_64").ok_or_else(|| {
        anyhow!("`qemu-system-x86_64` not found: install the Debian package `qemu-system-x86`")
    })?;
    let append = exec.map_or_else(String::new, |cmd| {
        format!("remio.exec={}", base64(cmd.as_bytes()))
    });
    let mut cmd = Command::new(qemu);
    // q35, not microvm: it boots the plain image with no remio devices, and has an HPET to fall
    // back on should TSC calibration fail (see guest/README.md).
    cmd.args(remio_frontend::qemu::launch::guest_args(
        "q35",
        256,
        &dir.join(KERNEL),
        &dir.join(INITRAMFS),
        &append,
    ));
    let Some(_) = exec else {
        // Interactive: the console is ours.
        let status = cmd.status().context("starting QEMU")?;
        ensure!(status.success(), "QEMU exited with {status}");
        return Ok(());
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting QEMU")?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no QEMU stdout"))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let mut status = None;
    let mut out = std::io::stdout().lock();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let _ = writeln!(out, "{line}");
                if let Some(s) = exit_marker(&line) {
                    status = Some(s);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the guest did not power off within {timeout} s");
            }
        }
    }
    let qemu_status = child.wait()?;
    let status = status.ok_or_else(|| anyhow!("QEMU ({qemu_status}) ended without REMIO-EXIT"))?;
    ensure!(status == 0, "the guest command exited with status {status}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(base64(plain.as_bytes()), encoded, "input {plain:?}");
        }
    }

    #[test]
    fn exit_marker_is_found_after_interleaved_kernel_output() {
        assert_eq!(exit_marker("REMIO-EXIT 0"), Some(0));
        assert_eq!(exit_marker("[    1.2] foo REMIO-EXIT 17"), Some(17));
        assert_eq!(exit_marker("REMIO-EXITED 1"), None);
        assert_eq!(exit_marker("REMIO-EXIT x"), None);
    }

    #[test]
    fn module_order_puts_dependencies_first_and_skips_builtins() {
        let dep = "\
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz
kernel/net/core/failover.ko.xz:
kernel/drivers/virtio/virtio.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/virtio/virtio_ring.ko.xz:
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
";
        let builtin = "kernel/fs/ext4/ext4.ko\n";
        let order = parse_module_order(dep, builtin, &["virtio_net", "virtio_rng", "ext4"])
            .expect("resolves");
        let names: Vec<&str> = order.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "failover",
                "net_failover",
                "virtio_ring",
                "virtio",
                "virtio_net",
                "virtio-rng"
            ]
        );
    }

    #[test]
    fn module_order_rejects_an_unknown_module() {
        let err = parse_module_order("kernel/a.ko:\n", "", &["b"]).expect_err("b is unknown");
        assert!(err.to_string().contains("not in modules.dep"), "{err}");
    }

    #[test]
    fn cpio_entries_are_aligned_and_end_with_a_trailer() {
        let mut c = Cpio::default();
        c.file("init", 0o755, b"abc").expect("small file");
        c.chardev("dev/console", 0o600, 5, 1).expect("node");
        let buf = c.finish().expect("finishes");
        assert_eq!(buf.len() % 4, 0);
        assert!(buf.starts_with(b"070701"));
        // Header of "init": 110 bytes + "init\0" = 115, padded to 116, then "abc" + 1 pad.
        assert_eq!(&buf[116..119], b"abc");
        assert_eq!(&buf[120..126], b"070701");
        let text = String::from_utf8_lossy(&buf);
        assert!(text.contains("TRAILER!!!"));
        // rdevmajor/rdevminor of dev/console are fields 10 and 11 (0-based 9, 10).
        let console = &buf[120..];
        assert_eq!(&console[6 + 9 * 8..6 + 11 * 8], b"0000000500000001");
    }

    #[test]
    fn depends_names_drops_versions_and_alternatives() {
        let names = depends_names(
            "linux-headers-6.1.0-56-common (= 6.1.192-2), linux-kbuild-6.1 (>= 6.1.192-2), a | b",
        );
        assert_eq!(
            names,
            ["linux-headers-6.1.0-56-common", "linux-kbuild-6.1", "a"]
        );
    }
}
