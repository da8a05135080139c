//! The control plane's identity service: join tokens and certificate issuance.
//!
//! A proxy proves who it is with a join token (issued by `sinew token create` for a
//! namespace and service account, stored only as its SHA-256) and sends a CSR; it gets
//! a short-lived certificate for the token's SPIFFE id, never for anything the CSR or
//! the proxy claims. The token's namespace must be the proxy's own.

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

/// Certificates and tokens.
pub struct Identity {
    ca: Arc<Ca>,
    trust_domain: String,
    cert_ttl: Duration,
    store: Store,
    issued: AtomicU64,
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

impl Identity {
    /// Identity service over `ca`.
    pub fn new(ca: Ca, trust_domain: String, cert_ttl: Duration, store: Store) -> Identity {
        Identity {
            ca: Arc::new(ca),
            trust_domain,
            cert_ttl,
            store,
            issued: AtomicU64::new(0),
        }
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Roots to trust, PEM.
    pub fn roots_pem(&self) -> String {
        self.ca.roots_pem()
    }

    /// Certificates issued since start.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
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

    /// Issues a certificate for the proxy in `proxy_namespace` that presents `token`
    /// and `csr_der`. Returns `(chain PEM, not_after)` or why it was refused.
    pub fn issue(
        &self,
        proxy_namespace: &str,
        token: &str,
        csr_der: &[u8],
    ) -> Result<(String, SpiffeId, SystemTime), String> {
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
        let id = SpiffeId::workload(
            &self.trust_domain,
            &binding.namespace,
            &binding.service_account,
        );
        let issued = self
            .ca
            .sign_csr(csr_der, &id, self.cert_ttl)
            .map_err(|e| format!("refused: {e}"))?;
        self.issued.fetch_add(1, Ordering::Relaxed);
        Ok((issued.chain_pem, id, issued.not_after))
    }
}
