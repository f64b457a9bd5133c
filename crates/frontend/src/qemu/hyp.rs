//! Wiring the bridge to the hypervisor model: a [`FrontendVm`] is the [`MmioTarget`], and each
//! Remote I/O device's frontend interrupt (NOTIFY) raises its ivshmem vector.

use std::path::Path;
use std::sync::Arc;

use remio_hyp::FrontendVm;

use super::remote::{MmioTarget, TargetError};
use super::{Bridge, BridgeError, DeviceFailover, GuestRam};

impl MmioTarget for FrontendVm {
    fn read(&self, addr: u64, width: u8) -> Result<u64, TargetError> {
        FrontendVm::read(self, addr, width).map_err(Into::into)
    }

    fn write(&self, addr: u64, width: u8, value: u64) -> Result<(), TargetError> {
        FrontendVm::write(self, addr, width, value).map_err(Into::into)
    }
}

impl Bridge {
    /// Starts a bridge for every frontend device of `vm`, in index order: window `i` is
    /// device `i`'s MMIO window, and device `i`'s NOTIFY raises ivshmem vector `i`;
    /// `device(i)` answers for device `i` once it failed ([`Bridge::start`]).
    pub fn for_frontend(
        vm: &FrontendVm,
        ram: &GuestRam,
        ivshmem_path: &Path,
        device: &dyn Fn(usize) -> Box<dyn DeviceFailover>,
    ) -> Result<Self, BridgeError> {
        let devices = vm.devices();
        let windows = devices.iter().map(|d| d.mmio_base).collect();
        for d in &devices {
            if d.mmio_size < super::pci::WINDOW_SIZE {
                log::warn!(
                    "qemu bridge: device {} has a {:#x}-byte window, smaller than the guest's 0x200",
                    d.index,
                    d.mmio_size
                );
            }
        }
        let bridge = Bridge::start(
            windows,
            Arc::new(vm.clone()),
            ram,
            ivshmem_path,
            device,
            vm.hypervisor().timeout(),
        )?;
        for d in &devices {
            let Some(line) = bridge.interrupt(d.index) else {
                continue;
            };
            let sink = Arc::new(move || {
                if let Err(e) = line.raise() {
                    remio_ratelimit::warn_rl!("qemu bridge: raising an interrupt failed: {e}");
                }
            });
            vm.set_interrupt_sink(d.index, sink)
                .map_err(|e| BridgeError::Io(std::io::Error::other(e)))?;
        }
        Ok(bridge)
    }
}
