//! The host end of `remio run --net auto` (the demo's default): a TAP interface made with
//! iproute2, given [`HOST_ADDR`], and removed again when dropped. The guest's `/init` gives its
//! `eth0` [`GUEST_ADDR`] (`remio.net=` on the kernel command line), so the two can talk at once.
//!
//! Making a TAP needs CAP_NET_ADMIN and /dev/net/tun; where either is missing the demo runs
//! without net and says why.

use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// The host's address on the TAP (a /24 private to this link).
pub const HOST_ADDR: &str = "10.77.0.1/24";
/// The address the guest's `/init` gives `eth0` (see `guest/init`, `remio.net=`).
pub const GUEST_ADDR: &str = "10.77.0.2/24";

/// A TAP interface this process created; deleted on drop.
#[derive(Debug)]
pub struct HostTap {
    name: String,
}

impl HostTap {
    /// Creates `remio-<pid>` (unique per `remio run`, within IFNAMSIZ), adds [`HOST_ADDR`] and
    /// brings it up. Errors name the failing step and iproute2's message.
    pub fn create() -> anyhow::Result<Self> {
        let name = format!("remio-{}", std::process::id() % 10_000_000);
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"])?;
        // From here on, drop removes the interface whatever fails next.
        let tap = Self { name };
        ip(&["addr", "add", HOST_ADDR, "dev", &tap.name])?;
        ip(&["link", "set", &tap.name, "up"])?;
        Ok(tap)
    }

    /// The interface name (what the device model's TAP backend opens).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        if let Err(e) = ip(&["link", "del", &self.name]) {
            log::warn!("removing TAP {}: {e:#}", self.name);
        }
    }
}

/// Runs `ip ARGS`, turning a failure into an error carrying its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let ip = crate::guest::find_tool("ip").context("`ip` not found (install iproute2)")?;
    let out = Command::new(ip)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running `ip`")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tap_is_created_addressed_and_removed_when_root_allows() {
        let tap = match HostTap::create() {
            Ok(t) => t,
            Err(e) => {
                eprintln!("SKIP a_tap_is_created_addressed_and_removed_when_root_allows: {e:#}");
                return;
            }
        };
        let sys = std::path::Path::new("/sys/class/net").join(tap.name());
        assert!(
            sys.exists(),
            "{} exists while the HostTap lives",
            tap.name()
        );
        let show = Command::new("ip")
            .args(["-o", "addr", "show", "dev", tap.name()])
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&show.stdout).contains("10.77.0.1/24"));
        drop(tap);
        assert!(!sys.exists(), "the TAP is removed on drop");
    }

    #[test]
    fn ip_failures_carry_the_command_and_its_message() {
        let err = ip(&["link", "show", "dev", "remio-no-such-if"]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("ip link show dev remio-no-such-if"), "{msg}");
    }
}
