//! A real Kubernetes API server for tests: etcd plus kube-apiserver on loopback.
//!
//! [`ApiServer::start`] runs a fresh etcd and a kube-apiserver (1.20.2, built from Debian's
//! source package by `scripts/kube-envtest build`) on free loopback ports, with TLS (a test CA
//! made here), bearer-token auth (an admin token in `system:masters`), authorization
//! AlwaysAllow (unless `start_with_args` sets `--authorization-mode`, e.g. RBAC), and a service-account issuer with its own signing key, so the TokenRequest and
//! TokenReview APIs work. It returns once `/readyz` answers 200. Dropping it stops both
//! processes and removes their directory.
//!
//! There is no kubelet: Pods are API objects only, never run.
//!
//! The binary is looked up at `$SINEW_KUBE_APISERVER`, else
//! `${XDG_CACHE_HOME:-$HOME/.cache}/kube-envtest/bin/kube-apiserver`; `etcd` at `$SINEW_ETCD`,
//! else on `PATH`. If either is missing, `start` fails with an error that says how to get it:
//! a test that needs the API server never passes without one.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};

use crate::BoxError;

/// The service-account token issuer the API server is started with (`iss` of its tokens).
pub const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The API server's audience: tokens requested without an audience carry this one.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";
/// The admin bearer token (user `admin`, group `system:masters`).
pub const ADMIN_TOKEN: &str = "sinew-test-admin-token";

/// How long etcd plus the API server may take to become ready (about 4 s normally; CI machines
/// under load are slower).
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// A running etcd + kube-apiserver. See the module docs.
pub struct ApiServer {
    dir: PathBuf,
    etcd: Child,
    apiserver: Option<Child>,
    apiserver_bin: PathBuf,
    extra_args: Vec<String>,
    etcd_url: String,
    port: u16,
    sa_key_pem: String,
}

/// Where the tests expect the API server binary (see the module docs).
pub fn apiserver_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SINEW_KUBE_APISERVER") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("kube-envtest/bin/kube-apiserver")
}

fn etcd_bin() -> Result<PathBuf, BoxError> {
    if let Some(p) = std::env::var_os("SINEW_ETCD") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "etcd not found on PATH (nor SINEW_ETCD): the Kubernetes tests need it; \
             run `scripts/kube-envtest build` (installs Debian's etcd-server)"
                .into()
        })
}

fn unique_dir() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::env::temp_dir().join(format!(
        "sinew-envtest-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

fn write(path: &Path, contents: &str) -> Result<(), BoxError> {
    std::fs::write(path, contents).map_err(|e| format!("writing {}: {e}", path.display()).into())
}

/// The last `n` lines of a log file, for error messages.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl ApiServer {
    /// Starts etcd and kube-apiserver and waits until the API server is ready.
    pub async fn start() -> Result<ApiServer, BoxError> {
        ApiServer::start_with_args(&[]).await
    }

    /// Like [`ApiServer::start`], with extra kube-apiserver flags, e.g.
    /// `--runtime-config=discovery.k8s.io/v1beta1=false` for a server without
    /// EndpointSlices.
    pub async fn start_with_args(extra_args: &[&str]) -> Result<ApiServer, BoxError> {
        let apiserver_bin = apiserver_bin();
        if !apiserver_bin.is_file() {
            return Err(format!(
                "no kube-apiserver at {} (SINEW_KUBE_APISERVER overrides): the Kubernetes tests \
                 need a real API server; build it with `scripts/kube-envtest build`",
                apiserver_bin.display()
            )
            .into());
        }
        let etcd_bin = etcd_bin()?;
        let dir = unique_dir();
        std::fs::create_dir_all(dir.join("pki"))
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let sa_key_pem = write_pki(&dir.join("pki"))?;

        let client = crate::free_addr();
        let peer = crate::free_addr();
        let port = crate::free_addr().port();
        let etcd_url = format!("http://{client}");
        let etcd_log = std::fs::File::create(dir.join("etcd.log"))?;
        let etcd = Command::new(&etcd_bin)
            .args(["--name", "e", "--unsafe-no-fsync"])
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls=http://{peer}"))
            .arg(format!("--initial-advertise-peer-urls=http://{peer}"))
            .arg(format!("--initial-cluster=e=http://{peer}"))
            .stdin(Stdio::null())
            .stdout(etcd_log.try_clone()?)
            .stderr(etcd_log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", etcd_bin.display()))?;
        let mut server = ApiServer {
            dir,
            etcd,
            apiserver: None,
            apiserver_bin,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            etcd_url,
            port,
            sa_key_pem,
        };
        write(&server.kubeconfig(), &server.kubeconfig_yaml())?;
        server.start_apiserver().await?;
        Ok(server)
    }

    /// The API server's URL (`https://127.0.0.1:<port>`); it stays the same across restarts.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// A kubeconfig file for the admin user (bearer token, the test CA as trust root).
    /// Give it to a process as `KUBECONFIG`.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// A kubeconfig file for a client authenticating with `token` (e.g. a service
    /// account's, from the TokenRequest API), written into the server's directory.
    pub fn kubeconfig_for_token(&self, name: &str, token: &str) -> Result<PathBuf, BoxError> {
        let path = self.dir.join(format!("kubeconfig-{name}"));
        let yaml = self
            .kubeconfig_yaml()
            .replace(&format!("token: {ADMIN_TOKEN}"), &format!("token: {token}"));
        write(&path, &yaml)?;
        Ok(path)
    }

    /// The test CA certificate (PEM) the API server's serving certificate chains to.
    pub fn ca_pem(&self) -> Result<String, BoxError> {
        Ok(std::fs::read_to_string(self.dir.join("pki/ca.crt"))?)
    }

    /// The private key (PKCS#8 PEM, ECDSA P-256, so tokens are ES256) the API server signs
    /// service-account tokens with. Tests use it to make tokens the server would have made.
    pub fn sa_signing_key_pem(&self) -> &str {
        &self.sa_key_pem
    }

    /// The API server's log so far (for failure messages).
    pub fn log(&self) -> String {
        tail(&self.dir.join("apiserver.log"), 40)
    }

    /// A kube-rs configuration for the admin user.
    pub async fn config(&self) -> Result<::kube::Config, BoxError> {
        let kubeconfig = ::kube::config::Kubeconfig::read_from(self.kubeconfig())?;
        Ok(::kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?)
    }

    /// A kube-rs client for the admin user.
    pub async fn client(&self) -> Result<::kube::Client, BoxError> {
        Ok(::kube::Client::try_from(self.config().await?)?)
    }

    /// A kube-rs client authenticating with `token` (see [`ApiServer::kubeconfig_for_token`]).
    pub async fn client_for(&self, name: &str, token: &str) -> Result<::kube::Client, BoxError> {
        let path = self.kubeconfig_for_token(name, token)?;
        let kubeconfig = ::kube::config::Kubeconfig::read_from(path)?;
        let config =
            ::kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
        Ok(::kube::Client::try_from(config)?)
    }

    /// Stops the API server (etcd keeps running, so no state is lost): every watch on it ends.
    pub fn stop_apiserver(&mut self) {
        if let Some(mut child) = self.apiserver.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the API server again on the same port and waits until it is ready.
    pub async fn start_apiserver(&mut self) -> Result<(), BoxError> {
        if self.apiserver.is_some() {
            return Ok(());
        }
        let pki = self.dir.join("pki");
        let p = |f: &str| pki.join(f).display().to_string();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("apiserver.log"))?;
        // A list flag: given twice it would hold both modes, and AlwaysAllow would win.
        let authz = if self
            .extra_args
            .iter()
            .any(|a| a.starts_with("--authorization-mode"))
        {
            None
        } else {
            Some("--authorization-mode=AlwaysAllow")
        };
        let child = Command::new(&self.apiserver_bin)
            .arg(format!("--etcd-servers={}", self.etcd_url))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={}", self.port))
            .arg(format!("--tls-cert-file={}", p("apiserver.crt")))
            .arg(format!("--tls-private-key-file={}", p("apiserver.key")))
            .arg(format!("--client-ca-file={}", p("ca.crt")))
            .arg(format!("--token-auth-file={}", p("tokens.csv")))
            .args(authz)
            .arg(format!("--service-account-issuer={SA_ISSUER}"))
            .arg(format!("--service-account-key-file={}", p("sa.pub")))
            .arg(format!(
                "--service-account-signing-key-file={}",
                p("sa.key")
            ))
            .arg(format!("--api-audiences={API_AUDIENCE}"))
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            // No kubelet and no controller manager: nothing would make the default
            // service-account token secrets the ServiceAccount admission plugin waits for.
            .arg("--disable-admission-plugins=ServiceAccount")
            .arg("--allow-privileged=true")
            .arg(format!("--cert-dir={}", self.dir.join("certs").display()))
            .arg("--endpoint-reconciler-type=none")
            .arg("--v=1")
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.apiserver_bin.display()))?;
        self.apiserver = Some(child);
        self.wait_ready().await
    }

    /// Stops and starts the API server (same port, same etcd): watches drop, state stays.
    pub async fn restart_apiserver(&mut self) -> Result<(), BoxError> {
        self.stop_apiserver();
        self.start_apiserver().await
    }

    async fn wait_ready(&mut self) -> Result<(), BoxError> {
        let client = self.client().await?;
        let child = std::cell::RefCell::new(self.apiserver.as_mut());
        let exited = std::cell::Cell::new(None);
        let last = std::cell::RefCell::new(String::new());
        // Polls /readyz, and stops early when the process has exited.
        let polled = crate::wait::until("kube-apiserver /readyz", READY_TIMEOUT, || {
            if let Some(c) = child.borrow_mut().as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                exited.set(Some(status));
            }
            let (client, last, exited) = (client.clone(), &last, &exited);
            async move {
                if exited.get().is_some() {
                    return true;
                }
                let answer = match http::Request::get("/readyz").body(Vec::new()) {
                    Ok(req) => client.request_text(req).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match answer {
                    Ok(body) if body.trim() == "ok" => true,
                    Ok(body) | Err(body) => {
                        *last.borrow_mut() = body;
                        false
                    }
                }
            }
        })
        .await;
        if let Some(status) = exited.get() {
            return Err(format!(
                "kube-apiserver exited ({status}) before it was ready; its log:\n{}\netcd's log:\n{}",
                self.log(),
                tail(&self.dir.join("etcd.log"), 20)
            )
            .into());
        }
        polled.map_err(|e| {
            format!(
                "{e} (last answer: {}); its log:\n{}",
                last.borrow(),
                self.log()
            )
            .into()
        })
    }

    fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: envtest\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: admin\n  user:\n    token: {ADMIN_TOKEN}\ncontexts:\n- name: envtest\n  context:\n    cluster: envtest\n    user: admin\n    namespace: default\ncurrent-context: envtest\n",
            self.url(),
            self.dir.join("pki/ca.crt").display()
        )
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop_apiserver();
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes the CA, the serving certificate, the token file and the service-account key pair
/// into `pki`; returns the service-account signing key (PEM).
fn write_pki(pki: &Path) -> Result<String, BoxError> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sinew-envtest-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![
        "localhost".to_string(),
        "kubernetes.default.svc".to_string(),
    ])?;
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kube-apiserver");
    let cert = params.signed_by(&key, &issuer)?;

    let sa_key = KeyPair::generate()?;
    write(&pki.join("ca.crt"), &ca_cert.pem())?;
    write(&pki.join("apiserver.crt"), &cert.pem())?;
    write(&pki.join("apiserver.key"), &key.serialize_pem())?;
    write(&pki.join("sa.key"), &sa_key.serialize_pem())?;
    write(&pki.join("sa.pub"), &sa_key.public_key_pem())?;
    write(
        &pki.join("tokens.csv"),
        &format!("{ADMIN_TOKEN},admin,admin-uid,\"system:masters\"\n"),
    )?;
    Ok(sa_key.serialize_pem())
}
