//! The Kubernetes API source end to end: the test API server, the real binary on `--kubeconfig`, real DNS over UDP, and every fault the server can inject.

use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType::*;
use serde_json::json;
use waypost_testapi::Options;

use crate::kube_support::*;
use crate::support::Waypost;

const WEB: &str = "web.shop.svc.cluster.local";
const DB: &str = "db.shop.svc.cluster.local";

/// Every name of [`base`] answers as it should.
fn base_names_resolve(w: &Waypost) {
    assert_eq!(w.answers(WEB, A), ["A 10.96.0.10"], "{}", w.logs());
    assert_eq!(w.answers(DB, A), ["A 10.1.0.1", "A 10.1.0.2"], "{}", w.logs());
    assert_eq!(w.answers("kubernetes.default.svc.cluster.local", A), ["A 10.96.0.1"]);
}

#[test]
fn services_and_slices_changed_through_the_api_change_dns_answers() {
    let c = Cluster::start(base());
    let w = c.waypost(&[]);
    base_names_resolve(&w);

    c.apply(svc("shop", "cart", "10.96.0.20"));
    w.wait_answers("cart.shop.svc.cluster.local", A, &["A 10.96.0.20"]);
    c.apply(svc("shop", "cart", "10.96.0.21"));
    w.wait_answers("cart.shop.svc.cluster.local", A, &["A 10.96.0.21"]);

    // Scaling the headless service's slice up, flipping readiness, scaling down.
    c.apply(slice("shop", "db-1", "db", &[("10.1.0.1", true), ("10.1.0.2", true), ("10.1.0.3", true)]));
    w.wait_answers(DB, A, &["A 10.1.0.1", "A 10.1.0.2", "A 10.1.0.3"]);
    c.apply(slice("shop", "db-1", "db", &[("10.1.0.1", false), ("10.1.0.2", true), ("10.1.0.3", true)]));
    w.wait_answers(DB, A, &["A 10.1.0.2", "A 10.1.0.3"]);
    c.apply(slice("shop", "db-1", "db", &[("10.1.0.3", true)]));
    w.wait_answers(DB, A, &["A 10.1.0.3"]);
    // A second slice of the same service adds to it; deleting it takes its endpoints away.
    c.apply(slice("shop", "db-2", "db", &[("10.1.0.9", true)]));
    w.wait_answers(DB, A, &["A 10.1.0.3", "A 10.1.0.9"]);
    c.delete("endpointslices", "shop", "db-2");
    w.wait_answers(DB, A, &["A 10.1.0.3"]);

    c.delete("svc", "shop", "web");
    w.wait_answers(WEB, A, &["NXDomain"]);

    // One watch per kind, streaming lists with bookmarks; no Pod or Node watch unless asked.
    for kind in ["/api/v1/services?", "/apis/discovery.k8s.io/v1/endpointslices?"] {
        assert!(c.saw_request(&[kind, "watch=true", "sendInitialEvents=true", "allowWatchBookmarks=true"]), "{:?}", c.api.requests());
    }
    assert!(!c.saw_request(&["/api/v1/pods"]), "{:?}", c.api.requests());
    assert!(!c.saw_request(&["/api/v1/nodes"]), "{:?}", c.api.requests());
}

#[test]
fn cut_watches_500s_a_410_and_a_stall_keep_every_name_and_later_changes_appear() {
    let c = Cluster::start(base());
    let w = c.waypost(&[]);
    let faults = c.api.faults();

    // Cut watches resume from the last resourceVersion.
    faults.cut_watches();
    base_names_resolve(&w);
    c.apply(svc("shop", "a", "10.96.0.31"));
    w.wait_answers("a.shop.svc.cluster.local", A, &["A 10.96.0.31"]);

    // Transient 500s are retried with backoff; the last good state keeps serving meanwhile.
    faults.fail_next(2, 500);
    faults.cut_watches();
    base_names_resolve(&w);
    c.apply(svc("shop", "b", "10.96.0.32"));
    w.wait_answers("b.shop.svc.cluster.local", A, &["A 10.96.0.32"]);
    base_names_resolve(&w);
    let logs = w.wait_log("Kubernetes API watch recovered");
    assert_eq!(logs.matches("Kubernetes API watch failing").count(), 1, "one warning per episode:\n{logs}");
    assert!(logs.contains("HTTP 500"), "{logs}");

    // A 410 on a resumed watch relists; nothing is lost.
    faults.fail_next(1, 410);
    faults.cut_watches();
    c.apply(svc("shop", "c", "10.96.0.33"));
    w.wait_answers("c.shop.svc.cluster.local", A, &["A 10.96.0.33"]);
    base_names_resolve(&w);

    // A stalled server answers nothing: names keep resolving; the change shows once it answers.
    faults.stall();
    c.apply(svc("shop", "d", "10.96.0.34"));
    std::thread::sleep(Duration::from_millis(300));
    base_names_resolve(&w);
    assert_eq!(w.answers("a.shop.svc.cluster.local", A), ["A 10.96.0.31"]);
    assert_eq!(w.answers("d.shop.svc.cluster.local", A), ["NXDomain"]);
    faults.unstall();
    w.wait_answers("d.shop.svc.cluster.local", A, &["A 10.96.0.34"]);
}

#[test]
fn an_expired_resource_version_relists_and_objects_deleted_meanwhile_disappear() {
    // A short history: after a few changes, resuming from the old resourceVersion gets 410.
    let options = Options { bookmark_interval: Duration::from_millis(200), history_limit: 3, ..Options::default() };
    let mut objects = base();
    objects.push(svc("shop", "old", "10.96.0.40"));
    let c = Cluster::start_with(objects, options);
    let w = c.waypost(&[]);
    w.wait_answers("old.shop.svc.cluster.local", A, &["A 10.96.0.40"]);

    c.stop();
    c.delete("svc", "shop", "old");
    for i in 0..5 {
        c.apply(svc("shop", &format!("new{i}"), &format!("10.96.0.5{i}")));
    }
    base_names_resolve(&w);
    assert_eq!(w.answers("old.shop.svc.cluster.local", A), ["A 10.96.0.40"], "kept while the API is down");
    c.restart();
    w.wait_answers("new4.shop.svc.cluster.local", A, &["A 10.96.0.54"]);
    w.wait_answers("old.shop.svc.cluster.local", A, &["NXDomain"]);
    base_names_resolve(&w);
    w.wait_log("410 Gone");
    w.wait_log("relisted; state replaced");
}

#[test]
fn a_restart_with_a_new_epoch_relists_and_objects_gone_from_it_disappear() {
    let mut objects = base();
    objects.push(svc("shop", "old", "10.96.0.40"));
    let c = Cluster::start(objects);
    let w = c.waypost(&[]);
    w.wait_answers("old.shop.svc.cluster.local", A, &["A 10.96.0.40"]);

    // As after an etcd restore: new resourceVersions, no DELETED events for what is gone.
    let mut restored = base();
    restored.push(svc("shop", "fresh", "10.96.0.41"));
    c.api.replace_state(restored).unwrap();
    w.wait_answers("fresh.shop.svc.cluster.local", A, &["A 10.96.0.41"]);
    w.wait_answers("old.shop.svc.cluster.local", A, &["NXDomain"]);
    base_names_resolve(&w);

    // Live changes flow again in the new epoch.
    c.apply(slice("shop", "db-1", "db", &[("10.1.0.7", true)]));
    w.wait_answers(DB, A, &["A 10.1.0.7"]);
}

#[test]
fn an_api_server_stopped_and_started_again_loses_no_names_and_catches_up() {
    let c = Cluster::start(base());
    let w = c.waypost(&[]);
    c.stop();
    c.delete("svc", "shop", "web");
    c.apply(svc("shop", "z", "10.96.0.60"));
    std::thread::sleep(Duration::from_millis(300));
    base_names_resolve(&w);
    assert_eq!(w.http_status("/readyz"), 200, "API trouble after the first sync does not unready");
    c.restart();
    w.wait_answers("z.shop.svc.cluster.local", A, &["A 10.96.0.60"]);
    w.wait_answers(WEB, A, &["NXDomain"]);
    assert_eq!(w.answers(DB, A), ["A 10.1.0.1", "A 10.1.0.2"]);
    let logs = w.wait_log("Kubernetes API watch recovered");
    assert_eq!(logs.matches("Kubernetes API watch failing").count(), 1, "one warning per episode:\n{logs}");
}

#[test]
fn startup_with_the_api_server_down_answers_servfail_until_it_comes_up() {
    let c = Cluster::start(base());
    c.stop();
    let w = Waypost::spawn_kube(&c.kubeconfig, &[]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(w.query(WEB, A).metadata.response_code, ResponseCode::ServFail);
    assert_ne!(w.http_status("/readyz"), 200);
    c.restart();
    w.wait_answers(WEB, A, &["A 10.96.0.10"]);
    base_names_resolve(&w);
    assert_eq!(w.http_status("/readyz"), 200);
}

#[test]
fn a_bad_object_is_logged_with_its_name_and_field_and_keeps_its_last_good_version() {
    let c = Cluster::start(base());
    let w = c.waypost(&[]);
    let mut bad = svc("shop", "web", "10.96.0.10");
    bad["spec"]["clusterIPs"] = json!(["10.96.0.999"]);
    c.apply(bad);
    c.apply(svc("shop", "after", "10.96.0.70"));
    w.wait_answers("after.shop.svc.cluster.local", A, &["A 10.96.0.70"]);
    w.wait_log("Service shop/web: field spec.clusterIPs[0]: invalid IP address \"10.96.0.999\"");
    assert_eq!(w.answers(WEB, A), ["A 10.96.0.10"], "last good version kept");
}

#[test]
fn verified_pod_records_watch_pods_and_the_node_name_selects_one_node() {
    let mut objects = base();
    objects.push(pod("shop", "p1", "10.1.0.5", "n1"));
    objects.push(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z1"}}}));
    let c = Cluster::start(objects);
    let w = c.waypost(&["--pod-records", "verified", "--node-name", "n1"]);
    w.wait_answers("10-1-0-5.shop.pod.cluster.local", A, &["A 10.1.0.5"]);
    assert_eq!(w.answers("10-1-0-6.shop.pod.cluster.local", A), ["NXDomain"]);
    c.apply(pod("shop", "p2", "10.1.0.6", "n2"));
    w.wait_answers("10-1-0-6.shop.pod.cluster.local", A, &["A 10.1.0.6"]);
    c.delete("pods", "shop", "p1");
    w.wait_answers("10-1-0-5.shop.pod.cluster.local", A, &["NXDomain"]);
    assert!(c.saw_request(&["/api/v1/nodes?", "fieldSelector=metadata.name%3Dn1", "watch=true"]), "{:?}", c.api.requests());
    assert!(c.saw_request(&["/api/v1/pods?", "watch=true"]), "{:?}", c.api.requests());
}

#[test]
fn kubectl_create_replace_and_delete_reach_dns() {
    let c = Cluster::start(vec![svc("default", "kubernetes", "10.96.0.1")]);
    let w = c.waypost(&[]);
    let file = c.kubeconfig.with_file_name("objects.yaml");
    let objects = |ip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: api, namespace: shop}}\nspec: {{clusterIP: None, ports: [{{port: 80}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: api-1, namespace: shop, labels: {{kubernetes.io/service-name: api}}}}\n\
             addressType: IPv4\nendpoints: [{{addresses: [{ip}], conditions: {{ready: true}}}}]\nports: [{{port: 80}}]\n"
        )
    };
    let kubectl = |verb: &str| {
        let mut cmd = std::process::Command::new("kubectl");
        cmd.arg("--kubeconfig").arg(&c.kubeconfig).args(["--request-timeout=20s", verb, "-f"]).arg(&file);
        if verb != "delete" {
            cmd.arg("--validate=false");
        }
        let out = cmd.output().unwrap_or_else(|e| panic!("kubectl must be installed (CI installs it): {e}"));
        assert!(out.status.success(), "kubectl {verb}: {}", String::from_utf8_lossy(&out.stderr));
    };
    const API: &str = "api.shop.svc.cluster.local";
    std::fs::write(&file, objects("10.2.0.1")).unwrap();
    kubectl("create");
    w.wait_answers(API, A, &["A 10.2.0.1"]);
    std::fs::write(&file, objects("10.2.0.2")).unwrap();
    kubectl("replace");
    w.wait_answers(API, A, &["A 10.2.0.2"]);
    kubectl("delete");
    w.wait_answers(API, A, &["NXDomain"]);
}

#[test]
fn without_state_or_kubeconfig_waypost_uses_the_in_cluster_config() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_waypost"))
        .args(["run", "--dns-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1"])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in-cluster Kubernetes config"), "{err}");
}
