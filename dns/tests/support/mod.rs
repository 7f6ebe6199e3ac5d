//! A scriptable DNS server on 127.0.0.1 (UDP and TCP on one port) that plays an upstream resolver in tests.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

/// How the server treats queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Answer every query over UDP and TCP.
    Answer,
    /// Over UDP, answer with TC set and no records; TCP answers fully.
    TruncateUdp,
    /// Count queries but never answer (a black-holed upstream).
    Drop,
    /// Over UDP, first send a reply with the wrong ID and one for another name (as a spoofer
    /// would), then the real answer.
    SpoofFirst,
}

/// Shared state of a running test server.
struct State {
    /// Current behaviour, switchable during a test.
    mode: Mutex<Mode>,
    /// Names (lowercase, fully qualified) answered with A records; others get NXDOMAIN + SOA.
    records: Mutex<HashMap<String, Vec<Ipv4Addr>>>,
    /// TTL of answer records.
    ttl: Mutex<u32>,
    /// UDP datagrams received.
    udp_queries: AtomicUsize,
    /// Framed TCP queries received.
    tcp_queries: AtomicUsize,
    /// TCP connections accepted.
    tcp_connections: AtomicUsize,
    /// Tasks serving open TCP connections, so a test can close them as an idle server would.
    tcp_tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// A test DNS server; stops when dropped.
pub struct TestDns {
    /// The UDP and TCP address.
    pub addr: SocketAddr,
    state: Arc<State>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for TestDns {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.close_tcp_connections();
    }
}

impl TestDns {
    /// Starts a server answering `names` (name -> IPv4).
    pub async fn start(names: &[(&str, Ipv4Addr)]) -> TestDns {
        // UDP and TCP must share a port: retry until the TCP bind on the UDP port succeeds.
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let mut records: HashMap<String, Vec<Ipv4Addr>> = HashMap::new();
        for (n, ip) in names {
            records.entry(fqdn(n)).or_default().push(*ip);
        }
        let state = Arc::new(State {
            mode: Mutex::new(Mode::Answer),
            records: Mutex::new(records),
            ttl: Mutex::new(300),
            udp_queries: AtomicUsize::new(0),
            tcp_queries: AtomicUsize::new(0),
            tcp_connections: AtomicUsize::new(0),
            tcp_tasks: Mutex::new(Vec::new()),
        });
        let udp_task = tokio::spawn(serve_udp(udp, Arc::clone(&state)));
        let tcp_task = tokio::spawn(serve_tcp(tcp, Arc::clone(&state)));
        TestDns { addr, state, tasks: vec![udp_task, tcp_task] }
    }

    /// Switches behaviour.
    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock() = mode;
    }

    /// Sets the TTL of answer records.
    pub fn set_ttl(&self, ttl: u32) {
        *self.state.ttl.lock() = ttl;
    }

    /// UDP queries received so far.
    pub fn udp_queries(&self) -> usize {
        self.state.udp_queries.load(Ordering::SeqCst)
    }

    /// TCP queries received so far.
    pub fn tcp_queries(&self) -> usize {
        self.state.tcp_queries.load(Ordering::SeqCst)
    }

    /// Closes every open TCP connection from the server side.
    pub fn close_tcp_connections(&self) {
        for t in self.state.tcp_tasks.lock().drain(..) {
            t.abort();
        }
    }

    /// TCP connections accepted so far.
    pub fn tcp_connections(&self) -> usize {
        self.state.tcp_connections.load(Ordering::SeqCst)
    }
}

/// An address where nothing listens (UDP gets ICMP port unreachable, TCP gets RST).
pub async fn dead_addr() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.local_addr().unwrap()
}

fn fqdn(n: &str) -> String {
    let mut s = n.to_ascii_lowercase();
    if !s.ends_with('.') {
        s.push('.');
    }
    s
}

async fn serve_udp(socket: UdpSocket, state: Arc<State>) {
    let mut buf = vec![0u8; 65535];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else { continue };
        state.udp_queries.fetch_add(1, Ordering::SeqCst);
        let mode = *state.mode.lock();
        if mode == Mode::Drop {
            continue;
        }
        if mode == Mode::SpoofFirst {
            if let Some(mut wrong_id) = answer(&state, &buf[..n], false) {
                wrong_id[1] ^= 0xFF;
                wrong_id[3] = (wrong_id[3] & 0xF0) | 2; // SERVFAIL, to be noticed if accepted
                let _ = socket.send_to(&wrong_id, peer).await;
            }
            let mut other = buf[..n].to_vec();
            if let Some(b) = other.get_mut(13) {
                *b = b'z';
            }
            if let Some(wrong_name) = answer(&state, &other, false) {
                let _ = socket.send_to(&wrong_name, peer).await;
            }
        }
        if let Some(reply) = answer(&state, &buf[..n], mode == Mode::TruncateUdp) {
            let _ = socket.send_to(&reply, peer).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else { continue };
        state.tcp_connections.fetch_add(1, Ordering::SeqCst);
        let task = tokio::spawn(serve_tcp_conn(conn, Arc::clone(&state)));
        state.tcp_tasks.lock().push(task);
    }
}

async fn serve_tcp_conn(mut conn: TcpStream, state: Arc<State>) {
    loop {
        let mut len = [0u8; 2];
        if conn.read_exact(&mut len).await.is_err() {
            return;
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if conn.read_exact(&mut msg).await.is_err() {
            return;
        }
        state.tcp_queries.fetch_add(1, Ordering::SeqCst);
        if *state.mode.lock() == Mode::Drop {
            continue;
        }
        if let Some(reply) = answer(&state, &msg, false) {
            let mut frame = (reply.len() as u16).to_be_bytes().to_vec();
            frame.extend(reply);
            if conn.write_all(&frame).await.is_err() {
                return;
            }
        }
    }
}

fn answer(state: &State, query: &[u8], truncate: bool) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let mut r = Message::response(q.metadata.id, OpCode::Query);
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    r.add_queries(q.queries.clone());
    if let Some(edns) = &q.edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        e.set_dnssec_ok(edns.flags().dnssec_ok);
        r.set_edns(e);
    }
    if truncate {
        r.metadata.truncation = true;
        return r.to_vec().ok();
    }
    let question = q.queries.first()?;
    let qname = question.name().to_ascii().to_ascii_lowercase();
    let ips = state.records.lock().get(&qname).cloned();
    match ips {
        Some(ips) if question.query_type() == RecordType::A => {
            let ttl = *state.ttl.lock();
            for ip in ips {
                r.add_answer(Record::from_rdata(question.name().clone(), ttl, RData::A(A(ip))));
            }
        }
        Some(_) => {
            r.add_authority(soa());
        }
        None if qname == "." => {}
        None => {
            r.metadata.response_code = ResponseCode::NXDomain;
            r.add_authority(soa());
        }
    }
    r.to_vec().ok()
}

/// SOA with TTL 3600 and MINIMUM 60, so negative answers are cacheable for 60 s.
fn soa() -> Record {
    let zone = Name::from_str("example.").unwrap();
    let soa = SOA::new(
        Name::from_str("ns.example.").unwrap(),
        Name::from_str("hostmaster.example.").unwrap(),
        1,
        3600,
        600,
        86400,
        60,
    );
    Record::from_rdata(zone, 3600, RData::SOA(soa))
}

/// A query for `name`/`rtype` with the given ID, RD set and EDNS.
pub fn query(id: u16, name: &str, rtype: RecordType) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str(name).unwrap(), rtype));
    let mut e = Edns::new();
    e.set_max_payload(1232);
    m.set_edns(e);
    m.to_vec().unwrap()
}

/// Parses a DNS message.
pub fn parse(bytes: &[u8]) -> Message {
    Message::from_vec(bytes).expect("valid DNS message")
}

/// Polls `cond` every 10 ms for up to `within`.
pub async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}
