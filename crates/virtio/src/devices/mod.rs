//! The devices: block, console, rng, net, and vhost-user (virtio-fs, vsock, any type).

pub mod block;
pub mod block_engine;
pub mod console;
pub mod net;
pub mod rng;
pub mod socket_path;
pub mod vhost_user;

use crate::config::{ConsoleBackend, DeviceKind, NetBackendConfig};
use crate::device::VirtioDevice;

/// Builds the device a config names, opening its backend. Returns it with a description.
pub fn build_device(kind: &DeviceKind) -> std::io::Result<(Box<dyn VirtioDevice>, String)> {
    match kind {
        DeviceKind::Block(c) => {
            let backend = block::BlockBackend::open(&c.path, c.read_only, c.serial.as_deref())?;
            let desc = format!(
                "virtio-blk {} ({} sectors{})",
                c.path.display(),
                backend.geometry().capacity,
                if c.read_only { ", read-only" } else { "" }
            );
            Ok((Box::new(block::BlockDevice::new(backend)), desc))
        }
        DeviceKind::Rng(c) => Ok((
            Box::new(rng::RngDevice::new(c.rate)),
            format!("virtio-rng (rate {:?} B/s)", c.rate),
        )),
        DeviceKind::Console(c) => {
            let port = match &c.backend {
                ConsoleBackend::Stdio => console::ConsolePort::Stdio,
                ConsoleBackend::Pty { alias } => console::ConsolePort::pty(alias.as_deref())?,
                ConsoleBackend::Socket(path) => console::ConsolePort::socket(path)?,
            };
            let desc = match (&c.backend, port.pty_path()) {
                (_, Some(pty)) => format!("virtio-console on PTY {}", pty.display()),
                (ConsoleBackend::Socket(p), _) => {
                    format!("virtio-console on socket {}", p.display())
                }
                _ => "virtio-console on stdio".to_owned(),
            };
            Ok((Box::new(console::ConsoleDevice::new(port)), desc))
        }
        DeviceKind::Net(c) => {
            let (backend, desc) = match &c.backend {
                NetBackendConfig::Tap(name) => (
                    net::NetBackend::tap(name)?,
                    format!("virtio-net on TAP {name}"),
                ),
                NetBackendConfig::Socket { path, peer } => (
                    net::NetBackend::socket(path, peer.as_deref())?,
                    format!("virtio-net on socket {}", path.display()),
                ),
            };
            Ok((Box::new(net::NetDevice::new(backend, c.mac)), desc))
        }
        DeviceKind::VhostUser(spec) => {
            let desc = format!(
                "vhost-user device type {} ({} queues) on {}",
                spec.device_type,
                spec.queue_sizes.len(),
                spec.socket.display()
            );
            let dev = vhost_user::VhostUserDevice::connect(spec.clone())
                .map_err(std::io::Error::other)?;
            Ok((Box::new(dev), desc))
        }
    }
}
