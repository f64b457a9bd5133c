//! Booting the frontend guest alone under QEMU, and the `remio.exec=` / `REMIO-EXIT` contract.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _};

use super::host_tools::find_tool;
use super::manifest::{outputs_intact, read_manifest};
use super::{INITRAMFS, KERNEL};

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
pub(super) fn exit_marker(line: &str) -> Option<i32> {
    let rest = &line[line.find("REMIO-EXIT ")? + "REMIO-EXIT ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// The QEMU command of a test VM booting `kernel` and `initrd` alone (no remio devices), with
/// `append` on its kernel command line: q35 with 256 MiB under TCG, serial console on stdio
/// (`remio_frontend::qemu::launch::guest_args`). q35, not microvm: it boots a plain image with
/// no remio devices, and has an HPET to fall back on should TSC calibration fail (see
/// guest/README.md). Used by `remio guest boot` and `remio guest boot --rust-kmod`.
pub(super) fn test_vm(kernel: &Path, initrd: &Path, append: &str) -> anyhow::Result<Command> {
    let qemu = find_tool("qemu-system-x86_64").ok_or_else(|| {
        anyhow!("`qemu-system-x86_64` not found: install the Debian package `qemu-system-x86`")
    })?;
    let mut cmd = Command::new(qemu);
    cmd.args(remio_frontend::qemu::launch::guest_args(
        "q35", 256, kernel, initrd, append,
    ));
    Ok(cmd)
}

/// Runs a test VM's QEMU (`cmd`, its arguments given) with its serial console on our stdout:
/// echoes every line, and returns the last value `marker` found in a line once QEMU exits, with
/// QEMU's exit status. Kills QEMU and fails if it runs longer than `timeout` seconds (`what`
/// names the VM in that error). Used by `remio guest boot` and `remio guest boot --rust-kmod`.
pub(super) fn run_to_marker<T>(
    mut cmd: Command,
    timeout: u64,
    what: &str,
    marker: impl Fn(&str) -> Option<T>,
) -> anyhow::Result<(Option<T>, ExitStatus)> {
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
    let mut found = None;
    let mut out = std::io::stdout().lock();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let _ = writeln!(out, "{line}");
                if let Some(v) = marker(&line) {
                    found = Some(v);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{what} did not power off within {timeout} s");
            }
        }
    }
    Ok((found, child.wait()?))
}

pub(super) fn boot(dir: &Path, exec: Option<&str>, timeout: u64) -> anyhow::Result<()> {
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
    let append = exec.map_or_else(String::new, |cmd| {
        format!("remio.exec={}", base64(cmd.as_bytes()))
    });
    let mut cmd = test_vm(&dir.join(KERNEL), &dir.join(INITRAMFS), &append)?;
    let Some(_) = exec else {
        // Interactive: the console is ours.
        let status = cmd.status().context("starting QEMU")?;
        ensure!(status.success(), "QEMU exited with {status}");
        return Ok(());
    };
    let (status, qemu_status) = run_to_marker(cmd, timeout, "the guest", exit_marker)?;
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
}
