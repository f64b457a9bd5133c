//! `remio guest`.

/// Arguments of `remio guest`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `remio guest`.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`remio guest` is not implemented yet")
}
