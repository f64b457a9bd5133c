//! A double of the posted C driver for tests: an [`Ioctl`] that behaves like
//! `bao-io-dispatcher-patch.txt` does where a device model can tell, defects included, so that
//! code written against [`KernelApi`](crate::KernelApi) can be shown to survive the driver
//! without a backend VM. Each behaviour follows a function of the patch:
//!
//! | behaviour | the driver | here |
//! | --- | --- | --- |
//! | DEASSIGN re-assigns | `bao_ioeventfd_client_config` deassigns, then falls through to assign | [`DriverDouble`]'s IOEVENTFD |
//! | first match wins | `bao_ioeventfd_match` walks the list in insertion order | [`DriverDouble::trap_write`] |
//! | an ioeventfd owns its range | `bao_io_client_find` routes any access inside it to the ioeventfd client, whose handler drops unmatched writes and answers reads with 0 | [`DriverDouble::trap_write`], [`DriverDouble::trap_read`] |
//! | a signal fails ATTACH | `bao_io_client_attach` ignores `wait_event_interruptible`; the pop then fails: EFAULT | [`DriverDouble::signal_attach`] |
//! | closing destroys | `bao_dm_release` destroys the DM; a later GET_INFO finds none: ENOENT | [`Ioctl::close`] |
//! | destroying wakes ATTACH | the control client is marked DESTROYING: EPERM | [`Ioctl::close`] |
//!
//! Eventfds are compared as the driver compares `eventfd_ctx`s: by the open file, not the fd
//! number (`kcmp(KCMP_FILE)`), and the double keeps its own duplicate of each, as the driver
//! keeps a reference.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use remio_abi::uapi::{
    BAO_IOCTL_DM_GET_INFO, BAO_IOCTL_IOEVENTFD, BAO_IOCTL_IO_CLIENT_ATTACH,
    BAO_IOCTL_IO_REQUEST_COMPLETE, BAO_IOCTL_IRQFD, BAO_IOEVENTFD_FLAG_DATAMATCH,
    BAO_IOEVENTFD_FLAG_DEASSIGN, BAO_IO_READ, BAO_IO_WRITE, BAO_IRQFD_FLAG_DEASSIGN,
};
use vm_memory::{ByteValued, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::kernel::Ioctl;
use crate::{DmInfo, Result, VirtioRequest};

/// Where a trapped write went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteRoute {
    /// Inside an ioeventfd's range and matched: that eventfd was signalled.
    Signalled,
    /// Inside an ioeventfd's range, matched nothing: dropped (completed, nothing signalled).
    Dropped,
    /// Outside every ioeventfd range: queued to the control client with this request id.
    Control(u64),
}

#[derive(Debug)]
struct Ioevt {
    file: OwnedFd,
    addr: u64,
    len: u64,
    data: Option<u64>,
}

#[derive(Debug)]
struct Dm {
    info: DmInfo,
    shmem: File,
    alive: bool,
    control: VecDeque<VirtioRequest>,
    completions: Vec<VirtioRequest>,
    ioeventfds: Vec<Ioevt>,
    irqfds: Vec<OwnedFd>,
    /// A signal is pending for a thread in (or entering) ATTACH.
    signal: bool,
    /// Every IOEVENTFD assign fails with this errno (a test knob).
    refuse_ioeventfds: Option<i32>,
    /// Threads blocked in ATTACH right now.
    attach_waiters: usize,
}

#[derive(Debug, Default)]
struct State {
    dms: Vec<Dm>,
    /// DM fds handed out, by number: which DM each reaches.
    dm_fds: HashMap<RawFd, usize>,
    next_request: u64,
}

/// The posted driver, as a test double (see the module docs). Cheap to share: `Arc` it and
/// hand a clone to [`KernelApi::with_ioctl`](crate::KernelApi::with_ioctl).
#[derive(Debug, Default)]
pub struct DriverDouble {
    state: Mutex<State>,
    changed: Condvar,
}

/// How long [`DriverDouble`] waits for a completion before reporting none.
const WAIT: Duration = Duration::from_secs(10);

impl DriverDouble {
    /// A driver whose device tree describes `dms` (DM id = index), each with a shared memory
    /// of its `shmem_size` (a memfd).
    pub fn new(dms: &[DmInfo]) -> io::Result<Arc<Self>> {
        let mut state = State::default();
        for (i, info) in dms.iter().enumerate() {
            let shmem = memfd(info.shmem_size)?;
            state.dms.push(Dm {
                info: DmInfo {
                    id: u32::try_from(i).map_err(io::Error::other)?,
                    ..*info
                },
                shmem,
                alive: true,
                control: VecDeque::new(),
                completions: Vec::new(),
                ioeventfds: Vec::new(),
                irqfds: Vec::new(),
                signal: false,
                refuse_ioeventfds: None,
                attach_waiters: 0,
            });
        }
        Ok(Arc::new(Self {
            state: Mutex::new(state),
            changed: Condvar::new(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether DM `dm` still exists (no session of it has been closed).
    pub fn is_alive(&self, dm: usize) -> bool {
        self.lock().dms.get(dm).is_some_and(|d| d.alive)
    }

    /// How many ioeventfds DM `dm` holds, in its list order: (addr, datamatch).
    pub fn ioeventfds(&self, dm: usize) -> Vec<(u64, Option<u64>)> {
        self.lock()
            .dms
            .get(dm)
            .map(|d| d.ioeventfds.iter().map(|e| (e.addr, e.data)).collect())
            .unwrap_or_default()
    }

    /// The shared memory of DM `dm` (what its DM fd maps).
    pub fn shmem(&self, dm: usize) -> io::Result<File> {
        self.lock()
            .dms
            .get(dm)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?
            .shmem
            .try_clone()
    }

    /// Waits (bounded) until a thread is blocked in ATTACH on DM `dm` with nothing queued;
    /// returns whether one is.
    pub fn wait_for_attach(&self, dm: usize) -> bool {
        let deadline = Instant::now() + WAIT;
        let mut st = self.lock();
        loop {
            if st.dms.get(dm).is_some_and(|d| d.attach_waiters > 0) {
                return true;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Makes the thread in ATTACH on DM `dm` (or the next to enter it) return as a caught
    /// signal makes it return in the posted driver: EFAULT when nothing is queued.
    pub fn signal_attach(&self, dm: usize) {
        if let Some(d) = self.lock().dms.get_mut(dm) {
            d.signal = true;
        }
        self.changed.notify_all();
    }

    /// Makes every later IOEVENTFD assign on DM `dm` fail with `errno` (say, the driver
    /// running out of memory).
    pub fn refuse_ioeventfds(&self, dm: usize, errno: i32) {
        if let Some(d) = self.lock().dms.get_mut(dm) {
            d.refuse_ioeventfds = Some(errno);
        }
    }

    /// A frontend write of `value` (`width` bytes) at `addr` of DM `dm`, routed as the
    /// driver routes it (see [`WriteRoute`]).
    pub fn trap_write(&self, dm: usize, addr: u64, width: u64, value: u64) -> WriteRoute {
        let mut st = self.lock();
        let State {
            dms, next_request, ..
        } = &mut *st;
        let Some(d) = dms.get_mut(dm) else {
            return WriteRoute::Dropped;
        };
        if in_ioeventfd_range(&d.ioeventfds, addr, width) {
            let hit = d
                .ioeventfds
                .iter()
                .find(|e| e.addr == addr && e.len >= width && e.data.is_none_or(|v| v == value));
            return match hit {
                Some(e) => {
                    signal(e.file.as_fd());
                    WriteRoute::Signalled
                }
                None => WriteRoute::Dropped,
            };
        }
        *next_request += 1;
        let id = *next_request;
        d.control
            .push_back(request(d.info.id, addr, BAO_IO_WRITE, value, width, id));
        drop(st);
        self.changed.notify_all();
        WriteRoute::Control(id)
    }

    /// A frontend read at `addr` of DM `dm`. Inside an ioeventfd's range the driver answers
    /// 0 itself (`Ok(None)`); otherwise it is queued to the control client: `Ok(Some(id))`.
    pub fn trap_read(&self, dm: usize, addr: u64, width: u64) -> Option<u64> {
        let mut st = self.lock();
        let State {
            dms, next_request, ..
        } = &mut *st;
        let d = dms.get_mut(dm)?;
        if in_ioeventfd_range(&d.ioeventfds, addr, width) {
            return None;
        }
        *next_request += 1;
        let id = *next_request;
        d.control
            .push_back(request(d.info.id, addr, BAO_IO_READ, 0, width, id));
        drop(st);
        self.changed.notify_all();
        Some(id)
    }

    /// Waits (bounded) for the completion of request `id` of DM `dm` and returns it.
    pub fn wait_completion(&self, dm: usize, id: u64) -> Option<VirtioRequest> {
        let deadline = Instant::now() + WAIT;
        let mut st = self.lock();
        loop {
            let d = st.dms.get_mut(dm)?;
            if let Some(i) = d.completions.iter().position(|c| c.request_id == id) {
                return Some(d.completions.swap_remove(i));
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// A whole frontend access: trap, then wait for the device model's answer. Returns the
    /// value read (0 for writes and for accesses the driver answers itself), or `None` when
    /// no completion came in time.
    pub fn access(&self, dm: usize, op: u64, addr: u64, width: u64, value: u64) -> Option<u64> {
        let id = if op == BAO_IO_READ {
            self.trap_read(dm, addr, width)
        } else {
            match self.trap_write(dm, addr, width, value) {
                WriteRoute::Control(id) => Some(id),
                WriteRoute::Signalled | WriteRoute::Dropped => None,
            }
        };
        match id {
            None => Some(0),
            Some(id) => self.wait_completion(dm, id).map(|c| c.value),
        }
    }

    fn dm_of(&self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        self.lock()
            .dm_fds
            .get(&fd.as_raw_fd())
            .copied()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOTTY))
    }

    fn get_info(&self, arg: &mut [u8]) -> io::Result<i32> {
        let mut info: remio_abi::DmInfo = read_arg(arg)?;
        let mut st = self.lock();
        let idx = usize::try_from(info.id).map_err(|_| einval())?;
        let d = st
            .dms
            .get(idx)
            .filter(|d| d.alive)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        info.shmem_addr = d.info.shmem_addr;
        info.shmem_size = d.info.shmem_size;
        info.irq = d.info.irq;
        let fd = new_fd()?.into_raw_fd();
        st.dm_fds.insert(fd, idx);
        info.fd = fd;
        arg.copy_from_slice(info.as_slice());
        Ok(0)
    }

    fn attach(&self, dm: usize, arg: &mut [u8]) -> io::Result<i32> {
        let mut st = self.lock();
        loop {
            let d = st.dms.get_mut(dm).ok_or_else(enodev)?;
            if !d.alive {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            if let Some(req) = d.control.pop_front() {
                if arg.len() != std::mem::size_of::<VirtioRequest>() {
                    d.control.push_front(req);
                    return Err(einval());
                }
                arg.copy_from_slice(req.as_slice());
                return Ok(0);
            }
            if std::mem::take(&mut d.signal) {
                // The wait was interrupted, its result ignored, the pop failed.
                return Err(io::Error::from_raw_os_error(libc::EFAULT));
            }
            d.attach_waiters += 1;
            self.changed.notify_all();
            st = self
                .changed
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(d) = st.dms.get_mut(dm) {
                d.attach_waiters -= 1;
            }
        }
    }

    fn complete(&self, dm: usize, arg: &[u8]) -> io::Result<i32> {
        let req: VirtioRequest = read_arg(arg)?;
        self.lock()
            .dms
            .get_mut(dm)
            .ok_or_else(enodev)?
            .completions
            .push(req);
        self.changed.notify_all();
        Ok(0)
    }

    fn ioeventfd(&self, dm: usize, arg: &[u8]) -> io::Result<i32> {
        let cfg: remio_abi::Ioeventfd = read_arg(arg)?;
        let fd = i32::try_from(cfg.fd).map_err(|_| ebadf())?;
        let file = dup_eventfd(fd)?;
        let mut st = self.lock();
        let d = st.dms.get_mut(dm).ok_or_else(enodev)?;
        if cfg.flags & BAO_IOEVENTFD_FLAG_DEASSIGN != 0 {
            // bao_ioeventfd_deassign: the first entry of this eventfd goes...
            if let Some(i) = d
                .ioeventfds
                .iter()
                .position(|e| same_file(e.file.as_fd(), file.as_fd()))
            {
                d.ioeventfds.remove(i);
            }
            // ...and bao_ioeventfd_client_config falls through to assign.
        }
        if let Some(errno) = d.refuse_ioeventfds {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let len = u64::from(cfg.len);
        if !matches!(len, 1 | 2 | 4 | 8) || cfg.addr.checked_add(len).is_none() {
            return Err(einval());
        }
        let data = (cfg.flags & BAO_IOEVENTFD_FLAG_DATAMATCH != 0).then_some(cfg.data);
        let conflict = d.ioeventfds.iter().any(|e| {
            same_file(e.file.as_fd(), file.as_fd())
                && e.addr == cfg.addr
                && (e.data.is_none() || data.is_none() || e.data == data)
        });
        if conflict {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        d.ioeventfds.push(Ioevt {
            file,
            addr: cfg.addr,
            len,
            data,
        });
        Ok(0)
    }

    fn irqfd(&self, dm: usize, arg: &[u8]) -> io::Result<i32> {
        let cfg: remio_abi::Irqfd = read_arg(arg)?;
        let file = dup_eventfd(cfg.fd)?;
        let mut st = self.lock();
        let d = st.dms.get_mut(dm).ok_or_else(enodev)?;
        let at = d
            .irqfds
            .iter()
            .position(|e| same_file(e.as_fd(), file.as_fd()));
        match (cfg.flags & BAO_IRQFD_FLAG_DEASSIGN != 0, at) {
            (true, Some(i)) => {
                d.irqfds.remove(i);
            }
            (true, None) => {}
            (false, Some(_)) => return Err(io::Error::from_raw_os_error(libc::EBUSY)),
            (false, None) => d.irqfds.push(file),
        }
        Ok(0)
    }
}

impl Ioctl for Arc<DriverDouble> {
    fn open(&self, _path: &Path) -> io::Result<OwnedFd> {
        new_fd()
    }

    fn ioctl(&self, fd: BorrowedFd<'_>, cmd: u32, arg: &mut [u8]) -> io::Result<i32> {
        if cmd == BAO_IOCTL_DM_GET_INFO {
            return self.get_info(arg);
        }
        let dm = self.dm_of(fd)?;
        match cmd {
            BAO_IOCTL_IO_CLIENT_ATTACH => self.attach(dm, arg),
            BAO_IOCTL_IO_REQUEST_COMPLETE => self.complete(dm, arg),
            BAO_IOCTL_IOEVENTFD => self.ioeventfd(dm, arg),
            BAO_IOCTL_IRQFD => self.irqfd(dm, arg),
            _ => Err(io::Error::from_raw_os_error(libc::ENOTTY)),
        }
    }

    fn mmap(&self, fd: BorrowedFd<'_>, len: u64, guest_base: u64) -> Result<GuestMemoryMmap> {
        let dm = self.dm_of(fd)?;
        crate::map_file(self.shmem(dm)?, 0, len, guest_base)
    }

    /// `bao_dm_release`: the DM is destroyed (its ATTACH waiters see EPERM, its ioeventfds
    /// and irqfds go), and no later GET_INFO finds it.
    fn close(&self, fd: OwnedFd) {
        let mut st = self.lock();
        if let Some(dm) = st.dm_fds.remove(&fd.as_raw_fd()) {
            if let Some(d) = st.dms.get_mut(dm) {
                d.alive = false;
                d.ioeventfds.clear();
                d.irqfds.clear();
            }
        }
        drop(st);
        self.changed.notify_all();
        drop(fd);
    }
}

fn request(dm_id: u32, addr: u64, op: u64, value: u64, width: u64, id: u64) -> VirtioRequest {
    VirtioRequest {
        dm_id: u64::from(dm_id),
        addr,
        op,
        value,
        access_width: width,
        request_id: id,
    }
}

/// `bao_io_client_find`: the ioeventfd client takes an access wholly inside one of its ranges
/// `[addr, addr + len - 1]`.
fn in_ioeventfd_range(list: &[Ioevt], addr: u64, width: u64) -> bool {
    list.iter().any(|e| {
        addr >= e.addr
            && addr
                .checked_add(width)
                .is_some_and(|end| end <= e.addr.saturating_add(e.len))
    })
}

fn signal(fd: BorrowedFd<'_>) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live local buffer to an fd borrowed for the call.
    let r = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    if r < 0 {
        log::warn!(
            "driver double: eventfd write: {}",
            io::Error::last_os_error()
        );
    }
}

/// `eventfd_ctx_fdget`: our own reference to the caller's eventfd (EBADF if `fd` is not
/// open).
fn dup_eventfd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC only reads `fd`; a bad fd makes it fail with EBADF.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` is a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

/// Whether two fds are the same open file (as the driver compares `eventfd_ctx`s).
fn same_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: pid_t is i32 and a live process's id is positive; widening is lossless.
    let pid = libc::c_long::from(unsafe { libc::getpid() });
    // SAFETY: kcmp only compares the two fds of our own process; it reads no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_FILE,
            libc::c_long::from(a.as_raw_fd()),
            libc::c_long::from(b.as_raw_fd()),
        )
    };
    r == 0
}

fn memfd(size: u64) -> io::Result<File> {
    // SAFETY: the name is a NUL-terminated literal; memfd_create returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"remio-driver-double".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new fd that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

/// A fresh fd standing in for a node or DM fd the driver would install (an eventfd).
fn new_fd() -> io::Result<OwnedFd> {
    let e = EventFd::new(libc::EFD_CLOEXEC)?;
    // SAFETY: the EventFd gives its fd up; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(e.into_raw_fd()) })
}

/// The ioctl argument as the driver's `copy_from_user` sees it: the struct's bytes in memory.
fn read_arg<T: ByteValued + Default>(arg: &[u8]) -> io::Result<T> {
    let mut v = T::default();
    if arg.len() != std::mem::size_of::<T>() {
        return Err(einval());
    }
    v.as_mut_slice().copy_from_slice(arg);
    Ok(v)
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

fn ebadf() -> io::Error {
    io::Error::from_raw_os_error(libc::EBADF)
}

fn enodev() -> io::Error {
    io::Error::from_raw_os_error(libc::ENODEV)
}
