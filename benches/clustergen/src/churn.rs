//! Churn: rewrites a state file with one changed EndpointSlice at a fixed rate, for DNS-under-churn runs.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::kube;
use crate::model::{self, Kind, Params};
use crate::rng::Rng;

/// Generates the cluster of `p` (the one `gen` wrote to `out`), then `rate` times a second flips
/// one endpoint's readiness, re-renders that service's EndpointSlices and atomically replaces
/// `out/state.yaml` (write to a temporary file in the same directory, then rename).
///
/// The first endpoint of a headless service is never flipped, so its name always has records.
pub(crate) fn run(p: &Params, out: &Path, rate: u32, duration: f64) -> Result<()> {
    if rate == 0 {
        bail!("--rate must be above zero");
    }
    let mut cluster = model::generate(p);
    let mut versions = kube::Versions::new();
    let (objects, slice_ranges) = kube::objects_indexed(&cluster, &mut versions);
    let mut items = objects
        .iter()
        .map(kube::list_item)
        .collect::<Result<Vec<_>>>()?;
    drop(objects);

    // (service, endpoint) pairs that may flip.
    let candidates: Vec<(usize, usize)> = cluster
        .services
        .iter()
        .enumerate()
        .flat_map(|(si, s)| {
            let first = usize::from(matches!(s.kind, Kind::Headless));
            (first..s.endpoints.len()).map(move |ei| (si, ei))
        })
        .collect();
    if candidates.is_empty() {
        bail!("the cluster has no endpoint that may change");
    }

    let mut rng = Rng::new(p.seed ^ 0x0063_6875_726e);
    let state = out.join("state.yaml");
    let tmp = out.join(".state.yaml.churn-tmp");
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(duration);
    let mut writes = 0u64;
    let mut busy = Duration::ZERO;
    let mut next = start;
    while Instant::now() < end {
        let now = Instant::now();
        if now < next {
            std::thread::sleep(next - now);
        }
        next += interval;
        let t0 = Instant::now();
        let &(si, ei) = rng.pick(&candidates);
        let s = &mut cluster.services[si];
        s.endpoints[ei].ready = !s.endpoints[ei].ready;
        let s = &cluster.services[si];
        for (slot, v) in
            slice_ranges[si]
                .clone()
                .zip(kube::endpoint_slices(s, &cluster.nodes, &mut versions))
        {
            items[slot] = kube::list_item(&v)?;
        }
        let mut w = BufWriter::with_capacity(
            1 << 20,
            File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
        );
        kube::write_list(&mut w, items.iter().map(String::as_str))?;
        w.flush()?;
        drop(w);
        fs::rename(&tmp, &state)
            .with_context(|| format!("renaming {} to {}", tmp.display(), state.display()))?;
        writes += 1;
        busy += t0.elapsed();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "churn: {writes} state changes in {secs:.1} s ({:.1}/s, asked {rate}/s), {:.2} ms per rewrite",
        writes as f64 / secs,
        busy.as_secs_f64() * 1000.0 / writes.max(1) as f64
    );
    Ok(())
}
