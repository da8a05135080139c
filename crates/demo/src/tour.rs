//! The tour: a scripted story told on the running demo mesh, one act at a time, each
//! applied through the Admin API as `sinew apply` does (the documents are written to
//! files whose `sinew apply -f` command is printed) and measured from the mesh's own
//! telemetry:
//!
//! 1. **canary**: the catalog `HTTPRoute` re-applied 90/10 → 50/50 → 0/100; the split
//!    is what catalog-v1's and catalog-v2's sidecars counted arriving (with the mTLS
//!    share).
//! 2. **retries**: a `RoutePolicy` makes reviews' sidecar abort 20% of its calls to
//!    ratings with 503 (fault injection happens in the caller's sidecar, before its
//!    own retries, as in Envoy); another gives the route to reviews retries with a
//!    budget, so frontend's sidecar tries reviews again and the client sees no
//!    failure, while `sinew stat --by route` shows the injected failures on the
//!    ratings route.
//! 3. **ejection**: catalog-v2 runs two replicas; with outlier detection on, one is
//!    killed (SIGKILL to its app and sidecar). Its callers resend what it never
//!    answered and route around it: peak-EWMA balancing charges the broken connection,
//!    and a refused connection ejects it (whether a refusal happens depends on timing,
//!    so the ejection count may be 0). No client request fails. It is then started
//!    again (a new join token), so the mesh is whole for what follows.
//! 4. **authorization**: an `AuthorizationPolicy` lets only reviews (by its mTLS
//!    identity) call ratings; the load generator's sidecar calling ratings directly
//!    gets 403 and the reason (`sinew-error`).
//!
//! Every act ends with an [`ActReport`] (printed as one JSON line with `--json`) and an
//! event in the live view.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use http::Uri;
use sinew_api::v1::{
    ApplyRequest, CreateJoinTokenRequest, DeleteRequest, ProxyStatusRequest, ResourceKey, Source,
};
use tokio::time::Instant;

use crate::client::{HttpClient, get};
use crate::load::LoadGen;
use crate::mesh::{Admin, Restart, proxies_in_sync};
use crate::observe::{self, EJECTIONS, REQUESTS, RETRIES, Sample};
use crate::process::Children;
use crate::stats::Counters;
use crate::topology::{NAMESPACE, Plan, catalog_route};
use crate::{ActReport, ClientFigures, DeniedFigures, EjectionFigures, RetryFigures, SplitFigures};

/// Acts in the tour (the canary counts three).
const ACTS: usize = 6;
/// Events the live view keeps.
const MAX_EVENTS: usize = 12;
/// How long the mesh may take to apply a change everywhere.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// The instance the ejection act kills.
const VICTIM: &str = "catalog-v2-1";
/// Between two acts: longer than a frame of the live view.
const PAUSE: Duration = Duration::from_millis(1200);
/// The share of calls to ratings the fault aborts, percent.
const FAULT_PERCENT: f64 = 20.0;

/// What the live view shows besides the numbers: the act, its caption, the events
/// and the commands to try. The tour writes it; the frame producer reads it.
#[derive(Debug, Default)]
pub(crate) struct Live {
    pub(crate) act: String,
    pub(crate) caption: String,
    pub(crate) events: VecDeque<String>,
    pub(crate) try_next: Vec<String>,
}

/// The live state shared between the tour and the frame producer.
pub(crate) type SharedLive = Arc<Mutex<Live>>;

/// Locks the live state (a panic elsewhere leaves it usable).
pub(crate) fn lock(live: &SharedLive) -> std::sync::MutexGuard<'_, Live> {
    live.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Live {
    /// Adds an event, dropping the oldest beyond [`MAX_EVENTS`].
    pub(crate) fn event(&mut self, text: String) {
        self.events.push_back(text);
        while self.events.len() > MAX_EVENTS {
            self.events.pop_front();
        }
    }
}

/// Everything an act needs.
pub(crate) struct Tour<'a> {
    pub(crate) admin: Admin,
    pub(crate) plan: &'a Plan,
    pub(crate) client: &'a HttpClient,
    pub(crate) load: &'a LoadGen,
    pub(crate) children: &'a mut Children,
    /// Where the acts' documents are written (for the printed `sinew apply -f`).
    pub(crate) dir: PathBuf,
    /// How to start the killed instance again.
    pub(crate) restart: Restart,
    /// Print each act's report as a JSON line.
    pub(crate) json: bool,
    pub(crate) act_duration: Duration,
    pub(crate) live: SharedLive,
    /// Service account → SPIFFE id, from the join tokens.
    pub(crate) identities: BTreeMap<String, String>,
    /// Instances killed so far (no longer expected in sync).
    pub(crate) killed: Vec<&'static str>,
    pub(crate) act: usize,
    pub(crate) reports: Vec<ActReport>,
}

/// The client's counters at a moment.
struct Mark {
    client: Counters,
    at: Instant,
}

impl Tour<'_> {
    /// Plays every act in order; stops at the first that fails.
    pub(crate) async fn play(&mut self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        self.canary(90, 10).await.context("tour act canary 90/10")?;
        self.pause().await?;
        self.canary(50, 50).await.context("tour act canary 50/50")?;
        self.pause().await?;
        self.canary(0, 100).await.context("tour act canary 0/100")?;
        self.pause().await?;
        self.retries().await.context("tour act retries")?;
        self.pause().await?;
        self.ejection().await.context("tour act ejection")?;
        self.pause().await?;
        self.authorization()
            .await
            .context("tour act authorization")?;
        self.pause().await?;
        let mut live = lock(&self.live);
        live.act = "tour done".to_owned();
        live.caption =
            "the mesh keeps running with steady load: try the commands from a second shell"
                .to_owned();
        live.event("tour: every act done".to_owned());
        Ok(())
    }

    /// Gives the view a frame with an act's result before the next act begins.
    async fn pause(&mut self) -> anyhow::Result<()> {
        self.hold(PAUSE).await
    }

    /// Starts act `title`.
    fn begin(&mut self, title: &str, caption: &str) {
        self.act += 1;
        let mut live = lock(&self.live);
        live.act = format!("{}/{ACTS} {title}", self.act);
        live.caption = caption.to_owned();
    }

    fn event(&self, text: String) {
        lock(&self.live).event(text);
    }

    /// Writes `text` to `<dir>/<file>` and applies it through the Admin API, as
    /// `sinew apply -f <that file>` would; the event shows the command and document.
    /// `affects`: the sidecars whose configuration the change alters; the act goes on
    /// once they run it.
    async fn apply(&mut self, file: &str, text: &str, affects: &[&str]) -> anyhow::Result<String> {
        let path = self.dir.join(file);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        let command = format!("sinew apply -f {}", path.display());
        let before = self.versions().await?;
        let applied = self
            .admin
            .clone()
            .apply(ApplyRequest {
                sources: vec![Source {
                    label: path.display().to_string(),
                    text: text.to_owned(),
                }],
                dry_run: false,
            })
            .await
            .map_err(|s| {
                anyhow!(
                    "the control plane refused {} ({:?}): {}",
                    path.display(),
                    s.code(),
                    s.message()
                )
            })?
            .into_inner();
        self.event(format!("$ {command}\n{}", text.trim_end()));
        self.sync(&before, applied.revision, affects).await?;
        Ok(command)
    }

    /// The published revision and every sidecar's latest configuration version.
    async fn versions(&self) -> anyhow::Result<(u64, BTreeMap<String, String>)> {
        let status = self
            .admin
            .clone()
            .proxy_status(ProxyStatusRequest {})
            .await
            .map_err(|s| anyhow!("ProxyStatus: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        let latest = status
            .proxies
            .into_iter()
            .filter(|p| p.namespace == NAMESPACE)
            .map(|p| (p.name, p.latest_version))
            .collect();
        Ok((status.revision, latest))
    }

    /// `sinew delete KIND NAME -n demo`, through the Admin API.
    async fn delete(&mut self, kind: &str, name: &str, affects: &[&str]) -> anyhow::Result<String> {
        let command = format!(
            "sinew delete {} {name} -n {NAMESPACE}",
            kind.to_ascii_lowercase()
        );
        let before = self.versions().await?;
        let deleted = self
            .admin
            .clone()
            .delete(DeleteRequest {
                keys: vec![ResourceKey {
                    kind: kind.to_owned(),
                    namespace: NAMESPACE.to_owned(),
                    name: name.to_owned(),
                }],
            })
            .await
            .map_err(|s| anyhow!("cannot delete {kind} {name}: {}", s.message()))?
            .into_inner();
        self.event(format!("$ {command}"));
        self.sync(&before, deleted.revision, affects).await?;
        Ok(command)
    }

    /// Waits until the control plane published `revision`, the sidecars in `affects`
    /// got a new configuration (when the revision is new: re-applying the same
    /// document changes nothing), and every live sidecar applied its latest. A proxy's
    /// version moves only once the control plane computed it, a debounce after the
    /// change: "in sync" alone could still be the old configuration.
    async fn sync(
        &mut self,
        before: &(u64, BTreeMap<String, String>),
        revision: u64,
        affects: &[&str],
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + SYNC_TIMEOUT;
        loop {
            self.children.check_running()?;
            let moved = if revision > before.0 {
                let (published, now) = self.versions().await?;
                let stale: Vec<&str> = affects
                    .iter()
                    .copied()
                    .filter(|name| now.get(*name) == before.1.get(*name))
                    .collect();
                if published < revision {
                    Err(format!("revision {revision} not published yet"))
                } else if !stale.is_empty() {
                    Err(format!("no new configuration yet for {}", stale.join(", ")))
                } else {
                    Ok(())
                }
            } else {
                Ok(())
            };
            let state = match moved {
                Ok(()) => proxies_in_sync(self.admin.clone(), self.plan, &self.killed).await,
                Err(e) => Err(e),
            };
            match state {
                Ok(()) => return Ok(()),
                Err(why) if Instant::now() >= deadline => {
                    bail!(
                        "the sidecars did not apply the change within {}s: {why}",
                        SYNC_TIMEOUT.as_secs()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Lets the load run for `d`, checking that no process died.
    async fn hold(&mut self, d: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.children.check_running()?;
            tokio::time::sleep_until(end.min(Instant::now() + Duration::from_millis(250))).await;
        }
        self.children.check_running()
    }

    fn mark(&self) -> Mark {
        Mark {
            client: self.load.snapshot(),
            at: Instant::now(),
        }
    }

    /// The client's figures since `mark`.
    fn client_since(&self, mark: &Mark) -> ClientFigures {
        let d = self.load.snapshot().since(&mark.client);
        ClientFigures {
            requests: d.requests,
            failed: d.errors,
            success_rate: (d.requests > 0)
                .then(|| d.requests.saturating_sub(d.errors) as f64 / d.requests as f64),
        }
    }

    /// `/metrics` of the sidecars of every live instance whose name starts with
    /// `prefix` (empty: all), by instance name.
    async fn scrape(&self, prefix: &str) -> anyhow::Result<BTreeMap<&'static str, Vec<Sample>>> {
        let mut out = BTreeMap::new();
        for i in &self.plan.instances {
            if !i.name.starts_with(prefix) || self.killed.contains(&i.name) {
                continue;
            }
            let samples = observe::scrape(self.client, i.admin)
                .await
                .map_err(|e| anyhow!("cannot read {}'s sidecar metrics: {e}", i.name))?;
            out.insert(i.name, samples);
        }
        Ok(out)
    }

    /// Records a finished act: the report (a JSON line with `--json`) and an event.
    fn finish(&mut self, report: ActReport, summary: String) -> anyhow::Result<()> {
        let c = &report.client;
        self.event(format!(
            "measured over {:.0}s: {summary}; client {} ({} of {} requests failed)",
            report.seconds,
            pct(c.success_rate),
            c.failed,
            c.requests
        ));
        if self.json {
            println!("{}", serde_json::to_string(&report)?);
        }
        self.reports.push(report);
        Ok(())
    }

    async fn canary(&mut self, v1: u32, v2: u32) -> anyhow::Result<()> {
        self.begin(
            &format!("canary: {v1}/{v2}"),
            &format!(
                "the catalog HTTPRoute sends {v1}% to catalog-v1 and {v2}% to catalog-v2; \
                 the split is what their sidecars counted"
            ),
        );
        let command = self
            .apply(
                &format!("catalog-{v1}-{v2}.yaml"),
                &catalog_route(v1, v2),
                &["frontend-0"],
            )
            .await?;
        let inbound = |m: &BTreeMap<&str, Vec<Sample>>, service: &str, mtls_only: bool| -> f64 {
            m.iter()
                .filter(|(name, _)| name.starts_with(&format!("{service}-")))
                .map(|(_, samples)| {
                    observe::sum(samples, REQUESTS, |s| {
                        s.label("direction") == "inbound"
                            && (!mtls_only || !s.label("peer_identity").is_empty())
                    })
                })
                .sum()
        };
        let before = self.scrape("catalog-").await?;
        let mark = self.mark();
        self.hold(self.act_duration).await?;
        let after = self.scrape("catalog-").await?;
        let client = self.client_since(&mark);
        let delta = |service: &str, mtls: bool| {
            (inbound(&after, service, mtls) - inbound(&before, service, mtls)).max(0.0) as u64
        };
        let (n1, n2) = (delta("catalog-v1", false), delta("catalog-v2", false));
        let mtls = delta("catalog-v1", true) + delta("catalog-v2", true);
        let total = n1 + n2;
        let share = (total > 0).then(|| n2 as f64 / total as f64);
        let mtls_share = (total > 0).then(|| mtls as f64 / total as f64);
        let summary = format!(
            "catalog-v2 got {} (v1 {n1} · v2 {n2} requests), {} over mTLS",
            pct(share),
            pct(mtls_share)
        );
        self.finish(
            ActReport {
                act: "canary".to_owned(),
                step: format!("{v1}/{v2}"),
                seconds: mark.at.elapsed().as_secs_f64(),
                commands: vec![command, "sinew stat --by workload".to_owned()],
                client,
                split: Some(SplitFigures {
                    weights: [v1, v2],
                    v1_requests: n1,
                    v2_requests: n2,
                    v2_share: share,
                    mtls_share,
                }),
                retries: None,
                ejection: None,
                denied: None,
            },
            summary,
        )
    }

    async fn retries(&mut self) -> anyhow::Result<()> {
        self.begin(
            "retries: a fault in ratings, rescued",
            &format!(
                "reviews' sidecar fails {FAULT_PERCENT:.0}% of its calls to ratings (503); \
                 frontend's sidecar retries reviews within a budget: the client sees no failure"
            ),
        );
        let (retry, fault) = (retry_policy(), fault_policy());
        // The safety net first: a fault before the retries would reach the client.
        let retry_cmd = self
            .apply("reviews-retry.yaml", &retry, &["frontend-0"])
            .await?;
        let fault_cmd = self
            .apply("ratings-fault.yaml", &fault, &["reviews-0"])
            .await?;
        let route = format!("{NAMESPACE}/ratings");
        let injected = |m: &BTreeMap<&str, Vec<Sample>>| -> f64 {
            m.values()
                .map(|samples| {
                    observe::sum(samples, REQUESTS, |s| {
                        s.label("direction") == "outbound"
                            && s.label("route") == route
                            && s.label("status_code") == "503"
                    })
                })
                .sum()
        };
        let retries = |m: &BTreeMap<&str, Vec<Sample>>| -> f64 {
            m.values().map(|s| observe::sum(s, RETRIES, |_| true)).sum()
        };
        let before_reviews = self.scrape("reviews-").await?;
        let before_frontend = self.scrape("frontend-").await?;
        let mark = self.mark();
        self.hold(self.act_duration).await?;
        let after_reviews = self.scrape("reviews-").await?;
        let after_frontend = self.scrape("frontend-").await?;
        let client = self.client_since(&mark);
        let seconds = mark.at.elapsed().as_secs_f64();
        // What `sinew stat --by route` shows: the proxies report every 2 s, so wait
        // for the fault's failures to be in.
        let stat_cmd = "sinew stat --by route".to_owned();
        let deadline = Instant::now() + Duration::from_secs(10);
        let row = loop {
            let rows = observe::stat(&self.admin, "route", NAMESPACE, Duration::from_secs(60))
                .await
                .map_err(|e| anyhow!("{e}"))?;
            let row = rows
                .into_iter()
                .find(|r| observe::short(&r.name) == "ratings");
            match row {
                Some(r) if r.failures > 0 => break r,
                other if Instant::now() >= deadline => {
                    bail!(
                        "`{stat_cmd}` shows no failures on route {route} 10s after the fault: {other:?}"
                    )
                }
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        };
        self.event(format!(
            "$ {stat_cmd}: route ratings {} of {} requests failed (the injected 503s; \
             the client never saw them)",
            row.failures, row.requests
        ));
        let delete_cmd = self
            .delete("RoutePolicy", "ratings-fault", &["reviews-0"])
            .await?;
        let figures = RetryFigures {
            fault_route: route.clone(),
            fault_percent: FAULT_PERCENT,
            injected_failures: (injected(&after_reviews) - injected(&before_reviews)).max(0.0)
                as u64,
            retries_sent: (retries(&after_frontend) - retries(&before_frontend)).max(0.0) as u64,
            route_stat_requests: row.requests,
            route_stat_failures: row.failures,
        };
        let summary = format!(
            "{} injected 503s on {route}, {} retries by frontend's sidecar",
            figures.injected_failures, figures.retries_sent
        );
        self.finish(
            ActReport {
                act: "retries".to_owned(),
                step: String::new(),
                seconds,
                commands: vec![retry_cmd, fault_cmd, stat_cmd, delete_cmd],
                client,
                split: None,
                retries: Some(figures),
                ejection: None,
                denied: None,
            },
            summary,
        )
    }

    async fn ejection(&mut self) -> anyhow::Result<()> {
        self.begin(
            "ejection: an instance killed",
            &format!(
                "catalog-v2 runs two replicas; {VICTIM} is killed: its callers resend what it \
                 never answered and route around it (ejected at a refused connection): no \
                 client request fails"
            ),
        );
        let policy = outlier_policy();
        let apply_cmd = self
            .apply("catalog-v2-outliers.yaml", &policy, &["frontend-0"])
            .await?;
        // Both replicas serve for a while first.
        self.hold(self.act_duration / 2).await?;
        let ejections = |m: &BTreeMap<&str, Vec<Sample>>| -> f64 {
            m.values()
                .map(|s| observe::sum(s, EJECTIONS, |_| true))
                .sum()
        };
        let survivor = |m: &BTreeMap<&str, Vec<Sample>>| -> f64 {
            m.get("catalog-v2-0").map_or(0.0, |s| {
                observe::sum(s, REQUESTS, |s| s.label("direction") == "inbound")
            })
        };
        let before_frontend = self.scrape("frontend-").await?;
        let before_v2 = self.scrape("catalog-v2-0").await?;
        let mark = self.mark();
        let killed = self.children.kill(&format!("{VICTIM}.")).await;
        if killed.is_empty() {
            bail!("{VICTIM} was not running");
        }
        self.killed.push(VICTIM);
        let pids: Vec<String> = killed
            .iter()
            .filter_map(|(_, pid)| pid.map(|p| p.to_string()))
            .collect();
        let kill_cmd = format!("kill -9 {}", pids.join(" "));
        self.event(format!(
            "$ {kill_cmd}   # {VICTIM}'s app and sidecar ({})",
            killed
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        self.hold(self.act_duration).await?;
        let after_frontend = self.scrape("frontend-").await?;
        let after_v2 = self.scrape("catalog-v2-0").await?;
        let client = self.client_since(&mark);
        let seconds = mark.at.elapsed().as_secs_f64();
        self.start_again(VICTIM).await?;
        let figures = EjectionFigures {
            killed: VICTIM.to_owned(),
            ejections: (ejections(&after_frontend) - ejections(&before_frontend)).max(0.0) as u64,
            survivor_requests: (survivor(&after_v2) - survivor(&before_v2)).max(0.0) as u64,
            failed_after_kill: client.failed,
        };
        let summary = format!(
            "catalog-v2-0 served {} requests alone, {} ejection(s) of {VICTIM} by \
             frontend's sidecar; {VICTIM} started again",
            figures.survivor_requests, figures.ejections
        );
        self.finish(
            ActReport {
                act: "ejection".to_owned(),
                step: String::new(),
                seconds,
                commands: vec![apply_cmd, kill_cmd, "sinew stat --by workload".to_owned()],
                client,
                split: None,
                retries: None,
                ejection: Some(figures),
                denied: None,
            },
            summary,
        )
    }

    /// Starts a killed instance again (its app, and its sidecar with a new join
    /// token) and waits until its sidecar is in sync.
    async fn start_again(&mut self, name: &'static str) -> anyhow::Result<()> {
        let instance = self
            .plan
            .instances
            .iter()
            .find(|i| i.name == name)
            .ok_or_else(|| anyhow!("no instance {name}"))?
            .clone();
        let token = self
            .admin
            .clone()
            .create_join_token(CreateJoinTokenRequest {
                namespace: NAMESPACE.to_owned(),
                service_account: instance.service.to_owned(),
                ttl_seconds: 3600,
                uses: 1,
            })
            .await
            .map_err(|s| anyhow!("cannot create a join token for {name}: {}", s.message()))?
            .into_inner();
        let path = self.restart.tokens.join(format!("{name}.again"));
        crate::mesh::write_owner_only(&path, &token.token)?;
        let app = self.plan.app_args(&instance);
        let mut proxy = self.plan.proxy_args(&instance);
        proxy.push("--join-token-file".to_owned());
        proxy.push(path.display().to_string());
        let sinew = self.restart.sinew.clone();
        let proxy_bin = self.restart.proxy.clone();
        self.children
            .spawn(&format!("{name}.app-again"), &sinew, &app)?;
        self.children
            .spawn(&format!("{name}.proxy-again"), &proxy_bin, &proxy)?;
        self.killed.retain(|k| *k != name);
        self.event(format!(
            "started {name} again (app and sidecar, a new join token); it rejoins when its ejection ends"
        ));
        let before = self.versions().await?;
        self.sync(&before, 0, &[]).await
    }

    async fn authorization(&mut self) -> anyhow::Result<()> {
        self.begin(
            "authorization: a call denied",
            "only reviews (by its mTLS identity) may call ratings; the load generator's \
             sidecar calling ratings directly is refused with the reason",
        );
        let reviews = self
            .identities
            .get("reviews")
            .ok_or_else(|| anyhow!("no identity known for reviews"))?
            .clone();
        let loadgen = self
            .identities
            .get(crate::topology::LOADGEN)
            .cloned()
            .unwrap_or_default();
        let policy = authorization_policy(&reviews);
        let apply_cmd = self
            .apply("ratings-callers.yaml", &policy, &["ratings-0"])
            .await?;
        let mark = self.mark();
        let uri: Uri = format!("http://{}/", self.plan.loadgen_ratings).parse()?;
        let curl = format!("curl -i http://{}/", self.plan.loadgen_ratings);
        // In sync means applied; a connection opened before may still be judged by
        // the old rules for a moment, so ask until the answer is the refusal.
        let deadline = Instant::now() + Duration::from_secs(10);
        let fetched = loop {
            let f = get(self.client, &uri, Duration::from_secs(5))
                .await
                .map_err(|e| anyhow!("{curl}: {e}"))?;
            if f.status == http::StatusCode::FORBIDDEN || Instant::now() >= deadline {
                break f;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let reason = fetched
            .headers
            .get("sinew-error")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = String::from_utf8_lossy(&fetched.body)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned();
        let mut shown = format!(
            "$ {curl}   # loadgen's sidecar → ratings, as {loadgen}\n{} {}",
            fetched.status.as_u16(),
            fetched.status.canonical_reason().unwrap_or("")
        );
        if !reason.is_empty() {
            let _ = write!(shown, "\nsinew-error: {reason}");
        }
        let _ = write!(shown, "\n{body}");
        self.event(shown);
        // Reviews is still allowed: the client's requests go on succeeding.
        self.hold(self.act_duration / 2).await?;
        let client = self.client_since(&mark);
        let figures = DeniedFigures {
            from: loadgen,
            to: format!("ratings.{NAMESPACE}"),
            status: fetched.status.as_u16(),
            reason,
            body,
        };
        let summary = format!(
            "loadgen → ratings got {} ({}), reviews → ratings still allowed",
            figures.status, figures.reason
        );
        self.finish(
            ActReport {
                act: "authorization".to_owned(),
                step: String::new(),
                seconds: mark.at.elapsed().as_secs_f64(),
                commands: vec![
                    apply_cmd,
                    curl,
                    "sinew tap".to_owned(),
                    "sinew edges".to_owned(),
                ],
                client,
                split: None,
                retries: None,
                ejection: None,
                denied: Some(figures),
            },
            summary,
        )
    }
}

/// The act 2 safety net: retries for the route to reviews, within a budget.
pub(crate) fn retry_policy() -> String {
    format!(
        "apiVersion: sinew.dev/v1alpha1\n\
         kind: RoutePolicy\n\
         metadata: {{name: reviews-retry, namespace: {NAMESPACE}}}\n\
         spec:\n  \
           targetRef: {{group: gateway.networking.k8s.io, kind: HTTPRoute, name: reviews}}\n  \
           retry: {{attempts: 4, codes: [502, 503], backoff: 10ms, budget: {{ratio: 0.5, minPerSecond: 20}}}}\n"
    )
}

/// The act 2 fault: reviews' sidecar aborts a share of its calls to ratings.
pub(crate) fn fault_policy() -> String {
    format!(
        "apiVersion: sinew.dev/v1alpha1\n\
         kind: RoutePolicy\n\
         metadata: {{name: ratings-fault, namespace: {NAMESPACE}}}\n\
         spec:\n  \
           targetRef: {{group: gateway.networking.k8s.io, kind: HTTPRoute, name: ratings}}\n  \
           fault: {{abort: {{httpStatus: 503, percent: {FAULT_PERCENT}}}}}\n"
    )
}

/// The act 3 outlier detection for catalog-v2's endpoints.
pub(crate) fn outlier_policy() -> String {
    format!(
        "apiVersion: sinew.dev/v1alpha1\n\
         kind: TrafficPolicy\n\
         metadata: {{name: catalog-v2, namespace: {NAMESPACE}}}\n\
         spec:\n  \
           targetRef: {{kind: Service, name: catalog-v2}}\n  \
           outlierDetection: {{consecutiveFailures: 3, consecutiveRefusals: 1, baseEjectionTime: 5s}}\n"
    )
}

/// The act 4 policy: only `reviews` (a SPIFFE id) may call ratings.
pub(crate) fn authorization_policy(reviews: &str) -> String {
    format!(
        "apiVersion: sinew.dev/v1alpha1\n\
         kind: AuthorizationPolicy\n\
         metadata: {{name: ratings-callers, namespace: {NAMESPACE}}}\n\
         spec:\n  \
           targetRef: {{kind: Service, name: ratings}}\n  \
           rules:\n    \
             - from: {{principals: [\"{reviews}\"]}}\n"
    )
}

/// `12.34%`, or `-`.
fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{:.2}%", v * 100.0))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn every_act_document_is_valid_with_the_demo_mesh() {
        let plan = Plan::allocate().unwrap();
        // The canary's route replaces the one the mesh starts with.
        let mut text = plan
            .documents()
            .replace(&catalog_route(90, 10), &catalog_route(50, 50));
        assert!(text.contains("weight: 50"), "{text}");
        for doc in [
            retry_policy(),
            fault_policy(),
            outlier_policy(),
            authorization_policy("spiffe://cluster.local/ns/demo/sa/reviews"),
        ] {
            text.push_str("---\n");
            text.push_str(&doc);
        }
        let docs = sinew_model::parse_documents("tour.yaml", &text)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(docs.len(), 20, "{text}");
        sinew_model::Resources::from_documents(docs).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(fault_policy().contains("httpStatus: 503, percent: 20"));
    }
}
