//! Each fault switch, seen through the kube-rs client.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use serde_json::json;

use crate::support::{WAIT, client, is_code, next, server, svc};

#[tokio::test]
async fn cut_ends_every_open_watch() {
    let api = server().await;
    let svcs: Api<Service> = Api::all(client(&api).await);
    let mut one = svcs
        .watch(&WatchParams::default().disable_bookmarks(), "0")
        .await
        .unwrap()
        .boxed();
    let mut two = svcs
        .watch(&WatchParams::default().disable_bookmarks(), "0")
        .await
        .unwrap()
        .boxed();
    assert!(api.wait_for_watches(2, WAIT).await);
    assert_eq!(api.open_watches(), 2);
    api.faults().cut_watches();
    assert!(next(&mut one).await.is_none());
    assert!(next(&mut two).await.is_none());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(api.open_watches(), 0);
}

#[tokio::test]
async fn fail_next_answers_that_many_requests_with_the_code() {
    let api = server().await;
    let svcs: Api<Service> = Api::all(client(&api).await);
    api.faults().fail_next(2, 500);
    assert!(is_code(
        &svcs.list(&ListParams::default()).await.unwrap_err(),
        500
    ));
    assert!(is_code(
        &svcs.list(&ListParams::default()).await.unwrap_err(),
        500
    ));
    svcs.list(&ListParams::default()).await.unwrap();

    api.faults().fail_all(500); // kube 5 retries 429/503/504 itself (up to 15 times)
    for _ in 0..3 {
        assert!(is_code(
            &svcs.list(&ListParams::default()).await.unwrap_err(),
            500
        ));
    }
    api.faults().clear();
    svcs.list(&ListParams::default()).await.unwrap();

    // 410 on a watch comes in-stream, as the real server sends it.
    api.faults().fail_next(1, 410);
    let mut stream = svcs
        .watch(&WatchParams::default(), "1")
        .await
        .unwrap()
        .boxed();
    assert!(
        matches!(next(&mut stream).await.unwrap().unwrap(), WatchEvent::Error(s) if s.code == 410)
    );
    api.faults().fail_next(1, 410);
    assert!(is_code(
        &svcs.list(&ListParams::default()).await.unwrap_err(),
        410
    ));
}

#[tokio::test]
async fn stall_holds_requests_and_watch_events_until_cleared() {
    let api = server().await;
    let svcs: Api<Service> = Api::all(client(&api).await);
    let mut stream = svcs
        .watch(
            &WatchParams::default().disable_bookmarks(),
            &api.resource_version().to_string(),
        )
        .await
        .unwrap()
        .boxed();
    api.faults().stall();
    api.create(svc("default", "a", json!({}))).unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.next())
            .await
            .is_err(),
        "no events while stalled"
    );
    let held = tokio::spawn({
        let svcs = svcs.clone();
        async move { svcs.list(&ListParams::default()).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "requests are held while stalled");
    api.faults().clear();
    let list = tokio::time::timeout(WAIT, held)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(list.items.len(), 1);
    assert!(
        matches!(next(&mut stream).await.unwrap().unwrap(), WatchEvent::Added(s) if s.name_any() == "a")
    );
}

#[tokio::test]
async fn new_epoch_expires_every_older_resource_version() {
    let api = server().await;
    api.create(svc("default", "a", json!({}))).unwrap();
    let old = api.resource_version();
    let svcs: Api<Service> = Api::all(client(&api).await);
    let mut open = svcs
        .watch(&WatchParams::default(), &old.to_string())
        .await
        .unwrap()
        .boxed();
    let new = api.new_epoch();
    assert!(new >= 1_000_000, "{new}");
    assert!(next(&mut open).await.is_none(), "open watches are cut");
    let mut stream = svcs
        .watch(&WatchParams::default(), &old.to_string())
        .await
        .unwrap()
        .boxed();
    assert!(
        matches!(next(&mut stream).await.unwrap().unwrap(), WatchEvent::Error(s) if s.code == 410)
    );
    let list = svcs.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.metadata.resource_version, Some(new.to_string()));
    assert_eq!(list.items.len(), 1, "objects survive the epoch change");

    let rv = api.replace_state([svc("default", "b", json!({}))]).unwrap();
    let names: Vec<String> = svcs
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|s| s.name_any())
        .collect();
    assert_eq!(names, ["b"]);
    assert!(rv > new);
}

#[tokio::test]
async fn stop_and_start_on_the_same_port_keeps_state() {
    let api = server().await;
    let addr = api.addr();
    api.create(svc("default", "a", json!({}))).unwrap();
    let svcs: Api<Service> = Api::all(client(&api).await);
    let mut stream = svcs
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    assert!(matches!(
        next(&mut stream).await.unwrap().unwrap(),
        WatchEvent::Added(_)
    ));
    api.stop().await;
    assert!(!api.is_running());
    // The broken connection ends the stream (with or without an error item).
    loop {
        match next(&mut stream).await {
            None => break,
            Some(Err(_)) => {}
            Some(Ok(WatchEvent::Bookmark(_))) => {}
            Some(Ok(other)) => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        svcs.list(&ListParams::default()).await.is_err(),
        "nothing listens while stopped"
    );
    api.create(svc("default", "b", json!({}))).unwrap();
    api.start_on(addr).await.unwrap();
    assert_eq!(api.addr(), addr);
    let list = svcs.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 2);
}

#[tokio::test]
async fn control_endpoint_switches_faults_over_http() {
    let api = server().await;
    let c = client(&api).await;
    let post = |path: &str| hyper::http::Request::post(path).body(Vec::new()).unwrap();
    c.request_text(post("/_test/fault/fail?code=500&count=1"))
        .await
        .unwrap();
    let svcs: Api<Service> = Api::all(c.clone());
    assert!(is_code(
        &svcs.list(&ListParams::default()).await.unwrap_err(),
        500
    ));
    svcs.list(&ListParams::default()).await.unwrap();

    c.request_text(post("/_test/fault/down?ms=300"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!api.is_running());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(api.is_running());
    svcs.list(&ListParams::default()).await.unwrap();

    c.request_text(post("/_test/fault/epoch")).await.unwrap();
    assert!(api.resource_version() >= 1_000_000);
    let state: serde_json::Value = serde_json::from_str(
        &c.request_text(
            hyper::http::Request::get("/_test/state")
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    assert_eq!(state["resourceVersion"], api.resource_version().to_string());
}
