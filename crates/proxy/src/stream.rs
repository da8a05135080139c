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
use crate::state::{DrainState, Shared};

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

/// Copies both ways until both sides close, or until the drain deadline passes.
/// Runs as its own task, counted by the drain tracker.
pub fn spawn_splice<A, B>(shared: &Arc<Shared>, mut a: A, mut b: B)
where
    A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(guard) = shared.track() else {
        return;
    };
    let mut drain = shared.drain.clone();
    tokio::spawn(async move {
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut a, &mut b) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "stream ended with an error");
                }
            }
            _ = closing(&mut drain) => {}
        }
        drop(guard);
    });
}

/// Resolves when the drain state reaches `state` (or the sender is gone).
pub async fn reached(drain: &mut tokio::sync::watch::Receiver<DrainState>, state: DrainState) {
    let _ = drain
        .wait_for(|s| match state {
            DrainState::Running => true,
            DrainState::Draining => *s != DrainState::Running,
            DrainState::Closing => *s == DrainState::Closing,
        })
        .await
        .map(|_| ());
}

/// Resolves once the proxy is past its drain deadline.
pub async fn closing(drain: &mut tokio::sync::watch::Receiver<DrainState>) {
    reached(drain, DrainState::Closing).await
}
