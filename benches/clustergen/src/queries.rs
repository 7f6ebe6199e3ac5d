//! dnsperf query files with a cluster-like mix of hits, NODATA, SRV and search-path misses.

use std::io::Write;

use anyhow::{Result, bail};

use crate::model::{Cluster, Kind};
use crate::rng::Rng;

/// Percent of A queries for names that exist (service and endpoint names).
const A_HIT_PERCENT: usize = 60;
/// Percent of AAAA queries for IPv4-only services (NODATA).
const AAAA_NODATA_PERCENT: usize = 10;
/// Percent of SRV queries for `_port._proto` names that exist.
const SRV_PERCENT: usize = 10;

/// `count` query lines (`name TYPE`) in shuffled order:
/// 60% A hits, 10% AAAA NODATA, 10% SRV hits, 20% ndots search-path misses (NXDOMAIN).
pub(crate) fn queries(c: &Cluster, count: usize, rng: &mut Rng) -> Result<Vec<String>> {
    let zone = &c.zone;
    let mut service_names = Vec::new();
    let mut endpoint_names = Vec::new();
    let mut v4_only = Vec::new();
    let mut srv_names = Vec::new();
    for s in &c.services {
        let fqdn = s.fqdn(zone);
        match &s.kind {
            Kind::ExternalName(_) => continue,
            Kind::ClusterIp { v6, .. } => {
                if v6.is_none() {
                    v4_only.push(fqdn.clone());
                }
            }
            Kind::Headless => {
                for e in s.endpoints.iter().filter(|e| e.ready) {
                    endpoint_names.push(format!("{}.{fqdn}", e.dns_label()));
                }
            }
        }
        for p in s.ports.iter().filter(|p| !p.name.is_empty()) {
            srv_names.push(format!(
                "_{}._{}.{fqdn}",
                p.name,
                p.protocol.to_ascii_lowercase()
            ));
        }
        service_names.push((s.name.clone(), s.namespace.clone(), fqdn));
    }
    if service_names.is_empty() || v4_only.is_empty() || srv_names.is_empty() {
        bail!("the cluster is too small for the query mix: use more services");
    }
    let a = count * A_HIT_PERCENT / 100;
    let aaaa = count * AAAA_NODATA_PERCENT / 100;
    let srv = count * SRV_PERCENT / 100;
    let miss = count - a - aaaa - srv;
    let mut out = Vec::with_capacity(count);
    for _ in 0..a {
        // Three in four A lookups are for services, the rest for headless endpoint names.
        if endpoint_names.is_empty() || rng.below(4) != 0 {
            out.push(format!("{} A", rng.pick(&service_names).2));
        } else {
            out.push(format!("{} A", rng.pick(&endpoint_names)));
        }
    }
    for _ in 0..aaaa {
        out.push(format!("{} AAAA", rng.pick(&v4_only)));
    }
    for _ in 0..srv {
        out.push(format!("{} SRV", rng.pick(&srv_names)));
    }
    for _ in 0..miss {
        let (name, ns, fqdn) = rng.pick(&service_names).clone();
        // The namespace of the pod asking: its search list is <podns>.svc.<zone> svc.<zone> <zone>.
        let pod_ns = rng.pick(&c.namespaces).clone();
        let q = match rng.below(4) {
            // "svc.ns.svc.cluster.local" has 4 dots < ndots:5, so the first search domain is tried first.
            0 => format!("{fqdn}.{pod_ns}.svc.{zone}"),
            1 => format!("{fqdn}.svc.{zone}"),
            2 => format!("{fqdn}.{zone}"),
            // "svc.ns" tried in the asking pod's namespace first.
            _ => {
                let other = if pod_ns == ns {
                    format!("{pod_ns}-x")
                } else {
                    pod_ns
                };
                format!("{name}.{ns}.{other}.svc.{zone}")
            }
        };
        let qtype = if rng.below(4) == 0 { "AAAA" } else { "A" };
        out.push(format!("{q} {qtype}"));
    }
    rng.shuffle(&mut out);
    Ok(out)
}

/// Writes one query per line.
pub(crate) fn write_queries(w: &mut impl Write, lines: &[String]) -> Result<()> {
    for l in lines {
        writeln!(w, "{l}")?;
    }
    Ok(())
}
