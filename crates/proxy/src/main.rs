//! The `sinew-proxy` binary: argument parsing, logging, signals. Logic lives in the
//! library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sinew_proxy::{Proxy, ProxyOptions};

/// Sinew's data-plane proxy.
#[derive(Debug, Parser)]
#[command(name = "sinew-proxy", version, about)]
struct Args {
    /// Configuration file of Kubernetes-shaped documents (Proxy, Service, Workload,
    /// HTTPRoute); reloaded when it changes.
    #[arg(long, short = 'c', env = "SINEW_PROXY_CONFIG")]
    config: PathBuf,
    /// Which Proxy document to use (`name` or `namespace/name`), when the file has several.
    #[arg(long, env = "SINEW_PROXY_NAME")]
    name: Option<String>,
    /// Admin listener (/live, /ready, /metrics, /config).
    #[arg(long, default_value = "127.0.0.1:4191", env = "SINEW_PROXY_ADMIN")]
    admin: SocketAddr,
    /// Data-plane worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Seconds in-flight work may take to finish after SIGTERM.
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
    /// Milliseconds between checks of the configuration file.
    #[arg(long, default_value_t = 1000)]
    reload_interval_ms: u64,
    /// Milliseconds allowed to connect to an endpoint.
    #[arg(long, default_value_t = 5000)]
    connect_timeout_ms: u64,
    /// Validate the configuration, print a summary, and exit (non-zero if invalid).
    #[arg(long)]
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
        let label = args.config.display().to_string();
        let text = std::fs::read_to_string(&args.config)
            .with_context(|| format!("{label}: cannot read"))?;
        match sinew_model::compile::compile_text(&label, &text, args.name.as_deref()) {
            Ok(cfg) => {
                println!(
                    "{label}: ok: proxy {}/{}, {} services, {} upstream bindings",
                    cfg.namespace,
                    cfg.name,
                    cfg.services.len(),
                    cfg.upstreams.len()
                );
                return Ok(());
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
    }

    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all().thread_name("sinew-worker");
    if let Some(n) = args.workers {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.build().context("cannot start the runtime")?;
    rt.block_on(async move {
        let mut opts = ProxyOptions::new(args.config);
        opts.name = args.name;
        opts.admin = args.admin;
        opts.drain_timeout = Duration::from_secs(args.drain_timeout);
        opts.reload_interval = Duration::from_millis(args.reload_interval_ms.max(10));
        opts.connect_timeout = Duration::from_millis(args.connect_timeout_ms.max(1));
        let proxy = Proxy::start(opts)?;
        wait_for_termination(&proxy).await?;
        let outcome = proxy.shutdown().await;
        if !outcome.clean {
            tracing::warn!("some connections were closed at the drain deadline");
        }
        anyhow::Ok(())
    })
}

async fn wait_for_termination(proxy: &Proxy) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading configuration");
                proxy.reload();
            }
        }
    }
}
