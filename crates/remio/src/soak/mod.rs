//! `remio soak`: load with churn across process boundaries, accounted exactly once, with the
//! platform's and the device models' fds and resident memory compared before and after.
//!
//! One platform (this process: hypervisor model, dispatcher, API socket) with 16 DMs, served by
//! device-model processes (`remio soak --serve-dm`, see [`dm`]) over the socket API; frontend
//! vCPU threads issue a mix of accesses as fast as the machine allows ([`load`]) while a churn
//! thread, at a controlled rate, SIGKILLs and restarts a device-model process, pauses and
//! resumes a DM, or has a device model re-create its session (its control client). Device-model
//! process 0 is never killed (its DMs are still paused and their sessions re-created), so that
//! one device-model process lives through the run and its resident memory is compared: a
//! killed and restarted process is another process, whose RSS says nothing about growth. What
//! is checked, and how, is in docs/reliability.md.
//!
//! Phases: start (device models ready); warm-up (`--warmup-secs` of the same load and churn,
//! starting with one churn event of each kind, so that the process has grown into its steady
//! state); quiesce and sample (fds, RSS, counters); the measured run; quiesce and sample again.
//! Every count reported is of the measured run.

mod dm;
mod load;
mod regs;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use remio::platform::{DeviceConfig, Platform, PlatformConfig};
use remio_dispatcher::DmStats;
use remio_hyp::Stats;
use serde_json::json;

use dm::DmProcess;
use load::{Counts, Rng, Shared, Until};
use regs::Expect;

/// DMs under load.
const DMS: u32 = 16;
/// Allowed growth of resident memory over the measured run, per process (the platform, and
/// each device-model process that lived through the run).
const RSS_BOUND: u64 = 1 << 20;
/// The device-model process kept out of the kill churn (it still sees pauses of its DMs and
/// re-creations of their sessions), so that one device-model process lives through the whole
/// run and its growth is measured: a killed and restarted one is another process.
const KEPT: usize = 0;
/// A run that completes no access for this long is hung: the watchdog aborts it.
const STALL_LIMIT: Duration = Duration::from_secs(60);
/// How long fds may take to settle after churn stops (a connection thread finishing the
/// teardown of a session whose successor is already open).
const SETTLE: Duration = Duration::from_secs(5);

/// Arguments of `remio soak`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Issue at least this many requests in the measured run (default: 10 000 000).
    #[arg(long, conflicts_with = "secs")]
    requests: Option<u64>,
    /// Run for this many seconds instead of a number of requests.
    #[arg(long)]
    secs: Option<u64>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Frontend vCPU threads (at most 16).
    #[arg(long, default_value_t = 8)]
    vcpus: usize,
    /// Device-model processes serving the 16 DMs (1, 2, 4, 8 or 16).
    #[arg(long, default_value_t = 4)]
    dm_processes: u32,
    /// Mean interval between churn events in ms (kill + restart, pause/resume, session
    /// re-creation, chosen at random); 0 for none.
    #[arg(long, default_value_t = 100)]
    churn_ms: u64,
    /// The kinds of churn event to choose from (comma separated): kill (SIGKILL a device-model
    /// process other than process 0 and restart it), pause (pause a DM for 1-5 ms), recreate (a device model ends a
    /// session and opens a new one).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "kill,pause,recreate"
    )]
    churn: Vec<ChurnKind>,
    /// Seconds of load and churn before the start sample (not counted).
    #[arg(long, default_value_t = 10)]
    warmup_secs: u64,
    /// Frontend access timeout in ms.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Internal: serve DMs over the socket at this path (a device-model process of the soak).
    #[arg(long, hide = true, value_name = "SOCKET")]
    serve_dm: Option<PathBuf>,
    /// Internal: first DM served.
    #[arg(long, hide = true, default_value_t = 0)]
    first: u32,
    /// Internal: DMs served.
    #[arg(long, hide = true, default_value_t = 0)]
    count: u32,
    /// Self-test of the leak check: every device-model process leaks this many KiB (allocated,
    /// written, never freed) each time it opens a session, so the soak must fail on its RSS.
    #[arg(long, hide = true, default_value_t = 0)]
    dm_leak_kib: u64,
}

/// A kind of churn event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ChurnKind {
    /// SIGKILL a device-model process (never process 0) and start a new one.
    Kill,
    /// Pause a DM for 1-5 ms.
    Pause,
    /// Have a device model end one session and open a new one.
    Recreate,
}

/// Quiet unless asked: session ends are logged at info, and churn ends thousands of them.
fn quiet_logs() {
    if std::env::var_os("RUST_LOG").is_none() {
        log::set_max_level(log::LevelFilter::Warn);
    }
}

/// Runs `remio soak`.
pub fn run(args: Args) -> anyhow::Result<()> {
    quiet_logs();
    if let Some(socket) = &args.serve_dm {
        return dm::serve_dm_child(socket, args.first, args.count, leak_bytes(&args)?);
    }
    anyhow::ensure!(
        (1..=regs::MAX_VCPUS).contains(&args.vcpus),
        "--vcpus must be 1..={}",
        regs::MAX_VCPUS
    );
    anyhow::ensure!(
        args.dm_processes > 0 && DMS.is_multiple_of(args.dm_processes),
        "--dm-processes must divide {DMS}"
    );
    anyhow::ensure!(
        args.dm_processes > 1 || args.churn_ms == 0 || !args.churn.contains(&ChurnKind::Kill),
        "--churn kill needs --dm-processes of at least 2: device-model process {KEPT} is never \
         killed, so that its resident memory is measured over the whole run"
    );
    leak_bytes(&args)?;
    let stop = match (args.requests, args.secs) {
        (_, Some(s)) => Stop::After(Duration::from_secs(s)),
        (n, None) => Stop::Requests(n.unwrap_or(10_000_000)),
    };
    let report = soak(&args, stop)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        report.print();
    }
    let failures = report.failures();
    anyhow::ensure!(
        failures.is_empty(),
        "the soak failed: {}",
        failures.join("; ")
    );
    Ok(())
}

/// `--dm-leak-kib` in bytes.
fn leak_bytes(args: &Args) -> anyhow::Result<usize> {
    args.dm_leak_kib
        .checked_mul(1024)
        .and_then(|b| usize::try_from(b).ok())
        .filter(|&b| b <= 1 << 30)
        .context("--dm-leak-kib must be at most 1 GiB")
}

/// When the measured run stops.
#[derive(Clone, Copy, Debug)]
enum Stop {
    /// After this many requests (at least).
    Requests(u64),
    /// After this long.
    After(Duration),
}

impl Stop {
    fn until(self) -> Until {
        match self {
            Self::Requests(n) => Until {
                budget: Some(n),
                deadline: None,
            },
            Self::After(d) => Until {
                budget: None,
                deadline: Some(Instant::now() + d),
            },
        }
    }
}

/// Churn events of the measured run.
#[derive(Clone, Copy, Debug, Default)]
struct Churn {
    kills: u64,
    pauses: u64,
    recreates: u64,
}

/// Open fds and resident memory of one process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Usage {
    pid: u32,
    fds: usize,
    rss: u64,
}

impl Usage {
    fn of(pid: u32, proc_dir: &str) -> anyhow::Result<Self> {
        let fds = std::fs::read_dir(format!("{proc_dir}/fd"))
            .with_context(|| format!("listing {proc_dir}/fd"))?
            .count();
        let statm = std::fs::read_to_string(format!("{proc_dir}/statm"))?;
        let pages: u64 = statm.split_whitespace().nth(1).context("statm")?.parse()?;
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Ok(Self {
            pid,
            fds,
            rss: pages * u64::try_from(page).unwrap_or(4096),
        })
    }

    fn this() -> anyhow::Result<Self> {
        Self::of(std::process::id(), "/proc/self")
    }

    fn child(pid: u32) -> anyhow::Result<Self> {
        Self::of(pid, &format!("/proc/{pid}"))
    }
}

/// Everything sampled at a quiet point (no access in flight, no churn).
#[derive(Clone, Debug)]
struct Sample {
    platform: Usage,
    dms: Vec<Usage>,
    hyp: Stats,
    routes: DmStats,
}

/// What the dispatcher has of each DM's session: control client, status word, ioeventfds,
/// irqfds. Equal to the start's once every churned session is back.
fn setup_of(platform: &Platform) -> Vec<(bool, bool, usize, usize)> {
    platform
        .dispatcher()
        .dms()
        .iter()
        .map(|d| {
            (
                d.has_control_client(),
                d.has_status_word(),
                d.ioeventfd_count(),
                d.irqfd_count(),
            )
        })
        .collect()
}

fn sum_routes(platform: &Platform) -> DmStats {
    let mut t = DmStats::default();
    for d in platform.dispatcher().dms() {
        let s = d.stats();
        t.dispatched += s.dispatched;
        t.to_control += s.to_control;
        t.to_io_client += s.to_io_client;
        t.to_ioeventfd += s.to_ioeventfd;
        t.to_status_word += s.to_status_word;
        t.held += s.held;
        t.overflow += s.overflow;
        t.completed_by_dispatcher += s.completed_by_dispatcher;
        t.irqfd_notifies += s.irqfd_notifies;
        t.hypercall_errors += s.hypercall_errors;
    }
    t
}

fn sample(platform: &Platform, procs: &[DmProcess]) -> anyhow::Result<Sample> {
    Ok(Sample {
        platform: Usage::this()?,
        dms: procs
            .iter()
            .map(|p| Usage::child(p.pid()))
            .collect::<anyhow::Result<_>>()?,
        hyp: platform.hypervisor().stats(),
        routes: sum_routes(platform),
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sleeps up to `d`, returning early (`false`) once `stop` is set.
fn nap(d: Duration, stop: &AtomicBool) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(
            end.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(10)),
        );
    }
    !stop.load(Ordering::Relaxed)
}

/// The churn thread's work.
struct Churner<'a> {
    platform: &'a Platform,
    procs: &'a Mutex<Vec<DmProcess>>,
    shared: &'a Shared,
    rng: Rng,
    /// The kinds of event to choose from (see [`Churner::event`]).
    kinds: Vec<u64>,
    /// DMs `0..kept_dms` are served by device-model process [`KEPT`], which is never killed.
    kept_dms: u32,
    counts: Churn,
}

/// A DM whose device-model process a kill event kills: any but the `kept_dms` DMs of process
/// [`KEPT`] (the first ones).
fn kill_target(rng: &mut Rng, kept_dms: u32) -> anyhow::Result<u32> {
    let others = DMS
        .checked_sub(kept_dms)
        .filter(|&n| n > 0)
        .context("every DM is served by the device-model process kept out of the kills")?;
    Ok(kept_dms + u32::try_from(rng.below(u64::from(others)))?)
}

impl Churner<'_> {
    fn bump_epochs(&self, dms: impl Iterator<Item = u32>) {
        for d in dms {
            self.shared.epochs[d as usize].fetch_add(1, Ordering::AcqRel);
        }
    }

    /// One event of `kind`: 0 kill + restart, 1 pause/resume, 2 session re-creation.
    fn event(&mut self, kind: u64) -> anyhow::Result<()> {
        let dm = u32::try_from(self.rng.below(u64::from(DMS)))?;
        match kind {
            0 => {
                let dm = kill_target(&mut self.rng, self.kept_dms)?;
                let mut procs = lock(self.procs);
                let p = procs
                    .iter_mut()
                    .find(|p| p.serves(dm))
                    .context("no process serves the DM")?;
                let dms = p.first..p.first + p.count;
                self.bump_epochs(dms.clone());
                let r = p.kill_and_restart();
                self.bump_epochs(dms);
                r.context("restarting a killed device-model process")?;
                self.counts.kills += 1;
            }
            1 => {
                let d = self
                    .platform
                    .dispatcher()
                    .dm(dm)
                    .map_err(|e| anyhow::anyhow!("DM {dm}: {e}"))?;
                d.pause()
                    .map_err(|e| anyhow::anyhow!("pausing DM {dm}: {e}"))?;
                std::thread::sleep(Duration::from_millis(1 + self.rng.below(5)));
                d.resume()
                    .map_err(|e| anyhow::anyhow!("resuming DM {dm}: {e}"))?;
                self.counts.pauses += 1;
            }
            _ => {
                let mut procs = lock(self.procs);
                let p = procs
                    .iter_mut()
                    .find(|p| p.serves(dm))
                    .context("no process serves the DM")?;
                self.bump_epochs(std::iter::once(dm));
                let r = p.recreate(dm);
                self.bump_epochs(std::iter::once(dm));
                r.with_context(|| format!("re-creating the session of DM {dm}"))?;
                self.counts.recreates += 1;
            }
        }
        Ok(())
    }

    /// Random events every `interval` on average (uniform in 0.5..1.5 of it) until `stop`.
    fn run(&mut self, interval: Duration, stop: &AtomicBool) -> anyhow::Result<()> {
        loop {
            let jitter = interval.mul_f64(0.5 + (self.rng.below(1000) as f64) / 1000.0);
            if !nap(jitter, stop) {
                return Ok(());
            }
            let Some(&kind) = self
                .kinds
                .get(usize::try_from(self.rng.below(self.kinds.len() as u64)).unwrap_or(0))
            else {
                return Ok(());
            };
            self.event(kind)?;
        }
    }
}

/// Runs the frontend threads until `until` (or `shared.stop`); returns their summed counts.
fn load_phase(
    shared: &Arc<Shared>,
    until: Until,
    phase: u64,
    scratch: &mut [Vec<Expect>],
) -> Counts {
    let mut total = Counts::default();
    std::thread::scope(|s| {
        let threads: Vec<_> = scratch
            .iter_mut()
            .enumerate()
            .map(|(id, known)| {
                let shared = shared.clone();
                let start = std::mem::take(known);
                std::thread::Builder::new()
                    .name(format!("soak-vcpu{id}"))
                    .spawn_scoped(s, move || {
                        let (c, end) = load::vcpu(id, &shared, until, phase, start);
                        *known = end;
                        c
                    })
            })
            .collect();
        for t in threads {
            match t.map(|t| t.join()) {
                Ok(Ok(c)) => total += c,
                _ => shared.stop.store(true, Ordering::Relaxed),
            }
        }
    });
    total
}

/// Load and churn together until the frontend threads stop; then churn stops.
fn phase_with_churn(
    shared: &Arc<Shared>,
    churner: &mut Churner<'_>,
    interval: Option<Duration>,
    until: Until,
    phase: u64,
    scratch: &mut [Vec<Expect>],
) -> anyhow::Result<Counts> {
    let churn_stop = AtomicBool::new(false);
    let (counts, churned) = std::thread::scope(|s| {
        let churn = s.spawn(|| match interval {
            Some(i) => churner.run(i, &churn_stop),
            None => Ok(()),
        });
        let counts = load_phase(shared, until, phase, scratch);
        churn_stop.store(true, Ordering::Relaxed);
        let churned = churn
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the churn thread panicked")));
        if churned.is_err() {
            shared.stop.store(true, Ordering::Relaxed);
        }
        (counts, churned)
    });
    churned?;
    Ok(counts)
}

/// Waits until every DM has its session back and the platform's fds are back to `want`
/// (or [`SETTLE`] passed), then samples.
fn settle_and_sample(
    platform: &Platform,
    procs: &Mutex<Vec<DmProcess>>,
    setup: &[(bool, bool, usize, usize)],
    want_fds: Option<usize>,
) -> anyhow::Result<Sample> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let s = sample(platform, &lock(procs))?;
        let ready = setup_of(platform) == setup;
        let fds_back = want_fds.is_none_or(|w| s.platform.fds == w);
        if (ready && fds_back) || Instant::now() >= deadline {
            return Ok(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Aborts the process when no access completes for [`STALL_LIMIT`] while `active`: a hang
/// anywhere fails the soak instead of blocking CI.
fn watchdog(shared: Arc<Shared>, active: Arc<AtomicBool>, finished: Arc<AtomicBool>) {
    let mut last = (shared.done.load(Ordering::Relaxed), Instant::now());
    while !finished.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_secs(1));
        let done = shared.done.load(Ordering::Relaxed);
        if done != last.0 || !active.load(Ordering::Relaxed) {
            last = (done, Instant::now());
        } else if last.1.elapsed() > STALL_LIMIT {
            eprintln!(
                "remio soak: watchdog: no access completed for {STALL_LIMIT:?} after {done}; \
                 something hangs"
            );
            std::process::abort();
        }
    }
}

fn soak(args: &Args, stop: Stop) -> anyhow::Result<Report> {
    let dir = std::env::temp_dir().join(format!("remio-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _cleanup = RemoveDir(dir.clone());
    let socket = dir.join("api.sock");
    let platform = start_platform(&socket, args.vcpus, args.timeout_ms)?;
    let fe = platform.frontend().context("no frontend VM")?;
    let shared = Arc::new(Shared::new(fe.clone(), DMS));
    for dm in 0..DMS {
        let sh = shared.clone();
        fe.set_interrupt_sink(
            dm as usize,
            Arc::new(move || {
                sh.interrupts.fetch_add(1, Ordering::Relaxed);
                sh.irq_pending[dm as usize].store(true, Ordering::Release);
            }),
        )
        .map_err(|e| anyhow::anyhow!("interrupt sink of DM {dm}: {e}"))?;
    }
    dm::create_state_files(&socket, DMS)?;
    let per = DMS / args.dm_processes;
    let leak = leak_bytes(args)?;
    let procs = Mutex::new(
        (0..args.dm_processes)
            .map(|p| DmProcess::spawn(&socket, p * per, per, leak))
            .collect::<anyhow::Result<Vec<_>>>()?,
    );
    let setup = setup_of(&platform);
    let (active, finished) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    {
        let (sh, a, f) = (shared.clone(), active.clone(), finished.clone());
        std::thread::Builder::new()
            .name("soak-watchdog".into())
            .spawn(move || watchdog(sh, a, f))?;
    }
    let mut churner = Churner {
        platform: &platform,
        procs: &procs,
        shared: &shared,
        rng: Rng::new(0x50a6),
        kinds: args
            .churn
            .iter()
            .map(|k| match k {
                ChurnKind::Kill => 0,
                ChurnKind::Pause => 1,
                ChurnKind::Recreate => 2,
            })
            .collect(),
        kept_dms: per,
        counts: Churn::default(),
    };
    let mut scratch = vec![vec![Expect::known(0); DMS as usize]; args.vcpus];
    let interval = (args.churn_ms > 0).then(|| Duration::from_millis(args.churn_ms));

    // Warm-up: the same load and churn, so that what is sampled next is the steady state
    // (allocator arenas, cached thread stacks, every lazily built structure) and not the
    // process still growing into it.
    eprintln!("soak: warm-up ({} s) ...", args.warmup_secs);
    active.store(true, Ordering::Relaxed);
    if interval.is_some() {
        for kind in churner.kinds.clone() {
            churner.event(kind)?;
        }
    }
    let warm = Stop::After(Duration::from_secs(args.warmup_secs)).until();
    let warmup = phase_with_churn(&shared, &mut churner, interval, warm, 0, &mut scratch)?;
    active.store(false, Ordering::Relaxed);
    churner.counts = Churn::default();
    let before = settle_and_sample(&platform, &procs, &setup, None)?;
    shared.claimed.store(0, Ordering::Relaxed);
    let interrupts_before = shared.interrupts.load(Ordering::Relaxed);

    eprintln!("soak: measuring ...");
    active.store(true, Ordering::Relaxed);
    let progress_stop = Arc::new(AtomicBool::new(false));
    let progress = {
        let (sh, ps) = (shared.clone(), progress_stop.clone());
        let first = shared.done.load(Ordering::Relaxed);
        std::thread::spawn(move || {
            let t0 = Instant::now();
            while nap(Duration::from_secs(10), &ps) {
                let n = sh.done.load(Ordering::Relaxed) - first;
                let u = Usage::this().ok();
                eprintln!(
                    "soak: {n} requests after {:.0} s ({:.0}/s); platform fds {}, RSS {} KiB",
                    t0.elapsed().as_secs_f64(),
                    n as f64 / t0.elapsed().as_secs_f64(),
                    u.map_or(0, |u| u.fds),
                    u.map_or(0, |u| u.rss >> 10)
                );
            }
        })
    };
    let t0 = Instant::now();
    let counts = phase_with_churn(
        &shared,
        &mut churner,
        interval,
        stop.until(),
        1,
        &mut scratch,
    );
    let elapsed = t0.elapsed();
    progress_stop.store(true, Ordering::Relaxed);
    let _ = progress.join();
    active.store(false, Ordering::Relaxed);
    let counts = counts?;
    let churn = churner.counts;
    let after = settle_and_sample(&platform, &procs, &setup, Some(before.platform.fds))?;
    let settled = setup_of(&platform) == setup;
    finished.store(true, Ordering::Relaxed);
    let interrupts = shared.interrupts.load(Ordering::Relaxed) - interrupts_before;
    drop(procs);
    drop(platform);
    Ok(Report {
        args: Config {
            vcpus: args.vcpus,
            dm_processes: args.dm_processes,
            churn_ms: args.churn_ms,
            timeout_ms: args.timeout_ms,
            warmup_secs: args.warmup_secs,
        },
        elapsed,
        counts,
        warmup,
        churn,
        before,
        after,
        settled,
        interrupts,
    })
}

fn start_platform(socket: &Path, slots: usize, timeout_ms: u64) -> anyhow::Result<Platform> {
    let device = (0..DMS)
        .map(|i| DeviceConfig {
            bind_key: i + 1,
            mmio_base: regs::base_of(i),
            mmio_size: regs::WINDOW,
            frontend_irq: 40 + i,
            backend_irq: 80 + i,
            shmem_base: regs::shmem_of(i),
            shmem_size: regs::SHMEM_SIZE,
        })
        .collect();
    Platform::start(PlatformConfig {
        socket: Some(socket.to_owned()),
        slots,
        timeout_ms,
        device,
        shmem_backing: None,
    })
}

/// Removes a directory when dropped.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The run's settings, as reported.
#[derive(Clone, Copy, Debug)]
struct Config {
    vcpus: usize,
    dm_processes: u32,
    churn_ms: u64,
    timeout_ms: u64,
    warmup_secs: u64,
}

/// What a soak measured.
#[derive(Debug)]
struct Report {
    args: Config,
    elapsed: Duration,
    counts: Counts,
    /// The warm-up's counts (not checked: what it left behind, e.g. a register given up on
    /// after a timed-out write, shows in the measured run's unchecked reads).
    warmup: Counts,
    churn: Churn,
    before: Sample,
    after: Sample,
    /// Every DM had its session back at the end.
    settled: bool,
    interrupts: u64,
}

/// `after - before` of the hypervisor's counters.
fn hyp_delta(a: &Stats, b: &Stats) -> Stats {
    Stats {
        requests: a.requests - b.requests,
        reads: a.reads - b.reads,
        writes: a.writes - b.writes,
        completions: a.completions - b.completions,
        timeouts: a.timeouts - b.timeouts,
        timeouts_pending: a.timeouts_pending - b.timeouts_pending,
        timeouts_abandoned: a.timeouts_abandoned - b.timeouts_abandoned,
        timeouts_no_slot: a.timeouts_no_slot - b.timeouts_no_slot,
        refused_stuck: a.refused_stuck - b.refused_stuck,
        abandoned_completions: a.abandoned_completions - b.abandoned_completions,
        slot_waits: a.slot_waits - b.slot_waits,
        asks: a.asks - b.asks,
        asks_failed: a.asks_failed - b.asks_failed,
        notifies: a.notifies - b.notifies,
        invalid_hypercalls: a.invalid_hypercalls - b.invalid_hypercalls,
        backend_irqs: a.backend_irqs - b.backend_irqs,
        backend_irqs_latched: a.backend_irqs_latched - b.backend_irqs_latched,
    }
}

fn routes_delta(a: &DmStats, b: &DmStats) -> DmStats {
    DmStats {
        dispatched: a.dispatched - b.dispatched,
        to_control: a.to_control - b.to_control,
        to_io_client: a.to_io_client - b.to_io_client,
        to_ioeventfd: a.to_ioeventfd - b.to_ioeventfd,
        to_status_word: a.to_status_word - b.to_status_word,
        held: a.held - b.held,
        overflow: a.overflow - b.overflow,
        completed_by_dispatcher: a.completed_by_dispatcher - b.completed_by_dispatcher,
        irqfd_notifies: a.irqfd_notifies - b.irqfd_notifies,
        hypercall_errors: a.hypercall_errors - b.hypercall_errors,
    }
}

impl Report {
    fn hyp(&self) -> Stats {
        hyp_delta(&self.after.hyp, &self.before.hyp)
    }

    fn routes(&self) -> DmStats {
        routes_delta(&self.after.routes, &self.before.routes)
    }

    fn per_s(&self) -> f64 {
        self.counts.accesses as f64 / self.elapsed.as_secs_f64()
    }

    /// Every invariant that does not hold, in words (empty: the soak passed).
    fn failures(&self) -> Vec<String> {
        let (c, h, r) = (&self.counts, self.hyp(), self.routes());
        let mut f = Vec::new();
        let mut check = |ok: bool, what: String| {
            if !ok {
                f.push(what);
            }
        };
        check(
            c.wrong_values == 0,
            format!("{} reads returned a wrong value", c.wrong_values),
        );
        check(
            c.access_errors == 0,
            format!("{} accesses were refused", c.access_errors),
        );
        check(
            h.invalid_hypercalls == 0,
            format!(
                "{} completions were refused (double or bogus)",
                h.invalid_hypercalls
            ),
        );
        check(
            r.hypercall_errors == 0,
            format!("{} dispatcher hypercalls failed", r.hypercall_errors),
        );
        check(
            h.requests == h.completions + h.timeouts_pending + h.timeouts_abandoned,
            format!(
                "requests {} != completions {} + timeouts {} (pending) + {} (abandoned)",
                h.requests, h.completions, h.timeouts_pending, h.timeouts_abandoned
            ),
        );
        check(
            c.accesses == h.requests + h.timeouts_no_slot,
            format!(
                "the frontend issued {} accesses, the hypervisor queued {} (+{} timed out \
                 waiting for a slot)",
                c.accesses, h.requests, h.timeouts_no_slot
            ),
        );
        check(
            self.settled,
            "not every DM had its session back at the end".into(),
        );
        check(
            self.after.platform.fds == self.before.platform.fds,
            format!(
                "platform fds {} -> {}",
                self.before.platform.fds, self.after.platform.fds
            ),
        );
        check(
            self.after.platform.rss < self.before.platform.rss + RSS_BOUND,
            format!(
                "platform RSS grew by {} KiB",
                (self
                    .after
                    .platform
                    .rss
                    .saturating_sub(self.before.platform.rss))
                    >> 10
            ),
        );
        for (i, (b, a)) in self.before.dms.iter().zip(&self.after.dms).enumerate() {
            check(
                a.fds == b.fds,
                format!("device-model process {i}: fds {} -> {}", b.fds, a.fds),
            );
            // Growth means one process grew: a slot whose process churn killed and restarted
            // holds a fresh process, whose RSS is another process's, not growth. Process KEPT
            // is never killed, so at least its growth is always measured.
            check(
                a.pid != b.pid || a.rss < b.rss + RSS_BOUND,
                format!(
                    "device-model process {i} (pid {}, lived through the run): RSS grew by {} \
                     KiB, {} -> {} KiB",
                    a.pid,
                    a.rss.saturating_sub(b.rss) >> 10,
                    b.rss >> 10,
                    a.rss >> 10
                ),
            );
        }
        check(
            self.survivors().any(|(i, _, _)| i == KEPT),
            format!(
                "device-model process {KEPT} did not live through the run: no device model's \
                 RSS growth was measured"
            ),
        );
        f
    }

    /// The device-model processes that lived through the measured run (same process at both
    /// samples): `(index, before, after)`.
    fn survivors(&self) -> impl Iterator<Item = (usize, &Usage, &Usage)> {
        self.before
            .dms
            .iter()
            .zip(&self.after.dms)
            .enumerate()
            .filter(|(_, (b, a))| a.pid == b.pid)
            .map(|(i, (b, a))| (i, b, a))
    }

    /// DMs `first..first + count` of device-model process `i`.
    fn dms_of(&self, i: usize) -> (u32, u32) {
        let per = DMS / self.args.dm_processes.max(1);
        (u32::try_from(i).unwrap_or(0) * per, per)
    }

    fn to_json(&self) -> serde_json::Value {
        let (c, h, r) = (&self.counts, self.hyp(), self.routes());
        let usage = |u: &Usage| json!({ "pid": u.pid, "fds": u.fds, "rss_bytes": u.rss });
        json!({
            "config": {
                "dms": DMS,
                "vcpus": self.args.vcpus,
                "dm_processes": self.args.dm_processes,
                "churn_ms": self.args.churn_ms,
                "timeout_ms": self.args.timeout_ms,
                "warmup_secs": self.args.warmup_secs,
            },
            "requests": c.accesses,
            "secs": self.elapsed.as_secs_f64(),
            "requests_per_s": self.per_s(),
            "mix": {
                "config_reads": c.config_reads,
                "scratch_writes": c.scratch_writes,
                "scratch_reads": c.scratch_reads,
                "queue_notifies": c.notifies,
                "status_reads": c.status_reads,
                "acks": c.acks,
                "interrupts_served": c.interrupts_served,
            },
            "reads": {
                "right": c.reads_right,
                "abandoned": c.reads_abandoned,
                "unverified": c.reads_unverified,
                "wrong": c.wrong_values,
                "registers_given_up": {
                    "timeout": c.given_up_timeout,
                    "overlap": c.given_up_overlap,
                },
            },
            "warmup": {
                "requests": self.warmup.accesses,
                "timeouts": self.warmup.timeouts,
                "registers_given_up": {
                    "timeout": self.warmup.given_up_timeout,
                    "overlap": self.warmup.given_up_overlap,
                },
            },
            "access_errors": c.access_errors,
            "timeouts": c.timeouts,
            "routes": {
                "device_model": r.to_control,
                "ioeventfd": r.to_ioeventfd,
                "status_word": r.to_status_word,
                "io_client": r.to_io_client,
                "held_for_next_session": r.held,
                "completed_by_dispatcher": r.completed_by_dispatcher,
                "overflow": r.overflow,
                "dispatched": r.dispatched,
            },
            "hypervisor": {
                "requests": h.requests,
                "completions": h.completions,
                "timeouts": h.timeouts,
                "timeouts_pending": h.timeouts_pending,
                "timeouts_abandoned": h.timeouts_abandoned,
                "timeouts_no_slot": h.timeouts_no_slot,
                "abandoned_completions": h.abandoned_completions,
                "refused_completions": h.invalid_hypercalls,
                "notifies": h.notifies,
            },
            "interrupts": {
                "irqfd_notifies": r.irqfd_notifies,
                "frontend_interrupts": self.interrupts,
            },
            "churn": {
                "kills": self.churn.kills,
                "pauses": self.churn.pauses,
                "recreates": self.churn.recreates,
            },
            "settled": self.settled,
            "platform": { "before": usage(&self.before.platform), "after": usage(&self.after.platform) },
            "rss_bound_bytes": RSS_BOUND,
            "device_models": self.before.dms.iter().zip(&self.after.dms).enumerate()
                .map(|(i, (b, a))| {
                    let (first, count) = self.dms_of(i);
                    let survived = a.pid == b.pid;
                    json!({
                        "process": i,
                        "dms": [first, first + count - 1],
                        "kept_out_of_kills": i == KEPT,
                        "survived": survived,
                        "rss_growth_bytes": survived
                            .then(|| i128::from(a.rss) - i128::from(b.rss))
                            .and_then(|g| i64::try_from(g).ok()),
                        "before": usage(b),
                        "after": usage(a),
                    })
                })
                .collect::<Vec<_>>(),
            "failures": self.failures(),
        })
    }

    fn print(&self) {
        let (c, h, r) = (&self.counts, self.hyp(), self.routes());
        let kib = |b: u64| b >> 10;
        println!(
            "remio soak: {} requests in {:.1} s: {:.0} requests/s ({DMS} DMs, {} device-model \
             processes, {} frontend threads, churn every {} ms)",
            c.accesses,
            self.elapsed.as_secs_f64(),
            self.per_s(),
            self.args.dm_processes,
            self.args.vcpus,
            self.args.churn_ms
        );
        println!(
            "  mix: {} config reads, {} scratch writes, {} scratch reads, {} QueueNotify, {} \
             InterruptStatus ({} for an interrupt), {} InterruptACK",
            c.config_reads,
            c.scratch_writes,
            c.scratch_reads,
            c.notifies,
            c.status_reads,
            c.interrupts_served,
            c.acks
        );
        println!(
            "  completions by route: device model {}, ioeventfd {}, status word {}, held for \
             the next session {}, by the dispatcher {}, overflow {}",
            r.to_control,
            r.to_ioeventfd,
            r.to_status_word,
            r.held,
            r.completed_by_dispatcher,
            r.overflow
        );
        println!(
            "  hypervisor: {} requests = {} completions + {} timeouts ({} pending, {} abandoned); \
             {} refused completions; {} timed out waiting for a slot",
            h.requests,
            h.completions,
            h.timeouts_pending + h.timeouts_abandoned,
            h.timeouts_pending,
            h.timeouts_abandoned,
            h.invalid_hypercalls,
            h.timeouts_no_slot
        );
        println!(
            "  reads: {} right, {} wrong, {} abandoned by an ending session (0, overlapping \
             churn), {} unchecked (their register given up on)",
            c.reads_right, c.wrong_values, c.reads_abandoned, c.reads_unverified
        );
        let w = &self.warmup;
        println!(
            "  scratch registers given up on (their reads no longer checked): {} after a \
             timed-out write, {} after 8 writes in a row overlapped churn; in the \
             warm-up ({} requests, {} timeouts): {} and {}",
            c.given_up_timeout,
            c.given_up_overlap,
            w.accesses,
            w.timeouts,
            w.given_up_timeout,
            w.given_up_overlap
        );
        println!(
            "  interrupts: {} irqfd NOTIFYs, {} frontend interrupts",
            r.irqfd_notifies, self.interrupts
        );
        println!(
            "  churn: {} device-model processes killed and restarted, {} DM pauses, {} sessions \
             re-created",
            self.churn.kills, self.churn.pauses, self.churn.recreates
        );
        println!(
            "  platform: fds {} -> {}, RSS {} KiB -> {} KiB",
            self.before.platform.fds,
            self.after.platform.fds,
            kib(self.before.platform.rss),
            kib(self.after.platform.rss)
        );
        for (i, (b, a)) in self.before.dms.iter().zip(&self.after.dms).enumerate() {
            let (first, count) = self.dms_of(i);
            let growth = if a.pid == b.pid {
                format!(
                    " ({:+} KiB; lived through the run{})",
                    (i128::from(a.rss) - i128::from(b.rss)) >> 10,
                    if i == KEPT {
                        ", kept out of the kills"
                    } else {
                        ""
                    }
                )
            } else {
                format!(" (restarted: pid {} -> {}, RSS not compared)", b.pid, a.pid)
            };
            println!(
                "  device-model process {i} (DMs {first}-{}): fds {} -> {}, RSS {} KiB -> {} \
                 KiB{growth}",
                first + count - 1,
                b.fds,
                a.fds,
                kib(b.rss),
                kib(a.rss),
            );
        }
        println!(
            "  RSS bound: growth under {} KiB for the platform and each device-model process \
             that lived through the run ({} of {})",
            RSS_BOUND >> 10,
            self.survivors().count(),
            self.before.dms.len()
        );
        let failures = self.failures();
        if failures.is_empty() {
            println!("  result: PASS");
        } else {
            println!("  result: FAIL: {}", failures.join("; "));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn usage(pid: u32, rss: u64) -> Usage {
        Usage { pid, fds: 33, rss }
    }

    fn sample(dms: Vec<Usage>) -> Sample {
        Sample {
            platform: Usage {
                pid: 1,
                fds: 175,
                rss: 6 * MIB,
            },
            dms,
            hyp: Stats::default(),
            routes: DmStats::default(),
        }
    }

    /// A clean run (no request, nothing wrong) whose device-model processes were sampled as
    /// `before` and `after`.
    fn report(before: Vec<Usage>, after: Vec<Usage>) -> Report {
        Report {
            args: Config {
                vcpus: 8,
                dm_processes: u32::try_from(before.len()).unwrap(),
                churn_ms: 100,
                timeout_ms: 5000,
                warmup_secs: 10,
            },
            elapsed: Duration::from_secs(1),
            counts: Counts::default(),
            warmup: Counts::default(),
            churn: Churn::default(),
            before: sample(before),
            after: sample(after),
            settled: true,
            interrupts: 0,
        }
    }

    #[test]
    fn a_device_model_that_lived_through_the_run_and_grew_past_the_bound_fails_the_soak() {
        let r = report(
            vec![usage(10, 11 * MIB), usage(11, 11 * MIB)],
            vec![usage(10, 11 * MIB + RSS_BOUND), usage(12, 11 * MIB)],
        );

        let f = r.failures();

        assert_eq!(f.len(), 1, "{f:?}");
        assert!(
            f[0].starts_with(
                "device-model process 0 (pid 10, lived through the run): RSS grew by 1024 KiB"
            ),
            "{f:?}"
        );
    }

    #[test]
    fn a_device_model_that_lived_through_the_run_within_the_bound_passes() {
        let r = report(
            vec![usage(10, 11 * MIB), usage(11, 11 * MIB)],
            vec![usage(10, 11 * MIB + RSS_BOUND - 4096), usage(11, 10 * MIB)],
        );

        assert_eq!(r.failures(), Vec::<String>::new());
        assert_eq!(r.survivors().count(), 2);
    }

    #[test]
    fn a_restarted_device_model_is_not_compared_for_rss_but_for_fds() {
        let mut grown = usage(12, 20 * MIB);
        grown.fds = 34;
        let r = report(
            vec![usage(10, 11 * MIB), usage(11, 11 * MIB)],
            vec![usage(10, 11 * MIB), grown],
        );

        let f = r.failures();

        assert_eq!(f, vec!["device-model process 1: fds 33 -> 34".to_owned()]);
        assert_eq!(
            r.survivors().map(|(i, _, _)| i).collect::<Vec<_>>(),
            vec![KEPT]
        );
    }

    #[test]
    fn a_run_in_which_the_kept_device_model_was_restarted_fails_the_soak() {
        let r = report(
            vec![usage(10, 11 * MIB), usage(11, 11 * MIB)],
            vec![usage(13, 11 * MIB), usage(11, 11 * MIB)],
        );

        let f = r.failures();

        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].contains("did not live through the run"), "{f:?}");
    }

    #[test]
    fn kill_events_pick_every_dm_but_those_of_the_kept_process() {
        let mut rng = Rng::new(7);
        let mut seen = [0u32; DMS as usize];

        for _ in 0..10_000 {
            let dm = kill_target(&mut rng, 4).unwrap();
            seen[dm as usize] += 1;
        }

        assert_eq!(&seen[..4], &[0; 4], "a DM of the kept process was killed");
        assert!(seen[4..].iter().all(|&n| n > 0), "{seen:?}");
    }

    #[test]
    fn kill_events_are_refused_when_the_kept_process_serves_every_dm() {
        assert!(kill_target(&mut Rng::new(7), DMS).is_err());
    }
}
