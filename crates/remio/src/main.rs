//! `remio`: Bao's Remote I/O path on an ordinary Linux machine.

use clap::{Parser, Subcommand};

/// Bao's Remote I/O path: hypervisor model, I/O dispatcher and VirtIO device models.
#[derive(Debug, Parser)]
#[command(name = "remio", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the driver ABI constants (ioctl numbers and struct sizes).
    Abi,
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Abi => {
            println!("work in progress");
        }
    }
    Ok(())
}
