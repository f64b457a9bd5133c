//! I/O clients of a DM: the control client (served by a userspace device model through
//! ATTACH and COMPLETE) and in-process I/O clients with a handler thread each (the driver's
//! `bao_io_client` with its kthread).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::thread::{JoinHandle, ThreadId};

use remio_abi::hypercall::RemioArgs;
use remio_abi::uapi::BAO_IO_READ;
use remio_abi::{Hypercall, VirtioRequest};

use crate::dm::Dm;
use crate::queue::{Notifier, RequestQueue};
use crate::router::RangeError;

/// Errors of client creation and destruction.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The DM already has a control client. EBUSY.
    #[error("the DM already has a control client")]
    Busy,
    /// The DM has no control client to destroy. ENOENT.
    #[error("the DM has no control client")]
    NoControlClient,
    /// The client name is longer than `BAO_NAME_MAX_LEN - 1` bytes. EINVAL.
    #[error("client name of {0} bytes is too long")]
    NameTooLong(usize),
    /// The client was already destroyed. ENOENT.
    #[error("the client was already destroyed")]
    AlreadyDestroyed,
    /// The DM is being destroyed. ESHUTDOWN.
    #[error("the DM is being destroyed")]
    ShuttingDown,
    /// The handler thread could not be started. The OS errno (EAGAIN if none).
    #[error("cannot start the client thread: {0}")]
    Spawn(#[source] io::Error),
}

impl ClientError {
    /// The errno of this error.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Busy => libc::EBUSY,
            Self::NoControlClient | Self::AlreadyDestroyed => libc::ENOENT,
            Self::NameTooLong(_) => libc::EINVAL,
            Self::ShuttingDown => libc::ESHUTDOWN,
            Self::Spawn(e) => e.raw_os_error().unwrap_or(libc::EAGAIN),
        }
    }
}

/// Errors of [`ControlClient::attach`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// The control client or its DM is being destroyed; the caller should stop attaching.
    /// ESHUTDOWN (the driver returns EPERM).
    #[error("the control client or its DM is being destroyed")]
    ShuttingDown,
}

impl AttachError {
    /// The errno of this error.
    pub fn errno(&self) -> i32 {
        match self {
            Self::ShuttingDown => libc::ESHUTDOWN,
        }
    }
}

/// The control client of a DM: requests no I/O client range claims are queued here for a
/// userspace device model, which fetches them with [`ControlClient::attach`] and completes
/// them with [`Dm::complete`].
pub struct ControlClient {
    pub(crate) queue: Arc<RequestQueue>,
    dm_id: u32,
}

impl std::fmt::Debug for ControlClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlClient")
            .field("dm_id", &self.dm_id)
            .field("queue", &self.queue)
            .finish()
    }
}

impl ControlClient {
    pub(crate) fn new(dm_id: u32, queue: Arc<RequestQueue>) -> Self {
        Self { queue, dm_id }
    }

    /// The DM this client serves.
    pub fn dm_id(&self) -> u32 {
        self.dm_id
    }

    /// Blocks until a request is routed to this client and returns it (IO_CLIENT_ATTACH).
    /// Any number of threads may wait at once; each request goes to exactly one of them.
    ///
    /// # Errors
    /// [`AttachError::ShuttingDown`] once the client or its DM is destroyed (requests still
    /// queued then are not lost: they go back to the DM, see [`Dm::destroy_control_client`]).
    pub fn attach(&self) -> Result<VirtioRequest, AttachError> {
        self.queue.pop_wait().ok_or(AttachError::ShuttingDown)
    }

    /// Returns a queued request without blocking, if one is queued.
    pub fn try_attach(&self) -> Option<VirtioRequest> {
        self.queue.try_pop()
    }

    /// Installs (or removes, with `None`) a callback run with no dispatcher lock held each
    /// time a request is queued to this client, so that a server can hand requests out with
    /// [`ControlClient::try_attach`] without a thread of its own waiting in `attach`. If
    /// requests are already queued, a new notifier runs once at once. See [`Notifier`] for
    /// what it may do.
    pub fn set_notifier(&self, notifier: Option<Notifier>) {
        self.queue.set_notifier(notifier);
    }

    /// Requests queued and not yet attached.
    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    /// Whether this client has been destroyed.
    pub fn is_destroyed(&self) -> bool {
        self.queue.is_closed()
    }

    /// Threads blocked in [`ControlClient::attach`] right now (for tests and diagnostics: a
    /// test waits for this instead of sleeping until a thread "has reached" ATTACH).
    pub fn waiters(&self) -> usize {
        self.queue.waiters()
    }
}

/// An in-process I/O client: a handler thread serving the requests of the address ranges
/// registered with [`IoClient::add_range`]. The handler's return value is the value a read
/// returns (ignored for writes); the thread completes each request after its handler returns.
pub struct IoClient {
    id: u64,
    name: String,
    dm: Weak<Dm>,
    queue: Arc<RequestQueue>,
    destroyed: AtomicBool,
    /// Leaf lock. Taken by exactly one destroyer, which joins the thread.
    thread: Mutex<Option<JoinHandle<()>>>,
    thread_id: ThreadId,
}

impl std::fmt::Debug for IoClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoClient")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("destroyed", &self.destroyed.load(Ordering::Relaxed))
            .finish()
    }
}

fn client_thread<H>(queue: &RequestQueue, hc: &dyn Hypercall, dm_id: u32, mut handler: H)
where
    H: FnMut(&VirtioRequest) -> u64,
{
    while let Some(req) = queue.pop_wait() {
        // A panicking handler must not strand this and every later request.
        let v = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(&req)))
            .unwrap_or_else(|_| {
                remio_ratelimit::error_rl!(
                    "I/O client of DM {dm_id}: handler panicked; completing with 0"
                );
                0
            });
        let ret = hc.remote_io(&RemioArgs {
            dm_id: u64::from(dm_id),
            addr: req.addr,
            op: req.op,
            value: if req.op == BAO_IO_READ { v } else { req.value },
            request_id: req.request_id,
        });
        if let Err(s) = ret.check() {
            // The driver stops the thread here, stranding every later request; carry on.
            remio_ratelimit::warn_rl!(
                "I/O client of DM {dm_id}: completing request {} failed: {s}",
                req.request_id
            );
        }
    }
}

impl IoClient {
    pub(crate) fn spawn<H>(
        dm: &Arc<Dm>,
        id: u64,
        name: &str,
        queue: Arc<RequestQueue>,
        handler: H,
    ) -> Result<Arc<Self>, ClientError>
    where
        H: FnMut(&VirtioRequest) -> u64 + Send + 'static,
    {
        let q = queue.clone();
        let hc = dm.hypercall().clone();
        let dm_id = dm.id();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-io"))
            .spawn(move || client_thread(&q, hc.as_ref(), dm_id, handler))
            .map_err(ClientError::Spawn)?;
        let thread_id = thread.thread().id();
        Ok(Arc::new(Self {
            id,
            name: name.to_owned(),
            dm: Arc::downgrade(dm),
            queue,
            destroyed: AtomicBool::new(false),
            thread: Mutex::new(Some(thread)),
            thread_id,
        }))
    }

    /// This client's id, unique within its DM.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The name given at creation.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Requests queued and not yet handled.
    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    /// Claims the half-open address range `[start, end)`: accesses wholly inside it are
    /// queued to this client.
    ///
    /// # Errors
    /// [`RangeError::Empty`] if `end <= start`; [`RangeError::Overlap`] if it overlaps any
    /// range of this DM; [`RangeError::ShuttingDown`] if this client or its DM is destroyed.
    pub fn add_range(&self, start: u64, end: u64) -> Result<(), RangeError> {
        let dm = self.dm.upgrade().ok_or(RangeError::ShuttingDown)?;
        dm.router().add_range(self.id, start, end)
    }

    /// Releases exactly the range `[start, end)` of this client.
    ///
    /// # Errors
    /// [`RangeError::NotFound`] if this client has no such range;
    /// [`RangeError::ShuttingDown`] if this client or its DM is destroyed.
    pub fn del_range(&self, start: u64, end: u64) -> Result<(), RangeError> {
        let dm = self.dm.upgrade().ok_or(RangeError::ShuttingDown)?;
        dm.router().del_range(self.id, start, end)
    }

    /// Destroys the client, once: its ranges are released at once (new accesses go to the
    /// control client), the requests already queued are still handled and completed, then
    /// the thread exits and is joined (unless this is called from the handler itself, in
    /// which case the thread exits after the handler returns).
    ///
    /// # Errors
    /// [`ClientError::AlreadyDestroyed`] on every call after the first (and after the DM's
    /// destruction, which destroys its clients).
    pub fn destroy(&self) -> Result<(), ClientError> {
        if self.destroyed.swap(true, Ordering::AcqRel) {
            return Err(ClientError::AlreadyDestroyed);
        }
        if let Some(dm) = self.dm.upgrade() {
            dm.forget_io_client(self.id);
        }
        self.stop_and_join();
        Ok(())
    }

    /// The DM's destroy path: stops the client unless a concurrent [`IoClient::destroy`]
    /// does.
    pub(crate) fn destroy_by_dm(&self) {
        if !self.destroyed.swap(true, Ordering::AcqRel) {
            self.stop_and_join();
        }
    }

    fn stop_and_join(&self) {
        self.queue.close();
        if std::thread::current().id() == self.thread_id {
            return;
        }
        let t = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = t {
            if t.join().is_err() {
                log::error!("I/O client {} handler panicked", self.name);
            }
        }
    }

    /// Whether [`IoClient::destroy`] (or the DM's destruction) ran.
    pub fn is_destroyed(&self) -> bool {
        self.destroyed.load(Ordering::Acquire)
    }
}
