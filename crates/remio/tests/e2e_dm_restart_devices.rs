//! Issue 14 for the devices other than the disk: a device model SIGKILLed while the guest uses
//! them comes back (restarted by `remio run`) and the guest goes on.
//!
//! - console: a line sent to the guest before the kill and one after both come back echoed
//!   (the host reconnects to the console socket the new device model binds again);
//! - rng: the guest reads /dev/hwrng across the kill and every read returns its bytes;
//! - net: a ping stream across the kill loses at most the packets sent during the pause (needs
//!   root and /dev/net/tun for `--net auto`, like e2e_net; with REMIO_REQUIRE_GUEST=1 it fails
//!   instead of skipping).
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

mod e2e_common;
use e2e_common::*;

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

fn kill(dm: i32) {
    // SAFETY: kill(2) on our child's child, found just now; no memory involved.
    assert_eq!(unsafe { libc::kill(dm, libc::SIGKILL) }, 0);
}

/// Reads from `s` until `needle` has been seen or `deadline` passes; returns all that was read.
fn read_until(s: &mut UnixStream, needle: &str, deadline: Instant) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains(needle) && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("console socket: {e}"),
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// Connects (retrying until `deadline`) to the console socket.
fn connect(path: &Path, deadline: Instant) -> UnixStream {
    loop {
        match UnixStream::connect(path) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                return s;
            }
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "console socket never came up: {e}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

#[test]
fn console_and_rng_work_across_a_device_model_kill() {
    if !prerequisites("e2e_dm_restart_devices") {
        return;
    }
    let (dir, img) = temp_image(16 << 20);
    let sock = dir.as_path().join("console.sock");
    let config = dir.as_path().join("devices.toml");
    std::fs::write(
        &config,
        format!(
            "[[device]]\ndm_id = 0\ntype = \"block\"\nmmio_base = 0x10000000\npath = \"{}\"\n\n\
             [[device]]\ndm_id = 1\ntype = \"console\"\nmmio_base = 0x10000200\n\
             backend = \"socket\"\nsocket = \"{}\"\n\n\
             [[device]]\ndm_id = 2\ntype = \"rng\"\nmmio_base = 0x10000400\n",
            path_str(&img),
            path_str(&sock)
        ),
    )
    .unwrap();
    // rng: 32-byte reads every 0.1 s in the background, across the kill. console: echo one
    // line, then another (the second is sent after the kill).
    let script =
        "(i=0; while [ $i -lt 60 ]; do dd if=/dev/hwrng bs=32 count=1 2>/dev/null | wc -c; \
                    i=$((i+1)); sleep 0.1; done > /tmp/rng.log) & rng=$!; \
                  stty -F /dev/hvc0 -echo; exec 3<>/dev/hvc0; echo READY >&3; \
                  read -r a <&3; echo \"echo:$a\" >&3; read -r b <&3; echo \"echo:$b\" >&3; \
                  echo GOT \"$a\" \"$b\"; wait $rng; \
                  echo RNG $(grep -c '^32$' /tmp/rng.log) OF $(wc -l < /tmp/rng.log)";
    let mut host_side = String::new();
    let out = remio_exec_with(script, &["--config", path_str(&config)], |pid| {
        let deadline = Instant::now() + GUEST_TIMEOUT / 2;
        let dm = wait_dm(pid, None);
        let mut s = connect(&sock, deadline);
        host_side = read_until(&mut s, "READY", deadline);
        assert!(host_side.contains("READY"), "no READY: {host_side:?}");
        s.write_all(b"before-kill-17\n").unwrap();
        host_side.push_str(&read_until(&mut s, "echo:before-kill-17", deadline));
        kill(dm);
        drop(s);
        wait_dm(pid, Some(dm));
        // The new device model binds the console socket again (the dead one's refuses
        // connections: its listening socket went with it).
        let mut s = connect(&sock, deadline);
        s.write_all(b"after-kill-42\n").unwrap();
        host_side.push_str(&read_until(&mut s, "echo:after-kill-42", deadline));
    });

    assert_eq!(out.status, Some(0), "the guest did not finish its script");
    assert!(
        host_side.contains("echo:before-kill-17") && host_side.contains("echo:after-kill-42"),
        "console output before and after the kill: {host_side:?}"
    );
    assert!(
        out.stdout.contains("GOT before-kill-17 after-kill-42"),
        "console input before and after the kill"
    );
    assert!(
        out.stdout.lines().any(|l| l == "RNG 60 OF 60"),
        "every rng read across the kill returned its bytes"
    );
}

/// Whether this process may make TAP interfaces (what `--net auto` needs).
fn can_make_taps() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Path::new("/dev/net/tun").exists()
}

#[test]
fn a_ping_stream_loses_only_the_pause_across_a_device_model_kill() {
    if !prerequisites("e2e_dm_restart_devices") {
        return;
    }
    if !can_make_taps() {
        let why = "cannot create a TAP (needs root and /dev/net/tun)";
        assert!(
            !guest_required(),
            "e2e_dm_restart_devices: REMIO_REQUIRE_GUEST=1 but {why}"
        );
        eprintln!("\n*** SKIPPED e2e_dm_restart_devices (net): {why} ***\n");
        return;
    }
    // 50 pings 0.1 s apart; the kill lands in the middle of the stream.
    let script = "ping -c 50 -i 0.1 -W 2 10.77.0.1 | tail -3";
    let mut at_kill = 0;
    let out = remio_exec_with(
        script,
        &["--net", "auto", "--no-console", "--no-rng"],
        |pid| {
            let dm = wait_dm(pid, None);
            // The TAP `remio run` made: kill once the guest's pings flow through it.
            let rx = format!(
                "/sys/class/net/remio-{}/statistics/rx_packets",
                pid % 10_000_000
            );
            let packets = || {
                std::fs::read_to_string(&rx)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let deadline = Instant::now() + GUEST_TIMEOUT / 2;
            while packets() < 15 {
                assert!(Instant::now() < deadline, "no pings through {rx}");
                std::thread::sleep(Duration::from_millis(20));
            }
            at_kill = packets();
            kill(dm);
            wait_dm(pid, Some(dm));
        },
    );

    assert_eq!(out.status, Some(0), "the guest did not finish its script");
    let received: u32 = out
        .stdout
        .split(',')
        .find_map(|part| {
            let part = part.trim();
            part.strip_suffix(" packets received")
                .or_else(|| part.strip_suffix(" received"))
                .and_then(|n| n.trim().parse().ok())
        })
        .expect("ping's summary");
    eprintln!(
        "e2e_dm_restart_devices: net: {received} of 50 pings answered across the kill (made \
         after {at_kill} frames from the guest)"
    );
    assert!(at_kill < 50, "the kill came after the ping stream");
    assert!(
        received >= 40,
        "{} pings lost: more than a pause's worth",
        50 - received
    );
    assert!(
        out.stderr.contains("restarting it in"),
        "the device model was restarted"
    );
}
