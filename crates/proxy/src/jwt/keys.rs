//! Key sets: a JWKS document parsed into the public signature keys it holds.

use std::str::FromStr;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

/// Which key types fit which algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyKind {
    EcP256,
    EcP384,
    Rsa,
    Ed25519,
}

impl KeyKind {
    pub(super) fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        matches!(
            (self, alg),
            (KeyKind::EcP256, ES256)
                | (KeyKind::EcP384, ES384)
                | (KeyKind::Rsa, RS256 | RS384 | RS512 | PS256 | PS384 | PS512)
                | (KeyKind::Ed25519, EdDSA)
        )
    }

    pub(super) fn name(self) -> &'static str {
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
pub(super) struct Key {
    pub(super) kid: Option<String>,
    pub(super) alg: Option<Algorithm>,
    pub(super) kind: KeyKind,
    pub(super) key: DecodingKey,
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
    pub(super) fn fits(&self, alg: Algorithm) -> bool {
        self.alg.is_none_or(|a| a == alg) && self.kind.fits(alg)
    }

    pub(super) fn describe(&self) -> String {
        let kid = self.kid.as_deref().unwrap_or("(no kid)");
        match self.alg {
            Some(a) => format!("key {kid} ({}, alg {a:?})", self.kind.name()),
            None => format!("key {kid} ({})", self.kind.name()),
        }
    }
}

/// A parsed key set.
#[derive(Debug, Clone)]
pub(super) struct KeySet {
    pub(super) keys: Vec<Key>,
}

/// Parses a JWKS, keeping the public signature keys it can use. Private members,
/// symmetric keys, encryption keys and unsupported curves are skipped.
pub(super) fn parse_jwks(text: &str) -> Result<KeySet, String> {
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
