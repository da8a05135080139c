//! The control plane's identity service: join tokens and certificate issuance.
//!
//! A proxy proves who it is with a join token (issued by `sinew token create` for a
//! namespace and service account, stored only as its SHA-256) and sends a CSR; it gets
//! a short-lived certificate for the token's SPIFFE id, never for anything the CSR or
//! the proxy claims. The token's namespace must be the proxy's own.
//!
//! On Kubernetes a proxy may instead present its projected service-account token: a
//! [`TokenReviewer`] (set by `sinew control --kubernetes`, which checks tokens with the
//! API server's TokenReview API) turns it into the namespace and service account the
//! certificate is issued for. Join tokens keep working beside it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::SecureRandom;
use sinew_tls::{Ca, SpiffeId};

use crate::shared::SharedState;
use crate::store::StoredToken;

/// Default certificate lifetime.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default join-token lifetime: a bootstrap credential is for starting a proxy now.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// The longest a join token may live.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// The most bootstraps one join token may allow.
pub const MAX_TOKEN_USES: u32 = 10_000;
/// Default lifetime of an operator credential.
pub const DEFAULT_CREDENTIAL_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// The longest an operator credential may live.
pub const MAX_CREDENTIAL_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

/// Trust-anchor rotation phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// One root, signing.
    Idle,
    /// A new root is trusted beside the old one; the old one still signs.
    Started,
    /// The new root signs; the old one is still trusted until every proxy renewed.
    Reissuing,
}

impl Phase {
    /// As the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Started => "started",
            Phase::Reissuing => "reissuing",
        }
    }
}

struct CaState {
    signing: Arc<Ca>,
    next: Option<Arc<Ca>>,
    previous_roots: Option<String>,
    /// During a rotation: the new CA's certificate issued by the old root (PEM), so
    /// that a client still holding only the old root verifies the control plane
    /// once the new root signs.
    cross: Option<String>,
}

impl CaState {
    fn phase(&self) -> Phase {
        if self.next.is_some() {
            Phase::Started
        } else if self.previous_roots.is_some() {
            Phase::Reissuing
        } else {
            Phase::Idle
        }
    }

    fn roots_pem(&self) -> String {
        let mut roots = self.signing.roots_pem();
        if let Some(n) = &self.next {
            roots.push_str(&n.roots_pem());
        }
        if let Some(p) = &self.previous_roots {
            roots.push_str(p);
        }
        roots
    }
}

/// What proxies must trust, and whether they must renew now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleState {
    /// Every root to trust, PEM.
    pub roots_pem: String,
    /// Bumped when every proxy must renew (a rotation re-issues).
    pub renew_epoch: u64,
}

/// The future a [`TokenReviewer`] returns.
pub type ReviewFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<TokenSubject, String>> + Send>>;

/// Who a bootstrap token that is not a join token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSubject {
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// The Pod the token is bound to, if it is (a projected token names its Pod):
    /// the proxy must then be named after it.
    pub pod: Option<String>,
}

/// Checks bootstrap tokens that are not Sinew join tokens (e.g. Kubernetes
/// service-account tokens, with the TokenReview API).
pub trait TokenReviewer: Send + Sync {
    /// Who `token` belongs to, or why it is refused.
    fn review(&self, token: String) -> ReviewFuture;
}

/// Prefix of Sinew join tokens.
const JOIN_TOKEN_PREFIX: &str = "sinew.";

/// Certificates and tokens.
pub struct Identity {
    reviewer: std::sync::OnceLock<Arc<dyn TokenReviewer>>,
    state: std::sync::RwLock<CaState>,
    /// Where rotation state lives (`None` for an operator's CA given by files).
    dir: Option<std::path::PathBuf>,
    trust_domain: String,
    cert_ttl: Duration,
    /// Tokens and credentials: the local store, or state shared by replicas.
    shared: Arc<dyn SharedState>,
    issued: AtomicU64,
    bundle: tokio::sync::watch::Sender<BundleState>,
    /// Where the admin credential lives and the server it names, once written.
    admin_file: std::sync::Mutex<Option<(std::path::PathBuf, String)>>,
    /// Why a rotation through the API is refused, when it is (the CA is shared with
    /// other replicas that this one cannot rotate).
    rotation_refused: std::sync::OnceLock<String>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn sha256_hex(token: &str) -> String {
    sinew_tls::api::sha256_hex(token.as_bytes())
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A short fingerprint of a CA's signing certificate.
fn fingerprint(ca: &Ca) -> String {
    sha256_hex(&ca.cert_pem())[..16].to_owned()
}

fn write_private(path: &std::path::Path, data: &str) -> Result<(), String> {
    sinew_tls::private_file::write(path, data.as_bytes()).map_err(|e| e.to_string())
}

impl Identity {
    /// Identity service over the CA in `dir` (generated there on first start), with
    /// any rotation in progress picked up from its files.
    pub fn from_dir(
        dir: &std::path::Path,
        trust_domain: String,
        cert_ttl: Duration,
        shared: Arc<dyn SharedState>,
    ) -> Result<Identity, sinew_tls::TlsError> {
        let signing = Ca::load_or_generate(dir, &trust_domain)?;
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
        let next = match (read("next.pem"), read("next-key.pem")) {
            (Some(c), Some(k)) => Some(Arc::new(Ca::from_pem(&c, &k)?)),
            _ => None,
        };
        let previous_roots = read("previous-roots.pem");
        let cross = read("cross.pem");
        Ok(Self::build(
            CaState {
                signing: Arc::new(signing),
                next,
                previous_roots,
                cross,
            },
            Some(dir.to_path_buf()),
            trust_domain,
            cert_ttl,
            shared,
        ))
    }

    /// Identity service over an operator's CA (no rotation through the API).
    pub fn new(
        ca: Ca,
        trust_domain: String,
        cert_ttl: Duration,
        shared: Arc<dyn SharedState>,
    ) -> Identity {
        Self::build(
            CaState {
                signing: Arc::new(ca),
                next: None,
                previous_roots: None,
                cross: None,
            },
            None,
            trust_domain,
            cert_ttl,
            shared,
        )
    }

    fn build(
        state: CaState,
        dir: Option<std::path::PathBuf>,
        trust_domain: String,
        cert_ttl: Duration,
        shared: Arc<dyn SharedState>,
    ) -> Identity {
        let (bundle, _) = tokio::sync::watch::channel(BundleState {
            roots_pem: state.roots_pem(),
            renew_epoch: 0,
        });
        Identity {
            state: std::sync::RwLock::new(state),
            dir,
            trust_domain,
            cert_ttl,
            shared,
            issued: AtomicU64::new(0),
            reviewer: std::sync::OnceLock::new(),
            bundle,
            admin_file: std::sync::Mutex::new(None),
            rotation_refused: std::sync::OnceLock::new(),
        }
    }

    /// Refuses rotations through the API from now on, saying `why`: the CA is shared
    /// (a Kubernetes Secret every replica reads), and rotating one replica's copy would
    /// leave the others signing with the old root.
    pub fn refuse_rotation(&self, why: impl Into<String>) {
        let _ = self.rotation_refused.set(why.into());
    }

    /// The CA that signs now.
    fn signing(&self) -> Arc<Ca> {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .signing
            .clone()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Roots to trust, PEM.
    pub fn roots_pem(&self) -> String {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .roots_pem()
    }

    /// Bundle changes, for proxy streams.
    pub fn bundle(&self) -> tokio::sync::watch::Receiver<BundleState> {
        self.bundle.subscribe()
    }

    /// The rotation phase.
    pub fn phase(&self) -> Phase {
        self.state.read().unwrap_or_else(|e| e.into_inner()).phase()
    }

    /// Fingerprint of the signing CA (certificates issued now carry it).
    pub fn signer(&self) -> String {
        fingerprint(&self.state.read().unwrap_or_else(|e| e.into_inner()).signing)
    }

    /// Certificates issued since start.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    fn publish(&self, renew: bool) {
        let roots_pem = self.roots_pem();
        self.bundle.send_modify(|b| {
            b.roots_pem = roots_pem;
            if renew {
                b.renew_epoch += 1;
            }
        });
    }

    /// Rotation step 1: trust a new root (generated, or an operator's from files on
    /// this host) beside the old one. Proxies get the two-root bundle at once.
    pub fn rotate_start(
        &self,
        files: Option<(std::path::PathBuf, std::path::PathBuf)>,
    ) -> Result<String, String> {
        if let Some(why) = self.rotation_refused.get() {
            return Err(why.clone());
        }
        let dir = self
            .dir
            .as_ref()
            .ok_or("the CA was given with --ca-cert: restart with the new CA files instead")?;
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        if st.phase() != Phase::Idle {
            return Err(format!("a rotation is already {}", st.phase().as_str()));
        }
        let (ca, key_pem) = match files {
            Some((c, k)) => {
                let cert =
                    std::fs::read_to_string(&c).map_err(|e| format!("{}: {e}", c.display()))?;
                let key =
                    std::fs::read_to_string(&k).map_err(|e| format!("{}: {e}", k.display()))?;
                (Ca::from_pem(&cert, &key).map_err(|e| e.to_string())?, key)
            }
            None => {
                let ca = Ca::generate(
                    &self.trust_domain,
                    Duration::from_secs(10 * 365 * 24 * 3600),
                )
                .map_err(|e| e.to_string())?;
                let key = ca.key_pem();
                (ca, key)
            }
        };
        let cross = st
            .signing
            .cross_sign(&ca, Duration::from_secs(365 * 24 * 3600))
            .map_err(|e| e.to_string())?;
        write_private(&dir.join("next-key.pem"), &key_pem)?;
        std::fs::write(dir.join("next.pem"), ca.cert_pem() + &ca.chain_pem())
            .map_err(|e| e.to_string())?;
        std::fs::write(dir.join("cross.pem"), &cross).map_err(|e| e.to_string())?;
        let fp = fingerprint(&ca);
        st.next = Some(Arc::new(ca));
        st.cross = Some(cross);
        drop(st);
        self.publish(false);
        Ok(format!(
            "new root {fp} is trusted beside the old one; run `sinew ca rotate reissue` once proxies have it"
        ))
    }

    /// Rotation step 2: the new root signs; every proxy renews now.
    pub async fn rotate_reissue(&self) -> Result<String, String> {
        if let Some(again) = self.reissue_step()? {
            return Ok(again);
        }
        // The admin credential's certificate comes from the retiring root: a new one
        // from the new root, with both roots, before anyone is told to finish.
        self.refresh_admin_credential().await?;
        Ok("the new root signs; every proxy is renewing; run `sinew ca rotate finish` when `sinew check` shows all on the new root".into())
    }

    /// [`Identity::rotate_reissue`]'s change of signer (no await while the state is
    /// locked); `Some` when it was done already and proxies were only asked again.
    fn reissue_step(&self) -> Result<Option<String>, String> {
        let dir = self.dir.as_ref().ok_or("no rotation in progress")?;
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        if st.phase() == Phase::Reissuing {
            drop(st);
            self.publish(true);
            return Ok(Some("asked every proxy to renew again".into()));
        }
        let next = st
            .next
            .take()
            .ok_or("no rotation in progress: run `sinew ca rotate start` first")?;
        let old = st.signing.clone();
        let previous = old.roots_pem();
        std::fs::write(dir.join("previous-roots.pem"), &previous).map_err(|e| e.to_string())?;
        // The new CA becomes the one on disk; the old key is no longer needed.
        let next_key =
            std::fs::read_to_string(dir.join("next-key.pem")).map_err(|e| e.to_string())?;
        let next_cert = std::fs::read_to_string(dir.join("next.pem")).map_err(|e| e.to_string())?;
        write_private(&dir.join("ca-key.pem"), &next_key)?;
        std::fs::write(dir.join("ca.pem"), next_cert).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(dir.join("next.pem"));
        let _ = std::fs::remove_file(dir.join("next-key.pem"));
        st.signing = next;
        st.previous_roots = Some(previous);
        drop(st);
        self.publish(true);
        Ok(None)
    }

    /// Rotation step 3: retire the old root.
    pub async fn rotate_finish(&self) -> Result<String, String> {
        self.finish_step()?;
        self.refresh_admin_credential().await?;
        Ok("the old root is retired".into())
    }

    /// [`Identity::rotate_finish`]'s change of roots (no await while the state is
    /// locked).
    fn finish_step(&self) -> Result<(), String> {
        let dir = self.dir.as_ref().ok_or("no rotation in progress")?;
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        if st.phase() != Phase::Reissuing {
            return Err(format!(
                "nothing to finish: the rotation is {}",
                st.phase().as_str()
            ));
        }
        st.previous_roots = None;
        st.cross = None;
        let _ = std::fs::remove_file(dir.join("previous-roots.pem"));
        let _ = std::fs::remove_file(dir.join("cross.pem"));
        drop(st);
        self.publish(false);
        Ok(())
    }

    /// Creates a join token for `namespace`/`account`, good for `uses` bootstraps
    /// (at least 1) until `ttl` (default 1 h, at most 7 days) passes. The token
    /// names the signing root by its SHA-256, so the proxy can verify the control
    /// plane before trusting it. Returns the token and what `sinew token list` shows.
    pub async fn create_token(
        &self,
        namespace: &str,
        account: &str,
        ttl: Duration,
        uses: u32,
        created_by: &str,
    ) -> Result<(String, crate::store::StoredToken, SpiffeId), String> {
        let valid = |s: &str| {
            !s.is_empty()
                && s.len() <= 253
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        };
        if !valid(namespace) || !valid(account) {
            return Err(format!(
                "{namespace:?}/{account:?} is not a valid namespace/service account"
            ));
        }
        if account == sinew_tls::api::CONTROL_ACCOUNT {
            return Err(format!(
                "{account:?} is the control plane's own service account: no proxy may take it"
            ));
        }
        let ttl = if ttl.is_zero() {
            DEFAULT_TOKEN_TTL
        } else {
            ttl
        };
        if ttl > MAX_TOKEN_TTL {
            return Err(format!(
                "a join token lives at most {} days",
                MAX_TOKEN_TTL.as_secs() / 86_400
            ));
        }
        let uses = uses.max(1);
        if uses > MAX_TOKEN_USES {
            return Err(format!("a join token allows at most {MAX_TOKEN_USES} uses"));
        }
        let mut bytes = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| "the system random source failed".to_owned())?;
        let token = format!(
            "{JOIN_TOKEN_PREFIX}{}.{}",
            self.signing_root_hash(),
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let hash = sha256_hex(&token);
        let now = SystemTime::now();
        let stored = StoredToken {
            namespace: namespace.to_owned(),
            service_account: account.to_owned(),
            expires_unix: unix(now + ttl),
            uses_left: Some(uses),
            id: hash[..12].to_owned(),
            created_unix: unix(now),
            created_by: created_by.to_owned(),
        };
        self.shared
            .put_token(hash, stored.clone())
            .await
            .map_err(|e| e.to_string())?;
        Ok((
            token,
            stored,
            SpiffeId::workload(&self.trust_domain, namespace, account),
        ))
    }

    /// Writes the admin credential to `path` (owner-only), for `server`, and
    /// remembers where, so that a root rotation writes it again from the new root.
    pub async fn write_admin_credential(
        &self,
        path: &std::path::Path,
        server: &str,
    ) -> Result<(), String> {
        let (key, csr) = sinew_tls::new_key_and_csr().map_err(|e| e.to_string())?;
        let (certificate, expires) = self
            .issue_credential("admin", crate::auth::Role::Admin, &csr, MAX_CREDENTIAL_TTL)
            .await?;
        crate::credentials::CredentialFile {
            server: server.to_owned(),
            name: "admin".into(),
            role: crate::auth::Role::Admin.as_str().into(),
            trust_domain: self.trust_domain.clone(),
            expires: crate::auth::rfc3339(u64::try_from(expires).unwrap_or(0)),
            certificate,
            key,
            roots: self.roots_pem(),
        }
        .write(path)
        .map_err(|e| format!("cannot write the admin credential: {e}"))?;
        *self.admin_file.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((path.to_path_buf(), server.to_owned()));
        Ok(())
    }

    /// Where the admin credential was written, for `server`: remembered without
    /// writing (an existing file is the operator's).
    pub fn remember_admin_credential(&self, path: &std::path::Path, server: &str) {
        *self.admin_file.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((path.to_path_buf(), server.to_owned()));
    }

    /// Writes the admin credential again (a root rotation moved on), if this control
    /// plane wrote one and it is still there.
    async fn refresh_admin_credential(&self) -> Result<(), String> {
        let known = self
            .admin_file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match known {
            Some((path, server)) if path.exists() => {
                self.write_admin_credential(&path, &server).await?;
                tracing::info!(path = %path.display(), "admin credential rewritten for the new root");
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// SHA-256 (hex) of the root the signing CA chains to: what join tokens carry.
    pub fn signing_root_hash(&self) -> String {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        st.signing
            .roots()
            .first()
            .map(sinew_tls::api::cert_hash)
            .unwrap_or_default()
    }

    /// A certificate for the control plane itself: `…/ns/<namespace>/sa/sinew-control`
    /// with `dns` and `ips` beside it, server and client. Returns `(key PEM, chain PEM
    /// ending with the roots, not_after)`: the roots go with the chain so that a
    /// proxy holding only a join token's root hash finds the root to pin.
    pub fn control_certificate(
        &self,
        namespace: &str,
        dns: &[String],
        ips: &[std::net::IpAddr],
    ) -> Result<(String, String, SystemTime), String> {
        let (key, csr) = sinew_tls::new_key_and_csr().map_err(|e| e.to_string())?;
        let id = SpiffeId::workload(
            &self.trust_domain,
            namespace,
            sinew_tls::api::CONTROL_ACCOUNT,
        );
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        let profile = sinew_tls::Profile {
            server: true,
            client: true,
            dns_names: dns.to_vec(),
            ips: ips.to_vec(),
        };
        let issued = st
            .signing
            .sign_csr_as(&csr, &id, self.cert_ttl, &profile)
            .map_err(|e| e.to_string())?;
        let mut chain = issued.chain_pem;
        if st.next.is_none()
            && let Some(cross) = &st.cross
        {
            // Reissuing: the new root signs; the cross-certificate links it to the
            // old root for clients that hold only that.
            chain.push_str(cross);
        }
        chain.push_str(&st.roots_pem());
        Ok((key, chain, issued.not_after))
    }

    /// Issues an operator credential for `csr_der`:
    /// `spiffe://<td>/operator/<role>/<name>`, client authentication only (no mesh
    /// identity). The role is the CA's statement, so every replica sharing the CA
    /// reads it alike; the record kept here lists it and marks it when revoked.
    /// Returns `(certificate PEM, expiry)`.
    pub async fn issue_credential(
        &self,
        name: &str,
        role: crate::auth::Role,
        csr_der: &[u8],
        ttl: Duration,
    ) -> Result<(String, i64), String> {
        let valid = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid {
            return Err(format!(
                "{name:?} is not a valid credential name (lowercase letters, digits, '-', '.')"
            ));
        }
        let ttl = if ttl.is_zero() {
            DEFAULT_CREDENTIAL_TTL
        } else {
            ttl
        };
        if ttl > MAX_CREDENTIAL_TTL {
            return Err("a credential lives at most 366 days".into());
        }
        let id: SpiffeId = format!(
            "spiffe://{}/operator/{}/{name}",
            self.trust_domain,
            role.as_str()
        )
        .parse()
        .map_err(|e| format!("credential name {name:?}: {e}"))?;
        let signing = self.signing();
        let issued = signing
            .sign_csr_as(csr_der, &id, ttl, &sinew_tls::Profile::operator())
            .map_err(|e| format!("refused: {e}"))?;
        let leaf = sinew_tls::certs_from_pem("certificate", &issued.chain_pem)
            .map_err(|e| e.to_string())?;
        let fp = leaf
            .first()
            .map(sinew_tls::api::cert_hash)
            .ok_or("no certificate issued")?;
        let expires = unix(issued.not_after);
        self.shared
            .put_credential(
                fp,
                crate::store::StoredCredential {
                    name: name.to_owned(),
                    role: role.as_str().to_owned(),
                    expires_unix: expires,
                    created_unix: unix(SystemTime::now()),
                    revoked: false,
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok((issued.chain_pem, expires))
    }

    /// Sets how tokens that are not join tokens are checked (once; later calls are
    /// ignored and return false).
    pub fn set_token_reviewer(&self, reviewer: Arc<dyn TokenReviewer>) -> bool {
        self.reviewer.set(reviewer).is_ok()
    }

    /// A proxy's bootstrap: issues a certificate for the proxy in `proxy_namespace`
    /// that presents `token` (a join token, spent by this; or, with a
    /// [`TokenReviewer`], a token it accepts) and `csr_der`. Returns `(chain PEM,
    /// SPIFFE id, not_after, signer)` or why it was refused.
    pub async fn bootstrap(
        &self,
        proxy_namespace: &str,
        proxy_name: &str,
        token: &str,
        csr_der: &[u8],
    ) -> Result<(String, SpiffeId, SystemTime, String), String> {
        match self.reviewer.get() {
            Some(reviewer) if !token.is_empty() && !token.starts_with(JOIN_TOKEN_PREFIX) => {
                let subject = reviewer.review(token.to_owned()).await?;
                if subject.namespace != proxy_namespace {
                    return Err(format!(
                        "the service-account token is for namespace {:?}, the proxy is in {proxy_namespace:?}",
                        subject.namespace
                    ));
                }
                if let Some(pod) = subject.pod.as_deref().filter(|p| *p != proxy_name) {
                    return Err(format!(
                        "the service-account token is bound to the pod {pod:?}; the proxy is {proxy_name:?}"
                    ));
                }
                self.sign(&subject.namespace, &subject.service_account, csr_der)
            }
            _ => self.issue(proxy_namespace, token, csr_der).await,
        }
    }

    /// Spends one use of the join token `token` for a proxy in `proxy_namespace` and
    /// issues a certificate for its identity and `csr_der`. Returns `(chain PEM,
    /// SPIFFE id, not_after, signer)` or why it was refused.
    pub async fn issue(
        &self,
        proxy_namespace: &str,
        token: &str,
        csr_der: &[u8],
    ) -> Result<(String, SpiffeId, SystemTime, String), String> {
        use crate::store::SpendError;
        if token.is_empty() {
            return Err(
                "no join token: start the proxy with --join-token-file (see `sinew token create`)"
                    .into(),
            );
        }
        // The CSR is checked before the token is spent: a malformed request does
        // not cost a single-use token.
        sinew_tls::Ca::check_csr(csr_der).map_err(|e| format!("refused: {e}"))?;
        let binding = self
            .shared
            .spend_token(
                sha256_hex(token),
                proxy_namespace.to_owned(),
                unix(SystemTime::now()),
            )
            .await
            .map_err(|e| match e {
                SpendError::Unknown => {
                    "unknown join token (never issued, already used up, or revoked)".to_owned()
                }
                SpendError::Expired => "the join token has expired".to_owned(),
                SpendError::Namespace(ns) => format!(
                    "the join token is for namespace {ns:?}, the proxy is in {proxy_namespace:?}"
                ),
                SpendError::Store(e) => e,
            })?;
        self.sign(&binding.namespace, &binding.service_account, csr_der)
    }

    /// Renews the certificate of a proxy whose stream proved `id` (a workload id):
    /// the new certificate is for the same identity, whatever the CSR asks.
    pub fn renew(
        &self,
        id: &SpiffeId,
        csr_der: &[u8],
    ) -> Result<(String, SpiffeId, SystemTime, String), String> {
        let (ns, sa) = id
            .workload_parts()
            .ok_or_else(|| format!("{id} is not a workload identity"))?;
        self.sign(ns, sa, csr_der)
    }

    fn sign(
        &self,
        namespace: &str,
        service_account: &str,
        csr_der: &[u8],
    ) -> Result<(String, SpiffeId, SystemTime, String), String> {
        let id = SpiffeId::workload(&self.trust_domain, namespace, service_account);
        let signing = self.signing();
        let issued = signing
            .sign_csr(csr_der, &id, self.cert_ttl)
            .map_err(|e| format!("refused: {e}"))?;
        self.issued.fetch_add(1, Ordering::Relaxed);
        Ok((
            issued.chain_pem,
            id,
            issued.not_after,
            fingerprint(&signing),
        ))
    }
}
