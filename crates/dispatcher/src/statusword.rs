//! The status-word client of a DM: a 32-bit word in a small shared page that the device model
//! and the dispatcher both use, so that the virtio-mmio InterruptStatus read and InterruptACK
//! write (virtio 1.2 §4.2.2, offsets 0x60 and 0x64) are answered on the dispatching thread,
//! inline, as the ioeventfd client answers QueueNotify. Without it every frontend interrupt
//! costs two control-path round trips to the device model.
//!
//! - A 4-byte read at `status_addr` completes with the word's value.
//! - A 4-byte write at `ack_addr` clears the written bits (`fetch_and(!value)`) and completes.
//! - Any other access at those addresses (another width) is routed as usual.
//!
//! # Ordering
//!
//! The device model sets a bit with `fetch_or(.., Release)` (or stronger) and only then
//! signals its irqfd; the frontend's interrupt, and so its InterruptStatus read, follows that
//! signal. The dispatcher reads the word with `Acquire` and acknowledges with `AcqRel`, so a
//! read that follows an interrupt sees the bit set before it, and a bit the device model sets
//! after (or concurrently with) an acknowledgement is never lost by it: `fetch_and` clears
//! only the bits the driver wrote, atomically.
//!
//! # The page
//!
//! [`StatusPage::new`] makes a sealed memfd (it cannot shrink or grow: a device model that
//! receives it cannot make the platform's mapping fault) of one page, mapped shared; the word
//! is its first 4 bytes. [`StatusPage::from_file`] maps such a file received from the platform.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

/// Bytes of the shared file the word lives in (the word is its first 4 bytes).
pub const STATUS_PAGE_SIZE: u64 = 4096;

/// A status-word registration ([`crate::Dm::register_status_word`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusWordConfig {
    /// Address whose 4-byte reads return the word (virtio-mmio InterruptStatus).
    pub status_addr: u64,
    /// Address whose 4-byte writes clear the written bits (virtio-mmio InterruptACK).
    pub ack_addr: u64,
}

/// Errors of [`crate::Dm::register_status_word`] and [`StatusPage`].
#[derive(Debug, thiserror::Error)]
pub enum StatusWordError {
    /// An address is not 4-byte aligned, or `addr + 4` overflows. EINVAL.
    #[error("status-word address {0:#x} is not a 4-byte aligned register")]
    Misaligned(u64),
    /// The DM has a status word already (one per DM, hence per session). EEXIST.
    #[error("the DM has a status word already")]
    Exists,
    /// An address overlaps a registered ioeventfd. EEXIST.
    #[error("status-word address {0:#x} overlaps an ioeventfd")]
    IoeventfdConflict(u64),
    /// No registration is this page (unregister). ENOENT.
    #[error("no such status word")]
    NotFound,
    /// The DM is being destroyed. ESHUTDOWN.
    #[error("the DM is being destroyed")]
    ShuttingDown,
    /// A received file is too small to hold the word. EINVAL.
    #[error("status-word file of {0} bytes is too small")]
    TooSmall(u64),
    /// Creating, sealing or mapping the page failed.
    #[error("status-word page: {0}")]
    Io(#[source] io::Error),
}

impl StatusWordError {
    /// The errno of this error.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Misaligned(_) | Self::TooSmall(_) => libc::EINVAL,
            Self::Exists | Self::IoeventfdConflict(_) => libc::EEXIST,
            Self::NotFound => libc::ENOENT,
            Self::ShuttingDown => libc::ESHUTDOWN,
            Self::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// A shared mapping of a file whose first 4 bytes are the status word.
#[derive(Debug)]
pub struct StatusPage {
    ptr: NonNull<libc::c_void>,
    len: usize,
    file: File,
}

// SAFETY: the mapping is only accessed through `&AtomicU32` (atomic operations are safe from
// any thread), and it lives until `drop`, which needs `&mut self`.
unsafe impl Send for StatusPage {}
// SAFETY: as above: shared access is atomic only.
unsafe impl Sync for StatusPage {}

impl StatusPage {
    /// A new page: a sealed (no shrink, no grow) memfd of [`STATUS_PAGE_SIZE`] bytes, zeroed,
    /// mapped shared.
    ///
    /// # Errors
    /// [`StatusWordError::Io`] if the memfd cannot be made, sized, sealed or mapped.
    pub fn new() -> Result<Self, StatusWordError> {
        // SAFETY: the name is a NUL-terminated string; memfd_create reads nothing else.
        let fd = unsafe {
            libc::memfd_create(
                c"remio-status-word".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(StatusWordError::Io(io::Error::last_os_error()));
        }
        // SAFETY: fd was just returned by memfd_create and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(STATUS_PAGE_SIZE)
            .map_err(StatusWordError::Io)?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on an fd we own; the third argument is an int.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(StatusWordError::Io(io::Error::last_os_error()));
        }
        Self::map(file)
    }

    /// Maps the word of a file received from the platform ([`StatusPage::file`] of its page).
    ///
    /// # Errors
    /// [`StatusWordError::TooSmall`] for a file shorter than 4 bytes;
    /// [`StatusWordError::Io`] if it cannot be inspected or mapped.
    pub fn from_file(file: File) -> Result<Self, StatusWordError> {
        let len = file.metadata().map_err(StatusWordError::Io)?.len();
        if len < 4 {
            return Err(StatusWordError::TooSmall(len));
        }
        Self::map(file)
    }

    fn map(file: File) -> Result<Self, StatusWordError> {
        let len = std::mem::size_of::<AtomicU32>();
        // SAFETY: a new shared mapping chosen by the kernel (no fixed address, so nothing of
        // ours is replaced) of an fd we hold open; the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(StatusWordError::Io(io::Error::last_os_error()));
        }
        let ptr = NonNull::new(p)
            .ok_or_else(|| StatusWordError::Io(io::Error::other("mmap returned a null mapping")))?;
        Ok(Self { ptr, len, file })
    }

    /// The word. Page-aligned, so aligned for `AtomicU32`.
    pub fn word(&self) -> &AtomicU32 {
        // SAFETY: `ptr` is a live, page-aligned, readable and writable shared mapping of at
        // least 4 bytes until `drop`; the file behind it cannot shrink (sealed by the platform;
        // a received file is trusted as the platform's), and every access, here or in the
        // other process, is atomic.
        unsafe { self.ptr.cast::<AtomicU32>().as_ref() }
    }

    /// The file behind the page (to send to a device model).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Reads the word (`Acquire`, pairing with the device model's `Release` bit set).
    pub fn load(&self) -> u32 {
        self.word().load(Ordering::Acquire)
    }

    /// Clears the bits set in `ack` (an InterruptACK write); returns the previous value.
    pub fn ack(&self, ack: u32) -> u32 {
        self.word().fetch_and(!ack, Ordering::AcqRel)
    }
}

impl Drop for StatusPage {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `map`, and no reference from
        // `word` outlives `&self`, so nothing uses it after this.
        unsafe {
            libc::munmap(self.ptr.as_ptr(), self.len);
        }
    }
}

/// The registration the DM keeps (next to its ioeventfds, under the same lock).
#[derive(Debug)]
pub(crate) struct StatusWordReg {
    pub(crate) cfg: StatusWordConfig,
    pub(crate) page: std::sync::Arc<StatusPage>,
}

impl StatusWordReg {
    /// Whether `[addr, addr + len)` (len 0 counts as 1) touches one of the two registers.
    pub(crate) fn overlaps(&self, addr: u64, len: u64) -> bool {
        let end = addr.saturating_add(len.max(1));
        [self.cfg.status_addr, self.cfg.ack_addr]
            .iter()
            .any(|&r| addr < r.saturating_add(4) && r < end)
    }

    /// Answers the access if it is one of ours: `Some(value)` for a read of the word (the
    /// value to complete with), `Some(0)` for an acknowledgement done; `None` otherwise.
    pub(crate) fn serve(&self, op: u64, addr: u64, width: u64, value: u64) -> Option<u64> {
        if width != 4 {
            return None;
        }
        match op {
            remio_abi::uapi::BAO_IO_READ if addr == self.cfg.status_addr => {
                Some(u64::from(self.page.load()))
            }
            remio_abi::uapi::BAO_IO_WRITE if addr == self.cfg.ack_addr => {
                let bits = u32::try_from(value & 0xffff_ffff).unwrap_or(u32::MAX);
                self.page.ack(bits);
                Some(0)
            }
            _ => None,
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_received_file_maps_the_same_word() {
        let a = StatusPage::new().unwrap();
        let b = StatusPage::from_file(a.file().try_clone().unwrap()).unwrap();
        a.word().fetch_or(0b101, Ordering::Release);
        assert_eq!(b.load(), 0b101);
        b.ack(0b001);
        assert_eq!(a.load(), 0b100);
    }

    #[test]
    fn the_platform_page_cannot_be_shrunk_by_its_receiver() {
        let a = StatusPage::new().unwrap();
        let received = a.file().try_clone().unwrap();
        assert!(received.set_len(0).is_err());
        assert_eq!(a.file().metadata().unwrap().len(), STATUS_PAGE_SIZE);
    }

    #[test]
    fn a_file_too_small_for_the_word_is_refused() {
        // SAFETY: a NUL-terminated name; the returned fd is checked and owned below.
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd was just created and is owned by nothing else.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(2).unwrap();
        let e = StatusPage::from_file(f).unwrap_err();
        assert!(matches!(e, StatusWordError::TooSmall(2)));
        assert_eq!(e.errno(), libc::EINVAL);
    }
}
