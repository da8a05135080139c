//! The `sinew-proxy` binary: argument parsing, logging, signals. Logic lives in the
//! library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sinew_api::v1::Registration;
use sinew_model::duration::{flag_millis, flag_secs};
use sinew_proxy::control::ControlSettings;
use sinew_proxy::{Proxy, ProxyOptions};

/// Parses `key=value`.
fn parse_pair<T: std::str::FromStr>(s: &str) -> Result<(String, T), String>
where
    T::Err: std::fmt::Display,
{
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected key=value"))?;
    let v = v.parse().map_err(|e| format!("{s:?}: {e}"))?;
    Ok((k.to_owned(), v))
}

/// Sinew's data-plane proxy.
#[derive(Debug, Parser)]
#[command(
    name = "sinew-proxy",
    version,
    about,
    // One of the two modes, named together when neither is given.
    group(clap::ArgGroup::new("mode").required(true).args(["config", "control_plane"])),
    after_help = "Examples:\n  sinew-proxy --config proxy.yaml\n  sinew-proxy --control-plane https://127.0.0.1:15010 --name shop/web --join-token-file token"
)]
struct Args {
    /// Standalone mode: a file of Kubernetes-shaped documents (Proxy, Service,
    /// Workload, HTTPRoute), reloaded when it changes.
    #[arg(
        help_heading = "Standalone mode (--config FILE)",
        long,
        short = 'c',
        env = "SINEW_PROXY_CONFIG"
    )]
    config: Option<PathBuf>,
    /// Control-plane mode: the control plane's address, e.g. https://127.0.0.1:15010.
    #[arg(
        help_heading = "Control-plane mode (--control-plane URL --name NS/NAME)",
        long,
        env = "SINEW_CONTROL_PLANE",
        requires = "name"
    )]
    control_plane: Option<String>,
    /// This proxy's name (`namespace/name`); with a file, which Proxy document to use
    /// when it holds several.
    #[arg(
        help_heading = "Control-plane mode (--control-plane URL --name NS/NAME)",
        long,
        env = "SINEW_PROXY_NAME"
    )]
    name: Option<String>,
    /// Control-plane mode: register this proxy's workload as an instance of SERVICE.
    #[arg(
        help_heading = "Control-plane mode (--control-plane URL --name NS/NAME)",
        long,
        requires = "control_plane"
    )]
    service: Option<String>,
    /// The workload's address.
    #[arg(
        help_heading = "Control-plane mode (--control-plane URL --name NS/NAME)",
        long,
        default_value = "127.0.0.1",
        requires = "service"
    )]
    address: String,
    /// A workload port, `name=number` (repeatable), e.g. `http=8080`.
    #[arg(help_heading = "Control-plane mode (--control-plane URL --name NS/NAME)", long = "port", value_parser = parse_pair::<u16>, requires = "service")]
    ports: Vec<(String, u16)>,
    /// A workload label, `key=value` (repeatable), e.g. `version=v2`.
    #[arg(help_heading = "Control-plane mode (--control-plane URL --name NS/NAME)", long = "label", value_parser = parse_pair::<String>, requires = "service")]
    labels: Vec<(String, String)>,
    /// The workload's service account: its identity (default: the service's name).
    #[arg(
        help_heading = "Control-plane mode (--control-plane URL --name NS/NAME)",
        long,
        requires = "service"
    )]
    service_account: Option<String>,
    /// The sidecar's inbound listener; mesh traffic to the workload arrives here.
    #[arg(
        help_heading = "Control-plane mode (--control-plane URL --name NS/NAME)",
        long,
        requires = "service"
    )]
    inbound: Option<SocketAddr>,
    /// Control-plane mode: the join token proving this proxy's identity (from `sinew
    /// token create`); with it the proxy gets a certificate and speaks mTLS.
    #[arg(
        help_heading = "Control-plane mode (--control-plane URL --name NS/NAME)",
        long,
        env = "SINEW_JOIN_TOKEN",
        hide_env_values = true,
        requires = "control_plane",
        conflicts_with = "join_token_file"
    )]
    join_token: Option<String>,
    /// A file holding the join token (kept out of the process list); read again before
    /// every certificate request, so a rotated token (e.g. a Kubernetes projected
    /// service-account token) is picked up.
    #[arg(
        help_heading = "Control-plane mode (--control-plane URL --name NS/NAME)",
        long,
        requires = "control_plane"
    )]
    join_token_file: Option<PathBuf>,
    /// Control-plane mode: roots (PEM) that verify the control plane at bootstrap.
    /// Needed with a token that carries no root hash (a Kubernetes service-account
    /// token: mount the `sinew-root` ConfigMap); a join token carries one.
    #[arg(
        help_heading = "Control-plane mode (--control-plane URL --name NS/NAME)",
        long,
        env = "SINEW_CONTROL_PLANE_CA",
        requires = "control_plane"
    )]
    control_plane_ca: Option<PathBuf>,
    /// Control-plane mode: keep the key, certificate and roots here (owner-only), so a
    /// restart goes on with the identity instead of spending another join token.
    #[arg(
        help_heading = "Control-plane mode (--control-plane URL --name NS/NAME)",
        long,
        env = "SINEW_IDENTITY_DIR",
        requires = "control_plane"
    )]
    identity_dir: Option<PathBuf>,
    /// Control-plane mode: how often traffic stats are reported to the control plane
    /// (for `sinew stat/top/edges`; sent only after traffic), e.g. 2s; 0 turns them
    /// off.
    #[arg(
        help_heading = "Control-plane mode (--control-plane URL --name NS/NAME)",
        long,
        value_name = "DURATION",
        default_value = "2s",
        value_parser = flag_secs,
        requires = "control_plane"
    )]
    stats_interval: Duration,
    /// The old spelling of --stats-interval, in milliseconds.
    #[arg(long, hide = true, value_parser = flag_millis, requires = "control_plane", conflicts_with = "stats_interval")]
    stats_interval_ms: Option<Duration>,
    /// Control-plane mode: this host's traffic is captured (`sinew init` rules): the
    /// proxy listens for it and gets every service. A stored Proxy document's own
    /// `spec.capture` takes precedence.
    #[arg(
        help_heading = "Transparent capture (control-plane mode, after `sinew init`)",
        long,
        requires = "control_plane"
    )]
    capture: bool,
    /// Where `sinew init` redirects outbound TCP.
    #[arg(
        help_heading = "Transparent capture (control-plane mode, after `sinew init`)",
        long,
        default_value_t = 15001,
        requires = "capture"
    )]
    capture_outbound_port: u16,
    /// Where `sinew init` redirects inbound TCP.
    #[arg(
        help_heading = "Transparent capture (control-plane mode, after `sinew init`)",
        long,
        default_value_t = 15006,
        requires = "capture"
    )]
    capture_inbound_port: u16,
    /// Where `sinew init --dns-port` redirects DNS; default no DNS responder.
    #[arg(
        help_heading = "Transparent capture (control-plane mode, after `sinew init`)",
        long,
        requires = "capture"
    )]
    capture_dns_port: Option<u16>,
    /// Destination ports never inspected (server-speaks-first protocols), e.g. 3306.
    #[arg(
        help_heading = "Transparent capture (control-plane mode, after `sinew init`)",
        long,
        value_delimiter = ',',
        requires = "capture"
    )]
    opaque_ports: Vec<u16>,
    /// How long protocol detection waits for a client's first bytes, e.g. 100ms.
    #[arg(
        help_heading = "Transparent capture (control-plane mode, after `sinew init`)",
        long,
        value_name = "DURATION",
        value_parser = flag_secs,
        requires = "capture"
    )]
    detect_timeout: Option<Duration>,
    /// Admin listener (/live, /ready, /metrics, /config).
    #[arg(
        help_heading = "Every mode",
        long,
        default_value = "127.0.0.1:4191",
        env = "SINEW_PROXY_ADMIN"
    )]
    admin: SocketAddr,
    /// Data-plane worker threads (default: one per core).
    #[arg(help_heading = "Every mode", long)]
    workers: Option<usize>,
    /// How long in-flight work may take to finish after SIGTERM, e.g. 30s.
    #[arg(help_heading = "Every mode", long, value_name = "DURATION", default_value = "30s", value_parser = flag_secs)]
    drain_timeout: Duration,
    /// How often the configuration file is checked for changes, e.g. 1s.
    #[arg(
        help_heading = "Standalone mode (--config FILE)",
        long,
        value_name = "DURATION",
        default_value = "1s",
        value_parser = flag_secs
    )]
    reload_interval: Duration,
    /// The old spelling of --reload-interval, in milliseconds.
    #[arg(long, hide = true, value_parser = flag_millis, conflicts_with = "reload_interval")]
    reload_interval_ms: Option<Duration>,
    /// How long connecting to an endpoint may take, e.g. 5s.
    #[arg(help_heading = "Every mode", long, value_name = "DURATION", default_value = "5s", value_parser = flag_secs)]
    connect_timeout: Duration,
    /// The old spelling of --connect-timeout, in milliseconds.
    #[arg(long, hide = true, value_parser = flag_millis, conflicts_with = "connect_timeout")]
    connect_timeout_ms: Option<Duration>,
    /// Most bytes of request headers, in KiB (names, values and 32 bytes each, as
    /// HTTP/2 counts them); a larger request is answered 431 where it arrives.
    #[arg(help_heading = "Every mode", long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=8192))]
    max_request_headers_kb: u32,
    /// Most request headers; more is answered 431 where it arrives.
    #[arg(help_heading = "Every mode", long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10000))]
    max_request_headers: u32,
    /// Most response headers accepted from an upstream (more: 502). Above 100 each
    /// response costs a little more to parse.
    #[arg(help_heading = "Every mode", long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10000))]
    max_response_headers: u32,
    /// Connections each listener holds open at once (then it stops accepting until
    /// one closes).
    #[arg(help_heading = "Every mode", long, default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Validate the configuration, print a summary, and exit (non-zero if invalid).
    #[arg(help_heading = "Standalone mode (--config FILE)", long)]
    check: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    if args.check {
        return check(&args);
    }

    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all().thread_name("sinew-worker");
    if let Some(n) = args.workers {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.build().context("cannot start the runtime")?;
    rt.block_on(async move {
        let mut opts = match (args.config.clone(), args.control_plane.clone()) {
            (Some(path), _) => ProxyOptions::new(path),
            (None, Some(url)) => ProxyOptions::control_plane(control_settings(&args, url)?),
            (None, None) => anyhow::bail!("give --config FILE or --control-plane URL"),
        };
        opts.name = args.name;
        opts.admin = args.admin;
        opts.drain_timeout = args.drain_timeout;
        opts.reload_interval = args
            .reload_interval_ms
            .unwrap_or(args.reload_interval)
            .max(Duration::from_millis(10));
        opts.connect_timeout = args
            .connect_timeout_ms
            .unwrap_or(args.connect_timeout)
            .max(Duration::from_millis(1));
        opts.limits = sinew_proxy::types::HeadLimits {
            request_header_bytes: args.max_request_headers_kb as usize * 1024,
            request_headers: args.max_request_headers as usize,
            response_headers: args.max_response_headers as usize,
            ..Default::default()
        };
        opts.max_connections = args.max_connections as usize;
        let proxy = Proxy::start(opts)?;
        wait_for_termination(&proxy).await?;
        let outcome = proxy.shutdown().await;
        if !outcome.clean {
            tracing::warn!("some connections were closed at the drain deadline");
        }
        anyhow::Ok(())
    })
}

/// `--check`: compiles the file as the proxy would and says what it holds, or why not
/// (exit 1).
fn check(args: &Args) -> anyhow::Result<()> {
    let Some(config) = &args.config else {
        anyhow::bail!("--check needs --config FILE");
    };
    let label = config.display().to_string();
    let text = std::fs::read_to_string(config).with_context(|| format!("{label}: cannot read"))?;
    // The control plane's limit: a file it would refuse does not pass the check.
    if let Some(why) = sinew_api::limits::too_large(&label, &text) {
        eprintln!("{why}");
        std::process::exit(1);
    }
    match sinew_model::compile::compile_text(&label, &text, args.name.as_deref()) {
        Ok(cfg) => {
            println!(
                "{label}: ok: proxy {}/{}, {} services, {} upstream bindings",
                cfg.namespace,
                cfg.name,
                cfg.services.len(),
                cfg.upstreams.len()
            );
            Ok(())
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}

/// The control-plane settings the flags give (`--control-plane URL`).
fn control_settings(args: &Args, url: String) -> anyhow::Result<ControlSettings> {
    let name = args.name.clone().unwrap_or_default();
    let proxy = if name.contains('/') {
        name
    } else {
        format!("default/{name}")
    };
    let mut settings = ControlSettings::new(url, proxy);
    settings.stats_interval = args.stats_interval_ms.unwrap_or(args.stats_interval);
    if args.capture {
        settings.capture = Some(sinew_model::resource::CaptureSpec {
            outbound_port: args.capture_outbound_port,
            inbound_port: args.capture_inbound_port,
            opaque_ports: args.opaque_ports.clone(),
            detect_timeout: args
                .detect_timeout
                .map(|d| sinew_model::resource::Parsed::new(resource_duration(d)))
                .transpose()
                .map_err(|e| anyhow::anyhow!("--detect-timeout: {e}"))?,
            dns_port: args.capture_dns_port,
        });
    }
    settings.join_token = match (&args.join_token, &args.join_token_file) {
        (Some(t), _) => Some(t.trim().to_owned()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("{}: cannot read the join token", f.display()))?
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    };
    settings.join_token_file = args.join_token_file.clone();
    settings.control_plane_ca = args.control_plane_ca.clone();
    settings.identity_dir = args.identity_dir.clone();
    settings.registration = args.service.clone().map(|service| Registration {
        service,
        address: args.address.clone(),
        ports: args
            .ports
            .iter()
            .map(|(k, v)| (k.clone(), u32::from(*v)))
            .collect(),
        labels: args.labels.iter().cloned().collect(),
        sidecar_port: args.inbound.map_or(0, |a| u32::from(a.port())),
        service_account: args.service_account.clone().unwrap_or_default(),
    });
    Ok(settings)
}

/// A flag's duration as a resource spells it (`CaptureSpec.detectTimeout`, at most
/// five digits a part): whole seconds as `Ns`, else milliseconds, else both.
fn resource_duration(d: Duration) -> String {
    let (secs, millis) = (d.as_secs(), d.subsec_millis());
    match d.as_millis() {
        _ if millis == 0 && secs > 0 => format!("{secs}s"),
        ms @ 0..=99_999 => format!("{ms}ms"),
        _ => format!("{secs}s{millis}ms"),
    }
}

async fn wait_for_termination(proxy: &Proxy) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    // `POST /shutdown` on the admin API (loopback only): a Job's last step.
    let drain = &proxy.shared().drain;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = drain.shutdown_requested() => {
                tracing::info!("shutdown asked through the admin API");
                return Ok(());
            }
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading configuration");
                proxy.reload();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_durations_are_spelled_as_resources_take_them() {
        for (flag, want) in [
            ("100ms", "100ms"),
            ("2s", "2s"),
            ("1500ms", "1500ms"),
            ("100s500ms", "100s500ms"),
        ] {
            let d = flag_secs(flag).unwrap_or_default();
            let spelled = resource_duration(d);
            assert_eq!(spelled, want);
            assert_eq!(sinew_model::duration::parse(&spelled), Ok(d));
        }
    }
}
