//! What the guest sees of a device whose device model died: a failed device, not a hang.
//!
//! Every virtio register lives in the device-model process. When that process dies, the
//! requests the guest driver has already put in its virtqueues are lost with it, and Linux
//! waits for them forever: `virtio_blk` has no request timeout, and it does not recover from
//! DEVICE_NEEDS_RESET. The hypervisor model can only complete the *register accesses* of a dead
//! session (a read returns 0) — it knows nothing of virtqueues.
//!
//! [`Failover`] sits between the bridge and the hypervisor model. While the device model
//! lives, it forwards every access and keeps a shadow of what the driver programmed (queue
//! addresses, sizes, ready bits, status) and of the last value read at each register. When the
//! device model is declared dead ([`Failover::fail`]), the bridge answers that window itself,
//! as a failed virtio-mmio device (virtio 1.2 §4.2.2):
//!
//! - Status reads DEVICE_NEEDS_RESET (§2.1.2) on top of what the driver set, and a
//!   configuration-change interrupt says so;
//! - every request in a virtqueue (those already there and every one added later, on
//!   QueueNotify and on each [`Failover::sweep`]) is returned in the used ring with nothing
//!   written — for virtio-blk with status `VIRTIO_BLK_S_IOERR` (§5.2.6), so the guest's I/O
//!   fails with EIO in bounded time;
//! - InterruptStatus/InterruptACK work; any other read replays the last value read there.
//!
//! Requests are assumed to complete in order (remio's devices do: one worker per queue takes
//! chains in ring order), so the outstanding chains are the avail ring entries from the used
//! index to the avail index.

use std::collections::BTreeMap;
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

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
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::pci::WINDOW_SIZE;
use super::remote::{MmioTarget, TargetError};

/// virtio-blk's IOERR status byte (virtio 1.2 §5.2.6).
#[expect(
    clippy::cast_possible_truncation,
    reason = "the status is a byte; the assert checks the value fits"
)]
const BLK_IOERR: u8 = {
    assert!(VIRTIO_BLK_S_IOERR <= 0xff);
    VIRTIO_BLK_S_IOERR as u8
};

/// Raises window `i`'s interrupt.
pub type RaiseIrq = Box<dyn Fn() + Send + Sync>;

/// Queues a shadow tracks per window (virtio-mmio has no limit; remio's devices use ≤ 2).
const MAX_QUEUES: usize = 64;

/// What the driver programmed for one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct QueueShadow {
    num: u32,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

/// One window's shadow and failure state.
#[derive(Debug, Default)]
struct WindowState {
    failed: bool,
    device_id: u32,
    status: u32,
    isr: u32,
    queue_sel: u32,
    queues: Vec<QueueShadow>,
    /// The last value read at each (offset, width), replayed once failed.
    reads: BTreeMap<(u64, u8), u64>,
}

fn set_low(v: &mut u64, low: u64) {
    *v = (*v & !0xffff_ffff) | (low & 0xffff_ffff);
}

fn set_high(v: &mut u64, high: u64) {
    *v = (*v & 0xffff_ffff) | ((high & 0xffff_ffff) << 32);
}

impl WindowState {
    fn queue(&mut self) -> Option<&mut QueueShadow> {
        let i = usize::try_from(self.queue_sel).ok()?;
        if i >= MAX_QUEUES {
            return None;
        }
        if self.queues.len() <= i {
            self.queues.resize(i + 1, QueueShadow::default());
        }
        self.queues.get_mut(i)
    }

    /// Records a driver write into the shadow.
    fn record_write(&mut self, off: u32, value: u64) {
        match off {
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = u32::try_from(value).unwrap_or(u32::MAX),
            VIRTIO_MMIO_STATUS => {
                self.status = u32::try_from(value & 0xff).unwrap_or(0);
                if self.status == 0 {
                    // Device reset (virtio 1.2 §4.2.2.1): the queues are gone.
                    self.queues.clear();
                    self.queue_sel = 0;
                    self.isr = 0;
                }
            }
            _ => {
                let Some(q) = self.queue() else { return };
                match off {
                    VIRTIO_MMIO_QUEUE_NUM => q.num = u32::try_from(value).unwrap_or(0),
                    VIRTIO_MMIO_QUEUE_READY => q.ready = value & 1 == 1,
                    VIRTIO_MMIO_QUEUE_DESC_LOW => set_low(&mut q.desc, value),
                    VIRTIO_MMIO_QUEUE_DESC_HIGH => set_high(&mut q.desc, value),
                    VIRTIO_MMIO_QUEUE_AVAIL_LOW => set_low(&mut q.avail, value),
                    VIRTIO_MMIO_QUEUE_AVAIL_HIGH => set_high(&mut q.avail, value),
                    VIRTIO_MMIO_QUEUE_USED_LOW => set_low(&mut q.used, value),
                    VIRTIO_MMIO_QUEUE_USED_HIGH => set_high(&mut q.used, value),
                    _ => {}
                }
            }
        }
    }

    /// A read of a failed window.
    fn failed_read(&self, off: u32, width: u8) -> u64 {
        match off {
            VIRTIO_MMIO_STATUS if self.status == 0 => 0,
            VIRTIO_MMIO_STATUS => u64::from(self.status | VIRTIO_CONFIG_S_NEEDS_RESET),
            VIRTIO_MMIO_INTERRUPT_STATUS => u64::from(self.isr),
            _ => self
                .reads
                .get(&(u64::from(off), width))
                .copied()
                .unwrap_or(0),
        }
    }
}

/// The failover layer of one bridge (see the module docs).
pub struct Failover {
    inner: Arc<dyn MmioTarget>,
    windows: Vec<u64>,
    /// Lock order: one window's state at a time; never held across an inner access.
    states: Vec<Mutex<WindowState>>,
    mem: Option<GuestMemoryMmap>,
    raise: Vec<RaiseIrq>,
}

impl std::fmt::Debug for Failover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Failover")
            .field("windows", &self.windows)
            .finish_non_exhaustive()
    }
}

impl Failover {
    /// Forwards accesses to the windows starting at `windows[i]` to `inner`; once window `i`
    /// failed, completes its requests in `mem` (guest RAM; without it requests stay pending)
    /// and raises `raise[i]`.
    pub fn new(
        inner: Arc<dyn MmioTarget>,
        windows: Vec<u64>,
        mem: Option<GuestMemoryMmap>,
        raise: Vec<RaiseIrq>,
    ) -> Self {
        let states = windows
            .iter()
            .map(|_| Mutex::new(WindowState::default()))
            .collect();
        Self {
            inner,
            windows,
            states,
            mem,
            raise,
        }
    }

    /// Window index and register offset of `addr`.
    fn locate(&self, addr: u64) -> Option<(usize, u32)> {
        self.windows.iter().enumerate().find_map(|(i, &base)| {
            let off = addr.checked_sub(base).filter(|&o| o < WINDOW_SIZE)?;
            Some((i, u32::try_from(off).ok()?))
        })
    }

    fn state(&self, i: usize) -> Option<MutexGuard<'_, WindowState>> {
        // A poisoned lock only means a panic elsewhere; the shadow is still usable.
        self.states
            .get(i)
            .map(|m| m.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Declares window `i`'s device model dead: from now on the window is a failed device.
    /// Idempotent; returns whether `i` is a window.
    pub fn fail(&self, i: usize) -> bool {
        let Some(mut st) = self.state(i) else {
            return false;
        };
        if !st.failed {
            st.failed = true;
            log::warn!(
                "qemu bridge: window {i} (device id {}) has lost its device model: failing its \
                 requests (DEVICE_NEEDS_RESET)",
                st.device_id
            );
            if st.status != 0 {
                // VRING too: the dead device model may have completed requests whose interrupt
                // the driver never saw (its InterruptStatus read was in flight and completed
                // with 0), and only a used-buffer interrupt makes it look at the used rings
                // again. With nothing new there, Linux's vring_interrupt does nothing.
                st.isr |= VIRTIO_MMIO_INT_CONFIG | VIRTIO_MMIO_INT_VRING;
                self.raise(i);
            }
        }
        self.complete_all(i, &mut st);
        true
    }

    /// Whether window `i` was failed.
    pub fn is_failed(&self, i: usize) -> bool {
        self.state(i).is_some_and(|s| s.failed)
    }

    /// Completes whatever the driver queued on every failed window since the last pass (a
    /// request whose notification was suppressed is not left behind).
    pub fn sweep(&self) {
        for i in 0..self.states.len() {
            if let Some(mut st) = self.state(i) {
                if st.failed {
                    self.complete_all(i, &mut st);
                }
            }
        }
    }

    fn raise(&self, i: usize) {
        if let Some(r) = self.raise.get(i) {
            r();
        }
    }

    fn complete_all(&self, i: usize, st: &mut WindowState) {
        let queues = st.queues.clone();
        let mut done = 0usize;
        for q in queues.iter().filter(|q| q.ready) {
            done += self.complete_queue(st, q);
        }
        if done > 0 {
            st.isr |= VIRTIO_MMIO_INT_VRING;
            self.raise(i);
        }
    }

    /// Returns every outstanding chain of `q` to the driver, failed. Returns how many.
    fn complete_queue(&self, st: &mut WindowState, q: &QueueShadow) -> usize {
        let Some(mem) = &self.mem else { return 0 };
        let Some(rings) = Rings::new(q) else {
            remio_ratelimit::warn_rl!(
                "qemu bridge: a failed device's queue of size {} at {:#x}/{:#x}/{:#x} does not \
                 fit the address space",
                q.num,
                q.desc,
                q.avail,
                q.used
            );
            return 0;
        };
        let num = rings.num;
        let r16 = |a: u64| mem.read_obj::<u16>(GuestAddress(a)).ok();
        let mut done = 0usize;
        // Twice at most: a request added while we re-enable notifications is taken too.
        for _ in 0..2 {
            let (Some(avail_idx), Some(used_idx)) = (r16(rings.avail_idx), r16(rings.used_idx))
            else {
                remio_ratelimit::warn_rl!(
                    "qemu bridge: a failed device's rings are outside guest RAM"
                );
                return done;
            };
            let pending = avail_idx.wrapping_sub(used_idx);
            if pending > num {
                remio_ratelimit::warn_rl!(
                    "qemu bridge: avail index {avail_idx} vs used {used_idx}: ring corrupt"
                );
                return done;
            }
            for k in 0..pending {
                let slot = used_idx.wrapping_add(k) % num;
                let Some(head) = r16(rings.avail_slot(slot)) else {
                    return done;
                };
                let len = if st.device_id == VIRTIO_ID_BLOCK {
                    fail_block_chain(mem, q.desc, num, head)
                } else {
                    0
                };
                let elem = rings.used_slot(slot);
                let ok = mem
                    .write_obj(u32::from(head), GuestAddress(elem))
                    .and_then(|()| mem.write_obj(len, GuestAddress(elem + 4)));
                if ok.is_err() {
                    return done;
                }
            }
            // The elements before the index (virtio 1.2 §2.7.8); then ask for every kick:
            // flags 0 and avail_event = what we have taken.
            fence(Ordering::Release);
            let _ = mem.write_obj(used_idx.wrapping_add(pending), GuestAddress(rings.used_idx));
            let _ = mem.write_obj(0u16, GuestAddress(q.used));
            let _ = mem.write_obj(avail_idx, GuestAddress(rings.avail_event));
            fence(Ordering::SeqCst);
            done += usize::from(pending);
            if r16(rings.avail_idx) == Some(avail_idx) {
                break;
            }
        }
        done
    }
}

/// The guest addresses of one split queue's ring fields, computed once with checked arithmetic
/// (the driver programs the bases and the size; virtio 1.2 §2.7). Every address a ring slot can
/// have then fits: the last one, `avail_event`, is the highest.
#[derive(Clone, Copy, Debug)]
struct Rings {
    num: u16,
    avail: u64,
    used: u64,
    avail_idx: u64,
    used_idx: u64,
    avail_event: u64,
}

impl Rings {
    /// `None` when the size is 0 or over 2^16, or a ring's end overflows a u64.
    fn new(q: &QueueShadow) -> Option<Self> {
        let num = u16::try_from(q.num).ok().filter(|&n| n > 0)?;
        let n = u64::from(num);
        // avail: flags, idx, ring[num], used_event (u16 each).
        q.avail.checked_add(n.checked_mul(2)?.checked_add(6)?)?;
        // used: flags, idx, ring[num] of 8-byte elements, avail_event (u16).
        let avail_event = q.used.checked_add(n.checked_mul(8)?.checked_add(4)?)?;
        avail_event.checked_add(2)?;
        // The descriptor table: num 16-byte descriptors.
        q.desc.checked_add(n.checked_mul(16)?)?;
        Some(Self {
            num,
            avail: q.avail,
            used: q.used,
            avail_idx: q.avail.checked_add(2)?,
            used_idx: q.used.checked_add(2)?,
            avail_event,
        })
    }

    /// The address of avail ring entry `slot` (< num; checked in [`Rings::new`]).
    fn avail_slot(&self, slot: u16) -> u64 {
        self.avail + 4 + 2 * u64::from(slot)
    }

    /// The address of used ring element `slot` (< num; checked in [`Rings::new`]).
    fn used_slot(&self, slot: u16) -> u64 {
        self.used + 4 + 8 * u64::from(slot)
    }
}

/// The address of descriptor `idx` of the table at `table`, or `None` if it overflows.
fn descriptor(table: u64, idx: u16) -> Option<u64> {
    table
        .checked_add(16 * u64::from(idx))
        .filter(|d| d.checked_add(16).is_some())
}

/// Sets the status byte of the virtio-blk request at `head` to IOERR (the last byte of the
/// chain's last descriptor, if device-writable). Returns the used length (1 when written).
fn fail_block_chain(mem: &GuestMemoryMmap, desc: u64, num: u16, head: u16) -> u32 {
    let (mut table, mut size, mut idx, mut indirect) = (desc, u32::from(num), head, false);
    // A chain visits each descriptor at most once: bound the walk to catch loops.
    for _ in 0..(u32::from(num) + 1024) {
        if u32::from(idx) >= size {
            return 0;
        }
        let Some(d) = descriptor(table, idx) else {
            return 0;
        };
        let (Ok(addr), Ok(len), Ok(flags), Ok(next)) = (
            mem.read_obj::<u64>(GuestAddress(d)),
            mem.read_obj::<u32>(GuestAddress(d + 8)),
            mem.read_obj::<u16>(GuestAddress(d + 12)),
            mem.read_obj::<u16>(GuestAddress(d + 14)),
        ) else {
            return 0;
        };
        let flags = u32::from(flags);
        if flags & VRING_DESC_F_INDIRECT != 0 && !indirect {
            (table, size, idx, indirect) = (addr, len / 16, 0, true);
            continue;
        }
        if flags & VRING_DESC_F_NEXT != 0 {
            idx = next;
            continue;
        }
        if flags & VRING_DESC_F_WRITE == 0 || len == 0 {
            return 0;
        }
        let Some(status) = addr.checked_add(u64::from(len) - 1) else {
            return 0;
        };
        return u32::from(mem.write_obj(BLK_IOERR, GuestAddress(status)).is_ok());
    }
    0
}

impl MmioTarget for Failover {
    fn read(&self, addr: u64, width: u8) -> Result<u64, TargetError> {
        let Some((i, off)) = self.locate(addr) else {
            return self.inner.read(addr, width);
        };
        if let Some(st) = self.state(i) {
            if st.failed {
                return Ok(st.failed_read(off, width));
            }
        }
        let v = self.inner.read(addr, width)?;
        if let Some(mut st) = self.state(i) {
            if off == VIRTIO_MMIO_DEVICE_ID {
                st.device_id = u32::try_from(v).unwrap_or(0);
            }
            if !matches!(off, VIRTIO_MMIO_STATUS | VIRTIO_MMIO_INTERRUPT_STATUS) {
                st.reads.insert((u64::from(off), width), v);
            }
        }
        Ok(v)
    }

    fn write(&self, addr: u64, width: u8, value: u64) -> Result<(), TargetError> {
        let Some((i, off)) = self.locate(addr) else {
            return self.inner.write(addr, width, value);
        };
        if let Some(mut st) = self.state(i) {
            st.record_write(off, value);
            if st.failed {
                match off {
                    VIRTIO_MMIO_INTERRUPT_ACK => {
                        st.isr &= !u32::try_from(value).unwrap_or(u32::MAX);
                    }
                    VIRTIO_MMIO_QUEUE_NOTIFY => self.complete_all(i, &mut st),
                    _ => {}
                }
                return Ok(());
            }
        }
        self.inner.write(addr, width, value)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;

    const BASE: u64 = 0x1000_0000;
    const DESC: u64 = 0x1_0000;
    const AVAIL: u64 = 0x2_0000;
    const USED: u64 = 0x3_0000;
    const NUM: u16 = 8;

    /// A device-model stand-in: device id 2 (block), counts the accesses it sees.
    #[derive(Default)]
    struct Dm {
        accesses: AtomicU32,
    }

    impl MmioTarget for Dm {
        fn read(&self, addr: u64, _width: u8) -> Result<u64, TargetError> {
            self.accesses.fetch_add(1, Ordering::SeqCst);
            Ok(match u32::try_from(addr - BASE).unwrap() {
                VIRTIO_MMIO_DEVICE_ID => u64::from(VIRTIO_ID_BLOCK),
                0x100 => 0x2_0000, // capacity (config space)
                _ => 0,
            })
        }
        fn write(&self, _addr: u64, _width: u8, _value: u64) -> Result<(), TargetError> {
            self.accesses.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn setup() -> (Failover, Arc<Dm>, GuestMemoryMmap, Arc<AtomicU32>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dm = Arc::new(Dm::default());
        let irqs = Arc::new(AtomicU32::new(0));
        let counter = Arc::clone(&irqs);
        let raise: RaiseIrq = Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let f = Failover::new(dm.clone(), vec![BASE], Some(mem.clone()), vec![raise]);
        // The driver: read the device id, program queue 0, DRIVER_OK.
        f.read(BASE + u64::from(VIRTIO_MMIO_DEVICE_ID), 4).unwrap();
        f.read(BASE + 0x100, 8).unwrap();
        let w = |off: u32, v: u64| f.write(BASE + u64::from(off), 4, v).unwrap();
        w(VIRTIO_MMIO_QUEUE_SEL, 0);
        w(VIRTIO_MMIO_QUEUE_NUM, u64::from(NUM));
        w(VIRTIO_MMIO_QUEUE_DESC_LOW, DESC);
        w(VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        w(VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL);
        w(VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        w(VIRTIO_MMIO_QUEUE_USED_LOW, USED);
        w(VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        w(VIRTIO_MMIO_QUEUE_READY, 1);
        w(VIRTIO_MMIO_STATUS, 0xf);
        (f, dm, mem, irqs)
    }

    fn desc(mem: &GuestMemoryMmap, table: u64, i: u16, addr: u64, len: u32, flags: u32, next: u16) {
        let d = table + 16 * u64::from(i);
        mem.write_obj(addr, GuestAddress(d)).unwrap();
        mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        mem.write_obj(u16::try_from(flags).unwrap(), GuestAddress(d + 12))
            .unwrap();
        mem.write_obj(next, GuestAddress(d + 14)).unwrap();
    }

    /// Queues a block request: header, data, status byte (at `status`), chain head `head`.
    fn block_request(mem: &GuestMemoryMmap, head: u16, status: u64) {
        desc(mem, DESC, head, 0x5_0000, 16, VRING_DESC_F_NEXT, head + 1);
        let write_next = VRING_DESC_F_WRITE | VRING_DESC_F_NEXT;
        desc(mem, DESC, head + 1, 0x6_0000, 512, write_next, head + 2);
        desc(mem, DESC, head + 2, status, 1, VRING_DESC_F_WRITE, 0);
        mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
        let slot = u64::from(idx % NUM);
        mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        mem.write_obj(idx + 1, GuestAddress(AVAIL + 2)).unwrap();
    }

    fn used_idx(mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    #[test]
    fn failing_a_window_returns_queued_block_requests_with_ioerr_and_interrupts() {
        let (f, _dm, mem, irqs) = setup();
        block_request(&mem, 0, 0x7_0000);
        block_request(&mem, 3, 0x7_0010);

        assert!(f.fail(0));

        assert_eq!(used_idx(&mem), 2);
        let elem = |k: u64| {
            let id: u32 = mem.read_obj(GuestAddress(USED + 4 + 8 * k)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(USED + 8 + 8 * k)).unwrap();
            (id, len)
        };
        assert_eq!((elem(0), elem(1)), ((0, 1), (3, 1)));
        for status in [0x7_0000, 0x7_0010] {
            let s: u8 = mem.read_obj(GuestAddress(status)).unwrap();
            assert_eq!(u32::from(s), VIRTIO_BLK_S_IOERR);
        }
        let isr = f.read(BASE + u64::from(VIRTIO_MMIO_INTERRUPT_STATUS), 4);
        let both = VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG;
        assert_eq!(isr.unwrap(), u64::from(both));
        assert_eq!(
            irqs.load(Ordering::SeqCst),
            2,
            "config change, then used buffers"
        );
    }

    #[test]
    fn a_failure_with_nothing_queued_still_says_used_buffers_for_completions_the_driver_missed() {
        let (f, _dm, _mem, irqs) = setup();

        assert!(f.fail(0));

        let isr = f.read(BASE + u64::from(VIRTIO_MMIO_INTERRUPT_STATUS), 4);
        let both = VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG;
        assert_eq!(isr.unwrap(), u64::from(both));
        assert_eq!(irqs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_failed_window_is_answered_without_the_device_model() {
        let (f, dm, _mem, _) = setup();
        f.fail(0);
        let before = dm.accesses.load(Ordering::SeqCst);

        let status = f.read(BASE + u64::from(VIRTIO_MMIO_STATUS), 4).unwrap();
        let capacity = f.read(BASE + 0x100, 8).unwrap();
        let id = f.read(BASE + u64::from(VIRTIO_MMIO_DEVICE_ID), 4).unwrap();
        f.write(BASE + u64::from(VIRTIO_MMIO_INTERRUPT_ACK), 4, 3)
            .unwrap();
        let isr = f
            .read(BASE + u64::from(VIRTIO_MMIO_INTERRUPT_STATUS), 4)
            .unwrap();

        assert_eq!(status, u64::from(0xf | VIRTIO_CONFIG_S_NEEDS_RESET));
        assert_eq!((capacity, id), (0x2_0000, u64::from(VIRTIO_ID_BLOCK)));
        assert_eq!(isr, 0);
        assert_eq!(dm.accesses.load(Ordering::SeqCst), before);
    }

    #[test]
    fn a_request_queued_after_the_failure_fails_on_its_notify() {
        let (f, _dm, mem, irqs) = setup();
        f.fail(0);
        let after_fail = irqs.load(Ordering::SeqCst);
        block_request(&mem, 0, 0x7_0000);

        f.write(BASE + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY), 4, 0)
            .unwrap();

        assert_eq!(used_idx(&mem), 1);
        let s: u8 = mem.read_obj(GuestAddress(0x7_0000)).unwrap();
        assert_eq!(u32::from(s), VIRTIO_BLK_S_IOERR);
        assert_eq!(irqs.load(Ordering::SeqCst), after_fail + 1);
        let avail_event: u16 = mem
            .read_obj(GuestAddress(USED + 4 + 8 * u64::from(NUM)))
            .unwrap();
        assert_eq!(
            avail_event, 1,
            "the driver is asked to kick the next request"
        );
    }

    #[test]
    fn an_indirect_block_request_gets_ioerr_in_its_table() {
        let (f, _dm, mem, _) = setup();
        let table = 0x4_0000;
        desc(&mem, table, 0, 0x5_0000, 16, VRING_DESC_F_NEXT, 1);
        desc(&mem, table, 1, 0x7_0020, 1, VRING_DESC_F_WRITE, 0);
        desc(&mem, DESC, 5, table, 32, VRING_DESC_F_INDIRECT, 0);
        mem.write_obj(5u16, GuestAddress(AVAIL + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();

        f.fail(0);

        let s: u8 = mem.read_obj(GuestAddress(0x7_0020)).unwrap();
        assert_eq!(u32::from(s), VIRTIO_BLK_S_IOERR);
        assert_eq!(used_idx(&mem), 1);
    }

    /// Programs queue 0 of the window `setup` made with hostile values, as a guest may.
    fn program_queue0(f: &Failover, num: u64, desc: u64, avail: u64, used: u64) {
        let w = |off: u32, v: u64| f.write(BASE + u64::from(off), 4, v).unwrap();
        w(VIRTIO_MMIO_QUEUE_SEL, 0);
        w(VIRTIO_MMIO_QUEUE_NUM, num);
        for (low, high, v) in [
            (
                VIRTIO_MMIO_QUEUE_DESC_LOW,
                VIRTIO_MMIO_QUEUE_DESC_HIGH,
                desc,
            ),
            (
                VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                avail,
            ),
            (
                VIRTIO_MMIO_QUEUE_USED_LOW,
                VIRTIO_MMIO_QUEUE_USED_HIGH,
                used,
            ),
        ] {
            w(low, v & 0xffff_ffff);
            w(high, v >> 32);
        }
        w(VIRTIO_MMIO_QUEUE_READY, 1);
    }

    #[test]
    fn rings_at_the_top_of_the_address_space_are_refused_without_overflow() {
        let (f, _dm, mem, _) = setup();
        block_request(&mem, 0, 0x7_0000);
        for (avail, used) in [
            (u64::MAX - 1, USED),
            (AVAIL, u64::MAX - 7),
            (u64::MAX, u64::MAX),
        ] {
            program_queue0(&f, u64::from(NUM), DESC, avail, used);

            f.fail(0);
            f.sweep();

            assert_eq!(used_idx(&mem), 0, "avail {avail:#x} used {used:#x}");
        }
    }

    #[test]
    fn a_huge_queue_whose_used_ring_wraps_around_writes_nothing_at_the_bottom_of_ram() {
        let (f, _dm, mem, _) = setup();
        block_request(&mem, 0, 0x7_0000);
        // used + 4 + 8 * 0x8000 wraps to 0x104: a wrapping build wrote avail_event there.
        let num = 0x8000u64;
        let used = 0u64.wrapping_sub(8 * num).wrapping_add(0x100);
        mem.write_obj(0xabcdu16, GuestAddress(0x104)).unwrap();
        program_queue0(&f, num, DESC, AVAIL, used);

        f.fail(0);

        let at_0x104: u16 = mem.read_obj(GuestAddress(0x104)).unwrap();
        assert_eq!(at_0x104, 0xabcd);
        let status: u8 = mem.read_obj(GuestAddress(0x7_0000)).unwrap();
        assert_eq!(status, 0xff, "a refused queue's requests are not touched");
    }

    #[test]
    fn queue_sizes_over_u16_and_descriptor_tables_past_the_end_are_refused() {
        let (f, _dm, mem, _) = setup();
        block_request(&mem, 0, 0x7_0000);
        for (num, desc) in [(u64::from(u32::MAX), DESC), (0x1_0000, DESC), (0, DESC)] {
            program_queue0(&f, num, desc, AVAIL, USED);
            f.fail(0);
            assert_eq!(used_idx(&mem), 0, "num {num:#x} desc {desc:#x}");
        }
        program_queue0(&f, u64::from(NUM), u64::MAX - 16 * 4, AVAIL, USED);

        f.sweep();

        assert_eq!(used_idx(&mem), 0, "a table that overflows is refused");
    }

    #[test]
    fn an_indirect_table_at_the_top_of_the_address_space_is_not_followed() {
        let (f, _dm, mem, _) = setup();
        desc(&mem, DESC, 5, u64::MAX - 7, 32, VRING_DESC_F_INDIRECT, 0);
        mem.write_obj(5u16, GuestAddress(AVAIL + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();

        f.fail(0);

        assert_eq!(
            used_idx(&mem),
            1,
            "the request is returned, with nothing written"
        );
        let len: u32 = mem.read_obj(GuestAddress(USED + 8)).unwrap();
        assert_eq!(len, 0);
    }

    #[test]
    fn a_live_window_forwards_everything_and_a_reset_forgets_the_queues() {
        let (f, dm, mem, irqs) = setup();
        block_request(&mem, 0, 0x7_0000);
        f.write(BASE + u64::from(VIRTIO_MMIO_STATUS), 4, 0).unwrap();
        let before = dm.accesses.load(Ordering::SeqCst);
        f.read(BASE + u64::from(VIRTIO_MMIO_STATUS), 4).unwrap();
        assert_eq!(dm.accesses.load(Ordering::SeqCst), before + 1);

        f.fail(0);

        assert_eq!(
            used_idx(&mem),
            0,
            "a reset device has no queues to complete"
        );
        assert_eq!(irqs.load(Ordering::SeqCst), 0);
        let status = f.read(BASE + u64::from(VIRTIO_MMIO_STATUS), 4).unwrap();
        assert_eq!(status, 0);
        assert!(f.is_failed(0) && !f.fail(1));
    }
}
