//! An HTTP/1.1 + h2c backend with test endpoints.
//!
//! [`HttpBackend`] serves HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on
//! the same port, with keep-alive. Every response carries `x-backend: <name>`.
//!
//! | Path | Behaviour |
//! |------|-----------|
//! | `/status/{code}` | responds with that status and a small text body |
//! | `/never` | never responds; the connection stays open |
//! | `/delay/{ms}` | waits `ms` milliseconds, then behaves like the echo |
//! | `/bytes/{n}` | streams `n` bytes (byte `i` is `(i % 251) as u8`) in 64 KiB frames, no `content-length` |
//! | `/upload` | reads the body frame by frame and answers `{"bytes": n, "checksum": fnv1a64}` |
//! | `/gated-upload` | like `/upload`, but reports [`Event::UploadProgress`] per data frame; answers `{"bytes": n}` |
//! | `/gated-download/{chunks}` | sends chunk 0 at once, then one chunk per [`HttpBackend::release_chunk`] |
//! | `/trailers` | body `with trailers`, then trailer `x-trailer: done` |
//! | anything else | the echo (see below) |
//!
//! The echo answers 200 with `content-type: application/json`, headers
//! `x-seen-path` (path and query as received), `x-seen-authority` (the `Host`
//! header, or the URI authority, e.g. for HTTP/2), `x-seen-version`
//! (`HTTP/1.1` or `HTTP/2.0`) and `x-seen-method`, and a JSON body
//! `{"backend", "method", "path", "query", "version", "authority", "headers",
//! "body_bytes"}` where `headers` maps each lowercase header name to its
//! values joined with `", "`, `query` is `null` when absent and `body_bytes`
//! is the length of the (fully read) request body.
//!
//! Over HTTP/1.1, hyper only sends trailers when the request carried
//! `te: trailers`; over HTTP/2 they are always sent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::header::{CONTENT_TYPE, HOST, HeaderName, TRAILER};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::{Mutex, Semaphore};

use crate::BoxError;
use crate::server::{ServerTask, accept_loop, bind};

/// FNV-1a 64-bit offset basis: the initial `state` for [`fnv1a64`].
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Size of each `/gated-download` chunk (16 KiB).
pub const GATED_CHUNK_SIZE: usize = 16 * 1024;

/// Size of each `/bytes/{n}` data frame (64 KiB; the last may be shorter).
pub const BYTES_FRAME_SIZE: usize = 64 * 1024;

/// Header naming the backend on every response.
pub const BACKEND_HEADER: &str = "x-backend";

/// Folds `data` into an FNV-1a 64-bit hash `state`.
///
/// Start with [`FNV_OFFSET`] and feed the bytes in any chunking: the result
/// is the same as hashing them in one go, which is what `/upload` reports.
#[must_use]
pub fn fnv1a64(state: u64, data: &[u8]) -> u64 {
    let mut h = fnv::FnvHasher::with_key(state);
    std::hash::Hasher::write(&mut h, data);
    std::hash::Hasher::finish(&h)
}

/// The byte at offset `i` of a `/bytes/{n}` response body.
#[must_use]
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// The content of `/gated-download` chunk `i`: 16 KiB of `b'a' + i % 26`.
#[must_use]
pub fn gated_chunk(i: usize) -> Bytes {
    Bytes::from(vec![b'a' + (i % 26) as u8; GATED_CHUNK_SIZE])
}

/// Something observed by an [`HttpBackend`], read with
/// [`HttpBackend::next_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `/gated-upload` received a data frame; `total_bytes` is the running
    /// total of body bytes received by that request so far.
    UploadProgress {
        /// Body bytes received so far by the request.
        total_bytes: u64,
    },
    /// A `/never` request was given up by its client (its connection or stream
    /// closed): the work a deadline should stop.
    Abandoned,
}

/// Reports [`Event::Abandoned`] when a `/never` handler is dropped.
struct AbandonGuard(UnboundedSender<Event>);

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        let _ = self.0.send(Event::Abandoned);
    }
}

/// How [`HttpBackend::fail`] fails requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Serve normally.
    None,
    /// Answer with this status.
    Status(u16),
    /// Close the connection without answering.
    Close,
    /// Reset the connection (TCP RST) without answering.
    Reset,
}

/// `fail_status` values below any HTTP status.
const FAIL_CLOSE: u16 = 1;
const FAIL_RESET: u16 = 2;

/// Response body type used by the backend.
type RespBody = UnsyncBoxBody<Bytes, BoxError>;

/// State shared by the backend handle and its connections.
#[derive(Debug)]
struct Shared {
    name: HeaderValue,
    requests: AtomicU64,
    connections: AtomicU64,
    events: UnboundedSender<Event>,
    gate: Semaphore,
    /// When non-zero, every request is answered with this status (failing on command).
    fail_status: std::sync::atomic::AtomicU16,
    /// When non-zero, every n-th request waits `slow_ms` first (a slow tail).
    slow_every: AtomicU64,
    slow_ms: AtomicU64,
}

/// A real HTTP/1.1 + h2c server on loopback; see the [module docs](self).
///
/// Dropping it (or calling [`shutdown`](Self::shutdown)) closes the listener
/// and the connections it accepted.
#[derive(Debug)]
pub struct HttpBackend {
    addr: SocketAddr,
    shared: Arc<Shared>,
    events: Mutex<UnboundedReceiver<Event>>,
    task: ServerTask,
}

impl HttpBackend {
    /// Binds `127.0.0.1:0` and starts serving; ready when this returns.
    ///
    /// `name` is sent back in `x-backend` and the echo's `backend` field; it
    /// must be a valid header value.
    pub async fn start(name: &str) -> std::io::Result<HttpBackend> {
        let name = HeaderValue::from_str(name).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("backend name {name:?} is not a valid header value: {e}"),
            )
        })?;
        let (listener, addr) = bind().await?;
        let (events_tx, events_rx) = unbounded_channel();
        let shared = Arc::new(Shared {
            name,
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            events: events_tx,
            gate: Semaphore::new(0),
            fail_status: std::sync::atomic::AtomicU16::new(0),
            slow_every: AtomicU64::new(0),
            slow_ms: AtomicU64::new(0),
        });
        let conn_shared = Arc::clone(&shared);
        let task = ServerTask::spawn(accept_loop(listener, move |stream| {
            conn_shared.connections.fetch_add(1, Ordering::SeqCst);
            serve_connection(Arc::clone(&conn_shared), stream)
        }));
        Ok(HttpBackend {
            addr,
            shared,
            events: Mutex::new(events_rx),
            task,
        })
    }

    /// The address the backend listens on.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The backend's name (the `x-backend` value).
    #[must_use]
    pub fn name(&self) -> &str {
        self.shared.name.to_str().unwrap_or_default()
    }

    /// Fails on command in another way: [`Failure::Close`] closes the connection
    /// instead of answering (a stream reset on HTTP/2), [`Failure::Reset`] also
    /// resets new connections (TCP RST) once a request arrives on them.
    pub fn fail(&self, how: Failure) {
        let v = match how {
            Failure::None => 0,
            Failure::Status(s) => s.max(100),
            Failure::Close => FAIL_CLOSE,
            Failure::Reset => FAIL_RESET,
        };
        self.shared.fail_status.store(v, Ordering::SeqCst);
    }

    /// Fails on command: answers every request with `status` (e.g. 503) until
    /// called with `None`.
    pub fn fail_with(&self, status: Option<u16>) {
        self.shared
            .fail_status
            .store(status.unwrap_or(0), Ordering::SeqCst);
    }

    /// A slow tail on command: one request in `every` (chosen by a hash of the
    /// backend's name and the request's number) waits `delay` before it is answered
    /// (`every` 20 is a slow 5%); 0 turns it off.
    pub fn slow(&self, every: u64, delay: Duration) {
        self.shared.slow_every.store(every, Ordering::SeqCst);
        self.shared.slow_ms.store(
            u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
    }

    /// Requests received so far (counted when the request head arrives, so
    /// `/never` requests count too).
    #[must_use]
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    #[must_use]
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Waits for the next [`Event`]. Returns `None` only once the backend is
    /// gone, so wrap it in a timeout when an event may never come.
    pub async fn next_event(&self) -> Option<Event> {
        self.events.lock().await.recv().await
    }

    /// Lets one more `/gated-download` chunk be sent (adds one permit, shared
    /// by all gated downloads on this backend).
    pub fn release_chunk(&self) {
        self.shared.gate.add_permits(1);
    }

    /// Stops the backend: when this returns the listener is closed and the
    /// accepted connections are dropped.
    pub async fn shutdown(mut self) {
        self.task.stop().await;
    }
}

/// Serves one accepted connection (HTTP/1.1 or h2c).
async fn serve_connection(shared: Arc<Shared>, mut stream: TcpStream) {
    if shared.fail_status.load(Ordering::SeqCst) == FAIL_RESET {
        // Wait for the request, then close with unread data and no linger: an RST.
        let mut buf = [0u8; 4096];
        let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
        let _ = stream.set_zero_linger();
        drop(stream);
        return;
    }
    let builder = auto::Builder::new(TokioExecutor::new());
    let service = service_fn(move |req| handle(Arc::clone(&shared), req));
    // Connection errors (resets, aborted requests) are expected in tests.
    let _ = builder
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, BoxError> {
    let n = shared.requests.fetch_add(1, Ordering::SeqCst) + 1;
    if matches!(
        shared.fail_status.load(Ordering::SeqCst),
        FAIL_CLOSE | FAIL_RESET
    ) {
        // A service error makes hyper drop the connection (HTTP/1.1) or reset the
        // stream (HTTP/2) without an answer.
        return Err("failing on command: no answer".into());
    }
    let every = shared.slow_every.load(Ordering::SeqCst);
    // Which requests are slow: a hash of (backend, request number), so the share is
    // as configured but two backends' slow requests are not correlated.
    let slow = every != 0 && {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (shared.name.as_bytes(), n).hash(&mut h);
        h.finish().is_multiple_of(every)
    };
    if slow {
        tokio::time::sleep(Duration::from_millis(shared.slow_ms.load(Ordering::SeqCst))).await;
    }
    let mut resp = route(&shared, req).await;
    resp.headers_mut()
        .insert(BACKEND_HEADER, shared.name.clone());
    Ok(resp)
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<RespBody> {
    let failing = shared.fail_status.load(Ordering::SeqCst);
    if failing >= 100 {
        return status(&failing.to_string());
    }
    let path = req.uri().path().to_owned();
    if let Some(code) = path.strip_prefix("/status/") {
        status(code)
    } else if path == "/never" {
        let _abandoned = AbandonGuard(shared.events.clone());
        std::future::pending().await
    } else if let Some(ms) = path.strip_prefix("/delay/") {
        match ms.parse::<u64>() {
            Ok(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                echo(shared, req).await
            }
            Err(_) => text(StatusCode::BAD_REQUEST, format!("bad delay {ms:?}\n")),
        }
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        match n.parse::<u64>() {
            Ok(n) => bytes(n),
            Err(_) => text(StatusCode::BAD_REQUEST, format!("bad length {n:?}\n")),
        }
    } else if path == "/upload" {
        upload(req.into_body(), None).await
    } else if path == "/gated-upload" {
        upload(req.into_body(), Some(&shared.events)).await
    } else if let Some(chunks) = path.strip_prefix("/gated-download/") {
        match chunks.parse::<usize>() {
            Ok(chunks) => gated_download(Arc::clone(shared), chunks),
            Err(_) => text(
                StatusCode::BAD_REQUEST,
                format!("bad chunk count {chunks:?}\n"),
            ),
        }
    } else if path == "/trailers" {
        trailers()
    } else {
        echo(shared, req).await
    }
}

fn boxed<B>(body: B) -> RespBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

fn text(status: StatusCode, body: String) -> Response<RespBody> {
    let mut resp = Response::new(boxed(Full::new(Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<RespBody> {
    let mut resp = Response::new(boxed(Full::new(Bytes::from(value.to_string()))));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn status(code: &str) -> Response<RespBody> {
    let Some(status) = code
        .parse::<u16>()
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
        .filter(|s| !s.is_informational())
    else {
        return text(StatusCode::BAD_REQUEST, format!("bad status {code:?}\n"));
    };
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        let mut resp = Response::new(boxed(http_body_util::Empty::<Bytes>::new()));
        *resp.status_mut() = status;
        return resp;
    }
    text(status, format!("status {}\n", status.as_u16()))
}

fn lossy(value: &HeaderValue) -> String {
    String::from_utf8_lossy(value.as_bytes()).into_owned()
}

async fn echo(shared: &Shared, req: Request<Incoming>) -> Response<RespBody> {
    let (parts, body) = req.into_parts();
    // Drain the request body so the connection stays reusable.
    let mut body_bytes = 0u64;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    body_bytes += data.len() as u64;
                }
            }
            Err(e) => {
                return text(StatusCode::BAD_REQUEST, format!("reading body: {e}\n"));
            }
        }
    }

    let authority = parts
        .headers
        .get(HOST)
        .map(lossy)
        .or_else(|| parts.uri.authority().map(|a| a.as_str().to_owned()))
        .unwrap_or_default();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
    let version = format!("{:?}", parts.version);
    let method = parts.method.as_str().to_owned();

    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let joined = parts
            .headers
            .get_all(name)
            .iter()
            .map(lossy)
            .collect::<Vec<_>>()
            .join(", ");
        headers.insert(name.as_str().to_owned(), serde_json::Value::String(joined));
    }

    let body = serde_json::json!({
        "backend": lossy(&shared.name),
        "method": method,
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "version": version,
        "authority": authority,
        "headers": headers,
        "body_bytes": body_bytes,
    });
    let mut resp = json(StatusCode::OK, &body);
    let h = resp.headers_mut();
    let seen = [
        ("x-seen-path", path_and_query),
        ("x-seen-authority", authority),
        ("x-seen-version", version),
        ("x-seen-method", method),
    ];
    for (name, value) in seen {
        if let Ok(value) = HeaderValue::from_str(&value) {
            h.insert(HeaderName::from_static(name), value);
        }
    }
    resp
}

fn bytes(n: u64) -> Response<RespBody> {
    // One pattern buffer long enough that every frame is a zero-copy slice.
    let pattern: Bytes = (0..(251 + BYTES_FRAME_SIZE) as u64)
        .map(pattern_byte)
        .collect::<Vec<u8>>()
        .into();
    let frames = stream::unfold(0u64, move |offset| {
        let pattern = pattern.clone();
        async move {
            if offset >= n {
                return None;
            }
            let len = (n - offset).min(BYTES_FRAME_SIZE as u64) as usize;
            let start = (offset % 251) as usize;
            let frame = Frame::data(pattern.slice(start..start + len));
            Some((Ok::<_, BoxError>(frame), offset + len as u64))
        }
    });
    let mut resp = Response::new(boxed(StreamBody::new(frames)));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

/// Reads the body frame by frame, never holding more than one frame.
async fn upload(mut body: Incoming, events: Option<&UnboundedSender<Event>>) -> Response<RespBody> {
    let mut total = 0u64;
    let mut checksum = FNV_OFFSET;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                total += data.len() as u64;
                checksum = fnv1a64(checksum, data);
                if let Some(events) = events {
                    // The handle may be gone; nobody to tell then.
                    let _ = events.send(Event::UploadProgress { total_bytes: total });
                }
            }
            Err(e) => {
                return text(StatusCode::BAD_REQUEST, format!("reading body: {e}\n"));
            }
        }
    }
    let body = if events.is_some() {
        serde_json::json!({ "bytes": total })
    } else {
        serde_json::json!({ "bytes": total, "checksum": checksum })
    };
    json(StatusCode::OK, &body)
}

fn gated_download(shared: Arc<Shared>, chunks: usize) -> Response<RespBody> {
    let frames = stream::unfold(0usize, move |i| {
        let shared = Arc::clone(&shared);
        async move {
            if i >= chunks {
                return None;
            }
            if i > 0 {
                // Closed only if the semaphore is closed, which never happens.
                shared.gate.acquire().await.ok()?.forget();
            }
            Some((Ok::<_, BoxError>(Frame::data(gated_chunk(i))), i + 1))
        }
    });
    let mut resp = Response::new(boxed(StreamBody::new(frames)));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

fn trailers() -> Response<RespBody> {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-trailer", HeaderValue::from_static("done"));
    let frames = stream::iter([
        Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"with trailers"))),
        Ok(Frame::trailers(trailers)),
    ]);
    let mut resp = Response::new(boxed(StreamBody::new(frames)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp.headers_mut()
        .insert(TRAILER, HeaderValue::from_static("x-trailer"));
    resp
}
