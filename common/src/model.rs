//! Typed, IO-free views of the Kubernetes objects waypost reads: Services, EndpointSlices, Pods and Nodes.
//!
//! Each view keeps only the fields some consumer (DNS or the proxy) reads. Strings that repeat
//! across many objects (namespaces, node names, zones) are shared `Arc<str>`s handed out by an
//! [`Interner`], so that a cluster of 100k endpoints stays small.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

/// A shared, immutable string.
pub type Name = Arc<str>;

/// Identifies a namespaced object: `namespace/name`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ObjectKey {
    /// The object's namespace.
    pub namespace: Name,
    /// The object's name within its namespace.
    pub name: Name,
}

impl ObjectKey {
    /// Builds a key from anything string-like.
    pub fn new(namespace: impl Into<Name>, name: impl Into<Name>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The layer-4 protocol of a port.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub enum Protocol {
    /// TCP, the default when a manifest names none.
    #[default]
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// The lowercase label used in SRV names (`_tcp`).
    pub fn srv_label(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// `spec.type` of a Service.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum ServiceType {
    /// A virtual IP inside the cluster (or headless, when clusterIP is `None`).
    #[default]
    ClusterIp,
    /// ClusterIP plus a port on every node.
    NodePort,
    /// NodePort plus an external load balancer.
    LoadBalancer,
    /// A DNS alias (CNAME) to `externalName`; no proxying.
    ExternalName,
}

/// `internalTrafficPolicy` / `externalTrafficPolicy`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum TrafficPolicy {
    /// Any ready endpoint in the cluster.
    #[default]
    Cluster,
    /// Only endpoints on the receiving node.
    Local,
}

/// Session affinity of a Service.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum SessionAffinity {
    /// Every connection picks an endpoint afresh.
    #[default]
    None,
    /// Connections from one client IP stick to one endpoint for `timeout_seconds`.
    ClientIp {
        /// How long the stickiness lasts after the last packet (default 10800).
        timeout_seconds: u32,
    },
}

/// Where a Service port forwards to on the endpoints.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum TargetPort {
    /// A fixed port number.
    Number(u16),
    /// A container port name, resolved per endpoint through the EndpointSlice ports.
    Name(Name),
}

/// One port of a Service.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ServicePort {
    /// The port's name; SRV records exist only for named ports. `None` when empty.
    pub name: Option<Name>,
    /// The protocol; also the `_proto` label of SRV names.
    pub protocol: Protocol,
    /// The port the service IP listens on.
    pub port: u16,
    /// Where traffic goes on the endpoints.
    pub target_port: TargetPort,
    /// The node port for NodePort/LoadBalancer services.
    pub node_port: Option<u16>,
}

/// An IP prefix such as a `loadBalancerSourceRanges` entry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct IpPrefix {
    /// The network address.
    pub addr: IpAddr,
    /// The prefix length in bits.
    pub len: u8,
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A Service, reduced to what DNS and the proxy read.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Service {
    /// `namespace/name`: the DNS name is derived from it.
    pub key: ObjectKey,
    /// `spec.type`.
    pub service_type: ServiceType,
    /// `spec.clusterIPs` (or `spec.clusterIP`), one per family; empty for headless and ExternalName.
    pub cluster_ips: Vec<IpAddr>,
    /// `clusterIP: None`: DNS answers with the endpoints instead of a virtual IP.
    pub headless: bool,
    /// `spec.ports`.
    pub ports: Vec<ServicePort>,
    /// `spec.externalName`, lowercased, without a trailing dot.
    pub external_name: Option<Name>,
    /// `spec.publishNotReadyAddresses`: DNS lists endpoints that are not ready too.
    pub publish_not_ready_addresses: bool,
    /// `spec.internalTrafficPolicy`.
    pub internal_traffic_policy: TrafficPolicy,
    /// `spec.externalTrafficPolicy`.
    pub external_traffic_policy: TrafficPolicy,
    /// `spec.sessionAffinity` with its timeout.
    pub session_affinity: SessionAffinity,
    /// `spec.trafficDistribution`, e.g. `PreferClose`.
    pub traffic_distribution: Option<Name>,
    /// `status.loadBalancer.ingress[].ip`.
    pub load_balancer_ingress: Vec<IpAddr>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges`.
    pub load_balancer_source_ranges: Vec<IpPrefix>,
    /// `spec.healthCheckNodePort`.
    pub health_check_node_port: Option<u16>,
}

/// `addressType` of an EndpointSlice.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AddressType {
    /// IPv4 addresses.
    Ipv4,
    /// IPv6 addresses.
    Ipv6,
    /// Deprecated FQDN addresses; kept so the slice is not an error, but never served.
    Fqdn,
}

/// What an endpoint refers to (usually a Pod).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct TargetRef {
    /// `kind`, e.g. `Pod`.
    pub kind: Name,
    /// `namespace`.
    pub namespace: Option<Name>,
    /// `name`.
    pub name: Name,
}

/// One endpoint of an EndpointSlice.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Endpoint {
    /// `addresses`: usually one. FQDN slices keep none.
    pub addresses: Box<[IpAddr]>,
    /// `conditions.ready`; a missing value means ready, as the API says.
    pub ready: bool,
    /// `conditions.serving`; a missing value means the same as `ready`.
    pub serving: bool,
    /// `conditions.terminating`; a missing value means not terminating.
    pub terminating: bool,
    /// `hostname`: names the endpoint in DNS (`<hostname>.<svc>.<ns>.svc.<zone>`).
    pub hostname: Option<Name>,
    /// `nodeName`: which node runs it (traffic policy Local).
    pub node_name: Option<Name>,
    /// `zone`.
    pub zone: Option<Name>,
    /// `hints.forZones[].name`: topology-aware routing.
    pub hint_zones: Box<[Name]>,
    /// `hints.forNodes[].name`.
    pub hint_nodes: Box<[Name]>,
    /// `targetRef`.
    pub target_ref: Option<TargetRef>,
}

/// One port of an EndpointSlice; the slice's ports apply to all its endpoints.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct EndpointPort {
    /// Matches a Service port by name (`None` for the unnamed port).
    pub name: Option<Name>,
    /// The protocol.
    pub protocol: Protocol,
    /// The port number on the endpoints; `None` means "all ports" per the API.
    pub port: Option<u16>,
}

/// An EndpointSlice, joined to its Service through the `kubernetes.io/service-name` label.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct EndpointSlice {
    /// `namespace/name` of the slice itself.
    pub key: ObjectKey,
    /// The Service this slice belongs to (same namespace).
    pub service_name: Name,
    /// `addressType`.
    pub address_type: AddressType,
    /// `endpoints`.
    pub endpoints: Vec<Endpoint>,
    /// `ports`.
    pub ports: Vec<EndpointPort>,
}

impl EndpointSlice {
    /// The key of the Service this slice belongs to.
    pub fn service_key(&self) -> ObjectKey {
        ObjectKey { namespace: self.key.namespace.clone(), name: self.service_name.clone() }
    }
}

/// `status.phase` of a Pod.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum PodPhase {
    /// Accepted, not yet running.
    #[default]
    Pending,
    /// Running.
    Running,
    /// Terminated successfully.
    Succeeded,
    /// Terminated with a failure.
    Failed,
    /// Unknown.
    Unknown,
}

/// A Pod, reduced to its addresses and DNS-relevant names.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Pod {
    /// `namespace/name`.
    pub key: ObjectKey,
    /// `status.podIPs` (or `status.podIP`).
    pub ips: Box<[IpAddr]>,
    /// `spec.hostname`.
    pub hostname: Option<Name>,
    /// `spec.subdomain`.
    pub subdomain: Option<Name>,
    /// `spec.nodeName`.
    pub node_name: Option<Name>,
    /// `spec.hostNetwork`: the pod shares the node's addresses.
    pub host_network: bool,
    /// `status.phase`.
    pub phase: PodPhase,
}

/// The kind of a node address.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum NodeAddressKind {
    /// `InternalIP`.
    InternalIp,
    /// `ExternalIP`.
    ExternalIp,
    /// Any other type (`Hostname`, `InternalDNS`, …), kept by name.
    Other(Name),
}

/// A Node, reduced to its name, zone and addresses.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Node {
    /// `metadata.name`.
    pub name: Name,
    /// `topology.kubernetes.io/zone` label.
    pub zone: Option<Name>,
    /// `status.addresses` that are IPs.
    pub addresses: Vec<(NodeAddressKind, IpAddr)>,
}

/// Any object waypost reads.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Object {
    /// A Service.
    Service(Arc<Service>),
    /// An EndpointSlice.
    EndpointSlice(Arc<EndpointSlice>),
    /// A Pod.
    Pod(Arc<Pod>),
    /// A Node.
    Node(Arc<Node>),
}

/// Which kind an object is, for keys and log lines.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub enum Kind {
    /// `Service`.
    Service,
    /// `EndpointSlice`.
    EndpointSlice,
    /// `Pod`.
    Pod,
    /// `Node`.
    Node,
}

impl Kind {
    /// The Kubernetes kind name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::Node => "Node",
        }
    }
}

impl Object {
    /// The kind and key; Nodes have an empty namespace.
    pub fn id(&self) -> (Kind, ObjectKey) {
        match self {
            Object::Service(s) => (Kind::Service, s.key.clone()),
            Object::EndpointSlice(s) => (Kind::EndpointSlice, s.key.clone()),
            Object::Pod(p) => (Kind::Pod, p.key.clone()),
            Object::Node(n) => (Kind::Node, ObjectKey::new("", n.name.clone())),
        }
    }
}

/// Hands out one shared `Arc<str>` per distinct string, so repeated namespaces, node names and
/// zones cost one allocation.
#[derive(Default, Debug)]
pub struct Interner {
    /// Every string handed out so far.
    seen: HashSet<Name>,
}

impl Interner {
    /// Returns the shared copy of `s`.
    pub fn intern(&mut self, s: &str) -> Name {
        if let Some(n) = self.seen.get(s) {
            return n.clone();
        }
        let n: Name = Arc::from(s);
        self.seen.insert(n.clone());
        n
    }

    /// Forgets strings nobody else holds any more.
    pub fn prune(&mut self) {
        self.seen.retain(|n| Arc::strong_count(n) > 1);
    }
}
