//! A test hook that kills the device model at a named step of a request's life, to check that
//! a restarted one resumes from any of them (issue 14's crash points).
//!
//! Compiled in only with the `crash-points` feature (which `remio`'s dev-dependency turns on,
//! so `cargo test` builds the `remio` binary with it and a release build has none of it):
//! without it [`crash_point!`] expands to nothing. With it, `REMIO_CRASH_POINT=<name>:<n>`,
//! read once (at the first point reached), makes the process SIGKILL itself the `n`-th time
//! (1-based) it reaches point `<name>`; without the variable a point costs one load of an
//! initialised `OnceLock`.
//!
//! The points, in the order a request meets them:
//!
//! | name | where |
//! | --- | --- |
//! | `popped` | a descriptor chain taken from the available ring, nothing done yet |
//! | `blk-written` | virtio-blk: the data written to the image, the status byte not yet |
//! | `executed` | the request done and its status written, the used ring not yet updated |
//! | `used` | the used ring updated (its index published), no interrupt yet |
//! | `before-interrupt` | the queue drained, just before the used-buffer interrupt |

/// Reaches crash point `$name` (see the module docs); nothing without the feature.
macro_rules! crash_point {
    ($name:literal) => {
        #[cfg(feature = "crash-points")]
        $crate::crash_point::reached($name);
    };
}
pub(crate) use crash_point;

#[cfg(feature = "crash-points")]
mod armed {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    /// The environment variable naming the point and the hit that kills.
    const ENV: &str = "REMIO_CRASH_POINT";

    pub(super) struct Armed {
        name: String,
        nth: u64,
        hits: AtomicU64,
    }

    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();

    /// `<name>:<n>` with `n >= 1`.
    pub(super) fn parse(spec: &str) -> Option<Armed> {
        let (name, nth) = spec.rsplit_once(':')?;
        let nth = nth.parse().ok().filter(|&n| n >= 1)?;
        Some(Armed {
            name: name.to_owned(),
            nth,
            hits: AtomicU64::new(0),
        })
    }

    fn armed() -> Option<&'static Armed> {
        ARMED
            .get_or_init(|| {
                let spec = std::env::var(ENV).ok()?;
                let armed = parse(&spec);
                if armed.is_none() {
                    log::error!("{ENV}={spec}: not <point>:<n> with n >= 1; ignored");
                }
                armed
            })
            .as_ref()
    }

    impl Armed {
        /// Whether this hit of `name` is the one that kills.
        pub(super) fn hit(&self, name: &str) -> bool {
            self.name == name && self.hits.fetch_add(1, Ordering::Relaxed) + 1 == self.nth
        }
    }

    /// Counts a hit of point `name` and kills the process on the armed one.
    pub(crate) fn reached(name: &str) {
        if armed().is_some_and(|a| a.hit(name)) {
            log::error!("crash point {name} reached: killing the device model");
            // SAFETY: kill(2) on our own pid; no memory involved. SIGKILL: nothing of ours
            // runs after this point, as in a real crash.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
}

#[cfg(feature = "crash-points")]
pub(crate) use armed::reached;

#[cfg(all(test, feature = "crash-points"))]
mod tests {
    use super::armed::parse;

    #[test]
    fn only_the_nth_hit_of_the_named_point_fires() {
        let a = parse("used:2").unwrap();

        let hits: Vec<bool> = ["popped", "used", "popped", "used", "used"]
            .iter()
            .map(|n| a.hit(n))
            .collect();

        assert_eq!(hits, [false, false, false, true, false]);
    }

    #[test]
    fn a_spec_without_a_positive_count_is_refused() {
        for spec in ["used", "used:0", "used:x", ""] {
            assert!(parse(spec).is_none(), "{spec}");
        }
    }
}
