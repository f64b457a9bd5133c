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

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context as _};
use sha2::{Digest as _, Sha256};

pub mod backend;
mod boot;
mod compile;
mod host_tools;
mod initramfs;
mod manifest;
mod modules;
mod packages;
mod patch;
mod rust_kmod;

pub use backend::{backend_overlay, backend_status, files_archive};
pub use boot::base64;
pub use host_tools::find_tool;
pub use rust_kmod::default_backend_artifacts as rust_kmod_backend_artifacts;

use compile::{build_glue, build_tool};
use host_tools::{tool, TOOLS};
use initramfs::pack_initramfs;
use manifest::{
    artifact, outputs_intact, read_manifest, sha256_file, sha256_hex, write_atomic, write_manifest,
    Inputs, Manifest, Pkg,
};
use modules::module_order;
use packages::{
    apt_lists_fingerprint, ensure_root, extract_root, installed_version, resolve_packages,
};

/// Bumped whenever the build recipe changes in a way the hashed sources below do not show.
const FORMAT: u32 = 1;

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
const IOPAUSE_C: &str = include_str!("../../../../guest/tools/iopause.c");
/// The static tools of guest/tools, installed as /usr/bin/<name>.
const GUEST_TOOLS: &[(&str, &str)] = &[
    ("iobench", IOBENCH_C),
    ("vsock", VSOCK_C),
    ("blkverify", BLKVERIFY_C),
    ("iopause", IOPAUSE_C),
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
        GuestCommand::Boot(b) => boot::boot(&guest_dir(&b.dir), b.exec.as_deref(), b.timeout),
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

/// Why the guest cached in `dir` does not match this binary's guest sources (/init, the guest
/// tools, the glue, the module list), if it does not: a guest built by an older remio lacks
/// what this one expects of it (a tool's new mode, an /init keyword) and fails in ways that do
/// not name the cause. None when it matches, or when there is no manifest to compare.
pub fn stale_reason(dir: &Path) -> Option<String> {
    let manifest = read_manifest(dir)?;
    (manifest.inputs.recipe_sha256 != recipe_hash()).then(|| {
        format!(
            "the guest in {} was built from other guest sources than this remio's \
             (guest/init, guest/tools, guest/glue): rebuild it with `remio guest build`",
            dir.display()
        )
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_json(recipe: &str) -> String {
        serde_json::json!({
            "inputs": {
                "format": 1, "abi": "6.1.0-0-cloud-amd64", "packages": [], "host_packages": [],
                "busybox_sha256": "", "recipe_sha256": recipe, "glue_source_sha256": ""
            },
            "debs": [], "outputs": [], "modules": [], "build_seconds": 0.0
        })
        .to_string()
    }

    #[test]
    fn a_guest_built_from_other_guest_sources_is_reported_stale_naming_the_fix() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/remio-stale").unwrap();
        let dir_path = dir.as_path();
        assert_eq!(
            stale_reason(dir_path),
            None,
            "no manifest: nothing to compare"
        );

        std::fs::write(dir_path.join(MANIFEST), manifest_json(&recipe_hash())).unwrap();
        assert_eq!(stale_reason(dir_path), None, "built from these sources");

        std::fs::write(dir_path.join(MANIFEST), manifest_json("0000")).unwrap();
        let why = stale_reason(dir_path).expect("another recipe is stale");
        assert!(why.contains("remio guest build"), "{why}");
        assert!(why.contains(&dir_path.display().to_string()), "{why}");
    }
}
