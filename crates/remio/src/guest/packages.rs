//! The Debian packages: resolving the kernel ABI and versions, downloading and extracting them.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, Context as _};

use super::host_tools::{output, run_shown, tool};
use super::manifest::{sha256_hex, Inputs, Pkg};
use super::step;

/// The metapackage whose current dependency names the kernel ABI.
const META_PACKAGE: &str = "linux-image-cloud-amd64";

/// `apt-cache show --no-all-versions PKG`: the candidate's (Version, Depends).
pub(super) fn apt_candidate(name: &str) -> anyhow::Result<(String, String)> {
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
pub(super) fn depends_names(depends: &str) -> Vec<String> {
    depends
        .split(',')
        .filter_map(|d| d.split('|').next())
        .filter_map(|d| d.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

pub(super) fn installed_version(name: &str) -> anyhow::Result<String> {
    output(
        Command::new(tool("dpkg-query")?)
            .args(["-W", "-f", "${Version}"])
            .arg(name),
    )
    .with_context(|| format!("package {name} is not installed (scripts/setup installs it)"))
}

/// Resolves the current ABI and the exact packages to download.
pub(super) fn resolve_packages() -> anyhow::Result<(String, Vec<Pkg>)> {
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
pub(super) fn apt_lists_fingerprint() -> String {
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

/// Downloads the packages (unless present), extracts them afresh into `<dir>/root`, points the
/// headers at the extracted copy and runs depmod; returns the root and the .deb files.
pub(super) fn extract_root(dir: &Path, inputs: &Inputs) -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
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
pub(super) fn ensure_root(dir: &Path, inputs: &Inputs) -> anyhow::Result<PathBuf> {
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
pub(super) fn point_headers_at_root(root: &Path, abi: &str) -> anyhow::Result<()> {
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
pub(super) fn download(dir: &Path, packages: &[Pkg]) -> anyhow::Result<Vec<PathBuf>> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
