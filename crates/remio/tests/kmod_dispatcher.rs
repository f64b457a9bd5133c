//! Stage 2 of the Rust dispatcher module (issue 16, docs/kmod.md): `remio run --dispatcher
//! rust-kmod` boots the frontend VM and a backend VM on Debian's 7.3 kernel running
//! kmod/remio_dispatcher.rs (the Bao I/O dispatcher in Rust) with `remio dm --kernel-driver` on
//! its ioctls, and the frontend runs cdriver_e2e's basic workload through it: probe block,
//! console and rng, write 1 MiB to the disk, drop the caches, read it back and compare, read
//! 1 MiB from /dev/hwrng. The backend's kernel log (its serial console, which `remio run -v`
//! copies to stderr) must hold no WARNING, BUG, refcount or use-after-free report.
//!
//! Gated like kmod_stage1: the module is built by `remio guest build --rust-kmod`, whose cold
//! build takes about 45 minutes (docs/kmod.md), so the test runs only with REMIO_RUST_KMOD=1
//! and otherwise prints a loud SKIPPED line; when asked, it skips loudly if the host cannot
//! build or boot (not root, no debootstrap, no QEMU, no frontend guest), or fails instead under
//! REMIO_REQUIRE_GUEST=1.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

mod e2e_common;
use e2e_common::{
    backend_lines, build_rust_kmod, kernel_trouble, path_str, remio_exec_bounded,
    rust_kmod_prerequisites, temp_image, RunOutput,
};

/// `remio run --timeout` for the frontend: every control-path access crosses the backend VM
/// (about 1.5 ms under TCG) and 1 MiB of virtio-rng is some 50000 of them.
const FRONTEND_TIMEOUT: Duration = Duration::from_secs(300);
/// The test kills `remio run` after this: the backend's start (bounded at 100 s by `remio run`),
/// the frontend's timeout, and some grace.
const RUN_LIMIT: Duration = Duration::from_secs(100 + 300 + 30);

/// `remio run --dispatcher rust-kmod -v --exec script` plus `extra`, bounded by [`RUN_LIMIT`],
/// holding the boot lock.
fn rust_kmod_exec(script: &str, extra: &[&str]) -> RunOutput {
    let guest = e2e_common::guest_dir();
    let mut args = vec![
        "--dispatcher",
        "rust-kmod",
        "-v",
        "--guest-dir",
        path_str(&guest),
    ];
    args.extend_from_slice(extra);
    remio_exec_bounded(script, &args, FRONTEND_TIMEOUT, RUN_LIMIT, |_| {})
}

const PATTERN_LINE: &[u8] = b"remio-c-driver-pattern-0123456789\n";

#[test]
fn through_the_rust_module_the_frontend_probes_its_devices_and_does_disk_and_rng_io() {
    let test = "through_the_rust_module_the_frontend_probes_its_devices_and_does_disk_and_rng_io";
    if !rust_kmod_prerequisites(test, true) {
        return;
    }
    build_rust_kmod().unwrap();

    let (_dir, img) = temp_image(16 << 20);
    let script = r#"
for d in /sys/bus/virtio/devices/*; do echo "VIRTIO $(cat $d/device) $(basename $(readlink $d/driver))"; done
echo "BLOCK $(cat /sys/block/vda/size)"
yes remio-c-driver-pattern-0123456789 | head -c 1048576 > /tmp/p
dd if=/tmp/p of=/dev/vda bs=65536 seek=16 conv=fsync 2>/dev/null && echo WROTE
sync; echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda bs=65536 skip=16 count=16 2>/dev/null > /tmp/r
cmp /tmp/p /tmp/r && echo SAME
echo "RNG $(cat /sys/class/misc/hw_random/rng_current)"
echo "HWRNG $(dd if=/dev/hwrng bs=4096 count=256 iflag=fullblock 2>/dev/null | wc -c)"
"#;
    let out = rust_kmod_exec(script, &["--disk", path_str(&img)]);
    assert_eq!(out.status, Some(0));
    for line in [
        "VIRTIO 0x0002 virtio_blk",
        "VIRTIO 0x0003 virtio_console",
        "VIRTIO 0x0004 virtio_rng",
        "BLOCK 32768",
        "WROTE",
        "SAME",
        "HWRNG 1048576",
    ] {
        assert!(
            out.stdout.lines().any(|l| l.trim() == line),
            "missing `{line}`"
        );
    }
    assert!(out.stdout.contains("RNG virtio_rng"));

    // It was the Rust module on the 7.3 kernel that dispatched.
    let backend = backend_lines(&out.stderr);
    assert!(
        backend.iter().any(|l| l.contains("Linux version 7.3.")),
        "the backend VM did not boot the 7.3 kernel"
    );
    for step in [
        "REMIO-BACKEND-STEP remio_backend ok",
        "REMIO-BACKEND-STEP remio_dispatcher ok",
        "REMIO-BACKEND-STEP /dev/bao-io-dispatcher ok",
    ] {
        assert!(backend.iter().any(|l| l.contains(step)), "missing `{step}`");
    }
    // One DM per device (block, console, rng), each with its own interrupt.
    assert!(
        backend
            .iter()
            .any(|l| l.contains("remio_dispatcher: 3 DMs")),
        "the Rust module did not take the three DMs"
    );
    assert!(
        !backend
            .iter()
            .any(|l| l.contains("bao_io_dispatcher") || l.contains("bao-io-dispatcher.ko")),
        "the posted C driver was loaded"
    );
    let trouble = kernel_trouble(&out.stderr);
    assert!(trouble.is_empty(), "kernel reports: {trouble:#?}");

    let host = std::fs::read(&img).unwrap();
    let expected: Vec<u8> = PATTERN_LINE.iter().copied().cycle().take(1 << 20).collect();
    assert!(
        host[1 << 20..2 << 20] == expected[..],
        "the host image holds the pattern"
    );
    assert!(host[..1 << 20].iter().all(|&b| b == 0));
    assert!(host[2 << 20..].iter().all(|&b| b == 0));
}

/// Rounds of [`STRESS_HOOK`]: each SIGKILLs three DM-fd holders, one per DM.
const STRESS_ROUNDS: usize = 10;

/// The frontend's half of the stress run: disk writes read back with O_DIRECT, and every
/// second iteration every virtio-mmio device unbound and bound again (a virtio reset: the device
/// model deassigns and reassigns its ioeventfds on the module). After each iteration it writes
/// `ITER <n>` to sector 2050 of its disk (the backend's /dev/vda), which the backend hook waits
/// on, and it stops when the hook's done marker is at sector 2049 (or after 40 iterations).
const STRESS_SCRIPT: &str = r#"
drv=/sys/bus/platform/drivers/virtio-mmio
devs=$(ls $drv | grep -v -e bind -e uevent -e module)
echo "DEVICES $(echo $devs | wc -w)"
i=0; seen=0; resets=0
while [ $i -lt 40 ]; do
  dd if=/dev/urandom of=/tmp/p bs=4096 count=16 2>/dev/null
  dd if=/tmp/p of=/dev/vda bs=4096 seek=64 oflag=direct conv=fsync 2>/dev/null || echo "IOERR $i"
  dd if=/dev/vda of=/tmp/q bs=4096 skip=64 count=16 iflag=direct 2>/dev/null
  cmp -s /tmp/p /tmp/q || echo "MISMATCH $i"
  if [ $((i % 2)) -eq 1 ]; then
    for d in $devs; do echo $d > $drv/unbind || echo "UNBIND-FAILED $d"; done
    for d in $devs; do echo $d > $drv/bind || echo "BIND-FAILED $d"; done
    j=0; until [ -b /dev/vda ] || [ $j -ge 100 ]; do sleep 0.1; j=$((j+1)); done
    resets=$((resets+1))
  fi
  i=$((i+1))
  echo "ITER $i" | dd of=/dev/vda bs=512 seek=2050 conv=sync,fsync oflag=direct 2>/dev/null
  if dd if=/dev/vda bs=512 skip=2049 count=1 iflag=direct 2>/dev/null | grep -q REMIO-STRESS-DONE; then
    seen=1; break
  fi
done
echo "ITERATIONS $i RESETS $resets SEEN $seen"
echo "BOUND $(ls $drv | grep -v -e bind -e uevent -e module | wc -l)"
echo "HWRNG $(dd if=/dev/hwrng bs=4096 count=4 iflag=fullblock 2>/dev/null | wc -c)"
"#;

/// The backend's half (sourced by its `/init` before `remio dm` starts): round r waits until
/// the frontend has done r+1 iterations (its `ITER` marker), then starts three processes
/// (guest/backend/tools/baodefect), one per DM, each of which opens the DM through DM_GET_INFO,
/// assigns, deassigns and assigns again an ioeventfd at offset 0x1f0 of the DM's window (no
/// register the frontend writes) and holds its DM fd; once all three have printed their line,
/// it SIGKILLs them and waits for them. Every round uses the same addresses: a holder's
/// ioeventfd must go with its session, or the next round's assign gets EEXIST. After the last
/// round it writes REMIO-STRESS-DONE for the frontend.
const STRESS_HOOK: &str =
    "( wait_line() { i=0; until grep -q \"$2\" $1 2>/dev/null || [ $i -ge $3 ]; do \
       usleep 100000; i=$((i+1)); done; }; \
     r=0; while [ $r -lt 10 ]; do \
       k=0; until [ \"$(dd if=/dev/vda bs=512 skip=2050 count=1 iflag=direct 2>/dev/null \
           | head -c 16 | tr -dc 0-9)\" -gt $r ] 2>/dev/null || [ $k -ge 1200 ]; do \
         usleep 200000; k=$((k+1)); done; \
       pids=; for dm in 0 1 2; do \
         baodefect deassign $dm $((0x10000000 + dm * 0x200 + 0x1f0)) > /tmp/h.$r.$dm & \
         pids=\"$pids $!\"; done; \
       for dm in 0 1 2; do wait_line /tmp/h.$r.$dm REMIO-DEFECT 300; \
         echo \"REMIO-STRESS dm=$dm $(cat /tmp/h.$r.$dm)\"; done; \
       kill -9 $pids; wait $pids; echo REMIO-STRESS-ROUND $r; r=$((r+1)); done; \
     echo REMIO-STRESS-DONE | dd of=/dev/vda bs=512 seek=2049 conv=sync,fsync oflag=direct \
       2>/dev/null; \
     echo REMIO-STRESS-HOOK-DONE ) &\n";

/// A stress run inside the backend VM: while the frontend does disk I/O and resets its devices
/// (ten unbind/bind rounds of all three), [`STRESS_ROUNDS`] times three processes holding a DM
/// fd with an ioeventfd assigned are SIGKILLed (on the posted C driver, a DM fd's release
/// destroys the DM and releases an fd number already installed; spec/remote-io.md's defects),
/// while the device model keeps its own DM fds. Afterwards the frontend's data are intact,
/// every device is bound and works, every holder's assigns succeeded at the same address as
/// the killed one's (its ioeventfd went with its session, though the DM fd of the device model
/// stayed open), and the backend's kernel log holds no WARNING, BUG, refcount, use-after-free,
/// Oops, Call Trace, general protection or panic line.
#[test]
fn on_the_rust_module_sigkilled_dm_holders_and_device_resets_during_io_leave_the_kernel_clean() {
    let test = "on_the_rust_module_sigkilled_dm_holders_and_device_resets_during_io_leave_the_kernel_clean";
    if !rust_kmod_prerequisites(test, true) {
        return;
    }
    build_rust_kmod().unwrap();
    let (dir, img) = temp_image(16 << 20);
    let hook = dir.as_path().join("backend.sh");
    std::fs::write(&hook, STRESS_HOOK).unwrap();
    let out = rust_kmod_exec(
        STRESS_SCRIPT,
        &["--disk", path_str(&img), "--backend-hook", path_str(&hook)],
    );
    eprintln!("{}", out.stdout);
    assert_eq!(out.status, Some(0));
    let backend = backend_lines(&out.stderr);
    let rounds = backend
        .iter()
        .filter(|l| l.contains("REMIO-STRESS-ROUND"))
        .count();
    assert_eq!(rounds, STRESS_ROUNDS, "every round of kills ran");
    let assigned = backend
        .iter()
        .filter(|l| {
            l.contains("REMIO-STRESS dm=") && l.contains("assign=0 deassign=0 assign-again=0")
        })
        .count();
    assert_eq!(
        assigned,
        3 * STRESS_ROUNDS,
        "every holder assigned, deassigned and assigned again: {:#?}",
        backend
            .iter()
            .filter(|l| l.contains("REMIO-STRESS dm="))
            .collect::<Vec<_>>()
    );
    assert!(
        out.stdout.contains("SEEN 1"),
        "the frontend kept doing I/O until the kills were done"
    );
    let resets: usize = out
        .stdout
        .lines()
        .find_map(|l| l.split_once("RESETS ").map(|(_, r)| r))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse().ok())
        .unwrap();
    assert!(
        resets >= STRESS_ROUNDS / 2,
        "the devices were reset during the kills"
    );
    for bad in ["IOERR", "MISMATCH", "-FAILED"] {
        assert!(
            !out.stdout.contains(bad),
            "`{bad}` in the frontend's output"
        );
    }
    assert!(
        out.stdout.contains("BOUND 3"),
        "every device is bound again"
    );
    assert!(out.stdout.contains("HWRNG 16384"), "rng works afterwards");
    let trouble = kernel_trouble(&out.stderr);
    assert!(trouble.is_empty(), "kernel reports: {trouble:#?}");
}
