//! `remio stats`: the counters of a running `remio run` or `remio platform`, read from its
//! stats socket.
//!
//! Every `remio run` and every `remio platform` serves a small UNIX socket, `stats-<pid>.sock`
//! in a well-known per-user run directory ([`run_dir`]: `$XDG_RUNTIME_DIR/remio`, else
//! `/tmp/remio-<uid>`, mode 0700). A client connects and reads one JSON document (one line:
//! [`Report`], which is a [`Snapshot`] and what serves it), then the server closes the
//! connection; nothing is read from the client. The counters are the ones the platform keeps
//! anyway (relaxed atomics in the dispatcher, the hypervisor model and the bridge), so serving
//! them costs the request path nothing.
//!
//! `remio stats` finds the socket itself ([`find`]: the only live one in [`run_dir`]; with
//! several, the newest, saying on stderr which it picked and which others run; `--list` lists
//! them; `--socket` to choose) and prints a table refreshed every second, or one table
//! (`--once`) or the JSON (`--json`, for scripts).
//!
//! # Per DM, from the platform
//!
//! The hypervisor model counts per device pair (`remio_hyp::DeviceStats`): trapped accesses,
//! completions, timeouts, interrupts injected, accesses waiting, and a log2 histogram of the
//! trapped-access latency (trap to return), from which p50/p99 come (within 25%; max exact).
//! The dispatcher counts per DM where each request went (control client, status word,
//! ioeventfd, in-process client) and how many device-model sessions the DM has had.
//!
//! # Per device, from the device model
//!
//! Each `remio dm` serves its devices' counters (`remio_virtio::DeviceStats`: requests and
//! bytes by kind, errors, DEVICE_NEEDS_RESET) on its own socket, `dm-<pid>.sock` in the same
//! run directory, as one JSON line ([`DmProcessSnapshot`]) naming the platform API socket it
//! serves. The platform's snapshot reads the device models of its own API socket and puts
//! each device under its DM. Why a socket of its own rather than a shared stats region the
//! device model registers with the platform (as the status word is): it needs no new API
//! call, so it works the same over remio's socket and the C driver's ioctls (which have no
//! such call); nothing of the device model's address space is shared for it; and the layout is
//! JSON, versioned by its field names, not a binary layout both sides must agree on. The
//! cost: a device model's counters start from zero when it is restarted (the platform's
//! counters go on), and they are read only while it runs (`remio run --stats-json` reads them
//! before it stops the device model).

use std::collections::BTreeMap;
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
    /// The stats socket of the `remio run` or `remio platform` to read (default: the live
    /// `stats-PID.sock` in `$XDG_RUNTIME_DIR/remio`, else `/tmp/remio-UID`; the newest when
    /// several run, named on stderr).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// List the running `remio run` and `remio platform` processes found in the run directory
    /// (pid, kind, API socket, stats socket) and exit.
    #[arg(long, conflicts_with_all = ["socket", "once", "json"])]
    pub list: bool,
    /// Print one table and exit (default: refresh every second until Ctrl-C).
    #[arg(long)]
    pub once: bool,
    /// Print the counters once as JSON (one line) and exit.
    #[arg(long)]
    pub json: bool,
}

/// One DM's counters: the hypervisor model's of its device pair, the dispatcher's
/// (`DmStats`; zero with the C driver, whose counters live in the backend VM), and its device
/// model's ([`DeviceSnapshot`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DmSnapshot {
    /// The DM id (= the device's window index).
    pub id: u32,
    /// The device pair's bind key.
    pub bind_key: u32,
    /// Trapped accesses the hypervisor model queued for this DM.
    pub trapped: u64,
    /// Of which completed by the backend.
    pub completions: u64,
    /// Accesses that timed out.
    pub timeouts: u64,
    /// Accesses queued and not yet returned to the frontend now.
    pub waiting: u64,
    /// Of which not yet fetched by the dispatcher (ASK).
    pub pending: u64,
    /// Trapped-access latency: accesses measured.
    pub latency_count: u64,
    /// Trapped-access latency, median (ns; the upper end of its log2/4 bucket).
    pub latency_p50_ns: u64,
    /// Trapped-access latency, 99th percentile (ns; the upper end of its bucket).
    pub latency_p99_ns: u64,
    /// Trapped-access latency, maximum (ns, exact).
    pub latency_max_ns: u64,
    /// Requests fetched from the hypervisor (ASK) by the dispatcher.
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
    /// Interrupts injected into the guest (NOTIFY hypercalls for this DM).
    pub interrupts: u64,
    /// Hypercalls that returned an unexpected status.
    pub hypercall_errors: u64,
    /// Whether a device model holds a session on this DM now.
    pub session: bool,
    /// `serving` (a device model holds a session), `no session`, `paused`, `destroyed`, or
    /// `c-driver` (the dispatcher is in the backend VM: not known here).
    pub session_state: String,
    /// Device-model sessions the DM has had.
    pub sessions: u64,
    /// Of which after the first: restarts or replacements of its device model.
    pub restarts: u64,
    /// The device's own counters, from its device model (absent when it could not be read).
    pub device: Option<DeviceSnapshot>,
}

/// One device's counters, as its device model keeps them (`remio_virtio::DeviceStats`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceSnapshot {
    /// The DM the device serves.
    pub dm_id: u32,
    /// What the device is (type and backend).
    pub description: String,
    /// Requests by kind (`read`, `write`, `flush`, `get_id`, `discard`, `write_zeroes`,
    /// `other`); kinds with none are left out.
    pub requests: BTreeMap<String, u64>,
    /// Data bytes by kind (`read`: device to driver, `write`: driver to device). For console
    /// and net, `read` is what the guest received (input bytes; frames) and `write` what it
    /// sent (output bytes; frames), net's bytes without the virtio-net header.
    pub bytes: BTreeMap<String, u64>,
    /// Data the device took and dropped, by cause (`rx_oversize`, `rx_foreign`,
    /// `rx_truncated`, `tx_oversize`, `tx_malformed`, `tx_backend`; see
    /// `remio_virtio::stats::DropCause`); causes with none are left out.
    pub drops: BTreeMap<String, u64>,
    /// Requests answered with an error status.
    pub errors: u64,
    /// Times the device entered DEVICE_NEEDS_RESET.
    pub needs_reset: u64,
}

/// What a device model's stats socket (`dm-<pid>.sock`) serves.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DmProcessSnapshot {
    /// The device model's pid.
    pub pid: u32,
    /// The platform API socket it serves (canonical path; empty on the C driver).
    pub api_socket: String,
    /// Its devices.
    pub devices: Vec<DeviceSnapshot>,
}

/// What the stats socket serves.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
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

/// What a stats socket serves: a [`Snapshot`] and what serves it (one flat JSON object).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Report {
    /// `run` (`remio run`) or `platform` (`remio platform`).
    pub kind: String,
    /// The device-model API socket the platform serves (empty when it serves none).
    pub api_socket: String,
    /// The counters.
    #[serde(flatten)]
    pub snapshot: Snapshot,
}

/// The per-user directory where `remio run` and `remio platform` put their stats socket: `$XDG_RUNTIME_DIR/remio`
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
#[derive(Debug)]
pub struct StatsServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StatsServer {
    /// Serves `snapshot()` of a `remio run` on `stats-<pid>.sock` in `dir`.
    pub fn start(
        dir: &Path,
        snapshot: impl Fn() -> Snapshot + Send + 'static,
    ) -> anyhow::Result<Self> {
        Self::start_kind(dir, "run", String::new(), snapshot)
    }

    /// Serves `snapshot()` of a `remio platform` whose device-model API socket is
    /// `api_socket` on `stats-<pid>.sock` in `dir`.
    pub fn start_platform(
        dir: &Path,
        api_socket: Option<&Path>,
        snapshot: impl Fn() -> Snapshot + Send + 'static,
    ) -> anyhow::Result<Self> {
        let api = api_socket.map(socket_key).unwrap_or_default();
        Self::start_kind(dir, "platform", api, snapshot)
    }

    fn start_kind(
        dir: &Path,
        kind: &'static str,
        api_socket: String,
        snapshot: impl Fn() -> Snapshot + Send + 'static,
    ) -> anyhow::Result<Self> {
        Self::serve(
            dir,
            &format!("stats-{}.sock", std::process::id()),
            move || {
                serde_json::to_string(&Report {
                    kind: kind.to_owned(),
                    api_socket: api_socket.clone(),
                    snapshot: snapshot(),
                })
                .ok()
            },
        )
    }

    /// Serves a device model's counters on `dm-<pid>.sock` in `dir` (see the module docs).
    pub fn start_dm(
        dir: &Path,
        snapshot: impl Fn() -> DmProcessSnapshot + Send + 'static,
    ) -> anyhow::Result<Self> {
        Self::serve(dir, &format!("dm-{}.sock", std::process::id()), move || {
            serde_json::to_string(&snapshot()).ok()
        })
    }

    /// Answers every connection to `dir/name` with one line of `json()`.
    fn serve(
        dir: &Path,
        name: &str,
        json: impl Fn() -> Option<String> + Send + 'static,
    ) -> anyhow::Result<Self> {
        ensure_run_dir(dir)?;
        let path = dir.join(name);
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
                    if let Some(mut text) = json() {
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
        // The device models this run started were killed without a chance to remove theirs.
        if let Some(dir) = self.path.parent() {
            for path in dm_sockets(dir) {
                if is_stale(&path) {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
}

/// The device-model stats sockets (`dm-<pid>.sock`) in `dir`.
fn dm_sockets(dir: &Path) -> impl Iterator<Item = PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("dm-") && name.ends_with(".sock")
        })
        .map(|e| e.path())
}

/// Whether nobody listens on the socket at `path` any more (its process is gone).
fn is_stale(path: &Path) -> bool {
    matches!(UnixStream::connect(path), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// Reads one report from the socket at `path`.
pub fn read(path: &Path) -> anyhow::Result<Report> {
    read_json(path, Duration::from_secs(5))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, timeout: Duration) -> anyhow::Result<T> {
    let mut s =
        UnixStream::connect(path).with_context(|| format!("connecting to {}", path.display()))?;
    s.set_read_timeout(Some(timeout))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(text.trim()).with_context(|| format!("decoding {}", path.display()))
}

/// The canonical form of an API socket path, as device models and platforms compare it.
pub fn socket_key(path: &Path) -> String {
    std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_owned())
        .display()
        .to_string()
}

/// The per-DM rows of a platform: one per device pair of `hyp`, with the dispatcher's
/// counters of the DM of the same id when the dispatcher is ours.
pub fn platform_dms(
    hyp: &remio_hyp::Hypervisor,
    dispatcher: Option<&remio_dispatcher::Dispatcher>,
) -> Vec<DmSnapshot> {
    let dms: BTreeMap<u32, _> = dispatcher
        .map(remio_dispatcher::Dispatcher::dms)
        .unwrap_or_default()
        .into_iter()
        .map(|dm| (dm.id(), dm))
        .collect();
    let mut rows: Vec<DmSnapshot> = hyp
        .device_stats()
        .into_iter()
        .map(|p| {
            let mut row = DmSnapshot {
                id: p.dm_id,
                bind_key: p.bind_key,
                trapped: p.requests,
                completions: p.completions,
                timeouts: p.timeouts,
                waiting: p.waiting,
                pending: p.pending,
                latency_count: p.latency.count,
                latency_p50_ns: p.latency.percentile(50.0),
                latency_p99_ns: p.latency.percentile(99.0),
                latency_max_ns: p.latency.max,
                interrupts: p.notifies,
                session_state: "c-driver".to_owned(),
                ..DmSnapshot::default()
            };
            if let Some(dm) = dms.get(&p.dm_id) {
                let st = dm.stats();
                row.requests = st.dispatched;
                row.to_control = st.to_control;
                row.to_status_word = st.to_status_word;
                row.to_ioeventfd = st.to_ioeventfd;
                row.to_io_client = st.to_io_client;
                row.completed_by_dispatcher = st.completed_by_dispatcher;
                row.hypercall_errors = st.hypercall_errors;
                row.session = dm.has_control_client();
                row.sessions = dm.control_sessions();
                row.restarts = row.sessions.saturating_sub(1);
                row.session_state = if dm.is_destroyed() {
                    "destroyed"
                } else if dm.is_paused() {
                    "paused"
                } else if row.session {
                    "serving"
                } else {
                    "no session"
                }
                .to_owned();
            }
            row
        })
        .collect();
    rows.sort_by_key(|r| r.id);
    rows
}

/// Fills each row's [`DmSnapshot::device`] from the device models in `dir` that serve the
/// platform API socket `api_socket` (see the module docs). A device model that does not answer
/// within 200 ms is left out.
pub fn attach_devices(rows: &mut [DmSnapshot], dir: &Path, api_socket: &Path) {
    let key = socket_key(api_socket);
    for path in dm_sockets(dir) {
        let Ok(dm) = read_json::<DmProcessSnapshot>(&path, Duration::from_millis(200)) else {
            continue;
        };
        if dm.api_socket != key {
            continue;
        }
        for dev in dm.devices {
            if let Some(row) = rows.iter_mut().find(|r| r.id == dev.dm_id) {
                row.device = Some(dev);
            }
        }
    }
}

/// A device's counters in the form of the stats socket.
pub fn device_snapshot(
    dm_id: u32,
    description: &str,
    s: &remio_virtio::DeviceStatsSnapshot,
) -> DeviceSnapshot {
    let mut requests = BTreeMap::new();
    let mut bytes = BTreeMap::new();
    for kind in remio_virtio::RequestKind::ALL {
        let name = kind.name().to_owned();
        if s.requests_of(kind) != 0 {
            requests.insert(name.clone(), s.requests_of(kind));
        }
        if s.bytes_of(kind) != 0 {
            bytes.insert(name, s.bytes_of(kind));
        }
    }
    let drops = remio_virtio::stats::DropCause::ALL
        .into_iter()
        .filter(|&c| s.drops_of(c) != 0)
        .map(|c| (c.name().to_owned(), s.drops_of(c)))
        .collect();
    DeviceSnapshot {
        dm_id,
        description: description.to_owned(),
        requests,
        bytes,
        drops,
        errors: s.errors,
        needs_reset: s.needs_reset,
    }
}

/// A running `remio run` or `remio platform`, as found in the run directory.
#[derive(Clone, Debug)]
pub struct Found {
    /// Its stats socket.
    pub path: PathBuf,
    /// What it served when asked (`None`: it accepted the connection but did not answer).
    pub report: Option<Report>,
}

impl Found {
    /// One line naming it: pid, kind, API socket, stats socket.
    pub fn describe(&self) -> String {
        match &self.report {
            Some(r) => {
                let api = if r.api_socket.is_empty() {
                    String::new()
                } else {
                    format!(", API socket {}", r.api_socket)
                };
                format!(
                    "pid {} (remio {}, up {} s{api}): {}",
                    r.snapshot.pid,
                    r.kind,
                    r.snapshot.uptime_s,
                    self.path.display()
                )
            }
            None => format!("{} (not answering)", self.path.display()),
        }
    }
}

/// The stats sockets in `dir` that someone listens on, newest first (by the socket file's
/// modification time, i.e. when its process started serving), each with what it serves.
pub fn live(dir: &Path) -> Vec<Found> {
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
    // Newest first; the same instant falls back to the name, for a stable order.
    socks.sort_by(|a, b| b.cmp(a));
    socks
        .into_iter()
        .map(|(_, p)| p)
        .filter(|p| !is_stale(p))
        .map(|path| Found {
            report: read_json(&path, Duration::from_secs(1)).ok(),
            path,
        })
        .collect()
}

/// Which stats socket `remio stats` without `--socket` reads: the only live one in `dir`, or
/// with several the newest, with a note for stderr naming it and the others. An error naming
/// `dir` when none runs.
pub fn find(dir: &Path) -> anyhow::Result<(PathBuf, Option<String>)> {
    let found = live(dir);
    let Some(first) = found.first() else {
        bail!(
            "no running remio found: no live stats-<pid>.sock in {} (is `remio run` or `remio \
             platform` running as this user? else give --socket PATH)",
            dir.display()
        );
    };
    let note = (found.len() > 1).then(|| {
        use std::fmt::Write as _;
        let mut note = format!(
            "{} remio processes serve counters in {}; showing the newest, {}\nthe others \
             (choose one with --socket PATH):",
            found.len(),
            dir.display(),
            first.describe()
        );
        for f in &found[1..] {
            let _ = write!(note, "\n  {}", f.describe());
        }
        note
    });
    Ok((first.path.clone(), note))
}

/// The counters of a [`crate::platform::Platform`] (`remio platform`): the hypervisor model's,
/// the dispatcher's per DM, and the devices of the device models in `dir` that serve its API
/// socket.
pub fn platform_snapshot(
    platform: &crate::platform::Platform,
    dir: PathBuf,
) -> impl Fn() -> Snapshot + Send + 'static {
    let hyp = Arc::clone(platform.hypervisor());
    let dispatcher = Arc::clone(platform.dispatcher());
    let api_socket = platform.socket_path().map(Path::to_path_buf);
    let started = std::time::Instant::now();
    move || {
        let hs = hyp.stats();
        let mut dms = platform_dms(&hyp, Some(&dispatcher));
        if let Some(api) = &api_socket {
            attach_devices(&mut dms, &dir, api);
        }
        Snapshot {
            pid: std::process::id(),
            uptime_s: started.elapsed().as_secs(),
            dm_restarts: 0,
            requests: hs.requests,
            completions: hs.completions,
            timeouts: hs.timeouts,
            interrupts: hs.notifies,
            bridge_accesses: 0,
            bridge_mean_ns: 0,
            dms,
        }
    }
}

/// Serves `platform`'s counters ([`platform_snapshot`]) on `stats-<pid>.sock` in `dir`, for
/// `remio stats`, until the returned server is dropped.
pub fn serve_platform(
    platform: &crate::platform::Platform,
    dir: &Path,
) -> anyhow::Result<StatsServer> {
    StatsServer::start_platform(
        dir,
        platform.socket_path(),
        platform_snapshot(platform, dir.to_owned()),
    )
}

/// The table `remio stats` prints.
pub fn table(r: &Report) -> String {
    use std::fmt::Write as _;
    let s = &r.snapshot;
    let us = |ns: u64| ns as f64 / 1000.0;
    let kind = if r.kind.is_empty() { "run" } else { &r.kind };
    let mut out = format!(
        "remio {kind} pid {}  up {} s  device-model restarts {}\n\
         hypervisor: {} requests, {} completions, {} timeouts, {} interrupts; ",
        s.pid, s.uptime_s, s.dm_restarts, s.requests, s.completions, s.timeouts, s.interrupts,
    );
    if kind == "platform" {
        let _ = write!(out, "device-model API socket {}\n\n", r.api_socket);
    } else {
        let _ = write!(
            out,
            "bridge: {} accesses, mean {:.1} us\n\n",
            s.bridge_accesses,
            us(s.bridge_mean_ns)
        );
    }
    let _ = writeln!(
        out,
        "{:>3} {:>9} {:>9} {:>9} {:>9} {:>9} {:>5} {:>8} {:>8} {:>9} {:>8} {:>4} {:>8}",
        "dm",
        "trapped",
        "control",
        "status",
        "ioeventfd",
        "irqs",
        "wait",
        "timeouts",
        "p50 us",
        "p99 us",
        "max us",
        "rst",
        "session"
    );
    for d in &s.dms {
        let _ = writeln!(
            out,
            "{:>3} {:>9} {:>9} {:>9} {:>9} {:>9} {:>5} {:>8} {:>8.1} {:>9.1} {:>8.0} {:>4} {:>8}",
            d.id,
            d.trapped,
            d.to_control,
            d.to_status_word,
            d.to_ioeventfd,
            d.interrupts,
            d.waiting,
            d.timeouts,
            us(d.latency_p50_ns),
            us(d.latency_p99_ns),
            us(d.latency_max_ns),
            d.restarts,
            if d.session { "yes" } else { "no" }
        );
    }
    let devices: Vec<&DeviceSnapshot> = s.dms.iter().filter_map(|d| d.device.as_ref()).collect();
    if !devices.is_empty() {
        let _ = writeln!(
            out,
            "\n{:>3} {:<28} {:>9} {:>11} {:>9} {:>11} {:>7} {:>6} {:>5} {:>6}",
            "dm",
            "device",
            "reads",
            "read MiB",
            "writes",
            "write MiB",
            "other",
            "errors",
            "reset",
            "drops"
        );
        for d in devices {
            let get = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
            let other: u64 = d
                .requests
                .iter()
                .filter(|(k, _)| k.as_str() != "read" && k.as_str() != "write")
                .map(|(_, v)| v)
                .sum();
            let mut desc = d.description.clone();
            desc.truncate(28);
            let _ = writeln!(
                out,
                "{:>3} {:<28} {:>9} {:>11.2} {:>9} {:>11.2} {:>7} {:>6} {:>5} {:>6}",
                d.dm_id,
                desc,
                get(&d.requests, "read"),
                get(&d.bytes, "read") as f64 / 1048576.0,
                get(&d.requests, "write"),
                get(&d.bytes, "write") as f64 / 1048576.0,
                other,
                d.errors,
                d.needs_reset,
                d.drops.values().sum::<u64>()
            );
            if !d.drops.is_empty() {
                let causes: Vec<String> = d.drops.iter().map(|(k, v)| format!("{k} {v}")).collect();
                let _ = writeln!(out, "{:>3} {:<28} dropped: {}", "", "", causes.join(", "));
            }
        }
        let _ = writeln!(
            out,
            "(console, net: reads = buffers or frames the guest received, writes = what it sent)"
        );
    }
    out
}

/// Serves the counters of `handle`'s devices on this device model's stats socket (see the
/// module docs) until the returned server is dropped; `api_socket` is the platform API socket
/// served ([`socket_key`]), `None` on the C driver. A socket that cannot be made is a warning.
pub fn serve_device_model(
    handle: &remio_virtio::DeviceModelHandle,
    api_socket: Option<String>,
) -> Option<StatsServer> {
    let devices: Vec<(u32, String, Arc<remio_virtio::DeviceStats>)> = handle
        .runners()
        .iter()
        .filter_map(|r| {
            let t = r.transport()?;
            let stats = t
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .shared_status()
                .stats
                .clone();
            let description = handle
                .devices()
                .iter()
                .find(|d| d.dm_id == r.dm_id())
                .map(|d| d.description.clone())
                .unwrap_or_default();
            Some((r.dm_id(), description, stats))
        })
        .collect();
    let api_socket = api_socket.unwrap_or_default();
    let snapshot = move || DmProcessSnapshot {
        pid: std::process::id(),
        api_socket: api_socket.clone(),
        devices: devices
            .iter()
            .map(|(id, desc, st)| device_snapshot(*id, desc, &st.snapshot()))
            .collect(),
    };
    match StatsServer::start_dm(&run_dir(), snapshot) {
        Ok(s) => Some(s),
        Err(e) => {
            log::warn!("no device-model stats socket (remio stats will not show devices): {e:#}");
            None
        }
    }
}

/// Runs `remio stats`.
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.list {
        let dir = run_dir();
        let found = live(&dir);
        if found.is_empty() {
            println!("no running remio serves counters in {}", dir.display());
        }
        for f in found {
            println!("{}", f.describe());
        }
        return Ok(());
    }
    let path = match args.socket {
        Some(p) => p,
        None => {
            let (path, note) = find(&run_dir())?;
            if let Some(note) = note {
                eprintln!("remio stats: {note}");
            }
            path
        }
    };
    if args.json {
        let s = read(&path)?;
        println!("{}", serde_json::to_string(&s)?);
        return Ok(());
    }
    loop {
        let s = read(&path).with_context(|| "the remio process may have ended".to_owned())?;
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
        assert_eq!(find(&dir).unwrap(), (server.path().to_owned(), None));
        let r = read(server.path()).unwrap();
        let s = &r.snapshot;
        assert_eq!((s.pid, s.requests, s.dms[0].to_control), (42, 7, 5));
        assert_eq!(r.kind, "run");
        let t = table(&r);
        assert!(t.contains("remio run pid 42"), "{t}");
        assert!(t.lines().last().unwrap().ends_with("yes"), "{t}");
        let path = server.path().to_owned();
        drop(server);
        assert!(!path.exists(), "the socket is removed when the run ends");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn device_counters_come_from_the_device_models_of_this_platforms_api_socket_only() {
        let dir = tmp_dir();
        let dm = |api: &str, dm_id: u32, reads: u64| {
            let api = api.to_owned();
            move || DmProcessSnapshot {
                pid: 1,
                api_socket: api.clone(),
                devices: vec![DeviceSnapshot {
                    dm_id,
                    description: "virtio-blk".into(),
                    requests: [("read".to_owned(), reads)].into(),
                    ..DeviceSnapshot::default()
                }],
            }
        };
        // Two device models in the run directory: ours serves DM 1, another platform's DM 0.
        let ours = StatsServer::serve(&dir, "dm-1.sock", {
            let f = dm("/tmp/ours.sock", 1, 7);
            move || serde_json::to_string(&f()).ok()
        })
        .unwrap();
        let theirs = StatsServer::serve(&dir, "dm-2.sock", {
            let f = dm("/tmp/theirs.sock", 0, 9);
            move || serde_json::to_string(&f()).ok()
        })
        .unwrap();
        let mut rows = vec![
            DmSnapshot {
                id: 0,
                ..DmSnapshot::default()
            },
            DmSnapshot {
                id: 1,
                ..DmSnapshot::default()
            },
        ];

        attach_devices(&mut rows, &dir, Path::new("/tmp/ours.sock"));

        assert_eq!(rows[0].device, None);
        let dev = rows[1].device.as_ref().unwrap();
        assert_eq!(dev.requests["read"], 7);
        let t = table(&Report {
            snapshot: Snapshot {
                dms: rows,
                ..Snapshot::default()
            },
            ..Report::default()
        });
        assert!(t.contains("virtio-blk"), "{t}");
        drop((ours, theirs));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_devices_drops_are_in_the_json_and_the_table_by_cause() {
        let stats = remio_virtio::DeviceStats::default();
        stats.record(remio_virtio::RequestKind::Write, 98, true);
        stats.record_drop(remio_virtio::stats::DropCause::RxForeign);
        stats.record_drop(remio_virtio::stats::DropCause::RxForeign);
        stats.record_drop(remio_virtio::stats::DropCause::TxBackend);

        let dev = device_snapshot(3, "virtio-net (socket)", &stats.snapshot());

        let json = serde_json::to_value(&dev).unwrap();
        assert_eq!(json["drops"]["rx_foreign"], 2);
        assert_eq!(json["drops"]["tx_backend"], 1);
        assert_eq!(json["drops"].as_object().unwrap().len(), 2, "{json}");
        assert_eq!(json["bytes"]["write"], 98);
        let t = table(&Report {
            snapshot: Snapshot {
                dms: vec![DmSnapshot {
                    id: 3,
                    device: Some(dev),
                    ..DmSnapshot::default()
                }],
                ..Snapshot::default()
            },
            ..Report::default()
        });
        assert!(t.contains("dropped: rx_foreign 2, tx_backend 1"), "{t}");
    }

    #[test]
    fn the_platform_server_removes_device_model_sockets_nobody_serves() {
        let dir = tmp_dir();
        std::fs::create_dir_all(&dir).unwrap();
        // A device model that was killed left its socket.
        drop(UnixListener::bind(dir.join("dm-77.sock")).unwrap());
        let server = StatsServer::start(&dir, Snapshot::default).unwrap();

        drop(server);

        assert!(!dir.join("dm-77.sock").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Sets the modification time of the file at `path` (a socket cannot be opened).
    fn set_mtime(path: &Path, secs: i64) {
        use std::os::unix::ffi::OsStrExt as _;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        let t = libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        };
        let times = [t, t];
        // SAFETY: `c` is a NUL-terminated path and `times` two valid timespecs, both live for
        // the call.
        let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }

    #[test]
    fn with_several_running_the_newest_is_read_and_the_note_names_the_others() {
        let dir = tmp_dir();
        let older = StatsServer::serve(&dir, "stats-101.sock", || {
            serde_json::to_string(&Report {
                kind: "run".into(),
                snapshot: Snapshot {
                    pid: 101,
                    ..Snapshot::default()
                },
                ..Report::default()
            })
            .ok()
        })
        .unwrap();
        let newer =
            StatsServer::start_platform(&dir, Some(Path::new("/tmp/api-x.sock")), || Snapshot {
                pid: 102,
                ..Snapshot::default()
            })
            .unwrap();
        // A stale socket of a process that died is neither read nor listed.
        drop(UnixListener::bind(dir.join("stats-103.sock")).unwrap());
        set_mtime(older.path(), 1_000_000);
        set_mtime(newer.path(), 2_000_000);
        set_mtime(&dir.join("stats-103.sock"), 3_000_000);

        let (path, note) = find(&dir).unwrap();

        assert_eq!(path, newer.path());
        let note = note.expect("a note when several run");
        assert!(note.starts_with("2 remio processes"), "{note}");
        assert!(
            note.contains("showing the newest, pid 102 (remio platform"),
            "{note}"
        );
        assert!(note.contains("API socket /tmp/api-x.sock"), "{note}");
        assert!(note.contains("pid 101 (remio run"), "{note}");
        assert!(note.contains("--socket"), "{note}");
        assert!(!note.contains("stats-103"), "{note}");
        let r = read(&path).unwrap();
        assert_eq!((r.kind.as_str(), r.snapshot.pid), ("platform", 102));
        let t = table(&r);
        assert!(t.starts_with("remio platform pid 102"), "{t}");
        assert!(t.contains("device-model API socket /tmp/api-x.sock"), "{t}");
        drop((older, newer));
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
