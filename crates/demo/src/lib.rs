//! The Sinew demo: a sample workload (`sinew demo-app`, see [`app`]) and a one-command
//! demo mesh (`sinew demo`, see [`run`]).
//!
//! `sinew demo` starts the control plane, five service instances (each a `demo-app`
//! behind its own `sinew-proxy`) and a load generator's sidecar, all on loopback:
//!
//! ```text
//! load generator ─► loadgen sidecar ─► frontend ─┬─► catalog ─┬─ 90% ─► catalog-v1
//!                   (entry point)                │            └─ 10% ─► catalog-v2
//!                                                └─► reviews ───► ratings
//! ```
//!
//! It applies the Services, Proxies and the catalog `HTTPRoute` through the Admin API,
//! waits until every sidecar is in sync and the entry point answers, then sends steady
//! load and prints a per-service table (rate, success rate, p50/p99) every 2 s,
//! computed from each app's `/stats`. At the end it prints a summary and `demo: ok` when
//! the entry point's success rate was at least 99% and every service saw traffic.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod app;
mod client;
mod frame;
mod load;
mod mesh;
mod process;
mod report;
mod signal;
pub mod stats;
mod topology;
mod tui;

/// `sinew demo`: run the demo mesh on loopback.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// How long to send load once the mesh is up (e.g. `30s`, `2m`, `1m30s`); without
    /// it the demo runs until Ctrl-C or SIGTERM.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Print what runs where as one JSON object on the first line of standard output.
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
}

/// Runs the demo mesh until `--duration` ends, or Ctrl-C or SIGTERM; then stops every
/// process it started and removes its temporary directory. Fails (after printing why)
/// when the mesh does not come up, a process dies, or the run was not healthy.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    mesh::run(args).await
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
        assert_eq!(cli.demo.duration, Some(Duration::from_secs(20)));
        assert!(cli.demo.json);
        assert_eq!(cli.demo.rate, 40);
        assert_eq!(cli.demo.startup_timeout, Duration::from_secs(60));

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
