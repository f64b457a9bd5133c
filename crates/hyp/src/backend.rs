//! The backend VM's view: the Remote I/O hypercall and the backend interrupts.

use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use remio_abi::{
    Hypercall, InterruptController, IrqError, IrqHandler, RemioArgs, RemioOp, RemioRet, RemioStatus,
};
use vmm_sys_util::eventfd::EventFd;

use crate::irq::{lock, Raised};
use crate::slots::SlotState;
use crate::{bump, Hypervisor, Pair, WaitHelper, WaitHelperError};

/// ASK's "nothing for you" status: `+1`, not negated (`spec/remote-io.md`, the op table).
const ASK_FAILED: i64 = RemioStatus::Failure as i64;

/// One backend device, as the backend VM sees it.
#[derive(Clone, Debug)]
pub struct BackendDevice {
    /// Its index in this VM's backend devices: the `dm_id` of hypercalls.
    pub dm_id: usize,
    /// The pair's bind key.
    pub bind_key: u32,
    /// The backend interrupt (raised when a request is queued).
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

/// Errors of [`BackendVm::irq_eventfd`].
#[derive(Debug, thiserror::Error)]
pub enum IrqFdError {
    /// No device of this backend VM uses this interrupt.
    #[error("no backend interrupt {0}")]
    NoSuchIrq(u32),
    /// Creating or duplicating the eventfd failed.
    #[error("interrupt eventfd: {0}")]
    Io(#[source] io::Error),
}

/// A backend VM: issues Remote I/O hypercalls and receives the backend interrupts of its
/// devices. Cheap to clone (a handle on the [`Hypervisor`]).
///
/// # Interrupts
///
/// [`InterruptController::request_irq`] installs a handler by backend interrupt number. The
/// handler is called inline on the trapping frontend thread, after the request is queued and
/// with no lock held (see the crate docs); it never runs on two threads at once (a raise while
/// it runs makes it run once more). A raise with no handler (and no eventfd) installed is
/// latched and delivered once on install, from a short-lived thread (as if another CPU took
/// it; if the handler is freed before that thread runs, the interrupt stays latched).
/// [`InterruptController::free_irq`]
/// returns when the handler is not running on another thread and will not run again (called
/// from inside the handler itself, it returns at once). [`BackendVm::irq_eventfd`] is the
/// polling alternative: the eventfd is signalled on every raise (both may be used together).
///
/// # Hypercall
///
/// The [`Hypercall`] implementation follows `spec/remote-io.md` exactly:
///
/// | op | result |
/// | --- | --- |
/// | ASK | `addr` or `value` non-zero, `dm_id` out of range, or empty FIFO: `+1`. Otherwise 0 and the oldest PENDING request (now PROCESSING): `addr`, `op`, `value` (a write's full value; 0 for a read), `access_width`, `request_id`, and `has_pending` = 1 if the FIFO is still non-empty after the pop, else 0 |
/// | WRITE / READ | `dm_id` out of range, `request_id` out of range, slot not PROCESSING, slot of another device, or `op` not the op of the request: `-3`. Otherwise 0; a READ's `value` is what the frontend reads, whole |
/// | NOTIFY | `dm_id` out of range: `-3`; otherwise injects the frontend interrupt, 0 |
/// | other | `-3` |
#[derive(Clone, Debug)]
pub struct BackendVm {
    hyp: Arc<Hypervisor>,
    vm: usize,
}

impl BackendVm {
    pub(crate) fn new(hyp: Arc<Hypervisor>, vm: usize) -> Self {
        Self { hyp, vm }
    }

    /// The VM id.
    pub fn vm_id(&self) -> u32 {
        self.hyp.backend_vms[self.vm].id
    }

    /// The hypervisor this VM belongs to.
    pub fn hypervisor(&self) -> &Arc<Hypervisor> {
        &self.hyp
    }

    /// This VM's backend devices, indexed by `dm_id` (configuration order).
    pub fn devices(&self) -> Vec<BackendDevice> {
        (0..self.hyp.backend_vms[self.vm].devices.len())
            .filter_map(|i| self.device(i))
            .collect()
    }

    /// The backend device `dm_id`, if it exists.
    pub fn device(&self, dm_id: usize) -> Option<BackendDevice> {
        let p = self.pair(dm_id)?;
        Some(BackendDevice {
            dm_id: p.dm_id,
            bind_key: p.bind_key,
            irq: p.backend_irq,
            shmem_id: p.shmem_id,
            shmem_base: p.shmem_base,
            shmem_size: p.shmem_size,
            shmem: Arc::clone(&p.shmem),
        })
    }

    /// An eventfd signalled each time backend interrupt `irq` is raised (non-blocking; read it
    /// to clear). Every call returns a duplicate of the same eventfd. An interrupt latched
    /// before the first call signals it at once.
    pub fn irq_eventfd(&self, irq: u32) -> Result<EventFd, IrqFdError> {
        let p = self.pair_by_irq(irq).ok_or(IrqFdError::NoSuchIrq(irq))?;
        p.backend_line.eventfd().map_err(IrqFdError::Io)
    }

    /// Installs (`Some`, replacing any) or removes (`None`) the wait helper of device `dm_id`:
    /// what a frontend thread stalled on one of its accesses runs instead of sleeping (see
    /// [`WaitHelper`]). Accesses that start after this returns use the new helper; a call of
    /// the old one already in progress is not waited for (a helper is bounded by its access's
    /// deadline and must cope with the server it belongs to going away).
    pub fn set_wait_helper(
        &self,
        dm_id: usize,
        helper: Option<WaitHelper>,
    ) -> Result<(), WaitHelperError> {
        let p = self
            .pair(dm_id)
            .ok_or(WaitHelperError::NoSuchDevice(dm_id))?;
        p.wait_helper.set(helper);
        Ok(())
    }

    fn pair(&self, dm_id: usize) -> Option<&Pair> {
        let pi = *self.hyp.backend_vms[self.vm].devices.get(dm_id)?;
        self.hyp.pairs.get(pi)
    }

    fn pair_raw(&self, dm_id: u64) -> Option<(usize, &Pair)> {
        let dm = usize::try_from(dm_id).ok()?;
        let pi = *self.hyp.backend_vms[self.vm].devices.get(dm)?;
        Some((pi, self.hyp.pairs.get(pi)?))
    }

    fn pair_by_irq(&self, irq: u32) -> Option<&Pair> {
        self.hyp.backend_vms[self.vm]
            .devices
            .iter()
            .filter_map(|&pi| self.hyp.pairs.get(pi))
            .find(|p| p.backend_irq == irq)
    }

    fn invalid(&self, args: &RemioArgs, why: &str) -> RemioRet {
        bump(&self.hyp.stats.invalid_hypercalls);
        remio_ratelimit::warn_rl!(
            "VM {}: Remote I/O hypercall refused ({why}): dm_id {} op {} request_id {}",
            self.vm_id(),
            args.dm_id,
            args.op,
            args.request_id
        );
        RemioRet::with_status(RemioStatus::InvalidArgs.negated())
    }

    fn ask(&self, args: &RemioArgs) -> RemioRet {
        let failed = || {
            bump(&self.hyp.stats.asks_failed);
            RemioRet::with_status(ASK_FAILED)
        };
        if args.addr != 0 || args.value != 0 {
            return failed();
        }
        let Some((_, pair)) = self.pair_raw(args.dm_id) else {
            return failed();
        };
        let mut fifo = lock(&pair.fifo);
        let Some(idx) = fifo.pop_front() else {
            drop(fifo);
            bump(&pair.shard.asks_failed);
            return RemioRet::with_status(ASK_FAILED);
        };
        let has_pending = u64::from(!fifo.is_empty());
        let Some(slot) = self.hyp.slots.get(idx) else {
            // Unreachable: only valid slot indices are ever pushed.
            drop(fifo);
            return failed();
        };
        // Lock order: FIFO, then slot. Marking PROCESSING before the FIFO lock is released
        // lets a timing-out frontend tell "still queued" from "taken by the backend".
        let mut s = slot.lock();
        s.state = SlotState::Processing;
        let req = *s;
        drop(s);
        drop(fifo);
        bump(&pair.shard.asks);
        RemioRet {
            status: 0,
            addr: req.addr,
            op: req.op as u64,
            value: if req.op == RemioOp::Write {
                req.value
            } else {
                0
            },
            access_width: u64::from(req.width),
            request_id: idx as u64,
            has_pending,
        }
    }

    fn complete(&self, args: &RemioArgs, op: RemioOp) -> RemioRet {
        let Some((pi, _)) = self.pair_raw(args.dm_id) else {
            return self.invalid(args, "dm_id out of range");
        };
        let Some((idx, slot)) = usize::try_from(args.request_id)
            .ok()
            .and_then(|i| Some((i, self.hyp.slots.get(i)?)))
        else {
            return self.invalid(args, "request_id out of range");
        };
        let mut s = slot.lock();
        if s.state != SlotState::Processing {
            drop(s);
            return self.invalid(args, "request not PROCESSING");
        }
        if s.pair != pi {
            drop(s);
            return self.invalid(args, "request belongs to another device");
        }
        if s.op != op {
            drop(s);
            return self.invalid(args, "op does not echo the request's op");
        }
        if s.abandoned {
            s.abandoned = false;
            s.state = SlotState::Free;
            if let Some(pair) = self.hyp.pairs.get(pi) {
                pair.counters.abandoned_held.fetch_sub(1, Ordering::AcqRel);
            }
            drop(s);
            self.hyp.slots.release(idx);
            bump(&self.hyp.stats.abandoned_completions);
            return RemioRet::with_status(0);
        }
        if op == RemioOp::Read {
            s.value = args.value;
        }
        s.state = SlotState::Complete;
        // The owner sets `sleeping` under this lock before it waits, so reading it here loses
        // no wake-up. The wake comes after the lock is released: notified under the lock, the
        // woken frontend would find the lock still held and block on it a second time. A late
        // wake can only reach a later owner of the slot (once this one took its value and freed
        // it), which sees its own request not COMPLETE and waits again.
        let wake = s.sleeping;
        drop(s);
        if wake {
            slot.done.notify_one();
        }
        match self.hyp.pairs.get(pi) {
            Some(pair) => bump(&pair.shard.completions),
            None => bump(&self.hyp.stats.completions),
        }
        RemioRet::with_status(0)
    }

    fn notify(&self, args: &RemioArgs) -> RemioRet {
        let Some((_, pair)) = self.pair_raw(args.dm_id) else {
            return self.invalid(args, "dm_id out of range");
        };
        bump(&pair.shard.notifies);
        bump(&pair.counters.notifies);
        pair.frontend_line.raise();
        RemioRet::with_status(0)
    }
}

impl Hypercall for BackendVm {
    fn remote_io(&self, args: &RemioArgs) -> RemioRet {
        match RemioOp::from_raw(args.op) {
            Some(RemioOp::Ask) => self.ask(args),
            Some(op @ (RemioOp::Write | RemioOp::Read)) => self.complete(args, op),
            Some(RemioOp::Notify) => self.notify(args),
            None => self.invalid(args, "unknown op"),
        }
    }
}

#[cfg(test)]
impl BackendVm {
    /// Threads waiting in `free_irq(irq)` for its running handler to return: a test waits for
    /// this state instead of sleeping until a thread "is" blocked there.
    pub(crate) fn irq_removers(&self, irq: u32) -> usize {
        self.pair_by_irq(irq)
            .map_or(0, |p| p.backend_line.removers())
    }
}

impl InterruptController for BackendVm {
    fn request_irq(&self, irq: u32, handler: IrqHandler) -> Result<(), IrqError> {
        let p = self.pair_by_irq(irq).ok_or(IrqError::NoSuchIrq(irq))?;
        if p.backend_line.install(handler, false) {
            Ok(())
        } else {
            Err(IrqError::Busy(irq))
        }
    }

    fn free_irq(&self, irq: u32) {
        if let Some(p) = self.pair_by_irq(irq) {
            p.backend_line.remove();
        }
    }
}

impl Hypervisor {
    /// Raises the backend interrupt of pair `pi` (after a request was queued).
    pub(crate) fn raise_backend(&self, pair: &Pair) {
        bump(&pair.shard.backend_irqs);
        if pair.backend_line.raise() == Raised::Latched {
            bump(&pair.shard.backend_irqs_latched);
        }
    }
}
