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
//! they change, and `uri` key sets are fetched over HTTP or HTTPS (rustls, ring) every
//! `refresh` interval. A failed refresh keeps the last good set. The background tasks
//! end when the last clone of the verifier is dropped.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use sinew_model::authz::{claim, claim_matches};
use sinew_model::compile::{JwksSource, JwtRuleConfig};

/// How often key files are checked for changes.
const FILE_POLL: Duration = Duration::from_secs(1);
/// Time allowed for one JWKS fetch (connect, TLS, response, body).
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// First retry delay after a failed fetch; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest retry delay after failed fetches (never longer than the refresh interval).
const MAX_RETRY: Duration = Duration::from_secs(30);
/// CA bundles tried, in order, for HTTPS without a `caFile`.
const SYSTEM_CA_FILES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
];

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

/// Which key types fit which algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    EcP256,
    EcP384,
    Rsa,
    Ed25519,
}

impl KeyKind {
    fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        matches!(
            (self, alg),
            (KeyKind::EcP256, ES256)
                | (KeyKind::EcP384, ES384)
                | (KeyKind::Rsa, RS256 | RS384 | RS512 | PS256 | PS384 | PS512)
                | (KeyKind::Ed25519, EdDSA)
        )
    }

    fn name(self) -> &'static str {
        match self {
            KeyKind::EcP256 => "EC P-256",
            KeyKind::EcP384 => "EC P-384",
            KeyKind::Rsa => "RSA",
            KeyKind::Ed25519 => "OKP Ed25519",
        }
    }
}

/// One usable public key.
#[derive(Clone)]
struct Key {
    kid: Option<String>,
    alg: Option<Algorithm>,
    kind: KeyKind,
    key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Key {
    fn fits(&self, alg: Algorithm) -> bool {
        self.alg.is_none_or(|a| a == alg) && self.kind.fits(alg)
    }

    fn describe(&self) -> String {
        let kid = self.kid.as_deref().unwrap_or("(no kid)");
        match self.alg {
            Some(a) => format!("key {kid} ({}, alg {a:?})", self.kind.name()),
            None => format!("key {kid} ({})", self.kind.name()),
        }
    }
}

/// A parsed key set.
#[derive(Debug, Clone)]
struct KeySet {
    keys: Vec<Key>,
}

/// Parses a JWKS, keeping the public signature keys it can use. Private members,
/// symmetric keys, encryption keys and unsupported curves are skipped.
fn parse_jwks(text: &str) -> Result<KeySet, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let list = v
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("not a JWKS: no \"keys\" array")?;
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (i, k) in list.iter().enumerate() {
        match parse_key(k) {
            Ok(key) => keys.push(key),
            Err(why) => skipped.push(format!("keys[{i}]: {why}")),
        }
    }
    if !skipped.is_empty() {
        tracing::warn!(skipped = %skipped.join("; "), "JWKS keys skipped");
    }
    if keys.is_empty() {
        return Err(if skipped.is_empty() {
            "the JWKS holds no key".to_owned()
        } else {
            format!("no usable key ({})", skipped.join("; "))
        });
    }
    Ok(KeySet { keys })
}

fn parse_key(k: &Value) -> Result<Key, String> {
    let kty = k.get("kty").and_then(Value::as_str).unwrap_or("");
    if kty == "oct" {
        return Err("symmetric (oct) keys are refused".into());
    }
    if ["d", "p", "q", "dp", "dq", "qi", "k"]
        .iter()
        .any(|m| k.get(*m).is_some())
    {
        return Err("private key material is refused".into());
    }
    if let Some(u) = k.get("use").and_then(Value::as_str)
        && u != "sig"
    {
        return Err(format!("use {u:?} is not \"sig\""));
    }
    let jwk: Jwk = serde_json::from_value(k.clone()).map_err(|e| format!("{e}"))?;
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(ka) => match Algorithm::from_str(&ka.to_string()) {
            Ok(a) if !matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) => {
                Some(a)
            }
            _ => return Err(format!("alg {ka} is not a public-key signature algorithm")),
        },
    };
    let kind = match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => KeyKind::EcP256,
            EllipticCurve::P384 => KeyKind::EcP384,
            ref c => return Err(format!("curve {c:?} is not supported")),
        },
        AlgorithmParameters::RSA(_) => KeyKind::Rsa,
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => KeyKind::Ed25519,
            ref c => return Err(format!("curve {c:?} is not supported")),
        },
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric (oct) keys are refused".into());
        }
        // jsonwebtoken may learn key types: none is trusted before it is listed here.
        _ => return Err("the key type is not supported".into()),
    };
    if let Some(a) = alg
        && !kind.fits(a)
    {
        return Err(format!("alg {a:?} does not fit a {} key", kind.name()));
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("{e}"))?;
    Ok(Key {
        kid: jwk.common.key_id.clone(),
        alg,
        kind,
        key,
    })
}

/// One rule and its current keys.
#[derive(Debug)]
struct RuleState {
    config: JwtRuleConfig,
    keys: ArcSwapOption<KeySet>,
    /// For a key file: its signature when `new` read it.
    file_sig: Option<FileSig>,
}

/// What tells a changed file: modification time, size and (on Unix) inode.
type FileSig = (Option<SystemTime>, u64, u64);

fn file_sig(m: &std::fs::Metadata) -> FileSig {
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(m);
    #[cfg(not(unix))]
    let ino = 0;
    (m.modified().ok(), m.len(), ino)
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
        // 1. The token, and the rules whose locations it was found at.
        let mut token: Option<(String, HeaderName)> = None;
        let mut located: Vec<usize> = Vec::new();
        for (i, r) in self.inner.rules.iter().enumerate() {
            for loc in &r.config.from_headers {
                for v in headers.get_all(&loc.header) {
                    let Some(t) = strip_prefix(v.as_bytes(), &loc.prefix) else {
                        continue;
                    };
                    let t = std::str::from_utf8(t)
                        .map_err(|_| JwtError::new("jwt-malformed", "the token is not text"))?
                        .trim();
                    if t.is_empty() {
                        return Err(JwtError::new(
                            "jwt-malformed",
                            format!("empty token in {}", loc.header),
                        ));
                    }
                    match &token {
                        Some((seen, _)) if seen != t => {
                            return Err(JwtError::new(
                                "jwt-malformed",
                                "the request carries several different tokens",
                            ));
                        }
                        Some(_) => {}
                        None => token = Some((t.to_owned(), loc.header.clone())),
                    }
                    if !located.contains(&i) {
                        located.push(i);
                    }
                }
            }
        }
        let Some((token, header)) = token else {
            return Ok(None);
        };

        // 2. Its header: the algorithm, before anything else.
        let mut parts = token.split('.');
        let (Some(h64), Some(p64), Some(_sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::new(
                "jwt-malformed",
                "a JWT has three dot-separated parts (encrypted tokens are not accepted)",
            ));
        };
        let head: Value = b64url_decode(h64)
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(Value::is_object)
            .ok_or_else(|| JwtError::new("jwt-malformed", "the header is not base64url JSON"))?;
        let alg_name = head
            .get("alg")
            .and_then(Value::as_str)
            .ok_or_else(|| JwtError::new("jwt-malformed", "the header has no alg"))?;
        if alg_name.eq_ignore_ascii_case("none") {
            return Err(JwtError::new(
                "jwt-alg-none",
                "unsigned tokens (alg: none) are refused",
            ));
        }
        let alg = Algorithm::from_str(alg_name).map_err(|_| {
            JwtError::new(
                "jwt-alg-not-allowed",
                format!("alg {alg_name:?} is not supported"),
            )
        })?;
        if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            return Err(JwtError::new(
                "jwt-alg-not-allowed",
                format!(
                    "alg {alg_name} (HMAC) is refused: keys are public, so an HMAC token proves nothing"
                ),
            ));
        }
        if head.get("crit").is_some() {
            return Err(JwtError::new(
                "jwt-malformed",
                "critical header extensions (crit) are not supported",
            ));
        }
        let kid = match head.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.as_str()),
            Some(_) => return Err(JwtError::new("jwt-malformed", "kid is not a string")),
        };

        // 3. The rule, by issuer (read unverified; the signature covers it below).
        let payload: Value = b64url_decode(p64)
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(Value::is_object)
            .ok_or_else(|| JwtError::new("jwt-malformed", "the payload is not base64url JSON"))?;
        let iss = match payload.get("iss") {
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err(JwtError::new("jwt-malformed", "iss is not a string")),
            None => {
                return Err(JwtError::new(
                    "jwt-wrong-issuer",
                    "the token has no iss claim",
                ));
            }
        };
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
            match verify_with(r, &token, alg, kid, now, &header) {
                Ok(t) => return Ok(Some(t)),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| JwtError::new("jwt-wrong-issuer", "no rule")))
    }
}

/// Checks the signature with the rule's keys, then the claims.
fn verify_with(
    r: &RuleState,
    token: &str,
    alg: Algorithm,
    kid: Option<&str>,
    now: SystemTime,
    header: &HeaderName,
) -> Result<VerifiedToken, JwtError> {
    let cfg = &r.config;
    let keys = r.keys.load_full().ok_or_else(|| {
        JwtError::new(
            "jwks-unavailable",
            format!("the keys of issuer {:?} are not available yet", cfg.issuer),
        )
    })?;
    let by_kid: Vec<&Key> = match kid {
        Some(kid) => {
            let found: Vec<&Key> = keys
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .collect();
            if found.is_empty() {
                return Err(JwtError::new(
                    "jwt-unknown-kid",
                    format!("issuer {:?} has no key {kid:?}", cfg.issuer),
                ));
            }
            found
        }
        None => keys.keys.iter().collect(),
    };
    let fitting: Vec<&Key> = by_kid.iter().copied().filter(|k| k.fits(alg)).collect();
    if fitting.is_empty() {
        let what = match by_kid.as_slice() {
            [one] => one.describe(),
            _ => format!("any key of issuer {:?}", cfg.issuer),
        };
        return Err(JwtError::new(
            "jwt-alg-not-allowed",
            format!("alg {alg:?} does not fit {what}"),
        ));
    }
    let mut validation = Validation::new(alg);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims = HashSet::new();
    let mut claims = None;
    for k in fitting {
        match jsonwebtoken::decode::<Value>(token, &k.key, &validation) {
            Ok(data) => {
                claims = Some(data.claims);
                break;
            }
            Err(e) => match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature
                | jsonwebtoken::errors::ErrorKind::InvalidEcdsaKey
                | jsonwebtoken::errors::ErrorKind::InvalidRsaKey(_)
                | jsonwebtoken::errors::ErrorKind::InvalidEddsaKey
                | jsonwebtoken::errors::ErrorKind::InvalidKeyFormat => continue,
                jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => {
                    return Err(JwtError::new(
                        "jwt-alg-not-allowed",
                        format!("alg {alg:?} does not fit {}", k.describe()),
                    ));
                }
                _ => {
                    return Err(JwtError::new(
                        "jwt-malformed",
                        format!("cannot decode the token: {e}"),
                    ));
                }
            },
        }
    }
    let claims = claims.ok_or_else(|| {
        JwtError::new(
            "jwt-bad-signature",
            format!("the signature does not verify (issuer {:?})", cfg.issuer),
        )
    })?;
    check_claims(cfg, &claims, now)?;
    let subject = match claims.get("sub") {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(JwtError::new("jwt-malformed", "sub is not a string")),
    };
    let forward = cfg
        .forward_claims
        .iter()
        .filter_map(|f| {
            let v = claim(&claims, &f.claim)?;
            let text = claim_text(v)?;
            Some((f.header.clone(), HeaderValue::from_str(&text).ok()?))
        })
        .collect();
    Ok(VerifiedToken {
        issuer: cfg.issuer.clone(),
        subject,
        claims,
        forward,
        header: header.clone(),
        forward_original_token: cfg.forward_original_token,
        policy: cfg.policy.clone(),
    })
}

/// Time, audience and required claims.
fn check_claims(cfg: &JwtRuleConfig, claims: &Value, now: SystemTime) -> Result<(), JwtError> {
    let now = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64();
    let skew = cfg.clock_skew.as_secs_f64();
    let time = |name: &str| -> Result<Option<f64>, JwtError> {
        match claims.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| JwtError::new("jwt-malformed", format!("{name} is not a number"))),
        }
    };
    let exp = time("exp")?
        .ok_or_else(|| JwtError::new("jwt-missing-claim", "the token has no exp claim"))?;
    if now > exp + skew {
        return Err(JwtError::new(
            "jwt-expired",
            format!("the token expired {:.0}s ago", now - exp),
        ));
    }
    if let Some(nbf) = time("nbf")?
        && now + skew < nbf
    {
        return Err(JwtError::new(
            "jwt-not-yet-valid",
            format!("the token is valid in {:.0}s", nbf - now),
        ));
    }
    if !cfg.audiences.is_empty() {
        let ok = match claims.get("aud") {
            Some(Value::String(a)) => cfg.audiences.contains(a),
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(Value::as_str)
                .any(|a| cfg.audiences.iter().any(|x| x == a)),
            _ => false,
        };
        if !ok {
            return Err(JwtError::new(
                "jwt-wrong-audience",
                format!(
                    "the token's audience is not one of {}",
                    cfg.audiences.join(", ")
                ),
            ));
        }
    }
    for rc in &cfg.required_claims {
        if !claim_matches(claims, &rc.name, &rc.values) {
            return Err(JwtError::new(
                "jwt-missing-claim",
                if rc.values.is_empty() {
                    format!("the token has no {:?} claim", rc.name)
                } else {
                    format!(
                        "claim {:?} is missing or not one of {}",
                        rc.name,
                        rc.values.join(", ")
                    )
                },
            ));
        }
    }
    Ok(())
}

/// A claim as header text: strings as they are, arrays of scalars joined with `,`,
/// anything else as compact JSON.
fn claim_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Array(a) => Some(
            a.iter()
                .map(|e| match e {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
        ),
        other => Some(other.to_string()),
    }
}

/// The value after `prefix` (compared ASCII case-insensitively), if it starts so.
fn strip_prefix<'a>(value: &'a [u8], prefix: &str) -> Option<&'a [u8]> {
    let p = prefix.as_bytes();
    (value.len() >= p.len() && value[..p.len()].eq_ignore_ascii_case(p)).then(|| &value[p.len()..])
}

/// Decodes unpadded base64url (RFC 7515); `None` for anything else.
fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        } as u32)
    }
    let bytes = s.as_bytes();
    if bytes.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c)? << (18 - 6 * i);
        }
        out.push((n >> 16) as u8);
        if chunk.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(n as u8);
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------------
// Background refresh

/// Counts a refused key file or JWKS answer.
fn refused(weak: &Weak<Inner>) {
    if let Some(inner) = weak.upgrade() {
        inner.refusals.fetch_add(1, Ordering::Relaxed);
    }
}

fn store(weak: &Weak<Inner>, i: usize, keys: KeySet) -> bool {
    match weak.upgrade() {
        Some(inner) => {
            if let Some(r) = inner.rules.get(i) {
                r.keys.store(Some(Arc::new(keys)));
            }
            true
        }
        None => false,
    }
}

/// Re-reads a key file when its modification time, size or inode changes, and
/// while it has never been loaded.
async fn watch_file(weak: Weak<Inner>, i: usize, path: String, mut last: Option<FileSig>) {
    let mut reported = false;
    loop {
        tokio::time::sleep(FILE_POLL).await;
        let Some(loaded) = weak
            .upgrade()
            .map(|inner| inner.rules.get(i).is_some_and(|r| r.keys.load().is_some()))
        else {
            return;
        };
        let sig = match tokio::fs::metadata(&path).await {
            Ok(m) => file_sig(&m),
            Err(e) => {
                if !reported {
                    tracing::warn!(%path, error = %e, "JWKS file unreadable; keeping the last good keys");
                    reported = true;
                }
                last = None;
                continue;
            }
        };
        if loaded && last == Some(sig) {
            continue;
        }
        last = Some(sig);
        match tokio::fs::read_to_string(&path)
            .await
            .map_err(|e| e.to_string())
            .and_then(|t| parse_jwks(&t))
        {
            Ok(keys) => {
                reported = false;
                tracing::info!(%path, keys = keys.keys.len(), "JWKS file loaded");
                if !store(&weak, i, keys) {
                    return;
                }
            }
            Err(e) => {
                refused(&weak);
                // Once per change; once in all while nothing was ever loaded.
                if loaded || !reported {
                    tracing::warn!(%path, error = %e, "JWKS file refused; keeping the last good keys");
                    reported = true;
                }
            }
        }
    }
}

/// Fetches a key set now and every `refresh`, retrying sooner after a failure.
async fn poll_uri(
    weak: Weak<Inner>,
    i: usize,
    uri: String,
    ca_file: Option<String>,
    refresh: Duration,
) {
    let refresh = refresh.max(Duration::from_secs(1));
    let mut retry = FIRST_RETRY;
    loop {
        if weak.strong_count() == 0 {
            return;
        }
        let res = fetch_jwks(&uri, ca_file.as_deref())
            .await
            .and_then(|t| parse_jwks(&t));
        let wait = match res {
            Ok(keys) => {
                tracing::debug!(uri = %redact(&uri), keys = keys.keys.len(), "JWKS fetched");
                if !store(&weak, i, keys) {
                    return;
                }
                retry = FIRST_RETRY;
                refresh
            }
            Err(e) => {
                refused(&weak);
                tracing::warn!(uri = %redact(&uri), error = %e, retry_in = ?retry, "JWKS fetch failed; keeping the last good keys");
                let w = retry.min(refresh);
                retry = (retry * 2).min(MAX_RETRY);
                w
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// A URL without user info or query, for logs.
fn redact(uri: &str) -> String {
    match uri.parse::<http::Uri>() {
        Ok(u) => {
            format!(
                "{}://{}{}",
                u.scheme_str().unwrap_or(""),
                u.host().unwrap_or(""),
                u.port().map(|p| format!(":{p}")).unwrap_or_default()
            ) + u.path()
        }
        Err(_) => "(invalid URL)".into(),
    }
}

/// GETs a JWKS over HTTP or HTTPS, within [`FETCH_TIMEOUT`].
async fn fetch_jwks(uri: &str, ca_file: Option<&str>) -> Result<String, String> {
    tokio::time::timeout(FETCH_TIMEOUT, fetch(uri, ca_file))
        .await
        .map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))?
}

async fn fetch(uri: &str, ca_file: Option<&str>) -> Result<String, String> {
    let u: http::Uri = uri.parse().map_err(|e| format!("invalid URL: {e}"))?;
    let https = match u.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("the URL must be http:// or https://".into()),
    };
    let host = u.host().ok_or("the URL has no host")?;
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let port = u.port_u16().unwrap_or(if https { 443 } else { 80 });
    let authority = match u.port_u16() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    };
    let path = u.path_and_query().map_or("/", |p| p.as_str());
    let req = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(
            http::header::ACCEPT,
            "application/json, application/jwk-set+json",
        )
        .header(http::header::USER_AGENT, "sinew-proxy")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let tcp = tokio::net::TcpStream::connect((bare_host, port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    if https {
        let config = tls_config(ca_file).await?;
        let name = rustls::pki_types::ServerName::try_from(bare_host.to_owned())
            .map_err(|e| format!("invalid server name: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        send(TokioIo::new(tls), req).await
    } else {
        send(TokioIo::new(tcp), req).await
    }
}

async fn send<I>(io: I, req: http::Request<Empty<Bytes>>) -> Result<String, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let conn = tokio::spawn(conn);
    let result = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        if resp.status() != http::StatusCode::OK {
            return Err(format!("HTTP status {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?
            .to_bytes();
        String::from_utf8(body.to_vec()).map_err(|_| "the body is not UTF-8".to_owned())
    }
    .await;
    conn.abort();
    result
}

/// TLS client settings trusting `ca_file`, else the system's CA bundle.
async fn tls_config(ca_file: Option<&str>) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let pem = match ca_file {
        Some(path) => tokio::fs::read(path)
            .await
            .map_err(|e| format!("caFile {path}: {e}"))?,
        None => {
            let mut found = None;
            for path in SYSTEM_CA_FILES {
                if let Ok(b) = tokio::fs::read(path).await {
                    found = Some(b);
                    break;
                }
            }
            found.ok_or("no caFile given and no system CA bundle found")?
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("CA certificates: {e}"))?;
        // A bundle may hold certificates rustls cannot use; skip those.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err("no usable CA certificate".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
pub(crate) mod testkeys {
    //! Fixed test keys (generated once with openssl; used only by tests).
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use serde_json::{Value, json};

    /// EC P-256 private key `k1` (PKCS#8).
    pub const K1_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgUwW7dieNq0x2tyZi
TB9MqgBUiiQZLdscqi77QvvivhahRANCAASDnKg0nXdUKypLF0RxeQOIB5tKG4YQ
bm5ORWMOLf/HqLA9eoRx4/3tCZatRVFx+ohP+/2yD4436bqxbCn826IV
-----END PRIVATE KEY-----
";
    /// `k1`'s public point.
    pub const K1_X: &str = "g5yoNJ13VCsqSxdEcXkDiAebShuGEG5uTkVjDi3_x6g";
    /// `k1`'s public point.
    pub const K1_Y: &str = "sD16hHHj_e0Jlq1FUXH6iE_7_bIPjjfpurFsKfzbohU";
    /// EC P-256 private key `k2` (PKCS#8).
    pub const K2_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgp0/4JcXcecg3aDmC
2ydPEQ8cOl8hco/cRHYsIOUNkqOhRANCAAQCGE5dPsrnWBtSSBI1BDDJSzHIH44t
srbW8AHFjJGoa5wsI+yShcpMFMgCHMFUYpfThpkMxhPwL14Jyt73HKgD
-----END PRIVATE KEY-----
";
    /// `k2`'s public point.
    pub const K2_X: &str = "AhhOXT7K51gbUkgSNQQwyUsxyB-OLbK21vABxYyRqGs";
    /// `k2`'s public point.
    pub const K2_Y: &str = "nCwj7JKFykwUyAIcwVRil9OGmQzGE_AvXgnK3vccqAM";

    /// A test CA (valid 2000-2100) ...
    pub const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBbjCCARSgAwIBAgICEAAwCgYIKoZIzj0EAwIwHTEbMBkGA1UEAwwSc2luZXcg
dGVzdCBqd2tzIENBMCAXDTAwMDEwMTAwMDAwMFoYDzIxMDAwMTAxMDAwMDAwWjAd
MRswGQYDVQQDDBJzaW5ldyB0ZXN0IGp3a3MgQ0EwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAATaftTSQw4xScN+8RGiYd1GmLskO2ESQ70VhrLAG4j00QHX6GZ239p2
cohf08/Ev7hwpEBO2zNBG7ipICfATzLio0IwQDAPBgNVHRMBAf8EBTADAQH/MA4G
A1UdDwEB/wQEAwIBBjAdBgNVHQ4EFgQUp5KtAmGUNXVetgwKGqRNDKcmzZUwCgYI
KoZIzj0EAwIDSAAwRQIgNsdxystcb729QlQtOOywgLkwACjhokKkqu7QB/TX7hkC
IQCei2f+5GK9GUVKbKefnFjvsuizKF5jvwU2qfxUXcbrDA==
-----END CERTIFICATE-----
";
    /// ... and a server certificate it signed for `127.0.0.1` and `localhost` ...
    pub const SERVER_CERT_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBtjCCAVygAwIBAgICEAEwCgYIKoZIzj0EAwIwHTEbMBkGA1UEAwwSc2luZXcg
dGVzdCBqd2tzIENBMCAXDTAwMDEwMTAwMDAwMFoYDzIxMDAwMTAxMDAwMDAwWjAU
MRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAATh
6x7dqCzkAJ6TO7+2t0WJebvlqcLLy8EXPhZaHwi0uLSKOUjZnk+M8s79V8yXWxZR
8wZxf6NeOmrsVopBBLABo4GSMIGPMBoGA1UdEQQTMBGHBH8AAAGCCWxvY2FsaG9z
dDAMBgNVHRMBAf8EAjAAMA4GA1UdDwEB/wQEAwIHgDATBgNVHSUEDDAKBggrBgEF
BQcDATAfBgNVHSMEGDAWgBSnkq0CYZQ1dV62DAoapE0MpybNlTAdBgNVHQ4EFgQU
mMLPZdkV45AxR8D3wOMWY+lgPJIwCgYIKoZIzj0EAwIDSAAwRQIgb2c9JpRhTYnt
zjqUo0t+eyC0IgcGRYw2ebn09OH5Fo0CIQD8uhJi2NCjO4vbM49Iy/hpfuN+gDu2
O1LmHvK+QE5Bwg==
-----END CERTIFICATE-----
";
    /// ... with its key.
    pub const SERVER_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg5krMSh5xsrdApX6t
PLe74wcgZMY1Fk2qrOE9bqi8BC2hRANCAATh6x7dqCzkAJ6TO7+2t0WJebvlqcLL
y8EXPhZaHwi0uLSKOUjZnk+M8s79V8yXWxZR8wZxf6NeOmrsVopBBLAB
-----END PRIVATE KEY-----
";

    /// A public JWK for `k1` or `k2`.
    pub fn jwk(kid: &str, x: &str, y: &str) -> Value {
        json!({"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "alg": "ES256", "use": "sig"})
    }

    /// A JWKS of these keys.
    pub fn jwks(keys: &[Value]) -> String {
        json!({ "keys": keys }).to_string()
    }

    /// Unpadded base64url.
    pub fn b64url(data: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let n = (u32::from(chunk[0]) << 16)
                | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
                | u32::from(*chunk.get(2).unwrap_or(&0));
            for i in 0..=chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    /// A token signed with `pem` (ES256) under `kid`.
    pub fn es256(pem: &str, kid: &str, claims: &Value) -> String {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(
            &h,
            claims,
            &jsonwebtoken::EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    /// A token with this header and payload and a made-up signature.
    pub fn handmade(header: &Value, claims: &Value, sig: &[u8]) -> String {
        format!(
            "{}.{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes()),
            b64url(sig)
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::convert::Infallible;
    use std::sync::Mutex;

    use super::testkeys::*;
    use super::*;
    use serde_json::json;
    use sinew_model::compile::{ForwardClaim, TokenLocation};
    use sinew_model::resource::RequiredClaim;

    const ISS: &str = "https://issuer.example";

    fn now() -> SystemTime {
        SystemTime::now()
    }

    fn secs() -> u64 {
        now().duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    fn rule(jwks: JwksSource) -> JwtRuleConfig {
        JwtRuleConfig {
            policy: "shop/users".into(),
            issuer: ISS.into(),
            audiences: vec!["catalog".into()],
            jwks,
            from_headers: vec![TokenLocation {
                header: http::header::AUTHORIZATION,
                prefix: "Bearer ".into(),
            }],
            forward_claims: vec![
                ForwardClaim {
                    claim: "sub".into(),
                    header: HeaderName::from_static("x-jwt-sub"),
                },
                ForwardClaim {
                    claim: "groups".into(),
                    header: HeaderName::from_static("x-jwt-groups"),
                },
            ],
            forward_original_token: false,
            clock_skew: Duration::from_secs(60),
            required_claims: vec![RequiredClaim {
                name: "scope".into(),
                values: vec!["read".into()],
            }],
        }
    }

    fn inline(keys: &[Value]) -> JwksSource {
        JwksSource::Inline {
            jwks: serde_json::from_str(&jwks(keys)).unwrap(),
        }
    }

    fn verifier() -> JwtVerifier {
        JwtVerifier::new(&[rule(inline(&[jwk("k1", K1_X, K1_Y)]))])
    }

    fn claims() -> Value {
        json!({
            "iss": ISS, "sub": "alice", "aud": ["other", "catalog"],
            "exp": secs() + 600, "nbf": secs() - 10, "scope": "read write",
            "groups": ["a", "b"]
        })
    }

    fn with(mut c: Value, key: &str, v: Value) -> Value {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(key);
        } else {
            c[key] = v;
        }
        c
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        h
    }

    fn refused(v: &JwtVerifier, token: &str) -> JwtError {
        match v.verify(&bearer(token), now()) {
            Err(e) => e,
            Ok(t) => panic!("accepted: {t:?}"),
        }
    }

    #[test]
    fn a_valid_token_is_verified_and_its_claims_forwarded() {
        let v = verifier();
        let t = v
            .verify(&bearer(&es256(K1_PEM, "k1", &claims())), now())
            .unwrap()
            .unwrap();
        assert_eq!(t.issuer, ISS);
        assert_eq!(t.subject, "alice");
        assert_eq!(t.principal(), "https://issuer.example/alice");
        assert_eq!(t.claims["scope"], "read write");
        assert_eq!(t.header, http::header::AUTHORIZATION);
        assert_eq!(t.policy, "shop/users");
        assert_eq!(
            t.forward,
            vec![
                (
                    HeaderName::from_static("x-jwt-sub"),
                    HeaderValue::from_static("alice")
                ),
                (
                    HeaderName::from_static("x-jwt-groups"),
                    HeaderValue::from_static("a,b")
                ),
            ]
        );
        // The prefix is case-insensitive; a token without kid tries the fitting keys.
        let mut h = HeaderMap::new();
        let mut header = jsonwebtoken::Header::new(Algorithm::ES256);
        header.kid = None;
        let token = jsonwebtoken::encode(
            &header,
            &claims(),
            &jsonwebtoken::EncodingKey::from_ec_pem(K1_PEM.as_bytes()).unwrap(),
        )
        .unwrap();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("bearer {token}")).unwrap(),
        );
        assert!(v.verify(&h, now()).unwrap().is_some());
    }

    #[test]
    fn no_token_passes_authentication() {
        let v = verifier();
        assert_eq!(v.verify(&HeaderMap::new(), now()), Ok(None));
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Basic YWxpY2U6c2VjcmV0"),
        );
        assert_eq!(v.verify(&h, now()), Ok(None), "not a bearer token");
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer   "),
        );
        assert_eq!(v.verify(&h, now()).unwrap_err().reason, "jwt-malformed");
    }

    #[test]
    fn time_claims_are_checked_with_clock_skew() {
        let v = verifier();
        let t = es256(K1_PEM, "k1", &with(claims(), "exp", json!(secs() - 120)));
        let e = refused(&v, &t);
        assert_eq!(e.reason, "jwt-expired", "{e}");
        let t = es256(K1_PEM, "k1", &with(claims(), "exp", json!(secs() - 30)));
        assert!(v.verify(&bearer(&t), now()).is_ok(), "within the skew");
        let t = es256(K1_PEM, "k1", &with(claims(), "nbf", json!(secs() + 120)));
        assert_eq!(refused(&v, &t).reason, "jwt-not-yet-valid");
        let t = es256(K1_PEM, "k1", &with(claims(), "nbf", json!(secs() + 30)));
        assert!(v.verify(&bearer(&t), now()).is_ok(), "within the skew");
        let t = es256(K1_PEM, "k1", &with(claims(), "exp", Value::Null));
        assert_eq!(refused(&v, &t).reason, "jwt-missing-claim");
        let t = es256(K1_PEM, "k1", &with(claims(), "exp", json!("tomorrow")));
        assert_eq!(refused(&v, &t).reason, "jwt-malformed");
        // GHSA-h395-gr6q-cpjc's token: a far-future nbf as a string never skips the check.
        let t = es256(K1_PEM, "k1", &with(claims(), "nbf", json!("99999999999")));
        assert_eq!(refused(&v, &t).reason, "jwt-malformed");
        // `now` is the caller's: the same token is fine an hour earlier.
        let t = es256(K1_PEM, "k1", &with(claims(), "exp", json!(secs() - 120)));
        let earlier = now() - Duration::from_secs(3600);
        let t2 = es256(
            K1_PEM,
            "k1",
            &with(
                with(claims(), "nbf", Value::Null),
                "exp",
                json!(secs() - 120),
            ),
        );
        assert!(v.verify(&bearer(&t2), earlier).is_ok());
        assert!(
            v.verify(&bearer(&t), earlier).is_err(),
            "nbf is in the future then"
        );
    }

    #[test]
    fn issuer_audience_and_required_claims() {
        let v = verifier();
        let t = es256(
            K1_PEM,
            "k1",
            &with(claims(), "iss", json!("https://evil.example")),
        );
        assert_eq!(refused(&v, &t).reason, "jwt-wrong-issuer");
        let t = es256(K1_PEM, "k1", &with(claims(), "iss", Value::Null));
        assert_eq!(refused(&v, &t).reason, "jwt-wrong-issuer");
        let t = es256(K1_PEM, "k1", &with(claims(), "aud", json!("billing")));
        assert_eq!(refused(&v, &t).reason, "jwt-wrong-audience");
        let t = es256(K1_PEM, "k1", &with(claims(), "aud", Value::Null));
        assert_eq!(refused(&v, &t).reason, "jwt-wrong-audience");
        let t = es256(K1_PEM, "k1", &with(claims(), "aud", json!("catalog")));
        assert!(v.verify(&bearer(&t), now()).is_ok());
        let t = es256(K1_PEM, "k1", &with(claims(), "scope", json!("write")));
        assert_eq!(refused(&v, &t).reason, "jwt-missing-claim");
        let t = es256(K1_PEM, "k1", &with(claims(), "scope", Value::Null));
        assert_eq!(refused(&v, &t).reason, "jwt-missing-claim");
    }

    #[test]
    fn signatures_and_keys() {
        let v = verifier();
        // Signed by another key under k1's kid.
        let t = es256(K2_PEM, "k1", &claims());
        assert_eq!(refused(&v, &t).reason, "jwt-bad-signature");
        // A tampered payload.
        let good = es256(K1_PEM, "k1", &claims());
        let mut parts: Vec<&str> = good.split('.').collect();
        let forged = b64url(with(claims(), "sub", json!("admin")).to_string().as_bytes());
        parts[1] = &forged;
        assert_eq!(refused(&v, &parts.join(".")).reason, "jwt-bad-signature");
        // An unknown kid.
        let t = es256(K2_PEM, "k2", &claims());
        assert_eq!(refused(&v, &t).reason, "jwt-unknown-kid");
    }

    #[test]
    fn eddsa_signatures_verify_with_the_crypto_backend() {
        // RFC 8037's Ed25519 key (appendix A.1): its seed as PKCS#8, its public x.
        let seed = b64url_decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A").unwrap();
        let mut pkcs8 = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        pkcs8.extend(seed);
        let okp = json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"});
        let v = JwtVerifier::new(&[rule(inline(&[okp]))]);
        let mut h = jsonwebtoken::Header::new(Algorithm::EdDSA);
        h.kid = Some("ed".into());
        let key = jsonwebtoken::EncodingKey::from_ed_der(&pkcs8);
        let t = jsonwebtoken::encode(&h, &claims(), &key).unwrap();
        let got = v.verify(&bearer(&t), now()).unwrap().unwrap();
        assert_eq!(got.subject, "alice");
        // One flipped byte of the signature: refused.
        let (head, sig) = t.rsplit_once('.').unwrap();
        let mut sig = b64url_decode(sig).unwrap();
        sig[0] ^= 1;
        let bad = format!("{head}.{}", b64url(&sig));
        assert_eq!(refused(&v, &bad).reason, "jwt-bad-signature");
    }

    #[test]
    fn dangerous_algorithms_are_refused() {
        let v = verifier();
        // alg: none, any spelling.
        for alg in ["none", "None", "NONE"] {
            let t = handmade(&json!({"alg": alg, "typ": "JWT"}), &claims(), b"");
            let e = refused(&v, &t);
            assert_eq!(e.reason, "jwt-alg-none", "{alg}");
        }
        // Algorithm confusion: HS256 "signed" with the public key (as the JWK's bytes,
        // the raw point, or the coordinates).
        let jwk_text = jwk("k1", K1_X, K1_Y).to_string();
        let mut point = vec![4u8];
        point.extend(b64url_decode(K1_X).unwrap());
        point.extend(b64url_decode(K1_Y).unwrap());
        for secret in [jwk_text.as_bytes(), &point, K1_X.as_bytes()] {
            for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
                let mut h = jsonwebtoken::Header::new(alg);
                h.kid = Some("k1".into());
                let t = jsonwebtoken::encode(
                    &h,
                    &claims(),
                    &jsonwebtoken::EncodingKey::from_secret(secret).unwrap(),
                )
                .unwrap();
                let e = refused(&v, &t);
                assert_eq!(e.reason, "jwt-alg-not-allowed", "{alg:?}");
                assert!(e.detail.contains("HMAC"), "{}", e.detail);
            }
        }
        // An algorithm that does not fit the key.
        for alg in ["RS256", "PS256", "ES384", "EdDSA"] {
            let t = handmade(&json!({"alg": alg, "kid": "k1"}), &claims(), b"sig");
            let e = refused(&v, &t);
            assert_eq!(e.reason, "jwt-alg-not-allowed", "{alg}: {e}");
        }
        let t = handmade(&json!({"alg": "XS999", "kid": "k1"}), &claims(), b"sig");
        assert_eq!(refused(&v, &t).reason, "jwt-alg-not-allowed");
        // A key pinned to another alg refuses the token even if the type fits.
        let pinned = JwtVerifier::new(&[rule(inline(&[with(
            jwk("k1", K1_X, K1_Y),
            "alg",
            json!("ES384"),
        )]))]);
        assert!(
            pinned.inner.rules[0].keys.load().is_none(),
            "ES384 on P-256 is skipped"
        );
        // Keys in the token's header are never used.
        let t = handmade(
            &json!({"alg": "ES256", "kid": "evil", "jwk": jwk("evil", K2_X, K2_Y)}),
            &claims(),
            b"sig",
        );
        assert_eq!(refused(&v, &t).reason, "jwt-unknown-kid");
        let t = handmade(
            &json!({"alg": "ES256", "kid": "k1", "crit": ["exp"]}),
            &claims(),
            b"s",
        );
        assert_eq!(refused(&v, &t).reason, "jwt-malformed");
    }

    #[test]
    fn malformed_tokens() {
        let v = verifier();
        for t in [
            "abc",
            "a.b",
            "a.b.c.d.e",
            "!!.??.**",
            "e30.e30.",
            "W10.e30.x",
        ] {
            let e = refused(&v, t);
            assert_eq!(e.reason, "jwt-malformed", "{t}: {e}");
        }
        // Several different tokens.
        let mut h = bearer(&es256(K1_PEM, "k1", &claims()));
        h.append(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!(
                "Bearer {}",
                es256(K1_PEM, "k1", &with(claims(), "sub", json!("bob")))
            ))
            .unwrap(),
        );
        assert_eq!(v.verify(&h, now()).unwrap_err().reason, "jwt-malformed");
    }

    #[test]
    fn token_locations_and_issuers() {
        let mut other = rule(inline(&[jwk("k2", K2_X, K2_Y)]));
        other.issuer = "https://other.example".into();
        other.from_headers = vec![TokenLocation {
            header: HeaderName::from_static("x-token"),
            prefix: String::new(),
        }];
        other.audiences.clear();
        let v = JwtVerifier::new(&[rule(inline(&[jwk("k1", K1_X, K1_Y)])), other]);
        let t2 = es256(
            K2_PEM,
            "k2",
            &with(claims(), "iss", json!("https://other.example")),
        );
        let mut h = HeaderMap::new();
        h.insert("x-token", HeaderValue::from_str(&t2).unwrap());
        let got = v.verify(&h, now()).unwrap().unwrap();
        assert_eq!(got.issuer, "https://other.example");
        assert_eq!(got.header, HeaderName::from_static("x-token"));
        // The other issuer's token in the first rule's header is refused.
        let e = v.verify(&bearer(&t2), now()).unwrap_err();
        assert_eq!(e.reason, "jwt-wrong-issuer");
        assert!(e.detail.contains("in header authorization"), "{e}");
    }

    #[test]
    fn unusable_key_sets() {
        let v = JwtVerifier::new(&[rule(JwksSource::File {
            path: "/nonexistent/sinew/jwks.json".into(),
        })]);
        let t = es256(K1_PEM, "k1", &claims());
        assert_eq!(refused(&v, &t).reason, "jwks-unavailable");
        let u = JwtVerifier::new(&[rule(JwksSource::Uri {
            uri: "http://127.0.0.1:1/jwks".into(),
            ca_file: None,
            refresh: Duration::from_secs(60),
        })]);
        assert_eq!(refused(&u, &t).reason, "jwks-unavailable");
        // Private and symmetric keys are skipped.
        assert!(parse_jwks(&jwks(&[json!({"kty": "oct", "k": "c2VjcmV0", "kid": "h"})])).is_err());
        assert!(parse_jwks(&jwks(&[with(jwk("k1", K1_X, K1_Y), "d", json!("AAAA"))])).is_err());
        let mixed = parse_jwks(&jwks(&[
            json!({"kty": "oct", "k": "c2VjcmV0"}),
            json!({"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}),
            jwk("k1", K1_X, K1_Y),
        ]))
        .unwrap();
        assert_eq!(mixed.keys.len(), 1);
    }

    fn temp_path(name: &str) -> std::path::PathBuf {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        std::env::temp_dir().join(format!("sinew-jwt-{}-{nanos}-{name}", std::process::id()))
    }

    async fn eventually(what: &str, f: impl Fn() -> bool) {
        sinew_testkit::wait::until(what, Duration::from_secs(10), || {
            let ok = f();
            async move { ok }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_file_is_reread_when_it_changes() {
        let path = temp_path("jwks.json");
        std::fs::write(&path, jwks(&[jwk("k1", K1_X, K1_Y)])).unwrap();
        let v = JwtVerifier::new(&[rule(JwksSource::File {
            path: path.display().to_string(),
        })]);
        v.spawn_refresh(&tokio::runtime::Handle::current());
        let t1 = bearer(&es256(K1_PEM, "k1", &claims()));
        let t2 = bearer(&es256(K2_PEM, "k2", &claims()));
        assert!(v.verify(&t1, now()).is_ok());
        assert_eq!(v.verify(&t2, now()).unwrap_err().reason, "jwt-unknown-kid");
        // Rotate: write + rename, as operators should.
        let tmp = temp_path("jwks.tmp");
        std::fs::write(
            &tmp,
            jwks(&[jwk("k2", K2_X, K2_Y), jwk("k1-old", K1_X, K1_Y)]),
        )
        .unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        eventually("the rotated key", || v.verify(&t2, now()).is_ok()).await;
        assert_eq!(v.verify(&t1, now()).unwrap_err().reason, "jwt-unknown-kid");
        // A broken file keeps the last good keys.
        let refused = v.refusals();
        std::fs::write(&path, "{not json").unwrap();
        eventually("the broken file read", || v.refusals() > refused).await;
        assert!(v.verify(&t2, now()).is_ok());
        let _ = std::fs::remove_file(&path);
    }

    /// A JWKS server on loopback, plain or TLS, serving whatever `body` holds.
    async fn serve_jwks(
        body: Arc<Mutex<String>>,
        hits: Arc<std::sync::atomic::AtomicUsize>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let body = body.clone();
                let hits = hits.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let body = body.clone();
                            hits.fetch_add(1, Ordering::SeqCst);
                            async move {
                                let text = body.lock().unwrap().clone();
                                let status = if req.uri().path() == "/jwks" {
                                    200
                                } else {
                                    404
                                };
                                Ok::<_, Infallible>(
                                    http::Response::builder()
                                        .status(status)
                                        .body(http_body_util::Full::new(Bytes::from(text)))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(tcp), svc).await;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jwks_over_http_is_refreshed_and_survives_failures() {
        let body = Arc::new(Mutex::new(jwks(&[jwk("k1", K1_X, K1_Y)])));
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let addr = serve_jwks(body.clone(), hits.clone(), None).await;
        let v = JwtVerifier::new(&[rule(JwksSource::Uri {
            uri: format!("http://{addr}/jwks"),
            ca_file: None,
            refresh: Duration::from_secs(1),
        })]);
        let t1 = bearer(&es256(K1_PEM, "k1", &claims()));
        let t2 = bearer(&es256(K2_PEM, "k2", &claims()));
        assert_eq!(v.verify(&t1, now()).unwrap_err().reason, "jwks-unavailable");
        assert!(v.refresh_now().await.is_empty());
        assert!(v.verify(&t1, now()).is_ok());
        let tasks = v.spawn_refresh(&tokio::runtime::Handle::current());
        assert_eq!(tasks.len(), 1);
        // A broken answer keeps the last good set.
        *body.lock().unwrap() = "oops".into();
        let seen = hits.load(Ordering::SeqCst);
        eventually("a refresh", || hits.load(Ordering::SeqCst) > seen + 1).await;
        assert!(v.verify(&t1, now()).is_ok());
        // Rotation is picked up.
        *body.lock().unwrap() = jwks(&[jwk("k2", K2_X, K2_Y)]);
        eventually("the rotated key", || v.verify(&t2, now()).is_ok()).await;
        assert_eq!(v.verify(&t1, now()).unwrap_err().reason, "jwt-unknown-kid");
        // Dropping the verifier stops the task (within one refresh period).
        drop(v);
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("the refresh task stopped")
                .unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jwks_over_https_trusts_the_ca_file_only() {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(SERVER_CERT_PEM.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(SERVER_KEY_PEM.as_bytes()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let body = Arc::new(Mutex::new(jwks(&[jwk("k1", K1_X, K1_Y)])));
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let addr = serve_jwks(body, hits, Some(acceptor)).await;
        let ca = temp_path("ca.pem");
        std::fs::write(&ca, CA_PEM).unwrap();
        let with_ca = JwtVerifier::new(&[rule(JwksSource::Uri {
            uri: format!("https://127.0.0.1:{}/jwks", addr.port()),
            ca_file: Some(ca.display().to_string()),
            refresh: Duration::from_secs(60),
        })]);
        assert_eq!(with_ca.refresh_now().await, Vec::<String>::new());
        let t1 = bearer(&es256(K1_PEM, "k1", &claims()));
        assert!(with_ca.verify(&t1, now()).is_ok());
        // Without the CA (system roots, or none), the server is not trusted.
        let without = JwtVerifier::new(&[rule(JwksSource::Uri {
            uri: format!("https://127.0.0.1:{}/jwks", addr.port()),
            ca_file: None,
            refresh: Duration::from_secs(60),
        })]);
        let problems = without.refresh_now().await;
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            without.verify(&t1, now()).unwrap_err().reason,
            "jwks-unavailable"
        );
        let _ = std::fs::remove_file(&ca);
    }

    #[test]
    fn base64url() {
        for data in [
            &b""[..],
            b"f",
            b"fo",
            b"foo",
            b"foob",
            b"fooba",
            b"foobar",
            &[0xff, 0xfe, 0x00],
        ] {
            assert_eq!(b64url_decode(&b64url(data)).unwrap(), data);
        }
        assert!(b64url_decode("a").is_none());
        assert!(b64url_decode("a+b/").is_none(), "standard alphabet refused");
        assert!(b64url_decode("YQ==").is_none(), "padding refused");
    }

    #[test]
    fn same_rules_detects_changes() {
        let r = rule(inline(&[jwk("k1", K1_X, K1_Y)]));
        let v = JwtVerifier::new(std::slice::from_ref(&r));
        assert!(v.same_rules(std::slice::from_ref(&r)));
        let mut r2 = r.clone();
        r2.audiences.push("x".into());
        assert!(!v.same_rules(&[r2]));
        assert!(!v.same_rules(&[]));
        assert!(JwtVerifier::new(&[]).is_empty());
    }
}
