//! A hostile guest: it unbinds its virtio-mmio drivers, writes garbage with busybox `devmem` to
//! every register of every Remote I/O window (all of them at 32 bits; 8, 16 and 64 bits at a
//! register, in the config space and straddling two windows), with bad queue sizes and
//! addresses, status values out of order, notifies of queues that do not exist, and accesses
//! past the last window; rebinds the drivers, and its disk and rng work again. No remio
//! process panics, and the run ends on its own. (One devmem process per access under TCG:
//! the run must fit `remio run --timeout`, so not every width at every offset.)
//!
//! And the same guest once its device model is dead: a window whose driver programmed rings at
//! the top of the address space is failed by the bridge (which walks those rings) without
//! panicking, and answers as a failed device.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

mod e2e_common;
use e2e_common::*;

/// The guest's script. Prints `HOSTILE-WINDOWS <n>`, `BASELINE-OK`, `GARBAGE-DONE <count>`,
/// `REBOUND <n>`, then `DISK-OK`, `RNG-BYTES <n>`, `WRITE-OK` when I/O works again.
const SCRIPT: &str = r#"
set -u
drv=/sys/bus/platform/drivers/virtio-mmio
pattern() { yes remio-hostile-0123456789 | head -c 1048576; }
check_disk() {
    pattern > /tmp/p
    timeout 30 dd if=/dev/vda of=/tmp/r bs=65536 count=16 iflag=direct 2>/dev/null
    cmp -s /tmp/p /tmp/r
}
proxy=
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat $d/vendor)" = 0x1b36 ] && [ "$(cat $d/device)" = 0x00ff ]; then proxy=$d; fi
done
[ -n "$proxy" ] || { echo NO-PROXY; exit 10; }
set -- $(head -n 1 $proxy/resource)
bar=$(($1)); bar_end=$(($2))
devs=$(cd $drv && ls -d virtio-mmio.*)
n=$(echo $devs | wc -w)
echo "HOSTILE-WINDOWS $n bar $(printf %x $bar)-$(printf %x $bar_end)"
check_disk && echo BASELINE-OK

for d in $devs; do echo $d > $drv/unbind; done
[ -z "$(cd $drv && ls -d virtio-mmio.* 2>/dev/null)" ] || { echo UNBIND-FAILED; exit 11; }

count=0
# Accesses devmem made (it fails when it cannot map the address: then it is not counted).
w() { devmem $(printf 0x%x $1) $2 $3 >/dev/null 2>&1 && count=$((count+1)); }
r() { devmem $(printf 0x%x $1) $2 >/dev/null 2>&1 && count=$((count+1)); }
i=0
while [ $i -lt $n ]; do
    b=$((bar + i * 0x200))
    # Status values out of order.
    for s in 0x4 0x80 0xff 0x2; do w $((b+0x70)) 32 $s; done
    # A proper handshake up to FEATURES_OK (VERSION_1 only), then a queue with a bad size,
    # rings at the top of the address space, unaligned; ready, DRIVER_OK, kicked.
    for s in 0 1 3; do w $((b+0x70)) 32 $s; done
    w $((b+0x24)) 32 1; w $((b+0x20)) 32 1; w $((b+0x70)) 32 0xb
    w $((b+0x38)) 32 0xffffffff
    w $((b+0x80)) 32 0xfffff000; w $((b+0x84)) 32 0xffffffff; w $((b+0x90)) 32 0xfffffff1
    w $((b+0x44)) 32 1; w $((b+0x70)) 32 0xf; w $((b+0x50)) 32 0
    w $((b+0x30)) 32 0xffffffff; w $((b+0x50)) 32 0xffffffff; r $((b+0x70)) 32
    # Every width at a register, in the config space and straddling into the next window
    # (past the last window for the last one).
    for o in 0x70 0x101 0x1fc; do
        for wd in 8 16 32 64; do w $((b+o)) $wd 0xffffffffffffffff; r $((b+o)) $wd; done
    done
    # Every register at 32 bits, all ones; the config space every 16 bytes, read back too.
    # (devmem maps the window: read(2)/write(2) of /dev/mem stop at the end of RAM on x86.)
    off=0
    while [ $off -lt 256 ]; do w $((b+off)) 32 0xffffffff; off=$((off+4)); done
    while [ $off -lt 512 ]; do w $((b+off)) 32 0xffffffff; r $((b+off)) 32; off=$((off+16)); done
    w $((b+0x70)) 32 0
    i=$((i+1))
done
# Past the last window, up to the end of the BAR.
a=$((bar + n * 0x200))
for wd in 8 16 32 64; do w $a $wd 0xffffffffffffffff; r $((bar_end - 7)) $wd; done
echo "GARBAGE-DONE $count"

for d in $devs; do echo $d > $drv/bind; done
echo "REBOUND $(cd $drv && ls -d virtio-mmio.* 2>/dev/null | wc -l)"
wait_disk
check_disk && echo DISK-OK
echo "RNG-BYTES $(timeout 30 dd if=/dev/hwrng bs=64 count=4 iflag=fullblock 2>/dev/null | wc -c)"
timeout 30 dd if=/tmp/p of=/dev/vda bs=65536 seek=32 count=16 oflag=direct 2>/dev/null &&
    timeout 30 dd if=/dev/vda of=/tmp/w bs=65536 skip=32 count=16 iflag=direct 2>/dev/null &&
    cmp -s /tmp/p /tmp/w && echo WRITE-OK
"#;

#[test]
fn garbage_in_every_register_of_every_window_then_rebinding_leaves_io_working() {
    if !prerequisites("e2e_hostile") {
        return;
    }
    let (_dir, img) = temp_image(64 << 20);
    let pattern: Vec<u8> = b"remio-hostile-0123456789\n"
        .iter()
        .copied()
        .cycle()
        .take(1 << 20)
        .collect();
    std::fs::write(&img, &pattern).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();

    let out = remio_exec(
        &with_wait_disk(SCRIPT),
        &["--disk", path_str(&img), "--no-console"],
    );

    let line = |prefix: &str| {
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
            .map(str::to_owned)
    };
    assert_eq!(out.status, Some(0), "the guest's script did not finish");
    for (what, text) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        assert!(
            !text.contains("panicked"),
            "a remio process panicked ({what})"
        );
    }
    // The bad queues were refused, said once by remio's rate-limited line, never by
    // virtio-queue's unthrottled one (a guest could flood the log with it).
    assert!(
        out.stderr.contains("activation failed"),
        "the bad queues never reached activation:\n{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains(" virtio_queue::"),
        "virtio-queue's own error lines reached the log"
    );
    let windows: u32 = line("HOSTILE-WINDOWS ")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(windows >= 2, "disk and rng windows");
    assert!(
        out.stdout.contains("BASELINE-OK"),
        "the disk read before the garbage"
    );
    let garbage: u32 = line("GARBAGE-DONE ").unwrap().parse().unwrap();
    assert!(garbage > 120 * windows, "only {garbage} accesses");
    assert_eq!(line("REBOUND ").unwrap(), windows.to_string());
    assert!(out.stdout.contains("DISK-OK"), "disk reads after rebinding");
    assert_eq!(line("RNG-BYTES ").unwrap(), "256", "rng after rebinding");
    assert!(
        out.stdout.contains("WRITE-OK"),
        "disk writes after rebinding"
    );
}

/// Where the guest of [`FAILOVER_SCRIPT`] writes [`MARKER`] on its disk, in 512-byte sectors.
const MARKER_SECTOR: u64 = 2048;
const MARKER: &[u8] = b"REMIO-HOSTILE-RINGS-PROGRAMMED";

/// The guest's script for the failover test: the rng window gets a proper handshake and a queue
/// whose rings lie at the top of the address space, made ready, DRIVER_OK; the guest then
/// writes [`MARKER`] to its disk (the host kills the device model when it sees it) and waits
/// for the disk to fail. The bridge fails both windows, walking the rng's rings.
const FAILOVER_SCRIPT: &str = r#"
set -u
drv=/sys/bus/platform/drivers/virtio-mmio
# The windows share a page, and devmem may map it only when no driver holds any of them:
# unbind both, program the rng's window, rebind the disk.
for d in $(cd $drv && ls -d virtio-mmio.*); do
    case "$(cat $drv/$d/virtio*/device)" in
        0x0004) rng=$d ;;
        0x0002) disk=$d ;;
    esac
done
echo $rng > $drv/unbind
echo $disk > $drv/unbind
# Its window: the platform device's memory resource, named after it in /proc/iomem.
b=$((0x$(grep " : $rng\$" /proc/iomem | head -n 1 | sed 's/^ *\([0-9a-f]*\)-.*/\1/')))
echo "RNG-DEVICE-ID $(devmem $(printf 0x%x $((b + 8))) 32)"
w() { devmem $(printf 0x%x $1) 32 $2; }
for s in 0 1 3; do w $((b+0x70)) $s; done
w $((b+0x24)) 1; w $((b+0x20)) 1; w $((b+0x24)) 0; w $((b+0x20)) 0; w $((b+0x70)) 0xb
w $((b+0x30)) 0; w $((b+0x38)) 256
for lo in 0x80 0x90 0xa0; do w $((b+lo)) 0xfffff000; w $((b+lo+4)) 0xffffffff; done
w $((b+0x44)) 1; w $((b+0x70)) 0xf
echo "RNG-STATUS $(devmem $(printf 0x%x $((b + 0x70))) 32)"
echo $disk > $drv/bind
wait_disk
echo REMIO-HOSTILE-RINGS-PROGRAMMED | dd of=/dev/vda bs=512 seek=2048 conv=sync oflag=direct 2>/dev/null
echo PROGRAMMED
n=0
while timeout 10 dd if=/dev/vda of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null; do
    n=$((n+1)); [ $n -lt 600 ] || { echo DISK-NEVER-FAILED; exit 12; }; sleep 0.2
done
echo DISK-FAILED
"#;

#[test]
fn a_dead_device_models_window_with_rings_at_the_top_of_memory_fails_without_panicking() {
    if !prerequisites("e2e_hostile") {
        return;
    }
    let (_dir, img) = temp_image(16 << 20);
    let out = remio_exec_with(
        &with_wait_disk(FAILOVER_SCRIPT),
        &[
            "--disk",
            path_str(&img),
            "--no-console",
            "--access-timeout-ms",
            "2000",
            // The failed-device path: no restart.
            "--dm-restarts",
            "0",
        ],
        |pid| {
            let start = Instant::now();
            let file = std::fs::File::open(&img).unwrap();
            let mut buf = [0u8; MARKER.len()];
            // The guest writes the marker once its hostile rings are programmed.
            while start.elapsed() < GUEST_TIMEOUT {
                if file.read_exact_at(&mut buf, MARKER_SECTOR * 512).is_ok() && buf == MARKER {
                    let dm = dm_child(pid).expect("remio run has no device-model process");
                    // SAFETY: kill(2) on a pid we found as our child's child; no memory involved.
                    let r = unsafe { libc::kill(dm, libc::SIGKILL) };
                    assert_eq!(r, 0);
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        },
    );

    for (what, text) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        assert!(
            !text.contains("panicked"),
            "a remio process panicked ({what})"
        );
    }
    assert_eq!(out.status, Some(0), "the guest's script did not finish");
    assert!(
        out.stdout.contains("RNG-DEVICE-ID 0x00000004"),
        "the last window is the rng"
    );
    assert!(out.stdout.contains("DISK-FAILED"));
    assert!(
        out.stdout.contains("RNG-STATUS 0x0000004F"),
        "the device model took DRIVER_OK on those rings and asked for a reset"
    );
    assert!(
        out.stderr
            .contains("failover: queue 0 (size 256, rings 0xfffffffffffff000"),
        "the bridge looked at the rng's rings and refused them"
    );
}
