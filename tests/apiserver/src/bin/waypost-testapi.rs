//! Runs the test Kubernetes API server standalone, for benchmark and manual scripts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use serde_json::{Value, json};
use waypost_testapi::{Options, TestApiServer, parse_objects};

/// Test Kubernetes API server: list/watch of services, endpointslices, pods, nodes, namespaces.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on (port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// YAML or JSON file of objects to load first (multi-document or `kind: List`).
    #[arg(long)]
    preload: Option<PathBuf>,
    /// Write a kubeconfig for this server here.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Milliseconds between watch bookmarks.
    #[arg(long, default_value_t = 1000)]
    bookmark_interval_ms: u64,
    /// Events kept for watch replay; older resourceVersions get 410 Gone.
    #[arg(long, default_value_t = 10_000)]
    history_limit: usize,
    /// Modify this many EndpointSlices (or Services when there are none) per second, cycling
    /// through them: flips the first endpoint's `ready` condition, or bumps an annotation.
    #[arg(long, default_value_t = 0)]
    churn_per_sec: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let options = Options {
        bookmark_interval: Duration::from_millis(args.bookmark_interval_ms.max(1)),
        history_limit: args.history_limit,
        ..Options::default()
    };
    let api = TestApiServer::start_with(args.listen, options).await?;
    if let Some(path) = &args.preload {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let objs = parse_objects(&text).with_context(|| format!("parsing {}", path.display()))?;
        let count = objs.len();
        api.apply_many(objs)
            .with_context(|| format!("loading {}", path.display()))?;
        eprintln!("loaded {count} objects from {}", path.display());
    }
    if let Some(path) = &args.kubeconfig {
        api.write_kubeconfig(path)?;
    }
    println!("{}", api.url());
    // Churn goes through the Rust API, so every change reaches clients by the watch path.
    let mut interval = tokio::time::interval(Duration::from_secs_f64(
        1.0 / f64::from(args.churn_per_sec.max(1)),
    ));
    let targets = churn_targets(&api)?;
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = interval.tick(), if args.churn_per_sec > 0 && !targets.is_empty() => {
                let (kind, ns, name) = &targets[(n as usize) % targets.len()];
                n += 1;
                if let Some(obj) = api.get(kind, ns, name) {
                    api.update(churned(obj, n)).with_context(|| format!("churning {kind} {ns}/{name}"))?;
                }
            }
        }
    }
    Ok(())
}

/// The objects churn cycles through: EndpointSlices, or Services when there are none.
fn churn_targets(api: &TestApiServer) -> anyhow::Result<Vec<(String, String, String)>> {
    let mut objs = api.list("endpointslices")?;
    if objs.is_empty() {
        objs = api.list("services")?;
    }
    Ok(objs
        .iter()
        .map(|o| {
            let s = |p: &str| {
                o.pointer(p)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            (s("/kind"), s("/metadata/namespace"), s("/metadata/name"))
        })
        .collect())
}

/// One churn step: flips the first endpoint's readiness, or bumps an annotation.
fn churned(mut obj: Value, n: u64) -> Value {
    if let Some(ready) = obj.pointer_mut("/endpoints/0/conditions/ready") {
        let was = ready.as_bool().unwrap_or(true);
        *ready = json!(!was);
    } else if obj.pointer("/endpoints/0").is_some() {
        obj["endpoints"][0]["conditions"] = json!({"ready": false});
    } else {
        if !obj["metadata"]["annotations"].is_object() {
            obj["metadata"]["annotations"] = json!({});
        }
        obj["metadata"]["annotations"]["waypost.test/churn"] = json!(n.to_string());
    }
    obj
}
