//! Converts Kubernetes objects as JSON (what the API server and `kubectl -o yaml|json` give) into the typed model.
//!
//! Every error names the object (`Kind namespace/name`) and the field path, so a log line says
//! exactly what to fix.

use std::net::IpAddr;
use std::sync::Arc;

use serde_json::Value;

use crate::model::*;

/// Why one object could not be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {object}: field {field}: {reason}")]
pub struct ConvertError {
    /// The object's kind, e.g. `Service`.
    pub kind: String,
    /// `namespace/name` (or `?` when the name itself is missing).
    pub object: String,
    /// The field path, e.g. `spec.clusterIPs[1]`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ConvertError {
    /// True when the object had no usable name, so it cannot even be identified.
    pub fn is_unnamed(&self) -> bool {
        self.field == "metadata.name"
    }
}

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label that holds a Node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
const LEGACY_ZONE_LABEL: &str = "failure-domain.beta.kubernetes.io/zone";

/// The kind named by an object's `kind` field, if waypost reads that kind.
pub fn kind_of(v: &Value) -> Option<Kind> {
    match v.get("kind")?.as_str()? {
        "Service" => Some(Kind::Service),
        "EndpointSlice" => Some(Kind::EndpointSlice),
        "Pod" => Some(Kind::Pod),
        "Node" => Some(Kind::Node),
        _ => None,
    }
}

/// Reads the kind and key of an object without converting it, so a bad object can still be
/// identified (and its last good version kept).
pub fn identify(kind: Kind, v: &Value) -> Option<ObjectKey> {
    let md = v.get("metadata")?;
    let name = md.get("name")?.as_str()?;
    let ns = if kind == Kind::Node { "" } else { md.get("namespace").and_then(Value::as_str).unwrap_or("default") };
    Some(ObjectKey::new(ns, name))
}

/// Converts one object of a known kind.
pub fn convert(kind: Kind, v: &Value, interner: &mut Interner) -> Result<Object, ConvertError> {
    let mut cx = Cx::new(kind, v, interner)?;
    Ok(match kind {
        Kind::Service => Object::Service(Arc::new(cx.service()?)),
        Kind::EndpointSlice => Object::EndpointSlice(Arc::new(cx.slice()?)),
        Kind::Pod => Object::Pod(Arc::new(cx.pod()?)),
        Kind::Node => Object::Node(Arc::new(cx.node()?)),
    })
}

/// Conversion context: the object being read, for error messages, and the interner.
struct Cx<'a> {
    /// Which kind, for errors.
    kind: Kind,
    /// The whole object.
    v: &'a Value,
    /// `namespace/name`, for errors and keys.
    key: ObjectKey,
    /// Shares repeated strings.
    interner: &'a mut Interner,
}

impl<'a> Cx<'a> {
    fn new(kind: Kind, v: &'a Value, interner: &'a mut Interner) -> Result<Self, ConvertError> {
        let err = |field: &str, reason: &str| ConvertError {
            kind: kind.as_str().into(),
            object: "?".into(),
            field: field.into(),
            reason: reason.into(),
        };
        let md = v.get("metadata").ok_or_else(|| err("metadata.name", "missing"))?;
        let name = md
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| err("metadata.name", "missing or not a string"))?;
        let ns = match (kind, md.get("namespace")) {
            (Kind::Node, _) | (_, None) => if kind == Kind::Node { "" } else { "default" },
            (_, Some(Value::String(s))) if !s.is_empty() => s.as_str(),
            (_, Some(_)) => return Err(err("metadata.namespace", "not a non-empty string")),
        };
        let key = ObjectKey { namespace: interner.intern(ns), name: Arc::from(name) };
        Ok(Self { kind, v, key, interner })
    }

    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> ConvertError {
        ConvertError {
            kind: self.kind.as_str().into(),
            object: if self.kind == Kind::Node { self.key.name.to_string() } else { self.key.to_string() },
            field: field.into(),
            reason: reason.into(),
        }
    }

    // === field readers ===

    fn opt_str<'v>(&self, v: Option<&'v Value>, field: &str) -> Result<Option<&'v str>, ConvertError> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(self.err(field, format!("expected a string, found {other}"))),
        }
    }

    fn opt_bool(&self, v: Option<&Value>, field: &str) -> Result<Option<bool>, ConvertError> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.err(field, format!("expected true or false, found {other}"))),
        }
    }

    fn opt_port(&self, v: Option<&Value>, field: &str) -> Result<Option<u16>, ConvertError> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(p) if (1..=65535).contains(&p) => Ok(Some(p as u16)),
                _ => Err(self.err(field, format!("port {n} is out of range 1-65535"))),
            },
            Some(other) => Err(self.err(field, format!("expected a port number, found {other}"))),
        }
    }

    fn array<'v>(&self, v: Option<&'v Value>, field: &str) -> Result<&'v [Value], ConvertError> {
        match v {
            None | Some(Value::Null) => Ok(&[]),
            Some(Value::Array(a)) => Ok(a.as_slice()),
            Some(other) => Err(self.err(field, format!("expected a list, found {other}"))),
        }
    }

    fn ip(&self, v: &Value, field: &str) -> Result<IpAddr, ConvertError> {
        let s = v.as_str().ok_or_else(|| self.err(field, format!("expected an IP address string, found {v}")))?;
        s.parse().map_err(|_| self.err(field, format!("invalid IP address {s:?}")))
    }

    fn ips(&self, v: Option<&Value>, field: &str) -> Result<Vec<IpAddr>, ConvertError> {
        self.array(v, field)?.iter().enumerate().map(|(i, x)| self.ip(x, &format!("{field}[{i}]"))).collect()
    }

    fn protocol(&self, v: Option<&Value>, field: &str) -> Result<Protocol, ConvertError> {
        match self.opt_str(v, field)? {
            None | Some("TCP") => Ok(Protocol::Tcp),
            Some("UDP") => Ok(Protocol::Udp),
            Some("SCTP") => Ok(Protocol::Sctp),
            Some(other) => Err(self.err(field, format!("unknown protocol {other:?} (TCP, UDP or SCTP)"))),
        }
    }

    fn opt_name(&mut self, v: Option<&Value>, field: &str) -> Result<Option<Name>, ConvertError> {
        Ok(self.opt_str(v, field)?.map(Arc::from))
    }

    fn opt_interned(&mut self, v: Option<&Value>, field: &str) -> Result<Option<Name>, ConvertError> {
        let s = self.opt_str(v, field)?;
        Ok(s.map(|s| self.interner.intern(s)))
    }

    fn label(&self, name: &str) -> Option<&'a str> {
        self.v.get("metadata")?.get("labels")?.get(name)?.as_str()
    }

    // === kinds ===

    fn service(&mut self) -> Result<Service, ConvertError> {
        let v = self.v;
        let spec = v.get("spec").unwrap_or(&Value::Null);
        let service_type = match self.opt_str(spec.get("type"), "spec.type")? {
            None | Some("ClusterIP") => ServiceType::ClusterIp,
            Some("NodePort") => ServiceType::NodePort,
            Some("LoadBalancer") => ServiceType::LoadBalancer,
            Some("ExternalName") => ServiceType::ExternalName,
            Some(other) => return Err(self.err("spec.type", format!("unknown service type {other:?}"))),
        };
        let cluster_ip = self.opt_str(spec.get("clusterIP"), "spec.clusterIP")?;
        let mut headless = cluster_ip == Some("None");
        let mut cluster_ips = Vec::new();
        let listed = self.array(spec.get("clusterIPs"), "spec.clusterIPs")?;
        if !listed.is_empty() {
            for (i, x) in listed.iter().enumerate() {
                if x.as_str() == Some("None") {
                    headless = true;
                    continue;
                }
                cluster_ips.push(self.ip(x, &format!("spec.clusterIPs[{i}]"))?);
            }
        } else if let Some(ip) = cluster_ip.filter(|s| *s != "None") {
            cluster_ips.push(self.ip(&Value::String(ip.into()), "spec.clusterIP")?);
        }
        if service_type == ServiceType::ExternalName {
            cluster_ips.clear();
            headless = false;
        }
        let mut ports = Vec::new();
        for (i, p) in self.array(spec.get("ports"), "spec.ports")?.iter().enumerate() {
            let f = |s: &str| format!("spec.ports[{i}].{s}");
            let name = self.opt_name(p.get("name"), &f("name"))?;
            let protocol = self.protocol(p.get("protocol"), &f("protocol"))?;
            let port = self.opt_port(p.get("port"), &f("port"))?.ok_or_else(|| self.err(f("port"), "missing"))?;
            let target_port = match p.get("targetPort") {
                None | Some(Value::Null) => TargetPort::Number(port),
                Some(Value::String(s)) => match s.parse::<u16>() {
                    Ok(n) if n > 0 => TargetPort::Number(n),
                    _ if s.is_empty() => TargetPort::Number(port),
                    _ => TargetPort::Name(Arc::from(s.as_str())),
                },
                Some(x) => TargetPort::Number(self.opt_port(Some(x), &f("targetPort"))?.unwrap_or(port)),
            };
            let node_port = self.opt_port(p.get("nodePort"), &f("nodePort"))?;
            ports.push(ServicePort { name, protocol, port, target_port, node_port });
        }
        let external_name = self
            .opt_str(spec.get("externalName"), "spec.externalName")?
            .map(|s| Arc::from(s.trim_end_matches('.').to_ascii_lowercase()));
        if service_type == ServiceType::ExternalName && external_name.is_none() {
            return Err(self.err("spec.externalName", "missing for an ExternalName service"));
        }
        let policy = |cx: &Self, field: &str| -> Result<TrafficPolicy, ConvertError> {
            match cx.opt_str(spec.get(field), &format!("spec.{field}"))? {
                None | Some("Cluster") | Some("Global") => Ok(TrafficPolicy::Cluster),
                Some("Local") => Ok(TrafficPolicy::Local),
                Some(other) => Err(cx.err(format!("spec.{field}"), format!("unknown policy {other:?}"))),
            }
        };
        let internal_traffic_policy = policy(self, "internalTrafficPolicy")?;
        let external_traffic_policy = policy(self, "externalTrafficPolicy")?;
        let session_affinity = match self.opt_str(spec.get("sessionAffinity"), "spec.sessionAffinity")? {
            None | Some("None") => SessionAffinity::None,
            Some("ClientIP") => {
                let t = spec.pointer("/sessionAffinityConfig/clientIP/timeoutSeconds");
                let timeout_seconds = match t {
                    None | Some(Value::Null) => 10800,
                    Some(x) => match x.as_u64() {
                        Some(n) if (1..=86400).contains(&n) => n as u32,
                        _ => {
                            return Err(self.err(
                                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                                format!("{x} is not in 1-86400"),
                            ));
                        }
                    },
                };
                SessionAffinity::ClientIp { timeout_seconds }
            }
            Some(other) => return Err(self.err("spec.sessionAffinity", format!("unknown affinity {other:?}"))),
        };
        let traffic_distribution = self.opt_interned(spec.get("trafficDistribution"), "spec.trafficDistribution")?;
        let mut load_balancer_ingress = Vec::new();
        let ingress = v.pointer("/status/loadBalancer/ingress");
        for (i, x) in self.array(ingress, "status.loadBalancer.ingress")?.iter().enumerate() {
            if let Some(ip) = x.get("ip") {
                load_balancer_ingress.push(self.ip(ip, &format!("status.loadBalancer.ingress[{i}].ip"))?);
            }
        }
        let external_ips = self.ips(spec.get("externalIPs"), "spec.externalIPs")?;
        let mut load_balancer_source_ranges = Vec::new();
        let ranges = spec.get("loadBalancerSourceRanges");
        for (i, x) in self.array(ranges, "spec.loadBalancerSourceRanges")?.iter().enumerate() {
            let field = format!("spec.loadBalancerSourceRanges[{i}]");
            let s = x.as_str().ok_or_else(|| self.err(&field, "expected a CIDR string"))?;
            load_balancer_source_ranges.push(parse_prefix(s).ok_or_else(|| self.err(&field, format!("invalid CIDR {s:?}")))?);
        }
        let health_check_node_port = self.opt_port(spec.get("healthCheckNodePort"), "spec.healthCheckNodePort")?;
        let publish_not_ready_addresses =
            self.opt_bool(spec.get("publishNotReadyAddresses"), "spec.publishNotReadyAddresses")?.unwrap_or(false);
        Ok(Service {
            key: self.key.clone(),
            service_type,
            cluster_ips,
            headless,
            ports,
            external_name,
            publish_not_ready_addresses,
            internal_traffic_policy,
            external_traffic_policy,
            session_affinity,
            traffic_distribution,
            load_balancer_ingress,
            external_ips,
            load_balancer_source_ranges,
            health_check_node_port,
        })
    }

    fn slice(&mut self) -> Result<EndpointSlice, ConvertError> {
        let v = self.v;
        let service_name = self
            .label(SERVICE_NAME_LABEL)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| self.err(format!("metadata.labels[{SERVICE_NAME_LABEL}]"), "missing"))?;
        let service_name = Arc::from(service_name);
        let address_type = match self.opt_str(v.get("addressType"), "addressType")? {
            Some("IPv4") => AddressType::Ipv4,
            Some("IPv6") => AddressType::Ipv6,
            Some("FQDN") => AddressType::Fqdn,
            None => return Err(self.err("addressType", "missing")),
            Some(other) => return Err(self.err("addressType", format!("unknown address type {other:?}"))),
        };
        let mut endpoints = Vec::new();
        for (i, e) in self.array(v.get("endpoints"), "endpoints")?.iter().enumerate() {
            let f = |s: &str| format!("endpoints[{i}].{s}");
            let addresses = if address_type == AddressType::Fqdn {
                Vec::new()
            } else {
                let a = self.ips(e.get("addresses"), &f("addresses"))?;
                for (j, ip) in a.iter().enumerate() {
                    if ip.is_ipv4() != (address_type == AddressType::Ipv4) {
                        return Err(self.err(f(&format!("addresses[{j}]")), format!("{ip} does not match addressType")));
                    }
                }
                a
            };
            let cond = e.get("conditions").unwrap_or(&Value::Null);
            let ready = self.opt_bool(cond.get("ready"), &f("conditions.ready"))?.unwrap_or(true);
            let serving = self.opt_bool(cond.get("serving"), &f("conditions.serving"))?.unwrap_or(ready);
            let terminating = self.opt_bool(cond.get("terminating"), &f("conditions.terminating"))?.unwrap_or(false);
            let hostname = self.opt_name(e.get("hostname"), &f("hostname"))?;
            let node_name = self.opt_interned(e.get("nodeName"), &f("nodeName"))?;
            let zone = self.opt_interned(e.get("zone"), &f("zone"))?;
            let hints = e.get("hints").unwrap_or(&Value::Null);
            let mut hint = |list: &str| -> Result<Box<[Name]>, ConvertError> {
                let field = f(&format!("hints.{list}"));
                let mut out = Vec::new();
                for (j, h) in self.array(hints.get(list), &field)?.iter().enumerate() {
                    let field = format!("{field}[{j}].name");
                    let name = self.opt_str(h.get("name"), &field)?.ok_or_else(|| self.err(&field, "missing"))?;
                    out.push(self.interner.intern(name));
                }
                Ok(out.into_boxed_slice())
            };
            let hint_zones = hint("forZones")?;
            let hint_nodes = hint("forNodes")?;
            let target_ref = match e.get("targetRef") {
                None | Some(Value::Null) => None,
                Some(t) => {
                    let kind = self.opt_interned(t.get("kind"), &f("targetRef.kind"))?.unwrap_or_else(|| Arc::from(""));
                    let namespace = self.opt_interned(t.get("namespace"), &f("targetRef.namespace"))?;
                    let name = self.opt_name(t.get("name"), &f("targetRef.name"))?;
                    name.map(|name| TargetRef { kind, namespace, name })
                }
            };
            endpoints.push(Endpoint {
                addresses: addresses.into_boxed_slice(),
                ready,
                serving,
                terminating,
                hostname,
                node_name,
                zone,
                hint_zones,
                hint_nodes,
                target_ref,
            });
        }
        let mut ports = Vec::new();
        for (i, p) in self.array(v.get("ports"), "ports")?.iter().enumerate() {
            let f = |s: &str| format!("ports[{i}].{s}");
            let name = self.opt_name(p.get("name"), &f("name"))?;
            let protocol = self.protocol(p.get("protocol"), &f("protocol"))?;
            let port = self.opt_port(p.get("port"), &f("port"))?;
            ports.push(EndpointPort { name, protocol, port });
        }
        Ok(EndpointSlice { key: self.key.clone(), service_name, address_type, endpoints, ports })
    }

    fn pod(&mut self) -> Result<Pod, ConvertError> {
        let v = self.v;
        let spec = v.get("spec").unwrap_or(&Value::Null);
        let status = v.get("status").unwrap_or(&Value::Null);
        let mut ips = Vec::new();
        for (i, x) in self.array(status.get("podIPs"), "status.podIPs")?.iter().enumerate() {
            let ip = x.get("ip").ok_or_else(|| self.err(format!("status.podIPs[{i}].ip"), "missing"))?;
            ips.push(self.ip(ip, &format!("status.podIPs[{i}].ip"))?);
        }
        if ips.is_empty()
            && let Some(ip) = self.opt_str(status.get("podIP"), "status.podIP")? {
                ips.push(self.ip(&Value::String(ip.into()), "status.podIP")?);
            }
        let phase = match self.opt_str(status.get("phase"), "status.phase")? {
            None | Some("Pending") => PodPhase::Pending,
            Some("Running") => PodPhase::Running,
            Some("Succeeded") => PodPhase::Succeeded,
            Some("Failed") => PodPhase::Failed,
            Some(_) => PodPhase::Unknown,
        };
        Ok(Pod {
            key: self.key.clone(),
            ips: ips.into_boxed_slice(),
            hostname: self.opt_name(spec.get("hostname"), "spec.hostname")?,
            subdomain: self.opt_interned(spec.get("subdomain"), "spec.subdomain")?,
            node_name: self.opt_interned(spec.get("nodeName"), "spec.nodeName")?,
            host_network: self.opt_bool(spec.get("hostNetwork"), "spec.hostNetwork")?.unwrap_or(false),
            phase,
        })
    }

    fn node(&mut self) -> Result<Node, ConvertError> {
        let v = self.v;
        let zone = self.label(ZONE_LABEL).or_else(|| self.label(LEGACY_ZONE_LABEL)).map(|z| self.interner.intern(z));
        let mut addresses = Vec::new();
        let list = v.pointer("/status/addresses");
        for (i, a) in self.array(list, "status.addresses")?.iter().enumerate() {
            let kind = match self.opt_str(a.get("type"), &format!("status.addresses[{i}].type"))? {
                Some("InternalIP") => NodeAddressKind::InternalIp,
                Some("ExternalIP") => NodeAddressKind::ExternalIp,
                Some(other) => NodeAddressKind::Other(self.interner.intern(other)),
                None => continue,
            };
            let Some(addr) = a.get("address").and_then(Value::as_str) else { continue };
            match addr.parse::<IpAddr>() {
                Ok(ip) => addresses.push((kind, ip)),
                Err(_) if matches!(kind, NodeAddressKind::Other(_)) => {}
                Err(_) => return Err(self.err(format!("status.addresses[{i}].address"), format!("invalid IP address {addr:?}"))),
            }
        }
        Ok(Node { name: self.key.name.clone(), zone, addresses })
    }
}

/// Parses `10.0.0.0/8` or `fd00::/64`.
pub fn parse_prefix(s: &str) -> Option<IpPrefix> {
    let (a, l) = s.split_once('/')?;
    let addr: IpAddr = a.parse().ok()?;
    let len: u8 = l.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some(IpPrefix { addr, len })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conv(kind: Kind, v: Value) -> Result<Object, ConvertError> {
        convert(kind, &v, &mut Interner::default())
    }

    #[test]
    fn dual_stack_service_keeps_both_cluster_ips_and_named_target_ports() {
        let o = conv(
            Kind::Service,
            json!({"metadata":{"name":"web","namespace":"shop"},
                   "spec":{"clusterIP":"10.96.0.10","clusterIPs":["10.96.0.10","fd00::10"],
                           "ports":[{"name":"http","port":80,"targetPort":"web"},{"port":53,"protocol":"UDP"}],
                           "sessionAffinity":"ClientIP"}}),
        )
        .unwrap();
        let Object::Service(s) = o else { panic!() };
        assert_eq!(s.cluster_ips, vec!["10.96.0.10".parse::<IpAddr>().unwrap(), "fd00::10".parse().unwrap()]);
        assert_eq!(s.ports[0].target_port, TargetPort::Name("web".into()));
        assert_eq!(s.ports[1].target_port, TargetPort::Number(53));
        assert_eq!(s.ports[1].protocol, Protocol::Udp);
        assert_eq!(s.session_affinity, SessionAffinity::ClientIp { timeout_seconds: 10800 });
    }

    #[test]
    fn invalid_ip_names_the_object_and_the_field() {
        let e = conv(
            Kind::Service,
            json!({"metadata":{"name":"web","namespace":"shop"},"spec":{"clusterIPs":["10.96.0.10","10.96.0.300"]}}),
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "Service shop/web: field spec.clusterIPs[1]: invalid IP address \"10.96.0.300\"");
    }

    #[test]
    fn slice_conditions_default_as_the_api_says() {
        let o = conv(
            Kind::EndpointSlice,
            json!({"metadata":{"name":"web-abc","namespace":"shop","labels":{"kubernetes.io/service-name":"web"}},
                   "addressType":"IPv4",
                   "endpoints":[{"addresses":["10.1.0.1"]},{"addresses":["10.1.0.2"],"conditions":{"ready":false,"terminating":true}}],
                   "ports":[{"name":"http","port":8080}]}),
        )
        .unwrap();
        let Object::EndpointSlice(s) = o else { panic!() };
        assert!(s.endpoints[0].ready && s.endpoints[0].serving && !s.endpoints[0].terminating);
        assert!(!s.endpoints[1].ready && !s.endpoints[1].serving && s.endpoints[1].terminating);
        assert_eq!(s.service_key(), ObjectKey::new("shop", "web"));
    }

    #[test]
    fn slice_without_service_label_is_an_error() {
        let e = conv(Kind::EndpointSlice, json!({"metadata":{"name":"x","namespace":"a"},"addressType":"IPv4"})).unwrap_err();
        assert!(e.field.contains("kubernetes.io/service-name"), "{e}");
    }

    #[test]
    fn slice_address_of_the_wrong_family_is_an_error() {
        let e = conv(
            Kind::EndpointSlice,
            json!({"metadata":{"name":"x","namespace":"a","labels":{"kubernetes.io/service-name":"s"}},
                   "addressType":"IPv6","endpoints":[{"addresses":["10.0.0.1"]}]}),
        )
        .unwrap_err();
        assert_eq!(e.field, "endpoints[0].addresses[0]");
    }

    #[test]
    fn pod_prefers_pod_ips_and_node_reads_zone_label() {
        let Object::Pod(p) = conv(
            Kind::Pod,
            json!({"metadata":{"name":"p","namespace":"a"},"spec":{"hostname":"h","subdomain":"s"},
                   "status":{"phase":"Running","podIP":"10.1.0.5","podIPs":[{"ip":"10.1.0.5"},{"ip":"fd00::5"}]}}),
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(p.ips.len(), 2);
        assert_eq!(p.phase, PodPhase::Running);
        let Object::Node(n) = conv(
            Kind::Node,
            json!({"metadata":{"name":"n1","labels":{"topology.kubernetes.io/zone":"z1"}},
                   "status":{"addresses":[{"type":"InternalIP","address":"10.0.0.1"},{"type":"Hostname","address":"n1"}]}}),
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(n.zone.as_deref(), Some("z1"));
        assert_eq!(n.addresses.len(), 1);
    }
}
