//! Shared test support: config files, free ports, starting proxies, admin calls.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sinew_proxy::{Proxy, ProxyOptions};
use sinew_testkit::client::{self, Collected};
use sinew_testkit::mesh::{self, Mesh};
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
pub async fn start_docs(mesh: &Mesh, name: &str) -> Proxy {
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

/// An empty set of documents in `shop`, the namespace of these tests.
pub fn shop() -> Mesh {
    Mesh::new("shop")
}

/// The sidecar `client` with one outbound binding: `bind` forwards to `svc`.
pub fn client_proxy(bind: SocketAddr, svc: &str) -> mesh::Proxy {
    mesh::Proxy::new("client").upstream(bind, svc)
}

/// A configuration file holding `docs`.
pub fn config_file(docs: &Mesh) -> ConfigFile {
    ConfigFile::new(&docs.yaml())
}

pub type TestResult = Result<(), BoxError>;
