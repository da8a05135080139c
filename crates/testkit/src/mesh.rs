//! Typed builders for the mesh's documents, instead of YAML written by hand.
//!
//! Each builder is one document (`Proxy`, `Service`, `Workload`, `HTTPRoute`,
//! `AuthorizationPolicy`, `RequestAuthentication`, `TrafficPolicy`); kinds without a
//! builder (`RoutePolicy`, `MeshConfig`) are made by [`resource`]. A [`Mesh`] collects them in one
//! namespace and renders the stream the proxy and the CLI read
//! ([`Mesh::yaml`]: one JSON document per `---`, which YAML reads as is). The
//! field names are the documents' own (camelCase), so a test reads like the
//! manifest it stands for, and a misspelt field fails to compile here instead of
//! failing validation at run time.
//!
//! ```
//! use sinew_testkit::mesh::{Mesh, Proxy, Service, Workload};
//! let addr = "127.0.0.1:8080".parse().unwrap();
//! let yaml = Mesh::new("shop")
//!     .with(Proxy::new("client").upstream("127.0.0.1:9001".parse().unwrap(), "catalog"))
//!     .with(Service::http("catalog"))
//!     .with(Workload::new("catalog-1", "catalog", addr))
//!     .yaml();
//! assert!(yaml.contains("\"kind\": \"Workload\""));
//! ```

use std::net::SocketAddr;

use serde_json::{Map, Value, json};

/// Anything that renders as one mesh document.
pub trait Document {
    /// The document: `apiVersion`, `kind`, `metadata` (without a namespace when
    /// none was given: [`Mesh`] fills in its own) and `spec`.
    fn document(&self) -> Value;
}

impl Document for Value {
    fn document(&self) -> Value {
        self.clone()
    }
}

const SINEW: &str = "sinew.dev/v1alpha1";

/// A `sinew.dev/v1alpha1` document of `kind` with `spec` as the document spells it,
/// for kinds that need no builder of their own (`RoutePolicy`, `MeshConfig`).
pub fn resource(kind: &str, name: &str, spec: Value) -> Value {
    doc(SINEW, kind, name, spec)
}

fn doc(api_version: &str, kind: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    })
}

/// Documents of one namespace, rendered as one stream.
#[derive(Debug, Clone, Default)]
pub struct Mesh {
    namespace: String,
    docs: Vec<Value>,
}

impl Mesh {
    /// An empty set whose documents land in `namespace` unless they name another.
    pub fn new(namespace: &str) -> Mesh {
        Mesh {
            namespace: namespace.to_owned(),
            docs: Vec::new(),
        }
    }

    /// Adds a document.
    pub fn with(mut self, d: impl Document) -> Mesh {
        self.add(d);
        self
    }

    /// Adds a document in place.
    pub fn add(&mut self, d: impl Document) -> &mut Mesh {
        let mut v = d.document();
        // Cluster-scoped kinds (MeshConfig) carry no namespace.
        let scoped = v["kind"] != "MeshConfig";
        if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut)
            && scoped
            && !meta.contains_key("namespace")
        {
            meta.insert("namespace".into(), Value::String(self.namespace.clone()));
        }
        self.docs.push(v);
        self
    }

    /// The documents as one YAML stream.
    pub fn yaml(&self) -> String {
        let mut out = String::new();
        for d in &self.docs {
            out.push_str("---\n");
            out.push_str(&serde_json::to_string_pretty(d).unwrap_or_default());
            out.push('\n');
        }
        out
    }
}

/// `kind: Proxy`: one sidecar's listeners.
#[derive(Debug, Clone)]
pub struct Proxy {
    name: String,
    spec: Map<String, Value>,
}

impl Proxy {
    /// A proxy with no listener yet.
    pub fn new(name: &str) -> Proxy {
        let mut spec = Map::new();
        spec.insert("outbound".into(), json!({"upstreams": []}));
        Proxy {
            name: name.to_owned(),
            spec,
        }
    }

    /// An outbound binding: `bind` forwards to `service`.
    pub fn upstream(mut self, bind: SocketAddr, service: &str) -> Proxy {
        if let Some(ups) = self.spec["outbound"]["upstreams"].as_array_mut() {
            ups.push(json!({"bind": bind.to_string(), "service": service}));
        }
        self
    }

    /// An outbound binding as the document spells it (`bind`, `service`, `limits`,
    /// ...).
    pub fn binding(mut self, binding: Value) -> Proxy {
        if let Some(ups) = self.spec["outbound"]["upstreams"].as_array_mut() {
            ups.push(binding);
        }
        self
    }

    /// The outbound HTTP forward proxy at `bind` (`HTTP_PROXY` clients; routed by
    /// the Host header).
    pub fn http_proxy(mut self, bind: SocketAddr) -> Proxy {
        if let Some(out) = self.spec["outbound"].as_object_mut() {
            out.insert("httpProxy".into(), json!({"bind": bind.to_string()}));
        }
        self
    }

    /// The inbound listener at `bind`, forwarding to the local application's
    /// `ports`.
    pub fn inbound(mut self, bind: SocketAddr, ports: &[u16]) -> Proxy {
        self.spec.insert(
            "inbound".into(),
            json!({"bind": bind.to_string(), "ports": ports}),
        );
        self
    }

    /// The inbound listener, forwarding to the application at `app` (another
    /// address than loopback) on `ports`.
    pub fn inbound_to(mut self, bind: SocketAddr, app: std::net::IpAddr, ports: &[u16]) -> Proxy {
        self.spec.insert(
            "inbound".into(),
            json!({"bind": bind.to_string(), "appAddress": app.to_string(), "ports": ports}),
        );
        self
    }

    /// The workload this proxy runs beside (its identity and service).
    pub fn workload(mut self, workload: &str) -> Proxy {
        self.spec.insert("workload".into(), json!(workload));
        self
    }

    /// Sets any other `spec` field (`accessLog`, `limits`, ...).
    pub fn field(mut self, name: &str, value: Value) -> Proxy {
        self.spec.insert(name.into(), value);
        self
    }
}

impl Document for Proxy {
    fn document(&self) -> Value {
        doc(SINEW, "Proxy", &self.name, Value::Object(self.spec.clone()))
    }
}

/// `kind: Service`.
#[derive(Debug, Clone)]
pub struct Service {
    name: String,
    spec: Map<String, Value>,
}

impl Service {
    /// A service with one port `main` (80) of `protocol` (`HTTP`, `HTTP2`, `GRPC`,
    /// `TCP`).
    pub fn new(name: &str, protocol: &str) -> Service {
        let mut spec = Map::new();
        spec.insert(
            "ports".into(),
            json!([{"name": "main", "port": 80, "protocol": protocol}]),
        );
        Service {
            name: name.to_owned(),
            spec,
        }
    }

    /// An HTTP service (port `main`, 80).
    pub fn http(name: &str) -> Service {
        Service::new(name, "HTTP")
    }

    /// The service's mTLS mode (`STRICT`, `PERMISSIVE`).
    pub fn mtls(mut self, mode: &str) -> Service {
        self.spec.insert("mtls".into(), json!({"mode": mode}));
        self
    }

    /// Names the port `name` instead of `main` (the control-plane tests spell
    /// Kubernetes' usual `http`); a [`Workload`] of it needs the same
    /// [`Workload::port_name`].
    pub fn port_name(mut self, name: &str) -> Service {
        if let Some(p) = self.spec["ports"][0].as_object_mut() {
            p.insert("name".into(), json!(name));
        }
        self
    }

    /// How requests pick an endpoint (`RoundRobin`, `LeastRequest`, ...).
    pub fn load_balancer(mut self, lb: &str) -> Service {
        self.spec.insert("loadBalancer".into(), json!(lb));
        self
    }

    /// Sets any other `spec` field (`ports`, ...).
    pub fn field(mut self, name: &str, value: Value) -> Service {
        self.spec.insert(name.into(), value);
        self
    }
}

impl Document for Service {
    fn document(&self) -> Value {
        doc(
            SINEW,
            "Service",
            &self.name,
            Value::Object(self.spec.clone()),
        )
    }
}

/// `kind: Workload`: one instance of a service.
#[derive(Debug, Clone)]
pub struct Workload {
    name: String,
    labels: Map<String, Value>,
    spec: Map<String, Value>,
}

impl Workload {
    /// An instance of `service` whose port `main` is `addr`.
    pub fn new(name: &str, service: &str, addr: SocketAddr) -> Workload {
        let mut spec = Map::new();
        spec.insert("service".into(), json!(service));
        spec.insert("address".into(), json!(addr.ip().to_string()));
        spec.insert("ports".into(), json!({"main": addr.port()}));
        Workload {
            name: name.to_owned(),
            labels: Map::new(),
            spec,
        }
    }

    /// Names its one port `name` instead of `main` (see [`Service::port_name`]).
    pub fn port_name(mut self, name: &str) -> Workload {
        if let Some(ports) = self.spec.get_mut("ports").and_then(Value::as_object_mut) {
            let numbers: Vec<Value> = ports.values().cloned().collect();
            ports.clear();
            if let Some(n) = numbers.into_iter().next() {
                ports.insert(name.into(), n);
            }
        }
        self
    }

    /// A label in its metadata (`topology.kubernetes.io/zone`, ...).
    pub fn label(mut self, key: &str, value: &str) -> Workload {
        self.labels.insert(key.into(), json!(value));
        self
    }

    /// Reached through its sidecar's inbound `port` (same address).
    pub fn sidecar(mut self, port: u16) -> Workload {
        self.spec.insert("sidecar".into(), json!({"port": port}));
        self
    }

    /// Runs as `account`: its SPIFFE id is `spiffe://<trust domain>/ns/<ns>/sa/<account>`.
    pub fn service_account(mut self, account: &str) -> Workload {
        self.spec.insert("serviceAccount".into(), json!(account));
        self
    }
}

impl Document for Workload {
    fn document(&self) -> Value {
        let mut d = doc(
            SINEW,
            "Workload",
            &self.name,
            Value::Object(self.spec.clone()),
        );
        if !self.labels.is_empty() {
            d["metadata"]["labels"] = Value::Object(self.labels.clone());
        }
        d
    }
}

/// `kind: HTTPRoute` (Gateway API) attached to a Service.
#[derive(Debug, Clone)]
pub struct HttpRoute {
    name: String,
    parent: String,
    rules: Vec<Value>,
}

impl HttpRoute {
    /// A route for the Service `parent`, without rules yet.
    pub fn new(name: &str, parent: &str) -> HttpRoute {
        HttpRoute {
            name: name.to_owned(),
            parent: parent.to_owned(),
            rules: Vec::new(),
        }
    }

    /// A rule as the document spells it (`matches`, `filters`, `backendRefs`, ...).
    pub fn rule(mut self, rule: Value) -> HttpRoute {
        self.rules.push(rule);
        self
    }

    /// A rule: requests whose path starts with `prefix` go to the Service `backend`.
    pub fn prefix_to(self, prefix: &str, backend: &str) -> HttpRoute {
        self.rule(json!({
            "matches": [{"path": {"type": "PathPrefix", "value": prefix}}],
            "backendRefs": [{"name": backend}],
        }))
    }
}

impl Document for HttpRoute {
    fn document(&self) -> Value {
        doc(
            "gateway.networking.k8s.io/v1",
            "HTTPRoute",
            &self.name,
            json!({
                "parentRefs": [{"kind": "Service", "name": self.parent}],
                "rules": self.rules,
            }),
        )
    }
}

/// `kind: AuthorizationPolicy`: who may call a service's workloads.
#[derive(Debug, Clone)]
pub struct AuthorizationPolicy {
    name: String,
    spec: Map<String, Value>,
    rules: Vec<Value>,
}

impl AuthorizationPolicy {
    /// An `ALLOW` policy for the workloads of the Service `target`.
    pub fn allow(name: &str, target: &str) -> AuthorizationPolicy {
        Self::with_action(name, Some(target), "ALLOW")
    }

    /// A `DENY` policy for the workloads of the Service `target`.
    pub fn deny(name: &str, target: &str) -> AuthorizationPolicy {
        Self::with_action(name, Some(target), "DENY")
    }

    /// The namespace's default (`ALLOW` or `DENY`) for requests no policy decides.
    pub fn namespace_default(name: &str, action: &str) -> AuthorizationPolicy {
        let mut p = Self::with_action(name, None, "ALLOW");
        p.spec.insert("defaultAction".into(), json!(action));
        p
    }

    fn with_action(name: &str, target: Option<&str>, action: &str) -> AuthorizationPolicy {
        let mut spec = Map::new();
        if let Some(t) = target {
            spec.insert("targetRef".into(), json!({"kind": "Service", "name": t}));
        }
        spec.insert("action".into(), json!(action));
        AuthorizationPolicy {
            name: name.to_owned(),
            spec,
            rules: Vec::new(),
        }
    }

    /// A rule as the document spells it (`from`, `to`, `when`).
    pub fn rule(mut self, rule: Value) -> AuthorizationPolicy {
        self.rules.push(rule);
        self
    }

    /// A rule matching callers with one of these SPIFFE ids.
    pub fn from_principals(self, principals: &[&str]) -> AuthorizationPolicy {
        self.rule(json!({"from": {"principals": principals}}))
    }

    /// A rule matching requests with a verified token of one of these
    /// `issuer/subject` principals (`*` for any).
    pub fn from_request_principals(self, principals: &[&str]) -> AuthorizationPolicy {
        self.rule(json!({"from": {"requestPrincipals": principals}}))
    }
}

impl Document for AuthorizationPolicy {
    fn document(&self) -> Value {
        let mut spec = self.spec.clone();
        if !self.rules.is_empty() {
            spec.insert("rules".into(), Value::Array(self.rules.clone()));
        }
        doc(
            SINEW,
            "AuthorizationPolicy",
            &self.name,
            Value::Object(spec),
        )
    }
}

/// `kind: RequestAuthentication`: the JWTs a service's workloads accept.
#[derive(Debug, Clone)]
pub struct RequestAuthentication {
    name: String,
    target: Option<String>,
    rules: Vec<Value>,
}

impl RequestAuthentication {
    /// For the workloads of the Service `target`.
    pub fn new(name: &str, target: &str) -> RequestAuthentication {
        RequestAuthentication {
            name: name.to_owned(),
            target: Some(target.to_owned()),
            rules: Vec::new(),
        }
    }

    /// Tokens of `issuer` for one of `audiences` (none: any), verified with the
    /// keys of the JWKS JSON `jwks` given inline.
    pub fn inline_jwks(
        self,
        issuer: &str,
        audiences: &[&str],
        jwks: &str,
    ) -> RequestAuthentication {
        let mut rule = json!({"issuer": issuer, "jwks": {"inline": jwks}});
        if !audiences.is_empty() {
            rule["audiences"] = json!(audiences);
        }
        self.rule(rule)
    }

    /// A rule as the document spells it (`issuer`, `jwks`, `forwardClaims`, ...).
    pub fn rule(mut self, rule: Value) -> RequestAuthentication {
        self.rules.push(rule);
        self
    }
}

impl Document for RequestAuthentication {
    fn document(&self) -> Value {
        let mut spec = json!({"jwtRules": self.rules});
        if let Some(t) = &self.target {
            spec["targetRef"] = json!({"kind": "Service", "name": t});
        }
        doc(SINEW, "RequestAuthentication", &self.name, spec)
    }
}

/// `kind: TrafficPolicy`: how callers treat a Service's endpoints (circuit breaker,
/// outlier detection, health checks, rate limits, ring hash, locality).
#[derive(Debug, Clone)]
pub struct TrafficPolicy {
    name: String,
    spec: Map<String, Value>,
}

impl TrafficPolicy {
    /// A policy for the Service `target`, setting nothing yet.
    pub fn new(name: &str, target: &str) -> TrafficPolicy {
        let mut spec = Map::new();
        spec.insert(
            "targetRef".into(),
            json!({"kind": "Service", "name": target}),
        );
        TrafficPolicy {
            name: name.to_owned(),
            spec,
        }
    }

    /// Sets a `spec` field as the document spells it (`circuitBreaker`,
    /// `outlierDetection`, ...).
    pub fn field(mut self, name: &str, value: Value) -> TrafficPolicy {
        self.spec.insert(name.into(), value);
        self
    }
}

impl Document for TrafficPolicy {
    fn document(&self) -> Value {
        doc(
            SINEW,
            "TrafficPolicy",
            &self.name,
            Value::Object(self.spec.clone()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_take_the_mesh_namespace_unless_they_name_one() {
        let mut other = Service::http("b").document();
        other["metadata"]["namespace"] = json!("other");
        let mesh = Mesh::new("shop")
            .with(Service::http("a"))
            .with(other)
            .with(json!({"apiVersion": SINEW, "kind": "MeshConfig", "metadata": {"name": "mesh"}, "spec": {}}));
        let docs: Vec<Value> = mesh
            .yaml()
            .split("---\n")
            .filter(|d| !d.trim().is_empty())
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[0]["metadata"]["namespace"], "shop");
        assert_eq!(docs[1]["metadata"]["namespace"], "other");
        assert!(docs[2]["metadata"].get("namespace").is_none());
    }

    #[test]
    fn builders_spell_the_documents_fields() {
        let w = Workload::new("w-1", "w", "127.0.0.1:8080".parse().unwrap())
            .sidecar(4143)
            .service_account("web")
            .document();
        assert_eq!(
            w["spec"],
            json!({"service": "w", "address": "127.0.0.1", "ports": {"main": 8080}, "sidecar": {"port": 4143}, "serviceAccount": "web"})
        );
        let p = AuthorizationPolicy::allow("readers", "catalog")
            .from_principals(&["spiffe://cluster.local/ns/shop/sa/web"])
            .document();
        assert_eq!(
            p["spec"]["targetRef"],
            json!({"kind": "Service", "name": "catalog"})
        );
        assert_eq!(p["spec"]["action"], "ALLOW");
        assert_eq!(
            p["spec"]["rules"][0]["from"]["principals"][0],
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        let w = Workload::new("w-1", "w", "127.0.0.1:8080".parse().unwrap())
            .port_name("http")
            .label("topology.kubernetes.io/zone", "zone-a")
            .document();
        assert_eq!(w["spec"]["ports"], json!({"http": 8080}));
        assert_eq!(
            w["metadata"]["labels"],
            json!({"topology.kubernetes.io/zone": "zone-a"})
        );
        let s = Service::http("s").port_name("http").document();
        assert_eq!(
            s["spec"]["ports"],
            json!([{"name": "http", "port": 80, "protocol": "HTTP"}])
        );
        let p = Proxy::new("client")
            .upstream("127.0.0.1:9001".parse().unwrap(), "catalog")
            .http_proxy("127.0.0.1:9002".parse().unwrap())
            .document();
        assert_eq!(
            p["spec"]["outbound"],
            json!({"upstreams": [{"bind": "127.0.0.1:9001", "service": "catalog"}], "httpProxy": {"bind": "127.0.0.1:9002"}})
        );
        let t = TrafficPolicy::new("catalog", "catalog")
            .field("ringHash", json!({"header": "x-user"}))
            .document();
        assert_eq!(t["kind"], "TrafficPolicy");
        assert_eq!(
            t["spec"],
            json!({"targetRef": {"kind": "Service", "name": "catalog"}, "ringHash": {"header": "x-user"}})
        );
        let r = RequestAuthentication::new("users", "catalog")
            .inline_jwks("https://issuer.test", &["catalog"], "{\"keys\":[]}")
            .document();
        assert_eq!(r["spec"]["jwtRules"][0]["jwks"]["inline"], "{\"keys\":[]}");
        assert_eq!(r["spec"]["jwtRules"][0]["audiences"], json!(["catalog"]));
    }
}
