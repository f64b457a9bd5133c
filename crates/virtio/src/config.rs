//! The device-model configuration: one table per device, in TOML (ours) or in
//! bao-virtio-dm's YAML device list (so its users can bring their configs).
//!
//! ```toml
//! [[device]]
//! dm_id = 0
//! type = "block"
//! mmio_base = 0xa003e00
//! path = "disk.img"
//! read_only = false
//! serial = "remio-disk0"
//!
//! [[device]]
//! dm_id = 1
//! type = "console"
//! mmio_base = 0xa003c00
//! backend = "pty"            # "stdio" | "pty" | "socket"
//!
//! [[device]]
//! dm_id = 2
//! type = "net"
//! mmio_base = 0xa003a00
//! backend = "tap"            # "tap" | "socket"
//! tap = "tap0"
//! mac = "52:54:00:12:34:56"
//!
//! [[device]]
//! dm_id = 3
//! type = "rng"
//! mmio_base = 0xa003800
//! rate = 65536               # bytes per second, optional
//! ```
//!
//! An unknown key, or a key of another device type (`tap` on a block device), is an error
//! naming the key and the type.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::devices::vhost_user::VhostUserSpec;
use crate::transport::MMIO_DEFAULT_SIZE;

/// Errors reading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax or schema error (unknown keys included: the message names the key).
    #[error("TOML config: {0}")]
    Toml(#[from] toml::de::Error),
    /// YAML syntax or schema error (unknown keys included: the message names the key).
    #[error("YAML config: {0}")]
    Yaml(#[from] serde_yaml::Error),
    /// A value is well-formed but not acceptable.
    #[error("device {dm_id}: {msg}")]
    Invalid {
        /// The device.
        dm_id: u32,
        /// What is wrong.
        msg: String,
    },
}

/// All devices one device-model process serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The devices, each on its own DM.
    pub devices: Vec<DeviceConfig>,
}

/// One device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// The DM to open.
    pub dm_id: u32,
    /// Guest-physical base of the device's MMIO window (request addresses minus this are
    /// register offsets).
    pub mmio_base: u64,
    /// Size of the MMIO window (default 0x200).
    pub mmio_size: u64,
    /// The frontend's view of the shared memory: the guest-physical address virtqueue
    /// addresses are relative to (default: the DM's own `shmem_addr`, as on Bao where both
    /// views coincide). For the C driver's later revision, also `CREATE_DM`'s address.
    pub shmem_addr: Option<u64>,
    /// Size of the shared memory: `CREATE_DM`'s input on the C driver's later revision
    /// (elsewhere the DM reports it).
    pub shmem_size: Option<u64>,
    /// The DM's backend interrupt: `CREATE_DM`'s input on the C driver's later revision.
    pub irq: Option<u32>,
    /// The device and its options.
    pub kind: DeviceKind,
}

/// Device type and type options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// virtio-blk.
    Block(BlockConfig),
    /// virtio-console.
    Console(ConsoleConfig),
    /// virtio-rng.
    Rng(RngConfig),
    /// virtio-net.
    Net(NetConfig),
    /// A device served by a vhost-user daemon (`fs`, `vsock`, `vhost-user`).
    VhostUser(crate::devices::vhost_user::VhostUserSpec),
}

/// virtio-blk options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// Raw image file.
    pub path: PathBuf,
    /// Advertise VIRTIO_BLK_F_RO and refuse writes.
    pub read_only: bool,
    /// GET_ID answer (at most 20 bytes used).
    pub serial: Option<String>,
}

/// Where console bytes go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleBackend {
    /// This process's stdin / stdout.
    Stdio,
    /// A new pseudo-terminal; its slave path is logged and, with `alias`, symlinked there.
    Pty {
        /// Symlink to create to the slave (bao-virtio-dm's `pty_alias`).
        alias: Option<PathBuf>,
    },
    /// A UNIX stream socket listening at this path, one client at a time.
    Socket(PathBuf),
}

/// virtio-console options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// The backend.
    pub backend: ConsoleBackend,
}

/// virtio-rng options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RngConfig {
    /// Bytes per second at most (unlimited if `None`).
    pub rate: Option<u64>,
}

/// Where frames go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackendConfig {
    /// An existing or new TAP interface of this name.
    Tap(String),
    /// A UNIX datagram socket bound at `path`; one frame per datagram, no virtio-net header.
    /// Frames go to `peer` if given, else to the first sender with a path; datagrams from
    /// anyone else are dropped.
    Socket {
        /// Where to bind.
        path: PathBuf,
        /// Where to send.
        peer: Option<PathBuf>,
    },
}

/// virtio-net options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The backend.
    pub backend: NetBackendConfig,
    /// MAC address (VIRTIO_NET_F_MAC); `None`: the driver picks one.
    pub mac: Option<[u8; 6]>,
}

/// Parses "52:54:00:12:34:56".
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

// ---- Our TOML format ----
//
// Each `[[device]]` table is one variant of `TomlDevice`, chosen by its `type` key; each
// variant's struct denies unknown fields, so a key that belongs to another type (`tap` on a
// block device) is refused by serde with the key's name, and the error is prefixed with the
// type (see `typed`). The common keys are repeated in every variant by `toml_device!`:
// `#[serde(flatten)]` cannot be combined with `deny_unknown_fields`.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlConfig {
    #[serde(default)]
    device: Vec<TomlDevice>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum TomlDevice {
    #[serde(deserialize_with = "typed::<_, TomlBlock>")]
    Block(TomlBlock),
    #[serde(deserialize_with = "typed::<_, TomlConsole>")]
    Console(TomlConsole),
    #[serde(deserialize_with = "typed::<_, TomlRng>")]
    Rng(TomlRng),
    #[serde(deserialize_with = "typed::<_, TomlNet>")]
    Net(TomlNet),
    #[serde(deserialize_with = "typed::<_, TomlFs>")]
    Fs(TomlFs),
    #[serde(deserialize_with = "typed::<_, TomlVsock>")]
    Vsock(TomlVsock),
    #[serde(rename = "vhost-user", deserialize_with = "typed::<_, TomlVhostUser>")]
    VhostUser(TomlVhostUser),
}

/// A device table's name in messages.
trait TypeName {
    const TYPE: &'static str;
}

/// Deserializes one variant's table, naming its type in any error ("device of type `block`:
/// unknown field `tap`, expected one of ...").
fn typed<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + TypeName,
{
    T::deserialize(d)
        .map_err(|e| serde::de::Error::custom(format_args!("device of type `{}`: {e}", T::TYPE)))
}

/// The keys every device has.
struct Common {
    dm_id: u32,
    mmio_base: u64,
    mmio_size: Option<u64>,
    shmem_addr: Option<u64>,
    shmem_size: Option<u64>,
    irq: Option<u32>,
}

/// One variant's table: the common keys, then the type's own.
macro_rules! toml_device {
    ($name:ident, $type:literal, { $($(#[$attr:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct $name {
            dm_id: u32,
            mmio_base: u64,
            mmio_size: Option<u64>,
            shmem_addr: Option<u64>,
            shmem_size: Option<u64>,
            irq: Option<u32>,
            $($(#[$attr])* $field: $ty,)*
        }

        impl TypeName for $name {
            const TYPE: &'static str = $type;
        }

        impl $name {
            fn common(&self) -> Common {
                Common {
                    dm_id: self.dm_id,
                    mmio_base: self.mmio_base,
                    mmio_size: self.mmio_size,
                    shmem_addr: self.shmem_addr,
                    shmem_size: self.shmem_size,
                    irq: self.irq,
                }
            }
        }
    };
}

toml_device!(TomlBlock, "block", {
    path: PathBuf,
    #[serde(default)]
    read_only: bool,
    serial: Option<String>,
});
toml_device!(TomlConsole, "console", {
    backend: Option<String>,
    socket: Option<PathBuf>,
    pty_alias: Option<PathBuf>,
});
toml_device!(TomlRng, "rng", {
    rate: Option<u64>,
});
toml_device!(TomlNet, "net", {
    backend: Option<String>,
    tap: Option<String>,
    socket: Option<PathBuf>,
    peer: Option<PathBuf>,
    mac: Option<String>,
});

toml_device!(TomlFs, "fs", {
    socket: PathBuf,
    tag: String,
    request_queues: Option<u16>,
    queue_size: Option<u16>,
});
toml_device!(TomlVsock, "vsock", {
    socket: PathBuf,
    guest_cid: u64,
    queue_size: Option<u16>,
});
toml_device!(TomlVhostUser, "vhost-user", {
    socket: PathBuf,
    device_id: u32,
    queues: usize,
    queue_size: Option<u16>,
});

/// A vhost-user queue size: a power of two up to 32768 (virtio 1.2 §2.7).
fn queue_size(id: u32, size: Option<u16>) -> Result<u16, ConfigError> {
    let size = size.unwrap_or(crate::devices::vhost_user::DEFAULT_QUEUE_SIZE);
    if size == 0 || !size.is_power_of_two() {
        return Err(invalid(
            id,
            &format!("queue_size {size}: a power of two, 1 to 32768"),
        ));
    }
    Ok(size)
}

/// A vsock guest CID: 3 or more (0-2 are reserved, `u32::MAX` is VMADDR_CID_ANY).
fn guest_cid(id: u32, cid: u64) -> Result<u64, ConfigError> {
    if cid < 3 || cid >= u64::from(u32::MAX) {
        return Err(invalid(
            id,
            &format!("guest_cid {cid}: 3 or more, below 2^32 - 1"),
        ));
    }
    Ok(cid)
}

impl Config {
    /// Parses our TOML format.
    pub fn from_toml_str(s: &str) -> Result<Self, ConfigError> {
        let raw: TomlConfig = toml::from_str(s)?;
        let devices = raw
            .device
            .into_iter()
            .map(TomlDevice::into_device)
            .collect::<Result<_, _>>()?;
        Self::checked(devices)
    }

    /// Parses bao-virtio-dm's YAML (`devices:` list).
    pub fn from_yaml_str(s: &str) -> Result<Self, ConfigError> {
        let raw: YamlConfig = serde_yaml::from_str(s)?;
        let devices = raw
            .devices
            .into_iter()
            .map(YamlDevice::into_device)
            .collect::<Result<_, _>>()?;
        Self::checked(devices)
    }

    /// Reads a file: YAML if it ends in `.yaml` / `.yml`, TOML otherwise.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => Self::from_yaml_str(&text),
            _ => Self::from_toml_str(&text),
        }
    }

    fn checked(devices: Vec<DeviceConfig>) -> Result<Self, ConfigError> {
        for (i, d) in devices.iter().enumerate() {
            if devices[..i].iter().any(|o| o.dm_id == d.dm_id) {
                return Err(invalid(d.dm_id, "dm_id used twice"));
            }
            if d.mmio_size < 0x100 || d.mmio_base.checked_add(d.mmio_size).is_none() {
                return Err(invalid(d.dm_id, "MMIO window too small or overflowing"));
            }
        }
        Ok(Self { devices })
    }
}

fn invalid(dm_id: u32, msg: &str) -> ConfigError {
    ConfigError::Invalid {
        dm_id,
        msg: msg.to_owned(),
    }
}

/// Refuses `key` when present: it belongs to another backend than the one chosen.
fn only_for(id: u32, key: &str, present: bool, backend: &str) -> Result<(), ConfigError> {
    if present {
        Err(invalid(
            id,
            &format!("key `{key}` applies to backend `{backend}` only"),
        ))
    } else {
        Ok(())
    }
}

impl TomlDevice {
    fn into_device(self) -> Result<DeviceConfig, ConfigError> {
        let (common, kind) = match self {
            Self::Block(b) => (
                b.common(),
                DeviceKind::Block(BlockConfig {
                    path: b.path,
                    read_only: b.read_only,
                    serial: b.serial,
                }),
            ),
            Self::Console(c) => {
                let id = c.dm_id;
                let backend = match c.backend.as_deref().unwrap_or("stdio") {
                    "stdio" => ConsoleBackend::Stdio,
                    "pty" => ConsoleBackend::Pty {
                        alias: c.pty_alias.clone(),
                    },
                    "socket" => ConsoleBackend::Socket(
                        c.socket
                            .clone()
                            .ok_or_else(|| invalid(id, "console backend socket needs `socket`"))?,
                    ),
                    other => {
                        return Err(invalid(id, &format!("unknown console backend `{other}`")))
                    }
                };
                only_for(
                    id,
                    "pty_alias",
                    c.pty_alias.is_some() && !matches!(backend, ConsoleBackend::Pty { .. }),
                    "pty",
                )?;
                only_for(
                    id,
                    "socket",
                    c.socket.is_some() && !matches!(backend, ConsoleBackend::Socket(_)),
                    "socket",
                )?;
                (c.common(), DeviceKind::Console(ConsoleConfig { backend }))
            }
            Self::Rng(r) => {
                if r.rate == Some(0) {
                    return Err(invalid(r.dm_id, "rate must be positive"));
                }
                (r.common(), DeviceKind::Rng(RngConfig { rate: r.rate }))
            }
            Self::Net(n) => {
                let id = n.dm_id;
                let backend = match n.backend.as_deref().unwrap_or("tap") {
                    "tap" => {
                        only_for(id, "socket", n.socket.is_some(), "socket")?;
                        only_for(id, "peer", n.peer.is_some(), "socket")?;
                        NetBackendConfig::Tap(
                            n.tap
                                .clone()
                                .ok_or_else(|| invalid(id, "net backend tap needs `tap`"))?,
                        )
                    }
                    "socket" => {
                        only_for(id, "tap", n.tap.is_some(), "tap")?;
                        NetBackendConfig::Socket {
                            path: n
                                .socket
                                .clone()
                                .ok_or_else(|| invalid(id, "net backend socket needs `socket`"))?,
                            peer: n.peer.clone(),
                        }
                    }
                    other => return Err(invalid(id, &format!("unknown net backend `{other}`"))),
                };
                let mac = mac_option(id, n.mac.as_deref())?;
                (n.common(), DeviceKind::Net(NetConfig { backend, mac }))
            }
            Self::Fs(f) => {
                let id = f.dm_id;
                let size = queue_size(id, f.queue_size)?;
                let spec = VhostUserSpec::fs(
                    f.socket.clone(),
                    &f.tag,
                    f.request_queues.unwrap_or(1),
                    size,
                )
                .map_err(|m| invalid(id, &m))?;
                (f.common(), DeviceKind::VhostUser(spec))
            }
            Self::Vsock(v) => {
                let id = v.dm_id;
                let spec = VhostUserSpec::vsock(
                    v.socket.clone(),
                    guest_cid(id, v.guest_cid)?,
                    queue_size(id, v.queue_size)?,
                );
                (v.common(), DeviceKind::VhostUser(spec))
            }
            Self::VhostUser(g) => {
                let id = g.dm_id;
                if g.queues == 0 || g.queues > 64 {
                    return Err(invalid(id, "queues: 1 to 64"));
                }
                let spec = VhostUserSpec::generic(
                    g.socket.clone(),
                    g.device_id,
                    g.queues,
                    queue_size(id, g.queue_size)?,
                );
                (g.common(), DeviceKind::VhostUser(spec))
            }
        };
        Ok(DeviceConfig {
            dm_id: common.dm_id,
            mmio_base: common.mmio_base,
            mmio_size: common.mmio_size.unwrap_or(MMIO_DEFAULT_SIZE),
            shmem_addr: common.shmem_addr,
            shmem_size: common.shmem_size,
            irq: common.irq,
            kind,
        })
    }
}

fn mac_option(id: u32, mac: Option<&str>) -> Result<Option<[u8; 6]>, ConfigError> {
    mac.map(|m| parse_mac(m).ok_or_else(|| invalid(id, &format!("bad MAC address `{m}`"))))
        .transpose()
}

// ---- bao-virtio-dm's YAML format ----
//
// Read tolerantly on purpose, unlike our TOML: in bao-virtio-dm's format the keys are one
// flat set shared by every type (its parser reads each entry into one `DeviceConfig` struct
// of optional type-specific fields, and each device takes the ones it needs), so a key of
// another type is accepted here as it is there. Only a key bao-virtio-dm does not know at
// all is refused (`deny_unknown_fields` on the union of its keys).

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlConfig {
    devices: Vec<YamlDevice>,
}

/// bao-virtio-dm's device keys. `shmem_path` is accepted and ignored (we map through the
/// session); `shmem_addr`, `shmem_size` and `irq` describe the DM (see [`DeviceConfig`]).
/// `data_plane` is `virtio` (the default), or `vhost_user` for `fs` and `vsock`, whose daemon
/// listens at `<socket_path><Type><id>.sock` (bao-virtio-dm's rule: `/tmp/` + `Fs` + `0` +
/// `.sock`). `vhost` (kernel vhost) is refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlDevice {
    id: u32,
    #[serde(rename = "type")]
    kind: String,
    shmem_addr: Option<u64>,
    shmem_size: Option<u64>,
    #[expect(
        dead_code,
        reason = "accepted for compatibility; we map through the session"
    )]
    shmem_path: Option<String>,
    mmio_addr: u64,
    irq: Option<u32>,
    data_plane: Option<String>,
    file_path: Option<PathBuf>,
    read_only: Option<bool>,
    #[expect(dead_code, reason = "bao-virtio-dm hint with no effect on the device")]
    root_device: Option<bool>,
    #[expect(dead_code, reason = "we always advertise FLUSH")]
    advertise_flush: Option<bool>,
    tap_name: Option<String>,
    mac_addr: Option<String>,
    pty_alias: Option<PathBuf>,
    socket_path: Option<PathBuf>,
    guest_cid: Option<u64>,
}

impl YamlDevice {
    fn into_device(self) -> Result<DeviceConfig, ConfigError> {
        let id = self.id;
        let shell = self.device(DeviceKind::Rng(RngConfig { rate: None }));
        match self.data_plane.as_deref() {
            None | Some("virtio") => {}
            Some("vhost_user") => return self.into_vhost_user(),
            Some("vhost") => {
                return Err(invalid(
                    id,
                    &format!(
                        "{} device: data_plane `vhost` (in-kernel vhost) is not supported; \
                         use `virtio`, or `vhost_user` with a daemon",
                        self.kind
                    ),
                ))
            }
            Some(other) => {
                return Err(invalid(
                    id,
                    &format!("data_plane `{other}` is not supported"),
                ))
            }
        }
        let kind = match self.kind.as_str() {
            "block" => DeviceKind::Block(BlockConfig {
                path: self
                    .file_path
                    .ok_or_else(|| invalid(id, "block needs `file_path`"))?,
                read_only: self.read_only.unwrap_or(false),
                serial: None,
            }),
            "console" => DeviceKind::Console(ConsoleConfig {
                backend: match self.socket_path {
                    Some(p) => ConsoleBackend::Socket(p),
                    None => ConsoleBackend::Pty {
                        alias: self.pty_alias,
                    },
                },
            }),
            "rng" => DeviceKind::Rng(RngConfig { rate: None }),
            "net" => DeviceKind::Net(NetConfig {
                backend: NetBackendConfig::Tap(
                    self.tap_name
                        .ok_or_else(|| invalid(id, "net needs `tap_name`"))?,
                ),
                mac: mac_option(id, self.mac_addr.as_deref())?,
            }),
            "fs" | "vsock" => {
                return Err(invalid(
                    id,
                    &format!("{} needs `data_plane: vhost_user`", self.kind),
                ))
            }
            other => return Err(invalid(id, &format!("unsupported device type `{other}`"))),
        };
        Ok(DeviceConfig { kind, ..shell })
    }

    fn device(&self, kind: DeviceKind) -> DeviceConfig {
        DeviceConfig {
            dm_id: self.id,
            mmio_base: self.mmio_addr,
            mmio_size: MMIO_DEFAULT_SIZE,
            shmem_addr: self.shmem_addr,
            shmem_size: self.shmem_size,
            irq: self.irq,
            kind,
        }
    }

    /// `data_plane: vhost_user`: the daemon's socket is `<socket_path><Type><id>.sock`.
    fn into_vhost_user(self) -> Result<DeviceConfig, ConfigError> {
        let id = self.id;
        let type_name = match self.kind.as_str() {
            "fs" => "Fs",
            "vsock" => "Vsock",
            other => {
                return Err(invalid(
                    id,
                    &format!(
                        "data_plane `vhost_user` is supported for fs and vsock, not `{other}`"
                    ),
                ))
            }
        };
        let prefix = self
            .socket_path
            .as_ref()
            .ok_or_else(|| invalid(id, "data_plane `vhost_user` needs `socket_path`"))?;
        let mut socket = prefix.clone().into_os_string();
        socket.push(format!("{type_name}{id}.sock"));
        let socket = PathBuf::from(socket);
        let size = crate::devices::vhost_user::DEFAULT_QUEUE_SIZE;
        let spec = if type_name == "Fs" {
            // bao-virtio-dm has no tag key: the daemon's (virtiofsd --tag) when it serves a
            // config space, else `fs<id>`.
            let mut spec = VhostUserSpec::fs(socket, &format!("fs{id}"), 1, size)
                .map_err(|m| invalid(id, &m))?;
            if let crate::devices::vhost_user::ConfigSpace::Local(c) = spec.config {
                spec.config = crate::devices::vhost_user::ConfigSpace::DaemonOr(c);
            }
            spec
        } else {
            let cid = self
                .guest_cid
                .ok_or_else(|| invalid(id, "vsock needs `guest_cid`"))?;
            VhostUserSpec::vsock(socket, guest_cid(id, cid)?, size)
        };
        Ok(self.device(DeviceKind::VhostUser(spec)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_with_every_device_type_parses() {
        let cfg = Config::from_toml_str(
            r#"
            [[device]]
            dm_id = 0
            type = "block"
            mmio_base = 0xa003e00
            path = "/tmp/disk.img"
            read_only = true
            serial = "d0"
            [[device]]
            dm_id = 1
            type = "console"
            mmio_base = 0xa003c00
            backend = "socket"
            socket = "/tmp/con.sock"
            [[device]]
            dm_id = 2
            type = "net"
            mmio_base = 0xa003a00
            tap = "tap0"
            mac = "52:54:00:12:34:56"
            [[device]]
            dm_id = 3
            type = "rng"
            mmio_base = 0xa003800
            rate = 1024
            "#,
        )
        .unwrap();

        assert_eq!(cfg.devices.len(), 4);
        assert_eq!(
            cfg.devices[0].kind,
            DeviceKind::Block(BlockConfig {
                path: "/tmp/disk.img".into(),
                read_only: true,
                serial: Some("d0".into())
            })
        );
        assert_eq!(cfg.devices[0].mmio_base, 0xa003e00);
        assert_eq!(cfg.devices[0].mmio_size, 0x200);
        assert_eq!(
            cfg.devices[2].kind,
            DeviceKind::Net(NetConfig {
                backend: NetBackendConfig::Tap("tap0".into()),
                mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
            })
        );
        assert_eq!(
            cfg.devices[3].kind,
            DeviceKind::Rng(RngConfig { rate: Some(1024) })
        );
    }

    #[test]
    fn unknown_toml_key_is_an_error_naming_the_key() {
        let err = Config::from_toml_str(
            "[[device]]\ndm_id = 0\ntype = \"rng\"\nmmio_base = 0\nspeed = 3\n",
        )
        .unwrap_err();

        assert!(err.to_string().contains("speed"), "{err}");
    }

    #[test]
    fn unknown_yaml_key_is_an_error_naming_the_key() {
        let err = Config::from_yaml_str(
            "devices:\n  - id: 0\n    type: rng\n    mmio_addr: 0x1000\n    colour: blue\n",
        )
        .unwrap_err();

        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn bao_virtio_dm_block_yaml_is_accepted() {
        let cfg = Config::from_yaml_str(
            r#"
devices:
    # --- VirtIO Common ---
  - id: 0
    type: "block"
    shmem_addr: 0x50000000
    shmem_size: 0x01000000
    shmem_path: "/dev/baoipc0"
    mmio_addr: 0xa003e00
    irq: 47
    data_plane: virtio
    file_path: "/etc/block.img"
    read_only: false
    root_device: true
    advertise_flush: false
  - id: 1
    type: "net"
    mmio_addr: 0xa003c00
    data_plane: virtio
    tap_name: "tap0"
    mac_addr: "52:54:00:00:00:01"
"#,
        )
        .unwrap();

        assert_eq!(cfg.devices[0].mmio_base, 0xa003e00);
        assert_eq!(cfg.devices[0].shmem_addr, Some(0x5000_0000));
        assert_eq!(cfg.devices[0].shmem_size, Some(0x0100_0000));
        assert_eq!(cfg.devices[0].irq, Some(47));
        assert_eq!(cfg.devices[1].irq, None);
        assert!(
            matches!(&cfg.devices[0].kind, DeviceKind::Block(b) if b.path == Path::new("/etc/block.img"))
        );
        assert!(
            matches!(&cfg.devices[1].kind, DeviceKind::Net(n) if n.mac == Some([0x52, 0x54, 0, 0, 0, 1]))
        );
    }

    #[test]
    fn vhost_data_plane_is_refused() {
        let err = Config::from_yaml_str(
            "devices:\n  - id: 0\n    type: rng\n    mmio_addr: 0x1000\n    data_plane: vhost\n",
        )
        .unwrap_err();

        assert!(err.to_string().contains("vhost"), "{err}");
    }

    #[test]
    fn kernel_vhost_is_refused_naming_the_device_type() {
        let err = Config::from_yaml_str(
            "devices:\n  - id: 2\n    type: vsock\n    mmio_addr: 0x1000\n    data_plane: vhost\n    guest_cid: 3\n",
        )
        .unwrap_err();

        assert!(matches!(err, ConfigError::Invalid { dm_id: 2, .. }));
        assert!(err.to_string().contains("vsock device"), "{err}");
        assert!(err.to_string().contains("in-kernel vhost"), "{err}");
    }

    #[test]
    fn yaml_vhost_user_sockets_follow_the_socket_path_prefix_rule() {
        use crate::devices::vhost_user::ConfigSpace;
        let cfg = Config::from_yaml_str(
            "devices:\n  - id: 0\n    type: fs\n    mmio_addr: 0x1000\n    data_plane: vhost_user\n    socket_path: /tmp/\n  - id: 1\n    type: vsock\n    mmio_addr: 0x1200\n    data_plane: vhost_user\n    socket_path: /run/vu-\n    guest_cid: 3\n",
        )
        .unwrap();

        let DeviceKind::VhostUser(fs) = &cfg.devices[0].kind else {
            panic!("not vhost-user: {:?}", cfg.devices[0].kind)
        };
        assert_eq!(fs.socket, Path::new("/tmp/Fs0.sock"));
        assert_eq!(fs.device_type, 26);
        assert!(matches!(&fs.config, ConfigSpace::DaemonOr(c) if c.starts_with(b"fs0\0")));
        let DeviceKind::VhostUser(vsock) = &cfg.devices[1].kind else {
            panic!("not vhost-user: {:?}", cfg.devices[1].kind)
        };
        assert_eq!(vsock.socket, Path::new("/run/vu-Vsock1.sock"));
        assert_eq!(vsock.device_type, 19);
        assert_eq!(vsock.queue_sizes.len(), 3);
    }

    #[test]
    fn yaml_vhost_user_needs_socket_path_and_a_vhost_user_type() {
        let no_path = Config::from_yaml_str(
            "devices:\n  - id: 0\n    type: fs\n    mmio_addr: 0x1000\n    data_plane: vhost_user\n",
        )
        .unwrap_err();
        let block = Config::from_yaml_str(
            "devices:\n  - id: 0\n    type: block\n    mmio_addr: 0x1000\n    data_plane: vhost_user\n    socket_path: /tmp/\n",
        )
        .unwrap_err();
        let fs_virtio =
            Config::from_yaml_str("devices:\n  - id: 0\n    type: fs\n    mmio_addr: 0x1000\n")
                .unwrap_err();

        assert!(no_path.to_string().contains("socket_path"), "{no_path}");
        assert!(block.to_string().contains("not `block`"), "{block}");
        assert!(fs_virtio.to_string().contains("vhost_user"), "{fs_virtio}");
    }

    #[test]
    fn toml_fs_vsock_and_generic_vhost_user_devices_parse() {
        let cfg = Config::from_toml_str(
            r#"
            [[device]]
            dm_id = 0
            type = "fs"
            mmio_base = 0x10000000
            socket = "/tmp/vfsd.sock"
            tag = "hostshare"
            [[device]]
            dm_id = 1
            type = "vsock"
            mmio_base = 0x10000200
            socket = "/tmp/vsock.sock"
            guest_cid = 3
            queue_size = 128
            [[device]]
            dm_id = 2
            type = "vhost-user"
            mmio_base = 0x10000400
            socket = "/tmp/rng.sock"
            device_id = 4
            queues = 1
            "#,
        )
        .unwrap();

        let specs: Vec<_> = cfg
            .devices
            .iter()
            .map(|d| match &d.kind {
                DeviceKind::VhostUser(s) => s.clone(),
                other => panic!("not vhost-user: {other:?}"),
            })
            .collect();
        assert_eq!(specs[0].device_type, 26);
        let default = crate::devices::vhost_user::DEFAULT_QUEUE_SIZE;
        assert_eq!(specs[0].queue_sizes, vec![default, default]);
        assert_eq!(specs[1].queue_sizes, vec![128, 128, 128]);
        assert_eq!(specs[2].device_type, 4);
        assert_eq!(specs[2].socket, Path::new("/tmp/rng.sock"));
    }

    #[test]
    fn bad_vhost_user_values_are_refused() {
        for (body, word) in [
            ("type = \"fs\"\nsocket = \"/s\"\ntag = \"\"\n", "tag"),
            (
                "type = \"fs\"\nsocket = \"/s\"\ntag = \"t\"\nqueue_size = 100\n",
                "queue_size",
            ),
            (
                "type = \"vsock\"\nsocket = \"/s\"\nguest_cid = 2\n",
                "guest_cid",
            ),
            ("type = \"vsock\"\nguest_cid = 3\n", "socket"),
            (
                "type = \"fs\"\nsocket = \"/s\"\ntag = \"t\"\nguest_cid = 3\n",
                "guest_cid",
            ),
        ] {
            let text = format!("[[device]]\ndm_id = 0\nmmio_base = 0\n{body}");
            let err = Config::from_toml_str(&text).unwrap_err();
            assert!(err.to_string().contains(word), "{body}: {err}");
        }
    }

    #[test]
    fn duplicate_dm_ids_are_refused() {
        let err = Config::from_toml_str(
            "[[device]]\ndm_id = 0\ntype = \"rng\"\nmmio_base = 0\n[[device]]\ndm_id = 0\ntype = \"rng\"\nmmio_base = 0x1000\n",
        )
        .unwrap_err();

        assert!(matches!(err, ConfigError::Invalid { dm_id: 0, .. }));
    }

    #[test]
    fn key_of_another_type_is_refused() {
        let err = Config::from_toml_str(
            "[[device]]\ndm_id = 0\ntype = \"rng\"\nmmio_base = 0\npath = \"x\"\n",
        )
        .unwrap_err();

        assert!(err.to_string().contains("path"), "{err}");
    }

    fn device(ty: &str, extra: &str) -> String {
        format!("[[device]]\ndm_id = 0\ntype = \"{ty}\"\nmmio_base = 0x1000\n{extra}")
    }

    #[test]
    fn a_key_of_another_type_is_refused_by_serde_naming_the_key_and_the_type() {
        for (ty, extra, key) in [
            ("block", "path = \"d.img\"\ntap = \"tap0\"\n", "tap"),
            (
                "block",
                "path = \"d.img\"\nmac = \"52:54:00:00:00:01\"\n",
                "mac",
            ),
            ("block", "path = \"d.img\"\npeer = \"/tmp/p\"\n", "peer"),
            ("block", "path = \"d.img\"\nsocket = \"/tmp/s\"\n", "socket"),
            (
                "block",
                "path = \"d.img\"\npty_alias = \"/tmp/a\"\n",
                "pty_alias",
            ),
            ("rng", "serial = \"x\"\n", "serial"),
            ("console", "tap = \"tap0\"\n", "tap"),
            ("net", "tap = \"tap0\"\nread_only = true\n", "read_only"),
        ] {
            let err = Config::from_toml_str(&device(ty, extra)).unwrap_err();

            assert!(matches!(err, ConfigError::Toml(_)), "{ty}/{key}: {err}");
            let msg = err.to_string();
            assert!(msg.contains(&format!("unknown field `{key}`")), "{msg}");
            assert!(msg.contains(&format!("device of type `{ty}`")), "{msg}");
        }
    }

    #[test]
    fn every_common_key_is_accepted_on_every_type() {
        let common =
            "mmio_size = 0x400\nshmem_addr = 0x5000_0000\nshmem_size = 0x100_0000\nirq = 47\n";
        for (ty, own) in [
            ("block", "path = \"d.img\"\n"),
            ("console", ""),
            ("rng", ""),
            ("net", "tap = \"tap0\"\n"),
        ] {
            let cfg = Config::from_toml_str(&device(ty, &format!("{common}{own}"))).unwrap();

            let d = &cfg.devices[0];
            assert_eq!(
                (d.dm_id, d.mmio_base, d.mmio_size),
                (0, 0x1000, 0x400),
                "{ty}"
            );
            assert_eq!(d.shmem_addr, Some(0x5000_0000), "{ty}");
            assert_eq!(d.shmem_size, Some(0x100_0000), "{ty}");
            assert_eq!(d.irq, Some(47), "{ty}");
        }
    }

    #[test]
    fn an_unknown_type_and_a_missing_required_key_are_refused_by_name() {
        let err = Config::from_toml_str(&device("gpu", "")).unwrap_err();
        assert!(err.to_string().contains("unknown variant `gpu`"), "{err}");

        let err = Config::from_toml_str(&device("block", "")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("missing field `path`"), "{msg}");
        assert!(msg.contains("device of type `block`"), "{msg}");
    }

    #[test]
    fn a_key_of_another_backend_is_refused() {
        for (ty, extra, key) in [
            ("net", "tap = \"tap0\"\npeer = \"/tmp/p\"\n", "peer"),
            (
                "net",
                "backend = \"socket\"\nsocket = \"/tmp/s\"\ntap = \"t\"\n",
                "tap",
            ),
            ("console", "pty_alias = \"/tmp/a\"\n", "pty_alias"),
            (
                "console",
                "backend = \"pty\"\nsocket = \"/tmp/s\"\n",
                "socket",
            ),
        ] {
            let err = Config::from_toml_str(&device(ty, extra)).unwrap_err();

            assert!(
                matches!(&err, ConfigError::Invalid { msg, .. } if msg.contains(&format!("`{key}`"))),
                "{ty}/{key}: {err}"
            );
        }
    }

    #[test]
    fn yaml_keeps_accepting_keys_of_other_types_as_bao_virtio_dm_does() {
        let cfg = Config::from_yaml_str(
            "devices:\n  - id: 0\n    type: block\n    mmio_addr: 0x1000\n    file_path: d.img\n    tap_name: tap0\n",
        )
        .unwrap();

        assert!(matches!(&cfg.devices[0].kind, DeviceKind::Block(_)));
    }

    #[test]
    fn mac_parsing_rejects_malformed_addresses() {
        assert_eq!(
            parse_mac("00:11:22:33:44:55"),
            Some([0, 0x11, 0x22, 0x33, 0x44, 0x55])
        );
        for bad in [
            "00:11:22:33:44",
            "00:11:22:33:44:55:66",
            "0:11:22:33:44:55",
            "zz:11:22:33:44:55",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }
}
