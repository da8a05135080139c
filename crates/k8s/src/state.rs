//! The control plane's shared state in the API server ([`KubeState`]): what
//! `sinew control --kubernetes` keeps there instead of in a replica's local store, so
//! every replica serves the same state and a replica with a fresh disk loses nothing.
//!
//! - Documents applied with `sinew apply` become custom resources (server-side apply,
//!   field manager [`crate::FIELD_MANAGER`]); `sinew delete` deletes them. The Kubernetes
//!   source watches them and feeds every replica's index like any custom resource.
//! - A join token is a Secret `sinew-join-token-<id>` (type `sinew.dev/join-token`,
//!   labelled `sinew.dev/join-token=<id>`) holding only the token's SHA-256 and its
//!   binding. A use is spent by an update (or, for the last use, a delete) conditioned on
//!   the resourceVersion read, retried on a conflict: two replicas cannot both spend the
//!   last use. Expired ones are deleted when met.
//! - Operator credentials (records, for `sinew credentials list`) and revocations are one
//!   ConfigMap, `sinew-operator-credentials`, updated with the same optimistic
//!   concurrency. Every replica watches it: a revocation made on one replica refuses
//!   the credential on all of them.
//!
//! All of it lives in the control plane's namespace, which its RBAC Role covers
//! ([`crate::rbac::lease_role`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, Preconditions,
};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use sinew_control::shared::{DocumentWrite, Pending, SharedState, StateError};
use sinew_control::store::{SpendError, StoredCredential, StoredToken};
use sinew_model::resource::ResourceKey;

use crate::crd::{GATEWAY_KINDS, Kind, SINEW_KINDS};

/// The label (and Secret type) of join-token Secrets; its value is the token's id.
pub const TOKEN_LABEL: &str = "sinew.dev/join-token";
/// The name prefix of join-token Secrets.
pub const TOKEN_PREFIX: &str = "sinew-join-token-";
/// The ConfigMap of operator credentials and revocations.
pub const CREDENTIALS_CONFIGMAP: &str = "sinew-operator-credentials";
/// How often a write conditioned on a resourceVersion is tried before giving up.
const ATTEMPTS: usize = 16;
/// How long the first listing of the credentials ConfigMap may take at start.
const LIST_TIMEOUT: Duration = Duration::from_secs(30);

/// The kind a document of `kind` is written as: Sinew's own, or the Gateway API's
/// HTTPRoute.
pub fn kind_of(kind: &str) -> Option<&'static Kind> {
    SINEW_KINDS
        .iter()
        .chain(GATEWAY_KINDS.iter())
        .find(|k| k.kind == kind && (k.group == crate::crd::SINEW_GROUP || kind == "HTTPRoute"))
}

/// Shared state in the API server (see the module docs).
pub struct KubeState {
    client: Client,
    namespace: String,
    /// The credentials ConfigMap, as watched.
    credentials: Store<ConfigMap>,
    /// Names revoked by this replica (seconds since the epoch), in force before the
    /// watch brings the ConfigMap back.
    revoked_here: Mutex<BTreeMap<String, i64>>,
    watch: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for KubeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeState")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl Drop for KubeState {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

fn err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> StateError {
    StateError(format!("{what}: {e}"))
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn secret_name(hash: &str) -> String {
    format!("{TOKEN_PREFIX}{}", hash.get(..12).unwrap_or(hash))
}

/// A join-token Secret's hash and binding; `None` for one that is not well formed.
fn token_of(s: &Secret) -> Option<(String, StoredToken)> {
    let data = s.data.as_ref()?;
    let hash = String::from_utf8(data.get("sha256")?.0.clone()).ok()?;
    let binding = serde_json::from_slice(&data.get("binding")?.0).ok()?;
    Some((hash, binding))
}

/// How often expired join tokens are deleted (they are also deleted when met).
const SWEEP: Duration = Duration::from_secs(300);

/// Deletes expired join-token Secrets every [`SWEEP`], while the state lives (every
/// replica does it; a Secret already gone is no error).
async fn sweep(state: std::sync::Weak<KubeState>) {
    loop {
        tokio::time::sleep(SWEEP).await;
        let Some(state) = state.upgrade() else {
            return;
        };
        if let Err(e) = state.tokens(unix_now()).await {
            tracing::warn!(error = %e, "cannot sweep expired join tokens");
        }
    }
}

impl KubeState {
    /// Shared state in `namespace` (the control plane's own), through `client`. Returns
    /// once the credentials ConfigMap has been read (until then no operator call could
    /// be checked for revocation).
    pub async fn start(client: Client, namespace: &str) -> Result<Arc<KubeState>, StateError> {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        let (credentials, writer) = reflector::store();
        let stream = watcher(
            api,
            watcher::Config::default().fields(&format!("metadata.name={CREDENTIALS_CONFIGMAP}")),
        )
        .default_backoff()
        .reflect(writer);
        let what = format!("configmap {namespace}/{CREDENTIALS_CONFIGMAP}");
        let watch = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut failing = false;
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(_) if failing => {
                        tracing::info!(%what, "watch re-established");
                        failing = false;
                    }
                    Ok(_) => {}
                    Err(e) if !failing => {
                        tracing::warn!(%what, error = %e, "watch lost; revocations are checked against the last state until it is back");
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
        });
        let state = Arc::new(KubeState {
            client,
            namespace: namespace.to_owned(),
            credentials,
            revoked_here: Mutex::new(BTreeMap::new()),
            watch,
        });
        tokio::spawn(sweep(Arc::downgrade(&state)));
        tokio::time::timeout(LIST_TIMEOUT, state.credentials.wait_until_ready())
            .await
            .map_err(|_| {
                StateError(format!(
                    "configmap {namespace}/{CREDENTIALS_CONFIGMAP}: not listed within {}s (is the namespace there, and may the control plane read ConfigMaps in it?)",
                    LIST_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| err("credentials watch", e))?;
        Ok(state)
    }

    /// The namespace it keeps its Secrets and ConfigMap in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn configmaps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn custom(&self, key: &ResourceKey) -> Result<(Api<DynamicObject>, &'static Kind), StateError> {
        let kind = kind_of(&key.kind).ok_or_else(|| {
            StateError(format!(
                "{key}: kind {} has no custom resource definition, so it cannot be stored in the Kubernetes API",
                key.kind
            ))
        })?;
        Ok((
            Api::namespaced_with(
                self.client.clone(),
                &key.namespace,
                &crate::source::api_resource(kind),
            ),
            kind,
        ))
    }

    async fn write(&self, docs: Vec<DocumentWrite>) -> Result<(), StateError> {
        let mut written: Vec<String> = Vec::new();
        for d in docs {
            let (api, kind) = self.custom(&d.key)?;
            let doc: Value = serde_json::from_str(&d.json).map_err(|e| err(&d.key, e))?;
            let mut metadata = json!({"name": d.key.name, "namespace": d.key.namespace});
            for field in ["labels", "annotations"] {
                if let Some(v) = doc.pointer(&format!("/metadata/{field}")) {
                    metadata[field] = v.clone();
                }
            }
            let obj = json!({
                "apiVersion": kind.api_version(),
                "kind": kind.kind,
                "metadata": metadata,
                "spec": doc.get("spec").cloned().unwrap_or_else(|| json!({})),
            });
            let obj: DynamicObject = serde_json::from_value(obj).map_err(|e| err(&d.key, e))?;
            let pp = PatchParams::apply(crate::FIELD_MANAGER).force();
            if let Err(e) = api.patch(&d.key.name, &pp, &Patch::Apply(&obj)).await {
                let why = if is_status(&e, 404) {
                    format!(
                        "the API server does not serve {}.{} in namespace {:?} (are Sinew's CRDs installed, and the namespace there?): {e}",
                        kind.plural, kind.group, d.key.namespace
                    )
                } else {
                    e.to_string()
                };
                let done = if written.is_empty() {
                    "nothing was written".to_owned()
                } else {
                    format!("written before it: {}", written.join(", "))
                };
                return Err(StateError(format!(
                    "{}: cannot write it to the Kubernetes API: {why} ({done})",
                    d.key
                )));
            }
            written.push(d.key.to_string());
        }
        Ok(())
    }

    async fn delete(&self, keys: Vec<ResourceKey>) -> Result<Vec<ResourceKey>, StateError> {
        let mut deleted = Vec::new();
        for k in keys {
            let Ok((api, _)) = self.custom(&k) else {
                continue;
            };
            match api.delete(&k.name, &DeleteParams::default()).await {
                Ok(_) => deleted.push(k),
                Err(e) if is_status(&e, 404) => {}
                Err(e) => {
                    return Err(err(
                        format!("{k}: cannot delete it from the Kubernetes API"),
                        e,
                    ));
                }
            }
        }
        Ok(deleted)
    }

    async fn put_token(&self, hash: String, token: StoredToken) -> Result<(), StateError> {
        let name = secret_name(&hash);
        let binding = serde_json::to_vec(&token).map_err(|e| err("token binding", e))?;
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {TOKEN_LABEL: token.id, "app.kubernetes.io/part-of": "sinew"},
            },
            "type": TOKEN_LABEL,
        }))
        .map_err(|e| err(&name, e))?;
        let secret = Secret {
            data: Some(BTreeMap::from([
                ("sha256".to_owned(), ByteString(hash.into_bytes())),
                ("binding".to_owned(), ByteString(binding)),
            ])),
            ..secret
        };
        self.secrets()
            .create(&PostParams::default(), &secret)
            .await
            .map(|_| ())
            .map_err(|e| err(format!("secret {}/{name}", self.namespace), e))
    }

    async fn spend_token(
        &self,
        hash: String,
        namespace: String,
        now_unix: i64,
    ) -> Result<StoredToken, SpendError> {
        let name = secret_name(&hash);
        let api = self.secrets();
        let store =
            |e: kube::Error| SpendError::Store(format!("secret {}/{name}: {e}", self.namespace));
        for _ in 0..ATTEMPTS {
            let Some(secret) = api.get_opt(&name).await.map_err(store)? else {
                return Err(SpendError::Unknown);
            };
            let Some((stored_hash, stored)) = token_of(&secret) else {
                return Err(SpendError::Unknown);
            };
            if stored_hash != hash {
                return Err(SpendError::Unknown);
            }
            let precondition = DeleteParams::default().preconditions(Preconditions {
                resource_version: secret.metadata.resource_version.clone(),
                uid: secret.metadata.uid.clone(),
            });
            if stored.expires_unix < now_unix {
                let _ = api.delete(&name, &precondition).await;
                return Err(SpendError::Expired);
            }
            if stored.namespace != namespace {
                return Err(SpendError::Namespace(stored.namespace));
            }
            let spent = match stored.uses_left {
                // The last use: the Secret goes, if nobody changed it since it was read.
                Some(n) if n <= 1 => api.delete(&name, &precondition).await.map(|_| ()),
                Some(n) => {
                    let mut next = stored.clone();
                    next.uses_left = Some(n - 1);
                    let binding = serde_json::to_vec(&next)
                        .map_err(|e| SpendError::Store(format!("token binding: {e}")))?;
                    let mut secret = secret.clone();
                    // Replaced with the resourceVersion read: refused if it changed.
                    secret
                        .data
                        .get_or_insert_with(BTreeMap::new)
                        .insert("binding".to_owned(), ByteString(binding));
                    api.replace(&name, &PostParams::default(), &secret)
                        .await
                        .map(|_| ())
                }
                None => Ok(()),
            };
            match spent {
                Ok(()) => return Ok(stored),
                // Another replica spent a use meanwhile: read it again.
                Err(e) if is_status(&e, 409) => continue,
                Err(e) if is_status(&e, 404) => return Err(SpendError::Unknown),
                Err(e) => return Err(store(e)),
            }
        }
        Err(SpendError::Store(format!(
            "secret {}/{name}: still changing after {ATTEMPTS} attempts",
            self.namespace
        )))
    }

    async fn tokens(&self, now_unix: i64) -> Result<Vec<(String, StoredToken)>, StateError> {
        let api = self.secrets();
        let list = api
            .list(&ListParams::default().labels(TOKEN_LABEL))
            .await
            .map_err(|e| err(format!("join-token secrets in {}", self.namespace), e))?;
        let mut out = Vec::new();
        for s in list {
            let Some((hash, t)) = token_of(&s) else {
                continue;
            };
            if t.expires_unix < now_unix {
                let name = s.name_any();
                if let Err(e) = api.delete(&name, &DeleteParams::default()).await
                    && !is_status(&e, 404)
                {
                    tracing::warn!(secret = %name, error = %e, "cannot delete an expired join token");
                }
            } else {
                out.push((hash, t));
            }
        }
        Ok(out)
    }

    async fn revoke_token(&self, id: String, now_unix: i64) -> Result<usize, StateError> {
        let api = self.secrets();
        let mut n = 0;
        for (hash, t) in self.tokens(now_unix).await? {
            if !id.is_empty() && (t.id == id || hash == id) {
                match api
                    .delete(&secret_name(&hash), &DeleteParams::default())
                    .await
                {
                    Ok(_) => n += 1,
                    Err(e) if is_status(&e, 404) => {}
                    Err(e) => return Err(err(secret_name(&hash), e)),
                }
            }
        }
        Ok(n)
    }

    /// Changes the credentials ConfigMap's data with `f` (creating the ConfigMap if
    /// absent), conditioned on the resourceVersion read, retried on a conflict.
    async fn update_credentials<T>(
        &self,
        f: impl Fn(&mut BTreeMap<String, String>) -> T,
    ) -> Result<T, StateError> {
        let api = self.configmaps();
        let what = format!("configmap {}/{CREDENTIALS_CONFIGMAP}", self.namespace);
        for _ in 0..ATTEMPTS {
            let current = api
                .get_opt(CREDENTIALS_CONFIGMAP)
                .await
                .map_err(|e| err(&what, e))?;
            let written = match current {
                Some(mut cm) => {
                    let out = f(cm.data.get_or_insert_with(BTreeMap::new));
                    api.replace(CREDENTIALS_CONFIGMAP, &PostParams::default(), &cm)
                        .await
                        .map(|cm| (out, cm))
                }
                None => {
                    let mut data = BTreeMap::new();
                    let out = f(&mut data);
                    let cm: ConfigMap = serde_json::from_value(json!({
                        "metadata": {
                            "name": CREDENTIALS_CONFIGMAP,
                            "namespace": self.namespace,
                            "labels": {"app.kubernetes.io/part-of": "sinew"},
                        },
                        "data": data,
                    }))
                    .map_err(|e| err(&what, e))?;
                    api.create(&PostParams::default(), &cm)
                        .await
                        .map(|cm| (out, cm))
                }
            };
            match written {
                Ok((out, _)) => return Ok(out),
                // Changed (or created) by another replica meanwhile: read it again.
                Err(e) if is_status(&e, 409) => continue,
                Err(e) => return Err(err(&what, e)),
            }
        }
        Err(StateError(format!(
            "{what}: still changing after {ATTEMPTS} attempts"
        )))
    }

    async fn put_credential(&self, fp: String, c: StoredCredential) -> Result<(), StateError> {
        let json = serde_json::to_string(&c).map_err(|e| err(&c.name, e))?;
        let now = unix_now();
        self.update_credentials(|data| {
            // Records of expired credentials are dropped (the ConfigMap stays small:
            // every replica started on a fresh disk records a new admin credential);
            // revocations by name are kept.
            data.retain(|k, v| {
                !k.starts_with("credential.")
                    || serde_json::from_str::<StoredCredential>(v)
                        .map_or(true, |c| c.expires_unix >= now)
            });
            data.insert(format!("credential.{fp}"), json.clone());
        })
        .await
    }

    async fn credentials(&self) -> Result<Vec<(String, StoredCredential)>, StateError> {
        let cm = self
            .configmaps()
            .get_opt(CREDENTIALS_CONFIGMAP)
            .await
            .map_err(|e| {
                err(
                    format!("configmap {}/{CREDENTIALS_CONFIGMAP}", self.namespace),
                    e,
                )
            })?;
        Ok(cm
            .and_then(|cm| cm.data)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| {
                let fp = k.strip_prefix("credential.")?;
                Some((fp.to_owned(), serde_json::from_str(&v).ok()?))
            })
            .collect())
    }

    async fn revoke_credentials(&self, name: String) -> Result<usize, StateError> {
        let now = unix_now();
        let n = self
            .update_credentials(|data| {
                data.insert(format!("revoked.{name}"), now.to_string());
                let mut n = 0;
                for (k, v) in data.iter_mut() {
                    if !k.starts_with("credential.") {
                        continue;
                    }
                    if let Ok(mut c) = serde_json::from_str::<StoredCredential>(v)
                        && c.name == name
                        && !c.revoked
                    {
                        c.revoked = true;
                        if let Ok(json) = serde_json::to_string(&c) {
                            *v = json;
                            n += 1;
                        }
                    }
                }
                n
            })
            .await?;
        self.revoked_here
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, now);
        Ok(n)
    }
}

impl SharedState for KubeState {
    fn owns_documents(&self) -> bool {
        true
    }

    fn write_documents(&self, docs: Vec<DocumentWrite>) -> Pending<'_, Result<(), StateError>> {
        Box::pin(self.write(docs))
    }

    fn delete_documents(
        &self,
        keys: Vec<ResourceKey>,
    ) -> Pending<'_, Result<Vec<ResourceKey>, StateError>> {
        Box::pin(self.delete(keys))
    }

    fn put_token(&self, hash: String, token: StoredToken) -> Pending<'_, Result<(), StateError>> {
        Box::pin(KubeState::put_token(self, hash, token))
    }

    fn spend_token(
        &self,
        hash: String,
        namespace: String,
        now_unix: i64,
    ) -> Pending<'_, Result<StoredToken, SpendError>> {
        Box::pin(KubeState::spend_token(self, hash, namespace, now_unix))
    }

    fn tokens(&self, now_unix: i64) -> Pending<'_, Result<Vec<(String, StoredToken)>, StateError>> {
        Box::pin(KubeState::tokens(self, now_unix))
    }

    fn revoke_token(&self, id: String, now_unix: i64) -> Pending<'_, Result<usize, StateError>> {
        Box::pin(KubeState::revoke_token(self, id, now_unix))
    }

    fn put_credential(
        &self,
        fingerprint: String,
        credential: StoredCredential,
    ) -> Pending<'_, Result<(), StateError>> {
        Box::pin(KubeState::put_credential(self, fingerprint, credential))
    }

    fn credentials(&self) -> Pending<'_, Result<Vec<(String, StoredCredential)>, StateError>> {
        Box::pin(KubeState::credentials(self))
    }

    fn credential_revoked(&self, fingerprint: &str, name: &str, not_before_unix: i64) -> bool {
        let here = self
            .revoked_here
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied();
        if here.is_some_and(|at| sinew_control::shared::revoked_since(not_before_unix, at)) {
            return true;
        }
        let key = ObjectRef::new(CREDENTIALS_CONFIGMAP).within(&self.namespace);
        let Some(cm) = self.credentials.get(&key) else {
            // Listed at start and absent: nothing was ever revoked.
            return false;
        };
        let Some(data) = cm.data.as_ref() else {
            return false;
        };
        if data
            .get(&format!("credential.{fingerprint}"))
            .and_then(|v| serde_json::from_str::<StoredCredential>(v).ok())
            .is_some_and(|c| c.revoked)
        {
            return true;
        }
        match data.get(&format!("revoked.{name}")) {
            None => false,
            Some(at) => match at.parse::<i64>() {
                Ok(at) => sinew_control::shared::revoked_since(not_before_unix, at),
                // Unreadable: refuse rather than let a revoked credential through.
                Err(_) => true,
            },
        }
    }

    fn revoke_credentials(&self, name: String) -> Pending<'_, Result<usize, StateError>> {
        Box::pin(KubeState::revoke_credentials(self, name))
    }
}
