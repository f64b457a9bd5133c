//! The MPQEMU remote: serves the proxy device's config space and turns each BAR access into
//! one trapped access on the Remote I/O device whose window it hits.

use std::os::fd::{AsFd, OwnedFd};

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pci::{ConfigSpace, PciError, WINDOW_SIZE};
use super::ram::RamIdentity;
use super::wire::{Channel, Request, SysmemRegion, WireError};

/// The error a target returns for an access it could not perform.
pub type TargetError = Box<dyn std::error::Error + Send + Sync>;

/// Where trapped accesses go: the frontend side of the hypervisor model. `addr` is the
/// frontend-physical address of the Remote I/O register (window base + offset); `width` is 1,
/// 2, 4 or 8. Both calls block until the backend completes the access.
pub trait MmioTarget: Send + Sync {
    /// A trapped read.
    fn read(&self, addr: u64, width: u8) -> Result<u64, TargetError>;
    /// A trapped write.
    fn write(&self, addr: u64, width: u8, value: u64) -> Result<(), TargetError>;
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The window list does not fit the PCI contract.
    #[error("config space: {0}")]
    Pci(#[from] PciError),
    /// The socket failed or the stream cannot be trusted any more.
    #[error("MPQEMU socket: {0}")]
    Wire(#[from] WireError),
}

/// Counters of the remote, readable while it runs.
#[derive(Debug, Default)]
pub struct RemoteStats {
    /// BAR reads served.
    pub bar_reads: AtomicU64,
    /// BAR writes served.
    pub bar_writes: AtomicU64,
    /// Nanoseconds spent serving BAR accesses (message received to reply sent).
    pub bar_nanos: AtomicU64,
    /// Config-space accesses.
    pub cfg_accesses: AtomicU64,
    /// SYNC_SYSMEM messages.
    pub sysmem_syncs: AtomicU64,
    /// Accesses that failed (bad window, bad width, target error, malformed message).
    pub errors: AtomicU64,
    /// Times a window's device model was found stuck: an access to it took the whole access
    /// timeout ([`Remote::with_access_timeout`]).
    pub stalls: AtomicU64,
    /// Accesses to a stuck window answered at once (a read all ones, a write dropped) instead
    /// of waiting for its device model.
    pub stuck_refused: AtomicU64,
}

impl RemoteStats {
    /// BAR accesses so far and their mean service time in nanoseconds.
    pub fn bar_summary(&self) -> (u64, u64) {
        let n = self.bar_reads.load(Ordering::Relaxed) + self.bar_writes.load(Ordering::Relaxed);
        let ns = self.bar_nanos.load(Ordering::Relaxed);
        (n, ns.checked_div(n).unwrap_or(0))
    }
}

/// The value a failed read returns: all ones of the access width, like a PCI master abort.
pub fn all_ones(width: u32) -> u64 {
    match width {
        1..=7 => (1u64 << (8 * width)) - 1,
        _ => u64::MAX,
    }
}

/// Where a BAR access lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Window (Remote I/O device) index.
    pub window: usize,
    /// Frontend address of the register: window base + offset in the window.
    pub addr: u64,
    /// Width in bytes.
    pub width: u8,
}

/// One access on `target`: a write of `value` if given, else a read (a write's result is 0).
fn perform(target: &dyn MmioTarget, d: Decoded, value: Option<u64>) -> Result<u64, TargetError> {
    match value {
        Some(v) => target.write(d.addr, d.width, v).map(|()| 0),
        None => target.read(d.addr, d.width),
    }
}

/// Checks that every region backed by the RAM file maps it identically (guest-physical address
/// = file offset), which is what the hypervisor model and the device models assume with the
/// shared memory at guest-physical 0. QEMU splits RAM around the legacy BIOS area, so several
/// regions of the same file are normal. Returns whether the layout is as expected.
pub fn check_ram_layout(ram: &RamIdentity, regions: &[SysmemRegion], fds: &[OwnedFd]) -> bool {
    let mut covered = 0u64;
    let mut ok = true;
    for (r, fd) in regions.iter().zip(fds) {
        if !ram.is_same_file(fd.as_fd()) {
            continue;
        }
        covered = covered.saturating_add(r.size);
        let identity = u64::try_from(r.offset).is_ok_and(|o| o == r.gpa);
        let inside = r.gpa.checked_add(r.size).is_some_and(|end| end <= ram.size);
        if !identity || !inside {
            log::error!(
                "qemu remote: guest RAM region gpa {:#x} size {:#x} is at file offset {:#x}:                  the devices' shared memory would not match the guest's RAM",
                r.gpa,
                r.size,
                r.offset
            );
            ok = false;
        }
    }
    if covered == 0 && !regions.is_empty() {
        log::warn!("qemu remote: QEMU's memory layout does not include the shared RAM file");
        ok = false;
    } else if ok {
        log::debug!("qemu remote: guest RAM is the shared memory ({covered:#x} bytes mapped 1:1)");
    }
    ok
}

/// Whether a window's device model is stuck; see [`Remote::with_access_timeout`].
#[derive(Debug, Default)]
struct Stall {
    /// An access took the whole access timeout, and no access has completed in time since.
    stuck: AtomicBool,
    /// A probe (a guest access on its own thread) runs.
    probing: AtomicBool,
    /// The window's device failed over ([`StallGuards::exempt`]): its target answers at once
    /// from now on, and the window is never held stuck again.
    exempt: AtomicBool,
}

/// Lets the bridge exempt a window from being held stuck ([`Remote::with_access_timeout`]).
#[derive(Clone, Debug)]
pub struct StallGuards(Vec<Arc<Stall>>);

impl StallGuards {
    /// Window `i`'s device failed over: its accesses answer at once from now on, and each
    /// must reach the failover (a read answered by the stuck path instead could be the
    /// InterruptStatus read that completes the guest's failed requests).
    pub fn exempt(&self, i: usize) {
        if let Some(s) = self.0.get(i) {
            s.exempt.store(true, Ordering::Release);
            s.stuck.store(false, Ordering::Release);
        }
    }
}

/// The remote's state: config space, window bases and the last memory layout.
pub struct Remote {
    cfg: ConfigSpace,
    windows: Vec<u64>,
    target: Arc<dyn MmioTarget>,
    /// See [`Remote::with_access_timeout`].
    access_timeout: Option<Duration>,
    /// Per window.
    stalls: Vec<Arc<Stall>>,
    ram: Option<RamIdentity>,
    sysmem_fds: Vec<OwnedFd>,
    last_layout: Vec<SysmemRegion>,
    stats: Arc<RemoteStats>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("windows", &self.windows)
            .field("bar0_base", &self.cfg.bar0_base())
            .finish_non_exhaustive()
    }
}

impl Remote {
    /// A remote serving `windows.len()` register windows; window `i` forwards to the
    /// Remote I/O device whose MMIO window starts at `windows[i]`. When `ram` is given, each
    /// SYNC_SYSMEM is checked to map that file at guest-physical 0.
    pub fn new(
        windows: Vec<u64>,
        target: Arc<dyn MmioTarget>,
        ram: Option<RamIdentity>,
    ) -> Result<Self, RemoteError> {
        Ok(Self {
            cfg: ConfigSpace::new(windows.len())?,
            stalls: windows.iter().map(|_| Arc::default()).collect(),
            access_timeout: None,
            windows,
            target,
            ram,
            sysmem_fds: Vec::new(),
            last_layout: Vec::new(),
            stats: Arc::new(RemoteStats::default()),
        })
    }

    /// Stops waiting for a device model found stuck: `timeout` is the hypervisor's access
    /// timeout (`None`, the default: always wait, as before).
    ///
    /// QEMU's `x-pci-proxy-dev` sends every BAR access of the proxy device over this one socket
    /// and waits for each answer (and the guest has one vCPU), so while an access waits for one
    /// window's device model, no other window is served. The hypervisor bounds each access by
    /// its timeout; with this set, a window whose access took that long is *stuck*, and from
    /// then on its accesses are answered at once as a timed-out access is, a read with
    /// [`remio_hyp::TIMEOUT_READ_VALUE`] and a write dropped (the stopped device model never
    /// sees them), so a stuck device model
    /// delays the others once, by at most the timeout, not once per access. While stuck, each
    /// access is also handed to a thread of its own as a probe (at most one at a time per
    /// window): one that completes within the timeout means the device model answers again,
    /// and the window is served as before.
    #[must_use]
    pub fn with_access_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.access_timeout = timeout;
        self
    }

    /// A handle to exempt windows from being held stuck (see [`StallGuards::exempt`]).
    pub fn stall_guards(&self) -> StallGuards {
        StallGuards(self.stalls.clone())
    }

    /// Whether window `i`'s device model is stuck (see [`Remote::with_access_timeout`]).
    pub fn is_stuck(&self, i: usize) -> bool {
        self.stalls
            .get(i)
            .is_some_and(|s| s.stuck.load(Ordering::Acquire))
    }

    /// Performs `d` (a write of `value` if given, else a read) on the target, unless its window
    /// is stuck: then `None`, at once (see [`Remote::with_access_timeout`]).
    fn access(&self, d: Decoded, value: Option<u64>) -> Option<Result<u64, TargetError>> {
        let Some((limit, stall)) = self
            .access_timeout
            .zip(self.stalls.get(d.window))
            .filter(|(_, s)| !s.exempt.load(Ordering::Acquire))
        else {
            return Some(perform(&*self.target, d, value));
        };
        if stall.stuck.load(Ordering::Acquire) {
            self.stats.stuck_refused.fetch_add(1, Ordering::Relaxed);
            if !stall.probing.swap(true, Ordering::AcqRel) {
                let (target, stall2) = (Arc::clone(&self.target), Arc::clone(stall));
                let probe = std::thread::Builder::new()
                    .name("remio-mpqemu-probe".into())
                    .spawn(move || {
                        let start = Instant::now();
                        let r = perform(&*target, d, value);
                        if r.is_ok() && start.elapsed() < limit {
                            log::info!("qemu remote: window {} answers again", d.window);
                            stall2.stuck.store(false, Ordering::Release);
                        }
                        stall2.probing.store(false, Ordering::Release);
                    });
                if let Err(e) = probe {
                    remio_ratelimit::warn_rl!("qemu remote: cannot start a probe: {e}");
                    stall.probing.store(false, Ordering::Release);
                }
            }
            return None;
        }
        let start = Instant::now();
        let r = perform(&*self.target, d, value);
        if start.elapsed() >= limit
            && !stall.exempt.load(Ordering::Acquire)
            && !stall.stuck.swap(true, Ordering::AcqRel)
        {
            self.stats.stalls.fetch_add(1, Ordering::Relaxed);
            remio_ratelimit::warn_rl!(
                "qemu remote: window {}'s device model did not answer within {limit:?}: \
                 its accesses fail at once until it answers again",
                d.window
            );
        }
        Some(r)
    }

    /// The counters.
    pub fn stats(&self) -> Arc<RemoteStats> {
        Arc::clone(&self.stats)
    }

    /// The config space (for inspection).
    pub fn config(&self) -> &ConfigSpace {
        &self.cfg
    }

    /// Maps an absolute BAR address to a window register; `None` when it is outside every
    /// window, the width is not 1/2/4/8, or the access crosses the window's end.
    pub fn decode_bar(&self, addr: u64, size: u32) -> Option<Decoded> {
        if !matches!(size, 1 | 2 | 4 | 8) {
            return None;
        }
        let bar_size = self.cfg.bar_size();
        let base = self.cfg.bar0_base();
        // QEMU sends the absolute address; BAR0 is naturally aligned, so the offset is also
        // the low bits. Prefer the programmed base; fall back to the low bits if our copy and
        // QEMU's shadow ever disagree.
        let offset = match addr.checked_sub(base) {
            Some(off) if off < bar_size => off,
            _ => addr & (bar_size - 1),
        };
        let window = usize::try_from(offset / WINDOW_SIZE).ok()?;
        let in_window = offset % WINDOW_SIZE;
        if in_window + u64::from(size) > WINDOW_SIZE {
            return None;
        }
        let wbase = *self.windows.get(window)?;
        Some(Decoded {
            window,
            addr: wbase.checked_add(in_window)?,
            width: u8::try_from(size).ok()?,
        })
    }

    fn bad(&mut self, what: std::fmt::Arguments<'_>) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        remio_ratelimit::warn_rl!("qemu remote: {what}");
    }

    /// Handles one request; returns the reply value when QEMU waits for one.
    pub fn handle(&mut self, req: Request, fds: Vec<OwnedFd>) -> Option<u64> {
        let needs_reply = req.needs_reply();
        let value = match req {
            Request::BarRead { addr, size, .. } => {
                self.stats.bar_reads.fetch_add(1, Ordering::Relaxed);
                match self.decode_bar(addr, size) {
                    Some(d) => match self.access(d, None) {
                        Some(Ok(v)) => v,
                        Some(Err(e)) => {
                            self.bad(format_args!("read {:#x}/{}: {e}", d.addr, d.width));
                            all_ones(size)
                        }
                        // Stuck: what a timed-out access reads, so the guest sees one
                        // value for "no answer" whichever layer gave up.
                        None => remio_hyp::TIMEOUT_READ_VALUE,
                    },
                    None => {
                        self.bad(format_args!("read outside the windows: {addr:#x}/{size}"));
                        all_ones(size)
                    }
                }
            }
            Request::BarWrite {
                addr, val, size, ..
            } => {
                self.stats.bar_writes.fetch_add(1, Ordering::Relaxed);
                match self.decode_bar(addr, size) {
                    Some(d) => {
                        if let Some(Err(e)) = self.access(d, Some(val)) {
                            self.bad(format_args!("write {:#x}/{}: {e}", d.addr, d.width));
                        }
                    }
                    None => self.bad(format_args!(
                        "write outside the windows: {addr:#x}/{size} = {val:#x}"
                    )),
                }
                0
            }
            Request::CfgRead { addr, len } => {
                self.stats.cfg_accesses.fetch_add(1, Ordering::Relaxed);
                match self.cfg.read(addr, len) {
                    Some(v) => u64::from(v),
                    None => {
                        self.bad(format_args!("config read {addr:#x}/{len}"));
                        u64::from(u32::MAX)
                    }
                }
            }
            Request::CfgWrite { addr, val, len } => {
                self.stats.cfg_accesses.fetch_add(1, Ordering::Relaxed);
                let before = (self.cfg.bar0_base(), self.cfg.memory_enabled());
                if !self.cfg.write(addr, val, len) {
                    self.bad(format_args!("config write {addr:#x}/{len} = {val:#x}"));
                }
                let after = (self.cfg.bar0_base(), self.cfg.memory_enabled());
                if before != after && after.1 {
                    log::debug!("qemu remote: BAR0 at {:#x}, memory decoding on", after.0);
                }
                0
            }
            Request::SyncSysmem(regions) => {
                self.sync_sysmem(&regions, fds);
                0
            }
            Request::SetIrqfd => {
                // The proxy's INTx eventfds: unused (INTx needs KVM); dropping `fds` closes them.
                log::debug!(
                    "qemu remote: SET_IRQFD with {} fds (INTx unused)",
                    fds.len()
                );
                0
            }
            Request::DeviceReset => {
                log::debug!("qemu remote: device reset");
                self.cfg.reset();
                0
            }
            Request::Malformed { cmd, reason } => {
                self.bad(format_args!("malformed message cmd {cmd}: {reason}"));
                u64::MAX
            }
        };
        needs_reply.then_some(value)
    }

    fn sync_sysmem(&mut self, regions: &[SysmemRegion], fds: Vec<OwnedFd>) {
        self.stats.sysmem_syncs.fetch_add(1, Ordering::Relaxed);
        let used: Vec<SysmemRegion> = regions.iter().copied().take(fds.len()).collect();
        if used != self.last_layout {
            for (i, r) in used.iter().enumerate() {
                log::debug!(
                    "qemu remote: sysmem region {i}: gpa {:#x} size {:#x} offset {:#x}",
                    r.gpa,
                    r.size,
                    r.offset
                );
            }
            if let Some(ram) = &self.ram {
                check_ram_layout(ram, &used, &fds);
            }
            self.last_layout = used;
        }
        // Replacing the old descriptors closes them.
        self.sysmem_fds = fds;
    }

    /// Serves `sock` until QEMU closes it. Returns `Ok` on a clean close.
    pub fn serve(mut self, sock: UnixStream) -> Result<(), RemoteError> {
        let mut ch = Channel::new(sock);
        loop {
            let (header, payload, fds) = match ch.recv() {
                Ok(m) => m,
                Err(WireError::Closed) => {
                    log::info!("qemu remote: QEMU closed the proxy socket");
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            };
            let start = Instant::now();
            let req = Request::decode(header.cmd, payload);
            let is_bar = matches!(req, Request::BarRead { .. } | Request::BarWrite { .. });
            if let Some(v) = self.handle(req, fds) {
                ch.reply(v)?;
            }
            if is_bar {
                let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
                self.stats.bar_nanos.fetch_add(ns, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::Mutex;
    use std::time::Duration;

    use super::super::wire::{self, Header};
    use super::*;

    /// A register file that records every access.
    #[derive(Default)]
    struct Recorder {
        log: Mutex<Vec<(char, u64, u8, u64)>>,
        fail: bool,
    }

    impl MmioTarget for Recorder {
        fn read(&self, addr: u64, width: u8) -> Result<u64, TargetError> {
            self.log.lock().unwrap().push(('r', addr, width, 0));
            if self.fail {
                return Err("backend gone".into());
            }
            Ok(addr ^ 0xabcd)
        }
        fn write(&self, addr: u64, width: u8, value: u64) -> Result<(), TargetError> {
            self.log.lock().unwrap().push(('w', addr, width, value));
            Ok(())
        }
    }

    fn remote(windows: usize) -> (Remote, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        let bases = (0..windows as u64)
            .map(|i| 0x1000_0000 + i * 0x1000)
            .collect();
        (Remote::new(bases, rec.clone(), None).unwrap(), rec)
    }

    fn program_bar(r: &mut Remote, base: u32) {
        r.handle(
            Request::CfgWrite {
                addr: 0x10,
                val: base,
                len: 4,
            },
            vec![],
        );
        r.handle(
            Request::CfgWrite {
                addr: 4,
                val: 2,
                len: 2,
            },
            vec![],
        );
    }

    #[test]
    fn bar_access_goes_to_the_window_device_at_the_same_offset() {
        let (mut r, rec) = remote(3);
        program_bar(&mut r, 0xfe00_0000);
        let v = r.handle(
            Request::BarRead {
                addr: 0xfe00_0270,
                size: 4,
                memory: true,
            },
            vec![],
        );
        r.handle(
            Request::BarWrite {
                addr: 0xfe00_0450,
                val: 9,
                size: 2,
                memory: true,
            },
            vec![],
        );
        assert_eq!(v, Some(0x1000_1070 ^ 0xabcd));
        assert_eq!(
            *rec.log.lock().unwrap(),
            vec![('r', 0x1000_1070, 4, 0), ('w', 0x1000_2050, 2, 9)]
        );
    }

    #[test]
    fn access_past_the_last_window_reads_all_ones_without_reaching_the_target() {
        let (mut r, rec) = remote(1);
        program_bar(&mut r, 0xfe00_0000);
        let v = r.handle(
            Request::BarRead {
                addr: 0xfe00_0200,
                size: 2,
                memory: true,
            },
            vec![],
        );
        assert_eq!(v, Some(0xffff));
        assert!(rec.log.lock().unwrap().is_empty());
        assert_eq!(r.stats().errors.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn access_crossing_a_window_end_or_with_odd_width_is_refused() {
        let (mut r, rec) = remote(2);
        program_bar(&mut r, 0xfe00_0000);
        assert_eq!(r.decode_bar(0xfe00_01fe, 4), None);
        assert_eq!(r.decode_bar(0xfe00_0000, 3), None);
        r.handle(
            Request::BarWrite {
                addr: 0xfe00_01fc,
                val: 1,
                size: 8,
                memory: true,
            },
            vec![],
        );
        assert!(rec.log.lock().unwrap().is_empty());
    }

    #[test]
    fn target_error_on_read_replies_all_ones() {
        let rec = Arc::new(Recorder {
            fail: true,
            ..Recorder::default()
        });
        let mut r = Remote::new(vec![0x1000], rec, None).unwrap();
        let v = r.handle(
            Request::BarRead {
                addr: 0,
                size: 4,
                memory: true,
            },
            vec![],
        );
        assert_eq!(v, Some(0xffff_ffff));
    }

    #[test]
    fn malformed_and_unknown_messages_get_an_error_reply() {
        let (mut r, _) = remote(1);
        assert_eq!(r.handle(Request::decode(42, &[]), vec![]), Some(u64::MAX));
        assert_eq!(
            r.handle(Request::decode(wire::CMD_BAR_READ, &[0; 4]), vec![]),
            Some(u64::MAX)
        );
    }

    #[test]
    fn sysmem_and_irqfd_get_no_reply_and_reset_does() {
        let (mut r, _) = remote(1);
        assert_eq!(r.handle(Request::SetIrqfd, vec![]), None);
        assert_eq!(r.handle(Request::SyncSysmem(vec![]), vec![]), None);
        program_bar(&mut r, 0xfe00_0000);
        assert_eq!(r.handle(Request::DeviceReset, vec![]), Some(0));
        assert_eq!(r.config().bar0_base(), 0);
    }

    #[test]
    fn ram_split_around_the_bios_hole_is_accepted_but_a_shifted_mapping_is_not() {
        let ram = super::super::GuestRam::new(4 << 20).unwrap();
        let id = ram.identity().unwrap();
        let fd = || OwnedFd::from(ram.file().try_clone().unwrap());
        let region = |gpa, size, offset| SysmemRegion { gpa, size, offset };
        let split = [region(0, 0xf0000, 0), region(0x100000, 0x300000, 0x100000)];
        assert!(check_ram_layout(&id, &split, &[fd(), fd()]));
        let shifted = [region(0x1000, 0x1000, 0)];
        assert!(!check_ram_layout(&id, &shifted, &[fd()]));
        let other = super::super::GuestRam::new(2 << 20).unwrap();
        let foreign = OwnedFd::from(other.file().try_clone().unwrap());
        assert!(!check_ram_layout(&id, &[region(0, 0x1000, 0)], &[foreign]));
    }

    /// Window 1's device model does not answer while `stuck` is set: an access to it waits
    /// as the hypervisor's does, until the timeout has passed, then completes with 0.
    struct Stoppable {
        stuck: Mutex<bool>,
        cv: std::sync::Condvar,
        timeout: Duration,
        calls: [AtomicU64; 2],
    }

    impl MmioTarget for Stoppable {
        fn read(&self, addr: u64, _width: u8) -> Result<u64, TargetError> {
            let w = usize::from(addr >= 0x1000_1000);
            self.calls[w].fetch_add(1, Ordering::SeqCst);
            if w == 0 {
                return Ok(0xb);
            }
            let deadline = Instant::now() + self.timeout;
            let mut stuck = self.stuck.lock().unwrap();
            while *stuck {
                let now = Instant::now();
                if now >= deadline {
                    return Ok(0);
                }
                stuck = self.cv.wait_timeout(stuck, deadline - now).unwrap().0;
            }
            Ok(0xa)
        }
        fn write(&self, addr: u64, width: u8, _value: u64) -> Result<(), TargetError> {
            self.read(addr, width).map(|_| ())
        }
    }

    fn bar_read(r: &mut Remote, window: u64) -> u64 {
        let addr = 0xfe00_0000 + window * WINDOW_SIZE + 0x70;
        r.handle(
            Request::BarRead {
                addr,
                size: 4,
                memory: true,
            },
            vec![],
        )
        .unwrap()
    }

    #[test]
    fn a_stuck_device_model_costs_other_windows_one_timeout_then_fails_at_once_until_it_answers() {
        let timeout = Duration::from_millis(20);
        let dm = Arc::new(Stoppable {
            stuck: Mutex::new(true),
            cv: std::sync::Condvar::new(),
            timeout,
            calls: [AtomicU64::new(0), AtomicU64::new(0)],
        });
        let mut r = Remote::new(vec![0x1000_0000, 0x1000_1000], dm.clone(), None)
            .unwrap()
            .with_access_timeout(Some(timeout));
        program_bar(&mut r, 0xfe00_0000);

        // The first access waits the whole timeout (the hypervisor's value): window 1 is stuck.
        assert_eq!(bar_read(&mut r, 1), 0);
        assert!(r.is_stuck(1));
        // Then its accesses are answered at once, the other window's as usual.
        for _ in 0..10 {
            assert_eq!(bar_read(&mut r, 1), remio_hyp::TIMEOUT_READ_VALUE);
            assert_eq!(bar_read(&mut r, 0), 0xb);
        }
        let stats = r.stats();
        assert_eq!(stats.stalls.load(Ordering::Relaxed), 1);
        assert_eq!(stats.stuck_refused.load(Ordering::Relaxed), 10);
        // Only the first access and probes (one at a time) reached the device model.
        assert!(dm.calls[1].load(Ordering::SeqCst) <= 11);
        assert_eq!(dm.calls[0].load(Ordering::SeqCst), 10);

        // It answers again: a probe finds out, and the window is served as before.
        *dm.stuck.lock().unwrap() = false;
        dm.cv.notify_all();
        let end = Instant::now() + Duration::from_secs(20);
        while r.is_stuck(1) && Instant::now() < end {
            bar_read(&mut r, 1);
            std::thread::yield_now();
        }
        assert!(!r.is_stuck(1));
        assert_eq!(bar_read(&mut r, 1), 0xa);
    }

    #[test]
    fn a_failed_over_window_is_never_held_stuck_so_every_read_reaches_the_failover() {
        let timeout = Duration::from_millis(20);
        let dm = Arc::new(Stoppable {
            stuck: Mutex::new(true),
            cv: std::sync::Condvar::new(),
            timeout,
            calls: [AtomicU64::new(0), AtomicU64::new(0)],
        });
        let mut r = Remote::new(vec![0x1000_0000, 0x1000_1000], dm.clone(), None)
            .unwrap()
            .with_access_timeout(Some(timeout));
        program_bar(&mut r, 0xfe00_0000);
        assert_eq!(bar_read(&mut r, 1), 0);
        assert!(r.is_stuck(1));

        // The device fails over: its target now answers at once (here: the DM is back), and
        // the very next read must get that answer, not the stuck path's.
        r.stall_guards().exempt(1);
        *dm.stuck.lock().unwrap() = false;
        dm.cv.notify_all();
        assert!(!r.is_stuck(1));
        assert_eq!(bar_read(&mut r, 1), 0xa);
        // A slow answer no longer makes it stuck.
        *dm.stuck.lock().unwrap() = true;
        assert_eq!(bar_read(&mut r, 1), 0);
        assert!(!r.is_stuck(1));
    }

    #[test]
    fn without_an_access_timeout_every_access_waits_for_its_device_model() {
        let dm = Arc::new(Stoppable {
            stuck: Mutex::new(true),
            cv: std::sync::Condvar::new(),
            timeout: Duration::from_millis(5),
            calls: [AtomicU64::new(0), AtomicU64::new(0)],
        });
        let mut r = Remote::new(vec![0x1000_0000, 0x1000_1000], dm.clone(), None).unwrap();
        program_bar(&mut r, 0xfe00_0000);

        for _ in 0..3 {
            assert_eq!(bar_read(&mut r, 1), 0);
        }

        assert!(!r.is_stuck(1));
        assert_eq!(dm.calls[1].load(Ordering::SeqCst), 3);
    }

    fn send(sock: &mut UnixStream, cmd: i32, payload: &[u8]) {
        let size = payload.len() as u64;
        sock.write_all(&Header { cmd, size }.encode()).unwrap();
        sock.write_all(payload).unwrap();
    }

    fn recv_ret(sock: &mut UnixStream) -> u64 {
        let mut b = [0u8; 24];
        sock.read_exact(&mut b).unwrap();
        assert_eq!(
            Header::decode(b[..16].try_into().unwrap()),
            Header { cmd: 1, size: 8 }
        );
        u64::from_ne_bytes(b[16..].try_into().unwrap())
    }

    #[test]
    fn serve_answers_exactly_the_messages_that_need_a_reply_over_a_socket() {
        let (r, rec) = remote(2);
        let (ours, mut qemu) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || r.serve(ours));
        // Vendor id, then a SYNC_SYSMEM (no reply), then a BAR read in window 1.
        let mut cfg = 0u32.to_ne_bytes().to_vec();
        cfg.extend_from_slice(&0u32.to_ne_bytes());
        cfg.extend_from_slice(&2i32.to_ne_bytes());
        send(&mut qemu, wire::CMD_PCI_CFGREAD, &cfg);
        assert_eq!(recv_ret(&mut qemu), 0x1b36);
        send(&mut qemu, wire::CMD_SYNC_SYSMEM, &[0u8; 192]);
        let mut bar = 0x0000_0204u64.to_ne_bytes().to_vec();
        bar.extend_from_slice(&0u64.to_ne_bytes());
        bar.extend_from_slice(&4u32.to_ne_bytes());
        bar.extend_from_slice(&[1, 0, 0, 0]);
        send(&mut qemu, wire::CMD_BAR_READ, &bar);
        assert_eq!(recv_ret(&mut qemu), 0x1000_1004 ^ 0xabcd);
        drop(qemu);
        t.join().unwrap().unwrap();
        assert_eq!(rec.log.lock().unwrap().len(), 1);
    }
}
