//! The register window of the soak's device, what each register reads as, and how the frontend
//! knows what a read must return.
//!
//! Offsets are virtio-mmio's where the device has the register (QueueNotify, InterruptStatus,
//! InterruptACK: virtio 1.2 §4.2.2); the rest of the window is the soak's own:
//!
//! | offset | width | read | write |
//! | --- | --- | --- | --- |
//! | 0x050 QueueNotify | 4 | — | ioeventfd (data match = queue 0 or 1) |
//! | 0x060 InterruptStatus | 4 | the status word | — |
//! | 0x064 InterruptACK | 4 | — | clears bits of the status word |
//! | 0x100..0x180 config | 1, 2, 4, 8 | [`config_value`] | — |
//! | 0x180 + 8 t scratch | 8 | last value written by frontend thread t | stored in the DM's state file |

/// virtio-mmio QueueNotify (virtio 1.2 §4.2.2).
pub const QUEUE_NOTIFY: u64 = 0x50;
/// virtio-mmio InterruptStatus (virtio 1.2 §4.2.2).
pub const INTERRUPT_STATUS: u64 = 0x60;
/// virtio-mmio InterruptACK (virtio 1.2 §4.2.2).
pub const INTERRUPT_ACK: u64 = 0x64;
/// virtio-mmio "used buffer notification" bit of InterruptStatus (virtio 1.2 §4.2.2).
pub const USED_BUFFER: u32 = 1;
/// Queues with an ioeventfd on QueueNotify.
pub const QUEUES: u64 = 2;
/// Read-only registers whose value is a function of DM and address.
pub const CONFIG: (u64, u64) = (0x100, 0x180);
/// One 8-byte read/write register per frontend thread.
pub const SCRATCH: u64 = 0x180;
/// Frontend threads at most (one scratch register each).
pub const MAX_VCPUS: usize = 16;
/// Register window of each device.
pub const WINDOW: u64 = 0x200;
/// Frontend MMIO base of DM 0; DM i is at `MMIO_BASE + i * 0x1000`.
pub const MMIO_BASE: u64 = 0xa000_0000;
/// Shared memory of each DM.
pub const SHMEM_SIZE: u64 = 0x1_0000;

/// The frontend MMIO base of DM `dm`.
pub fn base_of(dm: u32) -> u64 {
    MMIO_BASE + u64::from(dm) * 0x1000
}

/// The guest-physical shared-memory base of DM `dm`.
pub fn shmem_of(dm: u32) -> u64 {
    0x1_0000_0000 + u64::from(dm) * 0x10_0000
}

/// The offset of frontend thread `vcpu`'s scratch register.
pub fn scratch_of(vcpu: usize) -> u64 {
    SCRATCH + 8 * vcpu as u64
}

/// What a config register read of `width` bytes at window offset `off` of DM `dm` returns:
/// a hash of both, cut to the access width, so that a read routed to the wrong DM or address
/// (or answered with a stale or default value) almost never matches.
pub fn config_value(dm: u32, off: u64, width: u8) -> u64 {
    let mut x = (u64::from(dm) << 32 | off).wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    match width {
        1 => x & 0xff,
        2 => x & 0xffff,
        4 => x & 0xffff_ffff,
        _ => x,
    }
}

/// How many values a scratch register may hold after writes that overlapped churn before
/// its reads stop being checked.
const MAX_CANDIDATES: usize = 8;

/// What frontend thread `vcpu` knows about its scratch register on one DM.
///
/// A write that overlapped the end of a device-model session (the process killed, or the
/// session re-created) may have been applied or not: the platform completes it for the dead
/// session either way. Its value joins the candidates, and the next read that returns one of
/// them settles the register. A write made with no churn in flight is applied: requests of one
/// DM are served in order by one thread, and a lost write can never be applied later (its
/// process is dead, or its serving thread finished it before opening the next session).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The register holds one of `vals[..n]`.
    OneOf {
        /// Candidate values, oldest first.
        vals: [u64; MAX_CANDIDATES],
        /// How many are valid (at least 1).
        n: usize,
    },
    /// A write timed out (the device model may still apply it at any later time), or too many
    /// overlapped writes in a row: reads of this register are no longer checked.
    Unknown,
}

/// Why a register's reads stopped being checked ([`Expect::write`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GaveUp {
    /// A write of it timed out.
    Timeout,
    /// [`MAX_CANDIDATES`] writes in a row overlapped churn before a read settled which one
    /// landed.
    Overlap,
}

/// How a read of a register ended, as the frontend judges it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The value is right.
    Right,
    /// 0 from an access that overlapped the end of the session that held it: the platform
    /// completed it for the dead session (`remio_api::ABANDONED_READ_VALUE`).
    Abandoned,
    /// Not checked (the register's value is [`Expect::Unknown`]).
    Unverified,
    /// Anything else: a lost, duplicated or misrouted request.
    Wrong,
}

impl Expect {
    /// A register known to hold `v`.
    pub fn known(v: u64) -> Self {
        let mut vals = [0; MAX_CANDIDATES];
        vals[0] = v;
        Self::OneOf { vals, n: 1 }
    }

    /// Judges a read that returned `value`; `churned` says whether a session of the DM ended
    /// while the access was in flight. A right read settles the register to `value`.
    pub fn read(&mut self, value: u64, churned: bool) -> Verdict {
        match *self {
            Self::Unknown => Verdict::Unverified,
            Self::OneOf { vals, n } if vals[..n].contains(&value) => {
                *self = Self::known(value);
                Verdict::Right
            }
            _ if churned && value == remio_api::ABANDONED_READ_VALUE => Verdict::Abandoned,
            Self::OneOf { .. } => Verdict::Wrong,
        }
    }

    /// Records a completed write of `value`; `churned` as for [`Expect::read`], `timed_out`
    /// if the access timed out. Returns why, if this write ended the checking of the register.
    pub fn write(&mut self, value: u64, churned: bool, timed_out: bool) -> Option<GaveUp> {
        let was = *self;
        *self = match *self {
            _ if timed_out => Self::Unknown,
            Self::Unknown => Self::Unknown,
            _ if !churned => Self::known(value),
            Self::OneOf { n, .. } if n == MAX_CANDIDATES => Self::Unknown,
            Self::OneOf { mut vals, n } => {
                vals[n] = value;
                Self::OneOf { vals, n: n + 1 }
            }
        };
        match (was, *self) {
            (Self::Unknown, _) | (_, Self::OneOf { .. }) => None,
            (_, Self::Unknown) if timed_out => Some(GaveUp::Timeout),
            (_, Self::Unknown) => Some(GaveUp::Overlap),
        }
    }
}

/// Whether `value` can be what InterruptStatus reads: the soak's device sets only the
/// used-buffer bit.
pub fn status_plausible(value: u64) -> bool {
    value & !u64::from(USED_BUFFER) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_values_differ_between_dms_and_addresses() {
        assert_ne!(config_value(0, 0x100, 8), config_value(1, 0x100, 8));
        assert_ne!(config_value(0, 0x100, 8), config_value(0, 0x108, 8));
        assert_eq!(config_value(3, 0x104, 4) >> 32, 0);
    }

    #[test]
    fn a_known_register_accepts_only_its_value() {
        let mut e = Expect::known(7);
        assert_eq!(e.read(7, false), Verdict::Right);
        assert_eq!(e.read(8, false), Verdict::Wrong);
        assert_eq!(e.read(0, false), Verdict::Wrong);
        assert_eq!(e.read(0, true), Verdict::Abandoned);
    }

    #[test]
    fn writes_overlapping_churn_accept_any_candidate_until_a_read_settles_it() {
        let mut e = Expect::known(1);
        e.write(2, true, false);
        e.write(3, true, false);
        let (mut a, mut b) = (e, e);
        assert_eq!(a.read(2, false), Verdict::Right);
        assert_eq!(b.read(3, false), Verdict::Right);
        assert_eq!(e.read(1, false), Verdict::Right);
        assert_eq!(e, Expect::known(1));
        assert_eq!(e.read(2, false), Verdict::Wrong);
    }

    #[test]
    fn a_clean_write_is_known_again() {
        let mut e = Expect::known(1);
        e.write(2, true, false);
        e.write(3, false, false);
        assert_eq!(e, Expect::known(3));
    }

    #[test]
    fn a_timed_out_write_stops_checking_the_register() {
        let mut e = Expect::known(1);
        e.write(2, false, true);
        assert_eq!(e.read(99, false), Verdict::Unverified);
        e.write(3, false, false);
        assert_eq!(e, Expect::Unknown, "a late write may still land");
    }

    #[test]
    fn the_write_that_ends_checking_says_why_and_only_that_one() {
        let mut timed_out = Expect::known(1);
        let mut overlapped = Expect::known(1);

        let by_timeout = [
            timed_out.write(2, false, true),
            timed_out.write(3, false, true),
        ];
        let by_overlap: Vec<_> = (2..=MAX_CANDIDATES as u64 + 2)
            .map(|v| overlapped.write(v, true, false))
            .collect();

        assert_eq!(by_timeout, [Some(GaveUp::Timeout), None]);
        let (last, first) = by_overlap.split_last().unwrap();
        let (gave_up, before) = first.split_last().unwrap();
        assert!(before.iter().all(Option::is_none), "{by_overlap:?}");
        assert_eq!(*gave_up, Some(GaveUp::Overlap));
        assert_eq!(*last, None, "already given up");
        assert_eq!(overlapped, Expect::Unknown);
    }

    #[test]
    fn status_reads_with_unknown_bits_are_implausible() {
        assert!(status_plausible(0));
        assert!(status_plausible(1));
        assert!(!status_plausible(2));
        assert!(!status_plausible(config_value(0, 0x100, 4) | 4));
    }
}
