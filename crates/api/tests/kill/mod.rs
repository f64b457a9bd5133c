//! A device-model process killed with SIGKILL in the middle of a stream of requests: the
//! platform keeps serving, no frontend access stalls, and a new process attaches and serves.
//!
//! The child is this test binary re-executed with [`CHILD_ENV`] set, running only
//! `kill::child_entry`, which serves DM 0 over the socket until killed.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use remio_abi::uapi::BAO_IO_READ;
use remio_api::{DmApi, IoeventfdSpec, SocketApi};
use vmm_sys_util::eventfd::EventFd;

use crate::common::{eventually, Stack, MMIO};

const CHILD_ENV: &str = "REMIO_API_TEST_DM_SOCKET";
/// What the child's reads return.
const SERVED: u64 = 0xC0DE;

/// The child's body; a no-op (returns at once) unless run as the child.
#[test]
fn child_entry() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let api = SocketApi::connect(&path);
    let s = loop {
        match api.open(0) {
            Ok(s) => break s,
            // The previous session's end may not be processed yet.
            Err(e) if e.errno() == libc::EBUSY => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => panic!("child: open: {e}"),
        }
    };
    let e = EventFd::new(0).unwrap();
    s.assign_ioeventfd(
        &e,
        IoeventfdSpec {
            addr: MMIO[0] + 0x50,
            len: 4,
            datamatch: Some(0),
        },
    )
    .unwrap();
    s.assign_irqfd(&e).unwrap();
    let mut r = s.attach().unwrap();
    loop {
        if r.op == BAO_IO_READ {
            r.value = SERVED;
        }
        r = s.complete_and_attach(&r).unwrap();
    }
}

fn spawn_child(path: &std::path::Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "kill::child_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

#[test]
fn sigkill_of_a_device_model_mid_stream_stalls_no_frontend_and_a_new_one_serves() {
    let stack = Stack::new(Duration::from_secs(30)).with_socket("kill.sock");
    let path = stack.server.as_ref().unwrap().path().to_owned();
    let mut child = spawn_child(&path);

    let served = Arc::new(AtomicU64::new(0));
    let zeros = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let frontends: Vec<_> = (0..4u64)
        .map(|i| {
            let fe = stack.frontend();
            let (served, zeros, stop) = (served.clone(), zeros.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match fe.read(MMIO[0] + 8 * i, 4).unwrap() {
                        SERVED => served.fetch_add(1, Ordering::SeqCst),
                        0 => zeros.fetch_add(1, Ordering::SeqCst),
                        v => panic!("unexpected value {v:#x}"),
                    };
                }
            })
        })
        .collect();

    assert!(
        eventually(|| served.load(Ordering::SeqCst) >= 200),
        "the first child serves"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let dm = stack.dispatcher.dm(0).unwrap();
    assert!(eventually(|| !dm.has_control_client()), "the session ended");
    assert!(
        eventually(|| dm.ioeventfd_count() == 0 && dm.irqfd_count() == 0),
        "its eventfds dropped"
    );

    let before = served.load(Ordering::SeqCst);
    let started = Instant::now();
    let mut child2 = spawn_child(&path);
    assert!(
        eventually(|| served.load(Ordering::SeqCst) >= before + 200),
        "a new child attaches and serves"
    );
    stop.store(true, Ordering::SeqCst);
    for f in frontends {
        f.join().unwrap();
    }
    child2.kill().unwrap();
    child2.wait().unwrap();

    // The hypervisor counts a completion just after waking its frontend: let it settle.
    let settled = eventually(|| {
        let st = stack.hyp.stats();
        st.requests == st.completions
    });
    let st = stack.hyp.stats();
    assert!(settled, "every request completed exactly once: {st:?}");
    assert_eq!(
        st.timeouts,
        0,
        "no access waited for the timeout ({:?} to restart)",
        started.elapsed()
    );
    assert!(
        zeros.load(Ordering::SeqCst) <= 4,
        "only requests in flight at the kill read 0"
    );
}
