//! The least privilege `sinew control --kubernetes` needs, for installers to grant
//! (`sinew install --kubernetes` prints these).
//!
//! - Read (get, list, watch) Services, Pods, Nodes, Endpoints, EndpointSlices, and the custom
//!   kinds it reads ([`crate::crd`]).
//! - Write the custom resources `sinew apply` makes (Sinew's kinds, HTTPRoutes) and the
//!   `status` subresource of every custom kind it reads; create Events.
//! - Create TokenReviews (proxies' service-account tokens).
//! - Read namespaces and write the ConfigMap `sinew-root` (the mesh roots) in each.
//! - In its own namespace only ([`lease_role`]): its Lease, the Secrets of the mesh CA,
//!   of the webhook's certificate and of the first admin credential, the join-token
//!   Secrets and the operator credentials ConfigMap ([`crate::state`]). Secrets are
//!   read and written there only, never cluster-wide: join tokens are Secrets with
//!   generated names, found by label, so RBAC cannot narrow them to names (nor
//!   `create` at all: the object has no name when the request is authorised).
//! - Read and patch its MutatingWebhookConfiguration `sinew-injector` (by name): the
//!   webhook writes the caBundle of the certificate it made.

use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::crd::{GATEWAY_KINDS, Kind, SINEW_KINDS, SMI_KINDS};

/// The name of the ClusterRole and of the Role.
pub const ROLE_NAME: &str = "sinew-control";

/// The Secrets the control plane and its webhook read (by name).
pub const SECRETS: [&str; 2] = ["sinew-ca", "sinew-webhook-tls"];
/// The webhook configuration whose caBundle the webhook sets.
pub const WEBHOOK_CONFIGURATION: &str = "sinew-injector";

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
        PolicyRule {
            resource_names: Some(vec![WEBHOOK_CONFIGURATION.to_owned()]),
            ..rule(
                &["admissionregistration.k8s.io"],
                vec!["mutatingwebhookconfigurations".into()],
                &["get", "patch"],
            )
        },
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
    // What `sinew apply` and `sinew delete` write (crate::state).
    let written: Vec<&Kind> = kinds
        .iter()
        .copied()
        .filter(|k| crate::state::kind_of(k.kind) == Some(*k))
        .collect();
    let mut groups: Vec<&str> = written.iter().map(|k| k.group).collect();
    groups.dedup();
    for g in groups {
        rules.push(rule(
            &[g],
            written
                .iter()
                .filter(|k| k.group == g)
                .map(|k| k.plural.to_owned())
                .collect(),
            // Server-side apply is a patch, and a create when the object is new.
            &["create", "patch", "delete"],
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

/// The permissions in `namespace` (the control plane's own): the status writer's Lease,
/// the Secrets of the mesh CA and the webhook's certificate, the join-token Secrets and
/// the operator credentials ConfigMap ([`crate::state`]). Secrets are granted here only,
/// never cluster-wide.
pub fn lease_role(namespace: &str) -> Role {
    Role {
        metadata: ObjectMeta {
            name: Some(ROLE_NAME.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some([("app.kubernetes.io/part-of".to_owned(), "sinew".to_owned())].into()),
            ..ObjectMeta::default()
        },
        rules: Some(vec![
            rule(
                &["coordination.k8s.io"],
                vec!["leases".into()],
                &["get", "create", "update"],
            ),
            // Join tokens: created, spent (updated, or deleted at the last use), listed.
            rule(
                &[""],
                vec!["secrets".into()],
                &["get", "list", "create", "update", "delete"],
            ),
            // Operator credentials and revocations: watched by every replica.
            rule(
                &[""],
                vec!["configmaps".into()],
                &["get", "list", "watch", "create", "update"],
            ),
        ]),
    }
}
