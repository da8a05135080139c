//! `sinew demo`: start the mesh, wait until it is ready, load it, report, clean up.
//!
//! Progress goes to standard error; standard output carries the `--json` line (first),
//! the description of what runs where, the live view (see [`show`]), each act's JSON
//! line with `--json`, the summary and the verdict.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use http::{StatusCode, Uri};
use sinew_api::demo::HelloRequest;
use sinew_api::demo::demo_client::DemoClient;
use sinew_api::v1::admin_client::AdminClient;
use sinew_api::v1::{
    ApplyRequest, CreateJoinTokenRequest, HealthRequest, ProxyStatusRequest, Source,
};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::DemoArgs;
use crate::client::{HttpClient, get, new_client};
use crate::envfile::EnvFile;
use crate::frame::{Frame, Row as FrameRow};
use crate::load::{Failures, LoadGen};
use crate::process::{Children, TempDir};
use crate::report::{Row, table};
use crate::signal::Signals;
use crate::stats::{Counters, Stats};
use crate::topology::{LOADGEN, NAMESPACE, Plan};
use crate::tour::{Live, SharedLive, Tour, lock};

/// How often a readiness condition is checked again.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Longest single readiness probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the processes are checked once the tour is over.
const REPORT_INTERVAL: Duration = Duration::from_secs(2);
/// How often a frame of the live view is built.
const FRAME_INTERVAL: Duration = Duration::from_secs(1);
/// How long the exit waits for the last frame.
const LAST_FRAME_WAIT: Duration = Duration::from_secs(3);
/// The window of the control plane's `Stat` behind the live view (its slots are 10 s).
const FRAME_WINDOW: Duration = Duration::from_secs(10);
/// The least time between two service lines of the plain view.
const PLAIN_EVERY: Duration = Duration::from_secs(5);
/// The entry point's success rate a healthy run needs (percent).
const MIN_SUCCESS_PCT: f64 = 99.0;

/// The Admin API client the demo (and its tour) calls, as an operator would.
pub(crate) type Admin = AdminClient<Channel>;

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if !(1..=10_000).contains(&args.rate) {
        bail!("--rate must be between 1 and 10000 requests per second");
    }
    let (sinew, proxy) = binaries(&args)?;
    let mut signals = Signals::install()?;
    let tmp = TempDir::create(args.keep_temp)?;
    let data_dir = tmp.path().join("data");
    std::fs::create_dir(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let mut children = Children::new(tmp.path().join("logs"))?;
    let plan = Plan::allocate().context("cannot pick free loopback ports")?;
    let client = new_client();

    let result = async {
        let started = tokio::select! {
            started = start_mesh(&args, &plan, &sinew, &proxy, &data_dir, &mut children, &client) => started?,
            signal = signals.recv() => {
                eprintln!("demo: {signal} before the mesh was up; stopping");
                return Ok(());
            }
        };
        print_info(&args, &plan, &data_dir, children.log_dir(), &started.grpc_hello)?;
        let info = plan.info(&data_dir.display().to_string());
        // `sinew demo env` reads it; removed when this returns.
        let env = EnvFile::write(&info.control_plane, &info.credentials)?;
        eprintln!("demo: wrote {} (for `sinew demo env`)", env.path().display());
        let restart = Restart {
            sinew: sinew.clone(),
            proxy: proxy.clone(),
            tokens: data_dir.join("tokens"),
        };
        let tour_dir = tmp.path().join("tour");
        run_load(
            &args,
            &plan,
            &client,
            &mut children,
            &mut signals,
            started,
            (tour_dir, restart),
        )
        .await
    }
    .await;

    if result.is_err() {
        let tails = children.log_tails(15);
        if !tails.is_empty() {
            eprintln!("demo: the end of each process's log:\n{tails}");
        }
    }
    eprintln!("demo: stopping every process it started");
    children.shutdown().await;
    eprintln!("{}", tmp.finish());
    result
}

/// The `sinew` executable (this process) and `sinew-proxy`.
fn binaries(args: &DemoArgs) -> anyhow::Result<(PathBuf, PathBuf)> {
    let sinew = std::env::current_exe().context("cannot find the sinew executable")?;
    let proxy = match &args.proxy_bin {
        Some(path) => {
            if !path.is_file() {
                bail!(
                    "sinew-proxy not found at {} (from --proxy-bin or SINEW_PROXY_BIN)",
                    path.display()
                );
            }
            path.clone()
        }
        None => {
            let path = sinew.with_file_name(format!("sinew-proxy{}", std::env::consts::EXE_SUFFIX));
            if !path.is_file() {
                bail!(
                    "sinew-proxy not found next to sinew (looked for {}); build it with `cargo build --bins`",
                    path.display()
                );
            }
            path
        }
    };
    Ok((sinew, proxy))
}

pub(crate) fn write_owner_only(path: &Path, data: &str) -> anyhow::Result<()> {
    Ok(sinew_tls::private_file::write(path, data.as_bytes())?)
}

/// What the tour needs to start an instance again: the executables and where join
/// tokens go.
pub(crate) struct Restart {
    pub(crate) sinew: PathBuf,
    pub(crate) proxy: PathBuf,
    pub(crate) tokens: PathBuf,
}

/// What startup learned.
struct Started {
    /// The gRPC `Hello` through the entry point: the reply, or why it failed.
    grpc_hello: Result<String, String>,
    /// The Admin API, with the control plane's admin credential.
    admin: Admin,
    /// Service account → SPIFFE id, from the join tokens.
    identities: BTreeMap<String, String>,
}

/// Starts every process and waits until the mesh serves the entry point.
async fn start_mesh(
    args: &DemoArgs,
    plan: &Plan,
    sinew: &Path,
    proxy: &Path,
    data_dir: &Path,
    children: &mut Children,
    client: &HttpClient,
) -> anyhow::Result<Started> {
    let deadline = Instant::now() + args.startup_timeout;
    let cp_url = plan.control_plane_url();

    eprintln!("demo: starting the control plane on {cp_url}");
    children.spawn(
        "control",
        sinew,
        &[
            "control".to_owned(),
            "--listen".to_owned(),
            plan.control_plane.to_string(),
            "--data-dir".to_owned(),
            data_dir.display().to_string(),
        ],
    )?;
    // The control plane writes its admin credential on first start; the demo calls
    // it with that, as an operator would.
    let cred_path = data_dir.join(sinew_control::credentials::ADMIN_FILE);
    let cred = wait_until(
        "the control plane's admin credential",
        deadline,
        children,
        true,
        || {
            let p = cred_path.clone();
            async move {
                if !p.exists() {
                    return Err(format!("{} not written yet", p.display()));
                }
                sinew_control::credentials::CredentialFile::read(&p)
            }
        },
    )
    .await?;
    let tls = sinew_tls::api::control_client_config(
        sinew_tls::api::ControlTrust::from_pem("admin credential roots", &cred.roots)?,
        sinew_tls::api::ClientAuth::Static {
            chain_pem: cred.certificate.clone(),
            key_pem: cred.key.clone(),
        },
    )?;
    let endpoint = sinew_api::channel::endpoint(&cp_url)?
        .connect_timeout(Duration::from_secs(1))
        .timeout(PROBE_TIMEOUT);
    let admin = AdminClient::new(sinew_api::channel::connect_lazy(endpoint, tls));
    wait_until(
        "the control plane's health (store_ok)",
        deadline,
        children,
        true,
        || health(admin.clone()),
    )
    .await?;

    eprintln!("demo: applying Services, Proxies and the catalog HTTPRoute (90/10)");
    let applied = admin
        .clone()
        .apply(ApplyRequest {
            sources: vec![Source {
                label: "demo.yaml".into(),
                text: plan.documents(),
            }],
            dry_run: false,
        })
        .await
        .map_err(|s| {
            anyhow!(
                "the control plane refused the demo documents ({:?}): {}",
                s.code(),
                s.message()
            )
        })?
        .into_inner();
    eprintln!(
        "demo: applied {} documents (revision {})",
        applied.results.len(),
        applied.revision
    );

    // Every sidecar gets an identity (a join token per service account, kept in an
    // owner-only file): all sidecar-to-sidecar traffic is mTLS.
    let tokens = data_dir.join("tokens");
    std::fs::create_dir_all(&tokens)
        .with_context(|| format!("cannot create {}", tokens.display()))?;
    let identities = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    // One token per instance (its file named after it); replicas share an account.
    let token_file = |account: &str, instance: &str| {
        let admin = admin.clone();
        let path = tokens.join(instance);
        let account = account.to_owned();
        let identities = identities.clone();
        async move {
            let t = admin
                .clone()
                .create_join_token(CreateJoinTokenRequest {
                    namespace: NAMESPACE.to_owned(),
                    service_account: account.clone(),
                    // One proxy bootstraps with it, now.
                    ttl_seconds: 3600,
                    uses: 1,
                })
                .await
                .map_err(|s| anyhow!("cannot create a join token for {account}: {}", s.message()))?
                .into_inner();
            write_owner_only(&path, &t.token)?;
            identities
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(account, t.spiffe_id);
            anyhow::Ok(path)
        }
    };
    for instance in &plan.instances {
        children.spawn(
            &format!("{}.app", instance.name),
            sinew,
            &plan.app_args(instance),
        )?;
        let mut args = plan.proxy_args(instance);
        args.push("--join-token-file".to_owned());
        args.push(
            token_file(instance.service, instance.name)
                .await?
                .display()
                .to_string(),
        );
        children.spawn(&format!("{}.proxy", instance.name), proxy, &args)?;
    }
    let mut args = plan.loadgen_proxy_args();
    args.push("--join-token-file".to_owned());
    args.push(token_file(LOADGEN, LOADGEN).await?.display().to_string());
    children.spawn(&format!("{LOADGEN}.proxy"), proxy, &args)?;
    eprintln!(
        "demo: started {} demo apps and {} sidecars",
        plan.instances.len(),
        plan.instances.len() + 1
    );

    wait_until("the demo apps", deadline, children, true, || {
        apps_healthy(client, plan)
    })
    .await?;
    eprintln!("demo: every demo app answers /healthz");

    wait_until(
        "every sidecar to connect and apply its config",
        deadline,
        children,
        true,
        || proxies_in_sync(admin.clone(), plan, &[]),
    )
    .await?;
    eprintln!("demo: every sidecar is connected and in sync");

    let entry = entry_uri(plan)?;
    wait_until(
        "a 200 from the entry point",
        deadline,
        children,
        true,
        || async {
            let f = get(client, &entry, PROBE_TIMEOUT).await?;
            if f.status == StatusCode::OK {
                Ok(())
            } else {
                Err(format!(
                    "{entry} answered {}: {}",
                    f.status,
                    String::from_utf8_lossy(&f.body).trim()
                ))
            }
        },
    )
    .await?;
    eprintln!("demo: the entry point {entry} answers 200");

    let hello_deadline = Instant::now() + Duration::from_secs(5);
    let grpc_url = format!("http://{}", plan.entry_grpc);
    let grpc_hello = wait_until(
        "a gRPC Hello through the entry point",
        hello_deadline,
        children,
        false,
        || grpc_hello(grpc_url.clone()),
    )
    .await
    .map_err(|e| e.to_string());
    let identities = identities
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    Ok(Started {
        grpc_hello,
        admin,
        identities,
    })
}

/// Polls `probe` until it succeeds, `deadline` passes, or a child exits. With
/// `progress`, prints each new reason for still waiting.
async fn wait_until<T, F, Fut>(
    what: &str,
    deadline: Instant,
    children: &mut Children,
    progress: bool,
    mut probe: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let mut last = String::new();
    loop {
        children
            .check_running()
            .with_context(|| format!("while waiting for {what}"))?;
        let budget = deadline
            .saturating_duration_since(Instant::now())
            .clamp(POLL_INTERVAL, PROBE_TIMEOUT);
        let why = match tokio::time::timeout(budget, probe()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(why)) => why,
            Err(_) => format!("no answer within {} ms", budget.as_millis()),
        };
        if Instant::now() >= deadline {
            bail!("gave up waiting for {what}: {why}");
        }
        if progress && why != last {
            eprintln!("demo: waiting for {what}: {why}");
        }
        last = why;
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

async fn health(mut admin: Admin) -> Result<(), String> {
    let health = admin
        .health(HealthRequest {})
        .await
        .map_err(|s| status_text(&s))?
        .into_inner();
    if health.store_ok {
        Ok(())
    } else {
        Err(format!("store not ok: {}", health.store_error))
    }
}

fn status_text(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    if let Some(source) = std::error::Error::source(status) {
        text.push_str(&format!(" ({source})"));
    }
    text
}

async fn apps_healthy(client: &HttpClient, plan: &Plan) -> Result<(), String> {
    let checks = plan.instances.iter().map(|i| async move {
        let uri = format!("http://{}/healthz", i.app_http)
            .parse::<Uri>()
            .map_err(|e| e.to_string())?;
        match get(client, &uri, PROBE_TIMEOUT).await {
            Ok(f) if f.status == StatusCode::OK => Ok(()),
            Ok(f) => Err(format!("{} ({})", i.name, f.status)),
            Err(e) => Err(format!("{} ({e})", i.name)),
        }
    });
    let waiting: Vec<String> = futures_util::future::join_all(checks)
        .await
        .into_iter()
        .filter_map(Result::err)
        .collect();
    if waiting.is_empty() {
        Ok(())
    } else {
        Err(waiting.join(", "))
    }
}

/// Whether every sidecar (but those of the instances in `ignore`: killed) is
/// connected, registered and has applied the latest configuration; else who is not.
pub(crate) async fn proxies_in_sync(
    mut admin: Admin,
    plan: &Plan,
    ignore: &[&str],
) -> Result<(), String> {
    let status = admin
        .proxy_status(ProxyStatusRequest {})
        .await
        .map_err(|s| status_text(&s))?
        .into_inner();
    let expected = plan
        .instances
        .iter()
        .filter(|i| !ignore.contains(&i.name))
        .map(|i| (i.name, true))
        .chain([(LOADGEN, false)]);
    let mut total = 0;
    let mut waiting = Vec::new();
    for (name, registers) in expected {
        total += 1;
        let found = status
            .proxies
            .iter()
            .find(|p| p.namespace == NAMESPACE && p.name == name);
        let why = match found {
            None => Some("not seen yet".to_owned()),
            Some(p) if !p.connected => Some("not connected".to_owned()),
            Some(p) if p.applied_version.is_empty() || p.applied_version != p.latest_version => {
                Some(if p.last_nack.is_empty() {
                    "applying its config".to_owned()
                } else {
                    format!("refused its config: {}", p.last_nack)
                })
            }
            Some(p) if registers && p.workload.is_empty() => {
                Some("workload not registered".to_owned())
            }
            Some(_) => None,
        };
        if let Some(why) = why {
            waiting.push(format!("{name} ({why})"));
        }
    }
    if waiting.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}/{total} in sync; waiting for {}",
            total - waiting.len(),
            waiting.join(", ")
        ))
    }
}

async fn grpc_hello(url: String) -> Result<String, String> {
    let channel = Endpoint::from_shared(url.clone())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(PROBE_TIMEOUT)
        .connect()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let reply = DemoClient::new(channel)
        .hello(HelloRequest {
            caller: "sinew demo".into(),
        })
        .await
        .map_err(|s| status_text(&s))?
        .into_inner();
    Ok(format!(
        "{} {} ({}), {} downstream replies",
        reply.service,
        reply.version,
        reply.instance,
        reply.downstream.len()
    ))
}

fn entry_uri(plan: &Plan) -> anyhow::Result<Uri> {
    // The load only ever goes to loopback.
    debug_assert!(plan.entry.ip().is_loopback());
    Ok(format!("{}/", plan.entry_url()).parse::<Uri>()?)
}

/// Prints the `--json` line (first) and the human description of the mesh.
fn print_info(
    args: &DemoArgs,
    plan: &Plan,
    data_dir: &Path,
    logs: &Path,
    grpc_hello: &Result<String, String>,
) -> anyhow::Result<()> {
    let info = plan.info(&data_dir.display().to_string());
    if args.json {
        println!("{}", serde_json::to_string(&info)?);
    }
    let mut out = String::new();
    out.push_str("Sinew demo mesh is up (namespace demo):\n");
    out.push_str(&format!(
        "  control plane  {}   data dir {}\n",
        info.control_plane, info.data_dir
    ));
    out.push_str(&format!(
        "  entry point    {}   (loadgen sidecar -> frontend:http; gRPC: {})\n",
        info.entry, info.entry_grpc
    ));
    out.push_str(&format!("  logs           {}\n", logs.display()));
    out.push_str(&format!(
        "  operator       eval \"$(sinew demo env)\"   (SINEW_SERVER={} SINEW_CREDENTIALS={} SINEW_NAMESPACE=demo)\n",
        info.control_plane, info.credentials
    ));
    out.push_str(&format!(
        "  {:<13} {:<11} {:<8} {:<23} {:<23} {:<23} {}\n",
        "INSTANCE", "SERVICE", "VERSION", "APP HTTP", "APP GRPC", "PROXY ADMIN", "INBOUND"
    ));
    let dash = || "-".to_owned();
    for p in &info.proxies {
        out.push_str(&format!(
            "  {:<13} {:<11} {:<8} {:<23} {:<23} {:<23} {}\n",
            p.name,
            p.service.clone().unwrap_or_else(dash),
            p.version.clone().unwrap_or_else(dash),
            p.app_http.clone().unwrap_or_else(dash),
            p.app_grpc.clone().unwrap_or_else(dash),
            p.admin,
            p.inbound.clone().unwrap_or_else(dash),
        ));
    }
    out.push_str(
        "  calls: frontend -> catalog (HTTPRoute: 90% catalog-v1, 10% catalog-v2 (two replicas)), frontend -> reviews -> ratings\n",
    );
    match grpc_hello {
        Ok(reply) => out.push_str(&format!("  gRPC Hello via the entry point: {reply}\n")),
        Err(e) => out.push_str(&format!(
            "  gRPC Hello via the entry point failed (HTTP load goes on): {e}\n"
        )),
    }
    out.push_str(&format!(
        "  load: {} req/s to the entry point {}\n",
        args.rate,
        match (args.duration, args.no_tour) {
            (Some(d), true) => format!("for {}s", d.as_secs_f64()),
            (Some(d), false) => format!("through the tour, then for {}s", d.as_secs_f64()),
            (None, _) => "until Ctrl-C".to_owned(),
        }
    ));

    print!("{out}");
    Ok(())
}

/// Reads one app's `/stats`.
async fn fetch_stats(client: &HttpClient, addr: SocketAddr) -> Result<Counters, String> {
    let uri = format!("http://{addr}/stats")
        .parse::<Uri>()
        .map_err(|e| e.to_string())?;
    let f = get(client, &uri, PROBE_TIMEOUT).await?;
    if f.status != StatusCode::OK {
        return Err(format!("{uri}: {}", f.status));
    }
    let stats: Stats =
        serde_json::from_slice(&f.body).map_err(|e| format!("{uri}: invalid stats: {e}"))?;
    Ok(stats.counters)
}

/// Every app's `/stats`, in plan order.
async fn fetch_all(client: &HttpClient, plan: &Plan) -> Vec<Result<Counters, String>> {
    futures_util::future::join_all(
        plan.instances
            .iter()
            .map(|i| fetch_stats(client, i.app_http)),
    )
    .await
}

/// The commands the demo suggests trying from a second shell.
pub(crate) fn try_next() -> Vec<String> {
    [
        "eval \"$(sinew demo env)\"",
        "sinew stat",
        "sinew stat --by route",
        "sinew top",
        "sinew tap",
        "sinew edges",
        "sinew get httproutes",
        "sinew proxy-status",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The live view while it runs: [`View::quit`] fires when the user ends it ('q' or
/// Ctrl-C in the terminal view, where raw mode turns Ctrl-C into a key, not SIGINT).
struct View {
    task: tokio::task::JoinHandle<()>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    quit: Arc<tokio::sync::Notify>,
}

impl View {
    /// Ends the view and waits (briefly) for it to give the terminal back, so the
    /// summary prints on the normal screen.
    async fn close(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}

/// Draws the live view. This is where the view is chosen: the in-place terminal view
/// ([`crate::tui`]) when standard output is a terminal, plain lines ([`crate::plain`])
/// otherwise and always with `--json`, whose lines must stay parseable.
fn show(rx: watch::Receiver<Frame>, json: bool) -> View {
    let quit = Arc::new(tokio::sync::Notify::new());
    if json || !crate::tui::is_terminal() {
        return View {
            task: tokio::spawn(crate::plain::run(rx, PLAIN_EVERY)),
            stop: None,
            quit,
        };
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let quitter = quit.clone();
    let task = tokio::spawn(async move {
        let ended = crate::tui::run(rx, async move {
            let _ = stopped.await;
        })
        .await;
        if let Err(e) = ended {
            eprintln!("demo: the live view failed: {e}; the demo goes on without it");
            return;
        }
        // Ended by the user, or by `close` (then nobody listens any more).
        quitter.notify_one();
    });
    View {
        task,
        stop: Some(stop),
        quit,
    }
}

/// Builds a frame every [`FRAME_INTERVAL`] from the control plane's `Stat` (the
/// proxies' reports) and the tour's live state, until the view goes away or `finish`
/// fires; then it builds one last frame and returns, which ends the frames (the
/// plain view prints what is new in it, then ends).
async fn frames(
    admin: Admin,
    live: SharedLive,
    started: Instant,
    tx: watch::Sender<Frame>,
    mut finish: tokio::sync::oneshot::Receiver<()>,
) {
    let mut ticker = tokio::time::interval(FRAME_INTERVAL);
    let mut rows = Vec::new();
    loop {
        let last = tokio::select! {
            _ = ticker.tick() => false,
            _ = &mut finish => true,
        };
        // A failed read keeps the last rows: the view goes on.
        if let Ok(stat) = crate::observe::stat(&admin, "service", NAMESPACE, FRAME_WINDOW).await {
            rows = frame_rows(&stat);
        }
        let frame = {
            let l = lock(&live);
            Frame {
                elapsed_secs: started.elapsed().as_secs(),
                act: l.act.clone(),
                caption: l.caption.clone(),
                rows: rows.clone(),
                events: l.events.iter().cloned().collect(),
                try_next: l.try_next.clone(),
            }
        };
        if tx.send(frame).is_err() || last {
            return;
        }
    }
}

/// The view's rows from `Stat` rows by service; the catalog row carries the split
/// between catalog-v1 and catalog-v2.
fn frame_rows(stat: &[sinew_api::v1::StatRow]) -> Vec<FrameRow> {
    use crate::observe::short;
    let rps_of = |service: &str| {
        stat.iter()
            .filter(|r| short(&r.name) == service)
            .map(|r| r.rps)
            .sum::<f64>()
    };
    let mut rows: Vec<FrameRow> = stat
        .iter()
        .map(|r| {
            let service = short(&r.name).to_owned();
            let split = if service == "catalog" {
                let (v1, v2) = (rps_of("catalog-v1").max(0.0), rps_of("catalog-v2").max(0.0));
                if v1 + v2 > 0.0 {
                    format!(
                        "v1 {:.0}% · v2 {:.0}%",
                        100.0 * v1 / (v1 + v2),
                        100.0 * v2 / (v1 + v2)
                    )
                } else {
                    String::new()
                }
            } else {
                String::new()
            };
            let of_requests = |n: u64| (r.requests > 0).then(|| n as f64 / r.requests as f64);
            FrameRow {
                service,
                namespace: r.namespace.clone(),
                rps: r.rps,
                success: of_requests(r.requests.saturating_sub(r.failures)),
                p50_ms: (r.p50_ms > 0.0).then_some(r.p50_ms),
                p99_ms: (r.p99_ms > 0.0).then_some(r.p99_ms),
                mtls: of_requests(r.mtls_requests),
                split,
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.namespace, &a.service).cmp(&(&b.namespace, &b.service)));
    rows
}

/// Reads every app's `/stats` every [`REPORT_INTERVAL`] into `seen`, so the summary
/// has the last counters of an instance the tour killed. Counters that went back (the
/// instance was started again) are not taken: the summary counts an instance up to
/// its kill.
async fn watch_stats(client: HttpClient, plan: Plan, seen: Arc<std::sync::Mutex<Vec<Counters>>>) {
    let mut ticker = tokio::time::interval(REPORT_INTERVAL);
    loop {
        ticker.tick().await;
        let now = fetch_all(&client, &plan).await;
        let mut seen = seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (slot, result) in seen.iter_mut().zip(now) {
            if let Ok(counters) = result
                && counters.requests >= slot.requests
            {
                *slot = counters;
            }
        }
    }
}

/// Sends load, plays the tour (unless `--no-tour`), then keeps the load going until
/// the duration ends or a signal comes, with the live view drawn meanwhile; then
/// prints the summary and the verdict.
async fn run_load(
    args: &DemoArgs,
    plan: &Plan,
    client: &HttpClient,
    children: &mut Children,
    signals: &mut Signals,
    started: Started,
    (tour_dir, restart): (PathBuf, Restart),
) -> anyhow::Result<()> {
    let mut baseline = Vec::new();
    for (instance, result) in plan.instances.iter().zip(fetch_all(client, plan).await) {
        let counters =
            result.map_err(|e| anyhow!("cannot read the stats of {}: {e}", instance.name))?;
        baseline.push(counters);
    }
    let seen = Arc::new(std::sync::Mutex::new(baseline.clone()));
    let stats_task = tokio::spawn(watch_stats(client.clone(), plan.clone(), seen.clone()));
    let load = LoadGen::start(entry_uri(plan)?, args.rate);
    let load_started = Instant::now();
    let live: SharedLive = Arc::new(std::sync::Mutex::new(Live {
        try_next: try_next(),
        ..Live::default()
    }));
    let (tx, rx) = watch::channel(Frame::default());
    let (finish, finished) = tokio::sync::oneshot::channel();
    let mut producer = tokio::spawn(frames(
        started.admin.clone(),
        live.clone(),
        load_started,
        tx,
        finished,
    ));
    let view = show(rx, args.json);

    let mut problems = Vec::new();
    let mut stopped_by = None;
    if !args.no_tour {
        let mut tour = Tour {
            admin: started.admin.clone(),
            plan,
            client,
            load: &load,
            children: &mut *children,
            dir: tour_dir,
            restart,
            json: args.json,
            act_duration: args.act_duration,
            live: live.clone(),
            identities: started.identities.clone(),
            killed: Vec::new(),
            act: 0,
            reports: Vec::new(),
        };
        tokio::select! {
            played = tour.play() => {
                if let Err(e) = played {
                    eprintln!("demo: the tour stopped: {e:#}");
                    problems.push(format!("{e:#}"));
                }
            }
            signal = signals.recv() => {
                eprintln!("demo: {signal}; stopping the tour and the load");
                stopped_by = Some(signal);
            }
            () = view.quit.notified() => stopped_by = Some("quit from the live view"),
        }
    }

    let end = args.duration.map(|d| Instant::now() + d);
    let stopped_by = match stopped_by {
        Some(signal) => signal,
        None if !problems.is_empty() => "the tour failed",
        None => {
            let mut ticker = tokio::time::interval(REPORT_INTERVAL);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {
                        if let Err(e) = children.check_running() {
                            problems.push(format!("{e:#}"));
                            break "a process exited";
                        }
                    }
                    _ = sleep_until_opt(end) => break "the duration ended",
                    signal = signals.recv() => {
                        eprintln!("demo: {signal}; stopping the load");
                        break signal;
                    }
                    () = view.quit.notified() => break "quit from the live view",
                }
            }
        }
    };
    let stopped_by_user = matches!(
        stopped_by,
        "SIGINT" | "SIGTERM" | "Ctrl-C" | "quit from the live view"
    );
    let load_time = load_started.elapsed();
    let (entry, failures) = load.stop().await;
    // One last frame, from the numbers as the load stopped; then the view ends. The
    // frame's `Stat` call is bounded: a control plane gone quiet does not hold the exit.
    let _ = finish.send(());
    if tokio::time::timeout(LAST_FRAME_WAIT, &mut producer)
        .await
        .is_err()
    {
        producer.abort();
        eprintln!("demo: the last frame took over {LAST_FRAME_WAIT:?}; ending without it");
    }
    stats_task.abort();
    view.close().await;

    // Final numbers: read now, or (if an app is gone) as last seen.
    let finals = fetch_all(client, plan).await;
    let seen = seen
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let mut rows = Vec::new();
    let entry_summary = entry.summarize(load_time);
    rows.push(Row {
        name: "entry",
        version: "-",
        summary: Some(entry_summary),
    });
    for (((instance, result), last), base) in
        plan.instances.iter().zip(finals).zip(&seen).zip(&baseline)
    {
        let counters = match result {
            Ok(c) if c.requests >= last.requests => c,
            _ => last.clone(),
        };
        let total = counters.since(base);
        if total.requests == 0 {
            let note = format!("{} saw no traffic", instance.name);
            if stopped_by_user {
                // Quit early, an instance with a small share may not have been picked
                // yet: worth saying, not a failed demo.
                println!("note: {note} before the demo was stopped");
            } else {
                problems.push(note);
            }
        }
        rows.push(Row {
            name: instance.service,
            version: instance.version,
            summary: Some(total.summarize(load_time)),
        });
    }
    match entry_summary.success_pct {
        None => problems.push("no request went through the entry point".to_owned()),
        Some(pct) if pct < MIN_SUCCESS_PCT => problems.push(format!(
            "the entry point's success rate was {pct:.2}% (below {MIN_SUCCESS_PCT}%): {}",
            describe_failures(&failures)
        )),
        Some(_) => {}
    }
    println!(
        "== summary: {:.1}s of load at {} req/s ({stopped_by})\n{}",
        load_time.as_secs_f64(),
        args.rate,
        table(&rows)
    );
    if entry.errors > 0 {
        println!("entry point failures: {}", describe_failures(&failures));
    }
    if problems.is_empty() {
        println!("demo: ok");
        Ok(())
    } else {
        let why = problems.join("; ");
        println!("demo: failed: {why}");
        Err(anyhow!("the demo run was not healthy: {why}"))
    }
}

fn describe_failures(failures: &Failures) -> String {
    let mut kinds: Vec<(&String, &u64)> = failures.iter().collect();
    kinds.sort_by(|a, b| b.1.cmp(a.1));
    kinds
        .iter()
        .take(5)
        .map(|(what, n)| format!("{n} × {what}"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn sleep_until_opt(end: Option<Instant>) {
    match end {
        Some(end) => tokio::time::sleep_until(end).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn demo_args(proxy_bin: Option<PathBuf>) -> DemoArgs {
        DemoArgs {
            command: None,
            no_tour: false,
            act_duration: Duration::from_secs(15),
            duration: None,
            json: false,
            rate: 50,
            startup_timeout: Duration::from_secs(60),
            proxy_bin,
            keep_temp: false,
        }
    }

    #[test]
    fn a_missing_proxy_is_one_clear_sentence() {
        // The test executable has no sinew-proxy next to it.
        let err = binaries(&demo_args(None)).unwrap_err().to_string();
        assert!(
            err.starts_with("sinew-proxy not found next to sinew")
                && err.ends_with("build it with `cargo build --bins`"),
            "{err}"
        );
        let err = binaries(&demo_args(Some("/nonexistent/sinew-proxy".into())))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sinew-proxy not found at /nonexistent/sinew-proxy"),
            "{err}"
        );
    }

    #[test]
    fn frame_rows_come_from_stat_with_the_catalog_split() {
        let row = |name: &str, rps: f64, requests: u64, failures: u64, mtls: u64| {
            sinew_api::v1::StatRow {
                name: format!("{name}.demo"),
                namespace: "demo".into(),
                rps,
                requests,
                failures,
                mtls_requests: mtls,
                p50_ms: 2.0,
                p99_ms: 0.0,
                ..Default::default()
            }
        };
        let rows = frame_rows(&[
            row("frontend", 50.0, 100, 1, 100),
            row("catalog-v2", 5.0, 10, 0, 10),
            row("catalog", 50.0, 100, 0, 50),
            row("catalog-v1", 45.0, 90, 0, 90),
            row("idle", 0.0, 0, 0, 0),
        ]);
        let names: Vec<&str> = rows.iter().map(|r| r.service.as_str()).collect();
        assert_eq!(
            names,
            ["catalog", "catalog-v1", "catalog-v2", "frontend", "idle"]
        );
        assert_eq!(rows[0].split, "v1 90% · v2 10%");
        assert_eq!(rows[0].mtls, Some(0.5));
        assert!(rows[1].split.is_empty());
        assert_eq!(rows[3].success, Some(0.99));
        assert_eq!(rows[3].p50_ms, Some(2.0));
        assert_eq!(rows[3].p99_ms, None);
        assert_eq!((rows[4].success, rows[4].mtls), (None, None));
    }

    #[tokio::test]
    async fn a_bad_rate_is_refused_before_anything_starts() {
        let mut args = demo_args(None);
        args.rate = 0;
        let err = run(args).await.unwrap_err().to_string();
        assert!(err.contains("--rate"), "{err}");
    }
}
