//! `sinew install --kubernetes`: the manifests of a Sinew installation.
//!
//! In apply order: the CustomResourceDefinitions (given by the caller: they come from
//! sinew-k8s), the Namespace, the control plane's ServiceAccount, least-privilege RBAC,
//! the Service, the control-plane Deployment (two or more replicas; the webhook runs as
//! a second container in each pod) and its PodDisruptionBudget, and last the
//! MutatingWebhookConfiguration, so nothing is sent to a webhook before it can exist.
//!
//! No key is ever in them: the mesh CA (Secret `sinew-ca`) and the webhook's serving
//! certificate (Secret `sinew-webhook-tls`) are made in the cluster by the first
//! replica that starts (`sinew_k8s::ca`), and the webhook sets its own `caBundle`. So a
//! printed installation can be kept in Git, and rendering it again changes nothing.

use serde_json::{Value, json};

use crate::config::{ANNOTATION_INJECT, InjectConfig, SYSTEM_NAMESPACES};

/// The name of the control plane's Deployment, Service, ServiceAccount and RBAC.
pub const CONTROL_NAME: &str = "sinew-control";
/// The MutatingWebhookConfiguration's name.
pub const WEBHOOK_CONFIGURATION: &str = "sinew-injector";
/// The webhook's serving certificate Secret (`kubernetes.io/tls`, with `ca.crt`).
pub const WEBHOOK_SECRET: &str = "sinew-webhook-tls";
/// The mesh CA Secret (`ca.pem`, `ca-key.pem`), shared by every control-plane replica.
pub const CA_SECRET: &str = "sinew-ca";
/// The webhook's name inside [`WEBHOOK_CONFIGURATION`].
pub const WEBHOOK_NAME: &str = "inject.sinew.dev";
/// The control plane's plain-HTTP health port (`/ready`, `/live`), for the kubelet.
pub const HEALTH_PORT: u16 = 15014;

/// The control plane's gRPC port (proxies and the CLI).
pub const CONTROL_PORT: u16 = 15010;
/// The webhook container's HTTPS port.
pub const WEBHOOK_PORT: u16 = 9443;

/// What to install.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// The control plane's namespace.
    pub namespace: String,
    /// The image holding `sinew` and `sinew-proxy`.
    pub image: String,
    /// Control-plane replicas (at least 2 for availability).
    pub replicas: i32,
    /// The mesh's SPIFFE trust domain.
    pub trust_domain: String,
    /// `Ignore` (a webhook outage leaves new pods without a sidecar) or `Fail` (new
    /// pods in opted-in namespaces wait for the webhook).
    pub failure_policy: String,
    /// The settings the webhook injects with (its image, audience, resources).
    pub inject: InjectConfig,
    /// The PodDisruptionBudget's API: `policy/v1` (Kubernetes >= 1.21, the default) or
    /// `policy/v1beta1` (older clusters).
    pub pdb_api_version: String,
}

impl InstallOptions {
    /// The names the webhook's certificate must carry (the Service's DNS names).
    pub fn webhook_names(namespace: &str) -> Vec<String> {
        Self::webhook_names_for(CONTROL_NAME, namespace)
    }

    /// The DNS names of the Service `service` in `namespace`.
    pub fn webhook_names_for(service: &str, namespace: &str) -> Vec<String> {
        vec![
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
            format!("{service}.{namespace}"),
            service.to_owned(),
        ]
    }

    /// The control plane's address as proxies in the cluster reach it.
    pub fn control_plane_url(namespace: &str) -> String {
        format!("https://{CONTROL_NAME}.{namespace}.svc:{CONTROL_PORT}")
    }

    /// Checks the options, naming the bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.replicas < 1 {
            return Err("--replicas must be at least 1".into());
        }
        if !matches!(self.failure_policy.as_str(), "Ignore" | "Fail") {
            return Err(format!(
                "--webhook-failure-policy {:?}: must be Ignore or Fail",
                self.failure_policy
            ));
        }
        let ns = &self.namespace;
        let dns_label = !ns.is_empty()
            && ns.len() <= 63
            && ns
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !ns.starts_with('-')
            && !ns.ends_with('-');
        if !dns_label {
            return Err(format!(
                "--namespace {ns:?}: must be a DNS label (lowercase letters, digits, '-')"
            ));
        }
        self.inject.validate().map_err(|e| e.to_string())
    }
}

fn selector() -> Value {
    json!({"app.kubernetes.io/name": "sinew", "app.kubernetes.io/component": "control-plane"})
}

fn labels() -> Value {
    json!({"app.kubernetes.io/name": "sinew", "app.kubernetes.io/component": "control-plane", "app.kubernetes.io/part-of": "sinew"})
}

/// What the installation takes from elsewhere: the CustomResourceDefinitions and the
/// control plane's least-privilege rules (both from sinew-k8s, which knows what the
/// control plane reads and writes), as JSON.
#[derive(Debug, Clone, Default)]
pub struct Definitions {
    /// The CustomResourceDefinitions, applied first.
    pub crds: Vec<Value>,
    /// The ClusterRole's rules.
    pub cluster_rules: Vec<Value>,
    /// The rules of the Role in the control plane's namespace (its Lease).
    pub namespace_rules: Vec<Value>,
}

/// Every manifest, in apply order.
pub fn manifests(o: &InstallOptions, defs: &Definitions) -> Result<Vec<Value>, String> {
    o.validate()?;
    let ns = o.namespace.as_str();
    let mut out: Vec<Value> = defs.crds.clone();
    let meta = |name: &str| json!({"name": name, "namespace": ns, "labels": labels()});

    out.push(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": ns, "labels": {"app.kubernetes.io/part-of": "sinew", ANNOTATION_INJECT: "disabled"}},
    }));
    out.push(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(CONTROL_NAME)}));
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": CONTROL_NAME, "labels": labels()},
        "rules": defs.cluster_rules,
    }));
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": CONTROL_NAME, "labels": labels()},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": CONTROL_NAME},
        "subjects": [{"kind": "ServiceAccount", "name": CONTROL_NAME, "namespace": ns}],
    }));
    // Leader election (for what must have one writer, such as status updates) uses a
    // Lease in the control plane's own namespace only.
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": meta(CONTROL_NAME),
        "rules": defs.namespace_rules,
    }));
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": meta(CONTROL_NAME),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": CONTROL_NAME},
        "subjects": [{"kind": "ServiceAccount", "name": CONTROL_NAME, "namespace": ns}],
    }));
    out.push(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": meta(CONTROL_NAME),
        "spec": {
            "selector": {"app.kubernetes.io/name": "sinew", "app.kubernetes.io/component": "control-plane"},
            "ports": [
                {"name": "grpc", "port": CONTROL_PORT, "targetPort": "grpc", "protocol": "TCP"},
                {"name": "webhook", "port": 443, "targetPort": "webhook", "protocol": "TCP"},
            ],
        },
    }));
    out.push(deployment(o));
    // Voluntary disruptions (node drains, upgrades) leave one replica serving
    // certificates, configuration and injection.
    out.push(json!({
        "apiVersion": o.pdb_api_version, "kind": "PodDisruptionBudget",
        "metadata": meta(CONTROL_NAME),
        "spec": {"minAvailable": 1, "selector": {"matchLabels": selector()}},
    }));
    let mut excluded: Vec<&str> = vec![ns];
    excluded.extend(SYSTEM_NAMESPACES);
    out.push(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK_CONFIGURATION, "labels": labels()},
        "webhooks": [{
            "name": WEBHOOK_NAME,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            // Ignore by default, as Istio and Linkerd do: while no replica of the
            // webhook answers, pods in opted-in namespaces start without a sidecar
            // (visible: no `sinew.dev/injected`; a rollout restart meshes them) rather
            // than not at all; with Fail, a control-plane outage stops every
            // deployment, scale-up and reschedule in those namespaces, including the
            // control plane's own recovery if it ever runs there. The namespace
            // selector keeps the system's and the control plane's namespaces out, so
            // Fail never blocks them. `--webhook-failure-policy Fail` is for meshes
            // where an unmeshed pod is worse than a pod that waits.
            "failurePolicy": o.failure_policy,
            "timeoutSeconds": 10,
            // Injection is idempotent, so a second call after other webhooks is harmless.
            "reinvocationPolicy": "IfNeeded",
            // No caBundle: the webhook's certificate is made in the cluster, and the
            // webhook writes the caBundle itself (sinew_k8s::ca::set_ca_bundle).
            "clientConfig": {
                "service": {"name": CONTROL_NAME, "namespace": ns, "path": "/mutate", "port": 443},
            },
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}],
            // Opt in per namespace; never the control plane's own or the system's.
            // `kubernetes.io/metadata.name` exists from 1.21 (before, NotIn matches
            // every namespace, so it excludes nothing there): the installed Namespace
            // is labelled disabled, and the webhook itself refuses these namespaces
            // (`--exclude-namespace`), on every version.
            "namespaceSelector": {"matchExpressions": [
                {"key": ANNOTATION_INJECT, "operator": "In", "values": ["enabled"]},
                {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": excluded},
            ]},
            // A pod labelled sinew.dev/inject=disabled is never even sent.
            "objectSelector": {"matchExpressions": [
                {"key": ANNOTATION_INJECT, "operator": "NotIn", "values": ["disabled"]},
            ]},
        }],
    }));
    Ok(out)
}

fn deployment(o: &InstallOptions) -> Value {
    let ns = o.namespace.as_str();
    let i = &o.inject;
    let mut webhook_args = vec![
        "webhook".to_owned(),
        "--listen".into(),
        format!("0.0.0.0:{WEBHOOK_PORT}"),
        // Its certificate from the Secret (made there by the first replica), and the
        // caBundle of its configuration set to match; the cluster's version (from the
        // API server) chooses the sidecar layout.
        "--kubernetes".into(),
        "--tls-secret".into(),
        WEBHOOK_SECRET.into(),
        "--webhook-configuration".into(),
        WEBHOOK_CONFIGURATION.into(),
        "--service".into(),
        CONTROL_NAME.into(),
        "--exclude-namespace".into(),
        ns.to_owned(),
        "--proxy-image".into(),
        i.image.clone(),
        "--control-plane-address".into(),
        i.control_plane.clone(),
        "--token-audience".into(),
        i.token_audience.clone(),
        "--proxy-uid".into(),
        i.proxy_uid.to_string(),
    ];
    for (flag, v) in [
        ("--proxy-cpu-request", &i.resources.cpu_request),
        ("--proxy-cpu-limit", &i.resources.cpu_limit),
        ("--proxy-memory-request", &i.resources.memory_request),
        ("--proxy-memory-limit", &i.resources.memory_limit),
        ("--proxy-image-pull-policy", &i.image_pull_policy),
    ] {
        if let Some(v) = v {
            webhook_args.extend([flag.to_owned(), v.clone()]);
        }
    }
    let secure = json!({
        "runAsNonRoot": true, "runAsUser": 65532, "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]},
    });
    let selector = selector();
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": CONTROL_NAME, "namespace": ns, "labels": labels()},
        "spec": {
            "replicas": o.replicas,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels(), "annotations": {ANNOTATION_INJECT: "disabled"}},
                "spec": {
                    "serviceAccountName": CONTROL_NAME,
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}, "fsGroup": 65532},
                    // Replicas on different nodes where possible: one node's loss keeps
                    // the control plane and the webhook up.
                    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                        "weight": 100,
                        "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": selector}},
                    }]}},
                    "containers": [
                        {
                            "name": "control",
                            "image": o.image,
                            "command": ["sinew"],
                            "args": [
                                "control", "--kubernetes",
                                "--listen", format!("0.0.0.0:{CONTROL_PORT}"),
                                "--data-dir", "/var/lib/sinew",
                                "--trust-domain", o.trust_domain,
                                "--token-audience", i.token_audience,
                                // The mesh CA: read from this Secret, or made and
                                // stored there by the first replica.
                                "--ca-secret", CA_SECRET,
                                "--health-listen", format!("0.0.0.0:{HEALTH_PORT}"),
                                // The names in its certificate (TLS only; clients
                                // verify it as .../sa/sinew-control).
                                "--server-name", CONTROL_NAME,
                                "--server-name", format!("{CONTROL_NAME}.{ns}"),
                                "--server-name", format!("{CONTROL_NAME}.{ns}.svc"),
                                "--server-name", format!("{CONTROL_NAME}.{ns}.svc.cluster.local"),
                                "--advertise", format!("https://{CONTROL_NAME}.{ns}.svc:{CONTROL_PORT}"),
                            ],
                            "env": [
                                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                            ],
                            "ports": [
                                {"name": "grpc", "containerPort": CONTROL_PORT, "protocol": "TCP"},
                                {"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
                            ],
                            // Ready once it serves with the cluster's CA and has
                            // listed and synced the cluster; live while it answers.
                            "readinessProbe": {"httpGet": {"path": "/ready", "port": "health"}, "periodSeconds": 5},
                            "livenessProbe": {"httpGet": {"path": "/live", "port": "health"}, "periodSeconds": 10, "failureThreshold": 6},
                            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
                            "securityContext": secure,
                            "volumeMounts": [
                                {"name": "data", "mountPath": "/var/lib/sinew"},
                            ],
                        },
                        {
                            "name": "webhook",
                            "image": o.image,
                            "command": ["sinew"],
                            "args": webhook_args,
                            "ports": [{"name": "webhook", "containerPort": WEBHOOK_PORT, "protocol": "TCP"}],
                            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "webhook", "scheme": "HTTPS"}, "periodSeconds": 5},
                            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "webhook", "scheme": "HTTPS"}, "periodSeconds": 10},
                            "resources": {"requests": {"cpu": "20m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
                            "env": [
                                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                            ],
                            "securityContext": secure,
                        },
                    ],
                    "volumes": [
                        {"name": "data", "emptyDir": {}},
                    ],
                },
            },
        },
    })
}

/// The manifests as multi-document YAML.
pub fn to_yaml(manifests: &[Value]) -> Result<String, String> {
    let mut out = String::new();
    for (i, m) in manifests.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_norway::to_string(m).map_err(|e| format!("manifest {i}: {e}"))?);
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn options() -> InstallOptions {
        InstallOptions {
            namespace: "mesh".into(),
            image: "example.test/sinew:1".into(),
            replicas: 2,
            trust_domain: "cluster.local".into(),
            failure_policy: "Ignore".into(),
            inject: InjectConfig::default(),
            pdb_api_version: "policy/v1".into(),
        }
    }

    #[test]
    fn no_keys_nothing_random_and_production_settings() {
        let a = to_yaml(&manifests(&options(), &Definitions::default()).unwrap()).unwrap();
        let b = to_yaml(&manifests(&options(), &Definitions::default()).unwrap()).unwrap();
        // Rendering twice gives the same bytes: nothing generated, no key, no Secret.
        assert_eq!(a, b);
        assert!(!a.contains("PRIVATE KEY"));
        assert!(!a.contains("kind: Secret"), "{a}");
        assert!(!a.contains("caBundle"), "{a}");

        let docs = manifests(&options(), &Definitions::default()).unwrap();
        let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).unwrap();
        let pdb = kind("PodDisruptionBudget");
        assert_eq!(pdb["apiVersion"], "policy/v1");
        assert_eq!(pdb["spec"]["minAvailable"], 1);
        assert_eq!(
            pdb["spec"]["selector"]["matchLabels"],
            kind("Deployment")["spec"]["selector"]["matchLabels"]
        );
        let pod = &kind("Deployment")["spec"]["template"]["spec"];
        for c in pod["containers"].as_array().unwrap() {
            assert!(c["readinessProbe"]["httpGet"]["path"].is_string(), "{c}");
            assert!(c["livenessProbe"]["httpGet"]["path"].is_string(), "{c}");
            assert!(c["resources"]["requests"]["cpu"].is_string(), "{c}");
            assert!(c["resources"]["requests"]["memory"].is_string(), "{c}");
            assert!(c["resources"]["limits"]["memory"].is_string(), "{c}");
        }
        assert_eq!(
            pod["containers"][0]["readinessProbe"]["httpGet"]["path"],
            "/ready"
        );
        let args = pod["containers"][1]["args"].to_string();
        assert!(args.contains(r#""--exclude-namespace","mesh""#), "{args}");
        let hook = &kind("MutatingWebhookConfiguration")["webhooks"][0];
        assert_eq!(hook["failurePolicy"], "Ignore");
        let names = hook["namespaceSelector"]["matchExpressions"][1]["values"].to_string();
        for ns in ["mesh", "kube-system", "kube-public", "kube-node-lease"] {
            assert!(names.contains(ns), "{names}");
        }
        assert_eq!(
            kind("Namespace")["metadata"]["labels"][ANNOTATION_INJECT],
            "disabled"
        );
    }
}
