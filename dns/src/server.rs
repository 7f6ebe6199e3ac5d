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
use crate::wire::{self, rcode};

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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// UDP: the client's EDNS payload size (or 512) applies.
    Udp,
    /// TCP: up to 65535 bytes.
    Tcp,
}

/// What became of one query.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `out` holds the response to send.
    Reply,
    /// Send nothing.
    Drop,
}

/// Answers queries from the shared index.
#[derive(Clone)]
pub struct Handler {
    /// Where answers come from.
    index: SharedIndex,
}

impl Handler {
    /// A handler answering from `index`.
    pub fn new(index: SharedIndex) -> Self {
        Handler { index }
    }

    /// Answers the query in `msg`, writing the response into `out`.
    pub fn respond(&self, msg: &[u8], transport: Transport, out: &mut Vec<u8>) -> Outcome {
        let q = match wire::parse_query(msg) {
            Ok(q) => q,
            Err(e) => {
                return if wire::error_response(msg, e, out) { Outcome::Reply } else { Outcome::Drop };
            }
        };
        let limit = match transport {
            Transport::Udp => q.udp_limit(),
            Transport::Tcp => u16::MAX as usize,
        };
        let index = self.index.load();
        match index.lookup(&q) {
            Lookup::Answer(a) => wire::write_response(msg, &q, a, false, Some(limit), out),
            Lookup::Built(a) => wire::write_response(msg, &q, &a, false, Some(limit), out),
            Lookup::NotReady => wire::empty_response(msg, &q, rcode::SERVFAIL, false, out),
            Lookup::Refused | Lookup::OutOfZone => wire::empty_response(msg, &q, rcode::REFUSED, false, out),
        }
        Outcome::Reply
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

/// Serves UDP on `socket` in the calling thread until `stop` is set.
pub fn serve_udp_blocking(socket: UdpSocket, handler: Handler, stop: Arc<AtomicBool>) {
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
        if handler.respond(&buf[..n], Transport::Udp, &mut out) == Outcome::Reply {
            if let Err(e) = socket.send_to(&out, peer) {
                tracing::debug!(%peer, "udp send: {e}");
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
            if let Err(e) = tcp_connection(stream, h).await {
                tracing::debug!(%peer, "tcp connection: {e}");
            }
        });
    }
}

async fn tcp_connection(mut stream: TcpStream, handler: Handler) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; 65535];
    let mut out = Vec::with_capacity(4096);
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r?,
        };
        let n = u16::from_be_bytes(len) as usize;
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut buf[..n])).await.map_err(io::Error::other)??;
        if handler.respond(&buf[..n], Transport::Tcp, &mut out) == Outcome::Drop {
            continue;
        }
        let mut framed = Vec::with_capacity(out.len() + 2);
        framed.extend_from_slice(&(out.len() as u16).to_be_bytes());
        framed.extend_from_slice(&out);
        stream.write_all(&framed).await?;
    }
}

/// Keeps `shared` in step with `store`: rebuilds the index for each new snapshot, until
/// `shutdown` resolves. `on_programmed` gets the time from the source seeing a change to the
/// change being answerable.
pub async fn follow_store(
    store: Arc<Store>,
    config: IndexConfig,
    shared: SharedIndex,
    on_programmed: impl Fn(Duration) + Send + 'static,
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
                on_programmed(t.elapsed());
            }
            tracing::debug!(generation, names, synced, took = ?started.elapsed(), "dns index published");
            last_gen = generation;
        }
        tokio::select! {
            _ = &mut shutdown => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}
