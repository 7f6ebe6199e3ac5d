//! Test support for the Kubernetes API source: the test API server on a runtime of its own, and `waypost run --kubeconfig` pointed at it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use serde_json::{Value, json};
use waypost_testapi::{Options, TestApiServer};

use crate::support::{request, rrs};

/// How long any one wait for DNS to change may take: covers the watcher's first backoff steps
/// (0.8 s, then 1.6 s, jittered up to double).
pub(crate) const WAIT: Duration = Duration::from_secs(15);

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
    pub(crate) fn waypost(&self, args: &[&str]) -> KubeWaypost {
        let w = KubeWaypost::spawn(&self.kubeconfig, args);
        w.wait_until(|m| m.metadata.response_code != ResponseCode::ServFail, "kubernetes.default.svc.cluster.local", RecordType::A);
        w
    }

    /// Whether the server saw a request whose line contains every one of `parts`.
    pub(crate) fn saw_request(&self, parts: &[&str]) -> bool {
        self.api.requests().iter().any(|r| parts.iter().all(|p| r.contains(p)))
    }
}

/// A running `waypost run --kubeconfig` process.
pub(crate) struct KubeWaypost {
    /// The process; killed on drop.
    child: Child,
    /// Where it answers DNS.
    pub(crate) addr: SocketAddr,
    /// Where it serves /metrics, /healthz and /readyz.
    pub(crate) metrics: SocketAddr,
    /// Everything it logged so far.
    logs: Arc<Mutex<String>>,
}

impl KubeWaypost {
    /// Starts waypost on `kubeconfig` without waiting for it to sync.
    pub(crate) fn spawn(kubeconfig: &std::path::Path, args: &[&str]) -> KubeWaypost {
        let mut child = Command::new(env!("CARGO_BIN_EXE_waypost"))
            .arg("run")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--dns-listen", "127.0.0.1:0", "--dns-workers", "1", "--metrics-listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("NODE_NAME")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start waypost");
        let logs = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let l = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut g = l.lock().unwrap();
                g.push_str(&line);
                g.push('\n');
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let after = |marker: &str| -> SocketAddr {
            line.split(marker)
                .nth(1)
                .and_then(|s| s.split([' ', ',']).next())
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("no {marker:?} address in startup line {line:?}; logs: {}", logs.lock().unwrap()))
        };
        let (addr, metrics) = (after(" on "), after("metrics on "));
        KubeWaypost { child, addr, metrics, logs }
    }

    /// Everything logged so far.
    pub(crate) fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
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

    /// One UDP query, retried until some answer comes.
    pub(crate) fn query(&self, name: &str, rtype: RecordType) -> Message {
        for _ in 0..5 {
            if let Some(m) = self.try_query(name, rtype) {
                return m;
            }
        }
        panic!("no answer for {name} {rtype}")
    }

    /// The sorted answer records of `name`, or its rcode when it is not NOERROR.
    pub(crate) fn answers(&self, name: &str, rtype: RecordType) -> Vec<String> {
        let m = self.query(name, rtype);
        match m.metadata.response_code {
            ResponseCode::NoError => rrs(&m.answers),
            rc => vec![format!("{rc:?}")],
        }
    }

    /// Polls until [`KubeWaypost::answers`] equals `want`; panics after [`WAIT`]. Returns how
    /// long it took.
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

    /// Polls `name`/`rtype` until `ok` holds; panics after [`WAIT`].
    pub(crate) fn wait_until(&self, ok: impl Fn(&Message) -> bool, name: &str, rtype: RecordType) -> Duration {
        let start = Instant::now();
        loop {
            if let Some(m) = self.try_query(name, rtype)
                && ok(&m)
            {
                return start.elapsed();
            }
            assert!(start.elapsed() < WAIT, "condition on {name} {rtype} not met in {WAIT:?}\nlogs:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn try_query(&self, name: &str, rtype: RecordType) -> Option<Message> {
        let m = request(name, rtype, Some(1232));
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        s.send_to(&m.to_vec().unwrap(), self.addr).unwrap();
        let mut buf = vec![0u8; 65535];
        let n = s.recv(&mut buf).ok()?;
        Some(Message::from_vec(&buf[..n]).expect("response parses"))
    }

    /// GETs `path` from the metrics listener; returns the status code.
    pub(crate) fn http_status(&self, path: &str) -> u16 {
        let mut s = TcpStream::connect(self.metrics).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
    }
}

impl Drop for KubeWaypost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
