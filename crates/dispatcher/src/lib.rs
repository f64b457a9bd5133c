//! The Bao I/O dispatcher's logic: the posted Linux driver (`spec/bao-io-dispatcher-patch.txt`)
//! re-implemented against two traits, [`remio_abi::Hypercall`] and
//! [`remio_abi::InterruptController`], without the driver's defects
//! (`spec/remote-io.md`, "Defects in the posted driver").
//!
//! - [`Dispatcher`]: the DMs of one backend VM (create, GET_INFO lookup under a lock,
//!   destroy exactly once).
//! - [`Dm`]: one device model. Its own interrupt handler runs the ASK loop inline on the
//!   thread that delivers the interrupt and routes each request: to the ioeventfd client
//!   (a matching write signals its eventfd and is completed at once), else to the
//!   [`IoClient`] whose range holds the whole access, else to the [`ControlClient`], else to
//!   the DM's held queue until a control client exists. Pause/resume, irqfds, stats.
//! - The status-word client ([`Dm::register_status_word`]): InterruptStatus reads and
//!   InterruptACK writes answered inline from a word shared with the device model
//!   ([`StatusPage`]), like the ioeventfd client, checked under the same lock.
//! - Queues are rings bounded at `BAO_IO_CLIENT_QUEUE_MAX` requests (allocated small, grown
//!   on the first deeper queue); a full ring completes the
//!   request with 0 (and logs) rather than lose or stall it. No allocation per request and
//!   no global lock on the data path: a request takes the DM's ioeventfd read lock, its
//!   routing read lock and the target queue's mutex.
//!
//! # Errors and errnos
//!
//! Each module has one error enum; `errno()` maps every variant to one errno:
//!
//! | error | variant | errno |
//! | --- | --- | --- |
//! | [`DmError`] | `InvalidId`, `NotPaused`, `Irq(NoSuchIrq)` | EINVAL |
//! | | `Exists` | EEXIST |
//! | | `NoSuchDm` | ENOENT |
//! | | `Irq(Busy)` | EBUSY |
//! | | `ShuttingDown` | ESHUTDOWN |
//! | [`ClientError`] | `Busy` (second control client) | EBUSY |
//! | | `NoControlClient`, `AlreadyDestroyed` | ENOENT |
//! | | `NameTooLong` | EINVAL |
//! | | `ShuttingDown` | ESHUTDOWN |
//! | | `Spawn(e)` | `e`'s OS errno, else EAGAIN |
//! | [`AttachError`] | `ShuttingDown` | ESHUTDOWN |
//! | [`RangeError`] | `Empty` | EINVAL |
//! | | `Overlap` | EEXIST |
//! | | `NotFound` | ENOENT |
//! | | `ShuttingDown` | ESHUTDOWN |
//! | [`IoeventfdError`] | `InvalidLength`, `Overflow`, `InvalidDatamatch` | EINVAL |
//! | | `Exists` | EEXIST |
//! | | `NotFound` | ENOENT |
//! | | `ShuttingDown` | ESHUTDOWN |
//! | [`StatusWordError`] | `Misaligned`, `TooSmall` | EINVAL |
//! | | `Exists`, `IoeventfdConflict` | EEXIST |
//! | | `NotFound` | ENOENT |
//! | | `ShuttingDown` | ESHUTDOWN |
//! | | `Io(e)` | `e`'s OS errno, else EIO |
//! | [`IrqfdError`] | `Busy` | EBUSY |
//! | | `NotFound`, `NoStatusWord` | ENOENT |
//! | | `BadFd` | EBADF |
//! | | `ShuttingDown` | ESHUTDOWN |
//! | | `Io(e)` | `e`'s OS errno, else EIO |
//! | [`CompleteError`] | `InvalidOp`, `InvalidArgs` (hypervisor status 3) | EINVAL |
//! | | `HypervisorFailure` (hypervisor status 1) | ENOENT |
//! | | `NoHypercall` (hypervisor status 2) | ENOSYS |
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use remio_dispatcher::{Dispatcher, DmDescription, testing::FakeHyp};
//! use remio_abi::uapi::BAO_IO_READ;
//!
//! let hyp = FakeHyp::new(1);
//! let disp = Dispatcher::new(hyp.clone(), hyp.clone());
//! let dm = disp
//!     .create_dm(DmDescription { id: 0, shmem_addr: 0, shmem_size: 0, irq: hyp.irq(0), shmem: None })
//!     .unwrap();
//! let control = dm.create_control_client().unwrap();
//! let slot = hyp.trap(0, BAO_IO_READ, 0x1000, 4, 0); // the dispatcher runs inline here
//! let mut req = control.attach().unwrap();
//! req.value = 0x7472_6976; // "virt"
//! dm.complete(&req).unwrap();
//! assert_eq!(hyp.completion(slot), Some(0x7472_6976));
//! ```

mod client;
mod dispatcher;
mod dm;
mod gate;
mod ioeventfd;
mod irqfd;
mod queue;
mod router;
mod statusword;
mod sync;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(all(test, loom))]
mod loom_tests;
#[cfg(all(test, not(loom)))]
mod tests;

pub use client::{AttachError, ClientError, ControlClient, IoClient};
pub use dispatcher::Dispatcher;
pub use dm::{CompleteError, Dm, DmDescription, DmError, DmInfo, DmStats};
pub use ioeventfd::{same_file, IoeventfdConfig, IoeventfdError};
pub use irqfd::IrqfdError;
pub use queue::Notifier;
pub use router::RangeError;
pub use statusword::{StatusPage, StatusWordConfig, StatusWordError, STATUS_PAGE_SIZE};
