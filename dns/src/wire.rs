//! DNS wire format for the hot path: parsing a query in place, encoding prebuilt answers, and patching them into a response.
//!
//! An [`Answer`] is everything after the question section, encoded once at index time as if
//! the question sat at offset 12. The client's question has the same length (only letter case
//! can differ), so compression pointers into it stay valid: a response is the 12-byte header,
//! the client's question copied verbatim (which echoes its case), the prebuilt bytes, and an
//! OPT record when the client sent one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Record types waypost serves.
pub mod rtype {
    /// IPv4 address.
    pub const A: u16 = 1;
    /// Authoritative name server.
    pub const NS: u16 = 2;
    /// Canonical name (alias).
    pub const CNAME: u16 = 5;
    /// Start of authority.
    pub const SOA: u16 = 6;
    /// Reverse pointer.
    pub const PTR: u16 = 12;
    /// Text.
    pub const TXT: u16 = 16;
    /// IPv6 address.
    pub const AAAA: u16 = 28;
    /// Service locator.
    pub const SRV: u16 = 33;
    /// EDNS0 pseudo-record.
    pub const OPT: u16 = 41;
    /// Zone transfer (not served).
    pub const AXFR: u16 = 252;
    /// Incremental zone transfer (not served).
    pub const IXFR: u16 = 251;
    /// Any type.
    pub const ANY: u16 = 255;
}

/// Response codes.
pub mod rcode {
    /// No error.
    pub const NOERROR: u8 = 0;
    /// The query could not be interpreted.
    pub const FORMERR: u8 = 1;
    /// The server failed (e.g. not synced yet).
    pub const SERVFAIL: u8 = 2;
    /// The name does not exist.
    pub const NXDOMAIN: u8 = 3;
    /// The opcode is not implemented.
    pub const NOTIMP: u8 = 4;
    /// The server will not answer this.
    pub const REFUSED: u8 = 5;
}

/// The class IN.
pub const CLASS_IN: u16 = 1;
/// The UDP payload size waypost advertises in its OPT record (the DNS flag day 2020 value).
pub const OUR_UDP_PAYLOAD: u16 = 1232;
/// The longest name in wire format.
pub const MAX_NAME: usize = 255;

/// A prebuilt answer: the flags, the section counts and the bytes after the question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The rcode (low 4 bits).
    pub rcode: u8,
    /// Authoritative answer.
    pub aa: bool,
    /// Answer, authority and additional record counts.
    pub counts: [u16; 3],
    /// The encoded sections.
    pub body: Box<[u8]>,
}

/// A borrowed view of an answer, as stored in the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnswerRef<'a> {
    /// The rcode (low 4 bits).
    pub rcode: u8,
    /// Authoritative answer.
    pub aa: bool,
    /// Answer, authority and additional record counts.
    pub counts: [u16; 3],
    /// The encoded sections.
    pub body: &'a [u8],
}

impl Answer {
    /// A borrowed view.
    pub fn as_ref(&self) -> AnswerRef<'_> {
        AnswerRef { rcode: self.rcode, aa: self.aa, counts: self.counts, body: &self.body }
    }
}

/// Why a query cannot be answered normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Shorter than a header, or a response: drop it without answering.
    #[error("not a DNS query; dropped")]
    Drop,
    /// Malformed after the header: answer FORMERR.
    #[error("malformed query")]
    FormErr,
    /// An opcode other than QUERY: answer NOTIMP.
    #[error("opcode not implemented")]
    NotImp,
    /// EDNS version other than 0: answer BADVERS.
    #[error("unsupported EDNS version")]
    BadVers,
}

/// The EDNS0 part of a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    /// The largest UDP response the client accepts (at least 512).
    pub payload: u16,
    /// DNSSEC OK: echoed back.
    pub dnssec_ok: bool,
}

/// A parsed query; the name is kept lowercased for the index lookup.
#[derive(Debug, Clone)]
pub struct Query {
    /// The query ID.
    pub id: u16,
    /// Recursion desired: echoed back.
    pub rd: bool,
    /// CD bit: echoed back.
    pub cd: bool,
    /// Offset just past the question (qname, qtype, qclass).
    pub question_end: usize,
    /// The query type.
    pub qtype: u16,
    /// The query class.
    pub qclass: u16,
    /// The lowercased qname in wire format, including the root label.
    name: [u8; MAX_NAME],
    /// How many bytes of `name` are used.
    name_len: usize,
    /// The client's EDNS0 options, if it sent an OPT record.
    pub edns: Option<Edns>,
}

impl Query {
    /// The lowercased name in wire format.
    pub fn name(&self) -> &[u8] {
        &self.name[..self.name_len]
    }

    /// The largest response this client takes over UDP.
    pub fn udp_limit(&self) -> usize {
        self.edns.map_or(512, |e| e.payload.max(512) as usize)
    }
}

/// Parses a query. On [`WireError::FormErr`] and others the caller answers with
/// [`error_response`].
pub fn parse_query(msg: &[u8]) -> Result<Query, WireError> {
    if msg.len() < 12 {
        return Err(WireError::Drop);
    }
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    if flags & 0x8000 != 0 {
        return Err(WireError::Drop);
    }
    if (flags >> 11) & 0xF != 0 {
        return Err(WireError::NotImp);
    }
    let count = |i: usize| u16::from_be_bytes([msg[i], msg[i + 1]]);
    if count(4) != 1 {
        return Err(WireError::FormErr);
    }
    let mut q = Query {
        id: count(0),
        rd: flags & 0x0100 != 0,
        cd: flags & 0x0010 != 0,
        question_end: 0,
        qtype: 0,
        qclass: 0,
        name: [0; MAX_NAME],
        name_len: 0,
        edns: None,
    };
    let mut i = 12;
    loop {
        let len = *msg.get(i).ok_or(WireError::FormErr)? as usize;
        if len & 0xC0 != 0 {
            return Err(WireError::FormErr);
        }
        if q.name_len + len + 1 > MAX_NAME {
            return Err(WireError::FormErr);
        }
        let label = msg.get(i..i + 1 + len).ok_or(WireError::FormErr)?;
        let out = &mut q.name[q.name_len..q.name_len + 1 + len];
        for (o, b) in out.iter_mut().zip(label) {
            *o = b.to_ascii_lowercase();
        }
        out[0] = len as u8;
        q.name_len += 1 + len;
        i += 1 + len;
        if len == 0 {
            break;
        }
    }
    let tail = msg.get(i..i + 4).ok_or(WireError::FormErr)?;
    q.qtype = u16::from_be_bytes([tail[0], tail[1]]);
    q.qclass = u16::from_be_bytes([tail[2], tail[3]]);
    i += 4;
    q.question_end = i;
    let rrs = count(6) as usize + count(8) as usize;
    for _ in 0..rrs {
        i = skip_rr(msg, i)?.0;
    }
    let mut bad_version = false;
    for _ in 0..count(10) {
        let (next, rtype, class, ttl) = skip_rr(msg, i)?;
        if rtype == rtype::OPT {
            if q.edns.is_some() || msg[i] != 0 {
                return Err(WireError::FormErr);
            }
            bad_version |= (ttl >> 16) & 0xFF != 0;
            q.edns = Some(Edns { payload: class.max(512), dnssec_ok: ttl & 0x8000 != 0 });
        }
        i = next;
    }
    if i != msg.len() {
        return Err(WireError::FormErr);
    }
    if bad_version {
        return Err(WireError::BadVers);
    }
    Ok(q)
}

/// Skips one resource record; returns the next offset, type, class and TTL.
fn skip_rr(msg: &[u8], mut i: usize) -> Result<(usize, u16, u16, u32), WireError> {
    loop {
        let len = *msg.get(i).ok_or(WireError::FormErr)? as usize;
        match len & 0xC0 {
            0 if len == 0 => {
                i += 1;
                break;
            }
            0 => i += 1 + len,
            0xC0 => {
                i += 2;
                break;
            }
            _ => return Err(WireError::FormErr),
        }
    }
    let f = msg.get(i..i + 10).ok_or(WireError::FormErr)?;
    let rtype = u16::from_be_bytes([f[0], f[1]]);
    let class = u16::from_be_bytes([f[2], f[3]]);
    let ttl = u32::from_be_bytes([f[4], f[5], f[6], f[7]]);
    let rdlen = u16::from_be_bytes([f[8], f[9]]) as usize;
    let end = i + 10 + rdlen;
    if end > msg.len() {
        return Err(WireError::FormErr);
    }
    Ok((end, rtype, class, ttl))
}

/// Writes the response to `q` with the prebuilt `answer` into `out`. With `udp_limit`, a
/// response that does not fit is sent truncated (TC set, no records but OPT).
pub fn write_response(msg: &[u8], q: &Query, answer: AnswerRef<'_>, ra: bool, udp_limit: Option<usize>, out: &mut Vec<u8>) {
    out.clear();
    let opt_len = if q.edns.is_some() { 11 } else { 0 };
    let full = q.question_end + answer.body.len() + opt_len;
    let truncated = udp_limit.is_some_and(|l| full > l);
    let counts = if truncated { [0; 3] } else { answer.counts };
    let mut flags: u16 = 0x8000 | u16::from(answer.rcode & 0xF);
    flags |= u16::from(answer.aa) << 10 | u16::from(truncated) << 9 | u16::from(q.rd) << 8;
    flags |= u16::from(ra) << 7 | u16::from(q.cd) << 4;
    out.reserve(full);
    out.extend_from_slice(&q.id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&counts[0].to_be_bytes());
    out.extend_from_slice(&counts[1].to_be_bytes());
    out.extend_from_slice(&(counts[2] + u16::from(q.edns.is_some())).to_be_bytes());
    out.extend_from_slice(&msg[12..q.question_end]);
    if !truncated {
        out.extend_from_slice(answer.body);
    }
    if let Some(e) = q.edns {
        push_opt(out, e.dnssec_ok, 0);
    }
}

fn push_opt(out: &mut Vec<u8>, dnssec_ok: bool, ext_rcode: u8) {
    out.push(0);
    out.extend_from_slice(&rtype::OPT.to_be_bytes());
    out.extend_from_slice(&OUR_UDP_PAYLOAD.to_be_bytes());
    out.push(ext_rcode);
    out.push(0);
    out.extend_from_slice(&(if dnssec_ok { 0x8000u16 } else { 0 }).to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
}

/// Writes an error response (FORMERR, NOTIMP or BADVERS) to `msg` into `out`, with no
/// question section (it may not have parsed). Returns false when nothing should be sent.
pub fn error_response(msg: &[u8], err: WireError, out: &mut Vec<u8>) -> bool {
    out.clear();
    if msg.len() < 12 || msg[2] & 0x80 != 0 {
        return false;
    }
    let (rcode, ext) = match err {
        WireError::Drop => return false,
        WireError::FormErr => (rcode::FORMERR, 0u8),
        WireError::NotImp => (rcode::NOTIMP, 0),
        // BADVERS is extended rcode 16: upper 8 bits (1) in the OPT TTL, low 4 bits 0.
        WireError::BadVers => (0, 1),
    };
    let rd = msg[2] & 0x01;
    let opcode_bits = msg[2] & 0x78;
    out.extend_from_slice(&msg[0..2]);
    out.push(0x80 | opcode_bits | rd);
    out.push(rcode);
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let with_opt = err == WireError::BadVers;
    out.extend_from_slice(&[0, u8::from(with_opt)]);
    if with_opt {
        push_opt(out, false, ext);
    }
    true
}

/// Writes a response with no records and the given rcode (SERVFAIL before sync, REFUSED
/// outside the zone), echoing the question and EDNS.
pub fn empty_response(msg: &[u8], q: &Query, rcode: u8, ra: bool, out: &mut Vec<u8>) {
    let a = Answer { rcode, aa: false, counts: [0; 3], body: Box::new([]) };
    write_response(msg, q, a.as_ref(), ra, None, out);
}

// === encoding ===

/// Converts a dotted name (`web.shop.svc.cluster.local`, trailing dot optional) to lowercase
/// wire format. `None` if a label is empty or too long, or the name is too long.
pub fn name_to_wire(name: &str) -> Option<Vec<u8>> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let mut out = Vec::with_capacity(name.len() + 2);
    if !name.is_empty() {
        for label in name.split('.') {
            if label.is_empty() || label.len() > 63 {
                return None;
            }
            out.push(label.len() as u8);
            out.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
        }
    }
    out.push(0);
    (out.len() <= MAX_NAME).then_some(out)
}

/// Converts a wire-format name back to dotted text (no trailing dot), for logs and tests.
pub fn wire_to_name(wire: &[u8]) -> String {
    let mut s = String::new();
    let mut i = 0;
    while i < wire.len() && wire[i] != 0 {
        let len = wire[i] as usize;
        if !s.is_empty() {
            s.push('.');
        }
        s.push_str(&String::from_utf8_lossy(&wire[i + 1..(i + 1 + len).min(wire.len())]));
        i += 1 + len;
    }
    s
}

/// The labels of a wire-format name, first to last (without the root).
pub fn labels(wire: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut i = 0;
    std::iter::from_fn(move || {
        let len = *wire.get(i)? as usize;
        if len == 0 {
            return None;
        }
        let l = wire.get(i + 1..i + 1 + len)?;
        i += 1 + len;
        Some(l)
    })
}

/// Record data, with names in lowercase wire format.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rdata {
    /// IPv4 address.
    A(Ipv4Addr),
    /// IPv6 address.
    Aaaa(Ipv6Addr),
    /// Alias target.
    Cname(Vec<u8>),
    /// Reverse target.
    Ptr(Vec<u8>),
    /// Name server.
    Ns(Vec<u8>),
    /// Service locator.
    Srv {
        /// Priority.
        priority: u16,
        /// Weight.
        weight: u16,
        /// Port.
        port: u16,
        /// Target host (never compressed, per RFC 2782).
        target: Vec<u8>,
    },
    /// One text string.
    Txt(String),
    /// Start of authority.
    Soa {
        /// Primary name server.
        mname: Vec<u8>,
        /// Responsible mailbox.
        rname: Vec<u8>,
        /// Serial.
        serial: u32,
        /// Refresh, retry, expire, minimum (negative TTL).
        times: [u32; 4],
    },
}

impl Rdata {
    /// The record type.
    pub fn rtype(&self) -> u16 {
        match self {
            Rdata::A(_) => rtype::A,
            Rdata::Aaaa(_) => rtype::AAAA,
            Rdata::Cname(_) => rtype::CNAME,
            Rdata::Ptr(_) => rtype::PTR,
            Rdata::Ns(_) => rtype::NS,
            Rdata::Srv { .. } => rtype::SRV,
            Rdata::Txt(_) => rtype::TXT,
            Rdata::Soa { .. } => rtype::SOA,
        }
    }

    /// An address record for `ip`.
    pub fn addr(ip: IpAddr) -> Rdata {
        match ip {
            IpAddr::V4(v4) => Rdata::A(v4),
            IpAddr::V6(v6) => Rdata::Aaaa(v6),
        }
    }
}

/// Encodes the sections after a question, with name compression, for one qname.
pub struct AnswerBuilder {
    /// The message so far, starting with a placeholder header and the question.
    buf: Vec<u8>,
    /// Where the body starts (just past the question).
    body_start: usize,
    /// Names already written (lowercase wire suffixes) and their offsets, for compression.
    names: Vec<(Vec<u8>, u16)>,
    /// Records per section.
    counts: [u16; 3],
    /// Which section records go to now (0 answer, 1 authority, 2 additional).
    section: usize,
    /// False for answers shared between questions of different lengths.
    compress: bool,
}

impl AnswerBuilder {
    /// Starts the answer to a question for `qname` (lowercase wire format).
    pub fn new(qname: &[u8]) -> Self {
        let mut b =
            AnswerBuilder { buf: vec![0; 12], body_start: 0, names: Vec::new(), counts: [0; 3], section: 0, compress: true };
        b.write_name(qname, true);
        b.buf.extend_from_slice(&[0, 0, 0, 1]);
        b.body_start = b.buf.len();
        b
    }

    /// Starts an answer that fits any question: no name is compressed, so the bytes do not
    /// depend on where they land (shared negative answers).
    pub fn uncompressed() -> Self {
        AnswerBuilder { buf: Vec::new(), body_start: 0, names: Vec::new(), counts: [0; 3], section: 0, compress: false }
    }

    /// Moves on to the authority (1) or additional (2) section.
    pub fn section(&mut self, s: usize) -> &mut Self {
        debug_assert!(s >= self.section);
        self.section = s;
        self
    }

    /// Appends one record in the current section.
    pub fn record(&mut self, owner: &[u8], ttl: u32, rdata: &Rdata) -> &mut Self {
        self.write_name(owner, true);
        self.buf.extend_from_slice(&rdata.rtype().to_be_bytes());
        self.buf.extend_from_slice(&CLASS_IN.to_be_bytes());
        self.buf.extend_from_slice(&ttl.to_be_bytes());
        let len_at = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        match rdata {
            Rdata::A(ip) => self.buf.extend_from_slice(&ip.octets()),
            Rdata::Aaaa(ip) => self.buf.extend_from_slice(&ip.octets()),
            Rdata::Cname(n) | Rdata::Ptr(n) | Rdata::Ns(n) => self.write_name(n, true),
            Rdata::Srv { priority, weight, port, target } => {
                for v in [priority, weight, port] {
                    self.buf.extend_from_slice(&v.to_be_bytes());
                }
                self.write_name(target, false);
            }
            Rdata::Txt(t) => {
                for chunk in t.as_bytes().chunks(255) {
                    self.buf.push(chunk.len() as u8);
                    self.buf.extend_from_slice(chunk);
                }
                if t.is_empty() {
                    self.buf.push(0);
                }
            }
            Rdata::Soa { mname, rname, serial, times } => {
                self.write_name(mname, true);
                self.write_name(rname, true);
                self.buf.extend_from_slice(&serial.to_be_bytes());
                for t in times {
                    self.buf.extend_from_slice(&t.to_be_bytes());
                }
            }
        }
        let rdlen = (self.buf.len() - len_at - 2) as u16;
        self.buf[len_at..len_at + 2].copy_from_slice(&rdlen.to_be_bytes());
        self.counts[self.section] += 1;
        self
    }

    /// Writes a name, compressed against earlier names when `compress`; every suffix written
    /// in full becomes a compression target.
    fn write_name(&mut self, name: &[u8], compress: bool) {
        let mut i = 0;
        while i < name.len() && name[i] != 0 {
            let suffix = &name[i..];
            if compress && self.compress
                && let Some((_, off)) = self.names.iter().find(|(n, _)| n == suffix) {
                    self.buf.extend_from_slice(&(0xC000 | off).to_be_bytes());
                    return;
                }
            let here = self.buf.len();
            if here < 0x3FFF && self.compress {
                self.names.push((suffix.to_vec(), here as u16));
            }
            let len = name[i] as usize;
            self.buf.extend_from_slice(&name[i..i + 1 + len]);
            i += 1 + len;
        }
        self.buf.push(0);
    }

    /// Finishes the answer.
    pub fn finish(self, rcode: u8, aa: bool) -> Answer {
        Answer { rcode, aa, counts: self.counts, body: self.buf[self.body_start..].into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())];
        for l in name.split('.') {
            m.push(l.len() as u8);
            m.extend_from_slice(l.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        if let Some(p) = edns {
            m.extend_from_slice(&[0, 0, 41]);
            m.extend_from_slice(&p.to_be_bytes());
            m.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        }
        m
    }

    #[test]
    fn parses_a_query_lowercasing_the_name() {
        let m = query("Web.Shop", rtype::A, Some(4096));
        let q = parse_query(&m).unwrap();
        assert_eq!(q.name(), b"\x03web\x04shop\x00");
        assert_eq!(q.qtype, rtype::A);
        assert_eq!(q.udp_limit(), 4096);
        assert_eq!(q.id, 0x1234);
        assert!(q.rd);
    }

    #[test]
    fn rejects_malformed_queries() {
        let mut m = query("a.b", rtype::A, None);
        m.truncate(m.len() - 1);
        assert_eq!(parse_query(&m).unwrap_err(), WireError::FormErr);
        let mut m = query("a.b", rtype::A, None);
        m.push(7);
        assert_eq!(parse_query(&m).unwrap_err(), WireError::FormErr);
        let mut m = query("a.b", rtype::A, None);
        m[5] = 2;
        assert_eq!(parse_query(&m).unwrap_err(), WireError::FormErr);
        assert_eq!(parse_query(&[0; 5]).unwrap_err(), WireError::Drop);
        let mut m = query("a.b", rtype::A, None);
        m[2] |= 0x80;
        assert_eq!(parse_query(&m).unwrap_err(), WireError::Drop);
        let mut m = query("a.b", rtype::A, None);
        m[2] |= 2 << 3;
        assert_eq!(parse_query(&m).unwrap_err(), WireError::NotImp);
    }

    #[test]
    fn response_echoes_question_case_and_compresses_against_it() {
        let qname = name_to_wire("web.shop").unwrap();
        let mut b = AnswerBuilder::new(&qname);
        b.record(&qname, 5, &Rdata::A(Ipv4Addr::new(10, 0, 0, 1)));
        let a = b.finish(rcode::NOERROR, true);
        assert_eq!(&a.body[..2], &[0xC0, 12], "owner points at the question");
        let m = query("WEB.shop", rtype::A, None);
        let q = parse_query(&m).unwrap();
        let mut out = Vec::new();
        write_response(&m, &q, a.as_ref(), false, Some(512), &mut out);
        assert_eq!(&out[12..q.question_end], &m[12..q.question_end]);
        assert_eq!(out[2] & 0x84, 0x84, "QR and AA");
        assert_eq!(&out[6..8], &[0, 1]);
        assert_eq!(&out[out.len() - 4..], &[10, 0, 0, 1]);
    }

    #[test]
    fn oversized_udp_answer_is_truncated() {
        let qname = name_to_wire("big").unwrap();
        let mut b = AnswerBuilder::new(&qname);
        for i in 0..100u8 {
            b.record(&qname, 5, &Rdata::A(Ipv4Addr::new(10, 0, 0, i)));
        }
        let a = b.finish(rcode::NOERROR, true);
        let m = query("big", rtype::A, None);
        let q = parse_query(&m).unwrap();
        let mut out = Vec::new();
        write_response(&m, &q, a.as_ref(), false, Some(q.udp_limit()), &mut out);
        assert!(out.len() <= 512);
        assert_eq!(out[2] & 0x02, 0x02, "TC");
        write_response(&m, &q, a.as_ref(), false, None, &mut out);
        assert_eq!(out.len(), q.question_end + a.body.len());
    }

    #[test]
    fn bad_edns_version_gets_badvers() {
        let mut m = query("a.b", rtype::A, Some(1232));
        let n = m.len();
        m[n - 5] = 1; // version byte of the OPT TTL
        let e = parse_query(&m).unwrap_err();
        assert_eq!(e, WireError::BadVers);
        let mut out = Vec::new();
        assert!(error_response(&m, e, &mut out));
        assert_eq!(&out[10..12], &[0, 1]);
    }
}
