//! SPIFFE ids: `spiffe://<trust-domain>/ns/<namespace>/sa/<account>`.
//!
//! One parser ([`parse_spiffe`], borrowing, allocation-free for the request path) and
//! an owned [`SpiffeId`] built on it.

use std::fmt;
use std::str::FromStr;

/// A parsed SPIFFE id, borrowing the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpiffeRef<'a> {
    /// The trust domain.
    pub trust_domain: &'a str,
    /// The path, starting with `/`.
    pub path: &'a str,
}

impl<'a> SpiffeRef<'a> {
    /// The namespace of a `/ns/<namespace>/...` id.
    pub fn namespace(&self) -> Option<&'a str> {
        let mut parts = self.path.split('/').skip(1);
        match (parts.next(), parts.next()) {
            (Some("ns"), Some(ns)) if !ns.is_empty() => Some(ns),
            _ => None,
        }
    }
}

/// True for a valid SPIFFE trust domain: lower-case letters, digits, `.`, `-`, `_`.
pub fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

/// True for a name usable as one SPIFFE path segment and a service account name:
/// lower-case letters, digits, `-`, `.`, starting and ending with a letter or digit.
pub fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.as_bytes()
            .first()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && s.as_bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric())
}

/// Parses a SPIFFE id per the SPIFFE spec: `spiffe://<trust-domain>/<path>`, with a
/// lower-case trust domain, a non-empty path of non-empty segments of
/// `[A-Za-z0-9.-_]` other than `.` and `..`, and no query, fragment, port or user info.
pub fn parse_spiffe(s: &str) -> Result<SpiffeRef<'_>, String> {
    let bad = |why: &str| format!("{s:?} is not a SPIFFE id: {why}");
    let rest = s
        .strip_prefix("spiffe://")
        .ok_or_else(|| bad("it must start with spiffe://"))?;
    let (td, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if !valid_trust_domain(td) {
        return Err(bad("invalid trust domain"));
    }
    if path.is_empty() || path == "/" {
        return Err(bad("the path is empty"));
    }
    for seg in path.split('/').skip(1) {
        if seg.is_empty() || seg == "." || seg == ".." {
            return Err(bad("empty, '.' or '..' path segment"));
        }
        if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(bad("invalid character in the path"));
        }
    }
    Ok(SpiffeRef {
        trust_domain: td,
        path,
    })
}

/// The SPIFFE id of a service account: `spiffe://<td>/ns/<namespace>/sa/<account>`.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// A SPIFFE id: `spiffe://<trust-domain><path>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    path: String,
}

impl SpiffeId {
    /// The id of a workload's service account:
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<account>`.
    pub fn workload(trust_domain: &str, namespace: &str, account: &str) -> SpiffeId {
        SpiffeId {
            trust_domain: trust_domain.to_ascii_lowercase(),
            path: format!("/ns/{namespace}/sa/{account}"),
        }
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `(namespace, service account)` of a workload id, exactly
    /// `/ns/<namespace>/sa/<account>`; `None` for any other path (e.g. an operator's).
    pub fn workload_parts(&self) -> Option<(&str, &str)> {
        let mut parts = self.path.split('/').skip(1);
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None)
                if !ns.is_empty() && !sa.is_empty() =>
            {
                Some((ns, sa))
            }
            _ => None,
        }
    }

    /// The namespace of a `/ns/<ns>/sa/<sa>` id.
    pub fn namespace(&self) -> Option<&str> {
        let mut parts = self.path.split('/').skip(1);
        match (parts.next(), parts.next()) {
            (Some("ns"), Some(ns)) => Some(ns),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = String;

    /// Parses with [`parse_spiffe`].
    fn from_str(s: &str) -> Result<SpiffeId, String> {
        let r = parse_spiffe(s)?;
        Ok(SpiffeId {
            trust_domain: r.trust_domain.to_owned(),
            path: r.path.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), Some("shop"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(SpiffeId::workload("cluster.local", "shop", "web"), id);
    }

    #[test]
    fn refuses_malformed_ids() {
        for bad in [
            "http://x/y",
            "spiffe://",
            "spiffe://td",
            "spiffe://td/",
            "spiffe://TD/a",
            "spiffe://td/a//b",
            "spiffe://td/a/../b",
            "spiffe://td/a?q=1",
            "spiffe://td:443/a",
            "spiffe://user@td/a",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} should be refused");
        }
    }
}
