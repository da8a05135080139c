//! SPIFFE ids.

use std::fmt;
use std::str::FromStr;

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

    /// Parses per the SPIFFE spec: lower-case trust domain of `[a-z0-9.-_]`, a
    /// non-empty path of segments of `[A-Za-z0-9.-_]`, no `.`/`..` segments, no query,
    /// fragment, port or user info.
    fn from_str(s: &str) -> Result<SpiffeId, String> {
        let bad = |why: &str| format!("{s:?} is not a SPIFFE id: {why}");
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("it must start with spiffe://"))?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if td.is_empty()
            || !td.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            })
        {
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
        Ok(SpiffeId {
            trust_domain: td.to_owned(),
            path: path.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
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
