//! Compiling the guest's own code: the glue module and the static guest tools.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context as _};

use super::host_tools::{output, run_shown, tool};
use super::manifest::write_atomic;
use super::{step, GLUE_C, GLUE_KBUILD, GLUE_KO, IDS_H};

/// Builds the glue module against the extracted headers; returns the .ko.
pub(super) fn build_glue(dir: &Path, root: &Path, abi: &str) -> anyhow::Result<PathBuf> {
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
pub(super) fn build_tool(dir: &Path, name: &str, source: &str) -> anyhow::Result<PathBuf> {
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
