//! The kernel modules the initramfs loads: their order from `modules.dep`, and reading them
//! decompressed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, ensure, Context as _};

use super::host_tools::find_tool;

/// Module stem with '-' and '_' treated alike, as the kernel does.
pub(super) fn module_key(stem: &str) -> String {
    stem.replace('-', "_")
}

/// Strips `.ko`, `.ko.xz`, `.ko.zst`, `.ko.gz` from a module file name.
pub(super) fn module_stem(file: &str) -> Option<&str> {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))
}

/// Reads `modules.dep` and returns `wanted` plus their dependencies, dependencies first, as
/// (stem, path relative to `modules_dir`). Modules built into the kernel are skipped.
pub(super) fn module_order(
    modules_dir: &Path,
    wanted: &[&str],
) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let dep = std::fs::read_to_string(modules_dir.join("modules.dep"))?;
    let builtin = std::fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
    parse_module_order(&dep, &builtin, wanted)
}

pub(super) fn parse_module_order(
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
pub(super) fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
