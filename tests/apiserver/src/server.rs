//! The server handle: listener lifecycle (start, stop, start again on the same port) and the
//! Rust API tests use to change state.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::faults::Faults;
use crate::resources::{self, ResourceType};
use crate::store::Store;
use crate::{Error, http};

/// Tunables; `Options::default()` suits most tests.
#[derive(Debug, Clone)]
pub struct Options {
    /// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK (the real server: about
    /// a minute; short here so tests see them).
    pub bookmark_interval: Duration,
    /// Events kept for watch replay and lists at older resourceVersions; older ones get 410.
    pub history_limit: usize,
    /// Watch lifetime when the client sends no `timeoutSeconds`.
    pub default_watch_timeout: Duration,
    /// The resourceVersion the (empty) store starts at.
    pub first_resource_version: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bookmark_interval: Duration::from_secs(1),
            history_limit: 10_000,
            default_watch_timeout: Duration::from_secs(1800),
            first_resource_version: 1,
        }
    }
}

/// A running listener: dropping `shutdown` (or sending on it) ends it and all its connections.
#[derive(Debug)]
struct Running {
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// State shared between the handle and the request handlers.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) store: Mutex<Store>,
    /// Carries the latest resourceVersion; open watches wait on it for new events.
    pub(crate) changed: watch::Sender<u64>,
    pub(crate) faults: Faults,
    pub(crate) options: Options,
    /// Address last bound; kept while stopped so a restart reuses the port.
    pub(crate) addr: Mutex<SocketAddr>,
    /// The live listener, if any; here (not in the handle) so the `/_test` endpoint can take
    /// the server down and up.
    running: Mutex<Option<Running>>,
    /// Recent request lines (`GET /api/v1/services?watch=true`), for assertions.
    pub(crate) requests: Mutex<VecDeque<String>>,
    pub(crate) open_watches: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

const REQUEST_LOG_LIMIT: usize = 10_000;

impl Shared {
    pub(crate) fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    /// Runs a change on the store and wakes the watches.
    pub(crate) fn mutate<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        let (out, rv) = {
            let mut store = self.store();
            let out = f(&mut store);
            (out, store.rv())
        };
        self.changed.send_replace(rv);
        out
    }

    pub(crate) fn log_request(&self, line: String) {
        let mut log = lock(&self.requests);
        if log.len() >= REQUEST_LOG_LIMIT {
            log.pop_front();
        }
        log.push_back(line);
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        *lock(&self.addr)
    }

    /// Starts a new resourceVersion epoch and cuts open watches (what clients see when the
    /// apiserver comes back with a restored or new etcd).
    pub(crate) fn new_epoch(&self) -> u64 {
        let rv = self.mutate(|s| {
            s.new_epoch((s.rv() / 1_000_000 + 1) * 1_000_000);
            s.rv()
        });
        self.faults.cut_watches();
        rv
    }

    /// Binds `addr` and serves on it until [`Shared::stop`].
    pub(crate) async fn start_on(self: &Arc<Self>, addr: SocketAddr) -> Result<SocketAddr, Error> {
        self.stop().await;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        *lock(&self.addr) = bound;
        let (shutdown, rx) = oneshot::channel();
        let task = tokio::spawn(accept_loop(self.clone(), listener, rx));
        *lock(&self.running) = Some(Running { shutdown, task });
        tracing::debug!(%bound, "test apiserver listening");
        Ok(bound)
    }

    /// Closes the listener and every open connection; returns once the port is free.
    pub(crate) async fn stop(&self) {
        let running = lock(&self.running).take();
        if let Some(Running { shutdown, task }) = running {
            let _ = shutdown.send(());
            let _ = task.await;
        }
    }

    pub(crate) fn is_running(&self) -> bool {
        lock(&self.running).is_some()
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut shutdown: oneshot::Receiver<()>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((stream, _peer)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                conns.spawn(serve_connection(shared.clone(), stream));
            }
        }
    }
    drop(listener);
    conns.shutdown().await;
}

/// Serves one connection. Boxed with an explicit type: the `/_test` endpoint restarts the
/// listener from inside a request, and the boxed type breaks that cycle of future types.
fn serve_connection(
    shared: Arc<Shared>,
    stream: tokio::net::TcpStream,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        let svc = service_fn(move |req| http::handle(shared.clone(), req));
        let conn =
            hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
        if let Err(err) = conn.await {
            tracing::trace!(%err, "test apiserver connection ended");
        }
    })
}

/// A test API server. Dropping it stops the listener.
#[derive(Debug)]
pub struct TestApiServer {
    shared: Arc<Shared>,
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        // Dropping the shutdown sender ends the accept loop and its connections.
        lock(&self.shared.running).take();
    }
}

fn resolve(kind: &str) -> Result<&'static ResourceType, Error> {
    resources::resolve(kind).ok_or_else(|| Error::UnknownKind(kind.to_string()))
}

fn object_type(obj: &Value) -> Result<&'static ResourceType, Error> {
    resources::by_object(obj).ok_or_else(|| {
        Error::UnknownKind(format!(
            "{}/{}",
            obj.get("apiVersion").and_then(Value::as_str).unwrap_or(""),
            obj.get("kind").and_then(Value::as_str).unwrap_or("")
        ))
    })
}

impl TestApiServer {
    /// Starts serving on `addr` (port 0 picks a free port) with default [`Options`].
    pub async fn start(addr: SocketAddr) -> Result<TestApiServer, Error> {
        Self::start_with(addr, Options::default()).await
    }

    /// Starts serving on `addr` with the given options.
    pub async fn start_with(addr: SocketAddr, options: Options) -> Result<TestApiServer, Error> {
        let store = Store::new(options.history_limit, options.first_resource_version);
        let shared = Arc::new(Shared {
            changed: watch::Sender::new(store.rv()),
            store: Mutex::new(store),
            faults: Faults::default(),
            options,
            addr: Mutex::new(addr),
            running: Mutex::new(None),
            requests: Mutex::new(VecDeque::new()),
            open_watches: AtomicUsize::new(0),
        });
        shared.start_on(addr).await?;
        Ok(TestApiServer { shared })
    }

    /// The bound address (also while stopped: the one a [`TestApiServer::restart`] reuses).
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Creates an object (`kind` and `metadata.name` required; namespace defaults to
    /// `default`). Returns it as stored, with resourceVersion, uid and creationTimestamp.
    pub fn create(&self, obj: Value) -> Result<Value, Error> {
        let rt = object_type(&obj)?;
        self.shared
            .mutate(|s| s.create(rt, None, obj))
            .map(|o| (*o).clone())
    }

    /// Replaces an object; a `metadata.resourceVersion` in `obj` must match (409 otherwise).
    pub fn update(&self, obj: Value) -> Result<Value, Error> {
        let rt = object_type(&obj)?;
        self.shared
            .mutate(|s| s.update(rt, None, None, obj))
            .map(|o| (*o).clone())
    }

    /// Creates the object or replaces it unconditionally.
    pub fn apply(&self, mut obj: Value) -> Result<Value, Error> {
        let rt = object_type(&obj)?;
        if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
        }
        self.shared
            .mutate(|s| match s.create(rt, None, obj.clone()) {
                Err(Error::AlreadyExists { .. }) => s.update(rt, None, None, obj),
                other => other,
            })
            .map(|o| (*o).clone())
    }

    /// [`TestApiServer::apply`]s each object in order, waking watches once at the end.
    /// Returns the resourceVersion after the last one.
    pub fn apply_many(&self, objs: impl IntoIterator<Item = Value>) -> Result<u64, Error> {
        self.shared.mutate(|s| {
            for mut obj in objs {
                let rt = object_type(&obj)?;
                if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.remove("resourceVersion");
                }
                match s.create(rt, None, obj.clone()) {
                    Err(Error::AlreadyExists { .. }) => s.update(rt, None, None, obj)?,
                    other => other?,
                };
            }
            Ok(s.rv())
        })
    }

    /// Deletes an object. `kind` is a kind, plural or short name (`Service`, `services`,
    /// `svc`); `namespace` is ignored for cluster-scoped kinds.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<Value, Error> {
        let rt = resolve(kind)?;
        self.shared
            .mutate(|s| s.delete(rt, namespace, name))
            .map(|o| (*o).clone())
    }

    /// One object, if it exists.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let rt = resources::resolve(kind)?;
        self.shared
            .store()
            .get(rt, namespace, name)
            .map(|o| (*o).clone())
    }

    /// All objects of a kind, sorted by namespace and name.
    pub fn list(&self, kind: &str) -> Result<Vec<Value>, Error> {
        let rt = resolve(kind)?;
        let store = self.shared.store();
        let at = store.rv();
        Ok(store
            .snapshot(rt, None, at)?
            .into_iter()
            .map(|(_, o)| (*o).clone())
            .collect())
    }

    /// The latest resourceVersion handed out.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv()
    }

    /// The fault switches.
    pub fn faults(&self) -> Faults {
        self.shared.faults.clone()
    }

    /// Starts a new resourceVersion epoch: resourceVersions jump to the next multiple of a
    /// million, history is dropped (so any older resourceVersion gets 410 Gone) and open
    /// watches are cut. Objects are kept. Returns the new resourceVersion.
    pub fn new_epoch(&self) -> u64 {
        self.shared.new_epoch()
    }

    /// Replaces the whole state with `objs` in a new epoch (as after an etcd restore): no
    /// DELETED events for the dropped objects; watchers get 410 and must relist.
    pub fn replace_state(&self, objs: impl IntoIterator<Item = Value>) -> Result<u64, Error> {
        self.shared.mutate(|s| s.clear());
        self.shared.new_epoch();
        self.apply_many(objs)
    }

    /// Closes the listener and every connection (watches end with a broken stream); state is
    /// kept and can still be changed through this handle.
    pub async fn stop(&self) {
        self.shared.stop().await;
    }

    /// Starts serving again on `addr` (stopping first if running).
    pub async fn start_on(&self, addr: SocketAddr) -> Result<(), Error> {
        self.shared.start_on(addr).await.map(|_| ())
    }

    /// Starts serving again on the port it had.
    pub async fn restart(&self) -> Result<(), Error> {
        self.start_on(self.addr()).await
    }

    /// Whether the listener is up.
    pub fn is_running(&self) -> bool {
        self.shared.is_running()
    }

    /// Number of watch streams open now.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` watch streams are open (say, before changing state that a
    /// client under test must see live); false if `timeout` passes first.
    pub async fn wait_for_watches(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.open_watches() < n {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Recent requests as `METHOD /path?query` lines, oldest first (last 10 000).
    pub fn requests(&self) -> Vec<String> {
        lock(&self.shared.requests).iter().cloned().collect()
    }

    /// A kubeconfig for this server without authentication, usable by kube-rs and kubectl.
    pub fn kubeconfig(&self) -> String {
        kubeconfig_for(&self.url())
    }

    /// Writes [`TestApiServer::kubeconfig`] to `path`.
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        let path = path.as_ref();
        std::fs::write(path, self.kubeconfig()).map_err(|source| Error::Write {
            path: path.display().to_string(),
            source,
        })
    }
}

/// A kubeconfig pointing at `url` with an anonymous user and namespace `default`.
pub(crate) fn kubeconfig_for(url: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: waypost-test
  cluster:
    server: {url}
contexts:
- name: waypost-test
  context:
    cluster: waypost-test
    user: waypost-test
    namespace: default
current-context: waypost-test
users:
- name: waypost-test
  user: {{}}
preferences: {{}}
"
    )
}

/// Parses objects from YAML or JSON text: one or more documents, each an object or a
/// `kind: List` (or any `...List` with `items`), whose items are flattened.
pub fn parse_objects(text: &str) -> Result<Vec<Value>, Error> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = Value::deserialize(doc).map_err(Error::Parse)?;
        match value {
            Value::Null => {}
            Value::Object(ref m)
                if m.get("kind")
                    .and_then(Value::as_str)
                    .is_some_and(|k| k.ends_with("List"))
                    && m.get("items").is_some_and(Value::is_array) =>
            {
                if let Some(Value::Array(items)) = m.get("items") {
                    out.extend(items.iter().cloned());
                }
            }
            other => out.push(other),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_objects_flattens_lists_and_documents() {
        let text = "kind: List\napiVersion: v1\nitems:\n- kind: Service\n  metadata: {name: a}\n---\nkind: Node\nmetadata: {name: n}\n---\n";
        let objs = parse_objects(text).unwrap();
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[1]["kind"], "Node");
        let json = r#"{"kind":"Pod","metadata":{"name":"p"}}"#;
        assert_eq!(parse_objects(json).unwrap().len(), 1);
    }
}
