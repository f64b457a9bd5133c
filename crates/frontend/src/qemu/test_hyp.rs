//! The hypervisor model the qemu module's tests run on: `n` device pairs laid out as `remio
//! run` lays them (frontend windows at 0x1000_0000 + i * 0x200, frontend interrupts 32 + i,
//! backend interrupts 64 + i), every device's shared memory being `shmem`.

use std::sync::Arc;
use std::time::Duration;

use remio_hyp::{HypConfig, Hypervisor, RemioDeviceConfig, Role, ShmemConfig, VmConfig};

pub(crate) fn hypervisor(n: u32, shmem: ShmemConfig, timeout: Duration) -> Arc<Hypervisor> {
    let dev = |i: u32, role| {
        let fe = role == Role::Frontend;
        RemioDeviceConfig {
            bind_key: i,
            role,
            mmio_base: if fe {
                0x1000_0000 + u64::from(i) * 0x200
            } else {
                0
            },
            mmio_size: if fe { 0x200 } else { 0 },
            irq: if fe { 32 + i } else { 64 + i },
            shmem_id: 0,
            shmem_base: 0,
        }
    };
    Hypervisor::new(HypConfig {
        shmem: vec![shmem],
        vms: vec![
            VmConfig {
                id: 1,
                remio_devices: (0..n).map(|i| dev(i, Role::Frontend)).collect(),
            },
            VmConfig {
                id: 2,
                remio_devices: (0..n).map(|i| dev(i, Role::Backend)).collect(),
            },
        ],
        slots: 4,
        timeout: Some(timeout),
    })
    .expect("a valid test configuration")
}
