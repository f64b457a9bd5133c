//! `remio platform`.

/// Arguments of `remio platform`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `remio platform`.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`remio platform` is not implemented yet")
}
