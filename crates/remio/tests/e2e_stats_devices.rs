//! `remio stats` counts what the guest did on its console and its network card: the console's
//! bytes exactly (the host gives the guest a 3000-byte line of input on the console socket,
//! the guest writes 4000 bytes of output), the network card's frames and bytes exactly as the
//! guest's own eth0 counters (read while the link is quiet) after it pinged the host.
//!
//! Needs QEMU and the guest artifacts (skips loudly without, fails under
//! REMIO_REQUIRE_GUEST=1), and for the network part a TAP (root and /dev/net/tun).
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

mod e2e_common;
use e2e_common::*;

/// Input bytes the host gives the guest on the console.
const INPUT: usize = 3000;
/// Output bytes the guest writes to the console.
const OUTPUT: usize = 4000;
/// Pings.
const PINGS: u64 = 5;
/// Bytes of one ping's frame: Ethernet 14 + IPv4 20 + ICMP 8 + 56 data.
const PING_FRAME: u64 = 98;

/// Whether this process may make TAP interfaces (what `--net auto` needs).
fn can_make_taps() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && std::path::Path::new("/dev/net/tun").exists()
}

/// The device (of the `remio stats --json` document `v`) whose description contains `what`.
fn device<'a>(v: &'a serde_json::Value, what: &str) -> &'a serde_json::Value {
    v["dms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["device"])
        .find(|d| {
            d["description"]
                .as_str()
                .is_some_and(|s| s.to_lowercase().contains(what))
        })
        .unwrap_or_else(|| panic!("no {what} device in {v:#}"))
}

/// Counter `table`/`key` of a device (0 when absent: kinds with none are left out).
fn get(dev: &serde_json::Value, table: &str, key: &str) -> u64 {
    dev[table][key].as_u64().unwrap_or(0)
}

#[test]
fn remio_stats_counts_the_guests_console_bytes_and_network_frames() {
    if !prerequisites("e2e_stats_devices") {
        return;
    }
    let net = can_make_taps();
    if !net {
        let why = "cannot create a TAP (needs root and /dev/net/tun): console part only";
        assert!(
            !guest_required(),
            "e2e_stats_devices: REMIO_REQUIRE_GUEST=1 but {why}"
        );
        eprintln!("\n*** PARTLY SKIPPED e2e_stats_devices: {why} ***\n");
    }
    let runtime = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/remio-e2e-xdg").unwrap();
    let stats = || {
        let out = Command::new(env!("CARGO_BIN_EXE_remio"))
            .args(["stats", "--json"])
            .env("XDG_RUNTIME_DIR", runtime.as_path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let console_sock = runtime.as_path().join("console.sock");

    let _lock = boot_lock();
    // The guest's side: the console on fd 3 without echo (set on the open descriptor: the
    // settings of a console nobody holds open are reset); READY; read one line of INPUT
    // bytes; write OUTPUT bytes; ping; then its eth0 counters, once per line the host sends,
    // until the host has seen them stable around its own reading.
    let net_part = if net {
        "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 2>/dev/null; \
         ping -c 5 -W 5 10.77.0.1 >/dev/null; echo PING-STATUS $?; \
         s=/sys/class/net/eth0/statistics; \
         while :; do echo NET $(cat $s/tx_packets $s/tx_bytes $s/rx_packets $s/rx_bytes); \
         read -r more <&3; [ \"$more\" = n ] || break; done; "
    } else {
        ""
    };
    let script = format!(
        "exec 3<>/dev/hvc0; stty -echo <&3; echo IO-READY; \
         read -r line <&3; echo GOT ${{#line}}; head -c {OUTPUT} /dev/zero >&3; \
         echo CONSOLE-DONE; {net_part}echo IO-DONE"
    );
    let mut cmd = remio_run_console_command(&console_sock, &script);
    cmd.env("XDG_RUNTIME_DIR", runtime.as_path());
    if net {
        cmd.args(["--net", "auto"]);
    } else {
        cmd.arg("--no-net");
    }
    let run = LiveRun::spawn(&mut cmd);
    let wait_for = |marker: &str| run.wait_for(marker);
    let deadline = run.deadline();

    wait_for("IO-READY");
    let v0 = stats();
    let mut console = connect_until(&console_sock, deadline);
    console
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // One line: INPUT - 1 bytes and its newline.
    let mut line = vec![b'y'; INPUT - 1];
    line.push(b'\n');
    console.write_all(&line).unwrap();
    wait_for(&format!("GOT {}", INPUT - 1));
    let mut out = vec![0xffu8; OUTPUT];
    if let Err(e) = console.read_exact(&mut out) {
        panic!("the guest's output did not arrive ({e}): {:#}", stats());
    }
    assert!(
        out.iter().all(|&b| b == 0),
        "the guest's output arrived, and nothing else: {} zero bytes, and {:?}",
        out.iter().filter(|&&b| b == 0).count(),
        String::from_utf8_lossy(&out.iter().copied().filter(|&b| b != 0).collect::<Vec<u8>>())
    );
    wait_for("CONSOLE-DONE");
    // The guest has written all it writes on the console until the host sends more.
    let v1 = stats();

    let (c0, c1) = (device(&v0, "console"), device(&v1, "console"));
    assert_eq!(
        get(c1, "bytes", "read") - get(c0, "bytes", "read"),
        INPUT as u64,
        "console input given to the guest: {c1:#}"
    );
    assert_eq!(
        get(c1, "bytes", "write") - get(c0, "bytes", "write"),
        OUTPUT as u64,
        "console output of the guest: {c1:#}"
    );
    assert!(get(c1, "requests", "write") > get(c0, "requests", "write"));
    assert!(get(c1, "requests", "read") > get(c0, "requests", "read"));
    assert_eq!(c1["drops"], serde_json::json!({}), "{c1:#}");

    if net {
        let pinged = wait_for("PING-STATUS ").ends_with("PING-STATUS 0");
        // The guest prints its eth0 counters; the host reads remio's, then asks for the
        // guest's again. When the two guest readings are equal, no frame moved meanwhile and
        // remio's must be exactly the guest's. The link can be busy (the host's own IPv6 or
        // multicast chatter): try up to 10 times.
        let parse = |line: &str| -> Vec<u64> {
            line.split_once("NET ")
                .unwrap()
                .1
                .split_whitespace()
                .map(|x| x.parse().unwrap())
                .collect()
        };
        let mut guest = parse(&wait_for("NET "));
        let mut exact = None;
        for _ in 0..10 {
            let v = stats();
            console.write_all(b"n\n").unwrap();
            let again = parse(&wait_for("NET "));
            if again == guest {
                exact = Some((v, again));
                break;
            }
            guest = again;
        }
        console.write_all(b"stop\n").unwrap();
        let (v, guest) = exact.expect("the guest's link never stayed quiet for a reading");
        let dev = device(&v, "net");
        eprintln!("guest eth0 tx/rx: {guest:?}; remio: {dev:#}");
        let (tx_packets, tx_bytes, rx_packets, rx_bytes) = (guest[0], guest[1], guest[2], guest[3]);
        assert_eq!(get(dev, "requests", "write"), tx_packets, "frames sent");
        assert_eq!(get(dev, "bytes", "write"), tx_bytes, "bytes sent");
        assert_eq!(get(dev, "requests", "read"), rx_packets, "frames received");
        assert_eq!(get(dev, "bytes", "read"), rx_bytes, "bytes received");
        assert!(
            tx_packets >= 1 && tx_bytes >= 42,
            "at least an ARP request went out"
        );
        if pinged {
            assert!(tx_packets >= PINGS && rx_packets >= PINGS);
            assert!(tx_bytes >= PINGS * PING_FRAME && rx_bytes >= PINGS * PING_FRAME);
        } else {
            // The host's side of the TAP did not answer (its network is not ours to fix);
            // the counts above are still checked exactly.
            eprintln!("\n*** e2e_stats_devices: the host did not answer the pings ***\n");
        }
        assert_eq!(dev["errors"].as_u64(), Some(0));
    }
    wait_for("IO-DONE");
    let (status, _) = run.finish();
    assert!(status.success(), "remio run: {status}");
}
