//! The client side: a device-model process's [`crate::DmApi`] over the socket.

use std::cell::RefCell;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::fdpass;
use crate::wire::{self, ReplyBody, Request, MAX_IN_FLIGHT, MAX_MESSAGE};
use crate::{ApiError, DmApi, DmInfo, DmSession, IoeventfdSpec, Result, VirtioRequest};
use remio_abi::uapi::{
    BAO_IOEVENTFD_FLAG_DATAMATCH, BAO_IOEVENTFD_FLAG_DEASSIGN, BAO_IRQFD_FLAG_DEASSIGN,
};
use remio_abi::{Ioeventfd, Irqfd};

/// The device-model API reached through a [`crate::SocketServer`] at a path. Each
/// [`DmApi::open`] is a new connection.
#[derive(Debug, Clone)]
pub struct SocketApi {
    path: PathBuf,
}

impl SocketApi {
    /// A client of the server at `path`. Connects on [`DmApi::open`], not here.
    pub fn connect(path: impl AsRef<Path>) -> Self {
        Self {
            path: path.as_ref().to_owned(),
        }
    }
}

impl DmApi for SocketApi {
    fn open(&self, dm_id: u32) -> Result<Box<dyn DmSession>> {
        Ok(Box::new(SocketSession::open(&self.path, dm_id)?))
    }
}

thread_local! {
    static SEND_BUF: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(MAX_MESSAGE));
}

/// One DM session over one connection.
#[derive(Debug)]
pub struct SocketSession {
    info: DmInfo,
    conn: Conn,
    /// [`DmSession::shutdown`] was called: a lost connection is `ShuttingDown` to `attach`.
    shut: AtomicBool,
}

/// A reply and the fd that came with it.
type Answer = (ReplyBody, Option<OwnedFd>);

#[derive(Debug)]
struct Conn {
    sock: OwnedFd,
    state: Mutex<State>,
    cv: Condvar,
}

#[derive(Debug)]
struct State {
    /// A thread is reading the socket.
    reader: bool,
    /// The connection is unusable; every call fails with `Disconnected`.
    dead: bool,
    /// Threads blocked on `cv`.
    sleepers: usize,
    /// Per tag: `Some` while a caller waits, holding the reply once it arrived.
    slots: Vec<Option<Option<std::result::Result<Answer, i32>>>>,
    free: Vec<u32>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Conn {
    fn new(sock: OwnedFd) -> Self {
        let n = u32::try_from(MAX_IN_FLIGHT).unwrap_or(u32::MAX);
        Self {
            sock,
            state: Mutex::new(State {
                reader: false,
                dead: false,
                sleepers: 0,
                slots: (0..MAX_IN_FLIGHT).map(|_| None).collect(),
                free: (0..n).rev().collect(),
            }),
            cv: Condvar::new(),
        }
    }

    /// Sends `req` (with `fd`) and waits for its reply.
    fn call(&self, req: &Request, fd: Option<BorrowedFd<'_>>) -> Result<Answer> {
        let tag = {
            let mut st = lock(&self.state);
            loop {
                if st.dead {
                    return Err(ApiError::Disconnected);
                }
                if let Some(tag) = st.free.pop() {
                    st.slots[tag as usize] = Some(None);
                    break tag;
                }
                st.sleepers += 1;
                st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
                st.sleepers -= 1;
            }
        };
        let sent = SEND_BUF.with(|b| {
            let mut buf = b.borrow_mut();
            req.encode(tag, &mut buf);
            let fds: &[BorrowedFd<'_>] = match &fd {
                Some(f) => std::slice::from_ref(f),
                None => &[],
            };
            fdpass::send_msg(self.sock.as_fd(), &buf, fds)
        });
        if let Err(e) = sent {
            let mut st = lock(&self.state);
            st.slots[tag as usize] = None;
            st.free.push(tag);
            self.mark_dead(&mut st);
            log::debug!("api socket: send failed: {e}");
            return Err(ApiError::Disconnected);
        }
        self.wait(tag)
    }

    fn mark_dead(&self, st: &mut State) {
        st.dead = true;
        // SAFETY: shutdown(2) on a socket we own; it wakes a reader blocked in recvmsg.
        unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
        if st.sleepers > 0 {
            self.cv.notify_all();
        }
    }

    fn wait(&self, tag: u32) -> Result<Answer> {
        let t = tag as usize;
        let mut st = lock(&self.state);
        loop {
            if let Some(Some(answer)) = st.slots[t].take() {
                st.free.push(tag);
                if st.sleepers > 0 {
                    self.cv.notify_all();
                }
                return answer.map_err(|errno| ApiError::from_errno(errno, "socket request"));
            }
            st.slots[t] = Some(None);
            if st.dead {
                st.slots[t] = None;
                st.free.push(tag);
                return Err(ApiError::Disconnected);
            }
            if st.reader {
                st.sleepers += 1;
                st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
                st.sleepers -= 1;
                continue;
            }
            st.reader = true;
            drop(st);
            let got = self.read_one();
            st = lock(&self.state);
            st.reader = false;
            match got {
                Ok((rtag, answer)) => {
                    let slot = st.slots.get_mut(rtag as usize);
                    match slot {
                        Some(s @ Some(None)) => *s = Some(Some(answer)),
                        _ => {
                            remio_ratelimit::warn_rl!(
                                "api socket: reply for a tag nobody waits for; closing"
                            );
                            self.mark_dead(&mut st);
                        }
                    }
                }
                Err(e) => {
                    log::debug!("api socket: connection lost: {e}");
                    self.mark_dead(&mut st);
                }
            }
            if st.sleepers > 0 {
                self.cv.notify_all();
            }
        }
    }

    fn read_one(&self) -> std::result::Result<(u32, std::result::Result<Answer, i32>), String> {
        let mut buf = [0u8; MAX_MESSAGE + 1];
        let r = fdpass::recv_msg(self.sock.as_fd(), &mut buf)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "closed by the platform".to_owned())?;
        if r.truncated || r.fds_truncated {
            return Err("oversized reply".into());
        }
        let reply = wire::decode_reply(&buf[..r.len], r.fds.len()).map_err(|e| e.to_string())?;
        let mut fds = r.fds;
        Ok((reply.tag, reply.result.map(|b| (b, fds.pop()))))
    }
}

impl SocketSession {
    /// Connects to the server at `path` and opens DM `dm_id`.
    pub fn open(path: &Path, dm_id: u32) -> Result<Self> {
        let sock = fdpass::connect(path)?;
        let conn = Conn::new(sock);
        let info = match conn.call(&Request::Open { dm_id }, None) {
            Ok((ReplyBody::Info(i), _)) => i,
            Ok(_) => {
                return Err(ApiError::Protocol(
                    "OPEN answered with another reply".into(),
                ))
            }
            Err(ApiError::NotFound(_)) => return Err(ApiError::NoSuchDm(dm_id)),
            Err(e) => return Err(e),
        };
        Ok(Self {
            info: DmInfo {
                id: info.id,
                shmem_addr: info.shmem_addr,
                shmem_size: info.shmem_size,
                irq: info.irq,
            },
            conn,
            shut: AtomicBool::new(false),
        })
    }

    fn expect_request(&self, req: &Request) -> Result<VirtioRequest> {
        match self.conn.call(req, None) {
            Ok((ReplyBody::Request(r), _)) => Ok(r),
            Ok(_) => Err(ApiError::Protocol("expected a request in the reply".into())),
            Err(_) if self.shut.load(Ordering::Acquire) => Err(ApiError::ShuttingDown),
            Err(e) => Err(e),
        }
    }

    fn expect_empty(&self, req: &Request, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        match self.conn.call(req, fd)? {
            (ReplyBody::Empty, _) => Ok(()),
            _ => Err(ApiError::Protocol("expected an empty reply".into())),
        }
    }

    fn ioeventfd(&self, fd: &EventFd, spec: IoeventfdSpec, deassign: bool) -> Result<()> {
        let mut flags = if deassign {
            BAO_IOEVENTFD_FLAG_DEASSIGN
        } else {
            0
        };
        if spec.datamatch.is_some() {
            flags |= BAO_IOEVENTFD_FLAG_DATAMATCH;
        }
        let req = Request::Ioeventfd(Ioeventfd {
            fd: 0,
            flags,
            addr: spec.addr,
            len: spec.len,
            reserved: 0,
            data: spec.datamatch.unwrap_or(0),
        });
        // SAFETY: `fd` outlives the call that uses the borrow.
        let b = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
        self.expect_empty(&req, Some(b))
    }

    fn irqfd(&self, fd: &EventFd, flags: u32) -> Result<()> {
        let req = Request::Irqfd(Irqfd { fd: 0, flags });
        // SAFETY: `fd` outlives the call that uses the borrow.
        let b = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
        self.expect_empty(&req, Some(b))
    }
}

impl Drop for SocketSession {
    fn drop(&mut self) {
        // SAFETY: shutdown(2) on a socket we own, so the server sees the session end now.
        unsafe { libc::shutdown(self.conn.sock.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

impl DmSession for SocketSession {
    fn info(&self) -> DmInfo {
        self.info
    }

    fn attach(&self) -> Result<VirtioRequest> {
        self.expect_request(&Request::Attach)
    }

    fn complete(&self, req: &VirtioRequest) -> Result<()> {
        self.expect_empty(&Request::Complete(*req), None)
    }

    fn complete_and_attach(&self, req: &VirtioRequest) -> Result<VirtioRequest> {
        self.expect_request(&Request::CompleteAttach(*req))
    }

    fn shutdown(&self) -> Result<()> {
        self.shut.store(true, Ordering::Release);
        // SAFETY: shutdown(2) on a socket we own; a reader blocked in recvmsg wakes with EOF
        // and every waiter then sees the connection dead.
        unsafe { libc::shutdown(self.conn.sock.as_raw_fd(), libc::SHUT_RDWR) };
        Ok(())
    }

    fn assign_ioeventfd(&self, fd: &EventFd, spec: IoeventfdSpec) -> Result<()> {
        self.ioeventfd(fd, spec, false)
    }

    fn deassign_ioeventfd(&self, fd: &EventFd, spec: IoeventfdSpec) -> Result<()> {
        self.ioeventfd(fd, spec, true)
    }

    fn assign_irqfd(&self, fd: &EventFd) -> Result<()> {
        self.irqfd(fd, 0)
    }

    fn assign_used_buffer_irqfd(&self, fd: &EventFd) -> Result<()> {
        self.irqfd(fd, wire::IRQFD_FLAG_USED_BUFFER)
    }

    fn deassign_irqfd(&self, fd: &EventFd) -> Result<()> {
        self.irqfd(fd, BAO_IRQFD_FLAG_DEASSIGN)
    }

    fn map_shmem_at(&self, len: u64, guest_base: u64) -> Result<GuestMemoryMmap> {
        crate::check_shmem_len(len, self.info.shmem_size)?;
        match self.conn.call(&Request::MapShmem { len }, None)? {
            (ReplyBody::Shmem { offset, len: got }, Some(fd)) if got == len => {
                crate::map_file(std::fs::File::from(fd), offset, len, guest_base)
            }
            _ => Err(ApiError::Protocol(
                "MAP_SHMEM answered without its file".into(),
            )),
        }
    }
    fn state_region(&self, len: u64) -> Result<std::fs::File> {
        match self.conn.call(&Request::StateRegion { len }, None)? {
            (ReplyBody::StateRegion, Some(fd)) => Ok(std::fs::File::from(fd)),
            _ => Err(ApiError::Protocol(
                "STATE_REGION answered without its file".into(),
            )),
        }
    }

    fn register_status_word(&self, spec: crate::StatusWordSpec) -> Result<crate::StatusWord> {
        let req = Request::StatusWord {
            status_addr: spec.status_addr,
            ack_addr: spec.ack_addr,
        };
        match self.conn.call(&req, None)? {
            (ReplyBody::StatusWord, Some(fd)) => {
                let page = remio_dispatcher::StatusPage::from_file(std::fs::File::from(fd))
                    .map_err(|e| ApiError::Protocol(format!("status-word file: {e}")))?;
                Ok(crate::StatusWord::new(std::sync::Arc::new(page)))
            }
            _ => Err(ApiError::Protocol(
                "STATUS_WORD answered without its file".into(),
            )),
        }
    }
}
