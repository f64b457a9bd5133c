//! A small, real test double of the hypervisor: Bao's Remote I/O semantics (request slots,
//! a FIFO per device, the four ops and their status codes) and an interrupt controller that
//! delivers each backend interrupt inline on the thread that raises it. Built for tests
//! (`cfg(test)` or the `testing` feature); the full model is `remio-hyp`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use remio_abi::hypercall::{RemioArgs, RemioOp, RemioRet, RemioStatus};
use remio_abi::uapi::BAO_IO_READ;
use remio_abi::{Hypercall, InterruptController, IrqError, IrqHandler};

/// Backend interrupt of device `i` is `IRQ_BASE + i`.
pub const IRQ_BASE: u32 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Pending,
    Processing,
    Complete(u64),
}

#[derive(Debug)]
struct Slot {
    dm: u64,
    addr: u64,
    op: u64,
    value: u64,
    width: u64,
    state: SlotState,
}

#[derive(Default)]
struct Line {
    handler: Option<IrqHandler>,
    pending: bool,
    running: u32,
}

struct State {
    fifos: Vec<VecDeque<u64>>,
    notifies: Vec<u64>,
    slots: BTreeMap<u64, Slot>,
    next_slot: u64,
    lines: BTreeMap<u32, Line>,
    refused_completions: u64,
}

/// See the module docs.
pub struct FakeHyp {
    state: Mutex<State>,
    changed: Condvar,
}

impl std::fmt::Debug for FakeHyp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeHyp").finish_non_exhaustive()
    }
}

impl FakeHyp {
    /// A hypervisor with `devices` Remote I/O devices for the backend, device `i` on
    /// backend interrupt `IRQ_BASE + i`.
    pub fn new(devices: usize) -> Arc<Self> {
        let lines = (0..devices)
            .map(|i| {
                (
                    IRQ_BASE + u32::try_from(i).unwrap_or(u32::MAX - IRQ_BASE),
                    Line::default(),
                )
            })
            .collect();
        Arc::new(Self {
            state: Mutex::new(State {
                fifos: vec![VecDeque::new(); devices],
                notifies: vec![0; devices],
                slots: BTreeMap::new(),
                next_slot: 0,
                lines,
                refused_completions: 0,
            }),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The backend interrupt of device `dm`.
    pub fn irq(&self, dm: u32) -> u32 {
        IRQ_BASE + dm
    }

    /// A frontend access traps: a request is queued for device `dm` and the backend
    /// interrupt is raised (delivered inline, on this thread). Returns the slot id.
    pub fn trap(&self, dm: u32, op: u64, addr: u64, width: u64, value: u64) -> u64 {
        let slot = self.trap_quiet(dm, op, addr, width, value);
        self.raise(dm);
        slot
    }

    /// Queues a request without raising the interrupt.
    pub fn trap_quiet(&self, dm: u32, op: u64, addr: u64, width: u64, value: u64) -> u64 {
        let mut s = self.lock();
        let id = s.next_slot;
        s.next_slot += 1;
        s.slots.insert(
            id,
            Slot {
                dm: u64::from(dm),
                addr,
                op,
                value,
                width,
                state: SlotState::Pending,
            },
        );
        if let Some(f) = s.fifos.get_mut(dm as usize) {
            f.push_back(id);
        }
        id
    }

    /// Raises device `dm`'s backend interrupt: runs its handler on this thread, or
    /// remembers it for when a handler is installed.
    pub fn raise(&self, dm: u32) {
        let irq = self.irq(dm);
        let handler = {
            let mut s = self.lock();
            let Some(line) = s.lines.get_mut(&irq) else {
                return;
            };
            match &line.handler {
                Some(h) => {
                    line.running += 1;
                    h.clone()
                }
                None => {
                    line.pending = true;
                    return;
                }
            }
        };
        handler();
        let mut s = self.lock();
        if let Some(line) = s.lines.get_mut(&irq) {
            line.running -= 1;
        }
        drop(s);
        self.changed.notify_all();
    }

    /// The value a completed request returned to the frontend (0 for writes), if complete.
    pub fn completion(&self, slot: u64) -> Option<u64> {
        match self.lock().slots.get(&slot)?.state {
            SlotState::Complete(v) => Some(v),
            _ => None,
        }
    }

    /// Waits up to `timeout` for the request in `slot` to complete.
    pub fn wait_completion(&self, slot: u64, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        loop {
            if let Some(SlotState::Complete(v)) = s.slots.get(&slot).map(|x| x.state) {
                return Some(v);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// NOTIFY hypercalls received for device `dm`.
    pub fn notifies(&self, dm: u32) -> u64 {
        self.lock().notifies.get(dm as usize).copied().unwrap_or(0)
    }

    /// Waits up to `timeout` until device `dm` received at least `n` NOTIFYs.
    pub fn wait_notifies(&self, dm: u32, n: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        loop {
            let got = s.notifies.get(dm as usize).copied().unwrap_or(0);
            let now = Instant::now();
            if got >= n || now >= deadline {
                return got;
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Requests of device `dm` not yet fetched with ASK.
    pub fn pending(&self, dm: u32) -> usize {
        self.lock().fifos.get(dm as usize).map_or(0, VecDeque::len)
    }

    /// Completions refused because the slot was not awaiting one (a second completion of
    /// the same request lands here).
    pub fn refused_completions(&self) -> u64 {
        self.lock().refused_completions
    }

    /// Slots not complete yet.
    pub fn incomplete(&self) -> usize {
        self.lock()
            .slots
            .values()
            .filter(|s| !matches!(s.state, SlotState::Complete(_)))
            .count()
    }

    /// Whether device `dm`'s interrupt has a handler.
    pub fn has_handler(&self, dm: u32) -> bool {
        let irq = self.irq(dm);
        self.lock()
            .lines
            .get(&irq)
            .is_some_and(|l| l.handler.is_some())
    }

    fn ask(s: &mut State, dm: u64, args: &RemioArgs) -> RemioRet {
        let fail = RemioRet::with_status(1);
        if args.addr != 0 || args.value != 0 {
            return fail;
        }
        let Some(fifo) = usize::try_from(dm).ok().and_then(|i| s.fifos.get_mut(i)) else {
            return fail;
        };
        let Some(id) = fifo.pop_front() else {
            return fail;
        };
        let has_pending = u64::from(!fifo.is_empty());
        let Some(slot) = s.slots.get_mut(&id) else {
            return fail;
        };
        slot.state = SlotState::Processing;
        RemioRet {
            status: 0,
            addr: slot.addr,
            op: slot.op,
            value: slot.value,
            access_width: slot.width,
            request_id: id,
            has_pending,
        }
    }
}

impl Hypercall for FakeHyp {
    fn remote_io(&self, args: &RemioArgs) -> RemioRet {
        let mut s = self.lock();
        let devices = s.fifos.len() as u64;
        let ret = match RemioOp::from_raw(args.op) {
            Some(RemioOp::Ask) => Self::ask(&mut s, args.dm_id, args),
            _ if args.dm_id >= devices => RemioRet::with_status(RemioStatus::InvalidArgs.negated()),
            Some(RemioOp::Notify) => {
                if let Some(n) = usize::try_from(args.dm_id)
                    .ok()
                    .and_then(|i| s.notifies.get_mut(i))
                {
                    *n += 1;
                }
                RemioRet::default()
            }
            Some(op @ (RemioOp::Write | RemioOp::Read)) => {
                match s.slots.get_mut(&args.request_id) {
                    Some(slot) if slot.dm == args.dm_id && slot.op == op as u64 => {
                        if slot.state == SlotState::Processing {
                            let v = if slot.op == BAO_IO_READ {
                                args.value
                            } else {
                                0
                            };
                            slot.state = SlotState::Complete(v);
                            RemioRet::default()
                        } else {
                            // As remio-hyp does: a slot not PROCESSING is invalid arguments.
                            s.refused_completions += 1;
                            RemioRet::with_status(RemioStatus::InvalidArgs.negated())
                        }
                    }
                    _ => {
                        s.refused_completions += 1;
                        RemioRet::with_status(RemioStatus::InvalidArgs.negated())
                    }
                }
            }
            None => RemioRet::with_status(RemioStatus::InvalidArgs.negated()),
        };
        drop(s);
        self.changed.notify_all();
        ret
    }
}

impl InterruptController for FakeHyp {
    fn request_irq(&self, irq: u32, handler: IrqHandler) -> Result<(), IrqError> {
        let deliver = {
            let mut s = self.lock();
            let line = s.lines.get_mut(&irq).ok_or(IrqError::NoSuchIrq(irq))?;
            if line.handler.is_some() {
                return Err(IrqError::Busy(irq));
            }
            line.handler = Some(handler.clone());
            if line.pending {
                line.pending = false;
                line.running += 1;
                true
            } else {
                false
            }
        };
        if deliver {
            handler();
            let mut s = self.lock();
            if let Some(line) = s.lines.get_mut(&irq) {
                line.running -= 1;
            }
            drop(s);
            self.changed.notify_all();
        }
        Ok(())
    }

    fn free_irq(&self, irq: u32) {
        let mut s = self.lock();
        if let Some(line) = s.lines.get_mut(&irq) {
            line.handler = None;
        }
        while s.lines.get(&irq).is_some_and(|l| l.running > 0) {
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }
}
