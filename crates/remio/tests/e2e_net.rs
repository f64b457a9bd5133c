//! virtio-net through remio: the guest pings the host over a TAP interface this test creates
//! (an address on this machine only). Skips loudly when no TAP can be made (not root, no
//! /dev/net/tun), besides the usual QEMU / guest checks.
#![allow(clippy::unwrap_used)]

use std::process::Command;

mod e2e_common;
use e2e_common::*;

const TAP: &str = "remio-e2e0";

struct Tap;

impl Tap {
    fn create() -> Option<Self> {
        let ip = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        let _ = Command::new("ip").args(["link", "del", TAP]).status();
        if !ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]) {
            return None;
        }
        let tap = Tap;
        (ip(&["addr", "add", "10.77.0.1/24", "dev", TAP]) && ip(&["link", "set", TAP, "up"]))
            .then_some(tap)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", TAP]).status();
    }
}

#[test]
fn guest_pings_the_host_over_virtio_net() {
    if !prerequisites("e2e_net") {
        return;
    }
    let Some(_tap) = Tap::create() else {
        eprintln!(
            "\n*** SKIPPED e2e_net: cannot create TAP {TAP} (needs root and /dev/net/tun) ***\n"
        );
        return;
    };
    let script =
        "ip addr add 10.77.0.2/24 dev eth0 && ip link set eth0 up && ping -c 3 -W 5 10.77.0.1";
    let out = remio_exec(script, &["--net", TAP, "--no-console", "--no-rng"]);
    assert_eq!(out.status, Some(0), "ping failed");
    assert!(out.stdout.contains("3 packets received") || out.stdout.contains("3 received"));
}
