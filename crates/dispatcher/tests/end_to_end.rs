//! End to end over the real hypervisor model and the in-process frontend: a register file
//! served by a control-client thread, a QueueNotify write through the ioeventfd path, an
//! irqfd signal reaching the frontend's interrupt sink, an in-process I/O client.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use common::{mmio, platform, FRONTEND_VM};
use remio_abi::uapi::BAO_IO_READ;
use remio_abi::VirtioRequest;
use remio_dispatcher::{AttachError, IoeventfdConfig};
use remio_frontend::inprocess::InProcessFrontend;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const QUEUE_NOTIFY: u64 = 0x50;

#[test]
fn frontend_reaches_a_register_file_an_ioeventfd_and_an_irqfd() {
    let p = platform(1, 4, Some(Duration::from_secs(10)));
    let dm = p.create_dm(0);
    let fe = InProcessFrontend::new(&p.hyp, FRONTEND_VM).unwrap();
    let base = mmio(0);

    // The device model: a register file behind the control client.
    let control = dm.create_control_client().unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let server = {
        let (control, dm, seen) = (control.clone(), dm.clone(), seen.clone());
        std::thread::spawn(move || {
            let mut regs: HashMap<u64, u64> = HashMap::new();
            loop {
                let mut req = match control.attach() {
                    Ok(r) => r,
                    Err(AttachError::ShuttingDown) => return regs,
                };
                seen.fetch_add(1, Ordering::SeqCst);
                if req.op == BAO_IO_READ {
                    req.value = regs.get(&req.addr).copied().unwrap_or(0);
                } else {
                    regs.insert(req.addr, req.value);
                }
                dm.complete(&req).unwrap();
            }
        })
    };

    fe.write32(base + 0x70, 0xdead_beef).unwrap();
    assert_eq!(fe.read32(base + 0x70).unwrap(), 0xdead_beef);
    fe.write64(base + 0x100, 0x0102_0304_0506_0708).unwrap();
    assert_eq!(fe.read64(base + 0x100).unwrap(), 0x0102_0304_0506_0708);
    assert_eq!(seen.load(Ordering::SeqCst), 4);

    // QueueNotify for queue 1 wakes its eventfd and never reaches the device model.
    let kick = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    dm.ioeventfd(IoeventfdConfig {
        fd: kick.clone(),
        addr: base + QUEUE_NOTIFY,
        len: 4,
        datamatch: Some(1),
        deassign: false,
    })
    .unwrap();
    fe.write32(base + QUEUE_NOTIFY, 1).unwrap();
    assert_eq!(kick.read().unwrap(), 1);
    assert_eq!(seen.load(Ordering::SeqCst), 4);
    // Another queue's notify reaches the device model.
    fe.write32(base + QUEUE_NOTIFY, 0).unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 5);

    // The device model's irqfd signal reaches the frontend interrupt sink.
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    fe.set_interrupt_callback(
        0,
        Arc::new(move || {
            tx.lock().unwrap().send(()).ok();
        }),
    )
    .unwrap();
    let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    dm.irqfd_assign(irq.clone()).unwrap();
    irq.write(1).unwrap();
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(dm.stats().irqfd_notifies >= 1);

    // An in-process I/O client serves its range on its own thread.
    let client = dm
        .create_client("cfg", move |req: &VirtioRequest| req.addr - base)
        .unwrap();
    client.add_range(base + 0x100, base + 0x200).unwrap();
    assert_eq!(fe.read16(base + 0x1f0).unwrap(), 0x1f0);
    assert_eq!(seen.load(Ordering::SeqCst), 5);

    p.disp.destroy_dm(0).unwrap();
    let regs = server.join().unwrap();
    assert_eq!(regs.get(&(base + 0x70)), Some(&0xdead_beef));
    let s = p.hyp.stats();
    assert_eq!(s.timeouts, 0);
    assert_eq!(s.invalid_hypercalls, 0);
    assert_eq!(s.requests, s.completions);
}

#[test]
fn accesses_before_the_device_model_attaches_are_held_and_served() {
    let p = platform(1, 4, Some(Duration::from_secs(10)));
    let dm = p.create_dm(0);
    let fe = Arc::new(InProcessFrontend::new(&p.hyp, FRONTEND_VM).unwrap());
    let f = fe.clone();
    let vcpu = std::thread::spawn(move || f.read32(mmio(0) + 0x8).unwrap());
    while dm.held() == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let control = dm.create_control_client().unwrap();
    let mut req = control.attach().unwrap();
    req.value = 0x2;
    dm.complete(&req).unwrap();
    assert_eq!(vcpu.join().unwrap(), 0x2);
}

#[test]
fn destroying_a_dm_completes_its_stalled_frontend_accesses() {
    let p = platform(2, 4, None);
    p.create_dm(0);
    let dm1 = p.create_dm(1);
    let fe = Arc::new(InProcessFrontend::new(&p.hyp, FRONTEND_VM).unwrap());
    let f = fe.clone();
    // No timeout and no device model: only the destruction can release this vCPU.
    let vcpu = std::thread::spawn(move || f.read32(mmio(0)).unwrap());
    while p.disp.dm(0).unwrap().held() == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    p.disp.destroy_dm(0).unwrap();
    assert_eq!(vcpu.join().unwrap(), 0);
    // DM 1 still dispatches.
    let c1 = dm1.create_control_client().unwrap();
    let f = fe.clone();
    let vcpu = std::thread::spawn(move || f.read32(mmio(1)).unwrap());
    let mut req = c1.attach().unwrap();
    req.value = 11;
    dm1.complete(&req).unwrap();
    assert_eq!(vcpu.join().unwrap(), 11);
}
