//! The interactive demo (`remio run` without --exec), driven without a terminal: its virtio
//! console on a UNIX socket (`--console-socket`) instead of this terminal. The guest's shell must
//! be on /dev/hvc0, the demo disk an ext4 image with the README mounted at /mnt, the summary
//! block printed before the boot, and `remio run`'s exit status the shell's.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod e2e_common;
use e2e_common::*;

/// Kills `remio run` if the test fails while it runs.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Reads from `s` into `seen` until `needle` appears after `from` or `deadline` passes.
fn read_until(s: &mut UnixStream, seen: &mut String, from: usize, needle: &str, deadline: Instant) {
    let mut buf = [0u8; 4096];
    while !seen[from..].contains(needle) && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("console socket: {e}"),
        }
    }
}

#[test]
fn the_demo_shell_is_on_hvc0_with_the_readme_disk_and_its_exit_status_is_remios() {
    if !prerequisites("e2e_demo") {
        return;
    }
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/remio-e2e").unwrap();
    let sock = dir.as_path().join("console.sock");
    let _lock = boot_lock();
    let child = Command::new(env!("CARGO_BIN_EXE_remio"))
        .args(["run", "--no-net", "--timeout"])
        .arg(GUEST_TIMEOUT.as_secs().to_string())
        .arg("--console-socket")
        .arg(&sock)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut run = Running(child);
    let mut stderr = run.0.stderr.take().unwrap();
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let deadline = Instant::now() + GUEST_TIMEOUT;
    let mut s = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "console socket never came up: {e}"
                );
                assert!(
                    run.0.try_wait().unwrap().is_none(),
                    "remio run ended before its console socket came up"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut seen = String::new();
    read_until(&mut s, &mut seen, 0, "this shell is on /dev/hvc0", deadline);
    assert!(
        seen.contains("this shell is on /dev/hvc0"),
        "no welcome on the console: {seen:?}"
    );
    let at = seen.len();
    read_until(&mut s, &mut seen, at, "# ", deadline);
    let at = seen.len();
    // Computed output (DEMO-42) differs from the echoed command line (DEMO-$((6*7))).
    s.write_all(b"echo TTY-IS-$(tty); head -n 1 /mnt/README; echo DEMO-$((6*7)); exit 7\n")
        .unwrap();
    read_until(&mut s, &mut seen, at, "DEMO-42", deadline);

    let status = loop {
        if let Some(st) = run.0.try_wait().unwrap() {
            break st.code();
        }
        assert!(
            Instant::now() < deadline,
            "remio run did not end after `exit 7`"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = t_err.join().unwrap();
    eprintln!("--- console ---\n{seen}\n--- remio stderr ---\n{err}");
    let answer = &seen[at..];
    assert!(
        answer.contains("TTY-IS-/dev/hvc0"),
        "the shell's terminal is hvc0"
    );
    assert!(
        answer.contains("remio demo"),
        "the README is on the disk at /mnt"
    );
    assert!(answer.contains("DEMO-42"));
    assert_eq!(
        status,
        Some(7),
        "remio run exits with the guest shell's status"
    );
    assert!(
        err.contains("device model  pid"),
        "the summary names the DM"
    );
    assert!(err.contains("guest (QEMU)  pid"), "the summary names QEMU");
    assert!(
        err.contains("/dev/vda, image"),
        "the summary lists the devices"
    );
    let summary_at = err.find("remio run: run directory").unwrap();
    assert!(
        !err[..summary_at].contains("INFO"),
        "no INFO lines before the summary without RUST_LOG"
    );
}
