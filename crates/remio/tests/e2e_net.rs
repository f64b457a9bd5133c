//! virtio-net through remio, the way the demo sets it up: `remio run --net auto` makes a TAP
//! (host 10.77.0.1/24), the guest's /init configures eth0 (10.77.0.2/24) from `remio.net=`, and
//! the guest pings the host. Skips loudly when no TAP can be made (not root, no /dev/net/tun),
//! besides the usual QEMU / guest checks; with REMIO_REQUIRE_GUEST=1 (scripts/test) it fails
//! instead.
#![allow(clippy::unwrap_used)]

mod e2e_common;
use e2e_common::*;

/// Whether this process may make TAP interfaces (what `--net auto` needs).
fn can_make_taps() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && std::path::Path::new("/dev/net/tun").exists()
}

#[test]
fn guest_pings_the_host_over_virtio_net() {
    if !prerequisites("e2e_net") {
        return;
    }
    if !can_make_taps() {
        let why = "cannot create a TAP (needs root and /dev/net/tun)";
        // Under scripts/test (CI) a skip would hide a broken setup: fail instead.
        assert!(
            !guest_required(),
            "e2e_net: REMIO_REQUIRE_GUEST=1 but {why}"
        );
        eprintln!("\n*** SKIPPED e2e_net: {why} ***\n");
        return;
    }
    let script =
        "cat /sys/class/net/eth0/address; ip -o addr show dev eth0; ping -c 3 -W 5 10.77.0.1";
    let mut remio_pid = 0;
    let out = remio_exec_with(
        script,
        &["--net", "auto", "--no-console", "--no-rng"],
        |pid| remio_pid = pid,
    );
    assert_eq!(out.status, Some(0), "ping failed");
    assert!(out.stdout.contains("10.77.0.2/24"), "eth0 got its address");
    assert!(out.stdout.contains("3 packets received") || out.stdout.contains("3 received"));
    // The TAP `remio run` made (named after its pid) is gone with it.
    let tap = format!("/sys/class/net/remio-{}", remio_pid % 10_000_000);
    assert!(!std::path::Path::new(&tap).exists(), "{tap} left behind");
}
