//! Test support: starts the real `waypost` binary on port 0 and talks DNS to it over real sockets.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::{Name, Record, RecordType};

/// A running `waypost run` process with its own state file.
pub(crate) struct Waypost {
    /// The process; killed on drop.
    child: Child,
    /// Where it answers DNS (UDP and TCP).
    pub(crate) addr: SocketAddr,
    /// Where it serves /metrics, /healthz and /readyz.
    pub(crate) metrics: SocketAddr,
    /// Everything it logged so far.
    logs: Arc<Mutex<String>>,
    /// The state file it reads (none when it watches an API server).
    pub(crate) state: Option<PathBuf>,
    /// Keeps the state file's directory alive.
    _dir: Option<tempfile::TempDir>,
}

/// How long `wait_*` helpers poll before failing: covers the API watcher's first backoff steps
/// (0.8 s, then 1.6 s, jittered up to double).
pub(crate) const WAIT: Duration = Duration::from_secs(15);

/// The cluster fixture shared by most tests.
pub(crate) fn fixture() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/cluster.yaml")).unwrap()
}

impl Waypost {
    /// Starts waypost on `state` (YAML text) with extra flags, and waits until it has loaded
    /// the state.
    pub(crate) fn start(state: &str, args: &[&str]) -> Waypost {
        let w = Waypost::spawn(state, args);
        let domain = args.iter().position(|a| *a == "--cluster-domain").map_or("cluster.local", |i| args[i + 1]);
        let probe = format!("dns-version.{domain}");
        w.wait_until(|m| m.metadata.response_code == hickory_proto::op::ResponseCode::NoError, &probe, RecordType::TXT);
        w
    }

    /// Starts waypost without waiting for it to load the state.
    pub(crate) fn spawn(state: &str, args: &[&str]) -> Waypost {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        std::fs::write(&path, state).unwrap();
        let mut w = Waypost::launch(&["--state".as_ref(), path.as_os_str()], args);
        w.state = Some(path);
        w._dir = Some(dir);
        w
    }

    /// Starts `waypost run` with the source flags `source` (e.g. `--kubeconfig PATH`) and extra
    /// flags, on port 0 for DNS and metrics; returns once it printed its startup line.
    pub(crate) fn launch(source: &[&std::ffi::OsStr], args: &[&str]) -> Waypost {
        let mut child = Command::new(env!("CARGO_BIN_EXE_waypost"))
            .arg("run")
            .args(source)
            .args(["--dns-listen", "127.0.0.1:0", "--dns-workers", "2", "--metrics-listen", "127.0.0.1:0"])
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
        Waypost { child, addr, metrics, logs, state: None, _dir: None }
    }

    /// GETs `path` from the metrics listener; returns the status code and body.
    pub(crate) fn http_get(&self, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(self.metrics).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (code, body)
    }

    /// The sum of a metric's samples whose line contains every one of `labels`.
    pub(crate) fn metric_sum(&self, name: &str, labels: &[&str]) -> f64 {
        let (_, body) = self.http_get("/metrics");
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter(|l| labels.iter().all(|x| l.contains(x)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Everything logged so far.
    pub(crate) fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Replaces the state file atomically (write + rename), as `kubectl ... > tmp; mv` would.
    pub(crate) fn write_state(&self, yaml: &str) {
        let state = self.state.as_ref().expect("started from a state file");
        let tmp = state.with_extension("tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, state).unwrap();
    }

    /// Polls `name`/`rtype` until `ok` holds; panics after [`WAIT`]. Returns how long it took.
    pub(crate) fn wait_until(&self, ok: impl Fn(&Message) -> bool, name: &str, rtype: RecordType) -> Duration {
        let start = Instant::now();
        loop {
            if let Some(m) = self.try_query(name, rtype)
                && ok(&m) {
                    return start.elapsed();
                }
            assert!(start.elapsed() < WAIT, "condition on {name} {rtype} not met in {WAIT:?}\nlogs:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// One UDP query with EDNS (payload 1232), retried a few times until some answer comes.
    pub(crate) fn query(&self, name: &str, rtype: RecordType) -> Message {
        (0..5).find_map(|_| self.try_query(name, rtype)).unwrap_or_else(|| panic!("no answer for {name} {rtype}"))
    }

    fn try_query(&self, name: &str, rtype: RecordType) -> Option<Message> {
        let m = request(name, rtype, Some(1232));
        self.udp(&m.to_vec().unwrap()).map(|b| Message::from_vec(&b).expect("response parses"))
    }

    /// Sends raw bytes over UDP; `None` when nothing comes back within 500 ms.
    pub(crate) fn udp(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        s.send_to(bytes, self.addr).unwrap();
        let mut buf = vec![0u8; 65535];
        let n = s.recv(&mut buf).ok()?;
        buf.truncate(n);
        Some(buf)
    }

    /// Opens a TCP connection for one or more queries.
    pub(crate) fn tcp(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    }
}

impl Drop for Waypost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A query message; `edns` is the payload size to advertise, if any.
pub(crate) fn request(name: &str, rtype: RecordType, edns: Option<u16>) -> Message {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if let Some(p) = edns {
        let mut e = Edns::new();
        e.set_max_payload(p);
        m.set_edns(e);
    }
    m
}

/// Sends one framed query on a TCP stream and reads one framed response.
pub(crate) fn tcp_exchange(s: &mut TcpStream, m: &Message) -> Message {
    let b = m.to_vec().unwrap();
    let mut framed = (b.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&b);
    s.write_all(&framed).unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len).unwrap();
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).unwrap();
    Message::from_vec(&buf).unwrap()
}

/// Records as sorted `TYPE rdata` strings, e.g. `A 10.0.0.1`.
pub(crate) fn rrs(records: &[Record]) -> Vec<String> {
    let mut v: Vec<String> = records.iter().map(|r| format!("{} {}", r.record_type(), r.data)).collect();
    v.sort();
    v
}

/// Records with their owner names, e.g. `db-0.db.shop.svc.cluster.local. A 10.1.2.1`.
pub(crate) fn owned(records: &[Record]) -> Vec<String> {
    let mut v: Vec<String> = records.iter().map(|r| format!("{} {} {}", r.name, r.record_type(), r.data)).collect();
    v.sort();
    v
}

/// Whether `dig` is installed; when it is not, says so loudly. In CI (`CI=true`) its absence
/// is a failure, since `.ci/run` installs it.
pub(crate) fn have_dig() -> bool {
    let ok = Command::new("dig").arg("-v").output().is_ok();
    if !ok {
        eprintln!("!!! dig is not installed: the dig test cannot run (apt-get install bind9-dnsutils) !!!");
        assert!(std::env::var("CI").is_err(), "dig must be installed in CI");
    }
    ok
}
