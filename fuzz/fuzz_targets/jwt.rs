//! JWT verification (`RequestAuthentication`): what a request's `Authorization`
//! header and an issuer's JWKS document (inline, a file, or fetched) do to the
//! inbound's verifier.
//!
//! The first byte picks the input's role: even, a token (the rest, as the header's
//! value after `Bearer `) checked by a verifier holding one known P-256 key; odd,
//! a JWKS (the rest) that a verifier is built from, then asked to check a token
//! signed by that known key. Properties: a token is accepted only for the rule's
//! issuer and with the claims the rule requires.
#![no_main]

use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};
use sinew_model::compile::{ForwardClaim, JwksSource, JwtRuleConfig, TokenLocation};
use sinew_model::resource::RequiredClaim;
use sinew_proxy::jwt::JwtVerifier;

const ISS: &str = "https://issuer.example";
/// The known key `k1` (the proxy's tests' `K1`), public half.
const K1_X: &str = "g5yoNJ13VCsqSxdEcXkDiAebShuGEG5uTkVjDi3_x6g";
const K1_Y: &str = "sD16hHHj_e0Jlq1FUXH6iE_7_bIPjjfpurFsKfzbohU";
/// A token signed by `k1` (ES256, kid `k1`): iss ISS, aud `catalog`, scope `read`,
/// exp 2000000000 (made by fuzz/seeds.py, as are the seeds in fuzz/corpus/jwt).
const K1_TOKEN: &str = include_str!("jwt_k1_token.txt");

/// A fixed clock: the seeds stay valid, and runs repeat.
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn rule(jwks: Value) -> JwtRuleConfig {
    JwtRuleConfig {
        policy: "shop/users".into(),
        issuer: ISS.into(),
        audiences: vec!["catalog".into()],
        jwks: JwksSource::Inline { jwks },
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

static KNOWN: LazyLock<JwtVerifier> = LazyLock::new(|| {
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "x": K1_X, "y": K1_Y,
        "kid": "k1", "alg": "ES256", "use": "sig"}]});
    JwtVerifier::new(&[rule(jwks)])
});

fn check(v: &JwtVerifier, value: &[u8]) {
    let Ok(value) = HeaderValue::from_bytes(value) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, value);
    if let Ok(Some(t)) = v.verify(&headers, now()) {
        assert_eq!(t.issuer, ISS);
        assert!(
            sinew_model::authz::claim_matches(&t.claims, "scope", &["read".into()]),
            "accepted without the required scope: {:?}",
            t.claims
        );
        let exp = t.claims.get("exp").and_then(Value::as_f64);
        assert!(
            exp.is_some_and(|e| e + 60.0 >= 1_800_000_000.0),
            "accepted an expired token: {:?}",
            t.claims
        );
        let aud = &t.claims["aud"];
        assert!(
            aud == "catalog"
                || aud
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == "catalog")),
            "accepted for another audience: {:?}",
            t.claims
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let mut value = b"Bearer ".to_vec();
        value.extend_from_slice(rest);
        check(&KNOWN, &value);
    } else {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        // What the model accepts as an inline JWKS, and what the proxy makes of it.
        let _ = sinew_model::authz::public_jwks(text);
        let Ok(jwks) = serde_json::from_str::<Value>(text) else {
            return;
        };
        let v = JwtVerifier::new(&[rule(jwks)]);
        check(&v, format!("Bearer {}", K1_TOKEN.trim()).as_bytes());
    }
});
