//! Latency-distribution plots as self-contained SVG: one cumulative distribution per series on a
//! logarithmic time axis, so a floor and the path measured against it read side by side.

use std::fmt::Write as _;

/// One curve: a label and its sorted samples in nanoseconds.
#[derive(Debug)]
pub struct Series<'a> {
    /// Legend text.
    pub label: &'a str,
    /// Sorted ascending.
    pub sorted_ns: &'a [u64],
}

const W: f64 = 720.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
];

/// Renders the CDFs of `series` as an SVG document.
pub fn cdf_svg(title: &str, series: &[Series<'_>]) -> String {
    let (lo, hi) = bounds(series);
    let (llo, lhi) = (
        lo.log10().floor(),
        hi.log10().ceil().max(lo.log10().floor() + 1.0),
    );
    let x_of = |ns: f64| LEFT + (ns.max(1.0).log10() - llo) / (lhi - llo) * (W - LEFT - RIGHT);
    let y_of = |q: f64| TOP + (1.0 - q) * (H - TOP - BOTTOM);

    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = write!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        W / 2.0,
        escape(title)
    );
    // Axes, decade ticks and quartile grid.
    let _ = write!(
        s,
        r#"<path d="M{LEFT},{TOP} V{} H{}" stroke="black" fill="none"/>"#,
        H - BOTTOM,
        W - RIGHT
    );
    #[expect(
        clippy::cast_possible_truncation,
        reason = "decade exponents of nanosecond values are small integers"
    )]
    for e in (llo as i32)..=(lhi as i32) {
        let x = x_of(10f64.powi(e));
        let _ = write!(
            s,
            r##"<line x1="{x}" y1="{TOP}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{}</text>"##,
            H - BOTTOM,
            H - BOTTOM + 16.0,
            human_ns(10f64.powi(e))
        );
    }
    for q in [0.0, 0.25, 0.5, 0.75, 0.99, 1.0] {
        let y = y_of(q);
        let _ = write!(
            s,
            r##"<line x1="{LEFT}" y1="{y}" x2="{}" y2="{y}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">p{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            q * 100.0
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">latency (log scale)</text>"#,
        W / 2.0,
        H - 10.0
    );
    // Curves, thinned to at most ~400 points each.
    for (i, ser) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let n = ser.sorted_ns.len();
        if n == 0 {
            continue;
        }
        let step = (n / 400).max(1);
        let mut d = String::new();
        for (k, idx) in (0..n)
            .step_by(step)
            .chain(std::iter::once(n - 1))
            .enumerate()
        {
            #[expect(clippy::cast_precision_loss, reason = "plot coordinates")]
            let (x, y) = (
                x_of(ser.sorted_ns[idx] as f64),
                y_of((idx + 1) as f64 / n as f64),
            );
            let _ = write!(d, "{}{x:.1},{y:.1}", if k == 0 { "M" } else { " L" });
        }
        let _ = write!(
            s,
            r#"<path d="{d}" stroke="{color}" stroke-width="2" fill="none"/>"#
        );
        #[expect(clippy::cast_precision_loss, reason = "legend position")]
        let ly = TOP + 14.0 + 16.0 * i as f64;
        let _ = write!(
            s,
            r#"<rect x="{}" y="{}" width="12" height="4" fill="{color}"/><text x="{}" y="{}">{}</text>"#,
            LEFT + 12.0,
            ly - 4.0,
            LEFT + 30.0,
            ly,
            escape(ser.label)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn bounds(series: &[Series<'_>]) -> (f64, f64) {
    let lo = series
        .iter()
        .filter_map(|s| s.sorted_ns.first())
        .min()
        .copied()
        .unwrap_or(1);
    let hi = series
        .iter()
        .filter_map(|s| s.sorted_ns.last())
        .max()
        .copied()
        .unwrap_or(10);
    #[expect(clippy::cast_precision_loss, reason = "plot range")]
    (lo.max(1) as f64, hi.max(lo + 1) as f64)
}

/// 1500 → "1.5µs".
pub fn human_ns(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.3}s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.3}ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.1}µs", ns / 1e3)
    } else {
        format!("{ns:.0}ns")
    }
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_one_path_per_series_and_escapes_labels() {
        let a: Vec<u64> = (1..=1000).collect();
        let b: Vec<u64> = (500..=5000).collect();
        let svg = cdf_svg(
            "t<1>",
            &[
                Series {
                    label: "floor & co",
                    sorted_ns: &a,
                },
                Series {
                    label: "path",
                    sorted_ns: &b,
                },
            ],
        );
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("stroke-width=\"2\"").count(), 2);
        assert!(svg.contains("floor &amp; co"));
        assert!(svg.contains("t&lt;1&gt;"));
    }

    #[test]
    fn human_units() {
        assert_eq!(human_ns(1500.0), "1.5µs");
        assert_eq!(human_ns(12.0), "12ns");
        assert_eq!(human_ns(2.5e6), "2.500ms");
    }
}
