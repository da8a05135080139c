//! The Kubernetes source: watches the API server and keeps the control plane's
//! `kubernetes` documents equal to what it holds.
//!
//! One reflector (a watch with a local cache, re-listed after a lost watch) per kind:
//! Services, Pods, Nodes (their topology labels), the endpoints (EndpointSlice
//! `discovery.k8s.io/v1`, else `v1beta1`, else core `Endpoints`, whichever the server
//! serves, found by API discovery at start), and
//! every custom kind that is served (Sinew's, Gateway API routes, SMI). Any change wakes
//! the sync, which (after a short quiet period) turns the caches into documents
//! ([`crate::convert`]) and replaces the source's documents in the index in one validated
//! change. A resource that does not validate is left out, the rest still applies, and its
//! problem is written to its status ([`crate::status`]).
//!
//! A lost watch never drops endpoints: the caches keep their content while the watch is
//! re-established, and a re-list replaces a cache only once it is complete. Nothing is
//! synced before every cache has been listed once, so a restarted control plane keeps
//! serving what its store holds until it knows the cluster's state.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::utils::Backoff;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use sinew_control::index::Command;
use sinew_model::load::Document;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::convert::{self, EndpointSet};
use crate::crd::{GATEWAY_KINDS, Kind, SINEW_KINDS, SMI_KINDS};
use crate::status::{Outcome, StatusWriter};

/// The source name recorded with the documents this source contributes.
pub const SOURCE: &str = "kubernetes";

/// How the Kubernetes source runs.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// How long changes are gathered before they are synced; default 50 ms.
    pub debounce: Duration,
    /// Namespace of the leader-election Lease (status writes are single-writer).
    pub lease_namespace: String,
    /// This replica's name in the Lease (unique per replica).
    pub holder: String,
    /// How long a leader's lease lasts without renewal; default 15 s.
    pub lease_duration: Duration,
    /// The mesh's SPIFFE trust domain (SMI TrafficTargets name service accounts, Sinew
    /// policies SPIFFE ids); default `cluster.local`.
    pub trust_domain: String,
    /// Set once every cache has been listed and the control plane has the cluster's
    /// state (its `/ready`: a replica that would serve proxies an empty mesh is not).
    pub synced: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            debounce: Duration::from_millis(50),
            lease_namespace: "default".to_owned(),
            holder: format!(
                "sinew-control-{}-{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into()),
                std::process::id()
            ),
            lease_duration: Duration::from_secs(15),
            trust_domain: "cluster.local".to_owned(),
            synced: None,
        }
    }
}

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// API discovery failed.
    #[error("Kubernetes API discovery at {what}: {source}")]
    Discovery {
        /// What was being discovered.
        what: String,
        /// The error.
        source: kube::Error,
    },
}

/// Which API carries the endpoints of services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointsApi {
    /// `discovery.k8s.io/v1` EndpointSlice (Kubernetes 1.21 and later).
    SliceV1,
    /// `discovery.k8s.io/v1beta1` EndpointSlice (1.17 to 1.24).
    SliceV1beta1,
    /// Core `v1` Endpoints.
    Endpoints,
}

/// Whether the server serves `plural` in `group_version` (`v1` for the core group).
async fn served(client: &Client, group_version: &str, plural: &str) -> Result<bool, SourceError> {
    let list = if group_version == "v1" {
        client.list_core_api_resources("v1").await
    } else {
        client.list_api_group_resources(group_version).await
    };
    match list {
        Ok(l) => Ok(l.resources.iter().any(|r| r.name == plural)),
        // Not served: the group or version does not exist on this server.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(source) => Err(SourceError::Discovery {
            what: group_version.to_owned(),
            source,
        }),
    }
}

/// The endpoints API this server serves, newest first.
pub async fn endpoints_api(client: &Client) -> Result<EndpointsApi, SourceError> {
    if served(client, "discovery.k8s.io/v1", "endpointslices").await? {
        Ok(EndpointsApi::SliceV1)
    } else if served(client, "discovery.k8s.io/v1beta1", "endpointslices").await? {
        Ok(EndpointsApi::SliceV1beta1)
    } else {
        Ok(EndpointsApi::Endpoints)
    }
}

/// Re-watch quickly after an API server restart, backing off to 5 s while it stays away.
struct QuickBackoff {
    next: Duration,
}

impl QuickBackoff {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(5);
}

impl Iterator for QuickBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        // Jitter, so replicas do not all come back at once.
        Some(d + Duration::from_millis(fastrand::u64(0..=d.as_millis() as u64 / 4)))
    }
}

impl Backoff for QuickBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Drives a reflector's stream, waking `notify` on every change and logging a lost watch
/// once (the stream's backoff retries it).
fn drive<K, S>(stream: S, notify: Arc<Notify>, what: String)
where
    S: futures_util::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    K: Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => {
                    if failing {
                        tracing::info!(%what, "watch re-established");
                        failing = false;
                    }
                    notify.notify_one();
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(%what, error = %e, "watch lost; keeping the last state and retrying");
                        failing = true;
                    }
                }
            }
        }
    });
}

fn quick() -> QuickBackoff {
    QuickBackoff {
        next: QuickBackoff::FIRST,
    }
}

/// Starts a reflector for a built-in kind, waking `notify` on every change; returns its
/// cache.
fn reflect<K>(client: &Client, notify: Arc<Notify>, what: &str) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let stream = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .backoff(quick())
        .reflect(writer);
    drive(stream, notify, what.to_owned());
    store
}

/// The Nodes' reflector: only their labels matter (topology), so only a change of labels
/// (or a Node coming or going) wakes the sync, not the status updates every node makes.
fn reflect_nodes(client: &Client, notify: Arc<Notify>) -> Store<Node> {
    let (store, writer) = reflector::store();
    let mut seen: HashMap<String, Option<BTreeMap<String, String>>> = HashMap::new();
    let stream = watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
        .backoff(quick())
        .reflect(writer)
        .filter(move |ev| {
            let wake = match ev {
                Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => {
                    let name = n.metadata.name.clone().unwrap_or_default();
                    seen.insert(name, n.metadata.labels.clone()) != Some(n.metadata.labels.clone())
                }
                Ok(watcher::Event::Delete(n)) => {
                    seen.remove(n.metadata.name.as_deref().unwrap_or_default());
                    true
                }
                _ => true,
            };
            std::future::ready(wake)
        });
    drive(stream, notify, "nodes".to_owned());
    store
}

/// Like [`reflect`], for an untyped kind.
fn reflect_dynamic(client: &Client, ar: ApiResource, notify: Arc<Notify>) -> Store<DynamicObject> {
    let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
    let writer = reflector::store::Writer::new(ar.clone());
    let store = writer.as_reader();
    let stream = watcher(api, watcher::Config::default())
        .backoff(quick())
        .reflect(writer);
    drive(stream, notify, format!("{}/{}", ar.api_version, ar.plural));
    store
}

/// The API resource of a custom kind.
pub fn api_resource(k: &Kind) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(k.group, k.version, k.kind), k.plural)
}

enum EndpointCache {
    SliceV1(Store<EndpointSlice>),
    SliceV1beta1(Store<DynamicObject>),
    Endpoints(Store<Endpoints>),
}

impl EndpointCache {
    /// Every service's endpoints, merged over its slices.
    fn sets(&self) -> Vec<EndpointSet> {
        let parts: Vec<EndpointSet> = match self {
            EndpointCache::SliceV1(s) => s
                .state()
                .iter()
                .filter_map(|e| convert::from_slice(e))
                .collect(),
            EndpointCache::SliceV1beta1(s) => s
                .state()
                .iter()
                .filter_map(|o| {
                    let v = serde_json::to_value(o.as_ref()).ok()?;
                    convert::from_slice(&convert::slice_from_v1beta1(v)?)
                })
                .collect(),
            EndpointCache::Endpoints(s) => s
                .state()
                .iter()
                .map(|e| convert::from_endpoints(e))
                .collect(),
        };
        let mut merged: BTreeMap<(String, String), EndpointSet> = BTreeMap::new();
        for p in parts {
            let m = merged
                .entry((p.namespace.clone(), p.service.clone()))
                .or_insert_with(|| EndpointSet {
                    namespace: p.namespace.clone(),
                    service: p.service.clone(),
                    ..EndpointSet::default()
                });
            m.endpoints.extend(p.endpoints);
        }
        merged.into_values().collect()
    }
}

/// The caches the sync reads.
struct Caches {
    services: Store<Service>,
    pods: Store<Pod>,
    /// Nodes, for their topology labels (workloads' zones and regions); `None` when the
    /// control plane may not read them (a ClusterRole from before it did).
    nodes: Option<Store<Node>>,
    endpoints: EndpointCache,
    custom: Vec<(Kind, Store<DynamicObject>)>,
}

impl Caches {
    async fn ready(&self) {
        let _ = self.services.wait_until_ready().await;
        let _ = self.pods.wait_until_ready().await;
        if let Some(nodes) = &self.nodes {
            let _ = nodes.wait_until_ready().await;
        }
        let _ = match &self.endpoints {
            EndpointCache::SliceV1(s) => s.wait_until_ready().await,
            EndpointCache::SliceV1beta1(s) => s.wait_until_ready().await,
            EndpointCache::Endpoints(s) => s.wait_until_ready().await,
        };
        for (_, s) in &self.custom {
            let _ = s.wait_until_ready().await;
        }
    }

    /// Every document the cluster stands for, by source label, with the custom object
    /// each label came from.
    fn documents(
        &self,
        trust_domain: &str,
    ) -> (BTreeMap<String, convert::Converted>, Vec<Outcome>) {
        let mut out = BTreeMap::new();
        for svc in self.services.state() {
            let (Some(name), ns) = (
                svc.metadata.name.as_deref(),
                svc.metadata.namespace.as_deref().unwrap_or("default"),
            ) else {
                continue;
            };
            if let Some(r) = convert::service(&svc) {
                out.insert(convert::label("Service", ns, name), r);
            }
        }
        let pods: HashMap<(String, String), Arc<Pod>> = self
            .pods
            .state()
            .into_iter()
            .filter_map(|p| Some(((p.metadata.namespace.clone()?, p.metadata.name.clone()?), p)))
            .collect();
        let nodes: HashMap<String, Arc<Node>> = self
            .nodes
            .iter()
            .flat_map(Store::state)
            .filter_map(|n| Some((n.metadata.name.clone()?, n)))
            .collect();
        let mut used = std::collections::BTreeSet::new();
        for set in self.endpoints.sets() {
            out.extend(convert::workloads(&set, &pods, &nodes, &mut used));
        }
        // Meshed Pods no Service selects (clients): their sidecars' identity and zone.
        for pod in pods.values() {
            out.extend(convert::pod_workload(pod, &nodes, &mut used));
        }
        let mut ctx = convert::Context {
            trust_domain: trust_domain.to_owned(),
            ..convert::Context::default()
        };
        for docs in out.values().filter_map(|r| r.as_ref().ok()) {
            for d in docs {
                if let sinew_model::resource::Resource::Workload(w) = &d.resource
                    && let Some(svc) = &w.spec.service
                {
                    ctx.services_by_account
                        .entry((
                            w.metadata.ns().to_owned(),
                            w.spec.service_account().to_owned(),
                        ))
                        .or_default()
                        .insert(svc.clone());
                }
            }
        }
        for (kind, store) in &self.custom {
            if kind.kind == "HTTPRouteGroup" {
                for g in store.state() {
                    let key = (
                        g.metadata
                            .namespace
                            .clone()
                            .unwrap_or_else(|| "default".into()),
                        g.metadata.name.clone().unwrap_or_default(),
                    );
                    ctx.route_groups.insert(key, g);
                }
            }
        }
        let mut objects = Vec::new();
        for (kind, store) in &self.custom {
            for obj in store.state() {
                if GATEWAY_KINDS.contains(kind) && !convert::is_mesh_route(&obj) {
                    continue;
                }
                let ns = obj
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into());
                let name = obj.metadata.name.clone().unwrap_or_default();
                let label = convert::label(kind.kind, &ns, &name);
                out.insert(label.clone(), convert::custom(kind, &obj, &ctx));
                objects.push(Outcome {
                    kind: *kind,
                    label,
                    object: obj,
                    problems: Vec::new(),
                });
            }
        }
        (out, objects)
    }
}

/// Runs the Kubernetes source until the index goes away.
pub async fn run(
    client: Client,
    index: mpsc::Sender<Command>,
    opts: SourceOptions,
) -> Result<(), SourceError> {
    let notify = Arc::new(Notify::new());
    let endpoints_api = endpoints_api(&client).await?;
    tracing::info!(?endpoints_api, "Kubernetes endpoints API");
    let endpoints = match endpoints_api {
        EndpointsApi::SliceV1 => {
            EndpointCache::SliceV1(reflect(&client, notify.clone(), "endpointslices.v1"))
        }
        EndpointsApi::SliceV1beta1 => EndpointCache::SliceV1beta1(reflect_dynamic(
            &client,
            ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice"),
                "endpointslices",
            ),
            notify.clone(),
        )),
        EndpointsApi::Endpoints => {
            EndpointCache::Endpoints(reflect(&client, notify.clone(), "endpoints"))
        }
    };
    let mut custom = Vec::new();
    for kind in SINEW_KINDS.iter().chain(&GATEWAY_KINDS).chain(&SMI_KINDS) {
        if served(&client, &kind.api_version(), kind.plural).await? {
            custom.push((
                *kind,
                reflect_dynamic(&client, api_resource(kind), notify.clone()),
            ));
        } else {
            tracing::info!(kind = kind.kind, api = %kind.api_version(), "not served by this cluster; not watched");
        }
    }
    let services = reflect(&client, notify.clone(), "services");
    let pods = reflect(&client, notify.clone(), "pods");
    // Nodes only add zones: without the permission to read them (an installation whose
    // ClusterRole predates it) the rest of the cluster is still the mesh's.
    let nodes = match Api::<Node>::all(client.clone())
        .list_metadata(&kube::api::ListParams::default().limit(1))
        .await
    {
        Err(kube::Error::Api(e)) if e.code == 403 => {
            tracing::warn!(
                "no permission to read Nodes: workloads' zones come from EndpointSlices and Pods only (grant get/list/watch on nodes: sinew install prints the ClusterRole)"
            );
            None
        }
        _ => Some(reflect_nodes(&client, notify.clone())),
    };
    let caches = Caches {
        services,
        pods,
        nodes,
        endpoints,
        custom,
    };
    caches.ready().await;
    tracing::info!("Kubernetes caches listed; syncing");

    let leader = crate::leader::spawn(
        client.clone(),
        opts.lease_namespace.clone(),
        opts.holder.clone(),
        opts.lease_duration,
    );
    let mut status = StatusWriter::new(client.clone(), leader);
    // Problems of objects without a status to write them to (Services, endpoints):
    // logged when they appear, not on every sync.
    let mut logged: BTreeMap<String, Vec<String>> = BTreeMap::new();
    loop {
        let (docs, mut objects) = caches.documents(&opts.trust_domain);
        let mut others = BTreeMap::new();
        if !sync(&index, docs, &mut objects, &mut others).await {
            return Ok(());
        }
        if let Some(synced) = &opts.synced {
            synced.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        for (label, problems) in &others {
            if logged.get(label) != Some(problems) {
                for p in problems {
                    tracing::warn!(object = %label, problem = %p, "left out of the mesh");
                }
            }
        }
        logged = others;
        status.write(&objects).await;
        tokio::select! {
            _ = notify.notified() => {}
            _ = status.leadership_changed() => {}
        }
        // Gather a burst of changes (a rollout touches many objects) into one sync.
        tokio::time::sleep(opts.debounce).await;
    }
}

/// Sends the documents to the index, leaving out every object whose documents do not
/// validate, and recording why in `objects` (custom resources) or `others` (by label).
/// Returns false when the index is gone.
async fn sync(
    index: &mpsc::Sender<Command>,
    mut docs: BTreeMap<String, convert::Converted>,
    objects: &mut [Outcome],
    others: &mut BTreeMap<String, Vec<String>>,
) -> bool {
    let mut by_label: HashMap<String, usize> = HashMap::new();
    for (i, o) in objects.iter().enumerate() {
        by_label.insert(o.label.clone(), i);
    }
    let mut record = |label: &str, problems: Vec<String>| {
        if let Some(&i) = by_label.get(label) {
            objects[i].problems.extend(problems);
        } else {
            others.entry(label.to_owned()).or_default().extend(problems);
        }
    };
    for (label, r) in &docs {
        if let Err(problems) = r {
            record(label, problems.clone());
        }
    }
    // Each round takes out what the index refused; a refused Service can make its
    // Workloads invalid in turn, so a few rounds may be needed.
    for _round in 0..8 {
        let set: Vec<Document> = docs
            .values()
            .filter_map(|r| r.as_ref().ok())
            .flatten()
            .cloned()
            .collect();
        let (reply, answer) = oneshot::channel();
        if index
            .send(Command::SyncSource {
                source: SOURCE.to_owned(),
                docs: set,
                reply,
            })
            .await
            .is_err()
        {
            return false;
        }
        let Ok(result) = answer.await else {
            return false;
        };
        let errors = match result {
            Ok(out) => {
                let changed = out
                    .results
                    .iter()
                    .filter(|(_, a)| *a != "unchanged")
                    .count();
                if changed > 0 {
                    tracing::info!(revision = out.revision, changed, "Kubernetes state applied");
                }
                return true;
            }
            Err(errors) => errors,
        };
        let mut refused: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for e in &errors.0 {
            match e.file.as_ref().filter(|f| docs.contains_key(*f)) {
                Some(f) => refused
                    .entry(f.clone())
                    .or_default()
                    .push(convert::problem(e)),
                None => {
                    tracing::warn!(problem = %e, "the Kubernetes state conflicts with documents from another source")
                }
            }
        }
        if refused.is_empty() {
            tracing::error!(
                "the Kubernetes state was refused and no object can be blamed; keeping the previous state"
            );
            return true;
        }
        for (label, problems) in refused {
            record(&label, problems.clone());
            docs.insert(label, Err(problems));
        }
    }
    tracing::error!(
        "the Kubernetes state still does not validate after leaving out what was refused; keeping the previous state"
    );
    true
}
