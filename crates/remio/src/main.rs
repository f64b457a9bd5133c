//! `remio`: Bao's Remote I/O path on an ordinary Linux machine.
//!
//! Each subcommand lives in its own module with an `Args` struct and a `run` function.

mod bench;
mod dm;
mod failover;
mod guest;
use remio::platform;
mod hosttap;
mod partition;
mod run;
mod soak;
use remio::stats;
mod vhostd;

use clap::{Parser, Subcommand};

/// Bao's Remote I/O path on an ordinary Linux machine: a model of the hypervisor's Remote I/O,
/// the I/O dispatcher, and VirtIO device models serving a real Linux guest.
#[derive(Debug, Parser)]
#[command(name = "remio", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a Linux guest whose devices are served through remio (the demo with no arguments).
    /// Boxed: its many flags would make every `Command` as large (clippy::large_enum_variant).
    Run(Box<run::Args>),
    /// Run the platform side: hypervisor model, dispatcher and the device-model API socket.
    Platform(platform::Args),
    /// Run a device-model process serving the devices of a config file.
    Dm(dm::Args),
    /// Build or inspect the guest kernel and initramfs.
    Guest(guest::Args),
    /// Measure every cost as a ratio against a floor measured in the same run.
    Bench(bench::Args),
    /// Load with churn across processes: exactly-once accounting, fds and memory flat.
    Soak(soak::Args),
    /// Show the counters of a running `remio run` or `remio platform` (requests by route,
    /// interrupts, timeouts, latency; per device I/O).
    Stats(stats::Args),
}

fn main() {
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    // virtio-queue logs every invalid queue at error level, unthrottled, each time a guest
    // sets DRIVER_OK: a guest rewriting the status register could flood the log. The
    // transport reports the same failure itself, rate-limited. RUST_LOG naming virtio_queue
    // still gets its lines.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("virtio_queue")) {
        logger.filter_module("virtio_queue", log::LevelFilter::Off);
    }
    logger.init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Platform(args) => platform::run(args),
        Command::Dm(args) => dm::run(args),
        Command::Guest(args) => guest::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Soak(args) => soak::run(args),
        Command::Stats(args) => stats::run(args),
    };
    if let Err(err) = result {
        eprintln!("remio: {}", error_chain(&err));
        std::process::exit(1);
    }
}

/// `err` and its causes joined by ": ", leaving out a cause that the message before it already
/// ends with (many error types both show their source and return it as `source()`).
fn error_chain(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_names_each_cause_once() {
        let io = std::io::Error::other("TAP name too long");
        // A real error type that both prints its source and returns it.
        let err = anyhow::Error::new(remio_virtio::device::ActivateError::Backend(io))
            .context("starting the devices");
        assert_eq!(
            error_chain(&err),
            "starting the devices: device backend: TAP name too long"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(&plain), "outer: inner");
    }
}
