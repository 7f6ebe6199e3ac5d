//! The Kubernetes API source: one resilient watch each of Services, EndpointSlices and, when needed, Pods and this node's Node, folded into the cluster model.
//!
//! Each kind is watched by kube-runtime's [`watcher()`] with its jittered exponential
//! [default backoff](WatchStreamExt::default_backoff), bookmarks on, and a streaming list
//! (`sendInitialEvents`) first; a server that refuses streaming lists (400/422 for the streaming
//! watch, as servers without the `WatchList` feature answer) is listed in pages instead, for the
//! rest of the process. Trying is cheaper and surer than guessing from the server version: the
//! feature gate can be off on any version, and the refusal costs one request.
//!
//! Objects arrive as untyped JSON ([`DynamicObject`] over the k8s-openapi resource
//! descriptions) and are converted into the model at once, so only the fields the model keeps
//! stay in memory: no reflector cache of full objects (the [`Writer`]'s snapshot is our
//! reflector store, swapped whole on `InitDone` as kube-runtime's is).
//!
//! A (re)list is buffered and swapped in with one [`Writer::replace_kind`] when it is complete,
//! so objects deleted while the watch was down disappear and nothing is ever half-listed.
//! The snapshot is marked synced once Services and EndpointSlices have both been listed; from
//! then on, API trouble only delays changes, it never empties the model. Live events are
//! committed in small batches (whatever is ready), each stamped with the time it came off the
//! watch so consumers can measure programming latency.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::Arc;
use std::time::Instant;

use ::kube::api::{Api, ApiResource, DynamicObject};
use ::kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};
use ::kube::runtime::WatchStreamExt;
use ::kube::runtime::watcher::{self, Event, watcher};
use ::kube::{Client, Config};
use futures::StreamExt;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::convert;
use crate::model::{Interner, Kind, Object, ObjectKey};
use crate::snapshot::{Snapshot, Writer};

/// Events in flight between the watch tasks and the writer; a full channel slows the watches
/// down instead of growing memory.
const CHANNEL_CAPACITY: usize = 1024;
/// Most events folded into one commit, so a long burst still publishes regularly.
const MAX_BATCH: usize = 1024;
/// Page size of lists when the server does not offer streaming lists.
const PAGE_SIZE: u32 = 500;
/// Live events between prunes of a watch task's string interner.
const PRUNE_EVERY: u64 = 10_000;

/// Why the Kubernetes API source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// The kubeconfig file could not be read or used.
    #[error("kubeconfig {path}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: KubeconfigError,
    },
    /// No in-cluster configuration (service account token, `KUBERNETES_SERVICE_HOST`).
    #[error("in-cluster Kubernetes config (give --state or --kubeconfig when not running in a pod)")]
    InCluster(#[source] ::kube::config::InClusterError),
    /// The client could not be built from the configuration (TLS material, proxy, …).
    #[error("building the Kubernetes client")]
    Client(#[source] ::kube::Error),
}

impl KubeSourceError {
    /// True when the problem is the in-cluster environment rather than a file.
    pub fn is_in_cluster(&self) -> bool {
        matches!(self, KubeSourceError::InCluster(_))
    }
}

/// Where the API server and credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiConfig {
    /// The pod's service account and `KUBERNETES_SERVICE_HOST` (a DaemonSet's normal case).
    InCluster,
    /// A kubeconfig file, with its current context.
    Kubeconfig(PathBuf),
}

/// Builds a client for `how`; must be called inside a tokio runtime. Returns the client and the
/// API server URL, for the startup line.
pub async fn connect(how: &ApiConfig) -> Result<(Client, String), KubeSourceError> {
    let config = match how {
        ApiConfig::InCluster => Config::incluster().map_err(KubeSourceError::InCluster)?,
        ApiConfig::Kubeconfig(path) => {
            let err = |source| KubeSourceError::Kubeconfig { path: path.clone(), source };
            let file = Kubeconfig::read_from(path).map_err(err)?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await.map_err(err)?
        }
    };
    let url = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(KubeSourceError::Client)?;
    Ok((client, url))
}

/// What to watch besides Services and EndpointSlices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeSourceConfig {
    /// Watch every Pod: needed by verified pod records (and later the proxy).
    pub watch_pods: bool,
    /// This node's name: its Node object (zone label, addresses) is watched, and no other.
    pub node_name: Option<String>,
}

impl KubeSourceConfig {
    /// The kinds this configuration watches.
    pub fn kinds(&self) -> Vec<Kind> {
        let mut kinds = vec![Kind::Service, Kind::EndpointSlice];
        if self.watch_pods {
            kinds.push(Kind::Pod);
        }
        if self.node_name.is_some() {
            kinds.push(Kind::Node);
        }
        kinds
    }
}

/// Watches the cluster and keeps `writer`'s model up to date until `shutdown` resolves.
///
/// Never returns an error: every API failure is retried with backoff and logged once per
/// episode, while the last good state keeps serving.
pub async fn run(client: Client, config: KubeSourceConfig, mut writer: Writer, shutdown: impl Future<Output = ()>) {
    let mut shutdown = pin!(shutdown);
    let (tx, mut rx) = mpsc::channel(CHANNEL_CAPACITY);
    let mut tasks = JoinSet::new();
    let episodes = Arc::new(Episodes::default());
    for kind in config.kinds() {
        let spec = WatchSpec { kind, node_name: config.node_name.clone() };
        tasks.spawn(watch_kind(client.clone(), spec, episodes.clone(), tx.clone()));
    }
    drop(tx);
    let mut fold = Fold::default();
    loop {
        let first = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            m = rx.recv() => match m {
                Some(m) => m,
                None => break,
            },
        };
        fold.apply(&mut writer, first);
        for _ in 1..MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => fold.apply(&mut writer, m),
                Err(_) => break,
            }
        }
        if let Some(snap) = writer.commit() {
            tracing::trace!(generation = snap.generation, "kubernetes changes committed");
        }
    }
    tasks.shutdown().await;
}

// === impl Fold ===

/// One watch event, converted, on its way to the writer.
#[derive(Debug)]
struct Msg {
    /// Which watch it came from.
    kind: Kind,
    /// When it came off the watch: the start of its programming latency.
    at: Instant,
    /// What it says.
    update: Update,
}

/// A watch event reduced to the model.
#[derive(Debug)]
enum Update {
    /// A (re)list starts: forget any half-received one.
    Relisting,
    /// An object of the list.
    Listed(Object),
    /// An object of the list that did not convert: keep its last good version, if any.
    ListedBad(ObjectKey),
    /// The list is complete: swap it in.
    ListDone,
    /// An object was added or changed.
    Applied(Object),
    /// An object was deleted.
    Deleted(ObjectKey),
}

/// A list being received.
#[derive(Debug, Default)]
struct Relist {
    /// Objects listed so far.
    objects: Vec<Object>,
    /// Objects listed in a form that did not convert.
    bad: Vec<ObjectKey>,
}

/// Folds watch events into the writer: buffers relists, tracks the first sync.
#[derive(Debug, Default)]
struct Fold {
    /// Lists in progress, per kind.
    relists: HashMap<Kind, Relist>,
    /// Kinds listed at least once; the snapshot is synced once Services and EndpointSlices are.
    listed: HashSet<Kind>,
}

impl Fold {
    fn apply(&mut self, writer: &mut Writer, Msg { kind, at, update }: Msg) {
        match update {
            Update::Relisting => {
                self.relists.insert(kind, Relist::default());
            }
            Update::Listed(obj) => self.relists.entry(kind).or_default().objects.push(obj),
            Update::ListedBad(key) => self.relists.entry(kind).or_default().bad.push(key),
            Update::ListDone => {
                let Relist { mut objects, bad } = self.relists.remove(&kind).unwrap_or_default();
                objects.extend(bad.iter().filter_map(|k| current(writer.current(), kind, k)));
                let count = objects.len();
                // Only a real change may carry a timestamp: an unchanged relist commits nothing,
                // and its time would otherwise be blamed on the next change.
                if relist_changes(writer.current(), kind, &objects) {
                    writer.observed(at);
                }
                writer.replace_kind(kind, objects);
                let first = self.listed.insert(kind);
                let was_synced = writer.current().synced;
                if self.listed.contains(&Kind::Service) && self.listed.contains(&Kind::EndpointSlice) && !was_synced {
                    writer.observed(at);
                    writer.mark_synced();
                    let (s, e, p, n) = writer.current().counts();
                    tracing::info!(
                        services = s, endpointslices = e, pods = p, nodes = n,
                        "Kubernetes API: Services and EndpointSlices listed; serving cluster names"
                    );
                }
                if first {
                    tracing::info!(kind = kind.as_str(), count, "Kubernetes API: listed");
                } else {
                    tracing::info!(kind = kind.as_str(), count, "Kubernetes API: relisted; state replaced");
                }
            }
            Update::Applied(obj) => {
                if current(writer.current(), kind, &obj.id().1).as_ref() != Some(&obj) {
                    writer.observed(at);
                    writer.apply(obj);
                }
            }
            Update::Deleted(key) => {
                if current(writer.current(), kind, &key).is_some() {
                    writer.observed(at);
                    writer.delete(kind, &key);
                }
            }
        }
    }
}

/// The model's current version of one object.
fn current(snap: &Snapshot, kind: Kind, key: &ObjectKey) -> Option<Object> {
    match kind {
        Kind::Service => snap.services.get(key).cloned().map(Object::Service),
        Kind::EndpointSlice => snap.slices.get(key).cloned().map(Object::EndpointSlice),
        Kind::Pod => snap.pods.get(key).cloned().map(Object::Pod),
        Kind::Node => snap.nodes.get(&key.name).cloned().map(Object::Node),
    }
}

/// Whether replacing every object of `kind` with `objects` changes anything.
fn relist_changes(snap: &Snapshot, kind: Kind, objects: &[Object]) -> bool {
    let held = match kind {
        Kind::Service => snap.services.len(),
        Kind::EndpointSlice => snap.slices.len(),
        Kind::Pod => snap.pods.len(),
        Kind::Node => snap.nodes.len(),
    };
    held != objects.len() || objects.iter().any(|o| current(snap, kind, &o.id().1).as_ref() != Some(o))
}

// === impl WatchSpec ===

/// What one watch task watches.
#[derive(Debug, Clone)]
struct WatchSpec {
    /// The kind.
    kind: Kind,
    /// For Nodes: the one node to watch.
    node_name: Option<String>,
}

impl WatchSpec {
    /// The untyped API for the kind, described by its k8s-openapi type.
    fn api(&self, client: &Client) -> Api<DynamicObject> {
        let resource = match self.kind {
            Kind::Service => ApiResource::erase::<core::Service>(&()),
            Kind::EndpointSlice => ApiResource::erase::<discovery::EndpointSlice>(&()),
            Kind::Pod => ApiResource::erase::<core::Pod>(&()),
            Kind::Node => ApiResource::erase::<core::Node>(&()),
        };
        Api::all_with(client.clone(), &resource)
    }

    /// Watcher settings: bookmarks on (the default), a streaming or a paginated initial list.
    fn config(&self, streaming: bool) -> watcher::Config {
        let mut config = watcher::Config::default();
        if let (Kind::Node, Some(name)) = (self.kind, &self.node_name) {
            config = config.fields(&format!("metadata.name={name}"));
        }
        if streaming { config.streaming_lists() } else { config.page_size(PAGE_SIZE) }
    }
}

/// Watches one kind forever, sending converted events to the writer's loop.
async fn watch_kind(client: Client, spec: WatchSpec, episodes: Arc<Episodes>, tx: mpsc::Sender<Msg>) {
    let kind = spec.kind;
    let api = spec.api(&client);
    let mut interner = Interner::default();
    let mut streaming = true;
    let mut since_prune = 0u64;
    'restart: loop {
        let mut events = pin!(watcher(api.clone(), spec.config(streaming)).default_backoff());
        while let Some(item) = events.next().await {
            let at = Instant::now();
            let event = match item {
                Ok(event) => {
                    episodes.recovered(kind);
                    event
                }
                Err(e) if streaming && streaming_refused(&e) => {
                    tracing::info!(
                        kind = kind.as_str(),
                        "Kubernetes API refused a streaming list ({}); listing in pages of {PAGE_SIZE} instead",
                        describe(&e)
                    );
                    streaming = false;
                    continue 'restart;
                }
                Err(e) => {
                    episodes.failed(kind, &e);
                    continue;
                }
            };
            let update = match event {
                Event::Init => Update::Relisting,
                Event::InitApply(obj) => match convert_object(kind, obj, &mut interner) {
                    Ok(obj) => Update::Listed(obj),
                    Err(Some(key)) => Update::ListedBad(key),
                    Err(None) => continue,
                },
                Event::InitDone => {
                    interner.prune();
                    Update::ListDone
                }
                Event::Apply(obj) => match convert_object(kind, obj, &mut interner) {
                    Ok(obj) => Update::Applied(obj),
                    Err(_) => continue,
                },
                Event::Delete(obj) => match identify(kind, &obj) {
                    Some(key) => Update::Deleted(key),
                    None => continue,
                },
            };
            since_prune += 1;
            if since_prune >= PRUNE_EVERY {
                since_prune = 0;
                interner.prune();
            }
            if tx.send(Msg { kind, at, update }).await.is_err() {
                return;
            }
        }
    }
}

/// Whether a watch error in streaming mode says the server does not offer streaming lists (the
/// `WatchList` feature): 400 or 422, never transient, so listing in pages is the way on.
fn streaming_refused(e: &watcher::Error) -> bool {
    let code = match e {
        watcher::Error::WatchStartFailed(::kube::Error::Api(s)) => s.code,
        watcher::Error::WatchError(s) => s.code,
        _ => return false,
    };
    matches!(code, 400 | 422)
}

/// Whether an error is a 410 Gone: an expected relist, not trouble.
fn is_gone(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchError(s) => s.code == 410,
        watcher::Error::InitialListFailed(::kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(::kube::Error::Api(s))
        | watcher::Error::WatchFailed(::kube::Error::Api(s)) => s.code == 410,
        _ => false,
    }
}

// === impl Episodes ===

/// How often a watch that keeps failing while the others work (say, no RBAC for Pods) is
/// warned about again; in between its retries log at debug.
const REWARN_AFTER: std::time::Duration = std::time::Duration::from_secs(300);

/// The watches' error episodes, shared by the watch tasks so one API outage is logged once:
/// a warning at the first error, and "recovered" when events flow again (any watch delivering
/// an event proves the API answers), not per retry or per kind.
#[derive(Debug, Default)]
struct Episodes {
    inner: std::sync::Mutex<EpisodeState>,
}

/// The current episode, if any.
#[derive(Debug, Default)]
struct EpisodeState {
    /// When the first error of the current episode came; `None` while healthy.
    since: Option<Instant>,
    /// Errors in the current episode.
    errors: u64,
    /// Kinds that failed and have delivered no event since, with when they were last warned
    /// about: such a watch starting a new episode is a stubborn one, not a new outage.
    stuck: HashMap<Kind, Instant>,
}

impl Episodes {
    fn failed(&self, kind: Kind, e: &watcher::Error) {
        if is_gone(e) {
            tracing::info!(kind = kind.as_str(), "Kubernetes API: resourceVersion expired (410 Gone); relisting");
            return;
        }
        let mut st = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        st.errors += 1;
        if st.since.is_some() {
            st.stuck.entry(kind).or_insert_with(Instant::now);
            tracing::debug!(kind = kind.as_str(), errors = st.errors, "Kubernetes API watch still failing: {}", describe(e));
            return;
        }
        let now = Instant::now();
        st.since = Some(now);
        let quiet = st.stuck.get(&kind).is_some_and(|t| now.duration_since(*t) < REWARN_AFTER);
        if !quiet {
            st.stuck.insert(kind, now);
        }
        if quiet {
            tracing::debug!(kind = kind.as_str(), "Kubernetes API watch failing again: {}", describe(e));
        } else {
            tracing::warn!(
                kind = kind.as_str(),
                "Kubernetes API watch failing: {}; retrying with backoff, the last good state keeps serving",
                describe(e)
            );
        }
    }

    fn recovered(&self, kind: Kind) {
        let mut st = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        st.stuck.remove(&kind);
        if let Some(since) = st.since.take() {
            tracing::info!(errors = st.errors, after = ?since.elapsed(), "Kubernetes API watch recovered");
            st.errors = 0;
        }
    }
}

/// A short description of a watch error: the HTTP status and message for API errors.
fn describe(e: &watcher::Error) -> String {
    let status = match e {
        watcher::Error::WatchError(s) => Some(&**s),
        watcher::Error::InitialListFailed(::kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(::kube::Error::Api(s))
        | watcher::Error::WatchFailed(::kube::Error::Api(s)) => Some(&**s),
        _ => None,
    };
    match status {
        Some(s) => format!("HTTP {} {}: {}", s.code, s.reason, s.message),
        None => e.to_string(),
    }
}

// === conversion ===

/// The parts of an untyped object the model reads, as the JSON `convert` takes: the body and
/// `metadata.{name,namespace,labels}`.
fn to_value(obj: DynamicObject) -> Value {
    let DynamicObject { metadata, data, .. } = obj;
    let mut md = Map::new();
    if let Some(name) = metadata.name {
        md.insert("name".into(), Value::String(name));
    }
    if let Some(ns) = metadata.namespace {
        md.insert("namespace".into(), Value::String(ns));
    }
    if let Some(labels) = metadata.labels {
        md.insert("labels".into(), Value::Object(labels.into_iter().map(|(k, v)| (k, Value::String(v))).collect()));
    }
    let mut body = match data {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    body.insert("metadata".into(), Value::Object(md));
    Value::Object(body)
}

/// Converts one object; a failure is logged with the object and field, and yields the object's
/// key when it has one (so a relist can keep its last good version).
fn convert_object(kind: Kind, obj: DynamicObject, interner: &mut Interner) -> Result<Object, Option<ObjectKey>> {
    let v = to_value(obj);
    convert::convert(kind, &v, interner).map_err(|e| {
        tracing::warn!("{e}; ignoring this version of the object");
        convert::identify(kind, &v)
    })
}

/// The key of a deleted object.
fn identify(kind: Kind, obj: &DynamicObject) -> Option<ObjectKey> {
    let name = obj.metadata.name.as_deref().filter(|n| !n.is_empty())?;
    let ns = match kind {
        Kind::Node => "",
        _ => obj.metadata.namespace.as_deref().filter(|n| !n.is_empty()).unwrap_or("default"),
    };
    Some(ObjectKey::new(ns, name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Store;
    use serde_json::json;

    fn dynamic(v: Value) -> DynamicObject {
        serde_json::from_value(v).unwrap()
    }

    fn msg(kind: Kind, update: Update) -> Msg {
        Msg { kind, at: Instant::now(), update }
    }

    fn svc(name: &str, ip: &str) -> Object {
        let v = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "shop", "resourceVersion": "5", "managedFields": [{"manager": "x"}]},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]}});
        convert_object(Kind::Service, dynamic(v), &mut Interner::default()).unwrap()
    }

    fn slice(name: &str, svc: &str) -> Object {
        let v = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "endpoints": [{"addresses": ["10.1.0.1"]}]});
        convert_object(Kind::EndpointSlice, dynamic(v), &mut Interner::default()).unwrap()
    }

    #[test]
    fn untyped_objects_convert_with_their_labels() {
        match slice("web-1", "web") {
            Object::EndpointSlice(s) => {
                assert_eq!(&*s.service_name, "web");
                assert_eq!(s.key, ObjectKey::new("shop", "web-1"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_bad_object_yields_its_key() {
        let v = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "bad", "namespace": "shop"}, "spec": {"clusterIP": "10.0.0.999"}});
        let e = convert_object(Kind::Service, dynamic(v), &mut Interner::default()).unwrap_err();
        assert_eq!(e, Some(ObjectKey::new("shop", "bad")));
    }

    #[test]
    fn the_snapshot_is_synced_only_after_services_and_slices_are_both_listed() {
        let (store, mut w) = Store::new();
        let mut fold = Fold::default();
        for m in [
            msg(Kind::Service, Update::Relisting),
            msg(Kind::Service, Update::Listed(svc("web", "10.96.0.1"))),
            msg(Kind::Service, Update::ListDone),
        ] {
            fold.apply(&mut w, m);
        }
        w.commit();
        assert!(!store.load().synced);
        assert_eq!(store.load().services.len(), 1);
        fold.apply(&mut w, msg(Kind::EndpointSlice, Update::Relisting));
        fold.apply(&mut w, msg(Kind::EndpointSlice, Update::ListDone));
        w.commit();
        assert!(store.load().synced);
    }

    #[test]
    fn a_relist_replaces_the_kind_in_one_commit_and_keeps_last_good_versions() {
        let (store, mut w) = Store::new();
        let mut fold = Fold::default();
        for k in [Kind::Service, Kind::EndpointSlice] {
            fold.apply(&mut w, msg(k, Update::Relisting));
        }
        for s in ["a", "b", "c"] {
            fold.apply(&mut w, msg(Kind::Service, Update::Listed(svc(s, "10.96.0.1"))));
        }
        fold.apply(&mut w, msg(Kind::Service, Update::ListDone));
        fold.apply(&mut w, msg(Kind::EndpointSlice, Update::ListDone));
        w.commit();
        let g = store.load().generation;

        // A relist where a is gone, b is unconvertible now, c changed; a half list before it
        // is forgotten.
        fold.apply(&mut w, msg(Kind::Service, Update::Relisting));
        fold.apply(&mut w, msg(Kind::Service, Update::Listed(svc("zzz", "10.96.0.9"))));
        fold.apply(&mut w, msg(Kind::Service, Update::Relisting));
        fold.apply(&mut w, msg(Kind::Service, Update::ListedBad(ObjectKey::new("shop", "b"))));
        fold.apply(&mut w, msg(Kind::Service, Update::Listed(svc("c", "10.96.0.3"))));
        w.commit();
        assert_eq!(store.load().generation, g, "nothing is published before the list is complete");
        fold.apply(&mut w, msg(Kind::Service, Update::ListDone));
        w.commit();
        let snap = store.load();
        assert_eq!(snap.generation, g + 1);
        let mut names: Vec<_> = snap.services.keys().map(|k| k.name.to_string()).collect();
        names.sort();
        assert_eq!(names, ["b", "c"]);
        assert!(snap.synced);
    }

    #[test]
    fn unchanged_events_leave_no_timestamp_behind() {
        let (store, mut w) = Store::new();
        let mut fold = Fold::default();
        fold.apply(&mut w, msg(Kind::Service, Update::Applied(svc("a", "10.96.0.1"))));
        w.commit();
        let g = store.load().generation;
        let old = Instant::now();
        fold.apply(&mut w, Msg { kind: Kind::Service, at: old, update: Update::Applied(svc("a", "10.96.0.1")) });
        fold.apply(&mut w, Msg { kind: Kind::Service, at: old, update: Update::Deleted(ObjectKey::new("shop", "x")) });
        assert!(w.commit().is_none());
        std::thread::sleep(std::time::Duration::from_millis(5));
        let new = Instant::now();
        fold.apply(&mut w, Msg { kind: Kind::Service, at: new, update: Update::Applied(svc("a", "10.96.0.2")) });
        w.commit();
        assert_eq!(store.load().observed_since(g), Some(new));
    }

    #[test]
    fn node_watch_selects_only_this_node_and_pods_only_when_asked() {
        let cfg = KubeSourceConfig { watch_pods: false, node_name: Some("n1".into()) };
        assert_eq!(cfg.kinds(), [Kind::Service, Kind::EndpointSlice, Kind::Node]);
        let spec = WatchSpec { kind: Kind::Node, node_name: cfg.node_name.clone() };
        assert_eq!(spec.config(true).field_selector.as_deref(), Some("metadata.name=n1"));
        let cfg = KubeSourceConfig { watch_pods: true, node_name: None };
        assert_eq!(cfg.kinds(), [Kind::Service, Kind::EndpointSlice, Kind::Pod]);
    }

    /// A fake API server without streaming lists (as one without the `WatchList` feature):
    /// 422 for `sendInitialEvents`, plain lists, and watches that never send anything.
    fn no_streaming_server(seen: Arc<std::sync::Mutex<Vec<String>>>) -> Client {
        use http_body_util::{BodyExt, Full, StreamBody};
        type B = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;
        let service = tower::service_fn(move |req: http::Request<::kube::client::Body>| {
            let uri = req.uri().to_string();
            seen.lock().unwrap().push(uri.clone());
            async move {
                let json = |code: u16, v: Value| -> http::Response<B> {
                    let body = Full::new(bytes::Bytes::from(v.to_string())).boxed();
                    http::Response::builder().status(code).header("content-type", "application/json").body(body).unwrap()
                };
                let resp = if uri.contains("sendInitialEvents=true") {
                    json(422, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422,
                        "message": "ListOptions.meta.k8s.io \"\" is invalid: sendInitialEvents: Forbidden: sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled"}))
                } else if uri.contains("watch=true") {
                    let never = futures::stream::pending::<Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>>();
                    http::Response::builder().status(200).body(BodyExt::boxed(StreamBody::new(never))).unwrap()
                } else if uri.starts_with("/api/v1/services") {
                    json(200, json!({"kind": "ServiceList", "apiVersion": "v1", "metadata": {"resourceVersion": "10"}, "items": [
                        {"metadata": {"name": "web", "namespace": "shop", "resourceVersion": "9"}, "spec": {"clusterIP": "10.96.0.10"}}]}))
                } else {
                    json(200, json!({"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1", "metadata": {"resourceVersion": "10"}, "items": []}))
                };
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        Client::new(service, "default")
    }

    #[tokio::test]
    async fn a_server_without_streaming_lists_is_listed_in_pages() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (store, writer) = Store::new();
        let source = tokio::spawn(run(no_streaming_server(seen.clone()), KubeSourceConfig::default(), writer, std::future::pending()));
        let mut generations = store.subscribe();
        tokio::time::timeout(std::time::Duration::from_secs(5), generations.wait_for(|_| store.load().synced))
            .await
            .expect("synced from paginated lists")
            .unwrap();
        assert_eq!(store.load().services.len(), 1);
        let seen = seen.lock().unwrap().clone();
        assert!(seen.iter().any(|u| u.starts_with("/api/v1/services?") && u.contains("limit=500") && !u.contains("watch")), "{seen:?}");
        source.abort();
    }
}
