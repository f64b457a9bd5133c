//! The engine a block device moves its bytes through (as Firecracker's block `FileEngine`, or
//! Cloud Hypervisor's `AsyncIo`): the device parses and validates requests and answers them,
//! the engine only reads, writes, syncs and deallocates. [`FileEngine`] is the real one over
//! an image file or block device; tests put a recording engine in its place to see what reached
//! the disk and when (that FLUSH synced, that nothing was acknowledged before it was written).

use std::fs::File;
use std::io;

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::fallocate::{fallocate, FallocateMode};
use vmm_sys_util::write_zeroes::WriteZeroesAt;

/// Moves a block device's bytes. Every call is synchronous: when it returns `Ok`, the bytes
/// are where they were asked to go (in the image's page cache for writes, on stable storage
/// after `flush`). Offsets and lengths are in bytes and were checked against the capacity.
///
/// A device runs a queue's requests on several threads at once (its I/O workers, see
/// [`BlockDevice`](super::block::BlockDevice)), each with its own engine made by
/// [`BlockEngine::try_clone`]: the clones serve the same image, and a `flush` on any of them
/// makes the writes completed on all of them durable.
pub trait BlockEngine: Send + std::fmt::Debug + 'static {
    /// Another engine over the same image, for another I/O thread.
    fn try_clone(&self) -> io::Result<Self>
    where
        Self: Sized;

    /// Reads from the image at `offset` into the guest buffers `data`, in order.
    fn read(
        &mut self,
        mem: &GuestMemoryMmap,
        data: &[(GuestAddress, u32)],
        offset: u64,
    ) -> io::Result<()>;

    /// Writes the guest buffers `data`, in order, to the image at `offset`.
    fn write(
        &mut self,
        mem: &GuestMemoryMmap,
        data: &[(GuestAddress, u32)],
        offset: u64,
    ) -> io::Result<()>;

    /// Makes every completed write durable (`fdatasync`).
    fn flush(&mut self) -> io::Result<()>;

    /// Deallocates `[offset, offset + len)`; it reads back as zeroes.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;

    /// Zeroes `[offset, offset + len)`, deallocating it if `unmap`.
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
}

/// The real engine: one `preadv`/`pwritev` per request into guest memory, `fdatasync` for a
/// flush and `fallocate` for discard and write-zeroes, on the image's open file description
/// (which carries the image lock, see [`BlockBackend::open`](super::block::BlockBackend::open)).
/// Its clones `dup` the descriptor: one open file description, so one lock, released when the
/// last clone is closed, and one `fdatasync` covers the writes of every clone.
#[derive(Debug)]
pub struct FileEngine {
    file: File,
    /// Reused for every request (no allocation per request).
    iov: crate::sys::IoVecs,
    /// The room `iov` was made with, for clones.
    segments: usize,
}

impl FileEngine {
    /// An engine over `file`, with room for `segments` iovecs before the first reallocation.
    pub fn new(file: File, segments: usize) -> Self {
        Self {
            file,
            iov: crate::sys::IoVecs::with_capacity(segments),
            segments,
        }
    }
}

impl BlockEngine for FileEngine {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
            iov: crate::sys::IoVecs::with_capacity(self.segments),
            segments: self.segments,
        })
    }

    fn read(
        &mut self,
        mem: &GuestMemoryMmap,
        data: &[(GuestAddress, u32)],
        offset: u64,
    ) -> io::Result<()> {
        self.iov.transfer(&self.file, mem, data, offset, true)
    }

    fn write(
        &mut self,
        mem: &GuestMemoryMmap,
        data: &[(GuestAddress, u32)],
        offset: u64,
    ) -> io::Result<()> {
        self.iov.transfer(&self.file, mem, data, offset, false)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(&self.file, FallocateMode::PunchHole, true, offset, len).map_err(io::Error::from)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap {
            return self.discard(offset, len);
        }
        match fallocate(&self.file, FallocateMode::ZeroRange, true, offset, len) {
            Ok(()) => Ok(()),
            // tmpfs and others lack ZERO_RANGE: write the zeroes.
            Err(_) => usize::try_from(len)
                .map_err(io::Error::other)
                .and_then(|len| self.file.write_all_zeroes_at(offset, len)),
        }
    }
}
