//! Compiled request matching with Gateway API precedence.
//!
//! Every `(route, rule, match)` becomes one [`RouteEntry`]; entries of all routes
//! attached to a service port are sorted once, at compile time, so a request walks a
//! flat list and takes the first entry that matches.
//!
//! Order (Gateway API HTTPRoute precedence): exact path, then the longest path prefix,
//! then regular-expression paths (implementation-specific in the spec: Sinew puts them
//! after prefixes, longest pattern first); then a method match; then more header
//! matches; then more query-parameter matches; then the oldest route
//! (`metadata.creationTimestamp`), then `namespace/name` alphabetically; then rule and
//! match order within the route.

use std::cmp::Reverse;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, Method};
use serde::{Serialize, Serializer};

use crate::compile::RuleConfig;

/// A compiled regular expression matched against a whole value.
#[derive(Debug, Clone)]
pub struct Pattern {
    source: String,
    re: regex::Regex,
}

impl Pattern {
    /// Compiles `source`, anchored at both ends.
    pub fn new(source: &str) -> Result<Pattern, regex::Error> {
        let re = regex::Regex::new(&format!("^(?:{source})$"))?;
        Ok(Pattern {
            source: source.to_owned(),
            re,
        })
    }

    /// The pattern as written (unanchored).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// True when the whole of `s` matches.
    pub fn is_match(&self, s: &str) -> bool {
        self.re.is_match(s)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

/// A path condition.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", content = "value")]
pub enum PathMatcher {
    /// Exact path.
    Exact(String),
    /// Element-wise prefix, stored without a trailing `/` (`""` for `/`).
    PathPrefix(String),
    /// Whole-path regular expression.
    RegularExpression(Pattern),
}

impl PathMatcher {
    /// Builds a prefix matcher, normalising the trailing slash.
    pub fn prefix(value: &str) -> PathMatcher {
        PathMatcher::PathPrefix(value.trim_end_matches('/').to_owned())
    }

    /// True when `path` satisfies the condition.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatcher::Exact(p) => path == p,
            PathMatcher::PathPrefix(p) => {
                path.starts_with(p.as_str())
                    && (path.len() == p.len() || path.as_bytes().get(p.len()) == Some(&b'/'))
            }
            PathMatcher::RegularExpression(re) => re.is_match(path),
        }
    }

    /// Length of the matched prefix, for `ReplacePrefixMatch`.
    pub fn prefix_len(&self) -> Option<usize> {
        match self {
            PathMatcher::PathPrefix(p) => Some(p.len()),
            _ => None,
        }
    }

    fn rank(&self) -> (u8, Reverse<usize>) {
        match self {
            PathMatcher::Exact(p) => (0, Reverse(p.len())),
            PathMatcher::PathPrefix(p) => (1, Reverse(p.len())),
            PathMatcher::RegularExpression(re) => (2, Reverse(re.source.len())),
        }
    }
}

/// A header or query-parameter value condition.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", content = "value")]
pub enum ValueMatcher {
    /// Exact value.
    Exact(String),
    /// Whole-value regular expression.
    RegularExpression(Pattern),
}

impl ValueMatcher {
    /// True when `v` satisfies the condition.
    pub fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatcher::Exact(e) => e == v,
            ValueMatcher::RegularExpression(re) => re.is_match(v),
        }
    }
}

/// One compiled `HTTPRouteMatch`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestMatch {
    /// Path condition.
    pub path: PathMatcher,
    /// Method condition.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_method")]
    pub method: Option<Method>,
    /// Header conditions (name, value).
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "ser_headers")]
    pub headers: Vec<(HeaderName, ValueMatcher)>,
    /// Query-parameter conditions (name, value).
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "ser_params")]
    pub query_params: Vec<(String, ValueMatcher)>,
}

fn ser_method<S: Serializer>(m: &Option<Method>, s: S) -> Result<S::Ok, S::Error> {
    match m {
        Some(m) => s.serialize_str(m.as_str()),
        None => s.serialize_none(),
    }
}

/// A value condition as `/config` shows it: its kind, not the value (a route may
/// match on an API key or a token in a header or the query).
struct Redacted<'a>(&'a ValueMatcher);

impl Serialize for Redacted<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let kind = match self.0 {
            ValueMatcher::Exact(_) => "Exact",
            ValueMatcher::RegularExpression(_) => "RegularExpression",
        };
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("type", kind)?;
        m.serialize_entry("value", crate::compile::REDACTED)?;
        m.end()
    }
}

fn ser_headers<S: Serializer>(h: &[(HeaderName, ValueMatcher)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(h.iter().map(|(n, v)| (n.as_str(), Redacted(v))))
}

fn ser_params<S: Serializer>(q: &[(String, ValueMatcher)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(q.iter().map(|(n, v)| (n.as_str(), Redacted(v))))
}

impl RequestMatch {
    /// True when the request satisfies every condition.
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        if !self.path.matches(req.path) {
            return false;
        }
        if let Some(m) = &self.method
            && m != req.method
        {
            return false;
        }
        for (name, vm) in &self.headers {
            let any = req
                .headers
                .get_all(name)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| vm.matches(v)));
            if !any {
                return false;
            }
        }
        for (name, vm) in &self.query_params {
            // The first occurrence of a parameter counts, as Gateway API specifies.
            match query_param(req.query, name) {
                Some(v) if vm.matches(&v) => {}
                _ => return false,
            }
        }
        true
    }

    fn precedence(&self) -> impl Ord {
        (
            self.path.rank(),
            self.method.is_none(),
            Reverse(self.headers.len()),
            Reverse(self.query_params.len()),
        )
    }
}

/// The parts of a request that routing looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// Method.
    pub method: &'a Method,
    /// Path without the query.
    pub path: &'a str,
    /// Raw query string, without `?`.
    pub query: Option<&'a str>,
    /// Request headers.
    pub headers: &'a HeaderMap,
}

/// First value of query parameter `name`, percent-decoded (`+` as space).
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    let query = query?;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(k) == name {
            return Some(percent_decode(v));
        }
    }
    None
}

fn percent_decode(s: &str) -> String {
    if !s.contains(['%', '+']) {
        return s.to_owned();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One entry of a route table: a match and the rule it selects.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteEntry {
    /// The condition.
    #[serde(rename = "match")]
    pub matcher: RequestMatch,
    /// The selected rule.
    pub rule: Arc<RuleConfig>,
}

/// Sort key beyond the match itself: route age, route name, rule and match index.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteOrder {
    /// Route creation timestamp; routes without one sort after dated ones.
    pub created: Option<String>,
    /// `namespace/name`.
    pub name: String,
    /// Rule index within the route.
    pub rule: usize,
    /// Match index within the rule.
    pub matcher: usize,
}

/// All routing for one service port, in precedence order.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct RouteTable {
    entries: Vec<RouteEntry>,
}

impl RouteTable {
    /// Sorts entries into Gateway API precedence.
    pub fn new(mut entries: Vec<(RouteEntry, RouteOrder)>) -> RouteTable {
        entries.sort_by(|(a, ao), (b, bo)| {
            a.matcher
                .precedence()
                .cmp(&b.matcher.precedence())
                .then_with(|| match (&ao.created, &bo.created) {
                    (Some(x), Some(y)) => x.cmp(y),
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (None, None) => std::cmp::Ordering::Equal,
                })
                .then_with(|| ao.cmp(bo))
        });
        RouteTable {
            entries: entries.into_iter().map(|(e, _)| e).collect(),
        }
    }

    /// The first entry matching the request.
    pub fn select(&self, req: &RequestView<'_>) -> Option<&RouteEntry> {
        self.entries.iter().find(|e| e.matcher.matches(req))
    }

    /// Entries in precedence order.
    pub fn entries(&self) -> &[RouteEntry] {
        &self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_matches_whole_segments() {
        let m = PathMatcher::prefix("/foo/");
        assert!(m.matches("/foo"));
        assert!(m.matches("/foo/"));
        assert!(m.matches("/foo/bar"));
        assert!(!m.matches("/foobar"));
        // Without the trailing slash too (Gateway API: `/api` never matches `/apiadmin`).
        let api = PathMatcher::prefix("/api");
        assert!(api.matches("/api"));
        assert!(api.matches("/api/"));
        assert!(api.matches("/api/x"));
        assert!(!api.matches("/apiadmin"));
        assert!(!api.matches("/ap"));
        let root = PathMatcher::prefix("/");
        assert!(root.matches("/"));
        assert!(root.matches("/anything"));
    }

    #[test]
    fn regex_is_anchored() {
        let p = Pattern::new("/api/v[0-9]+").unwrap();
        assert!(p.is_match("/api/v2"));
        assert!(!p.is_match("/api/v2/extra"));
        assert!(!p.is_match("/x/api/v2"));
    }

    #[test]
    fn query_params_are_decoded_and_first_wins() {
        assert_eq!(
            query_param(Some("a=1&b=x%20y&a=2"), "a").as_deref(),
            Some("1")
        );
        assert_eq!(
            query_param(Some("a=1&b=x%20y"), "b").as_deref(),
            Some("x y")
        );
        assert_eq!(query_param(Some("q=a+b"), "q").as_deref(), Some("a b"));
        assert_eq!(
            query_param(Some("bad=%zz%"), "bad").as_deref(),
            Some("%zz%")
        );
        assert_eq!(query_param(None, "a"), None);
    }
}
