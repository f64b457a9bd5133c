//! The platform side: serves any [`crate::DmApi`] on a socket path, one session a connection.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::fdpass;
use crate::wire::{self, ReplyBody, Request, HEADER_SIZE, MAX_IN_FLIGHT, MAX_MESSAGE};
use crate::{ApiError, DmApi, DmSession, IoeventfdSpec, Notifier};
use remio_abi::uapi::{
    BAO_IOEVENTFD_FLAG_DATAMATCH, BAO_IOEVENTFD_FLAG_DEASSIGN, BAO_IRQFD_FLAG_DEASSIGN,
};

/// Who may connect, and how long a reply may wait for a client that does not read.
#[derive(Clone, Debug)]
pub struct SocketServerConfig {
    /// Peer uids allowed (checked with `SO_PEERCRED`). `None`: this process's effective uid
    /// and root.
    pub allowed_uids: Option<Vec<u32>>,
    /// A reply that cannot be written for this long (the client stopped reading) ends the
    /// connection, so a stuck client cannot block the thread that delivers its requests.
    pub send_timeout: Duration,
}

impl Default for SocketServerConfig {
    fn default() -> Self {
        Self {
            allowed_uids: None,
            send_timeout: Duration::from_secs(5),
        }
    }
}

/// Serves a [`DmApi`] on a UNIX socket (mode 0600). Dropping it stops accepting, ends every
/// connection (each session is dropped, with the cleanup that implies) and removes the socket.
#[derive(Debug)]
pub struct SocketServer {
    path: PathBuf,
    listener: Arc<OwnedFd>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<Weak<Conn>>>>,
    accept_thread: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

impl SocketServer {
    /// Binds `path` (a stale socket file there is replaced) and starts serving `api`.
    pub fn bind(
        path: impl AsRef<Path>,
        api: Arc<dyn DmApi>,
        config: SocketServerConfig,
    ) -> io::Result<Self> {
        let path = path.as_ref().to_owned();
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(&path)?;
            }
        }
        let listener = Arc::new(fdpass::listen(&path)?);
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let accept_thread = {
            let (listener, stop, conns) = (listener.clone(), stop.clone(), conns.clone());
            std::thread::Builder::new()
                .name("remio-api-accept".into())
                .spawn(move || accept_loop(&listener, &stop, &conns, &api, &config))?
        };
        Ok(Self {
            path,
            listener,
            stop,
            conns,
            accept_thread: Some(accept_thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Connections currently open.
    pub fn connections(&self) -> usize {
        lock(&self.conns)
            .iter()
            .filter(|c| c.strong_count() > 0)
            .count()
    }
}

impl Drop for SocketServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // SAFETY: shutdown(2) on the listening socket we own wakes the accept(2) in progress.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for c in lock(&self.conns).iter().filter_map(Weak::upgrade) {
            c.shutdown();
        }
        if let Some(t) = self.accept_thread.take() {
            if let Ok(workers) = t.join() {
                for w in workers {
                    let _ = w.join();
                }
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn accept_loop(
    listener: &OwnedFd,
    stop: &AtomicBool,
    conns: &Mutex<Vec<Weak<Conn>>>,
    api: &Arc<dyn DmApi>,
    config: &SocketServerConfig,
) -> Vec<JoinHandle<()>> {
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    while !stop.load(Ordering::SeqCst) {
        let sock = match fdpass::accept(listener.as_fd()) {
            Ok(s) => s,
            Err(e) => {
                if !stop.load(Ordering::SeqCst) {
                    log::error!("api socket: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
        };
        if stop.load(Ordering::SeqCst) {
            break;
        }
        match fdpass::peer_cred(sock.as_fd()) {
            Ok(cred) => {
                let allowed = match &config.allowed_uids {
                    Some(list) => list.contains(&cred.uid),
                    None => cred.uid == euid || cred.uid == 0,
                };
                if !allowed {
                    log::warn!(
                        "api socket: refused pid {} uid {} (not allowed)",
                        cred.pid,
                        cred.uid
                    );
                    continue;
                }
            }
            Err(e) => {
                log::warn!("api socket: no peer credentials: {e}");
                continue;
            }
        }
        if let Err(e) = fdpass::set_send_timeout(sock.as_fd(), config.send_timeout) {
            log::warn!("api socket: SO_SNDTIMEO: {e}");
        }
        let conn = Arc::new(Conn::new(sock));
        {
            let mut list = lock(conns);
            list.retain(|c| c.strong_count() > 0);
            list.push(Arc::downgrade(&conn));
        }
        workers.retain(|w| !w.is_finished());
        let api = api.clone();
        match std::thread::Builder::new()
            .name("remio-api-conn".into())
            .spawn(move || serve(&conn, &*api))
        {
            Ok(w) => workers.push(w),
            Err(e) => log::error!("api socket: cannot start a connection thread: {e}"),
        }
    }
    workers
}

thread_local! {
    static REPLY_BUF: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(MAX_MESSAGE));
}

/// One connection: the socket, its session once OPEN succeeded, and the ATTACHes waiting.
struct Conn {
    sock: OwnedFd,
    session: OnceLock<Arc<dyn DmSession>>,
    /// Whether the session delivers through a notifier (else the pump thread attaches).
    notified: AtomicBool,
    waiters: Mutex<Waiters>,
    /// Wakes the pump thread (sessions without a notifier).
    pump_cv: Condvar,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("sock", &self.sock)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Waiters {
    /// `(opcode, tag)` of each ATTACH waiting, oldest first.
    queue: VecDeque<(u16, u32)>,
    closed: bool,
}

impl Conn {
    fn new(sock: OwnedFd) -> Self {
        Self {
            sock,
            session: OnceLock::new(),
            notified: AtomicBool::new(false),
            waiters: Mutex::new(Waiters {
                queue: VecDeque::with_capacity(MAX_IN_FLIGHT),
                closed: false,
            }),
            pump_cv: Condvar::new(),
        }
    }

    fn shutdown(&self) {
        // SAFETY: shutdown(2) on a socket we own; the reader thread sees end of stream.
        unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// Sends a reply; a failure (peer gone, or not reading for `send_timeout`) ends the
    /// connection.
    fn reply(
        &self,
        opcode: u16,
        tag: u32,
        result: Result<&ReplyBody, i32>,
        fd: Option<BorrowedFd<'_>>,
    ) {
        let r = REPLY_BUF.with(|b| {
            let mut buf = b.borrow_mut();
            wire::encode_reply(opcode, tag, result, &mut buf);
            let fds: &[BorrowedFd<'_>] = match &fd {
                Some(f) => std::slice::from_ref(f),
                None => &[],
            };
            fdpass::send_msg(self.sock.as_fd(), &buf, fds)
        });
        if let Err(e) = r {
            log::warn!("api socket: reply not delivered ({e}); closing the connection");
            self.shutdown();
        }
    }

    fn error(&self, opcode: u16, tag: u32, e: &ApiError) {
        self.reply(opcode, tag, Err(e.errno()), None);
    }

    /// Hands queued requests to waiting ATTACHes (the notifier's body).
    fn deliver(&self) {
        let Some(session) = self.session.get() else {
            return;
        };
        loop {
            let mut w = lock(&self.waiters);
            let Some(&(opcode, tag)) = w.queue.front() else {
                return;
            };
            match session.try_attach() {
                Ok(Some(req)) => {
                    w.queue.pop_front();
                    drop(w);
                    self.reply(opcode, tag, Ok(&ReplyBody::Request(req)), None);
                }
                Ok(None) => return,
                Err(e) => {
                    w.queue.pop_front();
                    drop(w);
                    self.error(opcode, tag, &e);
                }
            }
        }
    }

    /// An ATTACH (or the attach half of COMPLETE_ATTACH): answered now if a request is queued,
    /// else remembered until one is.
    fn attach(&self, session: &Arc<dyn DmSession>, opcode: u16, tag: u32) {
        let mut w = lock(&self.waiters);
        if w.queue.len() >= MAX_IN_FLIGHT {
            drop(w);
            self.error(
                opcode,
                tag,
                &ApiError::Busy("too many ATTACH waiting".into()),
            );
            return;
        }
        if !self.notified.load(Ordering::Acquire) {
            w.queue.push_back((opcode, tag));
            self.pump_cv.notify_one();
            return;
        }
        match session.try_attach() {
            Ok(Some(req)) => {
                drop(w);
                self.reply(opcode, tag, Ok(&ReplyBody::Request(req)), None);
            }
            Ok(None) => w.queue.push_back((opcode, tag)),
            Err(e) => {
                drop(w);
                self.error(opcode, tag, &e);
            }
        }
    }
}

/// Serves one connection until it closes; then drops its session.
fn serve(conn: &Arc<Conn>, api: &dyn DmApi) {
    let mut buf = [0u8; MAX_MESSAGE + 1];
    let mut pump: Option<JoinHandle<()>> = None;
    loop {
        let r = match fdpass::recv_msg(conn.sock.as_fd(), &mut buf) {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                log::debug!("api socket: receive failed: {e}");
                break;
            }
        };
        let msg = &buf[..r.len];
        if r.truncated || r.fds_truncated {
            // The packet is whole-or-nothing; answer it if its header is readable.
            match wire::Header::decode(msg) {
                Some(h) if r.len >= HEADER_SIZE => {
                    let errno = if r.truncated {
                        libc::EINVAL
                    } else {
                        libc::EBADF
                    };
                    conn.reply(h.opcode, h.tag, Err(errno), None);
                    continue;
                }
                _ => {
                    log::warn!("api socket: corrupt oversized packet; closing the connection");
                    break;
                }
            }
        }
        let (tag, req) = match wire::decode_request(msg, r.fds.len()) {
            Ok(d) => d,
            Err(e) => match e.reply() {
                Some((opcode, tag, errno)) => {
                    conn.reply(opcode, tag, Err(errno), None);
                    continue;
                }
                None => {
                    log::warn!("api socket: {e}; closing the connection");
                    break;
                }
            },
        };
        let fd = r.fds.into_iter().next();
        handle(conn, api, tag, req, fd, &mut pump);
    }
    // End of the session: stop deliveries, fail whatever waits, drop the session.
    if let Some(session) = conn.session.get() {
        if conn.notified.load(Ordering::Acquire) {
            let _ = session.set_notifier(None);
        }
    }
    {
        let mut w = lock(&conn.waiters);
        w.closed = true;
        w.queue.clear();
        conn.pump_cv.notify_all();
    }
    conn.shutdown();
    if let Some(p) = pump {
        // The pump exits when its blocking attach returns (see `pump_loop`).
        drop(p);
    }
}

fn handle(
    conn: &Arc<Conn>,
    api: &dyn DmApi,
    tag: u32,
    req: Request,
    fd: Option<OwnedFd>,
    pump: &mut Option<JoinHandle<()>>,
) {
    let opcode = req.opcode();
    let session = match (&req, conn.session.get()) {
        (Request::Open { dm_id }, None) => {
            open(conn, api, tag, *dm_id, pump);
            return;
        }
        (Request::Open { .. }, Some(_)) => {
            conn.error(opcode, tag, &ApiError::Protocol("OPEN twice".into()));
            return;
        }
        (_, None) => {
            conn.error(opcode, tag, &ApiError::Protocol("no OPEN yet".into()));
            return;
        }
        (_, Some(s)) => s.clone(),
    };
    let result: crate::Result<ReplyBody> = match req {
        Request::Open { .. } => return,
        Request::Attach => {
            conn.attach(&session, opcode, tag);
            return;
        }
        Request::CompleteAttach(r) => {
            if let Err(e) = session.complete(&r) {
                conn.error(opcode, tag, &e);
            } else {
                conn.attach(&session, opcode, tag);
            }
            return;
        }
        Request::Complete(r) => session.complete(&r).map(|()| ReplyBody::Empty),
        Request::Ioeventfd(io) => eventfd(fd).and_then(|efd| {
            const KNOWN: u32 = BAO_IOEVENTFD_FLAG_DATAMATCH | BAO_IOEVENTFD_FLAG_DEASSIGN;
            if io.flags & !KNOWN != 0 || io.reserved != 0 {
                return Err(ApiError::InvalidArgument("ioeventfd flags".into()));
            }
            let spec = IoeventfdSpec {
                addr: io.addr,
                len: io.len,
                datamatch: (io.flags & BAO_IOEVENTFD_FLAG_DATAMATCH != 0).then_some(io.data),
            };
            if io.flags & BAO_IOEVENTFD_FLAG_DEASSIGN != 0 {
                session.deassign_ioeventfd(&efd, spec)
            } else {
                session.assign_ioeventfd(&efd, spec)
            }
            .map(|()| ReplyBody::Empty)
        }),
        Request::Irqfd(irq) => eventfd(fd).and_then(|efd| {
            if irq.flags & !BAO_IRQFD_FLAG_DEASSIGN != 0 {
                return Err(ApiError::InvalidArgument("irqfd flags".into()));
            }
            if irq.flags & BAO_IRQFD_FLAG_DEASSIGN != 0 {
                session.deassign_irqfd(&efd)
            } else {
                session.assign_irqfd(&efd)
            }
            .map(|()| ReplyBody::Empty)
        }),
        Request::MapShmem { len } => {
            match shmem_file(&*session, len) {
                Ok((file, offset)) => {
                    let body = ReplyBody::Shmem { offset, len };
                    conn.reply(opcode, tag, Ok(&body), Some(file.as_fd()));
                }
                Err(e) => conn.error(opcode, tag, &e),
            }
            return;
        }
    };
    match result {
        Ok(body) => conn.reply(opcode, tag, Ok(&body), None),
        Err(e) => conn.error(opcode, tag, &e),
    }
}

fn open(
    conn: &Arc<Conn>,
    api: &dyn DmApi,
    tag: u32,
    dm_id: u32,
    pump: &mut Option<JoinHandle<()>>,
) {
    let session: Arc<dyn DmSession> = match api.open(dm_id) {
        Ok(s) => Arc::from(s),
        Err(e) => {
            conn.error(wire::op::OPEN, tag, &e);
            return;
        }
    };
    let info = session.info();
    if conn.session.set(session.clone()).is_err() {
        conn.error(
            wire::op::OPEN,
            tag,
            &ApiError::Protocol("OPEN twice".into()),
        );
        return;
    }
    let weak = Arc::downgrade(conn);
    let notifier: Notifier = Arc::new(move || {
        if let Some(c) = weak.upgrade() {
            c.deliver();
        }
    });
    match session.set_notifier(Some(notifier)) {
        Ok(()) => {
            conn.notified.store(true, Ordering::Release);
            // A request may have been queued before the notifier was in place.
            conn.deliver();
        }
        Err(_) => {
            let (c, s) = (conn.clone(), session);
            match std::thread::Builder::new()
                .name("remio-api-pump".into())
                .spawn(move || pump_loop(&c, &*s))
            {
                Ok(p) => *pump = Some(p),
                Err(e) => log::error!("api socket: cannot start the attach pump: {e}"),
            }
        }
    }
    let body = ReplyBody::Info(remio_abi::DmInfo {
        id: info.id,
        padding: 0,
        shmem_addr: info.shmem_addr,
        shmem_size: info.shmem_size,
        irq: info.irq,
        fd: -1,
    });
    conn.reply(wire::op::OPEN, tag, Ok(&body), None);
}

/// For sessions without a notifier: one thread blocks in `attach` while an ATTACH waits.
/// It ends when the connection closes and its blocking `attach` returns; a session whose
/// `attach` never returns keeps this thread (and the session) until the DM shuts down.
fn pump_loop(conn: &Conn, session: &dyn DmSession) {
    loop {
        {
            let mut w = lock(&conn.waiters);
            while w.queue.is_empty() && !w.closed {
                w = conn.pump_cv.wait(w).unwrap_or_else(PoisonError::into_inner);
            }
            if w.closed {
                return;
            }
        }
        let got = session.attach();
        let waiter = lock(&conn.waiters).queue.pop_front();
        match (waiter, got) {
            (Some((opcode, tag)), Ok(req)) => {
                conn.reply(opcode, tag, Ok(&ReplyBody::Request(req)), None);
            }
            (Some((opcode, tag)), Err(e)) => conn.error(opcode, tag, &e),
            (None, Ok(req)) => {
                // The connection closed meanwhile: nobody will complete it, so do it here.
                let mut done = req;
                if done.op == remio_abi::uapi::BAO_IO_READ {
                    done.value = 0;
                }
                let _ = session.complete(&done);
            }
            (None, Err(_)) => {}
        }
    }
}

/// Checks that `fd` is an eventfd and takes ownership of it as one.
fn eventfd(fd: Option<OwnedFd>) -> crate::Result<EventFd> {
    let fd = fd.ok_or_else(|| ApiError::BadFd("no fd attached".into()))?;
    match fdpass::eventfd_identity(fd.as_fd()) {
        Ok(Some(_)) => {}
        Ok(None) => return Err(ApiError::BadFd("not an eventfd".into())),
        Err(e) => return Err(ApiError::BadFd(format!("cannot inspect the fd: {e}"))),
    }
    // SAFETY: the raw fd comes from an OwnedFd given up here, so EventFd owns it alone.
    Ok(unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) })
}

/// The file behind the session's shared memory and its offset, for the client to map.
fn shmem_file(session: &dyn DmSession, len: u64) -> crate::Result<(OwnedFd, u64)> {
    let mem = session.map_shmem(len)?;
    let region = mem
        .iter()
        .next()
        .ok_or_else(|| ApiError::NotSupported("no shared-memory region".into()))?;
    let fo = region
        .file_offset()
        .ok_or_else(|| ApiError::NotSupported("shared memory is not backed by a file".into()))?;
    let file = fo.file().try_clone()?;
    Ok((OwnedFd::from(file), fo.start()))
}
