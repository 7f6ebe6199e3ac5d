//! Protocol behaviour: case, EDNS, truncation and TCP, malformed input, and `dig` against the server.

use std::process::Command;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType::*;

use crate::support::*;

/// The fixture plus a headless service with `n` ready endpoints.
fn with_big_headless(n: usize) -> String {
    let mut y = fixture();
    y.push_str(
        "- kind: Service\n  apiVersion: v1\n  metadata: {name: big, namespace: shop}\n  spec: {clusterIP: None, ports: [{name: http, port: 80}]}\n",
    );
    y.push_str("- kind: EndpointSlice\n  apiVersion: discovery.k8s.io/v1\n  metadata: {name: big-a, namespace: shop, labels: {kubernetes.io/service-name: big}}\n  addressType: IPv4\n  ports: [{name: http, port: 80}]\n  endpoints:\n");
    for i in 0..n {
        y.push_str(&format!("  - {{addresses: [10.2.{}.{}]}}\n", i / 250, i % 250 + 1));
    }
    y
}

#[test]
fn names_match_case_insensitively_and_the_question_case_is_echoed() {
    let w = Waypost::start(&fixture(), &[]);
    let m = w.query("WeB.ShOp.SvC.Cluster.LOCAL", A);
    assert_eq!(rrs(&m.answers), ["A 10.96.1.1"]);
    assert_eq!(m.queries[0].name().to_ascii(), "WeB.ShOp.SvC.Cluster.LOCAL.");
    assert_eq!(m.answers[0].name.to_ascii(), "WeB.ShOp.SvC.Cluster.LOCAL.");
    assert!(m.metadata.authoritative);
    assert!(m.metadata.recursion_desired, "RD is echoed");
}

#[test]
fn edns_is_echoed_only_when_the_client_sent_it() {
    let w = Waypost::start(&fixture(), &[]);
    let m = w.query("web.shop.svc.cluster.local", A);
    assert!(m.edns.is_some(), "OPT echoed");
    let plain = request("web.shop.svc.cluster.local", A, None);
    let m = Message::from_vec(&w.udp(&plain.to_vec().unwrap()).unwrap()).unwrap();
    assert!(m.edns.is_none(), "no OPT without EDNS");
    assert_eq!(rrs(&m.answers), ["A 10.96.1.1"]);
}

#[test]
fn udp_answers_that_do_not_fit_set_tc_and_tcp_returns_them_whole() {
    let w = Waypost::start(&with_big_headless(300), &[]);
    let q = request("big.shop.svc.cluster.local", A, None);
    let raw = w.udp(&q.to_vec().unwrap()).unwrap();
    assert!(raw.len() <= 512);
    let m = Message::from_vec(&raw).unwrap();
    assert!(m.metadata.truncation, "TC set at 512 bytes");
    // A larger EDNS payload still does not fit 300 records (4.8 kB) in 1232 bytes.
    let m = w.query("big.shop.svc.cluster.local", A);
    assert!(m.metadata.truncation);
    // EDNS with 65535 bytes fits everything over UDP.
    let q = request("big.shop.svc.cluster.local", A, Some(65535));
    let m = Message::from_vec(&w.udp(&q.to_vec().unwrap()).unwrap()).unwrap();
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 300);
    let mut s = w.tcp();
    let m = tcp_exchange(&mut s, &request("big.shop.svc.cluster.local", A, None));
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 300);
    let m = tcp_exchange(&mut s, &request("_http._tcp.big.shop.svc.cluster.local", SRV, None));
    assert_eq!(m.answers.len(), 300);
    assert_eq!(m.additionals.len(), 300);
}

#[test]
fn tcp_carries_several_queries_on_one_connection() {
    let w = Waypost::start(&fixture(), &[]);
    let mut s = w.tcp();
    for (name, want) in [
        ("web.shop.svc.cluster.local", "A 10.96.1.1"),
        ("dual.shop.svc.cluster.local", "A 10.96.1.2"),
        ("db-1.db.shop.svc.cluster.local", "A 10.1.2.2"),
    ] {
        let m = tcp_exchange(&mut s, &request(name, A, Some(1232)));
        assert_eq!(rrs(&m.answers), [want]);
    }
    let m = tcp_exchange(&mut s, &request("nope.shop.svc.cluster.local", A, None));
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
}

#[test]
fn malformed_queries_get_formerr_or_are_dropped_and_never_crash_the_server() {
    let w = Waypost::start(&fixture(), &[]);
    let good = request("web.shop.svc.cluster.local", A, None).to_vec().unwrap();
    // Truncated in the middle of the question: FORMERR with the same ID.
    let resp = w.udp(&good[..good.len() - 3]).expect("FORMERR answer");
    assert_eq!(&resp[..2], &good[..2]);
    assert_eq!(resp[3] & 0x0F, 1, "rcode FORMERR");
    // Two questions: FORMERR.
    let mut two = good.clone();
    two[5] = 2;
    assert_eq!(w.udp(&two).unwrap()[3] & 0x0F, 1);
    // Trailing garbage: FORMERR.
    let mut tail = good.clone();
    tail.extend_from_slice(&[1, 2, 3]);
    assert_eq!(w.udp(&tail).unwrap()[3] & 0x0F, 1);
    // An opcode other than QUERY: NOTIMP.
    let mut op = good.clone();
    op[2] |= 5 << 3;
    assert_eq!(w.udp(&op).unwrap()[3] & 0x0F, 4);
    // Shorter than a header, or a response: no answer at all.
    assert!(w.udp(&[1, 2, 3]).is_none());
    let mut resp_bit = good.clone();
    resp_bit[2] |= 0x80;
    assert!(w.udp(&resp_bit).is_none());
    // Random bytes of every length up to 300, over UDP and TCP.
    let mut seed = 0x2545F4914F6CDD1Du64;
    for len in 0..300 {
        let junk: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.send_to(&junk, w.addr).unwrap();
    }
    let mut t = w.tcp();
    use std::io::Write;
    let _ = t.write_all(&[0, 5, 1, 2, 3, 4, 5]);
    // Still serving.
    assert_eq!(rrs(&w.query("web.shop.svc.cluster.local", A).answers), ["A 10.96.1.1"]);
    let mut t = w.tcp();
    assert_eq!(rrs(&tcp_exchange(&mut t, &request("web.shop.svc.cluster.local", A, None)).answers), ["A 10.96.1.1"]);
}

#[test]
fn unsupported_edns_version_gets_badvers() {
    let w = Waypost::start(&fixture(), &[]);
    let mut q = request("web.shop.svc.cluster.local", A, Some(1232));
    q.edns.as_mut().unwrap().set_version(1);
    let m = Message::from_vec(&w.udp(&q.to_vec().unwrap()).unwrap()).unwrap();
    // 16 is BADVERS (hickory names the shared value BADSIG).
    assert_eq!(u16::from(m.metadata.response_code), 16);
}

#[test]
fn zone_transfers_are_refused() {
    let w = Waypost::start(&fixture(), &[]);
    let mut t = w.tcp();
    let m = tcp_exchange(&mut t, &request("cluster.local", AXFR, None));
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
}

#[test]
fn dig_resolves_cluster_names() {
    if !have_dig() {
        return;
    }
    let w = Waypost::start(&fixture(), &[]);
    let dig = |args: &[&str]| {
        let out = Command::new("dig")
            .args([&format!("@{}", w.addr.ip()), "-p", &w.addr.port().to_string(), "+short", "+tries=1", "+time=2"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "dig {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let mut lines: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect();
        lines.sort();
        lines
    };
    assert_eq!(dig(&["web.shop.svc.cluster.local"]), ["10.96.1.1"]);
    assert_eq!(dig(&["db.shop.svc.cluster.local"]), ["10.1.2.1", "10.1.2.2", "10.1.2.3"]);
    assert_eq!(dig(&["SRV", "_http._tcp.web.shop.svc.cluster.local"]), ["0 100 80 web.shop.svc.cluster.local."]);
    assert_eq!(dig(&["-x", "10.96.1.1"]), ["web.shop.svc.cluster.local."]);
    assert_eq!(dig(&["+tcp", "dual.shop.svc.cluster.local", "AAAA"]), ["fd00::1:2"]);
    // Full output: status and flags as dig prints them.
    let out = Command::new("dig")
        .args([&format!("@{}", w.addr.ip()), "-p", &w.addr.port().to_string(), "+tries=1", "nope.shop.svc.cluster.local"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("status: NXDOMAIN"), "{text}");
    assert!(text.contains("flags: qr aa rd"), "{text}");
}
