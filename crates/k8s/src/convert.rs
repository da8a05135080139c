//! Kubernetes objects to Sinew documents.
//!
//! - A `Service` becomes a Sinew `Service` with the same name and ports, and its
//!   ClusterIPs (all of them: dual-stack) as its virtual IPs, so captured calls through
//!   kube-dns are the mesh's; a headless Service has none.
//! - Each ready endpoint of a Service (from EndpointSlices, or Endpoints on old clusters)
//!   becomes a `Workload` of that service: its address and ports, and from its Pod the
//!   labels, the service account (its SPIFFE identity) and, when the Pod carries
//!   [`SIDECAR_PORT_ANNOTATION`], the sidecar's inbound port; its zone and region from
//!   the EndpointSlice and its Node (see [`workloads`]). Endpoints that are not ready
//!   (or whose Pod is not ready or is terminating) are left out.
//! - A meshed Pod that is no Service's endpoint (a client) is a `Workload` without a
//!   service ([`pod_workload`]): its sidecar's identity and zone.
//! - Sinew custom resources are the documents themselves; Gateway API `HTTPRoute` too.
//! - `GRPCRoute` becomes an `HTTPRoute` over gRPC paths (`/<service>/<method>`), and SMI
//!   `TrafficSplit` an `HTTPRoute` with weighted backends on the root service (only for
//!   its `HTTPRouteGroup` matches, if it has any; the rest goes to the root service).
//! - SMI `TrafficTarget` (with its `HTTPRouteGroup`s) becomes ALLOW `AuthorizationPolicy`s
//!   on the services whose workloads run as its destination service account.
//!
//! Every document made here is parsed by the model, exactly as a file would be, under a
//! label naming the object it came from ([`label`]), so problems can be traced back to it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::DynamicObject;
use serde_json::{Map, Value, json};
use sinew_model::load::{Document, parse_documents};
use sinew_model::policy::GRPC_ROUTE_PREFIX;
use sinew_model::resource::{GATEWAY_GROUP, SINEW_API_VERSION};

use crate::crd::Kind;

/// The documents an object stands for, or why it has none.
pub type Converted = Result<Vec<Document>, Vec<String>>;

/// Pod annotation: the port of the Sinew sidecar's inbound listener. Mesh traffic to the
/// Pod goes there (mTLS, HTTP/2) instead of to the application's port.
pub const SIDECAR_PORT_ANNOTATION: &str = "sinew.dev/inbound-port";

/// The source label of a document made from a Kubernetes object.
pub fn label(kind: &str, namespace: &str, name: &str) -> String {
    format!("kubernetes {kind} {namespace}/{name}")
}

/// One endpoint of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// IP address.
    pub ip: String,
    /// Ready to serve.
    pub ready: bool,
    /// The Pod behind it, if any.
    pub pod: Option<String>,
    /// Port numbers by port name (`""` for a service's single unnamed port); a slice's
    /// ports apply to all its endpoints.
    pub ports: BTreeMap<String, u16>,
    /// The zone the endpoint serves, for locality preference: the first zone of its
    /// topology hints (`hints.forZones`: the EndpointSlice controller assigns each
    /// endpoint to one zone), else its own `zone` (v1; `topology` in v1beta1).
    pub zone: Option<String>,
    /// The Node it runs on (`nodeName`), whose topology labels tell its zone and
    /// region when the slice does not.
    pub node: Option<String>,
}

/// The endpoints of one service, from however many slices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointSet {
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub service: String,
    /// Endpoints.
    pub endpoints: Vec<Endpoint>,
}

/// The endpoints an EndpointSlice (discovery.k8s.io v1, or v1beta1 read as v1) holds, with
/// the service it belongs to (label `kubernetes.io/service-name`).
pub fn from_slice(s: &EndpointSlice) -> Option<EndpointSet> {
    let service = s
        .metadata
        .labels
        .as_ref()?
        .get("kubernetes.io/service-name")?;
    if !matches!(s.address_type.as_str(), "IPv4" | "IPv6") {
        return None;
    }
    let mut ports = BTreeMap::new();
    for p in s.ports.iter().flatten() {
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue;
        }
        if let Some(port) = p.port.and_then(|n| u16::try_from(n).ok()) {
            ports.insert(p.name.clone().unwrap_or_default(), port);
        }
    }
    let endpoints = s
        .endpoints
        .iter()
        .flat_map(|e| {
            // Unknown readiness counts as ready, as the API documents.
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true)
                && !e
                    .conditions
                    .as_ref()
                    .and_then(|c| c.terminating)
                    .unwrap_or(false);
            let pod = e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.clone());
            let ports = ports.clone();
            let zone = e
                .hints
                .as_ref()
                .and_then(|h| h.for_zones.as_ref())
                .and_then(|z| z.first())
                .map(|z| z.name.clone())
                .or_else(|| e.zone.clone())
                .filter(|z| !z.is_empty());
            let node = e.node_name.clone().filter(|n| !n.is_empty());
            e.addresses.iter().map(move |ip| Endpoint {
                ip: ip.clone(),
                ready,
                pod: pod.clone(),
                ports: ports.clone(),
                zone: zone.clone(),
                node: node.clone(),
            })
        })
        .collect();
    Some(EndpointSet {
        namespace: s.metadata.namespace.clone().unwrap_or_default(),
        service: service.clone(),
        endpoints,
    })
}

/// A `discovery.k8s.io/v1beta1` EndpointSlice (what Kubernetes 1.20 serves) read as v1:
/// the same shape where Sinew reads it (addresses, conditions, targetRef, ports,
/// nodeName, hints) except the zone, which v1beta1 keeps in `topology`
/// (`topology.kubernetes.io/zone`, and the node in `kubernetes.io/hostname`).
pub fn slice_from_v1beta1(mut v: Value) -> Option<EndpointSlice> {
    v["apiVersion"] = "discovery.k8s.io/v1".into();
    v["kind"] = "EndpointSlice".into();
    if let Some(eps) = v.get_mut("endpoints").and_then(Value::as_array_mut) {
        for e in eps.iter_mut().filter_map(Value::as_object_mut) {
            let topology = e.remove("topology").unwrap_or(Value::Null);
            if !e.contains_key("zone")
                && let Some(z) = topology.get("topology.kubernetes.io/zone")
            {
                e.insert("zone".into(), z.clone());
            }
            if !e.contains_key("nodeName")
                && let Some(n) = topology.get("kubernetes.io/hostname")
            {
                e.insert("nodeName".into(), n.clone());
            }
        }
    }
    serde_json::from_value(v).ok()
}

/// The endpoints a core `Endpoints` object holds (clusters without EndpointSlices).
pub fn from_endpoints(e: &Endpoints) -> EndpointSet {
    let mut set = EndpointSet {
        namespace: e.metadata.namespace.clone().unwrap_or_default(),
        service: e.metadata.name.clone().unwrap_or_default(),
        ..EndpointSet::default()
    };
    for subset in e.subsets.iter().flatten() {
        let mut ports = BTreeMap::new();
        for p in subset.ports.iter().flatten() {
            if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
                continue;
            }
            if let Ok(port) = u16::try_from(p.port) {
                ports.insert(p.name.clone().unwrap_or_default(), port);
            }
        }
        let mut add = |addrs: &Option<Vec<k8s_openapi::api::core::v1::EndpointAddress>>,
                       ready: bool| {
            for a in addrs.iter().flatten() {
                set.endpoints.push(Endpoint {
                    ip: a.ip.clone(),
                    ready,
                    pod: a
                        .target_ref
                        .as_ref()
                        .filter(|r| r.kind.as_deref() == Some("Pod"))
                        .and_then(|r| r.name.clone()),
                    ports: ports.clone(),
                    zone: None,
                    node: a.node_name.clone().filter(|n| !n.is_empty()),
                });
            }
        };
        add(&subset.addresses, true);
        add(&subset.not_ready_addresses, false);
    }
    set
}

/// Sinew's name for a Kubernetes port name (`""`, a service's single unnamed port, has
/// to be called something).
fn port_name(name: &str) -> String {
    if name.is_empty() {
        "default".to_owned()
    } else {
        name.to_owned()
    }
}

/// The protocol of a service port: `appProtocol` if set, else the name's prefix (`grpc-…`,
/// `http2-…`, `tcp-…`, `https-…`/`tls-…` as opaque TCP, as other meshes read it), else
/// HTTP (detected per connection).
fn protocol(name: &str, app_protocol: Option<&str>) -> &'static str {
    let hint = app_protocol.unwrap_or(name).to_ascii_lowercase();
    let hint = hint.trim_start_matches("kubernetes.io/");
    let first = hint.split(['-', '_']).next().unwrap_or_default();
    match first {
        "grpc" => "GRPC",
        "http2" | "h2c" => "HTTP2",
        // The application's own TLS is opaque to the mesh.
        "tcp" | "tls" | "https" | "mysql" | "redis" | "mongo" | "postgres" | "smtp" => "TCP",
        _ => "HTTP",
    }
}

fn metadata(name: &str, namespace: &str, labels: Option<&BTreeMap<String, String>>) -> Value {
    let mut m = json!({"name": name, "namespace": namespace});
    if let Some(l) = labels.filter(|l| !l.is_empty()) {
        m["labels"] = json!(l);
    }
    m
}

fn parse(label: &str, doc: &Value) -> Converted {
    parse_documents(label, &doc.to_string())
        .map_err(|e| e.0.iter().map(problem).collect::<Vec<_>>())
}

/// A problem as a status message: field and reason (the label is the object itself).
pub fn problem(e: &sinew_model::error::ConfigError) -> String {
    match &e.field {
        Some(f) => format!("{f}: {}", e.reason),
        None => e.reason.clone(),
    }
}

/// The Sinew `Service` for a Kubernetes Service (None for ExternalName services, which
/// have no endpoints to balance over).
pub fn service(svc: &Service) -> Option<Converted> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let name = svc.metadata.name.as_deref()?;
    let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
    let ports: Vec<Value> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
        .map(|p| {
            let pname = p.name.clone().unwrap_or_default();
            let mut v = json!({
                "name": port_name(&pname),
                "port": p.port,
                "protocol": protocol(&pname, p.app_protocol.as_deref()),
            });
            if let Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(t)) =
                &p.target_port
            {
                v["targetPort"] = json!(t);
            }
            v
        })
        .collect();
    let mut sspec = json!({"ports": ports});
    if let Some(vips) = virtual_ips(spec) {
        sspec["virtualIPs"] = json!(vips);
    }
    let doc = json!({
        "apiVersion": SINEW_API_VERSION,
        "kind": "Service",
        "metadata": metadata(name, ns, svc.metadata.labels.as_ref()),
        "spec": sspec,
    });
    Some(parse(&label("Service", ns, name), &doc))
}

/// A Service's ClusterIPs as the mesh service's virtual IPs, so that an app calling it
/// through kube-dns (which answers with them) is captured as a call to the mesh
/// service: `spec.clusterIPs` (every family of a dual-stack service), or `clusterIP` on
/// objects from before dual-stack. A headless Service (`None`) has none: `Some(empty)`,
/// so that none is allocated either (its clients reach each Pod at its own address).
/// `None` when the API server has not allocated one yet.
fn virtual_ips(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Option<Vec<String>> {
    let ips: Vec<String> = match spec.cluster_ips.as_ref().filter(|v| !v.is_empty()) {
        Some(all) => all.clone(),
        None => spec.cluster_ip.iter().cloned().collect(),
    };
    if ips.iter().any(|ip| ip == "None") {
        return Some(Vec::new());
    }
    let ips: Vec<String> = ips.into_iter().filter(|ip| !ip.is_empty()).collect();
    (!ips.is_empty()).then_some(ips)
}

fn pod_ready(pod: &Pod) -> bool {
    if pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    // Without a reported Ready condition (no kubelet has seen it yet), the endpoint's
    // own readiness decides.
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_none_or(|c| c.status == "True")
}

/// Workload names: lowercase, digits, `-` and `.` only.
fn dns_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// The Sinew `Workload`s for a service's ready endpoints, with what their Pods say.
///
/// A Pod's Workload is named like the Pod, so the Pod's sidecar (a proxy named
/// `<namespace>/<pod>`) finds its own workload; a Pod behind several services gets
/// `<pod>.<service>` for the later ones (`used` holds the names taken so far). An endpoint
/// without a Pod is `<service>-<address>-<port>`.
///
/// Each Workload's locality is in its labels `topology.kubernetes.io/zone` and
/// `…/region` (what the model reads): the zone from the EndpointSlice (its hints, else
/// the endpoint's zone), else from the labels of its Node (the endpoint's `nodeName`,
/// else the Pod's `spec.nodeName`), else the Pod's own labels; the region from the Node.
pub fn workloads(
    set: &EndpointSet,
    pods: &HashMap<(String, String), Arc<Pod>>,
    nodes: &HashMap<String, Arc<Node>>,
    used: &mut std::collections::BTreeSet<(String, String)>,
) -> Vec<(String, Converted)> {
    let mut out = Vec::new();
    for ep in &set.endpoints {
        if !ep.ready {
            continue;
        }
        let port = ep.ports.values().next().copied().unwrap_or(0);
        let candidates = match &ep.pod {
            Some(pod) => vec![pod.clone(), format!("{pod}.{}", set.service)],
            None => vec![format!("{}-{}-{port}", set.service, dns_safe(&ep.ip))],
        };
        let Some(name) = candidates
            .into_iter()
            .find(|n| used.insert((set.namespace.clone(), n.clone())))
        else {
            // The same endpoint listed twice (e.g. in two slices).
            continue;
        };
        let pod = ep
            .pod
            .as_ref()
            .and_then(|p| pods.get(&(set.namespace.clone(), p.clone())));
        if pod.is_some_and(|p| !pod_ready(p)) {
            continue;
        }
        let ports: BTreeMap<String, u16> =
            ep.ports.iter().map(|(n, p)| (port_name(n), *p)).collect();
        let mut spec = json!({
            "service": set.service,
            "address": ep.ip,
            "ports": ports,
        });
        let mut labels = None;
        let node = ep
            .node
            .clone()
            .or_else(|| pod.and_then(|p| p.spec.as_ref()?.node_name.clone()))
            .and_then(|n| nodes.get(&n));
        if let Some(pod) = pod {
            labels = pod.metadata.labels.as_ref();
            let sa = pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".to_owned());
            spec["serviceAccount"] = json!(sa);
            if let Some(port) = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(SIDECAR_PORT_ANNOTATION))
            {
                match port.parse::<u16>() {
                    Ok(p) if p != 0 => spec["sidecar"] = json!({"port": p}),
                    _ => {
                        tracing::warn!(pod = %format!("{}/{}", set.namespace, ep.pod.as_deref().unwrap_or_default()),
                            value = %port, "annotation {SIDECAR_PORT_ANNOTATION} is not a port; ignored");
                    }
                }
            }
        }
        let labels = locality_labels(labels, ep.zone.as_deref(), node.map(AsRef::as_ref));
        let doc = json!({
            "apiVersion": SINEW_API_VERSION,
            "kind": "Workload",
            "metadata": metadata(&name, &set.namespace, Some(&labels)),
            "spec": spec,
        });
        let l = label("Workload", &set.namespace, &name);
        let parsed = parse(&l, &doc);
        out.push((l, parsed));
    }
    out
}

/// The Workload of a meshed Pod (one with [`SIDECAR_PORT_ANNOTATION`]) that is no
/// Service's endpoint (`used` does not hold its name yet), such as a client: named like
/// the Pod, so its sidecar finds its own workload, with no service and no inbound; it
/// carries the Pod's address, labels, service account and locality (its Node's zone and
/// region), which its sidecar's identity and locality preference read. None for other Pods, and for a
/// Pod without an address yet or not running.
pub fn pod_workload(
    pod: &Pod,
    nodes: &HashMap<String, Arc<Node>>,
    used: &mut std::collections::BTreeSet<(String, String)>,
) -> Option<(String, Converted)> {
    let ns = pod.metadata.namespace.clone()?;
    let name = pod.metadata.name.clone()?;
    pod.metadata
        .annotations
        .as_ref()?
        .get(SIDECAR_PORT_ANNOTATION)?;
    let status = pod.status.as_ref()?;
    if pod.metadata.deletion_timestamp.is_some()
        || matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
    {
        return None;
    }
    let ip = status.pod_ip.clone().filter(|ip| !ip.is_empty())?;
    if !used.insert((ns.clone(), name.clone())) {
        return None;
    }
    let spec = pod.spec.as_ref();
    let sa = spec
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".to_owned());
    let node = spec
        .and_then(|s| s.node_name.as_ref())
        .and_then(|n| nodes.get(n));
    let labels = locality_labels(pod.metadata.labels.as_ref(), None, node.map(AsRef::as_ref));
    let doc = json!({
        "apiVersion": SINEW_API_VERSION,
        "kind": "Workload",
        "metadata": metadata(&name, &ns, Some(&labels)),
        // No `sidecar`: an inbound would be derived from it, and no Service names the
        // application ports it could serve.
        "spec": {"address": ip, "serviceAccount": sa},
    });
    let l = label("Workload", &ns, &name);
    let parsed = parse(&l, &doc);
    Some((l, parsed))
}

/// Node label: the zone a Node is in.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Node label: the region a Node is in.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";

/// A workload's labels with its locality: `zone` (from the EndpointSlice) before the
/// Node's zone label before the Pod's own; the region from the Node.
fn locality_labels(
    pod_labels: Option<&BTreeMap<String, String>>,
    zone: Option<&str>,
    node: Option<&Node>,
) -> BTreeMap<String, String> {
    let mut labels = pod_labels.cloned().unwrap_or_default();
    let node_labels = node.and_then(|n| n.metadata.labels.as_ref());
    let node_label = |key: &str| {
        node_labels
            .and_then(|l| l.get(key))
            .filter(|v| !v.is_empty())
    };
    if let Some(z) = zone {
        labels.insert(ZONE_LABEL.to_owned(), z.to_owned());
    } else if let Some(z) = node_label(ZONE_LABEL) {
        labels.insert(ZONE_LABEL.to_owned(), z.clone());
    }
    if let Some(r) = node_label(REGION_LABEL) {
        labels.insert(REGION_LABEL.to_owned(), r.clone());
    }
    labels
}

fn object_metadata(obj: &DynamicObject, name: &str) -> Value {
    let ns = obj.metadata.namespace.as_deref().unwrap_or("default");
    let mut m = metadata(name, ns, obj.metadata.labels.as_ref());
    if let Some(t) = &obj.metadata.creation_timestamp {
        m["creationTimestamp"] = json!(t.0.to_string());
    }
    m
}

fn spec_of(obj: &DynamicObject) -> Result<&Map<String, Value>, Vec<String>> {
    obj.data
        .get("spec")
        .and_then(Value::as_object)
        .ok_or_else(|| vec!["spec: required, and must be an object".to_owned()])
}

/// Whether a Gateway API `parentRef` is a Service (GAMMA: the mesh's business), not a
/// Gateway (an ingress implementation's). A `kind: Service` parent in the Gateway API's
/// own group counts too: that is what the upstream CRDs' default makes of a parent
/// written without `group: ""`, and only the mesh can tell its author (the model
/// refuses it, so the route's status says a Service parent needs group "").
pub fn is_service_parent(p: &Value) -> bool {
    p.get("kind").and_then(Value::as_str) == Some("Service")
        && p.get("group")
            .and_then(Value::as_str)
            .is_none_or(|g| g.is_empty() || g == "core" || g == GATEWAY_GROUP)
}

/// A route's Service parents (its Gateway parents are an ingress implementation's).
fn service_parents(spec: &Map<String, Value>) -> Value {
    let parents: Vec<Value> = spec
        .get("parentRefs")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .filter(|p| is_service_parent(p))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    Value::Array(parents)
}

/// Whether a Gateway API route is the mesh's: it has a Service parent. Routes attached
/// only to Gateways belong to an ingress implementation; Sinew leaves them alone.
pub fn is_mesh_route(obj: &DynamicObject) -> bool {
    obj.data
        .pointer("/spec/parentRefs")
        .and_then(Value::as_array)
        .is_some_and(|ps| ps.iter().any(is_service_parent))
}

/// What converting some custom resources needs to know about the rest of the cluster.
#[derive(Debug, Default)]
pub struct Context {
    /// The mesh's SPIFFE trust domain.
    pub trust_domain: String,
    /// SMI HTTPRouteGroups by `(namespace, name)`.
    pub route_groups: HashMap<(String, String), Arc<DynamicObject>>,
    /// The services whose workloads run as each `(namespace, service account)`.
    pub services_by_account: BTreeMap<(String, String), std::collections::BTreeSet<String>>,
}

/// The documents a custom resource of `kind` stands for.
pub fn custom(kind: &Kind, obj: &DynamicObject, ctx: &Context) -> Converted {
    let name = obj.metadata.name.clone().unwrap_or_default();
    let ns = obj
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let l = label(kind.kind, &ns, &name);
    let spec = spec_of(obj)?;
    let doc = match kind.kind {
        "GRPCRoute" => grpc_route(obj, &name, spec)?,
        "TrafficSplit" => traffic_split(obj, &ns, &name, spec, ctx)?,
        "TrafficTarget" => {
            let mut docs = Vec::new();
            for d in traffic_target(obj, &ns, &name, spec, ctx)? {
                docs.extend(parse(&l, &d)?);
            }
            return Ok(docs);
        }
        // Read through the TrafficTargets that name them.
        "HTTPRouteGroup" => return Ok(Vec::new()),
        "HTTPRoute" => {
            let mut problems = unsupported_rule_fields(spec);
            let mut spec = spec.clone();
            if let Some(rules) = spec.get_mut("rules") {
                mirror_fractions(rules, &mut problems);
            }
            if !problems.is_empty() {
                return Err(problems);
            }
            spec.insert("parentRefs".into(), service_parents(&spec));
            json!({
                "apiVersion": format!("{GATEWAY_GROUP}/v1"),
                "kind": "HTTPRoute",
                "metadata": object_metadata(obj, &name),
                "spec": spec,
            })
        }
        k => json!({
            "apiVersion": SINEW_API_VERSION,
            "kind": k,
            "metadata": object_metadata(obj, &name),
            "spec": spec,
        }),
    };
    parse(&l, &doc)
}

/// Upstream route fields Sinew does not implement, each a problem saying so: the route is
/// then refused (`Accepted=False`), never accepted without them.
fn unsupported_rule_fields(spec: &Map<String, Value>) -> Vec<String> {
    let mut problems = Vec::new();
    let rules = spec.get("rules").and_then(Value::as_array);
    for (i, rule) in rules.into_iter().flatten().enumerate() {
        if rule.get("sessionPersistence").is_some() {
            problems.push(format!(
                "spec.rules[{i}].sessionPersistence: not supported by Sinew; for sticky sessions give the backend Service a TrafficPolicy with ringHash (a header or a cookie)"
            ));
        }
    }
    problems
}

/// Upstream `requestMirror.fraction` as Sinew's whole `percent`, in the filters of every
/// rule and backend of `rules`; a fraction that is not a whole percentage (Sinew mirrors
/// by whole percent) is a problem, not rounded silently.
fn mirror_fractions(rules: &mut Value, problems: &mut Vec<String>) {
    fn fix(path: &str, filters: Option<&mut Value>, problems: &mut Vec<String>) {
        let Some(filters) = filters.and_then(Value::as_array_mut) else {
            return;
        };
        for (j, f) in filters.iter_mut().enumerate() {
            let Some(m) = f.get_mut("requestMirror").and_then(Value::as_object_mut) else {
                continue;
            };
            let Some(fraction) = m.remove("fraction") else {
                continue;
            };
            let at = format!("{path}[{j}].requestMirror");
            let num = fraction.get("numerator").and_then(Value::as_u64);
            let den = fraction
                .get("denominator")
                .and_then(Value::as_u64)
                .unwrap_or(100);
            match num {
                _ if m.contains_key("percent") => {
                    problems.push(format!("{at}: give percent or fraction, not both"));
                }
                Some(n) if den > 0 && n <= den && (n * 100) % den == 0 => {
                    m.insert("percent".into(), json!(n * 100 / den));
                }
                _ => problems.push(format!(
                    "{at}.fraction: {fraction} is not a whole percentage (0-100); Sinew mirrors by whole percent"
                )),
            }
        }
    }
    let Some(rules) = rules.as_array_mut() else {
        return;
    };
    for (i, rule) in rules.iter_mut().enumerate() {
        fix(
            &format!("spec.rules[{i}].filters"),
            rule.get_mut("filters"),
            problems,
        );
        if let Some(backends) = rule.get_mut("backendRefs").and_then(Value::as_array_mut) {
            for (b, backend) in backends.iter_mut().enumerate() {
                fix(
                    &format!("spec.rules[{i}].backendRefs[{b}].filters"),
                    backend.get_mut("filters"),
                    problems,
                );
            }
        }
    }
}

/// A GRPCRoute as an HTTPRoute: gRPC calls are HTTP/2 requests to `/<service>/<method>`.
fn grpc_route(
    obj: &DynamicObject,
    name: &str,
    spec: &Map<String, Value>,
) -> Result<Value, Vec<String>> {
    let mut problems = unsupported_rule_fields(spec);
    let mut rules = Vec::new();
    let empty = Vec::new();
    for (i, rule) in spec
        .get("rules")
        .and_then(Value::as_array)
        .unwrap_or(&empty)
        .iter()
        .enumerate()
    {
        let mut matches = Vec::new();
        for (j, m) in rule
            .get("matches")
            .and_then(Value::as_array)
            .unwrap_or(&empty)
            .iter()
            .enumerate()
        {
            let mut out = Map::new();
            if let Some(method) = m.get("method") {
                if method
                    .get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t != "Exact")
                {
                    problems.push(format!(
                        "spec.rules[{i}].matches[{j}].method.type: only Exact is supported"
                    ));
                }
                let service = method.get("service").and_then(Value::as_str);
                let meth = method.get("method").and_then(Value::as_str);
                let path = match (service, meth) {
                    (Some(s), Some(m)) => json!({"type": "Exact", "value": format!("/{s}/{m}")}),
                    (Some(s), None) => json!({"type": "PathPrefix", "value": format!("/{s}")}),
                    (None, Some(_)) => {
                        problems.push(format!(
                            "spec.rules[{i}].matches[{j}].method: a method needs its service"
                        ));
                        continue;
                    }
                    (None, None) => json!({"type": "PathPrefix", "value": "/"}),
                };
                out.insert("path".into(), path);
            }
            if let Some(h) = m.get("headers") {
                out.insert("headers".into(), h.clone());
            }
            matches.push(Value::Object(out));
        }
        let mut r = json!({"backendRefs": rule.get("backendRefs").cloned().unwrap_or(json!([]))});
        if !matches.is_empty() {
            r["matches"] = json!(matches);
        }
        // The rule's name: a RoutePolicy's `sectionName` selects the rule by it.
        if let Some(n) = rule.get("name") {
            r["name"] = n.clone();
        }
        // GRPCRoute filters have HTTPRoute's shape (header modifiers, RequestMirror); the
        // model refuses the types it does not implement (ExtensionRef).
        if let Some(f) = rule.get("filters") {
            r["filters"] = f.clone();
        }
        rules.push(r);
    }
    let mut rules = Value::Array(rules);
    mirror_fractions(&mut rules, &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(json!({
        "apiVersion": format!("{GATEWAY_GROUP}/v1"),
        "kind": "HTTPRoute",
        "metadata": object_metadata(obj, &format!("{GRPC_ROUTE_PREFIX}{name}")),
        "spec": {
            "parentRefs": service_parents(spec),
            "rules": rules,
        },
    }))
}

/// An SMI TrafficSplit as an HTTPRoute on its root service with weighted backends.
fn traffic_split(
    obj: &DynamicObject,
    ns: &str,
    name: &str,
    spec: &Map<String, Value>,
    ctx: &Context,
) -> Result<Value, Vec<String>> {
    // The root service may be written as a name or an in-cluster DNS name.
    let Some(root) = spec
        .get("service")
        .and_then(Value::as_str)
        .and_then(|s| s.split('.').next())
        .filter(|s| !s.is_empty())
    else {
        return Err(vec![
            "spec.service: required (the root service's name)".into(),
        ]);
    };
    let mut problems = Vec::new();
    let mut backends = Vec::new();
    let empty = Vec::new();
    for (i, b) in spec
        .get("backends")
        .and_then(Value::as_array)
        .unwrap_or(&empty)
        .iter()
        .enumerate()
    {
        let Some(svc) = b.get("service").and_then(Value::as_str) else {
            problems.push(format!("spec.backends[{i}].service: required"));
            continue;
        };
        let Some(weight) = b.get("weight").and_then(Value::as_u64) else {
            problems.push(format!(
                "spec.backends[{i}].weight: required, a non-negative integer"
            ));
            continue;
        };
        backends.push(json!({"name": svc, "weight": weight}));
    }
    if backends.is_empty() && problems.is_empty() {
        problems.push("spec.backends: at least one backend is required".into());
    }
    // Matches (HTTPRouteGroups): only matching requests are split; the rest go to the
    // root service itself, as SMI specifies.
    let mut matches = Vec::new();
    for (i, m) in spec
        .get("matches")
        .and_then(Value::as_array)
        .unwrap_or(&empty)
        .iter()
        .enumerate()
    {
        if m.get("kind").and_then(Value::as_str) != Some("HTTPRouteGroup") {
            problems.push(format!(
                "spec.matches[{i}].kind: only HTTPRouteGroup is supported"
            ));
            continue;
        }
        let gname = m.get("name").and_then(Value::as_str).unwrap_or_default();
        let Some(group) = ctx.route_groups.get(&(ns.to_owned(), gname.to_owned())) else {
            problems.push(format!(
                "spec.matches[{i}].name: no HTTPRouteGroup {ns}/{gname}"
            ));
            continue;
        };
        for gm in group
            .data
            .pointer("/spec/matches")
            .and_then(Value::as_array)
            .unwrap_or(&empty)
        {
            matches.extend(route_matches(gm));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let rules = if matches.is_empty() {
        json!([{"backendRefs": backends}])
    } else {
        // The rest: a match that ranks after every other (Gateway API orders a regular
        // expression after any prefix, and Sinew a shorter one after a longer), to the root
        // service itself (no backendRefs).
        json!([
            {"matches": matches, "backendRefs": backends},
            {"matches": [{"path": {"type": "RegularExpression", "value": ".*"}}]}
        ])
    };
    Ok(json!({
        "apiVersion": format!("{GATEWAY_GROUP}/v1"),
        "kind": "HTTPRoute",
        "metadata": object_metadata(obj, &format!("trafficsplit.{name}")),
        "spec": {
            "parentRefs": [{"kind": "Service", "name": root}],
            "rules": rules,
        },
    }))
}

/// An SMI HTTPRouteGroup match as Gateway API HTTPRoute matches (one per method, since a
/// Gateway match has one method).
fn route_matches(m: &Value) -> Vec<Value> {
    let mut base = Map::new();
    if let Some(re) = m
        .get("pathRegex")
        .and_then(Value::as_str)
        .filter(|r| !r.is_empty())
    {
        // Literal paths and whole-segment prefixes as Exact and PathPrefix matches: they
        // take precedence over the catch-all rule as Gateway API orders matches (a
        // regular expression has no defined rank there).
        let path = match path_regex(re) {
            Ok((exact, _)) if exact.len() == 1 => json!({"type": "Exact", "value": exact[0]}),
            Ok((_, prefix)) if prefix.len() == 1 && prefix[0].ends_with('/') => {
                let p = prefix[0].trim_end_matches('/');
                json!({"type": "PathPrefix", "value": if p.is_empty() { "/" } else { p }})
            }
            Ok((exact, prefix)) if exact.is_empty() && prefix.is_empty() => Value::Null,
            _ => json!({"type": "RegularExpression", "value": re}),
        };
        if !path.is_null() {
            base.insert("path".into(), path);
        }
    }
    if let Some(headers) = smi_headers(m) {
        base.insert("headers".into(), headers);
    }
    let methods = smi_methods(m);
    if methods.is_empty() || methods.iter().any(|m| m == "*") {
        return vec![Value::Object(base)];
    }
    methods
        .into_iter()
        .map(|method| {
            let mut one = base.clone();
            one.insert("method".into(), json!(method));
            Value::Object(one)
        })
        .collect()
}

/// An HTTPRouteGroup match's methods, upper-cased (`*` kept: any method).
fn smi_methods(m: &Value) -> Vec<String> {
    m.get("methods")
        .and_then(Value::as_array)
        .map(|ms| {
            ms.iter()
                .filter_map(Value::as_str)
                .map(str::to_ascii_uppercase)
                .collect()
        })
        .unwrap_or_default()
}

/// An HTTPRouteGroup match's headers (`name: value` map) as `[{name, value}]`.
fn smi_headers(m: &Value) -> Option<Value> {
    let h = m.get("headers").and_then(Value::as_object)?;
    let pairs: Vec<Value> = h
        .iter()
        .filter_map(|(k, v)| Some(json!({"name": k, "value": v.as_str()?})))
        .collect();
    Some(json!(pairs))
}

/// An SMI path regex as Sinew path conditions: `(exact paths, prefixes)`. Literal paths
/// and literal prefixes followed by `.*` are what SMI users write; anything else is refused
/// rather than approximated.
fn path_regex(re: &str) -> Result<(Vec<String>, Vec<String>), String> {
    let re = re.trim_start_matches('^').trim_end_matches('$');
    let literal = |s: &str| !s.chars().any(|c| "\\.*+?()[]{}|^$".contains(c));
    if re.is_empty() || re == ".*" || re == "/.*" {
        return Ok((Vec::new(), Vec::new()));
    }
    if let Some(prefix) = re.strip_suffix(".*")
        && literal(prefix)
    {
        return Ok((Vec::new(), vec![prefix.to_owned()]));
    }
    if literal(re) {
        return Ok((vec![re.to_owned()], Vec::new()));
    }
    Err(format!(
        "pathRegex {re:?}: only a literal path, or a literal prefix followed by .*, is supported"
    ))
}

/// An SMI TrafficTarget as ALLOW AuthorizationPolicies, one per Service whose workloads
/// run as the destination service account: its sources (service accounts, as SPIFFE ids)
/// may make the requests its HTTPRouteGroup matches name (any request, for TCPRoute rules).
fn traffic_target(
    obj: &DynamicObject,
    ns: &str,
    name: &str,
    spec: &Map<String, Value>,
    ctx: &Context,
) -> Result<Vec<Value>, Vec<String>> {
    let mut problems = Vec::new();
    let sa_ref = |v: Option<&Value>, field: &str, problems: &mut Vec<String>| {
        let v = v?;
        if v.get("kind")
            .and_then(Value::as_str)
            .is_some_and(|k| k != "ServiceAccount")
        {
            problems.push(format!("{field}.kind: must be ServiceAccount"));
            return None;
        }
        let Some(n) = v.get("name").and_then(Value::as_str) else {
            problems.push(format!("{field}.name: required"));
            return None;
        };
        let sns = v.get("namespace").and_then(Value::as_str).unwrap_or(ns);
        Some((sns.to_owned(), n.to_owned()))
    };
    let dest = sa_ref(spec.get("destination"), "spec.destination", &mut problems);
    if spec.get("destination").is_none() {
        problems.push("spec.destination: required".into());
    }
    if let Some((dns, _)) = &dest
        && dns != ns
    {
        problems.push("spec.destination.namespace: must be the TrafficTarget's own".into());
    }
    let empty = Vec::new();
    let mut principals = Vec::new();
    for (i, src) in spec
        .get("sources")
        .and_then(Value::as_array)
        .unwrap_or(&empty)
        .iter()
        .enumerate()
    {
        if let Some((sns, sa)) = sa_ref(Some(src), &format!("spec.sources[{i}]"), &mut problems) {
            principals.push(format!("spiffe://{}/ns/{sns}/sa/{sa}", ctx.trust_domain));
        }
    }
    if principals.is_empty() && problems.is_empty() {
        problems.push("spec.sources: at least one source is required".into());
    }
    let mut operations: Vec<Option<Value>> = Vec::new();
    for (i, rule) in spec
        .get("rules")
        .and_then(Value::as_array)
        .unwrap_or(&empty)
        .iter()
        .enumerate()
    {
        match rule.get("kind").and_then(Value::as_str) {
            Some("TCPRoute") => operations.push(None),
            Some("HTTPRouteGroup") => {
                let gname = rule.get("name").and_then(Value::as_str).unwrap_or_default();
                let Some(group) = ctx.route_groups.get(&(ns.to_owned(), gname.to_owned())) else {
                    problems.push(format!(
                        "spec.rules[{i}].name: no HTTPRouteGroup {ns}/{gname}"
                    ));
                    continue;
                };
                let wanted: Vec<&str> = rule
                    .get("matches")
                    .and_then(Value::as_array)
                    .map(|m| m.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let matches = group
                    .data
                    .pointer("/spec/matches")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                for w in &wanted {
                    if !matches
                        .iter()
                        .any(|m| m.get("name").and_then(Value::as_str) == Some(w))
                    {
                        problems.push(format!(
                            "spec.rules[{i}].matches: HTTPRouteGroup {gname} has no match {w:?}"
                        ));
                    }
                }
                for m in matches.iter().filter(|m| {
                    wanted.is_empty()
                        || wanted
                            .contains(&m.get("name").and_then(Value::as_str).unwrap_or_default())
                }) {
                    let mut to = Map::new();
                    match path_regex(
                        m.get("pathRegex")
                            .and_then(Value::as_str)
                            .unwrap_or_default(),
                    ) {
                        Ok((paths, prefixes)) => {
                            if !paths.is_empty() {
                                to.insert("paths".into(), json!(paths));
                            }
                            if !prefixes.is_empty() {
                                to.insert("pathPrefixes".into(), json!(prefixes));
                            }
                        }
                        Err(e) => problems.push(format!("HTTPRouteGroup {gname}: {e}")),
                    }
                    let methods = smi_methods(m);
                    if !methods.is_empty() && !methods.iter().any(|m| m == "*") {
                        to.insert("methods".into(), json!(methods));
                    }
                    if let Some(headers) = smi_headers(m) {
                        to.insert("headers".into(), headers);
                    }
                    operations.push((!to.is_empty()).then_some(Value::Object(to)));
                }
            }
            _ => problems.push(format!("spec.rules[{i}].kind: HTTPRouteGroup or TCPRoute")),
        }
    }
    if operations.is_empty() && problems.is_empty() {
        problems.push("spec.rules: at least one rule is required".into());
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let Some((_, dest_sa)) = dest else {
        return Err(vec!["spec.destination: required".into()]);
    };
    let rules: Vec<Value> = operations
        .into_iter()
        .map(|to| {
            let mut r = json!({"from": {"principals": principals}});
            if let Some(to) = to {
                r["to"] = to;
            }
            r
        })
        .collect();
    let services = ctx
        .services_by_account
        .get(&(ns.to_owned(), dest_sa))
        .cloned()
        .unwrap_or_default();
    Ok(services
        .into_iter()
        .map(|svc| {
            json!({
                "apiVersion": SINEW_API_VERSION,
                "kind": "AuthorizationPolicy",
                "metadata": object_metadata(obj, &format!("traffictarget.{name}.{svc}")),
                "spec": {
                    "targetRef": {"kind": "Service", "name": svc},
                    "action": "ALLOW",
                    "rules": rules,
                },
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_from_app_protocol_or_name() {
        assert_eq!(protocol("grpc-api", None), "GRPC");
        assert_eq!(protocol("web", Some("kubernetes.io/h2c")), "HTTP2");
        assert_eq!(protocol("tcp", None), "TCP");
        assert_eq!(protocol("https", None), "TCP");
        assert_eq!(protocol("", None), "HTTP");
    }

    #[test]
    fn smi_path_regexes() {
        assert_eq!(
            path_regex("/api/.*"),
            Ok((vec![], vec!["/api/".to_owned()]))
        );
        assert_eq!(
            path_regex("^/health$"),
            Ok((vec!["/health".to_owned()], vec![]))
        );
        assert_eq!(path_regex(".*"), Ok((vec![], vec![])));
        assert!(path_regex("/users/[0-9]+").is_err());
    }

    fn svc(spec: Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "catalog", "namespace": "shop"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn vips_of(s: &Service) -> Option<Vec<String>> {
        let docs = service(s).unwrap_or_else(|| panic!("no document")).unwrap();
        match &docs[0].resource {
            sinew_model::resource::Resource::Service(o) => o
                .spec
                .virtual_ips
                .as_ref()
                .map(|v| v.iter().map(|ip| ip.as_str().to_owned()).collect()),
            r => panic!("not a service: {r:?}"),
        }
    }

    /// ClusterIPs are the virtual IPs: every family of a dual-stack Service, the single
    /// `clusterIP` of an object from before dual-stack; a headless Service says it has
    /// none (so none is allocated); one not allocated yet says nothing.
    #[test]
    fn cluster_ips_are_the_virtual_ips() {
        let ports = json!([{"name": "http", "port": 80}]);
        let dual = svc(json!({"ports": ports, "clusterIP": "10.0.0.5",
                              "clusterIPs": ["10.0.0.5", "fd00::5"]}));
        assert_eq!(
            vips_of(&dual),
            Some(vec!["10.0.0.5".to_owned(), "fd00::5".to_owned()])
        );
        let old = svc(json!({"ports": ports, "clusterIP": "10.0.0.6"}));
        assert_eq!(vips_of(&old), Some(vec!["10.0.0.6".to_owned()]));
        let headless = svc(json!({"ports": ports, "clusterIP": "None", "clusterIPs": ["None"]}));
        assert_eq!(vips_of(&headless), Some(vec![]));
        let pending = svc(json!({"ports": ports}));
        assert_eq!(vips_of(&pending), None);
    }

    fn zones(
        set: &EndpointSet,
        pods: &[Pod],
        nodes: &[Node],
    ) -> BTreeMap<String, (Option<String>, Option<String>)> {
        let pods = pods
            .iter()
            .map(|p| {
                (
                    (
                        "shop".to_owned(),
                        p.metadata.name.clone().unwrap_or_default(),
                    ),
                    Arc::new(p.clone()),
                )
            })
            .collect();
        let nodes = nodes
            .iter()
            .map(|n| {
                (
                    n.metadata.name.clone().unwrap_or_default(),
                    Arc::new(n.clone()),
                )
            })
            .collect();
        let mut used = std::collections::BTreeSet::new();
        workloads(set, &pods, &nodes, &mut used)
            .into_iter()
            .map(|(_, r)| {
                let docs = r.unwrap();
                match &docs[0].resource {
                    sinew_model::resource::Resource::Workload(w) => (
                        w.metadata.name.clone(),
                        (
                            sinew_model::compile::zone_of(&w.metadata),
                            w.metadata.labels.get(REGION_LABEL).cloned(),
                        ),
                    ),
                    r => panic!("not a workload: {r:?}"),
                }
            })
            .collect()
    }

    /// A workload's zone: the slice's hint, else the endpoint's zone, else its Node's
    /// label (the endpoint's node, else the Pod's), else the Pod's own label; its region
    /// from the Node.
    #[test]
    fn zones_come_from_slices_then_nodes_then_pods() {
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "catalog-x", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "catalog"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [
                {"addresses": ["10.1.0.1"], "zone": "a", "nodeName": "n1",
                 "hints": {"forZones": [{"name": "b"}]}, "targetRef": {"kind": "Pod", "name": "p1"}},
                {"addresses": ["10.1.0.2"], "zone": "a", "nodeName": "n1",
                 "targetRef": {"kind": "Pod", "name": "p2"}},
                {"addresses": ["10.1.0.3"], "nodeName": "n1", "targetRef": {"kind": "Pod", "name": "p3"}},
                {"addresses": ["10.1.0.4"], "targetRef": {"kind": "Pod", "name": "p4"}},
                {"addresses": ["10.1.0.5"], "targetRef": {"kind": "Pod", "name": "p5"}},
            ]
        }))
        .unwrap();
        let set = from_slice(&slice).unwrap_or_else(|| panic!("no set"));
        let node: Node = serde_json::from_value(json!({"metadata": {"name": "n1", "labels": {
            "topology.kubernetes.io/zone": "c", "topology.kubernetes.io/region": "r1"}}}))
        .unwrap();
        let pod = |name: &str, labels: Value, node: Option<&str>| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "shop", "labels": labels},
                "spec": {"nodeName": node, "containers": [{"name": "app"}]}
            }))
            .unwrap()
        };
        let pods = [
            pod("p1", json!({}), None),
            pod("p2", json!({}), None),
            pod("p3", json!({}), None),
            pod("p4", json!({}), Some("n1")),
            pod("p5", json!({"topology.kubernetes.io/zone": "d"}), None),
        ];
        let got = zones(&set, &pods, &[node]);
        let want = |z: &str, r: Option<&str>| (Some(z.to_owned()), r.map(str::to_owned));
        assert_eq!(got["p1"], want("b", Some("r1")), "the hint first");
        assert_eq!(got["p2"], want("a", Some("r1")), "then the endpoint's zone");
        assert_eq!(got["p3"], want("c", Some("r1")), "then its node's");
        assert_eq!(got["p4"], want("c", Some("r1")), "the Pod's node");
        assert_eq!(got["p5"], want("d", None), "then the Pod's label");
    }

    /// A meshed Pod that no Service selects is a Workload without a service, with its
    /// Node's zone; an unmeshed Pod, or one without an address, is none; an endpoint's
    /// Pod keeps its endpoint's Workload.
    #[test]
    fn meshed_pods_outside_services_are_service_less_workloads() {
        let node: Node = serde_json::from_value(json!({"metadata": {"name": "n1", "labels": {
            "topology.kubernetes.io/zone": "c"}}}))
        .unwrap();
        let nodes = [("n1".to_owned(), Arc::new(node))].into_iter().collect();
        let pod = |name: &str, annotated: bool, ip: Option<&str>| -> Pod {
            let mut meta = json!({"name": name, "namespace": "shop", "labels": {"app": "web"}});
            if annotated {
                meta["annotations"] = json!({SIDECAR_PORT_ANNOTATION: "15006"});
            }
            serde_json::from_value(json!({
                "metadata": meta,
                "spec": {"nodeName": "n1", "serviceAccountName": "web", "containers": [{"name": "app"}]},
                "status": {"podIP": ip, "phase": "Running"}
            }))
            .unwrap()
        };
        let mut used = std::collections::BTreeSet::new();
        let (_, made) = pod_workload(&pod("c1", true, Some("10.1.0.9")), &nodes, &mut used)
            .unwrap_or_else(|| panic!("no workload"));
        let docs = made.unwrap();
        let sinew_model::resource::Resource::Workload(w) = &docs[0].resource else {
            panic!("not a workload");
        };
        assert_eq!(w.spec.service, None);
        assert_eq!(w.spec.address, "10.1.0.9");
        assert_eq!(w.spec.service_account(), "web");
        assert_eq!(
            w.spec.sidecar, None,
            "no inbound derived: it serves no Service"
        );
        assert_eq!(
            sinew_model::compile::zone_of(&w.metadata).as_deref(),
            Some("c")
        );
        assert!(pod_workload(&pod("c2", false, Some("10.1.0.8")), &nodes, &mut used).is_none());
        assert!(pod_workload(&pod("c3", true, None), &nodes, &mut used).is_none());
        used.insert(("shop".to_owned(), "c4".to_owned()));
        assert!(pod_workload(&pod("c4", true, Some("10.1.0.7")), &nodes, &mut used).is_none());
    }

    /// Kubernetes 1.20 serves EndpointSlices as v1beta1 only, with the zone and the
    /// node in `topology`.
    #[test]
    fn v1beta1_topology_is_read_as_zone_and_node() {
        let slice = slice_from_v1beta1(json!({
            "apiVersion": "discovery.k8s.io/v1beta1",
            "kind": "EndpointSlice",
            "metadata": {"name": "catalog-x", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "catalog"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.1.0.1"],
                           "topology": {"topology.kubernetes.io/zone": "z1",
                                        "kubernetes.io/hostname": "n1"}}]
        }))
        .unwrap_or_else(|| panic!("not read"));
        let set = from_slice(&slice).unwrap_or_else(|| panic!("no set"));
        assert_eq!(set.endpoints[0].zone.as_deref(), Some("z1"));
        assert_eq!(set.endpoints[0].node.as_deref(), Some("n1"));
    }

    #[test]
    fn mirror_fractions_become_whole_percents_or_problems() {
        let mut rules = json!([
            {"filters": [{"type": "RequestMirror",
                          "requestMirror": {"backendRef": {"name": "a"}, "fraction": {"numerator": 1, "denominator": 4}}}],
             "backendRefs": [{"name": "b", "filters": [{"type": "RequestMirror",
                          "requestMirror": {"backendRef": {"name": "a"}, "fraction": {"numerator": 1, "denominator": 3}}}]}]},
            {"filters": [{"type": "RequestMirror",
                          "requestMirror": {"backendRef": {"name": "a"}, "percent": 5, "fraction": {"numerator": 5}}}]}
        ]);
        let mut problems = Vec::new();
        mirror_fractions(&mut rules, &mut problems);
        assert_eq!(
            rules[0]["filters"][0]["requestMirror"],
            json!({"backendRef": {"name": "a"}, "percent": 25})
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0]
                .starts_with("spec.rules[0].backendRefs[0].filters[0].requestMirror.fraction"),
            "{problems:?}"
        );
        assert!(problems[1].contains("not both"), "{problems:?}");
    }

    #[test]
    fn names_are_dns_safe() {
        assert_eq!(dns_safe("fd00::1"), "fd00--1");
        assert_eq!(dns_safe("10.0.0.1"), "10-0-0-1");
    }
}
