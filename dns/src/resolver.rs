//! The slow path of the server: forwarding with the cache, ExternalName chasing to external targets, the search-path shortcut, and forwarding-loop detection.
//!
//! Everything here runs on the tokio runtime; the UDP workers hand a query over only when the
//! index cannot answer it alone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query as HQuery, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType, rdata::CNAME};

use crate::cache::{Cache, CacheConfig, CacheKey};
use crate::index::Lookup;
use crate::metrics::Metrics;
use crate::server::SharedIndex;
use crate::upstream::{Transport, UpstreamConfig, UpstreamError, Upstreams};
use crate::wire::{self, Query, rcode};

/// Why the resolver refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    /// An upstream sends our own queries back to us.
    #[error("forwarding loop: upstream {upstream} sends queries back to waypost; refusing to start (fix --upstream or the resolv.conf)")]
    Loop {
        /// The upstream that looped.
        upstream: SocketAddr,
    },
    /// No upstream is configured but forwarding was asked for.
    #[error("no upstream resolvers: give --upstream ADDR or a resolv.conf with nameserver lines")]
    NoUpstreams,
}

impl ResolverError {
    /// True for a detected forwarding loop.
    pub fn is_loop(&self) -> bool {
        matches!(self, ResolverError::Loop { .. })
    }
}

/// How the resolver is set up.
#[derive(Debug, Clone, Default)]
pub struct ResolverConfig {
    /// Upstream servers and forwarding policy.
    pub upstream: UpstreamConfig,
    /// Cache bounds and TTL clamps.
    pub cache: CacheConfig,
    /// Answer a pod's ndots search walk in one round trip.
    pub search_shortcut: bool,
    /// The node's search domains (from its resolv.conf), which kubelet appends to every pod's
    /// search list after the cluster ones.
    pub host_search: Vec<String>,
}

/// What the slow path must do with a query.
#[derive(Debug, Clone)]
pub enum Slow {
    /// Outside the cluster zone: forward it (through the cache).
    Forward,
    /// An ExternalName alias to a name outside the zone: CNAME plus the target's records.
    ExternalAlias {
        /// The alias target in wire format.
        target: Vec<u8>,
    },
    /// A name shaped like a search-list candidate (`<stem>.<ns>.svc.<zone>`) that does not
    /// exist: answer for the first candidate of the pod's list that does.
    Shortcut {
        /// Bytes of the stem at the start of the name (wire format, without the root).
        stem_len: usize,
        /// The cluster zone in wire format.
        zone: Vec<u8>,
    },
}

/// Forwarding, cache and the composed answers.
pub struct Resolver {
    /// The upstream resolvers.
    upstreams: Upstreams,
    /// Forwarded answers; shared with background prefetches.
    cache: Arc<Cache>,
    /// Counters.
    metrics: Arc<Metrics>,
    /// Whether the search-path shortcut is on.
    pub shortcut: bool,
    /// Node search domains in wire format (without the root label).
    host_search: Vec<Vec<u8>>,
    /// A random name this instance sends upstream at startup; seeing it come back is a loop.
    probe: Vec<u8>,
    /// How often the probe name reached us.
    probe_seen: AtomicU64,
}

impl Resolver {
    /// Builds the resolver; call [`Resolver::check_loop`] once the server listens.
    pub fn new(config: ResolverConfig, metrics: Arc<Metrics>) -> Result<Resolver, ResolverError> {
        if config.upstream.servers.is_empty() {
            return Err(ResolverError::NoUpstreams);
        }
        let host_search = config
            .host_search
            .iter()
            .filter_map(|d| wire::name_to_wire(d))
            .map(|mut w| {
                w.pop();
                w
            })
            .filter(|w| !w.is_empty())
            .collect();
        let probe_name = format!("{:016x}.{:08x}.waypost-loop-check", rand::random::<u64>(), rand::random::<u32>());
        Ok(Resolver {
            upstreams: Upstreams::new(config.upstream, metrics.clone()),
            cache: Arc::new(Cache::with_metrics(config.cache, metrics.clone())),
            metrics,
            shortcut: config.search_shortcut,
            host_search,
            probe: wire::name_to_wire(&probe_name).expect("probe name is valid"),
            probe_seen: AtomicU64::new(0),
        })
    }

    /// The upstream servers.
    pub fn upstream_addrs(&self) -> Vec<SocketAddr> {
        self.upstreams.config().servers.clone()
    }

    /// True (and counted) when `q` is this instance's loop probe coming back.
    pub fn is_probe(&self, q: &Query) -> bool {
        if q.name() == self.probe.as_slice() {
            self.probe_seen.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Sends the probe to every upstream; if any of them passes it back to us, that is a
    /// forwarding loop (CoreDNS `loop` does the same).
    pub async fn check_loop(&self) -> Result<(), ResolverError> {
        let name = Name::from_ascii(wire::wire_to_name(&self.probe)).expect("probe name parses");
        for upstream in self.upstreams.config().servers.clone() {
            let mut m = Message::query();
            m.metadata.recursion_desired = true;
            m.add_query(HQuery::query(name.clone(), RecordType::HINFO));
            let bytes = m.to_vec().expect("probe encodes");
            let before = self.probe_seen.load(Ordering::Relaxed);
            if let Ok(sock) = tokio::net::UdpSocket::bind(if upstream.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).await {
                let _ = sock.send_to(&bytes, upstream).await;
                let mut buf = [0u8; 512];
                let _ = tokio::time::timeout(Duration::from_millis(1500), sock.recv_from(&mut buf)).await;
            }
            if self.probe_seen.load(Ordering::Relaxed) > before {
                return Err(ResolverError::Loop { upstream });
            }
        }
        Ok(())
    }

    /// A cached answer to a query that would be forwarded, without leaving the calling thread.
    pub fn cached(&self, msg: &[u8], q: &Query) -> Option<Vec<u8>> {
        let key = key_of(q, msg);
        let hit = self.cache.get(&key, q.id, Instant::now())?;
        if hit.prefetch {
            self.spawn_refresh(key, msg.to_vec());
        }
        Some(with_ra(hit.response))
    }

    fn spawn_refresh(&self, key: CacheKey, msg: Vec<u8>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let (up, cache, metrics) = (self.upstreams.clone(), self.cache.clone(), self.metrics.clone());
        rt.spawn(async move {
            metrics.cache_prefetch();
            if let Ok(resp) = up.forward(&msg).await {
                cache.insert(key, &resp, Instant::now());
            }
        });
    }

    /// Answers a query the index could not answer alone.
    pub async fn resolve(&self, msg: &[u8], q: &Query, slow: Slow, transport: Transport, index: &SharedIndex) -> Vec<u8> {
        let limit = match transport {
            Transport::Udp => q.udp_limit(),
            Transport::Tcp => u16::MAX as usize,
        };
        let resp = match slow {
            Slow::Forward => self.forward_cached(msg, q, transport).await,
            Slow::ExternalAlias { target } => self.alias(msg, q, &target, transport).await,
            Slow::Shortcut { stem_len, zone } => self.shortcut(msg, q, stem_len, &zone, transport, index).await,
        };
        fit(with_ra(resp), msg, q, limit)
    }

    /// Forwards through the cache; serves stale when every upstream fails.
    async fn forward_cached(&self, msg: &[u8], q: &Query, transport: Transport) -> Vec<u8> {
        let key = key_of(q, msg);
        if let Some(hit) = self.cache.get(&key, q.id, Instant::now()) {
            return hit.response;
        }
        match self.upstreams.forward_via(msg, transport).await {
            Ok(resp) => {
                self.cache.insert(key, &resp, Instant::now());
                resp
            }
            Err(e) => self.failed(msg, q, &key, e),
        }
    }

    fn failed(&self, msg: &[u8], q: &Query, key: &CacheKey, e: UpstreamError) -> Vec<u8> {
        let mut out = Vec::new();
        if e.is_overloaded() {
            wire::empty_response(msg, q, rcode::REFUSED, true, &mut out);
            return out;
        }
        if let Some(stale) = self.cache.get_stale(key, q.id, Instant::now()) {
            return stale;
        }
        tracing::debug!("forwarding {}: {e}", wire::wire_to_name(q.name()));
        wire::empty_response(msg, q, rcode::SERVFAIL, true, &mut out);
        out
    }

    /// Resolves (name, qtype) upstream through the cache, as a parsed message.
    async fn lookup_upstream(&self, name: &[u8], qtype: u16, transport: Transport) -> Option<Message> {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(HQuery::query(Name::from_ascii(wire::wire_to_name(name)).ok()?, RecordType::from(qtype)));
        let mut e = Edns::new();
        e.set_max_payload(wire::OUR_UDP_PAYLOAD);
        m.set_edns(e);
        let bytes = m.to_vec().ok()?;
        let q = wire::parse_query(&bytes).ok()?;
        let resp = self.forward_cached(&bytes, &q, transport).await;
        Message::from_vec(&resp).ok()
    }

    /// CNAME to an external target, followed by the target's records from upstream.
    async fn alias(&self, msg: &[u8], q: &Query, target: &[u8], transport: Transport) -> Vec<u8> {
        let Ok(request) = Message::from_vec(msg) else { return servfail(msg, q) };
        let mut resp = response_to(&request);
        let owner = request.queries[0].name().clone();
        let Ok(target_name) = Name::from_ascii(wire::wire_to_name(target)) else { return servfail(msg, q) };
        resp.metadata.authoritative = true;
        resp.answers.push(Record::from_rdata(owner, 5, RData::CNAME(CNAME(target_name.clone()))));
        if let Some(up) = self.lookup_upstream(target, q.qtype, transport).await {
            resp.metadata.response_code = up.metadata.response_code;
            resp.answers.extend(up.answers);
            if up.metadata.response_code == ResponseCode::NXDomain || resp.answers.len() == 1 {
                resp.authorities.extend(up.authorities);
            }
        }
        resp.to_vec().unwrap_or_else(|_| servfail(msg, q))
    }

    /// The search-path shortcut: the first candidate of the pod's list that exists, as a
    /// CNAME from the asked name plus the candidate's records.
    async fn shortcut(&self, msg: &[u8], q: &Query, stem_len: usize, zone: &[u8], transport: Transport, index: &SharedIndex) -> Vec<u8> {
        let stem = &q.name()[..stem_len];
        // svc.<zone>, <zone>, the node's search domains, then the stem as an absolute name.
        let zone_rel = &zone[..zone.len() - 1];
        let mut candidates: Vec<Vec<u8>> = Vec::new();
        let mut svc_zone = b"\x03svc".to_vec();
        svc_zone.extend_from_slice(zone_rel);
        candidates.push([stem, &svc_zone, &[0]].concat());
        candidates.push([stem, zone_rel, &[0]].concat());
        for d in &self.host_search {
            candidates.push([stem, d.as_slice(), &[0]].concat());
        }
        candidates.push([stem, &[0]].concat());
        let Ok(request) = Message::from_vec(msg) else { return servfail(msg, q) };
        for cand in candidates.iter().filter(|c| c.len() <= wire::MAX_NAME) {
            let found = if index.load().in_zone(cand) {
                local_lookup(index, cand, q.qtype)
            } else {
                self.lookup_upstream(cand, q.qtype, transport).await
            };
            let Some(found) = found else { continue };
            if found.metadata.response_code != ResponseCode::NoError || found.answers.is_empty() {
                continue;
            }
            self.metrics.search_shortcut_hit();
            let mut resp = response_to(&request);
            let owner = request.queries[0].name().clone();
            let Ok(cname) = Name::from_ascii(wire::wire_to_name(cand)) else { break };
            resp.answers.push(Record::from_rdata(owner, 5, RData::CNAME(CNAME(cname))));
            resp.answers.extend(found.answers);
            return resp.to_vec().unwrap_or_else(|_| servfail(msg, q));
        }
        // Nothing exists: the answer the walk would have had for this name.
        let mut out = Vec::new();
        match index.load().lookup(q) {
            Lookup::Answer(a) => wire::write_response(msg, q, a, true, None, &mut out),
            _ => wire::empty_response(msg, q, rcode::NXDOMAIN, true, &mut out),
        }
        out
    }
}

/// Answers `name`/`qtype` from the cluster index, as a parsed message.
fn local_lookup(index: &SharedIndex, name: &[u8], qtype: u16) -> Option<Message> {
    let mut m = Message::query();
    m.add_query(HQuery::query(Name::from_ascii(wire::wire_to_name(name)).ok()?, RecordType::from(qtype)));
    let bytes = m.to_vec().ok()?;
    let q = wire::parse_query(&bytes).ok()?;
    let mut out = Vec::new();
    match index.load().lookup(&q) {
        Lookup::Answer(a) => wire::write_response(&bytes, &q, a, true, None, &mut out),
        Lookup::Built(a) => wire::write_response(&bytes, &q, a.as_ref(), true, None, &mut out),
        _ => return None,
    }
    Message::from_vec(&out).ok()
}

fn key_of(q: &Query, msg: &[u8]) -> CacheKey {
    CacheKey::new(q.name(), q.qtype, q.qclass, q.edns.is_some_and(|e| e.dnssec_ok), msg[3] & 0x10 != 0)
}

/// A response skeleton to `request`: same ID, question and EDNS, RA set.
fn response_to(request: &Message) -> Message {
    let mut resp = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
    resp.metadata.recursion_desired = request.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.checking_disabled = request.metadata.checking_disabled;
    resp.queries = request.queries.clone();
    if request.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(wire::OUR_UDP_PAYLOAD);
        resp.set_edns(e);
    }
    resp
}

fn servfail(msg: &[u8], q: &Query) -> Vec<u8> {
    let mut out = Vec::new();
    wire::empty_response(msg, q, rcode::SERVFAIL, true, &mut out);
    out
}

/// Sets RA: waypost recurses for its clients, whatever the upstream said.
fn with_ra(mut resp: Vec<u8>) -> Vec<u8> {
    if resp.len() >= 4 {
        resp[3] |= 0x80;
    }
    resp
}

/// Truncates `resp` (TC, question only) when it exceeds the client's limit.
fn fit(resp: Vec<u8>, msg: &[u8], q: &Query, limit: usize) -> Vec<u8> {
    if resp.len() <= limit || resp.len() < 12 {
        return resp;
    }
    let rc = resp[3] & 0x0F;
    let mut out = Vec::new();
    wire::empty_response(msg, q, rc, true, &mut out);
    out[2] |= 0x02;
    out
}
