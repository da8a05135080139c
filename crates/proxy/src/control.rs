//! The control-plane client: one gRPC stream to `sinew control`.
//!
//! The proxy says who it is (and registers its workload), then applies each push
//! through the same path as a configuration file: documents are validated and
//! compiled by the model, listeners are bound before the swap, and the result is
//! ACKed, or NACKed with the reason while the last good configuration keeps serving.
//! When the control plane is away the proxy keeps serving and reconnects with jittered
//! exponential backoff; the first push on a new stream is the full set.

use std::collections::BTreeMap;
use std::time::Duration;

use sinew_api::v1::discovery_client::DiscoveryClient;
use std::time::{SystemTime, UNIX_EPOCH};

use sinew_api::v1::{
    Ack, CertificateRequest, ControlMessage, Demand, Hello, Leases, LimitDemand, ProxyMessage,
    Push, Registration, ReportRequest, TapEvents, control_message, proxy_message,
};
use sinew_model::load::Document;
use sinew_model::resource::{Resource, ResourceKey};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::reload::Applier;
use crate::state::Leave;

/// How often the demand of mesh-wide rate limits is reported.
pub const DEMAND_INTERVAL: Duration = Duration::from_millis(250);

/// The most resources a push sent in parts may gather: a bound on what a broken
/// control plane can make the proxy hold.
const MAX_PUSH_RESOURCES: usize = 1 << 20;

/// How often traffic stats are reported by default (only when there was traffic).
pub const STATS_INTERVAL: Duration = Duration::from_secs(2);

/// Tapped events sent in one message, and how long the first of them may wait for
/// company: batching keeps a busy tap from flooding the stream with tiny messages.
const TAP_BATCH: usize = 64;
const TAP_LINGER: Duration = Duration::from_millis(50);

/// Taps the control plane may run on one proxy at once; more are refused.
const MAX_TAPS: usize = 16;

/// The longest a lease is believed, whatever the control plane says.
const MAX_LEASE_TTL_MS: u64 = 10_000;

/// Who the proxy is to the control plane.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    /// The control plane, e.g. `https://127.0.0.1:15010`.
    pub url: String,
    /// `namespace/name` of this proxy.
    pub proxy: String,
    /// The workload this proxy serves, if any.
    pub registration: Option<Registration>,
    /// First reconnect delay; doubles up to `max_backoff` (full jitter).
    pub min_backoff: Duration,
    /// Longest reconnect delay.
    pub max_backoff: Duration,
    /// The bootstrap credential that proves this proxy's identity once (a join token,
    /// or a Kubernetes service-account token): with it the proxy gets its first
    /// certificate, and every stream after is authenticated by the certificate.
    pub join_token: Option<String>,
    /// Roots (PEM file) that verify the control plane at bootstrap; without it, the
    /// root hash a join token carries does.
    pub control_plane_ca: Option<std::path::PathBuf>,
    /// Where the proxy keeps its key, certificate and roots (owner-only), so that a
    /// restarted proxy goes on with its identity instead of bootstrapping again
    /// with a (single-use) token. None: kept in memory only.
    pub identity_dir: Option<std::path::PathBuf>,
    /// Where the token lives, if it came from a file: it is read again before every
    /// certificate request, so a token that is replaced on disk (a Kubernetes projected
    /// service-account token, rotated by the kubelet) is the one presented.
    pub join_token_file: Option<std::path::PathBuf>,
    /// How often traffic stats go to the control plane (`sinew stat`, `top`, `edges`);
    /// default 2 s. Zero turns them off (and gathering them).
    pub stats_interval: Duration,
    /// Transparent capture set up on this host (`sinew init`): the control plane turns
    /// on the capture listeners and sends every service.
    pub capture: Option<sinew_model::resource::CaptureSpec>,
}

/// `Proxy.spec.capture` as the Hello carries it.
fn capture_message(c: &sinew_model::resource::CaptureSpec) -> sinew_api::v1::Capture {
    sinew_api::v1::Capture {
        outbound_port: u32::from(c.outbound_port),
        inbound_port: u32::from(c.inbound_port),
        opaque_ports: c.opaque_ports.iter().map(|p| u32::from(*p)).collect(),
        detect_timeout: c
            .detect_timeout
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        dns_port: c.dns_port.map_or(0, u32::from),
    }
}

impl ControlSettings {
    /// Settings with default backoff (100 ms doubling to 5 s).
    pub fn new(url: impl Into<String>, proxy: impl Into<String>) -> ControlSettings {
        ControlSettings {
            url: url.into(),
            proxy: proxy.into(),
            registration: None,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            join_token: None,
            join_token_file: None,
            control_plane_ca: None,
            identity_dir: None,
            stats_interval: STATS_INTERVAL,
            capture: None,
        }
    }
}

/// Adds `push` to the parts gathered so far of a push sent in parts (a new push
/// drops the parts of an earlier one that never finished): the whole push once its
/// last part came, else `None`.
fn assemble(partial: &mut Option<Push>, push: Push) -> Result<Option<Push>, String> {
    let push = match partial.take() {
        Some(mut acc) if acc.nonce == push.nonce && acc.version == push.version => {
            acc.resources.extend(push.resources);
            acc.removed.extend(push.removed);
            acc.more = push.more;
            acc
        }
        _ => push,
    };
    if !push.more {
        return Ok(Some(push));
    }
    if push.resources.len() > MAX_PUSH_RESOURCES {
        return Err(format!(
            "the control plane sent a push of more than {MAX_PUSH_RESOURCES} resources"
        ));
    }
    *partial = Some(push);
    Ok(None)
}

/// The control plane's taps running on this stream; all stop when it ends.
#[derive(Debug, Default)]
struct Taps(std::collections::HashMap<u64, tokio::task::AbortHandle>);

impl Drop for Taps {
    fn drop(&mut self) {
        for t in self.0.values() {
            t.abort();
        }
    }
}

/// What a stream's stats reports need: a client on its connection and the proxy's
/// name. Reports go by `Discovery.Report`, not on the stream (see its proto docs).
#[derive(Debug, Clone)]
struct Reporter {
    client: DiscoveryClient<tonic::transport::Channel>,
    namespace: String,
    name: String,
    /// Longest a report may take.
    timeout: Duration,
}

/// Sends the requests matching `filter` to the control plane as tap `id`, in
/// batches, until stopped, the stream ends, or `filter.limit` were sent. A stream
/// that is backed up loses events (counted in `missed`) rather than slowing anything.
async fn run_tap(
    shared: std::sync::Arc<crate::state::Shared>,
    tx: mpsc::Sender<ProxyMessage>,
    id: u64,
    filter: crate::tap::Filter,
) {
    use tokio::sync::broadcast::error::RecvError;
    let mut sub = shared.tap.subscribe(filter.clone());
    let limit = filter.limit.unwrap_or(u64::MAX);
    let (mut sent, mut missed) = (0u64, 0u64);
    while sent < limit {
        let mut events = Vec::new();
        let mut linger: Option<tokio::time::Instant> = None;
        let room = usize::try_from(limit - sent)
            .unwrap_or(usize::MAX)
            .min(TAP_BATCH);
        while events.len() < room {
            let ev = match linger {
                None => sub.rx.recv().await,
                Some(until) => tokio::select! {
                    ev = sub.rx.recv() => ev,
                    _ = tokio::time::sleep_until(until) => break,
                },
            };
            match ev {
                Ok(e) if filter.matches(&e) => {
                    events.push(e.to_proto());
                    linger.get_or_insert_with(|| tokio::time::Instant::now() + TAP_LINGER);
                }
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => missed += n,
                Err(RecvError::Closed) => return,
            }
        }
        let n = events.len() as u64;
        let msg = ProxyMessage {
            kind: Some(proxy_message::Kind::TapEvents(TapEvents {
                id,
                events,
                missed,
            })),
        };
        match tx.try_send(msg) {
            Ok(()) => missed = 0,
            Err(mpsc::error::TrySendError::Full(_)) => missed += n,
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
        sent += n;
    }
}

struct Client {
    settings: ControlSettings,
    applier: Applier,
    /// What the applied configuration was made of, by key (JSON).
    resources: BTreeMap<ResourceKey, String>,
    applied: String,
    /// The key of the CSR in flight (it never leaves the process).
    pending_key: Option<String>,
    /// When to ask for the next certificate.
    renew_at: Option<tokio::time::Instant>,
}

/// When to renew a certificate valid until `not_after`: at about 70% of the time
/// left, jittered by ±5% so a fleet does not renew at once.
fn renewal_time(not_after: SystemTime) -> tokio::time::Instant {
    let left = not_after
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    let frac = 0.70 + (fastrand::f64() - 0.5) * 0.10;
    tokio::time::Instant::now() + left.mul_f64(frac)
}

/// Runs until the process stops: connect, serve pushes, reconnect.
pub async fn run(settings: ControlSettings, applier: Applier) {
    applier
        .shared()
        .stats
        .enable(!settings.stats_interval.is_zero());
    let mut client = Client {
        settings,
        applier,
        resources: BTreeMap::new(),
        applied: String::new(),
        pending_key: None,
        renew_at: None,
    };
    client.load_identity();
    let mut attempt: u32 = 0;
    loop {
        let result = client.session().await;
        client.lapse_leases();
        match result {
            Ok(true) => attempt = 0,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(url = %client.settings.url, error = %e, "control plane stream ended")
            }
        }
        let cap = client
            .settings
            .min_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(client.settings.max_backoff);
        // Full jitter: spreads a fleet's reconnects after a control-plane restart.
        let delay = cap.mul_f64(fastrand::f64());
        attempt = attempt.saturating_add(1);
        tokio::time::sleep(delay.max(Duration::from_millis(10))).await;
    }
}

impl Client {
    /// The endpoint of the control plane with this client's HTTP/2 settings.
    fn endpoint(&self) -> Result<tonic::transport::Endpoint, String> {
        Ok(sinew_api::channel::endpoint(&self.settings.url)
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            // No HPACK dynamic table for what the control plane sends us: it would
            // hold one per proxy connection (up to 4 KiB each, filled by the `date`
            // of every report's answer) to save a few bytes on small answers.
            .http2_header_table_size(0))
    }

    /// The proxy's `(namespace, name)`.
    fn names(&self) -> (String, String) {
        self.settings.proxy.split_once('/').map_or(
            ("default".to_owned(), self.settings.proxy.clone()),
            |(a, b)| (a.to_owned(), b.to_owned()),
        )
    }

    /// Reads the token file again, if there is one: a token replaced on disk (a
    /// projected service-account token the kubelet rotated) is the one presented.
    async fn refresh_token(&mut self) {
        if let Some(file) = &self.settings.join_token_file {
            match tokio::fs::read_to_string(file).await {
                Ok(t) if !t.trim().is_empty() => {
                    self.settings.join_token = Some(t.trim().to_owned())
                }
                Ok(_) => {
                    tracing::warn!(file = %file.display(), "the join-token file is empty; presenting the last token read")
                }
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "cannot read the join-token file; presenting the last token read")
                }
            }
        }
    }

    /// The proxy's first certificate: its bootstrap credential and a CSR, over TLS
    /// that verifies the control plane by the roots it was given or by the root hash
    /// in its join token (never trust on first use).
    async fn bootstrap(&mut self) -> Result<(), String> {
        self.refresh_token().await;
        let Some(token) = self.settings.join_token.clone() else {
            let msg = "no certificate and no join token: start the proxy with --join-token-file (see `sinew token create`)".to_owned();
            self.applier.set_error(Some(msg.clone()));
            return Err(msg);
        };
        let trust = match &self.settings.control_plane_ca {
            Some(path) => {
                let pem = tokio::fs::read_to_string(path).await.map_err(|e| {
                    format!(
                        "{}: cannot read the control plane's roots: {e}",
                        path.display()
                    )
                })?;
                sinew_tls::api::ControlTrust::from_pem("control-plane roots", &pem)
                    .map_err(|e| format!("{}: {e}", path.display()))?
            }
            None => match join_token_root(&token) {
                Some(hash) => sinew_tls::api::ControlTrust::Pinned(hash.to_owned()),
                None => {
                    let msg = "the bootstrap token carries no root hash (not a `sinew token create` token): give --control-plane-ca with the mesh roots".to_owned();
                    self.applier.set_error(Some(msg.clone()));
                    return Err(msg);
                }
            },
        };
        let tls = sinew_tls::api::control_client_config(trust, sinew_tls::api::ClientAuth::None)
            .map_err(|e| e.to_string())?;
        let channel = sinew_api::channel::connect(self.endpoint()?, tls)
            .await
            .map_err(|e| format!("cannot connect: {}", sinew_api::channel::error_chain(&e)))?;
        let (key, csr_der) = sinew_tls::new_key_and_csr().map_err(|e| e.to_string())?;
        let (namespace, name) = self.names();
        let cert = DiscoveryClient::new(channel)
            .bootstrap(sinew_api::v1::BootstrapRequest {
                namespace,
                name,
                csr_der,
                token,
            })
            .await
            .map_err(|s| {
                let msg = format!("bootstrap refused by the control plane: {}", s.message());
                self.applier.set_error(Some(msg.clone()));
                msg
            })?
            .into_inner();
        self.pending_key = Some(key);
        self.install_certificate(cert);
        if self.applier.shared().certs.is_ready() {
            Ok(())
        } else {
            Err("the bootstrap certificate was not installed".into())
        }
    }

    /// One stream. Returns whether a push was received (to reset the backoff).
    async fn session(&mut self) -> Result<bool, String> {
        let (tx, mut inbound, reporter) = self.open_stream().await?;
        tracing::info!(url = %self.settings.url, "connected to the control plane");
        let mut got_push = false;
        // The parts gathered so far of a push sent in parts.
        let mut partial: Option<Push> = None;
        // Mesh-wide rate limits: demand goes up every interval, leases come back.
        let mut report = tokio::time::interval(DEMAND_INTERVAL);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Traffic stats: deltas from the start of this stream (what happened while
        // the control plane was away is in the proxy's own metrics, not here).
        let stats_every = self.settings.stats_interval;
        // The first after one interval: by then the control plane has registered
        // the stream the reports are counted against.
        let stats_every_min = stats_every.max(Duration::from_millis(10));
        let mut stats = tokio::time::interval_at(
            tokio::time::Instant::now() + stats_every_min,
            stats_every_min,
        );
        stats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let _ = self.applier.shared().stats.take(String::new());
        // The report in flight, if any (a JoinSet aborts it with the session).
        let mut reporting = tokio::task::JoinSet::new();
        let mut taps = Taps::default();
        // A renewal is due when its time passed while disconnected.
        if self
            .renew_at
            .is_none_or(|t| t <= tokio::time::Instant::now())
        {
            self.request_certificate(&tx).await?;
        }
        let mut leave = self.applier.shared().leave.subscribe();
        let mut leaving_sent = false;
        loop {
            let renew = self.renew_at;
            let msg = tokio::select! {
                msg = inbound.message() => msg.map_err(|s| format!("{}: {}", s.code(), s.message()))?,
                _ = leave.wait_for(|l| *l != Leave::Staying), if !leaving_sent => {
                    // Shutting down: the workload leaves every view before the
                    // listeners close (answered with Drained).
                    leaving_sent = true;
                    let msg = ProxyMessage {
                        kind: Some(proxy_message::Kind::Draining(sinew_api::v1::Draining {})),
                    };
                    tx.send(msg).await.map_err(|_| "stream closed".to_owned())?;
                    continue;
                }
                _ = report.tick() => {
                    self.report_demand(&tx);
                    continue;
                }
                _ = stats.tick(), if !stats_every.is_zero() => {
                    // One report at a time: while one is in flight (a slow control
                    // plane), counts gather for the next.
                    while reporting.try_join_next().is_some() {}
                    if reporting.is_empty()
                        && let Some(report) = self.report_stats(&reporter)
                    {
                        reporting.spawn(report);
                    }
                    continue;
                }
                _ = sleep_until(renew) => {
                    self.request_certificate(&tx).await?;
                    continue;
                }
            };
            let Some(ControlMessage { kind: Some(kind) }) = msg else {
                if msg.is_none() {
                    return Ok(got_push);
                }
                continue;
            };
            let Some(push) = self.on_message(kind, &mut taps, &tx) else {
                continue;
            };
            let Some(push) = assemble(&mut partial, push)? else {
                continue;
            };
            got_push = true;
            self.apply_and_ack(push, &tx).await?;
        }
    }

    /// Connects (bootstrapping first when the proxy has no valid certificate), says
    /// hello and opens the stream: its sending side, its receiving side, and the
    /// stats reporter on the same channel.
    async fn open_stream(
        &mut self,
    ) -> Result<
        (
            mpsc::Sender<ProxyMessage>,
            tonic::Streaming<ControlMessage>,
            Reporter,
        ),
        String,
    > {
        // A proxy without a certificate (or with one that expired while the control
        // plane was away) bootstraps first; everything after rides the certificate.
        let certs = self.applier.shared().certs.clone();
        let expired = certs.not_after().is_none_or(|t| t <= SystemTime::now());
        if !certs.is_ready() || expired {
            self.bootstrap().await?;
        }
        let tls = sinew_tls::api::control_client_config(
            sinew_tls::api::ControlTrust::Store(certs.clone()),
            sinew_tls::api::ClientAuth::Store(certs),
        )
        .map_err(|e| e.to_string())?;
        let channel = sinew_api::channel::connect(self.endpoint()?, tls)
            .await
            .map_err(|e| format!("cannot connect: {}", sinew_api::channel::error_chain(&e)))?;
        let mut client = DiscoveryClient::new(channel);
        let (tx, rx) = mpsc::channel(16);
        let (namespace, name) = self.names();
        let reporter = Reporter {
            client: client.clone(),
            namespace: namespace.clone(),
            name: name.clone(),
            timeout: self.settings.stats_interval.max(Duration::from_secs(1)),
        };
        let hello = ProxyMessage {
            kind: Some(proxy_message::Kind::Hello(Hello {
                namespace,
                name,
                // A proxy leaving the mesh (reconnecting while it drains) does not
                // register its workload again.
                registration: self
                    .settings
                    .registration
                    .clone()
                    .filter(|_| *self.applier.shared().leave.borrow() == Leave::Staying),
                applied_version: self.applied.clone(),
                proxy_version: env!("CARGO_PKG_VERSION").to_owned(),
                capture: self.settings.capture.as_ref().map(capture_message),
            })),
        };
        tx.send(hello)
            .await
            .map_err(|_| "stream closed".to_owned())?;
        let inbound = client
            .stream(ReceiverStream::new(rx))
            .await
            .map_err(|s| format!("{}: {}", s.code(), s.message()))?
            .into_inner();
        Ok((tx, inbound, reporter))
    }

    /// Acts on a message from the control plane; a push (or a part of one) is
    /// returned for the caller to assemble and apply.
    fn on_message(
        &mut self,
        kind: control_message::Kind,
        taps: &mut Taps,
        tx: &mpsc::Sender<ProxyMessage>,
    ) -> Option<Push> {
        match kind {
            control_message::Kind::Push(push) => return Some(push),
            control_message::Kind::Certificate(cert) => self.install_certificate(cert),
            control_message::Kind::Leases(leases) => self.install_leases(&leases),
            control_message::Kind::TapStart(start) => self.start_tap(taps, tx, start),
            control_message::Kind::Drained(_) => {
                tracing::info!("the control plane has taken this workload out of the mesh");
                self.applier.shared().leave.send_replace(Leave::Done);
            }
            control_message::Kind::TapStop(stop) => {
                if let Some(t) = taps.0.remove(&stop.id) {
                    t.abort();
                }
            }
            control_message::Kind::TrustBundle(b) => {
                match self.applier.shared().certs.set_trust_bundle(&b.roots_pem) {
                    Ok(n) => {
                        tracing::info!(roots = n, "trust bundle updated");
                        self.keep(&[(ROOTS_FILE, &b.roots_pem)]);
                    }
                    Err(e) => tracing::error!(error = %e, "trust bundle refused"),
                }
                if b.renew {
                    // A root rotation is re-issuing: renew now, with a little
                    // jitter so the fleet does not arrive at once.
                    let jitter = Duration::from_millis(fastrand::u64(0..200));
                    self.renew_at = Some(tokio::time::Instant::now() + jitter);
                }
            }
        }
        None
    }

    /// Applies a whole push and acknowledges it (with the error when refused).
    async fn apply_and_ack(
        &mut self,
        push: Push,
        tx: &mpsc::Sender<ProxyMessage>,
    ) -> Result<(), String> {
        let (version, nonce) = (push.version.clone(), push.nonce.clone());
        let error = match self.apply(push) {
            Ok(()) => String::new(),
            Err(e) => {
                self.applier.refuse(&e);
                e
            }
        };
        self.applier.shared().metrics.push(error.is_empty());
        let ack = ProxyMessage {
            kind: Some(proxy_message::Kind::Ack(Ack {
                version,
                nonce,
                error,
            })),
        };
        tx.send(ack).await.map_err(|_| "stream closed".to_owned())?;
        // A new global limit should not wait for the next tick for its lease.
        self.report_demand(tx);
        Ok(())
    }

    /// The call sending the traffic stats gathered since the last report, if there
    /// was traffic. A report that fails is lost (its counts are in the proxy's own
    /// metrics); the next one carries what came after.
    fn report_stats(&self, reporter: &Reporter) -> Option<impl Future<Output = ()> + use<>> {
        let shared = self.applier.shared();
        let identity = shared
            .certs
            .identity()
            .map(|i| i.to_string())
            .unwrap_or_default();
        let stats = shared.stats.take(identity)?;
        let mut client = reporter.client.clone();
        let req = ReportRequest {
            namespace: reporter.namespace.clone(),
            name: reporter.name.clone(),
            stats: Some(stats),
        };
        let timeout = reporter.timeout;
        Some(async move {
            match tokio::time::timeout(timeout, client.report(req)).await {
                Ok(Ok(_)) => {}
                Ok(Err(s)) => {
                    tracing::debug!(code = ?s.code(), error = s.message(), "stats report refused");
                }
                Err(_) => tracing::debug!("stats report timed out"),
            }
        })
    }

    /// Starts a tap the control plane asked for (a bad filter is refused, and so is
    /// a tap past [`MAX_TAPS`]: logged, nothing runs).
    fn start_tap(
        &self,
        taps: &mut Taps,
        tx: &mpsc::Sender<ProxyMessage>,
        start: sinew_api::v1::TapStart,
    ) {
        let filter = match crate::tap::Filter::from_proto(&start.filter.unwrap_or_default()) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(id = start.id, error = %e, "tap refused: bad filter");
                return;
            }
        };
        taps.0.retain(|_, t| !t.is_finished());
        if taps.0.len() >= MAX_TAPS {
            tracing::warn!(id = start.id, max = MAX_TAPS, "tap refused: too many taps");
            return;
        }
        let task = tokio::spawn(run_tap(
            self.applier.shared().clone(),
            tx.clone(),
            start.id,
            filter,
        ));
        if let Some(old) = taps.0.insert(start.id, task.abort_handle()) {
            old.abort();
        }
    }

    /// Sends the demand of the global rate limits in force (nothing when there are
    /// none). Skipped when the stream is backed up: the next tick reports again.
    fn report_demand(&self, tx: &mpsc::Sender<ProxyMessage>) {
        let Some(snap) = self.applier.shared().snapshot.load_full() else {
            return;
        };
        let now = std::time::Instant::now();
        let limits: Vec<LimitDemand> = snap
            .rate_limits
            .iter()
            .filter(|l| l.config.global)
            .map(|l| LimitDemand {
                limit: l.config.name.clone(),
                keys: l.take_demand(now).into_iter().collect(),
            })
            .collect();
        if limits.is_empty() {
            return;
        }
        let _ = tx.try_send(ProxyMessage {
            kind: Some(proxy_message::Kind::Demand(Demand { limits })),
        });
    }

    /// Installs leases on the global limits they name; unknown names are ignored
    /// (a limit removed since the demand was sent).
    fn install_leases(&self, leases: &Leases) {
        let Some(snap) = self.applier.shared().snapshot.load_full() else {
            return;
        };
        let until =
            std::time::Instant::now() + Duration::from_millis(leases.ttl_ms.min(MAX_LEASE_TTL_MS));
        for lease in &leases.limits {
            let Some(l) = snap
                .rate_limits
                .iter()
                .find(|l| l.config.global && l.config.name == lease.limit)
            else {
                continue;
            };
            let keys = lease
                .keys
                .iter()
                .filter(|(_, k)| k.requests_per_second.is_finite() && k.requests_per_second >= 0.0)
                .take(crate::ratelimit::MAX_REPORTED_KEYS * 4)
                .map(|(key, k)| {
                    (
                        key.clone(),
                        crate::ratelimit::KeyShare {
                            rate: k.requests_per_second,
                            burst: k.burst.max(1),
                        },
                    )
                })
                .collect();
            l.set_leases(lease.proxies, keys, until);
        }
    }

    /// The control plane is away: every global limit falls back to its share.
    fn lapse_leases(&self) {
        if let Some(snap) = self.applier.shared().snapshot.load_full() {
            for l in snap.rate_limits.iter().filter(|l| l.config.global) {
                l.lapse();
            }
        }
    }

    /// Sends a CSR for a fresh key; the key stays here until the certificate comes.
    /// The stream is authenticated by the current certificate: no token goes along.
    async fn request_certificate(&mut self, tx: &mpsc::Sender<ProxyMessage>) -> Result<(), String> {
        let (key, csr_der) = sinew_tls::new_key_and_csr().map_err(|e| e.to_string())?;
        self.pending_key = Some(key);
        // If no answer comes, ask again after a while.
        self.renew_at = Some(tokio::time::Instant::now() + Duration::from_secs(30));
        let msg = ProxyMessage {
            kind: Some(proxy_message::Kind::Csr(CertificateRequest {
                csr_der,
                join_token: String::new(),
            })),
        };
        tx.send(msg).await.map_err(|_| "stream closed".to_owned())
    }

    /// Goes on with the identity kept in `identity_dir`, if there is one still
    /// valid: no bootstrap, and no token spent, after a restart.
    fn load_identity(&mut self) {
        let Some(dir) = self.settings.identity_dir.clone() else {
            return;
        };
        let read = |name: &str| std::fs::read_to_string(dir.join(name));
        let (Ok(key), Ok(chain), Ok(roots)) = (read(KEY_FILE), read(CERT_FILE), read(ROOTS_FILE))
        else {
            return;
        };
        let certs = &self.applier.shared().certs;
        let installed = certs
            .set_trust_bundle(&roots)
            .and_then(|_| certs.install(&key, &chain));
        match (installed, certs.not_after()) {
            (Ok(id), Some(not_after)) if not_after > SystemTime::now() => {
                self.renew_at = Some(renewal_time(not_after));
                self.applier.shared().metrics.certificate(not_after);
                tracing::info!(%id, dir = %dir.display(), "identity loaded");
            }
            (Ok(_), _) => {
                tracing::info!(dir = %dir.display(), "the kept certificate has expired; bootstrapping")
            }
            (Err(e), _) => {
                tracing::warn!(dir = %dir.display(), error = %e, "the kept identity is unusable; bootstrapping")
            }
        }
    }

    /// Keeps the identity in `identity_dir` (the directory 0700, the key 0600; each
    /// file replaced whole), if one is set.
    fn save_identity(&self, key: &str, chain: &str, roots: &str) {
        self.keep(&[(KEY_FILE, key), (CERT_FILE, chain), (ROOTS_FILE, roots)]);
    }

    /// Writes `files` into `identity_dir`, if one is set.
    fn keep(&self, files: &[(&str, &str)]) {
        let Some(dir) = &self.settings.identity_dir else {
            return;
        };
        let write = || -> Result<(), String> {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| e.to_string())?;
            for (name, text) in files {
                sinew_tls::private_file::write(&dir.join(name), text.as_bytes())
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        };
        if let Err(e) = write() {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot keep the identity; a restart will bootstrap again");
        }
    }

    fn install_certificate(&mut self, cert: sinew_api::v1::Certificate) {
        let certs = &self.applier.shared().certs;
        if !cert.error.is_empty() {
            let msg = format!("certificate refused by the control plane: {}", cert.error);
            tracing::error!("{msg}");
            self.applier.set_error(Some(msg));
            self.renew_at = Some(
                tokio::time::Instant::now() + self.settings.max_backoff.max(Duration::from_secs(1)),
            );
            return;
        }
        let Some(key) = self.pending_key.take() else {
            tracing::warn!("a certificate arrived for no pending request; ignored");
            return;
        };
        let installed = certs
            .set_trust_bundle(&cert.roots_pem)
            .and_then(|_| certs.install(&key, &cert.chain_pem));
        match installed {
            Ok(id) => {
                let not_after = UNIX_EPOCH
                    + Duration::from_secs(u64::try_from(cert.not_after_unix).unwrap_or(0));
                self.renew_at = Some(renewal_time(not_after));
                self.applier.shared().metrics.certificate(not_after);
                tracing::info!(%id, "certificate installed");
                self.save_identity(&key, &cert.chain_pem, &cert.roots_pem);
            }
            Err(e) => {
                tracing::error!(error = %e, "certificate refused by the proxy");
                self.renew_at = Some(tokio::time::Instant::now() + Duration::from_secs(5));
            }
        }
    }

    fn apply(&mut self, push: Push) -> Result<(), String> {
        if !push.full && self.applied.is_empty() {
            // A delta is built on a configuration this proxy never accepted (its
            // first full one was refused): applying it to nothing would run a part of
            // the mesh as if it were all of it. Refused, so the control plane sends
            // a full configuration.
            return Err(
                "a delta arrived before any full configuration was accepted: a full configuration is needed".into(),
            );
        }
        let mut next = if push.full {
            BTreeMap::new()
        } else {
            self.resources.clone()
        };
        for r in push.resources {
            let Some(k) = r.key else {
                return Err("push carries a resource without a key".into());
            };
            next.insert(
                ResourceKey {
                    kind: k.kind,
                    namespace: k.namespace,
                    name: k.name,
                },
                r.json,
            );
        }
        for k in push.removed {
            next.remove(&ResourceKey {
                kind: k.kind,
                namespace: k.namespace,
                name: k.name,
            });
        }
        if push.version == self.applied && next == self.resources {
            return Ok(()); // Already running exactly this (e.g. after a reconnect).
        }
        let mut docs = Vec::with_capacity(next.len());
        let mut problems = Vec::new();
        for (k, json) in &next {
            match Resource::from_json(&k.kind, json) {
                Ok(resource) => docs.push(Document {
                    resource,
                    file: "control-plane".into(),
                    line: 0,
                }),
                Err(e) => problems.push(format!("{k}: {e}")),
            }
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        // The check the control plane also runs on this proxy's view before sending it.
        let config =
            sinew_model::compile::accept(docs, &self.settings.proxy).map_err(|e| e.to_string())?;
        self.applier.apply(config, push.version.clone())?;
        self.applier.set_error(None);
        self.resources = next;
        self.applied = push.version;
        Ok(())
    }
}

/// The files of a kept identity (`ControlSettings::identity_dir`).
const KEY_FILE: &str = "key.pem";
const CERT_FILE: &str = "cert.pem";
const ROOTS_FILE: &str = "roots.pem";

/// The root hash in a join token `sinew.<sha256 hex>.<secret>`, if it has one.
fn join_token_root(token: &str) -> Option<&str> {
    let mut parts = token.strip_prefix("sinew.")?.split('.');
    let (hash, secret) = (parts.next()?, parts.next()?);
    (parts.next().is_none()
        && hash.len() == 64
        && hash.bytes().all(|b| b.is_ascii_hexdigit())
        && !secret.is_empty())
    .then_some(hash)
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
