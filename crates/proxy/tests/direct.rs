//! Proxies in process, no file and no control plane: each starts from documents
//! compiled in the test (typed builders) with an identity its test issued from its
//! own CA. mTLS between sidecars, authorization by SPIFFE id and JWT verification,
//! against real HTTP backends (like ztunnel's `tests/direct.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use sinew_proxy::Proxy;
use sinew_testkit::client::{self, empty};
use sinew_testkit::http::HttpBackend;
use sinew_testkit::jwt::{self, K1, K2};
use sinew_testkit::mesh::{
    self, AuthorizationPolicy, Mesh, RequestAuthentication, Service, Workload,
};
use sinew_tls::{Ca, CertStore, SpiffeId};
use support::*;

/// The SPIFFE id of service account `sa` in `shop` (the default trust domain).
fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/shop/sa/{sa}")
}

/// A workload identity for service account `sa`, issued by `ca`.
fn identity(ca: &Ca, sa: &str) -> Arc<CertStore> {
    let id = SpiffeId::workload("cluster.local", "shop", sa);
    assert_eq!(id.to_string(), spiffe(sa));
    let (key, issued) = ca.issue(&id, Duration::from_secs(3600)).unwrap();
    CertStore::with_identity(&key, &issued.chain_pem, &ca.roots_pem()).unwrap()
}

fn test_ca() -> Ca {
    Ca::generate("cluster.local", Duration::from_secs(24 * 3600)).unwrap()
}

/// Starts the proxy `name` of `mesh` with `identity` and waits until it is ready.
async fn start_proxy(mesh: &Mesh, name: &str, identity: Arc<CertStore>) -> Proxy {
    let opts = Proxy::builder()
        .documents(&mesh.yaml(), name)
        .identity(identity)
        .drain_timeout(Duration::from_secs(10))
        .into_options()
        .unwrap();
    start_with(opts).await
}

/// The service `catalog` behind its sidecar (`catalog-1`, service account
/// `catalog`) in front of `app`, and one client sidecar per caller service account,
/// each with an outbound binding to `catalog`.
struct Mesh2 {
    server: Proxy,
    inbound: SocketAddr,
    /// (service account, proxy, its binding to `catalog`).
    clients: Vec<(String, Proxy, SocketAddr)>,
}

impl Mesh2 {
    fn bind(&self, sa: &str) -> SocketAddr {
        self.clients.iter().find(|c| c.0 == sa).unwrap().2
    }

    async fn shutdown(self) {
        for (_, p, _) in self.clients {
            p.shutdown().await;
        }
        self.server.shutdown().await;
    }
}

/// The mesh's documents: the server's and `callers`' proxies, the service, and
/// `extra` (policies).
fn documents(
    app: SocketAddr,
    inbound: SocketAddr,
    callers: &[(&str, SocketAddr)],
    extra: Vec<serde_json::Value>,
) -> Mesh {
    let mut m = Mesh::new("shop");
    m.add(
        mesh::Proxy::new("catalog-1")
            .inbound(inbound, &[app.port()])
            .workload("catalog-1"),
    )
    .add(Service::http("catalog"))
    .add(
        Workload::new("catalog-1", "catalog", app)
            .sidecar(inbound.port())
            .service_account("catalog"),
    );
    for (sa, bind) in callers {
        m.add(mesh::Proxy::new(sa).upstream(*bind, "catalog"));
    }
    for d in extra {
        m.add(d);
    }
    m
}

/// Starts the server sidecar and one client sidecar per `(service account, CA)`.
async fn mesh2(
    app: SocketAddr,
    ca: &Ca,
    callers: &[(&str, &Ca)],
    extra: Vec<serde_json::Value>,
) -> Mesh2 {
    let inbound = free_addr();
    let binds: Vec<(&str, SocketAddr)> = callers.iter().map(|(sa, _)| (*sa, free_addr())).collect();
    let docs = documents(app, inbound, &binds, extra);
    let server = start_proxy(&docs, "catalog-1", identity(ca, "catalog")).await;
    let mut clients = Vec::new();
    for ((sa, ca), (_, bind)) in callers.iter().zip(&binds) {
        let p = start_proxy(&docs, sa, identity(ca, sa)).await;
        clients.push((sa.to_string(), p, *bind));
    }
    Mesh2 {
        server,
        inbound,
        clients,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_speak_mtls_and_the_app_sees_the_callers_spiffe_id() -> TestResult {
    let app = HttpBackend::start("catalog").await?;
    let ca = test_ca();
    let other_ca = test_ca();
    let m = mesh2(
        app.addr(),
        &ca,
        &[("web", &ca), ("stranger", &other_ca)],
        vec![],
    )
    .await;

    // The caller's identity reaches the app, verified: a forged header is replaced.
    let mut c = client::h1(m.bind("web")).await?;
    let req = Request::get("/items")
        .header("host", "catalog")
        .header("sinew-peer-identity", spiffe("admin"))
        .body(empty())?;
    let r = client::collect(c.send(req).await?).await?;
    assert_eq!(r.status, 200, "{:?}", r.header("sinew-error"));
    assert_eq!(r.header("x-backend"), Some("catalog"));
    assert_eq!(
        r.json()?["headers"]["sinew-peer-identity"],
        spiffe("web").as_str()
    );
    // The server counted an inbound request from that identity.
    let metrics = admin(&m.server, "/metrics").await.text();
    let from_web = format!("peer_identity=\"{}\"", spiffe("web"));
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("direction=\"inbound\"") && l.contains(&from_web)),
        "no inbound request counted from {from_web}:\n{metrics}"
    );

    // A certificate from another CA is refused at the handshake.
    let r = client::get(m.bind("stranger"), "catalog", "/items").await?;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("sinew-error"), Some("tls-failed"));

    // With an identity, mTLS is strict: plaintext straight to the inbound is refused.
    let plain = client::get(m.inbound, "catalog", "/items").await;
    assert!(
        plain.is_err(),
        "plaintext reached the app: {:?}",
        plain.map(|r| r.status)
    );
    m.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_allows_one_identity_and_refuses_another() -> TestResult {
    let app = HttpBackend::start("catalog").await?;
    let ca = test_ca();
    let policy =
        AuthorizationPolicy::allow("web-only", "catalog").from_principals(&[&spiffe("web")]);
    let m = mesh2(
        app.addr(),
        &ca,
        &[("web", &ca), ("intruder", &ca)],
        vec![mesh::Document::document(&policy)],
    )
    .await;

    let r = client::get(m.bind("web"), "catalog", "/items").await?;
    assert_eq!(r.status, 200, "{:?}", r.header("sinew-error"));
    assert_eq!(
        r.json()?["headers"]["sinew-peer-identity"],
        spiffe("web").as_str()
    );

    let r = client::get(m.bind("intruder"), "catalog", "/items").await?;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.header("sinew-error"),
        Some("forbidden: no ALLOW rule matched")
    );
    assert_eq!(
        metric(
            &m.server,
            "sinew_http_requests_total{direction=\"inbound\",class=\"4xx\"}"
        )
        .await,
        Some(1.0)
    );
    m.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_authentication_verifies_tokens_with_an_inline_jwks() -> TestResult {
    let app = HttpBackend::start("catalog").await?;
    let ca = test_ca();
    let issuer = "https://issuer.test";
    let authn = RequestAuthentication::new("users", "catalog").rule(serde_json::json!({
        "issuer": issuer,
        "audiences": ["catalog"],
        "jwks": {"inline": jwt::jwks(&[&K1])},
        "forwardClaims": [{"claim": "sub", "header": "x-user"}],
    }));
    let m = mesh2(
        app.addr(),
        &ca,
        &[("web", &ca)],
        vec![mesh::Document::document(&authn)],
    )
    .await;
    let bind = m.bind("web");
    let get = |token: Option<String>| async move {
        let mut c = client::h1(bind).await?;
        let mut b = Request::get("/items")
            .header("host", "catalog")
            .header("x-user", "forged");
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        client::collect(c.send(b.body(empty())?).await?).await
    };

    // A valid token: its claim (not the forged header) reaches the app.
    let r = get(Some(
        K1.sign(&jwt::claims(issuer, "alice", "catalog", 600))?,
    ))
    .await?;
    assert_eq!(r.status, 200, "{:?}", r.header("sinew-error"));
    assert_eq!(r.json()?["headers"]["x-user"], "alice");
    assert!(r.json()?["headers"].get("authorization").is_none());
    // No token: authentication passes (no policy asks for a principal).
    let r = get(None).await?;
    assert_eq!(r.status, 200);
    assert!(r.json()?["headers"].get("x-user").is_none());
    // Bad tokens: 401, each with its reason.
    let cases = [
        (
            K2.sign_as("k1", &jwt::claims(issuer, "alice", "catalog", 600))?,
            "jwt-bad-signature",
        ),
        (
            K2.sign(&jwt::claims(issuer, "alice", "catalog", 600))?,
            "jwt-unknown-kid",
        ),
        (
            K1.sign(&jwt::claims(issuer, "alice", "catalog", -3600))?,
            "jwt-expired",
        ),
        (
            K1.sign(&jwt::claims(issuer, "alice", "billing", 600))?,
            "jwt-wrong-audience",
        ),
    ];
    for (token, reason) in cases {
        let r = get(Some(token)).await?;
        assert_eq!(
            (r.status.as_u16(), r.header("sinew-error")),
            (401, Some(reason))
        );
    }
    m.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builder_without_configuration_or_with_bad_documents_does_not_start() {
    let err = Proxy::builder().start().unwrap_err();
    assert!(err.to_string().contains("no configuration"), "{err}");
    let bad = Mesh::new("shop")
        .with(mesh::Proxy::new("p").upstream(free_addr(), "nowhere"))
        .with(Service::new("catalog", "SMTP"))
        .yaml();
    let err = Proxy::builder().documents(&bad, "p").start().unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("configuration refused"), "{msg}");
    assert!(msg.contains("protocol"), "the problem is named: {msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_port_leaves_the_proxy_unready_until_a_reload_finds_it_free() -> TestResult {
    let app = HttpBackend::start("catalog").await?;
    let busy = std::net::TcpListener::bind("127.0.0.1:0")?;
    let bind = busy.local_addr()?;
    let docs = Mesh::new("shop")
        .with(mesh::Proxy::new("client").upstream(bind, "catalog"))
        .with(Service::http("catalog"))
        .with(Workload::new("catalog-1", "catalog", app.addr()));
    let proxy = Proxy::builder().documents(&docs.yaml(), "client").start()?;
    assert_eq!(admin(&proxy, "/ready").await.status, 503);
    let err = admin(&proxy, "/config").await.json()?["lastError"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(err.contains(&bind.to_string()), "the port is named: {err}");

    drop(busy);
    proxy.reload();
    sinew_testkit::wait::ready("ready once the port is free", proxy.admin_addr(), TIMEOUT).await?;
    assert_eq!(client::get(bind, "catalog", "/").await?.status, 200);
    proxy.shutdown().await;
    Ok(())
}
