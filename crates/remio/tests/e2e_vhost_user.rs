//! virtio-fs through remio's vhost-user device, served by a real virtiofsd: `remio run
//! --config` with a disk and an `fs` device whose daemon shares a temp dir; the guest mounts it
//! (`mount -t virtiofs`), reads a file the host wrote and writes one the host then reads. Then
//! the daemon is killed while the guest uses the share: the guest gets errors (not a hang) and
//! remio keeps serving the disk.
//!
//! virtiofsd comes from scripts/setup (`cargo install --locked` into target/tools/bin);
//! `REMIO_VIRTIOFSD` names another binary. Without it the test skips loudly (fails with
//! REMIO_REQUIRE_GUEST=1, as the other guest tests).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod e2e_common;
use e2e_common::*;

/// The daemon, killed when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts virtiofsd on `share`, listening at `sock`, and waits for the socket.
fn start_virtiofsd(bin: &Path, sock: &Path, share: &Path) -> Daemon {
    let child = Command::new(bin)
        .arg(format!("--socket-path={}", path_str(sock)))
        .arg(format!("--shared-dir={}", path_str(share)))
        // No namespaces or seccomp filter: the test runs in containers that may not allow them.
        .args(["--sandbox=none", "--seccomp=none", "--cache=never"])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawning virtiofsd");
    let daemon = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "virtiofsd never created {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon
}

fn config(dir: &Path, img: &Path, sock: &Path) -> PathBuf {
    disk_and_dm1_config(
        dir,
        img,
        &format!(
            "type = \"fs\"\nsocket = \"{}\"\ntag = \"hostshare\"\n",
            path_str(sock)
        ),
    )
}

/// The host's word to the guest: `mark` in the last 4 KiB block of the disk image, which the
/// guest reads through remio's block device (nothing else uses that block).
fn mark_disk(img: &Path, mark: &str) {
    use std::io::{Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    let mut block = vec![0u8; 4096];
    block[..mark.len()].copy_from_slice(mark.as_bytes());
    file.seek(SeekFrom::End(-4096)).unwrap();
    file.write_all(&block).unwrap();
    file.sync_all().unwrap();
}

/// Guest shell that waits (up to 60 s, then fails with exit 17) until the disk's last 4 KiB
/// block starts with `mark` (see [`mark_disk`]; the image is 16 MiB).
fn wait_for_disk_mark(mark: &str) -> String {
    format!(
        "n=0; until [ \"$(dd if=/dev/vda bs=4096 skip=4095 count=1 iflag=direct 2>/dev/null \
           | head -c {})\" = {mark} ]; do n=$((n+1)); \
           [ $n -lt 600 ] || {{ echo NO-HOST-MARK; exit 17; }}; sleep 0.1; done; ",
        mark.len()
    )
}

fn setup(test: &str) -> Option<(PathBuf, vmm_sys_util::tempdir::TempDir, PathBuf, PathBuf)> {
    if !prerequisites(test) {
        return None;
    }
    let bin = daemon_or_skip(test, "REMIO_VIRTIOFSD", "virtiofsd")?;
    let (dir, img) = temp_image(16 << 20);
    let share = dir.as_path().join("share");
    std::fs::create_dir(&share).unwrap();
    Some((bin, dir, img, share))
}

#[test]
fn the_guest_reads_a_host_file_and_writes_one_the_host_reads_through_virtiofsd() {
    let Some((bin, dir, img, share)) = setup("e2e_vhost_user") else {
        return;
    };
    std::fs::write(share.join("from-host.txt"), "host-wrote-4711\n").unwrap();
    let sock = dir.as_path().join("virtiofsd.sock");
    let _daemon = start_virtiofsd(&bin, &sock, &share);
    let config = config(dir.as_path(), &img, &sock);
    let script = "mount -t virtiofs hostshare /mnt || exit 11; \
                  echo \"READ:$(cat /mnt/from-host.txt)\"; \
                  echo guest-wrote-0815 > /mnt/from-guest.txt || exit 12; \
                  sync; umount /mnt || exit 13; echo FS-DONE";

    let out = remio_exec(script, &["--config", path_str(&config)]);

    assert_eq!(
        out.status,
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stdout.contains("READ:host-wrote-4711"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("FS-DONE"), "{}", out.stdout);
    assert_eq!(
        std::fs::read_to_string(share.join("from-guest.txt")).unwrap(),
        "guest-wrote-0815\n"
    );
}

#[test]
fn a_killed_virtiofsd_gives_the_guest_errors_and_remio_keeps_serving_the_disk() {
    let Some((bin, dir, img, share)) = setup("e2e_vhost_user_kill") else {
        return;
    };
    std::fs::write(share.join("f.txt"), "before\n").unwrap();
    let sock = dir.as_path().join("virtiofsd.sock");
    let mut daemon = start_virtiofsd(&bin, &sock, &share);
    let config = config(dir.as_path(), &img, &sock);
    // The guest tells the host when to kill the daemon by creating a file in the share (the
    // host kills it as soon as the file exists, so `touch`'s own later request may already
    // fail); the host says when the daemon is gone by marking the disk, and the guest then
    // uses the share again.
    let script = format!(
        "mount -t virtiofs hostshare /mnt || exit 11; \
         echo \"BEFORE:$(cat /mnt/f.txt)\"; \
         touch /mnt/kill-now; {} \
         if cat /mnt/f.txt; then echo AFTER-READ-OK; else echo AFTER-READ-FAILED; fi; \
         if ls /mnt/new-name; then echo LOOKUP-OK; else echo LOOKUP-FAILED; fi; \
         dd if=/dev/vda of=/dev/null bs=4096 count=64 && echo DISK-OK",
        wait_for_disk_mark("DAEMON-GONE")
    );
    let share_watch = share.clone();
    let out = remio_exec_with(&script, &["--config", path_str(&config)], |_| {
        let deadline = Instant::now() + GUEST_TIMEOUT;
        while !share_watch.join("kill-now").exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = daemon.0.kill();
        let _ = daemon.0.wait();
        mark_disk(&img, "DAEMON-GONE");
    });

    assert_eq!(
        out.status,
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    assert!(out.stdout.contains("BEFORE:before"), "{}", out.stdout);
    assert!(out.stdout.contains("AFTER-READ-FAILED"), "{}", out.stdout);
    assert!(out.stdout.contains("LOOKUP-FAILED"), "{}", out.stdout);
    assert!(out.stdout.contains("DISK-OK"), "{}", out.stdout);
    assert!(
        out.stderr.contains("device needs reset") || out.stdout.contains("device needs reset"),
        "remio says the daemon went away:\n{}",
        out.stderr
    );
}

#[test]
fn after_virtiofsd_is_killed_and_restarted_a_rebound_device_serves_a_new_mount() {
    let Some((bin, dir, img, share)) = setup("e2e_vhost_user_restart") else {
        return;
    };
    std::fs::write(share.join("f.txt"), "served\n").unwrap();
    let sock = dir.as_path().join("virtiofsd.sock");
    let first = start_virtiofsd(&bin, &sock, &share);
    let config = config(dir.as_path(), &img, &sock);
    // The first daemon dies under a mounted share; the guest unmounts it, and once the host
    // has a new daemon listening (it marks the disk then), unbinds and binds the device (the
    // reset and re-activation that make remio connect again) and mounts the share anew.
    let script = format!(
        "mount -t virtiofs hostshare /mnt || exit 11; \
         echo \"BEFORE:$(cat /mnt/f.txt)\"; \
         touch /mnt/kill-now; {} \
         cat /mnt/f.txt >/dev/null 2>&1 || echo DEAD-READ-FAILED; \
         umount /mnt || umount -l /mnt || exit 12; \
         drv=/sys/bus/virtio/drivers/virtiofs; \
         d=$(cd $drv && ls -d virtio* | head -1); echo \"DEVICE $d\"; \
         echo $d > $drv/unbind || exit 13; \
         echo $d > $drv/bind || exit 14; \
         mount -t virtiofs hostshare /mnt || exit 15; \
         echo \"AFTER:$(cat /mnt/f.txt)\"; \
         echo second-life > /mnt/after.txt || exit 16; \
         umount /mnt; echo RESTART-DONE",
        wait_for_disk_mark("DAEMON-BACK")
    );
    let share_watch = share.clone();
    let img_w = img.clone();
    let second: Arc<Mutex<Option<Daemon>>> = Arc::default();
    let second_w = Arc::clone(&second);
    let out = remio_exec_with(&script, &["--config", path_str(&config)], move |_| {
        let mut first = first;
        let deadline = Instant::now() + GUEST_TIMEOUT;
        while !share_watch.join("kill-now").exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = first.0.kill();
        let _ = first.0.wait();
        let _ = std::fs::remove_file(&sock);
        *second_w.lock().unwrap() = Some(start_virtiofsd(&bin, &sock, &share_watch));
        mark_disk(&img_w, "DAEMON-BACK");
    });

    assert_eq!(
        out.status,
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    assert!(out.stdout.contains("BEFORE:served"), "{}", out.stdout);
    assert!(out.stdout.contains("DEAD-READ-FAILED"), "{}", out.stdout);
    assert!(out.stdout.contains("AFTER:served"), "{}", out.stdout);
    assert!(out.stdout.contains("RESTART-DONE"), "{}", out.stdout);
    assert_eq!(
        std::fs::read_to_string(share.join("after.txt")).unwrap(),
        "second-life\n"
    );
    assert!(
        out.stderr.contains("reconnected to the daemon"),
        "remio says it reconnected:\n{}",
        out.stderr
    );
    drop(second);
}

#[test]
fn a_bao_virtio_dm_yaml_with_block_console_and_a_vhost_user_fs_runs_end_to_end() {
    let Some((bin, dir, img, share)) = setup("e2e_vhost_user_yaml") else {
        return;
    };
    std::fs::write(&img, vec![0xa5; 16 << 20]).unwrap();
    std::fs::write(share.join("yaml.txt"), "from-yaml-share\n").unwrap();
    // bao-virtio-dm's socket rule: <socket_path><Type><id>.sock.
    let prefix = format!("{}/", path_str(dir.as_path()));
    let sock = dir.as_path().join("Fs2.sock");
    let _daemon = start_virtiofsd(&bin, &sock, &share);
    let alias = dir.as_path().join("console");
    let config = dir.as_path().join("devices.yaml");
    std::fs::write(
        &config,
        format!(
            "devices:\n\
             \x20 - id: 0\n    type: block\n    shmem_addr: 0x0\n    mmio_addr: 0x10000000\n    \
             data_plane: virtio\n    file_path: {img}\n\
             \x20 - id: 1\n    type: console\n    mmio_addr: 0x10000200\n    data_plane: virtio\n    \
             pty_alias: {alias}\n\
             \x20 - id: 2\n    type: fs\n    mmio_addr: 0x10000400\n    data_plane: vhost_user\n    \
             socket_path: {prefix}\n",
            img = path_str(&img),
            alias = path_str(&alias),
        ),
    )
    .unwrap();
    // The YAML fs device has no tag key: its tag is fs<id>.
    let script = "echo \"DISK $(dd if=/dev/vda bs=1 count=1 2>/dev/null | od -An -tx1)\"; \
                  mount -t virtiofs fs2 /mnt || exit 11; \
                  echo \"SHARE:$(cat /mnt/yaml.txt)\"; \
                  n=0; while [ ! -e /mnt/console-seen ] && [ $n -lt 80 ]; do \
                  echo CONSOLE-HELLO > /dev/hvc0; sleep 0.25; n=$((n + 1)); done; \
                  [ -e /mnt/console-seen ] && echo CONSOLE-ACKED; umount /mnt; echo YAML-DONE";
    let share_w = share.clone();
    let out = remio_exec_with(script, &["--config", path_str(&config)], move |_| {
        // The console's PTY: read what the guest writes to hvc0, then tell it through the
        // share.
        let deadline = Instant::now() + GUEST_TIMEOUT;
        while !alias.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let Ok(mut pty) = std::fs::File::open(&alias) else {
            return;
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut buf = [0u8; 256];
            while let Ok(n) = std::io::Read::read(&mut pty, &mut buf) {
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&seen).contains("CONSOLE-HELLO") {
                    let _ = tx.send(());
                    break;
                }
            }
        });
        if rx.recv_timeout(GUEST_TIMEOUT).is_ok() {
            std::fs::write(share_w.join("console-seen"), "").unwrap();
        }
    });

    assert_eq!(
        out.status,
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stdout.contains("DISK  a5") || out.stdout.contains("DISK a5"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("SHARE:from-yaml-share"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("CONSOLE-ACKED"), "{}", out.stdout);
    assert!(out.stdout.contains("YAML-DONE"), "{}", out.stdout);
}
