//! The Sinew demo: a sample workload (`sinew demo-app`, see [`app`]) and a one-command
//! demo mesh (`sinew demo`, see [`run`]).
//!
//! `sinew demo` starts the control plane, six service instances (each a `demo-app`
//! behind its own `sinew-proxy`; catalog-v2 has two replicas) and a load generator's
//! sidecar, all on loopback:
//!
//! ```text
//! load generator ─► loadgen sidecar ─► frontend ─┬─► catalog ─┬─ 90% ─► catalog-v1
//!                   (entry point)                │            └─ 10% ─► catalog-v2 (×2)
//!                                                └─► reviews ───► ratings
//! ```
//!
//! It applies the Services, Proxies and the `HTTPRoute`s through the Admin API, waits
//! until every sidecar is in sync and the entry point answers, then sends steady load
//! and plays the tour (see the `tour` module): the canary shifting 90/10 → 50/50 →
//! 0/100, a fault injected and rescued by retries, an instance killed and ejected, a
//! call denied by an `AuthorizationPolicy`; each act applied as `sinew apply` would and
//! measured from the mesh's own telemetry. A live view ([`frame::Frame`], once a
//! second) shows every service's success, rate, latency and mTLS share as the control
//! plane's `Stat` reports them. At the end it prints a summary (from each app's
//! `/stats`) and `demo: ok` when the entry point's success rate was at least 99% and
//! every service saw traffic.
//!
//! While it runs, `sinew demo env` prints the `export` lines that point `sinew` at it.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod app;
mod client;
mod envfile;
pub mod frame;
mod load;
mod mesh;
mod observe;
mod plain;
mod process;
mod report;
mod signal;
pub mod stats;
mod topology;
mod tour;
mod tui;

/// `sinew demo`: run the demo mesh on loopback.
#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DemoArgs {
    /// `sinew demo env`; without a subcommand, run the demo.
    #[command(subcommand)]
    pub command: Option<DemoCommand>,
    /// How long to keep sending load after the tour (with `--no-tour`: once the mesh
    /// is up), e.g. `30s`, `2m`, `1m30s`; without it the demo runs until Ctrl-C or
    /// SIGTERM.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Print what runs where as one JSON object on the first line of standard output,
    /// then one JSON object per finished act of the tour (lines starting `{"act":`).
    #[arg(long)]
    pub json: bool,
    /// Load generator requests per second.
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub rate: u32,
    /// How long the mesh may take to come up.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub startup_timeout: Duration,
    /// The `sinew-proxy` executable (default: `sinew-proxy` next to `sinew`).
    #[arg(long, value_name = "PATH", env = "SINEW_PROXY_BIN")]
    pub proxy_bin: Option<PathBuf>,
    /// Keep the temporary directory (control-plane data, every process's log) at exit.
    #[arg(long)]
    pub keep_temp: bool,
    /// Skip the tour (canary, retries, ejection, authorization): steady load only.
    #[arg(long)]
    pub no_tour: bool,
    /// How long each act of the tour measures the mesh.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    pub act_duration: Duration,
}

/// `sinew demo`'s subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DemoCommand {
    /// Print `export` lines that point `sinew` at the running demo
    /// (`eval "$(sinew demo env)"`): SINEW_SERVER, SINEW_CREDENTIALS, SINEW_NAMESPACE.
    Env,
}

/// Runs the demo mesh until `--duration` ends, or Ctrl-C or SIGTERM; then stops every
/// process it started and removes its temporary directory. Fails (after printing why)
/// when the mesh does not come up, a process dies, or the run was not healthy.
/// `sinew demo env` prints the running demo's environment instead (and fails when no
/// demo runs).
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    match args.command {
        Some(DemoCommand::Env) => envfile::print(),
        None => mesh::run(args).await,
    }
}

/// What runs where: the object `sinew demo --json` prints on its first line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DemoInfo {
    /// The control plane's Admin/Discovery gRPC URL (TLS), e.g. `https://127.0.0.1:41000`.
    pub control_plane: String,
    /// The entry point URL (the load generator's sidecar binding to `frontend:http`).
    pub entry: String,
    /// The same sidecar's binding to `frontend:grpc` (`sinew.demo.v1.Demo/Hello`).
    pub entry_grpc: String,
    /// The control plane's data directory (removed at exit).
    pub data_dir: String,
    /// The admin credential the control plane wrote (`sinew --credentials FILE`).
    pub credentials: String,
    /// Every sidecar: the five service instances, then `loadgen`.
    pub proxies: Vec<ProxyInfo>,
}

/// One sidecar and the instance behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProxyInfo {
    /// Instance id, also the `Proxy` document name in namespace `demo`.
    pub name: String,
    /// The Service the instance registers as; `null` for `loadgen`.
    pub service: Option<String>,
    /// The instance's version label; `null` for `loadgen`.
    pub version: Option<String>,
    /// The proxy's admin URL (`/live`, `/ready`, `/metrics`, `/config`).
    pub admin: String,
    /// The proxy's inbound listener (`host:port`); `null` for `loadgen`.
    pub inbound: Option<String>,
    /// The app's HTTP URL (bypasses the mesh; `/stats`, `/healthz`).
    pub app_http: Option<String>,
    /// The app's gRPC URL.
    pub app_grpc: Option<String>,
}

/// One finished act of the tour: what `sinew demo --json` prints after the
/// [`DemoInfo`] line, one object per line (`{"act": ...}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActReport {
    /// Which act: `canary`, `retries`, `ejection` or `authorization`.
    pub act: String,
    /// The step within the act, e.g. `90/10` for the canary; empty otherwise.
    pub step: String,
    /// How long the act measured, in seconds.
    pub seconds: f64,
    /// The `sinew` commands that did (or show) what the act did, in order.
    pub commands: Vec<String>,
    /// What the load generator (the client at the entry point) saw meanwhile.
    pub client: ClientFigures,
    /// Canary: requests each version served, from their sidecars' counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<SplitFigures>,
    /// Retries: the injected failures and the retries that rescued them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetryFigures>,
    /// Ejection: the killed instance and what its callers did about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ejection: Option<EjectionFigures>,
    /// Authorization: the denied call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denied: Option<DeniedFigures>,
}

/// The client's requests during an act.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientFigures {
    /// Requests sent to the entry point.
    pub requests: u64,
    /// Of those, the ones that did not get a 200.
    pub failed: u64,
    /// `(requests - failed) / requests`; `null` without requests.
    pub success_rate: Option<f64>,
}

/// The catalog split the mesh carried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitFigures {
    /// The weights applied, `[v1, v2]`.
    pub weights: [u32; 2],
    /// Requests catalog-v1's sidecars received (inbound).
    pub v1_requests: u64,
    /// Requests catalog-v2's sidecars received (inbound).
    pub v2_requests: u64,
    /// `v2 / (v1 + v2)`; `null` without requests.
    pub v2_share: Option<f64>,
    /// Share of those requests that arrived over mTLS.
    pub mtls_share: Option<f64>,
}

/// Injected failures and retries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryFigures {
    /// The route the fault was injected on (`namespace/name`).
    pub fault_route: String,
    /// Share of its requests the fault aborted (percent, as applied).
    pub fault_percent: f64,
    /// Injected failures its caller's sidecar counted (status 503 on that route).
    pub injected_failures: u64,
    /// Retries the retrying sidecar sent.
    pub retries_sent: u64,
    /// `sinew stat --by route`'s row for the faulted route: requests and failures
    /// over its window, as the control plane answered.
    pub route_stat_requests: u64,
    /// Failures in the same row.
    pub route_stat_failures: u64,
}

/// An instance killed and ejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EjectionFigures {
    /// The instance killed (app and sidecar, SIGKILL).
    pub killed: String,
    /// Outlier ejections frontend's sidecar counted after the kill (0 when it routed
    /// around the instance before ever trying it again: peak EWMA charges a broken
    /// connection).
    pub ejections: u64,
    /// Requests the surviving replica's sidecar received after the kill.
    pub survivor_requests: u64,
    /// Client requests that failed from the kill to the end of the act.
    pub failed_after_kill: u64,
}

/// A call refused by an authorization policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeniedFigures {
    /// The caller's SPIFFE id (its sidecar's mTLS identity).
    pub from: String,
    /// The service called.
    pub to: String,
    /// The HTTP status the caller got.
    pub status: u16,
    /// The `sinew-error` header: reason and deciding policy.
    pub reason: String,
    /// The first line of the body.
    pub body: String,
}

impl DemoInfo {
    /// Parses the `--json` line.
    pub fn parse(line: &str) -> anyhow::Result<DemoInfo> {
        Ok(serde_json::from_str(line.trim())?)
    }
}

/// Parses `30s`, `2m`, `1m30s`, `500ms`, `1h` or a plain number of seconds: the
/// grammar of every duration flag ([`sinew_model::duration::flag_secs`]).
fn parse_duration(text: &str) -> Result<Duration, String> {
    nonzero(sinew_model::duration::flag_secs(text)?, text)
}

fn nonzero(d: Duration, text: &str) -> Result<Duration, String> {
    if d.is_zero() {
        Err(format!("invalid duration {text:?}: must be more than zero"))
    } else {
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        for bad in ["", "s", "10x", "1.5s", "-1s", "0s", "m5"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn args_parse_with_clap() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            demo: DemoArgs,
        }
        let cli =
            Cli::try_parse_from(["sinew", "--duration", "20s", "--json", "--rate", "40"]).unwrap();
        assert!(cli.demo.command.is_none());
        assert!(!cli.demo.no_tour);
        assert_eq!(cli.demo.act_duration, Duration::from_secs(15));
        assert_eq!(cli.demo.duration, Some(Duration::from_secs(20)));
        assert!(cli.demo.json);
        assert_eq!(cli.demo.rate, 40);
        assert_eq!(cli.demo.startup_timeout, Duration::from_secs(60));

        let cli = Cli::try_parse_from(["sinew", "--no-tour", "--act-duration", "3s"]).unwrap();
        assert!(cli.demo.no_tour);
        assert_eq!(cli.demo.act_duration, Duration::from_secs(3));
        let cli = Cli::try_parse_from(["sinew", "env"]).unwrap();
        assert!(matches!(cli.demo.command, Some(DemoCommand::Env)));
        // The demo's flags do not go with `env`.
        assert!(Cli::try_parse_from(["sinew", "--json", "env"]).is_err());

        #[derive(Parser)]
        struct AppCli {
            #[command(flatten)]
            app: app::AppArgs,
        }
        let cli = AppCli::try_parse_from([
            "sinew",
            "--service",
            "frontend",
            "--http",
            "127.0.0.1:0",
            "--call",
            "http://127.0.0.1:1",
            "--call",
            "http://127.0.0.1:2",
            "--error-rate",
            "0.5",
        ])
        .unwrap();
        assert_eq!(cli.app.version, "v1");
        assert_eq!(cli.app.calls.len(), 2);
        assert_eq!(cli.app.error_rate, 0.5);
        assert!(cli.app.grpc.is_none());
    }
}
