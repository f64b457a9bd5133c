//! Loom models of the request lifecycle, run over the dispatcher's real core: the router
//! (ranges, control client, held queue), the request queues and the dispatch gate, with
//! loom's primitives swapped in by [`crate::sync`]. The hypervisor side is a minimal FIFO of
//! request ids and a completion counter per request.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p remio-dispatcher --release --lib loom`.
//!
//! Modelled: ASK (pop the FIFO), route, ATTACH (a device-model thread), COMPLETE, control
//! client install/removal and DM destruction (router close with orphan completion). Not
//! modelled: the hypercall transport, ioeventfds, irqfds and I/O client threads (they use
//! the same queue, modelled here) and the interrupt controller.

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;
use std::sync::Arc;

use remio_abi::VirtioRequest;

use crate::gate::Gate;
use crate::queue::RequestQueue;
use crate::router::{Routed, Router};
use crate::sync::{lock, Mutex};

const N: usize = 2;

struct Hyp {
    fifo: Mutex<Vec<u64>>,
    completed: [AtomicUsize; N],
}

impl Hyp {
    fn new() -> Self {
        Self {
            fifo: Mutex::new((0..N as u64).rev().collect()),
            completed: [AtomicUsize::new(0), AtomicUsize::new(0)],
        }
    }

    fn ask(&self) -> Option<VirtioRequest> {
        lock(&self.fifo).pop().map(|id| VirtioRequest {
            addr: 0x50,
            access_width: 4,
            request_id: id,
            ..VirtioRequest::default()
        })
    }

    fn complete(&self, req: &VirtioRequest) {
        let i = usize::try_from(req.request_id).expect("small id");
        self.completed[i].fetch_add(1, Ordering::SeqCst);
    }

    fn assert_each_completed_once(&self) {
        for (i, c) in self.completed.iter().enumerate() {
            assert_eq!(c.load(Ordering::SeqCst), 1, "request {i}");
        }
    }
}

/// The dispatcher's ASK loop and routing, as `Dm::dispatch_pass` and `Dm::route` do it.
fn dispatch(hyp: &Hyp, router: &Router, gate: &Gate) {
    let Some(_pass) = gate.enter() else { return };
    while let Some(req) = hyp.ask() {
        match router.route(req) {
            Routed::Overflow(r) | Routed::Closed(r) => hyp.complete(&r),
            Routed::IoClient | Routed::Control | Routed::Held => {}
        }
    }
}

fn builder() -> loom::model::Builder {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b
}

#[test]
fn loom_requests_complete_once_across_attach_and_destroy() {
    builder().check(|| {
        let hyp = Arc::new(Hyp::new());
        let router = Arc::new(Router::new(N));
        let gate = Arc::new(Gate::default());

        // The device model: creates the control client, attaches and completes until told
        // the DM is going away.
        let dm_thread = {
            let (hyp, router) = (hyp.clone(), router.clone());
            thread::spawn(move || {
                let q = Arc::new(RequestQueue::new(N));
                let q2 = q.clone();
                if router.install_control(q2).is_err() {
                    return;
                }
                while let Some(req) = q.pop_wait() {
                    hyp.complete(&req);
                }
            })
        };
        // The interrupt: dispatch inline.
        let irq_thread = {
            let (hyp, router, gate) = (hyp.clone(), router.clone(), gate.clone());
            thread::spawn(move || dispatch(&hyp, &router, &gate))
        };

        irq_thread.join().expect("irq thread");
        // Destroy: stop dispatching, close routing, complete what nobody will.
        gate.pause();
        let closed = router.close();
        for r in &closed.orphans {
            hyp.complete(r);
        }
        dm_thread.join().expect("device model thread");
        hyp.assert_each_completed_once();
    });
}

#[test]
fn loom_control_client_removal_loses_no_request() {
    builder().check(|| {
        let hyp = Arc::new(Hyp::new());
        let router = Arc::new(Router::new(N));
        let gate = Arc::new(Gate::default());
        let q = Arc::new(RequestQueue::new(N));
        router
            .install_control(q.clone())
            .expect("first control client");

        let irq_thread = {
            let (hyp, router, gate) = (hyp.clone(), router.clone(), gate.clone());
            thread::spawn(move || dispatch(&hyp, &router, &gate))
        };
        let attacher = {
            let (hyp, q) = (hyp.clone(), q.clone());
            thread::spawn(move || {
                while let Some(req) = q.pop_wait() {
                    hyp.complete(&req);
                }
            })
        };
        // The device model goes away: its queued requests return to the DM.
        router.remove_control();
        attacher.join().expect("attacher");
        irq_thread.join().expect("irq thread");
        // A new device model picks up what was held.
        let q2 = Arc::new(RequestQueue::new(N));
        router
            .install_control(q2.clone())
            .expect("second control client");
        while let Some(req) = q2.try_pop() {
            hyp.complete(&req);
        }
        hyp.assert_each_completed_once();
    });
}

#[test]
fn loom_each_request_reaches_exactly_one_attacher() {
    builder().check(|| {
        let hyp = Arc::new(Hyp::new());
        let q = Arc::new(RequestQueue::new(N));
        let attachers: Vec<_> = (0..2)
            .map(|_| {
                let (hyp, q) = (hyp.clone(), q.clone());
                thread::spawn(move || {
                    while let Some(req) = q.pop_wait() {
                        hyp.complete(&req);
                    }
                })
            })
            .collect();
        while let Some(req) = hyp.ask() {
            q.push(req).expect("room");
        }
        q.close();
        for a in attachers {
            a.join().expect("attacher");
        }
        hyp.assert_each_completed_once();
    });
}

#[test]
fn loom_pause_returns_only_when_no_pass_runs() {
    loom::model(|| {
        let gate = Arc::new(Gate::default());
        let running = Arc::new(AtomicUsize::new(0));
        let t = {
            let (gate, running) = (gate.clone(), running.clone());
            thread::spawn(move || {
                if let Some(pass) = gate.enter() {
                    running.fetch_add(1, Ordering::SeqCst);
                    running.fetch_sub(1, Ordering::SeqCst);
                    drop(pass);
                }
            })
        };
        gate.pause();
        assert_eq!(running.load(Ordering::SeqCst), 0);
        assert!(gate.enter().is_none());
        t.join().expect("pass thread");
    });
}
