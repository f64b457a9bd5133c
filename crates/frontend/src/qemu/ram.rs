//! Guest RAM that is also the Remote I/O shared memory.
//!
//! We create the guest RAM ourselves as a memfd, give a duplicate to the hypervisor model as
//! the shared-memory backing of every Remote I/O device (base 0, size = RAM), and hand the
//! same file to QEMU as `memory-backend-file,mem-path=/proc/self/fd/N,share=on`. Why not
//! `memory-backend-memfd` and the SYNC_SYSMEM fd: the hypervisor model is built, and device
//! models attach to it, before QEMU runs; owning the file first means the backing exists from
//! the start and nothing has to be re-plumbed when QEMU's layout messages arrive. SYNC_SYSMEM
//! is then only checked against it ([`RamIdentity`]).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd};

/// The largest RAM we accept: on microvm up to 2 GiB is one region at guest-physical 0.
pub const MAX_RAM: u64 = 2 << 30;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// Zero, unaligned or above [`MAX_RAM`].
    #[error("guest RAM size {0:#x}: must be a non-zero multiple of 2 MiB up to 2 GiB")]
    BadSize(u64),
    /// memfd_create or ftruncate failed.
    #[error("creating guest RAM: {0}")]
    Io(#[from] io::Error),
}

/// The guest RAM file.
#[derive(Debug)]
pub struct GuestRam {
    file: File,
    size: u64,
}

/// What identifies the RAM file in a SYNC_SYSMEM message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamIdentity {
    dev: u64,
    ino: u64,
    /// RAM size in bytes.
    pub size: u64,
}

fn stat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: an all-zero `stat` is a valid value for this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is a valid open descriptor for the call; `st` is a valid out pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

impl RamIdentity {
    /// Whether `fd` refers to the RAM file.
    pub fn is_same_file(&self, fd: BorrowedFd<'_>) -> bool {
        stat(fd).is_ok_and(|st| st.st_dev == self.dev && st.st_ino == self.ino)
    }
}

impl GuestRam {
    /// Creates a `size`-byte memfd (sparse: pages are allocated on first touch).
    pub fn new(size: u64) -> Result<Self, RamError> {
        if size == 0 || !size.is_multiple_of(2 << 20) || size > MAX_RAM {
            return Err(RamError::BadSize(size));
        }
        let name = CString::new("remio-guest-ram").map_err(io::Error::other)?;
        // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: memfd_create just returned this descriptor and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        Ok(Self { file, size })
    }

    /// The file (to duplicate for the hypervisor model, or to pass to QEMU).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The identity SYNC_SYSMEM is checked against.
    pub fn identity(&self) -> Result<RamIdentity, RamError> {
        use std::os::fd::AsFd;
        let st = stat(self.file.as_fd())?;
        Ok(RamIdentity {
            dev: st.st_dev,
            ino: st.st_ino,
            size: self.size,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn ram_is_sized_and_recognised_through_a_duplicate_but_not_another_file() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let id = ram.identity().unwrap();
        let dup = ram.file().try_clone().unwrap();
        let other = GuestRam::new(2 << 20).unwrap();
        assert_eq!(ram.file().metadata().unwrap().len(), 4 << 20);
        assert!(id.is_same_file(dup.as_fd()));
        assert!(!id.is_same_file(other.file().as_fd()));
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(GuestRam::new(0), Err(RamError::BadSize(0))));
        assert!(GuestRam::new(3 << 20).is_err());
        assert!(GuestRam::new(4 << 30).is_err());
    }
}
