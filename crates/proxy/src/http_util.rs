//! Header and URI handling shared by the inbound and outbound sides.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Uri};
use http::{Request, Version};

use crate::error::ProxyError;
pub use crate::types::{GRPC_STATUS, TRACEPARENT};

/// Mesh header: the application port the peer sidecar forwards to.
pub const DST_PORT: HeaderName = HeaderName::from_static("sinew-dst-port");
/// Mesh header: the protocol the client originally spoke (`HTTP/1.1`), so the peer
/// sidecar speaks it to the application after the HTTP/2 hop.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("sinew-orig-proto");

/// To the application: the caller's SPIFFE id, verified by mTLS. Set (or removed) by
/// the inbound on every request, never taken from the client.
pub const PEER_IDENTITY: HeaderName = HeaderName::from_static("sinew-peer-identity");

/// Mesh response header: the inbound could not reach its application (refused,
/// timed out, shutting down), so the request was never seen and the client's sidecar
/// may send it to another endpoint. Set only by the inbound on its own answers;
/// removed from the application's responses and before the client sees the answer.
pub const UNSENT: HeaderName = HeaderName::from_static("sinew-unsent");

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// True for a request asking for a protocol upgrade (e.g. WebSocket) over HTTP/1.1.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v, "upgrade"))
}

/// True for an HTTP/2 extended CONNECT (RFC 8441: `:protocol`, e.g. a WebSocket an
/// HTTP/2 client opens), which becomes an HTTP/1.1 upgrade toward an app.
pub fn is_extended_connect<B>(req: &Request<B>) -> bool {
    req.method() == http::Method::CONNECT
        && req.extensions().get::<hyper::ext::Protocol>().is_some()
}

fn has_token(v: &HeaderValue, token: &str) -> bool {
    v.to_str()
        .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        .unwrap_or(false)
}

/// True for gRPC requests, which get gRPC-shaped errors.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Removes hop-by-hop headers, including those named in `Connection`. `te` is kept only
/// as `trailers` (gRPC needs it). With `keep_upgrade`, `Connection: upgrade` and
/// `Upgrade` survive, for forwarding an upgrade handshake.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of these: one pass over the names (comparisons of
    // known headers are cheap) spares a hashed removal per name on every request.
    if !headers
        .keys()
        .any(|k| *k == header::TE || HOP_BY_HOP.contains(k))
    {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        headers.remove(n);
    }
    let upgrade = keep_upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
    if let Some(te) = headers.get(header::TE) {
        if has_token(te, "trailers") {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            headers.remove(header::TE);
        }
    }
    if let Some(u) = upgrade {
        headers.insert(header::UPGRADE, u);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// True when any of `names` is present. For headers most messages lack, one pass over
/// the names present (comparisons, no hashing) is cheaper than a hashed lookup each.
pub fn carries_any(headers: &HeaderMap, names: &[HeaderName]) -> bool {
    headers.keys().any(|k| names.contains(k))
}

/// Removes the headers named `names`, checking first with [`carries_any`].
pub fn remove_headers(headers: &mut HeaderMap, names: &[HeaderName]) {
    if !carries_any(headers, names) {
        return;
    }
    for n in names {
        headers.remove(n);
    }
}

/// The request's authority: the URI's (absolute form, HTTP/2) or the Host header.
pub fn authority<B>(req: &Request<B>) -> Option<Authority> {
    if let Some(a) = req.uri().authority() {
        return Some(a.clone());
    }
    let host = req.headers().get(header::HOST)?.to_str().ok()?;
    Authority::try_from(host).ok()
}

/// The authority a connection's last request named in its Host header.
///
/// Why: an HTTP/1.1 keep-alive connection names the same host on every request, and
/// parsing it (a copy into a new buffer, then the parse) was ~600 instructions a
/// request (callgrind, one hop). A hit compares the header's bytes with the held
/// authority and clones it (a reference count).
#[derive(Debug, Default)]
pub struct LastHost(std::sync::Mutex<Option<Authority>>);

impl LastHost {
    /// [`authority`], remembering what the Host header parsed to.
    pub fn authority<B>(&self, req: &Request<B>) -> Option<Authority> {
        if let Some(a) = req.uri().authority() {
            return Some(a.clone());
        }
        let host = req.headers().get(header::HOST)?;
        if let Ok(last) = self.0.lock()
            && let Some(a) = last.as_ref()
            && a.as_str().as_bytes() == host.as_bytes()
        {
            return Some(a.clone());
        }
        let parsed = Authority::try_from(host.to_str().ok()?).ok()?;
        if let Ok(mut last) = self.0.lock() {
            *last = Some(parsed.clone());
        }
        Some(parsed)
    }
}

/// Rewrites the request head for the upstream version: HTTP/2 carries the authority
/// in an absolute URI and no Host header; HTTP/1.1 carries origin-form and Host.
pub fn set_target(
    parts: &mut http::request::Parts,
    authority: &Authority,
    path: Option<PathAndQuery>,
    upstream_h2: bool,
) -> Result<(), ProxyError> {
    let pq = match path {
        Some(p) => p,
        None => parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    };
    if upstream_h2 {
        parts.uri = Uri::builder()
            .scheme("http")
            .authority(authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|_| ProxyError::Malformed("invalid request target"))?;
        parts.headers.remove(header::HOST);
        parts.version = Version::HTTP_2;
    } else {
        parts.uri = Uri::from(pq);
        // Usually the Host header already names the authority: keep it then.
        let same = parts
            .headers
            .get(header::HOST)
            .is_some_and(|h| h.as_bytes() == authority.as_str().as_bytes());
        if !same {
            let host = HeaderValue::from_str(authority.as_str())
                .map_err(|_| ProxyError::Malformed("invalid authority"))?;
            parts.headers.insert(header::HOST, host);
        }
        parts.version = Version::HTTP_11;
    }
    Ok(())
}

/// Checks a request head where it enters the mesh, so that a bad request is
/// answered here (431, 400) and never reaches a connection shared with other
/// clients: the header limits (bytes counted as HTTP/2 does, name + value + 32), one
/// `Host` at most. Headers whose names carry an underscore are dropped: servers
/// behind CGI/WSGI conventions read `x_user` and `x-user` as the same header, so a
/// client could forge one the mesh sets (e.g. `sinew_peer_identity`), as Envoy's
/// `headers_with_underscores_action` guards against.
pub fn check_request_head(
    headers: &mut HeaderMap,
    limits: &crate::types::HeadLimits,
) -> Result<(), ProxyError> {
    let mut bytes = 0usize;
    let mut hosts = 0usize;
    let mut underscored = false;
    for (name, value) in headers.iter() {
        bytes += name.as_str().len() + value.len() + 32;
        if *name == header::HOST {
            hosts += 1;
        }
        underscored |= name.as_str().as_bytes().contains(&b'_');
    }
    if headers.len() > limits.request_headers {
        return Err(ProxyError::HeadersTooLarge(format!(
            "{} headers; at most {} are accepted",
            headers.len(),
            limits.request_headers
        )));
    }
    if bytes > limits.request_header_bytes {
        return Err(ProxyError::HeadersTooLarge(format!(
            "{bytes} bytes of headers; at most {} are accepted",
            limits.request_header_bytes
        )));
    }
    if hosts > 1 {
        return Err(ProxyError::Malformed("more than one Host header"));
    }
    if underscored {
        let names: Vec<HeaderName> = headers
            .keys()
            .filter(|n| n.as_str().as_bytes().contains(&b'_'))
            .cloned()
            .collect();
        for n in names {
            headers.remove(n);
        }
    }
    Ok(())
}

/// A listener's limits: its configured `limits` over the sidecar's flags. Header
/// limits can only be lowered per listener (hyper reads heads into a buffer sized
/// by the flags); the body limit, if any, is the listener's.
pub fn listener_limits(
    flags: &crate::types::HeadLimits,
    l: &sinew_model::resource::LimitsSpec,
) -> (crate::types::HeadLimits, Option<u64>) {
    let mut limits = *flags;
    if let Some(kb) = l.max_request_headers_kb {
        limits.request_header_bytes = limits.request_header_bytes.min(kb as usize * 1024);
    }
    if let Some(n) = l.max_request_headers {
        limits.request_headers = limits.request_headers.min(n as usize);
    }
    (limits, l.max_request_body_bytes)
}

/// Refuses a request whose declared length (`content-length`) is over `limit`.
pub fn check_declared_length(headers: &HeaderMap, limit: Option<u64>) -> Result<(), ProxyError> {
    let Some(limit) = limit else { return Ok(()) };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit => Err(ProxyError::BodyTooLarge(limit)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod head_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn last_host_gives_what_each_request_names() {
        let req = |host: &str, uri: &str| {
            Request::builder()
                .uri(uri)
                .header(header::HOST, host)
                .body(())
                .unwrap()
        };
        let last = LastHost::default();
        // The first parse, then the held one for the same header, then a new host.
        for (host, uri, want) in [
            ("a.example:8080", "/", Some("a.example:8080")),
            ("a.example:8080", "/x", Some("a.example:8080")),
            ("b.example", "/", Some("b.example")),
            ("a.example:8080", "/", Some("a.example:8080")),
            // The absolute form's authority wins over Host, as `authority` says.
            ("a.example", "http://c.example/", Some("c.example")),
            // A Host that is no authority is none, whatever was held.
            ("bad host", "/", None),
        ] {
            let r = req(host, uri);
            let got = last.authority(&r);
            assert_eq!(got.as_ref().map(Authority::as_str), want, "{host} {uri}");
            assert_eq!(got, authority(&r), "{host} {uri}");
        }
    }

    #[test]
    fn oversized_or_doubled_heads_are_refused_and_underscores_dropped() {
        let limits = crate::types::HeadLimits {
            request_header_bytes: 1024,
            request_headers: 4,
            ..Default::default()
        };
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("sinew_peer_identity", HeaderValue::from_static("forged"));
        h.insert("x_user", HeaderValue::from_static("forged"));
        check_request_head(&mut h, &limits).unwrap();
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-a"));

        let mut big = HeaderMap::new();
        big.insert("x-big", HeaderValue::from_str(&"a".repeat(1000)).unwrap());
        let e = check_request_head(&mut big, &limits).unwrap_err();
        assert_eq!(
            e.status(),
            http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );

        let mut many = HeaderMap::new();
        for i in 0..5 {
            many.insert(
                HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        let e = check_request_head(&mut many, &limits).unwrap_err();
        assert_eq!(e.reason().as_str(), "headers-too-large");

        let mut hosts = HeaderMap::new();
        hosts.append(header::HOST, HeaderValue::from_static("a"));
        hosts.append(header::HOST, HeaderValue::from_static("b"));
        let e = check_request_head(&mut hosts, &limits).unwrap_err();
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
    }
}
