//! The DNS server: UDP worker threads and a TCP acceptor answering from the current index, and the task that keeps the index in step with the cluster snapshot.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use waypost_common::Store;

use crate::index::{Index, IndexBuilder, IndexConfig, Lookup};
use crate::metrics::{Family, Metrics, Proto, Responder};
use crate::resolver::{Resolver, Slow};
use crate::wire::{self, Query, rcode};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listen address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// How long a TCP connection may sit idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// How often blocking UDP workers look at the shutdown flag.
const UDP_POLL: Duration = Duration::from_millis(200);

/// The index readers answer from; swapped whole when the cluster changes.
#[derive(Clone)]
pub struct SharedIndex(Arc<ArcSwap<Index>>);

impl SharedIndex {
    /// An empty, unsynced index.
    pub fn new(config: &IndexConfig) -> Self {
        SharedIndex(Arc::new(ArcSwap::from_pointee(Index::empty(config))))
    }

    /// The current index.
    pub fn load(&self) -> arc_swap::Guard<Arc<Index>> {
        self.0.load()
    }

    /// Publishes a new index.
    pub fn store(&self, index: Arc<Index>) {
        self.0.store(index);
    }
}

/// The transport a query came over, which bounds the response size.
pub use crate::upstream::Transport;

/// What became of one query.
#[derive(Debug)]
pub enum Outcome {
    /// `out` holds the response to send.
    Reply,
    /// Send nothing.
    Drop,
    /// The resolver must finish it asynchronously ([`Handler::finish`]).
    Slow(Box<(Query, Slow)>),
}

/// Answers queries from the shared index, and hands what the index cannot answer alone to the
/// resolver.
#[derive(Clone)]
pub struct Handler {
    /// Where cluster answers come from.
    index: SharedIndex,
    /// Forwarding, cache and composed answers; `None` refuses names outside the zone.
    resolver: Option<Arc<Resolver>>,
    /// Request and response counters.
    metrics: Arc<Metrics>,
    /// Metrics zone slot of the cluster zone.
    zone_slot: usize,
    /// Metrics zone slot of everything else.
    root_slot: usize,
}

impl Handler {
    /// A handler answering from `index` only.
    pub fn new(index: SharedIndex) -> Self {
        let metrics = Arc::new(Metrics::new("dns://", &["cluster.local.", "."]));
        Handler::with(index, None, metrics)
    }

    /// A handler with a resolver for names outside the zone, counting into `metrics` (whose
    /// first zone is the cluster zone and second is `.`).
    pub fn with(index: SharedIndex, resolver: Option<Arc<Resolver>>, metrics: Arc<Metrics>) -> Self {
        Handler { index, resolver, metrics, zone_slot: 0, root_slot: 1 }
    }

    /// The metrics this handler counts into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Answers the query in `msg`, writing the response into `out`, or says it needs the
    /// slow path.
    pub fn respond(&self, msg: &[u8], transport: Transport, peer: SocketAddr, out: &mut Vec<u8>) -> Outcome {
        let started = Instant::now();
        let q = match wire::parse_query(msg) {
            Ok(q) => q,
            Err(e) => {
                return if wire::error_response(msg, e, out) { Outcome::Reply } else { Outcome::Drop };
            }
        };
        let proto = match transport {
            Transport::Udp => Proto::Udp,
            Transport::Tcp => Proto::Tcp,
        };
        let limit = match transport {
            Transport::Udp => q.udp_limit(),
            Transport::Tcp => u16::MAX as usize,
        };
        let ra = self.resolver.is_some();
        let index = self.index.load();
        let (slot, responder) = match index.lookup(&q) {
            Lookup::Answer(a) => {
                if let (Some(r), rcode::NXDOMAIN) = (&self.resolver, a.rcode)
                    && r.shortcut
                        && let Some(stem_len) = index.search_stem(q.name()) {
                            self.metrics.record_request(self.zone_slot, proto, Family::of(&peer), q.qtype);
                            let zone = q.name()[index.zone_start(q.name())..].to_vec();
                            return Outcome::Slow(Box::new((q, Slow::Shortcut { stem_len, zone })));
                        }
                wire::write_response(msg, &q, a, ra, Some(limit), out);
                (self.zone_slot, Responder::Kubernetes)
            }
            Lookup::Built(a) => {
                wire::write_response(msg, &q, a.as_ref(), ra, Some(limit), out);
                (self.zone_slot, Responder::Kubernetes)
            }
            Lookup::ExternalAlias(a, target) => match &self.resolver {
                Some(_) => {
                    self.metrics.record_request(self.zone_slot, proto, Family::of(&peer), q.qtype);
                    let target = target.to_vec();
                    return Outcome::Slow(Box::new((q, Slow::ExternalAlias { target })));
                }
                None => {
                    wire::write_response(msg, &q, a, ra, Some(limit), out);
                    (self.zone_slot, Responder::Kubernetes)
                }
            },
            Lookup::NotReady => {
                wire::empty_response(msg, &q, rcode::SERVFAIL, ra, out);
                (self.zone_slot, Responder::Server)
            }
            Lookup::Refused => {
                wire::empty_response(msg, &q, rcode::REFUSED, ra, out);
                (self.zone_slot, Responder::Server)
            }
            Lookup::OutOfZone => match &self.resolver {
                Some(r) if r.is_probe(&q) => {
                    wire::empty_response(msg, &q, rcode::REFUSED, ra, out);
                    (self.root_slot, Responder::Server)
                }
                Some(r) => {
                    self.metrics.record_request(self.root_slot, proto, Family::of(&peer), q.qtype);
                    match r.cached(msg, &q) {
                        Some(resp) if resp.len() <= limit => {
                            *out = resp;
                            let rc = u16::from(out[3] & 0x0F);
                            self.metrics.record_response(self.root_slot, q.qtype, rc, Responder::Cache, started.elapsed());
                            return Outcome::Reply;
                        }
                        _ => return Outcome::Slow(Box::new((q, Slow::Forward))),
                    }
                }
                None => {
                    wire::empty_response(msg, &q, rcode::REFUSED, ra, out);
                    (self.root_slot, Responder::Server)
                }
            },
        };
        self.metrics.record_request(slot, proto, Family::of(&peer), q.qtype);
        self.metrics.record_response(slot, q.qtype, u16::from(out[3] & 0x0F), responder, started.elapsed());
        Outcome::Reply
    }

    /// Finishes a query that [`Handler::respond`] sent to the slow path.
    pub async fn finish(&self, msg: &[u8], q: Query, slow: Slow, transport: Transport) -> Vec<u8> {
        let started = Instant::now();
        let Some(r) = &self.resolver else {
            let mut out = Vec::new();
            wire::empty_response(msg, &q, rcode::REFUSED, false, &mut out);
            return out;
        };
        let slot = if matches!(slow, Slow::Forward) { self.root_slot } else { self.zone_slot };
        let resp = r.resolve(msg, &q, slow, transport, &self.index).await;
        let rc = resp.get(3).map_or(2, |b| u16::from(b & 0x0F));
        self.metrics.record_response(slot, q.qtype, rc, Responder::Forward, started.elapsed());
        resp
    }

    /// Answers one query completely, taking the slow path when needed (TCP, tests).
    pub async fn answer(&self, msg: &[u8], transport: Transport, peer: SocketAddr) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        match self.respond(msg, transport, peer, &mut out) {
            Outcome::Reply => Some(out),
            Outcome::Drop => None,
            Outcome::Slow(b) => {
                let (q, slow) = *b;
                Some(self.finish(msg, q, slow, transport).await)
            }
        }
    }
}

/// Binds a UDP socket with SO_REUSEPORT, so several workers can share one address.
pub fn bind_udp(addr: SocketAddr) -> Result<UdpSocket, ServerError> {
    let err = |source| ServerError::Bind { addr, source };
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    s.set_reuse_port(true).map_err(err)?;
    if addr.is_ipv6() {
        s.set_only_v6(true).map_err(err)?;
    }
    s.bind(&addr.into()).map_err(err)?;
    // Room for bursts: the kernel drops what does not fit.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    Ok(s.into())
}

/// Binds UDP and TCP on the same address; with port 0, finds a port free for both.
pub fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, std::net::TcpListener), ServerError> {
    for _ in 0..20 {
        let udp = bind_udp(addr)?;
        let bound = udp.local_addr().map_err(|source| ServerError::Bind { addr, source })?;
        match bind_tcp(bound) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() != 0 => return Err(e),
            Err(_) => continue,
        }
    }
    Err(ServerError::Bind { addr, source: io::Error::new(io::ErrorKind::AddrInUse, "no port free for both UDP and TCP") })
}

fn bind_tcp(addr: SocketAddr) -> Result<std::net::TcpListener, ServerError> {
    let err = |source| ServerError::Bind { addr, source };
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    s.set_reuse_address(true).map_err(err)?;
    if addr.is_ipv6() {
        s.set_only_v6(true).map_err(err)?;
    }
    s.bind(&addr.into()).map_err(err)?;
    s.listen(1024).map_err(err)?;
    s.set_nonblocking(true).map_err(err)?;
    Ok(s.into())
}

/// Serves UDP on `socket` in the calling thread until `stop` is set; queries that need the
/// resolver are finished on `rt`.
pub fn serve_udp_blocking(socket: UdpSocket, handler: Handler, stop: Arc<AtomicBool>, rt: tokio::runtime::Handle) {
    let socket = Arc::new(socket);
    // Inside the runtime's context, so cache prefetches started from this thread can spawn.
    let _rt = rt.enter();
    let _ = socket.set_read_timeout(Some(UDP_POLL));
    let mut buf = vec![0u8; 65535];
    let mut out = Vec::with_capacity(4096);
    while !stop.load(Ordering::Relaxed) {
        let (n, peer) = match socket.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => {
                continue;
            }
            Err(e) => {
                tracing::warn!("udp receive: {e}");
                continue;
            }
        };
        match handler.respond(&buf[..n], Transport::Udp, peer, &mut out) {
            Outcome::Reply => {
                if let Err(e) = socket.send_to(&out, peer) {
                    tracing::debug!(%peer, "udp send: {e}");
                }
            }
            Outcome::Drop => {}
            Outcome::Slow(b) => {
                let (h, sock, msg) = (handler.clone(), socket.clone(), buf[..n].to_vec());
                rt.spawn(async move {
                    let (q, slow) = *b;
                    let resp = h.finish(&msg, q, slow, Transport::Udp).await;
                    if let Err(e) = sock.send_to(&resp, peer) {
                        tracing::debug!(%peer, "udp send: {e}");
                    }
                });
            }
        }
    }
}

/// Serves TCP on `listener` until `shutdown` resolves; each connection may carry many queries.
pub async fn serve_tcp(listener: TcpListener, handler: Handler, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("tcp accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let h = handler.clone();
        tokio::spawn(async move {
            if let Err(e) = tcp_connection(stream, peer, h).await {
                tracing::debug!(%peer, "tcp connection: {e}");
            }
        });
    }
}

async fn tcp_connection(mut stream: TcpStream, peer: SocketAddr, handler: Handler) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; 65535];
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r?,
        };
        let n = u16::from_be_bytes(len) as usize;
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut buf[..n])).await.map_err(io::Error::other)??;
        let Some(out) = handler.answer(&buf[..n], Transport::Tcp, peer).await else { continue };
        let mut framed = Vec::with_capacity(out.len() + 2);
        framed.extend_from_slice(&(out.len() as u16).to_be_bytes());
        framed.extend_from_slice(&out);
        stream.write_all(&framed).await?;
    }
}

/// Keeps `shared` in step with `store`: rebuilds the index for each new snapshot, until
/// `shutdown` resolves. Records the time from the source seeing a change to the change being
/// answerable, and readiness (synced), in `metrics`.
pub async fn follow_store(
    store: Arc<Store>,
    config: IndexConfig,
    shared: SharedIndex,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut rx = store.subscribe();
    let mut builder = IndexBuilder::new(config);
    let mut last_gen = 0;
    loop {
        let snap = store.load();
        if snap.generation != last_gen {
            let observed = snap.observed_since(last_gen);
            let started = Instant::now();
            let (index, builder_back) = tokio::task::spawn_blocking(move || {
                let index = builder.apply(&snap);
                (index, builder)
            })
            .await
            .expect("index rebuild panicked");
            builder = builder_back;
            let names = index.len();
            let (generation, synced) = (index.generation, index.synced);
            shared.store(index);
            if let Some(t) = observed {
                metrics.observe_programming_latency(t.elapsed());
            }
            metrics.set_ready(synced);
            tracing::info!(generation, names, synced, took = ?started.elapsed(), "dns index published");
            last_gen = generation;
        }
        tokio::select! {
            _ = &mut shutdown => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}
