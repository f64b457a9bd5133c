//! `remio bench`.

/// Arguments of `remio bench`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `remio bench`.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`remio bench` is not implemented yet")
}
