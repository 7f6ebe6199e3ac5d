//! Cache for answers forwarded to upstream resolvers (never for cluster-zone answers, which the index already holds ready to send).
//!
//! # What is cached
//! Entries are keyed by the question (lowercased wire-format name, qtype, qclass) plus the DO and
//! CD bits, because an answer fetched with DNSSEC records or with checking disabled must not be
//! served to a client that asked otherwise (CoreDNS keys on the same bits).
//!
//! * **Success** — NOERROR with at least one answer record: kept for the minimum TTL of the
//!   answer and authority records, clamped to `[success_min_ttl, success_max_ttl]`.
//! * **Denial** — NXDOMAIN, or NOERROR with no answer (NODATA): kept per RFC 2308 §5 for
//!   `min(SOA TTL, SOA MINIMUM)` of the SOA in the authority section, clamped to
//!   `[denial_min_ttl, denial_max_ttl]`. A negative answer without an SOA is **not** cached:
//!   RFC 2308 §5 says such answers SHOULD NOT be cached, and an upstream that omits the SOA is
//!   usually a forwarder in trouble.
//! * Everything else (SERVFAIL, REFUSED, truncated answers, answers with more or fewer than one
//!   question) is not cached. A failed refresh does not remove the old entry, so it stays
//!   available to [`Cache::get_stale`].
//!
//! Defaults follow CoreDNS's `cache` plugin: 3600 s maximum for success, 1800 s for denial,
//! minimum 5 s for both (CoreDNS's `MINTTL` default), about 10 000 entries (CoreDNS: 9984),
//! prefetch when an entry has been hit at least twice and less than 10 % of its TTL is left, and
//! serve-stale for up to 1 h (CoreDNS `serve_stale` default) with the 30 s TTL that RFC 8767 §4
//! recommends (CoreDNS sends 0, which makes clients re-ask at once and pile onto a failing
//! upstream).
//!
//! # Hit cost
//! At insert the response is walked once and the byte offsets of every TTL field are stored
//! (OPT and TSIG pseudo-records excluded). A hit clones an `Arc` under the shard lock, then —
//! outside the lock — copies the bytes, writes the client's ID and rewrites each TTL as
//! `min(original, entry TTL) − elapsed`, so a client never sees a TTL longer than the upstream
//! gave or longer than the cache will keep the entry.
//!
//! # Bounds and eviction
//! The cache is split into shards by key hash, each behind its own `parking_lot::Mutex`, so
//! concurrent queries for different names rarely contend. Each shard holds at most
//! `max_entries / shards` entries and `max_bytes / shards` response bytes. Eviction is **CLOCK**
//! (second chance) over a slot ring: a hit only sets a `referenced` bit (no list relinking under
//! the lock, unlike exact LRU), and when room is needed the hand sweeps the ring, evicting the
//! first entry that is past its stale window or was not referenced since the last sweep. CLOCK
//! approximates LRU closely for DNS workloads (a popular name is re-referenced long before the
//! hand comes back), costs one bit per entry and O(1) amortized per insert. Expired entries
//! are not swept eagerly: they are still useful for serve-stale, and they are the first victims.

use std::hash::{BuildHasher, Hash};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::metrics::{CacheKind, Metrics};

/// Errors of the cache: reasons a message cannot be used as a cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    /// The message is shorter than a DNS header or a section runs past its end.
    #[error("DNS message is truncated or malformed")]
    Malformed,
    /// The query does not carry exactly one question, so there is no single key for it.
    #[error("DNS message has {0} questions; exactly one is needed for a cache key")]
    QuestionCount(u16),
    /// The question name uses compression or an unknown label type, which a query never needs.
    #[error("question name uses compression or an extended label type")]
    BadQuestionName,
}

impl CacheError {
    /// True when the bytes are not a parseable DNS message at all.
    pub fn is_malformed(&self) -> bool {
        matches!(self, CacheError::Malformed)
    }
}

/// Small helpers to walk DNS wire format without allocating; shared with the forwarder.
pub(crate) mod wire {
    /// Size of the fixed DNS header.
    pub(crate) const HEADER_LEN: usize = 12;
    /// OPT pseudo-record type (RFC 6891): its TTL field holds flags, not a TTL.
    pub(crate) const TYPE_OPT: u16 = 41;
    /// TSIG pseudo-record type (RFC 8945): its TTL field is zero and must stay so.
    pub(crate) const TYPE_TSIG: u16 = 250;
    /// SOA record type, read for negative-caching TTLs.
    pub(crate) const TYPE_SOA: u16 = 6;

    /// Big-endian u16 at `pos`.
    pub(crate) fn u16_at(msg: &[u8], pos: usize) -> Option<u16> {
        Some(u16::from_be_bytes([*msg.get(pos)?, *msg.get(pos + 1)?]))
    }

    /// Big-endian u32 at `pos`.
    pub(crate) fn u32_at(msg: &[u8], pos: usize) -> Option<u32> {
        let b = msg.get(pos..pos + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Position just past the (possibly compressed) name that starts at `pos`.
    pub(crate) fn skip_name(msg: &[u8], mut pos: usize) -> Option<usize> {
        loop {
            let len = *msg.get(pos)?;
            match len & 0xC0 {
                0x00 if len == 0 => return Some(pos + 1),
                0x00 => pos += 1 + len as usize,
                0xC0 => {
                    msg.get(pos + 1)?;
                    return Some(pos + 2);
                }
                _ => return None,
            }
        }
    }

    /// Question count from the header.
    pub(crate) fn qdcount(msg: &[u8]) -> Option<u16> {
        u16_at(msg, 4)
    }

    /// Position just past the question section.
    pub(crate) fn question_end(msg: &[u8]) -> Option<usize> {
        let mut pos = HEADER_LEN;
        for _ in 0..qdcount(msg)? {
            pos = skip_name(msg, pos)? + 4;
        }
        (pos <= msg.len()).then_some(pos)
    }

    /// One resource record located in a message.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Rr {
        /// Record type.
        pub(crate) rtype: u16,
        /// Offset of the 32-bit TTL field.
        pub(crate) ttl_pos: usize,
        /// Offset of the RDATA.
        pub(crate) rdata: usize,
    }

    /// Which section a record was found in.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Section {
        /// Answer records: their TTLs bound a positive answer's lifetime.
        Answer,
        /// Authority records: the SOA of a negative answer lives here.
        Authority,
        /// Additional records: glue and OPT, which never bound the lifetime.
        Additional,
    }

    /// Calls `f` for every record after the question section; fails if the message is malformed.
    pub(crate) fn for_each_rr(msg: &[u8], mut f: impl FnMut(Section, Rr)) -> Option<()> {
        let counts = [
            (Section::Answer, u16_at(msg, 6)?),
            (Section::Authority, u16_at(msg, 8)?),
            (Section::Additional, u16_at(msg, 10)?),
        ];
        let mut pos = question_end(msg)?;
        for (section, n) in counts {
            for _ in 0..n {
                pos = skip_name(msg, pos)?;
                let rtype = u16_at(msg, pos)?;
                let rdlen = u16_at(msg, pos + 8)? as usize;
                let rdata = pos + 10;
                if rdata + rdlen > msg.len() {
                    return None;
                }
                f(section, Rr { rtype, ttl_pos: pos + 4, rdata });
                pos = rdata + rdlen;
            }
        }
        Some(())
    }
}

// === impl CacheKey ===

/// What an answer is cached under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// Question name in wire format, ASCII-lowercased: DNS names compare case-insensitively.
    name: Box<[u8]>,
    /// Question type.
    qtype: u16,
    /// Question class.
    qclass: u16,
    /// DNSSEC OK bit from the query's OPT record: answers with and without signatures differ.
    dnssec_ok: bool,
    /// Checking Disabled bit: a validating upstream answers CD queries differently.
    checking_disabled: bool,
}

impl CacheKey {
    /// Builds the key of a query message.
    pub fn from_query(query: &[u8]) -> Result<CacheKey, CacheError> {
        if query.len() < wire::HEADER_LEN {
            return Err(CacheError::Malformed);
        }
        let qd = wire::qdcount(query).ok_or(CacheError::Malformed)?;
        if qd != 1 {
            return Err(CacheError::QuestionCount(qd));
        }
        let mut pos = wire::HEADER_LEN;
        loop {
            let len = *query.get(pos).ok_or(CacheError::Malformed)?;
            if len & 0xC0 != 0 {
                return Err(CacheError::BadQuestionName);
            }
            pos += 1 + len as usize;
            if len == 0 {
                break;
            }
        }
        if pos > query.len() {
            return Err(CacheError::Malformed);
        }
        let mut name: Box<[u8]> = query[wire::HEADER_LEN..pos].into();
        name.make_ascii_lowercase();
        let qtype = wire::u16_at(query, pos).ok_or(CacheError::Malformed)?;
        let qclass = wire::u16_at(query, pos + 2).ok_or(CacheError::Malformed)?;
        let mut dnssec_ok = false;
        wire::for_each_rr(query, |section, rr| {
            if section == wire::Section::Additional && rr.rtype == wire::TYPE_OPT {
                dnssec_ok = query[rr.ttl_pos + 2] & 0x80 != 0;
            }
        })
        .ok_or(CacheError::Malformed)?;
        Ok(CacheKey { name, qtype, qclass, dnssec_ok, checking_disabled: query[3] & 0x10 != 0 })
    }

    /// Builds a key from an already parsed question: `name` in uncompressed wire format (any
    /// case), and the DO and CD bits of the query.
    pub fn new(name: &[u8], qtype: u16, qclass: u16, dnssec_ok: bool, checking_disabled: bool) -> CacheKey {
        let mut name: Box<[u8]> = name.into();
        name.make_ascii_lowercase();
        CacheKey { name, qtype, qclass, dnssec_ok, checking_disabled }
    }

    /// Question type of the key.
    pub fn qtype(&self) -> u16 {
        self.qtype
    }
}

// === config ===

/// Tunables of the forward cache; see the module docs for why the defaults are what they are.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Upper bound on entries across all shards.
    pub max_entries: usize,
    /// Upper bound on stored response bytes across all shards, so large answers (TXT, DNSSEC)
    /// cannot blow memory up while staying under `max_entries`.
    pub max_bytes: usize,
    /// Longest time (seconds) a positive answer is kept.
    pub success_max_ttl: u32,
    /// Shortest time (seconds) a positive answer is kept, even with TTL 0, to shield upstreams.
    pub success_min_ttl: u32,
    /// Longest time (seconds) a negative answer is kept.
    pub denial_max_ttl: u32,
    /// Shortest time (seconds) a negative answer is kept.
    pub denial_min_ttl: u32,
    /// Hits an entry needs before it is worth prefetching; 0 disables prefetch.
    pub prefetch_hits: u32,
    /// Prefetch once the remaining TTL is at most this percentage of the entry TTL.
    pub prefetch_percent: u8,
    /// How long past expiry an entry may still be served by [`Cache::get_stale`]; zero disables.
    pub stale_max: Duration,
    /// TTL (seconds) written into stale answers.
    pub stale_ttl: u32,
    /// Number of shards (rounded up to a power of two).
    pub shards: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_entries: 10_000,
            max_bytes: 32 * 1024 * 1024,
            success_max_ttl: 3600,
            success_min_ttl: 5,
            denial_max_ttl: 1800,
            denial_min_ttl: 5,
            prefetch_hits: 2,
            prefetch_percent: 10,
            stale_max: Duration::from_secs(3600),
            stale_ttl: 30,
            shards: 32,
        }
    }
}

// === entries ===

/// The immutable part of an entry, shared with readers so the shard lock covers only a clone.
#[derive(Debug)]
struct Stored {
    /// The upstream's response, with its original ID and TTLs.
    msg: Box<[u8]>,
    /// Offsets of every TTL field to rewrite on a hit.
    ttl_offsets: Box<[u16]>,
    /// Success or denial: picks the metric label and the TTL clamps.
    kind: CacheKind,
    /// When the answer was stored; elapsed time since then is subtracted from TTLs.
    inserted: Instant,
    /// How long (seconds) the entry is fresh: the clamped minimum TTL.
    ttl: u32,
}

impl Stored {
    fn expires(&self) -> Instant {
        self.inserted + Duration::from_secs(u64::from(self.ttl))
    }
}

/// A slot in a shard's CLOCK ring.
#[derive(Debug)]
struct Slot {
    /// Kept so eviction can remove the index entry.
    key: CacheKey,
    /// The answer.
    stored: Arc<Stored>,
    /// Hits since insert, for the prefetch threshold.
    hits: u32,
    /// CLOCK's second-chance bit, set on hit, cleared by the sweeping hand.
    referenced: bool,
    /// Whether a prefetch was already signalled, so one entry triggers at most one refresh.
    prefetch_signalled: bool,
}

/// One lock's worth of the cache.
#[derive(Debug)]
struct Shard {
    /// Key to slot index.
    index: std::collections::HashMap<CacheKey, u32, foldhash::fast::RandomState>,
    /// The CLOCK ring; `None` slots are free and listed in `free`.
    slots: Vec<Option<Slot>>,
    /// Free slot indexes, reused before the ring grows.
    free: Vec<u32>,
    /// CLOCK hand.
    hand: usize,
    /// Sum of stored message sizes, for the byte bound.
    bytes: usize,
}

/// Outcome of a successful [`Cache::get`].
#[derive(Debug)]
pub struct Hit {
    /// The answer with the client's ID and decremented TTLs, ready to send.
    pub response: Vec<u8>,
    /// Whether the entry is popular and about to expire: the server should refresh it upstream
    /// in the background (and [`Cache::insert`] the new answer). Signalled at most once per entry.
    pub prefetch: bool,
    /// Whether this was a positive or negative answer.
    pub kind: CacheKind,
}

// === impl Cache ===

/// A sharded, bounded cache of forwarded answers; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Cache {
    /// Tunables, fixed at construction.
    config: CacheConfig,
    /// The shards; length is a power of two so the shard is picked with a mask.
    shards: Box<[Mutex<Shard>]>,
    /// Picks the shard from the key.
    hasher: foldhash::fast::RandomState,
    /// Per-shard entry bound.
    shard_entries: usize,
    /// Per-shard byte bound.
    shard_bytes: usize,
    /// Where hits, misses, entries and evictions are counted (optional so unit tests and
    /// benchmarks can run without).
    metrics: Option<Arc<Metrics>>,
}

impl Cache {
    /// Creates an empty cache without metrics.
    pub fn new(config: CacheConfig) -> Cache {
        Cache::build(config, None)
    }

    /// Creates an empty cache that reports to `metrics`.
    pub fn with_metrics(config: CacheConfig, metrics: Arc<Metrics>) -> Cache {
        Cache::build(config, Some(metrics))
    }

    fn build(config: CacheConfig, metrics: Option<Arc<Metrics>>) -> Cache {
        let n = config.shards.max(1).next_power_of_two();
        let shard_entries = config.max_entries.div_ceil(n).max(1);
        let shard_bytes = config.max_bytes.div_ceil(n).max(512);
        let shards = (0..n)
            .map(|_| {
                Mutex::new(Shard { index: Default::default(), slots: Vec::new(), free: Vec::new(), hand: 0, bytes: 0 })
            })
            .collect();
        Cache { config, shards, hasher: Default::default(), shard_entries, shard_bytes, metrics }
    }

    /// The configuration in force.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    fn shard(&self, key: &CacheKey) -> &Mutex<Shard> {
        let mut h = self.hasher.build_hasher();
        key.hash(&mut h);
        let hash = std::hash::Hasher::finish(&h);
        &self.shards[(hash as usize) & (self.shards.len() - 1)]
    }

    /// Number of entries held, fresh or stale.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().index.len()).sum()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Looks up a fresh answer. On a hit the response carries `client_id` and TTLs reduced by the
    /// time spent in the cache; expired entries are misses (see [`Cache::get_stale`]).
    pub fn get(&self, key: &CacheKey, client_id: u16, now: Instant) -> Option<Hit> {
        let (stored, prefetch) = {
            let mut shard = self.shard(key).lock();
            let Some(&i) = shard.index.get(key) else {
                drop(shard);
                self.count_miss();
                return None;
            };
            let slot = shard.slots[i as usize].as_mut().expect("indexed slot is occupied");
            let expires = slot.stored.expires();
            if now >= expires {
                if now >= expires + self.config.stale_max {
                    let kind = slot.stored.kind;
                    shard.remove(i);
                    self.entries_add(kind, -1);
                }
                drop(shard);
                self.count_miss();
                return None;
            }
            slot.hits = slot.hits.saturating_add(1);
            slot.referenced = true;
            let mut prefetch = false;
            if self.config.prefetch_hits > 0 && !slot.prefetch_signalled && slot.hits >= self.config.prefetch_hits {
                let ttl = Duration::from_secs(u64::from(slot.stored.ttl));
                let remaining = expires - now;
                if remaining.as_nanos() * 100 <= ttl.as_nanos() * u128::from(self.config.prefetch_percent) {
                    slot.prefetch_signalled = true;
                    prefetch = true;
                }
            }
            (Arc::clone(&slot.stored), prefetch)
        };
        if let Some(m) = &self.metrics {
            m.cache_hit(stored.kind);
            if prefetch {
                m.cache_prefetch();
            }
        }
        let elapsed = now.saturating_duration_since(stored.inserted).as_secs();
        let elapsed = u32::try_from(elapsed).unwrap_or(u32::MAX);
        let response = render(&stored, client_id, |orig| orig.min(stored.ttl).saturating_sub(elapsed));
        Some(Hit { response, prefetch, kind: stored.kind })
    }

    /// Looks up an answer that may have expired, for when every upstream failed (RFC 8767).
    /// A fresh entry is returned as by [`Cache::get`] (without a prefetch signal); an expired
    /// one within `stale_max` of its expiry is returned with every TTL set to `stale_ttl`.
    pub fn get_stale(&self, key: &CacheKey, client_id: u16, now: Instant) -> Option<Vec<u8>> {
        let stored = {
            let mut shard = self.shard(key).lock();
            let &i = shard.index.get(key)?;
            let slot = shard.slots[i as usize].as_mut().expect("indexed slot is occupied");
            if now >= slot.stored.expires() + self.config.stale_max {
                return None;
            }
            slot.referenced = true;
            Arc::clone(&slot.stored)
        };
        if now < stored.expires() {
            let elapsed = u32::try_from(now.saturating_duration_since(stored.inserted).as_secs()).unwrap_or(u32::MAX);
            return Some(render(&stored, client_id, |orig| orig.min(stored.ttl).saturating_sub(elapsed)));
        }
        if let Some(m) = &self.metrics {
            m.cache_served_stale();
        }
        let ttl = self.config.stale_ttl;
        Some(render(&stored, client_id, |_| ttl))
    }

    /// Stores an upstream's `response` under `key` if it is cacheable (see the module docs);
    /// returns whether it was stored. An uncacheable response leaves any existing entry alone.
    pub fn insert(&self, key: CacheKey, response: &[u8], now: Instant) -> bool {
        let Some(analysis) = analyze(response) else {
            return false;
        };
        let (min, max) = match analysis.kind {
            CacheKind::Success => (self.config.success_min_ttl, self.config.success_max_ttl),
            CacheKind::Denial => (self.config.denial_min_ttl, self.config.denial_max_ttl),
        };
        let ttl = analysis.ttl.clamp(min.min(max), max);
        if ttl == 0 || response.len() > self.shard_bytes {
            return false;
        }
        let stored = Arc::new(Stored {
            msg: response.into(),
            ttl_offsets: analysis.ttl_offsets.into_boxed_slice(),
            kind: analysis.kind,
            inserted: now,
            ttl,
        });
        let size = response.len();
        let mut shard = self.shard(&key).lock();
        if let Some(&i) = shard.index.get(&key) {
            let slot = shard.slots[i as usize].as_mut().expect("indexed slot is occupied");
            let old_kind = slot.stored.kind;
            let old_size = slot.stored.msg.len();
            slot.stored = stored;
            slot.hits = 0;
            slot.prefetch_signalled = false;
            slot.referenced = true;
            shard.bytes = shard.bytes - old_size + size;
            drop(shard);
            if old_kind != analysis.kind {
                self.entries_add(old_kind, -1);
                self.entries_add(analysis.kind, 1);
            }
            return true;
        }
        let mut evicted = Vec::new();
        while !shard.index.is_empty()
            && (shard.index.len() >= self.shard_entries || shard.bytes + size > self.shard_bytes)
        {
            match shard.evict_one(now, self.config.stale_max) {
                Some(kind) => evicted.push(kind),
                None => break,
            }
        }
        let slot = Slot { key: key.clone(), stored, hits: 0, referenced: false, prefetch_signalled: false };
        let i = match shard.free.pop() {
            Some(i) => {
                shard.slots[i as usize] = Some(slot);
                i
            }
            None => {
                shard.slots.push(Some(slot));
                u32::try_from(shard.slots.len() - 1).expect("shard holds fewer than 2^32 slots")
            }
        };
        shard.index.insert(key, i);
        shard.bytes += size;
        drop(shard);
        for kind in evicted {
            self.entries_add(kind, -1);
            if let Some(m) = &self.metrics {
                m.cache_eviction(kind);
            }
        }
        self.entries_add(analysis.kind, 1);
        true
    }

    /// Drops every entry (e.g. when the upstream configuration changes).
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            let mut s = shard.lock();
            for slot in s.slots.drain(..).flatten() {
                self.entries_add(slot.stored.kind, -1);
            }
            s.index.clear();
            s.free.clear();
            s.hand = 0;
            s.bytes = 0;
        }
    }

    fn count_miss(&self) {
        if let Some(m) = &self.metrics {
            m.cache_miss();
        }
    }

    fn entries_add(&self, kind: CacheKind, delta: i64) {
        if let Some(m) = &self.metrics {
            m.cache_entries_add(kind, delta);
        }
    }
}

// === impl Shard ===

impl Shard {
    /// Frees slot `i` and drops its index entry.
    fn remove(&mut self, i: u32) -> Option<CacheKind> {
        let slot = self.slots[i as usize].take()?;
        self.index.remove(&slot.key);
        self.bytes -= slot.stored.msg.len();
        self.free.push(i);
        Some(slot.stored.kind)
    }

    /// Advances the CLOCK hand until it evicts one entry: the first one past its stale window
    /// or not referenced since the hand last passed. Two full turns always find a victim.
    fn evict_one(&mut self, now: Instant, stale_max: Duration) -> Option<CacheKind> {
        let n = self.slots.len();
        for _ in 0..2 * n {
            let i = self.hand % n;
            self.hand = (i + 1) % n;
            let Some(slot) = self.slots[i].as_mut() else { continue };
            let dead = now >= slot.stored.expires() + stale_max;
            if !dead && slot.referenced {
                slot.referenced = false;
                continue;
            }
            return self.remove(i as u32);
        }
        None
    }
}

// === response analysis ===

/// What insert needs to know about a response.
#[derive(Debug)]
struct Analysis {
    /// Picks the TTL clamps and the metric label.
    kind: CacheKind,
    /// Unclamped cache lifetime in seconds.
    ttl: u32,
    /// TTL fields to rewrite on every hit.
    ttl_offsets: Vec<u16>,
}

/// Classifies a response and finds its TTL fields; `None` when it must not be cached.
fn analyze(msg: &[u8]) -> Option<Analysis> {
    if msg.len() < wire::HEADER_LEN || msg.len() > usize::from(u16::MAX) {
        return None;
    }
    let truncated = msg[2] & 0x02 != 0;
    let is_response = msg[2] & 0x80 != 0;
    if truncated || !is_response || wire::qdcount(msg)? != 1 {
        return None;
    }
    let rcode = msg[3] & 0x0F;
    let ancount = wire::u16_at(msg, 6)?;
    let mut offsets = Vec::new();
    let mut min_ttl = u32::MAX;
    let mut soa_ttl: Option<u32> = None;
    let mut ok = true;
    wire::for_each_rr(msg, |section, rr| {
        if rr.rtype == wire::TYPE_OPT || rr.rtype == wire::TYPE_TSIG {
            return;
        }
        let Some(ttl) = wire::u32_at(msg, rr.ttl_pos) else {
            ok = false;
            return;
        };
        // RFC 2181 §8: a TTL with the top bit set is treated as zero.
        let ttl = if ttl & 0x8000_0000 != 0 { 0 } else { ttl };
        offsets.push(rr.ttl_pos as u16);
        if section != wire::Section::Additional {
            min_ttl = min_ttl.min(ttl);
        }
        if section == wire::Section::Authority && rr.rtype == wire::TYPE_SOA && soa_ttl.is_none() {
            // RDATA: MNAME, RNAME, then SERIAL REFRESH RETRY EXPIRE MINIMUM.
            let minimum = wire::skip_name(msg, rr.rdata)
                .and_then(|p| wire::skip_name(msg, p))
                .and_then(|p| wire::u32_at(msg, p + 16));
            match minimum {
                Some(m) => soa_ttl = Some(ttl.min(m)),
                None => ok = false,
            }
        }
    })?;
    if !ok {
        return None;
    }
    match (rcode, ancount) {
        (0, 1..) => Some(Analysis { kind: CacheKind::Success, ttl: min_ttl, ttl_offsets: offsets }),
        (0, 0) | (3, _) => Some(Analysis { kind: CacheKind::Denial, ttl: soa_ttl?, ttl_offsets: offsets }),
        _ => None,
    }
}

/// Copies a stored answer, sets the ID and rewrites every TTL through `ttl`.
fn render(stored: &Stored, client_id: u16, ttl: impl Fn(u32) -> u32) -> Vec<u8> {
    let mut out = stored.msg.to_vec();
    out[..2].copy_from_slice(&client_id.to_be_bytes());
    for &off in stored.ttl_offsets.iter() {
        let off = usize::from(off);
        let orig = wire::u32_at(&stored.msg, off).unwrap_or(0);
        let orig = if orig & 0x8000_0000 != 0 { 0 } else { orig };
        out[off..off + 4].copy_from_slice(&ttl(orig).to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds `name` in wire format.
    fn name(n: &str) -> Vec<u8> {
        let mut v = Vec::new();
        for l in n.trim_end_matches('.').split('.').filter(|l| !l.is_empty()) {
            v.push(l.len() as u8);
            v.extend_from_slice(l.as_bytes());
        }
        v.push(0);
        v
    }

    fn query(id: u16, qname: &str, qtype: u16, dnssec_ok: bool) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1]);
        m.extend(name(qname));
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        // OPT: root name, type 41, udp size 1232, ext-rcode 0, version 0, flags, rdlen 0
        m.extend_from_slice(&[0, 0, 41, 0x04, 0xD0, 0, 0]);
        m.extend_from_slice(&[if dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
        m
    }

    /// A response with `answers` A records (TTLs given) and optionally an SOA in authority.
    fn response(id: u16, qname: &str, rcode: u8, answer_ttls: &[u32], soa: Option<(u32, u32)>) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&[0x81, 0x80 | rcode, 0, 1]);
        m.extend_from_slice(&(answer_ttls.len() as u16).to_be_bytes());
        m.extend_from_slice(&(u16::from(soa.is_some())).to_be_bytes());
        m.extend_from_slice(&[0, 1]);
        m.extend(name(qname));
        m.extend_from_slice(&[0, 1, 0, 1]);
        for (i, ttl) in answer_ttls.iter().enumerate() {
            m.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
            m.extend_from_slice(&ttl.to_be_bytes());
            m.extend_from_slice(&[0, 4, 10, 0, 0, i as u8]);
        }
        if let Some((ttl, minimum)) = soa {
            m.extend_from_slice(&[0xC0, 12, 0, 6, 0, 1]);
            m.extend_from_slice(&ttl.to_be_bytes());
            let mut rdata = name("ns.example.");
            rdata.extend(name("hostmaster.example."));
            for v in [1u32, 2, 3, 4, minimum] {
                rdata.extend_from_slice(&v.to_be_bytes());
            }
            m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            m.extend(rdata);
        }
        m.extend_from_slice(&[0, 0, 41, 0x04, 0xD0, 0, 0, 0, 0, 0, 0]);
        m
    }

    /// TTLs of all non-OPT records.
    fn ttls(msg: &[u8]) -> Vec<u32> {
        let mut v = Vec::new();
        wire::for_each_rr(msg, |_, rr| {
            if rr.rtype != wire::TYPE_OPT {
                v.push(wire::u32_at(msg, rr.ttl_pos).unwrap());
            }
        })
        .unwrap();
        v
    }

    fn key(q: &str, qtype: u16) -> CacheKey {
        CacheKey::from_query(&query(1, q, qtype, false)).unwrap()
    }

    #[test]
    fn keys_ignore_case_but_not_type_or_dnssec_ok() {
        assert_eq!(key("Example.COM.", 1), key("example.com.", 1));
        assert_ne!(key("example.com.", 1), key("example.com.", 28));
        let do_key = CacheKey::from_query(&query(1, "example.com.", 1, true)).unwrap();
        assert_ne!(do_key, key("example.com.", 1));
        assert_eq!(CacheKey::new(&name("EXAMPLE.com."), 1, 1, false, false), key("example.com.", 1));
    }

    #[test]
    fn hit_restores_client_id_and_decrements_ttls() {
        let cache = Cache::new(CacheConfig::default());
        let t0 = Instant::now();
        assert!(cache.insert(key("a.example.", 1), &response(99, "a.example.", 0, &[300, 120], None), t0));
        let hit = cache.get(&key("a.example.", 1), 0x4242, t0 + Duration::from_secs(20)).unwrap();
        assert_eq!(&hit.response[..2], &[0x42, 0x42]);
        // entry TTL is min(300,120)=120: the 300 record is capped to it, then 20 s are taken off.
        assert_eq!(ttls(&hit.response), vec![100, 100]);
        assert_eq!(hit.kind, CacheKind::Success);
        assert!(cache.get(&key("a.example.", 1), 1, t0 + Duration::from_secs(120)).is_none());
    }

    #[test]
    fn ttls_are_clamped_to_min_and_max() {
        let cache = Cache::new(CacheConfig { success_max_ttl: 60, success_min_ttl: 10, ..Default::default() });
        let t0 = Instant::now();
        cache.insert(key("long.", 1), &response(1, "long.", 0, &[86400], None), t0);
        cache.insert(key("short.", 1), &response(1, "short.", 0, &[0], None), t0);
        assert_eq!(ttls(&cache.get(&key("long.", 1), 1, t0).unwrap().response), vec![60]);
        assert!(cache.get(&key("long.", 1), 1, t0 + Duration::from_secs(60)).is_none());
        // TTL 0 is kept for the 10 s minimum but never advertised above what upstream said.
        let hit = cache.get(&key("short.", 1), 1, t0 + Duration::from_secs(9)).unwrap();
        assert_eq!(ttls(&hit.response), vec![0]);
        assert!(cache.get(&key("short.", 1), 1, t0 + Duration::from_secs(10)).is_none());
    }

    #[test]
    fn negative_answers_use_the_soa_minimum() {
        let cache = Cache::new(CacheConfig::default());
        let t0 = Instant::now();
        // NXDOMAIN, SOA TTL 900, MINIMUM 30 -> cached 30 s.
        assert!(cache.insert(key("nx.example.", 1), &response(1, "nx.example.", 3, &[], Some((900, 30))), t0));
        let hit = cache.get(&key("nx.example.", 1), 7, t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(hit.kind, CacheKind::Denial);
        assert_eq!(ttls(&hit.response), vec![20]);
        assert!(cache.get(&key("nx.example.", 1), 7, t0 + Duration::from_secs(30)).is_none());
        // NODATA with SOA TTL below MINIMUM uses the SOA TTL.
        assert!(cache.insert(key("nodata.example.", 28), &response(1, "nodata.example.", 0, &[], Some((40, 600))), t0));
        assert!(cache.get(&key("nodata.example.", 28), 7, t0 + Duration::from_secs(39)).is_some());
        assert!(cache.get(&key("nodata.example.", 28), 7, t0 + Duration::from_secs(40)).is_none());
        // Without an SOA a negative answer is not cached; SERVFAIL never is.
        assert!(!cache.insert(key("nosoa.example.", 1), &response(1, "nosoa.example.", 3, &[], None), t0));
        assert!(!cache.insert(key("fail.example.", 1), &response(1, "fail.example.", 2, &[], Some((60, 60))), t0));
        assert!(cache.get(&key("nosoa.example.", 1), 7, t0).is_none());
    }

    #[test]
    fn popular_entries_near_expiry_signal_prefetch_once() {
        let cache = Cache::new(CacheConfig::default());
        let t0 = Instant::now();
        let k = key("hot.example.", 1);
        cache.insert(k.clone(), &response(1, "hot.example.", 0, &[100], None), t0);
        assert!(!cache.get(&k, 1, t0 + Duration::from_secs(1)).unwrap().prefetch);
        // Second hit, but 50% of the TTL left: no prefetch yet.
        assert!(!cache.get(&k, 1, t0 + Duration::from_secs(50)).unwrap().prefetch);
        // Third hit with 9% left: prefetch, then never again for this entry.
        assert!(cache.get(&k, 1, t0 + Duration::from_secs(91)).unwrap().prefetch);
        assert!(!cache.get(&k, 1, t0 + Duration::from_secs(92)).unwrap().prefetch);
        // A one-hit entry near expiry does not prefetch.
        let cold = key("cold.example.", 1);
        cache.insert(cold.clone(), &response(1, "cold.example.", 0, &[100], None), t0);
        assert!(!cache.get(&cold, 1, t0 + Duration::from_secs(95)).unwrap().prefetch);
    }

    #[test]
    fn expired_entries_are_served_stale_with_ttl_30_within_the_window() {
        let cache = Cache::new(CacheConfig { stale_max: Duration::from_secs(600), ..Default::default() });
        let t0 = Instant::now();
        let k = key("stale.example.", 1);
        cache.insert(k.clone(), &response(1, "stale.example.", 0, &[60], None), t0);
        let later = t0 + Duration::from_secs(300);
        assert!(cache.get(&k, 5, later).is_none());
        let stale = cache.get_stale(&k, 5, later).unwrap();
        assert_eq!(&stale[..2], &[0, 5]);
        assert_eq!(ttls(&stale), vec![30]);
        assert!(cache.get_stale(&k, 5, t0 + Duration::from_secs(660)).is_none());
        // A failed refresh (SERVFAIL) keeps the stale entry.
        assert!(!cache.insert(k.clone(), &response(1, "stale.example.", 2, &[], None), later));
        assert!(cache.get_stale(&k, 5, later).is_some());
    }

    #[test]
    fn entry_count_is_bounded_and_recently_hit_entries_survive() {
        let cache = Cache::new(CacheConfig { max_entries: 8, shards: 1, ..Default::default() });
        let t0 = Instant::now();
        let hot = key("hot.example.", 1);
        cache.insert(hot.clone(), &response(1, "hot.example.", 0, &[300], None), t0);
        for i in 0..100 {
            let q = format!("n{i}.example.");
            assert!(cache.get(&hot, 1, t0).is_some(), "hot entry evicted before insert {i}");
            cache.insert(key(&q, 1), &response(1, &q, 0, &[300], None), t0);
            assert!(cache.len() <= 8);
        }
        assert_eq!(cache.len(), 8);
    }

    #[test]
    fn byte_bound_evicts_large_answers() {
        let cache = Cache::new(CacheConfig { max_bytes: 1000, shards: 1, ..Default::default() });
        let t0 = Instant::now();
        for i in 0..50 {
            let q = format!("n{i}.example.");
            cache.insert(key(&q, 1), &response(1, &q, 0, &[300, 300, 300], None), t0);
        }
        let total: usize = cache.shards.iter().map(|s| s.lock().bytes).sum();
        assert!(total <= 1000, "{total} bytes held");
        assert!(cache.len() > 1);
    }

    #[test]
    fn concurrent_readers_and_writers_keep_the_bounds() {
        let cache = Arc::new(Cache::new(CacheConfig { max_entries: 64, shards: 4, ..Default::default() }));
        let t0 = Instant::now();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let cache = Arc::clone(&cache);
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        let q = format!("n{}.t{t}.example.", i % 300);
                        let k = key(&q, 1);
                        if cache.get(&k, 1, t0).is_none() {
                            cache.insert(k, &response(1, &q, 0, &[60], None), t0);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(cache.len() <= 64, "{} entries", cache.len());
    }

    #[test]
    fn metrics_follow_hits_misses_and_entries() {
        let metrics = Arc::new(Metrics::new("s", &[]));
        let cache =
            Cache::with_metrics(CacheConfig { max_entries: 2, shards: 1, ..Default::default() }, Arc::clone(&metrics));
        let t0 = Instant::now();
        assert!(cache.get(&key("a.", 1), 1, t0).is_none());
        cache.insert(key("a.", 1), &response(1, "a.", 0, &[60], None), t0);
        cache.insert(key("b.", 1), &response(1, "b.", 3, &[], Some((60, 60))), t0);
        cache.get(&key("a.", 1), 1, t0).unwrap();
        cache.get(&key("b.", 1), 1, t0).unwrap();
        assert_eq!(metrics.cache_misses(), 1);
        assert_eq!(metrics.cache_hits(CacheKind::Success), 1);
        assert_eq!(metrics.cache_hits(CacheKind::Denial), 1);
        cache.insert(key("c.", 1), &response(1, "c.", 0, &[60], None), t0);
        assert_eq!(metrics.cache_entries(CacheKind::Success) + metrics.cache_entries(CacheKind::Denial), 2);
    }
}
