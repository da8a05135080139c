//! Strict, upstream-shaped Gateway API CRDs (`HTTPRoute`, `GRPCRoute`), for tests: what a
//! cluster that installed the Gateway API (v1.x, experimental channel) serves, for the
//! fields Sinew reads. Not installed by Sinew (`sinew install --gateway-api-crds` installs
//! the open stand-ins of [`super::gateway_api_crds`], and never over existing CRDs).
//!
//! Why written here rather than generated: the `gateway-api` crate (kube-rs project)
//! would give `CustomResourceExt::crd()`, but its 0.22 pins kube 4 / k8s-openapi 0.28, a
//! second copy of the heaviest dependencies beside the workspace's kube 5 / 0.29 (each
//! k8s-openapi build alone takes minutes on CI's 2 cores), for a test fixture. The
//! upstream YAML cannot be copied into the repository either. So these are structural
//! schemas written from the published API (`apis/v1/httproute_types.go`,
//! `grpcroute_types.go`, `shared_types.go` of kubernetes-sigs/gateway-api, experimental
//! channel): the same field names, types, enums, required fields, bounds, patterns of
//! durations, and defaults (`parentRefs[].group` defaults to the Gateway API group and
//! `kind` to `Gateway`, so a Service parent must say `group: ""`, as on a real cluster).
//! CEL rules (`x-kubernetes-validations`) are left out: the 1.20 API server of the tests
//! does not run them. There is no `x-kubernetes-preserve-unknown-fields` anywhere, so
//! the API server prunes every field it does not know (e.g. Sinew's `retry.budget`) and
//! refuses values outside an enum (e.g. a `Fault` filter), as a real cluster does.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};

const GROUP: &str = "gateway.networking.k8s.io";

fn string() -> Value {
    json!({"type": "string"})
}

fn bounded(min: u32, max: u32) -> Value {
    json!({"type": "string", "minLength": min, "maxLength": max})
}

fn enumeration(values: &[&str]) -> Value {
    json!({"type": "string", "enum": values})
}

fn port() -> Value {
    json!({"type": "integer", "format": "int32", "minimum": 1, "maximum": 65535})
}

/// Gateway API `Duration`: GEP-2257 (`1h`, `500ms`, `1m30s`).
fn duration() -> Value {
    json!({"type": "string", "pattern": "^([0-9]{1,5}(h|m|s|ms)){1,4}$"})
}

/// A DNS-1123 subdomain-ish `SectionName` (rule names too).
fn section_name() -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": 253,
           "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"})
}

fn object(properties: Value, required: &[&str]) -> Value {
    let mut o = json!({"type": "object", "properties": properties});
    if !required.is_empty() {
        o["required"] = json!(required);
    }
    o
}

fn array(items: Value, max: u32) -> Value {
    json!({"type": "array", "maxItems": max, "items": items})
}

fn header_name() -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": 256,
           "pattern": "^[A-Za-z0-9!#$%&'*+\\-.^_\\x60|~]+$"})
}

/// `ParentReference`: defaults make an unqualified parent a Gateway.
fn parent_ref() -> Value {
    object(
        json!({
            "group": {"type": "string", "maxLength": 253, "default": GROUP},
            "kind": {"type": "string", "minLength": 1, "maxLength": 63, "default": "Gateway"},
            "namespace": bounded(1, 63),
            "name": bounded(1, 253),
            "sectionName": section_name(),
            "port": port(),
        }),
        &["name"],
    )
}

/// `BackendObjectReference` (defaults: core group, kind `Service`).
fn backend_object_ref() -> Value {
    json!({
        "group": {"type": "string", "maxLength": 253, "default": ""},
        "kind": {"type": "string", "minLength": 1, "maxLength": 63, "default": "Service"},
        "name": bounded(1, 253),
        "namespace": bounded(1, 63),
        "port": port(),
    })
}

fn header_modifier() -> Value {
    let pair = object(
        json!({"name": header_name(), "value": bounded(1, 4096)}),
        &["name", "value"],
    );
    object(
        json!({
            "set": array(pair.clone(), 16),
            "add": array(pair, 16),
            "remove": array(string(), 16),
        }),
        &[],
    )
}

fn request_mirror() -> Value {
    object(
        json!({
            "backendRef": object(backend_object_ref(), &["name"]),
            "percent": {"type": "integer", "format": "int32", "minimum": 0, "maximum": 100},
            "fraction": object(json!({
                "numerator": {"type": "integer", "format": "int32", "minimum": 0},
                "denominator": {"type": "integer", "format": "int32", "minimum": 1, "default": 100},
            }), &["numerator"]),
        }),
        &["backendRef"],
    )
}

fn extension_ref() -> Value {
    object(
        json!({"group": {"type": "string", "maxLength": 253}, "kind": bounded(1, 63), "name": bounded(1, 253)}),
        &["group", "kind", "name"],
    )
}

fn path_modifier() -> Value {
    object(
        json!({
            "type": enumeration(&["ReplaceFullPath", "ReplacePrefixMatch"]),
            "replaceFullPath": {"type": "string", "maxLength": 1024},
            "replacePrefixMatch": {"type": "string", "maxLength": 1024},
        }),
        &["type"],
    )
}

/// `HTTPRouteFilter`: the upstream filter types only (no `Fault`: the API server refuses
/// it). `CORS`'s own settings are left out (pruned): Sinew does not support it.
fn http_filter() -> Value {
    object(
        json!({
            "type": enumeration(&["RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror",
                                  "RequestRedirect", "URLRewrite", "ExtensionRef", "CORS"]),
            "requestHeaderModifier": header_modifier(),
            "responseHeaderModifier": header_modifier(),
            "requestMirror": request_mirror(),
            "requestRedirect": object(json!({
                "scheme": enumeration(&["http", "https"]),
                "hostname": bounded(1, 253),
                "path": path_modifier(),
                "port": port(),
                "statusCode": {"type": "integer", "default": 302, "enum": [301, 302, 303, 307, 308]},
            }), &[]),
            "urlRewrite": object(json!({"hostname": bounded(1, 253), "path": path_modifier()}), &[]),
            "extensionRef": extension_ref(),
        }),
        &["type"],
    )
}

/// `GRPCRouteFilter`.
fn grpc_filter() -> Value {
    object(
        json!({
            "type": enumeration(&["ResponseHeaderModifier", "RequestHeaderModifier", "RequestMirror", "ExtensionRef"]),
            "requestHeaderModifier": header_modifier(),
            "responseHeaderModifier": header_modifier(),
            "requestMirror": request_mirror(),
            "extensionRef": extension_ref(),
        }),
        &["type"],
    )
}

fn backend_ref(filter: Value) -> Value {
    let mut props = backend_object_ref();
    props["weight"] = json!({"type": "integer", "format": "int32", "minimum": 0, "maximum": 1_000_000, "default": 1});
    props["filters"] = array(filter, 16);
    object(props, &["name"])
}

/// `SessionPersistence` (experimental).
fn session_persistence() -> Value {
    object(
        json!({
            "sessionName": {"type": "string", "maxLength": 128},
            "absoluteTimeout": duration(),
            "idleTimeout": duration(),
            "type": {"type": "string", "enum": ["Cookie", "Header"], "default": "Cookie"},
            "cookieConfig": object(json!({
                "lifetimeType": {"type": "string", "enum": ["Permanent", "Session"]},
            }), &[]),
        }),
        &[],
    )
}

fn header_match(value_max: u32) -> Value {
    object(
        json!({
            "type": {"type": "string", "enum": ["Exact", "RegularExpression"], "default": "Exact"},
            "name": header_name(),
            "value": bounded(1, value_max),
        }),
        &["name", "value"],
    )
}

fn http_route_spec() -> Value {
    let root_match = json!({"path": {"type": "PathPrefix", "value": "/"}});
    let rule = object(
        json!({
            "name": section_name(),
            "matches": {
                "type": "array", "maxItems": 64, "default": [root_match],
                "items": object(json!({
                    "path": {
                        "type": "object", "default": {"type": "PathPrefix", "value": "/"},
                        "properties": {
                            "type": {"type": "string", "enum": ["Exact", "PathPrefix", "RegularExpression"], "default": "PathPrefix"},
                            "value": {"type": "string", "maxLength": 1024, "default": "/"},
                        },
                    },
                    "headers": array(header_match(4096), 16),
                    "queryParams": array(header_match(1024), 16),
                    "method": enumeration(&["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]),
                }), &[]),
            },
            "filters": array(http_filter(), 16),
            "backendRefs": array(backend_ref(http_filter()), 16),
            "timeouts": object(json!({"request": duration(), "backendRequest": duration()}), &[]),
            // Experimental channel (GEP-1731): only these three fields.
            "retry": object(json!({
                "codes": array(json!({"type": "integer", "minimum": 400, "maximum": 599}), 64),
                "attempts": {"type": "integer", "minimum": 1},
                "backoff": duration(),
            }), &[]),
            "sessionPersistence": session_persistence(),
        }),
        &[],
    );
    object(
        json!({
            "parentRefs": array(parent_ref(), 32),
            "hostnames": array(bounded(1, 253), 16),
            "rules": {
                "type": "array", "maxItems": 16,
                "default": [{"matches": [root_match]}],
                "items": rule,
            },
        }),
        &[],
    )
}

fn grpc_route_spec() -> Value {
    let rule = object(
        json!({
            "name": section_name(),
            "matches": array(object(json!({
                "method": object(json!({
                    "type": {"type": "string", "enum": ["Exact", "RegularExpression"], "default": "Exact"},
                    "service": {"type": "string", "maxLength": 1024},
                    "method": {"type": "string", "maxLength": 1024},
                }), &[]),
                "headers": array(header_match(4096), 16),
            }), &[]), 64),
            "filters": array(grpc_filter(), 16),
            "backendRefs": array(backend_ref(grpc_filter()), 16),
            "sessionPersistence": session_persistence(),
        }),
        &[],
    );
    object(
        json!({
            "parentRefs": array(parent_ref(), 32),
            "hostnames": array(bounded(1, 253), 16),
            "rules": array(rule, 16),
        }),
        &[],
    )
}

/// `RouteStatus`: one entry per parent and controller.
fn route_status() -> Value {
    let condition = object(
        json!({
            "type": bounded(1, 316),
            "status": enumeration(&["True", "False", "Unknown"]),
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "reason": {"type": "string", "minLength": 1, "maxLength": 1024,
                       "pattern": "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"},
            "message": {"type": "string", "maxLength": 32768},
        }),
        &["lastTransitionTime", "message", "reason", "status", "type"],
    );
    object(
        json!({
            "parents": array(object(json!({
                "parentRef": parent_ref(),
                "controllerName": bounded(1, 253),
                "conditions": array(condition, 8),
            }), &["conditions", "controllerName", "parentRef"]), 32),
        }),
        &["parents"],
    )
}

fn definition(kind: &str, plural: &str, spec: Value) -> Option<CustomResourceDefinition> {
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": format!("{plural}.{GROUP}"),
            "annotations": {
                "api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/gateway-api/pull/3328",
                "gateway.networking.k8s.io/bundle-version": "v1.3.0",
                "gateway.networking.k8s.io/channel": "experimental",
            },
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "plural": plural,
                "singular": kind.to_ascii_lowercase(),
                "listKind": format!("{kind}List"),
                "categories": ["gateway-api"],
            },
            "versions": [{
                "name": "v1",
                "served": true,
                "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": object(json!({
                    "apiVersion": string(),
                    "kind": string(),
                    "metadata": {"type": "object"},
                    "spec": spec,
                    "status": route_status(),
                }), &["spec"])},
            }],
        },
    }))
    .ok()
}

/// Strict upstream-shaped `HTTPRoute` and `GRPCRoute` CRDs (Gateway API v1, experimental
/// channel, the fields Sinew reads), as a cluster with the Gateway API installed serves
/// them. For tests: see the module's documentation for what they hold and why.
pub fn upstream_gateway_api_crds() -> Vec<CustomResourceDefinition> {
    [
        definition("HTTPRoute", "httproutes", http_route_spec()),
        definition("GRPCRoute", "grpcroutes", grpc_route_spec()),
    ]
    .into_iter()
    .flatten()
    .collect()
}
