//! The Pod mutation: what the sidecar and the capture step look like, and the patch
//! that adds them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapProjection, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, ObjectFieldSelector, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

use crate::InjectError;
use crate::config::*;
use crate::patch::PatchOp;

/// What injection decided for one Pod (or pod template).
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Inject: apply these operations.
    Injected(Vec<PatchOp>),
    /// Left as it is, and why (opted out, host network, already injected).
    Skipped(String),
}

/// Decides and computes the injection of one Pod or pod template (`metadata` and
/// `spec` at the top of `pod`). `at` is where the pod lies in the document (empty for
/// a Pod, `["spec", "template"]` for a Deployment): the patch paths start there, and
/// so do the field names in errors.
pub fn inject_pod(pod: &Value, at: &[&str], config: &InjectConfig) -> Result<Outcome, InjectError> {
    let prefix: String = at.iter().map(|s| format!("{s}.")).collect();
    let field = |f: &str| format!("{prefix}{f}");
    let path =
        |rest: &[&str]| -> Vec<String> { at.iter().chain(rest).map(|s| (*s).to_owned()).collect() };
    let add = |rest: &[&str], value: Value| {
        let p = path(rest);
        let segs: Vec<&str> = p.iter().map(String::as_str).collect();
        PatchOp::add(&segs, value)
    };

    let Some(pod_obj) = pod.as_object() else {
        return Err(InjectError::new(
            if prefix.is_empty() {
                "(document)".to_owned()
            } else {
                prefix.trim_end_matches('.').to_owned()
            },
            "must be an object",
        ));
    };
    let metadata = match pod_obj.get("metadata") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m),
        Some(_) => return Err(InjectError::new(field("metadata"), "must be an object")),
    };
    let annotations = match metadata.and_then(|m| m.get("annotations")) {
        None | Some(Value::Null) => None,
        Some(Value::Object(a)) => Some(a),
        Some(_) => {
            return Err(InjectError::new(
                field("metadata.annotations"),
                "must be a map of strings",
            ));
        }
    };
    let mut ann = BTreeMap::new();
    for (k, v) in annotations.into_iter().flatten() {
        let Some(v) = v.as_str() else {
            return Err(InjectError::new(
                field(&format!("metadata.annotations[\"{k}\"]")),
                "must be a string (quote it in YAML)",
            ));
        };
        ann.insert(k.clone(), v.to_owned());
    }

    // The label opts out too (the webhook configuration's object selector uses it).
    let label = metadata
        .and_then(|m| m.get("labels"))
        .and_then(|l| l.get(ANNOTATION_INJECT))
        .and_then(Value::as_str);
    if label == Some("disabled") {
        return Ok(Outcome::Skipped(format!(
            "the label {ANNOTATION_INJECT} is disabled"
        )));
    }
    match ann.get(ANNOTATION_INJECT).map(|v| v.trim()) {
        None | Some("enabled") => {}
        Some("disabled") => {
            return Ok(Outcome::Skipped(format!("{ANNOTATION_INJECT} is disabled")));
        }
        Some(other) => {
            return Err(InjectError::new(
                field(&format!("metadata.annotations[\"{ANNOTATION_INJECT}\"]")),
                format!("{other:?}: must be enabled or disabled"),
            ));
        }
    }

    let Some(spec) = pod_obj.get("spec").and_then(Value::as_object) else {
        return Err(InjectError::new(
            field("spec"),
            "missing (a pod needs a spec)",
        ));
    };
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Outcome::Skipped(
            "the pod uses the host's network (capture would change the node's rules)".into(),
        ));
    }
    let names = |key: &str| -> Result<Vec<String>, InjectError> {
        match spec.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    c.get("name")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                        .ok_or_else(|| {
                            InjectError::new(field(&format!("spec.{key}[{i}].name")), "missing")
                        })
                })
                .collect(),
            Some(_) => Err(InjectError::new(
                field(&format!("spec.{key}")),
                "must be a list",
            )),
        }
    };
    let containers = names("containers")?;
    let init_containers = names("initContainers")?;
    let volumes = names("volumes")?;
    if containers.is_empty() {
        return Err(InjectError::new(
            field("spec.containers"),
            "missing or empty (a pod needs a container)",
        ));
    }
    if containers.iter().any(|n| n == PROXY_CONTAINER) {
        return Ok(Outcome::Skipped("already injected".into()));
    }

    let c = config.for_pod(&ann, &prefix)?;
    let mut ops = Vec::new();

    // Annotations: mark it injected; make `kubectl logs/exec` default to the app (the
    // proxy comes first in the list so that it starts first).
    let mut new_ann = vec![(ANNOTATION_INJECTED, json!("true"))];
    // Discovery (sinew-k8s) sends mesh traffic for this pod to the sidecar's inbound
    // port when the pod says where it is.
    if !ann.contains_key(ANNOTATION_INBOUND_PORT) {
        new_ann.push((ANNOTATION_INBOUND_PORT, json!(c.inbound_port.to_string())));
    }
    // Prometheus' conventional pod annotations point at the proxy's /metrics on the
    // admin port (served to the pod's address), unless the app uses them already.
    if !ann.contains_key("prometheus.io/scrape") {
        new_ann.push(("prometheus.io/scrape", json!("true")));
        new_ann.push(("prometheus.io/port", json!(c.admin_port.to_string())));
        new_ann.push(("prometheus.io/path", json!("/metrics")));
    }
    if !ann.contains_key("kubectl.kubernetes.io/default-container") {
        new_ann.push((
            "kubectl.kubernetes.io/default-container",
            json!(containers[0]),
        ));
    }
    if metadata.is_none() {
        let map: serde_json::Map<String, Value> = new_ann
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        ops.push(add(&["metadata"], json!({ "annotations": map })));
    } else if annotations.is_none() {
        let map: serde_json::Map<String, Value> = new_ann
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        ops.push(add(&["metadata", "annotations"], Value::Object(map)));
    } else {
        for (k, v) in new_ann {
            ops.push(add(&["metadata", "annotations", k], v));
        }
    }

    let to_value = |what: &str, v: Result<Value, serde_json::Error>| {
        v.map_err(|e| InjectError::new(what, format!("cannot be built: {e}")))
    };
    if init_containers.iter().any(|n| n == PROXY_CONTAINER) {
        return Ok(Outcome::Skipped("already injected".into()));
    }
    let proxy = to_value(PROXY_CONTAINER, serde_json::to_value(proxy_container(&c)))?;
    // In order, at the head of initContainers: the capture step, then (native
    // sidecar) the proxy, so the proxy is up before the user's init containers and the
    // app, whose traffic the rules already send to it.
    let mut first_inits = Vec::new();
    if c.capture && !init_containers.iter().any(|n| n == INIT_CONTAINER) {
        first_inits.push(to_value(
            INIT_CONTAINER,
            serde_json::to_value(init_container(&c)),
        )?);
    }
    if c.native_sidecar {
        first_inits.push(proxy);
    } else {
        ops.push(add(&["spec", "containers", "0"], proxy));
    }
    if spec.get("initContainers").is_some_and(Value::is_array) {
        for (i, init) in first_inits.into_iter().enumerate() {
            ops.push(add(&["spec", "initContainers", &i.to_string()], init));
        }
    } else if !first_inits.is_empty() {
        ops.push(add(&["spec", "initContainers"], Value::Array(first_inits)));
    }
    // A projected service-account token needs a service account named. The API
    // server's ServiceAccount admission names `default` before webhooks run; where it
    // does not (it can be turned off), name the same one here.
    let named = |k: &str| {
        spec.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    if named("serviceAccountName").is_none() {
        let account = named("serviceAccount").unwrap_or("default");
        ops.push(add(&["spec", "serviceAccountName"], json!(account)));
    }
    let mut new_volumes = Vec::new();
    if !volumes.iter().any(|n| n == TOKEN_VOLUME) {
        new_volumes.push(to_value(
            TOKEN_VOLUME,
            serde_json::to_value(token_volume(&c)),
        )?);
    }
    if c.capture && !volumes.iter().any(|n| n == XTABLES_VOLUME) {
        new_volumes.push(json!({"name": XTABLES_VOLUME, "emptyDir": {}}));
    }
    if spec.get("volumes").is_some_and(Value::is_array) {
        for vol in new_volumes {
            ops.push(add(&["spec", "volumes", "-"], vol));
        }
    } else if !new_volumes.is_empty() {
        ops.push(add(&["spec", "volumes"], Value::Array(new_volumes)));
    }
    Ok(Outcome::Injected(ops))
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: Some("v1".into()),
                field_path: path.into(),
            }),
            ..Default::default()
        }),
    }
}

fn quantities(pairs: &[(&str, &Option<String>)]) -> Option<BTreeMap<String, Quantity>> {
    let m: BTreeMap<String, Quantity> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| ((*k).to_owned(), Quantity(v.clone()))))
        .collect();
    (!m.is_empty()).then_some(m)
}

fn probe(path: &str, port: u16, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(port)),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Default::default()
    }
}

/// The sidecar's DNS responder port: `sinew init` redirects the pod's DNS (UDP 53) there.
pub const DNS_PORT: u16 = 15053;

fn proxy_args(c: &InjectConfig) -> Vec<String> {
    let mut args = vec![
        "--join-token-file".into(),
        format!("{TOKEN_DIR}/{TOKEN_FILE}"),
    ];
    // Without capture, the inbound listener comes from discovery alone (the pod's
    // `sinew.dev/inbound-port`), and nothing is redirected to the proxy.
    if c.capture {
        args.extend([
            "--capture".into(),
            "--capture-inbound-port".into(),
            c.inbound_port.to_string(),
            "--capture-outbound-port".into(),
            c.outbound_port.to_string(),
            // The pod's DNS queries come here (the init container's rules): Services'
            // names are answered with their ClusterIPs, as kube-dns would, the rest
            // forwarded to the pod's resolver.
            "--capture-dns-port".into(),
            DNS_PORT.to_string(),
        ]);
    }
    args
}

/// The `sinew-proxy` sidecar for these settings.
pub fn proxy_container(c: &InjectConfig) -> Container {
    Container {
        name: PROXY_CONTAINER.into(),
        image: Some(c.image.clone()),
        image_pull_policy: c.image_pull_policy.clone(),
        command: Some(vec!["sinew-proxy".into()]),
        // The init container's rules send the pod's traffic to these ports; the
        // inbound one is also the sidecar port peers reach (the pod's
        // `sinew.dev/inbound-port`), served by the capture listener.
        args: Some(proxy_args(c)),
        env: Some(vec![
            env_field("POD_NAME", "metadata.name"),
            env_field("POD_NAMESPACE", "metadata.namespace"),
            env_field("POD_IP", "status.podIP"),
            env_field("SINEW_SERVICE_ACCOUNT", "spec.serviceAccountName"),
            // Kubernetes expands $(VAR) from the variables defined above.
            env("SINEW_PROXY_NAME", "$(POD_NAMESPACE)/$(POD_NAME)"),
            env("SINEW_CONTROL_PLANE", c.control_plane.clone()),
            env("SINEW_TOKEN_AUDIENCE", c.token_audience.clone()),
            // The mesh roots (the control plane's `sinew-root` ConfigMap, in the
            // token's volume): the sidecar verifies the control plane with them
            // before it shows its token.
            env(
                "SINEW_CONTROL_PLANE_CA",
                format!("{TOKEN_DIR}/{ROOTS_FILE}"),
            ),
            // Probes come from the kubelet and scrapes from Prometheus, so the admin
            // listener is on the pod's address (capture leaves its port alone); it
            // serves only /live, /ready and /metrics to callers that are not
            // loopback (/config, /tap, /shutdown are the pod's own).
            env("SINEW_PROXY_ADMIN", format!("0.0.0.0:{}", c.admin_port)),
            env("RUST_LOG", c.log_level.clone()),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some("sinew-inbound".into()),
                container_port: i32::from(c.inbound_port),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some("sinew-admin".into()),
                container_port: i32::from(c.admin_port),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        readiness_probe: Some(probe("/ready", c.admin_port, 2, 3)),
        liveness_probe: Some(probe("/live", c.admin_port, 10, 3)),
        // A native sidecar: the kubelet starts the next init container (and then
        // the app) once this probe passes, i.e. once the proxy has its configuration
        // and certificate (up to two minutes). Kept for the whole pod's life, and ended
        // after the app's containers, so a Job completes.
        restart_policy: c.native_sidecar.then(|| "Always".to_owned()),
        startup_probe: c
            .native_sidecar
            .then(|| probe("/ready", c.admin_port, 1, 120)),
        resources: Some(ResourceRequirements {
            requests: quantities(&[
                ("cpu", &c.resources.cpu_request),
                ("memory", &c.resources.memory_request),
            ]),
            limits: quantities(&[
                ("cpu", &c.resources.cpu_limit),
                ("memory", &c.resources.memory_limit),
            ]),
            ..Default::default()
        }),
        // Pod Security `restricted`: non-root, no capabilities, no escalation,
        // the runtime's seccomp profile, nothing written outside its volumes.
        security_context: Some(SecurityContext {
            run_as_user: Some(c.proxy_uid),
            run_as_group: Some(c.proxy_uid),
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: TOKEN_VOLUME.into(),
            mount_path: TOKEN_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

/// The `sinew-init` capture step for these settings: `sinew init` with the ports and
/// exclusions, root with NET_ADMIN and NET_RAW only (to write the pod's iptables rules).
pub fn init_container(c: &InjectConfig) -> Container {
    let mut args = vec![
        "init".to_owned(),
        "--proxy-uid".into(),
        c.proxy_uid.to_string(),
        "--inbound-port".into(),
        c.inbound_port.to_string(),
        "--outbound-port".into(),
        c.outbound_port.to_string(),
        "--dns-port".into(),
        DNS_PORT.to_string(),
    ];
    // The admin port is never captured: the kubelet's probes must reach the proxy itself.
    let mut inbound = vec![c.admin_port.to_string()];
    inbound.extend(
        c.exclude_inbound_ports
            .iter()
            .filter(|p| **p != c.admin_port.to_string())
            .cloned(),
    );
    args.extend(["--exclude-inbound-ports".into(), inbound.join(",")]);
    if !c.exclude_outbound_ports.is_empty() {
        args.extend([
            "--exclude-outbound-ports".into(),
            c.exclude_outbound_ports.join(","),
        ]);
    }
    if !c.exclude_outbound_cidrs.is_empty() {
        args.extend([
            "--exclude-outbound-cidrs".into(),
            c.exclude_outbound_cidrs.join(","),
        ]);
    }
    Container {
        name: INIT_CONTAINER.into(),
        image: Some(c.image.clone()),
        image_pull_policy: c.image_pull_policy.clone(),
        command: Some(vec!["sinew".into()]),
        args: Some(args),
        resources: Some(ResourceRequirements {
            requests: quantities(&[
                ("cpu", &Some("10m".into())),
                ("memory", &Some("16Mi".into())),
            ]),
            limits: quantities(&[("memory", &Some("64Mi".into()))]),
            ..Default::default()
        }),
        // Only what writing the pod's own netfilter rules needs: root (iptables
        // refuses otherwise) with NET_ADMIN and NET_RAW, every other capability
        // dropped, no escalation, the runtime's seccomp profile, a read-only root (the
        // iptables lock goes to its own emptyDir at /run). NET_ADMIN is what Pod
        // Security `baseline` forbids: such namespaces need a CNI plugin doing capture
        // instead (docs/kubernetes.md says so); the proxy itself is `restricted`.
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: XTABLES_VOLUME.into(),
            mount_path: "/run".into(),
            ..Default::default()
        }]),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

/// The mesh roots' file in the token's volume.
pub const ROOTS_FILE: &str = "roots.pem";

/// The projected service-account token, minted for the control plane's audience, and
/// beside it the mesh roots from the ConfigMap `sinew-root` that the control plane
/// keeps in every namespace.
pub fn token_volume(c: &InjectConfig) -> Volume {
    Volume {
        name: TOKEN_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(0o444),
            sources: Some(vec![
                VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(c.token_audience.clone()),
                        expiration_seconds: Some(c.token_expiration_seconds),
                        path: TOKEN_FILE.into(),
                    }),
                    ..Default::default()
                },
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: "sinew-root".into(),
                        items: Some(vec![KeyToPath {
                            key: "roots.pem".into(),
                            path: ROOTS_FILE.into(),
                            mode: None,
                        }]),
                        optional: Some(false),
                    }),
                    ..Default::default()
                },
            ]),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::patch::apply_json;

    fn pod() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "app", "image": "nginx", "ports": [{"containerPort": 8080}]}]}
        })
    }

    fn injected(mut p: Value) -> Value {
        let Outcome::Injected(ops) = inject_pod(&p, &[], &InjectConfig::default()).unwrap() else {
            panic!("not injected");
        };
        apply_json(&mut p, &ops).unwrap();
        p
    }

    #[test]
    fn adds_proxy_init_token_and_marks_it() {
        let p = injected(pod());
        let spec = &p["spec"];
        assert_eq!(spec["containers"][0]["name"], PROXY_CONTAINER);
        assert_eq!(spec["containers"][1]["name"], "app");
        assert_eq!(spec["containers"][1]["image"], "nginx");
        let proxy = &spec["containers"][0];
        assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/ready");
        assert_eq!(proxy["readinessProbe"]["httpGet"]["port"], 4191);
        assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
        assert_eq!(proxy["resources"]["requests"]["cpu"], "100m");
        assert_eq!(proxy["volumeMounts"][0]["mountPath"], TOKEN_DIR);
        let init = &spec["initContainers"][0];
        assert_eq!(init["name"], INIT_CONTAINER);
        assert_eq!(init["command"], json!(["sinew"]));
        assert_eq!(
            init["securityContext"]["capabilities"]["add"],
            json!(["NET_ADMIN", "NET_RAW"])
        );
        let args: Vec<&str> = init["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "init",
                "--proxy-uid",
                "1337",
                "--inbound-port",
                "15006",
                "--outbound-port",
                "15001",
                "--dns-port",
                "15053",
                "--exclude-inbound-ports",
                "4191"
            ]
        );
        // The sidecar answers the DNS the init container's rules send it.
        let pargs = proxy["args"].to_string();
        assert!(pargs.contains(r#""--capture-dns-port","15053""#), "{pargs}");
        let tok = &spec["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!(tok["audience"], "sinew");
        assert_eq!(tok["path"], TOKEN_FILE);
        assert_eq!(p["metadata"]["annotations"][ANNOTATION_INJECTED], "true");
        assert_eq!(
            p["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
            "app"
        );
    }

    fn injected_with(mut p: Value, c: &InjectConfig) -> Value {
        let Outcome::Injected(ops) = inject_pod(&p, &[], c).unwrap() else {
            panic!("not injected");
        };
        apply_json(&mut p, &ops).unwrap();
        p
    }

    fn names(list: &Value) -> Vec<&str> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn the_layout_follows_the_cluster_version() {
        let config = |version: &str| InjectConfig {
            native_sidecar: crate::config::native_sidecars(version).unwrap(),
            ..InjectConfig::default()
        };
        let mut with_init = pod();
        with_init["spec"]["initContainers"] = json!([{"name": "migrate", "image": "m"}]);

        // 1.20: the proxy is the first regular container; no restartPolicy, no
        // startup probe (an old API server would refuse the field... or drop it).
        let old = injected_with(with_init.clone(), &config("v1.20.15"));
        assert_eq!(names(&old["spec"]["containers"]), [PROXY_CONTAINER, "app"]);
        assert_eq!(
            names(&old["spec"]["initContainers"]),
            [INIT_CONTAINER, "migrate"]
        );
        let proxy = &old["spec"]["containers"][0];
        assert!(proxy.get("restartPolicy").is_none(), "{proxy}");
        assert!(proxy.get("startupProbe").is_none(), "{proxy}");

        // 1.29: capture, then the proxy as a native sidecar, then the user's init
        // containers; the app's containers are untouched.
        let native = injected_with(with_init, &config("v1.29.2"));
        assert_eq!(names(&native["spec"]["containers"]), ["app"]);
        assert_eq!(
            names(&native["spec"]["initContainers"]),
            [INIT_CONTAINER, PROXY_CONTAINER, "migrate"]
        );
        let proxy = &native["spec"]["initContainers"][1];
        assert_eq!(proxy["restartPolicy"], "Always");
        assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
        assert_eq!(proxy["startupProbe"]["httpGet"]["port"], 4191);
        assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/ready");
        assert_eq!(
            native["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
            "app"
        );
        // Without init containers of its own, the pod gets both.
        let bare = injected_with(pod(), &config("1.30"));
        assert_eq!(
            names(&bare["spec"]["initContainers"]),
            [INIT_CONTAINER, PROXY_CONTAINER]
        );
        // Injecting an injected native pod again changes nothing.
        assert_eq!(
            inject_pod(&native, &[], &config("v1.29.2")).unwrap(),
            Outcome::Skipped("already injected".into())
        );
    }

    #[test]
    fn security_contexts_are_least_privilege() {
        let p = injected(pod());
        let proxy = &p["spec"]["containers"][0]["securityContext"];
        assert_eq!(proxy["runAsNonRoot"], true);
        assert_eq!(proxy["runAsUser"], 1337);
        assert_eq!(proxy["allowPrivilegeEscalation"], false);
        assert_eq!(proxy["privileged"], false);
        assert_eq!(proxy["readOnlyRootFilesystem"], true);
        assert_eq!(proxy["capabilities"], json!({"drop": ["ALL"]}));
        assert_eq!(proxy["seccompProfile"]["type"], "RuntimeDefault");

        let init = &p["spec"]["initContainers"][0];
        let sc = &init["securityContext"];
        assert_eq!(sc["runAsNonRoot"], false);
        assert_eq!(sc["runAsUser"], 0);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["privileged"], false);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(
            sc["capabilities"],
            json!({"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]})
        );
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
        // The iptables lock's writable /run.
        assert_eq!(init["volumeMounts"][0]["name"], XTABLES_VOLUME);
        assert_eq!(init["volumeMounts"][0]["mountPath"], "/run");
        assert!(
            p["spec"]["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["name"] == XTABLES_VOLUME && v["emptyDir"].is_object())
        );
        // Every injected container has requests and a memory limit.
        for c in [&p["spec"]["containers"][0], init] {
            assert!(c["resources"]["requests"]["cpu"].is_string(), "{c}");
            assert!(c["resources"]["requests"]["memory"].is_string(), "{c}");
            assert!(c["resources"]["limits"]["memory"].is_string(), "{c}");
        }
        // Prometheus is pointed at the admin port's /metrics, the probes at its
        // /ready and /live: the paths it serves to other addresses.
        let ann = &p["metadata"]["annotations"];
        assert_eq!(ann["prometheus.io/scrape"], "true");
        assert_eq!(ann["prometheus.io/port"], "4191");
        assert_eq!(ann["prometheus.io/path"], "/metrics");
        assert_eq!(
            p["spec"]["containers"][0]["livenessProbe"]["httpGet"]["path"],
            "/live"
        );
        // An app that has its own scrape annotations keeps them.
        let mut own = pod();
        own["metadata"]["annotations"] =
            json!({"prometheus.io/scrape": "true", "prometheus.io/port": "8080"});
        let own = injected(own);
        assert_eq!(own["metadata"]["annotations"]["prometheus.io/port"], "8080");
    }

    #[test]
    fn without_capture_nothing_needs_privileges() {
        let mut p = pod();
        p["metadata"]["annotations"] = json!({ANNOTATION_CAPTURE: "disabled"});
        let p = injected(p);
        // No init container, no capture flags: only the restricted proxy.
        assert!(p["spec"].get("initContainers").is_none(), "{p}");
        assert_eq!(names(&p["spec"]["containers"]), [PROXY_CONTAINER, "app"]);
        assert_eq!(names(&p["spec"]["volumes"]), [TOKEN_VOLUME]);
        let proxy = &p["spec"]["containers"][0];
        assert!(!proxy["args"].to_string().contains("--capture"), "{proxy}");
        assert_eq!(
            proxy["securityContext"]["capabilities"],
            json!({"drop": ["ALL"]})
        );
        assert_eq!(
            p["metadata"]["annotations"][ANNOTATION_INBOUND_PORT],
            "15006"
        );
        // Natively too: the proxy alone in initContainers.
        let mut n = pod();
        n["metadata"]["annotations"] = json!({ANNOTATION_CAPTURE: "disabled"});
        let config = InjectConfig {
            native_sidecar: true,
            ..InjectConfig::default()
        };
        let n = injected_with(n, &config);
        assert_eq!(names(&n["spec"]["initContainers"]), [PROXY_CONTAINER]);
        let mut bad = pod();
        bad["metadata"]["annotations"] = json!({ANNOTATION_CAPTURE: "off"});
        let e = inject_pod(&bad, &[], &InjectConfig::default()).unwrap_err();
        assert!(e.field.contains(ANNOTATION_CAPTURE), "{e}");
    }

    #[test]
    fn twice_is_once_and_opt_out_and_host_network_are_left_alone() {
        let once = injected(pod());
        assert_eq!(
            inject_pod(&once, &[], &InjectConfig::default()).unwrap(),
            Outcome::Skipped("already injected".into())
        );
        let mut out = pod();
        out["metadata"]["annotations"] = json!({ANNOTATION_INJECT: "disabled"});
        assert!(matches!(
            inject_pod(&out, &[], &InjectConfig::default()).unwrap(),
            Outcome::Skipped(_)
        ));
        let mut labelled = pod();
        labelled["metadata"]["labels"]["sinew.dev/inject"] = json!("disabled");
        assert!(matches!(
            inject_pod(&labelled, &[], &InjectConfig::default()).unwrap(),
            Outcome::Skipped(_)
        ));
        let mut host = pod();
        host["spec"]["hostNetwork"] = json!(true);
        assert!(matches!(
            inject_pod(&host, &[], &InjectConfig::default()).unwrap(),
            Outcome::Skipped(_)
        ));
    }

    #[test]
    fn annotations_shape_the_sidecar_and_existing_lists_are_extended() {
        let mut p = pod();
        p["metadata"]["annotations"] = json!({
            ANNOTATION_EXCLUDE_OUTBOUND_CIDRS: "10.0.0.0/8",
            ANNOTATION_EXCLUDE_INBOUND_PORTS: "9090",
            ANNOTATION_MEMORY_LIMIT: "1Gi",
            ANNOTATION_ADMIN_PORT: "5191",
        });
        p["spec"]["initContainers"] = json!([{"name": "migrate", "image": "m"}]);
        p["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
        p["spec"]["serviceAccountName"] = json!("web");
        let p = injected(p);
        assert_eq!(p["spec"]["serviceAccountName"], "web");
        let spec = &p["spec"];
        assert_eq!(spec["initContainers"][0]["name"], INIT_CONTAINER);
        assert_eq!(spec["initContainers"][1]["name"], "migrate");
        assert_eq!(spec["volumes"][0]["name"], "data");
        assert_eq!(spec["volumes"][1]["name"], TOKEN_VOLUME);
        assert_eq!(spec["volumes"][2]["name"], XTABLES_VOLUME);
        let args = spec["initContainers"][0]["args"].to_string();
        assert!(
            args.contains(r#""--exclude-inbound-ports","5191,9090""#),
            "{args}"
        );
        assert!(
            args.contains(r#""--exclude-outbound-cidrs","10.0.0.0/8""#),
            "{args}"
        );
        assert_eq!(
            spec["containers"][0]["resources"]["limits"]["memory"],
            "1Gi"
        );
        assert_eq!(
            spec["containers"][0]["readinessProbe"]["httpGet"]["port"],
            5191
        );
        // The user's annotations are kept.
        assert_eq!(p["metadata"]["annotations"][ANNOTATION_MEMORY_LIMIT], "1Gi");
    }

    #[test]
    fn bad_input_names_the_field() {
        let mut p = pod();
        p["metadata"]["annotations"] = json!({ANNOTATION_INBOUND_PORT: 80});
        let e = inject_pod(&p, &["spec", "template"], &InjectConfig::default()).unwrap_err();
        assert_eq!(
            e.field,
            "spec.template.metadata.annotations[\"sinew.dev/inbound-port\"]"
        );
        let mut p = pod();
        p["spec"]["containers"] = json!([{"image": "x"}]);
        let e = inject_pod(&p, &[], &InjectConfig::default()).unwrap_err();
        assert_eq!(e.to_string(), "spec.containers[0].name: missing");
        let mut p = pod();
        p["metadata"]["annotations"] = json!({ANNOTATION_INJECT: "yes"});
        let e = inject_pod(&p, &[], &InjectConfig::default()).unwrap_err();
        assert!(e.reason.contains("must be enabled or disabled"), "{e}");
    }
}
