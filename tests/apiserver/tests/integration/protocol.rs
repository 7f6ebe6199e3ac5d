//! List, watch and write semantics as seen through the kube-rs client.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, VersionMatch, WatchEvent,
    WatchParams,
};
use serde_json::json;
use waypost_testapi::Options;

use crate::support::{WAIT, client, is_code, next, server, server_with, svc};

#[tokio::test]
async fn list_pages_a_snapshot_without_duplicates_or_misses() {
    let api = server().await;
    for i in 0..25 {
        api.create(svc("default", &format!("svc-{i:02}"), json!({})))
            .unwrap();
    }
    for i in 0..5 {
        api.create(svc("other", &format!("o-{i}"), json!({})))
            .unwrap();
    }
    let all: Api<Service> = Api::all(client(&api).await);
    let first = all.list(&ListParams::default().limit(10)).await.unwrap();
    assert_eq!(first.items.len(), 10);
    assert_eq!(first.metadata.remaining_item_count, Some(20));
    let snapshot_rv = first.metadata.resource_version.clone().unwrap();

    // Changes between pages must not show in the later pages.
    api.create(svc("default", "svc-aa-new", json!({}))).unwrap();
    api.delete("svc", "other", "o-4").unwrap();

    let mut names: Vec<String> = first
        .items
        .iter()
        .map(|s| format!("{}/{}", s.namespace().unwrap(), s.name_any()))
        .collect();
    let mut token = first.metadata.continue_;
    while let Some(t) = token.filter(|t| !t.is_empty()) {
        let page = all
            .list(&ListParams::default().limit(10).continue_token(&t))
            .await
            .unwrap();
        assert_eq!(
            page.metadata.resource_version.as_deref(),
            Some(snapshot_rv.as_str())
        );
        names.extend(
            page.items
                .iter()
                .map(|s| format!("{}/{}", s.namespace().unwrap(), s.name_any())),
        );
        token = page.metadata.continue_;
    }
    let unique: BTreeSet<&String> = names.iter().collect();
    assert_eq!(names.len(), 30);
    assert_eq!(unique.len(), 30);
    assert!(names.contains(&"other/o-4".to_string()));

    let fresh = all.list(&ListParams::default()).await.unwrap();
    assert_eq!(fresh.items.len(), 30);
    assert!(fresh.items.iter().any(|s| s.name_any() == "svc-aa-new"));

    // An exact list at the old resourceVersion still sees the old state.
    let exact = all
        .list(
            &ListParams::default()
                .at(&snapshot_rv)
                .matching(VersionMatch::Exact),
        )
        .await
        .unwrap();
    assert!(exact.items.iter().any(|s| s.name_any() == "o-4"));
    assert!(!exact.items.iter().any(|s| s.name_any() == "svc-aa-new"));
}

#[tokio::test]
async fn list_honours_label_and_field_selectors() {
    let api = server().await;
    api.create(svc("default", "a", json!({"app": "web", "tier": "front"})))
        .unwrap();
    api.create(svc("default", "b", json!({"app": "db"})))
        .unwrap();
    api.create(svc("kube-system", "c", json!({"app": "web"})))
        .unwrap();
    let all: Api<Service> = Api::all(client(&api).await);
    let names = |l: kube::core::ObjectList<Service>| {
        l.items.iter().map(|s| s.name_any()).collect::<Vec<_>>()
    };
    assert_eq!(
        names(
            all.list(&ListParams::default().labels("app=web"))
                .await
                .unwrap()
        ),
        ["a", "c"]
    );
    assert_eq!(
        names(
            all.list(&ListParams::default().labels("app!=web"))
                .await
                .unwrap()
        ),
        ["b"]
    );
    assert_eq!(
        names(
            all.list(&ListParams::default().labels("tier"))
                .await
                .unwrap()
        ),
        ["a"]
    );
    assert_eq!(
        names(
            all.list(&ListParams::default().labels("app=web,!tier"))
                .await
                .unwrap()
        ),
        ["c"]
    );
    assert_eq!(
        names(
            all.list(&ListParams::default().fields("metadata.name=b"))
                .await
                .unwrap()
        ),
        ["b"]
    );
    let by_ns = all
        .list(&ListParams::default().fields("metadata.namespace=kube-system"))
        .await
        .unwrap();
    assert_eq!(names(by_ns), ["c"]);
    let ns: Api<Service> = Api::namespaced(client(&api).await, "default");
    assert_eq!(
        names(ns.list(&ListParams::default()).await.unwrap()),
        ["a", "b"]
    );
}

#[tokio::test]
async fn watch_replays_events_after_the_given_resource_version() {
    let api = server().await;
    api.create(svc("default", "a", json!({}))).unwrap();
    let start = api.resource_version();
    api.create(svc("default", "b", json!({}))).unwrap();
    let mut a = api.get("svc", "default", "a").unwrap();
    a["spec"]["ports"][0]["port"] = json!(8080);
    api.update(a).unwrap();
    api.delete("svc", "default", "b").unwrap();

    let svcs: Api<Service> = Api::namespaced(client(&api).await, "default");
    let mut stream = svcs
        .watch(
            &WatchParams::default().disable_bookmarks(),
            &start.to_string(),
        )
        .await
        .unwrap()
        .boxed();
    let mut seen = Vec::new();
    for _ in 0..3 {
        match next(&mut stream).await.unwrap().unwrap() {
            WatchEvent::Added(s) => seen.push(format!("ADDED {}", s.name_any())),
            WatchEvent::Modified(s) => seen.push(format!("MODIFIED {}", s.name_any())),
            WatchEvent::Deleted(s) => seen.push(format!("DELETED {}", s.name_any())),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["ADDED b", "MODIFIED a", "DELETED b"]);

    // Live events follow the replay.
    api.create(svc("default", "c", json!({}))).unwrap();
    match next(&mut stream).await.unwrap().unwrap() {
        WatchEvent::Added(s) => {
            assert_eq!(s.name_any(), "c");
            assert_eq!(
                s.resource_version(),
                Some(api.resource_version().to_string())
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn watch_with_selector_sees_objects_leave_and_enter_it() {
    let api = server().await;
    api.create(svc("default", "a", json!({"app": "web"})))
        .unwrap();
    let svcs: Api<Service> = Api::namespaced(client(&api).await, "default");
    let wp = WatchParams::default().labels("app=web").disable_bookmarks();
    let mut stream = svcs
        .watch(&wp, &api.resource_version().to_string())
        .await
        .unwrap()
        .boxed();
    let mut a = api.get("svc", "default", "a").unwrap();
    a["metadata"]["labels"] = json!({"app": "other"});
    let a = api.update(a).unwrap();
    assert!(
        matches!(next(&mut stream).await.unwrap().unwrap(), WatchEvent::Deleted(s) if s.name_any() == "a")
    );
    let mut a = a;
    a["metadata"]["labels"] = json!({"app": "web"});
    api.update(a).unwrap();
    assert!(
        matches!(next(&mut stream).await.unwrap().unwrap(), WatchEvent::Added(s) if s.name_any() == "a")
    );
}

#[tokio::test]
async fn watch_sends_periodic_bookmarks_at_the_latest_version() {
    let api = server().await;
    api.create(svc("default", "a", json!({}))).unwrap();
    let svcs: Api<Service> = Api::all(client(&api).await);
    let mut stream = svcs
        .watch(&WatchParams::default(), &api.resource_version().to_string())
        .await
        .unwrap()
        .boxed();
    // An unrelated change moves the resourceVersion on; the bookmark must carry it.
    api.create(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}))
        .unwrap();
    let want = api.resource_version().to_string();
    let mut bookmarks = 0;
    while bookmarks < 2 {
        match next(&mut stream).await.unwrap().unwrap() {
            WatchEvent::Bookmark(bm) => {
                bookmarks += 1;
                assert_eq!(bm.metadata.resource_version, want);
                assert!(bm.metadata.annotations.is_empty());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn streaming_list_sends_initial_events_then_the_end_bookmark() {
    let api = server().await;
    api.create(svc("default", "a", json!({}))).unwrap();
    api.create(svc("default", "b", json!({}))).unwrap();
    let rv = api.resource_version().to_string();
    let svcs: Api<Service> = Api::all(client(&api).await);
    let mut stream = svcs
        .watch(&WatchParams::default().initial_events(), "0")
        .await
        .unwrap()
        .boxed();
    let mut added = Vec::new();
    loop {
        match next(&mut stream).await.unwrap().unwrap() {
            WatchEvent::Added(s) => added.push(s.name_any()),
            WatchEvent::Bookmark(bm) => {
                assert_eq!(
                    bm.metadata
                        .annotations
                        .get("k8s.io/initial-events-end")
                        .map(String::as_str),
                    Some("true")
                );
                assert_eq!(bm.metadata.resource_version, rv);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(added, ["a", "b"]);
    api.delete("svc", "default", "a").unwrap();
    loop {
        match next(&mut stream).await.unwrap().unwrap() {
            WatchEvent::Deleted(s) => break assert_eq!(s.name_any(), "a"),
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn expired_resource_versions_get_410() {
    let api = server_with(Options {
        history_limit: 3,
        ..Options::default()
    })
    .await;
    for i in 0..3 {
        api.create(svc("default", &format!("s{i}"), json!({})))
            .unwrap();
    }
    let svcs: Api<Service> = Api::all(client(&api).await);
    let page = svcs.list(&ListParams::default().limit(1)).await.unwrap();
    for i in 3..8 {
        api.create(svc("default", &format!("s{i}"), json!({})))
            .unwrap();
    }
    // A watch from before the retained history: HTTP 200 and an ERROR event, as the real server.
    let mut stream = svcs
        .watch(&WatchParams::default(), "1")
        .await
        .unwrap()
        .boxed();
    match next(&mut stream).await.unwrap().unwrap() {
        WatchEvent::Error(status) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        next(&mut stream).await.is_none(),
        "stream closes after the 410"
    );
    // A continue token from before the retained history.
    let err = svcs
        .list(
            &ListParams::default()
                .limit(1)
                .continue_token(page.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap_err();
    assert!(is_code(&err, 410), "{err:?}");
    let err = svcs
        .list(&ListParams::default().at("1").matching(VersionMatch::Exact))
        .await
        .unwrap_err();
    assert!(is_code(&err, 410), "{err:?}");
}

#[tokio::test]
async fn watch_timeout_closes_the_stream() {
    let api = server().await;
    let svcs: Api<Service> = Api::all(client(&api).await);
    let started = tokio::time::Instant::now();
    let mut stream = svcs
        .watch(&WatchParams::default().timeout(1).disable_bookmarks(), "0")
        .await
        .unwrap()
        .boxed();
    assert!(next(&mut stream).await.is_none());
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(started.elapsed() < WAIT);
}

#[tokio::test]
async fn writes_return_kubernetes_status_errors() {
    let api = server().await;
    let c = client(&api).await;
    let svcs: Api<Service> = Api::namespaced(c.clone(), "default");
    let created = svcs
        .create(
            &PostParams::default(),
            &serde_json::from_value(svc("default", "a", json!({}))).unwrap(),
        )
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    assert!(created.spec.as_ref().unwrap().cluster_ip.is_some());

    let err = svcs
        .create(&PostParams::default(), &created)
        .await
        .unwrap_err();
    assert!(is_code(&err, 409), "{err:?}");
    let err = svcs.get("missing").await.unwrap_err();
    assert!(is_code(&err, 404), "{err:?}");

    let mut stale = created.clone();
    api.update(serde_json::to_value(&created).unwrap()).unwrap();
    stale.metadata.labels = Some([("x".to_string(), "y".to_string())].into());
    let err = svcs
        .replace("a", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(is_code(&err, 409), "{err:?}");

    let patched = svcs
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"p": "q"}}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.labels().get("p").map(String::as_str), Some("q"));

    svcs.delete("a", &DeleteParams::default()).await.unwrap();
    assert!(api.get("svc", "default", "a").is_none());

    let slices: Api<EndpointSlice> = Api::namespaced(c, "default");
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "a-1", "labels": {"kubernetes.io/service-name": "a"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": true}}],
    });
    slices
        .create(
            &PostParams::default(),
            &serde_json::from_value(slice).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(api.list("endpointslices").unwrap().len(), 1);
}
