//! The immutable cluster snapshot, the store that swaps it atomically, and the writer sources use to change it.
//!
//! Maps are persistent (structure-shared), so a commit costs O(changes · log n), not a copy of
//! the cluster. Each snapshot carries a short log of change sets: a consumer that last saw
//! generation `g` asks [`Snapshot::changes_since`] which services to rebuild, and gets
//! [`Changes::Full`] when it fell too far behind (or the source relisted).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::model::*;

/// How many change sets a snapshot remembers for consumers that lag behind.
const CHANGE_LOG_LEN: usize = 256;

/// What changed in one commit.
#[derive(Debug, Default, Clone)]
pub struct ChangeSet {
    /// The generation this commit produced.
    pub generation: u64,
    /// Services whose Service object or EndpointSlices changed (including deletions).
    pub services: Vec<ObjectKey>,
    /// Some Pod changed.
    pub pods: bool,
    /// Some Node changed.
    pub nodes: bool,
    /// Everything may have changed (relist or first sync): rebuild all.
    pub full: bool,
    /// When the source saw the earliest event folded into this commit, to measure how long a
    /// change takes to reach the consumers.
    pub observed_at: Option<Instant>,
}

/// What a consumer must rebuild to catch up from an older generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// Nothing changed.
    None,
    /// Rebuild everything.
    Full,
    /// Rebuild these services (and the pod- or node-derived data if flagged).
    Partial {
        /// Services to rebuild.
        services: HashSet<ObjectKey>,
        /// Pod-derived data is stale.
        pods: bool,
        /// Node-derived data is stale.
        nodes: bool,
    },
}

/// One immutable, consistent view of the cluster.
#[derive(Clone, Default)]
pub struct Snapshot {
    /// Increases by one per commit.
    pub generation: u64,
    /// The source has listed Services and EndpointSlices at least once; until then consumers
    /// must not answer as if the cluster were empty.
    pub synced: bool,
    /// Services by `namespace/name`.
    pub services: imbl::HashMap<ObjectKey, Arc<Service>>,
    /// EndpointSlices grouped by the Service they belong to, sorted by slice name.
    pub service_slices: imbl::HashMap<ObjectKey, Arc<[Arc<EndpointSlice>]>>,
    /// EndpointSlices by their own key, to find a slice's previous service on update.
    pub slices: imbl::HashMap<ObjectKey, Arc<EndpointSlice>>,
    /// Pods by `namespace/name`.
    pub pods: imbl::HashMap<ObjectKey, Arc<Pod>>,
    /// Nodes by name.
    pub nodes: imbl::HashMap<Name, Arc<Node>>,
    /// The last few change sets, oldest first.
    log: VecDeque<Arc<ChangeSet>>,
}

impl Snapshot {
    /// The slices of one service (empty when it has none).
    pub fn slices_of(&self, key: &ObjectKey) -> &[Arc<EndpointSlice>] {
        self.service_slices.get(key).map(|s| &s[..]).unwrap_or(&[])
    }

    /// The object of `kind` at `key` (Nodes: the name), if the snapshot has it.
    pub fn object(&self, kind: Kind, key: &ObjectKey) -> Option<Object> {
        match kind {
            Kind::Service => self.services.get(key).cloned().map(Object::Service),
            Kind::EndpointSlice => self.slices.get(key).cloned().map(Object::EndpointSlice),
            Kind::Pod => self.pods.get(key).cloned().map(Object::Pod),
            Kind::Node => self.nodes.get(&key.name).cloned().map(Object::Node),
        }
    }

    /// The change set that produced this snapshot, if any.
    pub fn last_change(&self) -> Option<&ChangeSet> {
        self.log.back().map(|c| &**c).filter(|c| c.generation == self.generation)
    }

    /// What changed between generation `since` and this snapshot.
    pub fn changes_since(&self, since: u64) -> Changes {
        if since == self.generation {
            return Changes::None;
        }
        if since > self.generation {
            return Changes::Full;
        }
        let Some(first) = self.log.front() else { return Changes::Full };
        if first.generation > since + 1 {
            return Changes::Full;
        }
        let mut services = HashSet::new();
        let (mut pods, mut nodes) = (false, false);
        for c in self.log.iter().filter(|c| c.generation > since) {
            if c.full {
                return Changes::Full;
            }
            services.extend(c.services.iter().cloned());
            pods |= c.pods;
            nodes |= c.nodes;
        }
        Changes::Partial { services, pods, nodes }
    }

    /// The earliest event time among the change sets after `since`.
    pub fn observed_since(&self, since: u64) -> Option<Instant> {
        self.log.iter().filter(|c| c.generation > since).filter_map(|c| c.observed_at).min()
    }

    /// Counts of each kind, for log lines.
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        (self.services.len(), self.slices.len(), self.pods.len(), self.nodes.len())
    }
}

/// Holds the current snapshot; readers load it lock-free, and can wait for the next one.
pub struct Store {
    /// The current snapshot.
    current: ArcSwap<Snapshot>,
    /// Announces each new generation to waiting consumers.
    generation: watch::Sender<u64>,
}

impl Store {
    /// A store holding an empty, unsynced snapshot, and the one writer that may change it.
    pub fn new() -> (Arc<Store>, Writer) {
        let (tx, _) = watch::channel(0);
        let store = Arc::new(Store { current: ArcSwap::from_pointee(Snapshot::default()), generation: tx });
        let writer = Writer { store: store.clone(), next: Snapshot::default(), pending: Pending::default() };
        (store, writer)
    }

    /// The current snapshot.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// A receiver that wakes on every new generation.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

/// Changes gathered since the last commit.
#[derive(Default)]
struct Pending {
    /// Services touched.
    services: HashSet<ObjectKey>,
    /// A pod changed.
    pods: bool,
    /// A node changed.
    nodes: bool,
    /// Everything must be rebuilt.
    full: bool,
    /// The earliest event folded in.
    observed_at: Option<Instant>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.services.is_empty() && !self.pods && !self.nodes && !self.full
    }
}

/// The one writer of a [`Store`]: sources apply objects to it and commit when a batch is done.
pub struct Writer {
    /// Where commits are published.
    store: Arc<Store>,
    /// The working copy; cloning it is cheap because its maps are persistent.
    next: Snapshot,
    /// What changed since the last commit.
    pending: Pending,
}

impl Writer {
    /// The store this writer publishes to.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The working copy as it stands (including uncommitted changes).
    pub fn current(&self) -> &Snapshot {
        &self.next
    }

    /// Notes when the event being applied was observed.
    pub fn observed(&mut self, at: Instant) {
        let o = &mut self.pending.observed_at;
        *o = Some(o.map_or(at, |p| p.min(at)));
    }

    /// Marks the source as synced (Services and EndpointSlices listed once).
    pub fn mark_synced(&mut self) {
        if !self.next.synced {
            self.next.synced = true;
            self.pending.full = true;
        }
    }

    /// Adds or replaces one object. Unchanged objects cause no change.
    pub fn apply(&mut self, obj: Object) {
        match obj {
            Object::Service(s) => {
                if self.next.services.get(&s.key) != Some(&s) {
                    self.pending.services.insert(s.key.clone());
                    self.next.services.insert(s.key.clone(), s);
                }
            }
            Object::EndpointSlice(s) => {
                let old = self.next.slices.insert(s.key.clone(), s.clone());
                if old.as_ref() == Some(&s) {
                    return;
                }
                if let Some(old) = old.filter(|o| o.service_name != s.service_name) {
                    self.ungroup(&old);
                }
                self.group(s);
            }
            Object::Pod(p) => {
                if self.next.pods.get(&p.key) != Some(&p) {
                    self.pending.pods = true;
                    self.next.pods.insert(p.key.clone(), p);
                }
            }
            Object::Node(n) => {
                if self.next.nodes.get(&n.name) != Some(&n) {
                    self.pending.nodes = true;
                    self.next.nodes.insert(n.name.clone(), n);
                }
            }
        }
    }

    /// Removes one object; removing an absent object is no change.
    pub fn delete(&mut self, kind: Kind, key: &ObjectKey) {
        match kind {
            Kind::Service => {
                if self.next.services.remove(key).is_some() {
                    self.pending.services.insert(key.clone());
                }
            }
            Kind::EndpointSlice => {
                if let Some(old) = self.next.slices.remove(key) {
                    self.ungroup(&old);
                }
            }
            Kind::Pod => {
                if self.next.pods.remove(key).is_some() {
                    self.pending.pods = true;
                }
            }
            Kind::Node => {
                if self.next.nodes.remove(&key.name).is_some() {
                    self.pending.nodes = true;
                }
            }
        }
    }

    /// Replaces every object of `kind` with `objects` (a relist), as a diff: objects that did
    /// not change cause no rebuild.
    pub fn replace_kind(&mut self, kind: Kind, objects: Vec<Object>) {
        let keep: HashSet<ObjectKey> = objects.iter().map(|o| o.id().1).collect();
        let stale: Vec<ObjectKey> = match kind {
            Kind::Service => self.next.services.keys().filter(|k| !keep.contains(*k)).cloned().collect(),
            Kind::EndpointSlice => self.next.slices.keys().filter(|k| !keep.contains(*k)).cloned().collect(),
            Kind::Pod => self.next.pods.keys().filter(|k| !keep.contains(*k)).cloned().collect(),
            Kind::Node => self
                .next
                .nodes
                .keys()
                .map(|n| ObjectKey::new("", n.clone()))
                .filter(|k| !keep.contains(k))
                .collect(),
        };
        for k in &stale {
            self.delete(kind, k);
        }
        for o in objects {
            debug_assert_eq!(o.id().0, kind);
            self.apply(o);
        }
    }

    /// Puts `slice` into its service's group, replacing an older version of it.
    fn group(&mut self, slice: Arc<EndpointSlice>) {
        let service = slice.service_key();
        let mut group: Vec<Arc<EndpointSlice>> = self
            .next
            .service_slices
            .get(&service)
            .map(|g| g.iter().filter(|s| s.key != slice.key).cloned().collect())
            .unwrap_or_default();
        let at = group.partition_point(|s| s.key.name < slice.key.name);
        group.insert(at, slice);
        self.next.service_slices.insert(service.clone(), group.into());
        self.pending.services.insert(service);
    }

    /// Takes `slice` out of its service's group.
    fn ungroup(&mut self, slice: &EndpointSlice) {
        let service = slice.service_key();
        let Some(old) = self.next.service_slices.get(&service) else { return };
        let group: Vec<Arc<EndpointSlice>> = old.iter().filter(|s| s.key != slice.key).cloned().collect();
        if group.is_empty() {
            self.next.service_slices.remove(&service);
        } else {
            self.next.service_slices.insert(service.clone(), group.into());
        }
        self.pending.services.insert(service);
    }

    /// Publishes the pending changes as a new snapshot; returns it, or `None` when nothing
    /// changed.
    pub fn commit(&mut self) -> Option<Arc<Snapshot>> {
        if self.pending.is_empty() {
            // Events that changed nothing must not time the next real change.
            self.pending.observed_at = None;
            return None;
        }
        let p = std::mem::take(&mut self.pending);
        self.next.generation += 1;
        let mut services: Vec<ObjectKey> = p.services.into_iter().collect();
        services.sort();
        let change = ChangeSet {
            generation: self.next.generation,
            services,
            pods: p.pods,
            nodes: p.nodes,
            full: p.full,
            observed_at: p.observed_at,
        };
        if self.next.log.len() == CHANGE_LOG_LEN {
            self.next.log.pop_front();
        }
        self.next.log.push_back(Arc::new(change));
        let snap = Arc::new(self.next.clone());
        self.store.current.store(snap.clone());
        self.store.generation.send_replace(snap.generation);
        Some(snap)
    }
}
