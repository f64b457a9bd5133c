//! The C driver's userspace API: ioctls on its device node and on the per-DM fd it returns,
//! `mmap` of the DM fd for the shared memory (`spec/remote-io.md`, the ioctl table), in both
//! revisions:
//!
//! - the posted one ([`Revision::Posted`]): `/dev/bao-io-dispatcher`, ioctl type 0xA6, DMs
//!   described by the device tree and reached with `DM_GET_INFO` by id;
//! - the later one ([`Revision::Later`]): `/dev/bao`, type 0xA7, DMs created by the device
//!   model with `CREATE_DM` from its own configuration (id, shmem address and size, irq).
//!
//! [`KernelApi::open_auto`] uses `/dev/bao` when it exists, else the posted node.
//!
//! On both, the DM lives as long as its fd: a session that ends destroys its DM, so a device
//! model's exit is final for its DMs ([`crate::DriverTraits::C_DRIVER`]). Other behaviours a
//! device model must plan for (the posted driver's defects): IOEVENTFD with DEASSIGN deassigns
//! and then assigns again; ATTACH interrupted by a signal fails with EFAULT instead of
//! restarting; an ioeventfd owns its whole range, and writes there whose value matches none
//! are dropped. `remio_api::driver_double` (feature `driver-double`) models each of them for
//! tests.
//!
//! The system calls sit behind the [`Ioctl`] trait: [`SysIoctl`] makes them for real, and
//! tests put a recording double or the driver double in its place.

use std::collections::HashMap;
use std::fmt::Debug;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use remio_abi::uapi::{
    BAO_IOCTL_DM_GET_INFO, BAO_IOCTL_IOEVENTFD, BAO_IOCTL_IO_CLIENT_ATTACH,
    BAO_IOCTL_IO_REQUEST_COMPLETE, BAO_IOCTL_IRQFD, BAO_IOEVENTFD_FLAG_DATAMATCH,
    BAO_IOEVENTFD_FLAG_DEASSIGN, BAO_IRQFD_FLAG_DEASSIGN,
};
use remio_abi::uapi_v2::{
    DmInfoV2, BAO_DEVICE_PATH_V2, BAO_IOCTL_CREATE_DM, BAO_IOCTL_IOEVENTFD_V2,
    BAO_IOCTL_IO_CLIENT_ATTACH_V2, BAO_IOCTL_IO_REQUEST_COMPLETE_V2, BAO_IOCTL_IRQFD_V2,
};
use vm_memory::{ByteValued, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::{
    ApiError, DmApi, DmInfo, DmSession, DriverTraits, IoeventfdSpec, Result, VirtioRequest,
};

/// The posted driver's device node.
pub const DISPATCHER_PATH: &str = "/dev/bao-io-dispatcher";

/// Which revision of the driver's API a [`KernelApi`] speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revision {
    /// As posted to the lists: [`DISPATCHER_PATH`], type 0xA6, `DM_GET_INFO`.
    Posted,
    /// The later revision: `/dev/bao`, type 0xA7, `CREATE_DM`.
    Later,
}

impl Revision {
    /// The device node of this revision.
    pub fn device_path(self) -> &'static Path {
        Path::new(match self {
            Self::Posted => DISPATCHER_PATH,
            Self::Later => BAO_DEVICE_PATH_V2,
        })
    }

    fn commands(self) -> DmCommands {
        match self {
            Self::Posted => DmCommands {
                attach: BAO_IOCTL_IO_CLIENT_ATTACH,
                complete: BAO_IOCTL_IO_REQUEST_COMPLETE,
                ioeventfd: BAO_IOCTL_IOEVENTFD,
                irqfd: BAO_IOCTL_IRQFD,
            },
            Self::Later => DmCommands {
                attach: BAO_IOCTL_IO_CLIENT_ATTACH_V2,
                complete: BAO_IOCTL_IO_REQUEST_COMPLETE_V2,
                ioeventfd: BAO_IOCTL_IOEVENTFD_V2,
                irqfd: BAO_IOCTL_IRQFD_V2,
            },
        }
    }
}

impl std::fmt::Display for Revision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Posted => write!(f, "posted driver ({DISPATCHER_PATH}, DM_GET_INFO)"),
            Self::Later => write!(f, "later driver revision ({BAO_DEVICE_PATH_V2}, CREATE_DM)"),
        }
    }
}

/// The per-DM ioctl numbers of one revision.
#[derive(Clone, Copy, Debug)]
struct DmCommands {
    attach: u32,
    complete: u32,
    ioeventfd: u32,
    irqfd: u32,
}

/// The system calls [`KernelApi`] makes.
pub trait Ioctl: Send + Sync + Debug {
    /// Opens the dispatcher device node.
    fn open(&self, path: &Path) -> io::Result<OwnedFd>;
    /// `ioctl(fd, cmd, arg)` with `arg` the argument struct's bytes in memory (native endian,
    /// as the ioctl ABI is; read back for `_IOWR`).
    /// Returns the ioctl's non-negative result (`CREATE_DM`: the new DM fd).
    fn ioctl(&self, fd: BorrowedFd<'_>, cmd: u32, arg: &mut [u8]) -> io::Result<i32>;
    /// `mmap(fd, offset 0, len)`, shared, placed at guest-physical `guest_base`.
    fn mmap(&self, fd: BorrowedFd<'_>, len: u64, guest_base: u64) -> Result<GuestMemoryMmap>;
    /// Closes a DM fd (the session ends; on the driver this destroys the DM).
    fn close(&self, fd: OwnedFd) {
        drop(fd);
    }
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
    path: PathBuf,
    revision: Revision,
    /// The later revision's `CREATE_DM` inputs, by DM id (from the device model's config).
    descriptions: HashMap<u32, DmInfo>,
}

impl KernelApi<SysIoctl> {
    /// Opens [`DISPATCHER_PATH`] (the posted driver).
    pub fn open_default() -> Result<Self> {
        Self::with_ioctl(SysIoctl, Path::new(DISPATCHER_PATH))
    }

    /// Opens `/dev/bao` (the later revision, DMs created from `descriptions`) when that node
    /// exists, else [`DISPATCHER_PATH`] (the posted driver, DMs from the device tree).
    pub fn open_auto(descriptions: &[DmInfo]) -> Result<Self> {
        if Revision::Later.device_path().exists() {
            Self::with_ioctl_later(SysIoctl, Revision::Later.device_path(), descriptions)
        } else {
            Self::open_default()
        }
    }
}

impl<I: Ioctl + 'static> KernelApi<I> {
    /// Opens the posted driver's node at `path` through `sys`.
    pub fn with_ioctl(sys: I, path: &Path) -> Result<Self> {
        Self::new(sys, path, Revision::Posted, &[])
    }

    /// Opens the later revision's node at `path` through `sys`; [`DmApi::open`] creates DM
    /// `id` from the description with that id.
    pub fn with_ioctl_later(sys: I, path: &Path, descriptions: &[DmInfo]) -> Result<Self> {
        Self::new(sys, path, Revision::Later, descriptions)
    }

    fn new(sys: I, path: &Path, revision: Revision, descriptions: &[DmInfo]) -> Result<Self> {
        let dev = sys.open(path)?;
        Ok(Self {
            sys: Arc::new(sys),
            dev,
            path: path.to_owned(),
            revision,
            descriptions: descriptions.iter().map(|d| (d.id, *d)).collect(),
        })
    }

    /// The revision this API speaks.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// The device node it opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `DM_GET_INFO` (posted): the driver fills the DM's description and installs a DM fd.
    fn get_info(&self, dm_id: u32) -> Result<(OwnedFd, DmInfo)> {
        let mut info = remio_abi::DmInfo {
            id: dm_id,
            fd: -1,
            ..Default::default()
        };
        match call(
            &*self.sys,
            self.dev.as_fd(),
            BAO_IOCTL_DM_GET_INFO,
            info.as_mut_slice(),
            "DM_GET_INFO",
        ) {
            Err(ApiError::NotFound(_)) => return Err(ApiError::NoSuchDm(dm_id)),
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        if info.fd < 0 {
            return Err(ApiError::Protocol("DM_GET_INFO returned no fd".into()));
        }
        // SAFETY: the driver installed this fd for us in GET_INFO; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(info.fd) };
        Ok((
            fd,
            DmInfo {
                id: info.id,
                shmem_addr: info.shmem_addr,
                shmem_size: info.shmem_size,
                irq: info.irq,
            },
        ))
    }

    /// `CREATE_DM` (later revision): the DM is created from our description; the ioctl
    /// returns its fd.
    fn create_dm(&self, dm_id: u32) -> Result<(OwnedFd, DmInfo)> {
        let info = *self.descriptions.get(&dm_id).ok_or_else(|| {
            ApiError::InvalidArgument(format!(
                "DM {dm_id}: {BAO_DEVICE_PATH_V2} creates DMs from the configuration, which \
                 must give this device's shmem_addr, shmem_size and irq"
            ))
        })?;
        let mut arg = DmInfoV2 {
            shmem_addr: info.shmem_addr,
            shmem_size: info.shmem_size,
            id: info.id,
            irq: info.irq,
        };
        let raw = call(
            &*self.sys,
            self.dev.as_fd(),
            BAO_IOCTL_CREATE_DM,
            arg.as_mut_slice(),
            "CREATE_DM",
        )?;
        if raw <= 0 {
            return Err(ApiError::Protocol(format!("CREATE_DM returned fd {raw}")));
        }
        // SAFETY: CREATE_DM's non-negative return value is a new fd the driver installed for
        // us; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok((fd, info))
    }
}

fn call<I: Ioctl>(
    sys: &I,
    fd: BorrowedFd<'_>,
    cmd: u32,
    arg: &mut [u8],
    what: &str,
) -> Result<i32> {
    sys.ioctl(fd, cmd, arg).map_err(|e| match e.raw_os_error() {
        Some(errno) => ApiError::from_errno(errno, what),
        None => ApiError::Io(e),
    })
}

impl<I: Ioctl + 'static> DmApi for KernelApi<I> {
    fn open(&self, dm_id: u32) -> Result<Box<dyn DmSession>> {
        let (fd, info) = match self.revision {
            Revision::Posted => self.get_info(dm_id)?,
            Revision::Later => self.create_dm(dm_id)?,
        };
        Ok(Box::new(KernelSession {
            sys: self.sys.clone(),
            fd: ManuallyDrop::new(fd),
            info,
            cmds: self.revision.commands(),
        }))
    }
}

/// A session on one DM fd. Dropping it closes the fd, which destroys the DM in the driver.
#[derive(Debug)]
pub struct KernelSession<I: Ioctl> {
    sys: Arc<I>,
    /// Taken (once) by `Drop`, to hand it to [`Ioctl::close`].
    fd: ManuallyDrop<OwnedFd>,
    info: DmInfo,
    cmds: DmCommands,
}

impl<I: Ioctl> Drop for KernelSession<I> {
    fn drop(&mut self) {
        // SAFETY: `fd` is taken only here, and `self` is not used after `drop`.
        let fd = unsafe { ManuallyDrop::take(&mut self.fd) };
        self.sys.close(fd);
    }
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
        let mut arg = remio_abi::Ioeventfd {
            fd,
            flags,
            addr: spec.addr,
            len: spec.len,
            reserved: 0,
            data: spec.datamatch.unwrap_or(0),
        };
        call(
            &*self.sys,
            self.fd.as_fd(),
            self.cmds.ioeventfd,
            arg.as_mut_slice(),
            "IOEVENTFD",
        )
        .map(drop)
    }

    fn irqfd(&self, efd: &EventFd, deassign: bool) -> Result<()> {
        let mut arg = remio_abi::Irqfd {
            fd: efd.as_raw_fd(),
            flags: if deassign { BAO_IRQFD_FLAG_DEASSIGN } else { 0 },
        };
        call(
            &*self.sys,
            self.fd.as_fd(),
            self.cmds.irqfd,
            arg.as_mut_slice(),
            "IRQFD",
        )
        .map(drop)
    }
}

impl<I: Ioctl> DmSession for KernelSession<I> {
    fn info(&self) -> DmInfo {
        self.info
    }

    /// ATTACH. The driver's errors are translated: EPERM (the control client is being
    /// destroyed), ENOENT (no control client) and ENODEV (no DM behind the fd) mean the DM is
    /// going away and become [`ApiError::ShuttingDown`]; EFAULT, which the posted driver
    /// returns when a signal interrupted the wait, stays an I/O error for which
    /// [`ApiError::is_transient`] holds.
    fn attach(&self) -> Result<VirtioRequest> {
        let mut req = VirtioRequest {
            dm_id: u64::from(self.info.id),
            ..Default::default()
        };
        match call(
            &*self.sys,
            self.fd.as_fd(),
            self.cmds.attach,
            req.as_mut_slice(),
            "IO_CLIENT_ATTACH",
        ) {
            Ok(_) => {}
            Err(ApiError::PermissionDenied(_) | ApiError::NotFound(_)) => {
                return Err(ApiError::ShuttingDown)
            }
            Err(ApiError::Io(e)) if e.raw_os_error() == Some(libc::ENODEV) => {
                return Err(ApiError::ShuttingDown)
            }
            Err(e) => return Err(e),
        }
        Ok(req)
    }

    fn complete(&self, req: &VirtioRequest) -> Result<()> {
        // IO_REQUEST_COMPLETE is _IOW: the driver only reads it, but the trait lends bytes
        // mutably (one signature for every ioctl), so complete a copy.
        let mut arg = *req;
        call(
            &*self.sys,
            self.fd.as_fd(),
            self.cmds.complete,
            arg.as_mut_slice(),
            "IO_REQUEST_COMPLETE",
        )
        .map(drop)
    }

    fn assign_ioeventfd(&self, fd: &EventFd, spec: IoeventfdSpec) -> Result<()> {
        self.ioeventfd(fd, spec, false)
    }

    /// IOEVENTFD with DEASSIGN. On the posted driver this removes the registration and then
    /// registers the same eventfd again (a defect): device models keep their ioeventfds for
    /// the device's lifetime instead of deassigning them.
    fn deassign_ioeventfd(&self, fd: &EventFd, spec: IoeventfdSpec) -> Result<()> {
        self.ioeventfd(fd, spec, true)
    }

    fn assign_irqfd(&self, fd: &EventFd) -> Result<()> {
        self.irqfd(fd, false)
    }

    fn deassign_irqfd(&self, fd: &EventFd) -> Result<()> {
        self.irqfd(fd, true)
    }

    fn map_shmem_at(&self, len: u64, guest_base: u64) -> Result<GuestMemoryMmap> {
        crate::check_shmem_len(len, self.info.shmem_size)?;
        self.sys.mmap(self.fd.as_fd(), len, guest_base)
    }

    fn driver_traits(&self) -> DriverTraits {
        DriverTraits::C_DRIVER
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remio_abi::uapi::WireStruct;
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
            if cmd == BAO_IOCTL_CREATE_DM {
                let raw = std::os::fd::IntoRawFd::into_raw_fd(owned_eventfd()?);
                *self.dm_fd.lock().unwrap() = Some(raw);
                return Ok(raw);
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

    #[test]
    fn later_revision_creates_the_dm_with_0x4018a700_and_takes_the_fd_from_the_return_value() {
        let rec = Arc::new(Recorder::default());
        let desc = DmInfo {
            id: 2,
            shmem_addr: 0x8000_0000,
            shmem_size: 0x40_0000,
            irq: 49,
        };
        let api = KernelApi::with_ioctl_later(rec.clone(), Path::new("/dev/bao"), &[desc]).unwrap();
        let dev_fd = api.dev.as_raw_fd();

        let session = api.open(2).unwrap();

        let calls = rec.calls.lock().unwrap().clone();
        assert_eq!(calls[0], Call::Open("/dev/bao".into()));
        let mut expected = 0x8000_0000u64.to_le_bytes().to_vec();
        expected.extend_from_slice(&0x40_0000u64.to_le_bytes());
        expected.extend_from_slice(&2u32.to_le_bytes());
        expected.extend_from_slice(&49u32.to_le_bytes());
        assert_eq!(
            calls[1],
            Call::Ioctl {
                fd: dev_fd,
                cmd: 0x4018_A700,
                arg: expected
            }
        );
        assert_eq!(session.info(), desc);
        // The per-DM calls use the 0xA7 numbers on the fd CREATE_DM returned.
        let dm_fd = rec.dm_fd.lock().unwrap().unwrap();
        session.complete(&VirtioRequest::default()).unwrap();
        assert!(matches!(
            last(&rec),
            Call::Ioctl { fd, cmd: 0x4030_A703, .. } if fd == dm_fd
        ));
        assert_eq!(api.revision(), Revision::Later);
    }

    #[test]
    fn later_revision_without_a_description_names_what_the_config_must_give() {
        let rec = Arc::new(Recorder::default());
        let api = KernelApi::with_ioctl_later(rec.clone(), Path::new("/dev/bao"), &[]).unwrap();

        let err = api.open(5).err().unwrap();

        assert!(err.to_string().contains("shmem_size"), "{err}");
        assert_eq!(
            rec.calls.lock().unwrap().len(),
            1,
            "no CREATE_DM was issued"
        );
    }

    #[test]
    fn attach_eperm_means_the_dm_is_going_away_and_efault_is_transient() {
        let (rec, _api, s, _) = setup();
        *rec.errno.lock().unwrap() = Some(libc::EPERM);
        assert!(matches!(s.attach(), Err(ApiError::ShuttingDown)));
        *rec.errno.lock().unwrap() = Some(libc::EFAULT);
        let e = s.attach().unwrap_err();
        assert!(e.is_transient(), "{e}");
        assert!(!e.ends_session());
    }

    #[test]
    fn sessions_on_the_driver_say_so() {
        let (_rec, _api, s, _) = setup();
        assert_eq!(s.driver_traits(), DriverTraits::C_DRIVER);
    }

    // ---- the driver double: the posted driver's behaviour, seen through KernelApi ----

    use crate::driver_double::{DriverDouble, WriteRoute};

    fn driver(n: usize) -> (Arc<DriverDouble>, KernelApi<Arc<DriverDouble>>) {
        let dms: Vec<DmInfo> = (0..n)
            .map(|_| DmInfo {
                id: 0,
                shmem_addr: 0x5000_0000,
                shmem_size: 0x1_0000,
                irq: 52,
            })
            .collect();
        let drv = DriverDouble::new(&dms).unwrap();
        let api = KernelApi::with_ioctl(drv.clone(), Path::new(DISPATCHER_PATH)).unwrap();
        (drv, api)
    }

    fn notify(queue: u64) -> IoeventfdSpec {
        IoeventfdSpec {
            addr: 0xa000_0050,
            len: 4,
            datamatch: Some(queue),
        }
    }

    #[test]
    fn driver_deassign_assigns_the_eventfd_again() {
        let (drv, api) = driver(1);
        let s = api.open(0).unwrap();
        let old = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        s.assign_ioeventfd(&old, notify(0)).unwrap();

        s.deassign_ioeventfd(&old, notify(0)).unwrap();
        let new = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        s.assign_ioeventfd(&new, notify(0)).unwrap();

        // Both are registered and the old one, first in the list, takes the notify.
        assert_eq!(drv.ioeventfds(0).len(), 2);
        assert_eq!(drv.trap_write(0, 0xa000_0050, 4, 0), WriteRoute::Signalled);
        assert_eq!(old.read().unwrap(), 1);
        assert!(new.read().is_err(), "the new eventfd is never signalled");
    }

    #[test]
    fn driver_drops_a_write_in_an_ioeventfd_range_that_matches_nothing() {
        let (drv, api) = driver(1);
        let s = api.open(0).unwrap();
        let q0 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        s.assign_ioeventfd(&q0, notify(0)).unwrap();

        assert_eq!(drv.trap_write(0, 0xa000_0050, 4, 1), WriteRoute::Dropped);
        assert!(q0.read().is_err());
        assert!(matches!(
            drv.trap_write(0, 0xa000_0070, 4, 1),
            WriteRoute::Control(_)
        ));
    }

    #[test]
    fn driver_destroys_the_dm_when_its_session_ends() {
        let (drv, api) = driver(2);
        let s0 = api.open(0).unwrap();
        let _s1 = api.open(1).unwrap();

        drop(s0);

        assert!(!drv.is_alive(0));
        assert!(drv.is_alive(1));
        assert!(matches!(api.open(0), Err(ApiError::NoSuchDm(0))));
    }

    #[test]
    fn driver_attach_fails_with_efault_when_a_signal_interrupts_it() {
        let (drv, api) = driver(1);
        let s = api.open(0).unwrap();
        drv.signal_attach(0);

        let e = s.attach().unwrap_err();

        assert_eq!(e.errno(), libc::EFAULT);
        assert!(e.is_transient());
        // The next ATTACH gets the next request.
        let Some(id) = drv.trap_read(0, 0xa000_0000, 4) else {
            panic!("a read outside any ioeventfd range goes to the control client");
        };
        assert_eq!(s.attach().unwrap().request_id, id);
    }
}
