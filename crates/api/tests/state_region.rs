//! The DM's state region ([`DmSession::state_region`]), in-process and over the socket: the
//! same file for every session of the DM, kept across a session's end.
#![allow(clippy::unwrap_used)]

#[expect(
    dead_code,
    reason = "the shared stack has helpers these tests do not use"
)]
mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::Stack;
use remio_api::STATE_REGION_MAX;

const TIMEOUT: Duration = Duration::from_secs(10);

fn survives_the_session_and_is_the_dms_own(stack: &Stack) {
    let api = stack.api();
    let first = api.open(0).unwrap();
    let region = first.state_region(8192).unwrap();
    assert_eq!(region.metadata().unwrap().len(), 8192);
    region.write_all_at(b"recorded", 100).unwrap();
    drop(first);

    // The next session of DM 0 (a restarted device model) gets the same bytes back.
    let second = api.open(0).unwrap();
    let again = second.state_region(8192).unwrap();
    let mut buf = [0u8; 8];
    again.read_exact_at(&mut buf, 100).unwrap();
    assert_eq!(&buf, b"recorded");

    // DM 1's region is its own.
    let other = api.open(1).unwrap().state_region(8192).unwrap();
    other.read_exact_at(&mut buf, 100).unwrap();
    assert_eq!(buf, [0; 8]);
}

fn bad_lengths_are_refused(stack: &Stack) {
    let api = stack.api();
    let s = api.open(0).unwrap();
    assert_eq!(s.state_region(0).unwrap_err().errno(), libc::EINVAL);
    assert_eq!(
        s.state_region(STATE_REGION_MAX + 1).unwrap_err().errno(),
        libc::EINVAL
    );
    s.state_region(4096).unwrap();
    // It cannot grow afterwards: a larger request names the conflict.
    assert_eq!(s.state_region(8192).unwrap_err().errno(), libc::EEXIST);
    // Sealed: nobody can shrink it under the other side's mapping.
    assert!(s.state_region(4096).unwrap().set_len(0).is_err());
}

#[test]
fn in_process_survives_the_session_and_is_the_dms_own() {
    survives_the_session_and_is_the_dms_own(&Stack::new(TIMEOUT));
}

#[test]
fn socket_survives_the_session_and_is_the_dms_own() {
    survives_the_session_and_is_the_dms_own(&Stack::new(TIMEOUT).with_socket("state1.sock"));
}

#[test]
fn in_process_bad_lengths_are_refused() {
    bad_lengths_are_refused(&Stack::new(TIMEOUT));
}

#[test]
fn socket_bad_lengths_are_refused() {
    bad_lengths_are_refused(&Stack::new(TIMEOUT).with_socket("state2.sock"));
}
