//! The discovery stream: one per proxy.
//!
//! After the proxy's `Hello`, the stream task registers its workload, then watches
//! the mesh state: whenever the proxy's view changes it sends a push (the full view
//! first, deltas after), and relays ACKs and NACKs to the index. Each stream computes
//! its own view, so proxies are served in parallel. `Report` takes a connected
//! proxy's stats report (see [`crate::telemetry`]).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::Stream;
use sinew_api::v1::discovery_server::Discovery;
use sinew_api::v1::{
    self as api, ControlMessage, ProxyMessage, Push, control_message, proxy_message,
};
use sinew_model::fields::{DnsLabel, DnsSubdomain};
use sinew_model::resource::{
    Metadata, Object, ResourceKey, SINEW_API_VERSION, SidecarRef, WorkloadSpec,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::index::{Command, DocEntry, MeshState};
use crate::view::{self, View};

/// The `Discovery` gRPC service.
#[derive(Debug, Clone)]
pub struct DiscoveryService {
    index: mpsc::Sender<Command>,
    state: watch::Receiver<Arc<MeshState>>,
    streams: Arc<AtomicU64>,
    stopping: watch::Receiver<bool>,
    identity: Arc<crate::identity::Identity>,
    quotas: Arc<crate::quota::Quotas>,
    telemetry: Arc<crate::telemetry::Telemetry>,
    owners: Arc<Owners>,
    /// Bootstraps in progress (each may call the Kubernetes TokenReview API): a flood
    /// of them is refused rather than queued against the API server.
    bootstraps: Arc<tokio::sync::Semaphore>,
}

/// Bootstraps handled at once; more are refused with `RESOURCE_EXHAUSTED`.
const MAX_BOOTSTRAPS: usize = 32;

/// Which identity owns each proxy name: the one that streamed under it last. Another
/// identity may take the name only once the owner has been gone for the grace period
/// (its workload is then deregistered too).
#[derive(Debug, Default)]
struct Owners {
    names: std::sync::Mutex<std::collections::HashMap<String, Owner>>,
    grace: std::time::Duration,
}

#[derive(Debug)]
struct Owner {
    id: sinew_tls::SpiffeId,
    streams: usize,
    left: Option<std::time::Instant>,
}

impl Owners {
    /// The table, without the names whose owner has been gone for the grace period.
    fn current(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Owner>> {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        names.retain(|_, o| {
            o.streams > 0 || o.left.is_none_or(|t| now.duration_since(t) < self.grace)
        });
        names
    }

    /// Takes `proxy` for `id` (one more stream), or says who holds it.
    fn take(&self, proxy: &str, id: &sinew_tls::SpiffeId) -> Result<(), Status> {
        let mut names = self.current();
        match names.get_mut(proxy) {
            Some(o) if o.id != *id => Err(Status::permission_denied(format!(
                "the proxy name {proxy} belongs to {}; {id} cannot take it",
                o.id
            ))),
            Some(o) => {
                o.streams += 1;
                o.left = None;
                Ok(())
            }
            None => {
                names.insert(
                    proxy.to_owned(),
                    Owner {
                        id: id.clone(),
                        streams: 1,
                        left: None,
                    },
                );
                Ok(())
            }
        }
    }

    /// One stream of `proxy` ended.
    fn release(&self, proxy: &str) {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = names.get_mut(proxy) {
            o.streams = o.streams.saturating_sub(1);
            if o.streams == 0 {
                o.left = Some(std::time::Instant::now());
            }
        }
    }

    /// `proxy` belongs to no authenticated identity now (for the migration
    /// window's unauthenticated streams).
    fn unowned(&self, proxy: &str) -> Result<(), Status> {
        let names = self.current();
        match names.get(proxy) {
            Some(o) => Err(Status::permission_denied(format!(
                "the proxy name {proxy} belongs to {}: a plaintext stream cannot take it",
                o.id
            ))),
            None => Ok(()),
        }
    }

    /// `proxy` is streaming now, under `id`.
    fn streaming(&self, proxy: &str, id: &sinew_tls::SpiffeId) -> bool {
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        names
            .get(proxy)
            .is_some_and(|o| o.streams > 0 && o.id == *id)
    }
}

/// Ends a stream's ownership of its name when the stream task ends, however it ends.
struct OwnedName {
    owners: Arc<Owners>,
    proxy: String,
}

impl Drop for OwnedName {
    fn drop(&mut self) {
        self.owners.release(&self.proxy);
    }
}

impl DiscoveryService {
    /// A service over the index. Streams end when `stopping` turns true, so the
    /// server's graceful shutdown can finish.
    pub fn new(
        index: mpsc::Sender<Command>,
        state: watch::Receiver<Arc<MeshState>>,
        stopping: watch::Receiver<bool>,
        identity: Arc<crate::identity::Identity>,
    ) -> Self {
        DiscoveryService {
            index,
            state,
            streams: Arc::new(AtomicU64::new(0)),
            stopping,
            identity,
            quotas: Arc::new(crate::quota::Quotas::default()),
            telemetry: Arc::new(crate::telemetry::Telemetry::default()),
            owners: Arc::new(Owners {
                grace: std::time::Duration::from_secs(30),
                ..Owners::default()
            }),
            bootstraps: Arc::new(tokio::sync::Semaphore::new(MAX_BOOTSTRAPS)),
        }
    }

    /// How long a proxy name stays its identity's after its last stream ended (the
    /// registration grace period).
    pub fn with_grace(mut self, grace: std::time::Duration) -> Self {
        self.owners = Arc::new(Owners {
            grace,
            ..Owners::default()
        });
        self
    }

    /// The proxy calling: its verified workload identity, or `None` for a proxy of
    /// an earlier release on the plaintext migration window.
    fn caller<T>(&self, req: &Request<T>) -> Result<Option<sinew_tls::SpiffeId>, Status> {
        if crate::auth::peer(req).is_some_and(|p| p.plaintext) {
            return Ok(None);
        }
        crate::auth::workload(req, self.identity.trust_domain()).map(Some)
    }

    /// The telemetry the proxies' streams feed (stats, taps), for the Admin API.
    pub fn telemetry(&self) -> Arc<crate::telemetry::Telemetry> {
        self.telemetry.clone()
    }
}

/// A proxy's namespace (`default` when empty) and `namespace/name`, as its Hello or
/// a report names it; a malformed name is refused, naming it.
pub(crate) fn proxy_name<'a>(namespace: &'a str, name: &str) -> Result<(&'a str, String), Status> {
    let ns = if namespace.is_empty() {
        "default"
    } else {
        namespace
    };
    // The model's rules (Kubernetes'): the Proxy and Workload documents made for
    // this proxy are named so, and would be refused otherwise.
    if !DnsLabel::is_valid(ns) || !DnsSubdomain::is_valid(name) {
        return Err(Status::invalid_argument(format!(
            "invalid proxy name {ns:?}/{name:?}"
        )));
    }
    Ok((ns, format!("{ns}/{name}")))
}

/// The `Proxy.spec.capture` a Hello asks for, checked as the model checks documents.
pub(crate) fn capture_spec(c: &api::Capture) -> Result<sinew_model::resource::CaptureSpec, Status> {
    let port = |field: &str, v: u32| {
        u16::try_from(v)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| Status::invalid_argument(format!("capture.{field}: {v} is not a port")))
    };
    let detect_timeout: Option<sinew_model::resource::Parsed<std::time::Duration>> =
        match c.detect_timeout.as_str() {
            "" => None,
            d => match d.parse() {
                Ok(t) => Some(t),
                Err(e) => {
                    return Err(Status::invalid_argument(format!(
                        "capture.detect_timeout: {e}"
                    )));
                }
            },
        };
    if detect_timeout.as_ref().is_some_and(|d| d.is_zero()) {
        return Err(Status::invalid_argument(
            "capture.detect_timeout: must be more than zero",
        ));
    }
    let spec = sinew_model::resource::CaptureSpec {
        outbound_port: port("outbound_port", c.outbound_port)?,
        inbound_port: port("inbound_port", c.inbound_port)?,
        opaque_ports: c
            .opaque_ports
            .iter()
            .map(|p| port("opaque_ports", *p))
            .collect::<Result<_, _>>()?,
        detect_timeout,
        dns_port: match c.dns_port {
            0 => None,
            p => Some(port("dns_port", p)?),
        },
    };
    if spec.outbound_port == spec.inbound_port {
        return Err(Status::invalid_argument(
            "capture.inbound_port: the same port as capture.outbound_port",
        ));
    }
    Ok(spec)
}

/// Turns a registration into the Workload it stands for (named after the proxy).
pub(crate) fn workload(
    ns: &str,
    name: &str,
    r: &api::Registration,
) -> Result<Object<WorkloadSpec>, Status> {
    let Ok(address) = r.address.parse() else {
        return Err(Status::invalid_argument(format!(
            "registration.address {:?} is not an IP address",
            r.address
        )));
    };
    let mut ports = BTreeMap::new();
    for (k, v) in &r.ports {
        let port = u16::try_from(*v).ok().filter(|p| *p != 0).ok_or_else(|| {
            Status::invalid_argument(format!("registration.ports.{k}: {v} is not a port"))
        })?;
        ports.insert(k.clone(), port);
    }
    let sidecar = match r.sidecar_port {
        0 => None,
        p => Some(SidecarRef {
            port: u16::try_from(p)
                .map_err(|_| Status::invalid_argument("registration.sidecar_port is not a port"))?,
        }),
    };
    Ok(Object {
        api_version: SINEW_API_VERSION.to_owned(),
        kind: "Workload".to_owned(),
        metadata: Metadata {
            name: name.to_owned(),
            namespace: Some(ns.to_owned()),
            labels: r.labels.clone().into_iter().collect(),
            ..Metadata::default()
        },
        spec: WorkloadSpec {
            service: (!r.service.is_empty()).then(|| r.service.clone()),
            address,
            ports,
            sidecar,
            service_account: (!r.service_account.is_empty()).then(|| r.service_account.clone()),
        },
    })
}

fn key_msg(k: &ResourceKey) -> api::ResourceKey {
    api::ResourceKey {
        kind: k.kind.clone(),
        namespace: k.namespace.clone(),
        name: k.name.clone(),
    }
}

fn resource_msg(e: &DocEntry) -> api::Resource {
    api::Resource {
        key: Some(key_msg(&e.key)),
        json: e.json.to_string(),
    }
}

/// The push that takes a proxy from `sent` to `view`: both are sorted by key, so
/// one pass over the two finds what changed.
fn push(sent: Option<&View>, view: &View, nonce: u64) -> Push {
    let mut resources = Vec::new();
    let mut removed = Vec::new();
    match sent {
        None => resources.extend(view.entries.iter().map(|e| resource_msg(e))),
        Some(s) => {
            let (mut old, mut new) = (s.entries.iter().peekable(), view.entries.iter().peekable());
            loop {
                match (old.peek(), new.peek()) {
                    // Consecutive views share most entries: the same entry needs no
                    // key comparison.
                    (Some(a), Some(b)) if Arc::ptr_eq(a, b) => {
                        old.next();
                        new.next();
                    }
                    (Some(a), Some(b)) => match a.key.cmp(&b.key) {
                        std::cmp::Ordering::Less => {
                            removed.push(key_msg(&a.key));
                            old.next();
                        }
                        std::cmp::Ordering::Greater => {
                            resources.push(resource_msg(b));
                            new.next();
                        }
                        std::cmp::Ordering::Equal => {
                            if a.hash != b.hash {
                                resources.push(resource_msg(b));
                            }
                            old.next();
                            new.next();
                        }
                    },
                    (Some(a), None) => {
                        removed.push(key_msg(&a.key));
                        old.next();
                    }
                    (None, Some(b)) => {
                        resources.push(resource_msg(b));
                        new.next();
                    }
                    (None, None) => break,
                }
            }
        }
    }
    Push {
        version: view.version.clone(),
        nonce: nonce.to_string(),
        full: sent.is_none(),
        resources,
        removed,
        more: false,
    }
}

/// A push awaiting the proxy's answer.
struct InFlight {
    nonce: String,
    view: View,
    full: bool,
}

/// A proxy's computed view after the proxy's own acceptance check
/// ([`sinew_model::compile::accept`]): what it would refuse is left out.
struct Checked {
    /// Version of the view as computed.
    raw: String,
    /// What may be sent (`None`: nothing, the proxy would refuse its own document).
    view: Option<View>,
    /// Why documents were left out.
    problems: Vec<String>,
}

impl Checked {
    /// Runs the check on `raw`, leaving out the documents the proxy `proxy` would
    /// refuse, a few rounds (leaving one out can make another fail).
    fn new(raw: View, proxy: &str) -> Checked {
        let version = raw.version.clone();
        let (ns, name) = proxy.split_once('/').unwrap_or(("default", proxy));
        // A capturing or forward proxy's view is every Service, Workload, route and
        // TrafficPolicy (and RoutePolicy): each Workload and route (with its policies)
        // is then checked against the same Services as in the whole set, which the
        // index has checked already. Only
        // what is this proxy's own is checked here (its Proxy document and Workload,
        // its namespace's inbound policies), against every Service: the whole view
        // would cost a compile of the mesh per proxy per change.
        let own_workload = raw.entries.iter().find_map(|e| match &e.resource {
            sinew_model::resource::Resource::Proxy(p)
                if e.key.namespace == ns && e.key.name == name =>
            {
                let everything = p.spec.outbound.http_proxy.is_some() || p.spec.capture.is_some();
                everything.then(|| p.spec.workload.clone().unwrap_or_else(|| name.to_owned()))
            }
            _ => None,
        });
        let checked = |e: &DocEntry| match &own_workload {
            None => true,
            Some(w) => match e.key.kind.as_str() {
                // A RoutePolicy goes with its route (checked without it, it would
                // name a route that is not there).
                "HTTPRoute" | "RoutePolicy" => false,
                "Workload" => e.key.namespace == ns && e.key.name == *w,
                _ => true,
            },
        };
        let mut view = raw;
        let mut problems = Vec::new();
        for _round in 0..8 {
            let docs = view
                .entries
                .iter()
                .filter(|e| checked(e))
                .map(|e| sinew_model::load::Document {
                    resource: e.resource.clone(),
                    file: "control-plane".into(),
                    line: 0,
                })
                .collect();
            let errors = match sinew_model::compile::accept(docs, proxy) {
                Ok(_) => {
                    return Checked {
                        raw: version,
                        view: Some(view),
                        problems,
                    };
                }
                Err(errors) => errors,
            };
            let blamed: std::collections::BTreeSet<&str> = errors
                .0
                .iter()
                .filter_map(|e| e.resource.as_deref())
                .collect();
            let own = |e: &DocEntry| e.key.kind == "Proxy";
            let (out, keep): (Vec<_>, Vec<_>) = view
                .entries
                .iter()
                .cloned()
                .partition(|e| blamed.contains(e.resource.label().as_str()));
            problems.extend(errors.0.iter().map(|e| e.to_string()));
            if out.is_empty() || out.iter().any(|e| own(e)) {
                break;
            }
            view = View::new(keep);
        }
        Checked {
            raw: version,
            view: None,
            problems,
        }
    }
}

/// How long a registering proxy's first push waits for its registration to be
/// published (a debounce period, at most ten under churn, in the normal case).
const REGISTRATION_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// JSON bytes per push part (a resource larger than this gets a part of its own).
const PART_BYTES: usize = 8 * 1024;

/// Splits a push into parts of about `limit` bytes of JSON: every part but the last
/// says `more`; removals travel in the last.
fn parts(push: Push, limit: usize) -> Vec<Push> {
    let Push {
        version,
        nonce,
        full,
        resources,
        removed,
        more: _,
    } = push;
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for r in resources {
        if bytes > 0 && bytes + r.json.len() > limit {
            out.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += r.json.len();
        current.push(r);
    }
    out.push(current);
    let last = out.len() - 1;
    let mut removed = Some(removed);
    out.into_iter()
        .enumerate()
        .map(|(i, resources)| Push {
            version: version.clone(),
            nonce: nonce.clone(),
            full,
            resources,
            removed: if i == last {
                removed.take().unwrap_or_default()
            } else {
                Vec::new()
            },
            more: i != last,
        })
        .collect()
}

async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}

type PushStream = Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = PushStream;

    async fn stream(
        &self,
        req: Request<Streaming<ProxyMessage>>,
    ) -> Result<Response<PushStream>, Status> {
        // A proxy of an earlier release on the plaintext migration window has no
        // certificate: it is served as before, its claims unverified, and it may
        // not take a name an authenticated proxy holds.
        let caller = self.caller(&req)?;
        let peer = crate::auth::peer(&req)
            .map(|p| p.remote.to_string())
            .unwrap_or_default();
        let mut inbound = req.into_inner();
        let mut hello = match inbound.message().await? {
            Some(ProxyMessage {
                kind: Some(proxy_message::Kind::Hello(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be a Hello",
                ));
            }
        };
        let (ns, proxy) = proxy_name(&hello.namespace, &hello.name)?;
        let ns = ns.to_owned();
        if let Some(caller) = &caller {
            // A Service that lists other accounts may have been applied a moment
            // ago: for a registration under a service not named like the account,
            // the index's current state counts, published or not.
            let elsewhere = hello.registration.as_ref().is_some_and(|r| {
                !r.service.is_empty()
                    && Some(r.service.as_str()) != caller.workload_parts().map(|(_, sa)| sa)
            });
            let state = if elsewhere {
                let (reply, current) = tokio::sync::oneshot::channel();
                self.index
                    .send(Command::Current { reply })
                    .await
                    .map_err(|_| Status::unavailable("control plane is shutting down"))?;
                current
                    .await
                    .map_err(|_| Status::unavailable("control plane is shutting down"))?
            } else {
                self.state.borrow().clone()
            };
            let admits = |service: &str, account: &str| admits(&state, &ns, service, account);
            authorize_hello(caller, &ns, &proxy, hello.registration.as_mut(), admits)?;
        }
        let ns = ns.as_str();
        let capture = hello.capture.as_ref().map(capture_spec).transpose()?;
        let workload = hello
            .registration
            .as_ref()
            .map(|r| workload(ns, &hello.name, r).map(Box::new))
            .transpose()?;
        // A workload registered earlier under this name (e.g. before a restart of
        // the control plane) is its identity's.
        let owned = match &caller {
            Some(caller) => {
                if let Some(r) = self.state.borrow().registrations.get(&proxy) {
                    let account = r.workload.spec.service_account();
                    if Some(account) != caller.workload_parts().map(|(_, sa)| sa) {
                        return Err(Status::permission_denied(format!(
                            "the proxy name {proxy} is registered for service account {account:?}; {caller} cannot take it"
                        )));
                    }
                }
                self.owners.take(&proxy, caller)?;
                Some(OwnedName {
                    owners: self.owners.clone(),
                    proxy: proxy.clone(),
                })
            }
            None => {
                self.owners.unowned(&proxy)?;
                tracing::warn!(%proxy, %peer, "a proxy streams on the plaintext migration window: its claims are not verified; upgrade it");
                None
            }
        };
        let stream = self.streams.fetch_add(1, Ordering::Relaxed);
        let registered = workload.as_deref().cloned();
        let index = self.index.clone();
        index
            .send(Command::Connect {
                proxy: proxy.clone(),
                stream,
                peer,
                workload,
            })
            .await
            .map_err(|_| Status::unavailable("control plane is shutting down"))?;
        tracing::info!(%proxy, stream, "proxy connected");
        crate::trim::note();
        let (tx, rx) = mpsc::channel(4);
        let mut state = self.state.clone();
        let mut stopping = self.stopping.clone();
        let identity = self.identity.clone();
        let quotas = self.quotas.clone();
        let telemetry = self.telemetry.clone();
        let service = hello
            .registration
            .as_ref()
            .map(|r| r.service.clone())
            .unwrap_or_default();
        let mut bundle = identity.bundle();
        let proxy_ns = ns.to_owned();
        tokio::spawn(async move {
            let _owned = owned;
            let telemetry = telemetry.connect(&proxy, &service, stream, tx.clone());
            // What the proxy runs: the view it last ACKed on this stream. Deltas are
            // built on it, never on a push it has not accepted (yet, or ever).
            let mut acked: Option<View> = None;
            // The push awaiting its answer: one at a time, so the base of the next
            // one is known.
            let mut inflight: Option<InFlight> = None;
            // After a refused push the next is full, until one is accepted.
            let mut need_full = false;
            // The version last sent, whatever the answer: a view is sent when it
            // differs (a refused full view is not sent again until the view changes;
            // going back to what the proxy runs is sent too, so it hears it is in
            // sync again).
            let mut sent: Option<String> = None;
            // The proxy's acceptance check on its latest computed view.
            let mut checked: Option<Checked> = None;
            let mut nonce = 0u64;
            // Every new stream starts with the roots to trust: a proxy that was away
            // during a rotation catches up before anything else.
            let first = bundle.borrow_and_update().clone();
            let mut renew_epoch = first.renew_epoch;
            let msg = ControlMessage {
                kind: Some(control_message::Kind::TrustBundle(api::TrustBundle {
                    roots_pem: first.roots_pem,
                    renew: false,
                })),
            };
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
            // A registering sidecar's inbound listener comes from its registration,
            // and it reports ready on its first push: that push waits until the
            // index has published the registration (a debounce period), so ready
            // means its inbound is up.
            if let Some(w) = registered {
                let published = state
                    .wait_for(|s| s.registrations.get(&proxy).is_some_and(|r| r.workload == w));
                if tokio::time::timeout(REGISTRATION_WAIT, published)
                    .await
                    .is_err()
                {
                    tracing::warn!(%proxy, "registration not published in time; pushing without it");
                }
            }
            loop {
                let current = state.borrow_and_update().clone();
                if inflight.is_none() {
                    let raw = view::compute_with(&current, &proxy, capture.as_ref());
                    if checked.as_ref().is_none_or(|c| c.raw != raw.version) {
                        let c = Checked::new(raw, &proxy);
                        if !c.problems.is_empty() {
                            for p in &c.problems {
                                tracing::warn!(%proxy, problem = %p, "held back from the proxy: it would refuse it");
                            }
                            let _ = index
                                .send(Command::Withheld {
                                    proxy: proxy.clone(),
                                    problems: c.problems.clone(),
                                })
                                .await;
                        }
                        checked = Some(c);
                    }
                }
                let to_send = checked
                    .as_ref()
                    .and_then(|c| c.view.as_ref())
                    .filter(|v| inflight.is_none() && sent.as_ref() != Some(&v.version));
                if let Some(view) = to_send {
                    let view = view.clone();
                    nonce += 1;
                    let base = acked.as_ref().filter(|_| !need_full);
                    let push = push(base, &view, nonce);
                    let _ = index
                        .send(Command::Computed {
                            proxy: proxy.clone(),
                            version: view.version.clone(),
                            // A proxy's first view is not a change reaching it.
                            changed_at: acked.as_ref().and(current.changed_at),
                        })
                        .await;
                    let full = push.full;
                    sent = Some(view.version.clone());
                    let mut closed = false;
                    for part in parts(push, PART_BYTES) {
                        let msg = ControlMessage {
                            kind: Some(control_message::Kind::Push(part)),
                        };
                        if tx.send(Ok(msg)).await.is_err() {
                            closed = true;
                            break;
                        }
                    }
                    if closed {
                        break;
                    }
                    inflight = Some(InFlight {
                        nonce: nonce.to_string(),
                        view,
                        full,
                    });
                }
                tokio::select! {
                    _ = stopped(&mut stopping) => break,
                    changed = bundle.changed() => {
                        if changed.is_err() { break }
                        let b = bundle.borrow_and_update().clone();
                        let renew = b.renew_epoch != renew_epoch;
                        renew_epoch = b.renew_epoch;
                        let msg = ControlMessage {
                            kind: Some(control_message::Kind::TrustBundle(api::TrustBundle { roots_pem: b.roots_pem, renew })),
                        };
                        if tx.send(Ok(msg)).await.is_err() {
                            break;
                        }
                    }
                    changed = state.changed() => if changed.is_err() { break },
                    msg = inbound.message() => match msg {
                        Ok(Some(ProxyMessage { kind: Some(proxy_message::Kind::Ack(ack)) })) => {
                            let error = (!ack.error.is_empty()).then_some(ack.error);
                            if let Some(e) = &error {
                                tracing::warn!(%proxy, version = %ack.version, reason = %e, "proxy refused a push");
                            }
                            if let Some(f) = inflight.take_if(|f| f.nonce == ack.nonce) {
                                if error.is_none() {
                                    acked = Some(f.view);
                                    need_full = false;
                                } else {
                                    // The proxy keeps what it ran; whatever it ran, a
                                    // full push is next. A refused delta is retried
                                    // at once as a full push; a refused full push
                                    // waits for the view to change.
                                    need_full = true;
                                    if !f.full {
                                        sent = None;
                                    }
                                }
                            }
                            let _ = index.send(Command::Acked { proxy: proxy.clone(), version: ack.version, error }).await;
                        }
                        Ok(Some(ProxyMessage { kind: Some(proxy_message::Kind::Csr(req)) })) => {
                            // A renewal is for the identity the stream proved; a
                            // token in it is looked at only on the migration window.
                            let issued = match &caller {
                                Some(caller) => identity.renew(caller, &req.csr_der),
                                None => identity.issue(&proxy_ns, &req.join_token, &req.csr_der).await,
                            };
                            let msg = match issued {
                                Ok((chain_pem, id, not_after, signer)) => {
                                    tracing::info!(%proxy, %id, "certificate issued");
                                    let _ = index.send(Command::CertIssued { proxy: proxy.clone(), signer }).await;
                                    certificate(&identity, chain_pem, not_after)
                                }
                                Err(error) => {
                                    tracing::warn!(%proxy, %error, "certificate request refused");
                                    api::Certificate { error, ..Default::default() }
                                }
                            };
                            let msg = ControlMessage { kind: Some(control_message::Kind::Certificate(msg)) };
                            if tx.send(Ok(msg)).await.is_err() {
                                break;
                            }
                        }
                        Ok(Some(ProxyMessage { kind: Some(proxy_message::Kind::Demand(d)) })) => {
                            let leases = quotas.report(&proxy, &d, &current, std::time::Instant::now());
                            let msg = ControlMessage { kind: Some(control_message::Kind::Leases(leases)) };
                            if tx.send(Ok(msg)).await.is_err() {
                                break;
                            }
                        }
                        Ok(Some(ProxyMessage { kind: Some(k @ (proxy_message::Kind::Stats(_) | proxy_message::Kind::TapEvents(_))) })) => {
                            telemetry.receive(k);
                        }
                        Ok(Some(ProxyMessage { kind: Some(proxy_message::Kind::Draining(_)) })) => {
                            // A rolling restart: the workload leaves every view now,
                            // and the proxy hears when that is published, so it stops
                            // accepting only once its peers have stopped choosing it.
                            tracing::info!(%proxy, stream, "proxy draining: deregistering its workload");
                            let _ = index.send(Command::Deregister { proxy: proxy.clone(), stream }).await;
                            let (mut published, tx, proxy) = (state.clone(), tx.clone(), proxy.clone());
                            tokio::spawn(async move {
                                let gone = published.wait_for(|s| !s.registrations.contains_key(&proxy));
                                if tokio::time::timeout(REGISTRATION_WAIT, gone).await.is_err() {
                                    tracing::warn!(%proxy, "deregistration not published in time");
                                }
                                let msg = ControlMessage { kind: Some(control_message::Kind::Drained(api::Drained {})) };
                                let _ = tx.send(Ok(msg)).await;
                            });
                        }
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    },
                }
            }
            quotas.forget(&proxy);
            tracing::info!(%proxy, stream, "proxy disconnected");
            crate::trim::note();

            let _ = index.send(Command::Disconnect { proxy, stream }).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report(
        &self,
        req: Request<api::ReportRequest>,
    ) -> Result<Response<api::ReportReply>, Status> {
        let caller = self.caller(&req)?;
        let req = req.into_inner();
        let (_, proxy) = proxy_name(&req.namespace, &req.name)?;
        if let Some(caller) = &caller
            && !self.owners.streaming(&proxy, caller)
        {
            return Err(Status::permission_denied(format!(
                "{caller} has no stream as {proxy}: a proxy reports only its own traffic"
            )));
        }
        if caller.is_none() {
            self.owners.unowned(&proxy)?;
        }
        let stats = req.stats.unwrap_or_default();
        if !self
            .telemetry
            .add_report(&proxy, &stats, std::time::Instant::now())
        {
            return Err(Status::failed_precondition(format!(
                "proxy {proxy} has no discovery stream: its reports count from its stream"
            )));
        }
        Ok(Response::new(api::ReportReply {}))
    }

    async fn bootstrap(
        &self,
        req: Request<api::BootstrapRequest>,
    ) -> Result<Response<api::Certificate>, Status> {
        let Ok(_slot) = self.bootstraps.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(
                "too many bootstraps in progress; retry shortly",
            ));
        };
        let req = req.into_inner();
        let (ns, proxy) = proxy_name(&req.namespace, &req.name)?;
        let name = proxy.rsplit('/').next().unwrap_or_default().to_owned();
        match self
            .identity
            .bootstrap(ns, &name, &req.token, &req.csr_der)
            .await
        {
            Ok((chain_pem, id, not_after, signer)) => {
                tracing::info!(%proxy, %id, "bootstrap certificate issued");
                let _ = self
                    .index
                    .send(Command::CertIssued {
                        proxy: proxy.clone(),
                        signer,
                    })
                    .await;
                Ok(Response::new(certificate(
                    &self.identity,
                    chain_pem,
                    not_after,
                )))
            }
            Err(error) => {
                tracing::warn!(%proxy, %error, "bootstrap refused");
                Err(Status::unauthenticated(error))
            }
        }
    }
}

/// The answer carrying an issued certificate, with the roots to trust now.
fn certificate(
    identity: &crate::identity::Identity,
    chain_pem: String,
    not_after: std::time::SystemTime,
) -> api::Certificate {
    api::Certificate {
        chain_pem,
        roots_pem: identity.roots_pem(),
        not_after_unix: not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
        error: String::new(),
    }
}

/// Whether the service `service` of namespace `ns` admits workloads of `account`:
/// as its `spec.serviceAccounts` says, or (no such Service) when named like it.
pub(crate) fn admits(state: &MeshState, ns: &str, service: &str, account: &str) -> bool {
    let key = ResourceKey {
        kind: "Service".into(),
        namespace: ns.to_owned(),
        name: service.to_owned(),
    };
    match state.docs.get(&key).map(|e| &e.resource) {
        Some(sinew_model::resource::Resource::Service(s)) => {
            s.spec.admits_account(service, account)
        }
        _ => service == account,
    }
}

/// What a proxy's Hello may claim, given the identity its certificate proves: its
/// own namespace, its own service account (filled in when the registration leaves it
/// empty), and a service that `admits` that account: the one named like it (the
/// convention Kubernetes deployments follow), or one whose `spec.serviceAccounts`
/// lists it.
pub(crate) fn authorize_hello(
    caller: &sinew_tls::SpiffeId,
    ns: &str,
    proxy: &str,
    registration: Option<&mut api::Registration>,
    admits: impl Fn(&str, &str) -> bool,
) -> Result<(), Status> {
    let Some((id_ns, id_sa)) = caller.workload_parts() else {
        return Err(Status::permission_denied(format!(
            "{caller} is not a workload identity"
        )));
    };
    if id_ns != ns {
        return Err(Status::permission_denied(format!(
            "{caller} cannot be the proxy {proxy}: a proxy's namespace is its identity's ({id_ns})"
        )));
    }
    if let Some(r) = registration {
        if r.service_account.is_empty() {
            r.service_account = id_sa.to_owned();
        } else if r.service_account != id_sa {
            return Err(Status::permission_denied(format!(
                "{caller} cannot register a workload of service account {:?}",
                r.service_account
            )));
        }
        if !r.service.is_empty() && !admits(&r.service, id_sa) {
            return Err(Status::permission_denied(format!(
                "{caller} cannot register under the service {:?}: a workload serves the service named like its service account ({id_sa}), or one whose spec.serviceAccounts lists it",
                r.service
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(items: &[(&str, u64)]) -> View {
        View::new(
            items
                .iter()
                .map(|(n, h)| {
                    let json = format!(
                        r#"{{"apiVersion":"sinew.dev/v1alpha1","kind":"Service","metadata":{{"name":"{n}","namespace":"shop"}},"spec":{{"ports":[{{"name":"http","port":{h}}}]}}}}"#
                    );
                    let r = sinew_model::resource::Resource::from_json("Service", &json)
                        .unwrap();
                    Arc::new(DocEntry::new(r, "api", 1))
                })
                .collect(),
        )
    }

    fn entry(kind: &str, json: &str) -> Arc<DocEntry> {
        let r = sinew_model::resource::Resource::from_json(kind, json).unwrap();
        Arc::new(DocEntry::new(r, "api", 1))
    }

    /// A view holding what the proxy would refuse is sent without it, and says why;
    /// a view whose own Proxy document the proxy would refuse is not sent at all.
    #[test]
    fn a_view_is_checked_as_the_proxy_checks_it() {
        let proxy = r#"{"apiVersion":"sinew.dev/v1alpha1","kind":"Proxy","metadata":{"name":"web","namespace":"shop"},"spec":{"outbound":{"upstreams":[{"bind":"127.0.0.1:9001","service":"catalog"}]}}}"#;
        let catalog = r#"{"apiVersion":"sinew.dev/v1alpha1","kind":"Service","metadata":{"name":"catalog","namespace":"shop"},"spec":{"ports":[{"name":"http","port":80}]}}"#;
        let other = r#"{"apiVersion":"sinew.dev/v1alpha1","kind":"Service","metadata":{"name":"other","namespace":"shop"},"spec":{"ports":[{"name":"http","port":9090}]}}"#;
        // Its backend has no port 80, the parent's port it defaults to.
        let route = r#"{"apiVersion":"gateway.networking.k8s.io/v1","kind":"HTTPRoute","metadata":{"name":"r","namespace":"shop"},"spec":{"parentRefs":[{"name":"catalog"}],"rules":[{"backendRefs":[{"name":"other"}]}]}}"#;
        let good = View::new(vec![
            entry("Proxy", proxy),
            entry("Service", catalog),
            entry("Service", other),
        ]);
        let mut entries = good.entries.clone();
        entries.push(entry("HTTPRoute", route));
        let raw = View::new(entries);
        let c = Checked::new(raw.clone(), "shop/web");
        assert_eq!(c.raw, raw.version);
        assert_eq!(
            c.view.as_ref().map(|v| v.version.clone()),
            Some(good.version.clone()),
            "the rest is sent, without the route"
        );
        assert!(
            c.problems.iter().any(|p| p.contains("HTTPRoute shop/r")
                && p.contains("spec.rules[0].backendRefs[0].port")),
            "{:?}",
            c.problems
        );
        let c = Checked::new(good.clone(), "shop/web");
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        assert_eq!(c.view.map(|v| v.version), Some(good.version));

        // Its own document names a service it cannot have: nothing to send.
        let lost = proxy.replace("\"catalog\"}", "\"ghost\"}");
        let c = Checked::new(
            View::new(vec![entry("Proxy", &lost), entry("Service", catalog)]),
            "shop/web",
        );
        assert!(c.view.is_none());
        assert!(
            c.problems.iter().any(|p| p.contains("ghost")),
            "{:?}",
            c.problems
        );
    }

    /// A capturing proxy's view is checked without its routes (the index checked them):
    /// a RoutePolicy goes with its route, so it is not left out for naming a route the
    /// check did not see.
    #[test]
    fn a_capturing_proxys_route_policies_stay_with_their_routes() {
        let proxy = r#"{"apiVersion":"sinew.dev/v1alpha1","kind":"Proxy","metadata":{"name":"web","namespace":"shop"},"spec":{"capture":{}}}"#;
        let catalog = r#"{"apiVersion":"sinew.dev/v1alpha1","kind":"Service","metadata":{"name":"catalog","namespace":"shop"},"spec":{"ports":[{"name":"http","port":80}]}}"#;
        let route = r#"{"apiVersion":"gateway.networking.k8s.io/v1","kind":"HTTPRoute","metadata":{"name":"r","namespace":"shop"},"spec":{"parentRefs":[{"name":"catalog"}],"rules":[{"name":"all"}]}}"#;
        let policy = r#"{"apiVersion":"sinew.dev/v1alpha1","kind":"RoutePolicy","metadata":{"name":"p","namespace":"shop"},"spec":{"targetRef":{"kind":"HTTPRoute","name":"r","sectionName":"all"},"fault":{"abort":{"httpStatus":418,"percent":100}}}}"#;
        let raw = View::new(vec![
            entry("Proxy", proxy),
            entry("Service", catalog),
            entry("HTTPRoute", route),
            entry("RoutePolicy", policy),
        ]);
        let c = Checked::new(raw.clone(), "shop/web");
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        assert_eq!(c.view.map(|v| v.version), Some(raw.version));
    }

    #[test]
    fn first_push_is_full_then_only_changes() {
        let a = view(&[("a", 1), ("b", 2), ("c", 3)]);
        let p = push(None, &a, 1);
        assert!(p.full);
        assert_eq!(p.resources.len(), 3);
        let b = view(&[("a", 1), ("b", 20), ("d", 4)]);
        let p = push(Some(&a), &b, 2);
        assert!(!p.full);
        let names: Vec<&str> = p
            .resources
            .iter()
            .filter_map(|r| r.key.as_ref())
            .map(|k| k.name.as_str())
            .collect();
        assert_eq!(names, vec!["b", "d"], "only what changed");
        let removed: Vec<&str> = p.removed.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(removed, vec!["c"]);
        assert_eq!(p.version, b.version);
        assert_eq!(p.nonce, "2");
    }

    #[test]
    fn a_large_push_goes_in_parts_that_add_up_to_it() {
        let names: Vec<String> = (0..50).map(|i| format!("s{i:02}")).collect();
        let items: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), 80)).collect();
        let a = view(&items);
        let b = view(&items[10..]);
        let whole = push(Some(&view(&items[..5])), &a, 7);
        let one = a.entries[0].json.len();
        let ps = parts(whole.clone(), one * 10);
        assert_eq!(ps.len(), 5, "45 new resources in parts of 10");
        assert!(ps[..4].iter().all(|p| p.more && p.removed.is_empty()));
        assert!(!ps[4].more);
        let joined: Vec<_> = ps.iter().flat_map(|p| p.resources.clone()).collect();
        assert_eq!(joined, whole.resources);
        assert!(
            ps.iter()
                .all(|p| p.version == whole.version && p.nonce == "7")
        );
        // Removals travel in the last part, even when no resource changed.
        let gone = parts(push(Some(&a), &b, 8), one * 10);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].removed.len(), 10);
        assert!(!gone[0].more);
        // A resource larger than the limit still goes, alone.
        assert_eq!(parts(push(None, &a, 9), 1).len(), 50);
    }
}
