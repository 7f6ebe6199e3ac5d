//! The name index: lowercased wire-format names mapped to ready-to-send answers, rebuilt per changed service.
//!
//! Records are derived from the snapshot per service ([`IndexBuilder::contributions`]); a name
//! may be fed by several services (a pod behind two services has two PTR targets), so each
//! entry remembers its owners. The map is split into shards behind `Arc`s: a rebuild copies
//! only the shards it touches, and publishing a new index is one atomic pointer swap.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use waypost_common::model::{IpPrefix, Service, ServiceType};
use waypost_common::{Changes, Name, ObjectKey, Snapshot};

use crate::wire::{self, Answer, AnswerBuilder, AnswerRef, Query, Rdata, rcode, rtype};

/// How many shards the name map has; a rebuild copies only the shards it touches.
const SHARDS: usize = 1024;
/// How deep ExternalName chains are followed.
const MAX_CHASE: usize = 8;

type Hasher = foldhash::fast::FixedState;
/// Name → entry; an entry is one allocation ([`Entry`] reads it).
type Shard = HashMap<Box<[u8]>, Arc<[u8]>, Hasher>;

/// Whether and how `<a-b-c-d>.<ns>.pod.<zone>` names are answered (CoreDNS `pods`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PodRecords {
    /// Never: such names are NXDOMAIN.
    #[default]
    Disabled,
    /// For any IP-shaped name, without checking the cluster.
    Insecure,
    /// Only for IPs of pods known in that namespace.
    Verified,
}

/// What the index serves.
#[derive(Clone, Debug)]
pub struct IndexConfig {
    /// The cluster domain, e.g. `cluster.local`.
    pub zone: String,
    /// The TTL of every record, and the negative TTL.
    pub ttl: u32,
    /// Pod records mode.
    pub pod_records: PodRecords,
    /// Service and pod CIDRs: reverse names inside them are answered here (NXDOMAIN when
    /// unknown); reverse names outside them go upstream.
    pub reverse_cidrs: Vec<IpPrefix>,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self { zone: "cluster.local".into(), ttl: 5, pod_records: PodRecords::Disabled, reverse_cidrs: Vec::new() }
    }
}

/// The answers for one name, packed into one allocation (most names have one record set, so
/// this costs a few dozen bytes instead of half a dozen heap blocks):
///
/// ```text
/// owners: u16 n, n × u32 | answers: u8 n, n × answer | alias: u8 flag [answer] [u8 len, target]
/// answer: u16 qtype, u8 rcode, u8 aa, 3 × u16 counts, u16 len, body
/// ```
///
/// The owners are the ids of the services whose records make up the name. A type without an
/// answer gets the alias's CNAME (ExternalName) or NODATA; an alias to a name outside the zone
/// carries that name, to chase upstream.
#[derive(Clone, Copy)]
struct Entry<'a>(&'a [u8]);

impl<'a> Entry<'a> {
    fn encode(owners: &[u32], answers: &[(u16, Answer)], alias: Option<(&Answer, Option<&[u8]>)>) -> Arc<[u8]> {
        let mut b = Vec::with_capacity(8 + owners.len() * 4 + answers.iter().map(|(_, a)| 12 + a.body.len()).sum::<usize>());
        b.extend_from_slice(&(owners.len() as u16).to_be_bytes());
        for o in owners {
            b.extend_from_slice(&o.to_be_bytes());
        }
        let put = |b: &mut Vec<u8>, t: u16, a: &Answer| {
            b.extend_from_slice(&t.to_be_bytes());
            b.push(a.rcode);
            b.push(u8::from(a.aa));
            for c in a.counts {
                b.extend_from_slice(&c.to_be_bytes());
            }
            b.extend_from_slice(&(a.body.len() as u16).to_be_bytes());
            b.extend_from_slice(&a.body);
        };
        b.push(answers.len() as u8);
        for (t, a) in answers {
            put(&mut b, *t, a);
        }
        match alias {
            None => b.push(0),
            Some((fallback, external)) => {
                b.push(1);
                put(&mut b, rtype::CNAME, fallback);
                match external {
                    Some(t) => {
                        b.push(t.len() as u8);
                        b.extend_from_slice(t);
                    }
                    None => b.push(0),
                }
            }
        }
        b.into()
    }

    fn u16_at(&self, i: usize) -> u16 {
        u16::from_be_bytes([self.0[i], self.0[i + 1]])
    }

    fn owners(&self) -> impl Iterator<Item = u32> + 'a {
        let n = u16::from_be_bytes([self.0[0], self.0[1]]) as usize;
        self.0[2..2 + 4 * n].chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
    }

    fn answers_start(&self) -> usize {
        2 + 4 * self.u16_at(0) as usize
    }

    /// The answer stored at `i`, with its type and where the next one starts.
    fn answer_at(&self, i: usize) -> (u16, AnswerRef<'a>, usize) {
        let d = self.0;
        let len = u16::from_be_bytes([d[i + 10], d[i + 11]]) as usize;
        let a = AnswerRef {
            rcode: d[i + 2],
            aa: d[i + 3] != 0,
            counts: [self.u16_at(i + 4), self.u16_at(i + 6), self.u16_at(i + 8)],
            body: &d[i + 12..i + 12 + len],
        };
        (u16::from_be_bytes([d[i], d[i + 1]]), a, i + 12 + len)
    }

    /// The answer for `qtype` (ANY: the first record set, as RFC 8482 allows).
    fn answer(&self, qtype: u16) -> Option<AnswerRef<'a>> {
        let mut i = self.answers_start();
        let n = self.0[i];
        i += 1;
        for _ in 0..n {
            let (t, a, next) = self.answer_at(i);
            if t == qtype || qtype == rtype::ANY {
                return Some(a);
            }
            i = next;
        }
        None
    }

    /// The alias part: the CNAME answer and, for a target outside the zone, the target.
    fn alias(&self) -> Option<(AnswerRef<'a>, Option<&'a [u8]>)> {
        let mut i = self.answers_start();
        let n = self.0[i];
        i += 1;
        for _ in 0..n {
            i = self.answer_at(i).2;
        }
        if self.0[i] == 0 {
            return None;
        }
        let (_, fallback, next) = self.answer_at(i + 1);
        let len = self.0[next] as usize;
        Some((fallback, (len > 0).then(|| &self.0[next + 1..next + 1 + len])))
    }
}

/// The result of a lookup.
#[derive(Debug)]
pub enum Lookup<'a> {
    /// A prebuilt answer.
    Answer(AnswerRef<'a>),
    /// An answer built for this query (pod records).
    Built(Answer),
    /// An alias to a name outside the zone: the CNAME answer, and the target to chase
    /// upstream when forwarding is on.
    ExternalAlias(AnswerRef<'a>, &'a [u8]),
    /// Not synced yet: SERVFAIL.
    NotReady,
    /// Outside the zones waypost serves (REFUSED, or forwarded upstream).
    OutOfZone,
    /// A question waypost will not answer (zone transfers, other classes): REFUSED.
    Refused,
}

/// Facts about the zone that every lookup needs.
#[derive(Debug)]
struct Zone {
    /// The zone apex in wire format.
    wire: Vec<u8>,
    /// The NXDOMAIN answer (SOA in authority).
    nxdomain: Answer,
    /// The NODATA answer (SOA in authority).
    nodata: Answer,
    /// The record TTL.
    ttl: u32,
    /// Pod record mode.
    pod_records: PodRecords,
    /// CIDRs whose reverse names are ours.
    reverse_cidrs: Vec<IpPrefix>,
}

/// One immutable version of the index; queries read it without locks.
pub struct Index {
    /// The name map, sharded by hash.
    shards: Box<[Arc<Shard>]>,
    /// The hasher picking a shard.
    hasher: Hasher,
    /// Apex facts and shared negative answers.
    zone: Arc<Zone>,
    /// Namespaces with at least one service (`<ns>.svc.<zone>` exists).
    namespaces: Arc<HashSet<Box<[u8]>, Hasher>>,
    /// Pod IP → namespaces, for `--pod-records verified`.
    pod_ips: Arc<HashMap<IpAddr, Box<[Name]>, Hasher>>,
    /// Whether the source has synced; until then every cluster answer is SERVFAIL.
    pub synced: bool,
    /// The snapshot generation this index was built from.
    pub generation: u64,
}

impl Index {
    /// An empty, unsynced index.
    pub fn empty(config: &IndexConfig) -> Index {
        IndexBuilder::new(config.clone()).publish()
    }

    /// Number of names.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    /// True when no name is indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn entry(&self, name: &[u8]) -> Option<Entry<'_>> {
        let h = self.hasher.hash_one(name);
        self.shards[(h as usize) % SHARDS].get(name).map(|b| Entry(b))
    }

    /// Where the zone apex starts in `name` (which must be in the zone).
    pub fn zone_start(&self, name: &[u8]) -> usize {
        name.len() - self.zone.wire.len()
    }

    /// True when `name` is the zone apex or below it.
    pub fn in_zone(&self, name: &[u8]) -> bool {
        zone_offset(name, &self.zone.wire).is_some()
    }

    /// Answers a parsed query.
    pub fn lookup(&self, q: &Query) -> Lookup<'_> {
        let name = q.name();
        if q.qclass != wire::CLASS_IN || q.qtype == rtype::AXFR || q.qtype == rtype::IXFR {
            return if self.in_zone(name) { Lookup::Refused } else { Lookup::OutOfZone };
        }
        if let Some(e) = self.entry(name) {
            if !self.synced {
                return Lookup::NotReady;
            }
            let alias = e.alias();
            if let Some((fallback, Some(target))) = alias
                && q.qtype != rtype::CNAME {
                    return Lookup::ExternalAlias(fallback, target);
                }
            return Lookup::Answer(match e.answer(q.qtype) {
                Some(a) => a,
                None => alias.map_or(self.zone.nodata.as_ref(), |(f, _)| f),
            });
        }
        let Some(at) = zone_offset(name, &self.zone.wire) else {
            if !self.zone.reverse_cidrs.is_empty()
                && let Some(ip) = parse_reverse(name)
                    && self.zone.reverse_cidrs.iter().any(|c| prefix_contains(c, ip)) {
                        return if self.synced { Lookup::Answer(self.zone.nxdomain.as_ref()) } else { Lookup::NotReady };
                    }
            return Lookup::OutOfZone;
        };
        if !self.synced {
            return Lookup::NotReady;
        }
        self.miss_in_zone(q, &name[..at])
    }

    /// For `<stem>.<ns>.svc.<zone>` where `<ns>` has services: the length of `<stem>` in wire
    /// bytes. This is the shape of the first step of a pod's search walk.
    pub fn search_stem(&self, name: &[u8]) -> Option<usize> {
        let at = zone_offset(name, &self.zone.wire)?;
        let starts: Vec<usize> = {
            let mut v = Vec::new();
            let mut i = 0;
            while i < at {
                v.push(i);
                i += 1 + name[i] as usize;
            }
            v
        };
        if starts.len() < 3 {
            return None;
        }
        let svc = starts[starts.len() - 1];
        let ns = starts[starts.len() - 2];
        let stem_end = ns;
        (&name[svc..at] == b"\x03svc" && self.namespaces.contains(&name[ns + 1..svc])).then_some(stem_end)
    }

    /// A name in the zone that has no entry: an empty non-terminal, a pod record, or NXDOMAIN.
    fn miss_in_zone(&self, q: &Query, rel: &[u8]) -> Lookup<'_> {
        // Every name below needs at most three labels under the zone; more is NXDOMAIN. This is
        // the path of every search-list miss, so it does not allocate.
        let mut last: [&[u8]; 3] = [&[]; 3];
        let mut n = 0;
        for label in wire::labels(rel) {
            if n == last.len() {
                return Lookup::Answer(self.zone.nxdomain.as_ref());
            }
            last[n] = label;
            n += 1;
        }
        let rel_labels = &mut last[..n];
        rel_labels.reverse();
        let nodata = Lookup::Answer(self.zone.nodata.as_ref());
        let pods = self.zone.pod_records != PodRecords::Disabled;
        match &*rel_labels {
            [b"svc"] => nodata,
            [b"svc", ns] if self.namespaces.contains(*ns) => nodata,
            [b"pod"] | [b"pod", _] if pods => nodata,
            [b"pod", ns, ip] if pods => match self.pod_record(ns, ip) {
                Some(ip) => {
                    let want = if ip.is_ipv4() { rtype::A } else { rtype::AAAA };
                    if q.qtype != want && q.qtype != rtype::ANY {
                        return nodata;
                    }
                    let mut b = AnswerBuilder::new(q.name());
                    b.record(q.name(), self.zone.ttl, &Rdata::addr(ip));
                    Lookup::Built(b.finish(rcode::NOERROR, true))
                }
                None => Lookup::Answer(self.zone.nxdomain.as_ref()),
            },
            _ => Lookup::Answer(self.zone.nxdomain.as_ref()),
        }
    }

    fn pod_record(&self, ns: &[u8], label: &[u8]) -> Option<IpAddr> {
        let ip = undash_ip(std::str::from_utf8(label).ok()?)?;
        match self.zone.pod_records {
            PodRecords::Disabled => None,
            PodRecords::Insecure => Some(ip),
            PodRecords::Verified => {
                let nss = self.pod_ips.get(&ip)?;
                nss.iter().any(|n| n.as_bytes() == ns).then_some(ip)
            }
        }
    }
}

/// Where the zone starts inside `name` (a label boundary), if `name` is in the zone.
fn zone_offset(name: &[u8], zone: &[u8]) -> Option<usize> {
    if name.len() < zone.len() || &name[name.len() - zone.len()..] != zone {
        return None;
    }
    let target = name.len() - zone.len();
    let mut i = 0;
    while i < target {
        i += 1 + name[i] as usize;
    }
    (i == target).then_some(target)
}

/// The address a full reverse name stands for (`4.3.2.1.in-addr.arpa`, 32 nibbles under
/// `ip6.arpa`).
fn parse_reverse(name: &[u8]) -> Option<IpAddr> {
    let labels: Vec<&[u8]> = wire::labels(name).collect();
    match labels.as_slice() {
        [d, c, b, a, arpa1, arpa2] if arpa1.eq_ignore_ascii_case(b"in-addr") && arpa2.eq_ignore_ascii_case(b"arpa") => {
            let o = |x: &[u8]| std::str::from_utf8(x).ok()?.parse::<u8>().ok();
            Some(IpAddr::from([o(a)?, o(b)?, o(c)?, o(d)?]))
        }
        [nibbles @ .., ip6, arpa] if nibbles.len() == 32 && ip6.eq_ignore_ascii_case(b"ip6") && arpa.eq_ignore_ascii_case(b"arpa") => {
            let mut bytes = [0u8; 16];
            for (i, n) in nibbles.iter().rev().enumerate() {
                let [c] = n else { return None };
                let v = (*c as char).to_digit(16)? as u8;
                bytes[i / 2] |= if i % 2 == 0 { v << 4 } else { v };
            }
            Some(IpAddr::from(bytes))
        }
        _ => None,
    }
}

/// Whether `prefix` contains `ip`.
fn prefix_contains(prefix: &IpPrefix, ip: IpAddr) -> bool {
    let bits = |a: IpAddr| -> u128 {
        match a {
            IpAddr::V4(v) => u128::from(u32::from(v)) << 96,
            IpAddr::V6(v) => u128::from(v),
        }
    };
    if prefix.addr.is_ipv4() != ip.is_ipv4() {
        return false;
    }
    // IPv4 sits in the top 32 bits, so one mask from the top serves both families.
    let len = u32::from(prefix.len);
    if len == 0 {
        return true;
    }
    let mask = !0u128 << (128 - len.min(128));
    bits(prefix.addr) & mask == bits(ip) & mask
}

/// `10-0-0-1` → 10.0.0.1; `fd00--1` → fd00::1.
fn undash_ip(label: &str) -> Option<IpAddr> {
    if label.contains(':') || label.contains('.') {
        return None;
    }
    let dotted = label.replace('-', ".");
    if let Ok(IpAddr::V4(v4)) = dotted.parse::<IpAddr>() {
        return Some(IpAddr::V4(v4));
    }
    label.replace('-', ":").parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6)
}

/// The label an endpoint without a hostname gets: `10-0-0-1`, or `fd00--1` for IPv6.
pub fn dashed_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
        IpAddr::V6(v6) => v6.to_string().replace(':', "-"),
    }
}

/// The reverse-lookup name of an address (`1.0.0.10.in-addr.arpa`, nibbles under `ip6.arpa`).
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::with_capacity(72);
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xF, b >> 4));
            }
            s.push_str("ip6.arpa");
            s
        }
    }
}

/// Records one service contributes, by name; names with no records are empty non-terminals.
type Contribution = BTreeMap<Vec<u8>, BTreeSet<Rdata>>;

/// Keeps the mutable state behind the index and produces new [`Index`] versions.
pub struct IndexBuilder {
    /// What to serve.
    config: IndexConfig,
    /// The zone apex in wire format.
    zone_wire: Vec<u8>,
    /// The name map being edited; shards shared with published indexes are copied on write.
    shards: Vec<Arc<Shard>>,
    /// Picks shards; fixed so published indexes and the builder agree.
    hasher: Hasher,
    /// Small ids for services, stored in entries instead of keys.
    ids: HashMap<ObjectKey, u32>,
    /// Id → key.
    keys: Vec<Option<ObjectKey>>,
    /// Ids free for reuse.
    free: Vec<u32>,
    /// The snapshot applied last: a service's old names are derived from it (rather than
    /// stored), to remove the ones it no longer has.
    prev: Snapshot,
    /// Services per namespace label, for `<ns>.svc.<zone>`.
    ns_counts: HashMap<Box<[u8]>, u32>,
    /// ExternalName services by the in-zone name they alias, rebuilt when it changes.
    cname_deps: HashMap<Vec<u8>, HashSet<u32>>,
    /// The reverse of `cname_deps`: the in-zone names each alias service points at.
    cname_of: HashMap<u32, Vec<Vec<u8>>>,
    /// The namespace set as last published.
    namespaces: Arc<HashSet<Box<[u8]>, Hasher>>,
    /// Pod IP index as last published.
    pod_ips: Arc<HashMap<IpAddr, Box<[Name]>, Hasher>>,
    /// Apex facts as last published.
    zone: Arc<Zone>,
    /// The snapshot generation applied last.
    generation: u64,
    /// Whether the applied snapshot was synced.
    synced: bool,
}

/// The service that, when present, gives `ns.dns.<zone>` its addresses.
const DNS_SERVICE: (&str, &str) = ("kube-system", "kube-dns");

impl IndexBuilder {
    /// A builder with an empty index.
    pub fn new(config: IndexConfig) -> Self {
        let zone_name = config.zone.trim_end_matches('.').to_ascii_lowercase();
        let zone_wire = wire::name_to_wire(&zone_name).expect("cluster domain is a valid DNS name");
        let config = IndexConfig { zone: zone_name, ..config };
        let hasher = Hasher::with_seed(0x5741_5950_4f53_5400);
        let mut b = IndexBuilder {
            zone: Arc::new(Self::zone_facts(&config, &zone_wire)),
            config,
            zone_wire,
            shards: (0..SHARDS).map(|_| Arc::new(Shard::with_hasher(hasher.clone()))).collect(),
            hasher: hasher.clone(),
            ids: HashMap::new(),
            keys: Vec::new(),
            free: Vec::new(),
            prev: Snapshot::default(),
            ns_counts: HashMap::new(),
            cname_deps: HashMap::new(),
            cname_of: HashMap::new(),
            namespaces: Arc::default(),
            pod_ips: Arc::default(),
            generation: 0,
            synced: false,
        };
        b.build_apex(&Snapshot::default());
        b
    }

    fn soa(config: &IndexConfig, zone_wire: &[u8]) -> Rdata {
        let serial = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_secs() as u32);
        Rdata::Soa {
            mname: wire::name_to_wire(&format!("ns.dns.{}", config.zone)).unwrap_or_else(|| zone_wire.to_vec()),
            rname: wire::name_to_wire(&format!("hostmaster.{}", config.zone)).unwrap_or_else(|| zone_wire.to_vec()),
            serial,
            times: [7200, 1800, 86400, config.ttl],
        }
    }

    fn zone_facts(config: &IndexConfig, zone_wire: &[u8]) -> Zone {
        let soa = Self::soa(config, zone_wire);
        let negative = |rc| {
            let mut b = AnswerBuilder::uncompressed();
            b.section(1).record(zone_wire, config.ttl, &soa);
            b.finish(rc, true)
        };
        Zone {
            wire: zone_wire.to_vec(),
            nxdomain: negative(rcode::NXDOMAIN),
            nodata: negative(rcode::NOERROR),
            ttl: config.ttl,
            pod_records: config.pod_records,
            reverse_cidrs: config.reverse_cidrs.clone(),
        }
    }

    /// Applies what changed in `snap` since the last call and publishes a new index.
    pub fn apply(&mut self, snap: &Snapshot) -> Arc<Index> {
        let changes = snap.changes_since(self.generation);
        let (services, pods) = match changes {
            Changes::None => (HashSet::new(), false),
            Changes::Full => {
                let mut all: HashSet<ObjectKey> = snap.services.keys().cloned().collect();
                all.extend(snap.service_slices.keys().cloned());
                all.extend(self.ids.keys().cloned());
                self.zone = Arc::new(Self::zone_facts(&self.config, &self.zone_wire));
                (all, true)
            }
            Changes::Partial { services, pods, .. } => (services, pods),
        };
        let dns_key = ObjectKey::new(DNS_SERVICE.0, DNS_SERVICE.1);
        if services.contains(&dns_key) || self.generation == 0 {
            self.build_apex(snap);
        }
        self.rebuild(snap, services);
        if pods && self.config.pod_records == PodRecords::Verified {
            let mut m: HashMap<IpAddr, Vec<Name>> = HashMap::new();
            for p in snap.pods.values().filter(|p| !p.host_network) {
                for ip in p.ips.iter() {
                    m.entry(*ip).or_default().push(p.key.namespace.clone());
                }
            }
            let mut out = HashMap::with_capacity_and_hasher(m.len(), self.hasher.clone());
            out.extend(m.into_iter().map(|(k, v)| (k, v.into_boxed_slice())));
            self.pod_ips = Arc::new(out);
        }
        self.generation = snap.generation;
        self.synced = snap.synced;
        self.prev = snap.clone();
        Arc::new(self.publish())
    }

    fn publish(&self) -> Index {
        Index {
            shards: self.shards.clone().into_boxed_slice(),
            hasher: self.hasher.clone(),
            zone: self.zone.clone(),
            namespaces: self.namespaces.clone(),
            pod_ips: self.pod_ips.clone(),
            synced: self.synced,
            generation: self.generation,
        }
    }

    // === apex ===

    fn build_apex(&mut self, snap: &Snapshot) {
        let z = self.zone_wire.clone();
        let ttl = self.config.ttl;
        let ns_name = wire::name_to_wire(&format!("ns.dns.{}", self.config.zone)).unwrap_or_else(|| z.clone());
        let soa = Self::soa(&self.config, &z);
        let mut apex: BTreeSet<Rdata> = BTreeSet::new();
        apex.insert(soa);
        apex.insert(Rdata::Ns(ns_name.clone()));
        let mut ns_addrs = BTreeSet::new();
        if let Some(svc) = snap.services.get(&ObjectKey::new(DNS_SERVICE.0, DNS_SERVICE.1)) {
            ns_addrs.extend(svc.cluster_ips.iter().map(|ip| Rdata::addr(*ip)));
        }
        let version = wire::name_to_wire(&format!("dns-version.{}", self.config.zone)).unwrap_or_else(|| z.clone());
        let mut txt = BTreeSet::new();
        txt.insert(Rdata::Txt("1.1.0".into()));
        let dns_ent = wire::name_to_wire(&format!("dns.{}", self.config.zone)).unwrap_or_else(|| z.clone());
        let mut all = Contribution::new();
        all.insert(z.clone(), apex);
        all.insert(ns_name.clone(), ns_addrs);
        all.insert(version.clone(), txt);
        all.insert(dns_ent.clone(), BTreeSet::new());
        for name in [&z, &ns_name, &version, &dns_ent] {
            let recs: Vec<Rdata> = all[name].iter().cloned().collect();
            let context = |t: &[u8]| -> Vec<Rdata> { all.get(t).map(|s| s.iter().cloned().collect()).unwrap_or_default() };
            let entry = self.build_entry(snap, name, &recs, &context, Box::new([]), ttl);
            self.insert(name.clone().into_boxed_slice(), entry);
        }
    }

    // === per-service records ===

    /// The records `key` contributes, derived from the snapshot alone.
    pub fn contributions(&self, snap: &Snapshot, key: &ObjectKey) -> Contribution {
        let mut out = Contribution::new();
        let Some(svc) = snap.services.get(key) else { return out };
        let zone = &self.config.zone;
        let base_s = format!("{}.{}.svc.{}", svc.key.name, svc.key.namespace, zone);
        let Some(base) = wire::name_to_wire(&base_s) else {
            tracing::warn!(service = %key, "name {base_s} is not a valid DNS name; no records");
            return out;
        };
        let mut add = |name: &[u8], r: Option<Rdata>| {
            let set = out.entry(name.to_vec()).or_default();
            set.extend(r);
        };
        if svc.service_type == ServiceType::ExternalName {
            let target = svc.external_name.as_deref().unwrap_or_default();
            match wire::name_to_wire(target) {
                Some(t) => add(&base, Some(Rdata::Cname(t))),
                None => tracing::warn!(service = %key, "field spec.externalName: {target:?} is not a valid DNS name"),
            }
            return out;
        }
        let endpoints = self.endpoints(snap, svc, &base_s);
        if svc.headless {
            if endpoints.is_empty() {
                return out;
            }
            for e in &endpoints {
                add(&base, Some(Rdata::addr(e.ip)));
            }
            // One SRV per endpoint and named port of its slice.
            let mut srv: BTreeMap<Vec<u8>, BTreeSet<(u16, Vec<u8>)>> = BTreeMap::new();
            for e in &endpoints {
                for (pname, proto, port) in &e.ports {
                    let n = format!("_{pname}._{proto}.{base_s}");
                    if let Some(w) = wire::name_to_wire(&n) {
                        srv.entry(w).or_default().insert((*port, e.name.clone()));
                    }
                }
            }
            for (name, targets) in srv {
                let weight = (100 / targets.len().max(1)).max(1) as u16;
                add(&name[1 + name[0] as usize..], None);
                for (port, target) in targets {
                    add(&name, Some(Rdata::Srv { priority: 0, weight, port, target }));
                }
            }
        } else {
            add(&base, None);
            for ip in &svc.cluster_ips {
                add(&base, Some(Rdata::addr(*ip)));
                if let Some(r) = wire::name_to_wire(&reverse_name(*ip)) {
                    add(&r, Some(Rdata::Ptr(base.clone())));
                }
            }
            for p in &svc.ports {
                let Some(pname) = &p.name else { continue };
                let n = format!("_{}._{}.{base_s}", pname.to_ascii_lowercase(), p.protocol.srv_label());
                if let Some(w) = wire::name_to_wire(&n) {
                    add(&w[1 + w[0] as usize..], None);
                    add(&w, Some(Rdata::Srv { priority: 0, weight: 100, port: p.port, target: base.clone() }));
                }
            }
        }
        for e in &endpoints {
            add(&e.name, Some(Rdata::addr(e.ip)));
            if let Some(r) = wire::name_to_wire(&reverse_name(e.ip)) {
                add(&r, Some(Rdata::Ptr(e.name.clone())));
            }
        }
        out
    }

    /// The endpoints DNS publishes for `svc`: ready ones (or all with
    /// publishNotReadyAddresses), deduplicated by address.
    fn endpoints(&self, snap: &Snapshot, svc: &Service, base: &str) -> Vec<DnsEndpoint> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for slice in snap.slices_of(&svc.key) {
            let ports: Vec<(String, &'static str, u16)> = slice
                .ports
                .iter()
                .filter_map(|p| Some((p.name.as_deref()?.to_ascii_lowercase(), p.protocol.srv_label(), p.port?)))
                .collect();
            for e in &slice.endpoints {
                if !(e.ready || svc.publish_not_ready_addresses) {
                    continue;
                }
                for ip in e.addresses.iter() {
                    if !seen.insert(*ip) {
                        continue;
                    }
                    let label = match &e.hostname {
                        Some(h) => h.to_ascii_lowercase(),
                        None => dashed_ip(*ip),
                    };
                    let Some(name) = wire::name_to_wire(&format!("{label}.{base}")) else {
                        tracing::warn!(endpointslice = %slice.key, "endpoint name {label}.{base} is not a valid DNS name");
                        continue;
                    };
                    out.push(DnsEndpoint { ip: *ip, name, ports: ports.clone() });
                }
            }
        }
        out
    }

    // === rebuild ===

    fn id_of(&mut self, key: &ObjectKey) -> u32 {
        if let Some(id) = self.ids.get(key) {
            return *id;
        }
        let id = match self.free.pop() {
            Some(id) => {
                self.keys[id as usize] = Some(key.clone());
                id
            }
            None => {
                self.keys.push(Some(key.clone()));
                (self.keys.len() - 1) as u32
            }
        };
        self.ids.insert(key.clone(), id);
        id
    }

    fn rebuild(&mut self, snap: &Snapshot, mut services: HashSet<ObjectKey>) {
        let mut ns_changed = false;
        let mut done: HashSet<ObjectKey> = HashSet::new();
        for _round in 0..MAX_CHASE {
            services.retain(|k| !done.contains(k));
            if services.is_empty() {
                break;
            }
            done.extend(services.iter().cloned());
            let mut fresh: HashMap<u32, Contribution> = HashMap::new();
            let mut affected: BTreeSet<Vec<u8>> = BTreeSet::new();
            let mut aliases: HashSet<Vec<u8>> = HashSet::new();
            let mut round_ids = HashSet::new();
            for key in &services {
                let id = self.id_of(key);
                round_ids.insert(id);
                let contrib = self.contributions(snap, key);
                let old: Vec<Vec<u8>> = self.contributions(&self.prev, key).into_keys().collect();
                affected.extend(old.iter().cloned());
                affected.extend(contrib.keys().cloned());
                let ns = key.namespace.as_bytes();
                match (old.is_empty(), contrib.is_empty()) {
                    (true, false) => {
                        *self.ns_counts.entry(ns.into()).or_default() += 1;
                        ns_changed = true;
                    }
                    (false, true) => {
                        if let Some(c) = self.ns_counts.get_mut(ns) {
                            *c -= 1;
                            if *c == 0 {
                                self.ns_counts.remove(ns);
                            }
                        }
                        ns_changed = true;
                    }
                    _ => {}
                }
                for t in self.cname_of.remove(&id).unwrap_or_default() {
                    if let Some(d) = self.cname_deps.get_mut(&t) {
                        d.remove(&id);
                        if d.is_empty() {
                            self.cname_deps.remove(&t);
                        }
                    }
                }
                for (name, recs) in &contrib {
                    for r in recs {
                        if let Rdata::Cname(t) = r {
                            aliases.insert(name.clone());
                            if zone_offset(t, &self.zone_wire).is_some() {
                                self.cname_deps.entry(t.clone()).or_default().insert(id);
                                self.cname_of.entry(id).or_default().push(t.clone());
                            }
                        }
                    }
                }
                if contrib.is_empty() && !snap.services.contains_key(key) {
                    self.ids.remove(key);
                    self.keys[id as usize] = None;
                    self.free.push(id);
                }
                fresh.insert(id, contrib);
            }
            // Aliases last, so they chase targets rebuilt in this round.
            let (aliases, plain): (Vec<Vec<u8>>, Vec<Vec<u8>>) = affected.into_iter().partition(|n| aliases.contains(n));
            let mut round_owners: HashMap<&[u8], Vec<u32>> = HashMap::new();
            for (id, c) in &fresh {
                for name in c.keys() {
                    round_owners.entry(name.as_slice()).or_default().push(*id);
                }
            }
            let round_owners: HashMap<Vec<u8>, Vec<u32>> = round_owners.into_iter().map(|(k, v)| (k.to_vec(), v)).collect();
            let mut next = HashSet::new();
            for name in plain.iter().chain(aliases.iter()) {
                let owners_now = round_owners.get(name).map(Vec::as_slice).unwrap_or(&[]);
                self.rebuild_name(snap, name, &round_ids, owners_now, &mut fresh);
                if let Some(deps) = self.cname_deps.get(name) {
                    for d in deps {
                        if !round_ids.contains(d)
                            && let Some(Some(k)) = self.keys.get(*d as usize) {
                                next.insert(k.clone());
                            }
                    }
                }
            }
            services = next;
        }
        if ns_changed {
            let mut set = HashSet::with_hasher(self.hasher.clone());
            set.extend(self.ns_counts.keys().cloned());
            self.namespaces = Arc::new(set);
        }
    }

    fn rebuild_name(
        &mut self,
        snap: &Snapshot,
        name: &[u8],
        round: &HashSet<u32>,
        owners_now: &[u32],
        fresh: &mut HashMap<u32, Contribution>,
    ) {
        let old_owners: Vec<u32> = self.get(name).map(|e| e.owners().collect()).unwrap_or_default();
        let mut owners: Vec<u32> = old_owners.into_iter().filter(|o| !round.contains(o)).collect();
        owners.extend_from_slice(owners_now);
        owners.sort_unstable();
        owners.dedup();
        if owners.is_empty() {
            self.remove(name);
            return;
        }
        for o in &owners {
            if !fresh.contains_key(o) {
                let c = match self.keys.get(*o as usize) {
                    Some(Some(k)) => self.contributions(snap, &k.clone()),
                    _ => Contribution::new(),
                };
                fresh.insert(*o, c);
            }
        }
        let mut recs = BTreeSet::new();
        for o in &owners {
            if let Some(r) = fresh[o].get(name) {
                recs.extend(r.iter().cloned());
            }
        }
        let recs: Vec<Rdata> = recs.into_iter().collect();
        // Additional records come from the same services (SRV targets).
        let contribs: Vec<&Contribution> = owners.iter().map(|o| &fresh[o]).collect();
        let context = |target: &[u8]| -> Vec<Rdata> {
            let mut v: Vec<Rdata> = contribs.iter().filter_map(|c| c.get(target)).flatten().cloned().collect();
            v.sort();
            v.dedup();
            v
        };
        let entry = self.build_entry(snap, name, &recs, &context, owners.into_boxed_slice(), self.config.ttl);
        self.insert(name.into(), entry);
    }

    fn get(&self, name: &[u8]) -> Option<Entry<'_>> {
        let h = self.hasher.hash_one(name);
        self.shards[(h as usize) % SHARDS].get(name).map(|b| Entry(b))
    }

    fn insert(&mut self, name: Box<[u8]>, e: Arc<[u8]>) {
        let h = self.hasher.hash_one(&name[..]);
        Arc::make_mut(&mut self.shards[(h as usize) % SHARDS]).insert(name, e);
    }

    fn remove(&mut self, name: &[u8]) {
        let h = self.hasher.hash_one(name);
        let shard = &mut self.shards[(h as usize) % SHARDS];
        if shard.contains_key(name) {
            Arc::make_mut(shard).remove(name);
        }
    }

    /// The records currently at `name`, from whichever services own it (for alias chasing).
    fn records_at(&self, snap: &Snapshot, name: &[u8]) -> Option<Vec<Rdata>> {
        let e = self.get(name)?;
        let mut recs = BTreeSet::new();
        for o in e.owners() {
            if let Some(Some(k)) = self.keys.get(o as usize)
                && let Some(r) = self.contributions(snap, k).remove(name) {
                    recs.extend(r);
                }
        }
        if e.owners().next().is_none() {
            // Apex names have no owners; they are never alias targets worth chasing.
            return Some(Vec::new());
        }
        Some(recs.into_iter().collect())
    }

    fn build_entry(
        &self,
        snap: &Snapshot,
        name: &[u8],
        recs: &[Rdata],
        context: &dyn Fn(&[u8]) -> Vec<Rdata>,
        owners: Box<[u32]>,
        ttl: u32,
    ) -> Arc<[u8]> {
        if let Some(Rdata::Cname(target)) = recs.iter().find(|r| matches!(r, Rdata::Cname(_))) {
            return self.alias_entry(snap, name, target, owners, ttl);
        }
        let mut types: Vec<u16> = recs.iter().map(Rdata::rtype).collect();
        types.dedup();
        let mut answers = Vec::with_capacity(types.len() + 1);
        for t in types {
            let mut b = AnswerBuilder::new(name);
            let of_type: Vec<&Rdata> = recs.iter().filter(|r| r.rtype() == t).collect();
            for r in &of_type {
                b.record(name, ttl, r);
            }
            if t == rtype::NS || t == rtype::SRV {
                b.section(2);
                for r in &of_type {
                    let target = match r {
                        Rdata::Srv { target, .. } | Rdata::Ns(target) => target,
                        _ => continue,
                    };
                    for a in context(target) {
                        if matches!(a, Rdata::A(_) | Rdata::Aaaa(_)) {
                            b.record(target, ttl, &a);
                        }
                    }
                }
            }
            answers.push((t, b.finish(rcode::NOERROR, true)));
        }
        Entry::encode(&owners, &answers, None)
    }

    /// An ExternalName entry: CNAME to `target`; when the target is in the zone, its records
    /// of the asked type follow in the same answer.
    fn alias_entry(&self, snap: &Snapshot, name: &[u8], target: &[u8], owners: Box<[u32]>, ttl: u32) -> Arc<[u8]> {
        let cname = Rdata::Cname(target.to_vec());
        let plain = {
            let mut b = AnswerBuilder::new(name);
            b.record(name, ttl, &cname);
            b.finish(rcode::NOERROR, true)
        };
        let mut answers = vec![(rtype::CNAME, plain.clone())];
        let external: Option<Box<[u8]>> = zone_offset(target, &self.zone_wire).is_none().then(|| target.into());
        if external.is_none() {
            // Follow the chain inside the zone.
            let mut chain = vec![(name.to_vec(), cname.clone())];
            let mut at = target.to_vec();
            let mut final_recs = None;
            for _ in 0..MAX_CHASE {
                match self.records_at(snap, &at) {
                    None => break,
                    Some(recs) => match recs.iter().find(|r| matches!(r, Rdata::Cname(_))) {
                        Some(Rdata::Cname(next)) if zone_offset(next, &self.zone_wire).is_some() => {
                            chain.push((at.clone(), Rdata::Cname(next.clone())));
                            at = next.clone();
                        }
                        Some(c) => {
                            chain.push((at.clone(), c.clone()));
                            final_recs = Some(Vec::new());
                            break;
                        }
                        None => {
                            final_recs = Some(recs);
                            break;
                        }
                    },
                }
            }
            for qtype in [rtype::A, rtype::AAAA, rtype::SRV, rtype::TXT, rtype::PTR] {
                let mut b = AnswerBuilder::new(name);
                for (owner, c) in &chain {
                    b.record(owner, ttl, c);
                }
                let rc = match &final_recs {
                    Some(recs) => {
                        for r in recs.iter().filter(|r| r.rtype() == qtype) {
                            b.record(&at, ttl, r);
                        }
                        rcode::NOERROR
                    }
                    None => rcode::NXDOMAIN,
                };
                if rc == rcode::NXDOMAIN || final_recs.as_ref().is_some_and(|r| !r.iter().any(|r| r.rtype() == qtype)) {
                    b.section(1).record(&self.zone_wire, ttl, &Self::soa(&self.config, &self.zone_wire));
                }
                answers.push((qtype, b.finish(rc, true)));
            }
        }
        Entry::encode(&owners, &answers, Some((&plain, external.as_deref())))
    }
}

/// An endpoint as DNS names it.
struct DnsEndpoint {
    /// Its address.
    ip: IpAddr,
    /// `<hostname|a-b-c-d>.<svc>.<ns>.svc.<zone>` in wire format.
    name: Vec<u8>,
    /// Named ports of its slice: (name, protocol label, port).
    ports: Vec<(String, &'static str, u16)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_names_and_dashed_labels() {
        assert_eq!(reverse_name("10.96.0.1".parse().unwrap()), "1.0.96.10.in-addr.arpa");
        assert!(reverse_name("fd00::1".parse().unwrap()).starts_with("1.0.0.0.0.0.0.0"));
        assert!(reverse_name("fd00::1".parse().unwrap()).ends_with("0.0.d.f.ip6.arpa"));
        assert_eq!(dashed_ip("10.1.2.3".parse().unwrap()), "10-1-2-3");
        assert_eq!(dashed_ip("fd00::1".parse().unwrap()), "fd00--1");
        assert_eq!(undash_ip("fd00--1"), Some("fd00::1".parse().unwrap()));
        assert_eq!(undash_ip("10-1-2-3"), Some("10.1.2.3".parse().unwrap()));
        assert_eq!(undash_ip("10-1-2"), None);
    }

    #[test]
    fn reverse_names_parse_back_to_addresses_and_cidrs_contain_them() {
        let w = |ip: &str| wire::name_to_wire(&reverse_name(ip.parse().unwrap())).unwrap();
        for ip in ["10.96.3.4", "fd00::1:2", "::1"] {
            assert_eq!(parse_reverse(&w(ip)), Some(ip.parse().unwrap()));
        }
        let p = waypost_common::convert::parse_prefix("10.96.0.0/12").unwrap();
        assert!(prefix_contains(&p, "10.111.255.1".parse().unwrap()));
        assert!(!prefix_contains(&p, "10.112.0.1".parse().unwrap()));
        let p6 = waypost_common::convert::parse_prefix("fd00::/64").unwrap();
        assert!(prefix_contains(&p6, "fd00::9".parse().unwrap()));
        assert!(!prefix_contains(&p6, "10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn zone_offset_respects_label_boundaries() {
        let zone = wire::name_to_wire("cluster.local").unwrap();
        let n = wire::name_to_wire("a.svc.cluster.local").unwrap();
        assert_eq!(zone_offset(&n, &zone), Some(6));
        let n = wire::name_to_wire("xcluster.local").unwrap();
        assert_eq!(zone_offset(&n, &zone), None);
        assert_eq!(zone_offset(&zone, &zone), Some(0));
    }
}
