//! `waypost-clustergen`: synthetic clusters, zone files and dnsperf queries for DNS benchmarks, plus churn, report and plots.

mod churn;
mod kube;
mod model;
mod plot;
mod queries;
mod results;
mod rng;
mod yaml;
mod zone;

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::model::{CountRange, Params};

/// Generates a synthetic Kubernetes cluster (state.yaml), the same DNS records as a zone file
/// (cluster.local.zone) and a dnsperf query file (queries.txt); or churns, reports and plots.
///
/// Without a subcommand it behaves as `gen`.
#[derive(Parser, Debug)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    /// What to do; `gen` when left out.
    #[command(subcommand)]
    command: Option<Command>,
    /// Arguments of the default `gen` command.
    #[command(flatten)]
    gen_args: Option<GenArgs>,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
enum Command {
    /// Writes state.yaml, <zone>.zone and queries.txt into --out.
    Gen(GenArgs),
    /// Rewrites --out/state.yaml with one changed EndpointSlice at --rate per second.
    Churn(ChurnArgs),
    /// Summarises a results directory: summary.csv, summary.json and a markdown table on stdout.
    Report(ResultsArgs),
    /// Draws the SVG plots of a results directory.
    Plot(ResultsArgs),
}

/// What cluster to generate and where.
#[derive(Args, Debug, Clone)]
struct GenArgs {
    /// Number of Services.
    #[arg(long)]
    services: usize,
    /// Seed for every random choice; the same seed gives the same files.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Cluster domain.
    #[arg(long, default_value = "cluster.local")]
    zone: String,
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Services per namespace.
    #[arg(long, default_value_t = 50)]
    services_per_namespace: usize,
    /// Percent of services that are headless.
    #[arg(long, default_value_t = 10)]
    headless_percent: u32,
    /// Percent of services that are ExternalName.
    #[arg(long, default_value_t = 5)]
    external_percent: u32,
    /// Percent of ClusterIP services that are dual-stack (IPv4 + IPv6).
    #[arg(long, default_value_t = 20)]
    dual_stack_percent: u32,
    /// Endpoints (and pods) per ClusterIP service: N or A-B.
    #[arg(long, default_value = "1")]
    endpoints_per_clusterip: CountRange,
    /// Endpoints (and pods) per headless service: N or A-B.
    #[arg(long, default_value = "3-10")]
    endpoints_per_headless: CountRange,
    /// Percent of endpoints that are not ready.
    #[arg(long, default_value_t = 5)]
    not_ready_percent: u32,
    /// Pods that back no service.
    #[arg(long, default_value_t = 0)]
    extra_pods: usize,
    /// Number of Nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Lines in queries.txt.
    #[arg(long, default_value_t = 100_000)]
    queries: usize,
}

impl GenArgs {
    /// The generator parameters these flags describe.
    fn params(&self) -> Params {
        Params {
            services: self.services,
            seed: self.seed,
            zone: self.zone.trim_end_matches('.').to_string(),
            services_per_namespace: self.services_per_namespace,
            headless_percent: self.headless_percent,
            external_percent: self.external_percent,
            dual_stack_percent: self.dual_stack_percent,
            endpoints_per_clusterip: self.endpoints_per_clusterip,
            endpoints_per_headless: self.endpoints_per_headless,
            not_ready_percent: self.not_ready_percent,
            extra_pods: self.extra_pods,
            nodes: self.nodes,
        }
    }
}

/// Churn: the cluster flags of `gen` plus rate and duration.
#[derive(Args, Debug)]
struct ChurnArgs {
    /// The same cluster flags given to `gen` (the state file is regenerated from them).
    #[command(flatten)]
    cluster: GenArgs,
    /// State changes per second.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// How long to churn, in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
}

/// A results directory written by benches/dns-bench.sh.
#[derive(Args, Debug)]
struct ResultsArgs {
    /// The directory holding runs.csv and lat-*.txt.
    #[arg(long)]
    results: PathBuf,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match (cli.command, cli.gen_args) {
        (Some(Command::Gen(a)), _) | (None, Some(a)) => generate(&a),
        (Some(Command::Churn(a)), _) => {
            churn::run(&a.cluster.params(), &a.cluster.out, a.rate, a.duration)
        }
        (Some(Command::Report(a)), _) => results::report(&a.results),
        (Some(Command::Plot(a)), _) => plot::plot(&a.results),
        (None, None) => {
            use clap::CommandFactory;
            Cli::command().print_help()?;
            std::process::exit(2);
        }
    }
}

/// Creates `path` for buffered writing, naming it in errors.
fn create(path: &Path) -> Result<BufWriter<File>> {
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    Ok(BufWriter::with_capacity(1 << 20, f))
}

/// The `gen` command.
fn generate(a: &GenArgs) -> Result<()> {
    let p = a.params();
    fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let cluster = model::generate(&p);

    let mut versions = kube::Versions::new();
    let items = kube::objects(&cluster, &mut versions)
        .iter()
        .map(kube::list_item)
        .collect::<Result<Vec<_>>>()?;
    let mut w = create(&a.out.join("state.yaml"))?;
    kube::write_list(&mut w, items.iter().map(String::as_str))?;
    w.flush()?;

    let records = zone::records(&cluster);
    let mut w = create(&a.out.join(format!("{}.zone", p.zone)))?;
    zone::write_zone(&mut w, &p.zone, &records)?;
    w.flush()?;

    let mut rng = rng::Rng::new(p.seed.wrapping_add(0x7175_6572_7921));
    let lines = queries::queries(&cluster, a.queries, &mut rng)?;
    let mut w = create(&a.out.join("queries.txt"))?;
    queries::write_queries(&mut w, &lines)?;
    w.flush()?;

    let endpoints: usize = cluster.services.iter().map(|s| s.endpoints.len()).sum();
    eprintln!(
        "waypost-clustergen: {} services in {} namespaces, {} endpoints, {} pods, {} nodes, {} records, {} queries -> {}",
        cluster.services.len(),
        cluster.namespaces.len(),
        endpoints,
        endpoints + cluster.lone_pods.len(),
        cluster.nodes.len(),
        records.len(),
        lines.len(),
        a.out.display()
    );
    Ok(())
}
