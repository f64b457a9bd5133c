//! The platform side: serves any [`crate::DmApi`] on a socket path, one session a connection.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::fdpass;
use crate::wire::{self, ReplyBody, Request, HEADER_SIZE, MAX_IN_FLIGHT, MAX_MESSAGE};
use crate::{AccessWait, ApiError, DmApi, DmSession, IoeventfdSpec, Notifier, WaitHelper};
use remio_abi::uapi::{
    BAO_IOEVENTFD_FLAG_DATAMATCH, BAO_IOEVENTFD_FLAG_DEASSIGN, BAO_IRQFD_FLAG_DEASSIGN,
};

/// Who may connect, and how long a client may leave its replies untaken.
#[derive(Clone, Debug)]
pub struct SocketServerConfig {
    /// Peer uids allowed (checked with `SO_PEERCRED`). `None`: this process's effective uid
    /// and root.
    pub allowed_uids: Option<Vec<u32>>,
    /// A client that takes none of its replies for this long (it stopped reading: a device
    /// model that hangs, or is stopped) is dead: its connection ends, as if it had exited.
    ///
    /// No thread ever waits for a client to read: replies are sent without blocking, and
    /// those its socket has no room for wait in a queue of the connection (at most
    /// [`OUTBOUND_MAX`] packets; one more also makes the client dead), which the connection
    /// thread flushes when the socket has room again. So a device model that stops reading
    /// never delays the thread that hands it a request, which is often a frontend thread
    /// trapping for another device too.
    pub send_timeout: Duration,
}

/// Replies one connection may hold for a client that does not take them (see
/// [`SocketServerConfig::send_timeout`]): what a client may be owed at once — an answer to
/// each ATTACH it may hold waiting ([`MAX_IN_FLIGHT`]) and to the requests it sent meanwhile
/// — with room to spare. A client that lets more pile up is dead.
pub const OUTBOUND_MAX: usize = 4 * MAX_IN_FLIGHT;

/// What a [`SocketServer`] holds right now, and how many clients it gave up on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketServerStats {
    /// Connections open.
    pub connections: usize,
    /// ATTACHes held waiting for a request, over all connections.
    pub attach_waiting: usize,
    /// Replies waiting for their client to read (its socket was full), over all connections.
    pub replies_queued: usize,
    /// Clients declared dead because they stopped taking their replies (more than
    /// [`OUTBOUND_MAX`] owed, or none taken for [`SocketServerConfig::send_timeout`]).
    pub dead_clients: u64,
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
    dead_clients: Arc<AtomicU64>,
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
        let dead_clients = Arc::new(AtomicU64::new(0));
        let accept_thread = {
            let (listener, stop, conns) = (listener.clone(), stop.clone(), conns.clone());
            let dead = dead_clients.clone();
            std::thread::Builder::new()
                .name("remio-api-accept".into())
                .spawn(move || accept_loop(&listener, &stop, &conns, &api, &config, &dead))?
        };
        Ok(Self {
            path,
            listener,
            stop,
            conns,
            dead_clients,
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

    /// What the server holds now (a test waits for `attach_waiting` instead of sleeping until
    /// an ATTACH "has arrived").
    pub fn stats(&self) -> SocketServerStats {
        let mut st = SocketServerStats {
            dead_clients: self.dead_clients.load(Ordering::Relaxed),
            ..SocketServerStats::default()
        };
        for c in lock(&self.conns).iter().filter_map(Weak::upgrade) {
            st.connections += 1;
            st.attach_waiting += lock(&c.waiters).queue.len();
            st.replies_queued += lock(&c.out).queue.len();
        }
        st
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
    dead_clients: &Arc<AtomicU64>,
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
                    remio_ratelimit::warn_rl!(
                        "api socket: refused pid {} uid {} (not allowed)",
                        cred.pid,
                        cred.uid
                    );
                    continue;
                }
            }
            Err(e) => {
                remio_ratelimit::warn_rl!("api socket: no peer credentials: {e}");
                continue;
            }
        }
        let conn = match Conn::new(sock, config.send_timeout, dead_clients.clone()) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                log::error!("api socket: cannot set up a connection: {e}");
                continue;
            }
        };
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
    /// The connection (its address) whose control queue this thread last queued a request to,
    /// through the notifier: a frontend thread that has just done so may read that
    /// connection's answer itself ([`Conn::help`]).
    static QUEUED_ON: Cell<usize> = const { Cell::new(0) };
}

/// How long a frontend thread reading the connection ([`Conn::help`]) waits for one packet
/// before it hands reading back to the connection thread and sleeps as usual. A device model
/// answers a register access in microseconds; this only bounds the cases where the access is
/// completed by something else than the device model's answer (an in-process I/O client, the
/// DM's destruction).
const READER_TIMEOUT: Duration = Duration::from_millis(1);

/// A frontend thread reads the connection only if its access's deadline is further away than
/// this (the kernel rounds [`READER_TIMEOUT`] up to its tick), so that reading never delays
/// the hypervisor's timeout.
const READER_SLACK: Duration = Duration::from_millis(50);

/// While frontends take turns reading, the connection thread wakes at least this often to
/// re-arm its interest in the socket, which a leaving frontend may leave disarmed (see
/// [`Conn`]): the bound on how long a packet no frontend reads may wait then.
const IDLE_REARM_MS: i32 = 5;

/// epoll data of the socket (reading), of the kick eventfd and of the socket's duplicate
/// watched for room to write while replies are queued.
const EV_SOCK: u64 = 0;
const EV_KICK: u64 = 1;
const EV_OUT: u64 = 2;

/// One connection: the socket, its session once OPEN succeeded, and the ATTACHes waiting.
///
/// # Who reads the socket (leader/follower)
///
/// Packets are read and handled by one thread at a time, in arrival order: the *reader*. It is
/// either the connection thread ([`serve`]) or a frontend thread stalled on an access whose
/// request it has just queued to this connection's DM ([`Conn::help`], run through the
/// hypervisor's wait helper). A frontend reader reads with blocking `recvmsg` and handles
/// ATTACH, COMPLETE and COMPLETE_ATTACH itself (what the notifier already does on frontend
/// threads), so the device model's answer wakes the stalled frontend directly instead of
/// waking the connection thread, which then had to wake the frontend. Any other packet (or one
/// that does not decode) it *stashes* for the connection thread and stops reading.
///
/// The connection thread waits in `epoll_wait`, on the socket (`EPOLLIN | EPOLLONESHOT`: an
/// event disarms the interest until it is re-armed) and on `kick` (level-triggered), and reads
/// with `MSG_DONTWAIT`. `SOCK_SEQPACKET` wakes every epoll waiter but only the first blocked
/// reader, so a frontend that reads disarms the connection thread's interest for that time.
///
/// The protocol, all under `reader` (whose flags say who reads):
///
/// - A frontend takes the role only if nobody has it (`!server && !frontend`), nothing is
///   stashed and the connection is not `closed`; it then disarms the socket's interest
///   (`EPOLL_CTL_MOD` to no event) unless it is disarmed already (`armed`). Otherwise it
///   returns and sleeps as before (a frontend that queued a request but does not read because
///   its deadline is near arms the interest if nobody reads).
/// - It reads until its request is COMPLETE, a read waited [`READER_TIMEOUT`], its deadline is
///   near, the stream ends or fails, or a packet must be stashed. Then it gives the role back:
///   clears `frontend`, stores the stash if any, and re-arms the interest. Re-arming checks the
///   socket's current state (level), so a packet that arrived meanwhile, or the end of the
///   stream, wakes the connection thread; a stash is signalled through `kick`.
/// - *Deferred re-arm*: re-arming costs a system call on the critical path of every access, as
///   does the next frontend's disarm. So a leaving frontend leaves the interest disarmed when
///   no answer is due — the device model holds no request (`at_dm` = 0: requests handed out
///   minus completions) and one of its threads waits in ATTACH (so the next request is handed
///   out by the notifier of the frontend that queues it, which then reads) — provided the
///   connection thread sleeps with a timeout (`timed`): it then wakes within
///   [`IDLE_REARM_MS`], takes the role if free, reads what is there and re-arms. The
///   connection thread sleeps timed while frontends took turns in its last period and without
///   a timeout once a whole period passed without one; a frontend that would defer while it
///   sleeps untimed re-arms and kicks it once, to switch it to timed sleeps.
/// - The connection thread, woken by any of these, takes the role if no frontend has it (else
///   it waits again: its interest stays disarmed, and the frontend re-arms it when it leaves
///   or leaves it to the next timed wake), handles the stash first (arrival order), reads until
///   `EAGAIN`, then gives the role back and re-arms. At the end of the stream (or a fatal
///   packet) it keeps the role, sets `closed` (no frontend takes the role again), removes the
///   wait helper and waits until no helper call is running (`gate`), then ends the session as
///   before.
///
/// Invariants: (1) at most one thread reads or handles packets (the role is exclusive), so
/// packets are handled once, in order; (2) whenever nobody holds the role and the connection
/// is open, the socket's interest is armed, or the connection thread is awake and about to
/// take the role, or (deferred) the device model holds no request and the connection thread
/// sleeps at most [`IDLE_REARM_MS`]; so no packet is left unread, an answer a stalled
/// frontend waits for is never left to the timed wake (it is counted in `at_dm` before its
/// request is sent, so the reader leaving after that re-arms; a frontend that queues a
/// request and does not read arms), and the end of the stream is always seen by the
/// connection thread (within [`IDLE_REARM_MS`] if nothing was due), which alone ends the
/// session (a kill -9 of the device model behaves as before); (3) a frontend reads at most
/// [`READER_TIMEOUT`] past its last packet and never past `deadline - READER_SLACK`, so the
/// hypervisor's timeout still bounds every access (the replies it sends never block: see
/// [`Conn::reply`]). One exception to "never left to the timed
/// wake": a request handed out by a thread that is not a stalled frontend (the notifier run
/// by a DM lifecycle operation such as `resume`) while the interest is deferred is answered
/// within [`IDLE_REARM_MS`].
struct Conn {
    sock: OwnedFd,
    /// A duplicate of `sock`, in the epoll set for `EPOLLOUT` (data [`EV_OUT`], one-shot)
    /// while replies are queued: its own registration, apart from the reading protocol's.
    out_fd: OwnedFd,
    /// The connection thread's epoll set: `sock` (data [`EV_SOCK`]), `kick` ([`EV_KICK`]) and
    /// `out_fd` ([`EV_OUT`]).
    epoll: Epoll,
    /// Replies the client has not taken yet. A leaf lock: nothing else is locked under it.
    out: Mutex<Outbound>,
    /// See [`SocketServerConfig::send_timeout`].
    send_timeout: Duration,
    /// The server's count of clients declared dead.
    dead_clients: Arc<AtomicU64>,
    /// Signalled when a frontend reader stashed a packet for the connection thread.
    kick: EventFd,
    /// Who reads the socket (see above). Taken with no other lock of this connection held,
    /// except that `waiters` may be taken while handling a packet under the role (not the
    /// lock).
    reader: Mutex<Reader>,
    /// Requests handed to the device model and not completed yet (an estimate the device
    /// model can only push up, by not completing: then every frontend re-arms, as without the
    /// deferral).
    at_dm: AtomicUsize,
    /// Counts wait-helper calls running on frontend threads, so that the session's end waits
    /// for them (none then holds this connection).
    gate: Arc<HelperGate>,
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

/// Who reads the socket; see [`Conn`].
#[derive(Default)]
struct Reader {
    /// The connection thread reads.
    server: bool,
    /// A frontend thread reads.
    frontend: bool,
    /// The session is ending: no frontend reads any more.
    closed: bool,
    /// A packet a frontend reader read but left to the connection thread.
    stashed: Option<Stashed>,
    /// The connection thread's interest in the socket is armed (or its one-shot event fired
    /// and the connection thread has yet to see it).
    armed: bool,
    /// The connection thread sleeps (or is about to) with a timeout of [`IDLE_REARM_MS`]: a
    /// leaving frontend may then leave the interest disarmed. Only the connection thread sets
    /// it.
    timed: bool,
    /// Frontend turns taken (activity, for the connection thread to choose `timed`).
    takes: u64,
    /// `kick` was written and the connection thread has not woken since.
    kicked: bool,
}

impl Reader {
    /// The connection thread woke (`fired`: its socket event fired; `takes_seen`: the
    /// frontend turns counted at its previous wake). Returns `None` when a frontend reads (the
    /// thread waits again; that frontend re-arms the interest when it leaves, or leaves it to
    /// the next timed wake), else takes the role and returns the stashed packet, if any.
    ///
    /// On every wake the thread chooses how it sleeps next: timed if frontends took turns
    /// since the previous wake, untimed if a whole period passed without one. Also on a wake
    /// that finds a frontend reading: the kick that asks for timed sleeps usually lands while
    /// the next frontend reads, and were that wake not counted the thread would sleep untimed
    /// for good, and every frontend would re-arm the interest and the next disarm it (two
    /// `epoll_ctl` per access).
    fn woke(&mut self, fired: bool, takes_seen: &mut u64) -> Option<Option<Stashed>> {
        if fired {
            self.armed = false;
        }
        self.timed = self.takes != *takes_seen;
        *takes_seen = self.takes;
        self.kicked = false;
        if self.frontend {
            return None;
        }
        self.server = true;
        Some(self.stashed.take())
    }
}

/// Replies waiting for a client whose socket was full, in order; see [`Conn::reply`].
#[derive(Default)]
struct Outbound {
    queue: VecDeque<Queued>,
    /// Since when the client has taken none of them (set while `queue` is not empty).
    stalled_since: Option<Instant>,
    /// The connection was given up (dead client, or a send failed): nothing is sent any more.
    closed: bool,
}

/// A reply waiting in [`Outbound`]: its bytes and the fd it carries (a duplicate).
struct Queued {
    bytes: Vec<u8>,
    fd: Option<OwnedFd>,
}

/// A packet read by a frontend reader and left to the connection thread.
struct Stashed {
    bytes: Vec<u8>,
    recv: fdpass::Received,
}

/// Wait-helper calls in progress; closed at the session's end.
#[derive(Default)]
struct HelperGate {
    /// (closed, calls running)
    state: Mutex<(bool, usize)>,
    idle: Condvar,
}

impl HelperGate {
    fn enter(&self) -> bool {
        let mut g = lock(&self.state);
        if g.0 {
            return false;
        }
        g.1 += 1;
        true
    }

    fn exit(&self) {
        let mut g = lock(&self.state);
        g.1 -= 1;
        if g.0 && g.1 == 0 {
            self.idle.notify_all();
        }
    }

    /// Refuses new calls and waits until none runs.
    fn close_and_wait(&self) {
        let mut g = lock(&self.state);
        g.0 = true;
        while g.1 > 0 {
            g = self.idle.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

#[derive(Default)]
struct Waiters {
    /// `(opcode, tag)` of each ATTACH waiting, oldest first.
    queue: VecDeque<(u16, u32)>,
    closed: bool,
}

impl Conn {
    fn new(
        sock: OwnedFd,
        send_timeout: Duration,
        dead_clients: Arc<AtomicU64>,
    ) -> io::Result<Self> {
        fdpass::set_recv_timeout(sock.as_fd(), READER_TIMEOUT)?;
        let out_fd = sock.try_clone()?;
        let epoll = Epoll::new()?;
        let kick = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        epoll.ctl(
            ControlOperation::Add,
            sock.as_raw_fd(),
            EpollEvent::new(EPOLL_ARMED, EV_SOCK),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, EV_KICK),
        )?;
        // Disarmed until a reply is queued.
        epoll.ctl(
            ControlOperation::Add,
            out_fd.as_raw_fd(),
            EpollEvent::new(EventSet::ONE_SHOT, EV_OUT),
        )?;
        Ok(Self {
            sock,
            out_fd,
            epoll,
            out: Mutex::new(Outbound::default()),
            send_timeout,
            dead_clients,
            kick,
            reader: Mutex::new(Reader {
                armed: true,
                ..Reader::default()
            }),
            at_dm: AtomicUsize::new(0),
            gate: Arc::default(),
            session: OnceLock::new(),
            notified: AtomicBool::new(false),
            waiters: Mutex::new(Waiters {
                queue: VecDeque::with_capacity(MAX_IN_FLIGHT),
                closed: false,
            }),
            pump_cv: Condvar::new(),
        })
    }

    /// Sets the connection thread's interest in the socket (`EPOLL_CTL_MOD`).
    fn interest(&self, events: EventSet) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Modify,
            self.sock.as_raw_fd(),
            EpollEvent::new(events, EV_SOCK),
        )
    }

    /// Blocks the connection thread until the socket or `kick` has an event (clearing `kick`)
    /// or `timeout_ms` passed (-1: never). Returns whether the socket's event fired (which
    /// disarmed the one-shot interest).
    fn wait_event(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut events = [EpollEvent::default(); 3];
        let n = loop {
            match self.epoll.wait(timeout_ms, &mut events) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        if events[..n].iter().any(|e| e.data() == EV_KICK) {
            // Non-blocking: a concurrent clear leaves nothing to read, which is fine.
            let _ = self.kick.read();
        }
        Ok(events[..n].iter().any(|e| e.data() == EV_SOCK))
    }

    /// A frontend thread's turn as the reader (the wait helper's body; see [`Conn`]): reads
    /// and handles packets until `w`'s request is COMPLETE, or hands back at once if it should
    /// not read.
    fn help(&self, w: &dyn AccessWait) {
        let me = std::ptr::from_ref(self) as usize;
        if QUEUED_ON.with(|q| q.replace(0)) != me {
            return;
        }
        let near = |d: Instant| d.saturating_duration_since(Instant::now()) <= READER_SLACK;
        if w.is_complete() {
            return;
        }
        if w.deadline().is_some_and(near) {
            // Not reading: the answer must wake the connection thread.
            self.ensure_armed();
            return;
        }
        if !self.take_reader() {
            // Whoever reads sees `at_dm` > 0 (counted before this attempt) and re-arms.
            return;
        }
        let mut buf = [0u8; MAX_MESSAGE + 1];
        let mut stash = None;
        while !w.is_complete() && !w.deadline().is_some_and(near) {
            // Blocks at most READER_TIMEOUT (SO_RCVTIMEO). End of stream, timeout or error:
            // give the role back; the connection thread sees the socket's state.
            let Ok(Some(r)) = fdpass::recv_msg(self.sock.as_fd(), &mut buf) else {
                break;
            };
            if let Some(s) = self.handle_in_frontend(&buf, r) {
                stash = Some(s);
                break;
            }
        }
        self.leave_reader(stash);
    }

    fn take_reader(&self) -> bool {
        let mut rd = lock(&self.reader);
        if rd.server || rd.frontend || rd.closed || rd.stashed.is_some() {
            return false;
        }
        // Disarmed: only EPOLLERR/EPOLLHUP remain, and EPOLLONESHOT limits those to one wake
        // of the connection thread, which then finds the role taken and waits again. Left
        // disarmed by the previous frontend: nothing to do.
        if rd.armed {
            if let Err(e) = self.interest(EventSet::ONE_SHOT) {
                log::debug!("api socket: epoll_ctl: {e}");
                return false;
            }
            rd.armed = false;
        }
        rd.frontend = true;
        rd.takes = rd.takes.wrapping_add(1);
        true
    }

    /// Arms the connection thread's interest unless someone reads (who will) or it is armed.
    fn ensure_armed(&self) {
        let mut rd = lock(&self.reader);
        if rd.armed || rd.frontend || rd.server || rd.closed {
            return;
        }
        match self.interest(EPOLL_ARMED) {
            Ok(()) => rd.armed = true,
            Err(e) => {
                log::warn!("api socket: epoll_ctl: {e}");
                drop(rd);
                self.wake_server();
            }
        }
    }

    /// The device model completed a request it held.
    fn completed(&self) {
        let _ = self
            .at_dm
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    fn wake_server(&self) {
        if let Err(e) = self.kick.write(1) {
            log::error!("api socket: cannot wake the connection thread: {e}");
        }
    }

    fn leave_reader(&self, stash: Option<Stashed>) {
        let mut kick = stash.is_some();
        {
            let mut rd = lock(&self.reader);
            rd.frontend = false;
            rd.stashed = stash;
            // Nothing the device model holds, and a thread of it waits in ATTACH (so a new
            // request is handed out by the notifier of the frontend that queues it, which then
            // reads): no answer is due. The interest may stay disarmed if the connection
            // thread wakes on its own within IDLE_REARM_MS; the next frontend then need not
            // disarm it.
            let quiet = !kick
                && self.at_dm.load(Ordering::SeqCst) == 0
                && !lock(&self.waiters).queue.is_empty();
            let defer = quiet && rd.timed;
            if !defer && !rd.armed {
                match self.interest(EPOLL_ARMED) {
                    Ok(()) => rd.armed = true,
                    Err(e) => {
                        // Wake the connection thread anyway: it reads and re-arms itself.
                        log::warn!("api socket: epoll_ctl: {e}");
                        kick = true;
                    }
                }
            }
            // Frontends are busy but the connection thread sleeps without a timeout: wake it
            // once so that it switches to timed sleeps and later frontends can defer.
            if quiet && !rd.timed && !rd.kicked {
                kick = true;
            }
            if kick {
                rd.kicked = true;
            }
        }
        if kick {
            self.wake_server();
        }
    }

    /// Handles a packet on a frontend reader if it is ATTACH, COMPLETE or COMPLETE_ATTACH;
    /// otherwise hands it back to be stashed.
    fn handle_in_frontend(&self, buf: &[u8], r: fdpass::Received) -> Option<Stashed> {
        let msg = &buf[..r.len];
        if !r.truncated && !r.fds_truncated && r.fds.is_empty() {
            if let (Ok((tag, req)), Some(session)) =
                (wire::decode_request(msg, 0), self.session.get())
            {
                // Anything else is re-decoded and handled by the connection thread.
                if handle_control(self, session, tag, req).is_ok() {
                    return None;
                }
            }
        }
        Some(Stashed {
            bytes: msg.to_vec(),
            recv: r,
        })
    }

    fn shutdown(&self) {
        // SAFETY: shutdown(2) on a socket we own; the reader thread sees end of stream.
        unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// Sends a reply, never blocking: if the client's socket is full (it stopped reading),
    /// the reply waits in the connection's queue for the connection thread to send when there
    /// is room ([`Conn::flush`]); replies always leave in order. A client owed more than
    /// [`OUTBOUND_MAX`] replies is dead, as is one whose socket fails: the connection ends.
    fn reply(
        &self,
        opcode: u16,
        tag: u32,
        result: Result<&ReplyBody, i32>,
        fd: Option<BorrowedFd<'_>>,
    ) {
        REPLY_BUF.with(|b| {
            let mut buf = b.borrow_mut();
            wire::encode_reply(opcode, tag, result, &mut buf);
            self.send_or_queue(&buf, fd);
        });
    }

    fn send_or_queue(&self, bytes: &[u8], fd: Option<BorrowedFd<'_>>) {
        let mut out = lock(&self.out);
        if out.closed {
            return;
        }
        if out.queue.is_empty() {
            let fds: &[BorrowedFd<'_>] = match &fd {
                Some(f) => std::slice::from_ref(f),
                None => &[],
            };
            match fdpass::send_msg_dontwait(self.sock.as_fd(), bytes, fds) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    self.give_up(&mut out, format_args!("reply not delivered ({e})"), false);
                    return;
                }
            }
        }
        if out.queue.len() >= OUTBOUND_MAX {
            self.give_up(
                &mut out,
                format_args!("the client left {OUTBOUND_MAX} replies untaken"),
                true,
            );
            return;
        }
        let fd = match fd.map(|f| f.try_clone_to_owned()).transpose() {
            Ok(fd) => fd,
            Err(e) => {
                self.give_up(
                    &mut out,
                    format_args!("cannot keep a reply's fd ({e})"),
                    false,
                );
                return;
            }
        };
        out.queue.push_back(Queued {
            bytes: bytes.to_vec(),
            fd,
        });
        if out.queue.len() == 1 {
            out.stalled_since = Some(Instant::now());
            self.arm_out(&mut out);
            // The connection thread now watches the client's progress (send_timeout).
            drop(out);
            self.wake_server();
        }
    }

    /// Watches the socket for room to write (one shot).
    fn arm_out(&self, out: &mut Outbound) {
        let ev = EpollEvent::new(EventSet::OUT | EventSet::ONE_SHOT, EV_OUT);
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Modify, self.out_fd.as_raw_fd(), ev)
        {
            self.give_up(out, format_args!("epoll_ctl: {e}"), false);
        }
    }

    /// Sends queued replies while the socket has room (the connection thread, on every wake);
    /// a client that has taken none for `send_timeout` is dead.
    fn flush(&self) {
        let mut out = lock(&self.out);
        if out.closed || out.queue.is_empty() {
            return;
        }
        while let Some(q) = out.queue.front() {
            let fds: Vec<BorrowedFd<'_>> = q.fd.iter().map(AsFd::as_fd).collect();
            match fdpass::send_msg_dontwait(self.sock.as_fd(), &q.bytes, &fds) {
                Ok(()) => {
                    out.queue.pop_front();
                    out.stalled_since = Some(Instant::now());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.give_up(&mut out, format_args!("reply not delivered ({e})"), false);
                    return;
                }
            }
        }
        if out.queue.is_empty() {
            out.stalled_since = None;
            return;
        }
        if out
            .stalled_since
            .is_some_and(|t| t.elapsed() >= self.send_timeout)
        {
            let secs = self.send_timeout.as_secs_f64();
            self.give_up(
                &mut out,
                format_args!("the client took no reply for {secs:.1} s"),
                true,
            );
            return;
        }
        self.arm_out(&mut out);
    }

    /// How long the connection thread may sleep before the client's stall must be checked
    /// (`None`: nothing is queued).
    fn flush_due(&self) -> Option<Duration> {
        let out = lock(&self.out);
        if out.closed {
            return None;
        }
        out.stalled_since
            .map(|t| self.send_timeout.saturating_sub(t.elapsed()))
    }

    /// Ends the connection: nothing more is sent, the queue is dropped, and the socket shut
    /// down, so the connection thread sees the end of the stream and ends the session.
    /// `dead`: the client stopped taking its replies (counted).
    fn give_up(&self, out: &mut Outbound, why: std::fmt::Arguments<'_>, dead: bool) {
        out.closed = true;
        out.queue.clear();
        out.stalled_since = None;
        if dead {
            self.dead_clients.fetch_add(1, Ordering::Relaxed);
        }
        remio_ratelimit::warn_rl!("api socket: {why}; closing the connection");
        self.shutdown();
        self.wake_server();
    }

    fn error(&self, opcode: u16, tag: u32, e: &ApiError) {
        self.reply(opcode, tag, Err(e.errno()), None);
    }

    /// Hands queued requests to waiting ATTACHes (the notifier's body).
    fn deliver(&self) {
        let Some(session) = self.session.get() else {
            return;
        };
        QUEUED_ON.with(|q| q.set(std::ptr::from_ref(self) as usize));
        loop {
            let mut w = lock(&self.waiters);
            let Some(&(opcode, tag)) = w.queue.front() else {
                return;
            };
            match session.try_attach() {
                Ok(Some(req)) => {
                    w.queue.pop_front();
                    drop(w);
                    self.at_dm.fetch_add(1, Ordering::SeqCst);
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
        if w.closed {
            return;
        }
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
                self.at_dm.fetch_add(1, Ordering::SeqCst);
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

/// Serves one connection until it closes; then drops its session. See [`Conn`] for how the
/// reading is shared with frontend threads.
fn serve(conn: &Arc<Conn>, api: &dyn DmApi) {
    let mut buf = [0u8; MAX_MESSAGE + 1];
    let mut pump: Option<JoinHandle<()>> = None;
    let mut takes_seen = 0u64;
    'conn: loop {
        let mut timeout = if lock(&conn.reader).timed {
            IDLE_REARM_MS
        } else {
            -1
        };
        if let Some(due) = conn.flush_due() {
            // Rounded up: waking before the deadline would only sleep again.
            let ms = i32::try_from(due.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
            timeout = if timeout < 0 { ms } else { timeout.min(ms) };
        }
        let fired = match conn.wait_event(timeout) {
            Ok(f) => f,
            Err(e) => {
                log::error!("api socket: epoll_wait: {e}; closing the connection");
                break;
            }
        };
        conn.flush();
        let Some(stashed) = lock(&conn.reader).woke(fired, &mut takes_seen) else {
            continue;
        };
        if let Some(st) = stashed {
            if !process(conn, api, &st.bytes, st.recv, &mut pump) {
                break;
            }
        }
        loop {
            match fdpass::recv_msg_dontwait(conn.sock.as_fd(), &mut buf) {
                Ok(Some(r)) => {
                    let len = r.len;
                    if !process(conn, api, &buf[..len], r, &mut pump) {
                        break 'conn;
                    }
                }
                Ok(None) => break 'conn,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::debug!("api socket: receive failed: {e}");
                    break 'conn;
                }
            }
        }
        let mut rd = lock(&conn.reader);
        rd.server = false;
        if !rd.armed {
            if let Err(e) = conn.interest(EPOLL_ARMED) {
                log::error!("api socket: epoll_ctl: {e}; closing the connection");
                rd.server = true;
                break;
            }
            rd.armed = true;
        }
    }
    // End of the session. No frontend reads from now on (`closed`), none runs the helper
    // (gate), so none holds this connection; then stop deliveries, fail whatever waits, drop
    // the session.
    lock(&conn.reader).closed = true;
    if let Some(session) = conn.session.get() {
        if conn.notified.load(Ordering::Acquire) {
            let _ = session.set_wait_helper(None);
        }
    }
    conn.gate.close_and_wait();
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

/// Handles one packet on the connection thread; false: close the connection.
fn process(
    conn: &Arc<Conn>,
    api: &dyn DmApi,
    msg: &[u8],
    r: fdpass::Received,
    pump: &mut Option<JoinHandle<()>>,
) -> bool {
    if r.truncated || r.fds_truncated {
        // The packet is whole-or-nothing; answer it if its header is readable.
        return match wire::Header::decode(msg) {
            Some(h) if r.len >= HEADER_SIZE => {
                let errno = if r.truncated {
                    libc::EINVAL
                } else {
                    libc::EBADF
                };
                conn.reply(h.opcode, h.tag, Err(errno), None);
                true
            }
            _ => {
                remio_ratelimit::warn_rl!(
                    "api socket: corrupt oversized packet; closing the connection"
                );
                false
            }
        };
    }
    let (tag, req) = match wire::decode_request(msg, r.fds.len()) {
        Ok(d) => d,
        Err(e) => {
            return match e.reply() {
                Some((opcode, tag, errno)) => {
                    conn.reply(opcode, tag, Err(errno), None);
                    true
                }
                None => {
                    remio_ratelimit::warn_rl!("api socket: {e}; closing the connection");
                    false
                }
            }
        }
    };
    let fd = r.fds.into_iter().next();
    handle(conn, api, tag, req, fd, pump);
    true
}

/// ATTACH, COMPLETE and COMPLETE_ATTACH of an open session: what a frontend reader may handle
/// (it only completes requests, pops queued ones and sends replies, as the notifier does on
/// frontend threads). Any other request is handed back.
fn handle_control(
    conn: &Conn,
    session: &Arc<dyn DmSession>,
    tag: u32,
    req: Request,
) -> Result<(), Request> {
    let opcode = req.opcode();
    match req {
        Request::Attach => conn.attach(session, opcode, tag),
        Request::CompleteAttach(r) => {
            if let Err(e) = session.complete(&r) {
                conn.error(opcode, tag, &e);
            } else {
                conn.completed();
                conn.attach(session, opcode, tag);
            }
        }
        Request::Complete(r) => match session.complete(&r) {
            Ok(()) => {
                conn.completed();
                conn.reply(opcode, tag, Ok(&ReplyBody::Empty), None);
            }
            Err(e) => conn.error(opcode, tag, &e),
        },
        other => return Err(other),
    }
    Ok(())
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
    let req = match handle_control(conn, &session, tag, req) {
        Ok(()) => return,
        Err(req) => req,
    };
    let result: crate::Result<ReplyBody> = match req {
        Request::Open { .. }
        | Request::Attach
        | Request::CompleteAttach(_)
        | Request::Complete(_) => return,
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
            if irq.flags & !(BAO_IRQFD_FLAG_DEASSIGN | wire::IRQFD_FLAG_USED_BUFFER) != 0
                || irq.flags == BAO_IRQFD_FLAG_DEASSIGN | wire::IRQFD_FLAG_USED_BUFFER
            {
                return Err(ApiError::InvalidArgument("irqfd flags".into()));
            }
            if irq.flags & BAO_IRQFD_FLAG_DEASSIGN != 0 {
                session.deassign_irqfd(&efd)
            } else if irq.flags & wire::IRQFD_FLAG_USED_BUFFER != 0 {
                session.assign_used_buffer_irqfd(&efd)
            } else {
                session.assign_irqfd(&efd)
            }
            .map(|()| ReplyBody::Empty)
        }),
        Request::StatusWord {
            status_addr,
            ack_addr,
        } => {
            let spec = crate::StatusWordSpec {
                status_addr,
                ack_addr,
            };
            match session.register_status_word(spec) {
                Ok(sw) => {
                    let file = sw.page().file().as_fd();
                    conn.reply(opcode, tag, Ok(&ReplyBody::StatusWord), Some(file));
                }
                Err(e) => conn.error(opcode, tag, &e),
            }
            return;
        }
        Request::StateRegion { len } => {
            match session.state_region(len) {
                Ok(file) => {
                    conn.reply(opcode, tag, Ok(&ReplyBody::StateRegion), Some(file.as_fd()));
                }
                Err(e) => conn.error(opcode, tag, &e),
            }
            return;
        }
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
            // Frontend threads stalled on this DM may read the answers themselves (see
            // `Conn`). Without a helper (a platform that offers none) they sleep until this
            // connection's thread completes their requests, as before.
            let (weak, gate) = (Arc::downgrade(conn), conn.gate.clone());
            let helper: WaitHelper = Arc::new(move |w: &dyn AccessWait| {
                if !gate.enter() {
                    return;
                }
                if let Some(c) = weak.upgrade() {
                    c.help(w);
                }
                gate.exit();
            });
            if let Err(e) = session.set_wait_helper(Some(helper)) {
                log::debug!("api socket: no wait helper: {e}");
            }
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
                conn.at_dm.fetch_add(1, Ordering::SeqCst);
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

/// The connection thread's interest in the socket while nobody else reads it.
const EPOLL_ARMED: EventSet = EventSet::IN.union(EventSet::ONE_SHOT);

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

#[cfg(test)]
mod reader_tests {
    use super::Reader;

    #[test]
    fn a_wake_while_a_frontend_reads_switches_to_timed_sleeps() {
        // The kick a leaving frontend sent (frontends take turns, the thread sleeps untimed)
        // lands while the next frontend reads: the thread waits again, timed from now on.
        let mut rd = Reader {
            frontend: true,
            kicked: true,
            takes: 2,
            ..Reader::default()
        };
        let mut takes_seen = 0;
        assert!(rd.woke(false, &mut takes_seen).is_none());
        assert!(rd.timed && !rd.kicked && !rd.server);
        assert_eq!(takes_seen, 2);
        // A whole period without a turn: untimed again, and the role is free, so taken.
        rd.frontend = false;
        assert!(rd.woke(false, &mut takes_seen).is_some_and(|s| s.is_none()));
        assert!(!rd.timed && rd.server);
    }

    #[test]
    fn a_fired_wake_clears_armed_whoever_reads() {
        let mut rd = Reader {
            frontend: true,
            armed: true,
            ..Reader::default()
        };
        let mut takes_seen = 0;
        assert!(rd.woke(true, &mut takes_seen).is_none());
        assert!(!rd.armed);
    }
}
