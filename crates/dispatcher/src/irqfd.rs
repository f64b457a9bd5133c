//! The irqfd server of one DM: each signal of an assigned eventfd becomes one NOTIFY
//! hypercall (signals that pile up before the server reads the counter coalesce into one, as
//! the eventfd counter semantics imply).
//!
//! One epoll thread per DM, started lazily on the first assignment. Per DM rather than per
//! dispatcher because destroying a DM then simply stops and joins its thread, which
//! guarantees no NOTIFY for that DM id is issued after destroy returns (a new DM may reuse
//! the id), and a DM's irqfds cannot delay another's; the cost is at most
//! `BAO_IO_MAX_DMS` (16) mostly idle threads.
//!
//! remio's extension ([`crate::Dm::irqfd_assign_status_bits`]): an irqfd may also set bits of
//! the DM's status word, on this thread, after reading the counter and before the NOTIFY, so
//! that a vhost-user daemon given it as its call eventfd raises a virtio-mmio used-buffer
//! interrupt with InterruptStatus bit 0 already set, with no device-model thread in between.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use remio_abi::hypercall::{RemioArgs, RemioOp};
use remio_abi::Hypercall;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::ioeventfd::same_file;
use crate::statusword::StatusPage;

/// Errors of [`crate::Dm::irqfd_assign`] and [`crate::Dm::irqfd_deassign`].
#[derive(Debug, thiserror::Error)]
pub enum IrqfdError {
    /// This eventfd (same open file) is already assigned to this DM. EBUSY.
    #[error("eventfd already assigned as an irqfd")]
    Busy,
    /// No irqfd with this eventfd is assigned. ENOENT.
    #[error("eventfd is not assigned as an irqfd")]
    NotFound,
    /// The descriptor cannot be watched (not open, or not pollable). EBADF.
    #[error("bad eventfd: {0}")]
    BadFd(#[source] io::Error),
    /// The DM is being destroyed. ESHUTDOWN.
    #[error("the DM is being destroyed")]
    ShuttingDown,
    /// Creating the epoll instance or its thread failed. The OS errno (EIO if none).
    #[error("irqfd server: {0}")]
    Io(#[source] io::Error),
    /// An irqfd that sets status-word bits on a DM without a status word. ENOENT.
    #[error("the DM has no status word for the irqfd to set bits in")]
    NoStatusWord,
}

impl IrqfdError {
    /// The errno of this error.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Busy => libc::EBUSY,
            Self::NotFound | Self::NoStatusWord => libc::ENOENT,
            Self::BadFd(_) => libc::EBADF,
            Self::ShuttingDown => libc::ESHUTDOWN,
            Self::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

const STOP_TOKEN: u64 = 0;

#[derive(Debug)]
struct Shared {
    epoll: Epoll,
    stop: EventFd,
    /// Leaf lock. Token → irqfd.
    entries: Mutex<BTreeMap<u64, Entry>>,
    notifies: AtomicU64,
}

/// Bits an irqfd sets in the DM's status word before its NOTIFY (remio's extension).
pub(crate) type StatusBits = (Arc<StatusPage>, u32);

/// One assigned irqfd.
#[derive(Debug)]
struct Entry {
    fd: Arc<EventFd>,
    sets: Option<StatusBits>,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct IrqfdServer {
    shared: Arc<Shared>,
    next_token: u64,
    thread: Option<JoinHandle<()>>,
}

fn readable(fd: &EventFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is a valid pollfd for the duration of the call and nfds is 1.
    let n = unsafe { libc::poll(&raw mut p, 1, 0) };
    n == 1 && p.revents & libc::POLLIN != 0
}

fn run(shared: &Shared, hc: &dyn Hypercall, dm_id: u32) {
    let mut events = vec![EpollEvent::default(); 16];
    loop {
        let n = match shared.epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("irqfd server of DM {dm_id}: epoll_wait failed: {e}; stopping");
                return;
            }
        };
        for ev in &events[..n] {
            if ev.data() == STOP_TOKEN {
                return;
            }
            let entry = shared
                .entries
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&ev.data())
                .map(|e| (e.fd.clone(), e.sets.clone()));
            let Some((fd, sets)) = entry else { continue };
            // Level-triggered: readable means the counter is non-zero. The check keeps a
            // blocking eventfd that someone else drained from blocking this thread.
            if !readable(&fd) || fd.read().is_err() {
                continue;
            }
            if let Some((page, bits)) = &sets {
                // Before the NOTIFY: the frontend's InterruptStatus read that the interrupt
                // causes (answered from this word with Acquire) sees the bits.
                page.word().fetch_or(*bits, Ordering::SeqCst);
            }
            shared.notifies.fetch_add(1, Ordering::Relaxed);
            let ret = hc.remote_io(&RemioArgs {
                dm_id: u64::from(dm_id),
                op: RemioOp::Notify as u64,
                ..RemioArgs::default()
            });
            if let Err(s) = ret.check() {
                remio_ratelimit::warn_rl!("irqfd of DM {dm_id}: NOTIFY failed: {s}");
            }
        }
    }
}

impl IrqfdServer {
    /// Creates the epoll instance and starts the thread.
    pub(crate) fn start(hc: Arc<dyn Hypercall>, dm_id: u32) -> Result<Self, IrqfdError> {
        let epoll = Epoll::new().map_err(IrqfdError::Io)?;
        // Close-on-exec like every fd of the platform: a process the platform starts (a
        // device model, QEMU) must not inherit it (found by `remio soak`: each device-model
        // process held the stop eventfd of every DM started before it).
        let stop = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(IrqfdError::Io)?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP_TOKEN),
            )
            .map_err(IrqfdError::Io)?;
        let shared = Arc::new(Shared {
            epoll,
            stop,
            entries: Mutex::new(BTreeMap::new()),
            notifies: AtomicU64::new(0),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("remio-irqfd{dm_id}"))
            .spawn(move || run(&s, hc.as_ref(), dm_id))
            .map_err(IrqfdError::Io)?;
        Ok(Self {
            shared,
            next_token: STOP_TOKEN + 1,
            thread: Some(thread),
        })
    }

    /// Watches `fd`. An eventfd already signalled is reported by the (level-triggered) epoll
    /// at once, so it injects once.
    /// With `sets`, each signal first sets those bits in that status word.
    pub(crate) fn assign(
        &mut self,
        fd: Arc<EventFd>,
        sets: Option<StatusBits>,
    ) -> Result<(), IrqfdError> {
        let mut entries = self
            .shared
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if entries.values().any(|e| same_file(&e.fd, &fd)) {
            return Err(IrqfdError::Busy);
        }
        let token = self.next_token;
        self.shared
            .epoll
            .ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EBADF | libc::EPERM | libc::EEXIST) => IrqfdError::BadFd(e),
                _ => IrqfdError::Io(e),
            })?;
        self.next_token += 1;
        entries.insert(token, Entry { fd, sets });
        Ok(())
    }

    /// Stops watching the eventfd that is the same file as `fd`.
    pub(crate) fn deassign(&mut self, fd: &EventFd) -> Result<(), IrqfdError> {
        let mut entries = self
            .shared
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let token = entries
            .iter()
            .find(|(_, e)| same_file(&e.fd, fd))
            .map(|(t, _)| *t)
            .ok_or(IrqfdError::NotFound)?;
        if let Some(e) = entries.remove(&token) {
            if let Err(err) = self.shared.epoll.ctl(
                ControlOperation::Delete,
                e.fd.as_raw_fd(),
                EpollEvent::default(),
            ) {
                log::warn!("irqfd deassign: epoll_ctl(DEL) failed: {err}");
            }
        }
        Ok(())
    }

    /// Number of assigned irqfds.
    pub(crate) fn len(&self) -> usize {
        self.shared
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Signals seen so far (each was one NOTIFY).
    pub(crate) fn notifies(&self) -> u64 {
        self.shared.notifies.load(Ordering::Relaxed)
    }
}

impl Drop for IrqfdServer {
    fn drop(&mut self) {
        if let Err(e) = self.shared.stop.write(1) {
            log::error!("irqfd server: cannot signal stop: {e}");
            return;
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("irqfd server thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeHyp;

    fn close_on_exec(fd: i32) -> bool {
        // SAFETY: F_GETFD reads the flags of an fd the caller keeps open.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        flags >= 0 && flags & libc::FD_CLOEXEC != 0
    }

    /// A hypercall that records, at each NOTIFY, what the status word held then.
    struct WordAtNotify {
        page: Arc<StatusPage>,
        seen: Mutex<Vec<u32>>,
        changed: std::sync::Condvar,
    }

    impl Hypercall for WordAtNotify {
        fn remote_io(&self, args: &RemioArgs) -> remio_abi::hypercall::RemioRet {
            if args.op == RemioOp::Notify as u64 {
                self.seen.lock().unwrap().push(self.page.load());
                self.changed.notify_all();
            }
            remio_abi::hypercall::RemioRet::with_status(0)
        }
    }

    fn word_at_notify() -> Arc<WordAtNotify> {
        Arc::new(WordAtNotify {
            page: Arc::new(StatusPage::new().unwrap()),
            seen: Mutex::default(),
            changed: std::sync::Condvar::new(),
        })
    }

    /// Waits (bounded) until `n` NOTIFYs were recorded; returns the words seen.
    fn notified(hc: &WordAtNotify, n: usize) -> Vec<u32> {
        let seen = hc.seen.lock().unwrap();
        let (seen, _) = hc
            .changed
            .wait_timeout_while(seen, std::time::Duration::from_secs(10), |s| s.len() < n)
            .unwrap();
        seen.clone()
    }

    #[test]
    fn an_irqfd_with_status_bits_sets_them_before_its_notify() {
        let hc = word_at_notify();
        let mut server = IrqfdServer::start(hc.clone(), 0).unwrap();
        let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        server
            .assign(fd.clone(), Some((hc.page.clone(), 0b1)))
            .unwrap();

        fd.write(1).unwrap();

        assert_eq!(notified(&hc, 1), vec![0b1]);
        // Bits already set (a config change) stay; the driver's ACK clears, never the irqfd.
        hc.page.word().store(0b10, Ordering::SeqCst);
        fd.write(1).unwrap();
        assert_eq!(notified(&hc, 2), vec![0b1, 0b11]);
    }

    #[test]
    fn a_plain_irqfd_leaves_the_status_word_alone() {
        let hc = word_at_notify();
        let mut server = IrqfdServer::start(hc.clone(), 0).unwrap();
        let plain = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        server.assign(plain.clone(), None).unwrap();

        plain.write(1).unwrap();

        assert_eq!(notified(&hc, 1), vec![0]);
        assert_eq!(hc.page.load(), 0);
    }

    #[test]
    fn the_server_s_own_fds_are_not_inherited_by_child_processes() {
        let server = IrqfdServer::start(FakeHyp::new(1), 0).unwrap();
        assert!(close_on_exec(server.shared.stop.as_raw_fd()));
        assert!(close_on_exec(server.shared.epoll.as_raw_fd()));
    }
}
