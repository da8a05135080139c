//! Body types: requests and responses stream through; nothing buffers a whole body
//! (a retryable request keeps a bounded copy of what it already sent).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::types::End;

/// A request body sent upstream: the downstream body as it arrives, or nothing.
#[derive(Debug)]
pub enum ReqBody {
    /// Streamed from the downstream connection.
    Incoming(Incoming),
    /// No body (tunnels, proxy-made requests).
    Empty,
    /// A small body held in memory so it can be sent again (retries, mirrors).
    Buffered(Option<bytes::Bytes>),
    /// Streamed, with a copy kept (up to a limit) so a retry can send it again
    /// once it has ended: bodies of unknown length, such as gRPC calls.
    Captured(Incoming, Arc<Capture>),
    /// Streamed from the downstream connection, noting whether it failed there
    /// (malformed chunking, a client gone) or went past the listener's body limit:
    /// a send that fails then is the client's fault, not the endpoint's.
    Watched(Incoming, Arc<Watch>),
}

/// What a [`ReqBody::Watched`] body saw.
#[derive(Debug, Default)]
pub struct Watch {
    failed: std::sync::atomic::AtomicBool,
    too_large: std::sync::atomic::AtomicBool,
    seen: std::sync::atomic::AtomicU64,
    limit: Option<u64>,
}

impl Watch {
    /// A watch that stops the body past `limit` bytes.
    pub fn new(limit: Option<u64>) -> Watch {
        Watch {
            limit,
            ..Watch::default()
        }
    }

    /// The body broke on the client's side.
    pub fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The body went past the limit (and was stopped).
    pub fn too_large(&self) -> bool {
        self.too_large.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The limit, if any.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }
}

/// Errors of a request body sent upstream: the downstream's, or the listener's
/// body limit.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The copy a [`ReqBody::Captured`] keeps.
#[derive(Debug)]
pub struct Capture {
    limit: usize,
    state: Mutex<CaptureState>,
}

#[derive(Debug, Default)]
struct CaptureState {
    chunks: Vec<Bytes>,
    len: usize,
    ended: bool,
    /// Past the limit, or trailers (not kept): cannot be replayed.
    spoiled: bool,
}

impl Capture {
    /// An empty copy that keeps at most `limit` bytes.
    pub fn new(limit: usize) -> Arc<Capture> {
        Arc::new(Capture {
            limit,
            state: Mutex::new(CaptureState::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CaptureState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, frame: &Frame<Bytes>, end: bool) {
        let mut s = self.lock();
        match frame.data_ref() {
            Some(d) if !s.spoiled && s.len + d.len() <= self.limit => {
                s.len += d.len();
                s.chunks.push(d.clone());
            }
            _ => {
                s.spoiled = true;
                s.chunks.clear();
            }
        }
        s.ended |= end;
    }

    fn end(&self) {
        self.lock().ended = true;
    }

    /// The whole body, if it has ended within the limit (`Some(None)`: empty).
    pub fn replay(&self) -> Option<Option<Bytes>> {
        let s = self.lock();
        if !s.ended || s.spoiled {
            return None;
        }
        Some(match s.chunks.len() {
            0 => None,
            1 => Some(s.chunks[0].clone()),
            _ => Some(s.chunks.concat().into()),
        })
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        use std::sync::atomic::Ordering::Relaxed;
        let polled = match self.get_mut() {
            ReqBody::Incoming(b) => Pin::new(b).poll_frame(cx),
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Buffered(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ReqBody::Watched(b, watch) => {
                let polled = Pin::new(b).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Err(_))) => watch.failed.store(true, Relaxed),
                    Poll::Ready(Some(Ok(frame))) => {
                        let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                        let seen = watch.seen.fetch_add(n, Relaxed) + n;
                        if let Some(limit) = watch.limit
                            && seen > limit
                        {
                            watch.too_large.store(true, Relaxed);
                            return Poll::Ready(Some(Err(format!(
                                "the request body is over the listener's limit of {limit} bytes"
                            )
                            .into())));
                        }
                    }
                    _ => {}
                }
                polled
            }
            ReqBody::Captured(b, capture) => {
                let polled = Pin::new(&mut *b).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => capture.record(frame, b.is_end_stream()),
                    Poll::Ready(None) => capture.end(),
                    _ => {}
                }
                polled
            }
        };
        polled.map(|f| f.map(|r| r.map_err(BodyError::from)))
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Incoming(b) | ReqBody::Captured(b, _) | ReqBody::Watched(b, _) => {
                b.is_end_stream()
            }
            ReqBody::Empty => true,
            ReqBody::Buffered(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Incoming(b) | ReqBody::Captured(b, _) | ReqBody::Watched(b, _) => {
                b.size_hint()
            }
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Buffered(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// A response body sent downstream: the upstream body as it arrives, or a small
/// proxy-made body.
#[derive(Debug)]
pub enum RespBody {
    /// Streamed from the upstream connection.
    Upstream(Incoming),
    /// A proxy-made body, sent in one frame.
    Full(Option<Bytes>),
    /// A body whose end the request's observers wait for ([`crate::ending`]).
    Tracked(Box<Tracked>),
}

/// Told once how a tracked body ended. The request's observers ([`crate::ending`])
/// implement it; a trait, so that the body type does not depend on them. Called
/// through the vtable once per response, at its end.
pub trait OnEnd: std::fmt::Debug + Send + Sync {
    /// `bytes` of body were sent, `trailer_grpc` is a gRPC status from the trailers.
    /// Called at most once with a value to report; later calls do nothing.
    fn end(&mut self, bytes: u64, trailer_grpc: Option<http::HeaderValue>, end: End);
}

/// A body on its way to the client, counted, whose end is reported once: when it
/// ends, fails, or is dropped unfinished. Boxed in [`RespBody::Tracked`] as
/// `Tracked<dyn OnEnd>` (the box was there before; the ending moves in unboxed).
#[derive(Debug)]
pub struct Tracked<E: ?Sized + OnEnd = dyn OnEnd> {
    body: RespBody,
    bytes: u64,
    grpc_status: Option<http::HeaderValue>,
    ending: E,
}

impl<E: ?Sized + OnEnd> Tracked<E> {
    fn end(&mut self, end: End) {
        self.ending.end(self.bytes, self.grpc_status.take(), end);
    }
}

impl<E: ?Sized + OnEnd> Drop for Tracked<E> {
    fn drop(&mut self) {
        self.end(End::Aborted);
    }
}

impl RespBody {
    /// `body`, reporting its end to `ending`.
    pub fn tracked(body: RespBody, ending: impl OnEnd + 'static) -> RespBody {
        RespBody::Tracked(Box::new(Tracked {
            body,
            bytes: 0,
            grpc_status: None,
            ending,
        }))
    }

    /// An empty body.
    pub fn empty() -> RespBody {
        RespBody::Full(None)
    }

    /// A body of these bytes.
    pub fn full(b: impl Into<Bytes>) -> RespBody {
        let b = b.into();
        RespBody::Full(if b.is_empty() { None } else { Some(b) })
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RespBody::Upstream(b) => Pin::new(b).poll_frame(cx),
            RespBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RespBody::Tracked(t) => {
                let polled = Pin::new(&mut t.body).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(d) = frame.data_ref() {
                            t.bytes += d.len() as u64;
                        } else if let Some(trailers) = frame.trailers_ref() {
                            t.grpc_status = trailers.get(crate::types::GRPC_STATUS).cloned();
                        }
                        // The server stops polling once the body says it has ended.
                        if t.body.is_end_stream() {
                            t.end(End::Complete);
                        }
                    }
                    Poll::Ready(Some(Err(_))) => t.end(End::Failed),
                    Poll::Ready(None) => t.end(End::Complete),
                    Poll::Pending => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Upstream(b) => b.is_end_stream(),
            RespBody::Full(b) => b.is_none(),
            RespBody::Tracked(t) => t.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Upstream(b) => b.size_hint(),
            RespBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            RespBody::Tracked(t) => t.body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capture_replays_only_a_whole_body_within_its_limit() {
        let c = Capture::new(8);
        c.record(&Frame::data(Bytes::from_static(b"abc")), false);
        assert_eq!(c.replay(), None, "not ended yet");
        c.record(&Frame::data(Bytes::from_static(b"def")), true);
        assert_eq!(c.replay(), Some(Some(Bytes::from_static(b"abcdef"))));

        let c = Capture::new(4);
        c.record(&Frame::data(Bytes::from_static(b"abc")), false);
        c.record(&Frame::data(Bytes::from_static(b"def")), false);
        c.end();
        assert_eq!(c.replay(), None, "past the limit");

        let c = Capture::new(8);
        c.record(&Frame::trailers(http::HeaderMap::new()), true);
        assert_eq!(c.replay(), None, "trailers are not kept");

        let c = Capture::new(8);
        c.end();
        assert_eq!(c.replay(), Some(None), "an empty body");
    }
}
