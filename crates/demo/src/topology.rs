//! The demo mesh's shape: which instances run, on which loopback ports, with which
//! flags, and the documents that describe them to the control plane.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};

use crate::{DemoInfo, ProxyInfo};

/// The namespace every demo resource lives in.
pub(crate) const NAMESPACE: &str = "demo";
/// Name of the load generator's sidecar (`Proxy` document and `--name`).
pub(crate) const LOADGEN: &str = "loadgen";

/// Every `Service` document, in order.
const SERVICES: [&str; 6] = [
    "frontend",
    "catalog",
    "catalog-v1",
    "catalog-v2",
    "reviews",
    "ratings",
];

/// One instance, before ports are chosen.
struct Spec {
    instance: &'static str,
    service: &'static str,
    version: &'static str,
    latency_ms: u64,
    calls: &'static [&'static str],
}

const SPECS: [Spec; 6] = [
    Spec {
        instance: "frontend-0",
        service: "frontend",
        version: "v1",
        latency_ms: 0,
        calls: &["catalog", "reviews"],
    },
    Spec {
        instance: "catalog-v1-0",
        service: "catalog-v1",
        version: "v1",
        latency_ms: 4,
        calls: &[],
    },
    Spec {
        instance: "catalog-v2-0",
        service: "catalog-v2",
        version: "v2",
        latency_ms: 12,
        calls: &[],
    },
    // A second replica: the tour kills one to show ejection.
    Spec {
        instance: "catalog-v2-1",
        service: "catalog-v2",
        version: "v2",
        latency_ms: 12,
        calls: &[],
    },
    Spec {
        instance: "reviews-0",
        service: "reviews",
        version: "v1",
        latency_ms: 3,
        calls: &["ratings"],
    },
    Spec {
        instance: "ratings-0",
        service: "ratings",
        version: "v1",
        latency_ms: 1,
        calls: &[],
    },
];

/// One service instance: a demo app behind its own sidecar.
#[derive(Debug, Clone)]
pub(crate) struct Instance {
    /// Instance id; also its `Proxy` document's name.
    pub(crate) name: &'static str,
    /// The Service it registers as (e.g. `catalog-v1`).
    pub(crate) service: &'static str,
    pub(crate) version: &'static str,
    pub(crate) latency_ms: u64,
    pub(crate) app_http: SocketAddr,
    pub(crate) app_grpc: SocketAddr,
    pub(crate) admin: SocketAddr,
    pub(crate) inbound: SocketAddr,
    /// Outbound bindings: (service, bind address).
    pub(crate) upstreams: Vec<(&'static str, SocketAddr)>,
}

/// The whole demo, with its ports chosen.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) control_plane: SocketAddr,
    pub(crate) instances: Vec<Instance>,
    pub(crate) loadgen_admin: SocketAddr,
    /// The loadgen sidecar's binding to `frontend:http`: the entry point.
    pub(crate) entry: SocketAddr,
    /// The loadgen sidecar's binding to `frontend:grpc`.
    pub(crate) entry_grpc: SocketAddr,
    /// The loadgen sidecar's binding to `ratings:http`: the call the tour's
    /// authorization act sees denied.
    pub(crate) loadgen_ratings: SocketAddr,
}

/// Hands out addresses from a list of free ports.
struct Ports(std::vec::IntoIter<SocketAddr>);

impl Ports {
    fn next(&mut self) -> std::io::Result<SocketAddr> {
        self.0
            .next()
            .ok_or_else(|| std::io::Error::other("ran out of planned ports"))
    }
}

/// `n` distinct free loopback ports: all are bound at once (so none repeats), then
/// released for the children to bind.
fn free_ports(n: usize) -> std::io::Result<Vec<SocketAddr>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(std::net::TcpListener::local_addr)
        .collect()
}

impl Plan {
    /// Picks free loopback ports for everything.
    pub(crate) fn allocate() -> std::io::Result<Plan> {
        let upstreams: usize = SPECS.iter().map(|s| s.calls.len()).sum();
        let needed = 1 + SPECS.len() * 4 + upstreams + 4;
        let mut ports = Ports(free_ports(needed)?.into_iter());
        let control_plane = ports.next()?;
        let mut instances = Vec::new();
        for spec in &SPECS {
            let app_http = ports.next()?;
            let app_grpc = ports.next()?;
            let admin = ports.next()?;
            let inbound = ports.next()?;
            let upstreams = spec
                .calls
                .iter()
                .map(|&service| ports.next().map(|bind| (service, bind)))
                .collect::<std::io::Result<Vec<_>>>()?;
            instances.push(Instance {
                name: spec.instance,
                service: spec.service,
                version: spec.version,
                latency_ms: spec.latency_ms,
                app_http,
                app_grpc,
                admin,
                inbound,
                upstreams,
            });
        }
        Ok(Plan {
            control_plane,
            instances,
            loadgen_admin: ports.next()?,
            entry: ports.next()?,
            entry_grpc: ports.next()?,
            loadgen_ratings: ports.next()?,
        })
    }

    /// The control plane's URL.
    pub(crate) fn control_plane_url(&self) -> String {
        format!("https://{}", self.control_plane)
    }

    /// The entry point's URL.
    pub(crate) fn entry_url(&self) -> String {
        format!("http://{}", self.entry)
    }

    /// `sinew demo-app` flags for one instance.
    pub(crate) fn app_args(&self, instance: &Instance) -> Vec<String> {
        let mut args = vec![
            "demo-app".to_owned(),
            "--service".to_owned(),
            instance.service.to_owned(),
            "--version".to_owned(),
            instance.version.to_owned(),
            "--instance".to_owned(),
            instance.name.to_owned(),
            "--http".to_owned(),
            instance.app_http.to_string(),
            "--grpc".to_owned(),
            instance.app_grpc.to_string(),
            "--latency-ms".to_owned(),
            instance.latency_ms.to_string(),
        ];
        for (_, bind) in &instance.upstreams {
            args.push("--call".to_owned());
            args.push(format!("http://{bind}"));
        }
        args
    }

    /// `sinew-proxy` flags for one instance's sidecar.
    pub(crate) fn proxy_args(&self, instance: &Instance) -> Vec<String> {
        let mut args = self.proxy_common_args(instance.name, instance.admin);
        args.extend([
            "--service".to_owned(),
            instance.service.to_owned(),
            "--address".to_owned(),
            Ipv4Addr::LOCALHOST.to_string(),
            "--port".to_owned(),
            format!("http={}", instance.app_http.port()),
            "--port".to_owned(),
            format!("grpc={}", instance.app_grpc.port()),
            "--label".to_owned(),
            format!("version={}", instance.version),
            "--inbound".to_owned(),
            instance.inbound.to_string(),
        ]);
        args
    }

    /// `sinew-proxy` flags for the load generator's sidecar (no workload).
    pub(crate) fn loadgen_proxy_args(&self) -> Vec<String> {
        self.proxy_common_args(LOADGEN, self.loadgen_admin)
    }

    fn proxy_common_args(&self, name: &str, admin: SocketAddr) -> Vec<String> {
        vec![
            "--control-plane".to_owned(),
            self.control_plane_url(),
            "--name".to_owned(),
            format!("{NAMESPACE}/{name}"),
            "--admin".to_owned(),
            admin.to_string(),
        ]
    }

    /// The documents to apply: Services, one Proxy per sidecar, the catalog split.
    /// Workloads are not here: each sidecar registers its own.
    pub(crate) fn documents(&self) -> String {
        let mut out = String::new();
        for service in SERVICES {
            let _ = write!(
                out,
                "apiVersion: sinew.dev/v1alpha1\n\
                 kind: Service\n\
                 metadata: {{name: {service}, namespace: {NAMESPACE}}}\n\
                 spec:\n  \
                   ports: [{{name: http, port: 80, protocol: HTTP}}, {{name: grpc, port: 9090, protocol: GRPC}}]\n\
                 ---\n"
            );
        }
        for instance in &self.instances {
            let upstreams: Vec<(&str, SocketAddr, &str)> = instance
                .upstreams
                .iter()
                .map(|&(service, bind)| (service, bind, "http"))
                .collect();
            proxy_document(&mut out, instance.name, &upstreams);
        }
        proxy_document(
            &mut out,
            LOADGEN,
            &[
                ("frontend", self.entry, "http"),
                ("frontend", self.entry_grpc, "grpc"),
                ("ratings", self.loadgen_ratings, "http"),
            ],
        );
        // Routes of their own for reviews and ratings, so that the tour's
        // RoutePolicies (retries, a fault) have something to target.
        for service in ["reviews", "ratings"] {
            let _ = write!(
                out,
                "apiVersion: gateway.networking.k8s.io/v1\n\
                 kind: HTTPRoute\n\
                 metadata: {{name: {service}, namespace: {NAMESPACE}}}\n\
                 spec:\n  \
                   parentRefs: [{{kind: Service, name: {service}}}]\n  \
                   rules:\n    \
                     - backendRefs: [{{name: {service}}}]\n\
                 ---\n"
            );
        }
        out.push_str(&catalog_route(90, 10));
        out
    }

    /// The machine-readable description printed with `--json`.
    pub(crate) fn info(&self, data_dir: &str) -> DemoInfo {
        let mut proxies: Vec<ProxyInfo> = self
            .instances
            .iter()
            .map(|i| ProxyInfo {
                name: i.name.to_owned(),
                service: Some(i.service.to_owned()),
                version: Some(i.version.to_owned()),
                admin: format!("http://{}", i.admin),
                inbound: Some(i.inbound.to_string()),
                app_http: Some(format!("http://{}", i.app_http)),
                app_grpc: Some(format!("http://{}", i.app_grpc)),
            })
            .collect();
        proxies.push(ProxyInfo {
            name: LOADGEN.to_owned(),
            service: None,
            version: None,
            admin: format!("http://{}", self.loadgen_admin),
            inbound: None,
            app_http: None,
            app_grpc: None,
        });
        DemoInfo {
            control_plane: self.control_plane_url(),
            entry: self.entry_url(),
            entry_grpc: format!("http://{}", self.entry_grpc),
            data_dir: data_dir.to_owned(),
            credentials: format!("{data_dir}/{}", sinew_control::credentials::ADMIN_FILE),
            proxies,
        }
    }
}

/// The catalog `HTTPRoute`: `v1`% to catalog-v1, `v2`% to catalog-v2.
pub(crate) fn catalog_route(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\n\
         kind: HTTPRoute\n\
         metadata: {{name: catalog, namespace: {NAMESPACE}}}\n\
         spec:\n  \
           parentRefs: [{{kind: Service, name: catalog}}]\n  \
           rules:\n    \
             - backendRefs: [{{name: catalog-v1, weight: {v1}}}, {{name: catalog-v2, weight: {v2}}}]\n"
    )
}

/// A `Proxy` document with outbound bindings `(service, bind, port name)` and no
/// inbound (the control plane derives it from the sidecar's registration).
fn proxy_document(out: &mut String, name: &str, upstreams: &[(&str, SocketAddr, &str)]) {
    let _ = writeln!(
        out,
        "apiVersion: sinew.dev/v1alpha1\nkind: Proxy\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}"
    );
    if upstreams.is_empty() {
        out.push_str("spec: {}\n---\n");
        return;
    }
    out.push_str("spec:\n  outbound:\n    upstreams:\n");
    for (service, bind, port) in upstreams {
        let _ = writeln!(
            out,
            "      - {{bind: \"{bind}\", service: {service}, port: {port}}}"
        );
    }
    out.push_str("---\n");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn ports_are_distinct_and_flags_point_at_them() {
        let plan = Plan::allocate().unwrap();
        let mut all = vec![
            plan.control_plane,
            plan.loadgen_admin,
            plan.entry,
            plan.entry_grpc,
            plan.loadgen_ratings,
        ];
        for i in &plan.instances {
            all.extend([i.app_http, i.app_grpc, i.admin, i.inbound]);
            all.extend(i.upstreams.iter().map(|(_, b)| *b));
        }
        assert_eq!(all.iter().collect::<HashSet<_>>().len(), all.len());
        assert!(all.iter().all(|a| a.ip().is_loopback()));

        let frontend = &plan.instances[0];
        let app = plan.app_args(frontend);
        let calls: Vec<&String> = app
            .iter()
            .zip(app.iter().skip(1))
            .filter(|(flag, _)| *flag == "--call")
            .map(|(_, url)| url)
            .collect();
        assert_eq!(calls.len(), 2);
        assert_eq!(*calls[0], format!("http://{}", frontend.upstreams[0].1));

        let proxy = plan.proxy_args(frontend).join(" ");
        assert!(proxy.contains("--name demo/frontend-0"), "{proxy}");
        assert!(
            proxy.contains("--service frontend --address 127.0.0.1"),
            "{proxy}"
        );
        assert!(
            proxy.contains(&format!("--port http={}", frontend.app_http.port())),
            "{proxy}"
        );
        assert!(proxy.contains("--label version=v1"), "{proxy}");
        assert!(
            proxy.contains(&format!("--inbound {}", frontend.inbound)),
            "{proxy}"
        );
        let loadgen = plan.loadgen_proxy_args().join(" ");
        assert!(!loadgen.contains("--service"), "{loadgen}");
        assert!(loadgen.contains("--name demo/loadgen"), "{loadgen}");
    }

    #[test]
    fn the_documents_are_valid_together() {
        let plan = Plan::allocate().unwrap();
        let text = plan.documents();
        let docs = sinew_model::parse_documents("demo.yaml", &text)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        // 6 Services + 7 Proxies + 3 HTTPRoutes.
        assert_eq!(docs.len(), 16, "{text}");
        let resources =
            sinew_model::Resources::from_documents(docs).unwrap_or_else(|e| panic!("{e}\n{text}"));
        for service in SERVICES {
            assert!(
                resources.find_service(NAMESPACE, service).is_some(),
                "{service}"
            );
        }
        assert!(text.contains(&format!(
            "{{bind: \"{}\", service: frontend, port: http}}",
            plan.entry
        )));
        assert!(text.contains("weight: 90") && text.contains("weight: 10"));
    }
}
