//! `remio guest build --rust-kmod` and `remio guest boot --rust-kmod`: stage 1 of the Rust
//! dispatcher module (issue 16, docs/kmod.md) — a toolchain that builds an out-of-tree Rust
//! kernel module for Debian's packaged 7.3 kernel, and a VM that loads it.
//!
//! Debian's only kernel with `CONFIG_RUST=y` is trixie-backports' 7.3 series, built with
//! trixie's rustc and bindgen, which need a newer glibc than this bookworm host has; its headers
//! package has no `rust/` metadata. So everything happens inside a trixie tree made with
//! `debootstrap` under `<dir>/chroot` (default `target/rust-kmod`), entered with
//! `unshare --mount --pid --fork --mount-proc chroot` (no mount outlives the command):
//!
//! 1. **chroot**: debootstrap trixie with the toolchain ([`CHROOT_PACKAGES`]), then a
//!    trixie-backports source inside the chroot only (the host's apt sources are untouched);
//!    rebuilt when [`chroot_key`] (suite, mirror, package list, [`FORMAT`]) changes.
//! 2. **kernel packages**: `apt-get download` in the chroot of the kernel the trixie-backports
//!    `linux-image-cloud-amd64` names (image, base, modules, headers, kbuild) and of
//!    `linux-source-<series>`, extracted with `dpkg -x` (nothing installed, no hooks).
//! 3. **rust/ rebuilt**: the source tree configured with the headers package's own `.config`
//!    (checked unchanged by `olddefconfig`), the rustc/bindgen/gcc version texts checked equal
//!    to the ones recorded in that config, the packaged `Module.symvers` and BTF `vmlinux`
//!    copied in, then `make modules_prepare` (which builds `rust/`: core, compiler_builtins,
//!    macros, bindings, uapi, kernel, ...). Every Rust symbol the rebuilt tree exports must be
//!    exported by the packaged kernel (same names, so the same crate hashes).
//! 4. **module**: `kmod/` built with `make M=`, its vermagic checked equal to a packaged module's.
//! 5. **VM**: the packaged `vmlinuz` and an initramfs with busybox, the module, the static
//!    `hello_ioctl` and `kmod/tools/init`, which loads the module, calls its ioctl and prints
//!    `REMIO-KMOD-RESULT PASS|FAIL`.
//!
//! The outputs and a manifest of every input (package versions, tool versions, source hashes)
//! are written to `<dir>`; a build with equal inputs and intact outputs does nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::host_tools::{find_tool, output};
use super::initramfs::{Cpio, SKELETON_DIRS};
use super::manifest::{
    artifact, artifacts_intact, sha256_file, sha256_hex, write_atomic, Artifact, Pkg,
};
use super::packages::depends_names;

/// Bumped whenever the recipe changes in a way the hashed inputs do not show.
const FORMAT: u32 = 1;
/// The Debian release the chroot is made of (its rustc, bindgen and gcc built the kernel).
const SUITE: &str = "trixie";
/// Where the Rust-enabled kernel comes from (inside the chroot only).
const KERNEL_SUITE: &str = "trixie-backports";
const MIRROR: &str = "http://deb.debian.org/debian";
/// The kernel series with `CONFIG_RUST=y` (its source package is `linux-source-<series>`).
const KERNEL_SERIES: &str = "7.3";
/// The metapackage whose trixie-backports version names the kernel ABI.
const META_PACKAGE: &str = "linux-image-cloud-amd64";
/// What the chroot holds: the kernel's compilers (gcc-14 for C, rustc + rust-src + bindgen +
/// libclang for Rust), the kernel build's tools, and libc6-dev for the static test program.
const CHROOT_PACKAGES: &[&str] = &[
    "rustc",
    "rust-src",
    "bindgen",
    "clang",
    "libclang-dev",
    "lld",
    "llvm",
    "gcc-14",
    "gcc",
    "libc6-dev",
    "make",
    "bc",
    "bison",
    "flex",
    "libelf-dev",
    "libssl-dev",
    "dwarves",
    "kmod",
    "cpio",
    "xz-utils",
    "zstd",
    "python3",
    "rsync",
    "ca-certificates",
];
/// Toolchain packages whose installed versions are recorded in the manifest.
const TOOLCHAIN_PACKAGES: &[&str] = &["rustc", "rust-src", "bindgen", "libclang-dev", "gcc-14"];

/// The module's and the VM's sources, embedded so that a change rebuilds `remio` and the module.
const KMOD_RS: &str = include_str!("../../../../kmod/remio_kmod_hello.rs");
const KMOD_KBUILD: &str = include_str!("../../../../kmod/Kbuild");
const KMOD_MAKEFILE: &str = include_str!("../../../../kmod/Makefile");
const HELLO_C: &str = include_str!("../../../../kmod/tools/hello_ioctl.c");
const INIT: &str = include_str!("../../../../kmod/tools/init");
/// Stage 2: the dispatcher module (its backend VM: [`backend`]).
const DISPATCHER_RS: &str = include_str!("../../../../kmod/remio_dispatcher.rs");

mod backend;
pub use backend::backend_artifacts;

/// [`backend_artifacts`] of [`default_dir`]: the backend VM of `remio run --dispatcher
/// rust-kmod`.
pub fn default_backend_artifacts() -> Result<super::backend::BackendArtifacts, String> {
    backend_artifacts(&default_dir())
}

/// Output file names in `<dir>`.
const MANIFEST: &str = "manifest.json";
const KERNEL: &str = "vmlinuz";
const INITRAMFS: &str = "initramfs.cpio";
const MODULE_KO: &str = "remio_kmod_hello.ko";
const HELLO_BIN: &str = "hello_ioctl";

/// Paths inside the chroot.
const C_DEBS: &str = "/remio/debs";
const C_KERNEL: &str = "/remio/kernel";
const C_TREE: &str = "/remio/linux";
const C_KMOD: &str = "/remio/kmod";
/// Inside the chroot: the key of the debootstrap recipe it was made from.
const CHROOT_STAMP: &str = "remio-chroot.key";
/// Inside the source tree: the key of the inputs it was prepared with.
const TREE_STAMP: &str = ".remio-prepared";

/// Where the build is cached: `$REMIO_RUST_KMOD_DIR`, else `<workspace>/target/rust-kmod`.
pub fn default_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("REMIO_RUST_KMOD_DIR") {
        return PathBuf::from(dir);
    }
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or(manifest_dir)
        .join("target/rust-kmod")
}

/// Everything the outputs depend on; equal inputs and intact outputs mean nothing to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Inputs {
    format: u32,
    chroot_key: String,
    abi: String,
    /// Kernel packages from trixie-backports, linux-source included.
    kernel_packages: Vec<Pkg>,
    /// rustc, rust-src, bindgen, libclang, gcc as installed in the chroot.
    toolchain: Vec<Pkg>,
    /// sha256 over kmod/ (module, Kbuild, Makefile, hello_ioctl.c, init).
    sources_sha256: String,
    /// The host's static busybox packed into the initramfs.
    busybox_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    inputs: Inputs,
    /// vmlinuz, initramfs.cpio, remio_kmod_hello.ko, hello_ioctl.
    outputs: Vec<Artifact>,
    /// The version texts the packaged kernel's config records (and the chroot's tools match).
    rustc_version_text: String,
    bindgen_version_text: String,
    cc_version_text: String,
    /// The module's vermagic (equal to the packaged modules').
    vermagic: String,
    /// How many Rust symbols the rebuilt tree exports (all found in the packaged
    /// Module.symvers).
    rust_exports_checked: usize,
    /// Seconds of each step of the build that wrote this manifest.
    timings: Vec<(String, f64)>,
}

fn step(what: &str) {
    log::info!("rust-kmod: {what}");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The key of the chroot recipe: a different suite, mirror or package list makes a new chroot.
fn chroot_key() -> String {
    sha256_hex(
        format!(
            "{FORMAT}\0{SUITE}\0{MIRROR}\0{}\0{KERNEL_SUITE}",
            CHROOT_PACKAGES.join(",")
        )
        .as_bytes(),
    )
}

fn sources_hash() -> String {
    let mut h = Sha256::new();
    for part in [
        KMOD_RS,
        KMOD_KBUILD,
        KMOD_MAKEFILE,
        HELLO_C,
        INIT,
        DISPATCHER_RS,
        backend::GLUE_C,
        backend::GLUE_KBUILD,
        backend::HC_H,
        backend::BACKEND_INIT,
        super::backend::BAODEFECT_C,
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    sha256_hex(&h.finalize())
}

/// A shell script run as root inside the chroot, in its own mount and pid namespaces with a
/// fresh /proc (rustc finds its sysroot through /proc/self/exe), and a clean environment.
fn in_chroot(root: &Path, script: &str) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--pid", "--fork"])
        .arg(format!("--mount-proc={}", root.join("proc").display()))
        .arg("chroot")
        .arg(root)
        .args([
            "/usr/bin/env",
            "-i",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME=/root",
            "LANG=C.UTF-8",
            "DEBIAN_FRONTEND=noninteractive",
            "/bin/sh",
            "-euc",
        ])
        .arg(script);
    cmd
}

/// Runs a chroot script with its output shown, niced (the machine is shared).
fn chroot_run(root: &Path, what: &str, script: &str) -> anyhow::Result<()> {
    step(what);
    let status = in_chroot(
        root,
        &format!("exec nice -n 10 sh -euc '{}'", quote(script)),
    )
    .status()
    .with_context(|| format!("{what}: running unshare/chroot"))?;
    ensure!(
        status.success(),
        "{what}: failed ({status}); script:\n{script}"
    );
    Ok(())
}

/// A chroot script's stdout; on failure the error carries its output.
fn chroot_output(root: &Path, script: &str) -> anyhow::Result<String> {
    output(&mut in_chroot(root, script))
}

/// Escapes `'` for a single-quoted shell word.
fn quote(s: &str) -> String {
    s.replace('\'', r"'\''")
}

/// The make variables of Debian's build of this kernel (from its headers' .kernelvariables):
/// gcc-14 through the cross prefix, and the release string the packaged kernel reports.
fn kmake(abi: &str) -> String {
    format!(
        "make ARCH=x86 CROSS_COMPILE=x86_64-linux-gnu- CC=x86_64-linux-gnu-gcc-14 \
         HOSTCC=gcc-14 KERNELRELEASE={abi} -j2"
    )
}

/// Runs `remio guest build --rust-kmod`.
pub fn build(dir: &Path, force: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    ensure!(
        is_root(),
        "--rust-kmod needs root (debootstrap and chroot): run it as root"
    );
    for (t, pkg) in [
        ("debootstrap", "debootstrap"),
        ("unshare", "util-linux"),
        ("chroot", "coreutils"),
    ] {
        ensure!(
            find_tool(t).is_some(),
            "`{t}` not found: install the Debian package `{pkg}` (scripts/setup does)"
        );
    }
    ensure!(
        Path::new("/bin/busybox").is_file(),
        "/bin/busybox not found: install the Debian package `busybox-static` (scripts/setup does)"
    );
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut timings = Vec::new();
    let mut timed = |name: &str, t: Instant| timings.push((name.to_owned(), secs(t)));

    let t = Instant::now();
    let root = ensure_chroot(dir, force)?;
    timed("chroot", t);

    let (abi, kernel_packages) = resolve_kernel(&root)?;
    let installed = chroot_output(
        &root,
        &format!(
            "dpkg-query -W -f '${{Package}} ${{Version}}\\n' {}",
            TOOLCHAIN_PACKAGES.join(" ")
        ),
    )?;
    let toolchain: Vec<Pkg> = installed
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(name, version)| Pkg {
            name: name.to_owned(),
            version: version.to_owned(),
        })
        .collect();
    ensure!(
        toolchain.len() == TOOLCHAIN_PACKAGES.len(),
        "the chroot lacks some of {TOOLCHAIN_PACKAGES:?}: {installed}"
    );
    let inputs = Inputs {
        format: FORMAT,
        chroot_key: chroot_key(),
        abi: abi.clone(),
        kernel_packages,
        toolchain,
        sources_sha256: sources_hash(),
        busybox_sha256: sha256_file(Path::new("/bin/busybox"))?,
    };
    let cached = read_manifest(dir);
    if !force
        && cached
            .as_ref()
            .is_some_and(|m| m.inputs == inputs && artifacts_intact(dir, &m.outputs))
    {
        println!(
            "rust-kmod: up to date ({abi}, {}), nothing to do",
            dir.join(MANIFEST).display()
        );
        return Ok(());
    }
    // A half-done build must not look current.
    let _ = std::fs::remove_file(dir.join(MANIFEST));

    let t = Instant::now();
    fetch_kernel(&root, &inputs)?;
    timed("kernel packages", t);

    let t = Instant::now();
    let texts = prepare_tree(&root, &inputs, force)?;
    timed("rust/ rebuilt (modules_prepare)", t);

    let t = Instant::now();
    let rust_exports_checked = check_rust_exports(&root)?;
    let vermagic = build_module(dir, &root, &abi)?;
    timed("module + test program", t);

    let t = Instant::now();
    let kernel_src = root.join(format!("{}/boot/vmlinuz-{abi}", rel(C_KERNEL)));
    let kernel = std::fs::read(&kernel_src)
        .or_else(|_| {
            std::fs::read(root.join(format!("{}/usr/lib/modules/{abi}/vmlinuz", rel(C_KERNEL))))
        })
        .with_context(|| format!("reading the packaged kernel {}", kernel_src.display()))?;
    write_atomic(&dir.join(KERNEL), &kernel)?;
    write_atomic(&dir.join(INITRAMFS), &pack_initramfs(dir, &abi)?)?;
    timed("initramfs", t);

    let t = Instant::now();
    backend::pack_backend(dir, &root, &abi)?;
    backend::check_outputs(dir)?;
    timed("backend VM initramfs", t);

    let manifest = Manifest {
        outputs: vec![
            artifact("kernel", &dir.join(KERNEL))?,
            artifact("initramfs", &dir.join(INITRAMFS))?,
            artifact("module", &dir.join(MODULE_KO))?,
            artifact("hello_ioctl", &dir.join(HELLO_BIN))?,
            artifact("dispatcher_module", &dir.join(backend::DISPATCHER_KO))?,
            artifact("backend_glue_module", &dir.join(backend::GLUE_KO))?,
            artifact("backend_initramfs", &dir.join(backend::BACKEND_INITRAMFS))?,
        ],
        inputs,
        rustc_version_text: texts.rustc,
        bindgen_version_text: texts.bindgen,
        cc_version_text: texts.cc,
        vermagic,
        rust_exports_checked,
        timings: {
            timings.push(("total".to_owned(), secs(started)));
            timings
        },
    };
    let json = serde_json::to_string_pretty(&manifest)?;
    write_atomic(&dir.join(MANIFEST), format!("{json}\n").as_bytes())?;
    println!(
        "rust-kmod: built {} for {abi} in {:.1} s: {} and {}",
        MODULE_KO,
        secs(started),
        dir.join(KERNEL).display(),
        dir.join(INITRAMFS).display()
    );
    Ok(())
}

fn secs(t: Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 10.0).round() / 10.0
}

/// `/remio/x` -> `remio/x`, to join onto the chroot's path on the host.
fn rel(chroot_path: &str) -> &str {
    chroot_path.trim_start_matches('/')
}

fn read_manifest(dir: &Path) -> Option<Manifest> {
    let text = std::fs::read_to_string(dir.join(MANIFEST)).ok()?;
    serde_json::from_str(&text).ok()
}

/// The chroot of the current recipe: reused when its stamp matches, else made afresh with
/// debootstrap (into a temporary directory renamed at the end, so a broken run leaves no
/// half-made chroot that looks current). With `force`, its package lists are refreshed.
fn ensure_chroot(dir: &Path, force: bool) -> anyhow::Result<PathBuf> {
    let root = dir.join("chroot");
    let key = chroot_key();
    let stamp = root.join(CHROOT_STAMP);
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == key) {
        if force {
            copy_resolv_conf(&root)?;
            chroot_run(
                &root,
                "refreshing the chroot's package lists",
                "apt-get update -q",
            )?;
        }
        return Ok(root);
    }
    let tmp = dir.join("chroot.tmp");
    for old in [&root, &tmp] {
        if old.exists() {
            step(&format!("removing {}", old.display()));
            std::fs::remove_dir_all(old).with_context(|| format!("removing {}", old.display()))?;
        }
    }
    step(&format!(
        "debootstrap {SUITE} into {} (a few minutes)",
        tmp.display()
    ));
    let status = Command::new("nice")
        .args(["-n", "10"])
        .arg(find_tool("debootstrap").ok_or_else(|| anyhow!("debootstrap not found"))?)
        .args(["--variant=minbase", "--components=main"])
        .arg(format!("--include={}", CHROOT_PACKAGES.join(",")))
        .arg(SUITE)
        .arg(&tmp)
        .arg(MIRROR)
        .status()
        .context("running debootstrap")?;
    ensure!(status.success(), "debootstrap {SUITE} failed ({status})");
    // The Rust-enabled kernel's suite, for the chroot's apt only: at priority 100 (the default
    // for backports) nothing from it is installed unless named.
    std::fs::write(
        tmp.join("etc/apt/sources.list.d/remio-kernel.list"),
        format!("deb {MIRROR} {KERNEL_SUITE} main\n"),
    )?;
    copy_resolv_conf(&tmp)?;
    chroot_run(&tmp, "apt-get update in the chroot", "apt-get update -q")?;
    std::fs::write(tmp.join(CHROOT_STAMP), format!("{key}\n"))?;
    std::fs::rename(&tmp, &root).with_context(|| format!("renaming to {}", root.display()))?;
    Ok(root)
}

fn copy_resolv_conf(root: &Path) -> anyhow::Result<()> {
    if let Ok(conf) = std::fs::read("/etc/resolv.conf") {
        let target = root.join("etc/resolv.conf");
        let _ = std::fs::remove_file(&target);
        std::fs::write(&target, conf)?;
    }
    Ok(())
}

/// `apt-cache show` in the chroot for the trixie-backports version of `name`: (Version,
/// Depends).
fn kernel_candidate(root: &Path, name: &str) -> anyhow::Result<(String, String)> {
    let text = chroot_output(
        root,
        &format!("apt-cache -o APT::Default-Release={KERNEL_SUITE} show --no-all-versions {name}"),
    )
    .with_context(|| format!("no {KERNEL_SUITE} candidate for {name}"))?;
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_owned())
    };
    let version = field("Version:").ok_or_else(|| anyhow!("{name}: no Version field"))?;
    Ok((version, field("Depends:").unwrap_or_default()))
}

/// The kernel ABI the trixie-backports metapackage names, and the exact packages the build
/// uses: image parts (binary = vmlinuz, base = config and System.map, modules), headers
/// (flavour + common, kbuild) and the source.
fn resolve_kernel(root: &Path) -> anyhow::Result<(String, Vec<Pkg>)> {
    let (_, meta_deps) = kernel_candidate(root, META_PACKAGE)?;
    let image = depends_names(&meta_deps)
        .into_iter()
        .find(|d| d.starts_with("linux-image-"))
        .ok_or_else(|| anyhow!("{META_PACKAGE} depends on no linux-image-*: {meta_deps}"))?;
    let abi = image
        .strip_prefix("linux-image-")
        .unwrap_or_default()
        .to_owned();
    ensure!(
        abi.starts_with(&format!("{KERNEL_SERIES}.")),
        "{KERNEL_SUITE}'s {META_PACKAGE} names {abi}, not a {KERNEL_SERIES}.x kernel: the \
         recipe (KERNEL_SERIES, linux-source-{KERNEL_SERIES}) needs updating"
    );
    let flavour_suffix = abi.split_once('+').map_or("", |(_, s)| s);
    let common = flavour_suffix
        .split_once('-')
        .map_or(flavour_suffix, |(c, _)| c);
    let version_base = abi.split_once('+').map_or(abi.as_str(), |(v, _)| v);
    let names = [
        format!("linux-binary-{abi}"),
        format!("linux-base-{abi}"),
        format!("linux-modules-{abi}"),
        format!("linux-headers-{abi}"),
        format!("linux-headers-{version_base}+{common}-common"),
        format!("linux-kbuild-{version_base}+{common}"),
        format!("linux-source-{KERNEL_SERIES}"),
    ];
    // One apt-cache call for all (each chroot entry costs a second or more on a busy machine).
    let text = chroot_output(
        root,
        &format!(
            "apt-cache -o APT::Default-Release={KERNEL_SUITE} show --no-all-versions {}",
            names.join(" ")
        ),
    )?;
    let versions = paragraph_versions(&text);
    let pkgs = names
        .into_iter()
        .map(|name| {
            let version = versions
                .get(&name)
                .cloned()
                .ok_or_else(|| anyhow!("no {KERNEL_SUITE} candidate for {name}"))?;
            Ok(Pkg { name, version })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok((abi, pkgs))
}

/// Package -> Version of each paragraph of `apt-cache show` output.
fn paragraph_versions(text: &str) -> std::collections::BTreeMap<String, String> {
    let mut map = std::collections::BTreeMap::new();
    for para in text.split("\n\n") {
        let field = |key: &str| {
            para.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_owned())
        };
        if let (Some(name), Some(version)) = (field("Package:"), field("Version:")) {
            map.insert(name, version);
        }
    }
    map
}

/// Downloads the kernel packages in the chroot (unless there) and extracts all but the source
/// into `/remio/kernel` (unless already extracted from the same versions).
fn fetch_kernel(root: &Path, inputs: &Inputs) -> anyhow::Result<()> {
    let wanted: Vec<String> = inputs
        .kernel_packages
        .iter()
        .map(|p| format!("{}={}", p.name, p.version))
        .collect();
    let key = sha256_hex(wanted.join(" ").as_bytes());
    let stamp = root.join(rel(C_KERNEL)).join(".remio-extracted");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == key) {
        step("the kernel packages are already extracted");
        return Ok(());
    }
    let script = format!(
        "mkdir -p {C_DEBS} && cd {C_DEBS}
         rm -rf {C_KERNEL} && mkdir -p {C_KERNEL}
         for p in {pkgs}; do
           n=${{p%%=*}}; v=${{p#*=}}
           f=$(ls \"${{n}}_$(echo \"$v\" | sed s/:/%3a/)_\"*.deb 2>/dev/null | head -n1 || true)
           if [ -z \"$f\" ]; then
             apt-get -q -o APT::Sandbox::User=root download \"$p\"
             f=$(ls \"${{n}}_$(echo \"$v\" | sed s/:/%3a/)_\"*.deb | head -n1)
           fi
           case \"$n\" in linux-source-*) ;; *) dpkg -x \"$f\" {C_KERNEL} ;; esac
         done",
        pkgs = wanted.join(" ")
    );
    chroot_run(
        root,
        "downloading and extracting the kernel packages",
        &script,
    )?;
    std::fs::write(&stamp, format!("{key}\n"))?;
    Ok(())
}

/// The version texts the packaged kernel's config records.
#[derive(Debug)]
struct VersionTexts {
    rustc: String,
    bindgen: String,
    cc: String,
}

fn config_string(config: &str, key: &str) -> Option<String> {
    config
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|v| v.trim_matches('"').to_owned())
}

/// The source tree configured as the packaged kernel and with `rust/` built: reused when its
/// stamp matches the inputs.
fn prepare_tree(root: &Path, inputs: &Inputs, force: bool) -> anyhow::Result<VersionTexts> {
    let abi = &inputs.abi;
    let headers = format!("{C_KERNEL}/usr/src/linux-headers-{abi}");
    let config_path = root.join(rel(&headers)).join(".config");
    let config = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading the packaged config {}", config_path.display()))?;
    ensure!(
        config.lines().any(|l| l == "CONFIG_RUST=y"),
        "the packaged {abi} kernel has no CONFIG_RUST=y: no Rust module can load on it"
    );
    let texts = VersionTexts {
        rustc: config_string(&config, "CONFIG_RUSTC_VERSION_TEXT").unwrap_or_default(),
        bindgen: config_string(&config, "CONFIG_BINDGEN_VERSION_TEXT").unwrap_or_default(),
        cc: config_string(&config, "CONFIG_CC_VERSION_TEXT").unwrap_or_default(),
    };
    // The exact compilers: what the chroot runs must print what the kernel's config recorded.
    for (tool, want) in [
        ("rustc --version", &texts.rustc),
        ("bindgen --version", &texts.bindgen),
        ("x86_64-linux-gnu-gcc-14 --version | head -n1", &texts.cc),
    ] {
        let have = chroot_output(root, tool)?;
        ensure!(
            have.trim() == want.as_str(),
            "the chroot's `{tool}` prints {:?}, the packaged kernel was built with {want:?}",
            have.trim()
        );
    }
    let key = sha256_hex(
        serde_json::to_string(&(
            FORMAT,
            &inputs.kernel_packages,
            &inputs.toolchain,
            &inputs.chroot_key,
        ))?
        .as_bytes(),
    );
    let stamp = root.join(rel(C_TREE)).join(TREE_STAMP);
    if !force && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == key) {
        step("the prepared source tree is current");
        return Ok(texts);
    }
    let make = kmake(abi);
    let src_version = inputs
        .kernel_packages
        .iter()
        .find(|p| p.name == format!("linux-source-{KERNEL_SERIES}"))
        .map(|p| p.version.replace(':', "%3a"))
        .ok_or_else(|| anyhow!("linux-source-{KERNEL_SERIES} is not among the kernel packages"))?;
    let script = format!(
        "rm -rf {C_TREE} && mkdir -p {C_TREE}
         cd {C_DEBS}
         dpkg-deb --fsys-tarfile linux-source-{KERNEL_SERIES}_{src_version}_*.deb | \
           tar -xO ./usr/src/linux-source-{KERNEL_SERIES}.tar.xz | \
           tar -xJ -C {C_TREE} --strip-components=1
         cd {C_TREE}
         cp {headers}/.config .config
         {make} olddefconfig >/dev/null
         grep -v '^#' {headers}/.config | grep -v '^$' > /tmp/packaged.config
         grep -v '^#' .config | grep -v '^$' > /tmp/rebuilt.config
         if ! diff -u /tmp/packaged.config /tmp/rebuilt.config; then
           echo 'olddefconfig changed the packaged config (diff above)' >&2; exit 1
         fi
         cp {headers}/Module.symvers Module.symvers
         cp {headers}/vmlinux vmlinux
         {make} modules_prepare"
    );
    chroot_run(
        root,
        "extracting linux-source and rebuilding rust/ with the packaged config (several minutes)",
        &script,
    )?;
    std::fs::write(&stamp, format!("{key}\n"))?;
    Ok(texts)
}

/// Every Rust symbol the rebuilt tree exports (`rust/exports_*_generated.h`) must be exported
/// by the packaged kernel too: the same names mean the same crate hashes, so a module built
/// against the rebuilt crates links against the packaged kernel. Returns how many were checked.
fn check_rust_exports(root: &Path) -> anyhow::Result<usize> {
    let tree = root.join(rel(C_TREE));
    let symvers = std::fs::read_to_string(tree.join("Module.symvers"))?;
    let packaged: std::collections::BTreeSet<&str> = symvers
        .lines()
        .filter_map(|l| l.split('\t').nth(1))
        .collect();
    let mut checked = 0;
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(tree.join("rust"))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !(name.starts_with("exports_") && name.ends_with("_generated.h")) {
            continue;
        }
        for line in std::fs::read_to_string(&path)?.lines() {
            let Some(sym) = line
                .split_once('(')
                .and_then(|(_, rest)| rest.split_once(')'))
                .map(|(s, _)| s.trim())
            else {
                continue;
            };
            checked += 1;
            if !packaged.contains(sym) {
                missing.push(sym.to_owned());
            }
        }
    }
    ensure!(
        checked > 0,
        "no rust/exports_*_generated.h in the rebuilt tree"
    );
    ensure!(
        missing.is_empty(),
        "{} of {checked} Rust symbols the rebuilt tree exports are not in the packaged \
         Module.symvers (different crate hashes: not the same compiler or flags), e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    step(&format!(
        "all {checked} Rust exports of the rebuilt tree are exported by the packaged kernel"
    ));
    Ok(checked)
}

/// Builds kmod/ against the prepared tree and the static test program; copies both to `dir`
/// and returns the module's vermagic (checked equal to a packaged module's).
fn build_module(dir: &Path, root: &Path, abi: &str) -> anyhow::Result<String> {
    let kmod = root.join(rel(C_KMOD));
    if kmod.exists() {
        std::fs::remove_dir_all(&kmod)?;
    }
    std::fs::create_dir_all(kmod.join("tools"))?;
    backend::build_glue(root, abi)?;
    for (name, text) in [
        ("remio_kmod_hello.rs", KMOD_RS),
        ("remio_dispatcher.rs", DISPATCHER_RS),
        ("Kbuild", KMOD_KBUILD),
        ("Makefile", KMOD_MAKEFILE),
        ("tools/hello_ioctl.c", HELLO_C),
    ] {
        std::fs::write(kmod.join(name), text)?;
    }
    let make = kmake(abi);
    chroot_run(
        root,
        "building kmod/ (make M=) and the static hello_ioctl",
        &format!(
            "cd {C_KMOD}
             {make} -C {C_TREE} M={C_KMOD} KBUILD_EXTRA_SYMBOLS={}/Module.symvers modules
             gcc -static -O2 -Wall -Werror -o hello_ioctl tools/hello_ioctl.c",
            backend::C_GLUE
        ),
    )?;
    let vermagic = chroot_output(
        root,
        &format!("modinfo -F vermagic {C_KMOD}/remio_kmod_hello.ko"),
    )?
    .trim()
    .to_owned();
    let packaged = chroot_output(
        root,
        &format!(
            "modinfo -F vermagic $(find {C_KERNEL}/usr/lib/modules/{abi} -name '*.ko*' | head -n1)"
        ),
    )?
    .trim()
    .to_owned();
    ensure!(
        vermagic == packaged,
        "the module's vermagic {vermagic:?} differs from the packaged modules' {packaged:?}"
    );
    write_atomic(
        &dir.join(MODULE_KO),
        &std::fs::read(kmod.join("remio_kmod_hello.ko"))?,
    )?;
    write_atomic(
        &dir.join(HELLO_BIN),
        &std::fs::read(kmod.join("hello_ioctl"))?,
    )?;
    write_atomic(
        &dir.join(backend::DISPATCHER_KO),
        &std::fs::read(kmod.join(backend::DISPATCHER_KO))?,
    )?;
    write_atomic(
        &dir.join(backend::GLUE_KO),
        &std::fs::read(root.join(rel(backend::C_GLUE)).join(backend::GLUE_KO))?,
    )?;
    Ok(vermagic)
}

/// busybox, the module, hello_ioctl and /init; no kernel module is needed to boot (the serial
/// console, devtmpfs and initramfs support are built into the cloud kernel).
fn pack_initramfs(dir: &Path, abi: &str) -> anyhow::Result<Vec<u8>> {
    let mut c = Cpio::default();
    for d in SKELETON_DIRS {
        c.dir(d)?;
    }
    c.chardev("dev/console", 0o600, 5, 1)?;
    c.chardev("dev/null", 0o666, 1, 3)?;
    c.file("init", 0o755, INIT.as_bytes())?;
    c.file("bin/busybox", 0o755, &std::fs::read("/bin/busybox")?)?;
    c.file(
        "lib/modules/remio_kmod_hello.ko",
        0o644,
        &std::fs::read(dir.join(MODULE_KO))?,
    )?;
    c.file(
        "usr/bin/hello_ioctl",
        0o755,
        &std::fs::read(dir.join(HELLO_BIN))?,
    )?;
    c.file("etc/remio/abi", 0o644, format!("{abi}\n").as_bytes())?;
    c.finish()
}

/// What `/init` reported: the `REMIO-KMOD-RESULT` verdict line.
fn result_marker(line: &str) -> Option<&str> {
    let rest = &line[line.find("REMIO-KMOD-RESULT ")? + "REMIO-KMOD-RESULT ".len()..];
    Some(rest.trim())
}

/// Runs `remio guest boot --rust-kmod`: boots the 7.3 kernel with the test initramfs under QEMU
/// TCG, echoes its console, and succeeds when `/init` reports `REMIO-KMOD-RESULT PASS`.
pub fn boot(dir: &Path, timeout: u64) -> anyhow::Result<()> {
    let manifest = read_manifest(dir).ok_or_else(|| {
        anyhow!(
            "no rust-kmod build in {} (run `remio guest build --rust-kmod`)",
            dir.display()
        )
    })?;
    ensure!(
        artifacts_intact(dir, &manifest.outputs),
        "the rust-kmod build in {} was modified: run `remio guest build --rust-kmod`",
        dir.display()
    );
    let cmd = super::boot::test_vm(&dir.join(KERNEL), &dir.join(INITRAMFS), "")?;
    let (verdict, status) = super::boot::run_to_marker(cmd, timeout, "the rust-kmod VM", |l| {
        result_marker(l).map(str::to_owned)
    })?;
    match verdict.as_deref() {
        Some("PASS") => Ok(()),
        Some(v) => bail!("the rust-kmod VM reported {v}"),
        None => bail!("QEMU ({status}) ended without REMIO-KMOD-RESULT"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_marker_is_found_after_kernel_output() {
        assert_eq!(result_marker("REMIO-KMOD-RESULT PASS"), Some("PASS"));
        assert_eq!(
            result_marker("[ 3.1] x REMIO-KMOD-RESULT FAIL insmod exited 1"),
            Some("FAIL insmod exited 1")
        );
        assert_eq!(result_marker("REMIO-KMOD-RESULTS PASS"), None);
    }

    #[test]
    fn config_string_reads_quoted_values() {
        let config = "CONFIG_RUST=y\nCONFIG_RUSTC_VERSION_TEXT=\"rustc 1.85.1 (x)\"\n";
        assert_eq!(
            config_string(config, "CONFIG_RUSTC_VERSION_TEXT").as_deref(),
            Some("rustc 1.85.1 (x)")
        );
        assert_eq!(config_string(config, "CONFIG_BINDGEN_VERSION_TEXT"), None);
    }

    #[test]
    fn chroot_key_changes_with_the_package_list() {
        let key = chroot_key();
        assert_eq!(key.len(), 64);
        assert_eq!(key, chroot_key());
        let other = sha256_hex(
            format!(
                "{FORMAT}\0{SUITE}\0{MIRROR}\0{}\0{KERNEL_SUITE}",
                CHROOT_PACKAGES[1..].join(",")
            )
            .as_bytes(),
        );
        assert_ne!(key, other);
    }

    #[test]
    fn paragraph_versions_pairs_each_package_with_its_own_version() {
        let text = "Package: linux-source-7.3\nVersion: 7.3.4-1~bpo13+1\nDepends: binutils\n\n\
                    Package: linux-base-7.3.4+deb13-cloud-amd64\nVersion: 7.3.4-1~bpo13+2\n";
        let map = paragraph_versions(text);
        assert_eq!(map.len(), 2);
        assert_eq!(map["linux-source-7.3"], "7.3.4-1~bpo13+1");
        assert_eq!(map["linux-base-7.3.4+deb13-cloud-amd64"], "7.3.4-1~bpo13+2");
    }

    #[test]
    fn quote_escapes_single_quotes_for_sh() {
        assert_eq!(quote("a'b"), r"a'\''b");
        assert_eq!(quote("plain"), "plain");
    }
}
