#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use jsonwebtoken::Algorithm;

use super::keys::parse_jwks;
use super::testkeys::*;
use super::token::b64url_decode;
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
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
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
        uri: "http://127.0.0.1:1/jwks".parse().unwrap(),
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
    .unwrap();
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
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let body = body.clone();
                        hits.fetch_add(1, Ordering::SeqCst);
                        async move {
                            let text = body.lock().unwrap().clone();
                            // `/moved` redirects to `/jwks`, `/big` is over the size cap.
                            let (status, text) = match req.uri().path() {
                                "/jwks" => (200, text),
                                "/moved" => (302, text),
                                "/big" => (200, " ".repeat((1 << 20) + 1)),
                                _ => (404, text),
                            };
                            Ok::<_, Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .header(http::header::LOCATION, "/jwks")
                                    .body(http_body_util::Full::new(Bytes::from(text)))
                                    .unwrap(),
                            )
                        }
                    });
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
        uri: format!("http://{addr}/jwks").parse().unwrap(),
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

/// TLS for [`serve_jwks`]: the test server certificate, signed by the test CA.
fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
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
    tokio_rustls::TlsAcceptor::from(Arc::new(server))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_over_https_trusts_the_ca_file_only() {
    let acceptor = tls_acceptor();
    let body = Arc::new(Mutex::new(jwks(&[jwk("k1", K1_X, K1_Y)])));
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let addr = serve_jwks(body, hits, Some(acceptor)).await;
    let ca = temp_path("ca.pem");
    std::fs::write(&ca, CA_PEM).unwrap();
    let with_ca = JwtVerifier::new(&[rule(JwksSource::Uri {
        uri: format!("https://127.0.0.1:{}/jwks", addr.port())
            .parse()
            .unwrap(),
        ca_file: Some(ca.display().to_string()),
        refresh: Duration::from_secs(60),
    })]);
    assert_eq!(with_ca.refresh_now().await, Vec::<String>::new());
    let t1 = bearer(&es256(K1_PEM, "k1", &claims()));
    assert!(with_ca.verify(&t1, now()).is_ok());
    // Without the CA (system roots, or none), the server is not trusted.
    let without = JwtVerifier::new(&[rule(JwksSource::Uri {
        uri: format!("https://127.0.0.1:{}/jwks", addr.port())
            .parse()
            .unwrap(),
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

/// Each failed fetch says why, in the verifier's problems; nothing is followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_fetch_failures_say_why() {
    let body = Arc::new(Mutex::new(jwks(&[jwk("k1", K1_X, K1_Y)])));
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let plain = serve_jwks(body.clone(), hits.clone(), None).await;
    let tls = serve_jwks(body, hits, Some(tls_acceptor())).await;
    let problem = |uri: String| async move {
        let v = JwtVerifier::new(&[rule(JwksSource::Uri {
            uri: uri.parse().unwrap(),
            ca_file: None,
            refresh: Duration::from_secs(60),
        })]);
        let mut problems = v.refresh_now().await;
        assert_eq!(problems.len(), 1, "{problems:?}");
        problems.remove(0)
    };
    let p = problem(format!("http://{plain}/moved")).await;
    assert!(
        p.ends_with(": HTTP status 302 Found"),
        "redirects are not followed: {p}"
    );
    let p = problem(format!("http://{plain}/missing")).await;
    assert!(p.ends_with(": HTTP status 404 Not Found"), "{p}");
    let p = problem(format!("http://{plain}/big")).await;
    assert!(
        p.contains(": reading the body: length limit exceeded"),
        "{p}"
    );
    let p = problem("http://127.0.0.1:1/jwks".into()).await;
    assert!(p.contains(": connect: "), "{p}");
    let p = problem(format!("https://127.0.0.1:{}/jwks", tls.port())).await;
    assert!(p.contains(": TLS: invalid peer certificate"), "{p}");
    let p = problem("ftp://issuer.example/jwks".into()).await;
    assert!(p.ends_with(": the URL must be http:// or https://"), "{p}");
    // A caFile that cannot be read is named.
    let v = JwtVerifier::new(&[rule(JwksSource::Uri {
        uri: format!("https://127.0.0.1:{}/jwks", tls.port())
            .parse()
            .unwrap(),
        ca_file: Some("/nonexistent/sinew/ca.pem".into()),
        refresh: Duration::from_secs(60),
    })]);
    let problems = v.refresh_now().await;
    assert!(
        problems.len() == 1 && problems[0].contains("caFile /nonexistent/sinew/ca.pem: "),
        "{problems:?}"
    );
}

/// Set (with `SSL_CERT_FILE`) in the process that
/// `jwks_over_https_without_a_ca_file_trusts_the_system_cas` starts.
const SYSTEM_CA_CHILD: &str = "SINEW_JWT_TEST_SYSTEM_CA_CHILD";

/// Without a caFile, the system's CAs are trusted. rustls-native-certs reads
/// `SSL_CERT_FILE` first, so the test runs itself again with it naming the test CA:
/// setting it in this process would race the other tests' threads.
#[test]
fn jwks_over_https_without_a_ca_file_trusts_the_system_cas() {
    if std::env::var_os(SYSTEM_CA_CHILD).is_some() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let body = Arc::new(Mutex::new(jwks(&[jwk("k1", K1_X, K1_Y)])));
            let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let addr = serve_jwks(body, hits, Some(tls_acceptor())).await;
            let v = JwtVerifier::new(&[rule(JwksSource::Uri {
                uri: format!("https://localhost:{}/jwks", addr.port())
                    .parse()
                    .unwrap(),
                ca_file: None,
                refresh: Duration::from_secs(60),
            })]);
            assert_eq!(v.refresh_now().await, Vec::<String>::new());
            let t1 = bearer(&es256(K1_PEM, "k1", &claims()));
            assert!(v.verify(&t1, now()).is_ok());
        });
        println!("system CAs trusted");
        return;
    }
    let ca = temp_path("system-ca.pem");
    std::fs::write(&ca, CA_PEM).unwrap();
    let name = "jwt::tests::jwks_over_https_without_a_ca_file_trusts_the_system_cas";
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env("SSL_CERT_FILE", &ca)
        .env_remove("SSL_CERT_DIR")
        .env(SYSTEM_CA_CHILD, "1")
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&ca);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("system CAs trusted"),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
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
    // Non-canonical trailing bits are read as the hand-written decoder read them
    // (jsonwebtoken refuses such a token later, strictly).
    assert_eq!(b64url_decode("YR").unwrap(), b"a");
    assert!(b64url_decode("YQ=").is_none(), "padding refused");
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
