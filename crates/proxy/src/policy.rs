//! The inbound's security check: end-user authentication (JWT, 401) then
//! authorization (403), for one HTTP request or one TCP connection / CONNECT tunnel.
//!
//! [`check`] is what the inbound calls before forwarding. On success it returns the
//! verified token, if any: the caller then calls [`apply_token`] so the application
//! sees only the proxy's forwarded-claim headers (never a client's) and, unless the
//! rule says otherwise, not the token itself. [`check_with_decision`] also returns the
//! authorization [`Decision`], for metrics by policy and rule.

use std::time::SystemTime;

use http::{HeaderMap, StatusCode};
use sinew_model::authz::{Decision, HttpAttributes, RequestAttributes, evaluate};
use sinew_model::compile::InboundConfig;

use crate::jwt::{JwtVerifier, VerifiedToken};

/// Why a request (or connection) is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// 401 for authentication, 403 for authorization.
    pub status: StatusCode,
    /// Stable reason for `sinew-error` and metrics: a JWT reason (`jwt-expired`,
    /// `jwks-unavailable`, ...) or `forbidden`.
    pub reason: &'static str,
    /// One line: the JWT problem, or the policy and rule that refused.
    pub detail: String,
    /// The authorization decision, when authorization refused.
    pub decision: Option<Decision>,
}

impl std::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

impl std::error::Error for PolicyError {}

/// Checks one request (`req: Some`) or one TCP connection / CONNECT tunnel
/// (`req: None`) at the inbound.
///
/// - `verifier` must be built from `inbound.jwt` (it may be `None` only when that is
///   empty; otherwise a request is refused with `jwks-unavailable`, failing closed);
/// - `source` is the peer's SPIFFE id from mTLS, `None` for plaintext;
/// - `port` is the application port.
///
/// A request with an invalid token is refused with 401 and the JWT reason, one
/// without a token passes authentication; authorization then allows it or refuses it
/// with 403 `forbidden` (the detail names the policy and rule, or the default).
pub fn check(
    inbound: &InboundConfig,
    verifier: Option<&JwtVerifier>,
    source: Option<&str>,
    port: u16,
    req: Option<&http::request::Parts>,
) -> Result<Option<VerifiedToken>, PolicyError> {
    check_with_decision(inbound, verifier, source, port, req, SystemTime::now()).map(|(t, _)| t)
}

/// [`check`], at a given time, also returning the authorization decision of an
/// allowed request (for metrics).
pub fn check_with_decision(
    inbound: &InboundConfig,
    verifier: Option<&JwtVerifier>,
    source: Option<&str>,
    port: u16,
    req: Option<&http::request::Parts>,
    now: SystemTime,
) -> Result<(Option<VerifiedToken>, Decision), PolicyError> {
    let token = match req {
        Some(parts) if !inbound.jwt.is_empty() => match verifier {
            Some(v) => v.verify(&parts.headers, now).map_err(|e| PolicyError {
                status: StatusCode::UNAUTHORIZED,
                reason: e.reason,
                detail: e.detail,
                decision: None,
            })?,
            None => {
                return Err(PolicyError {
                    status: StatusCode::UNAUTHORIZED,
                    reason: "jwks-unavailable",
                    detail: "JWT rules are configured but no verifier is running".into(),
                    decision: None,
                });
            }
        },
        _ => None,
    };
    let principal = token.as_ref().map(VerifiedToken::principal);
    let attrs = RequestAttributes {
        source,
        port,
        l7: req.map(|p| HttpAttributes {
            method: &p.method,
            path: p.uri.path(),
            headers: &p.headers,
            request_principal: principal.as_deref(),
            claims: token.as_ref().map(|t| &t.claims),
        }),
    };
    let decision = evaluate(&inbound.authz, &attrs);
    if decision.allowed {
        Ok((token, decision))
    } else {
        Err(PolicyError {
            status: StatusCode::FORBIDDEN,
            reason: "forbidden",
            detail: decision.reason.clone(),
            decision: Some(decision),
        })
    }
}

/// Admits a mesh peer's verified identity at the inbound only if it is in the mesh's
/// trust domain. A chain that verifies to a root of the bundle is not enough: a
/// root may be shared with (or an operator's intermediate may sign for) another
/// trust domain, whose `spiffe://other/ns/shop/sa/web` must not pass for this
/// mesh's `shop/web` in `principals`, rate-limit keys or the app's
/// `sinew-peer-identity`.
///
/// `mesh` is the mesh's trust domain (`None` before any configuration and
/// certificate is known: then no identity can be judged, and is refused). A peer
/// certificate without a SPIFFE id yields `Ok(None)`, as before. The error is one
/// line naming the id and the trust domain expected.
pub fn admit_peer(
    id: Option<sinew_tls::SpiffeId>,
    mesh: Option<&str>,
) -> Result<Option<sinew_tls::SpiffeId>, String> {
    match (id, mesh) {
        (None, _) => Ok(None),
        (Some(id), Some(td)) if id.trust_domain().eq_ignore_ascii_case(td) => Ok(Some(id)),
        (Some(id), Some(td)) => Err(format!(
            "peer {id} is not in the mesh's trust domain {td:?}"
        )),
        (Some(id), None) => Err(format!(
            "peer {id}: the mesh's trust domain is not known yet"
        )),
    }
}

/// Prepares an allowed request's headers for the application: removes every header
/// a forwarded claim may be written to (whatever the client sent), then sets the
/// verified token's forwarded claims, and removes the token's header unless its rule
/// keeps it (`forwardOriginalToken`).
pub fn apply_token(
    inbound: &InboundConfig,
    headers: &mut HeaderMap,
    token: Option<&VerifiedToken>,
) {
    for rule in &inbound.jwt {
        for f in &rule.forward_claims {
            headers.remove(&f.header);
        }
    }
    if let Some(t) = token {
        if !t.forward_original_token {
            headers.remove(&t.header);
        }
        for (name, value) in &t.forward {
            headers.append(name.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::jwt::testkeys::*;
    use http::{HeaderValue, Method, Request};
    use serde_json::json;
    use sinew_model::compile::compile_text;

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const OPS: &str = "spiffe://cluster.local/ns/ops/sa/admin";

    fn inbound(policies: &str) -> InboundConfig {
        let jwks = jwks(&[jwk("k1", K1_X, K1_Y)]);
        let yaml = format!(
            r#"
apiVersion: sinew.dev/v1alpha1
kind: Proxy
metadata: {{name: catalog-1, namespace: shop}}
spec:
  inbound: {{bind: "127.0.0.1:4143", ports: [8080, 5432]}}
---
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {{name: catalog, namespace: shop}}
spec: {{ports: [{{name: http, port: 80}}, {{name: db, port: 5432, protocol: TCP}}]}}
---
apiVersion: sinew.dev/v1alpha1
kind: Workload
metadata: {{name: catalog-1, namespace: shop}}
spec: {{service: catalog, address: 127.0.0.1, ports: {{http: 8080, db: 5432}}}}
---
apiVersion: sinew.dev/v1alpha1
kind: RequestAuthentication
metadata: {{name: users, namespace: shop}}
spec:
  targetRef: {{kind: Service, name: catalog}}
  jwtRules:
    - issuer: https://issuer.example
      audiences: [catalog]
      jwks: {{inline: '{jwks}'}}
      forwardClaims: [{{claim: sub, header: x-jwt-sub}}]
{policies}"#
        );
        compile_text("t.yaml", &yaml, None)
            .unwrap()
            .inbound
            .unwrap()
    }

    const POLICIES: &str = r#"---
apiVersion: sinew.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: catalog, namespace: shop}
spec:
  targetRef: {name: catalog}
  rules:
    - from: {namespaces: [shop]}
      to: {methods: [GET], pathPrefixes: [/api/]}
    - from: {requestPrincipals: ["https://issuer.example/*"]}
      to: {methods: [POST]}
      when: [{claim: role, values: [editor]}]
    - from: {principals: ["spiffe://cluster.local/ns/shop/sa/web"]}
      to: {ports: [5432]}
---
apiVersion: sinew.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-ops, namespace: shop}
spec:
  action: DENY
  rules:
    - from: {namespaces: [ops]}
"#;

    fn token(claims: serde_json::Value) -> String {
        es256(K1_PEM, "k1", &claims)
    }

    fn claims(role: &str) -> serde_json::Value {
        let exp = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        json!({"iss": "https://issuer.example", "sub": "alice", "aud": "catalog", "exp": exp, "role": role})
    }

    fn parts(method: Method, path: &str, bearer: Option<&str>) -> http::request::Parts {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(t) = bearer {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b = b.header("x-jwt-sub", "forged");
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn authentication_then_authorization() {
        let inb = inbound(POLICIES);
        let v = JwtVerifier::new(&inb.jwt);
        // Mesh caller in the namespace, no token: allowed by rule 0.
        let p = parts(Method::GET, "/api/items", None);
        assert_eq!(check(&inb, Some(&v), Some(WEB), 8080, Some(&p)), Ok(None));
        // Wrong method: no ALLOW rule matches.
        let p = parts(Method::DELETE, "/api/items", None);
        let e = check(&inb, Some(&v), Some(WEB), 8080, Some(&p)).unwrap_err();
        assert_eq!((e.status, e.reason), (StatusCode::FORBIDDEN, "forbidden"));
        assert!(e.detail.contains("shop/catalog"), "{e}");
        // A bad token is a 401, before authorization.
        let p = parts(Method::GET, "/api/items", Some("not.a.token"));
        let e = check(&inb, Some(&v), Some(WEB), 8080, Some(&p)).unwrap_err();
        assert_eq!(
            (e.status, e.reason),
            (StatusCode::UNAUTHORIZED, "jwt-malformed")
        );
        let p = parts(
            Method::GET,
            "/api/items",
            Some(&es256(K2_PEM, "k1", &claims("x"))),
        );
        let e = check(&inb, Some(&v), Some(WEB), 8080, Some(&p)).unwrap_err();
        assert_eq!(
            (e.status, e.reason),
            (StatusCode::UNAUTHORIZED, "jwt-bad-signature")
        );
        // POST needs a verified editor token (plaintext caller: no peer identity).
        let p = parts(Method::POST, "/api/items", None);
        let e = check(&inb, Some(&v), None, 8080, Some(&p)).unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        let p = parts(Method::POST, "/api/items", Some(&token(claims("viewer"))));
        let e = check(&inb, Some(&v), None, 8080, Some(&p)).unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        let p = parts(Method::POST, "/api/items", Some(&token(claims("editor"))));
        let (t, d) =
            check_with_decision(&inb, Some(&v), None, 8080, Some(&p), SystemTime::now()).unwrap();
        let t = t.unwrap();
        assert_eq!(t.principal(), "https://issuer.example/alice");
        assert_eq!(
            d.reason,
            "allowed by AuthorizationPolicy shop/catalog rule 1"
        );
        // Deny wins, whatever else matches.
        let p = parts(Method::GET, "/api/items", Some(&token(claims("editor"))));
        let e = check(&inb, Some(&v), Some(OPS), 8080, Some(&p)).unwrap_err();
        assert_eq!(e.detail, "denied by AuthorizationPolicy shop/no-ops rule 0");
    }

    #[test]
    fn tcp_connections_use_l4_fields() {
        let inb = inbound(POLICIES);
        let v = JwtVerifier::new(&inb.jwt);
        assert_eq!(check(&inb, Some(&v), Some(WEB), 5432, None), Ok(None));
        // Rule 0 has L7 fields: it never allows TCP, even from the namespace.
        let e = check(
            &inb,
            Some(&v),
            Some("spiffe://cluster.local/ns/shop/sa/other"),
            5432,
            None,
        )
        .unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        let e = check(&inb, Some(&v), Some(OPS), 5432, None).unwrap_err();
        assert!(e.detail.contains("shop/no-ops"), "{e}");
    }

    #[test]
    fn defaults_and_missing_verifier() {
        let inb = inbound("");
        let v = JwtVerifier::new(&inb.jwt);
        let p = parts(Method::GET, "/", None);
        assert_eq!(check(&inb, Some(&v), None, 8080, Some(&p)), Ok(None));
        // A verifier is required once JWT rules exist: fail closed.
        let e = check(&inb, None, None, 8080, Some(&p)).unwrap_err();
        assert_eq!(
            (e.status, e.reason),
            (StatusCode::UNAUTHORIZED, "jwks-unavailable")
        );
        // ... but TCP never looks at tokens.
        assert_eq!(check(&inb, None, None, 5432, None), Ok(None));
        let deny_all = inbound(
            "---\napiVersion: sinew.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: shop}\nspec: {defaultAction: DENY}\n",
        );
        let e = check(&deny_all, Some(&v), Some(WEB), 8080, Some(&p)).unwrap_err();
        assert_eq!(e.detail, "default deny (namespace)");
    }

    #[test]
    fn only_peers_of_the_mesh_trust_domain_are_admitted() {
        // One CA signs for two trust domains (a shared or federated root): both
        // chains verify, only the mesh's trust domain is admitted.
        let ca =
            sinew_tls::Ca::generate("cluster.local", std::time::Duration::from_secs(3600)).unwrap();
        let leaf = |td: &str| {
            let (_, csr) = sinew_tls::new_key_and_csr().unwrap();
            let id = sinew_tls::SpiffeId::workload(td, "shop", "web");
            let issued = ca
                .sign_csr(&csr, &id, std::time::Duration::from_secs(600))
                .unwrap();
            let certs = sinew_tls::certs_from_pem("leaf", &issued.chain_pem).unwrap();
            sinew_tls::peer_identity(Some(&certs))
        };
        let ours = leaf("cluster.local");
        assert_eq!(
            admit_peer(ours.clone(), Some("cluster.local"))
                .unwrap()
                .map(|i| i.to_string())
                .as_deref(),
            Some(WEB)
        );
        let foreign = leaf("evil.example");
        assert_eq!(
            foreign.as_ref().map(|i| i.trust_domain()),
            Some("evil.example")
        );
        let e = admit_peer(foreign, Some("cluster.local")).unwrap_err();
        assert_eq!(
            e,
            "peer spiffe://evil.example/ns/shop/sa/web is not in the mesh's trust domain \"cluster.local\""
        );
        // Nothing to judge against yet: refused, not waved through.
        assert!(admit_peer(ours, None).is_err());
        // No SPIFFE id at all is what it was: no identity.
        assert_eq!(admit_peer(None, Some("cluster.local")), Ok(None));
    }

    #[test]
    fn forwarded_claims_replace_what_the_client_sent() {
        let inb = inbound("");
        let v = JwtVerifier::new(&inb.jwt);
        // Without a token, a client's copy of a forwarded-claim header is removed.
        let mut p = parts(Method::GET, "/", None);
        let t = check(&inb, Some(&v), None, 8080, Some(&p)).unwrap();
        apply_token(&inb, &mut p.headers, t.as_ref());
        assert!(p.headers.get("x-jwt-sub").is_none());
        // With one, the verified value is set and the token removed.
        let mut p = parts(Method::GET, "/", Some(&token(claims("x"))));
        let t = check(&inb, Some(&v), None, 8080, Some(&p)).unwrap();
        apply_token(&inb, &mut p.headers, t.as_ref());
        assert_eq!(
            p.headers.get_all("x-jwt-sub").iter().collect::<Vec<_>>(),
            vec![HeaderValue::from_static("alice")]
        );
        assert!(p.headers.get("authorization").is_none());
    }
}
