//! CustomResourceDefinitions: Sinew's own kinds, and minimal definitions of the Gateway API
//! and SMI kinds Sinew reads (for clusters that do not have them installed yet, and tests).
//!
//! Sinew's kinds are the same documents as in files (`apiVersion: sinew.dev/v1alpha1`). Their
//! OpenAPI schemas are structural, as every API server since 1.16 requires: `spec` is an
//! object whose fields the control plane validates itself (`x-kubernetes-preserve-unknown-fields`),
//! so the rules live in one place (crates/model) and every problem is reported with its field
//! path in the resource's `status.conditions`, which a schema rejection could not do for
//! cross-resource problems anyway. `status` is a subresource the control plane writes.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::json;

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
pub const SINEW_KINDS: [Kind; 7] = [
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

fn definition(k: &Kind, description: &str) -> Result<CustomResourceDefinition, serde_json::Error> {
    let open = json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    let schema = json!({
        "type": "object",
        "description": description,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": open,
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
            "labels": {"app.kubernetes.io/part-of": "sinew"},
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
        .filter_map(|k| definition(k, &format!("Gateway API {} (GAMMA).", k.kind)).ok())
        .collect()
}

/// Minimal definitions of the SMI kinds Sinew imports (`TrafficSplit`, `TrafficTarget`,
/// `HTTPRouteGroup`), for clusters without SMI installed.
pub fn smi_crds() -> Vec<CustomResourceDefinition> {
    SMI_KINDS
        .iter()
        .filter_map(|k| definition(k, &format!("SMI {}.", k.kind)).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
