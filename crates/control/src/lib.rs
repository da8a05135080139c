//! `sinew control`: Sinew's control plane.
//!
//! Sources (the operator API and a watched config directory) feed a single-writer
//! [`index`] that validates every change as a whole, persists it in an embedded
//! durable [`store`], and publishes an immutable mesh state. One gRPC
//! [`discovery`] stream per proxy turns that state into the proxy's own [`view`]:
//! versioned, full on connect, incremental after, debounced under churn. Proxies
//! register their workloads over their stream, and report their traffic over it to
//! the [`telemetry`]; the [`admin`] API serves the CLI.

pub mod admin;
pub mod auth;
pub mod credentials;
pub mod dir;
pub mod discovery;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod index;
pub mod quota;
pub mod shared;
pub mod store;
pub mod telemetry;
pub mod trim;
pub mod view;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use sinew_api::v1::admin_server::AdminServer;
use sinew_api::v1::discovery_server::DiscoveryServer;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::index::IndexSettings;
use crate::store::Store;

/// How to run the control plane.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    /// gRPC listener for proxies and the CLI; default `127.0.0.1:15010`.
    pub listen: SocketAddr,
    /// Where the durable store lives.
    pub data_dir: PathBuf,
    /// A directory of documents to watch, if any.
    pub config_dir: Option<PathBuf>,
    /// How long a disconnected proxy's workload stays registered; default 30 s.
    pub grace_period: Duration,
    /// How long changes are gathered before proxies are told; default 20 ms.
    pub debounce: Duration,
    /// How often the config directory is checked; default 1 s.
    pub dir_interval: Duration,
    /// The SPIFFE trust domain; default `cluster.local`.
    pub trust_domain: String,
    /// An operator-provided CA: the signing certificate (followed by its chain to the
    /// root, for an intermediate) and its key, PEM files. Default: a root generated
    /// on first start under `<data-dir>/ca`.
    pub ca_files: Option<(PathBuf, PathBuf)>,
    /// Lifetime of workload certificates; default 24 h.
    pub cert_ttl: Duration,
    /// Where the CA lives (`ca.pem`, `ca-key.pem`, rotation state), generated on first
    /// start if empty; default `<data-dir>/ca`. Ignored with `ca_files`.
    pub ca_dir: Option<PathBuf>,
    /// The control plane's namespace: its certificate is
    /// `spiffe://<td>/ns/<namespace>/sa/sinew-control`. Default `sinew-system`.
    pub namespace: String,
    /// Names and addresses clients reach it by, besides `localhost`, the host's name,
    /// the loopback addresses and the listen address: they go into its certificate.
    pub server_names: Vec<String>,
    /// Where the admin credential is written on first start (when no file is there);
    /// default `<data-dir>/admin.credentials`.
    pub admin_credentials: Option<PathBuf>,
    /// The URL written into the admin credential; default `https://<listen>` (the
    /// loopback address for an unspecified listen address).
    pub advertise: Option<String>,
    /// Caps on callers (handshakes, connections, streams, message sizes).
    pub limits: auth::Limits,
    /// Where applied documents, join tokens and operator credentials live when
    /// replicas share them (e.g. the Kubernetes API server); default `None`: the
    /// local store under `data_dir`.
    pub shared: Option<std::sync::Arc<dyn shared::SharedState>>,
}

impl ControlOptions {
    /// Defaults, with the store in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> ControlOptions {
        ControlOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 15010)),
            data_dir: data_dir.into(),
            config_dir: None,
            grace_period: Duration::from_secs(30),
            debounce: Duration::from_millis(20),
            dir_interval: Duration::from_secs(1),
            trust_domain: "cluster.local".to_owned(),
            ca_files: None,
            cert_ttl: identity::DEFAULT_CERT_TTL,
            ca_dir: None,
            namespace: "sinew-system".to_owned(),
            server_names: Vec::new(),
            admin_credentials: None,
            advertise: None,
            limits: auth::Limits::default(),
            shared: None,
        }
    }
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The CA could not be loaded or created.
    #[error("certificate authority: {0}")]
    Ca(#[from] sinew_tls::TlsError),
    /// The control plane's own certificate or the admin credential could not be made.
    #[error("{0}")]
    Credentials(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// A running control plane.
#[derive(Debug)]
pub struct ControlPlane {
    addr: SocketAddr,
    index: tokio::sync::mpsc::Sender<index::Command>,
    identity: std::sync::Arc<identity::Identity>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
}

impl ControlPlane {
    /// Opens the store, loads what it holds, and starts serving.
    pub async fn start(opts: ControlOptions) -> Result<ControlPlane, StartError> {
        let store = Store::open(&opts.data_dir)?;
        let shared: std::sync::Arc<dyn shared::SharedState> = match &opts.shared {
            Some(s) => s.clone(),
            None => std::sync::Arc::new(store.clone()),
        };
        let identity = std::sync::Arc::new(match &opts.ca_files {
            Some((cert, key)) => {
                let read = |p: &PathBuf| {
                    std::fs::read_to_string(p).map_err(|source| sinew_tls::TlsError::Io {
                        path: p.display().to_string(),
                        source,
                    })
                };
                identity::Identity::new(
                    sinew_tls::Ca::from_pem(&read(cert)?, &read(key)?)?,
                    opts.trust_domain.clone(),
                    opts.cert_ttl,
                    shared.clone(),
                )
            }
            None => identity::Identity::from_dir(
                &opts
                    .ca_dir
                    .clone()
                    .unwrap_or_else(|| opts.data_dir.join("ca")),
                opts.trust_domain.clone(),
                opts.cert_ttl,
                shared.clone(),
            )?,
        });
        let (index, state) = index::spawn(
            store.clone(),
            IndexSettings {
                grace_period: opts.grace_period,
                debounce: opts.debounce,
                trust_domain: opts.trust_domain.clone(),
            },
        )?;
        let mut tasks = vec![tokio::spawn(trim::run())];
        if let Some(dir) = opts.config_dir.clone() {
            tasks.push(tokio::spawn(dir::watch(
                dir,
                index.clone(),
                opts.dir_interval,
            )));
        }
        let listener = tokio::net::TcpListener::bind(opts.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: opts.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: opts.listen,
            source,
        })?;
        let (stop, stopped) = oneshot::channel::<()>();
        let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
        // The control plane's own certificate, rotated like a workload's.
        let (dns, ips) = server_names(&opts, addr);
        let own = sinew_tls::CertStore::new();
        install_own_certificate(&identity, &own, &opts.namespace, &dns, &ips)
            .map_err(StartError::Credentials)?;
        tasks.push(tokio::spawn(rotate_own_certificate(
            identity.clone(),
            own.clone(),
            opts.namespace.clone(),
            dns,
            ips,
        )));
        write_admin_credential(&opts, addr, &identity)
            .await
            .map_err(StartError::Credentials)?;
        let tls = sinew_tls::api::control_server_config(&own)
            .map_err(|e| StartError::Credentials(e.to_string()))?;
        let limits = opts.limits.clone();
        let (incoming, accept) = auth::incoming(listener, tls, limits.clone());
        tasks.push(accept);
        let discovery = discovery::DiscoveryService::new(
            index.clone(),
            state.clone(),
            stopping,
            identity.clone(),
        )
        .with_grace(opts.grace_period);
        let admin = admin::AdminService::new(index.clone(), state, store, identity.clone())
            .with_shared(shared)
            .with_telemetry(discovery.telemetry());
        let server = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(20)))
                .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                .max_concurrent_streams(Some(limits.streams_per_connection))
                // A peer that opens and resets streams in a loop (CVE-2023-44487's
                // rapid reset) is cut off, as is one that makes the server reset many.
                .http2_max_pending_accept_reset_streams(Some(64))
                .http2_max_local_error_reset_streams(Some(256))
                .http2_max_header_list_size(Some(64 * 1024))
                .add_service(
                    DiscoveryServer::new(discovery)
                        .max_decoding_message_size(limits.max_message_bytes),
                )
                .add_service(
                    AdminServer::new(admin).max_decoding_message_size(limits.max_message_bytes),
                )
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stopped.await;
                    let _ = stopping_tx.send(true);
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "control plane server failed");
            }
        });
        tracing::info!(%addr, data_dir = %opts.data_dir.display(), "control plane serving");
        Ok(ControlPlane {
            addr,
            index,
            identity,
            stop: Some(stop),
            server,
            tasks,
        })
    }

    /// The gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The index's command channel: other sources (e.g. Kubernetes) feed documents
    /// through it ([`index::Command::SyncSource`]).
    pub fn index(&self) -> tokio::sync::mpsc::Sender<index::Command> {
        self.index.clone()
    }

    /// The certificate authority and its bootstrap-credential checks.
    pub fn identity(&self) -> std::sync::Arc<identity::Identity> {
        self.identity.clone()
    }

    /// Stops serving and closes every stream.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        for t in &self.tasks {
            t.abort();
        }
        let _ = (&mut self.server).await;
    }
}

/// The DNS names and addresses that go into the control plane's certificate.
fn server_names(opts: &ControlOptions, addr: SocketAddr) -> (Vec<String>, Vec<std::net::IpAddr>) {
    let mut dns = vec!["localhost".to_owned()];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim().to_ascii_lowercase();
        if !h.is_empty() && !dns.contains(&h) {
            dns.push(h);
        }
    }
    let mut ips: Vec<std::net::IpAddr> = vec![
        std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::Ipv6Addr::LOCALHOST.into(),
    ];
    if !addr.ip().is_unspecified() && !ips.contains(&addr.ip()) {
        ips.push(addr.ip());
    }
    for n in &opts.server_names {
        match n.parse::<std::net::IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) if !dns.contains(n) => dns.push(n.clone()),
            Err(_) => {}
        }
    }
    (dns, ips)
}

fn install_own_certificate(
    identity: &identity::Identity,
    own: &sinew_tls::CertStore,
    namespace: &str,
    dns: &[String],
    ips: &[std::net::IpAddr],
) -> Result<std::time::SystemTime, String> {
    let (key, chain, not_after) = identity.control_certificate(namespace, dns, ips)?;
    own.set_trust_bundle(&identity.roots_pem())
        .map_err(|e| format!("the control plane's trust bundle: {e}"))?;
    own.install(&key, &chain)
        .map_err(|e| format!("the control plane's certificate: {e}"))?;
    Ok(not_after)
}

/// Renews the control plane's certificate at about 70% of its life, and at once
/// when the roots change (a rotation: the new root must be in its chain, and the
/// bundle it verifies clients with must be the new one).
async fn rotate_own_certificate(
    identity: std::sync::Arc<identity::Identity>,
    own: std::sync::Arc<sinew_tls::CertStore>,
    namespace: String,
    dns: Vec<String>,
    ips: Vec<std::net::IpAddr>,
) {
    let mut bundle = identity.bundle();
    bundle.borrow_and_update();
    loop {
        let left = own
            .not_after()
            .and_then(|t| t.duration_since(std::time::SystemTime::now()).ok())
            .unwrap_or(Duration::ZERO);
        let renew = left.mul_f64(0.7).max(Duration::from_secs(1));
        tokio::select! {
            _ = tokio::time::sleep(renew) => {}
            changed = bundle.changed() => if changed.is_err() { return },
        }
        bundle.borrow_and_update();
        match install_own_certificate(&identity, &own, &namespace, &dns, &ips) {
            Ok(_) => tracing::info!("control plane certificate renewed"),
            Err(e) => {
                tracing::error!(error = %e, "cannot renew the control plane's certificate");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

/// Writes the admin credential on first start: when no file is where it goes.
async fn write_admin_credential(
    opts: &ControlOptions,
    addr: SocketAddr,
    identity: &identity::Identity,
) -> Result<(), String> {
    let path = opts
        .admin_credentials
        .clone()
        .unwrap_or_else(|| opts.data_dir.join(credentials::ADMIN_FILE));
    let server = opts.advertise.clone().unwrap_or_else(|| {
        let ip = if addr.ip().is_unspecified() {
            std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST)
        } else {
            addr.ip()
        };
        format!("https://{}", SocketAddr::new(ip, addr.port()))
    });
    if path.exists() {
        identity.remember_admin_credential(&path, &server);
        return Ok(());
    }
    identity.write_admin_credential(&path, &server).await?;
    tracing::info!(path = %path.display(), "admin credential written (sinew --credentials, or SINEW_CREDENTIALS)");
    Ok(())
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}
