//! Socket-specific tests: the transport against a small scripted [`DmApi`] double, raw bytes
//! for every bad-input case, credentials, mode, fd hygiene. The behaviour of the API itself,
//! run against both the in-process and the socket implementation, is in `tests/behaviour.rs`.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::fdpass;
use crate::wire::{self, op, ReplyBody, Request, MAX_IN_FLIGHT, MAX_MESSAGE};
use crate::{
    AccessWait, ApiError, DmApi, DmInfo, DmSession, IoeventfdSpec, Notifier, VirtioRequest,
    WaitHelper,
};

const SHMEM_ADDR: u64 = 0x5000_0000;
const SHMEM_SIZE: u64 = 0x10000;

/// One scripted DM (id 0): requests pushed by the test, completions recorded.
struct FakeDm {
    queue: Mutex<VecDeque<VirtioRequest>>,
    cv: Condvar,
    notifier: Mutex<Option<Notifier>>,
    completed: Mutex<Vec<VirtioRequest>>,
    ioeventfds: Mutex<Vec<IoeventfdSpec>>,
    irqfds: AtomicUsize,
    /// Used-buffer irqfds assigned (remio's IRQFD extension).
    used_irqfds: AtomicUsize,
    sessions_dropped: AtomicUsize,
    shmem: std::fs::File,
    /// The wait helper the server installed, if any.
    helper: Mutex<Option<WaitHelper>>,
    /// Times the server looked for a request and found none (`try_attach` returning `None`,
    /// or `attach` going to sleep): each ATTACH it holds waiting did one, so a test waits
    /// for this count instead of sleeping until an ATTACH "has arrived".
    found_empty: AtomicUsize,
}

impl FakeDm {
    fn new() -> Arc<Self> {
        // SAFETY: memfd_create with a valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"fake-shmem".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor owned only here.
        let shmem = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        shmem.set_len(SHMEM_SIZE).unwrap();
        Arc::new(Self {
            queue: Mutex::new(VecDeque::new()),
            cv: Condvar::new(),
            notifier: Mutex::new(None),
            completed: Mutex::new(Vec::new()),
            ioeventfds: Mutex::new(Vec::new()),
            irqfds: AtomicUsize::new(0),
            used_irqfds: AtomicUsize::new(0),
            sessions_dropped: AtomicUsize::new(0),
            shmem,
            helper: Mutex::new(None),
            found_empty: AtomicUsize::new(0),
        })
    }

    /// Waits until the server has found the queue empty `n` times in all (see `found_empty`).
    fn wait_found_empty(&self, n: usize) {
        while self.found_empty.load(Ordering::SeqCst) < n {
            std::thread::yield_now();
        }
    }

    fn push(&self, r: VirtioRequest) {
        self.queue.lock().unwrap().push_back(r);
        self.cv.notify_one();
        let n = self.notifier.lock().unwrap().clone();
        if let Some(n) = n {
            n();
        }
    }
}

struct FakeApi(Arc<FakeDm>);

impl DmApi for FakeApi {
    fn open(&self, dm_id: u32) -> crate::Result<Box<dyn DmSession>> {
        if dm_id != 0 {
            return Err(ApiError::NoSuchDm(dm_id));
        }
        Ok(Box::new(FakeSession(self.0.clone())))
    }
}

struct FakeSession(Arc<FakeDm>);

impl Drop for FakeSession {
    fn drop(&mut self) {
        *self.0.notifier.lock().unwrap() = None;
        self.0.sessions_dropped.fetch_add(1, Ordering::SeqCst);
    }
}

impl DmSession for FakeSession {
    fn info(&self) -> DmInfo {
        DmInfo {
            id: 0,
            shmem_addr: SHMEM_ADDR,
            shmem_size: SHMEM_SIZE,
            irq: 52,
        }
    }
    fn attach(&self) -> crate::Result<VirtioRequest> {
        let mut q = self.0.queue.lock().unwrap();
        loop {
            if let Some(r) = q.pop_front() {
                return Ok(r);
            }
            self.0.found_empty.fetch_add(1, Ordering::SeqCst);
            q = self.0.cv.wait(q).unwrap();
        }
    }
    fn try_attach(&self) -> crate::Result<Option<VirtioRequest>> {
        let r = self.0.queue.lock().unwrap().pop_front();
        if r.is_none() {
            self.0.found_empty.fetch_add(1, Ordering::SeqCst);
        }
        Ok(r)
    }
    fn set_notifier(&self, n: Option<Notifier>) -> crate::Result<()> {
        *self.0.notifier.lock().unwrap() = n;
        Ok(())
    }
    fn set_wait_helper(&self, h: Option<WaitHelper>) -> crate::Result<()> {
        *self.0.helper.lock().unwrap() = h;
        Ok(())
    }
    fn complete(&self, req: &VirtioRequest) -> crate::Result<()> {
        if req.dm_id != 0 {
            return Err(ApiError::PermissionDenied("another DM".into()));
        }
        self.0.completed.lock().unwrap().push(*req);
        Ok(())
    }
    fn assign_ioeventfd(&self, _fd: &EventFd, spec: IoeventfdSpec) -> crate::Result<()> {
        self.0.ioeventfds.lock().unwrap().push(spec);
        Ok(())
    }
    fn deassign_ioeventfd(&self, _fd: &EventFd, spec: IoeventfdSpec) -> crate::Result<()> {
        let mut v = self.0.ioeventfds.lock().unwrap();
        let i = v
            .iter()
            .position(|s| *s == spec)
            .ok_or_else(|| ApiError::NotFound("ioeventfd".into()))?;
        v.remove(i);
        Ok(())
    }
    fn assign_irqfd(&self, _fd: &EventFd) -> crate::Result<()> {
        self.0.irqfds.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn assign_used_buffer_irqfd(&self, _fd: &EventFd) -> crate::Result<()> {
        self.0.used_irqfds.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn deassign_irqfd(&self, _fd: &EventFd) -> crate::Result<()> {
        self.0.irqfds.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
    fn map_shmem_at(&self, len: u64, base: u64) -> crate::Result<vm_memory::GuestMemoryMmap> {
        crate::check_shmem_len(len, SHMEM_SIZE)?;
        crate::map_file(self.0.shmem.try_clone()?, 0, len, base)
    }
}

fn sock_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("remio-api-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn server(name: &str) -> (Arc<FakeDm>, SocketServer) {
    let dm = FakeDm::new();
    let srv = SocketServer::bind(
        sock_path(name),
        Arc::new(FakeApi(dm.clone())),
        SocketServerConfig::default(),
    )
    .unwrap();
    (dm, srv)
}

fn req(id: u64) -> VirtioRequest {
    VirtioRequest {
        dm_id: 0,
        addr: 0xa000_0070,
        op: 1,
        value: 0,
        access_width: 4,
        request_id: id,
    }
}

/// A raw client speaking bytes.
struct Raw(OwnedFd);

impl Raw {
    fn connect(srv: &SocketServer) -> Self {
        Self(fdpass::connect(srv.path()).unwrap())
    }
    fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        fdpass::send_msg(self.0.as_fd(), bytes, fds).unwrap();
    }
    fn request(&self, r: &Request, tag: u32) {
        let mut b = Vec::new();
        r.encode(tag, &mut b);
        self.send(&b, &[]);
    }
    /// The next reply, or None if the server closed the connection.
    fn recv(&self) -> Option<(wire::Reply, Vec<OwnedFd>)> {
        let mut buf = [0u8; MAX_MESSAGE + 1];
        let r = fdpass::recv_msg(self.0.as_fd(), &mut buf).ok()??;
        let reply = wire::decode_reply(&buf[..r.len], r.fds.len()).unwrap();
        Some((reply, r.fds))
    }
    fn errno_of_next(&self) -> i32 {
        self.recv().unwrap().0.result.unwrap_err()
    }
    fn opened(srv: &SocketServer) -> Self {
        let raw = Self::connect(srv);
        raw.request(&Request::Open { dm_id: 0 }, 1);
        assert!(raw.recv().unwrap().0.result.is_ok());
        raw
    }
}

/// How many fds of this process refer to the same eventfd as `e`, or to a file whose
/// `/proc/self/fd` link is `link` (robust against other tests opening fds meanwhile).
fn holders(e: &EventFd, link: &str) -> usize {
    // SAFETY: e outlives the borrow.
    let id = fdpass::eventfd_identity(unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }).unwrap();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|d| d.ok())
        .filter(|d| {
            let Ok(n) = d.file_name().to_string_lossy().parse::<i32>() else {
                return false;
            };
            let Ok(target) = std::fs::read_link(d.path()) else {
                return false;
            };
            if target.to_string_lossy() == link {
                return true;
            }
            // SAFETY: n is open in this process for the duration of the check (or the read
            // fails harmlessly).
            let b = unsafe { BorrowedFd::borrow_raw(n) };
            matches!(fdpass::eventfd_identity(b), Ok(Some(i)) if Some(i) == id && i != 0)
        })
        .count()
}

fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn open_returns_the_dm_info_and_unknown_dms_are_no_such_dm() {
    let (_dm, srv) = server("open.sock");
    let api = SocketApi::connect(srv.path());
    let s = api.open(0).unwrap();
    assert_eq!(
        s.info(),
        DmInfo {
            id: 0,
            shmem_addr: SHMEM_ADDR,
            shmem_size: SHMEM_SIZE,
            irq: 52
        }
    );
    assert!(matches!(api.open(3), Err(ApiError::NoSuchDm(3))));
}

#[test]
fn a_request_queued_before_attach_and_one_after_both_arrive() {
    let (dm, srv) = server("attach.sock");
    let s = SocketApi::connect(srv.path()).open(0).unwrap();
    dm.push(req(1));
    assert_eq!(s.attach().unwrap(), req(1));
    let s = Arc::new(s);
    let empty = dm.found_empty.load(Ordering::SeqCst);
    let t = {
        let s = s.clone();
        std::thread::spawn(move || s.attach().unwrap())
    };
    // The ATTACH has reached the server and waits there.
    dm.wait_found_empty(empty + 1);
    dm.push(req(2));
    assert_eq!(t.join().unwrap(), req(2));
    let mut done = req(2);
    done.value = 0x55;
    let next = {
        let s = s.clone();
        std::thread::spawn(move || s.complete_and_attach(&done).unwrap())
    };
    assert!(eventually(|| dm.completed.lock().unwrap().contains(&done)));
    dm.push(req(3));
    assert_eq!(next.join().unwrap(), req(3));
}

#[test]
fn many_threads_wait_in_attach_on_one_connection_and_each_gets_one_request() {
    let (dm, srv) = server("many.sock");
    let s: Arc<dyn DmSession> = Arc::from(SocketApi::connect(srv.path()).open(0).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || s.attach().unwrap().request_id)
        })
        .collect();
    // Every ATTACH has reached the server and waits there.
    dm.wait_found_empty(8);
    for i in 0..8 {
        dm.push(req(i));
    }
    let mut got: Vec<u64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    got.sort_unstable();
    assert_eq!(got, (0..8).collect::<Vec<_>>());
}

#[test]
fn errors_cross_the_socket_with_their_errno() {
    let (_dm, srv) = server("errors.sock");
    let s = SocketApi::connect(srv.path()).open(0).unwrap();
    let mut foreign = req(1);
    foreign.dm_id = 5;
    assert_eq!(s.complete(&foreign).unwrap_err().errno(), libc::EPERM);
    let e = EventFd::new(0).unwrap();
    let spec = IoeventfdSpec {
        addr: 0xa000_0050,
        len: 4,
        datamatch: Some(0),
    };
    assert_eq!(
        s.deassign_ioeventfd(&e, spec).unwrap_err().errno(),
        libc::ENOENT
    );
    assert_eq!(s.map_shmem(0).unwrap_err().errno(), libc::EINVAL);
}

#[test]
fn eventfds_and_shared_memory_cross_the_socket() {
    let (dm, srv) = server("fds.sock");
    let s = SocketApi::connect(srv.path()).open(0).unwrap();
    let e = EventFd::new(0).unwrap();
    let spec = IoeventfdSpec {
        addr: 0xa000_0050,
        len: 4,
        datamatch: Some(1),
    };
    s.assign_ioeventfd(&e, spec).unwrap();
    assert_eq!(*dm.ioeventfds.lock().unwrap(), vec![spec]);
    s.deassign_ioeventfd(&e, spec).unwrap();
    assert!(dm.ioeventfds.lock().unwrap().is_empty());
    s.assign_irqfd(&e).unwrap();
    assert_eq!(dm.irqfds.load(Ordering::SeqCst), 1);
    s.deassign_irqfd(&e).unwrap();
    assert_eq!(dm.irqfds.load(Ordering::SeqCst), 0);

    let mem = s.map_shmem(0x1000).unwrap();
    mem.write_obj(0xfeed_u32, GuestAddress(SHMEM_ADDR + 8))
        .unwrap();
    let mut b = [0u8; 4];
    std::os::unix::fs::FileExt::read_exact_at(&dm.shmem, &mut b, 8).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0xfeed);
    assert!(mem
        .read_obj::<u8>(GuestAddress(SHMEM_ADDR + 0x1000))
        .is_err());
}

#[test]
fn a_used_buffer_irqfd_crosses_the_socket_as_irqfd_with_remios_flag() {
    let (dm, srv) = server("usedirqfd.sock");
    let s = SocketApi::connect(srv.path()).open(0).unwrap();
    let e = EventFd::new(0).unwrap();

    s.assign_used_buffer_irqfd(&e).unwrap();

    assert_eq!(dm.used_irqfds.load(Ordering::SeqCst), 1);
    assert_eq!(dm.irqfds.load(Ordering::SeqCst), 0, "not a plain irqfd");
    // The flag with DEASSIGN, or an unknown flag, is refused.
    let raw = Raw::opened(&srv);
    // SAFETY: e outlives the borrow.
    let efd = unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) };
    for (tag, flags) in [
        (
            2,
            wire::IRQFD_FLAG_USED_BUFFER | remio_abi::uapi::BAO_IRQFD_FLAG_DEASSIGN,
        ),
        (3, 1 << 17),
    ] {
        let mut b = Vec::new();
        Request::Irqfd(remio_abi::Irqfd { fd: 0, flags }).encode(tag, &mut b);
        raw.send(&b, &[efd]);
        assert_eq!(raw.errno_of_next(), libc::EINVAL, "flags {flags:#x}");
    }
    assert_eq!(dm.used_irqfds.load(Ordering::SeqCst), 1);
}

#[test]
fn the_socket_is_mode_0600() {
    use std::os::unix::fs::PermissionsExt;
    let (_dm, srv) = server("mode.sock");
    let mode = std::fs::metadata(srv.path()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn a_peer_with_a_uid_not_allowed_is_refused() {
    let dm = FakeDm::new();
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let cfg = SocketServerConfig {
        allowed_uids: Some(vec![me.wrapping_add(1)]),
        ..Default::default()
    };
    let srv = SocketServer::bind(sock_path("cred.sock"), Arc::new(FakeApi(dm)), cfg).unwrap();
    assert!(matches!(
        SocketApi::connect(srv.path()).open(0),
        Err(ApiError::Disconnected)
    ));
}

#[test]
fn requests_before_open_and_a_second_open_are_eproto() {
    let (_dm, srv) = server("seq.sock");
    let raw = Raw::connect(&srv);
    raw.request(&Request::Attach, 4);
    let (reply, _) = raw.recv().unwrap();
    assert_eq!(
        (reply.opcode, reply.tag, reply.result),
        (op::ATTACH, 4, Err(libc::EPROTO))
    );
    raw.request(&Request::Open { dm_id: 0 }, 5);
    assert!(raw.recv().unwrap().0.result.is_ok());
    raw.request(&Request::Open { dm_id: 0 }, 6);
    assert_eq!(raw.errno_of_next(), libc::EPROTO);
}

#[test]
fn unknown_opcodes_are_enotty_and_the_connection_stays_usable() {
    let (_dm, srv) = server("opcode.sock");
    let raw = Raw::opened(&srv);
    let mut b = Vec::new();
    Request::Attach.encode(9, &mut b);
    b[4] = 0x33;
    raw.send(&b, &[]);
    let (reply, _) = raw.recv().unwrap();
    assert_eq!((reply.tag, reply.result), (9, Err(libc::ENOTTY)));
    raw.request(&Request::MapShmem { len: 0 }, 10);
    assert_eq!(raw.errno_of_next(), libc::EINVAL);
}

#[test]
fn truncated_and_oversized_payloads_are_einval() {
    let (_dm, srv) = server("size.sock");
    let raw = Raw::opened(&srv);
    let mut b = Vec::new();
    Request::Complete(req(1)).encode(2, &mut b);
    raw.send(&b[..b.len() - 8], &[]);
    assert_eq!(raw.errno_of_next(), libc::EINVAL);
    let mut big = b.clone();
    big.resize(4096, 0);
    raw.send(&big, &[]);
    assert_eq!(raw.errno_of_next(), libc::EINVAL);
}

#[test]
fn wrong_fd_counts_and_fds_of_the_wrong_kind_are_ebadf_and_none_leak() {
    let (_dm, srv) = server("badfd.sock");
    let raw = Raw::opened(&srv);
    let e = EventFd::new(0).unwrap();
    // SAFETY: e outlives the borrow.
    let efd = unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) };
    // An fd on a message that takes none.
    let mut b = Vec::new();
    Request::Attach.encode(1, &mut b);
    b[3] = 1;
    raw.send(&b, &[efd]);
    assert_eq!(raw.errno_of_next(), libc::EBADF);
    // No fd on IRQFD.
    Request::Irqfd(remio_abi::Irqfd::default()).encode(2, &mut b);
    b[3] = 0;
    raw.send(&b, &[]);
    assert_eq!(raw.errno_of_next(), libc::EBADF);
    // Two fds where one is expected.
    Request::Irqfd(remio_abi::Irqfd::default()).encode(3, &mut b);
    raw.send(&b, &[efd, efd]);
    assert_eq!(raw.errno_of_next(), libc::EBADF);
    // A file that is not an eventfd.
    // SAFETY: memfd_create with a valid C string; the result is checked.
    let m = unsafe { libc::memfd_create(c"remio-not-an-eventfd".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(m >= 0);
    // SAFETY: a new descriptor owned only here.
    let f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(m) });
    Request::Irqfd(remio_abi::Irqfd::default()).encode(4, &mut b);
    raw.send(&b, &[f.as_fd()]);
    assert_eq!(raw.errno_of_next(), libc::EBADF);
    // Unknown ioeventfd flags.
    Request::Ioeventfd(remio_abi::Ioeventfd {
        flags: 1 << 7,
        ..Default::default()
    })
    .encode(5, &mut b);
    raw.send(&b, &[efd]);
    assert_eq!(raw.errno_of_next(), libc::EINVAL);
    // The server (same process) holds none of the fds it was sent: only ours remain.
    let link = "/memfd:remio-not-an-eventfd (deleted)";
    assert!(
        eventually(|| holders(&e, link) == 2),
        "fds leaked: {}",
        holders(&e, link)
    );
}

#[test]
fn too_many_waiting_attaches_are_ebusy() {
    let (_dm, srv) = server("busy.sock");
    let raw = Raw::opened(&srv);
    for tag in 0..=u32::try_from(MAX_IN_FLIGHT).unwrap() {
        raw.request(&Request::Attach, tag);
    }
    let (reply, _) = raw.recv().unwrap();
    assert_eq!(
        (reply.tag, reply.result),
        (u32::try_from(MAX_IN_FLIGHT).unwrap(), Err(libc::EBUSY))
    );
}

#[test]
fn a_corrupt_header_closes_the_connection_and_ends_the_session() {
    let (dm, srv) = server("corrupt.sock");
    let raw = Raw::opened(&srv);
    raw.send(&[1, 2, 3], &[]);
    assert!(raw.recv().is_none(), "the server closes");
    assert!(eventually(
        || dm.sessions_dropped.load(Ordering::SeqCst) == 1
    ));
    let raw = Raw::opened(&srv);
    let mut b = Vec::new();
    Request::Attach.encode(1, &mut b);
    b[0] ^= 0xff;
    raw.send(&b, &[]);
    assert!(raw.recv().is_none());
    assert!(eventually(
        || dm.sessions_dropped.load(Ordering::SeqCst) == 2
    ));
}

#[test]
fn closing_the_client_drops_the_server_session() {
    let (dm, srv) = server("close.sock");
    let s = SocketApi::connect(srv.path()).open(0).unwrap();
    assert_eq!(srv.connections(), 1);
    drop(s);
    assert!(eventually(
        || dm.sessions_dropped.load(Ordering::SeqCst) == 1
    ));
    assert!(eventually(|| srv.connections() == 0));
}

#[test]
fn dropping_the_server_disconnects_waiting_clients_and_removes_the_socket() {
    let (_dm, srv) = server("drop.sock");
    let path = srv.path().to_owned();
    let s: Arc<dyn DmSession> = Arc::from(SocketApi::connect(&path).open(0).unwrap());
    let t = {
        let s = s.clone();
        std::thread::spawn(move || s.attach())
    };
    // The ATTACH waits at the server.
    while srv.stats().attach_waiting == 0 {
        std::thread::yield_now();
    }
    drop(srv);
    assert!(matches!(t.join().unwrap(), Err(ApiError::Disconnected)));
    assert!(!path.exists());
}

#[test]
fn replies_match_their_tags_when_answered_out_of_order() {
    let (dm, srv) = server("order.sock");
    let raw = Raw::opened(&srv);
    raw.request(&Request::Attach, 40);
    raw.request(&Request::Complete(req(7)), 41);
    let (r1, _) = raw.recv().unwrap();
    assert_eq!((r1.tag, r1.result), (41, Ok(ReplyBody::Empty)));
    dm.push(req(8));
    let (r2, _) = raw.recv().unwrap();
    assert_eq!((r2.tag, r2.result), (40, Ok(ReplyBody::Request(req(8)))));
}

/// A stalled access as the wait helper sees it: complete once `done` says so.
struct FakeWait<F: Fn() -> bool>(F);

impl<F: Fn() -> bool> AccessWait for FakeWait<F> {
    fn is_complete(&self) -> bool {
        (self.0)()
    }
    fn deadline(&self) -> Option<Instant> {
        None
    }
}

/// What a frontend thread does after queuing a request: the notifier runs on it (so the
/// connection may be read by it), then the installed wait helper.
fn queue_and_help(dm: &FakeDm, r: VirtioRequest, done: impl Fn() -> bool) {
    dm.push(r);
    let h = dm.helper.lock().unwrap().clone().unwrap();
    h(&FakeWait(done));
}

#[test]
fn the_server_installs_a_wait_helper_and_removes_it_when_the_session_ends() {
    let (dm, srv) = server("helper.sock");
    let raw = Raw::opened(&srv);
    assert!(dm.helper.lock().unwrap().is_some());
    drop(raw);
    assert!(eventually(
        || dm.sessions_dropped.load(Ordering::SeqCst) == 1
    ));
    assert!(dm.helper.lock().unwrap().is_none());
}

#[test]
fn packets_arriving_while_a_frontend_reads_all_get_their_replies() {
    // A frontend thread keeps reading (its access never completes until the end) while the
    // device model sends completions and other requests: the completions are handled by
    // whichever thread reads, the other requests are left to the connection thread (stashed
    // when the frontend read them), and every packet gets its reply.
    let (dm, srv) = server("leftbehind.sock");
    let raw = Arc::new(Raw::opened(&srv));
    let finished = Arc::new(AtomicUsize::new(0));
    let client = {
        let (raw, finished) = (raw.clone(), finished.clone());
        std::thread::spawn(move || {
            for i in 0..50u32 {
                let tag = 10 + i;
                // A packet the frontend reader must leave to the connection thread...
                raw.request(&Request::MapShmem { len: 0x1000 }, tag);
                let (reply, fds) = raw.recv().unwrap();
                assert_eq!(reply.tag, tag);
                assert!(matches!(
                    reply.result,
                    Ok(ReplyBody::Shmem { len: 0x1000, .. })
                ));
                assert_eq!(fds.len(), 1);
                // ...and one it handles itself.
                raw.request(&Request::Complete(req(u64::from(i))), tag);
                let (reply, _) = raw.recv().unwrap();
                assert_eq!(
                    (reply.tag, reply.result.ok()),
                    (tag, Some(ReplyBody::Empty))
                );
                if i % 7 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            finished.store(1, Ordering::SeqCst);
        })
    };
    let end = Instant::now() + Duration::from_secs(20);
    while finished.load(Ordering::SeqCst) == 0 && Instant::now() < end {
        queue_and_help(&dm, req(1000), || false);
    }
    client.join().unwrap();
    let done: Vec<u64> = dm
        .completed
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.request_id)
        .collect();
    assert_eq!(done, (0..50).collect::<Vec<_>>());
}

#[test]
fn a_frontend_reader_returns_once_its_request_is_complete() {
    let (dm, srv) = server("ownreq.sock");
    let raw = Arc::new(Raw::opened(&srv));
    raw.request(&Request::Attach, 2);
    let client = {
        let raw = raw.clone();
        std::thread::spawn(move || {
            let (reply, _) = raw.recv().unwrap();
            let Ok(ReplyBody::Request(r)) = reply.result else {
                panic!("expected a request");
            };
            let done = VirtioRequest { value: 7, ..r };
            raw.request(&Request::CompleteAttach(done), 3);
        })
    };
    let is_done = || {
        dm.completed
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.request_id == 5)
    };
    queue_and_help(&dm, req(5), is_done);
    // Whether this thread or the connection thread handled the completion, it happens.
    assert!(eventually(is_done));
    client.join().unwrap();
    let got = dm.completed.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].value, 7);
}

#[test]
fn the_end_of_the_stream_while_a_frontend_reads_still_ends_the_session() {
    let (dm, srv) = server("eofreader.sock");
    let raw = Raw::opened(&srv);
    // Frontend turns taken: the client closes once frontends are reading, not after a sleep.
    let turns = Arc::new(AtomicUsize::new(0));
    let closer = {
        let turns = turns.clone();
        std::thread::spawn(move || {
            while turns.load(Ordering::SeqCst) < 3 {
                std::thread::yield_now();
            }
            drop(raw);
        })
    };
    let end = Instant::now() + Duration::from_secs(20);
    while dm.sessions_dropped.load(Ordering::SeqCst) == 0 && Instant::now() < end {
        let Some(h) = dm.helper.lock().unwrap().clone() else {
            break;
        };
        dm.push(req(1));
        turns.fetch_add(1, Ordering::SeqCst);
        h(&FakeWait(|| false));
    }
    closer.join().unwrap();
    assert!(eventually(
        || dm.sessions_dropped.load(Ordering::SeqCst) == 1
    ));
    assert_eq!(srv.connections(), 0);
}

#[test]
fn a_packet_nobody_reads_after_frontends_left_the_interest_disarmed_is_still_handled() {
    // The device model answers each request with COMPLETE_ATTACH (so a thread of it always
    // waits in ATTACH and it holds no request when the frontend leaves): frontends may then
    // leave the connection thread's interest disarmed. A packet sent afterwards, with no
    // frontend reading, must still be handled.
    let (dm, srv) = server("deferred.sock");
    let raw = Arc::new(Raw::opened(&srv));
    raw.request(&Request::Attach, 2);
    let rounds = 20u64;
    let client = {
        let raw = raw.clone();
        std::thread::spawn(move || {
            for _ in 0..rounds {
                let (reply, _) = raw.recv().unwrap();
                let Ok(ReplyBody::Request(r)) = reply.result else {
                    panic!("expected a request");
                };
                raw.request(&Request::CompleteAttach(r), reply.tag);
            }
        })
    };
    for id in 0..rounds {
        let done = || {
            dm.completed
                .lock()
                .unwrap()
                .iter()
                .any(|r| r.request_id == id)
        };
        queue_and_help(&dm, req(id), done);
        assert!(eventually(done));
    }
    client.join().unwrap();
    raw.request(&Request::MapShmem { len: 0x1000 }, 99);
    let (reply, fds) = raw.recv().unwrap();
    assert_eq!(reply.tag, 99);
    assert_eq!(fds.len(), 1);
}

fn server_with(name: &str, config: SocketServerConfig) -> (Arc<FakeDm>, SocketServer) {
    let dm = FakeDm::new();
    let srv = SocketServer::bind(sock_path(name), Arc::new(FakeApi(dm.clone())), config).unwrap();
    (dm, srv)
}

/// Hands requests to `client`, one ATTACH at a time, from this thread (the frontend thread:
/// the notifier runs on it) until the server has to queue a reply because the client, which
/// never reads, has a full socket. Returns how many requests were handed out and the longest
/// time one hand-out took.
fn fill_until_queued(dm: &FakeDm, srv: &SocketServer, client: &Raw) -> (u64, Duration) {
    let mut handed = 0u64;
    let mut longest = Duration::ZERO;
    while srv.stats().replies_queued == 0 {
        assert!(handed < 1_000_000, "the client's socket never filled");
        let empty = dm.found_empty.load(Ordering::SeqCst);
        client.request(&Request::Attach, 2);
        // The ATTACH waits at the server.
        dm.wait_found_empty(empty + 1);
        let t = Instant::now();
        dm.push(req(handed));
        longest = longest.max(t.elapsed());
        handed += 1;
    }
    (handed, longest)
}

#[test]
fn a_device_model_that_stops_reading_never_blocks_the_thread_that_serves_another() {
    // Were replies sent blocking, this thread would wait for the stuck client up to this long,
    // then the server would give the client up: both are seen below.
    let config = SocketServerConfig {
        send_timeout: Duration::from_secs(60),
        ..SocketServerConfig::default()
    };
    let (dm_a, srv_a) = server_with("stuck-a.sock", config.clone());
    let (dm_b, srv_b) = server_with("stuck-b.sock", config);
    let b = SocketApi::connect(srv_b.path()).open(0).unwrap();
    let served_b = std::thread::spawn(move || {
        let r = b.attach().unwrap();
        b.complete(&r).unwrap();
        r
    });
    // Device model A stopped reading (SIGSTOP, a hang): this thread hands it requests until
    // its socket is full and one more is queued at the server.
    let a = Raw::opened(&srv_a);

    let (handed, longest) = fill_until_queued(&dm_a, &srv_a, &a);
    // The same thread traps for device B next: B's device model gets the request and
    // completes it while A still reads nothing.
    dm_b.push(req(7));

    assert_eq!(served_b.join().unwrap(), req(7));
    assert_eq!(*dm_b.completed.lock().unwrap(), vec![req(7)]);
    let st = srv_a.stats();
    assert_eq!((st.replies_queued, st.dead_clients), (1, 0));
    eprintln!(
        "{handed} requests handed to the stuck client before its socket was full; \
         the longest hand-out took {longest:?}"
    );
    // A reads again: it gets every request, in order, the queued one last.
    for i in 0..handed {
        let (reply, _) = a.recv().unwrap();
        assert_eq!(reply.result.ok(), Some(ReplyBody::Request(req(i))));
    }
    assert_eq!(srv_a.stats().replies_queued, 0);
}

#[test]
fn a_client_that_leaves_too_many_replies_untaken_is_dead_and_its_session_ends() {
    let config = SocketServerConfig {
        send_timeout: Duration::from_secs(3600),
        ..SocketServerConfig::default()
    };
    let (dm, srv) = server_with("overflow.sock", config);
    let client = Raw::opened(&srv);
    let (handed, _) = fill_until_queued(&dm, &srv, &client);

    // OUTBOUND_MAX replies may wait; the one after that ends the connection.
    for i in 0..OUTBOUND_MAX {
        assert_eq!(srv.stats().replies_queued, i + 1);
        let empty = dm.found_empty.load(Ordering::SeqCst);
        client.request(&Request::Attach, 2);
        dm.wait_found_empty(empty + 1);
        dm.push(req(handed + i as u64));
    }

    assert_eq!(srv.stats().dead_clients, 1);
    assert!(eventually(
        || dm.sessions_dropped.load(Ordering::SeqCst) == 1
    ));
    // What had reached the client's socket is still there, then the end of the stream.
    let mut got = 0;
    while client.recv().is_some() {
        got += 1;
    }
    assert_eq!(got, handed - 1);
}

#[test]
fn a_client_that_takes_no_reply_for_the_send_timeout_is_dead() {
    let config = SocketServerConfig {
        send_timeout: Duration::from_millis(50),
        ..SocketServerConfig::default()
    };
    let (dm, srv) = server_with("stalled.sock", config);
    let client = Raw::opened(&srv);
    let (handed, _) = fill_until_queued(&dm, &srv, &client);

    // Nothing is read: the connection thread gives the client up once the timeout passed.
    assert!(eventually(|| srv.stats().dead_clients == 1));
    assert!(eventually(
        || dm.sessions_dropped.load(Ordering::SeqCst) == 1
    ));
    assert_eq!(srv.stats().replies_queued, 0);
    assert!(handed > 0);
}
