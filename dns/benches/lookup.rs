//! Criterion benchmarks of the DNS hot path at 10k services: parse + lookup + encode per query, and rebuilding the index after one service changes.
#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use waypost_common::model::*;
use waypost_common::{Object, ObjectKey, Store, Writer};
use waypost_dns::server::{Handler, SharedIndex, Transport};
use waypost_dns::{IndexBuilder, IndexConfig};

const SERVICES: usize = 10_000;

fn service(i: usize, headless: bool) -> Service {
    Service {
        key: ObjectKey::new(format!("ns-{}", i % 200), format!("svc-{i}")),
        service_type: ServiceType::ClusterIp,
        cluster_ips: if headless { vec![] } else { vec![IpAddr::V4(Ipv4Addr::from(0x0A60_0000 + i as u32))] },
        headless,
        ports: vec![ServicePort {
            name: Some("http".into()),
            protocol: Protocol::Tcp,
            port: 80,
            target_port: TargetPort::Number(8080),
            node_port: None,
        }],
        external_name: None,
        publish_not_ready_addresses: false,
        internal_traffic_policy: TrafficPolicy::Cluster,
        external_traffic_policy: TrafficPolicy::Cluster,
        session_affinity: SessionAffinity::None,
        traffic_distribution: None,
        load_balancer_ingress: vec![],
        external_ips: vec![],
        load_balancer_source_ranges: vec![],
        health_check_node_port: None,
    }
}

fn slice(svc: &Service, i: usize, n: usize, ready_flip: bool) -> EndpointSlice {
    EndpointSlice {
        key: ObjectKey::new(svc.key.namespace.clone(), format!("{}-abc", svc.key.name)),
        service_name: svc.key.name.clone(),
        address_type: AddressType::Ipv4,
        endpoints: (0..n)
            .map(|j| Endpoint {
                addresses: vec![IpAddr::V4(Ipv4Addr::from(0x0A80_0000 + (i * 8 + j) as u32))].into(),
                ready: !(ready_flip && j == 0),
                serving: true,
                terminating: false,
                hostname: None,
                node_name: Some("node-1".into()),
                zone: None,
                hint_zones: Box::new([]),
                hint_nodes: Box::new([]),
                target_ref: None,
            })
            .collect(),
        ports: vec![EndpointPort { name: Some("http".into()), protocol: Protocol::Tcp, port: Some(8080) }],
    }
}

/// 10k services, every tenth headless; each with a slice of three endpoints.
fn cluster() -> (Arc<Store>, Writer) {
    let (store, mut w) = Store::new();
    for i in 0..SERVICES {
        let s = service(i, i % 10 == 0);
        w.apply(Object::EndpointSlice(Arc::new(slice(&s, i, 3, false))));
        w.apply(Object::Service(Arc::new(s)));
    }
    w.mark_synced();
    w.commit();
    (store, w)
}

fn query(name: &str, qtype: u16) -> Vec<u8> {
    let mut m = vec![0xAB, 0xCD, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1];
    for l in name.split('.') {
        m.push(l.len() as u8);
        m.extend_from_slice(l.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&[0, 1, 0, 0, 41, 4, 0xD0, 0, 0, 0, 0, 0, 0]);
    m
}

fn bench(c: &mut Criterion) {
    let (store, _w) = cluster();
    let config = IndexConfig::default();
    let mut builder = IndexBuilder::new(config.clone());
    let index = builder.apply(&store.load());
    let shared = SharedIndex::new(&config);
    shared.store(index);
    let handler = Handler::new(shared);
    let mut out = Vec::with_capacity(4096);
    let peer: std::net::SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let cases = [
        ("a_hit", query("svc-4321.ns-121.svc.cluster.local", 1)),
        ("aaaa_nodata", query("svc-4321.ns-121.svc.cluster.local", 28)),
        ("srv_headless", query("_http._tcp.svc-4320.ns-120.svc.cluster.local", 33)),
        ("nxdomain_search_path", query("svc-4321.ns-121.svc.cluster.local.ns-121.svc.cluster.local", 1)),
    ];
    let mut g = c.benchmark_group("respond_10k_services");
    for (name, q) in &cases {
        assert!(matches!(handler.respond(q, Transport::Udp, peer, &mut out), waypost_dns::server::Outcome::Reply));
        g.bench_function(*name, |b| b.iter(|| handler.respond(black_box(q), Transport::Udp, peer, &mut out)));
    }
    g.finish();

    // Rebuild after one service's endpoints change, at 10k services.
    let (store, mut w) = cluster();
    let mut builder = IndexBuilder::new(config);
    builder.apply(&store.load());
    let s = service(4321, false);
    let mut flip = false;
    c.bench_function("rebuild_one_changed_service_10k", |b| {
        b.iter_batched(
            || {
                flip = !flip;
                w.apply(Object::EndpointSlice(Arc::new(slice(&s, 4321, 3, flip))));
                w.commit().unwrap()
            },
            |snap| builder.apply(&snap),
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
