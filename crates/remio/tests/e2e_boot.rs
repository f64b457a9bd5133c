//! Boot and probe: every device the demo serves (block, console, rng) is found by its stock
//! guest driver, and the guest's console echoes through the virtio console.
#![allow(clippy::unwrap_used)]

mod e2e_common;
use e2e_common::*;

#[test]
fn guest_probes_block_console_and_rng_served_through_remio() {
    if !prerequisites("e2e_boot") {
        return;
    }
    let script = r#"
for d in /sys/bus/virtio/devices/*; do echo "VIRTIO $(cat $d/device) $(basename $(readlink $d/driver))"; done
test -b /dev/vda && echo "BLOCK $(cat /sys/block/vda/size)"
test -c /dev/hvc0 && echo HVC0
echo "RNG $(cat /sys/class/misc/hw_random/rng_current)"
"#;
    let out = remio_exec(script, &[]);
    assert_eq!(out.status, Some(0));
    assert!(
        out.stdout.contains("VIRTIO 0x0002 virtio_blk"),
        "virtio-blk bound"
    );
    assert!(
        out.stdout.contains("VIRTIO 0x0003 virtio_console"),
        "virtio-console bound"
    );
    assert!(
        out.stdout.contains("VIRTIO 0x0004 virtio_rng"),
        "virtio-rng bound"
    );
    // 64 MiB demo disk = 131072 sectors.
    assert!(out.stdout.contains("BLOCK 131072"));
    assert!(out.stdout.contains("HVC0"));
    assert!(out.stdout.contains("RNG virtio_rng"));
}

#[test]
fn exec_exit_status_of_the_guest_command_is_remio_run_exit_status() {
    if !prerequisites("e2e_boot") {
        return;
    }
    let out = remio_exec("echo from-the-guest; exit 7", &["--no-console", "--no-rng"]);
    assert_eq!(out.status, Some(7));
    assert_eq!(out.stdout.trim(), "from-the-guest");
}

#[test]
fn virtio_console_carries_guest_output_to_the_host() {
    if !prerequisites("e2e_boot") {
        return;
    }
    // The device model writes what the guest sends on /dev/hvc0 to its stdout, which
    // `remio run` inherits. The guest powers off right after writing (hvc's write returns once
    // the device has taken the bytes), and a last line without its newline still arrives.
    let out = remio_exec(
        "echo remio-console-echo-4711 > /dev/hvc0; printf remio-no-newline-4712 > /dev/hvc0",
        &[],
    );
    assert_eq!(out.status, Some(0));
    assert!(out.stdout.contains("remio-console-echo-4711"));
    assert!(out.stdout.contains("remio-no-newline-4712"));
}

#[test]
fn a_device_model_that_cannot_start_fails_remio_run_before_the_guest_boots() {
    if !prerequisites("e2e_boot") {
        return;
    }
    // A TAP name longer than IFNAMSIZ: the device model refuses it and exits.
    let out = remio_exec("echo booted", &["--net", "remio-name-too-long-for-a-tap"]);
    assert_eq!(out.status, Some(1));
    assert!(out.stderr.contains("the device model failed to start"));
    assert!(out.stderr.contains("TAP name must be 1 to 15 bytes"));
    assert!(
        !out.stdout.contains("booted"),
        "the guest must not have run"
    );
    assert!(
        !out.stderr.contains("QEMU pid"),
        "QEMU must not have started"
    );
}
