//! The authorization path normaliser: what a request's path becomes before
//! `AuthorizationPolicy` paths are matched against it.
//!
//! Properties: the result is an absolute path with no empty, `.` or `..` segment
//! (but a trailing slash) and no query; normalising it again changes nothing (so a
//! policy cannot be bypassed by encoding a path twice over); and it is covered by
//! itself as a prefix.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sinew_model::authz::{normalize_path, path_prefix_matches};

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let n = normalize_path(path);
    assert!(n.starts_with('/'), "{path:?} -> {n:?} is not absolute");
    assert!(!n.contains('?'), "{path:?} -> {n:?} keeps a query");
    assert!(!n.contains('\\'), "{path:?} -> {n:?} keeps a backslash");
    let body = n.strip_suffix('/').unwrap_or(&n);
    for seg in body.split('/').skip(1) {
        assert!(
            !seg.is_empty() && seg != "." && seg != "..",
            "{path:?} -> {n:?} has segment {seg:?}"
        );
    }
    let again = normalize_path(&n);
    assert_eq!(again, n, "normalising {path:?} twice differs");
    assert!(path_prefix_matches(&n, &n));
});
