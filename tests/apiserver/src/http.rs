//! HTTP side: routing, discovery, list/get/write handlers, watch streams and the `/_test`
//! control endpoints.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use crate::Error;
use crate::resources::{self, ResourceType};
use crate::selector::{FieldSelector, LabelSelector};
use crate::server::Shared;
use crate::store::{EventType, HistEvent, Key};

// === impl Body ===

/// Response body: a whole buffer, or the receiving end of a watch stream (one chunk a line).
#[derive(Debug)]
pub(crate) enum Body {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Body::Stream(rx) => rx.poll_recv(cx).map(|d| d.map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }
}

type Resp = Response<Body>;

fn json_response(code: u16, value: &Value) -> Resp {
    let mut body = serde_json::to_vec(value).unwrap_or_default();
    body.push(b'\n');
    let mut resp = Response::new(Body::Full(Some(body.into())));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn text_response(code: u16, text: &'static str) -> Resp {
    let mut resp = Response::new(Body::Full(Some(Bytes::from_static(text.as_bytes()))));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// A `metav1.Status` failure.
fn status_object(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut status = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(details) = details {
        status["details"] = details;
    }
    status
}

fn error_status(err: &Error) -> Value {
    let details = match err {
        Error::NotFound { resource, name, .. }
        | Error::AlreadyExists { resource, name, .. }
        | Error::Conflict { resource, name, .. } => {
            let group = resources::resolve(resource).map(|r| r.group).unwrap_or("");
            Some(json!({"name": name, "group": group, "kind": resource}))
        }
        _ => None,
    };
    let message = match err {
        Error::NotFound { resource, name, .. } => format!("{resource} \"{name}\" not found"),
        Error::AlreadyExists { resource, name, .. } => {
            format!("{resource} \"{name}\" already exists")
        }
        Error::Conflict {
            resource,
            name,
            message,
            ..
        } => {
            format!("Operation cannot be fulfilled on {resource} \"{name}\": {message}")
        }
        other => other.to_string(),
    };
    status_object(err.code(), err.reason(), &message, details)
}

fn error_response(err: &Error) -> Resp {
    json_response(err.code(), &error_status(err))
}

fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        410 => "Expired",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

// === query parsing ===

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Decoded query parameters (last value wins).
#[derive(Debug, Default)]
struct Query(HashMap<String, String>);

impl Query {
    fn parse(q: Option<&str>) -> Query {
        let mut map = HashMap::new();
        for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            map.insert(percent_decode(k), percent_decode(v));
        }
        Query(map)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Non-empty value.
    fn value(&self, key: &str) -> Option<&str> {
        self.get(key).filter(|v| !v.is_empty())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("1" | "true" | "True"))
    }

    fn selectors(&self) -> Result<Filter, Error> {
        Ok(Filter {
            labels: LabelSelector::parse(self.get("labelSelector").unwrap_or(""))?,
            fields: FieldSelector::parse(self.get("fieldSelector").unwrap_or(""))?,
        })
    }

    fn u64(&self, key: &str) -> Result<Option<u64>, Error> {
        self.value(key)
            .map(|v| {
                v.parse()
                    .map_err(|_| Error::BadRequest(format!("invalid {key}: {v:?}")))
            })
            .transpose()
    }
}

/// Label and field selectors of a list or watch.
#[derive(Debug, Clone)]
struct Filter {
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }
}

// === routing ===

/// What a resource path names.
struct Target {
    rt: &'static ResourceType,
    /// Namespace from the path (`None` for all-namespaces and cluster-scoped paths).
    ns: Option<String>,
    name: Option<String>,
}

fn route(segs: &[&str]) -> Option<Target> {
    let (group, version, rest) = match segs {
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let found = |plural: &str| resources::by_path(group, version, plural);
    let target = |rt: &'static ResourceType, ns: Option<&str>, name: Option<&str>| {
        (rt.namespaced == ns.is_some() || name.is_none() && ns.is_none()).then(|| Target {
            rt,
            ns: ns.map(str::to_string),
            name: name.map(str::to_string),
        })
    };
    match rest {
        [plural] => target(found(plural)?, None, None),
        ["namespaces", ns, plural] if found(plural).is_some() => {
            target(found(plural)?, Some(ns), None)
        }
        ["namespaces", ns, plural, name] | ["namespaces", ns, plural, name, "status"] => {
            target(found(plural)?, Some(ns), Some(name))
        }
        [plural, name] | [plural, name, "status"] => target(found(plural)?, None, Some(name)),
        _ => None,
    }
}

fn discovery(shared: &Shared, segs: &[&str]) -> Option<Resp> {
    let doc = match segs {
        ["api"] => resources::api_versions(&shared.addr().to_string()),
        ["apis"] => resources::api_group_list(),
        ["api", "v1"] => resources::api_resource_list("", "v1")?,
        ["apis", group] => resources::api_group(group)?,
        ["apis", group, version] => resources::api_resource_list(group, version)?,
        ["version"] => resources::version_info(),
        ["healthz" | "livez" | "readyz"] => return Some(text_response(200, "ok")),
        _ => return None,
    };
    Some(json_response(200, &doc))
}

/// Entry point for every request.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Resp, Infallible> {
    let uri = req.uri().clone();
    let line = match uri.query() {
        Some(q) => format!("{} {}?{}", req.method(), uri.path(), q),
        None => format!("{} {}", req.method(), uri.path()),
    };
    tracing::trace!(request = %line, "test apiserver request");
    shared.log_request(line);
    let segs: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    let query = Query::parse(uri.query());

    if segs.first() == Some(&"_test") {
        return Ok(control(&shared, &segs[1..], &query).await);
    }
    // A stall holds every other request until cleared.
    let mut stall = shared.faults.stall_rx();
    let _ = stall.wait_for(|stalled| !*stalled).await;

    if let Some(resp) = discovery(&shared, &segs) {
        return Ok(resp);
    }
    let Some(target) = route(&segs) else {
        let msg = "the server could not find the requested resource";
        return Ok(json_response(
            404,
            &status_object(404, "NotFound", msg, Some(json!({}))),
        ));
    };
    let is_watch = req.method() == Method::GET && target.name.is_none() && query.flag("watch");
    if let Some(code) = shared.faults.take_failure() {
        let msg = format!("injected failure {code}");
        if code == 410 && is_watch {
            let (tx, rx) = mpsc::channel(1);
            let _ = tx.try_send(error_event(&format!(
                "too old resource version: injected ({msg})"
            )));
            return Ok(stream_response(rx));
        }
        return Ok(json_response(
            code,
            &status_object(code, reason_for(code), &msg, None),
        ));
    }

    let method = req.method().clone();
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let wants_table = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"));
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(error_response(&Error::BadRequest(
                "cannot read request body".into(),
            )));
        }
    };
    let result = match (&method, &target.name) {
        (&Method::GET, None) if is_watch => start_watch(&shared, &target, &query),
        (&Method::GET, None) => list(&shared, &target, &query).map(|l| {
            if wants_table {
                json_response(200, &table(&l))
            } else {
                json_response(200, &l)
            }
        }),
        (&Method::POST, None) => parse_body(&body, &content_type).and_then(|obj| {
            let ns = target.ns.clone();
            shared
                .mutate(|s| s.create(target.rt, ns.as_deref(), obj))
                .map(|o| json_response(201, &o))
        }),
        (&Method::DELETE, None) => {
            delete_collection(&shared, &target, &query).map(|l| json_response(200, &l))
        }
        (&Method::GET, Some(name)) => shared
            .store()
            .get(target.rt, target.ns.as_deref().unwrap_or(""), name)
            .ok_or_else(|| not_found(&target, name))
            .map(|o| {
                if wants_table {
                    json_response(200, &table(&json!({"items": [*o]})))
                } else {
                    json_response(200, &o)
                }
            }),
        (&Method::PUT, Some(name)) => parse_body(&body, &content_type).and_then(|obj| {
            shared
                .mutate(|s| s.update(target.rt, target.ns.as_deref(), Some(name), obj))
                .map(|o| json_response(200, &o))
        }),
        (&Method::PATCH, Some(name)) => {
            patch(&shared, &target, name, &body, &content_type).map(|o| json_response(200, &o))
        }
        (&Method::DELETE, Some(name)) => {
            delete_one(&shared, &target, name, &body).map(|o| json_response(200, &o))
        }
        _ => Ok(json_response(
            405,
            &status_object(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
                None,
            ),
        )),
    };
    Ok(result.unwrap_or_else(|err| error_response(&err)))
}

fn not_found(target: &Target, name: &str) -> Error {
    Error::NotFound {
        resource: target.rt.plural.into(),
        namespace: target.ns.clone().unwrap_or_default(),
        name: name.into(),
    }
}

fn parse_body(body: &[u8], content_type: &str) -> Result<Value, Error> {
    if content_type.contains("yaml") {
        serde_yaml::from_slice(body).map_err(Error::Parse)
    } else {
        serde_json::from_slice(body)
            .map_err(|e| Error::BadRequest(format!("cannot decode body: {e}")))
    }
}

// === handlers ===

/// Encodes a continue token: the list's resourceVersion and the last key returned.
fn encode_continue(rv: u64, key: &Key) -> String {
    format!("{rv}:{}", key.encode())
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_continue(token: &str) -> Option<(u64, String, String)> {
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| {
            token
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    let text = String::from_utf8(bytes?).ok()?;
    let (rv, key) = text.split_once(':')?;
    let (ns, name) = key.split_once('/')?;
    Some((rv.parse().ok()?, ns.to_string(), name.to_string()))
}

fn list(shared: &Shared, target: &Target, q: &Query) -> Result<Value, Error> {
    let filter = q.selectors()?;
    let limit = q.u64("limit")?.filter(|l| *l > 0);
    let rv_param = q.value("resourceVersion");
    let rv_match = q.value("resourceVersionMatch");
    let store = shared.store();
    let current = store.rv();
    let (at, start_after) = if let Some(token) = q.value("continue") {
        if rv_param.is_some() {
            return Err(Error::BadRequest(
                "specifying resource version is not allowed when using continue".into(),
            ));
        }
        let (rv, ns, name) = decode_continue(token)
            .ok_or_else(|| Error::BadRequest("invalid continue token".into()))?;
        if rv < store.floor() {
            return Err(Error::Expired {
                message: "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue value from the response.".into(),
            });
        }
        (rv, Some((ns, name)))
    } else {
        let at = match (rv_param, rv_match) {
            (None, Some(_)) => {
                return Err(Error::BadRequest(
                    "resourceVersionMatch is forbidden unless resourceVersion is provided".into(),
                ));
            }
            (None | Some("0"), _) => current,
            (Some(rv), m) => {
                let n: u64 = rv
                    .parse()
                    .map_err(|_| Error::BadRequest(format!("invalid resourceVersion {rv:?}")))?;
                if n > current {
                    return Err(Error::TooLargeResourceVersion {
                        requested: n,
                        current,
                    });
                }
                let exact = match m {
                    Some("Exact") => true,
                    Some("NotOlderThan") => false,
                    None => limit.is_some(),
                    Some(other) => {
                        return Err(Error::BadRequest(format!(
                            "unknown resourceVersionMatch {other:?}"
                        )));
                    }
                };
                if exact { n } else { current }
            }
        };
        (at, None)
    };
    let snapshot = store.snapshot(target.rt, target.ns.as_deref(), at)?;
    drop(store);

    let mut matching = snapshot
        .into_iter()
        .filter(|(k, _)| {
            start_after
                .as_ref()
                .is_none_or(|(ns, name)| (&k.ns, &k.name) > (ns, name))
        })
        .filter(|(_, o)| filter.matches(o));
    let mut items = Vec::new();
    let mut last_key = None;
    for (key, obj) in matching.by_ref() {
        items.push((*obj).clone());
        last_key = Some(key);
        if limit.is_some_and(|l| items.len() as u64 >= l) {
            break;
        }
    }
    let remaining = matching.count();
    let mut metadata = json!({"resourceVersion": at.to_string()});
    if remaining > 0
        && let Some(key) = last_key
    {
        metadata["continue"] = json!(encode_continue(at, &key));
        metadata["remainingItemCount"] = json!(remaining);
    }
    Ok(json!({
        "kind": target.rt.list_kind,
        "apiVersion": target.rt.api_version(),
        "metadata": metadata,
        "items": items,
    }))
}

fn delete_collection(shared: &Shared, target: &Target, q: &Query) -> Result<Value, Error> {
    let filter = q.selectors()?;
    let deleted = shared.mutate(|s| {
        let at = s.rv();
        let keys: Vec<Key> = s
            .snapshot(target.rt, target.ns.as_deref(), at)?
            .into_iter()
            .filter(|(_, o)| filter.matches(o))
            .map(|(k, _)| k)
            .collect();
        keys.iter()
            .map(|k| s.delete(target.rt, &k.ns, &k.name).map(|o| (*o).clone()))
            .collect::<Result<Vec<Value>, Error>>()
    })?;
    Ok(json!({
        "kind": target.rt.list_kind,
        "apiVersion": target.rt.api_version(),
        "metadata": {},
        "items": deleted,
    }))
}

fn delete_one(shared: &Shared, target: &Target, name: &str, body: &[u8]) -> Result<Value, Error> {
    let ns = target.ns.as_deref().unwrap_or("");
    let want_rv = serde_json::from_slice::<Value>(body).ok().and_then(|o| {
        o.pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    let deleted = shared.mutate(|s| {
        if let Some(want) = &want_rv {
            let cur = s.get(target.rt, ns, name).ok_or_else(|| not_found(target, name))?;
            if cur.pointer("/metadata/resourceVersion").and_then(Value::as_str) != Some(want.as_str()) {
                return Err(Error::Conflict {
                    resource: target.rt.plural.into(),
                    namespace: ns.into(),
                    name: name.into(),
                    message: "the ResourceVersion in the precondition does not match the ResourceVersion in record".into(),
                });
            }
        }
        s.delete(target.rt, ns, name)
    })?;
    Ok((*deleted).clone())
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// Merge patches (strategic merge patches are applied as merge patches: lists are replaced).
fn patch(
    shared: &Shared,
    target: &Target,
    name: &str,
    body: &[u8],
    content_type: &str,
) -> Result<Value, Error> {
    if !content_type.contains("merge-patch") {
        return Err(Error::BadRequest(format!(
            "unsupported patch type {content_type:?}: only merge patches are served"
        )));
    }
    let patch: Value = serde_json::from_slice(body)
        .map_err(|e| Error::BadRequest(format!("cannot decode patch: {e}")))?;
    let ns = target.ns.as_deref().unwrap_or("");
    shared
        .mutate(|s| {
            let mut obj = (*s
                .get(target.rt, ns, name)
                .ok_or_else(|| not_found(target, name))?)
            .clone();
            let current_rv = obj["metadata"]["resourceVersion"].clone();
            merge_patch(&mut obj, &patch);
            if patch.pointer("/metadata/resourceVersion").is_none() {
                obj["metadata"]["resourceVersion"] = current_rv;
            }
            s.update(target.rt, target.ns.as_deref(), Some(name), obj)
        })
        .map(|o| (*o).clone())
}

/// A `meta.k8s.io/v1` Table with name and age columns, for `kubectl get`'s server-side printing.
fn table(list: &Value) -> Value {
    let rows: Vec<Value> = list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|o| {
                    let name = o.pointer("/metadata/name").cloned().unwrap_or(Value::Null);
                    let created = o.pointer("/metadata/creationTimestamp").cloned().unwrap_or(Value::Null);
                    json!({
                        "cells": [name, created],
                        "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]},
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list.get("metadata").cloned().unwrap_or(json!({})),
        "columnDefinitions": [
            {"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0},
            {"name": "Created At", "type": "date", "format": "", "description": "Creation timestamp", "priority": 0},
        ],
        "rows": rows,
    })
}

// === watch ===

/// Parameters of one watch, fixed when it starts.
struct WatchReq {
    res: usize,
    ns: Option<String>,
    filter: Filter,
    bookmarks: bool,
    timeout: Duration,
}

impl WatchReq {
    fn in_scope(&self, key: &Key) -> bool {
        key.res == self.res && self.ns.as_ref().is_none_or(|n| *n == key.ns)
    }

    /// The event this watch reports for a committed change, if any: a modification that
    /// moves an object into (out of) the selector is reported as ADDED (DELETED).
    fn classify<'a>(&self, ev: &'a HistEvent) -> Option<(EventType, &'a Value)> {
        if !self.in_scope(&ev.key) {
            return None;
        }
        let now = self.filter.matches(&ev.object);
        let before = ev.prev.as_ref().is_some_and(|p| self.filter.matches(p));
        let etype = match (ev.etype, before, now) {
            (EventType::Added, _, true) => EventType::Added,
            (EventType::Modified, true, true) => EventType::Modified,
            (EventType::Modified, false, true) => EventType::Added,
            (EventType::Modified, true, false) => EventType::Deleted,
            (EventType::Deleted, _, true) => EventType::Deleted,
            _ => return None,
        };
        Some((etype, &ev.object))
    }
}

fn event_line(etype: &str, obj: &Value) -> Bytes {
    let mut line = format!("{{\"type\":\"{etype}\",\"object\":").into_bytes();
    let _ = serde_json::to_writer(&mut line, obj);
    line.extend_from_slice(b"}\n");
    line.into()
}

fn bookmark_line(rt: &ResourceType, rv: u64, initial_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": metadata}),
    )
}

fn error_event(message: &str) -> Bytes {
    event_line("ERROR", &status_object(410, "Expired", message, None))
}

fn stream_response(rx: mpsc::Receiver<Bytes>) -> Resp {
    let mut resp = Response::new(Body::Stream(rx));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Validates a watch request, takes its starting point under the store lock, and spawns the
/// task that feeds the stream.
fn start_watch(shared: &Arc<Shared>, target: &Target, q: &Query) -> Result<Resp, Error> {
    let filter = q.selectors()?;
    let send_initial = q.get("sendInitialEvents").map(|v| v == "true" || v == "1");
    let rv_match = q.value("resourceVersionMatch");
    if send_initial.is_some() && rv_match != Some("NotOlderThan") {
        return Err(Error::Invalid(
            "sendInitialEvents: Forbidden: sendInitialEvents is forbidden for watch unless resourceVersionMatch is set to NotOlderThan".into(),
        ));
    }
    if send_initial.is_none() && rv_match.is_some() {
        return Err(Error::Invalid("resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided".into()));
    }
    let bookmarks = q.flag("allowWatchBookmarks");
    if send_initial == Some(true) && !bookmarks {
        return Err(Error::Invalid("allowWatchBookmarks: Required value: allowWatchBookmarks must be true when sendInitialEvents is set".into()));
    }
    let timeout = q
        .u64("timeoutSeconds")?
        .map(Duration::from_secs)
        .unwrap_or(shared.options.default_watch_timeout);
    let rv_param = q.value("resourceVersion");
    let w = WatchReq {
        res: target.rt.index(),
        ns: target.ns.clone(),
        filter,
        bookmarks,
        timeout,
    };

    // Subscribe before reading the store so no cut or change after this point is missed.
    let cut = shared.faults.cut_rx();
    let changed = shared.changed.subscribe();
    let (tx, rx) = mpsc::channel(256);
    let store = shared.store();
    let current = store.rv();
    let synthetic = send_initial.unwrap_or(matches!(rv_param, None | Some("0")));
    let (start, initial) = if synthetic {
        let objs: Vec<Arc<Value>> = store
            .snapshot(target.rt, w.ns.as_deref(), current)?
            .into_iter()
            .map(|(_, o)| o)
            .filter(|o| w.filter.matches(o))
            .collect();
        (current, Some(objs))
    } else if let Some(rv) = rv_param.filter(|rv| *rv != "0") {
        let n: u64 = rv
            .parse()
            .map_err(|_| Error::BadRequest(format!("invalid resourceVersion {rv:?}")))?;
        if n < store.floor() {
            // Like the real server: HTTP 200, then an ERROR event with a 410 Status.
            let floor = store.floor();
            drop(store);
            let _ = tx.try_send(error_event(&format!(
                "too old resource version: {n} ({floor})"
            )));
            return Ok(stream_response(rx));
        }
        (n, None)
    } else {
        // `sendInitialEvents=false` without a resourceVersion: from now on, no synthetic events.
        (current, None)
    };
    drop(store);
    let initial_end = send_initial == Some(true);
    tokio::spawn(run_watch(
        shared.clone(),
        w,
        tx,
        start,
        initial,
        initial_end,
        cut,
        changed,
    ));
    Ok(stream_response(rx))
}

/// Counts open watches for [`crate::TestApiServer::open_watches`].
struct WatchGuard(Arc<Shared>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_watch(
    shared: Arc<Shared>,
    w: WatchReq,
    tx: mpsc::Sender<Bytes>,
    mut last_rv: u64,
    initial: Option<Vec<Arc<Value>>>,
    initial_end: bool,
    mut cut: tokio::sync::watch::Receiver<u64>,
    mut changed: tokio::sync::watch::Receiver<u64>,
) {
    shared.open_watches.fetch_add(1, Ordering::SeqCst);
    let _guard = WatchGuard(shared.clone());
    let rt = &resources::RESOURCES[w.res];
    let deadline = Instant::now() + w.timeout;
    let mut stall = shared.faults.stall_rx();
    for obj in initial.into_iter().flatten() {
        if tx.send(event_line("ADDED", &obj)).await.is_err() {
            return;
        }
    }
    if initial_end && tx.send(bookmark_line(rt, last_rv, true)).await.is_err() {
        return;
    }
    let mut tick = tokio::time::interval_at(
        Instant::now() + shared.options.bookmark_interval,
        shared.options.bookmark_interval,
    );
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        if *stall.borrow_and_update() {
            tokio::select! {
                _ = stall.wait_for(|s| !*s) => {}
                _ = cut.changed() => return,
                _ = tx.closed() => return,
            }
        }
        changed.borrow_and_update();
        let batch = {
            let store = shared.store();
            let batch = store.events_after(last_rv).map(|evs| {
                evs.filter_map(|ev| w.classify(ev).map(|(t, o)| event_line(t.as_str(), o)))
                    .collect::<Vec<_>>()
            });
            let (current, floor) = (store.rv(), store.floor());
            batch.map(|b| (b, current)).map_err(|_| (last_rv, floor))
        };
        match batch {
            Ok((lines, current)) => {
                for line in lines {
                    if tx.send(line).await.is_err() {
                        return;
                    }
                }
                last_rv = current;
            }
            Err((rv, floor)) => {
                let _ = tx
                    .send(error_event(&format!(
                        "too old resource version: {rv} ({floor})"
                    )))
                    .await;
                return;
            }
        }
        tokio::select! {
            biased;
            _ = cut.changed() => return,
            _ = tx.closed() => return,
            _ = tokio::time::sleep_until(deadline) => return,
            _ = changed.changed() => {}
            _ = stall.changed() => {}
            _ = tick.tick(), if w.bookmarks => {
                if tx.send(bookmark_line(rt, last_rv, false)).await.is_err() {
                    return;
                }
            }
        }
    }
}

// === control endpoints ===

/// `/_test/...`: fault switches for scripts.
///
/// `POST /_test/fault/cut`, `POST /_test/fault/fail?code=500[&count=N]`,
/// `POST /_test/fault/stall`, `POST /_test/fault/clear`, `POST /_test/fault/epoch`,
/// `POST /_test/fault/down?ms=2000` (listener down, then up on the same port),
/// `GET /_test/state`.
async fn control(shared: &Arc<Shared>, segs: &[&str], q: &Query) -> Resp {
    let faults = &shared.faults;
    let done = |extra: Value| {
        let mut v = json!({"ok": true, "resourceVersion": shared.store().rv().to_string()});
        if let (Some(v), Value::Object(e)) = (v.as_object_mut(), extra) {
            v.extend(e);
        }
        json_response(200, &v)
    };
    match segs {
        ["state"] => {
            let (rv, floor) = {
                let s = shared.store();
                (s.rv(), s.floor())
            };
            json_response(
                200,
                &json!({
                    "resourceVersion": rv.to_string(),
                    "oldestResourceVersion": floor.to_string(),
                    "openWatches": shared.open_watches.load(Ordering::SeqCst),
                    "stalled": faults.is_stalled(),
                }),
            )
        }
        ["fault", "cut"] => {
            faults.cut_watches();
            done(json!({}))
        }
        ["fault", "fail"] => {
            let code = q.u64("code").ok().flatten().unwrap_or(500) as u16;
            match q.u64("count").ok().flatten() {
                Some(n) => faults.fail_next(n as u32, code),
                None => faults.fail_all(code),
            }
            done(json!({}))
        }
        ["fault", "stall"] => {
            faults.stall();
            done(json!({}))
        }
        ["fault", "clear"] => {
            faults.clear();
            done(json!({}))
        }
        ["fault", "epoch"] => {
            shared.new_epoch();
            done(json!({}))
        }
        ["fault", "down"] => {
            let ms = q.u64("ms").ok().flatten().unwrap_or(1000);
            let shared = shared.clone();
            tokio::spawn(async move {
                // Let this response go out before the connection is closed.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let addr = shared.addr();
                shared.stop().await;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                if let Err(err) = shared.start_on(addr).await {
                    tracing::error!(%addr, %err, "test apiserver could not come back up");
                }
            });
            done(json!({"downForMs": ms}))
        }
        _ => json_response(
            404,
            &status_object(404, "NotFound", "unknown test control endpoint", None),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding_handles_escapes() {
        let q = Query::parse(Some("labelSelector=app%3Dweb%2Ctier%21%3Ddb&watch=1&x=a+b"));
        assert_eq!(q.get("labelSelector"), Some("app=web,tier!=db"));
        assert!(q.flag("watch"));
        assert_eq!(q.get("x"), Some("a b"));
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn continue_tokens_round_trip() {
        let key = Key {
            res: 0,
            ns: "ns".into(),
            name: "a-b".into(),
        };
        assert_eq!(
            decode_continue(&encode_continue(42, &key)),
            Some((42, "ns".into(), "a-b".into()))
        );
        assert_eq!(decode_continue("zz"), None);
    }

    #[test]
    fn routes_cover_namespaced_cluster_and_group_paths() {
        let r = route(&["api", "v1", "namespaces", "default", "services", "web"]).unwrap();
        assert_eq!(
            (r.rt.plural, r.ns.as_deref(), r.name.as_deref()),
            ("services", Some("default"), Some("web"))
        );
        let r = route(&["apis", "discovery.k8s.io", "v1", "endpointslices"]).unwrap();
        assert_eq!((r.rt.plural, r.ns, r.name), ("endpointslices", None, None));
        let r = route(&["api", "v1", "namespaces", "kube-system"]).unwrap();
        assert_eq!(
            (r.rt.plural, r.name.as_deref()),
            ("namespaces", Some("kube-system"))
        );
        let r = route(&["api", "v1", "nodes", "n1"]).unwrap();
        assert_eq!(r.name.as_deref(), Some("n1"));
        assert!(route(&["api", "v1", "namespaces", "x", "nodes"]).is_none());
        assert!(route(&["api", "v1", "services", "web"]).is_none());
    }
}
