//! `remio stats`: the counters of a running `remio run`, read from its stats socket.
//!
//! Every `remio run` serves a small UNIX socket, `stats-<pid>.sock` in a well-known per-user
//! run directory ([`run_dir`]: `$XDG_RUNTIME_DIR/remio`, else `/tmp/remio-<uid>`, mode 0700).
//! A client connects and reads one JSON document (one line: [`Snapshot`]), then the server
//! closes the connection; nothing is read from the client. The counters are the ones the
//! platform keeps anyway (relaxed atomics in the dispatcher, the hypervisor model and the
//! bridge), so serving them costs the request path nothing.
//!
//! `remio stats` finds the socket itself (the newest live one in [`run_dir`]; `--socket` to
//! choose) and prints a table refreshed every second, or one table (`--once`) or the JSON
//! (`--json`, for scripts).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// Arguments of `remio stats`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The stats socket of the `remio run` to read [default: the newest live
    /// `stats-<pid>.sock` in $XDG_RUNTIME_DIR/remio, else /tmp/remio-<uid>].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print one table and exit (default: refresh every second until Ctrl-C).
    #[arg(long)]
    pub once: bool,
    /// Print the counters once as JSON (one line) and exit.
    #[arg(long)]
    pub json: bool,
}

/// One DM's counters (the dispatcher's `DmStats`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmSnapshot {
    /// The DM id (= the device's window index).
    pub id: u32,
    /// Requests fetched from the hypervisor (ASK).
    pub requests: u64,
    /// Of which routed to the device model's control client.
    pub to_control: u64,
    /// Of which answered inline from the status word.
    pub to_status_word: u64,
    /// Of which signalled on a queue's ioeventfd (completed inline).
    pub to_ioeventfd: u64,
    /// Of which routed to an in-process I/O client.
    pub to_io_client: u64,
    /// Completed by the dispatcher itself (DM destroyed, queue overflow, held requests).
    pub completed_by_dispatcher: u64,
    /// Interrupts injected into the guest for the device model's irqfd.
    pub interrupts: u64,
    /// Hypercalls that returned an unexpected status.
    pub hypercall_errors: u64,
    /// Whether a device model holds a session on this DM now.
    pub session: bool,
}

/// What the stats socket serves.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The serving process (`remio run`).
    pub pid: u32,
    /// Seconds since it started serving.
    pub uptime_s: u64,
    /// Device models started after the first (`--dm-restarts`).
    pub dm_restarts: u32,
    /// Trapped accesses the hypervisor model queued.
    pub requests: u64,
    /// Of which completed by the backend.
    pub completions: u64,
    /// Accesses that timed out (`--access-timeout-ms`).
    pub timeouts: u64,
    /// Interrupts injected into the frontend (NOTIFY).
    pub interrupts: u64,
    /// Register accesses QEMU made through the bridge.
    pub bridge_accesses: u64,
    /// Their mean time in remio, in nanoseconds.
    pub bridge_mean_ns: u64,
    /// Per DM, in id order.
    pub dms: Vec<DmSnapshot>,
}

/// The per-user directory where `remio run` puts its stats socket: `$XDG_RUNTIME_DIR/remio`
/// when that variable names a directory, else `/tmp/remio-<uid>`.
pub fn run_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(d) if d.is_dir() => d.join("remio"),
        _ => {
            // SAFETY: getuid has no preconditions and cannot fail.
            let uid = unsafe { libc::getuid() };
            std::env::temp_dir().join(format!("remio-{uid}"))
        }
    }
}

/// Creates [`run_dir`] (mode 0700) and checks that it is ours and not open to others.
fn ensure_run_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    let meta = std::fs::symlink_metadata(dir).with_context(|| dir.display().to_string())?;
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o022 != 0 {
        bail!(
            "{} is not a directory of ours that only we can write",
            dir.display()
        );
    }
    Ok(())
}

/// The stats socket of a `remio run` while it lives; removed on drop.
pub struct StatsServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StatsServer {
    /// Serves `snapshot()` on `stats-<pid>.sock` in `dir`.
    pub fn start(
        dir: &Path,
        snapshot: impl Fn() -> Snapshot + Send + 'static,
    ) -> anyhow::Result<Self> {
        ensure_run_dir(dir)?;
        let path = dir.join(format!("stats-{}.sock", std::process::id()));
        // A socket left by a process with our pid (pids are reused) is stale.
        let _ = std::fs::remove_file(&path);
        let listener =
            UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("remio-stats".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(mut conn) = conn else { continue };
                    let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
                    if let Ok(mut text) = serde_json::to_string(&snapshot()) {
                        text.push('\n');
                        let _ = conn.write_all(text.as_bytes());
                    }
                }
            })
            .context("starting the stats thread")?;
        Ok(Self {
            path,
            stop,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StatsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees `stop`.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads one snapshot from the socket at `path`.
pub fn read(path: &Path) -> anyhow::Result<Snapshot> {
    let mut s =
        UnixStream::connect(path).with_context(|| format!("connecting to {}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(text.trim()).with_context(|| format!("decoding {}", path.display()))
}

/// The newest stats socket in `dir` that answers; an error naming `dir` when none does.
pub fn find(dir: &Path) -> anyhow::Result<PathBuf> {
    let mut socks: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("stats-") && name.ends_with(".sock")
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    socks.sort();
    let live = socks
        .into_iter()
        .rev()
        .map(|(_, p)| p)
        .find(|p| UnixStream::connect(p).is_ok());
    live.with_context(|| {
        format!(
            "no running remio found: no live stats-<pid>.sock in {} (is `remio run` running as \
             this user? else give --socket PATH)",
            dir.display()
        )
    })
}

/// The table `remio stats` prints.
pub fn table(s: &Snapshot) -> String {
    let mut out = format!(
        "remio pid {}  up {} s  device-model restarts {}\n\
         hypervisor: {} requests, {} completions, {} timeouts, {} interrupts; bridge: {} \
         accesses, mean {:.1} us\n\n",
        s.pid,
        s.uptime_s,
        s.dm_restarts,
        s.requests,
        s.completions,
        s.timeouts,
        s.interrupts,
        s.bridge_accesses,
        s.bridge_mean_ns as f64 / 1000.0
    );
    out.push_str(&format!(
        "{:>3} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8}\n",
        "dm",
        "requests",
        "control",
        "status",
        "ioeventfd",
        "io-client",
        "by-disp",
        "irqs",
        "session"
    ));
    for d in &s.dms {
        out.push_str(&format!(
            "{:>3} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8}\n",
            d.id,
            d.requests,
            d.to_control,
            d.to_status_word,
            d.to_ioeventfd,
            d.to_io_client,
            d.completed_by_dispatcher,
            d.interrupts,
            if d.session { "yes" } else { "no" }
        ));
    }
    out
}

/// Runs `remio stats`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let path = match args.socket {
        Some(p) => p,
        None => find(&run_dir())?,
    };
    if args.json {
        let s = read(&path)?;
        println!("{}", serde_json::to_string(&s)?);
        return Ok(());
    }
    loop {
        let s = read(&path).with_context(|| "the remio run may have ended".to_owned())?;
        let mut o = std::io::stdout().lock();
        if !args.once {
            // Clear the screen and go home, as `top` does.
            write!(o, "\x1b[H\x1b[2J")?;
        }
        write!(o, "{}", table(&s))?;
        o.flush()?;
        if args.once {
            return Ok(());
        }
        drop(o);
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "remio-stats-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_client_reads_what_the_server_snapshots_and_finds_it_in_the_run_dir() {
        let dir = tmp_dir();
        let server = StatsServer::start(&dir, || Snapshot {
            pid: 42,
            requests: 7,
            dms: vec![DmSnapshot {
                id: 0,
                requests: 7,
                to_control: 5,
                session: true,
                ..DmSnapshot::default()
            }],
            ..Snapshot::default()
        })
        .unwrap();
        assert_eq!(find(&dir).unwrap(), server.path());
        let s = read(server.path()).unwrap();
        assert_eq!((s.pid, s.requests, s.dms[0].to_control), (42, 7, 5));
        let t = table(&s);
        assert!(t.contains("remio pid 42"), "{t}");
        assert!(t.lines().last().unwrap().ends_with("yes"), "{t}");
        let path = server.path().to_owned();
        drop(server);
        assert!(!path.exists(), "the socket is removed when the run ends");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn finding_no_live_socket_names_the_directory_it_looked_in() {
        let dir = tmp_dir();
        std::fs::create_dir_all(&dir).unwrap();
        // A stale socket (its server is gone) does not count.
        drop(UnixListener::bind(dir.join("stats-1.sock")).unwrap());
        let e = find(&dir).unwrap_err().to_string();
        assert!(e.contains(&dir.display().to_string()), "{e}");
        assert!(e.contains("no running remio"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_run_dir_must_not_be_writable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tmp_dir();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(StatsServer::start(&dir, Snapshot::default).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
