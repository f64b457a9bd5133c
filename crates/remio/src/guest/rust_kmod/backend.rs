//! The backend VM of `remio run --dispatcher rust-kmod` (issue 16 stage 2, docs/kmod.md): the
//! c-driver backend (guest/backend: the glue, `/init`, `remio dm --kernel-driver`) on Debian's
//! 7.3 kernel, with kmod/remio_dispatcher.rs in place of the posted C driver.
//!
//! Built by `remio guest build --rust-kmod`, in its trixie chroot, next to the stage-1 outputs:
//! - `remio_backend.ko`: guest/backend/glue, unchanged, built against the prepared 7.3 tree;
//!   its `Module.symvers` gives modpost the glue's `remio_hc_base`/`remio_hc_banks`, which the
//!   dispatcher module uses;
//! - `remio_dispatcher.ko`: kmod/remio_dispatcher.rs (built with kmod/, see `build_module`);
//! - `backend-initramfs.cpio`: busybox, virtio_blk and the net modules of the packaged 7.3
//!   kernel (virtio_pci is built in; `depmod` gives the order), the two modules above,
//!   guest/backend/init, `/usr/bin/baodefect` (guest/backend/tools, static, built with the
//!   host's gcc as for the c-driver) and the shared libraries of the `remio` binary that ran
//!   the build, packed by the c-driver backend's own `pack`.
//!   `remio run` appends the same overlay as for the c-driver (`/usr/bin/remio`, the device
//!   model's config).
//!
//! The c-driver's backend (`crate::guest::backend`) is untouched: its 6.1 kernel, its modules
//! and the posted driver stay as they are.

use std::path::Path;

use anyhow::{ensure, Context as _};

use super::super::backend::{
    build_baodefect, pack, read_libraries, shared_libraries, BackendArtifacts,
};
use super::super::manifest::artifacts_intact;
use super::super::modules::{module_order, read_module};
use super::{chroot_run, kmake, read_manifest, rel, C_KERNEL, C_TREE, KERNEL};

/// The glue and the backend's `/init`, shared with the c-driver backend (unchanged).
pub(super) const GLUE_C: &str = include_str!("../../../../../guest/backend/glue/remio_backend.c");
pub(super) const GLUE_KBUILD: &str = include_str!("../../../../../guest/backend/glue/Kbuild");
pub(super) const HC_H: &str = include_str!("../../../../../guest/backend/remio-hc.h");
pub(super) const BACKEND_INIT: &str = include_str!("../../../../../guest/backend/init");

/// Inside the chroot: where the glue is built.
pub(super) const C_GLUE: &str = "/remio/glue";

/// Output files in the rust-kmod directory.
pub const BACKEND_INITRAMFS: &str = "backend-initramfs.cpio";
pub(super) const GLUE_KO: &str = "remio_backend.ko";
pub(super) const DISPATCHER_KO: &str = "remio_dispatcher.ko";
/// Module stems, as `/init` loads them (and `lsmod` shows them).
const GLUE_MODULE: &str = "remio_backend";
const DISPATCHER_MODULE: &str = "remio_dispatcher";

/// The backend's own device (its disk; virtio_pci is built into the cloud kernel).
const WANTED_MODULES: &[&str] = &["virtio_blk"];
/// Loaded by `/init` only for the frontend's net (`remio.bridge=`).
const NET_MODULES: &[&str] = &["virtio_net", "tun", "bridge"];

/// Builds guest/backend/glue against the prepared 7.3 tree (`make M=/remio/glue`); the dispatcher
/// module's build then takes its `Module.symvers`.
pub(super) fn build_glue(root: &Path, abi: &str) -> anyhow::Result<()> {
    let glue = root.join(rel(C_GLUE));
    if glue.exists() {
        std::fs::remove_dir_all(&glue)?;
    }
    std::fs::create_dir_all(&glue)?;
    for (name, text) in [
        ("remio_backend.c", GLUE_C),
        ("Kbuild", GLUE_KBUILD),
        ("remio-hc.h", HC_H),
    ] {
        std::fs::write(glue.join(name), text)?;
    }
    let make = kmake(abi);
    chroot_run(
        root,
        "building the backend glue (guest/backend/glue) for 7.3",
        &format!("cd {C_GLUE}\n{make} -C {C_TREE} M={C_GLUE} modules"),
    )
}

/// `modules.dep` of the extracted kernel packages (dpkg -x runs no depmod).
fn depmod(root: &Path, abi: &str) -> anyhow::Result<()> {
    chroot_run(
        root,
        "depmod of the packaged 7.3 modules",
        &format!("depmod -b {C_KERNEL}/usr {abi}"),
    )
}

/// Writes `<dir>/backend-initramfs.cpio` (the glue and dispatcher modules must be in `dir`).
pub(super) fn pack_backend(dir: &Path, root: &Path, abi: &str) -> anyhow::Result<()> {
    depmod(root, abi)?;
    let modules_dir = root.join(format!("{}/usr/lib/modules/{abi}", rel(C_KERNEL)));
    let order = module_order(&modules_dir, WANTED_MODULES)?;
    let mut modules: Vec<(String, Vec<u8>)> = order
        .iter()
        .map(|(stem, path)| Ok((stem.clone(), read_module(&modules_dir.join(path))?)))
        .collect::<anyhow::Result<_>>()?;
    modules.push((GLUE_MODULE.to_owned(), std::fs::read(dir.join(GLUE_KO))?));
    modules.push((
        DISPATCHER_MODULE.to_owned(),
        std::fs::read(dir.join(DISPATCHER_KO))?,
    ));
    let net: Vec<(String, Vec<u8>)> = module_order(&modules_dir, NET_MODULES)?
        .iter()
        .filter(|(stem, _)| !order.iter().any(|(s, _)| s == stem))
        .map(|(stem, path)| Ok((stem.clone(), read_module(&modules_dir.join(path))?)))
        .collect::<anyhow::Result<_>>()?;
    let exe = std::env::current_exe().context("locating the remio binary")?;
    let libs = read_libraries(&shared_libraries(&exe)?)?;
    let baodefect = build_baodefect(dir)?;
    let cpio = pack(BACKEND_INIT, abi, &modules, &net, &libs, &baodefect)?;
    super::super::manifest::write_atomic(&dir.join(BACKEND_INITRAMFS), &cpio)?;
    Ok(())
}

/// The rust-kmod backend VM's boot files in `dir` (default [`super::default_dir`]), or why
/// there are none; the files are checked against the manifest's hashes.
pub fn backend_artifacts(dir: &Path) -> Result<BackendArtifacts, String> {
    let manifest = read_manifest(dir).ok_or_else(|| {
        format!(
            "no rust-kmod build in {} (run `remio guest build --rust-kmod` as root)",
            dir.display()
        )
    })?;
    let has = |name: &str| manifest.outputs.iter().any(|a| a.file == name);
    if !has(BACKEND_INITRAMFS) || !has(KERNEL) {
        return Err(format!(
            "the rust-kmod build in {} predates the backend VM (run `remio guest build \
             --rust-kmod`)",
            dir.display()
        ));
    }
    if !artifacts_intact(dir, &manifest.outputs) {
        return Err(format!(
            "the rust-kmod build in {} was modified since it was built (run `remio guest \
             build --rust-kmod`)",
            dir.display()
        ));
    }
    Ok(BackendArtifacts {
        kernel: dir.join(KERNEL),
        initramfs: dir.join(BACKEND_INITRAMFS),
        modules: vec![GLUE_MODULE.to_owned(), DISPATCHER_MODULE.to_owned()],
        patch_sha256: String::new(),
    })
}

/// The backend artifacts' files must exist before the build claims them.
pub(super) fn check_outputs(dir: &Path) -> anyhow::Result<()> {
    for f in [GLUE_KO, DISPATCHER_KO, BACKEND_INITRAMFS] {
        ensure!(dir.join(f).is_file(), "{} missing after the build", f);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The `assert!(NAME == value)` of kmod/remio_dispatcher.rs as a number.
    fn module_ioctl(name: &str) -> u32 {
        let src = super::super::DISPATCHER_RS;
        let needle = format!("assert!({name} == 0x");
        let at = src
            .find(&needle)
            .unwrap_or_else(|| panic!("{name} not asserted"))
            + needle.len();
        let hex: String = src[at..]
            .chars()
            .take_while(|c| c.is_ascii_hexdigit() || *c == '_')
            .filter(|c| *c != '_')
            .collect();
        u32::from_str_radix(&hex, 16).expect("hex")
    }

    #[test]
    fn the_module_asserts_remio_abi_ioctl_numbers() {
        use remio_abi::uapi as u;
        assert_eq!(
            module_ioctl("BAO_IOCTL_DM_GET_INFO"),
            u::BAO_IOCTL_DM_GET_INFO
        );
        assert_eq!(
            module_ioctl("BAO_IOCTL_IO_CLIENT_ATTACH"),
            u::BAO_IOCTL_IO_CLIENT_ATTACH
        );
        assert_eq!(
            module_ioctl("BAO_IOCTL_IO_REQUEST_COMPLETE"),
            u::BAO_IOCTL_IO_REQUEST_COMPLETE
        );
        assert_eq!(module_ioctl("BAO_IOCTL_IOEVENTFD"), u::BAO_IOCTL_IOEVENTFD);
        assert_eq!(module_ioctl("BAO_IOCTL_IRQFD"), u::BAO_IOCTL_IRQFD);
    }
}
