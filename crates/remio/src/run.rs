//! `remio run`: one platform process (hypervisor model + dispatcher + device-model API socket +
//! the QEMU bridge), one device-model process (`remio dm`) and QEMU booting the remio guest.
//!
//! With no arguments it is the demo: a fresh sparse disk, console, rng and, when a TAP can be
//! made, net ([`crate::hosttap`]: host 10.77.0.1, guest 10.77.0.2) served through remio, and the
//! guest's serial console on this terminal. `--exec CMD`
//! runs CMD in the guest through the initramfs `/init` contract (`guest/README.md`: the command
//! travels base64-encoded as `remio.exec=`, the guest prints `REMIO-EXEC-BEGIN`, the output,
//! then `REMIO-EXIT <status>` and powers off), prints its output and exits with its status.
//!
//! Every exit path kills QEMU and the device model and removes the temporary directory (unless
//! `--keep`).
//!
//! If the device model dies while the guest runs, the guest does not hang and the platform
//! keeps serving: register accesses the dead session had received are completed by the session
//! cleanup (a read returns 0), and as soon as `remio run` sees the process gone it declares
//! every window failed ([`remio_frontend::qemu::Failover`]). From then on the bridge answers
//! those windows itself: Status reads DEVICE_NEEDS_RESET, every request in the virtqueues —
//! already queued or added later — is returned to the driver (virtio-blk with
//! `VIRTIO_BLK_S_IOERR`), so the guest's I/O fails with EIO in bounded time and its shell stays
//! usable. The device model is not restarted: a new one could not take over the live
//! virtqueues (their state died with it), and Linux's virtio drivers do not recover from
//! DEVICE_NEEDS_RESET; failing the devices is the honest outcome.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use remio_frontend::qemu::{Bridge, GuestRam, QemuOptions};
use remio_hyp::{HypConfig, Hypervisor, RemioDeviceConfig, Role, ShmemConfig, VmConfig};

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
    /// Run this shell command in the guest, print its output and exit with its status.
    #[arg(long)]
    pub exec: Option<String>,
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
    /// How long one trapped register access may stall before it completes anyway (ms; 0: no
    /// limit, as on Bao, where a device model that never answers stalls the vCPU).
    #[arg(long, default_value_t = 5000)]
    pub access_timeout_ms: u64,
    /// The QEMU binary [default: qemu-system-x86_64 on PATH].
    #[arg(long)]
    pub qemu: Option<PathBuf>,
    /// Guest kernel + initramfs directory [default: $REMIO_GUEST_DIR, else target/guest].
    #[arg(long)]
    pub guest_dir: Option<PathBuf>,
    /// With --exec: also show the guest's boot log (on stderr).
    #[arg(long, short)]
    pub verbose: bool,
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
}

/// The device-model config `remio run` writes for `remio dm --config` (`remio_virtio::Config`'s
/// TOML format).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DmConfig {
    /// The devices, in `dm_id` order.
    pub device: Vec<DeviceSpec>,
}

/// Where the virtio console's bytes go: the DM's stdout with `--exec` (so the guest's
/// `/dev/hvc0` output shows in ours), a pty otherwise (the terminal belongs to the serial
/// console).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleMode {
    /// No virtio console.
    Off,
    /// The device model's stdin/stdout.
    Stdio,
    /// A new pseudo-terminal (its path is logged by the device model).
    Pty,
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
        ConsoleMode::Pty => plan.push(DeviceSpec {
            backend: Some("pty".into()),
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
        None => {
            let d = tmp.join("disk.img");
            File::create(&d)?.set_len(DEMO_DISK_SIZE)?;
            d
        }
    };
    let console = match (args.no_console, args.exec.is_some()) {
        (true, _) => ConsoleMode::Off,
        (false, true) => ConsoleMode::Stdio,
        (false, false) => ConsoleMode::Pty,
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
        None => !args.no_net && args.exec.is_none(),
    };
    if !wanted {
        return Ok(None);
    }
    match crate::hosttap::HostTap::create() {
        Ok(tap) => {
            log::info!(
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
    let memory = args
        .memory
        .checked_mul(1 << 20)
        .context("--memory too large")?;
    let ram = GuestRam::new(memory).context("--memory")?;

    install_signal_handlers();
    let tmp = make_tmp()?;
    let mut session = Session {
        qemu: None,
        dm: None,
        tmp: tmp.clone(),
        keep: args.keep,
    };

    // With --config the user's file says what to serve; otherwise the plan from the flags.
    let host_tap = if args.config.is_none() {
        host_tap(args)?
    } else {
        None
    };
    let (n, dm_config) = match &args.config {
        Some(c) => (devices_in_user_config(c)?, c.clone()),
        None => {
            let devices = planned_devices(args, &tmp, host_tap.as_ref())?;
            let n = u32::try_from(devices.len()).context("too many devices")?;
            let path = tmp.join("devices.toml");
            let text = toml::to_string(&DmConfig { device: devices })
                .context("serialising the device-model config")?;
            std::fs::write(&path, text)?;
            (n, path)
        }
    };
    let hyp = Hypervisor::new(hyp_config(
        n,
        &ram,
        (args.access_timeout_ms > 0).then(|| Duration::from_millis(args.access_timeout_ms)),
    )?)
    .context("hypervisor model configuration")?;

    let api_socket = tmp.join("api.sock");
    let platform = Platform::with_hypervisor(Arc::clone(&hyp), BACKEND_VM, Some(&api_socket))
        .context("starting the platform")?;
    let frontend = hyp.frontend(FRONTEND_VM).context("frontend VM missing")?;
    let bridge = Bridge::for_frontend(&frontend, &ram, &tmp.join("ivshmem.sock"))
        .context("starting the QEMU bridge")?;

    let exe = std::env::current_exe().context("locating the remio binary")?;
    let mut dm_cmd = Command::new(exe);
    // SAFETY: prctl is async-signal-safe; the closure touches no memory of the parent.
    unsafe {
        dm_cmd.pre_exec(|| {
            // The device model must not outlive `remio run`, even if that is SIGKILLed.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let dm = dm_cmd
        .arg("dm")
        .arg("--config")
        .arg(&dm_config)
        .arg("--socket")
        .arg(&api_socket)
        .stdin(Stdio::null())
        .spawn()
        .context("starting the device model (remio dm)")?;
    log::info!("device model pid {}", dm.id());
    session.dm = Some(dm);
    wait_for_device_model(&mut session, &platform, n)?;

    let mut cmdline_extra = Vec::new();
    if let Some(cmd) = &args.exec {
        cmdline_extra.push(format!(
            "remio.exec={}",
            crate::guest::base64(cmd.as_bytes())
        ));
    }
    if host_tap.is_some() {
        cmdline_extra.push(format!("remio.net={}", crate::hosttap::GUEST_ADDR));
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
    let exec_mode = args.exec.is_some();
    if exec_mode {
        qcmd.stdin(Stdio::null()).stdout(Stdio::piped());
    }
    let mut qemu_child = qcmd.spawn().context("starting QEMU")?;
    log::info!("QEMU pid {}", qemu_child.id());
    let console = qemu_child.stdout.take();
    session.qemu = Some(qemu_child);

    let timeout = args
        .timeout
        .or(exec_mode.then_some(300))
        .map(Duration::from_secs);
    let exit = Arc::new(std::sync::Mutex::new(None::<i32>));
    let reader = console.map(|out| {
        let exit = Arc::clone(&exit);
        let verbose = args.verbose;
        std::thread::spawn(move || pump_exec_console(out, verbose, &exit))
    });

    let started = Instant::now();
    let qemu_status = supervise(&mut session, &bridge, n, timeout, started)?;
    // QEMU must be gone before the console reader can see the end of its output.
    session.kill_children();
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
    drop(bridge);
    drop(platform);
    drop(session);
    drop(host_tap);

    if !exec_mode {
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

fn supervise(
    session: &mut Session,
    bridge: &Bridge,
    devices: u32,
    timeout: Option<Duration>,
    started: Instant,
) -> anyhow::Result<Outcome> {
    let mut dm_reported = false;
    loop {
        if dm_reported {
            // Requests queued on the failed devices since the last pass fail now.
            bridge.sweep_failed();
        }
        if let Some(q) = session.qemu.as_mut() {
            if let Some(st) = q.try_wait()? {
                return Ok(Outcome::Exited(st));
            }
        }
        if !dm_reported {
            if let Some(dm) = session.dm.as_mut() {
                if let Some(st) = dm.try_wait()? {
                    log::warn!(
                        "the device model exited ({st}); the platform keeps serving, the \
                         guest's devices fail their requests"
                    );
                    for i in 0..devices {
                        bridge.fail_device(i as usize);
                    }
                    dm_reported = true;
                }
            }
        }
        if STOP.load(Ordering::SeqCst) {
            return Ok(Outcome::Interrupted);
        }
        if timeout.is_some_and(|t| started.elapsed() > t) {
            return Ok(Outcome::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Copies the guest's serial output for `--exec`: the command's output to stdout, the rest to
/// stderr when verbose; records the status of `REMIO-EXIT`.
fn pump_exec_console(out: impl std::io::Read, verbose: bool, exit: &std::sync::Mutex<Option<i32>>) {
    let mut in_output = false;
    let stdout = std::io::stdout();
    for line in BufReader::new(out).split(b'\n') {
        let Ok(line) = line else { break };
        let text = String::from_utf8_lossy(&line);
        match classify(&text) {
            ConsoleLine::Begin => in_output = true,
            ConsoleLine::Exit(s) => {
                in_output = false;
                if let Ok(mut e) = exit.lock() {
                    *e = Some(s);
                }
            }
            ConsoleLine::Text if in_output => {
                let mut o = stdout.lock();
                let _ = writeln!(o, "{}", text.trim_end_matches('\r'));
                let _ = o.flush();
            }
            ConsoleLine::Text if verbose => eprintln!("{}", text.trim_end_matches('\r')),
            ConsoleLine::Text => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_markers_are_recognised_only_as_whole_lines() {
        assert_eq!(classify("REMIO-EXEC-BEGIN\r"), ConsoleLine::Begin);
        assert_eq!(classify("REMIO-EXIT 3\r\n"), ConsoleLine::Exit(3));
        assert_eq!(classify("echo REMIO-EXIT 3"), ConsoleLine::Text);
        assert_eq!(classify("REMIO-EXIT x"), ConsoleLine::Text);
    }

    #[test]
    fn device_plan_numbers_windows_in_order_and_adds_net_only_with_a_tap() {
        let plan = device_plan(Path::new("/d.img"), ConsoleMode::Pty, true, None);
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
