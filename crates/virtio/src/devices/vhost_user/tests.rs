//! The vhost-user device against a daemon double built on `vhost`'s backend side: a real
//! vhost-user peer on a real UNIX socket that records every message it receives, keeps the
//! kick and call eventfds it is given, and can hang up like a daemon that dies.

use super::*;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::thread::JoinHandle;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserInflight, VhostUserLog,
    VhostUserMemoryRegion, VhostUserShMemConfig, VhostUserSharedMsg, VhostUserSingleMemoryRegion,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{BackendReqHandler, GpuBackend, Listener, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;

use crate::device::SharedStatus;

type VuResult<T> = vhost::vhost_user::Result<T>;

/// One message as the daemon saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Msg {
    GetFeatures,
    SetFeatures(u64),
    GetProtocolFeatures,
    SetProtocolFeatures(u64),
    GetQueueNum,
    SetOwner,
    /// (guest_phys_addr, memory_size, user_addr, mmap_offset) per region.
    SetMemTable(Vec<(u64, u64, u64, u64)>),
    SetVringNum(u32, u32),
    SetVringBase(u32, u32),
    /// (index, desc, used, avail) user addresses.
    SetVringAddr(u32, u64, u64, u64),
    SetVringCall(u8),
    SetVringKick(u8),
    SetVringEnable(u32, bool),
    GetVringBase(u32),
    GetConfig(u32, u32),
    SetConfig(u32, Vec<u8>),
}

/// What the double shares with the test.
#[derive(Default)]
struct Seen {
    msgs: Vec<Msg>,
    kicks: Vec<Option<File>>,
    calls: Vec<Option<File>>,
    mem: Vec<File>,
}

struct Double {
    features: u64,
    protocol: VhostUserProtocolFeatures,
    queue_num: u64,
    config: Vec<u8>,
    seen: Arc<Mutex<Seen>>,
}

impl Double {
    fn log(&self, m: Msg) {
        self.seen.lock().unwrap().msgs.push(m);
    }
}

fn unsupported<T>() -> VuResult<T> {
    Err(vhost::vhost_user::Error::InvalidOperation(
        "not in the double",
    ))
}

impl VhostUserBackendReqHandlerMut for Double {
    fn set_owner(&mut self) -> VuResult<()> {
        self.log(Msg::SetOwner);
        Ok(())
    }
    fn reset_owner(&mut self) -> VuResult<()> {
        unsupported()
    }
    fn reset_device(&mut self) -> VuResult<()> {
        unsupported()
    }
    fn get_features(&mut self) -> VuResult<u64> {
        self.log(Msg::GetFeatures);
        Ok(self.features)
    }
    fn set_features(&mut self, features: u64) -> VuResult<()> {
        self.log(Msg::SetFeatures(features));
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let regions = ctx
            .iter()
            .map(|r| (r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset))
            .collect();
        self.log(Msg::SetMemTable(regions));
        self.seen.lock().unwrap().mem = files;
        Ok(None)
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        self.log(Msg::SetVringNum(index, num));
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        self.log(Msg::SetVringAddr(index, descriptor, used, available));
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.log(Msg::SetVringBase(index, base));
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.log(Msg::GetVringBase(index));
        Ok(VhostUserVringState::new(index, 0))
    }
    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.log(Msg::SetVringKick(index));
        let mut seen = self.seen.lock().unwrap();
        let i = usize::from(index);
        if seen.kicks.len() <= i {
            seen.kicks.resize_with(i + 1, || None);
        }
        seen.kicks[i] = fd;
        Ok(())
    }
    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.log(Msg::SetVringCall(index));
        let mut seen = self.seen.lock().unwrap();
        let i = usize::from(index);
        if seen.calls.len() <= i {
            seen.calls.resize_with(i + 1, || None);
        }
        seen.calls[i] = fd;
        Ok(())
    }
    fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> VuResult<()> {
        unsupported()
    }
    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        self.log(Msg::GetProtocolFeatures);
        Ok(self.protocol)
    }
    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.log(Msg::SetProtocolFeatures(features));
        Ok(())
    }
    fn get_queue_num(&mut self) -> VuResult<u64> {
        self.log(Msg::GetQueueNum);
        Ok(self.queue_num)
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.log(Msg::SetVringEnable(index, enable));
        Ok(())
    }
    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        self.log(Msg::GetConfig(offset, size));
        let mut out = vec![0u8; size as usize];
        read_config_bytes(&self.config, u64::from(offset), &mut out);
        Ok(out)
    }
    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        self.log(Msg::SetConfig(offset, buf.to_vec()));
        let start = offset as usize;
        if let Some(dst) = self.config.get_mut(start..start + buf.len()) {
            dst.copy_from_slice(buf);
        }
        Ok(())
    }
    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        unsupported()
    }
    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        unsupported()
    }
    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        unsupported()
    }
    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VuResult<()> {
        unsupported()
    }
    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        unsupported()
    }
    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        unsupported()
    }
    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        unsupported()
    }
    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        unsupported()
    }
    fn check_device_state(&mut self) -> VuResult<()> {
        unsupported()
    }
    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        unsupported()
    }
    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        unsupported()
    }
}

const PROTOCOL_FEATURES: u64 = 1 << 30;
const BASE: u64 = 0x4000_0000;
const MEM_LEN: u64 = 0x10_0000;

/// A daemon double listening on its own socket, serving one connection at a time.
struct Daemon {
    dir: PathBuf,
    socket: PathBuf,
    seen: Arc<Mutex<Seen>>,
    /// A clone of the connected stream, to hang up like a daemon that dies.
    conn: Arc<Mutex<Option<UnixStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl Daemon {
    fn start(name: &str, features: u64, protocol: VhostUserProtocolFeatures, queues: u64) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "remio-vu-{}-{name}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("daemon.sock");
        let mut d = Self {
            dir,
            socket,
            seen: Arc::default(),
            conn: Arc::default(),
            thread: None,
        };
        d.serve(features, protocol, queues);
        d
    }

    /// Listens (again) and serves the next connection in a thread.
    fn serve(&mut self, features: u64, protocol: VhostUserProtocolFeatures, queues: u64) {
        let listener = Listener::new(&self.socket, true).unwrap();
        let seen = self.seen.clone();
        let conn = self.conn.clone();
        self.thread = Some(std::thread::spawn(move || {
            let stream = loop {
                if let Some(s) = listener.accept().unwrap() {
                    break s;
                }
            };
            *conn.lock().unwrap() = Some(stream.try_clone().unwrap());
            let double = Double {
                features,
                protocol,
                queue_num: queues,
                config: (0u8..16).collect(),
                seen,
            };
            let mut handler = BackendReqHandler::from_stream(stream, Arc::new(Mutex::new(double)));
            while handler.handle_request().is_ok() {}
        }));
    }

    fn msgs(&self) -> Vec<Msg> {
        self.seen.lock().unwrap().msgs.clone()
    }

    fn clear(&self) {
        self.seen.lock().unwrap().msgs.clear();
    }

    /// Hangs up, as a daemon that dies does, and waits for its thread.
    fn die(&mut self) {
        if let Some(s) = self.conn.lock().unwrap().take() {
            s.shutdown(std::net::Shutdown::Both).unwrap();
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(s) = self.conn.lock().unwrap().take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn all_protocol() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

fn fs_features() -> u64 {
    (1 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | PROTOCOL_FEATURES
        | VhostUserVirtioFeatures::LOG_ALL.bits()
}

/// Guest memory backed by an (unlinked) file, as every session maps the shared memory.
fn file_mem() -> GuestMemoryMmap {
    let path = std::env::temp_dir().join(format!(
        "remio-vu-mem-{}-{:?}",
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
    f.set_len(MEM_LEN).unwrap();
    remio_api::map_file(f, 0, MEM_LEN, BASE).unwrap()
}

/// Two 16-entry queues, 64 KiB apart at the start of `mem`: the queues of the two-queue
/// devices these tests activate.
fn two_queues(mem: &GuestMemoryMmap) -> [MockSplitQueue<'_, GuestMemoryMmap>; 2] {
    [
        MockSplitQueue::create(mem, GuestAddress(BASE), 16),
        MockSplitQueue::create(mem, GuestAddress(BASE + 0x1_0000), 16),
    ]
}

/// An activation context over `vqs` (one per queue), with the features the driver acked.
struct Ctx {
    shared: SharedStatus,
    irqfd: EventFd,
    kicks: Vec<EventFd>,
}

fn context(
    mem: &GuestMemoryMmap,
    vqs: &[MockSplitQueue<'_, GuestMemoryMmap>],
    acked: u64,
) -> (ActivateContext, Ctx) {
    let shared = SharedStatus::default();
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(Interrupt::new(shared.clone(), irqfd.try_clone().unwrap()));
    let kicks: Vec<EventFd> = vqs
        .iter()
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let ctx = ActivateContext {
        mem: mem.clone(),
        queues: vqs.iter().map(|v| v.create_queue().unwrap()).collect(),
        queue_evts: kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
        interrupt,
        acked_features: acked,
    };
    (
        ctx,
        Ctx {
            shared,
            irqfd,
            kicks,
        },
    )
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..5000 {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("timed out waiting for {what}");
}

fn host(mem: &GuestMemoryMmap, a: GuestAddress) -> u64 {
    mem.get_host_address(a).unwrap() as u64
}

#[test]
fn connect_negotiates_features_protocol_and_queue_count_then_sets_owner() {
    let daemon = Daemon::start("negotiate", fs_features(), all_protocol(), 2);
    let spec = VhostUserSpec::fs(daemon.socket.clone(), "share", 1, 128).unwrap();

    let dev = VhostUserDevice::connect(spec).unwrap();

    let wanted = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG;
    assert_eq!(
        daemon.msgs(),
        vec![
            Msg::GetFeatures,
            Msg::GetProtocolFeatures,
            Msg::SetProtocolFeatures(wanted.bits()),
            Msg::GetQueueNum,
            Msg::SetOwner,
        ]
    );
    assert_eq!(dev.protocol_features(), wanted);
    // vhost-user's own bits (LOG_ALL, PROTOCOL_FEATURES) are not offered to the guest.
    assert_eq!(
        dev.avail_features(),
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    );
    assert_eq!(dev.device_type(), VIRTIO_ID_FS);
    assert_eq!(dev.queue_max_sizes(), &[128, 128]);
}

#[test]
fn activation_sends_mem_table_and_rings_in_order_with_the_transport_kick_eventfds() {
    let mut daemon = Daemon::start("activate", fs_features(), all_protocol(), 2);
    let spec = VhostUserSpec::fs(daemon.socket.clone(), "share", 1, 16).unwrap();
    let mut dev = VhostUserDevice::connect(spec).unwrap();
    daemon.clear();
    let mem = file_mem();
    let vqs = two_queues(&mem);
    let acked = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX);
    let (ctx, probe) = context(&mem, &vqs, acked);

    dev.activate(ctx).unwrap();

    let mut want = vec![
        Msg::SetFeatures(acked | PROTOCOL_FEATURES),
        Msg::SetMemTable(vec![(BASE, MEM_LEN, host(&mem, GuestAddress(BASE)), 0)]),
    ];
    for (n, vq) in (0u8..).zip(vqs.iter()) {
        let i = u32::from(n);
        want.extend([
            Msg::SetVringNum(i, 16),
            Msg::SetVringBase(i, 0),
            Msg::SetVringAddr(
                i,
                host(&mem, vq.desc_table_addr()),
                host(&mem, vq.used_addr()),
                host(&mem, vq.avail_addr()),
            ),
            Msg::SetVringCall(n),
            Msg::SetVringKick(n),
        ]);
    }
    want.extend([Msg::SetVringEnable(0, true), Msg::SetVringEnable(1, true)]);
    assert_eq!(daemon.msgs(), want);

    // The kick the daemon got is the transport's queue eventfd itself.
    probe.kicks[1].write(3).unwrap();
    let mut kick = daemon.seen.lock().unwrap().kicks[1].take().unwrap();
    let mut buf = [0u8; 8];
    kick.read_exact(&mut buf).unwrap();
    assert_eq!(u64::from_ne_bytes(buf), 3);
    // The memory the daemon got is the shared memory: what it writes, the guest sees.
    let memfile = daemon.seen.lock().unwrap().mem.pop().unwrap();
    std::os::unix::fs::FileExt::write_at(&memfile, b"daemon", 0x800).unwrap();
    let mut seen = [0u8; 6];
    mem.read_slice(&mut seen, GuestAddress(BASE + 0x800))
        .unwrap();
    assert_eq!(&seen, b"daemon");
    daemon.die();
}

#[test]
fn a_daemon_call_sets_interrupt_status_bit_0_before_signalling_the_irqfd() {
    let daemon = Daemon::start("call", fs_features(), all_protocol(), 2);
    let spec = VhostUserSpec::fs(daemon.socket.clone(), "share", 1, 16).unwrap();
    let mut dev = VhostUserDevice::connect(spec).unwrap();
    let mem = file_mem();
    let vqs = two_queues(&mem);
    let (ctx, probe) = context(&mem, &vqs, 1 << VIRTIO_F_VERSION_1);
    dev.activate(ctx).unwrap();
    assert_eq!(probe.shared.interrupt_status.load(Ordering::SeqCst), 0);

    let mut call = daemon.seen.lock().unwrap().calls[1].take().unwrap();
    call.write_all(&1u64.to_ne_bytes()).unwrap();

    wait_for("the irqfd", || probe.irqfd.read().is_ok());
    assert_eq!(
        probe.shared.interrupt_status.load(Ordering::SeqCst),
        VIRTIO_MMIO_INT_VRING
    );
    assert!(!probe.shared.needs_reset.load(Ordering::SeqCst));
}

#[test]
fn reset_stops_every_ring_and_a_new_activation_sets_them_up_again() {
    let daemon = Daemon::start("reset", fs_features(), all_protocol(), 2);
    let spec = VhostUserSpec::fs(daemon.socket.clone(), "share", 1, 16).unwrap();
    let mut dev = VhostUserDevice::connect(spec).unwrap();
    let mem = file_mem();
    let vqs = two_queues(&mem);
    let (ctx, _probe) = context(&mem, &vqs, 1 << VIRTIO_F_VERSION_1);
    dev.activate(ctx).unwrap();
    daemon.clear();

    dev.reset();

    assert_eq!(
        daemon.msgs(),
        vec![
            Msg::SetVringEnable(0, false),
            Msg::GetVringBase(0),
            Msg::SetVringEnable(1, false),
            Msg::GetVringBase(1),
        ]
    );
    daemon.clear();
    let (ctx, _probe) = context(&mem, &vqs, 1 << VIRTIO_F_VERSION_1);
    dev.activate(ctx).unwrap();
    let msgs = daemon.msgs();
    assert_eq!(
        msgs.first(),
        Some(&Msg::SetFeatures(
            (1 << VIRTIO_F_VERSION_1) | PROTOCOL_FEATURES
        ))
    );
    assert_eq!(msgs.last(), Some(&Msg::SetVringEnable(1, true)));
    assert_eq!(
        msgs.iter()
            .filter(|m| matches!(m, Msg::SetVringKick(_)))
            .count(),
        2
    );
}

#[test]
fn config_space_is_forwarded_when_the_daemon_serves_one_and_local_for_fs() {
    let daemon = Daemon::start("config", fs_features(), all_protocol(), 3);
    let spec = VhostUserSpec::vsock(daemon.socket.clone(), 3, 16);
    let mut vsock = VhostUserDevice::connect(spec).unwrap();
    daemon.clear();

    let mut out = [0u8; 4];
    vsock.read_config(2, &mut out);
    vsock.write_config(4, &[0xaa, 0xbb]);

    assert_eq!(out, [2, 3, 4, 5], "the daemon's bytes");
    assert_eq!(
        daemon.msgs(),
        vec![Msg::GetConfig(2, 4), Msg::SetConfig(4, vec![0xaa, 0xbb])]
    );
    drop(vsock);

    let fs_daemon = Daemon::start("config-fs", fs_features(), all_protocol(), 2);
    let spec = VhostUserSpec::fs(fs_daemon.socket.clone(), "hostshare", 1, 16).unwrap();
    let fs = VhostUserDevice::connect(spec).unwrap();
    fs_daemon.clear();
    let mut tag = [0u8; FS_TAG_LEN + 4];
    fs.read_config(0, &mut tag);
    assert_eq!(&tag[..9], b"hostshare");
    assert_eq!(tag[FS_TAG_LEN..], 1u32.to_le_bytes());
    assert!(
        fs_daemon.msgs().is_empty(),
        "fs config never asks the daemon"
    );
}

#[test]
fn vsock_without_daemon_config_reads_the_configured_guest_cid() {
    let daemon = Daemon::start("cid", fs_features(), VhostUserProtocolFeatures::MQ, 3);
    let spec = VhostUserSpec::vsock(daemon.socket.clone(), 42, 16);
    let vsock = VhostUserDevice::connect(spec).unwrap();

    let mut cid = [0u8; 8];
    vsock.read_config(0, &mut cid);

    assert_eq!(u64::from_le_bytes(cid), 42);
}

#[test]
fn bad_sockets_and_short_daemons_are_errors_naming_the_socket() {
    let missing = PathBuf::from("/nonexistent/remio-vu.sock");
    let err = VhostUserDevice::connect(VhostUserSpec::vsock(missing, 3, 16)).unwrap_err();
    assert!(matches!(err, VhostUserError::SocketPath { .. }));
    assert!(err.to_string().contains("/nonexistent/remio-vu.sock"));

    let file = std::env::temp_dir().join(format!("remio-vu-notsock-{}", std::process::id()));
    std::fs::write(&file, b"x").unwrap();
    let err = VhostUserDevice::connect(VhostUserSpec::vsock(file.clone(), 3, 16)).unwrap_err();
    std::fs::remove_file(&file).unwrap();
    assert!(matches!(err, VhostUserError::NotASocket(_)), "{err}");

    let daemon = Daemon::start("short", fs_features(), all_protocol(), 2);
    let err =
        VhostUserDevice::connect(VhostUserSpec::vsock(daemon.socket.clone(), 3, 16)).unwrap_err();
    assert!(
        matches!(
            err,
            VhostUserError::Queues {
                offered: 2,
                wanted: 3,
                ..
            }
        ),
        "{err}"
    );

    let legacy = Daemon::start("legacy", PROTOCOL_FEATURES, all_protocol(), 2);
    let spec = VhostUserSpec::fs(legacy.socket.clone(), "t", 1, 16).unwrap();
    let err = VhostUserDevice::connect(spec).unwrap_err();
    assert!(matches!(err, VhostUserError::NotModern { .. }), "{err}");
}

#[test]
fn a_daemon_that_hangs_up_during_negotiation_is_an_error_not_a_hang() {
    let dir = std::env::temp_dir().join(format!("remio-vu-hup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("d.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        // Read the GET_FEATURES header, then die without answering.
        let mut hdr = [0u8; 12];
        let _ = s.read_exact(&mut hdr);
    });

    let err = VhostUserDevice::connect(VhostUserSpec::vsock(path, 3, 16)).unwrap_err();

    t.join().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        matches!(
            err,
            VhostUserError::Protocol {
                step: "GET_FEATURES",
                ..
            }
        ),
        "{err}"
    );
}

/// Lays a FUSE request at descriptor `head`: a 40-byte in header with `unique`, then a
/// writable 64-byte reply buffer.
fn fuse_request(
    vq: &MockSplitQueue<'_, GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    head: u16,
    unique: u64,
) -> (u64, u64) {
    let inh = BASE + 0x8_0000 + u64::from(head) * 0x100;
    let outh = inh + 0x80;
    let mut hdr = [0u8; 40];
    hdr[..4].copy_from_slice(&40u32.to_le_bytes());
    hdr[8..16].copy_from_slice(&unique.to_le_bytes());
    mem.write_slice(&hdr, GuestAddress(inh)).unwrap();
    let next = u16::try_from(VRING_DESC_F_NEXT).unwrap();
    let write = u16::try_from(VRING_DESC_F_WRITE).unwrap();
    let descs = [
        RawDescriptor::from(Descriptor::new(inh, 40, next, head + 1)),
        RawDescriptor::from(Descriptor::new(outh, 64, write, 0)),
    ];
    vq.add_desc_chains(&descs, head).unwrap();
    (inh, outh)
}

#[test]
fn a_daemon_that_dies_sets_needs_reset_and_fs_requests_fail_with_eio() {
    let mut daemon = Daemon::start("die", fs_features(), all_protocol(), 2);
    let spec = VhostUserSpec::fs(daemon.socket.clone(), "share", 1, 16).unwrap();
    let mut dev = VhostUserDevice::connect(spec).unwrap();
    let mem = file_mem();
    let vqs = two_queues(&mem);
    let (ctx, probe) = context(&mem, &vqs, 1 << VIRTIO_F_VERSION_1);
    dev.activate(ctx).unwrap();
    // A request the daemon never answers.
    let (_, out1) = fuse_request(&vqs[1], &mem, 0, 0x1111);

    daemon.die();

    wait_for("the used entry", || vqs[1].used().idx().load() == 1);
    assert!(probe.shared.needs_reset.load(Ordering::SeqCst));
    assert!(dev.is_lost());
    let reply: [u8; 16] = mem.read_obj(GuestAddress(out1)).unwrap();
    assert_eq!(reply[..4], 16u32.to_le_bytes());
    assert_eq!(reply[4..8], (-libc::EIO).to_le_bytes());
    assert_eq!(reply[8..], 0x1111u64.to_le_bytes());
    // used ring: flags, idx, then (id, len).
    let len: u32 = mem
        .read_obj(GuestAddress(vqs[1].used_addr().0 + 8))
        .unwrap();
    assert_eq!(len, 16);

    // A later request, kicked through the queue eventfd, fails as well.
    let (_, out2) = fuse_request(&vqs[1], &mem, 2, 0x2222);
    probe.kicks[1].write(1).unwrap();
    wait_for("the second used entry", || vqs[1].used().idx().load() == 2);
    let reply: [u8; 16] = mem.read_obj(GuestAddress(out2)).unwrap();
    assert_eq!(reply[4..8], (-libc::EIO).to_le_bytes());
    assert_eq!(reply[8..], 0x2222u64.to_le_bytes());
    assert_ne!(
        probe.shared.interrupt_status.load(Ordering::SeqCst) & VIRTIO_MMIO_INT_VRING,
        0
    );

    // Reset with the daemon gone does not block on it.
    dev.reset();
    let _ = VIRTIO_CONFIG_S_NEEDS_RESET;
}

#[test]
fn after_the_daemon_comes_back_a_reset_device_reconnects_at_activation() {
    let mut daemon = Daemon::start("back", fs_features(), all_protocol(), 2);
    let spec = VhostUserSpec::fs(daemon.socket.clone(), "share", 1, 16).unwrap();
    let mut dev = VhostUserDevice::connect(spec).unwrap();
    let mem = file_mem();
    let vqs = two_queues(&mem);
    let (ctx, probe) = context(&mem, &vqs, 1 << VIRTIO_F_VERSION_1);
    dev.activate(ctx).unwrap();
    daemon.die();
    wait_for("needs reset", || {
        probe.shared.needs_reset.load(Ordering::SeqCst)
    });
    dev.reset();
    // Gone and not back: activation fails cleanly.
    let (ctx, _) = context(&mem, &vqs, 1 << VIRTIO_F_VERSION_1);
    assert!(dev.activate(ctx).is_err());

    daemon.clear();
    daemon.serve(fs_features(), all_protocol(), 2);
    let (ctx, _) = context(&mem, &vqs, 1 << VIRTIO_F_VERSION_1);
    dev.activate(ctx).unwrap();

    let msgs = daemon.msgs();
    assert_eq!(msgs[..2], [Msg::GetFeatures, Msg::GetProtocolFeatures]);
    assert!(msgs.contains(&Msg::SetOwner));
    assert!(msgs.contains(&Msg::SetVringKick(1)));
    assert!(!dev.is_lost());
}

#[test]
fn a_daemon_that_comes_back_with_fewer_features_fails_activation_naming_the_socket() {
    let mut daemon = Daemon::start("fewer", fs_features(), all_protocol(), 2);
    let spec = VhostUserSpec::fs(daemon.socket.clone(), "share", 1, 16).unwrap();
    let mut dev = VhostUserDevice::connect(spec).unwrap();
    let mem = file_mem();
    let vqs = two_queues(&mem);
    let (ctx, probe) = context(&mem, &vqs, 1 << VIRTIO_F_VERSION_1);
    dev.activate(ctx).unwrap();
    daemon.die();
    wait_for("needs reset", || {
        probe.shared.needs_reset.load(Ordering::SeqCst)
    });
    dev.reset();
    // Back, but without EVENT_IDX, which the device offered to the driver.
    daemon.serve(
        fs_features() & !(1 << VIRTIO_RING_F_EVENT_IDX),
        all_protocol(),
        2,
    );

    let (ctx, _) = context(&mem, &vqs, 1 << VIRTIO_F_VERSION_1);
    let err = dev.activate(ctx).unwrap_err();

    let text = format!("{err} {:?}", std::error::Error::source(&err));
    assert!(text.contains("lacks features 0x20000000"), "{text}");
    assert!(text.contains(daemon.socket.to_str().unwrap()), "{text}");
    assert!(
        dev.is_lost(),
        "still waiting for a daemon that can serve the device"
    );
}

/// A session that records the used-buffer irqfds it is given (`accept`), or has none
/// (the C driver's: `NotSupported`), and the irqfds deassigned.
struct IrqfdSession {
    accept: bool,
    used: Mutex<Vec<EventFd>>,
    deassigned: Mutex<Vec<EventFd>>,
}

impl IrqfdSession {
    fn new(accept: bool) -> Arc<Self> {
        Arc::new(Self {
            accept,
            used: Mutex::default(),
            deassigned: Mutex::default(),
        })
    }
}

impl remio_api::DmSession for IrqfdSession {
    fn info(&self) -> remio_api::DmInfo {
        remio_api::DmInfo {
            id: 0,
            shmem_addr: BASE,
            shmem_size: MEM_LEN,
            irq: 0,
        }
    }
    fn attach(&self) -> remio_api::Result<remio_api::VirtioRequest> {
        Err(remio_api::ApiError::ShuttingDown)
    }
    fn complete(&self, _: &remio_api::VirtioRequest) -> remio_api::Result<()> {
        Ok(())
    }
    fn assign_ioeventfd(&self, _: &EventFd, _: remio_api::IoeventfdSpec) -> remio_api::Result<()> {
        Ok(())
    }
    fn deassign_ioeventfd(
        &self,
        _: &EventFd,
        _: remio_api::IoeventfdSpec,
    ) -> remio_api::Result<()> {
        Ok(())
    }
    fn assign_irqfd(&self, _: &EventFd) -> remio_api::Result<()> {
        Ok(())
    }
    fn assign_used_buffer_irqfd(&self, fd: &EventFd) -> remio_api::Result<()> {
        if !self.accept {
            return Err(remio_api::ApiError::NotSupported(
                "used-buffer irqfd".into(),
            ));
        }
        self.used.lock().unwrap().push(fd.try_clone().unwrap());
        Ok(())
    }
    fn deassign_irqfd(&self, fd: &EventFd) -> remio_api::Result<()> {
        self.deassigned
            .lock()
            .unwrap()
            .push(fd.try_clone().unwrap());
        Ok(())
    }
    fn map_shmem_at(&self, _: u64, _: u64) -> remio_api::Result<GuestMemoryMmap> {
        Err(remio_api::ApiError::ShuttingDown)
    }
}

#[test]
fn with_a_used_buffer_irqfd_every_queue_s_call_is_that_irqfd_and_nothing_relays_it() {
    let daemon = Daemon::start("usedirqfd", fs_features(), all_protocol(), 2);
    let spec = VhostUserSpec::fs(daemon.socket.clone(), "share", 1, 16).unwrap();
    let mut dev = VhostUserDevice::connect(spec).unwrap();
    let session = IrqfdSession::new(true);
    let dyn_session: Arc<dyn remio_api::DmSession> = session.clone();
    dev.attach_session(&dyn_session);
    let mem = file_mem();
    let vqs = two_queues(&mem);
    let (ctx, probe) = context(&mem, &vqs, 1 << VIRTIO_F_VERSION_1);

    dev.activate(ctx).unwrap();

    assert!(dev.calls_go_to_irqfd());
    let used = session
        .used
        .lock()
        .unwrap()
        .pop()
        .expect("one used-buffer irqfd");
    assert!(session.used.lock().unwrap().is_empty());
    for q in [0, 1] {
        let mut call = daemon.seen.lock().unwrap().calls[q].take().unwrap();
        call.write_all(&(q as u64 + 1).to_ne_bytes()).unwrap();
        // The daemon's call is the irqfd itself: the dispatcher reads it, not a relay here.
        assert_eq!(used.read().unwrap(), q as u64 + 1);
    }
    assert!(
        probe.irqfd.read().is_err(),
        "nothing signalled the device's own irqfd"
    );
    assert_eq!(probe.shared.interrupt_status.load(Ordering::SeqCst), 0);

    dev.reset();
    drop(dev);
    let deassigned = session.deassigned.lock().unwrap();
    assert_eq!(deassigned.len(), 1);
    // The one deassigned is the used-buffer irqfd: one counter.
    used.write(5).unwrap();
    assert_eq!(deassigned[0].read().unwrap(), 5);
}

#[test]
fn a_session_without_used_buffer_irqfds_keeps_the_relay() {
    let daemon = Daemon::start("norelayirqfd", fs_features(), all_protocol(), 2);
    let spec = VhostUserSpec::fs(daemon.socket.clone(), "share", 1, 16).unwrap();
    let mut dev = VhostUserDevice::connect(spec).unwrap();
    let session: Arc<dyn remio_api::DmSession> = IrqfdSession::new(false);
    dev.attach_session(&session);
    let mem = file_mem();
    let vqs = two_queues(&mem);
    let (ctx, probe) = context(&mem, &vqs, 1 << VIRTIO_F_VERSION_1);

    dev.activate(ctx).unwrap();
    let mut call = daemon.seen.lock().unwrap().calls[0].take().unwrap();
    call.write_all(&1u64.to_ne_bytes()).unwrap();

    assert!(!dev.calls_go_to_irqfd());
    wait_for("the irqfd", || probe.irqfd.read().is_ok());
    assert_eq!(
        probe.shared.interrupt_status.load(Ordering::SeqCst),
        VIRTIO_MMIO_INT_VRING
    );
}
