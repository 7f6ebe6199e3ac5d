//! The state-file source: reads what `kubectl get svc,endpointslices,pods,nodes -A -o yaml|json` prints and reloads it when it changes.
//!
//! A file that does not parse changes nothing: the last good state keeps serving. An object
//! with a bad field is logged with its name and the field, and its last good version (if the
//! file had one before) is kept; the rest of the file loads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use crate::convert::{self, ConvertError};
use crate::model::{Interner, Kind, Object, ObjectKey};
use crate::snapshot::Writer;

/// Why a state file could not be loaded at all.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// The file could not be read.
    #[error("reading state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid YAML or JSON.
    #[error("parsing state file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, with the line.
        message: String,
    },
}

impl StateFileError {
    /// True when the file was read but did not parse.
    pub fn is_parse(&self) -> bool {
        matches!(self, StateFileError::Parse { .. })
    }
}

/// What one load did.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Objects read and converted.
    pub loaded: usize,
    /// Objects that failed to convert.
    pub errors: Vec<ConvertError>,
    /// Of those, how many kept their last good version.
    pub kept: usize,
    /// Items of kinds waypost does not read.
    pub ignored: usize,
}

/// Splits a state file into objects: one JSON value, or YAML documents; `kind: List` (and
/// `*List`) objects are flattened to their items.
pub fn parse_objects(text: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for_each_object(text, |v| out.push(v))?;
    Ok(out)
}

/// Like [`parse_objects`], but hands each object to `f` as soon as it is parsed. The items of a
/// YAML `kind: List` as kubectl prints it (`items:` then `- ` at column 0) are parsed one at a
/// time, so a large file never has all its objects in memory as generic values at once.
pub fn for_each_object(text: &str, mut f: impl FnMut(Value)) -> Result<(), String> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let v: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        return flatten(v, &mut f);
    }
    for doc in yaml_documents(text) {
        if let Some((rest, items)) = split_list_items(doc) {
            let head: Value = serde_yaml::from_str(&rest).map_err(|e| e.to_string())?;
            if head.get("kind").and_then(Value::as_str).is_some_and(|k| k.ends_with("List")) {
                for item in items {
                    let v: Value = serde_yaml::from_str(&item).map_err(|e| e.to_string())?;
                    flatten(v, &mut f)?;
                }
                continue;
            }
        }
        for de in serde_yaml::Deserializer::from_str(doc) {
            let v: Value = serde::Deserialize::deserialize(de).map_err(|e| e.to_string())?;
            flatten(v, &mut f)?;
        }
    }
    Ok(())
}

/// Splits YAML text at `---` document markers (column 0).
fn yaml_documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if line.starts_with("---") && matches!(line.as_bytes().get(3), None | Some(b' ' | b'\n' | b'\r' | b'\t')) {
            docs.push(&text[start..at]);
            start = at + line.len();
        }
        at += line.len();
    }
    docs.push(&text[start..]);
    docs
}

/// For a document whose `items:` sequence starts at column 0 (kubectl's layout): the document
/// without the sequence, and each item as its own YAML text. `None` for any other layout.
fn split_list_items(doc: &str) -> Option<(String, Vec<String>)> {
    let lines: Vec<&str> = doc.split_inclusive('\n').collect();
    let i = lines.iter().position(|l| l.trim_end() == "items:")?;
    let mut items: Vec<String> = Vec::new();
    let mut j = i + 1;
    while j < lines.len() {
        let line = lines[j];
        if let Some(body) = line.strip_prefix("- ") {
            items.push(format!("  {body}"));
        } else if line.trim_end() == "-" {
            items.push("\n".into());
        } else if line.trim().is_empty() || line.starts_with('#') {
            if let Some(cur) = items.last_mut() {
                cur.push('\n');
            }
        } else if line.starts_with("  ") {
            items.last_mut()?.push_str(line);
        } else {
            break;
        }
        j += 1;
    }
    if items.is_empty() {
        return None;
    }
    let items = items.into_iter().map(|t| dedent2(&t)).collect();
    let mut rest = String::new();
    rest.extend(lines[..i].iter().copied());
    rest.extend(lines[j..].iter().copied());
    Some((rest, items))
}

/// Removes two columns of indentation from every line.
fn dedent2(text: &str) -> String {
    text.split_inclusive('\n').map(|l| l.strip_prefix("  ").unwrap_or(l.trim_start_matches(' '))).collect()
}

/// Hands `v` to `f`, flattening lists.
fn flatten(v: Value, f: &mut impl FnMut(Value)) -> Result<(), String> {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::Null => {}
            Value::Array(items) => stack.extend(items.into_iter().rev()),
            Value::Object(mut m) => {
                let is_list = m.get("kind").and_then(Value::as_str).is_some_and(|k| k.ends_with("List"));
                match m.remove("items") {
                    Some(Value::Array(items)) if is_list => stack.extend(items.into_iter().rev()),
                    Some(items) => {
                        m.insert("items".into(), items);
                        f(Value::Object(m));
                    }
                    None => f(Value::Object(m)),
                }
            }
            other => return Err(format!("expected an object or a list of objects, found {other}")),
        }
    }
    Ok(())
}

/// The state-file source.
pub struct StateFile {
    /// The file to read.
    path: PathBuf,
    /// Shares repeated strings across reloads.
    interner: Interner,
    /// Whether Pods are kept: only some features need them (as with the API source, which
    /// does not watch them otherwise), and they are most of a large cluster's objects.
    pods: bool,
}

impl StateFile {
    /// A source for `path`; nothing is read yet.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), interner: Interner::default(), pods: true }
    }

    /// Keeps (`true`, the default) or skips the file's Pods.
    pub fn with_pods(mut self, pods: bool) -> Self {
        self.pods = pods;
        self
    }

    /// The file this source reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file and applies it to `writer`, committing one snapshot.
    pub fn load(&mut self, writer: &mut Writer) -> Result<LoadReport, StateFileError> {
        let started = Instant::now();
        let text = std::fs::read_to_string(&self.path)
            .map_err(|source| StateFileError::Io { path: self.path.clone(), source })?;
        writer.observed(started);
        self.load_text(&text, writer)
    }

    /// Applies the content of a state file to `writer`, committing one snapshot.
    pub fn load_text(&mut self, text: &str, writer: &mut Writer) -> Result<LoadReport, StateFileError> {
        let mut report = LoadReport::default();
        let mut next: HashMap<(Kind, ObjectKey), Object> = HashMap::new();
        let path = &self.path;
        let interner = &mut self.interner;
        let keep_pods = self.pods;
        for_each_object(text, |item| {
            let Some(kind) = convert::kind_of(&item).filter(|k| keep_pods || *k != Kind::Pod) else {
                report.ignored += 1;
                return;
            };
            match convert::convert(kind, &item, interner) {
                Ok(obj) => {
                    report.loaded += 1;
                    next.insert(obj.id(), obj);
                }
                Err(e) => {
                    let key = convert::identify(kind, &item);
                    // The last good version is the one the model holds now.
                    let kept = key.and_then(|k| writer.current().object(kind, &k).map(|o| (k, o)));
                    match kept {
                        Some((k, o)) => {
                            tracing::warn!(file = %path.display(), "{e}; keeping its last good version");
                            report.kept += 1;
                            next.insert((kind, k), o);
                        }
                        None => tracing::warn!(file = %path.display(), "{e}; object skipped"),
                    }
                    report.errors.push(e);
                }
            }
        })
        .map_err(|message| StateFileError::Parse { path: self.path.clone(), message })?;
        let mut by_kind: HashMap<Kind, Vec<Object>> = HashMap::new();
        for ((kind, _), obj) in next {
            by_kind.entry(kind).or_default().push(obj);
        }
        for kind in [Kind::Service, Kind::EndpointSlice, Kind::Pod, Kind::Node] {
            writer.replace_kind(kind, by_kind.remove(&kind).unwrap_or_default());
        }
        writer.mark_synced();
        writer.commit();
        self.interner.prune();
        Ok(report)
    }

    /// Loads the file, then reloads it whenever it changes (checked every `poll`), until
    /// `shutdown` resolves. Errors are logged; the last good state keeps serving.
    pub async fn run(mut self, mut writer: Writer, poll: Duration, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut seen: Option<FileStamp> = None;
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => {}
            }
            let stamp = FileStamp::of(&self.path);
            if stamp == seen {
                continue;
            }
            match self.load(&mut writer) {
                Ok(r) => {
                    let (s, e, p, n) = writer.current().counts();
                    tracing::info!(
                        file = %self.path.display(), generation = writer.current().generation,
                        services = s, endpointslices = e, pods = p, nodes = n,
                        bad_objects = r.errors.len(), "state file loaded"
                    );
                }
                Err(e) => tracing::error!("{e}; keeping the last good state"),
            }
            // If the file changed while it was read, read it again on the next tick.
            seen = if FileStamp::of(&self.path) == stamp { stamp } else { None };
        }
    }
}

/// What tells that a file changed: its inode, size and modification time.
#[derive(PartialEq, Eq, Clone, Copy, Debug)]
struct FileStamp {
    /// Changes when the file is replaced by a rename.
    inode: u64,
    /// Changes on most edits.
    len: u64,
    /// Changes on every write (nanosecond resolution on common filesystems).
    modified: SystemTime,
}

impl FileStamp {
    fn of(path: &Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp { inode: m.ino(), len: m.len(), modified: m.modified().ok()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Store;

    const GOOD: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: shop}
  spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
- apiVersion: v1
  kind: Service
  metadata: {name: db, namespace: shop}
  spec: {clusterIP: 10.96.0.11}
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: cm, namespace: shop}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.1.0.1]}]
"#;

    #[test]
    fn list_and_multi_document_yaml_both_load() {
        let (store, mut w) = Store::new();
        let r = StateFile::new("x").load_text(GOOD, &mut w).unwrap();
        assert_eq!((r.loaded, r.ignored, r.errors.len()), (3, 1, 0));
        let snap = store.load();
        assert!(snap.synced);
        assert_eq!(snap.services.len(), 2);
        assert_eq!(snap.slices_of(&ObjectKey::new("shop", "web")).len(), 1);
    }

    #[test]
    fn kubectl_layout_is_split_into_items_and_parses_like_the_whole_document() {
        let text = "apiVersion: v1\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata:\n    name: a\n    namespace: b\n  spec:\n    ports:\n    - port: 80\n      name: http\n    description: |\n      line one\n      - not an item\n\n- kind: Pod\n  metadata: {name: p, namespace: b}\n# a comment\nkind: List\nmetadata:\n  resourceVersion: \"\"\n---\nkind: Node\nmetadata: {name: n1}\n";
        let (rest, items) = split_list_items(yaml_documents(text)[0]).unwrap();
        assert_eq!(items.len(), 2);
        assert!(rest.contains("kind: List") && !rest.contains("Service"));
        let streamed = parse_objects(text).unwrap();
        let whole: Vec<Value> = {
            let mut out = Vec::new();
            for de in serde_yaml::Deserializer::from_str(text) {
                flatten(serde::Deserialize::deserialize(de).unwrap(), &mut |v| out.push(v)).unwrap();
            }
            out
        };
        assert_eq!(streamed, whole);
        assert_eq!(streamed.len(), 3);
        assert_eq!(streamed[0]["spec"]["description"], "line one\n- not an item\n");
        // A broken item fails the whole file.
        assert!(parse_objects(&text.replace("name: p,", "name: [p,")).is_err());
    }

    #[test]
    fn pods_are_skipped_when_nothing_needs_them() {
        let text = "kind: List\nitems:\n- kind: Pod\n  metadata: {name: p, namespace: a}\n  status: {podIP: 10.0.0.1}\n";
        let (store, mut w) = Store::new();
        let r = StateFile::new("x").with_pods(false).load_text(text, &mut w).unwrap();
        assert_eq!((r.loaded, r.ignored), (0, 1));
        assert!(store.load().pods.is_empty());
        let (store, mut w) = Store::new();
        StateFile::new("x").load_text(text, &mut w).unwrap();
        assert_eq!(store.load().pods.len(), 1);
    }

    #[test]
    fn json_list_loads() {
        let (store, mut w) = Store::new();
        let text = r#"{"kind":"List","items":[{"kind":"Service","metadata":{"name":"a","namespace":"b"},"spec":{"clusterIP":"10.0.0.1"}}]}"#;
        StateFile::new("x").load_text(text, &mut w).unwrap();
        assert_eq!(store.load().services.len(), 1);
    }

    #[test]
    fn a_bad_object_keeps_its_last_good_version_and_the_rest_loads() {
        let (store, mut w) = Store::new();
        let mut src = StateFile::new("x");
        src.load_text(GOOD, &mut w).unwrap();
        let bad = GOOD.replace("10.96.0.10", "10.96.0.999").replace("10.96.0.11", "10.96.0.12");
        let r = src.load_text(&bad, &mut w).unwrap();
        assert_eq!(r.errors.len(), 1);
        assert_eq!(r.kept, 1);
        assert_eq!(r.errors[0].field, "spec.clusterIP");
        let snap = store.load();
        let web = &snap.services[&ObjectKey::new("shop", "web")];
        assert_eq!(web.cluster_ips[0].to_string(), "10.96.0.10");
        let db = &snap.services[&ObjectKey::new("shop", "db")];
        assert_eq!(db.cluster_ips[0].to_string(), "10.96.0.12");
    }

    #[test]
    fn a_file_that_does_not_parse_changes_nothing() {
        let (store, mut w) = Store::new();
        let mut src = StateFile::new("x");
        src.load_text(GOOD, &mut w).unwrap();
        let g = store.load().generation;
        let e = src.load_text("items: [unclosed", &mut w).unwrap_err();
        assert!(e.is_parse());
        assert_eq!(store.load().generation, g);
        assert_eq!(store.load().services.len(), 2);
    }

    #[test]
    fn reload_reports_only_the_services_that_changed() {
        let (store, mut w) = Store::new();
        let mut src = StateFile::new("x");
        src.load_text(GOOD, &mut w).unwrap();
        let g = store.load().generation;
        src.load_text(&GOOD.replace("10.1.0.1", "10.1.0.2"), &mut w).unwrap();
        match store.load().changes_since(g) {
            crate::Changes::Partial { services, .. } => {
                assert_eq!(services.into_iter().collect::<Vec<_>>(), vec![ObjectKey::new("shop", "web")])
            }
            other => panic!("{other:?}"),
        }
        let g = store.load().generation;
        src.load_text(GOOD, &mut w).unwrap();
        src.load_text(GOOD, &mut w).unwrap();
        assert_eq!(store.load().generation, g + 1, "an identical reload commits nothing");
    }
}
