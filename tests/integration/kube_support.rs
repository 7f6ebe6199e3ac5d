//! Test support for the Kubernetes API source: the test API server on a runtime of its own, and `waypost run --kubeconfig` pointed at it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use serde_json::{Value, json};
use waypost_testapi::{Options, TestApiServer};

use crate::support::{WAIT, Waypost, rrs};

/// The test API server, the runtime it runs on, and a kubeconfig file for it.
pub(crate) struct Cluster {
    /// The server; stopped (listener closed) when dropped.
    pub(crate) api: TestApiServer,
    /// Runs the server's listener and connections while the test thread does blocking DNS.
    pub(crate) rt: tokio::runtime::Runtime,
    /// A kubeconfig pointing at the server.
    pub(crate) kubeconfig: PathBuf,
    /// Keeps the kubeconfig's directory alive.
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// A server with fast bookmarks holding `objects`.
    pub(crate) fn start(objects: Vec<Value>) -> Cluster {
        Cluster::start_with(objects, Options { bookmark_interval: Duration::from_millis(200), ..Options::default() })
    }

    /// A server with the given options holding `objects`.
    pub(crate) fn start_with(objects: Vec<Value>, options: Options) -> Cluster {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let api = rt.block_on(TestApiServer::start_with("127.0.0.1:0".parse().unwrap(), options)).expect("test API server starts");
        api.apply_many(objects).expect("objects load");
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).unwrap();
        Cluster { api, rt, kubeconfig, _dir: dir }
    }

    /// Creates or replaces one object.
    pub(crate) fn apply(&self, obj: Value) {
        self.api.apply(obj).expect("apply");
    }

    /// Deletes one object.
    pub(crate) fn delete(&self, kind: &str, ns: &str, name: &str) {
        self.api.delete(kind, ns, name).expect("delete");
    }

    /// Closes the listener and every connection.
    pub(crate) fn stop(&self) {
        self.rt.block_on(self.api.stop());
    }

    /// Listens again on the same port.
    pub(crate) fn restart(&self) {
        self.rt.block_on(self.api.restart()).expect("restart on the same port");
    }

    /// Starts waypost on this cluster with extra flags, and waits until it serves cluster names.
    pub(crate) fn waypost(&self, args: &[&str]) -> Waypost {
        let w = Waypost::spawn_kube(&self.kubeconfig, args);
        w.wait_until(|m| m.metadata.response_code != ResponseCode::ServFail, "kubernetes.default.svc.cluster.local", RecordType::A);
        w
    }

    /// Whether the server saw a request whose line contains every one of `parts`.
    pub(crate) fn saw_request(&self, parts: &[&str]) -> bool {
        self.api.requests().iter().any(|r| parts.iter().all(|p| r.contains(p)))
    }
}

/// Extra helpers for tests that follow an API server.
impl Waypost {
    /// Starts waypost on `kubeconfig` without waiting for it to sync.
    pub(crate) fn spawn_kube(kubeconfig: &std::path::Path, args: &[&str]) -> Waypost {
        Waypost::launch(&["--kubeconfig".as_ref(), kubeconfig.as_os_str()], args)
    }

    /// Waits until the logs contain `needle` (stderr is read by another thread, so a line can
    /// trail the DNS answer it explains); panics after [`WAIT`]. Returns the logs.
    pub(crate) fn wait_log(&self, needle: &str) -> String {
        let start = Instant::now();
        loop {
            let logs = self.logs();
            if logs.contains(needle) {
                return logs;
            }
            assert!(start.elapsed() < WAIT, "no {needle:?} logged in {WAIT:?}:\n{logs}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The sorted answer records of `name`, or its rcode when it is not NOERROR.
    pub(crate) fn answers(&self, name: &str, rtype: RecordType) -> Vec<String> {
        let m = self.query(name, rtype);
        match m.metadata.response_code {
            ResponseCode::NoError => rrs(&m.answers),
            rc => vec![format!("{rc:?}")],
        }
    }

    /// Polls until [`Waypost::answers`] equals `want`; panics after [`WAIT`]. Returns how long
    /// it took.
    pub(crate) fn wait_answers(&self, name: &str, rtype: RecordType, want: &[&str]) -> Duration {
        let start = Instant::now();
        loop {
            let got = self.answers(name, rtype);
            if got == want {
                return start.elapsed();
            }
            assert!(start.elapsed() < WAIT, "{name} {rtype}: wanted {want:?}, still {got:?} after {WAIT:?}\nlogs:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// GETs `path` from the metrics listener; returns the status code.
    pub(crate) fn http_status(&self, path: &str) -> u16 {
        self.http_get(path).0
    }
}

/// A ClusterIP Service.
pub(crate) fn svc(ns: &str, name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    })
}

/// A headless Service.
pub(crate) fn headless(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"name": "db", "port": 5432, "protocol": "TCP"}]},
    })
}

/// An IPv4 EndpointSlice of `service` with `(ip, ready)` endpoints.
pub(crate) fn slice(ns: &str, name: &str, service: &str, endpoints: &[(&str, bool)]) -> Value {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(ip, ready)| json!({"addresses": [ip], "conditions": {"ready": ready}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "db", "port": 5432, "protocol": "TCP"}],
    })
}

/// A running Pod with one IP.
pub(crate) fn pod(ns: &str, name: &str, ip: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

/// The objects most tests start from: the `kubernetes` service, `shop/web` (ClusterIP
/// 10.96.0.10) and headless `shop/db` with two ready endpoints.
pub(crate) fn base() -> Vec<Value> {
    vec![
        svc("default", "kubernetes", "10.96.0.1"),
        svc("shop", "web", "10.96.0.10"),
        headless("shop", "db"),
        slice("shop", "db-1", "db", &[("10.1.0.1", true), ("10.1.0.2", true)]),
    ]
}
