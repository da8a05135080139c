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

use crate::store::{Store, StoredToken};

/// Default certificate lifetime.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default join-token lifetime.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

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
    store: Store,
    issued: AtomicU64,
    bundle: tokio::sync::watch::Sender<BundleState>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn sha256_hex(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    std::io::Write::write_all(&mut f, data.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.sync_all().map_err(|e| format!("{}: {e}", path.display()))
}

impl Identity {
    /// Identity service over the CA in `dir` (generated there on first start), with
    /// any rotation in progress picked up from its files.
    pub fn from_dir(
        dir: &std::path::Path,
        trust_domain: String,
        cert_ttl: Duration,
        store: Store,
    ) -> Result<Identity, sinew_tls::TlsError> {
        let signing = Ca::load_or_generate(dir, &trust_domain)?;
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
        let next = match (read("next.pem"), read("next-key.pem")) {
            (Some(c), Some(k)) => Some(Arc::new(Ca::from_pem(&c, &k)?)),
            _ => None,
        };
        let previous_roots = read("previous-roots.pem");
        Ok(Self::build(
            CaState {
                signing: Arc::new(signing),
                next,
                previous_roots,
            },
            Some(dir.to_path_buf()),
            trust_domain,
            cert_ttl,
            store,
        ))
    }

    /// Identity service over an operator's CA (no rotation through the API).
    pub fn new(ca: Ca, trust_domain: String, cert_ttl: Duration, store: Store) -> Identity {
        Self::build(
            CaState {
                signing: Arc::new(ca),
                next: None,
                previous_roots: None,
            },
            None,
            trust_domain,
            cert_ttl,
            store,
        )
    }

    fn build(
        state: CaState,
        dir: Option<std::path::PathBuf>,
        trust_domain: String,
        cert_ttl: Duration,
        store: Store,
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
            store,
            issued: AtomicU64::new(0),
            reviewer: std::sync::OnceLock::new(),
            bundle,
        }
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
        write_private(&dir.join("next-key.pem"), &key_pem)?;
        std::fs::write(dir.join("next.pem"), ca.cert_pem() + &ca.chain_pem())
            .map_err(|e| e.to_string())?;
        let fp = fingerprint(&ca);
        st.next = Some(Arc::new(ca));
        drop(st);
        self.publish(false);
        Ok(format!(
            "new root {fp} is trusted beside the old one; run `sinew ca rotate reissue` once proxies have it"
        ))
    }

    /// Rotation step 2: the new root signs; every proxy renews now.
    pub fn rotate_reissue(&self) -> Result<String, String> {
        let dir = self.dir.as_ref().ok_or("no rotation in progress")?;
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        if st.phase() == Phase::Reissuing {
            drop(st);
            self.publish(true);
            return Ok("asked every proxy to renew again".into());
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
        Ok("the new root signs; every proxy is renewing; run `sinew ca rotate finish` when `sinew check` shows all on the new root".into())
    }

    /// Rotation step 3: retire the old root.
    pub fn rotate_finish(&self) -> Result<String, String> {
        let dir = self.dir.as_ref().ok_or("no rotation in progress")?;
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        if st.phase() != Phase::Reissuing {
            return Err(format!(
                "nothing to finish: the rotation is {}",
                st.phase().as_str()
            ));
        }
        st.previous_roots = None;
        let _ = std::fs::remove_file(dir.join("previous-roots.pem"));
        drop(st);
        self.publish(false);
        Ok("the old root is retired".into())
    }

    /// Creates a join token for `namespace`/`account`.
    pub fn create_token(
        &self,
        namespace: &str,
        account: &str,
        ttl: Duration,
    ) -> Result<(String, SpiffeId, i64), String> {
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
        let mut bytes = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| "the system random source failed".to_owned())?;
        let token = format!(
            "sinew.{}",
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let expires = unix(SystemTime::now() + ttl);
        self.store
            .put_token(
                &sha256_hex(&token),
                &StoredToken {
                    namespace: namespace.to_owned(),
                    service_account: account.to_owned(),
                    expires_unix: expires,
                },
            )
            .map_err(|e| e.to_string())?;
        Ok((
            token,
            SpiffeId::workload(&self.trust_domain, namespace, account),
            expires,
        ))
    }

    /// Sets how tokens that are not join tokens are checked (once; later calls are
    /// ignored and return false).
    pub fn set_token_reviewer(&self, reviewer: Arc<dyn TokenReviewer>) -> bool {
        self.reviewer.set(reviewer).is_ok()
    }

    /// Issues a certificate for the proxy in `proxy_namespace` that presents `token`
    /// (a join token, or, with a [`TokenReviewer`], a token it accepts) and
    /// `csr_der`. Returns `(chain PEM, SPIFFE id, not_after, signer)` or why it was
    /// refused.
    pub async fn authenticate_and_issue(
        &self,
        proxy_namespace: &str,
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
                self.sign(&subject.namespace, &subject.service_account, csr_der)
            }
            _ => self.issue(proxy_namespace, token, csr_der),
        }
    }

    /// Issues a certificate for the proxy in `proxy_namespace` that presents the join
    /// token `token` and `csr_der`. Returns `(chain PEM, SPIFFE id, not_after,
    /// signer)` or why it was refused.
    pub fn issue(
        &self,
        proxy_namespace: &str,
        token: &str,
        csr_der: &[u8],
    ) -> Result<(String, SpiffeId, SystemTime, String), String> {
        if token.is_empty() {
            return Err(
                "no join token: start the proxy with --join-token (see `sinew token create`)"
                    .into(),
            );
        }
        let binding = self
            .store
            .token(&sha256_hex(token))
            .map_err(|e| e.to_string())?
            .ok_or("unknown join token")?;
        if binding.expires_unix < unix(SystemTime::now()) {
            return Err("the join token has expired".into());
        }
        if binding.namespace != proxy_namespace {
            return Err(format!(
                "the join token is for namespace {:?}, the proxy is in {proxy_namespace:?}",
                binding.namespace
            ));
        }
        self.sign(&binding.namespace, &binding.service_account, csr_der)
    }

    fn sign(
        &self,
        namespace: &str,
        service_account: &str,
        csr_der: &[u8],
    ) -> Result<(String, SpiffeId, SystemTime, String), String> {
        let id = SpiffeId::workload(&self.trust_domain, namespace, service_account);
        let signing = self
            .state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .signing
            .clone();
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
