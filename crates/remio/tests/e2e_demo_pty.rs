//! The interactive demo on a terminal: `remio run` on a pseudo-terminal of the test's (40 rows,
//! 120 columns), as a user's shell would run it. The guest's shell on hvc0 (through the device
//! model's stdio) must get Ctrl-C as an interrupt and Ctrl-D as end of input, see the
//! terminal's size, end `remio run` with its status, and the terminal must be back in its
//! original (cooked) mode afterwards.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
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

/// A new pseudo-terminal of `rows` x `cols`: (master, slave).
fn openpty(rows: u16, cols: u16) -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (-1, -1);
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: the out-pointers are valid; name and termios may be null; ws is a valid winsize.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    for fd in [master, slave] {
        // Close-on-exec: remio and its children get the slave only as their stdio, never the
        // master.
        // SAFETY: fcntl on a descriptor openpty just returned; F_SETFD touches no memory.
        let r = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        assert_eq!(r, 0);
    }
    // SAFETY: openpty returned two new descriptors that nothing else owns.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

/// Waits until the text seen after `from` contains `needle`; returns where that `needle` ends.
fn wait_for(seen: &Mutex<String>, from: usize, needle: &str, deadline: Instant) -> usize {
    loop {
        {
            let s = seen.lock().unwrap();
            if let Some(at) = s.get(from..).and_then(|t| t.find(needle)) {
                return from + at + needle.len();
            }
        }
        assert!(
            Instant::now() < deadline,
            "never saw {needle:?}; the terminal shows:\n{}",
            seen.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lflag(fd: &OwnedFd) -> libc::tcflag_t {
    // SAFETY: termios is plain data, filled by tcgetattr (checked).
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is an open terminal, t a valid termios.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t.c_lflag
}

#[test]
fn on_a_terminal_the_demo_shell_gets_ctrl_c_ctrl_d_and_the_size_and_the_terminal_is_restored() {
    if !prerequisites("e2e_demo_pty") {
        return;
    }
    let (master, slave) = openpty(40, 120);
    let cooked = lflag(&slave);
    assert_ne!(cooked & libc::ICANON, 0);
    let _lock = boot_lock();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_remio"));
    cmd.args(["run", "--no-net", "--timeout"])
        .arg(GUEST_TIMEOUT.as_secs().to_string())
        .env_remove("RUST_LOG")
        .stdin(Stdio::from(File::from(slave.try_clone().unwrap())))
        .stdout(Stdio::from(File::from(slave.try_clone().unwrap())))
        .stderr(Stdio::from(File::from(slave.try_clone().unwrap())));
    // SAFETY: setsid and ioctl are async-signal-safe; fd 0 is the slave in the child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut run = Running(cmd.spawn().unwrap());
    let seen = Arc::new(Mutex::new(String::new()));
    let mut reader = File::from(master.try_clone().unwrap());
    let seen2 = Arc::clone(&seen);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // Ends with EIO once every holder of the slave has closed it.
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen2
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let mut input = File::from(master.try_clone().unwrap());
    let deadline = Instant::now() + GUEST_TIMEOUT;

    let at = wait_for(&seen, 0, "remio:~# ", deadline);
    // The guest says when the command line has run up to the sleep (the arithmetic keeps the
    // echo of the typed line from matching): Ctrl-C then lands on the running sleep.
    input
        .write_all(b"echo SLEEPING-$((1+1)); sleep 100 && echo NOT-$((0+1))-INTERRUPTED\n")
        .unwrap();
    let at = wait_for(&seen, at, "SLEEPING-2", deadline);
    input.write_all(b"\x03").unwrap();
    let at = wait_for(&seen, at, "remio:~# ", deadline);
    input
        .write_all(b"echo AFTER-$((40+2)); stty size; (exit 5)\n")
        .unwrap();
    let at = wait_for(&seen, at, "AFTER-42", deadline);
    wait_for(&seen, at, "remio:~# ", deadline);
    input.write_all(b"\x04").unwrap();

    let status = loop {
        if let Some(st) = run.0.try_wait().unwrap() {
            break st.code();
        }
        assert!(
            Instant::now() < deadline,
            "remio run did not end after Ctrl-D"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = seen.lock().unwrap().clone();
    eprintln!("--- terminal ---\n{text}");
    assert!(
        !text.contains("NOT-1-INTERRUPTED"),
        "Ctrl-C interrupted the guest's sleep"
    );
    assert!(
        text.contains("40 120"),
        "the guest's hvc0 has the terminal's size"
    );
    assert!(
        !text.contains("REMIO-DM-READY"),
        "the device model's marker is not shown to the user"
    );
    assert_eq!(
        status,
        Some(5),
        "Ctrl-D ended the shell, whose status remio run returns"
    );
    assert_eq!(
        lflag(&slave),
        cooked,
        "the terminal is back in its original mode"
    );
}
