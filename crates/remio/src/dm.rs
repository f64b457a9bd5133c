//! `remio dm`.

/// Arguments of `remio dm`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `remio dm`.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`remio dm` is not implemented yet")
}
