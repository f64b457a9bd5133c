//! Rate limiting for log sites a guest or client can trigger.

use std::sync::atomic::{AtomicU64, Ordering};

/// Lets the first 10 events through, then one in every 1000.
#[derive(Debug, Default)]
pub(crate) struct RateLimit(AtomicU64);

impl RateLimit {
    /// A fresh limiter.
    pub(crate) const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// Whether this event may be logged.
    pub(crate) fn allow(&self) -> bool {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        n < 10 || n.is_multiple_of(1000)
    }
}
