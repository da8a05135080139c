//! The least privilege `sinew control --kubernetes` needs, for installers to grant
//! (`sinew install --kubernetes` prints these).
//!
//! - Read (get, list, watch) Services, Pods, Nodes, Endpoints, EndpointSlices, and the custom
//!   kinds it reads ([`crate::crd`]).
//! - Write only the `status` subresource of those custom kinds, and create Events.
//! - Create TokenReviews (proxies' service-account tokens).
//! - Read namespaces and write the ConfigMap `sinew-root` (the mesh roots) in each.
//! - Its Lease, in its own namespace only ([`lease_role`]).

use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::crd::{GATEWAY_KINDS, Kind, SINEW_KINDS, SMI_KINDS};

/// The name of the ClusterRole and of the Role.
pub const ROLE_NAME: &str = "sinew-control";

fn rule(groups: &[&str], resources: Vec<String>, verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(groups.iter().map(|s| s.to_string()).collect()),
        resources: Some(resources),
        verbs: verbs.iter().map(|s| s.to_string()).collect(),
        ..PolicyRule::default()
    }
}

/// The cluster-wide permissions of the control plane.
pub fn cluster_role() -> ClusterRole {
    const READ: &[&str] = &["get", "list", "watch"];
    let mut rules = vec![
        rule(
            &[""],
            vec![
                "services".into(),
                "pods".into(),
                "endpoints".into(),
                // Their topology labels: workloads' zones and regions.
                "nodes".into(),
            ],
            READ,
        ),
        rule(&["discovery.k8s.io"], vec!["endpointslices".into()], READ),
        rule(&[""], vec!["events".into()], &["create", "patch"]),
        rule(
            &["authentication.k8s.io"],
            vec!["tokenreviews".into()],
            &["create"],
        ),
        // The mesh roots, published in every namespace (`sinew-root`).
        rule(&[""], vec!["namespaces".into()], READ),
        rule(
            &[""],
            vec!["configmaps".into()],
            &["get", "create", "patch"],
        ),
    ];
    let kinds: Vec<&Kind> = SINEW_KINDS
        .iter()
        .chain(&GATEWAY_KINDS)
        .chain(&SMI_KINDS)
        .collect();
    let mut groups: Vec<&str> = kinds.iter().map(|k| k.group).collect();
    groups.dedup();
    for g in groups {
        let plurals: Vec<&str> = kinds
            .iter()
            .filter(|k| k.group == g)
            .map(|k| k.plural)
            .collect();
        rules.push(rule(
            &[g],
            plurals.iter().map(|p| p.to_string()).collect(),
            READ,
        ));
        rules.push(rule(
            &[g],
            plurals.iter().map(|p| format!("{p}/status")).collect(),
            &["get", "patch", "update"],
        ));
    }
    ClusterRole {
        metadata: ObjectMeta {
            name: Some(ROLE_NAME.to_owned()),
            labels: Some([("app.kubernetes.io/part-of".to_owned(), "sinew".to_owned())].into()),
            ..ObjectMeta::default()
        },
        rules: Some(rules),
        ..ClusterRole::default()
    }
}

/// The permissions on the status writer's Lease, in `namespace` (the control plane's own).
pub fn lease_role(namespace: &str) -> Role {
    Role {
        metadata: ObjectMeta {
            name: Some(ROLE_NAME.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some([("app.kubernetes.io/part-of".to_owned(), "sinew".to_owned())].into()),
            ..ObjectMeta::default()
        },
        rules: Some(vec![rule(
            &["coordination.k8s.io"],
            vec!["leases".into()],
            &["get", "create", "update"],
        )]),
    }
}
