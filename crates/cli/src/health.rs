//! `sinew control --health-listen`: plain-HTTP `/live` and `/ready` for the kubelet's
//! probes (the gRPC port needs mTLS, so an HTTP probe cannot use it).
//!
//! - `GET /live`: 200 while the process serves.
//! - `GET /ready`: 200 once the control plane serves with its CA (and, with
//!   `--kubernetes`, once its Kubernetes source has listed the cluster and synced);
//!   503 before, and while stopping, so the Service sends proxies only to a replica
//!   that knows the mesh, and stops sending them to one on its way out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The running health listener.
pub struct Health {
    ready: Arc<AtomicBool>,
}

impl Health {
    /// Binds `addr` and serves (not ready yet).
    pub async fn start(addr: SocketAddr) -> anyhow::Result<Health> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("--health-listen {addr}: cannot listen"))?;
        let addr = listener
            .local_addr()
            .context("--health-listen: no local address")?;
        let ready = Arc::new(AtomicBool::new(false));
        let flag = ready.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let flag = flag.clone();
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), answer(stream, &flag)).await;
                });
            }
        });
        tracing::info!(%addr, "health listening (/live, /ready)");
        Ok(Health { ready })
    }

    /// Marks the control plane ready (or not).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The readiness flag itself, for what decides it (the Kubernetes source sets it
    /// after its first sync).
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.ready.clone()
    }
}

async fn answer(mut stream: tokio::net::TcpStream, ready: &AtomicBool) -> std::io::Result<()> {
    // The request head only (a probe sends no body); at most 4 KiB of it.
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 4096 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = match (method, path) {
        ("GET" | "HEAD", "/live") => ("200 OK", "live\n"),
        ("GET" | "HEAD", "/ready") if ready.load(Ordering::Relaxed) => ("200 OK", "ready\n"),
        ("GET" | "HEAD", "/ready") => ("503 Service Unavailable", "not ready\n"),
        ("GET" | "HEAD", _) => ("404 Not Found", "not found: try /live or /ready\n"),
        _ => ("405 Method Not Allowed", "use GET\n"),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
        body.len(),
        if method == "HEAD" { "" } else { body }
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
