//! The device side of the transport: the [`VirtioDevice`] trait, the [`Interrupt`] a device
//! raises, and the worker-thread plumbing every device shares.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use remio_ratelimit::warn_rl;

use crate::crash_point::crash_point;

/// Where InterruptStatus lives: in this process (the default), or in the status word the
/// session shares with the dispatcher ([`remio_api::DmSession::register_status_word`]), which
/// then answers the driver's InterruptStatus reads and InterruptACK writes itself. Either way
/// it derefs to the one `AtomicU32` every user updates atomically; bits are set (`fetch_or`,
/// `SeqCst`, so at least `Release`) before the irqfd is signalled.
#[derive(Clone, Debug)]
pub struct InterruptStatusWord(WordBacking);

#[derive(Clone, Debug)]
enum WordBacking {
    Local(Arc<AtomicU32>),
    Shared(remio_api::StatusWord),
}

impl Default for InterruptStatusWord {
    fn default() -> Self {
        Self(WordBacking::Local(Arc::default()))
    }
}

impl InterruptStatusWord {
    /// InterruptStatus kept in the dispatcher-shared `word`.
    pub fn shared(word: remio_api::StatusWord) -> Self {
        Self(WordBacking::Shared(word))
    }

    /// Whether it is the dispatcher-shared word.
    pub fn is_shared(&self) -> bool {
        matches!(self.0, WordBacking::Shared(_))
    }
}

impl std::ops::Deref for InterruptStatusWord {
    type Target = AtomicU32;

    fn deref(&self) -> &AtomicU32 {
        match &self.0 {
            WordBacking::Local(w) => w,
            WordBacking::Shared(w) => w.word(),
        }
    }
}

/// The state a transport shares with the workers of its device: InterruptStatus, the
/// DEVICE_NEEDS_RESET flag and ConfigGeneration. It lives as long as the transport; an
/// [`Interrupt`] (one per activation) holds clones of it.
#[derive(Clone, Debug, Default)]
pub struct SharedStatus {
    /// InterruptStatus (virtio 1.2 §4.2.2): bit 0 used buffer, bit 1 configuration change.
    pub interrupt_status: InterruptStatusWord,
    /// Set by a device that cannot go on; the transport reports DEVICE_NEEDS_RESET in Status.
    pub needs_reset: Arc<AtomicBool>,
    /// ConfigGeneration (virtio 1.2 §4.2.2), bumped on every device-side config change.
    pub config_generation: Arc<AtomicU32>,
    /// The device's counters (`remio stats`); they outlive resets.
    pub stats: Arc<crate::stats::DeviceStats>,
}

impl SharedStatus {
    /// Sets DEVICE_NEEDS_RESET and counts it.
    pub fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.stats.record_needs_reset();
    }

    /// Clears everything (device reset).
    pub fn reset(&self) {
        self.interrupt_status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

/// The frontend interrupt of one activation: sets an InterruptStatus bit, then signals the
/// irqfd the transport registered through the session (which makes the dispatcher NOTIFY).
#[derive(Debug)]
pub struct Interrupt {
    shared: SharedStatus,
    irqfd: EventFd,
}

impl Interrupt {
    /// An interrupt over `shared`, signalling `irqfd`.
    pub fn new(shared: SharedStatus, irqfd: EventFd) -> Self {
        Self { shared, irqfd }
    }

    /// Used-buffer notification: InterruptStatus bit 0, then the irqfd.
    pub fn signal_used_queue(&self) {
        self.shared
            .interrupt_status
            .fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
        self.trigger();
    }

    /// Configuration-change notification: ConfigGeneration++, InterruptStatus bit 1, irqfd.
    pub fn signal_config_change(&self) {
        self.shared.config_generation.fetch_add(1, Ordering::SeqCst);
        self.shared
            .interrupt_status
            .fetch_or(VIRTIO_MMIO_INT_CONFIG, Ordering::SeqCst);
        self.trigger();
    }

    /// The device cannot go on (virtio 1.2 §2.1.2): DEVICE_NEEDS_RESET and a config interrupt.
    pub fn set_needs_reset(&self) {
        self.shared.set_needs_reset();
        self.signal_config_change();
    }

    /// The device's counters.
    pub fn stats(&self) -> &crate::stats::DeviceStats {
        &self.shared.stats
    }

    /// The irqfd this interrupt signals.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    fn trigger(&self) {
        if let Err(e) = self.irqfd.write(1) {
            warn_rl!("virtio: irqfd write failed: {e}");
        }
    }
}

/// Why a device refused activation; the transport then sets DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues handed over.
        got: usize,
    },
    /// A backend resource could not be prepared (clone of an fd, thread spawn, ...).
    #[error("device backend: {0}")]
    Backend(#[source] io::Error),
    /// The device is already active.
    #[error("device already active")]
    AlreadyActive,
    /// The backend went down with a worker that panicked; the device cannot run again.
    #[error("the device's backend was lost with its worker")]
    BackendLost,
}

/// What a device gets at DRIVER_OK: guest memory, its queues (already sized, addressed, ready,
/// EVENT_IDX set as negotiated) with their notification eventfds, and its interrupt.
#[derive(Debug)]
pub struct ActivateContext {
    /// The DM's shared memory, at its guest-physical address.
    pub mem: GuestMemoryMmap,
    /// One queue per `queue_max_sizes()` entry, in order.
    pub queues: Vec<Queue>,
    /// `queue_evts[i]` is signalled when the driver notifies queue `i` (ioeventfd or control
    /// path). Clones of the fds the transport registered.
    pub queue_evts: Vec<EventFd>,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// The features the driver accepted.
    pub acked_features: u64,
}

/// What a device with `N` queues runs on: memory, its queues, their eventfds, its interrupt
/// ([`ActivateContext::into_queues`]).
pub type Activation<const N: usize> = (GuestMemoryMmap, [Queue; N], [EventFd; N], Arc<Interrupt>);

impl ActivateContext {
    /// Splits the context for a device with exactly `N` queues.
    /// [`ActivateError::QueueCount`] for any other number.
    pub fn into_queues<const N: usize>(self) -> Result<Activation<N>, ActivateError> {
        let got = self.queues.len();
        match (
            <[Queue; N]>::try_from(self.queues),
            <[EventFd; N]>::try_from(self.queue_evts),
        ) {
            (Ok(queues), Ok(evts)) => Ok((self.mem, queues, evts, self.interrupt)),
            _ => Err(ActivateError::QueueCount { expected: N, got }),
        }
    }
}

/// A virtio device, independent of the transport (conventions §7).
pub trait VirtioDevice: Send {
    /// The virtio device ID (virtio 1.2 §5).
    fn device_type(&self) -> u32;
    /// Device feature bits, VIRTIO_F_VERSION_1 included.
    fn avail_features(&self) -> u64;
    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The queue maxima earlier versions of this device offered, whose state records a device
    /// model of this version resumes under a running driver (see [`crate::persist`]): one
    /// entry per earlier version, one size per queue. An entry is used only if it has as many
    /// sizes as [`VirtioDevice::queue_max_sizes`] and none is larger, so that every queue a
    /// driver set up under it is still valid here. Nothing by default.
    fn earlier_queue_max_sizes(&self) -> &[&[u16]] {
        &[]
    }
    /// Reads device configuration space at `offset`; bytes past its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space; bytes past its end or read-only fields are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts processing the queues (usually by spawning a worker thread).
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops processing and drops the queues, eventfds and interrupt handed at activation;
    /// returns when the worker has stopped. The device can be activated again afterwards.
    fn reset(&mut self);
    /// Hands the device the session of its DM, once, before the transport is built, for
    /// devices that register something of their own with the dispatcher (the vhost-user
    /// device's used-buffer irqfd). The default ignores it.
    fn attach_session(&mut self, session: &std::sync::Arc<dyn remio_api::DmSession>) {
        let _ = session;
    }
}

/// Copies `config[offset..]` into `data`, zero-filling what lies past the end.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// A device worker thread with a stop eventfd; stopping it joins it and hands back what the
/// thread returned (the device's backend, for the next activation after a reset). Dropping it
/// stops it too.
#[derive(Debug)]
pub struct Worker<T = ()> {
    stop: EventFd,
    thread: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> Worker<T> {
    /// Spawns `body`, giving it a clone of the stop eventfd to poll.
    pub fn spawn<F>(name: &str, body: F) -> io::Result<Self>
    where
        F: FnOnce(EventFd) -> T + Send + 'static,
    {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop_clone = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || body(stop_clone))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl<T> Worker<T> {
    /// Signals the worker to stop, waits for it and returns what it returned (`None` if it
    /// panicked, or on a second call).
    pub fn stop(&mut self) -> Option<T> {
        let thread = self.thread.take()?;
        if let Err(e) = self.stop.write(1) {
            log::error!("virtio: cannot signal worker stop: {e}");
        }
        match thread.join() {
            Ok(t) => Some(t),
            Err(_) => {
                log::error!("virtio: a device worker panicked");
                None
            }
        }
    }
}

impl<T> Drop for Worker<T> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Token of the stop eventfd in an [`EventLoop`].
pub(crate) const STOP_TOKEN: u64 = u64::MAX;

/// A small level-triggered epoll loop keyed by `u64` tokens.
#[derive(Debug)]
pub(crate) struct EventLoop {
    epoll: Epoll,
    events: Vec<EpollEvent>,
}

impl EventLoop {
    pub(crate) fn new() -> io::Result<Self> {
        Ok(Self {
            epoll: Epoll::new()?,
            events: vec![EpollEvent::default(); 16],
        })
    }

    pub(crate) fn add(&self, fd: &impl AsRawFd, token: u64) -> io::Result<()> {
        self.add_raw(fd.as_raw_fd(), token)
    }

    pub(crate) fn add_raw(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    }

    /// Turns readiness reporting for `fd` on or off (it stays registered).
    pub(crate) fn set_enabled(&self, fd: RawFd, token: u64, enabled: bool) -> io::Result<()> {
        let events = if enabled {
            EventSet::IN
        } else {
            EventSet::empty()
        };
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    pub(crate) fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }

    /// Waits (up to `timeout_ms`, -1 forever) and returns the tokens of the ready fds.
    pub(crate) fn wait(&mut self, timeout_ms: i32, tokens: &mut Vec<u64>) -> io::Result<()> {
        tokens.clear();
        let n = match self.epoll.wait(timeout_ms, &mut self.events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        tokens.extend(self.events[..n].iter().map(EpollEvent::data));
        Ok(())
    }
}

/// An error of the queue itself (not of one request): the device must stop and ask for reset.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// virtio-queue refused an operation (bad avail index, used ring unwritable, ...).
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// The driver published more available buffers than the queue holds.
    #[error("avail index {avail} is more than {size} ahead of {next}")]
    AvailOverrun {
        /// The driver's avail index.
        avail: u16,
        /// The device's next available position.
        next: u16,
        /// The queue size.
        size: u16,
    },
}

/// Checks that the driver's avail index is not impossibly far ahead (virtio 1.2 §2.7.6).
pub(crate) fn check_avail(queue: &Queue, mem: &GuestMemoryMmap) -> Result<(), QueueError> {
    let avail = queue.avail_idx(mem, Ordering::Acquire)?.0;
    let next = queue.next_avail();
    if avail.wrapping_sub(next) > queue.size() {
        return Err(QueueError::AvailOverrun {
            avail,
            next,
            size: queue.size(),
        });
    }
    Ok(())
}

/// Handles every available chain of `queue` with `handle` (which returns the used length),
/// with EVENT_IDX-aware notification suppression, and interrupts the driver if it wants it.
pub(crate) fn drain_queue<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    mut handle: F,
) -> Result<(), QueueError>
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    let mut used_any = false;
    loop {
        queue.disable_notification(mem)?;
        check_avail(queue, mem)?;
        loop {
            let next = queue.iter(mem)?.next();
            let Some(chain) = next else { break };
            crash_point!("popped");
            let head = chain.head_index();
            let len = handle(chain);
            crash_point!("executed");
            queue.add_used(mem, head, len)?;
            crash_point!("used");
            used_any = true;
        }
        if !queue.enable_notification(mem)? {
            break;
        }
    }
    if used_any && queue.needs_notification(mem)? {
        crash_point!("before-interrupt");
        interrupt.signal_used_queue();
    }
    Ok(())
}

/// Reports a fatal queue error: DEVICE_NEEDS_RESET plus a config interrupt.
pub(crate) fn fail_device(interrupt: &Interrupt, what: &str, err: &dyn std::fmt::Display) {
    warn_rl!("virtio {what}: {err}; device needs reset");
    interrupt.set_needs_reset();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_config_bytes_zero_fills_past_the_end() {
        let config = [1u8, 2, 3];
        let mut out = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut out);
        assert_eq!(out, [3, 0, 0, 0]);
        read_config_bytes(&config, u64::MAX, &mut out);
        assert_eq!(out, [0; 4]);
    }

    #[test]
    fn needs_reset_sets_config_bit_and_bumps_generation() {
        let shared = SharedStatus::default();
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Interrupt::new(shared.clone(), irqfd.try_clone().unwrap());

        interrupt.set_needs_reset();

        assert!(shared.needs_reset.load(Ordering::SeqCst));
        assert_eq!(
            shared.interrupt_status.load(Ordering::SeqCst),
            VIRTIO_MMIO_INT_CONFIG
        );
        assert_eq!(shared.config_generation.load(Ordering::SeqCst), 1);
        assert_eq!(irqfd.read().unwrap(), 1);
    }

    #[test]
    fn avail_index_too_far_ahead_is_a_queue_error() {
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::GuestAddress;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().unwrap();
        vq.avail().idx().store(100);
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Interrupt::new(SharedStatus::default(), irqfd);
        let mut handled = 0;

        let err = drain_queue(&mut queue, &mem, &interrupt, |_| {
            handled += 1;
            0
        })
        .unwrap_err();

        assert!(matches!(err, QueueError::AvailOverrun { avail: 100, .. }));
        assert_eq!(handled, 0);
    }
}
