//! Forwarding, forward-cache and metrics behaviour over real sockets against scriptable test upstreams.

mod support;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};
use waypost_dns::cache::{Cache, CacheConfig, CacheKey};
use waypost_dns::metrics::{CacheKind, Metrics};
use waypost_dns::upstream::{Policy, Transport, UpstreamConfig, UpstreamError, Upstreams};

use support::{Mode, TestDns, dead_addr, eventually, parse, query};

const WEB: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

fn config(servers: Vec<std::net::SocketAddr>) -> UpstreamConfig {
    UpstreamConfig {
        policy: Policy::Sequential,
        timeout: Duration::from_millis(300),
        health_check_interval: Duration::from_millis(50),
        ..UpstreamConfig::new(servers)
    }
}

fn metrics() -> Arc<Metrics> {
    Arc::new(Metrics::new("dns://:53", &["cluster.local.", "."]))
}

fn a_records(bytes: &[u8]) -> Vec<Ipv4Addr> {
    parse(bytes)
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn forwarded_answer_carries_the_clients_id() {
    let up = TestDns::start(&[("www.example.", WEB)]).await;
    let m = metrics();
    let fwd = Upstreams::new(config(vec![up.addr]), Arc::clone(&m));
    let resp = fwd.forward(&query(0xBEEF, "WWW.example.", RecordType::A)).await.unwrap();
    let msg = parse(&resp);
    assert_eq!(msg.metadata.id, 0xBEEF);
    assert_eq!(a_records(&resp), vec![WEB]);
    let nx = parse(&fwd.forward(&query(7, "nope.example.", RecordType::A)).await.unwrap());
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(up.udp_queries(), 2);
    assert_eq!(up.tcp_queries(), 0);
    assert_eq!(fwd.inflight(), 0);
    // Per-upstream latency and rcodes reach the metrics.
    let text = m.render();
    let to = up.addr.to_string();
    assert!(text.contains(&format!("coredns_forward_requests_total{{to=\"{to}\"}} 2")), "{text}");
    assert!(text.contains(&format!("coredns_forward_responses_total{{to=\"{to}\",rcode=\"NXDOMAIN\"}} 1")));
    assert!(
        text.contains(&format!("coredns_forward_request_duration_seconds_count{{to=\"{to}\",rcode=\"NOERROR\"}} 1"))
    );
}

#[tokio::test]
async fn truncated_udp_answer_is_retried_over_tcp() {
    let up = TestDns::start(&[("big.example.", WEB)]).await;
    up.set_mode(Mode::TruncateUdp);
    let fwd = Upstreams::new(config(vec![up.addr]), metrics());
    let resp = fwd.forward(&query(42, "big.example.", RecordType::A)).await.unwrap();
    assert_eq!(parse(&resp).metadata.id, 42);
    assert!(!parse(&resp).metadata.truncation);
    assert_eq!(a_records(&resp), vec![WEB]);
    assert_eq!((up.udp_queries(), up.tcp_queries()), (1, 1));
}

#[tokio::test]
async fn replies_with_the_wrong_id_or_question_are_ignored() {
    let up = TestDns::start(&[("www.example.", WEB), ("zww.example.", Ipv4Addr::new(6, 6, 6, 6))]).await;
    up.set_mode(Mode::SpoofFirst);
    let fwd = Upstreams::new(config(vec![up.addr]), metrics());
    let resp = fwd.forward(&query(77, "www.example.", RecordType::A)).await.unwrap();
    let msg = parse(&resp);
    assert_eq!(msg.metadata.id, 77);
    assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
    assert_eq!(msg.queries[0].name().to_ascii(), "www.example.");
    assert_eq!(a_records(&resp), vec![WEB]);
}

#[tokio::test]
async fn tcp_transport_skips_udp() {
    let up = TestDns::start(&[("www.example.", WEB)]).await;
    let fwd = Upstreams::new(config(vec![up.addr]), metrics());
    let resp = fwd.forward_via(&query(5, "www.example.", RecordType::A), Transport::Tcp).await.unwrap();
    assert_eq!(parse(&resp).metadata.id, 5);
    assert_eq!(a_records(&resp), vec![WEB]);
    assert_eq!((up.udp_queries(), up.tcp_queries()), (0, 1));
}

#[tokio::test]
async fn pooled_tcp_connection_carries_several_queries() {
    let up = TestDns::start(&[("big.example.", WEB)]).await;
    up.set_mode(Mode::TruncateUdp);
    let fwd = Upstreams::new(config(vec![up.addr]), metrics());
    for id in 0..5u16 {
        let resp = fwd.forward(&query(id, "big.example.", RecordType::A)).await.unwrap();
        assert_eq!(parse(&resp).metadata.id, id);
        assert_eq!(a_records(&resp), vec![WEB]);
    }
    assert_eq!(up.tcp_queries(), 5);
    assert_eq!(up.tcp_connections(), 1, "every TCP query should reuse the pooled connection");
}

#[tokio::test]
async fn idle_pooled_connection_expires() {
    let up = TestDns::start(&[("big.example.", WEB)]).await;
    up.set_mode(Mode::TruncateUdp);
    let fwd = Upstreams::new(
        UpstreamConfig { tcp_idle_timeout: Duration::from_millis(100), ..config(vec![up.addr]) },
        metrics(),
    );
    fwd.forward(&query(1, "big.example.", RecordType::A)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    // The idle connection expired: a new one is opened instead of reusing a stale one.
    fwd.forward(&query(2, "big.example.", RecordType::A)).await.unwrap();
    assert_eq!(up.tcp_connections(), 2);
}

#[tokio::test]
async fn pooled_connection_closed_by_the_upstream_is_replaced_transparently() {
    let up = TestDns::start(&[("big.example.", WEB)]).await;
    up.set_mode(Mode::TruncateUdp);
    let fwd = Upstreams::new(config(vec![up.addr]), metrics());
    fwd.forward(&query(1, "big.example.", RecordType::A)).await.unwrap();
    up.close_tcp_connections();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let resp = fwd.forward(&query(2, "big.example.", RecordType::A)).await.unwrap();
    assert_eq!(a_records(&resp), vec![WEB]);
    assert_eq!(up.tcp_connections(), 2);
}

#[tokio::test]
async fn dead_first_upstream_fails_over_to_the_next() {
    let dead = dead_addr().await;
    let up = TestDns::start(&[("www.example.", WEB)]).await;
    let fwd = Upstreams::new(config(vec![dead, up.addr]), metrics());
    let resp = fwd.forward(&query(9, "www.example.", RecordType::A)).await.unwrap();
    assert_eq!(a_records(&resp), vec![WEB]);
    assert_eq!(parse(&resp).metadata.id, 9);
}

#[tokio::test]
async fn silent_upstream_times_out_and_fails_over() {
    let silent = TestDns::start(&[("www.example.", WEB)]).await;
    silent.set_mode(Mode::Drop);
    let up = TestDns::start(&[("www.example.", WEB)]).await;
    let fwd = Upstreams::new(config(vec![silent.addr, up.addr]), metrics());
    let started = Instant::now();
    let resp = fwd.forward(&query(9, "www.example.", RecordType::A)).await.unwrap();
    assert_eq!(a_records(&resp), vec![WEB]);
    assert!(started.elapsed() >= Duration::from_millis(300), "should wait one timeout first");
    assert_eq!(silent.udp_queries(), 1);
}

#[tokio::test]
async fn all_upstreams_silent_gives_a_timeout_error() {
    let silent = TestDns::start(&[]).await;
    silent.set_mode(Mode::Drop);
    let fwd = Upstreams::new(config(vec![silent.addr]), metrics());
    let err = fwd.forward(&query(1, "www.example.", RecordType::A)).await.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert_eq!(err.upstream(), Some(silent.addr));
}

#[tokio::test]
async fn unhealthy_upstream_is_skipped_then_brought_back_by_health_checks() {
    let first = TestDns::start(&[("www.example.", WEB)]).await;
    let second = TestDns::start(&[("www.example.", WEB)]).await;
    first.set_mode(Mode::Drop);
    let fwd = Upstreams::new(config(vec![first.addr, second.addr]), metrics());
    // Two failures (max_fails = 2) mark the first upstream down.
    for id in 0..2 {
        fwd.forward(&query(id, "www.example.", RecordType::A)).await.unwrap();
    }
    assert_eq!(fwd.health(), vec![(first.addr, false), (second.addr, true)]);
    // While down it is not tried: this answer comes without waiting out its 300 ms timeout.
    let started = Instant::now();
    fwd.forward(&query(3, "www.example.", RecordType::A)).await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(300));
    // Probes (". NS") keep arriving while it stays silent...
    let before = first.udp_queries();
    assert!(eventually(Duration::from_secs(2), || first.udp_queries() > before + 1).await);
    // ...and once it answers it is healthy again and, being first, gets the traffic.
    first.set_mode(Mode::Answer);
    assert!(eventually(Duration::from_secs(2), || fwd.health()[0].1).await, "health check never succeeded");
    let second_before = second.udp_queries();
    fwd.forward(&query(4, "www.example.", RecordType::A)).await.unwrap();
    assert_eq!(second.udp_queries(), second_before);
}

#[tokio::test]
async fn every_upstream_down_still_tries_them() {
    let up = TestDns::start(&[("www.example.", WEB)]).await;
    up.set_mode(Mode::Drop);
    let m = metrics();
    // Probes are slow here so the upstream stays marked down for the whole test.
    let fwd = Upstreams::new(
        UpstreamConfig { max_fails: 1, health_check_interval: Duration::from_secs(60), ..config(vec![up.addr]) },
        Arc::clone(&m),
    );
    assert!(fwd.forward(&query(1, "www.example.", RecordType::A)).await.is_err());
    assert!(!fwd.health()[0].1);
    up.set_mode(Mode::Answer);
    // Health checking may be what is broken: the down upstream is tried anyway.
    let resp = fwd.forward(&query(2, "www.example.", RecordType::A)).await.unwrap();
    assert_eq!(a_records(&resp), vec![WEB]);
    assert!(m.render().contains("coredns_forward_healthcheck_broken_total 1"));
}

#[tokio::test]
async fn queries_beyond_the_inflight_cap_are_refused_at_once() {
    let silent = TestDns::start(&[]).await;
    silent.set_mode(Mode::Drop);
    let m = metrics();
    let fwd = Upstreams::new(
        UpstreamConfig { max_inflight: 2, timeout: Duration::from_secs(2), ..config(vec![silent.addr]) },
        Arc::clone(&m),
    );
    let waiting: Vec<_> = (0..2)
        .map(|id| {
            let fwd = fwd.clone();
            tokio::spawn(async move { fwd.forward(&query(id, "slow.example.", RecordType::A)).await })
        })
        .collect();
    assert!(eventually(Duration::from_secs(1), || fwd.inflight() == 2).await);
    let started = Instant::now();
    let err = fwd.forward(&query(3, "slow.example.", RecordType::A)).await.unwrap_err();
    assert!(err.is_overloaded(), "{err}");
    assert!(matches!(err, UpstreamError::Overloaded { limit: 2 }));
    assert!(started.elapsed() < Duration::from_secs(1), "refused without waiting for the 2 s timeout");
    assert_eq!(m.forward_rejects(), 1);
    assert!(m.render().contains("coredns_forward_max_concurrent_rejects_total 1"));
    for w in waiting {
        w.abort();
    }
    // Cancelled forwards give their slots back.
    assert!(eventually(Duration::from_secs(1), || fwd.inflight() == 0).await);
}

#[tokio::test]
async fn round_robin_spreads_queries_over_upstreams() {
    let a = TestDns::start(&[("www.example.", WEB)]).await;
    let b = TestDns::start(&[("www.example.", WEB)]).await;
    let fwd = Upstreams::new(UpstreamConfig { policy: Policy::RoundRobin, ..config(vec![a.addr, b.addr]) }, metrics());
    for id in 0..6 {
        fwd.forward(&query(id, "www.example.", RecordType::A)).await.unwrap();
    }
    assert_eq!((a.udp_queries(), b.udp_queries()), (3, 3));
}

#[tokio::test]
async fn forwarded_answers_are_cached_with_decreasing_ttls_and_served_stale() {
    let up = TestDns::start(&[("www.example.", WEB)]).await;
    up.set_ttl(120);
    let m = metrics();
    let fwd = Upstreams::new(config(vec![up.addr]), Arc::clone(&m));
    let cache = Cache::with_metrics(CacheConfig::default(), Arc::clone(&m));
    let t0 = Instant::now();

    let q = query(1, "www.example.", RecordType::A);
    let key = CacheKey::from_query(&q).unwrap();
    assert!(cache.get(&key, 1, t0).is_none());
    let resp = fwd.forward(&q).await.unwrap();
    assert!(cache.insert(key.clone(), &resp, t0));

    let hit = cache.get(&key, 0x7777, t0 + Duration::from_secs(45)).unwrap();
    let msg = parse(&hit.response);
    assert_eq!(msg.metadata.id, 0x7777);
    assert_eq!(msg.answers[0].ttl, 75);
    assert_eq!(a_records(&hit.response), vec![WEB]);

    // NXDOMAIN is cached for the SOA MINIMUM (60 s), not the SOA TTL (3600 s).
    let nq = query(2, "missing.example.", RecordType::A);
    let nkey = CacheKey::from_query(&nq).unwrap();
    assert!(cache.insert(nkey.clone(), &fwd.forward(&nq).await.unwrap(), t0));
    let nhit = cache.get(&nkey, 2, t0 + Duration::from_secs(59)).unwrap();
    assert_eq!(nhit.kind, CacheKind::Denial);
    assert_eq!(parse(&nhit.response).metadata.response_code, ResponseCode::NXDomain);
    assert!(cache.get(&nkey, 2, t0 + Duration::from_secs(60)).is_none());

    // Upstream gone, entry expired: serve stale with TTL 30.
    up.set_mode(Mode::Drop);
    let later = t0 + Duration::from_secs(500);
    assert!(cache.get(&key, 3, later).is_none());
    let stale = cache.get_stale(&key, 3, later).unwrap();
    assert_eq!(parse(&stale).answers[0].ttl, 30);
    assert_eq!(m.cache_hits(CacheKind::Success), 1);
    assert_eq!(m.cache_hits(CacheKind::Denial), 1);
    assert!(m.cache_misses() >= 3);

    let text = m.render();
    assert_exposition_valid(&text);
    assert!(text.contains("coredns_cache_entries{server=\"dns://:53\",type=\"success\",zones=\".\"} 1"));
    assert!(text.contains("coredns_cache_served_stale_total{server=\"dns://:53\",zones=\".\"} 1"));
}

#[tokio::test]
async fn metrics_endpoint_serves_valid_exposition() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let m = metrics();
    m.record_request(0, waypost_dns::metrics::Proto::Udp, waypost_dns::metrics::Family::V4, 1);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(waypost_dns::metrics::serve_http(listener, Arc::clone(&m), async {
        let _ = stopped.await;
    }));
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").await.unwrap();
    let mut resp = String::new();
    conn.read_to_string(&mut resp).await.unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"));
    assert!(head.contains("text/plain; version=0.0.4"));
    assert_exposition_valid(body);
    assert!(body.contains("type=\"A\"} 1"));
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// Checks every line against the text exposition grammar: `# HELP`/`# TYPE` comments, and
/// samples `name{label="value",...} value` with every sample preceded by a TYPE of its family.
fn assert_exposition_valid(text: &str) {
    let mut typed: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            typed.push((name.to_string(), kind.to_string()));
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment: {line}");
        let (series, value) = line.rsplit_once(' ').unwrap();
        assert!(value == "+Inf" || value.parse::<f64>().is_ok(), "bad value in {line}");
        let name = &series[..series.find('{').unwrap_or(series.len())];
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "bad name in {line}");
        let (family, kind) = typed.last().expect("sample before any TYPE");
        let ok = name == family
            || (kind == "histogram"
                && [format!("{family}_bucket"), format!("{family}_sum"), format!("{family}_count")]
                    .iter()
                    .any(|n| n == name));
        assert!(ok, "sample {name} is not of family {family}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels.strip_prefix('{').and_then(|l| l.strip_suffix('}')).expect("labels in braces");
            // label="value" pairs, values without unescaped quotes.
            let mut rest = inner;
            while !rest.is_empty() {
                let (k, after) = rest.split_once("=\"").expect("label=\"value\"");
                assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "bad label name {k} in {line}");
                let mut end = None;
                let mut escaped = false;
                for (i, c) in after.char_indices() {
                    match c {
                        '\\' if !escaped => escaped = true,
                        '"' if !escaped => {
                            end = Some(i);
                            break;
                        }
                        _ => escaped = false,
                    }
                }
                let end = end.expect("closing quote");
                rest = after[end + 1..].strip_prefix(',').unwrap_or(&after[end + 1..]);
            }
        }
        if kind == "histogram" && name.ends_with("_bucket") {
            assert!(series.contains("le=\""), "bucket without le: {line}");
        }
    }
}
