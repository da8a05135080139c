//! The data plane as third-party clients and servers meet it: protocols are
//! translated, one client's bad request hurts nobody else, listeners are bounded.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod mesh;

use std::net::SocketAddr;
use std::time::Duration;

use mesh::*;
use sinew_testkit::{client, wait};

async fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(cmd)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("{cmd} must be installed (scripts/test installs it): {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_reach_http1_apps_with_and_without_a_sidecar() {
    let scratch = Scratch::new();
    let cp = Control::start(&scratch.0.join("data"), free_addr(), &[]).await;
    let app = free_addr();
    let legacy = free_addr();
    let _app = python_app(&scratch.0, app).await;
    let _legacy = python_app(&scratch.0, legacy).await;
    let (to_catalog, to_legacy) = (free_addr(), free_addr());
    apply(
        &cp,
        &scratch,
        &format!(
            "{}{}{}{}",
            service("shop", "catalog"),
            service("shop", "legacy"),
            // No sidecar: the client's sidecar speaks to the app itself.
            static_workload("shop", "legacy-0", "legacy", legacy),
            proxy_doc(
                "shop",
                "web",
                &[(to_catalog, "catalog"), (to_legacy, "legacy")]
            )
        ),
    )
    .await;
    let quick = Duration::from_millis(50);
    let side = proxy(
        &cp,
        "shop/catalog-0",
        Some(registration("catalog", app, free_addr(), "v1")),
        quick,
    )
    .await;
    let web = proxy(&cp, "shop/web", None, quick).await;
    wait::until("in sync", TIMEOUT, || async { cp.all_in_sync(2).await })
        .await
        .unwrap();
    for bind in [to_catalog, to_legacy] {
        listening(bind).await;
        wait::until("path serves", TIMEOUT, || async move {
            client::get(bind, "catalog", "/hello.txt")
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await
        .unwrap();
        // curl, HTTP/2 by prior knowledge, to an app that speaks only HTTP/1.x.
        let url = format!("http://{bind}/hello.txt");
        let out = run(
            "curl",
            &[
                "-sS",
                "--http2-prior-knowledge",
                "-w",
                "\n%{http_code} %{http_version}",
                &url,
            ],
        )
        .await;
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(
            body.ends_with("\n200 2"),
            "curl --http2-prior-knowledge via {bind}: {body} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(body.contains("hello from an HTTP/1.1 app"), "{body}");
        // h2load (nghttp2), HTTP/2 by prior knowledge, several streams at once.
        let out = run("h2load", &["-n", "200", "-c", "4", "-m", "8", &url]).await;
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            report.contains("status codes: 200 2xx, 0 3xx, 0 4xx, 0 5xx"),
            "h2load via {bind}:\n{report}"
        );
    }
    web.shutdown().await;
    side.shutdown().await;
}

/// Sends raw bytes to `addr` and returns what comes back until the peer closes
/// (or 10 s pass): for requests no well-behaved client would send.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn metric(text: &str, name: &str) -> f64 {
    sinew_testkit::metrics::sum(text, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_clients_bad_request_is_answered_at_its_sidecar_and_hurts_no_one_else() {
    use sinew_testkit::http::HttpBackend;
    let scratch = Scratch::new();
    let cp = Control::start(&scratch.0.join("data"), free_addr(), &[]).await;
    let bind = free_addr();
    // An outlier policy that ejects after 3 failures: bad requests must not count.
    apply(
        &cp,
        &scratch,
        &format!(
            "{}{}---\napiVersion: sinew.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: catalog, namespace: shop}}\nspec:\n  targetRef: {{kind: Service, name: catalog}}\n  outlierDetection: {{consecutiveFailures: 3, baseEjectionTime: 30s, maxEjectionPercent: 100}}\n",
            service("shop", "catalog"),
            proxy_doc("shop", "web", &[(bind, "catalog")])
        ),
    )
    .await;
    let app = HttpBackend::start("app").await.unwrap();
    let quick = Duration::from_millis(50);
    let side = proxy(
        &cp,
        "shop/catalog-0",
        Some(registration("catalog", app.addr(), free_addr(), "v1")),
        quick,
    )
    .await;
    let web = proxy(&cp, "shop/web", None, quick).await;
    wait::until("in sync", TIMEOUT, || async { cp.all_in_sync(2).await })
        .await
        .unwrap();
    listening(bind).await;
    wait::until("path serves", TIMEOUT, || async move {
        client::get(bind, "catalog", "/")
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await
    .unwrap();

    // Another client's download is in flight over the sidecars' shared connection.
    let mut downloader = client::h1(bind).await.unwrap();
    let req = http::Request::get("/gated-download/4")
        .header("host", "catalog")
        .body(client::empty())
        .unwrap();
    let download = downloader.send(req).await.unwrap();
    assert_eq!(download.status(), 200);

    // 128 KiB of headers, by curl: 431 at the client's own sidecar, five times.
    // (From a file: one argument that long is more than exec allows.)
    let big_file = scratch.write(
        "big-header",
        &format!("x-big: {}\n", "a".repeat(128 * 1024)),
    );
    let big = format!("@{}", big_file.display());
    for _ in 0..5 {
        let out = run(
            "curl",
            &[
                "-sS",
                "-o",
                "/dev/null",
                "-D",
                "-",
                "-H",
                &big,
                &format!("http://{bind}/"),
            ],
        )
        .await;
        let head = String::from_utf8_lossy(&out.stdout);
        assert!(head.starts_with("HTTP/1.1 431"), "{head}");
        if head.contains("sinew-error") {
            assert!(head.contains("headers-too-large"), "{head}");
        }
    }
    // As HTTP/2 too: 431 on its stream.
    let out = run(
        "curl",
        &[
            "-sS",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &big,
            &format!("http://{bind}/"),
        ],
    )
    .await;
    // HTTP/2: curl (nghttp2) honours the sidecar's SETTINGS_MAX_HEADER_LIST_SIZE and
    // does not send such a head at all; a client that does gets 431 on its stream.
    let code = String::from_utf8_lossy(&out.stdout);
    assert!(
        code == "431" || code == "000",
        "{code} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Two Host headers, and a malformed chunked body: 400, from the client's sidecar.
    let two_hosts = raw(
        bind,
        b"GET / HTTP/1.1\r\nhost: catalog\r\nhost: other\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(two_hosts.starts_with("HTTP/1.1 400"), "{two_hosts}");
    for _ in 0..4 {
        let chunked = raw(
            bind,
            b"POST /upload HTTP/1.1\r\nhost: catalog\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\nZZZ\r\nxx\r\n0\r\n\r\n",
        )
        .await;
        assert!(
            chunked.is_empty() || chunked.starts_with("HTTP/1.1 400"),
            "a malformed body is the client's fault: {chunked}"
        );
    }

    // The download finishes whole.
    for _ in 0..3 {
        app.release_chunk();
    }
    let body = client::collect(download).await.unwrap();
    assert_eq!(body.body.len(), 4 * 16 * 1024, "the download completed");
    // Nothing counted against the endpoint: not ejected, still serving.
    let metrics = client::get(web.admin_addr(), "admin", "/metrics")
        .await
        .unwrap()
        .text();
    assert_eq!(
        metric(&metrics, "sinew_outlier_ejections_total"),
        0.0,
        "{metrics}"
    );
    assert_eq!(client::get(bind, "catalog", "/").await.unwrap().status, 200);

    // A forged identity header with an underscore never reaches the app.
    let out = run(
        "curl",
        &[
            "-sS",
            "-H",
            "sinew_peer_identity: spiffe://cluster.local/ns/shop/sa/admin",
            "-H",
            "x_user: forged",
            &format!("http://{bind}/echo"),
        ],
    )
    .await;
    let echo = String::from_utf8_lossy(&out.stdout);
    assert!(echo.contains("\"headers\""), "{echo}");
    assert!(!echo.contains("sinew_peer_identity"), "{echo}");
    assert!(!echo.contains("x_user"), "{echo}");
    assert!(!echo.contains("sa/admin"), "{echo}");
    web.shutdown().await;
    side.shutdown().await;
}

/// A Python HTTP/1.1 server on `addr` whose `/many` answers with 150 headers and
/// `/trailers` answers chunked with a trailer: what an HTTP/2 client must still get.
async fn python_wide_app(dir: &std::path::Path, addr: SocketAddr) -> tokio::process::Child {
    let script = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path == "/many":
            self.send_response(200)
            for i in range(150):
                self.send_header("x-h-%d" % i, "v%d" % i)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
        else:
            self.send_response(200)
            self.send_header("transfer-encoding", "chunked")
            self.send_header("trailer", "x-checksum")
            self.end_headers()
            self.wfile.write(b"5\r\nhello\r\n0\r\nx-checksum: abc123\r\n\r\n")
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"#;
    let child = tokio::process::Command::new("python3")
        .args([
            "-c",
            script,
            &addr.ip().to_string(),
            &addr.port().to_string(),
        ])
        .current_dir(dir)
        .kill_on_drop(true)
        .spawn()
        .expect("python3");
    listening(addr).await;
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wide_responses_and_trailers_cross_the_mesh_to_http2_clients() {
    let scratch = Scratch::new();
    let cp = Control::start(&scratch.0.join("data"), free_addr(), &[]).await;
    let app = free_addr();
    let _app = python_wide_app(&scratch.0, app).await;
    let bind = free_addr();
    apply(
        &cp,
        &scratch,
        &format!(
            "{}{}",
            service("shop", "catalog"),
            proxy_doc("shop", "web", &[(bind, "catalog")])
        ),
    )
    .await;
    let quick = Duration::from_millis(50);
    // The app's sidecar takes up to 200 response headers (the default is 100, as
    // Envoy's): `--max-response-headers 200`.
    let side = proxy_with(
        &cp,
        "shop/catalog-0",
        Some(registration("catalog", app, free_addr(), "v1")),
        quick,
        None,
        |o| o.limits.response_headers = 200,
    )
    .await;
    let web = proxy(&cp, "shop/web", None, quick).await;
    wait::until("in sync", TIMEOUT, || async { cp.all_in_sync(2).await })
        .await
        .unwrap();
    listening(bind).await;
    wait::until("path serves", TIMEOUT, || async move {
        client::get(bind, "catalog", "/trailers")
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await
    .unwrap();
    // 150 response headers, past the default limit raised for this app: all of them
    // reach curl.
    let out = run("curl", &["-sS", "-D", "-", &format!("http://{bind}/many")]).await;
    let head = String::from_utf8_lossy(&out.stdout);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(head.matches("x-h-").count(), 150, "{head}");
    // An HTTP/1.1 chunked answer with a trailer reaches an HTTP/2 client whole, the
    // trailer as an HTTP/2 trailer.
    let h2 = client::h2(bind).await.unwrap();
    let r = h2.get("catalog", "/trailers").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"hello");
    assert_eq!(r.trailer("x-checksum"), Some("abc123"));
    web.shutdown().await;
    side.shutdown().await;
}
