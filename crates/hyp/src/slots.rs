//! The request-slot pool (`spec/remote-io.md`, "Request slots and states").
//!
//! `request_id` is the slot index. Each slot has its own lock and condition variable, so a
//! completion wakes exactly the one frontend thread stalled on that slot. Claiming a free slot
//! is lock-free (a compare-and-swap per slot); only a frontend that finds the pool exhausted
//! takes the pool's wait lock.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use remio_abi::RemioOp;

use crate::irq::lock;

/// The state of a slot. Transitions (and who makes them):
///
/// ```text
/// FREE --frontend trap--> PENDING --backend ASK--> PROCESSING --backend completion--> COMPLETE
/// COMPLETE --frontend takes the value--> FREE
/// PENDING --frontend timeout (removed from the FIFO)--> FREE
/// PROCESSING --frontend timeout--> PROCESSING + abandoned --backend completion--> FREE
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SlotState {
    Free,
    Pending,
    Processing,
    Complete,
}

/// The request a slot holds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SlotInner {
    pub state: SlotState,
    /// The pair (device) index the request is for.
    pub pair: usize,
    pub addr: u64,
    pub width: u8,
    /// `Read` or `Write`.
    pub op: RemioOp,
    /// Write: the full register value. Read: the completion's value once COMPLETE.
    pub value: u64,
    /// The frontend gave up (timeout) while the backend held the request: the next valid
    /// completion frees the slot instead of completing anything.
    pub abandoned: bool,
    /// The owning frontend sleeps on [`Slot::done`]: a completion must wake it. When it does
    /// not sleep (it has not got there yet), the completion skips the futex wake.
    pub sleeping: bool,
}

impl Default for SlotInner {
    fn default() -> Self {
        Self {
            state: SlotState::Free,
            pair: 0,
            addr: 0,
            width: 0,
            op: RemioOp::Read,
            value: 0,
            abandoned: false,
            sleeping: false,
        }
    }
}

/// One slot. Lock order: a device FIFO lock may be held while taking a slot lock, never the
/// reverse. Aligned to its own cache lines: frontend threads on different cores use different
/// slots, and a slot shared a line with its neighbours' locks before.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Slot {
    /// Owned by a request (from claim to release). Only the pool reads and writes it.
    claimed: AtomicBool,
    pub inner: Mutex<SlotInner>,
    /// Signalled (just after `inner` is released) when the slot becomes COMPLETE while its
    /// frontend sleeps.
    pub done: Condvar,
}

impl Slot {
    pub(crate) fn lock(&self) -> MutexGuard<'_, SlotInner> {
        lock(&self.inner)
    }
}

thread_local! {
    /// Where this thread's next claim starts scanning: the slot it claimed last (a frontend
    /// thread has one access at a time, so it usually finds that slot free again without
    /// writing a line other threads write); on its first claim, the pool's spreading hint.
    static LAST_CLAIM: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The pool.
#[derive(Debug)]
pub(crate) struct SlotPool {
    slots: Box<[Slot]>,
    /// Where a thread's first claim starts scanning (spreads claimants over the slots).
    hint: AtomicUsize,
    /// Frontends blocked in [`SlotPool::acquire`].
    waiters: AtomicUsize,
    wait_lock: Mutex<()>,
    wait_cv: Condvar,
}

impl SlotPool {
    pub(crate) fn new(n: usize) -> Self {
        Self {
            slots: (0..n).map(|_| Slot::default()).collect(),
            hint: AtomicUsize::new(0),
            waiters: AtomicUsize::new(0),
            wait_lock: Mutex::new(()),
            wait_cv: Condvar::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn get(&self, index: usize) -> Option<&Slot> {
        self.slots.get(index)
    }

    fn try_claim(&self) -> Option<usize> {
        let n = self.slots.len();
        let start = LAST_CLAIM
            .with(Cell::get)
            .unwrap_or_else(|| self.hint.fetch_add(1, Ordering::Relaxed))
            % n;
        let got = (0..n).map(|k| (start + k) % n).find(|&i| {
            self.slots[i]
                .claimed
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
        });
        if got.is_some() {
            LAST_CLAIM.with(|c| c.set(got));
        }
        got
    }

    /// Claims a free slot, waiting for one until `deadline` (forever if `None`); `on_wait` is
    /// called once, before sleeping, if the pool is exhausted. Returns the slot index, or
    /// `None` if the deadline passed.
    pub(crate) fn acquire(
        &self,
        deadline: Option<Instant>,
        on_wait: impl FnOnce(),
    ) -> Option<usize> {
        if let Some(i) = self.try_claim() {
            return Some(i);
        }
        on_wait();
        let mut g = lock(&self.wait_lock);
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let got = loop {
            // `waiters` is published (SeqCst) before this scan, and `release` frees (SeqCst)
            // before reading `waiters`: either we see the freed slot or the releaser sees us
            // and notifies under `wait_lock`, which we hold until we sleep.
            if let Some(i) = self.try_claim() {
                break Some(i);
            }
            match deadline {
                None => g = self.wait_cv.wait(g).unwrap_or_else(PoisonError::into_inner),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        break None;
                    }
                    g = self
                        .wait_cv
                        .wait_timeout(g, d - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        got
    }

    /// Returns a slot (whose state the caller has set to FREE) to the pool.
    pub(crate) fn release(&self, index: usize) {
        self.slots[index].claimed.store(false, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _g = lock(&self.wait_lock);
            self.wait_cv.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn exhausted_pool_times_out_then_release_makes_a_slot_available() {
        let pool = SlotPool::new(2);
        let waits = std::cell::Cell::new(0);
        let a = pool.acquire(None, || waits.set(waits.get() + 1)).unwrap();
        let b = pool.acquire(None, || waits.set(waits.get() + 1)).unwrap();
        assert_ne!(a, b);
        assert_eq!(waits.get(), 0);
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(pool
            .acquire(Some(soon), || waits.set(waits.get() + 1))
            .is_none());
        assert_eq!(waits.get(), 1);
        pool.release(b);
        assert_eq!(pool.acquire(None, || waits.set(waits.get() + 1)), Some(b));
        assert_eq!(waits.get(), 1);
    }
}
