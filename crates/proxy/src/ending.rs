//! A request's end. Its observers (metrics, the access log, taps, the control
//! plane's stats, the trace span) are told when its response has been sent in full,
//! not when the response head is ready: only then are the bytes that went through,
//! a gRPC status sent in trailers (how every gRPC call that returns a message ends),
//! and a body broken off halfway known.
//!
//! [`handle`] is a request's whole life, the same in both directions: the trace hop
//! and the observers start, the direction's [`Forward`] forwards it, a failure
//! becomes its response, and the response goes back through [`respond`].
//!
//! [`respond`] takes what they need from the request and the response head into an
//! [`Ending`]; a response without a body ends there, any other carries its ending in
//! its body ([`crate::body::RespBody::Tracked`], told through [`crate::body::OnEnd`]),
//! which reports when the body ends, fails, or is dropped unfinished because the
//! client went away.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::access::Observed;
use crate::body::RespBody;
use crate::error::ProxyError;
use crate::trace::Hop;
use crate::types::{ConnCtx, Direction, Outcome, RequestMeta};

pub use crate::types::End;

/// What a request's observers need once its response has ended.
#[derive(Debug)]
pub struct Ending {
    ctx: Arc<ConnCtx>,
    dir: Direction,
    meta: RequestMeta,
    observed: Option<Observed>,
    hop: Option<Hop>,
    started: Instant,
    head: Duration,
    status: StatusCode,
    grpc_status: Option<HeaderValue>,
    error: Option<HeaderValue>,
}

/// A direction's part of handling a request: how it is forwarded, and what a failed
/// one's response says besides. [`handle`] does the rest.
pub trait Forward {
    /// Inbound or outbound.
    const DIRECTION: Direction;

    /// Forwards the request, noting in `meta` what it learns on the way.
    fn forward(
        ctx: &Arc<ConnCtx>,
        req: Request<Incoming>,
        meta: &mut RequestMeta,
    ) -> impl Future<Output = Result<Response<RespBody>, ProxyError>> + Send;

    /// Edits the response to a request that failed with `error` (nothing, unless
    /// the direction says otherwise).
    fn failed(_error: &ProxyError, _resp: &mut Response<RespBody>) {}
}

/// Handles one request in `F`'s direction: its trace hop and observers start, `F`
/// forwards it, a failure is logged (with its side), counted and answered, and the
/// response goes to the client with its ending. Generic, not boxed: each direction
/// gets its own future, as when each had its own copy of this.
pub async fn handle<F: Forward>(
    ctx: Arc<ConnCtx>,
    mut req: Request<Incoming>,
) -> Response<RespBody> {
    let dir = F::DIRECTION;
    let grpc = crate::http_util::is_grpc(req.headers());
    let hop = crate::trace::start(&ctx, dir, &mut req);
    let observed = crate::access::observe(&ctx, dir, &req);
    let started = Instant::now();
    let mut meta = RequestMeta::default();
    let resp = match F::forward(&ctx, req, &mut meta).await {
        Ok(r) => r,
        Err(e) => {
            let side = e.side().as_str();
            tracing::debug!(error = %e, side, peer = %ctx.peer, "{} request failed", dir.as_str());
            ctx.shared.metrics.error(dir, e.reason());
            let mut resp = e.to_response(grpc);
            F::failed(&e, &mut resp);
            resp
        }
    };
    respond(ctx.clone(), dir, meta, observed, hop, started, resp)
}

/// Hands the response to the client, telling the request's observers when it has
/// ended.
pub fn respond(
    ctx: Arc<ConnCtx>,
    dir: Direction,
    meta: RequestMeta,
    observed: Option<Observed>,
    hop: Option<Hop>,
    started: Instant,
    resp: Response<RespBody>,
) -> Response<RespBody> {
    use http_body::Body as _;
    crate::trace::head(hop.as_ref(), &resp);
    let h = resp.headers();
    let ending = Ending {
        ctx,
        dir,
        meta,
        observed,
        hop,
        started,
        head: started.elapsed(),
        status: resp.status(),
        grpc_status: h.get(crate::types::GRPC_STATUS).cloned(),
        error: h.get(crate::types::SINEW_ERROR).cloned(),
    };
    if resp.body().is_end_stream() {
        ending.end(0, None, End::Complete);
        return resp;
    }
    resp.map(|body| RespBody::tracked(body, Some(ending)))
}

impl crate::body::OnEnd for Option<Ending> {
    fn end(&mut self, bytes: u64, trailer_grpc: Option<HeaderValue>, end: End) {
        if let Some(ending) = self.take() {
            ending.end(bytes, trailer_grpc, end);
        }
    }
}

impl Ending {
    /// Tells every observer: `bytes` of body were sent, `trailer_grpc` is a gRPC
    /// status from the trailers.
    pub fn end(self, bytes: u64, trailer_grpc: Option<HeaderValue>, end: End) {
        let Ending {
            ctx,
            dir,
            meta,
            observed,
            hop,
            started,
            head,
            status,
            grpc_status,
            error,
        } = self;
        let outcome = Outcome {
            status,
            grpc_status: trailer_grpc.or(grpc_status),
            error,
            duration: started.elapsed(),
            head,
            response_bytes: bytes,
            end,
        };
        let peer = match dir {
            Direction::Inbound => ctx.peer_identity.as_ref(),
            Direction::Outbound => None,
        };
        ctx.shared
            .metrics
            .http(dir, &meta, peer, &outcome, &ctx.last_series);
        crate::trace::end(hop, &outcome);
        crate::access::finish(&ctx, observed, dir, meta, &outcome);
    }
}
