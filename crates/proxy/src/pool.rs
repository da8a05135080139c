//! Connections to one address: pooled HTTP/1.1 connections, one shared HTTP/2
//! connection (multiplexed), dedicated connections for upgrades, and HTTP/2 CONNECT
//! tunnels to a peer sidecar.
//!
//! Pools outlive configuration snapshots: a reload that keeps an endpoint keeps its
//! connections, so a swap drops no connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::body::ReqBody;
use crate::error::{ProxyError, Reason};

/// How long an idle HTTP/1.1 connection is kept for reuse.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle HTTP/1.1 connections kept per address.
const MAX_IDLE: usize = 64;

/// A try that failed, and whether the request may have reached the endpoint.
pub struct SendError {
    /// What went wrong.
    pub error: ProxyError,
    /// Whether the endpoint may have seen the request.
    pub reached: Reached,
}

/// Whether a failed request may have reached the endpoint.
pub enum Reached {
    /// It may have: only a route's retry policy may send it again.
    Maybe,
    /// It never did (a refused or failed connect, a stream the peer refused or
    /// never processed because of its GOAWAY): another endpoint may take it, whatever
    /// the method. The request itself, when it came back whole.
    No(Option<Box<Request<ReqBody>>>),
}

impl SendError {
    fn unsent(error: ProxyError, req: Request<ReqBody>) -> SendError {
        SendError {
            error,
            reached: Reached::No(Some(Box::new(req))),
        }
    }

    /// A failure from the connection's HTTP layer: never reached when the peer
    /// refused the stream or had announced (GOAWAY) that it would not process it.
    fn from_http(addr: SocketAddr, source: hyper::Error) -> SendError {
        if source.is_user() && std::error::Error::source(&source).is_some() {
            // The request body failed (the client's malformed chunking, a client
            // that went away): the client's fault, not the endpoint's.
            return SendError {
                error: ProxyError::request_body(Box::new(source)),
                reached: Reached::Maybe,
            };
        }
        let reached = if never_processed(&source) {
            Reached::No(None)
        } else {
            Reached::Maybe
        };
        SendError {
            error: ProxyError::Upstream { addr, source },
            reached,
        }
    }

    /// True when the endpoint certainly did not see the request.
    pub fn never_reached(&self) -> bool {
        matches!(self.reached, Reached::No(_))
    }
}

impl From<SendError> for ProxyError {
    fn from(e: SendError) -> ProxyError {
        e.error
    }
}

impl std::fmt::Debug for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendError")
            .field("error", &self.error)
            .field("never_reached", &self.never_reached())
            .finish()
    }
}

/// True when an HTTP/2 stream failed because the peer refused it (`REFUSED_STREAM`)
/// or because its GOAWAY excluded it: RFC 9113 §8.7 guarantees such a stream was
/// not processed, so it is safe to send again anywhere.
fn never_processed(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.is_remote());
        }
        source = s.source();
    }
    false
}

/// Which HTTP version to speak to the address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.1, pooled.
    Http1,
    /// HTTP/2 prior knowledge, multiplexed over one connection.
    Http2,
}

/// Connections to one address.
pub struct ConnPool {
    addr: SocketAddr,
    connect_timeout: Duration,
    idle: Mutex<Vec<(Instant, http1::SendRequest<ReqBody>)>>,
    h2: Mutex<Option<http2::SendRequest<ReqBody>>>,
    tls: Option<MeshTls>,
    /// Connections open now, and the most allowed (0: no limit).
    open: Arc<Slots>,
    max_open: AtomicUsize,
    /// Requests waiting for a connection now, and the most allowed.
    pending: AtomicUsize,
    max_pending: AtomicUsize,
    /// How large a response head may be.
    limits: crate::types::HeadLimits,
}

/// Open connections, and a wake-up for a request waiting for one (a connection
/// parked idle, or one closed).
#[derive(Default)]
struct Slots {
    open: AtomicUsize,
    freed: tokio::sync::Notify,
}

/// Counts a connection as open until dropped (when its task ends).
struct OpenGuard(Arc<Slots>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.freed.notify_one();
    }
}

/// Counts a request as waiting for a connection until dropped.
struct PendingGuard<'a>(&'a AtomicUsize);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// mTLS toward a peer sidecar: our own certificate store, and a client config that
/// requires the peer's expected SPIFFE id.
struct MeshTls {
    certs: Arc<sinew_tls::CertStore>,
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for ConnPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnPool")
            .field("addr", &self.addr)
            .finish()
    }
}

impl ConnPool {
    /// An empty pool for `addr`.
    pub fn new(addr: SocketAddr, connect_timeout: Duration) -> ConnPool {
        ConnPool {
            addr,
            connect_timeout,
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            tls: None,
            open: Arc::new(Slots::default()),
            max_open: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            max_pending: AtomicUsize::new(0),
            limits: crate::types::HeadLimits::default(),
        }
    }

    /// This pool with these head limits (response headers accepted; request
    /// headers sent to a peer sidecar).
    pub fn with_limits(mut self, limits: crate::types::HeadLimits) -> ConnPool {
        self.limits = limits;
        self
    }

    /// Caps the connections this pool opens (`None`: no cap). A request that would
    /// need one more waits for one to free up if fewer than `pending` wait already
    /// (HTTP/1.1), else is refused at once (circuit breaker).
    pub fn set_max_connections(&self, max: Option<u32>, pending: u32) {
        self.max_open
            .store(max.map_or(0, |m| m as usize), Ordering::Relaxed);
        self.max_pending.store(pending as usize, Ordering::Relaxed);
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.open.open.load(Ordering::Relaxed)
    }

    /// Requests waiting for a connection now.
    pub fn pending_requests(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Takes a connection slot, or refuses when the cap is reached.
    fn open_slot(&self) -> Result<OpenGuard, ProxyError> {
        let max = self.max_open.load(Ordering::Relaxed);
        let before = self.open.open.fetch_add(1, Ordering::Relaxed);
        let guard = OpenGuard(self.open.clone());
        if max > 0 && before >= max {
            return Err(ProxyError::Overflow("maxConnectionsPerEndpoint"));
        }
        Ok(guard)
    }

    /// A pool toward a peer sidecar whose certificate must carry `expected`. TLS is
    /// used whenever this proxy holds a certificate.
    pub fn mesh(
        addr: SocketAddr,
        connect_timeout: Duration,
        certs: Arc<sinew_tls::CertStore>,
        expected: sinew_tls::SpiffeId,
    ) -> ConnPool {
        let mut pool = ConnPool::new(addr, connect_timeout);
        let config = certs.client_config(expected);
        pool.tls = Some(MeshTls { certs, config });
        pool
    }

    /// The address this pool connects to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Opens a TCP connection with the connect timeout.
    pub async fn connect(&self) -> Result<TcpStream, ProxyError> {
        let addr = self.addr;
        match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Err(_) => Err(ProxyError::ConnectTimeout(addr)),
            Ok(Err(source)) => Err(ProxyError::Connect { addr, source }),
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok(s)
            }
        }
    }

    /// Sends a request with the given version and returns the response head with a
    /// streaming body.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<ReqBody>,
        version: Version,
    ) -> Result<Response<Incoming>, SendError> {
        match version {
            Version::Http1 => self.send_h1(req).await,
            Version::Http2 => self.send_h2(req).await,
        }
    }

    fn take_idle(&self) -> Option<http1::SendRequest<ReqBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((at, tx)) = idle.pop() {
            if at.elapsed() < IDLE_TIMEOUT && tx.is_ready() {
                return Some(tx);
            }
        }
        None
    }

    fn put_idle(&self, tx: http1::SendRequest<ReqBody>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push((Instant::now(), tx));
            drop(idle);
            self.open.freed.notify_one();
        }
    }

    /// A connection for one request: a new one, or, when the pool is at its cap, a
    /// parked or new one as soon as one frees up, if the queue has room. Returns
    /// whether it is a reused one.
    async fn h1_or_wait(&self) -> Result<(http1::SendRequest<ReqBody>, bool), ProxyError> {
        match self.connect_h1().await {
            Err(ProxyError::Overflow(_)) if self.max_pending.load(Ordering::Relaxed) > 0 => {}
            r => return r.map(|tx| (tx, false)),
        }
        let max = self.max_pending.load(Ordering::Relaxed);
        if self.pending.fetch_add(1, Ordering::Relaxed) >= max {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            return Err(ProxyError::Overflow("maxPendingRequestsPerEndpoint"));
        }
        let _waiting = PendingGuard(&self.pending);
        loop {
            // Registered before looking, so a connection freed meanwhile wakes us.
            let freed = self.open.freed.notified();
            if let Some(tx) = self.take_idle() {
                return Ok((tx, true));
            }
            match self.connect_h1().await {
                Err(ProxyError::Overflow(_)) => freed.await,
                r => return r.map(|tx| (tx, false)),
            }
        }
    }

    async fn connect_h1(&self) -> Result<http1::SendRequest<ReqBody>, ProxyError> {
        let slot = self.open_slot()?;
        let io = TokioIo::new(self.connect().await?);
        let mut builder = http1::Builder::new();
        builder.max_buf_size(self.limits.response_header_bytes.max(8192));
        if self.limits.response_headers > crate::types::HYPER_MAX_HEADERS {
            // Only when raised: a count costs an allocation per response parsed.
            builder.max_headers(self.limits.response_headers);
        }
        let (tx, conn) = builder
            .handshake(io)
            .await
            .map_err(|source| ProxyError::Upstream {
                addr: self.addr,
                source,
            })?;
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(tx)
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, SendError> {
        // A pooled connection may have been closed by the server since it was parked;
        // when hyper hands the request back unsent, try once more on a new connection.
        let mut reused = true;
        let mut tx = match self.take_idle() {
            Some(tx) => tx,
            None => match Box::pin(self.h1_or_wait()).await {
                Ok((tx, was_idle)) => {
                    reused = was_idle;
                    tx
                }
                Err(e) => return Err(SendError::unsent(e, req)),
            },
        };
        loop {
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    let pool = self.clone();
                    // Park the connection once the response body is done with it.
                    tokio::spawn(async move {
                        if tx.ready().await.is_ok() {
                            pool.put_idle(tx);
                        }
                    });
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(back) if reused => {
                        req = back;
                        match Box::pin(self.h1_or_wait()).await {
                            Ok((next, was_idle)) => (tx, reused) = (next, was_idle),
                            Err(e) => return Err(SendError::unsent(e, req)),
                        }
                    }
                    Some(back) => {
                        return Err(SendError::unsent(
                            ProxyError::Upstream {
                                addr: self.addr,
                                source: e.into_error(),
                            },
                            back,
                        ));
                    }
                    None => return Err(SendError::from_http(self.addr, e.into_error())),
                },
            }
        }
    }

    async fn h2_sender(&self) -> Result<(http2::SendRequest<ReqBody>, bool), ProxyError> {
        if let Some(tx) = self.h2.lock().unwrap_or_else(|e| e.into_inner()).as_ref()
            && !tx.is_closed()
        {
            return Ok((tx.clone(), true));
        }
        // Connecting is the rare path: boxed so the per-request future stays small.
        Box::pin(self.connect_h2()).await
    }

    async fn connect_h2(&self) -> Result<(http2::SendRequest<ReqBody>, bool), ProxyError> {
        let slot = self.open_slot()?;
        let tcp = self.connect().await?;
        let tx = match &self.tls {
            Some(tls) if tls.certs.is_ready() => {
                let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
                let stream = tokio::time::timeout(
                    self.connect_timeout,
                    connector.connect(sinew_tls::CertStore::server_name(), tcp),
                )
                .await
                .map_err(|_| ProxyError::ConnectTimeout(self.addr))?
                .map_err(|e| ProxyError::tls(self.addr, e))?;
                if stream.get_ref().1.alpn_protocol() != Some(sinew_tls::MESH_ALPN) {
                    return Err(ProxyError::Tls {
                        addr: self.addr,
                        source: "the peer did not agree to the mesh protocol (ALPN)".into(),
                    });
                }
                self.h2_handshake(TokioIo::new(stream), slot).await?
            }
            _ => self.h2_handshake(TokioIo::new(tcp), slot).await?,
        };
        let mut slot = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        // Another request may have connected meanwhile; keep one connection.
        match slot.as_ref() {
            Some(existing) if !existing.is_closed() => Ok((existing.clone(), false)),
            _ => {
                *slot = Some(tx.clone());
                Ok((tx, false))
            }
        }
    }

    async fn h2_handshake<IO>(
        &self,
        io: IO,
        slot: OpenGuard,
    ) -> Result<http2::SendRequest<ReqBody>, ProxyError>
    where
        IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(
                (self.limits.response_header_bytes + crate::types::MESH_HEADER_ROOM) as u32,
            )
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(io)
            .await
            .map_err(|source| ProxyError::Upstream {
                addr: self.addr,
                source,
            })?;
        tokio::spawn(async move {
            // The connection's slot is held as long as it lives.
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
            }
        });
        Ok(tx)
    }

    async fn send_h2(&self, mut req: Request<ReqBody>) -> Result<Response<Incoming>, SendError> {
        let (mut tx, mut reused) = match self.h2_sender().await {
            Ok(x) => x,
            Err(e) => return Err(SendError::unsent(e, req)),
        };
        loop {
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(back) if reused => {
                        req = back;
                        self.forget_h2();
                        match self.h2_sender().await {
                            Ok((t, _)) => tx = t,
                            Err(e) => return Err(SendError::unsent(e, req)),
                        }
                        reused = false;
                    }
                    Some(back) => {
                        return Err(SendError::unsent(
                            ProxyError::Upstream {
                                addr: self.addr,
                                source: e.into_error(),
                            },
                            back,
                        ));
                    }
                    None => {
                        let e = SendError::from_http(self.addr, e.into_error());
                        if e.never_reached() {
                            // The peer is going away (GOAWAY): the next request
                            // opens a new connection rather than fail here too.
                            self.forget_h2();
                        }
                        return Err(e);
                    }
                },
            }
        }
    }

    /// Drops the shared HTTP/2 connection (requests on it finish; new ones open
    /// another). A connection another request opened meanwhile may go too: rare,
    /// and only costs a connect.
    fn forget_h2(&self) {
        *self.h2.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Opens an HTTP/2 CONNECT tunnel through the peer sidecar at this address to
    /// `target` (the application address behind it).
    pub async fn tunnel(&self, target: SocketAddr) -> Result<Upgraded, ProxyError> {
        let req = Request::connect(target.to_string())
            .body(ReqBody::Empty)
            .map_err(|_| ProxyError::Malformed("tunnel target"))?;
        let resp = self.send_h2(req).await.map_err(ProxyError::from)?;
        if !resp.status().is_success() {
            return Err(tunnel_refused(self.addr, &resp));
        }
        hyper::upgrade::on(resp)
            .await
            .map_err(|source| ProxyError::Upstream {
                addr: self.addr,
                source,
            })
    }
}

fn tunnel_refused(addr: SocketAddr, resp: &Response<Incoming>) -> ProxyError {
    let reason = resp
        .headers()
        .get(crate::error::SINEW_ERROR)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match reason {
        r if r == Reason::PortNotAllowed.as_str() => ProxyError::PortNotAllowed(0),
        _ => ProxyError::Connect {
            addr,
            source: std::io::Error::other(format!(
                "peer sidecar refused the tunnel: {} {reason}",
                resp.status()
            )),
        },
    }
}
