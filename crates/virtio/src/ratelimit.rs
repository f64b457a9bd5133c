//! Rate-limited logging for guest-triggerable sites (conventions §4, §5).
//!
//! Each call site owns a [`LogLimiter`] (a `static` created by the [`warn_rl!`] macro) that lets
//! through at most [`LogLimiter::BURST`] messages per second; the rest are counted and the
//! count is reported with the next message let through.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// A per-call-site limiter: `BURST` messages per one-second window.
#[derive(Debug)]
pub struct LogLimiter {
    /// Window number (seconds since the process epoch) in the high 32 bits, messages logged in
    /// that window in the low 32 bits.
    state: AtomicU64,
    /// Messages dropped since the last one let through.
    suppressed: AtomicU64,
}

fn epoch() -> &'static Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now)
}

impl LogLimiter {
    /// Messages allowed per one-second window.
    pub const BURST: u64 = 10;

    /// A limiter that has logged nothing yet.
    pub const fn new() -> Self {
        Self {
            state: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether one more message may be logged now. `Some(n)`: yes, and `n` earlier messages
    /// were suppressed since the last one let through.
    pub fn allow(&self) -> Option<u64> {
        let window = epoch().elapsed().as_secs() & 0xffff_ffff;
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            let (win, count) = (cur >> 32, cur & 0xffff_ffff);
            let next = if win == window {
                if count >= Self::BURST {
                    self.suppressed.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                (window << 32) | (count + 1)
            } else {
                (window << 32) | 1
            };
            match self
                .state
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(self.suppressed.swap(0, Ordering::Relaxed)),
                Err(actual) => cur = actual,
            }
        }
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// `log::warn!`, rate limited per call site.
#[macro_export]
macro_rules! warn_rl {
    ($($arg:tt)*) => {{
        static LIMITER: $crate::ratelimit::LogLimiter = $crate::ratelimit::LogLimiter::new();
        if let Some(suppressed) = LIMITER.allow() {
            if suppressed > 0 {
                log::warn!("({} similar messages suppressed)", suppressed);
            }
            log::warn!($($arg)*);
        }
    }};
}

#[cfg(test)]
#[expect(clippy::cast_possible_truncation, reason = "test constants are small")]
mod tests {
    use super::*;

    #[test]
    fn limiter_lets_through_a_burst_then_suppresses() {
        let limiter = LogLimiter::new();
        let allowed = (0..100).filter(|_| limiter.allow().is_some()).count();
        // A window boundary may fall inside the loop, allowing at most two bursts.
        assert!(allowed >= LogLimiter::BURST as usize);
        assert!(allowed <= 2 * LogLimiter::BURST as usize);
    }
}
