//! `grpc-timeout` (and `sinew-timeout-ms`): the deadline a caller's request carries,
//! which bounds the time the proxy spends on it.
//!
//! Properties: a parsed timeout, formatted again as the proxy forwards it, parses
//! to the same time to the millisecond (rounded down, at least 1 ms, at most the
//! format's 8 digits); the request's deadline is the shorter of the two headers.
#![no_main]

use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use sinew_proxy::resilience::{
    GRPC_TIMEOUT, TIMEOUT_HEADER, format_grpc_timeout, incoming_timeout, parse_grpc_timeout,
};

fuzz_target!(|data: &[u8]| {
    // Two header values, split at the first 0 byte.
    let mut parts = data.splitn(2, |b| *b == 0);
    let grpc = parts.next().unwrap_or_default();
    let ours = parts.next().unwrap_or_default();
    let parsed = std::str::from_utf8(grpc).ok().and_then(parse_grpc_timeout);
    if let Some(d) = parsed {
        let text = format_grpc_timeout(d);
        let back = parse_grpc_timeout(&text)
            .unwrap_or_else(|| panic!("{d:?} formats as {text:?}, which does not parse"));
        let ms = d.as_millis().clamp(1, 99_999_999);
        assert_eq!(back, Duration::from_millis(ms as u64), "{d:?} -> {text:?}");
    }
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(grpc) {
        headers.insert(GRPC_TIMEOUT, v);
    }
    if let Ok(v) = HeaderValue::from_bytes(ours) {
        headers.insert(TIMEOUT_HEADER, v);
    }
    let t = incoming_timeout(&headers);
    if let Some(d) = parsed {
        assert!(
            t.is_some_and(|t| t <= d),
            "{t:?} is longer than grpc-timeout {d:?}"
        );
    }
});
