//! The host programs the build runs: finding them and running them.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{anyhow, bail, ensure, Context as _};

/// Tools the build runs, with the Debian package that provides each.
pub(super) const TOOLS: &[(&str, &str)] = &[
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

pub(super) fn tool(name: &str) -> anyhow::Result<PathBuf> {
    find_tool(name).ok_or_else(|| {
        let pkg = TOOLS
            .iter()
            .find(|(t, _)| *t == name)
            .map_or("?", |(_, p)| p);
        anyhow!("`{name}` not found: install the Debian package `{pkg}` (scripts/setup does)")
    })
}

/// Runs a command, returning its stdout; on failure the error carries its stderr.
pub(super) fn output(cmd: &mut Command) -> anyhow::Result<String> {
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
pub(super) fn run_shown(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed ({status})");
    Ok(())
}
