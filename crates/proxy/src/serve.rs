//! Serving one accepted connection: mesh mTLS termination ([`mesh_tls`]), HTTP/1 or
//! HTTP/2 read ahead from the first bytes ([`http_version`]) and served with the
//! request handler of the connection's direction ([`serve_http`]).
//!
//! Every listener kind's accept loop (see [`crate::listeners`]) hands its
//! connections here, so no listener calls into another.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::server::conn::http1::UpgradeableConnection as Http1Conn;
use hyper::server::conn::http2::Connection as Http2Conn;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::types::{ConnCtx, Role};
use crate::{inbound, outbound};

type HandlerFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<http::Response<crate::body::RespBody>, Infallible>>
            + Send,
    >,
>;

/// Terminates mesh mTLS (the mesh ALPN is required) and serves the peer sidecar's
/// HTTP/2 with its verified identity.
pub(crate) async fn mesh_tls(ctx: Arc<ConnCtx>, stream: TcpStream) {
    let shared = ctx.shared.clone();
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(shared.tls_server.clone());
        let tls = match tokio::time::timeout(
            shared.settings.header_read_timeout,
            acceptor.accept(stream),
        )
        .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                shared.metrics.error(
                    crate::types::Direction::Inbound,
                    crate::error::Reason::TlsFailed,
                );
                tracing::debug!(peer = %ctx.peer, error = %e, "inbound TLS handshake failed");
                return;
            }
            Err(_) => return,
        };
        if tls.get_ref().1.alpn_protocol() != Some(sinew_tls::MESH_ALPN) {
            shared.metrics.error(
                crate::types::Direction::Inbound,
                crate::error::Reason::NotMeshTls,
            );
            return;
        }
        // The peer must be of this mesh's trust domain (the configuration's; before
        // one is applied, the proxy's own certificate's), not just chain to a root.
        let mesh_td = shared
            .snapshot
            .load()
            .as_ref()
            .map(|s| s.config.trust_domain.clone())
            .or_else(|| shared.certs.identity().map(|i| i.trust_domain().to_owned()));
        let peer = sinew_tls::peer_identity(tls.get_ref().1.peer_certificates());
        let peer_identity = match crate::policy::admit_peer(peer, mesh_td.as_deref()) {
            Ok(id) => id.map(|id| Arc::<str>::from(id.to_string())),
            Err(e) => {
                shared.metrics.error(
                    crate::types::Direction::Inbound,
                    crate::error::Reason::ForeignTrustDomain,
                );
                tracing::info!(peer = %ctx.peer, error = %e, "inbound mTLS peer refused");
                return;
            }
        };
        let ctx = Arc::new(ConnCtx {
            peer_identity,
            orig_dst: ctx.orig_dst,
            ..ConnCtx::new(ctx.shared.clone(), ctx.role, ctx.bind, ctx.peer)
        });
        serve_http(ctx, tls).await;
    }
}

pub(crate) async fn serve_http<IO>(ctx: Arc<ConnCtx>, stream: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let shared = ctx.shared.clone();
    let role = ctx.role;
    let mut stream = stream;
    let Some((prefix, h2)) = http_version(&mut stream, shared.settings.header_read_timeout).await
    else {
        return;
    };
    // HTTP/2 connections are closed (gracefully) once idle; HTTP/1.1 ones by hyper's
    // header-read timer, which also runs between requests.
    let activity = h2.then(|| Arc::new(Activity::new()));
    let seen = activity.clone();
    // hyper keeps a slot the size of this future for the connection's whole life;
    // boxing it per request keeps idle keep-alive connections small (one allocation
    // per request instead of ~5 KB per idle connection).
    let svc = service_fn(move |req| -> HandlerFuture {
        let ctx = ctx.clone();
        let busy = seen.as_ref().map(|a| a.start());
        match role {
            Role::Inbound | Role::InboundCapture => Box::pin(async move {
                let _busy = busy;
                Ok(inbound::handle(ctx, req).await)
            }),
            Role::Upstream | Role::HttpProxy | Role::OutboundCapture => Box::pin(async move {
                let _busy = busy;
                Ok(outbound::handle(ctx, req).await)
            }),
        }
    });
    let io = TokioIo::new(Prefixed::new(prefix, stream));
    let drain = &shared.drain;
    if let Some(activity) = activity {
        // Boxed: HTTP/2 connections are the few, and an HTTP/1.1 connection's task
        // would otherwise hold room for one for its whole life.
        let conn = shared.http2.serve_connection(io, svc);
        let idle = activity.idle(shared.settings.idle_timeout);
        Box::pin(drain.serve_http(conn, Http2Conn::graceful_shutdown, idle)).await;
    } else {
        let conn = shared.http1.serve_connection(io, svc).with_upgrades();
        drain
            .serve_http(conn, Http1Conn::graceful_shutdown, std::future::pending())
            .await;
    }
}

/// Requests of one HTTP/2 connection: how many are being handled, and when the
/// last one started.
struct Activity {
    busy: std::sync::atomic::AtomicUsize,
    born: tokio::time::Instant,
    /// Milliseconds from `born` to the last request's start.
    last: std::sync::atomic::AtomicU64,
}

/// A request being handled (until its response head): the connection is busy.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    fn new() -> Activity {
        Activity {
            busy: Default::default(),
            born: tokio::time::Instant::now(),
            last: Default::default(),
        }
    }

    fn start(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        let ms = self.born.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// Resolves once no request has started for `timeout` and none is being
    /// handled. (A response still streaming its body then finishes: the close is
    /// graceful.)
    async fn idle(self: Arc<Self>, timeout: Duration) {
        loop {
            let last = self.born + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let due = last + timeout;
            if tokio::time::Instant::now() >= due && self.busy.load(Ordering::Relaxed) == 0 {
                return;
            }
            tokio::time::sleep_until(due.max(tokio::time::Instant::now() + timeout / 8)).await;
        }
    }
}

/// The HTTP/2 connection preface (RFC 9113, section 3.4).
pub(crate) const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads the client's first bytes, up to the HTTP/2 preface's length or until they
/// cannot be it, within `timeout`: the bytes read, and whether it is HTTP/2 (prior
/// knowledge). `None` when the client closed, failed or said nothing in time.
pub(crate) async fn http_version<IO>(stream: &mut IO, timeout: Duration) -> Option<(Prefix, bool)>
where
    IO: tokio::io::AsyncRead + Unpin,
{
    let mut prefix = Prefix::default();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let read = stream.read(&mut prefix.buf[prefix.end..]);
        match tokio::time::timeout_at(deadline, read).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) if prefix.end == 0 => return None,
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => prefix.end += n,
        }
        let got = &prefix.buf[..prefix.end];
        if prefix.end == H2_PREFACE.len() || !H2_PREFACE.starts_with(got) {
            break;
        }
    }
    let h2 = prefix.buf[..prefix.end] == H2_PREFACE[..];
    Some((prefix, h2))
}

/// Bytes read ahead of hyper.
#[derive(Debug, Default)]
pub(crate) struct Prefix {
    pub(crate) buf: [u8; 24],
    start: usize,
    pub(crate) end: usize,
}

/// A stream whose first bytes were read ahead (`Prefix`) and are read again first.
///
/// The first read returns them **and** whatever follows that is ready, in one call:
/// hyper asks for a whole 8 KiB of room on every read of a request head, so a head
/// arriving in two reads (the prefix, then the rest) would grow its buffer to 16 KiB
/// for the connection's life. In one read it stays 8 KiB.
pub(crate) struct Prefixed<IO> {
    prefix: Prefix,
    inner: IO,
}

impl<IO> Prefixed<IO> {
    pub(crate) fn new(prefix: Prefix, inner: IO) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<IO> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let p = &mut this.prefix;
        if p.start == p.end {
            return std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let n = (p.end - p.start).min(buf.remaining());
        buf.put_slice(&p.buf[p.start..p.start + n]);
        p.start += n;
        if p.start == p.end && buf.remaining() > 0 {
            // What is ready behind the prefix, in the same read. Not ready, or an
            // error, is for the next read to find: this one already has bytes.
            let _ = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        std::task::Poll::Ready(Ok(()))
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefixed<IO> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
