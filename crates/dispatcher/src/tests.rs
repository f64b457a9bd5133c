//! Behaviour of the whole dispatcher against the in-crate hypervisor double, including one
//! regression test per defect of the posted driver (`spec/remote-io.md`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use remio_abi::uapi::{BAO_IO_READ, BAO_IO_WRITE};
use remio_abi::uapi_v2::BAO_IO_CLIENT_QUEUE_MAX;
use remio_abi::VirtioRequest;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::testing::FakeHyp;
use crate::*;

const T: Duration = Duration::from_secs(5);

fn setup(devices: usize) -> (Arc<FakeHyp>, Arc<Dispatcher>) {
    let hyp = FakeHyp::new(devices);
    let disp = Dispatcher::new(hyp.clone(), hyp.clone());
    (hyp, disp)
}

fn desc(hyp: &FakeHyp, id: u32) -> DmDescription {
    DmDescription {
        id,
        shmem_addr: 0x8000_0000 + u64::from(id) * 0x10_0000,
        shmem_size: 0x10_0000,
        irq: hyp.irq(id),
        shmem: None,
    }
}

fn efd() -> Arc<EventFd> {
    Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"))
}

fn ioevfd(fd: &Arc<EventFd>, addr: u64, len: u32, datamatch: Option<u64>) -> IoeventfdConfig {
    IoeventfdConfig {
        fd: fd.clone(),
        addr,
        len,
        datamatch,
        deassign: false,
    }
}

#[test]
fn create_dm_rejects_out_of_range_and_duplicate_ids() {
    let (hyp, disp) = setup(2);
    let e = disp.create_dm(desc(&hyp, 16)).unwrap_err();
    assert_eq!(e, DmError::InvalidId(16));
    assert_eq!(e.errno(), libc::EINVAL);
    disp.create_dm(desc(&hyp, 0)).unwrap();
    let e = disp.create_dm(desc(&hyp, 0)).unwrap_err();
    assert_eq!(e, DmError::Exists(0));
    assert_eq!(e.errno(), libc::EEXIST);
    assert_eq!(disp.dms().len(), 1);
}

#[test]
fn create_dm_reports_an_irq_that_does_not_exist_or_is_taken() {
    let (hyp, disp) = setup(2);
    let mut d = desc(&hyp, 1);
    d.irq = 7;
    assert_eq!(disp.create_dm(d).unwrap_err().errno(), libc::EINVAL);
    disp.create_dm(desc(&hyp, 0)).unwrap();
    let mut d = desc(&hyp, 1);
    d.irq = hyp.irq(0);
    let e = disp.create_dm(d).unwrap_err();
    assert_eq!(e.errno(), libc::EBUSY);
    // The failed DM is not registered.
    assert_eq!(disp.dm(1).unwrap_err(), DmError::NoSuchDm(1));
}

#[test]
fn get_info_reports_the_description() {
    let (hyp, disp) = setup(1);
    disp.create_dm(desc(&hyp, 0)).unwrap();
    let info = disp.dm(0).unwrap().info();
    assert_eq!(
        info,
        DmInfo {
            id: 0,
            shmem_addr: 0x8000_0000,
            shmem_size: 0x10_0000,
            irq: hyp.irq(0)
        }
    );
    assert_eq!(disp.dm(3).unwrap_err().errno(), libc::ENOENT);
}

#[test]
fn control_client_serves_a_read_and_a_write_end_to_end() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let control = dm.create_control_client().unwrap();
    let r = hyp.trap(0, BAO_IO_READ, 0x1000, 4, 0);
    let mut req = control.try_attach().unwrap();
    assert_eq!(
        (req.addr, req.op, req.access_width, req.dm_id),
        (0x1000, BAO_IO_READ, 4, 0)
    );
    req.value = 0xabcd;
    dm.complete(&req).unwrap();
    assert_eq!(hyp.completion(r), Some(0xabcd));

    let w = hyp.trap(0, BAO_IO_WRITE, 0x1004, 2, 0x55);
    let req = control.attach().unwrap();
    assert_eq!((req.op, req.value), (BAO_IO_WRITE, 0x55));
    dm.complete(&req).unwrap();
    assert_eq!(hyp.completion(w), Some(0));
    let s = dm.stats();
    assert_eq!((s.dispatched, s.to_control), (2, 2));
}

#[test]
fn complete_forces_the_dm_id_and_refuses_other_ops() {
    let (hyp, disp) = setup(2);
    let dm0 = disp.create_dm(desc(&hyp, 0)).unwrap();
    let dm1 = disp.create_dm(desc(&hyp, 1)).unwrap();
    let c1 = dm1.create_control_client().unwrap();
    hyp.trap(1, BAO_IO_READ, 0x10, 4, 0);
    let req = c1.attach().unwrap();
    // Through DM 0's handle, a forged dm_id of 1 does not reach DM 1's request.
    assert_eq!(dm0.complete(&req).unwrap_err().errno(), libc::EINVAL);
    let mut bad = req;
    bad.op = 2;
    assert_eq!(dm1.complete(&bad), Err(CompleteError::InvalidOp(2)));
    dm1.complete(&req).unwrap();
    // A second completion is refused by the hypervisor (the slot is no longer PROCESSING).
    assert_eq!(dm1.complete(&req), Err(CompleteError::InvalidArgs));
    assert_eq!(CompleteError::HypervisorFailure.errno(), libc::ENOENT);
}

#[test]
fn requests_before_the_control_client_are_held_then_drained_to_it() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let slots: Vec<u64> = (0..3)
        .map(|i| hyp.trap(0, BAO_IO_READ, 0x100 + i * 4, 4, 0))
        .collect();
    assert_eq!(dm.held(), 3);
    let control = dm.create_control_client().unwrap();
    assert_eq!(dm.held(), 0);
    for (i, slot) in slots.iter().enumerate() {
        let mut req = control.try_attach().unwrap();
        assert_eq!(req.request_id, *slot, "held requests keep their order");
        req.value = i as u64;
        dm.complete(&req).unwrap();
    }
    assert_eq!(dm.stats().held, 3);
}

#[test]
fn a_second_control_client_is_busy() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let _c = dm.create_control_client().unwrap();
    let e = dm.create_control_client().unwrap_err();
    assert!(matches!(e, ClientError::Busy));
    assert_eq!(e.errno(), libc::EBUSY);
}

#[test]
fn control_sessions_count_every_control_client_created_not_refused_ones() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    assert_eq!(dm.control_sessions(), 0);
    let _c = dm.create_control_client().unwrap();
    let _ = dm.create_control_client().unwrap_err();
    dm.destroy_control_client().unwrap();
    let _c = dm.create_control_client().unwrap();

    assert_eq!(dm.control_sessions(), 2);
}

/// Waits (yielding) until `n` threads block in `client.attach()`: the state the queue keeps,
/// so the test does not depend on how fast a thread gets there.
fn wait_for_waiters(client: &ControlClient, n: usize) {
    while client.waiters() < n {
        std::thread::yield_now();
    }
}

#[test]
fn destroying_the_control_client_wakes_attachers_and_keeps_its_requests() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let control = dm.create_control_client().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let c = control.clone();
    std::thread::spawn(move || tx.send(c.attach()));
    wait_for_waiters(&control, 1);
    dm.destroy_control_client().unwrap();
    let woken = rx.recv_timeout(T).expect("the attacher is still blocked");
    assert_eq!(woken, Err(AttachError::ShuttingDown));
    assert_eq!(AttachError::ShuttingDown.errno(), libc::ESHUTDOWN);
    assert!(matches!(
        dm.destroy_control_client(),
        Err(ClientError::NoControlClient)
    ));

    // Queued but not attached requests survive into the next control client.
    let control = dm.create_control_client().unwrap();
    let slot = hyp.trap(0, BAO_IO_READ, 0x20, 4, 0);
    dm.destroy_control_client().unwrap();
    assert_eq!(control.attach(), Err(AttachError::ShuttingDown));
    assert_eq!(dm.held(), 1);
    let control = dm.create_control_client().unwrap();
    let req = control.try_attach().unwrap();
    assert_eq!(req.request_id, slot);
    dm.complete(&req).unwrap();
}

#[test]
fn requeued_requests_go_to_the_next_control_client_before_later_ones() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let control = dm.create_control_client().unwrap();
    let attached = hyp.trap(0, BAO_IO_READ, 0x20, 4, 0);
    let req = control.try_attach().unwrap();
    assert_eq!(req.request_id, attached);
    // The session dies holding `req`; a request arrives while no control client exists.
    dm.destroy_control_client().unwrap();
    let later = hyp.trap(0, BAO_IO_READ, 0x24, 4, 0);

    assert_eq!(dm.requeue([req]), 1);

    assert_eq!(
        hyp.completion(attached),
        None,
        "not completed for the guest"
    );
    let control = dm.create_control_client().unwrap();
    let mut first = control.try_attach().unwrap();
    let second = control.try_attach().unwrap();
    assert_eq!(
        (first.request_id, second.request_id),
        (attached, later),
        "the requeued request comes first"
    );
    first.value = 7;
    dm.complete(&first).unwrap();
    assert_eq!(hyp.completion(attached), Some(7));
}

#[test]
fn a_request_requeued_while_a_control_client_exists_goes_to_it() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let old = dm.create_control_client().unwrap();
    let slot = hyp.trap(0, BAO_IO_WRITE, 0x70, 4, 1);
    let req = old.try_attach().unwrap();
    dm.destroy_control_client().unwrap();
    let control = dm.create_control_client().unwrap();

    assert_eq!(dm.requeue([req]), 1);

    assert_eq!(control.try_attach().map(|r| r.request_id), Some(slot));
}

#[test]
fn a_request_requeued_on_a_destroyed_dm_is_completed() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let control = dm.create_control_client().unwrap();
    let slot = hyp.trap(0, BAO_IO_READ, 0x20, 4, 0);
    let req = control.try_attach().unwrap();
    disp.destroy_dm(0).unwrap();

    assert_eq!(dm.requeue([req]), 0);

    assert_eq!(hyp.completion(slot), Some(0));
}

#[test]
fn complete_held_releases_frontends_waiting_for_a_missing_device_model() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let slot = hyp.trap(0, BAO_IO_READ, 0x20, 4, 0);
    assert_eq!(dm.complete_held(), 1);
    assert_eq!(hyp.completion(slot), Some(0));
}

#[test]
fn each_request_goes_to_exactly_one_of_several_attachers() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let control = dm.create_control_client().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (c, dm, seen) = (control.clone(), dm.clone(), seen.clone());
            std::thread::spawn(move || {
                while let Ok(req) = c.attach() {
                    seen.lock().unwrap().push(req.request_id);
                    dm.complete(&req).unwrap();
                }
            })
        })
        .collect();
    let slots: Vec<u64> = (0..200)
        .map(|i| hyp.trap(0, BAO_IO_WRITE, 0x40, 4, i))
        .collect();
    for s in &slots {
        assert_eq!(hyp.wait_completion(*s, T), Some(0));
    }
    dm.destroy_control_client().unwrap();
    for t in threads {
        t.join().unwrap();
    }
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_unstable();
    assert_eq!(seen, slots);
    assert_eq!(hyp.refused_completions(), 0);
}

#[test]
fn notifier_runs_for_each_queued_request_and_once_for_earlier_ones() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let control = dm.create_control_client().unwrap();
    hyp.trap(0, BAO_IO_READ, 0x20, 4, 0);
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    control.set_notifier(Some(Arc::new(move || {
        h.fetch_add(1, Ordering::SeqCst);
    })));
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    hyp.trap(0, BAO_IO_READ, 0x24, 4, 0);
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    control.set_notifier(None);
    hyp.trap(0, BAO_IO_READ, 0x28, 4, 0);
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    assert_eq!(control.pending(), 3);
}

#[test]
fn io_client_serves_its_ranges_and_the_rest_falls_back_to_control() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let control = dm.create_control_client().unwrap();
    let writes = Arc::new(Mutex::new(Vec::new()));
    let w = writes.clone();
    let client = dm
        .create_client("regs", move |req: &VirtioRequest| {
            if req.op == BAO_IO_WRITE {
                w.lock().unwrap().push((req.addr, req.value));
            }
            req.addr + 1
        })
        .unwrap();
    client.add_range(0x1000, 0x1100).unwrap();
    let r = hyp.trap(0, BAO_IO_READ, 0x10fc, 4, 0);
    assert_eq!(hyp.wait_completion(r, T), Some(0x10fd));
    let w = hyp.trap(0, BAO_IO_WRITE, 0x1000, 8, 9);
    assert_eq!(hyp.wait_completion(w, T), Some(0));
    assert_eq!(*writes.lock().unwrap(), vec![(0x1000, 9)]);
    // Straddling the end of the range: the whole access must be inside, so control gets it.
    hyp.trap(0, BAO_IO_READ, 0x10fe, 4, 0);
    assert_eq!(control.try_attach().map(|r| r.addr), Some(0x10fe));
    let s = dm.stats();
    assert_eq!((s.to_io_client, s.to_control), (2, 1));
}

#[test]
fn io_client_ranges_are_validated() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let a = dm.create_client("a", |_: &VirtioRequest| 0).unwrap();
    let b = dm.create_client("b", |_: &VirtioRequest| 0).unwrap();
    a.add_range(0x100, 0x200).unwrap();
    assert_eq!(a.add_range(0x300, 0x300).unwrap_err().errno(), libc::EINVAL);
    let e = b.add_range(0x1ff, 0x210).unwrap_err();
    assert_eq!(
        e,
        RangeError::Overlap {
            start: 0x1ff,
            end: 0x210
        }
    );
    assert_eq!(e.errno(), libc::EEXIST);
    // b cannot delete a's range.
    assert_eq!(b.del_range(0x100, 0x200).unwrap_err().errno(), libc::ENOENT);
    a.del_range(0x100, 0x200).unwrap();
    b.add_range(0x1ff, 0x210).unwrap();
    assert_eq!(dm.range_count(), 1);
}

#[test]
fn client_names_longer_than_the_limit_are_refused() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let e = dm
        .create_client("0123456789abcdef", |_: &VirtioRequest| 0)
        .unwrap_err();
    assert!(matches!(e, ClientError::NameTooLong(16)));
    assert_eq!(e.errno(), libc::EINVAL);
    dm.create_client("0123456789abcde", |_: &VirtioRequest| 0)
        .unwrap();
}

#[test]
fn client_destroyed_once() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let client = dm.create_client("once", |_: &VirtioRequest| 0).unwrap();
    client.add_range(0, 0x100).unwrap();
    client.destroy().unwrap();
    let e = client.destroy().unwrap_err();
    assert!(matches!(e, ClientError::AlreadyDestroyed));
    assert_eq!(e.errno(), libc::ENOENT);
    assert_eq!(dm.io_client_count(), 0);
    assert_eq!(dm.range_count(), 0);
    assert_eq!(client.add_range(0, 1), Err(RangeError::ShuttingDown));
    // Destroying the DM afterwards does not destroy it again (and does not hang).
    disp.destroy_dm(0).unwrap();
    assert!(client.is_destroyed());
}

#[test]
fn io_client_destroy_drains_its_queue_through_the_handler() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let gate = Arc::new(Barrier::new(2));
    let g = gate.clone();
    let first = Arc::new(AtomicBool::new(true));
    let client = dm
        .create_client("slow", move |_: &VirtioRequest| {
            if first.swap(false, Ordering::SeqCst) {
                g.wait();
            }
            7
        })
        .unwrap();
    client.add_range(0, 0x100).unwrap();
    let slots: Vec<u64> = (0..5)
        .map(|_| hyp.trap(0, BAO_IO_READ, 0x10, 4, 0))
        .collect();
    let c = client.clone();
    let destroyer = std::thread::spawn(move || c.destroy());
    std::thread::sleep(Duration::from_millis(20));
    gate.wait();
    destroyer.join().unwrap().unwrap();
    for s in slots {
        assert_eq!(hyp.completion(s), Some(7));
    }
}

#[test]
fn io_client_may_destroy_itself_from_its_handler() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let me: Arc<Mutex<Option<Arc<IoClient>>>> = Arc::new(Mutex::new(None));
    let m = me.clone();
    let client = dm
        .create_client("self", move |_: &VirtioRequest| {
            if let Some(c) = m.lock().unwrap().take() {
                c.destroy().unwrap();
            }
            1
        })
        .unwrap();
    *me.lock().unwrap() = Some(client.clone());
    client.add_range(0, 0x100).unwrap();
    let s = hyp.trap(0, BAO_IO_READ, 0x10, 4, 0);
    assert_eq!(hyp.wait_completion(s, T), Some(1));
    assert!(client.is_destroyed());
    disp.destroy_dm(0).unwrap();
}

#[test]
fn a_panicking_handler_completes_with_zero_and_keeps_serving() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let client = dm
        .create_client("panicky", |req: &VirtioRequest| {
            assert!(req.addr != 0x10, "handler bug");
            5
        })
        .unwrap();
    client.add_range(0, 0x100).unwrap();
    let a = hyp.trap(0, BAO_IO_READ, 0x10, 4, 0);
    let b = hyp.trap(0, BAO_IO_READ, 0x14, 4, 0);
    assert_eq!(hyp.wait_completion(a, T), Some(0));
    assert_eq!(hyp.wait_completion(b, T), Some(5));
}

#[test]
fn a_full_queue_completes_the_request_with_zero() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    dm.pause().unwrap();
    let slots: Vec<u64> = (0..=BAO_IO_CLIENT_QUEUE_MAX)
        .map(|_| hyp.trap_quiet(0, BAO_IO_READ, 0x10, 4, 0))
        .collect();
    dm.resume().unwrap();
    assert_eq!(dm.held(), BAO_IO_CLIENT_QUEUE_MAX);
    assert_eq!(hyp.completion(slots[BAO_IO_CLIENT_QUEUE_MAX]), Some(0));
    assert_eq!(hyp.completion(slots[0]), None);
    assert_eq!(dm.stats().overflow, 1);
}

#[test]
fn ioeventfd_write_signals_and_completes_inline() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let control = dm.create_control_client().unwrap();
    let fd = efd();
    dm.ioeventfd(ioevfd(&fd, 0x50, 4, Some(1))).unwrap();
    let s = hyp.trap(0, BAO_IO_WRITE, 0x50, 4, 1);
    // Completed before trap() returned: inline on the dispatching thread.
    assert_eq!(hyp.completion(s), Some(0));
    assert_eq!(fd.read().unwrap(), 1);
    // Another queue index is not for this eventfd: it reaches the device model.
    hyp.trap(0, BAO_IO_WRITE, 0x50, 4, 0);
    assert_eq!(control.try_attach().map(|r| r.value), Some(0));
    // A read of the notify register completes with 0 without the device model.
    let r = hyp.trap(0, BAO_IO_READ, 0x50, 4, 0);
    assert_eq!(hyp.completion(r), Some(0));
    assert!(control.try_attach().is_none());
    assert_eq!(dm.stats().to_ioeventfd, 2);
}

const STATUS: StatusWordConfig = StatusWordConfig {
    status_addr: 0x60,
    ack_addr: 0x64,
};

#[test]
fn status_word_read_returns_the_word_inline() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let control = dm.create_control_client().unwrap();
    let page = dm.register_status_word(STATUS).unwrap();
    page.word()
        .fetch_or(0b11, std::sync::atomic::Ordering::Release);
    let s = hyp.trap(0, BAO_IO_READ, 0x60, 4, 0);
    // Completed before trap() returned, without the device model.
    assert_eq!(hyp.completion(s), Some(0b11));
    assert!(control.try_attach().is_none());
    assert_eq!(dm.stats().to_status_word, 1);
    assert_eq!(dm.stats().to_control, 0);
}

#[test]
fn status_word_ack_clears_exactly_the_bits_written() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let control = dm.create_control_client().unwrap();
    let page = dm.register_status_word(STATUS).unwrap();
    page.word()
        .store(0b1011, std::sync::atomic::Ordering::Release);
    let s = hyp.trap(0, BAO_IO_WRITE, 0x64, 4, 0b0010);
    assert!(hyp.completion(s).is_some(), "completed inline");
    assert_eq!(page.load(), 0b1001);
    // Bits above 32 of the trapped value do not reach the word.
    hyp.trap(0, BAO_IO_WRITE, 0x64, 4, 0xffff_ffff_0000_0001);
    assert_eq!(page.load(), 0b1000);
    assert!(control.try_attach().is_none());
    assert_eq!(dm.stats().to_status_word, 2);
}

#[test]
fn status_word_other_widths_and_directions_fall_through_to_the_device_model() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let control = dm.create_control_client().unwrap();
    let page = dm.register_status_word(STATUS).unwrap();
    page.word().store(1, std::sync::atomic::Ordering::Release);
    for (op, addr, width) in [
        (BAO_IO_READ, 0x60, 1),
        (BAO_IO_READ, 0x60, 2),
        (BAO_IO_READ, 0x60, 8),
        (BAO_IO_WRITE, 0x64, 2),
        (BAO_IO_WRITE, 0x60, 4),
        (BAO_IO_READ, 0x64, 4),
        (BAO_IO_READ, 0x62, 2),
    ] {
        hyp.trap(0, op, addr, width, 1);
        let r = control.try_attach().expect("routed to the device model");
        assert_eq!((r.op, r.addr, r.access_width), (op, addr, width));
    }
    assert_eq!(page.load(), 1, "no fall-through access touched the word");
    assert_eq!(dm.stats().to_status_word, 0);
}

#[test]
fn status_word_registration_is_validated() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    for bad in [
        StatusWordConfig {
            status_addr: 0x62,
            ack_addr: 0x64,
        },
        StatusWordConfig {
            status_addr: 0x60,
            ack_addr: u64::MAX - 3,
        },
    ] {
        let e = dm.register_status_word(bad).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL, "{bad:?}");
    }
    // An ioeventfd on either register (even one byte of it) conflicts, both ways round.
    let fd = efd();
    dm.ioeventfd(ioevfd(&fd, 0x67, 1, None)).unwrap();
    let e = dm.register_status_word(STATUS).unwrap_err();
    assert!(matches!(e, StatusWordError::IoeventfdConflict(0x67)));
    assert_eq!(e.errno(), libc::EEXIST);
    let mut d = ioevfd(&fd, 0x67, 1, None);
    d.deassign = true;
    dm.ioeventfd(d).unwrap();
    let page = dm.register_status_word(STATUS).unwrap();
    assert_eq!(
        dm.ioeventfd(ioevfd(&fd, 0x60, 0, None)),
        Err(IoeventfdError::Exists(0x60))
    );
    dm.ioeventfd(ioevfd(&fd, 0x50, 4, None)).unwrap();
    // One per DM.
    let e = dm.register_status_word(STATUS).unwrap_err();
    assert!(matches!(e, StatusWordError::Exists));
    // Unregistering names the page; afterwards the registers reach the device model again.
    let other = Arc::new(StatusPage::new().unwrap());
    assert!(matches!(
        dm.unregister_status_word(&other),
        Err(StatusWordError::NotFound)
    ));
    dm.unregister_status_word(&page).unwrap();
    assert!(!dm.has_status_word());
    let control = dm.create_control_client().unwrap();
    hyp.trap(0, BAO_IO_READ, 0x60, 4, 0);
    assert!(control.try_attach().is_some());
}

#[test]
fn destroying_the_dm_drops_its_status_word() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let page = dm.register_status_word(STATUS).unwrap();
    disp.destroy_dm(0).unwrap();
    assert!(!dm.has_status_word());
    assert!(matches!(
        dm.register_status_word(STATUS),
        Err(StatusWordError::ShuttingDown)
    ));
    assert_eq!(
        Arc::strong_count(&page),
        1,
        "the DM no longer holds the page"
    );
}

#[test]
fn deassign_does_not_reassign() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let control = dm.create_control_client().unwrap();
    let fd = efd();
    dm.ioeventfd(ioevfd(&fd, 0x50, 4, None)).unwrap();
    let mut cfg = ioevfd(&fd, 0x50, 4, None);
    cfg.deassign = true;
    dm.ioeventfd(cfg.clone()).unwrap();
    assert_eq!(dm.ioeventfd_count(), 0);
    hyp.trap(0, BAO_IO_WRITE, 0x50, 4, 0);
    assert!(fd.read().is_err(), "not signalled");
    assert!(control.try_attach().is_some());
    let e = dm.ioeventfd(cfg).unwrap_err();
    assert_eq!(e.errno(), libc::ENOENT);
}

#[test]
fn irqfd_signal_injects_the_frontend_interrupt() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let fd = efd();
    dm.irqfd_assign(fd.clone()).unwrap();
    fd.write(1).unwrap();
    assert_eq!(hyp.wait_notifies(0, 1, T), 1);
    fd.write(1).unwrap();
    assert_eq!(hyp.wait_notifies(0, 2, T), 2);
    assert_eq!(dm.stats().irqfd_notifies, 2);
}

#[test]
fn irqfd_already_signalled_injects_once_at_assign() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let fd = efd();
    fd.write(3).unwrap();
    dm.irqfd_assign(fd.clone()).unwrap();
    assert_eq!(hyp.wait_notifies(0, 1, T), 1);
    // Destroying the DM joins its irqfd thread: the count is final once it returns.
    disp.destroy_dm(0).unwrap();
    assert_eq!(hyp.notifies(0), 1, "coalesced into one NOTIFY");
    assert!(fd.read().is_err(), "the server read the whole counter");
}

#[test]
fn irqfd_same_eventfd_twice_is_busy_and_deassign_stops_it() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let fd = efd();
    dm.irqfd_assign(fd.clone()).unwrap();
    let e = dm.irqfd_assign(fd.clone()).unwrap_err();
    assert!(matches!(e, IrqfdError::Busy));
    assert_eq!(e.errno(), libc::EBUSY);
    dm.irqfd_deassign(&fd).unwrap();
    assert_eq!(dm.irqfd_count(), 0);
    fd.write(1).unwrap();
    assert_eq!(dm.irqfd_deassign(&fd).unwrap_err().errno(), libc::ENOENT);
    // A fence: a second irqfd signalled after `fd`. The server takes ready eventfds in the
    // order they became ready, so once the fence's NOTIFY is seen, `fd` would have been
    // handled already if it were still watched; destroying the DM then joins the server.
    let fence = efd();
    dm.irqfd_assign(fence.clone()).unwrap();
    fence.write(1).unwrap();
    assert_eq!(hyp.wait_notifies(0, 1, T), 1);
    disp.destroy_dm(0).unwrap();
    assert_eq!(hyp.notifies(0), 1, "only the fence's NOTIFY");
    assert_eq!(fd.read().unwrap(), 1, "nobody read the deassigned eventfd");
}

#[test]
fn pause_stops_dispatch_and_resume_runs_a_forced_pass() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let control = dm.create_control_client().unwrap();
    dm.pause().unwrap();
    assert!(!hyp.has_handler(0));
    hyp.trap(0, BAO_IO_READ, 0x10, 4, 0);
    assert!(control.try_attach().is_none());
    assert_eq!(hyp.pending(0), 1);
    dm.pause().unwrap();
    dm.resume().unwrap();
    assert!(dm.is_paused(), "pauses nest");
    dm.resume().unwrap();
    assert!(hyp.has_handler(0));
    assert!(control.try_attach().is_some());
    assert_eq!(dm.resume(), Err(DmError::NotPaused));
}

#[test]
fn pause_waits_for_an_in_flight_dispatch() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let control = dm.create_control_client().unwrap();
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let release = Arc::new(Barrier::new(2));
    let done = Arc::new(AtomicBool::new(false));
    let (r, d) = (release.clone(), done.clone());
    control.set_notifier(Some(Arc::new(move || {
        entered_tx.send(()).ok();
        r.wait();
        d.store(true, Ordering::SeqCst);
    })));
    let h = hyp.clone();
    let frontend = std::thread::spawn(move || h.trap(0, BAO_IO_READ, 0x10, 4, 0));
    entered_rx.recv().unwrap();
    let dm2 = dm.clone();
    let pauser = std::thread::spawn(move || {
        dm2.pause().unwrap();
    });
    std::thread::sleep(Duration::from_millis(30));
    assert!(!pauser.is_finished(), "pause returned while a pass ran");
    release.wait();
    pauser.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
    frontend.join().unwrap();
}

#[test]
fn destroying_one_dm_leaves_another_dispatching() {
    let (hyp, disp) = setup(2);
    let dm0 = disp.create_dm(desc(&hyp, 0)).unwrap();
    let dm1 = disp.create_dm(desc(&hyp, 1)).unwrap();
    let c1 = dm1.create_control_client().unwrap();
    let _c0 = dm0.create_control_client().unwrap();
    disp.destroy_dm(0).unwrap();
    assert!(!hyp.has_handler(0));
    assert!(hyp.has_handler(1));
    let s = hyp.trap(1, BAO_IO_READ, 0x10, 4, 0);
    let mut req = c1.try_attach().expect("DM 1 still dispatches");
    req.value = 3;
    dm1.complete(&req).unwrap();
    assert_eq!(hyp.completion(s), Some(3));
    // And a DM with the same id can be created again.
    disp.create_dm(desc(&hyp, 0)).unwrap();
}

#[test]
fn destroy_frees_exactly_once_with_requests_in_flight() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    // Held (no control client yet), then queued to the control client...
    let held = hyp.trap(0, BAO_IO_READ, 0x10, 4, 0);
    let control = dm.create_control_client().unwrap();
    let queued = hyp.trap(0, BAO_IO_READ, 0x14, 4, 0);
    // ...queued to a slow I/O client...
    let go = Arc::new(Barrier::new(2));
    let g = go.clone();
    let client = dm
        .create_client("slow", move |_: &VirtioRequest| {
            g.wait();
            9
        })
        .unwrap();
    client.add_range(0x1000, 0x2000).unwrap();
    let h = hyp.clone();
    let in_client = std::thread::spawn(move || h.trap(0, BAO_IO_READ, 0x1000, 4, 0));
    // ...and still pending in the hypervisor (paused: not fetched).
    std::thread::sleep(Duration::from_millis(20));
    dm.pause().unwrap();
    let pending = hyp.trap(0, BAO_IO_READ, 0x18, 4, 0);
    // A device-model thread serves the control client until it is told to stop.
    let attacher = {
        let (c, dm) = (control.clone(), dm.clone());
        std::thread::spawn(move || {
            let mut served = Vec::new();
            let end = loop {
                match c.attach() {
                    Ok(mut req) => {
                        req.value = 0x77;
                        dm.complete(&req).unwrap();
                        served.push(req.request_id);
                    }
                    Err(e) => break e,
                }
            };
            (served, end)
        })
    };
    let weak = Arc::downgrade(&dm);
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        go.wait();
    });
    disp.destroy_dm(0).unwrap();
    releaser.join().unwrap();
    let in_client = in_client.join().unwrap();
    let (served, end) = attacher.join().unwrap();
    assert_eq!(end, AttachError::ShuttingDown);
    for s in [held, queued, pending] {
        let want = if served.contains(&s) { 0x77 } else { 0 };
        assert_eq!(hyp.completion(s), Some(want), "slot {s}");
    }
    assert!(
        !served.contains(&pending),
        "paused: never dispatched to the client"
    );
    assert_eq!(hyp.completion(in_client), Some(9));
    assert_eq!(hyp.incomplete(), 0);
    assert_eq!(hyp.refused_completions(), 0, "nothing completed twice");
    assert_eq!(disp.destroy_dm(0), Err(DmError::NoSuchDm(0)));
    assert!(!hyp.has_handler(0));
    assert_eq!(dm.pause(), Err(DmError::ShuttingDown));
    assert!(matches!(
        dm.create_control_client(),
        Err(ClientError::ShuttingDown)
    ));
    assert_eq!(
        dm.ioeventfd(ioevfd(&efd(), 0, 4, None)),
        Err(IoeventfdError::ShuttingDown)
    );
    assert!(matches!(
        dm.irqfd_assign(efd()),
        Err(IrqfdError::ShuttingDown)
    ));
    drop((dm, control, client));
    assert!(weak.upgrade().is_none(), "the DM is freed");
}

#[test]
fn get_info_concurrent_with_destroy_never_sees_a_torn_dm() {
    let (hyp, disp) = setup(1);
    let stop = Arc::new(AtomicBool::new(false));
    let found = Arc::new(AtomicU64::new(0));
    let lookers: Vec<_> = (0..3)
        .map(|_| {
            let (disp, stop, found) = (disp.clone(), stop.clone(), found.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match disp.dm(0) {
                        Ok(dm) => {
                            found.fetch_add(1, Ordering::Relaxed);
                            assert_eq!(dm.info().id, 0);
                            assert_eq!(dm.info().shmem_size, 0x10_0000);
                            match dm.create_control_client() {
                                Ok(_) | Err(ClientError::Busy | ClientError::ShuttingDown) => {}
                                Err(e) => panic!("unexpected {e}"),
                            }
                        }
                        Err(e) => assert_eq!(e, DmError::NoSuchDm(0)),
                    }
                }
            })
        })
        .collect();
    for _ in 0..200 {
        disp.create_dm(desc(&hyp, 0)).unwrap();
        disp.destroy_dm(0).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for l in lookers {
        l.join().unwrap();
    }
    assert!(disp.dms().is_empty());
}

#[test]
fn dropping_the_dispatcher_destroys_every_dm() {
    let (hyp, disp) = setup(2);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    disp.create_dm(desc(&hyp, 1)).unwrap();
    let s = hyp.trap(0, BAO_IO_READ, 0x10, 4, 0);
    drop(disp);
    assert!(dm.is_destroyed());
    assert!(!hyp.has_handler(0) && !hyp.has_handler(1));
    assert_eq!(hyp.completion(s), Some(0));
}

#[test]
fn a_status_bit_irqfd_needs_the_status_word_and_sets_its_bits_with_the_notify() {
    let (hyp, disp) = setup(1);
    let dm = disp.create_dm(desc(&hyp, 0)).unwrap();
    let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let e = dm.irqfd_assign_status_bits(fd.clone(), 1).unwrap_err();
    assert!(matches!(e, IrqfdError::NoStatusWord));
    assert_eq!(e.errno(), libc::ENOENT);
    let page = dm.register_status_word(STATUS).unwrap();

    dm.irqfd_assign_status_bits(fd.clone(), 1).unwrap();
    fd.write(1).unwrap();

    assert_eq!(hyp.wait_notifies(0, 1, Duration::from_secs(10)), 1);
    assert_eq!(page.load(), 1);
    // The frontend's InterruptStatus read is answered from it, inline.
    let s = hyp.trap(0, BAO_IO_READ, 0x60, 4, 0);
    assert_eq!(hyp.completion(s), Some(1));
    dm.irqfd_deassign(&fd).unwrap();
    assert_eq!(dm.irqfd_count(), 0);
}
