//! Typed values of document fields that are not a standard type: URLs (the OTLP
//! collector, a JWKS endpoint), URL paths, local file paths, SPIFFE id prefixes and
//! Kubernetes names. Each is a [`Parse`] type, read as a [`crate::parsed::Parsed`]
//! field, so a document that was read holds only values the compiler can use.
//!
//! URLs are [`http::Uri`] (already in every dependent's tree); no `url` crate.

use std::fmt;
use std::path::{Path, PathBuf};

use http::Uri;
use http::uri::{Authority, PathAndQuery};

use crate::parsed::Parse;
use crate::resource::OtlpProtocol;

/// An OTLP collector (`MeshConfig.spec.tracing.endpoint`): plain `http://host[:port]`
/// with an optional path and no query.
///
/// The exporter is built without TLS to keep the proxy lean: collectors are reached
/// over a node-local or loopback hop, so `https://` is refused with that reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpEndpoint {
    /// The host, an IPv6 address in brackets.
    host: String,
    port: Option<u16>,
    /// The path without trailing slashes; empty for none.
    path: String,
}

impl OtlpEndpoint {
    /// The path without trailing slashes (empty for none). A gRPC collector takes
    /// none: [`crate::validate`] refuses one, knowing the protocol.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The complete URL spans are sent to over `protocol`: the port defaults to 4317
    /// for gRPC and 4318 for HTTP, and an HTTP endpoint without a path gets the
    /// standard `/v1/traces`. A gRPC endpoint's path (refused by validation) is not
    /// used.
    pub fn url(&self, protocol: OtlpProtocol) -> String {
        let (default_port, path) = match protocol {
            OtlpProtocol::Grpc => (4317, ""),
            OtlpProtocol::HttpProtobuf if self.path.is_empty() => (4318, "/v1/traces"),
            OtlpProtocol::HttpProtobuf => (4318, self.path.as_str()),
        };
        let port = self.port.unwrap_or(default_port);
        format!("http://{}:{port}{path}", self.host)
    }
}

impl Parse for OtlpEndpoint {
    fn parse(text: &str) -> Result<Self, String> {
        let uri = text
            .parse::<Uri>()
            .map_err(|e| format!("{text:?} is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(format!(
                    "{text:?}: https is not supported; send to a collector (or agent) reachable over http://"
                ));
            }
            _ => return Err(format!("{text:?} is not an http:// URL")),
        }
        let host = match uri.host() {
            Some(h) if !h.is_empty() => h,
            _ => return Err(format!("{text:?} names no host")),
        };
        if uri.query().is_some() {
            return Err(format!("{text:?}: a query is not allowed"));
        }
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        Ok(OtlpEndpoint {
            host,
            port: uri.port_u16(),
            path: uri.path().trim_end_matches('/').to_owned(),
        })
    }
}

/// An `https://` URL with a host (a JWKS `uri`). Keys fetched over plain HTTP could
/// be swapped by anyone on the path, and with them every token: `http://` is refused
/// with that reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsUrl(Uri);

impl HttpsUrl {
    /// The URL.
    pub fn uri(&self) -> &Uri {
        &self.0
    }
}

impl Parse for HttpsUrl {
    fn parse(text: &str) -> Result<Self, String> {
        match text.parse::<Uri>() {
            Ok(uri)
                if uri.scheme_str() == Some("https")
                    && uri.host().is_some_and(|h| !h.is_empty()) =>
            {
                Ok(HttpsUrl(uri))
            }
            Ok(uri) if uri.scheme_str() == Some("http") => Err(format!(
                "{text:?}: http:// is refused (keys could be tampered with on the way); use https://"
            )),
            _ => Err(format!("{text:?} is not an https:// URL")),
        }
    }
}

/// A local file's path (a JWKS `file`, a `caFile`): not empty, no NUL byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPath(PathBuf);

impl LocalPath {
    /// The path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Parse for LocalPath {
    fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("the path must not be empty".to_owned());
        }
        if text.contains('\0') {
            return Err(format!("{text:?} is not a file path (it holds a NUL byte)"));
        }
        Ok(LocalPath(PathBuf::from(text)))
    }
}

/// An absolute URL path without query or fragment (a URL rewrite's new path or
/// prefix): it starts with `/`, and every character is one a request path may hold,
/// so a rewritten request is always a valid one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlPath(String);

impl UrlPath {
    /// The path.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UrlPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Parse for UrlPath {
    fn parse(text: &str) -> Result<Self, String> {
        if !text.starts_with('/') {
            return Err(format!("{text:?} must start with '/'"));
        }
        if text.contains(['?', '#']) {
            return Err(format!("{text:?}: a path has no query or fragment"));
        }
        PathAndQuery::try_from(text).map_err(|_| format!("{text:?} is not a valid URL path"))?;
        Ok(UrlPath(text.to_owned()))
    }
}

/// A request's path and optional query (a health check's `path`): it starts with
/// `/`, and every character is one a request target may hold.
impl Parse for PathAndQuery {
    fn parse(text: &str) -> Result<Self, String> {
        if !text.starts_with('/') {
            return Err(format!("{text:?} must start with '/'"));
        }
        if text.contains('#') {
            return Err(format!("{text:?}: a request has no fragment"));
        }
        PathAndQuery::try_from(text).map_err(|_| format!("{text:?} is not a valid URL path"))
    }
}

/// A host (and optional port) to send a request to: a URL rewrite's `hostname`.
impl Parse for Authority {
    fn parse(text: &str) -> Result<Self, String> {
        match Authority::try_from(text) {
            Ok(a) if !a.host().is_empty() => Ok(a),
            _ => Err(format!("{text:?} is not a valid hostname")),
        }
    }
}

/// A prefix of SPIFFE ids (`principalPrefixes`): `spiffe://<trust-domain>` and
/// anything after it, e.g. `spiffe://cluster.local/ns/shop/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffePrefix(String);

impl SpiffePrefix {
    /// The prefix.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Parse for SpiffePrefix {
    fn parse(text: &str) -> Result<Self, String> {
        match text.strip_prefix("spiffe://") {
            Some(rest)
                if !rest.is_empty()
                    && crate::spiffe::valid_trust_domain(rest.split('/').next().unwrap_or("")) =>
            {
                Ok(SpiffePrefix(text.to_owned()))
            }
            _ => Err(format!(
                "{text:?} is not a SPIFFE id prefix (spiffe://<trust-domain>/...)"
            )),
        }
    }
}

/// A request principal pattern (`from.requestPrincipals`): `issuer/subject` of a
/// verified JWT, `*` for any verified token, or a prefix ending in `*`. A `*`
/// anywhere else would be taken literally, which is never what was meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPrincipal(String);

impl RequestPrincipal {
    /// The pattern.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Parse for RequestPrincipal {
    fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() || (text != "*" && text.trim_end_matches('*').contains('*')) {
            return Err(format!(
                "{text:?}: use \"issuer/subject\", \"*\", or a prefix ending in '*'"
            ));
        }
        Ok(RequestPrincipal(text.to_owned()))
    }
}

/// A Kubernetes DNS-1123 label: what a namespace is. At most 63 lowercase letters,
/// digits and `-`, starting and ending with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DnsLabel(String);

/// The reason a namespace is refused, as Kubernetes words its rule.
pub const LABEL_RULE: &str = "a DNS-1123 label: at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit";

/// The reason a name is refused, as Kubernetes words its rule.
pub const SUBDOMAIN_RULE: &str = "a DNS-1123 subdomain: at most 253 characters, dot-separated labels of lowercase letters, digits and '-', each starting and ending with a letter or digit";

fn is_label(s: &str) -> bool {
    s.len() <= 63 && label_shape(s)
}

/// Lowercase letters, digits and `-`, a letter or digit at both ends (no length cap:
/// a subdomain's labels may be longer than a label's 63).
fn label_shape(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.as_bytes()
            .first()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && s.as_bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric())
}

impl DnsLabel {
    /// The label.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `s` is a DNS-1123 label.
    pub fn is_valid(s: &str) -> bool {
        is_label(s)
    }
}

impl Parse for DnsLabel {
    fn parse(text: &str) -> Result<Self, String> {
        if is_label(text) {
            Ok(DnsLabel(text.to_owned()))
        } else {
            Err(format!("{text:?} is not a valid namespace ({LABEL_RULE})"))
        }
    }
}

/// A Kubernetes DNS-1123 subdomain: what most objects' names are. At most 253
/// characters; dot-separated labels of lowercase letters, digits and `-`, each
/// starting and ending with a letter or digit (a label here may be longer than 63,
/// as Kubernetes allows).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DnsSubdomain(String);

impl DnsSubdomain {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `s` is a DNS-1123 subdomain.
    pub fn is_valid(s: &str) -> bool {
        s.len() <= 253 && s.split('.').all(label_shape)
    }
}

impl Parse for DnsSubdomain {
    fn parse(text: &str) -> Result<Self, String> {
        if DnsSubdomain::is_valid(text) {
            Ok(DnsSubdomain(text.to_owned()))
        } else {
            Err(format!("{text:?} is not a valid name ({SUBDOMAIN_RULE})"))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn otlp_endpoints_get_their_protocol_defaults() {
        let e = OtlpEndpoint::parse("http://otel").unwrap();
        assert_eq!(e.url(OtlpProtocol::Grpc), "http://otel:4317");
        assert_eq!(
            e.url(OtlpProtocol::HttpProtobuf),
            "http://otel:4318/v1/traces"
        );
        let e = OtlpEndpoint::parse("http://[::1]:9/otlp/").unwrap();
        assert_eq!(e.path(), "/otlp");
        assert_eq!(e.url(OtlpProtocol::HttpProtobuf), "http://[::1]:9/otlp");
    }

    #[test]
    fn names_follow_kubernetes() {
        for ok in ["a", "shop", "a-1", "0a"] {
            assert!(DnsLabel::is_valid(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"a".repeat(64)] {
            assert!(!DnsLabel::is_valid(bad), "{bad}");
        }
        for ok in ["a.b", "catalog-v2", "x.y-z.0", &"a".repeat(100)] {
            assert!(DnsSubdomain::is_valid(ok), "{ok}");
        }
        for bad in ["", "a..b", ".a", "a.", "a.-b", "A", &"a".repeat(254)] {
            assert!(!DnsSubdomain::is_valid(bad), "{bad}");
        }
    }

    #[test]
    fn hostnames_and_paths() {
        assert!(Authority::parse("internal.catalog").is_ok());
        assert!(Authority::parse("internal.catalog:8080").is_ok());
        for bad in ["", "a b", "a/b"] {
            assert!(Authority::parse(bad).is_err(), "{bad:?}");
        }
        assert!(UrlPath::parse("/v2/").is_ok());
        for bad in ["v2", "/a b", "/a?b", "/a#b"] {
            assert!(UrlPath::parse(bad).is_err(), "{bad:?}");
        }
    }
}
