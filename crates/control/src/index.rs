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
use sinew_model::{ConfigError, ConfigErrors, Origin, Resources, parse_apply};
use tokio::sync::{mpsc, oneshot, watch};

use crate::store::{Store, StoredDoc, StoredRegistration};

/// FNV-1a 64: stable content hashes for versions. Folds `data` into `h` (start
/// with [`FNV_OFFSET`]), so chained calls hash the concatenation.
pub fn fnv64(h: u64, data: &[u8]) -> u64 {
    let mut h = fnv::FnvHasher::with_key(h);
    std::hash::Hasher::write(&mut h, data);
    std::hash::Hasher::finish(&h)
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

/// Changes made in place to the documents in force, with what each replaced in
/// `docs` and in the validated set (`None`: the key was absent), so a refused
/// change can be put back.
type Undo = Vec<(ResourceKey, Option<Arc<DocEntry>>, Option<Document>)>;

/// Where a stored document came from, for errors that name it.
fn stored_origin(source: &str) -> Origin {
    Origin {
        file: format!("(stored, from {source})"),
        line: 0,
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

/// The state proxies are computed from: the documents in force, plus each registered
/// workload whose name no stored Workload has and whose service (if it names one)
/// exists. A free function so that the fuzz targets (fuzz/) build states as the index
/// does.
pub(crate) fn mesh_state<'a>(
    revision: u64,
    docs: &BTreeMap<ResourceKey, Arc<DocEntry>>,
    registry: impl Iterator<Item = (&'a String, &'a Registration)>,
    trust_domain: &str,
) -> MeshState {
    let mut docs = docs.clone();
    let mut registrations = BTreeMap::new();
    for (proxy, reg) in registry {
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
    MeshState::new(revision, docs, registrations, trust_domain.to_owned())
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
        /// Check only: answer what would be deleted, change nothing.
        dry_run: bool,
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
    /// A proxy is draining: its workload leaves at once, without a grace period.
    Deregister {
        /// `namespace/name`.
        proxy: String,
        /// Stream id: only the proxy's current stream may deregister it.
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
    /// A proxy's view held documents the proxy would refuse: they were left out
    /// (or, when its own document was refused, nothing was sent).
    Withheld {
        /// `namespace/name`.
        proxy: String,
        /// Why.
        problems: Vec<String>,
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
    /// `docs` as one validated set, changed with it: an apply checks the set it
    /// would make without rebuilding it.
    res: Resources,
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
    let mut res = Resources::default();
    for e in docs.values() {
        let origin = stored_origin(&e.source);
        let doc = Document {
            resource: e.resource.clone(),
            file: origin.file,
            line: origin.line,
        };
        if let Err(error) = res.add(doc) {
            tracing::error!(key = %e.key, %error, "stored document refused");
        }
    }
    let (state_tx, state_rx) = watch::channel(Arc::new(MeshState::default()));
    let (tx, rx) = mpsc::channel(1024);
    let mut index = Index {
        store,
        settings,
        revision,
        docs,
        res,
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
        mesh_state(
            self.revision,
            &self.docs,
            self.registry.iter().map(|(p, (r, _))| (p, r)),
            &self.settings.trust_domain,
        )
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

    /// Sets `key` to `entry` (from `origin`), or removes it, in the documents in
    /// force and in the validated set, noting what it replaced in `undo`. Changes
    /// are made in place and undone when refused: cloning the whole mesh for every
    /// apply would cost in proportion to the mesh, not to the change. A document the
    /// set refuses (a bad name) is an error; `undo` still puts everything back.
    fn put(
        &mut self,
        undo: &mut Undo,
        key: ResourceKey,
        entry: Option<(Arc<DocEntry>, Origin)>,
    ) -> Result<(), ConfigError> {
        let prev_doc = self.res.remove(&key.kind, &key.namespace, &key.name);
        let (prev, added) = match entry {
            Some((e, origin)) => {
                let doc = Document {
                    resource: e.resource.clone(),
                    file: origin.file,
                    line: origin.line,
                };
                (self.docs.insert(key.clone(), e), self.res.add(doc))
            }
            None => (self.docs.remove(&key), Ok(())),
        };
        undo.push((key, prev, prev_doc));
        added
    }

    /// Puts back what `undo` notes, newest first.
    fn undo(&mut self, undo: Undo) {
        for (key, prev, prev_doc) in undo.into_iter().rev() {
            self.res.remove(&key.kind, &key.namespace, &key.name);
            if let Some(d) = prev_doc
                && let Err(error) = self.res.add(d)
            {
                // It was in the set a moment ago, so it fits again.
                tracing::error!(%key, %error, "cannot restore a document to the validated set");
            }
            match prev {
                Some(e) => self.docs.insert(key, e),
                None => self.docs.remove(&key),
            };
        }
    }

    /// The documents in force as one set: every field and every reference checked.
    fn check(&self, mut errors: ConfigErrors) -> Result<(), ConfigErrors> {
        if let Err(more) = self.res.check() {
            errors.0.extend(more.0);
        }
        errors.into_result(())
    }

    /// Applies `new_docs`: all of them, or (on any error, and on a dry run) none.
    async fn apply_docs(
        &mut self,
        new_docs: Vec<Document>,
        source: &str,
        replace_source: bool,
        dry_run: bool,
    ) -> Result<ApplyOutcome, ConfigErrors> {
        let mut undo = Undo::new();
        let mut fresh = HashMap::new();
        let out = self
            .apply_in_place(
                new_docs,
                source,
                replace_source,
                dry_run,
                &mut undo,
                &mut fresh,
            )
            .await;
        if out.is_err() || dry_run {
            self.undo(undo);
        }
        // Errors about documents of this apply named where they were written;
        // from now on they are stored documents.
        for k in fresh.into_keys() {
            if let Some(e) = self.docs.get(&k) {
                let origin = stored_origin(&e.source);
                self.res.set_origin(&k.kind, &k.namespace, &k.name, origin);
            }
        }
        out
    }

    /// [`Index::apply_docs`]'s work, changing `self.docs` in place and noting each
    /// change in `undo`, and where each applied document was written in `fresh`.
    async fn apply_in_place(
        &mut self,
        new_docs: Vec<Document>,
        source: &str,
        replace_source: bool,
        dry_run: bool,
        undo: &mut Undo,
        fresh: &mut HashMap<ResourceKey, (String, usize)>,
    ) -> Result<ApplyOutcome, ConfigErrors> {
        let mut results = Vec::new();
        let mut errors = ConfigErrors::default();
        for d in &new_docs {
            let key = d.resource.key();
            if let Some((file, line)) = fresh.get(&key) {
                errors.push(
                    ConfigError::new(format!("duplicate {key}: already defined at {file}:{line}"))
                        .field("metadata.name")
                        .resource(d.resource.label())
                        .at(d.file.clone(), Some(d.line)),
                );
            } else {
                fresh.insert(key, (d.file.clone(), d.line));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut deletes = Vec::new();
        if replace_source {
            let gone: Vec<ResourceKey> = self
                .docs
                .iter()
                .filter(|(k, e)| e.source == source && !fresh.contains_key(*k))
                .map(|(k, _)| k.clone())
                .collect();
            for k in gone {
                // A removal cannot be refused by the set.
                let _ = self.put(undo, k.clone(), None);
                deletes.push(k);
            }
        }
        let mut upserts = Vec::new();
        for d in new_docs {
            let key = d.resource.key();
            let entry = DocEntry::new(d.resource, source, self.revision + 1);
            let action = match self.docs.get(&key) {
                None => "created",
                Some(old) if old.hash == entry.hash && old.source == source => "unchanged",
                Some(_) => "configured",
            };
            let origin = Origin {
                file: d.file,
                line: d.line,
            };
            results.push((key.clone(), action));
            if action != "unchanged" {
                upserts.push(StoredDoc {
                    key: key.clone(),
                    json: entry.json.to_string(),
                    source: source.to_owned(),
                    revision: 0,
                });
                if let Err(e) = self.put(undo, key, Some((Arc::new(entry), origin))) {
                    errors.push(e);
                }
            } else {
                // Unchanged, but an error about it names where it was written now.
                self.res
                    .set_origin(&key.kind, &key.namespace, &key.name, origin);
            }
        }
        self.check(errors)?;
        if let Some(m) = &self.res.mesh
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
                let out = match parse_apply(sources.iter().map(|(l, t)| (l.as_str(), t.as_str()))) {
                    Ok(docs) => self.apply_docs(docs, "api", false, dry_run).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(out);
            }
            Command::Delete {
                keys,
                dry_run,
                reply,
            } => {
                let mut undo = Undo::new();
                let mut deleted = Vec::new();
                for k in keys {
                    if self.docs.contains_key(&k) {
                        // A removal cannot be refused by the set.
                        let _ = self.put(&mut undo, k.clone(), None);
                        deleted.push(k);
                    }
                }
                let out = match self.check(ConfigErrors::default()) {
                    Err(e) => Err(e),
                    Ok(_) if deleted.is_empty() || dry_run => Ok((self.revision, deleted)),
                    Ok(_) => match self.persist(Vec::new(), deleted.clone()).await {
                        Ok(rev) => {
                            self.revision = rev;
                            self.mark();
                            Ok((rev, deleted))
                        }
                        Err(e) => Err(e),
                    },
                };
                if out.is_err() || dry_run {
                    self.undo(undo);
                }
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
            Command::Deregister { proxy, stream } => {
                if self
                    .proxies
                    .get(&proxy)
                    .is_some_and(|rec| rec.stream == Some(stream))
                    && self.registry.remove(&proxy).is_some()
                {
                    if let Err(e) = self.store.remove_registration(&proxy) {
                        tracing::error!(error = %e, "cannot forget a registration");
                    }
                    self.mark();
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
            Command::Withheld { proxy, problems } => {
                self.proxies.entry(proxy).or_default().last_nack = format!(
                    "not sent (the proxy would refuse it): {}",
                    problems.join("; ")
                );
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

#[cfg(test)]
mod tests {
    use super::*;

    /// FNV-1a 64's published vectors; chained calls hash the concatenation (what
    /// the directory source and entry ids rely on).
    #[test]
    fn content_hashes_are_fnv1a_64() {
        assert_eq!(fnv64(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv64(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv64(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(
            fnv64(fnv64(FNV_OFFSET, b"foo"), b"bar"),
            fnv64(FNV_OFFSET, b"foobar")
        );
    }

    /// A scratch directory, removed when dropped.
    struct Scratch(std::path::PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn index() -> (Scratch, mpsc::Sender<Command>) {
        let dir =
            std::env::temp_dir().join(format!("sinew-index-{}-{}", std::process::id(), now_ms()));
        let store = Store::open(&dir).expect("store");
        let settings = IndexSettings {
            grace_period: Duration::from_secs(60),
            debounce: Duration::from_millis(1),
            trust_domain: "cluster.local".into(),
        };
        let (tx, _) = spawn(store, settings).expect("index");
        (Scratch(dir), tx)
    }

    async fn apply(
        tx: &mpsc::Sender<Command>,
        file: &str,
        text: &str,
        dry_run: bool,
    ) -> Result<ApplyOutcome, ConfigErrors> {
        let (reply, rx) = oneshot::channel();
        let sources = vec![(file.to_owned(), text.to_owned())];
        let cmd = Command::Apply {
            sources,
            dry_run,
            reply,
        };
        tx.send(cmd).await.unwrap_or_else(|_| panic!("index gone"));
        rx.await.unwrap_or_else(|_| panic!("no answer"))
    }

    async fn delete(
        tx: &mpsc::Sender<Command>,
        key: ResourceKey,
    ) -> Result<(u64, Vec<ResourceKey>), ConfigErrors> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Delete {
            keys: vec![key],
            dry_run: false,
            reply,
        };
        tx.send(cmd).await.unwrap_or_else(|_| panic!("index gone"));
        rx.await.unwrap_or_else(|_| panic!("no answer"))
    }

    /// Every document in force: `Kind ns/name` and its content hash.
    async fn docs(tx: &mpsc::Sender<Command>) -> Vec<(String, u64)> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Current { reply };
        tx.send(cmd).await.unwrap_or_else(|_| panic!("index gone"));
        let state = rx.await.unwrap_or_else(|_| panic!("no answer"));
        state
            .docs
            .values()
            .map(|e| (e.key.to_string(), e.hash))
            .collect()
    }

    fn service(name: &str, ports: &str) -> String {
        format!(
            "---\napiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{ports: {ports}}}\n"
        )
    }

    const ROUTE: &str = "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec: {parentRefs: [{name: catalog}], rules: [{backendRefs: [{name: catalog}]}]}\n";

    fn messages(e: &ConfigErrors) -> String {
        e.0.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Applies change the index's documents in place and undo them when refused:
    /// a refused apply, a refused delete and a dry run leave exactly what was there,
    /// and the next apply is checked against that.
    #[tokio::test]
    async fn a_refused_change_leaves_every_document_as_it_was() {
        let (_dir, tx) = index();
        let http = "[{name: http, port: 80}]";
        let first = format!("{}{ROUTE}", service("catalog", http));
        apply(&tx, "first.yaml", &first, false).await.unwrap();
        let before = docs(&tx).await;
        assert_eq!(before.len(), 2, "{before:?}");

        // A bad replacement of a stored document, next to a good new one.
        let bad = format!("{}{}", service("innocent", http), service("catalog", "[]"));
        let e = apply(&tx, "bad.yaml", &bad, false)
            .await
            .err()
            .unwrap_or_else(|| panic!("a service without ports was accepted"));
        let text = messages(&e);
        assert!(
            text.contains("bad.yaml:7") && text.contains("a service needs at least one port"),
            "the error names the new document where it was written:\n{text}"
        );
        assert_eq!(
            docs(&tx).await,
            before,
            "nothing of a refused apply is kept"
        );

        // A bad name is refused too, whole.
        let e = apply(&tx, "name.yaml", &service("Bad_Name", http), false)
            .await
            .err()
            .unwrap_or_else(|| panic!("a bad name was accepted"));
        assert!(messages(&e).contains("is not a valid name"), "{e:?}");
        assert_eq!(docs(&tx).await, before);

        // Deleting what the stored route needs: the route is named as stored.
        let catalog = ResourceKey {
            kind: "Service".into(),
            namespace: "shop".into(),
            name: "catalog".into(),
        };
        let e = delete(&tx, catalog.clone())
            .await
            .err()
            .unwrap_or_else(|| panic!("a service a route needs was deleted"));
        let text = messages(&e);
        assert!(
            text.contains("(stored, from api)")
                && text.contains("service shop/catalog does not exist"),
            "{text}"
        );
        assert_eq!(
            docs(&tx).await,
            before,
            "nothing of a refused delete is kept"
        );

        // A dry run checks, and keeps nothing.
        apply(&tx, "dry.yaml", &service("other", http), true)
            .await
            .unwrap();
        assert_eq!(docs(&tx).await, before, "nothing of a dry run is kept");

        // What was refused left the set intact: a good change goes through, and
        // errors about documents applied earlier name them as stored.
        let second = format!(
            "{}{}",
            service("catalog", "[{name: http, port: 8080}]"),
            service("other", http)
        );
        apply(&tx, "second.yaml", &second, false).await.unwrap();
        let after = docs(&tx).await;
        assert_eq!(after.len(), 3, "{after:?}");
        assert_ne!(after, before);
        let e = apply(
            &tx,
            "dup.yaml",
            &service("catalog", "[{name: http, port: 80}, {name: web, port: 80}]"),
            false,
        )
        .await
        .err()
        .unwrap_or_else(|| panic!("a duplicate port was accepted"));
        assert!(messages(&e).contains("dup.yaml:2"), "{e:?}");
        assert_eq!(docs(&tx).await, after);
        let (_, deleted) = delete(
            &tx,
            ResourceKey {
                name: "other".into(),
                ..catalog
            },
        )
        .await
        .unwrap();
        assert_eq!(deleted.len(), 1);
        assert_eq!(docs(&tx).await.len(), 2);
    }
}
