//! "Bao in a box" end to end: `remio run --dispatcher c-driver` boots the frontend VM and a
//! backend VM running the posted C I/O dispatcher driver with `remio dm --kernel-driver` on its
//! ioctls, the platform process being the hypervisor between them (docs/c-driver.md).
//!
//! Skips loudly when QEMU, the guest or the backend VM's artifacts are missing (the backend is
//! built by `remio guest build` from the patch in ../shared/spec); with REMIO_REQUIRE_GUEST=1
//! a missing backend fails the test when the patch exists. One guest pair at a time (the e2e
//! boot lock); every run is bounded.
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod e2e_common;
use e2e_common::*;

/// `remio run --timeout` for the frontend (counted from its QEMU's start). Every trapped
/// access crosses the backend VM (about 1.5 ms each under TCG), and 1 MiB of virtio-rng is
/// some 50000 of them: the disk-and-rng run takes about 2 minutes on a busy 2-core machine.
const FRONTEND_TIMEOUT: Duration = Duration::from_secs(300);
/// The test kills `remio run` after this: the backend may take up to 100 s to get ready, then
/// the frontend's timeout, then some grace.
const RUN_LIMIT: Duration = Duration::from_secs(100 + 300 + 30);

/// The patch the backend's driver is built from (`remio guest build` looks there too).
fn patch_path() -> PathBuf {
    match std::env::var_os("REMIO_C_DRIVER_PATCH") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/spec/bao-io-dispatcher-patch.txt"),
    }
}

/// `true` when the c-driver tests can run; a loud SKIPPED line otherwise, or a failure under
/// REMIO_REQUIRE_GUEST=1 when the patch exists (then the backend should have been built).
fn c_driver_prerequisites(test: &str) -> bool {
    if !prerequisites(test) {
        return false;
    }
    let info = Command::new(env!("CARGO_BIN_EXE_remio"))
        .args(["guest", "info", "--dir"])
        .arg(guest_dir())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&info.stdout).into_owned() + &String::from_utf8_lossy(&info.stderr);
    let Some(why) = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("backend:"))
        .map(str::trim)
        .filter(|l| l.starts_with("unavailable") || !info.status.success())
        .map(str::to_owned)
    else {
        if text.lines().any(|l| l.trim().starts_with("backend:")) {
            return true;
        }
        let why = format!("`remio guest info` says nothing about the backend VM:\n{text}");
        return skip_or_fail(test, &why);
    };
    skip_or_fail(test, &why)
}

fn skip_or_fail(test: &str, why: &str) -> bool {
    let required = std::env::var_os("REMIO_REQUIRE_GUEST").is_some_and(|v| v == "1");
    if required && patch_path().is_file() {
        panic!("{test}: REMIO_REQUIRE_GUEST=1 and the patch exists, but {why}");
    }
    eprintln!("\n*** SKIPPED {test}: backend VM {why} ***\n");
    false
}

/// Runs `remio run --dispatcher c-driver --exec script` (plus `extra`), bounded by
/// [`RUN_LIMIT`], holding the boot lock.
fn c_driver_exec(script: &str, extra: &[&str]) -> RunOutput {
    run_exec_with(
        script,
        &[&["--dispatcher", "c-driver"], extra].concat(),
        |_| {},
    )
}

/// The kernel dispatchers the backend-VM tests run their workload on: the posted C driver, and
/// the Rust module (kmod/, docs/kmod.md) when REMIO_RUST_KMOD=1 asks for it (its cold build
/// takes about 45 minutes, so CI does not): `remio guest build --rust-kmod` runs first, once per
/// test binary. Without it, a loud SKIPPED line names the rust-kmod half.
fn kernel_dispatchers(test: &str) -> Vec<&'static str> {
    let mut dispatchers = vec!["c-driver"];
    if rust_kmod_prerequisites(&format!("{test} on rust-kmod"), true) {
        build_rust_kmod().unwrap();
        dispatchers.push("rust-kmod");
    }
    dispatchers
}

/// `remio run --dispatcher <dispatcher>` (plus `extra`), bounded by [`RUN_LIMIT`], holding the
/// boot lock; on rust-kmod also `-v`, so that the backend's kernel log is in stderr for
/// [`kernel_reports`].
fn kernel_exec_with(
    dispatcher: &str,
    script: &str,
    extra: &[&str],
    during: impl FnOnce(u32),
) -> RunOutput {
    let verbose: &[&str] = if dispatcher == "rust-kmod" && !extra.contains(&"-v") {
        &["-v"]
    } else {
        &[]
    };
    run_exec_with(
        script,
        &[&["--dispatcher", dispatcher], verbose, extra].concat(),
        during,
    )
}

fn kernel_exec(dispatcher: &str, script: &str, extra: &[&str]) -> RunOutput {
    kernel_exec_with(dispatcher, script, extra, |_| {})
}

/// On rust-kmod, the backend's kernel log lines that report trouble (WARNING, BUG, refcount,
/// use-after-free, Oops, Call Trace, general protection, panic); none are looked for on the
/// posted C driver (its known defects are shown by their own tests).
fn kernel_reports<'a>(dispatcher: &str, out: &'a RunOutput) -> Vec<&'a str> {
    if dispatcher == "rust-kmod" {
        kernel_trouble(&out.stderr)
    } else {
        Vec::new()
    }
}

fn run_exec(script: &str, extra: &[&str]) -> RunOutput {
    run_exec_with(script, extra, |_| {})
}

/// Like [`run_exec`]; `during` runs once with the remio process id while it runs.
fn run_exec_with(script: &str, extra: &[&str], during: impl FnOnce(u32)) -> RunOutput {
    remio_exec_bounded(script, extra, FRONTEND_TIMEOUT, RUN_LIMIT, during)
}

const PATTERN_LINE: &[u8] = b"remio-c-driver-pattern-0123456789\n";

/// One boot of the pair: the frontend probes block, console and rng through the C driver,
/// writes a 1 MiB pattern to the disk, drops its caches, reads it back and compares, and
/// reads 1 MiB from /dev/hwrng; the host finds the pattern in the image.
#[test]
fn through_the_c_driver_the_frontend_probes_its_devices_and_does_disk_and_rng_io() {
    if !c_driver_prerequisites("cdriver_e2e") {
        return;
    }
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
    let out = c_driver_exec(script, &["--disk", path_str(&img)]);
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
    // rng_current names the instance: virtio_rng.0.
    assert!(out.stdout.contains("RNG virtio_rng"));
    assert!(
        out.stderr.contains("backend VM ready"),
        "the backend VM served the devices"
    );
    let host = std::fs::read(&img).unwrap();
    let expected: Vec<u8> = PATTERN_LINE.iter().copied().cycle().take(1 << 20).collect();
    assert!(
        host[1 << 20..2 << 20] == expected[..],
        "the host image holds the pattern"
    );
    assert!(host[..1 << 20].iter().all(|&b| b == 0));
    assert!(host[2 << 20..].iter().all(|&b| b == 0));
}

/// The frontend unbinds and rebinds every virtio-mmio device three times (each a virtio reset
/// through the dispatcher), then its disk and rng still work.
const RESET_SCRIPT: &str = r#"
drv=/sys/bus/platform/drivers/virtio-mmio
devs=$(ls $drv | grep -v -e bind -e uevent -e module)
echo "DEVICES $(echo $devs | wc -w)"
for i in 1 2 3; do
  for d in $devs; do echo $d > $drv/unbind || echo "UNBIND-FAILED $d"; done
  for d in $devs; do echo $d > $drv/bind || echo "BIND-FAILED $d"; done
done
wait_disk
echo "BOUND $(ls $drv | grep -v -e bind -e uevent -e module | wc -l)"
dd if=/dev/urandom of=/tmp/p bs=4096 count=64 2>/dev/null
dd if=/tmp/p of=/dev/vda bs=4096 conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda bs=4096 count=64 2>/dev/null | cmp - /tmp/p && echo SAME
echo "HWRNG $(dd if=/dev/hwrng bs=4096 count=4 iflag=fullblock 2>/dev/null | wc -c)"
"#;

fn assert_reset_output(out: &RunOutput) {
    assert_eq!(out.status, Some(0));
    assert!(!out.stdout.contains("-FAILED"), "an unbind or bind failed");
    let devices = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("DEVICES "))
        .unwrap();
    assert!(
        out.stdout.contains(&format!("BOUND {}", devices.trim())),
        "every device is bound again"
    );
    assert!(out.stdout.contains("SAME"));
    assert!(out.stdout.contains("HWRNG 16384"));
}

/// On the posted C driver and, with REMIO_RUST_KMOD=1, on the Rust module.
#[test]
fn through_the_c_driver_three_unbind_bind_rounds_leave_disk_and_rng_working() {
    if !c_driver_prerequisites("cdriver_e2e") {
        return;
    }
    for d in kernel_dispatchers("unbind/bind rounds") {
        let (_dir, img) = temp_image(16 << 20);
        let out = kernel_exec(
            d,
            &with_wait_disk(RESET_SCRIPT),
            &["--disk", path_str(&img), "--no-console"],
        );
        eprintln!("{d}: {} s", out.elapsed.as_secs());
        assert_reset_output(&out);
        let reports = kernel_reports(d, &out);
        assert!(reports.is_empty(), "{d}: kernel reports: {reports:#?}");
    }
}

#[test]
fn through_remios_dispatcher_three_unbind_bind_rounds_leave_disk_and_rng_working() {
    if !prerequisites("cdriver_e2e") {
        return;
    }
    let (_dir, img) = temp_image(16 << 20);
    let out = run_exec(
        &with_wait_disk(RESET_SCRIPT),
        &["--disk", path_str(&img), "--no-console"],
    );
    assert_reset_output(&out);
}

/// Without a backend build, `--dispatcher c-driver` fails before any QEMU starts and says why.
#[test]
fn without_the_backend_build_c_driver_mode_fails_with_the_reason_before_booting() {
    if !prerequisites("cdriver_e2e") {
        return;
    }
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/remio-cdg").unwrap();
    for f in ["vmlinuz", "initramfs.cpio"] {
        std::os::unix::fs::symlink(guest_dir().join(f), dir.as_path().join(f)).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_remio"))
        .args([
            "run",
            "--dispatcher",
            "c-driver",
            "--exec",
            "true",
            "--guest-dir",
        ])
        .arg(dir.as_path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the backend VM is unavailable: no guest build in"),
        "{stderr}"
    );
    assert!(!stderr.contains("QEMU pid"), "nothing booted: {stderr}");
}

#[test]
fn c_driver_mode_refuses_frontend_ram_that_cannot_be_a_pci_bar() {
    if !prerequisites("cdriver_e2e") {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_remio"))
        .args([
            "run",
            "--dispatcher",
            "c-driver",
            "--memory",
            "384",
            "--exec",
            "true",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("must be a power of two"), "{stderr}");
}

/// The pid of `parent`'s child that is the backend VM's QEMU.
fn backend_qemu(parent: u32) -> Option<i32> {
    let children =
        std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
                c.split(|&b| b == 0)
                    .any(|w| w == b"q35,memory-backend=bmem")
            })
        })
}

/// The backend VM's QEMU killed while the frontend writes its disk: the frontend's I/O fails
/// with EIO in bounded time (its devices are failed as after a device model's death), its
/// script finishes and `remio run` exits normally. On the Rust module too with REMIO_RUST_KMOD=1.
#[test]
fn killing_the_backend_vm_mid_dd_gives_the_frontend_io_errors_not_a_hang() {
    if !c_driver_prerequisites("cdriver_e2e") {
        return;
    }
    for dispatcher in kernel_dispatchers("killing_the_backend_vm_mid_dd") {
        killing_the_backend_vm_mid_dd_on(dispatcher);
    }
}

fn killing_the_backend_vm_mid_dd_on(dispatcher: &str) {
    let (_dir, img) = temp_image(64 << 20);
    let script = "n=0; while dd if=/dev/zero of=/dev/vda bs=65536 count=16 oflag=direct \
                  2>/dev/null; do n=$((n+1)); done; echo DD-FAILED-AFTER $n; \
                  dd if=/dev/vda of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null; \
                  echo READ-AFTER $?; echo ALIVE";
    let mut killed_at = None;
    let out = kernel_exec_with(
        dispatcher,
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
            use std::os::unix::fs::MetadataExt;
            let start = Instant::now();
            let backend = loop {
                if let Some(b) = backend_qemu(pid) {
                    break b;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "remio run started no backend VM"
                );
                std::thread::sleep(Duration::from_millis(100));
            };
            let writing = loop {
                if std::fs::metadata(&img).map_or(0, |m| m.blocks()) > 0 {
                    break true;
                }
                if start.elapsed() > Duration::from_secs(200) {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            assert!(writing, "the frontend never wrote to its disk");
            std::thread::sleep(Duration::from_millis(500));
            // SAFETY: kill(2) on a pid we just found as our child's child; no memory involved.
            let r = unsafe { libc::kill(backend, libc::SIGKILL) };
            assert_eq!(r, 0);
            killed_at = Some(Instant::now());
        },
    );
    assert_eq!(
        out.status,
        Some(0),
        "{dispatcher}: the frontend did not finish its script"
    );
    let after_kill = killed_at.unwrap().elapsed();
    assert!(
        after_kill < Duration::from_secs(60),
        "{dispatcher}: the frontend needed {after_kill:?} after the kill to finish"
    );
    assert!(out.stdout.contains("ALIVE"), "{dispatcher}");
    assert!(
        out.stdout.contains("READ-AFTER 1"),
        "{dispatcher}: I/O after the kill fails"
    );
    assert!(out.stderr.contains("the backend VM exited"), "{dispatcher}");
}

/// An ext4 file system made on the host, written in the frontend through the C driver (the
/// backend VM's /dev/vda), is clean on the host and holds the guest's file. On the Rust module
/// too with REMIO_RUST_KMOD=1.
#[test]
fn through_the_c_driver_an_ext4_round_trip_is_clean_on_the_host() {
    if !c_driver_prerequisites("cdriver_e2e") {
        return;
    }
    for d in kernel_dispatchers("ext4 round trip") {
        let Some(trip) = ext4_round_trip("cdriver_e2e ext4", d, |script, img| {
            kernel_exec(d, script, &["--disk", path_str(img), "--no-console"])
        }) else {
            return;
        };
        let reports = kernel_reports(d, &trip.out);
        assert!(reports.is_empty(), "{d}: kernel reports: {reports:#?}");
    }
}

/// SIGSTOP/SIGCONT of the device model inside the backend VM in the middle of I/O (what a
/// debugger or a job-control stop does): the posted driver's ATTACH then fails with EFAULT (it
/// ignores its interrupted wait), and the device model must retry rather than give the device
/// up. The frontend's I/O resumes after each stop and nothing is lost. With REMIO_RUST_KMOD=1 the
/// same on the Rust module, whose ATTACH restarts instead: the device model sees no error.
#[test]
fn through_the_c_driver_sigstop_and_sigcont_of_the_device_model_lose_nothing() {
    if !c_driver_prerequisites("cdriver_e2e") {
        return;
    }
    let hook_dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/remio-sigstop").unwrap();
    let hook = hook_dir.as_path().join("backend.sh");
    // The two VMs meet on the disk, not on a clock: the frontend marks block 1022 when its
    // I/O starts, the backend (which sees the same disk as its /dev/vda) stops and continues
    // the device model five times from then on and marks block 1023, and the frontend keeps
    // doing I/O until it reads that mark (at most 240 rounds: the stops' 6 s are ~25 of them).
    std::fs::write(
        &hook,
        "( while [ \"$(dd if=/dev/vda bs=16384 skip=1022 count=1 2>/dev/null | head -c 10)\" \
                 != IO-STARTED ]; do usleep 100000; done; \
           for i in 1 2 3 4 5; do kill -STOP $(pidof remio); usleep 500000; \
             kill -CONT $(pidof remio); usleep 700000; done; \
           echo REMIO-TEST-SIGNALS-DONE; printf SIGNALS-DONE > /tmp/mark; \
           dd if=/tmp/mark of=/dev/vda bs=16384 seek=1023 count=1 conv=sync,fsync 2>/dev/null \
         ) &\n",
    )
    .unwrap();
    let script = "printf IO-STARTED > /tmp/mark; \
                  dd if=/tmp/mark of=/dev/vda bs=16384 seek=1022 count=1 conv=sync,fsync \
                    2>/dev/null || echo IOERR start; \
                  i=0; while [ $i -lt 240 ]; do \
                    dd if=/dev/urandom of=/tmp/p bs=16384 count=4 2>/dev/null; \
                    dd if=/tmp/p of=/dev/vda bs=16384 seek=$((i*4)) oflag=direct conv=fsync \
                      2>/dev/null || echo IOERR $i; \
                    dd if=/dev/vda of=/tmp/q bs=16384 skip=$((i*4)) count=4 iflag=direct \
                      2>/dev/null; cmp -s /tmp/p /tmp/q || echo MISMATCH $i; i=$((i+1)); \
                    [ \"$(dd if=/dev/vda bs=16384 skip=1023 count=1 iflag=direct 2>/dev/null \
                        | head -c 12)\" = SIGNALS-DONE ] && { echo MARK-SEEN; break; }; \
                  done; echo ROUNDS $i; echo DONE";
    for d in kernel_dispatchers("SIGSTOP/SIGCONT") {
        let (_dir, img) = temp_image(16 << 20);
        let out = kernel_exec(
            d,
            script,
            &[
                "--disk",
                path_str(&img),
                "--no-console",
                "--no-rng",
                "-v",
                "--backend-hook",
                path_str(&hook),
            ],
        );
        assert_eq!(out.status, Some(0), "{d}");
        assert!(out.stdout.contains("DONE"), "{d}");
        assert!(!out.stdout.contains("IOERR"), "{d}: a write failed");
        assert!(!out.stdout.contains("MISMATCH"), "{d}: data was lost");
        assert!(
            out.stderr.contains("REMIO-TEST-SIGNALS-DONE"),
            "{d}: the stops happened while the guest ran"
        );
        assert!(
            out.stdout.contains("MARK-SEEN"),
            "{d}: the frontend never read the backend's mark"
        );
        if d == "c-driver" {
            assert!(
                out.stderr.contains("attach interrupted"),
                "ATTACH failed after a stop and was retried"
            );
        } else {
            // The module's interrupted ATTACH restarts (ERESTARTSYS): the device model never
            // sees the stop.
            assert!(
                !out.stderr.contains("attach interrupted"),
                "{d}: ATTACH failed after a stop"
            );
        }
        let reports = kernel_reports(d, &out);
        assert!(reports.is_empty(), "{d}: kernel reports: {reports:#?}");
    }
}

/// One scripted workload with fixed data through remio's dispatcher, the posted C driver and,
/// with REMIO_RUST_KMOD=1, the Rust module: everything the guest can see (virtio features,
/// device ids, capacity, bytes read back, checksums) must be identical, and so must the disks;
/// the request counts of each are printed side by side.
#[test]
fn the_same_workload_through_both_dispatchers_looks_the_same_to_the_guest() {
    if !c_driver_prerequisites("cdriver_e2e") {
        return;
    }
    // Deterministic data: a byte pattern from a fixed seed, written and read back at offsets.
    let script = r#"
for d in /sys/bus/virtio/devices/*; do echo "DEV $(cat $d/device) $(cat $d/vendor) $(cat $d/features)"; done
echo "CAPACITY $(cat /sys/block/vda/size) RO $(cat /sys/block/vda/ro)"
seed=12345; i=0; : > /tmp/p
while [ $i -lt 256 ]; do seed=$(( (seed * 1103515245 + 12345) % 2147483648 )); printf "%08x" $seed >> /tmp/p; i=$((i+1)); done
for off in 0 7 100 1000; do dd if=/tmp/p of=/dev/vda bs=512 seek=$off conv=fsync 2>/dev/null; done
echo 3 > /proc/sys/vm/drop_caches
for off in 0 7 100 1000; do echo "SUM $off $(dd if=/dev/vda bs=512 skip=$off count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"; done
echo "WHOLE $(dd if=/dev/vda bs=65536 count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
"#;
    let visible = |out: &RunOutput| -> Vec<String> {
        out.stdout
            .lines()
            .filter(|l| {
                ["DEV ", "CAPACITY ", "SUM ", "WHOLE "]
                    .iter()
                    .any(|p| l.starts_with(p))
            })
            .map(str::to_owned)
            .collect()
    };
    let counts = |out: &RunOutput| -> String {
        out.stderr
            .lines()
            .filter(|l| l.contains("register accesses through the bridge"))
            .map(|l| l.split("remio::run] ").last().unwrap_or(l).to_owned())
            .collect::<Vec<_>>()
            .join("; ")
    };
    let (_d1, img1) = temp_image(16 << 20);
    let remio = run_exec(
        script,
        &["--disk", path_str(&img1), "--no-console", "--no-rng"],
    );
    assert_eq!(remio.status, Some(0));
    let a = visible(&remio);
    assert!(a.len() >= 7, "the workload ran: {a:?}");
    eprintln!("differential: remio's dispatcher: {}", counts(&remio));
    for d in kernel_dispatchers("differential") {
        let (_d2, img2) = temp_image(16 << 20);
        let kernel = kernel_exec(
            d,
            script,
            &["--disk", path_str(&img2), "--no-console", "--no-rng"],
        );
        assert_eq!(kernel.status, Some(0), "{d}");
        let b = visible(&kernel);
        assert_eq!(
            a, b,
            "the guest saw a difference between remio's dispatcher and {d}"
        );
        assert_eq!(
            std::fs::read(&img1).unwrap(),
            std::fs::read(&img2).unwrap(),
            "the disks differ between remio's dispatcher and {d}"
        );
        eprintln!("differential: {d}: {}", counts(&kernel));
        let reports = kernel_reports(d, &kernel);
        assert!(reports.is_empty(), "{d}: kernel reports: {reports:#?}");
    }
}

/// Whether this process may make TAP interfaces (what `--net auto` needs); else a loud skip,
/// or a failure under REMIO_REQUIRE_GUEST=1.
fn taps_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root && Path::new("/dev/net/tun").exists() {
        return true;
    }
    let why = "cannot create a TAP (needs root and /dev/net/tun)";
    assert!(!guest_required(), "{test}: REMIO_REQUIRE_GUEST=1 but {why}");
    eprintln!("\n*** SKIPPED {test}: {why} ***\n");
    false
}

/// The console echo of e2e_console and the ping of e2e_net in one boot of the pair: the
/// frontend's hvc0 is served by the device model in the backend VM on a PTY that the backend
/// relays to its second serial port, which QEMU serves on `--console-socket`; its eth0 by the
/// device model on a TAP that the backend bridges with its own NIC on the host TAP of
/// `--net auto`.
#[test]
fn through_the_c_driver_the_console_echoes_a_line_and_the_guest_pings_the_host() {
    if !c_driver_prerequisites("cdriver_e2e") || !taps_or_skip("cdriver_e2e") {
        return;
    }
    for d in kernel_dispatchers("console echo and ping") {
        let (dir, img) = temp_image(16 << 20);
        let sock = dir.as_path().join("console.sock");
        let script =
            format!("{CONSOLE_ECHO_SCRIPT}; ip -o addr show dev eth0; ping -c 3 -W 5 10.77.0.1");
        let mut host_side = String::new();
        let mut remio_pid = 0;
        let out = kernel_exec_with(
            d,
            &script,
            &[
                "--disk",
                path_str(&img),
                "--no-rng",
                "--net",
                "auto",
                "--console-socket",
                path_str(&sock),
            ],
            |pid| {
                remio_pid = pid;
                // The backend may take 100 s to be ready, the frontend as long again to boot.
                host_side =
                    console_echo_host_side(&sock, Instant::now() + Duration::from_secs(240));
            },
        );
        assert!(
            host_side.contains("READY"),
            "the guest never said READY: {host_side:?}"
        );
        assert_eq!(out.status, Some(0), "{d}: ping failed");
        assert!(
            out.stdout.contains("GOT hello-remio-4711"),
            "the guest read the host's line"
        );
        assert!(
            host_side.contains("echo:hello-remio-4711"),
            "the host read the guest's answer: {host_side:?}"
        );
        assert!(out.stdout.contains("10.77.0.2/24"), "eth0 got its address");
        assert!(out.stdout.contains("3 packets received") || out.stdout.contains("3 received"));
        let tap = format!("/sys/class/net/remio-{}", remio_pid % 10_000_000);
        assert!(!Path::new(&tap).exists(), "{tap} left behind");
        let reports = kernel_reports(d, &out);
        assert!(reports.is_empty(), "{d}: kernel reports: {reports:#?}");
    }
}

/// `e2e_console` as it is, through the C driver: `remio run --config` (block, and a console on
/// a UNIX socket) with `--dispatcher c-driver`; a line sent into the socket comes back from the
/// frontend's /dev/hvc0.
#[test]
fn through_the_c_driver_a_config_files_socket_console_echoes_a_line() {
    if !c_driver_prerequisites("cdriver_e2e") {
        return;
    }
    for d in kernel_dispatchers("socket console") {
        let (out, host_side) =
            console_echo_run(Duration::from_secs(240), |script, extra, during| {
                kernel_exec_with(d, script, extra, during)
            });
        assert!(
            host_side.contains("READY"),
            "{d}: the guest never said READY: {host_side:?}"
        );
        assert_eq!(out.status, Some(0), "{d}");
        assert!(
            out.stdout.contains("GOT hello-remio-4711"),
            "{d}: the guest read the host's line"
        );
        assert!(
            host_side.contains("echo:hello-remio-4711"),
            "{d}: the host read the guest's answer: {host_side:?}"
        );
        let reports = kernel_reports(d, &out);
        assert!(reports.is_empty(), "{d}: kernel reports: {reports:#?}");
    }
}

/// The frontend's half of the "destroy another DM" demonstrations: disk I/O works, then it
/// asks (a marker at sector 2048 of its disk) for device 1 (rng) to be opened and closed by a
/// second process, waits until the host says that is done (a marker at sector 2049, which the
/// backend hook or the test writes once the second process has closed: `CLOSE-SEEN`), and
/// reads its disk back. Both in the background, bounded: a stalled virtio-blk read cannot be
/// killed, and on the posted C driver the disk stalls for good once DM 1 is closed.
const DESTROY_SCRIPT: &str = "dd if=/dev/urandom of=/tmp/p bs=4096 count=16 2>/dev/null; \
    dd if=/tmp/p of=/dev/vda bs=4096 seek=64 oflag=direct conv=fsync 2>/dev/null \
      && echo WRITE-OK; \
    echo REMIO-DESTROY-DM-1 | dd of=/dev/vda bs=512 seek=2048 conv=sync,fsync oflag=direct \
      2>/dev/null; \
    ( until dd if=/dev/vda bs=512 skip=2049 count=1 iflag=direct 2>/dev/null \
          | grep -q REMIO-DM-1-CLOSED; do sleep 0.2; done; echo CLOSE-SEEN; \
      dd if=/dev/vda of=/tmp/q bs=4096 skip=64 count=16 iflag=direct 2>/dev/null \
        && cmp -s /tmp/p /tmp/q && echo READ-BACK-OK ) & pid=$!; \
    i=0; while kill -0 $pid 2>/dev/null && [ $i -lt 90 ]; do sleep 1; i=$((i+1)); done; \
    kill -0 $pid 2>/dev/null && echo DISK-STALLED; echo FINISHED";

/// The marker the host writes at sector 2049 once the second process has closed DM 1.
const CLOSED_MARKER: &[u8] = b"REMIO-DM-1-CLOSED\n";

/// The backend hook of the C-driver half: once the frontend's marker is on the disk (the
/// backend's /dev/vda), baodefect shows the DEASSIGN defect on DM 1 (at 0x100003f0: DM 1's
/// window is at 0x10000200, and 0x1f0 in it is no register the frontend writes), then a second
/// process gets a DM 1 fd and closes it. Each step waits for the line baodefect prints when it is
/// done (bounded); the close is waited for until it returns or for 5 s (on the posted driver
/// it does not return). Then the hook writes [`CLOSED_MARKER`] for the frontend.
const DESTROY_HOOK: &str =
    "( while ! dd if=/dev/vda bs=512 skip=2048 count=1 iflag=direct 2>/dev/null \
         | grep -q REMIO-DESTROY-DM-1; do usleep 300000; done; \
       wait_line() { i=0; until grep -q \"$2\" $1 2>/dev/null || [ $i -ge $3 ]; do \
         usleep 100000; i=$((i+1)); done; cat $1; }; \
       baodefect deassign 1 0x100003f0 > /tmp/deassign.out & \
       wait_line /tmp/deassign.out REMIO-DEFECT 300; \
       baodefect close 1 > /tmp/close.out & \
       wait_line /tmp/close.out REMIO-DEFECT 300 >/dev/null; \
       wait_line /tmp/close.out closed= 50; \
       grep -q closed= /tmp/close.out && echo REMIO-TEST-CLOSE-RETURNED \
         || echo REMIO-TEST-CLOSE-DID-NOT-RETURN; \
       echo REMIO-DM-1-CLOSED | dd of=/dev/vda bs=512 seek=2049 conv=sync,fsync oflag=direct \
         2>/dev/null; \
       echo REMIO-TEST-CLOSED; dmesg | tail -n 20 ) &\n";

/// The second device model's config: device 1 (rng) alone.
const RNG_ONLY: &str = "[[device]]\ndm_id = 1\ntype = \"rng\"\nmmio_base = 0x10000200\n";

/// Whether the frontend wrote the marker of [`DESTROY_SCRIPT`] into `img`.
fn destroy_marker_in(img: &Path) -> bool {
    let mut buf = vec![0u8; 512];
    std::fs::File::open(img)
        .and_then(|mut f| {
            use std::io::Seek;
            f.seek(std::io::SeekFrom::Start(2048 * 512))?;
            f.read_exact(&mut buf)
        })
        .is_ok_and(|()| buf.starts_with(b"REMIO-DESTROY-DM-1"))
}

/// Writes [`CLOSED_MARKER`] at sector 2049 of `img` (the frontend reads it with O_DIRECT
/// through the device model, which reads the file).
fn write_closed_marker(img: &Path) {
    use std::io::{Seek, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.seek(std::io::SeekFrom::Start(2049 * 512)).unwrap();
    f.write_all(CLOSED_MARKER).unwrap();
    f.sync_all().unwrap();
}

/// One DM's row of `remio stats --json`: (session state, sessions it has had, requests the
/// dispatcher fetched for it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct DmRow {
    state: String,
    sessions: u64,
    requests: u64,
}

/// DM `id`'s row in the stats of `remio run` process `pid` (its stats socket), read with
/// `remio stats --json`.
fn dm_row(pid: u32, id: u64) -> DmRow {
    // Where `remio run` serves its stats (crates/remio/src/stats.rs, `run_dir`).
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(d) if d.is_dir() => d.join("remio"),
        // SAFETY: getuid has no preconditions.
        _ => std::env::temp_dir().join(format!("remio-{}", unsafe { libc::getuid() })),
    };
    let socket = dir.join(format!("stats-{pid}.sock"));
    let out = Command::new(env!("CARGO_BIN_EXE_remio"))
        .args(["stats", "--json", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "remio stats --json: {e}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let row = json["dms"]
        .as_array()
        .and_then(|dms| dms.iter().find(|d| d["id"].as_u64() == Some(id)))
        .unwrap_or_else(|| panic!("no DM {id} in {json}"));
    DmRow {
        state: row["session_state"].as_str().unwrap_or_default().to_owned(),
        sessions: row["sessions"].as_u64().unwrap_or_default(),
        requests: row["requests"].as_u64().unwrap_or_default(),
    }
}

/// What the second client on remio's socket API did and what the platform said around it.
#[derive(Debug, Default)]
struct SecondClient {
    /// DM 0's and DM 1's stats rows before it started.
    before: Option<(DmRow, DmRow)>,
    /// Its stdout (REMIO-DM-READY / REMIO-DM-FAILED) and stderr (its error).
    stdout: String,
    stderr: String,
    /// Its exit code, once it has exited (`None`: it did not exit within the deadline and was
    /// killed).
    exit: Option<i32>,
    /// Whether it printed REMIO-DM-READY (it served DM 1), after which it was stopped
    /// (SIGTERM: it ends its sessions) and waited for.
    served: bool,
    /// DM 0's and DM 1's stats rows after it exited.
    after: Option<(DmRow, DmRow)>,
}

/// The C side's baodefect against remio's dispatcher, run while `remio run` (`pid`) serves
/// the frontend: once the frontend's disk has worked (its marker in `img`), a second `remio
/// dm` asks the platform's socket API for DM 1 (OPEN, the socket API's DM_GET_INFO) while
/// the run's device model serves it, and ends (closing its connection and, had it got one,
/// its session), while the frontend keeps using DM 0 (it reads sector 2049 over and over).
/// Then [`CLOSED_MARKER`] goes to the disk so that the frontend reads its data back. No
/// assertion here: the test checks what this returns.
fn second_client_on_dm_1(pid: u32, img: &Path, rng_only: &Path) -> SecondClient {
    let mut second = SecondClient::default();
    let deadline = Instant::now() + Duration::from_secs(200);
    while !destroy_marker_in(img) {
        if Instant::now() > deadline {
            return second;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let Some(socket) = run_dir_socket(pid, "api.sock", Duration::from_secs(10)) else {
        return second;
    };
    second.before = Some((dm_row(pid, 0), dm_row(pid, 1)));
    let mut child = Command::new(env!("CARGO_BIN_EXE_remio"))
        .args(["dm", "--socket"])
        .arg(&socket)
        .arg("--config")
        .arg(rng_only)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its stdout line by line (REMIO-DM-READY / REMIO-DM-FAILED), then its end (None).
    let (tx, lines) = std::sync::mpsc::channel::<Option<String>>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(Some(line));
        }
        let _ = tx.send(None);
    });
    let t_err = read_in_background(child.stderr.take().unwrap());
    // Until it says it serves (REMIO-DM-READY) or fails, or its stdout ends (it exited).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(Some(line)) => {
                second.stdout.push_str(&line);
                second.stdout.push('\n');
                if line.starts_with("REMIO-DM-READY") {
                    second.served = true;
                    // SAFETY: kill(2) on our own child's pid; no memory involved.
                    unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
                }
            }
            Ok(None) => break,
            Err(_) => {
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait().unwrap();
    second.exit = if Instant::now() < deadline {
        status.code()
    } else {
        None
    };
    second.stderr = t_err.join().unwrap();
    second.after = Some((dm_row(pid, 0), dm_row(pid, 1)));
    write_closed_marker(img);
    second
}

/// Defects "IOEVENTFD with DEASSIGN deassigns, then assigns again" and "one global interrupt
/// handler for all DMs: destroying one DM silences all" (spec/remote-io.md), shown from the
/// backend VM with guest/backend/tools/baodefect once the frontend's disk has worked: a second
/// process gets a DM fd for DM 1 (rng; DM_GET_INFO hands one out for a DM in use), assigns,
/// deassigns and assigns again an ioeventfd (EEXIST: the deassign re-assigned it), and another
/// closes its DM 1 fd while alive, which destroys DM 1 under the device model, clears the one
/// interrupt handler of every DM (and destroys DM 0's dispatch workqueue: the id was zeroed
/// first). The frontend's disk, DM 0, then gets no answer.
///
/// The same action against remio's dispatcher: a second `remio dm` for device 1 on the
/// platform's socket while the run's device model serves DM 1 and the frontend reads its disk.
/// remio's socket API refuses a second holder of a DM (OPEN answers EBUSY: one control session
/// a DM), so the second process gets no handle on DM 1; it fails naming the refusal and
/// exits, closing its connection; the platform's stats show DM 1 still served by its one
/// session and DM 0 still dispatching; and the frontend, told only after that exit, reads its
/// data back. remio's DEASSIGN is `deassign_does_not_reassign` in crates/dispatcher, the
/// destruction of one of its DMs `destroying_one_dm_leaves_another_dispatching`.
///
/// With REMIO_RUST_KMOD=1, the C driver's backend hook, unchanged, on the Rust module
/// (kmod/remio_dispatcher.rs): the second assign succeeds (DEASSIGN only deassigns), the
/// second process's close returns, and DM 0 keeps dispatching: the frontend reads its data
/// back. The backend's kernel log holds no WARNING, BUG, Oops or Call Trace.
#[test]
fn one_process_closing_a_dm_silences_every_dm_on_the_c_driver_but_not_on_remios() {
    if !c_driver_prerequisites("cdriver_e2e") {
        return;
    }
    let (dir, img) = temp_image(16 << 20);
    let hook = dir.as_path().join("backend.sh");
    std::fs::write(&hook, DESTROY_HOOK).unwrap();
    let cdrv = c_driver_exec(
        DESTROY_SCRIPT,
        &[
            "--disk",
            path_str(&img),
            "--no-console",
            "-v",
            "--backend-hook",
            path_str(&hook),
        ],
    );

    let (dir2, img2) = temp_image(16 << 20);
    let rng_only = dir2.as_path().join("rng-only.toml");
    std::fs::write(&rng_only, RNG_ONLY).unwrap();
    let mut second = SecondClient::default();
    let remio = run_exec_with(
        DESTROY_SCRIPT,
        &["--disk", path_str(&img2), "--no-console"],
        |pid| second = second_client_on_dm_1(pid, &img2, &rng_only),
    );

    assert!(cdrv.stdout.contains("WRITE-OK"), "the disk worked first");
    assert!(
        cdrv.stderr
            .contains("REMIO-DEFECT deassign assign=0 deassign=0 assign-again=-17"),
        "the posted driver's DEASSIGN left the ioeventfd assigned"
    );
    assert!(
        cdrv.stderr.contains("REMIO-DEFECT close dm=1 fd="),
        "a second process got a DM 1 fd in the backend VM and closed it"
    );
    assert!(
        cdrv.stderr.contains("REMIO-TEST-CLOSED"),
        "the backend hook finished"
    );
    assert!(
        !cdrv.stdout.contains("READ-BACK-OK"),
        "the posted driver kept serving DM 0 after DM 1 was destroyed"
    );
    eprintln!(
        "c-driver: close() {}; after it the disk {}",
        if cdrv.stderr.contains("REMIO-TEST-CLOSE-RETURNED") {
            "returned"
        } else {
            "did not return within 5 s"
        },
        if cdrv.stdout.contains("DISK-STALLED") {
            "stalled (no answer)"
        } else {
            "failed"
        }
    );

    eprintln!("remio: the second device model: {second:#?}");
    assert_eq!(remio.status, Some(0));
    assert!(remio.stdout.contains("WRITE-OK"), "the disk worked first");
    let (before0, before1) = second
        .before
        .clone()
        .expect("the frontend never wrote its marker, or remio run has no API socket");
    assert_eq!(
        before1.state, "serving",
        "the run's device model serves DM 1"
    );
    assert_eq!(before1.sessions, 1);
    assert_eq!(before0.state, "serving");
    // (a) The second process asked for DM 1 and was refused: one holder a DM.
    assert!(
        !second.served && !second.stdout.contains("REMIO-DM-READY"),
        "the second process got DM 1 while the run's device model serves it"
    );
    assert!(
        second.stderr.contains("starting the devices: DM 1: busy"),
        "the second process says the platform refused it DM 1: {}",
        second.stderr
    );
    assert_eq!(second.exit, Some(1), "the second process exited on its own");
    let (after0, after1) = second.after.clone().unwrap();
    assert_eq!(
        (after1.state.as_str(), after1.sessions),
        ("serving", 1),
        "DM 1 is still served by its one session after the second process closed"
    );
    // (b) DM 0 kept its session, and its disk worked afterwards: the frontend, told only once
    // the second process was gone, read its data back.
    assert_eq!(after0.state, "serving");
    eprintln!(
        "remio: DM 0 dispatched {} requests while the second process ran",
        after0.requests.saturating_sub(before0.requests)
    );
    assert!(
        remio.stdout.contains("CLOSE-SEEN"),
        "the frontend read the host's marker"
    );
    assert!(
        remio.stdout.contains("READ-BACK-OK") && !remio.stdout.contains("DISK-STALLED"),
        "remio's dispatcher kept serving DM 0"
    );

    // (c) The Rust module (REMIO_RUST_KMOD=1), with the C driver's backend hook as it is.
    for d in kernel_dispatchers("destroy DM 1")
        .into_iter()
        .filter(|d| *d == "rust-kmod")
    {
        let (dir3, img3) = temp_image(16 << 20);
        let hook3 = dir3.as_path().join("backend.sh");
        std::fs::write(&hook3, DESTROY_HOOK).unwrap();
        let kmod = kernel_exec(
            d,
            DESTROY_SCRIPT,
            &[
                "--disk",
                path_str(&img3),
                "--no-console",
                "-v",
                "--backend-hook",
                path_str(&hook3),
            ],
        );
        assert_eq!(kmod.status, Some(0), "{d}");
        assert!(
            kmod.stdout.contains("WRITE-OK"),
            "{d}: the disk worked first"
        );
        assert!(
            kmod.stderr
                .contains("REMIO-DEFECT deassign assign=0 deassign=0 assign-again=0"),
            "{d}: DEASSIGN only deassigns, so the second assign succeeds"
        );
        assert!(
            kmod.stderr.contains("REMIO-TEST-CLOSE-RETURNED"),
            "{d}: the second process's close returned"
        );
        assert!(
            kmod.stdout.contains("CLOSE-SEEN"),
            "{d}: the frontend read the marker"
        );
        assert!(
            kmod.stdout.contains("READ-BACK-OK") && !kmod.stdout.contains("DISK-STALLED"),
            "{d}: DM 0 kept dispatching after a second process closed its DM 1 fd"
        );
        let reports = kernel_reports(d, &kmod);
        assert!(reports.is_empty(), "{d}: kernel reports: {reports:#?}");
    }
}
