//! Reading and writing a request's trace context: W3C `traceparent`/`tracestate`,
//! B3 single-header (`b3`) and multi-header (`x-b3-*`).

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::propagation::TraceContextPropagator;

pub(super) const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub(super) const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub(super) const B3: HeaderName = HeaderName::from_static("b3");
pub(super) const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub(super) const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub(super) const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub(super) const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub(super) const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// Every header a context travels in: replaced as a whole at each hop, so a stale
/// half (say, `x-b3-parentspanid` from two hops back) never reaches the next.
pub(super) const CONTEXT_HEADERS: [HeaderName; 8] = [
    TRACEPARENT,
    TRACESTATE,
    B3,
    B3_TRACE_ID,
    B3_SPAN_ID,
    B3_PARENT_SPAN_ID,
    B3_SAMPLED,
    B3_FLAGS,
];

/// A decision B3 can carry without a context to attach it to (`b3: 0`), or the
/// absence of one (`x-b3-sampled` missing: "deferred", the receiver decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum B3Decision {
    Sample,
    Deny,
    Deferred,
}

/// The caller's context, and how it came (so the next hop gets it the same way).
pub(super) struct Incoming {
    pub(super) cx: Context,
    b3_single: bool,
    b3_multi: bool,
    /// The B3 trace id was 64-bit: B3 headers sent on keep that width.
    b3_short: bool,
}

pub(super) fn header<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// A B3 trace id: 32 hex digits, or 16 (the upper half then zero).
fn b3_trace_id(s: &str) -> Option<(TraceId, bool)> {
    if !(s.len() == 32 || s.len() == 16) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let id = u128::from_str_radix(s, 16).ok()?;
    (id != 0).then(|| (TraceId::from(id), s.len() == 16))
}

fn b3_span_id(s: &str) -> Option<SpanId> {
    if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let id = u64::from_str_radix(s, 16).ok()?;
    (id != 0).then(|| SpanId::from(id))
}

/// A B3 sampling state: `1`/`d` (debug implies sampled), `0`; `true`/`false` from
/// old multi-header senders.
fn b3_sampled(s: &str) -> Option<bool> {
    match s {
        "1" | "d" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// A B3 context: ids (with the width of the trace id) and decision.
type B3Context = (Option<(TraceId, bool, SpanId)>, Option<bool>);

fn b3_single(v: &str) -> Option<B3Context> {
    let mut parts = v.split('-');
    let first = parts.next()?;
    if let Some(decision) = b3_sampled(first).filter(|_| v.len() == 1) {
        // `b3: 0`, `b3: 1`, `b3: d`: a decision alone.
        return Some((None, Some(decision)));
    }
    let (trace, short) = b3_trace_id(first)?;
    let span = b3_span_id(parts.next()?)?;
    let sampled = match parts.next() {
        Some(s) => Some(b3_sampled(s)?),
        None => None,
    };
    Some((Some((trace, short, span)), sampled))
}

fn b3_multi(h: &HeaderMap) -> Option<B3Context> {
    let sampled = match header(h, &B3_FLAGS) {
        Some("1") => Some(true),
        _ => header(h, &B3_SAMPLED).and_then(b3_sampled),
    };
    let ids = match (header(h, &B3_TRACE_ID), header(h, &B3_SPAN_ID)) {
        (Some(t), Some(s)) => {
            let (trace, short) = b3_trace_id(t)?;
            Some((trace, short, b3_span_id(s)?))
        }
        _ => None,
    };
    (ids.is_some() || sampled.is_some()).then_some((ids, sampled))
}

/// Reads the caller's context: W3C first (it is the standard, and carries
/// `tracestate`), then single-header B3, then multi-header B3. A malformed header
/// counts as absent.
pub(super) fn extract(headers: &HeaderMap) -> Incoming {
    let b3_single_value = header(headers, &B3).and_then(b3_single);
    let b3_multi_value = b3_multi(headers);
    let mut incoming = Incoming {
        cx: Context::new(),
        b3_single: b3_single_value.is_some(),
        b3_multi: b3_multi_value.is_some(),
        b3_short: false,
    };
    let b3 = b3_single_value.or(b3_multi_value);
    let w3c = TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
    let w3c_trace = w3c.span().span_context().trace_id();
    if w3c_trace != TraceId::INVALID {
        // A sidecar upstream sends both; B3 keeps the width its sender chose.
        incoming.b3_short = matches!(b3, Some((Some((t, true, _)), _)) if t == w3c_trace);
        incoming.cx = w3c;
        return incoming;
    }
    if let Some((ids, sampled)) = b3 {
        let cx = match ids {
            Some((trace, short, span)) => {
                incoming.b3_short = short;
                let flags = if sampled == Some(true) {
                    TraceFlags::SAMPLED
                } else {
                    TraceFlags::default()
                };
                Context::new().with_remote_span_context(SpanContext::new(
                    trace,
                    span,
                    flags,
                    true,
                    TraceState::default(),
                ))
            }
            None => Context::new(),
        };
        incoming.cx = cx.with_value(match sampled {
            Some(true) => B3Decision::Sample,
            Some(false) => B3Decision::Deny,
            None => B3Decision::Deferred,
        });
    }
    incoming
}

/// Writes `sc` (the hop's span) as the context the next hop gets: W3C always, B3 in
/// the forms it came in; whatever context headers there were are replaced.
pub(super) fn inject(
    headers: &mut HeaderMap,
    sc: &SpanContext,
    parent: Option<SpanId>,
    incoming: &Incoming,
) {
    for h in &CONTEXT_HEADERS {
        headers.remove(h);
    }
    let sampled = sc.is_sampled();
    let put = |headers: &mut HeaderMap, name: HeaderName, value: String| {
        if let Ok(v) = HeaderValue::try_from(value) {
            headers.insert(name, v);
        }
    };
    put(
        headers,
        TRACEPARENT,
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            u8::from(sampled)
        ),
    );
    let state = sc.trace_state().header();
    if !state.is_empty() {
        put(headers, TRACESTATE, state);
    }
    if !(incoming.b3_single || incoming.b3_multi) {
        return;
    }
    let trace = sc.trace_id().to_string();
    let trace = if incoming.b3_short {
        trace[16..].to_owned()
    } else {
        trace
    };
    let flag = if sampled { "1" } else { "0" };
    if incoming.b3_single {
        let parent = parent.map(|p| format!("-{p}")).unwrap_or_default();
        put(
            headers,
            B3,
            format!("{trace}-{}-{flag}{parent}", sc.span_id()),
        );
    }
    if incoming.b3_multi {
        put(headers, B3_TRACE_ID, trace);
        put(headers, B3_SPAN_ID, sc.span_id().to_string());
        put(headers, B3_SAMPLED, flag.to_owned());
        if let Some(p) = parent {
            put(headers, B3_PARENT_SPAN_ID, p.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn ctx(i: &Incoming) -> SpanContext {
        i.cx.span().span_context().clone()
    }

    #[test]
    fn reads_w3c_first_then_b3_single_then_multi() {
        let w3c = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let i = extract(&headers(&[
            ("traceparent", w3c),
            ("tracestate", "vendor=x"),
            ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0"),
        ]));
        let sc = ctx(&i);
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(sc.trace_state().header(), "vendor=x");
        assert!(i.b3_single, "B3 is sent on as well");

        let i = extract(&headers(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        )]));
        let sc = ctx(&i);
        assert_eq!(
            sc.trace_id().to_string(),
            "80f198ee56343ba864fe8b2a57d3eff7"
        );
        assert_eq!(sc.span_id().to_string(), "e457b5a2e4d86bd1");
        assert!(sc.is_sampled());
        assert_eq!(i.cx.get::<B3Decision>(), Some(&B3Decision::Sample));

        let i = extract(&headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
        ]));
        let sc = ctx(&i);
        assert_eq!(
            sc.trace_id().to_string(),
            "0000000000000000463ac35c9f6413ad"
        );
        assert!(i.b3_multi && i.b3_short && !sc.is_sampled());
        assert_eq!(i.cx.get::<B3Decision>(), Some(&B3Decision::Deferred));

        let i = extract(&headers(&[("b3", "0")]));
        assert!(!ctx(&i).is_valid());
        assert_eq!(i.cx.get::<B3Decision>(), Some(&B3Decision::Deny));

        let i = extract(&headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-flags", "1"),
        ]));
        assert!(ctx(&i).is_sampled(), "debug implies sampled");

        for bad in [
            &[("traceparent", "00-zz-00f067aa0ba902b7-01")][..],
            &[("b3", "nope")],
            &[("b3", "80f198ee56343ba864fe8b2a57d3eff7-0000000000000000-1")],
            &[("x-b3-traceid", "463ac35c9f6413ad")],
        ] {
            let i = extract(&headers(bad));
            assert!(!ctx(&i).is_valid(), "{bad:?}");
        }
    }

    #[test]
    fn writes_w3c_always_and_b3_in_the_forms_it_came_in() {
        let sc = SpanContext::new(
            TraceId::from(0x463ac35c9f6413ad_u128),
            SpanId::from(0x1111_2222_3333_4444),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        let parent = Some(SpanId::from(0xa2fb4a1d1a96d312));
        let mut h = headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
            ("x-b3-parentspanid", "0000000000000abc"),
            ("tracestate", "stale=1"),
        ]);
        let incoming = extract(&h);
        inject(&mut h, &sc, parent, &incoming);
        assert_eq!(
            header(&h, &TRACEPARENT),
            Some("00-0000000000000000463ac35c9f6413ad-1111222233334444-01")
        );
        assert_eq!(header(&h, &TRACESTATE), None);
        assert_eq!(header(&h, &B3_TRACE_ID), Some("463ac35c9f6413ad"));
        assert_eq!(header(&h, &B3_SPAN_ID), Some("1111222233334444"));
        assert_eq!(header(&h, &B3_PARENT_SPAN_ID), Some("a2fb4a1d1a96d312"));
        assert_eq!(header(&h, &B3_SAMPLED), Some("1"));
        assert_eq!(header(&h, &B3), None);

        let mut h = headers(&[("b3", "0")]);
        let incoming = extract(&h);
        let unsampled = SpanContext::new(
            TraceId::from(7_u128),
            SpanId::from(9),
            TraceFlags::default(),
            false,
            TraceState::default(),
        );
        inject(&mut h, &unsampled, None, &incoming);
        assert_eq!(
            header(&h, &B3),
            Some("00000000000000000000000000000007-0000000000000009-0")
        );
        assert!(header(&h, &TRACEPARENT).is_some_and(|v| v.ends_with("-00")));

        let mut h = HeaderMap::new();
        inject(&mut h, &sc, None, &extract(&HeaderMap::new()));
        assert_eq!(h.len(), 1, "no B3 for a caller that sent none: {h:?}");
    }
}
