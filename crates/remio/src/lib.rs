//! remio's reusable parts, for the `remio` binary's subcommands and other code that embeds
//! them: [`platform::Platform`], the platform side (hypervisor model + dispatcher + API socket).

pub mod platform;
pub mod signals;
pub mod stats;
