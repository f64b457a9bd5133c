//! `remio run`.

/// Arguments of `remio run`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `remio run`.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`remio run` is not implemented yet")
}
