//! The initramfs: a newc cpio writer and the frontend guest's archive.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::modules::{module_stem, read_module};
use super::INIT;

/// A minimal writer of the newc cpio format the kernel unpacks (all mtimes 0, so the archive is
/// reproducible). See the kernel's Documentation/driver-api/early-userspace/buffer-format.rst.
#[derive(Debug, Default)]
pub(super) struct Cpio {
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

    pub(super) fn dir(&mut self, name: &str) -> anyhow::Result<()> {
        self.entry(name, 0o040755, (0, 0), &[])
    }

    pub(super) fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> anyhow::Result<()> {
        self.entry(name, 0o100000 | perm, (0, 0), data)
    }

    pub(super) fn chardev(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> anyhow::Result<()> {
        self.entry(name, 0o020000 | perm, (major, minor), &[])
    }

    pub(super) fn finish(mut self) -> anyhow::Result<Vec<u8>> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        Ok(self.buf)
    }
}

/// The directories of both initramfs skeletons (the frontend guest's adds `mnt`).
pub(super) const SKELETON_DIRS: [&str; 15] = [
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

pub(super) fn pack_initramfs(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
