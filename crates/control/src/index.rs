//! The index: the control plane's single writer.
//!
//! One task owns the documents, the registry of live workloads and every proxy's
//! status. Sources (the API, the config directory, proxy streams) send it commands;
//! it validates, persists, and publishes an immutable [`MeshState`] on a `watch`
//! channel, debounced so a burst of changes becomes one publication. Proxy streams
//! compute their own views from it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sinew_model::load::Document;
use sinew_model::resource::{Object, Resource, ResourceKey, WorkloadSpec};
use sinew_model::{ConfigError, ConfigErrors, Resources, parse_sources};
use tokio::sync::{mpsc, oneshot, watch};

use crate::store::{Store, StoredDoc, StoredRegistration};

/// FNV-1a 64: stable content hashes for versions.
pub fn fnv64(h: u64, data: &[u8]) -> u64 {
    data.iter()
        .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// FNV-1a 64 offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// A document in force.
#[derive(Debug, Clone)]
pub struct DocEntry {
    /// Its key.
    pub key: ResourceKey,
    /// The typed document.
    pub resource: Resource,
    /// Its JSON form, shared by every proxy view that holds it (views are per
    /// proxy; copying it into each would cost memory and time per proxy).
    pub json: Arc<str>,
    /// Content hash of `json`.
    pub hash: u64,
    /// Hash of the key and `hash` together: a view's version is a hash of its
    /// entries' ids, so computing it reads 8 bytes per entry.
    pub id: u64,
    /// `api`, `dir` or `registry`.
    pub source: String,
    /// Store revision of its last change (0 for registry entries).
    pub revision: u64,
}

impl DocEntry {
    pub(crate) fn new(resource: Resource, source: &str, revision: u64) -> DocEntry {
        let json: Arc<str> = resource.to_json().into();
        let hash = fnv64(FNV_OFFSET, json.as_bytes());
        let key = resource.key();
        let mut id = FNV_OFFSET;
        for part in [&key.kind, &key.namespace, &key.name] {
            id = fnv64(fnv64(id, part.as_bytes()), &[0]);
        }
        DocEntry {
            id: fnv64(id, &hash.to_le_bytes()),
            hash,
            key,
            resource,
            json,
            source: source.to_owned(),
            revision,
        }
    }
}

/// A workload registered by a proxy's stream.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The Workload document it stands for (named after the proxy).
    pub workload: Object<WorkloadSpec>,
    /// The same as a document entry, made once rather than on every publication.
    pub entry: Arc<DocEntry>,
}

impl Registration {
    /// The registration of `workload`.
    pub fn new(workload: Object<WorkloadSpec>) -> Registration {
        let entry = Arc::new(DocEntry::new(
            Resource::Workload(workload.clone()),
            "registry",
            0,
        ));
        Registration { workload, entry }
    }
}

/// What proxies are computed from: immutable, replaced whole on every publication.
#[derive(Debug, Default)]
pub struct MeshState {
    /// Store revision.
    pub revision: u64,
    /// Every document in force, including registered workloads (source `registry`)
    /// that fit the validated set.
    pub docs: BTreeMap<ResourceKey, Arc<DocEntry>>,
    /// Registrations by proxy (`namespace/name`).
    pub registrations: BTreeMap<String, Registration>,
    /// The control plane's SPIFFE trust domain.
    pub trust_domain: String,
    /// When the first change this publication carries was made (`None` for the
    /// initial state): config propagation latency is measured from it.
    pub changed_at: Option<Instant>,
    /// Lookups over `docs` for computing views, built once per publication.
    pub lookups: crate::view::Lookups,
}

impl MeshState {
    /// A state over `docs`, with its lookups built.
    pub fn new(
        revision: u64,
        docs: BTreeMap<ResourceKey, Arc<DocEntry>>,
        registrations: BTreeMap<String, Registration>,
        trust_domain: String,
    ) -> MeshState {
        let lookups = crate::view::Lookups::build(&docs, &trust_domain);
        MeshState {
            revision,
            docs,
            registrations,
            trust_domain,
            changed_at: None,
            lookups,
        }
    }
}

/// What an apply did, per document.
#[derive(Debug, Clone)]
pub struct ApplyOutcome {
    /// New revision (unchanged on a dry run or when nothing changed).
    pub revision: u64,
    /// `(key, "created" | "configured" | "unchanged")`.
    pub results: Vec<(ResourceKey, &'static str)>,
}

/// One proxy's status.
#[derive(Debug, Clone, Default)]
pub struct ProxyRecord {
    /// Stream id while connected.
    pub stream: Option<u64>,
    /// Peer address of the stream.
    pub peer: String,
    /// The registered workload (`namespace/name`).
    pub workload: String,
    /// Version the proxy last ACKed.
    pub applied: String,
    /// Latest version computed for it.
    pub latest: String,
    latest_at: Option<Instant>,
    /// Time from the change that made `latest` (or from computing it, for a
    /// proxy's first view) to its ACK: config propagation latency.
    pub ack_latency: Option<Duration>,
    /// Reason of the last NACK (cleared by the next ACK).
    pub last_nack: String,
    /// Fingerprint of the CA that signed the proxy's current certificate.
    pub signer: String,
}

/// Commands to the index.
#[derive(Debug)]
pub enum Command {
    /// Validate and store documents (all or nothing).
    Apply {
        /// `(label, text)` per source.
        sources: Vec<(String, String)>,
        /// Validate only.
        dry_run: bool,
        /// The answer.
        reply: oneshot::Sender<Result<ApplyOutcome, ConfigErrors>>,
    },
    /// Delete documents (refused if the rest would be invalid).
    Delete {
        /// What to delete.
        keys: Vec<ResourceKey>,
        /// The answer: the revision and what was deleted.
        reply: oneshot::Sender<Result<(u64, Vec<ResourceKey>), ConfigErrors>>,
    },
    /// Replace the documents that came from the config directory.
    SyncDir {
        /// Everything the directory holds now.
        docs: Vec<Document>,
    },
    /// Replace the documents an external source (e.g. `kubernetes`) contributed: its
    /// documents not in `docs` are removed, all in one validated, persisted change.
    SyncSource {
        /// The source's name, recorded with each document (not `api` or `dir`).
        source: String,
        /// Everything the source holds now.
        docs: Vec<Document>,
        /// The answer: what changed, or every problem (then nothing changed).
        reply: oneshot::Sender<Result<ApplyOutcome, ConfigErrors>>,
    },
    /// A proxy stream opened.
    Connect {
        /// `namespace/name`.
        proxy: String,
        /// Stream id.
        stream: u64,
        /// Peer address.
        peer: String,
        /// Its workload, if it serves one.
        workload: Option<Box<Object<WorkloadSpec>>>,
    },
    /// A proxy stream closed.
    Disconnect {
        /// `namespace/name`.
        proxy: String,
        /// Stream id.
        stream: u64,
    },
    /// A stream computed a new version for its proxy.
    Computed {
        /// `namespace/name`.
        proxy: String,
        /// Version.
        version: String,
        /// When the change it carries was made (`None`: the proxy's first view).
        changed_at: Option<Instant>,
    },
    /// A proxy answered a push.
    Acked {
        /// `namespace/name`.
        proxy: String,
        /// Version.
        version: String,
        /// NACK reason.
        error: Option<String>,
    },
    /// A certificate was issued to a proxy.
    CertIssued {
        /// `namespace/name`.
        proxy: String,
        /// Fingerprint of the signing CA.
        signer: String,
    },
    /// Every proxy's status.
    Status {
        /// The answer.
        reply: oneshot::Sender<BTreeMap<String, ProxyRecord>>,
    },
    /// The current state, including changes not yet published to proxies (the
    /// operator reads their own writes).
    Current {
        /// The answer.
        reply: oneshot::Sender<Arc<MeshState>>,
    },
    /// The last config-directory problem, if any.
    DirError {
        /// The answer.
        reply: oneshot::Sender<Option<String>>,
    },
}

/// Settings of the index.
#[derive(Debug, Clone)]
pub struct IndexSettings {
    /// How long a disconnected proxy's workload stays registered.
    pub grace_period: Duration,
    /// How long to gather changes before publishing.
    pub debounce: Duration,
    /// The SPIFFE trust domain certificates are issued in.
    pub trust_domain: String,
}

struct Index {
    store: Store,
    settings: IndexSettings,
    revision: u64,
    docs: BTreeMap<ResourceKey, Arc<DocEntry>>,
    registry: BTreeMap<String, (Registration, Option<Instant>)>,
    proxies: BTreeMap<String, ProxyRecord>,
    state_tx: watch::Sender<Arc<MeshState>>,
    dirty_since: Option<Instant>,
    /// The latest unpublished change: publication waits for a quiet debounce period
    /// after it (other commands, such as a fleet's ACKs, do not delay it).
    last_change: Option<Instant>,
    dir_error: Option<String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Starts the index from what the store holds. Returns the command sender and the
/// state receiver.
pub fn spawn(
    store: Store,
    settings: IndexSettings,
) -> Result<(mpsc::Sender<Command>, watch::Receiver<Arc<MeshState>>), crate::store::StoreError> {
    let revision = store.revision()?;
    let mut docs = BTreeMap::new();
    for d in store.documents()? {
        match Resource::from_json(&d.key.kind, &d.json) {
            Ok(r) => {
                docs.insert(
                    d.key.clone(),
                    Arc::new(DocEntry::new(r, &d.source, d.revision)),
                );
            }
            Err(e) => {
                tracing::error!(key = %d.key, error = %e, "stored document no longer parses; skipped")
            }
        }
    }
    let mut registry = BTreeMap::new();
    let restart_deadline = Instant::now() + settings.grace_period;
    for r in store.registrations()? {
        match Resource::from_json("Workload", &r.workload_json) {
            Ok(Resource::Workload(w)) => {
                // Not connected yet: kept for one grace period so proxies that are
                // using these endpoints do not lose them while everyone reconnects.
                registry.insert(
                    r.proxy.clone(),
                    (Registration::new(w), Some(restart_deadline)),
                );
            }
            _ => tracing::error!(proxy = %r.proxy, "stored registration no longer parses; skipped"),
        }
    }
    let (state_tx, state_rx) = watch::channel(Arc::new(MeshState::default()));
    let (tx, rx) = mpsc::channel(1024);
    let mut index = Index {
        store,
        settings,
        revision,
        docs,
        registry,
        proxies: BTreeMap::new(),
        state_tx,
        dirty_since: None,
        last_change: None,
        dir_error: None,
    };
    index.publish();
    tokio::spawn(index.run(rx));
    Ok((tx, state_rx))
}

impl Index {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            let next_expiry = self.registry.values().filter_map(|(_, e)| *e).min();
            // A quiet debounce period after the last change, but under continuous
            // churn at least every 10 debounce periods.
            let publish_at = self.dirty_since.zip(self.last_change).map(|(first, last)| {
                (last + self.settings.debounce).min(first + self.settings.debounce * 10)
            });
            let wake = [next_expiry, publish_at].into_iter().flatten().min();
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd).await,
                    None => break,
                },
                _ = sleep_until(wake) => {
                    self.expire();
                    if publish_at.is_some_and(|t| t <= Instant::now()) {
                        self.publish();
                    }
                }
            }
        }
    }

    fn mark(&mut self) {
        let now = Instant::now();
        if self.dirty_since.is_none() {
            self.dirty_since = Some(now);
        }
        self.last_change = Some(now);
    }

    fn expire(&mut self) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .registry
            .iter()
            .filter(|(_, (_, e))| e.is_some_and(|e| e <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for proxy in expired {
            tracing::info!(%proxy, "registration expired after the grace period");
            self.registry.remove(&proxy);
            if let Err(e) = self.store.remove_registration(&proxy) {
                tracing::error!(error = %e, "cannot forget a registration");
            }
            self.mark();
        }
    }

    /// Publishes the state to proxy streams.
    fn publish(&mut self) {
        let changed_at = self.dirty_since.take();
        self.last_change = None;
        let mut state = self.build_state();
        state.changed_at = changed_at;
        self.state_tx.send_replace(Arc::new(state));
        crate::trim::note();
    }

    /// The state: stored documents, plus registered workloads that fit.
    fn build_state(&self) -> MeshState {
        let mut docs = self.docs.clone();
        let mut registrations = BTreeMap::new();
        for (proxy, (reg, _)) in &self.registry {
            let w = &reg.workload;
            let key = reg.entry.key.clone();
            let service_ok = w.spec.service.as_ref().is_none_or(|s| {
                docs.contains_key(&ResourceKey {
                    kind: "Service".into(),
                    namespace: w.metadata.ns().to_owned(),
                    name: s.clone(),
                })
            });
            match docs.entry(key) {
                std::collections::btree_map::Entry::Occupied(e) => {
                    let key = e.key();
                    tracing::warn!(%proxy, %key, "a stored Workload has the registered workload's name; the stored one wins");
                }
                std::collections::btree_map::Entry::Vacant(v) if service_ok => {
                    v.insert(reg.entry.clone());
                }
                std::collections::btree_map::Entry::Vacant(_) => {}
            }
            registrations.insert(proxy.clone(), reg.clone());
        }
        MeshState::new(
            self.revision,
            docs,
            registrations,
            self.settings.trust_domain.clone(),
        )
    }

    fn validate(
        &self,
        candidate: &BTreeMap<ResourceKey, Arc<DocEntry>>,
        fresh: &HashMap<ResourceKey, (String, usize)>,
    ) -> Result<Resources, ConfigErrors> {
        let docs = candidate
            .iter()
            .map(|(k, e)| {
                let (file, line) = fresh
                    .get(k)
                    .cloned()
                    .unwrap_or_else(|| (format!("(stored, from {})", e.source), 0));
                Document {
                    resource: e.resource.clone(),
                    file,
                    line,
                }
            })
            .collect();
        Resources::from_documents(docs)
    }

    async fn persist(
        &mut self,
        mut upserts: Vec<StoredDoc>,
        deletes: Vec<ResourceKey>,
    ) -> Result<u64, ConfigErrors> {
        let store = self.store.clone();
        let res = tokio::task::spawn_blocking(move || {
            let rev = store.commit(&mut upserts, &deletes);
            rev.map(|r| (r, upserts))
        })
        .await;
        match res {
            Ok(Ok((rev, _))) => Ok(rev),
            Ok(Err(e)) => Err(ConfigError::new(format!("nothing was applied: {e}")).into()),
            Err(e) => {
                Err(ConfigError::new(format!("nothing was applied: store task failed: {e}")).into())
            }
        }
    }

    async fn apply_docs(
        &mut self,
        new_docs: Vec<Document>,
        source: &str,
        replace_source: bool,
        dry_run: bool,
    ) -> Result<ApplyOutcome, ConfigErrors> {
        let mut candidate = self.docs.clone();
        let mut fresh = HashMap::new();
        let mut results = Vec::new();
        let mut seen: HashMap<ResourceKey, (String, usize)> = HashMap::new();
        let mut errors = ConfigErrors::default();
        for d in &new_docs {
            let key = d.resource.key();
            if let Some((file, line)) = seen.get(&key) {
                errors.push(
                    ConfigError::new(format!("duplicate {key}: already defined at {file}:{line}"))
                        .field("metadata.name")
                        .resource(d.resource.label())
                        .at(d.file.clone(), Some(d.line)),
                );
            } else {
                seen.insert(key, (d.file.clone(), d.line));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut deletes = Vec::new();
        if replace_source {
            let gone: Vec<ResourceKey> = candidate
                .iter()
                .filter(|(k, e)| e.source == source && !seen.contains_key(*k))
                .map(|(k, _)| k.clone())
                .collect();
            for k in gone {
                candidate.remove(&k);
                deletes.push(k);
            }
        }
        let mut upserts = Vec::new();
        for d in new_docs {
            let key = d.resource.key();
            let entry = DocEntry::new(d.resource, source, self.revision + 1);
            let action = match candidate.get(&key) {
                None => "created",
                Some(old) if old.hash == entry.hash && old.source == source => "unchanged",
                Some(_) => "configured",
            };
            fresh.insert(key.clone(), (d.file, d.line));
            results.push((key.clone(), action));
            if action != "unchanged" {
                upserts.push(StoredDoc {
                    key: key.clone(),
                    json: entry.json.to_string(),
                    source: source.to_owned(),
                    revision: 0,
                });
                candidate.insert(key, Arc::new(entry));
            }
        }
        let res = self.validate(&candidate, &fresh)?;
        if let Some(m) = &res.mesh
            && let Some(td) = &m.spec.trust_domain
            && *td != self.settings.trust_domain
        {
            let key = Resource::MeshConfig(m.clone()).key();
            let (file, line) = fresh.get(&key).cloned().unwrap_or_default();
            return Err(ConfigError::new(format!(
                "the control plane issues certificates in trust domain {:?}; start it with --trust-domain {td} or remove this field",
                self.settings.trust_domain
            ))
            .field("spec.trustDomain")
            .resource(format!("MeshConfig {}/{}", key.namespace, key.name))
            .at(file, (line > 0).then_some(line))
            .into());
        }
        if dry_run || (upserts.is_empty() && deletes.is_empty()) {
            return Ok(ApplyOutcome {
                revision: self.revision,
                results,
            });
        }
        let rev = self.persist(upserts, deletes).await?;
        self.revision = rev;
        self.docs = candidate;
        self.mark();
        Ok(ApplyOutcome {
            revision: rev,
            results,
        })
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Apply {
                sources,
                dry_run,
                reply,
            } => {
                let out = match parse_sources(sources.iter().map(|(l, t)| (l.as_str(), t.as_str())))
                {
                    Ok(docs) => self.apply_docs(docs, "api", false, dry_run).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(out);
            }
            Command::Delete { keys, reply } => {
                let mut candidate = self.docs.clone();
                let deleted: Vec<ResourceKey> = keys
                    .into_iter()
                    .filter(|k| candidate.remove(k).is_some())
                    .collect();
                let out = match self.validate(&candidate, &HashMap::new()) {
                    Err(e) => Err(e),
                    Ok(_) if deleted.is_empty() => Ok((self.revision, deleted)),
                    Ok(_) => match self.persist(Vec::new(), deleted.clone()).await {
                        Ok(rev) => {
                            self.revision = rev;
                            self.docs = candidate;
                            self.mark();
                            Ok((rev, deleted))
                        }
                        Err(e) => Err(e),
                    },
                };
                let _ = reply.send(out);
            }
            Command::SyncDir { docs } => match self.apply_docs(docs, "dir", true, false).await {
                Ok(out) => {
                    self.dir_error = None;
                    let changed = out
                        .results
                        .iter()
                        .filter(|(_, a)| *a != "unchanged")
                        .count();
                    tracing::info!(revision = out.revision, changed, "config directory applied");
                }
                Err(e) => {
                    for line in e.to_string().lines() {
                        tracing::error!("config directory refused: {line}");
                    }
                    self.dir_error = Some(e.to_string());
                }
            },
            Command::SyncSource {
                source,
                docs,
                reply,
            } => {
                let out = self.apply_docs(docs, &source, true, false).await;
                let _ = reply.send(out);
            }
            Command::Connect {
                proxy,
                stream,
                peer,
                workload,
            } => {
                let rec = self.proxies.entry(proxy.clone()).or_default();
                rec.stream = Some(stream);
                rec.peer = peer;
                rec.workload = workload
                    .as_ref()
                    .map(|w| format!("{}/{}", w.metadata.ns(), w.metadata.name))
                    .unwrap_or_default();
                match workload.map(|w| *w) {
                    Some(w) => {
                        let stored = StoredRegistration {
                            proxy: proxy.clone(),
                            workload_json: Resource::Workload(w.clone()).to_json(),
                            last_seen_ms: now_ms(),
                        };
                        if let Err(e) = self.store.put_registration(&stored) {
                            tracing::error!(error = %e, "cannot persist a registration");
                        }
                        let changed = self
                            .registry
                            .get(&proxy)
                            .is_none_or(|(r, _)| r.workload != w);
                        self.registry.insert(proxy, (Registration::new(w), None));
                        if changed {
                            self.mark();
                        } else {
                            // Same workload: only its expiry changed; nothing to push.
                        }
                    }
                    None => {
                        if self.registry.remove(&proxy).is_some() {
                            let _ = self.store.remove_registration(&proxy);
                            self.mark();
                        }
                    }
                }
            }
            Command::Disconnect { proxy, stream } => {
                if let Some(rec) = self.proxies.get_mut(&proxy)
                    && rec.stream == Some(stream)
                {
                    rec.stream = None;
                    rec.peer.clear();
                    if let Some((_, expiry)) = self.registry.get_mut(&proxy) {
                        *expiry = Some(Instant::now() + self.settings.grace_period);
                    }
                }
            }
            Command::Computed {
                proxy,
                version,
                changed_at,
            } => {
                let rec = self.proxies.entry(proxy).or_default();
                if rec.latest != version {
                    rec.latest = version;
                    rec.latest_at = Some(changed_at.unwrap_or_else(Instant::now));
                    rec.ack_latency = None;
                }
            }
            Command::Acked {
                proxy,
                version,
                error,
            } => {
                let rec = self.proxies.entry(proxy).or_default();
                match error {
                    Some(e) => rec.last_nack = e,
                    None => {
                        rec.applied = version.clone();
                        rec.last_nack.clear();
                        if version == rec.latest {
                            rec.ack_latency = rec.latest_at.map(|t| t.elapsed());
                        }
                    }
                }
            }
            Command::CertIssued { proxy, signer } => {
                self.proxies.entry(proxy).or_default().signer = signer;
            }
            Command::Status { reply } => {
                let _ = reply.send(self.proxies.clone());
            }
            Command::Current { reply } => {
                let current = if self.dirty_since.is_some() {
                    Arc::new(self.build_state())
                } else {
                    self.state_tx.borrow().clone()
                };
                let _ = reply.send(current);
            }
            Command::DirError { reply } => {
                let _ = reply.send(self.dir_error.clone());
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
