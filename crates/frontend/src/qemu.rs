//! The QEMU bridge: makes an unmodified Linux guest under QEMU TCG a frontend of the
//! hypervisor model (`spec/qemu-frontend.md`).
//!
//! - [`wire`]: the MPQEMU protocol of `x-pci-proxy-dev`.
//! - [`pci`]: the proxy's config space (ids and window count from `guest/remio-ids.h`).
//! - [`remote`]: the remote: BAR access at offset `o` → window `o / 0x200` → one trapped
//!   access on that Remote I/O device ([`MmioTarget`]).
//! - [`ivshmem`]: the ivshmem-doorbell server; vector `i` is window `i`'s interrupt.
//! - [`ram`]: guest RAM as a memfd that is also the Remote I/O shared memory.
//! - [`launch`]: the QEMU command line.
//! - [`failover`]: a window whose device model died answers as a failed device.
//! - [`hcwindow`]: a backend VM's hypercall window (`remio run --dispatcher c-driver`).
//! - [`backend`]: the backend VM of `--dispatcher c-driver`: its QEMU command line, its
//!   interrupts and shared memory.
//!
//! [`Bridge`] ties them together: start it (socket served, ivshmem listening) *before* QEMU,
//! then spawn QEMU from [`Bridge::qemu_command`].

pub mod backend;
pub mod failover;
pub mod hcwindow;
mod hyp;
pub mod ivshmem;
pub mod launch;
pub mod pci;
pub mod ram;
pub mod remote;
#[cfg(test)]
mod test_hyp;
pub mod wire;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub use backend::{BackendHost, BackendOptions};
pub use failover::{DeviceFailover, Failover, OpaqueDevice};
pub use hcwindow::{HcWindow, HcWindowServer};
pub use ivshmem::{Interrupt, IvshmemServer};
pub use launch::QemuOptions;
pub use ram::GuestRam;
pub use remote::{MmioTarget, Remote, RemoteStats, TargetError};

/// Errors of [`Bridge`].
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The remote could not be set up.
    #[error(transparent)]
    Remote(#[from] remote::RemoteError),
    /// The ivshmem server could not be started.
    #[error(transparent)]
    Ivshmem(#[from] ivshmem::IvshmemError),
    /// The RAM file could not be inspected.
    #[error(transparent)]
    Ram(#[from] ram::RamError),
    /// The RAM file could not be mapped (for [`Failover`]).
    #[error("mapping guest RAM: {0}")]
    Map(String),
    /// Creating the socket pair or the thread failed.
    #[error("bridge: {0}")]
    Io(#[from] std::io::Error),
}

/// Maps the guest RAM file (shared) at guest-physical 0.
fn map_ram(ram: &GuestRam) -> Result<vm_memory::GuestMemoryMmap, BridgeError> {
    use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
    let size = usize::try_from(ram.size()).map_err(|e| BridgeError::Map(e.to_string()))?;
    let region = MmapRegion::from_file(FileOffset::new(ram.file().try_clone()?, 0), size)
        .map_err(|e| BridgeError::Map(e.to_string()))?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| BridgeError::Map("RAM overflows the address space".into()))?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|e| BridgeError::Map(e.to_string()))
}

/// A running bridge: the remote thread serving QEMU's proxy socket and the ivshmem server.
#[derive(Debug)]
pub struct Bridge {
    qemu_end: OwnedFd,
    ram_fd: OwnedFd,
    ram_size: u64,
    ivshmem: IvshmemServer,
    stats: Arc<RemoteStats>,
    failover: Arc<Failover>,
    stall_guards: remote::StallGuards,
    remote: Option<JoinHandle<Result<(), remote::RemoteError>>>,
}

impl Bridge {
    /// Starts serving: window `i` of the proxy's BAR0 forwards to the Remote I/O device whose
    /// frontend MMIO window starts at `windows[i]` through `target`; the ivshmem server
    /// listens at `ivshmem_path` with one vector per window. Accesses pass through a
    /// [`Failover`] ([`Bridge::fail_device`]) with `device(i)` as window `i`'s
    /// [`DeviceFailover`]. `access_timeout` is the hypervisor's: a window whose access took
    /// that long stops delaying the others ([`Remote::with_access_timeout`]).
    pub fn start(
        windows: Vec<u64>,
        target: Arc<dyn MmioTarget>,
        ram: &GuestRam,
        ivshmem_path: &Path,
        device: &dyn Fn(usize) -> Box<dyn DeviceFailover>,
        access_timeout: Option<Duration>,
    ) -> Result<Self, BridgeError> {
        let n = windows.len();
        let ivshmem = IvshmemServer::start(ivshmem_path, n)?;
        let raise = (0..n)
            .map(|i| {
                let line = ivshmem.interrupt(i);
                Box::new(move || {
                    if let Some(Err(e)) = line.as_ref().map(Interrupt::raise) {
                        log::warn!("qemu bridge: raising a failed device's interrupt: {e}");
                    }
                }) as failover::RaiseIrq
            })
            .collect();
        let failover = Arc::new(Failover::new(
            target,
            windows.clone(),
            Some(map_ram(ram)?),
            raise,
            (0..n).map(device).collect(),
        ));
        let remote = Remote::new(
            windows,
            Arc::clone(&failover) as Arc<dyn MmioTarget>,
            Some(ram.identity()?),
        )?
        .with_access_timeout(access_timeout);
        let stats = remote.stats();
        let stall_guards = remote.stall_guards();
        let (ours, theirs) = UnixStream::pair()?;
        let thread = std::thread::Builder::new()
            .name("remio-mpqemu".into())
            .spawn(move || {
                let r = remote.serve(ours);
                if let Err(e) = &r {
                    log::error!("qemu remote stopped: {e}");
                }
                r
            })?;
        Ok(Self {
            qemu_end: theirs.into(),
            ram_fd: ram.file().try_clone()?.into(),
            ram_size: ram.size(),
            ivshmem,
            stats,
            failover,
            stall_guards,
            remote: Some(thread),
        })
    }

    /// Window `i`'s device model is dead: the window becomes a failed device whose requests
    /// complete with errors ([`Failover`]). Idempotent.
    pub fn fail_device(&self, i: usize) -> bool {
        // First: an access that timed out while the device model was dying must not hold the
        // window stuck and keep the guest's next reads from the failover.
        self.stall_guards.exempt(i);
        self.failover.fail(i)
    }

    /// Completes the requests queued on failed windows since the last call (call it
    /// periodically once a device failed: a request the driver queued without a notify is
    /// not left waiting).
    pub fn sweep_failed(&self) {
        self.failover.sweep();
    }

    /// Window `i`'s interrupt (ivshmem MSI-X vector `i`).
    pub fn interrupt(&self, i: usize) -> Option<Interrupt> {
        self.ivshmem.interrupt(i)
    }

    /// The remote's counters.
    pub fn stats(&self) -> Arc<RemoteStats> {
        Arc::clone(&self.stats)
    }

    /// What QEMU needs from the bridge.
    pub fn ends(&self) -> launch::BridgeEnds {
        launch::BridgeEnds {
            proxy_fd: self.qemu_end.as_raw_fd(),
            ram_fd: self.ram_fd.as_raw_fd(),
            ram_size: self.ram_size,
            ivshmem_path: self.ivshmem.path().to_owned(),
            vectors: self.ivshmem.vectors(),
        }
    }

    /// The QEMU command for `opts` wired to this bridge.
    pub fn qemu_command(&self, opts: &QemuOptions) -> Command {
        launch::command(opts, &self.ends())
    }

    /// Whether the remote thread has stopped (QEMU closed the socket, or an error).
    pub fn remote_finished(&self) -> bool {
        self.remote.as_ref().is_none_or(JoinHandle::is_finished)
    }
}
