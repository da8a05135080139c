//! What one proxy needs: its own `Proxy` document (or one made from its registration),
//! the services it can reach (through its bindings, and transitively through routes),
//! their routes and workloads, and the `MeshConfig`. A proxy with a forward-proxy port
//! can reach anything, so it gets everything.
//!
//! A view is versioned by a hash of its content: the same view has the same version
//! across control-plane restarts, so a reconnecting proxy that already runs it is in
//! sync at once.
//!
//! Every stream computes its proxy's view on every publication, so computing one
//! must cost in proportion to the view, not to the mesh: [`Lookups`], built once per
//! publication, index the documents by what views select them by (a workload by its
//! service, a policy by its target), and a view holds shared entries, not copies.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use sinew_model::resource::{
    CaptureSpec, DEFAULT_NAMESPACE, InboundSpec, Metadata, Object, ProxySpec, Resource,
    ResourceKey, SINEW_API_VERSION,
};

use crate::index::{DocEntry, FNV_OFFSET, MeshState};

/// One proxy's resources, sorted by key, and the version naming them.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// The documents, sorted by key, each once.
    pub entries: Vec<Arc<DocEntry>>,
    /// Content hash of the whole view, as 16 hex digits.
    pub version: String,
}

impl View {
    /// Makes a view of `entries` (in any order; a key given twice is kept once).
    pub fn new(mut entries: Vec<Arc<DocEntry>>) -> View {
        entries.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        entries.dedup_by(|a, b| a.key == b.key);
        View::sorted(entries)
    }

    /// Makes a view of `entries`, already sorted by key with no key twice.
    fn sorted(entries: Vec<Arc<DocEntry>>) -> View {
        // The ids are content hashes already, so combining them takes one multiply
        // each (FxHash's step), not FNV's eight: every view is hashed on every
        // publication, for every proxy.
        let version = entries.iter().fold(FNV_OFFSET, |h, e| {
            (h.rotate_left(5) ^ e.id).wrapping_mul(0x517c_c1b7_2722_0a95)
        });
        View {
            entries,
            version: format!("{version:016x}"),
        }
    }
}

/// The backends a route's request mirrors copy to (rule and backend filters).
fn mirrors(
    r: &Object<sinew_model::resource::HttpRouteSpec>,
) -> impl Iterator<Item = &sinew_model::resource::HttpBackendRef> {
    r.spec.rules.iter().flat_map(|rule| {
        rule.filters
            .iter()
            .chain(rule.backend_refs.iter().flat_map(|b| &b.filters))
            .filter_map(|f| f.request_mirror.as_ref().map(|m| &m.backend_ref))
    })
}

fn svc_key(ns: &str, name: &str) -> ResourceKey {
    ResourceKey {
        kind: "Service".into(),
        namespace: ns.to_owned(),
        name: name.to_owned(),
    }
}

/// Resolves a logical service name (`catalog`, `catalog.shop`, `catalog.shop.svc...`)
/// relative to `ns`: `(namespace, name)`.
fn resolve<'a>(ns: &'a str, name: &'a str) -> (&'a str, &'a str) {
    let mut parts = name.split('.');
    let n = parts.next().unwrap_or(name);
    let namespace = parts.next().unwrap_or(ns);
    (namespace, n)
}

/// A document's position in key order: views gather positions and sort those,
/// rather than comparing keys.
type Ord = u32;

/// A service's number in [`Lookups`]: every service key a publication's documents
/// name (as a Service, a route's parent or backend, a workload's service, a policy's
/// target) has one, so a view gathers services as numbers, not keys. A name no
/// document mentions has none, and nothing could select by it.
type Svc = u32;

/// An HTTPRoute with the services it names.
#[derive(Debug)]
pub struct RouteRefs {
    ord: Ord,
    /// Parents and backends: a chosen route brings them all.
    services: Vec<Svc>,
    /// RoutePolicies that target it: a chosen route brings them too (and only a
    /// chosen one: a policy without its route would not validate at the proxy).
    policies: Vec<Ord>,
}

/// What selects by one service key.
#[derive(Debug)]
struct SvcRefs {
    namespace: String,
    /// Its Service document, if there is one.
    ord: Option<Ord>,
    /// The Service has a selector: it may pick any workload in its namespace.
    selector: bool,
    /// Workloads that name it as their service.
    workloads: Vec<Ord>,
    /// TrafficPolicies that target it.
    traffic_policies: Vec<Ord>,
    /// Routes (indexes into [`Lookups::routes`]) with it as a parent.
    routes: Vec<u32>,
}

/// Indexes over one publication's documents, for computing views.
#[derive(Debug, Default)]
pub struct Lookups {
    /// Every document, in key order: an [`Ord`] indexes it.
    all: Vec<Arc<DocEntry>>,
    /// The MeshConfig every proxy gets: the stored one (or a default) with the
    /// control plane's trust domain.
    mesh: Option<Arc<DocEntry>>,
    routes: Vec<RouteRefs>,
    /// Service keys by number.
    svcs: Vec<SvcRefs>,
    /// Service numbers by namespace, then name.
    svc_numbers: HashMap<String, HashMap<String, Svc>>,
    /// Workloads by namespace (a Service with a selector may pick any of them), each
    /// with the service it names: that Service comes with it, or the proxy would
    /// refuse the Workload as naming a service that does not exist.
    workloads_by_namespace: HashMap<String, Vec<(Ord, Option<Svc>)>>,
    /// AuthorizationPolicies and RequestAuthentications by namespace, with the
    /// Service they target (`None`: the whole namespace).
    inbound_policies: HashMap<String, Vec<(Option<Svc>, Ord)>>,
}

impl Lookups {
    /// Indexes `docs`.
    pub fn build(docs: &BTreeMap<ResourceKey, Arc<DocEntry>>, trust_domain: &str) -> Lookups {
        let mut l = Lookups {
            all: docs.values().cloned().collect(),
            ..Lookups::default()
        };
        allocate_vips(&mut l.all);
        let all = std::mem::take(&mut l.all);
        let mut mesh = None;
        // RoutePolicies by the (namespace, name) of the route they target.
        let mut route_policies: HashMap<(String, String), Vec<Ord>> = HashMap::new();
        for (i, e) in all.iter().enumerate() {
            let ord = i as Ord;
            match &e.resource {
                Resource::MeshConfig(m) => {
                    if mesh.is_none() {
                        mesh = Some(m.clone());
                    }
                }
                Resource::HttpRoute(r) => {
                    let rns = r.metadata.ns();
                    let route = l.routes.len() as u32;
                    let mut services = Vec::new();
                    for p in &r.spec.parent_refs {
                        let s = l.svc(p.namespace.as_deref().unwrap_or(rns), &p.name);
                        l.svcs[s as usize].routes.push(route);
                        services.push(s);
                    }
                    for b in r.spec.rules.iter().flat_map(|rule| &rule.backend_refs) {
                        services.push(l.svc(b.namespace.as_deref().unwrap_or(rns), &b.name));
                    }
                    // Mirrors' services too: the proxy checks they exist, and sends
                    // the copies to their endpoints.
                    for m in mirrors(r) {
                        services.push(l.svc(m.namespace.as_deref().unwrap_or(rns), &m.name));
                    }
                    l.routes.push(RouteRefs {
                        ord,
                        services,
                        policies: Vec::new(),
                    });
                }
                Resource::Workload(w) => {
                    let ns = w.metadata.ns();
                    let svc = w.spec.service.as_ref().map(|s| l.svc(ns, s));
                    if let Some(s) = svc {
                        l.svcs[s as usize].workloads.push(ord);
                    }
                    l.workloads_by_namespace
                        .entry(ns.to_owned())
                        .or_default()
                        .push((ord, svc));
                }
                Resource::TrafficPolicy(p) => {
                    let s = l.svc(p.metadata.ns(), &p.spec.target_ref.name);
                    l.svcs[s as usize].traffic_policies.push(ord);
                }
                Resource::AuthorizationPolicy(p) => {
                    let ns = p.metadata.ns();
                    let target = p.spec.target_ref.as_ref().map(|t| l.svc(ns, &t.name));
                    l.inbound_policies
                        .entry(ns.to_owned())
                        .or_default()
                        .push((target, ord));
                }
                Resource::RequestAuthentication(p) => {
                    let ns = p.metadata.ns();
                    let target = p.spec.target_ref.as_ref().map(|t| l.svc(ns, &t.name));
                    l.inbound_policies
                        .entry(ns.to_owned())
                        .or_default()
                        .push((target, ord));
                }
                Resource::Service(s) => {
                    let n = l.svc(&e.key.namespace, &e.key.name) as usize;
                    l.svcs[n].ord = Some(ord);
                    l.svcs[n].selector = s.spec.selector.is_some();
                }
                Resource::RoutePolicy(p) => {
                    route_policies
                        .entry((p.metadata.ns().to_owned(), p.spec.target_ref.route_name()))
                        .or_default()
                        .push(ord);
                }
                Resource::Proxy(_) => {}
            }
        }
        if !route_policies.is_empty() {
            for r in &mut l.routes {
                let key = &all[r.ord as usize].key;
                if let Some(ps) = route_policies.remove(&(key.namespace.clone(), key.name.clone()))
                {
                    r.policies = ps;
                }
            }
        }
        l.all = all;
        // The mesh's trust domain is the CA's: every proxy computes peer identities in it.
        let mut mesh = mesh.unwrap_or_else(|| Object {
            api_version: SINEW_API_VERSION.to_owned(),
            kind: "MeshConfig".to_owned(),
            metadata: Metadata {
                name: "mesh".to_owned(),
                namespace: Some(DEFAULT_NAMESPACE.to_owned()),
                ..Metadata::default()
            },
            spec: Default::default(),
        });
        mesh.spec.trust_domain = Some(trust_domain.to_owned());
        l.mesh = Some(Arc::new(DocEntry::new(Resource::MeshConfig(mesh), "", 0)));
        l
    }

    /// The number of the service `namespace/name`, given one if it has none yet.
    fn svc(&mut self, namespace: &str, name: &str) -> Svc {
        if let Some(n) = self.svc_number(namespace, name) {
            return n;
        }
        let n = self.svcs.len() as Svc;
        self.svc_numbers
            .entry(namespace.to_owned())
            .or_default()
            .insert(name.to_owned(), n);
        self.svcs.push(SvcRefs {
            namespace: namespace.to_owned(),
            ord: None,
            selector: false,
            workloads: Vec::new(),
            traffic_policies: Vec::new(),
            routes: Vec::new(),
        });
        n
    }

    /// The number of the service `namespace/name`, if any document names it.
    fn svc_number(&self, namespace: &str, name: &str) -> Option<Svc> {
        self.svc_numbers.get(namespace)?.get(name).copied()
    }
}

/// Gives every Service without `spec.virtualIP`/`virtualIPs` (e.g. a Kubernetes
/// Service's ClusterIPs) one from the mesh's range
/// (`MeshConfig.spec.virtualIPRange`, default `240.240.0.0/16`), in the
/// documents proxies get: deterministic (a hash of the service's key, collisions
/// moved to the next free address), so a service keeps its address across
/// publications and control-plane restarts. Explicit addresses are never handed out.
///
/// A proxy learns it captures only when it connects, so every publication allocates;
/// the documents made are kept (by the original's id and the address) so a
/// publication re-encodes only the services that changed.
fn allocate_vips(all: &mut [Arc<DocEntry>]) {
    use sinew_model::vip::{Cidr, DEFAULT_VIP_RANGE, allocate};
    type Made = HashMap<(u64, std::net::IpAddr), Arc<DocEntry>>;
    static MADE: std::sync::OnceLock<std::sync::Mutex<Made>> = std::sync::OnceLock::new();
    let range = all
        .iter()
        .find_map(|e| match &e.resource {
            Resource::MeshConfig(m) => m.spec.virtual_ip_range.as_ref().map(|r| r.value()),
            _ => None,
        })
        .map_or_else(|| Cidr::parse(DEFAULT_VIP_RANGE), Ok);
    let Ok(range) = range else {
        tracing::warn!(
            range = DEFAULT_VIP_RANGE,
            "the default virtual IP range is not a CIDR; no virtual IPs allocated"
        );
        return;
    };
    let mut wanted = BTreeSet::new();
    let mut taken = BTreeSet::new();
    for e in all.iter() {
        if let Resource::Service(s) = &e.resource {
            if s.spec.names_virtual_ips() {
                taken.extend(s.spec.virtual_ip_list().map(|v| v.value()));
            } else {
                wanted.insert(format!("{}.{}", s.metadata.name, s.metadata.ns()));
            }
        }
    }
    if wanted.is_empty() {
        return;
    }
    let given = allocate(range, &wanted, &taken);
    let mut made = MADE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut kept: Made = HashMap::with_capacity(given.len());
    for e in all.iter_mut() {
        let Resource::Service(s) = &e.resource else {
            continue;
        };
        if s.spec.names_virtual_ips() {
            continue;
        }
        let key = format!("{}.{}", s.metadata.name, s.metadata.ns());
        match given.get(&key) {
            Some(Some(ip)) => {
                let id = (e.id, *ip);
                let entry = made.remove(&id).unwrap_or_else(|| {
                    let mut s = s.clone();
                    s.spec.virtual_ip = Some((*ip).into());
                    Arc::new(DocEntry::new(Resource::Service(s), &e.source, e.revision))
                });
                kept.insert(id, entry.clone());
                *e = entry;
            }
            _ => tracing::warn!(service = %key, %range, "no virtual IP left in the range"),
        }
    }
    // Only this publication's documents stay, so the cache never outgrows the mesh.
    // (Control planes sharing a process, as in tests, evict each other's: a smaller
    // saving, never a wrong document, as entries are keyed by content.)
    *made = kept;
}

/// The proxy's `Proxy` document: stored if there is one, else made from nothing; in
/// both cases an absent `inbound` is derived from the proxy's registration (its
/// sidecar port, and the workload's ports as the application ports), or, for a proxy
/// that did not register, from the Workload named like it (e.g. a Kubernetes Pod's).
///
/// A proxy that says its traffic is captured (`capture`, from its Hello) gets that
/// `spec.capture` unless the stored document has its own.
fn proxy_document(
    state: &MeshState,
    ns: &str,
    name: &str,
    capture: Option<&CaptureSpec>,
) -> Arc<DocEntry> {
    let key = ResourceKey {
        kind: "Proxy".into(),
        namespace: ns.to_owned(),
        name: name.to_owned(),
    };
    let stored = state.docs.get(&key);
    let derive_from = stored
        .is_none_or(|e| matches!(&e.resource, Resource::Proxy(p) if p.spec.inbound.is_none()))
        .then(|| {
            state
                .registrations
                .get(&format!("{ns}/{name}"))
                .map(|reg| &reg.workload)
                .or_else(|| {
                    match state.docs.get(&ResourceKey {
                        kind: "Workload".into(),
                        namespace: ns.to_owned(),
                        name: name.to_owned(),
                    }) {
                        Some(e) => match &e.resource {
                            Resource::Workload(w) => Some(w),
                            _ => None,
                        },
                        None => None,
                    }
                })
        })
        .flatten()
        .filter(|w| w.spec.sidecar.is_some());
    let add_capture = capture.filter(|_| {
        stored.is_none_or(|e| matches!(&e.resource, Resource::Proxy(p) if p.spec.capture.is_none()))
    });
    if let (Some(e), None, None) = (stored, derive_from, add_capture)
        && matches!(e.resource, Resource::Proxy(_))
    {
        // The common case: the stored document as it is, shared.
        return e.clone();
    }
    let mut proxy = match stored.map(|e| &e.resource) {
        Some(Resource::Proxy(p)) => p.clone(),
        _ => Object {
            api_version: SINEW_API_VERSION.to_owned(),
            kind: "Proxy".to_owned(),
            metadata: Metadata {
                name: name.to_owned(),
                namespace: Some(ns.to_owned()),
                ..Metadata::default()
            },
            spec: ProxySpec::default(),
        },
    };
    if let Some(workload) = derive_from
        && let Some(sc) = &workload.spec.sidecar
    {
        let w = &workload.spec;
        let mut ports: Vec<u16> = w.ports.values().copied().collect();
        ports.sort_unstable();
        ports.dedup();
        proxy.spec.inbound = Some(InboundSpec {
            bind: std::net::SocketAddr::new(w.address.value(), sc.port).into(),
            app_address: None,
            ports,
            limits: None,
        });
    }
    if let Some(c) = add_capture {
        proxy.spec.capture = Some(c.clone());
    }
    Arc::new(DocEntry::new(Resource::Proxy(proxy), "", 0))
}

/// The proxy's own workload and service: its identity and inbound policies use them.
/// As in the model: the proxy's workload is `spec.workload`, else the Workload named
/// like the proxy (which is what a registration creates).
fn own<'a>(
    state: &'a MeshState,
    ns: &str,
    name: &str,
    workload: Option<&str>,
) -> (Option<&'a Arc<DocEntry>>, Option<ResourceKey>) {
    let own_workload = state.docs.get(&ResourceKey {
        kind: "Workload".into(),
        namespace: ns.to_owned(),
        name: workload.unwrap_or(name).to_owned(),
    });
    let own_service = own_workload
        .and_then(|e| match &e.resource {
            Resource::Workload(w) => w.spec.service.as_deref(),
            _ => None,
        })
        .map(|s| svc_key(ns, s));
    (own_workload, own_service)
}

/// The Service whose workload the proxy `namespace/name` serves, if any.
pub fn own_service(state: &MeshState, proxy: &str) -> Option<ResourceKey> {
    let (ns, name) = proxy.split_once('/').unwrap_or((DEFAULT_NAMESPACE, proxy));
    let workload = match state.docs.get(&ResourceKey {
        kind: "Proxy".into(),
        namespace: ns.to_owned(),
        name: name.to_owned(),
    }) {
        Some(e) => match &e.resource {
            Resource::Proxy(p) => p.spec.workload.clone(),
            _ => None,
        },
        None => None,
    };
    own(state, ns, name, workload.as_deref()).1
}

/// Computes the view of the proxy `namespace/name`.
pub fn compute(state: &MeshState, proxy: &str) -> View {
    compute_with(state, proxy, None)
}

/// Computes the view of the proxy `namespace/name`, whose traffic is captured when
/// it says so (`capture`, from its Hello).
pub fn compute_with(state: &MeshState, proxy: &str, capture: Option<&CaptureSpec>) -> View {
    let (ns, name) = proxy.split_once('/').unwrap_or((DEFAULT_NAMESPACE, proxy));
    let proxy_entry = proxy_document(state, ns, name, capture);
    let Resource::Proxy(p) = &proxy_entry.resource else {
        return View::default();
    };
    // A forward proxy or a capturing sidecar can reach anything.
    let everything = p.spec.outbound.http_proxy.is_some() || p.spec.capture.is_some();
    let (own_workload, own_service) = own(state, ns, name, p.spec.workload.as_deref());
    let l = &state.lookups;

    // Services reachable from the bindings, closed over routes (a route brings its
    // parents and backends, so the proxy can validate it): a walk from the bound
    // services through the routes they parent.
    let mut in_view = vec![false; l.svcs.len()];
    let mut chosen = vec![false; l.routes.len()];
    let mut walk: Vec<Svc> = Vec::new();
    let upstreams = p
        .spec
        .outbound
        .upstreams
        .iter()
        .map(|u| resolve(ns, &u.service));
    let own = own_service
        .as_ref()
        .map(|k| (k.namespace.as_str(), k.name.as_str()));
    for (sns, sname) in upstreams.chain(own) {
        if let Some(n) = l.svc_number(sns, sname)
            && !std::mem::replace(&mut in_view[n as usize], true)
        {
            walk.push(n);
        }
    }
    let mut choose = |r: usize, in_view: &mut Vec<bool>, walk: &mut Vec<Svc>| {
        if !std::mem::replace(&mut chosen[r], true) {
            for &n in &l.routes[r].services {
                if !std::mem::replace(&mut in_view[n as usize], true) {
                    walk.push(n);
                }
            }
        }
    };
    if everything {
        for r in 0..l.routes.len() {
            choose(r, &mut in_view, &mut walk);
        }
    }
    // `walk` keeps every service it reaches: after it, it is the view's services.
    let mut next = 0;
    while let Some(&n) = walk.get(next) {
        next += 1;
        for &r in &l.svcs[n as usize].routes {
            choose(r as usize, &mut in_view, &mut walk);
        }
    }

    let mut ords: Vec<Ord> = Vec::new();
    ords.extend(own_workload.and_then(|e| l.ord_of(&e.key)));
    ords.extend(
        l.routes
            .iter()
            .zip(&chosen)
            .filter(|(_, c)| **c)
            .flat_map(|(r, _)| std::iter::once(r.ord).chain(r.policies.iter().copied())),
    );
    let mut selector_namespaces = BTreeSet::new();
    for svc in walk.iter().map(|&n| &l.svcs[n as usize]) {
        if let Some(ord) = svc.ord {
            if svc.selector {
                selector_namespaces.insert(svc.namespace.as_str());
            }
            ords.push(ord);
        }
        ords.extend(&svc.workloads);
        ords.extend(&svc.traffic_policies);
    }
    for sns in selector_namespaces {
        if let Some(ws) = l.workloads_by_namespace.get(sns) {
            for &(w, svc) in ws {
                ords.push(w);
                ords.extend(svc.and_then(|s| l.svcs[s as usize].ord));
            }
        }
    }
    if let Some(ps) = l.inbound_policies.get(ns) {
        ords.extend(
            ps.iter()
                .filter(|(target, _)| target.is_none_or(|n| in_view[n as usize]))
                .map(|(_, ord)| *ord),
        );
    }
    if everything {
        // A forward proxy can reach anything: every service, workload and traffic
        // policy.
        ords.extend(l.all.iter().enumerate().filter_map(|(i, e)| {
            matches!(
                e.resource,
                Resource::Service(_) | Resource::Workload(_) | Resource::TrafficPolicy(_)
            )
            .then_some(i as Ord)
        }));
    }
    ords.sort_unstable();
    ords.dedup();
    let mut entries: Vec<Arc<DocEntry>> = Vec::with_capacity(ords.len() + 2);
    entries.extend(ords.into_iter().map(|o| l.all[o as usize].clone()));
    // The proxy's own document and the MeshConfig are made for proxies (a stored
    // Proxy or MeshConfig is never gathered above): each goes where its key sorts.
    for extra in l.mesh.iter().chain([&proxy_entry]) {
        let at = entries.partition_point(|e| e.key < extra.key);
        entries.insert(at, extra.clone());
    }
    View::sorted(entries)
}

impl Lookups {
    /// The position of `key`'s document.
    fn ord_of(&self, key: &ResourceKey) -> Option<Ord> {
        self.all
            .binary_search_by(|e| e.key.cmp(key))
            .ok()
            .map(|i| i as Ord)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{DocEntry, Registration};
    use sinew_model::parse_documents;

    fn state(yaml: &str) -> MeshState {
        let docs = parse_documents("t.yaml", yaml)
            .unwrap_or_else(|e| panic!("the test's documents: {e}"))
            .into_iter()
            .map(|d| {
                let e = DocEntry::new(d.resource, "api", 1);
                (e.key.clone(), Arc::new(e))
            })
            .collect();
        MeshState::new(1, docs, BTreeMap::new(), "cluster.local".into())
    }

    const MESH: &str = r#"
apiVersion: sinew.dev/v1alpha1
kind: Proxy
metadata: {name: web, namespace: shop}
spec: {outbound: {upstreams: [{bind: "127.0.0.1:9001", service: catalog}]}}
---
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {name: catalog, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {name: catalog-v2, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {name: billing, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: sinew.dev/v1alpha1
kind: Workload
metadata: {name: b1, namespace: shop}
spec: {service: billing, address: 10.0.0.9, ports: {http: 80}}
---
apiVersion: sinew.dev/v1alpha1
kind: Workload
metadata: {name: c2, namespace: shop}
spec: {service: catalog-v2, address: 10.0.0.2, ports: {http: 80}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: canary, namespace: shop}
spec:
  parentRefs: [{name: catalog}]
  rules: [{backendRefs: [{name: catalog-v2}]}]
"#;

    fn kinds(v: &View) -> Vec<String> {
        v.entries
            .iter()
            .map(|e| format!("{} {}", e.key.kind, e.key.name))
            .collect()
    }

    fn vips(v: &View) -> Vec<(String, Option<String>)> {
        v.entries
            .iter()
            .filter_map(|e| match &e.resource {
                Resource::Service(s) => Some((
                    s.metadata.name.clone(),
                    s.spec.virtual_ip.as_ref().map(ToString::to_string),
                )),
                _ => None,
            })
            .collect()
    }

    /// A capturing proxy gets every service, each with a virtual IP: the explicit one,
    /// else a stable one from the mesh's range. A proxy whose Hello says it captures
    /// is one too, with that capture in its document.
    #[test]
    fn capturing_proxies_get_every_service_with_a_virtual_ip() {
        let plain = compute(&state(MESH), "shop/web");
        assert_eq!(vips(&plain).len(), 2, "no capture: only what it reaches");
        assert!(
            vips(&plain)
                .iter()
                .all(|(_, ip)| ip.as_deref().is_some_and(|i| i.starts_with("240.240."))),
            "{:?}",
            vips(&plain)
        );
        let hello = CaptureSpec {
            outbound_port: 15001,
            inbound_port: 15006,
            opaque_ports: vec![3306],
            detect_timeout: None,
            dns_port: None,
        };
        let v = compute_with(&state(MESH), "shop/web", Some(&hello));
        assert_eq!(vips(&v).len(), 3, "captured: every service");
        let doc = v
            .entries
            .iter()
            .find_map(|e| match &e.resource {
                Resource::Proxy(p) => p.spec.capture.clone(),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no capture in the proxy's document"));
        assert_eq!(doc, hello);
        let capture = format!(
            "{MESH}---\napiVersion: sinew.dev/v1alpha1\nkind: Proxy\nmetadata: {{name: cap, namespace: ops}}\nspec: {{capture: {{}}}}\n---\napiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {{name: fixed, namespace: ops}}\nspec: {{virtualIP: 10.96.0.7, ports: [{{name: http, port: 80}}]}}\n---\napiVersion: sinew.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec: {{virtualIPRange: 10.200.0.0/24}}\n"
        );
        let v = compute(&state(&capture), "ops/cap");
        let got = vips(&v);
        assert_eq!(got.len(), 4, "every service: {got:?}");
        let range = sinew_model::vip::Cidr::parse("10.200.0.0/24").unwrap();
        for (name, ip) in &got {
            let ip: std::net::IpAddr = ip
                .as_deref()
                .and_then(|i| i.parse().ok())
                .unwrap_or_else(|| panic!("{name} has no virtual IP: {got:?}"));
            if name == "fixed" {
                assert_eq!(ip.to_string(), "10.96.0.7");
            } else {
                assert!(range.contains(ip), "{name}: {ip} outside the range");
            }
        }
        let distinct: BTreeSet<_> = got.iter().map(|(_, ip)| ip.clone()).collect();
        assert_eq!(distinct.len(), 4, "{got:?}");
        assert_eq!(
            vips(&compute(&state(&capture), "ops/cap")),
            got,
            "stable across publications"
        );
    }

    /// A service that lists its virtual IPs (a Kubernetes Service's ClusterIPs) keeps
    /// them, and a headless one (`virtualIPs: []`) gets none allocated.
    #[test]
    fn listed_virtual_ips_are_kept_and_headless_services_get_none() {
        let text = format!(
            "{MESH}---\napiVersion: sinew.dev/v1alpha1\nkind: Proxy\nmetadata: {{name: cap, namespace: ops}}\nspec: {{capture: {{}}}}\n---\napiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {{name: dual, namespace: ops}}\nspec: {{virtualIPs: [10.0.0.5, 'fd00::5'], ports: [{{name: http, port: 80}}]}}\n---\napiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {{name: headless, namespace: ops}}\nspec: {{virtualIPs: [], ports: [{{name: http, port: 80}}]}}\n"
        );
        let v = compute(&state(&text), "ops/cap");
        let spec = |name: &str| {
            v.entries
                .iter()
                .find_map(|e| match &e.resource {
                    Resource::Service(s) if s.metadata.name == name => Some(s.spec.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| panic!("no service {name}"))
        };
        let dual = spec("dual");
        assert_eq!(dual.virtual_ip, None);
        assert_eq!(
            dual.virtual_ips
                .map(|v| v.iter().map(ToString::to_string).collect::<Vec<_>>()),
            Some(vec!["10.0.0.5".to_owned(), "fd00::5".to_owned()])
        );
        let headless = spec("headless");
        assert_eq!(
            (headless.virtual_ip, headless.virtual_ips),
            (None, Some(vec![]))
        );
    }

    #[test]
    fn a_proxy_gets_what_it_can_reach_and_nothing_else() {
        let s = state(MESH);
        let v = compute(&s, "shop/web");
        assert_eq!(
            kinds(&v),
            vec![
                "HTTPRoute canary",
                "MeshConfig mesh",
                "Proxy web",
                "Service catalog",
                "Service catalog-v2",
                "Workload c2",
            ],
            "billing is out of reach; catalog-v2 comes through the route"
        );
        // Same content, same version; a change elsewhere does not change it.
        assert_eq!(compute(&state(MESH), "shop/web").version, v.version);
        let other = MESH.replace("10.0.0.9", "10.0.0.10");
        assert_eq!(compute(&state(&other), "shop/web").version, v.version);
        let mine = MESH.replace("10.0.0.2", "10.0.0.3");
        assert_ne!(compute(&state(&mine), "shop/web").version, v.version);
    }

    #[test]
    fn inbound_is_derived_from_the_registration() {
        let mut s = state(MESH);
        let w = match Resource::from_json(
            "Workload",
            r#"{"apiVersion":"sinew.dev/v1alpha1","kind":"Workload","metadata":{"name":"c1","namespace":"shop"},"spec":{"service":"catalog","address":"127.0.0.1","ports":{"http":8080},"sidecar":{"port":4143}}}"#,
        ) {
            Ok(Resource::Workload(w)) => w,
            other => panic!("{other:?}"),
        };
        s.registrations
            .insert("shop/c1".into(), Registration::new(w));
        let v = compute(&s, "shop/c1");
        let json = &v
            .entries
            .iter()
            .find(|e| e.key.kind == "Proxy" && e.key.name == "c1")
            .unwrap_or_else(|| panic!("no Proxy c1 in {:?}", kinds(&v)))
            .json;
        assert!(
            json.contains(r#""inbound":{"bind":"127.0.0.1:4143","ports":[8080]}"#),
            "{json}"
        );
    }

    /// The view as a plain filter over every document: what `compute` must equal,
    /// however it gets there.
    fn reference(state: &MeshState, proxy: &str) -> Vec<String> {
        let (ns, name) = proxy.split_once('/').unwrap_or((DEFAULT_NAMESPACE, proxy));
        let pd = proxy_document(state, ns, name, None);
        let Resource::Proxy(p) = &pd.resource else {
            return Vec::new();
        };
        let everything = p.spec.outbound.http_proxy.is_some();
        let (own_workload, own_service) = own(state, ns, name, p.spec.workload.as_deref());
        let mut services: BTreeSet<ResourceKey> = p
            .spec
            .outbound
            .upstreams
            .iter()
            .map(|u| {
                let (a, b) = resolve(ns, &u.service);
                svc_key(a, b)
            })
            .collect();
        services.extend(own_service);
        let mut routes = BTreeSet::new();
        loop {
            let before = services.len() + routes.len();
            for (k, e) in &state.docs {
                let Resource::HttpRoute(r) = &e.resource else {
                    continue;
                };
                let rns = r.metadata.ns();
                let parents: Vec<_> = r
                    .spec
                    .parent_refs
                    .iter()
                    .map(|p| svc_key(p.namespace.as_deref().unwrap_or(rns), &p.name))
                    .collect();
                if everything || parents.iter().any(|p| services.contains(p)) {
                    routes.insert(k.clone());
                    services.extend(parents);
                    for b in r.spec.rules.iter().flat_map(|r| &r.backend_refs) {
                        services.insert(svc_key(b.namespace.as_deref().unwrap_or(rns), &b.name));
                    }
                    for m in mirrors(r) {
                        services.insert(svc_key(m.namespace.as_deref().unwrap_or(rns), &m.name));
                    }
                }
            }
            if services.len() + routes.len() == before {
                break;
            }
        }
        let selector_ns: BTreeSet<String> = state
            .docs
            .iter()
            .filter(|(k, e)| {
                services.contains(*k)
                    && matches!(&e.resource, Resource::Service(s) if s.spec.selector.is_some())
            })
            .map(|(k, _)| k.namespace.clone())
            .collect();
        let mut out = vec![
            format!("MeshConfig {DEFAULT_NAMESPACE}/mesh"),
            format!("Proxy {ns}/{name}"),
        ];
        for (k, e) in &state.docs {
            let inbound_target = |t: Option<&String>| {
                e.resource.metadata().ns() == ns
                    && t.is_none_or(|t| services.contains(&svc_key(ns, t)))
            };
            let include = own_workload.is_some_and(|w| &w.key == k)
                || match &e.resource {
                    Resource::MeshConfig(_) | Resource::Proxy(_) => false,
                    Resource::Service(_) => {
                        everything
                            || services.contains(k)
                            || (selector_ns.contains(&k.namespace)
                                && state.docs.values().any(|w| {
                                    matches!(&w.resource, Resource::Workload(w)
                                        if w.metadata.ns() == k.namespace
                                            && w.spec.service.as_deref() == Some(k.name.as_str()))
                                }))
                    }
                    Resource::HttpRoute(_) => routes.contains(k),
                    Resource::Workload(w) => {
                        everything
                            || selector_ns.contains(w.metadata.ns())
                            || w.spec
                                .service
                                .as_ref()
                                .is_some_and(|s| services.contains(&svc_key(w.metadata.ns(), s)))
                    }
                    Resource::AuthorizationPolicy(p) => {
                        inbound_target(p.spec.target_ref.as_ref().map(|t| &t.name))
                    }
                    Resource::RequestAuthentication(p) => {
                        inbound_target(p.spec.target_ref.as_ref().map(|t| &t.name))
                    }
                    Resource::TrafficPolicy(p) => {
                        everything
                            || services.contains(&svc_key(p.metadata.ns(), &p.spec.target_ref.name))
                    }
                    Resource::RoutePolicy(p) => routes.contains(&ResourceKey {
                        kind: "HTTPRoute".into(),
                        namespace: p.metadata.ns().to_owned(),
                        name: p.spec.target_ref.route_name(),
                    }),
                };
            if include {
                out.push(format!("{} {}/{}", k.kind, k.namespace, k.name));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn the_indexed_view_equals_a_filter_over_every_document() {
        // Three namespaces; services reached directly, through route chains (a → b →
        // c), by selector and by nothing; policies targeted and namespace-wide; a
        // forward proxy that reaches everything; a proxy that serves a workload.
        let mut yaml = String::new();
        for ns in ["shop", "pay", "ops"] {
            for (svc, selector) in [("a", false), ("b", false), ("c", true), ("d", false)] {
                let sel = if selector { ", selector: {app: x}" } else { "" };
                yaml += &format!(
                    "---\napiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {{name: {svc}, namespace: {ns}}}\nspec: {{ports: [{{name: http, port: 80}}]{sel}}}\n"
                );
                for i in 0..3 {
                    yaml += &format!(
                        "---\napiVersion: sinew.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {svc}-{i}, namespace: {ns}}}\nspec: {{service: {svc}, address: 10.0.0.{i}, ports: {{http: 80}}}}\n"
                    );
                }
                yaml += &format!(
                    "---\napiVersion: sinew.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: tp-{svc}, namespace: {ns}}}\nspec: {{targetRef: {{kind: Service, name: {svc}}}, outlierDetection: {{consecutiveFailures: 3}}}}\n"
                );
            }
            yaml += &format!(
                "---\napiVersion: sinew.dev/v1alpha1\nkind: Workload\nmetadata: {{name: loose, namespace: {ns}}}\nspec: {{address: 10.0.1.1, ports: {{http: 80}}}}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: a-to-b, namespace: {ns}}}\nspec: {{parentRefs: [{{name: a}}], rules: [{{backendRefs: [{{name: b}}], filters: [{{type: RequestMirror, requestMirror: {{backendRef: {{name: d}}}}}}]}}]}}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: b-to-c, namespace: {ns}}}\nspec: {{parentRefs: [{{name: b}}], rules: [{{backendRefs: [{{name: c, namespace: pay}}]}}]}}\n---\napiVersion: sinew.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: all, namespace: {ns}}}\nspec: {{action: ALLOW, rules: [{{from: {{namespaces: [{ns}]}}}}]}}\n---\napiVersion: sinew.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: only-d, namespace: {ns}}}\nspec: {{targetRef: {{kind: Service, name: d}}, action: ALLOW, rules: [{{from: {{namespaces: [{ns}]}}}}]}}\n"
            );
            // RoutePolicies travel with the route they target.
            yaml += &format!(
                "---\napiVersion: sinew.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: rp-b-to-c, namespace: {ns}}}\nspec: {{targetRef: {{kind: HTTPRoute, name: b-to-c}}, retry: {{attempts: 1}}}}\n"
            );
        }
        // A mirror to a service nothing else brings.
        yaml += "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: copy, namespace: shop}\nspec: {parentRefs: [{name: a}], rules: [{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: d, namespace: ops, port: 80}}}]}]}\n";
        yaml += "---\napiVersion: sinew.dev/v1alpha1\nkind: Proxy\nmetadata: {name: web, namespace: shop}\nspec: {outbound: {upstreams: [{bind: \"127.0.0.1:9001\", service: a}]}}\n---\napiVersion: sinew.dev/v1alpha1\nkind: Proxy\nmetadata: {name: fwd, namespace: ops}\nspec: {outbound: {httpProxy: {bind: \"127.0.0.1:9002\"}}}\n---\napiVersion: sinew.dev/v1alpha1\nkind: Proxy\nmetadata: {name: d-0, namespace: pay}\nspec: {outbound: {upstreams: [{bind: \"127.0.0.1:9003\", service: b.shop}]}}\n";
        let s = state(&yaml);
        for proxy in ["shop/web", "ops/fwd", "pay/d-0", "shop/nobody", "ops/b-1"] {
            let v = compute(&s, proxy);
            let got: Vec<String> = v
                .entries
                .iter()
                .map(|e| format!("{} {}/{}", e.key.kind, e.key.namespace, e.key.name))
                .collect();
            let mut sorted = got.clone();
            sorted.sort();
            assert_eq!(got, sorted, "{proxy}: entries sorted by key");
            assert_eq!(got, reference(&s, proxy), "{proxy}");
            // Closed over references: the proxy accepts its view as it is.
            let docs = v
                .entries
                .iter()
                .map(|e| sinew_model::load::Document {
                    resource: e.resource.clone(),
                    file: "control-plane".into(),
                    line: 0,
                })
                .collect();
            if let Err(e) = sinew_model::compile::accept(docs, proxy) {
                panic!("{proxy} would refuse its view: {e}");
            }
            assert_eq!(
                v.version,
                View::new(v.entries.clone()).version,
                "{proxy}: the version is the entries' hash"
            );
        }
        // The shapes differ: the test is not comparing empty views.
        let sizes: Vec<usize> = ["shop/web", "ops/fwd", "shop/nobody"]
            .iter()
            .map(|p| compute(&s, p).entries.len())
            .collect();
        assert!(sizes[1] > sizes[0] && sizes[0] > sizes[2], "{sizes:?}");
    }
}
