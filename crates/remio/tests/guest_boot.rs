//! Boots the guest built by `remio guest build` (scripts/setup) under QEMU TCG, alone (no remio
//! devices), and checks that /init runs the `remio.exec=` command and reports its status.
//!
//! Skips, saying why on stderr, when qemu-system-x86_64 or the guest artifacts are missing,
//! unless REMIO_REQUIRE_GUEST=1 (scripts/test sets it), in which case it fails instead.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A boot takes 2-3 s on an idle host and about 6 s with both cores busy.
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

fn guest_dir() -> PathBuf {
    std::env::var_os("REMIO_GUEST_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"),
        PathBuf::from,
    )
}

fn find_qemu() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
}

/// The QEMU binary and the guest directory, or None after saying loudly why the test skips.
fn prerequisites(test: &str) -> Option<(PathBuf, PathBuf)> {
    let dir = guest_dir();
    let missing = match find_qemu() {
        None => {
            Some("qemu-system-x86_64 is not on PATH (Debian package qemu-system-x86)".to_owned())
        }
        Some(_) if !dir.join("vmlinuz").is_file() || !dir.join("initramfs.cpio").is_file() => Some(
            format!("no guest build in {} (run scripts/setup)", dir.display()),
        ),
        Some(_) => None,
    };
    match missing {
        None => Some((find_qemu()?, dir)),
        Some(why) if std::env::var_os("REMIO_REQUIRE_GUEST").is_some_and(|v| v == "1") => {
            panic!("{test}: REMIO_REQUIRE_GUEST=1 but {why}")
        }
        Some(why) => {
            eprintln!("\n!!! SKIPPED {test}: {why}\n");
            None
        }
    }
}

fn base64(data: &[u8]) -> String {
    let out = Command::new("base64")
        .arg("-w0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write as _;
            c.stdin.take().unwrap().write_all(data)?;
            c.wait_with_output()
        })
        .expect("coreutils base64");
    String::from_utf8(out.stdout).unwrap()
}

/// Boots the guest with `cmd`; returns every line of its console and the REMIO-EXIT status.
fn boot(qemu: &Path, dir: &Path, cmd: &str) -> (Vec<String>, Option<i32>) {
    let append = format!(
        "console=ttyS0 panic=-1 remio.exec={}",
        base64(cmd.as_bytes())
    );
    let mut child = Command::new(qemu)
        .args(["-M", "q35", "-accel", "tcg", "-cpu", "max"])
        .args([
            "-m",
            "256M",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
        ])
        .args(["-serial", "stdio", "-no-reboot", "-kernel"])
        .arg(dir.join("vmlinuz"))
        .arg("-initrd")
        .arg(dir.join("initramfs.cpio"))
        .arg("-append")
        .arg(append)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting QEMU");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut lines = Vec::new();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => lines.push(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                break;
            }
        }
    }
    let _ = child.wait();
    let status = lines.iter().find_map(|l| {
        let rest = &l[l.find("REMIO-EXIT ")? + "REMIO-EXIT ".len()..];
        rest.split_whitespace().next()?.parse().ok()
    });
    (lines, status)
}

#[test]
fn guest_runs_the_exec_command_with_all_modules_loaded_and_reports_exit_0() {
    let Some((qemu, dir)) = prerequisites("guest_runs_the_exec_command") else {
        return;
    };

    let (lines, status) = boot(&qemu, &dir, "echo KERNEL=$(uname -r); lsmod");

    let console = lines.join("\n");
    assert_eq!(status, Some(0), "console:\n{console}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("REMIO-READY modules_ok=1")),
        "a module failed to load:\n{console}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("KERNEL=") && l.ends_with("-cloud-amd64")),
        "no uname output:\n{console}"
    );
    for module in [
        "remio_glue",
        "virtio_mmio",
        "virtio_blk",
        "virtio_net",
        "virtio_console",
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.split_whitespace().next() == Some(module)),
            "{module} missing from lsmod:\n{console}"
        );
    }
}

#[test]
fn guest_reports_the_exit_status_of_a_failing_command() {
    let Some((qemu, dir)) = prerequisites("guest_reports_the_exit_status") else {
        return;
    };

    let (lines, status) = boot(&qemu, &dir, "echo about to fail; exit 7");

    assert_eq!(status, Some(7), "console:\n{}", lines.join("\n"));
}
