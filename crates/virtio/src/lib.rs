//! remio-virtio: the VirtIO device model of remio, written against the device-model API
//! ([`remio_api::DmApi`] / [`remio_api::DmSession`]) only, so it runs unchanged on remio's
//! dispatcher (in-process or over its socket) or on the C driver's ioctls on Bao hardware.
//!
//! Layers, bottom up:
//! - [`device`]: the [`VirtioDevice`] trait, [`Interrupt`] and worker plumbing;
//! - [`devices`]: block, console, rng, net, each with its own worker thread, EVENT_IDX and
//!   INDIRECT_DESC;
//! - [`transport`]: the virtio-mmio (version 2) register file [`MmioTransport`], a pure type
//!   driven by `read(offset, width)` / `write(offset, width, value)`;
//! - [`runner`]: the ATTACH → decode → COMPLETE loop per device and [`serve`], which starts
//!   every device of a [`Config`];
//! - [`fuzz`]: entry points for fuzz targets.
//!
//! ```no_run
//! # fn demo(api: &dyn remio_api::DmApi) -> Result<(), Box<dyn std::error::Error>> {
//! let config = remio_virtio::Config::from_toml_str(
//!     "[[device]]\ndm_id = 0\ntype = \"rng\"\nmmio_base = 0xa003e00\n",
//! )?;
//! let handle = remio_virtio::serve(api, &config)?;
//! handle.wait();
//! # Ok(()) }
//! ```

pub mod config;
mod crash_point;
pub mod device;
pub mod devices;
pub mod failover;
pub mod fuzz;
pub mod persist;
pub mod runner;
pub mod stats;
mod sys;
pub mod transport;

pub use config::{Config, ConfigError, DeviceConfig, DeviceKind};
pub use device::{
    ActivateContext, ActivateError, Interrupt, InterruptStatusWord, SharedStatus, VirtioDevice,
};
pub use runner::{
    handle_request, serve, share_interrupt_status, DeviceInfo, DeviceModelHandle, DeviceRunner,
    ServeError, SessionRegistrar,
};
pub use stats::{DeviceStats, DeviceStatsSnapshot, RequestKind};
pub use transport::{MmioTransport, NoopRegistrar, NotifyRegistrar, RegistrarError};
