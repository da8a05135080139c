//! Sidecar injection and `sinew install --kubernetes` against a REAL kube-apiserver
//! (testkit's `kube::ApiServer`): the API server calls the `sinew webhook` process over
//! TLS for every Pod it creates, and validates the injected Pods and the installation's
//! manifests itself.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod mesh;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use mesh::free_addr;
use serde_json::{Value, json};
use sinew_testkit::kube::ApiServer;
use sinew_testkit::wait;

const TIMEOUT: Duration = Duration::from_secs(30);

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("sinew-webhook-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `sinew webhook --kubernetes` (the sidecar layout from the API server's version) on
/// loopback with a self-signed certificate for 127.0.0.1; returns the process and the
/// caBundle (PEM).
async fn start_webhook(
    dir: &Path,
    kubeconfig: &Path,
) -> (tokio::process::Child, String, std::net::SocketAddr) {
    let addr = free_addr();
    let ca = dir.join("ca.pem");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sinew"))
        .args([
            "webhook",
            "--listen",
            &addr.to_string(),
            "--self-signed",
            "127.0.0.1",
        ])
        .arg("--ca-out")
        .arg(&ca)
        .args([
            "--control-plane-address",
            "https://sinew-control.sinew-system.svc:15010",
        ])
        .args(["--proxy-image", "example.test/sinew:dev", "--kubernetes"])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The CA file is written once the listener is up.
    wait::until("webhook listening", TIMEOUT, || {
        let ca = ca.clone();
        async move { ca.exists() && tokio::net::TcpStream::connect(addr).await.is_ok() }
    })
    .await
    .unwrap();
    (child, std::fs::read_to_string(&ca).unwrap(), addr)
}

fn pod(name: &str, annotations: &[(&str, &str)]) -> Pod {
    let ann: BTreeMap<String, String> = annotations
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "web"}, "annotations": ann},
        "spec": {"containers": [{"name": "app", "image": "nginx", "ports": [{"containerPort": 8080}]}]},
    }))
    .unwrap()
}

fn container_names(list: Option<&Vec<k8s_openapi::api::core::v1::Container>>) -> Vec<String> {
    list.map(|l| l.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default()
}

fn namespace(name: &str, labels: Value) -> Namespace {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap()
}

#[tokio::test]
async fn the_api_server_injects_through_the_webhook_and_respects_opt_out() {
    let server = ApiServer::start().await.expect("a real kube-apiserver");
    let client = server.client().await.unwrap();
    let dir = Scratch::new("inject");
    let (_hook, ca, addr) = start_webhook(&dir.0, &server.kubeconfig()).await;
    let pp = PostParams::default();

    let namespaces = Api::<Namespace>::all(client.clone());
    namespaces
        .create(
            &pp,
            &namespace("shop", json!({"sinew.dev/inject": "enabled"})),
        )
        .await
        .unwrap();
    namespaces
        .create(&pp, &namespace("plain", json!({})))
        .await
        .unwrap();

    // failurePolicy Fail: if the API server cannot reach the webhook, creating a Pod
    // in `shop` fails, so the test cannot pass by not calling it.
    use base64::Engine;
    let mwc: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": "sinew-injector"},
        "webhooks": [{
            "name": "inject.sinew.dev",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
            "clientConfig": {
                "url": format!("https://{addr}/mutate"),
                "caBundle": base64::engine::general_purpose::STANDARD.encode(&ca),
            },
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"sinew.dev/inject": "enabled"}},
        }],
    }))
    .unwrap();
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&pp, &mwc)
        .await
        .unwrap();

    // The API server picks up webhook configurations asynchronously: dry-run creations
    // show when it calls the webhook.
    let shop = Api::<Pod>::namespaced(client.clone(), "shop");
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    wait::until("the API server calls the webhook", TIMEOUT, || {
        let shop = shop.clone();
        let dry = dry.clone();
        async move {
            shop.create(&dry, &pod("probe", &[]))
                .await
                .is_ok_and(|p| container_names(Some(&p.spec.unwrap().containers)).len() == 2)
        }
    })
    .await
    .unwrap();

    // An opted-in namespace: the stored Pod has the sidecar and the capture step.
    shop.create(
        &pp,
        &pod("web", &[("sinew.dev/proxy-memory-limit", "512Mi")]),
    )
    .await
    .unwrap();
    let web = shop.get("web").await.unwrap();
    let spec = web.spec.clone().unwrap();
    assert_eq!(
        container_names(Some(&spec.containers)),
        ["sinew-proxy", "app"]
    );
    assert_eq!(
        container_names(spec.init_containers.as_ref()),
        ["sinew-init"]
    );
    let proxy = &spec.containers[0];
    assert_eq!(proxy.image.as_deref(), Some("example.test/sinew:dev"));
    // 1.20: the layout for clusters without native sidecars (the webhook read the
    // version from the API server), and the security contexts as stored.
    assert!(
        server_version(&client).await.starts_with("v1.20"),
        "this test expects a 1.20 API server"
    );
    assert!(proxy.restart_policy.is_none());
    assert!(proxy.startup_probe.is_none());
    let psc = proxy.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(psc.allow_privilege_escalation, Some(false));
    assert_eq!(
        psc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("RuntimeDefault")
    );
    let limits = proxy.resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert_eq!(limits["memory"].0, "512Mi");
    let env: BTreeMap<_, _> = proxy
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect();
    assert_eq!(
        env["SINEW_CONTROL_PLANE"].as_deref(),
        Some("https://sinew-control.sinew-system.svc:15010")
    );
    let probe = proxy
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.path.as_deref(), Some("/ready"));
    let init = &spec.init_containers.as_ref().unwrap()[0];
    let caps = init
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .unwrap();
    assert_eq!(caps.add.as_deref().unwrap(), ["NET_ADMIN", "NET_RAW"]);
    assert_eq!(caps.drop.as_deref().unwrap(), ["ALL"]);
    let isc = init.security_context.as_ref().unwrap();
    assert_eq!(isc.read_only_root_filesystem, Some(true));
    assert_eq!(isc.allow_privilege_escalation, Some(false));
    assert_eq!(init.volume_mounts.as_ref().unwrap()[0].mount_path, "/run");
    assert_eq!(init.args.as_ref().unwrap()[0], "init");
    let token = spec
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "sinew-identity-token")
        .and_then(|v| v.projected.as_ref())
        .and_then(|p| p.sources.as_ref())
        .and_then(|s| s[0].service_account_token.as_ref())
        .expect("projected token volume");
    assert_eq!(token.audience.as_deref(), Some("sinew"));
    let ann = web.metadata.annotations.clone().unwrap();
    assert_eq!(ann["sinew.dev/injected"], "true");
    assert_eq!(ann["sinew.dev/proxy-memory-limit"], "512Mi");

    // Opted out by annotation: untouched.
    shop.create(&pp, &pod("legacy", &[("sinew.dev/inject", "disabled")]))
        .await
        .unwrap();
    let legacy = shop.get("legacy").await.unwrap().spec.unwrap();
    assert_eq!(container_names(Some(&legacy.containers)), ["app"]);
    assert!(legacy.init_containers.is_none());

    // Capture off: the proxy alone, nothing privileged in the pod.
    shop.create(
        &pp,
        &pod("unprivileged", &[("sinew.dev/capture", "disabled")]),
    )
    .await
    .unwrap();
    let unprivileged = shop.get("unprivileged").await.unwrap().spec.unwrap();
    assert_eq!(
        container_names(Some(&unprivileged.containers)),
        ["sinew-proxy", "app"]
    );
    assert!(unprivileged.init_containers.is_none());
    for c in &unprivileged.containers {
        let added = c
            .security_context
            .as_ref()
            .and_then(|s| s.capabilities.as_ref())
            .and_then(|c| c.add.clone())
            .unwrap_or_default();
        assert!(added.is_empty(), "{}: {added:?}", c.name);
    }

    // Host network: untouched.
    let mut host = pod("host", &[]);
    host.spec.as_mut().unwrap().host_network = Some(true);
    shop.create(&pp, &host).await.unwrap();
    let host = shop.get("host").await.unwrap().spec.unwrap();
    assert_eq!(container_names(Some(&host.containers)), ["app"]);

    // kube-system, even labelled in: never injected (the webhook refuses it itself,
    // as 1.20 has no kubernetes.io/metadata.name label to select it out).
    let mut system = namespaces.get("kube-system").await.unwrap();
    system
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("sinew.dev/inject".into(), "enabled".into());
    namespaces
        .replace("kube-system", &pp, &system)
        .await
        .unwrap();
    let kube_system = Api::<Pod>::namespaced(client.clone(), "kube-system");
    kube_system.create(&pp, &pod("sys", &[])).await.unwrap();
    let sys = kube_system.get("sys").await.unwrap();
    assert_eq!(
        container_names(Some(&sys.spec.unwrap().containers)),
        ["app"]
    );
    assert!(
        !sys.metadata
            .annotations
            .unwrap_or_default()
            .contains_key("sinew.dev/injected")
    );

    // A namespace that did not opt in: untouched.
    let plain = Api::<Pod>::namespaced(client.clone(), "plain");
    plain.create(&pp, &pod("web", &[])).await.unwrap();
    let other = plain.get("web").await.unwrap().spec.unwrap();
    assert_eq!(container_names(Some(&other.containers)), ["app"]);

    // Re-submitting an injected Pod: injected once, not twice.
    let mut again = web.clone();
    again.metadata = kube::api::ObjectMeta {
        name: Some("web-again".into()),
        labels: web.metadata.labels.clone(),
        annotations: web.metadata.annotations.clone(),
        ..Default::default()
    };
    again.status = None;
    shop.create(&pp, &again).await.unwrap();
    let again = shop.get("web-again").await.unwrap().spec.unwrap();
    assert_eq!(
        container_names(Some(&again.containers)),
        ["sinew-proxy", "app"]
    );
    assert_eq!(
        container_names(again.init_containers.as_ref()),
        ["sinew-init"]
    );
    assert_eq!(
        again.volumes.as_ref().unwrap().len(),
        spec.volumes.as_ref().unwrap().len()
    );

    // A Sinew annotation that cannot be honoured: refused, naming it.
    let err = shop
        .create(&pp, &pod("bad", &[("sinew.dev/proxy-uid", "root")]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("metadata.annotations[\"sinew.dev/proxy-uid\"]"),
        "{err}"
    );
    assert!(shop.get_opt("bad").await.unwrap().is_none());
}

async fn server_version(client: &kube::Client) -> String {
    client.apiserver_version().await.unwrap().git_version
}

/// No private key in `yaml`, plain or base64 (every string value of every document
/// that decodes as base64 is decoded and checked, Secrets' data included).
fn assert_no_private_key(yaml: &str, docs: &[Value]) {
    use base64::Engine;
    assert!(!yaml.contains("PRIVATE KEY"), "a private key is printed");
    fn strings<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::String(s) => out.push(s),
            Value::Array(a) => a.iter().for_each(|v| strings(v, out)),
            Value::Object(o) => o.values().for_each(|v| strings(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    docs.iter().for_each(|d| strings(d, &mut all));
    for s in all {
        if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(s.trim()) {
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                !text.contains("PRIVATE KEY"),
                "a base64 private key: {s:.40}..."
            );
        }
    }
    if let Some(d) = docs.iter().find(|d| d["kind"] == "Secret") {
        panic!("a Secret is printed: {}", d["metadata"]["name"]);
    }
}

async fn sinew(args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sinew"))
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Server-side applies one document as the test's field manager.
async fn apply(client: &kube::Client, doc: &Value) -> Result<(), kube::Error> {
    let s = |p: &str| doc.pointer(p).and_then(Value::as_str).unwrap_or("");
    let (group, version) = s("/apiVersion")
        .split_once('/')
        .unwrap_or(("", s("/apiVersion")));
    let gvk = GroupVersionKind::gvk(group, version, s("/kind"));
    let (ar, caps) = kube::discovery::pinned_kind(client, &gvk).await?;
    let api: Api<DynamicObject> = match caps.scope {
        kube::discovery::Scope::Namespaced => {
            Api::namespaced_with(client.clone(), s("/metadata/namespace"), &ar)
        }
        kube::discovery::Scope::Cluster => Api::all_with(client.clone(), &ar),
    };
    api.patch(
        s("/metadata/name"),
        &PatchParams::apply("webhook-test").force(),
        &Patch::Apply(doc),
    )
    .await
    .map(|_| ())
}

#[tokio::test]
async fn install_manifests_parse_back_and_the_api_server_accepts_them() {
    let server = ApiServer::start().await.expect("a real kube-apiserver");
    let client = server.client().await.unwrap();

    // Printed for this cluster's version (1.20: policy/v1beta1 for the
    // PodDisruptionBudget): every document parses back into its Kubernetes type.
    let version = server_version(&client).await;
    let print = [
        "install",
        "--kubernetes",
        "--namespace",
        "mesh-printed",
        "--gateway-api-crds",
        "--smi-crds",
        "--kubernetes-version",
        &version,
    ];
    let (ok, yaml, err) = sinew(&print).await;
    assert!(ok, "{err}");
    // Rendered again: the same bytes (nothing generated, so a GitOps re-render
    // rotates nothing).
    let (ok, again, err) = sinew(&print).await;
    assert!(ok, "{err}");
    assert_eq!(yaml, again);
    let docs: Vec<Value> = serde_norway::Deserializer::from_str(&yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    for k in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "MutatingWebhookConfiguration",
    ] {
        assert!(kinds.contains(&k), "no {k} in {kinds:?}");
    }
    // No key: the CA and the webhook's certificate are made in the cluster.
    assert_no_private_key(&yaml, &docs);
    let pdb = docs
        .iter()
        .find(|d| d["kind"] == "PodDisruptionBudget")
        .unwrap();
    assert_eq!(pdb["apiVersion"], "policy/v1beta1");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    // Default printing (no version) is for current clusters.
    let (ok, current, err) = sinew(&["install", "--kubernetes"]).await;
    assert!(ok, "{err}");
    assert!(current.contains("apiVersion: policy/v1\n"), "{current}");
    // An operator's CA is never printed either: refused, with the way to do it.
    let key = Scratch::new("given-ca");
    let ca = sinew_tls_ca(&key.0);
    let (ok, out, err) = sinew(&[
        "install",
        "--kubernetes",
        "--ca-cert",
        ca.0.to_str().unwrap(),
        "--ca-key",
        ca.1.to_str().unwrap(),
    ])
    .await;
    assert!(!ok);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("kubectl") && err.contains("sinew-ca"), "{err}");
    assert_eq!(kinds.last(), Some(&"MutatingWebhookConfiguration"));
    // Sinew's kinds, then the Gateway API and SMI ones asked for, before anything else.
    let crds = kinds
        .iter()
        .take_while(|k| **k == "CustomResourceDefinition")
        .count();
    assert_eq!(crds, sinew_k8s::crds().len() + 2 + 3);
    for d in &docs {
        let v = d.clone();
        match d["kind"].as_str().unwrap() {
            "Namespace" => drop(serde_json::from_value::<Namespace>(v).unwrap()),
            "ServiceAccount" => drop(serde_json::from_value::<ServiceAccount>(v).unwrap()),
            "ClusterRole" => drop(serde_json::from_value::<ClusterRole>(v).unwrap()),
            "ClusterRoleBinding" => drop(serde_json::from_value::<ClusterRoleBinding>(v).unwrap()),
            "Role" => drop(serde_json::from_value::<Role>(v).unwrap()),
            "RoleBinding" => drop(serde_json::from_value::<RoleBinding>(v).unwrap()),
            // policy/v1beta1 here, which k8s-openapi no longer has: the API server
            // checks it below.
            "PodDisruptionBudget" => drop(v),
            "Service" => drop(serde_json::from_value::<Service>(v).unwrap()),
            "Deployment" => drop(serde_json::from_value::<Deployment>(v).unwrap()),
            "MutatingWebhookConfiguration" => {
                drop(serde_json::from_value::<MutatingWebhookConfiguration>(v).unwrap())
            }
            "CustomResourceDefinition" => drop(
                serde_json::from_value::<
                    k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
                >(v)
                .unwrap(),
            ),
            other => panic!("unexpected kind {other}"),
        }
    }
    // The printed documents, applied as they are, are accepted by the API server (it
    // validates every field).
    for d in &docs {
        apply(&client, d)
            .await
            .unwrap_or_else(|e| panic!("{} {} refused: {e}", d["kind"], d["metadata"]["name"]));
    }

    // --apply: the same, through the CLI.
    let kubeconfig = server.kubeconfig();
    let kc = kubeconfig.to_str().unwrap();
    let (ok, _, err) = sinew(&["install", "--kubernetes", "--apply", "--kubeconfig", kc]).await;
    assert!(ok, "{err}");
    assert!(
        err.contains("MutatingWebhookConfiguration sinew-injector: applied"),
        "{err}"
    );
    assert!(
        err.contains("PodDisruptionBudget sinew-control: applied"),
        "{err}"
    );

    let deploy = Api::<Deployment>::namespaced(client.clone(), "sinew-system")
        .get("sinew-control")
        .await
        .unwrap();
    assert!(deploy.spec.as_ref().unwrap().replicas.unwrap() >= 2);
    let pod_spec = deploy.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        pod_spec.service_account_name.as_deref(),
        Some("sinew-control")
    );
    let names: Vec<_> = pod_spec
        .containers
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["control", "webhook"]);

    // No key applied either: the Secrets appear when the control plane and the
    // webhook first start (the next test), and the caBundle with them.
    let secrets = Api::<Secret>::namespaced(client.clone(), "sinew-system");
    assert!(secrets.get_opt("sinew-ca").await.unwrap().is_none());
    assert!(
        secrets
            .get_opt("sinew-webhook-tls")
            .await
            .unwrap()
            .is_none()
    );
    let mwc = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get("sinew-injector")
        .await
        .unwrap();
    let hook = &mwc.webhooks.as_ref().unwrap()[0];
    assert!(hook.client_config.ca_bundle.is_none());
    assert_eq!(hook.failure_policy.as_deref(), Some("Ignore"));
    assert_eq!(
        hook.client_config.service.as_ref().unwrap().name,
        "sinew-control"
    );
    assert_eq!(hook.side_effects, "None");
    let selector = serde_json::to_string(&hook.namespace_selector).unwrap();
    assert!(selector.contains("sinew.dev/inject"), "{selector}");

    // Least privilege: exactly sinew-k8s's rules (proven sufficient by its own
    // test against an RBAC-enforcing API server), which write nothing but statuses,
    // events, token reviews, the mesh roots' ConfigMaps, the caBundle of its own
    // webhook configuration (by name) and the custom resources `sinew apply` makes,
    // and never touch Secrets cluster-wide (only in its namespace).
    let role = Api::<ClusterRole>::all(client.clone())
        .get("sinew-control")
        .await
        .unwrap();
    let rules = role.rules.unwrap();
    assert_eq!(Some(&rules), sinew_k8s::rbac::cluster_role().rules.as_ref());
    let applied: Vec<&str> = sinew_k8s::crd::SINEW_KINDS
        .iter()
        .map(|k| k.plural)
        .chain(["httproutes"])
        .collect();
    for rule in &rules {
        let resources = rule.resources.clone().unwrap_or_default();
        assert!(
            !resources.iter().any(|r| r == "*" || r == "secrets"),
            "{resources:?}"
        );
        for verb in &rule.verbs {
            let write = !matches!(verb.as_str(), "get" | "list" | "watch");
            let may_write = resources.iter().all(|r| {
                r.ends_with("/status")
                    || r == "events"
                    || r == "tokenreviews"
                    || (r == "configmaps" && verb != "delete")
                    || (r == "mutatingwebhookconfigurations"
                        && verb == "patch"
                        && rule.resource_names.as_deref() == Some(&["sinew-injector".to_owned()]))
                    || applied.contains(&r.as_str())
            });
            assert!(!write || may_write, "{verb} on {resources:?}");
        }
    }
    let lease = Api::<Role>::namespaced(client.clone(), "sinew-system")
        .get("sinew-control")
        .await
        .unwrap();
    assert_eq!(
        lease.rules,
        sinew_k8s::rbac::lease_role("sinew-system").rules
    );

    // An upgrade from a release that printed the webhook's Secret and applied its
    // caBundle (its field manager owned the field, and now leaves it out): the
    // caBundle stays that of the Secret, which is kept.
    let certs = sinew_inject::cert::generate(
        &sinew_inject::install::InstallOptions::webhook_names("sinew-system"),
        Duration::from_secs(3600),
    )
    .unwrap();
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    apply(
        &client,
        &json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": "sinew-webhook-tls", "namespace": "sinew-system"},
            "data": {"tls.crt": b64(&certs.cert_pem), "tls.key": b64(&certs.key_pem), "ca.crt": b64(&certs.ca_pem)},
        }),
    )
    .await
    .unwrap();
    let mut old = serde_json::to_value(&mwc).unwrap();
    old["metadata"] = json!({"name": "sinew-injector"});
    old["apiVersion"] = json!("admissionregistration.k8s.io/v1");
    old["kind"] = json!("MutatingWebhookConfiguration");
    old["webhooks"][0]["clientConfig"]["caBundle"] = json!(b64(&certs.ca_pem));
    let mwcs = Api::<MutatingWebhookConfiguration>::all(client.clone());
    mwcs.patch(
        "sinew-injector",
        &PatchParams::apply("sinew-install").force(),
        &Patch::Apply(&old),
    )
    .await
    .unwrap();
    let (ok, _, err) = sinew(&["install", "--kubernetes", "--apply", "--kubeconfig", kc]).await;
    assert!(ok, "{err}");
    assert!(err.contains("caBundle kept"), "{err}");
    let upgraded = mwcs.get("sinew-injector").await.unwrap();
    assert_eq!(
        upgraded.webhooks.unwrap()[0]
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.clone()),
        Some(certs.ca_pem.clone().into_bytes())
    );
    let kept = secrets
        .get("sinew-webhook-tls")
        .await
        .unwrap()
        .data
        .unwrap();
    assert_eq!(kept["tls.key"].0, certs.key_pem.as_bytes());

    // In its namespace: its Lease, and Secrets (the CA's, the webhook's and the join
    // tokens': these have generated names, found by label, so RBAC cannot narrow them to
    // names), never more than get, list, create, update and delete; Secrets are granted
    // nowhere else (the ClusterRole above holds none).
    for rule in lease.rules.as_ref().unwrap() {
        let resources = rule.resources.clone().unwrap_or_default();
        if resources.iter().any(|r| r == "secrets") {
            for verb in &rule.verbs {
                assert!(
                    ["get", "list", "create", "update", "delete"].contains(&verb.as_str()),
                    "secrets: {verb}"
                );
            }
        }
    }
}

/// A CA's certificate and key files in `dir` (an operator's own).
fn sinew_tls_ca(dir: &Path) -> (PathBuf, PathBuf) {
    let ca = sinew_tls::Ca::generate("cluster.local", Duration::from_secs(3600)).unwrap();
    let (c, k) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    std::fs::write(&c, ca.cert_pem()).unwrap();
    std::fs::write(&k, ca.key_pem()).unwrap();
    (c, k)
}

/// The injected sidecar, started as the kubelet would start it (its environment, the
/// token the kubelet projects for the injected volume), gets a certificate from `sinew
/// control --kubernetes`: the audience injected and the audience the control plane
/// checks with TokenReview agree, and so do the proxy's name and its token file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_injected_sidecar_proves_its_identity_with_the_projected_token() {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use sinew_inject::patch::apply_json;
    use sinew_inject::{InjectConfig, Outcome, inject_pod};

    let server = ApiServer::start().await.expect("a real kube-apiserver");
    let client = server.client().await.unwrap();
    let pp = PostParams::default();
    Api::<Namespace>::all(client.clone())
        .create(&pp, &namespace("shop", json!({})))
        .await
        .unwrap();
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "web", "namespace": "shop"}})).unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), "shop")
        .create(&pp, &sa)
        .await
        .unwrap();

    // Inject (as the webhook does) and store the Pod; the API server validates it.
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-0", "namespace": "shop"},
        "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "nginx"}]},
    });
    let Outcome::Injected(ops) = inject_pod(&pod, &[], &InjectConfig::default()).unwrap() else {
        panic!("not injected");
    };
    apply_json(&mut pod, &ops).unwrap();
    let pods = Api::<Pod>::namespaced(client.clone(), "shop");
    pods.create(&pp, &serde_json::from_value(pod).unwrap())
        .await
        .unwrap();
    let stored = pods.get("web-0").await.unwrap();
    let spec = stored.spec.unwrap();
    let proxy = spec
        .containers
        .iter()
        .find(|c| c.name == "sinew-proxy")
        .unwrap();

    // What the kubelet would do: mint the projected token for the volume's audience.
    let projection = spec
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find_map(|v| {
            v.projected.as_ref()?.sources.as_ref()?[0]
                .service_account_token
                .clone()
        })
        .unwrap();
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![projection.audience.clone().unwrap()],
            expiration_seconds: projection.expiration_seconds,
            ..Default::default()
        },
        ..Default::default()
    };
    let token = Api::<ServiceAccount>::namespaced(client.clone(), "shop")
        .create_token_request("web", &pp, &req)
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    // ... and expand the container's environment ($(VAR) from the downward API).
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for e in proxy.env.as_ref().unwrap() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => env.iter().fold(v.clone(), |v, (k, x): (&String, &String)| {
                v.replace(&format!("$({k})"), x)
            }),
            (None, Some(from)) => match from.field_ref.as_ref().unwrap().field_path.as_str() {
                "metadata.name" => "web-0".to_owned(),
                "metadata.namespace" => "shop".to_owned(),
                "spec.serviceAccountName" => spec.service_account_name.clone().unwrap(),
                _ => String::new(),
            },
            _ => String::new(),
        };
        env.insert(e.name.clone(), value);
    }
    assert_eq!(env["SINEW_PROXY_NAME"], "shop/web-0");

    // The control plane, reviewing tokens for its default audience.
    let dir = mesh::Scratch::new();
    let kubeconfig = server.kubeconfig();
    let cp = mesh::Control::start_env(
        &dir.0.join("data"),
        free_addr(),
        &["--kubernetes"],
        &[("KUBECONFIG", kubeconfig.as_os_str())],
    )
    .await;

    // The real sinew-proxy binary, run with the container's command, arguments and
    // environment; the token volume's mount path maps to a directory holding the
    // token, as the kubelet maps it. Only the addresses differ: the control plane is
    // this test's (no cluster DNS here), the admin port a free loopback one.
    let mount = &proxy.volume_mounts.as_ref().unwrap()[0];
    let volume = dir.0.join("token-volume");
    std::fs::create_dir_all(&volume).unwrap();
    std::fs::write(volume.join(&projection.path), &token).unwrap();
    // Beside the token, the mesh roots: the control plane publishes them in every
    // namespace as the ConfigMap the volume projects.
    let roots_projection = spec
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find_map(|v| {
            v.projected
                .as_ref()?
                .sources
                .as_ref()?
                .iter()
                .find_map(|s| s.config_map.clone())
        })
        .expect("the sidecar's volume projects the roots' ConfigMap");
    let item = &roots_projection.items.as_ref().unwrap()[0];
    let cms = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), "shop");
    let cm_name = roots_projection.name.clone();
    wait::until(
        "the control plane publishes the roots in shop",
        TIMEOUT,
        || {
            let (cms, cm_name) = (cms.clone(), cm_name.clone());
            async move { cms.get_opt(&cm_name).await.ok().flatten().is_some() }
        },
    )
    .await
    .unwrap();
    let cm = cms.get(&cm_name).await.unwrap();
    let roots = cm.data.unwrap()[&item.key].clone();
    assert_eq!(
        roots,
        sinew_control::credentials::CredentialFile::read(&cp.credentials)
            .unwrap()
            .roots,
        "the published roots are the control plane's"
    );
    std::fs::write(volume.join(&item.path), &roots).unwrap();
    let in_volume = |a: &String| a.replace(&mount.mount_path, volume.to_str().unwrap());
    for v in env.values_mut() {
        *v = in_volume(v);
    }
    let args: Vec<String> = proxy.args.as_ref().unwrap().iter().map(in_volume).collect();
    assert_ne!(
        &args,
        proxy.args.as_ref().unwrap(),
        "the token is read from the volume"
    );
    assert_eq!(proxy.command.as_deref().unwrap(), ["sinew-proxy"]);
    let admin = free_addr();
    env.insert("SINEW_CONTROL_PLANE".into(), cp.url.clone());
    env.insert("SINEW_PROXY_ADMIN".into(), admin.to_string());
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_sinew")).with_file_name("sinew-proxy");
    assert!(
        binary.is_file(),
        "this test runs the real sinew-proxy and needs {} (`cargo build --bins`; a \
         workspace-wide `cargo test` builds it)",
        binary.display()
    );
    let _sidecar = tokio::process::Command::new(binary)
        .args(&args)
        .env_clear()
        .envs(&env)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Ready only once it holds a certificate: TokenReview accepted the token.
    wait::until("the injected sidecar is ready", TIMEOUT, || async move {
        let get = async {
            let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(b"GET /ready HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut out = Vec::new();
            s.read_to_end(&mut out).await.ok()?;
            Some(out.starts_with(b"HTTP/1.1 200"))
        };
        get.await == Some(true)
    })
    .await
    .unwrap();
    // It listens for the traffic the injected init container's rules redirect.
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /config HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.contains("\"capture\"") && out.contains("15006") && out.contains("15001"),
        "{out}"
    );
}

/// One HTTPS request to `addr`, trusting `ca_pem` and checking the certificate is for
/// `name`; returns the status and the body.
async fn https(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    name: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> Option<(u16, Vec<u8>)> {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.ok()?).ok()?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .ok()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let server_name = rustls_pki_types::ServerName::try_from(name.to_owned()).ok()?;
    let mut s = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(server_name, tcp)
        .await
        .ok()?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {name}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.ok()?;
    s.write_all(body).await.ok()?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let status = String::from_utf8_lossy(&out)
        .split(' ')
        .nth(1)?
        .parse()
        .ok()?;
    let at = out.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    Some((status, out[at..].to_vec()))
}

/// Waits until an installed control-plane replica is ready: its HTTP `/ready` (what
/// the kubelet probes; asked with curl) and its gRPC health with the admin credential
/// it wrote in its data volume.
async fn installed_control_ready(
    ports: &BTreeMap<String, std::net::SocketAddr>,
    volumes: &BTreeMap<String, PathBuf>,
) {
    let health = ports["15014"];
    wait::until(
        "the installed control plane is ready (/ready)",
        TIMEOUT,
        || async move {
            let out = tokio::process::Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
                .arg(format!("http://{health}/ready"))
                .output()
                .await
                .expect("curl");
            out.stdout == b"200"
        },
    )
    .await
    .unwrap();
    let control = ports["15010"];
    let cred = volumes["data"].join("admin.credentials");
    let cred = &cred;
    wait::until(
        "the installed control plane is healthy",
        TIMEOUT,
        || async move {
            match mesh::admin_client(&format!("https://{control}"), cred).await {
                Ok(mut c) => c
                    .health(sinew_api::v1::HealthRequest {})
                    .await
                    .is_ok_and(|h| h.into_inner().store_ok),
                Err(_) => false,
            }
        },
    )
    .await
    .unwrap();
}

/// Whether the TLS server at `addr` presents, for the control plane's Service name, a
/// certificate that chains to `ca_pem` alone.
async fn chains_to(addr: std::net::SocketAddr, ca_pem: &str) -> bool {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("sinew-control.sinew-system.svc").unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await
        .is_ok()
}

/// The installed Deployment's two containers, run as the kubelet would run them (their
/// command, arguments and environment; empty directories for their volumes; loopback
/// ports), start and serve: two control-plane replicas on fresh disks make and share
/// one CA through its Secret (and a restarted one keeps it), the webhook makes its
/// certificate's Secret and sets the caBundle, which then trusts it for the Service's
/// name; a re-install keeps all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_installed_control_plane_and_webhook_start_as_configured() {
    use k8s_openapi::api::core::v1::Container;
    let server = ApiServer::start().await.expect("a real kube-apiserver");
    let client = server.client().await.unwrap();
    let kubeconfig = server.kubeconfig();
    let kc = kubeconfig.to_str().unwrap();
    let (ok, _, err) = sinew(&[
        "install",
        "--kubernetes",
        "--apply",
        "--kubeconfig",
        kc,
        "--gateway-api-crds",
        "--smi-crds",
        "--image",
        "example.test/sinew:1.2.3",
    ])
    .await;
    assert!(ok, "{err}");

    let deploy = Api::<Deployment>::namespaced(client.clone(), "sinew-system")
        .get("sinew-control")
        .await
        .unwrap();
    let pod = deploy.spec.unwrap().template.spec.unwrap();
    let secrets = Api::<Secret>::namespaced(client.clone(), "sinew-system");
    let dir = Scratch::new("installed");

    // Each replica's volumes as fresh directories (an emptyDir each; no Secret is
    // mounted: the keys come through the API).
    let volumes_of = |replica: &str| -> BTreeMap<String, PathBuf> {
        pod.volumes
            .as_ref()
            .unwrap()
            .iter()
            .map(|v| {
                assert!(v.secret.is_none(), "a Secret volume: {}", v.name);
                let path = dir.0.join(replica).join(&v.name);
                let _ = std::fs::remove_dir_all(&path);
                std::fs::create_dir_all(&path).unwrap();
                (v.name.clone(), path)
            })
            .collect()
    };
    let run = |c: &Container,
               volumes: &BTreeMap<String, PathBuf>,
               ports: &mut BTreeMap<String, std::net::SocketAddr>| {
        let mut args = c.args.clone().unwrap();
        for a in args.iter_mut() {
            for m in c.volume_mounts.as_ref().into_iter().flatten() {
                if a.starts_with(&m.mount_path) {
                    *a = a.replacen(&m.mount_path, volumes[&m.name].to_str().unwrap(), 1);
                }
            }
            if let Some(port) = a.strip_prefix("0.0.0.0:") {
                let addr = free_addr();
                ports.insert(port.to_owned(), addr);
                *a = addr.to_string();
            }
        }
        assert_eq!(c.command.as_deref().unwrap(), ["sinew"]);
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sinew"));
        cmd.args(&args)
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true);
        for e in c.env.as_ref().into_iter().flatten() {
            let value = match e.value_from.as_ref().and_then(|f| f.field_ref.as_ref()) {
                Some(f) if f.field_path == "metadata.namespace" => "sinew-system".to_owned(),
                Some(f) if f.field_path == "metadata.name" => "sinew-control-0".to_owned(),
                _ => e.value.clone().unwrap_or_default(),
            };
            cmd.env(&e.name, value);
        }
        cmd.spawn().unwrap()
    };
    let containers: BTreeMap<&str, &Container> = pod
        .containers
        .iter()
        .map(|c| (c.name.as_str(), c))
        .collect();

    // Two replicas start together on empty disks, with no CA Secret yet: both
    // race to create it, and end up serving with the one that won.
    let (mut ports_a, mut ports_b) = (BTreeMap::new(), BTreeMap::new());
    let (vol_a, vol_b) = (volumes_of("a"), volumes_of("b"));
    let mut control_a = run(containers["control"], &vol_a, &mut ports_a);
    let _control_b = run(containers["control"], &vol_b, &mut ports_b);
    for (ports, volumes) in [(&ports_a, &vol_a), (&ports_b, &vol_b)] {
        installed_control_ready(ports, volumes).await;
    }
    let ca = secrets.get("sinew-ca").await.unwrap();
    let ca_pem = String::from_utf8(ca.data.as_ref().unwrap()["ca.pem"].0.clone()).unwrap();
    for ports in [&ports_a, &ports_b] {
        assert!(
            chains_to(ports["15010"], &ca_pem).await,
            "a replica's certificate is not from the CA in its Secret"
        );
    }
    // Restarted on a fresh disk: the same CA, the Secret untouched.
    control_a.kill().await.unwrap();
    let _ = control_a.wait().await;
    let mut ports_a = BTreeMap::new();
    let vol_a = volumes_of("a");
    assert!(!vol_a["data"].join("ca").exists());
    let _control_a = run(containers["control"], &vol_a, &mut ports_a);
    installed_control_ready(&ports_a, &vol_a).await;
    assert!(chains_to(ports_a["15010"], &ca_pem).await);
    assert_eq!(
        secrets.get("sinew-ca").await.unwrap().data,
        ca.data,
        "the CA Secret changed"
    );

    // The webhook makes its certificate's Secret and sets the caBundle to it.
    let mut ports = BTreeMap::new();
    let _webhook = run(containers["webhook"], &volumes_of("a-webhook"), &mut ports);
    let hook = ports["9443"];
    let mwcs = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let bundle = || {
        let mwcs = mwcs.clone();
        async move {
            mwcs.get("sinew-injector").await.ok()?.webhooks?[0]
                .client_config
                .ca_bundle
                .clone()
                .map(|b| String::from_utf8(b.0).unwrap())
        }
    };
    wait::until("the webhook sets its caBundle", TIMEOUT, || async {
        bundle().await.is_some()
    })
    .await
    .unwrap();
    let ca = bundle().await.unwrap();
    let tls = secrets.get("sinew-webhook-tls").await.unwrap();
    assert_eq!(tls.type_.as_deref(), Some("kubernetes.io/tls"));
    assert_eq!(tls.data.as_ref().unwrap()["ca.crt"].0, ca.as_bytes());
    let ca2 = ca.clone();
    wait::until("the installed webhook serves", TIMEOUT, || {
        let ca = ca2.clone();
        async move {
            https(
                hook,
                &ca,
                "sinew-control.sinew-system.svc",
                "GET",
                "/healthz",
                b"",
            )
            .await
            .is_some_and(|(s, _)| s == 200)
        }
    })
    .await
    .unwrap();

    // An upgrade (install --apply again) keeps both Secrets and the caBundle.
    let before = (
        secrets.get("sinew-ca").await.unwrap().data,
        secrets.get("sinew-webhook-tls").await.unwrap().data,
    );
    let (ok, _, err) = sinew(&["install", "--kubernetes", "--apply", "--kubeconfig", kc]).await;
    assert!(ok, "{err}");
    assert!(err.contains("caBundle kept"), "{err}");
    let after = (
        secrets.get("sinew-ca").await.unwrap().data,
        secrets.get("sinew-webhook-tls").await.unwrap().data,
    );
    assert_eq!(before, after);
    assert_eq!(bundle().await.as_deref(), Some(ca.as_str()));

    // It injects what the installation says: its image, its control plane.
    let review = serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE", "namespace": "shop",
            "object": {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app"}]}},
        }
    }))
    .unwrap();
    let (status, body) = https(
        hook,
        &ca,
        "sinew-control.sinew-system.svc",
        "POST",
        "/mutate",
        &review,
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    use base64::Engine;
    let patch = base64::engine::general_purpose::STANDARD
        .decode(answer["response"]["patch"].as_str().unwrap())
        .unwrap();
    let ops: Vec<Value> = serde_json::from_slice(&patch).unwrap();
    let proxy = ops
        .iter()
        .find(|o| o["path"] == "/spec/containers/0")
        .map(|o| &o["value"])
        .unwrap();
    assert_eq!(proxy["image"], "example.test/sinew:1.2.3");
    let env = proxy["env"].as_array().unwrap();
    assert!(env.contains(&json!({"name": "SINEW_CONTROL_PLANE", "value": "https://sinew-control.sinew-system.svc:15010"})));
}
