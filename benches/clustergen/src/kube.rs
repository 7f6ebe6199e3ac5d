//! Kubernetes objects for a generated cluster, printed as `kubectl get … -A -o yaml` prints them.

use std::io::Write;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::model::{Cluster, Endpoint, Kind, LonePod, Node, Service};

/// Creation time stamped on every object (fixed so output depends on the seed alone).
const CREATED: &str = "2026-01-01T00:00:00Z";
/// EndpointSlice controller's limit of endpoints per slice.
const MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// Hands out increasing `metadata.resourceVersion` values, as etcd revisions would.
pub(crate) struct Versions {
    /// The last version given out.
    last: u64,
}

impl Versions {
    /// Starts at an etcd-ish revision.
    pub(crate) fn new() -> Self {
        Self { last: 1000 }
    }

    /// The next version, as the string the API server returns.
    pub(crate) fn next(&mut self) -> String {
        self.last += 1;
        self.last.to_string()
    }
}

/// Common metadata; `labels` may be `Value::Null` for none.
fn metadata(
    name: &str,
    namespace: Option<&str>,
    uid: &str,
    labels: Value,
    rv: &mut Versions,
) -> Value {
    let mut m = json!({
        "creationTimestamp": CREATED,
        "name": name,
        "resourceVersion": rv.next(),
        "uid": uid,
    });
    if let Some(ns) = namespace {
        m["namespace"] = json!(ns);
    }
    if !labels.is_null() {
        m["labels"] = labels;
    }
    m
}

/// The Service object.
pub(crate) fn service(s: &Service, rv: &mut Versions) -> Value {
    let labels = json!({ "app": s.name });
    let ports: Vec<Value> = s
        .ports
        .iter()
        .map(|p| {
            let mut v = json!({ "port": p.port, "protocol": p.protocol, "targetPort": p.target });
            if !p.name.is_empty() {
                v["name"] = json!(p.name);
            }
            v
        })
        .collect();
    let spec = match &s.kind {
        Kind::ClusterIp { v4, v6 } => {
            let mut spec = json!({
                "clusterIP": v4.to_string(),
                "clusterIPs": [v4.to_string()],
                "internalTrafficPolicy": "Cluster",
                "ipFamilies": ["IPv4"],
                "ipFamilyPolicy": "SingleStack",
                "ports": ports,
                "selector": { "app": s.name },
                "sessionAffinity": "None",
                "type": "ClusterIP",
            });
            if let Some(v6) = v6 {
                spec["clusterIPs"] = json!([v4.to_string(), v6.to_string()]);
                spec["ipFamilies"] = json!(["IPv4", "IPv6"]);
                spec["ipFamilyPolicy"] = json!("PreferDualStack");
            }
            spec
        }
        Kind::Headless => json!({
            "clusterIP": "None",
            "clusterIPs": ["None"],
            "internalTrafficPolicy": "Cluster",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "ports": ports,
            "selector": { "app": s.name },
            "sessionAffinity": "None",
            "type": "ClusterIP",
        }),
        Kind::ExternalName(target) => json!({
            "externalName": target,
            "sessionAffinity": "None",
            "type": "ExternalName",
        }),
    };
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(&s.name, Some(&s.namespace), &s.uid, labels, rv),
        "spec": spec,
        "status": { "loadBalancer": {} },
    })
}

/// The EndpointSlices of a service (one per 100 endpoints); none for ExternalName.
pub(crate) fn endpoint_slices(s: &Service, nodes: &[Node], rv: &mut Versions) -> Vec<Value> {
    if matches!(s.kind, Kind::ExternalName(_)) {
        return Vec::new();
    }
    let ports: Vec<Value> = s
        .ports
        .iter()
        .map(|p| json!({ "name": p.name, "port": p.target, "protocol": p.protocol }))
        .collect();
    let chunks: Vec<&[Endpoint]> = if s.endpoints.is_empty() {
        vec![&[]]
    } else {
        s.endpoints.chunks(MAX_ENDPOINTS_PER_SLICE).collect()
    };
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, eps)| {
            let name = if i == 0 {
                format!("{}-{}", s.name, s.slice_suffix)
            } else {
                format!("{}-{}{i}", s.name, &s.slice_suffix[..4])
            };
            let endpoints: Vec<Value> = eps
                .iter()
                .map(|e| {
                    let mut v = json!({
                        "addresses": [e.ip.to_string()],
                        "conditions": { "ready": e.ready, "serving": e.ready, "terminating": false },
                        "nodeName": nodes[e.node].name,
                        "targetRef": {
                            "kind": "Pod",
                            "name": e.pod,
                            "namespace": s.namespace,
                            "uid": e.pod_uid,
                        },
                    });
                    if let Some(h) = &e.hostname {
                        v["hostname"] = json!(h);
                    }
                    v
                })
                .collect();
            let labels = json!({
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": s.name,
            });
            // A uid derived from the service's keeps the output a function of the seed.
            let uid = format!("{}{:04x}", &s.uid[..32], i);
            let mut meta = metadata(&name, Some(&s.namespace), &uid, labels, rv);
            meta["generateName"] = json!(format!("{}-", s.name));
            meta["ownerReferences"] = json!([{
                "apiVersion": "v1",
                "blockOwnerDeletion": true,
                "controller": true,
                "kind": "Service",
                "name": s.name,
                "uid": s.uid,
            }]);
            json!({
                "addressType": "IPv4",
                "apiVersion": "discovery.k8s.io/v1",
                "endpoints": endpoints,
                "kind": "EndpointSlice",
                "metadata": meta,
                "ports": ports,
            })
        })
        .collect()
}

/// A running pod; `ready` sets its Ready condition.
#[allow(clippy::too_many_arguments)]
fn pod(
    name: &str,
    namespace: &str,
    uid: &str,
    app: &str,
    ip: std::net::Ipv4Addr,
    node: &Node,
    ready: bool,
    hostname: Option<(&str, &str)>,
    container_ports: Vec<Value>,
    rv: &mut Versions,
) -> Value {
    let ready = if ready { "True" } else { "False" };
    let mut spec = json!({
        "containers": [{
            "image": "registry.k8s.io/pause:3.10",
            "name": "app",
            "ports": container_ports,
        }],
        "nodeName": node.name,
        "restartPolicy": "Always",
    });
    if let Some((h, sub)) = hostname {
        spec["hostname"] = json!(h);
        spec["subdomain"] = json!(sub);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata(name, Some(namespace), uid, json!({ "app": app }), rv),
        "spec": spec,
        "status": {
            "conditions": [
                { "lastTransitionTime": CREATED, "status": ready, "type": "Ready" },
                { "lastTransitionTime": CREATED, "status": ready, "type": "ContainersReady" },
            ],
            "hostIP": node.ip.to_string(),
            "hostIPs": [{ "ip": node.ip.to_string() }],
            "phase": "Running",
            "podIP": ip.to_string(),
            "podIPs": [{ "ip": ip.to_string() }],
            "startTime": CREATED,
        },
    })
}

/// The pod behind one endpoint of `s`.
pub(crate) fn endpoint_pod(s: &Service, e: &Endpoint, nodes: &[Node], rv: &mut Versions) -> Value {
    let ports = s
        .ports
        .iter()
        .map(|p| {
            let mut v = json!({ "containerPort": p.target, "protocol": p.protocol });
            if !p.name.is_empty() {
                v["name"] = json!(p.name);
            }
            v
        })
        .collect();
    let hostname = e.hostname.as_deref().map(|h| (h, s.name.as_str()));
    pod(
        &e.pod,
        &s.namespace,
        &e.pod_uid,
        &s.name,
        e.ip,
        &nodes[e.node],
        e.ready,
        hostname,
        ports,
        rv,
    )
}

/// A pod outside any service.
pub(crate) fn lone_pod(p: &LonePod, nodes: &[Node], rv: &mut Versions) -> Value {
    pod(
        &p.name,
        &p.namespace,
        &p.uid,
        "job",
        p.ip,
        &nodes[p.node],
        true,
        None,
        Vec::new(),
        rv,
    )
}

/// A ready node.
pub(crate) fn node(n: &Node, rv: &mut Versions) -> Value {
    let labels = json!({
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/hostname": n.name,
        "kubernetes.io/os": "linux",
    });
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": metadata(&n.name, None, &n.uid, labels, rv),
        "spec": {},
        "status": {
            "addresses": [
                { "address": n.ip.to_string(), "type": "InternalIP" },
                { "address": n.name, "type": "Hostname" },
            ],
            "conditions": [{
                "lastHeartbeatTime": CREATED,
                "lastTransitionTime": CREATED,
                "message": "kubelet is posting ready status",
                "reason": "KubeletReady",
                "status": "True",
                "type": "Ready",
            }],
            "nodeInfo": { "architecture": "amd64", "kubeletVersion": "v1.34.0", "operatingSystem": "linux" },
        },
    })
}

/// Every object of the cluster, in the order kubectl lists `svc,endpointslices,pods,nodes`.
pub(crate) fn objects(c: &Cluster, rv: &mut Versions) -> Vec<Value> {
    objects_indexed(c, rv).0
}

/// Like [`objects`], also telling where each service's EndpointSlices sit in the list (for churn).
pub(crate) fn objects_indexed(
    c: &Cluster,
    rv: &mut Versions,
) -> (Vec<Value>, Vec<std::ops::Range<usize>>) {
    let mut out: Vec<Value> = c.services.iter().map(|s| service(s, rv)).collect();
    let mut slices = Vec::with_capacity(c.services.len());
    for s in &c.services {
        let start = out.len();
        out.extend(endpoint_slices(s, &c.nodes, rv));
        slices.push(start..out.len());
    }
    for s in &c.services {
        for e in &s.endpoints {
            out.push(endpoint_pod(s, e, &c.nodes, rv));
        }
    }
    out.extend(c.lone_pods.iter().map(|p| lone_pod(p, &c.nodes, rv)));
    out.extend(c.nodes.iter().map(|n| node(n, rv)));
    (out, slices)
}

/// One object as a `kind: List` item: `- ` before the first key, the rest indented two spaces.
pub(crate) fn list_item(v: &Value) -> Result<String> {
    let m = v
        .as_object()
        .context("a Kubernetes object must be a mapping")?;
    let mut out = String::with_capacity(2048);
    out.push_str("- ");
    crate::yaml::map(m, 2, true, &mut out);
    Ok(out)
}

/// Writes a `kind: List` whose items are the given pre-rendered `list_item`s.
pub(crate) fn write_list<'a>(
    w: &mut impl Write,
    items: impl IntoIterator<Item = &'a str>,
) -> Result<()> {
    w.write_all(b"apiVersion: v1\nitems:\n")?;
    for item in items {
        w.write_all(item.as_bytes())?;
    }
    w.write_all(b"kind: List\nmetadata:\n  resourceVersion: \"\"\n")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_items_parse_back_as_a_kubectl_list() {
        let v = json!({ "apiVersion": "v1", "kind": "Service", "spec": { "clusterIP": "None", "ports": [{ "port": 80 }] } });
        let item = list_item(&v).unwrap();
        let mut buf = Vec::new();
        write_list(&mut buf, [item.as_str(), item.as_str()]).unwrap();
        let back: Value = serde_yaml::from_slice(&buf).unwrap();
        assert_eq!(back["kind"], "List");
        assert_eq!(back["items"][1]["spec"]["clusterIP"], "None");
        assert_eq!(back["items"][0]["spec"]["ports"][0]["port"], 80);
    }
}
