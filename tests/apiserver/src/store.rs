//! The object store: current objects, a global resourceVersion counter and the event history
//! that watches replay and that lists at an older resourceVersion are rebuilt from.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::Error;
use crate::resources::ResourceType;

/// Store key; ordered like etcd keys so that lists come out sorted by namespace, then name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Key {
    /// Index into [`RESOURCES`].
    pub(crate) res: usize,
    /// Empty for cluster-scoped resources.
    pub(crate) ns: String,
    pub(crate) name: String,
}

impl Key {
    /// The key of `name` in `ns` (ignored for cluster-scoped resources).
    pub(crate) fn of(rt: &'static ResourceType, ns: &str, name: &str) -> Key {
        let ns = if rt.namespaced { ns.into() } else { String::new() };
        Key { res: rt.index(), ns, name: name.into() }
    }

    /// The resume point a continue token carries.
    pub(crate) fn encode(&self) -> String {
        format!("{}/{}", self.ns, self.name)
    }
}

/// Watch event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One committed change; kept so that watches can replay from an older resourceVersion and
/// lists can be served at one.
#[derive(Debug, Clone)]
pub(crate) struct HistEvent {
    pub(crate) rv: u64,
    pub(crate) key: Key,
    pub(crate) etype: EventType,
    /// The object after the change (for deletes: the last state, stamped with the delete's RV).
    pub(crate) object: Arc<Value>,
    /// The object before the change; lets a snapshot be rolled back and lets selector
    /// watches turn a modification into ADDED/DELETED when the object moves in or out.
    pub(crate) prev: Option<Arc<Value>>,
}

/// All server state that requests and the Rust API share.
#[derive(Debug)]
pub(crate) struct Store {
    objects: BTreeMap<Key, Arc<Value>>,
    history: VecDeque<HistEvent>,
    /// Last resourceVersion handed out.
    rv: u64,
    /// Oldest resourceVersion a watch may start from or a list may be served at: every event
    /// after it is still in `history`.
    floor: u64,
    history_limit: usize,
    /// Seed and counter for uids, so uids differ across server instances and objects.
    uid_seed: u64,
    uid_counter: u64,
    /// Next ClusterIP to hand to a Service created without one (offset in 10.96.0.0/12).
    next_cluster_ip: u32,
}

/// Splitmix64: cheap, well-mixed pseudo-random numbers for uids.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// RFC 3339 UTC timestamp with second precision, as Kubernetes writes `creationTimestamp`.
pub(crate) fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?
        .get(field)?
        .as_str()
        .filter(|s| !s.is_empty())
}

impl Store {
    pub(crate) fn new(history_limit: usize, first_rv: u64) -> Self {
        let uid_seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id()).rotate_left(32);
        Store {
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            rv: first_rv,
            floor: first_rv,
            history_limit: history_limit.max(1),
            uid_seed,
            uid_counter: 0,
            next_cluster_ip: 10,
        }
    }

    /// Last resourceVersion handed out.
    pub(crate) fn rv(&self) -> u64 {
        self.rv
    }

    /// Oldest resourceVersion still served.
    pub(crate) fn floor(&self) -> u64 {
        self.floor
    }

    fn new_uid(&mut self) -> String {
        self.uid_counter += 1;
        let a = mix(self.uid_seed ^ self.uid_counter);
        let b = mix(a);
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | (b >> 48) & 0x3fff,
            b & 0xffff_ffff_ffff
        )
    }

    /// Builds the key of `obj` for resource `rt`, taking the namespace from the path when given.
    /// Fills `metadata.namespace` (`default` when neither says) and `generateName`.
    fn key_for(
        &mut self,
        rt: &'static ResourceType,
        path_ns: Option<&str>,
        obj: &mut Value,
    ) -> Result<Key, Error> {
        if !obj.is_object() {
            return Err(Error::BadRequest("object must be a JSON object".into()));
        }
        if let Some(kind) = obj.get("kind").and_then(Value::as_str)
            && !kind.is_empty()
            && kind != rt.kind
        {
            return Err(Error::BadRequest(format!(
                "kind {kind} does not match resource {}",
                rt.plural
            )));
        }
        obj["kind"] = json!(rt.kind);
        obj["apiVersion"] = json!(rt.api_version());
        if !obj.get("metadata").is_some_and(Value::is_object) {
            obj["metadata"] = json!({});
        }
        let ns = if rt.namespaced {
            let body_ns = meta_str(obj, "namespace");
            match (path_ns, body_ns) {
                (Some(p), Some(b)) if p != b => {
                    return Err(Error::BadRequest(
                        "the namespace of the provided object does not match the namespace sent on the request".into(),
                    ));
                }
                (Some(p), _) => p.to_string(),
                (None, Some(b)) => b.to_string(),
                (None, None) => "default".to_string(),
            }
        } else {
            String::new()
        };
        let meta = &mut obj["metadata"];
        if rt.namespaced {
            meta["namespace"] = json!(ns);
        } else if let Some(m) = meta.as_object_mut() {
            m.remove("namespace");
        }
        if meta_str(obj, "name").is_none()
            && let Some(prefix) = meta_str(obj, "generateName").map(str::to_string)
        {
            self.uid_counter += 1;
            let suffix = mix(self.uid_seed ^ self.uid_counter) % 60_466_176; // 36^5
            obj["metadata"]["name"] = json!(format!("{prefix}{}", base36(suffix)));
        }
        let name = meta_str(obj, "name")
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{} metadata.name: Required value: name or generateName is required",
                    rt.kind
                ))
            })?
            .to_string();
        Ok(Key {
            res: rt.index(),
            ns,
            name,
        })
    }

    /// Stamps the next resourceVersion on `obj`, stores it and records the event.
    fn commit(
        &mut self,
        key: Key,
        etype: EventType,
        mut obj: Value,
        prev: Option<Arc<Value>>,
    ) -> Arc<Value> {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let obj = Arc::new(obj);
        match etype {
            EventType::Deleted => {
                self.objects.remove(&key);
            }
            _ => {
                self.objects.insert(key.clone(), obj.clone());
            }
        }
        self.history.push_back(HistEvent {
            rv: self.rv,
            key,
            etype,
            object: obj.clone(),
            prev,
        });
        while self.history.len() > self.history_limit {
            if let Some(ev) = self.history.pop_front() {
                self.floor = ev.rv;
            }
        }
        obj
    }

    /// Creates an object; `AlreadyExists` if the key is taken.
    pub(crate) fn create(
        &mut self,
        rt: &'static ResourceType,
        path_ns: Option<&str>,
        mut obj: Value,
    ) -> Result<Arc<Value>, Error> {
        let key = self.key_for(rt, path_ns, &mut obj)?;
        if self.objects.contains_key(&key) {
            return Err(Error::AlreadyExists {
                resource: rt.plural.into(),
                namespace: key.ns,
                name: key.name,
            });
        }
        let uid = self.new_uid();
        let meta = &mut obj["metadata"];
        meta["uid"] = json!(uid);
        meta["creationTimestamp"] = json!(now_rfc3339());
        meta["generation"] = json!(1);
        if let Some(m) = meta.as_object_mut() {
            m.remove("deletionTimestamp");
        }
        if rt.kind == "Service" {
            self.allocate_cluster_ip(&mut obj);
        }
        Ok(self.commit(key, EventType::Added, obj, None))
    }

    /// Gives a Service without `spec.clusterIP` one from 10.96.0.0/12, as the real allocator
    /// would (not for `ExternalName` or headless `None`).
    fn allocate_cluster_ip(&mut self, obj: &mut Value) {
        if !obj.get("spec").is_some_and(Value::is_object) {
            obj["spec"] = json!({});
        }
        let spec = &mut obj["spec"];
        let is_external = spec.get("type").and_then(Value::as_str) == Some("ExternalName");
        let has_ip = spec
            .get("clusterIP")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty());
        if is_external || has_ip {
            if has_ip && spec.get("clusterIPs").is_none() {
                spec["clusterIPs"] = json!([spec["clusterIP"].clone()]);
            }
            return;
        }
        let n = self.next_cluster_ip;
        self.next_cluster_ip = (self.next_cluster_ip + 1) % (1 << 20);
        let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 96, 0, 0)) + n);
        spec["clusterIP"] = json!(ip.to_string());
        spec["clusterIPs"] = json!([ip.to_string()]);
    }

    /// Replaces an object. A non-empty `metadata.resourceVersion` in `obj` must equal the stored
    /// one (`Conflict` otherwise); uid and creationTimestamp are kept from the stored object.
    pub(crate) fn update(
        &mut self,
        rt: &'static ResourceType,
        path_ns: Option<&str>,
        path_name: Option<&str>,
        mut obj: Value,
    ) -> Result<Arc<Value>, Error> {
        let key = self.key_for(rt, path_ns, &mut obj)?;
        if let Some(name) = path_name
            && name != key.name
        {
            return Err(Error::BadRequest(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                key.name
            )));
        }
        let Some(cur) = self.objects.get(&key).cloned() else {
            return Err(Error::NotFound {
                resource: rt.plural.into(),
                namespace: key.ns,
                name: key.name,
            });
        };
        if let Some(want) = meta_str(&obj, "resourceVersion")
            && Some(want) != meta_str(&cur, "resourceVersion")
        {
            return Err(Error::Conflict {
                resource: rt.plural.into(),
                namespace: key.ns,
                name: key.name,
                message: "the object has been modified; please apply your changes to the latest version and try again".into(),
            });
        }
        for field in ["uid", "creationTimestamp"] {
            obj["metadata"][field] = cur["metadata"][field].clone();
        }
        let generation = cur
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        let spec_changed = obj.get("spec") != cur.get("spec");
        obj["metadata"]["generation"] = json!(if spec_changed {
            generation + 1
        } else {
            generation
        });
        if rt.kind == "Service" {
            if obj.pointer("/spec/clusterIP").is_none()
                && let Some(ip) = cur.pointer("/spec/clusterIP").cloned()
            {
                obj["spec"]["clusterIP"] = ip;
            }
            self.allocate_cluster_ip(&mut obj);
        }
        Ok(self.commit(key, EventType::Modified, obj, Some(cur)))
    }

    /// Deletes an object, returning its last state (stamped with the delete's resourceVersion).
    pub(crate) fn delete(
        &mut self,
        rt: &'static ResourceType,
        ns: &str,
        name: &str,
    ) -> Result<Arc<Value>, Error> {
        let key = Key::of(rt, ns, name);
        let Some(cur) = self.objects.get(&key).cloned() else {
            return Err(Error::NotFound {
                resource: rt.plural.into(),
                namespace: key.ns,
                name: key.name,
            });
        };
        Ok(self.commit(key, EventType::Deleted, (*cur).clone(), Some(cur)))
    }

    /// One object by namespace (ignored for cluster-scoped) and name.
    pub(crate) fn get(
        &self,
        rt: &'static ResourceType,
        ns: &str,
        name: &str,
    ) -> Option<Arc<Value>> {
        let key = Key::of(rt, ns, name);
        self.objects.get(&key).cloned()
    }

    /// All objects of one resource (optionally one namespace) as of resourceVersion `at`,
    /// sorted by key. `at` must lie in `floor..=rv`.
    pub(crate) fn snapshot(
        &self,
        rt: &'static ResourceType,
        ns: Option<&str>,
        at: u64,
    ) -> Result<Vec<(Key, Arc<Value>)>, Error> {
        if at < self.floor {
            return Err(Error::Expired {
                message: format!("too old resource version: {at} ({})", self.floor),
            });
        }
        let res = rt.index();
        let in_scope = |k: &Key| k.res == res && ns.is_none_or(|n| k.ns == n);
        let lo = Key {
            res,
            ns: ns.unwrap_or("").into(),
            name: String::new(),
        };
        let mut objs: BTreeMap<Key, Arc<Value>> = self
            .objects
            .range(lo..)
            .take_while(|(k, _)| in_scope(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // Roll back changes made after `at`, newest first.
        for ev in self.history.iter().rev().take_while(|ev| ev.rv > at) {
            if !in_scope(&ev.key) {
                continue;
            }
            match &ev.prev {
                Some(prev) => objs.insert(ev.key.clone(), prev.clone()),
                None => objs.remove(&ev.key),
            };
        }
        Ok(objs.into_iter().collect())
    }

    /// Every event after resourceVersion `after`; `Expired` if some of them were dropped.
    pub(crate) fn events_after(
        &self,
        after: u64,
    ) -> Result<impl Iterator<Item = &HistEvent>, Error> {
        if after < self.floor {
            return Err(Error::Expired {
                message: format!("too old resource version: {after} ({})", self.floor),
            });
        }
        let start = self.history.partition_point(|ev| ev.rv <= after);
        Ok(self.history.range(start..))
    }

    /// Starts a new resourceVersion epoch: the counter jumps to `base`, history is dropped, so
    /// any older resourceVersion is answered with 410 Gone.
    pub(crate) fn new_epoch(&mut self, base: u64) {
        self.rv = base.max(self.rv + 1);
        self.floor = self.rv;
        self.history.clear();
    }

    /// Drops every object and all history without producing events (a wiped etcd).
    pub(crate) fn clear(&mut self) {
        self.objects.clear();
        self.history.clear();
        self.floor = self.rv;
    }

    /// Number of stored objects, for tests.
    #[cfg(test)]
    fn count(&self) -> usize {
        self.objects.len()
    }
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789abcdefghij";
    let mut out = Vec::new();
    for _ in 0..5 {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
    }
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::resolve;

    fn svc(ns: &str, name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": {"ports": [{"port": 80}]}})
    }

    #[test]
    fn snapshot_rolls_back_later_changes() {
        let rt = resolve("svc").unwrap();
        let mut s = Store::new(100, 1);
        s.create(rt, None, svc("a", "x")).unwrap();
        let at = s.rv();
        s.create(rt, None, svc("a", "y")).unwrap();
        s.delete(rt, "a", "x").unwrap();
        let names: Vec<String> = s
            .snapshot(rt, None, at)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k.name)
            .collect();
        assert_eq!(names, ["x"]);
        assert_eq!(s.count(), 1);
    }

    #[test]
    fn trimmed_history_expires_old_versions() {
        let rt = resolve("svc").unwrap();
        let mut s = Store::new(2, 1);
        for i in 0..5 {
            s.create(rt, None, svc("a", &format!("s{i}"))).unwrap();
        }
        assert!(s.events_after(1).is_err());
        assert_eq!(s.events_after(s.floor()).unwrap().count(), 2);
    }

    #[test]
    fn update_checks_resource_version_and_assigns_cluster_ip() {
        let rt = resolve("svc").unwrap();
        let mut s = Store::new(100, 1);
        let created = s.create(rt, None, svc("a", "x")).unwrap();
        assert_eq!(created["spec"]["clusterIP"], "10.96.0.10");
        let mut stale = (*created).clone();
        stale["metadata"]["resourceVersion"] = json!("1");
        assert!(matches!(
            s.update(rt, None, None, stale),
            Err(Error::Conflict { .. })
        ));
        let updated = s.update(rt, None, None, (*created).clone()).unwrap();
        assert_eq!(updated["metadata"]["uid"], created["metadata"]["uid"]);
        assert!(now_rfc3339().ends_with('Z'));
    }
}
