//! `remio run`: one platform process (hypervisor model + dispatcher + device-model API socket +
//! the QEMU bridge), one device-model process (`remio dm`) and QEMU booting the remio guest.
//!
//! With no arguments it is the demo: an ext4 disk holding a README (made on the host with
//! mkfs.ext4, mounted by the guest at /mnt), console, rng and, when a TAP can be made, net
//! ([`crate::hosttap`]: host 10.77.0.1, guest 10.77.0.2) served through remio. The guest's shell
//! is on /dev/hvc0, remio's virtio console, which the device model serves on this terminal (put
//! in raw mode, so Ctrl-C and Ctrl-D reach the guest); the kernel's boot log on the serial port
//! goes to `serial.log` in the run directory (and to stderr with `-v`). `remio run` exits with
//! the guest shell's status.
//!
//! `--exec CMD` / `--exec-file PATH` run a script in the guest through the initramfs `/init`
//! contract (`guest/README.md`): the script, of any size, and the `--copy-in` files travel in a
//! second newc archive appended to the cached initramfs (as `/etc/remio/exec.sh`,
//! [`crate::guest::files_archive`]); the guest prints `REMIO-EXEC-BEGIN`, the output, then
//! `REMIO-EXIT <status>` and powers off; `remio run` prints the output and exits with the status.
//!
//! Every exit path kills QEMU and the device model and removes the temporary directory (unless
//! `--keep`).
//!
//! If the device model dies while the guest runs (a crash, a SIGKILL), `remio run` starts a new
//! one with a bounded back-off (`--dm-restarts`, default 5 per run): it resumes every device
//! from the state the previous one recorded in the platform's state regions
//! (`crates/virtio/src/persist.rs`), takes again the requests that were in flight, and the
//! guest sees a pause, not an error. Accesses made meanwhile wait at the DM for the new
//! session (bounded by `--access-timeout-ms`). A device model replaced on purpose with
//! `remio dm --takeover PID` (an upgrade) is the same from the guest's side: the old one exits
//! with status 0, which `remio run` takes for a handover, not a crash; it starts a device model
//! of its own only if none serves the devices for 2 s.
//!
//! When no restart is left (or `--dm-restarts 0`), the guest still does not hang: as soon as
//! `remio run` gives up it declares every window failed ([`remio_frontend::qemu::Failover`]).
//! From then on the bridge answers those windows itself: Status reads DEVICE_NEEDS_RESET, every
//! request in the virtqueues — already queued or added later — is returned to the driver
//! (virtio-blk with `VIRTIO_BLK_S_IOERR`), so the guest's I/O fails with EIO in bounded time and
//! its shell stays usable.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use remio_frontend::qemu::{Bridge, GuestRam, QemuOptions};
use remio_hyp::{HypConfig, Hypervisor, RemioDeviceConfig, Role, ShmemConfig, VmConfig};

use crate::partition::Partition;
use crate::platform::{Platform, BACKEND_VM, FRONTEND_VM};

/// Frontend MMIO window of device `i`: `MMIO_BASE + i * WINDOW` (frontend-physical addresses
/// of the hypervisor model; the bridge maps the guest's BAR0 windows onto them).
pub const MMIO_BASE: u64 = 0x1000_0000;
/// Size of one device's register window (the guest glue's `REMIO_WINDOW_SIZE`).
pub const WINDOW: u64 = 0x200;
/// Frontend interrupt of device `i`: `FRONTEND_IRQ_BASE + i`.
pub const FRONTEND_IRQ_BASE: u32 = 32;
/// Backend interrupt of device `i`: `BACKEND_IRQ_BASE + i`.
pub const BACKEND_IRQ_BASE: u32 = 64;
/// Size of the demo's fresh disk image.
pub const DEMO_DISK_SIZE: u64 = 64 << 20;

/// Arguments of `remio run`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Exit status: with --exec or --exec-file, the script's; in the \
interactive demo, the guest shell's (`exit 3` there makes remio run exit 3; Ctrl-D: the last \
command's); 1 when remio fails or the guest stops without reporting a status."
)]
pub struct Args {
    /// Serve this raw image as the guest's /dev/vda (default: a fresh 64 MiB sparse image in
    /// the temporary directory).
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Serve the devices of this device-model config (TOML or bao-virtio-dm YAML, see
    /// docs/configuration.md) instead of the ones the flags describe. Device i must be dm_id i
    /// with mmio_base 0x10000000 + i * 0x200.
    #[arg(long, conflicts_with_all = ["disk", "net", "no_net", "no_console", "no_rng"])]
    pub config: Option<PathBuf>,
    /// Run this shell script in the guest (any size), print its output and exit with its
    /// status.
    #[arg(long, value_name = "SCRIPT", conflicts_with = "exec_file")]
    pub exec: Option<String>,
    /// Like --exec, with the script read from this file.
    #[arg(long, value_name = "PATH")]
    pub exec_file: Option<PathBuf>,
    /// Copy the host file HOST into the guest at the absolute path GUEST (a GUEST ending in `/`
    /// is a directory: the file keeps its name) before /init runs; repeatable. The file keeps its
    /// permission bits.
    #[arg(long, value_name = "HOST:GUEST")]
    pub copy_in: Vec<String>,
    /// Write the run's final counters (those of `remio stats --json`) to this file at exit.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
    /// Serve the virtio console (the demo shell's /dev/hvc0) on this UNIX socket instead of
    /// this terminal (e.g. `socat -,raw,echo=0 UNIX-CONNECT:PATH`).
    #[arg(long, value_name = "PATH", conflicts_with = "no_console")]
    pub console_socket: Option<PathBuf>,
    /// Kill the guest after this many seconds (default: none; 300 with --exec).
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Guest RAM in MiB (a multiple of 2, at most 2048: one RAM region at guest-physical 0).
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
    /// Keep the temporary directory (disk image, sockets, generated config, logs).
    #[arg(long)]
    pub keep: bool,
    /// Add a virtio-net device: on this existing TAP interface, or `auto` for a new TAP with
    /// the host at 10.77.0.1/24 and the guest's eth0 at 10.77.0.2/24 [default: auto in the
    /// interactive demo when a TAP can be made, none with --exec].
    #[arg(long, value_name = "TAP|auto", conflicts_with = "no_net")]
    pub net: Option<String>,
    /// Leave out the virtio-net device.
    #[arg(long)]
    pub no_net: bool,
    /// Leave out the virtio console device.
    #[arg(long)]
    pub no_console: bool,
    /// Leave out the virtio rng device.
    #[arg(long)]
    pub no_rng: bool,
    /// Share this host directory with the guest through virtio-fs: remio starts virtiofsd on
    /// it (from scripts/setup) and the guest mounts it at /mnt/host (tag `remio`).
    #[arg(long, value_name = "HOSTDIR", conflicts_with = "config")]
    pub share: Option<PathBuf>,
    /// Give the guest a vsock device with this CID (3 or more), served by vhost-device-vsock
    /// (from scripts/setup); remio prints the host-side UNIX socket host programs connect to.
    #[arg(long, value_name = "CID", conflicts_with = "config")]
    pub vsock: Option<u64>,
    /// How long one trapped register access may stall before it completes anyway (ms; 0: no
    /// limit, as on Bao, where a device model that never answers stalls the vCPU).
    #[arg(long, default_value_t = 5000)]
    pub access_timeout_ms: u64,
    /// How many times a device model that dies is restarted (at once; with a growing pause,
    /// 50 ms up to 1.6 s, only while they die within 0.5 s of starting); each new one resumes
    /// the devices where the dead one left them. 0: never; the guest's devices then fail their
    /// requests. [default: 5] `--dispatcher remio` only: with `--dispatcher c-driver` a value
    /// above 0 is refused (the posted driver destroys a DM when its device model exits, so
    /// there is nothing to resume).
    #[arg(long, value_name = "N")]
    pub dm_restarts: Option<u32>,
    /// With `--dispatcher c-driver`: a shell script the backend VM's /init sources just before
    /// it starts the device model (as /etc/remio/backend.sh; for tests and diagnosis).
    #[arg(long, value_name = "FILE")]
    pub backend_hook: Option<PathBuf>,
    /// Place the frontend (QEMU and the platform) and the backend (device models, vhost-user
    /// daemons, the c-driver's backend VM) on separate CPUs, as Bao partitions a machine:
    /// `auto` splits the CPUs this process may use in two (none with one CPU), `off` leaves
    /// placement to the scheduler, `FRONTEND/BACKEND` gives the CPU lists (e.g. `0/1`,
    /// `0-1/2-3`).
    #[arg(long, value_name = "auto|off|FRONTEND/BACKEND", default_value = "auto")]
    pub partition: crate::partition::PartitionSpec,
    /// The QEMU binary [default: qemu-system-x86_64 on PATH].
    #[arg(long)]
    pub qemu: Option<PathBuf>,
    /// Guest kernel + initramfs directory [default: $REMIO_GUEST_DIR, else target/guest].
    #[arg(long)]
    pub guest_dir: Option<PathBuf>,
    /// Show the guest's boot log (its serial port, always in `serial.log` of the run
    /// directory) on stderr, and with --exec the summary of what runs where; with
    /// `--dispatcher c-driver` also the backend VM's serial console.
    #[arg(long, short)]
    pub verbose: bool,
    /// Who dispatches the frontend's requests: `remio` (remio's own dispatcher in this process
    /// and a `remio dm` process) or `c-driver` (a backend VM under QEMU running the posted C
    /// I/O dispatcher driver and `remio dm --kernel-driver`; see docs/c-driver.md).
    #[arg(long, value_enum, default_value_t = Dispatcher::Remio)]
    pub dispatcher: Dispatcher,
}

impl Args {
    /// `--exec` or `--exec-file`: run a script and exit with its status (no interactive shell).
    pub fn exec_mode(&self) -> bool {
        self.exec.is_some() || self.exec_file.is_some()
    }
}

/// `--dispatcher`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Dispatcher {
    /// remio's own dispatcher (in this process) and a `remio dm` process.
    Remio,
    /// The posted C driver in a backend VM, with `remio dm --kernel-driver` inside it.
    CDriver,
    /// kmod/remio_dispatcher.rs, the Rust kernel module, in a backend VM on Debian's 7.3
    /// kernel (`remio guest build --rust-kmod`; docs/kmod.md); otherwise as `c-driver`.
    RustKmod,
}

impl Dispatcher {
    /// A backend VM's kernel driver dispatches (`c-driver`, `rust-kmod`).
    fn in_backend_vm(self) -> bool {
        matches!(self, Self::CDriver | Self::RustKmod)
    }
}

/// One device of the generated configuration.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceSpec {
    /// Index: the Remote I/O device, the `dm_id`, the BAR window and the ivshmem vector.
    pub dm_id: u32,
    /// `block`, `console`, `rng` or `net`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Frontend MMIO base of its register window.
    pub mmio_base: u64,
    /// Block: the image path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Console (`stdio` / `pty`) and net (`tap`): the backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Net: the TAP interface name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// Console with the `socket` backend: its UNIX socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// The frontend's address of the shared memory (the DM's memory is placed there for the
    /// virtqueue addresses): set for the backend VM's device model, where GET_INFO reports
    /// the backend's address of the ivshmem BAR instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shmem_addr: Option<u64>,
    /// fs (`--share`): the virtio-fs tag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// vsock (`--vsock`): the guest's CID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_cid: Option<u64>,
}

/// The device-model config `remio run` writes for `remio dm --config` (`remio_virtio::Config`'s
/// TOML format).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DmConfig {
    /// The devices, in `dm_id` order.
    pub device: Vec<DeviceSpec>,
}

/// Where the virtio console's bytes go: the DM's stdin/stdout (with `--exec` the guest's
/// `/dev/hvc0` output shows in ours; in the demo it is the shell's terminal), or a UNIX socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleMode {
    /// No virtio console.
    Off,
    /// The device model's stdin/stdout.
    Stdio,
    /// A UNIX socket the device model listens on (`--console-socket`).
    Socket(PathBuf),
}

/// The devices to serve, in window order.
pub fn device_plan(
    disk: &Path,
    console: ConsoleMode,
    rng: bool,
    net: Option<&str>,
) -> Vec<DeviceSpec> {
    let spec = |kind: &str| DeviceSpec {
        dm_id: 0,
        kind: kind.to_owned(),
        mmio_base: 0,
        path: None,
        backend: None,
        tap: None,
        socket: None,
        shmem_addr: None,
        tag: None,
        guest_cid: None,
    };
    let mut plan = vec![DeviceSpec {
        path: Some(disk.to_owned()),
        ..spec("block")
    }];
    match console {
        ConsoleMode::Off => {}
        ConsoleMode::Stdio => plan.push(DeviceSpec {
            backend: Some("stdio".into()),
            ..spec("console")
        }),
        ConsoleMode::Socket(path) => plan.push(DeviceSpec {
            backend: Some("socket".into()),
            socket: Some(path),
            ..spec("console")
        }),
    }
    if rng {
        plan.push(spec("rng"));
    }
    if let Some(tap) = net {
        plan.push(DeviceSpec {
            backend: Some("tap".into()),
            tap: Some(tap.to_owned()),
            ..spec("net")
        });
    }
    for (d, i) in plan.iter_mut().zip(0u32..) {
        d.dm_id = i;
        d.mmio_base = MMIO_BASE + u64::from(i) * WINDOW;
    }
    plan
}

/// The hypervisor configuration for `n` devices whose shared memory is the guest RAM.
pub fn hyp_config(
    n: u32,
    ram: &GuestRam,
    access_timeout: Option<Duration>,
) -> anyhow::Result<HypConfig> {
    let dev = |i: u32, role| RemioDeviceConfig {
        bind_key: i,
        role,
        mmio_base: if role == Role::Frontend {
            MMIO_BASE + u64::from(i) * WINDOW
        } else {
            0
        },
        mmio_size: if role == Role::Frontend { WINDOW } else { 0 },
        irq: if role == Role::Frontend {
            FRONTEND_IRQ_BASE + i
        } else {
            BACKEND_IRQ_BASE + i
        },
        shmem_id: 0,
        shmem_base: 0,
    };
    Ok(HypConfig {
        shmem: vec![ShmemConfig {
            id: 0,
            size: ram.size(),
            backing: Some(
                ram.file()
                    .try_clone()
                    .context("duplicating the guest RAM file")?,
            ),
        }],
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
        // One vCPU: one outstanding access; a few spare slots cost nothing.
        slots: 4,
        timeout: access_timeout,
    })
}

/// What a line of the guest's serial output means for `--exec`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleLine {
    /// `REMIO-EXEC-BEGIN`: the command's output starts.
    Begin,
    /// `REMIO-EXIT <status>`.
    Exit(i32),
    /// Anything else.
    Text,
}

/// Classifies one serial line (the `/init` contract's markers start at the line's beginning).
pub fn classify(line: &str) -> ConsoleLine {
    let line = line.trim_end_matches(['\r', '\n']);
    if line == "REMIO-EXEC-BEGIN" {
        return ConsoleLine::Begin;
    }
    if let Some(rest) = line.strip_prefix("REMIO-EXIT ") {
        if let Ok(s) = rest.trim().parse() {
            return ConsoleLine::Exit(s);
        }
    }
    ConsoleLine::Text
}

/// The devices the flags ask for: `--disk` (or a fresh demo image in `tmp`), the console,
/// rng, and net on `tap` or `--net TAP`.
fn planned_devices(
    args: &Args,
    tmp: &Path,
    tap: Option<&crate::hosttap::HostTap>,
) -> anyhow::Result<Vec<DeviceSpec>> {
    let disk = match &args.disk {
        Some(d) => {
            // A regular file or a block device; the error names the path and what it is.
            remio_virtio::devices::block::check_image(d).context("--disk")?;
            d.canonicalize()?
        }
        None => demo_disk(tmp)?,
    };
    let console = match (args.no_console, &args.console_socket) {
        (true, _) => ConsoleMode::Off,
        (false, Some(path)) => ConsoleMode::Socket(std::path::absolute(path)?),
        (false, None) => ConsoleMode::Stdio,
    };
    let tap_name = match (tap, &args.net) {
        (Some(t), _) => Some(t.name().to_owned()),
        (None, Some(name)) if name != NET_AUTO => Some(name.clone()),
        (None, _) => None,
    };
    Ok(device_plan(
        &disk,
        console,
        !args.no_rng,
        tap_name.as_deref(),
    ))
}

/// The demo's README, at the root of its disk (the guest's /mnt/README).
pub const DEMO_README: &str = "\
remio demo
==========

You are in a Linux guest booted by QEMU (TCG). Its devices are not QEMU's: every virtio
register access traps into remio's model of the Bao hypervisor's Remote I/O, goes through
remio's I/O dispatcher to a `remio dm` device-model process, and comes back as an interrupt.

  /dev/vda    virtio-blk: this ext4 disk, mounted at /mnt (an image in the run directory)
  /dev/hvc0   virtio-console: this shell; the device model writes it to your terminal
  /dev/hwrng  virtio-rng
  eth0        virtio-net on a host TAP, when one could be made (host 10.77.0.1)

Things to try:

  cat /proc/interrupts | grep virtio     the interrupts remio injected, per device
  dd if=/dev/hwrng bs=16 count=1 | od -x  bytes from the host's entropy
  echo hello > /mnt/note; sync            written through remio's virtio-blk
  dd if=/dev/vda of=/dev/null bs=1M       read the whole disk through remio
  ping -c 3 10.77.0.1                     the host, over virtio-net (if eth0 is up)
  dmesg | grep -i virtio                  how the guest found the devices

On the host, in a second terminal, `remio stats` shows this run's counters live: requests per
device by route (control client, status word, ioeventfd), interrupts, timeouts.

The kernel's boot log went to serial.log in the run directory (`remio run -v` shows it).
`exit`, Ctrl-D or `poweroff` ends the guest; remio run exits with the shell's status.
";

/// The demo disk in `tmp`: a [`DEMO_DISK_SIZE`] ext4 image holding [`DEMO_README`], made with
/// the host's mkfs.ext4 (`-d`); a blank sparse image, with a warning, when mkfs.ext4 is
/// missing or fails.
fn demo_disk(tmp: &Path) -> anyhow::Result<PathBuf> {
    let img = tmp.join("disk.img");
    File::create(&img)?.set_len(DEMO_DISK_SIZE)?;
    let Some(mkfs) = crate::guest::find_tool("mkfs.ext4") else {
        log::warn!("mkfs.ext4 not found (e2fsprogs): the demo disk is blank");
        return Ok(img);
    };
    let root = tmp.join("disk-root");
    std::fs::create_dir(&root)?;
    std::fs::write(root.join("README"), DEMO_README)?;
    let out = Command::new(mkfs)
        .args(["-q", "-F", "-L", "remio-demo", "-E", "root_owner=0:0", "-d"])
        .arg(&root)
        .arg(&img)
        .stdin(Stdio::null())
        .output();
    let _ = std::fs::remove_dir_all(&root);
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => log::warn!(
            "mkfs.ext4 failed ({}): the demo disk is blank: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => log::warn!("mkfs.ext4 could not run: the demo disk is blank: {e}"),
    }
    Ok(img)
}

/// Where `/init` finds the script of `--exec` / `--exec-file` (guest/README.md).
pub const GUEST_EXEC_SCRIPT: &str = "/etc/remio/exec.sh";

/// Parses one `--copy-in HOST:GUEST` (split at the last `:`): the host file and its guest
/// path, which must be absolute, without `.` or `..` components; one ending in `/` is a
/// directory, the file keeping its name there.
pub fn parse_copy_in(spec: &str) -> anyhow::Result<(PathBuf, String)> {
    let (host, guest) = spec
        .rsplit_once(':')
        .with_context(|| format!("--copy-in {spec:?}: expected HOST:GUEST"))?;
    if host.is_empty() {
        bail!("--copy-in {spec:?}: no host file before the `:`");
    }
    let host = PathBuf::from(host);
    let mut guest = guest.to_owned();
    if guest.ends_with('/') {
        let name = host
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("--copy-in {spec:?}: the host path has no file name"))?;
        guest.push_str(name);
    }
    let bad = !guest.starts_with('/')
        || guest[1..]
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        bail!(
            "--copy-in {spec:?}: bad guest path {guest:?}: it must be absolute, e.g. \
             /root/file, with no empty, `.` or `..` component"
        );
    }
    Ok((host, guest))
}

/// The files `remio run` brings into the guest in the archive appended to the initramfs:
/// the `--copy-in` files, then the script of `--exec` / `--exec-file` at
/// [`GUEST_EXEC_SCRIPT`], as (guest path, contents, permission bits).
fn guest_files(args: &Args) -> anyhow::Result<Vec<(String, Vec<u8>, u32)>> {
    use std::os::unix::fs::PermissionsExt;
    let mut files = Vec::new();
    for spec in &args.copy_in {
        let (host, guest) = parse_copy_in(spec)?;
        let meta = std::fs::metadata(&host)
            .with_context(|| format!("--copy-in {spec:?}: {}", host.display()))?;
        if !meta.is_file() {
            bail!(
                "--copy-in {spec:?}: {} is not a regular file",
                host.display()
            );
        }
        let bytes = std::fs::read(&host)
            .with_context(|| format!("--copy-in {spec:?}: reading {}", host.display()))?;
        files.push((guest, bytes, meta.permissions().mode() & 0o7777));
    }
    let script = match (&args.exec, &args.exec_file) {
        (Some(s), _) => Some(s.clone().into_bytes()),
        (None, Some(path)) => {
            Some(std::fs::read(path).with_context(|| format!("--exec-file {}", path.display()))?)
        }
        (None, None) => None,
    };
    if let Some(script) = script {
        files.push((GUEST_EXEC_SCRIPT.to_owned(), script, 0o755));
    }
    Ok(files)
}

/// The initramfs to boot: `base` as it is without `files`, else `base` with
/// [`crate::guest::files_archive`]'s archive of `files` appended, written to `out`.
fn initrd_with(
    base: &Path,
    files: &[(String, Vec<u8>, u32)],
    out: &Path,
) -> anyhow::Result<PathBuf> {
    if files.is_empty() {
        return Ok(base.to_owned());
    }
    let mut initrd = std::fs::read(base).with_context(|| format!("reading {}", base.display()))?;
    // newc archives are 4-byte aligned; the kernel skips zero padding between them.
    initrd.resize(initrd.len().next_multiple_of(4), 0);
    let members: Vec<(&str, &[u8], u32)> = files
        .iter()
        .map(|(p, b, m)| (p.as_str(), b.as_slice(), *m))
        .collect();
    initrd.extend(crate::guest::files_archive(&members)?);
    std::fs::write(out, &initrd).with_context(|| format!("writing {}", out.display()))?;
    Ok(out.to_owned())
}

/// This terminal in raw mode while the demo's shell runs on it (through the device model's
/// stdio): Ctrl-C, Ctrl-D and the like go to the guest; restored on drop.
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    /// Stdin in raw mode, when it is a terminal (`None` otherwise).
    fn enter() -> Option<Self> {
        // SAFETY: isatty only reads the descriptor's state.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it from stdin, checked below.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid, writable termios.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios obtained from tcgetattr.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is a valid termios.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: `saved` is the termios tcgetattr returned for this terminal.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}

/// The terminal's size as `ROWSxCOLS` (the guest's `remio.ttysize=`), when stdin is one.
fn terminal_size() -> Option<String> {
    // SAFETY: winsize is plain data; TIOCGWINSZ fills it, the result is checked.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize to the valid pointer given.
    let r = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then(|| format!("{}x{}", ws.ws_row, ws.ws_col))
}

/// What the summary block printed before the boot says about one device.
fn describe_device(d: &DeviceSpec, interactive: bool) -> String {
    match d.kind.as_str() {
        "block" => format!(
            "/dev/vda, image {}",
            d.path.as_deref().unwrap_or(Path::new("?")).display()
        ),
        "console" => match &d.socket {
            Some(s) => format!("/dev/hvc0 on the UNIX socket {}", s.display()),
            None if interactive => "/dev/hvc0, the guest's shell, on this terminal".to_owned(),
            None => "/dev/hvc0 on remio's stdout".to_owned(),
        },
        "rng" => "/dev/hwrng".to_owned(),
        "net" => format!("eth0 on the host's TAP {}", d.tap.as_deref().unwrap_or("?")),
        "fs" => format!(
            "virtio-fs at {}, served by virtiofsd",
            crate::vhostd::SHARE_MOUNT
        ),
        "vsock" => format!(
            "vsock, guest CID {}, served by vhost-device-vsock",
            d.guest_cid.unwrap_or(0)
        ),
        other => other.to_owned(),
    }
}

/// Who runs what, for the summary block.
struct Summary<'a> {
    run_dir: &'a Path,
    platform_pid: u32,
    dm_pid: Option<u32>,
    backend_pid: Option<u32>,
    qemu_pid: u32,
    /// The stats socket (`remio stats` finds it).
    stats: Option<&'a Path>,
    serial_log: &'a Path,
    /// (kind, what the guest sees) per window, in window order.
    devices: Vec<(String, String)>,
    /// `--partition`'s CPU sets, if any.
    partition: Option<Partition>,
}

impl Summary<'_> {
    fn render(&self) -> String {
        let mut out = format!(
            "remio run: run directory {}\n  platform      pid {:<7} hypervisor model, dispatcher, QEMU bridge\n",
            self.run_dir.display(),
            self.platform_pid
        );
        if let Some(pid) = self.dm_pid {
            out.push_str(&format!(
                "  device model  pid {pid:<7} remio dm (log: its stderr)\n"
            ));
        }
        if let Some(pid) = self.backend_pid {
            out.push_str(&format!(
                "  backend VM    pid {pid:<7} QEMU: the C driver and remio dm --kernel-driver\n"
            ));
        }
        out.push_str(&format!(
            "  guest (QEMU)  pid {:<7} boot log: {}\n",
            self.qemu_pid,
            self.serial_log.display()
        ));
        if let Some(sock) = self.stats {
            out.push_str(&format!(
                "  counters      `remio stats` (socket {})\n",
                sock.display()
            ));
        }
        match &self.partition {
            Some(p) => out.push_str(&format!("  CPUs          {p}\n")),
            None => out.push_str("  CPUs          not partitioned (--partition off or one CPU)\n"),
        }
        for ((kind, what), i) in self.devices.iter().zip(0u64..) {
            out.push_str(&format!(
                "  window {i}  {:#x}  {kind:<8} {what}\n",
                MMIO_BASE + i * WINDOW
            ));
        }
        out
    }
}

/// Checks a `--config` file against the layout `remio run` gives the guest (device `i` is
/// `dm_id` i with its window at `MMIO_BASE + i * WINDOW`) and returns its device count.
fn devices_in_user_config(path: &Path) -> anyhow::Result<u32> {
    let config = remio_virtio::config::Config::from_file(path)
        .with_context(|| format!("--config {}", path.display()))?;
    check_layout(&config).with_context(|| format!("--config {}", path.display()))
}

/// See [`devices_in_user_config`].
fn check_layout(config: &remio_virtio::config::Config) -> anyhow::Result<u32> {
    let mut devices: Vec<_> = config.devices.iter().collect();
    devices.sort_by_key(|d| d.dm_id);
    if devices.is_empty() {
        bail!("no devices");
    }
    if devices.len() > remio_frontend::qemu::pci::MAX_WINDOWS {
        bail!(
            "{} devices: the guest glue takes at most {}",
            devices.len(),
            remio_frontend::qemu::pci::MAX_WINDOWS
        );
    }
    for (d, i) in devices.iter().zip(0u32..) {
        let base = MMIO_BASE + u64::from(i) * WINDOW;
        if d.dm_id != i || d.mmio_base != base {
            bail!(
                "device with dm_id {} at {:#x}: remio run numbers devices 0, 1, … with device i \
                 at mmio_base {MMIO_BASE:#x} + i * {WINDOW:#x}; expected dm_id {i} at {base:#x}",
                d.dm_id,
                d.mmio_base
            );
        }
    }
    u32::try_from(devices.len()).context("too many devices")
}

fn guest_dir(args: &Args) -> PathBuf {
    args.guest_dir
        .clone()
        .unwrap_or_else(crate::guest::default_dir)
}

/// `--net auto`: make a TAP ([`crate::hosttap`]).
const NET_AUTO: &str = "auto";

/// The TAP `remio run` makes itself: with `--net auto` (an error when it cannot), and in the
/// interactive demo unless `--net TAP` or `--no-net` (best effort: without net, saying why).
fn host_tap(args: &Args) -> anyhow::Result<Option<crate::hosttap::HostTap>> {
    let wanted = match args.net.as_deref() {
        Some(NET_AUTO) => true,
        Some(_) => return Ok(None),
        None => !args.no_net && !args.exec_mode(),
    };
    if !wanted {
        return Ok(None);
    }
    match crate::hosttap::HostTap::create() {
        Ok(tap) => {
            log::debug!(
                "net: TAP {} with the host at {} (the guest's eth0 is {})",
                tap.name(),
                crate::hosttap::HOST_ADDR,
                crate::hosttap::GUEST_ADDR
            );
            Ok(Some(tap))
        }
        Err(e) if args.net.is_some() => Err(e.context("--net auto: making a TAP")),
        Err(e) => {
            log::warn!("no TAP could be made, running without net: {e:#}");
            Ok(None)
        }
    }
}

/// Set by SIGINT/SIGTERM/SIGHUP: stop and clean up.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; the
        // sigaction struct is fully initialised (zeroed, then the handler set).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Owns everything that must go away on every exit path: the children (killed, then reaped)
/// and the temporary directory (removed unless kept). Fields drop in declaration order after
/// `drop` runs, so the bridge and platform go after the children are dead.
struct Session {
    qemu: Option<Child>,
    dm: Option<Child>,
    /// Set with `--dispatcher remio`: how to restart the device model.
    dm_launcher: Option<DmLauncher>,
    /// The backend VM's QEMU (`--dispatcher c-driver`).
    backend: Option<Child>,
    tmp: PathBuf,
    keep: bool,
}

impl Session {
    fn kill(child: &mut Option<Child>, what: &str) {
        if let Some(mut c) = child.take() {
            if matches!(c.try_wait(), Ok(None)) {
                log::debug!("killing {what} (pid {})", c.id());
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

impl Session {
    fn kill_children(&mut self) {
        Self::kill(&mut self.qemu, "QEMU");
        Self::kill(&mut self.dm, "the device model");
        Self::kill(&mut self.backend, "the backend VM's QEMU");
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.kill_children();
        if self.keep {
            eprintln!("remio: kept {}", self.tmp.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

fn make_tmp() -> anyhow::Result<PathBuf> {
    let base = std::env::temp_dir();
    for n in 0..100u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = base.join(format!("remio-run-{}-{nanos:x}-{n}", std::process::id()));
        match std::fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", p.display())),
        }
    }
    bail!(
        "could not create a temporary directory in {}",
        base.display()
    )
}

/// Runs `remio run`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let status = run_inner(&args)?;
    if let Some(code) = status {
        // Everything is cleaned up by now (run_inner's guards dropped).
        std::process::exit(code);
    }
    Ok(())
}

fn run_inner(args: &Args) -> anyhow::Result<Option<i32>> {
    let qemu = match &args.qemu {
        Some(q) => q.clone(),
        None => crate::guest::find_tool("qemu-system-x86_64").context(
            "qemu-system-x86_64 not found: run scripts/setup (or `apt-get install qemu-system-x86`)",
        )?,
    };
    let gdir = guest_dir(args);
    let (kernel, initrd) = (gdir.join("vmlinuz"), gdir.join("initramfs.cpio"));
    if !kernel.is_file() || !initrd.is_file() {
        bail!(
            "guest kernel/initramfs not found in {}: build them with `remio guest build` \
             (or run scripts/setup)",
            gdir.display()
        );
    }
    if let Some(why) = crate::guest::stale_reason(&gdir) {
        log::warn!("{why}");
    }
    let memory = args
        .memory
        .checked_mul(1 << 20)
        .context("--memory too large")?;
    let ram = GuestRam::new(memory).context("--memory")?;
    if args.dispatcher.in_backend_vm() {
        check_c_driver_args(args)?;
    }

    let partition = args.partition.resolve().context("--partition")?;
    if let Some(p) = &partition {
        // Before any thread or process starts: they inherit the frontend set.
        p.enter_frontend()
            .with_context(|| format!("--partition: {p}"))?;
        log::debug!("partition: {p}");
    }
    install_signal_handlers();
    let tmp = make_tmp()?;
    let mut session = Session {
        qemu: None,
        dm: None,
        dm_launcher: None,
        backend: None,
        tmp: tmp.clone(),
        keep: args.keep,
    };

    // With --config the user's file says what to serve; otherwise the plan from the flags.
    let host_tap = if args.config.is_none() {
        host_tap(args)?
    } else {
        None
    };
    let exec_mode = args.exec_mode();
    // Read (and checked) before anything starts: a missing --copy-in file is an error now.
    let files = guest_files(args)?;
    // --share / --vsock: checked (and their daemons found) now, started before the DM.
    let vhost = crate::vhostd::Plan::new(args.share.as_deref(), args.vsock, &tmp)?;
    let initrd = initrd_with(&initrd, &files, &tmp.join("initrd.cpio"))?;
    let mut c_driver = None;
    let (n, dm_config, described) = match &args.config {
        Some(c) => {
            let n = devices_in_user_config(c)?;
            if args.dispatcher.in_backend_vm() {
                let config = remio_virtio::config::Config::from_file(c)
                    .with_context(|| format!("--config {}", c.display()))?;
                let devices = plan_from_config(&config)
                    .with_context(|| format!("--config {}", c.display()))?;
                let hook = args.backend_hook.as_deref();
                c_driver = Some(CDriverPlan::new(
                    &devices,
                    &gdir,
                    &tmp,
                    hook,
                    args.dispatcher,
                )?);
            }
            (n, c.clone(), user_config_devices(c))
        }
        None => {
            let mut devices = planned_devices(args, &tmp, host_tap.as_ref())?;
            vhost.add_devices(&mut devices);
            let described = devices
                .iter()
                .map(|d| (d.kind.clone(), describe_device(d, !exec_mode)))
                .collect();
            let n = u32::try_from(devices.len()).context("too many devices")?;
            if args.dispatcher.in_backend_vm() {
                let hook = args.backend_hook.as_deref();
                c_driver = Some(CDriverPlan::new(
                    &devices,
                    &gdir,
                    &tmp,
                    hook,
                    args.dispatcher,
                )?);
            }
            let path = tmp.join("devices.toml");
            let text = toml::to_string(&DmConfig { device: devices })
                .context("serialising the device-model config")?;
            std::fs::write(&path, text)?;
            (n, path, described)
        }
    };
    let _daemons = on_backend(partition.as_ref(), || vhost.start())?;
    if let Some(host) = vhost.vsock_host_socket() {
        eprintln!(
            "remio: vsock: host programs connect to {} (send `CONNECT <port>\\n`); the guest's \
             connections to CID 2 port P reach a host program listening on {}_P",
            host.display(),
            host.display()
        );
    }
    let hyp = Hypervisor::new(hyp_config(
        n,
        &ram,
        (args.access_timeout_ms > 0).then(|| Duration::from_millis(args.access_timeout_ms)),
    )?)
    .context("hypervisor model configuration")?;

    let frontend = hyp.frontend(FRONTEND_VM).context("frontend VM missing")?;
    let ivshmem = tmp.join("ivshmem.sock");
    let bridge = Bridge::for_frontend(&frontend, &ram, &ivshmem, &crate::failover::virtio_window)
        .context("starting the QEMU bridge")?;
    // The demo's shell is on hvc0, served by the device model (on this terminal or on
    // --console-socket; with the c-driver through the backend VM's serial port on a socket);
    // without one (--no-console, --config) it is on the serial port, on this terminal.
    let hvc0_shell = !exec_mode && args.config.is_none() && !args.no_console;
    let console_on_terminal = hvc0_shell && args.console_socket.is_none();
    let serial_piped = exec_mode || hvc0_shell;
    let serving = match args.dispatcher {
        Dispatcher::Remio => {
            let platform = start_remio_dispatcher(
                &mut session,
                &hyp,
                &tmp,
                &dm_config,
                n,
                DmStdio {
                    stdin_terminal: console_on_terminal,
                    // Only a stdio console needs it: else the device model's own stdout lines
                    // (REMIO-DM-READY) would mix with the script's output.
                    stdout: args.config.is_some()
                        || !(args.no_console || args.console_socket.is_some()),
                },
                partition,
            )?;
            Serving::Remio {
                _platform: platform,
            }
        }
        Dispatcher::CDriver | Dispatcher::RustKmod => {
            let backend = c_driver.as_mut().context("c-driver plan missing")?;
            backend.console_stdin = console_on_terminal;
            Serving::CDriver(on_backend(partition.as_ref(), || {
                start_backend_vm(&mut session, args, backend, &hyp, &ram, &qemu, n)
            })?)
        }
    };

    let dm_restarts = Arc::new(AtomicU32::new(0));
    let snapshot = snapshot_fn(&serving, &hyp, &bridge, &dm_restarts);
    let stats_server = start_stats(&snapshot);

    let mut cmdline_extra = Vec::new();
    if host_tap.is_some() {
        cmdline_extra.push(format!("remio.net={}", crate::hosttap::GUEST_ADDR));
    }
    cmdline_extra.extend(vhost.cmdline());
    if hvc0_shell {
        cmdline_extra.push("remio.console=hvc0".to_owned());
        if console_on_terminal {
            if let Some(size) = terminal_size() {
                cmdline_extra.push(format!("remio.ttysize={size}"));
            }
        }
    }
    let cmdline_extra = cmdline_extra.join(" ");
    let opts = QemuOptions {
        qemu,
        kernel,
        initrd,
        cmdline_extra,
        extra_args: vec![],
    };
    let mut qcmd = bridge.qemu_command(&opts);
    // The serial port (the boot log, /init's markers) comes to us; the terminal is the
    // device model's (the demo's shell on hvc0) or ours (--exec's output).
    if serial_piped {
        qcmd.stdin(Stdio::null()).stdout(Stdio::piped());
    }
    let mut qemu_child = qcmd.spawn().context("starting QEMU")?;
    log::debug!("QEMU pid {}", qemu_child.id());
    let serial_log = tmp.join("serial.log");
    if !exec_mode || args.verbose {
        let summary = Summary {
            run_dir: &tmp,
            platform_pid: std::process::id(),
            dm_pid: session.dm.as_ref().map(Child::id),
            backend_pid: session.backend.as_ref().map(Child::id),
            qemu_pid: qemu_child.id(),
            stats: stats_server.as_ref().map(crate::stats::StatsServer::path),
            serial_log: if serial_piped {
                &serial_log
            } else {
                Path::new("this terminal")
            },
            devices: described,
            partition,
        };
        eprint!("{}", summary.render());
        if hvc0_shell {
            eprintln!(
                "  (the run directory is removed at exit unless --keep; `exit` or Ctrl-D in the \
                 guest's shell ends the demo)"
            );
        }
    }
    let console = qemu_child.stdout.take();
    session.qemu = Some(qemu_child);

    let timeout = args
        .timeout
        .or(exec_mode.then_some(300))
        .map(Duration::from_secs);
    let exit = Arc::new(std::sync::Mutex::new(None::<i32>));
    let log_file =
        File::create(&serial_log).with_context(|| format!("creating {}", serial_log.display()))?;
    // The terminal is the guest shell's until QEMU is gone (dropped before the session's
    // messages, on every path).
    let raw = console_on_terminal.then(RawTerminal::enter).flatten();
    let reader = console.map(|out| {
        let exit = Arc::clone(&exit);
        let pump = ConsolePump {
            exec: exec_mode,
            verbose: args.verbose,
            raw: raw.is_some(),
        };
        std::thread::spawn(move || pump.run(out, log_file, &exit))
    });

    let started = Instant::now();
    // Whether every device has a device-model session (someone serves it: ours, or one that
    // took over with `remio dm --takeover`), and how many sessions the devices have had.
    let sessions = || match &serving {
        Serving::Remio { _platform: p } => {
            (0..n).fold((true, 0), |(all, total), i| match p.dispatcher().dm(i) {
                Ok(dm) => (
                    all && dm.has_control_client(),
                    total + dm.control_sessions(),
                ),
                Err(_) => (false, total),
            })
        }
        _ => (true, 0),
    };
    let qemu_status = supervise(
        &mut session,
        &bridge,
        n,
        timeout,
        started,
        DmRestarts {
            limit: args.dm_restarts.unwrap_or(DEFAULT_DM_RESTARTS),
            count: &dm_restarts,
            sessions: &sessions,
        },
    );
    // The final counters, while the device model still answers for its devices.
    let final_stats = args.stats_json.is_some().then(|| snapshot());
    // QEMU must be gone before the console reader can see the end of its output.
    session.kill_children();
    drop(raw);
    let qemu_status = qemu_status?;
    if let Serving::CDriver(b) = &serving {
        b.report();
    }
    if let Some(r) = reader {
        let _ = r.join();
    }
    let (n_bar, mean_ns) = bridge.stats().bar_summary();
    let hs = hyp.stats();
    log::info!(
        "{n_bar} register accesses through the bridge, mean {:.1} us each in remio; \
         hypervisor: {} requests, {} timeouts",
        mean_ns as f64 / 1000.0,
        hs.requests,
        hs.timeouts
    );
    // Children first (QEMU must not outlive the bridge), then the bridge and the platform,
    // then the temporary directory they had their sockets in.
    session.kill_children();
    drop(stats_server);
    if let (Some(path), Some(final_stats)) = (&args.stats_json, &final_stats) {
        let text =
            serde_json::to_string_pretty(final_stats).context("serialising the final counters")?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("--stats-json {}", path.display()))?;
    }
    drop(snapshot);
    drop(bridge);
    drop(serving);
    drop(session);
    drop(host_tap);

    if !serial_piped {
        // The shell was on the serial port, on this terminal: its status was not seen.
        return Ok(None);
    }
    let status = *exit
        .lock()
        .map_err(|_| anyhow::anyhow!("console reader panicked"))?;
    match (status, qemu_status) {
        (Some(s), _) => Ok(Some(s)),
        (None, Outcome::TimedOut) => bail!("the guest did not finish within the timeout"),
        (None, Outcome::Interrupted) => bail!("interrupted"),
        (None, Outcome::Exited(st)) => {
            bail!("the guest stopped without reporting a status (QEMU {st})")
        }
    }
}

/// Takes a snapshot of the run's counters ([`crate::stats::Snapshot`]).
type SnapshotFn = Arc<dyn Fn() -> crate::stats::Snapshot + Send + Sync>;

/// Serves the run's counters for `remio stats` ([`crate::stats`]); a socket that cannot be
/// made is a warning, not an error of the run.
fn start_stats(snapshot: &SnapshotFn) -> Option<crate::stats::StatsServer> {
    let dir = crate::stats::run_dir();
    let snapshot = Arc::clone(snapshot);
    match crate::stats::StatsServer::start(&dir, move || snapshot()) {
        Ok(s) => Some(s),
        Err(e) => {
            log::warn!("no stats socket (remio stats will not find this run): {e:#}");
            None
        }
    }
}

/// The run's counters: the dispatcher's per DM (none with the C driver, whose counters live in
/// the backend VM), the hypervisor model's and the bridge's.
fn snapshot_fn(
    serving: &Serving,
    hyp: &Arc<Hypervisor>,
    bridge: &Bridge,
    dm_restarts: &Arc<AtomicU32>,
) -> SnapshotFn {
    use crate::stats::Snapshot;
    let dispatcher = match serving {
        Serving::Remio { _platform: p } => Some(Arc::clone(p.dispatcher())),
        Serving::CDriver(_) => None,
    };
    let api_socket = match serving {
        Serving::Remio { _platform: p } => p.socket_path().map(Path::to_path_buf),
        Serving::CDriver(_) => None,
    };
    let hyp = Arc::clone(hyp);
    let bridge_stats = bridge.stats();
    let restarts = Arc::clone(dm_restarts);
    let started = Instant::now();
    let snapshot = move || {
        let hs = hyp.stats();
        let (bridge_accesses, bridge_mean_ns) = bridge_stats.bar_summary();
        let mut dms = crate::stats::platform_dms(&hyp, dispatcher.as_deref());
        if let Some(api) = &api_socket {
            crate::stats::attach_devices(&mut dms, &crate::stats::run_dir(), api);
        }
        Snapshot {
            pid: std::process::id(),
            uptime_s: started.elapsed().as_secs(),
            dm_restarts: restarts.load(Ordering::Relaxed),
            requests: hs.requests,
            completions: hs.completions,
            timeouts: hs.timeouts,
            interrupts: hs.notifies,
            bridge_accesses,
            bridge_mean_ns,
            dms,
        }
    };
    Arc::new(snapshot)
}

/// The devices of a `--config` file for the summary block: (kind, where it comes from).
fn user_config_devices(path: &Path) -> Vec<(String, String)> {
    let Ok(config) = remio_virtio::config::Config::from_file(path) else {
        return Vec::new();
    };
    let mut devices: Vec<_> = config.devices.iter().collect();
    devices.sort_by_key(|d| d.dm_id);
    devices
        .iter()
        .map(|d| {
            let kind = format!("{:?}", d.kind);
            let kind = kind
                .split(|c: char| !c.is_alphanumeric())
                .next()
                .unwrap_or("?")
                .to_lowercase();
            (kind, format!("from {}", path.display()))
        })
        .collect()
}

/// Who serves the frontend's devices while the guest runs; dropped after the children died.
enum Serving {
    /// `--dispatcher remio`: the platform (dispatcher + API socket) in this process.
    Remio {
        /// Held until the guest is gone.
        _platform: Platform,
    },
    /// `--dispatcher c-driver`: the backend VM's hypercall window and doorbell.
    CDriver(BackendVmRun),
}

/// Runs `start` with the calling thread on the backend's CPUs when the run is partitioned, so
/// that the threads and processes it starts are the backend's (see [`crate::partition`]).
fn on_backend<T>(
    partition: Option<&Partition>,
    start: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    match partition {
        Some(p) => p.on_backend(start).context("--partition")?,
        None => start(),
    }
}

/// `--dispatcher remio`: starts the platform (dispatcher and API socket) around `hyp` and a
/// `remio dm` process on `dm_config` (on the backend's CPUs when `partition` is given), and
/// waits until it serves all `n` devices.
fn start_remio_dispatcher(
    session: &mut Session,
    hyp: &Arc<Hypervisor>,
    tmp: &Path,
    dm_config: &Path,
    n: u32,
    stdio: DmStdio,
    partition: Option<Partition>,
) -> anyhow::Result<Platform> {
    let api_socket = tmp.join("api.sock");
    // The API's threads (and the irqfd threads they start) serve the device models.
    let platform = on_backend(partition.as_ref(), || {
        Platform::with_hypervisor(Arc::clone(hyp), BACKEND_VM, Some(&api_socket))
    })
    .context("starting the platform")?;
    let launcher = DmLauncher {
        exe: std::env::current_exe().context("locating the remio binary")?,
        config: dm_config.to_owned(),
        socket: api_socket,
        stdio,
        partition,
    };
    let dm = launcher.spawn(0)?;
    log::debug!("device model pid {}", dm.id());
    session.dm = Some(dm);
    session.dm_launcher = Some(launcher);
    wait_for_device_model(session, &platform, n)?;
    Ok(platform)
}

/// How to start (and restart) the device-model process of `--dispatcher remio`.
#[derive(Debug)]
struct DmLauncher {
    exe: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    stdio: DmStdio,
    /// Where device models start (`--partition`).
    partition: Option<Partition>,
}

/// What the device model's stdin and stdout are.
#[derive(Clone, Copy, Debug)]
struct DmStdio {
    /// Ours (the demo: its stdio console is the guest's shell on this terminal), else null.
    stdin_terminal: bool,
    /// Ours (a stdio console's output), else null.
    stdout: bool,
}

impl DmLauncher {
    /// Starts device model number `generation` of this run (0 the first, `k` the `k`-th
    /// restart), which it is told in `REMIO_DM_GENERATION` (the crash-point test hook arms
    /// one point per generation, `crates/virtio/src/crash_point.rs`).
    fn spawn(&self, generation: u32) -> anyhow::Result<Child> {
        let mut cmd = Command::new(&self.exe);
        // SAFETY: prctl is async-signal-safe; the closure touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // The device model must not outlive `remio run`, even if that is SIGKILLed.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        if let Some(p) = &self.partition {
            p.backend_command(&mut cmd);
            // On one CPU a device model does not poll by default, lest it spin on the CPU the
            // guest needs; partitioned, that CPU is the backend's own, as under Bao.
            let poll = remio_virtio::devices::block::POLL_MAX_ENV;
            if std::env::var_os(poll).is_none() {
                cmd.env(
                    poll,
                    remio_virtio::devices::block::DEFAULT_POLL_MAX_US.to_string(),
                );
            }
        }
        cmd.arg("dm")
            .arg("--config")
            .arg(&self.config)
            .arg("--socket")
            .arg(&self.socket)
            .stdin(if self.stdio.stdin_terminal {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .env("REMIO_DM_GENERATION", generation.to_string());
        // Its start-up INFO lines would repeat the summary `remio run` prints.
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        // A stdio console's output comes through a pipe, copied to our stdout without the
        // device model's own REMIO-DM-* lines (for scripts and the backend VM, not for the user).
        let pipe = if self.stdio.stdout {
            let (r, w) = std::io::pipe().context("a pipe for the device model's stdout")?;
            cmd.stdout(w);
            Some(r)
        } else {
            None
        };
        let child = cmd
            .spawn()
            .context("starting the device model (remio dm)")?;
        // The write end went with the device model: the copy ends when it exits.
        drop(cmd);
        if let Some(r) = pipe {
            std::thread::Builder::new()
                .name("remio-dm-stdout".into())
                .spawn(move || copy_console(r))
                .context("starting the console copier")?;
        }
        Ok(child)
    }
}

/// Copies a device model's stdout to ours through a [`MarkerFilter`].
fn copy_console(mut from: impl std::io::Read) {
    let mut filter = MarkerFilter::default();
    let mut buf = [0u8; 4096];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let out = filter.feed(&buf[..n]);
        if !out.is_empty() {
            let mut o = std::io::stdout().lock();
            let _ = o.write_all(&out);
            let _ = o.flush();
        }
    }
}

/// Drops the `REMIO-DM-FAILED …` / `REMIO-DM-READY <n>` lines a device model prints first on
/// its stdout (before any console output: the guest has not started, or a restarted device
/// model has not yet taken a request); everything from the first other byte on passes as it is.
#[derive(Debug, Default)]
struct MarkerFilter {
    /// Past the leading markers: pass everything.
    passing: bool,
    /// The start of a line not yet known to be a marker or not.
    head: Vec<u8>,
}

impl MarkerFilter {
    const PREFIX: &'static [u8] = b"REMIO-DM-";

    /// What of `data` to forward.
    fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        if self.passing {
            return data.to_vec();
        }
        self.head.extend_from_slice(data);
        loop {
            let n = self.head.len().min(Self::PREFIX.len());
            if self.head[..n] != Self::PREFIX[..n] {
                self.passing = true;
                return std::mem::take(&mut self.head);
            }
            let Some(nl) = self.head.iter().position(|&b| b == b'\n') else {
                return Vec::new();
            };
            let ready = self.head.starts_with(b"REMIO-DM-READY ");
            self.head.drain(..=nl);
            if ready {
                self.passing = true;
                return std::mem::take(&mut self.head);
            }
        }
    }
}

/// The pause before a device model's restart when it is the `n`-th (1-based) in a row of
/// device models that died within [`DM_STABLE`] of starting: none for the first (a crash: the
/// guest is waiting), then 50 ms doubling to at most 1.6 s, so that a device model that cannot
/// stay up is not restarted in a tight loop.
fn restart_backoff(n: u32) -> Duration {
    match n {
        0 | 1 => Duration::ZERO,
        n => Duration::from_millis(50u64 << (n - 2).min(5)),
    }
}

/// Where the frontend's disk is inside the backend VM: the backend QEMU's virtio-blk-pci.
pub const BACKEND_DISK: &str = "/dev/vda";
/// The backend VM's RAM in MiB.
pub const BACKEND_RAM_MIB: u64 = remio_frontend::qemu::backend::DEFAULT_RAM_MIB;
/// How long the backend VM may take from QEMU's start to `REMIO-DM-READY` (a TCG boot of q35,
/// the modules and `remio dm`; about 10 s idle, several times that with both cores busy).
const BACKEND_START_TIMEOUT: Duration = Duration::from_secs(100);
/// How many lines of the backend's serial console an error of `remio run` quotes.
const BACKEND_TAIL_LINES: usize = 30;

/// `--dm-restarts` when not given (`--dispatcher remio`).
const DEFAULT_DM_RESTARTS: u32 = 5;

/// The options `--dispatcher c-driver` cannot honour, refused before anything starts.
fn check_c_driver_args(args: &Args) -> anyhow::Result<()> {
    if let Some(n) = args.dm_restarts.filter(|&n| n > 0) {
        bail!(
            "--dm-restarts {n}: with --dispatcher c-driver a device model cannot be restarted: \
             the posted driver destroys a DM when the device model's fd is closed (its exit), \
             so a new one would find no device to resume; the backend VM powers off when its \
             device model exits and the guest's devices fail their requests. Leave \
             --dm-restarts out (or 0) with the c-driver; restart works on remio's dispatcher \
             (docs/architecture.md, \"Device-model restart\")"
        );
    }
    let ram = args.memory.checked_mul(1 << 20).unwrap_or(0);
    if !ram.is_power_of_two() {
        bail!(
            "--memory {}: with --dispatcher c-driver the frontend's RAM is the backend VM's \
             shared memory, a PCI BAR whose size must be a power of two (128, 256, 512, 1024 or \
             2048)",
            args.memory
        );
    }
    Ok(())
}

/// The device model's TAP inside the backend VM, bridged there with the backend's NIC on the
/// host's TAP (guest/backend/init, `remio.bridge=`).
pub const BACKEND_NET_TAP: &str = "remio-dm0";
/// The device model's console inside the backend VM: a PTY symlinked here, relayed by the
/// backend's /init to the serial port QEMU connects to a host socket (`remio.console=`).
pub const BACKEND_CONSOLE_PTY: &str = "/dev/remio-console";

/// What the backend VM serves and how it reaches the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendPlan {
    /// The devices of `remio dm --kernel-driver` inside the backend VM.
    pub devices: Vec<DeviceSpec>,
    /// The host image the backend's QEMU attaches as virtio-blk ([`BACKEND_DISK`] inside).
    pub disk: PathBuf,
    /// The frontend's console on the host: our stdio or a UNIX socket (QEMU's end of the
    /// backend's second serial port), when there is a console.
    pub console: Option<ConsoleMode>,
    /// The host TAP the backend VM's NIC is on, when there is a net device.
    pub net_tap: Option<String>,
}

/// One device of the backend's device-model config: a [`DeviceSpec`] and the console's PTY
/// alias (a key only the backend needs).
#[derive(Debug, serde::Serialize)]
struct BackendDevice<'a> {
    #[serde(flatten)]
    spec: &'a DeviceSpec,
    #[serde(skip_serializing_if = "Option::is_none")]
    pty_alias: Option<&'a str>,
}

#[derive(Debug, serde::Serialize)]
struct BackendDmConfig<'a> {
    device: Vec<BackendDevice<'a>>,
}

impl BackendPlan {
    /// The device-model config (TOML) of `remio dm --kernel-driver` inside the backend VM.
    pub fn dm_config_toml(&self) -> anyhow::Result<String> {
        let device = self
            .devices
            .iter()
            .map(|spec| BackendDevice {
                spec,
                pty_alias: (spec.kind == "console").then_some(BACKEND_CONSOLE_PTY),
            })
            .collect();
        toml::to_string(&BackendDmConfig { device })
            .context("serialising the backend's device-model config")
    }

    /// The backend kernel's command-line words for /init: `remio.console=ttyS1` (relay the
    /// console's PTY to the serial port on the host socket) and `remio.bridge=TAP` (bridge
    /// the device model's TAP with the NIC on the host's TAP).
    pub fn cmdline(&self) -> Vec<String> {
        let mut words = Vec::new();
        if self.console.is_some() {
            words.push(format!(
                "remio.console={}",
                remio_frontend::qemu::backend::CONSOLE_TTY
            ));
        }
        if self.net_tap.is_some() {
            words.push(format!("remio.bridge={BACKEND_NET_TAP}"));
        }
        words
    }
}

/// The backend VM's plan for `plan`'s devices: the block image at [`BACKEND_DISK`], the
/// console on a PTY the backend relays to the host ([`BACKEND_CONSOLE_PTY`]), net on a TAP
/// bridged to the host's ([`BACKEND_NET_TAP`]), and `shmem_addr = 0` (the frontend's RAM
/// starts at its guest-physical 0). A second block device cannot be served in the backend VM.
pub fn backend_device_plan(plan: &[DeviceSpec]) -> anyhow::Result<BackendPlan> {
    let mut disk = None;
    let mut console = None;
    let mut net_tap = None;
    let mut out = Vec::with_capacity(plan.len());
    for d in plan {
        let mut b = DeviceSpec {
            shmem_addr: Some(0),
            ..d.clone()
        };
        match d.kind.as_str() {
            "block" => {
                let Some(path) = &d.path else {
                    bail!("block device {} has no image", d.dm_id);
                };
                if disk.replace(path.clone()).is_some() {
                    bail!("--dispatcher c-driver serves one block device (the backend's /dev/vda)");
                }
                b.path = Some(PathBuf::from(BACKEND_DISK));
            }
            "console" => {
                let host = match (d.backend.as_deref(), &d.socket) {
                    (Some("socket"), Some(path)) => ConsoleMode::Socket(path.clone()),
                    (None | Some("stdio"), _) => ConsoleMode::Stdio,
                    (other, _) => bail!(
                        "--dispatcher c-driver serves the console on stdio or a UNIX socket, not \
                         {}",
                        other.unwrap_or("?")
                    ),
                };
                if console.replace(host).is_some() {
                    bail!("--dispatcher c-driver serves one console");
                }
                b.backend = Some("pty".into());
                b.socket = None;
            }
            "net" => {
                let Some(tap) = d
                    .tap
                    .clone()
                    .filter(|_| d.backend.as_deref() == Some("tap"))
                else {
                    bail!("--dispatcher c-driver serves net on a host TAP only");
                };
                if net_tap.replace(tap).is_some() {
                    bail!("--dispatcher c-driver serves one net device (the backend's eth0)");
                }
                b.tap = Some(BACKEND_NET_TAP.to_owned());
            }
            "rng" => {}
            other => bail!("--dispatcher c-driver cannot serve a {other} device"),
        }
        out.push(b);
    }
    let disk = disk.context("--dispatcher c-driver needs a block device")?;
    Ok(BackendPlan {
        devices: out,
        disk,
        console,
        net_tap,
    })
}

/// The devices of a `--config` file (already checked by [`check_layout`]) as `remio run`'s
/// own plan, for `--dispatcher c-driver`: what the backend VM can carry (block on a host
/// image, console on stdio or a UNIX socket, rng, net on a host TAP). Options it cannot carry
/// are refused by name rather than dropped.
pub fn plan_from_config(config: &remio_virtio::config::Config) -> anyhow::Result<Vec<DeviceSpec>> {
    use remio_virtio::config::{ConsoleBackend, DeviceKind, NetBackendConfig};
    let mut devices: Vec<_> = config.devices.iter().collect();
    devices.sort_by_key(|d| d.dm_id);
    let mut out = Vec::with_capacity(devices.len());
    for d in devices {
        let refuse = |what: &str| {
            anyhow::anyhow!(
                "device {}: --dispatcher c-driver cannot carry {what} into the backend VM \
                 (see docs/c-driver.md)",
                d.dm_id
            )
        };
        // `device_plan`'s block device as the template: every optional field empty.
        let mut spec = DeviceSpec {
            dm_id: d.dm_id,
            mmio_base: d.mmio_base,
            path: None,
            ..device_plan(Path::new(""), ConsoleMode::Off, false, None)[0].clone()
        };
        if d.shmem_addr.is_some() || d.shmem_size.is_some() || d.irq.is_some() {
            return Err(refuse(
                "shmem_addr, shmem_size or irq (remio run places the shared memory)",
            ));
        }
        match &d.kind {
            DeviceKind::Block(b) => {
                if b.read_only || b.serial.is_some() {
                    return Err(refuse("read_only or serial"));
                }
                spec.kind = "block".into();
                spec.path = Some(std::path::absolute(&b.path)?);
            }
            DeviceKind::Console(c) => {
                spec.kind = "console".into();
                match &c.backend {
                    ConsoleBackend::Stdio => spec.backend = Some("stdio".into()),
                    ConsoleBackend::Socket(p) => {
                        spec.backend = Some("socket".into());
                        spec.socket = Some(std::path::absolute(p)?);
                    }
                    ConsoleBackend::Pty { .. } => {
                        return Err(refuse(
                            "a pty console (use backend = \"socket\" or \"stdio\")",
                        ))
                    }
                }
            }
            DeviceKind::Rng(r) => {
                if r.rate.is_some() {
                    return Err(refuse("an rng rate"));
                }
                spec.kind = "rng".into();
            }
            DeviceKind::Net(n) => {
                let NetBackendConfig::Tap(tap) = &n.backend else {
                    return Err(refuse("a net socket backend (use a tap)"));
                };
                if n.mac.is_some() {
                    return Err(refuse("a net mac"));
                }
                spec.kind = "net".into();
                spec.backend = Some("tap".into());
                spec.tap = Some(tap.clone());
            }
            DeviceKind::VhostUser(_) => return Err(refuse("a vhost-user device")),
        }
        out.push(spec);
    }
    Ok(out)
}

/// What `--dispatcher c-driver` boots besides the frontend: the backend VM's initramfs (with
/// the overlay appended), its disk, and the device-model config inside it.
#[derive(Debug)]
struct CDriverPlan {
    /// The backend VM's kernel (the frontend's).
    kernel: PathBuf,
    /// The backend initramfs with the overlay archive appended, in the run directory.
    initrd: PathBuf,
    /// The host image the backend's QEMU attaches as virtio-blk.
    disk: PathBuf,
    /// The backend kernel's command-line words for its /init ([`BackendPlan::cmdline`]).
    cmdline: Vec<String>,
    /// The frontend console's and net's ways to the host.
    ports: remio_frontend::qemu::backend::BackendPorts,
    /// The console is ours (stdio): `remio run` connects to its socket and copies it.
    console_to_stdio: bool,
    /// And our stdin goes to it (the interactive demo's shell on this terminal).
    console_stdin: bool,
    /// The backend VM's serial console, in the run directory.
    serial_log: PathBuf,
    /// The backend QEMU's own messages, in the run directory.
    qemu_log: PathBuf,
}

impl CDriverPlan {
    /// Writes the backend's device-model config (`backend-dm.toml`) and initramfs
    /// (`backend-initrd.cpio`) into `tmp`. Fails with helper B's reason when the backend
    /// artifacts are missing.
    fn new(
        devices: &[DeviceSpec],
        gdir: &Path,
        tmp: &Path,
        hook: Option<&Path>,
        dispatcher: Dispatcher,
    ) -> anyhow::Result<Self> {
        let backend = backend_device_plan(devices)?;
        let toml_text = backend.dm_config_toml()?;
        std::fs::write(tmp.join("backend-dm.toml"), &toml_text)?;
        let exe = std::env::current_exe().context("locating the remio binary")?;
        let initrd = tmp.join("backend-initrd.cpio");
        let extra = match hook {
            Some(path) => vec![(
                "etc/remio/backend.sh".to_owned(),
                std::fs::read(path)
                    .with_context(|| format!("--backend-hook {}", path.display()))?,
                0o644,
            )],
            None => Vec::new(),
        };
        let artifacts = match dispatcher {
            Dispatcher::RustKmod => crate::guest::rust_kmod_backend_artifacts(),
            _ => crate::guest::backend_status(gdir),
        };
        let kernel = write_backend_initrd(artifacts, &exe, &toml_text, &extra, &initrd).context(
            match dispatcher {
                Dispatcher::RustKmod => "--dispatcher rust-kmod",
                _ => "--dispatcher c-driver",
            },
        )?;
        // The console's host end: the user's socket, or one in the run directory that we
        // connect to and copy to our stdio.
        let console_socket = match &backend.console {
            None => None,
            Some(ConsoleMode::Socket(path)) => Some(path.clone()),
            Some(_) => Some(tmp.join("backend-console.sock")),
        };
        Ok(Self {
            kernel,
            initrd,
            cmdline: backend.cmdline(),
            ports: remio_frontend::qemu::backend::BackendPorts {
                console_socket,
                net_tap: backend.net_tap.clone(),
            },
            console_to_stdio: matches!(backend.console, Some(ConsoleMode::Stdio)),
            console_stdin: false,
            disk: backend.disk,
            serial_log: tmp.join("backend-serial.log"),
            qemu_log: tmp.join("backend-qemu.log"),
        })
    }
}

/// Writes the backend VM's initramfs to `out`: the cached `backend-initramfs.cpio` of
/// `remio guest build` with [`crate::guest::backend_overlay`]'s archive appended (`exe` as
/// /usr/bin/remio, `dm_toml` as /etc/remio/dm.toml). Returns the kernel to boot it with. Fails
/// with the reason when the backend VM was not built (no patch, no build, modified files).
fn write_backend_initrd(
    artifacts: Result<crate::guest::backend::BackendArtifacts, String>,
    exe: &Path,
    dm_toml: &str,
    extra: &[(String, Vec<u8>, u32)],
    out: &Path,
) -> anyhow::Result<PathBuf> {
    let artifacts =
        artifacts.map_err(|why| anyhow::anyhow!("the backend VM is unavailable: {why}"))?;
    let mut initrd = std::fs::read(&artifacts.initramfs)
        .with_context(|| format!("reading {}", artifacts.initramfs.display()))?;
    // newc archives are 4-byte aligned; the kernel skips zero padding between them.
    initrd.resize(initrd.len().next_multiple_of(4), 0);
    initrd.extend(crate::guest::backend_overlay(exe, dm_toml, extra)?);
    std::fs::write(out, &initrd).with_context(|| format!("writing {}", out.display()))?;
    Ok(artifacts.kernel)
}

/// A marker line of the backend VM's serial console (guest/backend/init, `remio dm`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendLine {
    /// `REMIO-BACKEND-STEP <name> ok`.
    Step(String),
    /// `REMIO-BACKEND-FAILED <name>`.
    Failed(String),
    /// `REMIO-BACKEND-DM-EXIT <status>`.
    DmExit(String),
    /// `REMIO-DM-READY <n>`: the device model serves `n` devices.
    DmReady(u32),
    /// Anything else.
    Text,
}

/// Classifies one line of the backend's serial console.
pub fn backend_line(line: &str) -> BackendLine {
    let line = line.trim_end_matches(['\r', '\n']);
    // A kernel message may precede a marker on the same line (the console is shared).
    let line = ["REMIO-BACKEND-", "REMIO-DM-READY "]
        .iter()
        .find_map(|m| line.find(m))
        .map_or(line, |at| &line[at..]);
    if let Some(rest) = line.strip_prefix("REMIO-BACKEND-STEP ") {
        if let Some(name) = rest.trim_end().strip_suffix(" ok") {
            return BackendLine::Step(name.to_owned());
        }
    }
    if let Some(name) = line.strip_prefix("REMIO-BACKEND-FAILED ") {
        return BackendLine::Failed(name.trim().to_owned());
    }
    if let Some(st) = line.strip_prefix("REMIO-BACKEND-DM-EXIT ") {
        return BackendLine::DmExit(st.trim().to_owned());
    }
    if let Some(n) = line.strip_prefix("REMIO-DM-READY ") {
        if let Ok(n) = n.trim().parse() {
            return BackendLine::DmReady(n);
        }
    }
    BackendLine::Text
}

/// What the backend's serial console has said so far.
#[derive(Debug, Default)]
struct BackendState {
    last_step: Option<String>,
    failed: Option<String>,
    dm_exit: Option<String>,
    ready: Option<u32>,
    /// The console closed (QEMU exited).
    closed: bool,
    tail: std::collections::VecDeque<String>,
}

/// Copies the backend QEMU's serial console into its log file, echoes it with `-v`, and
/// records the markers.
struct BackendWatch {
    state: Arc<(std::sync::Mutex<BackendState>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BackendWatch {
    fn start(out: impl std::io::Read + Send + 'static, log: File, verbose: bool) -> Self {
        let state = Arc::new((
            std::sync::Mutex::new(BackendState::default()),
            std::sync::Condvar::new(),
        ));
        let st = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("remio-backend-console".into())
            .spawn(move || {
                let mut log = std::io::BufWriter::new(log);
                for line in BufReader::new(out).split(b'\n') {
                    let Ok(line) = line else { break };
                    let _ = log.write_all(&line);
                    let _ = log.write_all(b"\n");
                    let _ = log.flush();
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end_matches('\r');
                    if verbose {
                        eprintln!("backend| {text}");
                    }
                    let (lock, cv) = &*st;
                    let Ok(mut s) = lock.lock() else { break };
                    match backend_line(text) {
                        BackendLine::Step(name) => s.last_step = Some(name),
                        BackendLine::Failed(name) => s.failed = Some(name),
                        BackendLine::DmExit(status) => s.dm_exit = Some(status),
                        BackendLine::DmReady(n) => s.ready = Some(n),
                        BackendLine::Text => {}
                    }
                    if s.tail.len() == BACKEND_TAIL_LINES {
                        s.tail.pop_front();
                    }
                    s.tail.push_back(text.to_owned());
                    cv.notify_all();
                }
                let (lock, cv) = &*st;
                if let Ok(mut s) = lock.lock() {
                    s.closed = true;
                }
                cv.notify_all();
            })
            .ok();
        Self { state, thread }
    }
}

impl Drop for BackendWatch {
    fn drop(&mut self) {
        // The console ends when QEMU is gone (the session kills it before this drops).
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The backend VM while it runs: the platform's side of it and its console.
struct BackendVmRun {
    host: remio_frontend::qemu::BackendHost,
    /// Held until QEMU is gone (its drop waits for the console's end).
    _watch: BackendWatch,
}

impl BackendVmRun {
    /// Logs the hypercall window's counters.
    fn report(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let s = self.host.window_stats();
        let calls = s.calls.load(Relaxed);
        let ns = s.call_nanos.load(Relaxed);
        log::info!(
            "backend VM: {calls} hypercalls through the window ({} non-zero status, mean {:.1} us \
             in the hypervisor model), {} bad window accesses",
            s.calls_failed.load(Relaxed),
            ns.checked_div(calls).unwrap_or(0) as f64 / 1000.0,
            s.bad_accesses.load(Relaxed)
        );
    }
}

/// `--dispatcher c-driver`: serves the backend VM's hypercall window and doorbell, boots it,
/// and waits (bounded) until its device model serves all `n` devices.
fn start_backend_vm(
    session: &mut Session,
    args: &Args,
    plan: &CDriverPlan,
    hyp: &Arc<Hypervisor>,
    ram: &GuestRam,
    qemu: &Path,
    n: u32,
) -> anyhow::Result<BackendVmRun> {
    let vm = hyp.backend(BACKEND_VM).context("backend VM missing")?;
    let host = remio_frontend::qemu::BackendHost::start(
        &vm,
        ram,
        &session.tmp.join("backend-ivshmem.sock"),
    )
    .context("serving the backend VM")?;
    let mut words = plan.cmdline.clone();
    if let Ok(filter) = std::env::var("RUST_LOG") {
        if !filter.is_empty() && !filter.contains(char::is_whitespace) {
            words.push(format!("remio.log={filter}"));
        }
    }
    let cmdline_extra = words.join(" ");
    if let Some(sock) = &plan.ports.console_socket {
        // QEMU does not replace a stale socket (remio dm's socket console does).
        clear_stale_socket(sock).context("the console socket")?;
    }
    let opts = remio_frontend::qemu::BackendOptions {
        qemu: qemu.to_owned(),
        kernel: plan.kernel.clone(),
        initrd: plan.initrd.clone(),
        cmdline_extra,
        disk: Some(plan.disk.clone()),
        ram_mib: BACKEND_RAM_MIB,
    };
    let qemu_log = File::create(&plan.qemu_log)
        .with_context(|| format!("creating {}", plan.qemu_log.display()))?;
    let serial_log = File::create(&plan.serial_log)
        .with_context(|| format!("creating {}", plan.serial_log.display()))?;
    let mut child = host
        .command_with_ports(&opts, &plan.ports)?
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(qemu_log)
        .spawn()
        .context("starting the backend VM's QEMU")?;
    log::debug!("backend VM QEMU pid {}", child.id());
    let console = child.stdout.take().context("the backend's console pipe")?;
    session.backend = Some(child);
    let watch = BackendWatch::start(console, serial_log, args.verbose);
    wait_for_backend(session, &watch, plan, n)?;
    if plan.console_to_stdio {
        if let Some(sock) = &plan.ports.console_socket {
            relay_backend_console(sock, plan.console_stdin)?;
        }
    }
    Ok(BackendVmRun {
        host,
        _watch: watch,
    })
}

/// Removes a UNIX socket left at `path` by an earlier run; anything else there is an error.
fn clear_stale_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display())),
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| path.display().to_string()),
    }
}

/// The frontend's console on our stdio in c-driver mode: connects to the socket the backend
/// QEMU serves its console's serial port on, copies it to our stdout and, with `stdin`, our
/// stdin to it (the interactive demo's shell). The threads end with the socket (QEMU gone)
/// or our stdin.
fn relay_backend_console(sock: &Path, stdin: bool) -> anyhow::Result<()> {
    let stream = std::os::unix::net::UnixStream::connect(sock)
        .with_context(|| format!("connecting to the backend's console at {}", sock.display()))?;
    let reader = stream.try_clone()?;
    std::thread::Builder::new()
        .name("remio-backend-hvc0".into())
        .spawn(move || copy_console(reader))
        .context("starting the console copier")?;
    if stdin {
        let mut writer = stream;
        std::thread::Builder::new()
            .name("remio-backend-hvc0-in".into())
            .spawn(move || {
                let mut buf = [0u8; 1024];
                loop {
                    match read_stdin(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if writer.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            })
            .context("starting the console input copier")?;
    }
    Ok(())
}

/// One read of our stdin's descriptor (unbuffered: a terminal in raw mode gives each key).
fn read_stdin(buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes; fd 0 is ours.
        let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n.unsigned_abs());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Waits until the backend's device model says `REMIO-DM-READY n`; any failure first is an
/// error naming the step, with the tail of the backend's console.
fn wait_for_backend(
    session: &mut Session,
    watch: &BackendWatch,
    plan: &CDriverPlan,
    n: u32,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let (lock, cv) = &*watch.state;
    let fail = |s: &BackendState, what: String| -> anyhow::Error {
        let tail: Vec<&str> = s.tail.iter().map(String::as_str).collect();
        anyhow::anyhow!(
            "{what}\n--- last lines of the backend VM's console ({}; QEMU's messages in {}) \
             ---\n{}",
            plan.serial_log.display(),
            plan.qemu_log.display(),
            tail.join("\n")
        )
    };
    let mut s = lock
        .lock()
        .map_err(|_| anyhow::anyhow!("backend console reader panicked"))?;
    loop {
        if let Some(ready) = s.ready {
            if ready != n {
                return Err(fail(
                    &s,
                    format!("the backend's device model serves {ready} devices, not {n}"),
                ));
            }
            log::info!(
                "backend VM ready after {:.1} s",
                start.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if let Some(step) = &s.failed {
            return Err(fail(&s, format!("the backend VM failed at step `{step}`")));
        }
        if let Some(status) = &s.dm_exit {
            return Err(fail(
                &s,
                format!("the device model in the backend VM exited ({status}) before serving"),
            ));
        }
        let exited = match session.backend.as_mut() {
            Some(c) => c.try_wait()?,
            None => None,
        };
        if let Some(st) = exited.filter(|_| s.closed) {
            let step = s.last_step.clone().unwrap_or_else(|| "none".into());
            return Err(fail(
                &s,
                format!("the backend VM's QEMU exited ({st}) before its device model was ready (last step done: {step})"),
            ));
        }
        if STOP.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        if start.elapsed() > BACKEND_START_TIMEOUT {
            let step = s.last_step.clone().unwrap_or_else(|| "none".into());
            return Err(fail(
                &s,
                format!(
                    "the backend VM was not ready within {BACKEND_START_TIMEOUT:?} (last step \
                     done: {step})"
                ),
            ));
        }
        s = cv
            .wait_timeout(s, Duration::from_millis(100))
            .map_err(|_| anyhow::anyhow!("backend console reader panicked"))?
            .0;
    }
}

/// How long the device model may take to open a session on every device.
const DM_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits until the device model has a session on each of the `n` DMs, so that one that cannot
/// start (a bad config, a TAP it cannot open) is an error of `remio run`, not a guest whose
/// devices all fail.
fn wait_for_device_model(session: &mut Session, platform: &Platform, n: u32) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Some(dm) = session.dm.as_mut() {
            if let Some(status) = dm.try_wait()? {
                bail!("the device model failed to start ({status}); its error is above");
            }
        }
        let ready = (0..n).all(|i| {
            platform
                .dispatcher()
                .dm(i)
                .is_ok_and(|dm| dm.has_control_client())
        });
        if ready {
            log::debug!("device model ready after {:?}", start.elapsed());
            return Ok(());
        }
        if STOP.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        if start.elapsed() > DM_START_TIMEOUT {
            bail!("the device model did not open all {n} devices within {DM_START_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How the QEMU process ended.
enum Outcome {
    Exited(ExitStatus),
    TimedOut,
    Interrupted,
}

/// What [`supervise`] needs to restart device models.
struct DmRestarts<'a> {
    /// `--dm-restarts`.
    limit: u32,
    /// Restarts so far (for `remio stats`).
    count: &'a AtomicU32,
    /// Whether every device has a device-model session, and how many sessions they have had.
    sessions: &'a dyn Fn() -> (bool, u64),
}

/// A device model that lived this long before it died was not failing at start-up (which is
/// what the back-off is for): the next restart is immediate again. The number of restarts stays
/// bounded by `--dm-restarts`.
const DM_STABLE: Duration = Duration::from_millis(500);
/// How long the devices may go without a device model after ours exited on request (status
/// 0: `remio dm --takeover`, or a SIGTERM) before we start one: a `--takeover` successor opens
/// its sessions within milliseconds of the exit.
const DM_HANDOVER_GRACE: Duration = Duration::from_secs(2);

fn supervise(
    session: &mut Session,
    bridge: &Bridge,
    devices: u32,
    timeout: Option<Duration>,
    started: Instant,
    dm: DmRestarts<'_>,
) -> anyhow::Result<Outcome> {
    let mut dm_reported = false;
    let mut restarts = 0;
    // Deaths in a row of device models that did not reach DM_STABLE: the back-off's index.
    let mut streak = 0;
    let mut dm_started = Instant::now();
    // Our device model handed over (exited with status 0): since when the devices have had
    // no session, if they have none.
    let mut handed_over: Option<Option<Instant>> = None;
    let mut dm_exit = session.dm.as_ref().and_then(|c| ExitWatch::new(c.id()));
    // When the last device model died and how many sessions there had been, until its
    // successor has opened one on every device.
    let mut died_at: Option<(Instant, u64)> = None;
    loop {
        if let Some((t, before)) = died_at {
            let (all, now) = (dm.sessions)();
            if all && now >= before + u64::from(devices) {
                log::info!(
                    "the devices are served again {} ms after the device model died",
                    t.elapsed().as_millis()
                );
                died_at = None;
            }
        }
        if dm_reported {
            // Requests queued on the failed devices since the last pass fail now.
            bridge.sweep_failed();
        }
        if let Some(q) = session.qemu.as_mut() {
            if let Some(st) = q.try_wait()? {
                return Ok(Outcome::Exited(st));
            }
        }
        if let (Some(unserved), Some(launcher)) = (&mut handed_over, &session.dm_launcher) {
            // Someone else serves our devices (an upgrade), or no one does.
            if (dm.sessions)().0 {
                *unserved = None;
            } else if unserved.get_or_insert_with(Instant::now).elapsed() > DM_HANDOVER_GRACE
                && restarts < dm.limit
            {
                restarts += 1;
                dm.count.store(restarts, Ordering::Relaxed);
                log::warn!(
                    "no device model has served the devices for {DM_HANDOVER_GRACE:?}; \
                     starting one ({restarts} of {})",
                    dm.limit
                );
                let child = launcher.spawn(restarts)?;
                dm_exit = ExitWatch::new(child.id());
                session.dm = Some(child);
                dm_started = Instant::now();
                handed_over = None;
                continue;
            }
        }
        if !dm_reported {
            if let Some(st) = session
                .dm
                .as_mut()
                .map(Child::try_wait)
                .transpose()?
                .flatten()
            {
                if st.success() && session.dm_launcher.is_some() {
                    // It ended its sessions on request: a successor takes over (an upgrade,
                    // `remio dm --takeover`), which is no crash to restart from.
                    log::info!(
                        "the device model exited on request; its devices are left to the one \
                         that takes over (or a new one in {DM_HANDOVER_GRACE:?})"
                    );
                    session.dm = None;
                    dm_exit = None;
                    handed_over = Some(None);
                    continue;
                }
                let launcher = session.dm_launcher.as_ref().filter(|_| restarts < dm.limit);
                if let Some(launcher) = launcher {
                    died_at = Some((Instant::now(), (dm.sessions)().1));
                    restarts += 1;
                    dm.count.store(restarts, Ordering::Relaxed);
                    streak = if dm_started.elapsed() >= DM_STABLE {
                        1
                    } else {
                        streak + 1
                    };
                    let pause = restart_backoff(streak);
                    log::warn!(
                        "the device model exited ({st}); restarting it in {pause:?} \
                         ({restarts} of {}): it resumes the devices where they were",
                        dm.limit
                    );
                    std::thread::sleep(pause);
                    let child = launcher.spawn(restarts)?;
                    log::info!("new device model pid {}", child.id());
                    dm_exit = ExitWatch::new(child.id());
                    session.dm = Some(child);
                    dm_started = Instant::now();
                    continue;
                }
            }
            let server = [
                (session.dm.as_mut(), "the device model"),
                (session.backend.as_mut(), "the backend VM"),
            ];
            for (child, what) in server {
                let Some(st) = child.map(Child::try_wait).transpose()?.flatten() else {
                    continue;
                };
                log::warn!(
                    "{what} exited ({st}); the platform keeps serving, the guest's devices \
                     fail their requests"
                );
                for i in 0..devices {
                    bridge.fail_device(i as usize);
                }
                dm_reported = true;
            }
        }
        if STOP.load(Ordering::SeqCst) {
            return Ok(Outcome::Interrupted);
        }
        if timeout.is_some_and(|t| started.elapsed() > t) {
            return Ok(Outcome::TimedOut);
        }
        // The device model's death wakes us at once (its restart is on the guest's pause);
        // everything else is polled.
        // Until a restarted device model serves, look often (the figure it logs).
        let tick = Duration::from_millis(if died_at.is_some() { 2 } else { 50 });
        match &dm_exit {
            // Once reported, the dead child's pidfd stays readable: poll.
            Some(w) if !dm_reported => w.wait(tick),
            _ => std::thread::sleep(tick),
        }
    }
}

/// A pidfd of a child, to sleep until it exits.
struct ExitWatch(std::os::fd::OwnedFd);

impl ExitWatch {
    /// `None` if pidfd_open fails (an old kernel): the caller polls instead.
    fn new(pid: u32) -> Option<Self> {
        use std::os::fd::FromRawFd as _;
        let pid = libc::pid_t::try_from(pid).ok()?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let raw = i32::try_from(raw).ok().filter(|&fd| fd >= 0)?;
        // SAFETY: `raw` is a new fd that nothing else owns.
        Some(Self(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) }))
    }

    /// Returns when the process has exited, or after `timeout`.
    fn wait(&self, timeout: Duration) {
        use std::os::fd::AsRawFd as _;
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, ms) };
    }
}

/// Copies the guest's serial output: everything to the serial log; with `--exec` the script's
/// output (between `REMIO-EXEC-BEGIN` and `REMIO-EXIT`) to stdout; the rest to stderr when
/// verbose. Records the status of `REMIO-EXIT`.
struct ConsolePump {
    exec: bool,
    verbose: bool,
    /// The terminal is in raw mode: lines end in CR LF.
    raw: bool,
}

impl ConsolePump {
    fn run(&self, out: impl std::io::Read, log: File, exit: &std::sync::Mutex<Option<i32>>) {
        let mut log = std::io::BufWriter::new(log);
        let mut in_output = false;
        let stdout = std::io::stdout();
        let eol = if self.raw { "\r\n" } else { "\n" };
        for line in BufReader::new(out).split(b'\n') {
            let Ok(line) = line else { break };
            let _ = log.write_all(&line);
            let _ = log.write_all(b"\n");
            let _ = log.flush();
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches('\r');
            match classify(text) {
                ConsoleLine::Begin => in_output = self.exec,
                ConsoleLine::Exit(s) => {
                    in_output = false;
                    if let Ok(mut e) = exit.lock() {
                        *e = Some(s);
                    }
                }
                ConsoleLine::Text if in_output => {
                    let mut o = stdout.lock();
                    let _ = writeln!(o, "{text}");
                    let _ = o.flush();
                }
                ConsoleLine::Text if self.verbose => eprint!("{text}{eol}"),
                ConsoleLine::Text => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_in_splits_at_the_last_colon_and_takes_a_directory_target() {
        assert_eq!(
            parse_copy_in("/h/a:b/f.bin:/srv/f.bin").unwrap(),
            (PathBuf::from("/h/a:b/f.bin"), "/srv/f.bin".to_owned())
        );
        assert_eq!(
            parse_copy_in("data/x.txt:/root/").unwrap(),
            (PathBuf::from("data/x.txt"), "/root/x.txt".to_owned())
        );
    }

    #[test]
    fn copy_in_refuses_relative_dotted_or_missing_guest_paths() {
        for bad in [
            "/h/f:root/f",
            "/h/f:/a/../etc/passwd",
            "/h/f:/a//b",
            "/h/f",
            ":/x",
        ] {
            let e = format!("{:#}", parse_copy_in(bad).unwrap_err());
            assert!(e.contains("--copy-in"), "{bad}: {e}");
        }
        let e = format!("{:#}", parse_copy_in("/h/f:rel").unwrap_err());
        assert!(e.contains("bad guest path \"rel\""), "{e}");
    }

    fn parse_args(extra: &[&str]) -> Args {
        use clap::Parser;
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: Args,
        }
        let mut argv = vec!["remio"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap().run
    }

    #[test]
    fn a_missing_copy_in_file_is_an_error_naming_it() {
        let args = parse_args(&["--copy-in", "/nonexistent/remio-x:/x", "--exec", "true"]);
        let e = format!("{:#}", guest_files(&args).unwrap_err());
        assert!(e.contains("/nonexistent/remio-x"), "{e}");
        assert!(e.contains("No such file"), "{e}");
    }

    #[test]
    fn the_exec_script_and_copied_files_are_appended_as_a_second_archive() {
        let tmp = make_tmp().unwrap();
        let host = tmp.join("f.txt");
        std::fs::write(&host, b"copied").unwrap();
        let script = tmp.join("s.sh");
        std::fs::write(&script, "echo from-a-file\n").unwrap();
        let spec = format!("{}:/root/f.txt", host.display());
        let args = parse_args(&["--copy-in", &spec, "--exec-file", script.to_str().unwrap()]);
        assert!(args.exec_mode());
        let files = guest_files(&args).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(names, ["/root/f.txt", GUEST_EXEC_SCRIPT]);
        assert_eq!(files[1].1, b"echo from-a-file\n");
        assert_eq!(files[1].2, 0o755);

        let base = tmp.join("base.cpio");
        std::fs::write(&base, b"070701 base, 13").unwrap();
        let out = initrd_with(&base, &files, &tmp.join("initrd.cpio")).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        // The base, padded to 4 bytes, then a newc archive holding both files.
        assert!(bytes.starts_with(b"070701 base, 13\0"));
        assert_eq!(&bytes[16..22], b"070701");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("etc/remio/exec.sh\0"));
        assert!(text.contains("echo from-a-file"));
        assert!(text.contains("root/f.txt\0"));
        assert!(text.contains("TRAILER!!!"));
        assert_eq!(
            initrd_with(&base, &[], &tmp.join("unused")).unwrap(),
            base,
            "no files: the cached initramfs as it is"
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn the_demo_disk_is_ext4_holding_the_readme() {
        if crate::guest::find_tool("mkfs.ext4").is_none() {
            eprintln!("*** SKIPPED: mkfs.ext4 not found (e2fsprogs) ***");
            return;
        }
        let tmp = make_tmp().unwrap();
        let img = demo_disk(&tmp).unwrap();
        let bytes = std::fs::read(&img).unwrap();
        std::fs::remove_dir_all(&tmp).unwrap();
        assert_eq!(bytes.len() as u64, DEMO_DISK_SIZE);
        // The ext2/3/4 superblock at 1024, its magic 0xEF53 at offset 56.
        assert_eq!(&bytes[1024 + 56..1024 + 58], &[0x53, 0xef]);
        let readme = DEMO_README.as_bytes();
        assert!(
            bytes.windows(readme.len()).any(|w| w == readme),
            "the README's bytes are in a data block"
        );
    }

    #[test]
    fn the_summary_names_every_process_and_window() {
        let plan = device_plan(Path::new("/d.img"), ConsoleMode::Stdio, true, Some("tap9"));
        let summary = Summary {
            run_dir: Path::new("/tmp/r"),
            platform_pid: 10,
            dm_pid: Some(11),
            backend_pid: None,
            qemu_pid: 12,
            stats: Some(Path::new("/run/remio/stats-10.sock")),
            serial_log: Path::new("/tmp/r/serial.log"),
            devices: plan
                .iter()
                .map(|d| (d.kind.clone(), describe_device(d, true)))
                .collect(),
            partition: Some("0/1".parse().unwrap()),
        }
        .render();
        assert!(summary.contains("platform      pid 10"), "{summary}");
        assert!(summary.contains("device model  pid 11"), "{summary}");
        assert!(summary.contains("guest (QEMU)  pid 12"), "{summary}");
        assert!(summary.contains("/tmp/r/serial.log"), "{summary}");
        assert!(
            summary.contains("window 1  0x10000200  console  /dev/hvc0, the guest's shell"),
            "{summary}"
        );
        assert!(summary.contains("TAP tap9"), "{summary}");
        assert!(!summary.contains("backend VM"), "{summary}");
        assert!(summary.contains("`remio stats` (socket /run/remio/stats-10.sock)"));
        assert!(
            summary.contains("CPUs          frontend on CPUs 0, backend on CPUs 1"),
            "{summary}"
        );
        assert_eq!(summary.lines().count(), 10, "{summary}");
    }

    #[test]
    fn the_device_models_leading_markers_are_dropped_and_console_output_is_not() {
        let mut f = MarkerFilter::default();
        assert_eq!(f.feed(b"REMIO-DM-FAI"), b"");
        assert_eq!(f.feed(b"LED 2 no tap\nREMIO-DM-READY 3\nhel"), b"hel");
        assert_eq!(f.feed(b"lo\nREMIO-DM-READY 3\n"), b"lo\nREMIO-DM-READY 3\n");

        let mut f = MarkerFilter::default();
        assert_eq!(f.feed(b"RE"), b"");
        assert_eq!(f.feed(b"MOTE login: "), b"REMOTE login: ");
        assert_eq!(f.feed(b"x"), b"x");

        let mut f = MarkerFilter::default();
        assert_eq!(f.feed(b"remio:~# "), b"remio:~# ");
    }

    #[test]
    fn device_model_restarts_back_off_from_none_to_at_most_1_6_s() {
        assert_eq!(restart_backoff(1), Duration::ZERO);
        assert_eq!(restart_backoff(2), Duration::from_millis(50));
        assert_eq!(restart_backoff(3), Duration::from_millis(100));
        assert_eq!(restart_backoff(7), Duration::from_millis(1600));
        assert_eq!(restart_backoff(100), Duration::from_millis(1600));
    }

    #[test]
    fn console_markers_are_recognised_only_as_whole_lines() {
        assert_eq!(classify("REMIO-EXEC-BEGIN\r"), ConsoleLine::Begin);
        assert_eq!(classify("REMIO-EXIT 3\r\n"), ConsoleLine::Exit(3));
        assert_eq!(classify("echo REMIO-EXIT 3"), ConsoleLine::Text);
        assert_eq!(classify("REMIO-EXIT x"), ConsoleLine::Text);
    }

    #[test]
    fn device_plan_numbers_windows_in_order_and_adds_net_only_with_a_tap() {
        let plan = device_plan(
            Path::new("/d.img"),
            ConsoleMode::Socket("/c.sock".into()),
            true,
            None,
        );
        let kinds: Vec<&str> = plan.iter().map(|d| d.kind.as_str()).collect();
        assert_eq!(kinds, ["block", "console", "rng"]);
        assert_eq!(plan[2].mmio_base, MMIO_BASE + 2 * WINDOW);
        let plan = device_plan(Path::new("/d.img"), ConsoleMode::Off, false, Some("tap0"));
        assert_eq!(plan[1].kind, "net");
        assert_eq!(plan[1].tap.as_deref(), Some("tap0"));
    }

    #[test]
    fn a_user_config_must_follow_the_window_layout() {
        let parse = |t: &str| remio_virtio::config::Config::from_toml_str(t).unwrap();
        let good = parse(
            "[[device]]\ndm_id = 1\ntype = \"rng\"\nmmio_base = 0x10000200\n\
             [[device]]\ndm_id = 0\ntype = \"rng\"\nmmio_base = 0x10000000\n",
        );
        assert_eq!(check_layout(&good).unwrap(), 2);
        let gap = parse("[[device]]\ndm_id = 1\ntype = \"rng\"\nmmio_base = 0x10000200\n");
        let msg = format!("{:#}", check_layout(&gap).unwrap_err());
        assert!(msg.contains("expected dm_id 0 at 0x10000000"), "{msg}");
        let moved = parse("[[device]]\ndm_id = 0\ntype = \"rng\"\nmmio_base = 0xa003e00\n");
        assert!(check_layout(&moved).is_err());
    }

    #[test]
    fn hyp_config_pairs_every_device_with_ram_as_shared_memory() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let hyp =
            Hypervisor::new(hyp_config(3, &ram, Some(Duration::from_secs(1))).unwrap()).unwrap();
        let devs = hyp.frontend(FRONTEND_VM).unwrap().devices();
        assert_eq!(devs.len(), 3);
        assert_eq!(
            (devs[1].mmio_base, devs[1].shmem_base, devs[1].shmem_size),
            (MMIO_BASE + WINDOW, 0, 4 << 20)
        );
        assert_eq!(hyp.backend(BACKEND_VM).unwrap().devices().len(), 3);
    }

    #[test]
    fn backend_plan_serves_the_disk_at_dev_vda_with_the_frontends_shmem_at_0() {
        let plan = device_plan(
            Path::new("/h/d.img"),
            ConsoleMode::Socket("/c.sock".into()),
            true,
            None,
        );
        let bp = backend_device_plan(&plan).unwrap();
        assert_eq!(bp.disk, Path::new("/h/d.img"));
        assert_eq!(bp.devices[0].path.as_deref(), Some(Path::new("/dev/vda")));
        assert!(bp.devices.iter().all(|d| d.shmem_addr == Some(0)));
        let same = |f: fn(&DeviceSpec) -> u64| plan.iter().map(f).eq(bp.devices.iter().map(f));
        assert!(same(|d| u64::from(d.dm_id)) && same(|d| d.mmio_base));
        let text = bp.dm_config_toml().unwrap();
        let parsed = remio_virtio::Config::from_toml_str(&text).unwrap();
        assert_eq!(parsed.devices.len(), 3);
        assert!(parsed.devices.iter().all(|d| d.shmem_addr == Some(0)));
    }

    #[test]
    fn backend_plan_puts_the_console_on_a_relayed_pty_and_its_socket_on_the_host() {
        let plan = device_plan(
            Path::new("/h/d.img"),
            ConsoleMode::Socket("/c.sock".into()),
            false,
            None,
        );

        let bp = backend_device_plan(&plan).unwrap();

        assert_eq!(bp.console, Some(ConsoleMode::Socket("/c.sock".into())));
        assert_eq!(bp.cmdline(), ["remio.console=ttyS1"]);
        let parsed = remio_virtio::Config::from_toml_str(&bp.dm_config_toml().unwrap()).unwrap();
        let remio_virtio::config::DeviceKind::Console(c) = &parsed.devices[1].kind else {
            panic!("device 1 is not the console: {parsed:?}");
        };
        assert_eq!(
            c.backend,
            remio_virtio::config::ConsoleBackend::Pty {
                alias: Some(BACKEND_CONSOLE_PTY.into())
            }
        );
        let stdio = device_plan(Path::new("/d"), ConsoleMode::Stdio, false, None);
        assert_eq!(
            backend_device_plan(&stdio).unwrap().console,
            Some(ConsoleMode::Stdio)
        );
    }

    #[test]
    fn backend_plan_puts_net_on_a_tap_bridged_to_the_hosts_and_needs_a_disk() {
        let net = device_plan(Path::new("/d"), ConsoleMode::Off, false, Some("remio-7"));

        let bp = backend_device_plan(&net).unwrap();

        assert_eq!(bp.net_tap.as_deref(), Some("remio-7"));
        assert_eq!(bp.devices[1].tap.as_deref(), Some(BACKEND_NET_TAP));
        assert_eq!(bp.cmdline(), [format!("remio.bridge={BACKEND_NET_TAP}")]);
        assert!(bp.console.is_none());
        let no_disk: Vec<_> = net.into_iter().filter(|d| d.kind == "net").collect();
        assert!(backend_device_plan(&no_disk).is_err());
    }

    #[test]
    fn a_stale_console_socket_is_replaced_but_a_file_there_is_refused() {
        let tmp = make_tmp().unwrap();
        let sock = tmp.join("con.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        let file = tmp.join("plain");
        std::fs::write(&file, b"x").unwrap();

        let stale = clear_stale_socket(&sock);
        let refused = clear_stale_socket(&file);
        let absent = clear_stale_socket(&tmp.join("none"));

        assert!(stale.is_ok() && !sock.exists());
        assert!(refused.unwrap_err().to_string().contains("is not a socket"));
        assert!(file.exists());
        assert!(absent.is_ok());
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn a_user_config_becomes_the_backends_plan_or_is_refused_by_option() {
        let config = |text: &str| remio_virtio::Config::from_toml_str(text).unwrap();
        let ok = config(
            "[[device]]\ndm_id = 0\ntype = \"block\"\nmmio_base = 0x10000000\npath = \"/i.img\"\n\
             [[device]]\ndm_id = 1\ntype = \"console\"\nmmio_base = 0x10000200\n\
             backend = \"socket\"\nsocket = \"/c.sock\"\n\
             [[device]]\ndm_id = 2\ntype = \"net\"\nmmio_base = 0x10000400\ntap = \"t0\"\n",
        );

        let plan = plan_from_config(&ok).unwrap();

        let bp = backend_device_plan(&plan).unwrap();
        assert_eq!(bp.disk, Path::new("/i.img"));
        assert_eq!(bp.console, Some(ConsoleMode::Socket("/c.sock".into())));
        assert_eq!(bp.net_tap.as_deref(), Some("t0"));
        assert_eq!(plan[2].mmio_base, 0x1000_0400);
        for (bad, why) in [
            (
                "type = \"block\"\npath = \"/i\"\nread_only = true",
                "read_only",
            ),
            ("type = \"console\"\nbackend = \"pty\"", "pty"),
            ("type = \"rng\"\nrate = 100", "rate"),
        ] {
            let c = config(&format!(
                "[[device]]\ndm_id = 0\nmmio_base = 0x10000000\n{bad}\n"
            ));
            let e = format!("{:#}", plan_from_config(&c).unwrap_err());
            assert!(e.contains(why) && e.contains("c-driver"), "{e}");
        }
    }

    #[test]
    fn backend_console_markers_are_found_even_after_a_kernel_message() {
        assert_eq!(
            backend_line("REMIO-BACKEND-STEP virtio_pci ok\r"),
            BackendLine::Step("virtio_pci".into())
        );
        assert_eq!(
            backend_line("[    3.1] random: crng init doneREMIO-BACKEND-FAILED bao-io-dispatcher"),
            BackendLine::Failed("bao-io-dispatcher".into())
        );
        assert_eq!(
            backend_line("REMIO-BACKEND-DM-EXIT 1"),
            BackendLine::DmExit("1".into())
        );
        assert_eq!(backend_line("REMIO-DM-READY 3"), BackendLine::DmReady(3));
        assert_eq!(backend_line("REMIO-DM-READY x"), BackendLine::Text);
        assert_eq!(backend_line("REMIO-BACKEND-STEP half"), BackendLine::Text);
        assert_eq!(backend_line("plain text"), BackendLine::Text);
    }

    #[test]
    fn c_driver_takes_config_and_net_but_refuses_ram_that_is_no_power_of_two() {
        use clap::Parser;
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: Args,
        }
        let parse = |extra: &[&str]| {
            let mut argv = vec!["remio", "--dispatcher", "c-driver"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).unwrap().run
        };
        assert!(check_c_driver_args(&parse(&[])).is_ok());
        assert_eq!(parse(&[]).dispatcher, Dispatcher::CDriver);
        let e = check_c_driver_args(&parse(&["--memory", "384"])).unwrap_err();
        assert!(e.to_string().contains("power of two"), "{e}");
        assert!(check_c_driver_args(&parse(&["--net", "auto"])).is_ok());
        assert!(check_c_driver_args(&parse(&["--config", "x.toml"])).is_ok());
        let default = Cli::try_parse_from(["remio"]).unwrap().run;
        assert_eq!(default.dispatcher, Dispatcher::Remio);
    }

    #[test]
    fn c_driver_refuses_device_model_restarts_it_cannot_honour() {
        use clap::Parser;
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: Args,
        }
        let parse = |extra: &[&str]| {
            let mut argv = vec!["remio"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).unwrap().run
        };

        let refused =
            check_c_driver_args(&parse(&["--dispatcher", "c-driver", "--dm-restarts", "3"]));
        let zero = check_c_driver_args(&parse(&["--dispatcher", "c-driver", "--dm-restarts", "0"]));
        let unset = parse(&["--dispatcher", "c-driver"]);

        let e = refused.unwrap_err().to_string();
        assert!(
            e.contains("--dm-restarts 3") && e.contains("destroys a DM"),
            "{e}"
        );
        assert!(zero.is_ok(), "0 is what the c-driver does anyway");
        assert!(check_c_driver_args(&unset).is_ok());
        assert_eq!(unset.dm_restarts, None, "no restart is implied");
        assert_eq!(parse(&[]).dm_restarts, None);
    }

    /// Runs `script` as a stand-in for the backend VM's QEMU and waits for it as for the
    /// backend VM with `n` devices. Scripts end in `exec sleep`: killing the stand-in must close
    /// the console pipe, which a child `sleep` would keep open.
    fn wait_for_fake_backend(script: &str, n: u32) -> anyhow::Result<()> {
        let tmp = make_tmp().unwrap();
        let mut session = Session {
            qemu: None,
            dm: None,
            dm_launcher: None,
            backend: None,
            tmp: tmp.clone(),
            keep: false,
        };
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        session.backend = Some(child);
        let serial_log = tmp.join("backend-serial.log");
        let watch = BackendWatch::start(out, File::create(&serial_log).unwrap(), false);
        let plan = CDriverPlan {
            kernel: PathBuf::new(),
            initrd: PathBuf::new(),
            disk: PathBuf::new(),
            cmdline: Vec::new(),
            ports: Default::default(),
            console_to_stdio: false,
            console_stdin: false,
            serial_log,
            qemu_log: tmp.join("backend-qemu.log"),
        };
        let r = wait_for_backend(&mut session, &watch, &plan, n);
        // The session kills the stand-in, which ends the console the watch waits for.
        drop(session);
        drop(watch);
        r
    }

    #[test]
    fn a_backend_that_fails_before_ready_is_an_error_naming_the_step_with_the_console_tail() {
        let failed = wait_for_fake_backend(
            "echo REMIO-BACKEND-STEP virtio_pci ok; echo 'insmod: ERROR: -22'; \
             echo REMIO-BACKEND-FAILED bao-io-dispatcher; exec sleep 30",
            3,
        )
        .unwrap_err()
        .to_string();
        assert!(
            failed.contains("failed at step `bao-io-dispatcher`"),
            "{failed}"
        );
        assert!(failed.contains("insmod: ERROR: -22"), "{failed}");
        assert!(failed.contains("backend-serial.log"), "{failed}");

        let dm_exit = wait_for_fake_backend("echo REMIO-BACKEND-DM-EXIT 1; exec sleep 30", 3)
            .unwrap_err()
            .to_string();
        assert!(
            dm_exit.contains("device model in the backend VM exited (1)"),
            "{dm_exit}"
        );

        let qemu_gone = wait_for_fake_backend("echo REMIO-BACKEND-STEP virtio_blk ok; exit 3", 3)
            .unwrap_err()
            .to_string();
        assert!(qemu_gone.contains("QEMU exited"), "{qemu_gone}");
        assert!(
            qemu_gone.contains("last step done: virtio_blk"),
            "{qemu_gone}"
        );

        let short = wait_for_fake_backend("echo REMIO-DM-READY 2; exec sleep 30", 3)
            .unwrap_err()
            .to_string();
        assert!(short.contains("serves 2 devices, not 3"), "{short}");
    }

    #[test]
    fn a_backend_that_says_ready_with_every_device_is_waited_for_and_no_longer() {
        let started = Instant::now();
        wait_for_fake_backend(
            "echo REMIO-BACKEND-STEP virtio_pci ok; sleep 0.2; echo REMIO-DM-READY 3; exec sleep 30",
            3,
        )
        .unwrap();
        assert!(started.elapsed() < Duration::from_secs(20));
    }

    #[test]
    fn generated_dm_config_is_toml_with_one_table_per_device() {
        let text = toml::to_string(&DmConfig {
            device: device_plan(Path::new("/d.img"), ConsoleMode::Stdio, true, None),
        })
        .unwrap();
        let parsed = remio_virtio::Config::from_toml_str(&text).unwrap();
        assert_eq!(parsed.devices.len(), 3);
        assert_eq!(parsed.devices[2].mmio_base, MMIO_BASE + 2 * WINDOW);
    }
}
