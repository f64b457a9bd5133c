//! Console echo both ways through remio: `remio run --config` serves a virtio console on a UNIX
//! socket; the guest says READY on /dev/hvc0, the test sends a line into the socket, the guest
//! reads it from /dev/hvc0 and writes it back with a prefix, and the test reads that back.
#![allow(clippy::unwrap_used)]

mod e2e_common;
use e2e_common::*;

#[test]
fn a_line_sent_to_the_console_socket_comes_back_from_the_guest() {
    if !prerequisites("e2e_console") {
        return;
    }
    let (out, host_side) = console_echo_run(GUEST_TIMEOUT / 2, |script, extra, during| {
        remio_exec_with(script, extra, during)
    });
    assert!(
        host_side.contains("READY"),
        "the guest never said READY: {host_side:?}"
    );
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
