//! A device model SIGKILLed five times under an fsync-heavy ext4 workload comes back without the
//! guest noticing: `remio run` restarts it, it resumes the virtio-blk device from the state
//! region, takes again the requests that were in flight, and the guest sees only pauses. The
//! last file whose fsync returned under each name is intact on the host afterwards, and e2fsck
//! finds the file system clean.
//!
//! The same workload with one `remio dm --takeover` upgrade in the middle (a new device model,
//! started by hand with the running one's config and socket, replaces it): no error either,
//! and `remio run` does not take the old one's clean exit for a crash to restart from.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod e2e_common;
use e2e_common::*;

const KILLS: usize = 5;

/// How many names the fsync workload's files rotate over: 256 x 64 KiB, a quarter of its image.
const FILE_SLOTS: u32 = 256;

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

/// The fsync workload on a fresh ext4 image, with `during(remio pid, image)` run meanwhile;
/// checks that the guest finished with no I/O error, that e2fsck finds the image clean and that
/// every fsynced file is intact on the host. Returns remio's output and the guest's file
/// write times in ms, sorted.
fn fsync_workload(test: &str, during: impl FnOnce(u32, &Path)) -> Option<(RunOutput, Vec<u64>)> {
    if !prerequisites(test) {
        return None;
    }
    let (dir, img) = temp_image(64 << 20);
    let mkfs = Command::new(host_tool(test, "mkfs.ext4").expect("e2fsprogs"))
        .args(["-q", "-F"])
        .arg(&img)
        .status()
        .unwrap();
    assert!(mkfs.success());
    // Files of random data, each written with fsync, for 25 s of guest time: beyond the
    // kills. The guest's uptime (centiseconds) frames each write. The files rotate over
    // FILE_SLOTS names, so a faster guest rewrites them instead of filling the image (which
    // would be ENOSPC, not lost data); a failed write reports dd's own message.
    let script = format!(
        "cs() {{ read u _ < /proc/uptime; echo ${{u%.*}}${{u#*.}}; }}; \
         mount -t ext4 /dev/vda /mnt || exit 10; end=$(( $(cs) + 2500 )); n=0; \
         while [ $(cs) -lt $end ]; do t0=$(cs); f=/mnt/f$((n % {FILE_SLOTS})); \
           dd if=/dev/urandom of=$f bs=16384 count=4 conv=fsync 2>/tmp/dd.err \
             || {{ echo \"IOERR $n $(head -n1 /tmp/dd.err)\"; break; }}; \
           echo FILE $n $(md5sum < $f | cut -d' ' -f1) $t0 $(cs); n=$((n+1)); \
         done; umount /mnt || echo UMOUNT-FAILED; sync; \
         echo IOERRORS $(dmesg | grep -ci 'i/o error')"
    );
    let out = remio_exec_with(
        &script,
        &[
            "--disk",
            path_str(&img),
            "--no-console",
            "--no-rng",
            "--access-timeout-ms",
            "20000",
        ],
        |pid| during(pid, &img),
    );

    assert_eq!(out.status, Some(0), "the guest did not finish its script");
    let failed = out.stdout.lines().find(|l| l.starts_with("IOERR "));
    assert!(failed.is_none(), "a write failed in the guest: {failed:?}");
    assert!(!out.stdout.contains("UMOUNT-FAILED"));
    assert!(
        out.stdout.lines().any(|l| l == "IOERRORS 0"),
        "the guest's kernel logged I/O errors"
    );
    let written = files(&out.stdout);
    assert!(
        written.len() > KILLS,
        "only {} files written",
        written.len()
    );
    let fsck = Command::new(host_tool(test, "e2fsck").expect("e2fsprogs"))
        .arg("-fn")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    // Each slot holds the last file written to it.
    let mut last = std::collections::BTreeMap::new();
    for (n, sum, _, _) in &written {
        last.insert(n % FILE_SLOTS, (n, sum));
    }
    let debugfs = host_tool(test, "debugfs").expect("e2fsprogs");
    for (slot, (n, sum)) in last {
        let dumped = dir.as_path().join(format!("f{slot}"));
        debugfs_dump(&debugfs, &img, &format!("/f{slot}"), &dumped);
        assert_eq!(
            &md5_of(&dumped),
            sum,
            "file f{slot} (write {n}) differs on the host"
        );
    }
    let mut ms: Vec<u64> = written.iter().map(|f| (f.3 - f.2) * 10).collect();
    ms.sort_unstable();
    Some((out, ms))
}

/// Waits (bounded) until the guest has written to `img`.
fn wait_guest_writes(img: &Path) {
    let mtime = || std::fs::metadata(img).unwrap().modified().unwrap();
    let before = mtime();
    let start = Instant::now();
    while mtime() == before {
        assert!(
            start.elapsed() < GUEST_TIMEOUT * 3 / 4,
            "the guest never wrote"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn sigkilled_device_models_are_restarted_and_the_guest_sees_no_error() {
    let mut kills = 0;
    let Some((out, ms)) = fsync_workload("e2e_dm_restart", |pid, img| {
        let mut dm = wait_dm(pid, None);
        // Wait until the guest writes, then kill every second or so.
        wait_guest_writes(img);
        for i in 0..KILLS {
            std::thread::sleep(Duration::from_millis(700 + 300 * (i as u64 % 3)));
            // SAFETY: kill(2) on our child's child, found just now; no memory involved.
            assert_eq!(unsafe { libc::kill(dm, libc::SIGKILL) }, 0);
            kills += 1;
            dm = wait_dm(pid, Some(dm));
        }
    }) else {
        return;
    };

    assert_eq!(kills, KILLS);
    assert_eq!(
        out.stderr.matches("restarting it in").count(),
        KILLS,
        "remio run restarted the device model once per kill"
    );
    // Each kill shows as one slow write: the KILLS slowest are the guest-visible pauses.
    let pauses = &ms[ms.len() - KILLS..];
    eprintln!(
        "e2e_dm_restart: {} files, {KILLS} kills; the {KILLS} slowest writes (ms): {pauses:?}, \
         median write {} ms",
        ms.len(),
        ms[ms.len() / 2]
    );
}

/// The `--config` and `--socket` arguments of the running `remio dm` `pid`.
fn dm_args(pid: i32) -> Vec<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let words: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    let mut args = Vec::new();
    for flag in ["--config", "--socket"] {
        let i = words.iter().position(|w| w == flag).expect(flag);
        args.push(flag.to_owned());
        args.push(words[i + 1].clone());
    }
    args
}

#[test]
fn a_takeover_upgrade_under_the_workload_is_invisible_to_the_guest() {
    let mut upgraded = None;
    let Some((out, ms)) = fsync_workload("e2e_dm_restart", |pid, img| {
        let old = wait_dm(pid, None);
        wait_guest_writes(img);
        std::thread::sleep(Duration::from_millis(1500));
        // The upgrade, as a user makes it: a new `remio dm` on the same config and socket.
        let new = Command::new(env!("CARGO_BIN_EXE_remio"))
            .arg("dm")
            .args(dm_args(old))
            .arg("--takeover")
            .arg(old.to_string())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        upgraded = Some(new);
    }) else {
        return;
    };
    // It served until the platform went away with `remio run`, then ended its sessions.
    let mut new = upgraded.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = new.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = new.kill();
            let _ = new.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };

    assert!(
        status.is_some_and(|st| st.success()),
        "the new device model did not end cleanly with the platform: {status:?}"
    );
    assert!(
        out.stderr.contains("exited on request"),
        "remio run saw the old device model hand over"
    );
    assert_eq!(
        out.stderr.matches("restarting it in").count()
            + out.stderr.matches("starting one (").count(),
        0,
        "remio run started no device model of its own"
    );
    eprintln!(
        "e2e_dm_restart: takeover: {} files; the slowest write (the pause) {} ms, median write \
         {} ms",
        ms.len(),
        ms[ms.len() - 1],
        ms[ms.len() / 2]
    );
}

/// `IOPAUSE slow at_ms=<f> ms=<f> ...` lines of iopause (guest/tools/iopause.c): when each
/// slow I/O started (ms since its start) and how long it took.
fn slow_ios(stdout: &str) -> Vec<(f64, f64)> {
    stdout
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("IOPAUSE slow ")?.split_whitespace();
            Some((
                w.next()?.strip_prefix("at_ms=")?.parse().ok()?,
                w.next()?.strip_prefix("ms=")?.parse().ok()?,
            ))
        })
        .collect()
}

/// Which slow I/O (index into `slow`) each kill (ms since the test's clock origin) fell in.
/// The guest's clock has an unknown offset from ours: the offset is the one that puts the most
/// kills inside a slow I/O (with `tol` ms of slack each side), tried from every slow I/O as the
/// first kill's. Every candidate offset puts the first kill on a slow I/O, so an offset that
/// places fewer than two kills says nothing: then no kill is matched.
fn match_kills(kills: &[f64], slow: &[(f64, f64)], tol: f64) -> Vec<Option<usize>> {
    let place = |off: f64| -> Vec<Option<usize>> {
        kills
            .iter()
            .map(|&k| {
                let g = k + off;
                slow.iter()
                    .position(|&(at, ms)| at - tol <= g && g <= at + ms + tol)
            })
            .collect()
    };
    let Some(&first) = kills.first() else {
        return Vec::new();
    };
    slow.iter()
        .map(|&(at, ms)| place(at + ms / 2.0 - first))
        .filter(|m| m.iter().filter(|x| x.is_some()).count() >= 2)
        .max_by_key(|m| m.iter().filter(|x| x.is_some()).count())
        .unwrap_or_else(|| vec![None; kills.len()])
}

/// The guest-visible pause of a restart, measured finely: in the guest `iopause` issues 4 KiB
/// O_DIRECT writes and reads one at a time and times each (CLOCK_MONOTONIC), so a restart shows
/// as the one I/O that waited for it; the host SIGKILLs the device model five times and logs
/// when. Each kill is matched to the slow I/O it fell in; the test prints those pauses, the
/// slowest I/O no kill explains (the machine's own noise) and `remio run`'s host-side gaps
/// ("served again N ms after the device model died"). No assertion on time (a loaded machine
/// is not an idle one): it checks that the guest saw no error and the restarts happened. Run
/// with `--release` for the figure in docs/performance.md.
#[test]
fn the_guest_visible_pause_of_each_restart_is_measured_with_direct_io() {
    if !prerequisites("e2e_dm_restart") {
        return;
    }
    // Checked before the boot: without the tool the guest never writes, and the wait for its
    // first write would fail first, saying less.
    let initramfs = std::fs::read(guest_dir().join("initramfs.cpio")).unwrap();
    assert!(
        initramfs.windows(11).any(|w| w == b"bin/iopause"),
        "the guest image in {} has no iopause: run `remio guest build`",
        guest_dir().display()
    );
    let (_dir, img) = temp_image(16 << 20);
    let script = "command -v iopause >/dev/null || \
                    { echo 'IOPAUSE-MISSING: rebuild the guest (remio guest build)'; exit 9; }; \
                  iopause /dev/vda 20 256 20; echo \"IOPAUSE-STATUS $?\"; \
                  echo IOERRORS $(dmesg | grep -ci 'i/o error')";
    let origin = Instant::now();
    let mut kills_ms = Vec::new();
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
            wait_guest_writes(&img);
            for i in 0..KILLS {
                // Spacing, not synchronisation: the kills land at different points of the loop.
                std::thread::sleep(Duration::from_millis(900 + 350 * (i as u64 % 3)));
                // SAFETY: kill(2) on our child's child, found just now; no memory involved.
                assert_eq!(unsafe { libc::kill(dm, libc::SIGKILL) }, 0);
                kills_ms.push(origin.elapsed().as_secs_f64() * 1000.0);
                dm = wait_dm(pid, Some(dm));
            }
        },
    );

    assert!(
        !out.stdout.contains("IOPAUSE-MISSING"),
        "the guest image has no iopause: run `remio guest build`"
    );
    assert_eq!(out.status, Some(0), "the guest did not finish its script");
    assert!(
        out.stdout.contains("IOPAUSE-STATUS 0"),
        "iopause saw an error"
    );
    assert!(
        out.stdout.lines().any(|l| l == "IOERRORS 0"),
        "the guest's kernel logged I/O errors"
    );
    assert_eq!(kills_ms.len(), KILLS);
    assert_eq!(
        out.stderr.matches("restarting it in").count(),
        KILLS,
        "remio run restarted the device model once per kill"
    );
    let slow = slow_ios(&out.stdout);
    let matched = match_kills(&kills_ms, &slow, 30.0);
    let pauses: Vec<String> = matched
        .iter()
        .map(|m| m.map_or("?".to_owned(), |i| format!("{:.1}", slow[i].1)))
        .collect();
    let noise = slow
        .iter()
        .enumerate()
        .filter(|(i, _)| !matched.contains(&Some(*i)))
        .map(|(_, s)| s.1)
        .fold(0.0f64, f64::max);
    let host: Vec<&str> = out
        .stderr
        .lines()
        .filter_map(|l| l.split("served again ").nth(1)?.split(" ms").next())
        .collect();
    let done = out
        .stdout
        .lines()
        .find(|l| l.starts_with("IOPAUSE done"))
        .unwrap_or("IOPAUSE done: missing");
    eprintln!(
        "e2e_dm_restart: iopause: {KILLS} kills; guest-visible pause per kill (ms; ?: not \
         matched to a slow I/O, so at most the run's max_ms, under 20 ms unless a slow I/O is \
         unexplained): [{}]; slowest unmatched I/O {noise:.1} ms; host-side gap per kill (ms): \
         [{}]; {done}",
        pauses.join(", "),
        host.join(", ")
    );
}
