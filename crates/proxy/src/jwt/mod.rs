//! End-user authentication at the inbound: JWT verification for `RequestAuthentication`.
//!
//! A [`JwtVerifier`] is built from an inbound's compiled JWT rules
//! ([`JwtRuleConfig`]). [`JwtVerifier::verify`] finds the token in the request
//! headers, picks the rule by the token's issuer and the key by its `kid`, and checks
//! the signature (with `jsonwebtoken`), then the issuer, `exp`/`nbf` (with the rule's
//! clock skew), the audience and the required claims. A request without a token is
//! `Ok(None)`: authentication passes and authorization decides.
//!
//! Refused outright, before any key is used: `alg: none`, every HMAC algorithm (the
//! keys come from a JWKS of public keys, so an `HS256` token "signed" with a public
//! key's bytes is algorithm confusion), and an algorithm that does not fit the key
//! (its `alg`, or its type and curve). Keys are never taken from the token itself
//! (`jwk`, `jku`, `x5u`, `x5c` are ignored) and a token with `crit` is refused.
//!
//! Key sets live in an [`ArcSwapOption`] per rule, so verification takes no lock and
//! does no I/O. Inline keys and key files are loaded when the verifier is built.
//! [`JwtVerifier::spawn_refresh`] starts background work: key files are re-read when
//! they change, and `uri` key sets are fetched over HTTP or HTTPS every `refresh`
//! interval (`crate::http_client`: hyper-util's client over hyper-rustls, ring). A
//! failed refresh keeps the last good set. The background tasks end when the last
//! clone of the verifier is dropped.
//!
//! Modules: `token` finds the token and reads it (`token::verify` checks its
//! signature and claims), `keys` parses key sets, `jwks` keeps them fresh.

mod jwks;
mod keys;
mod token;

#[cfg(test)]
pub(crate) mod testkeys;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;
use sinew_model::compile::{JwksSource, JwtRuleConfig};

use jwks::{FileSig, fetch_jwks, file_sig, poll_uri, watch_file};
use keys::{KeySet, parse_jwks};
use token::Unverified;
use token::verify::verify_with;

/// Why a token was refused. Every refusal is a 401.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtError {
    /// Stable reason for `sinew-error` and metrics: `jwt-expired`,
    /// `jwt-not-yet-valid`, `jwt-wrong-issuer`, `jwt-wrong-audience`,
    /// `jwt-bad-signature`, `jwt-unknown-kid`, `jwt-alg-none`, `jwt-alg-not-allowed`,
    /// `jwt-malformed`, `jwt-missing-claim` or `jwks-unavailable`.
    pub reason: &'static str,
    /// One line for the log and the response body. Never holds the token.
    pub detail: String,
}

impl JwtError {
    fn new(reason: &'static str, detail: impl Into<String>) -> JwtError {
        JwtError {
            reason,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for JwtError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

impl std::error::Error for JwtError {}

/// A verified token.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedToken {
    /// `iss`.
    pub issuer: String,
    /// `sub` (empty when the token has none).
    pub subject: String,
    /// Every claim.
    pub claims: Value,
    /// Headers to set for the application, from the rule's `forwardClaims`.
    pub forward: Vec<(HeaderName, HeaderValue)>,
    /// The header the token came in.
    pub header: HeaderName,
    /// True when the token's header stays for the application.
    pub forward_original_token: bool,
    /// `namespace/name` of the `RequestAuthentication` whose rule accepted it.
    pub policy: String,
}

impl VerifiedToken {
    /// The request principal: `issuer/subject`.
    pub fn principal(&self) -> String {
        format!("{}/{}", self.issuer, self.subject)
    }
}
/// One rule and its current keys.
#[derive(Debug)]
struct RuleState {
    config: JwtRuleConfig,
    keys: ArcSwapOption<KeySet>,
    /// For a key file: its signature when `new` read it.
    file_sig: Option<FileSig>,
}

#[derive(Debug)]
struct Inner {
    rules: Vec<RuleState>,
    refreshing: AtomicBool,
    /// Key files and JWKS answers refused (the last good keys stayed in force).
    refusals: std::sync::atomic::AtomicU64,
}

/// Verifies the JWTs of one inbound. Cheap to clone; clones share key sets.
#[derive(Debug, Clone)]
pub struct JwtVerifier {
    inner: Arc<Inner>,
}

impl JwtVerifier {
    /// Builds a verifier for these rules. Inline keys are parsed and key files read
    /// now (a missing or bad file is logged, and its rule answers `jwks-unavailable`
    /// until the file is fixed and [`spawn_refresh`](Self::spawn_refresh) runs). URL
    /// key sets are empty until fetched: call [`refresh_now`](Self::refresh_now)
    /// and/or [`spawn_refresh`](Self::spawn_refresh).
    pub fn new(rules: &[JwtRuleConfig]) -> JwtVerifier {
        let rules = rules
            .iter()
            .map(|r| {
                let mut sig = None;
                let keys = match &r.jwks {
                    JwksSource::Inline { jwks } => match parse_jwks(&jwks.to_string()) {
                        Ok(k) => Some(Arc::new(k)),
                        Err(e) => {
                            tracing::warn!(issuer = %r.issuer, error = %e, "inline JWKS unusable");
                            None
                        }
                    },
                    JwksSource::File { path } => {
                        // The signature first: a change after it is seen later.
                        sig = std::fs::metadata(path).ok().map(|m| file_sig(&m));
                        match std::fs::read_to_string(path)
                            .map_err(|e| e.to_string())
                            .and_then(|t| parse_jwks(&t))
                        {
                            Ok(k) => Some(Arc::new(k)),
                            Err(e) => {
                                tracing::warn!(issuer = %r.issuer, %path, error = %e, "JWKS file unusable");
                                None
                            }
                        }
                    }
                    JwksSource::Uri { .. } => None,
                };
                RuleState {
                    config: r.clone(),
                    keys: ArcSwapOption::new(keys),
                    file_sig: sig,
                }
            })
            .collect();
        JwtVerifier {
            inner: Arc::new(Inner {
                rules,
                refreshing: AtomicBool::new(false),
                refusals: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// True when this verifier was built from exactly these rules: a reload can then
    /// keep it (and its fetched keys) instead of building a new one.
    pub fn same_rules(&self, rules: &[JwtRuleConfig]) -> bool {
        self.inner.rules.len() == rules.len()
            && self
                .inner
                .rules
                .iter()
                .zip(rules)
                .all(|(a, b)| a.config == *b)
    }

    /// True when there is no rule: every request passes authentication untouched.
    pub fn is_empty(&self) -> bool {
        self.inner.rules.is_empty()
    }

    /// Fetches every `uri` key set once and re-reads every key file, now. Returns one
    /// line per source that failed (those keep their last good keys).
    pub async fn refresh_now(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for r in &self.inner.rules {
            let res = match &r.config.jwks {
                JwksSource::Inline { .. } => continue,
                JwksSource::File { path } => tokio::fs::read_to_string(path)
                    .await
                    .map_err(|e| format!("{path}: {e}"))
                    .and_then(|t| parse_jwks(&t)),
                JwksSource::Uri { uri, ca_file, .. } => fetch_jwks(uri, ca_file.as_deref())
                    .await
                    .and_then(|t| parse_jwks(&t)),
            };
            match res {
                Ok(k) => r.keys.store(Some(Arc::new(k))),
                Err(e) => problems.push(format!("issuer {}: {e}", r.config.issuer)),
            }
        }
        problems
    }

    /// Starts the background work on `rt`: key files are re-read when they change,
    /// `uri` key sets are fetched now and every `refresh` interval (sooner after a
    /// failure; a failed refresh keeps the last good set). Calling it again does
    /// nothing. The tasks end once every clone of the verifier is dropped.
    /// Returns the tasks it started (none if they already run); each ends soon
    /// after the last clone of the verifier is dropped.
    pub fn spawn_refresh(&self, rt: &tokio::runtime::Handle) -> Vec<tokio::task::JoinHandle<()>> {
        if self.inner.refreshing.swap(true, Ordering::AcqRel) {
            return Vec::new();
        }
        let mut tasks = Vec::new();
        for (i, r) in self.inner.rules.iter().enumerate() {
            let weak = Arc::downgrade(&self.inner);
            match &r.config.jwks {
                JwksSource::Inline { .. } => {}
                JwksSource::File { path } => {
                    tasks.push(rt.spawn(watch_file(weak, i, path.clone(), r.file_sig)));
                }
                JwksSource::Uri {
                    uri,
                    ca_file,
                    refresh,
                } => {
                    tasks.push(rt.spawn(poll_uri(weak, i, uri.clone(), ca_file.clone(), *refresh)));
                }
            }
        }
        tasks
    }

    /// Key files and JWKS answers refused so far (the last good keys stayed).
    pub fn refusals(&self) -> u64 {
        self.inner.refusals.load(Ordering::Relaxed)
    }

    /// Finds and verifies the request's token. `Ok(None)`: no token (authentication
    /// passes; authorization decides). `Err`: a token is present and refused, or the
    /// request carries several different tokens.
    pub fn verify(
        &self,
        headers: &HeaderMap,
        now: SystemTime,
    ) -> Result<Option<VerifiedToken>, JwtError> {
        let Some(token::Found {
            token,
            header,
            located,
        }) = token::locate(&self.inner.rules, headers)?
        else {
            return Ok(None);
        };
        let read = Unverified::read(&token)?;
        let iss = read.iss();
        let candidates: Vec<&RuleState> = located
            .iter()
            .map(|i| &self.inner.rules[*i])
            .filter(|r| r.config.issuer == iss)
            .collect();
        if candidates.is_empty() {
            let elsewhere = self.inner.rules.iter().any(|r| r.config.issuer == iss);
            return Err(JwtError::new(
                "jwt-wrong-issuer",
                if elsewhere {
                    format!("issuer {iss:?} is not accepted in header {header}")
                } else {
                    format!("issuer {iss:?} is not accepted")
                },
            ));
        }
        let mut first_err = None;
        for r in candidates {
            match verify_with(r, &token, read.alg, read.kid(), now, &header) {
                Ok(t) => return Ok(Some(t)),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| JwtError::new("jwt-wrong-issuer", "no rule")))
    }
}
