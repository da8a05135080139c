//! Shared test support: config files, free ports, starting proxies, admin calls.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sinew_proxy::{Proxy, ProxyOptions};
use sinew_testkit::client::{self, Collected};
use sinew_testkit::{BoxError, wait};

/// A configuration file removed on drop.
pub struct ConfigFile {
    pub path: PathBuf,
}

impl ConfigFile {
    pub fn new(yaml: &str) -> ConfigFile {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!("sinew-proxy-tests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("mesh-{}.yaml", N.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&path, yaml).unwrap();
        ConfigFile { path }
    }

    /// Replaces the content atomically (write + rename), as operators should.
    pub fn replace(&self, yaml: &str) {
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub use sinew_testkit::free_addr;

pub const TIMEOUT: Duration = Duration::from_secs(20);

pub fn options(path: &Path, name: &str) -> ProxyOptions {
    let mut o = ProxyOptions::new(path);
    o.name = Some(name.to_owned());
    o.admin = "127.0.0.1:0".parse().unwrap();
    o.reload_interval = Duration::from_millis(50);
    o.drain_timeout = Duration::from_secs(10);
    o
}

/// Starts the proxy `name` from `file` and waits until it reports ready.
pub async fn start(file: &ConfigFile, name: &str) -> Proxy {
    start_with(options(&file.path, name)).await
}

/// Starts the proxy `name` of `mesh` in process (no file) and waits until it
/// reports ready.
pub async fn start_docs(mesh: &sinew_testkit::mesh::Mesh, name: &str) -> Proxy {
    let opts = Proxy::builder()
        .documents(&mesh.yaml(), name)
        .drain_timeout(Duration::from_secs(10))
        .into_options()
        .unwrap();
    start_with(opts).await
}

pub async fn start_with(opts: ProxyOptions) -> Proxy {
    let proxy = Proxy::start(opts).unwrap();
    let admin = proxy.admin_addr();
    wait::ready("proxy ready", admin, TIMEOUT).await.unwrap();
    proxy
}

pub async fn admin(proxy: &Proxy, path: &str) -> Collected {
    client::get(proxy.admin_addr(), "admin", path)
        .await
        .unwrap()
}

pub async fn generation(proxy: &Proxy) -> u64 {
    let c = admin(proxy, "/config").await;
    c.json().unwrap()["generation"].as_u64().unwrap_or(0)
}

/// The value of a metric line that starts with `prefix` (name and labels).
pub async fn metric(proxy: &Proxy, prefix: &str) -> Option<f64> {
    sinew_testkit::metrics::value(&admin(proxy, "/metrics").await.text(), prefix)
}

pub fn proxy_doc(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: sinew.dev/v1alpha1\nkind: Proxy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n{spec}\n"
    )
}

pub fn service(name: &str, protocol: &str) -> String {
    format!(
        "---\napiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  ports: [{{name: main, port: 80, protocol: {protocol}}}]\n"
    )
}

pub fn service_lb(name: &str, lb: &str) -> String {
    format!(
        "---\napiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  loadBalancer: {lb}\n  ports: [{{name: main, port: 80}}]\n"
    )
}

/// A workload of `svc` at `addr`, optionally behind a sidecar inbound port.
pub fn workload(name: &str, svc: &str, addr: SocketAddr, sidecar: Option<u16>) -> String {
    let sc = sidecar
        .map(|p| format!(", sidecar: {{port: {p}}}"))
        .unwrap_or_default();
    format!(
        "---\napiVersion: sinew.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{service: {svc}, address: {}, ports: {{main: {}}}{sc}}}\n",
        addr.ip(),
        addr.port()
    )
}

pub fn route(name: &str, parent: &str, rules: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  parentRefs: [{{kind: Service, name: {parent}}}]\n  rules:\n{rules}\n"
    )
}

pub type TestResult = Result<(), BoxError>;
