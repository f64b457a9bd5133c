//! The frontend VM's view: trapped register accesses and the frontend interrupts (NOTIFY).

use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use remio_abi::RemioOp;
use vmm_sys_util::eventfd::EventFd;

use crate::irq::lock;
use crate::slots::{SlotInner, SlotState};
use crate::wait::SlotWaiter;
use crate::{bump, Hypervisor, Pair, TIMEOUT_READ_VALUE};

/// One frontend device, as the frontend VM sees it.
#[derive(Clone, Debug)]
pub struct FrontendDevice {
    /// Its index among this VM's frontend devices (configuration order).
    pub index: usize,
    /// The pair's bind key.
    pub bind_key: u32,
    /// Guest-physical base of the trapped MMIO window.
    pub mmio_base: u64,
    /// Size of the MMIO window.
    pub mmio_size: u64,
    /// The frontend interrupt (injected by NOTIFY).
    pub irq: u32,
    /// The shared-memory region's id.
    pub shmem_id: u32,
    /// Guest-physical base of the shared memory (the same in both VMs).
    pub shmem_base: u64,
    /// Size of the shared memory.
    pub shmem_size: u64,
    /// The shared memory: map it `MAP_SHARED` at file offset 0, length <= `shmem_size`.
    pub shmem: Arc<File>,
}

/// A refused register access. Nothing was queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// The width is not 1, 2, 4 or 8.
    #[error("invalid access width {0} (must be 1, 2, 4 or 8)")]
    InvalidWidth(u8),
    /// `[addr, addr + width)` is not inside one device's MMIO window.
    #[error("access of {width} bytes at {addr:#x} is not inside a Remote I/O MMIO window")]
    Unmapped {
        /// The address.
        addr: u64,
        /// The width.
        width: u8,
    },
}

/// Errors of the interrupt-sink calls of [`FrontendVm`].
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// No frontend device with this index.
    #[error("no frontend device {0}")]
    NoSuchDevice(usize),
    /// No frontend device uses this interrupt.
    #[error("no frontend interrupt {0}")]
    NoSuchIrq(u32),
    /// Creating or duplicating the eventfd failed.
    #[error("interrupt eventfd: {0}")]
    Io(#[source] io::Error),
}

/// How an access ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// A read's value (whole, as the backend gave it; [`TIMEOUT_READ_VALUE`] on timeout).
    /// 0 for a write.
    pub value: u64,
    /// The access timed out (see the crate docs).
    pub timed_out: bool,
}

/// A frontend VM: its register accesses trap into the hypervisor. Cheap to clone.
///
/// Accesses may be issued from any number of threads at once (each thread is a vCPU).
#[derive(Clone, Debug)]
pub struct FrontendVm {
    hyp: Arc<Hypervisor>,
    vm: usize,
}

impl FrontendVm {
    pub(crate) fn new(hyp: Arc<Hypervisor>, vm: usize) -> Self {
        Self { hyp, vm }
    }

    /// The VM id.
    pub fn vm_id(&self) -> u32 {
        self.hyp.frontend_vms[self.vm].id
    }

    /// The hypervisor this VM belongs to.
    pub fn hypervisor(&self) -> &Arc<Hypervisor> {
        &self.hyp
    }

    /// This VM's frontend devices, by index (configuration order).
    pub fn devices(&self) -> Vec<FrontendDevice> {
        (0..self.hyp.frontend_vms[self.vm].devices.len())
            .filter_map(|i| self.device(i))
            .collect()
    }

    /// The frontend device `index`, if it exists.
    pub fn device(&self, index: usize) -> Option<FrontendDevice> {
        let p = self.pair(index)?;
        Some(FrontendDevice {
            index: p.frontend_index,
            bind_key: p.bind_key,
            mmio_base: p.mmio_base,
            mmio_size: p.mmio_size,
            irq: p.frontend_irq,
            shmem_id: p.shmem_id,
            shmem_base: p.shmem_base,
            shmem_size: p.shmem_size,
            shmem: Arc::clone(&p.shmem),
        })
    }

    /// A trapped read of `width` bytes at `addr`: stalls until the backend completes it and
    /// returns its value whole (or [`TIMEOUT_READ_VALUE`] on timeout).
    pub fn read(&self, addr: u64, width: u8) -> Result<u64, AccessError> {
        self.access(RemioOp::Read, addr, width, 0).map(|c| c.value)
    }

    /// A trapped write of `value` (the full register value, recorded as given) of `width`
    /// bytes at `addr`: stalls until the backend completes it (or the timeout).
    pub fn write(&self, addr: u64, width: u8, value: u64) -> Result<(), AccessError> {
        self.access(RemioOp::Write, addr, width, value).map(|_| ())
    }

    /// A trapped access with its full outcome. `op` must be [`RemioOp::Read`] or
    /// [`RemioOp::Write`]; ASK and NOTIFY are treated as a read. `value` is ignored for reads.
    ///
    /// Takes a free slot (waiting for one if the pool is exhausted), records the request,
    /// pushes it on the device's FIFO, raises the backend interrupt (whose handler may run
    /// inline on this thread), runs the device's wait helper if one is installed and the
    /// request is not COMPLETE yet (see [`crate::WaitHelper`]), then stalls until COMPLETE or
    /// the timeout.
    pub fn access(
        &self,
        op: RemioOp,
        addr: u64,
        width: u8,
        value: u64,
    ) -> Result<Completion, AccessError> {
        if !matches!(width, 1 | 2 | 4 | 8) {
            return Err(AccessError::InvalidWidth(width));
        }
        let pi = self
            .find(addr, width)
            .ok_or(AccessError::Unmapped { addr, width })?;
        let op = if op == RemioOp::Write {
            RemioOp::Write
        } else {
            RemioOp::Read
        };
        Ok(self.hyp.access(pi, op, addr, width, value))
    }

    /// Installs (or replaces) the callback NOTIFY calls for frontend device `index`. It runs on
    /// the thread issuing NOTIFY; see the crate docs for latching and serialisation.
    pub fn set_interrupt_sink(
        &self,
        index: usize,
        sink: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<(), SinkError> {
        let p = self.pair(index).ok_or(SinkError::NoSuchDevice(index))?;
        p.frontend_line.install(sink, true);
        Ok(())
    }

    /// [`FrontendVm::set_interrupt_sink`] by frontend interrupt number.
    pub fn set_interrupt_sink_for_irq(
        &self,
        irq: u32,
        sink: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<(), SinkError> {
        let index = self.index_of_irq(irq).ok_or(SinkError::NoSuchIrq(irq))?;
        self.set_interrupt_sink(index, sink)
    }

    /// Removes the callback of device `index`; returns when it is not running on another
    /// thread and will not be called again.
    pub fn clear_interrupt_sink(&self, index: usize) -> Result<(), SinkError> {
        let p = self.pair(index).ok_or(SinkError::NoSuchDevice(index))?;
        p.frontend_line.remove();
        Ok(())
    }

    /// An eventfd signalled by every NOTIFY of device `index` (non-blocking; every call
    /// returns a duplicate of the same eventfd). Works alongside a callback.
    pub fn interrupt_eventfd(&self, index: usize) -> Result<EventFd, SinkError> {
        let p = self.pair(index).ok_or(SinkError::NoSuchDevice(index))?;
        p.frontend_line.eventfd().map_err(SinkError::Io)
    }

    /// The frontend device index that uses interrupt `irq`.
    pub fn index_of_irq(&self, irq: u32) -> Option<usize> {
        self.hyp.frontend_vms[self.vm]
            .devices
            .iter()
            .position(|&pi| {
                self.hyp
                    .pairs
                    .get(pi)
                    .is_some_and(|p| p.frontend_irq == irq)
            })
    }

    fn pair(&self, index: usize) -> Option<&Pair> {
        let pi = *self.hyp.frontend_vms[self.vm].devices.get(index)?;
        self.hyp.pairs.get(pi)
    }

    /// The pair whose MMIO window holds all of `[addr, addr + width)`.
    fn find(&self, addr: u64, width: u8) -> Option<usize> {
        let end = addr.checked_add(u64::from(width))?;
        let (_, &pi) = self.hyp.frontend_vms[self.vm]
            .windows
            .range(..=addr)
            .next_back()?;
        let p = self.hyp.pairs.get(pi)?;
        (end <= p.mmio_base + p.mmio_size).then_some(pi)
    }
}

impl Hypervisor {
    /// The trapped-access path (see [`FrontendVm::access`] and the crate docs).
    pub(crate) fn access(
        &self,
        pi: usize,
        op: RemioOp,
        addr: u64,
        width: u8,
        value: u64,
    ) -> Completion {
        let pair = &self.pairs[pi];
        // One clock read for both the deadline and the latency histogram.
        let trapped = Instant::now();
        let deadline = self.timeout.map(|t| trapped + t);
        // A backend still holding a request it was given up on (stopped, or dead and not yet
        // replaced) would otherwise take one more slot per access until none is left for the
        // other devices: refuse at once instead, as if its deadline had passed.
        if pair.counters.abandoned_held.load(Ordering::Acquire) != 0 {
            bump(&self.stats.timeouts_no_slot);
            bump(&self.stats.refused_stuck);
            return self.timed_out(
                pair,
                trapped,
                addr,
                "its device model still holds a request",
            );
        }
        let Some(idx) = self
            .slots
            .acquire(deadline, || bump(&self.stats.slot_waits))
        else {
            bump(&self.stats.timeouts_no_slot);
            return self.timed_out(pair, trapped, addr, "no free request slot");
        };
        let Some(slot) = self.slots.get(idx) else {
            // Unreachable: the pool only hands out its own indices.
            return self.timed_out(pair, trapped, addr, "bad slot");
        };
        *slot.lock() = SlotInner {
            state: SlotState::Pending,
            pair: pi,
            addr,
            width,
            op,
            value,
            abandoned: false,
            sleeping: false,
        };
        lock(&pair.fifo).push_back(idx);
        bump(&pair.shard.requests);
        bump(&pair.counters.requests);
        bump(if op == RemioOp::Read {
            &pair.shard.reads
        } else {
            &pair.shard.writes
        });
        self.raise_backend(pair);

        // Completed inline by the backend interrupt's handler (an ioeventfd or status-word
        // access): take the value at once, without looking up the wait helper.
        let s = slot.lock();
        if s.state == SlotState::Complete {
            return self.take(s, idx, op, pair, trapped);
        }
        drop(s);
        if let Some(helper) = pair.wait_helper.get() {
            helper(&SlotWaiter { slot, deadline });
        }

        let mut s = slot.lock();
        loop {
            if s.state == SlotState::Complete {
                return self.take(s, idx, op, pair, trapped);
            }
            s.sleeping = true;
            s = match deadline {
                None => slot
                    .done
                    .wait(s)
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        s.sleeping = false;
                        break;
                    }
                    slot.done
                        .wait_timeout(s, d - now)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0
                }
            };
            s.sleeping = false;
        }

        // Timed out. Lock order is FIFO then slot, so let go of the slot first.
        drop(s);
        let removed = {
            let mut fifo = lock(&pair.fifo);
            fifo.iter()
                .position(|&i| i == idx)
                .and_then(|pos| fifo.remove(pos))
                .is_some()
        };
        let mut s = slot.lock();
        if removed {
            s.state = SlotState::Free;
            drop(s);
            self.slots.release(idx);
            bump(&self.stats.timeouts_pending);
            bump(&pair.counters.timeouts_queued);
            self.timed_out(pair, trapped, addr, "request still pending")
        } else if s.state == SlotState::Complete {
            // Completed between the deadline and now: not a timeout after all.
            self.take(s, idx, op, pair, trapped)
        } else {
            // PROCESSING: the backend holds it. Keep the slot until it completes it.
            s.abandoned = true;
            pair.counters.abandoned_held.fetch_add(1, Ordering::AcqRel);
            drop(s);
            bump(&self.stats.timeouts_abandoned);
            bump(&pair.counters.timeouts_queued);
            self.timed_out(pair, trapped, addr, "backend did not complete the request")
        }
    }

    /// COMPLETE → FREE: takes the value and frees the slot.
    fn take(
        &self,
        mut s: std::sync::MutexGuard<'_, SlotInner>,
        idx: usize,
        op: RemioOp,
        pair: &Pair,
        trapped: Instant,
    ) -> Completion {
        let value = if op == RemioOp::Read { s.value } else { 0 };
        s.state = SlotState::Free;
        drop(s);
        self.slots.release(idx);
        pair.counters.latency.record(elapsed_ns(trapped));
        Completion {
            value,
            timed_out: false,
        }
    }

    fn timed_out(&self, pair: &Pair, trapped: Instant, addr: u64, why: &str) -> Completion {
        bump(&self.stats.timeouts);
        bump(&pair.counters.timeouts);
        pair.counters.latency.record(elapsed_ns(trapped));
        remio_ratelimit::warn_rl!(
            "Remote I/O access at {addr:#x} (bind key {}) timed out after {:?}: {why}; \
             completing it (a read returns {TIMEOUT_READ_VALUE})",
            pair.bind_key,
            self.timeout.unwrap_or_default()
        );
        Completion {
            value: TIMEOUT_READ_VALUE,
            timed_out: true,
        }
    }
}

/// Nanoseconds since `t`, saturating.
fn elapsed_ns(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
