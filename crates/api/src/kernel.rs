//! The C driver's userspace API: ioctls on `/dev/bao-io-dispatcher` and on the per-DM fd it
//! returns, `mmap` of the DM fd for the shared memory (`spec/remote-io.md`, the ioctl table).
//!
//! It cannot run on this machine (no Bao, no driver), so the system calls sit behind the
//! [`Ioctl`] trait: [`SysIoctl`] makes them for real, and the tests below put a recording
//! double in its place to pin the exact numbers and bytes issued.

use std::fmt::Debug;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use remio_abi::uapi::{
    WireStruct, BAO_IOCTL_DM_GET_INFO, BAO_IOCTL_IOEVENTFD, BAO_IOCTL_IO_CLIENT_ATTACH,
    BAO_IOCTL_IO_REQUEST_COMPLETE, BAO_IOCTL_IRQFD, BAO_IOEVENTFD_FLAG_DATAMATCH,
    BAO_IOEVENTFD_FLAG_DEASSIGN, BAO_IRQFD_FLAG_DEASSIGN,
};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::{ApiError, DmApi, DmInfo, DmSession, IoeventfdSpec, Result, VirtioRequest};

/// The driver's device node.
pub const DISPATCHER_PATH: &str = "/dev/bao-io-dispatcher";

/// The system calls [`KernelApi`] makes.
pub trait Ioctl: Send + Sync + Debug {
    /// Opens the dispatcher device node.
    fn open(&self, path: &Path) -> io::Result<OwnedFd>;
    /// `ioctl(fd, cmd, arg)` with `arg` the argument struct's bytes (read back for `_IOWR`).
    /// Returns the ioctl's non-negative result.
    fn ioctl(&self, fd: BorrowedFd<'_>, cmd: u32, arg: &mut [u8]) -> io::Result<i32>;
    /// `mmap(fd, offset 0, len)`, shared, placed at guest-physical `guest_base`.
    fn mmap(&self, fd: BorrowedFd<'_>, len: u64, guest_base: u64) -> Result<GuestMemoryMmap>;
}

/// The real system calls.
#[derive(Debug, Default, Clone, Copy)]
pub struct SysIoctl;

impl Ioctl for SysIoctl {
    fn open(&self, path: &Path) -> io::Result<OwnedFd> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        Ok(OwnedFd::from(f))
    }

    fn ioctl(&self, fd: BorrowedFd<'_>, cmd: u32, arg: &mut [u8]) -> io::Result<i32> {
        if arg.len() != remio_abi::ioctl::ioc_size(cmd) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        loop {
            // SAFETY: `arg` is exactly the size the command encodes, so the driver reads and
            // writes within it; the fd is borrowed for the duration of the call.
            let r =
                unsafe { libc::ioctl(fd.as_raw_fd(), libc::c_ulong::from(cmd), arg.as_mut_ptr()) };
            if r >= 0 {
                return Ok(r);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn mmap(&self, fd: BorrowedFd<'_>, len: u64, guest_base: u64) -> Result<GuestMemoryMmap> {
        let file = std::fs::File::from(fd.try_clone_to_owned()?);
        crate::map_file(file, 0, len, guest_base)
    }
}

/// The device-model API of the C driver.
#[derive(Debug)]
pub struct KernelApi<I: Ioctl = SysIoctl> {
    sys: Arc<I>,
    dev: OwnedFd,
}

impl KernelApi<SysIoctl> {
    /// Opens [`DISPATCHER_PATH`].
    pub fn open_default() -> Result<Self> {
        Self::with_ioctl(SysIoctl, Path::new(DISPATCHER_PATH))
    }
}

impl<I: Ioctl + 'static> KernelApi<I> {
    /// Opens the dispatcher node at `path` through `sys`.
    pub fn with_ioctl(sys: I, path: &Path) -> Result<Self> {
        let dev = sys.open(path)?;
        Ok(Self {
            sys: Arc::new(sys),
            dev,
        })
    }
}

fn call<I: Ioctl>(sys: &I, fd: BorrowedFd<'_>, cmd: u32, arg: &mut [u8], what: &str) -> Result<()> {
    sys.ioctl(fd, cmd, arg)
        .map(|_| ())
        .map_err(|e| match e.raw_os_error() {
            Some(errno) => ApiError::from_errno(errno, what),
            None => ApiError::Io(e),
        })
}

impl<I: Ioctl + 'static> DmApi for KernelApi<I> {
    fn open(&self, dm_id: u32) -> Result<Box<dyn DmSession>> {
        let mut arg = Vec::with_capacity(remio_abi::DmInfo::SIZE);
        remio_abi::DmInfo {
            id: dm_id,
            fd: -1,
            ..Default::default()
        }
        .encode(&mut arg);
        match call(
            &*self.sys,
            self.dev.as_fd(),
            BAO_IOCTL_DM_GET_INFO,
            &mut arg,
            "DM_GET_INFO",
        ) {
            Err(ApiError::NotFound(_)) => return Err(ApiError::NoSuchDm(dm_id)),
            other => other?,
        }
        let info = remio_abi::DmInfo::decode(&arg)
            .ok_or_else(|| ApiError::Protocol("DM_GET_INFO argument size".into()))?;
        if info.fd < 0 {
            return Err(ApiError::Protocol("DM_GET_INFO returned no fd".into()));
        }
        // SAFETY: the driver installed this fd for us in GET_INFO; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(info.fd) };
        Ok(Box::new(KernelSession {
            sys: self.sys.clone(),
            fd,
            info: DmInfo {
                id: info.id,
                shmem_addr: info.shmem_addr,
                shmem_size: info.shmem_size,
                irq: info.irq,
            },
        }))
    }
}

/// A session on one DM fd.
#[derive(Debug)]
pub struct KernelSession<I: Ioctl> {
    sys: Arc<I>,
    fd: OwnedFd,
    info: DmInfo,
}

impl<I: Ioctl> KernelSession<I> {
    fn ioeventfd(&self, efd: &EventFd, spec: IoeventfdSpec, deassign: bool) -> Result<()> {
        let fd =
            u32::try_from(efd.as_raw_fd()).map_err(|_| ApiError::BadFd("negative fd".into()))?;
        let mut flags = if deassign {
            BAO_IOEVENTFD_FLAG_DEASSIGN
        } else {
            0
        };
        if spec.datamatch.is_some() {
            flags |= BAO_IOEVENTFD_FLAG_DATAMATCH;
        }
        let mut arg = Vec::with_capacity(remio_abi::Ioeventfd::SIZE);
        remio_abi::Ioeventfd {
            fd,
            flags,
            addr: spec.addr,
            len: spec.len,
            reserved: 0,
            data: spec.datamatch.unwrap_or(0),
        }
        .encode(&mut arg);
        call(
            &*self.sys,
            self.fd.as_fd(),
            BAO_IOCTL_IOEVENTFD,
            &mut arg,
            "IOEVENTFD",
        )
    }

    fn irqfd(&self, efd: &EventFd, deassign: bool) -> Result<()> {
        let mut arg = Vec::with_capacity(remio_abi::Irqfd::SIZE);
        remio_abi::Irqfd {
            fd: efd.as_raw_fd(),
            flags: if deassign { BAO_IRQFD_FLAG_DEASSIGN } else { 0 },
        }
        .encode(&mut arg);
        call(
            &*self.sys,
            self.fd.as_fd(),
            BAO_IOCTL_IRQFD,
            &mut arg,
            "IRQFD",
        )
    }
}

impl<I: Ioctl> DmSession for KernelSession<I> {
    fn info(&self) -> DmInfo {
        self.info
    }

    fn attach(&self) -> Result<VirtioRequest> {
        let mut arg = Vec::with_capacity(VirtioRequest::SIZE);
        VirtioRequest {
            dm_id: u64::from(self.info.id),
            ..Default::default()
        }
        .encode(&mut arg);
        call(
            &*self.sys,
            self.fd.as_fd(),
            BAO_IOCTL_IO_CLIENT_ATTACH,
            &mut arg,
            "IO_CLIENT_ATTACH",
        )?;
        VirtioRequest::decode(&arg).ok_or_else(|| ApiError::Protocol("ATTACH argument size".into()))
    }

    fn complete(&self, req: &VirtioRequest) -> Result<()> {
        let mut arg = Vec::with_capacity(VirtioRequest::SIZE);
        req.encode(&mut arg);
        call(
            &*self.sys,
            self.fd.as_fd(),
            BAO_IOCTL_IO_REQUEST_COMPLETE,
            &mut arg,
            "IO_REQUEST_COMPLETE",
        )
    }

    fn assign_ioeventfd(&self, fd: &EventFd, spec: IoeventfdSpec) -> Result<()> {
        self.ioeventfd(fd, spec, false)
    }

    fn deassign_ioeventfd(&self, fd: &EventFd, spec: IoeventfdSpec) -> Result<()> {
        self.ioeventfd(fd, spec, true)
    }

    fn assign_irqfd(&self, fd: &EventFd) -> Result<()> {
        self.irqfd(fd, false)
    }

    fn deassign_irqfd(&self, fd: &EventFd) -> Result<()> {
        self.irqfd(fd, true)
    }

    fn map_shmem(&self, len: u64) -> Result<GuestMemoryMmap> {
        crate::check_shmem_len(len, self.info.shmem_size)?;
        self.sys.mmap(self.fd.as_fd(), len, self.info.shmem_addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_memory::{GuestAddress, GuestMemoryBackend};

    /// One recorded system call.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Open(String),
        Ioctl { fd: i32, cmd: u32, arg: Vec<u8> },
        Mmap { fd: i32, len: u64, guest_base: u64 },
    }

    /// Records every call; answers GET_INFO with a DM fd (a real eventfd it hands over), ATTACH
    /// with `attach_reply`, and everything else with `errno` if set.
    #[derive(Debug, Default)]
    struct Recorder {
        calls: Mutex<Vec<Call>>,
        errno: Mutex<Option<i32>>,
        attach_reply: Mutex<Option<VirtioRequest>>,
        dm_fd: Mutex<Option<i32>>,
    }

    impl Ioctl for Arc<Recorder> {
        fn open(&self, path: &Path) -> io::Result<OwnedFd> {
            self.calls
                .lock()
                .unwrap()
                .push(Call::Open(path.display().to_string()));
            owned_eventfd()
        }
        fn ioctl(&self, fd: BorrowedFd<'_>, cmd: u32, arg: &mut [u8]) -> io::Result<i32> {
            self.calls.lock().unwrap().push(Call::Ioctl {
                fd: fd.as_raw_fd(),
                cmd,
                arg: arg.to_vec(),
            });
            if let Some(e) = *self.errno.lock().unwrap() {
                return Err(io::Error::from_raw_os_error(e));
            }
            if cmd == BAO_IOCTL_DM_GET_INFO {
                let mut info = remio_abi::DmInfo::decode(arg).unwrap();
                let raw = std::os::fd::IntoRawFd::into_raw_fd(owned_eventfd()?);
                *self.dm_fd.lock().unwrap() = Some(raw);
                info.shmem_addr = 0x5000_0000;
                info.shmem_size = 0x10_0000;
                info.irq = 52;
                info.fd = raw;
                let mut out = Vec::new();
                info.encode(&mut out);
                arg.copy_from_slice(&out);
            }
            if cmd == BAO_IOCTL_IO_CLIENT_ATTACH {
                let mut out = Vec::new();
                self.attach_reply
                    .lock()
                    .unwrap()
                    .unwrap_or_default()
                    .encode(&mut out);
                arg.copy_from_slice(&out);
            }
            Ok(0)
        }
        fn mmap(&self, fd: BorrowedFd<'_>, len: u64, guest_base: u64) -> Result<GuestMemoryMmap> {
            self.calls.lock().unwrap().push(Call::Mmap {
                fd: fd.as_raw_fd(),
                len,
                guest_base,
            });
            GuestMemoryMmap::from_ranges(&[(
                GuestAddress(guest_base),
                usize::try_from(len).unwrap(),
            )])
            .map_err(|e| ApiError::Io(io::Error::other(e)))
        }
    }

    fn owned_eventfd() -> io::Result<OwnedFd> {
        let e = EventFd::new(0)?;
        // SAFETY: the fd comes out of the EventFd, which gives it up.
        Ok(unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(e)) })
    }

    fn setup() -> (
        Arc<Recorder>,
        KernelApi<Arc<Recorder>>,
        Box<dyn DmSession>,
        i32,
    ) {
        let rec = Arc::new(Recorder::default());
        let api = KernelApi::with_ioctl(rec.clone(), Path::new("/dev/bao-io-dispatcher")).unwrap();
        let session = api.open(3).unwrap();
        let dm_fd = rec.dm_fd.lock().unwrap().unwrap();
        rec.calls.lock().unwrap().clear();
        (rec, api, session, dm_fd)
    }

    fn last(rec: &Recorder) -> Call {
        rec.calls.lock().unwrap().last().cloned().unwrap()
    }

    #[test]
    fn get_info_issues_0xc020a601_with_the_id_and_reads_back_the_dm() {
        let rec = Arc::new(Recorder::default());
        let api = KernelApi::with_ioctl(rec.clone(), Path::new("/dev/bao-io-dispatcher")).unwrap();
        let dev_fd = api.dev.as_raw_fd();
        let session = api.open(3).unwrap();
        let calls = rec.calls.lock().unwrap().clone();
        assert_eq!(calls[0], Call::Open("/dev/bao-io-dispatcher".into()));
        let mut expected = vec![3, 0, 0, 0, 0, 0, 0, 0];
        expected.extend_from_slice(&[0; 20]);
        expected.extend_from_slice(&(-1i32).to_le_bytes());
        assert_eq!(
            calls[1],
            Call::Ioctl {
                fd: dev_fd,
                cmd: 0xC020_A601,
                arg: expected
            }
        );
        assert_eq!(
            session.info(),
            DmInfo {
                id: 3,
                shmem_addr: 0x5000_0000,
                shmem_size: 0x10_0000,
                irq: 52
            }
        );
    }

    #[test]
    fn get_info_enoent_is_no_such_dm() {
        let rec = Arc::new(Recorder::default());
        *rec.errno.lock().unwrap() = Some(libc::ENOENT);
        let api = KernelApi::with_ioctl(rec, Path::new("/x")).unwrap();
        assert!(matches!(api.open(9), Err(ApiError::NoSuchDm(9))));
    }

    #[test]
    fn attach_issues_0xc030a602_on_the_dm_fd_and_returns_the_request() {
        let (rec, _api, s, dm_fd) = setup();
        let want = VirtioRequest {
            dm_id: 3,
            addr: 0xa000_0070,
            op: 1,
            value: 0,
            access_width: 4,
            request_id: 2,
        };
        *rec.attach_reply.lock().unwrap() = Some(want);
        assert_eq!(s.attach().unwrap(), want);
        let mut arg = Vec::new();
        VirtioRequest {
            dm_id: 3,
            ..Default::default()
        }
        .encode(&mut arg);
        assert_eq!(
            last(&rec),
            Call::Ioctl {
                fd: dm_fd,
                cmd: 0xC030_A602,
                arg
            }
        );
    }

    #[test]
    fn complete_issues_0x4030a603_with_the_echoed_request() {
        let (rec, _api, s, dm_fd) = setup();
        let req = VirtioRequest {
            dm_id: 3,
            addr: 0xa000_0070,
            op: 1,
            value: 0x1234,
            access_width: 4,
            request_id: 2,
        };
        s.complete(&req).unwrap();
        let mut arg = Vec::new();
        req.encode(&mut arg);
        assert_eq!(arg.len(), 48);
        assert_eq!(
            last(&rec),
            Call::Ioctl {
                fd: dm_fd,
                cmd: 0x4030_A603,
                arg
            }
        );
    }

    #[test]
    fn ioeventfd_assign_and_deassign_issue_0x4020a604_with_the_flags() {
        let (rec, _api, s, dm_fd) = setup();
        let efd = EventFd::new(0).unwrap();
        let raw = u32::try_from(efd.as_raw_fd()).unwrap();
        let spec = IoeventfdSpec {
            addr: 0xa000_0050,
            len: 4,
            datamatch: Some(1),
        };
        s.assign_ioeventfd(&efd, spec).unwrap();
        let mut arg = Vec::new();
        arg.extend_from_slice(&raw.to_le_bytes());
        arg.extend_from_slice(&2u32.to_le_bytes());
        arg.extend_from_slice(&0xa000_0050u64.to_le_bytes());
        arg.extend_from_slice(&4u32.to_le_bytes());
        arg.extend_from_slice(&0u32.to_le_bytes());
        arg.extend_from_slice(&1u64.to_le_bytes());
        assert_eq!(
            last(&rec),
            Call::Ioctl {
                fd: dm_fd,
                cmd: 0x4020_A604,
                arg: arg.clone()
            }
        );
        s.deassign_ioeventfd(&efd, spec).unwrap();
        arg[4] = 2 | 4;
        assert_eq!(
            last(&rec),
            Call::Ioctl {
                fd: dm_fd,
                cmd: 0x4020_A604,
                arg
            }
        );
    }

    #[test]
    fn the_driver_has_no_status_word_and_no_ioctl_is_issued_for_it() {
        let (rec, _api, s, _dm_fd) = setup();
        let spec = crate::StatusWordSpec {
            status_addr: 0xa000_0060,
            ack_addr: 0xa000_0064,
        };
        let e = s.register_status_word(spec).unwrap_err();
        assert!(matches!(e, ApiError::NotSupported(_)));
        assert_eq!(e.errno(), libc::ENOTTY);
        assert!(rec.calls.lock().unwrap().is_empty());
    }

    #[test]
    fn irqfd_assign_and_deassign_issue_0x4008a605() {
        let (rec, _api, s, dm_fd) = setup();
        let efd = EventFd::new(0).unwrap();
        s.assign_irqfd(&efd).unwrap();
        let mut arg = efd.as_raw_fd().to_le_bytes().to_vec();
        arg.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(
            last(&rec),
            Call::Ioctl {
                fd: dm_fd,
                cmd: 0x4008_A605,
                arg: arg.clone()
            }
        );
        s.deassign_irqfd(&efd).unwrap();
        arg[4] = 1;
        assert_eq!(
            last(&rec),
            Call::Ioctl {
                fd: dm_fd,
                cmd: 0x4008_A605,
                arg
            }
        );
    }

    #[test]
    fn map_shmem_mmaps_the_dm_fd_at_the_shmem_address_and_checks_bounds() {
        let (rec, _api, s, dm_fd) = setup();
        let mem = s.map_shmem(0x1000).unwrap();
        assert_eq!(
            last(&rec),
            Call::Mmap {
                fd: dm_fd,
                len: 0x1000,
                guest_base: 0x5000_0000
            }
        );
        assert!(mem.address_in_range(GuestAddress(0x5000_0fff)));
        rec.calls.lock().unwrap().clear();
        assert_eq!(s.map_shmem(0).unwrap_err().errno(), libc::EINVAL);
        assert_eq!(s.map_shmem(0x10_0001).unwrap_err().errno(), libc::EINVAL);
        assert!(
            rec.calls.lock().unwrap().is_empty(),
            "refused before any system call"
        );
    }

    #[test]
    fn driver_errnos_become_the_matching_errors() {
        let (rec, _api, s, _) = setup();
        for errno in [
            libc::EINVAL,
            libc::EEXIST,
            libc::ENOENT,
            libc::EBADF,
            libc::EIO,
        ] {
            *rec.errno.lock().unwrap() = Some(errno);
            assert_eq!(
                s.complete(&VirtioRequest::default()).unwrap_err().errno(),
                errno
            );
        }
    }

    #[test]
    fn sys_ioctl_refuses_an_argument_of_the_wrong_size() {
        let efd = EventFd::new(0).unwrap();
        // SAFETY: efd outlives the borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(efd.as_raw_fd()) };
        let mut short = [0u8; 8];
        let e = SysIoctl
            .ioctl(fd, BAO_IOCTL_IO_CLIENT_ATTACH, &mut short)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        // The right size reaches the kernel, which does not know the number on an eventfd.
        let mut ok = [0u8; 48];
        let e = SysIoctl
            .ioctl(fd, BAO_IOCTL_IO_CLIENT_ATTACH, &mut ok)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY));
    }
}
