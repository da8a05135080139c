//! `sinew stat`, `top`, `tap` and `edges` against a real mesh: a `sinew control`
//! process, two in-process proxies with certificates from join tokens (mTLS), a real
//! backend, and load whose every answer is tallied by the test itself.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod mesh;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh::*;
use sinew_proxy::Proxy;
use sinew_proxy::control::ControlSettings;
use sinew_testkit::http::HttpBackend;
use sinew_testkit::{client, wait};

/// Proxies report every 200 ms here (2 s by default), so the tests wait less.
const REPORT: Duration = Duration::from_millis(200);

const LOAD_ID: &str = "spiffe://cluster.local/ns/shop/sa/load";
const CATALOG_ID: &str = "spiffe://cluster.local/ns/shop/sa/catalog";

async fn proxy(
    cp: &Control,
    name: &str,
    reg: Option<sinew_api::v1::Registration>,
    token: String,
) -> Proxy {
    let mut settings = ControlSettings::new(&cp.url, name);
    settings.registration = reg;
    settings.join_token = Some(token);
    settings.min_backoff = Duration::from_millis(50);
    settings.max_backoff = Duration::from_millis(500);
    settings.stats_interval = REPORT;
    start_proxy(settings).await
}

/// `shop/load` (a client: no workload) → `catalog` (`shop/catalog-1`), both with
/// certificates; the load proxy's binding is the only way in.
struct Mesh {
    _scratch: Scratch,
    cp: Control,
    app: HttpBackend,
    load: Proxy,
    catalog: Proxy,
    bind: SocketAddr,
    /// Just before the catalog proxy started, and once it was ready: its stream
    /// began in between.
    catalog_started: (Instant, Instant),
}

async fn mesh() -> Mesh {
    let scratch = Scratch::new();
    let cp = Control::start(&scratch.0.join("data"), free_addr(), &[]).await;
    let app = HttpBackend::start("catalog-app").await.unwrap();
    let (bind, inbound) = (free_addr(), free_addr());
    let f = scratch.write(
        "m.yaml",
        &format!(
            "{}{}",
            service("shop", "catalog"),
            proxy_doc("shop", "load", &[(bind, "catalog")])
        ),
    );
    assert!(
        cp.sinew(&["apply", "-f", f.to_str().unwrap()])
            .await
            .status
            .success()
    );
    let (t_load, t_cat) = (
        token(&cp, "shop", "load").await,
        token(&cp, "shop", "catalog").await,
    );
    let before = Instant::now();
    let catalog = proxy(
        &cp,
        "shop/catalog-1",
        Some(registration("catalog", app.addr(), inbound, "v1")),
        t_cat,
    )
    .await;
    let catalog_started = (before, Instant::now());
    let load = proxy(&cp, "shop/load", None, t_load).await;
    // The load proxy knows catalog's endpoint (the registration may reach it a
    // push after its first): the first request finds it, so every answer below is
    // the backend's.
    let shared = load.shared().clone();
    wait::until("the load proxy has catalog's endpoint", TIMEOUT, || {
        let shared = shared.clone();
        async move {
            shared.snapshot.load_full().is_some_and(|s| {
                s.config.services.values().any(|svc| {
                    svc.ports
                        .iter()
                        .any(|p| p.endpoints.iter().any(|e| e.sidecar.is_some()))
                })
            })
        }
    })
    .await
    .unwrap();
    // The catalog proxy is ready with its inbound up (its first push waits for its
    // registration); the web proxy's binding to catalog comes with the push that
    // has catalog's service.
    listening(inbound).await;
    listening(bind).await;
    Mesh {
        _scratch: scratch,
        cp,
        app,
        load,
        catalog,
        bind,
        catalog_started,
    }
}

/// Every answer the load got: the generator's own counts.
#[derive(Debug, Default)]
struct Tally {
    total: u64,
    /// Answers the backend made (they carry `x-backend`).
    backend: u64,
    /// 5xx answers (all of them the backend's here).
    failed: u64,
    /// Answers to `/delay/150`.
    slow: u64,
    /// Why the proxy answered itself, when it did.
    proxy_errors: Vec<String>,
}

impl Tally {
    async fn get(&mut self, c: &mut client::H1, path: &str) -> u16 {
        let r = c.get("catalog", path).await.unwrap();
        self.total += 1;
        self.backend += u64::from(r.header("x-backend").is_some());
        if let Some(e) = r.header("sinew-error") {
            self.proxy_errors.push(format!("{path}: {} {e}", r.status));
        }
        self.failed += u64::from(r.status.as_u16() >= 500);
        self.slow += u64::from(path.starts_with("/delay/"));
        r.status.as_u16()
    }
}

/// Sends `n` requests to `path`, paced at `rps`.
async fn paced(tally: &mut Tally, c: &mut client::H1, path: &str, n: u32, rps: u32) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rps);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for _ in 0..n {
        tick.tick().await;
        tally.get(c, path).await;
    }
}

async fn json(cp: &Control, args: &[&str]) -> serde_json::Value {
    let out = cp.sinew(args).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "sinew {args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn row<'a>(doc: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    doc["rows"].as_array()?.iter().find(|r| r["name"] == name)
}

/// Runs `sinew ARGS -o json` until `done` holds for its answer (each proxy's last
/// report arrives on its own schedule), and returns that answer.
async fn until_json(
    cp: &Control,
    args: &[&str],
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let last = std::sync::Mutex::new(serde_json::Value::Null);
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let r = wait::until(what, TIMEOUT, || {
        let (last, all, done) = (&last, &all, &done);
        async move {
            let doc = json(cp, all).await;
            let ok = done(&doc);
            *last.lock().unwrap() = doc;
            ok
        }
    })
    .await;
    let last = last.into_inner().unwrap();
    assert!(r.is_ok(), "{what}: last answer {last:#}");
    last
}

/// The stat numbers agree with the load generator's own counts **exactly** once
/// the last report has arrived: proxies report deltas (`Discovery.Report` calls)
/// and none is dropped, and the whole test runs inside the 60 s window. The test waits
/// (bounded) for equality; a count that overshoots or never arrives fails it.
/// Rates are checked against the span the control plane observed, bracketed by
/// the test's own clock; latency percentiles against the bucket (a factor of two)
/// that the requests' known delays fall in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_agrees_with_the_load_and_sees_failures_latency_and_edges() {
    let m = mesh().await;
    let mut c = client::h1(m.bind).await.unwrap();
    let mut tally = Tally::default();
    // Healthy traffic, a slow tail (10% of the traffic at 150 ms: the bucket
    // (128, 256] ms), then failures injected at the backend.
    paced(&mut tally, &mut c, "/api/items", 150, 100).await;
    paced(&mut tally, &mut c, "/delay/150", 20, 100).await;
    m.app.fail_with(Some(503));
    paced(&mut tally, &mut c, "/api/items", 30, 100).await;
    m.app.fail_with(None);
    assert_eq!(
        (tally.total, tally.backend, tally.failed, tally.slow),
        (200, 200, 30, 20),
        "{:?}",
        tally.proxy_errors
    );

    // The server side (catalog's inbound) agrees exactly with the generator.
    let cp = &m.cp;
    // The last answer, and when it was asked for.
    let asked = std::sync::Mutex::new((serde_json::Value::Null, Instant::now()));
    let expect = (tally.backend, tally.failed);
    let arrived = wait::until("stat counts match the load", TIMEOUT, || {
        let asked = &asked;
        async move {
            let at = Instant::now();
            let doc = json(cp, &["stat", "-A", "-o", "json"]).await;
            let ok = row(&doc, "catalog.shop").is_some_and(|r| {
                (r["requests"].as_u64(), r["failures"].as_u64()) == (Some(expect.0), Some(expect.1))
            });
            *asked.lock().unwrap() = (doc, at);
            ok
        }
    })
    .await;
    // The answer was computed between q0 and q1.
    let q1 = Instant::now();
    let (last, q0) = asked.into_inner().unwrap();
    assert!(
        arrived.is_ok(),
        "expected {expect:?}, last answer: {last:#}"
    );
    let r = row(&last, "catalog.shop").unwrap();
    assert_eq!(r["direction"], "inbound", "the server's side");
    assert_eq!(
        r["mtlsRequests"].as_u64(),
        Some(tally.backend),
        "all over mTLS"
    );
    let sr = r["successRate"].as_f64().unwrap();
    assert!((sr - 170.0 / 200.0).abs() < 1e-9, "{sr}");
    // Rate: requests over the span from the catalog proxy's first stream to the
    // query, which lies within what the test's clock brackets.
    let rps = r["rps"].as_f64().unwrap();
    let (started, ready) = m.catalog_started;
    let low = tally.backend as f64 / q1.duration_since(started).as_secs_f64();
    let high = tally.backend as f64 / q0.saturating_duration_since(ready).as_secs_f64().max(1.0);
    assert!(
        rps >= low * 0.99 && rps <= high * 1.01,
        "rps {rps} not in [{low}, {high}]"
    );
    // Latency: 180 fast answers, 20 at 150 ms. The median is among the fast ones,
    // p95 and p99 (ranks 190 and 198) among the slow ones, in (128, 256] ms.
    let lat = &r["latencyMs"];
    let (p50, p95, p99) = (
        lat["p50"].as_f64().unwrap(),
        lat["p95"].as_f64().unwrap(),
        lat["p99"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 < 64.0, "p50 {p50}");
    assert!((128.0..=256.0).contains(&p95), "p95 {p95}");
    assert!((128.0..=256.0).contains(&p99) && p99 >= p95, "p99 {p99}");

    // The caller's side, by workload: every answer the load proxy gave.
    let total = tally.total;
    let wl = until_json(
        cp,
        &["stat", "-A", "--by", "workload"],
        "the load's report",
        |d| row(d, "shop/load").is_some_and(|r| r["requests"].as_u64() == Some(total)),
    )
    .await;
    let load = row(&wl, "shop/load").expect("the load workload");
    assert_eq!(load["direction"], "outbound");
    assert_eq!(load["requests"].as_u64(), Some(tally.total));
    assert_eq!(load["failures"].as_u64(), Some(tally.failed));
    let cat = row(&wl, "shop/catalog-1").expect("the catalog workload");
    assert_eq!(cat["requests"].as_u64(), Some(tally.backend));
    // By route: the implicit route of catalog, as the caller chose it.
    let routes = json(cp, &["stat", "-A", "--by", "route", "-o", "json"]).await;
    let rt = &routes["rows"][0];
    assert_eq!(
        (rt["name"].as_str(), rt["service"].as_str()),
        (Some("default"), Some("catalog.shop"))
    );
    assert_eq!(rt["requests"].as_u64(), Some(tally.total));

    // The table an on-call engineer reads.
    let out = cp.sinew(&["stat", "-n", "shop"]).await;
    let (table, _) = text(&out);
    let header = table.lines().next().unwrap_or_default();
    for col in [
        "NAME",
        "SUCCESS",
        "RPS",
        "LATENCY_P50",
        "LATENCY_P95",
        "LATENCY_P99",
        "MTLS",
    ] {
        assert!(header.contains(col), "{table}");
    }
    let line = table
        .lines()
        .find(|l| l.starts_with("catalog "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        line.contains("85.00%") && line.contains("100%") && line.contains("server"),
        "{line}"
    );
    // An empty namespace says where the traffic is.
    let out = cp.sinew(&["stat", "-n", "elsewhere"]).await;
    assert!(
        text(&out).1.contains(
            "no services with traffic in namespace elsewhere; 1 in shop: try -n shop or -A"
        ),
        "{:?}",
        text(&out)
    );

    // Edges: load → catalog, with both identities, over mTLS, confirmed by catalog.
    let edges = json(cp, &["edges", "-A", "-o", "json"]).await;
    let e = edges["edges"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["src"] == "shop/load"))
        .unwrap_or_else(|| panic!("{edges:#}"));
    assert_eq!(e["dst"], "catalog.shop");
    assert_eq!(e["clientIdentity"], LOAD_ID);
    assert_eq!(e["serverIdentities"], serde_json::json!([CATALOG_ID]));
    assert_eq!(e["dstWorkloads"], serde_json::json!(["shop/catalog-1"]));
    assert_eq!(
        (e["mtls"].as_bool(), e["verifiedByServer"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(e["requests"].as_u64(), Some(tally.total));
    assert_eq!(
        edges["edges"].as_array().map(Vec::len),
        Some(1),
        "{edges:#}"
    );
    let (table, _) = text(&cp.sinew(&["edges", "-n", "shop"]).await);
    let line = table
        .lines()
        .find(|l| l.starts_with("shop/load"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        line.contains(LOAD_ID) && line.contains(CATALOG_ID) && line.contains(" yes "),
        "{line}"
    );

    // Top: the busiest paths, counted once (the server's side).
    let top = json(cp, &["top", "-A", "--once", "-o", "json"]).await;
    let rows = top["rows"].as_array().unwrap();
    assert_eq!(rows[0]["path"], "/api/items", "{top:#}");
    assert_eq!(rows[0]["requests"].as_u64(), Some(180));
    assert_eq!(rows[0]["failures"].as_u64(), Some(30));
    assert_eq!(rows[0]["direction"], "inbound");
    assert_eq!(rows[1]["path"], "/delay/150");
    assert!(rows[1]["meanMs"].as_f64().unwrap() >= 150.0, "{top:#}");
    let (table, _) = text(&cp.sinew(&["top", "catalog", "-n", "shop", "--once"]).await);
    assert!(
        table
            .lines()
            .nth(1)
            .is_some_and(|l| l.contains("/api/items")),
        "{table}"
    );

    // No control plane: one clear sentence.
    let out = sinew_as("https://127.0.0.1:1", Some(&m.cp.credentials), &["stat"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("cannot reach the control plane"),
        "{:?}",
        text(&out)
    );
    m.load.shutdown().await;
    m.catalog.shutdown().await;
}

/// Marks the end of what [`Lines`] read.
const EOF: char = '\u{4}';

/// Reads a child's output in the background; `seen` waits for a line.
struct Lines(tokio::sync::watch::Receiver<String>);

impl Lines {
    fn new(stderr: impl tokio::io::AsyncRead + Unpin + Send + 'static) -> Lines {
        use tokio::io::AsyncBufReadExt;
        let (tx, rx) = tokio::sync::watch::channel(String::new());
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                tx.send_modify(|all| {
                    all.push_str(&l);
                    all.push('\n');
                });
            }
            // The end of the output, for `until`.
            tx.send_modify(|all| all.push(EOF));
        });
        Lines(rx)
    }

    /// Waits until what was read so far satisfies `done` (`what` says what for).
    async fn until(&mut self, what: &str, done: impl Fn(&str) -> bool) {
        let ok = tokio::time::timeout(TIMEOUT, self.0.wait_for(|all| done(all)))
            .await
            .is_ok_and(|r| r.is_ok());
        assert!(ok, "waited for {what}; got {:?}", self.0.borrow().clone());
    }

    async fn seen(&mut self, what: &str) {
        let ok = tokio::time::timeout(TIMEOUT, self.0.wait_for(|all| all.contains(what)))
            .await
            .is_ok_and(|r| r.is_ok());
        assert!(
            ok,
            "waited for {what:?} on stderr; got {:?}",
            self.0.borrow().clone()
        );
    }
}

/// Runs `sinew tap ARGS` while `traffic` loops through the load proxy, until the
/// tap exits by itself (at its `--limit`); returns its JSON lines.
async fn tap_during(
    m: &Mesh,
    args: &[&str],
    traffic: &[(&'static str, &'static str)],
) -> Vec<serde_json::Value> {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sinew"))
        .arg("tap")
        .args(args)
        .args(["-o", "json"])
        .env("SINEW_SERVER", &m.cp.url)
        .env("SINEW_CREDENTIALS", &m.cp.credentials)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut err = Lines::new(child.stderr.take().unwrap());
    err.seen("tapping 2 proxies").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (bind, s, traffic) = (m.bind, stop.clone(), traffic.to_vec());
    let load = tokio::spawn(async move {
        let mut c = client::h1(bind).await.unwrap();
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            for (method, path) in &traffic {
                let req = http::Request::builder()
                    .method(*method)
                    .uri(*path)
                    .header("host", "catalog")
                    .header("authorization", "Bearer secret-token")
                    .header("x-auth-token", "secret-x-auth")
                    .header("user-agent", "tap-load")
                    .body(client::empty())
                    .unwrap();
                client::collect(c.send(req).await.unwrap()).await.unwrap();
            }
        }
    });
    let out = tokio::time::timeout(TIMEOUT, child.wait_with_output())
        .await
        .expect("sinew tap exits at its --limit")
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();
    assert!(
        out.status.success(),
        "{:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// `sinew tap` shows live requests of a running load, only those its filters
/// match, with every header value not known to be safe redacted (an `authorization`
/// a route injects, an `x-auth-token` the caller sends), and exits after `--limit`
/// requests (each seen by two proxies, counted once); once it is gone, no proxy
/// taps any more (an idle tap is one atomic load per request). Neither proxy's
/// `/config` shows the injected credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_shows_only_matching_live_requests_and_stops_at_its_limit() {
    let m = mesh().await;
    assert!(!m.load.shared().tap.active() && !m.catalog.shared().tap.active());
    // A route that injects a credential on the way to catalog.
    let f = m._scratch.write(
        "inject.yaml",
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: inject, namespace: shop}\nspec:\n  parentRefs: [{kind: Service, name: catalog}]\n  rules:\n    - filters:\n        - type: RequestHeaderModifier\n          requestHeaderModifier:\n            set: [{name: authorization, value: \"Bearer injected-secret\"}]\n      backendRefs: [{name: catalog}]\n",
    );
    let out = m.cp.sinew(&["apply", "-f", f.to_str().unwrap()]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    let admin = m.load.admin_addr();
    wait::until("the load proxy has the route", TIMEOUT, || async move {
        client::get(admin, "admin", "/config")
            .await
            .is_ok_and(|r| r.text().contains("shop/inject"))
    })
    .await
    .unwrap();
    for p in [&m.load, &m.catalog] {
        let config = client::get(p.admin_addr(), "admin", "/config")
            .await
            .unwrap()
            .text();
        assert!(!config.contains("injected-secret"), "{config}");
    }
    let load_config = client::get(admin, "admin", "/config").await.unwrap().text();
    assert!(
        load_config.contains(r#""authorization","#) && load_config.contains("<redacted>"),
        "the injected header is named, its value redacted: {load_config}"
    );
    let mixed = [
        ("GET", "/api/a"),
        ("GET", "/other"),
        ("POST", "/api/b"),
        ("GET", "/status/503"),
    ];
    let events = tap_during(
        &m,
        &[
            "-A",
            "--service",
            "catalog",
            "--path",
            "/api",
            "--method",
            "get",
            "--limit",
            "6",
        ],
        &mixed,
    )
    .await;
    // Six requests: six callers' events, and at most six of the servers' (the
    // relay stops at the sixth request; each side's events come in their own
    // batches).
    let outbound = events
        .iter()
        .filter(|e| e["direction"] == "outbound")
        .count();
    let inbound = events
        .iter()
        .filter(|e| e["direction"] == "inbound")
        .count();
    assert_eq!(outbound, 6, "{events:#?}");
    assert!(inbound <= 6, "{events:#?}");
    let all = serde_json::to_string(&events).unwrap();
    for secret in ["secret-token", "secret-x-auth", "injected-secret"] {
        assert!(!all.contains(secret), "{secret} in the tap: {all}");
    }
    for e in &events {
        assert_eq!(
            (e["method"].as_str(), e["path"].as_str()),
            (Some("GET"), Some("/api/a")),
            "{e:#}"
        );
        assert_eq!(e["service"], "catalog.shop");
        assert_eq!(e["status"], 200);
        assert_eq!(e["headers"]["authorization"], "<redacted>", "{e:#}");
        assert_eq!(e["headers"]["x-auth-token"], "<redacted>", "{e:#}");
        assert_eq!(e["headers"]["user-agent"], "tap-load", "{e:#}");
        match e["proxy"].as_str() {
            Some("shop/catalog-1") => {
                assert_eq!(e["direction"], "inbound");
                assert_eq!(e["peerIdentity"], LOAD_ID, "the verified caller");
            }
            Some("shop/load") => assert_eq!(e["direction"], "outbound"),
            other => panic!("from {other:?}"),
        }
    }
    // A status class, on the servers' side only.
    let events = tap_during(
        &m,
        // The namespace's proxies (both here): filtered and counted by the CLI.
        &[
            "-n",
            "shop",
            "--status",
            "5xx",
            "--direction",
            "inbound",
            "--limit",
            "3",
        ],
        &mixed,
    )
    .await;
    assert_eq!(events.len(), 3, "{events:#?}");
    for e in &events {
        assert_eq!(
            (e["status"].as_u64(), e["path"].as_str()),
            (Some(503), Some("/status/503")),
            "{e:#}"
        );
        assert_eq!(
            (e["direction"].as_str(), e["proxy"].as_str()),
            (Some("inbound"), Some("shop/catalog-1"))
        );
    }
    // Both taps are over: the proxies stop (TapStop over their streams).
    let (a, b) = (m.load.shared().clone(), m.catalog.shared().clone());
    wait::until("proxies stop tapping", TIMEOUT, || {
        let (a, b) = (a.clone(), b.clone());
        async move { !a.tap.active() && !b.tap.active() }
    })
    .await
    .unwrap();
    // A bad filter is refused before anything starts.
    let out = m.cp.sinew(&["tap", "--status", "5"]).await;
    assert!(!out.status.success());
    assert!(text(&out).1.contains("status \"5\""), "{:?}", text(&out));
    m.load.shutdown().await;
    m.catalog.shutdown().await;
}

/// `sinew tap --limit N` stops after N requests, not N events: each request here is
/// seen by the caller's proxy and by the server's, and both its events are shown.
/// One request at a time, each waited for on both sides: a limit counting events
/// would end the tap within the second request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_limit_counts_requests_not_the_two_proxies_that_saw_each() {
    let m = mesh().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sinew"))
        .args(["tap", "-A", "--path", "/api", "--limit", "3", "-o", "json"])
        .env("SINEW_SERVER", &m.cp.url)
        .env("SINEW_CREDENTIALS", &m.cp.credentials)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut err = Lines::new(child.stderr.take().unwrap());
    let mut out = Lines::new(child.stdout.take().unwrap());
    err.seen("tapping 2 proxies").await;
    let (a, b) = (m.load.shared().clone(), m.catalog.shared().clone());
    wait::until("both proxies tap", TIMEOUT, || {
        let (a, b) = (a.clone(), b.clone());
        async move { a.tap.active() && b.tap.active() }
    })
    .await
    .unwrap();
    let mut c = client::h1(m.bind).await.unwrap();
    for i in 1..=3 {
        let r = c.get("catalog", &format!("/api/{i}")).await.unwrap();
        assert_eq!(r.status, 200);
        if i < 3 {
            let path = format!(r#""path":"/api/{i}""#);
            out.until(&format!("both sides of /api/{i}"), |all| {
                all.matches(&path).count() == 2
            })
            .await;
        }
    }
    let status = tokio::time::timeout(TIMEOUT, child.wait())
        .await
        .expect("sinew tap exits after its third request")
        .unwrap();
    assert!(status.success(), "{:?}", err.0.borrow().clone());
    // Everything printed has been read once the pipe closes.
    out.until("the end of the output", |all| all.ends_with(EOF))
        .await;
    let events: Vec<serde_json::Value> = out
        .0
        .borrow()
        .trim_end_matches(EOF)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let side = |d: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["direction"] == d)
            .map(|e| e["path"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(
        side("outbound"),
        ["/api/1", "/api/2", "/api/3"],
        "{events:#?}"
    );
    let inbound = side("inbound");
    assert!(
        inbound.starts_with(&["/api/1".to_owned(), "/api/2".to_owned()]) && inbound.len() <= 3,
        "{events:#?}"
    );
    m.load.shutdown().await;
    m.catalog.shutdown().await;
}

/// `Discovery.Report` takes a report only from a proxy whose stream is open, refuses
/// a malformed name, and what it takes is what `sinew stat` counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_counts_only_for_a_proxy_with_a_stream() {
    use sinew_api::v1::{ReportRequest, StatsReport, TrafficRow};

    let scratch = Scratch::new();
    let cp = Control::start(&scratch.0.join("data"), free_addr(), &[]).await;
    // A workload of shop/hand, authenticated by its certificate.
    let hand = mesh::Workload::new(&cp, "shop", "hand", "hand").await;
    let mut client = hand.discovery.clone();
    let report = |ns: &str, name: &str| ReportRequest {
        namespace: ns.into(),
        name: name.into(),
        stats: Some(StatsReport {
            rows: vec![TrafficRow {
                inbound: true,
                service: "hand.shop".into(),
                requests: 42,
                failures: 2,
                latency: vec![0, 0, 42],
                ..Default::default()
            }],
            ..Default::default()
        }),
    };
    // Not its name, or no stream yet: refused.
    let e = client.report(report("shop", "nobody")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = client
        .report(report("shop", "Not a name!"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("Not a name!"), "{e:?}");
    // Without a certificate: refused before anything else.
    let e = mesh::anonymous_discovery(&cp)
        .await
        .report(report("shop", "hand"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

    // A proxy with a stream, sending no stats of its own.
    let mut settings = ControlSettings::new(&cp.url, "shop/hand");
    settings.stats_interval = Duration::ZERO;
    settings.join_token = Some(cp.join_token("shop", "hand").await);
    let _hand = start_proxy(settings).await;
    // Its stream registers right after its Hello: until then, refused as above.
    let c = &client;
    wait::until("a report for shop/hand is taken", TIMEOUT, || async move {
        c.clone().report(report("shop", "hand")).await.is_ok()
    })
    .await
    .unwrap();
    let doc = until_json(&cp, &["stat", "-A"], "the report in stat", |d| {
        row(d, "hand.shop").is_some()
    })
    .await;
    let r = row(&doc, "hand.shop").unwrap();
    assert_eq!(
        (r["requests"].as_u64(), r["failures"].as_u64()),
        (Some(42), Some(2)),
        "{doc:#}"
    );
}
