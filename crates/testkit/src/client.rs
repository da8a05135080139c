//! Small hyper clients for driving servers (or the proxy) in tests.
//!
//! - [`h1`]: one keep-alive HTTP/1.1 connection (upgrades enabled).
//! - [`h2`]: one h2c (prior knowledge) connection with a cloneable sender.
//! - [`get`]: one-shot HTTP/1.1 GET, collected.
//! - [`collect`]: read a whole response, trailers included, into
//!   [`Collected`].
//!
//! Request bodies may be any `http_body::Body<Data = Bytes>`; [`full`],
//! [`empty`] and [`body_channel`] build the common ones.

use std::net::SocketAddr;

use bytes::Bytes;
use http::header::HOST;
use http::uri::{Authority, Scheme};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::{BoxBody as Boxed, UnsyncBoxBody};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::BoxError;

/// A boxed request body.
pub type BoxBody = Boxed<Bytes, BoxError>;

/// The sending half of [`body_channel`]: send data frames (or trailers, or an
/// error to abort the body); drop it to end the body.
pub type BodySender = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

/// Body type the connections are driven with.
type SendBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body holding `bytes` (sent with a `content-length`).
pub fn full(bytes: impl Into<Bytes>) -> BoxBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
#[must_use]
pub fn empty() -> BoxBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A streaming body fed through a channel of `buffer` frames.
///
/// The body has no known length (chunked over HTTP/1.1). It ends when the
/// sender is dropped.
#[must_use]
pub fn body_channel(buffer: usize) -> (BodySender, BoxBody) {
    let (tx, rx) = mpsc::channel(buffer.max(1));
    (tx, StreamBody::new(ReceiverStream::new(rx)).boxed())
}

fn to_send_body<B>(req: Request<B>) -> Request<SendBody>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    req.map(|body| body.map_err(Into::into).boxed_unsync())
}

async fn connect(addr: SocketAddr) -> Result<TokioIo<TcpStream>, BoxError> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(TokioIo::new(stream))
}

/// A keep-alive HTTP/1.1 connection; see [`h1`].
#[derive(Debug)]
pub struct H1 {
    addr: SocketAddr,
    sender: http1::SendRequest<SendBody>,
    conn: JoinHandle<Result<(), hyper::Error>>,
}

/// Opens an HTTP/1.1 connection to `addr` (upgrades enabled).
///
/// Requests are sent as given: set the `Host` header yourself (or use
/// [`H1::get`]). Use `hyper::upgrade::on(response)` after a `101` to get
/// the upgraded stream.
pub async fn h1(addr: SocketAddr) -> Result<H1, BoxError> {
    let io = connect(addr).await?;
    let (sender, conn) = http1::handshake(io).await?;
    let conn = tokio::spawn(conn.with_upgrades());
    Ok(H1 { addr, sender, conn })
}

impl H1 {
    /// The address this connection was opened to.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends `req` on this connection once it is ready for another request,
    /// and returns the response head (read the body with [`collect`]).
    ///
    /// HTTP/1.1 has no multiplexing: read (or drop) a response's body before
    /// the next request can go out.
    pub async fn send<B>(&mut self, req: Request<B>) -> Result<Response<Incoming>, BoxError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        self.sender.ready().await?;
        Ok(self.sender.send_request(to_send_body(req)).await?)
    }

    /// Sends `GET path` with `Host: host` and collects the response.
    pub async fn get(&mut self, host: &str, path: &str) -> Result<Collected, BoxError> {
        let req = Request::get(path).header(HOST, host).body(empty())?;
        collect(self.send(req).await?).await
    }

    /// Whether the connection can take another request right now.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.sender.is_ready()
    }

    /// Whether the connection is closed (by either side, or on error).
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Waits until the connection ends and returns how it ended: `Ok` for a
    /// clean close (or an upgrade), `Err` on a connection error.
    pub async fn closed(self) -> Result<(), BoxError> {
        let H1 { sender, conn, .. } = self;
        drop(sender);
        Ok(conn.await??)
    }
}

/// An h2c (HTTP/2 prior knowledge) connection; see [`h2`].
///
/// Cheap to clone: clones share the connection and may send concurrently.
#[derive(Debug, Clone)]
pub struct H2 {
    addr: SocketAddr,
    sender: http2::SendRequest<SendBody>,
}

/// Opens an h2c (prior knowledge) connection to `addr`.
pub async fn h2(addr: SocketAddr) -> Result<H2, BoxError> {
    let io = connect(addr).await?;
    let (sender, conn) = http2::handshake(TokioExecutor::new(), io).await?;
    tokio::spawn(async move {
        // Connection errors surface on the requests as well.
        let _ = conn.await;
    });
    Ok(H2 { addr, sender })
}

impl H2 {
    /// The address this connection was opened to.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends `req` as a new stream and returns the response head.
    ///
    /// If the URI has no scheme, `http` is used, and if it also has no
    /// authority, the connection's address is used (so `"/path"` works); give
    /// a full URI like `http://example.test/path` to choose `:authority`.
    pub async fn send<B>(&self, req: Request<B>) -> Result<Response<Incoming>, BoxError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let mut req = to_send_body(req);
        if req.uri().scheme().is_none() {
            let mut parts = req.uri().clone().into_parts();
            parts.scheme = Some(Scheme::HTTP);
            if parts.authority.is_none() {
                parts.authority = Some(Authority::try_from(self.addr.to_string())?);
            }
            if parts.path_and_query.is_none() {
                parts.path_and_query = Some("/".try_into()?);
            }
            *req.uri_mut() = Uri::from_parts(parts)?;
        }
        *req.version_mut() = Version::HTTP_2;
        let mut sender = self.sender.clone();
        sender.ready().await?;
        Ok(sender.send_request(req).await?)
    }

    /// Sends `GET http://{authority}{path}` and collects the response.
    pub async fn get(&self, authority: &str, path: &str) -> Result<Collected, BoxError> {
        let uri = format!("http://{authority}{path}");
        let req = Request::get(uri).body(empty())?;
        collect(self.send(req).await?).await
    }

    /// Whether the connection is closed.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

/// One-shot HTTP/1.1 `GET path` with `Host: host` on a new connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Result<Collected, BoxError> {
    h1(addr).await?.get(host, path).await
}

/// A fully read response.
#[derive(Debug, Clone)]
pub struct Collected {
    /// Response status.
    pub status: StatusCode,
    /// HTTP version of the response.
    pub version: Version,
    /// Response headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// Trailers, if the response had any.
    pub trailers: Option<HeaderMap>,
}

impl Collected {
    /// The body parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value, BoxError> {
        Ok(serde_json::from_slice(&self.body)?)
    }

    /// The body as text (invalid UTF-8 replaced).
    #[must_use]
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value as text, if present and valid.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A trailer's value as text, if present and valid.
    #[must_use]
    pub fn trailer(&self, name: &str) -> Option<&str> {
        self.trailers
            .as_ref()?
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    }
}

/// Reads `resp` to the end, trailers included.
pub async fn collect(resp: Response<Incoming>) -> Result<Collected, BoxError> {
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await?;
    let trailers = collected.trailers().cloned();
    Ok(Collected {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    })
}
