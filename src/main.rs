//! The `waypost` binary: parses flags and wires the cluster source, the DNS index and the DNS server together.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

mod resolve;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use waypost_common::Store;
use waypost_common::model::IpPrefix;
use waypost_common::source::state_file::StateFile;
use waypost_dns::server::{self, Handler, SharedIndex};
use waypost_dns::cache::CacheConfig;
use waypost_dns::metrics::Metrics;
use waypost_dns::resolver::{Resolver, ResolverConfig};
use waypost_dns::upstream::{Policy, UpstreamConfig, parse_resolv_conf};
use waypost_dns::{IndexConfig, PodRecords};

/// mimalloc returns freed memory to the system, so the transient cost of parsing a large state
/// file does not stay in the resident set (glibc's allocator kept ~2 GB after loading 10k
/// services with 100k pods).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// waypost: one process per Kubernetes node that is both the cluster DNS server and the
/// service proxy, fed by one watch of the cluster.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve cluster DNS (and forward the rest) from a state file or the Kubernetes API.
    Run(RunArgs),
    /// Replay a pod's resolver: try each search-list candidate of NAME against a DNS server
    /// and show its answer, as `nslookup`/glibc would walk them.
    Resolve(resolve::ResolveArgs),
}

#[derive(Parser, Debug)]
struct RunArgs {
    /// A file with the cluster's objects as `kubectl get svc,endpointslices,pods,nodes -A -o yaml`
    /// (or `-o json`) prints them. It is reloaded whenever it changes; a broken file keeps the
    /// last good state serving.
    #[arg(long, value_name = "PATH")]
    state: Option<PathBuf>,

    /// Watch the Kubernetes API server named by this kubeconfig (its current context) instead
    /// of a state file. With neither --state nor --kubeconfig, waypost uses the in-cluster
    /// config (service account token and KUBERNETES_SERVICE_HOST).
    #[arg(long, value_name = "PATH", conflicts_with = "state")]
    kubeconfig: Option<PathBuf>,

    /// This node's name: waypost watches only this Node object (its zone label and addresses).
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    node_name: Option<String>,

    /// Where to answer DNS, over UDP and TCP. Repeat the flag for several addresses. Port 0
    /// picks a free port (the startup line says which).
    #[arg(long = "dns-listen", value_name = "ADDR", default_values_t = vec![SocketAddr::from(([127, 0, 0, 1], 5353))])]
    dns_listen: Vec<SocketAddr>,

    /// The cluster domain waypost is authoritative for.
    #[arg(long, value_name = "DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,

    /// TTL in seconds of every cluster record, and of negative answers.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    ttl: u32,

    /// Answer `<a-b-c-d>.<namespace>.pod.<domain>`: `disabled` (NXDOMAIN), `insecure` (for any
    /// IP-shaped name, as CoreDNS `pods insecure`), or `verified` (only for IPs of pods known in
    /// that namespace).
    #[arg(long, value_enum, value_name = "MODE", default_value_t = PodMode::Disabled)]
    pod_records: PodMode,

    /// UDP worker threads per listen address (each has its own SO_REUSEPORT socket).
    /// Default: the number of CPUs.
    #[arg(long, value_name = "N")]
    dns_workers: Option<usize>,

    /// A service or pod CIDR (repeatable): reverse lookups inside it are answered from the
    /// cluster (NXDOMAIN when unknown) instead of being forwarded.
    #[arg(long = "reverse-cidr", value_name = "CIDR", value_parser = parse_cidr)]
    reverse_cidrs: Vec<IpPrefix>,

    #[command(flatten)]
    resolver: ResolverArgs,
}

impl RunArgs {
    /// True when no explicit source is given, so waypost runs on the in-cluster config.
    fn in_cluster(&self) -> bool {
        self.state.is_none() && self.kubeconfig.is_none()
    }
}

/// Flags of the resolver for names outside the cluster zone, the cache and metrics.
#[derive(Parser, Debug)]
struct ResolverArgs {
    /// Forward names outside the cluster zone to this resolver (IP, or IP:port). Repeat for
    /// more. Without --upstream or --upstream-resolv-conf, such names are REFUSED.
    #[arg(long = "upstream", value_name = "ADDR", value_parser = parse_upstream)]
    upstreams: Vec<SocketAddr>,

    /// Forward to the nameservers of this resolv.conf (the node's `/etc/resolv.conf` in a
    /// DaemonSet); its `search` line also feeds the search-path shortcut. Defaults to
    /// `/etc/resolv.conf` when running in-cluster.
    #[arg(long, value_name = "PATH")]
    upstream_resolv_conf: Option<PathBuf>,

    /// Which upstream is tried first: `random`, `round-robin` or `sequential`.
    #[arg(long, value_enum, value_name = "POLICY", default_value_t = PolicyArg::Random)]
    upstream_policy: PolicyArg,

    /// Time one upstream has to answer before the next is tried, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    upstream_timeout_ms: u64,

    /// Forwarded queries in flight at once; beyond it clients get REFUSED.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    max_inflight: usize,

    /// Entries in the cache of forwarded answers.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    cache_entries: usize,

    /// Lower bound on how long forwarded answers (positive and negative) are cached, in
    /// seconds; upstream TTLs below it are raised to it.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    cache_min_ttl: u32,

    /// How long past expiry a cached answer may be served when every upstream fails, in
    /// seconds (0 turns serve-stale off).
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    serve_stale: u64,

    /// Answer the first step of a pod's ndots search walk (`<name>.<ns>.svc.<zone>`) for the
    /// first candidate of its search list that exists, as a CNAME plus records, so the client
    /// stops after one round trip.
    #[arg(long, value_enum, value_name = "on|off", default_value_t = OnOff::Off)]
    search_shortcut: OnOff,

    /// Where to serve `/metrics` (Prometheus), `/healthz` and `/readyz`.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9153")]
    metrics_listen: SocketAddr,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PolicyArg {
    Random,
    RoundRobin,
    Sequential,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum OnOff {
    On,
    Off,
}

fn parse_cidr(s: &str) -> Result<IpPrefix, String> {
    waypost_common::convert::parse_prefix(s).ok_or_else(|| format!("{s:?} is not a CIDR such as 10.96.0.0/12"))
}

fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)).map_err(|_| format!("{s:?} is not an IP or IP:port"))
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PodMode {
    Disabled,
    Insecure,
    Verified,
}

impl From<PodMode> for PodRecords {
    fn from(m: PodMode) -> Self {
        match m {
            PodMode::Disabled => PodRecords::Disabled,
            PodMode::Insecure => PodRecords::Insecure,
            PodMode::Verified => PodRecords::Verified,
        }
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            // kube-client logs every failed request; the source reports each episode once instead.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_client=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
        Command::Resolve(args) => {
            if !resolve::run(args)? {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

/// The resolver for names outside the zone, when upstreams are configured.
fn build_resolver(args: &ResolverArgs, in_cluster: bool, metrics: Arc<Metrics>) -> anyhow::Result<Option<Arc<Resolver>>> {
    let mut servers = args.upstreams.clone();
    let mut host_search = Vec::new();
    let resolv_conf = args.upstream_resolv_conf.clone().or_else(|| in_cluster.then(|| PathBuf::from("/etc/resolv.conf")));
    if let Some(path) = &resolv_conf {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading --upstream-resolv-conf {}", path.display()))?;
        if servers.is_empty() {
            servers = parse_resolv_conf(&text);
            if servers.is_empty() {
                bail!("{} has no usable nameserver lines", path.display());
            }
        }
        host_search = resolv_conf_search(&text);
    }
    if servers.is_empty() {
        return Ok(None);
    }
    let mut upstream = UpstreamConfig::new(servers);
    upstream.policy = match args.upstream_policy {
        PolicyArg::Random => Policy::Random,
        PolicyArg::RoundRobin => Policy::RoundRobin,
        PolicyArg::Sequential => Policy::Sequential,
    };
    upstream.timeout = Duration::from_millis(args.upstream_timeout_ms.max(1));
    upstream.max_inflight = args.max_inflight.max(1);
    let cache = CacheConfig {
        max_entries: args.cache_entries.max(1),
        stale_max: Duration::from_secs(args.serve_stale),
        success_min_ttl: args.cache_min_ttl,
        denial_min_ttl: args.cache_min_ttl,
        ..CacheConfig::default()
    };
    let config = ResolverConfig { upstream, cache, search_shortcut: args.search_shortcut == OnOff::On, host_search };
    Ok(Some(Arc::new(Resolver::new(config, metrics)?)))
}

/// The domains of a resolv.conf's last `search` (or `domain`) line.
fn resolv_conf_search(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("search") | Some("domain") => out = words.map(|w| w.trim_end_matches('.').to_string()).collect(),
            _ => {}
        }
    }
    out
}

/// Starts the cluster source that fills `writer`; returns a description for the startup line.
fn start_source(
    args: &RunArgs,
    rt: &tokio::runtime::Runtime,
    writer: waypost_common::Writer,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<String> {
    use waypost_common::source::kube::{self as kube_source, ApiConfig, KubeSourceConfig};
    if let Some(state) = args.state.clone() {
        // Pods cost memory and only verified pod records read them, as with the API source.
        let source = StateFile::new(&state).with_pods(matches!(args.pod_records, PodMode::Verified));
        rt.spawn(source.run(writer, Duration::from_millis(20), shutdown));
        return Ok(format!("state file {}", state.display()));
    }
    let how = match &args.kubeconfig {
        Some(path) => ApiConfig::Kubeconfig(path.clone()),
        None => ApiConfig::InCluster,
    };
    let (client, url) = rt.block_on(kube_source::connect(&how))?;
    let config = KubeSourceConfig {
        watch_pods: matches!(args.pod_records, PodMode::Verified),
        node_name: args.node_name.clone().filter(|n| !n.is_empty()),
    };
    let watching = config.kinds().iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ");
    rt.spawn(kube_source::run(client, config, writer, shutdown));
    let origin = match &how {
        ApiConfig::Kubeconfig(path) => format!("kubeconfig {}", path.display()),
        ApiConfig::InCluster => "in-cluster config".to_string(),
    };
    Ok(format!("the Kubernetes API at {url} ({origin}; watching {watching})"))
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let config = IndexConfig {
        zone: args.cluster_domain.clone(),
        ttl: args.ttl,
        pod_records: args.pod_records.into(),
        reverse_cidrs: args.reverse_cidrs.clone(),
    };
    let workers = args.dns_workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);

    let (store, writer) = Store::new();
    let shared = SharedIndex::new(&config);
    let zone_label = format!("{}.", config.zone.trim_end_matches('.'));
    let metrics = Arc::new(Metrics::new(format!("dns://{}", args.dns_listen[0]), &[&zone_label, "."]));
    let in_cluster = args.in_cluster();
    let resolver = build_resolver(&args.resolver, in_cluster, metrics.clone())?;
    let handler = Handler::with(shared.clone(), resolver.clone(), metrics.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let shutdown = move || {
        let mut rx = shutdown_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let mut bound = Vec::new();
    let mut threads = Vec::new();
    for addr in &args.dns_listen {
        let (udp, tcp) = server::bind_pair(*addr)?;
        let local = udp.local_addr()?;
        bound.push(local);
        let mut sockets = vec![udp];
        for _ in 1..workers {
            sockets.push(server::bind_udp(local)?);
        }
        for (i, s) in sockets.into_iter().enumerate() {
            let (h, stop) = (handler.clone(), stop.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("dns-udp-{i}"))
                    .spawn({
                        let rt = rt.handle().clone();
                        move || server::serve_udp_blocking(s, h, stop, rt)
                    })?,
            );
        }
        let h = handler.clone();
        let sd = shutdown();
        rt.spawn(async move {
            match tokio::net::TcpListener::from_std(tcp) {
                Ok(l) => server::serve_tcp(l, h, sd).await,
                Err(e) => tracing::error!("tcp listener {local}: {e}"),
            }
        });
    }

    if let Some(r) = &resolver {
        for up in r.upstream_addrs() {
            if bound.contains(&up) {
                bail!("forwarding loop: upstream {up} is waypost's own listen address");
            }
        }
        rt.block_on(r.check_loop())?;
    }
    let metrics_listener = rt.block_on(tokio::net::TcpListener::bind(args.resolver.metrics_listen))
        .with_context(|| format!("binding --metrics-listen {}", args.resolver.metrics_listen))?;
    let metrics_addr = metrics_listener.local_addr()?;
    {
        let (m, sd) = (metrics.clone(), shutdown());
        rt.spawn(async move {
            if let Err(e) = waypost_dns::metrics::serve_http(metrics_listener, m, sd).await {
                tracing::error!("metrics listener: {e}");
            }
        });
    }

    let source = start_source(&args, &rt, writer, shutdown())?;
    rt.spawn(server::follow_store(store, config.clone(), shared, metrics.clone(), shutdown()));

    let listen: Vec<String> = bound.iter().map(|a| a.to_string()).collect();
    let forwarding = match &resolver {
        Some(r) => {
            let ups: Vec<String> = r.upstream_addrs().iter().map(|a| a.to_string()).collect();
            format!("forwarding the rest to {}", ups.join(", "))
        }
        None => "refusing other names".to_string(),
    };
    println!(
        "waypost: serving DNS for {} on {} (udp+tcp, {} udp workers each) from {}, {}; metrics on {} (ttl {}s, pod records {:?})",
        config.zone,
        listen.join(", "),
        workers,
        source,
        forwarding,
        metrics_addr,
        config.ttl,
        args.pod_records,
    );

    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("SIGTERM handler")?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        anyhow::Ok(())
    })?;
    tracing::info!("shutting down");
    stop.store(true, Ordering::Relaxed);
    let _ = shutdown_tx.send(true);
    for t in threads {
        let _ = t.join();
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
