//! Reads a benchmark results directory (runs.csv, lat-*.txt) and summarises it per size and server.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::json;

/// The server waypost is compared against the others with.
pub(crate) const WAYPOST: &str = "waypost";

/// One measured dnsperf run, one line of runs.csv.
#[derive(Clone, Debug)]
pub(crate) struct Run {
    /// Services in the generated cluster (the zone size).
    pub(crate) services: u64,
    /// Server name: waypost, knot, nsd, unbound, waypost-churn.
    pub(crate) server: String,
    /// Queries dnsperf got answers for.
    pub(crate) completed: f64,
    /// Queries dnsperf gave up on.
    pub(crate) lost: f64,
    /// Answered queries per second, as dnsperf reports.
    pub(crate) qps: f64,
    /// Mean latency in seconds, as dnsperf reports.
    pub(crate) avg_latency: f64,
    /// Server user+system CPU seconds during the run.
    pub(crate) cpu: f64,
    /// Wall-clock length of the run in seconds.
    pub(crate) duration: f64,
    /// Server resident set after the run (summed over its processes), KiB.
    pub(crate) rss_kb: f64,
    /// Server proportional set size after the run (shared pages split between processes), KiB.
    pub(crate) pss_kb: f64,
    /// dnsperf's response-code counts, `NOERROR=…;NXDOMAIN=…`.
    pub(crate) rcodes: String,
}

/// Medians over the repeated runs of one server at one size, plus its latency distribution.
#[derive(Clone, Debug)]
pub(crate) struct Summary {
    /// Zone size in services.
    pub(crate) services: u64,
    /// Server name.
    pub(crate) server: String,
    /// Number of runs behind the medians.
    pub(crate) runs: usize,
    /// Median answered queries per second.
    pub(crate) qps: f64,
    /// Median answered queries per server CPU-second.
    pub(crate) qps_per_cpu: f64,
    /// Median share of one core the server used.
    pub(crate) cpu_util: f64,
    /// Median mean latency at saturation, seconds.
    pub(crate) avg_latency: f64,
    /// Median lost queries per run.
    pub(crate) lost: f64,
    /// Median RSS, KiB.
    pub(crate) rss_kb: f64,
    /// Median PSS, KiB.
    pub(crate) pss_kb: f64,
    /// Response codes of the first run, to see that servers answered alike.
    pub(crate) rcodes: String,
    /// Sorted per-query latencies (seconds) of the fixed-rate latency run, if there was one.
    pub(crate) latencies: Vec<f64>,
}

impl Summary {
    /// The `q`-quantile (0..=1) of the fixed-rate latencies, seconds.
    pub(crate) fn percentile(&self, q: f64) -> Option<f64> {
        if self.latencies.is_empty() {
            return None;
        }
        let i =
            ((self.latencies.len() as f64 * q).ceil() as usize).clamp(1, self.latencies.len()) - 1;
        Some(self.latencies[i])
    }
}

/// Median of a non-empty list.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Parses runs.csv (header line first; columns by name).
pub(crate) fn read_runs(dir: &Path) -> Result<Vec<Run>> {
    let path = dir.join("runs.csv");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .context("runs.csv is empty")?
        .split(',')
        .collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .with_context(|| format!("runs.csv has no column {name}"))
    };
    let (c_services, c_server, c_completed, c_lost, c_qps, c_lat, c_cpu, c_dur, c_rss, c_rc) = (
        col("services")?,
        col("server")?,
        col("completed")?,
        col("lost")?,
        col("qps")?,
        col("avg_latency_s")?,
        col("cpu_s")?,
        col("duration_s")?,
        col("rss_kb")?,
        col("rcodes")?,
    );
    let c_pss = header.iter().position(|h| *h == "pss_kb");
    let mut runs = Vec::new();
    for (n, line) in lines.enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != header.len() {
            bail!(
                "runs.csv line {}: {} fields, header has {}",
                n + 2,
                f.len(),
                header.len()
            );
        }
        let num = |i: usize| {
            f[i].trim()
                .parse::<f64>()
                .with_context(|| format!("runs.csv line {}: field {} {:?}", n + 2, header[i], f[i]))
        };
        runs.push(Run {
            services: num(c_services)? as u64,
            server: f[c_server].to_string(),
            completed: num(c_completed)?,
            lost: num(c_lost)?,
            qps: num(c_qps)?,
            avg_latency: num(c_lat)?,
            cpu: num(c_cpu)?,
            duration: num(c_dur)?,
            rss_kb: num(c_rss)?,
            pss_kb: match c_pss {
                Some(i) => num(i)?,
                None => num(c_rss)?,
            },
            rcodes: f[c_rc].to_string(),
        });
    }
    Ok(runs)
}

/// Per-query latencies (seconds, sorted) from a saved `dnsperf -v` output: lines `> RCODE name TYPE latency`.
pub(crate) fn read_latencies(path: &Path) -> Result<Vec<f64>> {
    let Ok(text) = fs::read_to_string(path) else {
        return Ok(Vec::new());
    };
    let mut v: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    v.sort_by(f64::total_cmp);
    Ok(v)
}

/// Server order in tables and plots: waypost first, then the peers, then variants.
pub(crate) fn server_rank(name: &str) -> (usize, String) {
    let rank = ["waypost", "knot", "nsd", "unbound"]
        .iter()
        .position(|s| *s == name)
        .unwrap_or(9);
    (rank, name.to_string())
}

/// Summaries of every (size, server) in the results directory, ordered by size then server.
pub(crate) fn summarise(dir: &Path) -> Result<Vec<Summary>> {
    let runs = read_runs(dir)?;
    let mut groups: BTreeMap<(u64, (usize, String)), Vec<Run>> = BTreeMap::new();
    for r in runs {
        groups
            .entry((r.services, server_rank(&r.server)))
            .or_default()
            .push(r);
    }
    let mut out = Vec::new();
    for ((services, (_, server)), runs) in groups {
        let latencies = read_latencies(&dir.join(format!("lat-{services}-{server}.txt")))?;
        out.push(Summary {
            services,
            runs: runs.len(),
            qps: median(runs.iter().map(|r| r.qps).collect()),
            qps_per_cpu: median(runs.iter().map(|r| r.completed / r.cpu.max(1e-9)).collect()),
            cpu_util: median(runs.iter().map(|r| r.cpu / r.duration.max(1e-9)).collect()),
            avg_latency: median(runs.iter().map(|r| r.avg_latency).collect()),
            lost: median(runs.iter().map(|r| r.lost).collect()),
            rss_kb: median(runs.iter().map(|r| r.rss_kb).collect()),
            pss_kb: median(runs.iter().map(|r| r.pss_kb).collect()),
            rcodes: runs[0].rcodes.clone(),
            server,
            latencies,
        });
    }
    Ok(out)
}

/// Formats seconds as milliseconds, or `-`.
fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |s| format!("{:.3}", s * 1000.0))
}

/// The `report` command: writes summary.csv and summary.json and prints a markdown table.
pub(crate) fn report(dir: &Path) -> Result<()> {
    let sums = summarise(dir)?;
    let waypost_qpc = |services: u64| {
        sums.iter()
            .find(|s| s.services == services && s.server == WAYPOST)
            .map(|s| s.qps_per_cpu)
    };
    let mut csv = String::from(
        "services,server,runs,qps,qps_per_cpu_s,cpu_util,avg_latency_ms,p50_ms,p99_ms,p999_ms,lost,rss_mib,pss_mib,waypost_ratio_qps_per_cpu,rcodes\n",
    );
    let mut json_rows = Vec::new();
    println!(
        "| services | server | QPS | server CPU | queries/CPU-s | avg lat ms (sat.) | p50 ms | p99 ms | lost | RSS MiB | PSS MiB | waypost ÷ server (q/CPU-s) |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in &sums {
        let ratio = waypost_qpc(s.services).map(|w| w / s.qps_per_cpu);
        let ratio_s = ratio.map_or_else(|| "-".into(), |r| format!("{r:.2}"));
        let (p50, p99, p999) = (s.percentile(0.5), s.percentile(0.99), s.percentile(0.999));
        println!(
            "| {} | {} | {:.0} | {:.0}% | {:.0} | {:.3} | {} | {} | {:.0} | {:.1} | {:.1} | {} |",
            s.services,
            s.server,
            s.qps,
            s.cpu_util * 100.0,
            s.qps_per_cpu,
            s.avg_latency * 1000.0,
            ms(p50),
            ms(p99),
            s.lost,
            s.rss_kb / 1024.0,
            s.pss_kb / 1024.0,
            ratio_s
        );
        csv.push_str(&format!(
            "{},{},{},{:.1},{:.1},{:.4},{:.4},{},{},{},{},{:.2},{:.2},{},{}\n",
            s.services,
            s.server,
            s.runs,
            s.qps,
            s.qps_per_cpu,
            s.cpu_util,
            s.avg_latency * 1000.0,
            ms(p50),
            ms(p99),
            ms(p999),
            s.lost,
            s.rss_kb / 1024.0,
            s.pss_kb / 1024.0,
            ratio_s,
            s.rcodes
        ));
        json_rows.push(json!({
            "services": s.services,
            "server": s.server,
            "runs": s.runs,
            "qps": s.qps,
            "qps_per_cpu_s": s.qps_per_cpu,
            "cpu_util": s.cpu_util,
            "avg_latency_ms": s.avg_latency * 1000.0,
            "p50_ms": p50.map(|v| v * 1000.0),
            "p99_ms": p99.map(|v| v * 1000.0),
            "p999_ms": p999.map(|v| v * 1000.0),
            "latency_samples": s.latencies.len(),
            "lost": s.lost,
            "rss_mib": s.rss_kb / 1024.0,
            "pss_mib": s.pss_kb / 1024.0,
            "waypost_ratio_qps_per_cpu": ratio,
            "rcodes": s.rcodes,
        }));
    }
    for w in rcode_warnings(&sums) {
        println!();
        println!("**WARNING** {w}");
    }
    fs::write(dir.join("summary.csv"), csv)?;
    fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(&json_rows)?,
    )?;
    Ok(())
}

/// Share of each response code in a `NOERROR=…;NXDOMAIN=…` list.
fn rcode_shares(rcodes: &str) -> BTreeMap<String, f64> {
    let counts: Vec<(String, f64)> = rcodes
        .split(';')
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse::<f64>().ok()?)))
        .collect();
    let total: f64 = counts.iter().map(|(_, v)| v).sum::<f64>().max(1.0);
    counts.into_iter().map(|(k, v)| (k, v / total)).collect()
}

/// Servers whose response-code mix differs from the first server's at the same size by more than
/// one percentage point: the same queries against the same records should give the same mix.
fn rcode_warnings(sums: &[Summary]) -> Vec<String> {
    let mut out = Vec::new();
    for b in sums {
        let Some(a) = sums.iter().find(|a| a.services == b.services) else {
            continue;
        };
        // Variants such as waypost-churn change the records under load, so their mix differs.
        if a.server == b.server || b.server.contains('-') {
            continue;
        }
        let (sa, sb) = (rcode_shares(&a.rcodes), rcode_shares(&b.rcodes));
        let keys: BTreeSet<&String> = sa.keys().chain(sb.keys()).collect();
        let share = |m: &BTreeMap<String, f64>, k: &String| m.get(k).copied().unwrap_or(0.0);
        if keys
            .iter()
            .any(|k| (share(&sa, k) - share(&sb, k)).abs() > 0.01)
        {
            out.push(format!(
                "{} services: {} answered {} but {} answered {}",
                b.services, a.server, a.rcodes, b.server, b.rcodes
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rcode_shares_are_fractions_of_the_total() {
        let s = rcode_shares("NOERROR=80;NXDOMAIN=20");
        assert_eq!(s["NOERROR"], 0.8);
        assert_eq!(s["NXDOMAIN"], 0.2);
    }

    #[test]
    fn median_of_even_count_averages_the_middle_two() {
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![5.0, 1.0, 3.0]), 3.0);
    }

    #[test]
    fn latencies_come_from_dnsperf_verbose_lines() {
        let dir = std::env::temp_dir().join(format!("clustergen-lat-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("lat.txt");
        fs::write(&f, "[Status] x\n> NOERROR a.svc.cluster.local A 0.000362\n> NXDOMAIN x.cluster.local A 0.000058\n").unwrap();
        assert_eq!(read_latencies(&f).unwrap(), vec![0.000058, 0.000362]);
        fs::remove_dir_all(dir).unwrap();
    }
}
