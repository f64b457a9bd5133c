//! Child processes of a benchmark: `remio bench --child ROLE --child-arg ARG`, killed on drop.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::Context as _;

/// A child running one role; killed and reaped when dropped, so no run leaves one behind.
#[derive(Debug)]
pub struct ChildProcess(Child);

impl ChildProcess {
    /// Starts `remio bench --child ROLE --child-arg ARG`.
    pub fn spawn(role: &str, arg: &Path) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding the remio executable")?;
        let child = Command::new(exe)
            .args(["bench", "--child", role, "--child-arg"])
            .arg(arg)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting the {role} child"))?;
        Ok(Self(child))
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
