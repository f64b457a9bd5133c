//! One interrupt line: a handler and/or an eventfd, with latching and edge-style serialisation.
//!
//! Used for both directions: the backend interrupt of a device (raised when a request is
//! queued) and the frontend interrupt (raised by NOTIFY).
//!
//! Semantics, modelled on Linux's edge flow handler (`handle_edge_irq`):
//! - The handler is called **inline on the raising thread, with no lock held**.
//! - The handler of one line never runs on two threads at once. A raise while it runs sets a
//!   "pending" flag and returns at once; the running thread calls the handler once more when it
//!   returns (several raises meanwhile coalesce into one call). No raise is lost.
//! - If an eventfd was requested, every raise also signals it.
//! - A raise that finds neither a handler nor an eventfd is *latched* and delivered once when a
//!   handler is installed (from a short-lived thread, as if another CPU took it, so that an
//!   installer holding a lock the handler takes cannot deadlock) or an eventfd is requested
//!   (the eventfd is signalled).
//! - A handler that panics is logged and treated as having returned.
//! - Removing the handler waits until it is not running on any other thread; after that it is
//!   never called again.

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, ThreadId};

use remio_abi::IrqHandler;
use vmm_sys_util::eventfd::EventFd;

/// Locks a mutex, ignoring poisoning: no lock here is held across foreign code (handlers run
/// unlocked), so a poisoned lock only means a panic in this crate's own short critical sections,
/// whose data stays consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Default)]
struct LineState {
    handler: Option<IrqHandler>,
    eventfd: Option<EventFd>,
    latched: bool,
    /// The thread running the handler, if any.
    running: Option<ThreadId>,
    /// Raised again while running: run once more.
    rerun: bool,
    /// Threads waiting in [`IrqLine::remove`] for the handler to stop running: only then does
    /// a raise end with a wake-up (a futex wake per interrupt otherwise costs a system call on
    /// every trapped access).
    removers: usize,
}

/// One interrupt line. Lock order: a line's lock is a leaf (nothing else is taken under it).
#[derive(Default)]
pub(crate) struct IrqLine {
    state: Mutex<LineState>,
    idle: Condvar,
}

impl std::fmt::Debug for IrqLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = lock(&self.state);
        f.debug_struct("IrqLine")
            .field("handler", &s.handler.is_some())
            .field("eventfd", &s.eventfd.is_some())
            .field("latched", &s.latched)
            .field("running", &s.running.is_some())
            .finish()
    }
}

/// What [`IrqLine::raise`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Raised {
    /// A handler or an eventfd took it (or a running handler will be re-run).
    Delivered,
    /// Nobody listens: latched for the next handler or eventfd.
    Latched,
}

impl IrqLine {
    /// Raises the line. Calls the handler inline (see the module docs).
    pub(crate) fn raise(&self) -> Raised {
        let mut s = lock(&self.state);
        if let Some(efd) = &s.eventfd {
            signal(efd);
        }
        if s.handler.is_none() {
            if s.eventfd.is_some() {
                return Raised::Delivered;
            }
            s.latched = true;
            return Raised::Latched;
        }
        if s.running.is_some() {
            s.rerun = true;
            return Raised::Delivered;
        }
        s.running = Some(thread::current().id());
        while let Some(handler) = s.handler.clone() {
            s.rerun = false;
            drop(s);
            // A panicking handler must not leave the line "running" forever (free_irq would
            // hang) nor unwind through the trapping vCPU thread: log it and carry on.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler())).is_err() {
                log::error!("an interrupt handler panicked; the interrupt is treated as handled");
            }
            s = lock(&self.state);
            if !s.rerun {
                break;
            }
        }
        s.rerun = false;
        s.running = None;
        let wake = s.removers > 0;
        drop(s);
        if wake {
            self.idle.notify_all();
        }
        Raised::Delivered
    }

    /// Installs `handler`. With `replace` false, fails (returning `false`) if one is installed.
    /// A latched raise is then delivered from a short-lived thread.
    pub(crate) fn install(self: &Arc<Self>, handler: IrqHandler, replace: bool) -> bool {
        let mut s = lock(&self.state);
        if s.handler.is_some() && !replace {
            return false;
        }
        s.handler = Some(handler);
        let latched = std::mem::take(&mut s.latched);
        drop(s);
        if latched {
            let line = Arc::clone(self);
            let spawned = thread::Builder::new()
                .name("remio-irq-latched".into())
                .spawn(move || {
                    line.raise();
                });
            if let Err(e) = spawned {
                remio_ratelimit::warn_rl!(
                    "cannot spawn a thread for a latched interrupt ({e}); delivering inline"
                );
                self.raise();
            }
        }
        true
    }

    /// Removes the handler; returns when it is not running on another thread (when called from
    /// inside the handler itself, returns at once: the current call finishes, no other follows).
    pub(crate) fn remove(&self) {
        let me = thread::current().id();
        let mut s = lock(&self.state);
        s.handler = None;
        s.removers += 1;
        while s.running.is_some_and(|t| t != me) {
            s = self.idle.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        s.removers -= 1;
    }

    /// Threads waiting in [`IrqLine::remove`] for the handler to stop running (for tests).
    #[cfg(test)]
    pub(crate) fn removers(&self) -> usize {
        lock(&self.state).removers
    }

    /// An eventfd signalled on every raise (created on first use; later calls return clones of
    /// the same one). A latched raise is transferred to it.
    pub(crate) fn eventfd(&self) -> io::Result<EventFd> {
        let mut s = lock(&self.state);
        if s.eventfd.is_none() {
            // Close-on-exec: the platform spawns QEMU and device models, which must not
            // inherit it.
            s.eventfd = Some(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?);
        }
        let efd = s.eventfd.as_ref().map(EventFd::try_clone);
        let efd = efd.unwrap_or_else(|| Err(io::Error::other("eventfd vanished")))?;
        if std::mem::take(&mut s.latched) {
            signal(&efd);
        }
        Ok(efd)
    }
}

fn signal(efd: &EventFd) {
    // EAGAIN means the counter is saturated: the consumer already has a wakeup pending.
    if let Err(e) = efd.write(1) {
        if e.kind() != io::ErrorKind::WouldBlock {
            remio_ratelimit::warn_rl!("cannot signal an interrupt eventfd: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn raise_without_listener_is_latched_and_delivered_once_on_install() {
        let line = Arc::new(IrqLine::default());
        assert_eq!(line.raise(), Raised::Latched);
        assert_eq!(line.raise(), Raised::Latched);
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        assert!(line.install(Arc::new(move || lock(&tx).send(()).unwrap()), false));
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    }

    #[test]
    fn panicking_handler_does_not_wedge_the_line() {
        let line = Arc::new(IrqLine::default());
        line.install(Arc::new(|| panic!("handler bug")), false);
        assert_eq!(line.raise(), Raised::Delivered);
        // Not left "running": removal returns and the next raise latches.
        line.remove();
        assert_eq!(line.raise(), Raised::Latched);
    }

    #[test]
    fn second_install_without_replace_is_refused() {
        let line = Arc::new(IrqLine::default());
        assert!(line.install(Arc::new(|| {}), false));
        assert!(!line.install(Arc::new(|| {}), false));
        assert!(line.install(Arc::new(|| {}), true));
    }

    #[test]
    fn handler_runs_inline_on_the_raising_thread() {
        let line = Arc::new(IrqLine::default());
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        line.install(
            Arc::new(move || lock(&tx).send(thread::current().id()).unwrap()),
            false,
        );
        assert_eq!(line.raise(), Raised::Delivered);
        assert_eq!(rx.try_recv().unwrap(), thread::current().id());
    }

    #[test]
    fn eventfd_receives_raises_and_a_latched_one() {
        let line = Arc::new(IrqLine::default());
        line.raise();
        let efd = line.eventfd().unwrap();
        assert_eq!(efd.read().unwrap(), 1);
        line.raise();
        line.raise();
        assert_eq!(efd.read().unwrap(), 2);
    }

    #[test]
    fn the_eventfd_is_not_inherited_by_children() {
        use std::os::fd::AsRawFd;
        let line = IrqLine::default();
        let clone = line.eventfd().unwrap();
        let state = lock(&line.state);
        // The one the line keeps, and the clone handed out.
        for fd in [
            state.eventfd.as_ref().unwrap().as_raw_fd(),
            clone.as_raw_fd(),
        ] {
            // SAFETY: F_GETFD on an fd we own; no memory is passed.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            assert_ne!(flags & libc::FD_CLOEXEC, 0);
        }
    }

    #[test]
    fn raise_during_handler_reruns_it_instead_of_running_concurrently() {
        let line = Arc::new(IrqLine::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let (entered_tx, entered_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let entered_tx = Mutex::new(entered_tx);
        let go_rx = Mutex::new(go_rx);
        let c = Arc::clone(&calls);
        line.install(
            Arc::new(move || {
                if c.fetch_add(1, Ordering::SeqCst) == 0 {
                    lock(&entered_tx).send(()).unwrap();
                    lock(&go_rx).recv().unwrap();
                }
            }),
            false,
        );
        let l = Arc::clone(&line);
        let first = thread::spawn(move || l.raise());
        entered_rx.recv().unwrap();
        // The handler is running on `first`: this raise must not call it concurrently.
        assert_eq!(line.raise(), Raised::Delivered);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        go_tx.send(()).unwrap();
        first.join().unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
