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
pub mod dir;
pub mod discovery;
pub mod identity;
pub mod index;
pub mod quota;
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
                    store.clone(),
                )
            }
            None => identity::Identity::from_dir(
                &opts
                    .ca_dir
                    .clone()
                    .unwrap_or_else(|| opts.data_dir.join("ca")),
                opts.trust_domain.clone(),
                opts.cert_ttl,
                store.clone(),
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
        let discovery = discovery::DiscoveryService::new(
            index.clone(),
            state.clone(),
            stopping,
            identity.clone(),
        );
        let admin = admin::AdminService::new(index.clone(), state, store, identity.clone())
            .with_telemetry(discovery.telemetry());
        let server = tokio::spawn(async move {
            // Nagle off on every accepted connection: pushes and answers are small
            // writes, and with Nagle each could wait for the peer's delayed ACK
            // (40 ms on Linux). `Server::tcp_nodelay` is ignored for an incoming
            // stream of our own, so the incoming sets it.
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            let result = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(20)))
                .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                .add_service(DiscoveryServer::new(discovery))
                .add_service(AdminServer::new(admin))
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
