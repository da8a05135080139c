//! `sinew-proxy`: Sinew's data-plane proxy.
//!
//! One process beside each service instance. Listeners (see [`listeners`]):
//! - **inbound** accepts mesh traffic (HTTP/2 from peer sidecars, CONNECT tunnels for
//!   opaque TCP and upgrades) and forwards it to the local application;
//! - **outbound** per-upstream bindings (`127.0.0.1:9001 → catalog:http`) and an HTTP
//!   forward-proxy port that routes by Host, for `HTTP_PROXY`;
//! - **admin** (`/live`, `/ready`, `/metrics`, `/config`) on its own thread.
//!
//! Configuration is one immutable [`state::Snapshot`], swapped atomically on reload;
//! each request reads one snapshot from start to end. Standalone, the proxy runs from
//! a file of Kubernetes-shaped documents and reloads it when it changes.
//!
//! Embedded (and in tests), [`Proxy::builder`] starts one from a configuration
//! compiled in process ([`ConfigSource::Static`]) with an identity given directly
//! (a [`sinew_tls::CertStore`]): no file, no control plane.

pub mod accept;
pub mod access;
pub mod admin;
pub mod balance;
pub mod bindings;
pub mod body;
pub mod capture;
pub mod control;
pub mod dns;
pub mod drain;
pub mod ending;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
mod http_client;
pub mod http_util;
pub mod inbound;
pub mod jwt;
pub mod listeners;
pub mod mesh_listener;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod pool;
pub mod ratelimit;
pub mod reload;
pub mod resilience;
pub mod serve;
pub mod state;
pub mod stats;
pub mod stream;
pub mod tap;
pub mod trace;
pub mod types;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};

use crate::reload::{Applier, ConfigWatcher};

/// The configuration source's task, built on the admin thread's runtime.
type SourceTask =
    Box<dyn FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> + Send>;
use crate::state::{Leave, Settings, Shared};

/// The longest wait for the control plane to confirm a deregistration at shutdown.
const LEAVE_WAIT: Duration = Duration::from_secs(5);

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// A file of YAML documents, reloaded when it changes (standalone mode).
    File(PathBuf),
    /// The control plane.
    ControlPlane(Box<control::ControlSettings>),
    /// A compiled configuration given in process (an embedding program, a test):
    /// applied once at start, never reloaded.
    Static(Box<sinew_model::ProxyConfig>),
}

/// How to run a proxy.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Where the configuration comes from.
    pub source: ConfigSource,
    /// Which `Proxy` document to use (`name` or `namespace/name`); needed only when
    /// the file holds several.
    pub name: Option<String>,
    /// Admin listener; default `127.0.0.1:4191`.
    pub admin: SocketAddr,
    /// How often the file is checked for changes; default 1 s.
    pub reload_interval: Duration,
    /// How long in-flight work may take to finish on shutdown; default 30 s.
    pub drain_timeout: Duration,
    /// With a control plane, at shutdown: how long peers get to apply the views
    /// without this workload (after the control plane published them) before the
    /// listeners close. Requests a late peer sends meanwhile are still served.
    pub leave_delay: Duration,
    /// Time allowed to connect to an endpoint; default 5 s.
    pub connect_timeout: Duration,
    /// Time a client has to send request headers; default 30 s.
    pub header_read_timeout: Duration,
    /// Message head limits (see [`types::HeadLimits`] for the defaults).
    pub limits: types::HeadLimits,
    /// Connections each listener holds open at once; default 16384.
    pub max_connections: usize,
    /// An HTTP/2 connection idle this long is closed gracefully; default 5 min.
    pub idle_timeout: Duration,
    /// A TCP stream with no byte either way this long is closed; default 1 h
    /// (Envoy's `tcp_proxy` default).
    pub tcp_idle_timeout: Duration,
    /// The workload identity (certificate chain, key, trust roots), given directly
    /// instead of issued by a control plane. With one, the proxy speaks mTLS to peer
    /// sidecars and is ready only while the store holds a certificate and roots.
    /// `None`: an empty store (a control plane fills it; a file source runs without).
    pub identity: Option<Arc<sinew_tls::CertStore>>,
}

impl ProxyOptions {
    /// Defaults for standalone mode from the file `config`.
    pub fn new(config: impl Into<PathBuf>) -> ProxyOptions {
        Self::with_source(ConfigSource::File(config.into()))
    }

    /// Defaults for a proxy driven by the control plane.
    pub fn control_plane(settings: control::ControlSettings) -> ProxyOptions {
        Self::with_source(ConfigSource::ControlPlane(Box::new(settings)))
    }

    fn with_source(source: ConfigSource) -> ProxyOptions {
        ProxyOptions {
            source,
            name: None,
            admin: SocketAddr::from(([127, 0, 0, 1], 4191)),
            reload_interval: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(30),
            leave_delay: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(30),
            limits: types::HeadLimits::default(),
            max_connections: 16 * 1024,
            idle_timeout: Duration::from_secs(300),
            tcp_idle_timeout: Duration::from_secs(3600),
            identity: None,
        }
    }

    /// Defaults for a proxy running `config`, compiled in process.
    pub fn from_config(config: sinew_model::ProxyConfig) -> ProxyOptions {
        Self::with_source(ConfigSource::Static(Box::new(config)))
    }
}

/// Starts a proxy from values rather than a command line: a compiled
/// configuration (or documents to compile) and, optionally, an identity.
///
/// ```no_run
/// # async fn demo(cfg: sinew_model::ProxyConfig, store: std::sync::Arc<sinew_tls::CertStore>)
/// # -> Result<(), sinew_proxy::StartError> {
/// let proxy = sinew_proxy::Proxy::builder()
///     .config(cfg)
///     .identity(store)
///     .start()?;
/// # drop(proxy); Ok(()) }
/// ```
#[derive(Debug)]
pub struct ProxyBuilder {
    /// The configuration, or why the documents given did not compile.
    config: Result<sinew_model::ProxyConfig, String>,
    identity: Option<Arc<sinew_tls::CertStore>>,
    admin: SocketAddr,
    drain_timeout: Option<Duration>,
}

impl ProxyBuilder {
    /// Runs `config`. Replaces any configuration set before.
    pub fn config(mut self, config: sinew_model::ProxyConfig) -> ProxyBuilder {
        self.config = Ok(config);
        self
    }

    /// Runs what YAML (or JSON) `documents` compile to for the `Proxy` document
    /// `proxy` (`name` or `namespace/name`). Documents that do not validate make
    /// `start` fail with every problem.
    pub fn documents(mut self, documents: &str, proxy: &str) -> ProxyBuilder {
        self.config = sinew_model::compile::compile_text("documents", documents, Some(proxy))
            .map_err(|e| e.to_string());
        self
    }

    /// Uses `store` as the workload identity (see [`ProxyOptions::identity`]).
    pub fn identity(mut self, store: Arc<sinew_tls::CertStore>) -> ProxyBuilder {
        self.identity = Some(store);
        self
    }

    /// The admin listener's address (default `127.0.0.1:0`: any free port).
    pub fn admin(mut self, addr: SocketAddr) -> ProxyBuilder {
        self.admin = addr;
        self
    }

    /// How long in-flight work may take to finish on shutdown (default 30 s).
    pub fn drain_timeout(mut self, timeout: Duration) -> ProxyBuilder {
        self.drain_timeout = Some(timeout);
        self
    }

    /// The options `start` runs with; for the settings the builder does not name.
    pub fn into_options(self) -> Result<ProxyOptions, StartError> {
        let mut opts = ProxyOptions::from_config(self.config.map_err(StartError::Config)?);
        opts.identity = self.identity;
        opts.admin = self.admin;
        if let Some(t) = self.drain_timeout {
            opts.drain_timeout = t;
        }
        Ok(opts)
    }

    /// Starts the proxy on the current Tokio runtime (see [`Proxy::start`]).
    pub fn start(self) -> Result<Proxy, StartError> {
        Proxy::start(self.into_options()?)
    }
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Not called from within a Tokio runtime.
    #[error("the proxy must be started inside a Tokio runtime")]
    NoRuntime,
    /// The admin address could not be bound.
    #[error("cannot listen on admin address {addr}: {source}")]
    Admin {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The admin thread could not be started.
    #[error("cannot start the admin thread: {0}")]
    Thread(std::io::Error),
    /// The configuration given in process was refused (every problem, one a line).
    #[error("configuration refused:\n{0}")]
    Config(String),
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainOutcome {
    /// True when every connection finished before the deadline.
    pub clean: bool,
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    admin_addr: SocketAddr,
    reload_tx: mpsc::Sender<()>,
    stop_admin: Option<oneshot::Sender<()>>,
    drain_timeout: Duration,
    /// With a control plane: leave the mesh first, then wait this long for peers.
    leave_first: Option<Duration>,
}

impl Proxy {
    /// A builder for a proxy run from values: no configuration yet, no identity,
    /// the admin listener on any free loopback port.
    pub fn builder() -> ProxyBuilder {
        ProxyBuilder {
            config: Err("no configuration given (ProxyBuilder::config or ::documents)".into()),
            identity: None,
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            drain_timeout: None,
        }
    }

    /// Starts the proxy on the current Tokio runtime (which becomes the data plane).
    /// The configuration is loaded before this returns: when it is valid, every
    /// listener is bound and accepting. When it is not, the proxy still starts, not
    /// ready, reports the problems, and applies the file once it is fixed.
    pub fn start(opts: ProxyOptions) -> Result<Proxy, StartError> {
        let rt = Handle::try_current().map_err(|_| StartError::NoRuntime)?;
        let settings = Settings {
            connect_timeout: opts.connect_timeout,
            header_read_timeout: opts.header_read_timeout,
            limits: opts.limits,
            max_connections: opts.max_connections,
            idle_timeout: opts.idle_timeout,
            tcp_idle_timeout: opts.tcp_idle_timeout,
        };
        let given_identity = opts.identity.is_some();
        let certs = opts
            .identity
            .clone()
            .unwrap_or_else(sinew_tls::CertStore::new);
        let shared = Arc::new(Shared::with_certs(settings, certs));
        if given_identity {
            // As with a control plane: streams are authenticated with this identity,
            // and the proxy is not ready without it.
            shared
                .identity_required
                .store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(not_after) = shared.certs.not_after() {
                shared.metrics.certificate(not_after);
            }
        }
        let admin = std::net::TcpListener::bind(opts.admin)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| StartError::Admin {
                addr: opts.admin,
                source,
            })?;
        let admin_addr = admin.local_addr().map_err(|source| StartError::Admin {
            addr: opts.admin,
            source,
        })?;
        let applier = Applier::new(shared.clone(), rt);
        let (reload_tx, reload_rx) = mpsc::channel(1);
        let (stop_tx, stop_rx) = oneshot::channel();
        let (source_label, task) = config_task(&opts, &shared, applier, reload_rx);
        spawn_admin(admin, shared.clone(), source_label, task, stop_rx)?;
        tracing::info!(admin = %admin_addr, "sinew-proxy started");
        Ok(Proxy {
            shared,
            admin_addr,
            reload_tx,
            stop_admin: Some(stop_tx),
            drain_timeout: opts.drain_timeout,
            leave_first: matches!(opts.source, ConfigSource::ControlPlane(_))
                .then_some(opts.leave_delay),
        })
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Shared state (snapshot, metrics), for embedding and tests.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The address actually bound for a configured listener address.
    pub fn bound_addr(&self, configured: SocketAddr) -> Option<SocketAddr> {
        self.shared
            .bound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&configured)
            .copied()
    }

    /// Exports the spans ended so far now rather than with the next batch, and waits
    /// for the collector's answer (bounded by the SDK's flush timeout, 5 s).
    pub async fn flush_traces(&self) {
        let tracing = self
            .shared
            .snapshot
            .load_full()
            .and_then(|s| s.tracing.clone());
        if let Some(t) = tracing {
            // Blocking (it waits for the exporting thread): off the runtime's workers.
            let _ = tokio::task::spawn_blocking(move || t.flush()).await;
        }
    }

    /// Asks for the configuration file to be re-read now (SIGHUP). With an
    /// in-process configuration: applies it again if its listeners could not all
    /// be bound.
    pub fn reload(&self) {
        let _ = self.reload_tx.try_send(());
    }

    /// Takes this proxy's workload out of the mesh before anything stops: the
    /// control plane publishes every view without it (bounded wait), then peers get
    /// `delay` to apply theirs. Until then the proxy serves as usual (not ready), so
    /// no peer's request meets a closed listener or a GOAWAY.
    async fn leave(&self, delay: Duration) {
        let leave = &self.shared.leave;
        leave.send_replace(Leave::Asked);
        let mut rx = leave.subscribe();
        let done = rx.wait_for(|l| *l == Leave::Done);
        match tokio::time::timeout(LEAVE_WAIT.min(self.drain_timeout), done).await {
            Ok(_) => tracing::info!(?delay, "out of the mesh; peers are catching up"),
            Err(_) => {
                tracing::warn!("the control plane did not confirm the deregistration in time")
            }
        }
        tokio::time::sleep(delay).await;
    }

    /// Stops accepting, lets in-flight requests and connections finish for up to
    /// the drain timeout, then closes whatever is left.
    pub async fn shutdown(mut self) -> DrainOutcome {
        if let Some(delay) = self.leave_first {
            self.leave(delay).await;
        }
        tracing::info!(deadline = ?self.drain_timeout, "draining");
        let clean = self.shared.drain.shutdown(self.drain_timeout).await;
        // The last requests' spans leave before the process does.
        self.flush_traces().await;
        if let Some(stop) = self.stop_admin.take() {
            let _ = stop.send(());
        }
        tracing::info!(clean, "stopped");
        DrainOutcome { clean }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.drain.close();
        if let Some(stop) = self.stop_admin.take() {
            let _ = stop.send(());
        }
    }
}

/// The task that keeps the proxy's configuration (watching a file, following a
/// control plane, or holding an in-process one) and how the admin API names its
/// source. The file and static sources are applied once before this returns.
fn config_task(
    opts: &ProxyOptions,
    shared: &Arc<Shared>,
    applier: Applier,
    reload_rx: mpsc::Receiver<()>,
) -> (String, SourceTask) {
    match &opts.source {
        ConfigSource::File(path) => {
            let mut watcher = ConfigWatcher::new(path.clone(), opts.name.clone(), applier);
            if let Err(e) = watcher.load(true) {
                tracing::error!(
                    "starting without configuration; fix the file and it is applied:\n{e}"
                );
            }
            let interval = opts.reload_interval;
            (
                path.display().to_string(),
                Box::new(move || Box::pin(watcher.run(reload_rx, interval))),
            )
        }
        ConfigSource::ControlPlane(settings) => {
            let settings = (**settings).clone();
            // Every proxy of a control plane has a mesh identity: its streams
            // are authenticated with it.
            shared
                .identity_required
                .store(true, std::sync::atomic::Ordering::Relaxed);
            (
                format!("control plane {}", settings.url),
                Box::new(move || Box::pin(control::run(settings, applier))),
            )
        }
        ConfigSource::Static(config) => {
            let mut applier = applier;
            let config = (**config).clone();
            let json = serde_json::to_vec(&config).unwrap_or_default();
            let version = format!("{:016x}", reload::fnv64(&json));
            // Refused only for listeners that cannot be bound (reported as for a
            // file): kept, and applied again on `reload`, when a port may be free.
            let mut pending = match applier.apply(config.clone(), version.clone()) {
                Ok(_) => None,
                Err(e) => {
                    applier.refuse(&e);
                    Some((config, version))
                }
            };
            (
                "in-process configuration".to_owned(),
                Box::new(move || {
                    Box::pin(async move {
                        // The applier owns the listeners: kept until the proxy goes.
                        let mut reload_rx = reload_rx;
                        while reload_rx.recv().await.is_some() {
                            if let Some((config, version)) = pending.take()
                                && let Err(e) = applier.apply(config.clone(), version.clone())
                            {
                                applier.refuse(&e);
                                pending = Some((config, version));
                            }
                        }
                    })
                }),
            )
        }
    }
}

/// The admin thread: its own current-thread runtime serving the admin API and the
/// configuration task, so a busy data plane never delays `/ready` or a reload.
fn spawn_admin(
    admin: std::net::TcpListener,
    admin_shared: Arc<Shared>,
    source_label: String,
    task: SourceTask,
    stop_rx: oneshot::Receiver<()>,
) -> Result<(), StartError> {
    std::thread::Builder::new()
        .name("sinew-admin".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "admin runtime failed to start");
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(admin) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "admin listener failed");
                        return;
                    }
                };
                tokio::select! {
                    _ = admin::serve(listener, admin_shared, source_label) => {}
                    _ = task() => {}
                    _ = stop_rx => {}
                }
            });
        })
        .map_err(StartError::Thread)?;
    Ok(())
}
