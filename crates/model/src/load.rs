//! Reading documents: YAML streams split into documents, each parsed into its typed
//! kind with the file, line and field path of any problem, then validated as a set.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

use crate::duration;
use crate::error::{ConfigError, ConfigErrors};
use crate::resource::*;

/// A parsed document and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// The typed resource.
    pub resource: Resource,
    /// Source label (usually a file path).
    pub file: String,
    /// 1-based line where the document starts; 0 when unknown (e.g. from a store).
    pub line: usize,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    api_version: Option<String>,
    kind: Option<String>,
}

/// Splits a YAML stream into `(first line, text)` documents at `---` lines.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") || trimmed == "..." {
            docs.push((start, std::mem::take(&mut current)));
            start = i + 2;
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    docs.push((start, current));
    docs
}

/// Turns a serde_norway error into (line within the document, reason without location).
fn yaml_problem(e: &serde_norway::Error) -> (Option<usize>, String) {
    let line = e.location().map(|l| l.line());
    let mut msg = e.to_string();
    if let Some(idx) = msg.find(" at line ") {
        msg.truncate(idx);
    }
    (line, msg)
}

fn parse_typed<S: serde::de::DeserializeOwned>(
    file: &str,
    start: usize,
    text: &str,
) -> Result<Object<S>, ConfigError> {
    let de = serde_norway::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let (line, reason) = yaml_problem(e.inner());
        // serde_norway sometimes prefixes its own path; keep the message readable.
        let reason = match reason.split_once(": ") {
            Some((pre, rest)) if path.starts_with(pre) => rest.to_owned(),
            _ => reason,
        };
        let mut err = ConfigError::new(reason).at(file, line.map(|l| start + l - 1));
        if path != "." {
            err = err.field(path);
        }
        err
    })
}

/// Parses a YAML stream of documents. Empty documents are skipped. All problems are
/// reported, each with file, line and field path.
pub fn parse_documents(file: &str, text: &str) -> Result<Vec<Document>, ConfigErrors> {
    let mut out = Vec::new();
    let mut errors = ConfigErrors::default();
    for (start, doc) in split_documents(text) {
        let value: serde_norway::Value = match serde_norway::from_str(&doc) {
            Ok(v) => v,
            Err(e) => {
                let (line, reason) = yaml_problem(&e);
                errors.push(
                    ConfigError::new(format!("invalid YAML: {reason}"))
                        .at(file, Some(start + line.unwrap_or(1) - 1)),
                );
                continue;
            }
        };
        if value.is_null() {
            continue;
        }
        let header: Header = match serde_norway::from_value(value) {
            Ok(h) => h,
            Err(_) => {
                errors.push(
                    ConfigError::new("a document must be a mapping with apiVersion and kind")
                        .at(file, Some(start)),
                );
                continue;
            }
        };
        let Some(kind) = header.kind else {
            errors.push(
                ConfigError::new("missing field `kind`")
                    .field("kind")
                    .at(file, Some(start)),
            );
            continue;
        };
        let api = header.api_version.unwrap_or_default();
        let api_ok = match kind.as_str() {
            "HTTPRoute" => {
                api == format!("{GATEWAY_GROUP}/v1") || api == format!("{GATEWAY_GROUP}/v1beta1")
            }
            _ => api == SINEW_API_VERSION,
        };
        let known = KINDS;
        if !known.contains(&kind.as_str()) {
            errors.push(
                ConfigError::new(format!(
                    "unknown kind {kind:?}; expected one of {}",
                    known.join(", ")
                ))
                .field("kind")
                .at(file, Some(start)),
            );
            continue;
        }
        if !api_ok {
            let want = if kind == "HTTPRoute" {
                format!("{GATEWAY_GROUP}/v1")
            } else {
                SINEW_API_VERSION.to_owned()
            };
            errors.push(
                ConfigError::new(format!(
                    "apiVersion {api:?} is not served for kind {kind}; use {want:?}"
                ))
                .field("apiVersion")
                .at(file, Some(start)),
            );
            continue;
        }
        let parsed = match kind.as_str() {
            "Proxy" => parse_typed(file, start, &doc).map(Resource::Proxy),
            "Service" => parse_typed(file, start, &doc).map(Resource::Service),
            "Workload" => parse_typed(file, start, &doc).map(Resource::Workload),
            "MeshConfig" => parse_typed(file, start, &doc).map(Resource::MeshConfig),
            "AuthorizationPolicy" => {
                parse_typed(file, start, &doc).map(Resource::AuthorizationPolicy)
            }
            "RequestAuthentication" => {
                parse_typed(file, start, &doc).map(Resource::RequestAuthentication)
            }
            "TrafficPolicy" => parse_typed(file, start, &doc).map(Resource::TrafficPolicy),
            "RoutePolicy" => parse_typed(file, start, &doc).map(Resource::RoutePolicy),
            _ => parse_typed(file, start, &doc).map(Resource::HttpRoute),
        };
        match parsed {
            Ok(resource) => out.push(Document {
                resource,
                file: file.to_owned(),
                line: start,
            }),
            Err(e) => errors.push(e),
        }
    }
    errors.into_result(out)
}

/// Parses several `(label, text)` sources; every problem of every source is reported.
pub fn parse_sources<'a>(
    sources: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Vec<Document>, ConfigErrors> {
    let mut docs = Vec::new();
    let mut errors = ConfigErrors::default();
    for (label, text) in sources {
        match parse_documents(label, text) {
            Ok(d) => docs.extend(d),
            Err(e) => errors.0.extend(e.0),
        }
    }
    errors.into_result(docs)
}

/// Parses the sources of an apply: as [`parse_sources`], and a source with no
/// documents (empty, or only comments) is an error naming it, as is an apply with
/// no source at all: an apply that would change nothing is a mistake (a wrong
/// file, a truncated one), not a success to report.
pub fn parse_apply<'a>(
    sources: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Vec<Document>, ConfigErrors> {
    let mut docs = Vec::new();
    let mut errors = ConfigErrors::default();
    let mut any = false;
    for (label, text) in sources {
        any = true;
        match parse_documents(label, text) {
            Ok(d) if d.is_empty() => errors.push(
                ConfigError::new(
                    "no documents: the file is empty or holds only comments; nothing to apply",
                )
                .at(label, None),
            ),
            Ok(d) => docs.extend(d),
            Err(e) => errors.0.extend(e.0),
        }
    }
    if !any {
        errors.push(ConfigError::new("nothing to apply: no files were sent"));
    }
    errors.into_result(docs)
}

/// Where a document came from, for messages about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Source label.
    pub file: String,
    /// First line of the document.
    pub line: usize,
}

/// `(namespace, name)`.
pub type Key = (String, String);

/// A validated, self-consistent set of resources.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    /// `Proxy` documents.
    pub proxies: BTreeMap<Key, Object<ProxySpec>>,
    /// `Service` documents.
    pub services: BTreeMap<Key, Object<ServiceSpec>>,
    /// `Workload` documents.
    pub workloads: BTreeMap<Key, Object<WorkloadSpec>>,
    /// `HTTPRoute` documents.
    pub routes: BTreeMap<Key, Object<HttpRouteSpec>>,
    /// The `MeshConfig` document, if any.
    pub mesh: Option<Object<MeshConfigSpec>>,
    /// `AuthorizationPolicy` documents.
    pub authorization_policies: BTreeMap<Key, Object<AuthorizationPolicySpec>>,
    /// `RequestAuthentication` documents.
    pub request_authentications: BTreeMap<Key, Object<RequestAuthenticationSpec>>,
    /// `TrafficPolicy` documents.
    pub traffic_policies: BTreeMap<Key, Object<TrafficPolicySpec>>,
    /// `RoutePolicy` documents ([`crate::policy`]).
    pub route_policies: BTreeMap<Key, Object<RoutePolicySpec>>,
    /// Where each `(kind, namespace, name)` came from.
    pub origins: BTreeMap<(String, String, String), Origin>,
}

fn key(m: &Metadata) -> Key {
    (m.ns().to_owned(), m.name.clone())
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.as_bytes()
            .first()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && s.as_bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric())
}

pub(crate) struct Checker<'a> {
    errors: &'a mut ConfigErrors,
    at: At<'a>,
}

/// Where a document came from and what to call it in an error. A control plane
/// validates every document on every change, so this is worked out only when
/// something fails.
enum At<'a> {
    Known {
        origin: Origin,
        label: String,
    },
    Lookup {
        origins: &'a BTreeMap<(String, String, String), Origin>,
        kind: &'static str,
        key: &'a Key,
    },
}

impl Checker<'_> {
    pub(crate) fn fail(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        let (origin, label) = match &self.at {
            At::Known { origin, label } => (origin.clone(), label.clone()),
            At::Lookup { origins, kind, key } => (
                origins
                    .get(&((*kind).to_owned(), key.0.clone(), key.1.clone()))
                    .cloned()
                    .unwrap_or(Origin {
                        file: String::new(),
                        line: 0,
                    }),
                format!("{kind} {}/{}", key.0, key.1),
            ),
        };
        self.errors.push(
            ConfigError::new(reason)
                .field(field)
                .resource(label)
                .at(origin.file, (origin.line > 0).then_some(origin.line)),
        );
    }
}

impl Resources {
    /// Every document, in a stable order.
    pub fn documents(&self) -> Vec<Resource> {
        let mut out: Vec<Resource> = Vec::new();
        out.extend(self.mesh.iter().cloned().map(Resource::MeshConfig));
        out.extend(self.proxies.values().cloned().map(Resource::Proxy));
        out.extend(self.services.values().cloned().map(Resource::Service));
        out.extend(self.workloads.values().cloned().map(Resource::Workload));
        out.extend(self.routes.values().cloned().map(Resource::HttpRoute));
        out.extend(
            self.authorization_policies
                .values()
                .cloned()
                .map(Resource::AuthorizationPolicy),
        );
        out.extend(
            self.request_authentications
                .values()
                .cloned()
                .map(Resource::RequestAuthentication),
        );
        out.extend(
            self.traffic_policies
                .values()
                .cloned()
                .map(Resource::TrafficPolicy),
        );
        out.extend(
            self.route_policies
                .values()
                .cloned()
                .map(Resource::RoutePolicy),
        );
        out
    }

    /// Validates documents as one set: names, duplicates, every field, and every
    /// reference between them. Nothing is returned unless everything is valid.
    pub fn from_documents(docs: Vec<Document>) -> Result<Resources, ConfigErrors> {
        let mut errors = ConfigErrors::default();
        let mut res = Resources::default();
        for doc in docs {
            if let Err(e) = res.add(doc) {
                errors.push(e);
            }
        }
        res.validate(&mut errors);
        errors.into_result(res)
    }

    /// Adds one document, refusing a bad name or namespace, a document already in
    /// the set and a second MeshConfig. The set is not checked as a whole:
    /// [`Resources::check`] does that. A control plane keeps its set and changes it
    /// document by document, so an apply costs what it changes plus one check,
    /// not a rebuild of the whole set.
    pub fn add(&mut self, doc: Document) -> Result<(), ConfigError> {
        let m = doc.resource.metadata();
        let origin = Origin {
            file: doc.file,
            line: doc.line,
        };
        let problem = if !valid_name(&m.name) {
            Some((
                "metadata.name",
                format!(
                    "{:?} is not a valid name (lowercase letters, digits, '-', '.')",
                    m.name
                ),
            ))
        } else if !valid_name(m.ns()) {
            Some((
                "metadata.namespace",
                format!("{:?} is not a valid namespace", m.ns()),
            ))
        } else {
            None
        };
        let okey = (
            doc.resource.kind().to_owned(),
            m.ns().to_owned(),
            m.name.clone(),
        );
        let problem = problem
            .or_else(|| {
                self.origins.get(&okey).map(|prev| {
                    (
                        "metadata.name",
                        format!(
                            "duplicate {} {}/{}: already defined at {}:{}",
                            okey.0, okey.1, okey.2, prev.file, prev.line
                        ),
                    )
                })
            })
            .or_else(|| {
                let prev = self.mesh.as_ref().filter(|_| okey.0 == "MeshConfig")?;
                Some((
                    "metadata.name",
                    format!(
                        "only one MeshConfig is allowed; {}/{} is already defined",
                        prev.metadata.ns(),
                        prev.metadata.name
                    ),
                ))
            });
        if let Some((field, reason)) = problem {
            let mut errors = ConfigErrors::default();
            Checker {
                errors: &mut errors,
                at: At::Known {
                    origin,
                    label: doc.resource.label(),
                },
            }
            .fail(field, reason);
            return Err(errors.0.remove(0));
        }
        self.origins.insert(okey, origin);
        match doc.resource {
            Resource::Proxy(o) => {
                self.proxies.insert(key(&o.metadata), o);
            }
            Resource::Service(o) => {
                self.services.insert(key(&o.metadata), o);
            }
            Resource::Workload(o) => {
                self.workloads.insert(key(&o.metadata), o);
            }
            Resource::HttpRoute(o) => {
                self.routes.insert(key(&o.metadata), o);
            }
            Resource::AuthorizationPolicy(o) => {
                self.authorization_policies.insert(key(&o.metadata), o);
            }
            Resource::RequestAuthentication(o) => {
                self.request_authentications.insert(key(&o.metadata), o);
            }
            Resource::TrafficPolicy(o) => {
                self.traffic_policies.insert(key(&o.metadata), o);
            }
            Resource::RoutePolicy(o) => {
                self.route_policies.insert(key(&o.metadata), o);
            }
            Resource::MeshConfig(o) => {
                self.mesh = Some(o);
            }
        }
        Ok(())
    }

    /// Removes the document `kind namespace/name`, if the set has it: the document
    /// and where it came from, as [`Resources::add`] takes it back.
    pub fn remove(&mut self, kind: &str, namespace: &str, name: &str) -> Option<Document> {
        let okey = (kind.to_owned(), namespace.to_owned(), name.to_owned());
        let origin = self.origins.get(&okey)?;
        let k = (okey.1.clone(), okey.2.clone());
        let resource = match kind {
            "Proxy" => self.proxies.remove(&k).map(Resource::Proxy),
            "Service" => self.services.remove(&k).map(Resource::Service),
            "Workload" => self.workloads.remove(&k).map(Resource::Workload),
            "HTTPRoute" => self.routes.remove(&k).map(Resource::HttpRoute),
            "AuthorizationPolicy" => self
                .authorization_policies
                .remove(&k)
                .map(Resource::AuthorizationPolicy),
            "RequestAuthentication" => self
                .request_authentications
                .remove(&k)
                .map(Resource::RequestAuthentication),
            "TrafficPolicy" => self
                .traffic_policies
                .remove(&k)
                .map(Resource::TrafficPolicy),
            "RoutePolicy" => self.route_policies.remove(&k).map(Resource::RoutePolicy),
            "MeshConfig" => self
                .mesh
                .take_if(|m| m.metadata.ns() == k.0 && m.metadata.name == k.1)
                .map(Resource::MeshConfig),
            _ => None,
        }?;
        let origin = origin.clone();
        self.origins.remove(&okey);
        Some(Document {
            resource,
            file: origin.file,
            line: origin.line,
        })
    }

    /// Says where the document `kind namespace/name` came from, for errors that
    /// name it (a control plane's stored documents, once an apply is through).
    pub fn set_origin(&mut self, kind: &str, namespace: &str, name: &str, origin: Origin) {
        if let Some(o) =
            self.origins
                .get_mut(&(kind.to_owned(), namespace.to_owned(), name.to_owned()))
        {
            *o = origin;
        }
    }

    /// Checks the set as a whole: every field, and every reference between
    /// documents.
    pub fn check(&self) -> Result<(), ConfigErrors> {
        let mut errors = ConfigErrors::default();
        self.validate(&mut errors);
        errors.into_result(())
    }

    pub(crate) fn checker<'a>(
        &'a self,
        errors: &'a mut ConfigErrors,
        kind: &'static str,
        key: &'a Key,
    ) -> Checker<'a> {
        Checker {
            errors,
            at: At::Lookup {
                origins: &self.origins,
                kind,
                key,
            },
        }
    }

    /// Looks up a service by a logical name (`catalog`, `catalog.shop`) relative to `ns`.
    pub fn find_service(&self, ns: &str, name: &str) -> Option<&Object<ServiceSpec>> {
        let (n, namespace) = match name.split_once('.') {
            Some((n, rest)) => (n, rest.split('.').next().unwrap_or(ns)),
            None => (name, ns),
        };
        self.services.get(&(namespace.to_owned(), n.to_owned()))
    }

    fn validate(&self, errors: &mut ConfigErrors) {
        let mut vips: BTreeMap<IpAddr, &Key> = BTreeMap::new();
        for (k, svc) in &self.services {
            let mut c = self.checker(errors, "Service", k);
            let before = c.errors.0.len();
            let mut claims = Vec::new();
            for (i, v) in svc.spec.virtual_ip_list().enumerate() {
                // `virtualIP` is the first address, `virtualIPs[n]` the others.
                let field = match (&svc.spec.virtual_ip, i) {
                    (Some(_), 0) => "spec.virtualIP".to_owned(),
                    (Some(_), n) => format!("spec.virtualIPs[{}]", n - 1),
                    (None, n) => format!("spec.virtualIPs[{n}]"),
                };
                match v.parse::<IpAddr>() {
                    Err(_) => c.fail(field, format!("{v:?} is not an IP address")),
                    Ok(ip) => claims.push((field, ip)),
                }
            }
            if svc.spec.ports.is_empty() {
                c.fail("spec.ports", "a service needs at least one port");
            }
            for (i, a) in svc.spec.service_accounts.iter().flatten().enumerate() {
                if !valid_name(a) {
                    c.fail(
                        format!("spec.serviceAccounts[{i}]"),
                        format!("{a:?} is not a service account name"),
                    );
                }
            }
            let mut names = HashSet::new();
            let mut numbers = HashSet::new();
            for (i, p) in svc.spec.ports.iter().enumerate() {
                if !valid_name(&p.name) {
                    c.fail(
                        format!("spec.ports[{i}].name"),
                        format!("{:?} is not a valid port name", p.name),
                    );
                }
                if !names.insert(&p.name) {
                    c.fail(
                        format!("spec.ports[{i}].name"),
                        format!("duplicate port name {:?}", p.name),
                    );
                }
                if p.port == 0 {
                    c.fail(format!("spec.ports[{i}].port"), "port must be 1-65535");
                } else if !numbers.insert(p.port) {
                    c.fail(
                        format!("spec.ports[{i}].port"),
                        format!("duplicate port {}", p.port),
                    );
                }
                if p.target_port == Some(0) {
                    c.fail(
                        format!("spec.ports[{i}].targetPort"),
                        "port must be 1-65535",
                    );
                }
            }
            // A virtual IP is the first valid service's that claims it: an invalid
            // one claims nothing, so it never pushes a valid one out. The same address
            // written twice in one service is harmless.
            if c.errors.0.len() == before {
                for (field, ip) in claims {
                    match vips.get(&ip) {
                        Some(prev) if *prev != k => c.fail(
                            field,
                            format!(
                                "{ip} is already the virtual IP of service {}/{}",
                                prev.0, prev.1
                            ),
                        ),
                        _ => {
                            vips.insert(ip, k);
                        }
                    }
                }
            }
        }
        for (k, w) in &self.workloads {
            let mut c = self.checker(errors, "Workload", k);
            if w.spec.address.parse::<IpAddr>().is_err() {
                c.fail(
                    "spec.address",
                    format!("{:?} is not an IP address", w.spec.address),
                );
            }
            if let Some(s) = &w.spec.service
                && !self.services.contains_key(&(k.0.clone(), s.clone()))
            {
                c.fail(
                    "spec.service",
                    format!("service {:?} does not exist in namespace {:?}", s, k.0),
                );
            }
            for (name, port) in &w.spec.ports {
                if *port == 0 {
                    c.fail(format!("spec.ports.{name}"), "port must be 1-65535");
                }
            }
            if w.spec.sidecar.as_ref().is_some_and(|s| s.port == 0) {
                c.fail("spec.sidecar.port", "port must be 1-65535");
            }
            if let Some(sa) = &w.spec.service_account
                && !crate::authz::valid_segment(sa)
            {
                c.fail(
                    "spec.serviceAccount",
                    format!("{sa:?} is not a valid service account name"),
                );
            }
        }
        for (k, p) in &self.proxies {
            self.validate_proxy(errors, k, p);
        }
        for (k, r) in &self.routes {
            self.validate_route(errors, k, r);
        }
        self.validate_route_policies(errors);
        // A Service has one TrafficPolicy: the first valid one in name order. An
        // invalid policy claims nothing, so it never pushes a valid one out.
        let mut targeted: BTreeMap<(String, String), String> = BTreeMap::new();
        for (k, p) in &self.traffic_policies {
            let mut c = self.checker(errors, "TrafficPolicy", k);
            let before = c.errors.0.len();
            let t = &p.spec.target_ref;
            if t.kind.as_deref().is_some_and(|kind| kind != "Service") {
                c.fail("spec.targetRef.kind", "only Service targets are supported");
            } else if !self.services.contains_key(&(k.0.clone(), t.name.clone())) {
                c.fail(
                    "spec.targetRef.name",
                    format!("service {}/{} does not exist", k.0, t.name),
                );
            }
            if let Some(b) = &p.spec.circuit_breaker {
                for (field, v) in [
                    ("maxRequests", b.max_requests),
                    ("maxRequestsPerEndpoint", b.max_requests_per_endpoint),
                    ("maxConnectionsPerEndpoint", b.max_connections_per_endpoint),
                ] {
                    if v == Some(0) {
                        c.fail(
                            format!("spec.circuitBreaker.{field}"),
                            "must be at least 1 (leave it out for no limit)",
                        );
                    }
                }
                if b.max_pending_requests_per_endpoint.is_some()
                    && b.max_connections_per_endpoint.is_none()
                {
                    c.fail(
                        "spec.circuitBreaker.maxPendingRequestsPerEndpoint",
                        "requests wait only for a capped pool: set maxConnectionsPerEndpoint too",
                    );
                }
            }
            if let Some(r) = &p.spec.ring_hash {
                let given = usize::from(r.header.is_some())
                    + usize::from(r.cookie.is_some())
                    + usize::from(r.source_ip);
                if given != 1 {
                    c.fail(
                        "spec.ringHash",
                        "give exactly one of header, cookie or sourceIp: true",
                    );
                }
                if let Some(h) = &r.header
                    && http::HeaderName::from_bytes(h.as_bytes()).is_err()
                {
                    c.fail(
                        "spec.ringHash.header",
                        format!("{h:?} is not a valid header name"),
                    );
                }
            }
            if let Some(h) = &p.spec.health_check {
                for (field, v) in [("interval", &h.interval), ("timeout", &h.timeout)] {
                    if let Some(v) = v {
                        match duration::parse(v) {
                            Err(e) => c.fail(format!("spec.healthCheck.{field}"), e),
                            Ok(d) if d.is_zero() => c.fail(
                                format!("spec.healthCheck.{field}"),
                                "must be more than zero",
                            ),
                            Ok(_) => {}
                        }
                    }
                }
                if h.path.as_ref().is_some_and(|p| !p.starts_with('/')) {
                    c.fail("spec.healthCheck.path", "must start with '/'");
                }
                for (field, v) in [
                    ("unhealthyThreshold", h.unhealthy_threshold),
                    ("healthyThreshold", h.healthy_threshold),
                ] {
                    if v == Some(0) {
                        c.fail(format!("spec.healthCheck.{field}"), "must be at least 1");
                    }
                }
            }
            for (i, r) in p.spec.rate_limits.iter().enumerate() {
                let f = format!("spec.rateLimits[{i}]");
                if !(r.requests_per_second > 0.0 && r.requests_per_second.is_finite()) {
                    c.fail(format!("{f}.requestsPerSecond"), "must be more than zero");
                }
                if r.burst == Some(0) {
                    c.fail(format!("{f}.burst"), "must be at least 1");
                }
                if let Some(k) = &r.key {
                    if k.header.is_some() == k.identity {
                        c.fail(
                            format!("{f}.key"),
                            "give exactly one of header or identity: true",
                        );
                    }
                    if let Some(h) = &k.header
                        && http::HeaderName::from_bytes(h.as_bytes()).is_err()
                    {
                        c.fail(
                            format!("{f}.key.header"),
                            format!("{h:?} is not a valid header name"),
                        );
                    }
                }
                if p.spec
                    .rate_limits
                    .iter()
                    .filter(|o| o.name == r.name)
                    .count()
                    > 1
                {
                    c.fail(
                        format!("{f}.name"),
                        format!("duplicate rate limit name {:?}", r.name),
                    );
                }
                for (mi, m) in r.matches.iter().enumerate() {
                    if let Some(path) = &m.path
                        && path.kind == PathMatchType::RegularExpression
                        && regex::Regex::new(&path.value).is_err()
                    {
                        c.fail(
                            format!("{f}.matches[{mi}].path.value"),
                            "invalid regular expression",
                        );
                    }
                }
            }
            if let Some(o) = &p.spec.outlier_detection {
                for (field, v) in [
                    ("interval", &o.interval),
                    ("baseEjectionTime", &o.base_ejection_time),
                ] {
                    if let Some(v) = v
                        && let Err(e) = duration::parse(v)
                    {
                        c.fail(format!("spec.outlierDetection.{field}"), e);
                    }
                }
                for (field, v) in [
                    ("failurePercent", o.failure_percent),
                    ("maxEjectionPercent", o.max_ejection_percent),
                ] {
                    if v.is_some_and(|v| v > 100) {
                        c.fail(format!("spec.outlierDetection.{field}"), "must be 0-100");
                    }
                }
                for (field, v) in [
                    ("consecutiveFailures", o.consecutive_failures),
                    ("consecutiveRefusals", o.consecutive_refusals),
                ] {
                    if v == Some(0) {
                        c.fail(
                            format!("spec.outlierDetection.{field}"),
                            "must be at least 1",
                        );
                    }
                }
            }
            if c.errors.0.len() == before {
                match targeted.entry((k.0.clone(), t.name.clone())) {
                    std::collections::btree_map::Entry::Occupied(other) => c.fail(
                        "spec.targetRef",
                        format!(
                            "service {}/{} already has TrafficPolicy {}",
                            k.0,
                            t.name,
                            other.get()
                        ),
                    ),
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(k.1.clone());
                    }
                }
            }
        }
        self.validate_security(errors);
        self.validate_tracing(errors);
    }

    fn validate_tracing(&self, errors: &mut ConfigErrors) {
        let Some((m, t)) = self
            .mesh
            .as_ref()
            .and_then(|m| m.spec.tracing.as_ref().map(|t| (m, t)))
        else {
            return;
        };
        let k = key(&m.metadata);
        let mut c = self.checker(errors, "MeshConfig", &k);
        if let Err(e) = otlp_endpoint(&t.endpoint, t.protocol) {
            c.fail("spec.tracing.endpoint", e);
        }
        if let Some(r) = t.sampling_ratio
            && !(0.0..=1.0).contains(&r)
        {
            c.fail(
                "spec.tracing.samplingRatio",
                format!("{r} is not a share: use 0 (none) to 1 (every trace)"),
            );
        }
    }

    fn validate_proxy(&self, errors: &mut ConfigErrors, k: &Key, p: &Object<ProxySpec>) {
        let mut c = self.checker(errors, "Proxy", k);
        if let Some(w) = &p.spec.workload
            && !self.workloads.contains_key(&(k.0.clone(), w.clone()))
        {
            c.fail(
                "spec.workload",
                format!("workload {w:?} does not exist in namespace {:?}", k.0),
            );
        }
        let mut binds: BTreeMap<SocketAddr, String> = BTreeMap::new();
        let mut bind = |c: &mut Checker<'_>, field: String, s: &str| match s.parse::<SocketAddr>() {
            Ok(a) => {
                if let Some(prev) = binds.insert(a, field.clone()) {
                    c.fail(field, format!("address {a} is already used by {prev}"));
                }
            }
            Err(_) => c.fail(field, format!("{s:?} is not an address:port")),
        };
        if let Some(inb) = &p.spec.inbound {
            bind(&mut c, "spec.inbound.bind".into(), &inb.bind);
            if let Some(a) = &inb.app_address
                && a.parse::<IpAddr>().is_err()
            {
                c.fail(
                    "spec.inbound.appAddress",
                    format!("{a:?} is not an IP address"),
                );
            }
            if inb.ports.is_empty() {
                c.fail(
                    "spec.inbound.ports",
                    "list the application ports mesh traffic may reach",
                );
            }
            if inb.ports.contains(&0) {
                c.fail("spec.inbound.ports", "port must be 1-65535");
            }
        }
        if let Some(hp) = &p.spec.outbound.http_proxy {
            bind(&mut c, "spec.outbound.httpProxy.bind".into(), &hp.bind);
        }
        if let Some(cap) = &p.spec.capture {
            for (field, port) in [
                ("outboundPort", Some(cap.outbound_port)),
                ("inboundPort", Some(cap.inbound_port)),
                ("dnsPort", cap.dns_port),
            ] {
                if port == Some(0) {
                    c.fail(format!("spec.capture.{field}"), "port must be 1-65535");
                }
            }
            bind(
                &mut c,
                "spec.capture.outboundPort".into(),
                &format!("127.0.0.1:{}", cap.outbound_port),
            );
            if cap.outbound_port == cap.inbound_port {
                c.fail(
                    "spec.capture.inboundPort",
                    format!(
                        "port {} is also the outboundPort: the two captures need their own ports",
                        cap.inbound_port
                    ),
                );
            }
            if cap.opaque_ports.contains(&0) {
                c.fail("spec.capture.opaquePorts", "port must be 1-65535");
            }
            if let Some(d) = &cap.detect_timeout {
                match crate::duration::parse(d) {
                    Err(e) => c.fail("spec.capture.detectTimeout", e),
                    Ok(t) if t.is_zero() => {
                        c.fail("spec.capture.detectTimeout", "must be more than zero")
                    }
                    Ok(_) => {}
                }
            }
        }
        let limits = |c: &mut Checker<'_>, field: &str, l: &Option<LimitsSpec>| {
            let Some(l) = l else { return };
            if l.max_request_headers_kb
                .is_some_and(|v| !(1..=8192).contains(&v))
            {
                c.fail(format!("{field}.maxRequestHeadersKb"), "must be 1-8192");
            }
            if l.max_request_headers
                .is_some_and(|v| !(1..=10_000).contains(&v))
            {
                c.fail(format!("{field}.maxRequestHeaders"), "must be 1-10000");
            }
        };
        limits(&mut c, "spec.limits", &p.spec.limits);
        if let Some(inb) = &p.spec.inbound {
            limits(&mut c, "spec.inbound.limits", &inb.limits);
        }
        for (i, u) in p.spec.outbound.upstreams.iter().enumerate() {
            let f = format!("spec.outbound.upstreams[{i}]");
            limits(&mut c, &format!("{f}.limits"), &u.limits);
            bind(&mut c, format!("{f}.bind"), &u.bind);
            let Some(svc) = self.find_service(k.0.as_str(), &u.service) else {
                c.fail(
                    format!("{f}.service"),
                    format!("service {:?} does not exist", u.service),
                );
                continue;
            };
            if let Err(reason) = resolve_port(svc, u.port.as_ref()) {
                c.fail(format!("{f}.port"), reason);
            }
        }
    }

    fn validate_route(&self, errors: &mut ConfigErrors, k: &Key, r: &Object<HttpRouteSpec>) {
        let mut c = self.checker(errors, "HTTPRoute", k);
        if r.spec.parent_refs.is_empty() {
            c.fail(
                "spec.parentRefs",
                "a route needs at least one parent Service",
            );
        }
        for (i, p) in r.spec.parent_refs.iter().enumerate() {
            let f = format!("spec.parentRefs[{i}]");
            if !core_group(p.group.as_deref()) || p.kind.as_deref().is_some_and(|k| k != "Service")
            {
                c.fail(
                    f.clone(),
                    "only Service parents (group \"\", kind Service) are supported in the mesh",
                );
                continue;
            }
            let ns = p.namespace.as_deref().unwrap_or(&k.0);
            match self.services.get(&(ns.to_owned(), p.name.clone())) {
                None => c.fail(
                    format!("{f}.name"),
                    format!("service {ns}/{} does not exist", p.name),
                ),
                Some(svc) => {
                    if let Some(port) = p.port {
                        match svc.spec.ports.iter().find(|sp| sp.port == port) {
                            None => c.fail(
                                format!("{f}.port"),
                                format!("service {ns}/{} has no port {port}", p.name),
                            ),
                            Some(sp) if !sp.protocol.is_http() => c.fail(
                                format!("{f}.port"),
                                format!(
                                    "port {port} of {ns}/{} is TCP; HTTPRoute needs an HTTP port",
                                    p.name
                                ),
                            ),
                            Some(_) => {}
                        }
                    }
                }
            }
        }
        // The HTTP ports of its parents the route serves: a proxy compiles it once
        // for each.
        let mut served: Vec<u16> = Vec::new();
        for p in &r.spec.parent_refs {
            let ns = p.namespace.as_deref().unwrap_or(&k.0);
            if let Some(svc) = self.services.get(&(ns.to_owned(), p.name.clone())) {
                served.extend(
                    svc.spec
                        .ports
                        .iter()
                        .filter(|sp| sp.protocol.is_http() && p.port.is_none_or(|n| n == sp.port))
                        .map(|sp| sp.port),
                );
            }
        }
        served.sort_unstable();
        served.dedup();
        for (ri, rule) in r.spec.rules.iter().enumerate() {
            let f = format!("spec.rules[{ri}]");
            for (mi, m) in rule.matches.iter().enumerate() {
                let mf = format!("{f}.matches[{mi}]");
                if let Some(path) = &m.path {
                    match path.kind {
                        PathMatchType::Exact | PathMatchType::PathPrefix => {
                            if !path.value.starts_with('/') {
                                c.fail(
                                    format!("{mf}.path.value"),
                                    format!("{:?} must start with '/'", path.value),
                                );
                            }
                        }
                        PathMatchType::RegularExpression => {
                            if let Err(e) = regex::Regex::new(&path.value) {
                                c.fail(format!("{mf}.path.value"), regex_problem(&e));
                            }
                        }
                    }
                }
                for (hi, h) in m.headers.iter().enumerate() {
                    if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                        c.fail(
                            format!("{mf}.headers[{hi}].name"),
                            format!("{:?} is not a valid header name", h.name),
                        );
                    }
                    if h.kind == StringMatchType::RegularExpression
                        && let Err(e) = regex::Regex::new(&h.value)
                    {
                        c.fail(format!("{mf}.headers[{hi}].value"), regex_problem(&e));
                    }
                }
                for (qi, q) in m.query_params.iter().enumerate() {
                    if q.name.is_empty() {
                        c.fail(
                            format!("{mf}.queryParams[{qi}].name"),
                            "name must not be empty",
                        );
                    }
                    if q.kind == StringMatchType::RegularExpression
                        && let Err(e) = regex::Regex::new(&q.value)
                    {
                        c.fail(format!("{mf}.queryParams[{qi}].value"), regex_problem(&e));
                    }
                }
                if let Some(method) = &m.method
                    && (http::Method::from_bytes(method.as_bytes()).is_err()
                        || method.bytes().any(|b| b.is_ascii_lowercase()))
                {
                    c.fail(
                        format!("{mf}.method"),
                        format!("{method:?} is not an HTTP method (use upper case, e.g. GET)"),
                    );
                }
            }
            let all_prefix = !rule.matches.is_empty()
                && rule.matches.iter().all(|m| {
                    m.path
                        .as_ref()
                        .is_none_or(|p| p.kind == PathMatchType::PathPrefix)
                });
            for (fi, filter) in rule.filters.iter().enumerate() {
                check_filter(&mut c, &format!("{f}.filters[{fi}]"), filter, all_prefix);
            }
            if !rule.backend_refs.is_empty() && rule.backend_refs.iter().all(|b| b.weight == 0) {
                c.fail(
                    format!("{f}.backendRefs"),
                    "all backend weights are zero: no request could be served",
                );
            }
            for (bi, b) in rule.backend_refs.iter().enumerate() {
                let bf = format!("{f}.backendRefs[{bi}]");
                if !core_group(b.group.as_deref())
                    || b.kind.as_deref().is_some_and(|k| k != "Service")
                {
                    c.fail(bf.clone(), "only Service backends are supported");
                    continue;
                }
                if b.weight > 1_000_000 {
                    c.fail(format!("{bf}.weight"), "weight must be at most 1000000");
                }
                let ns = b.namespace.as_deref().unwrap_or(&k.0);
                if self.services.contains_key(&(ns.to_owned(), b.name.clone())) {
                    // The port on every parent port the route serves, as the proxy
                    // compiles it (a backend without a port takes the parent's).
                    let mut problems: Vec<String> = served
                        .iter()
                        .filter_map(|&pp| crate::compile::backend_port(self, &k.0, b, pp).err())
                        .collect();
                    if served.is_empty() {
                        problems.extend(
                            b.port.and_then(|pp| {
                                crate::compile::backend_port(self, &k.0, b, pp).err()
                            }),
                        );
                    }
                    problems.dedup();
                    for reason in problems {
                        c.fail(format!("{bf}.port"), reason);
                    }
                } else {
                    c.fail(
                        format!("{bf}.name"),
                        format!("service {ns}/{} does not exist", b.name),
                    );
                }
                for (fi, filter) in b.filters.iter().enumerate() {
                    check_filter(&mut c, &format!("{bf}.filters[{fi}]"), filter, all_prefix);
                }
            }
            for (fi, filter) in rule.filters.iter().enumerate() {
                if let Some(m) = &filter.request_mirror {
                    let b = &m.backend_ref;
                    let ns = b.namespace.as_deref().unwrap_or(&k.0);
                    match self.services.get(&(ns.to_owned(), b.name.clone())) {
                        None => c.fail(
                            format!("{f}.filters[{fi}].requestMirror.backendRef.name"),
                            format!("service {ns}/{} does not exist", b.name),
                        ),
                        Some(svc) => {
                            if let Some(port) = b.port
                                && !svc.spec.ports.iter().any(|p| p.port == port)
                            {
                                c.fail(
                                    format!("{f}.filters[{fi}].requestMirror.backendRef.port"),
                                    format!("service {ns}/{} has no port {port}", b.name),
                                );
                            }
                        }
                    }
                }
            }
            if let Some(r) = &rule.retry {
                check_retry(&mut c, &format!("{f}.retry"), r);
            }
            if let Some(t) = &rule.timeouts {
                check_timeouts(&mut c, &format!("{f}.timeouts"), t);
            }
        }
    }
}

/// Checks a `retry` block (of a route rule or a `RoutePolicy`) at field path `f`.
pub(crate) fn check_retry(c: &mut Checker<'_>, f: &str, r: &RetrySpec) {
    for (i, code) in r.codes.iter().flatten().enumerate() {
        if !(100..=599).contains(code) {
            c.fail(
                format!("{f}.codes[{i}]"),
                format!("{code} is not an HTTP status"),
            );
        }
    }
    for (i, g) in r.grpc_codes.iter().enumerate() {
        if crate::resource::grpc_code(g).is_none() {
            c.fail(
                format!("{f}.grpcCodes[{i}]"),
                format!("{g:?} is not a gRPC status name"),
            );
        }
    }
    if let Some(b) = &r.backoff
        && let Err(e) = duration::parse(b)
    {
        c.fail(format!("{f}.backoff"), e);
    }
    if let Some(h) = &r.hedge {
        if h.delay.is_some() == h.percentile.is_some() {
            c.fail(
                format!("{f}.hedge"),
                "give exactly one of delay or percentile",
            );
        }
        if let Some(d) = &h.delay
            && let Err(e) = duration::parse(d)
        {
            c.fail(format!("{f}.hedge.delay"), e);
        }
        if h.percentile.is_some_and(|p| !(50.0..100.0).contains(&p)) {
            c.fail(
                format!("{f}.hedge.percentile"),
                "must be at least 50 and below 100",
            );
        }
    }
    if r.attempts.is_some_and(|a| a > 10) {
        c.fail(format!("{f}.attempts"), "at most 10 retries");
    }
    if let Some(ratio) = r.budget.as_ref().and_then(|b| b.ratio)
        && !(0.0..=1.0).contains(&ratio)
    {
        c.fail(format!("{f}.budget.ratio"), "must be between 0 and 1");
    }
}

/// Checks a `timeouts` block (of a route rule or a `RoutePolicy`) at field path `f`.
pub(crate) fn check_timeouts(c: &mut Checker<'_>, f: &str, t: &HttpRouteTimeouts) {
    let req = t.request.as_deref().map(|s| (s, duration::parse(s)));
    let be = t
        .backend_request
        .as_deref()
        .map(|s| (s, duration::parse(s)));
    if let Some((_, Err(e))) = &req {
        c.fail(format!("{f}.request"), e.clone());
    }
    if let Some((_, Err(e))) = &be {
        c.fail(format!("{f}.backendRequest"), e.clone());
    }
    if let (Some((_, Ok(r))), Some((_, Ok(b)))) = (&req, &be)
        && !r.is_zero()
        && (b.is_zero() || b > r)
    {
        c.fail(
            format!("{f}.backendRequest"),
            "must not exceed timeouts.request",
        );
    }
}

/// One line for a regex error (the regex crate's messages span several lines).
fn regex_problem(e: &regex::Error) -> String {
    let text = e.to_string();
    let last = text.lines().last().unwrap_or("").trim();
    let last = last.strip_prefix("error: ").unwrap_or(last);
    format!("invalid regular expression: {last}")
}

fn core_group(g: Option<&str>) -> bool {
    matches!(g, None | Some("") | Some("core"))
}

pub(crate) fn check_filter(
    c: &mut Checker<'_>,
    f: &str,
    filter: &HttpRouteFilter,
    all_prefix: bool,
) {
    let present = [
        (
            FilterType::RequestHeaderModifier,
            filter.request_header_modifier.is_some(),
            "requestHeaderModifier",
        ),
        (
            FilterType::ResponseHeaderModifier,
            filter.response_header_modifier.is_some(),
            "responseHeaderModifier",
        ),
        (
            FilterType::UrlRewrite,
            filter.url_rewrite.is_some(),
            "urlRewrite",
        ),
        (
            FilterType::RequestMirror,
            filter.request_mirror.is_some(),
            "requestMirror",
        ),
        (FilterType::Fault, filter.fault.is_some(), "fault"),
    ];
    if let Some(m) = &filter.request_mirror
        && m.percent.is_some_and(|p| p > 100)
    {
        c.fail(format!("{f}.requestMirror.percent"), "must be 0-100");
    }
    if let Some(fault) = &filter.fault {
        if fault.abort.is_none() && fault.delay.is_none() {
            c.fail(format!("{f}.fault"), "give abort, delay or both");
        }
        if let Some(a) = &fault.abort {
            if !(0.0..=100.0).contains(&a.percent) {
                c.fail(format!("{f}.fault.abort.percent"), "must be 0-100");
            }
            match (a.http_status, &a.grpc_status) {
                (None, None) => c.fail(
                    format!("{f}.fault.abort"),
                    "give httpStatus, grpcStatus or both",
                ),
                (Some(s), _) if !(200..=599).contains(&s) => c.fail(
                    format!("{f}.fault.abort.httpStatus"),
                    format!("{s} is not an HTTP status (200-599)"),
                ),
                (_, Some(g)) if crate::resource::grpc_code(g).is_none() => c.fail(
                    format!("{f}.fault.abort.grpcStatus"),
                    format!("{g:?} is not a gRPC status name (e.g. UNAVAILABLE)"),
                ),
                _ => {}
            }
        }
        if let Some(d) = &fault.delay {
            if !(0.0..=100.0).contains(&d.percent) {
                c.fail(format!("{f}.fault.delay.percent"), "must be 0-100");
            }
            if let Err(e) = duration::parse(&d.fixed_delay) {
                c.fail(format!("{f}.fault.delay.fixedDelay"), e);
            }
        }
    }
    for (kind, is_set, field) in present {
        if kind == filter.kind && !is_set {
            c.fail(
                format!("{f}.{field}"),
                format!("type {:?} needs {field}", filter.kind),
            );
        }
        if kind != filter.kind && is_set {
            c.fail(
                format!("{f}.{field}"),
                format!("{field} is not allowed with type {:?}", filter.kind),
            );
        }
    }
    for (field, m) in [
        ("requestHeaderModifier", &filter.request_header_modifier),
        ("responseHeaderModifier", &filter.response_header_modifier),
    ] {
        let Some(m) = m else { continue };
        for (list, pairs) in [("set", &m.set), ("add", &m.add)] {
            for (i, p) in pairs.iter().enumerate() {
                if http::HeaderName::from_bytes(p.name.as_bytes()).is_err() {
                    c.fail(
                        format!("{f}.{field}.{list}[{i}].name"),
                        format!("{:?} is not a valid header name", p.name),
                    );
                }
                if http::HeaderValue::from_str(&p.value).is_err() {
                    c.fail(
                        format!("{f}.{field}.{list}[{i}].value"),
                        "not a valid header value",
                    );
                }
            }
        }
        for (i, n) in m.remove.iter().enumerate() {
            if http::HeaderName::from_bytes(n.as_bytes()).is_err() {
                c.fail(
                    format!("{f}.{field}.remove[{i}]"),
                    format!("{n:?} is not a valid header name"),
                );
            }
        }
    }
    if let Some(rw) = &filter.url_rewrite {
        if let Some(h) = &rw.hostname
            && (h.is_empty() || http::uri::Authority::try_from(h.as_str()).is_err())
        {
            c.fail(
                format!("{f}.urlRewrite.hostname"),
                format!("{h:?} is not a valid hostname"),
            );
        }
        if let Some(p) = &rw.path {
            let (value, other, field) = match p.kind {
                PathModifierType::ReplaceFullPath => (
                    &p.replace_full_path,
                    &p.replace_prefix_match,
                    "replaceFullPath",
                ),
                PathModifierType::ReplacePrefixMatch => (
                    &p.replace_prefix_match,
                    &p.replace_full_path,
                    "replacePrefixMatch",
                ),
            };
            match value {
                None => c.fail(
                    format!("{f}.urlRewrite.path.{field}"),
                    format!("type {:?} needs {field}", p.kind),
                ),
                Some(v) if !v.starts_with('/') => c.fail(
                    format!("{f}.urlRewrite.path.{field}"),
                    format!("{v:?} must start with '/'"),
                ),
                Some(_) => {}
            }
            if other.is_some() {
                c.fail(
                    format!("{f}.urlRewrite.path"),
                    format!("only {field} is allowed with type {:?}", p.kind),
                );
            }
            if p.kind == PathModifierType::ReplacePrefixMatch && !all_prefix {
                c.fail(
                    format!("{f}.urlRewrite.path"),
                    "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match",
                );
            }
        }
    }
}

/// Finds a service port by name or number; with none given, the service's only port.
pub fn resolve_port<'a>(
    svc: &'a Object<ServiceSpec>,
    port: Option<&PortRef>,
) -> Result<&'a ServicePort, String> {
    let m = &svc.metadata;
    match port {
        Some(PortRef::Number(n)) => svc
            .spec
            .ports
            .iter()
            .find(|p| p.port == *n)
            .ok_or_else(|| format!("service {}/{} has no port {n}", m.ns(), m.name)),
        Some(PortRef::Name(n)) => svc
            .spec
            .ports
            .iter()
            .find(|p| &p.name == n)
            .ok_or_else(|| format!("service {}/{} has no port named {n:?}", m.ns(), m.name)),
        None => match svc.spec.ports.as_slice() {
            [only] => Ok(only),
            _ => Err(format!(
                "service {}/{} has several ports; name one",
                m.ns(),
                m.name
            )),
        },
    }
}

/// Header names a forwarded claim may not overwrite: the proxy's own, hop-by-hop and
/// framing headers.
const RESERVED_FORWARD_HEADERS: [&str; 10] = [
    "host",
    "x-forwarded-client-cert",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "te",
    "upgrade",
    "keep-alive",
    "proxy-connection",
];

impl Resources {
    /// The Service a policy's `targetRef` names, if it is a valid reference.
    fn check_target(&self, c: &mut Checker<'_>, ns: &str, t: &PolicyTargetRef) {
        if !core_group(t.group.as_deref()) || t.kind.as_deref().is_some_and(|k| k != "Service") {
            c.fail(
                "spec.targetRef",
                "only a Service (group \"\", kind Service) can be targeted",
            );
            return;
        }
        if !self.services.contains_key(&(ns.to_owned(), t.name.clone())) {
            c.fail(
                "spec.targetRef.name",
                format!("service {ns}/{} does not exist", t.name),
            );
        }
    }

    fn validate_security(&self, errors: &mut ConfigErrors) {
        if let Some(m) = &self.mesh {
            let k = key(&m.metadata);
            let mut c = self.checker(errors, "MeshConfig", &k);
            if let Some(r) = &m.spec.virtual_ip_range
                && let Err(e) = crate::vip::Cidr::parse(r)
            {
                c.fail("spec.virtualIPRange", e);
            }
            if let Some(td) = &m.spec.trust_domain
                && !crate::authz::valid_trust_domain(td)
            {
                c.fail(
                    "spec.trustDomain",
                    format!(
                        "{td:?} is not a valid trust domain (lowercase letters, digits, '.', '-', '_')"
                    ),
                );
            }
        }
        let mut defaults: BTreeMap<&str, &str> = BTreeMap::new();
        for (k, p) in &self.authorization_policies {
            let mut c = self.checker(errors, "AuthorizationPolicy", k);
            if let Some(t) = &p.spec.target_ref {
                self.check_target(&mut c, &k.0, t);
                if p.spec.default_action.is_some() {
                    c.fail(
                        "spec.defaultAction",
                        "defaultAction is only allowed on a policy without targetRef (it is the namespace's default)",
                    );
                }
            } else if p.spec.default_action.is_some() {
                match defaults.entry(k.0.as_str()) {
                    std::collections::btree_map::Entry::Occupied(prev) => c.fail(
                        "spec.defaultAction",
                        format!(
                            "namespace {:?} already has its default set by AuthorizationPolicy {}/{}",
                            k.0,
                            k.0,
                            prev.get()
                        ),
                    ),
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(k.1.as_str());
                    }
                }
            }
            if p.spec.rules.is_empty() && p.spec.default_action.is_none() {
                c.fail(
                    "spec.rules",
                    "a policy needs rules (or, without targetRef, a defaultAction); to refuse everything by default use defaultAction: DENY",
                );
            }
            for (ri, rule) in p.spec.rules.iter().enumerate() {
                check_authz_rule(&mut c, &format!("spec.rules[{ri}]"), rule);
            }
        }
        for (k, ra) in &self.request_authentications {
            let mut c = self.checker(errors, "RequestAuthentication", k);
            if let Some(t) = &ra.spec.target_ref {
                self.check_target(&mut c, &k.0, t);
            }
            if ra.spec.jwt_rules.is_empty() {
                c.fail("spec.jwtRules", "list at least one issuer");
            }
            let mut issuers = HashSet::new();
            for (ri, rule) in ra.spec.jwt_rules.iter().enumerate() {
                let f = format!("spec.jwtRules[{ri}]");
                if rule.issuer.is_empty() {
                    c.fail(format!("{f}.issuer"), "the issuer must not be empty");
                } else if !issuers.insert(rule.issuer.as_str()) {
                    c.fail(
                        format!("{f}.issuer"),
                        format!("issuer {:?} is listed twice", rule.issuer),
                    );
                }
                for (ai, a) in rule.audiences.iter().enumerate() {
                    if a.is_empty() {
                        c.fail(
                            format!("{f}.audiences[{ai}]"),
                            "an audience must not be empty",
                        );
                    }
                }
                check_jwks(&mut c, &format!("{f}.jwks"), &rule.jwks);
                for (hi, h) in rule.from_headers.iter().enumerate() {
                    if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                        c.fail(
                            format!("{f}.fromHeaders[{hi}].name"),
                            format!("{:?} is not a valid header name", h.name),
                        );
                    }
                }
                for (fi, fc) in rule.forward_claims.iter().enumerate() {
                    let ff = format!("{f}.forwardClaims[{fi}]");
                    if fc.claim.is_empty() {
                        c.fail(format!("{ff}.claim"), "the claim must not be empty");
                    }
                    match http::HeaderName::from_bytes(fc.header.as_bytes()) {
                        Err(_) => c.fail(
                            format!("{ff}.header"),
                            format!("{:?} is not a valid header name", fc.header),
                        ),
                        Ok(h) => {
                            if h.as_str().starts_with("sinew-")
                                || RESERVED_FORWARD_HEADERS.contains(&h.as_str())
                                || rule
                                    .from_headers
                                    .iter()
                                    .any(|t| t.name.eq_ignore_ascii_case(h.as_str()))
                                || (rule.from_headers.is_empty()
                                    && h == http::header::AUTHORIZATION)
                            {
                                c.fail(
                                    format!("{ff}.header"),
                                    format!(
                                        "{:?} is reserved (proxy, framing or token header)",
                                        fc.header
                                    ),
                                );
                            }
                        }
                    }
                }
                if let Some(skew) = &rule.clock_skew {
                    match duration::parse(skew) {
                        Err(e) => c.fail(format!("{f}.clockSkew"), e),
                        // A long skew turns an expired (or not yet valid) token into
                        // a valid one: bounded like other verifiers' leeway.
                        Ok(d) if d > MAX_CLOCK_SKEW => c.fail(
                            format!("{f}.clockSkew"),
                            format!(
                                "{skew:?} is too long: at most {}s",
                                MAX_CLOCK_SKEW.as_secs()
                            ),
                        ),
                        Ok(_) => {}
                    }
                }
                for (qi, q) in rule.required_claims.iter().enumerate() {
                    if q.name.is_empty() {
                        c.fail(
                            format!("{f}.requiredClaims[{qi}].name"),
                            "the claim must not be empty",
                        );
                    }
                }
            }
        }
    }
}

fn check_authz_rule(c: &mut Checker<'_>, f: &str, rule: &AuthorizationRule) {
    if let Some(from) = &rule.from {
        for (i, p) in from.principals.iter().enumerate() {
            if let Err(e) = crate::authz::parse_spiffe(p) {
                c.fail(format!("{f}.from.principals[{i}]"), e);
            }
        }
        for (i, p) in from.principal_prefixes.iter().enumerate() {
            match p.strip_prefix("spiffe://") {
                Some(rest)
                    if !rest.is_empty()
                        && crate::authz::valid_trust_domain(
                            rest.split('/').next().unwrap_or(""),
                        ) => {}
                _ => c.fail(
                    format!("{f}.from.principalPrefixes[{i}]"),
                    format!("{p:?} is not a SPIFFE id prefix (spiffe://<trust-domain>/...)"),
                ),
            }
        }
        for (i, n) in from.namespaces.iter().enumerate() {
            if !valid_name(n) {
                c.fail(
                    format!("{f}.from.namespaces[{i}]"),
                    format!("{n:?} is not a valid namespace"),
                );
            }
        }
        for (i, r) in from.request_principals.iter().enumerate() {
            if r.is_empty() || (r != "*" && r.trim_end_matches('*').contains('*')) {
                c.fail(
                    format!("{f}.from.requestPrincipals[{i}]"),
                    format!("{r:?}: use \"issuer/subject\", \"*\", or a prefix ending in '*'"),
                );
            }
        }
    }
    if let Some(to) = &rule.to {
        for (i, p) in to.ports.iter().enumerate() {
            if *p == 0 {
                c.fail(format!("{f}.to.ports[{i}]"), "port must be 1-65535");
            }
        }
        for (list, paths) in [("paths", &to.paths), ("pathPrefixes", &to.path_prefixes)] {
            for (i, p) in paths.iter().enumerate() {
                if !p.starts_with('/') {
                    c.fail(
                        format!("{f}.to.{list}[{i}]"),
                        format!("{p:?} must start with '/'"),
                    );
                } else if p.contains('?') || p.contains('#') {
                    c.fail(
                        format!("{f}.to.{list}[{i}]"),
                        format!("{p:?}: a path has no query or fragment"),
                    );
                }
            }
        }
        for (i, m) in to.methods.iter().enumerate() {
            if http::Method::from_bytes(m.as_bytes()).is_err()
                || m.bytes().any(|b| b.is_ascii_lowercase())
            {
                c.fail(
                    format!("{f}.to.methods[{i}]"),
                    format!("{m:?} is not an HTTP method (use upper case, e.g. GET)"),
                );
            }
        }
        for (i, h) in to.headers.iter().enumerate() {
            if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                c.fail(
                    format!("{f}.to.headers[{i}].name"),
                    format!("{:?} is not a valid header name", h.name),
                );
            }
            if http::HeaderValue::from_str(&h.value).is_err() {
                c.fail(
                    format!("{f}.to.headers[{i}].value"),
                    "not a valid header value",
                );
            }
        }
    }
    for (i, w) in rule.when.iter().enumerate() {
        if w.claim.is_empty() {
            c.fail(
                format!("{f}.when[{i}].claim"),
                "the claim must not be empty",
            );
        }
        if w.values.is_empty() {
            c.fail(
                format!("{f}.when[{i}].values"),
                "list at least one accepted value",
            );
        }
    }
}

/// The collector URL spans are sent to, from `MeshConfig.spec.tracing.endpoint`:
/// plain `http://host[:port]` (default port 4317 for gRPC, 4318 for HTTP); an HTTP
/// endpoint without a path gets the standard `/v1/traces`. The reason otherwise.
pub(crate) fn otlp_endpoint(endpoint: &str, protocol: OtlpProtocol) -> Result<String, String> {
    let uri = endpoint
        .parse::<http::Uri>()
        .map_err(|e| format!("{endpoint:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        // The exporter is built without TLS to keep the proxy lean: collectors are
        // reached over a node-local or loopback hop.
        Some("https") => {
            return Err(format!(
                "{endpoint:?}: https is not supported; send to a collector (or agent) reachable over http://"
            ));
        }
        _ => return Err(format!("{endpoint:?} is not an http:// URL")),
    }
    let host = match uri.host() {
        Some(h) if !h.is_empty() => h,
        _ => return Err(format!("{endpoint:?} names no host")),
    };
    if uri.query().is_some() {
        return Err(format!("{endpoint:?}: a query is not allowed"));
    }
    let path = uri.path().trim_end_matches('/');
    let (default_port, path) = match protocol {
        OtlpProtocol::Grpc if !path.is_empty() => {
            return Err(format!(
                "{endpoint:?}: a gRPC endpoint has no path (the service is always opentelemetry.proto.collector.trace.v1.TraceService)"
            ));
        }
        OtlpProtocol::Grpc => (4317, String::new()),
        OtlpProtocol::HttpProtobuf if path.is_empty() => (4318, "/v1/traces".to_owned()),
        OtlpProtocol::HttpProtobuf => (4318, path.to_owned()),
    };
    let port = uri.port_u16().unwrap_or(default_port);
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    Ok(format!("http://{host}:{port}{path}"))
}

/// The longest `clockSkew` a JWT rule may set.
pub const MAX_CLOCK_SKEW: std::time::Duration = std::time::Duration::from_secs(300);

fn check_jwks(c: &mut Checker<'_>, f: &str, j: &JwksSpec) {
    let set = [j.file.is_some(), j.uri.is_some(), j.inline.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if set != 1 {
        c.fail(f.to_owned(), "set exactly one of file, uri, inline");
    }
    if let Some(file) = &j.file
        && file.is_empty()
    {
        c.fail(format!("{f}.file"), "the path must not be empty");
    }
    // Keys fetched over plain HTTP could be swapped by anyone on the path, and with
    // them every token: only https:// (file and inline sources stay local).
    let https = match &j.uri {
        Some(u) => match u.parse::<http::Uri>() {
            Ok(uri)
                if uri.scheme_str() == Some("https")
                    && uri.host().is_some_and(|h| !h.is_empty()) =>
            {
                true
            }
            Ok(uri) if uri.scheme_str() == Some("http") => {
                c.fail(
                    format!("{f}.uri"),
                    format!(
                        "{u:?}: http:// is refused (keys could be tampered with on the way); use https://"
                    ),
                );
                false
            }
            _ => {
                c.fail(format!("{f}.uri"), format!("{u:?} is not an https:// URL"));
                false
            }
        },
        None => false,
    };
    if j.ca_file.is_some() && !https {
        c.fail(format!("{f}.caFile"), "caFile needs an https:// uri");
    }
    if let Some(r) = &j.refresh {
        if j.uri.is_none() {
            c.fail(format!("{f}.refresh"), "refresh needs a uri");
        }
        match duration::parse(r) {
            Err(e) => c.fail(format!("{f}.refresh"), e),
            Ok(d) if d.as_secs() < 1 => {
                c.fail(format!("{f}.refresh"), "refresh must be at least 1s")
            }
            Ok(_) => {}
        }
    }
    if let Some(inline) = &j.inline
        && let Err(e) = crate::authz::public_jwks(inline)
    {
        c.fail(format!("{f}.inline"), e);
    }
}
