//! Boots the backend VM built by `remio guest build` (backend-initramfs.cpio: the posted Bao
//! I/O dispatcher driver, remio_backend.ko, guest/backend/init) alone under QEMU TCG, through
//! `remio guest boot --backend`: an ivshmem-plain and an ivshmem-doorbell but no hypercall
//! proxy. The driver module must load (insmod succeeds without its platform device), and the
//! glue must say clearly that the proxy is missing, so /init stops before `remio dm`.
//!
//! Skips, saying why on stderr, when the patch, QEMU or the backend build is missing. With
//! REMIO_REQUIRE_GUEST=1 (scripts/test) and the patch present, a missing QEMU or backend build
//! fails instead. The full path (proxy present, DMs created) is the c-driver e2e test's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// `remio guest boot --backend --timeout`: a boot takes 3-4 s idle, about 10 s with both cores
/// busy; stripping and packing the remio binary adds a few seconds.
const GUEST_TIMEOUT_S: u64 = 120;
/// The test kills `remio guest boot` this long after the guest's own timeout.
const GRACE: Duration = Duration::from_secs(60);

fn guest_dir() -> PathBuf {
    std::env::var_os("REMIO_GUEST_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"),
        PathBuf::from,
    )
}

/// The patch `remio guest build` reads by default (or $REMIO_C_DRIVER_PATCH).
fn patch_path() -> PathBuf {
    match std::env::var_os("REMIO_C_DRIVER_PATCH") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/spec/bao-io-dispatcher-patch.txt"),
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// True when the test can run; otherwise says why (SKIPPED), or panics when
/// REMIO_REQUIRE_GUEST=1 and the patch exists (then a skip would hide a broken setup).
fn prerequisites(test: &str, need_qemu: bool) -> bool {
    let patch = patch_path();
    if !patch.is_file() {
        eprintln!(
            "\n!!! SKIPPED {test}: no C driver patch at {} (set REMIO_C_DRIVER_PATCH)\n",
            patch.display()
        );
        return false;
    }
    let dir = guest_dir();
    let missing = if need_qemu && !on_path("qemu-system-x86_64") {
        Some("qemu-system-x86_64 is not on PATH (Debian package qemu-system-x86)".to_owned())
    } else if !dir.join("backend-initramfs.cpio").is_file() {
        Some(format!(
            "no backend VM build in {} (run `remio guest build`)",
            dir.display()
        ))
    } else {
        None
    };
    match missing {
        None => true,
        Some(why) if std::env::var_os("REMIO_REQUIRE_GUEST").is_some_and(|v| v == "1") => {
            panic!("{test}: REMIO_REQUIRE_GUEST=1 and the patch exists, but {why}")
        }
        Some(why) => {
            eprintln!("\n!!! SKIPPED {test}: {why}\n");
            false
        }
    }
}

/// One guest at a time, machine-wide: the lock every guest test takes (tests/e2e_common).
fn boot_lock() -> std::fs::File {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/remio-e2e-boot.lock")
        .expect("opening the e2e boot lock");
    file.lock().expect("locking the e2e boot lock");
    file
}

/// Runs `remio guest boot --backend`; returns its stdout (the console) and stderr.
fn boot_backend() -> (String, String) {
    let _lock = boot_lock();
    let mut child = Command::new(env!("CARGO_BIN_EXE_remio"))
        .args(["guest", "boot", "--backend", "--timeout"])
        .arg(GUEST_TIMEOUT_S.to_string())
        .arg("--dir")
        .arg(guest_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting remio guest boot --backend");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    let limit = Duration::from_secs(GUEST_TIMEOUT_S) + GRACE;
    let started = Instant::now();
    let out = match rx.recv_timeout(limit) {
        Ok(s) => s,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("remio guest boot --backend still running after {limit:?}");
        }
    };
    let _ = child.wait();
    let err = err_thread.join().unwrap_or_default();
    eprintln!("(backend boot took {:?})", started.elapsed());
    (out, err)
}

#[test]
fn backend_vm_loads_the_driver_and_reports_the_missing_hypercall_proxy() {
    if !prerequisites("backend_vm_loads_the_driver", true) {
        return;
    }

    let (console, stderr) = boot_backend();

    let has = |needle: &str| console.lines().any(|l| l.contains(needle));
    let context = format!("console:\n{console}\nstderr:\n{stderr}");
    for step in [
        "virtio_pci",
        "virtio_blk",
        "remio_backend",
        "bao-io-dispatcher",
    ] {
        assert!(
            has(&format!("REMIO-BACKEND-STEP {step} ok")),
            "module {step} did not load:\n{context}"
        );
    }
    assert!(
        has("remio-backend: hypercall proxy 1b36:00fe MISSING, ivshmem doorbell bound, ivshmem shared memory bound"),
        "the glue did not bind both ivshmem devices or did not report the proxy:\n{context}"
    );
    assert!(
        has("remio-backend: no hypercall proxy PCI device 1b36:00fe"),
        "the glue did not say the proxy is missing:\n{context}"
    );
    assert!(
        has("REMIO-BACKEND-FAILED /dev/bao-io-dispatcher"),
        "/init did not stop at the missing device node:\n{context}"
    );
    assert!(
        !has("REMIO-BACKEND-DM-START"),
        "remio dm was started:\n{context}"
    );
    for bad in ["BUG:", "Oops", "WARNING:", "Call Trace"] {
        assert!(!has(bad), "the kernel complained ({bad}):\n{context}");
    }
    assert!(
        stderr.contains("failed at step /dev/bao-io-dispatcher"),
        "remio guest boot did not report the failed step:\n{context}"
    );
}

#[test]
fn driver_module_depends_on_the_glue_and_matches_the_guest_kernel() {
    if !prerequisites("driver_module_depends_on_the_glue", false) {
        return;
    }
    let dir = guest_dir();
    let modinfo = |field: &str, ko: &str| {
        let out = Command::new("/sbin/modinfo")
            .args(["-F", field])
            .arg(dir.join(ko))
            .output()
            .expect("modinfo (kmod)");
        assert!(out.status.success(), "modinfo {ko} failed");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let abi = std::fs::read_to_string(dir.join("manifest.json"))
        .ok()
        .and_then(|m| {
            let v: serde_json::Value = serde_json::from_str(&m).ok()?;
            Some(v["inputs"]["abi"].as_str()?.to_owned())
        })
        .expect("the manifest names the ABI");

    let driver_vermagic = modinfo("vermagic", "bao-io-dispatcher.ko");
    let driver_depends = modinfo("depends", "bao-io-dispatcher.ko");
    let glue_vermagic = modinfo("vermagic", "remio_backend.ko");

    assert!(
        driver_vermagic.starts_with(&format!("{abi} ")),
        "{driver_vermagic}"
    );
    assert!(
        glue_vermagic.starts_with(&format!("{abi} ")),
        "{glue_vermagic}"
    );
    assert_eq!(driver_depends, "remio_backend");
    assert_eq!(modinfo("license", "bao-io-dispatcher.ko"), "GPL");
}
