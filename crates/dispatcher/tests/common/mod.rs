//! A platform of `n` Remote I/O pairs on the real hypervisor model: frontend VM 1, backend
//! VM 2, pair `i` with MMIO window `mmio(i)`, and a dispatcher with one DM per pair.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use remio_dispatcher::{Dispatcher, Dm, DmDescription};
use remio_hyp::{BackendVm, HypConfig, Hypervisor, RemioDeviceConfig, Role, ShmemConfig, VmConfig};

pub const FRONTEND_VM: u32 = 1;
pub const BACKEND_VM: u32 = 2;

pub fn mmio(i: u32) -> u64 {
    0xa000_0000 + u64::from(i) * 0x1000
}

pub struct Platform {
    pub hyp: Arc<Hypervisor>,
    pub backend: BackendVm,
    pub disp: Arc<Dispatcher>,
}

pub fn platform(n: u32, slots: usize, timeout: Option<Duration>) -> Platform {
    let dev = |i: u32, role| RemioDeviceConfig {
        bind_key: i,
        role,
        mmio_base: if role == Role::Frontend { mmio(i) } else { 0 },
        mmio_size: if role == Role::Frontend { 0x200 } else { 0 },
        irq: if role == Role::Frontend {
            40 + i
        } else {
            100 + i
        },
        shmem_id: i,
        shmem_base: 0x5000_0000 + u64::from(i) * 0x1_0000,
    };
    let hyp = Hypervisor::new(HypConfig {
        shmem: (0..n)
            .map(|i| ShmemConfig {
                id: i,
                size: 0x1_0000,
                backing: None,
            })
            .collect(),
        vms: vec![
            VmConfig {
                id: FRONTEND_VM,
                remio_devices: (0..n).map(|i| dev(i, Role::Frontend)).collect(),
            },
            VmConfig {
                id: BACKEND_VM,
                remio_devices: (0..n).map(|i| dev(i, Role::Backend)).collect(),
            },
        ],
        slots,
        timeout,
    })
    .expect("valid hypervisor configuration");
    let backend = hyp.backend(BACKEND_VM).expect("backend VM");
    let disp = Dispatcher::new(Arc::new(backend.clone()), Arc::new(backend.clone()));
    Platform { hyp, backend, disp }
}

impl Platform {
    /// Creates DM `i` from the backend's device description (as the driver reads its DT).
    pub fn create_dm(&self, i: u32) -> Arc<Dm> {
        let d = self.backend.device(i as usize).expect("backend device");
        self.disp
            .create_dm(DmDescription {
                id: i,
                shmem_addr: d.shmem_base,
                shmem_size: d.shmem_size,
                irq: d.irq,
                shmem: Some(d.shmem),
            })
            .expect("create DM")
    }
}
