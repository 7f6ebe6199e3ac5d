//! Forwarding of queries outside the cluster zone to upstream resolvers, with failover, health checks and pooled TCP.
//!
//! [`Upstreams::forward`] takes a client's query as wire bytes and returns the upstream's answer
//! with the client's ID restored. For each query it:
//!
//! 1. takes an in-flight slot, or fails at once with [`UpstreamError::Overloaded`] when
//!    `max_inflight` forwarded queries are already waiting (the server answers REFUSED), so a
//!    dead upstream cannot make queries pile up without bound;
//! 2. orders the healthy upstreams by [`Policy`]; when none is healthy it tries all of them
//!    (health checking itself may be what is broken — CoreDNS `forward` does the same);
//! 3. sends the query over UDP from a fresh socket (so a fresh OS-chosen source port) with a
//!    fresh random ID, and accepts only a reply whose ID and question match — anything else on the
//!    socket is ignored as a possible spoof; a reply with TC set (or one that fills the receive
//!    buffer) is retried over TCP to the same upstream;
//! 4. on a timeout or error moves on to the next upstream.
//!
//! After `max_fails` consecutive failures an upstream is marked unhealthy and a background task
//! probes it every `health_check_interval` with a `. IN NS` query (like CoreDNS's health check)
//! until any reply comes back; the task holds only a weak reference, so dropping every
//! [`Upstreams`] clone stops it.
//!
//! TCP connections are kept in a small per-upstream pool (LIFO, at most
//! `max_idle_tcp_per_upstream`, dropped after `tcp_idle_timeout` unused) and each carries one
//! query at a time, so a pooled connection serves many queries in sequence. A pooled connection
//! that the upstream has meanwhile closed is detected on use and replaced once.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::Instant;

use crate::cache::wire;
use crate::metrics::{Metrics, UpstreamMetrics};

/// Errors of forwarding. When [`Upstreams::forward`] fails, every candidate upstream was tried
/// and the error is the last one seen.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// `max_inflight` forwarded queries are already waiting; the query was not sent. The server
    /// should answer REFUSED.
    #[error("{limit} forwarded queries already in flight")]
    Overloaded {
        /// The configured cap.
        limit: usize,
    },
    /// No upstream is configured.
    #[error("no upstream resolver configured")]
    NoUpstreams,
    /// The query is not a DNS message that can be forwarded (shorter than a header or with a
    /// malformed question section).
    #[error("query is not a well-formed DNS message")]
    MalformedQuery,
    /// The upstream did not answer in time.
    #[error("upstream {upstream} did not answer within {timeout:?}")]
    Timeout {
        /// The upstream that was tried.
        upstream: SocketAddr,
        /// The per-try timeout in force.
        timeout: Duration,
    },
    /// A socket operation with the upstream failed (e.g. connection refused).
    #[error("talking to upstream {upstream} failed")]
    Io {
        /// The upstream that was tried.
        upstream: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The upstream's TCP reply did not match the query (wrong ID or question, or not a DNS
    /// message). UDP replies that do not match are ignored instead, as possible spoofs.
    #[error("upstream {upstream} sent a reply that does not match the query")]
    BadResponse {
        /// The upstream that was tried.
        upstream: SocketAddr,
    },
}

impl UpstreamError {
    /// True when the query was refused by the in-flight cap.
    pub fn is_overloaded(&self) -> bool {
        matches!(self, UpstreamError::Overloaded { .. })
    }

    /// True when the (last) upstream tried did not answer in time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, UpstreamError::Timeout { .. })
    }

    /// The upstream the error is about, if any.
    pub fn upstream(&self) -> Option<SocketAddr> {
        match self {
            UpstreamError::Timeout { upstream, .. }
            | UpstreamError::Io { upstream, .. }
            | UpstreamError::BadResponse { upstream } => Some(*upstream),
            _ => None,
        }
    }
}

/// How the first upstream to try is chosen among the healthy ones; the rest follow in list
/// order for failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// A random upstream first: spreads load without coordination (CoreDNS's default).
    #[default]
    Random,
    /// Each query starts one upstream further than the previous one.
    RoundRobin,
    /// Always the first healthy upstream in list order; later ones are fallbacks only.
    Sequential,
}

/// Transport of the first try of a forwarded query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// UDP, retried over TCP when the reply is truncated.
    #[default]
    Udp,
    /// TCP only, over a pooled connection.
    Tcp,
}

/// Settings of the forwarder.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Upstream resolvers, usually from the node's resolv.conf ([`parse_resolv_conf`]).
    pub servers: Vec<SocketAddr>,
    /// How the first upstream is picked.
    pub policy: Policy,
    /// Time allowed for one upstream to answer one try (UDP, and TCP again after truncation)
    /// before failing over. Default 2 s: well above a healthy resolver's latency, short enough
    /// that failover beats the typical 5 s client timeout.
    pub timeout: Duration,
    /// Cap on forwarded queries waiting at once; beyond it `forward` fails fast with
    /// [`UpstreamError::Overloaded`]. Default 1000 (CoreDNS's `max_concurrent` is opt-in; 1000
    /// bounds memory and sockets at 2 s × 500 qps of unanswered queries).
    pub max_inflight: usize,
    /// Pause between health probes of an unhealthy upstream. Default 0.5 s (CoreDNS).
    pub health_check_interval: Duration,
    /// Consecutive failed tries after which an upstream is marked unhealthy; 0 never marks one.
    /// Default 2 (CoreDNS `max_fails`).
    pub max_fails: u32,
    /// How long a pooled TCP connection may sit unused before it is closed instead of reused.
    /// Default 10 s (CoreDNS `expire`), below typical server idle timeouts.
    pub tcp_idle_timeout: Duration,
    /// Idle TCP connections kept per upstream; more concurrent TCP queries open extra
    /// connections that are closed after use.
    pub max_idle_tcp_per_upstream: usize,
}

impl UpstreamConfig {
    /// Defaults with the given upstreams.
    pub fn new(servers: Vec<SocketAddr>) -> UpstreamConfig {
        UpstreamConfig { servers, ..UpstreamConfig::default() }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            servers: Vec::new(),
            policy: Policy::default(),
            timeout: Duration::from_secs(2),
            max_inflight: 1000,
            health_check_interval: Duration::from_millis(500),
            max_fails: 2,
            tcp_idle_timeout: Duration::from_secs(10),
            max_idle_tcp_per_upstream: 8,
        }
    }
}

/// Reads the `nameserver` lines of a resolv.conf, as port-53 socket addresses in file order.
/// Entries that are not IP addresses (or carry an IPv6 zone, which a `SocketAddr` cannot hold
/// by name) are skipped with a warning.
pub fn parse_resolv_conf(content: &str) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for (lineno, line) in content.lines().enumerate() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(value) = words.next() else {
            tracing::warn!(line = lineno + 1, "resolv.conf: nameserver line without an address; skipped");
            continue;
        };
        match value.parse::<IpAddr>() {
            Ok(ip) => out.push(SocketAddr::new(ip, 53)),
            Err(error) => {
                tracing::warn!(line = lineno + 1, nameserver = value, %error, "resolv.conf: nameserver is not an IP address; skipped")
            }
        }
    }
    out
}

/// Receive buffer for UDP replies. A reply that fills it may have been cut, so it is retried
/// over TCP; 4096 covers every common EDNS buffer size (1232 recommended, 4096 legacy).
const UDP_RECV_BUF: usize = 4096;

// === impl Upstream ===

/// One upstream resolver and what the forwarder knows about it.
#[derive(Debug)]
struct Upstream {
    /// Where to send queries.
    addr: SocketAddr,
    /// Consecutive failed tries; reset by any answer.
    fails: AtomicU32,
    /// Cleared after `max_fails` failures, set again by a successful probe.
    healthy: AtomicBool,
    /// Set while a probe task runs, so failures do not start a second one.
    probing: AtomicBool,
    /// Idle TCP connections with the time they were last used.
    tcp_pool: Mutex<Vec<(TcpStream, Instant)>>,
    /// This upstream's metric series.
    stats: Arc<UpstreamMetrics>,
}

/// Shared state behind every [`Upstreams`] clone.
#[derive(Debug)]
struct Inner {
    /// The upstreams in configured order.
    upstreams: Box<[Upstream]>,
    /// Settings.
    config: UpstreamConfig,
    /// Forwarded queries currently waiting, for the `max_inflight` cap.
    inflight: AtomicUsize,
    /// Next starting point of the round-robin policy.
    next: AtomicUsize,
    /// Server-wide metrics (rejects, health-check breakage).
    metrics: Arc<Metrics>,
}

/// The forwarder: a cheap-to-clone handle to the upstream set.
#[derive(Debug, Clone)]
pub struct Upstreams {
    /// Shared with clones and (weakly) with health-probe tasks.
    inner: Arc<Inner>,
}

/// Releases an in-flight slot when a forward completes or is cancelled.
struct InflightSlot<'a>(&'a AtomicUsize);

impl Drop for InflightSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Upstreams {
    /// Builds the forwarder and registers each upstream's metric series. Needs no runtime;
    /// health-probe tasks are spawned on the runtime that calls [`Upstreams::forward`].
    pub fn new(config: UpstreamConfig, metrics: Arc<Metrics>) -> Upstreams {
        let upstreams = config
            .servers
            .iter()
            .map(|&addr| Upstream {
                addr,
                fails: AtomicU32::new(0),
                healthy: AtomicBool::new(true),
                probing: AtomicBool::new(false),
                tcp_pool: Mutex::new(Vec::new()),
                stats: metrics.upstream(addr),
            })
            .collect();
        Upstreams {
            inner: Arc::new(Inner {
                upstreams,
                config,
                inflight: AtomicUsize::new(0),
                next: AtomicUsize::new(0),
                metrics,
            }),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &UpstreamConfig {
        &self.inner.config
    }

    /// Each upstream with whether it is currently considered healthy.
    pub fn health(&self) -> Vec<(SocketAddr, bool)> {
        self.inner.upstreams.iter().map(|u| (u.addr, u.healthy.load(Ordering::Acquire))).collect()
    }

    /// Forwarded queries currently waiting for an answer.
    pub fn inflight(&self) -> usize {
        self.inner.inflight.load(Ordering::Acquire)
    }

    /// Forwards `query` (a complete DNS message as received from a client) over UDP, falling
    /// back to TCP on truncation, and returns the answer with the client's ID. See the module
    /// docs for the order of tries.
    pub async fn forward(&self, query: &[u8]) -> Result<Vec<u8>, UpstreamError> {
        self.forward_via(query, Transport::Udp).await
    }

    /// Like [`Upstreams::forward`], choosing the first transport: a client that asked over TCP
    /// usually expects a large answer, and [`Transport::Tcp`] saves the truncated UDP round trip
    /// (CoreDNS `forward` also forwards on the client's protocol).
    pub async fn forward_via(&self, query: &[u8], transport: Transport) -> Result<Vec<u8>, UpstreamError> {
        let inner = &*self.inner;
        if query.len() < wire::HEADER_LEN || wire::question_end(query).is_none() {
            return Err(UpstreamError::MalformedQuery);
        }
        let n = inner.upstreams.len();
        if n == 0 {
            return Err(UpstreamError::NoUpstreams);
        }
        let limit = inner.config.max_inflight;
        if inner.inflight.fetch_add(1, Ordering::AcqRel) >= limit {
            inner.inflight.fetch_sub(1, Ordering::AcqRel);
            inner.metrics.forward_rejected();
            return Err(UpstreamError::Overloaded { limit });
        }
        let _slot = InflightSlot(&inner.inflight);

        let start = match inner.config.policy {
            Policy::Random => rand::random_range(0..n),
            Policy::RoundRobin => inner.next.fetch_add(1, Ordering::Relaxed) % n,
            Policy::Sequential => 0,
        };
        let any_healthy = inner.upstreams.iter().any(|u| u.healthy.load(Ordering::Acquire));
        if !any_healthy {
            inner.metrics.healthcheck_broken();
        }
        // One copy of the query, re-stamped with a fresh random ID for every try.
        let mut msg = query.to_vec();
        let mut last = None;
        for i in 0..n {
            let u = &inner.upstreams[(start + i) % n];
            if any_healthy && !u.healthy.load(Ordering::Acquire) {
                continue;
            }
            let id: u16 = rand::random();
            msg[..2].copy_from_slice(&id.to_be_bytes());
            match self.exchange(u, &msg, transport).await {
                Ok(mut response) => {
                    u.fails.store(0, Ordering::Release);
                    response[..2].copy_from_slice(&query[..2]);
                    return Ok(response);
                }
                Err(error) => {
                    tracing::debug!(upstream = %u.addr, %error, "forward try failed");
                    self.record_failure(u);
                    last = Some(error);
                }
            }
        }
        Err(last.unwrap_or(UpstreamError::NoUpstreams))
    }

    /// UDP, then TCP if the UDP reply was truncated; or TCP straight away.
    async fn exchange(&self, u: &Upstream, msg: &[u8], transport: Transport) -> Result<Vec<u8>, UpstreamError> {
        let timeout = self.inner.config.timeout;
        let started = Instant::now();
        u.stats.record_request();
        let reply = match transport {
            Transport::Udp => tokio::time::timeout(timeout, udp_exchange(u.addr, msg))
                .await
                .map_err(|_| UpstreamError::Timeout { upstream: u.addr, timeout })??,
            Transport::Tcp => UdpReply { msg: Vec::new(), truncated: true },
        };
        let response = if reply.truncated {
            tokio::time::timeout(timeout, self.tcp_exchange(u, msg))
                .await
                .map_err(|_| UpstreamError::Timeout { upstream: u.addr, timeout })??
        } else {
            reply.msg
        };
        u.stats.record_response(u16::from(response[3] & 0x0F), started.elapsed());
        Ok(response)
    }

    /// Sends over a pooled (or new) TCP connection; retries once on a fresh connection when a
    /// pooled one turns out to be closed.
    async fn tcp_exchange(&self, u: &Upstream, msg: &[u8]) -> Result<Vec<u8>, UpstreamError> {
        let io_err = |source| UpstreamError::Io { upstream: u.addr, source };
        let mut frame = Vec::with_capacity(msg.len() + 2);
        let len = u16::try_from(msg.len()).map_err(|_| UpstreamError::MalformedQuery)?;
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(msg);
        loop {
            let (mut conn, reused) = match self.take_pooled(u) {
                Some(conn) => (conn, true),
                None => (TcpStream::connect(u.addr).await.map_err(io_err)?, false),
            };
            match tcp_roundtrip(&mut conn, &frame, msg).await {
                Ok(Some(reply)) => {
                    self.put_pooled(u, conn);
                    return Ok(reply);
                }
                Ok(None) => return Err(UpstreamError::BadResponse { upstream: u.addr }),
                Err(_) if reused => continue,
                Err(e) => return Err(io_err(e)),
            }
        }
    }

    fn take_pooled(&self, u: &Upstream) -> Option<TcpStream> {
        let idle = self.inner.config.tcp_idle_timeout;
        let mut pool = u.tcp_pool.lock();
        let now = Instant::now();
        // Oldest connections sit at the front; drop those idle too long.
        pool.retain(|(_, last_used)| now.duration_since(*last_used) < idle);
        pool.pop().map(|(conn, _)| conn)
    }

    fn put_pooled(&self, u: &Upstream, conn: TcpStream) {
        let mut pool = u.tcp_pool.lock();
        if pool.len() < self.inner.config.max_idle_tcp_per_upstream {
            pool.push((conn, Instant::now()));
        }
    }

    /// Counts a failed try and, at `max_fails`, marks the upstream down and starts probing it.
    fn record_failure(&self, u: &Upstream) {
        let max_fails = self.inner.config.max_fails;
        let fails = u.fails.fetch_add(1, Ordering::AcqRel) + 1;
        if max_fails == 0 || fails < max_fails {
            return;
        }
        if u.healthy.swap(false, Ordering::AcqRel) {
            tracing::warn!(upstream = %u.addr, fails, "upstream marked unhealthy; probing it");
        }
        if !u.probing.swap(true, Ordering::AcqRel) {
            let index =
                self.inner.upstreams.iter().position(|x| std::ptr::eq(x, u)).expect("upstream belongs to this set");
            tokio::spawn(probe_until_healthy(Arc::downgrade(&self.inner), index));
        }
    }
}

/// Background health check: every `health_check_interval`, sends `. IN NS` to the upstream;
/// any matching reply (whatever its rcode) marks it healthy again.
async fn probe_until_healthy(inner: Weak<Inner>, index: usize) {
    loop {
        let (addr, interval, timeout) = match inner.upgrade() {
            Some(i) => (i.upstreams[index].addr, i.config.health_check_interval, i.config.timeout),
            None => return,
        };
        tokio::time::sleep(interval).await;
        let ok = matches!(tokio::time::timeout(timeout, udp_exchange(addr, &probe_query())).await, Ok(Ok(_)));
        let Some(inner) = inner.upgrade() else { return };
        let u = &inner.upstreams[index];
        if ok {
            u.fails.store(0, Ordering::Release);
            u.healthy.store(true, Ordering::Release);
            u.probing.store(false, Ordering::Release);
            tracing::info!(upstream = %addr, "upstream healthy again");
            return;
        }
        u.stats.record_healthcheck_failure();
    }
}

/// `. IN NS` with RD set and a random ID.
fn probe_query() -> [u8; 17] {
    let id: u16 = rand::random();
    let [a, b] = id.to_be_bytes();
    [a, b, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 1]
}

/// A UDP reply that matched the query.
struct UdpReply {
    /// The reply as received, still carrying the forwarder's ID.
    msg: Vec<u8>,
    /// TC set, or the reply filled the receive buffer: ask again over TCP.
    truncated: bool,
}

/// Sends `msg` from a fresh socket and waits (without a deadline: the caller sets one) for a
/// matching reply, ignoring anything else that arrives.
async fn udp_exchange(upstream: SocketAddr, msg: &[u8]) -> Result<UdpReply, UpstreamError> {
    let io_err = |source| UpstreamError::Io { upstream, source };
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await.map_err(io_err)?;
    socket.connect(upstream).await.map_err(io_err)?;
    socket.send(msg).await.map_err(io_err)?;
    let mut buf = vec![0u8; UDP_RECV_BUF];
    loop {
        let n = socket.recv(&mut buf).await.map_err(io_err)?;
        if !reply_matches(msg, &buf[..n]) {
            tracing::debug!(%upstream, len = n, "ignoring UDP reply that does not match the query");
            continue;
        }
        let truncated = buf[2] & 0x02 != 0 || n == buf.len();
        buf.truncate(n);
        return Ok(UdpReply { msg: buf, truncated });
    }
}

/// Writes one framed query and reads framed replies until one matches. `Ok(None)`: the
/// connection works but the upstream answered something else.
async fn tcp_roundtrip(conn: &mut TcpStream, frame: &[u8], msg: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
    conn.write_all(frame).await?;
    let mut len = [0u8; 2];
    conn.read_exact(&mut len).await?;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    conn.read_exact(&mut reply).await?;
    Ok(reply_matches(msg, &reply).then_some(reply))
}

/// Whether `reply` answers `query`: a response with the same ID and the same questions (names
/// compared case-insensitively, as resolvers may echo 0x20-mixed case differently).
fn reply_matches(query: &[u8], reply: &[u8]) -> bool {
    if reply.len() < wire::HEADER_LEN || reply[..2] != query[..2] || reply[2] & 0x80 == 0 {
        return false;
    }
    let (Some(qd), Some(rd)) = (wire::qdcount(query), wire::qdcount(reply)) else {
        return false;
    };
    if qd != rd {
        return false;
    }
    let mut qp = wire::HEADER_LEN;
    let mut rp = wire::HEADER_LEN;
    for _ in 0..qd {
        let (Some(qe), Some(re)) = (wire::skip_name(query, qp), wire::skip_name(reply, rp)) else {
            return false;
        };
        let (Some(qq), Some(rq)) = (query.get(qp..qe + 4), reply.get(rp..re + 4)) else {
            return false;
        };
        let name_len = qe - qp;
        if qq.len() != rq.len()
            || !qq[..name_len].eq_ignore_ascii_case(&rq[..name_len])
            || qq[name_len..] != rq[name_len..]
        {
            return false;
        }
        qp = qe + 4;
        rp = re + 4;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_are_read_in_order_and_bad_ones_skipped() {
        let conf = "# generated\nsearch default.svc.cluster.local svc.cluster.local\nnameserver 10.0.0.10\n\
                    nameserver   2001:db8::1 # v6\nnameserver fe80::1%eth0\nnameserver not-an-ip\nnameserver\n\
                    options ndots:5\n;nameserver 9.9.9.9\n";
        assert_eq!(
            parse_resolv_conf(conf),
            vec!["10.0.0.10:53".parse::<SocketAddr>().unwrap(), "[2001:db8::1]:53".parse().unwrap()]
        );
    }

    #[test]
    fn replies_match_on_id_and_question_ignoring_name_case() {
        let q = [0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 0, 0, 1, 0, 1];
        let mut r = q;
        r[2] |= 0x80;
        assert!(reply_matches(&q, &r));
        r[13] = b'A';
        assert!(reply_matches(&q, &r));
        let mut wrong_id = r;
        wrong_id[1] = 0;
        assert!(!reply_matches(&q, &wrong_id));
        let mut wrong_type = r;
        wrong_type[16] = 28;
        assert!(!reply_matches(&q, &wrong_type));
        assert!(!reply_matches(&q, &q), "a query is not a reply");
    }

    #[test]
    fn error_queries_tell_overload_and_timeout_apart() {
        assert!(UpstreamError::Overloaded { limit: 1 }.is_overloaded());
        let t = UpstreamError::Timeout { upstream: "127.0.0.1:53".parse().unwrap(), timeout: Duration::from_secs(1) };
        assert!(t.is_timeout() && !t.is_overloaded());
        assert_eq!(t.upstream(), Some("127.0.0.1:53".parse().unwrap()));
    }
}
