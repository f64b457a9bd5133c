//! The real stack the API tests run on: the hypervisor model with one frontend VM and one
//! backend VM of two devices, the dispatcher with one DM per backend device, and the API
//! in-process or behind a socket server.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use remio_abi::{Hypercall, InterruptController};
use remio_api::{DmApi, InProcessApi, SocketApi, SocketServer, SocketServerConfig};
use remio_dispatcher::{Dispatcher, DmDescription};
use remio_hyp::{
    FrontendVm, HypConfig, Hypervisor, RemioDeviceConfig, Role, ShmemConfig, VmConfig,
};

pub const MMIO: [u64; 2] = [0xa000_0000, 0xa000_1000];
pub const MMIO_SIZE: u64 = 0x200;
pub const SHMEM: [u64; 2] = [0x5000_0000, 0x6000_0000];
pub const SHMEM_SIZE: u64 = 0x10000;
pub const BACKEND_IRQ: [u32; 2] = [52, 53];

pub struct Stack {
    pub hyp: Arc<Hypervisor>,
    pub dispatcher: Arc<Dispatcher>,
    pub inprocess: Arc<InProcessApi>,
    pub server: Option<SocketServer>,
}

fn dev(bind_key: u32, role: Role, i: usize) -> RemioDeviceConfig {
    let fe = role == Role::Frontend;
    RemioDeviceConfig {
        bind_key,
        role,
        mmio_base: if fe { MMIO[i] } else { 0 },
        mmio_size: if fe { MMIO_SIZE } else { 0 },
        irq: if fe {
            40 + u32::try_from(i).unwrap()
        } else {
            BACKEND_IRQ[i]
        },
        shmem_id: u32::try_from(i).unwrap(),
        shmem_base: SHMEM[i],
    }
}

pub fn sock_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("remio-api-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

impl Stack {
    pub fn new(timeout: Duration) -> Self {
        let hyp = Hypervisor::new(HypConfig {
            shmem: (0..2)
                .map(|i| ShmemConfig {
                    id: i,
                    size: SHMEM_SIZE,
                    backing: None,
                })
                .collect(),
            vms: vec![
                VmConfig {
                    id: 1,
                    remio_devices: vec![dev(1, Role::Frontend, 0), dev(2, Role::Frontend, 1)],
                },
                VmConfig {
                    id: 2,
                    remio_devices: vec![dev(1, Role::Backend, 0), dev(2, Role::Backend, 1)],
                },
            ],
            slots: 8,
            timeout: Some(timeout),
        })
        .unwrap();
        let backend = hyp.backend(2).unwrap();
        let hc: Arc<dyn Hypercall> = Arc::new(backend.clone());
        let intc: Arc<dyn InterruptController> = Arc::new(backend.clone());
        let dispatcher = Dispatcher::new(hc, intc);
        let inprocess = Arc::new(InProcessApi::new(dispatcher.clone()));
        // As the platform does: sessions may install a wait helper on their device.
        let b = backend.clone();
        inprocess.set_wait_helper_hook(Arc::new(move |dm_id, helper| {
            let helper = helper.map(|h| -> remio_hyp::WaitHelper {
                Arc::new(move |w: &remio_hyp::SlotWaiter<'_>| h(&HypWait(w)))
            });
            b.set_wait_helper(dm_id as usize, helper).is_ok()
        }));
        for d in backend.devices() {
            let id = u32::try_from(d.dm_id).unwrap();
            dispatcher
                .create_dm(DmDescription {
                    id,
                    shmem_addr: d.shmem_base,
                    shmem_size: d.shmem_size,
                    irq: d.irq,
                    shmem: Some(d.shmem.clone()),
                })
                .unwrap();
            inprocess.set_mmio_window(id, MMIO[d.dm_id], MMIO_SIZE);
        }
        Self {
            hyp,
            dispatcher,
            inprocess,
            server: None,
        }
    }

    pub fn with_socket(mut self, name: &str) -> Self {
        let api: Arc<dyn DmApi> = self.inprocess.clone();
        self.server =
            Some(SocketServer::bind(sock_path(name), api, SocketServerConfig::default()).unwrap());
        self
    }

    /// The API the tests use: the socket client if a server runs, else the in-process one.
    pub fn api(&self) -> Arc<dyn DmApi> {
        match &self.server {
            Some(s) => Arc::new(SocketApi::connect(s.path())),
            None => self.inprocess.clone(),
        }
    }

    pub fn frontend(&self) -> FrontendVm {
        self.hyp.frontend(1).unwrap()
    }
}

struct HypWait<'a, 'b>(&'a remio_hyp::SlotWaiter<'b>);

impl remio_api::AccessWait for HypWait<'_, '_> {
    fn is_complete(&self) -> bool {
        self.0.is_complete()
    }

    fn deadline(&self) -> Option<Instant> {
        self.0.deadline()
    }
}

pub fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}
