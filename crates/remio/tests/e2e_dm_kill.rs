//! A device model killed with SIGKILL in the middle of a dd leaves the guest alive: its I/O
//! fails (errors, not a hang), the guest finishes its script and powers off, and the platform
//! keeps serving until then.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

mod e2e_common;
use e2e_common::*;

/// The pid of `parent`'s child whose command line contains ` dm `.
fn dm_child(parent: u32) -> Option<i32> {
    let children =
        std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.split(|&b| b == 0).any(|w| w == b"dm"))
        })
}

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
    let out = remio_exec_with(
        script,
        &[
            "--disk",
            path_str(&img),
            "--no-console",
            "--no-rng",
            "--access-timeout-ms",
            "2000",
        ],
        |pid| {
            // Give the guest time to boot and start writing, then kill the device model.
            let start = Instant::now();
            let dm = loop {
                if let Some(dm) = dm_child(pid) {
                    break Some(dm);
                }
                if start.elapsed() > Duration::from_secs(30) {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            let dm = dm.expect("remio run started no device-model process");
            std::thread::sleep(Duration::from_secs(10));
            // SAFETY: kill(2) on a pid we just found as our child's child; no memory involved.
            let r = unsafe { libc::kill(dm, libc::SIGKILL) };
            assert_eq!(r, 0);
        },
    );
    assert_eq!(out.status, Some(0), "guest did not finish its script");
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
