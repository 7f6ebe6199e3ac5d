//! The resource types this server knows, and the discovery documents that describe them.

use serde_json::{Value, json};

/// One served resource type: enough to route a path, fill `kind`/`apiVersion` and answer
/// discovery.
#[derive(Debug, PartialEq, Eq)]
pub struct ResourceType {
    /// API group; empty for the core (`/api/v1`) group.
    pub group: &'static str,
    /// API version inside the group.
    pub version: &'static str,
    /// Plural lower-case name used in URL paths (`services`).
    pub plural: &'static str,
    /// Singular lower-case name (`service`), accepted by kubectl.
    pub singular: &'static str,
    /// Object kind (`Service`).
    pub kind: &'static str,
    /// Kind of the list wrapper (`ServiceList`).
    pub list_kind: &'static str,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// kubectl short names (`svc`).
    pub short_names: &'static [&'static str],
}

impl ResourceType {
    /// `apiVersion` as written in objects: `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Position in [`RESOURCES`]; used as the first part of store keys.
    pub(crate) fn index(&'static self) -> usize {
        RESOURCES
            .iter()
            .position(|r| std::ptr::eq(r, self))
            .expect("resource types come from RESOURCES")
    }
}

/// Every resource type served, core group first.
pub static RESOURCES: [ResourceType; 5] = [
    ResourceType {
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        list_kind: "ServiceList",
        namespaced: true,
        short_names: &["svc"],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        list_kind: "PodList",
        namespaced: true,
        short_names: &["po"],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        list_kind: "NodeList",
        namespaced: false,
        short_names: &["no"],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        list_kind: "NamespaceList",
        namespaced: false,
        short_names: &["ns"],
    },
    ResourceType {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        list_kind: "EndpointSliceList",
        namespaced: true,
        short_names: &[],
    },
];

/// Finds a resource type by kind, plural, singular or short name (case-insensitive).
pub fn resolve(name: &str) -> Option<&'static ResourceType> {
    RESOURCES.iter().find(|r| {
        r.kind.eq_ignore_ascii_case(name)
            || r.plural.eq_ignore_ascii_case(name)
            || r.singular.eq_ignore_ascii_case(name)
            || r.short_names.iter().any(|s| s.eq_ignore_ascii_case(name))
    })
}

/// Finds the resource type served at `group`/`version` under the path segment `plural`.
pub(crate) fn by_path(group: &str, version: &str, plural: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Finds the resource type of an object from its `apiVersion` and `kind`.
pub(crate) fn by_object(obj: &Value) -> Option<&'static ResourceType> {
    let kind = obj.get("kind")?.as_str()?;
    let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    RESOURCES
        .iter()
        .find(|r| r.kind == kind && (api_version.is_empty() || r.api_version() == api_version))
}

// === discovery documents ===

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "get",
    "list",
    "patch",
    "update",
    "watch",
    "deletecollection",
];

/// `/api`: the legacy core group versions.
pub(crate) fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn group_names() -> Vec<&'static str> {
    let mut groups: Vec<&str> = RESOURCES
        .iter()
        .map(|r| r.group)
        .filter(|g| !g.is_empty())
        .collect();
    groups.dedup();
    groups
}

fn group_doc(group: &str) -> Value {
    let gv = json!({"groupVersion": format!("{group}/v1"), "version": "v1"});
    json!({"name": group, "versions": [gv.clone()], "preferredVersion": gv})
}

/// `/apis`: the named groups.
pub(crate) fn api_group_list() -> Value {
    let groups: Vec<Value> = group_names().into_iter().map(group_doc).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/{group}`: one named group, if served.
pub(crate) fn api_group(group: &str) -> Option<Value> {
    group_names().contains(&group).then(|| {
        let mut doc = group_doc(group);
        doc["kind"] = json!("APIGroup");
        doc["apiVersion"] = json!("v1");
        doc
    })
}

/// `/api/v1` or `/apis/{group}/{version}`: the resources of one group version, if served.
pub(crate) fn api_resource_list(group: &str, version: &str) -> Option<Value> {
    let resources: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .map(|r| {
            json!({
                "name": r.plural,
                "singularName": r.singular,
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": VERBS,
                "shortNames": r.short_names,
            })
        })
        .collect();
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

/// `/version`.
pub(crate) fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.0-waypost-testapi",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.23",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_kinds_and_plurals_resolve() {
        assert_eq!(resolve("svc").unwrap().kind, "Service");
        assert_eq!(resolve("EndpointSlice").unwrap().plural, "endpointslices");
        assert_eq!(resolve("nodes").unwrap().index(), 2);
        assert!(resolve("configmaps").is_none());
    }

    #[test]
    fn discovery_lists_the_discovery_group() {
        assert!(api_group("discovery.k8s.io").is_some());
        let list = api_resource_list("", "v1").unwrap();
        assert_eq!(list["resources"].as_array().unwrap().len(), 4);
    }
}
