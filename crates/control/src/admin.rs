//! The operator API (`sinew apply/get/delete/proxy-status/check`, and
//! `stat/top/tap/edges` over the [`crate::telemetry`]).

use std::sync::Arc;

use sinew_api::v1::admin_server::Admin;
use sinew_api::v1::{self as api};
use sinew_model::resource::ResourceKey;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::{Request, Response, Status};

use crate::auth::{Operator, Role};
use crate::index::{Command, MeshState};
use crate::shared::SharedState;
use crate::store::Store;

/// The `Admin` gRPC service.
#[derive(Debug, Clone)]
pub struct AdminService {
    index: mpsc::Sender<Command>,
    state: watch::Receiver<Arc<MeshState>>,
    store: Store,
    /// Applied documents, tokens and credentials (default: `store`).
    shared: Arc<dyn SharedState>,
    identity: Arc<crate::identity::Identity>,
    telemetry: Arc<crate::telemetry::Telemetry>,
}

impl AdminService {
    /// A service over the index and store.
    pub fn new(
        index: mpsc::Sender<Command>,
        state: watch::Receiver<Arc<MeshState>>,
        store: Store,
        identity: Arc<crate::identity::Identity>,
    ) -> Self {
        AdminService {
            index,
            state,
            shared: Arc::new(store.clone()),
            store,
            identity,
            telemetry: Arc::new(crate::telemetry::Telemetry::default()),
        }
    }

    /// Answers `Stat`, `Top`, `Tap` and `Edges` from `telemetry` (the one the
    /// proxies' streams feed); without it they see no proxies.
    pub fn with_telemetry(mut self, telemetry: Arc<crate::telemetry::Telemetry>) -> Self {
        self.telemetry = telemetry;
        self
    }

    /// Keeps applied documents, join tokens and operator credentials in `shared`
    /// (state replicas share) rather than in the local store.
    pub fn with_shared(mut self, shared: Arc<dyn SharedState>) -> Self {
        self.shared = shared;
        self
    }

    /// The operator making `req`, if its credential allows `what` (see
    /// [`crate::auth::operator`]).
    fn authorize<T>(&self, req: &Request<T>, need: Role, what: &str) -> Result<Operator, Status> {
        let op =
            crate::auth::operator(req, &*self.shared, self.identity.trust_domain(), need, what);
        if let Err(e) = &op {
            tracing::info!(call = what, reason = e.message(), "operator call refused");
        }
        op
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.index
            .send(make(tx))
            .await
            .map_err(|_| Status::unavailable("control plane is shutting down"))?;
        rx.await
            .map_err(|_| Status::internal("the index did not answer"))
    }
}

fn key_msg(k: &ResourceKey) -> api::ResourceKey {
    api::ResourceKey {
        kind: k.kind.clone(),
        namespace: k.namespace.clone(),
        name: k.name.clone(),
    }
}

/// Accepts the usual spellings of a kind (`svc`, `services`, `httproute`...).
pub fn canonical_kind(k: &str) -> Option<&'static str> {
    Some(match k.to_ascii_lowercase().as_str() {
        "" => "",
        "service" | "services" | "svc" => "Service",
        "workload" | "workloads" | "wl" => "Workload",
        "httproute" | "httproutes" | "route" | "routes" => "HTTPRoute",
        "proxy" | "proxies" => "Proxy",
        "meshconfig" | "meshconfigs" => "MeshConfig",
        "authorizationpolicy" | "authorizationpolicies" | "authz" => "AuthorizationPolicy",
        "requestauthentication" | "requestauthentications" | "jwt" => "RequestAuthentication",
        "trafficpolicy" | "trafficpolicies" | "tp" => "TrafficPolicy",
        "routepolicy" | "routepolicies" | "rp" => "RoutePolicy",
        _ => return None,
    })
}

type TapStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<api::TapResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Admin for AdminService {
    type TapStream = TapStream;

    async fn stat(
        &self,
        req: Request<api::StatRequest>,
    ) -> Result<Response<api::StatResponse>, Status> {
        let _caller = self.authorize(&req, Role::Viewer, "stat")?;
        self.telemetry
            .stat(req.get_ref(), std::time::Instant::now())
            .map(Response::new)
            .map_err(Status::invalid_argument)
    }

    async fn top(
        &self,
        req: Request<api::TopRequest>,
    ) -> Result<Response<api::TopResponse>, Status> {
        let _caller = self.authorize(&req, Role::Viewer, "top")?;
        Ok(Response::new(
            self.telemetry.top(req.get_ref(), std::time::Instant::now()),
        ))
    }

    async fn edges(
        &self,
        req: Request<api::EdgesRequest>,
    ) -> Result<Response<api::EdgesResponse>, Status> {
        let _caller = self.authorize(&req, Role::Viewer, "edges")?;
        Ok(Response::new(
            self.telemetry
                .edges(req.get_ref(), std::time::Instant::now()),
        ))
    }

    async fn tap(&self, req: Request<api::TapRequest>) -> Result<Response<TapStream>, Status> {
        let _caller = self.authorize(&req, Role::Operator, "tap")?;
        let filter = req.into_inner().filter.unwrap_or_default();
        let rx = self
            .telemetry
            .tap(filter)
            .map_err(Status::invalid_argument)?;
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
    async fn apply(
        &self,
        req: Request<api::ApplyRequest>,
    ) -> Result<Response<api::ApplyResponse>, Status> {
        let _caller = self.authorize(&req, Role::Operator, "apply")?;
        let req = req.into_inner();
        let sources = req.sources.into_iter().map(|s| (s.label, s.text)).collect();
        let out = if self.shared.owns_documents() {
            // Written where every replica reads them; back through a source.
            crate::shared::apply(
                &self.index,
                self.state.clone(),
                &*self.shared,
                sources,
                req.dry_run,
            )
            .await?
        } else {
            self.ask(|reply| Command::Apply {
                sources,
                dry_run: req.dry_run,
                reply,
            })
            .await?
            .map_err(|e| Status::invalid_argument(e.to_string()))?
        };
        Ok(Response::new(api::ApplyResponse {
            revision: out.revision,
            results: out
                .results
                .iter()
                .map(|(k, a)| api::ApplyResult {
                    key: Some(key_msg(k)),
                    action: (*a).to_owned(),
                })
                .collect(),
        }))
    }

    async fn get(
        &self,
        req: Request<api::GetRequest>,
    ) -> Result<Response<api::GetResponse>, Status> {
        let _caller = self.authorize(&req, Role::Viewer, "get")?;
        let req = req.into_inner();
        let kind = canonical_kind(&req.kind)
            .ok_or_else(|| Status::invalid_argument(format!("unknown kind {:?}", req.kind)))?;
        let state = self.ask(|reply| Command::Current { reply }).await?;
        let resources = state
            .docs
            .iter()
            .filter(|(k, _)| {
                (kind.is_empty() || k.kind == kind)
                    && (req.namespace.is_empty() || k.namespace == req.namespace)
                    && (req.name.is_empty() || k.name == req.name)
            })
            .map(|(k, e)| api::StoredResource {
                resource: Some(api::Resource {
                    key: Some(key_msg(k)),
                    json: e.json.to_string(),
                }),
                source: e.source.clone(),
                revision: e.revision,
            })
            .collect();
        Ok(Response::new(api::GetResponse { resources }))
    }

    async fn delete(
        &self,
        req: Request<api::DeleteRequest>,
    ) -> Result<Response<api::DeleteResponse>, Status> {
        let _caller = self.authorize(&req, Role::Operator, "delete")?;
        let mut keys = Vec::new();
        for k in req.into_inner().keys {
            let kind = canonical_kind(&k.kind)
                .filter(|k| !k.is_empty())
                .ok_or_else(|| Status::invalid_argument(format!("unknown kind {:?}", k.kind)))?;
            keys.push(ResourceKey {
                kind: kind.to_owned(),
                namespace: if k.namespace.is_empty() {
                    "default".into()
                } else {
                    k.namespace
                },
                name: k.name,
            });
        }
        let (revision, deleted) = if self.shared.owns_documents() {
            crate::shared::delete(&self.index, self.state.clone(), &*self.shared, keys).await?
        } else {
            self.ask(|reply| Command::Delete {
                keys,
                dry_run: false,
                reply,
            })
            .await?
            .map_err(|e| Status::failed_precondition(e.to_string()))?
        };
        Ok(Response::new(api::DeleteResponse {
            revision,
            deleted: deleted.iter().map(key_msg).collect(),
        }))
    }

    async fn proxy_status(
        &self,
        req: Request<api::ProxyStatusRequest>,
    ) -> Result<Response<api::ProxyStatusResponse>, Status> {
        let _caller = self.authorize(&req, Role::Viewer, "proxy-status")?;
        let records = self.ask(|reply| Command::Status { reply }).await?;
        let revision = self.state.borrow().revision;
        let proxies = records
            .into_iter()
            .map(|(name, r)| {
                let (namespace, name) = name
                    .split_once('/')
                    .map_or(("default".to_owned(), name.clone()), |(a, b)| {
                        (a.to_owned(), b.to_owned())
                    });
                api::ProxyStatus {
                    namespace,
                    name,
                    workload: r.workload,
                    connected: r.stream.is_some(),
                    applied_version: r.applied,
                    latest_version: r.latest,
                    last_nack: r.last_nack,
                    ack_latency_ms: r.ack_latency.map_or(0, |d| d.as_millis() as u64),
                    peer: r.peer,
                }
            })
            .collect();
        Ok(Response::new(api::ProxyStatusResponse {
            revision,
            proxies,
        }))
    }

    async fn health(
        &self,
        req: Request<api::HealthRequest>,
    ) -> Result<Response<api::HealthResponse>, Status> {
        let _caller = self.authorize(&req, Role::Viewer, "health")?;
        let store = self.store.clone();
        let check = tokio::task::spawn_blocking(move || store.check())
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let dir_error = self.ask(|reply| Command::DirError { reply }).await?;
        let records = self.ask(|reply| Command::Status { reply }).await?;
        let signer = self.identity.signer();
        let with_certs: Vec<_> = records
            .values()
            .filter(|r| r.stream.is_some() && !r.signer.is_empty())
            .collect();
        let on_signer = with_certs.iter().filter(|r| r.signer == signer).count() as u32;
        let (store_ok, store_error) = match check {
            Ok(_) => (true, String::new()),
            Err(e) => (false, e.to_string()),
        };
        Ok(Response::new(api::HealthResponse {
            revision: self.state.borrow().revision,
            store_ok,
            store_error,
            proxies: records.values().filter(|r| r.stream.is_some()).count() as u32,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            config_dir_error: dir_error.unwrap_or_default(),
            trust_domain: self.identity.trust_domain().to_owned(),
            certificates_issued: self.identity.issued(),
            rotation_phase: self.identity.phase().as_str().to_owned(),
            proxies_on_signing_root: on_signer,
            proxies_with_certificates: with_certs.len() as u32,
        }))
    }

    async fn rotate_ca(
        &self,
        req: Request<api::RotateCaRequest>,
    ) -> Result<Response<api::RotateCaResponse>, Status> {
        let _caller = self.authorize(&req, Role::Admin, "ca rotate")?;
        let req = req.into_inner();
        let identity = self.identity.clone();
        let message = match req.phase.as_str() {
            "start" => {
                let files = (!req.ca_cert_path.is_empty()).then(|| {
                    (std::path::PathBuf::from(&req.ca_cert_path), std::path::PathBuf::from(&req.ca_key_path))
                });
                tokio::task::spawn_blocking(move || identity.rotate_start(files))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?
            }
            "reissue" => self.identity.rotate_reissue().await,
            "finish" => {
                if !req.force {
                    let records = self.ask(|reply| Command::Status { reply }).await?;
                    let signer = self.identity.signer();
                    let behind: Vec<String> = records
                        .iter()
                        .filter(|(_, r)| r.stream.is_some() && !r.signer.is_empty() && r.signer != signer)
                        .map(|(n, _)| n.clone())
                        .collect();
                    if !behind.is_empty() {
                        return Err(Status::failed_precondition(format!(
                            "{} proxies still have certificates from the old root: {}; wait, run `sinew ca rotate reissue` again, or --force",
                            behind.len(),
                            behind.join(", ")
                        )));
                    }
                }
                self.identity.rotate_finish().await
            }
            other => return Err(Status::invalid_argument(format!("unknown phase {other:?}: use start, reissue or finish"))),
        }
        .map_err(Status::failed_precondition)?;
        Ok(Response::new(api::RotateCaResponse {
            phase: self.identity.phase().as_str().to_owned(),
            message,
        }))
    }

    async fn create_join_token(
        &self,
        req: Request<api::CreateJoinTokenRequest>,
    ) -> Result<Response<api::JoinToken>, Status> {
        let caller = self.authorize(&req, Role::Admin, "token create")?;
        let req = req.into_inner();
        let ns = if req.namespace.is_empty() {
            "default".to_owned()
        } else {
            req.namespace
        };
        let identity = self.identity.clone();
        let ttl = std::time::Duration::from_secs(req.ttl_seconds);
        let by = caller.name.clone();
        let (token, stored, id) = identity
            .create_token(&ns, &req.service_account, ttl, req.uses, &by)
            .await
            .map_err(Status::invalid_argument)?;
        // The token itself is never logged: only its id.
        tracing::info!(id = %stored.id, %id, uses = ?stored.uses_left, by = %caller.name, "join token created");
        Ok(Response::new(api::JoinToken {
            token,
            spiffe_id: id.to_string(),
            expires_unix: stored.expires_unix,
            id: stored.id,
            uses: stored.uses_left.unwrap_or(0),
        }))
    }

    async fn list_join_tokens(
        &self,
        req: Request<api::ListJoinTokensRequest>,
    ) -> Result<Response<api::ListJoinTokensResponse>, Status> {
        self.authorize(&req, Role::Admin, "token list")?;
        let tokens = self
            .shared
            .tokens(unix_now())
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let td = self.identity.trust_domain().to_owned();
        let mut tokens: Vec<api::JoinTokenInfo> = tokens
            .into_iter()
            .map(|(hash, t)| api::JoinTokenInfo {
                id: if t.id.is_empty() {
                    hash.get(..12).unwrap_or(&hash).to_owned()
                } else {
                    t.id
                },
                spiffe_id: sinew_tls::SpiffeId::workload(&td, &t.namespace, &t.service_account)
                    .to_string(),
                expires_unix: t.expires_unix,
                uses_left: t.uses_left.unwrap_or(0),
                created_unix: t.created_unix,
                created_by: t.created_by,
            })
            .collect();
        tokens.sort_by(|a, b| a.created_unix.cmp(&b.created_unix).then(a.id.cmp(&b.id)));
        Ok(Response::new(api::ListJoinTokensResponse { tokens }))
    }

    async fn revoke_join_token(
        &self,
        req: Request<api::RevokeJoinTokenRequest>,
    ) -> Result<Response<api::RevokeJoinTokenResponse>, Status> {
        let caller = self.authorize(&req, Role::Admin, "token revoke")?;
        let id = req.into_inner().id;
        let n = self
            .shared
            .revoke_token(id.clone(), unix_now())
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if n == 0 {
            return Err(Status::not_found(format!(
                "no join token {id:?} (see `sinew token list`)"
            )));
        }
        tracing::info!(%id, by = %caller.name, "join token revoked");
        Ok(Response::new(api::RevokeJoinTokenResponse {}))
    }

    async fn create_credential(
        &self,
        req: Request<api::CreateCredentialRequest>,
    ) -> Result<Response<api::Credential>, Status> {
        let caller = self.authorize(&req, Role::Admin, "credentials create")?;
        let req = req.into_inner();
        let role = Role::parse(&req.role).ok_or_else(|| {
            Status::invalid_argument(format!(
                "role {:?}: expected viewer, operator or admin",
                req.role
            ))
        })?;
        let identity = self.identity.clone();
        let ttl = std::time::Duration::from_secs(req.ttl_seconds);
        let name = req.name.clone();
        let (certificate_pem, expires_unix) = identity
            .issue_credential(&name, role, &req.csr_der, ttl)
            .await
            .map_err(Status::invalid_argument)?;
        tracing::info!(name = %req.name, role = role.as_str(), by = %caller.name, "credential issued");
        Ok(Response::new(api::Credential {
            name: req.name,
            role: role.as_str().to_owned(),
            certificate_pem,
            roots_pem: self.identity.roots_pem(),
            expires_unix,
            trust_domain: self.identity.trust_domain().to_owned(),
        }))
    }

    async fn list_credentials(
        &self,
        req: Request<api::ListCredentialsRequest>,
    ) -> Result<Response<api::ListCredentialsResponse>, Status> {
        self.authorize(&req, Role::Admin, "credentials list")?;
        let mut credentials: Vec<api::CredentialInfo> = self
            .shared
            .credentials()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .into_iter()
            .map(|(fingerprint, c)| api::CredentialInfo {
                name: c.name,
                role: c.role,
                expires_unix: c.expires_unix,
                revoked: c.revoked,
                fingerprint,
                created_unix: c.created_unix,
            })
            .collect();
        credentials.sort_by(|a, b| {
            a.created_unix
                .cmp(&b.created_unix)
                .then(a.name.cmp(&b.name))
        });
        Ok(Response::new(api::ListCredentialsResponse { credentials }))
    }

    async fn revoke_credential(
        &self,
        req: Request<api::RevokeCredentialRequest>,
    ) -> Result<Response<api::RevokeCredentialResponse>, Status> {
        let caller = self.authorize(&req, Role::Admin, "credentials revoke")?;
        let name = req.into_inner().name;
        let n = self
            .shared
            .revoke_credentials(name.clone())
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        // The name is revoked as of now even with no record of it here (a
        // credential issued by another replica sharing the CA).
        tracing::warn!(%name, recorded = n, by = %caller.name, "credential revoked");
        Ok(Response::new(api::RevokeCredentialResponse {
            revoked: u32::try_from(n).unwrap_or(u32::MAX),
        }))
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
