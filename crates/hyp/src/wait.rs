//! Wait helpers: what a stalled frontend thread may do instead of sleeping.
//!
//! A trapped access stalls its thread until the backend completes the request. By default the
//! thread sleeps on its slot's condition variable and the completion wakes it: the completion
//! must then be made by some other thread, which in a model where the backend is another
//! process means a server thread woken to make it, and one more wake-up for the frontend.
//!
//! Whoever serves a device may install a [`WaitHelper`] on it
//! ([`crate::BackendVm::set_wait_helper`]). [`crate::FrontendVm::access`] then calls it on the
//! stalled thread, after the request is queued and the backend interrupt delivered, with no
//! lock held, unless the request is already COMPLETE. The helper may do the work that completes
//! requests (e.g. read the backend's answers and issue the completion hypercalls itself) until
//! [`SlotWaiter::is_complete`] says this access's request is COMPLETE, and returns. It is only
//! an optimisation: whatever it did, the access then waits as usual (condition variable,
//! bounded by the timeout), so a helper that returns early or does nothing loses nothing. A
//! helper must return well before [`SlotWaiter::deadline`] (the access's timeout), must not
//! touch the frontend's own device state, and runs on any number of frontend threads at once.
//!
//! The hypervisor knows nothing of what a helper does; it only offers the hook.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use crate::slots::{Slot, SlotState};

/// Run by a stalled frontend thread instead of sleeping (see the module docs).
pub type WaitHelper = Arc<dyn Fn(&SlotWaiter<'_>) + Send + Sync>;

/// The access a [`WaitHelper`] runs for.
#[derive(Debug)]
pub struct SlotWaiter<'a> {
    pub(crate) slot: &'a Slot,
    pub(crate) deadline: Option<Instant>,
}

impl SlotWaiter<'_> {
    /// Whether the backend completed this access's request (the helper should return).
    pub fn is_complete(&self) -> bool {
        self.slot.lock().state == SlotState::Complete
    }

    /// When the access times out (`None`: never). A helper returns before it.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
}

/// Errors of [`crate::BackendVm::set_wait_helper`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WaitHelperError {
    /// No backend device with this `dm_id`.
    #[error("no backend device {0}")]
    NoSuchDevice(usize),
}

/// A device's helper slot. Leaf lock: read on every access, written by `set_wait_helper`,
/// never held while the helper runs.
#[derive(Default)]
pub(crate) struct HelperCell(RwLock<Option<WaitHelper>>);

impl std::fmt::Debug for HelperCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("HelperCell")
            .field(&self.get().is_some())
            .finish()
    }
}

impl HelperCell {
    pub(crate) fn get(&self) -> Option<WaitHelper> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set(&self, helper: Option<WaitHelper>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = helper;
    }
}
