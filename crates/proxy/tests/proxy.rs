//! The proxy end to end: real backends (HTTP/1.1, HTTP/2, gRPC, WebSocket, TCP) on
//! loopback, real proxies in-process (and one as a process, for SIGTERM).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::json;
use sinew_testkit::client::{self, body_channel, empty};
use sinew_testkit::grpc::{self, EchoRequest, StreamRequest};
use sinew_testkit::http::{Event, FNV_OFFSET, Failure, HttpBackend, fnv1a64};
use sinew_testkit::mesh::{self, HttpRoute, Mesh, Service, TrafficPolicy, Workload};
use sinew_testkit::tcp::TcpEchoServer;
use sinew_testkit::wait;
use sinew_testkit::ws::WsEchoServer;
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reports_live_ready_config_and_metrics() -> TestResult {
    let app = HttpBackend::start("app").await?;
    let bind = free_addr();
    let docs = Mesh::new("shop")
        .with(mesh::Proxy::new("client").upstream(bind, "catalog"))
        .with(Service::http("catalog"))
        .with(Workload::new("catalog-1", "catalog", app.addr()));
    let proxy = start_docs(&docs, "client").await;
    assert_eq!(admin(&proxy, "/live").await.status, 200);
    assert_eq!(admin(&proxy, "/ready").await.status, 200);
    let r = client::get(bind, "catalog", "/hello").await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-backend"), Some("app"));

    let cfg = admin(&proxy, "/config").await;
    assert_eq!(cfg.status, 200);
    let json = cfg.json()?;
    assert_eq!(json["generation"], 1);
    assert_eq!(json["version"].as_str().map(str::len), Some(16));
    assert_eq!(json["config"]["upstreams"][0]["service"], "catalog.shop");
    assert_eq!(
        json["config"]["services"]["catalog.shop"]["ports"][0]["endpoints"][0]["address"],
        app.addr().to_string()
    );

    // The classic text format by default; OpenMetrics when asked for.
    let m = admin(&proxy, "/metrics").await;
    assert_eq!(
        m.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert!(!m.text().contains("# EOF"));
    let mut c = client::h1(proxy.admin_addr()).await?;
    let req = Request::get("/metrics")
        .header("host", "admin")
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        )
        .body(empty())?;
    let m = client::collect(c.send(req).await?).await?;
    assert!(
        m.header("content-type")
            .unwrap_or("")
            .contains("openmetrics")
    );
    assert!(m.text().ends_with("# EOF\n"));
    assert_eq!(
        metric(
            &proxy,
            "sinew_http_requests_total{direction=\"outbound\",class=\"2xx\"}"
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(&proxy, "sinew_tcp_connections_total{listener=\"outbound\"}").await,
        Some(1.0)
    );
    assert_eq!(metric(&proxy, "sinew_config_generation").await, Some(1.0));
    assert!(m.text().trim_end().ends_with("# EOF"));
    assert_eq!(admin(&proxy, "/nope").await.status, 404);
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_unready_on_a_bad_file_and_applies_the_fix() -> TestResult {
    let app = HttpBackend::start("app").await?;
    let bind = free_addr();
    let with = |catalog: Service| {
        shop()
            .with(client_proxy(bind, "catalog"))
            .with(catalog)
            .with(Workload::new("catalog-1", "catalog", app.addr()))
            .yaml()
    };
    let good = with(Service::http("catalog"));
    let bad = with(Service::http("catalog").field(
        "ports",
        json!([{"name": "main", "port": 80, "colour": "blue"}]),
    ));
    let file = ConfigFile::new(&bad);
    let proxy = sinew_proxy::Proxy::start(options(&file.path, "client"))?;
    let ready = admin(&proxy, "/ready").await;
    assert_eq!(ready.status, 503);
    let cfg = admin(&proxy, "/config").await;
    assert_eq!(cfg.status, 503);
    let err = cfg.json()?["lastError"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let line = bad.lines().position(|l| l.contains("colour")).unwrap() + 1;
    assert!(
        err.contains(&format!(".yaml:{line}")),
        "error names the line: {err}"
    );
    assert!(
        err.contains("spec.ports[0].colour"),
        "error names the field: {err}"
    );
    assert!(err.contains("unknown field"), "error says why: {err}");
    assert!(
        TcpStream::connect(bind).await.is_err(),
        "no listener without a config"
    );

    file.replace(&good);
    let admin_addr = proxy.admin_addr();
    wait::ready("ready after the fix", admin_addr, TIMEOUT).await?;
    assert_eq!(client::get(bind, "catalog", "/").await?.status, 200);

    // A later bad edit is refused whole; the running config stays.
    file.replace(&bad);
    wait::until("refusal counted", TIMEOUT, || async {
        metric(&proxy, "sinew_config_reloads_total{result=\"rejected\"}").await == Some(2.0)
    })
    .await?;
    assert_eq!(generation(&proxy).await, 1);
    assert_eq!(client::get(bind, "catalog", "/").await?.status, 200);
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_path_header_query_and_method() -> TestResult {
    let names = [
        "exact", "prefix", "regex", "header", "query", "method", "fallback",
    ];
    let mut backends = HashMap::new();
    let bind = free_addr();
    let mut docs = shop();
    docs.add(client_proxy(bind, "catalog"))
        .add(Service::http("catalog"));
    for n in names {
        let b = HttpBackend::start(n).await?;
        docs.add(Service::http(&format!("be-{n}")))
            .add(Workload::new(
                &format!("be-{n}-1"),
                &format!("be-{n}"),
                b.addr(),
            ));
        backends.insert(n, b);
    }
    let to = |backend: &str, matches: serde_json::Value| json!({"matches": [matches], "backendRefs": [{"name": backend}]});
    docs.add(
        HttpRoute::new("catalog", "catalog")
            .rule(to("be-exact", json!({"path": {"type": "Exact", "value": "/items/special"}})))
            .rule(to("be-prefix", json!({"path": {"type": "PathPrefix", "value": "/items"}})))
            .rule(to(
                "be-regex",
                json!({"path": {"type": "RegularExpression", "value": "/v[0-9]+/.*"}}),
            ))
            .rule(to(
                "be-header",
                json!({"path": {"value": "/h"}, "headers": [{"name": "x-tier", "value": "gold"}]}),
            ))
            .rule(to(
                "be-query",
                json!({
                    "path": {"value": "/h"},
                    "queryParams": [{"name": "beta", "type": "RegularExpression", "value": "on|yes"}],
                }),
            ))
            .rule(to("be-method", json!({"path": {"value": "/h"}, "method": "DELETE"})))
            .rule(to("be-fallback", json!({"path": {"value": "/h"}}))),
    );
    let file = config_file(&docs);
    let proxy = start(&file, "client").await;
    let mut conn = client::h1(bind).await?;
    let mut ask = async |method: Method, path: &str, hdr: Option<(&str, &str)>| {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "catalog");
        if let Some((k, v)) = hdr {
            b = b.header(k, v);
        }
        let resp = client::collect(conn.send(b.body(empty()).unwrap()).await.unwrap())
            .await
            .unwrap();
        (
            resp.status,
            resp.header("x-backend").unwrap_or("-").to_owned(),
        )
    };
    let ok = |s: &str| (StatusCode::OK, s.to_owned());
    assert_eq!(ask(Method::GET, "/items/special", None).await, ok("exact"));
    assert_eq!(
        ask(Method::GET, "/items/special/x", None).await,
        ok("prefix")
    );
    assert_eq!(ask(Method::GET, "/items", None).await, ok("prefix"));
    assert_eq!(ask(Method::GET, "/v2/anything", None).await, ok("regex"));
    assert_eq!(
        ask(Method::GET, "/h", Some(("x-tier", "gold"))).await,
        ok("header")
    );
    assert_eq!(ask(Method::GET, "/h?beta=yes", None).await, ok("query"));
    assert_eq!(
        ask(Method::DELETE, "/h?beta=yes", Some(("x-tier", "gold"))).await,
        ok("method")
    );
    assert_eq!(
        ask(Method::GET, "/h?beta=no", Some(("x-tier", "silver"))).await,
        ok("fallback")
    );
    // Element-wise prefix: /itemsx is not under /items, and nothing else matches.
    let (status, _) = ask(Method::GET, "/itemsx", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_proxy_routes_by_host_authority_and_absolute_form() -> TestResult {
    let catalog = HttpBackend::start("catalog").await?;
    let orders = HttpBackend::start("orders").await?;
    let hp = free_addr();
    let file = config_file(
        &shop()
            .with(mesh::Proxy::new("client").http_proxy(hp))
            .with(Service::http("catalog"))
            .with(Workload::new("catalog-1", "catalog", catalog.addr()))
            .with(Service::http("orders"))
            .with(Workload::new("orders-1", "orders", orders.addr())),
    );
    let proxy = start(&file, "client").await;
    for host in [
        "catalog",
        "catalog.shop",
        "catalog.shop.svc.cluster.local",
        "catalog:80",
    ] {
        let r = client::get(hp, host, "/x").await?;
        assert_eq!(r.header("x-backend"), Some("catalog"), "{host}");
        assert_eq!(
            r.header("x-seen-authority"),
            Some(host),
            "Host is preserved"
        );
    }
    // Absolute-form, as HTTP_PROXY clients send it.
    let mut c = client::h1(hp).await?;
    let req = Request::get("http://orders.shop/list?x=1")
        .header("host", "orders.shop")
        .body(empty())?;
    let r = client::collect(c.send(req).await?).await?;
    assert_eq!(r.header("x-backend"), Some("orders"));
    assert_eq!(
        r.header("x-seen-path"),
        Some("/list?x=1"),
        "origin-form upstream"
    );
    // HTTP/2 prior knowledge: routed by :authority; the app behind a port declared
    // `HTTP` is spoken to in HTTP/1.1, whatever the client spoke.
    let h2 = client::h2(hp).await?;
    let r = h2.get("orders", "/h2").await?;
    assert_eq!(r.header("x-backend"), Some("orders"));
    assert_eq!(r.header("x-seen-version"), Some("HTTP/1.1"));
    // Unknown host.
    let r = client::get(hp, "nowhere", "/").await?;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("sinew-error"), Some("unknown-service"));
    proxy.shutdown().await;
    Ok(())
}

/// A connection remembers the authority its last Host header parsed to
/// (`LastHost`): a keep-alive client that changes Host between requests on one
/// connection must still be routed by each request's own Host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_changing_host_is_routed_by_each_request() -> TestResult {
    let catalog = HttpBackend::start("catalog").await?;
    let orders = HttpBackend::start("orders").await?;
    let hp = free_addr();
    let file = config_file(
        &shop()
            .with(mesh::Proxy::new("client").http_proxy(hp))
            .with(Service::http("catalog"))
            .with(Workload::new("catalog-1", "catalog", catalog.addr()))
            .with(Service::http("orders"))
            .with(Workload::new("orders-1", "orders", orders.addr())),
    );
    let proxy = start(&file, "client").await;
    // One HTTP/1.1 connection for every request below.
    let mut c = client::h1(hp).await?;
    for (host, backend) in [
        ("catalog", Some("catalog")),
        ("catalog", Some("catalog")),
        ("orders", Some("orders")),
        ("catalog:80", Some("catalog")),
        ("nowhere", None),
        ("orders.shop", Some("orders")),
    ] {
        let req = Request::get("/x").header("host", host).body(empty())?;
        let r = client::collect(c.send(req).await?).await?;
        assert_eq!(r.header("x-backend"), backend, "Host {host}");
        if backend.is_none() {
            assert_eq!(
                r.header("sinew-error"),
                Some("unknown-service"),
                "Host {host}"
            );
        }
    }
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_holds_within_statistical_bounds() -> TestResult {
    let v1 = HttpBackend::start("v1").await?;
    let v2 = HttpBackend::start("v2").await?;
    let bind = free_addr();
    let docs = Mesh::new("shop")
        .with(mesh::Proxy::new("client").upstream(bind, "catalog"))
        .with(Service::http("catalog"))
        .with(Service::http("catalog-v1"))
        .with(Service::http("catalog-v2"))
        .with(Workload::new("v1", "catalog-v1", v1.addr()))
        .with(Workload::new("v2", "catalog-v2", v2.addr()))
        .with(HttpRoute::new("canary", "catalog").rule(serde_json::json!({
            "backendRefs": [
                {"name": "catalog-v1", "weight": 80},
                {"name": "catalog-v2", "weight": 20},
            ]
        })));
    let proxy = start_docs(&docs, "client").await;
    let n = 2000u32;
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(client::h1(bind).await?);
    }
    let mut tasks = Vec::new();
    for mut c in conns {
        tasks.push(tokio::spawn(async move {
            let mut v2 = 0u32;
            for _ in 0..n / 4 {
                let r = c.get("catalog", "/").await.unwrap();
                assert_eq!(r.status, 200);
                if r.header("x-backend") == Some("v2") {
                    v2 += 1;
                }
            }
            v2
        }));
    }
    let mut v2_count = 0;
    for t in tasks {
        v2_count += t.await?;
    }
    // Binomial(2000, 0.2): mean 400, sd ~17.9; accept ±5 sd.
    let expected = f64::from(n) * 0.2;
    let sd = (f64::from(n) * 0.2 * 0.8).sqrt();
    assert!(
        (f64::from(v2_count) - expected).abs() <= 5.0 * sd,
        "v2 got {v2_count} of {n}, expected {expected} ± {}",
        5.0 * sd
    );
    assert_eq!(u64::from(n), v1.requests() + v2.requests());
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_modifiers_and_url_rewrites() -> TestResult {
    let app = HttpBackend::start("app").await?;
    let bind = free_addr();
    let file = config_file(
        &shop()
            .with(client_proxy(bind, "catalog"))
            .with(Service::http("catalog"))
            .with(Workload::new("catalog-1", "catalog", app.addr()))
            .with(
                HttpRoute::new("edits", "catalog")
                    .rule(json!({
                        "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                        "filters": [
                            {
                                "type": "RequestHeaderModifier",
                                "requestHeaderModifier": {
                                    "set": [{"name": "x-env", "value": "prod"}],
                                    "add": [{"name": "x-added", "value": "yes"}],
                                    "remove": ["x-secret"],
                                },
                            },
                            {
                                "type": "ResponseHeaderModifier",
                                "responseHeaderModifier": {
                                    "set": [{"name": "x-served-via", "value": "sinew"}],
                                    "remove": ["x-seen-method"],
                                },
                            },
                            {
                                "type": "URLRewrite",
                                "urlRewrite": {
                                    "hostname": "internal.catalog",
                                    "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"},
                                },
                            },
                        ],
                    }))
                    .rule(json!({
                        "matches": [{"path": {"type": "Exact", "value": "/old"}}],
                        "filters": [{
                            "type": "URLRewrite",
                            "urlRewrite": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/new/place"}},
                        }],
                    })),
            ),
    );
    let proxy = start(&file, "client").await;
    let mut c = client::h1(bind).await?;
    let req = Request::get("/api/items?page=2")
        .header("host", "catalog")
        .header("x-env", "dev")
        .header("x-secret", "s3cr3t")
        .body(empty())?;
    let r = client::collect(c.send(req).await?).await?;
    assert_eq!(r.status, 200);
    let seen = r.json()?;
    assert_eq!(seen["path"], "/v2/items");
    assert_eq!(r.header("x-seen-path"), Some("/v2/items?page=2"));
    assert_eq!(r.header("x-seen-authority"), Some("internal.catalog"));
    assert_eq!(seen["headers"]["x-env"], "prod");
    assert_eq!(seen["headers"]["x-added"], "yes");
    assert!(
        seen["headers"].get("x-secret").is_none(),
        "removed header reached the app"
    );
    assert_eq!(r.header("x-served-via"), Some("sinew"));
    assert_eq!(r.header("x-seen-method"), None);
    let r = c.get("catalog", "/old?q=1").await?;
    assert_eq!(r.header("x-seen-path"), Some("/new/place?q=1"));
    proxy.shutdown().await;
    Ok(())
}

/// Two sidecars: `client` (outbound binding) and `server` (inbound, in front of app).
struct MeshPair {
    client: sinew_proxy::Proxy,
    server: sinew_proxy::Proxy,
    bind: SocketAddr,
    inbound: SocketAddr,
}

async fn mesh_pair(app: SocketAddr, protocol: &str) -> MeshPair {
    let bind = free_addr();
    let inbound = free_addr();
    let docs = Mesh::new("shop")
        .with(mesh::Proxy::new("client").upstream(bind, "catalog"))
        .with(mesh::Proxy::new("server").inbound(inbound, &[app.port()]))
        .with(Service::new("catalog", protocol))
        .with(Workload::new("catalog-1", "catalog", app).sidecar(inbound.port()));
    let server = start_docs(&docs, "server").await;
    let client = start_docs(&docs, "client").await;
    MeshPair {
        client,
        server,
        bind,
        inbound,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_hop_is_multiplexed_http2_and_speaks_the_apps_protocol() -> TestResult {
    let app = HttpBackend::start("app").await?;
    let mesh = mesh_pair(app.addr(), "HTTP").await;
    let r = client::get(mesh.bind, "catalog", "/one").await?;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-seen-version"),
        Some("HTTP/1.1"),
        "app gets the client's HTTP/1.1"
    );
    assert_eq!(r.header("x-seen-authority"), Some("catalog"));
    let seen = r.json()?;
    assert!(
        seen["headers"].get("sinew-dst-port").is_none(),
        "mesh headers are internal"
    );
    assert!(seen["headers"].get("sinew-orig-proto").is_none());
    let h2 = client::h2(mesh.bind).await?;
    let r = h2.get("catalog", "/two").await?;
    assert_eq!(
        r.header("x-seen-version"),
        Some("HTTP/1.1"),
        "a port declared HTTP is spoken to in HTTP/1.1, even for an HTTP/2 client"
    );
    // A port declared HTTP2 is spoken to in HTTP/2, even for an HTTP/1.1 client.
    let app2 = HttpBackend::start("app2").await?;
    let mesh2 = mesh_pair(app2.addr(), "HTTP2").await;
    let r = client::get(mesh2.bind, "catalog", "/three").await?;
    assert_eq!(r.header("x-seen-version"), Some("HTTP/2.0"));
    mesh2.client.shutdown().await;
    mesh2.server.shutdown().await;

    // Fifty concurrent requests cross the hop on one multiplexed HTTP/2 connection.
    let mut tasks = Vec::new();
    for i in 0..50 {
        tasks.push(tokio::spawn(async move {
            client::get(mesh.bind, "catalog", &format!("/c/{i}"))
                .await
                .map(|r| r.status)
        }));
    }
    for t in tasks {
        assert_eq!(t.await?.map_err(|e| e.to_string())?, 200);
    }
    assert_eq!(
        metric(
            &mesh.server,
            "sinew_tcp_connections_total{listener=\"inbound\"}"
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(
            &mesh.server,
            "sinew_http_requests_total{direction=\"inbound\",class=\"2xx\"}"
        )
        .await,
        Some(52.0)
    );
    // A client cannot steer the peer sidecar to another port.
    let mut c = client::h1(mesh.bind).await?;
    let req = Request::get("/")
        .header("host", "catalog")
        .header("sinew-dst-port", "1")
        .body(empty())?;
    assert_eq!(client::collect(c.send(req).await?).await?.status, 200);
    // Nor can anyone reach a port the workload does not expose.
    let inbound = mesh
        .server
        .shared()
        .snapshot
        .load_full()
        .unwrap()
        .config
        .inbound
        .clone()
        .unwrap()
        .bind;
    let direct = client::h2(inbound).await?;
    let req = Request::get("http://catalog/".to_string())
        .header("sinew-dst-port", "1")
        .body(empty())?;
    let r = client::collect(direct.send(req).await?).await?;
    assert_eq!(r.status, 403);
    assert_eq!(r.header("sinew-error"), Some("port-not-allowed"));
    mesh.client.shutdown().await;
    mesh.server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_both_ways_without_buffering() -> TestResult {
    let app = HttpBackend::start("app").await?;
    let mesh = mesh_pair(app.addr(), "HTTP").await;
    // Upload: the app sees each chunk before the client sends the next one.
    let (tx, body) = body_channel(1);
    let mut c = client::h1(mesh.bind).await?;
    let req = Request::post("/gated-upload")
        .header("host", "catalog")
        .body(body)?;
    let resp = tokio::spawn(async move { c.send(req).await.map(|r| r.status()) });
    let chunk = Bytes::from(vec![7u8; 64 * 1024]);
    let mut sent = 0u64;
    for _ in 0..4 {
        tx.send(Ok(http_body::Frame::data(chunk.clone())))
            .await
            .unwrap();
        sent += chunk.len() as u64;
        loop {
            match app.next_event().await {
                Some(Event::UploadProgress { total_bytes }) if total_bytes >= sent => break,
                Some(_) => continue,
                None => panic!("backend closed its events"),
            }
        }
    }
    drop(tx);
    assert_eq!(resp.await?.map_err(|e| e.to_string())?, 200);

    // Download: the client reads each chunk before the app writes the next one.
    let mut c = client::h1(mesh.bind).await?;
    let req = Request::get("/gated-download/4")
        .header("host", "catalog")
        .body(empty())?;
    let mut body = c.send(req).await?.into_body();
    let mut got = 0usize;
    for i in 0..4 {
        let want = (i + 1) * 16 * 1024;
        while got < want {
            let frame = body.frame().await.unwrap()?;
            if let Some(d) = frame.data_ref() {
                got += d.len();
            }
        }
        assert_eq!(
            got, want,
            "chunk {i} arrived whole before the next was released"
        );
        app.release_chunk();
    }

    // A large body arrives intact (32 MiB, streamed in frames).
    let (tx, body) = body_channel(4);
    let mut c = client::h1(mesh.bind).await?;
    let req = Request::post("/upload")
        .header("host", "catalog")
        .body(body)?;
    let resp = tokio::spawn(async move { client::collect(c.send(req).await?).await });
    let mut sum = FNV_OFFSET;
    for i in 0..512u32 {
        let data = Bytes::from(vec![(i % 251) as u8; 64 * 1024]);
        sum = fnv1a64(sum, &data);
        tx.send(Ok(http_body::Frame::data(data))).await.unwrap();
    }
    drop(tx);
    let r = resp.await?.map_err(|e| e.to_string())?;
    let j = r.json()?;
    assert_eq!(j["bytes"], 512 * 64 * 1024);
    assert_eq!(j["checksum"], sum);
    mesh.client.shutdown().await;
    mesh.server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_clients_websocket_reaches_an_http1_app_directly_and_through_the_mesh()
-> TestResult {
    use tokio_tungstenite::tungstenite::protocol::Role;
    let ws = WsEchoServer::start().await?;
    let mesh = mesh_pair(ws.addr(), "HTTP").await;
    let direct_bind = free_addr();
    let docs = shop()
        .with(client_proxy(direct_bind, "ws"))
        .with(Service::http("ws"))
        .with(Workload::new("ws-1", "ws", ws.addr()));
    let direct = start_docs(&docs, "client").await;
    for bind in [mesh.bind, direct_bind] {
        // RFC 8441: a WebSocket over an HTTP/2 stream (extended CONNECT).
        let h2 = client::h2(bind).await?;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri("http://catalog/chat")
            .extension(hyper::ext::Protocol::from_static("websocket"))
            .header("sec-websocket-version", "13")
            .body(empty())?;
        let resp = h2.send(req).await?;
        assert_eq!(resp.status(), 200, "the app's 101 is an HTTP/2 200");
        let upgraded = hyper::upgrade::on(resp).await?;
        let mut socket = tokio_tungstenite::WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            Role::Client,
            None,
        )
        .await;
        for i in 0..3 {
            socket.send(Message::text(format!("over h2 {i}"))).await?;
            let echoed = socket.next().await.unwrap()?;
            assert_eq!(echoed, Message::text(format!("over h2 {i}")));
        }
        socket.close(None).await?;
    }
    direct.shutdown().await;
    mesh.client.shutdown().await;
    mesh.server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_round_trips_directly_and_through_the_mesh() -> TestResult {
    let ws = WsEchoServer::start().await?;
    // Through two sidecars (CONNECT tunnel on the hop).
    let mesh = mesh_pair(ws.addr(), "HTTP").await;
    // And straight from one sidecar to the app.
    let direct_bind = free_addr();
    let docs = shop()
        .with(client_proxy(direct_bind, "ws"))
        .with(Service::http("ws"))
        .with(Workload::new("ws-1", "ws", ws.addr()));
    let direct = start_docs(&docs, "client").await;
    for bind in [mesh.bind, direct_bind] {
        let tcp = TcpStream::connect(bind).await?;
        let (mut socket, resp) = tokio_tungstenite::client_async("ws://catalog/chat", tcp).await?;
        assert_eq!(resp.status(), 101);
        for i in 0..3 {
            socket.send(Message::text(format!("hello {i}"))).await?;
            let echoed = socket.next().await.unwrap()?;
            assert_eq!(echoed, Message::text(format!("hello {i}")));
        }
        socket.send(Message::binary(vec![1u8, 2, 3])).await?;
        assert_eq!(
            socket.next().await.unwrap()?,
            Message::binary(vec![1u8, 2, 3])
        );
        socket.close(None).await?;
    }
    direct.shutdown().await;
    mesh.client.shutdown().await;
    mesh.server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_round_trips_including_server_first_protocols() -> TestResult {
    let echo = TcpEchoServer::start().await?;
    let banner = TcpEchoServer::start_server_first("220 smtp.example ready\r\n").await?;
    for (server, greeting) in [(&echo, None), (&banner, Some("220 smtp.example ready\r\n"))] {
        let mesh = mesh_pair(server.addr(), "TCP").await;
        let direct_bind = free_addr();
        let docs = shop()
            .with(client_proxy(direct_bind, "db"))
            .with(Service::new("db", "TCP"))
            .with(Workload::new("db-1", "db", server.addr()));
        let direct = start_docs(&docs, "client").await;
        for bind in [mesh.bind, direct_bind] {
            let mut s = TcpStream::connect(bind).await?;
            if let Some(g) = greeting {
                // The server speaks first: nothing waits for the client.
                let mut buf = vec![0u8; g.len()];
                s.read_exact(&mut buf).await?;
                assert_eq!(buf, g.as_bytes());
            }
            let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 256) as u8).collect();
            let (mut r, mut w) = s.into_split();
            let to_send = payload.clone();
            let writer = tokio::spawn(async move {
                w.write_all(&to_send).await?;
                w.shutdown().await
            });
            let mut back = Vec::new();
            r.read_to_end(&mut back).await?;
            writer.await??;
            assert_eq!(back.len(), payload.len());
            assert!(back == payload, "bytes survive the trip");
        }
        direct.shutdown().await;
        mesh.client.shutdown().await;
        mesh.server.shutdown().await;
    }
    Ok(())
}

/// A server-speaks-first protocol (an SMTP-style banner) behind a binding to a port
/// declared `HTTP`: the client, which says nothing until greeted, gets the banner
/// once detection gives up (not after the 30 s header-read timeout, nor never), both
/// straight to the app and through its sidecar; and the bytes then flow both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_first_protocol_on_a_binding_declared_http_gets_its_greeting() -> TestResult {
    let greeting = "220 smtp.example ready\r\n";
    let banner = TcpEchoServer::start_server_first(greeting).await?;
    let mesh = mesh_pair(banner.addr(), "HTTP").await;
    let direct_bind = free_addr();
    let docs = shop()
        .with(client_proxy(direct_bind, "smtp"))
        .with(Service::http("smtp"))
        .with(Workload::new("smtp-1", "smtp", banner.addr()));
    let direct = start_docs(&docs, "client").await;
    for (proxy, bind) in [(&mesh.client, mesh.bind), (&direct, direct_bind)] {
        let mut s = TcpStream::connect(bind).await?;
        let mut buf = vec![0u8; greeting.len()];
        // Well under the header-read timeout, far over the detection timeout.
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
            .await
            .map_err(|_| "no greeting: the binding waited for an HTTP request")??;
        assert_eq!(buf, greeting.as_bytes());
        s.write_all(b"EHLO client\r\n").await?;
        let mut line = vec![0u8; 13];
        s.read_exact(&mut line).await?;
        assert_eq!(line, b"EHLO client\r\n");
        assert_eq!(
            metric(proxy, "sinew_protocol_detect_timeouts_total").await,
            Some(1.0),
            "the fallback is counted"
        );
    }
    // A client that speaks first is still served as HTTP: the banner server gets
    // a request head, not an opaque stream (it echoes the banner and the head back,
    // which is no HTTP response: the proxy answers 502).
    let r = client::get(direct_bind, "smtp", "/").await?;
    assert_eq!(r.status, 502);
    direct.shutdown().await;
    mesh.client.shutdown().await;
    mesh.server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_keep_trailers_through_the_mesh() -> TestResult {
    let server = grpc::EchoServer::start("echo-1").await?;
    let mesh = mesh_pair(server.addr(), "GRPC").await;
    let mut client = grpc::connect(mesh.bind).await?;

    let reply = client
        .unary(EchoRequest {
            message: "hi".into(),
        })
        .await?;
    assert_eq!(
        reply.metadata().get(grpc::SERVER_HEADER_KEY).unwrap(),
        "echo-1"
    );
    assert_eq!(reply.get_ref().message, "hi");

    let mut stream = client
        .server_stream(StreamRequest { count: 5 })
        .await?
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = stream.message().await? {
        got.push(m.message);
    }
    assert_eq!(
        got,
        (0..5).map(|i| format!("message-{i}")).collect::<Vec<_>>()
    );
    let trailers = stream.trailers().await?.expect("trailers");
    assert_eq!(
        trailers.get(grpc::TRAILER_KEY).unwrap(),
        grpc::SERVER_STREAM_TRAILER
    );

    let outbound = futures_util::stream::iter((0..3).map(|i| EchoRequest {
        message: format!("b{i}"),
    }));
    let mut bidi = client.bidi_stream(outbound).await?.into_inner();
    let mut got = Vec::new();
    while let Some(m) = bidi.message().await? {
        got.push(m.message);
    }
    assert_eq!(got, vec!["b0", "b1", "b2"]);
    let trailers = bidi.trailers().await?.expect("trailers");
    assert_eq!(
        trailers.get(grpc::TRAILER_KEY).unwrap(),
        grpc::BIDI_STREAM_TRAILER
    );

    let status = client
        .fail(EchoRequest {
            message: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(status.message(), grpc::FAIL_MESSAGE);
    assert_eq!(
        status.metadata().get(grpc::TRAILER_KEY).unwrap(),
        grpc::FAIL_TRAILER
    );
    mesh.client.shutdown().await;
    mesh.server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_made_errors_carry_status_and_reason() -> TestResult {
    let app = HttpBackend::start("app").await?;
    let closed = free_addr(); // nothing listens here
    let hp = free_addr();
    let file = config_file(
        &shop()
            .with(mesh::Proxy::new("client").http_proxy(hp))
            .with(Service::http("dead"))
            .with(Workload::new("dead-1", "dead", closed))
            .with(Service::http("empty"))
            .with(Service::http("routed"))
            .with(Workload::new("routed-1", "routed", app.addr()))
            .with(
                HttpRoute::new("only-api", "routed")
                    .rule(json!({"matches": [{"path": {"value": "/api"}}]})),
            )
            .with(Service::new("grpc-empty", "GRPC")),
    );
    let proxy = start(&file, "client").await;
    let cases = [
        ("dead", "/", 502, "connect-failed"),
        ("empty", "/", 503, "no-endpoints"),
        ("routed", "/other", 404, "no-route"),
        ("nowhere", "/", 404, "unknown-service"),
    ];
    for (host, path, status, reason) in cases {
        let r = client::get(hp, host, path).await?;
        assert_eq!(r.status, status, "{host}{path}");
        assert_eq!(r.header("sinew-error"), Some(reason), "{host}{path}");
        let body = r.text();
        assert!(
            body.starts_with(reason) && body.ends_with('\n') && body.lines().count() == 1,
            "one-line body: {body:?}"
        );
    }
    // 400: nothing to route by.
    let mut c = client::h1(hp).await?;
    let r = client::collect(c.send(Request::get("/").body(empty())?).await?).await?;
    assert_eq!(r.status, 400);
    assert_eq!(r.header("sinew-error"), Some("malformed-request"));
    // gRPC callers get a gRPC status, not an HTTP error page.
    let h2 = client::h2(hp).await?;
    let req = Request::post("http://grpc-empty/pkg.Svc/Method")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(empty())?;
    let r = client::collect(h2.send(req).await?).await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("grpc-status"), Some("14"));
    assert_eq!(r.header("sinew-error"), Some("no-endpoints"));
    assert_eq!(
        metric(
            &proxy,
            "sinew_proxy_errors_total{direction=\"outbound\",reason=\"connect-failed\"}"
        )
        .await,
        Some(1.0)
    );
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn route_timeout_answers_504_in_virtual_time() -> TestResult {
    let app = HttpBackend::start("slow").await?;
    let bind = free_addr();
    let docs = Mesh::new("shop")
        .with(mesh::Proxy::new("client").upstream(bind, "catalog"))
        .with(Service::http("catalog"))
        .with(Workload::new("catalog-1", "catalog", app.addr()))
        .with(
            HttpRoute::new("t", "catalog").rule(serde_json::json!({"timeouts": {"request": "5s"}})),
        );
    // In process: applied before `start` returns, with no file to poll.
    let proxy = sinew_proxy::Proxy::builder()
        .documents(&docs.yaml(), "client")
        .start()?;
    assert!(proxy.shared().is_ready());
    let start = tokio::time::Instant::now();
    let r = client::get(bind, "catalog", "/never").await?;
    assert_eq!(r.status, 504);
    assert_eq!(r.header("sinew-error"), Some("request-timeout"));
    assert!(
        start.elapsed() >= Duration::from_secs(5),
        "fired after {:?}",
        start.elapsed()
    );
    assert_eq!(
        app.requests(),
        1,
        "the request reached the app before the timeout"
    );
    // Under the limit, a slow answer passes.
    let r = client::get(bind, "catalog", "/delay/4000").await?;
    assert_eq!(r.status, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_400_and_disturbs_no_other_connection() -> TestResult {
    let app = HttpBackend::start("app").await?;
    let bind = free_addr();
    let file = config_file(
        &shop()
            .with(client_proxy(bind, "catalog"))
            .with(Service::http("catalog"))
            .with(Workload::new("catalog-1", "catalog", app.addr())),
    );
    let proxy = start(&file, "client").await;
    let mut good = client::h1(bind).await?;
    assert_eq!(good.get("catalog", "/a").await?.status, 200);
    for garbage in [
        &b"\x00\x01\x02 not http at all\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: catalog\r\nContent-Length: banana\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: catalog\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabc",
        b"POST / HTTP/1.0\r\nHost: catalog\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(bind).await?;
        s.write_all(garbage).await?;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        let head = String::from_utf8_lossy(&out);
        assert!(head.starts_with("HTTP/1.1 400"), "got {head:?}");
    }
    // Transfer-Encoding with Content-Length (a smuggling shape): Transfer-Encoding
    // wins and the connection is closed after the answer, so nothing can ride on it.
    let mut s = TcpStream::connect(bind).await?;
    s.write_all(b"POST / HTTP/1.1\r\nHost: catalog\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: catalog\r\n\r\n").await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out);
    assert_eq!(
        text.matches("HTTP/1.1 ").count(),
        1,
        "one answer, then closed: {text}"
    );
    assert!(!text.contains("/smuggled"));
    // An oversized header block is refused too.
    let mut s = TcpStream::connect(bind).await?;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: catalog\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let _ = s.write_all(big.as_bytes()).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 431")
            || out.is_empty()
            || String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400")
    );
    // The earlier connection is unaffected.
    assert_eq!(good.get("catalog", "/b").await?.status, 200);
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_pooled_per_endpoint_and_round_robin_alternates() -> TestResult {
    let a = HttpBackend::start("a").await?;
    let b = HttpBackend::start("b").await?;
    let bind = free_addr();
    let file = config_file(
        &shop()
            .with(client_proxy(bind, "catalog"))
            .with(Service::http("catalog").load_balancer("RoundRobin"))
            .with(Workload::new("a", "catalog", a.addr()))
            .with(Workload::new("b", "catalog", b.addr())),
    );
    let proxy = start(&file, "client").await;
    let mut c = client::h1(bind).await?;
    let mut seen = Vec::new();
    for _ in 0..40 {
        let r = c.get("catalog", "/").await?;
        seen.push(r.header("x-backend").unwrap_or("-").to_owned());
    }
    for pair in seen.chunks(2) {
        assert_ne!(pair[0], pair[1], "round robin alternates: {seen:?}");
    }
    assert_eq!((a.requests(), b.requests()), (20, 20));
    assert_eq!(
        (a.connections(), b.connections()),
        (1, 1),
        "one pooled connection per endpoint"
    );
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_steady_load_loses_no_request() -> TestResult {
    let v1 = HttpBackend::start("v1").await?;
    let v2 = HttpBackend::start("v2").await?;
    let bind = free_addr();
    let config = |target: &str| {
        shop()
            .with(client_proxy(bind, "catalog"))
            .with(Service::http("catalog"))
            .with(Service::http("catalog-v1"))
            .with(Service::http("catalog-v2"))
            .with(Workload::new("v1", "catalog-v1", v1.addr()))
            .with(Workload::new("v2", "catalog-v2", v2.addr()))
            .with(
                HttpRoute::new("split", "catalog").rule(json!({"backendRefs": [{"name": target}]})),
            )
            .yaml()
    };
    let file = ConfigFile::new(&config("catalog-v1"));
    let proxy = start(&file, "client").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        let mut c = client::h1(bind).await?;
        load.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match c.get("catalog", "/").await {
                    Ok(r) if r.status == 200 => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        }));
    }
    for (i, target) in [
        "catalog-v2",
        "catalog-v1",
        "catalog-v2",
        "catalog-v1",
        "catalog-v2",
    ]
    .iter()
    .enumerate()
    {
        file.replace(&config(target));
        let want = i as u64 + 2;
        wait::until("reload applied", TIMEOUT, || async {
            generation(&proxy).await == want
        })
        .await?;
    }
    let before = v2.requests();
    wait::until("traffic reaches v2", TIMEOUT, || async {
        v2.requests() > before
    })
    .await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, 0);
    for t in load {
        let (o, f) = t.await?;
        ok += o;
        failed += f;
    }
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed across reloads",
        ok + failed
    );
    assert!(ok > 50, "load ran: {ok} requests");
    // Endpoints kept across swaps keep their pooled connections: six generations with
    // pools rebuilt each time would need about 4 new connections per generation.
    // (A connection returns to the pool asynchronously once its response is read, so
    // a busy machine may open one or two more; that is not a reset.)
    let conns = v1.connections() + v2.connections();
    assert!(
        conns <= 12,
        "{conns} upstream connections for {ok} requests over 6 generations"
    );
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_closes_what_will_not_finish() -> TestResult {
    let app = HttpBackend::start("app").await?;
    let bind = free_addr();
    let file = config_file(
        &shop()
            .with(client_proxy(bind, "catalog"))
            .with(Service::http("catalog"))
            .with(Workload::new("catalog-1", "catalog", app.addr())),
    );
    let mut opts = options(&file.path, "client");
    opts.drain_timeout = Duration::from_millis(300);
    let proxy = start_with(opts).await;
    let stuck = tokio::spawn(async move { client::get(bind, "catalog", "/never").await });
    wait::until("request in flight", TIMEOUT, || async {
        app.requests() == 1
    })
    .await?;
    let outcome = proxy.shutdown().await;
    assert!(!outcome.clean);
    assert!(
        stuck.await?.is_err(),
        "the stuck request was cut at the deadline"
    );
    assert!(
        TcpStream::connect(bind).await.is_err(),
        "no longer accepting"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits() -> TestResult {
    let app = HttpBackend::start("app").await?;
    let bind = free_addr();
    let admin_addr = free_addr();
    let file = config_file(
        &shop()
            .with(client_proxy(bind, "catalog"))
            .with(Service::http("catalog"))
            .with(Workload::new("catalog-1", "catalog", app.addr())),
    );
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sinew-proxy"))
        .arg("--config")
        .arg(&file.path)
        .arg("--admin")
        .arg(admin_addr.to_string())
        .arg("--drain-timeout")
        .arg("20")
        .kill_on_drop(true)
        .spawn()?;
    wait::ready("proxy process ready", admin_addr, TIMEOUT).await?;
    // Requests in flight when SIGTERM arrives: each takes 1.5 s at the app.
    let mut inflight = Vec::new();
    for _ in 0..3 {
        inflight.push(tokio::spawn(async move {
            client::get(bind, "catalog", "/delay/1500").await
        }));
    }
    wait::until("requests at the app", TIMEOUT, || async {
        app.requests() == 3
    })
    .await?;
    let pid = child.id().unwrap().to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await?;
    assert!(killed.success());
    for t in inflight {
        let r = t.await?.map_err(|e| e.to_string())?;
        assert_eq!(
            r.status, 200,
            "in-flight request completed during the drain"
        );
    }
    let status = tokio::time::timeout(TIMEOUT, child.wait()).await??;
    assert!(status.success(), "exit status {status}");
    assert!(TcpStream::connect(bind).await.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_flag_validates_a_file() -> TestResult {
    let bind = free_addr();
    let good = config_file(
        &shop()
            .with(client_proxy(bind, "catalog"))
            .with(Service::http("catalog")),
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sinew-proxy"))
        .args(["--check", "--config"])
        .arg(&good.path)
        .output()
        .await?;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok: proxy shop/client"));
    let bad = config_file(
        &shop()
            .with(client_proxy(bind, "ghost"))
            .with(Service::http("catalog")),
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sinew-proxy"))
        .args(["--check", "--config"])
        .arg(&bad.path)
        .output()
        .await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Proxy shop/client: spec.outbound.upstreams[0].service: service \"ghost\" does not exist"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_removes_bindings_keeps_open_connections_and_in_flight_requests() -> TestResult
{
    let app = HttpBackend::start("app").await?;
    let ws = WsEchoServer::start().await?;
    let (http_bind, ws_bind) = (free_addr(), free_addr());
    let file = config_file(
        &shop()
            .with(client_proxy(http_bind, "catalog").upstream(ws_bind, "ws"))
            .with(Service::http("catalog"))
            .with(Workload::new("catalog-1", "catalog", app.addr()))
            .with(Service::http("ws"))
            .with(Workload::new("ws-1", "ws", ws.addr())),
    );
    let proxy = start(&file, "client").await;

    // A streaming response in flight, and an open WebSocket.
    let mut c = client::h1(http_bind).await?;
    let req = Request::get("/gated-download/3")
        .header("host", "catalog")
        .body(empty())?;
    let mut body = c.send(req).await?.into_body();
    let mut got = 0;
    while got < 16 * 1024 {
        got += body
            .frame()
            .await
            .unwrap()?
            .data_ref()
            .map_or(0, |d| d.len());
    }
    assert_eq!(
        got,
        16 * 1024,
        "first chunk, and nothing more until released"
    );
    let (mut socket, _) =
        tokio_tungstenite::client_async("ws://ws/", TcpStream::connect(ws_bind).await?).await?;
    socket.send(Message::text("before")).await?;
    assert_eq!(socket.next().await.unwrap()?, Message::text("before"));

    // The new configuration has no bindings at all.
    file.replace(
        &shop()
            .with(mesh::Proxy::new("client"))
            .with(Service::http("catalog"))
            .yaml(),
    );
    wait::until("reload applied", TIMEOUT, || async {
        generation(&proxy).await == 2
    })
    .await?;
    wait::until("bindings closed", TIMEOUT, || async {
        TcpStream::connect(http_bind).await.is_err() && TcpStream::connect(ws_bind).await.is_err()
    })
    .await?;

    // What was open keeps working to its end.
    for _ in 0..2 {
        app.release_chunk();
        let want = got + 16 * 1024;
        while got < want {
            let frame = body.frame().await.unwrap()?;
            got += frame.data_ref().map_or(0, |d| d.len());
        }
    }
    assert_eq!(got, 3 * 16 * 1024);
    socket.send(Message::text("after")).await?;
    assert_eq!(socket.next().await.unwrap()?, Message::text("after"));
    socket.close(None).await?;
    drop((body, c, socket));
    assert!(proxy.shutdown().await.clean, "nothing left open to cut");
    Ok(())
}

/// `client`'s binding `bind` to catalog, served round robin by `a` and `b`, with the
/// HTTPRoute `resilience` of `rules`.
fn two_endpoints(
    bind: SocketAddr,
    a: &HttpBackend,
    b: &HttpBackend,
    rules: &[serde_json::Value],
) -> ConfigFile {
    let mut route = HttpRoute::new("resilience", "catalog");
    for r in rules {
        route = route.rule(r.clone());
    }
    config_file(
        &shop()
            .with(client_proxy(bind, "catalog"))
            .with(Service::http("catalog").load_balancer("RoundRobin"))
            .with(Workload::new("a", "catalog", a.addr()))
            .with(Workload::new("b", "catalog", b.addr()))
            .with(route),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_rescue_requests_from_a_failing_endpoint_and_say_so() -> TestResult {
    let (a, b) = (
        HttpBackend::start("a").await?,
        HttpBackend::start("b").await?,
    );
    a.fail_with(Some(503));
    let bind = free_addr();
    // Half the requests meet the failing endpoint: a budget of one retry per request
    // lets every one be rescued (the budget test shows the cap).
    let file = two_endpoints(
        bind,
        &a,
        &b,
        &[json!({"retry": {"attempts": 2, "backoff": "1ms", "budget": {"ratio": 1.0}}})],
    );
    let proxy = start(&file, "client").await;
    let mut c = client::h1(bind).await?;
    let mut retried = 0;
    for _ in 0..50 {
        let r = c.get("catalog", "/").await?;
        assert_eq!(r.status, 200, "{:?}", r.header("sinew-error"));
        assert_eq!(r.header("x-backend"), Some("b"));
        if r.header("sinew-retry-attempt").is_some() {
            retried += 1;
        }
    }
    assert!(
        a.requests() > 0 && retried > 0,
        "a saw {} requests, {retried} retried",
        a.requests()
    );
    assert_eq!(
        metric(&proxy, "sinew_retries_total").await,
        Some(f64::from(retried))
    );
    // POST is not idempotent: not retried unless the route says so.
    let mut posts_failed = 0;
    for _ in 0..10 {
        let req = Request::post("/")
            .header("host", "catalog")
            .header("content-length", "0")
            .body(empty())?;
        if client::collect(c.send(req).await?).await?.status == 503 {
            posts_failed += 1;
        }
    }
    assert!(
        posts_failed > 0,
        "POSTs to the failing endpoint are answered as they are"
    );
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_rescue_requests_from_an_endpoint_that_resets_or_closes() -> TestResult {
    let (a, b) = (
        HttpBackend::start("a").await?,
        HttpBackend::start("b").await?,
    );
    let bind = free_addr();
    let file = two_endpoints(
        bind,
        &a,
        &b,
        &[
            json!({"matches": [{"path": {"value": "/plain"}}]}),
            json!({"retry": {"attempts": 2, "backoff": "1ms", "budget": {"ratio": 1.0}}}),
        ],
    );
    let proxy = start(&file, "client").await;
    let mut c = client::h1(bind).await?;
    for how in [Failure::Reset, Failure::Close] {
        a.fail(how);
        let before = a.requests() + a.connections();
        for _ in 0..40 {
            let r = c.get("catalog", "/").await?;
            assert_eq!(r.status, 200, "{how:?}: {:?}", r.header("sinew-error"));
            assert_eq!(r.header("x-backend"), Some("b"));
        }
        assert!(
            a.requests() + a.connections() > before,
            "{how:?}: the failing endpoint was tried"
        );
        // Without a retry policy a safe request (GET) is still tried once more
        // elsewhere when its endpoint breaks the connection...
        for _ in 0..40 {
            let r = c.get("catalog", "/plain").await?;
            assert_eq!(r.status, 200, "{how:?}: {:?}", r.header("sinew-error"));
        }
        // ...but an unsafe one (POST) is not: some fail (so the rescue is real).
        let mut failed = 0;
        for _ in 0..40 {
            let req = Request::post("/plain")
                .header("host", "catalog")
                .header("content-length", "0")
                .body(empty())?;
            let r = client::collect(c.send(req).await?).await?;
            if r.status == 502 {
                failed += 1;
            } else {
                assert_eq!(r.status, 200, "{how:?}: {:?}", r.header("sinew-error"));
            }
        }
        assert!(failed > 0, "{how:?}: without retries, some POSTs fail");
        a.fail(Failure::None);
    }
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_amplification_during_an_outage() -> TestResult {
    let (a, b) = (
        HttpBackend::start("a").await?,
        HttpBackend::start("b").await?,
    );
    a.fail_with(Some(503));
    b.fail_with(Some(503));
    let bind = free_addr();
    let file = two_endpoints(
        bind,
        &a,
        &b,
        &[json!({"retry": {
            "attempts": 3,
            "backoff": "1ms",
            "budget": {"ratio": 0.2, "minPerSecond": 1},
        }})],
    );
    let proxy = start(&file, "client").await;
    let mut c = client::h1(bind).await?;
    let started = std::time::Instant::now();
    let n = 300u64;
    for _ in 0..n {
        assert_eq!(c.get("catalog", "/").await?.status, 503);
    }
    let upstream = a.requests() + b.requests();
    let ratio = upstream as f64 / n as f64;
    // Without a budget: 4 tries each (ratio 4). With it: at most 1 + 0.2, plus the
    // floor of 1 retry a second over the run (however long the run took).
    let floor = (started.elapsed().as_secs_f64().ceil() + 1.0) / n as f64;
    assert!(
        ratio <= 1.2 + floor,
        "amplification {ratio:.3} ({upstream} upstream for {n})"
    );
    assert!(ratio > 1.0, "some retries were still allowed ({ratio:.3})");
    assert!(
        metric(
            &proxy,
            "sinew_proxy_errors_total{direction=\"outbound\",reason=\"retry-budget-exhausted\"}"
        )
        .await
        .unwrap_or(0.0)
            > 0.0
    );
    proxy.shutdown().await;
    Ok(())
}

/// Files mode: a `RoutePolicy` attached to one named rule of an HTTPRoute gives that
/// rule its fault and its retries (what the upstream HTTPRoute schema cannot carry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_policy_gives_its_rule_a_fault_and_retries() -> TestResult {
    let app = HttpBackend::start("app").await?;
    let bind = free_addr();
    let file = config_file(
        &shop()
            .with(client_proxy(bind, "catalog"))
            .with(Service::http("catalog"))
            .with(Workload::new("app", "catalog", app.addr()))
            .with(
                HttpRoute::new("catalog", "catalog")
                    .rule(json!({"name": "chaos", "matches": [{"path": {"value": "/chaos"}}]}))
                    .rule(json!({"name": "rest"})),
            )
            .with(mesh::resource(
                "RoutePolicy",
                "chaos",
                json!({
                    "targetRef": {
                        "group": "gateway.networking.k8s.io",
                        "kind": "HTTPRoute",
                        "name": "catalog",
                        "sectionName": "chaos",
                    },
                    "fault": {"abort": {"httpStatus": 418, "percent": 100}},
                }),
            ))
            .with(mesh::resource(
                "RoutePolicy",
                "all",
                json!({
                    "targetRef": {"kind": "HTTPRoute", "name": "catalog"},
                    "retry": {
                        "attempts": 3,
                        "codes": [503],
                        "budget": {"ratio": 1.0, "minPerSecond": 100},
                    },
                }),
            )),
    );
    let proxy = start(&file, "client").await;
    let mut c = client::h1(bind).await?;
    let r = c.get("catalog", "/chaos/x").await?;
    assert_eq!(r.status, 418);
    assert_eq!(r.header("sinew-error"), Some("fault-injected"));
    assert_eq!(
        app.requests(),
        0,
        "an aborted request never reaches the app"
    );
    let r = c.get("catalog", "/other").await?;
    assert_eq!(
        (r.status.as_u16(), r.header("x-backend")),
        (200, Some("app"))
    );
    // The whole-route policy's retries: a failing app is tried 1 + 3 times.
    app.fail_with(Some(503));
    let before = app.requests();
    let r = c.get("catalog", "/other").await?;
    assert_eq!(r.status, 503);
    assert_eq!(
        app.requests() - before,
        4,
        "the first try and three retries"
    );
    proxy.shutdown().await;
    Ok(())
}

/// `client`'s binding `bind` to catalog (served by `app`), and the service `shadow`.
fn with_shadow(bind: SocketAddr, app: &HttpBackend, shadow: &HttpBackend) -> Mesh {
    shop()
        .with(client_proxy(bind, "catalog"))
        .with(Service::http("catalog"))
        .with(Workload::new("app", "catalog", app.addr()))
        .with(Service::http("shadow"))
        .with(Workload::new("shadow", "shadow", shadow.addr()))
}

/// A `RequestMirror` filter copying requests to the Service `backend`.
fn mirror_to(backend: &str) -> serde_json::Value {
    json!({"type": "RequestMirror", "requestMirror": {"backendRef": {"name": backend}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_hit_the_configured_share_and_mirrors_get_copies() -> TestResult {
    let app = HttpBackend::start("app").await?;
    let shadow = HttpBackend::start("shadow").await?;
    shadow.fail_with(Some(500)); // the mirror's answers never reach the client
    let bind = free_addr();
    let file = config_file(
        &with_shadow(bind, &app, &shadow).with(
            HttpRoute::new("chaos", "catalog")
                .rule(json!({
                    "matches": [{"path": {"value": "/chaos"}}],
                    "filters": [{"type": "Fault", "fault": {"abort": {"httpStatus": 503, "percent": 30}}}],
                }))
                .rule(json!({
                    "matches": [{"path": {"value": "/copy"}}],
                    "filters": [mirror_to("shadow")],
                })),
        ),
    );
    let proxy = start(&file, "client").await;
    let mut c = client::h1(bind).await?;
    let n = 1000;
    let mut aborted = 0;
    for _ in 0..n {
        let r = c.get("catalog", "/chaos").await?;
        if r.status == 503 {
            assert_eq!(r.header("sinew-error"), Some("fault-injected"));
            aborted += 1;
        }
    }
    // Binomial(1000, 0.3): mean 300, sd ~14.5; accept ±5 sd.
    assert!(
        (aborted as f64 - 300.0).abs() <= 5.0 * 14.5,
        "{aborted} of {n} aborted"
    );
    assert_eq!(
        app.requests(),
        (n - aborted) as u64,
        "aborted requests never reach the app"
    );
    for i in 0..20 {
        let r = c.get("catalog", &format!("/copy?i={i}")).await?;
        assert_eq!(
            (r.status.as_u16(), r.header("x-backend")),
            (200, Some("app"))
        );
    }
    wait::until("mirror got every copy", TIMEOUT, || async {
        shadow.requests() == 20
    })
    .await?;
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_to_a_hanging_shadow_are_capped_and_never_slow_the_primary() -> TestResult {
    let app = HttpBackend::start("app").await?;
    let shadow = HttpBackend::start("shadow").await?;
    // Every mirrored request hangs (longer than the test).
    shadow.slow(1, Duration::from_secs(120));
    let bind = free_addr();
    let file =
        config_file(&with_shadow(bind, &app, &shadow).with(
            HttpRoute::new("copy", "catalog").rule(json!({"filters": [mirror_to("shadow")]})),
        ));
    let proxy = start(&file, "client").await;
    let mut c = client::h1(bind).await?;
    for i in 0..300 {
        let r = c.get("catalog", &format!("/copy?i={i}")).await?;
        assert_eq!(
            r.status, 200,
            "the primary is answered whatever the mirror does"
        );
    }
    wait::until("256 mirrors in flight", TIMEOUT, || async {
        shadow.requests() >= 256
    })
    .await?;
    assert_eq!(
        shadow.requests(),
        256,
        "mirrors past the cap are not sent while 256 hang"
    );
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_statuses_are_retried_and_injected() -> TestResult {
    let server = grpc::EchoServer::start("echo-1").await?;
    let bind = free_addr();
    let file = config_file(
        &shop()
            .with(client_proxy(bind, "catalog"))
            .with(Service::new("catalog", "GRPC"))
            .with(Workload::new("echo", "catalog", server.addr()))
            .with(
                HttpRoute::new("grpc", "catalog")
                    .rule(json!({
                        "matches": [{"headers": [{"name": "x-chaos", "value": "on"}]}],
                        "filters": [{
                            "type": "Fault",
                            "fault": {"abort": {"grpcStatus": "UNAVAILABLE", "percent": 100}},
                        }],
                    }))
                    .rule(json!({"retry": {
                        "attempts": 2,
                        "codes": [],
                        "grpcCodes": ["FAILED_PRECONDITION"],
                        "backoff": "1ms",
                        "budget": {"ratio": 1.0},
                    }})),
            ),
    );
    let proxy = start(&file, "client").await;
    let mut client = grpc::connect(bind).await?;
    // A retryable gRPC status (trailers-only) is retried, and the answer says so.
    let status = client
        .fail(EchoRequest {
            message: "x".into(),
        })
        .await
        .expect_err("the echo service fails this call");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(status.message(), grpc::FAIL_MESSAGE);
    assert_eq!(metric(&proxy, "sinew_retries_total").await, Some(2.0));
    assert_eq!(
        status
            .metadata()
            .get("sinew-retry-attempt")
            .and_then(|v| v.to_str().ok()),
        Some("2"),
        "two retries after the first try"
    );
    // A Fault filter aborts matching calls with a gRPC status; others pass.
    let mut req = tonic::Request::new(EchoRequest {
        message: "chaos".into(),
    });
    req.metadata_mut().insert("x-chaos", "on".parse()?);
    let status = client.unary(req).await.expect_err("aborted by the fault");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let ok = client
        .unary(EchoRequest {
            message: "calm".into(),
        })
        .await?;
    assert_eq!(ok.get_ref().message, "calm");
    // A streaming call on a retrying route is kept for replay, never held back: the
    // client sends its next message only after the answer to the previous one.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(EchoRequest {
        message: "ping-0".into(),
    })
    .await?;
    let mut bidi = client
        .bidi_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    for i in 0..3 {
        let m = tokio::time::timeout(TIMEOUT, bidi.message())
            .await
            .map_err(|_| "the streaming call stalled")??
            .ok_or("stream ended early")?;
        assert_eq!(m.message, format!("ping-{i}"));
        if i < 2 {
            tx.send(EchoRequest {
                message: format!("ping-{}", i + 1),
            })
            .await?;
        }
    }
    drop(tx);
    assert!(bidi.message().await?.is_none());
    proxy.shutdown().await;
    server.shutdown().await;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn deadlines_are_propagated_and_honoured() -> TestResult {
    let app = HttpBackend::start("app").await?;
    let bind = free_addr();
    let file = config_file(
        &shop()
            .with(client_proxy(bind, "catalog"))
            .with(Service::http("catalog"))
            .with(Workload::new("app", "catalog", app.addr()))
            .with(
                HttpRoute::new("slow", "catalog")
                    .rule(json!({
                        "matches": [{"path": {"value": "/slow"}}],
                        "timeouts": {"request": "5s"},
                        "filters": [{
                            "type": "Fault",
                            "fault": {"delay": {"fixedDelay": "2s", "percent": 100}},
                        }],
                    }))
                    .rule(json!({"timeouts": {"request": "5s"}})),
            ),
    );
    let proxy = sinew_proxy::Proxy::start(options(&file.path, "client"))?;
    assert!(proxy.shared().is_ready());
    // The callee learns how long it has.
    let r = client::get(bind, "catalog", "/").await?;
    let left: u64 = r.json()?["headers"]["sinew-timeout-ms"]
        .as_str()
        .unwrap()
        .parse()?;
    assert!(left <= 5000 && left > 4000, "{left}");
    // A caller's shorter deadline wins: 100 ms, and the app never answers.
    let mut c = client::h1(bind).await?;
    let start = tokio::time::Instant::now();
    let req = Request::get("/never")
        .header("host", "catalog")
        .header("sinew-timeout-ms", "100")
        .body(empty())?;
    let r = client::collect(c.send(req).await?).await?;
    assert_eq!(
        (r.status.as_u16(), r.header("sinew-error")),
        (504, Some("request-timeout"))
    );
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "gave up at the caller's deadline, not the route's"
    );
    // An injected delay counts against the deadline: 2 s of 5 s, then served.
    let start = tokio::time::Instant::now();
    let r = client::get(bind, "catalog", "/slow").await?;
    assert_eq!(r.status, 200);
    assert!(start.elapsed() >= Duration::from_secs(2));
    let left: u64 = r.json()?["headers"]["sinew-timeout-ms"]
        .as_str()
        .unwrap()
        .parse()?;
    assert!(
        left <= 3000,
        "the delay was charged to the deadline: {left} ms left"
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_slow_try_is_abandoned_at_the_per_try_timeout_and_retried() -> TestResult {
    let (a, b) = (
        HttpBackend::start("a").await?,
        HttpBackend::start("b").await?,
    );
    a.slow(1, Duration::from_secs(3)); // every request to a takes 3 s
    let bind = free_addr();
    let file = two_endpoints(
        bind,
        &a,
        &b,
        &[json!({
            "timeouts": {"request": "5s", "backendRequest": "200ms"},
            "retry": {"attempts": 1, "codes": [], "backoff": "1ms", "budget": {"ratio": 1.0}},
        })],
    );
    let proxy = sinew_proxy::Proxy::start(options(&file.path, "client"))?;
    assert!(proxy.shared().is_ready());
    let mut c = client::h1(bind).await?;
    for _ in 0..10 {
        let t = tokio::time::Instant::now();
        let r = c.get("catalog", "/").await?;
        assert_eq!(r.status, 200, "{:?}", r.header("sinew-error"));
        assert_eq!(r.header("x-backend"), Some("b"));
        // At most one try of 200 ms was spent on a (paused time: exact).
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
    assert!(a.requests() > 0, "a was tried");
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_stops_downstream_work() -> TestResult {
    let app = HttpBackend::start("app").await?;
    let mesh = mesh_pair(app.addr(), "HTTP").await;
    for (via, addr) in [
        ("the caller's sidecar", mesh.bind),
        ("the callee's sidecar alone", mesh.inbound),
    ] {
        let mut c = client::h1(addr).await?;
        let req = Request::get("/never")
            .header("host", "catalog")
            .header("sinew-timeout-ms", "300")
            .body(empty())?;
        let r = tokio::time::timeout(TIMEOUT, async { client::collect(c.send(req).await?).await })
            .await
            .map_err(|_| format!("{via}: no answer at the deadline"))??;
        assert_eq!(
            (r.status.as_u16(), r.header("sinew-error")),
            (504, Some("request-timeout")),
            "{via}"
        );
        // The app's request was dropped: its work stops.
        let ev = tokio::time::timeout(TIMEOUT, app.next_event())
            .await
            .map_err(|_| format!("{via}: the app kept working past the deadline"))?;
        assert_eq!(ev, Some(Event::Abandoned), "{via}");
    }
    mesh.client.shutdown().await;
    mesh.server.shutdown().await;
    Ok(())
}

/// The TrafficPolicy `catalog` for the Service catalog, setting `field` to `value`.
fn traffic_policy(field: &str, value: serde_json::Value) -> TrafficPolicy {
    TrafficPolicy::new("catalog", "catalog").field(field, value)
}

/// `client`'s binding `bind` to catalog, served round robin by `a` and `b`.
fn round_robin(bind: SocketAddr, a: &HttpBackend, b: &HttpBackend) -> Mesh {
    shop()
        .with(client_proxy(bind, "catalog"))
        .with(Service::http("catalog").load_balancer("RoundRobin"))
        .with(Workload::new("a", "catalog", a.addr()))
        .with(Workload::new("b", "catalog", b.addr()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_breaker_sheds_at_the_limit_at_once() -> TestResult {
    let (a, b) = (
        HttpBackend::start("a").await?,
        HttpBackend::start("b").await?,
    );
    let bind = free_addr();
    let file = config_file(
        &round_robin(bind, &a, &b)
            .with(traffic_policy("circuitBreaker", json!({"maxRequests": 3}))),
    );
    let proxy = start(&file, "client").await;
    // Three requests that never finish fill the service's slots.
    let mut stuck = Vec::new();
    for _ in 0..3 {
        stuck.push(tokio::spawn(async move {
            client::get(bind, "catalog", "/never").await
        }));
    }
    wait::until("three in flight", TIMEOUT, || async {
        a.requests() + b.requests() == 3
    })
    .await?;
    let start = std::time::Instant::now();
    let r = client::get(bind, "catalog", "/").await?;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("sinew-error"), Some("overflow: maxRequests"));
    assert!(r.text().contains("circuit breaker"), "{}", r.text());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "answered at once, not queued"
    );
    assert_eq!(
        a.requests() + b.requests(),
        3,
        "the overflow never reached a backend"
    );
    for s in stuck {
        s.abort();
    }
    // Once slots free up, requests flow again.
    wait::until("slots released", TIMEOUT, || async {
        client::get(bind, "catalog", "/")
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await?;
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejected_endpoint_gets_no_traffic_then_returns() -> TestResult {
    let (a, b) = (
        HttpBackend::start("a").await?,
        HttpBackend::start("b").await?,
    );
    a.fail_with(Some(503));
    let bind = free_addr();
    let file = config_file(&round_robin(bind, &a, &b).with(traffic_policy(
        "outlierDetection",
        json!({"consecutiveFailures": 3, "baseEjectionTime": "1s", "maxEjectionPercent": 50}),
    )));
    let proxy = start(&file, "client").await;
    let mut c = client::h1(bind).await?;
    for _ in 0..20 {
        c.get("catalog", "/").await?;
    }
    assert_eq!(a.requests(), 3, "ejected after three failures in a row");
    assert_eq!(
        metric(&proxy, "sinew_outlier_ejections_total").await,
        Some(1.0)
    );
    let seen = a.requests();
    for _ in 0..50 {
        assert_eq!(
            c.get("catalog", "/").await?.status,
            200,
            "only the healthy endpoint serves"
        );
    }
    assert_eq!(a.requests(), seen, "an ejected endpoint gets no traffic");
    // Healed: after its ejection time it gets traffic again.
    a.fail_with(None);
    wait::until("returns after the ejection time", TIMEOUT, || async {
        let _ = client::get(bind, "catalog", "/").await;
        a.requests() > seen
    })
    .await?;
    let before = a.requests();
    for _ in 0..20 {
        assert_eq!(c.get("catalog", "/").await?.status, 200);
    }
    assert!(a.requests() >= before + 5, "back in the rotation");
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_endpoint_is_ejected_under_the_default_balancer_and_nothing_fails() -> TestResult {
    // Peak EWMA routes around an endpoint after its first failure, so it would rarely
    // send it `consecutiveFailures` tries; the broken connection is probed instead,
    // and the refused connect ejects it.
    let (a, b, c) = (
        HttpBackend::start("a").await?,
        HttpBackend::start("b").await?,
        HttpBackend::start("c").await?,
    );
    let bind = free_addr();
    let file = config_file(
        &shop()
            .with(client_proxy(bind, "catalog"))
            .with(Service::http("catalog"))
            .with(Workload::new("a", "catalog", a.addr()))
            .with(Workload::new("b", "catalog", b.addr()))
            .with(Workload::new("c", "catalog", c.addr()))
            .with(HttpRoute::new("resilience", "catalog").rule(json!({
                "retry": {"attempts": 2, "backoff": "1ms", "budget": {"ratio": 1.0}},
            })))
            .with(traffic_policy(
                "outlierDetection",
                json!({"consecutiveFailures": 5, "baseEjectionTime": "30s", "maxEjectionPercent": 50}),
            )),
    );
    let proxy = start(&file, "client").await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(client::h1(bind).await?);
    }
    // Requests that never end, until `a` holds one in flight: killing it then breaks
    // that request's connection (an upstream error, retried elsewhere), and the
    // balancer stops choosing `a` at once, before any connect to it is refused.
    let mut stuck = Vec::new();
    wait::until("a request in flight at a", TIMEOUT, || {
        stuck.push(tokio::spawn(client::get(bind, "catalog", "/never")));
        async { a.requests() > 0 }
    })
    .await?;
    a.shutdown().await;
    // Traffic goes on while we wait for the ejection: every request must succeed.
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut sent = 0;
    while metric(&proxy, "sinew_outlier_ejections_total").await != Some(1.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "not ejected within {TIMEOUT:?} ({sent} requests sent)"
        );
        for c in clients.iter_mut() {
            let r = c.get("catalog", "/").await?;
            assert_eq!(r.status, 200, "{:?}", r.header("sinew-error"));
            sent += 1;
        }
    }
    for c in clients.iter_mut() {
        for _ in 0..5 {
            assert_eq!(c.get("catalog", "/").await?.status, 200);
        }
    }
    for s in stuck {
        s.abort();
    }
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_endpoint_are_capped() -> TestResult {
    let app = HttpBackend::start("app").await?;
    let bind = free_addr();
    let file = config_file(
        &shop()
            .with(client_proxy(bind, "catalog"))
            .with(Service::http("catalog"))
            .with(Workload::new("app", "catalog", app.addr()))
            .with(traffic_policy(
                "circuitBreaker",
                json!({"maxConnectionsPerEndpoint": 1}),
            )),
    );
    let proxy = start(&file, "client").await;
    // One request holds the only HTTP/1.1 connection allowed.
    let stuck = tokio::spawn(async move { client::get(bind, "catalog", "/never").await });
    wait::until("connection in use", TIMEOUT, || async {
        app.requests() == 1
    })
    .await?;
    let r = client::get(bind, "catalog", "/").await?;
    assert_eq!(
        (r.status.as_u16(), r.header("sinew-error")),
        (503, Some("overflow: maxConnectionsPerEndpoint"))
    );
    assert_eq!(app.connections(), 1);
    stuck.abort();
    wait::until("connection freed", TIMEOUT, || async {
        client::get(bind, "catalog", "/")
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await?;
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_wait_for_a_capped_connection_up_to_the_pending_limit() -> TestResult {
    let app = HttpBackend::start("app").await?;
    let bind = free_addr();
    let file = config_file(
        &shop()
            .with(client_proxy(bind, "catalog"))
            .with(Service::http("catalog"))
            .with(Workload::new("app", "catalog", app.addr()))
            .with(traffic_policy(
                "circuitBreaker",
                json!({"maxConnectionsPerEndpoint": 1, "maxPendingRequestsPerEndpoint": 2}),
            )),
    );
    let proxy = start(&file, "client").await;
    let pool = proxy
        .shared()
        .snapshot
        .load_full()
        .and_then(|s| {
            s.balancer("catalog.shop", 80)
                .map(|b| b.endpoints()[0].pool.clone())
        })
        .ok_or("no pool for catalog")?;
    // One request holds the only connection; two more wait for it.
    let stuck = tokio::spawn(async move { client::get(bind, "catalog", "/never").await });
    wait::until("connection in use", TIMEOUT, || async {
        app.requests() == 1
    })
    .await?;
    let waiting: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { client::get(bind, "catalog", "/").await }))
        .collect();
    wait::until("two waiting", TIMEOUT, || async {
        pool.pending_requests() == 2
    })
    .await?;
    // A third would wait past the limit: refused at once.
    let r = client::get(bind, "catalog", "/").await?;
    assert_eq!(
        (r.status.as_u16(), r.header("sinew-error")),
        (503, Some("overflow: maxPendingRequestsPerEndpoint"))
    );
    // The connection frees up: the waiting requests are served, one at a time.
    stuck.abort();
    for w in waiting {
        assert_eq!(w.await??.status, 200);
    }
    assert_eq!(pool.pending_requests(), 0);
    assert!(pool.open_connections() <= 1);
    assert!(app.connections() <= 2, "{} connections", app.connections());
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_rate_limits_hold_per_key_at_the_inbound() -> TestResult {
    let app = HttpBackend::start("app").await?;
    let (bind, inbound) = (free_addr(), free_addr());
    let file = config_file(
        &shop()
            .with(client_proxy(bind, "catalog"))
            .with(
                mesh::Proxy::new("server")
                    .workload("catalog-1")
                    .inbound(inbound, &[app.addr().port()]),
            )
            .with(Service::http("catalog"))
            .with(Workload::new("catalog-1", "catalog", app.addr()).sidecar(inbound.port()))
            .with(traffic_policy(
                "rateLimits",
                json!([{
                    "name": "per-user",
                    "key": {"header": "x-user"},
                    "requestsPerSecond": 5,
                    "burst": 5,
                }]),
            )),
    );
    let server = start(&file, "server").await;
    let client_proxy = start(&file, "client").await;
    let mut c = client::h1(bind).await?;
    let mut ask = async |user: &str| {
        let req = Request::get("/")
            .header("host", "catalog")
            .header("x-user", user)
            .body(empty())
            .unwrap();
        client::collect(c.send(req).await.unwrap()).await.unwrap()
    };
    let mut allowed = 0;
    let mut refused = None;
    let started = std::time::Instant::now();
    for _ in 0..12 {
        let r = ask("a").await;
        match r.status.as_u16() {
            200 => allowed += 1,
            429 => refused = Some(r),
            other => panic!("unexpected {other}"),
        }
    }
    // The token-bucket bound: the burst of 5, plus what refilled at 5/s meanwhile.
    let refill = (started.elapsed().as_secs_f64() * 5.0).ceil() as i32;
    assert!(
        allowed >= 5 && allowed <= 5 + refill,
        "{allowed} of 12 allowed ({refill} refilled)"
    );
    let r = refused.expect("some refused");
    assert_eq!(
        r.header("sinew-error"),
        Some("rate-limited: shop/catalog/per-user")
    );
    assert!(
        r.header("retry-after")
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|s| s >= 1)
    );
    // Another key has its own bucket.
    assert_eq!(ask("b").await.status, 200);
    client_proxy.shutdown().await;
    server.shutdown().await;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn hedging_cuts_the_tail_of_a_slow_five_percent() -> TestResult {
    let (a, b) = (
        HttpBackend::start("a").await?,
        HttpBackend::start("b").await?,
    );
    a.slow(20, Duration::from_secs(1));
    b.slow(20, Duration::from_secs(1));
    let bind = free_addr();
    let file = two_endpoints(
        bind,
        &a,
        &b,
        &[
            json!({
                "matches": [{"path": {"value": "/hedged"}}],
                "retry": {"attempts": 1, "hedge": {"delay": "50ms"}, "budget": {"ratio": 1.0}},
            }),
            json!({"matches": [{"path": {"value": "/plain"}}]}),
        ],
    );
    let proxy = sinew_proxy::Proxy::start(options(&file.path, "client"))?;
    assert!(proxy.shared().is_ready());
    let mut c = client::h1(bind).await?;
    async fn slow_answers(c: &mut sinew_testkit::client::H1, path: &str) -> u32 {
        let mut over = 0;
        for _ in 0..300 {
            let t = tokio::time::Instant::now();
            let r = c.get("catalog", path).await.unwrap();
            assert_eq!(r.status, 200);
            if t.elapsed() >= Duration::from_millis(500) {
                over += 1;
            }
        }
        over
    }
    let plain = slow_answers(&mut c, "/plain").await;
    let hedged = slow_answers(&mut c, "/hedged").await;
    // A slow 5% of 300: ~15 slow answers unhedged; hedged, a request is slow only
    // if its hedge is slow too (~0.25%, ~0.75 expected). Stated bounds: >= 5, <= 4.
    eprintln!("slow answers of 300: {plain} without hedging, {hedged} with");
    assert!(plain >= 5, "{plain} slow answers without hedging");
    assert!(hedged <= 4, "{hedged} slow answers with hedging");
    let hedges = metric(&proxy, "sinew_hedges_total").await.unwrap_or(0.0);
    assert!(
        (5.0..60.0).contains(&hedges),
        "hedges sent only for slow tries: {hedges}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_take_down_endpoints_out_and_put_them_back() -> TestResult {
    let (a, b) = (
        HttpBackend::start("a").await?,
        HttpBackend::start("b").await?,
    );
    let bind = free_addr();
    let file = config_file(&round_robin(bind, &a, &b).with(traffic_policy(
        "healthCheck",
        json!({"path": "/healthz", "interval": "50ms", "timeout": "1s", "unhealthyThreshold": 2}),
    )));
    let proxy = start(&file, "client").await;
    // a fails its checks (and everything else): after two, it gets no more traffic.
    a.fail_with(Some(503));
    wait::until("a taken out", TIMEOUT, || async {
        let mut c = client::h1(bind).await.unwrap();
        let mut all_ok = true;
        for _ in 0..6 {
            all_ok &= c.get("catalog", "/").await.is_ok_and(|r| r.status == 200);
        }
        all_ok
    })
    .await?;
    let mut c = client::h1(bind).await?;
    for _ in 0..40 {
        let r = c.get("catalog", "/").await?;
        assert_eq!((r.status.as_u16(), r.header("x-backend")), (200, Some("b")));
    }
    // Healed: the next passing check puts it back.
    a.fail_with(None);
    wait::until("a back", TIMEOUT, || async {
        client::get(bind, "catalog", "/")
            .await
            .is_ok_and(|r| r.header("x-backend") == Some("a"))
    })
    .await?;
    proxy.shutdown().await;
    Ok(())
}

/// A workload of catalog at `addr` in the topology zone `zone`.
fn zoned_workload(name: &str, addr: SocketAddr, zone: &str) -> Workload {
    Workload::new(name, "catalog", addr).label("topology.kubernetes.io/zone", zone)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_keeps_each_user_on_one_endpoint() -> TestResult {
    let backends = [
        HttpBackend::start("a").await?,
        HttpBackend::start("b").await?,
        HttpBackend::start("c").await?,
    ];
    let bind = free_addr();
    let mut docs = shop();
    docs.add(client_proxy(bind, "catalog"))
        .add(Service::http("catalog"));
    for (i, b) in backends.iter().enumerate() {
        docs.add(Workload::new(&format!("w{i}"), "catalog", b.addr()));
    }
    docs.add(traffic_policy("ringHash", json!({"header": "x-user"})));
    let file = config_file(&docs);
    let proxy = start(&file, "client").await;
    let mut c = client::h1(bind).await?;
    let mut used = std::collections::HashSet::new();
    for u in 0..30 {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..8 {
            let req = Request::get("/")
                .header("host", "catalog")
                .header("x-user", format!("user-{u}"))
                .body(empty())?;
            let r = client::collect(c.send(req).await?).await?;
            seen.insert(r.header("x-backend").unwrap_or("-").to_owned());
        }
        assert_eq!(seen.len(), 1, "user-{u} stuck to one endpoint: {seen:?}");
        used.extend(seen);
    }
    assert_eq!(
        used.len(),
        3,
        "30 users spread over the endpoints: {used:?}"
    );
    proxy.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_prefers_the_callers_zone_and_spills_over() -> TestResult {
    let (near, far1, far2) = (
        HttpBackend::start("near").await?,
        HttpBackend::start("far1").await?,
        HttpBackend::start("far2").await?,
    );
    let bind = free_addr();
    let file = config_file(
        &shop()
            .with(client_proxy(bind, "catalog").workload("web-1"))
            .with(Service::http("catalog"))
            .with(Service::http("web"))
            .with(
                Workload::new("web-1", "web", SocketAddr::from(([127, 0, 0, 1], 1)))
                    .label("topology.kubernetes.io/zone", "zone-a"),
            )
            .with(zoned_workload("near", near.addr(), "zone-a"))
            .with(zoned_workload("far1", far1.addr(), "zone-b"))
            .with(zoned_workload("far2", far2.addr(), "zone-b"))
            .with(traffic_policy("localityPreference", json!(true)).field(
                "outlierDetection",
                json!({"consecutiveFailures": 2, "baseEjectionTime": "30s"}),
            )),
    );
    let proxy = start(&file, "client").await;
    let mut c = client::h1(bind).await?;
    for _ in 0..30 {
        assert_eq!(
            c.get("catalog", "/").await?.header("x-backend"),
            Some("near")
        );
    }
    assert_eq!(
        far1.requests() + far2.requests(),
        0,
        "the other zone gets nothing while the near one is healthy"
    );
    // The near endpoint fails: ejected, traffic spills over to the other zone.
    near.fail_with(Some(503));
    let _ = c.get("catalog", "/").await?;
    let _ = c.get("catalog", "/").await?;
    for _ in 0..20 {
        let r = c.get("catalog", "/").await?;
        assert_eq!(r.status, 200);
        assert!(r.header("x-backend").is_some_and(|b| b.starts_with("far")));
    }
    assert!(
        far1.requests() > 0 && far2.requests() > 0,
        "spread over the other zone"
    );
    proxy.shutdown().await;
    Ok(())
}

/// Percent-encodes a URL query value.
fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Runs `promtool check metrics` on a proxy's `/metrics`; returns what it said.
async fn promtool_check(proxy: &sinew_proxy::Proxy) -> (bool, String) {
    let text = admin(proxy, "/metrics").await.text();
    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is needed: ./scripts/test installs it");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(text.as_bytes()).await.expect("write");
    drop(stdin);
    let out = child.wait_with_output().await.expect("promtool ran");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_golden_metrics_and_answers_success_rate() -> TestResult {
    let app = HttpBackend::start("app").await?;
    let mesh = mesh_pair(app.addr(), "HTTP").await;
    let mut c = client::h1(mesh.bind).await?;
    for i in 0..30 {
        let path = if i % 3 == 0 { "/status/503" } else { "/" };
        c.get("catalog", path).await?;
    }
    // Every proxy's output passes promtool's checks (format and lint).
    for p in [&mesh.client, &mesh.server] {
        let (ok, said) = promtool_check(p).await;
        assert!(ok && said.trim().is_empty(), "promtool: {said}");
    }
    let text = admin(&mesh.client, "/metrics").await.text();
    assert!(
        text.contains(
            "sinew_requests_total{direction=\"outbound\",service=\"catalog.shop\",route=\"default\",peer_identity=\"\",status_code=\"503\",grpc_status=\"\"} 10"
        ),
        "{text}"
    );
    assert!(
        text.contains("sinew_request_duration_seconds_count{direction=\"outbound\",service=\"catalog.shop\",route=\"default\",class=\"2xx\"} 20"),
        "{text}"
    );

    // The shipped scrape configuration and recording rules pass promtool.
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../observability");
    for (what, file) in [("config", "prometheus.yml"), ("rules", "rules.yml")] {
        let out = tokio::process::Command::new("promtool")
            .args(["check", what])
            .arg(shipped.join(file))
            .output()
            .await?;
        assert!(
            out.status.success(),
            "promtool check {what} {file}: {out:?}"
        );
    }

    // A real Prometheus, with the shipped rules (evaluated every second here),
    // scrapes both proxies and answers for the success rate.
    let dir = std::env::temp_dir().join(format!("sinew-prom-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let rules = std::fs::read_to_string(shipped.join("rules.yml"))?;
    assert!(rules.contains("interval: 15s"));
    std::fs::write(
        dir.join("rules.yml"),
        rules.replace("interval: 15s", "interval: 1s"),
    )?;
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [\"{}\"]\nscrape_configs:\n  - job_name: sinew\n    static_configs: [{{targets: [\"{}\", \"{}\"]}}]\n",
            dir.join("rules.yml").display(),
            mesh.client.admin_addr(),
            mesh.server.admin_addr()
        ),
    )?;
    let web = free_addr();
    let _prom = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log"))?)
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus (Debian package prometheus) is needed: ./scripts/test installs it");
    let success = "sum(sinew_requests_total{direction=\"outbound\",service=\"catalog.shop\",status_code=~\"2..\"}) / sum(sinew_requests_total{direction=\"outbound\",service=\"catalog.shop\"})";
    let inbound = "sum(sinew_requests_total{direction=\"inbound\"})";
    let ask = async |q: &str| -> Option<f64> {
        let r = client::get(
            web,
            "prometheus",
            &format!("/api/v1/query?query={}", query_escape(q)),
        )
        .await
        .ok()?;
        let v = r.json().ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    let answered = wait::until("prometheus answers", TIMEOUT, || async {
        ask(success).await.is_some() && ask(inbound).await.is_some()
    })
    .await;
    if let Err(e) = answered {
        let targets = client::get(web, "prometheus", "/api/v1/targets")
            .await
            .map(|r| r.text())
            .unwrap_or_default();
        let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();

        return Err(format!("{e}\ntargets: {targets}\nlog: {log}").into());
    }
    let rate = ask(success).await.ok_or("no success rate")?;
    assert!((rate - 20.0 / 30.0).abs() < 1e-9, "success rate {rate}");
    assert_eq!(ask(inbound).await, Some(30.0));

    // Under steady load (one in three answers a 503), the recorded success rate
    // settles at 2/3: within 0.05, as a 1-minute rate over whole scrapes can cut
    // the 3-request pattern at its edges.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let bind = mesh.bind;
        tokio::spawn(async move {
            let mut c = client::h1(bind).await.expect("connect");
            let mut i = 0u64;
            // Paced at ~200 rps: steady load, not a wait.
            let mut pace = tokio::time::interval(Duration::from_millis(5));
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                pace.tick().await;
                let path = if i.is_multiple_of(3) {
                    "/status/503"
                } else {
                    "/"
                };
                c.get("catalog", path).await.expect("request");
                i += 1;
            }
        })
    };
    let recorded = "sinew:success:ratio_rate1m{direction=\"outbound\",service=\"catalog.shop\"}";
    wait::until("the recording rule has a value", TIMEOUT, || async {
        ask(recorded).await.is_some_and(|v| v.is_finite())
    })
    .await?;
    let r = ask(recorded).await.ok_or("no recorded success rate")?;
    assert!((r - 2.0 / 3.0).abs() < 0.05, "recorded success rate {r}");
    // Every query of the shipped dashboard is valid PromQL with an answer.
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        shipped.join("grafana-dashboard.json"),
    )?)?;
    let panels = dashboard["panels"].as_array().ok_or("no panels")?;
    assert!(panels.len() >= 4);
    for p in panels {
        for t in p["targets"].as_array().ok_or("no targets")? {
            let expr = t["expr"].as_str().ok_or("no expr")?;
            let q = expr
                .replace("$direction", "outbound")
                .replace("$service", ".*")
                .replace("$__rate_interval", "1m");
            let r = client::get(
                web,
                "prometheus",
                &format!("/api/v1/query?query={}", query_escape(&q)),
            )
            .await?;
            let v = r.json()?;
            assert_eq!(v["status"], "success", "{} : {q}: {v}", p["title"]);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await?;
    let _ = std::fs::remove_dir_all(&dir);
    mesh.client.shutdown().await;
    mesh.server.shutdown().await;
    Ok(())
}

/// A `sinew-proxy` process in front of one service with JSON access logs on, its
/// standard output (the log) read line by line.
struct LoggingProxy {
    _child: tokio::process::Child,
    /// Kept while the proxy runs: it watches the file.
    _file: ConfigFile,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    admin: SocketAddr,
}

impl LoggingProxy {
    /// Starts it, ready, with an upstream binding (returned) for `svc` at `backend`.
    async fn start(
        svc: &str,
        protocol: &str,
        backend: SocketAddr,
    ) -> Result<(SocketAddr, LoggingProxy), Box<dyn std::error::Error + Send + Sync>> {
        let bind = free_addr();
        let admin = free_addr();
        let file = config_file(
            &shop()
                .with(client_proxy(bind, svc).field("accessLog", json!({"format": "json"})))
                .with(Service::new(svc, protocol))
                .with(Workload::new(&format!("{svc}-1"), svc, backend)),
        );
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sinew-proxy"))
            .arg("--config")
            .arg(&file.path)
            .arg("--name")
            .arg("client")
            .arg("--admin")
            .arg(admin.to_string())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let lines = tokio::io::BufReader::new(stdout).lines();
        wait::ready("proxy process ready", admin, TIMEOUT).await?;
        Ok((
            bind,
            LoggingProxy {
                _child: child,
                _file: file,
                lines,
                admin,
            },
        ))
    }

    /// The next access-log line, parsed.
    async fn next_json(
        &mut self,
    ) -> Result<serde_json::Value, Box<dyn std::error::Error + Send + Sync>> {
        let line = tokio::time::timeout(TIMEOUT, self.lines.next_line())
            .await
            .map_err(|_| "no access-log line")??
            .ok_or("stdout closed")?;
        Ok(serde_json::from_str(&line)?)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_logs_write_one_json_line_per_request_off_the_request_path() -> TestResult {
    let app = HttpBackend::start("app").await?;
    let (bind, mut proxy) = LoggingProxy::start("catalog", "HTTP", app.addr()).await?;
    let mut c = client::h1(bind).await?;
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let req = Request::get("/items/7?token=secret")
        .header("host", "catalog")
        .header("traceparent", format!("00-{trace}-b7ad6b7169203331-01"))
        .body(empty())?;
    assert_eq!(client::collect(c.send(req).await?).await?.status, 200);
    let req = Request::get("/never")
        .header("host", "catalog")
        .header("sinew-timeout-ms", "50")
        .body(empty())?;
    assert_eq!(client::collect(c.send(req).await?).await?.status, 504);
    let first = proxy.next_json().await?;
    assert_eq!(first["direction"], "outbound");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["authority"], "catalog");
    assert_eq!(
        first["path"], "/items/7",
        "the query string is never logged"
    );
    assert_eq!(first["status"], 200);
    assert_eq!(first["service"], "catalog.shop");
    assert_eq!(first["route"], "default");
    assert_eq!(first["upstream"], app.addr().to_string());
    assert_eq!(first["traceId"], trace);
    assert_eq!(first["error"], serde_json::Value::Null);
    assert!(first["durationMs"].as_f64().is_some_and(|d| d > 0.0));
    assert!(first["start"].as_str().is_some_and(|s| s.ends_with('Z')));
    let second = proxy.next_json().await?;
    assert_eq!(second["status"], 504);
    assert_eq!(second["error"], "request-timeout");
    Ok(())
}

/// The access log and the metrics are written when a response has ended: a gRPC
/// status sent in trailers (every call that returned a message) is seen, and bytes
/// are those really sent, with or without a `content-length`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observers_see_grpc_trailers_and_the_bytes_sent() -> TestResult {
    let echo = grpc::EchoServer::start("echo-1").await?;
    let (bind, mut proxy) = LoggingProxy::start("echo", "GRPC", echo.addr()).await?;
    let mut c = grpc::connect(bind).await?;
    c.unary(EchoRequest {
        message: "hi".into(),
    })
    .await?;
    let mut stream = c
        .server_stream(StreamRequest { count: 5 })
        .await?
        .into_inner();
    while stream.message().await?.is_some() {}
    let failed = c
        .fail(EchoRequest {
            message: "x".into(),
        })
        .await;
    assert_eq!(
        failed.err().map(|s| s.code()),
        Some(tonic::Code::FailedPrecondition)
    );
    let unary = proxy.next_json().await?;
    assert_eq!(unary["path"], "/sinew.test.v1.Echo/Unary");
    assert_eq!(unary["grpcStatus"], "0", "from the trailers: {unary}");
    assert_eq!(unary["end"], "complete");
    // One message: a 5-byte gRPC frame header, then `message: "hi"` and `server:
    // "echo-1"` (2 + 2 and 2 + 6 bytes).
    assert_eq!(unary["responseBytes"], 5 + 4 + 8, "{unary}");
    let stream = proxy.next_json().await?;
    assert_eq!(stream["grpcStatus"], "0", "{stream}");
    // Five messages `message-N` (2 + 9) and `server: "echo-1"` (2 + 6).
    assert_eq!(stream["responseBytes"], 5 * (5 + 11 + 8), "{stream}");
    assert!(stream["durationMs"].as_f64() >= stream["headMs"].as_f64());
    let fail = proxy.next_json().await?;
    assert_eq!(
        fail["grpcStatus"], "9",
        "trailers-only, in the head: {fail}"
    );
    assert_eq!(fail["responseBytes"], 0);

    let m = client::get(proxy.admin, "admin", "/metrics").await?.text();
    let count = |grpc: &str| {
        m.lines()
            .find(|l| {
                l.starts_with("sinew_requests_total{direction=\"outbound\",service=\"echo.shop\"")
                    && l.contains(&format!("grpc_status=\"{grpc}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_owned)
    };
    assert_eq!(count("0").as_deref(), Some("2"), "{m}");
    assert_eq!(count("9").as_deref(), Some("1"), "{m}");
    assert_eq!(count(""), None, "no call went without its status: {m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_streams_matching_requests_without_secrets() -> TestResult {
    let app = HttpBackend::start("app").await?;
    let bind = free_addr();
    // A route that injects a credential, and one that matches on a header's value.
    let file = config_file(
        &shop()
            .with(client_proxy(bind, "catalog"))
            .with(Service::http("catalog"))
            .with(Workload::new("catalog-1", "catalog", app.addr()))
            .with(
                HttpRoute::new("inject", "catalog")
                    .rule(json!({"matches": [{"headers": [
                        {"name": "x-tenant-key", "value": "match-s3cret"},
                    ]}]}))
                    .rule(json!({"filters": [{
                        "type": "RequestHeaderModifier",
                        "requestHeaderModifier": {
                            "set": [{"name": "authorization", "value": "Bearer injected-s3cret"}],
                            "add": [{"name": "x-upstream-key", "value": "added-s3cret"}],
                        },
                    }]})),
            ),
    );
    let proxy = start(&file, "client").await;
    // /config names the injected and matched headers, never their values.
    let config = admin(&proxy, "/config").await.text();
    for secret in ["injected-s3cret", "added-s3cret", "match-s3cret"] {
        assert!(!config.contains(secret), "{secret} in /config: {config}");
    }
    let cfg: serde_json::Value = serde_json::from_str(&config)?;
    // Wherever the rule sits in the config: the first `requestHeaders`.
    fn find(v: &serde_json::Value, key: &str) -> Option<serde_json::Value> {
        match v {
            serde_json::Value::Object(m) => m
                .get(key)
                .cloned()
                .or_else(|| m.values().find_map(|v| find(v, key))),
            serde_json::Value::Array(a) => a.iter().find_map(|v| find(v, key)),
            _ => None,
        }
    }
    let edits = find(&cfg, "requestHeaders")
        .ok_or_else(|| format!("no header edits in /config: {config}"))?;
    assert_eq!(
        edits["set"],
        serde_json::json!([["authorization", "<redacted>"]]),
        "{config}"
    );
    assert_eq!(
        edits["add"],
        serde_json::json!([["x-upstream-key", "<redacted>"]])
    );
    assert!(config.contains("x-tenant-key"), "{config}");
    // A bad filter is refused, naming what was wrong.
    let bad = admin(&proxy, "/tap?status=5").await;
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("status"), "{}", bad.text());

    let mut tapper = client::h1(proxy.admin_addr()).await?;
    let req = Request::get("/tap?path=%2Fa&limit=2")
        .header("host", "admin")
        .body(empty())?;
    let mut body = tapper.send(req).await?.into_body();
    let mut buf = Vec::new();
    let mut lines = Vec::new();
    // Reads until `n` lines have arrived (or the stream ends).
    async fn read_lines(
        body: &mut hyper::body::Incoming,
        buf: &mut Vec<u8>,
        lines: &mut Vec<serde_json::Value>,
        n: usize,
    ) -> TestResult {
        while lines.len() < n {
            let frame = tokio::time::timeout(TIMEOUT, body.frame())
                .await
                .map_err(|_| "no tap line")?;
            let Some(frame) = frame else { break };
            if let Ok(data) = frame?.into_data() {
                buf.extend_from_slice(&data);
            }
            while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                lines.push(serde_json::from_slice(&line)?);
            }
        }
        Ok(())
    }
    read_lines(&mut body, &mut buf, &mut lines, 1).await?;
    assert_eq!(lines[0]["tap"], "started", "the tap is live");
    let mut c = client::h1(bind).await?;
    for (path, auth) in [
        ("/b", None),
        ("/a/1?q=secret", Some("Bearer s3cret")),
        ("/a/2", None),
    ] {
        let mut req = Request::get(path)
            .header("host", "catalog")
            .header("user-agent", "tap-test")
            .header("x-auth-token", "token-s3cret")
            .header("x-amz-security-token", "amz-s3cret");
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = client::collect(c.send(req.body(empty())?).await?).await?;
        assert_eq!(r.status, 200);
    }
    read_lines(&mut body, &mut buf, &mut lines, 3).await?;
    let paths: Vec<&str> = lines[1..]
        .iter()
        .filter_map(|l| l["path"].as_str())
        .collect();
    assert_eq!(
        paths,
        vec!["/a/1", "/a/2"],
        "only matching requests, no query strings"
    );
    assert_eq!(lines[1]["headers"]["authorization"], "<redacted>");
    // Not only the well-known names: every header not known to be safe.
    assert_eq!(lines[1]["headers"]["x-auth-token"], "<redacted>");
    assert_eq!(lines[1]["headers"]["x-amz-security-token"], "<redacted>");
    assert_eq!(lines[1]["headers"]["user-agent"], "tap-test");
    assert_eq!(lines[1]["headers"]["host"], "catalog");
    let all = serde_json::to_string(&lines)?;
    assert!(!all.contains("s3cret"), "a secret in the tap: {all}");
    assert_eq!(lines[1]["status"], 200);
    assert_eq!(lines[1]["service"], "catalog.shop");
    assert_eq!(lines[1]["upstream"], app.addr().to_string());
    // The limit ends the stream, and the tap stops costing anything.
    let end = tokio::time::timeout(TIMEOUT, body.frame()).await?;
    assert!(end.is_none(), "the stream ends after `limit` events");
    wait::until("tap released", TIMEOUT, || async {
        !proxy.shared().tap.active()
    })
    .await?;
    proxy.shutdown().await;
    Ok(())
}
