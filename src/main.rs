//! The `waypost` binary: parses flags and wires the cluster source, the DNS index and the DNS server together.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use waypost_common::Store;
use waypost_common::source::state_file::StateFile;
use waypost_dns::server::{self, Handler, SharedIndex};
use waypost_dns::{IndexConfig, PodRecords};

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
    /// Serve cluster DNS from a state file (and, in later versions, the Kubernetes API).
    Run(RunArgs),
}

#[derive(Parser, Debug)]
struct RunArgs {
    /// A file with the cluster's objects as `kubectl get svc,endpointslices,pods,nodes -A -o yaml`
    /// (or `-o json`) prints them. It is reloaded whenever it changes; a broken file keeps the
    /// last good state serving.
    #[arg(long, value_name = "PATH")]
    state: Option<PathBuf>,

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
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
    }
}

/// Starts the cluster source that fills `writer`; returns a description for the startup line.
fn start_source(
    args: &RunArgs,
    rt: &tokio::runtime::Runtime,
    writer: waypost_common::Writer,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<String> {
    let Some(state) = args.state.clone() else {
        bail!("--state PATH is required (the Kubernetes API source is not built yet)");
    };
    let source = StateFile::new(&state);
    rt.spawn(source.run(writer, Duration::from_millis(20), shutdown));
    Ok(format!("state file {}", state.display()))
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let config = IndexConfig { zone: args.cluster_domain.clone(), ttl: args.ttl, pod_records: args.pod_records.into() };
    let workers = args.dns_workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);

    let (store, writer) = Store::new();
    let shared = SharedIndex::new(&config);
    let handler = Handler::new(shared.clone());
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
                    .spawn(move || server::serve_udp_blocking(s, h, stop))?,
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

    let source = start_source(&args, &rt, writer, shutdown())?;
    rt.spawn(server::follow_store(store, config.clone(), shared, |_| {}, shutdown()));

    let listen: Vec<String> = bound.iter().map(|a| a.to_string()).collect();
    println!(
        "waypost: serving DNS for {} on {} (udp+tcp, {} udp workers each) from {} (ttl {}s, pod records {:?})",
        config.zone,
        listen.join(", "),
        workers,
        source,
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
