//! `remio bench`: every cost as a ratio against a floor measured in the same run.
//!
//! Groups (select with `--only`): `control`, `notify`, `scale`, `guest`. Each group measures
//! the floors it is compared with in the same run. Nothing here asserts on time: benchmarks are
//! not tests.

mod child;
mod floors;
mod guest;
mod paths;
mod plot;
mod stats;

use std::path::PathBuf;

use anyhow::Context as _;
use serde_json::{json, Map, Value};

use stats::Samples;

/// Every benchmark group, in the order they run.
const GROUPS: [&str; 4] = ["control", "notify", "scale", "guest"];

/// Arguments of `remio bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Run only these groups (comma separated): control, notify, scale, guest.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Write latency-distribution plots (SVG) into this directory.
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
    /// Samples per latency measurement.
    #[arg(long, default_value_t = 20_000)]
    iterations: usize,
    /// Guest group: boots of each side (alternating QEMU and remio); medians are reported.
    #[arg(long, default_value_t = 3)]
    guest_runs: usize,
    /// Internal: run as a benchmark child process with this role.
    #[arg(long, hide = true)]
    child: Option<String>,
    /// Internal: the child's argument (a socket path).
    #[arg(long, hide = true)]
    child_arg: Option<PathBuf>,
}

/// One reported figure.
#[derive(Debug)]
struct Metric {
    key: &'static str,
    value: f64,
    unit: &'static str,
    /// `(floor key, ratio value / floor)` when the figure has a floor.
    ratio: Option<(&'static str, f64)>,
    /// The target the project set for the ratio, as text.
    target: Option<&'static str>,
}

/// What one run produced: figures, and the samples behind the latency ones (for plots).
#[derive(Debug, Default)]
struct Report {
    metrics: Vec<Metric>,
    plots: Vec<(String, Vec<(String, Samples)>)>,
}

impl Report {
    fn add(&mut self, key: &'static str, value: f64, unit: &'static str) {
        self.metrics.push(Metric {
            key,
            value,
            unit,
            ratio: None,
            target: None,
        });
    }

    fn add_target(
        &mut self,
        key: &'static str,
        value: f64,
        unit: &'static str,
        target: &'static str,
    ) {
        self.metrics.push(Metric {
            key,
            value,
            unit,
            ratio: None,
            target: Some(target),
        });
    }

    fn add_ratio(
        &mut self,
        key: &'static str,
        value: f64,
        unit: &'static str,
        floor: (&'static str, f64),
        target: &'static str,
    ) {
        let ratio = if floor.1 > 0.0 {
            value / floor.1
        } else {
            f64::NAN
        };
        self.metrics.push(Metric {
            key,
            value,
            unit,
            ratio: Some((floor.0, ratio)),
            target: (!target.is_empty()).then_some(target),
        });
    }
}

/// Runs `remio bench`.
pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(role) = &args.child {
        return run_child(role, args.child_arg.as_deref());
    }
    for g in &args.only {
        anyhow::ensure!(
            GROUPS.contains(&g.as_str()),
            "unknown benchmark group {g:?}; the groups are {}",
            GROUPS.join(", ")
        );
    }
    anyhow::ensure!(args.iterations >= 100, "--iterations must be at least 100");
    anyhow::ensure!(args.guest_runs >= 1, "--guest-runs must be at least 1");
    let selected = |g: &str| args.only.is_empty() || args.only.iter().any(|o| o == g);
    let dir = TempDir::new()?;
    let mut report = Report::default();

    if selected("control") {
        control(&mut report, &dir.0, args.iterations)?;
    }
    if selected("notify") {
        notify(&mut report, args.iterations)?;
    }
    if selected("scale") {
        scale(&mut report, &dir.0)?;
    }
    if selected("guest") {
        guest(&mut report, &dir.0, args.guest_runs)?;
    }

    if let Some(plot_dir) = &args.plot {
        write_plots(&mut report, plot_dir)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&report))?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn control(report: &mut Report, dir: &std::path::Path, iterations: usize) -> anyhow::Result<()> {
    eprintln!("control: socket floor, then register reads served over the socket API ...");
    let mut floor = floors::socket_ping_pong(dir, iterations)?;
    let mut path = paths::control(dir, iterations)?;
    let (floor50, floor99) = (ns(floor.percentile(50.0)), ns(floor.percentile(99.0)));
    report.add("socket_floor_ns_p50", floor50, "ns");
    report.add("socket_floor_ns_p99", floor99, "ns");
    report.add_ratio(
        "control_rtt_ns_p50",
        ns(path.percentile(50.0)),
        "ns",
        ("socket_floor_ns_p50", floor50),
        "<= 1.5x",
    );
    report.add_ratio(
        "control_rtt_ns_p99",
        ns(path.percentile(99.0)),
        "ns",
        ("socket_floor_ns_p99", floor99),
        "",
    );
    report.plots.push((
        "control".into(),
        vec![
            ("socket ping-pong floor".into(), floor),
            ("control read over the socket API".into(), path),
        ],
    ));
    Ok(())
}

fn notify(report: &mut Report, iterations: usize) -> anyhow::Result<()> {
    eprintln!("notify: eventfd floor, then QueueNotify writes through the ioeventfd path ...");
    let mut floor = floors::eventfd_wake(iterations)?;
    let (mut path, per_s) = paths::notify(iterations)?;
    let floor50 = ns(floor.percentile(50.0));
    report.add("eventfd_floor_ns_p50", floor50, "ns");
    report.add_ratio(
        "notify_ns_p50",
        ns(path.percentile(50.0)),
        "ns",
        ("eventfd_floor_ns_p50", floor50),
        "<= 1.2x",
    );
    report.add_target("notify_per_s", per_s, "1/s", ">= 500000");
    report.plots.push((
        "notify".into(),
        vec![
            ("eventfd wake floor".into(), floor),
            ("QueueNotify through ioeventfd".into(), path),
        ],
    ));
    Ok(())
}

fn scale(report: &mut Report, dir: &std::path::Path) -> anyhow::Result<()> {
    eprintln!("scale: control + notify mix on 1 DM, then on 16 DMs at once ...");
    let duration = std::time::Duration::from_secs(3);
    let one = paths::scale(dir, 1, duration)?;
    let sixteen = paths::scale(dir, 16, duration)?;
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    report.add("scale_1dm_per_s", one, "1/s");
    #[expect(clippy::cast_precision_loss, reason = "a core count")]
    let ideal = one * cores as f64;
    report.add_ratio(
        "scale_16dm_per_s",
        sixteen,
        "1/s",
        ("scale_1dm_per_s x cores", ideal),
        ">= 0.9x",
    );
    report.add("idle_dm_bytes", paths::idle_dm_bytes()?, "B");
    Ok(())
}

fn guest(report: &mut Report, dir: &std::path::Path, runs: usize) -> anyhow::Result<()> {
    let guest_dir = crate::guest::default_dir();
    anyhow::ensure!(
        guest_dir.join("vmlinuz").exists(),
        "no guest image in {} (run scripts/setup or `remio guest build`)",
        guest_dir.display()
    );
    eprintln!(
        "guest: the same kernel and disk, served by QEMU's virtio-blk-device, then by remio ..."
    );
    let disk = guest::make_disk(dir)?;
    // Alternating runs, medians: one pair alone swings with the machine's load.
    let (mut qemu_runs, mut remio_runs) = (Vec::new(), Vec::new());
    for round in 1..=runs {
        eprintln!("guest: round {round}/{runs}");
        qemu_runs.push(guest::qemu(&disk, &guest_dir)?);
        remio_runs.push(guest::remio(&disk)?);
    }
    let (qemu, remio) = (
        guest::GuestFigures::median(&qemu_runs),
        guest::GuestFigures::median(&remio_runs),
    );
    report.add("guest.qemu_seq_read_mib_s", qemu.seq_mib_per_s, "MiB/s");
    report.add_ratio(
        "guest.seq_read_mib_s",
        remio.seq_mib_per_s,
        "MiB/s",
        ("guest.qemu_seq_read_mib_s", qemu.seq_mib_per_s),
        ">= 0.9x",
    );
    report.add("guest.qemu_randread_iops", qemu.rand_iops, "IOPS");
    report.add_ratio(
        "guest.randread_iops",
        remio.rand_iops,
        "IOPS",
        ("guest.qemu_randread_iops", qemu.rand_iops),
        ">= 0.6x",
    );
    report.add(
        "guest.seq_read_ratio",
        remio.seq_mib_per_s / qemu.seq_mib_per_s,
        "x",
    );
    report.add(
        "guest.randread_ratio",
        remio.rand_iops / qemu.rand_iops,
        "x",
    );
    if let Some(trapped) = remio.trapped {
        // Every access of the run, boot and probe included, over the I/Os of the benchmark.
        report.add("guest.trapped_per_io", trapped / remio.ios, "");
    }
    if let Some((status_word, ioeventfd)) = remio.in_dispatcher {
        // Of those, answered inline in the dispatcher, without the device model.
        report.add("guest.status_word_per_io", status_word / remio.ios, "");
        report.add("guest.ioeventfd_per_io", ioeventfd / remio.ios, "");
    }
    Ok(())
}

#[expect(clippy::cast_precision_loss, reason = "nanosecond figures")]
fn ns(v: u64) -> f64 {
    v as f64
}

fn run_child(role: &str, arg: Option<&std::path::Path>) -> anyhow::Result<()> {
    let arg = arg.context("--child needs --child-arg")?;
    match role {
        "socket-echo" => floors::socket_echo_child(arg),
        "serve-dm" => paths::serve_dm_child(arg),
        "idle-rss" => paths::idle_rss_child(arg),
        other => anyhow::bail!("unknown benchmark child role {other:?}"),
    }
}

fn to_json(report: &Report) -> Value {
    let mut top = Map::new();
    let mut ratios = Map::new();
    for m in &report.metrics {
        insert_dotted(&mut top, m.key, json!(m.value));
        if let Some((floor, r)) = m.ratio {
            ratios.insert(
                m.key.to_string(),
                json!({ "floor": floor, "ratio": r, "target": m.target }),
            );
        }
    }
    top.insert("ratios".into(), Value::Object(ratios));
    Value::Object(top)
}

/// `guest.seq_read_ratio` goes to `{"guest": {"seq_read_ratio": …}}`.
fn insert_dotted(map: &mut Map<String, Value>, key: &str, value: Value) {
    match key.split_once('.') {
        Some((head, rest)) => {
            let entry = map
                .entry(head.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(inner) = entry {
                insert_dotted(inner, rest, value);
            }
        }
        None => {
            map.insert(key.to_string(), value);
        }
    }
}

fn print_table(report: &Report) {
    println!(
        "{:<26} {:>14} {:<5} {:<22} {:>8}  target",
        "metric", "value", "unit", "floor", "ratio"
    );
    for m in &report.metrics {
        let (floor, ratio) = match m.ratio {
            Some((f, r)) => (f.to_string(), format!("{r:.2}x")),
            None => (String::new(), String::new()),
        };
        println!(
            "{:<26} {:>14.1} {:<5} {:<22} {:>8}  {}",
            m.key,
            m.value,
            m.unit,
            floor,
            ratio,
            m.target.unwrap_or("")
        );
    }
}

fn write_plots(report: &mut Report, dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, series) in &mut report.plots {
        let sorted: Vec<(String, Vec<u64>)> = series
            .iter_mut()
            .map(|(label, s)| (label.clone(), s.sorted().to_vec()))
            .collect();
        let curves: Vec<plot::Series<'_>> = sorted
            .iter()
            .map(|(label, ns)| plot::Series {
                label,
                sorted_ns: ns,
            })
            .collect();
        let path = dir.join(format!("{name}.svg"));
        std::fs::write(
            &path,
            plot::cdf_svg(&format!("remio bench: {name}"), &curves),
        )
        .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("plot: {}", path.display());
    }
    Ok(())
}

/// A private temporary directory for sockets, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("remio-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
