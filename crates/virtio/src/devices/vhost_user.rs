//! A vhost-user frontend device: the virtio device runs in another process (a vhost-user
//! daemon such as virtiofsd or vhost-device-vsock) and this device model only hands it what it
//! needs to serve the virtqueues itself, over the daemon's UNIX socket (rust-vmm `vhost`,
//! vhost-user protocol of QEMU's `docs/interop/vhost-user.rst`):
//!
//! - features and protocol features (negotiated when the device is built, acked at DRIVER_OK);
//! - the memory table: the DM's shared memory as the file it is mapped from (the memfd of the
//!   socket API's MAP_SHMEM, the DM's own file in process, the DM fd on the C driver), at the
//!   frontend's guest-physical address, with this process's mapping address so that the ring
//!   addresses (virtual addresses here, as in QEMU) translate;
//! - per queue: size, base (next available index), ring addresses, the call eventfd and the
//!   kick eventfd, which *is* the transport's queue eventfd — the one the dispatcher signals on
//!   QueueNotify — so a notify goes from the trapped access straight to the daemon;
//! - config-space reads and writes (GET_CONFIG / SET_CONFIG), or a config space kept here for
//!   devices whose daemons do not serve one (virtio-fs: the tag is ours, as in QEMU).
//!
//! The data path never passes through this process. virtio-mmio asks one thing of the
//! interrupt path that the daemon cannot do: a used-buffer interrupt must set InterruptStatus
//! bit 0 *before* the frontend is interrupted (the driver reads InterruptStatus and ignores an
//! interrupt without the bit), and the daemon only knows its call eventfd. Two ways, chosen
//! at the first activation:
//!
//! - **On remio's dispatcher** (a session that takes a used-buffer irqfd,
//!   [`remio_api::DmSession::assign_used_buffer_irqfd`], which needs the status word the
//!   runner registers at setup): the daemon's call eventfd of every queue *is* an irqfd that
//!   the dispatcher's irqfd thread turns into "set bit 0 in the status word, then NOTIFY". A
//!   daemon's call reaches the frontend with no thread of this process in between (one thread
//!   wake-up fewer per interrupt than the relay below; see docs/performance.md, virtio-fs).
//! - **Elsewhere** (the C driver, whose irqfd only injects: Bao keeps no InterruptStatus, the
//!   device model does): each queue's call eventfd is ours, and a relay thread turns a call
//!   into "set bit 0, signal the irqfd" ([`crate::device::Interrupt`]).
//!
//! Either way a relay thread watches the socket: a daemon that goes away makes the device report
//! DEVICE_NEEDS_RESET, and for virtio-fs every request the guest has queued (and every later
//! one) is completed with `EIO`, so that nothing in the guest waits for a daemon that is gone.
//!
//! In-flight requests are not resumed across a daemon's death:
//! `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` (the shared region where a daemon records the
//! descriptors it has taken, for its successor to replay) is never negotiated, and none of the
//! daemons remio is used with offers it. What they offered (GET_PROTOCOL_FEATURES, logged at
//! `info` on every connection), measured on 2026-11-30:
//!
//! | daemon | protocol features offered |
//! | --- | --- |
//! | virtiofsd 1.14.0 (Rust, crates.io; `remio run --share`) | `0x8a42b`: MQ, LOG_SHMFD, REPLY_ACK, BACKEND_REQ, BACKEND_SEND_FD, RESET_DEVICE, CONFIGURE_MEM_SLOTS, DEVICE_STATE |
//! | virtiofsd of Debian bookworm's qemu-system-common 7.2 (C, `/usr/lib/qemu/virtiofsd`) | `0x8c2b`: MQ, LOG_SHMFD, REPLY_ACK, BACKEND_REQ, BACKEND_SEND_FD, HOST_NOTIFIER, CONFIGURE_MEM_SLOTS |
//! | vhost-device-vsock 0.3.0 (`remio run --vsock`) | `0x209`: MQ, REPLY_ACK, CONFIG |
//!
//! So the clean failure is the only path: a daemon that dies with requests in flight leaves
//! the device in DEVICE_NEEDS_RESET with those requests (virtio-fs: failed with `EIO`) and
//! every later one failed, the guest sees errors and nothing waits; after the guest resets the
//! device, the next activation connects to a daemon listening again (a new mount for
//! virtio-fs).
//!
//! A daemon that is not there, is not a socket, offers fewer queues than configured, lacks
//! VIRTIO_F_VERSION_1 or hangs up during negotiation is an error naming the socket; every
//! socket read and write is bounded by [`SOCKET_TIMEOUT`], so a daemon that stops answering
//! fails the call instead of hanging the device model.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::{VIRTIO_ID_FS, VIRTIO_ID_VSOCK};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{
    read_config_bytes, ActivateContext, ActivateError, Interrupt, VirtioDevice, Worker, STOP_TOKEN,
};
use remio_ratelimit::warn_rl;

/// How long one message to or from the daemon may take before the call fails.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);

/// Default queue size of virtio-fs and vsock devices (virtiofsd accepts up to 32768,
/// vhost-device-vsock up to 1024). 1024 because Linux's virtio-fs driver caps a FUSE request
/// at the queue size less 4 pages (`max_pages_limit`): at 256 a 1 MiB read is two requests
/// (252 + 4 pages), each with its kick, interrupt, InterruptStatus read and ACK, every one a
/// trapped access here; at 1024 it is one (docs/performance.md, virtio-fs).
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;

/// virtio-fs config space (virtio 1.2 §5.11.4): `tag[36]`, `le32 num_request_queues`.
pub const FS_TAG_LEN: usize = 36;

/// The device-independent feature bits a vhost-user device may offer through our transport:
/// the device-specific bits 0..=23, INDIRECT_DESC, EVENT_IDX and VERSION_1. The others are
/// refused because our transport does not implement what they need (RING_PACKED: split rings
/// only; ACCESS_PLATFORM: no IOTLB; RING_RESET: no QueueReset; NOTIFICATION_DATA: QueueNotify
/// carries the index only), and bits 26 (LOG_ALL) and 30 (PROTOCOL_FEATURES) are vhost-user's,
/// not virtio's.
pub const TRANSPORT_FEATURES: u64 = 0x00ff_ffff
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_F_VERSION_1);

/// The protocol features this frontend uses when the daemon offers them.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
}

/// Errors of a vhost-user device (building it, or activating it).
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The socket path does not exist or cannot be inspected.
    #[error("vhost-user socket {path}: {source}")]
    SocketPath {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The path exists but is not a socket.
    #[error("vhost-user socket {0}: not a socket (is the daemon running?)")]
    NotASocket(PathBuf),
    /// Connecting failed.
    #[error("vhost-user socket {path}: cannot connect: {source}")]
    Connect {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A message to or from the daemon failed (it hung up, timed out or refused).
    #[error("vhost-user daemon at {path}: {step}: {source}")]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// What was being done.
        step: &'static str,
        /// The vhost error.
        #[source]
        source: vhost::Error,
    },
    /// The daemon serves fewer queues than the device has.
    #[error("vhost-user daemon at {path}: it serves {offered} queues, the device needs {wanted}")]
    Queues {
        /// The socket.
        path: PathBuf,
        /// What the daemon said (GET_QUEUE_NUM).
        offered: u64,
        /// What the config asks for.
        wanted: usize,
    },
    /// The daemon does not offer VIRTIO_F_VERSION_1 (a modern device is all we transport).
    #[error("vhost-user daemon at {path}: it does not offer VIRTIO_F_VERSION_1 (features {features:#x})")]
    NotModern {
        /// The socket.
        path: PathBuf,
        /// What it offered.
        features: u64,
    },
    /// A daemon that came back offers fewer features than the one the device was built with.
    #[error(
        "vhost-user daemon at {path}: the new daemon lacks features {missing:#x} the device \
         offered"
    )]
    FewerFeatures {
        /// The socket.
        path: PathBuf,
        /// The feature bits the device offered that the daemon no longer does.
        missing: u64,
    },
    /// The shared memory is not mapped from a file, so the daemon could not map it.
    #[error("the shared memory at {0:#x} has no file a daemon could map")]
    NoMemoryFile(u64),
    /// A ring address is outside the shared memory.
    #[error("queue {0}: a ring address is outside the shared memory")]
    RingAddress(usize),
    /// An eventfd, epoll or thread could not be created.
    #[error("vhost-user device: {0}")]
    Io(#[from] std::io::Error),
}

/// Where the device's config space comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigSpace {
    /// Kept here, read-only (writes are ignored): virtio-fs's tag and queue count.
    Local(Vec<u8>),
    /// The daemon's (GET_CONFIG / SET_CONFIG) when it offers VHOST_USER_PROTOCOL_F_CONFIG,
    /// else these bytes, read-only.
    DaemonOr(Vec<u8>),
}

/// What a vhost-user device is: its daemon's socket, its virtio type and its queues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhostUserSpec {
    /// The daemon's socket.
    pub socket: PathBuf,
    /// The virtio device ID (virtio 1.2 §5).
    pub device_type: u32,
    /// The maximum size of each queue (QueueNumMax); their number is the number of queues.
    pub queue_sizes: Vec<u16>,
    /// The config space.
    pub config: ConfigSpace,
}

impl VhostUserSpec {
    /// virtio-fs (device ID 26, virtio 1.2 §5.11): one hiprio queue and `request_queues`
    /// request queues; the config space (tag, number of request queues) is ours, as in QEMU's
    /// vhost-user-fs. `tag` must be 1..=36 bytes.
    pub fn fs(
        socket: PathBuf,
        tag: &str,
        request_queues: u16,
        queue_size: u16,
    ) -> Result<Self, String> {
        if tag.is_empty() || tag.len() > FS_TAG_LEN {
            return Err(format!("tag `{tag}`: 1 to {FS_TAG_LEN} bytes"));
        }
        if request_queues == 0 {
            return Err("at least one request queue".to_owned());
        }
        let mut config = vec![0u8; FS_TAG_LEN + 4];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[FS_TAG_LEN..].copy_from_slice(&u32::from(request_queues).to_le_bytes());
        Ok(Self {
            socket,
            device_type: VIRTIO_ID_FS,
            queue_sizes: vec![queue_size; usize::from(request_queues) + 1],
            config: ConfigSpace::Local(config),
        })
    }

    /// virtio-vsock (device ID 19, virtio 1.2 §5.10): rx, tx and event queues; the config space
    /// (`le64 guest_cid`) is the daemon's when it serves one, else `guest_cid`.
    pub fn vsock(socket: PathBuf, guest_cid: u64, queue_size: u16) -> Self {
        Self {
            socket,
            device_type: VIRTIO_ID_VSOCK,
            queue_sizes: vec![queue_size; 3],
            config: ConfigSpace::DaemonOr(guest_cid.to_le_bytes().to_vec()),
        }
    }

    /// Any device type, served by a generic daemon: `queues` queues of `queue_size`, the
    /// daemon's config space (zeros if it has none).
    pub fn generic(socket: PathBuf, device_type: u32, queues: usize, queue_size: u16) -> Self {
        Self {
            socket,
            device_type,
            queue_sizes: vec![queue_size; queues],
            config: ConfigSpace::DaemonOr(Vec::new()),
        }
    }
}

/// Checks that `path` is a socket, with an error that says what it is instead.
fn check_socket(path: &Path) -> Result<(), VhostUserError> {
    let meta = std::fs::metadata(path).map_err(|source| VhostUserError::SocketPath {
        path: path.to_owned(),
        source,
    })?;
    if !meta.file_type().is_socket() {
        return Err(VhostUserError::NotASocket(path.to_owned()));
    }
    Ok(())
}

/// One connection to the daemon, negotiated up to SET_OWNER.
struct Connection {
    frontend: Frontend,
    /// The daemon's virtio features (GET_FEATURES), vhost-user bits included.
    offered: u64,
    /// The protocol features both sides use.
    protocol: VhostUserProtocolFeatures,
}

impl Connection {
    /// Connects and negotiates: GET_FEATURES, [GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES,
    /// GET_QUEUE_NUM], SET_OWNER.
    fn open(spec: &VhostUserSpec) -> Result<Self, VhostUserError> {
        let path = &spec.socket;
        check_socket(path)?;
        let stream = UnixStream::connect(path).map_err(|source| VhostUserError::Connect {
            path: path.clone(),
            source,
        })?;
        stream.set_read_timeout(Some(SOCKET_TIMEOUT))?;
        stream.set_write_timeout(Some(SOCKET_TIMEOUT))?;
        let queues = spec.queue_sizes.len();
        let mut frontend = Frontend::from_stream(stream, queues as u64);
        let proto = |step| {
            let path = path.clone();
            move |source| VhostUserError::Protocol { path, step, source }
        };
        let offered = frontend.get_features().map_err(proto("GET_FEATURES"))?;
        if offered & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(VhostUserError::NotModern {
                path: path.clone(),
                features: offered,
            });
        }
        let mut protocol = VhostUserProtocolFeatures::empty();
        let mut theirs = VhostUserProtocolFeatures::empty();
        if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            theirs = frontend
                .get_protocol_features()
                .map_err(proto("GET_PROTOCOL_FEATURES"))?;
            protocol = theirs & wanted_protocol_features();
            frontend
                .set_protocol_features(protocol)
                .map_err(proto("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every message that has no reply of its own is acknowledged: a refusal or a
                // daemon that died is seen at the message that failed.
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        if protocol.contains(VhostUserProtocolFeatures::MQ) {
            let offered_queues = frontend.get_queue_num().map_err(proto("GET_QUEUE_NUM"))?;
            if offered_queues < queues as u64 {
                return Err(VhostUserError::Queues {
                    path: path.clone(),
                    offered: offered_queues,
                    wanted: queues,
                });
            }
        }
        frontend.set_owner().map_err(proto("SET_OWNER"))?;
        // Once per connection (device start-up and reconnections), never per guest access.
        log::info!(
            "vhost-user daemon at {}: features {offered:#x}, protocol features offered \
             {:#x} ({theirs:?}), used {protocol:?}; inflight tracking (INFLIGHT_SHMFD) {}",
            path.display(),
            theirs.bits(),
            if theirs.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
                "offered, not used: requests in flight fail if the daemon dies"
            } else {
                "not offered: requests in flight fail if the daemon dies"
            }
        );
        Ok(Self {
            frontend,
            offered,
            protocol,
        })
    }
}

/// What one activation runs on, for the relay and, if the daemon dies, for failing requests.
struct Live {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
}

/// How the daemon's calls reach the frontend (see the module docs).
enum CallPath {
    /// Not decided yet (no activation so far).
    Undecided,
    /// Through the relay thread and [`VhostUserDevice::calls`].
    Relay,
    /// Straight to this irqfd, which the dispatcher turns into InterruptStatus bit 0 and an
    /// interrupt; assigned through the session, deassigned when the device is dropped.
    Irqfd(EventFd),
}

/// A virtio device served by a vhost-user daemon (see the module docs).
pub struct VhostUserDevice {
    spec: VhostUserSpec,
    conn: Connection,
    avail_features: u64,
    /// One call eventfd per queue, ours for the device's lifetime (the relay reads them),
    /// unless the calls go to a used-buffer irqfd ([`CallPath::Irqfd`]).
    calls: Vec<EventFd>,
    /// The DM's session, if the runner gave it ([`VirtioDevice::attach_session`]).
    session: Option<Arc<dyn remio_api::DmSession>>,
    call_path: CallPath,
    /// Set by the relay when the daemon hangs up.
    lost: Arc<AtomicBool>,
    relay: Option<Worker<()>>,
}

impl std::fmt::Debug for VhostUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice")
            .field("spec", &self.spec)
            .field("offered", &self.conn.offered)
            .field("protocol", &self.conn.protocol)
            .field("lost", &self.lost.load(Ordering::SeqCst))
            .field("active", &self.relay.is_some())
            .field(
                "calls_to_irqfd",
                &matches!(self.call_path, CallPath::Irqfd(_)),
            )
            .finish_non_exhaustive()
    }
}

impl VhostUserDevice {
    /// Connects to the daemon of `spec` and negotiates features; the device is then ready
    /// for the transport. Errors name the socket.
    pub fn connect(spec: VhostUserSpec) -> Result<Self, VhostUserError> {
        let conn = Connection::open(&spec)?;
        let avail_features = conn.offered & TRANSPORT_FEATURES;
        let calls = spec
            .queue_sizes
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            spec,
            conn,
            avail_features,
            calls,
            session: None,
            call_path: CallPath::Undecided,
            lost: Arc::default(),
            relay: None,
        })
    }

    /// Whether the daemon's calls go straight to a used-buffer irqfd (no relay).
    pub fn calls_go_to_irqfd(&self) -> bool {
        matches!(self.call_path, CallPath::Irqfd(_))
    }

    /// Decides, once, how calls reach the frontend: a used-buffer irqfd if the session takes
    /// one, else the relay.
    fn decide_call_path(&mut self) {
        if !matches!(self.call_path, CallPath::Undecided) {
            return;
        }
        self.call_path = CallPath::Relay;
        let Some(session) = &self.session else {
            return;
        };
        let fd = match EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) {
            Ok(fd) => fd,
            Err(e) => {
                log::warn!("vhost-user: used-buffer irqfd: {e}; calls go through the relay");
                return;
            }
        };
        match session.assign_used_buffer_irqfd(&fd) {
            Ok(()) => {
                log::info!(
                    "vhost-user daemon at {}: its calls go to a used-buffer irqfd (no relay)",
                    self.spec.socket.display()
                );
                self.call_path = CallPath::Irqfd(fd);
            }
            Err(remio_api::ApiError::NotSupported(_)) => {
                log::info!("vhost-user: no used-buffer irqfd on this dispatcher; calls relayed");
            }
            Err(e) => {
                log::warn!("vhost-user: used-buffer irqfd refused ({e}); calls relayed");
            }
        }
    }

    /// The protocol features in use.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.conn.protocol
    }

    /// Whether the daemon has gone away.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// After the daemon went away: a new connection, if a daemon listens again (the guest
    /// reset the device, so nothing of the old one is in flight).
    fn reconnect(&mut self) -> Result<(), VhostUserError> {
        let conn = Connection::open(&self.spec)?;
        let missing = self.avail_features & !conn.offered;
        if missing != 0 {
            // The driver negotiated against what the first daemon offered.
            return Err(VhostUserError::FewerFeatures {
                path: self.spec.socket.clone(),
                missing,
            });
        }
        self.conn = conn;
        self.lost.store(false, Ordering::SeqCst);
        log::info!(
            "vhost-user: reconnected to the daemon at {}",
            self.spec.socket.display()
        );
        Ok(())
    }

    /// Hands the rings to the daemon (the order of QEMU's vhost_dev_start, with the call
    /// eventfd before the kick so that no completion of a ring that starts at its kick is
    /// missed).
    fn start(&mut self, ctx: &ActivateContext) -> Result<(), VhostUserError> {
        let fe = &mut self.conn.frontend;
        let mut features = ctx.acked_features & self.conn.offered;
        if self.conn.offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        let path = self.spec.socket.clone();
        let proto = |step| {
            let path = path.clone();
            move |source| VhostUserError::Protocol { path, step, source }
        };
        fe.set_features(features).map_err(proto("SET_FEATURES"))?;
        let regions = ctx
            .mem
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r)
                    .map_err(|_| VhostUserError::NoMemoryFile(r.start_addr().0))
            })
            .collect::<Result<Vec<_>, _>>()?;
        fe.set_mem_table(&regions).map_err(proto("SET_MEM_TABLE"))?;
        for (i, q) in ctx.queues.iter().enumerate() {
            let host = |a: GuestAddress| {
                ctx.mem
                    .get_host_address(a)
                    .map(|p| p as u64)
                    .map_err(|_| VhostUserError::RingAddress(i))
            };
            let ring = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host(GuestAddress(q.desc_table()))?,
                used_ring_addr: host(GuestAddress(q.used_ring()))?,
                avail_ring_addr: host(GuestAddress(q.avail_ring()))?,
                log_addr: None,
            };
            fe.set_vring_num(i, q.size())
                .map_err(proto("SET_VRING_NUM"))?;
            fe.set_vring_base(i, q.next_avail())
                .map_err(proto("SET_VRING_BASE"))?;
            fe.set_vring_addr(i, &ring)
                .map_err(proto("SET_VRING_ADDR"))?;
            let call = match &self.call_path {
                CallPath::Irqfd(fd) => fd,
                CallPath::Undecided | CallPath::Relay => &self.calls[i],
            };
            fe.set_vring_call(i, call)
                .map_err(proto("SET_VRING_CALL"))?;
            fe.set_vring_kick(i, &ctx.queue_evts[i])
                .map_err(proto("SET_VRING_KICK"))?;
        }
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            for i in 0..ctx.queues.len() {
                fe.set_vring_enable(i, true)
                    .map_err(proto("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Stops the rings (SET_VRING_ENABLE 0, GET_VRING_BASE: the daemon stops a ring when asked
    /// its base). Failures are logged: the daemon may be gone.
    fn stop_rings(&mut self) {
        let fe = &mut self.conn.frontend;
        let enable = self.conn.offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        for i in 0..self.spec.queue_sizes.len() {
            if enable {
                if let Err(e) = fe.set_vring_enable(i, false) {
                    warn_rl!("vhost-user: queue {i}: SET_VRING_ENABLE 0: {e}");
                }
            }
            if let Err(e) = fe.get_vring_base(i) {
                warn_rl!("vhost-user: queue {i}: GET_VRING_BASE: {e}");
            }
        }
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.spec.device_type
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.spec.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let local = match &self.spec.config {
            ConfigSpace::DaemonOr(_)
                if self
                    .conn
                    .protocol
                    .contains(VhostUserProtocolFeatures::CONFIG) =>
            {
                data.fill(0);
                let (Ok(off), Ok(len)) = (u32::try_from(offset), u32::try_from(data.len())) else {
                    return;
                };
                let buf = vec![0u8; data.len()];
                // get_config needs `&mut`; the frontend is a shared handle.
                let mut fe = self.conn.frontend.clone();
                match fe.get_config(off, len, VhostUserConfigFlags::empty(), &buf) {
                    Ok((_, reply)) if reply.len() == data.len() => data.copy_from_slice(&reply),
                    Ok(_) => warn_rl!("vhost-user: GET_CONFIG answered a wrong size"),
                    Err(e) => warn_rl!("vhost-user: GET_CONFIG at {off:#x}: {e}"),
                }
                return;
            }
            ConfigSpace::Local(c) | ConfigSpace::DaemonOr(c) => c,
        };
        read_config_bytes(local, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if !matches!(self.spec.config, ConfigSpace::DaemonOr(_))
            || !self
                .conn
                .protocol
                .contains(VhostUserProtocolFeatures::CONFIG)
        {
            warn_rl!("vhost-user: write to read-only config space at {offset:#x} ignored");
            return;
        }
        let Ok(off) = u32::try_from(offset) else {
            return;
        };
        if let Err(e) = self
            .conn
            .frontend
            .set_config(off, VhostUserConfigFlags::WRITABLE, data)
        {
            warn_rl!("vhost-user: SET_CONFIG at {off:#x}: {e}");
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.relay.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if ctx.queues.len() != self.calls.len() || ctx.queue_evts.len() != self.calls.len() {
            return Err(ActivateError::QueueCount {
                expected: self.calls.len(),
                got: ctx.queues.len(),
            });
        }
        let backend = |e: VhostUserError| ActivateError::Backend(std::io::Error::other(e));
        if self.is_lost() {
            self.reconnect().map_err(backend)?;
        }
        self.decide_call_path();
        // Drop calls that came before this activation: they belong to the last one.
        for c in &self.calls {
            let _ = c.read();
        }
        self.start(&ctx).map_err(backend)?;
        // The relay reads the calls only when they are ours.
        let calls = match self.call_path {
            CallPath::Irqfd(_) => Vec::new(),
            CallPath::Undecided | CallPath::Relay => self
                .calls
                .iter()
                .map(EventFd::try_clone)
                .collect::<Result<Vec<_>, _>>()
                .map_err(ActivateError::Backend)?,
        };
        let socket = self.conn.frontend.as_raw_fd();
        // SAFETY: `socket` is the frontend's open socket; dup returns a new descriptor we own
        // (or -1, checked below), so the relay's watch does not depend on the frontend's fd.
        let dup = unsafe { libc::dup(socket) };
        if dup < 0 {
            return Err(ActivateError::Backend(std::io::Error::last_os_error()));
        }
        // SAFETY: `dup` was just returned by dup(2) and nothing else owns it.
        let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) };
        let live = Live {
            mem: ctx.mem,
            queues: ctx.queues,
            kicks: ctx.queue_evts,
            interrupt: ctx.interrupt,
        };
        let relay = Relay {
            calls,
            socket,
            lost: self.lost.clone(),
            fail_fs: self.spec.device_type == VIRTIO_ID_FS,
            live,
        };
        let worker = Worker::spawn("vhost-user-relay", move |stop| relay.run(&stop))
            .map_err(ActivateError::Backend)?;
        self.relay = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        let Some(mut relay) = self.relay.take() else {
            return;
        };
        relay.stop();
        if !self.is_lost() {
            self.stop_rings();
        }
    }

    fn attach_session(&mut self, session: &Arc<dyn remio_api::DmSession>) {
        self.session = Some(session.clone());
    }
}

impl Drop for VhostUserDevice {
    fn drop(&mut self) {
        self.reset();
        if let (CallPath::Irqfd(fd), Some(session)) = (&self.call_path, &self.session) {
            // The session may be ending already (then the DM drops its irqfds itself).
            if let Err(e) = session.deassign_irqfd(fd) {
                log::debug!("vhost-user: deassigning the used-buffer irqfd: {e}");
            }
        }
    }
}

const SOCKET_TOKEN: u64 = u64::MAX - 1;
const KICK_BASE: u64 = 1 << 32;

/// The relay thread of one activation: call eventfds to InterruptStatus + irqfd (none when
/// the calls go to a used-buffer irqfd), and the socket watched for the daemon hanging up.
struct Relay {
    calls: Vec<EventFd>,
    socket: std::os::fd::OwnedFd,
    lost: Arc<AtomicBool>,
    fail_fs: bool,
    live: Live,
}

impl Relay {
    fn run(mut self, stop: &EventFd) {
        let epoll = match self.setup(stop) {
            Ok(e) => e,
            Err(e) => {
                log::error!("vhost-user: relay: {e}; device needs reset");
                self.live.interrupt.set_needs_reset();
                return;
            }
        };
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("vhost-user: relay epoll: {e}");
                    return;
                }
            };
            let mut used = false;
            for ev in &events[..n] {
                match ev.data() {
                    STOP_TOKEN => return,
                    SOCKET_TOKEN => {
                        let _ = epoll.ctl(
                            ControlOperation::Delete,
                            self.socket.as_raw_fd(),
                            EpollEvent::default(),
                        );
                        self.daemon_gone(&epoll);
                    }
                    t if t >= KICK_BASE => {
                        let Ok(q) = usize::try_from(t - KICK_BASE) else {
                            continue;
                        };
                        if let Some(k) = self.live.kicks.get(q) {
                            let _ = k.read();
                        }
                        self.fail_queue(q);
                    }
                    t => {
                        if let Some(c) = usize::try_from(t).ok().and_then(|q| self.calls.get(q)) {
                            // EAGAIN: another wake-up already took it.
                            used |= c.read().is_ok();
                        }
                    }
                }
            }
            if used {
                self.live.interrupt.signal_used_queue();
            }
        }
    }

    fn setup(&self, stop: &EventFd) -> std::io::Result<Epoll> {
        let epoll = Epoll::new()?;
        let add =
            |fd, token, set| epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(set, token));
        add(stop.as_raw_fd(), STOP_TOKEN, EventSet::IN)?;
        // Only the hang-up: replies to the control thread's requests are not ours to read.
        add(
            self.socket.as_raw_fd(),
            SOCKET_TOKEN,
            EventSet::READ_HANG_UP | EventSet::HANG_UP,
        )?;
        for (i, c) in self.calls.iter().enumerate() {
            add(c.as_raw_fd(), i as u64, EventSet::IN)?;
        }
        Ok(epoll)
    }

    /// The daemon hung up: DEVICE_NEEDS_RESET; for virtio-fs, fail what is queued and watch
    /// the kicks to fail what comes.
    fn daemon_gone(&mut self, epoll: &Epoll) {
        self.lost.store(true, Ordering::SeqCst);
        log::error!("vhost-user: the daemon hung up; device needs reset");
        self.live.interrupt.set_needs_reset();
        if !self.fail_fs {
            return;
        }
        let mem = &self.live.mem;
        for q in &mut self.live.queues {
            // The daemon's position is lost with it: resume where its used ring stands (exact
            // for a daemon that completes in order, as virtiofsd does without a thread pool).
            match q.used_idx(mem, Ordering::Acquire) {
                Ok(used) => {
                    q.set_next_avail(used.0);
                    q.set_next_used(used.0);
                }
                Err(e) => warn_rl!("vhost-user: used index unreadable: {e}"),
            }
        }
        for (i, k) in self.live.kicks.iter().enumerate() {
            let token = KICK_BASE + i as u64;
            if let Err(e) = epoll.ctl(
                ControlOperation::Add,
                k.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            ) {
                warn_rl!("vhost-user: watching queue {i}: {e}");
            }
        }
        for i in 0..self.live.queues.len() {
            self.fail_queue(i);
        }
    }

    /// Completes every available request of virtio-fs queue `q` with EIO (a FUSE reply of
    /// just an out header whose error is -EIO), after the daemon is gone.
    fn fail_queue(&mut self, q: usize) {
        if !self.lost.load(Ordering::SeqCst) || !self.fail_fs {
            return;
        }
        let Live {
            mem,
            queues,
            interrupt,
            ..
        } = &mut self.live;
        let Some(queue) = queues.get_mut(q) else {
            return;
        };
        let res = crate::device::drain_queue(queue, mem, interrupt, |chain| {
            fuse_error_reply(mem, chain, -libc::EIO)
        });
        if let Err(e) = res {
            warn_rl!("vhost-user: failing queue {q}: {e}");
        }
    }
}

/// `struct fuse_out_header` (linux/fuse.h): len, error, unique.
const FUSE_OUT_HEADER_LEN: u32 = 16;

/// Writes a FUSE reply of only an out header with `error` into the first writable descriptor
/// of a request (its `unique` copied from the in header); returns the used length.
fn fuse_error_reply(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    error: i32,
) -> u32 {
    let mut unique = None;
    for d in chain {
        if !d.is_write_only() {
            // fuse_in_header: len u32, opcode u32, unique u64, ...
            if unique.is_none() && d.len() >= 16 {
                if let Some(a) = d.addr().checked_add(8) {
                    unique = mem.read_obj::<u64>(a).ok();
                }
            }
            continue;
        }
        if d.len() < FUSE_OUT_HEADER_LEN {
            return 0;
        }
        let mut hdr = [0u8; FUSE_OUT_HEADER_LEN as usize];
        hdr[..4].copy_from_slice(&FUSE_OUT_HEADER_LEN.to_le_bytes());
        hdr[4..8].copy_from_slice(&error.to_le_bytes());
        hdr[8..].copy_from_slice(&unique.unwrap_or(0).to_le_bytes());
        return match mem.write_slice(&hdr, d.addr()) {
            Ok(()) => FUSE_OUT_HEADER_LEN,
            Err(_) => 0,
        };
    }
    // No reply buffer (FORGET on the hiprio queue): nothing to say.
    0
}

#[cfg(test)]
mod tests;
