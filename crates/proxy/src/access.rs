//! Access logs: one line per request on standard output (`Proxy.spec.accessLog`).
//! The same record feeds live taps ([`crate::tap`]), and the same observation the
//! control plane's stats ([`crate::stats`]).
//!
//! A record is made when the response has been sent in full ([`crate::ending`]), so
//! it carries the bytes that really went through and a gRPC status sent in trailers.
//! The request path only fills a [`Record`] (cheap clones, no formatting) and hands it
//! to a bounded queue (`try_send`: never waits); a thread of its own formats and
//! writes the lines in batches. When the writer falls behind, records are dropped and
//! counted (`sinew_access_log_dropped_total`) rather than slowing requests. Lines never
//! carry bodies, query strings or credential headers.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use sinew_model::resource::AccessLogFormat;

use crate::types::{End, Outcome};

/// Records waiting for the writer; past this, new ones are dropped.
const QUEUE: usize = 16 * 1024;

/// One request, as logged. Held in the cheapest form the request path has at hand;
/// the writer turns it into text ([`Record::fields`]).
#[derive(Debug, Clone)]
pub struct Record {
    /// When the request arrived.
    pub start: SystemTime,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// HTTP method.
    pub method: http::Method,
    /// The `Host` header, when the request target carries no authority (HTTP/1.1
    /// origin form); HTTP/2's `:authority` is in `uri`.
    pub host: Option<HeaderValue>,
    /// The request target; only its path is logged (the query string may hold
    /// secrets).
    pub uri: http::Uri,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
    /// Response status.
    pub status: u16,
    /// The gRPC status, from the response head or its trailers.
    pub grpc_status: Option<HeaderValue>,
    /// From the request's arrival to the end of its response.
    pub duration: Duration,
    /// From the request's arrival to the response head.
    pub head: Duration,
    /// Request body bytes as declared (`content-length`), when known.
    pub request_bytes: Option<u64>,
    /// Response body bytes sent.
    pub response_bytes: u64,
    /// How the response ended: `complete`, `failed` (the upstream broke off) or
    /// `aborted` (the client went away first).
    pub end: End,
    /// The service (`name.namespace`).
    pub service: Option<Arc<str>>,
    /// The route (`namespace/name`).
    pub route: Option<Arc<str>>,
    /// The endpoint the request went to (outbound).
    pub upstream: Option<SocketAddr>,
    /// The caller's address.
    pub client: SocketAddr,
    /// The caller's verified SPIFFE id (inbound, mTLS).
    pub peer_identity: Option<Arc<str>>,
    /// The request's `traceparent`, whose trace id is logged.
    pub traceparent: Option<HeaderValue>,
    /// Why the proxy answered itself (`sinew-error`), if it did.
    pub error: Option<HeaderValue>,
}

/// A record's fields as text, borrowed from the record where they can be.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Fields<'a> {
    /// RFC 3339, UTC, milliseconds.
    pub start: String,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// HTTP method.
    pub method: &'a str,
    /// The authority the client used.
    pub authority: &'a str,
    /// The path, without the query string.
    pub path: &'a str,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
    /// Response status.
    pub status: u16,
    /// The gRPC status.
    pub grpc_status: Option<&'a str>,
    /// To the end of the response, in milliseconds.
    pub duration_ms: f64,
    /// To the response head, in milliseconds.
    pub head_ms: f64,
    /// Request body bytes as declared.
    pub request_bytes: Option<u64>,
    /// Response body bytes sent.
    pub response_bytes: u64,
    /// `complete`, `failed` or `aborted`.
    pub end: &'static str,
    /// The service.
    pub service: Option<&'a str>,
    /// The route.
    pub route: Option<&'a str>,
    /// The endpoint (outbound).
    pub upstream: Option<String>,
    /// The caller's address.
    pub client: String,
    /// The caller's verified SPIFFE id.
    pub peer_identity: Option<&'a str>,
    /// The W3C trace id.
    pub trace_id: Option<&'a str>,
    /// `sinew-error`.
    pub error: Option<&'a str>,
}

impl Record {
    /// The path, without the query string.
    pub fn path(&self) -> &str {
        self.uri.path()
    }

    /// The authority the client used: the target's, else `Host`.
    pub fn authority(&self) -> &str {
        match self.uri.authority() {
            Some(a) => a.as_str(),
            None => self
                .host
                .as_ref()
                .and_then(|h| h.to_str().ok())
                .unwrap_or_default(),
        }
    }

    /// The record's fields as text.
    pub fn fields(&self) -> Fields<'_> {
        fn text(v: &Option<HeaderValue>) -> Option<&str> {
            v.as_ref().and_then(|v| v.to_str().ok())
        }
        Fields {
            start: rfc3339(self.start),
            direction: self.direction,
            method: self.method.as_str(),
            authority: self.authority(),
            path: self.uri.path(),
            protocol: self.protocol,
            status: self.status,
            grpc_status: text(&self.grpc_status),
            duration_ms: self.duration.as_secs_f64() * 1000.0,
            head_ms: self.head.as_secs_f64() * 1000.0,
            request_bytes: self.request_bytes,
            response_bytes: self.response_bytes,
            end: self.end.as_str(),
            service: self.service.as_deref(),
            route: self.route.as_deref(),
            upstream: self.upstream.map(|a| a.to_string()),
            client: self.client.to_string(),
            peer_identity: self.peer_identity.as_deref(),
            trace_id: self
                .traceparent
                .as_ref()
                .and_then(|v| trace_id_of(v.to_str().ok()?)),
            error: text(&self.error),
        }
    }
}

/// The queue to the writer thread, started on first use.
#[derive(Debug, Default)]
pub struct AccessLog {
    tx: OnceLock<Option<SyncSender<(AccessLogFormat, Record)>>>,
}

impl AccessLog {
    /// Queues a record; false when it had to be dropped.
    pub fn send(&self, format: AccessLogFormat, record: Record) -> bool {
        let tx = self.tx.get_or_init(|| {
            let (tx, rx) = sync_channel(QUEUE);
            match std::thread::Builder::new()
                .name("sinew-access-log".into())
                .spawn(move || write_lines(&rx))
            {
                Ok(_) => Some(tx),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the access-log writer; access logs are off");
                    None
                }
            }
        });
        match tx {
            Some(tx) => match tx.try_send((format, record)) {
                Ok(()) => true,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
            },
            None => false,
        }
    }
}

fn write_lines(rx: &Receiver<(AccessLogFormat, Record)>) {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut lines = Lines::default();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some((format, record)) = next {
            lines.write(format, &record, &mut buf);
            next = rx.try_recv().ok();
        }
        if out.write_all(&buf).and_then(|()| out.flush()).is_err() {
            return; // stdout is gone: nothing more can be logged
        }
        buf.clear();
        // Let lines gather before waiting again: a writer blocked in `recv` is woken
        // (a futex wake, then a write) by every request, which cost more than the
        // line itself (bench scenario 9). Lines reach the log within this interval;
        // the queue holds 16,384, over 1.6 million requests per second.
        std::thread::sleep(BATCH_INTERVAL);
    }
}

/// How long the writer lets lines gather between writes.
const BATCH_INTERVAL: Duration = Duration::from_millis(10);

/// Appends one line, newline included, to `out`.
pub fn format_line(format: AccessLogFormat, r: &Record, out: &mut Vec<u8>) {
    Lines::default().write(format, r, out);
}

/// Writes lines straight into a buffer. The writer shares the proxy's CPU, so this
/// is kept cheap (bench scenario 9): keys are constants, numbers go through `itoa`,
/// the date is made once per second, and strings are copied as they are unless they
/// need quoting or escaping.
#[derive(Debug, Default)]
struct Lines {
    /// The second last formatted, and its text up to the seconds.
    second: Option<(u64, String)>,
}

/// Keys with what goes before them, JSON and text.
const KEYS: [(&str, &str); 20] = [
    ("{\"start\":", "start="),
    (",\"direction\":", " direction="),
    (",\"method\":", " method="),
    (",\"authority\":", " authority="),
    (",\"path\":", " path="),
    (",\"protocol\":", " protocol="),
    (",\"status\":", " status="),
    (",\"grpcStatus\":", " grpc_status="),
    (",\"durationMs\":", " duration_ms="),
    (",\"headMs\":", " head_ms="),
    (",\"requestBytes\":", " request_bytes="),
    (",\"responseBytes\":", " response_bytes="),
    (",\"end\":", " end="),
    (",\"service\":", " service="),
    (",\"route\":", " route="),
    (",\"upstream\":", " upstream="),
    (",\"client\":", " client="),
    (",\"peerIdentity\":", " peer_identity="),
    (",\"traceId\":", " trace_id="),
    (",\"error\":", " error="),
];

/// Bytes written as they are: printable ASCII other than `"` and `\` (and, in
/// JSON, space).
static PLAIN: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0x20;
    while b < 0x7f {
        t[b] = if b == 0x20 {
            1 // JSON only
        } else if b == b'"' as usize || b == b'\\' as usize {
            0
        } else {
            3
        };
        b += 1;
    }
    t
};

impl Lines {
    /// Writes the record's start time (RFC 3339, milliseconds): the second's text
    /// is made once per second, the milliseconds by hand.
    fn write_start(&mut self, start: SystemTime, out: &mut Vec<u8>) {
        let since = start
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = since.as_secs();
        if self.second.as_ref().is_none_or(|(s, _)| *s != secs) {
            let full = rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
            // "YYYY-MM-DDTHH:MM:SS" of "YYYY-MM-DDTHH:MM:SS.mmmZ".
            let upto = full.len().saturating_sub(5);
            self.second = Some((secs, full[..upto].to_owned()));
        }
        if let Some((_, prefix)) = &self.second {
            out.extend_from_slice(prefix.as_bytes());
        }
        let ms = since.subsec_millis();
        out.extend_from_slice(&[
            b'.',
            b'0' + (ms / 100) as u8,
            b'0' + (ms / 10 % 10) as u8,
            b'0' + (ms % 10) as u8,
            b'Z',
        ]);
    }

    fn write(&mut self, format: AccessLogFormat, r: &Record, out: &mut Vec<u8>) {
        let json = format == AccessLogFormat::Json;
        // Each key is a constant of known length, so its copy is inlined rather
        // than a call to memcpy (half of the writer's copies were keys).
        macro_rules! key {
            ($i:literal) => {
                if json {
                    out.extend_from_slice(KEYS[$i].0.as_bytes())
                } else {
                    out.extend_from_slice(KEYS[$i].1.as_bytes())
                }
            };
        }
        let mut n = itoa::Buffer::new();
        let q = |out: &mut Vec<u8>| {
            if json {
                out.push(b'"');
            }
        };

        key!(0);
        q(out);
        self.write_start(r.start, out);
        q(out);
        // Known to need no escaping: constants and the method (an HTTP token).
        for (i, v) in [r.direction, r.method.as_str()].into_iter().enumerate() {
            if i == 0 {
                key!(1);
            } else {
                key!(2);
            }
            q(out);
            out.extend_from_slice(v.as_bytes());
            q(out);
        }
        key!(3);
        text(json, Some(r.authority().as_bytes()), out);
        key!(4);
        text(json, Some(r.uri.path().as_bytes()), out);
        key!(5);
        q(out);
        out.extend_from_slice(r.protocol.as_bytes());
        q(out);
        key!(6);
        out.extend_from_slice(n.format(r.status).as_bytes());
        key!(7);
        text(json, r.grpc_status.as_ref().map(|v| v.as_bytes()), out);
        key!(8);
        millis(r.duration, out);
        key!(9);
        millis(r.head, out);
        key!(10);
        match r.request_bytes {
            Some(b) => out.extend_from_slice(n.format(b).as_bytes()),
            None => absent(json, out),
        }
        key!(11);
        out.extend_from_slice(n.format(r.response_bytes).as_bytes());
        key!(12);
        q(out);
        out.extend_from_slice(r.end.as_str().as_bytes());
        q(out);
        key!(13);
        text(json, r.service.as_deref().map(str::as_bytes), out);
        key!(14);
        text(json, r.route.as_deref().map(str::as_bytes), out);
        for (i, a) in [r.upstream, Some(r.client)].into_iter().enumerate() {
            if i == 0 {
                key!(15);
            } else {
                key!(16);
            }
            match a {
                Some(a) => {
                    q(out);
                    addr(a, out);
                    q(out);
                }
                None => absent(json, out),
            }
        }
        key!(17);
        text(json, r.peer_identity.as_deref().map(str::as_bytes), out);
        key!(18);
        let trace = r
            .traceparent
            .as_ref()
            .and_then(|v| trace_id_of(v.to_str().ok()?));
        text(json, trace.map(str::as_bytes), out);
        key!(19);
        text(json, r.error.as_ref().map(|v| v.as_bytes()), out);
        if json {
            out.push(b'}');
        }
        out.push(b'\n');
    }
}

fn absent(json: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(if json { b"null" } else { b"-" });
}

/// A string value: as it is when every byte is plain (see [`PLAIN`]), else quoted
/// and escaped by serde_json (bytes that are not UTF-8 become U+FFFD).
fn text(json: bool, v: Option<&[u8]>, out: &mut Vec<u8>) {
    let Some(v) = v else {
        return absent(json, out);
    };
    let need = if json { 1 } else { 2 };
    if !v.is_empty() && v.iter().all(|b| PLAIN[usize::from(*b)] & need != 0) {
        if json {
            out.push(b'"');
        }
        out.extend_from_slice(v);
        if json {
            out.push(b'"');
        }
    } else {
        let _ = serde_json::to_writer(&mut *out, &String::from_utf8_lossy(v));
    }
}

/// Milliseconds with three decimals.
fn millis(d: Duration, out: &mut Vec<u8>) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let mut n = itoa::Buffer::new();
    out.extend_from_slice(n.format(us / 1000).as_bytes());
    let frac = us % 1000;
    out.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

fn addr(a: SocketAddr, out: &mut Vec<u8>) {
    match a {
        SocketAddr::V4(v4) => {
            let mut n = itoa::Buffer::new();
            for (i, o) in v4.ip().octets().iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(n.format(*o).as_bytes());
            }
            out.push(b':');
            out.extend_from_slice(n.format(v4.port()).as_bytes());
        }
        SocketAddr::V6(_) => {
            let _ = write!(out, "{a}");
        }
    }
}

/// What a finished request's observers (the access log, taps, the control plane's
/// stats) need from its head. Taken once, before the request is forwarded, and only
/// while one of them is on.
#[derive(Debug)]
pub struct Observed {
    method: http::Method,
    /// The request target (a cheap clone: shared bytes); its path is what is kept.
    uri: http::Uri,
    /// What the access log and taps need besides, when either is on.
    head: Option<Box<Head>>,
}

#[derive(Debug)]
struct Head {
    /// The access-log format, when this proxy logs requests.
    format: Option<AccessLogFormat>,
    /// The request headers, redacted, when a tap may want this request.
    headers: Option<BTreeMap<String, String>>,
    start: SystemTime,
    host: Option<HeaderValue>,
    protocol: &'static str,
    request_bytes: Option<u64>,
    traceparent: Option<HeaderValue>,
}

fn content_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Starts observing a request, if this proxy logs requests, a tap may want it, or
/// it reports stats.
pub fn observe(
    ctx: &crate::types::ConnCtx,
    dir: crate::types::Direction,
    req: &http::Request<hyper::body::Incoming>,
) -> Option<Observed> {
    let format = ctx
        .shared
        .snapshot
        .load()
        .as_ref()
        .and_then(|s| s.config.access_log);
    let headers = ctx.shared.tap.headers_if_wanted(dir.as_str(), req);
    let head = (format.is_some() || headers.is_some()).then(|| {
        Box::new(Head {
            format,
            headers,
            start: SystemTime::now(),
            host: req
                .uri()
                .authority()
                .is_none()
                .then(|| req.headers().get(http::header::HOST).cloned())
                .flatten(),
            protocol: if req.version() == http::Version::HTTP_2 {
                "HTTP/2"
            } else {
                "HTTP/1.1"
            },
            request_bytes: content_length(req.headers()),
            traceparent: req.headers().get(crate::types::TRACEPARENT).cloned(),
        })
    });
    if head.is_none() && !ctx.shared.stats.on() {
        return None;
    }
    Some(Observed {
        method: req.method().clone(),
        uri: req.uri().clone(),
        head,
    })
}

/// Finishes an observed request: one record, to the access log and to the taps that
/// want it, and its counts to the stats.
pub fn finish(
    ctx: &crate::types::ConnCtx,
    observed: Option<Observed>,
    dir: crate::types::Direction,
    meta: crate::types::RequestMeta,
    outcome: &Outcome,
) {
    let Some(o) = observed else { return };
    if ctx.shared.stats.on() {
        let inbound = dir == crate::types::Direction::Inbound;
        // Inbound: only mTLS yields a caller identity. Outbound: the callee's identity
        // when the request went to a sidecar that must present one, over TLS.
        let peer = if inbound {
            ctx.peer_identity.as_deref()
        } else {
            meta.mtls_peer(&ctx.shared)
        };
        ctx.shared.stats.record(&crate::stats::Request {
            inbound,
            service: meta.service.as_deref().unwrap_or_default(),
            route: meta.route.as_deref().unwrap_or_default(),
            peer_identity: peer.unwrap_or_default(),
            mtls: peer.is_some(),
            failed: outcome.failed(),
            elapsed: outcome.duration,
            method: &o.method,
            path: o.uri.path(),
        });
    }
    let Some(head) = o.head else { return };
    let head = *head;
    let record = Record {
        start: head.start,
        direction: dir.as_str(),
        method: o.method,
        host: head.host,
        uri: o.uri,
        protocol: head.protocol,
        status: outcome.status.as_u16(),
        grpc_status: outcome.grpc_status.clone(),
        duration: outcome.duration,
        head: outcome.head,
        request_bytes: head.request_bytes,
        response_bytes: outcome.response_bytes,
        end: outcome.end,
        service: meta.service,
        route: meta.route,
        upstream: meta.upstream,
        client: ctx.peer,
        peer_identity: ctx.peer_identity.clone(),
        traceparent: head.traceparent,
        error: outcome.error.clone(),
    };
    // Only what some tap's whole filter matches becomes an event.
    let tapped = head
        .headers
        .and_then(|headers| ctx.shared.tap.event(&record, headers));
    if let Some(format) = head.format
        && !ctx.shared.access_log.send(format, record)
    {
        ctx.shared.metrics.access_log_dropped.inc();
    }
    if let Some(event) = tapped {
        ctx.shared.tap.publish(event);
    }
}

/// RFC 3339 in UTC with milliseconds (`2026-11-21T22:17:35.466Z`), by `humantime`.
/// A time before 1970 reads as 1970 and one after 9999 as the end of 9999: the
/// formatter covers only that range (it panics before, fails after), and a clock
/// outside it is wrong anyway.
pub fn rfc3339(t: SystemTime) -> String {
    const LAST: Duration = Duration::from_millis(253_402_300_799_999);
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    humantime::format_rfc3339_millis(SystemTime::UNIX_EPOCH + since.min(LAST)).to_string()
}

/// The trace id of a W3C `traceparent` value, if well formed.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let id = traceparent.split('-').nth(1)?;
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc3339() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_299_455_466);
        assert_eq!(rfc3339(t), "2026-11-21T22:17:35.466Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    /// The bytes the hand-written formatter (civil-from-days) produced before
    /// `humantime` replaced it: leap days, a non-leap century, 2038, the range's
    /// ends; sub-millisecond digits are cut, not rounded.
    #[test]
    fn dates_keep_the_bytes_of_the_former_formatter() {
        for (ms, text) in [
            (0_u64, "1970-01-01T00:00:00.000Z"),
            (999, "1970-01-01T00:00:00.999Z"),
            (1_795_299_455_466, "2026-11-21T22:17:35.466Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (951_868_799_999, "2000-02-29T23:59:59.999Z"),
            (4_107_542_399_000, "2100-02-28T23:59:59.000Z"),
            (4_107_542_400_000, "2100-03-01T00:00:00.000Z"),
            (2_147_483_647_123, "2038-01-19T03:14:07.123Z"),
            (1_767_225_600_000, "2026-01-01T00:00:00.000Z"),
            (1_796_428_799_001, "2026-12-04T23:59:59.001Z"),
            (253_402_300_799_999, "9999-12-31T23:59:59.999Z"),
        ] {
            let t = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
            assert_eq!(rfc3339(t), text, "{ms} ms");
        }
        let t = SystemTime::UNIX_EPOCH + Duration::new(1, 999_999_999);
        assert_eq!(rfc3339(t), "1970-01-01T00:00:01.999Z");
        // Outside the formatter's range: clamped, never a panic.
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(rfc3339(before), "1970-01-01T00:00:00.000Z");
        let after = SystemTime::UNIX_EPOCH + Duration::from_secs(300_000_000_000);
        assert_eq!(rfc3339(after), "9999-12-31T23:59:59.999Z");
    }

    pub(crate) fn record(path: &str, status: u16) -> Record {
        Record {
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600),
            direction: "outbound",
            method: http::Method::GET,
            host: Some(HeaderValue::from_static("catalog")),
            uri: http::Uri::try_from(path).unwrap_or_default(),
            protocol: "HTTP/1.1",
            status,
            grpc_status: None,
            duration: Duration::from_micros(1500),
            head: Duration::from_micros(1000),
            request_bytes: None,
            response_bytes: 3,
            end: End::Complete,
            service: Some("catalog.shop".into()),
            route: None,
            upstream: None,
            client: SocketAddr::from(([127, 0, 0, 1], 5)),
            peer_identity: None,
            traceparent: Some(HeaderValue::from_static(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )),
            error: None,
        }
    }

    #[test]
    fn lines_quote_what_needs_it_and_json_parses() {
        let mut r = record("/a%20b?token=secret", 200);
        r.grpc_status = Some(HeaderValue::from_static("14"));
        let mut line = Vec::new();
        format_line(AccessLogFormat::Text, &r, &mut line);
        let line = String::from_utf8(line).unwrap_or_default();
        assert!(
            line.starts_with("start=2026-01-01T00:00:00.000Z "),
            "{line}"
        );
        assert!(line.contains("path=/a%20b protocol"), "{line}");
        assert!(!line.contains("secret"), "{line}");
        assert!(
            line.contains("status=200 grpc_status=14 duration_ms=1.500 head_ms=1.000"),
            "{line}"
        );
        assert!(line.contains("request_bytes=- response_bytes=3 end=complete"));
        assert!(line.ends_with("error=-\n"), "{line}");
        r.service = Some("a \"b".into());
        let mut line = Vec::new();
        format_line(AccessLogFormat::Text, &r, &mut line);
        let line = String::from_utf8(line).unwrap_or_default();
        assert!(line.contains(r#"service="a \"b""#), "{line}");

        let mut json = Vec::new();
        format_line(AccessLogFormat::Json, &r, &mut json);
        assert_eq!(json.last(), Some(&b'\n'));
        let json: serde_json::Value = serde_json::from_slice(&json).unwrap_or_default();
        assert_eq!(json["responseBytes"], 3);
        assert_eq!(json["path"], "/a%20b");
        assert_eq!(json["grpcStatus"], "14");
        assert_eq!(json["traceId"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(json["client"], "127.0.0.1:5");
        assert_eq!(json["requestBytes"], serde_json::Value::Null);
    }

    #[test]
    fn fast_json_lines_say_what_serde_says() {
        let mut odd = record("/x", 503);
        odd.service = Some("caf\u{e9} \"q\" \\ \n".into());
        odd.route = Some("shop/route a".into());
        odd.upstream = Some("[::1]:8080".parse().unwrap_or_else(|_| unreachable!()));
        odd.peer_identity = Some("spiffe://cluster.local/ns/shop/sa/web".into());
        odd.error = Some(HeaderValue::from_static("request-timeout"));
        odd.request_bytes = Some(12);
        odd.duration = Duration::from_nanos(1_234_567_891);
        odd.traceparent = None;
        odd.start += Duration::from_millis(7);
        let mut lines = Lines::default();
        for r in [record("/items/7", 200), odd, record("/", 0)] {
            let mut fast = Vec::new();
            lines.write(AccessLogFormat::Json, &r, &mut fast);
            let fast: serde_json::Value = serde_json::from_slice(&fast).unwrap_or_default();
            let slow = serde_json::to_value(r.fields()).unwrap_or_default();
            // Durations: three decimals, where f64 prints more.
            let (mut fast, mut slow) = (fast, slow);
            for k in ["durationMs", "headMs"] {
                let (a, b) = (fast[k].as_f64(), slow[k].as_f64());
                assert!(
                    a.zip(b).is_some_and(|(a, b)| (a - b).abs() < 0.001),
                    "{k}: {a:?} {b:?}"
                );
                fast[k] = serde_json::Value::Null;
                slow[k] = serde_json::Value::Null;
            }
            assert_eq!(fast, slow);
        }
    }

    /// `end` is logged as it always was, whichever way the record is written, and a
    /// response the upstream broke off counts as failed.
    #[test]
    fn ends_are_logged_as_their_strings() {
        let mut lines = Lines::default();
        for (end, text) in [
            (End::Complete, "complete"),
            (End::Failed, "failed"),
            (End::Aborted, "aborted"),
        ] {
            let mut r = record("/", 200);
            r.end = end;
            let mut fast = Vec::new();
            lines.write(AccessLogFormat::Json, &r, &mut fast);
            let fast: serde_json::Value = serde_json::from_slice(&fast).unwrap_or_default();
            assert_eq!(fast["end"], text);
            let slow = serde_json::to_value(r.fields()).unwrap_or_default();
            assert_eq!(slow["end"], text);
            let outcome = Outcome {
                status: http::StatusCode::OK,
                grpc_status: None,
                error: None,
                duration: Duration::ZERO,
                head: Duration::ZERO,
                response_bytes: 0,
                end,
            };
            assert_eq!(outcome.failed(), end == End::Failed, "{text}");
        }
    }

    #[test]
    fn trace_ids_come_from_traceparent() {
        assert_eq!(
            trace_id_of("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_eq!(trace_id_of("garbage"), None);
    }
}
