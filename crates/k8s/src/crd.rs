//! CustomResourceDefinitions: Sinew's own kinds, and minimal definitions of the Gateway API
//! and SMI kinds Sinew reads (for clusters that do not have them installed yet, and tests).
//!
//! Sinew's kinds are the same documents as in files (`apiVersion: sinew.dev/v1alpha1`). Their
//! `spec` schemas are generated from the model's types ([`crate::schema`]): the API server
//! checks every field's type, closed sets of values and required fields (and `kubectl
//! explain` shows the model's doc comments), while the control plane still validates each
//! document fully, as it does a file, and writes every problem with its field path to the
//! resource's `status.conditions` (cross-resource problems, value rules). As for any CRD
//! with a schema, the API server prunes fields it does not know (`kubectl` refuses them).
//! The Gateway API and SMI definitions here keep an open `spec`: they are stand-ins for the
//! upstream CRDs, for clusters without them (`sinew install` never replaces a CRD it did
//! not make: [`made_by_sinew`]). [`upstream_gateway_api_crds`] are strict, upstream-shaped
//! Gateway API CRDs for tests. `status` is a subresource the control plane writes.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};

use crate::schema::spec_schema;

mod upstream;
pub use upstream::upstream_gateway_api_crds;

/// The label every CRD Sinew defines carries (`sinew`): `sinew install` replaces only
/// CRDs with it (or the older `app.kubernetes.io/part-of: sinew`), never one another
/// installer made, such as the upstream Gateway API's.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// Whether an existing CRD is one Sinew made (it has [`MANAGED_BY`] or
/// `app.kubernetes.io/part-of` set to `sinew`), so `sinew install` may replace it.
pub fn made_by_sinew(labels: Option<&std::collections::BTreeMap<String, String>>) -> bool {
    labels.is_some_and(|l| {
        [MANAGED_BY, "app.kubernetes.io/part-of"]
            .iter()
            .any(|k| l.get(*k).is_some_and(|v| v == "sinew"))
    })
}

/// Sinew's API group.
pub const SINEW_GROUP: &str = "sinew.dev";
/// Sinew's API version.
pub const SINEW_VERSION: &str = "v1alpha1";

/// A kind Sinew reads from the API server besides the built-in ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    /// API group.
    pub group: &'static str,
    /// Version served.
    pub version: &'static str,
    /// Kind.
    pub kind: &'static str,
    /// Plural resource name.
    pub plural: &'static str,
    /// Short names for kubectl.
    pub short: &'static [&'static str],
}

impl Kind {
    /// `group/version`.
    pub fn api_version(&self) -> String {
        format!("{}/{}", self.group, self.version)
    }
}

const fn sinew(kind: &'static str, plural: &'static str, short: &'static [&'static str]) -> Kind {
    Kind {
        group: SINEW_GROUP,
        version: SINEW_VERSION,
        kind,
        plural,
        short,
    }
}

/// Sinew's own kinds, served as custom resources.
pub const SINEW_KINDS: [Kind; 8] = [
    sinew("Proxy", "proxies", &["sproxy"]),
    sinew("Service", "services", &["ssvc"]),
    sinew("Workload", "workloads", &["swl"]),
    sinew("MeshConfig", "meshconfigs", &["meshconfig"]),
    sinew("TrafficPolicy", "trafficpolicies", &["tp"]),
    sinew("AuthorizationPolicy", "authorizationpolicies", &["authz"]),
    sinew(
        "RequestAuthentication",
        "requestauthentications",
        &["reqauthn"],
    ),
    sinew("RoutePolicy", "routepolicies", &["rp"]),
];

/// Gateway API route kinds (GAMMA: routes whose parent is a Service).
pub const GATEWAY_KINDS: [Kind; 2] = [
    Kind {
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "HTTPRoute",
        plural: "httproutes",
        short: &[],
    },
    Kind {
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "GRPCRoute",
        plural: "grpcroutes",
        short: &[],
    },
];

/// SMI kinds imported for compatibility.
pub const SMI_KINDS: [Kind; 3] = [
    Kind {
        group: "split.smi-spec.io",
        version: "v1alpha2",
        kind: "TrafficSplit",
        plural: "trafficsplits",
        short: &["ts"],
    },
    Kind {
        group: "access.smi-spec.io",
        version: "v1alpha3",
        kind: "TrafficTarget",
        plural: "traffictargets",
        short: &["tt"],
    },
    Kind {
        group: "specs.smi-spec.io",
        version: "v1alpha4",
        kind: "HTTPRouteGroup",
        plural: "httproutegroups",
        short: &["htr"],
    },
];

/// The structural OpenAPI schema of the `spec` of one of Sinew's kinds; `None` for a kind
/// that is not Sinew's.
pub fn sinew_spec_schema(kind: &str) -> Option<Value> {
    use sinew_model::resource as r;
    Some(match kind {
        "Proxy" => spec_schema::<r::ProxySpec>(),
        "Service" => spec_schema::<r::ServiceSpec>(),
        "Workload" => spec_schema::<r::WorkloadSpec>(),
        "MeshConfig" => spec_schema::<r::MeshConfigSpec>(),
        "TrafficPolicy" => spec_schema::<r::TrafficPolicySpec>(),
        "AuthorizationPolicy" => spec_schema::<r::AuthorizationPolicySpec>(),
        "RequestAuthentication" => spec_schema::<r::RequestAuthenticationSpec>(),
        "RoutePolicy" => spec_schema::<r::RoutePolicySpec>(),
        _ => return None,
    })
}

fn definition(
    k: &Kind,
    description: &str,
    spec: Value,
) -> Result<CustomResourceDefinition, serde_json::Error> {
    let schema = json!({
        "type": "object",
        "description": description,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": true,
                "properties": {
                    "conditions": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["type", "status"],
                            "properties": {
                                "type": {"type": "string"},
                                "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                                "reason": {"type": "string"},
                                "message": {"type": "string"},
                                "observedGeneration": {"type": "integer", "format": "int64"},
                                "lastTransitionTime": {"type": "string", "format": "date-time"}
                            }
                        }
                    }
                }
            }
        },
        "required": ["spec"]
    });
    let mut annotations = json!({});
    if k.group.ends_with(".k8s.io") {
        // Groups under k8s.io are protected; the Gateway API's own CRDs carry this approval.
        annotations["api-approved.kubernetes.io"] =
            json!("https://github.com/kubernetes-sigs/gateway-api/pull/1538");
    }
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": format!("{}.{}", k.plural, k.group),
            "labels": {"app.kubernetes.io/part-of": "sinew", MANAGED_BY: "sinew"},
            "annotations": annotations
        },
        "spec": {
            "group": k.group,
            "scope": "Namespaced",
            "names": {
                "kind": k.kind,
                "plural": k.plural,
                "singular": k.kind.to_ascii_lowercase(),
                "listKind": format!("{}List", k.kind),
                "shortNames": k.short,
                "categories": ["sinew"]
            },
            "versions": [{
                "name": k.version,
                "served": true,
                "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": schema},
                "additionalPrinterColumns": [
                    {"name": "Accepted", "type": "string",
                     "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"},
                    {"name": "Reason", "type": "string", "priority": 1,
                     "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].message"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
                ]
            }]
        }
    }))
}

/// A free-form `spec`, for the stand-in Gateway API and SMI definitions.
fn open() -> Value {
    json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

/// The CustomResourceDefinitions of Sinew's own kinds (`sinew.dev/v1alpha1`), as
/// `sinew install --kubernetes` prints them and a cluster needs them.
pub fn crds() -> Vec<CustomResourceDefinition> {
    SINEW_KINDS
        .iter()
        .filter_map(|k| {
            definition(
                k,
                &format!(
                    "Sinew {}: the same document as in a Sinew config file.",
                    k.kind
                ),
                sinew_spec_schema(k.kind)?,
            )
            .ok()
        })
        .collect()
}

/// Minimal definitions of the Gateway API route kinds Sinew reads (`HTTPRoute`,
/// `GRPCRoute`), for clusters without the Gateway API installed. A cluster that has the
/// upstream Gateway API CRDs should keep those.
pub fn gateway_api_crds() -> Vec<CustomResourceDefinition> {
    GATEWAY_KINDS
        .iter()
        .filter_map(|k| definition(k, &format!("Gateway API {} (GAMMA).", k.kind), open()).ok())
        .collect()
}

/// Minimal definitions of the SMI kinds Sinew imports (`TrafficSplit`, `TrafficTarget`,
/// `HTTPRouteGroup`), for clusters without SMI installed.
pub fn smi_crds() -> Vec<CustomResourceDefinition> {
    SMI_KINDS
        .iter()
        .filter_map(|k| definition(k, &format!("SMI {}.", k.kind), open()).ok())
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::Map;

    #[test]
    fn every_kind_has_a_definition() {
        assert_eq!(crds().len(), SINEW_KINDS.len());
        assert_eq!(gateway_api_crds().len(), GATEWAY_KINDS.len());
        assert_eq!(smi_crds().len(), SMI_KINDS.len());
        let names: Vec<_> = crds()
            .iter()
            .map(|c| c.metadata.name.clone().unwrap_or_default())
            .collect();
        assert!(
            names.contains(&"trafficpolicies.sinew.dev".to_owned()),
            "{names:?}"
        );
    }

    /// Every problem that makes a schema node non-structural (or unknown to the API
    /// server), with its path.
    fn problems(path: &str, node: &Value, out: &mut Vec<String>) {
        let Some(obj) = node.as_object() else {
            out.push(format!("{path}: not an object"));
            return;
        };
        for key in [
            "$ref",
            "$schema",
            "$defs",
            "definitions",
            "anyOf",
            "oneOf",
            "allOf",
            "not",
            "const",
            "title",
            "default",
        ] {
            if obj.contains_key(key) {
                out.push(format!("{path}: has {key}"));
            }
        }
        let free = obj.contains_key("x-kubernetes-int-or-string");
        if obj.contains_key("x-kubernetes-preserve-unknown-fields") {
            out.push(format!("{path}: free-form"));
        }
        match obj.get("type") {
            Some(Value::String(_)) => {}
            None if free => {}
            other => out.push(format!("{path}: type {other:?}")),
        }
        if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
            out.push(format!("{path}: properties and additionalProperties"));
        }
        if let Some(props) = obj.get("properties").and_then(Value::as_object) {
            for (name, p) in props {
                problems(&format!("{path}.{name}"), p, out);
            }
        }
        for key in ["items", "additionalProperties"] {
            if let Some(s) = obj.get(key) {
                problems(&format!("{path}[{key}]"), s, out);
            }
        }
    }

    #[test]
    fn upstream_gateway_api_schemas_are_closed() {
        let upstream = upstream_gateway_api_crds();
        assert_eq!(upstream.len(), 2);
        for crd in upstream {
            let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
            let text = schema.to_string();
            assert!(!text.contains("preserve-unknown-fields"), "{text}");
            let mut found = Vec::new();
            problems("root", &schema["openAPIV3Schema"], &mut found);
            // Upstream's defaults are kept on purpose (a Service parent needs `group: ""`).
            found.retain(|p| !p.ends_with("has default"));
            assert!(found.is_empty(), "{found:#?}");
            // Not Sinew's: `sinew install` must never take them for its own.
            assert!(!made_by_sinew(crd.metadata.labels.as_ref()));
        }
        assert!(
            crds()
                .iter()
                .all(|c| made_by_sinew(c.metadata.labels.as_ref()))
        );
    }

    #[test]
    fn sinew_schemas_are_structural_with_no_refs() {
        for crd in crds() {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let schema = crd.spec.versions[0]
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .map(serde_json::to_value)
                .unwrap()
                .unwrap();
            let text = schema.to_string();
            assert!(!text.contains("$ref"), "{name}: {text}");
            assert!(!text.contains("\"null\""), "{name}: {text}");
            let spec = &schema["properties"]["spec"];
            let mut found = Vec::new();
            problems("spec", spec, &mut found);
            assert!(found.is_empty(), "{name}: {found:#?}");
            // A real schema: declared fields, not only an open object.
            let fields = spec["properties"].as_object().map_or(0, Map::len);
            assert!(fields >= 2, "{name}: {spec}");
        }
    }
}
