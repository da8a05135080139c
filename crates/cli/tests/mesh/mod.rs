//! Support for control-plane tests: a real `sinew control` process, the real CLI,
//! in-process proxies driven by it, real backends.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sinew_api::v1::Registration;
use sinew_api::v1::admin_client::AdminClient;
use sinew_api::v1::{HealthRequest, ProxyStatusRequest};
use sinew_proxy::control::ControlSettings;
use sinew_proxy::{Proxy, ProxyOptions};
use sinew_testkit::{client, wait};

pub const TIMEOUT: Duration = Duration::from_secs(20);

pub use sinew_testkit::free_addr;

/// A scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "sinew-cli-tests-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `sinew control` process.
pub struct Control {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    pub url: String,
}

impl Control {
    pub async fn start(data_dir: &Path, addr: SocketAddr, extra: &[&str]) -> Control {
        Control::start_env(data_dir, addr, extra, &[]).await
    }

    /// Like [`Control::start`], with extra environment variables (e.g. `KUBECONFIG`).
    pub async fn start_env(
        data_dir: &Path,
        addr: SocketAddr,
        extra: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Control {
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sinew"))
            .envs(env.iter().copied())
            .arg("control")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("SINEW_TEST_CP_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let url = format!("http://{addr}");
        let u = url.clone();
        wait::until("control plane healthy", TIMEOUT, || {
            let u = u.clone();
            async move {
                match AdminClient::connect(u).await {
                    Ok(mut c) => c
                        .health(HealthRequest {})
                        .await
                        .is_ok_and(|h| h.into_inner().store_ok),
                    Err(_) => false,
                }
            }
        })
        .await
        .unwrap();
        Control { child, addr, url }
    }

    /// `kill -9`.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }

    pub async fn sinew(&self, args: &[&str]) -> Output {
        sinew_at(&self.url, args).await
    }

    pub async fn all_in_sync(&self, expected: usize) -> bool {
        let Ok(mut c) = AdminClient::connect(self.url.clone()).await else {
            return false;
        };
        let Ok(s) = c.proxy_status(ProxyStatusRequest {}).await else {
            return false;
        };
        let s = s.into_inner();
        s.proxies
            .iter()
            .filter(|p| {
                p.connected
                    && !p.applied_version.is_empty()
                    && p.applied_version == p.latest_version
            })
            .count()
            == expected
    }
}

pub async fn sinew_at(url: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_sinew"))
        .args(args)
        .env("SINEW_SERVER", url)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap()
}

pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Starts an in-process proxy driven by the control plane and waits until ready.
pub async fn proxy(
    url: &str,
    name: &str,
    registration: Option<Registration>,
    min_backoff: Duration,
) -> Proxy {
    proxy_with_token(url, name, registration, min_backoff, None).await
}

/// Like [`proxy`], with a join token: the proxy gets a certificate and speaks mTLS;
/// ready means it has one.
pub async fn proxy_with_token(
    url: &str,
    name: &str,
    registration: Option<Registration>,
    min_backoff: Duration,
    token: Option<String>,
) -> Proxy {
    let mut settings = ControlSettings::new(url, name);
    settings.registration = registration;
    settings.join_token = token;
    settings.min_backoff = min_backoff;
    settings.max_backoff = min_backoff.max(Duration::from_millis(500));
    start_proxy(settings).await
}

/// Starts an in-process proxy with these control-plane settings; returns once it is
/// ready.
pub async fn start_proxy(settings: ControlSettings) -> Proxy {
    let mut opts = ProxyOptions::control_plane(settings);
    opts.admin = "127.0.0.1:0".parse().unwrap();
    opts.drain_timeout = Duration::from_secs(5);
    let p = Proxy::start(opts).unwrap();
    let admin = p.admin_addr();
    wait::until("proxy ready", TIMEOUT, || async move {
        matches!(client::get(admin, "admin", "/ready").await, Ok(r) if r.status == 200)
    })
    .await
    .unwrap();
    p
}

pub fn registration(
    service: &str,
    app: SocketAddr,
    inbound: SocketAddr,
    version: &str,
) -> Registration {
    Registration {
        service: service.into(),
        address: app.ip().to_string(),
        ports: [("http".to_owned(), u32::from(app.port()))]
            .into_iter()
            .collect(),
        labels: [("version".to_owned(), version.to_owned())]
            .into_iter()
            .collect(),
        sidecar_port: u32::from(inbound.port()),
        service_account: String::new(),
    }
}

pub fn service(ns: &str, name: &str) -> String {
    format!(
        "---\napiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  ports: [{{name: http, port: 80}}]\n"
    )
}

pub fn static_workload(ns: &str, name: &str, svc: &str, addr: SocketAddr) -> String {
    format!(
        "---\napiVersion: sinew.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{service: {svc}, address: {}, ports: {{http: {}}}}}\n",
        addr.ip(),
        addr.port()
    )
}

pub fn proxy_doc(ns: &str, name: &str, binds: &[(SocketAddr, &str)]) -> String {
    let ups: Vec<String> = binds
        .iter()
        .map(|(b, s)| format!("{{bind: \"{b}\", service: {s}}}"))
        .collect();
    format!(
        "---\napiVersion: sinew.dev/v1alpha1\nkind: Proxy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  outbound:\n    upstreams: [{}]\n",
        ups.join(", ")
    )
}

pub fn route_to(ns: &str, parent: &str, backend: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {parent}, namespace: {ns}}}\nspec:\n  parentRefs: [{{kind: Service, name: {parent}}}]\n  rules:\n    - backendRefs: [{{name: {backend}}}]\n"
    )
}

/// Waits until something accepts connections at `addr` (a proxy's binding appears
/// with the first push that includes it, which may follow the first push it gets).
pub async fn listening(addr: SocketAddr) {
    wait::until("listener up", TIMEOUT, || async move {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await
    .unwrap();
}

/// `sinew token create`: the token.
pub async fn token(cp: &Control, ns: &str, sa: &str) -> String {
    let out = cp
        .sinew(&["token", "create", "-n", ns, "--service-account", sa])
        .await;
    assert!(out.status.success(), "{:?}", text(&out));
    let (stdout, stderr) = text(&out);
    assert!(
        stderr.contains(&format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")),
        "{stderr}"
    );
    stdout.trim().to_owned()
}

/// Runs `openssl s_client` against `addr` with `args`; returns (success, output).
pub async fn s_client(addr: SocketAddr, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new("openssl")
        .arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .args(["-alpn", "sinew-h2", "-tls1_3"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("openssl is required for these tests (scripts/test installs it)");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), all)
}
