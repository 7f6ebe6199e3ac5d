//! SVG plots of a results directory: queries per CPU-second, latency CDFs, and QPS against zone size.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::coord::combinators::IntoLogRange;
use plotters::prelude::*;

use crate::results::{Summary, server_rank, summarise};

/// A fixed colour per server so every plot uses the same one.
fn colour(server: &str) -> RGBColor {
    match server {
        "waypost" => RGBColor(0xd6, 0x27, 0x28),
        "knot" => RGBColor(0x1f, 0x77, 0xb4),
        "nsd" => RGBColor(0x2c, 0xa0, 0x2c),
        "unbound" => RGBColor(0xff, 0x7f, 0x0e),
        _ => RGBColor(0x94, 0x67, 0xbd),
    }
}

/// Turns a plotters error (not `Send + Sync`) into anyhow.
fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e:?}")
}

/// The `plot` command: writes qps_per_cpu.svg, qps_vs_size.svg, qps_per_cpu_vs_size.svg and
/// latency_cdf_<services>.svg.
pub(crate) fn plot(dir: &Path) -> Result<()> {
    let sums = summarise(dir)?;
    let sizes: Vec<u64> = sums
        .iter()
        .map(|s| s.services)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut servers: Vec<String> = sums
        .iter()
        .map(|s| s.server.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    servers.sort_by_key(|s| server_rank(s));
    bars(&dir.join("qps_per_cpu.svg"), &sums, &sizes, &servers)?;
    let qps = Metric {
        file: "qps_vs_size.svg",
        title: "QPS against zone size (median of rounds, server on one core)",
        axis: "answered queries / s",
        of: |s| s.qps,
    };
    let per_cpu = Metric {
        file: "qps_per_cpu_vs_size.svg",
        title: "Queries per server CPU-second against zone size (median of rounds)",
        axis: "answered queries / server CPU-second",
        of: |s| s.qps_per_cpu,
    };
    for m in [qps, per_cpu] {
        against_size(&dir.join(m.file), &m, &sums, &sizes, &servers)?;
    }
    for &size in &sizes {
        let these: Vec<&Summary> = sums
            .iter()
            .filter(|s| s.services == size && !s.latencies.is_empty())
            .collect();
        if !these.is_empty() {
            latency_cdf(&dir.join(format!("latency_cdf_{size}.svg")), size, &these)?;
        }
    }
    eprintln!("plots written to {}", dir.display());
    Ok(())
}

/// Grouped bars: one group per zone size, one bar per server, height = answered queries per server CPU-second.
fn bars(path: &Path, sums: &[Summary], sizes: &[u64], servers: &[String]) -> Result<()> {
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    // Headroom above the tallest bar for the legend.
    let top = sums.iter().map(|s| s.qps_per_cpu).fold(1.0, f64::max) * 1.35;
    let groups = sizes.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Answered queries per server CPU-second (median of rounds)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..groups, 0.0..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("services in the zone")
        .y_desc("queries / CPU-second")
        // Labels fall on multiples of 0.5; only group centres (i + 0.5) get a size.
        .x_labels(sizes.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let centre = (x - x.floor() - 0.5).abs() < 1e-6;
            sizes
                .get(*x as usize)
                .filter(|_| centre)
                .map_or_else(String::new, |s| s.to_string())
        })
        .y_label_formatter(&|y| format!("{:.0}k", y / 1000.0))
        .draw()
        .map_err(err)?;
    let width = 0.8 / servers.len().max(1) as f64;
    for (k, server) in servers.iter().enumerate() {
        let c = colour(server);
        let rects: Vec<_> = sums
            .iter()
            .filter(|s| &s.server == server)
            .filter_map(|s| {
                let g = sizes.iter().position(|&z| z == s.services)? as f64;
                let x0 = g + 0.1 + k as f64 * width;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.9, s.qps_per_cpu)],
                    c.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(rects)
            .map_err(err)?
            .label(server.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], c.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// A per-server figure drawn against zone size.
struct Metric {
    /// Output file name.
    file: &'static str,
    /// Chart caption.
    title: &'static str,
    /// Y axis label.
    axis: &'static str,
    /// The figure of one summary.
    of: fn(&Summary) -> f64,
}

/// One line per server: a median figure against the number of services (log x axis).
fn against_size(
    path: &Path,
    m: &Metric,
    sums: &[Summary],
    sizes: &[u64],
    servers: &[String],
) -> Result<()> {
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let top = sums.iter().map(m.of).fold(1.0, f64::max) * 1.3;
    let lo = *sizes.first().unwrap_or(&1) as f64 / 1.5;
    let hi = *sizes.last().unwrap_or(&10) as f64 * 1.5;
    let mut chart = ChartBuilder::on(&root)
        .caption(m.title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("services in the zone")
        .y_desc(m.axis)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{:.0}k", y / 1000.0))
        .draw()
        .map_err(err)?;
    for server in servers {
        let c = colour(server);
        let pts: Vec<(f64, f64)> = sums
            .iter()
            .filter(|s| &s.server == server)
            .map(|s| (s.services as f64, (m.of)(s)))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(err)?
            .label(server.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, c.filled())))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Empirical CDF of per-query latency at a fixed query rate, one line per server, log x axis (ms).
fn latency_cdf(path: &Path, size: u64, sums: &[&Summary]) -> Result<()> {
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let lo = sums
        .iter()
        .filter_map(|s| s.latencies.first())
        .copied()
        .fold(f64::MAX, f64::min)
        .max(1e-6)
        * 1000.0
        / 1.2;
    let hi = sums
        .iter()
        .filter_map(|s| s.latencies.last())
        .copied()
        .fold(0.0, f64::max)
        * 1000.0
        * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Latency CDF at a fixed query rate, {size} services (dnsperf -v per-query times)"
            ),
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((lo..hi.max(lo * 2.0)).log_scale(), 0.0..1.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("latency, ms (log)")
        .y_desc("fraction of queries")
        .x_label_formatter(&|x| format!("{x:.3}"))
        .draw()
        .map_err(err)?;
    for s in sums {
        let c = colour(&s.server);
        let n = s.latencies.len();
        // At most ~2000 points per line keeps the SVG small; the last point is always kept.
        let step = (n / 2000).max(1);
        let pts: Vec<(f64, f64)> = (0..n)
            .filter(|i| i % step == 0 || *i == n - 1)
            .map(|i| (s.latencies[i].max(1e-6) * 1000.0, (i + 1) as f64 / n as f64))
            .collect();
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))
            .map_err(err)?
            .label(s.server.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
