//! JWTs for tests: two fixed EC P-256 signing keys, their JWKS, and signing.
//!
//! The keys are public test keys (made once with openssl), so a failing test can be
//! replayed with the same tokens; they protect nothing.
//!
//! ```
//! use sinew_testkit::jwt::{K1, K2, jwks};
//! let keys = jwks(&[&K1]); // what a RequestAuthentication trusts
//! let good = K1.sign(&serde_json::json!({"iss": "https://issuer.test", "sub": "alice"})).unwrap();
//! let forged = K2.sign(&serde_json::json!({"iss": "https://issuer.test", "sub": "alice"})).unwrap();
//! assert!(keys.contains("\"kid\":\"k1\"") && good != forged);
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use crate::BoxError;

/// A signing key and its public point.
#[derive(Debug, Clone, Copy)]
pub struct TestKey {
    /// The key id (`kid`) tokens and the JWKS carry.
    pub kid: &'static str,
    /// The private key, PKCS#8 PEM.
    pub pem: &'static str,
    /// The public point's x, base64url.
    pub x: &'static str,
    /// The public point's y, base64url.
    pub y: &'static str,
}

/// Test key `k1`.
pub const K1: TestKey = TestKey {
    kid: "k1",
    pem: "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgUwW7dieNq0x2tyZi
TB9MqgBUiiQZLdscqi77QvvivhahRANCAASDnKg0nXdUKypLF0RxeQOIB5tKG4YQ
bm5ORWMOLf/HqLA9eoRx4/3tCZatRVFx+ohP+/2yD4436bqxbCn826IV
-----END PRIVATE KEY-----
",
    x: "g5yoNJ13VCsqSxdEcXkDiAebShuGEG5uTkVjDi3_x6g",
    y: "sD16hHHj_e0Jlq1FUXH6iE_7_bIPjjfpurFsKfzbohU",
};

/// Test key `k2`.
pub const K2: TestKey = TestKey {
    kid: "k2",
    pem: "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgp0/4JcXcecg3aDmC
2ydPEQ8cOl8hco/cRHYsIOUNkqOhRANCAAQCGE5dPsrnWBtSSBI1BDDJSzHIH44t
srbW8AHFjJGoa5wsI+yShcpMFMgCHMFUYpfThpkMxhPwL14Jyt73HKgD
-----END PRIVATE KEY-----
",
    x: "AhhOXT7K51gbUkgSNQQwyUsxyB-OLbK21vABxYyRqGs",
    y: "nCwj7JKFykwUyAIcwVRil9OGmQzGE_AvXgnK3vccqAM",
};

impl TestKey {
    /// The public key as a JWK (JSON).
    pub fn jwk(&self) -> serde_json::Value {
        serde_json::json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig",
            "kid": self.kid, "x": self.x, "y": self.y,
        })
    }

    /// An ES256 token of `claims`, with this key's `kid`.
    pub fn sign(&self, claims: &serde_json::Value) -> Result<String, BoxError> {
        self.sign_as(self.kid, claims)
    }

    /// An ES256 token of `claims` signed with this key but naming `kid` (a forgery
    /// when `kid` is another key's).
    pub fn sign_as(&self, kid: &str, claims: &serde_json::Value) -> Result<String, BoxError> {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        let key = jsonwebtoken::EncodingKey::from_ec_pem(self.pem.as_bytes())?;
        Ok(jsonwebtoken::encode(&header, claims, &key)?)
    }
}

/// The JWKS JSON of `keys` (public parts only), as a `jwks.inline` takes it.
pub fn jwks(keys: &[&TestKey]) -> String {
    let keys: Vec<_> = keys.iter().map(|k| k.jwk()).collect();
    serde_json::json!({ "keys": keys }).to_string()
}

/// Claims for `sub` from `iss` for `aud`, issued now and valid for `ttl_secs`
/// (negative: expired that long ago).
pub fn claims(iss: &str, sub: &str, aud: &str, ttl_secs: i64) -> serde_json::Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    serde_json::json!({"iss": iss, "sub": sub, "aud": aud, "iat": now, "exp": now + ttl_secs})
}
