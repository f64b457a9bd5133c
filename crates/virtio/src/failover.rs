//! A virtio-mmio device whose device model died, as its driver should see it: a failed device,
//! not a hang.
//!
//! Every virtio register lives in the device-model process. When that process dies for good,
//! the requests the guest driver has put in its virtqueues die with it, and Linux waits for
//! them forever: `virtio_blk` has no request timeout, and it does not recover from
//! DEVICE_NEEDS_RESET. Whoever forwards the guest's register accesses (remio's QEMU bridge,
//! `remio_frontend::qemu::Failover`) keeps one [`MmioFailover`] per window: while the device
//! model lives, it is shown every access ([`MmioFailover::observe_read`],
//! [`MmioFailover::observe_write`]) and keeps what the driver programmed (status, queue sizes,
//! ring addresses, ready bits) and the last value read at each register. Once the device model
//! is declared dead ([`MmioFailover::fail`]) it answers the window as a failed virtio-mmio
//! device (virtio 1.2 §4.2.2):
//!
//! - Status reads DEVICE_NEEDS_RESET (§2.1.2) on top of what the driver set, and a
//!   configuration-change interrupt says so;
//! - every request in a virtqueue (those already there and every one added later, on
//!   QueueNotify and on each [`MmioFailover::sweep`]) is returned in the used ring with nothing
//!   written — for virtio-blk with status `VIRTIO_BLK_S_IOERR` (§5.2.6), so that the guest's
//!   I/O fails with EIO in bounded time;
//! - InterruptStatus/InterruptACK work; any other read replays the last value read there.
//!
//! # Which requests are in flight
//!
//! The rings are walked with virtio-queue's [`Queue`] and [`virtio_queue::DescriptorChain`]
//! (checked arithmetic, indirect tables, loops), after checking that the rings the driver
//! programmed lie in guest memory. Completion order is not assumed: `avail.idx - used.idx`
//! requests are in flight, and they are the newest placement of each descriptor head in the
//! available ring that no later used element returned (see `in_flight` for how "later" is
//! decided when a head was returned and made available again). The rings keep only the last
//! `size` entries of each, so a request that stayed in flight while more than `size` newer ones
//! were made available cannot be found: it is reported (rate limited) and left.

use std::collections::BTreeMap;
use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR;
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_STATUS,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use crate::persist::QueueState;
use crate::transport::MMIO_DEFAULT_SIZE;

/// virtio-blk's IOERR status byte (virtio 1.2 §5.2.6).
#[expect(
    clippy::cast_possible_truncation,
    reason = "the status is a byte; the assert checks the value fits"
)]
const BLK_IOERR: u8 = {
    assert!(VIRTIO_BLK_S_IOERR <= 0xff);
    VIRTIO_BLK_S_IOERR as u8
};

/// Queues a shadow tracks (virtio-mmio has no limit; remio's devices use at most 2). The same
/// bound as a state record's ([`crate::persist::MAX_QUEUES`]).
const MAX_QUEUES: usize = crate::persist::MAX_QUEUES;

/// The largest split queue (virtio 1.2 §2.7: Queue Size up to 32768).
const MAX_QUEUE_SIZE: u16 = 32768;

/// Bytes of a split ring's parts (virtio 1.2 §2.7): a descriptor, the avail ring's header and
/// element, the used ring's header and element, and the event word after either ring.
const DESC_LEN: u64 = 16;
const RING_HEADER: u64 = 4;
const AVAIL_ELEM: u64 = 2;
const USED_ELEM: u64 = 8;
const EVENT_WORD: u64 = 2;

/// One queue as the driver programmed it, and whether its rings were found unusable since.
#[derive(Clone, Copy, Debug, Default)]
struct ShadowQueue {
    regs: QueueState,
    /// The rings do not fit guest memory or break virtio-queue's rules: not walked again until
    /// the driver writes one of the queue's registers.
    refused: bool,
}

/// What the driver of one virtio-mmio window programmed, and what that window answers once its
/// device model is dead (see the module docs).
#[derive(Debug, Default)]
pub struct MmioFailover {
    failed: bool,
    device_id: u32,
    status: u32,
    isr: u32,
    queue_sel: u32,
    queues: Vec<ShadowQueue>,
    /// The last value read at each (offset, width), replayed once failed. Bounded: offsets are
    /// inside the window ([`MMIO_DEFAULT_SIZE`]), widths are 1, 2, 4 or 8.
    reads: BTreeMap<(u64, u8), u64>,
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

impl MmioFailover {
    /// A window whose device model lives and whose driver has programmed nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether [`MmioFailover::fail`] was called.
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// The live device model answered `value` to a read of `width` bytes at `offset`.
    pub fn observe_read(&mut self, offset: u64, width: u8, value: u64) {
        if offset >= MMIO_DEFAULT_SIZE || !matches!(width, 1 | 2 | 4 | 8) {
            return;
        }
        if offset == u64::from(VIRTIO_MMIO_DEVICE_ID) && width == 4 {
            self.device_id = u32::try_from(value).unwrap_or(0);
        }
        let volatile = [VIRTIO_MMIO_STATUS, VIRTIO_MMIO_INTERRUPT_STATUS];
        if !volatile.iter().any(|&r| u64::from(r) == offset) {
            self.reads.insert((offset, width), value);
        }
    }

    /// The driver wrote `value` (`width` bytes) at `offset`, and the live device model took it.
    pub fn observe_write(&mut self, offset: u64, width: u8, value: u64) {
        self.record_write(offset, width, value);
    }

    /// A window known from a state record rather than observed (a restarted device model that
    /// cannot resume it, [`crate::transport::Resumed::Failed`]): the driver set `status` and
    /// `queues` on a device of `device_id` (0: unknown, its requests are returned with nothing
    /// written). Not failed yet: [`MmioFailover::fail_quietly`] does it, the caller having said
    /// why in its own terms.
    pub fn from_record(device_id: u32, status: u32, queues: &[QueueState]) -> Self {
        Self {
            device_id,
            status: status & 0xff,
            queues: queues
                .iter()
                .take(MAX_QUEUES)
                .map(|&regs| ShadowQueue {
                    regs,
                    refused: false,
                })
                .collect(),
            ..Self::default()
        }
    }

    /// The device model is dead: from now on this window is a failed device, and every request
    /// queued in `mem` (guest memory; without it requests stay where they are) is returned.
    /// Returns whether the window's interrupt must be raised. Calling it again only sweeps.
    pub fn fail(&mut self, mem: Option<&GuestMemoryMmap>) -> bool {
        if !self.failed {
            log::warn!(
                "virtio-mmio failover: device id {} has lost its device model: failing its \
                 requests (DEVICE_NEEDS_RESET)",
                self.device_id
            );
        }
        self.fail_quietly(mem)
    }

    /// [`MmioFailover::fail`] without its log line.
    pub fn fail_quietly(&mut self, mem: Option<&GuestMemoryMmap>) -> bool {
        let mut raise = false;
        if !self.failed {
            self.failed = true;
            if self.status != 0 {
                // VRING too: the dead device model may have completed requests whose interrupt
                // the driver never saw (its InterruptStatus read was in flight and completed
                // with 0), and only a used-buffer interrupt makes it look at the used rings
                // again. With nothing new there, Linux's vring_interrupt does nothing.
                self.isr |= VIRTIO_MMIO_INT_CONFIG | VIRTIO_MMIO_INT_VRING;
                raise = true;
            }
        }
        self.complete_all(mem) || raise
    }

    /// Returns what the driver queued since the last pass, if failed (a request whose
    /// notification was suppressed is not left behind). Returns whether to raise the interrupt.
    pub fn sweep(&mut self, mem: Option<&GuestMemoryMmap>) -> bool {
        self.failed && self.complete_all(mem)
    }

    /// A read of the failed window.
    pub fn read(&self, offset: u64, width: u8) -> u64 {
        match u32::try_from(offset) {
            Ok(VIRTIO_MMIO_STATUS) if self.status == 0 => 0,
            Ok(VIRTIO_MMIO_STATUS) => u64::from(self.status | VIRTIO_CONFIG_S_NEEDS_RESET),
            Ok(VIRTIO_MMIO_INTERRUPT_STATUS) => u64::from(self.isr),
            _ => self.reads.get(&(offset, width)).copied().unwrap_or(0),
        }
    }

    /// A write to the failed window; returns whether to raise the interrupt.
    pub fn write(
        &mut self,
        offset: u64,
        width: u8,
        value: u64,
        mem: Option<&GuestMemoryMmap>,
    ) -> bool {
        let Some(reg) = register(offset, width) else {
            return false;
        };
        self.record_write(offset, width, value);
        match reg {
            VIRTIO_MMIO_INTERRUPT_ACK => {
                self.isr &= !u32::try_from(value & 0xffff_ffff).unwrap_or(u32::MAX);
                false
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => self.complete_all(mem),
            _ => false,
        }
    }

    fn selected_queue(&mut self) -> Option<&mut ShadowQueue> {
        let i = usize::try_from(self.queue_sel)
            .ok()
            .filter(|&i| i < MAX_QUEUES)?;
        if self.queues.len() <= i {
            self.queues.resize(i + 1, ShadowQueue::default());
        }
        self.queues.get_mut(i)
    }

    /// Records a driver write (registers are 32-bit, naturally aligned: anything else is
    /// ignored, as the transport ignores it).
    fn record_write(&mut self, offset: u64, width: u8, value: u64) {
        let Some(reg) = register(offset, width) else {
            return;
        };
        let value = u32::try_from(value & 0xffff_ffff).unwrap_or(u32::MAX);
        match reg {
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_STATUS => {
                self.status = value & 0xff;
                if self.status == 0 {
                    // Device reset (virtio 1.2 §4.2.2.1): the queues are gone.
                    self.queues.clear();
                    self.queue_sel = 0;
                    self.isr = 0;
                }
            }
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => {
                let Some(q) = self.selected_queue() else {
                    return;
                };
                q.refused = false;
                let r = &mut q.regs;
                match reg {
                    // A size over 16 bits is no size: the queue is refused when walked.
                    VIRTIO_MMIO_QUEUE_NUM => r.size = u16::try_from(value).unwrap_or(0),
                    VIRTIO_MMIO_QUEUE_READY => r.ready = value & 1 == 1,
                    VIRTIO_MMIO_QUEUE_DESC_LOW => set_low(&mut r.desc, value),
                    VIRTIO_MMIO_QUEUE_DESC_HIGH => set_high(&mut r.desc, value),
                    VIRTIO_MMIO_QUEUE_AVAIL_LOW => set_low(&mut r.driver, value),
                    VIRTIO_MMIO_QUEUE_AVAIL_HIGH => set_high(&mut r.driver, value),
                    VIRTIO_MMIO_QUEUE_USED_LOW => set_low(&mut r.device, value),
                    _ => set_high(&mut r.device, value),
                }
            }
            _ => {}
        }
    }

    /// Returns every request in flight on every ready queue. Returns whether any was.
    fn complete_all(&mut self, mem: Option<&GuestMemoryMmap>) -> bool {
        let Some(mem) = mem else { return false };
        let block = self.device_id == VIRTIO_ID_BLOCK;
        let mut done = 0usize;
        for (i, q) in self.queues.iter_mut().enumerate() {
            if !q.regs.ready || q.refused {
                continue;
            }
            let Some(mut queue) = usable_queue(&q.regs, mem) else {
                remio_ratelimit::warn_rl!(
                    "virtio-mmio failover: queue {i} (size {}, rings {:#x}/{:#x}/{:#x}) is not \
                     usable: its requests cannot be returned",
                    q.regs.size,
                    q.regs.desc,
                    q.regs.driver,
                    q.regs.device
                );
                q.refused = true;
                continue;
            };
            done += complete_queue(&mut queue, mem, block);
        }
        if done > 0 {
            self.isr |= VIRTIO_MMIO_INT_VRING;
        }
        done > 0
    }
}

/// The register an access hits, if it is a naturally aligned 32-bit access below the
/// configuration space (virtio 1.2 §4.2.2: "32-bit wide and aligned").
fn register(offset: u64, width: u8) -> Option<u32> {
    if width != 4 || !offset.is_multiple_of(4) {
        return None;
    }
    u32::try_from(offset).ok().filter(|&o| o < 0x100)
}

/// `q` as a virtio-queue [`Queue`], if its size and alignments follow virtio-queue's rules and
/// its three rings lie in `mem` (sizes and ends computed with checked arithmetic).
fn usable_queue(q: &QueueState, mem: &GuestMemoryMmap) -> Option<Queue> {
    let mut queue = Queue::new(MAX_QUEUE_SIZE).ok()?;
    queue.try_set_size(q.size).ok()?;
    queue
        .try_set_desc_table_address(GuestAddress(q.desc))
        .ok()?;
    queue
        .try_set_avail_ring_address(GuestAddress(q.driver))
        .ok()?;
    queue
        .try_set_used_ring_address(GuestAddress(q.device))
        .ok()?;
    let n = u64::from(q.size);
    let fits = |addr: u64, elem: u64, extra: u64| {
        let len = n.checked_mul(elem)?.checked_add(extra)?;
        addr.checked_add(len)?;
        let len = usize::try_from(len).ok()?;
        mem.check_range(GuestAddress(addr), len, Permissions::ReadWrite)
            .then_some(())
    };
    fits(q.desc, DESC_LEN, 0)?;
    fits(q.driver, AVAIL_ELEM, RING_HEADER + EVENT_WORD)?;
    fits(q.device, USED_ELEM, RING_HEADER + EVENT_WORD)?;
    queue.set_ready(true);
    Some(queue)
}

/// Returns every request in flight on `queue` to the driver, failed. Returns how many.
fn complete_queue(queue: &mut Queue, mem: &GuestMemoryMmap, block: bool) -> usize {
    let mut done = 0usize;
    // Twice at most: a request made available while notifications are re-enabled is taken too.
    for _ in 0..2 {
        let (Ok(avail), Ok(used)) = (
            queue.avail_idx(mem, Ordering::Acquire),
            queue.used_idx(mem, Ordering::Acquire),
        ) else {
            return done;
        };
        let heads = match in_flight(queue, mem, avail, used) {
            Ok(heads) => heads,
            Err(e) => {
                remio_ratelimit::warn_rl!("virtio-mmio failover: {e}");
                return done;
            }
        };
        queue.set_next_used(used.0);
        for &(position, head) in &heads {
            let len = if block {
                fail_block_request(queue, mem, position)
            } else {
                0
            };
            // add_used writes the element, then the index (Release: virtio 1.2 §2.7.8).
            if queue.add_used(mem, head, len).is_err() {
                return done;
            }
            done += 1;
        }
        // Ask for every kick: flags 0 and avail_event = what has been taken.
        queue.set_next_avail(avail.0);
        queue.set_event_idx(false);
        let _ = queue.enable_notification(mem);
        queue.set_event_idx(true);
        let more = queue.enable_notification(mem).unwrap_or(false);
        fence(Ordering::SeqCst);
        if !more {
            break;
        }
    }
    done
}

/// Why the in-flight requests of a queue cannot be told.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum InFlightError {
    /// More requests in flight than the queue has entries.
    #[error("avail index {avail} vs used {used} of a {size}-entry queue: ring corrupt")]
    Corrupt { avail: u16, used: u16, size: u16 },
    /// The available or used ring could not be read.
    #[error("a ring could not be read")]
    Unreadable,
}

/// The (avail ring position, head) of each request in flight on `queue`, oldest first.
///
/// `avail - used` requests are in flight, whatever the completion order. A head the driver made
/// available is in flight until a used element returns it, and a head is never in flight twice,
/// so only the newest placement of each head counts. Whether a used element of that head came
/// after that placement is decided by positions, which the two rings do not share: when the
/// driver placed entry `p`, at most `size` requests were in flight, so the used index was in
/// `[p + 1 - size, p]`; a return at a used position `>= p` is after the placement, one before
/// `p + 1 - size` is before it. A head returned in between is *ambiguous*: the placements known
/// to be in flight are taken first, then ambiguous ones (those returned longest before their
/// placement first) until the count is reached. With in-order completion nothing is ambiguous
/// and the answer is exact.
fn in_flight(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    avail: Wrapping<u16>,
    used: Wrapping<u16>,
) -> Result<Vec<(Wrapping<u16>, u16)>, InFlightError> {
    let size = queue.size();
    let pending = (avail - used).0;
    if pending > size {
        return Err(InFlightError::Corrupt {
            avail: avail.0,
            used: used.0,
            size,
        });
    }
    if pending == 0 {
        return Ok(Vec::new());
    }
    // The rings keep the last `size` entries; before an index first wraps they hold only as
    // many as were ever written (the rest is not ours to read as entries).
    let avail_window = if avail.0 >= used.0 {
        avail.0.min(size)
    } else {
        size
    };
    let used_window = used.0.min(size);
    // Distances back from `avail`: the placement at position p is `avail - p` (1..), the
    // return at used position u is `avail - u` (pending + 1..).
    let mut newest_placement: BTreeMap<u16, u16> = BTreeMap::new();
    queue.set_next_avail((avail - Wrapping(avail_window)).0);
    let mut back = avail_window;
    let entries = queue.iter(mem).map_err(|_| InFlightError::Unreadable)?;
    for chain in entries.take(usize::from(avail_window)) {
        newest_placement.insert(chain.head_index(), back);
        back = back.saturating_sub(1);
    }
    let mut newest_return: BTreeMap<u16, u32> = BTreeMap::new();
    let used_ring = queue.used_ring();
    for k in (1..=used_window).rev() {
        let u = used - Wrapping(k);
        let slot = u64::from(u.0 % size);
        let addr = used_ring
            .checked_add(RING_HEADER + USED_ELEM * slot)
            .ok_or(InFlightError::Unreadable)?;
        let id: u32 = mem
            .read_obj(GuestAddress(addr))
            .map_err(|_| InFlightError::Unreadable)?;
        if let Ok(id) = u16::try_from(id) {
            newest_return.insert(id, u32::from(pending) + u32::from(k));
        }
    }
    let size32 = u32::from(size);
    let mut sure = Vec::new();
    let mut ambiguous = Vec::new();
    for (&head, &placed) in &newest_placement {
        if head >= size {
            continue;
        }
        let placed32 = u32::from(placed);
        match newest_return.get(&head) {
            Some(&returned) if returned <= placed32 => {}
            Some(&returned) if returned < placed32 + size32 => {
                ambiguous.push((returned - placed32, placed, head));
            }
            _ => sure.push((placed, head)),
        }
    }
    let wanted = usize::from(pending);
    // Newest first among the sure ones; then the ambiguous returned longest before placement.
    sure.sort_unstable();
    sure.truncate(wanted);
    ambiguous.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let missing = wanted.saturating_sub(sure.len());
    sure.extend(ambiguous.iter().take(missing).map(|&(_, p, h)| (p, h)));
    if sure.len() < wanted {
        remio_ratelimit::warn_rl!(
            "virtio-mmio failover: {} of {wanted} requests in flight are older than the ring \
             keeps: they cannot be returned",
            wanted - sure.len()
        );
    }
    // Oldest first, as positions.
    sure.sort_unstable_by_key(|&(back, _)| std::cmp::Reverse(back));
    Ok(sure
        .into_iter()
        .map(|(back, head)| (avail - Wrapping(back), head))
        .collect())
}

/// Sets the status byte of the virtio-blk request at avail `position` to IOERR: the last byte
/// of the chain's last device-writable descriptor (virtio 1.2 §5.2.6). Returns the used length
/// (1 when written, 0 when the chain has no such byte).
fn fail_block_request(queue: &mut Queue, mem: &GuestMemoryMmap, position: Wrapping<u16>) -> u32 {
    queue.set_next_avail(position.0);
    let Some(chain) = queue.iter(mem).ok().and_then(|mut it| it.next()) else {
        return 0;
    };
    let Some(last) = chain.writable().last() else {
        return 0;
    };
    let Some(status) = last
        .len()
        .checked_sub(1)
        .and_then(|off| last.addr().checked_add(u64::from(off)))
    else {
        return 0;
    };
    u32::from(mem.write_obj(BLK_IOERR, status).is_ok())
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};

    use super::*;

    const SIZE: u16 = 8;
    const RINGS: u64 = 0x1_0000;
    const DATA: u64 = 0x5_0000;
    const STATUS: u64 = 0x7_0000;

    /// A split queue of `SIZE` entries laid out in guest memory at `RINGS`: descriptor table,
    /// then the available ring and the used ring a page apart.
    struct Vq<'a>(&'a GuestMemoryMmap);

    impl Vq<'_> {
        fn desc_table_addr(&self) -> GuestAddress {
            GuestAddress(RINGS)
        }
        fn avail_addr(&self) -> GuestAddress {
            GuestAddress(RINGS + 0x1000)
        }
        fn used_addr(&self) -> GuestAddress {
            GuestAddress(RINGS + 0x2000)
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn write_reg(f: &mut MmioFailover, reg: u32, value: u64) {
        f.observe_write(u64::from(reg), 4, value);
    }

    /// The driver's side of probing a block device and programming queue 0 at `vq`'s rings.
    fn driver(vq: &Vq<'_>) -> MmioFailover {
        let mut f = MmioFailover::new();
        f.observe_read(
            u64::from(VIRTIO_MMIO_DEVICE_ID),
            4,
            u64::from(VIRTIO_ID_BLOCK),
        );
        f.observe_read(0x100, 8, 0x2_0000);
        program(
            &mut f,
            u64::from(SIZE),
            [vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0],
        );
        write_reg(&mut f, VIRTIO_MMIO_STATUS, 0xf);
        f
    }

    /// Programs queue 0 with `size` and the rings at `[desc, avail, used]`, then makes it ready.
    fn program(f: &mut MmioFailover, size: u64, rings: [u64; 3]) {
        write_reg(f, VIRTIO_MMIO_QUEUE_SEL, 0);
        write_reg(f, VIRTIO_MMIO_QUEUE_NUM, size);
        let regs = [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH),
            (VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH),
        ];
        for ((low, high), addr) in regs.into_iter().zip(rings) {
            write_reg(f, low, addr & 0xffff_ffff);
            write_reg(f, high, addr >> 32);
        }
        write_reg(f, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    fn store(vq: &Vq<'_>, i: u16, addr: u64, len: u32, flags: u32, next: u16) {
        let flags = u16::try_from(flags).unwrap();
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        vq.0.write_obj(d, GuestAddress(vq.desc_table_addr().0 + 16 * u64::from(i)))
            .unwrap();
    }

    /// A block request on descriptors `head..head + 3` (header, data, status byte at
    /// `STATUS + head`), made available.
    fn block_request(mem: &GuestMemoryMmap, vq: &Vq<'_>, head: u16) {
        store(vq, head, DATA, 16, VRING_DESC_F_NEXT, head + 1);
        store(
            vq,
            head + 1,
            DATA + 0x1000,
            512,
            VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
            head + 2,
        );
        store(
            vq,
            head + 2,
            STATUS + u64::from(head),
            1,
            VRING_DESC_F_WRITE,
            0,
        );
        mem.write_obj(0xffu8, GuestAddress(STATUS + u64::from(head)))
            .unwrap();
        make_available(mem, vq, head);
    }

    fn make_available(mem: &GuestMemoryMmap, vq: &Vq<'_>, head: u16) {
        let idx_addr = vq.avail_addr().0 + 2;
        let idx: u16 = mem.read_obj(GuestAddress(idx_addr)).unwrap();
        let slot = vq.avail_addr().0 + 4 + 2 * u64::from(idx % SIZE);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(idx_addr))
            .unwrap();
    }

    /// What a device did before it died: returned `head` with `len`.
    fn device_returns(mem: &GuestMemoryMmap, vq: &Vq<'_>, head: u16) {
        let idx = used_idx(mem, vq);
        let elem = vq.used_addr().0 + 4 + 8 * u64::from(idx % SIZE);
        mem.write_obj(u32::from(head), GuestAddress(elem)).unwrap();
        mem.write_obj(1u32, GuestAddress(elem + 4)).unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(vq.used_addr().0 + 2))
            .unwrap();
    }

    fn used_idx(mem: &GuestMemoryMmap, vq: &Vq<'_>) -> u16 {
        mem.read_obj(GuestAddress(vq.used_addr().0 + 2)).unwrap()
    }

    /// The (id, len) of used element `k` (by position).
    fn used_elem(mem: &GuestMemoryMmap, vq: &Vq<'_>, k: u16) -> (u32, u32) {
        let elem = vq.used_addr().0 + 4 + 8 * u64::from(k % SIZE);
        (
            mem.read_obj(GuestAddress(elem)).unwrap(),
            mem.read_obj(GuestAddress(elem + 4)).unwrap(),
        )
    }

    fn status_byte(mem: &GuestMemoryMmap, head: u16) -> u32 {
        u32::from(
            mem.read_obj::<u8>(GuestAddress(STATUS + u64::from(head)))
                .unwrap(),
        )
    }

    #[test]
    fn failing_returns_queued_block_requests_with_ioerr_and_says_so() {
        let mem = memory();
        let vq = Vq(&mem);
        let mut f = driver(&vq);
        block_request(&mem, &vq, 0);
        block_request(&mem, &vq, 3);

        let raise = f.fail(Some(&mem));

        assert!(raise);
        assert_eq!(used_idx(&mem, &vq), 2);
        assert_eq!(
            (used_elem(&mem, &vq, 0), used_elem(&mem, &vq, 1)),
            ((0, 1), (3, 1))
        );
        assert_eq!(
            (status_byte(&mem, 0), status_byte(&mem, 3)),
            (VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_IOERR)
        );
        let isr = f.read(u64::from(VIRTIO_MMIO_INTERRUPT_STATUS), 4);
        assert_eq!(
            isr,
            u64::from(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG)
        );
    }

    #[test]
    fn a_failure_with_nothing_queued_still_says_used_buffers_for_completions_the_driver_missed() {
        let mem = memory();
        let vq = Vq(&mem);
        let mut f = driver(&vq);

        let raise = f.fail(Some(&mem));

        assert!(raise);
        let isr = f.read(u64::from(VIRTIO_MMIO_INTERRUPT_STATUS), 4);
        assert_eq!(
            isr,
            u64::from(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG)
        );
    }

    #[test]
    fn a_failed_window_reads_needs_reset_replays_other_reads_and_acks_interrupts() {
        let mem = memory();
        let vq = Vq(&mem);
        let mut f = driver(&vq);
        f.fail(Some(&mem));

        let raise = f.write(u64::from(VIRTIO_MMIO_INTERRUPT_ACK), 4, 3, Some(&mem));

        assert!(!raise);
        assert_eq!(
            f.read(u64::from(VIRTIO_MMIO_STATUS), 4),
            u64::from(0xf | VIRTIO_CONFIG_S_NEEDS_RESET)
        );
        assert_eq!(f.read(0x100, 8), 0x2_0000);
        assert_eq!(
            f.read(u64::from(VIRTIO_MMIO_DEVICE_ID), 4),
            u64::from(VIRTIO_ID_BLOCK)
        );
        assert_eq!(f.read(u64::from(VIRTIO_MMIO_INTERRUPT_STATUS), 4), 0);
        assert_eq!(f.read(0x100, 4), 0, "never read at that width");
    }

    #[test]
    fn a_request_queued_after_the_failure_fails_on_its_notify_and_the_next_kick_is_asked_for() {
        let mem = memory();
        let vq = Vq(&mem);
        let mut f = driver(&vq);
        f.fail(Some(&mem));
        block_request(&mem, &vq, 0);

        let raise = f.write(u64::from(VIRTIO_MMIO_QUEUE_NOTIFY), 4, 0, Some(&mem));

        assert!(raise);
        assert_eq!(used_idx(&mem, &vq), 1);
        assert_eq!(status_byte(&mem, 0), VIRTIO_BLK_S_IOERR);
        let avail_event: u16 = mem
            .read_obj(GuestAddress(vq.used_addr().0 + 4 + 8 * u64::from(SIZE)))
            .unwrap();
        assert_eq!(avail_event, 1);
    }

    #[test]
    fn a_request_queued_without_a_notify_fails_on_the_next_sweep() {
        let mem = memory();
        let vq = Vq(&mem);
        let mut f = driver(&vq);
        assert!(!f.sweep(Some(&mem)), "a live window is not swept");
        f.fail(Some(&mem));
        block_request(&mem, &vq, 0);

        let raise = f.sweep(Some(&mem));

        assert!(raise);
        assert_eq!(used_idx(&mem, &vq), 1);
    }

    #[test]
    fn an_indirect_block_request_gets_ioerr_in_its_table() {
        let mem = memory();
        let vq = Vq(&mem);
        let mut f = driver(&vq);
        let table = 0x4_0000u64;
        let entries = [
            SplitDescriptor::new(DATA, 16, u16::try_from(VRING_DESC_F_NEXT).unwrap(), 1),
            SplitDescriptor::new(STATUS + 5, 1, u16::try_from(VRING_DESC_F_WRITE).unwrap(), 0),
        ];
        for (i, d) in entries.into_iter().enumerate() {
            mem.write_obj(RawDescriptor::from(d), GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        store(&vq, 5, table, 32, VRING_DESC_F_INDIRECT, 0);
        make_available(&mem, &vq, 5);

        f.fail(Some(&mem));

        assert_eq!(status_byte(&mem, 5), VIRTIO_BLK_S_IOERR);
        assert_eq!(used_elem(&mem, &vq, 0), (5, 1));
    }

    #[test]
    fn a_request_the_device_completed_out_of_order_is_not_returned_twice() {
        let mem = memory();
        let vq = Vq(&mem);
        let mut f = driver(&vq);
        block_request(&mem, &vq, 0);
        block_request(&mem, &vq, 3);
        // The device finished the second request first, then died.
        device_returns(&mem, &vq, 3);

        f.fail(Some(&mem));

        assert_eq!(used_idx(&mem, &vq), 2);
        assert_eq!(
            used_elem(&mem, &vq, 1),
            (0, 1),
            "the first request, not the second again"
        );
        assert_eq!(status_byte(&mem, 0), VIRTIO_BLK_S_IOERR);
        assert_eq!(status_byte(&mem, 3), 0xff);
    }

    #[test]
    fn a_head_returned_out_of_order_and_made_available_again_is_in_flight_once() {
        let mem = memory();
        let vq = Vq(&mem);
        let mut f = driver(&vq);
        block_request(&mem, &vq, 0);
        block_request(&mem, &vq, 3);
        device_returns(&mem, &vq, 3);
        // The driver reuses head 3 at once: in flight now are head 0 (position 0) and head 3
        // (position 2). Walking [used, avail) would return head 3 twice and never head 0.
        block_request(&mem, &vq, 3);

        f.fail(Some(&mem));

        assert_eq!(used_idx(&mem, &vq), 3);
        assert_eq!(
            (used_elem(&mem, &vq, 1), used_elem(&mem, &vq, 2)),
            ((0, 1), (3, 1))
        );
    }

    #[test]
    fn in_order_completion_with_reused_heads_across_the_ring_wrap_returns_exactly_the_tail() {
        let mem = memory();
        let vq = Vq(&mem);
        let mut f = driver(&vq);
        // 11 requests on head 0 and 3 alternately, the first 9 completed in order.
        for k in 0..11u16 {
            let head = if k % 2 == 0 { 0 } else { 3 };
            block_request(&mem, &vq, head);
            if k < 9 {
                device_returns(&mem, &vq, head);
            }
        }

        f.fail(Some(&mem));

        assert_eq!(used_idx(&mem, &vq), 11);
        assert_eq!(
            (used_elem(&mem, &vq, 9), used_elem(&mem, &vq, 10)),
            ((3, 1), (0, 1))
        );
    }

    #[test]
    fn a_reset_forgets_the_queues() {
        let mem = memory();
        let vq = Vq(&mem);
        let mut f = driver(&vq);
        block_request(&mem, &vq, 0);
        write_reg(&mut f, VIRTIO_MMIO_STATUS, 0);

        let raise = f.fail(Some(&mem));

        assert!(!raise);
        assert_eq!(used_idx(&mem, &vq), 0);
        assert_eq!(f.read(u64::from(VIRTIO_MMIO_STATUS), 4), 0);
    }

    #[test]
    fn rings_at_the_top_of_the_address_space_or_outside_memory_are_refused() {
        let mem = memory();
        let vq = Vq(&mem);
        let (desc, avail, used) = (vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0);
        block_request(&mem, &vq, 0);
        let top = !0xfffu64;
        for rings in [
            [desc, top, used],
            [desc, avail, top],
            [top, avail, used],
            [desc, avail, 0x10_0000 - 8],
        ] {
            let mut f = driver(&vq);
            program(&mut f, u64::from(SIZE), rings);

            f.fail(Some(&mem));
            f.sweep(Some(&mem));

            assert_eq!(used_idx(&mem, &vq), 0, "rings {rings:x?}");
        }
    }

    #[test]
    fn a_huge_queue_whose_used_ring_would_wrap_around_writes_nothing() {
        let mem = memory();
        let vq = Vq(&mem);
        block_request(&mem, &vq, 0);
        mem.write_obj(0xabcdu16, GuestAddress(0x104)).unwrap();
        let size = 0x8000u64;
        // used + 4 + 8 * size wraps to 0x104.
        let used = 0u64.wrapping_sub(8 * size).wrapping_add(0x100);
        let mut f = driver(&vq);
        program(
            &mut f,
            size,
            [vq.desc_table_addr().0, vq.avail_addr().0, used],
        );

        f.fail(Some(&mem));

        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x104)).unwrap(), 0xabcd);
        assert_eq!(status_byte(&mem, 0), 0xff);
    }

    #[test]
    fn sizes_that_are_not_queue_sizes_are_refused() {
        let mem = memory();
        let vq = Vq(&mem);
        block_request(&mem, &vq, 0);
        let rings = [vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0];
        for size in [u64::from(u32::MAX), 0x1_0000, 0x1_0008, 0, 3, 0x8000_0000] {
            let mut f = driver(&vq);
            program(&mut f, size, rings);

            f.fail(Some(&mem));

            assert_eq!(used_idx(&mem, &vq), 0, "size {size:#x}");
        }
    }

    #[test]
    fn more_in_flight_than_the_queue_holds_is_refused() {
        let mem = memory();
        let vq = Vq(&mem);
        let mut f = driver(&vq);
        block_request(&mem, &vq, 0);
        mem.write_obj(SIZE + 1, GuestAddress(vq.avail_addr().0 + 2))
            .unwrap();

        f.fail(Some(&mem));

        assert_eq!(used_idx(&mem, &vq), 0);
    }

    #[test]
    fn an_indirect_table_at_the_top_of_the_address_space_is_not_followed() {
        let mem = memory();
        let vq = Vq(&mem);
        let mut f = driver(&vq);
        store(&vq, 5, u64::MAX - 15, 32, VRING_DESC_F_INDIRECT, 0);
        make_available(&mem, &vq, 5);

        f.fail(Some(&mem));

        assert_eq!(
            used_elem(&mem, &vq, 0),
            (5, 0),
            "returned, with nothing written"
        );
    }

    #[test]
    fn garbage_at_every_offset_and_width_never_panics() {
        let mem = memory();
        let vq = Vq(&mem);
        let mut f = driver(&vq);
        block_request(&mem, &vq, 0);
        for (round, value) in [u64::MAX, 0x8000_0000_0000_0001, 0xffff_ffff, 0]
            .into_iter()
            .enumerate()
        {
            if round == 2 {
                f.fail(Some(&mem));
            }
            for offset in (0..0x210u64).chain([u64::MAX - 3, u64::from(u32::MAX) + 0x70]) {
                for width in [0u8, 1, 2, 3, 4, 8, 16, u8::MAX] {
                    f.observe_read(offset, width, value);
                    f.observe_write(offset, width, value);
                    f.write(offset, width, value, Some(&mem));
                    f.read(offset, width);
                    f.write(u64::from(VIRTIO_MMIO_QUEUE_NOTIFY), 4, value, Some(&mem));
                }
            }
        }

        assert!(f.is_failed());
    }
}
