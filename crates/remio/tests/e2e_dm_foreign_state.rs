//! Issue 14's fallback with a real guest: a device model restarted while the guest has block I/O
//! outstanding finds a state record it cannot resume (one of another configuration, as an
//! upgrade to another config leaves it), and the guest sees I/O errors, not a hang.
//!
//! `remio run` serves the disk and the rng of an unmodified Linux guest whose script writes 64
//! KiB blocks with O_DIRECT until a write fails. The first device model is armed with
//! `REMIO_CRASH_POINT=blk-written:N:foreign=2` (`crates/virtio/src/crash_point.rs`, the
//! `crash-points` feature that `remio`'s dev-dependency turns on): at its N-th block write, the
//! data on the image and the status not yet written, it rewrites the state record of its
//! virtio-blk device (ID 2) as another configuration's and SIGKILLs itself. `remio run` starts a
//! new one, which resumes the rng and finds the disk's record unusable.
//!
//! Expected: the write in flight (and every later request) fails with EIO in the guest, in
//! bounded time; the device model says why once (`state record of another configuration`); the
//! rng keeps working; after the guest unbinds and binds the disk's virtio-mmio device (a reset
//! and a new probe) it writes and reads the disk again, and the host image has that write.
//! Without the fallback the new device model started the disk fresh under the live driver, the
//! write in flight was never answered and the guest hung until `remio run --timeout`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod e2e_common;
use e2e_common::*;

/// The block write (hit of `blk-written`) at which the first device model dies: past the
/// guest's first few writes, so the disk is live and in use.
const NTH_WRITE: u32 = 20;

/// Where the guest writes its block after rebinding, in 64 KiB blocks.
const AFTER_BLOCK: u64 = 100;

/// The 64 KiB the guest writes: `yes remio-foreign-0123456789 | head -c 65536`.
fn pattern() -> Vec<u8> {
    b"remio-foreign-0123456789\n"
        .iter()
        .copied()
        .cycle()
        .take(65536)
        .collect()
}

/// The guest's script. Prints `RNG-BEFORE <bytes>`, `WRITES-OK <n>` then `WRITE-FAILED` (or
/// `NEVER-FAILED`), `READ-FAILED`, `RNG-AFTER <bytes>`, `IOERRORS <n>`, `REBOUND <dev>`, and
/// `AFTER-REBIND-OK` when the disk works again.
const SCRIPT: &str = r#"
set -u
drv=/sys/bus/platform/drivers/virtio-mmio
disk=
for d in $(cd $drv && ls -d virtio-mmio.*); do
    case "$(cat $drv/$d/virtio*/device)" in 0x0002) disk=$d ;; esac
done
[ -n "$disk" ] || { echo NO-DISK; exit 10; }
echo "RNG-BEFORE $(timeout 30 dd if=/dev/hwrng bs=32 count=1 iflag=fullblock 2>/dev/null | wc -c)"
yes remio-foreign-0123456789 | head -c 65536 > /tmp/p
i=0
while [ $i -lt 400 ]; do
    dd if=/tmp/p of=/dev/vda bs=65536 seek=$((i % 64)) count=1 oflag=direct 2>/dev/null || break
    i=$((i+1))
done
echo "WRITES-OK $i"
[ $i -lt 400 ] && echo WRITE-FAILED || echo NEVER-FAILED
dd if=/dev/vda of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null || echo READ-FAILED
echo "RNG-AFTER $(timeout 30 dd if=/dev/hwrng bs=32 count=1 iflag=fullblock 2>/dev/null | wc -c)"
echo "IOERRORS $(dmesg | grep -ci 'i/o error')"
echo $disk > $drv/unbind
echo $disk > $drv/bind
# The new disk appears when the probe is done: poll for it, bounded.
n=0
until [ -b /dev/vda ] && dd if=/dev/vda of=/dev/null bs=512 count=1 iflag=direct 2>/dev/null; do
    n=$((n+1)); [ $n -lt 300 ] || { echo NO-DISK-AFTER-REBIND; exit 11; }; sleep 0.1
done
echo "REBOUND $(cat $drv/$disk/virtio*/device)"
dd if=/tmp/p of=/dev/vda bs=65536 seek=100 count=1 oflag=direct 2>/dev/null &&
    dd if=/dev/vda of=/tmp/r bs=65536 skip=100 count=1 iflag=direct 2>/dev/null &&
    cmp -s /tmp/p /tmp/r && echo AFTER-REBIND-OK
"#;

fn line_value<'a>(out: &'a str, prefix: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map(str::trim)
}

#[test]
fn a_record_of_another_configuration_fails_the_guests_disk_instead_of_hanging_it() {
    if !prerequisites("e2e_dm_foreign_state") {
        return;
    }
    let (_dir, img) = temp_image(16 << 20);
    let spec = format!("blk-written:{NTH_WRITE}:foreign=2");

    let out = remio_exec_env(
        SCRIPT,
        &[
            "--disk",
            path_str(&img),
            "--no-console",
            "--dm-restarts",
            "2",
            "--access-timeout-ms",
            "30000",
        ],
        &[("REMIO_CRASH_POINT", &spec)],
    );

    // The first device model died at the armed write, its disk record rewritten.
    assert!(
        out.stderr.contains(&format!(
            "crash point blk-written reached (hit {NTH_WRITE}, generation 0)"
        )),
        "the first device model did not die at its {NTH_WRITE}th block write"
    );
    assert!(
        out.stderr
            .contains("rewriting the state records of 1 device(s) of type 2"),
        "the hook did not rewrite the disk's record"
    );
    assert_eq!(out.stderr.matches("restarting it in").count(), 1);
    // The guest did not hang: its script ran to the end, within remio run's timeout.
    assert_eq!(
        out.status,
        Some(0),
        "the guest did not finish its script (a hang on the disk?)"
    );
    // The new device model said why, once, and failed the disk; the rng resumed.
    assert_eq!(
        out.stderr
            .matches("state record of another configuration")
            .count(),
        1,
        "one warning for the disk"
    );
    assert!(
        out.stderr
            .contains("it is failed (DEVICE_NEEDS_RESET, its requests answered with errors)"),
        "the warning says what the guest sees"
    );
    assert!(
        !out.stderr
            .contains("resumed from the previous device model: Failed"),
        "a failed window is not reported as resumed"
    );
    assert!(
        out.stderr
            .contains("resumed from the previous device model: Live"),
        "the rng resumed"
    );
    // The guest saw errors on the disk, not a hang.
    let writes: u32 = line_value(&out.stdout, "WRITES-OK ")
        .expect("WRITES-OK")
        .parse()
        .unwrap();
    assert!(
        out.stdout.lines().any(|l| l == "WRITE-FAILED"),
        "no write failed"
    );
    assert!(
        writes >= NTH_WRITE - 1,
        "the writes before the kill succeeded ({writes})"
    );
    assert!(
        out.stdout.lines().any(|l| l == "READ-FAILED"),
        "a read of the failed disk succeeded"
    );
    let ioerrors: u32 = line_value(&out.stdout, "IOERRORS ")
        .expect("IOERRORS")
        .parse()
        .unwrap();
    assert!(ioerrors > 0, "the guest's kernel logged no I/O error");
    // The other device kept being served.
    assert_eq!(line_value(&out.stdout, "RNG-BEFORE "), Some("32"));
    assert_eq!(
        line_value(&out.stdout, "RNG-AFTER "),
        Some("32"),
        "the rng works after the disk failed"
    );
    // After a rebind the disk works again, and the write reached the host image.
    assert_eq!(line_value(&out.stdout, "REBOUND "), Some("0x0002"));
    assert!(
        out.stdout.lines().any(|l| l == "AFTER-REBIND-OK"),
        "the disk does not write and read back after rebinding"
    );
    let image = std::fs::read(&img).unwrap();
    let at = usize::try_from(AFTER_BLOCK * 65536).unwrap();
    assert!(
        image[at..at + 65536] == pattern()[..],
        "the write after rebinding is not on the host image"
    );
    eprintln!(
        "e2e_dm_foreign_state: {writes} writes before the failure, {ioerrors} I/O errors logged, \
         {:.1} s",
        out.elapsed.as_secs_f64()
    );
}
