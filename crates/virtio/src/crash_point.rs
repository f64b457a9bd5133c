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
//! A comma-separated list, `REMIO_CRASH_POINT=<name>:<n>,<name>:<n>,...`, arms one entry per
//! device-model generation, so that one guest run goes through every point: `remio run` starts
//! its `k`-th restart with `REMIO_DM_GENERATION=k` (0 for the first device model, also when the
//! variable is absent), and that process is armed with the list's entry `k` (none beyond the
//! list). A malformed spec or generation arms nothing, with one error line.
//!
//! The process says which point killed it, on its log (stderr) just before the SIGKILL:
//! `crash point <name> reached (hit <n>, generation <k>): killing the device model`.
//!
//! An entry `<name>:<n>:foreign=<id>` first rewrites the state records (each device's state
//! region, [`crate::persist`]) of the process's devices of virtio device ID `<id>` as records of
//! another configuration, as an upgrade to another config leaves them: the next device model
//! finds records it cannot resume and must fail those devices, not hang their drivers
//! ([`crate::transport::Resumed::Failed`]), and serve the others as before.
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
    use std::fs::File;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Mutex, OnceLock};

    /// The environment variable naming the point(s) and the hit that kills.
    const ENV: &str = "REMIO_CRASH_POINT";
    /// Which device model of a run this is: 0 the first, `k` the `k`-th restart (`remio run`
    /// sets it).
    const GENERATION_ENV: &str = "REMIO_DM_GENERATION";

    #[derive(Debug)]
    pub(super) struct Armed {
        name: String,
        nth: u64,
        generation: usize,
        hits: AtomicU64,
        /// Rewrite the state records of the devices of this device ID as another
        /// configuration's before the kill.
        pub(super) foreign: Option<u32>,
    }

    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();

    /// The state regions of this process's devices, with their device IDs (for `:foreign=`).
    static REGIONS: Mutex<Vec<(u32, File)>> = Mutex::new(Vec::new());

    /// `<name>:<n>` with `n >= 1`, optionally followed by `:foreign=<device id>`.
    fn parse_one(spec: &str) -> Option<(String, u64, Option<u32>)> {
        let spec = spec.trim();
        let (spec, foreign) = match spec.rsplit_once(":foreign=") {
            Some((rest, id)) => (rest, Some(id.parse().ok()?)),
            None => (spec, None),
        };
        let (name, nth) = spec.rsplit_once(':')?;
        let nth = nth.parse().ok().filter(|&n| n >= 1)?;
        (!name.is_empty()).then(|| (name.to_owned(), nth, foreign))
    }

    /// Keeps a handle on `region`'s file, the region of a device of `device_id`, for an entry
    /// with `:foreign=`.
    pub(crate) fn watch_state_region(region: &crate::persist::StateRegion, device_id: u32) {
        match region.file().try_clone() {
            Ok(f) => {
                if let Ok(mut regions) = REGIONS.lock() {
                    regions.push((device_id, f));
                }
            }
            Err(e) => log::error!("crash points: cannot keep the state region: {e}"),
        }
    }

    /// What `spec` (one entry, or a comma-separated list of them) arms in the device model of
    /// `generation`: `Ok(None)` past the list's end, `Err(())` if any entry is malformed.
    pub(super) fn parse(spec: &str, generation: usize) -> Result<Option<Armed>, ()> {
        let entries = spec
            .split(',')
            .map(parse_one)
            .collect::<Option<Vec<_>>>()
            .ok_or(())?;
        Ok(entries
            .into_iter()
            .nth(generation)
            .map(|(name, nth, foreign)| Armed {
                name,
                nth,
                generation,
                hits: AtomicU64::new(0),
                foreign,
            }))
    }

    fn armed() -> Option<&'static Armed> {
        ARMED
            .get_or_init(|| {
                let spec = std::env::var(ENV).ok()?;
                let generation = match std::env::var(GENERATION_ENV) {
                    Err(_) => 0,
                    Ok(g) => {
                        let Ok(g) = g.parse() else {
                            log::error!("{GENERATION_ENV}={g}: not a number; no crash point armed");
                            return None;
                        };
                        g
                    }
                };
                match parse(&spec, generation) {
                    Ok(armed) => armed,
                    Err(()) => {
                        log::error!(
                            "{ENV}={spec}: not <point>:<n>[,<point>:<n>...] with n >= 1; ignored"
                        );
                        None
                    }
                }
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
        if let Some(a) = armed().filter(|a| a.hit(name)) {
            if let Some(id) = a.foreign {
                if let Ok(regions) = REGIONS.lock() {
                    let mine = regions.iter().filter(|(d, _)| *d == id);
                    log::error!(
                        "crash point {name}: rewriting the state records of {} device(s) of \
                         type {id} as another configuration's",
                        mine.clone().count()
                    );
                    for (_, f) in mine {
                        if let Err(e) = crate::persist::make_foreign(f) {
                            log::error!("crash point {name}: state region: {e}");
                        }
                    }
                }
            }
            log::error!(
                "crash point {name} reached (hit {}, generation {}): killing the device model",
                a.nth,
                a.generation
            );
            // SAFETY: kill(2) on our own pid; no memory involved. SIGKILL: nothing of ours
            // runs after this point, as in a real crash.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
}

#[cfg(feature = "crash-points")]
pub(crate) use armed::{reached, watch_state_region};

#[cfg(all(test, feature = "crash-points"))]
mod tests {
    use super::armed::parse;

    #[test]
    fn only_the_nth_hit_of_the_named_point_fires() {
        let a = parse("used:2", 0).unwrap().unwrap();

        let hits: Vec<bool> = ["popped", "used", "popped", "used", "used"]
            .iter()
            .map(|n| a.hit(n))
            .collect();

        assert_eq!(hits, [false, false, false, true, false]);
    }

    #[test]
    fn a_spec_without_a_positive_count_is_refused() {
        for spec in [
            "used",
            "used:0",
            "used:x",
            "",
            ":3",
            "used:1,",
            "used:1,popped",
        ] {
            assert!(parse(spec, 0).is_err(), "{spec}");
        }
    }

    #[test]
    fn each_generation_is_armed_with_its_own_entry_of_a_list() {
        let spec = "popped:3, used:1,before-interrupt:2";

        let g1 = parse(spec, 1).unwrap().unwrap();
        let g2 = parse(spec, 2).unwrap().unwrap();

        assert!(!g1.hit("popped"), "generation 1 is armed with used:1 only");
        assert!(g1.hit("used"));
        assert!(!g2.hit("before-interrupt"));
        assert!(g2.hit("before-interrupt"));
    }

    #[test]
    fn a_generation_past_the_list_is_not_armed() {
        assert!(parse("popped:3,used:1", 2).unwrap().is_none());
        assert!(parse("popped:3", 0).unwrap().is_some());
    }

    #[test]
    fn an_entry_may_ask_for_foreign_state_records() {
        let spec = "popped:3:foreign=2,used:1";

        let g0 = parse(spec, 0).unwrap().unwrap();
        let g1 = parse(spec, 1).unwrap().unwrap();

        assert_eq!((g0.foreign, g1.foreign), (Some(2), None));
        for bad in [
            "popped:foreign=2",
            "popped:3:foreign=",
            "popped:3:foreign=x",
            "popped:3:x",
        ] {
            assert!(parse(bad, 0).is_err(), "{bad}");
        }
    }
}
