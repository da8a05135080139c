//! `MeshConfig` identity settings, `AuthorizationPolicy` and `RequestAuthentication`.

use std::collections::{BTreeMap, HashSet};

use super::core_group;
use crate::error::ConfigErrors;
use crate::resource::*;
use crate::set::{Checker, Resources, key};
/// Header names a forwarded claim may not overwrite: the proxy's own, hop-by-hop and
/// framing headers.
const RESERVED_FORWARD_HEADERS: [&str; 10] = [
    "host",
    "x-forwarded-client-cert",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "te",
    "upgrade",
    "keep-alive",
    "proxy-connection",
];

impl Resources {
    /// The Service a policy's `targetRef` names, if it is a valid reference.
    fn check_target(&self, c: &mut Checker<'_>, ns: &str, t: &PolicyTargetRef) {
        if !core_group(t.group.as_deref()) || t.kind.as_deref().is_some_and(|k| k != "Service") {
            c.fail(
                "spec.targetRef",
                "only a Service (group \"\", kind Service) can be targeted",
            );
            return;
        }
        if !self.services.contains_key(&(ns.to_owned(), t.name.clone())) {
            c.fail(
                "spec.targetRef.name",
                format!("service {ns}/{} does not exist", t.name),
            );
        }
    }

    pub(super) fn validate_security(&self, errors: &mut ConfigErrors) {
        if let Some(m) = &self.mesh {
            let k = key(&m.metadata);
            let mut c = self.checker(errors, "MeshConfig", &k);
            if let Some(td) = &m.spec.trust_domain
                && !crate::authz::valid_trust_domain(td)
            {
                c.fail(
                    "spec.trustDomain",
                    format!(
                        "{td:?} is not a valid trust domain (lowercase letters, digits, '.', '-', '_')"
                    ),
                );
            }
        }
        let mut defaults: BTreeMap<&str, &str> = BTreeMap::new();
        for (k, p) in &self.authorization_policies {
            let mut c = self.checker(errors, "AuthorizationPolicy", k);
            if let Some(t) = &p.spec.target_ref {
                self.check_target(&mut c, &k.0, t);
                if p.spec.default_action.is_some() {
                    c.fail(
                        "spec.defaultAction",
                        "defaultAction is only allowed on a policy without targetRef (it is the namespace's default)",
                    );
                }
            } else if p.spec.default_action.is_some() {
                match defaults.entry(k.0.as_str()) {
                    std::collections::btree_map::Entry::Occupied(prev) => c.fail(
                        "spec.defaultAction",
                        format!(
                            "namespace {:?} already has its default set by AuthorizationPolicy {}/{}",
                            k.0,
                            k.0,
                            prev.get()
                        ),
                    ),
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(k.1.as_str());
                    }
                }
            }
            if p.spec.rules.is_empty() && p.spec.default_action.is_none() {
                c.fail(
                    "spec.rules",
                    "a policy needs rules (or, without targetRef, a defaultAction); to refuse everything by default use defaultAction: DENY",
                );
            }
            for (ri, rule) in p.spec.rules.iter().enumerate() {
                check_authz_rule(&mut c, &format!("spec.rules[{ri}]"), rule);
            }
        }
        for (k, ra) in &self.request_authentications {
            let mut c = self.checker(errors, "RequestAuthentication", k);
            if let Some(t) = &ra.spec.target_ref {
                self.check_target(&mut c, &k.0, t);
            }
            if ra.spec.jwt_rules.is_empty() {
                c.fail("spec.jwtRules", "list at least one issuer");
            }
            let mut issuers = HashSet::new();
            for (ri, rule) in ra.spec.jwt_rules.iter().enumerate() {
                let f = format!("spec.jwtRules[{ri}]");
                if rule.issuer.is_empty() {
                    c.fail(format!("{f}.issuer"), "the issuer must not be empty");
                } else if !issuers.insert(rule.issuer.as_str()) {
                    c.fail(
                        format!("{f}.issuer"),
                        format!("issuer {:?} is listed twice", rule.issuer),
                    );
                }
                for (ai, a) in rule.audiences.iter().enumerate() {
                    if a.is_empty() {
                        c.fail(
                            format!("{f}.audiences[{ai}]"),
                            "an audience must not be empty",
                        );
                    }
                }
                check_jwks(&mut c, &format!("{f}.jwks"), &rule.jwks);
                for (fi, fc) in rule.forward_claims.iter().enumerate() {
                    let ff = format!("{f}.forwardClaims[{fi}]");
                    if fc.claim.is_empty() {
                        c.fail(format!("{ff}.claim"), "the claim must not be empty");
                    }
                    let h = fc.header.get();
                    if h.as_str().starts_with("sinew-")
                        || RESERVED_FORWARD_HEADERS.contains(&h.as_str())
                        || rule.from_headers.iter().any(|t| t.name.get() == h)
                        || (rule.from_headers.is_empty() && h == http::header::AUTHORIZATION)
                    {
                        c.fail(
                            format!("{ff}.header"),
                            format!(
                                "{:?} is reserved (proxy, framing or token header)",
                                fc.header.as_str()
                            ),
                        );
                    }
                }
                // A long skew turns an expired (or not yet valid) token into a
                // valid one: bounded like other verifiers' leeway.
                if let Some(skew) = &rule.clock_skew
                    && skew.value() > MAX_CLOCK_SKEW
                {
                    c.fail(
                        format!("{f}.clockSkew"),
                        format!(
                            "{:?} is too long: at most {}s",
                            skew.as_str(),
                            MAX_CLOCK_SKEW.as_secs()
                        ),
                    );
                }
                for (qi, q) in rule.required_claims.iter().enumerate() {
                    if q.name.is_empty() {
                        c.fail(
                            format!("{f}.requiredClaims[{qi}].name"),
                            "the claim must not be empty",
                        );
                    }
                }
            }
        }
    }
}

fn check_authz_rule(c: &mut Checker<'_>, f: &str, rule: &AuthorizationRule) {
    // `from` (principals and their prefixes, namespaces, request principals) and
    // `to.paths` were parsed when the document was read.
    if let Some(to) = &rule.to {
        for (i, p) in to.ports.iter().enumerate() {
            if *p == 0 {
                c.fail(format!("{f}.to.ports[{i}]"), "port must be 1-65535");
            }
        }
        // `paths` and `pathPrefixes` were parsed when the document was read.
    }
    for (i, w) in rule.when.iter().enumerate() {
        if w.claim.is_empty() {
            c.fail(
                format!("{f}.when[{i}].claim"),
                "the claim must not be empty",
            );
        }
        if w.values.is_empty() {
            c.fail(
                format!("{f}.when[{i}].values"),
                "list at least one accepted value",
            );
        }
    }
}

/// The longest `clockSkew` a JWT rule may set.
pub const MAX_CLOCK_SKEW: std::time::Duration = std::time::Duration::from_secs(300);

fn check_jwks(c: &mut Checker<'_>, f: &str, j: &JwksSpec) {
    let set = [j.file.is_some(), j.uri.is_some(), j.inline.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if set != 1 {
        c.fail(f.to_owned(), "set exactly one of file, uri, inline");
    }
    // `file`, `uri` and `caFile` were parsed when the document was read: a path, and
    // an https:// URL (keys fetched over plain HTTP could be swapped by anyone on
    // the path, and with them every token).
    if j.ca_file.is_some() && j.uri.is_none() {
        c.fail(format!("{f}.caFile"), "caFile needs an https:// uri");
    }
    if let Some(r) = &j.refresh {
        if j.uri.is_none() {
            c.fail(format!("{f}.refresh"), "refresh needs a uri");
        }
        if r.as_secs() < 1 {
            c.fail(format!("{f}.refresh"), "refresh must be at least 1s");
        }
    }
}
