//! Byte streams to endpoints: a direct TCP connection, or an HTTP/2 CONNECT tunnel
//! through the peer sidecar; and the copy loop that joins two streams.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::balance::Endpoint;
use crate::error::ProxyError;
use crate::state::Shared;

/// A stream to an endpoint.
#[derive(Debug)]
pub enum UpstreamIo {
    /// Straight to the application.
    Tcp(TcpStream),
    /// Through the peer sidecar.
    Tunnel(TokioIo<Upgraded>),
}

impl UpstreamIo {
    /// Opens a stream to `endpoint`: a tunnel when it has a sidecar, else TCP.
    pub async fn open(endpoint: &Arc<Endpoint>) -> Result<UpstreamIo, ProxyError> {
        let inflight = endpoint.start();
        let result = match endpoint.config.sidecar {
            Some(_) => endpoint
                .pool
                .tunnel(endpoint.config.address)
                .await
                .map(|u| UpstreamIo::Tunnel(TokioIo::new(u))),
            None => endpoint.pool.connect().await.map(UpstreamIo::Tcp),
        };
        match &result {
            Ok(_) => inflight.success(),
            Err(_) => inflight.failure(),
        }
        result
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tunnel(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tunnel(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tunnel(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tunnel(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// After a `101` from upstream: once the client's side (`downstream`) and the
/// upstream's side of `resp` have both switched protocol, relays bytes between them.
/// A task of its own, since the `101` must reach the client before its side
/// completes. `what` names the upgrade in the log when one side never completes.
pub fn splice_upgrades(
    shared: &Arc<Shared>,
    downstream: hyper::upgrade::OnUpgrade,
    resp: &mut http::Response<hyper::body::Incoming>,
    what: &'static str,
) {
    let upstream = hyper::upgrade::on(resp);
    let shared = shared.clone();
    tokio::spawn(async move {
        match tokio::try_join!(downstream, upstream) {
            Ok((d, u)) => spawn_splice(&shared, TokioIo::new(d), TokioIo::new(u)),
            Err(e) => tracing::debug!(error = %e, "{what} did not complete"),
        }
    });
}

/// Sends an HTTP/1.1 upgrade request over `io` (a connection of its own: pooled
/// connections never change protocol) and returns the answer; after a `101` its
/// upgraded stream comes from `hyper::upgrade::on`. `addr` names the peer in errors.
pub async fn http1_upgrade<IO>(
    io: IO,
    addr: std::net::SocketAddr,
    req: http::Request<crate::body::ReqBody>,
) -> Result<http::Response<hyper::body::Incoming>, ProxyError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut tx, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|source| ProxyError::Upstream { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upgrade connection ended");
        }
    });
    tx.send_request(req)
        .await
        .map_err(|source| ProxyError::Upstream { addr, source })
}

/// Counts the bytes read from and written to the downstream side of a splice, as
/// they pass (a long-lived stream shows up while it lasts, not when it ends).
struct Counted<T> {
    io: T,
    read: prometheus_client::metrics::counter::Counter,
    written: prometheus_client::metrics::counter::Counter,
    /// When a byte last passed, for the idle timeout.
    active: Arc<Active>,
}

/// When a splice last moved a byte (milliseconds from its start).
struct Active {
    born: tokio::time::Instant,
    last: std::sync::atomic::AtomicU64,
}

impl Active {
    fn touch(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.last.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Resolves once no byte has passed for `timeout`.
    async fn idle(&self, timeout: std::time::Duration) {
        loop {
            let last = self.last.load(std::sync::atomic::Ordering::Relaxed);
            let due = self.born + std::time::Duration::from_millis(last) + timeout;
            if tokio::time::Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            self.read.inc_by(n as u64);
            self.active.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &r {
            self.written.inc_by(*n as u64);
            self.active.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Copies both ways until both sides close, no byte has passed either way for the
/// TCP idle timeout, or the drain deadline passes. Runs as its own task, counted by
/// the drain tracker. `a` is the downstream side.
pub fn spawn_splice<A, B>(shared: &Arc<Shared>, a: A, mut b: B)
where
    A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Draining: a relay is new work, refused like a new connection.
    let Some(guard) = shared.drain.guard() else {
        return;
    };
    let active = Arc::new(Active {
        born: tokio::time::Instant::now(),
        last: Default::default(),
    });
    let mut a = Counted {
        io: a,
        read: shared.metrics.bytes_in.clone(),
        written: shared.metrics.bytes_out.clone(),
        active: active.clone(),
    };
    let drain = shared.drain.clone();
    let idle_timeout = shared.settings.tcp_idle_timeout;
    tokio::spawn(async move {
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut a, &mut b) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "stream ended with an error");
                }
            }
            _ = active.idle(idle_timeout) => {
                tracing::debug!(?idle_timeout, "stream closed: idle");
            }
            _ = drain.closing() => {}
        }
        drop(guard);
    });
}
