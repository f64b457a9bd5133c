//! Behaviour tests of the whole model: frontend threads trap, a hand-written backend loop
//! drives the [`Hypercall`] trait (a real double: the backend is the real `BackendVm`).

use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use remio_abi::{Hypercall, InterruptController, RemioArgs, RemioOp, RemioRet};

use crate::*;

const WIN0: u64 = 0x1000_0000;
const WIN1: u64 = 0x1000_1000;
const SHMEM_BASE: u64 = 0x8000_0000;
const LONG: Duration = Duration::from_secs(20);

fn fe(bind_key: u32, mmio_base: u64, irq: u32) -> RemioDeviceConfig {
    RemioDeviceConfig {
        bind_key,
        role: Role::Frontend,
        mmio_base,
        mmio_size: 0x200,
        irq,
        shmem_id: 0,
        shmem_base: SHMEM_BASE,
    }
}

fn be(bind_key: u32, irq: u32) -> RemioDeviceConfig {
    RemioDeviceConfig {
        bind_key,
        role: Role::Backend,
        mmio_base: 0,
        mmio_size: 0,
        irq,
        shmem_id: 0,
        shmem_base: SHMEM_BASE,
    }
}

fn config(vms: Vec<VmConfig>, slots: usize, timeout: Option<Duration>) -> HypConfig {
    HypConfig {
        shmem: vec![ShmemConfig {
            id: 0,
            size: 0x1000,
            backing: None,
        }],
        vms,
        slots,
        timeout,
    }
}

/// VM 1: frontends for keys 1 (WIN0, irq 10) and 2 (WIN1, irq 11).
/// VM 2: backends for keys 1 (dm 0, irq 20) and 2 (dm 1, irq 21).
fn two_devices(slots: usize, timeout: Option<Duration>) -> HypConfig {
    config(
        vec![
            VmConfig {
                id: 1,
                remio_devices: vec![fe(1, WIN0, 10), fe(2, WIN1, 11)],
            },
            VmConfig {
                id: 2,
                remio_devices: vec![be(1, 20), be(2, 21)],
            },
        ],
        slots,
        timeout,
    )
}

fn setup(slots: usize, timeout: Option<Duration>) -> (Arc<Hypervisor>, FrontendVm, BackendVm) {
    let hyp = Hypervisor::new(two_devices(slots, timeout)).unwrap();
    let f = hyp.frontend(1).unwrap();
    let b = hyp.backend(2).unwrap();
    (hyp, f, b)
}

fn call(b: &BackendVm, dm_id: u64, op: u64, addr: u64, value: u64, request_id: u64) -> RemioRet {
    b.remote_io(&RemioArgs {
        dm_id,
        addr,
        op,
        value,
        request_id,
    })
}

fn ask(b: &BackendVm, dm_id: u64) -> RemioRet {
    call(b, dm_id, RemioOp::Ask as u64, 0, 0, 0)
}

fn complete(b: &BackendVm, dm_id: u64, op: RemioOp, request_id: u64, value: u64) -> RemioRet {
    call(b, dm_id, op as u64, 0, value, request_id)
}

/// Polls until `cond` holds; false if it did not within [`LONG`].
fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + LONG;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(1));
    }
    false
}

fn spawn_read(
    f: &FrontendVm,
    addr: u64,
    width: u8,
) -> thread::JoinHandle<Result<u64, AccessError>> {
    let f = f.clone();
    thread::spawn(move || f.read(addr, width))
}

fn err(cfg: HypConfig) -> ConfigError {
    Hypervisor::new(cfg).unwrap_err()
}

// ---- configuration ------------------------------------------------------------------------

#[test]
fn valid_config_is_accepted_and_numbers_devices_per_role() {
    let hyp = Hypervisor::new(two_devices(4, None)).unwrap();
    let f = hyp.frontend(1).unwrap();
    let b = hyp.backend(2).unwrap();
    assert!(hyp.backend(1).is_none());
    assert!(hyp.frontend(2).is_none());
    assert!(hyp.frontend(99).is_none());
    let fd: Vec<_> = f
        .devices()
        .iter()
        .map(|d| (d.index, d.bind_key, d.irq))
        .collect();
    assert_eq!(fd, [(0, 1, 10), (1, 2, 11)]);
    let bd: Vec<_> = b
        .devices()
        .iter()
        .map(|d| (d.dm_id, d.bind_key, d.irq))
        .collect();
    assert_eq!(bd, [(0, 1, 20), (1, 2, 21)]);
    assert_eq!(b.devices()[0].shmem_base, SHMEM_BASE);
    assert_eq!(b.devices()[0].shmem_size, 0x1000);
    assert_eq!(hyp.slot_count(), 4);
}

#[test]
fn zero_slots_is_refused() {
    assert!(matches!(err(two_devices(0, None)), ConfigError::NoSlots));
}

#[test]
fn too_many_slots_is_refused() {
    assert!(matches!(
        err(two_devices(MAX_SLOTS + 1, None)),
        ConfigError::TooManySlots(_)
    ));
}

#[test]
fn zero_timeout_is_refused() {
    assert!(matches!(
        err(two_devices(1, Some(Duration::ZERO))),
        ConfigError::ZeroTimeout
    ));
}

#[test]
fn duplicate_shmem_is_refused() {
    let mut cfg = two_devices(1, None);
    cfg.shmem.push(ShmemConfig {
        id: 0,
        size: 0x1000,
        backing: None,
    });
    assert!(matches!(err(cfg), ConfigError::DuplicateShmem(0)));
}

#[test]
fn empty_shmem_is_refused() {
    let mut cfg = two_devices(1, None);
    cfg.shmem[0].size = 0;
    assert!(matches!(err(cfg), ConfigError::EmptyShmem(0)));
}

#[test]
fn backing_file_smaller_than_the_region_is_refused() {
    let mut cfg = two_devices(1, None);
    let file = create_memfd(0x800).unwrap();
    cfg.shmem[0].backing = Some(file);
    assert!(matches!(
        err(cfg),
        ConfigError::ShmemBackingTooSmall {
            id: 0,
            size: 0x1000,
            len: 0x800
        }
    ));
}

#[test]
fn duplicate_vm_is_refused() {
    let mut cfg = two_devices(1, None);
    cfg.vms[1].id = 1;
    assert!(matches!(err(cfg), ConfigError::DuplicateVm(1)));
}

#[test]
fn unknown_shmem_is_refused_naming_vm_and_bind_key() {
    let mut cfg = two_devices(1, None);
    cfg.vms[1].remio_devices[1].shmem_id = 7;
    let e = err(cfg);
    assert!(matches!(
        e,
        ConfigError::UnknownShmem {
            vm: 2,
            bind_key: 2,
            shmem_id: 7
        }
    ));
    assert_eq!(
        e.to_string(),
        "VM 2, bind key 2: shared memory 7 does not exist"
    );
}

#[test]
fn overflowing_shmem_window_is_refused() {
    let mut cfg = two_devices(1, None);
    cfg.vms[0].remio_devices[0].shmem_base = u64::MAX - 0x10;
    assert!(matches!(
        err(cfg),
        ConfigError::ShmemWindowOverflow {
            vm: 1,
            bind_key: 1,
            ..
        }
    ));
}

#[test]
fn two_frontends_for_one_bind_key_are_refused() {
    let mut cfg = two_devices(1, None);
    cfg.vms.push(VmConfig {
        id: 3,
        remio_devices: vec![fe(1, WIN0, 10)],
    });
    assert!(matches!(
        err(cfg),
        ConfigError::DuplicateRole {
            bind_key: 1,
            role: Role::Frontend,
            first_vm: 1,
            second_vm: 3
        }
    ));
}

#[test]
fn frontend_without_backend_is_refused() {
    let mut cfg = two_devices(1, None);
    cfg.vms[1].remio_devices.pop();
    assert!(matches!(
        err(cfg),
        ConfigError::MissingBackend { bind_key: 2, vm: 1 }
    ));
}

#[test]
fn backend_without_frontend_is_refused() {
    let mut cfg = two_devices(1, None);
    cfg.vms[0].remio_devices.remove(0);
    assert!(matches!(
        err(cfg),
        ConfigError::MissingFrontend { bind_key: 1, vm: 2 }
    ));
}

#[test]
fn sides_disagreeing_on_shmem_base_are_refused() {
    let mut cfg = two_devices(1, None);
    cfg.vms[1].remio_devices[0].shmem_base = SHMEM_BASE + 0x1000;
    assert!(matches!(
        err(cfg),
        ConfigError::ShmemMismatch { bind_key: 1, .. }
    ));
}

#[test]
fn sides_disagreeing_on_shmem_id_are_refused() {
    let mut cfg = two_devices(1, None);
    cfg.shmem.push(ShmemConfig {
        id: 5,
        size: 0x1000,
        backing: None,
    });
    cfg.vms[1].remio_devices[1].shmem_id = 5;
    assert!(matches!(
        err(cfg),
        ConfigError::ShmemMismatch {
            bind_key: 2,
            frontend_shmem: 0,
            backend_shmem: 5,
            ..
        }
    ));
}

#[test]
fn empty_mmio_window_is_refused() {
    let mut cfg = two_devices(1, None);
    cfg.vms[0].remio_devices[1].mmio_size = 0;
    assert!(matches!(
        err(cfg),
        ConfigError::EmptyMmio { vm: 1, bind_key: 2 }
    ));
}

#[test]
fn overflowing_mmio_window_is_refused() {
    let mut cfg = two_devices(1, None);
    cfg.vms[0].remio_devices[1].mmio_base = u64::MAX - 0x100;
    assert!(matches!(
        err(cfg),
        ConfigError::MmioOverflow {
            vm: 1,
            bind_key: 2,
            ..
        }
    ));
}

#[test]
fn overlapping_mmio_windows_are_refused_from_below_and_above() {
    let mut cfg = two_devices(1, None);
    cfg.vms[0].remio_devices[1].mmio_base = WIN0 + 0x1ff;
    assert!(matches!(
        err(cfg),
        ConfigError::MmioOverlap {
            vm: 1,
            bind_key: 1,
            other_bind_key: 2
        }
    ));
    let mut cfg = two_devices(1, None);
    cfg.vms[0].remio_devices[1].mmio_base = WIN0 - 0x100;
    assert!(matches!(err(cfg), ConfigError::MmioOverlap { vm: 1, .. }));
    // Adjacent windows are fine.
    let mut cfg = two_devices(1, None);
    cfg.vms[0].remio_devices[1].mmio_base = WIN0 + 0x200;
    assert!(Hypervisor::new(cfg).is_ok());
}

#[test]
fn backend_with_mmio_window_is_refused() {
    let mut cfg = two_devices(1, None);
    cfg.vms[1].remio_devices[0].mmio_size = 0x200;
    assert!(matches!(
        err(cfg),
        ConfigError::BackendMmio { vm: 2, bind_key: 1 }
    ));
}

#[test]
fn duplicate_irq_in_one_vm_is_refused() {
    let mut cfg = two_devices(1, None);
    cfg.vms[1].remio_devices[1].irq = 20;
    assert!(matches!(
        err(cfg),
        ConfigError::DuplicateIrq {
            vm: 2,
            irq: 20,
            bind_key: 1,
            other_bind_key: 2
        }
    ));
}

#[test]
fn same_irq_in_different_vms_is_fine() {
    let mut cfg = two_devices(1, None);
    cfg.vms[1].remio_devices[0].irq = 10;
    assert!(Hypervisor::new(cfg).is_ok());
}

// ---- shared memory ------------------------------------------------------------------------

#[test]
fn memfd_shmem_is_shared_by_both_sides() {
    let (_hyp, f, b) = setup(1, None);
    let back = b.devices()[0].shmem.clone();
    back.write_all_at(b"virtqueue", 0x10).unwrap();
    let mut buf = [0u8; 9];
    f.devices()[0].shmem.read_exact_at(&mut buf, 0x10).unwrap();
    assert_eq!(&buf, b"virtqueue");
    assert_eq!(back.metadata().unwrap().len(), 0x1000);
}

#[test]
fn external_backing_file_is_used_as_is() {
    let mut file = create_memfd(0x2000).unwrap();
    file.write_all(b"guest ram").unwrap();
    let probe = file.try_clone().unwrap();
    let mut cfg = two_devices(1, None);
    cfg.shmem[0].backing = Some(file);
    let hyp = Hypervisor::new(cfg).unwrap();
    let dev = hyp.backend(2).unwrap().devices()[0].clone();
    let mut buf = [0u8; 9];
    dev.shmem.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"guest ram");
    dev.shmem.write_all_at(b"X", 0).unwrap();
    probe.read_exact_at(&mut buf[..1], 0).unwrap();
    assert_eq!(buf[0], b'X');
}

// ---- frontend access checks ----------------------------------------------------------------

#[test]
fn bad_width_and_unmapped_accesses_are_errors_and_queue_nothing() {
    let (hyp, f, _b) = setup(1, None);
    assert_eq!(f.read(WIN0, 3), Err(AccessError::InvalidWidth(3)));
    assert_eq!(f.write(WIN0, 16, 0), Err(AccessError::InvalidWidth(16)));
    assert_eq!(
        f.read(WIN0 - 4, 4),
        Err(AccessError::Unmapped {
            addr: WIN0 - 4,
            width: 4
        })
    );
    // Straddles the end of the window.
    assert_eq!(
        f.read(WIN0 + 0x1fc, 8),
        Err(AccessError::Unmapped {
            addr: WIN0 + 0x1fc,
            width: 8
        })
    );
    assert!(f.read(u64::MAX, 8).is_err());
    assert_eq!(hyp.stats().requests, 0);
}

// ---- ASK --------------------------------------------------------------------------------

#[test]
fn ask_on_empty_fifo_returns_plus_one() {
    let (hyp, _f, b) = setup(2, None);
    let r = ask(&b, 0);
    assert_eq!(r.status, 1);
    assert_eq!(hyp.stats().asks_failed, 1);
}

#[test]
fn has_pending_is_a_flag_evaluated_after_the_pop_not_a_count() {
    let (hyp, f, b) = setup(4, None);
    let readers: Vec<_> = (0..3).map(|i| spawn_read(&f, WIN0 + 4 * i, 4)).collect();
    assert!(wait_until(|| hyp.stats().requests == 3));

    let asks: Vec<_> = (0..3).map(|_| ask(&b, 0)).collect();
    assert_eq!(
        asks.iter()
            .map(|r| (r.status, r.has_pending))
            .collect::<Vec<_>>(),
        [(0, 1), (0, 1), (0, 0)]
    );
    assert_eq!(ask(&b, 0).status, 1);
    for r in &asks {
        assert_eq!(
            complete(&b, 0, RemioOp::Read, r.request_id, r.addr).status,
            0
        );
    }
    let mut got: Vec<_> = readers
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    got.sort_unstable();
    assert_eq!(got, [WIN0, WIN0 + 4, WIN0 + 8]);
}

#[test]
fn ask_with_nonzero_addr_or_value_is_plus_one_and_pops_nothing() {
    let (hyp, f, b) = setup(2, None);
    let reader = spawn_read(&f, WIN0, 4);
    assert!(wait_until(|| hyp.stats().requests == 1));
    assert_eq!(call(&b, 0, RemioOp::Ask as u64, 4, 0, 0).status, 1);
    assert_eq!(call(&b, 0, RemioOp::Ask as u64, 0, 1, 0).status, 1);
    let r = ask(&b, 0);
    assert_eq!((r.status, r.addr), (0, WIN0));
    assert_eq!(complete(&b, 0, RemioOp::Read, r.request_id, 5).status, 0);
    assert_eq!(reader.join().unwrap(), Ok(5));
}

#[test]
fn out_of_range_dm_id_is_plus_one_for_ask_and_minus_three_otherwise() {
    let (_hyp, _f, b) = setup(2, None);
    assert_eq!(ask(&b, 2).status, 1);
    assert_eq!(ask(&b, u64::MAX).status, 1);
    assert_eq!(complete(&b, 2, RemioOp::Write, 0, 0).status, -3);
    assert_eq!(complete(&b, 2, RemioOp::Read, 0, 0).status, -3);
    assert_eq!(call(&b, 2, RemioOp::Notify as u64, 0, 0, 0).status, -3);
}

#[test]
fn ask_returns_the_write_request_whole() {
    let (hyp, f, b) = setup(2, None);
    let f2 = f.clone();
    let writer = thread::spawn(move || f2.write(WIN0 + 0x70, 2, 0x1234_5678_9abc_def0));
    assert!(wait_until(|| hyp.stats().requests == 1));
    let r = ask(&b, 0);
    assert_eq!(
        (
            r.status,
            r.addr,
            r.op,
            r.value,
            r.access_width,
            r.has_pending
        ),
        (
            0,
            WIN0 + 0x70,
            RemioOp::Write as u64,
            0x1234_5678_9abc_def0,
            2,
            0
        )
    );
    assert_eq!(complete(&b, 0, RemioOp::Write, r.request_id, 0).status, 0);
    assert_eq!(writer.join().unwrap(), Ok(()));
    assert_eq!(hyp.stats().writes, 1);
}

// ---- completions -------------------------------------------------------------------------

#[test]
fn read_value_is_returned_whole_without_masking() {
    let (_hyp, f, b) = setup(2, None);
    let reader = spawn_read(&f, WIN0 + 3, 1);
    let r = loop {
        let r = ask(&b, 0);
        if r.status == 0 {
            break r;
        }
        thread::yield_now();
    };
    assert_eq!((r.op, r.access_width), (RemioOp::Read as u64, 1));
    let st = complete(&b, 0, RemioOp::Read, r.request_id, 0xdead_beef_cafe_f00d);
    assert_eq!(st.status, 0);
    assert_eq!(reader.join().unwrap(), Ok(0xdead_beef_cafe_f00d));
}

#[test]
fn completion_with_wrong_op_is_invalid_args_and_leaves_the_request() {
    let (hyp, f, b) = setup(2, None);
    let reader = spawn_read(&f, WIN0, 4);
    assert!(wait_until(|| hyp.stats().requests == 1));
    let r = ask(&b, 0);
    assert_eq!(complete(&b, 0, RemioOp::Write, r.request_id, 1).status, -3);
    assert_eq!(hyp.stats().invalid_hypercalls, 1);
    assert_eq!(complete(&b, 0, RemioOp::Read, r.request_id, 2).status, 0);
    assert_eq!(reader.join().unwrap(), Ok(2));
}

#[test]
fn completion_from_another_device_is_invalid_args() {
    let (hyp, f, b) = setup(2, None);
    let reader = spawn_read(&f, WIN0, 4);
    assert!(wait_until(|| hyp.stats().requests == 1));
    let r = ask(&b, 0);
    assert_eq!(complete(&b, 1, RemioOp::Read, r.request_id, 1).status, -3);
    assert_eq!(complete(&b, 0, RemioOp::Read, r.request_id, 2).status, 0);
    assert_eq!(reader.join().unwrap(), Ok(2));
}

#[test]
fn completion_of_a_slot_not_processing_is_invalid_args() {
    let (hyp, f, b) = setup(2, None);
    // FREE slots.
    assert_eq!(complete(&b, 0, RemioOp::Read, 0, 0).status, -3);
    assert_eq!(complete(&b, 0, RemioOp::Read, 1, 0).status, -3);
    // Out of range.
    assert_eq!(complete(&b, 0, RemioOp::Read, 2, 0).status, -3);
    assert_eq!(complete(&b, 0, RemioOp::Read, u64::MAX, 0).status, -3);
    // PENDING (not yet asked): no slot may be completed.
    let reader = spawn_read(&f, WIN0, 4);
    assert!(wait_until(|| hyp.stats().requests == 1));
    assert_eq!(complete(&b, 0, RemioOp::Read, 0, 0).status, -3);
    assert_eq!(complete(&b, 0, RemioOp::Read, 1, 0).status, -3);
    let r = ask(&b, 0);
    assert_eq!(complete(&b, 0, RemioOp::Read, r.request_id, 9).status, 0);
    // COMPLETE or FREE again: a second completion is refused.
    assert_eq!(complete(&b, 0, RemioOp::Read, r.request_id, 9).status, -3);
    assert_eq!(reader.join().unwrap(), Ok(9));
    assert_eq!(hyp.stats().completions, 1);
}

#[test]
fn unknown_op_is_invalid_args() {
    let (_hyp, _f, b) = setup(1, None);
    assert_eq!(call(&b, 0, 4, 0, 0, 0).status, -3);
    assert_eq!(call(&b, 0, u64::MAX, 0, 0, 0).status, -3);
}

// ---- NOTIFY ------------------------------------------------------------------------------

#[test]
fn notify_reaches_the_callback_and_the_eventfd_of_that_device_only() {
    let (hyp, f, b) = setup(1, None);
    let hits = Arc::new(AtomicUsize::new(0));
    let h = Arc::clone(&hits);
    f.set_interrupt_sink_for_irq(
        11,
        Arc::new(move || {
            h.fetch_add(1, Ordering::SeqCst);
        }),
    )
    .unwrap();
    let efd0 = f.interrupt_eventfd(0).unwrap();

    assert_eq!(call(&b, 1, RemioOp::Notify as u64, 0, 0, 0).status, 0);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert!(efd0.read().is_err(), "device 0 must not be signalled");

    assert_eq!(call(&b, 0, RemioOp::Notify as u64, 0, 0, 0).status, 0);
    assert_eq!(efd0.read().unwrap(), 1);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert_eq!(hyp.stats().notifies, 2);
    assert!(matches!(
        f.set_interrupt_sink(5, Arc::new(|| {})),
        Err(SinkError::NoSuchDevice(5))
    ));
    assert!(matches!(
        f.set_interrupt_sink_for_irq(99, Arc::new(|| {})),
        Err(SinkError::NoSuchIrq(99))
    ));
}

// ---- ordering and numbering --------------------------------------------------------------

#[test]
fn each_device_fifo_is_served_oldest_first() {
    let (hyp, f, b) = setup(8, None);
    let mut readers = Vec::new();
    for i in 0..4u64 {
        readers.push(spawn_read(&f, WIN0 + 4 * i, 4));
        assert!(wait_until(|| hyp.stats().requests == 2 * i + 1));
        readers.push(spawn_read(&f, WIN1 + 4 * i, 4));
        assert!(wait_until(|| hyp.stats().requests == 2 * i + 2));
    }
    for (dm, base) in [(1, WIN1), (0, WIN0)] {
        for i in 0..4u64 {
            let r = ask(&b, dm);
            assert_eq!((r.status, r.addr), (0, base + 4 * i));
            assert_eq!(
                complete(&b, dm, RemioOp::Read, r.request_id, r.addr).status,
                0
            );
        }
    }
    for h in readers {
        assert!(h.join().unwrap().is_ok());
    }
}

#[test]
fn dm_id_is_the_index_in_the_calling_backend_not_the_bind_key() {
    // Backend VM 2 serves key 9 (dm 0) and key 3 (dm 1); backend VM 3 serves key 5 (dm 0).
    let cfg = config(
        vec![
            VmConfig {
                id: 1,
                remio_devices: vec![fe(3, WIN0, 10), fe(5, WIN1, 11), fe(9, 0x2000_0000, 12)],
            },
            VmConfig {
                id: 2,
                remio_devices: vec![be(9, 20), be(3, 21)],
            },
            VmConfig {
                id: 3,
                remio_devices: vec![be(5, 20)],
            },
        ],
        4,
        None,
    );
    let hyp = Hypervisor::new(cfg).unwrap();
    let f = hyp.frontend(1).unwrap();
    let b2 = hyp.backend(2).unwrap();
    let b3 = hyp.backend(3).unwrap();
    assert_eq!(b2.devices()[0].bind_key, 9);
    assert_eq!(b3.devices()[0].bind_key, 5);

    let reader = spawn_read(&f, WIN1, 4); // key 5
    assert!(wait_until(|| hyp.stats().requests == 1));
    assert_eq!(ask(&b2, 0).status, 1, "backend 2's dm 0 is key 9");
    assert_eq!(ask(&b2, 1).status, 1);
    let r = ask(&b3, 0);
    assert_eq!((r.status, r.addr), (0, WIN1));
    assert_eq!(complete(&b2, 0, RemioOp::Read, r.request_id, 1).status, -3);
    assert_eq!(complete(&b3, 0, RemioOp::Read, r.request_id, 7).status, 0);
    assert_eq!(reader.join().unwrap(), Ok(7));

    let reader = spawn_read(&f, 0x2000_0000, 4); // key 9
    assert!(wait_until(|| hyp.stats().requests == 2));
    let r = ask(&b2, 0);
    assert_eq!((r.status, r.addr), (0, 0x2000_0000));
    assert_eq!(complete(&b2, 0, RemioOp::Read, r.request_id, 8).status, 0);
    assert_eq!(reader.join().unwrap(), Ok(8));
}

// ---- timeout -------------------------------------------------------------------------------

#[test]
fn pending_request_times_out_with_zero_and_leaves_the_fifo() {
    let (hyp, f, b) = setup(1, Some(Duration::from_millis(50)));
    let c = f.access(RemioOp::Read, WIN0, 4, 0).unwrap();
    assert_eq!(
        c,
        Completion {
            value: TIMEOUT_READ_VALUE,
            timed_out: true
        }
    );
    assert_eq!(TIMEOUT_READ_VALUE, 0);
    let s = hyp.stats();
    assert_eq!((s.timeouts, s.timeouts_pending), (1, 1));
    assert_eq!(ask(&b, 0).status, 1, "a timed-out pending request is gone");
    // Its slot is free again: a new access gets it and completes normally.
    let reader = spawn_read(&f, WIN0, 4);
    assert!(wait_until(|| hyp.stats().requests == 2));
    let r = ask(&b, 0);
    assert_eq!(complete(&b, 0, RemioOp::Read, r.request_id, 3).status, 0);
    assert_eq!(reader.join().unwrap(), Ok(3));
}

#[test]
fn late_completion_of_an_abandoned_slot_does_not_complete_a_newer_request() {
    let (hyp, f, b) = setup(1, Some(Duration::from_millis(1000)));
    let first = spawn_read(&f, WIN0, 4);
    assert!(wait_until(|| hyp.stats().requests == 1));
    let old = ask(&b, 0); // PROCESSING; the backend sits on it
    assert_eq!(old.status, 0);
    assert_eq!(first.join().unwrap(), Ok(0), "timed out read returns 0");
    assert_eq!(hyp.stats().timeouts_abandoned, 1);

    // The only slot is still reserved: another device's access waits for it.
    let second = spawn_read(&f, WIN1 + 8, 4);
    assert!(wait_until(|| hyp.stats().slot_waits == 1));
    assert_eq!(ask(&b, 1).status, 1);

    // The late completion succeeds, completes nothing, and frees the slot.
    let late = complete(&b, 0, RemioOp::Read, old.request_id, 0xbad);
    assert_eq!(late.status, 0);
    assert_eq!(hyp.stats().abandoned_completions, 1);
    assert_eq!(hyp.stats().completions, 0);

    assert!(wait_until(|| hyp.stats().requests == 2));
    let new = ask(&b, 1);
    assert_eq!((new.status, new.addr), (0, WIN1 + 8));
    assert_eq!(new.request_id, old.request_id, "same slot reused");
    assert_eq!(
        complete(&b, 1, RemioOp::Read, new.request_id, 0x600d).status,
        0
    );
    assert_eq!(second.join().unwrap(), Ok(0x600d));
    assert_eq!(hyp.stats().timeouts, 1);
}

#[test]
fn abandoned_slot_still_refuses_a_malformed_completion() {
    let (hyp, f, b) = setup(1, Some(Duration::from_millis(30)));
    let first = spawn_read(&f, WIN0, 4);
    assert!(wait_until(|| hyp.stats().requests == 1));
    let old = ask(&b, 0);
    assert_eq!(first.join().unwrap(), Ok(0));
    assert_eq!(
        complete(&b, 0, RemioOp::Write, old.request_id, 0).status,
        -3
    );
    assert_eq!(complete(&b, 1, RemioOp::Read, old.request_id, 0).status, -3);
    assert_eq!(complete(&b, 0, RemioOp::Read, old.request_id, 0).status, 0);
    assert_eq!(hyp.stats().abandoned_completions, 1);
}

#[test]
fn waiting_for_a_slot_is_bounded_by_the_timeout() {
    let (hyp, f, b) = setup(1, Some(Duration::from_millis(50)));
    let first = spawn_read(&f, WIN0, 4);
    assert!(wait_until(|| hyp.stats().requests == 1));
    let held = ask(&b, 0);
    assert_eq!(first.join().unwrap(), Ok(0));
    // Slot 0 is abandoned and reserved: another device's access cannot get a slot.
    let c = f.access(RemioOp::Write, WIN1, 4, 1).unwrap();
    assert!(c.timed_out);
    let s = hyp.stats();
    assert_eq!((s.timeouts, s.timeouts_no_slot, s.requests), (2, 1, 1));
    assert_eq!(
        s.refused_stuck, 0,
        "it waited for a slot, it was not refused"
    );
    assert_eq!(complete(&b, 0, RemioOp::Read, held.request_id, 0).status, 0);
}

#[test]
fn a_backend_holding_an_abandoned_request_keeps_one_slot_and_other_devices_keep_the_rest() {
    // Two slots. Device 0's backend takes every request and answers none (a device model
    // that stopped): its first access is abandoned at the deadline; without a cap each
    // further access would take and keep one more slot, and device 1 would find none.
    let (hyp, f, b) = setup(2, Some(Duration::from_millis(300)));
    let first = spawn_read(&f, WIN0, 4);
    assert!(wait_until(|| hyp.stats().requests == 1));
    let held = ask(&b, 0);
    assert_eq!(held.status, 0);
    assert_eq!(first.join().unwrap(), Ok(0));
    assert_eq!(hyp.stats().timeouts_abandoned, 1);

    for i in 0..3 {
        let access = spawn_read(&f, WIN0 + 4 * i, 4);
        let queued_or_refused = |s: Stats| s.requests > 1 + i || s.refused_stuck > i;
        assert!(wait_until(|| queued_or_refused(hyp.stats())));
        if hyp.stats().requests > 1 + i {
            // Queued after all: the stuck backend takes it, as a stopped DM's socket would.
            ask(&b, 0);
        }
        assert_eq!(
            access.join().unwrap(),
            Ok(0),
            "access {i} to the stuck device"
        );
    }
    let s = hyp.stats();
    assert_eq!((s.refused_stuck, s.timeouts_no_slot, s.requests), (3, 3, 1));

    // Device 1 still gets a slot at once.
    let other = spawn_read(&f, WIN1, 4);
    assert!(wait_until(|| hyp.stats().requests == 2));
    let r = ask(&b, 1);
    assert_eq!(complete(&b, 1, RemioOp::Read, r.request_id, 5).status, 0);
    assert_eq!(other.join().unwrap(), Ok(5));
    assert_eq!(hyp.stats().slot_waits, 0);

    // The late answer lifts the cap: the device is served again.
    assert_eq!(complete(&b, 0, RemioOp::Read, held.request_id, 0).status, 0);
    let again = spawn_read(&f, WIN0, 4);
    assert!(wait_until(|| hyp.stats().requests == 3));
    let r = ask(&b, 0);
    assert_eq!(complete(&b, 0, RemioOp::Read, r.request_id, 9).status, 0);
    assert_eq!(again.join().unwrap(), Ok(9));
}

// ---- slots ---------------------------------------------------------------------------------

#[test]
fn slot_exhaustion_waits_then_proceeds() {
    let (hyp, f, b) = setup(1, None);
    let first = spawn_read(&f, WIN0, 4);
    assert!(wait_until(|| hyp.stats().requests == 1));
    let second = spawn_read(&f, WIN1, 4);
    assert!(wait_until(|| hyp.stats().slot_waits == 1));
    assert_eq!(
        hyp.stats().requests,
        1,
        "the second access is not queued yet"
    );

    let r = ask(&b, 0);
    assert_eq!(complete(&b, 0, RemioOp::Read, r.request_id, 1).status, 0);
    assert_eq!(first.join().unwrap(), Ok(1));

    assert!(wait_until(|| hyp.stats().requests == 2));
    let r = ask(&b, 1);
    assert_eq!((r.status, r.addr), (0, WIN1));
    assert_eq!(complete(&b, 1, RemioOp::Read, r.request_id, 2).status, 0);
    assert_eq!(second.join().unwrap(), Ok(2));
    assert_eq!(hyp.stats().timeouts, 0);
}

// ---- backend interrupts ------------------------------------------------------------------

#[test]
fn latched_irq_is_delivered_on_request_irq() {
    let (hyp, f, b) = setup(1, None);
    let reader = spawn_read(&f, WIN0, 4);
    assert!(wait_until(|| hyp.stats().backend_irqs_latched == 1));
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    b.request_irq(
        20,
        Arc::new(move || {
            let _ = irq::lock(&tx).send(());
        }),
    )
    .unwrap();
    rx.recv_timeout(LONG).unwrap();
    assert!(
        rx.recv_timeout(Duration::from_millis(50)).is_err(),
        "delivered once"
    );
    let r = ask(&b, 0);
    assert_eq!(complete(&b, 0, RemioOp::Read, r.request_id, 4).status, 0);
    assert_eq!(reader.join().unwrap(), Ok(4));
}

#[test]
fn request_irq_refuses_unknown_and_busy_lines() {
    let (_hyp, _f, b) = setup(1, None);
    assert_eq!(
        b.request_irq(10, Arc::new(|| {})),
        Err(remio_abi::IrqError::NoSuchIrq(10))
    );
    b.request_irq(21, Arc::new(|| {})).unwrap();
    assert_eq!(
        b.request_irq(21, Arc::new(|| {})),
        Err(remio_abi::IrqError::Busy(21))
    );
    b.free_irq(21);
    assert!(b.request_irq(21, Arc::new(|| {})).is_ok());
    assert!(matches!(b.irq_eventfd(99), Err(IrqFdError::NoSuchIrq(99))));
}

#[test]
fn free_irq_waits_for_a_running_handler_and_it_never_runs_again() {
    let (hyp, f, b) = setup(2, None);
    let calls = Arc::new(AtomicUsize::new(0));
    let (entered_tx, entered_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (entered_tx, go_rx) = (Mutex::new(entered_tx), Mutex::new(go_rx));
    let c = Arc::clone(&calls);
    b.request_irq(
        20,
        Arc::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
            let _ = irq::lock(&entered_tx).send(());
            let _ = irq::lock(&go_rx).recv();
        }),
    )
    .unwrap();
    let reader = spawn_read(&f, WIN0, 4);
    entered_rx.recv_timeout(LONG).unwrap();

    let freed = Arc::new(AtomicBool::new(false));
    let (b2, fr) = (b.clone(), Arc::clone(&freed));
    let freer = thread::spawn(move || {
        b2.free_irq(20);
        fr.store(true, Ordering::SeqCst);
    });
    // Until free_irq either waits for the handler (the state the line exposes) or returns.
    while b.irq_removers(20) == 0 && !freed.load(Ordering::SeqCst) {
        thread::yield_now();
    }
    assert!(
        !freed.load(Ordering::SeqCst),
        "free_irq returned while the handler ran"
    );
    go_tx.send(()).unwrap();
    freer.join().unwrap();
    assert!(freed.load(Ordering::SeqCst));

    // Another request: the handler is gone, the raise is latched.
    let reader2 = spawn_read(&f, WIN0 + 4, 4);
    assert!(wait_until(|| hyp.stats().backend_irqs_latched == 1));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    for _ in 0..2 {
        let r = ask(&b, 0);
        assert_eq!(complete(&b, 0, RemioOp::Read, r.request_id, 0).status, 0);
    }
    assert_eq!(reader.join().unwrap(), Ok(0));
    assert_eq!(reader2.join().unwrap(), Ok(0));
}

#[test]
fn backend_irq_eventfd_is_signalled_per_request() {
    let (hyp, f, b) = setup(2, None);
    let efd = b.irq_eventfd(21).unwrap();
    let reader = spawn_read(&f, WIN1, 4);
    assert!(wait_until(|| efd.read().is_ok()));
    assert_eq!(hyp.stats().backend_irqs_latched, 0);
    let r = ask(&b, 1);
    assert_eq!(complete(&b, 1, RemioOp::Read, r.request_id, 6).status, 0);
    assert_eq!(reader.join().unwrap(), Ok(6));
}

/// An inline dispatcher: the handler drains the FIFO with ASK and completes each request.
fn install_echo_dispatcher(
    b: &BackendVm,
    dm_id: u64,
    irq: u32,
) -> Arc<Mutex<Vec<thread::ThreadId>>> {
    let threads = Arc::new(Mutex::new(Vec::new()));
    let (b2, t) = (b.clone(), Arc::clone(&threads));
    b.request_irq(
        irq,
        Arc::new(move || {
            irq::lock(&t).push(thread::current().id());
            loop {
                let r = ask(&b2, dm_id);
                if r.status != 0 {
                    break;
                }
                let op = RemioOp::from_raw(r.op).unwrap_or(RemioOp::Read);
                // Reads return the address; writes are acknowledged.
                let _ = complete(&b2, dm_id, op, r.request_id, r.addr ^ r.value);
            }
        }),
    )
    .unwrap();
    threads
}

#[test]
fn handler_runs_on_the_trapping_thread_and_completes_inline() {
    let (hyp, f, b) = setup(1, None);
    let threads = install_echo_dispatcher(&b, 0, 20);
    assert_eq!(f.read(WIN0 + 0x10, 4), Ok(WIN0 + 0x10));
    assert_eq!(irq::lock(&threads).as_slice(), [thread::current().id()]);
    assert_eq!(hyp.stats().completions, 1);
}

#[test]
fn many_threads_on_two_devices_all_complete_exactly_once() {
    let (hyp, f, b) = setup(3, None);
    install_echo_dispatcher(&b, 0, 20);
    install_echo_dispatcher(&b, 1, 21);
    let workers: Vec<_> = (0..6u64)
        .map(|t| {
            let f = f.clone();
            thread::spawn(move || {
                for i in 0..200u64 {
                    let base = if (t + i) % 2 == 0 { WIN0 } else { WIN1 };
                    let addr = base + (i % 0x80) * 4;
                    assert_eq!(f.read(addr, 4), Ok(addr));
                    f.write(addr, 4, i).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let s = hyp.stats();
    assert_eq!(s.requests, 6 * 400);
    assert_eq!(s.completions, 6 * 400);
    assert_eq!(s.timeouts, 0);
    assert_eq!((s.reads, s.writes), (1200, 1200));
}

#[test]
fn timeouts_racing_completions_account_for_every_request_exactly_once() {
    let (hyp, f, b) = setup(2, Some(Duration::from_millis(2)));
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicUsize::new(0));
    let backend = {
        let (b, stop, refused) = (b.clone(), Arc::clone(&stop), Arc::clone(&refused));
        thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                for dm in 0..2 {
                    let r = ask(&b, dm);
                    if r.status != 0 {
                        continue;
                    }
                    n += 1;
                    // Vary the service time around the timeout.
                    thread::sleep(Duration::from_micros((n % 7) * 700));
                    let op = RemioOp::from_raw(r.op).unwrap_or(RemioOp::Read);
                    if complete(&b, dm, op, r.request_id, r.addr).status != 0 {
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                }
                thread::yield_now();
            }
        })
    };
    let workers: Vec<_> = (0..4u64)
        .map(|t| {
            let f = f.clone();
            thread::spawn(move || {
                for i in 0..100u64 {
                    let addr = if t % 2 == 0 { WIN0 } else { WIN1 } + (i % 16) * 4;
                    let c = f.access(RemioOp::Read, addr, 4, 0).unwrap();
                    let expected = if c.timed_out { 0 } else { addr };
                    assert_eq!(c.value, expected, "a read got another request's value");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    // Let the backend finish what it holds, then check the books.
    assert!(wait_until(|| {
        let s = hyp.stats();
        s.abandoned_completions == s.timeouts_abandoned
    }));
    stop.store(true, Ordering::SeqCst);
    backend.join().unwrap();

    let s = hyp.stats();
    assert_eq!(
        refused.load(Ordering::SeqCst),
        0,
        "a completion of an asked request was refused"
    );
    assert_eq!(s.requests + s.timeouts_no_slot, 400);
    assert_eq!(
        s.completions + s.timeouts_pending + s.timeouts_abandoned,
        s.requests
    );
    assert_eq!(
        s.timeouts,
        s.timeouts_pending + s.timeouts_abandoned + s.timeouts_no_slot
    );
    // No slot leaked: with an inline backend, both slots serve accesses again.
    install_echo_dispatcher(&b, 0, 20);
    for i in 0..4 {
        assert_eq!(f.read(WIN0 + 4 * i, 4), Ok(WIN0 + 4 * i));
    }
}

#[test]
fn a_wait_helper_runs_on_the_stalled_thread_and_may_complete_the_request_itself() {
    let (hyp, f, b) = setup(4, Some(LONG));
    let calls = Arc::new(AtomicUsize::new(0));
    let on = Arc::new(Mutex::new(None));
    let (b2, calls2, on2) = (b.clone(), calls.clone(), on.clone());
    b.set_wait_helper(
        0,
        Some(Arc::new(move |w: &SlotWaiter<'_>| {
            calls2.fetch_add(1, Ordering::SeqCst);
            *on2.lock().unwrap() = Some(thread::current().id());
            assert!(!w.is_complete());
            assert!(w.deadline().is_some());
            let r = ask(&b2, 0);
            assert_eq!(r.status, 0);
            assert_eq!(
                complete(&b2, 0, RemioOp::Read, r.request_id, 0x55).status,
                0
            );
            assert!(w.is_complete());
        })),
    )
    .unwrap();
    assert_eq!(f.read(WIN0, 4).unwrap(), 0x55);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(*on.lock().unwrap(), Some(thread::current().id()));
    assert_eq!(hyp.stats().completions, 1);
}

#[test]
fn a_wait_helper_is_not_run_when_the_interrupt_handler_completed_the_request_inline() {
    let (_hyp, f, b) = setup(4, Some(LONG));
    let calls = Arc::new(AtomicUsize::new(0));
    let calls2 = calls.clone();
    b.set_wait_helper(
        0,
        Some(Arc::new(move |_: &SlotWaiter<'_>| {
            calls2.fetch_add(1, Ordering::SeqCst);
        })),
    )
    .unwrap();
    let b2 = b.clone();
    b.request_irq(
        20,
        Arc::new(move || {
            let r = ask(&b2, 0);
            if r.status == 0 {
                complete(&b2, 0, RemioOp::Write, r.request_id, 0);
            }
        }),
    )
    .unwrap();
    f.write(WIN0, 4, 1).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[test]
fn an_access_whose_wait_helper_returns_early_still_waits_for_its_completion() {
    let (_hyp, f, b) = setup(4, Some(LONG));
    let calls = Arc::new(AtomicUsize::new(0));
    let calls2 = calls.clone();
    b.set_wait_helper(
        0,
        Some(Arc::new(move |_: &SlotWaiter<'_>| {
            calls2.fetch_add(1, Ordering::SeqCst);
        })),
    )
    .unwrap();
    let reader = spawn_read(&f, WIN0, 4);
    assert!(wait_until(|| calls.load(Ordering::SeqCst) == 1));
    let r = ask(&b, 0);
    assert_eq!(complete(&b, 0, RemioOp::Read, r.request_id, 0x77).status, 0);
    assert_eq!(reader.join().unwrap(), Ok(0x77));
}

#[test]
fn the_timeout_bounds_an_access_whose_wait_helper_returns_early() {
    let (hyp, f, b) = setup(4, Some(Duration::from_millis(30)));
    b.set_wait_helper(0, Some(Arc::new(|_: &SlotWaiter<'_>| {})))
        .unwrap();
    let c = f.access(RemioOp::Read, WIN0, 4, 0).unwrap();
    assert!(c.timed_out);
    assert_eq!(hyp.stats().timeouts_pending, 1);
}

#[test]
fn a_removed_wait_helper_is_not_run_and_unknown_devices_are_refused() {
    let (_hyp, f, b) = setup(4, Some(LONG));
    let calls = Arc::new(AtomicUsize::new(0));
    let calls2 = calls.clone();
    b.set_wait_helper(
        1,
        Some(Arc::new(move |_: &SlotWaiter<'_>| {
            calls2.fetch_add(1, Ordering::SeqCst);
        })),
    )
    .unwrap();
    b.set_wait_helper(1, None).unwrap();
    let reader = spawn_read(&f, WIN1, 4);
    let r = loop {
        let r = ask(&b, 1);
        if r.status == 0 {
            break r;
        }
        thread::sleep(Duration::from_millis(1));
    };
    complete(&b, 1, RemioOp::Read, r.request_id, 9);
    assert_eq!(reader.join().unwrap(), Ok(9));
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(
        b.set_wait_helper(2, None),
        Err(WaitHelperError::NoSuchDevice(2))
    );
}

// ---- per-device counters -----------------------------------------------------------------

#[test]
fn device_stats_count_each_pairs_accesses_waiting_requests_and_latency() {
    let (hyp, f, b) = setup(4, Some(Duration::from_secs(1)));
    // Device 1 (dm 1): one access held by the backend while the counters are read.
    let held = spawn_read(&f, WIN1, 4);
    assert!(wait_until(|| hyp.stats().requests == 1));
    let r1 = ask(&b, 1);
    // Device 0 (dm 0): two completed accesses, one still pending when read.
    for v in [5, 6] {
        let reader = spawn_read(&f, WIN0, 4);
        assert!(wait_until(|| hyp.device_stats()[0].pending == 1));
        let r = ask(&b, 0);
        thread::sleep(Duration::from_millis(2));
        assert_eq!(complete(&b, 0, RemioOp::Read, r.request_id, v).status, 0);
        assert_eq!(reader.join().unwrap(), Ok(v));
    }
    let pending = spawn_read(&f, WIN0, 4);
    assert!(wait_until(|| hyp.device_stats()[0].pending == 1));

    let s = hyp.device_stats();

    assert_eq!((s[0].bind_key, s[0].backend_vm, s[0].dm_id), (1, 2, 0));
    assert_eq!((s[0].requests, s[0].completions, s[0].waiting), (3, 2, 1));
    assert_eq!(s[0].latency.count, 2);
    assert!(s[0].latency.max >= 2_000_000, "{:?}", s[0].latency.max);
    assert!(s[0].latency.percentile(50.0) <= s[0].latency.max);
    assert_eq!((s[1].bind_key, s[1].dm_id), (2, 1));
    assert_eq!((s[1].requests, s[1].pending, s[1].waiting), (1, 0, 1));
    assert_eq!(s[1].latency.count, 0);

    // The pending access times out: counted on its own pair, with its latency.
    assert_eq!(pending.join().unwrap(), Ok(0));
    assert_eq!(complete(&b, 1, RemioOp::Read, r1.request_id, 1).status, 0);
    let _ = held.join().unwrap();
    assert_eq!(call(&b, 1, RemioOp::Notify as u64, 0, 0, 0).status, 0);
    let s = hyp.device_stats();
    assert_eq!((s[0].timeouts, s[0].waiting, s[0].latency.count), (1, 0, 3));
    assert!(s[0].latency.max >= 1_000_000_000);
    assert_eq!((s[1].notifies, s[0].notifies), (1, 0));
}
