//! `remio dm --config FILE`: a device-model process serving every device of a config file.
//!
//! By default it reaches the dispatcher through the platform's API socket; with
//! `--kernel-driver` through the C driver's ioctls on `/dev/bao-io-dispatcher`, as on Bao
//! hardware. The device code is the same either way.

use std::path::PathBuf;

use anyhow::Context as _;
use remio_api::kernel::KernelApi;
use remio_api::socket::SocketApi;
use remio_api::DmApi;
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
    /// Use the C driver's ioctls on /dev/bao-io-dispatcher (Bao hardware) instead of the socket.
    #[arg(long)]
    pub kernel_driver: bool,
    /// Only check the config file and print the devices it describes.
    #[arg(long)]
    pub check: bool,
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
        Box::new(KernelApi::open_default().context("opening /dev/bao-io-dispatcher")?)
    } else {
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
    handle.wait();
    log::info!("every session has ended; exiting");
    Ok(())
}
