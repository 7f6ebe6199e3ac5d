//! The real kube-runtime watcher against the server: initial sync, live events, and recovery
//! after cut watches, 410s, epoch restarts and the server going away.

use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

use crate::support::{WAIT, client, server, svc};

/// A watcher event reduced to something comparable.
fn describe(ev: &watcher::Event<Service>) -> String {
    match ev {
        watcher::Event::Init => "Init".into(),
        watcher::Event::InitApply(s) => format!("InitApply {}", s.name_any()),
        watcher::Event::InitDone => "InitDone".into(),
        watcher::Event::Apply(s) => format!("Apply {}", s.name_any()),
        watcher::Event::Delete(s) => format!("Delete {}", s.name_any()),
    }
}

/// Reads events (skipping errors, which the watcher retries) until `want` is seen; returns
/// everything read.
async fn until<S>(stream: &mut S, want: &str) -> Vec<String>
where
    S: Stream<Item = Result<watcher::Event<Service>, watcher::Error>> + Unpin,
{
    let mut seen = Vec::new();
    let found = tokio::time::timeout(WAIT, async {
        while let Some(item) = stream.next().await {
            if let Ok(ev) = item {
                let d = describe(&ev);
                seen.push(d.clone());
                if d == want {
                    return true;
                }
            }
        }
        false
    })
    .await;
    assert!(
        matches!(found, Ok(true)),
        "did not see {want:?}; saw {seen:?}"
    );
    seen
}

async fn watcher_recovers_from_every_fault(config: watcher::Config) {
    let api = server().await;
    api.create(svc("default", "a", json!({}))).unwrap();
    let svcs: Api<Service> = Api::all(client(&api).await);
    let mut stream = watcher(svcs, config).default_backoff().boxed();

    assert_eq!(
        until(&mut stream, "InitDone").await,
        ["Init", "InitApply a", "InitDone"]
    );
    api.create(svc("default", "b", json!({}))).unwrap();
    assert_eq!(until(&mut stream, "Apply b").await, ["Apply b"]);

    // A cut watch resumes from the last resourceVersion: no relist.
    api.faults().cut_watches();
    api.create(svc("default", "c", json!({}))).unwrap();
    assert_eq!(until(&mut stream, "Apply c").await, ["Apply c"]);

    // A 410 on the resumed watch forces a relist.
    api.faults().cut_watches();
    api.faults().fail_next(1, 410);
    let seen = until(&mut stream, "InitDone").await;
    assert_eq!(
        seen,
        [
            "Init",
            "InitApply a",
            "InitApply b",
            "InitApply c",
            "InitDone"
        ]
    );

    // A new epoch: every held resourceVersion is too old, so the watcher relists.
    api.new_epoch();
    let seen = until(&mut stream, "InitDone").await;
    assert_eq!(seen.first().map(String::as_str), Some("Init"));

    // Server down, a change meanwhile, server back on the same port: the watcher resumes.
    api.stop().await;
    api.delete("svc", "default", "a").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.restart().await.unwrap();
    until(&mut stream, "Delete a").await;

    // Transient 500s are retried.
    api.faults().cut_watches();
    api.faults().fail_next(2, 500);
    api.create(svc("default", "d", json!({}))).unwrap();
    until(&mut stream, "Apply d").await;
}

#[tokio::test]
async fn list_watch_watcher_syncs_and_recovers() {
    watcher_recovers_from_every_fault(watcher::Config::default()).await;
}

#[tokio::test]
async fn paged_list_watch_watcher_syncs_and_recovers() {
    watcher_recovers_from_every_fault(watcher::Config::default().page_size(1)).await;
}

#[tokio::test]
async fn streaming_list_watcher_syncs_and_recovers() {
    watcher_recovers_from_every_fault(watcher::Config::default().streaming_lists()).await;
}
