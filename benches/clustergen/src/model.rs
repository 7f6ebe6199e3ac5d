//! The generated cluster as plain data: namespaces, services, their endpoints and pods, and nodes.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::rng::Rng;

/// Characters Kubernetes uses for generated name suffixes (no vowels, no look-alikes).
pub(crate) const SUFFIX_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// An inclusive count range given on the command line as `N` or `A-B`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CountRange {
    /// Smallest count drawn.
    pub(crate) lo: usize,
    /// Largest count drawn.
    pub(crate) hi: usize,
}

impl std::str::FromStr for CountRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |t: &str| t.trim().parse::<usize>().map_err(|e| format!("{t:?}: {e}"));
        let (lo, hi) = match s.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => (parse(s)?, parse(s)?),
        };
        if lo > hi {
            return Err(format!("range {s:?} has its low end above its high end"));
        }
        Ok(Self { lo, hi })
    }
}

/// What to generate; mirrors the command-line flags.
#[derive(Clone, Debug)]
pub(crate) struct Params {
    /// Number of Services.
    pub(crate) services: usize,
    /// Seed for every random choice.
    pub(crate) seed: u64,
    /// Cluster domain, e.g. `cluster.local`.
    pub(crate) zone: String,
    /// Services per namespace (namespaces = ceil(services / this)).
    pub(crate) services_per_namespace: usize,
    /// Share of services that are headless, in percent.
    pub(crate) headless_percent: u32,
    /// Share of services that are ExternalName, in percent.
    pub(crate) external_percent: u32,
    /// Share of ClusterIP services that are dual-stack, in percent.
    pub(crate) dual_stack_percent: u32,
    /// Endpoints behind each ClusterIP service.
    pub(crate) endpoints_per_clusterip: CountRange,
    /// Endpoints behind each headless service.
    pub(crate) endpoints_per_headless: CountRange,
    /// Share of endpoints that are not ready, in percent.
    pub(crate) not_ready_percent: u32,
    /// Pods that back no service (jobs, daemons), to scale the pod count alone.
    pub(crate) extra_pods: usize,
    /// Number of Nodes.
    pub(crate) nodes: usize,
}

/// One service port; `target` is the port the pods listen on and what EndpointSlices carry.
#[derive(Clone, Debug)]
pub(crate) struct Port {
    /// Port name; empty for the unnamed port of a single-port service (no SRV record then).
    pub(crate) name: &'static str,
    /// `TCP` or `UDP`, as Kubernetes spells it.
    pub(crate) protocol: &'static str,
    /// The service port (what ClusterIP SRV records carry).
    pub(crate) port: u16,
    /// The endpoint port (what headless SRV records carry, as in CoreDNS).
    pub(crate) target: u16,
}

/// The ports services draw from.
const PORT_CATALOG: &[Port] = &[
    Port {
        name: "http",
        protocol: "TCP",
        port: 80,
        target: 8080,
    },
    Port {
        name: "https",
        protocol: "TCP",
        port: 443,
        target: 8443,
    },
    Port {
        name: "grpc",
        protocol: "TCP",
        port: 9090,
        target: 9090,
    },
    Port {
        name: "metrics",
        protocol: "TCP",
        port: 9100,
        target: 9100,
    },
    Port {
        name: "dns",
        protocol: "UDP",
        port: 53,
        target: 5353,
    },
    Port {
        name: "dns-tcp",
        protocol: "TCP",
        port: 53,
        target: 5353,
    },
];

/// How a service is reached, which decides its DNS records.
#[derive(Clone, Debug)]
pub(crate) enum Kind {
    /// A virtual IP, optionally dual-stack.
    ClusterIp {
        /// The IPv4 cluster IP (first in `clusterIPs`).
        v4: Ipv4Addr,
        /// The IPv6 cluster IP of a dual-stack service.
        v6: Option<Ipv6Addr>,
    },
    /// `clusterIP: None`: DNS answers with the ready endpoints themselves.
    Headless,
    /// A CNAME to this name.
    ExternalName(String),
}

/// One backend of a service; each has its own pod.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    /// The pod IP.
    pub(crate) ip: Ipv4Addr,
    /// Set for StatefulSet-style pods; names the endpoint's DNS record instead of the dashed IP.
    pub(crate) hostname: Option<String>,
    /// Only ready endpoints get DNS records.
    pub(crate) ready: bool,
    /// Name of the backing pod.
    pub(crate) pod: String,
    /// UID of the backing pod, for `targetRef`.
    pub(crate) pod_uid: String,
    /// Index into [`Cluster::nodes`].
    pub(crate) node: usize,
}

impl Endpoint {
    /// The first label of this endpoint's DNS name: hostname, or the IP with dots as dashes.
    pub(crate) fn dns_label(&self) -> String {
        match &self.hostname {
            Some(h) => h.clone(),
            None => self.ip.to_string().replace('.', "-"),
        }
    }
}

/// A Service with its endpoints.
#[derive(Clone, Debug)]
pub(crate) struct Service {
    /// Service name.
    pub(crate) name: String,
    /// Namespace name.
    pub(crate) namespace: String,
    /// Service UID, for EndpointSlice owner references.
    pub(crate) uid: String,
    /// ClusterIP, headless or ExternalName.
    pub(crate) kind: Kind,
    /// Service ports (none for ExternalName).
    pub(crate) ports: Vec<Port>,
    /// Backends, in EndpointSlice order.
    pub(crate) endpoints: Vec<Endpoint>,
    /// Random suffix of the EndpointSlice names, fixed per service.
    pub(crate) slice_suffix: String,
}

impl Service {
    /// The service's fully qualified name without the trailing dot.
    pub(crate) fn fqdn(&self, zone: &str) -> String {
        format!("{}.{}.svc.{zone}", self.name, self.namespace)
    }
}

/// A node the pods run on.
#[derive(Clone, Debug)]
pub(crate) struct Node {
    /// Node name (also its `kubernetes.io/hostname` label).
    pub(crate) name: String,
    /// InternalIP address.
    pub(crate) ip: Ipv4Addr,
    /// Node UID.
    pub(crate) uid: String,
}

/// A pod that backs no service.
#[derive(Clone, Debug)]
pub(crate) struct LonePod {
    /// Pod name.
    pub(crate) name: String,
    /// Namespace name.
    pub(crate) namespace: String,
    /// Pod UID.
    pub(crate) uid: String,
    /// Pod IP.
    pub(crate) ip: Ipv4Addr,
    /// Index into [`Cluster::nodes`].
    pub(crate) node: usize,
}

/// A whole generated cluster.
#[derive(Clone, Debug)]
pub(crate) struct Cluster {
    /// Cluster domain.
    pub(crate) zone: String,
    /// Namespace names.
    pub(crate) namespaces: Vec<String>,
    /// Services with their endpoints.
    pub(crate) services: Vec<Service>,
    /// Nodes.
    pub(crate) nodes: Vec<Node>,
    /// Pods outside any service.
    pub(crate) lone_pods: Vec<LonePod>,
}

/// First address of the service CIDR 10.96.0.0/12.
const SERVICE_CIDR_V4: u32 = 0x0a60_0000;
/// Size of the service CIDR (2^20 addresses).
const SERVICE_CIDR_SIZE: u32 = 1 << 20;
/// First address of the pod CIDR 10.128.0.0/10.
const POD_CIDR_V4: u32 = 0x0a80_0000;
/// The cluster IP of the cluster DNS service; also the zone's `ns.dns` address.
pub(crate) const DNS_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// Hands out distinct, scattered service IPs: an odd multiplier is a bijection modulo 2^20.
struct ServiceIps {
    /// Next index to map.
    next: u32,
    /// Random offset so different seeds give different addresses.
    offset: u32,
}

impl ServiceIps {
    /// Next offset inside the service CIDR, skipping .0, .1 (kubernetes), .10 (kube-dns) and the last.
    fn next_offset(&mut self) -> u32 {
        loop {
            let i = self.next;
            self.next += 1;
            let o = (i.wrapping_mul(0x09e3_77b1).wrapping_add(self.offset)) % SERVICE_CIDR_SIZE;
            if !matches!(o, 0 | 1 | 10) && o != SERVICE_CIDR_SIZE - 1 {
                return o;
            }
        }
    }
}

/// Builds the cluster described by `p`.
pub(crate) fn generate(p: &Params) -> Cluster {
    let mut rng = Rng::new(p.seed);
    let n_ns = p.services.div_ceil(p.services_per_namespace.max(1)).max(1);
    let namespaces: Vec<String> = (0..n_ns).map(|i| format!("ns-{i}")).collect();
    let nodes: Vec<Node> = (0..p.nodes.max(1))
        .map(|i| Node {
            name: format!("node-{i}"),
            ip: Ipv4Addr::from(0xac12_0002 + i as u32),
            uid: rng.uid(),
        })
        .collect();
    let mut ips = ServiceIps {
        next: 0,
        offset: rng.below(SERVICE_CIDR_SIZE as usize) as u32,
    };
    let mut next_pod_ip = POD_CIDR_V4 + 2;
    let mut pod_ip = || {
        let ip = Ipv4Addr::from(next_pod_ip);
        next_pod_ip += 1;
        ip
    };
    let mut services = Vec::with_capacity(p.services);
    for i in 0..p.services {
        let name = format!("svc-{i}");
        let namespace = namespaces[i % n_ns].clone();
        let roll = rng.below(100) as u32;
        let kind = if roll < p.external_percent {
            // Half point at another in-cluster service (CNAME chased inside the zone), half outside.
            let target = (i > 0 && rng.percent(50))
                .then(|| &services[rng.below(i)])
                .filter(|t: &&Service| matches!(t.kind, Kind::ClusterIp { .. }));
            match target {
                Some(t) => Kind::ExternalName(t.fqdn(&p.zone)),
                None => Kind::ExternalName(format!("db-{i}.example.com")),
            }
        } else if roll < p.external_percent + p.headless_percent {
            Kind::Headless
        } else {
            let o = ips.next_offset();
            let v6 = rng
                .percent(p.dual_stack_percent)
                .then(|| Ipv6Addr::from((0xfd00_0010_0096_0000_u128 << 64) | u128::from(o)));
            Kind::ClusterIp {
                v4: Ipv4Addr::from(SERVICE_CIDR_V4 + o),
                v6,
            }
        };
        let ports = match kind {
            Kind::ExternalName(_) => Vec::new(),
            _ => {
                let mut catalog: Vec<Port> = PORT_CATALOG.to_vec();
                rng.shuffle(&mut catalog);
                let mut ports: Vec<Port> = catalog.into_iter().take(rng.between(1, 3)).collect();
                if ports.len() == 1 && rng.percent(5) {
                    ports[0].name = "";
                }
                ports
            }
        };
        let count = match kind {
            Kind::ExternalName(_) => 0,
            Kind::Headless => rng.between(p.endpoints_per_headless.lo, p.endpoints_per_headless.hi),
            Kind::ClusterIp { .. } => {
                rng.between(p.endpoints_per_clusterip.lo, p.endpoints_per_clusterip.hi)
            }
        };
        let stateful = matches!(kind, Kind::Headless) && rng.percent(50);
        let rs_hash = rng.word(SUFFIX_ALPHABET, 10);
        let mut endpoints = Vec::with_capacity(count);
        for k in 0..count {
            let (pod, hostname) = if stateful {
                (format!("{name}-{k}"), Some(format!("{name}-{k}")))
            } else {
                (
                    format!("{name}-{rs_hash}-{}", rng.word(SUFFIX_ALPHABET, 5)),
                    None,
                )
            };
            // The first endpoint is always ready so every headless name has records.
            let ready = k == 0 || !rng.percent(p.not_ready_percent);
            endpoints.push(Endpoint {
                ip: pod_ip(),
                hostname,
                ready,
                pod,
                pod_uid: rng.uid(),
                node: rng.below(nodes.len()),
            });
        }
        services.push(Service {
            name,
            namespace,
            uid: rng.uid(),
            kind,
            ports,
            endpoints,
            slice_suffix: rng.word(SUFFIX_ALPHABET, 5),
        });
    }
    let lone_pods = (0..p.extra_pods)
        .map(|i| LonePod {
            name: format!("job-{i}-{}", rng.word(SUFFIX_ALPHABET, 5)),
            namespace: rng.pick(&namespaces).clone(),
            uid: rng.uid(),
            ip: pod_ip(),
            node: rng.below(nodes.len()),
        })
        .collect();
    Cluster {
        zone: p.zone.clone(),
        namespaces,
        services,
        nodes,
        lone_pods,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(services: usize) -> Params {
        Params {
            services,
            seed: 1,
            zone: "cluster.local".into(),
            services_per_namespace: 50,
            headless_percent: 10,
            external_percent: 5,
            dual_stack_percent: 20,
            endpoints_per_clusterip: CountRange { lo: 1, hi: 1 },
            endpoints_per_headless: CountRange { lo: 3, hi: 10 },
            not_ready_percent: 5,
            extra_pods: 0,
            nodes: 3,
        }
    }

    #[test]
    fn cluster_ips_are_distinct_and_inside_the_service_cidr() {
        let c = generate(&params(5000));
        let mut seen = std::collections::HashSet::new();
        for s in &c.services {
            if let Kind::ClusterIp { v4, .. } = s.kind {
                let o = u32::from(v4) - SERVICE_CIDR_V4;
                assert!(o < SERVICE_CIDR_SIZE);
                assert!(seen.insert(v4), "{v4} given twice");
                assert_ne!(v4, DNS_SERVICE_IP);
            }
        }
    }

    #[test]
    fn every_headless_service_has_a_ready_endpoint() {
        let c = generate(&params(2000));
        for s in c
            .services
            .iter()
            .filter(|s| matches!(s.kind, Kind::Headless))
        {
            assert!(s.endpoints.iter().any(|e| e.ready), "{}", s.name);
        }
    }

    #[test]
    fn count_range_parses_single_numbers_and_ranges() {
        let r: CountRange = "3-10".parse().unwrap();
        assert_eq!((r.lo, r.hi), (3, 10));
        let r: CountRange = "4".parse().unwrap();
        assert_eq!((r.lo, r.hi), (4, 4));
        assert!("9-2".parse::<CountRange>().is_err());
    }
}
