//! ONE behavioural suite of the device-model API, run against the in-process implementation
//! and against the socket client/server, on the real hypervisor model and dispatcher; plus
//! the process-death test (a device-model child killed with SIGKILL mid-stream).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod common;
mod kill;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, Stack, BACKEND_IRQ, MMIO, MMIO_SIZE, SHMEM, SHMEM_SIZE};
use remio_abi::uapi::{BAO_IO_READ, BAO_IO_WRITE};
use remio_api::{DmInfo, DmSession, IoeventfdSpec};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const TIMEOUT: Duration = Duration::from_secs(20);

/// Serves one request on `s` in a thread: reads return `value`.
fn serve_one(
    s: &Arc<dyn DmSession>,
    value: u64,
) -> std::thread::JoinHandle<remio_api::VirtioRequest> {
    let s = s.clone();
    std::thread::spawn(move || {
        let mut r = s.attach().unwrap();
        let got = r;
        if r.op == BAO_IO_READ {
            r.value = value;
        }
        s.complete(&r).unwrap();
        got
    })
}

/// Waits until `n` ATTACHes wait for a request, where the stack can tell: over the socket,
/// the server holds them ([`remio_api::socket::SocketServerStats::attach_waiting`]). The
/// in-process API exposes no such count (the dispatcher's `ControlClient::waiters` is not
/// reachable through `InProcessApi`): there the test takes whatever interleaving it gets, and
/// its assertions must hold for every one.
fn wait_attach_waiting(stack: &Stack, n: usize) {
    if let Some(srv) = &stack.server {
        assert!(
            eventually(|| srv.stats().attach_waiting == n),
            "{n} ATTACH(es) never reached the server"
        );
    }
}

fn open(stack: &Stack, dm: u32) -> Arc<dyn DmSession> {
    Arc::from(stack.api().open(dm).unwrap())
}

fn get_info_reports_the_dm_and_unknown_ids_are_enoent(stack: &Stack) {
    let s = open(stack, 1);
    assert_eq!(
        s.info(),
        DmInfo {
            id: 1,
            shmem_addr: SHMEM[1],
            shmem_size: SHMEM_SIZE,
            irq: BACKEND_IRQ[1]
        }
    );
    assert_eq!(stack.api().open(9).err().unwrap().errno(), libc::ENOENT);
}

fn a_read_and_a_write_round_trip_through_the_frontend(stack: &Stack) {
    let s = open(stack, 0);
    let t = serve_one(&s, 0x1234_5678);
    assert_eq!(
        stack.frontend().read(MMIO[0] + 0x70, 4).unwrap(),
        0x1234_5678
    );
    let r = t.join().unwrap();
    assert_eq!(
        (r.dm_id, r.addr, r.op, r.access_width),
        (0, MMIO[0] + 0x70, BAO_IO_READ, 4)
    );

    let t = serve_one(&s, 0);
    stack.frontend().write(MMIO[0] + 0x14, 2, 0xbeef).unwrap();
    let r = t.join().unwrap();
    assert_eq!((r.op, r.value, r.access_width), (BAO_IO_WRITE, 0xbeef, 2));
}

fn complete_and_attach_serves_consecutive_requests(stack: &Stack) {
    let s = open(stack, 0);
    let dm = {
        let s = s.clone();
        std::thread::spawn(move || {
            let mut r = s.attach().unwrap();
            for i in 0..3u64 {
                r.value = 100 + i;
                r = s.complete_and_attach(&r).unwrap();
            }
            r.value = 103;
            s.complete(&r).unwrap();
        })
    };
    let fe = stack.frontend();
    let got: Vec<u64> = (0..4).map(|_| fe.read(MMIO[0], 4).unwrap()).collect();
    assert_eq!(got, vec![100, 101, 102, 103]);
    dm.join().unwrap();
}

fn a_second_session_on_a_dm_is_ebusy_until_the_first_ends(stack: &Stack) {
    let s = stack.api().open(0).unwrap();
    assert_eq!(stack.api().open(0).err().unwrap().errno(), libc::EBUSY);
    let other = stack.api().open(1);
    assert!(other.is_ok(), "another DM is free");
    drop(s);
    assert!(eventually(|| stack.api().open(0).is_ok()));
}

fn completions_of_foreign_unknown_or_altered_requests_are_refused(stack: &Stack) {
    let s = open(stack, 0);
    let never = remio_api::VirtioRequest {
        dm_id: 0,
        addr: MMIO[0],
        op: BAO_IO_READ,
        value: 0,
        access_width: 4,
        request_id: 3,
    };
    assert_eq!(s.complete(&never).unwrap_err().errno(), libc::ENOENT);
    let fe = stack.frontend();
    let reader = std::thread::spawn(move || fe.read(MMIO[0] + 4, 4).unwrap());
    let r = s.attach().unwrap();
    let mut foreign = r;
    foreign.dm_id = 1;
    assert_eq!(s.complete(&foreign).unwrap_err().errno(), libc::EPERM);
    let mut altered = r;
    altered.op = BAO_IO_WRITE;
    assert_eq!(s.complete(&altered).unwrap_err().errno(), libc::EINVAL);
    // A session of another DM cannot complete it either.
    let s1 = open(stack, 1);
    assert_eq!(s1.complete(&r).unwrap_err().errno(), libc::EPERM);
    let mut done = r;
    done.value = 7;
    s.complete(&done).unwrap();
    assert_eq!(reader.join().unwrap(), 7);
    assert_eq!(
        s.complete(&done).unwrap_err().errno(),
        libc::ENOENT,
        "completed once"
    );
}

fn ioeventfds_assign_deassign_and_conflict(stack: &Stack) {
    let s = open(stack, 0);
    let e = EventFd::new(EFD_NONBLOCK).unwrap();
    let spec = IoeventfdSpec {
        addr: MMIO[0] + 0x50,
        len: 4,
        datamatch: Some(1),
    };
    s.assign_ioeventfd(&e, spec).unwrap();
    // A matching write signals the eventfd and never reaches the session.
    stack.frontend().write(MMIO[0] + 0x50, 4, 1).unwrap();
    assert_eq!(e.read().unwrap(), 1);
    let e2 = EventFd::new(0).unwrap();
    assert_eq!(
        s.assign_ioeventfd(&e2, spec).unwrap_err().errno(),
        libc::EEXIST
    );
    let outside = IoeventfdSpec {
        addr: MMIO[0] + MMIO_SIZE,
        len: 4,
        datamatch: None,
    };
    assert_eq!(
        s.assign_ioeventfd(&e2, outside).unwrap_err().errno(),
        libc::EPERM
    );
    let bad_len = IoeventfdSpec {
        addr: MMIO[0] + 0x50,
        len: 3,
        datamatch: None,
    };
    assert_eq!(
        s.assign_ioeventfd(&e2, bad_len).unwrap_err().errno(),
        libc::EINVAL
    );
    assert_eq!(
        s.deassign_ioeventfd(&e2, spec).unwrap_err().errno(),
        libc::ENOENT,
        "another eventfd"
    );
    s.deassign_ioeventfd(&e, spec).unwrap();
    assert_eq!(
        s.deassign_ioeventfd(&e, spec).unwrap_err().errno(),
        libc::ENOENT
    );
    // Now the write reaches the session.
    let t = serve_one(&s, 0);
    stack.frontend().write(MMIO[0] + 0x50, 4, 1).unwrap();
    assert_eq!(t.join().unwrap().addr, MMIO[0] + 0x50);
    assert!(e.read().is_err(), "not signalled after deassign");
}

fn irqfds_inject_the_frontend_interrupt(stack: &Stack) {
    let s = open(stack, 0);
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    stack
        .frontend()
        .set_interrupt_sink(
            0,
            Arc::new(move || {
                h.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .unwrap();
    let e = EventFd::new(EFD_NONBLOCK).unwrap();
    s.assign_irqfd(&e).unwrap();
    assert_eq!(s.assign_irqfd(&e).unwrap_err().errno(), libc::EBUSY);
    e.write(1).unwrap();
    assert!(eventually(|| hits.load(Ordering::SeqCst) == 1));
    s.deassign_irqfd(&e).unwrap();
    assert_eq!(s.deassign_irqfd(&e).unwrap_err().errno(), libc::ENOENT);
    e.write(1).unwrap();
    // A fence: a second irqfd signalled after `e`. The DM's irqfd server takes ready eventfds
    // in the order they became ready, so once the fence has injected, `e` would have been
    // read (and would have injected) already if it were still watched.
    let fence = EventFd::new(EFD_NONBLOCK).unwrap();
    s.assign_irqfd(&fence).unwrap();
    fence.write(1).unwrap();
    assert!(eventually(|| hits.load(Ordering::SeqCst) >= 2));
    assert_eq!(e.read().unwrap(), 1, "nobody read the deassigned eventfd");
    assert_eq!(hits.load(Ordering::SeqCst), 2, "only the fence injected");
}

fn map_shmem_is_the_dms_memory_within_bounds(stack: &Stack) {
    let s = open(stack, 1);
    assert_eq!(s.map_shmem(0).unwrap_err().errno(), libc::EINVAL);
    assert_eq!(
        s.map_shmem(SHMEM_SIZE + 1).unwrap_err().errno(),
        libc::EINVAL
    );
    let mem = s.map_shmem(SHMEM_SIZE).unwrap();
    mem.write_obj(0xabcd_u32, GuestAddress(SHMEM[1] + 0x100))
        .unwrap();
    let dev = stack.hyp.backend(2).unwrap().device(1).unwrap();
    let mut b = [0u8; 4];
    std::os::unix::fs::FileExt::read_exact_at(&*dev.shmem, &mut b, 0x100).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0xabcd);
    assert!(mem
        .read_obj::<u8>(GuestAddress(SHMEM[1] + SHMEM_SIZE))
        .is_err());
}

fn concurrent_attach_waiters_each_get_one_request(stack: &Stack) {
    let s = open(stack, 0);
    let waiters: Vec<_> = (0..4).map(|_| serve_one(&s, 0x42)).collect();
    wait_attach_waiting(stack, 4);
    let readers: Vec<_> = (0..4u64)
        .map(|i| {
            let fe = stack.frontend();
            std::thread::spawn(move || fe.read(MMIO[0] + 4 * i, 4).unwrap())
        })
        .collect();
    for r in readers {
        assert_eq!(r.join().unwrap(), 0x42);
    }
    let mut addrs: Vec<u64> = waiters
        .into_iter()
        .map(|w| w.join().unwrap().addr)
        .collect();
    addrs.sort_unstable();
    assert_eq!(
        addrs,
        (0..4u64).map(|i| MMIO[0] + 4 * i).collect::<Vec<_>>()
    );
}

fn ending_a_session_hands_its_requests_to_the_next_and_drops_its_eventfds(stack: &Stack) {
    let s = open(stack, 0);
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
    let fe = stack.frontend();
    let attached = std::thread::spawn(move || fe.read(MMIO[0] + 0x60, 4).unwrap());
    let r = s.attach().unwrap();
    assert_eq!(r.addr, MMIO[0] + 0x60);
    drop(s);
    let dm = stack.dispatcher.dm(0).unwrap();
    assert!(eventually(
        || dm.ioeventfd_count() == 0 && dm.irqfd_count() == 0
    ));
    // Later requests wait for the next session, which gets them, and the one the ended
    // session had received and not completed (a device model that died holding it).
    let fe = stack.frontend();
    let later = std::thread::spawn(move || fe.read(MMIO[0] + 0x64, 4).unwrap());
    let s2 = loop {
        match stack.api().open(0) {
            Ok(s) => break Arc::<dyn DmSession>::from(s),
            Err(e) if e.errno() == libc::EBUSY => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => panic!("{e}"),
        }
    };
    let server = std::thread::spawn(move || {
        for _ in 0..2 {
            let mut r = s2.attach().unwrap();
            r.value = r.addr - MMIO[0];
            s2.complete(&r).unwrap();
        }
    });
    assert_eq!(attached.join().unwrap(), 0x60, "served by the next session");
    assert_eq!(later.join().unwrap(), 0x64);
    server.join().unwrap();
    assert_eq!(stack.hyp.stats().timeouts, 0);
}

/// The status word answers InterruptStatus reads and InterruptACK writes in the platform:
/// the device model's session never sees them, its bits are what the frontend reads, and the
/// acknowledgement clears exactly the written bits in the device model's own mapping. Other
/// widths still reach the device model; bad registrations are refused with their errno; the
/// session's end drops it.
fn status_word_answers_interrupt_status_and_ack_without_the_device_model(stack: &Stack) {
    use remio_api::StatusWordSpec;
    let s = open(stack, 0);
    let spec = StatusWordSpec {
        status_addr: MMIO[0] + 0x60,
        ack_addr: MMIO[0] + 0x64,
    };
    let outside = StatusWordSpec {
        status_addr: MMIO[0] + MMIO_SIZE,
        ..spec
    };
    assert_eq!(
        s.register_status_word(outside).unwrap_err().errno(),
        libc::EPERM
    );
    let misaligned = StatusWordSpec {
        status_addr: MMIO[0] + 0x62,
        ..spec
    };
    assert_eq!(
        s.register_status_word(misaligned).unwrap_err().errno(),
        libc::EINVAL
    );
    let sw = s.register_status_word(spec).unwrap();
    assert_eq!(
        s.register_status_word(spec).unwrap_err().errno(),
        libc::EEXIST
    );
    let e = EventFd::new(0).unwrap();
    let on_ack = IoeventfdSpec {
        addr: MMIO[0] + 0x64,
        len: 4,
        datamatch: None,
    };
    assert_eq!(
        s.assign_ioeventfd(&e, on_ack).unwrap_err().errno(),
        libc::EEXIST
    );

    sw.word().fetch_or(0b11, Ordering::Release);
    let fe = stack.frontend();
    assert_eq!(fe.read(MMIO[0] + 0x60, 4).unwrap(), 0b11);
    fe.write(MMIO[0] + 0x64, 4, 0b01).unwrap();
    assert_eq!(sw.word().load(Ordering::Acquire), 0b10);
    assert_eq!(fe.read(MMIO[0] + 0x60, 4).unwrap(), 0b10);
    let dm = stack.dispatcher.dm(0).unwrap();
    assert_eq!(dm.stats().to_status_word, 3);
    assert_eq!(dm.stats().to_control, 0, "nothing reached the session");

    // A 2-byte read of the same register is the device model's.
    let t = serve_one(&s, 0x77);
    assert_eq!(fe.read(MMIO[0] + 0x60, 2).unwrap(), 0x77);
    assert_eq!(t.join().unwrap().access_width, 2);

    drop(s);
    assert!(eventually(|| !dm.has_status_word()));
    // The next session's device model answers the register again.
    let s2 = loop {
        match stack.api().open(0) {
            Ok(s) => break Arc::<dyn DmSession>::from(s),
            Err(e) if e.errno() == libc::EBUSY => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => panic!("{e}"),
        }
    };
    let t = serve_one(&s2, 5);
    assert_eq!(stack.frontend().read(MMIO[0] + 0x60, 4).unwrap(), 5);
    t.join().unwrap();
    // and may register its own word at once: the old one was dropped before it could open.
    let sw2 = s2.register_status_word(spec).unwrap();
    sw2.word().store(4, Ordering::Release);
    assert_eq!(stack.frontend().read(MMIO[0] + 0x60, 4).unwrap(), 4);
}

fn a_new_session_registers_the_same_eventfds_as_soon_as_it_opens(stack: &Stack) {
    let spec = IoeventfdSpec {
        addr: MMIO[0] + 0x50,
        len: 4,
        datamatch: Some(0),
    };
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let s = open(stack, 0);
    s.assign_ioeventfd(&kick, spec).unwrap();
    s.assign_irqfd(&irq).unwrap();

    // A device model re-creating its session: the old one ends, the new one opens as soon as
    // the platform lets it, and registers the same eventfds again.
    s.shutdown().unwrap();
    let s2 = loop {
        match stack.api().open(0) {
            Ok(s) => break Arc::<dyn DmSession>::from(s),
            Err(e) if e.errno() == libc::EBUSY => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => panic!("{e}"),
        }
    };
    s2.assign_ioeventfd(&kick, spec).unwrap();
    s2.assign_irqfd(&irq).unwrap();
    drop(s);

    stack.frontend().write(MMIO[0] + 0x50, 4, 0).unwrap();
    assert_eq!(
        kick.read().unwrap(),
        1,
        "the new session's ioeventfd is live"
    );
}

fn shutdown_wakes_a_blocked_attach_and_refuses_later_ones(stack: &Stack) {
    let s = open(stack, 0);
    let waiter = {
        let s = s.clone();
        std::thread::spawn(move || s.attach())
    };
    // It blocks (in process, if it has not yet, it must fail all the same).
    wait_attach_waiting(stack, 1);

    s.shutdown().unwrap();

    assert_eq!(waiter.join().unwrap().unwrap_err().errno(), libc::ESHUTDOWN);
    assert_eq!(s.attach().unwrap_err().errno(), libc::ESHUTDOWN);
    s.shutdown().unwrap();
    // The DM goes to the next session, which gets the next request.
    let s2 = loop {
        match stack.api().open(0) {
            Ok(s) => break Arc::<dyn DmSession>::from(s),
            Err(e) if e.errno() == libc::EBUSY => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => panic!("{e}"),
        }
    };
    // Ending the shut-down session leaves the new one alone.
    drop(s);
    let fe = stack.frontend();
    let reader = std::thread::spawn(move || fe.read(MMIO[0] + 8, 4).unwrap());
    serve_one(&s2, 5).join().unwrap();
    assert_eq!(reader.join().unwrap(), 5);
}

/// The errno of each way a completion can be refused, through the in-process API and, for
/// the hypervisor's refusal, at the dispatcher: pins the tables of `remio_api::ApiError` and
/// of the dispatcher's crate docs.
#[test]
fn completion_refusals_map_to_their_documented_errnos() {
    let stack = Stack::new(TIMEOUT);
    let dm = stack.dispatcher.dm(0).unwrap();
    let s = open(&stack, 0);
    let fe = stack.frontend();
    let reader = std::thread::spawn(move || fe.read(MMIO[0] + 0x70, 4).unwrap());
    let r = s.attach().unwrap();
    let mut never = r;
    never.request_id = r.request_id + 1;
    let mut foreign = r;
    foreign.dm_id = 1;
    let mut altered = r;
    altered.access_width = 2;

    // The session's own rules.
    assert_eq!(s.complete(&never).unwrap_err().errno(), libc::ENOENT);
    assert_eq!(s.complete(&foreign).unwrap_err().errno(), libc::EPERM);
    assert_eq!(s.complete(&altered).unwrap_err().errno(), libc::EINVAL);
    // The hypervisor's INVALID_ARGS (status 3) for a request not awaiting completion: the
    // dispatcher's CompleteError::InvalidArgs, EINVAL.
    let hyp_refusal = dm.complete(&never).unwrap_err();
    assert_eq!(hyp_refusal, remio_dispatcher::CompleteError::InvalidArgs);
    assert_eq!(hyp_refusal.errno(), libc::EINVAL);
    // A request completed behind the session's back: the session lets it through, the
    // hypervisor refuses it, and the session reports that as EINVAL.
    let mut done = r;
    done.value = 0x77;
    dm.complete(&done).unwrap();
    assert_eq!(reader.join().unwrap(), 0x77);
    assert_eq!(s.complete(&done).unwrap_err().errno(), libc::EINVAL);
    assert_eq!(stack.hyp.stats().timeouts, 0);
}

/// Several frontend threads trap on one DM at once while several device-model threads serve
/// it: each access gets the answer to its own request (the value names the address), none
/// times out, every request is completed once. Over the socket, stalled frontends take turns
/// reading the device model's answers (see `remio_api::socket`); this checks that whoever
/// reads, the completions reach the right accesses.
fn several_frontends_and_several_serving_threads_on_one_dm_all_complete(stack: &Stack) {
    const FRONTENDS: u64 = 4;
    const READS: u64 = 300;
    let s = open(stack, 0);
    let servers: Vec<_> = (0..3)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || {
                let Ok(mut r) = s.attach() else {
                    return;
                };
                loop {
                    if r.op == BAO_IO_READ {
                        r.value = r.addr ^ 0x5a5a;
                    }
                    match s.complete_and_attach(&r) {
                        Ok(next) => r = next,
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    let frontends: Vec<_> = (0..FRONTENDS)
        .map(|i| {
            let fe = stack.frontend();
            std::thread::spawn(move || {
                for k in 0..READS {
                    let addr = MMIO[0] + 8 * i + 0x40 * (k % 4);
                    assert_eq!(fe.read(addr, 4).unwrap(), addr ^ 0x5a5a);
                    if k % 10 == 0 {
                        fe.write(addr, 4, k).unwrap();
                    }
                }
            })
        })
        .collect();
    for f in frontends {
        f.join().unwrap();
    }
    s.shutdown().unwrap();
    for t in servers {
        t.join().unwrap();
    }
    let st = stack.hyp.stats();
    assert_eq!(st.timeouts, 0);
    assert!(eventually(|| {
        let st = stack.hyp.stats();
        st.requests == st.completions
    }));
}

macro_rules! suite {
    ($module:ident, $make:expr) => {
        mod $module {
            use super::*;
            suite!(@tests $make;
                get_info_reports_the_dm_and_unknown_ids_are_enoent,
                a_read_and_a_write_round_trip_through_the_frontend,
                complete_and_attach_serves_consecutive_requests,
                a_second_session_on_a_dm_is_ebusy_until_the_first_ends,
                completions_of_foreign_unknown_or_altered_requests_are_refused,
                ioeventfds_assign_deassign_and_conflict,
                irqfds_inject_the_frontend_interrupt,
                map_shmem_is_the_dms_memory_within_bounds,
                concurrent_attach_waiters_each_get_one_request,
                ending_a_session_hands_its_requests_to_the_next_and_drops_its_eventfds,
                shutdown_wakes_a_blocked_attach_and_refuses_later_ones,
                a_new_session_registers_the_same_eventfds_as_soon_as_it_opens,
                several_frontends_and_several_serving_threads_on_one_dm_all_complete,
                status_word_answers_interrupt_status_and_ack_without_the_device_model,
            );
        }
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let make: fn(&str) -> Stack = $make;
                let stack = make(stringify!($name));
                super::$name(&stack);
            }
        )*
    };
}

suite!(in_process, |_| Stack::new(TIMEOUT));
suite!(socket, |name| Stack::new(TIMEOUT)
    .with_socket(&format!("{name}.sock")));
