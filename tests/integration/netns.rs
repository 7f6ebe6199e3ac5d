//! Pods' real resolvers against waypost: glibc `getent` and busybox `nslookup` in a network namespace whose resolv.conf is a pod's (search list, ndots:5).
//!
//! The namespace gets a veth pair with 10.213.x.0/30 addresses; waypost listens on the root
//! side's address, port 53, and forwards to a stub upstream on loopback that serves
//! `external.example`. Needs root and `ip netns`; without them the test says so loudly, and
//! fails in CI.

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType, rdata::A};

use crate::support::*;

/// A network namespace with a veth pair to the root namespace, removed on drop.
struct Netns {
    /// `ip netns` name.
    name: String,
    /// The root-side address (where waypost listens).
    host_ip: String,
}

fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn ok(args: &[&str]) {
    let out = sh(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Netns {
    /// Creates the namespace, or says why it cannot.
    fn create(tag: &str) -> Result<Netns, String> {
        let is_root = sh(&["id", "-u"]).stdout.starts_with(b"0");
        if !is_root {
            return Err("not running as root".into());
        }
        let n = std::process::id() % 250;
        let name = format!("wpt-{tag}-{}", std::process::id());
        let out = sh(&["ip", "netns", "add", &name]);
        if !out.status.success() {
            return Err(format!("ip netns add failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let ns = Netns { name: name.clone(), host_ip: format!("10.213.{n}.1") };
        let (a, b) = (format!("wpa{tag}{n}"), format!("wpb{tag}{n}"));
        let _ = sh(&["ip", "link", "del", &a]);
        ok(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b]);
        ok(&["ip", "link", "set", &b, "netns", &name]);
        ok(&["ip", "addr", "add", &format!("10.213.{n}.1/30"), "dev", &a]);
        ok(&["ip", "link", "set", &a, "up"]);
        ok(&["ip", "netns", "exec", &name, "ip", "addr", "add", &format!("10.213.{n}.2/30"), "dev", &b]);
        ok(&["ip", "netns", "exec", &name, "ip", "link", "set", &b, "up"]);
        ok(&["ip", "netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        let etc = format!("/etc/netns/{name}");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            format!("{etc}/resolv.conf"),
            format!("search shop.svc.cluster.local svc.cluster.local cluster.local\nnameserver {}\noptions ndots:5\n", ns.host_ip),
        )
        .unwrap();
        Ok(ns)
    }

    fn exec(&self, args: &[&str]) -> (bool, String) {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        let out = sh(&full);
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

/// A stub upstream on loopback: `external.example` A 10.9.9.9, NXDOMAIN for the rest.
struct Stub {
    /// Where it listens.
    addr: SocketAddr,
    /// Queries it saw.
    seen: Arc<AtomicU64>,
    /// Stops its thread.
    stop: Arc<AtomicBool>,
}

impl Stub {
    fn start() -> Stub {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let addr = sock.local_addr().unwrap();
        let (seen, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (s2, st2) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !st2.load(Ordering::Relaxed) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else { continue };
                let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
                s2.fetch_add(1, Ordering::Relaxed);
                let mut r = Message::new(q.metadata.id, MessageType::Response, q.metadata.op_code);
                r.metadata.recursion_available = true;
                r.metadata.recursion_desired = q.metadata.recursion_desired;
                r.queries = q.queries.clone();
                let qq = &q.queries[0];
                if qq.name().to_ascii().eq_ignore_ascii_case("external.example.") {
                    if qq.query_type() == RecordType::A {
                        r.answers.push(Record::from_rdata(qq.name().clone(), 30, RData::A(A::new(10, 9, 9, 9))));
                    }
                } else {
                    r.metadata.response_code = ResponseCode::NXDomain;
                }
                let _ = sock.send_to(&r.to_vec().unwrap(), peer);
            }
        });
        Stub { addr, seen, stop }
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn netns_or_skip(tag: &str) -> Option<Netns> {
    match Netns::create(tag) {
        Ok(n) => Some(n),
        Err(why) => {
            eprintln!("!!! SKIPPED: the network-namespace resolver test cannot run here: {why} !!!");
            assert!(std::env::var("CI").is_err(), "network namespaces are required in CI: {why}");
            None
        }
    }
}

/// Queries waypost counted, for a lookup run in the namespace.
fn queries_for(w: &Waypost, ns: &Netns, args: &[&str]) -> (f64, bool, String) {
    let before = w.metric_sum("coredns_dns_requests_total", &[]);
    let (ok, out) = ns.exec(args);
    (w.metric_sum("coredns_dns_requests_total", &[]) - before, ok, out)
}

#[test]
fn glibc_and_busybox_resolve_through_waypost_and_the_shortcut_cuts_the_walk() {
    let Some(ns) = netns_or_skip("r") else { return };
    let stub = Stub::start();
    let listen = format!("{}:53", ns.host_ip);
    let mut counts = Vec::new();
    for shortcut in ["off", "on"] {
        let w = Waypost::start(
            &fixture(),
            &["--dns-listen", &listen, "--upstream", &stub.addr.to_string(), "--search-shortcut", shortcut, "--cache-entries", "1"],
        );
        // A service in another namespace, through the search list.
        let (n_svc, ok_svc, out) = queries_for(&w, &ns, &["getent", "ahostsv4", "web.other"]);
        assert!(!ok_svc, "web.other does not exist: {out}");
        let (_, ok_svc, out) = queries_for(&w, &ns, &["getent", "hosts", "web.shop"]);
        assert!(ok_svc && out.contains("10.96.1.1  ") && out.contains("web.shop.svc.cluster.local"), "getent hosts web.shop: {out}");
        // A name outside the cluster, through the upstream.
        let (n_ext, ok_ext, out) = queries_for(&w, &ns, &["getent", "ahostsv4", "external.example"]);
        assert!(ok_ext && out.contains("10.9.9.9"), "getent ahostsv4 external.example: {out}");
        // busybox nslookup.
        let (n_bb, ok_bb, out) = queries_for(&w, &ns, &["busybox", "nslookup", "-type=a", "web.shop.svc.cluster.local"]);
        assert!(ok_bb && out.contains("10.96.1.1"), "busybox nslookup: {out}");
        let (n_bb_ext, _, out) = queries_for(&w, &ns, &["busybox", "nslookup", "-type=a", "external.example"]);
        assert!(out.contains("10.9.9.9"), "busybox nslookup external.example: {out}");
        eprintln!(
            "shortcut {shortcut}: queries seen by waypost: glibc external.example {n_ext}, glibc missing web.other {n_svc}, busybox web.shop.svc.cluster.local {n_bb}, busybox external.example {n_bb_ext}"
        );
        counts.push(n_ext);
        drop(w);
    }
    assert!(counts[1] < counts[0], "the shortcut cuts glibc's walk: {counts:?}");
    assert!(stub.seen.load(Ordering::Relaxed) > 0);
}
