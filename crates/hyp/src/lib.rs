//! remio-hyp: a model of the Bao hypervisor's Remote I/O, running on an ordinary Linux machine.
//!
//! It implements the contract of `spec/remote-io.md` exactly: devices paired by bind key, one
//! pool of request slots (`request_id` = slot index), a FIFO of pending requests per device,
//! the slot states FREE → PENDING → PROCESSING → COMPLETE → FREE, and the Remote I/O hypercall
//! with Bao's status codes. It knows nothing of the dispatcher except the two traits it serves:
//! [`remio_abi::Hypercall`] and [`remio_abi::InterruptController`], both implemented by
//! [`BackendVm`].
//!
//! # Parties
//!
//! - [`FrontendVm`]: the trapping side. [`FrontendVm::read`] / [`FrontendVm::write`] model a
//!   trapped register access: take a free slot, record the request, push it on the device's
//!   FIFO, raise the backend interrupt, stall until the backend completes it.
//! - [`BackendVm`]: the backend VM. Its [`Hypercall`](remio_abi::Hypercall) implementation is
//!   the Remote I/O hypercall (ASK / WRITE / READ / NOTIFY); its
//!   [`InterruptController`](remio_abi::InterruptController) implementation delivers the
//!   backend interrupt of each device; [`BackendVm::irq_eventfd`] offers the same interrupt as
//!   an eventfd for pollers.
//!
//! # Numbering
//!
//! In hypercalls, `dm_id` is the index of the device among the **backend** devices of the
//! calling VM, in configuration order ([`BackendVm::devices`]), not the bind key. On the
//! frontend side, a device's `index` is its position among the frontend devices of that VM.
//!
//! # The backend interrupt runs on the trapping thread
//!
//! When a frontend access queues a request, the backend interrupt handler installed with
//! `request_irq` is called **inline, on the trapping frontend thread, after the request is on
//! the FIFO and with no lock held**. A dispatcher can therefore run its ASK loop (and route the
//! request) right there, with no thread hop: for a request completed synchronously by the
//! handler, the frontend thread finds its slot COMPLETE when the handler returns and never
//! sleeps. The handler of one interrupt never runs on two threads at once: a raise while it
//! runs makes the running thread call it once more (like Linux's edge flow handler), so every
//! queued request is seen by some ASK loop. See [`BackendVm`] for latching and `free_irq`.
//!
//! # Wait helpers (not in Bao)
//!
//! Whoever serves a device may install a [`WaitHelper`] on it ([`BackendVm::set_wait_helper`]):
//! a stalled frontend thread runs it instead of going straight to sleep, so that it can do the
//! work that completes its own request (for a device model in another process: read its answer
//! and complete the request) rather than wait for another thread to do it and wake it. The
//! access still ends as before: COMPLETE, or the timeout. See [`SlotWaiter`] and the `wait`
//! module.
//!
//! # Timeout (not in Bao)
//!
//! Bao has no timeout: a backend that never completes hangs the frontend vCPU forever
//! (`HypConfig::timeout = None` keeps that behaviour). With `Some(t)`, an access not
//! completed within `t` (the time spent waiting for a free slot included) completes anyway:
//! a read returns **0** ([`TIMEOUT_READ_VALUE`]), a write is dropped. The event is counted in
//! [`Stats::timeouts`] and logged (rate-limited). Then:
//! - a request still PENDING is removed from its FIFO and its slot freed
//!   ([`Stats::timeouts_pending`]); the backend never sees it;
//! - a request the backend already holds (PROCESSING) is marked *abandoned*
//!   ([`Stats::timeouts_abandoned`]): its slot stays reserved until the backend completes it.
//!   That completion is validated as usual, succeeds (status 0), frees the slot and is counted
//!   in [`Stats::abandoned_completions`]. So a late completion can never complete a newer
//!   request that reuses the same slot;
//! - an access whose deadline passed while it waited for a slot never queued anything.
//!
//! # Slot exhaustion
//!
//! Bao sizes the pool by the number of physical CPUs, so a free slot always exists and an
//! exhausted pool is a hypervisor panic. Here frontend threads are not bounded by `slots`: an
//! access that finds no free slot waits for one (bounded by the timeout) and counts a
//! [`Stats::slot_waits`].
//!
//! # Performance shape
//!
//! No global lock on the data path: a claim is a compare-and-swap on a slot, each device has
//! its own FIFO lock, each slot its own lock and condition variable (a completion wakes
//! exactly the stalled frontend thread). No allocation per request: the slot array and each
//! FIFO (capacity = `slots`) are allocated at construction.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use remio_abi::{Hypercall, InterruptController, RemioArgs, RemioOp};
//! use remio_hyp::{HypConfig, Hypervisor, RemioDeviceConfig, Role, ShmemConfig, VmConfig};
//!
//! let dev = |role, mmio_size, irq| RemioDeviceConfig {
//!     bind_key: 7, role, mmio_base: if mmio_size > 0 { 0xa000_0000 } else { 0 }, mmio_size,
//!     irq, shmem_id: 0, shmem_base: 0x5000_0000,
//! };
//! let hyp = Hypervisor::new(HypConfig {
//!     shmem: vec![ShmemConfig { id: 0, size: 0x10000, backing: None }],
//!     vms: vec![
//!         VmConfig { id: 1, remio_devices: vec![dev(Role::Frontend, 0x200, 40)] },
//!         VmConfig { id: 2, remio_devices: vec![dev(Role::Backend, 0, 52)] },
//!     ],
//!     slots: 4,
//!     timeout: None,
//! })
//! .unwrap();
//! let backend = hyp.backend(2).unwrap();
//! // A trivial device model, run inline on the trapping thread: every read returns 0x74726976.
//! let b = backend.clone();
//! backend
//!     .request_irq(52, Arc::new(move || loop {
//!         let ask = b.remote_io(&RemioArgs { dm_id: 0, op: RemioOp::Ask as u64, ..Default::default() });
//!         if ask.status != 0 { break; }
//!         b.remote_io(&RemioArgs {
//!             dm_id: 0, op: ask.op, value: 0x7472_6976, request_id: ask.request_id, ..Default::default()
//!         });
//!     }))
//!     .unwrap();
//! let frontend = hyp.frontend(1).unwrap();
//! assert_eq!(frontend.read(0xa000_0000, 4).unwrap(), 0x7472_6976);
//! assert_eq!(hyp.stats().completions, 1);
//! ```

mod backend;
mod config;
mod frontend;
pub mod histogram;
mod irq;
mod slots;
mod wait;

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use backend::{BackendDevice, BackendVm, IrqFdError};
pub use config::{
    ConfigError, HypConfig, RemioDeviceConfig, Role, ShmemConfig, VmConfig, MAX_SLOTS,
};
pub use frontend::{AccessError, Completion, FrontendDevice, FrontendVm, SinkError};
pub use histogram::{HistogramSnapshot, LatencyHistogram};
/// Re-exported for [`FrontendVm::access`].
pub use remio_abi::RemioOp;
pub use wait::{SlotWaiter, WaitHelper, WaitHelperError};

use irq::IrqLine;
use slots::SlotPool;

/// What a read returns when its access timed out (see the crate docs). 0 reads as "nothing"
/// for virtio-mmio registers a driver polls (InterruptStatus, QueueReady, Status), so a Linux
/// virtio driver copes with it.
pub const TIMEOUT_READ_VALUE: u64 = 0;

/// A snapshot of the hypervisor's counters ([`Hypervisor::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frontend accesses that were queued (got a slot and reached a FIFO).
    pub requests: u64,
    /// Of which reads.
    pub reads: u64,
    /// Of which writes.
    pub writes: u64,
    /// Valid WRITE/READ completions that completed a waiting request.
    pub completions: u64,
    /// Accesses that timed out, all causes.
    pub timeouts: u64,
    /// Timeouts of a request still PENDING (removed from the FIFO).
    pub timeouts_pending: u64,
    /// Timeouts of a request the backend held (PROCESSING; slot marked abandoned).
    pub timeouts_abandoned: u64,
    /// Timeouts that queued nothing: no slot came free before the deadline, or the device's
    /// backend still held an abandoned request ([`Stats::refused_stuck`]).
    pub timeouts_no_slot: u64,
    /// Of `timeouts_no_slot`, accesses refused at once because their device's backend still
    /// held a request abandoned at its deadline: a stopped device model keeps at most one slot,
    /// so it can never take every slot and stall the other devices' accesses.
    pub refused_stuck: u64,
    /// Completions of abandoned slots (status 0; the slot was freed).
    pub abandoned_completions: u64,
    /// Accesses that found the slot pool exhausted and had to wait.
    pub slot_waits: u64,
    /// ASK hypercalls that returned a request.
    pub asks: u64,
    /// ASK hypercalls that returned +1 (empty FIFO or bad arguments).
    pub asks_failed: u64,
    /// NOTIFY hypercalls (frontend interrupts injected).
    pub notifies: u64,
    /// Hypercalls refused with -INVALID_ARGS.
    pub invalid_hypercalls: u64,
    /// Backend interrupts raised (one per queued request).
    pub backend_irqs: u64,
    /// Of which latched because nobody listened.
    pub backend_irqs_latched: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    completions: AtomicU64,
    timeouts: AtomicU64,
    timeouts_pending: AtomicU64,
    timeouts_abandoned: AtomicU64,
    timeouts_no_slot: AtomicU64,
    refused_stuck: AtomicU64,
    abandoned_completions: AtomicU64,
    slot_waits: AtomicU64,
    asks: AtomicU64,
    asks_failed: AtomicU64,
    notifies: AtomicU64,
    invalid_hypercalls: AtomicU64,
    backend_irqs: AtomicU64,
    backend_irqs_latched: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The counters of one device pair, bumped on the access path with relaxed atomics (no lock,
/// no allocation; the histogram is allocated with the pair).
#[derive(Debug, Default)]
struct PairCounters {
    /// Accesses queued on this pair's FIFO.
    requests: AtomicU64,
    /// Accesses that timed out, all causes (a slot never found included). Completions are not
    /// counted apart: every access that returns records its latency once, so they are the
    /// histogram's count minus these (one atomic fewer on the access path).
    timeouts: AtomicU64,
    /// Of the queued accesses, those that timed out (for [`DeviceStats::waiting`]).
    timeouts_queued: AtomicU64,
    /// NOTIFY hypercalls of this pair.
    notifies: AtomicU64,
    /// Slots of this pair abandoned at their deadline and still held by the backend (0 or 1:
    /// while one is held, new accesses are refused at once, see [`Stats::refused_stuck`]).
    abandoned_held: AtomicU64,
    /// From the trap (before a slot is taken) to the access's return, completed or timed out:
    /// recorded exactly once per access.
    latency: Box<LatencyHistogram>,
}

/// The counters of one Remote I/O device pair ([`Hypervisor::device_stats`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// The pair's bind key.
    pub bind_key: u32,
    /// The backend VM of the pair.
    pub backend_vm: u32,
    /// The pair's `dm_id` in that backend VM (its index among the VM's backend devices).
    pub dm_id: u32,
    /// Accesses queued (reached the FIFO).
    pub requests: u64,
    /// Of which completed by the backend.
    pub completions: u64,
    /// Accesses that timed out (all causes).
    pub timeouts: u64,
    /// Frontend interrupts injected (NOTIFY).
    pub notifies: u64,
    /// Accesses queued and not yet returned to the frontend (pending or held by the backend).
    pub waiting: u64,
    /// Of which still on the FIFO (not yet fetched with ASK).
    pub pending: u64,
    /// Trapped-access latency in nanoseconds, from the trap to the access's return.
    pub latency: HistogramSnapshot,
}

/// One Remote I/O pair (frontend + backend sharing a bind key). Aligned to its own cache
/// lines: each pair's locks and counters are written by the threads serving that pair.
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct Pair {
    bind_key: u32,
    shmem_id: u32,
    shmem: Arc<File>,
    shmem_base: u64,
    shmem_size: u64,
    frontend_index: usize,
    mmio_base: u64,
    mmio_size: u64,
    frontend_irq: u32,
    dm_id: usize,
    backend_irq: u32,
    /// Slot indices of PENDING requests, oldest first. Capacity = slot count, so pushing never
    /// allocates (at most `slots` requests exist at once).
    fifo: Mutex<VecDeque<usize>>,
    /// Raised when a request is queued.
    backend_line: Arc<IrqLine>,
    /// Raised by NOTIFY.
    frontend_line: Arc<IrqLine>,
    /// Run by a stalled frontend instead of sleeping (see [`wait`]). Leaf lock; read on every
    /// access, never held while the helper runs.
    wait_helper: wait::HelperCell,
    /// Per-pair counters and latency histogram.
    counters: PairCounters,
    /// This pair's share of the hypervisor-wide [`Stats`] that the access path bumps
    /// (requests, reads, writes, ASKs, completions, NOTIFYs, backend interrupts): summed by
    /// [`Hypervisor::stats`], so that threads serving different pairs do not write one
    /// shared cache line on every access.
    shard: Counters,
}

#[derive(Debug)]
struct FrontendVmState {
    id: u32,
    /// Pair index of each frontend device, by frontend index.
    devices: Box<[usize]>,
    /// MMIO window base -> pair index.
    windows: BTreeMap<u64, usize>,
}

#[derive(Debug)]
struct BackendVmState {
    id: u32,
    /// Pair index of each backend device, by `dm_id`.
    devices: Box<[usize]>,
}

/// The hypervisor model. Build it with [`Hypervisor::new`]; get per-VM handles with
/// [`Hypervisor::frontend`] and [`Hypervisor::backend`].
#[derive(Debug)]
pub struct Hypervisor {
    pairs: Box<[Pair]>,
    frontend_vms: Box<[FrontendVmState]>,
    backend_vms: Box<[BackendVmState]>,
    slots: SlotPool,
    timeout: Option<Duration>,
    stats: Counters,
}

impl Hypervisor {
    /// Validates `config` as Bao does, creates the shared memory (a memfd per region without a
    /// backing file), and builds the model.
    pub fn new(mut config: HypConfig) -> Result<Arc<Self>, ConfigError> {
        let pair_refs = config.validate()?;

        let mut shmem_files = std::collections::HashMap::new();
        for s in &mut config.shmem {
            let file = match s.backing.take() {
                Some(f) => {
                    let len = f
                        .metadata()
                        .map_err(|source| ConfigError::ShmemIo { id: s.id, source })?
                        .len();
                    if len < s.size {
                        return Err(ConfigError::ShmemBackingTooSmall {
                            id: s.id,
                            size: s.size,
                            len,
                        });
                    }
                    f
                }
                None => create_memfd(s.size)
                    .map_err(|source| ConfigError::ShmemIo { id: s.id, source })?,
            };
            shmem_files.insert(s.id, (Arc::new(file), s.size));
        }

        let mut frontend_vms: Vec<FrontendVmState> = Vec::new();
        let mut backend_vms: Vec<BackendVmState> = Vec::new();
        // (vm index, device index) -> per-role index within the VM.
        let mut role_index = std::collections::HashMap::new();
        for vm in &config.vms {
            let mut nf = 0;
            let mut nb = 0;
            for dev in &vm.remio_devices {
                let counter = match dev.role {
                    Role::Frontend => &mut nf,
                    Role::Backend => &mut nb,
                };
                role_index.insert((vm.id, dev.bind_key, dev.role), *counter);
                *counter += 1;
            }
            if nf > 0 {
                frontend_vms.push(FrontendVmState {
                    id: vm.id,
                    devices: vec![usize::MAX; nf].into(),
                    windows: BTreeMap::new(),
                });
            }
            if nb > 0 {
                backend_vms.push(BackendVmState {
                    id: vm.id,
                    devices: vec![usize::MAX; nb].into(),
                });
            }
        }

        let mut pairs = Vec::with_capacity(pair_refs.len());
        for (pi, p) in pair_refs.iter().enumerate() {
            let f = config.device(p.frontend);
            let b = config.device(p.backend);
            let fvm = config.vms[p.frontend.0].id;
            let bvm = config.vms[p.backend.0].id;
            let fi = role_index[&(fvm, p.bind_key, Role::Frontend)];
            let bi = role_index[&(bvm, p.bind_key, Role::Backend)];
            let (shmem, shmem_size) = shmem_files[&f.shmem_id].clone();
            if let Some(vm) = frontend_vms.iter_mut().find(|v| v.id == fvm) {
                vm.devices[fi] = pi;
                vm.windows.insert(f.mmio_base, pi);
            }
            if let Some(vm) = backend_vms.iter_mut().find(|v| v.id == bvm) {
                vm.devices[bi] = pi;
            }
            pairs.push(Pair {
                bind_key: p.bind_key,
                shmem_id: f.shmem_id,
                shmem,
                shmem_base: f.shmem_base,
                shmem_size,
                frontend_index: fi,
                mmio_base: f.mmio_base,
                mmio_size: f.mmio_size,
                frontend_irq: f.irq,
                dm_id: bi,
                backend_irq: b.irq,
                fifo: Mutex::new(VecDeque::with_capacity(config.slots)),
                backend_line: Arc::default(),
                frontend_line: Arc::default(),
                wait_helper: wait::HelperCell::default(),
                counters: PairCounters::default(),
                shard: Counters::default(),
            });
        }

        Ok(Arc::new(Self {
            pairs: pairs.into(),
            frontend_vms: frontend_vms.into(),
            backend_vms: backend_vms.into(),
            slots: SlotPool::new(config.slots),
            timeout: config.timeout,
            stats: Counters::default(),
        }))
    }

    /// The frontend view of VM `vm_id`; `None` if it has no frontend device.
    pub fn frontend(self: &Arc<Self>, vm_id: u32) -> Option<FrontendVm> {
        let vm = self.frontend_vms.iter().position(|v| v.id == vm_id)?;
        Some(FrontendVm::new(Arc::clone(self), vm))
    }

    /// The backend view of VM `vm_id`; `None` if it has no backend device.
    pub fn backend(self: &Arc<Self>, vm_id: u32) -> Option<BackendVm> {
        let vm = self.backend_vms.iter().position(|v| v.id == vm_id)?;
        Some(BackendVm::new(Arc::clone(self), vm))
    }

    /// Ids of the VMs that have frontend devices, in configuration order.
    pub fn frontend_vm_ids(&self) -> Vec<u32> {
        self.frontend_vms.iter().map(|v| v.id).collect()
    }

    /// Ids of the VMs that have backend devices, in configuration order.
    pub fn backend_vm_ids(&self) -> Vec<u32> {
        self.backend_vms.iter().map(|v| v.id).collect()
    }

    /// The number of request slots.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// The configured access timeout.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        // The hypervisor-wide counters plus every pair's shard of them.
        let g = |f: fn(&Counters) -> &AtomicU64| {
            self.pairs
                .iter()
                .map(|p| &p.shard)
                .chain(std::iter::once(&self.stats))
                .map(|c| f(c).load(Ordering::Relaxed))
                .sum::<u64>()
        };
        Stats {
            requests: g(|c| &c.requests),
            reads: g(|c| &c.reads),
            writes: g(|c| &c.writes),
            completions: g(|c| &c.completions),
            timeouts: g(|c| &c.timeouts),
            timeouts_pending: g(|c| &c.timeouts_pending),
            timeouts_abandoned: g(|c| &c.timeouts_abandoned),
            timeouts_no_slot: g(|c| &c.timeouts_no_slot),
            refused_stuck: g(|c| &c.refused_stuck),
            abandoned_completions: g(|c| &c.abandoned_completions),
            slot_waits: g(|c| &c.slot_waits),
            asks: g(|c| &c.asks),
            asks_failed: g(|c| &c.asks_failed),
            notifies: g(|c| &c.notifies),
            invalid_hypercalls: g(|c| &c.invalid_hypercalls),
            backend_irqs: g(|c| &c.backend_irqs),
            backend_irqs_latched: g(|c| &c.backend_irqs_latched),
        }
    }

    /// The counters of every device pair, in configuration order of the pairs.
    pub fn device_stats(&self) -> Vec<DeviceStats> {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.pairs
            .iter()
            .enumerate()
            .map(|(pi, p)| {
                let c = &p.counters;
                let backend_vm = self
                    .backend_vms
                    .iter()
                    .find(|v| v.devices.contains(&pi))
                    .map_or(0, |v| v.id);
                let pending = irq::lock(&p.fifo).len() as u64;
                let requests = g(&c.requests);
                let timeouts = g(&c.timeouts);
                let latency = c.latency.snapshot();
                let completions = latency.count.saturating_sub(timeouts);
                // Read after `requests`: what returned was queued before, so no underflow
                // but for counts read while they move, which saturate at 0.
                let returned = completions + g(&c.timeouts_queued);
                DeviceStats {
                    bind_key: p.bind_key,
                    backend_vm,
                    dm_id: u32::try_from(p.dm_id).unwrap_or(u32::MAX),
                    requests,
                    completions,
                    timeouts,
                    notifies: g(&c.notifies),
                    waiting: requests.saturating_sub(returned),
                    pending,
                    latency,
                }
            })
            .collect()
    }
}

/// Creates an anonymous shared-memory file of `size` bytes.
fn create_memfd(size: u64) -> io::Result<File> {
    // SAFETY: the name is a valid NUL-terminated string and the flags are valid; the return
    // value is checked before use.
    let fd = unsafe { libc::memfd_create(c"remio-shmem".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create, is open, and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

#[cfg(test)]
mod tests;
