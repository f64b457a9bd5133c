//! Request routing of one DM: I/O client address ranges in an ordered map, with fallback to
//! the control client, or to the DM's *held* queue while no control client exists (the
//! driver keeps such requests until a control client appears, then drains them to it).
//!
//! This is the modelled core of the loom test (see `loom_tests`); it uses [`crate::sync`].

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use remio_abi::VirtioRequest;

use crate::queue::{PushError, RequestQueue};
use crate::sync::{lock, read, write, Mutex, RwLock};

/// Errors of I/O client range registration ([`crate::IoClient::add_range`],
/// [`crate::IoClient::del_range`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// `end <= start`: the half-open range `[start, end)` is empty or inverted. EINVAL.
    #[error("empty or inverted range [{start:#x}, {end:#x})")]
    Empty {
        /// Requested start.
        start: u64,
        /// Requested end (exclusive).
        end: u64,
    },
    /// The range overlaps one already registered on this DM (by any client). EEXIST.
    #[error("range [{start:#x}, {end:#x}) overlaps a registered range")]
    Overlap {
        /// Requested start.
        start: u64,
        /// Requested end (exclusive).
        end: u64,
    },
    /// No range with exactly these bounds belongs to this client. ENOENT.
    #[error("no range [{start:#x}, {end:#x}) registered by this client")]
    NotFound {
        /// Requested start.
        start: u64,
        /// Requested end (exclusive).
        end: u64,
    },
    /// The client or its DM has been destroyed. ESHUTDOWN.
    #[error("the client or its DM has been destroyed")]
    ShuttingDown,
}

impl RangeError {
    /// The errno of this error.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Empty { .. } => libc::EINVAL,
            Self::Overlap { .. } => libc::EEXIST,
            Self::NotFound { .. } => libc::ENOENT,
            Self::ShuttingDown => libc::ESHUTDOWN,
        }
    }
}

#[derive(Debug)]
struct RangeEntry {
    end: u64,
    owner: u64,
    queue: Arc<RequestQueue>,
}

/// Non-overlapping half-open ranges keyed by start.
#[derive(Debug, Default)]
pub(crate) struct RangeTable {
    ranges: BTreeMap<u64, RangeEntry>,
}

impl RangeTable {
    /// Adds `[start, end)` for `owner`.
    pub(crate) fn insert(
        &mut self,
        start: u64,
        end: u64,
        owner: u64,
        queue: Arc<RequestQueue>,
    ) -> Result<(), RangeError> {
        if end <= start {
            return Err(RangeError::Empty { start, end });
        }
        // Ranges never overlap, so only the last range starting before `end` can overlap.
        if let Some((_, e)) = self.ranges.range(..end).next_back() {
            if e.end > start {
                return Err(RangeError::Overlap { start, end });
            }
        }
        self.ranges.insert(start, RangeEntry { end, owner, queue });
        Ok(())
    }

    /// Removes exactly `[start, end)` if `owner` registered it.
    pub(crate) fn remove(&mut self, start: u64, end: u64, owner: u64) -> Result<(), RangeError> {
        match self.ranges.get(&start) {
            Some(e) if e.end == end && e.owner == owner => {
                self.ranges.remove(&start);
                Ok(())
            }
            _ => Err(RangeError::NotFound { start, end }),
        }
    }

    /// Removes every range of `owner`.
    pub(crate) fn remove_owner(&mut self, owner: u64) {
        self.ranges.retain(|_, e| e.owner != owner);
    }

    /// The queue whose range holds the whole access `[addr, addr + width)`.
    pub(crate) fn find(&self, addr: u64, width: u64) -> Option<&Arc<RequestQueue>> {
        let last = addr.checked_add(width)?;
        let (_, e) = self.ranges.range(..=addr).next_back()?;
        (last <= e.end).then_some(&e.queue)
    }

    /// Number of ranges.
    pub(crate) fn len(&self) -> usize {
        self.ranges.len()
    }
}

#[derive(Debug, Default)]
struct Table {
    ranges: RangeTable,
    control: Option<Arc<RequestQueue>>,
    clients: BTreeMap<u64, Arc<RequestQueue>>,
    closed: bool,
}

/// Where [`Router::route`] put a request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Routed {
    /// Queued to an I/O client.
    IoClient,
    /// Queued to the control client.
    Control,
    /// Kept in the held queue (no control client).
    Held,
    /// The target queue was full: the caller must complete the request itself.
    Overflow(VirtioRequest),
    /// The router is closed (DM destroyed): the caller must complete the request itself.
    Closed(VirtioRequest),
}

/// Errors of [`Router::install_control`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum InstallError {
    /// A control client exists.
    Busy,
    /// The router is closed.
    Closed,
}

/// What [`Router::close`] hands back.
#[derive(Debug, Default)]
pub(crate) struct Closed {
    /// Requests that had no one left to complete them (held, or queued to the control
    /// client): the caller completes them.
    pub(crate) orphans: Vec<VirtioRequest>,
    /// I/O client queues, still open, for the caller to stop.
    pub(crate) clients: Vec<Arc<RequestQueue>>,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Router {
    /// Lock order: after `Dm::io_clients`, before `held` and any queue's lock.
    table: RwLock<Table>,
    /// Lock order: after `table`, before any queue's lock. Pushed to only under `table`'s
    /// read lock while `table.control` is `None`; never grows past `capacity`.
    held: Mutex<VecDeque<VirtioRequest>>,
    capacity: usize,
}

impl Router {
    /// A router whose queues hold `capacity` requests each.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            table: RwLock::new(Table::default()),
            held: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity,
        }
    }

    /// Capacity of each queue.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Routes one request: the I/O client whose range holds the whole access, else the
    /// control client, else the held queue. The push (and so the control client's notifier)
    /// happens after the table lock is released.
    pub(crate) fn route(&self, mut req: VirtioRequest) -> Routed {
        loop {
            let (queue, kind) = {
                let t = read(&self.table);
                if t.closed {
                    return Routed::Closed(req);
                }
                if let Some(q) = t.ranges.find(req.addr, req.access_width) {
                    (q.clone(), Routed::IoClient)
                } else if let Some(q) = &t.control {
                    (q.clone(), Routed::Control)
                } else {
                    let mut held = lock(&self.held);
                    if held.len() >= self.capacity {
                        return Routed::Overflow(req);
                    }
                    held.push_back(req);
                    return Routed::Held;
                }
            };
            match queue.push(req) {
                Ok(()) => return kind,
                Err(PushError::Full(r)) => return Routed::Overflow(r),
                // The client was removed between the lookup and the push; the table no
                // longer names it, so route again.
                Err(PushError::Closed(r)) => req = r,
            }
        }
    }

    /// Installs `queue` as the control client and moves the held requests into it.
    pub(crate) fn install_control(&self, queue: Arc<RequestQueue>) -> Result<(), InstallError> {
        let mut t = write(&self.table);
        if t.closed {
            return Err(InstallError::Closed);
        }
        if t.control.is_some() {
            return Err(InstallError::Busy);
        }
        let mut held = lock(&self.held);
        while let Some(r) = held.pop_front() {
            if let Err(e) = queue.push_quiet(r) {
                // Both rings have the same capacity, so this cannot happen; keep the
                // request rather than lose it.
                let (PushError::Full(r) | PushError::Closed(r)) = e;
                held.push_front(r);
                break;
            }
        }
        t.control = Some(queue);
        Ok(())
    }

    /// Gives back a request a control client received but that its session ended without
    /// completing: to the current control client if one exists, else to the front of the held
    /// queue, so that the next control client receives it before anything that arrived
    /// later. Returns it when it cannot be kept (the router is closed, or the queue is full):
    /// the caller completes it.
    pub(crate) fn requeue(&self, mut req: VirtioRequest) -> Option<VirtioRequest> {
        loop {
            let queue = {
                let t = read(&self.table);
                if t.closed {
                    return Some(req);
                }
                if let Some(q) = &t.control {
                    q.clone()
                } else {
                    let mut held = lock(&self.held);
                    if held.len() >= self.capacity {
                        return Some(req);
                    }
                    held.push_front(req);
                    return None;
                }
            };
            match queue.push(req) {
                Ok(()) => return None,
                Err(PushError::Full(r)) => return Some(r),
                // Removed between the lookup and the push: look again.
                Err(PushError::Closed(r)) => req = r,
            }
        }
    }

    /// Removes the control client: closes its queue and moves its queued requests back to
    /// the held queue (in order, ahead of nothing: held is empty while a control client
    /// exists). Returns the removed queue, or `None` if there was none.
    pub(crate) fn remove_control(&self) -> Option<Arc<RequestQueue>> {
        let mut t = write(&self.table);
        let q = t.control.take()?;
        let mut held = lock(&self.held);
        q.close_and_drain(|r| held.push_back(r));
        Some(q)
    }

    /// The current control client's queue.
    pub(crate) fn control(&self) -> Option<Arc<RequestQueue>> {
        read(&self.table).control.clone()
    }

    /// Registers an I/O client queue; fails once closed.
    pub(crate) fn register_client(&self, id: u64, queue: Arc<RequestQueue>) -> bool {
        let mut t = write(&self.table);
        if t.closed {
            return false;
        }
        t.clients.insert(id, queue);
        true
    }

    /// Unregisters an I/O client and all its ranges.
    pub(crate) fn unregister_client(&self, id: u64) -> Option<Arc<RequestQueue>> {
        let mut t = write(&self.table);
        t.ranges.remove_owner(id);
        t.clients.remove(&id)
    }

    /// Adds a range for a registered client.
    pub(crate) fn add_range(&self, id: u64, start: u64, end: u64) -> Result<(), RangeError> {
        let mut t = write(&self.table);
        let Some(q) = t.clients.get(&id).cloned() else {
            return Err(RangeError::ShuttingDown);
        };
        t.ranges.insert(start, end, id, q)
    }

    /// Removes a range of a registered client.
    pub(crate) fn del_range(&self, id: u64, start: u64, end: u64) -> Result<(), RangeError> {
        let mut t = write(&self.table);
        if !t.clients.contains_key(&id) {
            return Err(RangeError::ShuttingDown);
        }
        t.ranges.remove(start, end, id)
    }

    /// Number of registered ranges.
    pub(crate) fn range_count(&self) -> usize {
        read(&self.table).ranges.len()
    }

    /// Requests in the held queue.
    pub(crate) fn held_len(&self) -> usize {
        lock(&self.held).len()
    }

    /// Takes every held request (for the caller to complete).
    pub(crate) fn take_held(&self) -> Vec<VirtioRequest> {
        let _t = read(&self.table);
        lock(&self.held).drain(..).collect()
    }

    /// Closes the router for good: nothing is routed or installed from now on.
    pub(crate) fn close(&self) -> Closed {
        let mut t = write(&self.table);
        t.closed = true;
        let mut out = Closed::default();
        {
            let mut held = lock(&self.held);
            if let Some(q) = t.control.take() {
                q.close_and_drain(|r| held.push_back(r));
            }
            out.orphans.extend(held.drain(..));
        }
        t.ranges = RangeTable::default();
        out.clients = std::mem::take(&mut t.clients).into_values().collect();
        out
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn access(addr: u64, width: u64, id: u64) -> VirtioRequest {
        VirtioRequest {
            addr,
            access_width: width,
            request_id: id,
            ..VirtioRequest::default()
        }
    }

    #[test]
    fn range_table_rejects_empty_inverted_and_overlapping_ranges() {
        let mut t = RangeTable::default();
        let q = Arc::new(RequestQueue::new(1));
        assert_eq!(
            t.insert(5, 5, 1, q.clone()),
            Err(RangeError::Empty { start: 5, end: 5 })
        );
        assert_eq!(
            t.insert(6, 5, 1, q.clone()),
            Err(RangeError::Empty { start: 6, end: 5 })
        );
        t.insert(0x100, 0x200, 1, q.clone()).unwrap();
        for (s, e) in [
            (0x80, 0x101),
            (0x1ff, 0x300),
            (0x100, 0x200),
            (0x120, 0x130),
            (0, u64::MAX),
        ] {
            assert_eq!(
                t.insert(s, e, 1, q.clone()),
                Err(RangeError::Overlap { start: s, end: e })
            );
        }
        t.insert(0x200, 0x300, 1, q.clone()).unwrap();
        t.insert(0x80, 0x100, 1, q).unwrap();
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn range_lookup_requires_the_whole_access_inside() {
        let mut t = RangeTable::default();
        let q = Arc::new(RequestQueue::new(1));
        t.insert(0x100, 0x200, 1, q).unwrap();
        assert!(t.find(0x100, 4).is_some());
        assert!(t.find(0x1fc, 4).is_some());
        assert!(t.find(0x1fd, 4).is_none());
        assert!(t.find(0xff, 1).is_none());
        assert!(t.find(0x200, 1).is_none());
        assert!(t.find(u64::MAX, 8).is_none());
    }

    #[test]
    fn range_removal_is_exact_and_owner_checked() {
        let mut t = RangeTable::default();
        let q = Arc::new(RequestQueue::new(1));
        t.insert(0x100, 0x200, 1, q).unwrap();
        assert!(matches!(
            t.remove(0x100, 0x1ff, 1),
            Err(RangeError::NotFound { .. })
        ));
        assert!(matches!(
            t.remove(0x100, 0x200, 2),
            Err(RangeError::NotFound { .. })
        ));
        t.remove(0x100, 0x200, 1).unwrap();
        assert!(t.find(0x100, 1).is_none());
    }

    #[test]
    fn requests_without_a_control_client_are_held_then_drained_to_it_in_order() {
        let r = Router::new(4);
        assert_eq!(r.route(access(0x10, 4, 1)), Routed::Held);
        assert_eq!(r.route(access(0x10, 4, 2)), Routed::Held);
        let q = Arc::new(RequestQueue::new(4));
        r.install_control(q.clone()).unwrap();
        assert_eq!(r.held_len(), 0);
        assert_eq!(q.try_pop().map(|r| r.request_id), Some(1));
        assert_eq!(q.try_pop().map(|r| r.request_id), Some(2));
        assert_eq!(r.route(access(0x10, 4, 3)), Routed::Control);
        assert_eq!(
            r.install_control(Arc::new(RequestQueue::new(4))),
            Err(InstallError::Busy)
        );
    }

    #[test]
    fn removing_the_control_client_returns_its_queued_requests_to_held() {
        let r = Router::new(4);
        let q = Arc::new(RequestQueue::new(4));
        r.install_control(q.clone()).unwrap();
        r.route(access(0x10, 4, 7));
        assert!(r.remove_control().is_some());
        assert!(q.is_closed());
        assert_eq!(r.held_len(), 1);
        assert_eq!(r.route(access(0x10, 4, 8)), Routed::Held);
    }

    #[test]
    fn held_overflow_hands_the_request_back() {
        let r = Router::new(1);
        assert_eq!(r.route(access(0, 1, 1)), Routed::Held);
        assert_eq!(r.route(access(0, 1, 2)), Routed::Overflow(access(0, 1, 2)));
    }

    #[test]
    fn closed_router_returns_orphans_and_refuses_everything() {
        let r = Router::new(4);
        r.route(access(0, 1, 1));
        let c = r.close();
        assert_eq!(c.orphans.len(), 1);
        assert_eq!(r.route(access(0, 1, 2)), Routed::Closed(access(0, 1, 2)));
        assert_eq!(
            r.install_control(Arc::new(RequestQueue::new(1))),
            Err(InstallError::Closed)
        );
        assert!(!r.register_client(1, Arc::new(RequestQueue::new(1))));
    }
}
