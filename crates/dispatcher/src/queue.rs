//! A client's request queue: a bounded ring, a closed flag, a condition variable that wakes
//! exactly one waiter per request, and an optional notifier called with no lock held whenever a
//! request is queued.
//!
//! The ring starts at [`INITIAL_RING`] entries and doubles when a deeper queue is first seen,
//! up to the capacity: at most a handful of reallocations in a queue's life, none in the steady
//! state. It used to reserve its whole capacity (1024 requests, 48 KiB) up front, once per
//! control client, i.e. once per device-model session; under session churn (`remio soak`) that
//! allocation, made on one thread and freed on another, made the platform's resident memory
//! grow by about 0.5 KiB per session ended, while a queue rarely holds more requests than there
//! are vCPUs.

use std::collections::VecDeque;
use std::sync::Arc;

use remio_abi::VirtioRequest;

use crate::sync::{lock, read, wait, write, Condvar, Mutex, RwLock};

/// A callback run (with no dispatcher lock held, on the dispatching thread) each time a
/// request is queued to a control client. It must be quick and must not call the DM's
/// lifecycle operations (`pause`, `resume`, destroy): it runs in the equivalent of the
/// driver's interrupt path.
pub type Notifier = Arc<dyn Fn() + Send + Sync>;

/// Entries the ring holds before it first grows (a stalled vCPU has one request outstanding,
/// so a queue deeper than the vCPUs of a frontend is rare).
pub(crate) const INITIAL_RING: usize = 16;

/// Why a push did not queue the request; the request is handed back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PushError {
    /// The ring holds `capacity` requests already.
    Full(VirtioRequest),
    /// The queue was closed (its client is being destroyed): route the request again.
    Closed(VirtioRequest),
}

#[derive(Debug)]
struct QueueState {
    /// Never holds more than the capacity given to [`RequestQueue::new`].
    ring: VecDeque<VirtioRequest>,
    capacity: usize,
    closed: bool,
    /// Threads blocked in [`RequestQueue::pop_wait`]. A push signals `ready` only when some
    /// thread waits: a futex wake with no sleeper is a wasted system call on every request.
    waiters: usize,
}

/// One client's queue.
pub(crate) struct RequestQueue {
    /// Lock order: last (a leaf). Taken after `Router::table` and `Router::held`.
    state: Mutex<QueueState>,
    /// Signalled once per queued request (`notify_one`) and on close (`notify_all`).
    ready: Condvar,
    /// Leaf; read on every push, written by `set_notifier`.
    notifier: RwLock<Option<Notifier>>,
}

impl std::fmt::Debug for RequestQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = lock(&self.state);
        f.debug_struct("RequestQueue")
            .field("len", &s.ring.len())
            .field("capacity", &s.capacity)
            .field("closed", &s.closed)
            .finish()
    }
}

impl RequestQueue {
    /// A queue holding at most `capacity` requests; the ring starts at [`INITIAL_RING`].
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(QueueState {
                ring: VecDeque::with_capacity(capacity.min(INITIAL_RING)),
                capacity,
                closed: false,
                waiters: 0,
            }),
            ready: Condvar::new(),
            notifier: RwLock::new(None),
        }
    }

    /// Queues `req`, wakes one waiter, then runs the notifier with no lock held.
    pub(crate) fn push(&self, req: VirtioRequest) -> Result<(), PushError> {
        if self.enqueue(req)? {
            self.ready.notify_one();
        }
        self.notify();
        Ok(())
    }

    /// Queues `req` without waking anyone (used while the queue is not yet visible).
    pub(crate) fn push_quiet(&self, req: VirtioRequest) -> Result<(), PushError> {
        self.enqueue(req).map(|_| ())
    }

    /// Queues `req`; returns whether a thread waits in `pop_wait` (read under the lock, so a
    /// waiter that counted itself before this push is woken by the caller's notify).
    fn enqueue(&self, req: VirtioRequest) -> Result<bool, PushError> {
        let mut s = lock(&self.state);
        if s.closed {
            return Err(PushError::Closed(req));
        }
        if s.ring.len() >= s.capacity {
            return Err(PushError::Full(req));
        }
        s.ring.push_back(req);
        Ok(s.waiters > 0)
    }

    fn notify(&self) {
        let n = read(&self.notifier).clone();
        if let Some(n) = n {
            n();
        }
    }

    /// Blocks until a request is queued (and returns it) or the queue is closed and empty
    /// (`None`). Requests queued before the close are still returned.
    pub(crate) fn pop_wait(&self) -> Option<VirtioRequest> {
        let mut s = lock(&self.state);
        loop {
            if let Some(r) = s.ring.pop_front() {
                return Some(r);
            }
            if s.closed {
                return None;
            }
            s.waiters += 1;
            s = wait(&self.ready, s);
            s.waiters -= 1;
        }
    }

    /// Threads blocked in [`RequestQueue::pop_wait`].
    pub(crate) fn waiters(&self) -> usize {
        lock(&self.state).waiters
    }

    /// Pops a request if one is queued.
    pub(crate) fn try_pop(&self) -> Option<VirtioRequest> {
        lock(&self.state).ring.pop_front()
    }

    /// Closes the queue: pushes fail with [`PushError::Closed`] from now on and every waiter
    /// wakes. Queued requests stay (an I/O client's thread drains them).
    pub(crate) fn close(&self) {
        lock(&self.state).closed = true;
        self.ready.notify_all();
    }

    /// Closes the queue and hands every queued request to `f` (under the queue lock: `f`
    /// must not touch this queue).
    pub(crate) fn close_and_drain(&self, mut f: impl FnMut(VirtioRequest)) {
        {
            let mut s = lock(&self.state);
            s.closed = true;
            while let Some(r) = s.ring.pop_front() {
                f(r);
            }
        }
        self.ready.notify_all();
    }

    /// Whether [`RequestQueue::close`] ran.
    pub(crate) fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    /// Requests queued now.
    pub(crate) fn len(&self) -> usize {
        lock(&self.state).ring.len()
    }

    /// Replaces the notifier; a new notifier runs once at once if requests are already
    /// queued, so none is missed.
    pub(crate) fn set_notifier(&self, n: Option<Notifier>) {
        let has = n.is_some();
        *write(&self.notifier) = n;
        if has && self.len() > 0 {
            self.notify();
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn req(id: u64) -> VirtioRequest {
        VirtioRequest {
            request_id: id,
            ..VirtioRequest::default()
        }
    }

    #[test]
    fn push_beyond_capacity_is_refused_with_the_request() {
        let q = RequestQueue::new(2);
        assert_eq!(q.push(req(1)), Ok(()));
        assert_eq!(q.push(req(2)), Ok(()));
        assert_eq!(q.push(req(3)), Err(PushError::Full(req(3))));
        assert_eq!(q.try_pop(), Some(req(1)));
    }

    #[test]
    fn a_new_queue_reserves_a_small_ring_and_still_holds_its_capacity() {
        let q = RequestQueue::new(1024);
        assert!(
            lock(&q.state).ring.capacity() < 1024 / 2,
            "reserved up front"
        );
        for id in 0..1024 {
            assert_eq!(q.push(req(id)), Ok(()));
        }
        assert_eq!(q.push(req(1024)), Err(PushError::Full(req(1024))));
        assert_eq!(q.try_pop(), Some(req(0)));
    }

    #[test]
    fn close_refuses_pushes_but_keeps_queued_requests_for_pop_wait() {
        let q = RequestQueue::new(4);
        q.push(req(1)).unwrap();
        q.close();
        assert_eq!(q.push(req(2)), Err(PushError::Closed(req(2))));
        assert_eq!(q.pop_wait(), Some(req(1)));
        assert_eq!(q.pop_wait(), None);
    }

    #[test]
    fn notifier_runs_per_push_and_once_on_install_when_requests_wait() {
        let q = RequestQueue::new(4);
        q.push(req(1)).unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        q.set_notifier(Some(Arc::new(move || {
            h.fetch_add(1, Ordering::SeqCst);
        })));
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        q.push(req(2)).unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn close_wakes_a_blocked_waiter() {
        let q = Arc::new(RequestQueue::new(4));
        let q2 = q.clone();
        let t = std::thread::spawn(move || q2.pop_wait());
        std::thread::sleep(std::time::Duration::from_millis(20));
        q.close();
        assert_eq!(t.join().unwrap(), None);
    }
}
