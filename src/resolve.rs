//! `waypost resolve`: replays a pod's resolver (search list and ndots) against a DNS server and shows every step.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::Context;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};

/// What to resolve and as which pod.
#[derive(clap::Parser, Debug)]
pub(crate) struct ResolveArgs {
    /// The name as the application would look it up (e.g. `web.shop` or `api.github.com`).
    name: String,
    /// The pod's namespace: the first search domain is `<namespace>.svc.<domain>`.
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// Names with fewer dots than this are tried with the search domains first (kubelet sets 5).
    #[arg(long, default_value_t = 5)]
    ndots: usize,
    /// The DNS server to ask.
    #[arg(long, default_value = "127.0.0.1:5353")]
    server: SocketAddr,
    /// The cluster domain.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// Extra search domains after the cluster ones (the node's, as kubelet appends them).
    #[arg(long = "search", value_name = "DOMAIN")]
    extra_search: Vec<String>,
    /// The record type to ask for.
    #[arg(long = "type", short = 't', default_value = "A")]
    rtype: String,
}

/// The names a pod's resolver tries, in order.
pub(crate) fn candidates(name: &str, namespace: &str, domain: &str, extra: &[String], ndots: usize) -> Vec<String> {
    if let Some(abs) = name.strip_suffix('.') {
        return vec![format!("{abs}.")];
    }
    let domain = domain.trim_end_matches('.');
    let mut search = vec![format!("{namespace}.svc.{domain}"), format!("svc.{domain}"), domain.to_string()];
    search.extend(extra.iter().map(|d| d.trim_end_matches('.').to_string()));
    let searched: Vec<String> = search.iter().map(|d| format!("{name}.{d}.")).collect();
    let absolute = format!("{name}.");
    if name.matches('.').count() >= ndots {
        std::iter::once(absolute).chain(searched).collect()
    } else {
        searched.into_iter().chain(std::iter::once(absolute)).collect()
    }
}

fn exchange(server: SocketAddr, name: &str, rtype: RecordType) -> anyhow::Result<Message> {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).with_context(|| format!("{name:?} is not a DNS name"))?, rtype));
    let bytes = m.to_vec()?;
    let sock = UdpSocket::bind(if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    sock.set_read_timeout(Some(Duration::from_secs(3)))?;
    sock.send_to(&bytes, server)?;
    let mut buf = vec![0u8; 65535];
    let n = sock.recv(&mut buf).with_context(|| format!("no answer from {server}"))?;
    let resp = Message::from_vec(&buf[..n])?;
    if !resp.metadata.truncation {
        return Ok(resp);
    }
    let mut tcp = TcpStream::connect_timeout(&server, Duration::from_secs(3))?;
    tcp.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    tcp.write_all(&framed)?;
    let mut len = [0u8; 2];
    tcp.read_exact(&mut len)?;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    tcp.read_exact(&mut buf)?;
    Ok(Message::from_vec(&buf)?)
}

/// Runs the walk; prints each candidate and the result. Returns whether the name resolved.
pub(crate) fn run(args: ResolveArgs) -> anyhow::Result<bool> {
    let rtype: RecordType = args.rtype.to_ascii_uppercase().parse().with_context(|| format!("unknown type {}", args.rtype))?;
    let list = candidates(&args.name, &args.namespace, &args.cluster_domain, &args.extra_search, args.ndots);
    println!(
        "resolving {:?} {} as a pod in namespace {:?} (ndots:{}) via {}",
        args.name, rtype, args.namespace, args.ndots, args.server
    );
    for (i, cand) in list.iter().enumerate() {
        let resp = exchange(args.server, cand, rtype)?;
        let rcode = resp.metadata.response_code;
        let answers: Vec<String> = resp.answers.iter().map(|r| format!("{} {} {}", r.name, r.record_type(), r.data)).collect();
        println!("  {}. {cand:<60} {rcode:?}{}", i + 1, if answers.is_empty() { " (no records)".into() } else { String::new() });
        for a in &answers {
            println!("       {a}");
        }
        if rcode == ResponseCode::NoError && !answers.is_empty() {
            println!("result: {cand} after {} queries", i + 1);
            return Ok(true);
        }
        if rcode != ResponseCode::NXDomain && rcode != ResponseCode::NoError {
            println!("result: {rcode:?} from {} stops the walk (a resolver gives up on errors other than NXDOMAIN)", args.server);
            return Ok(false);
        }
    }
    println!("result: not found after {} queries", list.len());
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_try_the_search_list_first_and_long_names_go_absolute_first() {
        let c = candidates("web.shop", "default", "cluster.local", &[], 5);
        assert_eq!(
            c,
            [
                "web.shop.default.svc.cluster.local.",
                "web.shop.svc.cluster.local.",
                "web.shop.cluster.local.",
                "web.shop."
            ]
        );
        let c = candidates("a.b.c.d.e.f", "ns", "cluster.local", &["corp".into()], 5);
        assert_eq!(c[0], "a.b.c.d.e.f.");
        assert_eq!(c.last().unwrap(), "a.b.c.d.e.f.corp.");
        assert_eq!(candidates("x.", "ns", "cluster.local", &[], 5), ["x."]);
    }
}
