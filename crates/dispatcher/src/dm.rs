//! A device model (DM): one Remote I/O device of the backend VM, with its interrupt handler
//! and ASK loop, its clients, its ioeventfds and irqfds, and its lifecycle.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};

use remio_abi::hypercall::{RemioArgs, RemioOp, RemioRet, RemioStatus};
use remio_abi::uapi::{BAO_IO_READ, BAO_IO_WRITE, BAO_NAME_MAX_LEN};
use remio_abi::uapi_v2::BAO_IO_CLIENT_QUEUE_MAX;
use remio_abi::{Hypercall, InterruptController, IrqError, IrqHandler, VirtioRequest};
use vmm_sys_util::eventfd::EventFd;

use crate::client::{ClientError, ControlClient, IoClient};
use crate::gate::Gate;
use crate::ioeventfd::{IoeventfdConfig, IoeventfdError, IoeventfdTable};
use crate::irqfd::{IrqfdError, IrqfdServer};
use crate::queue::RequestQueue;
use crate::router::{InstallError, Routed, Router};
use crate::statusword::{StatusPage, StatusWordConfig, StatusWordError};

/// How a DM is described to [`crate::Dispatcher::create_dm`]: the platform description the
/// driver reads from its device tree node (the i-th `reg` and `interrupts` entries).
#[derive(Debug, Clone)]
pub struct DmDescription {
    /// The DM id: the index of the device in the backend's Remote I/O device list, used as
    /// `dm_id` in every hypercall. Must be below `BAO_IO_MAX_DMS`.
    pub id: u32,
    /// Guest-physical base of the shared memory.
    pub shmem_addr: u64,
    /// Size of the shared memory.
    pub shmem_size: u64,
    /// The backend interrupt of this DM.
    pub irq: u32,
    /// The shared memory itself, if the platform has it as a file (memfd), for device models
    /// to map.
    pub shmem: Option<Arc<File>>,
}

/// What GET_INFO reports about a DM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmInfo {
    /// The DM id.
    pub id: u32,
    /// Guest-physical base of the shared memory.
    pub shmem_addr: u64,
    /// Size of the shared memory.
    pub shmem_size: u64,
    /// The backend interrupt.
    pub irq: u32,
}

/// Errors of DM creation, lookup, destruction and pause/resume.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DmError {
    /// The id is not below `BAO_IO_MAX_DMS`. EINVAL.
    #[error("DM id {0} is out of range")]
    InvalidId(u32),
    /// A DM with this id exists. EEXIST.
    #[error("DM {0} exists")]
    Exists(u32),
    /// No DM with this id. ENOENT.
    #[error("no DM {0}")]
    NoSuchDm(u32),
    /// The backend interrupt could not be requested: no such line (EINVAL) or it already
    /// has a handler (EBUSY).
    #[error("backend interrupt: {0}")]
    Irq(#[from] IrqError),
    /// The DM is being destroyed. ESHUTDOWN.
    #[error("the DM is being destroyed")]
    ShuttingDown,
    /// `resume` without a matching `pause`. EINVAL.
    #[error("the DM is not paused")]
    NotPaused,
}

impl DmError {
    /// The errno of this error.
    pub fn errno(&self) -> i32 {
        match self {
            Self::InvalidId(_) | Self::NotPaused | Self::Irq(IrqError::NoSuchIrq(_)) => {
                libc::EINVAL
            }
            Self::Exists(_) => libc::EEXIST,
            Self::NoSuchDm(_) => libc::ENOENT,
            Self::Irq(IrqError::Busy(_)) => libc::EBUSY,
            Self::ShuttingDown => libc::ESHUTDOWN,
        }
    }
}

/// Errors of [`Dm::complete`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CompleteError {
    /// The op is neither `BAO_IO_WRITE` nor `BAO_IO_READ`. EINVAL.
    #[error("op {0} is not WRITE or READ")]
    InvalidOp(u64),
    /// The hypervisor refused the arguments (status 3: no such request slot for this DM, the
    /// request is not awaiting completion — e.g. it was completed already — or the op does
    /// not echo the request's). EINVAL.
    #[error("the hypervisor refused the completion's arguments")]
    InvalidArgs,
    /// The hypervisor reported a generic failure (status 1). Bao's Remote I/O never returns it
    /// for a completion (a request that is not pending is status 3, [`Self::InvalidArgs`]);
    /// it is kept so that a hypervisor that does is not mistaken for success. ENOENT.
    #[error("the hypervisor reported failure (status 1)")]
    HypervisorFailure,
    /// The hypervisor does not know the Remote I/O hypercall (status 2). ENOSYS.
    #[error("the hypervisor has no Remote I/O hypercall")]
    NoHypercall,
}

impl CompleteError {
    /// The errno of this error.
    pub fn errno(&self) -> i32 {
        match self {
            Self::InvalidOp(_) | Self::InvalidArgs => libc::EINVAL,
            Self::HypervisorFailure => libc::ENOENT,
            Self::NoHypercall => libc::ENOSYS,
        }
    }

    fn from_status(s: RemioStatus) -> Self {
        match s {
            RemioStatus::InvalidArgs => Self::InvalidArgs,
            RemioStatus::InvalidHypercall => Self::NoHypercall,
            RemioStatus::Success | RemioStatus::Failure => Self::HypervisorFailure,
        }
    }
}

/// Counters of one DM ([`Dm::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DmStats {
    /// Requests fetched with ASK.
    pub dispatched: u64,
    /// Routed to the control client.
    pub to_control: u64,
    /// Routed to an in-process I/O client.
    pub to_io_client: u64,
    /// Claimed by the ioeventfd client (signalled and completed inline).
    pub to_ioeventfd: u64,
    /// Answered from the status word (InterruptStatus read or InterruptACK write, completed
    /// inline).
    pub to_status_word: u64,
    /// Kept for a control client that did not exist yet.
    pub held: u64,
    /// Completed with 0 because the target queue was full.
    pub overflow: u64,
    /// Completed with 0 by the dispatcher because the DM was destroyed, or by
    /// [`Dm::complete_held`].
    pub completed_by_dispatcher: u64,
    /// NOTIFY hypercalls issued for irqfd signals.
    pub irqfd_notifies: u64,
    /// ASK or completion hypercalls that returned an unexpected status.
    pub hypercall_errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    dispatched: AtomicU64,
    to_control: AtomicU64,
    to_io_client: AtomicU64,
    to_ioeventfd: AtomicU64,
    to_status_word: AtomicU64,
    held: AtomicU64,
    overflow: AtomicU64,
    completed_by_dispatcher: AtomicU64,
    hypercall_errors: AtomicU64,
    /// Control clients created (device-model sessions opened), see [`Dm::control_sessions`].
    control_sessions: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug, Default)]
struct Lifecycle {
    pause_depth: u32,
    destroyed: bool,
}

#[derive(Debug, Default)]
struct IrqfdSlot {
    server: Option<IrqfdServer>,
    closed: bool,
    /// Notifies of servers already stopped (kept so the stats do not go backwards).
    notifies_before: u64,
}

thread_local! {
    /// Set while this thread calls `request_irq` from a lifecycle operation: an interrupt
    /// the controller delivers inline then is left to the forced pass that follows, so that
    /// no dispatch pass (and no notifier) ever runs under the lifecycle lock.
    static SUPPRESS_INLINE: Cell<bool> = const { Cell::new(false) };
}

/// Bound on the final drain at destruction, against a frontend that never stops trapping.
const DESTROY_DRAIN_MAX: usize = 4096;

/// One device model. Obtained from [`crate::Dispatcher`]; all methods take `&self` and may
/// be called from any thread.
///
/// Lock order (outer first); no lock is held while calling a notifier, a handler, or the
/// interrupt controller's inline delivery:
/// 1. `lifecycle`
/// 2. `io_clients`
/// 3. the router's table, then its held queue, then a client queue (see `Router`)
///
/// `gate`, `ioeventfds` and `irqfd` are leaves: taken with nothing else held, except that
/// `gate` is waited on under `lifecycle`.
pub struct Dm {
    info: DmInfo,
    shmem: Option<Arc<File>>,
    hc: Arc<dyn Hypercall>,
    intc: Arc<dyn InterruptController>,
    weak: Weak<Dm>,
    /// Lock order 1. Pause depth and the destroyed flag; serialises pause, resume, destroy.
    lifecycle: Mutex<Lifecycle>,
    /// Set once, at the start of destruction (readable without `lifecycle`).
    destroyed: AtomicBool,
    /// Counts running dispatch passes; closed while paused or destroyed.
    gate: Gate,
    /// Lock order 2. The in-process I/O clients, for destruction.
    io_clients: Mutex<BTreeMap<u64, Arc<IoClient>>>,
    next_client_id: AtomicU64,
    /// Lock order 3 (its own internal order).
    router: Router,
    /// Leaf. Read on the data path for every request while registrations exist.
    ioeventfds: RwLock<IoeventfdTable>,
    /// Leaf.
    irqfd: Mutex<IrqfdSlot>,
    counters: Counters,
}

impl std::fmt::Debug for Dm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dm")
            .field("info", &self.info)
            .field("destroyed", &self.destroyed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Dm {
    /// Builds a DM; it does not dispatch until [`Dm::start`].
    pub(crate) fn new(
        desc: DmDescription,
        hc: Arc<dyn Hypercall>,
        intc: Arc<dyn InterruptController>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|weak| Self {
            info: DmInfo {
                id: desc.id,
                shmem_addr: desc.shmem_addr,
                shmem_size: desc.shmem_size,
                irq: desc.irq,
            },
            shmem: desc.shmem,
            hc,
            intc,
            weak: weak.clone(),
            lifecycle: Mutex::new(Lifecycle::default()),
            destroyed: AtomicBool::new(false),
            gate: Gate::default(),
            io_clients: Mutex::new(BTreeMap::new()),
            next_client_id: AtomicU64::new(1),
            router: Router::new(BAO_IO_CLIENT_QUEUE_MAX),
            ioeventfds: RwLock::new(IoeventfdTable::default()),
            irqfd: Mutex::new(IrqfdSlot::default()),
            counters: Counters::default(),
        })
    }

    fn handler(&self) -> IrqHandler {
        let weak = self.weak.clone();
        Arc::new(move || {
            if SUPPRESS_INLINE.with(Cell::get) {
                return;
            }
            if let Some(dm) = weak.upgrade() {
                dm.dispatch_pass();
            }
        })
    }

    fn request_irq(&self) -> Result<(), IrqError> {
        SUPPRESS_INLINE.with(|s| s.set(true));
        let r = self.intc.request_irq(self.info.irq, self.handler());
        SUPPRESS_INLINE.with(|s| s.set(false));
        r
    }

    /// Installs this DM's own interrupt handler. The caller then runs [`Dm::kick`] with no
    /// lock held.
    pub(crate) fn start(&self) -> Result<(), DmError> {
        self.request_irq()?;
        Ok(())
    }

    /// Runs one dispatch pass on the calling thread (unless paused or destroyed).
    pub(crate) fn kick(&self) {
        self.dispatch_pass();
    }

    /// The ASK loop, run inline on the thread that delivers the interrupt: fetch and route
    /// requests while the hypervisor says more are pending. Returns how many it fetched.
    fn dispatch_pass(&self) -> usize {
        let Some(_pass) = self.gate.enter() else {
            return 0;
        };
        let ask = RemioArgs {
            dm_id: u64::from(self.info.id),
            op: RemioOp::Ask as u64,
            ..RemioArgs::default()
        };
        let mut n = 0;
        loop {
            let ret = self.hc.remote_io(&ask);
            if ret.status != 0 {
                // +1 is "nothing pending"; anything else is unexpected.
                if ret.status != 1 {
                    bump(&self.counters.hypercall_errors);
                    remio_ratelimit::warn_rl!(
                        "DM {}: ASK returned status {}",
                        self.info.id,
                        ret.status
                    );
                }
                break;
            }
            n += 1;
            bump(&self.counters.dispatched);
            self.route(VirtioRequest {
                dm_id: u64::from(self.info.id),
                addr: ret.addr,
                op: ret.op,
                value: ret.value,
                access_width: ret.access_width,
                request_id: ret.request_id,
            });
            if !ret.has_pending() {
                break;
            }
        }
        n
    }

    fn route(&self, req: VirtioRequest) {
        {
            let t = self
                .ioeventfds
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            if !t.is_empty() {
                // The status word first: its registers never overlap an ioeventfd, and a
                // read of InterruptStatus is the most frequent access that gets here.
                if let Some(value) = t
                    .status_word()
                    .and_then(|s| s.serve(req.op, req.addr, req.access_width, req.value))
                {
                    drop(t);
                    bump(&self.counters.to_status_word);
                    self.complete_with(&req, value);
                    return;
                }
                let claimed = match req.op {
                    BAO_IO_WRITE => t.on_write(req.addr, req.access_width, req.value),
                    BAO_IO_READ => t.covers_read(req.addr, req.access_width),
                    _ => false,
                };
                if claimed {
                    drop(t);
                    bump(&self.counters.to_ioeventfd);
                    self.complete_with(&req, 0);
                    return;
                }
            }
        }
        match self.router.route(req) {
            Routed::IoClient => bump(&self.counters.to_io_client),
            Routed::Control => bump(&self.counters.to_control),
            Routed::Held => bump(&self.counters.held),
            Routed::Overflow(r) => {
                bump(&self.counters.overflow);
                remio_ratelimit::warn_rl!(
                    "DM {}: client queue full, completing request {} at {:#x} with 0",
                    self.info.id,
                    r.request_id,
                    r.addr
                );
                self.complete_with(&r, 0);
            }
            Routed::Closed(r) => {
                bump(&self.counters.completed_by_dispatcher);
                self.complete_with(&r, 0);
            }
        }
    }

    /// Completes `req` from inside the dispatcher: a read returns `value`, a write echoes.
    fn complete_with(&self, req: &VirtioRequest, value: u64) -> RemioRet {
        let ret = self.hc.remote_io(&RemioArgs {
            dm_id: u64::from(self.info.id),
            addr: req.addr,
            op: req.op,
            value: if req.op == BAO_IO_READ {
                value
            } else {
                req.value
            },
            request_id: req.request_id,
        });
        if ret.status != 0 {
            bump(&self.counters.hypercall_errors);
            remio_ratelimit::warn_rl!(
                "DM {}: completing request {} returned status {}",
                self.info.id,
                req.request_id,
                ret.status
            );
        }
        ret
    }

    /// The DM id.
    pub fn id(&self) -> u32 {
        self.info.id
    }

    /// What GET_INFO reports.
    pub fn info(&self) -> DmInfo {
        self.info
    }

    /// The shared memory, if the platform provided it as a file.
    pub fn shmem(&self) -> Option<Arc<File>> {
        self.shmem.clone()
    }

    pub(crate) fn hypercall(&self) -> &Arc<dyn Hypercall> {
        &self.hc
    }

    pub(crate) fn router(&self) -> &Router {
        &self.router
    }

    /// Whether destruction has started.
    pub fn is_destroyed(&self) -> bool {
        self.destroyed.load(Ordering::Acquire)
    }

    /// Completes a request fetched through the control client (IO_REQUEST_COMPLETE): echoes
    /// it to the hypervisor with `value` (for a read, the value the frontend reads). The
    /// `dm_id` is always this DM's, whatever `req.dm_id` says (the driver trusts it, which
    /// lets one DM's session complete another's requests).
    ///
    /// # Errors
    /// [`CompleteError::InvalidOp`] for an op other than WRITE or READ; otherwise the
    /// hypervisor's refusal ([`CompleteError::InvalidArgs`], [`CompleteError::HypervisorFailure`],
    /// [`CompleteError::NoHypercall`]).
    pub fn complete(&self, req: &VirtioRequest) -> Result<(), CompleteError> {
        if req.op != BAO_IO_WRITE && req.op != BAO_IO_READ {
            return Err(CompleteError::InvalidOp(req.op));
        }
        let ret = self.hc.remote_io(&RemioArgs {
            dm_id: u64::from(self.info.id),
            addr: req.addr,
            op: req.op,
            value: req.value,
            request_id: req.request_id,
        });
        ret.check().map_err(CompleteError::from_status)
    }

    /// Creates this DM's control client. Requests that arrived while none existed (held by
    /// the DM) are queued to it at once, in arrival order; then one dispatch pass runs.
    ///
    /// # Errors
    /// [`ClientError::Busy`] if one exists; [`ClientError::ShuttingDown`] if the DM is
    /// being destroyed.
    pub fn create_control_client(&self) -> Result<Arc<ControlClient>, ClientError> {
        let q = Arc::new(RequestQueue::new(self.router.capacity()));
        self.router
            .install_control(q.clone())
            .map_err(|e| match e {
                InstallError::Busy => ClientError::Busy,
                InstallError::Closed => ClientError::ShuttingDown,
            })?;
        bump(&self.counters.control_sessions);
        self.kick();
        Ok(Arc::new(ControlClient::new(self.info.id, q)))
    }

    /// How many control clients this DM has had (a device model opens one per session, so a
    /// restarted or replaced device model adds one).
    pub fn control_sessions(&self) -> u64 {
        self.counters.control_sessions.load(Ordering::Relaxed)
    }

    /// Destroys the control client: its waiters in [`ControlClient::attach`] return
    /// [`crate::AttachError::ShuttingDown`], and the requests still queued to it go back to
    /// the DM, to be drained to the next control client (or completed with
    /// [`Dm::complete_held`]). Requests already attached are not affected: complete them.
    ///
    /// # Errors
    /// [`ClientError::NoControlClient`] if there is none.
    pub fn destroy_control_client(&self) -> Result<(), ClientError> {
        self.router
            .remove_control()
            .map(|_| ())
            .ok_or(ClientError::NoControlClient)
    }

    /// Whether a control client exists.
    pub fn has_control_client(&self) -> bool {
        self.router.control().is_some()
    }

    /// Requests held for a control client that does not exist.
    pub fn held(&self) -> usize {
        self.router.held_len()
    }

    /// Gives back requests that a control client received (ATTACH) and whose session ended
    /// before it completed them (a device model killed or replaced): they are served by the
    /// next control client, ahead of the requests held meanwhile, instead of being completed
    /// with a made-up value. The frontend keeps waiting, bounded by the hypervisor's access
    /// timeout. Those that cannot be kept (the DM is being destroyed, or its held queue is
    /// full) are completed as [`Dm::complete_held`] does. Returns how many were given back.
    ///
    /// The next device model executes such an access again even if the one that died had
    /// executed it: the caller must only give back accesses for which that is harmless (for
    /// virtio-mmio, every register but InterruptACK; see `docs/reliability.md`).
    pub fn requeue(&self, reqs: impl IntoIterator<Item = VirtioRequest>) -> usize {
        let mut kept = 0;
        for r in reqs {
            match self.router.requeue(r) {
                None => kept += 1,
                Some(r) => {
                    bump(&self.counters.completed_by_dispatcher);
                    self.complete_with(&r, 0);
                }
            }
        }
        kept
    }

    /// Completes every held request with 0 (reads return 0), so that frontends waiting on a
    /// device model that is gone resume. Returns how many.
    pub fn complete_held(&self) -> usize {
        let held = self.router.take_held();
        for r in &held {
            bump(&self.counters.completed_by_dispatcher);
            self.complete_with(r, 0);
        }
        held.len()
    }

    /// Creates an in-process I/O client named `name` whose thread calls `handler` for each
    /// request routed to it and completes it (a read returns the handler's value). It
    /// serves nothing until [`IoClient::add_range`].
    ///
    /// # Errors
    /// [`ClientError::NameTooLong`] if `name` is longer than `BAO_NAME_MAX_LEN - 1` bytes;
    /// [`ClientError::ShuttingDown`] if the DM is being destroyed; [`ClientError::Spawn`] if
    /// the thread cannot start.
    pub fn create_client<H>(&self, name: &str, handler: H) -> Result<Arc<IoClient>, ClientError>
    where
        H: FnMut(&VirtioRequest) -> u64 + Send + 'static,
    {
        if name.len() > BAO_NAME_MAX_LEN - 1 {
            return Err(ClientError::NameTooLong(name.len()));
        }
        let me = self.weak.upgrade().ok_or(ClientError::ShuttingDown)?;
        let mut clients = lock(&self.io_clients);
        let id = self.next_client_id.fetch_add(1, Ordering::Relaxed);
        let q = Arc::new(RequestQueue::new(self.router.capacity()));
        if !self.router.register_client(id, q.clone()) {
            return Err(ClientError::ShuttingDown);
        }
        match IoClient::spawn(&me, id, name, q, handler) {
            Ok(c) => {
                clients.insert(id, c.clone());
                Ok(c)
            }
            Err(e) => {
                self.router.unregister_client(id);
                Err(e)
            }
        }
    }

    /// Removes an I/O client from routing and from the DM (its `destroy` stops it).
    pub(crate) fn forget_io_client(&self, id: u64) {
        let mut clients = lock(&self.io_clients);
        self.router.unregister_client(id);
        clients.remove(&id);
    }

    /// Number of live in-process I/O clients.
    pub fn io_client_count(&self) -> usize {
        lock(&self.io_clients).len()
    }

    /// Number of registered I/O client ranges.
    pub fn range_count(&self) -> usize {
        self.router.range_count()
    }

    /// IOEVENTFD: assigns, or with `deassign` removes exactly the equal registration (same
    /// eventfd file, address, length and data match) and nothing else.
    ///
    /// # Errors
    /// See [`IoeventfdError`]: EINVAL for a bad length, overflow or data match; EEXIST for a
    /// conflict; ENOENT for an unknown deassign; ESHUTDOWN once the DM is being destroyed.
    pub fn ioeventfd(&self, cfg: IoeventfdConfig) -> Result<(), IoeventfdError> {
        self.ioeventfds
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .configure(&cfg)
    }

    /// Number of ioeventfd registrations.
    pub fn ioeventfd_count(&self) -> usize {
        self.ioeventfds
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Registers the DM's status word (see [`crate::StatusPage`] and the module docs of the
    /// status-word client): a new shared page whose word answers 4-byte reads of
    /// `cfg.status_addr` and whose bits 4-byte writes to `cfg.ack_addr` clear, inline on the
    /// dispatching thread. Returns the page, whose file the device model maps. One per DM;
    /// dropped by [`Dm::unregister_status_word`] or the DM's destruction.
    ///
    /// # Errors
    /// [`StatusWordError::Misaligned`] (EINVAL); [`StatusWordError::Exists`] or
    /// [`StatusWordError::IoeventfdConflict`] (EEXIST); [`StatusWordError::ShuttingDown`];
    /// [`StatusWordError::Io`] if the page cannot be made.
    pub fn register_status_word(
        &self,
        cfg: StatusWordConfig,
    ) -> Result<Arc<StatusPage>, StatusWordError> {
        let page = Arc::new(StatusPage::new()?);
        self.ioeventfds
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .register_status_word(cfg, page.clone())?;
        Ok(page)
    }

    /// Removes the status word if it is `page` (accesses to its registers are routed as usual
    /// from now on).
    ///
    /// # Errors
    /// [`StatusWordError::NotFound`] if `page` is not the registered one.
    pub fn unregister_status_word(&self, page: &Arc<StatusPage>) -> Result<(), StatusWordError> {
        self.ioeventfds
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .unregister_status_word(page)
    }

    /// Whether a status word is registered.
    pub fn has_status_word(&self) -> bool {
        self.ioeventfds
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .status_word()
            .is_some()
    }

    /// IRQFD: each signal of `fd` injects the frontend interrupt (one NOTIFY per read of the
    /// counter). An eventfd already signalled injects once at once.
    ///
    /// # Errors
    /// [`IrqfdError::Busy`] if the same eventfd file is assigned; [`IrqfdError::BadFd`] if it
    /// cannot be polled; [`IrqfdError::ShuttingDown`] once the DM is being destroyed;
    /// [`IrqfdError::Io`] if the server cannot start.
    pub fn irqfd_assign(&self, fd: Arc<EventFd>) -> Result<(), IrqfdError> {
        self.irqfd_assign_with(fd, None)
    }

    /// remio's extension of IRQFD: like [`Dm::irqfd_assign`], and each signal of `fd` first
    /// sets `bits` in the DM's status word ([`Dm::register_status_word`]), on the irqfd
    /// thread, before the NOTIFY. A vhost-user daemon given such an irqfd as its call eventfd
    /// (bits = virtio-mmio InterruptStatus bit 0, used buffer) then interrupts the frontend
    /// with the bit the driver checks already set, without a device-model thread relaying the
    /// call. The C driver has no such call: Bao keeps no InterruptStatus (the device model
    /// does), so its irqfd only injects, and there the device model must set the bit itself.
    ///
    /// # Errors
    /// [`IrqfdError::NoStatusWord`] if the DM has no status word; otherwise those of
    /// [`Dm::irqfd_assign`].
    pub fn irqfd_assign_status_bits(&self, fd: Arc<EventFd>, bits: u32) -> Result<(), IrqfdError> {
        let page = self
            .ioeventfds
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .status_word()
            .map(|r| r.page.clone())
            .ok_or(IrqfdError::NoStatusWord)?;
        self.irqfd_assign_with(fd, Some((page, bits)))
    }

    fn irqfd_assign_with(
        &self,
        fd: Arc<EventFd>,
        sets: Option<crate::irqfd::StatusBits>,
    ) -> Result<(), IrqfdError> {
        let mut slot = lock(&self.irqfd);
        if slot.closed {
            return Err(IrqfdError::ShuttingDown);
        }
        if slot.server.is_none() {
            slot.server = Some(IrqfdServer::start(self.hc.clone(), self.info.id)?);
        }
        match slot.server.as_mut() {
            Some(s) => s.assign(fd, sets),
            None => Err(IrqfdError::ShuttingDown),
        }
    }

    /// IRQFD with DEASSIGN: stops watching the eventfd that is the same file as `fd`.
    ///
    /// # Errors
    /// [`IrqfdError::NotFound`] if it is not assigned; [`IrqfdError::ShuttingDown`] once the
    /// DM is being destroyed.
    pub fn irqfd_deassign(&self, fd: &EventFd) -> Result<(), IrqfdError> {
        let mut slot = lock(&self.irqfd);
        if slot.closed {
            return Err(IrqfdError::ShuttingDown);
        }
        slot.server
            .as_mut()
            .ok_or(IrqfdError::NotFound)?
            .deassign(fd)
    }

    /// Number of assigned irqfds.
    pub fn irqfd_count(&self) -> usize {
        lock(&self.irqfd)
            .server
            .as_ref()
            .map_or(0, IrqfdServer::len)
    }

    /// Stops dispatching: the interrupt handler is removed and, when this returns, no
    /// dispatch pass runs on this DM (the driver's `bao_io_dispatcher_pause`). Requests keep
    /// arriving in the hypervisor's FIFO. Pauses nest.
    ///
    /// Must not be called from a notifier (it waits for the pass that runs the notifier).
    ///
    /// # Errors
    /// [`DmError::ShuttingDown`] if the DM is being destroyed.
    pub fn pause(&self) -> Result<(), DmError> {
        let mut lc = lock(&self.lifecycle);
        if lc.destroyed {
            return Err(DmError::ShuttingDown);
        }
        lc.pause_depth += 1;
        if lc.pause_depth == 1 {
            self.intc.free_irq(self.info.irq);
            self.gate.pause();
        }
        Ok(())
    }

    /// Undoes one [`Dm::pause`]; the last one reinstalls the handler and runs one forced
    /// dispatch pass on the calling thread, so nothing that arrived meanwhile waits.
    ///
    /// # Errors
    /// [`DmError::NotPaused`] without a matching pause; [`DmError::ShuttingDown`] if the DM
    /// is being destroyed; [`DmError::Irq`] if the handler cannot be reinstalled (the DM
    /// stays paused).
    pub fn resume(&self) -> Result<(), DmError> {
        {
            let mut lc = lock(&self.lifecycle);
            if lc.destroyed {
                return Err(DmError::ShuttingDown);
            }
            if lc.pause_depth == 0 {
                return Err(DmError::NotPaused);
            }
            if lc.pause_depth == 1 {
                self.request_irq()?;
                self.gate.resume();
            }
            lc.pause_depth -= 1;
        }
        self.kick();
        Ok(())
    }

    /// Whether the DM is paused.
    pub fn is_paused(&self) -> bool {
        lock(&self.lifecycle).pause_depth > 0
    }

    /// Destroys the DM, once (`false` if destruction had already started). Afterwards:
    /// no handler is installed and no dispatch pass runs; the control client's waiters
    /// got [`crate::AttachError::ShuttingDown`]; every request held or queued to the control
    /// client was completed with 0; every I/O client drained its queue through its handler
    /// and its thread was joined; ioeventfds are dropped; the irqfd thread is joined; and
    /// requests still pending in the hypervisor for this DM (up to a bound) were fetched and
    /// completed with 0, so no frontend is left stalled by the destruction.
    pub(crate) fn destroy(&self) -> bool {
        {
            let mut lc = lock(&self.lifecycle);
            if lc.destroyed {
                return false;
            }
            lc.destroyed = true;
            self.destroyed.store(true, Ordering::Release);
            if lc.pause_depth == 0 {
                self.intc.free_irq(self.info.irq);
            }
            self.gate.pause();
        }
        let closed = {
            let _clients = lock(&self.io_clients);
            self.router.close()
        };
        for r in &closed.orphans {
            bump(&self.counters.completed_by_dispatcher);
            self.complete_with(r, 0);
        }
        let clients: Vec<_> = std::mem::take(&mut *lock(&self.io_clients))
            .into_values()
            .collect();
        for c in clients {
            c.destroy_by_dm();
        }
        // Queues registered but whose IoClient was never built (a failed spawn) or already
        // forgotten: closing is enough, their threads (if any) are joined by their owners.
        for q in closed.clients {
            q.close();
        }
        self.ioeventfds
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .close();
        let server = {
            let mut slot = lock(&self.irqfd);
            slot.closed = true;
            slot.notifies_before += slot.server.as_ref().map_or(0, IrqfdServer::notifies);
            slot.server.take()
        };
        drop(server);
        self.final_drain();
        let st = self.stats();
        log::info!(
            "DM {}: destroyed after {} requests: {} to the control client, {} answered by the \
             status word, {} by ioeventfds",
            self.info.id,
            st.dispatched,
            st.to_control,
            st.to_status_word,
            st.to_ioeventfd
        );
        true
    }

    fn final_drain(&self) {
        let ask = RemioArgs {
            dm_id: u64::from(self.info.id),
            op: RemioOp::Ask as u64,
            ..RemioArgs::default()
        };
        for _ in 0..DESTROY_DRAIN_MAX {
            let ret = self.hc.remote_io(&ask);
            if ret.status != 0 {
                break;
            }
            bump(&self.counters.dispatched);
            bump(&self.counters.completed_by_dispatcher);
            let req = VirtioRequest {
                dm_id: u64::from(self.info.id),
                addr: ret.addr,
                op: ret.op,
                value: ret.value,
                access_width: ret.access_width,
                request_id: ret.request_id,
            };
            self.complete_with(&req, 0);
            if !ret.has_pending() {
                break;
            }
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> DmStats {
        let c = &self.counters;
        let irqfd_notifies = {
            let slot = lock(&self.irqfd);
            slot.notifies_before + slot.server.as_ref().map_or(0, IrqfdServer::notifies)
        };
        DmStats {
            dispatched: c.dispatched.load(Ordering::Relaxed),
            to_control: c.to_control.load(Ordering::Relaxed),
            to_io_client: c.to_io_client.load(Ordering::Relaxed),
            to_ioeventfd: c.to_ioeventfd.load(Ordering::Relaxed),
            to_status_word: c.to_status_word.load(Ordering::Relaxed),
            held: c.held.load(Ordering::Relaxed),
            overflow: c.overflow.load(Ordering::Relaxed),
            completed_by_dispatcher: c.completed_by_dispatcher.load(Ordering::Relaxed),
            irqfd_notifies,
            hypercall_errors: c.hypercall_errors.load(Ordering::Relaxed),
        }
    }
}
