//! Fixed test keys and certificates (generated once with openssl; used only by tests).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};

// The signing keys are the shared test keys (`sinew_testkit::jwt`), named as these
// tests have always named them.
use sinew_testkit::jwt::{K1, K2};

/// EC P-256 private key `k1` (PKCS#8).
pub const K1_PEM: &str = K1.pem;
/// `k1`'s public point.
pub const K1_X: &str = K1.x;
/// `k1`'s public point.
pub const K1_Y: &str = K1.y;
/// EC P-256 private key `k2` (PKCS#8).
pub const K2_PEM: &str = K2.pem;
/// `k2`'s public point.
pub const K2_X: &str = K2.x;
/// `k2`'s public point.
pub const K2_Y: &str = K2.y;

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
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
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
