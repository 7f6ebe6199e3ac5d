//! Helpers shared by the integration tests: servers, kube clients, objects, event waits.

use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::{Value, json};
use waypost_testapi::{Options, TestApiServer};

/// How long any single wait in these tests may take.
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// A server on a free loopback port with fast bookmarks.
pub(crate) async fn server() -> TestApiServer {
    server_with(Options {
        bookmark_interval: Duration::from_millis(200),
        ..Options::default()
    })
    .await
}

/// A server on a free loopback port with the given options.
pub(crate) async fn server_with(options: Options) -> TestApiServer {
    TestApiServer::start_with("127.0.0.1:0".parse().unwrap(), options)
        .await
        .expect("server starts")
}

/// A kube client configured from the server's kubeconfig, as a user's would be.
pub(crate) async fn client(api: &TestApiServer) -> Client {
    let kubeconfig = Kubeconfig::from_yaml(&api.kubeconfig()).expect("kubeconfig parses");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig accepted");
    Client::try_from(config).expect("client builds")
}

/// A Service object with one port and optional labels.
pub(crate) fn svc(ns: &str, name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"ports": [{"port": 80, "protocol": "TCP"}]},
    })
}

/// The next item of a stream, failing the test if none comes within [`WAIT`].
pub(crate) async fn next<S: Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("stream item within the wait")
}

/// Whether a kube error is an API error with this HTTP code.
pub(crate) fn is_code(err: &kube::Error, code: u16) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == code)
}
