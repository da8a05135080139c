//! The webhook's HTTPS server on loopback, with a real TLS client: answers, refusals of
//! malformed requests, and certificate files re-read when they change.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use sinew_inject::InjectConfig;
use sinew_inject::cert::generate;
use sinew_inject::server::{CertSource, Webhook, WebhookOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.1 request over TLS, trusting `ca_pem`; returns (status, body) or the
/// TLS error.
async fn call(
    addr: SocketAddr,
    ca_pem: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(u16, Vec<u8>), String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: webhook\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(body).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP status in {text:?}"))?;
    let at = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    Ok((status, out[at..].to_vec()))
}

fn names() -> Vec<String> {
    vec!["127.0.0.1".to_owned()]
}

fn review(object: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "abc", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE", "namespace": "shop", "object": object,
        }
    }))
    .unwrap()
}

#[tokio::test]
async fn answers_reviews_and_refuses_what_it_cannot_read() {
    let certs = generate(&names(), Duration::from_secs(3600)).unwrap();
    let hook = Webhook::start(WebhookOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        cert: CertSource::Pem {
            cert: certs.cert_pem.clone(),
            key: certs.key_pem.clone(),
        },
        config: InjectConfig::default(),
        cert_check: Duration::from_secs(10),
    })
    .await
    .unwrap();
    let addr = hook.local_addr();
    let ca = &certs.ca_pem;

    let (status, body) = call(addr, ca, "GET", "/healthz", b"").await.unwrap();
    assert_eq!((status, body.as_slice()), (200, &b"ok\n"[..]));

    let pod = json!({"metadata": {"name": "web"}, "spec": {"containers": [{"name": "app"}]}});
    let (status, body) = call(addr, ca, "POST", "/mutate", &review(pod))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["response"]["uid"], "abc");
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["patchType"], "JSONPatch");

    let (status, body) = call(addr, ca, "POST", "/mutate", b"{not json")
        .await
        .unwrap();
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("bad AdmissionReview"));
    let huge = vec![b' '; 5 << 20];
    let (status, _) = call(addr, ca, "POST", "/mutate", &huge).await.unwrap();
    assert_eq!(status, 400);
    let (status, _) = call(addr, ca, "GET", "/mutate", b"").await.unwrap();
    assert_eq!(status, 405);
    let (status, _) = call(addr, ca, "POST", "/other", b"").await.unwrap();
    assert_eq!(status, 404);

    // A client trusting another CA is refused at the handshake.
    let other = generate(&names(), Duration::from_secs(3600)).unwrap();
    assert!(
        call(addr, &other.ca_pem, "GET", "/healthz", b"")
            .await
            .is_err()
    );
    hook.shutdown().await;
}

#[tokio::test]
async fn certificate_files_are_reread_when_they_change() {
    let dir = std::env::temp_dir().join(format!("sinew-webhook-certs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let first = generate(&names(), Duration::from_secs(3600)).unwrap();
    std::fs::write(&cert, &first.cert_pem).unwrap();
    std::fs::write(&key, &first.key_pem).unwrap();
    let hook = Webhook::start(WebhookOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        cert: CertSource::Files {
            cert: cert.clone(),
            key: key.clone(),
        },
        config: InjectConfig::default(),
        cert_check: Duration::from_millis(20),
    })
    .await
    .unwrap();
    let addr = hook.local_addr();
    assert_eq!(
        call(addr, &first.ca_pem, "GET", "/healthz", b"")
            .await
            .unwrap()
            .0,
        200
    );

    // A half-written update (a key that does not parse) keeps the old certificate.
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\ngarbage\n").unwrap();
    let second = generate(&names(), Duration::from_secs(3600)).unwrap();
    std::fs::write(&cert, &second.cert_pem).unwrap();
    // The renewed pair: served from then on, with no restart.
    std::fs::write(&key, &second.key_pem).unwrap();
    let ca = second.ca_pem.clone();
    sinew_testkit::wait::until(
        "the renewed certificate is served",
        Duration::from_secs(10),
        || {
            let ca = ca.clone();
            async move { call(addr, &ca, "GET", "/healthz", b"").await.is_ok() }
        },
    )
    .await
    .unwrap();
    assert!(
        call(addr, &first.ca_pem, "GET", "/healthz", b"")
            .await
            .is_err()
    );
    hook.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();

    // A missing file at start is an error naming it.
    let err = Webhook::start(WebhookOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        cert: CertSource::Files {
            cert: dir.join("nope.crt"),
            key,
        },
        config: InjectConfig::default(),
        cert_check: Duration::from_secs(10),
    })
    .await
    .err()
    .unwrap();
    assert!(err.contains("nope.crt: cannot read"), "{err}");
}
