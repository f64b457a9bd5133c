//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2), as a pure register file.
//!
//! [`MmioTransport::read`] and [`MmioTransport::write`] take an offset inside the device's
//! MMIO window and an access width; they never fail and never panic, whatever the driver
//! does: a bad access is logged (rate limited) and ignored, reads returning 0. The transport
//! owns the status state machine ([`VALID_TRANSITIONS`]), feature negotiation and queue
//! setup; at DRIVER_OK it activates the device and re-kicks every queue so that a notify that
//! raced activation is not lost.
//!
//! The device's eventfds (one per queue, and the irqfd) live as long as the transport and are
//! registered once, through a [`NotifyRegistrar`] (the runner's is backed by the
//! `DmSession`): by [`MmioTransport::register_notifiers`] at setup, or at the first DRIVER_OK.
//! A reset keeps them registered and the next activation reuses them. That is what the posted
//! C driver needs: its IOEVENTFD with DEASSIGN deassigns and then assigns the same eventfd
//! again, so a device model that deassigned at reset and registered new eventfds at the next
//! DRIVER_OK would leave the old, closed-on-our-side eventfd first in the driver's list, taking
//! every QueueNotify from then on (`spec/remote-io.md`, defects).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::device::{ActivateContext, EventLoop, Interrupt, SharedStatus, VirtioDevice, Worker};
use crate::failover::MmioFailover;
use crate::persist::{Found, PersistError, QueueState, StateRegion, TransportState, Unusable};
use remio_ratelimit::warn_rl;

/// MagicValue: "virt" in little endian (virtio 1.2 §4.2.2).
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// Version of the modern (non-legacy) virtio-mmio interface (virtio 1.2 §4.2.2).
pub const MMIO_VERSION: u32 = 2;
/// VendorID we report ("RIO\0" would do; 0 like Firecracker: drivers ignore it).
pub const MMIO_VENDOR_ID: u32 = 0;
/// QueueReset register (virtio 1.2 §4.2.2; not in virtio-bindings 0.2.7). We do not offer
/// VIRTIO_F_RING_RESET, so it is treated as an unknown register.
pub const VIRTIO_MMIO_QUEUE_RESET: u32 = 0x0c0;
/// Size of the MMIO window bao-virtio-dm and Linux device trees use per device.
pub const MMIO_DEFAULT_SIZE: u64 = 0x200;

const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;

/// The status transitions a driver may make (virtio 1.2 §3.1.1), as (from, to). Besides
/// these: writing 0 resets from anywhere, setting FAILED is allowed from anywhere, and
/// rewriting the current value is a no-op. Everything else is refused and logged.
pub const VALID_TRANSITIONS: [(u32, u32); 4] = [
    (0, ACK),
    (ACK, ACK | DRIVER),
    (ACK | DRIVER, ACK | DRIVER | FEATURES_OK),
    (
        ACK | DRIVER | FEATURES_OK,
        ACK | DRIVER | FEATURES_OK | DRIVER_OK,
    ),
];

/// Why the device's eventfds could not be registered with the dispatcher.
#[derive(Debug, thiserror::Error)]
pub enum RegistrarError {
    /// The session refused the irqfd: the device could never interrupt the frontend.
    #[error("irqfd registration: {0}")]
    Irqfd(#[source] remio_api::ApiError),
    /// The session refused a queue's ioeventfd on a dispatcher where QueueNotify writes then
    /// never reach the device model (the C driver: an ioeventfd owns its whole range and
    /// unmatched writes are dropped), so the queue could never be notified.
    #[error(
        "queue {queue}: ioeventfd on QueueNotify refused ({source}); this dispatcher drops \
         notifies no ioeventfd matches, so the queue could not work"
    )]
    Ioeventfd {
        /// The queue.
        queue: usize,
        /// Why the session refused it.
        #[source]
        source: remio_api::ApiError,
    },
    /// Creating the eventfds failed.
    #[error("cannot create eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// Registers a device's eventfds with whatever delivers notifications: the `DmSession` in
/// production, a recorder in tests, nothing in fuzzing. Registration happens once per
/// transport and lasts until [`NotifyRegistrar::unregister`] when the transport is dropped;
/// resets keep it (see the module docs for why).
pub trait NotifyRegistrar: Send {
    /// Registers `queue_evts[i]` for QueueNotify writes of value `i` and `irqfd` as the
    /// device's frontend interrupt. A failed irqfd is an error; a failed ioeventfd is one
    /// only where the control path cannot stand in for it ([`RegistrarError::Ioeventfd`]).
    fn register(&mut self, queue_evts: &[EventFd], irqfd: &EventFd) -> Result<(), RegistrarError>;
    /// Undoes [`NotifyRegistrar::register`] (when the transport is dropped).
    fn unregister(&mut self, queue_evts: &[EventFd], irqfd: &EventFd);
}

/// A registrar that registers nothing (QueueNotify then always goes through the transport).
#[derive(Debug, Default)]
pub struct NoopRegistrar;

impl NotifyRegistrar for NoopRegistrar {
    fn register(&mut self, _: &[EventFd], _: &EventFd) -> Result<(), RegistrarError> {
        Ok(())
    }
    fn unregister(&mut self, _: &[EventFd], _: &EventFd) {}
}

/// One queue's registers as the driver set them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct QueueRegs {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ..Self::default()
        }
    }
}

/// The device's eventfds, created and registered once for the transport's lifetime.
#[derive(Debug)]
struct Notifiers {
    queue_evts: Vec<EventFd>,
    irqfd: EventFd,
}

/// What one activation handed the device.
#[derive(Debug)]
struct Activation {
    /// The activation's interrupt (a resumed device raises it; dropped at reset).
    interrupt: Arc<Interrupt>,
}

/// Why DRIVER_OK could not activate the device.
#[derive(Debug, thiserror::Error)]
enum ActivationFailure {
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    #[error("queue {0}: size or ring addresses invalid or outside the shared memory")]
    QueueInvalid(usize),
    #[error("cannot duplicate eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Registrar(#[from] RegistrarError),
    #[error("device: {0}")]
    Device(#[from] crate::device::ActivateError),
}

/// A window served failed: the state record this device model found was not one it can resume
/// (another configuration, another queue count, corrupt) while the guest's driver may have had
/// the device live. Until the driver resets it, Status reads DEVICE_NEEDS_RESET on what the
/// driver set, and every request in the rings the record (or the driver since) named is
/// returned with an error in the old device's terms ([`MmioFailover`]).
struct FailedWindow {
    /// The virtio device ID the driver bound to (the record's; this device's when unknown).
    device_type: u32,
    /// What the driver set (0 when the record did not say).
    status: u32,
    failover: Arc<std::sync::Mutex<MmioFailover>>,
    interrupt: Option<Arc<Interrupt>>,
    /// Returns the requests queued on each QueueNotify that reaches an eventfd.
    sweeper: Option<Worker>,
}

impl FailedWindow {
    /// Returns what the driver queued since the last pass; raises the used-buffer interrupt
    /// if anything was.
    fn sweep(&self, mem: &GuestMemoryMmap) {
        sweep(&self.failover, self.interrupt.as_deref(), mem);
    }
}

fn sweep(
    failover: &std::sync::Mutex<MmioFailover>,
    interrupt: Option<&Interrupt>,
    mem: &GuestMemoryMmap,
) {
    let raise = match failover.lock() {
        Ok(mut f) => f.sweep(Some(mem)),
        Err(_) => false,
    };
    if let (true, Some(irq)) = (raise, interrupt) {
        irq.signal_used_queue();
    }
}

/// The virtio-mmio register file of one device.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    registrar: Box<dyn NotifyRegistrar>,
    shared: SharedStatus,
    device_features: u64,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    shm_sel: u32,
    notifiers: Option<Notifiers>,
    active: Option<Activation>,
    /// Where the state is recorded for a restarted device model, if anywhere, with the record
    /// reused for every write (no allocation per register write).
    state: Option<(StateRegion, TransportState)>,
    /// Set while the window is served failed ([`Resumed::Failed`]).
    failed: Option<FailedWindow>,
}

/// What [`MmioTransport::attach_state`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resumed {
    /// No record of this device: it starts from reset, as the guest expects of a new device.
    Fresh,
    /// The driver's setup was restored; the device had not reached DRIVER_OK.
    Configuring,
    /// The device was live: its queues resume at the used index, the requests that were in
    /// flight are taken again, and a used-buffer interrupt is raised.
    Live,
    /// The device was live but could not be resumed (its rings are not valid any more): it
    /// reports DEVICE_NEEDS_RESET, as after any failed activation.
    NeedsReset,
    /// The record is not one this device can resume (another configuration, another queue
    /// count, corrupt) and the driver may have the device live: the window is served failed
    /// until the driver resets it (DEVICE_NEEDS_RESET, a configuration-change interrupt, every
    /// request queued and every later one returned with an error in the old device's terms),
    /// then it is this device, fresh.
    Failed,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .field("queues", &self.queues)
            .field("active", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// A transport for `device` whose queues live in `mem`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        registrar: Box<dyn NotifyRegistrar>,
    ) -> Self {
        let device_features = device.avail_features() | (1u64 << VIRTIO_F_VERSION_1);
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&m| QueueRegs::new(m))
            .collect();
        Self {
            device,
            mem,
            registrar,
            shared: SharedStatus::default(),
            device_features,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            shm_sel: 0,
            notifiers: None,
            active: None,
            state: None,
            failed: None,
        }
    }

    /// The fingerprint a state record of this device must carry (see
    /// [`crate::persist::fingerprint`]); `mmio_base` is the device's window.
    pub fn fingerprint(&self, mmio_base: u64) -> u64 {
        let max: Vec<u16> = self.queues.iter().map(|q| q.max_size).collect();
        self.fingerprint_with(&max, mmio_base)
    }

    /// The fingerprint of this device with queues of at most `queue_max`.
    fn fingerprint_with(&self, queue_max: &[u16], mmio_base: u64) -> u64 {
        crate::persist::fingerprint(
            self.device.device_type(),
            self.device_features,
            queue_max,
            mmio_base,
        )
    }

    /// The fingerprints of the earlier versions of this device it also resumes
    /// ([`VirtioDevice::earlier_queue_max_sizes`]): the same device, features and window, with
    /// queues no larger than this one's.
    fn earlier_fingerprints(&self, mmio_base: u64) -> Vec<u64> {
        self.device
            .earlier_queue_max_sizes()
            .iter()
            .filter(|sizes| {
                sizes.len() == self.queues.len()
                    && sizes
                        .iter()
                        .zip(&self.queues)
                        .all(|(&s, q)| s <= q.max_size)
            })
            .map(|sizes| self.fingerprint_with(sizes, mmio_base))
            .collect()
    }

    /// Records the transport's state in `file` from now on (before each register write
    /// completes), and first resumes from the record there, if one of this device exists: a
    /// device model restarted after a crash or an upgrade continues where the previous one
    /// stopped. A blank region (a first start) starts fresh; a record this device cannot use
    /// serves the window failed until the driver resets it ([`Resumed::Failed`], one warning
    /// naming the window and why). Call it at setup, before the first request, after
    /// [`MmioTransport::register_notifiers`].
    pub fn attach_state(
        &mut self,
        file: std::fs::File,
        mmio_base: u64,
    ) -> Result<Resumed, PersistError> {
        let (region, found) = StateRegion::open(
            file,
            self.fingerprint(mmio_base),
            &self.earlier_fingerprints(mmio_base),
            self.queues.len(),
        )?;
        #[cfg(feature = "crash-points")]
        crate::crash_point::watch_state_region(&region, self.device.device_type());
        self.state = Some((region, TransportState::default()));
        let resumed = match found {
            Found::Blank => Resumed::Fresh,
            Found::Record(rec) => self.restore(&rec),
            Found::Unusable { reason, state } => self.fail_window(mmio_base, reason, state),
        };
        // A failed window keeps the record it found until the driver resets it: a device model
        // restarted meanwhile must fail the window too, not start it fresh under a live driver.
        self.persist();
        Ok(resumed)
    }

    /// Serves the window failed after finding `reason` (see [`Resumed::Failed`]), or starts
    /// fresh where the record says the driver had reset the device (Status 0: nothing of the
    /// driver's is in the rings, and its next probe starts with a reset anyway).
    ///
    /// Any other status is failed, not only a live one: a driver between FEATURES_OK and
    /// DRIVER_OK would go on setting up a device reset under it, its writes refused without it
    /// noticing (Linux does not read Status back after DRIVER_OK), and wait forever on its
    /// first request. Failed, its setup is followed ([`MmioFailover`] keeps the queues it
    /// programs) and its requests fail.
    fn fail_window(
        &mut self,
        mmio_base: u64,
        reason: Unusable,
        record: Option<TransportState>,
    ) -> Resumed {
        let own_type = self.device.device_type();
        let (device_type, status, queues) = match &record {
            Some(r) if r.status & !VIRTIO_CONFIG_S_NEEDS_RESET == 0 => {
                log::info!(
                    "virtio-mmio: device at {mmio_base:#x} (type {own_type}): {reason}, of a \
                     device its driver had reset: starting fresh"
                );
                return Resumed::Fresh;
            }
            Some(r) => (
                if r.device_type == 0 {
                    own_type
                } else {
                    r.device_type
                },
                r.status & !VIRTIO_CONFIG_S_NEEDS_RESET,
                r.queues.as_slice(),
            ),
            None => (own_type, 0, &[][..]),
        };
        log::warn!(
            "virtio-mmio: device at {mmio_base:#x} (type {own_type}): {reason}; the guest's \
             device (type {device_type}, status {status:#x}) cannot be resumed: it is failed \
             (DEVICE_NEEDS_RESET, its requests answered with errors) until its driver resets it"
        );
        let mut failover = MmioFailover::from_record(device_type, status, queues);
        if let Err(e) = self.register_notifiers() {
            warn_rl!("virtio-mmio: failed window: eventfds: {e}");
        }
        let interrupt = self.notifiers.as_ref().and_then(|n| {
            n.irqfd
                .try_clone()
                .map(|irqfd| Arc::new(Interrupt::new(self.shared.clone(), irqfd)))
                .ok()
        });
        failover.fail_quietly(Some(&self.mem));
        self.shared.set_needs_reset();
        if let Some(irq) = &interrupt {
            irq.signal_config_change();
            // VRING too: requests returned now, or completed by the dead device model with an
            // interrupt the driver never saw.
            irq.signal_used_queue();
        }
        let failover = Arc::new(std::sync::Mutex::new(failover));
        let sweeper = self.spawn_sweeper(&failover, interrupt.clone());
        self.failed = Some(FailedWindow {
            device_type,
            status,
            failover,
            interrupt,
            sweeper,
        });
        Resumed::Failed
    }

    /// A thread that returns the requests queued on each QueueNotify reaching the queues'
    /// eventfds (the dispatcher's ioeventfds); `None` (logged) if it cannot be started, and then
    /// only notifies reaching the transport are served.
    fn spawn_sweeper(
        &self,
        failover: &Arc<std::sync::Mutex<MmioFailover>>,
        interrupt: Option<Arc<Interrupt>>,
    ) -> Option<Worker> {
        let evts = self
            .notifiers
            .as_ref()?
            .queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| warn_rl!("virtio-mmio: failed window: eventfds: {e}"))
            .ok()?;
        let (failover, mem) = (failover.clone(), self.mem.clone());
        let spawned = Worker::spawn("virtio-failed", move |stop| {
            let setup = || -> std::io::Result<EventLoop> {
                let ev = EventLoop::new()?;
                ev.add(&stop, crate::device::STOP_TOKEN)?;
                for (i, evt) in evts.iter().enumerate() {
                    ev.add(evt, u64::try_from(i).unwrap_or(0))?;
                }
                Ok(ev)
            };
            let mut ev = match setup() {
                Ok(ev) => ev,
                Err(e) => {
                    log::warn!("virtio-mmio: failed window: epoll: {e}");
                    return;
                }
            };
            let mut tokens = Vec::with_capacity(evts.len() + 1);
            loop {
                if let Err(e) = ev.wait(-1, &mut tokens) {
                    log::warn!("virtio-mmio: failed window: epoll: {e}");
                    return;
                }
                for &t in &tokens {
                    if t == crate::device::STOP_TOKEN {
                        return;
                    }
                    if let Some(evt) = usize::try_from(t).ok().and_then(|i| evts.get(i)) {
                        let _ = evt.read();
                    }
                }
                sweep(&failover, interrupt.as_deref(), &mem);
            }
        });
        spawned
            .map_err(|e| log::warn!("virtio-mmio: failed window: cannot start its thread: {e}"))
            .ok()
    }

    /// Whether the window is served failed ([`Resumed::Failed`]) and the driver has not reset
    /// it yet.
    pub fn is_failed(&self) -> bool {
        self.failed.is_some()
    }

    fn restore(&mut self, rec: &TransportState) -> Resumed {
        if rec.queues.len() != self.queues.len() {
            return Resumed::Fresh;
        }
        self.status = rec.status & !VIRTIO_CONFIG_S_NEEDS_RESET;
        self.device_features_sel = rec.device_features_sel;
        self.driver_features_sel = rec.driver_features_sel;
        self.driver_features = rec.driver_features & self.device_features;
        self.queue_sel = rec.queue_sel;
        self.shm_sel = rec.shm_sel;
        self.shared
            .config_generation
            .store(rec.config_generation, Ordering::SeqCst);
        for (regs, q) in self.queues.iter_mut().zip(&rec.queues) {
            regs.size = q.size;
            regs.ready = q.ready;
            regs.desc = q.desc;
            regs.driver = q.driver;
            regs.device = q.device;
        }
        if self.status & DRIVER_OK == 0 || self.status & FAILED != 0 {
            return Resumed::Configuring;
        }
        match self.activate(true) {
            Ok(()) => {
                if let Some(active) = &self.active {
                    // Whatever completed while nobody was serving, or was missed: the driver
                    // looks at its used rings.
                    self.shared
                        .interrupt_status
                        .fetch_or(rec.interrupt_status, Ordering::SeqCst);
                    active.interrupt.signal_used_queue();
                }
                self.kick_queues();
                Resumed::Live
            }
            Err(e) => {
                warn_rl!("virtio-mmio: resuming the device failed: {e}");
                self.shared.set_needs_reset();
                Resumed::NeedsReset
            }
        }
    }

    /// Writes the state record, if a region is attached. A failure is logged and the device
    /// goes on (it only costs the ability to resume).
    fn persist(&mut self) {
        if self.failed.is_some() {
            // The record found stays: see attach_state.
            return;
        }
        let Some((region, record)) = &mut self.state else {
            return;
        };
        record.device_type = self.device.device_type();
        record.status = self.status;
        record.device_features_sel = self.device_features_sel;
        record.driver_features_sel = self.driver_features_sel;
        record.driver_features = self.driver_features;
        record.queue_sel = self.queue_sel;
        record.shm_sel = self.shm_sel;
        record.config_generation = self.shared.config_generation.load(Ordering::SeqCst);
        record.interrupt_status = self.shared.interrupt_status.load(Ordering::SeqCst);
        record.queues.clear();
        record.queues.extend(self.queues.iter().map(|r| QueueState {
            size: r.size,
            ready: r.ready,
            desc: r.desc,
            driver: r.driver,
            device: r.device,
        }));
        if let Err(e) = region.write(record) {
            warn_rl!("virtio-mmio: recording the transport state: {e}");
        }
    }

    /// Creates the device's eventfds (one per queue, and the irqfd) and registers them, once:
    /// later calls do nothing. The runner calls it at setup so that a dispatcher refusing
    /// them is an error at start-up, not at the guest's DRIVER_OK; otherwise the first
    /// DRIVER_OK does it.
    pub fn register_notifiers(&mut self) -> Result<(), RegistrarError> {
        if self.notifiers.is_some() {
            return Ok(());
        }
        let new_evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(RegistrarError::EventFd);
        let queue_evts = (0..self.queues.len())
            .map(|_| new_evt())
            .collect::<Result<Vec<_>, _>>()?;
        let irqfd = new_evt()?;
        self.registrar.register(&queue_evts, &irqfd)?;
        self.notifiers = Some(Notifiers { queue_evts, irqfd });
        Ok(())
    }

    /// The status word shared with the device workers (InterruptStatus, NEEDS_RESET, config
    /// generation); a dispatcher fast path may read InterruptStatus from it.
    pub fn shared_status(&self) -> &SharedStatus {
        &self.shared
    }

    /// Keeps InterruptStatus in `word`, the status word shared with the dispatcher, from now
    /// on (the dispatcher then answers the driver's InterruptStatus reads and InterruptACK
    /// writes; reaching the transport they still work, on the same word). Only before
    /// activation: activation hands the word to the device's [`Interrupt`]. The word is left
    /// in place across resets, which clear it (Status 0 clears InterruptStatus). Returns
    /// whether it was taken (`false` while active).
    pub fn use_status_word(&mut self, word: remio_api::StatusWord) -> bool {
        if self.active.is_some() {
            return false;
        }
        let word = crate::device::InterruptStatusWord::shared(word);
        word.store(
            self.shared.interrupt_status.load(Ordering::SeqCst),
            Ordering::SeqCst,
        );
        self.shared.interrupt_status = word;
        true
    }

    /// Whether the device is activated (DRIVER_OK accepted).
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The Status register as the driver reads it.
    pub fn status(&self) -> u32 {
        if let Some(f) = &self.failed {
            return f.status | VIRTIO_CONFIG_S_NEEDS_RESET;
        }
        if self.shared.needs_reset.load(Ordering::SeqCst) {
            self.status | VIRTIO_CONFIG_S_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Reads `width` bytes at `offset` in the MMIO window. Bad accesses read 0.
    pub fn read(&mut self, offset: u64, width: u32) -> u64 {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            return self.read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), width);
        }
        let Some(reg) = register(offset, width) else {
            warn_rl!("virtio-mmio: bad read at {offset:#x} width {width}");
            return 0;
        };
        u64::from(self.read_register(reg))
    }

    /// Writes the low `width` bytes of `value` at `offset`. Bad accesses are ignored.
    pub fn write(&mut self, offset: u64, width: u32, value: u64) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), width, value);
            return;
        }
        let Some(reg) = register(offset, width) else {
            warn_rl!("virtio-mmio: bad write at {offset:#x} width {width}");
            return;
        };
        let value = (value & 0xffff_ffff) as u32;
        self.write_register(reg, value);
        // Before the write completes (the caller answers the trapped access after this).
        self.persist();
    }

    fn read_config(&mut self, offset: u64, width: u32) -> u64 {
        let Some(len) = config_width(width) else {
            warn_rl!("virtio-mmio: bad config read width {width}");
            return 0;
        };
        if self
            .failed
            .as_ref()
            .is_some_and(|f| f.device_type != self.device.device_type())
        {
            // Another device's config space means nothing to the driver of a failed one.
            return 0;
        }
        let mut buf = [0u8; 8];
        self.device.read_config(offset, &mut buf[..len]);
        u64::from_le_bytes(buf)
    }

    fn write_config(&mut self, offset: u64, width: u32, value: u64) {
        let Some(len) = config_width(width) else {
            warn_rl!("virtio-mmio: bad config write width {width}");
            return;
        };
        if self.failed.is_some() {
            warn_rl!("virtio-mmio: config write to a failed device ignored");
            return;
        }
        if self.status & DRIVER == 0 || self.status & FAILED != 0 {
            warn_rl!(
                "virtio-mmio: config write in status {:#x} ignored",
                self.status
            );
            return;
        }
        let bytes = value.to_le_bytes();
        self.device.write_config(offset, &bytes[..len]);
    }

    fn selected_queue(&self) -> Option<&QueueRegs> {
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get(i))
    }

    fn read_register(&self, reg: u32) -> u32 {
        match reg {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self
                .failed
                .as_ref()
                .map_or_else(|| self.device.device_type(), |f| f.device_type),
            VIRTIO_MMIO_VENDOR_ID => MMIO_VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => (self.device_features & 0xffff_ffff) as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size.into()),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready.into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.shared.interrupt_status.load(Ordering::SeqCst),
            VIRTIO_MMIO_STATUS => self.status(),
            // No shared memory regions (virtio 1.2 §4.2.2): length and base read as all ones.
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.shared.config_generation.load(Ordering::SeqCst),
            _ => {
                warn_rl!("virtio-mmio: read of write-only or unknown register {reg:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, reg: u32, value: u32) {
        if self.failed.is_some() {
            self.write_failed(reg, value);
            return;
        }
        match reg {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_register(reg, value),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => {
                self.shared
                    .interrupt_status
                    .fetch_and(!value, Ordering::SeqCst);
            }
            VIRTIO_MMIO_STATUS => self.set_status(value),
            VIRTIO_MMIO_SHM_SEL => self.shm_sel = value,
            _ => warn_rl!("virtio-mmio: write of read-only or unknown register {reg:#x}"),
        }
    }

    /// A register write to a failed window: Status 0 makes it this device, fresh; InterruptACK
    /// works; QueueNotify returns what is queued; the rest is only followed by the failover
    /// (a driver still setting up programs queues whose requests must fail too).
    fn write_failed(&mut self, reg: u32, value: u32) {
        match reg {
            VIRTIO_MMIO_STATUS if value & !VIRTIO_CONFIG_S_NEEDS_RESET == 0 => {
                log::info!("virtio-mmio: the driver reset the failed device: it starts fresh");
                self.reset();
            }
            VIRTIO_MMIO_INTERRUPT_ACK => {
                self.shared
                    .interrupt_status
                    .fetch_and(!value, Ordering::SeqCst);
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                if let Some(f) = &self.failed {
                    f.sweep(&self.mem);
                }
            }
            _ => {
                if let Some(f) = &mut self.failed {
                    if reg == VIRTIO_MMIO_STATUS {
                        f.status = value & 0xff & !VIRTIO_CONFIG_S_NEEDS_RESET;
                    }
                    if let Ok(mut shadow) = f.failover.lock() {
                        shadow.observe_write(u64::from(reg), 4, u64::from(value));
                    }
                }
            }
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & (DRIVER | FEATURES_OK | FAILED) != DRIVER {
            warn_rl!(
                "virtio-mmio: DriverFeatures write in status {:#x}",
                self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            sel => warn_rl!("virtio-mmio: DriverFeatures write with selector {sel}"),
        }
    }

    fn write_queue_register(&mut self, reg: u32, value: u32) {
        if self.status & (FEATURES_OK | DRIVER_OK | FAILED) != FEATURES_OK {
            warn_rl!(
                "virtio-mmio: queue register {reg:#x} write in status {:#x}",
                self.status
            );
            return;
        }
        let Some(q) = usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get_mut(i))
        else {
            warn_rl!(
                "virtio-mmio: queue register write for queue {}",
                self.queue_sel
            );
            return;
        };
        let low = |old: u64| (old & !0xffff_ffff) | u64::from(value);
        let high = |old: u64| (old & 0xffff_ffff) | (u64::from(value) << 32);
        match reg {
            VIRTIO_MMIO_QUEUE_NUM => match u16::try_from(value) {
                Ok(n) if n != 0 && n <= q.max_size && n.is_power_of_two() => q.size = n,
                _ => warn_rl!("virtio-mmio: invalid QueueNum {value} (max {})", q.max_size),
            },
            VIRTIO_MMIO_QUEUE_READY => q.ready = value == 1,
            VIRTIO_MMIO_QUEUE_DESC_LOW => q.desc = low(q.desc),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => q.desc = high(q.desc),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.driver = low(q.driver),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.driver = high(q.driver),
            VIRTIO_MMIO_QUEUE_USED_LOW => q.device = low(q.device),
            VIRTIO_MMIO_QUEUE_USED_HIGH => q.device = high(q.device),
            _ => {}
        }
    }

    /// QueueNotify arriving through the control path (no ioeventfd, or before DRIVER_OK).
    fn notify(&self, value: u32) {
        let (Some(_), Some(notifiers)) = (&self.active, &self.notifiers) else {
            warn_rl!("virtio-mmio: QueueNotify({value}) before DRIVER_OK ignored");
            return;
        };
        match usize::try_from(value)
            .ok()
            .and_then(|i| notifiers.queue_evts.get(i))
        {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    warn_rl!("virtio-mmio: queue eventfd write: {e}");
                }
            }
            None => warn_rl!("virtio-mmio: QueueNotify for unknown queue {value}"),
        }
    }

    fn set_status(&mut self, value: u32) {
        // Linux writes back what it read, so NEEDS_RESET may come back: it is not driver-owned.
        let new = value & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let old = self.status;
        if new == 0 {
            self.reset();
            return;
        }
        if new == old {
            return;
        }
        if new == old | FAILED {
            self.status = new;
            return;
        }
        if !VALID_TRANSITIONS.contains(&(old, new)) {
            warn_rl!("virtio-mmio: refused status transition {old:#x} -> {new:#x}");
            return;
        }
        match new & !old {
            FEATURES_OK => {
                if self.features_acceptable() {
                    self.status = new;
                } else {
                    // The driver re-reads Status and sees FEATURES_OK unset (§3.1.1 step 6).
                    warn_rl!(
                        "virtio-mmio: driver features {:#x} not acceptable (device {:#x})",
                        self.driver_features,
                        self.device_features
                    );
                }
            }
            DRIVER_OK => match self.activate(false) {
                Ok(()) => {
                    self.status = new;
                    self.kick_queues();
                }
                Err(e) => {
                    warn_rl!("virtio-mmio: activation failed: {e}");
                    self.status = new;
                    self.shared.set_needs_reset();
                }
            },
            _ => self.status = new,
        }
    }

    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.device_features == 0
            && self.driver_features & (1u64 << VIRTIO_F_VERSION_1) != 0
    }

    /// Hands the queues to the device. `resume`: the queues were live under a previous device
    /// model; they restart at the used ring's index (see [`crate::persist`]).
    fn activate(&mut self, resume: bool) -> Result<(), ActivationFailure> {
        let event_idx = self.driver_features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, regs) in self.queues.iter().enumerate() {
            if !regs.ready {
                return Err(ActivationFailure::QueueNotReady(i));
            }
            let mut q = build_queue(regs, event_idx).ok_or(ActivationFailure::QueueInvalid(i))?;
            if !q.is_valid(&self.mem) {
                return Err(ActivationFailure::QueueInvalid(i));
            }
            if resume {
                let used = q
                    .used_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
                    .map_err(|_| ActivationFailure::QueueInvalid(i))?;
                q.set_next_avail(used.0);
                q.set_next_used(used.0);
            }
            queues.push(q);
        }
        self.register_notifiers()?;
        let Some(notifiers) = &self.notifiers else {
            return Err(RegistrarError::EventFd(std::io::Error::other("no eventfds")).into());
        };
        let device_evts = notifiers
            .queue_evts
            .iter()
            .map(|e| e.try_clone().map_err(ActivationFailure::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        let irqfd = notifiers
            .irqfd
            .try_clone()
            .map_err(ActivationFailure::EventFd)?;
        let interrupt = Arc::new(Interrupt::new(self.shared.clone(), irqfd));
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_evts: device_evts,
            interrupt: interrupt.clone(),
            acked_features: self.driver_features,
        };
        self.device.activate(ctx)?;
        self.active = Some(Activation { interrupt });
        Ok(())
    }

    /// Signals every queue's eventfd once, so that buffers made available before the
    /// ioeventfds were registered are seen (conventions §7).
    pub fn kick_queues(&self) {
        if let (Some(_), Some(notifiers)) = (&self.active, &self.notifiers) {
            for evt in &notifiers.queue_evts {
                if let Err(e) = evt.write(1) {
                    warn_rl!("virtio-mmio: queue eventfd write: {e}");
                }
            }
        }
    }

    /// Full device reset (Status written 0): stops the device's workers, forgets features and
    /// queue setup. The eventfds stay registered for the next activation (module docs).
    pub fn reset(&mut self) {
        if let Some(mut f) = self.failed.take() {
            if let Some(mut w) = f.sweeper.take() {
                w.stop();
            }
        }
        if self.active.take().is_some() {
            self.device.reset();
        }
        self.shared.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.shm_sel = 0;
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
    }
}

impl Drop for MmioTransport {
    fn drop(&mut self) {
        self.reset();
        if let Some(n) = self.notifiers.take() {
            self.registrar.unregister(&n.queue_evts, &n.irqfd);
        }
    }
}

fn build_queue(regs: &QueueRegs, event_idx: bool) -> Option<Queue> {
    let mut q = Queue::new(regs.max_size).ok()?;
    q.try_set_size(regs.size).ok()?;
    let split = |a: u64| (Some((a & 0xffff_ffff) as u32), Some((a >> 32) as u32));
    let (l, h) = split(regs.desc);
    q.set_desc_table_address(l, h);
    let (l, h) = split(regs.driver);
    q.set_avail_ring_address(l, h);
    let (l, h) = split(regs.device);
    q.set_used_ring_address(l, h);
    q.set_event_idx(event_idx);
    q.set_ready(true);
    Some(q)
}

/// The register at `offset` if the access is a naturally aligned 32-bit one.
fn register(offset: u64, width: u32) -> Option<u32> {
    if width != 4 || !offset.is_multiple_of(4) {
        return None;
    }
    u32::try_from(offset).ok()
}

fn config_width(width: u32) -> Option<usize> {
    match width {
        1 | 2 | 4 | 8 => usize::try_from(width).ok(),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::device::ActivateError;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    /// A device that records what the transport does to it.
    #[derive(Debug, Default)]
    pub(crate) struct ProbeDevice {
        pub activations: Arc<AtomicUsize>,
        pub resets: Arc<AtomicUsize>,
        pub fail_activate: bool,
        pub config: [u8; 8],
        pub acked: Arc<AtomicUsize>,
        /// The interrupt of the last activation.
        pub interrupt: Arc<Mutex<Option<Arc<Interrupt>>>>,
        /// What `earlier_queue_max_sizes` returns.
        pub earlier: &'static [&'static [u16]],
    }

    impl VirtioDevice for ProbeDevice {
        fn device_type(&self) -> u32 {
            4
        }
        fn avail_features(&self) -> u64 {
            (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn earlier_queue_max_sizes(&self) -> &[&[u16]] {
            self.earlier
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::device::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(slot) = usize::try_from(offset)
                    .ok()
                    .and_then(|o| o.checked_add(i))
                    .and_then(|o| self.config.get_mut(o))
                {
                    *slot = *b;
                }
            }
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::AlreadyActive);
            }
            self.acked.store(
                usize::try_from(ctx.acked_features).unwrap(),
                Ordering::SeqCst,
            );
            self.activations.fetch_add(1, Ordering::SeqCst);
            *self.interrupt.lock().unwrap() = Some(ctx.interrupt);
            Ok(())
        }
        fn reset(&mut self) {
            self.resets.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Records registrations: (number of queue eventfds, irqfd) per call.
    #[derive(Debug, Default, Clone)]
    pub(crate) struct RecordingRegistrar {
        pub registered: Arc<Mutex<Vec<usize>>>,
        pub unregistered: Arc<Mutex<Vec<usize>>>,
    }

    impl NotifyRegistrar for RecordingRegistrar {
        fn register(&mut self, evts: &[EventFd], _: &EventFd) -> Result<(), RegistrarError> {
            self.registered.lock().unwrap().push(evts.len());
            Ok(())
        }
        fn unregister(&mut self, evts: &[EventFd], _: &EventFd) {
            self.unregistered.lock().unwrap().push(evts.len());
        }
    }

    pub(crate) fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0x1000_0000), 0x10_0000)]).unwrap()
    }

    fn reg(r: u32) -> u64 {
        u64::from(r)
    }

    /// Does what Linux's virtio_mmio probe + virtio core do up to DRIVER_OK, with queues laid
    /// at `base`. Returns the final status read back.
    pub(crate) fn linux_probe(t: &mut MmioTransport, base: u64, features: u64) -> u32 {
        assert_eq!(t.read(reg(VIRTIO_MMIO_MAGIC_VALUE), 4), 0x7472_6976);
        assert_eq!(t.read(reg(VIRTIO_MMIO_VERSION), 4), 2);
        assert_ne!(t.read(reg(VIRTIO_MMIO_DEVICE_ID), 4), 0);
        t.read(reg(VIRTIO_MMIO_VENDOR_ID), 4);
        t.write(reg(VIRTIO_MMIO_STATUS), 4, 0);
        t.write(reg(VIRTIO_MMIO_STATUS), 4, u64::from(ACK));
        t.write(reg(VIRTIO_MMIO_STATUS), 4, u64::from(ACK | DRIVER));
        t.write(reg(VIRTIO_MMIO_DEVICE_FEATURES_SEL), 4, 1);
        let mut dev = t.read(reg(VIRTIO_MMIO_DEVICE_FEATURES), 4) << 32;
        t.write(reg(VIRTIO_MMIO_DEVICE_FEATURES_SEL), 4, 0);
        dev |= t.read(reg(VIRTIO_MMIO_DEVICE_FEATURES), 4);
        let drv = dev & features;
        t.write(reg(VIRTIO_MMIO_DRIVER_FEATURES_SEL), 4, 1);
        t.write(reg(VIRTIO_MMIO_DRIVER_FEATURES), 4, drv >> 32);
        t.write(reg(VIRTIO_MMIO_DRIVER_FEATURES_SEL), 4, 0);
        t.write(reg(VIRTIO_MMIO_DRIVER_FEATURES), 4, drv & 0xffff_ffff);
        let s = t.read(reg(VIRTIO_MMIO_STATUS), 4);
        t.write(reg(VIRTIO_MMIO_STATUS), 4, s | u64::from(FEATURES_OK));
        if t.read(reg(VIRTIO_MMIO_STATUS), 4) & u64::from(FEATURES_OK) == 0 {
            return t.status();
        }
        let mut addr = base;
        for sel in 0..2u64 {
            t.write(reg(VIRTIO_MMIO_QUEUE_SEL), 4, sel);
            assert_eq!(t.read(reg(VIRTIO_MMIO_QUEUE_READY), 4), 0);
            let max = t.read(reg(VIRTIO_MMIO_QUEUE_NUM_MAX), 4);
            t.write(reg(VIRTIO_MMIO_QUEUE_NUM), 4, max);
            for (lo, hi) in [
                (VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH),
                (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH),
                (VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH),
            ] {
                t.write(reg(lo), 4, addr & 0xffff_ffff);
                t.write(reg(hi), 4, addr >> 32);
                addr += 0x1000;
            }
            t.write(reg(VIRTIO_MMIO_QUEUE_READY), 4, 1);
        }
        let s = t.read(reg(VIRTIO_MMIO_STATUS), 4);
        t.write(reg(VIRTIO_MMIO_STATUS), 4, s | u64::from(DRIVER_OK));
        t.status()
    }

    fn transport(dev: ProbeDevice, registrar: RecordingRegistrar) -> MmioTransport {
        MmioTransport::new(Box::new(dev), mem(), Box::new(registrar))
    }

    #[test]
    fn linux_probe_reaches_driver_ok_and_activates_once() {
        let dev = ProbeDevice::default();
        let activations = dev.activations.clone();
        let acked = dev.acked.clone();
        let registrar = RecordingRegistrar::default();
        let mut t = transport(dev, registrar.clone());

        let status = linux_probe(&mut t, 0x1000_0000, u64::MAX);

        assert_eq!(status, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(activations.load(Ordering::SeqCst), 1);
        assert_eq!(
            acked.load(Ordering::SeqCst) as u64,
            (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
        );
        assert_eq!(*registrar.registered.lock().unwrap(), vec![2]);
    }

    #[test]
    fn reset_stops_device_keeps_the_eventfds_registered_and_allows_a_second_probe() {
        let dev = ProbeDevice::default();
        let (activations, resets) = (dev.activations.clone(), dev.resets.clone());
        let registrar = RecordingRegistrar::default();
        let mut t = transport(dev, registrar.clone());
        linux_probe(&mut t, 0x1000_0000, u64::MAX);

        t.write(reg(VIRTIO_MMIO_STATUS), 4, 0);

        assert_eq!(t.read(reg(VIRTIO_MMIO_STATUS), 4), 0);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        assert!(registrar.unregistered.lock().unwrap().is_empty());
        t.write(reg(VIRTIO_MMIO_QUEUE_SEL), 4, 0);
        assert_eq!(t.read(reg(VIRTIO_MMIO_QUEUE_READY), 4), 0);

        let status = linux_probe(&mut t, 0x1001_0000, u64::MAX);

        assert_eq!(status, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(activations.load(Ordering::SeqCst), 2);
        assert_eq!(
            *registrar.registered.lock().unwrap(),
            vec![2],
            "registered once, reused by the second activation"
        );
        drop(t);
        assert_eq!(*registrar.unregistered.lock().unwrap(), vec![2]);
    }

    #[test]
    fn features_without_version_1_are_refused_at_features_ok() {
        let mut t = transport(ProbeDevice::default(), RecordingRegistrar::default());

        let status = linux_probe(&mut t, 0x1000_0000, !(1u64 << VIRTIO_F_VERSION_1));

        assert_eq!(status, ACK | DRIVER);
    }

    #[test]
    fn skipping_a_status_step_is_refused() {
        let mut t = transport(ProbeDevice::default(), RecordingRegistrar::default());
        t.write(reg(VIRTIO_MMIO_STATUS), 4, u64::from(ACK));

        t.write(
            reg(VIRTIO_MMIO_STATUS),
            4,
            u64::from(ACK | DRIVER | DRIVER_OK),
        );

        assert_eq!(t.status(), ACK);
    }

    #[test]
    fn failed_may_be_set_from_any_state() {
        let mut t = transport(ProbeDevice::default(), RecordingRegistrar::default());
        t.write(reg(VIRTIO_MMIO_STATUS), 4, u64::from(ACK));

        t.write(reg(VIRTIO_MMIO_STATUS), 4, u64::from(ACK | FAILED));

        assert_eq!(t.status(), ACK | FAILED);
    }

    #[test]
    fn activation_failure_sets_needs_reset() {
        let dev = ProbeDevice {
            fail_activate: true,
            ..ProbeDevice::default()
        };
        let registrar = RecordingRegistrar::default();
        let mut t = transport(dev, registrar.clone());

        let status = linux_probe(&mut t, 0x1000_0000, u64::MAX);

        assert_ne!(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert!(!t.is_active());
        assert_eq!(*registrar.registered.lock().unwrap(), vec![2]);
        drop(t);
        assert_eq!(*registrar.unregistered.lock().unwrap(), vec![2]);
    }

    #[test]
    fn queue_outside_shared_memory_fails_activation() {
        let mut t = transport(ProbeDevice::default(), RecordingRegistrar::default());

        let status = linux_probe(&mut t, 0x2000_0000, u64::MAX);

        assert_ne!(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert!(!t.is_active());
    }

    #[test]
    fn queue_num_must_be_a_power_of_two_within_max() {
        let mut t = transport(ProbeDevice::default(), RecordingRegistrar::default());
        for s in [ACK, ACK | DRIVER] {
            t.write(reg(VIRTIO_MMIO_STATUS), 4, u64::from(s));
        }
        t.write(reg(VIRTIO_MMIO_DRIVER_FEATURES_SEL), 4, 1);
        t.write(reg(VIRTIO_MMIO_DRIVER_FEATURES), 4, 1);
        t.write(
            reg(VIRTIO_MMIO_STATUS),
            4,
            u64::from(ACK | DRIVER | FEATURES_OK),
        );
        t.write(reg(VIRTIO_MMIO_QUEUE_SEL), 4, 0);

        for bad in [0u64, 3, 32, 1 << 20] {
            t.write(reg(VIRTIO_MMIO_QUEUE_NUM), 4, bad);
        }
        t.write(reg(VIRTIO_MMIO_QUEUE_NUM), 4, 4);

        assert_eq!(t.queues[0].size, 4);
    }

    #[test]
    fn interrupt_status_lives_in_the_shared_word_and_reset_clears_it() {
        let dev = ProbeDevice::default();
        let interrupt = dev.interrupt.clone();
        let mut t = transport(dev, RecordingRegistrar::default());
        let page = Arc::new(remio_dispatcher::StatusPage::new().unwrap());
        let word = remio_api::StatusWord::new(page.clone());
        assert!(t.use_status_word(word.clone()));
        assert!(t.shared_status().interrupt_status.is_shared());
        linux_probe(&mut t, 0x1000_0000, u64::MAX);
        let irq = interrupt.lock().unwrap().clone().unwrap();

        // The device's interrupt sets its bit in the word the dispatcher answers from.
        irq.signal_used_queue();
        assert_eq!(page.load(), VIRTIO_MMIO_INT_VRING);
        // An acknowledgement made by the dispatcher is what the transport sees, and the
        // registers, should they reach the transport, use the same word.
        page.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(t.read(reg(VIRTIO_MMIO_INTERRUPT_STATUS), 4), 0);
        irq.signal_config_change();
        assert_eq!(t.read(reg(VIRTIO_MMIO_INTERRUPT_STATUS), 4), 2);
        // Too late to move it once active.
        assert!(!t.use_status_word(word));

        // Status 0 clears InterruptStatus in the shared word; the word stays in use, so the
        // next activation's interrupt sets it there again.
        t.write(reg(VIRTIO_MMIO_STATUS), 4, 0);
        assert_eq!(page.load(), 0);
        linux_probe(&mut t, 0x1000_0000, u64::MAX);
        let irq2 = interrupt.lock().unwrap().clone().unwrap();
        irq2.signal_used_queue();
        assert_eq!(page.load(), VIRTIO_MMIO_INT_VRING);
    }

    #[test]
    fn interrupt_ack_clears_only_the_acked_bits() {
        let mut t = transport(ProbeDevice::default(), RecordingRegistrar::default());
        t.shared_status()
            .interrupt_status
            .store(3, Ordering::SeqCst);

        t.write(reg(VIRTIO_MMIO_INTERRUPT_ACK), 4, 1);

        assert_eq!(t.read(reg(VIRTIO_MMIO_INTERRUPT_STATUS), 4), 2);
    }

    #[test]
    fn registers_need_aligned_32_bit_accesses() {
        let mut t = transport(ProbeDevice::default(), RecordingRegistrar::default());

        assert_eq!(t.read(reg(VIRTIO_MMIO_MAGIC_VALUE), 2), 0);
        assert_eq!(t.read(1, 4), 0);
        assert_eq!(t.read(0xf8, 4), 0);
        t.write(reg(VIRTIO_MMIO_STATUS), 8, u64::from(ACK));
        assert_eq!(t.status(), 0);
    }

    #[test]
    fn config_space_takes_1_2_4_8_byte_accesses() {
        let dev = ProbeDevice {
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            ..ProbeDevice::default()
        };
        let mut t = transport(dev, RecordingRegistrar::default());
        let cfg = reg(VIRTIO_MMIO_CONFIG);

        assert_eq!(t.read(cfg, 1), 1);
        assert_eq!(t.read(cfg + 2, 2), 0x0403);
        assert_eq!(t.read(cfg + 4, 4), 0x0807_0605);
        assert_eq!(t.read(cfg, 8), 0x0807_0605_0403_0201);
        assert_eq!(t.read(cfg + 6, 8), 0x0807);
        assert_eq!(t.read(cfg, 3), 0);
        t.write(reg(VIRTIO_MMIO_STATUS), 4, u64::from(ACK));
        t.write(reg(VIRTIO_MMIO_STATUS), 4, u64::from(ACK | DRIVER));
        t.write(cfg + 1, 2, 0xaabb);
        assert_eq!(t.read(cfg, 4), 0x04aa_bb01);
    }

    #[test]
    fn no_shared_memory_regions_are_reported() {
        let mut t = transport(ProbeDevice::default(), RecordingRegistrar::default());
        t.write(reg(VIRTIO_MMIO_SHM_SEL), 4, 0);

        assert_eq!(t.read(reg(VIRTIO_MMIO_SHM_LEN_LOW), 4), 0xffff_ffff);
        assert_eq!(t.read(reg(VIRTIO_MMIO_SHM_LEN_HIGH), 4), 0xffff_ffff);
    }

    #[test]
    fn control_path_notify_after_driver_ok_signals_the_queue_eventfd() {
        let mut t = transport(ProbeDevice::default(), RecordingRegistrar::default());
        linux_probe(&mut t, 0x1000_0000, u64::MAX);
        let evt = t.notifiers.as_ref().unwrap().queue_evts[1]
            .try_clone()
            .unwrap();
        // Drain the re-kick.
        assert_eq!(evt.read().unwrap(), 1);

        t.write(reg(VIRTIO_MMIO_QUEUE_NOTIFY), 4, 1);
        t.write(reg(VIRTIO_MMIO_QUEUE_NOTIFY), 4, 7);

        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn arbitrary_accesses_never_panic() {
        let mut t = transport(ProbeDevice::default(), RecordingRegistrar::default());
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let offset = (x >> 8) % 0x220;
            let width = [1u32, 2, 3, 4, 8][usize::try_from(x % 5).unwrap()];
            if x & 0x100 == 0 {
                t.read(offset, width);
            } else {
                t.write(offset, width, x.rotate_left(17) % 0x200);
            }
        }
        crate::fuzz::mmio_transport(&[0xff; 64]);
    }

    // ---- Resuming from the state region (crate::persist) ----

    mod resume {
        use super::*;
        use crate::devices::rng::RngDevice;
        use std::os::unix::fs::FileExt;
        use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;

        const BASE: u64 = 0x1000_0000;
        const MMIO: u64 = 0xa000_0000;

        fn region() -> std::fs::File {
            let path = std::env::temp_dir().join(format!(
                "remio-resume-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            std::fs::remove_file(&path).unwrap();
            f.set_len(crate::persist::REGION_LEN).unwrap();
            f
        }

        fn rng(mem: &GuestMemoryMmap, file: &std::fs::File) -> (MmioTransport, Resumed) {
            let mut t = MmioTransport::new(
                Box::new(RngDevice::new(None)),
                mem.clone(),
                Box::new(NoopRegistrar),
            );
            let resumed = t.attach_state(file.try_clone().unwrap(), MMIO).unwrap();
            (t, resumed)
        }

        /// Linux's probe of a one-queue device, the queue laid out by `vq`.
        fn probe(t: &mut MmioTransport, vq: &MockSplitQueue<'_, GuestMemoryMmap>) {
            for s in [0, ACK, ACK | DRIVER] {
                t.write(reg(VIRTIO_MMIO_STATUS), 4, u64::from(s));
            }
            t.write(reg(VIRTIO_MMIO_DRIVER_FEATURES_SEL), 4, 1);
            t.write(reg(VIRTIO_MMIO_DRIVER_FEATURES), 4, 1);
            t.write(
                reg(VIRTIO_MMIO_STATUS),
                4,
                u64::from(ACK | DRIVER | FEATURES_OK),
            );
            t.write(reg(VIRTIO_MMIO_QUEUE_SEL), 4, 0);
            t.write(reg(VIRTIO_MMIO_QUEUE_NUM), 4, 16);
            t.write(reg(VIRTIO_MMIO_QUEUE_DESC_LOW), 4, vq.desc_table_addr().0);
            t.write(reg(VIRTIO_MMIO_QUEUE_AVAIL_LOW), 4, vq.avail_addr().0);
            t.write(reg(VIRTIO_MMIO_QUEUE_USED_LOW), 4, vq.used_addr().0);
            t.write(reg(VIRTIO_MMIO_QUEUE_READY), 4, 1);
            t.write(
                reg(VIRTIO_MMIO_STATUS),
                4,
                u64::from(ACK | DRIVER | FEATURES_OK | DRIVER_OK),
            );
        }

        /// Makes a 16-byte buffer at `addr` available as descriptor `head` (no notify).
        fn offer(vq: &MockSplitQueue<'_, GuestMemoryMmap>, addr: u64, head: u16) {
            let w = u16::try_from(VRING_DESC_F_WRITE).unwrap();
            let d = Descriptor::new(addr, 16, w, 0);
            vq.add_desc_chains(&[RawDescriptor::from(d)], head).unwrap();
        }

        use crate::runner::tests::wait_used;

        #[test]
        fn a_new_transport_resumes_a_live_device_and_serves_what_was_left() {
            let mem = mem();
            let file = region();
            let vq = MockSplitQueue::create(&mem, GuestAddress(BASE), 16);
            let (mut first, resumed) = rng(&mem, &file);
            assert_eq!(resumed, Resumed::Fresh);
            probe(&mut first, &vq);
            offer(&vq, BASE + 0x8000, 0);
            first.kick_queues();
            assert_eq!(wait_used(&vq, 1), 1);

            // The device model dies; the guest goes on and offers another buffer.
            drop(first);
            offer(&vq, BASE + 0x9000, 1);

            let (second, resumed) = rng(&mem, &file);

            assert_eq!(resumed, Resumed::Live);
            assert_eq!(second.status(), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
            assert_eq!(wait_used(&vq, 2), 2, "the buffer left is served");
            assert_ne!(
                second
                    .shared_status()
                    .interrupt_status
                    .load(Ordering::SeqCst)
                    & 1,
                0,
                "a used-buffer interrupt was raised"
            );
        }

        #[test]
        fn a_request_taken_but_not_completed_is_taken_again_and_completed_once() {
            let mem = mem();
            let file = region();
            let vq = MockSplitQueue::create(&mem, GuestAddress(BASE), 16);
            let (mut first, _) = rng(&mem, &file);
            probe(&mut first, &vq);
            drop(first);
            // Two buffers offered; the dead device model had completed the first (its used
            // entry and index are in guest memory) and taken the second without completing it.
            offer(&vq, BASE + 0x8000, 0);
            offer(&vq, BASE + 0x9000, 1);
            vq.used().idx().store(1);

            let (_second, resumed) = rng(&mem, &file);

            assert_eq!(resumed, Resumed::Live);
            assert_eq!(wait_used(&vq, 2), 2);
            // used ring: flags u16, idx u16, then elems of (id u32, len u32).
            let id: u32 =
                vm_memory::Bytes::read_obj(&mem, GuestAddress(vq.used_addr().0 + 4 + 8)).unwrap();
            assert_eq!(id, 1, "the second head, completed now");
            // Nothing more: the first was not completed twice.
            assert_eq!(vq.used().idx().load(), 2);
        }

        #[test]
        fn a_device_still_being_set_up_resumes_its_setup() {
            let mem = mem();
            let file = region();
            let (mut first, _) = rng(&mem, &file);
            let setup = ACK | DRIVER | FEATURES_OK;
            first.write(reg(VIRTIO_MMIO_STATUS), 4, u64::from(ACK));
            first.write(reg(VIRTIO_MMIO_STATUS), 4, u64::from(ACK | DRIVER));
            first.write(reg(VIRTIO_MMIO_DRIVER_FEATURES_SEL), 4, 1);
            first.write(reg(VIRTIO_MMIO_DRIVER_FEATURES), 4, 1);
            first.write(reg(VIRTIO_MMIO_STATUS), 4, u64::from(setup));
            first.write(reg(VIRTIO_MMIO_QUEUE_SEL), 4, 0);
            first.write(reg(VIRTIO_MMIO_QUEUE_NUM), 4, 8);
            assert_eq!(first.queues[0].size, 8);
            drop(first);

            let (second, resumed) = rng(&mem, &file);

            assert_eq!(resumed, Resumed::Configuring);
            assert_eq!(second.status(), setup);
            assert_eq!(second.driver_features, 1 << 32);
            assert_eq!(second.queues[0].size, 8);
        }

        use crate::persist::StateRegion;
        use virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR;
        use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;

        const BLOCK: u32 = 2;
        const STATUS_BYTE: u64 = BASE + 0xa000;

        /// What a device model of another configuration left in `file`: a block device, its
        /// driver at `status`, queue 0 at `vq`'s rings.
        fn foreign_block_record(
            file: &std::fs::File,
            vq: &MockSplitQueue<'_, GuestMemoryMmap>,
            status: u32,
        ) {
            let (mut region, _) =
                StateRegion::open(file.try_clone().unwrap(), 0xb10c, &[], 1).unwrap();
            region
                .write(&TransportState {
                    status,
                    driver_features: 1 << 32,
                    device_type: BLOCK,
                    queues: vec![QueueState {
                        size: 16,
                        ready: true,
                        desc: vq.desc_table_addr().0,
                        driver: vq.avail_addr().0,
                        device: vq.used_addr().0,
                    }],
                    ..TransportState::default()
                })
                .unwrap();
        }

        /// A virtio-blk request (header, then a 1-byte status the device writes) on descriptors
        /// `head` and `head + 1`, made available; its status byte at `STATUS_BYTE + head` reads
        /// 0xff until the device writes it.
        fn block_request(
            mem: &GuestMemoryMmap,
            vq: &MockSplitQueue<'_, GuestMemoryMmap>,
            head: u16,
        ) {
            let (next, w) = (
                u16::try_from(VRING_DESC_F_NEXT).unwrap(),
                u16::try_from(VRING_DESC_F_WRITE).unwrap(),
            );
            let status = STATUS_BYTE + u64::from(head);
            vm_memory::Bytes::write_obj(mem, 0xffu8, GuestAddress(status)).unwrap();
            let chain = [
                RawDescriptor::from(Descriptor::new(BASE + 0x8000, 16, next, head + 1)),
                RawDescriptor::from(Descriptor::new(status, 1, w, 0)),
            ];
            vq.add_desc_chains(&chain, head).unwrap();
        }

        fn status_byte(mem: &GuestMemoryMmap, head: u16) -> u32 {
            let b: u8 =
                vm_memory::Bytes::read_obj(mem, GuestAddress(STATUS_BYTE + u64::from(head)))
                    .unwrap();
            u32::from(b)
        }

        fn isr(t: &MmioTransport) -> u32 {
            t.shared_status().interrupt_status.load(Ordering::SeqCst)
        }

        #[test]
        fn a_blank_region_starts_fresh() {
            let mem = mem();
            let file = region();

            let (t, resumed) = rng(&mem, &file);

            assert_eq!(resumed, Resumed::Fresh);
            assert_eq!(t.status(), 0);
            assert_eq!(isr(&t), 0);
        }

        /// Writes in `file` the record an earlier version of `t`'s device with queues of at
        /// most `recorded` left: its driver setting it up (ACKNOWLEDGE | DRIVER).
        fn earlier_setup_record(t: &MmioTransport, file: &std::fs::File, recorded: &[u16]) {
            let fp = t.fingerprint_with(recorded, MMIO);
            let queues = t.queues.len();
            let (mut region, _) =
                StateRegion::open(file.try_clone().unwrap(), fp, &[], queues).unwrap();
            region
                .write(&TransportState {
                    status: ACK | DRIVER,
                    device_type: t.device.device_type(),
                    queues: vec![QueueState::default(); queues],
                    ..TransportState::default()
                })
                .unwrap();
        }

        /// A transport over a `ProbeDevice` that resumes records of `earlier` queue maxima,
        /// on a region holding a record of a device being set up whose queues were at most
        /// `recorded` (the fingerprint its version wrote).
        fn upgraded_probe(recorded: &[u16], earlier: &'static [&'static [u16]]) -> Resumed {
            let mem = mem();
            let file = region();
            let mut t = MmioTransport::new(
                Box::new(ProbeDevice {
                    earlier,
                    ..ProbeDevice::default()
                }),
                mem,
                Box::new(NoopRegistrar),
            );
            earlier_setup_record(&t, &file, recorded);
            t.attach_state(file, MMIO).unwrap()
        }

        #[test]
        fn a_record_of_an_earlier_version_with_smaller_queues_is_resumed() {
            // ProbeDevice offers queues of 16 and 8.
            assert_eq!(upgraded_probe(&[8, 8], &[&[8, 8]]), Resumed::Configuring);
            // Not declared: another configuration.
            assert_eq!(upgraded_probe(&[8, 8], &[]), Resumed::Failed);
            // A driver may have set up 32 entries there: not this device's to resume.
            assert_eq!(upgraded_probe(&[32, 8], &[&[32, 8]]), Resumed::Failed);
            // Another queue count is never an earlier version of this device.
            assert_eq!(upgraded_probe(&[8], &[&[8]]), Resumed::Failed);
        }

        #[test]
        fn a_block_device_resumes_the_record_of_the_version_with_a_queue_of_256() {
            use crate::devices::block::{BlockBackend, BlockDevice};
            let image = vmm_sys_util::tempfile::TempFile::new().unwrap();
            image.as_file().set_len(16 * 512).unwrap();
            let file = region();
            let mut t = MmioTransport::new(
                Box::new(BlockDevice::new(
                    BlockBackend::open(image.as_path(), false, None).unwrap(),
                )),
                mem(),
                Box::new(NoopRegistrar),
            );
            earlier_setup_record(&t, &file, &[256]);

            assert_eq!(t.attach_state(file, MMIO).unwrap(), Resumed::Configuring);
        }

        #[test]
        fn a_live_device_of_another_configuration_is_failed_not_left_hanging() {
            let mem = mem();
            let file = region();
            let vq = MockSplitQueue::create(&mem, GuestAddress(BASE), 16);
            foreign_block_record(&file, &vq, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
            // The guest's request, in flight when the old device model went away.
            block_request(&mem, &vq, 0);

            let (mut t, resumed) = rng(&mem, &file);

            assert_eq!(resumed, Resumed::Failed);
            assert_eq!(
                vq.used().idx().load(),
                1,
                "the request in flight is returned"
            );
            assert_eq!(status_byte(&mem, 0), VIRTIO_BLK_S_IOERR);
            let status = t.read(reg(VIRTIO_MMIO_STATUS), 4);
            assert_eq!(
                status,
                u64::from(ACK | DRIVER | FEATURES_OK | DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET)
            );
            assert_eq!(
                isr(&t),
                VIRTIO_MMIO_INT_CONFIG | VIRTIO_MMIO_INT_VRING,
                "a configuration-change interrupt says so"
            );
            assert_eq!(t.read(reg(VIRTIO_MMIO_DEVICE_ID), 4), u64::from(BLOCK));

            // A request the driver queues afterwards fails on its notify, through the
            // transport and through the queue's eventfd (the dispatcher's ioeventfd).
            block_request(&mem, &vq, 2);
            t.write(reg(VIRTIO_MMIO_QUEUE_NOTIFY), 4, 0);
            assert_eq!(vq.used().idx().load(), 2);
            assert_eq!(status_byte(&mem, 2), VIRTIO_BLK_S_IOERR);
            block_request(&mem, &vq, 4);
            t.notifiers.as_ref().unwrap().queue_evts[0]
                .write(1)
                .unwrap();
            assert_eq!(wait_used(&vq, 3), 3);
            assert_eq!(status_byte(&mem, 4), VIRTIO_BLK_S_IOERR);
        }

        #[test]
        fn after_the_driver_resets_a_failed_device_it_is_this_device_and_works() {
            let mem = mem();
            let file = region();
            let old = MockSplitQueue::create(&mem, GuestAddress(BASE), 16);
            foreign_block_record(&file, &old, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
            let (mut t, resumed) = rng(&mem, &file);
            assert_eq!(resumed, Resumed::Failed);
            assert!(t.is_failed());

            // The guest unbinds and binds the driver again: a reset, then a probe.
            let vq = MockSplitQueue::create(&mem, GuestAddress(BASE + 0x4_0000), 16);
            probe(&mut t, &vq);
            offer(&vq, BASE + 0x9000, 0);
            t.write(reg(VIRTIO_MMIO_QUEUE_NOTIFY), 4, 0);

            assert!(!t.is_failed());
            assert_eq!(t.status(), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
            assert_eq!(t.read(reg(VIRTIO_MMIO_DEVICE_ID), 4), 4, "this device: rng");
            assert_eq!(wait_used(&vq, 1), 1, "served by the rng device");
            // And its own record replaced the foreign one: a restart resumes it.
            drop(t);
            let (_again, resumed) = rng(&mem, &file);
            assert_eq!(resumed, Resumed::Live);
        }

        #[test]
        fn a_device_model_restarted_while_the_window_is_failed_fails_it_again() {
            let mem = mem();
            let file = region();
            let vq = MockSplitQueue::create(&mem, GuestAddress(BASE), 16);
            foreign_block_record(&file, &vq, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
            let (first, resumed) = rng(&mem, &file);
            assert_eq!(resumed, Resumed::Failed);
            drop(first);
            block_request(&mem, &vq, 0);

            let (_second, resumed) = rng(&mem, &file);

            assert_eq!(resumed, Resumed::Failed);
            assert_eq!(status_byte(&mem, 0), VIRTIO_BLK_S_IOERR);
        }

        #[test]
        fn corrupt_slots_fail_the_window_with_needs_reset_and_a_reset_makes_it_fresh() {
            let mem = mem();
            let file = region();
            let junk = vec![0xa5u8; usize::try_from(crate::persist::REGION_LEN).unwrap()];
            file.write_all_at(&junk, 0).unwrap();

            let (mut t, resumed) = rng(&mem, &file);

            assert_eq!(resumed, Resumed::Failed);
            assert_eq!(t.status(), VIRTIO_CONFIG_S_NEEDS_RESET);
            assert_ne!(isr(&t) & VIRTIO_MMIO_INT_CONFIG, 0);
            // A driver that had not started resets the device first: a probe works.
            let vq = MockSplitQueue::create(&mem, GuestAddress(BASE), 16);
            probe(&mut t, &vq);
            offer(&vq, BASE + 0x9000, 0);
            t.write(reg(VIRTIO_MMIO_QUEUE_NOTIFY), 4, 0);
            assert_eq!(t.status(), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
            assert_eq!(wait_used(&vq, 1), 1);
        }

        #[test]
        fn a_record_of_another_queue_count_fails_the_window() {
            let mem = mem();
            let file = region();
            let vq = MockSplitQueue::create(&mem, GuestAddress(BASE), 16);
            let (mut first, _) = rng(&mem, &file);
            probe(&mut first, &vq);
            drop(first);
            // The same fingerprint, a record of two queues (rng has one).
            let fp = MmioTransport::new(
                Box::new(RngDevice::new(None)),
                mem.clone(),
                Box::new(NoopRegistrar),
            )
            .fingerprint(MMIO);
            let (mut region, _) = StateRegion::open(file.try_clone().unwrap(), fp, &[], 2).unwrap();
            let mut two = TransportState {
                status: ACK | DRIVER | FEATURES_OK | DRIVER_OK,
                device_type: 4,
                ..TransportState::default()
            };
            two.queues = vec![QueueState::default(); 2];
            region.write(&two).unwrap();

            let (t, resumed) = rng(&mem, &file);

            assert_eq!(resumed, Resumed::Failed);
            assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        }

        /// A record of another configuration whose driver had reset the device (Status 0):
        /// nothing of the driver's is in the rings and its next probe begins with a reset, so
        /// the device starts fresh. A driver still setting up is failed instead (see
        /// `fail_window`): its queue setup is followed and its requests fail.
        #[test]
        fn another_configuration_starts_fresh_only_where_its_driver_had_reset_it() {
            let mem = mem();
            let vq = MockSplitQueue::create(&mem, GuestAddress(BASE), 16);
            let reset = region();
            foreign_block_record(&reset, &vq, 0);
            let (fresh, resumed) = rng(&mem, &reset);
            assert_eq!(resumed, Resumed::Fresh);
            assert_eq!(fresh.status(), 0);

            let setting_up = region();
            foreign_block_record(&setting_up, &vq, ACK | DRIVER | FEATURES_OK);
            let (mut t, resumed) = rng(&mem, &setting_up);
            assert_eq!(resumed, Resumed::Failed);
            // The driver goes on: DRIVER_OK, then a request on the queue it programmed.
            let new_vq = MockSplitQueue::create(&mem, GuestAddress(BASE + 0x4_0000), 16);
            t.write(reg(VIRTIO_MMIO_QUEUE_SEL), 4, 0);
            t.write(reg(VIRTIO_MMIO_QUEUE_NUM), 4, 16);
            t.write(
                reg(VIRTIO_MMIO_QUEUE_DESC_LOW),
                4,
                new_vq.desc_table_addr().0,
            );
            t.write(reg(VIRTIO_MMIO_QUEUE_AVAIL_LOW), 4, new_vq.avail_addr().0);
            t.write(reg(VIRTIO_MMIO_QUEUE_USED_LOW), 4, new_vq.used_addr().0);
            t.write(reg(VIRTIO_MMIO_QUEUE_READY), 4, 1);
            t.write(
                reg(VIRTIO_MMIO_STATUS),
                4,
                u64::from(ACK | DRIVER | FEATURES_OK | DRIVER_OK),
            );
            block_request(&mem, &new_vq, 0);
            t.write(reg(VIRTIO_MMIO_QUEUE_NOTIFY), 4, 0);

            assert_eq!(new_vq.used().idx().load(), 1);
            assert_eq!(status_byte(&mem, 0), VIRTIO_BLK_S_IOERR);
            assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        }
    }
}
