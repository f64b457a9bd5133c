//! Shared helpers of the end-to-end tests: each test boots the real guest under QEMU TCG
//! through `remio run` (platform + bridge + device-model process) and checks what the guest
//! and the host see.
//!
//! A test skips, loudly, only when qemu-system-x86_64 or the guest artifacts are missing
//! (scripts/setup installs both; CI runs it first).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub fn guest_dir() -> PathBuf {
    std::env::var_os("REMIO_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"))
}

/// `true` when the test can run; prints a loud SKIPPED line otherwise.
pub fn prerequisites(test: &str) -> bool {
    let qemu = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").is_file()));
    if !qemu {
        eprintln!("\n*** SKIPPED {test}: qemu-system-x86_64 not found (run scripts/setup) ***\n");
        return false;
    }
    let dir = guest_dir();
    if !dir.join("vmlinuz").is_file() || !dir.join("initramfs.cpio").is_file() {
        eprintln!(
            "\n*** SKIPPED {test}: guest artifacts missing in {} (run `remio guest build`) ***\n",
            dir.display()
        );
        return false;
    }
    true
}

/// What one `remio run --exec` produced.
#[derive(Debug)]
pub struct RunOutput {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Serialises boots across the tests of one binary (two TCG guests on two cores contend).
static BOOT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `remio run --exec script` with `extra` arguments and a wall-clock limit.
pub fn remio_exec(script: &str, extra: &[&str]) -> RunOutput {
    remio_exec_with(script, extra, |_| {})
}

/// Like [`remio_exec`]; `during` runs once with the remio process id, while it runs.
pub fn remio_exec_with(script: &str, extra: &[&str], during: impl FnOnce(u32)) -> RunOutput {
    let _guard = BOOT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = Command::new(env!("CARGO_BIN_EXE_remio"))
        .arg("run")
        .arg("--exec")
        .arg(script)
        .arg("--timeout")
        .arg("240")
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning remio");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    during(child.id());
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if start.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = RunOutput {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    };
    eprintln!(
        "--- remio stdout ---\n{}\n--- remio stderr ---\n{}",
        out.stdout, out.stderr
    );
    out
}

/// A fresh sparse raw image of `size` bytes in a new temporary directory.
pub fn temp_image(size: u64) -> (vmm_sys_util::tempdir::TempDir, PathBuf) {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/remio-e2e").unwrap();
    let path = dir.as_path().join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    (dir, path)
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}
