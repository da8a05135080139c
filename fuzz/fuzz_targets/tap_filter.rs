//! Tap filters: the query string of the admin API's `/tap` (and what `sinew tap`
//! sends), parsed into a filter.
//!
//! Property: a filter that parses, written back as a query string (each value
//! percent-encoded), parses to the same filter.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sinew_proxy::tap::Filter;

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(f) = Filter::parse(Some(query)) else {
        return;
    };
    let mut pairs = Vec::new();
    for (k, v) in [
        ("direction", &f.direction),
        ("service", &f.service),
        ("path", &f.path),
        ("method", &f.method),
        ("status", &f.status),
    ] {
        if let Some(v) = v {
            pairs.push(format!("{k}={}", encode(v)));
        }
    }
    if let Some(l) = f.limit {
        pairs.push(format!("limit={l}"));
    }
    let again = Filter::parse(Some(&pairs.join("&")))
        .unwrap_or_else(|e| panic!("{f:?} written back does not parse: {e}"));
    assert_eq!(again, f);
});
