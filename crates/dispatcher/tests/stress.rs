//! Concurrency stress over the real hypervisor model: frontend vCPU threads hammer 16 DMs with
//! a random mix of control-client and ioeventfd traffic while DMs, control clients and I/O
//! clients are destroyed and re-created and DMs paused and resumed. Every access must end
//! (watchdog), none with a wrong value, and the hypervisor must see every request completed
//! exactly once: no refused (double or bogus) completion, and requests = completions +
//! timeouts. Runs a few seconds; set `REMIO_STRESS_SECS` for longer.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{mmio, platform, Platform, FRONTEND_VM};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use remio_abi::uapi::BAO_IO_READ;
use remio_abi::VirtioRequest;
use remio_dispatcher::{Dm, IoClient, IoeventfdConfig};
use remio_frontend::inprocess::InProcessFrontend;
use remio_hyp::RemioOp;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const DMS: u32 = 16;
const VCPUS: usize = 8;
const QUEUE_NOTIFY: u64 = 0x50;
const CTRL_REGS: u64 = 0x100;
const IO_RANGE: (u64, u64) = (0x180, 0x1c0);

fn control_value(i: u32, addr: u64) -> u64 {
    0x8000_0000_0000_0000 | (u64::from(i) << 40) | (addr & 0xffff)
}

fn io_value(i: u32, addr: u64) -> u64 {
    0x4000_0000_0000_0000 | (u64::from(i) << 40) | (addr & 0xffff)
}

#[derive(Default)]
struct Counters {
    accesses: AtomicU64,
    zero_reads: AtomicU64,
    timed_out: AtomicU64,
    wrong_values: AtomicU64,
    access_errors: AtomicU64,
    notify_writes: AtomicU64,
    complete_errors: AtomicU64,
    served: AtomicU64,
}

/// One DM's live parts, owned by the chaos thread.
struct Live {
    dm: Arc<Dm>,
    server: Option<JoinHandle<()>>,
    client: Option<Arc<IoClient>>,
    paused: bool,
}

fn serve(i: u32, dm: &Arc<Dm>, counters: &Arc<Counters>) -> Option<JoinHandle<()>> {
    let control = dm.create_control_client().ok()?;
    let (dm, counters) = (dm.clone(), counters.clone());
    Some(std::thread::spawn(move || {
        while let Ok(mut req) = control.attach() {
            if req.op == BAO_IO_READ {
                req.value = control_value(i, req.addr);
            }
            counters.served.fetch_add(1, Ordering::Relaxed);
            if dm.complete(&req).is_err() {
                counters.complete_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }))
}

fn bring_up(
    p: &Platform,
    i: u32,
    kicks: &[Arc<EventFd>; 2],
    counters: &Arc<Counters>,
    all: &Mutex<Vec<Arc<Dm>>>,
) -> Live {
    let dm = p.create_dm(i);
    all.lock().unwrap().push(dm.clone());
    for (q, fd) in kicks.iter().enumerate() {
        dm.ioeventfd(IoeventfdConfig {
            fd: fd.clone(),
            addr: mmio(i) + QUEUE_NOTIFY,
            len: 4,
            datamatch: Some(q as u64),
            deassign: false,
        })
        .unwrap();
    }
    let server = serve(i, &dm, counters);
    Live {
        dm,
        server,
        client: None,
        paused: false,
    }
}

fn tear_down(p: &Platform, i: u32, live: Live) {
    p.disp.destroy_dm(i).unwrap();
    if let Some(s) = live.server {
        s.join().unwrap();
    }
    if let Some(c) = live.client {
        assert!(c.is_destroyed());
    }
}

fn vcpu(fe: &InProcessFrontend, seed: u64, deadline: Instant, counters: &Counters) {
    let mut rng = StdRng::seed_from_u64(seed);
    while Instant::now() < deadline {
        let i = rng.gen_range(0..DMS);
        let base = mmio(i);
        counters.accesses.fetch_add(1, Ordering::Relaxed);
        let kind = rng.gen_range(0..10);
        let (op, addr, width, value) = if kind < 5 {
            let width = [1u8, 2, 4, 8][rng.gen_range(0..4)];
            let off = if rng.gen_bool(0.3) {
                rng.gen_range(IO_RANGE.0 / 8..IO_RANGE.1 / 8) * 8
            } else {
                CTRL_REGS + rng.gen_range(0..8) * 8
            };
            (RemioOp::Read, base + off, width, 0)
        } else if kind < 7 {
            (
                RemioOp::Write,
                base + CTRL_REGS + rng.gen_range(0..8) * 8,
                4,
                rng.gen(),
            )
        } else {
            counters.notify_writes.fetch_add(1, Ordering::Relaxed);
            (RemioOp::Write, base + QUEUE_NOTIFY, 4, rng.gen_range(0..3))
        };
        let c = match fe.access(op, addr, width, value) {
            Ok(c) => c,
            Err(_) => {
                counters.access_errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        if c.timed_out {
            counters.timed_out.fetch_add(1, Ordering::Relaxed);
        }
        if op == RemioOp::Read {
            let off = addr - base;
            let in_io = (IO_RANGE.0..IO_RANGE.1).contains(&off);
            if c.value == 0 {
                counters.zero_reads.fetch_add(1, Ordering::Relaxed);
            } else if c.value != control_value(i, addr) && !(in_io && c.value == io_value(i, addr))
            {
                counters.wrong_values.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[test]
fn stress_every_request_completes_exactly_once_under_churn() {
    let secs: u64 = std::env::var("REMIO_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let p = Arc::new(platform(DMS, VCPUS, Some(Duration::from_millis(300))));
    let counters = Arc::new(Counters::default());
    let all = Arc::new(Mutex::new(Vec::new()));
    let kicks: Vec<[Arc<EventFd>; 2]> = (0..DMS)
        .map(|_| {
            [
                Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
                Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            ]
        })
        .collect();

    // Watchdog: a hang anywhere fails the test instead of blocking CI.
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let limit = Duration::from_secs(secs + 60);
    std::thread::spawn(move || {
        if done_rx.recv_timeout(limit) == Err(mpsc::RecvTimeoutError::Timeout) {
            eprintln!("stress: watchdog fired after {limit:?}: a thread hangs");
            std::process::abort();
        }
    });

    let mut lives: Vec<Option<Live>> = (0..DMS)
        .map(|i| Some(bring_up(&p, i, &kicks[i as usize], &counters, &all)))
        .collect();
    let fe = Arc::new(InProcessFrontend::new(&p.hyp, FRONTEND_VM).unwrap());
    let deadline = Instant::now() + Duration::from_secs(secs);
    let vcpus: Vec<_> = (0..VCPUS)
        .map(|n| {
            let (fe, counters) = (fe.clone(), counters.clone());
            std::thread::spawn(move || vcpu(&fe, 0x5eed + n as u64, deadline, &counters))
        })
        .collect();

    // Chaos, on this thread.
    let stop = AtomicBool::new(false);
    let mut rng = StdRng::seed_from_u64(42);
    let mut churn = 0u64;
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(rng.gen_range(1..10)));
        let i = rng.gen_range(0..DMS);
        let slot = &mut lives[i as usize];
        churn += 1;
        match (rng.gen_range(0..5), slot.take()) {
            (_, None) => *slot = Some(bring_up(&p, i, &kicks[i as usize], &counters, &all)),
            (0, Some(live)) => tear_down(&p, i, live),
            (1, Some(mut live)) => {
                match live.client.take() {
                    Some(c) => c.destroy().unwrap(),
                    None => {
                        let c = live
                            .dm
                            .create_client("io", move |r: &VirtioRequest| io_value(i, r.addr))
                            .unwrap();
                        c.add_range(mmio(i) + IO_RANGE.0, mmio(i) + IO_RANGE.1)
                            .unwrap();
                        live.client = Some(c);
                    }
                }
                *slot = Some(live);
            }
            (2, Some(mut live)) => {
                live.dm.destroy_control_client().ok();
                if let Some(s) = live.server.take() {
                    s.join().unwrap();
                }
                live.server = serve(i, &live.dm, &counters);
                *slot = Some(live);
            }
            (_, Some(mut live)) => {
                if live.paused {
                    live.dm.resume().unwrap();
                } else {
                    live.dm.pause().unwrap();
                }
                live.paused = !live.paused;
                *slot = Some(live);
            }
        }
    }
    for v in vcpus {
        v.join().unwrap();
    }
    for (i, live) in (0..DMS).zip(lives) {
        if let Some(live) = live {
            tear_down(&p, i, live);
        }
    }
    done_tx.send(()).unwrap();

    let c = &counters;
    let s = p.hyp.stats();
    let signalled: u64 = kicks.iter().flatten().map(|k| k.read().unwrap_or(0)).sum();
    let dm_errors: u64 = all
        .lock()
        .unwrap()
        .iter()
        .map(|d| d.stats().hypercall_errors)
        .sum();
    eprintln!(
        "stress: {secs}s, {} accesses, {} served by device models, {} zero reads, {} timed out, \
         {} notify writes, {} ioeventfd signals, {churn} churn steps; hyp {s:?}",
        c.accesses.load(Ordering::Relaxed),
        c.served.load(Ordering::Relaxed),
        c.zero_reads.load(Ordering::Relaxed),
        c.timed_out.load(Ordering::Relaxed),
        c.notify_writes.load(Ordering::Relaxed),
        signalled,
    );
    assert_eq!(c.access_errors.load(Ordering::Relaxed), 0);
    assert_eq!(
        c.wrong_values.load(Ordering::Relaxed),
        0,
        "a request reached the wrong DM or client"
    );
    assert_eq!(
        c.complete_errors.load(Ordering::Relaxed),
        0,
        "a device-model completion was refused"
    );
    assert_eq!(dm_errors, 0, "a dispatcher completion was refused");
    assert_eq!(
        s.invalid_hypercalls, 0,
        "a completion was refused: double or bogus"
    );
    assert_eq!(
        s.requests,
        s.completions + s.timeouts_pending + s.timeouts_abandoned,
        "every request ends exactly once"
    );
    assert!(s.abandoned_completions <= s.timeouts_abandoned);
    assert!(signalled <= c.notify_writes.load(Ordering::Relaxed));
    assert!(signalled > 0, "the ioeventfd path was exercised");
    assert!(c.served.load(Ordering::Relaxed) > 0);
}
