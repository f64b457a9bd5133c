//! Console echo both ways through remio: `remio run --config` serves a virtio console on a UNIX
//! socket; the guest says READY on /dev/hvc0, the test sends a line into the socket, the guest
//! reads it from /dev/hvc0 and writes it back with a prefix, and the test reads that back.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

mod e2e_common;
use e2e_common::*;

/// Reads from `s` until `needle` has been seen or `deadline` passes; returns all that was read.
fn read_until(s: &mut UnixStream, needle: &str, deadline: Instant) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains(needle) && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("console socket: {e}"),
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

fn connect(path: &Path, deadline: Instant) -> UnixStream {
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
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
fn a_line_sent_to_the_console_socket_comes_back_from_the_guest() {
    if !prerequisites("e2e_console") {
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
             backend = \"socket\"\nsocket = \"{}\"\n",
            path_str(&img),
            path_str(&sock)
        ),
    )
    .unwrap();
    let script = "stty -F /dev/hvc0 -echo; exec 3<>/dev/hvc0; echo READY >&3; \
                  read -r line <&3; echo \"echo:$line\" >&3; echo GOT \"$line\"";
    let mut host_side = String::new();
    let out = remio_exec_with(script, &["--config", path_str(&config)], |_| {
        let deadline = Instant::now() + GUEST_TIMEOUT / 2;
        let mut s = connect(&sock, deadline);
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        host_side = read_until(&mut s, "READY", deadline);
        assert!(
            host_side.contains("READY"),
            "the guest never said READY: {host_side:?}"
        );
        s.write_all(b"hello-remio-4711\n").unwrap();
        host_side.push_str(&read_until(&mut s, "echo:hello-remio-4711", deadline));
    });
    assert_eq!(out.status, Some(0));
    assert!(
        out.stdout.contains("GOT hello-remio-4711"),
        "the guest read the host's line"
    );
    assert!(
        host_side.contains("echo:hello-remio-4711"),
        "the host read the guest's answer: {host_side:?}"
    );
}
