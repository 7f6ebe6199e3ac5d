//! Prometheus metrics for the DNS server, named like CoreDNS's so existing dashboards keep working.
//!
//! Every series that a query can touch lives in a fixed-shape array of atomics chosen when the
//! [`Metrics`] value is built: a zone index, a protocol, an address family, one of a small fixed
//! set of query types (anything else counts as `"other"`), one of the eleven named rcodes (or
//! `"other"`). A per-query increment is therefore one or two relaxed atomic adds — no allocation,
//! no map lookup, no lock. The only lock guards the list of upstreams, which is written when an
//! [`crate::upstream::Upstreams`] is built and read by [`Metrics::render`]; the forwarding hot
//! path holds an `Arc<UpstreamMetrics>` and never touches it.
//!
//! Names and labels follow CoreDNS (`coredns_dns_*`, `coredns_cache_*`, `coredns_forward_*`) where
//! the meaning is the same; CoreDNS's `view` label is left out because waypost has no views.
//! waypost's own series are prefixed `waypost_`.
//!
//! [`serve_http`] is a deliberately tiny HTTP/1.1 responder (GET only, `Connection: close`) for
//! `/metrics`, `/healthz` and `/readyz`, so the DNS crate does not pull in an HTTP stack.

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::RwLock;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Errors of the metrics HTTP endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Accepting a connection on the metrics listener failed in a way that is not per-connection
    /// (e.g. the listener was closed); the endpoint stops.
    #[error("metrics listener failed to accept")]
    Accept(#[source] std::io::Error),
}

impl MetricsError {
    /// True when the listener itself failed (as opposed to a single connection).
    pub fn is_accept(&self) -> bool {
        matches!(self, MetricsError::Accept(_))
    }
}

/// Histogram bucket upper bounds (seconds) for DNS request and forward durations: CoreDNS uses
/// exponential buckets 0.25ms·2ⁿ, n = 0..16, so the same `le` values show up on dashboards.
pub const DURATION_BUCKETS: [f64; 16] =
    [0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096, 8.192];

/// Histogram bucket upper bounds (seconds) for `waypost_programming_latency_seconds`: a watch event
/// normally becomes visible in milliseconds, but a relist after an apiserver outage can take tens
/// of seconds, so the range is wider than for queries.
pub const PROGRAMMING_BUCKETS: [f64; 15] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Query types with a series of their own (CoreDNS's monitored set plus SVCB/HTTPS); every other
/// type is counted as `"other"`, which keeps the label set fixed.
const QTYPES: [(u16, &str); 20] = [
    (1, "A"),
    (2, "NS"),
    (5, "CNAME"),
    (6, "SOA"),
    (12, "PTR"),
    (15, "MX"),
    (16, "TXT"),
    (28, "AAAA"),
    (33, "SRV"),
    (35, "NAPTR"),
    (43, "DS"),
    (46, "RRSIG"),
    (47, "NSEC"),
    (48, "DNSKEY"),
    (50, "NSEC3"),
    (64, "SVCB"),
    (65, "HTTPS"),
    (251, "IXFR"),
    (252, "AXFR"),
    (255, "ANY"),
];
/// Number of query-type slots: the named ones plus `"other"`.
const NQTYPE: usize = QTYPES.len() + 1;

/// Rcode label values as CoreDNS prints them; rcodes above 10 (only reachable with EDNS extended
/// rcodes) share `"other"`.
const RCODES: [&str; 11] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN", "YXRRSET", "NXRRSET", "NOTAUTH",
    "NOTZONE",
];
/// Number of rcode slots: the named ones plus `"other"`.
const NRCODE: usize = RCODES.len() + 1;

/// Slot of a query type in the fixed arrays.
fn qtype_index(qtype: u16) -> usize {
    QTYPES.iter().position(|&(t, _)| t == qtype).unwrap_or(QTYPES.len())
}

/// Label value of a query-type slot.
fn qtype_name(i: usize) -> &'static str {
    QTYPES.get(i).map_or("other", |&(_, n)| n)
}

/// Slot of an rcode in the fixed arrays.
fn rcode_index(rcode: u16) -> usize {
    (rcode as usize).min(RCODES.len())
}

/// Label value of an rcode slot.
fn rcode_name(i: usize) -> &'static str {
    RCODES.get(i).copied().unwrap_or("other")
}

/// Transport a query arrived on (`proto` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// Plain DNS over UDP.
    Udp,
    /// DNS over TCP (RFC 7766).
    Tcp,
}

impl Proto {
    const ALL: [Proto; 2] = [Proto::Udp, Proto::Tcp];
    fn label(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        }
    }
}

/// Address family of the client (`family` label, `"1"` or `"2"` as in CoreDNS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4 client.
    V4,
    /// IPv6 client.
    V6,
}

impl Family {
    const ALL: [Family; 2] = [Family::V4, Family::V6];
    /// The family of a client address.
    pub fn of(addr: &SocketAddr) -> Family {
        match addr {
            SocketAddr::V4(_) => Family::V4,
            SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some() => Family::V4,
            SocketAddr::V6(_) => Family::V6,
        }
    }
    fn label(self) -> &'static str {
        match self {
            Family::V4 => "1",
            Family::V6 => "2",
        }
    }
}

/// What produced a response (`plugin` label of `coredns_dns_responses_total`), named after the
/// CoreDNS plugin that would have done the same job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Responder {
    /// The cluster-zone index (CoreDNS `kubernetes`).
    Kubernetes,
    /// The forward cache (CoreDNS `cache`).
    Cache,
    /// An upstream resolver (CoreDNS `forward`).
    Forward,
    /// The server itself (errors, REFUSED on overload, ...): empty label as in CoreDNS.
    Server,
}

impl Responder {
    const ALL: [Responder; 4] = [Responder::Kubernetes, Responder::Cache, Responder::Forward, Responder::Server];
    fn label(self) -> &'static str {
        match self {
            Responder::Kubernetes => "kubernetes",
            Responder::Cache => "cache",
            Responder::Forward => "forward",
            Responder::Server => "",
        }
    }
}

/// Kind of a cached answer (`type` label of the `coredns_cache_*` series).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    /// A positive answer (NOERROR with records).
    Success,
    /// NXDOMAIN or NODATA (RFC 2308 negative answer).
    Denial,
}

impl CacheKind {
    const ALL: [CacheKind; 2] = [CacheKind::Success, CacheKind::Denial];
    fn label(self) -> &'static str {
        match self {
            CacheKind::Success => "success",
            CacheKind::Denial => "denial",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

// === impl Histogram ===

/// A lock-free fixed-bucket histogram.
struct Histogram {
    /// Upper bounds in seconds, shared by every histogram of one metric.
    bounds: &'static [f64],
    /// Non-cumulative counts per bucket; the last slot is `+Inf`. Cumulated at render time so an
    /// observation touches one counter only.
    counts: Box<[AtomicU64]>,
    /// Sum of observations in nanoseconds: integer adds stay lock-free and exact.
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.iter().position(|&b| secs <= b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Writes the `_bucket`/`_sum`/`_count` lines; `labels` is the already-rendered label list
    /// without braces (may be empty).
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            cum += c.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(b) => format_float(*b),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cum}");
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", format_float(sum));
        let _ = writeln!(out, "{name}_count{braces} {cum}");
    }
}

/// Prometheus float formatting: shortest round-trip representation.
fn format_float(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else if v.is_nan() {
        "NaN".into()
    } else {
        format!("{v}")
    }
}

/// Escapes a label value per the exposition format (backslash, double quote, newline).
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn counters(n: usize) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

// === impl ZoneMetrics ===

/// Series of one server zone (the `zone` label).
struct ZoneMetrics {
    /// Label value, escaped once at construction.
    name: String,
    /// `coredns_dns_requests_total`, indexed `[proto][family][qtype]`.
    requests: Box<[AtomicU64]>,
    /// `coredns_dns_responses_total`, indexed `[rcode][responder]`.
    responses: Box<[AtomicU64]>,
    /// `coredns_dns_request_duration_seconds`, one histogram per qtype slot.
    duration: Box<[Histogram]>,
}

impl ZoneMetrics {
    fn new(name: &str) -> ZoneMetrics {
        ZoneMetrics {
            name: escape_label(name),
            requests: counters(2 * 2 * NQTYPE),
            responses: counters(NRCODE * Responder::ALL.len()),
            duration: (0..NQTYPE).map(|_| Histogram::new(&DURATION_BUCKETS)).collect(),
        }
    }
}

// === impl UpstreamMetrics ===

/// Series of one upstream resolver (the `to` label). Held by the forwarder so recording a
/// forwarded query is a couple of atomic adds.
pub struct UpstreamMetrics {
    /// Label value (`ip:port`, escaped).
    to: String,
    /// `coredns_forward_requests_total{to}`: every try sent to this upstream, failover included.
    requests: AtomicU64,
    /// `coredns_forward_responses_total{to,rcode}`.
    responses: Box<[AtomicU64]>,
    /// `coredns_forward_request_duration_seconds{to,rcode}`.
    duration: Box<[Histogram]>,
    /// `coredns_forward_healthcheck_failures_total{to}`.
    healthcheck_failures: AtomicU64,
}

impl std::fmt::Debug for UpstreamMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamMetrics").field("to", &self.to).finish_non_exhaustive()
    }
}

impl UpstreamMetrics {
    fn new(to: SocketAddr) -> UpstreamMetrics {
        UpstreamMetrics {
            to: escape_label(&to.to_string()),
            requests: AtomicU64::new(0),
            responses: counters(NRCODE),
            duration: (0..NRCODE).map(|_| Histogram::new(&DURATION_BUCKETS)).collect(),
            healthcheck_failures: AtomicU64::new(0),
        }
    }

    /// Counts one query sent to this upstream.
    pub fn record_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a response from this upstream and its round-trip latency.
    pub fn record_response(&self, rcode: u16, elapsed: Duration) {
        let i = rcode_index(rcode);
        self.responses[i].fetch_add(1, Ordering::Relaxed);
        self.duration[i].observe(elapsed);
    }

    /// Counts a failed health-check probe.
    pub fn record_healthcheck_failure(&self) {
        self.healthcheck_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Number of queries sent so far (for tests and debugging).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Number of responses received so far, all rcodes.
    pub fn responses(&self) -> u64 {
        self.responses.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

// === impl Metrics ===

/// All of waypost-dns's metrics. Build one, share it as `Arc<Metrics>`, render it on scrape.
pub struct Metrics {
    /// `server` label (CoreDNS prints e.g. `dns://:53`), escaped once.
    server: String,
    /// Per-zone series; callers address zones by index (see [`Metrics::zone_index`]).
    zones: Box<[ZoneMetrics]>,
    /// `coredns_cache_hits_total{type}`, indexed by [`CacheKind`].
    cache_hits: [AtomicU64; 2],
    /// `coredns_cache_misses_total`.
    cache_misses: AtomicU64,
    /// `coredns_cache_entries{type}`: a gauge the cache moves on insert/evict.
    cache_entries: [AtomicI64; 2],
    /// `coredns_cache_evictions_total{type}`: entries dropped to make room.
    cache_evictions: [AtomicU64; 2],
    /// `coredns_cache_prefetch_total`: prefetch signals handed to the server.
    cache_prefetch: AtomicU64,
    /// `coredns_cache_served_stale_total`: answers served past their TTL (RFC 8767).
    cache_served_stale: AtomicU64,
    /// Per-upstream series, registered when the forwarder is built; only `render` reads the list.
    upstreams: RwLock<Vec<Arc<UpstreamMetrics>>>,
    /// `coredns_forward_max_concurrent_rejects_total`: queries refused by the in-flight cap.
    forward_rejects: AtomicU64,
    /// `coredns_forward_healthcheck_broken_total`: times every upstream was unhealthy at once.
    healthcheck_broken: AtomicU64,
    /// `waypost_programming_latency_seconds`: watch event to snapshot visible to DNS.
    programming_latency: Histogram,
    /// `waypost_search_shortcut_hits_total`: search-path expansions answered in one round trip.
    search_shortcut_hits: AtomicU64,
    /// `waypost_ready` and `/readyz`: one flag so the gauge and the probe never disagree.
    ready: AtomicBool,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("server", &self.server).finish_non_exhaustive()
    }
}

impl Metrics {
    /// Creates the metrics for one server: `server` is the `server` label (e.g. `"dns://:53"`),
    /// `zones` the `zone` label values a caller will pass by index (e.g. `["cluster.local.", "."]`).
    /// An empty `zones` gets a single `"."` zone.
    pub fn new(server: impl Into<String>, zones: &[&str]) -> Metrics {
        let zones: Box<[ZoneMetrics]> = if zones.is_empty() {
            Box::new([ZoneMetrics::new(".")])
        } else {
            zones.iter().map(|z| ZoneMetrics::new(z)).collect()
        };
        Metrics {
            server: escape_label(&server.into()),
            zones,
            cache_hits: Default::default(),
            cache_misses: AtomicU64::new(0),
            cache_entries: Default::default(),
            cache_evictions: Default::default(),
            cache_prefetch: AtomicU64::new(0),
            cache_served_stale: AtomicU64::new(0),
            upstreams: RwLock::new(Vec::new()),
            forward_rejects: AtomicU64::new(0),
            healthcheck_broken: AtomicU64::new(0),
            programming_latency: Histogram::new(&PROGRAMMING_BUCKETS),
            search_shortcut_hits: AtomicU64::new(0),
            ready: AtomicBool::new(false),
        }
    }

    /// Index of a zone label given to [`Metrics::new`]; resolve once at startup, not per query.
    pub fn zone_index(&self, zone: &str) -> Option<usize> {
        let zone = escape_label(zone);
        self.zones.iter().position(|z| z.name == zone)
    }

    fn zone(&self, zone: usize) -> &ZoneMetrics {
        // Out-of-range indexes land in the last zone rather than panicking on the hot path.
        &self.zones[zone.min(self.zones.len() - 1)]
    }

    /// Counts an incoming query (`coredns_dns_requests_total`).
    pub fn record_request(&self, zone: usize, proto: Proto, family: Family, qtype: u16) {
        let z = self.zone(zone);
        let i = ((proto as usize) * 2 + family as usize) * NQTYPE + qtype_index(qtype);
        z.requests[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a response and its total handling time (`coredns_dns_responses_total`,
    /// `coredns_dns_request_duration_seconds`).
    pub fn record_response(&self, zone: usize, qtype: u16, rcode: u16, responder: Responder, elapsed: Duration) {
        let z = self.zone(zone);
        z.responses[rcode_index(rcode) * Responder::ALL.len() + responder as usize].fetch_add(1, Ordering::Relaxed);
        z.duration[qtype_index(qtype)].observe(elapsed);
    }

    /// Counts a cache hit of the given kind.
    pub fn cache_hit(&self, kind: CacheKind) {
        self.cache_hits[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a cache miss.
    pub fn cache_miss(&self) {
        self.cache_misses.fetch_add(1, Ordering::Relaxed);
    }

    /// Moves the cache-entries gauge of a kind by `delta`.
    pub fn cache_entries_add(&self, kind: CacheKind, delta: i64) {
        self.cache_entries[kind.index()].fetch_add(delta, Ordering::Relaxed);
    }

    /// Counts an eviction made to keep the cache within its bounds.
    pub fn cache_eviction(&self, kind: CacheKind) {
        self.cache_evictions[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a prefetch signal.
    pub fn cache_prefetch(&self) {
        self.cache_prefetch.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an answer served stale.
    pub fn cache_served_stale(&self) {
        self.cache_served_stale.fetch_add(1, Ordering::Relaxed);
    }

    /// Returns the series of upstream `to`, registering it on first use. Takes a write lock:
    /// call it when building the forwarder and keep the `Arc`.
    pub fn upstream(&self, to: SocketAddr) -> Arc<UpstreamMetrics> {
        let label = escape_label(&to.to_string());
        if let Some(u) = self.upstreams.read().iter().find(|u| u.to == label) {
            return Arc::clone(u);
        }
        let mut list = self.upstreams.write();
        if let Some(u) = list.iter().find(|u| u.to == label) {
            return Arc::clone(u);
        }
        let u = Arc::new(UpstreamMetrics::new(to));
        list.push(Arc::clone(&u));
        u
    }

    /// Counts a query refused because too many forwarded queries were in flight.
    pub fn forward_rejected(&self) {
        self.forward_rejects.fetch_add(1, Ordering::Relaxed);
    }

    /// Number of queries refused by the in-flight cap so far.
    pub fn forward_rejects(&self) -> u64 {
        self.forward_rejects.load(Ordering::Relaxed)
    }

    /// Counts a moment when every upstream was marked unhealthy.
    pub fn healthcheck_broken(&self) {
        self.healthcheck_broken.fetch_add(1, Ordering::Relaxed);
    }

    /// Records how long a watch event took to become visible to DNS.
    pub fn observe_programming_latency(&self, latency: Duration) {
        self.programming_latency.observe(latency);
    }

    /// Counts a search-path shortcut answer.
    pub fn search_shortcut_hit(&self) {
        self.search_shortcut_hits.fetch_add(1, Ordering::Relaxed);
    }

    /// Sets readiness (`waypost_ready` and `/readyz`).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Current readiness.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Cache hits so far of a kind (for tests and debugging).
    pub fn cache_hits(&self, kind: CacheKind) -> u64 {
        self.cache_hits[kind.index()].load(Ordering::Relaxed)
    }

    /// Cache misses so far.
    pub fn cache_misses(&self) -> u64 {
        self.cache_misses.load(Ordering::Relaxed)
    }

    /// Current value of the cache-entries gauge of a kind.
    pub fn cache_entries(&self, kind: CacheKind) -> i64 {
        self.cache_entries[kind.index()].load(Ordering::Relaxed)
    }

    /// Renders the Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        self.render_into(&mut out);
        out
    }

    /// Appends the Prometheus text exposition to `out`. Series that were never touched are
    /// skipped (except the unlabelled ones) to keep scrapes small, like client_golang's vectors.
    pub fn render_into(&self, out: &mut String) {
        let server = &self.server;

        header(
            out,
            "coredns_dns_requests_total",
            "counter",
            "Counter of DNS requests made per zone, protocol and family.",
        );
        for z in self.zones.iter() {
            for proto in Proto::ALL {
                for family in Family::ALL {
                    for q in 0..NQTYPE {
                        let v =
                            z.requests[((proto as usize) * 2 + family as usize) * NQTYPE + q].load(Ordering::Relaxed);
                        if v > 0 {
                            let _ = writeln!(
                                out,
                                "coredns_dns_requests_total{{server=\"{server}\",zone=\"{}\",proto=\"{}\",family=\"{}\",type=\"{}\"}} {v}",
                                z.name,
                                proto.label(),
                                family.label(),
                                qtype_name(q)
                            );
                        }
                    }
                }
            }
        }

        header(out, "coredns_dns_responses_total", "counter", "Counter of response status codes.");
        for z in self.zones.iter() {
            for r in 0..NRCODE {
                for p in Responder::ALL {
                    let v = z.responses[r * Responder::ALL.len() + p as usize].load(Ordering::Relaxed);
                    if v > 0 {
                        let _ = writeln!(
                            out,
                            "coredns_dns_responses_total{{server=\"{server}\",zone=\"{}\",rcode=\"{}\",plugin=\"{}\"}} {v}",
                            z.name,
                            rcode_name(r),
                            p.label()
                        );
                    }
                }
            }
        }

        header(
            out,
            "coredns_dns_request_duration_seconds",
            "histogram",
            "Histogram of the time (in seconds) each request took per zone.",
        );
        for z in self.zones.iter() {
            for (q, h) in z.duration.iter().enumerate() {
                if h.count() > 0 {
                    let labels = format!("server=\"{server}\",zone=\"{}\",type=\"{}\"", z.name, qtype_name(q));
                    h.render(out, "coredns_dns_request_duration_seconds", &labels);
                }
            }
        }

        header(out, "coredns_cache_entries", "gauge", "The number of elements in the cache.");
        for k in CacheKind::ALL {
            let v = self.cache_entries[k.index()].load(Ordering::Relaxed);
            let _ =
                writeln!(out, "coredns_cache_entries{{server=\"{server}\",type=\"{}\",zones=\".\"}} {v}", k.label());
        }
        header(out, "coredns_cache_hits_total", "counter", "The count of cache hits.");
        for k in CacheKind::ALL {
            let v = self.cache_hits[k.index()].load(Ordering::Relaxed);
            let _ =
                writeln!(out, "coredns_cache_hits_total{{server=\"{server}\",type=\"{}\",zones=\".\"}} {v}", k.label());
        }
        header(out, "coredns_cache_misses_total", "counter", "The count of cache misses.");
        let _ = writeln!(
            out,
            "coredns_cache_misses_total{{server=\"{server}\",zones=\".\"}} {}",
            self.cache_misses.load(Ordering::Relaxed)
        );
        header(out, "coredns_cache_evictions_total", "counter", "The count of cache evictions.");
        for k in CacheKind::ALL {
            let v = self.cache_evictions[k.index()].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "coredns_cache_evictions_total{{server=\"{server}\",type=\"{}\",zones=\".\"}} {v}",
                k.label()
            );
        }
        header(
            out,
            "coredns_cache_prefetch_total",
            "counter",
            "The number of times the cache has prefetched a cached item.",
        );
        let _ = writeln!(
            out,
            "coredns_cache_prefetch_total{{server=\"{server}\",zones=\".\"}} {}",
            self.cache_prefetch.load(Ordering::Relaxed)
        );
        header(
            out,
            "coredns_cache_served_stale_total",
            "counter",
            "The number of requests served from stale cache entries.",
        );
        let _ = writeln!(
            out,
            "coredns_cache_served_stale_total{{server=\"{server}\",zones=\".\"}} {}",
            self.cache_served_stale.load(Ordering::Relaxed)
        );

        let upstreams = self.upstreams.read().clone();
        header(out, "coredns_forward_requests_total", "counter", "Counter of requests made per upstream.");
        for u in &upstreams {
            let _ = writeln!(
                out,
                "coredns_forward_requests_total{{to=\"{}\"}} {}",
                u.to,
                u.requests.load(Ordering::Relaxed)
            );
        }
        header(out, "coredns_forward_responses_total", "counter", "Counter of responses received per upstream.");
        for u in &upstreams {
            for r in 0..NRCODE {
                let v = u.responses[r].load(Ordering::Relaxed);
                if v > 0 {
                    let _ = writeln!(
                        out,
                        "coredns_forward_responses_total{{to=\"{}\",rcode=\"{}\"}} {v}",
                        u.to,
                        rcode_name(r)
                    );
                }
            }
        }
        header(
            out,
            "coredns_forward_request_duration_seconds",
            "histogram",
            "Histogram of the time each request took.",
        );
        for u in &upstreams {
            for (r, h) in u.duration.iter().enumerate() {
                if h.count() > 0 {
                    let labels = format!("to=\"{}\",rcode=\"{}\"", u.to, rcode_name(r));
                    h.render(out, "coredns_forward_request_duration_seconds", &labels);
                }
            }
        }
        header(
            out,
            "coredns_forward_healthcheck_failures_total",
            "counter",
            "Counter of the number of failed healthchecks.",
        );
        for u in &upstreams {
            let _ = writeln!(
                out,
                "coredns_forward_healthcheck_failures_total{{to=\"{}\"}} {}",
                u.to,
                u.healthcheck_failures.load(Ordering::Relaxed)
            );
        }
        header(
            out,
            "coredns_forward_healthcheck_broken_total",
            "counter",
            "Counter of the number of complete failures of the healthchecks.",
        );
        let _ = writeln!(
            out,
            "coredns_forward_healthcheck_broken_total {}",
            self.healthcheck_broken.load(Ordering::Relaxed)
        );
        header(
            out,
            "coredns_forward_max_concurrent_rejects_total",
            "counter",
            "Counter of the number of queries rejected because the concurrent queries were at maximum.",
        );
        let _ = writeln!(
            out,
            "coredns_forward_max_concurrent_rejects_total {}",
            self.forward_rejects.load(Ordering::Relaxed)
        );

        header(
            out,
            "waypost_programming_latency_seconds",
            "histogram",
            "Time from a watch event to the snapshot that contains it being visible to DNS.",
        );
        self.programming_latency.render(out, "waypost_programming_latency_seconds", "");
        header(
            out,
            "waypost_search_shortcut_hits_total",
            "counter",
            "Search-path expansions answered without extra round trips.",
        );
        let _ =
            writeln!(out, "waypost_search_shortcut_hits_total {}", self.search_shortcut_hits.load(Ordering::Relaxed));
        header(
            out,
            "waypost_ready",
            "gauge",
            "1 when the first cluster snapshot has been loaded and DNS answers from it.",
        );
        let _ = writeln!(out, "waypost_ready {}", u8::from(self.is_ready()));
    }
}

// === HTTP endpoint ===

/// Upper bound on a request head; anything larger is answered 431 and closed.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head before the connection is dropped.
const HTTP_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `/metrics` (Prometheus text), `/healthz` (200 `ok` while the process runs) and
/// `/readyz` (200 when [`Metrics::is_ready`], 503 otherwise) on `listener` until `shutdown`
/// completes. Each connection answers one GET and closes.
pub async fn serve_http(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), MetricsError> {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => {
                match accepted {
                    Ok((stream, _peer)) => {
                        let metrics = Arc::clone(&metrics);
                        tokio::spawn(async move {
                            if let Err(error) = handle_http(stream, &metrics).await {
                                tracing::debug!(%error, "metrics connection failed");
                            }
                        });
                    }
                    // Per-connection errors (the peer reset before accept completed, fd pressure)
                    // must not take the endpoint down.
                    Err(e) if is_transient_accept_error(&e) => {
                        tracing::warn!(error = %e, "metrics accept failed; retrying");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => return Err(MetricsError::Accept(e)),
                }
            }
        }
    }
}

fn is_transient_accept_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock)
        || matches!(e.raw_os_error(), Some(23 | 24)) // ENFILE, EMFILE
}

async fn handle_http(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head_complete = tokio::time::timeout(HTTP_READ_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
                return Ok(true);
            }
            if buf.len() > MAX_REQUEST_HEAD {
                return Ok(false);
            }
        }
    })
    .await;
    let complete = matches!(head_complete, Ok(Ok(true)));
    let (status, ctype, body) = if !complete {
        if buf.len() > MAX_REQUEST_HEAD {
            ("431 Request Header Fields Too Large", "text/plain", "too large\n".to_string())
        } else {
            return Ok(());
        }
    } else {
        let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("");
        let target = parts.next().unwrap_or("");
        let path = target.split('?').next().unwrap_or("");
        match (method, path) {
            ("GET" | "HEAD", "/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics.render()),
            ("GET" | "HEAD", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
            ("GET" | "HEAD", "/readyz") if metrics.is_ready() => ("200 OK", "text/plain", "ok\n".to_string()),
            ("GET" | "HEAD", "/readyz") => ("503 Service Unavailable", "text/plain", "not ready\n".to_string()),
            ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
            _ => ("405 Method Not Allowed", "text/plain", "method not allowed\n".to_string()),
        }
    };
    let head_only = buf.starts_with(b"HEAD ");
    let mut resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        resp.push_str(&body);
    }
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loose check of the exposition grammar: comments are HELP/TYPE, samples are
    /// `name{label="value",...} number`.
    pub(crate) fn assert_exposition_valid(text: &str) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                assert!(rest.starts_with("HELP ") || rest.starts_with("TYPE "), "bad comment: {line}");
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample has a value");
            assert!(value == "+Inf" || value == "NaN" || value.parse::<f64>().is_ok(), "bad value: {line}");
            let name_end = series.find('{').unwrap_or(series.len());
            let name = &series[..name_end];
            assert!(!name.is_empty(), "empty name: {line}");
            assert!(
                name.chars()
                    .enumerate()
                    .all(|(i, c)| c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())),
                "bad name: {line}"
            );
            if name_end < series.len() {
                let labels = series[name_end..].strip_prefix('{').and_then(|s| s.strip_suffix('}')).expect("braces");
                for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").expect("label k=\"v\"");
                    assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "bad label name: {line}");
                    let _ = v;
                }
            }
        }
    }

    #[test]
    fn per_query_counters_render_with_coredns_names() {
        let m = Metrics::new("dns://:53", &["cluster.local.", "."]);
        let z = m.zone_index("cluster.local.").unwrap();
        m.record_request(z, Proto::Udp, Family::V4, 1);
        m.record_request(z, Proto::Udp, Family::V4, 1);
        m.record_request(z, Proto::Tcp, Family::V6, 9999);
        m.record_response(z, 1, 3, Responder::Kubernetes, Duration::from_micros(300));
        m.cache_hit(CacheKind::Denial);
        m.cache_miss();
        m.observe_programming_latency(Duration::from_millis(7));
        m.set_ready(true);
        let up = m.upstream("10.0.0.10:53".parse().unwrap());
        up.record_request();
        up.record_response(0, Duration::from_millis(3));
        let text = m.render();
        assert_exposition_valid(&text);
        assert!(text.contains(
            "coredns_dns_requests_total{server=\"dns://:53\",zone=\"cluster.local.\",proto=\"udp\",family=\"1\",type=\"A\"} 2"
        ));
        assert!(text.contains("proto=\"tcp\",family=\"2\",type=\"other\"} 1"));
        assert!(text.contains("rcode=\"NXDOMAIN\",plugin=\"kubernetes\"} 1"));
        assert!(text.contains(
            "coredns_dns_request_duration_seconds_bucket{server=\"dns://:53\",zone=\"cluster.local.\",type=\"A\",le=\"0.00025\"} 0"
        ));
        assert!(text.contains("type=\"A\",le=\"0.0005\"} 1"));
        assert!(text.contains("coredns_cache_hits_total{server=\"dns://:53\",type=\"denial\",zones=\".\"} 1"));
        assert!(text.contains("coredns_forward_requests_total{to=\"10.0.0.10:53\"} 1"));
        assert!(
            text.contains("coredns_forward_request_duration_seconds_count{to=\"10.0.0.10:53\",rcode=\"NOERROR\"} 1")
        );
        assert!(text.contains("waypost_programming_latency_seconds_bucket{le=\"0.01\"} 1"));
        assert!(text.contains("waypost_programming_latency_seconds_count 1"));
        assert!(text.contains("waypost_ready 1"));
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new("a\"b\\c\nd", &[]);
        m.cache_miss();
        let text = m.render();
        assert!(text.contains("server=\"a\\\"b\\\\c\\nd\""));
        assert_exposition_valid(&text);
    }

    #[test]
    fn registering_an_upstream_twice_returns_the_same_series() {
        let m = Metrics::new("s", &[]);
        let a = m.upstream("127.0.0.1:53".parse().unwrap());
        let b = m.upstream("127.0.0.1:53".parse().unwrap());
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[tokio::test]
    async fn http_endpoint_answers_metrics_health_and_readiness() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new("s", &[]));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_http(listener, Arc::clone(&metrics), async {
            let _ = rx.await;
        }));
        async fn get(addr: SocketAddr, path: &str) -> String {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        }
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        metrics.set_ready(true);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        let m = get(addr, "/metrics").await;
        assert!(m.starts_with("HTTP/1.1 200"));
        assert!(m.contains("waypost_ready 1"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
