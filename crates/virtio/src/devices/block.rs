//! virtio-blk (virtio 1.2 §5.2) over a raw image: a regular file or a block device
//! (`/dev/mmcblk0p2`, `/dev/sda1`, `/dev/loop0`).
//!
//! The image is sized by seeking to its end (a block device's `st_size` is 0) and locked for
//! as long as the device exists, so that two device models never serve one image
//! (see [`BlockBackend::open`]).
//!
//! Every request is validated by [`parse_block_request`] (header, directions, sector range,
//! status descriptor, every buffer inside guest memory) before any buffer or the image is
//! touched; then `BlockBackend::execute` runs it through a [`BlockEngine`], the only thing that
//! moves bytes ([`FileEngine`] on the image; a recording one in tests). A request is
//! acknowledged (its used-ring entry published) only after the engine returned.

use std::fs::OpenOptions;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::EventFd;

pub use crate::devices::block_engine::{BlockEngine, FileEngine};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::crash_point::crash_point;
use crate::device::{
    check_avail, fail_device, read_config_bytes, ActivateContext, ActivateError, EventLoop,
    Interrupt, QueueError, VirtioDevice, Worker, STOP_TOKEN,
};
use remio_ratelimit::warn_rl;

/// Sector size of the virtio-blk protocol (virtio 1.2 §5.2.6).
pub const SECTOR_SIZE: u64 = 512;
/// Queue size we offer: large enough that a 1 MiB read is one request (see [`SEG_MAX`]).
pub const QUEUE_SIZE: u16 = 512;
/// Data segments per request we accept (config `seg_max`): the queue size minus header and
/// status descriptors (a chain may not be longer than the queue). Linux cuts a request at
/// `seg_max` segments, and the 256 pages of a 1 MiB `O_DIRECT` buffer are often not physically
/// contiguous: with a queue of 256 (254 segments) such a read became two requests, 254 + 2
/// pages, each with its own completion (and the boots where that happened were the slow ones).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest data segment (config `size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest discard / write-zeroes request in sectors (config `max_discard_sectors`, ...).
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX >> 9;
/// Segments per discard / write-zeroes request (config `max_discard_seg`, ...).
pub const MAX_DISCARD_SEG: u32 = 16;
/// Bytes of the request header (`struct virtio_blk_outhdr`).
const HEADER_LEN: u32 = 16;
/// Bytes of one discard / write-zeroes segment (`struct virtio_blk_discard_write_zeroes`).
const DISCARD_SEG_LEN: u64 = 16;
/// Status bytes (virtio 1.2 §5.2.6), as the `u8` the device writes.
pub const S_OK: u8 = 0;
/// VIRTIO_BLK_S_IOERR.
pub const S_IOERR: u8 = 1;
/// VIRTIO_BLK_S_UNSUPP.
pub const S_UNSUPP: u8 = 2;
const _: () = assert!(
    S_OK as u32 == VIRTIO_BLK_S_OK
        && S_IOERR as u32 == VIRTIO_BLK_S_IOERR
        && S_UNSUPP as u32 == VIRTIO_BLK_S_UNSUPP
);
/// Size of our configuration space: up to and including `write_zeroes_may_unmap` + padding.
const CONFIG_LEN: usize = 60;

/// The operation of a parsed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// VIRTIO_BLK_T_IN: read from the image into guest buffers.
    In,
    /// VIRTIO_BLK_T_OUT: write guest buffers to the image.
    Out,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_GET_ID: the serial, 20 bytes.
    GetId,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
}

/// A validated request; reused between requests so the hot path does not allocate.
#[derive(Debug, Default)]
pub struct BlockRequest {
    /// The operation (`None` until parsed).
    pub kind: Option<RequestType>,
    /// First sector (IN / OUT).
    pub sector: u64,
    /// Data buffers in order, each `(guest address, length)`, all inside guest memory and of
    /// the direction the operation needs.
    pub data: Vec<(GuestAddress, u32)>,
    /// Total length of `data`.
    pub data_len: u64,
    /// Where the status byte goes (`None` if the chain has no usable status descriptor).
    pub status_addr: Option<GuestAddress>,
}

/// Why a request is refused. [`BlockRequestError::status`] is what the device answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlockRequestError {
    /// No descriptors, or the last one is not a writable in-memory status byte: the request
    /// cannot be answered and is returned with used length 0.
    #[error("no writable status descriptor")]
    NoStatus,
    /// The header is missing, too short, writable or outside memory.
    #[error("bad request header")]
    BadHeader,
    /// A data buffer has the wrong direction for the operation.
    #[error("data buffer of the wrong direction")]
    WrongDirection,
    /// A data buffer lies (partly) outside guest memory.
    #[error("data buffer outside guest memory")]
    OutOfMemory,
    /// More data segments than `seg_max`, or a segment larger than `size_max`.
    #[error("too many or too large data segments")]
    TooManySegments,
    /// The data length is not a multiple of the sector size or of a discard segment.
    #[error("unaligned data length")]
    Unaligned,
    /// The sector range goes past the end of the disk (or overflows).
    #[error("sector range outside the disk")]
    OutOfRange,
    /// A write, discard or write-zeroes on a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// An operation we do not implement.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

impl BlockRequestError {
    /// The status byte to report (virtio 1.2 §5.2.6), `None` when there is nowhere to put it.
    pub fn status(&self) -> Option<u8> {
        match self {
            Self::NoStatus => None,
            Self::Unsupported(_) => Some(S_UNSUPP),
            _ => Some(S_IOERR),
        }
    }
}

/// What the parser needs to know about the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskGeometry {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Whether writes are refused.
    pub read_only: bool,
}

fn in_memory<M: GuestMemory>(mem: &M, addr: GuestAddress, len: u32) -> bool {
    let Ok(len) = usize::try_from(len) else {
        return false;
    };
    len == 0 || mem.check_range(addr, len, Permissions::ReadWrite)
}

/// Parses and validates one request from its descriptors (in chain order; indirect tables
/// already followed, as virtio-queue's `DescriptorChain` yields them). Fills `req` (reused).
///
/// Nothing is read but the header and nothing is written. On error `req.status_addr` tells
/// whether (and where) the error status can be reported.
pub fn parse_block_request<M, I>(
    mem: &M,
    descs: I,
    disk: DiskGeometry,
    req: &mut BlockRequest,
) -> Result<(), BlockRequestError>
where
    M: GuestMemory + Bytes<GuestAddress>,
    I: IntoIterator<Item = Descriptor>,
{
    req.kind = None;
    req.sector = 0;
    req.data.clear();
    req.data_len = 0;
    req.status_addr = None;

    let mut descs = descs.into_iter();
    let head = descs.next().ok_or(BlockRequestError::NoStatus)?;
    // Segments between the header and the status descriptor go to `req.data` (bounded);
    // the direction of each is checked once the type is known.
    let mut last: Option<Descriptor> = None;
    let mut writable_mask_ok = (true, true); // (all readable, all writable)
    let mut too_many = false;
    let mut push = |req: &mut BlockRequest, addr: GuestAddress, len: u32, write: bool| {
        if len == 0 {
            return Ok(());
        }
        if req.data.len() >= SEG_MAX as usize || len > SIZE_MAX {
            too_many = true;
            return Ok(());
        }
        if !in_memory(mem, addr, len) {
            return Err(BlockRequestError::OutOfMemory);
        }
        if write {
            writable_mask_ok.0 = false;
        } else {
            writable_mask_ok.1 = false;
        }
        req.data.push((addr, len));
        req.data_len = req
            .data_len
            .checked_add(u64::from(len))
            .ok_or(BlockRequestError::OutOfRange)?;
        Ok(())
    };

    // Find the status descriptor first: the last one.
    let mut middle_err = None;
    for d in descs.by_ref() {
        if let Some(prev) = last.replace(d) {
            if middle_err.is_none() {
                if let Err(e) = push(req, prev.addr(), prev.len(), prev.is_write_only()) {
                    middle_err = Some(e);
                }
            }
        }
    }
    let status = last.ok_or(BlockRequestError::NoStatus)?;
    if !status.is_write_only() || status.len() == 0 {
        return Err(BlockRequestError::NoStatus);
    }
    let status_off = u64::from(status.len() - 1);
    let status_addr = status
        .addr()
        .checked_add(status_off)
        .ok_or(BlockRequestError::NoStatus)?;
    if !in_memory(mem, status_addr, 1) {
        return Err(BlockRequestError::NoStatus);
    }
    req.status_addr = Some(status_addr);

    // Header.
    if head.is_write_only() || head.len() < HEADER_LEN || !in_memory(mem, head.addr(), head.len()) {
        return Err(BlockRequestError::BadHeader);
    }
    let req_type: u32 = mem
        .read_obj::<u32>(head.addr())
        .map(u32::from_le)
        .map_err(|_| BlockRequestError::BadHeader)?;
    let sector: u64 = mem
        .read_obj::<u64>(head.addr().unchecked_add(8))
        .map(u64::from_le)
        .map_err(|_| BlockRequestError::BadHeader)?;

    // Data after the header in the first descriptor, then the middle, then the bytes of the
    // status descriptor before the status byte. The middle ones were pushed above, so insert
    // the head remainder first by rebuilding order.
    if let Some(e) = middle_err {
        return Err(e);
    }
    if head.len() > HEADER_LEN {
        let addr = head.addr().unchecked_add(u64::from(HEADER_LEN));
        let len = head.len() - HEADER_LEN;
        let before = req.data.len();
        push(req, addr, len, false)?;
        if req.data.len() > before {
            req.data.rotate_right(1);
        }
    }
    if status.len() > 1 {
        push(req, status.addr(), status.len() - 1, true)?;
    }
    if too_many {
        return Err(BlockRequestError::TooManySegments);
    }
    let (all_readable, all_writable) = writable_mask_ok;

    let kind = match req_type {
        VIRTIO_BLK_T_IN => RequestType::In,
        VIRTIO_BLK_T_OUT => RequestType::Out,
        VIRTIO_BLK_T_FLUSH => RequestType::Flush,
        VIRTIO_BLK_T_GET_ID => RequestType::GetId,
        VIRTIO_BLK_T_DISCARD => RequestType::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
        other => return Err(BlockRequestError::Unsupported(other)),
    };
    match kind {
        RequestType::In | RequestType::GetId if !all_writable => {
            return Err(BlockRequestError::WrongDirection)
        }
        RequestType::Out | RequestType::Discard | RequestType::WriteZeroes if !all_readable => {
            return Err(BlockRequestError::WrongDirection)
        }
        _ => {}
    }
    match kind {
        RequestType::In | RequestType::Out => {
            if !req.data_len.is_multiple_of(SECTOR_SIZE) {
                return Err(BlockRequestError::Unaligned);
            }
            let end = sector
                .checked_add(req.data_len / SECTOR_SIZE)
                .ok_or(BlockRequestError::OutOfRange)?;
            if end > disk.capacity {
                return Err(BlockRequestError::OutOfRange);
            }
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            if req.data_len == 0 || !req.data_len.is_multiple_of(DISCARD_SEG_LEN) {
                return Err(BlockRequestError::Unaligned);
            }
            if req.data_len / DISCARD_SEG_LEN > u64::from(MAX_DISCARD_SEG) {
                return Err(BlockRequestError::TooManySegments);
            }
        }
        RequestType::Flush | RequestType::GetId => {}
    }
    if disk.read_only
        && matches!(
            kind,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
        )
    {
        return Err(BlockRequestError::ReadOnly);
    }
    req.kind = Some(kind);
    req.sector = sector;
    Ok(())
}

/// Why an image cannot be served. As an [`std::io::Error`] (what [`BlockBackend::open`]'s
/// callers get) each keeps its message and maps to one kind / errno:
///
/// | variant        | `io::ErrorKind`            | errno            |
/// |----------------|----------------------------|------------------|
/// | `Stat`         | the cause's                | the cause's (ENOENT, EACCES, ...) |
/// | `NotAnImage`   | `InvalidInput`             | EINVAL           |
/// | `Open`         | the cause's                | the cause's      |
/// | `Locked`       | `WouldBlock`               | EWOULDBLOCK      |
/// | `Lock`         | the cause's                | the cause's      |
/// | `Size`         | the cause's                | the cause's      |
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The path cannot be looked up (missing, no permission on a directory on the way).
    #[error("image {path}: {source}")]
    Stat {
        /// The image path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The path is neither a regular file nor a block device.
    #[error("image {path} is {what}, not a regular file or a block device")]
    NotAnImage {
        /// The image path.
        path: PathBuf,
        /// What it is instead ("a directory", "a character device", ...).
        what: &'static str,
    },
    /// `open` failed.
    #[error("cannot open image {path}: {source}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Another open of the image holds a conflicting lock: another device model, or another
    /// device of this one configured with the same image.
    #[error("image {path} is in use by another process (locked): refusing to serve it twice")]
    Locked {
        /// The image path.
        path: PathBuf,
    },
    /// `flock` failed for another reason than a conflicting lock.
    #[error("cannot lock image {path}: {source}")]
    Lock {
        /// The image path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Seeking to the end to size the image failed.
    #[error("cannot size image {path}: {source}")]
    Size {
        /// The image path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl From<ImageError> for std::io::Error {
    fn from(e: ImageError) -> Self {
        use std::io::ErrorKind;
        let kind = match &e {
            ImageError::Stat { source, .. }
            | ImageError::Open { source, .. }
            | ImageError::Lock { source, .. }
            | ImageError::Size { source, .. } => source.kind(),
            ImageError::NotAnImage { .. } => ErrorKind::InvalidInput,
            ImageError::Locked { .. } => ErrorKind::WouldBlock,
        };
        Self::new(kind, e)
    }
}

/// What an image path names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    /// A regular file.
    File,
    /// A block device.
    BlockDevice,
}

fn image_kind(path: &Path, ty: std::fs::FileType) -> Result<ImageKind, ImageError> {
    let what = if ty.is_file() {
        return Ok(ImageKind::File);
    } else if ty.is_block_device() {
        return Ok(ImageKind::BlockDevice);
    } else if ty.is_dir() {
        "a directory"
    } else if ty.is_char_device() {
        "a character device"
    } else if ty.is_fifo() {
        "a FIFO"
    } else if ty.is_socket() {
        "a socket"
    } else {
        "of an unknown file type"
    };
    Err(ImageError::NotAnImage {
        path: path.to_owned(),
        what,
    })
}

/// Whether `path` (symlinks followed) can be served as a disk: a regular file or a block
/// device. Directories, character devices, FIFOs, sockets and missing paths are refused with an
/// error naming the path. Nothing is opened (opening a FIFO would block).
///
/// `remio run --disk` and [`BlockBackend::open`] both check with this.
pub fn check_image(path: &Path) -> Result<ImageKind, ImageError> {
    let meta = std::fs::metadata(path).map_err(|source| ImageError::Stat {
        path: path.to_owned(),
        source,
    })?;
    image_kind(path, meta.file_type())
}

/// The size of an image found by seeking to its end: `(whole sectors, bytes past the last
/// whole sector)`. Seeking works for regular files and block devices alike, where
/// `metadata().len()` is 0 for a block device. The position is left at 0 (the I/O is all
/// positional, so it does not matter).
pub fn image_capacity<S: Seek>(image: &mut S) -> std::io::Result<(u64, u64)> {
    let len = image.seek(SeekFrom::End(0))?;
    image.seek(SeekFrom::Start(0))?;
    Ok((len / SECTOR_SIZE, len % SECTOR_SIZE))
}

/// The engine over the image and what is needed to run validated requests through it.
#[derive(Debug)]
pub struct BlockBackend<E: BlockEngine = FileEngine> {
    /// Moves the bytes. A [`FileEngine`] holds the image's only descriptor of its open file
    /// description: closing it (dropping the backend) releases the image lock.
    engine: E,
    disk: DiskGeometry,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    req: BlockRequest,
}

impl BlockBackend<FileEngine> {
    /// Opens `path`, a regular file or a block device (see [`check_image`]), read-write unless
    /// `read_only`, and locks it.
    ///
    /// Capacity is the size found by seeking to the end, in whole sectors: bytes past the last
    /// whole sector (a file whose size is not a multiple of 512) are not served, and a warning
    /// says how many.
    ///
    /// Locking: a BSD `flock`, exclusive for read-write and shared for read-only, without
    /// waiting (`sys::try_flock`). A second device model (or a second device of this
    /// one) on the same image then fails with [`ImageError::Locked`]; several read-only users
    /// may share an image. flock rather than QEMU's OFD `fcntl` byte-range locks: both are per
    /// open file description, so both catch a second open in the same process, but flock is
    /// the convention of the tools around block devices (udev skips probing a device held with
    /// `LOCK_EX`; util-linux's `mkfs`/`fsck --lock` and `systemd-repart` take it), and a
    /// whole-image lock is all we need (QEMU uses byte ranges to encode per-permission
    /// sharing). The two kinds do not see each other on Linux: this lock does not stop a QEMU
    /// using the image, nor QEMU's lock us.
    ///
    /// The lock lives as long as the returned backend, which owns the only descriptor: a
    /// [`BlockDevice`] keeps its backend through reset and re-activation (the worker hands it
    /// back), so the lock is held while the device exists and is never re-taken, and it is
    /// released when the device is dropped. The image is never re-opened, so there is no
    /// self-deadlock to fear; and with `LOCK_NB` a re-open would fail, not hang.
    ///
    /// Errors are [`ImageError`]s carried in the `io::Error` (see its table).
    pub fn open(path: &Path, read_only: bool, serial: Option<&str>) -> std::io::Result<Self> {
        Ok(Self::open_image(path, read_only, serial)?)
    }

    fn open_image(path: &Path, read_only: bool, serial: Option<&str>) -> Result<Self, ImageError> {
        check_image(path)?;
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| ImageError::Open {
                path: path.to_owned(),
                source,
            })?;
        // The path may have been replaced between the check and the open: check what we got.
        let ty = file
            .metadata()
            .map_err(|source| ImageError::Stat {
                path: path.to_owned(),
                source,
            })?
            .file_type();
        image_kind(path, ty)?;
        crate::sys::try_flock(&file, !read_only).map_err(|source| {
            if source.kind() == std::io::ErrorKind::WouldBlock {
                ImageError::Locked {
                    path: path.to_owned(),
                }
            } else {
                ImageError::Lock {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
        let (capacity, tail) = image_capacity(&mut &file).map_err(|source| ImageError::Size {
            path: path.to_owned(),
            source,
        })?;
        if tail != 0 {
            log::warn!(
                "virtio-blk: image {}: its size is not a multiple of {SECTOR_SIZE}: the last \
                 {tail} bytes are not served ({capacity} sectors)",
                path.display()
            );
        }
        Ok(Self::with_engine(
            FileEngine::new(file, SEG_MAX as usize),
            DiskGeometry {
                capacity,
                read_only,
            },
            serial,
        ))
    }
}

impl<E: BlockEngine> BlockBackend<E> {
    /// A backend over any engine, for a disk of `disk`'s geometry answering GET_ID with
    /// `serial` (at most 20 bytes used). [`BlockBackend::open`] is this over a [`FileEngine`].
    pub fn with_engine(engine: E, disk: DiskGeometry, serial: Option<&str>) -> Self {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let serial = serial.unwrap_or("");
        let n = serial.len().min(id.len());
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Self {
            engine,
            disk,
            id,
            req: BlockRequest {
                data: Vec::with_capacity(SEG_MAX as usize),
                ..BlockRequest::default()
            },
        }
    }

    /// The disk as the parser sees it.
    pub fn geometry(&self) -> DiskGeometry {
        self.disk
    }

    /// Parses, runs and answers one request; returns the used length.
    pub fn handle<I: IntoIterator<Item = Descriptor>>(
        &mut self,
        mem: &GuestMemoryMmap,
        descs: I,
    ) -> u32 {
        self.handle_inner(mem, descs).0
    }

    /// [`BlockBackend::handle`], counting the request in `stats` (kind, data bytes, error).
    pub fn handle_counted<I: IntoIterator<Item = Descriptor>>(
        &mut self,
        mem: &GuestMemoryMmap,
        descs: I,
        stats: &crate::stats::DeviceStats,
    ) -> u32 {
        let (used, status) = self.handle_inner(mem, descs);
        count_request(stats, &self.req, status);
        used
    }

    /// Parses, runs and answers one request: the used length and the status answered.
    fn handle_inner<I: IntoIterator<Item = Descriptor>>(
        &mut self,
        mem: &GuestMemoryMmap,
        descs: I,
    ) -> (u32, u8) {
        let mut req = std::mem::take(&mut self.req);
        let answer = match parse_block_request(mem, descs, self.disk, &mut req) {
            Ok(()) => self.answer(mem, &req),
            Err(e) => answer_refused(mem, &req, e),
        };
        self.req = req;
        answer
    }

    /// Another backend over the same image ([`BlockEngine::try_clone`]), for an I/O worker.
    fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            engine: self.engine.try_clone()?,
            disk: self.disk,
            id: self.id,
            req: BlockRequest::default(),
        })
    }

    /// Runs the validated request `req` and writes its status byte: the used length and the
    /// status answered.
    fn answer(&mut self, mem: &GuestMemoryMmap, req: &BlockRequest) -> (u32, u8) {
        let (status, written) = match self.execute(mem, req) {
            Ok(written) => (S_OK, written),
            Err(status) => (status, 0),
        };
        (write_status(mem, req, status, written), status)
    }

    /// Runs a validated request; `Ok(bytes written to guest buffers)` or `Err(status)`.
    fn execute(&mut self, mem: &GuestMemoryMmap, req: &BlockRequest) -> Result<u32, u8> {
        let ioerr = |e: &dyn std::fmt::Display| {
            warn_rl!("virtio-blk: I/O error: {e}");
            S_IOERR
        };
        let kind = req.kind.ok_or(S_IOERR)?;
        match kind {
            RequestType::In | RequestType::Out => {
                // sector + len was checked against the capacity, so this does not overflow for
                // a capacity taken from a file size; checked all the same (guest-derived).
                let offset = req.sector.checked_mul(SECTOR_SIZE).ok_or(S_IOERR)?;
                if kind == RequestType::In {
                    self.engine.read(mem, &req.data, offset)
                } else {
                    self.engine.write(mem, &req.data, offset)
                }
                .map_err(|e| ioerr(&e))?;
                if kind == RequestType::Out {
                    crate::crash_point::crash_point!("blk-written");
                }
                Ok(if kind == RequestType::In {
                    u32::try_from(req.data_len).unwrap_or(u32::MAX)
                } else {
                    0
                })
            }
            RequestType::Flush => {
                if !self.disk.read_only {
                    self.engine.flush().map_err(|e| ioerr(&e))?;
                }
                Ok(0)
            }
            RequestType::GetId => {
                let mut written = 0usize;
                for &(addr, len) in &req.data {
                    let rest = &self.id[written..];
                    if rest.is_empty() {
                        break;
                    }
                    let n = rest.len().min(len as usize);
                    mem.write_slice(&rest[..n], addr).map_err(|e| ioerr(&e))?;
                    written += n;
                }
                Ok(u32::try_from(written).unwrap_or(0))
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                self.discard_or_zero(mem, req, kind == RequestType::Discard)
            }
        }
    }

    fn discard_or_zero(
        &mut self,
        mem: &GuestMemoryMmap,
        req: &BlockRequest,
        discard: bool,
    ) -> Result<u32, u8> {
        // At most MAX_DISCARD_SEG segments of 16 bytes: gather them on the stack.
        let mut raw = [0u8; (MAX_DISCARD_SEG as usize) * 16];
        let mut filled = 0usize;
        for &(addr, len) in &req.data {
            let len = len as usize;
            let dst = raw.get_mut(filled..filled + len).ok_or(S_IOERR)?;
            mem.read_slice(dst, addr).map_err(|_| S_IOERR)?;
            filled += len;
        }
        for seg in raw[..filled].chunks_exact(16) {
            let le64 = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
            let le32 = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap_or([0; 4]));
            let sector = le64(&seg[0..8]);
            let num = le32(&seg[8..12]);
            let flags = le32(&seg[12..16]);
            // Discard: no flags defined; write zeroes: only UNMAP (virtio 1.2 §5.2.6.2).
            let allowed = if discard {
                0
            } else {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            };
            if flags & !allowed != 0 {
                return Err(S_UNSUPP);
            }
            if num > MAX_DISCARD_SECTORS {
                return Err(S_IOERR);
            }
            let end = sector.checked_add(u64::from(num)).ok_or(S_IOERR)?;
            if end > self.disk.capacity {
                return Err(S_IOERR);
            }
            let (offset, len) = (sector * SECTOR_SIZE, u64::from(num) * SECTOR_SIZE);
            let result = if discard {
                self.engine.discard(offset, len)
            } else {
                let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                self.engine.write_zeroes(offset, len, unmap)
            };
            result.map_err(|e| {
                warn_rl!("virtio-blk: discard/write-zeroes failed: {e}");
                S_IOERR
            })?;
        }
        Ok(0)
    }
}

/// Answers a request [`parse_block_request`] refused: its status byte, if it has one; the used
/// length and the status.
fn answer_refused(mem: &GuestMemoryMmap, req: &BlockRequest, e: BlockRequestError) -> (u32, u8) {
    warn_rl!("virtio-blk: request refused: {e}");
    let status = e.status().unwrap_or(S_IOERR);
    (write_status(mem, req, status, 0), status)
}

/// Writes `status` to the request's status byte; the used length (`written` data bytes and
/// the status byte, or 0 when there is nowhere to write it).
fn write_status(mem: &GuestMemoryMmap, req: &BlockRequest, status: u8, written: u32) -> u32 {
    match req.status_addr {
        Some(addr) => match mem.write_obj(status, addr) {
            Ok(()) => written.saturating_add(1),
            Err(e) => {
                warn_rl!("virtio-blk: cannot write status: {e}");
                0
            }
        },
        None => 0,
    }
}

/// Counts an answered request in `stats` (kind, data bytes, error).
fn count_request(stats: &crate::stats::DeviceStats, req: &BlockRequest, status: u8) {
    use crate::stats::RequestKind as K;
    let kind = match (status == S_UNSUPP, req.kind) {
        (false, Some(RequestType::In)) => K::Read,
        (false, Some(RequestType::Out)) => K::Write,
        (false, Some(RequestType::Flush)) => K::Flush,
        (false, Some(RequestType::GetId)) => K::GetId,
        (false, Some(RequestType::Discard)) => K::Discard,
        (false, Some(RequestType::WriteZeroes)) => K::WriteZeroes,
        _ => K::Other,
    };
    let bytes = match kind {
        K::Read | K::Write if status == S_OK => req.data_len,
        _ => 0,
    };
    stats.record(kind, bytes, status == S_OK);
}

/// I/O workers a block device runs by default, besides its queue thread (which executes
/// requests too): with the queue thread, five requests of a queue execute at once. QEMU's own
/// virtio-blk runs its requests on a thread pool the same way (up to 64 threads); on a
/// machine of two cores more threads only add wake-ups (docs/performance.md, "Block I/O in
/// parallel").
pub const DEFAULT_IO_WORKERS: usize = 4;
/// The environment variable that overrides [`DEFAULT_IO_WORKERS`] for the block devices of a
/// device-model process (0: the queue thread executes every request itself, one at a time).
pub const IO_WORKERS_ENV: &str = "REMIO_BLK_WORKERS";
/// Most I/O workers [`IO_WORKERS_ENV`] may ask for.
pub const MAX_IO_WORKERS: usize = 64;

/// The I/O workers [`IO_WORKERS_ENV`] asks for; [`DEFAULT_IO_WORKERS`] without it, and with a
/// warning when it is not a number up to [`MAX_IO_WORKERS`].
pub fn io_workers_from_env() -> usize {
    let n = number_from_env(
        IO_WORKERS_ENV,
        DEFAULT_IO_WORKERS as u64,
        MAX_IO_WORKERS as u64,
        "I/O workers",
    );
    // At most MAX_IO_WORKERS.
    usize::try_from(n).unwrap_or(DEFAULT_IO_WORKERS)
}

/// The environment variable that sets the longest the queue thread polls the available ring
/// for the driver's next request, in microseconds, before it sleeps and waits for a kick
/// ([`DEFAULT_POLL_MAX_US`] without it; 0 never polls).
pub const POLL_MAX_ENV: &str = "REMIO_BLK_POLL_US";
/// Most microseconds [`POLL_MAX_ENV`] may ask for.
pub const MAX_POLL_MAX_US: u64 = 10_000;
/// The default longest poll, microseconds. A TCG guest issuing 4 KiB reads one after the
/// other adds its next request 200-700 us after the last completed: a shorter bound found
/// few of them (docs/performance.md, "Polling the available ring").
pub const DEFAULT_POLL_MAX_US: u64 = 1000;

/// The longest poll [`POLL_MAX_ENV`] asks for; without it [`DEFAULT_POLL_MAX_US`], or 0 when
/// this process can run on one CPU only (the poll would spin on the CPU the guest's requests
/// and their completions need); with a warning when it is not a number of microseconds up to
/// [`MAX_POLL_MAX_US`].
pub fn poll_max_from_env() -> Duration {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let default = if cpus > 1 { DEFAULT_POLL_MAX_US } else { 0 };
    Duration::from_micros(number_from_env(
        POLL_MAX_ENV,
        default,
        MAX_POLL_MAX_US,
        "microseconds",
    ))
}

/// The environment variable that sets the longest a used-buffer interrupt is held while the
/// queue polls, in microseconds ([`DEFAULT_IRQ_HOLD_US`] without it; 0 never holds).
pub const IRQ_HOLD_ENV: &str = "REMIO_BLK_IRQ_HOLD_US";
/// Most microseconds [`IRQ_HOLD_ENV`] may ask for.
pub const MAX_IRQ_HOLD_US: u64 = 1000;
/// The default longest hold, microseconds.
pub const DEFAULT_IRQ_HOLD_US: u64 = 150;

/// The hold [`IRQ_HOLD_ENV`] asks for; [`DEFAULT_IRQ_HOLD_US`] without it, and with a warning
/// when it is not a number of microseconds up to [`MAX_IRQ_HOLD_US`].
pub fn irq_hold_from_env() -> Duration {
    Duration::from_micros(number_from_env(
        IRQ_HOLD_ENV,
        DEFAULT_IRQ_HOLD_US,
        MAX_IRQ_HOLD_US,
        "microseconds",
    ))
}

/// The environment variable that sets the largest read the queue thread reads ahead, in KiB
/// ([`DEFAULT_READAHEAD_KIB`] without it; 0 never reads ahead). See [`BlockDevice`].
pub const READAHEAD_ENV: &str = "REMIO_BLK_READAHEAD_KIB";
/// Most KiB [`READAHEAD_ENV`] may ask for.
pub const MAX_READAHEAD_KIB: u64 = 4096;
/// The default largest read ahead, KiB: a little above the 1 280 KiB Linux cuts requests at.
pub const DEFAULT_READAHEAD_KIB: u64 = 2048;

/// The largest read ahead in bytes that [`READAHEAD_ENV`] asks for; [`DEFAULT_READAHEAD_KIB`]
/// without it, and with a warning when it is not a number of KiB up to [`MAX_READAHEAD_KIB`].
pub fn readahead_from_env() -> u64 {
    number_from_env(
        READAHEAD_ENV,
        DEFAULT_READAHEAD_KIB,
        MAX_READAHEAD_KIB,
        "KiB",
    ) << 10
}

/// A number (of `what`) from the environment variable `name`, up to `max`; `default` without
/// it, and with a warning when it is not such a number.
fn number_from_env(name: &str, default: u64, max: u64, what: &str) -> u64 {
    match std::env::var(name) {
        Err(std::env::VarError::NotPresent) => default,
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n) if n <= max => n,
            _ => {
                log::warn!(
                    "virtio-blk: {name}={v:?} is not a number of {what} from 0 to {max}: \
                     using {default}"
                );
                default
            }
        },
        Err(e) => {
            log::warn!("virtio-blk: {name}: {e}: using {default}");
            default
        }
    }
}

/// Interrupt coalescing while the queue polls. Every used-buffer interrupt costs the driver
/// two trapped accesses; a guest whose threads add requests one after the other (a TCG guest
/// at queue depth 16 adds one every 100-300 us, each completed long before the next comes)
/// otherwise takes one interrupt per request. The interrupt for what was published is held
/// for up to `max` while the queue polls, and what the driver adds meanwhile is announced with
/// it. A driver that waits for each completion before it adds the next request (one request
/// in flight) gains nothing and would only wait: after [`Coalescer::MISSES_OFF`] holds in a
/// row that no request joined, interrupts are raised at once, with one probing hold every
/// [`Coalescer::PROBE_EVERY`] interrupts.
#[derive(Debug, Clone, Copy)]
struct Coalescer {
    /// The longest hold (zero: never).
    max: Duration,
    /// Holding (else raising at once until the next probe).
    on: bool,
    /// Holds in a row that no request joined.
    misses: u32,
    /// Interrupts to raise at once before the next probe.
    until_probe: u32,
    /// A request was taken during the current hold.
    joined: bool,
}

impl Coalescer {
    /// Holds in a row without a request joining that turn holding off. At queue depth 16
    /// about 4 holds in 10 catch nothing (docs/performance.md): a short run of misses must not
    /// turn it off there.
    const MISSES_OFF: u32 = 16;
    /// Interrupts raised at once between two probing holds.
    const PROBE_EVERY: u32 = 32;

    fn new(max: Duration) -> Self {
        Self {
            max,
            on: true,
            misses: 0,
            until_probe: 0,
            joined: false,
        }
    }

    /// The next interrupt may be held.
    fn holding(&self) -> bool {
        self.on && self.max > Duration::ZERO
    }

    /// An interrupt was due; `held`: the coalescer had held it.
    fn raised(&mut self, held: bool) {
        if held && self.on {
            if self.joined {
                self.misses = 0;
            } else {
                self.misses += 1;
                if self.misses >= Self::MISSES_OFF {
                    self.on = false;
                    self.until_probe = Self::PROBE_EVERY;
                }
            }
        } else if !self.on {
            self.until_probe = self.until_probe.saturating_sub(1);
            if self.until_probe == 0 {
                // One probing hold: if nothing joins it, holding is off again.
                self.on = true;
                self.misses = Self::MISSES_OFF - 1;
            }
        }
        self.joined = false;
    }
}

/// Adaptive polling of the available ring (as QEMU's AioContext polls a virtqueue): a driver
/// that adds its next request soon after the last completed does not have to kick, which
/// costs it a trapped access. The window starts at `max`, doubles (from [`Poller::FIRST`]) each
/// time a kick came within `max` of the queue going idle, and halves (down to zero) each time
/// the queue stayed idle longer than `max`: an idle guest soon costs no polling.
#[derive(Debug, Clone, Copy)]
struct Poller {
    max: Duration,
    window: Duration,
}

impl Poller {
    /// The first non-zero window.
    const FIRST: Duration = Duration::from_micros(8);
    /// How often a poll looks at the event loop (a stop, or a kick sent before notifications
    /// went off).
    const EVENT_CHECK: Duration = Duration::from_micros(50);
    /// How often a poll yields the core to other runnable threads.
    const YIELD_EVERY: Duration = Duration::from_micros(10);

    /// A poller whose window starts at `max`.
    fn new(max: Duration) -> Self {
        Self { max, window: max }
    }

    /// The queue stayed idle for `idle` in all (the window polled, then the sleep) before a
    /// kick: widen the window if a longer one would have found the request.
    fn kicked_after(&mut self, idle: Duration) {
        if idle < self.max {
            self.window = (self.window * 2).clamp(Self::FIRST, self.max);
        } else if self.window > Self::FIRST {
            self.window /= 2;
        } else {
            self.window = Duration::ZERO;
        }
    }
}

/// How a poll gives its core to other runnable threads every [`Poller::YIELD_EVERY`].
/// `sched_yield` returns at once when nothing else wants the core (0.3 µs), but with a
/// CPU-bound thread on it (a nice-19 build, say) the scheduler may run that thread until its
/// next tick (4 ms) or wake-up, and the guest's next request waits that long. A yield that took
/// longer than [`GiveWay::SLOW_YIELD`] (longer than the threads that serve the device run per
/// wake-up) switches to sleeping [`GiveWay::NAP`] instead: the timer's wake-up takes the core
/// back from such a thread (a nap costs ~16 µs on the machine of docs/performance.md, with
/// or without one). Naps cannot tell whether that thread is still there, so every
/// [`GiveWay::PROBE_AFTER`] one yield probes: a quick one goes back to yielding.
#[derive(Debug, Clone, Copy, Default)]
struct GiveWay {
    /// Napping since then, until the next probing yield is quick.
    napping_since: Option<Instant>,
}

impl GiveWay {
    /// A yield that took longer than this was held by a CPU-bound thread.
    const SLOW_YIELD: Duration = Duration::from_micros(100);
    /// One nap (the queue thread's timer slack is set to 1 ns, so it is about this long, plus
    /// the timer's wake-up).
    const NAP: Duration = Duration::from_micros(1);
    /// How long naps last before a yield probes again (a probe held by the same thread costs
    /// up to a tick: at most ~8% of the time at 4 ms ticks).
    const PROBE_AFTER: Duration = Duration::from_millis(50);

    /// Gives the core to whoever else wants it, in the way that returns soonest.
    fn now(&mut self) {
        let start = Instant::now();
        if self.naps_at(start) {
            std::thread::sleep(Self::NAP);
        } else {
            std::thread::yield_now();
            self.yielded(start, start.elapsed());
        }
    }

    /// Whether giving way at `at` is a nap (else a yield).
    fn naps_at(&self, at: Instant) -> bool {
        self.napping_since
            .is_some_and(|since| at.saturating_duration_since(since) < Self::PROBE_AFTER)
    }

    /// A yield started at `at` took `took`.
    fn yielded(&mut self, at: Instant, took: Duration) {
        self.napping_since = (took > Self::SLOW_YIELD).then_some(at);
    }

    /// Lets this thread's naps be as short as asked (the default timer slack is 50 µs).
    fn exact_timers() {
        // SAFETY: PR_SET_TIMERSLACK takes a plain integer and changes this thread only.
        let r = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
        if r != 0 {
            log::debug!(
                "virtio-blk: PR_SET_TIMERSLACK: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// How a poll of the available ring ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Polled {
    /// The driver added a request (or the ring cannot be read, which taking reports).
    Found,
    /// Events are ready in the event loop (their tokens are in the caller's list).
    Events,
    /// Nothing came within the window: notifications are on again; idle since then.
    Idle(Instant),
}

/// What a block device's queue thread and I/O workers count (relaxed atomics; they outlive
/// resets). The queue thread logs them when it stops; docs/performance.md uses them to say
/// where a request's time goes.
#[derive(Debug, Default)]
pub struct BlockCounters {
    /// Times the queue thread woke up (a kick, a completion from a worker, or both).
    pub wakeups: AtomicU64,
    /// Of those, with a kick (the queue's eventfd) among the causes.
    pub kicks: AtomicU64,
    /// Requests taken from the available ring.
    pub requests: AtomicU64,
    /// Passes over the available ring that took at least one request.
    pub batches: AtomicU64,
    /// Requests an I/O worker executed (the rest the queue thread did).
    pub by_workers: AtomicU64,
    /// Most requests taken and not yet published at once.
    pub max_in_flight: AtomicU64,
    /// FLUSHes held until every earlier request had completed.
    pub flush_waits: AtomicU64,
    /// Nanoseconds spent executing requests (the engine and the status byte), summed over
    /// threads.
    pub exec_ns: AtomicU64,
    /// Used-buffer interrupts raised.
    pub interrupts: AtomicU64,
    /// Times a used-buffer interrupt was held because other requests of the queue were still
    /// executing (they are announced together: see [`MAX_INTERRUPT_HOLD`]), or while the queue
    /// polled (see [`IRQ_HOLD_ENV`]).
    pub interrupts_held: AtomicU64,
    /// Times polling the available ring found the driver's next request (no kick needed).
    pub polled: AtomicU64,
    /// Large reads shared with an I/O worker (see [`SPLIT_READ_MIN`]).
    pub split_reads: AtomicU64,
    /// Pieces of those an I/O worker read (see [`SPLIT_PIECE`]).
    pub pieces_by_workers: AtomicU64,
    /// Nanoseconds spent polling the available ring.
    pub poll_ns: AtomicU64,
    /// Extents read ahead (see [`READAHEAD_ENV`]).
    pub readahead_reads: AtomicU64,
    /// Reads answered from an extent read ahead.
    pub readahead_hits: AtomicU64,
}

impl BlockCounters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn summary(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let requests = g(&self.requests);
        let per = |n: u64| {
            if requests == 0 {
                0.0
            } else {
                precise(n) / precise(requests)
            }
        };
        format!(
            "{requests} requests in {} batches; {} wake-ups ({:.2} per request, {} with a kick); \
             {} executed by I/O workers; up to {} in flight; {} flushes waited; {:.1} us \
             executing per request; {} interrupts ({:.2} per request, {} held for requests \
             still executing or while polling); {} requests found by polling ({:.1} ms polling); {} reads shared \
             ({} pieces by I/O workers); {} extents read ahead, {} reads answered from them",
            g(&self.batches),
            g(&self.wakeups),
            per(g(&self.wakeups)),
            g(&self.kicks),
            g(&self.by_workers),
            g(&self.max_in_flight),
            g(&self.flush_waits),
            per(g(&self.exec_ns)) / 1000.0,
            g(&self.interrupts),
            per(g(&self.interrupts)),
            g(&self.interrupts_held),
            g(&self.polled),
            precise(g(&self.poll_ns)) / 1e6,
            g(&self.split_reads),
            g(&self.pieces_by_workers),
            g(&self.readahead_reads),
            g(&self.readahead_hits),
        )
    }
}

#[expect(clippy::cast_precision_loss, reason = "a ratio for a log line")]
fn precise(n: u64) -> f64 {
    n as f64
}

/// Longest a used-buffer interrupt is held while other requests of the queue still execute on
/// I/O workers. Every interrupt costs the driver two trapped accesses (InterruptStatus read,
/// InterruptACK write), so completions that are ready are published at once but announced
/// together with those still executing, up to this long (the queue thread's epoll wait has
/// millisecond resolution).
pub const MAX_INTERRUPT_HOLD: Duration = Duration::from_millis(1);

/// The virtio-blk device.
///
/// One queue thread takes the available requests, parses them and hands them to a small pool
/// of I/O workers (and executes some itself), so that a driver's queue depth is concurrency on
/// the host; the used-ring entries are published strictly in the order the requests were
/// taken (a reorder buffer), which device-model restart relies on (`crate::persist`). A FLUSH
/// executes only once every request taken before it has completed. Reset waits for every
/// request taken, publishes their entries, and joins the workers.
///
/// Fewer trapped accesses per request (each a round trip through the hypervisor):
/// - the oldest request of a pass executes on the queue thread (its completion is the one the
///   used ring waits for), the others on the workers;
/// - while requests execute on workers, the driver's notifications stay suppressed (the queue
///   thread comes back when they complete and takes what was added meanwhile), so a driver
///   adding requests to a busy queue does not kick;
/// - the used-buffer interrupt is raised once for everything published while no request is
///   executing, or after [`MAX_INTERRUPT_HOLD`], not once per completion (EVENT_IDX's
///   `used_event` decides, as before, whether the driver wants it at all);
/// - once the queue is idle it polls the available ring for a while ([`POLL_MAX_ENV`]), so a
///   driver adding its next request meanwhile does not kick, and holds the interrupt for what
///   it published meanwhile ([`IRQ_HOLD_ENV`]), so that requests added during the hold are
///   announced with it.
///
/// Reads of [`SPLIT_READ_MIN`] or more that the queue thread executes are shared with a worker:
/// cut into pieces of [`SPLIT_PIECE`], the queue thread reads from the front and the worker from
/// the back until they meet.
///
/// Sequential large reads are read ahead ([`READAHEAD_ENV`]): after two reads of
/// [`SPLIT_READ_MIN`] or more at consecutive offsets, the queue thread, idle with the interrupt
/// raised, reads the next extent of the same length into a private buffer, and a read of
/// exactly that extent is answered from it with a copy. A write, discard or write-zeroes drops
/// the extent when it is taken, before it executes; writers of the image outside the device
/// are not seen (the extent is what the image held up to the driver's think time earlier).
#[derive(Debug)]
pub struct BlockDevice<E: BlockEngine = FileEngine> {
    backend: Option<BlockBackend<E>>,
    config: [u8; CONFIG_LEN],
    features: u64,
    /// I/O workers per activation.
    io_workers: usize,
    /// See [`MAX_INTERRUPT_HOLD`].
    interrupt_hold: Duration,
    /// The longest poll of the available ring (see [`POLL_MAX_ENV`]).
    poll_max: Duration,
    /// The longest hold of an interrupt while polling (see [`IRQ_HOLD_ENV`]).
    irq_hold: Duration,
    /// The largest read read ahead, bytes (see [`READAHEAD_ENV`]).
    readahead_max: u64,
    counters: Arc<BlockCounters>,
    /// Active: the worker owns the backend and hands it back when stopped.
    worker: Option<Worker<BlockBackend<E>>>,
}

impl<E: BlockEngine> BlockDevice<E> {
    /// A block device over `backend`, with the I/O workers [`io_workers_from_env`] gives.
    pub fn new(backend: BlockBackend<E>) -> Self {
        Self::with_io_workers(backend, io_workers_from_env())
    }

    /// A block device over `backend` with `io_workers` I/O workers besides its queue thread
    /// (0: the queue thread executes the requests one at a time).
    pub fn with_io_workers(backend: BlockBackend<E>, io_workers: usize) -> Self {
        let disk = backend.geometry();
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if disk.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        // struct virtio_blk_config (virtio 1.2 §5.2.4), little endian.
        let mut config = [0u8; CONFIG_LEN];
        let mut put = |off: usize, bytes: &[u8]| {
            config[off..off + bytes.len()].copy_from_slice(bytes);
        };
        put(0, &disk.capacity.to_le_bytes());
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &SEG_MAX.to_le_bytes());
        put(20, &512u32.to_le_bytes()); // blk_size = SECTOR_SIZE
        put(34, &1u16.to_le_bytes()); // num_queues
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEG.to_le_bytes());
        put(44, &1u32.to_le_bytes()); // discard_sector_alignment
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(52, &MAX_DISCARD_SEG.to_le_bytes());
        put(56, &[1]); // write_zeroes_may_unmap
        Self {
            backend: Some(backend),
            config,
            features,
            io_workers,
            interrupt_hold: MAX_INTERRUPT_HOLD,
            poll_max: poll_max_from_env(),
            irq_hold: irq_hold_from_env(),
            readahead_max: readahead_from_env(),
            counters: Arc::default(),
            worker: None,
        }
    }

    /// Holds a used-buffer interrupt for requests still executing at most `hold` instead of
    /// [`MAX_INTERRUPT_HOLD`] (from the next activation on).
    #[must_use]
    pub fn with_interrupt_hold(mut self, hold: Duration) -> Self {
        self.interrupt_hold = hold;
        self
    }

    /// Polls the available ring for at most `max` while the queue is idle instead of what
    /// [`POLL_MAX_ENV`] says (from the next activation on; zero never polls).
    #[must_use]
    pub fn with_poll_max(mut self, max: Duration) -> Self {
        self.poll_max = max;
        self
    }

    /// Holds a used-buffer interrupt for at most `max` while the queue polls instead of what
    /// [`IRQ_HOLD_ENV`] says (from the next activation on; zero never holds).
    #[must_use]
    pub fn with_irq_hold(mut self, max: Duration) -> Self {
        self.irq_hold = max;
        self
    }

    /// Reads ahead reads of up to `max` bytes instead of what [`READAHEAD_ENV`] says (from the
    /// next activation on; zero never reads ahead). See [`READAHEAD_ENV`].
    #[must_use]
    pub fn with_readahead(mut self, max: u64) -> Self {
        self.readahead_max = max;
        self
    }

    /// The device's counters (they outlive resets).
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }
}

impl<E: BlockEngine> VirtioDevice for BlockDevice<E> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn avail_features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    /// Before 2b09361 the queue was 256: a device model of this version resumes a block
    /// device an earlier one served (an upgrade under a running guest); the driver keeps the
    /// queue and the 254 segments it was told, both still within what this version accepts.
    fn earlier_queue_max_sizes(&self) -> &[&[u16]] {
        &[&[256]]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Only `writeback` is writable, and only with CONFIG_WCE, which we do not offer.
        warn_rl!("virtio-blk: config write at {offset:#x} ignored");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let (mem, [queue], [evt], interrupt) = ctx.into_queues()?;
        let mut backend = self.backend.take().ok_or(ActivateError::BackendLost)?;
        let pool = match IoPool::spawn(&backend, self.io_workers, &mem, &interrupt, &self.counters)
        {
            Ok(pool) => pool,
            Err(e) => {
                self.backend = Some(backend);
                return Err(ActivateError::Backend(e));
            }
        };
        let counters = self.counters.clone();
        let hold = self.interrupt_hold;
        let (poll_max, irq_hold) = (self.poll_max, self.irq_hold);
        let readahead_max = self.readahead_max;
        let worker = Worker::spawn("virtio-blk", move |stop| {
            let mut q = QueueRunner::new(&mut backend, pool, mem, queue, &interrupt, counters);
            q.max_hold = hold;
            q.poller = Poller::new(poll_max);
            q.coalescer = Coalescer::new(irq_hold);
            q.ahead = Readahead::new(readahead_max);
            if poll_max > Duration::ZERO {
                GiveWay::exact_timers();
            }
            q.run(&evt, &stop);
            drop(q);
            backend
        });
        self.worker = Some(worker.map_err(ActivateError::Backend)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(backend) = self.worker.take().and_then(|mut w| w.stop()) {
            self.backend = Some(backend);
        }
    }
}

/// A request handed to an I/O worker: its place in the reorder buffer and the request.
#[derive(Debug)]
struct Job {
    slot: u16,
    req: BlockRequest,
}

/// What an I/O worker is handed: a whole request, or a share of a large read the queue thread
/// is executing (see [`SPLIT_READ_MIN`]).
#[derive(Debug)]
enum Work {
    Request(Job),
    Share(Arc<SharedRead>),
}

/// A large read cut into pieces that the queue thread reads from the front and one I/O worker
/// from the back, each taking the next piece only when it has read its last, until they meet.
/// Where they meet follows how late the worker started and how fast each thread copies, so
/// the two finish within about one piece of each other; a worker that never comes leaves the
/// queue thread reading every piece.
#[derive(Debug)]
struct SharedRead {
    /// Each piece's guest buffers and image offset, in the read's order.
    pieces: Vec<(Buffers, u64)>,
    state: Mutex<ShareState>,
    /// Signalled when the worker has read its last piece.
    worker_done: Condvar,
}

#[derive(Debug)]
struct ShareState {
    /// Pieces `front..back` are not taken yet.
    front: usize,
    back: usize,
    /// The worker is reading a piece.
    worker_reading: bool,
    /// Pieces the worker has read.
    by_worker: usize,
    /// Every piece read so far was read without error.
    ok: bool,
}

impl SharedRead {
    fn new(pieces: Vec<(Buffers, u64)>) -> Self {
        let back = pieces.len();
        Self {
            pieces,
            state: Mutex::new(ShareState {
                front: 0,
                back,
                worker_reading: false,
                by_worker: 0,
                ok: true,
            }),
            worker_done: Condvar::new(),
        }
    }

    /// The queue thread's next piece, from the front; `None` once none is left.
    fn take_front(&self) -> Option<&(Buffers, u64)> {
        let mut st = lock(&self.state);
        if st.front == st.back {
            return None;
        }
        st.front += 1;
        self.pieces.get(st.front - 1)
    }

    /// The worker's next piece, from the back, after recording how its previous one went
    /// (`read`: `Some(ok)` when it read one); `None` once none is left.
    fn take_back(&self, read: Option<bool>) -> Option<&(Buffers, u64)> {
        let mut st = lock(&self.state);
        if let Some(ok) = read {
            st.ok &= ok;
            st.by_worker += 1;
            st.worker_reading = false;
        }
        if st.front == st.back {
            // The queue thread may be waiting for this piece.
            if read.is_some() {
                self.worker_done.notify_all();
            }
            return None;
        }
        st.back -= 1;
        st.worker_reading = true;
        self.pieces.get(st.back)
    }

    /// Records a piece the queue thread read.
    fn front_read(&self, ok: bool) {
        lock(&self.state).ok &= ok;
    }

    /// Once no piece is left: waits for the worker's piece in flight, if any; whether every
    /// piece was read without error, and how many the worker read.
    fn wait_worker(&self) -> (bool, usize) {
        let mut st = lock(&self.state);
        while st.worker_reading {
            st = self
                .worker_done
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        (st.ok, st.by_worker)
    }
}

/// Reads at least this long that the queue thread executes are shared with an I/O worker
/// (see [`BlockDevice`]): the copy from the image into guest memory is what a large read's
/// latency is made of (~290 us per MiB here), and the guest waits for it.
pub const SPLIT_READ_MIN: u64 = 256 << 10;

/// The size of the pieces a shared read is cut into: small enough that the two threads finish
/// close together, large enough that a piece's system call is a small part of its copy.
pub const SPLIT_PIECE: u64 = 64 << 10;

/// A request's guest buffers: (address, length) in order.
type Buffers = Vec<(GuestAddress, u32)>;

/// Cuts `data`, which the image holds from byte `offset` on, into runs of `piece` bytes (the
/// last may be shorter), cutting buffers where need be: each run with its image offset.
/// `None` when that makes fewer than two runs, `piece` is not a whole number of sectors, or an
/// offset would overflow.
fn pieces(data: &[(GuestAddress, u32)], piece: u64, offset: u64) -> Option<Vec<(Buffers, u64)>> {
    let total: u64 = data.iter().map(|&(_, len)| u64::from(len)).sum();
    // Cut on sector boundaries, as the image offset of each run must be.
    if piece == 0 || !piece.is_multiple_of(SECTOR_SIZE) || total <= piece {
        return None;
    }
    let mut runs: Vec<(Buffers, u64)> = vec![(Vec::new(), offset)];
    let mut at = 0u64;
    for &(mut addr, mut len) in data {
        while len > 0 {
            let run_end = (at / piece + 1) * piece;
            // Bounded by `len`, a u32.
            let take = u32::try_from((run_end - at).min(u64::from(len))).ok()?;
            runs.last_mut()?.0.push((addr, take));
            at += u64::from(take);
            len -= take;
            addr = addr.checked_add(u64::from(take))?;
            if at == run_end && at < total {
                runs.push((Vec::new(), offset.checked_add(at)?));
            }
        }
    }
    Some(runs)
}

/// A request an I/O worker completed: its place, the request (for reuse), the used length.
#[derive(Debug)]
struct Done {
    slot: u16,
    req: BlockRequest,
    used: u32,
}

/// The jobs waiting for an I/O worker.
#[derive(Debug, Default)]
struct JobQueue {
    jobs: std::collections::VecDeque<Work>,
    /// Workers waiting for a job.
    idle: usize,
    /// Set when the pool goes down: workers exit, leaving the jobs.
    stop: bool,
}

/// What the queue thread and its I/O workers share. Lock order: `jobs` and `done` are never
/// held together.
#[derive(Debug)]
struct PoolShared {
    jobs: Mutex<JobQueue>,
    job_ready: Condvar,
    done: Mutex<Vec<Done>>,
    /// Signalled after each push to `done`; the queue thread polls it.
    done_evt: EventFd,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The I/O workers of one activation; dropping it stops and joins them (a job a worker is
/// executing finishes first; jobs still queued are left, the queue thread executes those
/// itself before it stops).
#[derive(Debug)]
struct IoPool {
    shared: Arc<PoolShared>,
    threads: Vec<JoinHandle<()>>,
}

impl IoPool {
    /// `n` workers, each over its own clone of `backend`'s engine.
    fn spawn<E: BlockEngine>(
        backend: &BlockBackend<E>,
        n: usize,
        mem: &GuestMemoryMmap,
        interrupt: &Arc<Interrupt>,
        counters: &Arc<BlockCounters>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(PoolShared {
            jobs: Mutex::new(JobQueue {
                jobs: std::collections::VecDeque::with_capacity(usize::from(QUEUE_SIZE)),
                ..JobQueue::default()
            }),
            job_ready: Condvar::new(),
            done: Mutex::new(Vec::with_capacity(usize::from(QUEUE_SIZE))),
            done_evt: EventFd::new(libc::EFD_NONBLOCK)?,
        });
        let mut pool = Self {
            shared,
            threads: Vec::with_capacity(n),
        };
        for i in 0..n {
            let mut backend = backend.try_clone()?;
            let (shared, mem) = (pool.shared.clone(), mem.clone());
            let (interrupt, counters) = (interrupt.clone(), counters.clone());
            let thread = std::thread::Builder::new()
                .name(format!("virtio-blk-io{i}"))
                .spawn(move || io_worker(&mut backend, &shared, &mem, &interrupt, &counters))?;
            pool.threads.push(thread);
        }
        Ok(pool)
    }

    fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        lock(&self.shared.jobs).stop = true;
        self.shared.job_ready.notify_all();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("virtio-blk: an I/O worker panicked");
            }
        }
    }
}

/// Executes `req` on `backend` and counts it: the used length. A panic of the engine is
/// answered IOERR (the worker goes on: its engine holds no state between requests).
fn execute_counted<E: BlockEngine>(
    backend: &mut BlockBackend<E>,
    mem: &GuestMemoryMmap,
    req: &BlockRequest,
    interrupt: &Interrupt,
    counters: &BlockCounters,
) -> u32 {
    let start = Instant::now();
    let answer =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| backend.answer(mem, req)));
    let (used, status) = answer.unwrap_or_else(|_| {
        log::error!("virtio-blk: the engine panicked executing a request: answered IOERR");
        (write_status(mem, req, S_IOERR, 0), S_IOERR)
    });
    BlockCounters::add(
        &counters.exec_ns,
        u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX),
    );
    count_request(interrupt.stats(), req, status);
    used
}

/// A worker reads pieces of a shared read from the back until none is left.
fn read_share<E: BlockEngine>(
    backend: &mut BlockBackend<E>,
    mem: &GuestMemoryMmap,
    share: &SharedRead,
) {
    let mut read = None;
    while let Some((data, offset)) = share.take_back(read) {
        read = Some(read_engine(backend, mem, data, *offset));
    }
}

/// Reads `data` from the image at `offset`; whether it worked (an error or a panic of the
/// engine is logged).
fn read_engine<E: BlockEngine>(
    backend: &mut BlockBackend<E>,
    mem: &GuestMemoryMmap,
    data: &[(GuestAddress, u32)],
    offset: u64,
) -> bool {
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        backend.engine.read(mem, data, offset)
    }));
    match read {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            warn_rl!("virtio-blk: I/O error: {e}");
            false
        }
        Err(_) => {
            log::error!("virtio-blk: the engine panicked reading part of a request");
            false
        }
    }
}

/// An I/O worker: takes jobs until the pool stops, pushing each result to `done`.
fn io_worker<E: BlockEngine>(
    backend: &mut BlockBackend<E>,
    shared: &PoolShared,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    counters: &BlockCounters,
) {
    loop {
        let job = {
            let mut q = lock(&shared.jobs);
            loop {
                if q.stop {
                    return;
                }
                match q.jobs.pop_front() {
                    Some(Work::Request(job)) => break job,
                    Some(Work::Share(share)) => {
                        drop(q);
                        read_share(backend, mem, &share);
                        q = lock(&shared.jobs);
                        continue;
                    }
                    None => {}
                }
                q.idle += 1;
                q = shared
                    .job_ready
                    .wait(q)
                    .unwrap_or_else(PoisonError::into_inner);
                q.idle -= 1;
            }
        };
        let used = execute_counted(backend, mem, &job.req, interrupt, counters);
        BlockCounters::add(&counters.by_workers, 1);
        lock(&shared.done).push(Done {
            slot: job.slot,
            req: job.req,
            used,
        });
        if let Err(e) = shared.done_evt.write(1) {
            warn_rl!("virtio-blk: cannot signal a completion: {e}");
        }
    }
}

/// Read-ahead of a stream of large sequential reads. A guest that reads a file or a disk in
/// large blocks one at a time (queue depth 1) thinks between two reads for longer than the
/// copy from the image takes; the queue thread, idle then, reads the next extent into a
/// private buffer, and the next read, if it is that extent, is answered with a copy from
/// memory instead of a read of the image (which took twice as long here, docs/performance.md).
///
/// Only reads of [`SPLIT_READ_MIN`] up to `max` bytes that the queue thread executes count,
/// and an extent is read ahead only after two such reads at consecutive offsets, of the length
/// of the last one and only while nothing is in flight. The extent is used once. Every request
/// that changes the disk (a write, discard or write-zeroes) drops it when it is taken, before
/// it executes, so a read never sees data older than a write the device took before it.
/// Writers outside the device (another process writing the image) are not seen: the extent is
/// what the image held when it was read ahead, up to the driver's think time earlier.
#[derive(Debug, Default)]
struct Readahead {
    /// The largest read read ahead, bytes (0: never).
    max: u64,
    /// The private buffer, made on first use: memory at address 0 the engine reads into.
    buf: Option<GuestMemoryMmap>,
    /// The extent the buffer holds, `(offset, length)`.
    held: Option<(u64, u64)>,
    /// Where the last counted read ended.
    last_end: Option<u64>,
    /// The extent to read ahead when the queue is next idle.
    next: Option<(u64, u64)>,
}

impl Readahead {
    fn new(max: u64) -> Self {
        Self {
            max,
            ..Self::default()
        }
    }

    /// Whether a read of `len` bytes counts towards a stream.
    fn counts(&self, len: u64) -> bool {
        (SPLIT_READ_MIN..=self.max).contains(&len)
    }

    /// A counted read of `[offset, offset + len)` was executed: the next extent is due if it
    /// continued the previous one.
    fn executed(&mut self, offset: u64, len: u64) {
        let end = offset.checked_add(len);
        self.next = if self.last_end == Some(offset) {
            end.map(|e| (e, len))
        } else {
            None
        };
        self.last_end = end;
    }

    /// The disk changes (or may): forget everything.
    fn drop_all(&mut self) {
        self.held = None;
        self.next = None;
        self.last_end = None;
    }

    /// Whether the buffer holds exactly `[offset, offset + len)`; it is given up either way.
    fn take(&mut self, offset: u64, len: u64) -> bool {
        self.held.take() == Some((offset, len))
    }
}

/// One entry of the reorder buffer: a request taken from the available ring and not yet
/// published in the used ring.
#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    head: u16,
    /// `Some(used length)` once executed and answered.
    used: Option<u32>,
}

/// The queue thread's state: the queue, the reorder buffer of the requests in flight (in the
/// order they were taken; published from its front only), and the pool.
struct QueueRunner<'a, E: BlockEngine> {
    backend: &'a mut BlockBackend<E>,
    pool: IoPool,
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: &'a Interrupt,
    counters: Arc<BlockCounters>,
    /// The reorder buffer: a ring of the queue's size; `first` is the oldest entry, `len` the
    /// entries in flight.
    ring: Vec<Entry>,
    first: usize,
    len: usize,
    /// Entries taken and not yet executed (queued, executing, or the held FLUSH).
    executing: usize,
    /// A FLUSH taken while earlier requests were executing: it runs once they are done, and
    /// nothing is taken after it meanwhile.
    held: Option<(u16, BlockRequest)>,
    /// Requests parsed in this pass, not yet handed out.
    batch: Vec<(u16, BlockRequest)>,
    /// Request buffers to reuse (no allocation per request once warm).
    spare: Vec<BlockRequest>,
    /// Completions taken from the pool (swapped with the shared list).
    done: Vec<Done>,
    /// A used entry was published since the last interrupt check.
    used_any: bool,
    /// Since when an interrupt for published entries is held (for requests still executing,
    /// or by the coalescer while the queue polls).
    held_irq_since: Option<Instant>,
    /// The longest it is held.
    max_hold: Duration,
    /// Polling of the available ring while the queue is idle.
    poller: Poller,
    /// Holding the used-buffer interrupt while the queue polls.
    coalescer: Coalescer,
    /// How a poll gives way to other threads.
    give_way: GiveWay,
    /// The interrupt held now is held by the coalescer (not for requests still executing).
    coalescing_hold: bool,
    /// Read-ahead of sequential large reads.
    ahead: Readahead,
}

impl<'a, E: BlockEngine> QueueRunner<'a, E> {
    fn new(
        backend: &'a mut BlockBackend<E>,
        pool: IoPool,
        mem: GuestMemoryMmap,
        queue: Queue,
        interrupt: &'a Interrupt,
        counters: Arc<BlockCounters>,
    ) -> Self {
        let size = usize::from(queue.size()).max(1);
        Self {
            backend,
            pool,
            mem,
            queue,
            interrupt,
            counters,
            ring: vec![Entry::default(); size],
            first: 0,
            len: 0,
            executing: 0,
            held: None,
            batch: Vec::with_capacity(size),
            spare: Vec::with_capacity(size),
            done: Vec::with_capacity(size),
            used_any: false,
            held_irq_since: None,
            max_hold: MAX_INTERRUPT_HOLD,
            poller: Poller::new(Duration::ZERO),
            coalescer: Coalescer::new(Duration::ZERO),
            give_way: GiveWay::default(),
            coalescing_hold: false,
            ahead: Readahead::default(),
        }
    }

    /// Serves the queue until `stop`; then finishes every request taken and returns.
    fn run(&mut self, evt: &EventFd, stop: &EventFd) {
        const QUEUE_TOKEN: u64 = 0;
        const DONE_TOKEN: u64 = 1;
        let mut ev = match EventLoop::new() {
            Ok(ev) => ev,
            Err(e) => return fail_device(self.interrupt, "virtio-blk epoll", &e),
        };
        let added = ev
            .add(evt, QUEUE_TOKEN)
            .and(ev.add(stop, STOP_TOKEN))
            .and(ev.add(&self.pool.shared.done_evt, DONE_TOKEN));
        if let Err(e) = added {
            return fail_device(self.interrupt, "virtio-blk epoll", &e);
        }
        let mut tokens = Vec::with_capacity(3);
        let mut stopping = false;
        // Since when the queue has been idle with notifications on (after a poll), if it is.
        let mut idle_since: Option<Instant> = None;
        while !stopping || self.len > 0 {
            let mut events_ready = false;
            // Idle, with the interrupt raised: the time to read ahead.
            if !stopping && self.idle() && self.held_irq_since.is_none() {
                self.read_ahead();
            }
            if !stopping && self.poller.max > Duration::ZERO && self.idle() {
                match self.poll_avail(&mut ev, &mut tokens) {
                    Ok(Polled::Found) => {
                        // Take it without a kick.
                        if let Err(e) = self.service(true) {
                            return fail_device(self.interrupt, "virtio-blk queue", &e);
                        }
                        continue;
                    }
                    Ok(Polled::Events) => events_ready = true,
                    Ok(Polled::Idle(since)) => idle_since = Some(since),
                    Err(e) => return fail_device(self.interrupt, "virtio-blk epoll", &e),
                }
            }
            if !events_ready {
                // A held interrupt is raised at the latest when its hold ends.
                let hold = if self.coalescing_hold {
                    self.coalescer.max
                } else {
                    self.max_hold
                };
                let timeout = self.held_irq_since.map_or(-1, |t| {
                    let left = hold.saturating_sub(t.elapsed());
                    i32::try_from(left.as_micros().div_ceil(1000))
                        .unwrap_or(i32::MAX)
                        .max(1)
                });
                if let Err(e) = ev.wait(timeout, &mut tokens) {
                    return fail_device(self.interrupt, "virtio-blk epoll", &e);
                }
            }
            BlockCounters::add(&self.counters.wakeups, 1);
            let idle_for = idle_since.take().map(|t| t.elapsed());
            for &token in &tokens {
                match token {
                    STOP_TOKEN => stopping = true,
                    DONE_TOKEN => {
                        let _ = self.pool.shared.done_evt.read();
                    }
                    _ => {
                        BlockCounters::add(&self.counters.kicks, 1);
                        let _ = evt.read();
                        if let Some(idle) = idle_for {
                            self.poller.kicked_after(idle);
                        }
                    }
                }
            }
            if let Err(e) = self.service(!stopping) {
                return fail_device(self.interrupt, "virtio-blk queue", &e);
            }
        }
        // A guest can reset the device in a loop: rate limited (the counters are the device's
        // totals, so a later line carries what a suppressed one had).
        static STOP_LOG: remio_ratelimit::LogLimiter = remio_ratelimit::LogLimiter::new();
        if STOP_LOG.allow().is_some() {
            log::info!(
                "virtio-blk: stopped; since the device was created: {}",
                self.counters.summary()
            );
        }
    }

    /// Does everything that can be done now: collects completions, runs a FLUSH whose turn
    /// has come, publishes the used entries whose turn has come, takes new requests (if
    /// `take`) and executes queued ones itself; then interrupts if the driver wants it.
    fn service(&mut self, take: bool) -> Result<(), QueueError> {
        loop {
            let mut progress = self.collect();
            progress |= self.publish()?;
            if self.executing == 1 {
                if let Some((slot, req)) = self.held.take() {
                    self.execute_here(slot, req);
                    progress = true;
                    progress |= self.publish()?;
                }
            }
            if take && self.held.is_none() {
                progress |= self.take()?;
            }
            progress |= self.steal();
            if !progress {
                break;
            }
        }
        if !self.used_any {
            return Ok(());
        }
        // Requests still executing on workers: announce what was published together with
        // them (they wake this thread when done), unless held long enough or stopping.
        let coalesce = self.executing == 0 && self.coalescing();
        let limit = if self.executing > 0 {
            Some(self.max_hold)
        } else if coalesce {
            Some(self.coalescer.max)
        } else {
            None
        };
        let due =
            !take || limit.is_none_or(|l| self.held_irq_since.is_some_and(|t| t.elapsed() >= l));
        if !due {
            if self.held_irq_since.is_none() {
                self.held_irq_since = Some(Instant::now());
                self.coalescing_hold = coalesce;
                BlockCounters::add(&self.counters.interrupts_held, 1);
            }
            return Ok(());
        }
        self.held_irq_since = None;
        self.coalescer
            .raised(std::mem::take(&mut self.coalescing_hold));
        self.used_any = false;
        if self.queue.needs_notification(&self.mem)? {
            crash_point!("before-interrupt");
            BlockCounters::add(&self.counters.interrupts, 1);
            self.interrupt.signal_used_queue();
        }
        Ok(())
    }

    /// An interrupt may be held while the queue is idle: the poll that follows raises it when
    /// the hold ends.
    fn coalescing(&self) -> bool {
        self.coalescer.holding() && self.poller.window >= self.coalescer.max
    }

    /// Nothing taken is in flight (a held FLUSH is in the reorder buffer too): the queue is
    /// waiting for the driver.
    fn idle(&self) -> bool {
        self.len == 0
    }

    /// Polls the available ring for up to the poller's window with the driver's notifications
    /// off, looking at the event loop every [`Poller::EVENT_CHECK`] (a stop must not wait for
    /// the window).
    fn poll_avail(&mut self, ev: &mut EventLoop, tokens: &mut Vec<u64>) -> io::Result<Polled> {
        let start = Instant::now();
        let window = self.poller.window;
        let mut outcome = None;
        if window > Duration::ZERO {
            let mut next_check = Poller::EVENT_CHECK;
            let mut next_yield = Poller::YIELD_EVERY;
            loop {
                // A new entry, or a ring not in guest memory (which `take` reports).
                let avail = self.queue.avail_idx(&self.mem, Ordering::Acquire);
                if avail.map_or(true, |idx| idx.0 != self.queue.next_avail()) {
                    outcome = Some(Polled::Found);
                    break;
                }
                // Before the window's end: a poll preempted past both must not leave the
                // interrupt held while the thread sleeps.
                if self
                    .held_irq_since
                    .is_some_and(|t| t.elapsed() >= self.coalescer.max)
                {
                    // The held interrupt is due: `service` raises it.
                    outcome = Some(Polled::Events);
                    tokens.clear();
                    break;
                }
                let elapsed = start.elapsed();
                if elapsed >= window {
                    break;
                }
                if elapsed >= next_check {
                    next_check += Poller::EVENT_CHECK;
                    ev.wait(0, tokens)?;
                    if !tokens.is_empty() {
                        outcome = Some(Polled::Events);
                        break;
                    }
                }
                if elapsed >= next_yield {
                    // Threads woken on this core (the dispatcher's, QEMU's, the guest's vCPU)
                    // wait at most this long for it.
                    self.give_way.now();
                    next_yield = start.elapsed() + Poller::YIELD_EVERY;
                }
                std::hint::spin_loop();
            }
            let spent = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
            BlockCounters::add(&self.counters.poll_ns, spent);
        }
        if let Some(o) = outcome {
            if o == Polled::Found {
                BlockCounters::add(&self.counters.polled, 1);
            }
            return Ok(o);
        }
        // Notifications on; a request added meanwhile is taken at once.
        match self.queue.enable_notification(&self.mem) {
            Ok(false) => Ok(Polled::Idle(start)),
            Ok(true) | Err(_) => Ok(Polled::Found),
        }
    }

    /// Takes the available requests (as `drain_queue` does, with the driver's notifications
    /// suppressed meanwhile), stopping at a FLUSH that must wait or when the reorder buffer is
    /// full, and hands them out. Whether it took any.
    fn take(&mut self) -> Result<bool, QueueError> {
        let mut took = false;
        loop {
            self.queue.disable_notification(&self.mem)?;
            check_avail(&self.queue, &self.mem)?;
            let mut blocked = false;
            loop {
                if self.len == self.ring.len() || self.held.is_some() {
                    blocked = true;
                    break;
                }
                let next = self.queue.iter(&self.mem)?.next();
                let Some(chain) = next else { break };
                crash_point!("popped");
                took = true;
                if self.held_irq_since.is_some() {
                    self.coalescer.joined = true;
                }
                let head = chain.head_index();
                let slot = (self.first + self.len) % self.ring.len();
                self.ring[slot] = Entry { head, used: None };
                self.len += 1;
                self.counters
                    .max_in_flight
                    .fetch_max(self.len as u64, Ordering::Relaxed);
                BlockCounters::add(&self.counters.requests, 1);
                let slot16 = u16::try_from(slot).unwrap_or(u16::MAX);
                let mut req = self.spare.pop().unwrap_or_default();
                match parse_block_request(&self.mem, chain, self.backend.geometry(), &mut req) {
                    Err(e) => {
                        let (used, status) = answer_refused(&self.mem, &req, e);
                        count_request(self.interrupt.stats(), &req, status);
                        self.ring[slot].used = Some(used);
                        self.spare.push(req);
                    }
                    Ok(()) => {
                        if !matches!(
                            req.kind,
                            Some(RequestType::In | RequestType::Flush | RequestType::GetId)
                        ) {
                            // Before it executes: no read taken after it may see the old data.
                            self.ahead.drop_all();
                        }
                        self.executing += 1;
                        let barrier = req.kind == Some(RequestType::Flush);
                        if barrier && self.executing > 1 {
                            // Earlier requests are executing: the FLUSH must not be answered
                            // before they have completed.
                            BlockCounters::add(&self.counters.flush_waits, 1);
                            self.held = Some((slot16, req));
                        } else {
                            self.batch.push((slot16, req));
                            if self.pool.is_empty() {
                                // No workers: execute and publish each as it comes.
                                self.hand_out();
                                self.publish()?;
                            }
                        }
                    }
                }
            }
            self.hand_out();
            // Blocked, or requests executing on workers: the queue thread comes back when a
            // request completes, and takes on from there (notifications stay suppressed
            // meanwhile, so a driver adding to the busy queue does not kick).
            // With polling, notifications stay off too: the run loop polls, and turns them on
            // before it sleeps.
            if blocked
                || self.executing > 0
                || self.poller.max > Duration::ZERO
                || !self.queue.enable_notification(&self.mem)?
            {
                break;
            }
        }
        if took {
            BlockCounters::add(&self.counters.batches, 1);
        }
        Ok(took)
    }

    /// Hands this pass's requests out: all but the oldest to the workers, the oldest executed
    /// here (its used entry is the one every later one is published after, so it is not left
    /// waiting for a worker to wake; the queue thread then helps with the others, see
    /// [`Self::steal`]).
    fn hand_out(&mut self) {
        if self.batch.len() > 1 {
            let n = self.batch.len() - 1;
            let idle = {
                let mut q = lock(&self.pool.shared.jobs);
                q.jobs.extend(
                    self.batch
                        .drain(1..)
                        .map(|(slot, req)| Work::Request(Job { slot, req })),
                );
                q.idle
            };
            for _ in 0..n.min(idle) {
                self.pool.shared.job_ready.notify_one();
            }
        }
        if let Some((slot, req)) = self.batch.pop() {
            self.execute_here(slot, req);
        }
    }

    /// Executes queued jobs no worker has taken yet; whether there were any.
    fn steal(&mut self) -> bool {
        let mut stole = false;
        loop {
            let job = lock(&self.pool.shared.jobs).jobs.pop_front();
            match job {
                None => return stole,
                // A shared read the queue thread finished alone (it waits for the worker's
                // pieces itself).
                Some(Work::Share(_)) => {}
                Some(Work::Request(Job { slot, req })) => {
                    stole = true;
                    self.execute_here(slot, req);
                }
            }
        }
    }

    fn execute_here(&mut self, slot: u16, req: BlockRequest) {
        let counted = req.kind == Some(RequestType::In) && self.ahead.counts(req.data_len);
        let offset = req.sector.checked_mul(SECTOR_SIZE);
        let answered = match (counted, offset) {
            (true, Some(offset)) => self.answer_from_ahead(&req, offset),
            _ => None,
        };
        let used = match answered.or_else(|| self.split_read(&req)) {
            Some(used) => used,
            None => execute_counted(
                self.backend,
                &self.mem,
                &req,
                self.interrupt,
                &self.counters,
            ),
        };
        if let (true, Some(offset)) = (counted, offset) {
            self.ahead.executed(offset, req.data_len);
        }
        self.complete(slot, req, used);
    }

    /// Answers a read of `[offset, offset + req.data_len)` from the extent read ahead, if the
    /// buffer holds exactly that; its used length.
    fn answer_from_ahead(&mut self, req: &BlockRequest, offset: u64) -> Option<u32> {
        use vm_memory::GuestMemoryBackend;
        if !self.ahead.take(offset, req.data_len) {
            return None;
        }
        let buf = self.ahead.buf.as_ref()?;
        let start = Instant::now();
        let mut at = 0u64;
        for &(addr, len) in &req.data {
            let len = len as usize;
            // Both checked: the buffer holds data_len bytes, the request's buffers were
            // checked to be in guest memory (one region each, or the read takes its usual way).
            let src = buf.get_slice(GuestAddress(at), len).ok()?;
            let dst = self.mem.get_slice(addr, len).ok()?;
            src.copy_to_volatile_slice(dst);
            at += len as u64;
        }
        BlockCounters::add(&self.counters.readahead_hits, 1);
        BlockCounters::add(
            &self.counters.exec_ns,
            u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX),
        );
        let written = u32::try_from(req.data_len).unwrap_or(u32::MAX);
        let used = write_status(&self.mem, req, S_OK, written);
        count_request(self.interrupt.stats(), req, S_OK);
        Some(used)
    }

    /// Reads the extent that is due into the private buffer (see [`Readahead`]).
    fn read_ahead(&mut self) {
        let Some((offset, len)) = self.ahead.next.take() else {
            return;
        };
        let capacity = self.backend.geometry().capacity.saturating_mul(SECTOR_SIZE);
        let (Some(end), Ok(len32), Ok(size)) = (
            offset.checked_add(len),
            u32::try_from(len),
            usize::try_from(self.ahead.max),
        ) else {
            return;
        };
        if end > capacity {
            return;
        }
        if self.ahead.buf.is_none() {
            match GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]) {
                Ok(buf) => self.ahead.buf = Some(buf),
                Err(e) => {
                    log::warn!("virtio-blk: no read-ahead buffer ({e}): not reading ahead");
                    self.ahead.max = 0;
                    return;
                }
            }
        }
        let Some(buf) = self.ahead.buf.as_ref() else {
            return;
        };
        if read_engine(self.backend, buf, &[(GuestAddress(0), len32)], offset) {
            self.ahead.held = Some((offset, len));
            BlockCounters::add(&self.counters.readahead_reads, 1);
        }
    }

    /// Executes a read of at least [`SPLIT_READ_MIN`] bytes shared with an I/O worker (see
    /// [`SharedRead`]); its used length. `None` if it is not such a read or there are no
    /// workers.
    fn split_read(&mut self, req: &BlockRequest) -> Option<u32> {
        if req.kind != Some(RequestType::In)
            || req.data_len < SPLIT_READ_MIN
            || self.pool.is_empty()
        {
            return None;
        }
        let runs = pieces(&req.data, SPLIT_PIECE, req.sector.checked_mul(SECTOR_SIZE)?)?;
        let share = Arc::new(SharedRead::new(runs));
        // Ahead of the queued requests: a worker that is free takes it next.
        lock(&self.pool.shared.jobs)
            .jobs
            .push_front(Work::Share(share.clone()));
        self.pool.shared.job_ready.notify_one();
        let start = Instant::now();
        while let Some((data, at)) = share.take_front() {
            share.front_read(read_engine(self.backend, &self.mem, data, *at));
        }
        let (ok, by_worker) = share.wait_worker();
        BlockCounters::add(
            &self.counters.pieces_by_workers,
            u64::try_from(by_worker).unwrap_or(u64::MAX),
        );
        BlockCounters::add(&self.counters.split_reads, 1);
        BlockCounters::add(
            &self.counters.exec_ns,
            u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX),
        );
        let (status, written) = if ok {
            (S_OK, u32::try_from(req.data_len).unwrap_or(u32::MAX))
        } else {
            (S_IOERR, 0)
        };
        let used = write_status(&self.mem, req, status, written);
        count_request(self.interrupt.stats(), req, status);
        Some(used)
    }

    fn complete(&mut self, slot: u16, req: BlockRequest, used: u32) {
        if let Some(e) = self.ring.get_mut(usize::from(slot)) {
            e.used = Some(used);
        }
        self.executing = self.executing.saturating_sub(1);
        self.spare.push(req);
    }

    /// Takes the workers' completions; whether there were any.
    fn collect(&mut self) -> bool {
        std::mem::swap(&mut *lock(&self.pool.shared.done), &mut self.done);
        let any = !self.done.is_empty();
        let mut done = std::mem::take(&mut self.done);
        for d in done.drain(..) {
            self.complete(d.slot, d.req, d.used);
        }
        self.done = done;
        any
    }

    /// Publishes, in the order they were taken, the executed requests at the front of the
    /// reorder buffer; whether it published any.
    fn publish(&mut self) -> Result<bool, QueueError> {
        let mut published = false;
        while self.len > 0 {
            let Entry { head, used } = self.ring[self.first];
            let Some(used) = used else { break };
            crash_point!("executed");
            self.queue.add_used(&self.mem, head, used)?;
            crash_point!("used");
            self.ring[self.first].used = None;
            self.first = (self.first + 1) % self.ring.len();
            self.len -= 1;
            published = true;
            self.used_any = true;
        }
        Ok(published)
    }
}

#[cfg(test)]
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "test constants are small"
)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::Arc;
    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::tempfile::TempFile;

    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// A 16-sector image whose byte i is i % 251.
    fn image(read_only: bool, serial: Option<&str>) -> (TempFile, BlockBackend) {
        let tmp = TempFile::new().unwrap();
        let bytes: Vec<u8> = (0..16 * 512).map(|i| (i % 251) as u8).collect();
        tmp.as_file().write_all(&bytes).unwrap();
        let backend = BlockBackend::open(tmp.as_path(), read_only, serial).unwrap();
        (tmp, backend)
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        mem.write_obj(kind.to_le(), GuestAddress(HDR)).unwrap();
        mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        mem.write_obj(sector.to_le(), GuestAddress(HDR + 8))
            .unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    fn status(mem: &GuestMemoryMmap) -> u8 {
        mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn run(mem: &GuestMemoryMmap, backend: &mut BlockBackend, descs: &[RawDescriptor]) -> u32 {
        let vq = MockSplitQueue::new(mem, 16);
        let chain = vq.build_desc_chain(descs).unwrap();
        backend.handle(mem, chain)
    }

    #[test]
    fn read_copies_image_sectors_and_reports_ok() {
        let mem = mem();
        let (_tmp, mut b) = image(false, None);
        header(&mem, VIRTIO_BLK_T_IN, 1);

        let used = run(
            &mem,
            &mut b,
            &[d(HDR, 16, 0), d(DATA, 1024, W), d(STATUS, 1, W)],
        );

        assert_eq!(used, 1025);
        assert_eq!(status(&mem), S_OK);
        let mut buf = vec![0u8; 1024];
        mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        let expect: Vec<u8> = (512..1536).map(|i| (i % 251) as u8).collect();
        assert_eq!(buf, expect);
    }

    #[test]
    fn counted_requests_record_kind_data_bytes_and_errors() {
        use crate::stats::{DeviceStats, RequestKind};
        let mem = mem();
        let (_tmp, mut b) = image(false, None);
        let stats = DeviceStats::default();
        let counted = |b: &mut BlockBackend, descs: &[RawDescriptor]| {
            let vq = MockSplitQueue::new(&mem, 16);
            let chain = vq.build_desc_chain(descs).unwrap();
            b.handle_counted(&mem, chain, &stats)
        };
        let read = [d(HDR, 16, 0), d(DATA, 1024, W), d(STATUS, 1, W)];
        header(&mem, VIRTIO_BLK_T_IN, 1);
        counted(&mut b, &read);
        header(&mem, VIRTIO_BLK_T_OUT, 2);
        counted(&mut b, &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)]);
        // Past the end: an error, no bytes.
        header(&mem, VIRTIO_BLK_T_IN, 15);
        counted(&mut b, &read);
        header(&mem, 0xdead, 0);
        counted(&mut b, &read);

        let s = stats.snapshot();

        assert_eq!(s.requests_of(RequestKind::Read), 1);
        assert_eq!(s.bytes_of(RequestKind::Read), 1024);
        assert_eq!(s.requests_of(RequestKind::Write), 1);
        assert_eq!(s.bytes_of(RequestKind::Write), 512);
        // Refused before execution (out of range, unknown type): "other", an error each.
        assert_eq!(s.requests_of(RequestKind::Other), 2);
        assert_eq!(s.errors, 2);
    }

    #[test]
    fn scattered_segments_are_read_and_written_in_order() {
        let mem = mem();
        let (tmp, mut b) = image(false, None);
        // Three segments of 512, 1024 and 512 bytes, out of address order: one preadv.
        let segs = [(DATA + 0x2000, 512u32), (DATA, 1024), (DATA + 0x1000, 512)];
        header(&mem, VIRTIO_BLK_T_IN, 3);
        let mut descs = vec![d(HDR, 16, 0)];
        descs.extend(segs.iter().map(|&(a, l)| d(a, l, W)));
        descs.push(d(STATUS, 1, W));
        assert_eq!(run(&mem, &mut b, &descs), 2049);
        assert_eq!(status(&mem), S_OK);
        let mut at = 3 * 512;
        for &(addr, len) in &segs {
            let mut buf = vec![0u8; len as usize];
            mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            let expect: Vec<u8> = (at..at + len as usize).map(|i| (i % 251) as u8).collect();
            assert_eq!(buf, expect, "segment at {addr:#x}");
            at += len as usize;
        }

        // And back: each segment filled with its own byte, written at sector 8.
        for (k, &(addr, len)) in segs.iter().enumerate() {
            mem.write_slice(&vec![0xa0 + k as u8; len as usize], GuestAddress(addr))
                .unwrap();
        }
        header(&mem, VIRTIO_BLK_T_OUT, 8);
        let mut descs = vec![d(HDR, 16, 0)];
        descs.extend(segs.iter().map(|&(a, l)| d(a, l, 0)));
        descs.push(d(STATUS, 1, W));
        assert_eq!(run(&mem, &mut b, &descs), 1);
        assert_eq!(status(&mem), S_OK);
        let img = std::fs::read(tmp.as_path()).unwrap();
        assert!(img[4096..4608].iter().all(|&x| x == 0xa0));
        assert!(img[4608..5632].iter().all(|&x| x == 0xa1));
        assert!(img[5632..6144].iter().all(|&x| x == 0xa2));
        assert_eq!(img[6144], (6144 % 251) as u8);
    }

    #[test]
    fn an_image_that_shrank_under_the_device_fails_the_read_instead_of_looping() {
        let mem = mem();
        let (tmp, mut b) = image(false, None);
        tmp.as_file().set_len(512).unwrap();
        header(&mem, VIRTIO_BLK_T_IN, 1);
        run(
            &mem,
            &mut b,
            &[d(HDR, 16, 0), d(DATA, 1024, W), d(STATUS, 1, W)],
        );
        assert_eq!(status(&mem), S_IOERR);
    }

    #[test]
    fn write_reaches_the_image() {
        let mem = mem();
        let (tmp, mut b) = image(false, None);
        header(&mem, VIRTIO_BLK_T_OUT, 2);
        mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();

        let used = run(
            &mem,
            &mut b,
            &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)],
        );

        assert_eq!(used, 1);
        assert_eq!(status(&mem), S_OK);
        let mut img = Vec::new();
        std::fs::File::open(tmp.as_path())
            .unwrap()
            .read_to_end(&mut img)
            .unwrap();
        assert!(img[1024..1536].iter().all(|&x| x == 0xab));
        assert_eq!(img[1536], (1536 % 251) as u8);
    }

    #[test]
    fn read_past_the_end_is_ioerr_and_leaves_the_buffer_untouched() {
        let mem = mem();
        let (_tmp, mut b) = image(false, None);
        header(&mem, VIRTIO_BLK_T_IN, 15);
        mem.write_slice(&[0x5a; 1024], GuestAddress(DATA)).unwrap();

        let used = run(
            &mem,
            &mut b,
            &[d(HDR, 16, 0), d(DATA, 1024, W), d(STATUS, 1, W)],
        );

        assert_eq!(used, 1);
        assert_eq!(status(&mem), S_IOERR);
        let mut buf = [0u8; 1024];
        mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        assert!(buf.iter().all(|&x| x == 0x5a));
    }

    #[test]
    fn sector_overflow_is_ioerr() {
        let mem = mem();
        let (_tmp, mut b) = image(false, None);
        header(&mem, VIRTIO_BLK_T_IN, u64::MAX);

        run(
            &mem,
            &mut b,
            &[d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)],
        );

        assert_eq!(status(&mem), S_IOERR);
    }

    #[test]
    fn unknown_request_type_is_unsupp() {
        let mem = mem();
        let (_tmp, mut b) = image(false, None);
        header(&mem, 0x77, 0);

        run(&mem, &mut b, &[d(HDR, 16, 0), d(STATUS, 1, W)]);

        assert_eq!(status(&mem), S_UNSUPP);
    }

    #[test]
    fn write_to_read_only_disk_is_ioerr_and_image_unchanged() {
        let mem = mem();
        let (tmp, mut b) = image(true, None);
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();

        run(
            &mem,
            &mut b,
            &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)],
        );

        assert_eq!(status(&mem), S_IOERR);
        let img = std::fs::read(tmp.as_path()).unwrap();
        assert_eq!(img[0..3], [0, 1, 2]);
    }

    #[test]
    fn readable_status_descriptor_gets_no_answer() {
        let mem = mem();
        let (_tmp, mut b) = image(false, None);
        header(&mem, VIRTIO_BLK_T_IN, 0);

        let used = run(
            &mem,
            &mut b,
            &[d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, 0)],
        );

        assert_eq!(used, 0);
        assert_eq!(status(&mem), 0xff);
    }

    #[test]
    fn read_into_a_readable_buffer_is_ioerr() {
        let mem = mem();
        let (_tmp, mut b) = image(false, None);
        header(&mem, VIRTIO_BLK_T_IN, 0);

        run(
            &mem,
            &mut b,
            &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)],
        );

        assert_eq!(status(&mem), S_IOERR);
    }

    #[test]
    fn buffer_outside_guest_memory_is_ioerr() {
        let mem = mem();
        let (_tmp, mut b) = image(false, None);
        header(&mem, VIRTIO_BLK_T_IN, 0);

        run(
            &mem,
            &mut b,
            &[d(HDR, 16, 0), d(0xff_fe00, 1024, W), d(STATUS, 1, W)],
        );

        assert_eq!(status(&mem), S_IOERR);
    }

    #[test]
    fn short_header_is_ioerr() {
        let mem = mem();
        let (_tmp, mut b) = image(false, None);
        header(&mem, VIRTIO_BLK_T_IN, 0);

        run(&mem, &mut b, &[d(HDR, 8, 0), d(STATUS, 1, W)]);

        assert_eq!(status(&mem), S_IOERR);
    }

    #[test]
    fn unaligned_data_length_is_ioerr() {
        let mem = mem();
        let (_tmp, mut b) = image(false, None);
        header(&mem, VIRTIO_BLK_T_IN, 0);

        run(
            &mem,
            &mut b,
            &[d(HDR, 16, 0), d(DATA, 100, W), d(STATUS, 1, W)],
        );

        assert_eq!(status(&mem), S_IOERR);
    }

    #[test]
    fn get_id_returns_the_serial_padded_to_20_bytes() {
        let mem = mem();
        let (_tmp, mut b) = image(false, Some("remio-disk"));
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        mem.write_slice(&[0xee; 20], GuestAddress(DATA)).unwrap();

        let used = run(
            &mem,
            &mut b,
            &[d(HDR, 16, 0), d(DATA, 20, W), d(STATUS, 1, W)],
        );

        assert_eq!(used, 21);
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..10], b"remio-disk");
        assert_eq!(id[10..], [0; 10]);
    }

    /// Parses a request of `data` segments (each `(len, writable)`, laid out from DATA on)
    /// on a disk with room for anything.
    fn parse_segments(
        mem: &GuestMemoryMmap,
        kind: u32,
        data: &[(u32, bool)],
    ) -> Result<(), BlockRequestError> {
        header(mem, kind, 0);
        let mut descs = vec![Descriptor::new(HDR, 16, 0, 0)];
        let mut addr = DATA;
        for &(len, writable) in data {
            descs.push(Descriptor::new(addr, len, if writable { W } else { 0 }, 0));
            addr += u64::from(len);
        }
        descs.push(Descriptor::new(STATUS, 1, W, 0));
        let disk = DiskGeometry {
            capacity: u64::MAX / SECTOR_SIZE,
            read_only: false,
        };
        parse_block_request(mem, descs, disk, &mut BlockRequest::default())
    }

    #[test]
    fn more_data_segments_than_seg_max_are_too_many() {
        let mem = mem();

        let at_max = parse_segments(&mem, VIRTIO_BLK_T_IN, &[(512, true); SEG_MAX as usize]);
        let over = parse_segments(&mem, VIRTIO_BLK_T_IN, &[(512, true); SEG_MAX as usize + 1]);

        assert_eq!(at_max, Ok(()));
        assert_eq!(over, Err(BlockRequestError::TooManySegments));
        assert_eq!(over.unwrap_err().status(), Some(S_IOERR));
    }

    #[test]
    fn a_one_mib_read_of_scattered_pages_is_one_request() {
        // Linux cuts a request at seg_max segments; a 1 MiB O_DIRECT read whose 256 pages are
        // not physically contiguous must fit in one, and its chain (header, pages, status)
        // in the queue the device offers.
        let (_tmp, backend) = image(false, None);
        let dev = BlockDevice::new(backend);
        let mut seg_max = [0u8; 4];
        dev.read_config(12, &mut seg_max);
        let pages = (1u32 << 20) / 4096;
        assert!(u32::from_le_bytes(seg_max) >= pages, "seg_max {seg_max:?}");
        assert!(u32::from(dev.queue_max_sizes()[0]) >= pages + 2);

        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let scattered = vec![(4096, true); pages as usize];
        assert_eq!(parse_segments(&mem, VIRTIO_BLK_T_IN, &scattered), Ok(()));
    }

    #[test]
    fn a_segment_larger_than_size_max_is_too_many() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();

        let at_max = parse_segments(&mem, VIRTIO_BLK_T_OUT, &[(SIZE_MAX, false)]);
        let over = parse_segments(&mem, VIRTIO_BLK_T_OUT, &[(SIZE_MAX + 512, false)]);

        assert_eq!(at_max, Ok(()));
        assert_eq!(over, Err(BlockRequestError::TooManySegments));
    }

    #[test]
    fn more_discard_segments_than_max_discard_seg_are_too_many() {
        let mem = mem();
        let seg = DISCARD_SEG_LEN as u32;

        let at_max = parse_segments(
            &mem,
            VIRTIO_BLK_T_DISCARD,
            &[(seg * MAX_DISCARD_SEG, false)],
        );
        let over = parse_segments(
            &mem,
            VIRTIO_BLK_T_DISCARD,
            &[(seg * (MAX_DISCARD_SEG + 1), false)],
        );

        assert_eq!(at_max, Ok(()));
        assert_eq!(over, Err(BlockRequestError::TooManySegments));
    }

    #[test]
    fn a_request_with_too_many_segments_is_ioerr_and_touches_no_buffer() {
        let mem = mem();
        let (_tmp, mut b) = image(false, None);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        const LEN: u64 = 4 * 512;
        mem.write_slice(&[0x5a; LEN as usize], GuestAddress(DATA))
            .unwrap();
        // SEG_MAX + 1 segments of 2 bytes and one with the rest of four sectors (in range):
        // SEG_MAX + 2 data segments in all.
        let vq = MockSplitQueue::new(&mem, 2 * QUEUE_SIZE);
        let mut descs = vec![d(HDR, 16, 0)];
        descs.extend((0..LEN / 2).map(|i| d(DATA + 2 * i, 2, W)));
        descs.truncate(SEG_MAX as usize + 2);
        let data_len = 2 * (u64::from(SEG_MAX) + 1);
        descs.push(d(DATA + data_len, (LEN - data_len) as u32, W));
        descs.push(d(STATUS, 1, W));

        let used = backend_handle(&mem, &mut b, &vq, &descs);

        assert_eq!((used, status(&mem)), (1, S_IOERR));
        let mut buf = [0u8; LEN as usize];
        mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        assert!(buf.iter().all(|&x| x == 0x5a));
    }

    fn backend_handle(
        mem: &GuestMemoryMmap,
        b: &mut BlockBackend,
        vq: &MockSplitQueue<'_, GuestMemoryMmap>,
        descs: &[RawDescriptor],
    ) -> u32 {
        let chain = vq.build_desc_chain(descs).unwrap();
        b.handle(mem, chain)
    }

    #[test]
    fn get_id_into_a_buffer_under_20_bytes_gets_the_serial_cut_to_fit() {
        let mem = mem();
        let (_tmp, mut b) = image(false, Some("remio-disk-serial-01"));
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        mem.write_slice(&[0xee; 20], GuestAddress(DATA)).unwrap();

        let used = run(
            &mem,
            &mut b,
            &[d(HDR, 16, 0), d(DATA, 8, W), d(STATUS, 1, W)],
        );

        assert_eq!((used, status(&mem)), (9, S_OK));
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..8], b"remio-di");
        assert_eq!(id[8..], [0xee; 12], "nothing written past the buffer");
    }

    #[test]
    fn discard_and_write_zeroes_on_a_read_only_image_are_ioerr_and_leave_it_unchanged() {
        for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            let mem = mem();
            let (tmp, mut b) = image(true, None);
            header(&mem, kind, 0);
            discard_seg(&mem, 0, 8, 0);

            let used = run(
                &mem,
                &mut b,
                &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)],
            );

            assert_eq!((used, status(&mem)), (1, S_IOERR), "type {kind}");
            let img = std::fs::read(tmp.as_path()).unwrap();
            assert!(
                img.iter().enumerate().all(|(i, &x)| x == (i % 251) as u8),
                "type {kind}: the image changed"
            );
        }
    }

    // ---- What reaches the engine, and when ----

    /// An operation the recording engine saw.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Op {
        Read { offset: u64, len: u64 },
        Write { offset: u64, bytes: Vec<u8> },
        Flush,
        Discard { offset: u64, len: u64 },
        WriteZeroes { offset: u64, len: u64, unmap: bool },
    }

    /// A 16-sector in-memory disk that records each operation with the used-ring index the
    /// guest could see at that moment (so a test sees whether a request was acknowledged
    /// before its bytes moved). Operations listed in `fail` return EIO.
    #[derive(Debug)]
    struct RecordingEngine {
        image: Arc<std::sync::Mutex<Vec<u8>>>,
        log: Arc<std::sync::Mutex<Vec<(Op, u16)>>>,
        mem: GuestMemoryMmap,
        used_idx: GuestAddress,
        fail_writes: bool,
    }

    impl RecordingEngine {
        fn record(&self, op: Op) {
            let seen: u16 = self.mem.read_obj(self.used_idx).unwrap();
            self.log.lock().unwrap().push((op, seen));
        }
    }

    impl BlockEngine for RecordingEngine {
        fn try_clone(&self) -> std::io::Result<Self> {
            Ok(Self {
                image: self.image.clone(),
                log: self.log.clone(),
                mem: self.mem.clone(),
                used_idx: self.used_idx,
                fail_writes: self.fail_writes,
            })
        }

        fn read(
            &mut self,
            mem: &GuestMemoryMmap,
            data: &[(GuestAddress, u32)],
            offset: u64,
        ) -> std::io::Result<()> {
            let mut at = offset as usize;
            let image = self.image.lock().unwrap();
            for &(addr, len) in data {
                mem.write_slice(&image[at..at + len as usize], addr)
                    .unwrap();
                at += len as usize;
            }
            self.record(Op::Read {
                offset,
                len: (at as u64) - offset,
            });
            Ok(())
        }

        fn write(
            &mut self,
            mem: &GuestMemoryMmap,
            data: &[(GuestAddress, u32)],
            offset: u64,
        ) -> std::io::Result<()> {
            if self.fail_writes {
                self.record(Op::Write {
                    offset,
                    bytes: Vec::new(),
                });
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            let mut bytes = Vec::new();
            for &(addr, len) in data {
                let mut buf = vec![0u8; len as usize];
                mem.read_slice(&mut buf, addr).unwrap();
                bytes.extend_from_slice(&buf);
            }
            let at = offset as usize;
            self.image.lock().unwrap()[at..at + bytes.len()].copy_from_slice(&bytes);
            self.record(Op::Write { offset, bytes });
            Ok(())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            self.record(Op::Flush);
            Ok(())
        }

        fn discard(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
            self.record(Op::Discard { offset, len });
            Ok(())
        }

        fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> std::io::Result<()> {
            self.record(Op::WriteZeroes { offset, len, unmap });
            Ok(())
        }
    }

    /// Waits for the worker's interrupt (at most 10 s, so a lost one fails instead of hanging).
    fn wait_irq(irq: &EventFd) {
        let mut p = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(irq),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut p, 1, 10_000) };
        assert_eq!(ready, 1, "no interrupt from the block worker");
        irq.read().unwrap();
    }

    /// A 16-entry queue at 0x8_0000 with `chains` laid out one after the other in the
    /// descriptor table and made available in order.
    fn queue_with<'m>(
        mem: &'m GuestMemoryMmap,
        chains: &[Vec<RawDescriptor>],
    ) -> MockSplitQueue<'m, GuestMemoryMmap> {
        let vq = MockSplitQueue::create(mem, GuestAddress(0x8_0000), 16);
        let mut at = 0u16;
        for chain in chains {
            vq.add_desc_chains(chain, at).unwrap();
            at += chain.len() as u16;
        }
        vq
    }

    /// The test's ends of a device activated on a test queue.
    struct Ends {
        /// The first queue's notifier (what the driver's QueueNotify signals).
        evt: EventFd,
        /// The device's irqfd (non-blocking).
        irq: EventFd,
        /// InterruptStatus and the device's counters.
        shared: crate::device::SharedStatus,
    }

    /// The context that activates a device on `queues` (at least 1) copies of `vq`, with
    /// EVENT_IDX if `event_idx`, and the test's ends of it.
    fn rig(
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<'_, GuestMemoryMmap>,
        queues: usize,
        event_idx: bool,
    ) -> (ActivateContext, Ends) {
        let evts: Vec<EventFd> = (0..queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let shared = crate::device::SharedStatus::default();
        let ctx = ActivateContext {
            mem: mem.clone(),
            queues: (0..queues)
                .map(|_| {
                    let mut q: Queue = vq.create_queue().unwrap();
                    q.set_event_idx(event_idx);
                    q
                })
                .collect(),
            queue_evts: evts.iter().map(|e| e.try_clone().unwrap()).collect(),
            interrupt: Arc::new(Interrupt::new(shared.clone(), irq.try_clone().unwrap())),
            acked_features: 0,
        };
        let ends = Ends {
            evt: evts[0].try_clone().unwrap(),
            irq,
            shared,
        };
        (ctx, ends)
    }

    /// A device over a recording engine, activated on a 16-entry queue at 0x8_0000 with
    /// `chains` (each a header address, its data descriptors and a status address) made
    /// available, with `io_workers` I/O workers; returns the device, the log, the mock queue's
    /// used-ring address and the notifier and interrupt eventfds.
    #[expect(clippy::type_complexity, reason = "a test rig")]
    fn recording_device(
        mem: &GuestMemoryMmap,
        io_workers: usize,
        read_only: bool,
        fail_writes: bool,
        chains: &[Vec<RawDescriptor>],
    ) -> (
        BlockDevice<RecordingEngine>,
        Arc<std::sync::Mutex<Vec<(Op, u16)>>>,
        GuestAddress,
        EventFd,
        EventFd,
    ) {
        let vq = queue_with(mem, chains);
        let used_idx = vq.used_addr().unchecked_add(2);
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let engine = RecordingEngine {
            image: Arc::new(std::sync::Mutex::new(
                (0..16 * 512).map(|i| (i % 251) as u8).collect(),
            )),
            log: log.clone(),
            mem: mem.clone(),
            used_idx,
            fail_writes,
        };
        let disk = DiskGeometry {
            capacity: 16,
            read_only,
        };
        let mut dev =
            BlockDevice::with_io_workers(BlockBackend::with_engine(engine, disk, None), io_workers);
        let (ctx, ends) = rig(mem, &vq, 1, false);
        dev.activate(ctx).unwrap();
        (dev, log, used_idx, ends.evt, ends.irq)
    }

    /// Descriptors of one request: header at `hdr`, `data`, status byte at `status`, chained.
    fn chain(hdr: u64, data: &[(u64, u32, u16)], status: u64, first: u16) -> Vec<RawDescriptor> {
        let next = VRING_DESC_F_NEXT as u16;
        let mut v = vec![RawDescriptor::from(Descriptor::new(
            hdr,
            16,
            next,
            first + 1,
        ))];
        for (i, &(addr, len, flags)) in data.iter().enumerate() {
            v.push(RawDescriptor::from(Descriptor::new(
                addr,
                len,
                flags | next,
                first + 2 + i as u16,
            )));
        }
        v.push(RawDescriptor::from(Descriptor::new(status, 1, W, 0)));
        v
    }

    fn put_header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        mem.write_obj(kind.to_le(), GuestAddress(at)).unwrap();
        mem.write_obj(sector.to_le(), GuestAddress(at + 8)).unwrap();
    }

    #[test]
    fn flush_reaches_the_engine_sync_and_each_request_is_acknowledged_after_its_io() {
        let mem = mem();
        // WRITE sector 2 (0xab), then FLUSH: two chains, processed in one pass.
        put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 2);
        put_header(&mem, HDR + 0x100, VIRTIO_BLK_T_FLUSH, 0);
        mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        mem.write_slice(&[0xff, 0xff], GuestAddress(STATUS))
            .unwrap();
        let write = chain(HDR, &[(DATA, 512, 0)], STATUS, 0);
        let flush = chain(HDR + 0x100, &[], STATUS + 1, write.len() as u16);
        let (mut dev, log, used_idx, evt, irq) =
            recording_device(&mem, 4, false, false, &[write, flush]);

        evt.write(1).unwrap();
        while mem.read_obj::<u16>(used_idx).unwrap() < 2 {
            wait_irq(&irq);
        }
        dev.reset();

        // The write reached the engine while nothing was acknowledged, the flush reached
        // fdatasync's place in the engine after the write was acknowledged, and both were OK.
        assert_eq!(
            *log.lock().unwrap(),
            vec![
                (
                    Op::Write {
                        offset: 2 * 512,
                        bytes: vec![0xab; 512]
                    },
                    0
                ),
                (Op::Flush, 1),
            ]
        );
        let mut statuses = [0u8; 2];
        mem.read_slice(&mut statuses, GuestAddress(STATUS)).unwrap();
        assert_eq!(statuses, [S_OK, S_OK]);
    }

    #[test]
    fn flush_on_the_real_engine_reports_ok() {
        let mem = mem();
        let (_tmp, mut b) = image(false, None);
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);

        assert_eq!(run(&mem, &mut b, &[d(HDR, 16, 0), d(STATUS, 1, W)]), 1);
        assert_eq!(status(&mem), S_OK);
    }

    // ---- Requests in parallel, answered in order ----

    /// What a [`GateEngine`] and its clones share.
    #[derive(Debug, Default)]
    struct Gate {
        state: std::sync::Mutex<GateState>,
        cv: std::sync::Condvar,
    }

    #[derive(Debug, Default)]
    struct GateState {
        /// Reads and writes that reached the engine.
        entered: usize,
        /// Set by the test: reads and writes may return (unless `reverse_of`).
        open: bool,
        /// Offsets whose reads and writes may return while the gate is not open.
        released: Vec<u64>,
        /// The offset of each read or write that reached the engine, with the name of the
        /// thread that executed it.
        entered_on: Vec<(u64, String)>,
        /// When non-zero: reads wait until this many have entered, then return in descending
        /// order of offset (the engine completes them in reverse).
        reverse_of: usize,
        /// Operations in the order they returned, with the used index the guest saw then.
        finished: Vec<(Op, u16)>,
        /// Engines alive (the device's and its workers' clones).
        live: usize,
        /// A wait gave up after 10 s (the test then fails instead of hanging).
        timed_out: bool,
    }

    /// An engine whose reads and writes block on a [`Gate`]; flushes pass at once. Moves no
    /// bytes (the device writes the status bytes).
    #[derive(Debug)]
    struct GateEngine {
        gate: Arc<Gate>,
        mem: GuestMemoryMmap,
        used_idx: GuestAddress,
    }

    impl GateEngine {
        fn new(gate: &Arc<Gate>, mem: &GuestMemoryMmap, used_idx: GuestAddress) -> Self {
            gate.state.lock().unwrap().live += 1;
            Self {
                gate: gate.clone(),
                mem: mem.clone(),
                used_idx,
            }
        }

        /// Waits on the gate until `ready` holds (at most 10 s, then marks `timed_out`).
        fn wait_until<'g>(
            &'g self,
            mut st: std::sync::MutexGuard<'g, GateState>,
            ready: impl Fn(&GateState) -> bool,
        ) -> std::sync::MutexGuard<'g, GateState> {
            let deadline = Instant::now() + std::time::Duration::from_secs(10);
            while !ready(&st) {
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    st.timed_out = true;
                    break;
                };
                st = self.gate.cv.wait_timeout(st, left).unwrap().0;
            }
            st
        }

        fn io(&self, op: Op, offset: u64) {
            let mut st = self.gate.state.lock().unwrap();
            st.entered += 1;
            let thread = std::thread::current().name().unwrap_or("").to_owned();
            st.entered_on.push((offset, thread));
            self.gate.cv.notify_all();
            let reverse = st.reverse_of;
            st = if reverse > 0 {
                let st = self.wait_until(st, |s| s.entered >= reverse);
                // Sector k of 0..reverse returns after the reverse - 1 - k above it.
                let above = reverse - 1 - (offset / 512) as usize;
                self.wait_until(st, |s| s.finished.len() >= above)
            } else {
                self.wait_until(st, |s| s.open || s.released.contains(&offset))
            };
            let seen: u16 = self.mem.read_obj(self.used_idx).unwrap();
            st.finished.push((op, seen));
            self.gate.cv.notify_all();
        }
    }

    impl Drop for GateEngine {
        fn drop(&mut self) {
            let mut st = self.gate.state.lock();
            st.as_mut().unwrap_or_else(|p| p.get_mut()).live -= 1;
        }
    }

    impl BlockEngine for GateEngine {
        fn try_clone(&self) -> std::io::Result<Self> {
            Ok(Self::new(&self.gate, &self.mem, self.used_idx))
        }

        fn read(
            &mut self,
            _mem: &GuestMemoryMmap,
            data: &[(GuestAddress, u32)],
            offset: u64,
        ) -> std::io::Result<()> {
            let len = data.iter().map(|&(_, l)| u64::from(l)).sum();
            self.io(Op::Read { offset, len }, offset);
            Ok(())
        }

        fn write(
            &mut self,
            _mem: &GuestMemoryMmap,
            _data: &[(GuestAddress, u32)],
            offset: u64,
        ) -> std::io::Result<()> {
            let bytes = Vec::new();
            self.io(Op::Write { offset, bytes }, offset);
            Ok(())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            let seen: u16 = self.mem.read_obj(self.used_idx).unwrap();
            let mut st = self.gate.state.lock().unwrap();
            st.finished.push((Op::Flush, seen));
            self.gate.cv.notify_all();
            Ok(())
        }

        fn discard(&mut self, _offset: u64, _len: u64) -> std::io::Result<()> {
            Ok(())
        }

        fn write_zeroes(&mut self, _offset: u64, _len: u64, _unmap: bool) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// One request per `(type, sector)`: header at HDR + 0x100 i, 512 bytes at DATA + 0x1000 i
    /// (device-writable for reads), status byte at STATUS + i (set to 0xff). Returns the chains
    /// and their heads (in avail order).
    fn requests(mem: &GuestMemoryMmap, reqs: &[(u32, u64)]) -> (Vec<Vec<RawDescriptor>>, Vec<u16>) {
        let (mut chains, mut heads, mut first) = (Vec::new(), Vec::new(), 0u16);
        for (i, &(kind, sector)) in reqs.iter().enumerate() {
            let i = i as u64;
            put_header(mem, HDR + 0x100 * i, kind, sector);
            mem.write_obj(0xffu8, GuestAddress(STATUS + i)).unwrap();
            let data: &[(u64, u32, u16)] = match kind {
                VIRTIO_BLK_T_IN => &[(DATA + 0x1000 * i, 512, W)],
                VIRTIO_BLK_T_OUT => &[(DATA + 0x1000 * i, 512, 0)],
                _ => &[],
            };
            let c = chain(HDR + 0x100 * i, data, STATUS + i, first);
            heads.push(first);
            first += c.len() as u16;
            chains.push(c);
        }
        (chains, heads)
    }

    /// A device with `io_workers` workers over a [`GateEngine`] (reads in reverse when
    /// `reverse_of`), activated on a 16-entry queue at 0x8_0000 holding `chains`; returns the
    /// device, the gate, the used ring's address and the notifier and interrupt eventfds.
    fn gated_device(
        mem: &GuestMemoryMmap,
        io_workers: usize,
        reverse_of: usize,
        chains: &[Vec<RawDescriptor>],
    ) -> (
        BlockDevice<GateEngine>,
        Arc<Gate>,
        GuestAddress,
        EventFd,
        EventFd,
    ) {
        let vq = queue_with(mem, chains);
        let (dev, gate, ends) = gated_device_on(mem, &vq, io_workers, reverse_of, None, false);
        (dev, gate, vq.used_addr(), ends.evt, ends.irq)
    }

    /// [`gated_device`] on a given queue, holding interrupts at most `hold` (default
    /// [`MAX_INTERRUPT_HOLD`]), with EVENT_IDX if `event_idx`.
    fn gated_device_on(
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<'_, GuestMemoryMmap>,
        io_workers: usize,
        reverse_of: usize,
        hold: Option<std::time::Duration>,
        event_idx: bool,
    ) -> (BlockDevice<GateEngine>, Arc<Gate>, Ends) {
        let gate = Arc::new(Gate::default());
        gate.state.lock().unwrap().reverse_of = reverse_of;
        let engine = GateEngine::new(&gate, mem, vq.used_addr().unchecked_add(2));
        let disk = DiskGeometry {
            capacity: 16,
            read_only: false,
        };
        let mut dev =
            BlockDevice::with_io_workers(BlockBackend::with_engine(engine, disk, None), io_workers)
                .with_interrupt_hold(hold.unwrap_or(MAX_INTERRUPT_HOLD));
        let (ctx, ends) = rig(mem, vq, 1, event_idx);
        dev.activate(ctx).unwrap();
        (dev, gate, ends)
    }

    /// The used ring's index and its first `n` elements' ids.
    fn used_ids(mem: &GuestMemoryMmap, used: GuestAddress, n: usize) -> (u16, Vec<u16>) {
        let idx = mem.read_obj::<u16>(used.unchecked_add(2)).unwrap();
        let ids = (0..n as u64)
            .map(|i| mem.read_obj::<u32>(used.unchecked_add(4 + 8 * i)).unwrap() as u16)
            .collect();
        (idx, ids)
    }

    /// Waits (at most 10 s) until `ready` holds of the gate's state.
    fn wait_gate(gate: &Gate, ready: impl Fn(&GateState) -> bool) {
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let mut st = gate.state.lock().unwrap();
        while !ready(&st) {
            let left = deadline
                .checked_duration_since(Instant::now())
                .expect("the engine never reached the awaited state");
            st = gate.cv.wait_timeout(st, left).unwrap().0;
        }
    }

    #[test]
    fn requests_executed_in_parallel_are_published_in_avail_order_when_they_complete_in_reverse() {
        let mem = mem();
        let reads: Vec<(u32, u64)> = (0..4).map(|s| (VIRTIO_BLK_T_IN, s)).collect();
        let (chains, heads) = requests(&mem, &reads);
        // Three workers and the queue thread: the four reads are in the engine at once.
        let (mut dev, gate, used, evt, irq) = gated_device(&mem, 3, 4, &chains);

        evt.write(1).unwrap();
        while used_ids(&mem, used, 0).0 < 4 {
            wait_irq(&irq);
        }
        dev.reset();

        let st = gate.state.lock().unwrap();
        assert!(
            !st.timed_out,
            "the four reads were never in the engine together"
        );
        // The engine completed them in reverse, and nothing was published before the first.
        let finished: Vec<(Op, u16)> = (0..4u64)
            .rev()
            .map(|s| {
                let op = Op::Read {
                    offset: s * 512,
                    len: 512,
                };
                (op, 0)
            })
            .collect();
        assert_eq!(st.finished, finished);
        assert_eq!(used_ids(&mem, used, 4), (4, heads));
        let mut statuses = [0xffu8; 4];
        mem.read_slice(&mut statuses, GuestAddress(STATUS)).unwrap();
        assert_eq!(statuses, [S_OK; 4]);
    }

    #[test]
    fn a_flush_executes_only_after_every_earlier_write_has_completed() {
        let mem = mem();
        let (chains, heads) = requests(
            &mem,
            &[
                (VIRTIO_BLK_T_OUT, 1),
                (VIRTIO_BLK_T_OUT, 2),
                (VIRTIO_BLK_T_FLUSH, 0),
            ],
        );
        let (mut dev, gate, used, evt, irq) = gated_device(&mem, 2, 0, &chains);
        let counters = dev.counters();

        evt.write(1).unwrap();
        // Both writes are in the engine, blocked, and the device has taken the flush.
        wait_gate(&gate, |s| s.entered == 2);
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while counters.flush_waits.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "the flush was never held");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(gate.state.lock().unwrap().finished, Vec::new());
        gate.state.lock().unwrap().open = true;
        gate.cv.notify_all();
        while used_ids(&mem, used, 0).0 < 3 {
            wait_irq(&irq);
        }
        dev.reset();

        // The flush reached the engine after both writes returned and were published.
        let st = gate.state.lock().unwrap();
        assert!(!st.timed_out);
        assert_eq!(st.finished.len(), 3);
        assert_eq!(st.finished[2], (Op::Flush, 2));
        assert_eq!(used_ids(&mem, used, 3), (3, heads));
    }

    #[test]
    fn reset_with_requests_in_flight_answers_them_in_order_and_joins_the_workers() {
        let mem = mem();
        let reads: Vec<(u32, u64)> = (0..3).map(|s| (VIRTIO_BLK_T_IN, s)).collect();
        let (chains, heads) = requests(&mem, &reads);
        let (dev, gate, used, evt, _irq) = gated_device(&mem, 2, 0, &chains);
        assert_eq!(
            gate.state.lock().unwrap().live,
            3,
            "the device's engine and two clones"
        );

        evt.write(1).unwrap();
        wait_gate(&gate, |s| s.entered == 3);
        let resetting = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let resetter = {
            let resetting = resetting.clone();
            std::thread::spawn(move || {
                let mut dev = dev;
                resetting.store(true, Ordering::SeqCst);
                dev.reset();
                dev
            })
        };
        while !resetting.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        // Nothing is published while the three execute, reset or not.
        assert_eq!(used_ids(&mem, used, 0).0, 0);
        gate.state.lock().unwrap().open = true;
        gate.cv.notify_all();
        let dev = resetter.join().unwrap();

        // Reset returned: every request taken was answered, in order, and the workers are
        // gone with their engines (only the device's own is left, for the next activation).
        assert_eq!(used_ids(&mem, used, 3), (3, heads));
        let mut statuses = [0xffu8; 3];
        mem.read_slice(&mut statuses, GuestAddress(STATUS)).unwrap();
        assert_eq!(statuses, [S_OK; 3]);
        assert_eq!(gate.state.lock().unwrap().live, 1);
        assert!(dev.backend.is_some());
    }

    /// Polls (every millisecond, at most 10 s, then fails saying `never`) until `done` holds:
    /// for what the device publishes in guest memory or atomics, which nothing signals.
    fn poll_until(never: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{never}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits (at most 10 s) until the used ring's index reaches `n`.
    fn wait_used(mem: &GuestMemoryMmap, used: GuestAddress, n: u16) {
        poll_until(&format!("the used index never reached {n}"), || {
            used_ids(mem, used, 0).0 >= n
        });
    }

    /// Waits (at most 10 s) until `counter` reaches `n`.
    fn wait_count(counter: &AtomicU64, n: u64) {
        poll_until(&format!("the counter never reached {n}"), || {
            counter.load(Ordering::Relaxed) >= n
        });
    }

    /// The used ring's `avail_event` (EVENT_IDX): the driver notifies once it makes this
    /// available-ring index available.
    fn avail_event(mem: &GuestMemoryMmap, used: GuestAddress) -> u16 {
        mem.read_obj(used.unchecked_add(4 + 8 * 16)).unwrap()
    }

    /// Releases the reads and writes at `offset` of a closed gate.
    fn release(gate: &Gate, offset: u64) {
        gate.state.lock().unwrap().released.push(offset);
        gate.cv.notify_all();
    }

    fn open(gate: &Gate) {
        gate.state.lock().unwrap().open = true;
        gate.cv.notify_all();
    }

    #[test]
    fn the_oldest_request_of_a_pass_executes_on_the_queue_thread_the_others_on_workers() {
        let mem = mem();
        let (chains, heads) = requests(&mem, &[(VIRTIO_BLK_T_IN, 0), (VIRTIO_BLK_T_IN, 1)]);
        let (mut dev, gate, used, evt, _irq) = gated_device(&mem, 1, 0, &chains);

        evt.write(1).unwrap();
        // Both reads are in the engine at once (the gate is closed), one on each thread.
        wait_gate(&gate, |s| s.entered == 2);
        let mut on = gate.state.lock().unwrap().entered_on.clone();
        open(&gate);
        wait_used(&mem, used, 2);
        dev.reset();

        on.sort();
        assert_eq!(
            on,
            vec![
                (0, "virtio-blk".to_owned()),
                (512, "virtio-blk-io0".to_owned())
            ]
        );
        assert_eq!(used_ids(&mem, used, 2), (2, heads));
    }

    #[test]
    fn completions_ready_while_others_execute_are_announced_with_one_interrupt() {
        let mem = mem();
        let reads: Vec<(u32, u64)> = (0..3).map(|s| (VIRTIO_BLK_T_IN, s)).collect();
        let (chains, heads) = requests(&mem, &reads);
        let vq = queue_with(&mem, &chains);
        // A hold far longer than the test: only the last completion ends it.
        let long = Some(Duration::from_secs(600));
        let (mut dev, gate, ends) = gated_device_on(&mem, &vq, 2, 0, long, false);
        let counters = dev.counters();

        ends.evt.write(1).unwrap();
        wait_gate(&gate, |s| s.entered == 3);
        // The first read completes and is published while the other two still execute.
        release(&gate, 0);
        wait_used(&mem, vq.used_addr(), 1);
        open(&gate);
        wait_used(&mem, vq.used_addr(), 3);
        wait_count(&counters.interrupts, 1);
        dev.reset();

        // One interrupt for the three (the irqfd's counter sums every signal).
        assert_eq!(ends.irq.read().unwrap(), 1);
        assert_eq!(counters.interrupts.load(Ordering::Relaxed), 1);
        assert_eq!(counters.interrupts_held.load(Ordering::Relaxed), 1);
        assert_eq!(used_ids(&mem, vq.used_addr(), 3), (3, heads));
        assert_eq!(
            ends.shared.interrupt_status.load(Ordering::SeqCst),
            VIRTIO_MMIO_INT_VRING
        );
    }

    #[test]
    fn a_held_interrupt_is_raised_after_the_hold_while_a_request_still_executes() {
        let mem = mem();
        let (chains, _) = requests(&mem, &[(VIRTIO_BLK_T_IN, 0), (VIRTIO_BLK_T_IN, 1)]);
        let vq = queue_with(&mem, &chains);
        let hold = Some(Duration::from_millis(20));
        let (mut dev, gate, ends) = gated_device_on(&mem, &vq, 1, 0, hold, false);

        ends.evt.write(1).unwrap();
        wait_gate(&gate, |s| s.entered == 2);
        release(&gate, 0);
        // The second read never returns until the gate opens: the interrupt for the first
        // comes from the hold running out.
        wait_irq(&ends.irq);

        let (idx, _) = used_ids(&mem, vq.used_addr(), 0);
        let finished = gate.state.lock().unwrap().finished.len();
        open(&gate);
        wait_used(&mem, vq.used_addr(), 2);
        dev.reset();
        assert_eq!((idx, finished), (1, 1));
    }

    #[test]
    fn a_driver_adding_requests_while_others_execute_is_not_asked_to_kick() {
        let mem = mem();
        let reads: Vec<(u32, u64)> = (0..3).map(|s| (VIRTIO_BLK_T_IN, s)).collect();
        let (chains, heads) = requests(&mem, &reads);
        // EVENT_IDX: the device asks for notifications by writing avail_event.
        let vq = queue_with(&mem, &chains[..2]);
        let (mut dev, gate, ends) = gated_device_on(&mem, &vq, 1, 0, None, true);
        let used = vq.used_addr();

        ends.evt.write(1).unwrap();
        wait_gate(&gate, |s| s.entered == 2);
        release(&gate, 0);
        wait_used(&mem, used, 1);
        // The second read still executes: the device has not asked for the next notification.
        let asked_while_busy = avail_event(&mem, used);
        // The driver adds a third request and, not asked to, does not kick.
        vq.add_desc_chains(&chains[2], heads[2]).unwrap();
        open(&gate);
        wait_used(&mem, used, 3);
        // Idle again: it asks to be notified of the next request.
        poll_until("notifications never re-enabled", || {
            avail_event(&mem, used) == 3
        });
        dev.reset();

        assert_eq!(asked_while_busy, 0);
        assert_eq!(used_ids(&mem, used, 3), (3, heads));
    }

    /// A device over an open gate (every I/O returns at once), one queue (with EVENT_IDX if
    /// `event_idx`), no I/O workers, polling the available ring for at most `poll` and
    /// holding interrupts meanwhile for at most `hold`.
    fn polling_device_on(
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<'_, GuestMemoryMmap>,
        poll: Duration,
        hold: Duration,
        event_idx: bool,
    ) -> (BlockDevice<GateEngine>, Ends) {
        let gate = Arc::new(Gate::default());
        open(&gate);
        let engine = GateEngine::new(&gate, mem, vq.used_addr().unchecked_add(2));
        let disk = DiskGeometry {
            capacity: 16,
            read_only: false,
        };
        let mut dev =
            BlockDevice::with_io_workers(BlockBackend::with_engine(engine, disk, None), 0)
                .with_poll_max(poll)
                .with_irq_hold(hold);
        let (ctx, ends) = rig(mem, vq, 1, event_idx);
        dev.activate(ctx).unwrap();
        (dev, ends)
    }

    #[test]
    fn a_request_added_while_the_queue_polls_is_taken_without_a_kick() {
        let mem = mem();
        let reads: Vec<(u32, u64)> = (0..2).map(|s| (VIRTIO_BLK_T_IN, s)).collect();
        let (chains, heads) = requests(&mem, &reads);
        let vq = queue_with(&mem, &chains[..1]);
        let used = vq.used_addr();
        // A window far longer than the test: the poll cannot end before the second request.
        let (mut dev, ends) =
            polling_device_on(&mem, &vq, Duration::from_secs(600), Duration::ZERO, true);
        let counters = dev.counters();

        ends.evt.write(1).unwrap();
        wait_used(&mem, used, 1);
        // The device polls: it has not asked to be notified of the next request.
        let asked = avail_event(&mem, used);
        // The driver adds a second request and, not asked to, does not kick.
        vq.add_desc_chains(&chains[1], heads[1]).unwrap();
        wait_used(&mem, used, 2);
        // A reset ends the poll (it looks at its events while it polls).
        let reset_at = Instant::now();
        dev.reset();
        let reset_took = reset_at.elapsed();

        assert_eq!(asked, 0);
        assert_eq!(used_ids(&mem, used, 2), (2, heads));
        assert_eq!(counters.kicks.load(Ordering::Relaxed), 1);
        assert!(counters.polled.load(Ordering::Relaxed) >= 1);
        assert!(
            reset_took < Duration::from_secs(60),
            "the reset waited for the poll window ({reset_took:?})"
        );
    }

    #[test]
    fn an_idle_queue_stops_polling_and_asks_for_notifications_again() {
        let mem = mem();
        let (chains, heads) = requests(&mem, &[(VIRTIO_BLK_T_IN, 0)]);
        let vq = queue_with(&mem, &chains);
        let used = vq.used_addr();
        let (mut dev, ends) =
            polling_device_on(&mem, &vq, Duration::from_millis(1), Duration::ZERO, true);
        let counters = dev.counters();

        ends.evt.write(1).unwrap();
        wait_used(&mem, used, 1);
        // The window ends with nothing added: the device asks to be notified of request 1.
        poll_until("notifications never re-enabled after the poll", || {
            avail_event(&mem, used) == 1
        });
        dev.reset();

        assert_eq!(used_ids(&mem, used, 1), (1, heads));
        // At least one whole window was spent polling before notifications came back on.
        assert!(counters.poll_ns.load(Ordering::Relaxed) >= 1_000_000);
    }

    #[test]
    fn holding_turns_off_after_holds_nothing_joined_and_a_probe_turns_it_back_on() {
        let mut c = Coalescer::new(Duration::from_micros(150));
        assert!(c.holding());
        // A hold a request joined keeps it on, however many misses came before.
        for _ in 0..Coalescer::MISSES_OFF - 1 {
            c.raised(true);
        }
        c.joined = true;
        c.raised(true);
        assert!(c.holding());
        // MISSES_OFF holds in a row that nothing joined: off.
        for _ in 0..Coalescer::MISSES_OFF {
            assert!(c.holding());
            c.raised(true);
        }
        assert!(!c.holding());
        // Raised at once PROBE_EVERY times, then one probing hold...
        for _ in 0..Coalescer::PROBE_EVERY {
            assert!(!c.holding());
            c.raised(false);
        }
        assert!(c.holding());
        // ... that nothing joins: off again at once.
        c.raised(true);
        assert!(!c.holding());
        assert!(
            !Coalescer::new(Duration::ZERO).holding(),
            "zero never holds"
        );
    }

    #[test]
    fn a_slow_yield_turns_to_napping_until_a_probing_yield_is_quick() {
        let t0 = Instant::now();
        let mut g = GiveWay::default();
        // Yields that return at once (nothing else wants the core), or after a thread that
        // serves the device ran, stay yields.
        assert!(!g.naps_at(t0));
        g.yielded(t0, Duration::from_micros(1));
        g.yielded(t0, GiveWay::SLOW_YIELD);
        assert!(!g.naps_at(t0));
        // A yield that a CPU-bound thread held the core through: naps from then on...
        g.yielded(t0, GiveWay::SLOW_YIELD + Duration::from_micros(1));
        assert!(g.naps_at(t0));
        assert!(g.naps_at(t0 + GiveWay::PROBE_AFTER - Duration::from_micros(1)));
        // ... until a yield probes; held again: naps for another while.
        let probe = t0 + GiveWay::PROBE_AFTER;
        assert!(!g.naps_at(probe));
        g.yielded(probe, Duration::from_millis(4));
        assert!(g.naps_at(probe + Duration::from_millis(1)));
        // A quick probe: yields again.
        let probe = probe + GiveWay::PROBE_AFTER;
        assert!(!g.naps_at(probe));
        g.yielded(probe, Duration::from_micros(1));
        assert!(!g.naps_at(probe + Duration::from_millis(1)));
    }

    #[test]
    fn a_request_added_while_the_interrupt_is_held_is_announced_with_it() {
        let mem = mem();
        let reads: Vec<(u32, u64)> = (0..2).map(|s| (VIRTIO_BLK_T_IN, s)).collect();
        let (chains, heads) = requests(&mem, &reads);
        let vq = queue_with(&mem, &chains[..1]);
        let used = vq.used_addr();
        // A poll and a hold far longer than the test: only the reset ends the hold. Without
        // EVENT_IDX the driver wants every interrupt (the mock queue's used_event would lie in
        // its used ring).
        let long = Duration::from_secs(600);
        let (mut dev, ends) = polling_device_on(&mem, &vq, long, long, false);
        let counters = dev.counters();

        ends.evt.write(1).unwrap();
        wait_used(&mem, used, 1);
        let after_first = ends.irq.read().is_ok();
        vq.add_desc_chains(&chains[1], heads[1]).unwrap();
        wait_used(&mem, used, 2);
        let after_second = ends.irq.read().is_ok();
        // Stopping raises what is held.
        dev.reset();

        assert!(
            !after_first,
            "the first completion's interrupt was not held"
        );
        assert!(!after_second, "the hold ended before the reset");
        assert_eq!(ends.irq.read().unwrap(), 1);
        assert_eq!(counters.interrupts.load(Ordering::Relaxed), 1);
        assert_eq!(used_ids(&mem, used, 2), (2, heads));
    }

    #[test]
    fn the_poll_window_doubles_when_a_kick_comes_within_the_longest_and_halves_when_not() {
        let max = Duration::from_micros(100);
        let mut p = Poller::new(max);
        assert_eq!(p.window, max, "it starts at the longest");
        // Idle longer than the longest: halved, then down to zero below the first window.
        p.kicked_after(Duration::from_millis(5));
        assert_eq!(p.window, Duration::from_micros(50));
        for _ in 0..3 {
            p.kicked_after(Duration::from_millis(5));
        }
        assert_eq!(p.window, Duration::from_nanos(6250));
        p.kicked_after(Duration::from_millis(5));
        assert_eq!(p.window, Duration::ZERO);
        // A kick soon after the queue went idle: a longer window would have found it.
        p.kicked_after(Duration::from_micros(40));
        assert_eq!(p.window, Poller::FIRST);
        for _ in 0..10 {
            p.kicked_after(Duration::from_micros(40));
        }
        assert_eq!(p.window, max, "never beyond the longest");
    }

    #[test]
    fn pieces_cut_the_buffers_on_piece_boundaries_and_the_last_may_be_short() {
        let a = |x: u64| GuestAddress(x);
        // One buffer: cut inside it; the last piece is what is left.
        assert_eq!(
            pieces(&[(a(0x1000), 2560)], 1024, 0),
            Some(vec![
                (vec![(a(0x1000), 1024)], 0),
                (vec![(a(0x1400), 1024)], 1024),
                (vec![(a(0x1800), 512)], 2048),
            ])
        );
        // Several: a buffer across a boundary is cut, the others stay whole; a cut on a
        // buffer's end leaves no empty piece.
        assert_eq!(
            pieces(&[(a(0), 512), (a(0x1000), 1024), (a(0x2000), 512)], 1024, 0),
            Some(vec![
                (vec![(a(0), 512), (a(0x1000), 512)], 0),
                (vec![(a(0x1200), 512), (a(0x2000), 512)], 1024),
            ])
        );
        assert_eq!(
            pieces(&[(a(0), 1024), (a(0x1000), 1024)], 1024, 0),
            Some(vec![
                (vec![(a(0), 1024)], 0),
                (vec![(a(0x1000), 1024)], 1024)
            ])
        );
        // Each piece carries its image offset: the request's own plus the piece's place in it.
        assert_eq!(
            pieces(&[(a(0), 1536)], 1024, 0x10_0000),
            Some(vec![
                (vec![(a(0), 1024)], 0x10_0000),
                (vec![(a(0x400), 512)], 0x10_0400)
            ])
        );
        // Nothing to share: one piece or none, or a piece that is not whole sectors.
        assert_eq!(pieces(&[(a(0), 1024)], 1024, 0), None);
        assert_eq!(pieces(&[], 1024, 0), None);
        assert_eq!(pieces(&[(a(0), 4096)], 1000, 0), None);
        assert_eq!(pieces(&[(a(0), 4096)], 0, 0), None);
        // An image offset that would overflow is refused, not wrapped.
        assert_eq!(pieces(&[(a(0), 2048)], 1024, u64::MAX - 512), None);
    }

    #[test]
    fn a_shared_read_gives_the_front_and_the_back_each_piece_once_until_they_meet() {
        let runs = |n: u64| (0..n).map(|i| (Vec::new(), i * 512)).collect::<Vec<_>>();
        // No worker: the queue thread takes every piece, in order.
        let alone = SharedRead::new(runs(3));
        let taken: Vec<u64> = std::iter::from_fn(|| alone.take_front().map(|p| p.1)).collect();
        assert_eq!(taken, vec![0, 512, 1024]);
        assert_eq!(alone.wait_worker(), (true, 0));
        // A late worker takes from the back until they meet; its failure fails the read.
        let share = SharedRead::new(runs(4));
        assert_eq!(share.take_front().map(|p| p.1), Some(0));
        assert_eq!(share.take_back(None).map(|p| p.1), Some(1536));
        assert_eq!(share.take_front().map(|p| p.1), Some(512));
        assert_eq!(share.take_back(Some(false)).map(|p| p.1), Some(1024));
        assert!(share.take_front().is_none());
        assert!(share.take_back(Some(true)).is_none());
        assert_eq!(share.wait_worker(), (false, 2));
        // The queue thread waits for the worker's piece in flight.
        let share = Arc::new(SharedRead::new(runs(2)));
        assert!(share.take_back(None).is_some());
        assert!(share.take_front().is_some());
        assert!(share.take_front().is_none());
        let worker = {
            let share = share.clone();
            std::thread::spawn(move || {
                // Blocks the queue thread's wait until the worker reports its piece.
                let _ = share.take_back(Some(true));
            })
        };
        assert_eq!(share.wait_worker(), (true, 1));
        worker.join().unwrap();
    }

    /// A device of `sectors` sectors over `engine`, activated on `vq` without EVENT_IDX.
    fn device_over<E: BlockEngine>(
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<'_, GuestMemoryMmap>,
        engine: BlockBackend<E>,
        io_workers: usize,
    ) -> (BlockDevice<E>, Ends) {
        let mut dev =
            BlockDevice::with_io_workers(engine, io_workers).with_poll_max(Duration::ZERO);
        let (ctx, ends) = rig(mem, vq, 1, false);
        dev.activate(ctx).unwrap();
        (dev, ends)
    }

    /// One read of `segments` (address, length) from `sector`.
    fn large_read(
        mem: &GuestMemoryMmap,
        sector: u64,
        segments: &[(u64, u32)],
    ) -> Vec<RawDescriptor> {
        put_header(mem, HDR, VIRTIO_BLK_T_IN, sector);
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let data: Vec<(u64, u32, u16)> = segments.iter().map(|&(a, l)| (a, l, W)).collect();
        chain(HDR, &data, STATUS, 0)
    }

    #[test]
    fn a_large_read_is_shared_the_queue_thread_from_the_front_a_worker_from_the_back() {
        let mem = mem();
        let pieces_in_read = 4;
        let len = u32::try_from(SPLIT_PIECE).unwrap() * pieces_in_read;
        let vq = queue_with(&mem, &[large_read(&mem, 8, &[(0x4_0000, len)])]);
        let gate = Arc::new(Gate::default());
        let engine = GateEngine::new(&gate, &mem, vq.used_addr().unchecked_add(2));
        let disk = DiskGeometry {
            capacity: 4096,
            read_only: false,
        };
        let backend = BlockBackend::with_engine(engine, disk, None);
        let (mut dev, ends) = device_over(&mem, &vq, backend, 1);
        let counters = dev.counters();
        let piece = |i: u32| 8 * 512 + u64::from(i) * SPLIT_PIECE;

        ends.evt.write(1).unwrap();
        // The first piece and the last are in the engine at once (the gate is closed), one on
        // each thread.
        wait_gate(&gate, |s| s.entered == 2);
        // The queue thread goes on from the front while the worker is still in its piece.
        release(&gate, piece(0));
        wait_gate(&gate, |s| s.entered == 3);
        open(&gate);
        wait_used(&mem, vq.used_addr(), 1);
        dev.reset();

        let mut on = gate.state.lock().unwrap().entered_on.clone();
        on.sort();
        let queue = "virtio-blk".to_owned();
        let worker = "virtio-blk-io0".to_owned();
        assert_eq!(on[..2], [(piece(0), queue.clone()), (piece(1), queue)]);
        assert_eq!(on[3], (piece(3), worker));
        // Where they met (the third piece) is whoever came first; each piece once.
        assert_eq!(on.len(), 4);
        assert_eq!(on[2].0, piece(2));
        let used_len: u32 = mem.read_obj(vq.used_addr().unchecked_add(8)).unwrap();
        assert_eq!(used_len, len + 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
        assert_eq!(counters.split_reads.load(Ordering::Relaxed), 1);
        let by_worker = counters.pieces_by_workers.load(Ordering::Relaxed);
        assert!((1..=2).contains(&by_worker), "{by_worker}");
    }

    /// A read-write image of four extents of [`SPLIT_READ_MIN`] bytes, byte i being i % 253,
    /// served with read-ahead of up to 1 MiB, no polling and `workers` I/O workers.
    fn streaming_device(
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<'_, GuestMemoryMmap>,
        workers: usize,
    ) -> (TempFile, Vec<u8>, BlockDevice, Ends) {
        let tmp = TempFile::new().unwrap();
        let image: Vec<u8> = (0..4 * SPLIT_READ_MIN).map(|i| (i % 253) as u8).collect();
        tmp.as_file().write_all(&image).unwrap();
        let backend = BlockBackend::open(tmp.as_path(), false, None).unwrap();
        let mut dev = BlockDevice::with_io_workers(backend, workers)
            .with_poll_max(Duration::ZERO)
            .with_readahead(1 << 20);
        let (ctx, ends) = rig(mem, vq, 1, false);
        dev.activate(ctx).unwrap();
        (tmp, image, dev, ends)
    }

    /// The driver reads extent `n` (of [`SPLIT_READ_MIN`] bytes) into 0x4_0000 with the chain
    /// at descriptor `first`, as request number `count` (from 1), and waits for it; the bytes.
    fn read_extent(
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<'_, GuestMemoryMmap>,
        ends: &Ends,
        n: u64,
        first: u16,
        count: u16,
    ) -> Vec<u8> {
        let len = u32::try_from(SPLIT_READ_MIN).unwrap();
        put_header(mem, HDR, VIRTIO_BLK_T_IN, n * SPLIT_READ_MIN / SECTOR_SIZE);
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let c = chain(HDR, &[(0x4_0000, len, W)], STATUS, first);
        vq.add_desc_chains(&c, first).unwrap();
        ends.evt.write(1).unwrap();
        wait_used(mem, vq.used_addr(), count);
        assert_eq!(status(mem), S_OK);
        let mut got = vec![0u8; len as usize];
        mem.read_slice(&mut got, GuestAddress(0x4_0000)).unwrap();
        got
    }

    #[test]
    fn sequential_large_reads_are_answered_from_the_extent_read_ahead() {
        let mem = mem();
        let vq = queue_with(&mem, &[]);
        let (_tmp, image, mut dev, ends) = streaming_device(&mem, &vq, 1);
        let counters = dev.counters();
        let extent = |n: u64| {
            let at = usize::try_from(n * SPLIT_READ_MIN).unwrap();
            image[at..at + usize::try_from(SPLIT_READ_MIN).unwrap()].to_vec()
        };

        assert!(read_extent(&mem, &vq, &ends, 0, 0, 1) == extent(0));
        assert!(read_extent(&mem, &vq, &ends, 1, 3, 2) == extent(1));
        // Two in a row: the third extent is read ahead while the queue is idle.
        wait_count(&counters.readahead_reads, 1);
        assert!(read_extent(&mem, &vq, &ends, 2, 6, 3) == extent(2));
        assert_eq!(counters.readahead_hits.load(Ordering::Relaxed), 1);
        wait_count(&counters.readahead_reads, 2);
        assert!(read_extent(&mem, &vq, &ends, 3, 9, 4) == extent(3));
        dev.reset();

        assert_eq!(counters.readahead_hits.load(Ordering::Relaxed), 2);
        // The image ends after the fourth extent: nothing beyond it was read ahead.
        assert_eq!(counters.readahead_reads.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_write_taken_after_the_read_ahead_is_seen_by_the_read_of_that_extent() {
        let mem = mem();
        let vq = queue_with(&mem, &[]);
        let (_tmp, image, mut dev, ends) = streaming_device(&mem, &vq, 1);
        let counters = dev.counters();

        read_extent(&mem, &vq, &ends, 0, 0, 1);
        read_extent(&mem, &vq, &ends, 1, 3, 2);
        wait_count(&counters.readahead_reads, 1);
        // The driver writes a sector inside the extent read ahead.
        let sector = 2 * SPLIT_READ_MIN / SECTOR_SIZE + 1;
        put_header(&mem, HDR + 0x100, VIRTIO_BLK_T_OUT, sector);
        mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS + 1)).unwrap();
        let write = chain(HDR + 0x100, &[(DATA, 512, 0)], STATUS + 1, 6);
        vq.add_desc_chains(&write, 6).unwrap();
        ends.evt.write(1).unwrap();
        wait_used(&mem, vq.used_addr(), 3);
        let got = read_extent(&mem, &vq, &ends, 2, 9, 4);
        dev.reset();

        let at = usize::try_from(2 * SPLIT_READ_MIN).unwrap();
        let mut want = image[at..at + got.len()].to_vec();
        want[512..1024].fill(0xab);
        assert!(got == want, "the read did not see the write");
        assert_eq!(counters.readahead_hits.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_split_read_puts_the_image_bytes_in_every_buffer() {
        let mem = mem();
        let tmp = TempFile::new().unwrap();
        let image: Vec<u8> = (0..1024 * 512).map(|i| (i % 253) as u8).collect();
        tmp.as_file().write_all(&image).unwrap();
        let backend = BlockBackend::open(tmp.as_path(), true, None).unwrap();
        // 384 KiB in three buffers, each cut somewhere by the pieces.
        let segments = [
            (0x3_1000, 0x1_8000),
            (0x9_0000, 0x4_0000),
            (0xd_8000, 0x8000),
        ];
        let vq = queue_with(&mem, &[large_read(&mem, 16, &segments)]);
        let (mut dev, ends) = device_over(&mem, &vq, backend, 2);
        let counters = dev.counters();

        ends.evt.write(1).unwrap();
        wait_used(&mem, vq.used_addr(), 1);
        dev.reset();

        let mut got = Vec::new();
        for &(addr, len) in &segments {
            let mut buf = vec![0u8; len as usize];
            mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            got.extend_from_slice(&buf);
        }
        assert!(
            got == image[16 * 512..16 * 512 + got.len()],
            "the buffers differ from the image"
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
        assert_eq!(counters.split_reads.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_held_interrupt_is_not_raised_when_the_driver_s_used_event_is_not_reached() {
        let mem = mem();
        let reads: Vec<(u32, u64)> = (0..3).map(|s| (VIRTIO_BLK_T_IN, s)).collect();
        let (chains, _) = requests(&mem, &reads);
        let vq = queue_with(&mem, &chains);
        // EVENT_IDX: the driver wants an interrupt only once used entry 5 is published.
        let used_event = vq.avail_addr().unchecked_add(4 + 2 * 16);
        mem.write_obj(5u16.to_le(), used_event).unwrap();
        let long = Some(Duration::from_secs(600));
        let (mut dev, gate, ends) = gated_device_on(&mem, &vq, 2, 0, long, true);
        let counters = dev.counters();

        ends.evt.write(1).unwrap();
        wait_gate(&gate, |s| s.entered == 3);
        release(&gate, 0);
        wait_used(&mem, vq.used_addr(), 1);
        open(&gate);
        wait_used(&mem, vq.used_addr(), 3);
        // The hold ended with the last completion (no request executes any more).
        wait_gate(&gate, |s| s.finished.len() >= 3);
        dev.reset();

        assert_eq!(counters.interrupts.load(Ordering::Relaxed), 0);
        assert!(ends.irq.read().is_err(), "no interrupt was signalled");
    }

    #[test]
    fn a_write_the_engine_fails_is_answered_ioerr_after_the_attempt() {
        let mem = mem();
        put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let write = chain(HDR, &[(DATA, 512, 0)], STATUS, 0);
        let (mut dev, log, used_idx, evt, irq) = recording_device(&mem, 0, false, true, &[write]);

        evt.write(1).unwrap();
        while mem.read_obj::<u16>(used_idx).unwrap() < 1 {
            wait_irq(&irq);
        }
        dev.reset();

        assert_eq!(
            *log.lock().unwrap(),
            vec![(
                Op::Write {
                    offset: 0,
                    bytes: Vec::new()
                },
                0
            )]
        );
        assert_eq!(status(&mem), S_IOERR);
    }

    #[test]
    fn discard_write_zeroes_and_writes_on_a_read_only_disk_never_reach_the_engine() {
        let mem = mem();
        // Three requests, each with its own header, segment and status byte.
        let mut chains = Vec::new();
        let mut first = 0u16;
        for (i, kind) in [
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
            VIRTIO_BLK_T_OUT,
        ]
        .into_iter()
        .enumerate()
        {
            let i = i as u64;
            let (hdr, seg) = (HDR + 0x100 * i, DATA + 0x1000 * i);
            put_header(&mem, hdr, kind, 0);
            // A discard / write-zeroes segment: sector 0, 8 sectors, no flags (and, for the
            // write, 512 bytes starting with it).
            mem.write_obj(0u64, GuestAddress(seg)).unwrap();
            mem.write_obj(8u32.to_le(), GuestAddress(seg + 8)).unwrap();
            mem.write_obj(0u32, GuestAddress(seg + 12)).unwrap();
            let len = if kind == VIRTIO_BLK_T_OUT { 512 } else { 16 };
            let c = chain(hdr, &[(seg, len, 0)], STATUS + i, first);
            first += c.len() as u16;
            chains.push(c);
        }
        mem.write_slice(&[0xff; 3], GuestAddress(STATUS)).unwrap();
        let (mut dev, log, used_idx, evt, irq) = recording_device(&mem, 0, true, false, &chains);

        evt.write(1).unwrap();
        while mem.read_obj::<u16>(used_idx).unwrap() < 3 {
            wait_irq(&irq);
        }
        dev.reset();

        assert_eq!(*log.lock().unwrap(), Vec::new());
        let mut statuses = [0u8; 3];
        mem.read_slice(&mut statuses, GuestAddress(STATUS)).unwrap();
        assert_eq!(statuses, [S_IOERR; 3]);
    }

    #[test]
    fn discard_and_write_zeroes_reach_the_engine_as_byte_ranges() {
        let mem = mem();
        let mut chains = Vec::new();
        let mut first = 0u16;
        for (i, (kind, flags)) in [
            (VIRTIO_BLK_T_DISCARD, 0),
            (VIRTIO_BLK_T_WRITE_ZEROES, 0),
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let i = i as u64;
            let (hdr, seg) = (HDR + 0x100 * i, DATA + 0x1000 * i);
            put_header(&mem, hdr, kind, 0);
            mem.write_obj((4 + i).to_le(), GuestAddress(seg)).unwrap();
            mem.write_obj(2u32.to_le(), GuestAddress(seg + 8)).unwrap();
            mem.write_obj(flags.to_le(), GuestAddress(seg + 12))
                .unwrap();
            let c = chain(hdr, &[(seg, 16, 0)], STATUS + i, first);
            first += c.len() as u16;
            chains.push(c);
        }
        let (mut dev, log, used_idx, evt, irq) = recording_device(&mem, 0, false, false, &chains);

        evt.write(1).unwrap();
        while mem.read_obj::<u16>(used_idx).unwrap() < 3 {
            wait_irq(&irq);
        }
        dev.reset();

        assert_eq!(
            *log.lock().unwrap(),
            vec![
                (
                    Op::Discard {
                        offset: 4 * 512,
                        len: 1024
                    },
                    0
                ),
                (
                    Op::WriteZeroes {
                        offset: 5 * 512,
                        len: 1024,
                        unmap: false
                    },
                    1
                ),
                (
                    Op::WriteZeroes {
                        offset: 6 * 512,
                        len: 1024,
                        unmap: true
                    },
                    2
                ),
            ]
        );
    }

    fn discard_seg(mem: &GuestMemoryMmap, sector: u64, num: u32, flags: u32) {
        mem.write_obj(sector.to_le(), GuestAddress(DATA)).unwrap();
        mem.write_obj(num.to_le(), GuestAddress(DATA + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(DATA + 12))
            .unwrap();
    }

    #[test]
    fn write_zeroes_and_discard_zero_the_range() {
        for (kind, flags) in [
            (VIRTIO_BLK_T_WRITE_ZEROES, 0),
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
            ),
            (VIRTIO_BLK_T_DISCARD, 0),
        ] {
            let mem = mem();
            let (tmp, mut b) = image(false, None);
            header(&mem, kind, 0);
            discard_seg(&mem, 8, 8, flags);

            run(
                &mem,
                &mut b,
                &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)],
            );

            assert_eq!(status(&mem), S_OK, "type {kind}");
            let img = std::fs::read(tmp.as_path()).unwrap();
            assert_eq!(img.len(), 16 * 512);
            assert!(img[4096..].iter().all(|&x| x == 0), "type {kind}");
            assert_eq!(img[4095], (4095 % 251) as u8);
        }
    }

    #[test]
    fn discard_past_the_end_is_ioerr_and_with_flags_unsupp() {
        let mem = mem();
        let (_tmp, mut b) = image(false, None);
        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        discard_seg(&mem, 12, 8, 0);
        run(
            &mem,
            &mut b,
            &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)],
        );
        assert_eq!(status(&mem), S_IOERR);

        discard_seg(&mem, 0, 8, 1);
        run(
            &mem,
            &mut b,
            &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)],
        );
        assert_eq!(status(&mem), S_UNSUPP);
    }

    #[test]
    fn indirect_chain_is_followed() {
        let mem = mem();
        let (_tmp, mut b) = image(false, None);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let table = GuestAddress(0x4_0000);
        let next = VRING_DESC_F_NEXT as u16;
        for (i, desc) in [
            Descriptor::new(HDR, 16, next, 1),
            Descriptor::new(DATA, 512, W | next, 2),
            Descriptor::new(STATUS, 1, W, 0),
        ]
        .into_iter()
        .enumerate()
        {
            mem.write_obj(
                RawDescriptor::from(desc),
                table.unchecked_add(16 * i as u64),
            )
            .unwrap();
        }

        let used = run(
            &mem,
            &mut b,
            &[d(table.0, 48, VRING_DESC_F_INDIRECT as u16)],
        );

        assert_eq!(used, 513);
        assert_eq!(status(&mem), S_OK);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA + 5)).unwrap(), 5);
    }

    #[test]
    fn worker_completes_a_notified_request_and_interrupts() {
        let mem = mem();
        let (_tmp, b) = image(false, None);
        let mut dev = BlockDevice::new(b);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let vq = queue_with(&mem, &[chain(HDR, &[(DATA, 512, W)], STATUS, 0)]);
        let (ctx, ends) = rig(&mem, &vq, 1, false);
        dev.activate(ctx).unwrap();

        ends.evt.write(1).unwrap();
        wait_irq(&ends.irq);

        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(status(&mem), S_OK);
        assert_eq!(
            ends.shared
                .interrupt_status
                .load(std::sync::atomic::Ordering::SeqCst),
            1
        );
        dev.reset();
        assert!(dev.backend.is_some());
    }

    #[test]
    fn a_wrong_queue_count_is_refused_and_leaves_the_device_able_to_activate() {
        let mem = mem();
        let (_tmp, b) = image(false, None);
        let mut dev = BlockDevice::new(b);
        let vq = queue_with(&mem, &[]);
        let ctx = |queues: usize| rig(&mem, &vq, queues, false).0;

        let two = dev.activate(ctx(2));
        assert!(matches!(
            two,
            Err(ActivateError::QueueCount {
                expected: 1,
                got: 2
            })
        ));
        dev.activate(ctx(1)).unwrap();
        assert!(matches!(
            dev.activate(ctx(1)),
            Err(ActivateError::AlreadyActive)
        ));
        dev.reset();
        dev.activate(ctx(1)).unwrap();
        dev.reset();
    }

    // ---- Image checks, sizing and locking ----

    /// A loop device over a temporary backing file, detached on drop (also when the test
    /// fails), before the backing file is removed.
    struct LoopDevice {
        dev: PathBuf,
        backing: TempFile,
    }

    impl LoopDevice {
        /// `Err` says why there is none here (not root, no losetup, no free loop device).
        fn attach(bytes: &[u8]) -> Result<Self, String> {
            let backing = TempFile::new().map_err(|e| format!("temp file: {e}"))?;
            backing
                .as_file()
                .write_all(bytes)
                .map_err(|e| format!("temp file: {e}"))?;
            let out = std::process::Command::new("losetup")
                .args(["-f", "--show"])
                .arg(backing.as_path())
                .output()
                .map_err(|e| format!("cannot run losetup: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "`losetup -f --show` failed (it needs root and a free loop device): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            Ok(Self { dev, backing })
        }
    }

    impl Drop for LoopDevice {
        fn drop(&mut self) {
            // Still open somewhere (a test that failed holding it): the kernel detaches it on
            // the last close (autoclear).
            let detached = std::process::Command::new("losetup")
                .arg("-d")
                .arg(&self.dev)
                .status()
                .is_ok_and(|s| s.success());
            if !detached {
                eprintln!("warning: could not detach {}", self.dev.display());
            }
        }
    }

    fn loop_device(test: &str, bytes: &[u8]) -> Option<LoopDevice> {
        match LoopDevice::attach(bytes) {
            Ok(l) => Some(l),
            Err(why) => {
                eprintln!("\n*** SKIPPED {test}: {why} ***\n");
                None
            }
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    fn is_locked_error(e: &std::io::Error) -> bool {
        e.kind() == std::io::ErrorKind::WouldBlock
            && e.get_ref()
                .and_then(|inner| inner.downcast_ref::<ImageError>())
                .is_some_and(|inner| matches!(inner, ImageError::Locked { .. }))
    }

    #[test]
    fn capacity_comes_from_seeking_to_the_end_in_whole_sectors() {
        // A Cursor has no metadata at all, so `image_capacity` can only have sized it by
        // seeking. This pins the arithmetic and the partial-sector rule; that seeking sizes a
        // real block device (st_size 0) is what the loop-device tests below show, as root.
        let mut c = std::io::Cursor::new(vec![0u8; 16 * 512 + 100]);
        c.set_position(7);

        let sized = image_capacity(&mut c).unwrap();

        assert_eq!(sized, (16, 100));
        assert_eq!(c.position(), 0);
        assert_eq!(
            image_capacity(&mut std::io::Cursor::new(Vec::<u8>::new())).unwrap(),
            (0, 0)
        );
    }

    #[test]
    fn a_file_whose_size_is_not_whole_sectors_serves_the_whole_sectors_only() {
        let tmp = TempFile::new().unwrap();
        tmp.as_file().write_all(&pattern(3 * 512 + 511)).unwrap();

        let b = BlockBackend::open(tmp.as_path(), true, None).unwrap();

        assert_eq!(b.geometry().capacity, 3);
    }

    #[test]
    fn a_loop_device_has_the_capacity_of_its_backing_file() {
        let Some(lo) = loop_device(
            "a_loop_device_has_the_capacity_of_its_backing_file",
            &[0u8; 64 * 1024],
        ) else {
            return;
        };
        assert_eq!(
            std::fs::metadata(&lo.dev).unwrap().len(),
            0,
            "a block device's st_size is 0: the case this test is about"
        );

        let dev = BlockDevice::new(BlockBackend::open(&lo.dev, true, None).unwrap());

        let mut capacity = [0u8; 8];
        dev.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 128);
    }

    #[test]
    fn a_loop_device_is_served_end_to_end() {
        let Some(lo) = loop_device("a_loop_device_is_served_end_to_end", &pattern(64 * 1024))
        else {
            return;
        };
        let mem = mem();
        let mut b = BlockBackend::open(&lo.dev, false, None).unwrap();

        // Read sectors 100 and 101.
        header(&mem, VIRTIO_BLK_T_IN, 100);
        let used = run(
            &mem,
            &mut b,
            &[d(HDR, 16, 0), d(DATA, 1024, W), d(STATUS, 1, W)],
        );
        assert_eq!((used, status(&mem)), (1025, S_OK));
        let mut buf = vec![0u8; 1024];
        mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        assert_eq!(buf, pattern(64 * 1024)[100 * 512..102 * 512]);

        // Write sector 5 and the last sector (127), then flush.
        for (sector, byte) in [(5u64, 0xabu8), (127, 0xcd)] {
            header(&mem, VIRTIO_BLK_T_OUT, sector);
            mem.write_slice(&[byte; 512], GuestAddress(DATA)).unwrap();
            let used = run(
                &mem,
                &mut b,
                &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)],
            );
            assert_eq!((used, status(&mem)), (1, S_OK), "write of sector {sector}");
        }
        // Zero sectors 10-11 and discard 20-21 (fallocate on the block device).
        for (kind, sector) in [(VIRTIO_BLK_T_WRITE_ZEROES, 10), (VIRTIO_BLK_T_DISCARD, 20)] {
            header(&mem, kind, 0);
            discard_seg(&mem, sector, 2, 0);
            run(
                &mem,
                &mut b,
                &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)],
            );
            assert_eq!(status(&mem), S_OK, "type {kind}");
        }
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        run(&mem, &mut b, &[d(HDR, 16, 0), d(STATUS, 1, W)]);
        assert_eq!(status(&mem), S_OK, "flush");
        // One past the end is refused.
        header(&mem, VIRTIO_BLK_T_IN, 127);
        run(
            &mem,
            &mut b,
            &[d(HDR, 16, 0), d(DATA, 1024, W), d(STATUS, 1, W)],
        );
        assert_eq!(status(&mem), S_IOERR, "read past the end");
        // And the device is locked while served.
        let second = BlockBackend::open(&lo.dev, true, None).unwrap_err();
        assert!(is_locked_error(&second), "{second}");

        let img = std::fs::read(lo.backing.as_path()).unwrap();
        let mut expect = pattern(64 * 1024);
        expect[5 * 512..6 * 512].fill(0xab);
        expect[127 * 512..].fill(0xcd);
        expect[10 * 512..12 * 512].fill(0);
        expect[20 * 512..22 * 512].fill(0);
        assert!(img == expect, "backing file differs from what was written");
    }

    #[test]
    fn a_second_open_of_an_image_is_refused_with_an_error_naming_it() {
        let (tmp, first) = image(false, None);

        for read_only in [false, true] {
            let err = BlockBackend::open(tmp.as_path(), read_only, None).unwrap_err();
            assert!(is_locked_error(&err), "read_only {read_only}: {err}");
            let msg = err.to_string();
            assert!(
                msg.contains(&tmp.as_path().display().to_string())
                    && msg.contains("in use by another process"),
                "{msg}"
            );
        }

        drop(first);
        BlockBackend::open(tmp.as_path(), false, None).unwrap();
    }

    #[test]
    fn read_only_opens_share_an_image_and_keep_a_writer_out() {
        let (tmp, _first) = image(true, None);

        let second = BlockBackend::open(tmp.as_path(), true, None);
        let writer = BlockBackend::open(tmp.as_path(), false, None);

        assert!(second.is_ok(), "{:?}", second.err());
        let err = writer.unwrap_err();
        assert!(is_locked_error(&err), "{err}");
    }

    #[test]
    fn the_image_stays_locked_across_reset_and_reactivation_and_is_freed_with_the_device() {
        let mem = mem();
        let (tmp, b) = image(false, None);
        let mut dev = BlockDevice::new(b);
        let vq = queue_with(&mem, &[]);
        let ctx = || rig(&mem, &vq, 1, false).0;
        let locked = || {
            BlockBackend::open(tmp.as_path(), true, None)
                .err()
                .is_some_and(|e| is_locked_error(&e))
        };

        dev.activate(ctx()).unwrap();
        assert!(locked(), "while active");
        dev.reset();
        assert!(locked(), "after reset");
        dev.activate(ctx()).unwrap();
        assert!(locked(), "re-activated");
        dev.reset();
        drop(dev);

        assert!(!locked(), "the device is gone: the image is free");
    }

    #[test]
    fn check_image_accepts_a_file_and_refuses_directories_char_devices_and_missing_paths() {
        let tmp = TempFile::new().unwrap();
        let dir = tmp.as_path().parent().unwrap().to_owned();
        let missing = tmp.as_path().with_extension("missing");

        assert_eq!(check_image(tmp.as_path()).unwrap(), ImageKind::File);
        for (path, what) in [
            (dir.as_path(), "a directory"),
            (Path::new("/dev/null"), "a character device"),
        ] {
            let err = check_image(path).unwrap_err();
            assert!(
                matches!(&err, ImageError::NotAnImage { what: w, .. } if *w == what),
                "{err}"
            );
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{err}"
            );
        }
        let err = check_image(&missing).unwrap_err();
        assert!(
            matches!(&err, ImageError::Stat { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
            "{err}"
        );
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn check_image_accepts_a_block_device() {
        // stat needs no permission on the device: any block device node will do.
        let Some(dev) = std::fs::read_dir("/dev")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device()))
        else {
            eprintln!(
                "\n*** SKIPPED check_image_accepts_a_block_device: no block device in /dev ***\n"
            );
            return;
        };

        assert_eq!(
            check_image(&dev).unwrap(),
            ImageKind::BlockDevice,
            "{}",
            dev.display()
        );
    }

    #[test]
    fn opening_a_directory_or_a_char_device_as_a_disk_is_refused() {
        let tmp = TempFile::new().unwrap();
        let dir = tmp.as_path().parent().unwrap().to_owned();

        for path in [dir.as_path(), Path::new("/dev/null")] {
            let err = BlockBackend::open(path, true, None).unwrap_err();

            assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
            assert!(
                err.to_string()
                    .contains("not a regular file or a block device"),
                "{err}"
            );
        }
    }
}
