//! The token in a request: where it is found, and what its header and payload say
//! before any key is used (the algorithm, the key id, the issuer).

pub(super) mod verify;

use std::str::FromStr;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use http::{HeaderMap, HeaderName};
use jsonwebtoken::Algorithm;
use serde_json::Value;

use super::{JwtError, RuleState};

/// A token found in the request headers.
pub(super) struct Found {
    /// The token, trimmed.
    pub(super) token: String,
    /// The header it came in.
    pub(super) header: HeaderName,
    /// The rules (by index) whose locations it was found at.
    pub(super) located: Vec<usize>,
}

/// Finds the request's token at the rules' locations. `Ok(None)`: there is none.
/// `Err`: an empty token, one that is not text, or several different tokens.
pub(super) fn locate(rules: &[RuleState], headers: &HeaderMap) -> Result<Option<Found>, JwtError> {
    let mut token: Option<(String, HeaderName)> = None;
    let mut located: Vec<usize> = Vec::new();
    for (i, r) in rules.iter().enumerate() {
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
    Ok(token.map(|(token, header)| Found {
        token,
        header,
        located,
    }))
}

/// What a token says about itself, read before its signature is checked: only to
/// refuse dangerous algorithms early and to pick the rule and the key.
pub(super) struct Unverified {
    /// `alg`: neither `none` nor HMAC.
    pub(super) alg: Algorithm,
    /// The decoded header; its `kid` is a string or absent.
    head: Value,
    /// The decoded payload; its `iss` is a string.
    payload: Value,
}

impl Unverified {
    /// Reads the header (the algorithm, before anything else) and the payload's
    /// issuer. Errors in the order a token is read: shape, header, alg, crit, kid,
    /// payload, iss.
    pub(super) fn read(token: &str) -> Result<Unverified, JwtError> {
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
        let alg = header_alg(&head)?;
        if head.get("crit").is_some() {
            return Err(JwtError::new(
                "jwt-malformed",
                "critical header extensions (crit) are not supported",
            ));
        }
        if !matches!(head.get("kid"), None | Some(Value::String(_))) {
            return Err(JwtError::new("jwt-malformed", "kid is not a string"));
        }
        // The issuer picks the rule (read unverified; the signature covers it later).
        let payload: Value = b64url_decode(p64)
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(Value::is_object)
            .ok_or_else(|| JwtError::new("jwt-malformed", "the payload is not base64url JSON"))?;
        match payload.get("iss") {
            Some(Value::String(_)) => {}
            Some(_) => return Err(JwtError::new("jwt-malformed", "iss is not a string")),
            None => {
                return Err(JwtError::new(
                    "jwt-wrong-issuer",
                    "the token has no iss claim",
                ));
            }
        }
        Ok(Unverified { alg, head, payload })
    }

    /// `kid`, if the header has one.
    pub(super) fn kid(&self) -> Option<&str> {
        self.head.get("kid").and_then(Value::as_str)
    }

    /// `iss` (checked present by [`read`](Self::read)).
    pub(super) fn iss(&self) -> &str {
        self.payload
            .get("iss")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
}

/// The header's `alg`, refusing `none` and HMAC before anything else.
fn header_alg(head: &Value) -> Result<Algorithm, JwtError> {
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
    Ok(alg)
}

/// The value after `prefix` (compared ASCII case-insensitively), if it starts so.
fn strip_prefix<'a>(value: &'a [u8], prefix: &str) -> Option<&'a [u8]> {
    let p = prefix.as_bytes();
    (value.len() >= p.len() && value[..p.len()].eq_ignore_ascii_case(p)).then(|| &value[p.len()..])
}

/// Unpadded base64url (RFC 7515 §2), as the old hand-written decoder read it:
/// padding refused, and non-canonical trailing bits accepted (`decode_allow_trailing_bits`).
/// Accepting them here only keeps the reasons of early refusals (`jwt-alg-none`,
/// `jwt-unknown-kid`, ...) as they were: jsonwebtoken decodes the whole token again
/// with a strict engine before anything is accepted.
const B64URL: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(true),
);

/// Decodes unpadded base64url (RFC 7515); `None` for anything else.
pub(super) fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    B64URL.decode(s).ok()
}
