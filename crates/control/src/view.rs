//! What one proxy needs: its own `Proxy` document (or one made from its registration),
//! the services it can reach (through its bindings, and transitively through routes),
//! their routes and workloads, and the `MeshConfig`. A proxy with a forward-proxy port
//! can reach anything, so it gets everything.
//!
//! A view is versioned by a hash of its content: the same view has the same version
//! across control-plane restarts, so a reconnecting proxy that already runs it is in
//! sync at once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use sinew_model::resource::{
    DEFAULT_NAMESPACE, InboundSpec, Metadata, Object, ProxySpec, Resource, ResourceKey,
    SINEW_API_VERSION,
};

use crate::index::{DocEntry, FNV_OFFSET, MeshState, fnv64};

/// One proxy's resources, by key, and the version naming them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    /// Resources with their JSON and content hash.
    pub resources: BTreeMap<ResourceKey, (Arc<str>, u64)>,
    /// Content hash of the whole view, as 16 hex digits.
    pub version: String,
}

fn svc_key(ns: &str, name: &str) -> ResourceKey {
    ResourceKey {
        kind: "Service".into(),
        namespace: ns.to_owned(),
        name: name.to_owned(),
    }
}

/// Resolves a logical service name (`catalog`, `catalog.shop`, `catalog.shop.svc...`)
/// relative to `ns`.
fn resolve(ns: &str, name: &str) -> (String, String) {
    let mut parts = name.split('.');
    let n = parts.next().unwrap_or(name);
    let namespace = parts.next().unwrap_or(ns);
    (namespace.to_owned(), n.to_owned())
}

/// The proxy's `Proxy` document: stored if there is one, else made from nothing; in
/// both cases an absent `inbound` is derived from the proxy's registration (its
/// sidecar port, and the workload's ports as the application ports).
fn proxy_document(state: &MeshState, ns: &str, name: &str) -> Resource {
    let key = ResourceKey {
        kind: "Proxy".into(),
        namespace: ns.to_owned(),
        name: name.to_owned(),
    };
    let mut proxy = match state.docs.get(&key).map(|e| &e.resource) {
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
    if proxy.spec.inbound.is_none()
        && let Some(reg) = state.registrations.get(&format!("{ns}/{name}"))
    {
        let w = &reg.workload.spec;
        if let Some(sc) = &w.sidecar {
            let mut ports: Vec<u16> = w.ports.values().copied().collect();
            ports.sort_unstable();
            ports.dedup();
            proxy.spec.inbound = Some(InboundSpec {
                bind: std::net::SocketAddr::new(
                    w.address
                        .parse()
                        .unwrap_or(std::net::Ipv4Addr::LOCALHOST.into()),
                    sc.port,
                )
                .to_string(),
                app_address: None,
                ports,
            });
        }
    }
    Resource::Proxy(proxy)
}

/// The proxy's own workload and service: its identity and inbound policies use them.
/// As in the model: the proxy's workload is `spec.workload`, else the Workload named
/// like the proxy (which is what a registration creates).
fn own(
    state: &MeshState,
    ns: &str,
    name: &str,
    workload: Option<&str>,
) -> (Option<ResourceKey>, Option<ResourceKey>) {
    let own_workload = Some(ResourceKey {
        kind: "Workload".into(),
        namespace: ns.to_owned(),
        name: workload.unwrap_or(name).to_owned(),
    })
    .filter(|k| state.docs.contains_key(k));
    let own_service = own_workload
        .as_ref()
        .and_then(|k| state.docs.get(k))
        .and_then(|e| match &e.resource {
            Resource::Workload(w) => w.spec.service.clone(),
            _ => None,
        })
        .map(|s| svc_key(ns, &s));
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
    let (ns, name) = proxy.split_once('/').unwrap_or((DEFAULT_NAMESPACE, proxy));
    let proxy_doc = proxy_document(state, ns, name);
    let Resource::Proxy(p) = &proxy_doc else {
        return View::default();
    };
    let everything = p.spec.outbound.http_proxy.is_some();
    let (own_workload, own_service) = own(state, ns, name, p.spec.workload.as_deref());

    // Services reachable from the bindings, closed over routes (a route brings its
    // parents and backends, so the proxy can validate it).
    let mut services: BTreeSet<ResourceKey> = p
        .spec
        .outbound
        .upstreams
        .iter()
        .map(|u| {
            let (sns, sname) = resolve(ns, &u.service);
            svc_key(&sns, &sname)
        })
        .collect();
    services.extend(own_service.clone());
    let routes: Vec<(&ResourceKey, &Arc<DocEntry>)> = state
        .docs
        .iter()
        .filter(|(k, _)| k.kind == "HTTPRoute")
        .collect();
    let mut chosen_routes = BTreeSet::new();
    loop {
        let before = services.len() + chosen_routes.len();
        for (k, e) in &routes {
            let Resource::HttpRoute(r) = &e.resource else {
                continue;
            };
            let rns = r.metadata.ns();
            let parents: Vec<ResourceKey> = r
                .spec
                .parent_refs
                .iter()
                .map(|p| svc_key(p.namespace.as_deref().unwrap_or(rns), &p.name))
                .collect();
            if everything || parents.iter().any(|p| services.contains(p)) {
                chosen_routes.insert((*k).clone());
                services.extend(parents);
                for rule in &r.spec.rules {
                    for b in &rule.backend_refs {
                        services.insert(svc_key(b.namespace.as_deref().unwrap_or(rns), &b.name));
                    }
                }
            }
        }
        if services.len() + chosen_routes.len() == before {
            break;
        }
    }
    let selector_namespaces: BTreeSet<&str> = state
        .docs
        .iter()
        .filter(|(k, _)| services.contains(*k))
        .filter_map(|(_, e)| match &e.resource {
            Resource::Service(s) if s.spec.selector.is_some() => Some(s.metadata.ns()),
            _ => None,
        })
        .collect();

    let mut resources = BTreeMap::new();
    // The mesh's trust domain is the CA's: every proxy computes peer identities in it.
    let mesh = state
        .docs
        .values()
        .find_map(|e| match &e.resource {
            Resource::MeshConfig(m) => Some(m.clone()),
            _ => None,
        })
        .unwrap_or_else(|| Object {
            api_version: SINEW_API_VERSION.to_owned(),
            kind: "MeshConfig".to_owned(),
            metadata: Metadata {
                name: "mesh".to_owned(),
                namespace: Some(DEFAULT_NAMESPACE.to_owned()),
                ..Metadata::default()
            },
            spec: Default::default(),
        });
    let mut mesh = mesh;
    mesh.spec.trust_domain = Some(state.trust_domain.clone());
    let mesh = Resource::MeshConfig(mesh);
    let json = mesh.to_json();
    let hash = fnv64(FNV_OFFSET, json.as_bytes());
    resources.insert(mesh.key(), (Arc::<str>::from(json), hash));
    let json = proxy_doc.to_json();
    let hash = fnv64(FNV_OFFSET, json.as_bytes());
    resources.insert(proxy_doc.key(), (Arc::<str>::from(json), hash));
    for (k, e) in &state.docs {
        let include = match &e.resource {
            Resource::MeshConfig(_) => false, // added above, with the trust domain
            Resource::Service(_) => everything || services.contains(k),
            Resource::HttpRoute(_) => chosen_routes.contains(k),
            Resource::Workload(w) => {
                everything
                    || selector_namespaces.contains(w.metadata.ns())
                    || w.spec
                        .service
                        .as_ref()
                        .is_some_and(|s| services.contains(&svc_key(w.metadata.ns(), s)))
            }
            Resource::Proxy(_) => false,
            Resource::AuthorizationPolicy(p) => {
                p.metadata.ns() == ns
                    && p.spec
                        .target_ref
                        .as_ref()
                        .is_none_or(|t| services.contains(&svc_key(ns, &t.name)))
            }
            Resource::TrafficPolicy(p) => {
                everything || services.contains(&svc_key(p.metadata.ns(), &p.spec.target_ref.name))
            }
            Resource::RequestAuthentication(p) => {
                p.metadata.ns() == ns
                    && p.spec
                        .target_ref
                        .as_ref()
                        .is_none_or(|t| services.contains(&svc_key(ns, &t.name)))
            }
        } || own_workload.as_ref() == Some(k);
        if include {
            resources.insert(k.clone(), (e.json.clone(), e.hash));
        }
    }
    let mut h = FNV_OFFSET;
    for (k, (_, hash)) in &resources {
        for part in [&k.kind, &k.namespace, &k.name] {
            h = fnv64(fnv64(h, part.as_bytes()), &[0]);
        }
        h = fnv64(h, &hash.to_le_bytes());
    }
    View {
        resources,
        version: format!("{h:016x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{DocEntry, Registration};
    use sinew_model::parse_documents;

    fn state(yaml: &str) -> MeshState {
        let mut s = MeshState {
            trust_domain: "cluster.local".into(),
            ..MeshState::default()
        };
        for d in parse_documents("t.yaml", yaml).unwrap_or_else(|e| panic!("{e}")) {
            let json = d.resource.to_json();
            s.docs.insert(
                d.resource.key(),
                Arc::new(DocEntry {
                    hash: fnv64(FNV_OFFSET, json.as_bytes()),
                    json: json.into(),
                    resource: d.resource,
                    source: "api".into(),
                    revision: 1,
                }),
            );
        }
        s
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
        v.resources
            .keys()
            .map(|k| format!("{} {}", k.kind, k.name))
            .collect()
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
            .insert("shop/c1".into(), Registration { workload: w });
        let v = compute(&s, "shop/c1");
        let (json, _) = &v.resources[&ResourceKey {
            kind: "Proxy".into(),
            namespace: "shop".into(),
            name: "c1".into(),
        }];
        assert!(
            json.contains(r#""inbound":{"bind":"127.0.0.1:4143","ports":[8080]}"#),
            "{json}"
        );
    }
}
