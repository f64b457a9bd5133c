//! `remio dm --config FILE`: a device-model process serving every device of a config file.
//!
//! By default it reaches the dispatcher through the platform's API socket; with
//! `--kernel-driver` through the C driver's ioctls, as on Bao hardware: `/dev/bao` (the later
//! revision, DMs created from the config's `shmem_addr`, `shmem_size` and `irq`) when that node
//! exists, else `/dev/bao-io-dispatcher` (the posted driver, DMs from the device tree). The
//! device code is the same either way.
//!
//! Once every device that could start is serving, it prints `REMIO-DM-READY <n>` on stdout
//! (and `REMIO-DM-FAILED <dm> <reason>` for each that could not), for scripts and for
//! `remio run` to wait on.
//!
//! On remio's dispatcher a device model can be replaced under a running guest: SIGTERM or
//! SIGINT makes it end its sessions and exit (its devices' state stays in the platform's state
//! regions), and a new `remio dm` resumes every device where it was (`crates/virtio/src/persist.rs`).
//! `--takeover PID` does the handover in one step: it signals PID, waits for it to exit, then
//! serves. This is how remio is upgraded under a running guest.

use std::os::fd::{AsRawFd as _, FromRawFd as _};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use remio_api::kernel::KernelApi;
use remio_api::socket::SocketApi;
use remio_api::{DmApi, DmInfo};
use remio_virtio::Config;

/// Where the platform's API socket is unless `--socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/tmp/remio-api.sock";

/// Arguments of `remio dm`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Device list: TOML (`[[device]]` tables) or bao-virtio-dm's YAML (`.yaml`/`.yml`).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// The platform's device-model API socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET, conflicts_with = "kernel_driver")]
    pub socket: PathBuf,
    /// Use the C driver's ioctls (Bao hardware) instead of the socket: /dev/bao if it exists
    /// (CREATE_DM from each device's shmem_addr, shmem_size and irq), else
    /// /dev/bao-io-dispatcher. On that driver closing a DM fd destroys the DM, so this
    /// process's exit is final for its DMs: they come back only with the driver (reload the
    /// module or reboot the backend). If one device cannot start, the others keep serving.
    #[arg(long)]
    pub kernel_driver: bool,
    /// Only check the config file and print the devices it describes.
    #[arg(long)]
    pub check: bool,
    /// Take over from the running device model PID (an upgrade): send it SIGTERM, wait for it
    /// to exit, then serve its devices, resuming each where it was. Not with --kernel-driver
    /// (the C driver destroys a DM when its device model exits).
    #[arg(long, value_name = "PID", conflicts_with = "kernel_driver")]
    pub takeover: Option<i32>,
    /// With --takeover: how long to wait for PID to exit.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub takeover_timeout_ms: u64,
}

/// Runs `remio dm`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let config = Config::from_file(&args.config)
        .with_context(|| format!("device config {}", args.config.display()))?;
    if args.check {
        for d in &config.devices {
            println!("{d:?}");
        }
        return Ok(());
    }
    let api: Box<dyn DmApi> = if args.kernel_driver {
        let descriptions = dm_descriptions(&config);
        let api = KernelApi::open_auto(&descriptions).context(
            "opening the C driver (/dev/bao or /dev/bao-io-dispatcher; is the module loaded?)",
        )?;
        log::info!(
            "dm: using the {} at {}",
            api.revision(),
            api.path().display()
        );
        Box::new(api)
    } else {
        // Signals are taken by one thread (below), so they are blocked in every thread the
        // device model starts from here on.
        remio::signals::block_stop_signals();
        if let Some(pid) = args.takeover {
            take_over_from(pid, Duration::from_millis(args.takeover_timeout_ms))?;
        }
        anyhow::ensure!(
            args.socket.exists(),
            "no platform socket at {} (start `remio platform --config FILE` first, or pass --socket)",
            args.socket.display()
        );
        Box::new(SocketApi::connect(&args.socket))
    };
    let handle = remio_virtio::serve(api.as_ref(), &config).context("starting the devices")?;
    for d in handle.devices() {
        log::info!("dm {}: {}", d.dm_id, d.description);
    }
    let api_socket = (!args.kernel_driver).then(|| crate::stats::socket_key(&args.socket));
    let _stats = crate::stats::serve_device_model(&handle, api_socket);
    let failed = handle.failures().len();
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        for e in handle.failures() {
            log::error!("a device could not start and is not served: {e}");
            // One line per failure; the reason's own newlines would break the marker.
            let _ = writeln!(out, "REMIO-DM-FAILED {}", e.to_string().replace('\n', " "));
        }
        let _ = writeln!(out, "REMIO-DM-READY {}", handle.devices().len());
        let _ = out.flush();
    }
    anyhow::ensure!(
        !handle.devices().is_empty(),
        "no device could start ({failed} failed)"
    );
    if !args.kernel_driver {
        let stopper = handle.stopper();
        std::thread::Builder::new()
            .name("remio-dm-signals".into())
            .spawn(move || {
                let sig = remio::signals::wait_stop_signal();
                log::info!("dm: signal {sig}: ending the sessions; the devices stay resumable");
                stopper.stop();
            })
            .context("starting the signal thread")?;
    }
    handle.wait();
    log::info!("every session has ended; exiting");
    anyhow::ensure!(failed == 0, "{failed} device(s) could not start");
    Ok(())
}

/// Signals the device model `pid` to hand over, and waits (bounded) until it has exited: only
/// then are its queue workers gone, and the devices free to resume here.
fn take_over_from(pid: i32, timeout: Duration) -> anyhow::Result<()> {
    anyhow::ensure!(pid > 0, "--takeover {pid}: not a process id");
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let raw = i32::try_from(raw).unwrap_or(-1);
    if raw < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("--takeover {pid}: no such process"));
    }
    // SAFETY: `raw` is a new pidfd that nothing else owns.
    let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    // SAFETY: plain syscall on a pid we just opened a pidfd for (so it is that process).
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("--takeover {pid}: cannot signal it"));
    }
    log::info!("dm: taking over from {pid}: signalled, waiting for it to exit");
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd; a pidfd becomes readable when its process exits.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    anyhow::ensure!(
        n == 1,
        "--takeover {pid}: it did not exit within {} ms",
        timeout.as_millis()
    );
    Ok(())
}

/// What the later driver revision's CREATE_DM needs of each device, where the config gives
/// it all (`shmem_addr`, `shmem_size`, `irq`); a device without them cannot be created there,
/// which opening it reports.
fn dm_descriptions(config: &Config) -> Vec<DmInfo> {
    config
        .devices
        .iter()
        .filter_map(|d| {
            Some(DmInfo {
                id: d.dm_id,
                shmem_addr: d.shmem_addr?,
                shmem_size: d.shmem_size?,
                irq: d.irq?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_dm_inputs_come_from_devices_that_give_all_three() {
        let config = Config::from_toml_str(
            "[[device]]\ndm_id = 0\ntype = \"rng\"\nmmio_base = 0x1000\nshmem_addr = 0x5000_0000\n\
             shmem_size = 0x100_0000\nirq = 47\n\
             [[device]]\ndm_id = 1\ntype = \"rng\"\nmmio_base = 0x2000\nshmem_addr = 0x5000_0000\n",
        )
        .unwrap();

        let d = dm_descriptions(&config);

        assert_eq!(
            d,
            vec![DmInfo {
                id: 0,
                shmem_addr: 0x5000_0000,
                shmem_size: 0x100_0000,
                irq: 47
            }]
        );
    }
}
