//! The in-process frontend: a handle for tests and benchmarks that traps register accesses into
//! the hypervisor model from the calling thread (each calling thread is a vCPU), receives the
//! frontend interrupts, and sees the shared memory at its guest-physical addresses.
//!
//! The shared memory is mapped with vm-memory's `GuestMemoryMmap` (`MAP_SHARED` on the
//! region's file), so this module needs no `unsafe` and every access is bounds-checked by
//! guest-physical address.
//!
//! ```
//! use std::sync::Arc;
//! use remio_abi::{Hypercall, InterruptController, RemioArgs, RemioOp};
//! use remio_frontend::inprocess::InProcessFrontend;
//! use remio_hyp::{HypConfig, Hypervisor, RemioDeviceConfig, Role, ShmemConfig, VmConfig};
//!
//! let dev = |role, mmio_size, irq| RemioDeviceConfig {
//!     bind_key: 1, role, mmio_base: if mmio_size > 0 { 0xa000_0000 } else { 0 }, mmio_size,
//!     irq, shmem_id: 0, shmem_base: 0x5000_0000,
//! };
//! let hyp = Hypervisor::new(HypConfig {
//!     shmem: vec![ShmemConfig { id: 0, size: 0x1000, backing: None }],
//!     vms: vec![
//!         VmConfig { id: 1, remio_devices: vec![dev(Role::Frontend, 0x200, 40)] },
//!         VmConfig { id: 2, remio_devices: vec![dev(Role::Backend, 0, 52)] },
//!     ],
//!     slots: 2,
//!     timeout: None,
//! })
//! .unwrap();
//! let backend = hyp.backend(2).unwrap();
//! let b = backend.clone();
//! backend
//!     .request_irq(52, Arc::new(move || loop {
//!         let ask = b.remote_io(&RemioArgs { op: RemioOp::Ask as u64, ..Default::default() });
//!         if ask.status != 0 { break; }
//!         b.remote_io(&RemioArgs { op: ask.op, value: 0x7472_6976, request_id: ask.request_id, ..Default::default() });
//!     }))
//!     .unwrap();
//! let fe = InProcessFrontend::new(&hyp, 1).unwrap();
//! assert_eq!(fe.read32(0xa000_0000).unwrap(), 0x7472_6976);
//! fe.write_at(0x5000_0010, b"hello").unwrap();
//! ```

use std::sync::Arc;

use remio_hyp::{
    AccessError, Completion, FrontendDevice, FrontendVm, Hypervisor, RemioOp, SinkError,
};
use vm_memory::mmap::FromRangesError;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Errors of [`InProcessFrontend`].
#[derive(Debug, thiserror::Error)]
pub enum InProcessError {
    /// The VM does not exist or has no frontend device.
    #[error("VM {0} has no Remote I/O frontend device")]
    NoSuchVm(u32),
    /// A shared-memory region is larger than the address space of this process.
    #[error("shared memory {shmem_id} of {size:#x} bytes cannot be mapped in this process")]
    ShmemTooLarge {
        /// The region.
        shmem_id: u32,
        /// Its size.
        size: u64,
    },
    /// Mapping the shared memory failed (or two regions overlap in guest-physical space).
    #[error("cannot map the shared memory: {0}")]
    Map(#[source] FromRangesError),
    /// A register access was refused.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// An interrupt-sink call failed.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The buffer is not wholly inside this VM's shared memory.
    #[error("guest-physical range {gpa:#x}+{len:#x} is not inside the shared memory")]
    OutOfBounds {
        /// Start of the range.
        gpa: u64,
        /// Its length.
        len: usize,
    },
}

/// A frontend VM driven from the calling threads. Cheap to share across threads (`&self`
/// everywhere); every access stalls the calling thread as a trapped vCPU would be.
#[derive(Debug)]
pub struct InProcessFrontend {
    vm: FrontendVm,
    memory: GuestMemoryMmap,
}

impl InProcessFrontend {
    /// The frontend side of VM `vm_id`, with its shared memory mapped.
    pub fn new(hyp: &Arc<Hypervisor>, vm_id: u32) -> Result<Self, InProcessError> {
        let vm = hyp.frontend(vm_id).ok_or(InProcessError::NoSuchVm(vm_id))?;
        // One mapping per distinct (region, base); several devices may share one region.
        let mut ranges: Vec<(GuestAddress, usize, Option<FileOffset>)> = Vec::new();
        let mut seen: Vec<(u32, u64)> = Vec::new();
        for d in vm.devices() {
            if seen.contains(&(d.shmem_id, d.shmem_base)) {
                continue;
            }
            seen.push((d.shmem_id, d.shmem_base));
            let size =
                usize::try_from(d.shmem_size).map_err(|_| InProcessError::ShmemTooLarge {
                    shmem_id: d.shmem_id,
                    size: d.shmem_size,
                })?;
            ranges.push((
                GuestAddress(d.shmem_base),
                size,
                Some(FileOffset::from_arc(Arc::clone(&d.shmem), 0)),
            ));
        }
        ranges.sort_by_key(|r| r.0);
        let memory =
            GuestMemoryMmap::from_ranges_with_files(&ranges).map_err(InProcessError::Map)?;
        Ok(Self { vm, memory })
    }

    /// The underlying [`FrontendVm`].
    pub fn vm(&self) -> &FrontendVm {
        &self.vm
    }

    /// This VM's frontend devices.
    pub fn devices(&self) -> Vec<FrontendDevice> {
        self.vm.devices()
    }

    /// A trapped read (width 1, 2, 4 or 8); the value is returned whole. On timeout the
    /// hypervisor's documented value (0) is returned; use [`InProcessFrontend::access`] to tell.
    pub fn read(&self, addr: u64, width: u8) -> Result<u64, InProcessError> {
        Ok(self.vm.read(addr, width)?)
    }

    /// A trapped write of the full register value `value`.
    pub fn write(&self, addr: u64, width: u8, value: u64) -> Result<(), InProcessError> {
        Ok(self.vm.write(addr, width, value)?)
    }

    /// A trapped access with its full outcome (value and whether it timed out).
    pub fn access(
        &self,
        op: RemioOp,
        addr: u64,
        width: u8,
        value: u64,
    ) -> Result<Completion, InProcessError> {
        Ok(self.vm.access(op, addr, width, value)?)
    }

    /// 1-byte read.
    pub fn read8(&self, addr: u64) -> Result<u64, InProcessError> {
        self.read(addr, 1)
    }

    /// 2-byte read.
    pub fn read16(&self, addr: u64) -> Result<u64, InProcessError> {
        self.read(addr, 2)
    }

    /// 4-byte read.
    pub fn read32(&self, addr: u64) -> Result<u64, InProcessError> {
        self.read(addr, 4)
    }

    /// 8-byte read.
    pub fn read64(&self, addr: u64) -> Result<u64, InProcessError> {
        self.read(addr, 8)
    }

    /// 1-byte write.
    pub fn write8(&self, addr: u64, value: u64) -> Result<(), InProcessError> {
        self.write(addr, 1, value)
    }

    /// 2-byte write.
    pub fn write16(&self, addr: u64, value: u64) -> Result<(), InProcessError> {
        self.write(addr, 2, value)
    }

    /// 4-byte write.
    pub fn write32(&self, addr: u64, value: u64) -> Result<(), InProcessError> {
        self.write(addr, 4, value)
    }

    /// 8-byte write.
    pub fn write64(&self, addr: u64, value: u64) -> Result<(), InProcessError> {
        self.write(addr, 8, value)
    }

    /// Calls `callback` on each frontend interrupt (NOTIFY) of device `index`, on the thread
    /// that issued the NOTIFY. Replaces any previous callback.
    pub fn set_interrupt_callback(
        &self,
        index: usize,
        callback: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<(), InProcessError> {
        Ok(self.vm.set_interrupt_sink(index, callback)?)
    }

    /// An eventfd signalled on each frontend interrupt of device `index` (non-blocking).
    pub fn interrupt_eventfd(&self, index: usize) -> Result<EventFd, InProcessError> {
        Ok(self.vm.interrupt_eventfd(index)?)
    }

    /// The shared memory as guest memory, at its guest-physical addresses (e.g. for
    /// virtio-queue's driver-side helpers).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Reads `buf.len()` bytes of shared memory at guest-physical `gpa`.
    pub fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<(), InProcessError> {
        let len = buf.len();
        self.memory
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| InProcessError::OutOfBounds { gpa, len })
    }

    /// Writes `buf` to shared memory at guest-physical `gpa`.
    pub fn write_at(&self, gpa: u64, buf: &[u8]) -> Result<(), InProcessError> {
        self.memory
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|_| InProcessError::OutOfBounds {
                gpa,
                len: buf.len(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use remio_abi::{Hypercall, InterruptController, RemioArgs};
    use remio_hyp::{HypConfig, RemioDeviceConfig, Role, ShmemConfig, VmConfig};

    const MMIO: u64 = 0xa000_0000;
    const SHMEM: u64 = 0x5000_0000;

    fn hyp() -> Arc<Hypervisor> {
        let dev = |role, mmio_size, irq| RemioDeviceConfig {
            bind_key: 3,
            role,
            mmio_base: if mmio_size > 0 { MMIO } else { 0 },
            mmio_size,
            irq,
            shmem_id: 0,
            shmem_base: SHMEM,
        };
        Hypervisor::new(HypConfig {
            shmem: vec![ShmemConfig {
                id: 0,
                size: 0x2000,
                backing: None,
            }],
            vms: vec![
                VmConfig {
                    id: 1,
                    remio_devices: vec![dev(Role::Frontend, 0x200, 40)],
                },
                VmConfig {
                    id: 2,
                    remio_devices: vec![dev(Role::Backend, 0, 52)],
                },
            ],
            slots: 2,
            timeout: None,
        })
        .unwrap()
    }

    #[test]
    fn accesses_reach_an_inline_backend_and_notify_reaches_the_callback() {
        let hyp = hyp();
        let backend = hyp.backend(2).unwrap();
        let b = backend.clone();
        // The backend answers reads with the address plus the width, and NOTIFYs on writes.
        backend
            .request_irq(
                52,
                Arc::new(move || loop {
                    let r = b.remote_io(&RemioArgs {
                        op: RemioOp::Ask as u64,
                        ..Default::default()
                    });
                    if r.status != 0 {
                        break;
                    }
                    if r.op == RemioOp::Write as u64 {
                        b.remote_io(&RemioArgs {
                            op: RemioOp::Notify as u64,
                            ..Default::default()
                        });
                    }
                    b.remote_io(&RemioArgs {
                        op: r.op,
                        value: r.addr + r.access_width,
                        request_id: r.request_id,
                        ..Default::default()
                    });
                }),
            )
            .unwrap();
        let fe = InProcessFrontend::new(&hyp, 1).unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = Arc::clone(&hits);
        fe.set_interrupt_callback(
            0,
            Arc::new(move || {
                h.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .unwrap();
        let efd = fe.interrupt_eventfd(0).unwrap();

        assert_eq!(fe.read8(MMIO + 1).unwrap(), MMIO + 2);
        assert_eq!(fe.read64(MMIO + 8).unwrap(), MMIO + 16);
        fe.write32(MMIO + 0x50, 0).unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert_eq!(efd.read().unwrap(), 1);
        assert!(matches!(
            fe.read32(MMIO + 0x200),
            Err(InProcessError::Access(AccessError::Unmapped { .. }))
        ));
    }

    #[test]
    fn shared_memory_is_seen_by_guest_physical_address_and_bounds_checked() {
        let hyp = hyp();
        let fe = InProcessFrontend::new(&hyp, 1).unwrap();
        let backend_view = hyp.backend(2).unwrap().devices()[0].shmem.clone();

        fe.write_at(SHMEM + 0x100, b"ring").unwrap();
        let mut buf = [0u8; 4];
        backend_view.read_exact_at(&mut buf, 0x100).unwrap();
        assert_eq!(&buf, b"ring");

        backend_view.write_all_at(b"used", 0x1ffc).unwrap();
        fe.read_at(SHMEM + 0x1ffc, &mut buf).unwrap();
        assert_eq!(&buf, b"used");

        assert!(matches!(
            fe.read_at(SHMEM + 0x1ffe, &mut buf),
            Err(InProcessError::OutOfBounds { gpa, len: 4 }) if gpa == SHMEM + 0x1ffe
        ));
        assert!(fe.write_at(SHMEM - 1, b"x").is_err());
        assert!(fe.read_at(u64::MAX, &mut buf).is_err());
    }

    #[test]
    fn a_vm_without_frontend_devices_is_refused() {
        let hyp = hyp();
        assert!(matches!(
            InProcessFrontend::new(&hyp, 2),
            Err(InProcessError::NoSuchVm(2))
        ));
    }
}
