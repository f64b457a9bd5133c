//! `remio bench`: every cost as a ratio against a floor measured in the same run.
//!
//! Groups (select with `--only`): `control`, `notify`, `scale`, `guest`, `fs`. Each group
//! measures the floors it is compared with in the same run. Nothing here asserts on time:
//! benchmarks are not tests.
//!
//! Method (docs/performance.md): the control, notify and scale groups run `--repeat` times
//! (default 5), interleaved (control, notify, scale, control, …) so that a change in the
//! machine's load touches every group alike; each figure and each ratio (path over the floor of
//! the same repeat) is reported as the median with its spread (min–max). Next to wall latency,
//! the CPU time per request (user + system of every process involved, from their CPU-time
//! clocks), which does not depend on how long an idle core takes to wake. The guest group runs
//! once, alternating `--guest-runs` boots of each side. The fs group boots one QEMU and one
//! remio guest per repeat (alternating) and reports each repeat's ratio (see `fs.rs`).

mod child;
mod cpu;
mod floors;
mod fs;
mod guest;
mod paths;
mod plot;
mod stats;

use std::path::PathBuf;

use anyhow::Context as _;
use serde_json::{json, Map, Value};

use stats::Samples;

/// Every benchmark group, in the order they run.
const GROUPS: [&str; 5] = ["control", "notify", "scale", "guest", "fs"];

/// Arguments of `remio bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Run only these groups (comma separated): control, notify, scale, guest, fs.
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
    /// Runs of the control, notify, scale and fs groups (interleaved); medians and min-max are
    /// reported.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
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
    anyhow::ensure!(args.repeat >= 1, "--repeat must be at least 1");
    let selected = |g: &str| args.only.is_empty() || args.only.iter().any(|o| o == g);
    let dir = TempDir::new()?;
    let load_before = loadavg();
    let mut runs: Vec<Report> = Vec::new();
    let mut fs_share = None;

    for r in 1..=args.repeat {
        if args.repeat > 1 && (selected("control") || selected("notify") || selected("scale")) {
            eprintln!("repeat {r}/{}", args.repeat);
        }
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
        if selected("fs") {
            fs_round(&mut report, &dir.0, &mut fs_share, r, args.repeat)?;
        }
        runs.push(report);
    }
    // Once: its own repeats are inside (alternating boots), and its figures are in MiB/s.
    let mut once = Report::default();
    if selected("scale") {
        once.add("idle_dm_bytes", paths::idle_dm_bytes()?, "B");
    }
    if selected("guest") {
        guest(&mut once, &dir.0, args.guest_runs)?;
    }
    let summary = Summary {
        repeat: args.repeat,
        cores: cores(),
        load_before,
        load_after: loadavg(),
        figures: aggregate(runs.iter().chain(std::iter::once(&once))),
    };

    if let Some(plot_dir) = &args.plot {
        // The first repeat's samples (every repeat's distributions look alike; the figures
        // above give their spread).
        let mut first = runs.into_iter().next().unwrap_or_default();
        first.plots.append(&mut once.plots);
        write_plots(&mut first, plot_dir)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&summary))?);
    } else {
        print_table(&summary);
    }
    Ok(())
}

/// The cores this process may use.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// The 1, 5 and 15 minute load averages, as /proc/loadavg gives them.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn control(report: &mut Report, dir: &std::path::Path, iterations: usize) -> anyhow::Result<()> {
    eprintln!("control: socket floor, then register reads served over the socket API ...");
    let (mut floor, floor_cpu) = floors::socket_ping_pong(dir, iterations)?;
    let (mut path, path_cpu) = paths::control(dir, iterations)?;
    let (floor50, floor99) = (ns(floor.percentile(50.0)), ns(floor.percentile(99.0)));
    report.add("socket_floor_ns_p50", floor50, "ns");
    report.add("socket_floor_ns_p99", floor99, "ns");
    report.add("socket_floor_cpu_ns", floor_cpu, "ns");
    report.add_ratio(
        "control_rtt_ns_p50",
        ns(path.percentile(50.0)),
        "ns",
        ("socket_floor_ns_p50", floor50),
        "<= 1.3x",
    );
    report.add_ratio(
        "control_rtt_ns_p99",
        ns(path.percentile(99.0)),
        "ns",
        ("socket_floor_ns_p99", floor99),
        "",
    );
    report.add_ratio(
        "control_cpu_ns",
        path_cpu,
        "ns",
        ("socket_floor_cpu_ns", floor_cpu),
        "<= 1.3x",
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
    let mut fig = paths::notify(iterations)?;
    let floor50 = ns(floor.percentile(50.0));
    report.add("eventfd_floor_ns_p50", floor50, "ns");
    report.add_ratio(
        "notify_ns_p50",
        ns(fig.latency.percentile(50.0)),
        "ns",
        ("eventfd_floor_ns_p50", floor50),
        "<= 1.2x",
    );
    report.add_target("notify_per_s", fig.per_s, "1/s", ">= 1000000");
    report.add("notify_floor_per_s", fig.floor_per_s, "1/s");
    report.add("notify_cpu_ns", fig.cpu_ns_per_write, "ns");
    // What the path costs its writer when there is nobody to wake: `notify_per_s` depends on
    // how often the draining worker sleeps, which a few hundred ns per write change a lot
    // (docs/performance.md, "Notify: what the rate depends on, and a figure that does not").
    report.add("eventfd_write_ns", fig.write_floor_ns, "ns");
    report.add_ratio(
        "notify_path_ns",
        fig.path_ns,
        "ns",
        ("eventfd_write_ns", fig.write_floor_ns),
        "",
    );
    report.plots.push((
        "notify".into(),
        vec![
            ("eventfd wake floor".into(), floor),
            ("QueueNotify through ioeventfd".into(), fig.latency),
        ],
    ));
    Ok(())
}

/// Scale: one DM, then 16 at once. The figure is the 16-DM throughput over what the cores
/// allow at the single DM's efficiency: `min(16, cores)` CPU-seconds per second, each worth
/// `1 / scale_1dm_cpu_ns` requests. A single DM is a ping-pong that leaves cores idle, so its
/// wall throughput times the cores (the old definition, kept as `scale_wall_ratio`) is not
/// what the cores allow; this ratio reaches 1 only when every core is busy and a request costs
/// no more CPU with 16 DMs than with one.
fn scale(report: &mut Report, dir: &std::path::Path) -> anyhow::Result<()> {
    eprintln!("scale: control + notify mix on 1 DM, then on 16 DMs at once ...");
    let duration = std::time::Duration::from_secs(3);
    let one = paths::scale(dir, 1, duration)?;
    let sixteen = paths::scale(dir, 16, duration)?;
    #[expect(clippy::cast_precision_loss, reason = "a core count")]
    let usable = cores().min(16) as f64;
    report.add("scale_1dm_per_s", one.per_s, "1/s");
    report.add("scale_1dm_cpu_ns", one.cpu_ns_per_req, "ns");
    report.add("scale_1dm_cores_busy", one.cores_busy, "");
    let ideal = usable * 1e9 / one.cpu_ns_per_req;
    report.add("scale_ideal_per_s", ideal, "1/s");
    report.add_ratio(
        "scale_16dm_per_s",
        sixteen.per_s,
        "1/s",
        ("scale_ideal_per_s", ideal),
        ">= 0.9x",
    );
    report.add("scale_16dm_cpu_ns", sixteen.cpu_ns_per_req, "ns");
    report.add("scale_16dm_cores_busy", sixteen.cores_busy, "");
    report.add(
        "scale_wall_ratio",
        sixteen.per_s / (one.per_s * usable),
        "x",
    );
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
        ">= 1.0x",
    );
    if let (Some(qemu_warm), Some(warm)) = (qemu.seq_warm_mib_per_s, remio.seq_warm_mib_per_s) {
        // The second pass: the steady rate, without remio's slower first few hundred MiB.
        report.add("guest.qemu_seq_warm_read_mib_s", qemu_warm, "MiB/s");
        report.add_ratio(
            "guest.seq_warm_read_mib_s",
            warm,
            "MiB/s",
            ("guest.qemu_seq_warm_read_mib_s", qemu_warm),
            "",
        );
    }
    report.add("guest.qemu_randread_iops", qemu.rand_iops, "IOPS");
    report.add_ratio(
        "guest.randread_iops",
        remio.rand_iops,
        "IOPS",
        ("guest.qemu_randread_iops", qemu.rand_iops),
        ">= 1.0x",
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
    if let Some(poll_ms) = remio.poll_ms {
        // What polling the disk's available ring cost the host, per I/O of the benchmark
        // (CPU time of the device model's queue thread spent spinning; boot included).
        report.add(
            "guest.blk_poll_us_per_io",
            poll_ms * 1000.0 / remio.ios,
            "us",
        );
    }
    Ok(())
}

/// One round of the fs group: a QEMU boot, then a remio boot, on the same share (written on
/// the first round).
fn fs_round(
    report: &mut Report,
    dir: &std::path::Path,
    share: &mut Option<PathBuf>,
    round: usize,
    rounds: usize,
) -> anyhow::Result<()> {
    let guest_dir = crate::guest::default_dir();
    anyhow::ensure!(
        guest_dir.join("vmlinuz").exists(),
        "no guest image in {} (run scripts/setup or `remio guest build`)",
        guest_dir.display()
    );
    let share = match share {
        Some(s) => s.clone(),
        None => share.insert(fs::make_share(dir)?).clone(),
    };
    eprintln!(
        "fs: round {round}/{rounds}: QEMU's vhost-user-fs-device, then remio's, same virtiofsd ..."
    );
    let qemu = fs::qemu(&share, &guest_dir, dir)?;
    let remio = fs::remio(&share, dir)?;
    fs::add_round(report, &qemu, &remio);
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

/// One figure over the repeats.
#[derive(Debug, Clone, PartialEq)]
struct Figure {
    key: &'static str,
    unit: &'static str,
    /// One value per repeat that produced it.
    values: Vec<f64>,
    /// The floor's key and the ratio of each repeat (path over the floor of the same repeat).
    ratio: Option<(&'static str, Vec<f64>)>,
    target: Option<&'static str>,
}

/// Median, min and max of a non-empty list (the median of an even count is the mean of the
/// middle two); NaN values are left out.
fn spread(values: &[f64]) -> (f64, f64, f64) {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

/// Every figure of the reports, in the order they first appear, with its values per report.
fn aggregate<'a>(reports: impl Iterator<Item = &'a Report>) -> Vec<Figure> {
    let mut figures: Vec<Figure> = Vec::new();
    for report in reports {
        for m in &report.metrics {
            let i = match figures.iter().position(|f| f.key == m.key) {
                Some(i) => i,
                None => {
                    figures.push(Figure {
                        key: m.key,
                        unit: m.unit,
                        values: Vec::new(),
                        ratio: m.ratio.map(|(floor, _)| (floor, Vec::new())),
                        target: m.target,
                    });
                    figures.len() - 1
                }
            };
            let f = &mut figures[i];
            f.values.push(m.value);
            if let (Some((_, ratios)), Some((_, r))) = (&mut f.ratio, m.ratio) {
                ratios.push(r);
            }
        }
    }
    figures
}

/// What `remio bench` prints.
#[derive(Debug)]
struct Summary {
    repeat: usize,
    cores: usize,
    load_before: String,
    load_after: String,
    figures: Vec<Figure>,
}

/// `{"control_rtt_ns_p50": median, …, "spread": {key: {median, min, max, runs}}, "ratios":
/// {key: {floor, ratio (median), min, max, runs, target}}, "repeat", "cores", "load"}`: the
/// top-level keys are the medians, as a single run's figures were before `--repeat`.
fn to_json(summary: &Summary) -> Value {
    let mut top = Map::new();
    let mut spreads = Map::new();
    let mut ratios = Map::new();
    for f in &summary.figures {
        let (median, min, max) = spread(&f.values);
        insert_dotted(&mut top, f.key, json!(median));
        spreads.insert(
            f.key.to_string(),
            json!({ "median": median, "min": min, "max": max, "runs": f.values, "unit": f.unit }),
        );
        if let Some((floor, rs)) = &f.ratio {
            let (median, min, max) = spread(rs);
            ratios.insert(
                f.key.to_string(),
                json!({ "floor": floor, "ratio": median, "min": min, "max": max, "runs": rs,
                        "target": f.target }),
            );
        }
    }
    top.insert("spread".into(), Value::Object(spreads));
    top.insert("ratios".into(), Value::Object(ratios));
    top.insert("repeat".into(), json!(summary.repeat));
    top.insert("cores".into(), json!(summary.cores));
    top.insert(
        "load".into(),
        json!({ "before": summary.load_before, "after": summary.load_after }),
    );
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

fn print_table(summary: &Summary) {
    println!(
        "{} repeat(s), medians (min-max); {} cores; load average {} before, {} after",
        summary.repeat, summary.cores, summary.load_before, summary.load_after
    );
    println!(
        "{:<26} {:>12} {:>23} {:<5} {:<22} {:>7} {:>13}  target",
        "metric", "median", "min-max", "unit", "floor", "ratio", "ratio min-max"
    );
    for f in &summary.figures {
        let (median, min, max) = spread(&f.values);
        let range = if f.values.len() > 1 {
            format!("{min:.1}-{max:.1}")
        } else {
            String::new()
        };
        let (floor, ratio, ratio_range) = match &f.ratio {
            Some((floor, rs)) => {
                let (m, lo, hi) = spread(rs);
                let range = if rs.len() > 1 {
                    format!("{lo:.2}-{hi:.2}x")
                } else {
                    String::new()
                };
                ((*floor).to_string(), format!("{m:.2}x"), range)
            }
            None => (String::new(), String::new(), String::new()),
        };
        println!(
            "{:<26} {:>12.1} {:>23} {:<5} {:<22} {:>7} {:>13}  {}",
            f.key,
            median,
            range,
            f.unit,
            floor,
            ratio,
            ratio_range,
            f.target.unwrap_or("")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_median_min_and_max_and_ignores_nan() {
        assert_eq!(spread(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(spread(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
        assert_eq!(spread(&[f64::NAN, 5.0]), (5.0, 5.0, 5.0));
        assert!(spread(&[]).0.is_nan());
    }

    #[test]
    fn each_repeat_keeps_its_own_ratio_and_json_reports_medians_and_spread() {
        let mut runs = Vec::new();
        for (path, floor) in [(4.0, 2.0), (9.0, 3.0), (5.0, 5.0)] {
            let mut r = Report::default();
            r.add("floor_ns", floor, "ns");
            r.add_ratio("path_ns", path, "ns", ("floor_ns", floor), "<= 1.3x");
            runs.push(r);
        }

        let figures = aggregate(runs.iter());
        let json = to_json(&Summary {
            repeat: 3,
            cores: 2,
            load_before: String::new(),
            load_after: String::new(),
            figures,
        });

        assert_eq!(json["path_ns"], json!(5.0));
        assert_eq!(json["spread"]["path_ns"]["min"], json!(4.0));
        assert_eq!(json["spread"]["path_ns"]["max"], json!(9.0));
        // Ratios per repeat (2, 3, 1), not the ratio of the medians (5 / 3).
        assert_eq!(json["ratios"]["path_ns"]["ratio"], json!(2.0));
        assert_eq!(json["ratios"]["path_ns"]["runs"], json!([2.0, 3.0, 1.0]));
        assert_eq!(json["ratios"]["path_ns"]["target"], json!("<= 1.3x"));
        assert_eq!(json["repeat"], json!(3));
    }
}
