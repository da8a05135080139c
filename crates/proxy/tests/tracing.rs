//! Distributed tracing end to end: a client sidecar and a server sidecar in-process,
//! a real app backend, and a real OTLP receiver (`scripts/otlp_receiver.py`, built on
//! the published OpenTelemetry protobuf definitions) that the proxies export to over
//! gRPC and over HTTP/protobuf.
//!
//! The receiver needs `python3` with the pip packages `opentelemetry-proto` and
//! `grpcio` (`./scripts/test` installs them); without them these tests fail, saying so.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Request;
use serde_json::{Value, json};
use sinew_proxy::Proxy;
use sinew_testkit::client::{self, Collected, empty};
use sinew_testkit::http::HttpBackend;
use sinew_testkit::mesh::{self, Service, Workload};
use sinew_testkit::wait;
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

/// The OTLP receiver, as a child process; its spans, as they arrive.
struct Receiver {
    grpc: SocketAddr,
    http: SocketAddr,
    spans: Arc<Mutex<Vec<Value>>>,
    // Killed on drop; its stdin closing makes it exit as well.
    _child: Child,
}

impl Receiver {
    async fn start() -> Receiver {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/otlp_receiver.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg("--exit-on-stdin-eof")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run python3 for the OTLP receiver ({e}); install python3 and \
                     `python3 -m pip install opentelemetry-proto grpcio` (./scripts/test does)"
                )
            });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut stderr = child.stderr.take().unwrap();
        let first = tokio::time::timeout(TIMEOUT, lines.next_line())
            .await
            .expect("the OTLP receiver did not report ready in time")
            .unwrap();
        let Some(first) = first else {
            let mut why = String::new();
            let _ = stderr.read_to_string(&mut why).await;
            let status = child.wait().await;
            panic!("the OTLP receiver did not start ({status:?}):\n{why}");
        };
        let ready: Value = serde_json::from_str(&first).unwrap();
        let addr = |k: &str| ready["ready"][k].as_str().unwrap().parse().unwrap();
        let (grpc, http) = (addr("grpc"), addr("http"));
        let spans = Arc::new(Mutex::new(Vec::new()));
        let sink = spans.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let span: Value = serde_json::from_str(&line).unwrap();
                sink.lock().unwrap().push(span);
            }
        });
        // Keep its stderr drained (grpc may log), and shown if a test fails.
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("otlp_receiver: {line}");
            }
        });
        Receiver {
            grpc,
            http,
            spans,
            _child: child,
        }
    }

    fn spans(&self) -> Vec<Value> {
        self.spans.lock().unwrap().clone()
    }

    fn trace(&self, trace_id: &str) -> Vec<Value> {
        self.spans()
            .into_iter()
            .filter(|s| s["trace_id"] == trace_id)
            .collect()
    }

    /// Waits until `trace_id` has `n` spans, and returns them.
    async fn wait_trace(&self, trace_id: &str, n: usize) -> Vec<Value> {
        let found = wait::until(
            &format!("{n} spans of trace {trace_id}"),
            TIMEOUT,
            || async { self.trace(trace_id).len() >= n },
        )
        .await;
        if let Err(e) = found {
            panic!("{e}; received: {:#?}", self.spans());
        }
        self.trace(trace_id)
    }
}

/// The span of `kind` ("CLIENT": the outbound hop, "SERVER": the inbound hop).
fn span<'a>(spans: &'a [Value], kind: &str) -> &'a Value {
    spans
        .iter()
        .find(|s| s["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} span in {spans:#?}"))
}

/// traceparent → (trace id, span id, flags).
fn traceparent(v: &str) -> (String, String, String) {
    let p: Vec<&str> = v.split('-').collect();
    assert_eq!(p.len(), 4, "{v}");
    (p[1].to_owned(), p[2].to_owned(), p[3].to_owned())
}

/// A random, non-zero id of `n` hex digits (16 or 32).
fn hex_id(n: usize) -> String {
    format!("{:0n$x}", fastrand::u128(1..u128::MAX >> (128 - 4 * n)))
}

/// A client sidecar (`client`, binding `bind` to catalog, and `broken` to a service
/// without endpoints), a server sidecar (`server`, for workload `catalog-1`, in front
/// of `app`), and `mesh_doc` (a MeshConfig document, or nothing).
fn mesh_yaml(
    bind: SocketAddr,
    broken: SocketAddr,
    inbound: SocketAddr,
    app: SocketAddr,
    mesh_doc: Option<Value>,
) -> String {
    let mut docs = shop();
    if let Some(m) = mesh_doc {
        docs.add(m);
    }
    docs.with(client_proxy(bind, "catalog").upstream(broken, "empty"))
        .with(
            mesh::Proxy::new("server")
                .workload("catalog-1")
                .inbound(inbound, &[app.port()]),
        )
        .with(Service::http("catalog"))
        .with(Service::http("empty"))
        .with(Workload::new("catalog-1", "catalog", app).sidecar(inbound.port()))
        .yaml()
}

/// The MeshConfig exporting traces to `endpoint`, with the `tracing` fields in
/// `extra` (an object) beside it.
fn tracing_doc(endpoint: &str, extra: Value) -> Option<Value> {
    let mut tracing = json!({"endpoint": endpoint});
    if let (Some(t), Value::Object(more)) = (tracing.as_object_mut(), extra) {
        t.extend(more);
    }
    Some(mesh::resource(
        "MeshConfig",
        "mesh",
        json!({"tracing": tracing}),
    ))
}

struct Mesh {
    file: ConfigFile,
    client: Proxy,
    server: Proxy,
    bind: SocketAddr,
    broken: SocketAddr,
    inbound: SocketAddr,
}

async fn mesh(app: SocketAddr, mesh_doc: Option<Value>) -> Mesh {
    let (bind, broken, inbound) = (free_addr(), free_addr(), free_addr());
    let file = ConfigFile::new(&mesh_yaml(bind, broken, inbound, app, mesh_doc));
    let server = start(&file, "server").await;
    let client = start(&file, "client").await;
    Mesh {
        file,
        client,
        server,
        bind,
        broken,
        inbound,
    }
}

impl Mesh {
    async fn flush(&self) {
        tokio::join!(self.client.flush_traces(), self.server.flush_traces());
    }
}

/// GET `path` through the client sidecar's binding `addr`, with `headers`.
async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Collected {
    let mut req = Request::get(path).header("host", "catalog");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut c = client::h1(addr).await.unwrap();
    client::collect(c.send(req.body(empty()).unwrap()).await.unwrap())
        .await
        .unwrap()
}

/// The request headers the app saw (from its echo).
fn seen(r: &Collected) -> Value {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json().unwrap()["headers"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_continue_the_callers_w3c_and_b3_context_across_both_sidecars() {
    let receiver = Receiver::start().await;
    let app = HttpBackend::start("app").await.unwrap();
    let endpoint = format!("http://{}", receiver.grpc);
    let mesh = mesh(
        app.addr(),
        tracing_doc(&endpoint, json!({"samplingRatio": 1})),
    )
    .await;

    // W3C: the client's trace goes on, one span per sidecar, linked parent to child,
    // and the app gets the server sidecar's span as its parent.
    let (trace, caller) = (hex_id(32), hex_id(16));
    let r = get(
        mesh.bind,
        "/orders/42?secret=1",
        &[
            ("traceparent", &format!("00-{trace}-{caller}-01")),
            ("tracestate", "vendor=abc"),
        ],
    )
    .await;
    let headers = seen(&r);
    let (app_trace, app_parent, flags) = traceparent(headers["traceparent"].as_str().unwrap());
    assert_eq!(app_trace, trace, "the trace id is continued to the app");
    assert_eq!(flags, "01");
    assert_eq!(headers["tracestate"], "vendor=abc", "tracestate travels on");
    assert!(headers.get("b3").is_none(), "no B3 for a W3C caller");
    mesh.flush().await;
    let spans = receiver.wait_trace(&trace, 2).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let (out, inb) = (span(&spans, "CLIENT"), span(&spans, "SERVER"));
    assert_eq!(
        out["parent_span_id"], caller,
        "outbound is the caller's child"
    );
    assert_eq!(
        inb["parent_span_id"], out["span_id"],
        "the server sidecar's span is the client sidecar's child"
    );
    assert_eq!(inb["span_id"], app_parent, "and the app's parent");
    assert_eq!(out["trace_state"], "vendor=abc");
    assert_eq!(out["name"], "outbound catalog.shop");
    assert_eq!(inb["name"], "inbound catalog.shop");
    let (oa, ia) = (&out["attributes"], &inb["attributes"]);
    assert_eq!(oa["sinew.direction"], "outbound");
    assert_eq!(oa["sinew.service"], "catalog.shop");
    assert_eq!(oa["sinew.route"], "default#0");
    assert_eq!(oa["sinew.upstream.address"], mesh.inbound.to_string());
    assert_eq!(oa["sinew.upstream.workload"], "shop/catalog-1");
    assert_eq!(oa["http.request.method"], "GET");
    assert_eq!(oa["url.path"], "/orders/42", "never the query");
    assert_eq!(oa["http.response.status_code"], 200);
    assert_eq!(ia["sinew.direction"], "inbound");
    assert_eq!(ia["sinew.upstream.address"], app.addr().to_string());
    assert_eq!(ia["http.response.status_code"], 200);
    assert_eq!(out["status"]["code"], "UNSET");
    assert_eq!(out["resource"]["service.name"], "client");
    assert_eq!(inb["resource"]["service.name"], "catalog");
    assert_eq!(inb["resource"]["sinew.workload"], "shop/catalog-1");
    assert_eq!(out["transport"], "grpc");

    // B3, single header: continued, and sent on as B3 as well as W3C.
    let (trace, caller) = (hex_id(32), hex_id(16));
    let r = get(mesh.bind, "/b3", &[("b3", &format!("{trace}-{caller}-1"))]).await;
    let headers = seen(&r);
    let b3: Vec<&str> = headers["b3"].as_str().unwrap().split('-').collect();
    assert_eq!(b3[0], trace);
    assert_eq!(b3[2], "1");
    assert_eq!(
        traceparent(headers["traceparent"].as_str().unwrap()).0,
        trace
    );
    mesh.flush().await;
    let spans = receiver.wait_trace(&trace, 2).await;
    let (out, inb) = (span(&spans, "CLIENT"), span(&spans, "SERVER"));
    assert_eq!(out["parent_span_id"], caller);
    assert_eq!(inb["parent_span_id"], out["span_id"]);
    assert_eq!(
        b3[1], inb["span_id"],
        "the app's B3 span is the server sidecar's"
    );
    assert_eq!(b3[3], out["span_id"], "with its parent");

    // B3, multi header with a 64-bit trace id: kept at that width.
    let (short, caller) = (hex_id(16), hex_id(16));
    let r = get(
        mesh.bind,
        "/b3-multi",
        &[
            ("x-b3-traceid", &short),
            ("x-b3-spanid", &caller),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    let headers = seen(&r);
    assert_eq!(headers["x-b3-traceid"], short);
    assert_eq!(headers["x-b3-sampled"], "1");
    mesh.flush().await;
    let spans = receiver.wait_trace(&format!("{:0>32}", short), 2).await;
    let (out, inb) = (span(&spans, "CLIENT"), span(&spans, "SERVER"));
    assert_eq!(out["parent_span_id"], caller);
    assert_eq!(headers["x-b3-spanid"], inb["span_id"]);
    assert_eq!(headers["x-b3-parentspanid"], out["span_id"]);

    // No context: a new trace, rooted at the client sidecar.
    let r = get(mesh.bind, "/new", &[]).await;
    let (trace, _, flags) = traceparent(seen(&r)["traceparent"].as_str().unwrap());
    assert_eq!(flags, "01", "ratio 1 samples every new trace");
    mesh.flush().await;
    let spans = receiver.wait_trace(&trace, 2).await;
    assert_eq!(span(&spans, "CLIENT")["parent_span_id"], "");

    // A caller that did not sample is respected: nothing exported for it.
    let unsampled = hex_id(32);
    let r = get(
        mesh.bind,
        "/unsampled",
        &[("traceparent", &format!("00-{unsampled}-{}-00", hex_id(16)))],
    )
    .await;
    assert!(
        seen(&r)["traceparent"]
            .as_str()
            .unwrap()
            .starts_with(&format!("00-{unsampled}-"))
    );
    mesh.flush().await;
    assert!(receiver.trace(&unsampled).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracing_applies_live_and_exports_failures_when_sampling_says_no() {
    let receiver = Receiver::start().await;
    let app = HttpBackend::start("app").await.unwrap();
    let mesh = mesh(app.addr(), None).await;

    // Off: trace headers pass through untouched.
    let parent = format!("00-{}-{}-01", hex_id(32), hex_id(16));
    let r = get(mesh.bind, "/off", &[("traceparent", &parent), ("b3", "0")]).await;
    let headers = seen(&r);
    assert_eq!(headers["traceparent"], parent.as_str());
    assert_eq!(headers["b3"], "0");

    // On, live: HTTP/protobuf, sampling nothing new, failures exported anyway.
    let endpoint = format!("http://{}", receiver.http);
    let yaml = mesh_yaml(
        mesh.bind,
        mesh.broken,
        mesh.inbound,
        app.addr(),
        tracing_doc(
            &endpoint,
            json!({"protocol": "http/protobuf", "samplingRatio": 0}),
        ),
    );
    let before = (
        generation(&mesh.client).await,
        generation(&mesh.server).await,
    );
    mesh.file.replace(&yaml);
    wait::until("both sidecars applied tracing", TIMEOUT, || async {
        generation(&mesh.client).await > before.0 && generation(&mesh.server).await > before.1
    })
    .await
    .unwrap();
    let config = admin(&mesh.server, "/config").await.json().unwrap();
    let tracing = &config["config"]["tracing"];
    assert_eq!(tracing["endpoint"], format!("{endpoint}/v1/traces"));
    assert_eq!(tracing["protocol"], "http/protobuf");
    assert_eq!(tracing["samplingRatio"], 0.0);
    assert_eq!(tracing["alwaysSampleErrors"], true);

    // Successes are not sampled: the app sees the "no" and nothing is exported.
    let mut unsampled = Vec::new();
    for i in 0..5 {
        let r = get(mesh.bind, &format!("/ok/{i}"), &[]).await;
        let (trace, _, flags) = traceparent(seen(&r)["traceparent"].as_str().unwrap());
        assert_eq!(flags, "00");
        unsampled.push(trace);
    }
    // A caller's "yes" is still honoured.
    let sampled = hex_id(32);
    let r = get(
        mesh.bind,
        "/ok/sampled",
        &[("traceparent", &format!("00-{sampled}-{}-01", hex_id(16)))],
    )
    .await;
    assert_eq!(seen(&r)["traceparent"].as_str().unwrap().len(), 55);

    // The app fails: both hops' spans are exported, linked, marked as errors.
    let failed = hex_id(32);
    let r = get(
        mesh.bind,
        "/status/503",
        &[("traceparent", &format!("00-{failed}-{}-00", hex_id(16)))],
    )
    .await;
    assert_eq!(r.status, 503);
    // The proxy fails (no endpoints): its span says why.
    let r = get(mesh.broken, "/", &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("sinew-error"), Some("no-endpoints"));
    mesh.flush().await;

    let spans = receiver.wait_trace(&failed, 2).await;
    let (out, inb) = (span(&spans, "CLIENT"), span(&spans, "SERVER"));
    assert_eq!(inb["parent_span_id"], out["span_id"]);
    for s in [out, inb] {
        assert_eq!(s["status"]["code"], "ERROR", "{s:#}");
        assert_eq!(s["attributes"]["http.response.status_code"], 503);
        assert_eq!(s["attributes"]["sinew.sampled"], "error");
        assert_eq!(s["transport"], "http");
    }
    receiver.wait_trace(&sampled, 2).await;
    let proxy_error = receiver
        .spans()
        .into_iter()
        .find(|s| s["attributes"]["sinew.error"] == "no-endpoints")
        .unwrap_or_else(|| panic!("no span for the proxy's error: {:#?}", receiver.spans()));
    assert_eq!(proxy_error["status"]["message"], "no-endpoints");
    assert_eq!(proxy_error["attributes"]["sinew.service"], "empty.shop");
    // Flushed after the successes, so anything exported for them is in by now.
    for t in &unsampled {
        assert!(receiver.trace(t).is_empty(), "trace {t} was not sampled");
    }
    assert_eq!(receiver.spans().len(), 5, "{:#?}", receiver.spans());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_costs_requests_nothing() {
    let app = HttpBackend::start("app").await.unwrap();
    // A black hole: connections are accepted (by the kernel) and never answered, so
    // every export hangs until its timeout.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", hole.local_addr().unwrap());
    let mesh = mesh(app.addr(), tracing_doc(&endpoint, json!({}))).await;
    let started = Instant::now();
    let mut c = client::h1(mesh.bind).await.unwrap();
    // More spans than the export queue holds (2048): the rest are dropped, not waited for.
    for i in 0..1200 {
        let req = Request::get(format!("/dead/{i}"))
            .header("host", "catalog")
            .body(empty())
            .unwrap();
        let r = client::collect(c.send(req).await.unwrap()).await.unwrap();
        assert!(seen(&r)["traceparent"].is_string(), "still propagated");
    }
    // Generous: a request never waits on an export (each hangs for 10 s here).
    eprintln!("1200 requests: {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    // A flush gives up in bounded time too (the SDK's 5 s).
    tokio::time::timeout(Duration::from_secs(30), mesh.flush())
        .await
        .expect("flush with a dead collector is bounded");
    drop(hole);
}
