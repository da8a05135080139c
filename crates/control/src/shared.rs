//! State every replica of the control plane must agree on: documents applied through
//! the operator API, join tokens, and operator credentials with their revocations.
//!
//! By default it lives in the local durable [`Store`] (one control plane, one disk).
//! On Kubernetes (`sinew control --kubernetes`) `sinew-k8s` implements [`SharedState`]
//! over the API server, so every replica serves the same state and a replica with a
//! fresh disk loses nothing: applied documents become custom resources that come back
//! through the Kubernetes source like any other, tokens and credentials are Secrets and
//! a ConfigMap in the control plane's namespace.
//!
//! What stays in the local store either way: registrations (live workloads, rebuilt
//! from proxies reconnecting), the store revision, and the documents of the sources
//! themselves (kept so a restarted control plane serves while it re-reads them).

use std::future::Future;
use std::pin::Pin;

use sinew_model::resource::ResourceKey;

use crate::store::{SpendError, Store, StoredCredential, StoredToken};

/// A boxed future, for the trait to stay object-safe.
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why shared state could not be read or written.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct StateError(pub String);

impl From<crate::store::StoreError> for StateError {
    fn from(e: crate::store::StoreError) -> Self {
        StateError(e.to_string())
    }
}

/// A document to write: its key and its canonical JSON ([`sinew_model::resource::Resource::to_json`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentWrite {
    /// The document's key.
    pub key: ResourceKey,
    /// The document, as JSON (`apiVersion`, `kind`, `metadata`, `spec`).
    pub json: String,
}

/// Where the state replicas share lives (see the module docs).
pub trait SharedState: Send + Sync + std::fmt::Debug {
    /// Whether documents applied through the operator API are written here rather
    /// than committed to the local store by the index. When true, `sinew apply` and
    /// `sinew delete` validate against the index (a dry run), then call
    /// [`SharedState::write_documents`] / [`SharedState::delete_documents`], and the
    /// documents reach the index back through a source that watches them.
    fn owns_documents(&self) -> bool {
        false
    }

    /// Writes documents (all validated already). Only called when
    /// [`SharedState::owns_documents`].
    fn write_documents(&self, docs: Vec<DocumentWrite>) -> Pending<'_, Result<(), StateError>> {
        let _ = docs;
        Box::pin(async { Err(StateError("this state holds no documents".into())) })
    }

    /// Deletes documents; returns the keys that were there. Only called when
    /// [`SharedState::owns_documents`].
    fn delete_documents(
        &self,
        keys: Vec<ResourceKey>,
    ) -> Pending<'_, Result<Vec<ResourceKey>, StateError>> {
        let _ = keys;
        Box::pin(async { Err(StateError("this state holds no documents".into())) })
    }

    /// Stores a join token's binding under the token's SHA-256 (hex).
    fn put_token(&self, hash: String, token: StoredToken) -> Pending<'_, Result<(), StateError>>;

    /// Spends one use of the token with this hash for a proxy in `namespace`, so that
    /// two callers (two replicas) racing for the last use cannot both win. A token
    /// whose uses run out is removed, an expired one too.
    fn spend_token(
        &self,
        hash: String,
        namespace: String,
        now_unix: i64,
    ) -> Pending<'_, Result<StoredToken, SpendError>>;

    /// Every unexpired token with its hash (expired ones removed).
    fn tokens(&self, now_unix: i64) -> Pending<'_, Result<Vec<(String, StoredToken)>, StateError>>;

    /// Removes the tokens whose id or hash is `id`; returns how many.
    fn revoke_token(&self, id: String, now_unix: i64) -> Pending<'_, Result<usize, StateError>>;

    /// Records an operator credential under its certificate's SHA-256.
    fn put_credential(
        &self,
        fingerprint: String,
        credential: StoredCredential,
    ) -> Pending<'_, Result<(), StateError>>;

    /// Every recorded credential with its fingerprint.
    fn credentials(&self) -> Pending<'_, Result<Vec<(String, StoredCredential)>, StateError>>;

    /// True when the credential with this fingerprint was revoked, or its `name` was
    /// revoked after it was issued (`not_before_unix`). Called on every operator call,
    /// so it answers without I/O to another host (a cache kept current is fine); when
    /// it cannot tell, it says revoked.
    fn credential_revoked(&self, fingerprint: &str, name: &str, not_before_unix: i64) -> bool;

    /// Revokes every credential named `name`, and the name as of now; returns how many
    /// recorded credentials were.
    fn revoke_credentials(&self, name: String) -> Pending<'_, Result<usize, StateError>>;
}

/// Runs a store operation on the blocking pool (redb commits sync to disk).
fn blocking<T: Send + 'static, E: Send + 'static>(
    store: &Store,
    f: impl FnOnce(&Store) -> Result<T, E> + Send + 'static,
    joined: impl FnOnce(String) -> E + Send + 'static,
) -> Pending<'static, Result<T, E>> {
    let store = store.clone();
    Box::pin(async move {
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .unwrap_or_else(|e| Err(joined(format!("store task failed: {e}"))))
    })
}

fn state_err(m: String) -> StateError {
    StateError(m)
}

/// The default: everything in the local store.
impl SharedState for Store {
    fn put_token(&self, hash: String, token: StoredToken) -> Pending<'_, Result<(), StateError>> {
        blocking(
            self,
            move |s| s.put_token(&hash, &token).map_err(StateError::from),
            state_err,
        )
    }

    fn spend_token(
        &self,
        hash: String,
        namespace: String,
        now_unix: i64,
    ) -> Pending<'_, Result<StoredToken, SpendError>> {
        blocking(
            self,
            move |s| s.spend_token(&hash, &namespace, now_unix),
            SpendError::Store,
        )
    }

    fn tokens(&self, now_unix: i64) -> Pending<'_, Result<Vec<(String, StoredToken)>, StateError>> {
        blocking(
            self,
            move |s| s.tokens(now_unix).map_err(StateError::from),
            state_err,
        )
    }

    fn revoke_token(&self, id: String, now_unix: i64) -> Pending<'_, Result<usize, StateError>> {
        blocking(
            self,
            move |s| s.revoke_token(&id, now_unix).map_err(StateError::from),
            state_err,
        )
    }

    fn put_credential(
        &self,
        fingerprint: String,
        credential: StoredCredential,
    ) -> Pending<'_, Result<(), StateError>> {
        blocking(
            self,
            move |s| {
                s.put_credential(&fingerprint, &credential)
                    .map_err(StateError::from)
            },
            state_err,
        )
    }

    fn credentials(&self) -> Pending<'_, Result<Vec<(String, StoredCredential)>, StateError>> {
        blocking(
            self,
            |s| s.credentials().map_err(StateError::from),
            state_err,
        )
    }

    fn credential_revoked(&self, fingerprint: &str, name: &str, not_before_unix: i64) -> bool {
        Store::credential_revoked(self, fingerprint, name, not_before_unix)
    }

    fn revoke_credentials(&self, name: String) -> Pending<'_, Result<usize, StateError>> {
        blocking(
            self,
            move |s| s.revoke_credentials(&name).map_err(StateError::from),
            state_err,
        )
    }
}

/// Whether a credential `name` issued at `not_before_unix` falls under a revocation of
/// that name made at `revoked_unix`. notBefore is backdated a minute (clock slack): a
/// certificate whose notBefore is before the revocation was issued before it, or just
/// after.
pub fn revoked_since(not_before_unix: i64, revoked_unix: i64) -> bool {
    not_before_unix + 60 <= revoked_unix
}

/// How long `sinew apply`/`sinew delete` wait for what they wrote to come back
/// through the source that watches it, so that a `sinew get` right after shows it.
const SEEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A document's JSON without what the place it is stored adds (`creationTimestamp`),
/// to tell whether an apply changes it.
fn comparable(json: &str) -> Option<serde_json::Value> {
    let mut v: serde_json::Value = serde_json::from_str(json).ok()?;
    if let Some(m) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        m.remove("creationTimestamp");
    }
    Some(v)
}

/// Sends one command to the index (the single writer) and waits for its answer.
async fn ask<T>(
    index: &tokio::sync::mpsc::Sender<crate::index::Command>,
    command: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> crate::index::Command,
) -> Result<T, tonic::Status> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    index
        .send(command(reply))
        .await
        .map_err(|_| tonic::Status::unavailable("control plane is shutting down"))?;
    answer
        .await
        .map_err(|_| tonic::Status::internal("the index did not answer"))
}

/// The index's documents now, published or not (as `sinew get` reads them).
async fn current(
    index: &tokio::sync::mpsc::Sender<crate::index::Command>,
) -> Result<std::sync::Arc<crate::index::MeshState>, tonic::Status> {
    ask(index, |reply| crate::index::Command::Current { reply }).await
}

/// Waits until the published state satisfies `seen` (or [`SEEN_TIMEOUT`] passes);
/// returns its revision, or what is still missing.
async fn until_seen(
    state: &mut tokio::sync::watch::Receiver<std::sync::Arc<crate::index::MeshState>>,
    missing: impl Fn(&crate::index::MeshState) -> Vec<String>,
) -> Result<u64, Vec<String>> {
    let deadline = tokio::time::Instant::now() + SEEN_TIMEOUT;
    loop {
        let (left, revision) = {
            let s = state.borrow_and_update();
            (missing(&s), s.revision)
        };
        if left.is_empty() {
            return Ok(revision);
        }
        match tokio::time::timeout_at(deadline, state.changed()).await {
            Ok(Ok(())) => {}
            _ => return Err(left),
        }
    }
}

/// `sinew apply` when the documents live in `shared`: validated by the index as a
/// dry run (every error comes back as it would for the store), then written to
/// `shared`, then awaited until the source watching them has brought them to the
/// index.
pub(crate) async fn apply(
    index: &tokio::sync::mpsc::Sender<crate::index::Command>,
    mut state: tokio::sync::watch::Receiver<std::sync::Arc<crate::index::MeshState>>,
    shared: &dyn SharedState,
    sources: Vec<(String, String)>,
    dry_run: bool,
) -> Result<crate::index::ApplyOutcome, tonic::Status> {
    use tonic::Status;
    let docs =
        sinew_model::load::parse_apply(sources.iter().map(|(l, t)| (l.as_str(), t.as_str())))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let checked = ask(index, |reply| crate::index::Command::Apply {
        sources,
        dry_run: true,
        reply,
    })
    .await?
    .map_err(|e| Status::invalid_argument(e.to_string()))?;
    // The index compares with documents of the source `api`; these come back from
    // another one, so whether one changes is decided here, by content.
    let before = current(index).await?;
    let mut results = Vec::new();
    let mut writes = Vec::new();
    for d in docs {
        let key = d.resource.key();
        let json = d.resource.to_json();
        let action = match before.docs.get(&key) {
            None => "created",
            Some(e) if comparable(&e.json) == comparable(&json) => "unchanged",
            Some(_) => "configured",
        };
        results.push((key.clone(), action));
        writes.push(DocumentWrite { key, json });
    }
    if dry_run {
        return Ok(crate::index::ApplyOutcome {
            revision: checked.revision,
            results,
        });
    }
    shared
        .write_documents(writes.clone())
        .await
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
    let wanted: Vec<(ResourceKey, Option<serde_json::Value>)> = writes
        .into_iter()
        .map(|w| (w.key, comparable(&w.json)))
        .collect();
    // In force once the source brought it: the same content, or changed since the
    // apply began (the API server may have defaulted or pruned a field).
    let since = before.revision;
    let revision = until_seen(&mut state, |s| {
        wanted
            .iter()
            .filter(|(k, json)| {
                s.docs.get(k).is_none_or(|e| {
                    e.source == "api" || (comparable(&e.json) != *json && e.revision <= since)
                })
            })
            .map(|(k, _)| k.to_string())
            .collect()
    })
    .await
    .map_err(|left| {
        Status::deadline_exceeded(format!(
            "written to the cluster, but not in force after {}s: {} (see their status conditions)",
            SEEN_TIMEOUT.as_secs(),
            left.join(", ")
        ))
    })?;
    Ok(crate::index::ApplyOutcome { revision, results })
}

/// `sinew delete` when the documents live in `shared`: the index checks that the rest
/// stays valid without them (a dry run), then they are deleted from `shared` and
/// awaited until gone from the index. A document the index has but `shared` does not
/// (one that stands for another object, e.g. a Kubernetes Service) is an error.
pub(crate) async fn delete(
    index: &tokio::sync::mpsc::Sender<crate::index::Command>,
    mut state: tokio::sync::watch::Receiver<std::sync::Arc<crate::index::MeshState>>,
    shared: &dyn SharedState,
    keys: Vec<ResourceKey>,
) -> Result<(u64, Vec<ResourceKey>), tonic::Status> {
    use tonic::Status;
    let (_, present) = ask(index, |reply| crate::index::Command::Delete {
        keys,
        dry_run: true,
        reply,
    })
    .await?
    .map_err(|e| Status::failed_precondition(e.to_string()))?;
    let mut deleted = shared
        .delete_documents(present.clone())
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    // Documents applied before the state was shared (source `api`, in the local
    // store) are deleted there.
    let (local, elsewhere): (Vec<ResourceKey>, Vec<String>) = {
        let s = current(index).await?;
        let mut local = Vec::new();
        let mut elsewhere = Vec::new();
        for k in present.iter().filter(|k| !deleted.contains(k)) {
            match s.docs.get(k).map(|e| e.source.as_str()) {
                Some("api") => local.push(k.clone()),
                from => elsewhere.push(format!("{k} (from {})", from.unwrap_or("nowhere"))),
            }
        }
        (local, elsewhere)
    };
    if !local.is_empty() {
        let (_, gone) = ask(index, |reply| crate::index::Command::Delete {
            keys: local,
            dry_run: false,
            reply,
        })
        .await?
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
        deleted.extend(gone);
    }
    let revision = until_seen(&mut state, |s| {
        deleted
            .iter()
            .filter(|k| s.docs.contains_key(*k))
            .map(|k| k.to_string())
            .collect()
    })
    .await
    .map_err(|left| {
        Status::deadline_exceeded(format!(
            "deleted from the cluster, but still in force after {}s: {}",
            SEEN_TIMEOUT.as_secs(),
            left.join(", ")
        ))
    })?;
    if !elsewhere.is_empty() {
        return Err(Status::failed_precondition(format!(
            "not custom resources Sinew stores, so not deleted: {}; delete the objects they come from{}",
            elsewhere.join(", "),
            if deleted.is_empty() {
                String::new()
            } else {
                format!(
                    " (deleted: {})",
                    deleted
                        .iter()
                        .map(|k| k.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        )));
    }
    Ok((revision, deleted))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use sinew_model::load::Document;
    use sinew_model::resource::Resource;
    use tokio::sync::{mpsc, oneshot, watch};

    use super::*;
    use crate::index::{Command, IndexSettings, MeshState};

    /// A scratch directory, removed when dropped.
    struct Scratch(std::path::PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Documents kept in memory and fed back to the index as the source `fake`, as the
    /// Kubernetes source feeds back custom resources.
    #[derive(Debug)]
    struct Fake {
        docs: Mutex<BTreeMap<ResourceKey, String>>,
        writes: Mutex<usize>,
        index: mpsc::Sender<Command>,
    }

    impl Fake {
        async fn sync(&self) -> Result<(), StateError> {
            let docs: Vec<Document> = self
                .docs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(k, json)| Document {
                    resource: Resource::from_json(&k.kind, json)
                        .unwrap_or_else(|e| panic!("{k}: {e}")),
                    file: k.to_string(),
                    line: 0,
                })
                .collect();
            let (reply, answer) = oneshot::channel();
            self.index
                .send(Command::SyncSource {
                    source: "fake".into(),
                    docs,
                    reply,
                })
                .await
                .map_err(|_| StateError("index gone".into()))?;
            answer
                .await
                .map_err(|_| StateError("no answer".into()))?
                .map(|_| ())
                .map_err(|e| StateError(e.to_string()))
        }
    }

    fn unused<T: Send + 'static>() -> Pending<'static, Result<T, StateError>> {
        Box::pin(async { Err(StateError("not used by these tests".into())) })
    }

    impl SharedState for Fake {
        fn owns_documents(&self) -> bool {
            true
        }
        fn write_documents(&self, docs: Vec<DocumentWrite>) -> Pending<'_, Result<(), StateError>> {
            Box::pin(async move {
                *self.writes.lock().unwrap_or_else(|e| e.into_inner()) += docs.len();
                for d in docs {
                    self.docs
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(d.key, d.json);
                }
                self.sync().await
            })
        }
        fn delete_documents(
            &self,
            keys: Vec<ResourceKey>,
        ) -> Pending<'_, Result<Vec<ResourceKey>, StateError>> {
            Box::pin(async move {
                let gone: Vec<ResourceKey> = keys
                    .into_iter()
                    .filter(|k| {
                        self.docs
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(k)
                            .is_some()
                    })
                    .collect();
                self.sync().await?;
                Ok(gone)
            })
        }
        fn put_token(&self, _: String, _: StoredToken) -> Pending<'_, Result<(), StateError>> {
            unused()
        }
        fn spend_token(
            &self,
            _: String,
            _: String,
            _: i64,
        ) -> Pending<'_, Result<StoredToken, SpendError>> {
            Box::pin(async { Err(SpendError::Unknown) })
        }
        fn tokens(&self, _: i64) -> Pending<'_, Result<Vec<(String, StoredToken)>, StateError>> {
            unused()
        }
        fn revoke_token(&self, _: String, _: i64) -> Pending<'_, Result<usize, StateError>> {
            unused()
        }
        fn put_credential(
            &self,
            _: String,
            _: StoredCredential,
        ) -> Pending<'_, Result<(), StateError>> {
            unused()
        }
        fn credentials(&self) -> Pending<'_, Result<Vec<(String, StoredCredential)>, StateError>> {
            unused()
        }
        fn credential_revoked(&self, _: &str, _: &str, _: i64) -> bool {
            true
        }
        fn revoke_credentials(&self, _: String) -> Pending<'_, Result<usize, StateError>> {
            unused()
        }
    }

    fn setup() -> (
        Scratch,
        mpsc::Sender<Command>,
        watch::Receiver<Arc<MeshState>>,
        Fake,
    ) {
        let dir = std::env::temp_dir().join(format!(
            "sinew-shared-{}-{}",
            std::process::id(),
            fastrand_id()
        ));
        let store = Store::open(&dir).expect("store");
        let (index, state) = crate::index::spawn(
            store,
            IndexSettings {
                grace_period: Duration::from_secs(60),
                debounce: Duration::from_millis(1),
                trust_domain: "cluster.local".into(),
            },
        )
        .expect("index");
        let fake = Fake {
            docs: Mutex::default(),
            writes: Mutex::new(0),
            index: index.clone(),
        };
        (Scratch(dir), index, state, fake)
    }

    fn fastrand_id() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    }

    fn service(name: &str) -> String {
        format!(
            "apiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  ports: [{{name: http, port: 80}}]\n"
        )
    }

    fn key(name: &str) -> ResourceKey {
        ResourceKey {
            kind: "Service".into(),
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    fn actions(out: &crate::index::ApplyOutcome) -> Vec<&'static str> {
        out.results.iter().map(|(_, a)| *a).collect()
    }

    #[tokio::test]
    async fn apply_validates_before_writing_and_returns_once_the_source_brought_it_back() {
        let (_dir, index, state, fake) = setup();
        let src = |t: &str| vec![("mesh.yaml".to_owned(), t.to_owned())];

        // Refused with the reason; nothing written.
        let bad = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{kind: Service, name: nowhere}]\n  rules:\n    - backendRefs: [{name: web}]\n";
        let e = apply(&index, state.clone(), &fake, src(bad), false)
            .await
            .err()
            .unwrap_or_else(|| panic!("an invalid route was applied"));
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("nowhere"), "{e:?}");
        assert_eq!(*fake.writes.lock().unwrap_or_else(|e| e.into_inner()), 0);

        // A dry run writes nothing either.
        let out = apply(&index, state.clone(), &fake, src(&service("web")), true)
            .await
            .unwrap();
        assert_eq!(actions(&out), ["created"]);
        assert_eq!(*fake.writes.lock().unwrap_or_else(|e| e.into_inner()), 0);

        // Written, and in force (from the source) when the call returns.
        let out = apply(&index, state.clone(), &fake, src(&service("web")), false)
            .await
            .unwrap();
        assert_eq!(actions(&out), ["created"]);
        assert_eq!(
            state
                .borrow()
                .docs
                .get(&key("web"))
                .map(|e| e.source.clone()),
            Some("fake".to_owned())
        );
        let out = apply(&index, state.clone(), &fake, src(&service("web")), false)
            .await
            .unwrap();
        assert_eq!(actions(&out), ["unchanged"]);
    }

    #[tokio::test]
    async fn delete_removes_from_the_shared_state_and_leftovers_from_the_store() {
        let (_dir, index, state, fake) = setup();
        let src = |t: &str| vec![("mesh.yaml".to_owned(), t.to_owned())];
        apply(&index, state.clone(), &fake, src(&service("web")), false)
            .await
            .unwrap();
        // Applied before the state was shared: in the local store, source `api`.
        let (reply, answer) = oneshot::channel();
        index
            .send(Command::Apply {
                sources: src(&service("old")),
                dry_run: false,
                reply,
            })
            .await
            .unwrap_or_else(|_| panic!("index gone"));
        answer
            .await
            .unwrap_or_else(|_| panic!("no answer"))
            .unwrap();

        let (_, deleted) = delete(&index, state.clone(), &fake, vec![key("web"), key("old")])
            .await
            .unwrap();
        assert_eq!(deleted, [key("web"), key("old")]);
        let s = state.borrow().clone();
        assert!(!s.docs.contains_key(&key("web")) && !s.docs.contains_key(&key("old")));
        assert!(
            fake.docs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
        );

        // Another source's document is not this state's to delete.
        let (reply, answer) = oneshot::channel();
        let resource = Resource::from_json(
            "Service",
            r#"{"apiVersion":"sinew.dev/v1alpha1","kind":"Service","metadata":{"name":"core","namespace":"shop"},"spec":{"ports":[{"name":"http","port":80}]}}"#,
        )
        .unwrap();
        index
            .send(Command::SyncSource {
                source: "kubernetes".into(),
                docs: vec![Document {
                    resource,
                    file: "core".into(),
                    line: 0,
                }],
                reply,
            })
            .await
            .unwrap_or_else(|_| panic!("index gone"));
        answer
            .await
            .unwrap_or_else(|_| panic!("no answer"))
            .unwrap();
        let e = delete(&index, state.clone(), &fake, vec![key("core")])
            .await
            .err()
            .unwrap_or_else(|| panic!("a document of another source was deleted"));
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(
            e.message().contains("Service shop/core (from kubernetes)"),
            "{e:?}"
        );
    }
}
