//! The vhost-user daemons of `remio run --share HOSTDIR` (virtiofsd) and `remio run --vsock CID`
//! (vhost-device-vsock): found, started as children of `remio run` (killed with it, and by the
//! kernel if it dies: `PR_SET_PDEATHSIG`), waited for until their sockets exist, and turned into
//! `fs` / `vsock` devices of the generated device-model config
//! ([`remio_virtio::devices::vhost_user`] serves them).
//!
//! The binaries come from scripts/setup (`cargo install` into `target/tools/bin`);
//! `REMIO_VIRTIOFSD` / `REMIO_VHOST_DEVICE_VSOCK` name others, and `PATH` is the last resort.
//! A missing binary, a HOSTDIR that is not a directory, a bad CID or a daemon that exits or does
//! not listen within [`READY_TIMEOUT`] is an error naming the flag, before the guest starts.
//!
//! virtiofsd runs with `--cache=never` (what either side writes, the other sees at once) and
//! without its sandbox (`--sandbox=none --seccomp=none`: containers often forbid the namespaces
//! it would make). It serves one connection and exits when the device model hangs up, so a
//! device-model restart (`--dm-restarts`) leaves the share without its daemon: the guest's
//! share then fails with EIO (the vhost-user device's "daemon gone" path).

use std::fs::File;
use std::os::unix::fs::FileTypeExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::run::DeviceSpec;

/// The virtio-fs tag of `--share` (the guest's `mount -t virtiofs remio /mnt/host`).
pub const SHARE_TAG: &str = "remio";
/// Where the guest's /init mounts the share (kernel command line `remio.share=<tag>`).
pub const SHARE_MOUNT: &str = "/mnt/host";
/// How long a daemon may take to create its socket.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The daemon binaries: (binary name, environment variable naming another one).
const VIRTIOFSD: (&str, &str) = ("virtiofsd", "REMIO_VIRTIOFSD");
const VHOST_DEVICE_VSOCK: (&str, &str) = ("vhost-device-vsock", "REMIO_VHOST_DEVICE_VSOCK");

/// `target/tools/bin` of the workspace this binary was built in.
fn tools_dir() -> PathBuf {
    // crates/remio -> the workspace root.
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or(manifest_dir)
        .join("target/tools/bin")
}

/// Finds a daemon binary: its environment variable, `target/tools/bin`, then `PATH`.
fn find_daemon(flag: &str, daemon: (&str, &str)) -> anyhow::Result<PathBuf> {
    find_daemon_with(flag, daemon, std::env::var_os(daemon.1))
}

/// [`find_daemon`] with the environment variable's value given.
fn find_daemon_with(
    flag: &str,
    (name, env): (&str, &str),
    env_value: Option<std::ffi::OsString>,
) -> anyhow::Result<PathBuf> {
    if let Some(p) = env_value {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("{flag}: {env}={} is not a file", p.display());
        }
        return Ok(p);
    }
    let local = tools_dir().join(name);
    if local.is_file() {
        return Ok(local);
    }
    crate::guest::find_tool(name).with_context(|| {
        format!(
            "{flag}: {name} not found in {} nor on PATH: run scripts/setup (it builds {name} \
             there), or set {env} to the binary",
            tools_dir().display()
        )
    })
}

/// What `--share` and `--vsock` ask for, checked before anything starts.
#[derive(Debug, Default)]
pub struct Plan {
    share: Option<(PathBuf, PathBuf)>,
    vsock: Option<(u64, PathBuf)>,
    run_dir: PathBuf,
}

impl Plan {
    /// Checks `--share HOSTDIR` (an existing directory) and `--vsock CID` (3 or more, below
    /// 2^32 − 1) and finds their daemons; the sockets go in `run_dir`.
    pub fn new(share: Option<&Path>, vsock: Option<u64>, run_dir: &Path) -> anyhow::Result<Self> {
        let share = match share {
            None => None,
            Some(dir) => {
                let meta = std::fs::metadata(dir)
                    .with_context(|| format!("--share {}: no such directory", dir.display()))?;
                if !meta.is_dir() {
                    bail!("--share {}: not a directory", dir.display());
                }
                let dir = dir
                    .canonicalize()
                    .with_context(|| format!("--share {}", dir.display()))?;
                Some((dir, find_daemon("--share", VIRTIOFSD)?))
            }
        };
        let vsock = match vsock {
            None => None,
            Some(cid) => {
                if !(3..u64::from(u32::MAX)).contains(&cid) {
                    bail!("--vsock {cid}: the guest CID must be 3 or more, below 2^32 - 1");
                }
                Some((cid, find_daemon("--vsock", VHOST_DEVICE_VSOCK)?))
            }
        };
        Ok(Self {
            share,
            vsock,
            run_dir: run_dir.to_owned(),
        })
    }

    /// The socket virtiofsd listens on.
    pub fn fs_socket(&self) -> PathBuf {
        self.run_dir.join("virtiofsd.sock")
    }

    /// The socket vhost-device-vsock listens on for the device model.
    fn vsock_socket(&self) -> PathBuf {
        self.run_dir.join("vhost-vsock.sock")
    }

    /// The host side of the vsock device: host programs connect here (`CONNECT <port>\n`), and
    /// the guest's connections to CID 2 port P go to `<this>_P`.
    pub fn vsock_host_socket(&self) -> Option<PathBuf> {
        self.vsock.as_ref().map(|_| self.run_dir.join("vsock"))
    }

    /// The kernel command line word that makes /init mount the share.
    pub fn cmdline(&self) -> Option<String> {
        self.share
            .as_ref()
            .map(|_| format!("remio.share={SHARE_TAG}"))
    }

    /// Appends the `fs` and `vsock` devices to `plan`, numbered after its last device.
    pub fn add_devices(&self, plan: &mut Vec<DeviceSpec>) {
        let mut push = |kind: &str, socket: PathBuf, tag: Option<String>, guest_cid| {
            let i = u32::try_from(plan.len()).unwrap_or(u32::MAX);
            plan.push(DeviceSpec {
                dm_id: i,
                kind: kind.to_owned(),
                mmio_base: crate::run::MMIO_BASE + u64::from(i) * crate::run::WINDOW,
                path: None,
                backend: None,
                tap: None,
                socket: Some(socket),
                shmem_addr: None,
                tag,
                guest_cid,
            });
        };
        if self.share.is_some() {
            push("fs", self.fs_socket(), Some(SHARE_TAG.to_owned()), None);
        }
        if let Some((cid, _)) = &self.vsock {
            push("vsock", self.vsock_socket(), None, Some(*cid));
        }
    }

    /// Starts the daemons and waits until each listens. They stop when [`Daemons`] drops.
    pub fn start(&self) -> anyhow::Result<Daemons> {
        let mut daemons = Daemons::default();
        if let Some((dir, bin)) = &self.share {
            let socket = self.fs_socket();
            let mut cmd = Command::new(bin);
            cmd.arg(format!("--socket-path={}", socket.display()))
                .arg(format!("--shared-dir={}", dir.display()))
                .args(["--sandbox=none", "--seccomp=none", "--cache=never"]);
            let d = Daemon::spawn("--share", "virtiofsd", cmd, &self.run_dir)?;
            daemons.0.push(d);
            wait_ready(&mut daemons.0, &[&socket])?;
        }
        if let Some((cid, bin)) = &self.vsock {
            let socket = self.vsock_socket();
            let host = self.run_dir.join("vsock");
            let mut cmd = Command::new(bin);
            cmd.arg("--vm").arg(format!(
                "guest-cid={cid},socket={},uds-path={}",
                socket.display(),
                host.display()
            ));
            let d = Daemon::spawn("--vsock", "vhost-device-vsock", cmd, &self.run_dir)?;
            daemons.0.push(d);
            wait_ready(&mut daemons.0, &[&socket, &host])?;
        }
        Ok(daemons)
    }
}

/// One daemon child, killed and reaped when dropped.
#[derive(Debug)]
struct Daemon {
    flag: &'static str,
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` with its output in `<run_dir>/<name>.log`.
    fn spawn(
        flag: &'static str,
        name: &'static str,
        mut cmd: Command,
        run_dir: &Path,
    ) -> anyhow::Result<Self> {
        let log = run_dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .env("RUST_LOG", "info");
        // SAFETY: the closure runs in the child between fork and exec and only calls prctl(2),
        // which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // Killed with remio run even if it dies without cleaning up.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("{flag}: starting {name}"))?;
        log::debug!("{name} pid {} (log {})", child.id(), log.display());
        Ok(Self {
            flag,
            name,
            child,
            log,
        })
    }

    /// The last lines of the daemon's log, for an error message.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            log::debug!("stopping {} (pid {})", self.name, self.child.id());
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Whether `path` is a socket.
fn is_socket(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Waits until every path of `sockets` is a socket, or the last daemon of `daemons` exits, or
/// [`READY_TIMEOUT`] passes.
fn wait_ready(daemons: &mut [Daemon], sockets: &[&Path]) -> anyhow::Result<()> {
    let Some(d) = daemons.last_mut() else {
        return Ok(());
    };
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if sockets.iter().all(|s| is_socket(s)) {
            return Ok(());
        }
        if let Ok(Some(status)) = d.child.try_wait() {
            bail!(
                "{}: {} exited ({status}) before it listened:\n{}",
                d.flag,
                d.name,
                d.log_tail()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "{}: {} did not create {} within {} s:\n{}",
                d.flag,
                d.name,
                sockets
                    .iter()
                    .map(|s| s.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" and "),
                READY_TIMEOUT.as_secs(),
                d.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The running daemons; dropping this stops them.
#[derive(Debug, Default)]
pub struct Daemons(Vec<Daemon>);

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("remio-vhostd-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_missing_or_non_directory_share_is_an_error_naming_the_flag() {
        let dir = tmp("share");
        let missing = dir.join("nope");
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();

        let e1 = Plan::new(Some(&missing), None, &dir).unwrap_err();
        let e2 = Plan::new(Some(&file), None, &dir).unwrap_err();

        std::fs::remove_dir_all(&dir).unwrap();
        let (e1, e2) = (format!("{e1:#}"), format!("{e2:#}"));
        assert!(
            e1.starts_with("--share ") && e1.contains("no such directory"),
            "{e1}"
        );
        assert!(
            e2.contains("--share ") && e2.contains("not a directory"),
            "{e2}"
        );
    }

    #[test]
    fn a_reserved_vsock_cid_is_refused() {
        let dir = tmp("cid");
        for cid in [0, 1, 2, u64::from(u32::MAX)] {
            let e = format!("{:#}", Plan::new(None, Some(cid), &dir).unwrap_err());
            assert!(e.starts_with(&format!("--vsock {cid}:")), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_daemon_binary_is_an_error_naming_the_flag_and_what_to_do() {
        let named = Some("/nonexistent/virtiofsd".into());
        let e = format!(
            "{:#}",
            find_daemon_with("--share", VIRTIOFSD, named).unwrap_err()
        );
        assert!(e.starts_with("--share: REMIO_VIRTIOFSD="), "{e}");

        let e = format!(
            "{:#}",
            find_daemon_with("--vsock", ("remio-no-such-daemon", "REMIO_X"), None).unwrap_err()
        );
        assert!(
            e.starts_with("--vsock: remio-no-such-daemon not found"),
            "{e}"
        );
        assert!(e.contains("run scripts/setup"), "{e}");
    }

    #[test]
    fn a_daemon_that_exits_at_once_is_an_error_with_its_output_not_a_hang() {
        let dir = tmp("exit");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo bad option >&2; exit 3"]);
        let d = Daemon::spawn("--share", "virtiofsd", cmd, &dir).unwrap();
        let mut ds = vec![d];

        let started = Instant::now();
        let e = format!(
            "{:#}",
            wait_ready(&mut ds, &[&dir.join("s.sock")]).unwrap_err()
        );

        std::fs::remove_dir_all(&dir).unwrap();
        assert!(started.elapsed() < READY_TIMEOUT);
        assert!(
            e.contains("virtiofsd exited") && e.contains("bad option"),
            "{e}"
        );
    }

    #[test]
    fn the_share_and_vsock_devices_follow_the_planned_ones_in_window_order() {
        let dir = tmp("plan");
        let plan = Plan {
            share: Some((dir.clone(), PathBuf::from("/bin/true"))),
            vsock: Some((7, PathBuf::from("/bin/true"))),
            run_dir: dir.clone(),
        };
        let mut devices = crate::run::device_plan(
            Path::new("/d.img"),
            crate::run::ConsoleMode::Off,
            true,
            None,
        );

        plan.add_devices(&mut devices);

        std::fs::remove_dir_all(&dir).unwrap();
        let kinds: Vec<_> = devices.iter().map(|d| d.kind.as_str()).collect();
        assert_eq!(kinds, ["block", "rng", "fs", "vsock"]);
        assert_eq!(devices[2].dm_id, 2);
        assert_eq!(devices[2].mmio_base, 0x1000_0400);
        assert_eq!(devices[2].tag.as_deref(), Some(SHARE_TAG));
        assert_eq!(devices[2].socket, Some(dir.join("virtiofsd.sock")));
        assert_eq!(devices[3].guest_cid, Some(7));
        assert_eq!(devices[3].mmio_base, 0x1000_0600);
        assert_eq!(plan.cmdline().as_deref(), Some("remio.share=remio"));
    }
}
