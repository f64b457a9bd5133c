//! Rate-limited logging for sites a guest or a client can trigger in a loop (conventions §4,
//! §5): a guest that loops on a bad descriptor, a local process that reconnects with garbage,
//! must not flood the log.
//!
//! Each call site owns a [`LogLimiter`] (a `static` created by the [`warn_rl!`] macro) that lets
//! through at most [`LogLimiter::BURST`] messages per second; the rest are counted and the
//! count is reported with the next message let through.
//!
//! ```
//! use remio_ratelimit::{warn_rl, LogLimiter};
//!
//! // A guest that hammers a bad register: the log gets a burst a second, not a flood.
//! for offset in 0..1000u64 {
//!     warn_rl!("bad access at offset {offset:#x}");
//! }
//!
//! // The limiter alone, for a decision that is not a log line.
//! let limiter = LogLimiter::new();
//! let let_through = (0..100).filter(|_| limiter.allow().is_some()).count();
//! assert!(let_through <= 2 * LogLimiter::BURST as usize);
//! ```

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

#[doc(hidden)]
pub use log as __log;

/// `log::$level!`, rate limited per call site: what [`warn_rl!`] and [`error_rl!`] expand to.
#[doc(hidden)]
#[macro_export]
macro_rules! __log_rl {
    ($level:ident, $($arg:tt)*) => {{
        static LIMITER: $crate::LogLimiter = $crate::LogLimiter::new();
        if let Some(suppressed) = LIMITER.allow() {
            if suppressed > 0 {
                $crate::__log::$level!("({} similar messages suppressed)", suppressed);
            }
            $crate::__log::$level!($($arg)*);
        }
    }};
}

/// `log::warn!`, rate limited per call site.
#[macro_export]
macro_rules! warn_rl {
    ($($arg:tt)*) => { $crate::__log_rl!(warn, $($arg)*) };
}

/// `log::error!`, rate limited per call site.
#[macro_export]
macro_rules! error_rl {
    ($($arg:tt)*) => { $crate::__log_rl!(error, $($arg)*) };
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

    #[test]
    fn the_next_message_let_through_reports_how_many_were_suppressed() {
        let limiter = LogLimiter::new();
        let tries = 3 * LogLimiter::BURST;
        let (mut allowed, mut reported) = (0, 0);
        for _ in 0..tries {
            if let Some(n) = limiter.allow() {
                allowed += 1;
                reported += n; // non-zero only if a window boundary fell inside the loop
            }
        }
        assert!(allowed < tries, "some messages were suppressed");
        // In the next window the count of what was dropped comes with the first message.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let next = limiter
            .allow()
            .expect("a new window lets a message through");
        assert_eq!(reported + next, tries - allowed);
        assert_eq!(limiter.allow(), Some(0));
    }
}
