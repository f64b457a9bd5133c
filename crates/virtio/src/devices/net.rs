//! virtio-net (virtio 1.2 §5.1): receiveq 0, transmitq 1, no control queue, no offloads.
//! Backends: a TAP interface (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, 12-byte header) or a UNIX
//! datagram socket carrying bare Ethernet frames (the device adds / strips the header).
//!
//! The socket backend talks to one peer: the configured `peer`, or else the first sender with
//! a path. Datagrams from anyone else are dropped, and so are datagrams over 64 KiB (seen with
//! `MSG_TRUNC`, never delivered cut short); both are counted ([`NetDevice::counters`]) and
//! logged, rate limited.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{
    check_avail, drain_queue, fail_device, ActivateContext, ActivateError, EventLoop, Interrupt,
    QueueError, VirtioDevice, Worker, STOP_TOKEN,
};
use remio_ratelimit::warn_rl;

/// Queue size we offer.
pub const QUEUE_SIZE: u16 = 256;
/// `struct virtio_net_hdr_v1` (virtio 1.2 §5.1.6): 12 bytes with VERSION_1.
pub const NET_HDR_LEN: usize = 12;
/// Largest frame we move (64 KiB, as TAP may deliver without offloads).
pub const FRAME_MAX: usize = 65536;
/// Largest frame plus header.
const PACKET_MAX: usize = FRAME_MAX + NET_HDR_LEN;

/// Where frames go.
#[derive(Debug)]
pub enum NetBackend {
    /// A TAP interface; reads and writes carry the 12-byte virtio-net header.
    Tap(File),
    /// A UNIX datagram socket; one bare frame per datagram.
    Socket {
        /// The bound socket.
        sock: UnixDatagram,
        /// Where frames go and the only sender frames are taken from: configured, or the
        /// first sender with a path, then fixed.
        peer: Option<PeerAddr>,
        /// Bound path (removed on drop).
        path: PathBuf,
    },
}

/// The socket backend's peer.
#[derive(Debug)]
pub enum PeerAddr {
    /// Configured path.
    Path(PathBuf),
    /// Learnt from the first received datagram whose sender has a path.
    Learnt(SocketAddr),
}

impl PeerAddr {
    /// Whether a datagram from `from` comes from this peer. A configured path matches the
    /// same path or another name of the same socket file (the sender may have bound it by a
    /// relative path).
    fn is(&self, from: &Path) -> bool {
        let same_file = |p: &Path| match (std::fs::metadata(p), std::fs::metadata(from)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        match self {
            Self::Path(p) => p == from || same_file(p),
            Self::Learnt(a) => a.as_pathname() == Some(from),
        }
    }
}

/// Frames a network device dropped, by cause; for tests and diagnostics
/// ([`NetDevice::counters`]).
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Datagrams over [`FRAME_MAX`] received on the socket backend (not delivered).
    pub rx_oversize: AtomicU64,
    /// Datagrams received on the socket backend from another sender than the peer (not
    /// delivered).
    pub rx_foreign: AtomicU64,
    /// Transmit chains over the header plus [`FRAME_MAX`] (not sent).
    pub tx_oversize: AtomicU64,
}

impl NetCounters {
    fn bump(counter: &AtomicU64) -> u64 {
        counter.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// What one receive from the backend gave.
#[derive(Debug, PartialEq, Eq)]
enum Received {
    /// Header + frame, this many bytes, in the buffer.
    Packet(usize),
    /// A datagram was taken and dropped, for this cause (counted and logged).
    Dropped(crate::stats::DropCause),
    /// Nothing to read.
    Nothing,
}

impl NetBackend {
    /// Opens TAP interface `name`.
    pub fn tap(name: &str) -> io::Result<Self> {
        crate::sys::open_tap(name, 12).map(Self::Tap)
    }

    /// Binds a datagram socket at `path`, sending to `peer`. A stale socket at `path` is
    /// replaced; anything else is refused with an error naming the path
    /// ([`SocketPathError`](crate::devices::socket_path::SocketPathError), kind
    /// `AlreadyExists`).
    pub fn socket(path: &Path, peer: Option<&Path>) -> io::Result<Self> {
        crate::devices::socket_path::clear_for_socket(path)?;
        let sock = UnixDatagram::bind(path)?;
        sock.set_nonblocking(true)?;
        Ok(Self::Socket {
            sock,
            peer: peer.map(|p| PeerAddr::Path(p.to_owned())),
            path: path.to_owned(),
        })
    }

    fn fd(&self) -> RawFd {
        match self {
            Self::Tap(f) => f.as_raw_fd(),
            Self::Socket { sock, .. } => sock.as_raw_fd(),
        }
    }

    /// Receives one frame into `buf` (at least [`PACKET_MAX`] bytes) as header + frame.
    fn recv(&mut self, buf: &mut [u8], counters: &NetCounters) -> io::Result<Received> {
        let r = match self {
            Self::Tap(f) => f.read(buf).map(Received::Packet),
            Self::Socket { sock, peer, .. } => {
                let (hdr, frame) = buf.split_at_mut(NET_HDR_LEN);
                hdr.fill(0);
                let room = frame.len().min(FRAME_MAX);
                let frame = &mut frame[..room];
                crate::sys::recv_datagram(sock, frame)
                    .map(|(len, from)| Self::admit(peer, len, from.as_deref(), counters))
            }
        };
        match r {
            Ok(r) => Ok(r),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Received::Nothing),
            Err(e) => Err(e),
        }
    }

    /// Decides on a datagram of real length `len` from `from`: taken (header + frame) only
    /// from the peer, fixing the peer on the first sender with a path if none is configured,
    /// and only if it was not truncated.
    fn admit(
        peer: &mut Option<PeerAddr>,
        len: usize,
        from: Option<&Path>,
        counters: &NetCounters,
    ) -> Received {
        let from_peer = match (peer.as_ref(), from) {
            (Some(p), Some(from)) => p.is(from),
            (None, Some(from)) => match SocketAddr::from_pathname(from) {
                Ok(addr) => {
                    log::info!("virtio-net: peer is {}", from.display());
                    *peer = Some(PeerAddr::Learnt(addr));
                    true
                }
                Err(_) => false,
            },
            (_, None) => false,
        };
        if !from_peer {
            let n = NetCounters::bump(&counters.rx_foreign);
            warn_rl!(
                "virtio-net: datagram from {} dropped: not the peer ({n} so far)",
                from.map_or_else(
                    || "a sender without a path".into(),
                    |p| p.display().to_string()
                )
            );
            return Received::Dropped(crate::stats::DropCause::RxForeign);
        }
        if len > FRAME_MAX {
            let n = NetCounters::bump(&counters.rx_oversize);
            warn_rl!(
                "virtio-net: {len}-byte datagram dropped: frames are at most {FRAME_MAX} bytes \
                 ({n} so far)"
            );
            return Received::Dropped(crate::stats::DropCause::RxOversize);
        }
        Received::Packet(len + NET_HDR_LEN)
    }

    /// Sends header + frame.
    fn send(&mut self, pkt: &[u8]) -> io::Result<()> {
        match self {
            Self::Tap(f) => f.write(pkt).map(drop),
            Self::Socket { sock, peer, .. } => {
                let frame = pkt.get(NET_HDR_LEN..).unwrap_or(&[]);
                match peer {
                    Some(PeerAddr::Path(p)) => sock.send_to(frame, p).map(drop),
                    Some(PeerAddr::Learnt(a)) => sock.send_to_addr(frame, a).map(drop),
                    None => Ok(()),
                }
            }
        }
    }
}

impl Drop for NetBackend {
    fn drop(&mut self) {
        if let Self::Socket { path, .. } = self {
            crate::devices::socket_path::remove_our_socket(path);
        }
    }
}

/// The network device.
#[derive(Debug)]
pub struct NetDevice {
    backend: Option<NetBackend>,
    /// Active: the worker owns the backend and hands it back when stopped.
    worker: Option<Worker<NetBackend>>,
    features: u64,
    /// struct virtio_net_config: mac[6], status (LINK_UP), max_virtqueue_pairs.
    config: [u8; 10],
    counters: Arc<NetCounters>,
}

impl NetDevice {
    /// A network device on `backend` with MAC `mac` (VIRTIO_NET_F_MAC if given).
    pub fn new(backend: NetBackend, mac: Option<[u8; 6]>) -> Self {
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_NET_F_STATUS);
        let mut config = [0u8; 10];
        if let Some(mac) = mac {
            features |= 1 << VIRTIO_NET_F_MAC;
            config[..6].copy_from_slice(&mac);
        }
        config[6..8].copy_from_slice(
            &u16::try_from(VIRTIO_NET_S_LINK_UP)
                .unwrap_or(1)
                .to_le_bytes(),
        );
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        Self {
            backend: Some(backend),
            worker: None,
            features,
            config,
            counters: Arc::default(),
        }
    }

    /// Frames dropped so far, by cause (for tests and diagnostics).
    pub fn counters(&self) -> &NetCounters {
        &self.counters
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }
    fn avail_features(&self) -> u64 {
        self.features
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::device::read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR-era legacy; ignore.
        warn_rl!("virtio-net: config write at {offset:#x} ignored");
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let (mem, [rxq, txq], [rx_evt, tx_evt], interrupt) = ctx.into_queues()?;
        let backend = self.backend.take().ok_or(ActivateError::BackendLost)?;
        let counters = self.counters.clone();
        self.worker = Some(
            Worker::spawn("virtio-net", move |stop| {
                let mut w = NetWorker::new(backend, mem, [rxq, txq], interrupt, counters);
                w.run(&rx_evt, &tx_evt, &stop);
                w.backend
            })
            .map_err(ActivateError::Backend)?,
        );
        Ok(())
    }
    fn reset(&mut self) {
        if let Some(backend) = self.worker.take().and_then(|mut w| w.stop()) {
            self.backend = Some(backend);
        }
    }
}

struct NetWorker {
    backend: NetBackend,
    mem: GuestMemoryMmap,
    rxq: Queue,
    txq: Queue,
    interrupt: Arc<Interrupt>,
    /// A received frame waiting for a receive buffer (`rx_len` bytes, 0 if none).
    rx_buf: Vec<u8>,
    rx_len: usize,
    tx_buf: Vec<u8>,
    counters: Arc<NetCounters>,
}

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const BACKEND_TOKEN: u64 = 2;

impl NetWorker {
    fn new(
        backend: NetBackend,
        mem: GuestMemoryMmap,
        [rxq, txq]: [Queue; 2],
        interrupt: Arc<Interrupt>,
        counters: Arc<NetCounters>,
    ) -> Self {
        Self {
            backend,
            mem,
            rxq,
            txq,
            interrupt,
            rx_buf: vec![0; PACKET_MAX],
            rx_len: 0,
            tx_buf: vec![0; PACKET_MAX],
            counters,
        }
    }

    fn run(&mut self, rx_evt: &EventFd, tx_evt: &EventFd, stop: &EventFd) {
        let mut ev = match EventLoop::new() {
            Ok(ev) => ev,
            Err(e) => return fail_device(&self.interrupt, "virtio-net epoll", &e),
        };
        let fd = self.backend.fd();
        if let Err(e) = ev
            .add(rx_evt, RX_TOKEN)
            .and(ev.add(tx_evt, TX_TOKEN))
            .and(ev.add(stop, STOP_TOKEN))
            .and(ev.add_raw(fd, BACKEND_TOKEN))
        {
            return fail_device(&self.interrupt, "virtio-net epoll", &e);
        }
        let mut backend_on = true;
        let mut tokens = Vec::with_capacity(4);
        loop {
            if let Err(e) = ev.wait(-1, &mut tokens) {
                return fail_device(&self.interrupt, "virtio-net epoll", &e);
            }
            for &t in &tokens {
                let r = match t {
                    STOP_TOKEN => return,
                    TX_TOKEN => {
                        let _ = tx_evt.read();
                        self.transmit()
                    }
                    RX_TOKEN => {
                        let _ = rx_evt.read();
                        self.receive()
                    }
                    _ => self.receive(),
                };
                if let Err(e) = r {
                    return fail_device(&self.interrupt, "virtio-net queue", &e);
                }
            }
            // While a frame waits for a buffer, stop polling the backend.
            let want = self.rx_len == 0;
            if want != backend_on {
                if let Err(e) = ev.set_enabled(fd, BACKEND_TOKEN, want) {
                    warn_rl!("virtio-net: epoll modify: {e}");
                }
                backend_on = want;
            }
        }
    }

    /// Moves frames from the backend into receive buffers while both exist. Each frame
    /// delivered counts as one `read` request of its bytes (without the virtio-net header);
    /// one dropped counts under its [`crate::stats::DropCause`].
    fn receive(&mut self) -> Result<(), QueueError> {
        use crate::stats::{DropCause, RequestKind};
        let mem = &self.mem;
        let stats = self.interrupt.stats();
        let mut used_any = false;
        loop {
            if self.rx_len == 0 {
                match self.backend.recv(&mut self.rx_buf, &self.counters) {
                    Ok(Received::Packet(n)) if n > NET_HDR_LEN => self.rx_len = n,
                    Ok(Received::Packet(_)) => continue,
                    Ok(Received::Dropped(cause)) => {
                        stats.record_drop(cause);
                        continue;
                    }
                    Ok(Received::Nothing) => break,
                    Err(e) => {
                        warn_rl!("virtio-net: backend receive: {e}");
                        break;
                    }
                }
                // num_buffers = 1 (virtio 1.2 §5.1.6.4: without MRG_RXBUF, set to 1).
                self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
            }
            check_avail(&self.rxq, mem)?;
            let next = self.rxq.iter(mem)?.next();
            let Some(chain) = next else {
                if self.rxq.enable_notification(mem)? {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let frame = &self.rx_buf[..self.rx_len];
            let mut off = 0usize;
            let mut ok = true;
            for d in chain {
                if off == frame.len() {
                    break;
                }
                let len = (d.len() as usize).min(frame.len() - off);
                if !d.is_write_only() || !mem.check_range(d.addr(), len, Permissions::Write) {
                    ok = false;
                    break;
                }
                if mem.write_slice(&frame[off..off + len], d.addr()).is_err() {
                    ok = false;
                    break;
                }
                off += len;
            }
            if !ok || off < frame.len() {
                warn_rl!("virtio-net: receive buffer unusable or too small; frame dropped");
                self.rxq.add_used(mem, head, 0)?;
                stats.record_drop(DropCause::RxTruncated);
            } else {
                self.rxq
                    .add_used(mem, head, u32::try_from(off).unwrap_or(0))?;
                stats.record(
                    RequestKind::Read,
                    off.saturating_sub(NET_HDR_LEN) as u64,
                    true,
                );
            }
            used_any = true;
            self.rx_len = 0;
        }
        if used_any && self.rxq.needs_notification(mem)? {
            self.interrupt.signal_used_queue();
        }
        Ok(())
    }

    /// Sends every transmit chain (header + frame) to the backend. Each frame sent counts as
    /// one `write` request of its bytes (without the virtio-net header); one dropped counts
    /// under its [`crate::stats::DropCause`].
    fn transmit(&mut self) -> Result<(), QueueError> {
        use crate::stats::{DropCause, RequestKind};
        let mem = &self.mem;
        let buf = &mut self.tx_buf;
        let backend = &mut self.backend;
        let counters = &self.counters;
        let stats = self.interrupt.stats();
        drain_queue(&mut self.txq, mem, &self.interrupt, |chain| {
            let mut len = 0usize;
            for d in chain {
                let n = d.len() as usize;
                let Some(dst) = buf.get_mut(len..len.saturating_add(n)) else {
                    let k = NetCounters::bump(&counters.tx_oversize);
                    warn_rl!(
                        "virtio-net: transmit chain over {PACKET_MAX} bytes dropped ({k} so far)"
                    );
                    stats.record_drop(DropCause::TxOversize);
                    return 0;
                };
                if d.is_write_only() || mem.read_slice(dst, d.addr()).is_err() {
                    warn_rl!("virtio-net: bad transmit descriptor; frame dropped");
                    stats.record_drop(DropCause::TxMalformed);
                    return 0;
                }
                len += n;
            }
            if len <= NET_HDR_LEN {
                warn_rl!("virtio-net: transmit chain shorter than the header");
                stats.record_drop(DropCause::TxMalformed);
                return 0;
            }
            match backend.send(&buf[..len]) {
                Ok(()) => stats.record(
                    RequestKind::Write,
                    len.saturating_sub(NET_HDR_LEN) as u64,
                    true,
                ),
                Err(e) => {
                    warn_rl!("virtio-net: backend send: {e}");
                    stats.record_drop(DropCause::TxBackend);
                }
            }
            0
        })
    }
}

/// One receive pass (with `frame`, header included, waiting if longer than the header) and
/// one transmit pass over guest-controlled queues, on `backend`, which is handed back (the
/// `fuzz` entry point).
pub(crate) fn fuzz_passes(
    backend: NetBackend,
    mem: GuestMemoryMmap,
    [rxq, txq]: [Queue; 2],
    interrupt: Arc<Interrupt>,
    frame: &[u8],
) -> (NetBackend, Result<(), QueueError>) {
    let mut w = NetWorker::new(backend, mem, [rxq, txq], interrupt, Arc::default());
    let n = frame.len().min(PACKET_MAX);
    w.rx_buf[..n].copy_from_slice(&frame[..n]);
    w.rx_len = if n > NET_HDR_LEN { n } else { 0 };
    let r = w.receive().and_then(|()| w.transmit());
    (w.backend, r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{DropCause, RequestKind};
    use std::sync::Arc;
    use std::time::Duration;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};

    #[test]
    fn socket_backend_carries_frames_both_ways() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let dev_path = dir.as_path().join("dev.sock");
        let peer_path = dir.as_path().join("peer.sock");
        let peer = UnixDatagram::bind(&peer_path).unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let backend = NetBackend::socket(&dev_path, Some(&peer_path)).unwrap();
        let mut dev = NetDevice::new(backend, Some([2, 0, 0, 0, 0, 1]));
        let mut mac = [0u8; 6];
        dev.read_config(0, &mut mac);
        assert_eq!(mac, [2, 0, 0, 0, 0, 1]);

        let rxvq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let txvq = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
        let w = u16::try_from(VRING_DESC_F_WRITE).unwrap();
        rxvq.add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(0x8_0000, 2048, w, 0))],
            0,
        )
        .unwrap();
        let mut pkt = vec![0u8; NET_HDR_LEN];
        pkt.extend_from_slice(b"outgoing-frame");
        mem.write_slice(&pkt, GuestAddress(0x9_0000)).unwrap();
        txvq.add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(
                0x9_0000,
                u32::try_from(pkt.len()).unwrap(),
                0,
                0,
            ))],
            0,
        )
        .unwrap();
        let evts: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let irq = EventFd::new(0).unwrap();
        dev.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![rxvq.create_queue().unwrap(), txvq.create_queue().unwrap()],
            queue_evts: evts.iter().map(|e| e.try_clone().unwrap()).collect(),
            interrupt: Arc::new(Interrupt::new(Default::default(), irq.try_clone().unwrap())),
            acked_features: 0,
        })
        .unwrap();

        // Guest -> peer: the header is stripped.
        evts[1].write(1).unwrap();
        let mut got = [0u8; 64];
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(&got[..n], b"outgoing-frame");

        // Peer -> guest: a header with num_buffers = 1 is prepended.
        peer.send_to(b"incoming-frame", &dev_path).unwrap();
        for _ in 0..5000 {
            if rxvq.used().idx().load() == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut buf = [0u8; NET_HDR_LEN + 14];
        mem.read_slice(&mut buf, GuestAddress(0x8_0000)).unwrap();
        assert_eq!(buf[10..12], [1, 0]);
        assert_eq!(&buf[NET_HDR_LEN..], b"incoming-frame");
        assert_eq!(rxvq.used().idx().load(), 1);

        dev.reset();
    }

    /// A worker driven by hand (no thread): every receive buffer is `rx_len` bytes long.
    struct Rig {
        mem: GuestMemoryMmap,
        worker: NetWorker,
        counters: Arc<NetCounters>,
    }

    const RX_BUF_BASE: u64 = 0x10_0000;
    const TX_BUF: u64 = 0x40_0000;

    impl Rig {
        fn new(backend: NetBackend, rx_bufs: u16, rx_len: u32) -> Self {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x80_0000)]).unwrap();
            let rxvq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
            let txvq = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
            let w = u16::try_from(VRING_DESC_F_WRITE).unwrap();
            let descs: Vec<RawDescriptor> = (0..rx_bufs)
                .map(|i| {
                    let addr = RX_BUF_BASE + u64::from(i) * u64::from(rx_len);
                    RawDescriptor::from(Descriptor::new(addr, rx_len, w, 0))
                })
                .collect();
            rxvq.add_desc_chains(&descs, 0).unwrap();
            let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let counters = Arc::new(NetCounters::default());
            let worker = NetWorker::new(
                backend,
                mem.clone(),
                [rxvq.create_queue().unwrap(), txvq.create_queue().unwrap()],
                Arc::new(Interrupt::new(Default::default(), irq)),
                counters.clone(),
            );
            Self {
                mem,
                worker,
                counters,
            }
        }

        /// The device's counters (what `remio stats` shows).
        fn stats(&self) -> crate::stats::DeviceStatsSnapshot {
            self.worker.interrupt.stats().snapshot()
        }

        /// What the guest got: each used receive buffer's bytes, in order.
        fn received(&self) -> Vec<Vec<u8>> {
            let used_idx = self
                .worker
                .rxq
                .used_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
                .unwrap()
                .0;
            (0..used_idx)
                .map(|i| {
                    let elem: virtio_queue::desc::split::VirtqUsedElem = self
                        .mem
                        .read_obj(
                            GuestAddress(self.worker.rxq.used_ring())
                                .unchecked_add(4 + 8 * u64::from(i % 16)),
                        )
                        .unwrap();
                    let mut bytes = vec![0u8; elem.len() as usize];
                    let addr = self.worker.rxq.desc_table() + 16 * u64::from(elem.id());
                    let desc: RawDescriptor = self.mem.read_obj(GuestAddress(addr)).unwrap();
                    let desc = Descriptor::from(desc);
                    self.mem.read_slice(&mut bytes, desc.addr()).unwrap();
                    bytes
                })
                .collect()
        }
    }

    fn packet(frame: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; NET_HDR_LEN];
        p[10] = 1; // num_buffers
        p.extend_from_slice(frame);
        p
    }

    fn bound(dir: &Path, name: &str) -> (UnixDatagram, PathBuf) {
        let path = dir.join(name);
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_nonblocking(true).unwrap();
        (sock, path)
    }

    #[test]
    fn a_datagram_over_64k_is_dropped_and_counted_and_the_next_frame_arrives_intact() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let (peer, peer_path) = bound(dir.as_path(), "peer.sock");
        let dev_path = dir.as_path().join("dev.sock");
        let backend = NetBackend::socket(&dev_path, Some(&peer_path)).unwrap();
        // Receive buffers large enough for a cut-short 64 KiB frame, so a truncated delivery
        // would show.
        let mut rig = Rig::new(backend, 2, 0x2_0000);
        peer.send_to(&vec![0xaa; FRAME_MAX + 4000], &dev_path)
            .unwrap();
        peer.send_to(b"small-frame", &dev_path).unwrap();

        rig.worker.receive().unwrap();

        assert_eq!(rig.received(), vec![packet(b"small-frame")]);
        assert_eq!(rig.counters.rx_oversize.load(Ordering::Relaxed), 1);
        assert_eq!(rig.counters.rx_foreign.load(Ordering::Relaxed), 0);
        let st = rig.stats();
        assert_eq!(st.drops_of(DropCause::RxOversize), 1);
        assert_eq!(st.drops_of(DropCause::RxForeign), 0);
        assert_eq!(
            (
                st.requests_of(RequestKind::Read),
                st.bytes_of(RequestKind::Read)
            ),
            (1, 11),
            "one frame delivered, its bytes without the header"
        );
    }

    #[test]
    fn a_frame_of_exactly_64k_is_delivered_whole() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let (peer, peer_path) = bound(dir.as_path(), "peer.sock");
        let dev_path = dir.as_path().join("dev.sock");
        let backend = NetBackend::socket(&dev_path, Some(&peer_path)).unwrap();
        let mut rig = Rig::new(backend, 1, 0x2_0000);
        let frame: Vec<u8> = (0..FRAME_MAX)
            .map(|i| u8::try_from(i % 253).unwrap())
            .collect();
        peer.send_to(&frame, &dev_path).unwrap();

        rig.worker.receive().unwrap();

        assert!(rig.received() == vec![packet(&frame)]);
        assert_eq!(rig.counters.rx_oversize.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_first_sender_becomes_the_peer_and_other_senders_are_dropped_and_counted() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let (a, _) = bound(dir.as_path(), "a.sock");
        let (b, _) = bound(dir.as_path(), "b.sock");
        let unbound = UnixDatagram::unbound().unwrap();
        let dev_path = dir.as_path().join("dev.sock");
        let backend = NetBackend::socket(&dev_path, None).unwrap();
        let mut rig = Rig::new(backend, 4, 2048);
        a.send_to(b"from-a-1", &dev_path).unwrap();
        b.send_to(b"from-b", &dev_path).unwrap();
        unbound.send_to(b"from-nobody", &dev_path).unwrap();
        a.send_to(b"from-a-2", &dev_path).unwrap();

        rig.worker.receive().unwrap();

        assert_eq!(
            rig.received(),
            vec![packet(b"from-a-1"), packet(b"from-a-2")]
        );
        assert_eq!(rig.counters.rx_foreign.load(Ordering::Relaxed), 2);
        assert_eq!(rig.stats().drops_of(DropCause::RxForeign), 2);
        assert_eq!(rig.stats().requests_of(RequestKind::Read), 2);
        assert_eq!(rig.stats().bytes_of(RequestKind::Read), 16);
        // And the guest's frames go to the peer only.
        let mut pkt = vec![0u8; NET_HDR_LEN];
        pkt.extend_from_slice(b"to-the-peer");
        send_from_guest(&mut rig, &pkt);
        let mut got = [0u8; 64];
        let n = a.recv(&mut got).unwrap();
        assert_eq!(&got[..n], b"to-the-peer");
        assert_eq!(
            b.recv(&mut got).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let st = rig.stats();
        assert_eq!(
            (
                st.requests_of(RequestKind::Write),
                st.bytes_of(RequestKind::Write)
            ),
            (1, 11)
        );
    }

    #[test]
    fn with_a_configured_peer_only_its_datagrams_are_taken() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let (other, _) = bound(dir.as_path(), "other.sock");
        let (peer, peer_path) = bound(dir.as_path(), "peer.sock");
        let dev_path = dir.as_path().join("dev.sock");
        // The peer named through a symbolic link: the same socket by another name.
        let alias = dir.as_path().join("peer-alias");
        std::os::unix::fs::symlink(&peer_path, &alias).unwrap();
        let backend = NetBackend::socket(&dev_path, Some(&alias)).unwrap();
        let mut rig = Rig::new(backend, 4, 2048);
        other.send_to(b"intruder", &dev_path).unwrap();
        peer.send_to(b"peer-frame", &dev_path).unwrap();

        rig.worker.receive().unwrap();

        assert_eq!(rig.received(), vec![packet(b"peer-frame")]);
        assert_eq!(rig.counters.rx_foreign.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_frame_larger_than_the_receive_buffer_is_returned_empty_and_the_next_one_arrives() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let (peer, peer_path) = bound(dir.as_path(), "peer.sock");
        let dev_path = dir.as_path().join("dev.sock");
        let backend = NetBackend::socket(&dev_path, Some(&peer_path)).unwrap();
        let mut rig = Rig::new(backend, 2, 1024);
        peer.send_to(&[0x55; 3000], &dev_path).unwrap();
        peer.send_to(b"fits", &dev_path).unwrap();

        rig.worker.receive().unwrap();

        // Used length 0 tells the guest's driver the buffer holds no frame (it drops it).
        assert_eq!(rig.received(), vec![Vec::new(), packet(b"fits")]);
        let st = rig.stats();
        assert_eq!(st.drops_of(DropCause::RxTruncated), 1);
        assert_eq!(
            (
                st.requests_of(RequestKind::Read),
                st.bytes_of(RequestKind::Read)
            ),
            (1, 4)
        );
    }

    /// Puts `pkt` (header + frame) on the transmit queue as one descriptor and runs a
    /// transmit pass; the used length the guest got back.
    fn send_from_guest(rig: &mut Rig, pkt: &[u8]) -> u32 {
        rig.mem.write_slice(pkt, GuestAddress(TX_BUF)).unwrap();
        let txq = &rig.worker.txq;
        let table = GuestAddress(txq.desc_table());
        let avail = GuestAddress(txq.avail_ring());
        let next: u16 = rig.mem.read_obj(avail.unchecked_add(2)).unwrap();
        let slot = next % 16;
        rig.mem
            .write_obj(
                RawDescriptor::from(Descriptor::new(
                    TX_BUF,
                    u32::try_from(pkt.len()).unwrap(),
                    0,
                    0,
                )),
                table.unchecked_add(16 * u64::from(slot)),
            )
            .unwrap();
        rig.mem
            .write_obj(slot, avail.unchecked_add(4 + 2 * u64::from(slot)))
            .unwrap();
        rig.mem
            .write_obj(next.wrapping_add(1), avail.unchecked_add(2))
            .unwrap();
        rig.worker.transmit().unwrap();
        let used = GuestAddress(rig.worker.txq.used_ring());
        let elem: virtio_queue::desc::split::VirtqUsedElem = rig
            .mem
            .read_obj(used.unchecked_add(4 + 8 * u64::from(slot)))
            .unwrap();
        elem.len()
    }

    #[test]
    fn a_transmit_chain_over_64k_is_not_sent_and_is_counted_and_the_next_one_is() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let (peer, peer_path) = bound(dir.as_path(), "peer.sock");
        let dev_path = dir.as_path().join("dev.sock");
        let backend = NetBackend::socket(&dev_path, Some(&peer_path)).unwrap();
        let mut rig = Rig::new(backend, 1, 2048);
        let mut big = vec![0u8; NET_HDR_LEN];
        big.resize(NET_HDR_LEN + FRAME_MAX + 1, 0x77);

        let used_len = send_from_guest(&mut rig, &big);

        assert_eq!(used_len, 0, "a transmit buffer is returned with length 0");
        assert_eq!(rig.counters.tx_oversize.load(Ordering::Relaxed), 1);
        let mut got = vec![0u8; 2 * FRAME_MAX];
        assert_eq!(
            peer.recv(&mut got).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "nothing of the oversize chain reached the peer"
        );
        let mut ok = vec![0u8; NET_HDR_LEN];
        ok.extend_from_slice(b"next");
        send_from_guest(&mut rig, &ok);
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(&got[..n], b"next");
        let st = rig.stats();
        assert_eq!(st.drops_of(DropCause::TxOversize), 1);
        assert_eq!(
            (
                st.requests_of(RequestKind::Write),
                st.bytes_of(RequestKind::Write)
            ),
            (1, 4)
        );
    }

    #[test]
    fn frames_the_backend_refuses_and_chains_without_a_frame_are_counted_as_drops() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let (peer, peer_path) = bound(dir.as_path(), "peer.sock");
        let dev_path = dir.as_path().join("dev.sock");
        let backend = NetBackend::socket(&dev_path, Some(&peer_path)).unwrap();
        let mut rig = Rig::new(backend, 1, 2048);
        let header_only = vec![0u8; NET_HDR_LEN];
        send_from_guest(&mut rig, &header_only);
        // The peer goes away: the next frame cannot be sent.
        drop(peer);
        std::fs::remove_file(&peer_path).unwrap();
        let mut pkt = vec![0u8; NET_HDR_LEN];
        pkt.extend_from_slice(b"into-the-void");

        send_from_guest(&mut rig, &pkt);

        let st = rig.stats();
        assert_eq!(st.drops_of(DropCause::TxMalformed), 1);
        assert_eq!(st.drops_of(DropCause::TxBackend), 1);
        assert_eq!(st.requests_of(RequestKind::Write), 0, "nothing was sent");
    }

    #[test]
    fn a_socket_backend_over_a_regular_file_is_refused_and_the_file_survives() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("net.sock");
        std::fs::write(&path, b"not a socket").unwrap();

        let err = NetBackend::socket(&path, None).unwrap_err();

        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("is a regular file, not a socket"), "{msg}");
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    }

    /// Whether this process may create a TAP interface: CAP_NET_ADMIN (root here) and
    /// /dev/net/tun.
    fn can_create_tap() -> bool {
        let admin = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .is_some_and(|caps| caps & (1 << 12) != 0) // CAP_NET_ADMIN
        });
        admin && Path::new("/dev/net/tun").exists()
    }

    #[test]
    fn tap_backend_opens_when_root_is_available() {
        // Unique per process: engineers and CI run this suite concurrently.
        let name = format!("remiot{}", std::process::id() % 100_000);

        let opened = NetBackend::tap(&name);

        if !can_create_tap() {
            let e = opened.expect_err("a TAP opened without CAP_NET_ADMIN or /dev/net/tun");
            assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::PermissionDenied | io::ErrorKind::NotFound
                ),
                "without CAP_NET_ADMIN: {e}"
            );
            eprintln!("\n*** tap_backend_opens_when_root_is_available: no CAP_NET_ADMIN, checked the refusal only ***\n");
            return;
        }
        let Ok(NetBackend::Tap(file)) = &opened else {
            panic!("with CAP_NET_ADMIN and /dev/net/tun, TAP {name}: {opened:?}");
        };
        let (ifname, flags, hdr) = crate::sys::tap_info(file).unwrap();
        assert_eq!(ifname, name);
        assert_eq!(
            flags & (libc::IFF_TAP | libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR),
            libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR
        );
        assert_eq!(hdr, i32::try_from(NET_HDR_LEN).unwrap());
    }
}
