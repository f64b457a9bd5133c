//! virtio-rng / entropy device (virtio 1.2 §5.4), fed by `getrandom`, optionally rate limited.

use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::device::{
    check_avail, fail_device, ActivateContext, ActivateError, EventLoop, Interrupt, QueueError,
    VirtioDevice, Worker, STOP_TOKEN,
};
use remio_ratelimit::warn_rl;

/// Queue size we offer.
pub const QUEUE_SIZE: u16 = 256;
const CHUNK: usize = 4096;

/// A token bucket: `rate` bytes per second, bursts of up to one second's worth.
#[derive(Debug)]
pub struct TokenBucket {
    rate: u64,
    tokens: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `rate` bytes per second.
    pub fn new(rate: u64) -> Self {
        Self {
            rate,
            tokens: rate,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        let add = u128::from(self.rate) * elapsed.as_nanos() / 1_000_000_000;
        if add > 0 {
            let add = u64::try_from(add).unwrap_or(u64::MAX);
            self.tokens = self.tokens.saturating_add(add).min(self.rate);
            self.last = now;
        }
    }

    /// Takes up to `want` tokens; returns how many were granted.
    pub fn take(&mut self, want: u64, now: Instant) -> u64 {
        self.refill(now);
        let got = want.min(self.tokens);
        self.tokens -= got;
        got
    }

    /// How long until at least one token is there.
    pub fn wait_time(&self) -> Duration {
        if self.tokens > 0 || self.rate == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos((1_000_000_000 / self.rate).max(1_000_000))
    }
}

/// Fills the writable buffers of one request with random bytes, at most `budget` bytes.
/// Returns the bytes written (the used length). Readable descriptors are ignored.
pub fn fill_request<M, I>(mem: &M, descs: I, budget: u64, scratch: &mut [u8]) -> u32
where
    M: GuestMemory + Bytes<vm_memory::GuestAddress>,
    I: IntoIterator<Item = Descriptor>,
{
    let mut written: u64 = 0;
    for d in descs {
        if !d.is_write_only() {
            warn_rl!("virtio-rng: readable descriptor in a request ignored");
            continue;
        }
        let Ok(len) = usize::try_from(d.len()) else {
            continue;
        };
        if !mem.check_range(d.addr(), len, Permissions::Write) {
            warn_rl!("virtio-rng: buffer outside guest memory");
            break;
        }
        let mut off = 0usize;
        while off < len && written < budget {
            let room = usize::try_from(budget - written).unwrap_or(usize::MAX);
            let n = (len - off).min(scratch.len()).min(room);
            let chunk = &mut scratch[..n];
            if let Err(e) = getrandom::getrandom(chunk) {
                warn_rl!("virtio-rng: getrandom: {e}");
                return u32::try_from(written).unwrap_or(u32::MAX);
            }
            let Some(addr) = d.addr().checked_add(off as u64) else {
                break;
            };
            if mem.write_slice(chunk, addr).is_err() {
                break;
            }
            off += n;
            written += n as u64;
        }
        if written >= budget {
            break;
        }
    }
    u32::try_from(written).unwrap_or(u32::MAX)
}

/// The entropy device.
#[derive(Debug)]
pub struct RngDevice {
    rate: Option<u64>,
    worker: Option<Worker>,
}

impl RngDevice {
    /// An entropy device; `rate`: bytes per second at most.
    pub fn new(rate: Option<u64>) -> Self {
        Self { rate, worker: None }
    }
}

impl VirtioDevice for RngDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }
    fn avail_features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        warn_rl!("virtio-rng: config write at {offset:#x} ignored (no config space)");
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let (mem, [queue], [evt], interrupt) = ctx.into_queues()?;
        let rate = self.rate;
        self.worker = Some(
            Worker::spawn("virtio-rng", move |stop| {
                run_rng(mem, queue, evt, &interrupt, stop, rate);
            })
            .map_err(ActivateError::Backend)?,
        );
        Ok(())
    }
    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
    }
}

/// Serves as many requests as the bucket allows; `Ok(true)` if it ran dry with requests
/// still pending.
pub(crate) fn serve(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    bucket: &mut Option<TokenBucket>,
    scratch: &mut [u8],
) -> Result<bool, QueueError> {
    let mut used_any = false;
    let mut starved = false;
    loop {
        queue.disable_notification(mem)?;
        check_avail(queue, mem)?;
        loop {
            let budget = match bucket {
                Some(b) => b.take(u64::from(u32::MAX), Instant::now()),
                None => u64::MAX,
            };
            if budget == 0 {
                starved = true;
                break;
            }
            let next = queue.iter(mem)?.next();
            let Some(chain) = next else {
                // Give the unused tokens back.
                if let Some(b) = bucket {
                    b.tokens = b.tokens.saturating_add(budget).min(b.rate);
                }
                break;
            };
            let head = chain.head_index();
            let len = fill_request(mem, chain, budget, scratch);
            if let Some(b) = bucket {
                b.tokens = b.tokens.saturating_add(budget - u64::from(len)).min(b.rate);
            }
            queue.add_used(mem, head, len)?;
            interrupt
                .stats()
                .record(crate::stats::RequestKind::Read, u64::from(len), true);
            used_any = true;
        }
        if starved || !queue.enable_notification(mem)? {
            break;
        }
    }
    if used_any && queue.needs_notification(mem)? {
        interrupt.signal_used_queue();
    }
    Ok(starved)
}

fn run_rng(
    mem: GuestMemoryMmap,
    mut queue: Queue,
    evt: EventFd,
    interrupt: &Interrupt,
    stop: EventFd,
    rate: Option<u64>,
) {
    const QUEUE_TOKEN: u64 = 0;
    const TIMER_TOKEN: u64 = 1;
    let mut bucket = rate.map(TokenBucket::new);
    let mut scratch = vec![0u8; CHUNK];
    let setup = || -> std::io::Result<(EventLoop, TimerFd)> {
        let ev = EventLoop::new()?;
        let timer = TimerFd::new()?;
        ev.add(&evt, QUEUE_TOKEN)?;
        ev.add(&stop, STOP_TOKEN)?;
        ev.add(&timer, TIMER_TOKEN)?;
        Ok((ev, timer))
    };
    let (mut ev, mut timer) = match setup() {
        Ok(x) => x,
        Err(e) => return fail_device(interrupt, "virtio-rng setup", &e),
    };
    let mut tokens = Vec::with_capacity(3);
    loop {
        if let Err(e) = ev.wait(-1, &mut tokens) {
            return fail_device(interrupt, "virtio-rng epoll", &e);
        }
        let mut work = false;
        for &t in &tokens {
            match t {
                STOP_TOKEN => return,
                TIMER_TOKEN => {
                    let _ = timer.wait();
                    work = true;
                }
                _ => {
                    let _ = evt.read();
                    work = true;
                }
            }
        }
        if work {
            match serve(&mut queue, &mem, interrupt, &mut bucket, &mut scratch) {
                Ok(true) => {
                    let wait = bucket
                        .as_ref()
                        .map_or(Duration::ZERO, TokenBucket::wait_time);
                    if let Err(e) = timer.reset(wait.max(Duration::from_millis(1)), None) {
                        return fail_device(interrupt, "virtio-rng timer", &e);
                    }
                }
                Ok(false) => {}
                Err(e) => return fail_device(interrupt, "virtio-rng queue", &e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn request_is_filled_up_to_the_budget() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let w = u16::try_from(VRING_DESC_F_WRITE).unwrap();
        let chain = vq
            .build_desc_chain(&[
                RawDescriptor::from(Descriptor::new(0x8_0000, 64, w, 0)),
                RawDescriptor::from(Descriptor::new(0x9_0000, 64, w, 0)),
            ])
            .unwrap();

        let used = fill_request(&mem, chain, 100, &mut [0u8; 16]);

        assert_eq!(used, 100);
        let mut second = [0u8; 64];
        mem.read_slice(&mut second, GuestAddress(0x9_0000)).unwrap();
        assert!(second[36..].iter().all(|&b| b == 0));
    }

    #[test]
    fn readable_and_out_of_memory_buffers_get_nothing() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let w = u16::try_from(VRING_DESC_F_WRITE).unwrap();
        let chain = vq
            .build_desc_chain(&[
                RawDescriptor::from(Descriptor::new(0x8_0000, 64, 0, 0)),
                RawDescriptor::from(Descriptor::new(0xff_fff0, 64, w, 0)),
            ])
            .unwrap();

        assert_eq!(fill_request(&mem, chain, u64::MAX, &mut [0u8; 16]), 0);
    }

    #[test]
    fn token_bucket_grants_at_most_its_rate_then_refills() {
        let start = Instant::now();
        let mut b = TokenBucket::new(1000);
        b.last = start;

        assert_eq!(b.take(600, start), 600);
        assert_eq!(b.take(600, start), 400);
        assert_eq!(b.take(1, start), 0);
        assert!(b.wait_time() > Duration::ZERO);
        assert_eq!(b.take(1000, start + Duration::from_millis(500)), 500);
        assert_eq!(b.take(5000, start + Duration::from_secs(10)), 1000);
    }
}
