//! Beyond the zone: forwarding to real upstreams on loopback, cache, serve-stale, the in-flight cap, loop detection, the search-path shortcut, metrics and health, `waypost resolve`.
//!
//! The upstream is waypost itself serving a second zone, `example`, from a state file.

use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType::*;

use crate::support::*;

/// The upstream: the fixture served as zone `example`.
fn upstream(args: &[&str]) -> Waypost {
    let mut a = vec!["--cluster-domain", "example"];
    a.extend_from_slice(args);
    Waypost::start(&fixture(), &a)
}

fn with_external_alias() -> String {
    let mut y = fixture();
    y.push_str("- kind: Service\n  apiVersion: v1\n  metadata: {name: ext2, namespace: shop}\n  spec: {type: ExternalName, externalName: web.shop.svc.example}\n");
    y
}

fn requests(w: &Waypost) -> f64 {
    w.metric_sum("coredns_dns_requests_total", &[])
}

#[test]
fn names_outside_the_zone_are_forwarded_with_recursion_available() {
    let up = upstream(&[]);
    let up_addr = up.addr.to_string();
    let w = Waypost::start(&fixture(), &["--upstream", &up_addr]);
    let m = w.query("web.shop.svc.example", A);
    assert_eq!(rrs(&m.answers), ["A 10.96.1.1"]);
    assert!(m.metadata.recursion_available);
    let m = w.query("web.shop.svc.cluster.local", A);
    assert!(m.metadata.recursion_available, "cluster answers carry RA too once forwarding is on");
    assert!(m.metadata.authoritative);
}

#[test]
fn forwarded_answers_and_negative_answers_are_cached() {
    let up = upstream(&[]);
    let w = Waypost::start(&fixture(), &["--upstream", &up.addr.to_string()]);
    let before = requests(&up);
    let first = w.query("dual.shop.svc.example", A);
    let second = w.query("dual.shop.svc.example", A);
    assert_eq!(rrs(&first.answers), rrs(&second.answers));
    assert!(second.answers[0].ttl <= 5);
    assert_eq!(requests(&up) - before, 1.0, "second answer came from the cache");
    let before = requests(&up);
    for _ in 0..3 {
        let m = w.query("nope.shop.svc.example", A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(m.authorities.len(), 1, "SOA kept for negative caching");
    }
    assert_eq!(requests(&up) - before, 1.0, "NXDOMAIN cached per its SOA minimum");
    assert!(w.metric_sum("coredns_cache_hits_total", &["type=\"denial\""]) >= 2.0);
    assert!(w.metric_sum("coredns_cache_hits_total", &["type=\"success\""]) >= 1.0);
}

#[test]
fn truncated_upstream_answers_are_retried_over_tcp() {
    let mut big = fixture();
    big.push_str("- kind: Service\n  apiVersion: v1\n  metadata: {name: big, namespace: shop}\n  spec: {clusterIP: None}\n");
    big.push_str("- kind: EndpointSlice\n  apiVersion: discovery.k8s.io/v1\n  metadata: {name: big-a, namespace: shop, labels: {kubernetes.io/service-name: big}}\n  addressType: IPv4\n  endpoints:\n");
    for i in 0..200 {
        big.push_str(&format!("  - {{addresses: [10.3.{}.{}]}}\n", i / 200, i % 200 + 1));
    }
    let up = Waypost::start(&big, &["--cluster-domain", "example"]);
    let w = Waypost::start(&fixture(), &["--upstream", &up.addr.to_string()]);
    let mut t = w.tcp();
    let m = tcp_exchange(&mut t, &request("big.shop.svc.example", A, None));
    assert_eq!(m.answers.len(), 200);
    assert!(up.metric_sum("coredns_dns_requests_total", &["proto=\"tcp\""]) >= 1.0, "upstream was asked over TCP");
    // A UDP client without EDNS gets TC and can retry over TCP.
    let q = request("big.shop.svc.example", A, None);
    let m = Message::from_vec(&w.udp(&q.to_vec().unwrap()).unwrap()).unwrap();
    assert!(m.metadata.truncation);
}

#[test]
fn a_dead_upstream_fails_over_to_the_next() {
    let up = upstream(&[]);
    let dead = UdpSocket::bind("127.0.0.1:0").unwrap(); // bound, never answers
    let dead_addr = dead.local_addr().unwrap().to_string();
    let w = Waypost::start(
        &fixture(),
        &["--upstream", &dead_addr, "--upstream", &up.addr.to_string(), "--upstream-policy", "sequential", "--upstream-timeout-ms", "300"],
    );
    for name in ["web.shop.svc.example", "dual.shop.svc.example", "db.shop.svc.example"] {
        let m = w.query(name, A);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
        assert!(!m.answers.is_empty(), "{name}");
    }
}

#[test]
fn stale_answers_are_served_when_every_upstream_fails() {
    let up = upstream(&["--ttl", "1"]);
    let w = Waypost::start(&fixture(), &["--upstream", &up.addr.to_string(), "--cache-min-ttl", "1", "--upstream-timeout-ms", "300"]);
    assert_eq!(rrs(&w.query("web.shop.svc.example", A).answers), ["A 10.96.1.1"]);
    drop(up);
    std::thread::sleep(Duration::from_millis(1500));
    let m = w.query("web.shop.svc.example", A);
    assert_eq!(rrs(&m.answers), ["A 10.96.1.1"], "served stale");
    assert_eq!(m.answers[0].ttl, 30, "stale answers carry TTL 30 (RFC 8767)");
    // A name never cached fails.
    assert_eq!(w.query("dual.shop.svc.example", A).metadata.response_code, ResponseCode::ServFail);
}

#[test]
fn queries_beyond_the_in_flight_cap_are_refused_and_counted() {
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let w = Waypost::start(
        &fixture(),
        &["--upstream", &silent.local_addr().unwrap().to_string(), "--max-inflight", "1", "--upstream-timeout-ms", "3000"],
    );
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1000))).unwrap();
    let q1 = request("one.example", A, None).to_vec().unwrap();
    s.send_to(&q1, w.addr).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let m = w.query("two.example", A);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert_eq!(w.metric_sum("coredns_forward_max_concurrent_rejects_total", &[]), 1.0);
}

#[test]
fn a_forwarding_loop_is_detected_at_startup() {
    // Pick a port for waypost, and a relay that sends every query it gets back to it.
    let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let relay = UdpSocket::bind("127.0.0.1:0").unwrap();
    let relay_addr = relay.local_addr().unwrap();
    relay.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stop.clone();
    let t = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((n, _)) = relay.recv_from(&mut buf) {
                let _ = relay.send_to(&buf[..n], ("127.0.0.1", port));
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.yaml");
    std::fs::write(&state, fixture()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_waypost"))
        .args(["run", "--state", state.to_str().unwrap(), "--metrics-listen", "127.0.0.1:0"])
        .args(["--dns-listen", &format!("127.0.0.1:{port}"), "--upstream", &relay_addr.to_string()])
        .output()
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    t.join().unwrap();
    assert!(!out.status.success(), "waypost must refuse to start into a loop");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("forwarding loop"), "{err}");
    // Its own address as upstream is refused too.
    let out = Command::new(env!("CARGO_BIN_EXE_waypost"))
        .args(["run", "--state", state.to_str().unwrap(), "--metrics-listen", "127.0.0.1:0"])
        .args(["--dns-listen", &format!("127.0.0.1:{port}"), "--upstream", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("own listen address"));
}

#[test]
fn externalname_to_an_external_target_is_chased_upstream_in_one_answer() {
    let up = upstream(&[]);
    let w = Waypost::start(&with_external_alias(), &["--upstream", &up.addr.to_string()]);
    let m = w.query("ext2.shop.svc.cluster.local", A);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        owned(&m.answers),
        ["ext2.shop.svc.cluster.local. CNAME web.shop.svc.example.", "web.shop.svc.example. A 10.96.1.1"]
    );
    // Without forwarding, the CNAME alone.
    let w = Waypost::start(&with_external_alias(), &[]);
    assert_eq!(rrs(&w.query("ext2.shop.svc.cluster.local", A).answers), ["CNAME web.shop.svc.example."]);
}

#[test]
fn the_search_shortcut_answers_the_first_existing_candidate_in_one_round_trip() {
    let up = upstream(&[]);
    let up_addr = up.addr.to_string();
    let w = Waypost::start(&fixture(), &["--upstream", &up_addr, "--search-shortcut", "on"]);
    // A pod in `shop` looks up `web.shop.svc.example` (fewer than 5 dots): first candidate.
    let m = w.query("web.shop.svc.example.shop.svc.cluster.local", A);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        owned(&m.answers),
        ["web.shop.svc.example. A 10.96.1.1", "web.shop.svc.example.shop.svc.cluster.local. CNAME web.shop.svc.example."]
    );
    // `db.shop` from a pod in `other`: the second candidate, inside the zone.
    let m = w.query("db-1.db.shop.other.svc.cluster.local", A);
    assert_eq!(
        owned(&m.answers),
        ["db-1.db.shop.other.svc.cluster.local. CNAME db-1.db.shop.svc.cluster.local.", "db-1.db.shop.svc.cluster.local. A 10.1.2.2"]
    );
    let m = w.query("web.shop.shop.svc.cluster.local", A);
    assert_eq!(
        owned(&m.answers),
        ["web.shop.shop.svc.cluster.local. CNAME web.shop.svc.cluster.local.", "web.shop.svc.cluster.local. A 10.96.1.1"]
    );
    assert_eq!(w.metric_sum("waypost_search_shortcut_hits_total", &[]), 3.0);
    // Nothing exists anywhere: NXDOMAIN as without the shortcut.
    assert_eq!(w.query("nothing.here.shop.svc.cluster.local", A).metadata.response_code, ResponseCode::NXDomain);
    // Off: the plain NXDOMAIN.
    let w = Waypost::start(&fixture(), &["--upstream", &up_addr]);
    assert_eq!(w.query("web.shop.shop.svc.cluster.local", A).metadata.response_code, ResponseCode::NXDomain);
}

#[test]
fn metrics_health_and_readiness_are_served() {
    let w = Waypost::start(&fixture(), &[]);
    w.query("web.shop.svc.cluster.local", A);
    w.query("nope.shop.svc.cluster.local", AAAA);
    assert_eq!(w.http_get("/healthz").0, 200);
    assert_eq!(w.http_get("/readyz").0, 200);
    let (code, body) = w.http_get("/metrics");
    assert_eq!(code, 200);
    for name in ["coredns_dns_requests_total", "coredns_dns_responses_total", "coredns_dns_request_duration_seconds_bucket", "waypost_programming_latency_seconds_count"] {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
    assert!(w.metric_sum("coredns_dns_requests_total", &["type=\"A\""]) >= 1.0);
    assert!(w.metric_sum("coredns_dns_responses_total", &["rcode=\"NXDOMAIN\""]) >= 1.0);
    assert!(w.metric_sum("waypost_programming_latency_seconds_count", &[]) >= 1.0);
    // Not ready until the state has loaded.
    let w = Waypost::spawn("items: [broken", &[]);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(w.http_get("/healthz").0, 200);
    assert_eq!(w.http_get("/readyz").0, 503);
}

#[test]
fn waypost_resolve_replays_the_search_walk() {
    let w = Waypost::start(&fixture(), &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_waypost"))
        .args(["resolve", "web.shop", "--namespace", "other", "--server", &w.addr.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1. web.shop.other.svc.cluster.local."), "{text}");
    assert!(text.contains("NXDomain"), "{text}");
    assert!(text.contains("result: web.shop.svc.cluster.local. after 2 queries"), "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_waypost"))
        .args(["resolve", "missing", "--namespace", "shop", "--server", &w.addr.to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("result: Refused"), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn popular_cached_answers_are_refreshed_before_they_expire() {
    let up = upstream(&["--ttl", "10"]);
    let w = Waypost::start(&fixture(), &["--upstream", &up.addr.to_string(), "--cache-min-ttl", "1"]);
    for _ in 0..3 {
        assert_eq!(rrs(&w.query("web.shop.svc.example", A).answers), ["A 10.96.1.1"]);
    }
    let before = requests(&up);
    // With under 10% of the TTL left, a hit answers from the cache and refreshes it upstream.
    std::thread::sleep(Duration::from_millis(9300));
    let m = w.query("web.shop.svc.example", A);
    assert_eq!(rrs(&m.answers), ["A 10.96.1.1"]);
    assert!(m.answers[0].ttl <= 1, "served from the cache: ttl {}", m.answers[0].ttl);
    let start = std::time::Instant::now();
    while requests(&up) - before < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(3), "no prefetch reached the upstream");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(w.metric_sum("coredns_cache_prefetch_total", &[]) >= 1.0);
    // The refreshed entry answers with a fresh TTL, from the cache.
    let before = requests(&up);
    assert!(w.query("web.shop.svc.example", A).answers[0].ttl > 5);
    assert_eq!(requests(&up) - before, 0.0);
}
