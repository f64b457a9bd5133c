//! The platform side: the hypervisor model (`remio-hyp`), the dispatcher with one DM per
//! backend device (DM id = the device's index), and the device-model API socket.
//!
//! [`Platform`] is the reusable assembly (`remio run` and `remio bench` construct it
//! in-process); [`run`] is `remio platform --config FILE`, which starts one from a TOML file
//! (see `examples/platform.toml`) and serves until SIGINT or SIGTERM, with its counters on a
//! stats socket in the per-user run directory for `remio stats` ([`crate::stats`]), as
//! `remio run` does.
//!
//! ```toml
//! socket = "/tmp/remio-api.sock"   # the device-model API socket (mode 0600)
//! slots = 8                        # hypervisor request slots
//! timeout_ms = 5000                # frontend access timeout; 0 = none (Bao's behaviour)
//!
//! [[device]]                       # one per Remote I/O device; its index is the DM id
//! bind_key = 1
//! mmio_base = 0xa0000000           # frontend MMIO window
//! mmio_size = 0x200
//! frontend_irq = 40                # injected by NOTIFY
//! backend_irq = 52                 # raised when a request is queued
//! shmem_base = 0x50000000          # shared memory, same guest-physical address in both VMs
//! shmem_size = 0x100000
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use remio_abi::{Hypercall, InterruptController};
use remio_api::{DmApi, InProcessApi, SocketServer, SocketServerConfig};
use remio_dispatcher::{Dispatcher, DmDescription};
use remio_hyp::{
    FrontendVm, HypConfig, Hypervisor, RemioDeviceConfig, Role, ShmemConfig, VmConfig,
};

/// The frontend VM's id in a platform built by [`Platform::start`].
pub const FRONTEND_VM: u32 = 1;
/// The backend VM's id (where the dispatcher runs).
pub const BACKEND_VM: u32 = 2;

fn default_slots() -> usize {
    8
}

fn default_timeout_ms() -> u64 {
    5000
}

/// One Remote I/O device pair.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// The pair's bind key (unique).
    pub bind_key: u32,
    /// Frontend MMIO window base.
    pub mmio_base: u64,
    /// Frontend MMIO window size.
    pub mmio_size: u64,
    /// Frontend interrupt (NOTIFY injects it).
    pub frontend_irq: u32,
    /// Backend interrupt (a queued request raises it).
    pub backend_irq: u32,
    /// Guest-physical base of the shared memory.
    pub shmem_base: u64,
    /// Size of the shared memory.
    pub shmem_size: u64,
}

/// What a [`Platform`] is built from (the TOML file of `remio platform --config`).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformConfig {
    /// The device-model API socket; `None` (absent): no socket, in-process use only.
    pub socket: Option<PathBuf>,
    /// Hypervisor request slots.
    #[serde(default = "default_slots")]
    pub slots: usize,
    /// Frontend access timeout in ms; 0 means none (Bao's behaviour).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// The devices, in DM-id order.
    #[serde(default)]
    pub device: Vec<DeviceConfig>,
    /// A file that is every device's shared memory (the QEMU case: guest RAM is the shared
    /// memory), instead of one anonymous memfd per device. Its first
    /// `max(shmem_size)` bytes are the region. Not in the TOML file.
    #[serde(skip)]
    pub shmem_backing: Option<File>,
}

impl PlatformConfig {
    /// Parses the TOML text of a config file.
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        toml::from_str(text).context("platform config")
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("in {}", path.display()))
    }

    fn hyp_config(self) -> anyhow::Result<(HypConfig, Option<PathBuf>)> {
        if self.device.is_empty() {
            bail!("platform config: no [[device]]");
        }
        let shared = self.shmem_backing.is_some();
        let shmem = match self.shmem_backing {
            Some(file) => vec![ShmemConfig {
                id: 0,
                size: self.device.iter().map(|d| d.shmem_size).max().unwrap_or(0),
                backing: Some(file),
            }],
            None => (0u32..)
                .zip(&self.device)
                .map(|(id, d)| ShmemConfig {
                    id,
                    size: d.shmem_size,
                    backing: None,
                })
                .collect(),
        };
        let dev = |(i, d): (u32, &DeviceConfig), role: Role| RemioDeviceConfig {
            bind_key: d.bind_key,
            role,
            mmio_base: if role == Role::Frontend {
                d.mmio_base
            } else {
                0
            },
            mmio_size: if role == Role::Frontend {
                d.mmio_size
            } else {
                0
            },
            irq: if role == Role::Frontend {
                d.frontend_irq
            } else {
                d.backend_irq
            },
            shmem_id: if shared { 0 } else { i },
            shmem_base: d.shmem_base,
        };
        let vms = vec![
            VmConfig {
                id: FRONTEND_VM,
                remio_devices: (0u32..)
                    .zip(&self.device)
                    .map(|p| dev(p, Role::Frontend))
                    .collect(),
            },
            VmConfig {
                id: BACKEND_VM,
                remio_devices: (0u32..)
                    .zip(&self.device)
                    .map(|p| dev(p, Role::Backend))
                    .collect(),
            },
        ];
        let timeout = (self.timeout_ms > 0).then(|| Duration::from_millis(self.timeout_ms));
        Ok((
            HypConfig {
                shmem,
                vms,
                slots: self.slots,
                timeout,
            },
            self.socket,
        ))
    }
}

/// A running platform: hypervisor model, dispatcher, in-process API and (optionally) the API
/// socket. Dropping it stops the socket server (ending every session, whose requests are
/// completed) and removes the socket file.
pub struct Platform {
    hyp: Arc<Hypervisor>,
    dispatcher: Arc<Dispatcher>,
    api: Arc<InProcessApi>,
    frontend_vm: Option<u32>,
    server: Option<SocketServer>,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform")
            .field("dispatcher", &self.dispatcher)
            .field("socket", &self.socket_path())
            .finish_non_exhaustive()
    }
}

impl Platform {
    /// Builds the hypervisor model from `config` (frontend VM [`FRONTEND_VM`], backend VM
    /// [`BACKEND_VM`], one pair per `[[device]]`), the dispatcher, and the socket if one is
    /// configured.
    pub fn start(config: PlatformConfig) -> anyhow::Result<Self> {
        let (hyp_config, socket) = config.hyp_config()?;
        let hyp = Hypervisor::new(hyp_config).context("hypervisor model configuration")?;
        Self::with_hypervisor(hyp, BACKEND_VM, socket.as_deref())
    }

    /// The platform around an existing hypervisor model (e.g. `remio run`'s, whose shared
    /// memory is the QEMU guest RAM): a dispatcher on backend VM `backend_vm` with one DM per
    /// backend device, each DM's MMIO window taken from the frontend device with the same
    /// bind key, and the API socket at `socket` if given.
    pub fn with_hypervisor(
        hyp: Arc<Hypervisor>,
        backend_vm: u32,
        socket: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let backend = hyp
            .backend(backend_vm)
            .with_context(|| format!("no backend VM {backend_vm}"))?;
        let hc: Arc<dyn Hypercall> = Arc::new(backend.clone());
        let intc: Arc<dyn InterruptController> = Arc::new(backend.clone());
        let dispatcher = Dispatcher::new(hc, intc);
        let api = Arc::new(InProcessApi::new(dispatcher.clone()));
        // Sessions may install a wait helper on their device (the socket server does, so that
        // a stalled frontend reads the device model's answer itself). DM id = backend dm_id.
        let b = backend.clone();
        api.set_wait_helper_hook(Arc::new(move |dm_id, helper| {
            let helper = helper.map(|h| -> remio_hyp::WaitHelper {
                Arc::new(move |w: &remio_hyp::SlotWaiter<'_>| h(&HypWait(w)))
            });
            usize::try_from(dm_id).is_ok_and(|dm| b.set_wait_helper(dm, helper).is_ok())
        }));
        let frontends: Vec<_> = hyp
            .frontend_vm_ids()
            .into_iter()
            .filter_map(|id| hyp.frontend(id))
            .flat_map(|vm| vm.devices())
            .collect();
        for d in backend.devices() {
            let id = u32::try_from(d.dm_id).context("DM id")?;
            dispatcher
                .create_dm(DmDescription {
                    id,
                    shmem_addr: d.shmem_base,
                    shmem_size: d.shmem_size,
                    irq: d.irq,
                    shmem: Some(d.shmem.clone()),
                })
                .map_err(|e| anyhow::anyhow!("creating DM {id}: {e}"))?;
            if let Some(f) = frontends.iter().find(|f| f.bind_key == d.bind_key) {
                api.set_mmio_window(id, f.mmio_base, f.mmio_size);
            }
        }
        let server = match socket {
            Some(path) => {
                let served: Arc<dyn DmApi> = api.clone();
                Some(
                    SocketServer::bind(path, served, SocketServerConfig::default())
                        .with_context(|| format!("serving the API on {}", path.display()))?,
                )
            }
            None => None,
        };
        let frontend_vm = hyp.frontend_vm_ids().first().copied();
        Ok(Self {
            hyp,
            dispatcher,
            api,
            frontend_vm,
            server,
        })
    }

    /// The hypervisor model.
    pub fn hypervisor(&self) -> &Arc<Hypervisor> {
        &self.hyp
    }

    /// The dispatcher.
    pub fn dispatcher(&self) -> &Arc<Dispatcher> {
        &self.dispatcher
    }

    /// The device-model API in this process (what the socket serves).
    pub fn api(&self) -> &Arc<InProcessApi> {
        &self.api
    }

    /// The API socket's path, if one is served.
    pub fn socket_path(&self) -> Option<&Path> {
        self.server.as_ref().map(SocketServer::path)
    }

    /// The (first) frontend VM, for in-process frontends.
    pub fn frontend(&self) -> Option<FrontendVm> {
        self.frontend_vm.and_then(|id| self.hyp.frontend(id))
    }
}

/// The hypervisor model's stalled access, as the API's wait helpers see it.
struct HypWait<'a, 'b>(&'a remio_hyp::SlotWaiter<'b>);

impl remio_api::AccessWait for HypWait<'_, '_> {
    fn is_complete(&self) -> bool {
        self.0.is_complete()
    }

    fn deadline(&self) -> Option<std::time::Instant> {
        self.0.deadline()
    }
}

/// Arguments of `remio platform`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The platform config (TOML; see examples/platform.toml).
    #[arg(long)]
    pub config: PathBuf,
}

/// Runs `remio platform`: starts the platform and serves until SIGINT or SIGTERM.
pub fn run(args: Args) -> anyhow::Result<()> {
    let config = PlatformConfig::load(&args.config)?;
    if config.socket.is_none() {
        bail!(
            "{}: `socket` is required for `remio platform`",
            args.config.display()
        );
    }
    // Blocked before any thread starts, so that this one receives them in sigwait.
    crate::signals::block_stop_signals();
    let platform = Platform::start(config)?;
    log::info!(
        "platform: {} DM(s), device-model API on {}",
        platform.dispatcher().dms().len(),
        platform
            .socket_path()
            .map_or_else(String::new, |p| p.display().to_string())
    );
    // The same stats socket as `remio run`'s, so that `remio stats` finds this platform too.
    let stats = match crate::stats::serve_platform(&platform, &crate::stats::run_dir()) {
        Ok(s) => {
            log::info!(
                "platform: counters for `remio stats` on {}",
                s.path().display()
            );
            Some(s)
        }
        Err(e) => {
            log::warn!("no stats socket (remio stats will not find this platform): {e:#}");
            None
        }
    };
    let sig = crate::signals::wait_stop_signal();
    log::info!("platform: signal {sig}, stopping");
    drop(stats);
    drop(platform);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../examples/platform.toml");

    #[test]
    fn the_example_config_parses_with_its_documented_values() {
        let c = PlatformConfig::from_toml(EXAMPLE).unwrap();
        assert_eq!(c.slots, 8);
        assert_eq!(c.timeout_ms, 5000);
        assert_eq!(c.device.len(), 2);
        assert_eq!(c.device[0].mmio_base, 0xa000_0000);
        assert_eq!(c.device[1].backend_irq, 53);
    }

    #[test]
    fn unknown_keys_and_missing_devices_are_refused() {
        assert!(PlatformConfig::from_toml("sockett = \"x\"").is_err());
        assert!(Platform::start(PlatformConfig::from_toml("slots = 4").unwrap()).is_err());
    }

    #[test]
    fn a_started_platform_serves_a_dm_over_its_socket() {
        use remio_api::{DmSession, SocketApi};
        let dir = std::env::temp_dir().join(format!("remio-platform-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = PlatformConfig::from_toml(EXAMPLE).unwrap();
        c.socket = Some(dir.join("api.sock"));
        let p = Platform::start(c).unwrap();
        assert_eq!(p.dispatcher().dms().len(), 2);
        let s: Arc<dyn DmSession> = Arc::from(
            SocketApi::connect(p.socket_path().unwrap())
                .open(1)
                .unwrap(),
        );
        assert_eq!(s.info().shmem_addr, 0x6000_0000);
        let dm = {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut r = s.attach().unwrap();
                r.value = 0x7472_6976;
                s.complete(&r).unwrap();
            })
        };
        let fe = p.frontend().unwrap();
        assert_eq!(fe.read(0xa000_1000, 4).unwrap(), 0x7472_6976);
        dm.join().unwrap();
        // The MMIO window of DM 1 is enforced.
        let e = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let outside = remio_api::IoeventfdSpec {
            addr: 0xa000_0050,
            len: 4,
            datamatch: None,
        };
        assert_eq!(
            s.assign_ioeventfd(&e, outside).unwrap_err().errno(),
            libc::EPERM
        );
    }
}
