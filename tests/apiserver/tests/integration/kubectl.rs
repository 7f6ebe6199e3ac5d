//! The installed kubectl against the server: create, replace, get and delete from a file.

use tokio::process::Command;

use crate::support::server;

const KUBECTL: &str = "kubectl";

const OBJECTS: &str = "apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
  labels: {app: web}
spec:
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: true}
ports: [{port: 8080, protocol: TCP}]
";

/// Runs kubectl with the kubeconfig and returns stdout; panics with stderr on failure.
async fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--request-timeout=20s")
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("kubectl must be installed (CI installs it): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test]
async fn kubectl_creates_replaces_lists_and_deletes_from_files() {
    let api = server().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let file = dir.path().join("objects.yaml");
    std::fs::write(&file, OBJECTS).unwrap();
    let file = file.to_str().unwrap();

    let out = kubectl(&kubeconfig, &["create", "-f", file, "--validate=false"]).await;
    assert!(out.contains("service/web created"), "{out}");
    assert!(
        out.contains("endpointslice.discovery.k8s.io/web-abc created"),
        "{out}"
    );
    assert_eq!(
        api.get("svc", "default", "web").unwrap()["spec"]["ports"][0]["targetPort"],
        8080
    );

    let out = kubectl(&kubeconfig, &["get", "svc", "-A"]).await;
    assert!(out.contains("default") && out.contains("web"), "{out}");

    std::fs::write(
        file,
        OBJECTS.replace("targetPort: 8080", "targetPort: 9090"),
    )
    .unwrap();
    let out = kubectl(&kubeconfig, &["replace", "-f", file, "--validate=false"]).await;
    assert!(out.contains("service/web replaced"), "{out}");
    let out = kubectl(
        &kubeconfig,
        &[
            "get",
            "svc",
            "web",
            "-o",
            "jsonpath={.spec.ports[0].targetPort}",
        ],
    )
    .await;
    assert_eq!(out.trim(), "9090");

    let out = kubectl(
        &kubeconfig,
        &["get", "endpointslices", "-n", "default", "-o", "name"],
    )
    .await;
    assert_eq!(out.trim(), "endpointslice.discovery.k8s.io/web-abc");

    let out = kubectl(&kubeconfig, &["delete", "-f", file]).await;
    assert!(out.contains("service \"web\" deleted"), "{out}");
    assert!(api.get("svc", "default", "web").is_none());
    assert!(api.list("endpointslices").unwrap().is_empty());
}
