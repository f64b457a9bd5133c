//! `remio run --vsock CID`: remio starts vhost-device-vsock and the guest gets a virtio-vsock
//! device through remio's vhost-user frontend. 1 MiB goes from the guest to an echo on the
//! host and back unchanged, and 1 MiB from the host to an echo in the guest and back (the
//! guest's side is guest/tools/vsock.c, installed as /usr/bin/vsock).
//!
//! The host side is vhost-device-vsock's: the guest's connections to CID 2 port P reach a UNIX
//! socket listening at `<host socket>_P`; a host program connects to `<host socket>` and says
//! `CONNECT <port>\n` (answer `OK <n>\n`). remio prints the host socket; the test finds it in
//! the run directory (`$TMPDIR/remio-run-<pid>-*`).
//!
//! vhost-device-vsock comes from scripts/setup (target/tools/bin); `REMIO_VHOST_DEVICE_VSOCK`
//! names another binary. Without it the test skips loudly (fails with REMIO_REQUIRE_GUEST=1).
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod e2e_common;
use e2e_common::*;

const MIB: usize = 1 << 20;
const GUEST_CID: &str = "7";
const HOST_PORT: u32 = 5000;
const GUEST_PORT: u32 = 5001;

/// Echoes one connection accepted on `listener` (within `limit`) until the peer shuts down
/// its write side.
fn echo_one(listener: &UnixListener, limit: Duration) -> std::io::Result<usize> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + limit;
    let mut s = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    };
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(GUEST_TIMEOUT))?;
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0;
    // Until MIB bytes, not until EOF: vhost-device-vsock 0.3 does not pass a half-close
    // (shutdown of one direction) across, only the close of the whole connection.
    while total < MIB {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n])?;
        total += n;
    }
    Ok(total)
}

/// Reads until `buf` is full or the stream ends or fails; returns how much was read.
fn read_full(s: &mut UnixStream, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    got
}

/// Connects to the guest's port through the host socket (`CONNECT`), retrying when the daemon
/// hangs up (nobody listens on the port), and sends `data`; returns what comes back.
fn round_trip_to_guest(host: &Path, port: u32, data: &[u8], limit: Duration) -> Vec<u8> {
    let deadline = Instant::now() + limit;
    let mut s = loop {
        assert!(
            Instant::now() < deadline,
            "the guest never accepted on {port}"
        );
        let Ok(mut s) = UnixStream::connect(host) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        // The daemon hangs up on a CONNECT it cannot serve yet (the guest's device is not up,
        // nobody listens on the port): try again.
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        if s.write_all(format!("CONNECT {port}\n").as_bytes()).is_err() {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        if line.starts_with(b"OK ") {
            break s;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut w = s.try_clone().unwrap();
    let data_w = data.to_vec();
    // No half-close (see echo_one): write everything, read as much back, then close.
    let writer = std::thread::spawn(move || w.write_all(&data_w));
    let mut back = vec![0u8; data.len()];
    s.set_read_timeout(Some(GUEST_TIMEOUT)).unwrap();
    let got = read_full(&mut s, &mut back);
    back.truncate(got);
    let _ = writer.join();
    back
}

#[test]
fn one_mib_round_trips_guest_to_host_echo_and_host_to_guest_echo_over_vsock() {
    if !prerequisites("e2e_vsock") {
        return;
    }
    if daemon_or_skip(
        "e2e_vsock",
        "REMIO_VHOST_DEVICE_VSOCK",
        "vhost-device-vsock",
    )
    .is_none()
    {
        return;
    }
    let (_dir, img) = temp_image(16 << 20);
    let script = format!(
        "vsock echo {GUEST_PORT} & echo_pid=$!; \
         head -c {MIB} /dev/urandom > /tmp/a; \
         timeout 40 vsock connect 2 {HOST_PORT} < /tmp/a > /tmp/b || echo G2H-CONNECT-FAILED; \
         echo \"G2H-SIZE $(wc -c < /tmp/b)\"; \
         cmp /tmp/a /tmp/b && echo G2H-SAME; \
         wait $echo_pid; echo H2G-ECHO-DONE"
    );
    let data: Vec<u8> = (0..MIB)
        .map(|i| u8::try_from((i * 7 + i / 4096) % 256).unwrap())
        .collect();
    let result = Arc::new(Mutex::new((None::<usize>, None::<Vec<u8>>)));
    let result_w = Arc::clone(&result);
    let data_w = data.clone();

    let out = remio_exec_with(
        &script,
        &["--disk", path_str(&img), "--vsock", GUEST_CID],
        move |pid| {
            let Some(host) = run_dir_socket(pid, "vsock", Duration::from_secs(60)) else {
                return;
            };
            let mut port_path = host.clone().into_os_string();
            port_path.push(format!("_{HOST_PORT}"));
            let listener = UnixListener::bind(&port_path).unwrap();
            // Guest to host first: the guest starts its own echo before it connects, so once
            // this is done the guest listens and one CONNECT reaches it.
            let echoed = echo_one(&listener, GUEST_TIMEOUT).ok();
            result_w.lock().unwrap().0 = echoed;
            let back = round_trip_to_guest(&host, GUEST_PORT, &data_w, GUEST_TIMEOUT);
            result_w.lock().unwrap().1 = Some(back);
        },
    );

    assert_eq!(
        out.status,
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stderr.contains("host programs connect to"),
        "remio prints the host socket:\n{}",
        out.stderr
    );
    let (echoed, back) = result.lock().unwrap().clone();
    assert_eq!(echoed, Some(MIB), "the host echo's byte count");
    assert!(
        out.stdout.contains(&format!("G2H-SIZE {MIB}")),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("G2H-SAME"), "{}", out.stdout);
    let back = back.expect("the host never reached the guest's echo");
    assert_eq!(back.len(), MIB, "bytes echoed by the guest");
    assert!(back == data, "the guest echoed other bytes");
    assert!(out.stdout.contains("H2G-ECHO-DONE"), "{}", out.stdout);
}
