//! A device model SIGKILLed five times under an fsync-heavy ext4 workload comes back without the
//! guest noticing: `remio run` restarts it, it resumes the virtio-blk device from the state
//! region, takes again the requests that were in flight, and the guest sees only pauses. Every
//! file whose fsync returned is intact on the host afterwards, and e2fsck finds the file system
//! clean.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

mod e2e_common;
use e2e_common::*;

const KILLS: usize = 5;

/// Waits (bounded) for a device-model child of `parent` other than `not`.
fn wait_dm(parent: u32, not: Option<i32>) -> i32 {
    let start = Instant::now();
    loop {
        if let Some(dm) = dm_child(parent).filter(|&p| Some(p) != not) {
            return dm;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no (new) device-model process under remio run"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `FILE <n> <md5> <t0> <t1>`: file n's checksum once its fsync returned, and the guest's
/// uptime (centiseconds) around its write.
fn files(stdout: &str) -> Vec<(u32, String, u64, u64)> {
    stdout
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("FILE ")?.split_whitespace();
            Some((
                w.next()?.parse().ok()?,
                w.next()?.to_owned(),
                w.next()?.parse().ok()?,
                w.next()?.parse().ok()?,
            ))
        })
        .collect()
}

#[test]
fn sigkilled_device_models_are_restarted_and_the_guest_sees_no_error() {
    if !prerequisites("e2e_dm_restart") {
        return;
    }
    let (dir, img) = temp_image(64 << 20);
    let mkfs = Command::new(host_tool("e2e_dm_restart", "mkfs.ext4").expect("e2fsprogs"))
        .args(["-q", "-F"])
        .arg(&img)
        .status()
        .unwrap();
    assert!(mkfs.success());
    // Files of random data, each written with fsync, for 25 s of guest time: beyond the five
    // kills. The guest's uptime (centiseconds) frames each write.
    let script = "cs() { read u _ < /proc/uptime; echo ${u%.*}${u#*.}; }; \
                  mount -t ext4 /dev/vda /mnt || exit 10; end=$(( $(cs) + 2500 )); n=0; \
                  while [ $(cs) -lt $end ]; do t0=$(cs); \
                    dd if=/dev/urandom of=/mnt/f$n bs=16384 count=4 conv=fsync 2>/dev/null \
                      || { echo IOERR $n; break; }; \
                    echo FILE $n $(md5sum < /mnt/f$n | cut -d' ' -f1) $t0 $(cs); n=$((n+1)); \
                  done; umount /mnt || echo UMOUNT-FAILED; sync; \
                  echo IOERRORS $(dmesg | grep -ci 'i/o error')";
    let mut kills = Vec::new();
    let out = remio_exec_with(
        script,
        &[
            "--disk",
            path_str(&img),
            "--no-console",
            "--no-rng",
            "--access-timeout-ms",
            "20000",
        ],
        |pid| {
            let mut dm = wait_dm(pid, None);
            // Wait until the guest writes (the image changes), then kill every second or so.
            let mtime = || std::fs::metadata(&img).unwrap().modified().unwrap();
            let before = mtime();
            let start = Instant::now();
            while mtime() == before {
                assert!(
                    start.elapsed() < GUEST_TIMEOUT * 3 / 4,
                    "the guest never wrote"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            for i in 0..KILLS {
                std::thread::sleep(Duration::from_millis(700 + 300 * (i as u64 % 3)));
                // SAFETY: kill(2) on our child's child, found just now; no memory involved.
                assert_eq!(unsafe { libc::kill(dm, libc::SIGKILL) }, 0);
                kills.push(Instant::now());
                dm = wait_dm(pid, Some(dm));
            }
        },
    );

    assert_eq!(kills.len(), KILLS);
    assert_eq!(out.status, Some(0), "the guest did not finish its script");
    assert!(
        !out.stdout.contains("IOERR "),
        "a write failed in the guest"
    );
    assert!(!out.stdout.contains("UMOUNT-FAILED"));
    assert!(
        out.stdout.lines().any(|l| l == "IOERRORS 0"),
        "the guest's kernel logged I/O errors"
    );
    assert_eq!(
        out.stderr.matches("restarting it in").count(),
        KILLS,
        "remio run restarted the device model once per kill"
    );
    let written = files(&out.stdout);
    assert!(
        written.len() > KILLS,
        "only {} files written",
        written.len()
    );
    // Each kill shows as one slow write: the KILLS slowest are the guest-visible pauses.
    let mut ms: Vec<u64> = written.iter().map(|f| (f.3 - f.2) * 10).collect();
    ms.sort_unstable();
    let pauses = &ms[ms.len() - KILLS..];
    eprintln!(
        "e2e_dm_restart: {} files, {KILLS} kills; the {KILLS} slowest writes (ms): {pauses:?}, \
         median write {} ms",
        written.len(),
        ms[ms.len() / 2]
    );

    let fsck = Command::new(host_tool("e2e_dm_restart", "e2fsck").expect("e2fsprogs"))
        .arg("-fn")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    for (n, sum, _, _) in &written {
        let dumped = dir.as_path().join(format!("f{n}"));
        let dump = Command::new(host_tool("e2e_dm_restart", "debugfs").expect("e2fsprogs"))
            .arg("-R")
            .arg(format!("dump /f{n} {}", dumped.display()))
            .arg(&img)
            .output()
            .unwrap();
        assert!(dump.status.success());
        let md5 = Command::new("md5sum").arg(&dumped).output().unwrap();
        let host = String::from_utf8(md5.stdout).unwrap();
        assert_eq!(
            host.split_whitespace().next(),
            Some(sum.as_str()),
            "file f{n} differs on the host"
        );
    }
}
