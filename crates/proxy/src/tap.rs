//! Tap: a live stream of request metadata, for `GET /tap` on the admin listener and
//! for the control plane's taps (`sinew tap`, over the control stream).
//!
//! Nothing is built unless someone is tapping: the request path reads one atomic
//! counter. While someone taps, a request's headers are copied only when a tap's
//! filter could match it (direction, method, path: known at its arrival), and an
//! event is made only when a whole filter matches at its end. Taps get the request
//! head (method, authority, path, headers) and the answer (status, timing, bytes,
//! where it went), never bodies, and only the values of headers known to carry no
//! credential ([`SHOWN_HEADERS`]); every other header is listed with `<redacted>`.
//! A slow tap misses events (a bounded broadcast queue) rather than slowing requests.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::access::{Fields, Record};

/// The headers whose values a tap shows; every other header's value is
/// `<redacted>`. An allowlist, because credentials travel in headers of any name
/// (`x-auth-token`, `x-amz-security-token`, `x-goog-iam-authorization-token`, …) and
/// a list of secret names is never complete. These describe the request's shape,
/// its content and its trace, and carry no credential; headers that may hold one
/// in part (`referer` and `origin` with their query strings, `forwarded`) are left out.
pub const SHOWN_HEADERS: &[&str] = &[
    // The request and its content.
    "host",
    "accept",
    "accept-encoding",
    "accept-language",
    "content-type",
    "content-length",
    "content-encoding",
    "content-language",
    "cache-control",
    "pragma",
    "range",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
    "expect",
    "te",
    "upgrade",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "user-agent",
    "via",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-host",
    // gRPC.
    "grpc-timeout",
    "grpc-encoding",
    "grpc-accept-encoding",
    "grpc-status",
    "grpc-message",
    // Request ids and trace context.
    "x-request-id",
    "x-correlation-id",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    // Sinew's own (see `http_util`, `error`, `outbound`, `resilience`): no credential.
    "sinew-dst-port",
    "sinew-orig-proto",
    "sinew-peer-identity",
    "sinew-retry-attempt",
    "sinew-hedged",
    "sinew-timeout-ms",
    "sinew-error",
];

/// What a tap shows in place of a header value.
pub const REDACTED: &str = "<redacted>";

/// Events queued per tap before a slow one starts missing them.
const QUEUE: usize = 1024;

/// One request, as tapped: its access-log record and its request headers.
#[derive(Debug, Clone)]
pub struct TapEvent {
    /// What the access log would say.
    pub record: Record,
    /// Request headers, secrets redacted.
    pub headers: BTreeMap<String, String>,
}

impl TapEvent {
    /// The event as sent to the control plane (`proxy` is filled in there).
    pub fn to_proto(&self) -> sinew_api::v1::TapEvent {
        let r = self.record.fields();
        let owned = |v: Option<&str>| v.unwrap_or_default().to_owned();
        sinew_api::v1::TapEvent {
            proxy: String::new(),
            start: r.start,
            direction: r.direction.to_owned(),
            method: r.method.to_owned(),
            authority: r.authority.to_owned(),
            path: r.path.to_owned(),
            protocol: r.protocol.to_owned(),
            status: u32::from(r.status),
            grpc_status: owned(r.grpc_status),
            duration_ms: r.duration_ms,
            service: owned(r.service),
            route: owned(r.route),
            upstream: r.upstream.unwrap_or_default(),
            client: r.client,
            peer_identity: owned(r.peer_identity),
            trace_id: owned(r.trace_id),
            error: owned(r.error),
            headers: self.headers.clone().into_iter().collect(),
        }
    }
}

impl serde::Serialize for TapEvent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct Event<'a> {
            #[serde(flatten)]
            record: Fields<'a>,
            headers: &'a BTreeMap<String, String>,
        }
        Event {
            record: self.record.fields(),
            headers: &self.headers,
        }
        .serialize(s)
    }
}

/// Request headers for a tap: the values of [`SHOWN_HEADERS`] as they are, every
/// other value `<redacted>` (header names are lower case in an `http::HeaderMap`).
pub fn redacted(headers: &http::HeaderMap) -> BTreeMap<String, String> {
    headers
        .iter()
        .map(|(k, v)| {
            let value = if SHOWN_HEADERS.contains(&k.as_str()) {
                String::from_utf8_lossy(v.as_bytes()).into_owned()
            } else {
                REDACTED.to_owned()
            };
            (k.as_str().to_owned(), value)
        })
        .collect()
}

/// The tap hub: subscribers, their filters and their queue.
#[derive(Debug)]
pub struct Tap {
    taps: AtomicUsize,
    next_id: AtomicU64,
    filters: Mutex<Vec<(u64, Filter)>>,
    tx: broadcast::Sender<Arc<TapEvent>>,
}

impl Default for Tap {
    fn default() -> Self {
        Tap {
            taps: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            filters: Mutex::new(Vec::new()),
            tx: broadcast::channel(QUEUE).0,
        }
    }
}

/// A tap in progress; stops counting when dropped.
#[derive(Debug)]
pub struct Subscription<'a> {
    tap: &'a Tap,
    id: u64,
    /// The events: those some tap's filter matched (each tap filters again).
    pub rx: broadcast::Receiver<Arc<TapEvent>>,
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        self.tap.lock().retain(|(id, _)| *id != self.id);
        self.tap.taps.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Tap {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Filter)>> {
        self.filters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True while someone taps.
    pub fn active(&self) -> bool {
        self.taps.load(Ordering::Relaxed) > 0
    }

    /// Whether a tap's filter could match a request with this head: the request
    /// path's only cost while nobody taps is one atomic load.
    #[inline]
    pub fn wants(&self, direction: &str, method: &http::Method, path: &str) -> bool {
        self.active() && self.any_wants(direction, method, path)
    }

    // Never inlined, as `metrics::Metrics::http`: bench/run attributes its cost.
    #[inline(never)]
    fn any_wants(&self, direction: &str, method: &http::Method, path: &str) -> bool {
        self.lock()
            .iter()
            .any(|(_, f)| f.matches_head(direction, method, path))
    }

    /// The request's headers for the taps, redacted, when a tap's filter could
    /// match a request with this head (see [`Tap::wants`]). A method here, so the
    /// access module (whose record this module shows) never imports this one.
    #[inline]
    pub fn headers_if_wanted(
        &self,
        direction: &str,
        req: &http::Request<hyper::body::Incoming>,
    ) -> Option<BTreeMap<String, String>> {
        self.wants(direction, req.method(), req.uri().path())
            .then(|| redacted(req.headers()))
    }

    /// The event for a finished request, when a tap's whole filter matches it.
    #[inline]
    pub fn event(&self, record: &Record, headers: BTreeMap<String, String>) -> Option<TapEvent> {
        self.matches_any(record).then(|| TapEvent {
            record: record.clone(),
            headers,
        })
    }

    /// Whether a tap's whole filter matches this finished request.
    pub fn matches_any(&self, record: &Record) -> bool {
        self.lock().iter().any(|(_, f)| f.matches_record(record))
    }

    /// Starts tapping the requests `filter` matches.
    pub fn subscribe(&self, filter: Filter) -> Subscription<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Receiver and filter first, then the count: a request that sees the count
        // finds the filter.
        let rx = self.tx.subscribe();
        self.lock().push((id, filter));
        self.taps.fetch_add(1, Ordering::Relaxed);
        Subscription { tap: self, id, rx }
    }

    /// Publishes a finished request to the taps.
    pub fn publish(&self, event: TapEvent) {
        // No receiver left (the last tap just ended): nothing to do.
        let _ = self.tx.send(Arc::new(event));
    }
}

/// What a tap wants to see: every given field must match.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Filter {
    /// `inbound` or `outbound`.
    pub direction: Option<String>,
    /// Service, `name.namespace` or `name`.
    pub service: Option<String>,
    /// Path prefix.
    pub path: Option<String>,
    /// Method.
    pub method: Option<String>,
    /// Exact status, or a class such as `5xx`.
    pub status: Option<String>,
    /// Stop after this many events.
    pub limit: Option<u64>,
}

impl Filter {
    /// Parses `?direction=&service=&path=&method=&status=&limit=`; unknown keys and
    /// bad values are refused with what was wrong.
    pub fn parse(query: Option<&str>) -> Result<Filter, String> {
        let mut f = Filter::default();
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v).ok_or_else(|| format!("{k}: invalid percent-encoding"))?;
            f.set(k, v)?;
        }
        Ok(f)
    }

    /// The filter a control plane sent (empty fields match anything).
    pub fn from_proto(p: &sinew_api::v1::TapFilter) -> Result<Filter, String> {
        let mut f = Filter::default();
        for (k, v) in [
            ("direction", &p.direction),
            ("service", &p.service),
            ("path", &p.path),
            ("method", &p.method),
            ("status", &p.status),
        ] {
            if !v.is_empty() {
                f.set(k, v.clone())?;
            }
        }
        f.limit = (p.limit > 0).then_some(p.limit);
        Ok(f)
    }

    fn set(&mut self, k: &str, v: String) -> Result<(), String> {
        match k {
            "direction" if v == "inbound" || v == "outbound" => self.direction = Some(v),
            "direction" => return Err(format!("direction: {v:?} is not inbound or outbound")),
            "service" => self.service = Some(v),
            "path" => self.path = Some(v),
            "method" => self.method = Some(v.to_ascii_uppercase()),
            "status" => {
                let ok = v.len() == 3
                    && (v.bytes().all(|b| b.is_ascii_digit())
                        || (v.as_bytes()[0].is_ascii_digit() && &v[1..] == "xx"));
                if !ok {
                    return Err(format!(
                        "status: {v:?} is not a status (503) or a class (5xx)"
                    ));
                }
                self.status = Some(v);
            }
            "limit" => {
                self.limit = Some(
                    v.parse()
                        .map_err(|_| format!("limit: {v:?} is not a number"))?,
                )
            }
            other => {
                return Err(format!(
                    "unknown filter {other:?} (direction, service, path, method, status, limit)"
                ));
            }
        }
        Ok(())
    }

    /// True when `e` passes.
    pub fn matches(&self, e: &TapEvent) -> bool {
        self.matches_record(&e.record)
    }

    /// What can be checked when the request arrives.
    fn matches_head(&self, direction: &str, method: &http::Method, path: &str) -> bool {
        self.direction.as_deref().is_none_or(|d| d == direction)
            && self.path.as_deref().is_none_or(|p| path.starts_with(p))
            && self.method.as_deref().is_none_or(|m| m == method.as_str())
    }

    /// True when a finished request passes.
    pub fn matches_record(&self, e: &Record) -> bool {
        let service_ok = self.service.as_deref().is_none_or(|s| {
            e.service
                .as_deref()
                .is_some_and(|es| es == s || es.split('.').next() == Some(s))
        });
        let status_ok = self.status.as_deref().is_none_or(|s| {
            let code = itoa::Buffer::new().format(e.status).to_owned();
            if let Some(class) = s.strip_suffix("xx") {
                code.starts_with(class)
            } else {
                code == s
            }
        });
        self.matches_head(e.direction, &e.method, e.path()) && service_ok && status_ok
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(path: &str, status: u16) -> TapEvent {
        TapEvent {
            record: crate::access::tests::record(path, status),
            headers: BTreeMap::new(),
        }
    }

    #[test]
    fn only_listed_headers_show_their_values() {
        let mut h = http::HeaderMap::new();
        for (k, v) in [
            ("content-type", "application/json"),
            ("user-agent", "curl/8"),
            ("x-request-id", "req-1"),
            ("authorization", "Bearer s3cret"),
            ("x-auth-token", "s3cret"),
            ("x-amz-security-token", "s3cret"),
            ("cookie", "session=s3cret"),
            ("x-made-up", "s3cret"),
        ] {
            h.append(
                http::HeaderName::from_static(k),
                http::HeaderValue::from_static(v),
            );
        }
        let shown = redacted(&h);
        assert_eq!(shown["content-type"], "application/json");
        assert_eq!(shown["user-agent"], "curl/8");
        assert_eq!(shown["x-request-id"], "req-1");
        for k in [
            "authorization",
            "x-auth-token",
            "x-amz-security-token",
            "cookie",
            "x-made-up",
        ] {
            assert_eq!(shown[k], REDACTED, "{k}");
        }
        assert!(!format!("{shown:?}").contains("s3cret"), "{shown:?}");
        // The list is in the form the HeaderMap's names take.
        for k in SHOWN_HEADERS {
            assert_eq!(http::HeaderName::from_static(k).as_str(), *k);
        }
    }

    #[test]
    fn filters_parse_and_match() {
        let f = Filter::parse(Some(
            "service=catalog&path=%2Fapi&status=5xx&method=get&limit=3",
        ))
        .unwrap_or_default();
        assert_eq!(f.limit, Some(3));
        assert!(f.matches(&event("/api/x", 503)));
        assert!(!f.matches(&event("/api/x", 200)));
        assert!(!f.matches(&event("/other", 503)));
        assert!(Filter::parse(Some("status=5")).is_err());
        assert!(Filter::parse(Some("colour=red")).is_err());
        assert!(Filter::parse(Some("direction=sideways")).is_err());
        assert!(Filter::parse(Some("path=%zz")).is_err());
        let p = sinew_api::v1::TapFilter {
            service: "catalog".into(),
            path: "/api".into(),
            status: "5xx".into(),
            method: "get".into(),
            limit: 3,
            ..Default::default()
        };
        assert_eq!(Filter::from_proto(&p), Ok(f));
        let bad = sinew_api::v1::TapFilter {
            status: "teapot".into(),
            ..Default::default()
        };
        assert!(Filter::from_proto(&bad).is_err());
    }

    #[test]
    fn nothing_is_kept_while_nobody_taps_or_no_filter_matches() {
        let tap = Tap::default();
        let get = http::Method::GET;
        assert!(!tap.active());
        assert!(!tap.wants("outbound", &get, "/api"));
        let f =
            Filter::parse(Some("path=%2Fapi&direction=outbound&status=5xx")).unwrap_or_default();
        let sub = tap.subscribe(f);
        assert!(tap.active());
        assert!(tap.wants("outbound", &get, "/api/x"));
        assert!(!tap.wants("inbound", &get, "/api/x"), "direction");
        assert!(!tap.wants("outbound", &get, "/other"), "path");
        assert!(tap.matches_any(&event("/api/x", 503).record));
        assert!(!tap.matches_any(&event("/api/x", 200).record), "status");
        let all = tap.subscribe(Filter::default());
        assert!(tap.wants("inbound", &http::Method::POST, "/other"));
        drop(all);
        assert!(
            !tap.wants("inbound", &get, "/api/x"),
            "its filter went with it"
        );
        drop(sub);
        assert!(!tap.active());
        assert!(!tap.wants("outbound", &get, "/api/x"));
    }
}
