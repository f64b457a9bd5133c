//! `remio bench`: every cost as a ratio against a floor measured in the same run.
//!
//! Groups (select with `--only`): `control`, `notify`, `scale`, `guest`. Each group measures
//! the floors it is compared with in the same run. Nothing here asserts on time: benchmarks are
//! not tests.

mod child;
mod floors;
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

    fn add_ratio(
        &mut self,
        key: &'static str,
        value: f64,
        unit: &'static str,
        floor: (&'static str, f64),
        target: &'static str,
    ) {
        let ratio = if floor.1 > 0.0 { value / floor.1 } else { f64::NAN };
        self.metrics.push(Metric {
            key,
            value,
            unit,
            ratio: Some((floor.0, ratio)),
            target: Some(target),
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
    let selected = |g: &str| args.only.is_empty() || args.only.iter().any(|o| o == g);
    let dir = TempDir::new()?;
    let mut report = Report::default();

    if selected("control") {
        control(&mut report, &dir.0, args.iterations)?;
    }
    if selected("notify") {
        notify(&mut report, args.iterations)?;
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
    let mut floor = floors::socket_ping_pong(dir, iterations)?;
    let floor_p50 = floor.percentile(50.0) as f64;
    report.add("socket_floor_ns_p50", floor_p50, "ns");
    report.plots.push((
        "control".into(),
        vec![("socket ping-pong floor".into(), floor)],
    ));
    Ok(())
}

fn notify(report: &mut Report, iterations: usize) -> anyhow::Result<()> {
    let mut floor = floors::eventfd_wake(iterations)?;
    report.add("eventfd_floor_ns_p50", floor.percentile(50.0) as f64, "ns");
    report.plots.push((
        "notify".into(),
        vec![("eventfd wake floor".into(), floor)],
    ));
    Ok(())
}

fn run_child(role: &str, arg: Option<&std::path::Path>) -> anyhow::Result<()> {
    let arg = arg.context("--child needs --child-arg")?;
    match role {
        "socket-echo" => floors::socket_echo_child(arg),
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
        std::fs::write(&path, plot::cdf_svg(&format!("remio bench: {name}"), &curves))
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
