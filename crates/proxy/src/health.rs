//! Active health checks of endpoints without a sidecar: an HTTP GET of a path (2xx
//! or 3xx is healthy) or a TCP connect, every interval. An endpoint starts healthy
//! and is taken out after `unhealthy_threshold` failures in a row, put back after
//! `healthy_threshold` passes. Each checker holds a weak reference: it ends when the
//! endpoint leaves the configuration.

use std::sync::{Arc, Weak};
use std::time::Duration;

use http::Request;
use hyper_util::rt::TokioIo;
use sinew_model::compile::HealthCheckConfig;

use crate::balance::Endpoint;
use crate::body::ReqBody;

/// Starts checking `endpoint`; the task ends when the endpoint is dropped or the
/// returned handle is aborted.
pub fn spawn(endpoint: &Arc<Endpoint>, cfg: HealthCheckConfig) -> Option<tokio::task::AbortHandle> {
    let rt = tokio::runtime::Handle::try_current().ok()?;
    let weak: Weak<Endpoint> = Arc::downgrade(endpoint);
    Some(rt.spawn(run(weak, cfg)).abort_handle())
}

async fn run(weak: Weak<Endpoint>, cfg: HealthCheckConfig) {
    let interval = Duration::from_millis(cfg.interval_ms.max(10));
    let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
    let (mut passes, mut failures) = (0u32, 0u32);
    loop {
        let Some(ep) = weak.upgrade() else { return };
        let addr = ep.config.address;
        drop(ep);
        let ok = tokio::time::timeout(timeout, probe(addr, cfg.path.as_ref()))
            .await
            .unwrap_or(false);
        let Some(ep) = weak.upgrade() else { return };
        if ok {
            passes += 1;
            failures = 0;
            if !ep.is_healthy() && passes >= cfg.healthy_threshold {
                tracing::info!(endpoint = %addr, "endpoint healthy again");
                ep.set_healthy(true);
            }
        } else {
            failures += 1;
            passes = 0;
            if ep.is_healthy() && failures >= cfg.unhealthy_threshold {
                tracing::warn!(endpoint = %addr, "endpoint failed its health checks");
                ep.set_healthy(false);
            }
        }
        drop(ep);
        tokio::time::sleep(interval).await;
    }
}

/// `path` was parsed when the document was read: a request to it can always be
/// built.
async fn probe(addr: std::net::SocketAddr, path: Option<&http::uri::PathAndQuery>) -> bool {
    let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let Some(path) = path else { return true };
    let Ok((mut tx, conn)) =
        hyper::client::conn::http1::handshake::<_, ReqBody>(TokioIo::new(stream)).await
    else {
        return false;
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let Ok(req) = Request::get(http::Uri::from(path.clone()))
        .header(http::header::HOST, addr.to_string())
        .header(http::header::USER_AGENT, "sinew-health-check")
        .body(ReqBody::Empty)
    else {
        return false;
    };
    match tx.send_request(req).await {
        Ok(resp) => resp.status().is_success() || resp.status().is_redirection(),
        Err(_) => false,
    }
}
