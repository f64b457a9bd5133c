//! The in-kernel ioeventfd client of a DM: writes that match a registration signal its
//! eventfd and are completed at once, on the dispatching thread, without reaching any
//! device model. Matching follows KVM (`virt/kvm/eventfd.c`): the access address equals the
//! registration's, and either the registration's length is 0 (any width), or the width
//! equals the length and (no data match, or the written value masked to the width equals
//! the data).

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::statusword::{StatusPage, StatusWordConfig, StatusWordError, StatusWordReg};

/// An IOEVENTFD request (`struct bao_ioeventfd`, decoded).
#[derive(Debug, Clone)]
pub struct IoeventfdConfig {
    /// The eventfd to signal. Compared by open-file identity (see [`same_file`]).
    pub fd: Arc<EventFd>,
    /// Address of the watched register.
    pub addr: u64,
    /// 1, 2, 4 or 8; or 0 for a write of any width at `addr`.
    pub len: u32,
    /// `Some(v)`: signal only when the written value, masked to the access width, is `v`
    /// (`BAO_IOEVENTFD_FLAG_DATAMATCH`). Not allowed with `len == 0`.
    pub datamatch: Option<u64>,
    /// Remove the registration equal to this one (`BAO_IOEVENTFD_FLAG_DEASSIGN`) instead of
    /// adding it.
    pub deassign: bool,
}

/// Errors of [`crate::Dm::ioeventfd`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoeventfdError {
    /// `len` is not 0, 1, 2, 4 or 8. EINVAL.
    #[error("ioeventfd length {0} is not 0, 1, 2, 4 or 8")]
    InvalidLength(u32),
    /// `addr + len` overflows. EINVAL.
    #[error("ioeventfd range at {addr:#x} + {len} overflows")]
    Overflow {
        /// Requested address.
        addr: u64,
        /// Requested length.
        len: u32,
    },
    /// A data match was asked with `len == 0`, or the data does not fit in `len` bytes (it
    /// could never match). EINVAL.
    #[error("data match {data:#x} is invalid for length {len}")]
    InvalidDatamatch {
        /// Requested length.
        len: u32,
        /// Requested data.
        data: u64,
    },
    /// A registration at the same address conflicts (same length and either is a wildcard or
    /// the data are equal; or either length is 0). EEXIST.
    #[error("a conflicting ioeventfd is registered at {0:#x}")]
    Exists(u64),
    /// DEASSIGN named no registration with this eventfd, address, length and data. ENOENT.
    #[error("no such ioeventfd registration at {0:#x}")]
    NotFound(u64),
    /// The DM is being destroyed. ESHUTDOWN.
    #[error("the DM is being destroyed")]
    ShuttingDown,
}

impl IoeventfdError {
    /// The errno of this error.
    pub fn errno(&self) -> i32 {
        match self {
            Self::InvalidLength(_) | Self::Overflow { .. } | Self::InvalidDatamatch { .. } => {
                libc::EINVAL
            }
            Self::Exists(_) => libc::EEXIST,
            Self::NotFound(_) => libc::ENOENT,
            Self::ShuttingDown => libc::ESHUTDOWN,
        }
    }
}

/// `KCMP_FILE` from `linux/kcmp.h`.
const KCMP_FILE: libc::c_long = 0;

/// Whether two eventfds are the same open file. File descriptors received over
/// `SCM_RIGHTS` get new numbers, so this compares kernel file identity with
/// `kcmp(2)` `KCMP_FILE`; where `kcmp` is unavailable (ENOSYS, or refused by a seccomp
/// policy) it falls back to comparing descriptor numbers.
pub fn same_file(a: &EventFd, b: &EventFd) -> bool {
    let (fa, fb) = (a.as_raw_fd(), b.as_raw_fd());
    if fa == fb {
        return true;
    }
    let pid = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    // SAFETY: kcmp only compares two kernel objects named by integers (pid and fd numbers of
    // this process); it reads and writes no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            libc::c_long::from(pid),
            libc::c_long::from(pid),
            KCMP_FILE,
            libc::c_long::from(fa),
            libc::c_long::from(fb),
        )
    };
    r == 0
}

fn width_mask(width: u64) -> u64 {
    match width {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

#[derive(Debug)]
struct Registration {
    fd: Arc<EventFd>,
    len: u32,
    datamatch: Option<u64>,
}

impl Registration {
    fn conflicts(&self, len: u32, datamatch: Option<u64>) -> bool {
        // KVM's ioeventfd_check_collision, for registrations at the same address.
        self.len == 0
            || len == 0
            || (self.len == len
                && match (self.datamatch, datamatch) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                })
    }

    fn matches(&self, width: u64, value: u64) -> bool {
        if self.len == 0 {
            return true;
        }
        if u64::from(self.len) != width {
            return false;
        }
        self.datamatch
            .is_none_or(|d| d == value & width_mask(width))
    }
}

/// A DM's ioeventfd registrations, keyed by address, and its status word (kept here so that
/// the two never overlap: both are checked under the one lock).
#[derive(Debug, Default)]
pub(crate) struct IoeventfdTable {
    regs: BTreeMap<u64, Vec<Registration>>,
    status_word: Option<StatusWordReg>,
    closed: bool,
}

impl IoeventfdTable {
    fn validate(cfg: &IoeventfdConfig) -> Result<(), IoeventfdError> {
        if !matches!(cfg.len, 0 | 1 | 2 | 4 | 8) {
            return Err(IoeventfdError::InvalidLength(cfg.len));
        }
        if cfg.addr.checked_add(u64::from(cfg.len)).is_none() {
            return Err(IoeventfdError::Overflow {
                addr: cfg.addr,
                len: cfg.len,
            });
        }
        if let Some(data) = cfg.datamatch {
            if cfg.len == 0 || data & !width_mask(u64::from(cfg.len)) != 0 {
                return Err(IoeventfdError::InvalidDatamatch { len: cfg.len, data });
            }
        }
        Ok(())
    }

    /// Assigns or deassigns as `cfg` says.
    pub(crate) fn configure(&mut self, cfg: &IoeventfdConfig) -> Result<(), IoeventfdError> {
        if self.closed {
            return Err(IoeventfdError::ShuttingDown);
        }
        Self::validate(cfg)?;
        if cfg.deassign {
            // Exactly the matching registration, and nothing else: never re-assign.
            let list = self
                .regs
                .get_mut(&cfg.addr)
                .ok_or(IoeventfdError::NotFound(cfg.addr))?;
            let pos = list
                .iter()
                .position(|r| {
                    r.len == cfg.len && r.datamatch == cfg.datamatch && same_file(&r.fd, &cfg.fd)
                })
                .ok_or(IoeventfdError::NotFound(cfg.addr))?;
            list.remove(pos);
            if list.is_empty() {
                self.regs.remove(&cfg.addr);
            }
            return Ok(());
        }
        if self
            .status_word
            .as_ref()
            .is_some_and(|s| s.overlaps(cfg.addr, u64::from(cfg.len)))
        {
            return Err(IoeventfdError::Exists(cfg.addr));
        }
        let list = self.regs.entry(cfg.addr).or_default();
        if list.iter().any(|r| r.conflicts(cfg.len, cfg.datamatch)) {
            return Err(IoeventfdError::Exists(cfg.addr));
        }
        list.push(Registration {
            fd: cfg.fd.clone(),
            len: cfg.len,
            datamatch: cfg.datamatch,
        });
        Ok(())
    }

    /// A write of `value` (`width` bytes) at `addr`: signals the matching eventfd, if any,
    /// and says whether one matched.
    pub(crate) fn on_write(&self, addr: u64, width: u64, value: u64) -> bool {
        let Some(list) = self.regs.get(&addr) else {
            return false;
        };
        let Some(r) = list.iter().find(|r| r.matches(width, value)) else {
            return false;
        };
        if let Err(e) = r.fd.write(1) {
            remio_ratelimit::warn_rl!("ioeventfd at {addr:#x}: eventfd write failed: {e}");
        }
        true
    }

    /// Whether a read of `[addr, addr + width)` touches a registered notify range (length 0
    /// counts as one byte).
    pub(crate) fn covers_read(&self, addr: u64, width: u64) -> bool {
        let Some(last) = addr.checked_add(width.max(1) - 1) else {
            return false;
        };
        self.regs
            .range(addr.saturating_sub(7)..=last)
            .any(|(&start, list)| {
                list.iter().any(|r| {
                    let end = start.saturating_add(u64::from(r.len.max(1)));
                    start <= last && end > addr
                })
            })
    }

    /// Whether any registration (ioeventfd or status word) exists (a cheap pre-check for
    /// the data path).
    pub(crate) fn is_empty(&self) -> bool {
        self.regs.is_empty() && self.status_word.is_none()
    }

    /// Registers the status word: both addresses 4-byte aligned, not overlapping an
    /// ioeventfd, and none registered yet.
    pub(crate) fn register_status_word(
        &mut self,
        cfg: StatusWordConfig,
        page: Arc<StatusPage>,
    ) -> Result<(), StatusWordError> {
        if self.closed {
            return Err(StatusWordError::ShuttingDown);
        }
        for addr in [cfg.status_addr, cfg.ack_addr] {
            if addr % 4 != 0 || addr.checked_add(4).is_none() {
                return Err(StatusWordError::Misaligned(addr));
            }
        }
        if self.status_word.is_some() {
            return Err(StatusWordError::Exists);
        }
        let reg = StatusWordReg { cfg, page };
        if let Some((&addr, _)) = self
            .regs
            .range(cfg.status_addr.min(cfg.ack_addr).saturating_sub(7)..)
            .find(|(&a, list)| list.iter().any(|r| reg.overlaps(a, u64::from(r.len))))
        {
            return Err(StatusWordError::IoeventfdConflict(addr));
        }
        self.status_word = Some(reg);
        Ok(())
    }

    /// Removes the status word if it is `page`.
    pub(crate) fn unregister_status_word(
        &mut self,
        page: &Arc<StatusPage>,
    ) -> Result<(), StatusWordError> {
        match &self.status_word {
            Some(r) if Arc::ptr_eq(&r.page, page) => {
                self.status_word = None;
                Ok(())
            }
            _ => Err(StatusWordError::NotFound),
        }
    }

    /// The status word, if registered.
    pub(crate) fn status_word(&self) -> Option<&StatusWordReg> {
        self.status_word.as_ref()
    }

    /// Number of registrations.
    pub(crate) fn len(&self) -> usize {
        self.regs.values().map(Vec::len).sum()
    }

    /// Drops every registration and refuses new ones.
    pub(crate) fn close(&mut self) {
        self.closed = true;
        self.regs.clear();
        self.status_word = None;
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn efd() -> Arc<EventFd> {
        Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"))
    }

    fn cfg(fd: &Arc<EventFd>, addr: u64, len: u32, datamatch: Option<u64>) -> IoeventfdConfig {
        IoeventfdConfig {
            fd: fd.clone(),
            addr,
            len,
            datamatch,
            deassign: false,
        }
    }

    fn deassign(mut c: IoeventfdConfig) -> IoeventfdConfig {
        c.deassign = true;
        c
    }

    #[test]
    fn invalid_lengths_overflow_and_datamatch_are_einval() {
        let fd = efd();
        let mut t = IoeventfdTable::default();
        for len in [3, 5, 16] {
            let e = t.configure(&cfg(&fd, 0, len, None)).unwrap_err();
            assert_eq!(e, IoeventfdError::InvalidLength(len));
            assert_eq!(e.errno(), libc::EINVAL);
        }
        assert_eq!(
            t.configure(&cfg(&fd, u64::MAX - 2, 4, None)),
            Err(IoeventfdError::Overflow {
                addr: u64::MAX - 2,
                len: 4
            })
        );
        assert_eq!(
            t.configure(&cfg(&fd, 0, 0, Some(1))),
            Err(IoeventfdError::InvalidDatamatch { len: 0, data: 1 })
        );
        assert_eq!(
            t.configure(&cfg(&fd, 0, 1, Some(0x100))),
            Err(IoeventfdError::InvalidDatamatch {
                len: 1,
                data: 0x100
            })
        );
    }

    #[test]
    fn conflicts_follow_kvm_rules() {
        let (a, b) = (efd(), efd());
        let mut t = IoeventfdTable::default();
        t.configure(&cfg(&a, 0x50, 4, Some(0))).unwrap();
        t.configure(&cfg(&b, 0x50, 4, Some(1))).unwrap();
        // Same datamatch, even with another eventfd.
        assert_eq!(
            t.configure(&cfg(&b, 0x50, 4, Some(0))),
            Err(IoeventfdError::Exists(0x50))
        );
        // A wildcard of the same length overlaps any datamatch.
        assert_eq!(
            t.configure(&cfg(&b, 0x50, 4, None)),
            Err(IoeventfdError::Exists(0x50))
        );
        // Length 0 conflicts with anything at the address.
        assert_eq!(
            t.configure(&cfg(&b, 0x50, 0, None)),
            Err(IoeventfdError::Exists(0x50))
        );
        // Another length at the same address does not.
        t.configure(&cfg(&b, 0x50, 2, None)).unwrap();
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn deassign_does_not_reassign() {
        let fd = efd();
        let mut t = IoeventfdTable::default();
        let c = cfg(&fd, 0x50, 4, Some(2));
        t.configure(&c).unwrap();
        t.configure(&deassign(c.clone())).unwrap();
        assert_eq!(t.len(), 0);
        assert!(!t.on_write(0x50, 4, 2));
        // A second deassign finds nothing: the first did not re-add it.
        assert_eq!(
            t.configure(&deassign(c)),
            Err(IoeventfdError::NotFound(0x50))
        );
    }

    #[test]
    fn deassign_removes_exactly_the_matching_registration() {
        let (a, b) = (efd(), efd());
        let mut t = IoeventfdTable::default();
        t.configure(&cfg(&a, 0x50, 4, Some(0))).unwrap();
        t.configure(&cfg(&a, 0x50, 4, Some(1))).unwrap();
        // Wrong eventfd, wrong data, wrong length: ENOENT, nothing removed.
        assert_eq!(
            t.configure(&deassign(cfg(&b, 0x50, 4, Some(0)))),
            Err(IoeventfdError::NotFound(0x50))
        );
        assert_eq!(
            t.configure(&deassign(cfg(&a, 0x50, 4, Some(2)))),
            Err(IoeventfdError::NotFound(0x50))
        );
        assert_eq!(
            t.configure(&deassign(cfg(&a, 0x50, 2, Some(0)))),
            Err(IoeventfdError::NotFound(0x50))
        );
        t.configure(&deassign(cfg(&a, 0x50, 4, Some(0)))).unwrap();
        assert!(!t.on_write(0x50, 4, 0));
        assert!(t.on_write(0x50, 4, 1));
    }

    #[test]
    fn write_matching_masks_value_to_access_width() {
        let fd = efd();
        let mut t = IoeventfdTable::default();
        t.configure(&cfg(&fd, 0x50, 2, Some(0x1234))).unwrap();
        assert!(t.on_write(0x50, 2, 0xffff_1234));
        assert_eq!(fd.read().unwrap(), 1);
        assert!(!t.on_write(0x50, 4, 0x1234), "width must equal the length");
        assert!(!t.on_write(0x50, 2, 0x1235));
        assert!(!t.on_write(0x51, 2, 0x1234));
    }

    #[test]
    fn length_zero_matches_any_width_at_the_address() {
        let fd = efd();
        let mut t = IoeventfdTable::default();
        t.configure(&cfg(&fd, 0x50, 0, None)).unwrap();
        for w in [1, 2, 4, 8] {
            assert!(t.on_write(0x50, w, 7));
        }
        assert_eq!(fd.read().unwrap(), 4);
    }

    #[test]
    fn reads_inside_a_notify_range_are_covered() {
        let fd = efd();
        let mut t = IoeventfdTable::default();
        t.configure(&cfg(&fd, 0x50, 4, Some(0))).unwrap();
        assert!(t.covers_read(0x50, 4));
        assert!(t.covers_read(0x52, 1));
        assert!(t.covers_read(0x4c, 8));
        assert!(!t.covers_read(0x54, 4));
        assert!(!t.covers_read(0x4c, 4));
    }

    #[test]
    fn duplicated_descriptor_is_the_same_file_when_kcmp_works() {
        let a = EventFd::new(EFD_NONBLOCK).unwrap();
        let dup = a.try_clone().unwrap();
        let other = EventFd::new(EFD_NONBLOCK).unwrap();
        assert!(same_file(&a, &a));
        assert!(!same_file(&a, &other));
        let pid = libc::c_long::from(libc::pid_t::try_from(std::process::id()).unwrap());
        // SAFETY: kcmp compares two fds of this process; no memory is passed.
        let kcmp_works = unsafe {
            libc::syscall(
                libc::SYS_kcmp,
                pid,
                pid,
                KCMP_FILE,
                libc::c_long::from(a.as_raw_fd()),
                libc::c_long::from(a.as_raw_fd()),
            )
        } == 0;
        // Without kcmp, the documented fallback is fd-number equality.
        assert_eq!(same_file(&a, &dup), kcmp_works);
    }

    #[test]
    fn deassign_with_a_received_duplicate_fd_finds_the_registration() {
        let fd = efd();
        let dup = Arc::new(fd.try_clone().unwrap());
        if !same_file(&fd, &dup) {
            // kcmp unavailable here: covered by the test above.
            return;
        }
        let mut t = IoeventfdTable::default();
        t.configure(&cfg(&fd, 0x50, 4, None)).unwrap();
        t.configure(&deassign(cfg(&dup, 0x50, 4, None))).unwrap();
        assert_eq!(t.len(), 0);
    }
}
