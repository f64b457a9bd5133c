//! The hypervisor's Remote I/O configuration, mirroring Bao's (`spec/remote-io.md`, "Devices and
//! their numbering"), and its validation.
//!
//! Bao describes Remote I/O in its platform configuration: a list of shared-memory regions and,
//! per VM, a list of Remote I/O devices. A device is one side (frontend or backend) of a pair
//! that shares a *bind key*. [`HypConfig::validate`] checks everything Bao checks, plus what
//! this model needs (a non-empty slot pool, a non-zero timeout).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::time::Duration;

/// Largest request-slot pool accepted. Bao sizes it by the number of physical CPUs; this bound
/// only stops an absurd configuration from allocating gigabytes of FIFO space.
pub const MAX_SLOTS: usize = 1 << 16;

/// One shared-memory region (Bao's `shmemlist` entry).
#[derive(Debug)]
pub struct ShmemConfig {
    /// The shared-memory id devices refer to.
    pub id: u32,
    /// Size in bytes (non-zero).
    pub size: u64,
    /// The file backing the region. `None`: the hypervisor creates an anonymous memfd of `size`
    /// bytes. `Some`: an existing file (e.g. QEMU guest RAM on /dev/shm), at least `size` bytes
    /// long; the region is its first `size` bytes.
    pub backing: Option<File>,
}

/// Which side of a Remote I/O pair a device is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The VM whose register accesses trap (it has the MMIO window).
    Frontend,
    /// The VM that runs the I/O dispatcher and completes the requests.
    Backend,
}

/// One Remote I/O device of a VM (Bao's `remio_dev` entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemioDeviceConfig {
    /// The key pairing this device with its other side (exactly one frontend, one backend).
    pub bind_key: u32,
    /// Which side this device is.
    pub role: Role,
    /// Frontend: guest-physical base of the trapped MMIO window. Backend: ignored (use 0).
    pub mmio_base: u64,
    /// Frontend: size of the MMIO window (non-zero). Backend: must be 0.
    pub mmio_size: u64,
    /// Frontend: the interrupt NOTIFY injects. Backend: the interrupt a new request raises.
    pub irq: u32,
    /// The shared-memory region of the pair (both sides name the same one).
    pub shmem_id: u32,
    /// Guest-physical address where the region is mapped (both sides use the same one).
    pub shmem_base: u64,
}

/// One VM and its Remote I/O devices. For a backend VM, the order of backend devices here is
/// the `dm_id` numbering of its hypercalls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// The VM id.
    pub id: u32,
    /// Its Remote I/O devices, in configuration order.
    pub remio_devices: Vec<RemioDeviceConfig>,
}

/// Everything the hypervisor model is built from.
#[derive(Debug)]
pub struct HypConfig {
    /// Shared-memory regions.
    pub shmem: Vec<ShmemConfig>,
    /// VMs.
    pub vms: Vec<VmConfig>,
    /// Size of the request-slot pool (Bao: the number of physical CPUs). At least 1.
    pub slots: usize,
    /// How long a frontend access may stall. `None` is Bao's behaviour: forever. See the crate
    /// docs for what happens when it expires.
    pub timeout: Option<Duration>,
}

/// A configuration Bao (or this model) would refuse. Each variant names the offending VM,
/// bind key or region.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `slots` is 0.
    #[error("the request-slot pool must have at least one slot")]
    NoSlots,
    /// `slots` is larger than [`MAX_SLOTS`].
    #[error("{0} request slots is more than the maximum {MAX_SLOTS}")]
    TooManySlots(usize),
    /// `timeout` is `Some(0)`.
    #[error("the access timeout must be non-zero (use None for no timeout)")]
    ZeroTimeout,
    /// Two shared-memory regions have the same id.
    #[error("shared memory {0} is defined twice")]
    DuplicateShmem(u32),
    /// A shared-memory region has size 0.
    #[error("shared memory {0} has size 0")]
    EmptyShmem(u32),
    /// A backing file is shorter than the region.
    #[error("shared memory {id}: backing file is {len} bytes, smaller than the region ({size})")]
    ShmemBackingTooSmall {
        /// The region.
        id: u32,
        /// Its configured size.
        size: u64,
        /// The backing file's length.
        len: u64,
    },
    /// Creating the memfd, sizing it or reading the backing file's length failed.
    #[error("shared memory {id}: {source}")]
    ShmemIo {
        /// The region.
        id: u32,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// Two VMs have the same id.
    #[error("VM {0} is defined twice")]
    DuplicateVm(u32),
    /// A device names a shared-memory region that does not exist.
    #[error("VM {vm}, bind key {bind_key}: shared memory {shmem_id} does not exist")]
    UnknownShmem {
        /// The VM.
        vm: u32,
        /// The device.
        bind_key: u32,
        /// The missing region.
        shmem_id: u32,
    },
    /// `shmem_base + size` overflows the address space.
    #[error("VM {vm}, bind key {bind_key}: shared-memory window at {base:#x} overflows")]
    ShmemWindowOverflow {
        /// The VM.
        vm: u32,
        /// The device.
        bind_key: u32,
        /// The window base.
        base: u64,
    },
    /// Two devices of the same role share a bind key.
    #[error("bind key {bind_key} has two {role:?} devices (VM {first_vm} and VM {second_vm})")]
    DuplicateRole {
        /// The key.
        bind_key: u32,
        /// The duplicated role.
        role: Role,
        /// VM of the first one.
        first_vm: u32,
        /// VM of the second one.
        second_vm: u32,
    },
    /// A bind key has a frontend but no backend.
    #[error("bind key {bind_key} (frontend in VM {vm}) has no backend")]
    MissingBackend {
        /// The key.
        bind_key: u32,
        /// The frontend's VM.
        vm: u32,
    },
    /// A bind key has a backend but no frontend.
    #[error("bind key {bind_key} (backend in VM {vm}) has no frontend")]
    MissingFrontend {
        /// The key.
        bind_key: u32,
        /// The backend's VM.
        vm: u32,
    },
    /// The two sides of a pair disagree on the shared memory (id or base).
    #[error(
        "bind key {bind_key}: frontend uses shared memory {frontend_shmem} at {frontend_base:#x}, \
         backend uses {backend_shmem} at {backend_base:#x}"
    )]
    ShmemMismatch {
        /// The key.
        bind_key: u32,
        /// Frontend's shmem id.
        frontend_shmem: u32,
        /// Frontend's shmem base.
        frontend_base: u64,
        /// Backend's shmem id.
        backend_shmem: u32,
        /// Backend's shmem base.
        backend_base: u64,
    },
    /// A frontend MMIO window has size 0.
    #[error("VM {vm}, bind key {bind_key}: frontend MMIO window is empty")]
    EmptyMmio {
        /// The VM.
        vm: u32,
        /// The device.
        bind_key: u32,
    },
    /// `mmio_base + mmio_size` overflows the address space.
    #[error("VM {vm}, bind key {bind_key}: MMIO window at {base:#x} size {size:#x} overflows")]
    MmioOverflow {
        /// The VM.
        vm: u32,
        /// The device.
        bind_key: u32,
        /// Window base.
        base: u64,
        /// Window size.
        size: u64,
    },
    /// Two frontend MMIO windows of one VM overlap.
    #[error("VM {vm}: MMIO windows of bind keys {bind_key} and {other_bind_key} overlap")]
    MmioOverlap {
        /// The VM.
        vm: u32,
        /// One device.
        bind_key: u32,
        /// The other.
        other_bind_key: u32,
    },
    /// A backend device has a non-zero MMIO size.
    #[error(
        "VM {vm}, bind key {bind_key}: a backend device has no MMIO window (mmio_size must be 0)"
    )]
    BackendMmio {
        /// The VM.
        vm: u32,
        /// The device.
        bind_key: u32,
    },
    /// Two devices of one VM use the same interrupt.
    #[error("VM {vm}: irq {irq} is used by bind keys {bind_key} and {other_bind_key}")]
    DuplicateIrq {
        /// The VM.
        vm: u32,
        /// The interrupt.
        irq: u32,
        /// One device.
        bind_key: u32,
        /// The other.
        other_bind_key: u32,
    },
}

/// The validated position of one device: (VM index in `vms`, device index in its list).
pub(crate) type DevRef = (usize, usize);

/// One validated pair, as [`HypConfig::validate`] returns it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PairRef {
    pub bind_key: u32,
    pub frontend: DevRef,
    pub backend: DevRef,
}

impl HypConfig {
    /// Checks the configuration as Bao does. On success returns the pairs, ordered by bind key.
    /// Backing files are not touched here (see [`crate::Hypervisor::new`]).
    pub(crate) fn validate(&self) -> Result<Vec<PairRef>, ConfigError> {
        if self.slots == 0 {
            return Err(ConfigError::NoSlots);
        }
        if self.slots > MAX_SLOTS {
            return Err(ConfigError::TooManySlots(self.slots));
        }
        if self.timeout == Some(Duration::ZERO) {
            return Err(ConfigError::ZeroTimeout);
        }
        let mut shmem_sizes = HashMap::new();
        for s in &self.shmem {
            if s.size == 0 {
                return Err(ConfigError::EmptyShmem(s.id));
            }
            if shmem_sizes.insert(s.id, s.size).is_some() {
                return Err(ConfigError::DuplicateShmem(s.id));
            }
        }

        let mut vm_ids = HashMap::new();
        // bind key -> (frontend, backend)
        let mut pairs: BTreeMap<u32, (Option<DevRef>, Option<DevRef>)> = BTreeMap::new();
        for (vi, vm) in self.vms.iter().enumerate() {
            if vm_ids.insert(vm.id, vi).is_some() {
                return Err(ConfigError::DuplicateVm(vm.id));
            }
            let mut irqs: HashMap<u32, u32> = HashMap::new();
            let mut windows: BTreeMap<u64, (u64, u32)> = BTreeMap::new();
            for (di, dev) in vm.remio_devices.iter().enumerate() {
                let Some(&shmem_size) = shmem_sizes.get(&dev.shmem_id) else {
                    return Err(ConfigError::UnknownShmem {
                        vm: vm.id,
                        bind_key: dev.bind_key,
                        shmem_id: dev.shmem_id,
                    });
                };
                if dev.shmem_base.checked_add(shmem_size).is_none() {
                    return Err(ConfigError::ShmemWindowOverflow {
                        vm: vm.id,
                        bind_key: dev.bind_key,
                        base: dev.shmem_base,
                    });
                }
                if let Some(&other) = irqs.get(&dev.irq) {
                    return Err(ConfigError::DuplicateIrq {
                        vm: vm.id,
                        irq: dev.irq,
                        bind_key: other,
                        other_bind_key: dev.bind_key,
                    });
                }
                irqs.insert(dev.irq, dev.bind_key);
                match dev.role {
                    Role::Frontend => check_window(vm.id, dev, &mut windows)?,
                    Role::Backend if dev.mmio_size != 0 => {
                        return Err(ConfigError::BackendMmio {
                            vm: vm.id,
                            bind_key: dev.bind_key,
                        });
                    }
                    Role::Backend => {}
                }
                let entry = pairs.entry(dev.bind_key).or_default();
                let side = match dev.role {
                    Role::Frontend => &mut entry.0,
                    Role::Backend => &mut entry.1,
                };
                if let Some((first_vi, _)) = *side {
                    return Err(ConfigError::DuplicateRole {
                        bind_key: dev.bind_key,
                        role: dev.role,
                        first_vm: self.vms[first_vi].id,
                        second_vm: vm.id,
                    });
                }
                *side = Some((vi, di));
            }
        }

        let mut out = Vec::with_capacity(pairs.len());
        for (bind_key, sides) in pairs {
            let (frontend, backend) = match sides {
                (Some(f), Some(b)) => (f, b),
                (Some((vi, _)), None) => {
                    return Err(ConfigError::MissingBackend {
                        bind_key,
                        vm: self.vms[vi].id,
                    });
                }
                (None, Some((vi, _))) => {
                    return Err(ConfigError::MissingFrontend {
                        bind_key,
                        vm: self.vms[vi].id,
                    });
                }
                (None, None) => continue,
            };
            let f = self.device(frontend);
            let b = self.device(backend);
            if f.shmem_id != b.shmem_id || f.shmem_base != b.shmem_base {
                return Err(ConfigError::ShmemMismatch {
                    bind_key,
                    frontend_shmem: f.shmem_id,
                    frontend_base: f.shmem_base,
                    backend_shmem: b.shmem_id,
                    backend_base: b.shmem_base,
                });
            }
            out.push(PairRef {
                bind_key,
                frontend,
                backend,
            });
        }
        Ok(out)
    }

    pub(crate) fn device(&self, (vi, di): DevRef) -> &RemioDeviceConfig {
        &self.vms[vi].remio_devices[di]
    }
}

/// Checks one frontend MMIO window against the VM's others (ordered map keyed by base).
fn check_window(
    vm: u32,
    dev: &RemioDeviceConfig,
    windows: &mut BTreeMap<u64, (u64, u32)>,
) -> Result<(), ConfigError> {
    if dev.mmio_size == 0 {
        return Err(ConfigError::EmptyMmio {
            vm,
            bind_key: dev.bind_key,
        });
    }
    let Some(end) = dev.mmio_base.checked_add(dev.mmio_size) else {
        return Err(ConfigError::MmioOverflow {
            vm,
            bind_key: dev.bind_key,
            base: dev.mmio_base,
            size: dev.mmio_size,
        });
    };
    // The window starting at or below ours must end at or before our base; the next one above
    // must start at or after our end.
    let below = windows.range(..=dev.mmio_base).next_back();
    let above = windows.range(dev.mmio_base..).next();
    for (&start, &(wend, key)) in below.into_iter().chain(above) {
        if start < end && dev.mmio_base < wend {
            return Err(ConfigError::MmioOverlap {
                vm,
                bind_key: key,
                other_bind_key: dev.bind_key,
            });
        }
    }
    windows.insert(dev.mmio_base, (end, dev.bind_key));
    Ok(())
}
