//! Support for control-plane tests: a real `sinew control` process, the real CLI,
//! in-process proxies driven by it, real backends.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub use sinew_api::channel::error_chain;
use sinew_api::v1::Registration;
use sinew_api::v1::admin_client::AdminClient;
use sinew_api::v1::discovery_client::DiscoveryClient;
use sinew_api::v1::{
    BootstrapRequest, CreateJoinTokenRequest, HealthRequest, ProxyMessage, ProxyStatusRequest,
    proxy_message,
};
use sinew_control::credentials::CredentialFile;
use sinew_proxy::control::ControlSettings;
use sinew_proxy::{Proxy, ProxyOptions};
use sinew_testkit::mesh::{self as docs, Mesh};
use sinew_testkit::{client, metrics, wait};
use tonic::transport::Channel;

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

/// A `sinew control` process, and the admin credential it wrote on first start.
pub struct Control {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    /// `https://<addr>`.
    pub url: String,
    /// `<data-dir>/admin.credentials`.
    pub credentials: PathBuf,
}

/// An Admin client of the control plane at `url`, with the credential in `file`.
pub async fn admin_client(
    url: &str,
    file: &Path,
) -> Result<AdminClient<Channel>, Box<dyn std::error::Error + Send + Sync>> {
    let cred = CredentialFile::read(file)?;
    let tls = sinew_tls::api::control_client_config(
        sinew_tls::api::ControlTrust::from_pem("roots", &cred.roots)?,
        sinew_tls::api::ClientAuth::Static {
            chain_pem: cred.certificate,
            key_pem: cred.key,
        },
    )?;
    let endpoint = sinew_api::channel::endpoint(url)?.connect_timeout(Duration::from_secs(2));
    Ok(AdminClient::new(
        sinew_api::channel::connect(endpoint, tls).await?,
    ))
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
        let url = format!("https://{addr}");
        let credentials = data_dir.join("admin.credentials");
        let (u, c) = (url.clone(), credentials.clone());
        wait::until("control plane healthy", TIMEOUT, || {
            let (u, c) = (u.clone(), c.clone());
            async move {
                match admin_client(&u, &c).await {
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
        Control {
            child,
            addr,
            url,
            credentials,
        }
    }

    /// An Admin client with the admin credential.
    pub async fn admin(&self) -> AdminClient<Channel> {
        admin_client(&self.url, &self.credentials).await.unwrap()
    }

    /// Waits until the control plane has published `revision` (what it sends to a
    /// proxy that connects now): an apply returns once committed, and publication
    /// follows after the debounce, so a proxy connecting in between gets the state
    /// before it.
    pub async fn published(&self, revision: u64) {
        let admin = self.admin().await;
        wait::until(&format!("revision {revision} published"), TIMEOUT, || {
            let mut admin = admin.clone();
            async move {
                admin
                    .proxy_status(sinew_api::v1::ProxyStatusRequest::default())
                    .await
                    .is_ok_and(|r| r.into_inner().revision >= revision)
            }
        })
        .await
        .unwrap();
    }

    /// The mesh roots in a file (`<data-dir>/../roots.pem`), as a pod mounts them.
    pub fn roots_file(&self) -> PathBuf {
        let roots = CredentialFile::read(&self.credentials).unwrap().roots;
        let path = self.credentials.with_file_name("test-roots.pem");
        std::fs::write(&path, roots).unwrap();
        path
    }

    /// `kill -9`.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }

    /// The CLI, as the admin.
    pub async fn sinew(&self, args: &[&str]) -> Output {
        sinew_as(&self.url, Some(&self.credentials), args).await
    }

    /// A join token for `ns`/`sa` (one use), made through the API.
    pub async fn join_token(&self, ns: &str, sa: &str) -> String {
        self.admin()
            .await
            .create_join_token(CreateJoinTokenRequest {
                namespace: ns.to_owned(),
                service_account: sa.to_owned(),
                ttl_seconds: 600,
                uses: 1,
            })
            .await
            .unwrap()
            .into_inner()
            .token
    }

    pub async fn all_in_sync(&self, expected: usize) -> bool {
        let Ok(mut c) = admin_client(&self.url, &self.credentials).await else {
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

/// The CLI with no credential (the commands that need no control plane).
pub async fn sinew_at(url: &str, args: &[&str]) -> Output {
    sinew_as(url, None, args).await
}

/// The CLI with the credential in `credentials`, if any.
pub async fn sinew_as(url: &str, credentials: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sinew"));
    cmd.args(args)
        .env("SINEW_SERVER", url)
        .env("RUST_LOG", "warn")
        .env_remove("SINEW_CREDENTIALS")
        // No credential from the user's home or the working directory.
        .env("HOME", "/nonexistent")
        .env_remove("XDG_CONFIG_HOME")
        .current_dir(std::env::temp_dir());
    if let Some(c) = credentials {
        cmd.env("SINEW_CREDENTIALS", c);
    }
    cmd.output().await.unwrap()
}

pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The service account a test proxy gets when none is given: its registration's
/// service (a workload serves the service named like its account), else the last
/// part of its name (`shop/web` -> `web`).
fn account_for(name: &str, registration: Option<&Registration>) -> String {
    match registration {
        Some(r) if !r.service_account.is_empty() => r.service_account.clone(),
        Some(r) if !r.service.is_empty() => r.service.clone(),
        _ => name.rsplit('/').next().unwrap_or(name).to_owned(),
    }
}

/// Starts an in-process proxy driven by the control plane, bootstrapped with a join
/// token for its own identity, and waits until ready.
pub async fn proxy(
    cp: &Control,
    name: &str,
    registration: Option<Registration>,
    min_backoff: Duration,
) -> Proxy {
    proxy_with_token(cp, name, registration, min_backoff, None).await
}

/// Like [`proxy`], with this join token (`None`: one made for its identity); ready
/// means it holds a certificate.
pub async fn proxy_with_token(
    cp: &Control,
    name: &str,
    registration: Option<Registration>,
    min_backoff: Duration,
    token: Option<String>,
) -> Proxy {
    proxy_with(cp, name, registration, min_backoff, token, |_| {}).await
}

/// Like [`proxy_with_token`], with `tweak` applied to the proxy's options.
pub async fn proxy_with(
    cp: &Control,
    name: &str,
    registration: Option<Registration>,
    min_backoff: Duration,
    token: Option<String>,
    tweak: impl FnOnce(&mut ProxyOptions),
) -> Proxy {
    let ns = name.split_once('/').map_or("default", |(a, _)| a);
    let token = match token {
        Some(t) => t,
        None => {
            cp.join_token(ns, &account_for(name, registration.as_ref()))
                .await
        }
    };
    let mut settings = ControlSettings::new(&cp.url, name);
    settings.registration = registration;
    if !token.starts_with("sinew.") {
        // A service-account token carries no root hash: the roots come from a file,
        // as from the `sinew-root` ConfigMap in a pod.
        settings.control_plane_ca = Some(cp.roots_file());
    }
    settings.join_token = Some(token);
    settings.min_backoff = min_backoff;
    settings.max_backoff = min_backoff.max(Duration::from_millis(500));
    start_proxy_with(settings, tweak).await
}

/// Like [`proxy`], but returns at once, ready or not: for a proxy that may refuse
/// what it is sent.
pub async fn proxy_unready(cp: &Control, name: &str, min_backoff: Duration) -> Proxy {
    let ns = name.split_once('/').map_or("default", |(a, _)| a);
    let token = cp.join_token(ns, &account_for(name, None)).await;
    let mut settings = ControlSettings::new(&cp.url, name);
    settings.join_token = Some(token);
    settings.min_backoff = min_backoff;
    settings.max_backoff = min_backoff.max(Duration::from_millis(500));
    let mut opts = ProxyOptions::control_plane(settings);
    opts.admin = "127.0.0.1:0".parse().unwrap();
    opts.drain_timeout = Duration::from_secs(5);
    Proxy::start(opts).unwrap()
}

/// How many pushes the proxy has refused (its `/metrics`).
pub async fn nacked(p: &Proxy) -> u64 {
    let m = client::get(p.admin_addr(), "admin", "/metrics")
        .await
        .map(|r| r.text())
        .unwrap_or_default();
    metrics::sum_labelled(
        &m,
        "sinew_control_plane_pushes_total",
        &["result=\"nacked\""],
    ) as u64
}

/// The proxy's `/ready` answer: status and body.
pub async fn ready(p: &Proxy) -> (u16, String) {
    match client::get(p.admin_addr(), "admin", "/ready").await {
        Ok(r) => (r.status.as_u16(), r.text()),
        Err(e) => (0, e.to_string()),
    }
}

/// Starts an in-process proxy with these control-plane settings; returns once it is
/// ready.
pub async fn start_proxy(settings: ControlSettings) -> Proxy {
    start_proxy_with(settings, |_| {}).await
}

/// Like [`start_proxy`], with `tweak` applied to the proxy's options.
pub async fn start_proxy_with(
    settings: ControlSettings,
    tweak: impl FnOnce(&mut ProxyOptions),
) -> Proxy {
    let mut opts = ProxyOptions::control_plane(settings);
    opts.admin = "127.0.0.1:0".parse().unwrap();
    opts.drain_timeout = Duration::from_secs(5);
    tweak(&mut opts);
    let p = Proxy::start(opts).unwrap();
    let admin = p.admin_addr();
    wait::ready("proxy ready", admin, TIMEOUT).await.unwrap();
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

// The documents these tests apply, from the testkit's builders. Their one port is
// named `http` (testkit's default is `main`): the control-plane tests read like
// Kubernetes manifests, and registrations name their port `http` too.

/// The HTTP Service `ns/name`, port `http` (80).
pub fn service(ns: &str, name: &str) -> String {
    Mesh::new(ns)
        .with(docs::Service::http(name).port_name("http"))
        .yaml()
}

/// The Workload `ns/name` of `svc`, its port `http` at `addr`, with no sidecar.
pub fn static_workload(ns: &str, name: &str, svc: &str, addr: SocketAddr) -> String {
    Mesh::new(ns)
        .with(docs::Workload::new(name, svc, addr).port_name("http"))
        .yaml()
}

/// The Proxy `ns/name` with one outbound binding per `(bind, service)`.
pub fn proxy_doc(ns: &str, name: &str, binds: &[(SocketAddr, &str)]) -> String {
    let proxy = binds
        .iter()
        .fold(docs::Proxy::new(name), |p, (b, s)| p.upstream(*b, s));
    Mesh::new(ns).with(proxy).yaml()
}

/// The HTTPRoute `ns/parent` sending everything for the Service `parent` to `backend`.
pub fn route_to(ns: &str, parent: &str, backend: &str) -> String {
    Mesh::new(ns)
        .with(
            docs::HttpRoute::new(parent, parent)
                .rule(serde_json::json!({"backendRefs": [{"name": backend}]})),
        )
        .yaml()
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

/// A hand-made proxy identity: bootstrapped with `token` (verified by the root hash
/// the token carries), then a Discovery client over mTLS with its certificate.
pub struct Workload {
    pub certs: std::sync::Arc<sinew_tls::CertStore>,
    pub discovery: DiscoveryClient<Channel>,
}

/// The bootstrap call a proxy makes, by hand: `Err` is the control plane's answer.
pub async fn bootstrap(
    cp: &Control,
    ns: &str,
    name: &str,
    token: &str,
) -> Result<(String, sinew_api::v1::Certificate), tonic::Status> {
    // A join token names its root; a service-account token does not, and the
    // roots come from the admin credential then.
    let trust = match token.strip_prefix("sinew.") {
        Some(rest) => sinew_tls::api::ControlTrust::Pinned(
            rest.split('.').next().unwrap_or_default().to_owned(),
        ),
        None => sinew_tls::api::ControlTrust::from_pem(
            "roots",
            &CredentialFile::read(&cp.credentials).unwrap().roots,
        )
        .unwrap(),
    };
    let tls =
        sinew_tls::api::control_client_config(trust, sinew_tls::api::ClientAuth::None).unwrap();
    let endpoint = sinew_api::channel::endpoint(&cp.url).unwrap();
    let channel = sinew_api::channel::connect(endpoint, tls)
        .await
        .map_err(|e| tonic::Status::unavailable(error_chain(&e)))?;
    let (key, csr_der) = sinew_tls::new_key_and_csr().unwrap();
    let cert = DiscoveryClient::new(channel)
        .bootstrap(BootstrapRequest {
            namespace: ns.into(),
            name: name.into(),
            csr_der,
            token: token.into(),
        })
        .await?
        .into_inner();
    Ok((key, cert))
}

impl Workload {
    /// Bootstraps `ns/name` with a fresh token for `ns/sa`.
    pub async fn new(cp: &Control, ns: &str, name: &str, sa: &str) -> Workload {
        let token = cp.join_token(ns, sa).await;
        let (key, cert) = bootstrap(cp, ns, name, &token).await.unwrap();
        let certs = sinew_tls::CertStore::new();
        certs.set_trust_bundle(&cert.roots_pem).unwrap();
        certs.install(&key, &cert.chain_pem).unwrap();
        let tls = sinew_tls::api::control_client_config(
            sinew_tls::api::ControlTrust::Store(certs.clone()),
            sinew_tls::api::ClientAuth::Store(certs.clone()),
        )
        .unwrap();
        let endpoint = sinew_api::channel::endpoint(&cp.url).unwrap();
        let discovery =
            DiscoveryClient::new(sinew_api::channel::connect(endpoint, tls).await.unwrap());
        Workload { certs, discovery }
    }

    /// Opens a stream with `hello`; returns the control plane's refusal, or the
    /// first message it sends, the sender of the proxy's messages and the rest of
    /// the control plane's.
    pub async fn hello(
        &self,
        hello: sinew_api::v1::Hello,
    ) -> Result<
        (
            sinew_api::v1::ControlMessage,
            tokio::sync::mpsc::Sender<ProxyMessage>,
            tonic::Streaming<sinew_api::v1::ControlMessage>,
        ),
        tonic::Status,
    > {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(ProxyMessage {
            kind: Some(proxy_message::Kind::Hello(hello)),
        })
        .await
        .unwrap();
        let mut inbound = self
            .discovery
            .clone()
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| tonic::Status::aborted("the stream ended"))?;
        Ok((first, tx, inbound))
    }
}

/// A TLS client (verifying the control plane) with no certificate of its own.
async fn anonymous_channel(cp: &Control) -> Channel {
    let cred = CredentialFile::read(&cp.credentials).unwrap();
    let tls = sinew_tls::api::control_client_config(
        sinew_tls::api::ControlTrust::from_pem("roots", &cred.roots).unwrap(),
        sinew_tls::api::ClientAuth::None,
    )
    .unwrap();
    let endpoint = sinew_api::channel::endpoint(&cp.url).unwrap();
    sinew_api::channel::connect(endpoint, tls).await.unwrap()
}

/// A Discovery client with no certificate.
pub async fn anonymous_discovery(cp: &Control) -> DiscoveryClient<Channel> {
    DiscoveryClient::new(anonymous_channel(cp).await)
}

/// An Admin client with no certificate.
pub async fn anonymous_admin(cp: &Control) -> AdminClient<Channel> {
    AdminClient::new(anonymous_channel(cp).await)
}

/// Applies `yaml` through the real CLI (written to `mesh.yaml` in `scratch`).
pub async fn apply(cp: &Control, scratch: &Scratch, yaml: &str) {
    let f = scratch.write("mesh.yaml", yaml);
    let out = cp.sinew(&["apply", "-f", f.to_str().unwrap()]).await;
    assert!(out.status.success(), "{:?}", text(&out));
}

/// A Python `http.server` (HTTP/1.x only, a third-party server) on `addr`, serving
/// `dir` (with a `hello.txt` in it); ready when this returns.
pub async fn python_app(dir: &Path, addr: SocketAddr) -> tokio::process::Child {
    std::fs::write(dir.join("hello.txt"), "hello from an HTTP/1.1 app\n").unwrap();
    let child = tokio::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            &addr.ip().to_string(),
            &addr.port().to_string(),
        ])
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("python3");
    listening(addr).await;
    child
}
