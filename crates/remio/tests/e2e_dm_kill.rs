//! A device model killed with SIGKILL in the middle of a dd leaves the guest alive: the
//! requests in flight and every later one fail with EIO (the bridge answers the dead device's
//! window as a failed device, `remio_frontend::qemu::Failover`), the guest finishes its script
//! and powers off, and the platform keeps serving until then.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

mod e2e_common;
use e2e_common::*;

#[test]
fn killing_the_device_model_mid_dd_gives_io_errors_not_a_hang() {
    if !prerequisites("e2e_dm_kill") {
        return;
    }
    let (_dir, img) = temp_image(256 << 20);
    // Write in a loop until the I/O fails: whenever the kill lands, the guest is mid-write.
    let script =
        "n=0; while dd if=/dev/zero of=/dev/vda bs=65536 count=64 oflag=direct 2>/dev/null; \
                  do n=$((n+1)); done; echo DD-FAILED-AFTER $n; \
                  dd if=/dev/vda of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null; \
                  echo READ-AFTER $?; echo ALIVE";
    let mut killed_at = None;
    let out = remio_exec_with(
        script,
        &[
            "--disk",
            path_str(&img),
            "--no-console",
            "--no-rng",
            "--access-timeout-ms",
            "2000",
            // The failed-device path: no restart (e2e_dm_restart tests the restart).
            "--dm-restarts",
            "0",
        ],
        |pid| {
            let start = Instant::now();
            let dm = loop {
                if let Some(dm) = dm_child(pid) {
                    break dm;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "remio run started no device-model process"
                );
                std::thread::sleep(Duration::from_millis(100));
            };
            // Wait until the guest is writing (the sparse image gets blocks), let it go on a
            // little, then kill the device model: the guest is mid-dd, whatever the load.
            let writing = loop {
                let blocks = std::fs::metadata(&img).map_or(0, |m| m.blocks());
                if blocks > 0 {
                    break true;
                }
                if start.elapsed() > GUEST_TIMEOUT / 2 {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            assert!(writing, "the guest never wrote to its disk");
            std::thread::sleep(Duration::from_millis(500));
            // SAFETY: kill(2) on a pid we just found as our child's child; no memory involved.
            let r = unsafe { libc::kill(dm, libc::SIGKILL) };
            assert_eq!(r, 0);
            killed_at = Some(Instant::now());
        },
    );
    assert_eq!(out.status, Some(0), "guest did not finish its script");
    // The failure reaches the guest quickly: no access timeout (2 s) per request.
    let after_kill = killed_at.unwrap().elapsed();
    assert!(
        after_kill < GUEST_TIMEOUT / 4,
        "the guest needed {after_kill:?} after the kill to finish"
    );
    assert!(out.stdout.contains("ALIVE"));
    let rounds: u32 = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("DD-FAILED-AFTER "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(rounds > 0, "the disk worked before the kill");
    assert!(
        out.stdout.contains("READ-AFTER 1"),
        "I/O after the kill fails"
    );
}
