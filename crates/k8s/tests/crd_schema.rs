//! Sinew's CRDs and their generated OpenAPI schemas on a real kube-apiserver: they install,
//! the API server accepts a valid document of every kind unchanged, refuses a wrongly typed
//! one itself (naming the field), prunes an unknown one, and publishes the model's doc
//! comments for `kubectl explain`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::{Value, json};
use sinew_k8s::crd::SINEW_KINDS;
use sinew_model::resource::Resource;
use sinew_testkit::kube::ApiServer;
use sinew_testkit::wait;

const TIMEOUT: Duration = Duration::from_secs(30);

async fn cluster() -> (ApiServer, Client) {
    let api = ApiServer::start()
        .await
        .expect("a real kube-apiserver (scripts/kube-envtest build)");
    let c = api.client().await.unwrap();
    sinew_k8s::install_crds(&c, &sinew_k8s::crds())
        .await
        .expect("the CRDs install");
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "shop"}})).unwrap();
    Api::<Namespace>::all(c.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    (api, c)
}

fn api(c: &Client, kind: &str) -> Api<DynamicObject> {
    let k = SINEW_KINDS.iter().find(|k| k.kind == kind).unwrap();
    let r = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(k.group, k.version, k.kind),
        k.plural,
    );
    Api::namespaced_with(c.clone(), "shop", &r)
}

/// Creates `kind` named `name` with `spec` in `shop`.
async fn create(c: &Client, kind: &str, name: &str, spec: Value) -> Result<DynamicObject, String> {
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "sinew.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "shop"},
        "spec": spec,
    }))
    .unwrap();
    api(c, kind)
        .create(&PostParams::default(), &obj)
        .await
        .map_err(|e| match e {
            kube::Error::Api(s) => format!("{} ({}): {}", s.reason, s.code, s.message),
            other => panic!("not an API server answer: {other}"),
        })
}

/// A valid document of every Sinew kind, using many of its fields: int-or-string ports,
/// enums, nested objects, arrays of objects, maps, numbers and booleans.
fn valid_specs() -> Vec<(&'static str, Value)> {
    vec![
        (
            "Proxy",
            json!({
                "inbound": {"bind": "0.0.0.0:4143", "appAddress": "127.0.0.1", "ports": [8080]},
                "outbound": {
                    "upstreams": [
                        {"bind": "127.0.0.1:9001", "service": "catalog", "port": "http"},
                        {"bind": "127.0.0.1:9002", "service": "cart.shop", "port": 80, "protocol": "GRPC"}
                    ],
                    "httpProxy": {"bind": "127.0.0.1:4140"}
                },
                "clusterDomain": "cluster.local",
                "workload": "web-1",
                "accessLog": {"format": "text"},
                "capture": {"outboundPort": 15001, "inboundPort": 15006, "opaquePorts": [3306],
                            "detectTimeout": "100ms", "dnsPort": 15053}
            }),
        ),
        (
            "Service",
            json!({
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "HTTP2"}],
                "selector": {"app": "web", "version": "v2"},
                "loadBalancer": "RoundRobin",
                "mtls": {"mode": "PERMISSIVE"},
                "virtualIP": "240.240.0.10"
            }),
        ),
        (
            "Workload",
            json!({
                "service": "web",
                "address": "10.0.0.7",
                "ports": {"http": 8080},
                "sidecar": {"port": 4143},
                "serviceAccount": "web"
            }),
        ),
        (
            "MeshConfig",
            json!({
                "clusterDomain": "cluster.local",
                "defaultLoadBalancer": "PeakEWMA",
                "trustDomain": "example.org",
                "mtls": {"mode": "STRICT"},
                "defaultAuthorization": "DENY",
                "tracing": {"endpoint": "http://127.0.0.1:4318", "protocol": "http/protobuf",
                            "samplingRatio": 0.25, "alwaysSampleErrors": false},
                "outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"},
                "virtualIPRange": "240.240.0.0/16"
            }),
        ),
        (
            "TrafficPolicy",
            json!({
                "targetRef": {"kind": "Service", "name": "web"},
                "circuitBreaker": {"maxRequests": 100, "maxPendingRequestsPerEndpoint": 4},
                "outlierDetection": {"consecutiveFailures": 5, "interval": "10s",
                                     "baseEjectionTime": "30s", "maxEjectionPercent": 50},
                "ringHash": {"header": "x-user"},
                "localityPreference": true,
                "healthCheck": {"path": "/healthz", "interval": "5s", "unhealthyThreshold": 2},
                "rateLimits": [{
                    "name": "api",
                    "matches": [{"path": {"type": "PathPrefix", "value": "/api"},
                                 "headers": [{"type": "Exact", "name": "x-tier", "value": "free"}],
                                 "method": "GET"}],
                    "key": {"identity": true},
                    "requestsPerSecond": 12.5,
                    "burst": 20,
                    "global": true
                }]
            }),
        ),
        (
            "AuthorizationPolicy",
            json!({
                "targetRef": {"name": "web"},
                "action": "ALLOW",
                "rules": [{
                    "from": {"principals": ["spiffe://cluster.local/ns/shop/sa/cart"],
                             "namespaces": ["shop"]},
                    "to": {"ports": [8080], "pathPrefixes": ["/api/"], "methods": ["GET"],
                           "headers": [{"name": "x-tier", "value": "gold"}]},
                    "when": [{"claim": "realm.roles", "values": ["admin"]}]
                }]
            }),
        ),
        (
            "RequestAuthentication",
            json!({
                "targetRef": {"name": "web"},
                "jwtRules": [{
                    "issuer": "https://issuer.example",
                    "audiences": ["web"],
                    "jwks": {"uri": "https://issuer.example/jwks.json", "refresh": "5m"},
                    "fromHeaders": [{"name": "authorization", "prefix": "Bearer "}],
                    "forwardClaims": [{"claim": "sub", "header": "x-user"}],
                    "forwardOriginalToken": true,
                    "clockSkew": "60s",
                    "requiredClaims": [{"name": "scope", "values": ["read"]}]
                }]
            }),
        ),
        (
            "RoutePolicy",
            json!({
                "targetRef": {"group": "gateway.networking.k8s.io", "kind": "GRPCRoute",
                              "name": "catalog", "sectionName": "list"},
                "retry": {"attempts": 2, "codes": [503], "grpcCodes": ["UNAVAILABLE"],
                          "backoff": "25ms", "nonIdempotent": true,
                          "budget": {"ratio": 0.2, "minPerSecond": 10},
                          "hedge": {"percentile": 95.5}},
                "fault": {"abort": {"grpcStatus": "UNAVAILABLE", "percent": 10.5},
                          "delay": {"fixedDelay": "2s", "percent": 5.5}},
                "timeouts": {"request": "5s", "backendRequest": "1s"}
            }),
        ),
    ]
}

/// `text` without `[n]` list indices.
fn no_indices(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('[') {
        out.push_str(&rest[..i]);
        match rest[i + 1..].find(']') {
            Some(j) if j > 0 && rest[i + 1..i + 1 + j].bytes().all(|b| b.is_ascii_digit()) => {
                rest = &rest[i + j + 2..];
            }
            _ => {
                out.push('[');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinew_crds_check_field_types_on_the_api_server() {
    let (_api, c) = cluster().await;

    // Every kind: a valid document is one the model reads too, and the API server stores
    // it as sent (nothing pruned, nothing defaulted).
    let specs = valid_specs();
    assert_eq!(specs.len(), SINEW_KINDS.len());
    for (kind, spec) in &specs {
        let doc = json!({"apiVersion": "sinew.dev/v1alpha1", "kind": kind,
                         "metadata": {"name": "ok", "namespace": "shop"}, "spec": spec});
        Resource::from_json(kind, &doc.to_string())
            .unwrap_or_else(|e| panic!("{kind}: the model refuses the test document: {e}"));
        let stored = create(&c, kind, "ok", spec.clone())
            .await
            .unwrap_or_else(|e| panic!("{kind}: refused: {e}"));
        assert_eq!(&stored.data["spec"], spec, "{kind}: stored differently");
    }

    // Wrongly typed or out-of-set fields: the API server itself refuses them (422 Invalid)
    // and names the field.
    let bad = [
        (
            "Service",
            json!({"ports": [{"name": "http", "port": "eighty"}]}),
            "spec.ports[0].port",
            "integer",
        ),
        (
            "Service",
            json!({"ports": [{"name": "http", "port": 80}], "loadBalancer": "Random"}),
            "spec.loadBalancer",
            "Unsupported value",
        ),
        ("Service", json!({"selector": {}}), "spec.ports", "Required"),
        (
            "Workload",
            json!({"address": "10.0.0.7", "ports": {"http": "8080"}}),
            "spec.ports.http",
            "integer",
        ),
        (
            "Proxy",
            json!({"outbound": {"upstreams": [{"bind": "127.0.0.1:1", "service": "a", "port": true}]}}),
            "spec.outbound.upstreams[0].port",
            "",
        ),
        (
            "TrafficPolicy",
            json!({"targetRef": {"name": "web"}, "localityPreference": "yes"}),
            "spec.localityPreference",
            "boolean",
        ),
        (
            "TrafficPolicy",
            json!({"targetRef": {"name": "web"},
                   "rateLimits": [{"name": "x", "requestsPerSecond": "many"}]}),
            "spec.rateLimits[0].requestsPerSecond",
            "number",
        ),
        (
            "MeshConfig",
            json!({"tracing": {"endpoint": "http://c:4317", "protocol": "udp"}}),
            "spec.tracing.protocol",
            "Unsupported value",
        ),
        (
            "AuthorizationPolicy",
            json!({"rules": [{"to": {"ports": [70000]}}]}),
            "spec.rules[0].to.ports[0]",
            "65535",
        ),
        (
            "RequestAuthentication",
            json!({"jwtRules": [{"issuer": "i", "jwks": "https://i/jwks"}]}),
            "spec.jwtRules[0].jwks",
            "object",
        ),
        (
            "RoutePolicy",
            json!({"targetRef": {"kind": "TCPRoute", "name": "web"}}),
            "spec.targetRef.kind",
            "Unsupported value",
        ),
    ];
    for (i, (kind, spec, field, why)) in bad.iter().enumerate() {
        let name = format!("bad-{i}");
        match create(&c, kind, &name, spec.clone()).await {
            Ok(o) => panic!("{kind} {spec} accepted: {:?}", o.data),
            Err(e) => {
                assert!(e.contains("(422)"), "{kind} {spec}: {e}");
                // kube-apiserver 1.20 leaves list indices out of the path (`spec.ports.port`);
                // newer ones keep them.
                let (e_plain, field_plain) = (no_indices(&e), no_indices(field));
                assert!(
                    e_plain.contains(&field_plain),
                    "{kind} {spec}: {field} not named in {e}"
                );
                assert!(e.contains(why), "{kind} {spec}: {why:?} not in {e}");
            }
        }
    }

    // A field the schema does not know is pruned, as for any CRD with a schema (kubectl
    // refuses it before sending, from the published schema).
    let stored = create(
        &c,
        "Workload",
        "typo",
        json!({"address": "10.0.0.8", "servce": "web"}),
    )
    .await
    .unwrap();
    assert_eq!(
        stored.data["spec"],
        json!({"address": "10.0.0.8"}),
        "{:?}",
        stored.data
    );

    // The schemas are published with the model's doc comments (what `kubectl explain` reads).
    let cc = c.clone();
    wait::until("the Service schema is published", TIMEOUT, || {
        let c = cc.clone();
        async move {
            let req = http::Request::get("/openapi/v2").body(Vec::new()).unwrap();
            let Ok(text) = c.request_text(req).await else {
                return false;
            };
            let Ok(doc) = serde_json::from_str::<Value>(&text) else {
                return false;
            };
            doc.pointer("/definitions/dev.sinew.v1alpha1.Service/properties/spec/properties/ports/items/properties/targetPort/description")
                .and_then(Value::as_str)
                .is_some_and(|d| d.contains("Workload port"))
        }
    })
    .await
    .unwrap();
}
