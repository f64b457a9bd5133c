//! The status word a session may share with the dispatcher ([`crate::DmSession::register_status_word`]):
//! the platform answers InterruptStatus reads and InterruptACK writes from it inline, so the
//! device model never sees those accesses (the dispatcher's status-word client,
//! `remio_dispatcher::Dm::register_status_word`).
//!
//! The device model keeps its InterruptStatus in [`StatusWord::word`]: it sets bits with
//! `fetch_or(.., Release)` (or stronger) *before* signalling its irqfd, and clears them (device
//! reset) with a store; the dispatcher reads with `Acquire` and acknowledges with
//! `fetch_and(!value)`.
//!
//! | implementation | support |
//! | --- | --- |
//! | in-process | the dispatcher's page, shared directly |
//! | socket | the page's memfd, passed by `SCM_RIGHTS` in the reply to `STATUS_WORD` ([`crate::wire`]) and mapped by the client |
//! | kernel driver | none: [`crate::ApiError::NotSupported`]; the device model serves the registers itself |

use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use remio_dispatcher::StatusPage;

/// Where a status word answers: 4-byte reads of `status_addr` return the word, 4-byte writes
/// to `ack_addr` clear the written bits. Both guest-physical, 4-byte aligned, inside the DM's
/// MMIO window and not overlapping an ioeventfd; other widths at those addresses reach the
/// device model as usual.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StatusWordSpec {
    /// The InterruptStatus register (virtio-mmio: window base + 0x60).
    pub status_addr: u64,
    /// The InterruptACK register (virtio-mmio: window base + 0x64).
    pub ack_addr: u64,
}

/// A registered status word, mapped in this process. Clones share the mapping; it stays
/// mapped while any clone lives, and stays registered until the session ends.
#[derive(Clone, Debug)]
pub struct StatusWord {
    page: Arc<StatusPage>,
}

impl StatusWord {
    /// Wraps a mapped page.
    pub fn new(page: Arc<StatusPage>) -> Self {
        Self { page }
    }

    /// The word the dispatcher answers from.
    pub fn word(&self) -> &AtomicU32 {
        self.page.word()
    }

    /// The page (its file is what the socket server sends).
    pub fn page(&self) -> &Arc<StatusPage> {
        &self.page
    }
}
