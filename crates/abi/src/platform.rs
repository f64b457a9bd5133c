//! What the dispatcher needs from the platform it runs on, and nothing more: the Remote I/O
//! hypercall and a per-DM backend interrupt line. On Bao hardware these are an `hvc`/`ecall`
//! and a GIC/PLIC interrupt; on this machine the hypervisor model (`remio-hyp`) provides both.

use std::sync::Arc;

use crate::hypercall::{RemioArgs, RemioRet};

/// The Remote I/O hypercall (Bao hypercall number 2), issued by the backend VM.
///
/// Implementations return the raw result exactly as the registers carry it, Bao's status
/// conventions included (ASK's positive `1`); [`RemioRet::check`] interprets it.
pub trait Hypercall: Send + Sync {
    /// Performs one Remote I/O hypercall.
    fn remote_io(&self, args: &RemioArgs) -> RemioRet;
}

/// A backend interrupt handler. It runs on whichever thread delivers the interrupt and must
/// not block for long (it is the equivalent of a hard-IRQ handler).
pub type IrqHandler = Arc<dyn Fn() + Send + Sync>;

/// Errors of [`InterruptController::request_irq`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IrqError {
    /// No backend interrupt with this number exists on this platform.
    #[error("no backend interrupt {0}")]
    NoSuchIrq(u32),
    /// A handler is already installed on this interrupt.
    #[error("backend interrupt {0} already has a handler")]
    Busy(u32),
}

/// The backend VM's interrupt controller, as the driver's `intc.c` uses it: one handler per
/// interrupt line, installed and removed by number.
pub trait InterruptController: Send + Sync {
    /// Installs `handler` for `irq`. An interrupt raised while no handler is installed is
    /// remembered (level-like) and delivered once when a handler is installed.
    fn request_irq(&self, irq: u32, handler: IrqHandler) -> Result<(), IrqError>;
    /// Removes the handler of `irq`. When this returns, the old handler is not running on any
    /// thread and will not be called again.
    fn free_irq(&self, irq: u32);
}
