//! The device-model API: what a userspace device model may ask of the I/O dispatcher.
//!
//! It is the posted driver's userspace API (`spec/remote-io.md`, "The driver's userspace API")
//! as one trait, [`DmSession`], reached through [`DmApi::open`] (the driver's `DM_GET_INFO`).
//! Device models (`remio-virtio`) are written against these traits only, so the same code
//! runs in-process on our dispatcher, in another process over a UNIX socket, and on Bao
//! hardware against the C driver's ioctls:
//!
//! - [`InProcessApi`]: straight onto a `remio_dispatcher::Dispatcher`; enforces the session
//!   rules and the cleanup when a session ends (see [`inprocess`]).
//! - [`SocketApi`] / [`SocketServer`]: the same operations over a `SOCK_SEQPACKET` socket, fds
//!   by `SCM_RIGHTS`; the protocol is specified in [`wire`], the transport in [`socket`].
//! - [`KernelApi`]: the C driver's ioctls behind the [`Ioctl`] trait (see [`kernel`]).
//!
//! Session rules common to all: one session per DM at a time (`EBUSY`); a completion naming
//! another DM is `EPERM`, one naming a request the session does not hold (never attached, or
//! completed already) is `ENOENT`, one that does not echo the request is `EINVAL`;
//! `map_shmem(0)` or beyond the shmem size is `EINVAL`. A completion the session lets through
//! but the hypervisor refuses (Remote I/O status 3, INVALID_ARGS: e.g. the request was
//! completed behind the session's back) is `EINVAL`, as the dispatcher maps it; over the C
//! driver ([`KernelApi`]) the driver itself reports every refused hypercall as `EIO`.
//!
//! ```
//! use std::sync::Arc;
//! use remio_api::{DmApi, InProcessApi, SocketApi, SocketServer, SocketServerConfig};
//! use remio_dispatcher::Dispatcher;
//! # use remio_hyp::{HypConfig, Hypervisor, RemioDeviceConfig, Role, ShmemConfig, VmConfig};
//! # let dev = |role, mmio_size, irq| RemioDeviceConfig { bind_key: 7, role,
//! #     mmio_base: if mmio_size > 0 { 0xa000_0000 } else { 0 }, mmio_size, irq, shmem_id: 0,
//! #     shmem_base: 0x5000_0000 };
//! # let hyp = Hypervisor::new(HypConfig {
//! #     shmem: vec![ShmemConfig { id: 0, size: 0x10000, backing: None }],
//! #     vms: vec![VmConfig { id: 1, remio_devices: vec![dev(Role::Frontend, 0x200, 40)] },
//! #               VmConfig { id: 2, remio_devices: vec![dev(Role::Backend, 0, 52)] }],
//! #     slots: 1, timeout: None }).unwrap();
//! # let backend = hyp.backend(2).unwrap();
//! let dispatcher = Dispatcher::new(Arc::new(backend.clone()), Arc::new(backend));
//! let api = Arc::new(InProcessApi::new(dispatcher));
//! let path = std::env::temp_dir().join(format!("remio-doc-{}.sock", std::process::id()));
//! let server = SocketServer::bind(&path, api, SocketServerConfig::default()).unwrap();
//! // A device-model process would do this; no DM was created on this dispatcher yet.
//! let err = SocketApi::connect(server.path()).open(0).err().unwrap();
//! assert_eq!(err.errno(), libc::ENOENT);
//! ```

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use remio_abi::VirtioRequest;

#[cfg(any(test, feature = "driver-double"))]
pub mod driver_double;
pub mod fdpass;
pub mod inprocess;
pub mod kernel;
pub mod socket;
pub mod statusword;
pub mod wire;

pub use inprocess::{InProcessApi, InProcessSession, WaitHelperHook, ABANDONED_READ_VALUE};
pub use kernel::{Ioctl, KernelApi, SysIoctl};
pub use socket::{SocketApi, SocketServer, SocketServerConfig};
pub use statusword::{StatusWord, StatusWordSpec};

/// What `DM_GET_INFO` returns about a device model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmInfo {
    /// The DM id.
    pub id: u32,
    /// Guest-physical base of the shared memory (the same in frontend and backend).
    pub shmem_addr: u64,
    /// Size of the shared memory.
    pub shmem_size: u64,
    /// The DM's backend interrupt number.
    pub irq: u32,
}

/// Where an ioeventfd listens: writes to `[addr, addr + len)`, optionally only of one value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IoeventfdSpec {
    /// Guest-physical address.
    pub addr: u64,
    /// 1, 2, 4 or 8; or 0 for any write at `addr`, whatever its width (as KVM does).
    pub len: u32,
    /// `Some(v)`: signal only when the written value is `v` (DATAMATCH).
    pub datamatch: Option<u64>,
}

/// The errors of the device-model API. Each maps to exactly one errno ([`ApiError::errno`]),
/// which is what the ioctl interface reports and what the socket protocol carries:
///
/// | variant | errno | meaning |
/// | --- | --- | --- |
/// | `NoSuchDm` | ENOENT | no DM with this id |
/// | `NotFound` | ENOENT | a deassign names nothing registered; a completion names a request the session does not hold (never attached, or completed already) |
/// | `InvalidArgument` | EINVAL | a malformed argument (width, flags, length, overflow, op); a completion that does not echo its request; a completion the hypervisor refuses (status 3, INVALID_ARGS: not awaiting completion) |
/// | `Exists` | EEXIST | the registration conflicts with an existing one |
/// | `Busy` | EBUSY | the resource is in use (same irqfd twice, a second control session) |
/// | `BadFd` | EBADF | the file descriptor is not an eventfd / not open |
/// | `PermissionDenied` | EPERM | the request or memory belongs to another DM or session |
/// | `ShuttingDown` | ESHUTDOWN | the DM or its control client is being destroyed |
/// | `NotSupported` | ENOTTY | an operation this implementation does not have |
/// | `Disconnected` | ECONNRESET | the connection to the platform is gone |
/// | `Protocol` | EPROTO | the peer sent something that does not decode |
/// | `Io` | EIO (or the OS error) | a system call failed; over the C driver, any hypercall the hypervisor refused |
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No DM with this id.
    #[error("no device model with id {0}")]
    NoSuchDm(u32),
    /// Nothing registered or pending matches.
    #[error("not found: {0}")]
    NotFound(String),
    /// A malformed argument.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Conflicts with an existing registration.
    #[error("already exists: {0}")]
    Exists(String),
    /// In use.
    #[error("busy: {0}")]
    Busy(String),
    /// Not a usable file descriptor of the right kind.
    #[error("bad file descriptor: {0}")]
    BadFd(String),
    /// Belongs to another DM or session.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The DM or client is being destroyed; ATTACH returns this to let its caller exit.
    #[error("device model is shutting down")]
    ShuttingDown,
    /// Not available in this implementation.
    #[error("not supported: {0}")]
    NotSupported(String),
    /// The platform connection is gone.
    #[error("disconnected from the platform")]
    Disconnected,
    /// Undecodable message from the peer.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A system call failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl ApiError {
    /// The one errno this error maps to.
    pub fn errno(&self) -> i32 {
        match self {
            Self::NoSuchDm(_) | Self::NotFound(_) => libc::ENOENT,
            Self::InvalidArgument(_) => libc::EINVAL,
            Self::Exists(_) => libc::EEXIST,
            Self::Busy(_) => libc::EBUSY,
            Self::BadFd(_) => libc::EBADF,
            Self::PermissionDenied(_) => libc::EPERM,
            Self::ShuttingDown => libc::ESHUTDOWN,
            Self::NotSupported(_) => libc::ENOTTY,
            Self::Disconnected => libc::ECONNRESET,
            Self::Protocol(_) => libc::EPROTO,
            Self::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    /// Whether this error from [`DmSession::attach`] means the DM or the session is gone, so
    /// that the caller should stop asking: shutting down, disconnected, no such DM, a closed
    /// fd. Anything else may pass (see [`ApiError::is_transient`]).
    pub fn ends_session(&self) -> bool {
        matches!(
            self,
            Self::ShuttingDown | Self::Disconnected | Self::NoSuchDm(_) | Self::BadFd(_)
        )
    }

    /// Whether this error is what a signal or a spurious wake-up produces, so that the call
    /// is simply made again: EINTR, EAGAIN, and EFAULT (the posted C driver's ATTACH ignores
    /// the result of its interruptible wait, so a signal makes it fail to pop a request and
    /// return EFAULT; `spec/remote-io.md`).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Io(e) if matches!(
            e.raw_os_error(),
            Some(libc::EINTR | libc::EAGAIN | libc::EFAULT)
        ))
    }

    /// The error an errno stands for: the inverse of [`ApiError::errno`] (for `ENOENT`,
    /// [`ApiError::NotFound`]; errnos outside the table become [`ApiError::Io`]). `what` says
    /// which call failed; the socket client and [`KernelApi`] use it to rebuild errors.
    pub fn from_errno(errno: i32, what: &str) -> Self {
        let what = what.to_owned();
        match errno {
            libc::ENOENT => Self::NotFound(what),
            libc::EINVAL => Self::InvalidArgument(what),
            libc::EEXIST => Self::Exists(what),
            libc::EBUSY => Self::Busy(what),
            libc::EBADF => Self::BadFd(what),
            libc::EPERM => Self::PermissionDenied(what),
            libc::ESHUTDOWN => Self::ShuttingDown,
            libc::ENOTTY => Self::NotSupported(what),
            libc::ECONNRESET => Self::Disconnected,
            libc::EPROTO => Self::Protocol(what),
            other => Self::Io(std::io::Error::from_raw_os_error(other)),
        }
    }
}

/// Called by a session, on the thread that queued it, each time a request becomes available to
/// [`DmSession::try_attach`]. It must not block for long and must not call back into
/// [`DmSession::set_notifier`].
pub type Notifier = Arc<dyn Fn() + Send + Sync>;

/// A frontend access stalled on a request of a session's DM, as a [`WaitHelper`] sees it.
pub trait AccessWait {
    /// Whether the access's request is complete (the helper should return).
    fn is_complete(&self) -> bool;
    /// When the access times out (`None`: never). A helper returns well before it.
    fn deadline(&self) -> Option<std::time::Instant>;
}

/// Run by a frontend thread stalled on one of the DM's requests, on that thread, instead of
/// sleeping (the hypervisor model's wait helper, `remio_hyp::WaitHelper`, reached through
/// whatever platform serves the session; see [`DmSession::set_wait_helper`]). It may do the
/// work that completes requests, and returns when [`AccessWait::is_complete`] holds, or
/// earlier: the access then waits as usual. It must not block for long.
pub type WaitHelper = Arc<dyn Fn(&dyn AccessWait) + Send + Sync>;

/// Largest state region a DM may have ([`DmSession::state_region`]).
pub const STATE_REGION_MAX: u64 = 1 << 20;

/// The InterruptStatus bit a used-buffer irqfd sets ([`DmSession::assign_used_buffer_irqfd`]):
/// virtio-mmio's "used buffer notification" (virtio 1.2 §4.2.2, `VIRTIO_MMIO_INT_VRING`).
pub const USED_BUFFER_BIT: u32 = 1;

/// Result alias for the API.
pub type Result<T> = std::result::Result<T, ApiError>;

/// One device model's session with the dispatcher: the per-DM fd of the driver.
///
/// All methods take `&self`: several device-model threads may wait in [`DmSession::attach`]
/// at once while others complete requests or (de)assign eventfds.
pub trait DmSession: Send + Sync {
    /// The DM this session reaches.
    fn info(&self) -> DmInfo;
    /// Blocks until a request for the control client exists and returns it
    /// (`IO_CLIENT_ATTACH`). Returns [`ApiError::ShuttingDown`] when the DM or session is
    /// being destroyed.
    fn attach(&self) -> Result<VirtioRequest>;
    /// Completes a request received from [`DmSession::attach`], echoed with `value` set for a
    /// read (`IO_REQUEST_COMPLETE`). A request is completed once, by the session that got it.
    fn complete(&self, req: &VirtioRequest) -> Result<()>;
    /// Assigns an ioeventfd (`IOEVENTFD`).
    fn assign_ioeventfd(&self, fd: &EventFd, spec: IoeventfdSpec) -> Result<()>;
    /// Removes exactly the matching ioeventfd (`IOEVENTFD` with DEASSIGN).
    fn deassign_ioeventfd(&self, fd: &EventFd, spec: IoeventfdSpec) -> Result<()>;
    /// Assigns an irqfd: each signal injects the frontend interrupt (`IRQFD`).
    fn assign_irqfd(&self, fd: &EventFd) -> Result<()>;
    /// Removes an irqfd (`IRQFD` with DEASSIGN).
    fn deassign_irqfd(&self, fd: &EventFd) -> Result<()>;
    /// Maps `len` bytes of the DM's shared memory from offset 0 (`mmap` on the DM fd), placed
    /// at guest-physical `guest_base`: the address the *frontend* uses for it, which virtqueue
    /// addresses are relative to. On Bao the shared memory sits at the same address in both
    /// VMs and `guest_base` is [`DmInfo::shmem_addr`] ([`DmSession::map_shmem`]); a backend
    /// that sees it elsewhere (a PCI BAR in remio's backend VM) names the frontend's view.
    /// `len` must be non-zero and at most the shmem size (`EINVAL`).
    fn map_shmem_at(&self, len: u64, guest_base: u64) -> Result<GuestMemoryMmap>;

    /// [`DmSession::map_shmem_at`] at the DM's own `shmem_addr` (both views the same, as on
    /// Bao).
    fn map_shmem(&self, len: u64) -> Result<GuestMemoryMmap> {
        self.map_shmem_at(len, self.info().shmem_addr)
    }

    /// What this dispatcher does that a device model must plan for (see [`DriverTraits`]).
    fn driver_traits(&self) -> DriverTraits {
        DriverTraits::REMIO
    }

    /// Completes `req` (as [`DmSession::complete`]) and then waits for the next request (as
    /// [`DmSession::attach`]). Over the socket this is one round trip instead of two; if the
    /// completion fails, no attach is made and its error is returned.
    fn complete_and_attach(&self, req: &VirtioRequest) -> Result<VirtioRequest> {
        self.complete(req)?;
        self.attach()
    }

    /// Non-blocking [`DmSession::attach`]: `Ok(None)` when no request is queued. The socket
    /// server uses it with [`DmSession::set_notifier`] to hand a request to a remote waiter
    /// from the thread that queued it, with no server thread woken in between.
    /// Implementations without it return [`ApiError::NotSupported`].
    fn try_attach(&self) -> Result<Option<VirtioRequest>> {
        Err(ApiError::NotSupported("try_attach".into()))
    }

    /// Installs (`Some`) or removes (`None`) the [`Notifier`] of this session. At most one is
    /// installed; when `set_notifier(None)` returns, the old one is not running and will not
    /// be called again. Implementations without it return [`ApiError::NotSupported`].
    fn set_notifier(&self, notifier: Option<Notifier>) -> Result<()> {
        let _ = notifier;
        Err(ApiError::NotSupported("set_notifier".into()))
    }

    /// Installs (`Some`, replacing any) or removes (`None`) the [`WaitHelper`] of this
    /// session's device: what a frontend thread stalled on one of the DM's requests runs
    /// instead of sleeping. The socket server uses it so that the stalled thread reads the
    /// device model's answer itself (see [`crate::socket`]). When `set_wait_helper(None)`
    /// returns, no new access calls the old helper; a call already running is not waited for.
    /// The session's end removes it. Implementations without it (and platforms that do not
    /// offer it) return [`ApiError::NotSupported`].
    fn set_wait_helper(&self, helper: Option<WaitHelper>) -> Result<()> {
        let _ = helper;
        Err(ApiError::NotSupported("set_wait_helper".into()))
    }

    /// Registers the session's status word (see [`statusword`]): the platform allocates a
    /// small shared page whose word answers 4-byte reads of `spec.status_addr` and whose bits
    /// 4-byte writes to `spec.ack_addr` clear, without reaching the device model. A virtio
    /// device model keeps InterruptStatus in [`StatusWord::word`]. One per session
    /// (`EEXIST`); addresses 4-byte aligned (`EINVAL`), inside the DM's MMIO window where it
    /// is known (`EPERM`) and not overlapping an ioeventfd (`EEXIST`). It stays registered
    /// until the session ends. Implementations without it (the kernel driver) return
    /// [`ApiError::NotSupported`]: the device model then serves the registers itself.
    fn register_status_word(&self, spec: StatusWordSpec) -> Result<StatusWord> {
        let _ = spec;
        Err(ApiError::NotSupported("register_status_word".into()))
    }

    /// remio's extension of `IRQFD`: assigns `fd` as an irqfd whose every signal first sets
    /// InterruptStatus bit 0 (used buffer, virtio 1.2 §4.2.2) in the session's status word
    /// ([`DmSession::register_status_word`], which must come first: `ENOENT` without it), then
    /// injects the frontend interrupt. A vhost-user daemon given it as its call eventfd
    /// interrupts the frontend with the bit set, with no device-model thread in between.
    /// [`DmSession::deassign_irqfd`] removes it. The C driver has no such call (Bao keeps no
    /// InterruptStatus; its irqfd only injects): [`ApiError::NotSupported`], and the device
    /// model sets the bit itself before signalling a plain irqfd.
    fn assign_used_buffer_irqfd(&self, fd: &EventFd) -> Result<()> {
        let _ = fd;
        Err(ApiError::NotSupported("assign_used_buffer_irqfd".into()))
    }

    /// The DM's state region: a file of at least `len` bytes that the platform keeps for the
    /// DM's lifetime, across sessions, so that a device model restarted after a crash or an
    /// upgrade finds what the previous one recorded there (`remio_virtio::persist`). The
    /// first call for a DM creates it zeroed (a sealed memfd: it cannot shrink or grow); every
    /// later call, from any session of the DM, returns the same file. `len` 0 or over
    /// [`STATE_REGION_MAX`] is `EINVAL`; a region that exists with fewer bytes is `EEXIST`.
    /// The C driver has no such thing ([`ApiError::NotSupported`]): there a device model's
    /// exit destroys its DMs anyway.
    fn state_region(&self, len: u64) -> Result<std::fs::File> {
        let _ = len;
        Err(ApiError::NotSupported("state_region".into()))
    }

    /// Ends the session's ATTACH side: every [`DmSession::attach`] (and
    /// [`DmSession::complete_and_attach`], [`DmSession::try_attach`]) of this session, blocked
    /// now or made later, returns [`ApiError::ShuttingDown`]. This is how a device model stops
    /// a thread waiting in ATTACH with no request coming. Calling it again does nothing.
    ///
    /// - In-process: the session's status word is dropped, its ioeventfds and irqfds deassigned
    ///   and its control client destroyed, in that order;
    ///   requests queued to it and not attached go back to the DM for the next session, which
    ///   may be opened at once. Requests already attached can still be completed on this
    ///   session.
    /// - Socket: the connection is shut down; every later call fails, and the platform ends the
    ///   session as if the process had exited (requests attached and not completed go back
    ///   to the DM for its next session; only if the DM cannot keep them are they completed,
    ///   reads with [`ABANDONED_READ_VALUE`]).
    /// - Kernel driver: not available ([`ApiError::NotSupported`]). The posted driver has no
    ///   call that wakes an ATTACH waiter, and closing the DM fd does not either (the blocked
    ///   ioctl holds the file; the driver's release runs after it returns). Its waiters return
    ///   only when the DM is destroyed.
    ///
    /// Implementations without it return [`ApiError::NotSupported`].
    fn shutdown(&self) -> Result<()> {
        Err(ApiError::NotSupported("shutdown".into()))
    }
}

/// Behaviour of the dispatcher behind a session that differs between remio's dispatcher and the
/// posted C driver (`spec/remote-io.md`, defects; docs/c-driver.md), so that one device model
/// can serve on both without falling back silently on something that does not exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriverTraits {
    /// A write to a registered ioeventfd's address whose value matches no ioeventfd still
    /// reaches the control client (remio). On the C driver an ioeventfd owns its whole range
    /// and such writes are dropped, so a device model must not rely on the control path
    /// for a queue whose ioeventfd was refused.
    pub unmatched_notify_reaches_control: bool,
    /// Ending the session (closing the DM fd) destroys the DM: a later `open` of the same id
    /// fails (the C driver, both revisions). On remio the DM outlives its sessions.
    pub session_end_destroys_dm: bool,
}

impl DriverTraits {
    /// remio's own dispatcher (in-process and over the socket).
    pub const REMIO: Self = Self {
        unmatched_notify_reaches_control: true,
        session_end_destroys_dm: false,
    };
    /// The C driver's ioctls ([`KernelApi`]).
    pub const C_DRIVER: Self = Self {
        unmatched_notify_reaches_control: false,
        session_end_destroys_dm: true,
    };
}

/// A way to reach the dispatcher: in-process, over a socket, or the kernel driver.
pub trait DmApi: Send + Sync {
    /// Opens a session on DM `dm_id` (`DM_GET_INFO`).
    fn open(&self, dm_id: u32) -> Result<Box<dyn DmSession>>;
}

/// `map_shmem`'s bounds: `len` must be non-zero and at most `shmem_size`.
pub(crate) fn check_shmem_len(len: u64, shmem_size: u64) -> Result<()> {
    if len == 0 || len > shmem_size {
        return Err(ApiError::InvalidArgument(format!(
            "shared-memory length {len:#x} not in 1..={shmem_size:#x}"
        )));
    }
    Ok(())
}

/// Maps `len` bytes of `file` from `offset`, shared, placed at guest-physical `guest_base`.
pub fn map_file(
    file: std::fs::File,
    offset: u64,
    len: u64,
    guest_base: u64,
) -> Result<GuestMemoryMmap> {
    use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};
    let size = usize::try_from(len)
        .map_err(|_| ApiError::InvalidArgument(format!("length {len:#x} too large")))?;
    let region = MmapRegion::from_file(FileOffset::new(file, offset), size)
        .map_err(|e| ApiError::Io(std::io::Error::other(e)))?;
    let region = GuestRegionMmap::new(region, GuestAddress(guest_base)).ok_or_else(|| {
        ApiError::InvalidArgument("shared memory overflows the address space".into())
    })?;
    GuestMemoryMmap::from_regions(vec![region])
        .map_err(|e| ApiError::InvalidArgument(format!("shared memory region: {e}")))
}
