//! Every record form of the Kubernetes DNS spec, answered from a state file, with a negative case each.

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType::*;

use crate::support::*;

fn server() -> Waypost {
    Waypost::start(&fixture(), &[])
}

#[test]
fn clusterip_service_answers_its_ip_and_nodata_for_the_missing_family() {
    let w = server();
    let m = w.query("web.shop.svc.cluster.local", A);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(rrs(&m.answers), ["A 10.96.1.1"]);
    assert_eq!(m.answers[0].ttl, 5);
    let m = w.query("web.shop.svc.cluster.local", AAAA);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert_eq!(rrs(&m.authorities).len(), 1);
    assert!(rrs(&m.authorities)[0].starts_with("SOA ns.dns.cluster.local. hostmaster.cluster.local."));
    assert_eq!(m.authorities[0].ttl, 5);
}

#[test]
fn dual_stack_service_answers_each_family() {
    let w = server();
    assert_eq!(rrs(&w.query("dual.shop.svc.cluster.local", A).answers), ["A 10.96.1.2"]);
    assert_eq!(rrs(&w.query("dual.shop.svc.cluster.local", AAAA).answers), ["AAAA fd00::1:2"]);
}

#[test]
fn headless_service_answers_only_ready_endpoints() {
    let w = server();
    let m = w.query("db.shop.svc.cluster.local", A);
    assert_eq!(rrs(&m.answers), ["A 10.1.2.1", "A 10.1.2.2", "A 10.1.2.3"]);
    assert_eq!(rrs(&w.query("db.shop.svc.cluster.local", AAAA).answers), ["AAAA fd00::2:1"]);
}

#[test]
fn headless_service_with_publish_not_ready_addresses_answers_all_endpoints() {
    let w = server();
    assert_eq!(rrs(&w.query("peers.shop.svc.cluster.local", A).answers), ["A 10.1.4.1", "A 10.1.4.2"]);
}

#[test]
fn headless_service_without_ready_endpoints_is_nxdomain() {
    let w = server();
    let m = w.query("cold.shop.svc.cluster.local", A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities.len(), 1, "SOA in authority");
}

#[test]
fn srv_for_a_clusterip_named_port_points_at_the_service_with_its_address() {
    let w = server();
    let m = w.query("_http._tcp.web.shop.svc.cluster.local", SRV);
    assert_eq!(rrs(&m.answers), ["SRV 0 100 80 web.shop.svc.cluster.local."]);
    assert_eq!(owned(&m.additionals), ["web.shop.svc.cluster.local. A 10.96.1.1"]);
    // Wrong protocol and unnamed ports have no SRV.
    assert_eq!(w.query("_http._udp.web.shop.svc.cluster.local", SRV).metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(w.query("_9000._udp.web.shop.svc.cluster.local", SRV).metadata.response_code, ResponseCode::NXDomain);
    // The protocol label is an empty non-terminal.
    let m = w.query("_tcp.web.shop.svc.cluster.local", SRV);
    assert_eq!((m.metadata.response_code, m.answers.len()), (ResponseCode::NoError, 0));
}

#[test]
fn srv_for_a_dual_stack_service_carries_both_addresses() {
    let w = server();
    let m = w.query("_grpc._tcp.dual.shop.svc.cluster.local", SRV);
    assert_eq!(rrs(&m.answers), ["SRV 0 100 9090 dual.shop.svc.cluster.local."]);
    assert_eq!(rrs(&m.additionals), ["A 10.96.1.2", "AAAA fd00::1:2"]);
}

#[test]
fn srv_for_a_headless_service_lists_each_ready_endpoint_by_hostname_or_dashed_ip() {
    let w = server();
    let m = w.query("_pg._tcp.db.shop.svc.cluster.local", SRV);
    assert_eq!(
        rrs(&m.answers),
        [
            "SRV 0 33 5432 10-1-2-3.db.shop.svc.cluster.local.",
            "SRV 0 33 5432 db-0.db.shop.svc.cluster.local.",
            "SRV 0 33 5432 db-1.db.shop.svc.cluster.local.",
        ]
    );
    assert_eq!(
        owned(&m.additionals),
        [
            "10-1-2-3.db.shop.svc.cluster.local. A 10.1.2.3",
            "db-0.db.shop.svc.cluster.local. A 10.1.2.1",
            "db-0.db.shop.svc.cluster.local. AAAA fd00::2:1",
            "db-1.db.shop.svc.cluster.local. A 10.1.2.2",
        ]
    );
}

#[test]
fn endpoint_names_answer_by_hostname_and_by_dashed_ip() {
    let w = server();
    assert_eq!(rrs(&w.query("db-1.db.shop.svc.cluster.local", A).answers), ["A 10.1.2.2"]);
    assert_eq!(rrs(&w.query("db-0.db.shop.svc.cluster.local", AAAA).answers), ["AAAA fd00::2:1"]);
    assert_eq!(rrs(&w.query("10-1-2-3.db.shop.svc.cluster.local", A).answers), ["A 10.1.2.3"]);
    // ClusterIP services name their ready endpoints too, as CoreDNS does.
    assert_eq!(rrs(&w.query("10-1-1-1.web.shop.svc.cluster.local", A).answers), ["A 10.1.1.1"]);
    // Not-ready endpoints have no name.
    for name in ["db-3.db.shop.svc.cluster.local", "10-1-1-2.web.shop.svc.cluster.local"] {
        assert_eq!(w.query(name, A).metadata.response_code, ResponseCode::NXDomain, "{name}");
    }
}

#[test]
fn externalname_answers_a_cname_and_chases_targets_inside_the_zone() {
    let w = server();
    let m = w.query("ext.shop.svc.cluster.local", A);
    assert_eq!(rrs(&m.answers), ["CNAME api.example.com."]);
    let m = w.query("alias.other.svc.cluster.local", A);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        owned(&m.answers),
        ["alias.other.svc.cluster.local. CNAME web.shop.svc.cluster.local.", "web.shop.svc.cluster.local. A 10.96.1.1"]
    );
    let m = w.query("alias.other.svc.cluster.local", CNAME);
    assert_eq!(rrs(&m.answers), ["CNAME web.shop.svc.cluster.local."]);
    let m = w.query("dangling.other.svc.cluster.local", A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(rrs(&m.answers), ["CNAME gone.shop.svc.cluster.local."]);
}

#[test]
fn ptr_answers_for_cluster_ips_and_endpoints_and_refuses_unknown_addresses() {
    let w = server();
    assert_eq!(rrs(&w.query("1.1.96.10.in-addr.arpa", PTR).answers), ["PTR web.shop.svc.cluster.local."]);
    assert_eq!(rrs(&w.query("2.2.1.10.in-addr.arpa", PTR).answers), ["PTR db-1.db.shop.svc.cluster.local."]);
    assert_eq!(rrs(&w.query("3.2.1.10.in-addr.arpa", PTR).answers), ["PTR 10-1-2-3.db.shop.svc.cluster.local."]);
    let v6 = "2.0.0.0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa";
    assert_eq!(rrs(&w.query(v6, PTR).answers), ["PTR dual.shop.svc.cluster.local."]);
    assert_eq!(w.query("9.9.9.10.in-addr.arpa", PTR).metadata.response_code, ResponseCode::Refused);
}

#[test]
fn reverse_names_inside_the_cluster_cidrs_are_answered_here() {
    let w = Waypost::start(&fixture(), &["--reverse-cidr", "10.96.0.0/12", "--reverse-cidr", "fd00::/64"]);
    assert_eq!(rrs(&w.query("1.1.96.10.in-addr.arpa", PTR).answers), ["PTR web.shop.svc.cluster.local."]);
    let m = w.query("9.9.96.10.in-addr.arpa", PTR);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "unknown, but inside the service CIDR");
    assert_eq!(m.authorities.len(), 1);
    let v6 = "9.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa";
    assert_eq!(w.query(v6, PTR).metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(w.query("1.1.1.1.in-addr.arpa", PTR).metadata.response_code, ResponseCode::Refused, "outside: not ours");
}

#[test]
fn pod_records_follow_the_mode() {
    let name = "10-1-1-1.shop.pod.cluster.local";
    let w = Waypost::start(&fixture(), &[]);
    assert_eq!(w.query(name, A).metadata.response_code, ResponseCode::NXDomain, "disabled by default");
    let w = Waypost::start(&fixture(), &["--pod-records", "insecure"]);
    assert_eq!(rrs(&w.query(name, A).answers), ["A 10.1.1.1"]);
    assert_eq!(rrs(&w.query("10-9-9-9.any.pod.cluster.local", A).answers), ["A 10.9.9.9"]);
    assert_eq!(rrs(&w.query("fd00--9.any.pod.cluster.local", AAAA).answers), ["AAAA fd00::9"]);
    let m = w.query(name, AAAA);
    assert_eq!((m.metadata.response_code, m.answers.len()), (ResponseCode::NoError, 0));
    assert_eq!(w.query("not-an-ip.shop.pod.cluster.local", A).metadata.response_code, ResponseCode::NXDomain);
    let w = Waypost::start(&fixture(), &["--pod-records", "verified"]);
    assert_eq!(rrs(&w.query(name, A).answers), ["A 10.1.1.1"]);
    assert_eq!(w.query("10-1-1-1.other.pod.cluster.local", A).metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(w.query("10-9-9-9.shop.pod.cluster.local", A).metadata.response_code, ResponseCode::NXDomain);
}

#[test]
fn apex_serves_soa_ns_and_the_schema_version() {
    let w = server();
    assert_eq!(rrs(&w.query("dns-version.cluster.local", TXT).answers), ["TXT 1.1.0"]);
    let m = w.query("cluster.local", SOA);
    assert_eq!(m.answers.len(), 1);
    assert!(rrs(&m.answers)[0].ends_with(" 7200 1800 86400 5"), "{:?}", rrs(&m.answers));
    let m = w.query("cluster.local", NS);
    assert_eq!(rrs(&m.answers), ["NS ns.dns.cluster.local."]);
    assert_eq!(owned(&m.additionals), ["ns.dns.cluster.local. A 10.96.0.10"]);
}

#[test]
fn missing_names_are_nxdomain_and_empty_non_terminals_are_nodata_both_with_soa() {
    let w = server();
    for name in ["nope.shop.svc.cluster.local", "web.nope.svc.cluster.local", "x.cluster.local", "web.shop.svc.cluster.local.shop.svc.cluster.local"] {
        let m = w.query(name, A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert_eq!(rrs(&m.authorities).len(), 1, "{name}");
    }
    for name in ["shop.svc.cluster.local", "svc.cluster.local"] {
        let m = w.query(name, A);
        assert_eq!((m.metadata.response_code, m.answers.len()), (ResponseCode::NoError, 0), "{name}");
        assert!(rrs(&m.authorities)[0].starts_with("SOA"), "{name}");
    }
}

#[test]
fn names_outside_the_zone_are_refused() {
    let w = server();
    let m = w.query("example.com", A);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(!m.metadata.authoritative);
}

#[test]
fn another_cluster_domain_and_ttl_are_honoured() {
    let yaml = fixture();
    let w = Waypost::start(&yaml, &["--cluster-domain", "corp.internal", "--ttl", "30"]);
    let m = w.query("web.shop.svc.corp.internal", A);
    assert_eq!(rrs(&m.answers), ["A 10.96.1.1"]);
    assert_eq!(m.answers[0].ttl, 30);
    assert_eq!(w.query("web.shop.svc.cluster.local", A).metadata.response_code, ResponseCode::Refused);
}
