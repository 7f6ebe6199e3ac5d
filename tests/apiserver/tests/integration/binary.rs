//! The standalone binary: preloads a file, prints its URL, writes a kubeconfig and churns.

use std::process::Stdio;

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::support::{WAIT, next};

const PRELOAD: &str = r#"{"kind": "List", "apiVersion": "v1", "items": [
  {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
   "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
   "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": true}}]},
  {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
   "metadata": {"name": "web-2", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
   "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.2"]}]}
]}"#;

#[tokio::test]
async fn binary_serves_preloaded_objects_and_churns_them_through_watches() {
    let dir = tempfile::tempdir().unwrap();
    let preload = dir.path().join("objects.json");
    std::fs::write(&preload, PRELOAD).unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let mut child = Command::new(env!("CARGO_BIN_EXE_waypost-testapi"))
        .arg("--preload")
        .arg(&preload)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--churn-per-sec", "20"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    let kc = Kubeconfig::read_from(&kubeconfig).unwrap();
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    assert_eq!(config.cluster_url.to_string().trim_end_matches('/'), url);
    let slices: Api<EndpointSlice> = Api::all(Client::try_from(config).unwrap());
    let list = slices.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 2);
    let rv = list.metadata.resource_version.unwrap();
    let mut stream = slices
        .watch(&WatchParams::default().disable_bookmarks(), &rv)
        .await
        .unwrap()
        .boxed();
    assert!(matches!(
        next(&mut stream).await.unwrap().unwrap(),
        WatchEvent::Modified(_)
    ));
    child.kill().await.unwrap();
}
