//! `remio run --share HOSTDIR`: remio starts virtiofsd on HOSTDIR and the guest's /init mounts
//! it at /mnt/host; every file-system operation one side makes, the other sees, while both run
//! (mkdir, rename, unlink, hard links, permissions), and a 64 MiB file keeps its checksum both
//! ways. Bad `--share` input fails before any guest starts, naming the flag.
//!
//! virtiofsd comes from scripts/setup (target/tools/bin); `REMIO_VIRTIOFSD` names another
//! binary. Without it the test skips loudly (fails with REMIO_REQUIRE_GUEST=1).
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod e2e_common;
use e2e_common::*;

fn setup(test: &str) -> Option<(vmm_sys_util::tempdir::TempDir, PathBuf, PathBuf)> {
    if !prerequisites(test) {
        return None;
    }
    daemon_or_skip(test, "REMIO_VIRTIOFSD", "virtiofsd")?;
    let (dir, img) = temp_image(16 << 20);
    let share = dir.as_path().join("share");
    std::fs::create_dir(&share).unwrap();
    Some((dir, img, share))
}

fn md5(path: &Path) -> String {
    let out = Command::new("md5sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..32].to_owned()
}

/// Waits (bounded) for `path` to exist.
fn wait_for_file(path: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// What the host saw of the guest's operations, and what it then did, in phase order.
#[derive(Debug, Default)]
struct HostView {
    guest_dir: bool,
    guest_renamed: bool,
    guest_old_name_gone: bool,
    guest_unlinked: bool,
    guest_link_count: u64,
    guest_same_inode: bool,
    guest_mode: u32,
    phase1_seen: bool,
}

#[test]
fn share_operations_made_on_either_side_are_seen_on_the_other() {
    let Some((_dir, img, share)) = setup("e2e_share_ops") else {
        return;
    };
    // Before the guest starts: files the guest will look at (so it has them cached) before the
    // host changes them.
    std::fs::write(share.join("host-file"), "h\n").unwrap();
    std::fs::write(share.join("host-rename-me"), "r\n").unwrap();
    std::fs::write(share.join("host-unlink-me"), "u\n").unwrap();
    std::fs::write(share.join("host-chmod-me"), "c\n").unwrap();
    std::fs::set_permissions(
        share.join("host-chmod-me"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let script = r#"
set -e
cd /mnt/host
grep -q /mnt/host /proc/mounts || { echo NOT-MOUNTED; exit 10; }
ls -la . >/dev/null; cat host-rename-me host-unlink-me >/dev/null; stat -c %a host-chmod-me
# Phase 1: the guest's operations.
mkdir guest-dir
echo g > guest-old; mv guest-old guest-new
echo x > guest-unlink-me; rm guest-unlink-me
echo l > guest-linked; ln guest-linked guest-link
echo m > guest-mode; chmod 0751 guest-mode
touch phase1-done
n=0; while [ ! -e phase2-done ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
[ -e phase2-done ] || { echo NO-PHASE2; exit 11; }
# Phase 2: what the host did meanwhile.
set +e
[ -d host-dir ] && echo SEEN-HOST-MKDIR
[ -e host-renamed ] && [ ! -e host-rename-me ] && [ "$(cat host-renamed)" = r ] && echo SEEN-HOST-RENAME
[ ! -e host-unlink-me ] && echo SEEN-HOST-UNLINK
echo "HOST-LINK-COUNT $(stat -c %h host-file) $(stat -c %h host-link)"
[ "$(stat -c %i host-file)" = "$(stat -c %i host-link)" ] && echo SEEN-HOST-LINK-SAME-INODE
echo "HOST-MODE $(stat -c %a host-chmod-me)"
echo changed-by-guest > host-link
echo FS-OPS-DONE
"#;
    let view = Arc::new(Mutex::new(HostView::default()));
    let (view_w, share_w) = (Arc::clone(&view), share.clone());

    let out = remio_exec_with(
        script,
        &["--disk", path_str(&img), "--share", path_str(&share)],
        move |_| {
            let s = &share_w;
            if !wait_for_file(&s.join("phase1-done"), GUEST_TIMEOUT) {
                return;
            }
            let mut v = view_w.lock().unwrap();
            v.phase1_seen = true;
            v.guest_dir = s.join("guest-dir").is_dir();
            v.guest_renamed =
                std::fs::read_to_string(s.join("guest-new")).ok().as_deref() == Some("g\n");
            v.guest_old_name_gone = !s.join("guest-old").exists();
            v.guest_unlinked = !s.join("guest-unlink-me").exists();
            let (a, b) = (
                std::fs::metadata(s.join("guest-linked")),
                std::fs::metadata(s.join("guest-link")),
            );
            if let (Ok(a), Ok(b)) = (a, b) {
                v.guest_link_count = a.nlink();
                v.guest_same_inode = a.ino() == b.ino();
            }
            v.guest_mode = std::fs::metadata(s.join("guest-mode"))
                .map(|m| m.mode() & 0o7777)
                .unwrap_or(0);
            // The host's operations.
            std::fs::create_dir(s.join("host-dir")).unwrap();
            std::fs::rename(s.join("host-rename-me"), s.join("host-renamed")).unwrap();
            std::fs::remove_file(s.join("host-unlink-me")).unwrap();
            std::fs::hard_link(s.join("host-file"), s.join("host-link")).unwrap();
            std::fs::set_permissions(
                s.join("host-chmod-me"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
            std::fs::write(s.join("phase2-done"), "").unwrap();
        },
    );

    assert_eq!(
        out.status,
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    let v = view.lock().unwrap();
    assert!(v.phase1_seen, "the guest never finished phase 1");
    assert!(v.guest_dir, "the guest's mkdir");
    assert!(
        v.guest_renamed && v.guest_old_name_gone,
        "the guest's rename"
    );
    assert!(v.guest_unlinked, "the guest's unlink");
    assert_eq!(v.guest_link_count, 2, "the guest's hard link");
    assert!(
        v.guest_same_inode,
        "the guest's hard link is the same inode"
    );
    assert_eq!(v.guest_mode, 0o751, "the guest's chmod");
    for seen in [
        "SEEN-HOST-MKDIR",
        "SEEN-HOST-RENAME",
        "SEEN-HOST-UNLINK",
        "HOST-LINK-COUNT 2 2",
        "SEEN-HOST-LINK-SAME-INODE",
        "HOST-MODE 600",
        "FS-OPS-DONE",
    ] {
        assert!(out.stdout.contains(seen), "{seen} missing:\n{}", out.stdout);
    }
    assert_eq!(
        std::fs::read_to_string(share.join("host-file")).unwrap(),
        "changed-by-guest\n",
        "a write through the guest's hard link reaches the host's file"
    );
}

#[test]
fn a_64_mib_file_keeps_its_checksum_from_host_to_guest_and_back_to_the_host() {
    let Some((_dir, img, share)) = setup("e2e_share_64m") else {
        return;
    };
    // Incompressible, not a pattern a short read could fake.
    let mut data = vec![0u8; 64 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(share.join("host.bin"), &data).unwrap();
    drop(data);
    let host_sum = md5(&share.join("host.bin"));
    // The guest copies the host's file into its RAM in 1 MiB reads and sums it there, then
    // writes it back under a new name in 1 MiB writes; the host sums what arrived. (Through
    // /tmp, so no server-side copy could stand in for the two transfers.)
    let script = "set -e; cd /mnt/host; t0=$(date +%s); \
                  dd if=host.bin of=/tmp/h.bin bs=1M 2>/dev/null; t1=$(date +%s); \
                  echo \"GUEST-SUM-OF-HOST $(md5sum /tmp/h.bin | cut -c1-32)\"; \
                  dd if=/tmp/h.bin of=guest.bin bs=1M 2>/dev/null; t2=$(date +%s); \
                  echo \"SECONDS read=$((t1 - t0)) write=$((t2 - t1))\"; \
                  echo BIG-DONE";

    let out = remio_exec(
        script,
        &["--disk", path_str(&img), "--share", path_str(&share)],
    );

    assert_eq!(
        out.status,
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stdout
            .contains(&format!("GUEST-SUM-OF-HOST {host_sum}")),
        "host sum {host_sum}:\n{}",
        out.stdout
    );
    assert_eq!(
        std::fs::metadata(share.join("guest.bin")).unwrap().len(),
        64 << 20
    );
    assert_eq!(md5(&share.join("guest.bin")), host_sum);
}

#[test]
fn a_share_that_is_not_a_directory_fails_at_once_naming_the_flag() {
    if !prerequisites("e2e_share_bad") {
        return;
    }
    let (dir, _img) = temp_image(1 << 20);
    let missing = dir.as_path().join("no-such-dir");

    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_remio"))
        .args(["run", "--exec", "true", "--share", path_str(&missing)])
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--share") && stderr.contains("no-such-dir"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}
