//! A token's signature, checked with its rule's keys, then its claims.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderName, HeaderValue};
use jsonwebtoken::{Algorithm, Validation};
use serde_json::Value;
use sinew_model::authz::{claim, claim_matches};
use sinew_model::compile::JwtRuleConfig;

use crate::jwt::keys::Key;
use crate::jwt::{JwtError, RuleState, VerifiedToken};

/// Checks the signature with the rule's keys, then the claims.
pub(in crate::jwt) fn verify_with(
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
