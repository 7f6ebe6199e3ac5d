//! The state file as a live source: edits show up fast, broken files and bad objects lose nothing good.

use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType::*;

use crate::support::*;

#[test]
fn editing_the_state_file_changes_answers_within_100ms() {
    let w = Waypost::start(&fixture(), &[]);
    assert_eq!(rrs(&w.query("web.shop.svc.cluster.local", A).answers), ["A 10.96.1.1"]);
    let mut worst = Duration::ZERO;
    for (i, ip) in ["10.96.1.50", "10.96.1.51", "10.96.1.52"].iter().enumerate() {
        w.write_state(&fixture().replace("clusterIP: 10.96.1.1\n", &format!("clusterIP: {ip}\n")).replace("[10.96.1.1]", &format!("[{ip}]")));
        let want = format!("A {ip}");
        let took = w.wait_until(|m| rrs(&m.answers) == [want.clone()], "web.shop.svc.cluster.local", A);
        worst = worst.max(took);
        eprintln!("edit {i}: new answer after {took:?}");
    }
    assert!(worst < Duration::from_millis(100), "slowest edit took {worst:?}");
    // Deleting a service makes its name NXDOMAIN.
    let without_web = fixture().replace("metadata: {name: web, namespace: shop}", "metadata: {name: web2, namespace: shop}");
    w.write_state(&without_web);
    w.wait_until(|m| m.metadata.response_code == ResponseCode::NXDomain, "web.shop.svc.cluster.local", A);
    assert_eq!(rrs(&w.query("web2.shop.svc.cluster.local", A).answers), ["A 10.96.1.1"]);
}

#[test]
fn a_broken_state_file_keeps_the_old_answers_and_logs_the_error() {
    let w = Waypost::start(&fixture(), &[]);
    w.write_state("items: [this is {not yaml");
    let start = std::time::Instant::now();
    while !w.logs().contains("parsing state file") {
        assert!(start.elapsed() < Duration::from_secs(5), "no parse error logged: {}", w.logs());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(w.logs().contains("keeping the last good state"), "{}", w.logs());
    assert_eq!(rrs(&w.query("web.shop.svc.cluster.local", A).answers), ["A 10.96.1.1"]);
    assert_eq!(rrs(&w.query("db.shop.svc.cluster.local", A).answers).len(), 3);
    // Fixing the file is picked up again.
    w.write_state(&fixture().replace("10.96.1.1", "10.96.1.77"));
    w.wait_until(|m| rrs(&m.answers) == ["A 10.96.1.77"], "web.shop.svc.cluster.local", A);
}

#[test]
fn a_bad_object_is_logged_with_its_name_and_field_and_keeps_its_last_good_version() {
    let w = Waypost::start(&fixture(), &[]);
    // web gets an invalid IP; dual changes validly in the same write.
    let edited = fixture()
        .replace("clusterIP: 10.96.1.1\n", "clusterIP: 10.96.1.999\n")
        .replace("clusterIPs: [10.96.1.1]", "clusterIPs: [10.96.1.999]")
        .replace("10.96.1.2", "10.96.1.3");
    w.write_state(&edited);
    w.wait_until(|m| rrs(&m.answers) == ["A 10.96.1.3"], "dual.shop.svc.cluster.local", A);
    let logs = w.logs();
    assert!(logs.contains("Service shop/web: field spec.clusterIPs[0]: invalid IP address \"10.96.1.999\""), "{logs}");
    assert_eq!(rrs(&w.query("web.shop.svc.cluster.local", A).answers), ["A 10.96.1.1"], "last good version kept");
}

#[test]
fn a_bad_object_never_seen_good_is_skipped_and_the_rest_serves() {
    let mut yaml = fixture();
    yaml.push_str("- kind: Service\n  apiVersion: v1\n  metadata: {name: broken, namespace: shop}\n  spec: {clusterIP: not-an-ip}\n");
    let w = Waypost::start(&yaml, &[]);
    assert!(w.logs().contains("Service shop/broken: field spec.clusterIP"), "{}", w.logs());
    assert_eq!(w.query("broken.shop.svc.cluster.local", A).metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(rrs(&w.query("web.shop.svc.cluster.local", A).answers), ["A 10.96.1.1"]);
}

#[test]
fn until_a_state_file_loads_cluster_names_get_servfail() {
    let w = Waypost::spawn("items: [broken", &[]);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(w.query("web.shop.svc.cluster.local", A).metadata.response_code, ResponseCode::ServFail);
    w.write_state(&fixture());
    w.wait_until(|m| rrs(&m.answers) == ["A 10.96.1.1"], "web.shop.svc.cluster.local", A);
}
