//! The backend VM of `remio run --dispatcher c-driver` ("Bao in a box", `docs/c-driver.md`):
//! a second QEMU TCG guest running the posted C I/O dispatcher driver, whose hypervisor is the
//! platform process.
//!
//! What the platform gives it ([`BackendHost::start`], before its QEMU starts):
//! - the **hypercall window** ([`super::hcwindow`]): `x-pci-proxy-dev` on a socket pair, each
//!   CALL executed on the hypervisor model's [`BackendVm`];
//! - **interrupts**: an ivshmem-doorbell server whose vector `i` is the hypervisor model's
//!   backend-interrupt eventfd of device `i` ([`BackendVm::irq_eventfd`]), so a queued request
//!   raises MSI-X vector `i` in the backend VM with no thread in between;
//! - **shared memory**: the frontend's RAM file as an `ivshmem-plain` BAR (frontend
//!   guest-physical 0 at BAR offset 0). A PCI BAR's size is a power of two, so the frontend's
//!   RAM must be one ([`BackendError::RamNotPowerOfTwo`]).
//!
//! [`args`] is the QEMU command line as a pure function; [`BackendHost::command`] wraps it in a
//! `Command` that inherits the two descriptors QEMU opens by number.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use remio_hyp::BackendVm;

use super::hcwindow::{HcWindow, HcWindowError, HcWindowServer, HcWindowStats};
use super::ivshmem::{IvshmemError, IvshmemServer};
use super::launch;
use super::ram::GuestRam;

/// The backend VM's RAM unless told otherwise (MiB).
pub const DEFAULT_RAM_MIB: u64 = 256;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The frontend's RAM cannot be a PCI BAR.
    #[error(
        "the frontend's RAM ({0} MiB) is shared with the backend VM as a PCI BAR, whose size \
         must be a power of two: use --memory 128, 256, 512, 1024 or 2048"
    )]
    RamNotPowerOfTwo(u64),
    /// The backend VM has no Remote I/O device.
    #[error("the backend VM has no Remote I/O device")]
    NoDevices,
    /// A device's backend interrupt has no eventfd.
    #[error("backend interrupt {irq} of DM {dm_id}: {source}")]
    Irq {
        /// The DM.
        dm_id: usize,
        /// Its backend interrupt.
        irq: u32,
        /// Why.
        #[source]
        source: remio_hyp::IrqFdError,
    },
    /// The hypercall window could not start.
    #[error(transparent)]
    Window(#[from] HcWindowError),
    /// The ivshmem server could not start.
    #[error(transparent)]
    Ivshmem(#[from] IvshmemError),
    /// Duplicating the RAM file failed.
    #[error("backend VM: {0}")]
    Io(#[from] std::io::Error),
}

/// What to boot in the backend VM.
#[derive(Clone, Debug)]
pub struct BackendOptions {
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The kernel (bzImage; the frontend's).
    pub kernel: PathBuf,
    /// The initramfs (the backend initramfs with the overlay appended).
    pub initrd: PathBuf,
    /// Extra kernel command-line words after `console=ttyS0 panic=-1` and the TSC rate.
    pub cmdline_extra: String,
    /// The raw image the backend serves as the frontend's disk (`/dev/vda` in the backend).
    pub disk: Option<PathBuf>,
    /// The backend VM's own RAM in MiB.
    pub ram_mib: u64,
}

/// The backend VM's ports to the host besides its serial console: what the device model
/// inside it serves for the frontend reaches the host through these.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendPorts {
    /// The frontend's virtio console: the backend's second serial port (`/dev/ttyS1` inside,
    /// [`CONSOLE_TTY`]), which QEMU serves as a UNIX socket listening at this path (one client
    /// at a time, like `remio dm`'s socket console; output with no client is dropped).
    pub console_socket: Option<PathBuf>,
    /// The frontend's virtio-net: a virtio-net-pci of the backend on this existing host TAP
    /// (`eth0` inside; the backend bridges it with the device model's TAP).
    pub net_tap: Option<String>,
}

/// The backend's serial port that carries the frontend's virtio console ([`BackendPorts`]).
pub const CONSOLE_TTY: &str = "ttyS1";
/// The MAC of the backend's own NIC on the host TAP (locally administered; the frontend's
/// virtio-net has its own).
pub const NET_MAC: &str = "52:54:00:4e:b0:01";

/// The descriptors and paths of a [`BackendHost`] that QEMU needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendEnds {
    /// QEMU's end of the hypercall window's socket (inherited at the same number).
    pub window_fd: RawFd,
    /// The frontend's RAM file (inherited at the same number).
    pub frontend_ram_fd: RawFd,
    /// The frontend's RAM size in bytes (a power of two).
    pub frontend_ram_size: u64,
    /// The backend ivshmem-doorbell server's socket.
    pub ivshmem_path: PathBuf,
    /// Number of doorbell vectors (= Remote I/O devices).
    pub vectors: usize,
}

/// `path` as a QEMU option value: commas doubled.
fn qemu_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// The backend QEMU's arguments (without the binary): q35 under TCG, one vCPU, the serial
/// console on stdio (the caller points stdout at a file), the frontend's RAM as an
/// ivshmem-plain BAR, the hypercall window, the doorbell and the disk as virtio-blk-pci.
pub fn args(opts: &BackendOptions, ends: &BackendEnds) -> Result<Vec<OsString>, BackendError> {
    args_with_tsc(opts, ends, launch::host_tsc_khz())
}

/// [`args`] plus the host ports of `ports`: the console's serial port on a listening UNIX
/// socket (`-serial` after the console's, so `ttyS1`) and a virtio-net-pci on the host TAP.
pub fn args_with_ports(
    opts: &BackendOptions,
    ports: &BackendPorts,
    ends: &BackendEnds,
) -> Result<Vec<OsString>, BackendError> {
    let mut a = args(opts, ends)?;
    a.extend(port_args(ports).into_iter().map(OsString::from));
    Ok(a)
}

fn port_args(ports: &BackendPorts) -> Vec<String> {
    let mut a = Vec::new();
    if let Some(sock) = &ports.console_socket {
        a.extend([
            "-chardev".to_owned(),
            format!(
                "socket,id=remio-con,path={},server=on,wait=off",
                qemu_path(sock)
            ),
            "-serial".to_owned(),
            "chardev:remio-con".to_owned(),
        ]);
    }
    if let Some(tap) = &ports.net_tap {
        a.extend([
            "-netdev".to_owned(),
            format!(
                "tap,id=remio-net,ifname={},script=no,downscript=no",
                tap.replace(',', ",,")
            ),
            "-device".to_owned(),
            format!("virtio-net-pci,netdev=remio-net,mac={NET_MAC}"),
        ]);
    }
    a
}

fn args_with_tsc(
    opts: &BackendOptions,
    ends: &BackendEnds,
    tsc_khz: Option<u64>,
) -> Result<Vec<OsString>, BackendError> {
    if !ends.frontend_ram_size.is_power_of_two() {
        return Err(BackendError::RamNotPowerOfTwo(ends.frontend_ram_size >> 20));
    }
    if ends.vectors == 0 {
        return Err(BackendError::NoDevices);
    }
    // The backend's own RAM is a shared memfd too: the proxy sends every RAM region's fd in
    // SYNC_SYSMEM, and a region without one makes each of those messages fail (EBADF).
    let mut a = launch::guest_args_with_tsc(
        "q35,memory-backend=bmem",
        opts.ram_mib,
        &opts.kernel,
        &opts.initrd,
        &opts.cmdline_extra,
        tsc_khz,
    );
    let mut more = vec![
        "-object".to_owned(),
        format!(
            "memory-backend-memfd,id=bmem,size={}M,share=on",
            opts.ram_mib
        ),
        "-object".to_owned(),
        format!(
            "memory-backend-file,id=fe,mem-path=/proc/self/fd/{},share=on,size={}",
            ends.frontend_ram_fd, ends.frontend_ram_size
        ),
        "-device".to_owned(),
        "ivshmem-plain,memdev=fe".to_owned(),
        "-device".to_owned(),
        format!("x-pci-proxy-dev,id=remio-hc,fd={}", ends.window_fd),
        "-chardev".to_owned(),
        format!("socket,id=remio-biv,path={}", qemu_path(&ends.ivshmem_path)),
        "-device".to_owned(),
        format!(
            "ivshmem-doorbell,chardev=remio-biv,vectors={}",
            ends.vectors
        ),
    ];
    if let Some(disk) = &opts.disk {
        more.extend([
            "-drive".to_owned(),
            format!("file={},if=none,id=d0,format=raw", qemu_path(disk)),
            "-device".to_owned(),
            "virtio-blk-pci,drive=d0".to_owned(),
        ]);
    }
    a.extend(more.into_iter().map(OsString::from));
    Ok(a)
}

/// The platform's side of a backend VM: the hypercall window and the doorbell server, both
/// serving before QEMU starts, and a handle on the frontend's RAM file.
#[derive(Debug)]
pub struct BackendHost {
    window: HcWindowServer,
    ivshmem: IvshmemServer,
    ram_fd: OwnedFd,
    ram_size: u64,
}

impl BackendHost {
    /// Serves backend VM `vm`: its hypercall window, and a doorbell at `ivshmem_path` whose
    /// vector `i` is the backend interrupt of its device `i`. `frontend_ram` is what the
    /// backend sees as shared memory.
    pub fn start(
        vm: &BackendVm,
        frontend_ram: &GuestRam,
        ivshmem_path: &Path,
    ) -> Result<Self, BackendError> {
        if !frontend_ram.size().is_power_of_two() {
            return Err(BackendError::RamNotPowerOfTwo(frontend_ram.size() >> 20));
        }
        let devices = vm.devices();
        if devices.is_empty() {
            return Err(BackendError::NoDevices);
        }
        let eventfds = devices
            .iter()
            .map(|d| {
                vm.irq_eventfd(d.irq).map_err(|source| BackendError::Irq {
                    dm_id: d.dm_id,
                    irq: d.irq,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let ivshmem = IvshmemServer::with_eventfds(ivshmem_path, eventfds)?;
        let window = HcWindowServer::start(HcWindow::for_backend(vm)?)?;
        Ok(Self {
            window,
            ivshmem,
            ram_fd: frontend_ram.file().try_clone()?.into(),
            ram_size: frontend_ram.size(),
        })
    }

    /// What QEMU needs.
    pub fn ends(&self) -> BackendEnds {
        BackendEnds {
            window_fd: self.window.qemu_fd(),
            frontend_ram_fd: self.ram_fd.as_raw_fd(),
            frontend_ram_size: self.ram_size,
            ivshmem_path: self.ivshmem.path().to_owned(),
            vectors: self.ivshmem.vectors(),
        }
    }

    /// The hypercall window's counters.
    pub fn window_stats(&self) -> Arc<HcWindowStats> {
        self.window.stats()
    }

    /// Whether the hypercall window stopped (the backend's QEMU closed it, or an error).
    pub fn window_finished(&self) -> bool {
        self.window.finished()
    }

    /// The backend QEMU's command, inheriting the window socket and the RAM file, killed if
    /// this process dies. The caller sets stdio (stdout is the serial console).
    pub fn command(&self, opts: &BackendOptions) -> Result<Command, BackendError> {
        self.command_with_ports(opts, &BackendPorts::default())
    }

    /// [`Self::command`] with the host ports of `ports` ([`args_with_ports`]).
    pub fn command_with_ports(
        &self,
        opts: &BackendOptions,
        ports: &BackendPorts,
    ) -> Result<Command, BackendError> {
        let ends = self.ends();
        let mut cmd = Command::new(&opts.qemu);
        cmd.args(args_with_ports(opts, ports, &ends)?);
        let keep = [ends.window_fd, ends.frontend_ram_fd];
        // SAFETY: the closure only calls prctl and fcntl, which are async-signal-safe, on
        // descriptors open in the parent at fork time (this host owns them).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for fd in keep {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        Ok(cmd)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use remio_hyp::{Hypervisor, ShmemConfig};

    use super::*;

    fn opts() -> BackendOptions {
        BackendOptions {
            qemu: "qemu-system-x86_64".into(),
            kernel: "/k".into(),
            initrd: "/run/b.cpio".into(),
            cmdline_extra: "remio.backend=1".into(),
            disk: Some("/imgs/a,b.img".into()),
            ram_mib: 256,
        }
    }

    fn ends() -> BackendEnds {
        BackendEnds {
            window_fd: 11,
            frontend_ram_fd: 12,
            frontend_ram_size: 256 << 20,
            ivshmem_path: "/tmp/run/biv.sock".into(),
            vectors: 3,
        }
    }

    fn strings(a: Vec<OsString>) -> Vec<String> {
        a.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    #[test]
    fn command_line_wires_window_doorbell_frontend_ram_and_disk() {
        let a = strings(args_with_tsc(&opts(), &ends(), Some(2_000_000)).unwrap());
        let has = |s: &str| a.iter().any(|x| x == s);
        assert!(has("q35,memory-backend=bmem"));
        assert!(has("memory-backend-memfd,id=bmem,size=256M,share=on"));
        assert!(has("256M"));
        assert!(has("1"), "one vCPU");
        assert!(has(&format!(
            "memory-backend-file,id=fe,mem-path=/proc/self/fd/12,share=on,size={}",
            256u64 << 20
        )));
        assert!(has("ivshmem-plain,memdev=fe"));
        assert!(has("x-pci-proxy-dev,id=remio-hc,fd=11"));
        assert!(has("socket,id=remio-biv,path=/tmp/run/biv.sock"));
        assert!(has("ivshmem-doorbell,chardev=remio-biv,vectors=3"));
        assert!(has("file=/imgs/a,,b.img,if=none,id=d0,format=raw"));
        assert!(has("virtio-blk-pci,drive=d0"));
        assert!(has("/run/b.cpio"));
        assert!(has(
            "console=ttyS0 panic=-1 tsc_early_khz=2000000 remio.backend=1"
        ));
        for flag in ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"] {
            assert!(has(flag), "{flag}");
        }
        let tcg = a.iter().position(|x| x == "-accel").unwrap();
        assert_eq!(a[tcg + 1], "tcg");
    }

    #[test]
    fn frontend_ram_that_is_not_a_power_of_two_is_refused_with_the_sizes_that_work() {
        let e = BackendEnds {
            frontend_ram_size: 384 << 20,
            ..ends()
        };
        let err = args_with_tsc(&opts(), &e, None).unwrap_err();
        assert!(matches!(err, BackendError::RamNotPowerOfTwo(384)));
        assert!(err.to_string().contains("--memory 128, 256"));
    }

    #[test]
    fn without_a_disk_there_is_no_drive() {
        let o = BackendOptions {
            disk: None,
            ..opts()
        };
        let a = strings(args_with_tsc(&o, &ends(), None).unwrap());
        assert!(!a.iter().any(|x| x == "-drive"));
    }

    #[test]
    fn without_ports_the_backend_has_one_serial_port_and_no_nic() {
        let a = strings(args_with_ports(&opts(), &BackendPorts::default(), &ends()).unwrap());
        assert_eq!(a.iter().filter(|x| *x == "-serial").count(), 1);
        assert!(!a.iter().any(|x| x == "-netdev"));
        assert!(!a.iter().any(|x| x.starts_with("socket,id=remio-con")));
    }

    #[test]
    fn the_console_port_is_a_second_serial_port_on_a_listening_socket() {
        let ports = BackendPorts {
            console_socket: Some("/run/x,y/con.sock".into()),
            net_tap: None,
        };
        let a = strings(args_with_ports(&opts(), &ports, &ends()).unwrap());
        let serials: Vec<&String> = a
            .iter()
            .zip(a.iter().skip(1))
            .filter(|(f, _)| *f == "-serial")
            .map(|(_, v)| v)
            .collect();
        // ttyS0 stays the backend's console (stdio); ttyS1 is the frontend's console.
        assert_eq!(serials, ["stdio", "chardev:remio-con"]);
        assert!(a
            .iter()
            .any(|x| x == "socket,id=remio-con,path=/run/x,,y/con.sock,server=on,wait=off"));
    }

    #[test]
    fn the_net_port_is_a_virtio_net_pci_on_the_host_tap() {
        let ports = BackendPorts {
            console_socket: None,
            net_tap: Some("remio-42".into()),
        };
        let a = strings(args_with_ports(&opts(), &ports, &ends()).unwrap());
        assert!(a
            .iter()
            .any(|x| x == "tap,id=remio-net,ifname=remio-42,script=no,downscript=no"));
        assert!(a
            .iter()
            .any(|x| x == &format!("virtio-net-pci,netdev=remio-net,mac={NET_MAC}")));
        assert_eq!(a.iter().filter(|x| *x == "-serial").count(), 1);
    }

    fn hyp(n: u32, ram: &GuestRam) -> Arc<Hypervisor> {
        let shmem = ShmemConfig {
            id: 0,
            size: ram.size(),
            backing: Some(ram.file().try_clone().unwrap()),
        };
        crate::qemu::test_hyp::hypervisor(n, shmem, Duration::from_secs(2))
    }

    #[test]
    fn a_queued_request_signals_the_doorbell_vector_of_its_device() {
        use std::os::fd::{FromRawFd, IntoRawFd};
        use std::os::unix::net::UnixStream;
        use vmm_sys_util::eventfd::EventFd;
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;

        let ram = GuestRam::new(4 << 20).unwrap();
        let hyp = hyp(2, &ram);
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/remio-bk").unwrap();
        let host = BackendHost::start(
            &hyp.backend(2).unwrap(),
            &ram,
            &dir.as_path().join("b.sock"),
        )
        .unwrap();
        assert_eq!(host.ends().vectors, 2);
        assert_eq!(host.ends().frontend_ram_size, 4 << 20);
        // The backend QEMU connects to the doorbell: version, id, shm, then the vectors.
        let peer = UnixStream::connect(host.ends().ivshmem_path).unwrap();
        let mut vectors = Vec::new();
        for i in 0..5 {
            let mut b = [0u8; 8];
            let (_, f) = peer.recv_with_fd(&mut b).unwrap();
            if i >= 3 {
                // SAFETY: the received descriptor is ours; EventFd takes ownership.
                vectors.push(unsafe { EventFd::from_raw_fd(f.unwrap().into_raw_fd()) });
            }
        }
        // A frontend access on device 1 (nobody completes it: it times out after 2 s).
        let fe = hyp.frontend(1).unwrap();
        let t = std::thread::spawn(move || fe.read(0x1000_0200, 4));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while vectors[1].read().is_err() {
            assert!(std::time::Instant::now() < deadline, "vector 1 not raised");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(vectors[0].read().is_err(), "vector 0 must stay quiet");
        assert_eq!(t.join().unwrap().unwrap(), 0, "timed out, reads 0");
    }

    #[test]
    fn a_backend_host_refuses_frontend_ram_that_is_not_a_power_of_two() {
        let ram = GuestRam::new(6 << 20).unwrap();
        let hyp = hyp(1, &ram);
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/remio-bk").unwrap();
        let err = BackendHost::start(&hyp.backend(2).unwrap(), &ram, &dir.as_path().join("b"))
            .unwrap_err();
        assert!(matches!(err, BackendError::RamNotPowerOfTwo(6)));
    }
}
