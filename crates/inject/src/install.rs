//! `sinew install --kubernetes`: the manifests of a Sinew installation.
//!
//! In apply order: the CustomResourceDefinitions (given by the caller: they come from
//! sinew-k8s), the Namespace, the control plane's ServiceAccount, least-privilege RBAC,
//! the mesh CA and webhook certificate Secrets, the Service, the control-plane
//! Deployment (two or more replicas; the webhook runs as a second container in each
//! pod), and last the MutatingWebhookConfiguration, so nothing is sent to a webhook
//! before it can exist.

use serde_json::{Value, json};

use crate::config::{ANNOTATION_INJECT, InjectConfig};

/// The name of the control plane's Deployment, Service, ServiceAccount and RBAC.
pub const CONTROL_NAME: &str = "sinew-control";
/// The MutatingWebhookConfiguration's name.
pub const WEBHOOK_CONFIGURATION: &str = "sinew-injector";
/// The webhook's serving certificate Secret (`kubernetes.io/tls`, with `ca.crt`).
pub const WEBHOOK_SECRET: &str = "sinew-webhook-tls";
/// The mesh CA Secret (`ca.pem`, `ca-key.pem`), shared by every control-plane replica.
pub const CA_SECRET: &str = "sinew-ca";
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
    /// The webhook's serving certificate chain (PEM).
    pub webhook_cert_pem: String,
    /// Its key (PEM).
    pub webhook_key_pem: String,
    /// The CA that signed it: the `caBundle`.
    pub webhook_ca_pem: String,
    /// The mesh CA certificate (PEM).
    pub mesh_ca_pem: String,
    /// The mesh CA key (PEM).
    pub mesh_ca_key_pem: String,
}

impl InstallOptions {
    /// The names the webhook's certificate must carry (the Service's DNS names).
    pub fn webhook_names(namespace: &str) -> Vec<String> {
        vec![
            format!("{CONTROL_NAME}.{namespace}.svc"),
            format!("{CONTROL_NAME}.{namespace}.svc.cluster.local"),
            format!("{CONTROL_NAME}.{namespace}"),
            CONTROL_NAME.to_owned(),
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

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
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
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": meta(CA_SECRET),
        "data": {"ca.pem": b64(&o.mesh_ca_pem), "ca-key.pem": b64(&o.mesh_ca_key_pem)},
    }));
    out.push(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": meta(WEBHOOK_SECRET),
        "data": {"tls.crt": b64(&o.webhook_cert_pem), "tls.key": b64(&o.webhook_key_pem), "ca.crt": b64(&o.webhook_ca_pem)},
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
    out.push(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK_CONFIGURATION, "labels": labels()},
        "webhooks": [{
            "name": "inject.sinew.dev",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": o.failure_policy,
            "timeoutSeconds": 10,
            // Injection is idempotent, so a second call after other webhooks is harmless.
            "reinvocationPolicy": "IfNeeded",
            "clientConfig": {
                "service": {"name": CONTROL_NAME, "namespace": ns, "path": "/mutate", "port": 443},
                "caBundle": b64(&o.webhook_ca_pem),
            },
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}],
            // Opt in per namespace; never the control plane's own or the system's.
            "namespaceSelector": {"matchExpressions": [
                {"key": ANNOTATION_INJECT, "operator": "In", "values": ["enabled"]},
                {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [ns, "kube-system"]},
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
        "--tls-cert".into(),
        "/etc/sinew/webhook/tls.crt".into(),
        "--tls-key".into(),
        "/etc/sinew/webhook/tls.key".into(),
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
    let selector =
        json!({"app.kubernetes.io/name": "sinew", "app.kubernetes.io/component": "control-plane"});
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
                                "--ca-cert", "/etc/sinew/ca/ca.pem",
                                "--ca-key", "/etc/sinew/ca/ca-key.pem",
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
                            "ports": [{"name": "grpc", "containerPort": CONTROL_PORT, "protocol": "TCP"}],
                            "readinessProbe": {"tcpSocket": {"port": "grpc"}, "periodSeconds": 5},
                            "livenessProbe": {"tcpSocket": {"port": "grpc"}, "periodSeconds": 10, "failureThreshold": 6},
                            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
                            "securityContext": secure,
                            "volumeMounts": [
                                {"name": "data", "mountPath": "/var/lib/sinew"},
                                {"name": "ca", "mountPath": "/etc/sinew/ca", "readOnly": true},
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
                            "securityContext": secure,
                            "volumeMounts": [{"name": "webhook-tls", "mountPath": "/etc/sinew/webhook", "readOnly": true}],
                        },
                    ],
                    "volumes": [
                        {"name": "data", "emptyDir": {}},
                        {"name": "ca", "secret": {"secretName": CA_SECRET, "defaultMode": 0o440}},
                        {"name": "webhook-tls", "secret": {"secretName": WEBHOOK_SECRET, "defaultMode": 0o440}},
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
