//! The request loop: one thread per device takes requests from its `DmSession` (ATTACH),
//! decodes them into register accesses on the [`MmioTransport`] and completes them; and
//! [`serve`], which sets up every device of a [`Config`].
//!
//! The same code serves remio's dispatcher and the C driver; where they differ
//! ([`remio_api::DriverTraits`]) it does what both survive: eventfds registered once per
//! device and kept across resets, ATTACH retried after a signal, sessions never closed while
//! their device is meant to serve, and no silent fallback to a control path the driver does
//! not have.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use remio_abi::uapi::{BAO_IO_READ, BAO_IO_WRITE};
use remio_api::{ApiError, DmApi, DmSession, IoeventfdSpec, StatusWordSpec, VirtioRequest};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS, VIRTIO_MMIO_QUEUE_NOTIFY,
};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{Config, DeviceConfig};
use crate::devices::build_device;
use crate::transport::{MmioTransport, NotifyRegistrar, RegistrarError};
use remio_ratelimit::{error_rl, warn_rl};

/// Errors setting up the devices of a config.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Opening the DM, or mapping its shared memory, failed.
    #[error("DM {dm_id}: {source}")]
    Session {
        /// The DM.
        dm_id: u32,
        /// The cause.
        #[source]
        source: ApiError,
    },
    /// The device backend (image, TAP, PTY, socket) could not be opened.
    #[error("DM {dm_id}: device backend: {source}")]
    Backend {
        /// The DM.
        dm_id: u32,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The device's eventfds could not be registered with the dispatcher.
    #[error("DM {dm_id}: {source}")]
    Notifiers {
        /// The DM.
        dm_id: u32,
        /// The cause.
        #[source]
        source: RegistrarError,
    },
    /// The runner thread could not be started.
    #[error("DM {dm_id}: cannot spawn the runner: {source}")]
    Spawn {
        /// The DM.
        dm_id: u32,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Registers a device's eventfds through its session: one ioeventfd per queue on
/// QueueNotify (len 4, datamatch = queue index) and one irqfd (spec/remote-io.md, "How a
/// virtio device model uses it"). Where the dispatcher routes unmatched QueueNotify writes to
/// the control client (remio), a refused ioeventfd falls back to the control path with a
/// warning; where it drops them (the C driver), a refused ioeventfd is an error.
pub struct SessionRegistrar {
    session: Arc<dyn DmSession>,
    notify_addr: u64,
    /// Which queue ioeventfds were assigned (a refused one is served by the control path).
    assigned: Vec<bool>,
}

impl std::fmt::Debug for SessionRegistrar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionRegistrar")
            .field("notify_addr", &self.notify_addr)
            .field("assigned", &self.assigned)
            .finish_non_exhaustive()
    }
}

impl SessionRegistrar {
    /// A registrar for the device whose MMIO window starts at `mmio_base`.
    pub fn new(session: Arc<dyn DmSession>, mmio_base: u64) -> Self {
        Self {
            session,
            notify_addr: mmio_base.saturating_add(u64::from(VIRTIO_MMIO_QUEUE_NOTIFY)),
            assigned: Vec::new(),
        }
    }

    fn spec(&self, queue: usize) -> IoeventfdSpec {
        IoeventfdSpec {
            addr: self.notify_addr,
            len: 4,
            datamatch: Some(queue as u64),
        }
    }
}

impl NotifyRegistrar for SessionRegistrar {
    fn register(&mut self, queue_evts: &[EventFd], irqfd: &EventFd) -> Result<(), RegistrarError> {
        self.session
            .assign_irqfd(irqfd)
            .map_err(RegistrarError::Irqfd)?;
        self.assigned.clear();
        let fallback = self
            .session
            .driver_traits()
            .unmatched_notify_reaches_control;
        for (i, evt) in queue_evts.iter().enumerate() {
            let ok = match self.session.assign_ioeventfd(evt, self.spec(i)) {
                Ok(()) => true,
                Err(e) if fallback => {
                    warn_rl!("virtio: ioeventfd for queue {i} refused ({e}); QueueNotify will use the control path");
                    false
                }
                Err(source) => return Err(RegistrarError::Ioeventfd { queue: i, source }),
            };
            self.assigned.push(ok);
        }
        Ok(())
    }

    fn unregister(&mut self, queue_evts: &[EventFd], irqfd: &EventFd) {
        if self.session.driver_traits().session_end_destroys_dm {
            // The registrations go with the DM when the session ends, and the posted
            // driver's DEASSIGN would assign the eventfd again anyway.
            self.assigned.clear();
            return;
        }
        for (i, evt) in queue_evts.iter().enumerate() {
            if self.assigned.get(i).copied().unwrap_or(false) {
                if let Err(e) = self.session.deassign_ioeventfd(evt, self.spec(i)) {
                    warn_rl!("virtio: deassigning ioeventfd of queue {i}: {e}");
                }
            }
        }
        self.assigned.clear();
        if let Err(e) = self.session.deassign_irqfd(irqfd) {
            warn_rl!("virtio: deassigning irqfd: {e}");
        }
    }
}

/// Registers the session's status word on InterruptStatus/InterruptACK of the device whose
/// window starts at `mmio_base` and keeps the transport's InterruptStatus in it, so that the
/// dispatcher answers those registers and the runner never sees them. Call it before the
/// driver can reach DRIVER_OK (at setup). Where the session has no status word (the kernel
/// driver: [`ApiError::NotSupported`]) or refuses it, the transport keeps serving the
/// registers itself, as before; also on a transport already active (too late to move the
/// word). Returns whether the word is in use.
pub fn share_interrupt_status(
    session: &dyn DmSession,
    transport: &mut MmioTransport,
    mmio_base: u64,
) -> bool {
    let spec = StatusWordSpec {
        status_addr: mmio_base.saturating_add(u64::from(VIRTIO_MMIO_INTERRUPT_STATUS)),
        ack_addr: mmio_base.saturating_add(u64::from(VIRTIO_MMIO_INTERRUPT_ACK)),
    };
    let dm_id = session.info().id;
    if transport.is_active() {
        // Activation handed the local word to the device: too late to move it.
        log::warn!("virtio: DM {dm_id}: transport already active; InterruptStatus served here");
        return false;
    }
    match session.register_status_word(spec) {
        Ok(word) => {
            let used = transport.use_status_word(word);
            log::debug!("virtio: DM {dm_id}: InterruptStatus answered by the dispatcher: {used}");
            used
        }
        Err(ApiError::NotSupported(_)) => {
            log::debug!("virtio: DM {dm_id}: no status word; InterruptStatus served here");
            false
        }
        Err(e) => {
            log::warn!(
                "virtio: DM {dm_id}: status word refused ({e}); InterruptStatus served here"
            );
            false
        }
    }
}

/// Records the transport's state in the DM's state region, resuming the device from it first
/// if a previous device model left a record there (see [`crate::persist`]). Where the session
/// has no state region (the C driver), the device starts fresh, as before; a region that
/// cannot be used is logged and the device starts fresh too.
pub fn resume_from_state_region(
    session: &dyn DmSession,
    transport: &mut MmioTransport,
    mmio_base: u64,
) {
    let dm_id = session.info().id;
    let file = match session.state_region(crate::persist::REGION_LEN) {
        Ok(f) => f,
        Err(ApiError::NotSupported(_)) => return,
        Err(e) => {
            log::warn!(
                "virtio: DM {dm_id}: no state region ({e}); a restart will reset the device"
            );
            return;
        }
    };
    match transport.attach_state(file, mmio_base) {
        // A failed window was already reported by the transport, in one line that says why.
        Ok(crate::transport::Resumed::Fresh | crate::transport::Resumed::Failed) => {}
        Ok(r) => log::info!("virtio: DM {dm_id}: resumed from the previous device model: {r:?}"),
        Err(e) => log::warn!(
            "virtio: DM {dm_id}: state region unusable ({e}); a restart will reset the device"
        ),
    }
}

/// Turns one request into a register access and returns the completed request.
///
/// `addr` is guest-physical: the offset is `addr - mmio_base`; an access not wholly inside
/// `[mmio_base, mmio_base + mmio_size)`, an unknown op or width is logged and answered with 0.
pub fn handle_request(
    transport: &mut MmioTransport,
    mmio_base: u64,
    mmio_size: u64,
    req: &VirtioRequest,
) -> VirtioRequest {
    let mut done = *req;
    let width = match req.access_width {
        1 => Some(1),
        2 => Some(2),
        4 => Some(4),
        8 => Some(8),
        _ => None,
    };
    // The whole access [offset, offset + width) must be inside the window (conventions §6).
    let offset = req.addr.checked_sub(mmio_base).filter(|&o| {
        o.checked_add(req.access_width)
            .is_some_and(|end| end <= mmio_size)
    });
    let (Some(offset), Some(width)) = (offset, width) else {
        warn_rl!(
            "virtio: request at {:#x} width {} outside the device window",
            req.addr,
            req.access_width
        );
        if req.op == BAO_IO_READ {
            done.value = 0;
        }
        return done;
    };
    match req.op {
        BAO_IO_READ => done.value = transport.read(offset, width),
        BAO_IO_WRITE => {
            let mask = if width == 8 {
                u64::MAX
            } else {
                (1u64 << (width * 8)) - 1
            };
            transport.write(offset, width, req.value & mask);
        }
        op => warn_rl!("virtio: request with unknown op {op}"),
    }
    done
}

/// One device: its session, transport and request thread.
pub struct DeviceRunner {
    dm_id: u32,
    session: Arc<dyn DmSession>,
    /// `None` for an absent device ([`DeviceRunner::spawn_absent`]).
    transport: Option<Arc<Mutex<MmioTransport>>>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DeviceRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceRunner")
            .field("dm_id", &self.dm_id)
            .field("stopping", &self.stopping)
            .finish_non_exhaustive()
    }
}

impl DeviceRunner {
    /// Starts the request thread of a device: ATTACH, decode, complete, until the session
    /// reports [`ApiError::ShuttingDown`] / [`ApiError::Disconnected`] or the runner is
    /// stopped (checked after each request).
    pub fn spawn(
        session: Arc<dyn DmSession>,
        transport: MmioTransport,
        mmio_base: u64,
        mmio_size: u64,
    ) -> std::io::Result<Self> {
        let transport = Arc::new(Mutex::new(transport));
        let t = transport.clone();
        Self::start(session, Some(transport), move |req| {
            let mut t = match t.lock() {
                Ok(t) => t,
                Err(p) => p.into_inner(),
            };
            handle_request(&mut t, mmio_base, mmio_size, req)
        })
    }

    /// Serves a DM whose device could not start, as an absent device: every read answers 0
    /// (MagicValue 0: Linux's virtio-mmio probe gives up with "Wrong magic value"), writes
    /// are ignored. For a dispatcher where closing the session would destroy the DM and
    /// leave the frontend's accesses to it unanswered forever (the C driver, no timeout on
    /// Bao).
    pub fn spawn_absent(session: Arc<dyn DmSession>) -> std::io::Result<Self> {
        Self::start(session, None, |req| VirtioRequest {
            value: if req.op == BAO_IO_READ { 0 } else { req.value },
            ..*req
        })
    }

    fn start(
        session: Arc<dyn DmSession>,
        transport: Option<Arc<Mutex<MmioTransport>>>,
        handle: impl FnMut(&VirtioRequest) -> VirtioRequest + Send + 'static,
    ) -> std::io::Result<Self> {
        let dm_id = session.info().id;
        let stopping = Arc::new(AtomicBool::new(false));
        let (s, sess) = (stopping.clone(), session.clone());
        let thread = std::thread::Builder::new()
            .name(format!("remio-dm{dm_id}"))
            .spawn(move || run(&*sess, &s, handle))?;
        Ok(Self {
            dm_id,
            session,
            transport,
            stopping,
            thread: Some(thread),
        })
    }

    /// The DM this runner serves.
    pub fn dm_id(&self) -> u32 {
        self.dm_id
    }

    /// The transport (to inspect it, or to reset it); `None` for an absent device.
    pub fn transport(&self) -> Option<&Arc<Mutex<MmioTransport>>> {
        self.transport.as_ref()
    }

    /// Whether the request thread has exited.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the device: resets the transport (device workers stopped, eventfds deassigned),
    /// then shuts the session down ([`DmSession::shutdown`]) so that the request thread,
    /// blocked in ATTACH or not, exits, and joins it. A request being handled is answered
    /// first. If the session cannot shut down (the kernel driver), the thread exits after the
    /// next request or when the DM is destroyed, and is not waited for here.
    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(t) = &self.transport {
            match t.lock() {
                Ok(mut t) => t.reset(),
                Err(p) => p.into_inner().reset(),
            }
        }
        let shut = match self.session.shutdown() {
            Ok(()) => true,
            Err(e) => {
                log::debug!(
                    "virtio: DM {}: session shutdown: {e}; the runner exits at the next request",
                    self.dm_id
                );
                false
            }
        };
        if shut || self.is_finished() {
            self.join();
        }
    }

    /// Waits for the request thread to exit.
    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("virtio: runner of DM {} panicked", self.dm_id);
            }
        }
    }
}

/// The request loop: ATTACH, `handle`, COMPLETE, until the session ends or `stopping`.
fn run(
    session: &dyn DmSession,
    stopping: &AtomicBool,
    mut handle: impl FnMut(&VirtioRequest) -> VirtioRequest,
) {
    let dm_id = session.info().id;
    let mut failures = 0u32;
    while !stopping.load(Ordering::SeqCst) {
        let req = match session.attach() {
            Ok(r) => {
                failures = 0;
                r
            }
            Err(e) if e.ends_session() => {
                log::info!("virtio: DM {dm_id}: attach: {e}");
                break;
            }
            Err(e) => {
                // A signal (EFAULT on the posted driver, EINTR), or something unexpected:
                // the frontend may be stalled on this DM with no timeout (Bao), so keep
                // serving. Back off only when it repeats, not to spin on a persistent error.
                failures = failures.saturating_add(1);
                if e.is_transient() {
                    warn_rl!("virtio: DM {dm_id}: attach interrupted ({e}); retrying");
                } else {
                    error_rl!("virtio: DM {dm_id}: attach failed ({e}); retrying");
                }
                if let Some(pause) = attach_backoff(failures) {
                    std::thread::sleep(pause);
                }
                continue;
            }
        };
        let done = handle(&req);
        if let Err(e) = session.complete(&done) {
            warn_rl!("virtio: DM {dm_id}: complete failed: {e}");
            if matches!(e, ApiError::ShuttingDown | ApiError::Disconnected) {
                break;
            }
        }
    }
    log::info!("virtio: DM {dm_id}: runner exits");
}

/// How long to wait before the next ATTACH after `failures` failed ones in a row: none for
/// the first few (a signal is a one-off), then doubling up to 100 ms (a persistent error
/// must not spin a CPU). This is back-off, not synchronisation.
fn attach_backoff(failures: u32) -> Option<Duration> {
    const IMMEDIATE: u32 = 4;
    let exp = failures.checked_sub(IMMEDIATE)?.min(7);
    Some(Duration::from_millis(1u64 << exp).min(Duration::from_millis(100)))
}

/// Everything [`serve`] started.
#[derive(Debug)]
pub struct DeviceModelHandle {
    runners: Vec<DeviceRunner>,
    infos: Vec<DeviceInfo>,
    failures: Vec<ServeError>,
    /// DMs whose device failed, answered as absent devices (see [`serve`]).
    absent: Vec<DeviceRunner>,
}

/// Ends the sessions of a [`DeviceModelHandle`] from another thread (a signal handler's), for
/// a handover: each request thread finishes the request it is on and exits, and the handle's
/// owner returns from [`DeviceModelHandle::wait`]. The transports are left as they are: their
/// state records still say what the guest set up, so that the next device model of these DMs
/// resumes them; their queue workers stop when the handle is dropped (or die with the
/// process). The next device model must not start before this process has exited, or two
/// would serve the same virtqueues.
#[derive(Clone)]
pub struct Stopper {
    runners: Vec<(Arc<AtomicBool>, Arc<dyn DmSession>)>,
}

impl std::fmt::Debug for Stopper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stopper")
            .field("devices", &self.runners.len())
            .finish()
    }
}

impl Stopper {
    /// Ends every session: no new request is taken (requests queued and not taken wait at the
    /// DM for the next device model). Returns whether every session could end (not on the C
    /// driver: there a blocked ATTACH only returns when the DM is destroyed).
    pub fn stop(&self) -> bool {
        let mut all = true;
        for (stopping, session) in &self.runners {
            stopping.store(true, Ordering::SeqCst);
            all &= session.shutdown().is_ok();
        }
        all
    }
}

/// What a started device reports (for the CLI to print).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The DM.
    pub dm_id: u32,
    /// Human-readable description (type, backend, PTY slave path, ...).
    pub description: String,
}

impl DeviceModelHandle {
    /// What was started.
    pub fn devices(&self) -> &[DeviceInfo] {
        &self.infos
    }

    /// The runners (one per device).
    pub fn runners(&self) -> &[DeviceRunner] {
        &self.runners
    }

    /// The devices that could not start while others kept serving (see [`serve`]).
    pub fn failures(&self) -> &[ServeError] {
        &self.failures
    }

    /// Something another thread can stop every device with while this handle waits in
    /// [`DeviceModelHandle::wait`] (a signal handler thread, say).
    pub fn stopper(&self) -> Stopper {
        Stopper {
            runners: self
                .runners
                .iter()
                .chain(&self.absent)
                .map(|r| (r.stopping.clone(), r.session.clone()))
                .collect(),
        }
    }

    /// Stops every device (see [`DeviceRunner::stop`]).
    pub fn stop(mut self) {
        for r in self.runners.iter_mut().chain(&mut self.absent) {
            r.stop();
        }
    }

    /// Blocks until every runner has exited (their sessions shut down).
    pub fn wait(mut self) {
        for r in self.runners.iter_mut().chain(&mut self.absent) {
            r.join();
        }
    }
}

/// Starts every device of `config`: first every device backend (images, TAPs, PTYs,
/// sockets), before any session is opened, so that a bad backend touches no DM; then, per
/// device, the session, its shared memory, its eventfds and its runner.
///
/// A backend that cannot be opened is an error and nothing is started. When a later step
/// fails for one device, what happens to the devices already serving depends on the
/// dispatcher: on remio's (whose DMs outlive their sessions) they are stopped and the error is
/// returned, as before; on the C driver, where ending a session destroys its DM for good
/// ([`remio_api::DriverTraits::session_end_destroys_dm`]), they keep serving and the failure
/// is reported in [`DeviceModelHandle::failures`] instead: a device model never closes a
/// session that is still meant to serve. There, a failed device whose session was opened
/// keeps it and answers as an absent device ([`DeviceRunner::spawn_absent`]), so that its
/// frontend's probe fails cleanly instead of waiting forever on a destroyed DM.
pub fn serve(api: &dyn DmApi, config: &Config) -> Result<DeviceModelHandle, ServeError> {
    let mut built = Vec::with_capacity(config.devices.len());
    for dev in &config.devices {
        let dm_id = dev.dm_id;
        let (device, description) =
            build_device(&dev.kind).map_err(|source| ServeError::Backend { dm_id, source })?;
        built.push((dev, device, description));
    }
    let mut handle = DeviceModelHandle {
        runners: Vec::new(),
        infos: Vec::new(),
        failures: Vec::new(),
        absent: Vec::new(),
    };
    // Whether a session that ends takes its DM with it: known once one is open.
    let mut keep_on_failure = false;
    for (dev, device, description) in built {
        match serve_one(api, dev, device, description) {
            Ok((runner, info, destroys)) => {
                keep_on_failure |= destroys;
                handle.runners.push(runner);
                handle.infos.push(info);
            }
            Err(failed) if failed.destroys() || keep_on_failure => {
                let e = failed.error;
                log::error!("virtio: {e}; the other devices keep serving");
                if let Some(session) = failed.session {
                    // Keep the DM, and answer its frontend as an absent device.
                    match DeviceRunner::spawn_absent(session) {
                        Ok(r) => handle.absent.push(r),
                        Err(err) => log::error!("virtio: DM {}: {err}", dev.dm_id),
                    }
                }
                handle.failures.push(e);
            }
            Err(failed) => {
                handle.stop();
                return Err(failed.error);
            }
        }
    }
    Ok(handle)
}

/// A device that could not start, with its session if one was opened.
struct Failed {
    error: ServeError,
    session: Option<Arc<dyn DmSession>>,
}

impl Failed {
    /// Whether ending the session would destroy the DM (unknown, `false`, without one).
    fn destroys(&self) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| s.driver_traits().session_end_destroys_dm)
    }
}

/// How long a device model waits for its DM's previous session to end (EBUSY): the platform
/// ends a dead device model's session when it sees its connection close, which can be just
/// after a restarted or taking-over one connects.
const SESSION_FREE_WAIT: Duration = Duration::from_secs(2);

/// Opens a session on `dm_id`, retrying while the DM still has the previous one (bounded by
/// [`SESSION_FREE_WAIT`]).
fn open_when_free(api: &dyn DmApi, dm_id: u32) -> Result<Box<dyn DmSession>, ApiError> {
    let start = std::time::Instant::now();
    loop {
        match api.open(dm_id) {
            Err(ApiError::Busy(_)) if start.elapsed() < SESSION_FREE_WAIT => {
                std::thread::sleep(Duration::from_millis(2));
            }
            other => return other,
        }
    }
}

/// One device, whose backend is built. Also says whether sessions on this API destroy their
/// DM when they end.
fn serve_one(
    api: &dyn DmApi,
    dev: &DeviceConfig,
    device: Box<dyn crate::device::VirtioDevice>,
    description: String,
) -> Result<(DeviceRunner, DeviceInfo, bool), Failed> {
    let dm_id = dev.dm_id;
    let session: Arc<dyn DmSession> = match open_when_free(api, dm_id) {
        Ok(s) => Arc::from(s),
        Err(source) => {
            return Err(Failed {
                error: ServeError::Session { dm_id, source },
                session: None,
            })
        }
    };
    let destroys = session.driver_traits().session_end_destroys_dm;
    let fail = |error| Failed {
        error,
        session: Some(session.clone()),
    };
    let info = session.info();
    // Virtqueue addresses are the frontend's: map the shared memory where the frontend sees
    // it. On Bao both VMs see it at the DM's shmem_addr; the config names it when they differ.
    let frontend_base = dev.shmem_addr.unwrap_or(info.shmem_addr);
    if frontend_base != info.shmem_addr {
        log::info!(
            "virtio: DM {dm_id}: shared memory at {:#x} here, at {frontend_base:#x} for the frontend",
            info.shmem_addr
        );
    }
    let mem = session
        .map_shmem_at(info.shmem_size, frontend_base)
        .map_err(|source| fail(ServeError::Session { dm_id, source }))?;
    log::info!("virtio: DM {dm_id}: {description} at {:#x}", dev.mmio_base);
    let registrar = SessionRegistrar::new(session.clone(), dev.mmio_base);
    let mut device = device;
    device.attach_session(&session);
    let mut transport = MmioTransport::new(device, mem, Box::new(registrar));
    transport
        .register_notifiers()
        .map_err(|source| fail(ServeError::Notifiers { dm_id, source }))?;
    share_interrupt_status(&*session, &mut transport, dev.mmio_base);
    resume_from_state_region(&*session, &mut transport, dev.mmio_base);
    let runner = DeviceRunner::spawn(session.clone(), transport, dev.mmio_base, dev.mmio_size)
        .map_err(|source| fail(ServeError::Spawn { dm_id, source }))?;
    Ok((runner, DeviceInfo { dm_id, description }, destroys))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::rng::RngDevice;
    use remio_api::DmInfo;
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::time::Duration;
    use virtio_bindings::virtio_mmio::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const SHMEM: u64 = 0x5000_0000;
    const MMIO: u64 = 0x0a00_3e00;

    /// A channel-backed session: requests are fed by the test, completions collected,
    /// eventfd registrations recorded. Dropping the request sender shuts it down.
    struct FakeSession {
        requests: Mutex<Receiver<VirtioRequest>>,
        completions: Mutex<Sender<VirtioRequest>>,
        mem: GuestMemoryMmap,
        ioeventfds: Arc<Mutex<Vec<(EventFd, IoeventfdSpec)>>>,
        irqfds: Arc<Mutex<Vec<EventFd>>>,
        deassigned: Arc<Mutex<Vec<IoeventfdSpec>>>,
    }

    impl DmSession for FakeSession {
        fn info(&self) -> DmInfo {
            DmInfo {
                id: 0,
                shmem_addr: SHMEM,
                shmem_size: 0x10_0000,
                irq: 47,
            }
        }
        fn attach(&self) -> remio_api::Result<VirtioRequest> {
            self.requests
                .lock()
                .unwrap()
                .recv()
                .map_err(|_| ApiError::ShuttingDown)
        }
        fn complete(&self, req: &VirtioRequest) -> remio_api::Result<()> {
            self.completions
                .lock()
                .unwrap()
                .send(*req)
                .map_err(|_| ApiError::Disconnected)
        }
        fn assign_ioeventfd(&self, fd: &EventFd, spec: IoeventfdSpec) -> remio_api::Result<()> {
            self.ioeventfds
                .lock()
                .unwrap()
                .push((fd.try_clone()?, spec));
            Ok(())
        }
        fn deassign_ioeventfd(&self, _fd: &EventFd, spec: IoeventfdSpec) -> remio_api::Result<()> {
            let mut v = self.ioeventfds.lock().unwrap();
            let before = v.len();
            v.retain(|(_, s)| *s != spec);
            if v.len() == before {
                return Err(ApiError::NotFound("ioeventfd".into()));
            }
            self.deassigned.lock().unwrap().push(spec);
            Ok(())
        }
        fn assign_irqfd(&self, fd: &EventFd) -> remio_api::Result<()> {
            self.irqfds.lock().unwrap().push(fd.try_clone()?);
            Ok(())
        }
        fn deassign_irqfd(&self, _fd: &EventFd) -> remio_api::Result<()> {
            self.irqfds
                .lock()
                .unwrap()
                .pop()
                .map(drop)
                .ok_or_else(|| ApiError::NotFound("irqfd".into()))
        }
        fn map_shmem_at(&self, _len: u64, _base: u64) -> remio_api::Result<GuestMemoryMmap> {
            Ok(self.mem.clone())
        }
    }

    /// The frontend side of the fake: issues accesses and waits for their completion.
    struct Bus {
        tx: Sender<VirtioRequest>,
        done: Receiver<VirtioRequest>,
        next_id: u64,
    }

    impl Bus {
        fn access(&mut self, op: u64, offset: u32, value: u64) -> u64 {
            self.next_id += 1;
            let req = VirtioRequest {
                dm_id: 0,
                addr: MMIO + u64::from(offset),
                op,
                value,
                access_width: 4,
                request_id: self.next_id,
            };
            self.tx.send(req).unwrap();
            let done = self.done.recv_timeout(Duration::from_secs(5)).unwrap();
            assert_eq!(done.request_id, self.next_id);
            done.value
        }
        fn read(&mut self, offset: u32) -> u64 {
            self.access(BAO_IO_READ, offset, 0)
        }
        fn write(&mut self, offset: u32, value: u64) {
            self.access(BAO_IO_WRITE, offset, value);
        }
    }

    /// Waits (up to 5 s) for a non-blocking eventfd to be signalled.
    fn wait_evt(evt: &EventFd) {
        for _ in 0..5000 {
            if evt.read().is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("eventfd not signalled");
    }

    #[test]
    fn driver_ok_registers_ioeventfd_and_irqfd_and_rekicks_the_queue() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(SHMEM), 0x10_0000)]).unwrap();
        let (tx, rx) = channel();
        let (done_tx, done) = channel();
        let ioeventfds = Arc::new(Mutex::new(Vec::new()));
        let irqfds = Arc::new(Mutex::new(Vec::new()));
        let deassigned = Arc::new(Mutex::new(Vec::new()));
        let session: Arc<dyn DmSession> = Arc::new(FakeSession {
            requests: Mutex::new(rx),
            completions: Mutex::new(done_tx),
            mem: mem.clone(),
            ioeventfds: ioeventfds.clone(),
            irqfds: irqfds.clone(),
            deassigned: deassigned.clone(),
        });
        let registrar = SessionRegistrar::new(session.clone(), MMIO);
        let transport = MmioTransport::new(
            Box::new(RngDevice::new(None)),
            mem.clone(),
            Box::new(registrar),
        );
        let mut runner = DeviceRunner::spawn(session, transport, MMIO, 0x200).unwrap();
        let mut bus = Bus {
            tx,
            done,
            next_id: 0,
        };
        // A request the driver made available before DRIVER_OK (its notify is lost).
        let vq = MockSplitQueue::create(&mem, GuestAddress(SHMEM), 16);
        let w = u16::try_from(VRING_DESC_F_WRITE).unwrap();
        vq.add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(
                SHMEM + 0x8000,
                32,
                w,
                0,
            ))],
            0,
        )
        .unwrap();

        // The Linux probe, through requests.
        assert_eq!(bus.read(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(bus.read(VIRTIO_MMIO_DEVICE_ID), 4);
        bus.write(VIRTIO_MMIO_STATUS, 0);
        bus.write(VIRTIO_MMIO_STATUS, 1);
        bus.write(VIRTIO_MMIO_STATUS, 3);
        bus.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        bus.write(VIRTIO_MMIO_DRIVER_FEATURES, 1);
        bus.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        bus.write(VIRTIO_MMIO_DRIVER_FEATURES, 0);
        bus.write(VIRTIO_MMIO_STATUS, 0xb);
        assert_eq!(bus.read(VIRTIO_MMIO_STATUS), 0xb);
        bus.write(VIRTIO_MMIO_QUEUE_SEL, 0);
        bus.write(VIRTIO_MMIO_QUEUE_NUM, 16);
        bus.write(VIRTIO_MMIO_QUEUE_DESC_LOW, vq.desc_table_addr().0);
        bus.write(VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        bus.write(VIRTIO_MMIO_QUEUE_AVAIL_LOW, vq.avail_addr().0);
        bus.write(VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        bus.write(VIRTIO_MMIO_QUEUE_USED_LOW, vq.used_addr().0);
        bus.write(VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        bus.write(VIRTIO_MMIO_QUEUE_READY, 1);
        assert!(ioeventfds.lock().unwrap().is_empty());
        bus.write(VIRTIO_MMIO_STATUS, 0xf);

        // Registered at DRIVER_OK: one ioeventfd on QueueNotify matching queue 0, one irqfd.
        let specs: Vec<IoeventfdSpec> = ioeventfds.lock().unwrap().iter().map(|e| e.1).collect();
        assert_eq!(
            specs,
            vec![IoeventfdSpec {
                addr: MMIO + 0x50,
                len: 4,
                datamatch: Some(0)
            }]
        );
        let irq = irqfds.lock().unwrap()[0].try_clone().unwrap();
        // The re-kick served the request made available before DRIVER_OK.
        wait_evt(&irq);
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(bus.read(VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        bus.write(VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert_eq!(bus.read(VIRTIO_MMIO_INTERRUPT_STATUS), 0);

        // A notify delivered through the ioeventfd (what the dispatcher does) is served.
        vq.add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(
                SHMEM + 0x9000,
                32,
                w,
                0,
            ))],
            1,
        )
        .unwrap();
        ioeventfds.lock().unwrap()[0].0.write(1).unwrap();
        wait_evt(&irq);
        assert_eq!(vq.used().idx().load(), 2);

        // Reset keeps the registrations for the next activation.
        bus.write(VIRTIO_MMIO_STATUS, 0);
        assert!(deassigned.lock().unwrap().is_empty());
        assert_eq!(irqfds.lock().unwrap().len(), 1);
        assert_eq!(bus.read(VIRTIO_MMIO_STATUS), 0);

        // The session shutting down ends the runner; the device going away deassigns exactly
        // what was assigned.
        drop(bus);
        runner.join();
        assert!(runner.is_finished());
        drop(runner);
        assert_eq!(*deassigned.lock().unwrap(), specs);
        assert!(irqfds.lock().unwrap().is_empty());
    }

    /// The real platform: the hypervisor model (frontend VM 1, backend VM 2, one device),
    /// its dispatcher with DM 0, and the in-process API.
    fn platform() -> (Arc<remio_hyp::Hypervisor>, Arc<remio_api::InProcessApi>) {
        use remio_hyp::{HypConfig, Hypervisor, RemioDeviceConfig, Role, ShmemConfig, VmConfig};
        let dev = |role, mmio_size, irq| RemioDeviceConfig {
            bind_key: 1,
            role,
            mmio_base: if mmio_size > 0 { MMIO } else { 0 },
            mmio_size,
            irq,
            shmem_id: 0,
            shmem_base: SHMEM,
        };
        let hyp = Hypervisor::new(HypConfig {
            shmem: vec![ShmemConfig {
                id: 0,
                size: 0x10_0000,
                backing: None,
            }],
            vms: vec![
                VmConfig {
                    id: 1,
                    remio_devices: vec![dev(Role::Frontend, 0x200, 40)],
                },
                VmConfig {
                    id: 2,
                    remio_devices: vec![dev(Role::Backend, 0, 52)],
                },
            ],
            slots: 2,
            timeout: Some(Duration::from_secs(20)),
        })
        .unwrap();
        let backend = hyp.backend(2).unwrap();
        let d = backend.device(0).unwrap();
        let dispatcher =
            remio_dispatcher::Dispatcher::new(Arc::new(backend.clone()), Arc::new(backend.clone()));
        dispatcher
            .create_dm(remio_dispatcher::DmDescription {
                id: 0,
                shmem_addr: d.shmem_base,
                shmem_size: d.shmem_size,
                irq: d.irq,
                shmem: Some(d.shmem.clone()),
            })
            .unwrap();
        (hyp, Arc::new(remio_api::InProcessApi::new(dispatcher)))
    }

    #[test]
    fn a_new_device_model_waits_for_the_previous_session_of_its_dm_to_end() {
        let (_hyp, api) = platform();
        let previous = api.open(0).unwrap();
        let ender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(previous);
        });

        let opened = open_when_free(api.as_ref(), 0);

        ender.join().unwrap();
        assert!(opened.is_ok(), "{:?}", opened.err());
    }

    #[test]
    fn stop_with_no_request_pending_ends_the_runner_blocked_in_attach() {
        let (hyp, api) = platform();
        let session: Arc<dyn DmSession> = Arc::from(api.open(0).unwrap());
        let mem = session.map_shmem(session.info().shmem_size).unwrap();
        let registrar = SessionRegistrar::new(session.clone(), MMIO);
        let transport =
            MmioTransport::new(Box::new(RngDevice::new(None)), mem, Box::new(registrar));
        let mut runner = DeviceRunner::spawn(session, transport, MMIO, 0x200).unwrap();
        // One request served: the runner is in its ATTACH loop, and nothing else is coming.
        let fe = hyp.frontend(1).unwrap();
        assert_eq!(fe.read(MMIO, 4).unwrap(), 0x7472_6976);

        // Stopped on another thread, so that a stop that never returns fails the test.
        let (tx, rx) = channel();
        let stopper = std::thread::spawn(move || {
            runner.stop();
            tx.send(runner.is_finished()).unwrap();
        });

        assert_eq!(rx.recv_timeout(Duration::from_secs(20)), Ok(true));
        stopper.join().unwrap();
        // The DM is free for the next device model.
        assert!(api.open(0).is_ok());
    }

    #[test]
    fn with_a_status_word_interrupt_status_never_reaches_the_runner() {
        let (hyp, api) = platform();
        let session: Arc<dyn DmSession> = Arc::from(api.open(0).unwrap());
        let mem = session.map_shmem(session.info().shmem_size).unwrap();
        let registrar = SessionRegistrar::new(session.clone(), MMIO);
        let mut transport =
            MmioTransport::new(Box::new(RngDevice::new(None)), mem, Box::new(registrar));
        assert!(share_interrupt_status(&*session, &mut transport, MMIO));
        let word = transport.shared_status().interrupt_status.clone();
        let mut runner = DeviceRunner::spawn(session, transport, MMIO, 0x200).unwrap();
        let fe = hyp.frontend(1).unwrap();
        let dm = api.dispatcher().dm(0).unwrap();

        word.fetch_or(
            VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG,
            Ordering::SeqCst,
        );
        assert_eq!(fe.read(MMIO + 0x60, 4).unwrap(), 3);
        fe.write(MMIO + 0x64, 4, 1).unwrap();
        assert_eq!(word.load(Ordering::SeqCst), 2);
        assert_eq!(dm.stats().to_status_word, 2);
        assert_eq!(dm.stats().to_control, 0, "the runner saw none of them");

        // Status 0 reaches the runner; the reset clears the word the dispatcher answers from.
        fe.write(MMIO + 0x70, 4, 0).unwrap();
        assert_eq!(fe.read(MMIO + 0x60, 4).unwrap(), 0);
        runner.stop();
    }

    #[test]
    fn without_a_status_word_the_runner_serves_interrupt_status_and_ack() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(SHMEM), 0x1000)]).unwrap();
        let (tx, rx) = channel();
        let (done_tx, done) = channel();
        let session: Arc<dyn DmSession> = Arc::new(FakeSession {
            requests: Mutex::new(rx),
            completions: Mutex::new(done_tx),
            mem: mem.clone(),
            ioeventfds: Arc::default(),
            irqfds: Arc::default(),
            deassigned: Arc::default(),
        });
        let registrar = SessionRegistrar::new(session.clone(), MMIO);
        let mut transport =
            MmioTransport::new(Box::new(RngDevice::new(None)), mem, Box::new(registrar));
        // The fake, like the kernel driver, has no status word (NotSupported).
        assert!(!share_interrupt_status(&*session, &mut transport, MMIO));
        let word = transport.shared_status().interrupt_status.clone();
        assert!(!word.is_shared());
        let mut runner = DeviceRunner::spawn(session, transport, MMIO, 0x200).unwrap();
        let mut bus = Bus {
            tx,
            done,
            next_id: 0,
        };

        word.fetch_or(3, Ordering::SeqCst);
        assert_eq!(bus.read(VIRTIO_MMIO_INTERRUPT_STATUS), 3);
        bus.write(VIRTIO_MMIO_INTERRUPT_ACK, 2);
        assert_eq!(word.load(Ordering::SeqCst), 1);
        drop(bus);
        runner.join();
    }

    struct NoDms;

    impl DmApi for NoDms {
        fn open(&self, dm_id: u32) -> remio_api::Result<Box<dyn DmSession>> {
            Err(ApiError::NoSuchDm(dm_id))
        }
    }

    #[test]
    fn serve_reports_the_dm_that_cannot_be_opened() {
        let config =
            Config::from_toml_str("[[device]]\ndm_id = 7\ntype = \"rng\"\nmmio_base = 0x1000\n")
                .unwrap();

        let err = serve(&NoDms, &config).unwrap_err();

        assert!(matches!(
            err,
            ServeError::Session {
                dm_id: 7,
                source: ApiError::NoSuchDm(7)
            }
        ));
    }

    #[test]
    fn request_outside_the_window_reads_zero() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(SHMEM), 0x1000)]).unwrap();
        let mut t = MmioTransport::new(
            Box::new(RngDevice::new(None)),
            mem,
            Box::new(crate::transport::NoopRegistrar),
        );
        let req = |addr, width| VirtioRequest {
            dm_id: 0,
            addr,
            op: BAO_IO_READ,
            value: 0xdead,
            access_width: width,
            request_id: 3,
        };

        assert_eq!(
            handle_request(&mut t, MMIO, 0x200, &req(MMIO - 4, 4)).value,
            0
        );
        assert_eq!(
            handle_request(&mut t, MMIO, 0x200, &req(MMIO + 0x200, 4)).value,
            0
        );
        assert_eq!(handle_request(&mut t, MMIO, 0x200, &req(MMIO, 3)).value, 0);
        // Starts inside, ends outside: refused as a whole (here MagicValue past a 2-byte window).
        assert_eq!(handle_request(&mut t, MMIO, 2, &req(MMIO, 4)).value, 0);
        assert_eq!(
            handle_request(&mut t, u64::MAX - 8, 0x200, &req(u64::MAX - 2, 8)).value,
            0
        );
        assert_eq!(
            handle_request(&mut t, MMIO, 0x200, &req(MMIO, 4)).value,
            0x7472_6976
        );
    }

    // ---- The same device model on the posted C driver (its double) ----

    use remio_api::driver_double::{DriverDouble, WriteRoute};
    use remio_api::KernelApi;

    /// A driver whose device tree has `n` DMs with 1 MiB of shared memory at SHMEM each.
    fn c_driver(n: usize) -> (Arc<DriverDouble>, KernelApi<Arc<DriverDouble>>) {
        c_driver_at(n, SHMEM)
    }

    /// As [`c_driver`], the backend seeing the shared memory at `backend_view`.
    fn c_driver_at(
        n: usize,
        backend_view: u64,
    ) -> (Arc<DriverDouble>, KernelApi<Arc<DriverDouble>>) {
        let info = DmInfo {
            id: 0,
            shmem_addr: backend_view,
            shmem_size: 0x10_0000,
            irq: 52,
        };
        let drv = DriverDouble::new(&vec![info; n]).unwrap();
        let api = KernelApi::with_ioctl(drv.clone(), std::path::Path::new("/dev/x")).unwrap();
        (drv, api)
    }

    fn rng_config(dm_ids: &[u32]) -> Config {
        let mut toml = String::new();
        for (i, id) in dm_ids.iter().enumerate() {
            toml.push_str(&format!(
                "[[device]]\ndm_id = {id}\ntype = \"rng\"\nmmio_base = {}\n",
                MMIO + 0x200 * i as u64
            ));
        }
        Config::from_toml_str(&toml).unwrap()
    }

    /// The frontend side over the driver double: Linux's probe up to DRIVER_OK with one
    /// queue laid out at SHMEM, then one buffer made available and notified.
    struct DoubleFrontend<'a> {
        drv: &'a DriverDouble,
        dm: usize,
        base: u64,
    }

    impl<'a> DoubleFrontend<'a> {
        /// DM 0's device, its window at MMIO.
        fn of_dm0(drv: &'a DriverDouble) -> Self {
            Self {
                drv,
                dm: 0,
                base: MMIO,
            }
        }
        fn read(&self, offset: u32) -> u64 {
            self.drv
                .access(self.dm, BAO_IO_READ, self.base + u64::from(offset), 4, 0)
                .expect("the device model answers")
        }
        fn write(&self, offset: u32, value: u64) {
            let got = self.drv.access(
                self.dm,
                BAO_IO_WRITE,
                self.base + u64::from(offset),
                4,
                value,
            );
            assert!(got.is_some(), "the device model answers");
        }
        fn probe(&self, vq: &MockSplitQueue<'_, GuestMemoryMmap>) {
            assert_eq!(self.read(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
            self.write(VIRTIO_MMIO_STATUS, 0);
            self.write(VIRTIO_MMIO_STATUS, 1);
            self.write(VIRTIO_MMIO_STATUS, 3);
            self.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
            self.write(VIRTIO_MMIO_DRIVER_FEATURES, 1);
            self.write(VIRTIO_MMIO_STATUS, 0xb);
            self.write(VIRTIO_MMIO_QUEUE_SEL, 0);
            self.write(VIRTIO_MMIO_QUEUE_NUM, 16);
            self.write(VIRTIO_MMIO_QUEUE_DESC_LOW, vq.desc_table_addr().0);
            self.write(VIRTIO_MMIO_QUEUE_AVAIL_LOW, vq.avail_addr().0);
            self.write(VIRTIO_MMIO_QUEUE_USED_LOW, vq.used_addr().0);
            self.write(VIRTIO_MMIO_QUEUE_READY, 1);
            self.write(VIRTIO_MMIO_STATUS, 0xf);
            assert_eq!(self.read(VIRTIO_MMIO_STATUS), 0xf);
        }
        /// Makes one 32-byte buffer available at ring index `idx` and writes QueueNotify(0).
        fn request_entropy(
            &self,
            vq: &MockSplitQueue<'_, GuestMemoryMmap>,
            idx: u16,
        ) -> WriteRoute {
            let w = u16::try_from(VRING_DESC_F_WRITE).unwrap();
            let desc = Descriptor::new(SHMEM + 0x8000, 32, w, 0);
            vq.build_desc_chain(&[RawDescriptor::from(desc)]).unwrap();
            vq.avail().idx().store(idx + 1);
            self.drv.trap_write(
                self.dm,
                self.base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY),
                4,
                0,
            )
        }
    }

    /// Waits (bounded) until the used ring's index reaches `want`; returns the last index.
    pub(crate) fn wait_used(vq: &MockSplitQueue<'_, GuestMemoryMmap>, want: u16) -> u16 {
        for _ in 0..5000 {
            let idx = vq.used().idx().load();
            if idx >= want {
                return idx;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        vq.used().idx().load()
    }

    fn guest_view(drv: &DriverDouble, dm: usize) -> GuestMemoryMmap {
        remio_api::map_file(drv.shmem(dm).unwrap(), 0, 0x10_0000, SHMEM).unwrap()
    }

    #[test]
    fn on_the_c_driver_queue_notify_works_after_a_reset_and_a_second_probe() {
        let (drv, api) = c_driver(1);
        let handle = serve(&api, &rng_config(&[0])).unwrap();
        let mem = guest_view(&drv, 0);
        let vq = MockSplitQueue::create(&mem, GuestAddress(SHMEM), 16);
        let fe = DoubleFrontend::of_dm0(&drv);
        fe.probe(&vq);
        assert_eq!(fe.request_entropy(&vq, 0), WriteRoute::Signalled);
        assert_eq!(wait_used(&vq, 1), 1);

        // The guest resets the device (driver rebind) and probes it again.
        fe.write(VIRTIO_MMIO_STATUS, 0);
        let vq = MockSplitQueue::create(&mem, GuestAddress(SHMEM), 16);
        fe.probe(&vq);
        assert_eq!(fe.request_entropy(&vq, 0), WriteRoute::Signalled);

        assert_eq!(
            wait_used(&vq, 1),
            1,
            "the notify reached the device's worker"
        );
        assert_eq!(
            drv.ioeventfds(0).len(),
            1,
            "one ioeventfd, never re-registered"
        );
        handle.stop();
    }

    #[test]
    fn on_the_c_driver_a_signal_in_attach_does_not_end_the_device() {
        let (drv, api) = c_driver(1);
        let handle = serve(&api, &rng_config(&[0])).unwrap();
        let fe = DoubleFrontend::of_dm0(&drv);
        assert_eq!(fe.read(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);

        // SIGSTOP/SIGCONT, a debugger, any caught signal: ATTACH fails with EFAULT. Twice,
        // each time with the runner blocked in ATTACH and nothing queued.
        for _ in 0..2 {
            assert!(drv.wait_for_attach(0));
            drv.signal_attach(0);
        }
        assert!(drv.wait_for_attach(0), "back in ATTACH after the signals");

        assert_eq!(fe.read(VIRTIO_MMIO_DEVICE_ID), 4, "still served");
        assert!(!handle.runners()[0].is_finished());
        handle.stop();
    }

    #[test]
    fn on_the_c_driver_a_device_that_cannot_start_leaves_the_others_serving() {
        let (drv, api) = c_driver(1);

        // DM 0 exists, DM 5 does not.
        let handle = serve(&api, &rng_config(&[0, 5])).unwrap();

        assert_eq!(handle.devices().len(), 1);
        assert!(matches!(
            handle.failures(),
            [ServeError::Session { dm_id: 5, .. }]
        ));
        assert!(drv.is_alive(0), "DM 0's session was not closed");
        let fe = DoubleFrontend::of_dm0(&drv);
        assert_eq!(fe.read(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        handle.stop();
    }

    #[test]
    fn on_the_c_driver_a_refused_queue_ioeventfd_fails_the_device_at_start_up() {
        let (drv, api) = c_driver(1);
        drv.refuse_ioeventfds(0, libc::ENOMEM);

        let handle = serve(&api, &rng_config(&[0])).unwrap();

        let [ServeError::Notifiers { dm_id: 0, source }] = handle.failures() else {
            panic!("expected the notifier failure, got {:?}", handle.failures());
        };
        assert!(matches!(source, RegistrarError::Ioeventfd { queue: 0, .. }));
        let msg = source.to_string();
        assert!(msg.contains("queue 0") && msg.contains("drops"), "{msg}");
        assert!(handle.devices().is_empty());
        // The DM is kept and answers as an absent device: the probe reads MagicValue 0.
        assert!(drv.is_alive(0));
        let fe = DoubleFrontend::of_dm0(&drv);
        assert_eq!(fe.read(VIRTIO_MMIO_MAGIC_VALUE), 0);
        handle.stop();
    }

    #[test]
    fn on_remio_a_device_that_cannot_start_stops_the_others() {
        let (_hyp, api) = platform();

        let err = serve(&*api, &rng_config(&[0, 5])).unwrap_err();

        assert!(matches!(err, ServeError::Session { dm_id: 5, .. }));
        // DM 0's session was closed and the DM is free for the next device model.
        assert!(api.open(0).is_ok());
    }

    #[test]
    fn virtqueues_are_found_at_the_frontends_view_of_the_shared_memory() {
        // The backend sees the shared memory at 0x8000_0000 (a PCI BAR, say); the frontend,
        // and so every virtqueue address it programs, at SHMEM. The config says so.
        let (drv, api) = c_driver_at(1, 0x8000_0000);
        let config = Config::from_toml_str(&format!(
            "[[device]]\ndm_id = 0\ntype = \"rng\"\nmmio_base = {MMIO}\nshmem_addr = {SHMEM}\n"
        ))
        .unwrap();
        let handle = serve(&api, &config).unwrap();
        let mem = guest_view(&drv, 0);
        let vq = MockSplitQueue::create(&mem, GuestAddress(SHMEM), 16);
        let fe = DoubleFrontend::of_dm0(&drv);

        fe.probe(&vq);
        assert_eq!(fe.request_entropy(&vq, 0), WriteRoute::Signalled);

        assert_eq!(wait_used(&vq, 1), 1);
        handle.stop();
    }

    #[test]
    fn attach_backoff_is_immediate_at_first_then_bounded() {
        assert_eq!(attach_backoff(1), None);
        assert_eq!(attach_backoff(4), Some(Duration::from_millis(1)));
        assert_eq!(attach_backoff(1000), Some(Duration::from_millis(100)));
    }
}
