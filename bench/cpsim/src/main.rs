//! `cpsim`: a fleet of lightweight proxies speaking Sinew's real discovery protocol
//! (one gRPC stream each, on its own connection: Hello, then an ACK per Push), for
//! bench/run's scenario 6 (the control plane at scale).
//!
//! ```text
//! cpsim --server https://127.0.0.1:15010 --credentials admin.credentials --join-token-file t --proxies 1000 --services 100 --endpoints 10000 --changes 5
//! ```
//!
//! It talks to bench/run on stdout, one JSON object per line, and waits on stdin:
//! 1. applies the mesh (services, endpoints as Workload documents, one Proxy document
//!    per simulated proxy), prints `{"phase":"applied",...}` and waits for a line;
//! 2. connects every proxy at once (the connect storm), waits until each has its
//!    first (full) push and the control plane reports every proxy in sync;
//! 3. makes `--changes` changes, alternating a route change (an HTTPRoute every proxy
//!    sees) and an endpoint change (a new Workload of a service every proxy sees), and
//!    times each until every proxy has received and ACKed it;
//! 4. prints `{"phase":"done",...}` with the figures and holds the streams open until
//!    stdin closes (so the control plane's memory can be read with them connected).
//!    Meanwhile (bench/run's scenario 9) a line `stats` makes every proxy send a
//!    typical traffic-stats report (8 rows, 20 paths: the shape of the control plane's
//!    unit test `a_hundred_proxies_cost_under_a_megabyte`) every
//!    `--stats-interval-ms` (2 s, the proxy's default), each at its own offset within
//!    the interval; cpsim answers `{"phase":"reporting"}`. A line `count` answers
//!    `{"phase":"count",...}`: reports sent, and what the control plane's `Stat` sees.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sinew_api::v1::admin_client::AdminClient;
use sinew_api::v1::discovery_client::DiscoveryClient;
use sinew_api::v1::{
    Ack, ApplyRequest, Hello, PathRow, ProxyMessage, ProxyStatusRequest, ReportRequest, Source,
    StatRequest, StatsReport, TrafficRow, control_message, proxy_message,
};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const NS: &str = "sim";

struct Args {
    server: String,
    /// The operator credential (what `sinew control` wrote as admin.credentials).
    credentials: String,
    /// A join token for the simulated proxies' one identity (`sim`/`cpsim`).
    join_token_file: String,
    proxies: usize,
    services: usize,
    endpoints: usize,
    changes: usize,
    per_proxy: usize,
    stats_interval: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        server: "https://127.0.0.1:15010".into(),
        credentials: String::new(),
        join_token_file: String::new(),
        proxies: 1000,
        services: 100,
        endpoints: 10_000,
        changes: 5,
        per_proxy: 4,
        stats_interval: Duration::from_secs(2),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag}: missing value"))?;
        let n = || v.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--server" => a.server = v.clone(),
            "--credentials" => a.credentials = v.clone(),
            "--join-token-file" => a.join_token_file = v.clone(),
            "--proxies" => a.proxies = n()?,
            "--services" => a.services = n()?.max(1),
            "--endpoints" => a.endpoints = n()?,
            "--changes" => a.changes = n()?,
            "--services-per-proxy" => a.per_proxy = n()?,
            "--stats-interval-ms" => a.stats_interval = Duration::from_millis(n()?.max(1) as u64),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

/// A push received by simulated proxy `proxy`.
struct Event {
    proxy: usize,
    at: Instant,
    full: bool,
    resources: usize,
}

fn out(v: Value) {
    println!("{v}");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn pcts(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    let p = |q: f64| -> Value {
        if v.is_empty() {
            return Value::Null;
        }
        let k = ((q / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        json!(v[k])
    };
    json!({"p50": p(50.0), "p90": p(90.0), "p99": p(99.0), "max": v.last().copied(), "n": v.len()})
}

fn service_doc(name: &str) -> String {
    format!(
        "apiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: {NS}}}\n\
         spec:\n  ports: [{{name: http, port: 80, protocol: HTTP}}]\n"
    )
}

fn workload_doc(name: &str, service: &str, i: usize) -> String {
    format!(
        "apiVersion: sinew.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: {NS}}}\n\
         spec: {{service: {service}, address: 10.{}.{}.{}, ports: {{http: 8080}}, sidecar: {{port: 4143}}}}\n",
        (i >> 16) & 255,
        (i >> 8) & 255,
        i & 255
    )
}

fn route_doc(version: usize) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: common, namespace: {NS}}}\n\
         spec:\n  parentRefs: [{{kind: Service, name: common}}]\n  rules:\n\
         \x20   - matches: [{{headers: [{{name: x-change, value: \"v{version}\"}}]}}]\n\
         \x20     backendRefs: [{{name: common}}]\n\
         \x20   - backendRefs: [{{name: common}}]\n"
    )
}

fn proxy_doc(i: usize, services: usize, per_proxy: usize) -> String {
    let mut ups = String::from("      - {bind: \"127.0.0.1:9000\", service: common, port: http}\n");
    for m in 0..per_proxy.min(services) {
        let s = (i * per_proxy + m) % services;
        ups.push_str(&format!(
            "      - {{bind: \"127.0.0.1:{}\", service: svc-{s}, port: http}}\n",
            9001 + m
        ));
    }
    format!(
        "apiVersion: sinew.dev/v1alpha1\nkind: Proxy\nmetadata: {{name: p-{i}, namespace: {NS}}}\n\
         spec:\n  outbound:\n    upstreams:\n{ups}"
    )
}

type Admin = AdminClient<tonic::transport::Channel>;

async fn apply(admin: &mut Admin, label: &str, docs: &[String]) -> Result<(), String> {
    // In chunks, to stay well under the gRPC message limit.
    for (k, chunk) in docs.chunks(2000).enumerate() {
        admin
            .apply(ApplyRequest {
                sources: vec![Source {
                    label: format!("{label}-{k}"),
                    text: chunk.join("---\n"),
                }],
                dry_run: false,
            })
            .await
            .map_err(|s| format!("apply {label}: {}: {}", s.code(), s.message()))?;
    }
    Ok(())
}

/// Polls ProxyStatus until `n` proxies are connected with applied == latest.
async fn wait_synced(admin: &mut Admin, n: usize, deadline: Duration) -> Result<Duration, String> {
    let t0 = Instant::now();
    loop {
        let st = admin
            .proxy_status(ProxyStatusRequest {})
            .await
            .map_err(|s| format!("proxy-status: {}", s.message()))?
            .into_inner();
        let synced = st
            .proxies
            .iter()
            .filter(|p| {
                p.namespace == NS
                    && p.connected
                    && !p.latest_version.is_empty()
                    && p.applied_version == p.latest_version
            })
            .count();
        if synced >= n {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > deadline {
            return Err(format!(
                "only {synced} of {n} proxies in sync after {deadline:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Counters shared by the fleet, and its switch for stats reports.
struct Fleet {
    /// Sessions that failed before their first push (connect refused, reset, ...).
    failed_attempts: AtomicU64,
    /// Sessions that ended after at least one push.
    dropped_streams: AtomicU64,
    /// Stats reports sent, by all proxies.
    reports_sent: AtomicU64,
    /// True once the proxies are to report stats.
    reporting: tokio::sync::watch::Receiver<bool>,
    /// Between two reports of one proxy.
    stats_interval: Duration,
    proxies: usize,
    /// Every simulated proxy's TLS: the one workload certificate they share (one
    /// identity owns every `p-<i>` name), verified against the mesh roots.
    tls: Arc<rustls::ClientConfig>,
}

/// The fields of a credential file cpsim reads.
#[derive(serde::Deserialize)]
struct Credential {
    certificate: String,
    key: String,
    roots: String,
}

fn endpoint(url: &str) -> Result<tonic::transport::Endpoint, String> {
    sinew_api::channel::endpoint(url).map_err(|e| e.to_string())
}

/// The simulated proxies' identity: one bootstrap with the join token (as a proxy
/// makes), a certificate for `sim`'s service account, shared by all of them.
async fn proxy_tls(url: &str, roots: &str, token: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    let trust = || sinew_tls::api::ControlTrust::from_pem("roots", roots).map_err(|e| e.to_string());
    let tls = sinew_tls::api::control_client_config(trust()?, sinew_tls::api::ClientAuth::None)
        .map_err(|e| e.to_string())?;
    let channel = sinew_api::channel::connect(endpoint(url)?, tls)
        .await
        .map_err(|e| format!("bootstrap: cannot connect: {e}"))?;
    let (key, csr_der) = sinew_tls::new_key_and_csr().map_err(|e| e.to_string())?;
    let cert = DiscoveryClient::new(channel)
        .bootstrap(sinew_api::v1::BootstrapRequest {
            namespace: NS.into(),
            name: "p-0".into(),
            csr_der,
            token: token.trim().to_owned(),
        })
        .await
        .map_err(|s| format!("bootstrap refused: {}", s.message()))?
        .into_inner();
    sinew_tls::api::control_client_config(
        trust()?,
        sinew_tls::api::ClientAuth::Static {
            chain_pem: cert.chain_pem,
            key_pem: key,
        },
    )
    .map_err(|e| e.to_string())
}

/// A typical sidecar's report: 4 inbound rows (callers), 4 outbound rows (services
/// it calls), 20 paths. The same shape and strings as `typical()` in
/// crates/control/src/telemetry/mod.rs (the unit test's report).
fn typical_report(p: usize) -> StatsReport {
    let row = |inbound: bool, i: usize| TrafficRow {
        inbound,
        service: format!("service-{}.shop", if inbound { p } else { i }),
        route: if inbound {
            String::new()
        } else {
            format!("shop/route-{i}")
        },
        peer_identity: format!("spiffe://cluster.local/ns/shop/sa/caller-{i}"),
        mtls: true,
        requests: 1000,
        failures: 3,
        latency: vec![10, 200, 400, 300, 50, 20, 10, 5, 3, 2],
    };
    StatsReport {
        identity: format!("spiffe://cluster.local/ns/shop/sa/service-{p}"),
        rows: (0..4)
            .map(|i| row(true, i))
            .chain((0..4).map(|i| row(false, i)))
            .collect(),
        paths: (0..20)
            .map(|i| PathRow {
                inbound: true,
                service: format!("service-{p}.shop"),
                method: "GET".into(),
                path: format!("/api/v1/items/category-{i}"),
                requests: 50,
                failures: 0,
                latency_sum_us: 50_000,
                latency_max_us: 4_000,
            })
            .collect(),
        unreported: 0,
    }
}

/// Once reporting is switched on: proxy `i`'s report every interval, at its own
/// offset within it, until its stream closes.
async fn report_stats(i: usize, client: DiscoveryClient<Channel>, fleet: Arc<Fleet>) {
    let mut on = fleet.reporting.clone();
    if on.wait_for(|on| *on).await.is_err() {
        return;
    }
    let offset = fleet
        .stats_interval
        .mul_f64(i as f64 / fleet.proxies.max(1) as f64);
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + offset, fleet.stats_interval);
    loop {
        tick.tick().await;
        // As the real proxy sends them: a `Report` call on the stream's connection,
        // one at a time (crates/proxy/src/control.rs).
        let req = ReportRequest {
            namespace: NS.into(),
            name: format!("p-{i}"),
            stats: Some(typical_report(i)),
        };
        if client.clone().report(req).await.is_ok() {
            fleet.reports_sent.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One simulated proxy, forever: a session, then on failure a reconnect with the
/// real proxy's backoff (100 ms doubling to 5 s, full jitter, at least 10 ms).
async fn run_proxy(i: usize, url: String, events: mpsc::UnboundedSender<Event>, fleet: Arc<Fleet>) {
    let mut attempt: u32 = 0;
    // xorshift64*, seeded per proxy: the jitter needs no crate.
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D);
    loop {
        match session(i, &url, &events, &fleet).await {
            Ok(()) | Err((true, _)) => {
                fleet.dropped_streams.fetch_add(1, Ordering::Relaxed);
                attempt = 0;
            }
            Err((false, _)) => {
                fleet.failed_attempts.fetch_add(1, Ordering::Relaxed);
            }
        }
        let cap = Duration::from_millis(100)
            .saturating_mul(1u32 << attempt.min(16))
            .min(Duration::from_secs(5));
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        let frac = (rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
        attempt = attempt.saturating_add(1);
        tokio::time::sleep(cap.mul_f64(frac).max(Duration::from_millis(10))).await;
    }
}

/// One stream. The error says whether a push had been received.
async fn session(
    i: usize,
    url: &str,
    events: &mpsc::UnboundedSender<Event>,
    fleet: &Arc<Fleet>,
) -> Result<(), (bool, String)> {
    let mut got_push = false;
    let endpoint = endpoint(url)
        .map_err(|e| (false, e))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        // As the real proxy (crates/proxy/src/control.rs).
        .http2_header_table_size(0);
    let channel = sinew_api::channel::connect(endpoint, fleet.tls.clone())
        .await
        .map_err(|e| (false, format!("proxy {i}: cannot connect: {e}")))?;
    let mut client = DiscoveryClient::new(channel).max_decoding_message_size(256 << 20);
    let (tx, rx) = mpsc::channel(8);
    tx.send(ProxyMessage {
        kind: Some(proxy_message::Kind::Hello(Hello {
            namespace: NS.into(),
            name: format!("p-{i}"),
            registration: None,
            applied_version: String::new(),
            proxy_version: "cpsim".into(),
            capture: None,
        })),
    })
    .await
    .map_err(|_| (false, "stream closed".to_owned()))?;
    let mut inbound = client
        .stream(ReceiverStream::new(rx))
        .await
        .map_err(|s| (false, format!("proxy {i}: {}: {}", s.code(), s.message())))?
        .into_inner();
    let reports = tokio::spawn(report_stats(i, client.clone(), Arc::clone(fleet)));
    // The reports stop with the stream.
    struct Abort(tokio::task::JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _reports = Abort(reports);
    let mut parts = 0;
    loop {
        let msg = match inbound.message().await {
            Ok(Some(msg)) => msg,
            Ok(None) => return Err((got_push, format!("proxy {i}: stream ended"))),
            Err(s) => {
                return Err((
                    got_push,
                    format!("proxy {i}: {}: {}", s.code(), s.message()),
                ));
            }
        };
        if let Some(control_message::Kind::Push(push)) = msg.kind {
            // A large push comes in parts: only the last is ACKed, as a proxy does.
            parts += push.resources.len();
            if push.more {
                continue;
            }
            let resources = std::mem::take(&mut parts);
            let at = Instant::now();
            got_push = true;
            tx.send(ProxyMessage {
                kind: Some(proxy_message::Kind::Ack(Ack {
                    version: push.version,
                    nonce: push.nonce,
                    error: String::new(),
                })),
            })
            .await
            .map_err(|_| (true, "stream closed".to_owned()))?;
            let _ = events.send(Event {
                proxy: i,
                at,
                full: push.full,
                resources,
            });
        }
    }
}

/// Waits until every proxy has a push received after `since`; returns per-proxy
/// latencies (ms) from `since`.
async fn collect(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    n: usize,
    since: Instant,
    deadline: Duration,
    sizes: &mut Vec<usize>,
    want_full: bool,
) -> Result<Vec<f64>, String> {
    let mut seen: HashMap<usize, f64> = HashMap::with_capacity(n);
    let end = tokio::time::Instant::from_std(since + deadline);
    while seen.len() < n {
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { return Err("event channel closed".into()) };
                if ev.at >= since && (!want_full || ev.full) && !seen.contains_key(&ev.proxy) {
                    seen.insert(ev.proxy, ms(ev.at - since));
                    sizes.push(ev.resources);
                }
            }
            _ = tokio::time::sleep_until(end) => {
                return Err(format!("only {} of {n} proxies got the push within {deadline:?}", seen.len()));
            }
        }
    }
    Ok(seen.into_values().collect())
}

#[tokio::main]
async fn main() {
    // A panic in any simulated proxy is a bug in the simulator: stop at once rather
    // than wait for a deadline.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::exit(101);
    }));
    if let Err(e) = real_main().await {
        eprintln!("cpsim: {e}");
        std::process::exit(1);
    }
}

async fn real_main() -> Result<(), String> {
    let a = parse_args()?;
    let cred: Credential = serde_norway::from_str(
        &std::fs::read_to_string(&a.credentials)
            .map_err(|e| format!("--credentials {:?}: {e}", a.credentials))?,
    )
    .map_err(|e| format!("--credentials {:?}: {e}", a.credentials))?;
    let admin_tls = sinew_tls::api::control_client_config(
        sinew_tls::api::ControlTrust::from_pem("roots", &cred.roots).map_err(|e| e.to_string())?,
        sinew_tls::api::ClientAuth::Static {
            chain_pem: cred.certificate.clone(),
            key_pem: cred.key.clone(),
        },
    )
    .map_err(|e| e.to_string())?;
    let mut admin = AdminClient::new(
        sinew_api::channel::connect(endpoint(&a.server)?, admin_tls)
            .await
            .map_err(|e| format!("cannot reach the control plane at {}: {e}", a.server))?,
    )
    .max_decoding_message_size(256 << 20);
    let token = std::fs::read_to_string(&a.join_token_file)
        .map_err(|e| format!("--join-token-file {:?}: {e}", a.join_token_file))?;
    let tls = proxy_tls(&a.server, &cred.roots, &token).await?;

    // 1. The mesh.
    let t = Instant::now();
    let mut services: Vec<String> = (0..a.services)
        .map(|s| service_doc(&format!("svc-{s}")))
        .collect();
    services.push(service_doc("common"));
    apply(&mut admin, "services", &services).await?;
    let per = a.endpoints / a.services;
    let mut workloads = Vec::with_capacity(a.endpoints + 10);
    for i in 0..per * a.services {
        let s = i % a.services;
        workloads.push(workload_doc(
            &format!("svc-{s}-{}", i / a.services),
            &format!("svc-{s}"),
            i,
        ));
    }
    let base = per * a.services;
    for k in 0..10 {
        workloads.push(workload_doc(&format!("common-{k}"), "common", base + k));
    }
    apply(&mut admin, "workloads", &workloads).await?;
    apply(&mut admin, "route", &[route_doc(0)]).await?;
    let proxies: Vec<String> = (0..a.proxies)
        .map(|i| proxy_doc(i, a.services, a.per_proxy))
        .collect();
    apply(&mut admin, "proxies", &proxies).await?;
    out(json!({"phase": "applied", "apply_ms": ms(t.elapsed()),
               "documents": services.len() + workloads.len() + 1 + proxies.len(),
               "endpoints": workloads.len()}));
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let _ = stdin.next_line().await;

    // 2. The connect storm.
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let (reporting, reporting_rx) = tokio::sync::watch::channel(false);
    let fleet = Arc::new(Fleet {
        failed_attempts: AtomicU64::new(0),
        dropped_streams: AtomicU64::new(0),
        reports_sent: AtomicU64::new(0),
        reporting: reporting_rx,
        stats_interval: a.stats_interval,
        proxies: a.proxies,
        tls,
    });
    let storm = Instant::now();
    for i in 0..a.proxies {
        let (ev, url, fleet) = (ev_tx.clone(), a.server.clone(), Arc::clone(&fleet));
        tokio::spawn(run_proxy(i, url, ev, fleet));
    }
    let mut sizes = Vec::new();
    let first = collect(
        &mut ev_rx,
        a.proxies,
        storm,
        Duration::from_secs(120),
        &mut sizes,
        true,
    )
    .await?;
    let storm_all = ms(storm.elapsed());
    wait_synced(&mut admin, a.proxies, Duration::from_secs(60)).await?;
    let storm_synced = ms(storm.elapsed());
    let storm_failed = fleet.failed_attempts.load(Ordering::Relaxed);
    let storm_dropped = fleet.dropped_streams.load(Ordering::Relaxed);
    let full_sizes: Vec<f64> = sizes.iter().map(|&s| s as f64).collect();

    // 3. Changes.
    let mut route = Vec::new();
    let mut endpoint = Vec::new();
    let mut changes = Vec::new();
    for k in 0..a.changes {
        // Drain anything left over (late pushes of the previous change).
        while ev_rx.try_recv().is_ok() {}
        let kind = if k % 2 == 0 { "route" } else { "endpoint" };
        let doc = if kind == "route" {
            route_doc(k + 1)
        } else {
            workload_doc(&format!("common-new-{k}"), "common", base + 100 + k)
        };
        let t0 = Instant::now();
        apply(&mut admin, kind, &[doc]).await?;
        let applied = ms(t0.elapsed());
        let mut sz = Vec::new();
        let lat = collect(
            &mut ev_rx,
            a.proxies,
            t0,
            Duration::from_secs(60),
            &mut sz,
            false,
        )
        .await?;
        let all = lat.iter().copied().fold(0.0, f64::max);
        wait_synced(&mut admin, a.proxies, Duration::from_secs(60)).await?;
        let cp_all = ms(t0.elapsed());
        changes.push(
            json!({"kind": kind, "apply_ms": applied, "all_acked_ms": all,
                            "cp_saw_all_acks_ms": cp_all, "per_proxy": pcts(lat.clone()),
                            "push_resources": pcts(sz.iter().map(|&s| s as f64).collect())}),
        );
        if kind == "route" {
            route.extend(lat)
        } else {
            endpoint.extend(lat)
        }
    }
    let all_of = |kind: &str| -> Vec<f64> {
        changes
            .iter()
            .filter(|c| c["kind"] == kind)
            .filter_map(|c| c["all_acked_ms"].as_f64())
            .collect()
    };
    out(json!({
        "phase": "done",
        "proxies": a.proxies,
        "storm": {"first_push": pcts(first), "all_pushed_ms": storm_all,
                  "all_synced_ms": storm_synced, "full_push_resources": pcts(full_sizes),
                  "failed_attempts": storm_failed, "dropped_streams": storm_dropped},
        "after_storm": {"failed_attempts": fleet.failed_attempts.load(Ordering::Relaxed) - storm_failed,
                        "dropped_streams": fleet.dropped_streams.load(Ordering::Relaxed) - storm_dropped},
        "route": {"per_proxy": pcts(route), "all_acked": pcts(all_of("route"))},
        "endpoint": {"per_proxy": pcts(endpoint), "all_acked": pcts(all_of("endpoint"))},
        "changes": changes,
    }));
    // 4. Hold the streams until bench/run has read the control plane's memory;
    //    stats reports on request.
    while let Ok(Some(line)) = stdin.next_line().await {
        match line.trim() {
            "stats" => {
                let _ = reporting.send(true);
                out(json!({"phase": "reporting",
                           "interval_ms": ms(a.stats_interval)}));
            }
            "count" => {
                let st = admin
                    .stat(StatRequest {
                        by: "service".into(),
                        namespace: String::new(),
                        window_seconds: 0,
                        direction: String::new(),
                    })
                    .await
                    .map_err(|s| format!("stat: {}: {}", s.code(), s.message()))?
                    .into_inner();
                out(json!({"phase": "count",
                           "reports_sent": fleet.reports_sent.load(Ordering::Relaxed),
                           "stat_proxies": st.proxies,
                           "stat_rows": st.rows.len(),
                           "stat_requests": st.rows.iter().map(|r| r.requests).sum::<u64>(),
                           "stat_window_s": st.window_seconds,
                           "dropped_streams": fleet.dropped_streams.load(Ordering::Relaxed)}));
            }
            _ => {}
        }
    }
    Ok(())
}
