//! `sinew control --kubernetes` against a real kube-apiserver (testkit's `kube::ApiServer`,
//! built by `scripts/kube-envtest build`): Services, EndpointSlices and Pods become the
//! mesh's services and endpoints, custom resources its configuration, and real traffic
//! through real proxies follows them.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod mesh;

use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Namespace, Pod, Service};
use kube::Client;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use mesh::{Control, Scratch, TIMEOUT, free_addr};
use serde_json::{Value, json};
use sinew_testkit::http::HttpBackend;
use sinew_testkit::kube::ApiServer;
use sinew_testkit::{client, wait};

/// An API server with Sinew's, the Gateway API's and SMI's CRDs and a namespace `shop`.
async fn cluster() -> (ApiServer, Client) {
    cluster_with(&[]).await
}

/// [`cluster`] with extra API-server flags.
async fn cluster_with(args: &[&str]) -> (ApiServer, Client) {
    let api = ApiServer::start_with_args(args)
        .await
        .expect("a real kube-apiserver (scripts/kube-envtest build)");
    let c = api.client().await.unwrap();
    let crds = [
        sinew_k8s::crds(),
        sinew_k8s::crd::gateway_api_crds(),
        sinew_k8s::crd::smi_crds(),
    ]
    .concat();
    sinew_k8s::install_crds(&c, &crds).await.unwrap();
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "shop"}})).unwrap();
    Api::<Namespace>::all(c.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    (api, c)
}

fn ar(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// Creates (or replaces, by server-side apply) any object in `shop`.
async fn apply(c: &Client, r: &ApiResource, doc: Value) {
    let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
    let mut doc = doc;
    doc["apiVersion"] = json!(r.api_version);
    doc["kind"] = json!(r.kind);
    let obj: DynamicObject = serde_json::from_value(doc).unwrap();
    Api::<DynamicObject>::namespaced_with(c.clone(), "shop", r)
        .patch(
            &name,
            &PatchParams::apply("test").force(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap();
}

fn slices() -> ApiResource {
    // The 1.20 API server serves EndpointSlices only as v1beta1: the control plane finds
    // that by API discovery.
    ar(
        "discovery.k8s.io",
        "v1beta1",
        "EndpointSlice",
        "endpointslices",
    )
}

async fn service(c: &Client, name: &str) {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    }))
    .unwrap();
    Api::<Service>::namespaced(c.clone(), "shop")
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
}

async fn pod(c: &Client, name: &str, version: &str, sa: &str) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": "web", "version": version}},
        "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "example.invalid/app"}]}
    }))
    .unwrap();
    Api::<Pod>::namespaced(c.clone(), "shop")
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
}

/// The Pod `catalog-1` (service account `catalog`), whose sidecar's inbound port is
/// in its annotation.
async fn sidecar_pod(c: &Client, inbound: SocketAddr) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "catalog-1", "namespace": "shop", "labels": {"app": "catalog"},
                     "annotations": {"sinew.dev/inbound-port": inbound.port().to_string()}},
        "spec": {"serviceAccountName": "catalog", "containers": [{"name": "app", "image": "example.invalid/app"}]}
    }))
    .unwrap();
    Api::<Pod>::namespaced(c.clone(), "shop")
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
}

/// An EndpointSlice of `service` with one endpoint for `pod` at `addr`.
async fn slice(c: &Client, name: &str, service: &str, pod: &str, addr: SocketAddr, ready: bool) {
    apply(
        c,
        &slices(),
        json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": addr.port(), "protocol": "TCP"}],
            "endpoints": [{
                "addresses": [addr.ip().to_string()],
                "conditions": {"ready": ready},
                "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop"}
            }]
        }),
    )
    .await;
}

fn sinew_kind(kind: &str, plural: &str) -> ApiResource {
    ar("sinew.dev", "v1alpha1", kind, plural)
}

/// The Proxy resource of `shop/client`: `bind` forwards to `service`.
async fn client_proxy(c: &Client, bind: SocketAddr, service: &str) {
    apply(
        c,
        &sinew_kind("Proxy", "proxies"),
        json!({
            "metadata": {"name": "client"},
            "spec": {"outbound": {"upstreams": [{"bind": bind.to_string(), "service": service}]}}
        }),
    )
    .await;
}

async fn control(api: &ApiServer, dir: &Scratch, extra: &[&str]) -> Control {
    let kubeconfig = api.kubeconfig();
    let mut args = vec!["--kubernetes"];
    args.extend_from_slice(extra);
    Control::start_env(
        &dir.0.join(format!("data-{}", free_addr().port())),
        free_addr(),
        &args,
        &[("KUBECONFIG", kubeconfig.as_os_str())],
    )
    .await
}

/// Whether the proxy's running config (its admin `/config`) holds the endpoint `addr`.
async fn config_has(p: &sinew_proxy::Proxy, addr: SocketAddr) -> bool {
    client::get(p.admin_addr(), "admin", "/config")
        .await
        .map(|r| r.text())
        .unwrap_or_default()
        .contains(&format!("\"{addr}\""))
}

/// Which backend answered a request through `bind` (None: the request failed).
async fn who(bind: SocketAddr) -> Option<String> {
    let r = client::get(bind, "web", "/").await.ok()?;
    if r.status != 200 {
        return None;
    }
    Some(r.headers.get("x-backend")?.to_str().ok()?.to_owned())
}

async fn until_served_by(bind: SocketAddr, backend: &str) {
    wait::until(
        &format!("requests reach {backend}"),
        TIMEOUT,
        || async move { who(bind).await.as_deref() == Some(backend) },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubernetes_endpoints_and_readiness_steer_real_traffic() {
    let (api, c) = cluster().await;
    let v1 = HttpBackend::start("v1").await.unwrap();
    let v2 = HttpBackend::start("v2").await.unwrap();
    service(&c, "web").await;
    pod(&c, "web-v1", "v1", "web").await;
    pod(&c, "web-v2", "v2", "web").await;
    slice(&c, "web-a", "web", "web-v1", v1.addr(), true).await;
    let bind = free_addr();
    client_proxy(&c, bind, "web").await;

    let dir = Scratch::new();
    let cp = control(&api, &dir, &[]).await;
    let proxy = mesh::proxy(&cp, "shop/client", None, Duration::from_millis(100)).await;
    mesh::listening(bind).await;
    until_served_by(bind, "v1").await;
    for _ in 0..20 {
        assert_eq!(
            who(bind).await.as_deref(),
            Some("v1"),
            "only web-v1 is an endpoint"
        );
    }
    assert!(config_has(&proxy, v1.addr()).await && !config_has(&proxy, v2.addr()).await);

    // A second slice adds an endpoint: traffic spreads to it.
    slice(&c, "web-b", "web", "web-v2", v2.addr(), true).await;
    until_served_by(bind, "v2").await;

    // The first endpoint becomes not ready: the proxy's config loses it and everything
    // goes to the second.
    slice(&c, "web-a", "web", "web-v1", v1.addr(), false).await;
    let p = &proxy;
    let (a1, a2) = (v1.addr(), v2.addr());
    wait::until(
        "web-v1 gone from the proxy's config",
        TIMEOUT,
        || async move { !config_has(p, a1).await && config_has(p, a2).await },
    )
    .await
    .unwrap();
    let v1r = &v1;
    wait::until("web-v1 left out", TIMEOUT, || async move {
        let before = v1r.requests();
        for _ in 0..10 {
            if who(bind).await.as_deref() != Some("v2") {
                return false;
            }
        }
        v1r.requests() == before
    })
    .await
    .unwrap();

    // Its Pod says it is not ready either way once it is terminating: delete it and make
    // its slice ready again; it stays out.
    Api::<Pod>::namespaced(c.clone(), "shop")
        .patch_status(
            "web-v2",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
            ),
        )
        .await
        .unwrap();
    slice(&c, "web-a", "web", "web-v1", v1.addr(), true).await;
    wait::until(
        "web-v2 (Pod not ready) gone from the proxy's config",
        TIMEOUT,
        || async move { config_has(p, a1).await && !config_has(p, a2).await },
    )
    .await
    .unwrap();
    let v2r = &v2;
    wait::until("web-v2 (Pod not ready) left out", TIMEOUT, || async move {
        let before = v2r.requests();
        for _ in 0..10 {
            if who(bind).await.as_deref() != Some("v1") {
                return false;
            }
        }
        v2r.requests() == before
    })
    .await
    .unwrap();
}

/// The `Accepted` condition of a Sinew or SMI custom resource.
async fn accepted(c: &Client, r: &ApiResource, name: &str) -> Option<(String, String)> {
    let o = Api::<DynamicObject>::namespaced_with(c.clone(), "shop", r)
        .get(name)
        .await
        .ok()?;
    let conds = if r.kind.ends_with("Route") {
        o.data
            .pointer("/status/parents/0/conditions")?
            .as_array()?
            .clone()
    } else {
        o.data.pointer("/status/conditions")?.as_array()?.clone()
    };
    let cond = conds.iter().find(|c| c["type"] == "Accepted")?;
    Some((
        cond["status"].as_str()?.to_owned(),
        cond["message"].as_str().unwrap_or_default().to_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn custom_resources_get_status_conditions_and_routes_apply() {
    let (api, c) = cluster().await;
    let v1 = HttpBackend::start("v1").await.unwrap();
    let v2 = HttpBackend::start("v2").await.unwrap();
    for s in ["web", "web-v1", "web-v2"] {
        service(&c, s).await;
    }
    pod(&c, "web-1", "v1", "web").await;
    pod(&c, "web-2", "v2", "web").await;
    slice(&c, "web-v1-a", "web-v1", "web-1", v1.addr(), true).await;
    slice(&c, "web-v2-a", "web-v2", "web-2", v2.addr(), true).await;
    let bind = free_addr();
    client_proxy(&c, bind, "web").await;
    // Gateway API: all of web's traffic to web-v1.
    let routes = ar("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes");
    apply(
        &c,
        &routes,
        json!({
            "metadata": {"name": "web"},
            "spec": {"parentRefs": [{"kind": "Service", "name": "web"}],
                     "rules": [{"backendRefs": [{"name": "web-v1", "port": 80}]}]}
        }),
    )
    .await;
    // GAMMA GRPCRoute on the same parent: gRPC calls of shop.Catalog to web-v2.
    let grpc_routes = ar("gateway.networking.k8s.io", "v1", "GRPCRoute", "grpcroutes");
    apply(
        &c,
        &grpc_routes,
        json!({
            "metadata": {"name": "catalog-rpc"},
            "spec": {"parentRefs": [{"kind": "Service", "name": "web"}],
                     "rules": [{"matches": [{"method": {"service": "shop.Catalog"}}],
                                "backendRefs": [{"name": "web-v2", "port": 80}]}]}
        }),
    )
    .await;
    // A route of an ingress Gateway (no Service parent) is not the mesh's: Sinew leaves
    // it, and its status, alone. One with both parents keeps the Gateway's status entry.
    let other = json!({"parentRef": {"kind": "Gateway", "name": "edge"}, "controllerName": "example.com/gateway",
                       "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                                       "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
    for (name, parents) in [
        (
            "edge-only",
            json!([{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"}]),
        ),
        (
            "edge-and-mesh",
            json!([{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"},
                                 {"kind": "Service", "name": "web-v2"}]),
        ),
    ] {
        apply(&c, &routes, json!({"metadata": {"name": name},
                                  "spec": {"parentRefs": parents, "rules": [{"backendRefs": [{"name": "web-v2", "port": 80}]}]}})).await;
        Api::<DynamicObject>::namespaced_with(c.clone(), "shop", &routes)
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"parents": [other]}})),
            )
            .await
            .unwrap();
    }
    // Invalid: a target of an unsupported kind (valid for the schema, refused by the
    // control plane), and a TrafficSplit without its root service.
    let policies = sinew_kind("TrafficPolicy", "trafficpolicies");
    apply(
        &c,
        &policies,
        json!({"metadata": {"name": "bad"}, "spec": {"targetRef": {"kind": "Deployment", "name": "web"}}}),
    )
    .await;
    let splits = ar(
        "split.smi-spec.io",
        "v1alpha2",
        "TrafficSplit",
        "trafficsplits",
    );
    apply(
        &c,
        &splits,
        json!({"metadata": {"name": "broken"}, "spec": {"backends": [{"service": "web-v2", "weight": 1}]}}),
    )
    .await;

    let dir = Scratch::new();
    let cp = control(&api, &dir, &[]).await;
    let _proxy = mesh::proxy(&cp, "shop/client", None, Duration::from_millis(100)).await;
    mesh::listening(bind).await;
    until_served_by(bind, "v1").await;

    let cc = c.clone();
    let (p, r, s) = (policies.clone(), routes.clone(), splits.clone());
    wait::until("statuses written", TIMEOUT, || {
        let (c, p, r, s) = (cc.clone(), p.clone(), r.clone(), s.clone());
        async move {
            matches!(accepted(&c, &p, "bad").await, Some((st, _)) if st == "False")
                && matches!(accepted(&c, &r, "web").await, Some((st, _)) if st == "True")
                && matches!(accepted(&c, &s, "broken").await, Some((st, _)) if st == "False")
        }
    })
    .await
    .unwrap();
    let routes_api = Api::<DynamicObject>::namespaced_with(c.clone(), "shop", &routes);
    let rr = &routes_api;
    wait::until(
        "the mixed route carries both controllers' entries",
        TIMEOUT,
        || async move {
            rr.get("edge-and-mesh").await.is_ok_and(|o| {
                o.data
                    .pointer("/status/parents")
                    .and_then(Value::as_array)
                    .is_some_and(|ps| ps.len() == 2)
            })
        },
    )
    .await
    .unwrap();
    let mixed = routes_api.get("edge-and-mesh").await.unwrap();
    let parents = mixed
        .data
        .pointer("/status/parents")
        .unwrap()
        .as_array()
        .unwrap()
        .clone();
    assert!(
        parents
            .iter()
            .any(|p| p["controllerName"] == "example.com/gateway"),
        "{parents:?}"
    );
    assert!(
        parents
            .iter()
            .any(|p| p["controllerName"] == "sinew.dev/mesh"
                && p["parentRef"]["kind"] == "Service"
                && p["conditions"][0]["status"] == "True"),
        "{parents:?}"
    );
    let edge = routes_api.get("edge-only").await.unwrap();
    assert_eq!(
        edge.data
            .pointer("/status/parents")
            .unwrap()
            .as_array()
            .unwrap(),
        &vec![other.clone()]
    );
    assert_eq!(
        accepted(&c, &grpc_routes, "catalog-rpc")
            .await
            .map(|a| a.0)
            .as_deref(),
        Some("True")
    );
    // The GRPCRoute applies to its calls: a request on its path reaches web-v2.
    let r = client::get(bind, "web", "/shop.Catalog/List")
        .await
        .unwrap();
    assert_eq!(r.headers.get("x-backend").unwrap(), "v2");
    let (_, msg) = accepted(&c, &policies, "bad").await.unwrap();
    assert!(
        msg.contains("spec.targetRef.kind"),
        "the condition names the field: {msg}"
    );
    let (_, msg) = accepted(&c, &splits, "broken").await.unwrap();
    assert!(msg.contains("spec.service"), "{msg}");
    let (st, _) = accepted(&c, &sinew_kind("Proxy", "proxies"), "client")
        .await
        .unwrap();
    assert_eq!(st, "True");
    // And a Warning Event names the refused resource.
    warning_event(&c, "bad", "targetRef").await;

    // SMI: fixing the TrafficSplit (90/10 → 0/100 to web-v2) takes traffic to web-v2; the
    // HTTPRoute on the same parent goes first, so remove it.
    Api::<DynamicObject>::namespaced_with(c.clone(), "shop", &routes)
        .delete("web", &Default::default())
        .await
        .unwrap();
    apply(
        &c,
        &splits,
        json!({"metadata": {"name": "broken"}, "spec": {"service": "web", "backends": [{"service": "web-v1", "weight": 0}, {"service": "web-v2", "weight": 100}]}}),
    )
    .await;
    until_served_by(bind, "v2").await;
    for _ in 0..10 {
        assert_eq!(who(bind).await.as_deref(), Some("v2"));
    }
    let cc = c.clone();
    wait::until("TrafficSplit accepted", TIMEOUT, || {
        let (c, s) = (cc.clone(), splits.clone());
        async move { matches!(accepted(&c, &s, "broken").await, Some((st, _)) if st == "True") }
    })
    .await
    .unwrap();

    // With HTTPRouteGroup matches, only matching requests are split (to web-v2); the rest
    // go to the root service itself (given web-v1's backend as its endpoint).
    slice(&c, "web-root", "web", "web-1", v1.addr(), true).await;
    let groups = ar(
        "specs.smi-spec.io",
        "v1alpha4",
        "HTTPRouteGroup",
        "httproutegroups",
    );
    apply(
        &c,
        &groups,
        json!({"metadata": {"name": "canary"},
               "spec": {"matches": [{"name": "canary", "pathRegex": "/canary/.*", "methods": ["GET"]},
                                   {"name": "beta", "pathRegex": "^/beta/[0-9]+$"}]}}),
    )
    .await;
    apply(
        &c,
        &splits,
        json!({"metadata": {"name": "broken"},
               "spec": {"service": "web",
                        "matches": [{"kind": "HTTPRouteGroup", "name": "canary"}],
                        "backends": [{"service": "web-v2", "weight": 100}]}}),
    )
    .await;
    wait::until(
        "unmatched requests go to the root service",
        TIMEOUT,
        || async move { who(bind).await.as_deref() == Some("v1") },
    )
    .await
    .unwrap();
    for _ in 0..10 {
        assert_eq!(who(bind).await.as_deref(), Some("v1"));
        for (path, backend) in [("/canary/a", "v2"), ("/beta/42", "v2"), ("/beta/x", "v1")] {
            let r = client::get(bind, "web", path).await.unwrap();
            assert_eq!(r.headers.get("x-backend").unwrap(), backend, "{path}");
        }
    }
}

/// A token for `shop/<sa>` bound to the Pod `shop/<pod>` (the TokenRequest API, as
/// the kubelet asks for a projected token), for `audience`.
async fn pod_bound_token(c: &Client, sa: &str, pod: &str, audience: &str) -> String {
    use k8s_openapi::api::authentication::v1::{
        BoundObjectReference, TokenRequest, TokenRequestSpec,
    };
    use k8s_openapi::api::core::v1::ServiceAccount;
    let _ = sa_token(c, sa, audience).await; // the account exists
    let uid = Api::<Pod>::namespaced(c.clone(), "shop")
        .get(pod)
        .await
        .unwrap()
        .metadata
        .uid;
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(3600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.into()),
                uid,
            }),
        },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(c.clone(), "shop")
        .create_token_request(sa, &PostParams::default(), &req)
        .await
        .unwrap()
        .status
        .unwrap()
        .token
}

/// A token for `shop/<sa>` from the TokenRequest API, for `audience`.
async fn sa_token(c: &Client, sa: &str, audience: &str) -> String {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    let sas = Api::<ServiceAccount>::namespaced(c.clone(), "shop");
    if sas.get_opt(sa).await.unwrap().is_none() {
        let obj: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": sa, "namespace": "shop"}})).unwrap();
        sas.create(&PostParams::default(), &obj).await.unwrap();
    }
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    sas.create_token_request(sa, &PostParams::default(), &req)
        .await
        .unwrap()
        .status
        .unwrap()
        .token
}

/// What the control plane answers a proxy `ns/name` that bootstraps with `token`:
/// the certificate, or the refusal's message in `error`.
async fn certificate(
    cp: &Control,
    ns: &str,
    name: &str,
    token: &str,
) -> sinew_api::v1::Certificate {
    match mesh::bootstrap(cp, ns, name, token).await {
        Ok((_, c)) => c,
        Err(s) => {
            assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
            sinew_api::v1::Certificate {
                error: s.message().to_owned(),
                ..Default::default()
            }
        }
    }
}

/// A JWT shaped exactly like the API server's service-account tokens, signed with a key
/// that is not the API server's.
fn forged_token(ns: &str, sa: &str) -> String {
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({
        "iss": sinew_testkit::kube::SA_ISSUER,
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "aud": ["sinew"],
        "iat": now, "nbf": now, "exp": now + 3600,
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "00000000-0000-0000-0000-000000000000"}}
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn service_account_tokens_get_certificates_checked_with_token_review() {
    let (api, c) = cluster().await;
    let app = HttpBackend::start("catalog-app").await.unwrap();
    let (bind, inbound) = (free_addr(), free_addr());
    let (t_web, t_cat) = (
        sa_token(&c, "web", "sinew").await,
        sa_token(&c, "catalog", "sinew").await,
    );
    // The catalog Pod runs a sidecar (its inbound port in the annotation) as `catalog`.
    service(&c, "catalog").await;
    sidecar_pod(&c, inbound).await;
    slice(&c, "catalog-a", "catalog", "catalog-1", app.addr(), true).await;
    client_proxy(&c, bind, "catalog").await;

    let dir = Scratch::new();
    let cp = control(&api, &dir, &[]).await;
    // The sidecar is named after its Pod; both proxies prove who they are with their
    // service-account tokens.
    let catalog = mesh::proxy_with_token(
        &cp,
        "shop/catalog-1",
        None,
        Duration::from_millis(50),
        Some(t_cat),
    )
    .await;
    let web = mesh::proxy_with_token(
        &cp,
        "shop/client",
        None,
        Duration::from_millis(50),
        Some(t_web.clone()),
    )
    .await;
    let id = |p: &sinew_proxy::Proxy| p.shared().certs.identity().map(|i| i.to_string());
    assert_eq!(
        id(&web).as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/web")
    );
    assert_eq!(
        id(&catalog).as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/catalog")
    );
    mesh::listening(bind).await;
    mesh::listening(inbound).await;
    wait::until("mesh path serves", TIMEOUT, || async move {
        client::get(bind, "catalog", "/")
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await
    .unwrap();
    // The request crossed mTLS: the inbound saw the caller's certificate.
    let r = client::get(bind, "catalog", "/").await.unwrap();
    assert_eq!(
        r.json().unwrap()["headers"]["sinew-peer-identity"],
        "spiffe://cluster.local/ns/shop/sa/web"
    );

    // SMI access control imported: only `web` may call catalog, and only GET /allowed/….
    let groups = ar(
        "specs.smi-spec.io",
        "v1alpha4",
        "HTTPRouteGroup",
        "httproutegroups",
    );
    apply(
        &c,
        &groups,
        json!({"metadata": {"name": "catalog-routes"},
               "spec": {"matches": [{"name": "allowed", "pathRegex": "/allowed/.*", "methods": ["GET"]}]}}),
    )
    .await;
    let targets = ar(
        "access.smi-spec.io",
        "v1alpha3",
        "TrafficTarget",
        "traffictargets",
    );
    apply(
        &c,
        &targets,
        json!({"metadata": {"name": "web-to-catalog"},
               "spec": {"destination": {"kind": "ServiceAccount", "name": "catalog", "namespace": "shop"},
                        "rules": [{"kind": "HTTPRouteGroup", "name": "catalog-routes", "matches": ["allowed"]}],
                        "sources": [{"kind": "ServiceAccount", "name": "web", "namespace": "shop"}]}}),
    )
    .await;
    wait::until("the TrafficTarget is enforced", TIMEOUT, || async move {
        client::get(bind, "catalog", "/other")
            .await
            .is_ok_and(|r| r.status == 403)
    })
    .await
    .unwrap();
    let r = client::get(bind, "catalog", "/allowed/items")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "web may GET /allowed/…");
    let cc = c.clone();
    wait::until("TrafficTarget accepted", TIMEOUT, || {
        let (c, t) = (cc.clone(), targets.clone());
        async move { matches!(accepted(&c, &t, "web-to-catalog").await, Some((st, _)) if st == "True") }
    })
    .await
    .unwrap();

    // Refused: a forged token, a token for another audience, a token of another
    // namespace's service account.
    let ok = certificate(&cp, "shop", "probe", &t_web).await;
    assert!(
        ok.error.is_empty() && !ok.chain_pem.is_empty(),
        "{}",
        ok.error
    );
    let forged = certificate(&cp, "shop", "probe", &forged_token("shop", "web")).await;
    assert!(
        forged.chain_pem.is_empty(),
        "a forged token got a certificate"
    );
    assert!(forged.error.contains("refused"), "{}", forged.error);
    let api_audience = sa_token(&c, "web", sinew_testkit::kube::API_AUDIENCE).await;
    let wrong = certificate(&cp, "shop", "probe", &api_audience).await;
    assert!(wrong.chain_pem.is_empty() && !wrong.error.is_empty());
    // A token bound to a Pod (as the kubelet projects them) serves that Pod's proxy
    // only: the proxy is named after its Pod.
    let bound = pod_bound_token(&c, "catalog", "catalog-1", "sinew").await;
    let wrong_pod = certificate(&cp, "shop", "catalog-2", &bound).await;
    assert!(
        wrong_pod.chain_pem.is_empty(),
        "a pod-bound token served another pod"
    );
    assert!(
        wrong_pod.error.contains("bound to the pod \"catalog-1\""),
        "{}",
        wrong_pod.error
    );
    let right_pod = certificate(&cp, "shop", "catalog-1", &bound).await;
    assert!(right_pod.error.is_empty(), "{}", right_pod.error);
    let elsewhere = certificate(&cp, "other", "probe", &t_web).await;
    assert!(
        elsewhere.chain_pem.is_empty(),
        "a token of shop served namespace other"
    );
    assert!(elsewhere.error.contains("namespace"), "{}", elsewhere.error);
    web.shutdown().await;
    catalog.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_dropped_by_an_api_server_restart_recovers_without_dropping_endpoints() {
    let (mut api, c) = cluster().await;
    let v1 = HttpBackend::start("v1").await.unwrap();
    let v2 = HttpBackend::start("v2").await.unwrap();
    service(&c, "web").await;
    pod(&c, "web-v1", "v1", "web").await;
    pod(&c, "web-v2", "v2", "web").await;
    slice(&c, "web-a", "web", "web-v1", v1.addr(), true).await;
    let bind = free_addr();
    client_proxy(&c, bind, "web").await;
    let dir = Scratch::new();
    let cp = control(&api, &dir, &[]).await;
    let _proxy = mesh::proxy(&cp, "shop/client", None, Duration::from_millis(100)).await;
    mesh::listening(bind).await;
    until_served_by(bind, "v1").await;

    // The API server goes away: every watch breaks. The endpoints stay.
    api.stop_apiserver();
    for _ in 0..20 {
        assert_eq!(
            who(bind).await.as_deref(),
            Some("v1"),
            "endpoints kept while the API server is down"
        );
    }
    assert_eq!(
        cp.sinew(&["get", "workloads", "-n", "shop"])
            .await
            .status
            .code(),
        Some(0)
    );
    api.start_apiserver().await.unwrap();

    // A change made after the restart reaches the proxy: the watches came back.
    let c = api.client().await.unwrap();
    slice(&c, "web-a", "web", "web-v2", v2.addr(), true).await;
    until_served_by(bind, "v2").await;
    for _ in 0..10 {
        assert_eq!(who(bind).await.as_deref(), Some("v2"));
    }
}

/// A TCP front for several control-plane replicas, as a Kubernetes Service is: each
/// connection goes to the first replica that accepts it.
struct Front {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Front {
    async fn start(replicas: Vec<SocketAddr>) -> Front {
        Front::start_on([127, 0, 0, 1].into(), replicas).await
    }

    async fn start_on(ip: std::net::IpAddr, replicas: Vec<SocketAddr>) -> Front {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                let replicas = replicas.clone();
                tokio::spawn(async move {
                    for r in replicas {
                        if let Ok(mut up) = tokio::net::TcpStream::connect(r).await {
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                            return;
                        }
                    }
                });
            }
        });
        Front { addr, task }
    }
}

impl Front {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn proxy_binary() -> std::path::PathBuf {
    let sinew = std::path::Path::new(env!("CARGO_BIN_EXE_sinew"));
    let proxy = sinew.with_file_name(format!("sinew-proxy{}", std::env::consts::EXE_SUFFIX));
    assert!(
        proxy.is_file(),
        "\n\nthis test runs real sinew-proxy processes and needs {} next to sinew: \
         `cargo build --bins` first (a workspace-wide `cargo test` builds it)\n",
        proxy.display()
    );
    proxy
}

/// A real `sinew-proxy` process in control-plane mode, ready (it has its config and
/// certificate) when this returns.
async fn proxy_process(
    dir: &Scratch,
    control: SocketAddr,
    roots: &std::path::Path,
    name: &str,
    token: &str,
) -> tokio::process::Child {
    let token_file = dir.write(&format!("{}.token", name.replace('/', "-")), token);
    let admin = free_addr();
    let child = tokio::process::Command::new(proxy_binary())
        .arg("--control-plane")
        .arg(format!("https://{control}"))
        // A service-account token names no root: the mesh roots verify the control
        // plane, as the `sinew-root` ConfigMap gives them in a pod.
        .arg("--control-plane-ca")
        .arg(roots)
        .args(["--name", name])
        .arg("--join-token-file")
        .arg(&token_file)
        .arg("--admin")
        .arg(admin.to_string())
        .env(
            "RUST_LOG",
            std::env::var("SINEW_TEST_PROXY_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait::ready(&format!("{name} ready"), admin, TIMEOUT)
        .await
        .unwrap();
    child
}

/// Requests through `bind` from `clients` connections until stopped: (ok, failed).
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU32>,
    tasks: Vec<tokio::task::JoinHandle<u32>>,
}

impl Load {
    async fn start(bind: SocketAddr, clients: usize) -> Load {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ok = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (stop, ok) = (stop.clone(), ok.clone());
            let mut c = client::h1(bind).await.unwrap();
            tasks.push(tokio::spawn(async move {
                let mut failed = 0;
                while !stop.load(Ordering::Relaxed) {
                    match c.get("catalog", "/").await {
                        Ok(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => {
                            eprintln!("failed request: {} {:?}", r.status, r.header("sinew-error"));
                            failed += 1;
                        }
                        Err(e) => {
                            eprintln!("failed request: {e}");
                            failed += 1;
                            break;
                        }
                    }
                }
                failed
            }));
        }
        Load { stop, ok, tasks }
    }

    async fn progress(&self, n: u32) {
        use std::sync::atomic::Ordering;
        let target = self.ok.load(Ordering::Relaxed) + n;
        wait::until("load makes progress", TIMEOUT, || async move {
            self.ok.load(Ordering::Relaxed) >= target
        })
        .await
        .unwrap();
    }

    async fn finish(self) -> (u32, u32) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut failed = 0;
        for t in self.tasks {
            failed += t.await.unwrap();
        }
        (self.ok.load(std::sync::atomic::Ordering::Relaxed), failed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_serve_proxies_and_losing_one_fails_no_request() {
    let (api, c) = cluster().await;
    let app = HttpBackend::start("catalog-app").await.unwrap();
    let (bind, bind2, inbound) = (free_addr(), free_addr(), free_addr());
    let (t_web, t_cat) = (
        sa_token(&c, "web", "sinew").await,
        sa_token(&c, "catalog", "sinew").await,
    );
    service(&c, "catalog").await;
    sidecar_pod(&c, inbound).await;
    slice(&c, "catalog-a", "catalog", "catalog-1", app.addr(), true).await;
    client_proxy(&c, bind, "catalog").await;
    apply(
        &c,
        &sinew_kind("Proxy", "proxies"),
        json!({"metadata": {"name": "client-b"},
               "spec": {"outbound": {"upstreams": [{"bind": bind2.to_string(), "service": "catalog"}]}}}),
    )
    .await;

    // Two replicas with one CA (on Kubernetes: a Secret both mount), and a short Lease.
    let dir = Scratch::new();
    let ca = dir.0.join("ca");
    let ca_arg = ca.to_str().unwrap();
    let extra = ["--ca-dir", ca_arg, "--lease-duration-secs", "2"];
    let a = control(&api, &dir, &extra).await;
    let b = control(&api, &dir, &extra).await;
    let front = Front::start(vec![a.addr, b.addr]).await;

    // Real proxies, through the front (so on replica a); one more straight on b.
    let roots = a.roots_file();
    let _catalog = proxy_process(&dir, front.addr, &roots, "shop/catalog-1", &t_cat).await;
    let _web = proxy_process(&dir, front.addr, &roots, "shop/client", &t_web).await;
    let t_web2 = sa_token(&c, "web", "sinew").await;
    let _web2 = proxy_process(&dir, b.addr, &roots, "shop/client-b", &t_web2).await;
    mesh::listening(bind).await;
    mesh::listening(bind2).await;
    for b in [bind, bind2] {
        wait::until("path serves", TIMEOUT, || async move {
            client::get(b, "catalog", "/")
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await
        .unwrap();
    }
    // Both replicas computed the same mesh from the API server.
    let docs = |cp: &Control| {
        let (url, cred) = (cp.url.clone(), cp.credentials.clone());
        async move {
            let out = mesh::sinew_as(
                &url,
                Some(&cred),
                &["get", "workloads", "-n", "shop", "-o", "json"],
            )
            .await;
            assert!(out.status.success(), "{:?}", mesh::text(&out));
            mesh::text(&out).0
        }
    };
    let on_a = docs(&a).await;
    assert!(
        on_a.contains("catalog-1") && on_a.contains("\"serviceAccount\": \"catalog\""),
        "{on_a}"
    );
    assert_eq!(on_a, docs(&b).await);
    let a_at = (a.url.clone(), a.credentials.clone());
    let b_at = (b.url.clone(), b.credentials.clone());
    wait::until("a serves two proxies, b one", TIMEOUT, || {
        let (a_at, b_at) = (a_at.clone(), b_at.clone());
        async move { in_sync(&a_at).await == 2 && in_sync(&b_at).await == 1 }
    })
    .await
    .unwrap();

    // Load through both client proxies; replica a dies.
    let load = Load::start(bind, 2).await;
    let load2 = Load::start(bind2, 1).await;
    load.progress(100).await;
    a.kill().await;
    load.progress(100).await;
    wait::until("every proxy moved to b", TIMEOUT, || {
        let b_at = b_at.clone();
        async move { in_sync(&b_at).await == 3 }
    })
    .await
    .unwrap();
    load.progress(100).await;
    load2.progress(50).await;

    // b took the status-writer Lease over: a new invalid resource gets its condition.
    let policies = sinew_kind("TrafficPolicy", "trafficpolicies");
    apply(
        &c,
        &policies,
        json!({"metadata": {"name": "late"}, "spec": {"targetRef": {"kind": "Deployment", "name": "catalog"}}}),
    )
    .await;
    let cc = c.clone();
    wait::until("the surviving replica writes statuses", TIMEOUT, || {
        let (c, p) = (cc.clone(), policies.clone());
        async move { matches!(accepted(&c, &p, "late").await, Some((st, _)) if st == "False") }
    })
    .await
    .unwrap();

    let (ok, failed) = load.finish().await;
    let (ok2, failed2) = load2.finish().await;
    assert_eq!(
        failed + failed2,
        0,
        "{failed}+{failed2} of {} requests failed",
        ok + ok2 + failed + failed2
    );
}

/// How many proxies a replica serves that have applied their latest config.
async fn in_sync((url, cred): &(String, std::path::PathBuf)) -> usize {
    use sinew_api::v1::ProxyStatusRequest;
    let Ok(mut c) = mesh::admin_client(url, cred).await else {
        return 0;
    };
    let Ok(s) = c.proxy_status(ProxyStatusRequest {}).await else {
        return 0;
    };
    s.into_inner()
        .proxies
        .iter()
        .filter(|p| {
            p.connected && !p.applied_version.is_empty() && p.applied_version == p.latest_version
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_endpoint_slices_core_endpoints_are_read() {
    // A server that serves no EndpointSlice API: API discovery finds core Endpoints.
    let (api, c) = cluster_with(&["--runtime-config=discovery.k8s.io/v1beta1=false"]).await;
    assert!(
        c.list_api_group_resources("discovery.k8s.io/v1beta1")
            .await
            .is_err(),
        "the API server still serves EndpointSlices"
    );
    // Endpoints may not hold loopback addresses: the backends are reached through
    // forwarders on this host's own address.
    let host = host_ip();
    let b1 = HttpBackend::start("v1").await.unwrap();
    let b2 = HttpBackend::start("v2").await.unwrap();
    let f1 = Front::start_on(host, vec![b1.addr()]).await;
    let f2 = Front::start_on(host, vec![b2.addr()]).await;
    let (v1, v2) = (&f1, &f2);
    service(&c, "web").await;
    pod(&c, "web-v1", "v1", "web").await;
    pod(&c, "web-v2", "v2", "web").await;
    let endpoints = |ready: SocketAddr, not_ready: SocketAddr| {
        let addr = |a: SocketAddr, pod: &str| json!({"ip": a.ip().to_string(), "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop"}});
        // Both on 127.0.0.1 with their own ports: one subset each.
        json!({
            "metadata": {"name": "web"},
            "subsets": [
                {"addresses": [addr(ready, "web-v1")], "ports": [{"name": "http", "port": ready.port(), "protocol": "TCP"}]},
                {"notReadyAddresses": [addr(not_ready, "web-v2")], "ports": [{"name": "http", "port": not_ready.port(), "protocol": "TCP"}]}
            ]
        })
    };
    let core = ar("", "v1", "Endpoints", "endpoints");
    apply(&c, &core, endpoints(v1.addr(), v2.addr())).await;
    let bind = free_addr();
    client_proxy(&c, bind, "web").await;
    let dir = Scratch::new();
    let cp = control(&api, &dir, &[]).await;
    let proxy = mesh::proxy(&cp, "shop/client", None, Duration::from_millis(100)).await;
    mesh::listening(bind).await;
    until_served_by(bind, "v1").await;
    assert!(
        !config_has(&proxy, v2.addr()).await,
        "a not-ready address is no endpoint"
    );
    // Readiness flips: the proxy follows.
    apply(&c, &core, endpoints(v2.addr(), v1.addr())).await;
    let p = &proxy;
    let (a1, a2) = (v1.addr(), v2.addr());
    wait::until(
        "endpoints flipped in the proxy's config",
        TIMEOUT,
        || async move { config_has(p, a2).await && !config_has(p, a1).await },
    )
    .await
    .unwrap();
    until_served_by(bind, "v2").await;
}

/// This host's own (non-loopback) IPv4 address: the source address of its default route.
fn host_ip() -> std::net::IpAddr {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    // No packet is sent: connecting a UDP socket only picks the route.
    s.connect("192.0.2.1:9")
        .or_else(|_| s.connect("10.255.255.1:9"))
        .expect("this test needs a non-loopback IPv4 address with a route (core Endpoints refuse loopback)");
    let ip = s.local_addr().unwrap().ip();
    assert!(
        !ip.is_loopback() && !ip.is_unspecified(),
        "no non-loopback address: {ip}"
    );
    ip
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_published_least_privilege_rbac_is_enough() {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    // RBAC enforced (the admin token is in system:masters); the control plane runs as a
    // service account holding only sinew_k8s::rbac's roles.
    let (api, c) = cluster_with(&["--authorization-mode=RBAC"]).await;
    let pp = PostParams::default();
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "sinew-system"}})).unwrap();
    Api::<Namespace>::all(c.clone())
        .create(&pp, &ns)
        .await
        .unwrap();
    let sa: ServiceAccount = serde_json::from_value(
        json!({"metadata": {"name": "sinew-control", "namespace": "sinew-system"}}),
    )
    .unwrap();
    let sas = Api::<ServiceAccount>::namespaced(c.clone(), "sinew-system");
    sas.create(&pp, &sa).await.unwrap();
    Api::<ClusterRole>::all(c.clone())
        .create(&pp, &sinew_k8s::rbac::cluster_role())
        .await
        .unwrap();
    Api::<Role>::namespaced(c.clone(), "sinew-system")
        .create(&pp, &sinew_k8s::rbac::lease_role("sinew-system"))
        .await
        .unwrap();
    let subject =
        json!([{"kind": "ServiceAccount", "name": "sinew-control", "namespace": "sinew-system"}]);
    let crb: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "sinew-control"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "sinew-control"},
        "subjects": subject
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(c.clone())
        .create(&pp, &crb)
        .await
        .unwrap();
    let rb: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "sinew-control", "namespace": "sinew-system"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sinew-control"},
        "subjects": subject
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(c.clone(), "sinew-system")
        .create(&pp, &rb)
        .await
        .unwrap();
    let req = k8s_openapi::api::authentication::v1::TokenRequest {
        spec: k8s_openapi::api::authentication::v1::TokenRequestSpec {
            audiences: vec![sinew_testkit::kube::API_AUDIENCE.to_owned()],
            ..Default::default()
        },
        ..Default::default()
    };
    let token = sas
        .create_token_request("sinew-control", &pp, &req)
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    // The service account really is restricted: it cannot read Secrets.
    let restricted = api.client_for("control", &token).await.unwrap();
    assert!(
        Api::<k8s_openapi::api::core::v1::Secret>::all(restricted.clone())
            .list(&Default::default())
            .await
            .is_err()
    );
    // Secrets only in its own namespace (the CA's, the webhook's and the join tokens'):
    // one in another namespace is refused.
    let other: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(json!({"metadata": {"name": "other", "namespace": "shop"}}))
            .unwrap();
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(c.clone(), "shop")
        .create(&pp, &other)
        .await
        .unwrap();
    assert!(
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(restricted.clone(), "shop")
            .get("other")
            .await
            .is_err()
    );
    // The webhook's part: its certificate's Secret made, and the caBundle of its own
    // configuration set, with that role.
    let mwc: k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration =
        serde_json::from_value(json!({
            "metadata": {"name": "sinew-injector"},
            "webhooks": [{
                "name": "inject.sinew.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                "clientConfig": {"service": {"name": "sinew-control", "namespace": "sinew-system"}},
                "namespaceSelector": {"matchLabels": {"sinew.dev/inject": "enabled"}},
            }],
        }))
        .unwrap();
    Api::<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration>::all(
        c.clone(),
    )
    .create(&pp, &mwc)
    .await
    .unwrap();
    let tls = sinew_k8s::ca::load_or_create(
        &restricted,
        "sinew-system",
        "sinew-webhook-tls",
        "Opaque",
        &["ca.crt"],
        || Ok([("ca.crt".to_owned(), "a CA".to_owned())].into()),
    )
    .await
    .unwrap();
    sinew_k8s::ca::set_ca_bundle(
        &restricted,
        "sinew-injector",
        "inject.sinew.dev",
        &tls["ca.crt"],
    )
    .await
    .unwrap();

    let v1 = HttpBackend::start("v1").await.unwrap();
    service(&c, "web").await;
    pod(&c, "web-v1", "v1", "web").await;
    slice(&c, "web-a", "web", "web-v1", v1.addr(), true).await;
    let bind = free_addr();
    client_proxy(&c, bind, "web").await;
    let policies = sinew_kind("TrafficPolicy", "trafficpolicies");
    apply(
        &c,
        &policies,
        json!({"metadata": {"name": "bad"}, "spec": {"targetRef": {"kind": "Deployment", "name": "web"}}}),
    )
    .await;
    let t_web = sa_token(&c, "web", "sinew").await;

    let dir = Scratch::new();
    let kubeconfig = api.kubeconfig_for_token("control", &token).unwrap();
    let cp = Control::start_env(
        &dir.0.join("data"),
        free_addr(),
        &[
            "--kubernetes",
            "--lease-namespace",
            "sinew-system",
            "--namespace",
            "sinew-system",
            "--ca-secret",
            "sinew-ca",
        ],
        &[("KUBECONFIG", kubeconfig.as_os_str())],
    )
    .await;
    // The CA Secret was made with that role, and is the CA it serves with.
    let own_ns = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(c.clone(), "sinew-system");
    let ca = own_ns.get("sinew-ca").await.unwrap().data.unwrap();
    assert!(
        String::from_utf8_lossy(&ca["ca.pem"].0).contains("BEGIN CERTIFICATE"),
        "{ca:?}"
    );
    // A rotation through one replica would split the replicas sharing that CA: refused,
    // saying why.
    let out = cp.sinew(&["ca", "rotate", "start"]).await;
    let (o, e) = mesh::text(&out);
    assert!(
        !out.status.success() && e.contains("Secret sinew-system/sinew-ca"),
        "{o}{e}"
    );
    // Discovery, TokenReview, the Lease, status and Events all work with that role.
    let _proxy = mesh::proxy_with_token(
        &cp,
        "shop/client",
        None,
        Duration::from_millis(100),
        Some(t_web),
    )
    .await;
    mesh::listening(bind).await;
    until_served_by(bind, "v1").await;
    let cc = c.clone();
    wait::until("status written under RBAC", TIMEOUT, || {
        let (c, p) = (cc.clone(), policies.clone());
        async move { matches!(accepted(&c, &p, "bad").await, Some((st, _)) if st == "False") }
    })
    .await
    .unwrap();
    warning_event(&c, "bad", "targetRef").await;

    // `sinew apply`, join tokens and credentials work with that role too: the custom
    // resource is written, the token is a Secret in its namespace.
    mesh::apply(&cp, &dir, &mesh::route_to("shop", "web", "web")).await;
    let routes = ar("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes");
    Api::<DynamicObject>::namespaced_with(c.clone(), "shop", &routes)
        .get("web")
        .await
        .unwrap();
    let t = mesh::token(&cp, "shop", "web").await;
    let tokens = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(c.clone(), "sinew-system")
        .list(&kube::api::ListParams::default().labels("sinew.dev/join-token"))
        .await
        .unwrap();
    assert_eq!(tokens.items.len(), 1);
    let out = cp.sinew(&["token", "list"]).await;
    assert!(out.status.success(), "{:?}", mesh::text(&out));
    mesh::bootstrap(&cp, "shop", "spent", &t).await.unwrap();
    let out = cp.sinew(&["credentials", "revoke", "nobody"]).await;
    assert!(out.status.success(), "{:?}", mesh::text(&out));
}

/// Waits for a Warning Event about `shop/<name>` whose message contains `text`.
async fn warning_event(c: &Client, name: &str, text: &str) {
    let events = Api::<Event>::namespaced(c.clone(), "shop");
    let events = &events;
    wait::until(
        &format!("a Warning Event about {name}"),
        TIMEOUT,
        || async move {
            events.list(&Default::default()).await.is_ok_and(|l| {
                l.items.iter().any(|e| {
                    e.involved_object.name.as_deref() == Some(name)
                        && e.type_.as_deref() == Some("Warning")
                        && e.message.as_deref().is_some_and(|m| m.contains(text))
                })
            })
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn renewals_ride_the_certificate_not_the_token() {
    let (api, c) = cluster().await;
    let dir = Scratch::new();
    let file = dir.write("token", &sa_token(&c, "web", "sinew").await);
    // Short certificates: renewal comes after about 3 s.
    let cp = control(&api, &dir, &["--cert-ttl", "4s"]).await;
    let mut settings = sinew_proxy::control::ControlSettings::new(cp.url.clone(), "shop/client");
    settings.join_token = Some(std::fs::read_to_string(&file).unwrap());
    settings.join_token_file = Some(file.clone());
    settings.control_plane_ca = Some(cp.roots_file());
    settings.min_backoff = Duration::from_millis(50);
    let proxy = mesh::start_proxy(settings).await;
    let id = |p: &sinew_proxy::Proxy| p.shared().certs.identity().map(|i| i.to_string());
    assert_eq!(
        id(&proxy).as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/web")
    );
    let first = proxy.shared().certs.not_after().unwrap();
    // The kubelet replaces the projected token; here, with one of another account:
    // a renewal is authenticated by the certificate, so the identity stays.
    let next = sa_token(&c, "web-next", "sinew").await;
    std::fs::write(&file, next).unwrap();
    let p = &proxy;
    wait::until("renewed twice", TIMEOUT, || async move {
        p.shared()
            .certs
            .not_after()
            .is_some_and(|t| t >= first + Duration::from_secs(4))
    })
    .await
    .unwrap();
    assert_eq!(
        id(&proxy).as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/web")
    );
    proxy.shutdown().await;
}

/// The `lastNack` of every proxy the control plane serves that has one, from
/// `sinew proxy-status -o json`.
async fn nacks(cp: &Control) -> Vec<String> {
    let (out, _) = mesh::text(&cp.sinew(&["proxy-status", "-A", "-o", "json"]).await);
    let items: Vec<Value> = serde_json::from_str(&out).unwrap_or_default();
    items
        .iter()
        .filter_map(|p| p["lastNack"].as_str().filter(|s| !s.is_empty()))
        .map(|s| format!("{}: {s}", p_name(&items, s)))
        .collect()
}

fn p_name(items: &[Value], nack: &str) -> String {
    items
        .iter()
        .find(|p| p["lastNack"] == nack)
        .and_then(|p| p["proxy"].as_str())
        .unwrap_or_default()
        .to_owned()
}

async fn until_accepted(c: &Client, r: &ApiResource, name: &str, status: &str, text: &str) {
    let what = format!("{} {name} Accepted={status} mentioning {text:?}", r.kind);
    wait::until(&what, TIMEOUT, || async {
        matches!(accepted(c, r, name).await, Some((st, msg)) if st == status && msg.contains(text))
    })
    .await
    .unwrap();
}

/// An HTTPRoute whose backend port the Service does not have is refused with status,
/// naming the port, and never reaches a proxy: a proxy started after it is ready, and
/// no proxy refuses anything. When a Service changes so that a good route goes bad,
/// the route is taken out (with status), not sent. Of two TrafficPolicies for one
/// Service, the valid one applies and the invalid one is refused, whatever their names.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_route_every_proxy_would_refuse_is_refused_with_status_and_no_proxy_goes_unready() {
    let (api, c) = cluster().await;
    let v1 = HttpBackend::start("v1").await.unwrap();
    for s in ["web", "web-v1"] {
        service(&c, s).await;
    }
    pod(&c, "web-1", "v1", "web").await;
    slice(&c, "web-v1-a", "web-v1", "web-1", v1.addr(), true).await;
    slice(&c, "web-a", "web", "web-1", v1.addr(), true).await;
    let bind = free_addr();
    client_proxy(&c, bind, "web").await;
    let routes = ar("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes");
    let route = |port: u16| {
        json!({
            "metadata": {"name": "web"},
            "spec": {"parentRefs": [{"kind": "Service", "name": "web"}],
                     "rules": [{"backendRefs": [{"name": "web-v1", "port": port}]}]}
        })
    };
    apply(&c, &routes, route(9999)).await;
    // The invalid policy sorts first: it must not claim web.
    let policies = sinew_kind("TrafficPolicy", "trafficpolicies");
    apply(
        &c,
        &policies,
        json!({"metadata": {"name": "a-bad"},
               "spec": {"targetRef": {"kind": "Service", "name": "web"}, "ringHash": {}}}),
    )
    .await;
    apply(
        &c,
        &policies,
        json!({"metadata": {"name": "b-good"},
               "spec": {"targetRef": {"kind": "Service", "name": "web"},
                        "circuitBreaker": {"maxRequests": 100}}}),
    )
    .await;

    let dir = Scratch::new();
    let cp = control(&api, &dir, &[]).await;
    // Started after the bad route: ready (this waits for it), and traffic flows.
    let proxy = mesh::proxy(&cp, "shop/client", None, Duration::from_millis(100)).await;
    mesh::listening(bind).await;
    until_served_by(bind, "v1").await;
    until_accepted(
        &c,
        &routes,
        "web",
        "False",
        "spec.rules[0].backendRefs[0].port: service shop/web-v1 has no port 9999",
    )
    .await;
    until_accepted(&c, &policies, "b-good", "True", "").await;
    until_accepted(&c, &policies, "a-bad", "False", "spec.ringHash").await;
    let (_, msg) = accepted(&c, &policies, "a-bad").await.unwrap();
    assert!(!msg.contains("already has"), "{msg}");
    // The valid policy is what the proxy runs.
    let config = client::get(proxy.admin_addr(), "admin", "/config")
        .await
        .unwrap()
        .text()
        .replace(char::is_whitespace, "");
    assert!(config.contains("\"maxRequests\":100"), "{config}");
    assert_eq!(nacks(&cp).await, Vec::<String>::new());

    // Fixed: accepted, and it applies.
    apply(&c, &routes, route(80)).await;
    until_accepted(&c, &routes, "web", "True", "").await;

    // The backend Service changes its port: the route goes bad, and is taken out with
    // status rather than sent; the proxy stays ready and refuses nothing.
    Api::<Service>::namespaced(c.clone(), "shop")
        .patch(
            "web-v1",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}}),
            ),
        )
        .await
        .unwrap();
    until_accepted(
        &c,
        &routes,
        "web",
        "False",
        "service shop/web-v1 has no port 80",
    )
    .await;
    let (status, body) = mesh::ready(&proxy).await;
    assert_eq!(status, 200, "{body}");
    // A proxy started now is ready too.
    let bind2 = free_addr();
    apply(
        &c,
        &sinew_kind("Proxy", "proxies"),
        json!({"metadata": {"name": "late"},
               "spec": {"outbound": {"upstreams": [{"bind": bind2.to_string(), "service": "web"}]}}}),
    )
    .await;
    let late = mesh::proxy(&cp, "shop/late", None, Duration::from_millis(100)).await;
    mesh::listening(bind2).await;
    assert_eq!(who(bind2).await.as_deref(), Some("v1"));
    assert_eq!(nacks(&cp).await, Vec::<String>::new());
    late.shutdown().await;
    proxy.shutdown().await;
}

/// A proxy that refused its first configuration (a binding on a port that is taken:
/// only the proxy can know) is not ready and keeps asking for a full configuration;
/// when the resource is fixed it gets one and is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_proxy_that_refused_its_first_config_heals_when_the_resource_is_fixed() {
    let (api, c) = cluster().await;
    let v1 = HttpBackend::start("v1").await.unwrap();
    service(&c, "web").await;
    pod(&c, "web-1", "v1", "web").await;
    slice(&c, "web-a", "web", "web-1", v1.addr(), true).await;
    let (bind, busy) = (free_addr(), v1.addr());
    let proxies = sinew_kind("Proxy", "proxies");
    let client = |binds: &[SocketAddr]| {
        let ups: Vec<Value> = binds
            .iter()
            .map(|b| json!({"bind": b.to_string(), "service": "web"}))
            .collect();
        json!({"metadata": {"name": "client"}, "spec": {"outbound": {"upstreams": ups}}})
    };
    apply(&c, &proxies, client(&[bind, busy])).await;
    let dir = Scratch::new();
    let cp = control(&api, &dir, &[]).await;
    // The proxy's first view holds the taken port: the control plane has the
    // cluster's state (it wrote the status) before the proxy connects.
    until_accepted(&c, &proxies, "client", "True", "").await;
    let proxy = mesh::proxy_unready(&cp, "shop/client", Duration::from_millis(100)).await;
    let busy_text = format!("cannot listen on {busy}");
    let cp_ref = &cp;
    wait::until("the first push is refused", TIMEOUT, || async {
        nacks(cp_ref).await.iter().any(|n| n.contains(&busy_text))
    })
    .await
    .unwrap();
    let (status, body) = mesh::ready(&proxy).await;
    assert_eq!(status, 503, "{body}");

    // Something else in its view changes meanwhile: refused again for what it holds.
    slice(&c, "web-b", "web", "web-1", free_addr(), true).await;
    let p = &proxy;
    wait::until("the changed view is refused too", TIMEOUT, || async {
        mesh::nacked(p).await >= 2
    })
    .await
    .unwrap();
    let (status, body) = mesh::ready(&proxy).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&busy_text),
        "refused for what it holds, not for a missing base: {body}"
    );

    apply(&c, &proxies, client(&[bind])).await;
    wait::until("the proxy is ready", TIMEOUT, || async {
        mesh::ready(p).await.0 == 200
    })
    .await
    .unwrap();
    until_served_by(bind, "v1").await;
    wait::until("no refusal left", TIMEOUT, || async {
        nacks(cp_ref).await.is_empty()
    })
    .await
    .unwrap();
    proxy.shutdown().await;
}

/// `sinew <args>` against `cp` with the credential in `cred`: (success, stdout, stderr).
async fn sinew_on(cp: &Control, cred: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = mesh::sinew_as(&cp.url, Some(cred), args).await;
    let (o, e) = mesh::text(&out);
    (out.status.success(), o, e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_share_applied_routes_tokens_and_revocations_through_the_api_server() {
    use k8s_openapi::api::core::v1::Secret;
    let (api, c) = cluster().await;
    let v1 = HttpBackend::start("v1").await.unwrap();
    let v2 = HttpBackend::start("v2").await.unwrap();
    service(&c, "web").await;
    service(&c, "web-v2").await;
    pod(&c, "web-v1", "v1", "web").await;
    pod(&c, "web-v2", "v2", "web").await;
    slice(&c, "web-a", "web", "web-v1", v1.addr(), true).await;
    slice(&c, "web-v2-a", "web-v2", "web-v2", v2.addr(), true).await;
    let bind = free_addr();
    client_proxy(&c, bind, "web").await;

    // Two replicas with fresh data directories and one CA (the CA's Secret is not this
    // test's subject).
    let dir = Scratch::new();
    let ca = dir.0.join("ca");
    let extra = ["--ca-dir", ca.to_str().unwrap()];
    let a = control(&api, &dir, &extra).await;
    let b = control(&api, &dir, &extra).await;

    // The operator's first credential is in a Secret (the image has no shell to read a
    // file with), made once, and it works on either replica.
    let secrets = Api::<Secret>::namespaced(c.clone(), "default");
    let first = secrets
        .get("sinew-admin-credential")
        .await
        .expect("the admin credential's Secret");
    let file = first.data.unwrap()["admin.credentials"].0.clone();
    let from_secret = dir.write(
        "from-secret.credentials",
        std::str::from_utf8(&file).unwrap(),
    );
    for cp in [&a, &b] {
        let (ok, out, err) = sinew_on(cp, &from_secret, &["credentials", "list"]).await;
        assert!(ok && out.contains("admin"), "{out}{err}");
    }

    // A join token made on a (the real CLI) bootstraps a proxy through b.
    let token = mesh::token(&a, "shop", "web").await;
    let proxy = mesh::proxy_with_token(
        &b,
        "shop/client",
        None,
        Duration::from_millis(100),
        Some(token),
    )
    .await;
    mesh::listening(bind).await;
    until_served_by(bind, "v1").await;

    // The token's Secret holds its hash and binding, never the token.
    let secrets = secrets
        .list(&kube::api::ListParams::default().labels("sinew.dev/join-token"))
        .await
        .unwrap();
    assert!(
        secrets.items.is_empty(),
        "a single-use token is gone once spent: {:?}",
        secrets.items
    );

    // A route applied on a is a custom resource in the API, and b serves it.
    let route = dir.write("route.yaml", &mesh::route_to("shop", "web", "web-v2"));
    let (ok, out, err) = sinew_on(
        &a,
        &a.credentials,
        &["apply", "-f", route.to_str().unwrap()],
    )
    .await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("created"), "{out}");
    let routes = ar("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes");
    let cr = Api::<DynamicObject>::namespaced_with(c.clone(), "shop", &routes)
        .get("web")
        .await
        .expect("the applied route is a custom resource");
    assert!(
        cr.metadata
            .managed_fields
            .unwrap_or_default()
            .iter()
            .any(|m| m.manager.as_deref() == Some("sinew")),
        "written by server-side apply as the field manager sinew"
    );
    assert_eq!(
        cr.data["spec"]["rules"][0]["backendRefs"][0]["name"],
        "web-v2"
    );
    until_served_by(bind, "v2").await;
    assert!(config_has(&proxy, v2.addr()).await);
    let (ok, out, err) = sinew_on(&b, &b.credentials, &["get", "httproutes", "-n", "shop"]).await;
    assert!(ok && out.contains("web"), "{out}{err}");
    // Applying it again changes nothing.
    let (ok, out, err) = sinew_on(
        &b,
        &b.credentials,
        &["apply", "-f", route.to_str().unwrap()],
    )
    .await;
    assert!(ok && out.contains("unchanged"), "{out}{err}");

    // A route that does not validate is refused, with the reason, and never written.
    let bad = dir.write(
        "bad.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: bad, namespace: shop}\nspec:\n  parentRefs: [{kind: Service, name: nowhere}]\n  rules:\n    - backendRefs: [{name: web}]\n",
    );
    let (ok, out, err) =
        sinew_on(&a, &a.credentials, &["apply", "-f", bad.to_str().unwrap()]).await;
    assert!(!ok && err.contains("nowhere"), "{out}{err}");
    assert!(
        Api::<DynamicObject>::namespaced_with(c.clone(), "shop", &routes)
            .get_opt("bad")
            .await
            .unwrap()
            .is_none()
    );

    // A single-use token cannot be spent twice across replicas, even at once.
    for _ in 0..3 {
        let t = a.join_token("shop", "web").await;
        let (on_a, on_b) = tokio::join!(
            mesh::bootstrap(&a, "shop", "x", &t),
            mesh::bootstrap(&b, "shop", "y", &t)
        );
        let spent = usize::from(on_a.is_ok()) + usize::from(on_b.is_ok());
        assert_eq!(spent, 1, "{on_a:?} / {on_b:?}");
        let refused = on_a.err().or(on_b.err()).unwrap();
        assert!(
            refused.message().contains("unknown join token"),
            "{refused:?}"
        );
    }
    // Three uses, six proxies at once across both replicas: exactly three get in (each
    // use is spent by an update conditioned on the Secret's resourceVersion).
    let (ok, three, err) = sinew_on(
        &a,
        &a.credentials,
        &[
            "token",
            "create",
            "-n",
            "shop",
            "--service-account",
            "web",
            "--uses",
            "3",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let three = three.trim();
    let results = tokio::join!(
        mesh::bootstrap(&a, "shop", "r0", three),
        mesh::bootstrap(&b, "shop", "r1", three),
        mesh::bootstrap(&a, "shop", "r2", three),
        mesh::bootstrap(&b, "shop", "r3", three),
        mesh::bootstrap(&a, "shop", "r4", three),
        mesh::bootstrap(&b, "shop", "r5", three),
    );
    let results = [
        results.0, results.1, results.2, results.3, results.4, results.5,
    ];
    let outcomes: Vec<_> = results
        .iter()
        .map(|r| r.as_ref().map(|_| ()).map_err(|e| e.message().to_owned()))
        .collect();
    assert_eq!(
        outcomes.iter().filter(|r| r.is_ok()).count(),
        3,
        "{outcomes:?}"
    );

    // A token for two proxies, made on b, kept for the restart below.
    let (ok, two, err) = sinew_on(
        &b,
        &b.credentials,
        &[
            "token",
            "create",
            "-n",
            "shop",
            "--service-account",
            "web",
            "--uses",
            "2",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let two = two.trim().to_owned();
    mesh::bootstrap(&a, "shop", "z", &two).await.unwrap();
    // Its Secret holds the token's SHA-256 and binding (one use left), never the token.
    let secrets = Api::<Secret>::namespaced(c.clone(), "default")
        .list(&kube::api::ListParams::default().labels("sinew.dev/join-token"))
        .await
        .unwrap();
    assert_eq!(secrets.items.len(), 1);
    let data = secrets.items[0].data.clone().unwrap();
    assert_eq!(
        data.keys().map(String::as_str).collect::<Vec<_>>(),
        ["binding", "sha256"]
    );
    let binding: Value = serde_json::from_slice(&data["binding"].0).unwrap();
    assert_eq!(binding["uses_left"], 1, "{binding}");
    assert_eq!(binding["namespace"], "shop", "{binding}");
    assert_eq!(
        data["sha256"].0,
        sinew_tls::api::sha256_hex(two.as_bytes()).into_bytes()
    );
    let random = two.rsplit('.').next().unwrap();
    assert!(!String::from_utf8_lossy(&data["binding"].0).contains(random));

    // A token revoked on a is refused by b.
    let (ok, _, err) = sinew_on(
        &b,
        &b.credentials,
        &["token", "create", "-n", "shop", "--service-account", "web"],
    )
    .await;
    assert!(ok, "{err}");
    let id = err.split_whitespace().nth(2).unwrap().to_owned();
    let (ok, out, err) = sinew_on(&a, &a.credentials, &["token", "revoke", &id]).await;
    assert!(ok, "{out}{err}");
    let (ok, list, _) = sinew_on(&b, &b.credentials, &["token", "list"]).await;
    assert!(ok && !list.contains(&id), "{list}");

    // A credential revoked on a is refused by b.
    let vera = dir.0.join("vera.credentials");
    let (ok, out, err) = sinew_on(
        &a,
        &a.credentials,
        &[
            "credentials",
            "create",
            "vera",
            "--role",
            "viewer",
            "-o",
            vera.to_str().unwrap(),
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    let (ok, _, err) = sinew_on(&b, &vera, &["get", "httproutes", "-n", "shop"]).await;
    assert!(ok, "{err}");
    let (ok, out, err) = sinew_on(&a, &a.credentials, &["credentials", "revoke", "vera"]).await;
    assert!(ok, "{out}{err}");
    let (bv, vv) = (&b, &vera);
    wait::until("b refuses the revoked credential", TIMEOUT, || async move {
        let (ok, _, err) = sinew_on(bv, vv, &["get", "httproutes", "-n", "shop"]).await;
        !ok && err.contains("\"vera\" was revoked")
    })
    .await
    .unwrap();

    // a restarts with an empty data directory: the route, the token and the
    // revocation are all still there.
    a.kill().await;
    let a = control(&api, &dir, &extra).await;
    let a_at = &a;
    wait::until(
        "the restarted replica has the route",
        TIMEOUT,
        || async move {
            let (ok, out, _) = sinew_on(
                a_at,
                &a_at.credentials,
                &["get", "httproutes", "-n", "shop"],
            )
            .await;
            ok && out.contains("web")
        },
    )
    .await
    .unwrap();
    let (ok, list, err) = sinew_on(&a, &a.credentials, &["token", "list"]).await;
    assert!(ok, "{err}");
    assert!(
        list.contains("spiffe://cluster.local/ns/shop/sa/web"),
        "{list}"
    );
    mesh::bootstrap(&a, "shop", "w", &two).await.unwrap();
    let e = mesh::bootstrap(&b, "shop", "v", &two).await.unwrap_err();
    assert!(e.message().contains("unknown join token"), "{e:?}");
    let (ok, _, err) = sinew_on(&a, &vera, &["get", "httproutes", "-n", "shop"]).await;
    assert!(!ok && err.contains("\"vera\" was revoked"), "{err}");
    let (ok, list, err) = sinew_on(&a, &a.credentials, &["credentials", "list"]).await;
    assert!(ok, "{err}");
    assert!(
        list.lines()
            .any(|l| l.starts_with("vera ") && l.contains("revoked")),
        "{list}"
    );

    // Deleted on the restarted a: gone from the API and from b's proxy.
    let (ok, out, err) = sinew_on(
        &a,
        &a.credentials,
        &["delete", "httproute", "web", "-n", "shop"],
    )
    .await;
    assert!(ok, "{out}{err}");
    assert!(
        Api::<DynamicObject>::namespaced_with(c.clone(), "shop", &routes)
            .get_opt("web")
            .await
            .unwrap()
            .is_none()
    );
    until_served_by(bind, "v1").await;
    // A document that stands for a Kubernetes object is not Sinew's to delete.
    let (ok, out, err) = sinew_on(
        &a,
        &a.credentials,
        &["delete", "service", "web-v2", "-n", "shop"],
    )
    .await;
    assert!(!ok && err.contains("web-v2"), "{out}{err}");
}

/// A backend on loopback that answers every other request with 503 (the first one
/// included) and the rest with 200 `x-backend: flaky`: HTTP/1.1 with keep-alive, for
/// requests without a body. With a retry of 503, every request succeeds.
async fn flaky_backend() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(AtomicU64::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let n = counter.fetch_add(1, Ordering::SeqCst);
                        let reply: &[u8] = if n.is_multiple_of(2) {
                            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
                        } else {
                            b"HTTP/1.1 200 OK\r\nx-backend: flaky\r\ncontent-length: 2\r\n\r\nok"
                        };
                        if s.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (addr, count)
}

/// With the strict upstream-shaped Gateway API CRDs (what a cluster with the Gateway
/// API installed serves, not Sinew's open stand-ins): `sinew install
/// --gateway-api-crds --apply` leaves them alone; Sinew's extensions written inline in an
/// HTTPRoute are pruned (a `Fault` filter refused) by the API server, while a
/// `RoutePolicy` attached to the route's rules carries them to the proxy, where real
/// traffic shows them; unsupported upstream fields and a policy without its target get
/// `Accepted=False`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_gateway_api_routes_take_sinew_extensions_from_a_route_policy() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api = ApiServer::start()
        .await
        .expect("a real kube-apiserver (scripts/kube-envtest build)");
    let c = api.client().await.unwrap();
    let crds = [
        sinew_k8s::crds(),
        sinew_k8s::crd::upstream_gateway_api_crds(),
    ]
    .concat();
    sinew_k8s::install_crds(&c, &crds).await.unwrap();
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "shop"}})).unwrap();
    Api::<Namespace>::all(c.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();

    // `install --gateway-api-crds --apply` does not replace the upstream CRDs.
    let kubeconfig = api.kubeconfig();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sinew"))
        .args(["install", "--kubernetes", "--gateway-api-crds", "--apply"])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    for crd in [
        "httproutes.gateway.networking.k8s.io",
        "grpcroutes.gateway.networking.k8s.io",
    ] {
        assert!(
            err.contains(&format!(
                "CustomResourceDefinition {crd}: exists and was not installed by Sinew"
            )),
            "{err}"
        );
        let got = Api::<CustomResourceDefinition>::all(c.clone())
            .get(crd)
            .await
            .unwrap();
        let text = serde_json::to_string(&got.spec).unwrap();
        assert!(
            !text.contains("x-kubernetes-preserve-unknown-fields"),
            "{crd} was replaced: {text}"
        );
    }
    assert!(
        err.contains("CustomResourceDefinition routepolicies.sinew.dev: applied"),
        "{err}"
    );

    let v1 = HttpBackend::start("v1").await.unwrap();
    let shadow = HttpBackend::start("shadow").await.unwrap();
    let (flaky, flaky_requests) = flaky_backend().await;
    for s in ["web", "web-v1", "web-flaky", "web-shadow", "other"] {
        service(&c, s).await;
    }
    pod(&c, "web-1", "v1", "web").await;
    pod(&c, "web-2", "v2", "web").await;
    pod(&c, "web-3", "v3", "web").await;
    slice(&c, "web-v1-a", "web-v1", "web-1", v1.addr(), true).await;
    slice(&c, "web-flaky-a", "web-flaky", "web-2", flaky, true).await;
    slice(
        &c,
        "web-shadow-a",
        "web-shadow",
        "web-3",
        shadow.addr(),
        true,
    )
    .await;
    let bind = free_addr();
    client_proxy(&c, bind, "web").await;

    let routes = ar("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes");
    // Upstream defaults make an unqualified parent a Gateway: a Service parent says
    // `group: ""`, as GAMMA requires on a real cluster.
    let parent = json!([{"group": "", "kind": "Service", "name": "web", "port": 80}]);
    apply(
        &c,
        &routes,
        json!({
            "metadata": {"name": "web"},
            "spec": {"parentRefs": parent, "rules": [
                {"name": "api", "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                 "backendRefs": [{"name": "web-flaky", "port": 80}]},
                {"name": "chaos", "matches": [{"path": {"type": "PathPrefix", "value": "/chaos"}}],
                 "backendRefs": [{"name": "web-v1", "port": 80}],
                 "timeouts": {"request": "5s", "backendRequest": "2s"}},
                {"name": "plain", "backendRefs": [{"name": "web-v1", "port": 80}],
                 "filters": [{"type": "RequestMirror", "requestMirror": {
                     "backendRef": {"name": "web-shadow", "port": 80},
                     "fraction": {"numerator": 1, "denominator": 1}}}]}
            ]}
        }),
    )
    .await;
    let policies = sinew_kind("RoutePolicy", "routepolicies");
    apply(
        &c,
        &policies,
        json!({"metadata": {"name": "web-api"},
               "spec": {"targetRef": {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                                      "name": "web", "sectionName": "api"},
                        "retry": {"attempts": 2, "codes": [503], "backoff": "5ms",
                                  "budget": {"ratio": 1.0, "minPerSecond": 1000},
                                  "hedge": {"delay": "7s"}}}}),
    )
    .await;
    apply(
        &c,
        &policies,
        json!({"metadata": {"name": "web-chaos"},
               "spec": {"targetRef": {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                                      "name": "web", "sectionName": "chaos"},
                        "fault": {"abort": {"httpStatus": 418, "percent": 100}}}}),
    )
    .await;
    // A GRPCRoute's rule, by name, takes a policy too.
    let grpc_routes = ar("gateway.networking.k8s.io", "v1", "GRPCRoute", "grpcroutes");
    apply(
        &c,
        &grpc_routes,
        json!({"metadata": {"name": "catalog-rpc"},
               "spec": {"parentRefs": parent,
                        "rules": [{"name": "list", "matches": [{"method": {"service": "shop.Catalog", "method": "List"}}],
                                   "backendRefs": [{"name": "web-v1", "port": 80}]}]}}),
    )
    .await;
    apply(
        &c,
        &policies,
        json!({"metadata": {"name": "rpc-list"},
               "spec": {"targetRef": {"kind": "GRPCRoute", "name": "catalog-rpc", "sectionName": "list"},
                        "fault": {"abort": {"httpStatus": 451, "percent": 100}}}}),
    )
    .await;
    apply(
        &c,
        &policies,
        json!({"metadata": {"name": "orphan"},
               "spec": {"targetRef": {"kind": "HTTPRoute", "name": "gone"},
                        "fault": {"abort": {"httpStatus": 503, "percent": 10}}}}),
    )
    .await;

    // Inline, Sinew's extensions do not survive the upstream schema: created (as
    // client-side `kubectl apply` does), the budget and the hedge are pruned and the
    // upstream retry fields stay; a server-side apply is refused outright; a Fault
    // filter is refused.
    let routes_api = Api::<DynamicObject>::namespaced_with(c.clone(), "shop", &routes);
    let route_object = |name: &str, rules: Value| -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "other"}], "rules": rules}
        }))
        .unwrap()
    };
    let inline = route_object(
        "inline",
        json!([{"backendRefs": [{"name": "web-v1", "port": 80}],
                "retry": {"attempts": 2, "codes": [503], "budget": {"ratio": 0.5},
                          "hedge": {"delay": "50ms"}}}]),
    );
    routes_api
        .create(&PostParams::default(), &inline)
        .await
        .unwrap();
    let refused = routes_api
        .patch(
            "inline",
            &PatchParams::apply("test").force(),
            &Patch::Apply(&inline),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("field not declared in schema")
            && refused.contains(".spec.rules[0].retry."),
        "{refused}"
    );
    let inline = routes_api.get("inline").await.unwrap();
    assert_eq!(
        inline.data.pointer("/spec/rules/0/retry"),
        Some(&json!({"attempts": 2, "codes": [503]})),
        "{:?}",
        inline.data
    );
    let faulty = route_object(
        "faulty",
        json!([{"filters": [{"type": "Fault", "fault": {"abort": {"httpStatus": 503, "percent": 10}}}]}]),
    );
    let refused = routes_api
        .create(&PostParams::default(), &faulty)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("Fault"), "{refused}");
    // An upstream field Sinew does not implement is refused, not silently dropped.
    apply(
        &c,
        &routes,
        json!({
            "metadata": {"name": "sticky"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "other"}],
                     "rules": [{"name": "all", "backendRefs": [{"name": "web-v1", "port": 80}],
                                "sessionPersistence": {"type": "Header", "sessionName": "x-session"}}]}
        }),
    )
    .await;

    // A Service parent written without `group: ""` is defaulted to the Gateway API's
    // group: refused, saying so, rather than ignored.
    apply(
        &c,
        &routes,
        json!({"metadata": {"name": "ungrouped"},
               "spec": {"parentRefs": [{"kind": "Service", "name": "other"}],
                        "rules": [{"backendRefs": [{"name": "web-v1", "port": 80}]}]}}),
    )
    .await;

    let dir = Scratch::new();
    let cp = control(&api, &dir, &[]).await;
    let proxy = mesh::proxy(&cp, "shop/client", None, Duration::from_millis(100)).await;
    mesh::listening(bind).await;
    until_served_by(bind, "v1").await;

    // The fault of the policy: every request of the `chaos` rule is aborted with 418.
    wait::until("the policy's fault applies", TIMEOUT, || async move {
        client::get(bind, "web", "/chaos/x")
            .await
            .is_ok_and(|r| r.status == 418)
    })
    .await
    .unwrap();
    // Only there: the other rules are untouched.
    assert_eq!(who(bind).await.as_deref(), Some("v1"));
    // The upstream RequestMirror (its `fraction`, 1/1) copies the `plain` rule's
    // requests to web-shadow.
    let sh = &shadow;
    wait::until("the mirror gets copies", TIMEOUT, || async move {
        sh.requests() > 0
    })
    .await
    .unwrap();
    let r = client::get(bind, "web", "/shop.Catalog/List")
        .await
        .unwrap();
    assert_eq!(r.status, 451, "the GRPCRoute rule's policy");
    // The proxy's running config carries the policy's retry (budget and hedge) on the
    // `api` rule, the route's own timeouts on `chaos`.
    let config: Value = serde_json::from_str(
        &client::get(proxy.admin_addr(), "admin", "/config")
            .await
            .unwrap()
            .text(),
    )
    .unwrap();
    let config = config.to_string();
    for want in [
        "\"budgetRatio\":1.0",
        "\"budgetMinPerSecond\":1000",
        "\"delayMs\":7000",
        "418",
    ] {
        assert!(config.contains(want), "{want} in {config}");
    }
    // The retries rescue the flaky backend: each of its first tries fails with 503.
    let before = flaky_requests.load(std::sync::atomic::Ordering::SeqCst);
    for i in 0..10 {
        let r = client::get(bind, "web", &format!("/api/{i}"))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(r.headers.get("x-backend").unwrap(), "flaky");
    }
    let tries = flaky_requests.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert_eq!(tries, 20, "every request needed its retry");

    // Statuses: the route and its policies accepted; the orphan policy's target is not
    // found; the sticky route is refused, saying why.
    let cc = c.clone();
    let (r, p) = (routes.clone(), policies.clone());
    wait::until("statuses written", TIMEOUT, || {
        let (c, r, p) = (cc.clone(), r.clone(), p.clone());
        async move {
            matches!(accepted(&c, &r, "web").await, Some((st, _)) if st == "True")
                && matches!(accepted(&c, &p, "web-api").await, Some((st, _)) if st == "True")
                && matches!(accepted(&c, &p, "web-chaos").await, Some((st, _)) if st == "True")
                && matches!(accepted(&c, &p, "rpc-list").await, Some((st, _)) if st == "True")
                && matches!(accepted(&c, &p, "orphan").await, Some((st, _)) if st == "False")
                && matches!(accepted(&c, &r, "sticky").await, Some((st, _)) if st == "False")
                && matches!(accepted(&c, &r, "ungrouped").await, Some((st, _)) if st == "False")
        }
    })
    .await
    .unwrap();
    let orphan = Api::<DynamicObject>::namespaced_with(c.clone(), "shop", &policies)
        .get("orphan")
        .await
        .unwrap();
    let cond = orphan
        .data
        .pointer("/status/conditions/0")
        .cloned()
        .unwrap();
    assert_eq!(cond["reason"], "TargetNotFound", "{cond}");
    assert!(
        cond["message"]
            .as_str()
            .unwrap()
            .contains("HTTPRoute shop/gone does not exist"),
        "{cond}"
    );
    let (_, msg) = accepted(&c, &routes, "sticky").await.unwrap();
    assert!(msg.contains("sessionPersistence"), "{msg}");
    let (_, msg) = accepted(&c, &routes, "ungrouped").await.unwrap();
    assert!(msg.contains("group \"\""), "{msg}");
    proxy.shutdown().await;
}
