//! `kind: RoutePolicy`: Sinew's extensions of a Gateway API route, attached to it as a
//! policy (the GEP-713 pattern: `spec.targetRef` names the route, and `sectionName` one
//! of its rules by `name`).
//!
//! The upstream `HTTPRoute` schema has no room for what Sinew adds to a rule (retry
//! budgets, hedging, gRPC retry codes, fault injection): a cluster running the upstream
//! CRDs prunes those fields or refuses the `Fault` filter. A `RoutePolicy` carries them
//! instead, beside the route, in files as on Kubernetes; the route's own upstream fields
//! (`timeouts`, `retry` of the experimental channel, `RequestMirror`) stay in the route.
//!
//! How a policy applies ([`effective_route`]): to every rule of its route, or only to the
//! rule named `sectionName`. A rule's `retry` and `timeouts` are overlaid field by field
//! (what the policy sets wins, the rest stays the route's); `fault` replaces the rule's
//! `Fault` filter, if it had one. Policies for the whole route apply first, then those for
//! one rule. At most one policy targets a route (or one of its rules): a second is
//! refused, as a second `TrafficPolicy` for a Service is.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::ConfigErrors;
use crate::resource::{
    FaultSpec, FilterType, GATEWAY_GROUP, HttpRouteFilter, HttpRouteSpec, HttpRouteTimeouts,
    Object, RetrySpec,
};
use crate::set::{Key, Resources};
use crate::validate::{check_filter, check_retry, check_timeouts};

/// The name a `GRPCRoute` has once read as an `HTTPRoute` (gRPC calls are HTTP/2
/// requests): `grpcroute.<name>`. A policy targeting `GRPCRoute` `x` applies to it.
pub const GRPC_ROUTE_PREFIX: &str = "grpcroute.";

/// The route kinds a `RoutePolicy` can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum RouteKind {
    /// A Gateway API `HTTPRoute`.
    #[serde(rename = "HTTPRoute")]
    HttpRoute,
    /// A Gateway API `GRPCRoute` (read from Kubernetes as the `HTTPRoute`
    /// `grpcroute.<name>`).
    #[serde(rename = "GRPCRoute")]
    GrpcRoute,
}

/// The route (and optionally the rule) a `RoutePolicy` applies to, in the policy's
/// namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteTargetRef {
    /// API group; `gateway.networking.k8s.io` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: RouteKind,
    /// The route's name.
    pub name: String,
    /// The `name` of one of the route's rules; absent: every rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

impl RouteTargetRef {
    /// The name of the `HTTPRoute` document this target stands for.
    pub fn route_name(&self) -> String {
        match self.kind {
            RouteKind::HttpRoute => self.name.clone(),
            RouteKind::GrpcRoute => format!("{GRPC_ROUTE_PREFIX}{}", self.name),
        }
    }
}

/// `kind: RoutePolicy`: retries (with a budget and hedging), fault injection and
/// timeouts for a Gateway API route or one of its rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RoutePolicySpec {
    /// The route (GEP-713 `targetRef`), in the policy's namespace.
    pub target_ref: RouteTargetRef,
    /// Retries: overlaid on the rule's own `retry`, field by field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    /// Delays and aborts for a share of the rule's requests (replaces the rule's
    /// `Fault` filter, if it has one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultSpec>,
    /// Timeouts: overlaid on the rule's own `timeouts`, field by field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<HttpRouteTimeouts>,
}

/// The reason prefix of a policy whose target does not exist (Gateway API's
/// `TargetNotFound`), so a status writer can report it as the condition's reason.
pub const TARGET_NOT_FOUND: &str = "TargetNotFound";

impl Resources {
    /// Checks every `RoutePolicy`: its target exists (route, and rule when named), no
    /// other policy targets the same, and its fields are valid.
    pub(crate) fn validate_route_policies(&self, errors: &mut ConfigErrors) {
        let mut targeted: BTreeMap<(String, String, Option<String>), String> = BTreeMap::new();
        for (k, p) in &self.route_policies {
            let mut c = self.checker(errors, "RoutePolicy", k);
            let t = &p.spec.target_ref;
            let kind = match t.kind {
                RouteKind::HttpRoute => "HTTPRoute",
                RouteKind::GrpcRoute => "GRPCRoute",
            };
            if t.group.as_deref().is_some_and(|g| g != GATEWAY_GROUP) {
                c.fail(
                    "spec.targetRef.group",
                    format!("only {GATEWAY_GROUP} routes can be targeted"),
                );
            } else {
                match self.routes.get(&(k.0.clone(), t.route_name())) {
                    None => c.fail(
                        "spec.targetRef.name",
                        format!(
                            // On Kubernetes a refused route is left out: it is
                            // then missing here too.
                            "{TARGET_NOT_FOUND}: {kind} {}/{} does not exist (or is not accepted)",
                            k.0, t.name
                        ),
                    ),
                    Some(route) => {
                        if let Some(section) = &t.section_name
                            && !route
                                .spec
                                .rules
                                .iter()
                                .any(|r| r.name.as_deref() == Some(section))
                        {
                            c.fail(
                                "spec.targetRef.sectionName",
                                format!(
                                    "{TARGET_NOT_FOUND}: {kind} {}/{} has no rule named {section:?}",
                                    k.0, t.name
                                ),
                            );
                        } else if let Some(other) = targeted.insert(
                            (k.0.clone(), t.route_name(), t.section_name.clone()),
                            k.1.clone(),
                        ) {
                            let what = match &t.section_name {
                                Some(s) => format!("rule {s:?} of {kind} {}/{}", k.0, t.name),
                                None => format!("{kind} {}/{}", k.0, t.name),
                            };
                            c.fail(
                                "spec.targetRef",
                                format!("{what} already has RoutePolicy {other}"),
                            );
                        }
                    }
                }
            }
            let s = &p.spec;
            if s.retry.is_none() && s.fault.is_none() && s.timeouts.is_none() {
                c.fail(
                    "spec",
                    "give retry, fault or timeouts: the policy does nothing",
                );
            }
            if let Some(r) = &s.retry {
                check_retry(&mut c, "spec.retry", r);
            }
            if let Some(t) = &s.timeouts {
                check_timeouts(&mut c, "spec.timeouts", t);
            }
            if let Some(f) = &s.fault {
                check_filter(&mut c, "spec", &fault_filter(f), false);
            }
        }
    }
}

fn fault_filter(f: &FaultSpec) -> HttpRouteFilter {
    HttpRouteFilter {
        kind: FilterType::Fault,
        request_header_modifier: None,
        response_header_modifier: None,
        url_rewrite: None,
        request_mirror: None,
        fault: Some(f.clone()),
    }
}

/// `over`'s fields where it sets them, `base`'s elsewhere.
fn overlay_retry(base: Option<&RetrySpec>, over: &RetrySpec) -> RetrySpec {
    let Some(base) = base else {
        return over.clone();
    };
    RetrySpec {
        attempts: over.attempts.or(base.attempts),
        codes: over.codes.clone().or_else(|| base.codes.clone()),
        grpc_codes: if over.grpc_codes.is_empty() {
            base.grpc_codes.clone()
        } else {
            over.grpc_codes.clone()
        },
        backoff: over.backoff.clone().or_else(|| base.backoff.clone()),
        non_idempotent: over.non_idempotent || base.non_idempotent,
        budget: over.budget.clone().or_else(|| base.budget.clone()),
        hedge: over.hedge.clone().or_else(|| base.hedge.clone()),
    }
}

fn overlay_timeouts(
    base: Option<&HttpRouteTimeouts>,
    over: &HttpRouteTimeouts,
) -> HttpRouteTimeouts {
    HttpRouteTimeouts {
        request: over
            .request
            .clone()
            .or_else(|| base.and_then(|b| b.request.clone())),
        backend_request: over
            .backend_request
            .clone()
            .or_else(|| base.and_then(|b| b.backend_request.clone())),
    }
}

/// The route `key` as proxies run it: with the `RoutePolicy`s that target it applied
/// (borrowed unchanged when none does).
pub fn effective_route<'a>(
    res: &Resources,
    key: &Key,
    route: &'a Object<HttpRouteSpec>,
) -> Cow<'a, Object<HttpRouteSpec>> {
    let mut policies: Vec<&RoutePolicySpec> = res
        .route_policies
        .iter()
        .filter(|((ns, _), p)| *ns == key.0 && p.spec.target_ref.route_name() == key.1)
        .map(|(_, p)| &p.spec)
        .collect();
    if policies.is_empty() {
        return Cow::Borrowed(route);
    }
    // Whole-route policies first, so a rule's own policy wins.
    policies.sort_by_key(|p| p.target_ref.section_name.is_some());
    let mut out = route.clone();
    for p in policies {
        for rule in &mut out.spec.rules {
            if let Some(section) = &p.target_ref.section_name
                && rule.name.as_ref() != Some(section)
            {
                continue;
            }
            if let Some(r) = &p.retry {
                rule.retry = Some(overlay_retry(rule.retry.as_ref(), r));
            }
            if let Some(t) = &p.timeouts {
                rule.timeouts = Some(overlay_timeouts(rule.timeouts.as_ref(), t));
            }
            if let Some(f) = &p.fault {
                rule.filters.retain(|x| x.kind != FilterType::Fault);
                rule.filters.push(fault_filter(f));
            }
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::load::parse_documents;
    use crate::parsed::Parsed;

    const BASE: &str = r#"
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {name: web, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: web}]
  rules:
    - name: api
      matches: [{path: {value: /api}}]
      retry: {attempts: 3, codes: [503]}
      timeouts: {request: 5s}
    - name: rest
"#;

    fn resources(extra: &str) -> Result<Resources, ConfigErrors> {
        let docs = parse_documents("t.yaml", &format!("{BASE}---\n{extra}")).unwrap();
        Resources::from_documents(docs)
    }

    fn errors(extra: &str) -> String {
        resources(extra).unwrap_err().to_string()
    }

    #[test]
    fn a_policy_overlays_retry_timeouts_and_fault_on_its_rule() {
        let res = resources(
            r#"
apiVersion: sinew.dev/v1alpha1
kind: RoutePolicy
metadata: {name: web-api, namespace: shop}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: web, sectionName: api}
  retry: {budget: {ratio: 0.1}, hedge: {delay: 50ms}}
  timeouts: {backendRequest: 1s}
  fault: {abort: {httpStatus: 418, percent: 100}}
"#,
        )
        .unwrap();
        let key = ("shop".to_owned(), "web".to_owned());
        let route = effective_route(&res, &key, &res.routes[&key]);
        let api = &route.spec.rules[0];
        let retry = api.retry.as_ref().unwrap();
        assert_eq!(retry.attempts, Some(3), "the route's own fields stay");
        assert_eq!(retry.codes, Some(vec![503]));
        assert_eq!(retry.budget.as_ref().unwrap().ratio, Some(0.1));
        assert_eq!(
            retry
                .hedge
                .as_ref()
                .unwrap()
                .delay
                .as_ref()
                .map(Parsed::as_str),
            Some("50ms")
        );
        let t = api.timeouts.as_ref().unwrap();
        assert_eq!(
            (
                t.request.as_ref().map(Parsed::as_str),
                t.backend_request.as_ref().map(Parsed::as_str)
            ),
            (Some("5s"), Some("1s"))
        );
        assert_eq!(api.filters.len(), 1);
        assert_eq!(api.filters[0].kind, FilterType::Fault);
        // The other rule is untouched.
        assert_eq!(route.spec.rules[1], res.routes[&key].spec.rules[1]);
        // And the compiled config carries the fault and the budget.
        let cfg = crate::compile::compile_text(
            "t.yaml",
            &format!(
                "{BASE}---\n{}",
                r#"
apiVersion: sinew.dev/v1alpha1
kind: RoutePolicy
metadata: {name: web-api, namespace: shop}
spec:
  targetRef: {kind: HTTPRoute, name: web}
  fault: {abort: {httpStatus: 418, percent: 100}}
---
apiVersion: sinew.dev/v1alpha1
kind: Proxy
metadata: {name: client, namespace: shop}
spec: {outbound: {upstreams: [{bind: "127.0.0.1:9001", service: web}]}}
"#
            ),
            None,
        )
        .unwrap();
        let text = format!("{cfg:?}");
        assert!(text.contains("418"), "{text}");
    }

    #[test]
    fn a_grpcroute_target_names_its_converted_route() {
        let t = RouteTargetRef {
            group: None,
            kind: RouteKind::GrpcRoute,
            name: "rpc".into(),
            section_name: None,
        };
        assert_eq!(t.route_name(), "grpcroute.rpc");
    }

    #[test]
    fn missing_targets_conflicts_and_bad_fields_are_refused() {
        let e = errors(
            r#"
apiVersion: sinew.dev/v1alpha1
kind: RoutePolicy
metadata: {name: nowhere, namespace: shop}
spec:
  targetRef: {kind: HTTPRoute, name: gone}
  fault: {abort: {httpStatus: 503, percent: 10}}
"#,
        );
        assert!(e.contains("spec.targetRef.name"), "{e}");
        assert!(
            e.contains("TargetNotFound: HTTPRoute shop/gone does not exist"),
            "{e}"
        );
        let e = errors(
            r#"
apiVersion: sinew.dev/v1alpha1
kind: RoutePolicy
metadata: {name: norule, namespace: shop}
spec:
  targetRef: {kind: HTTPRoute, name: web, sectionName: nope}
  retry: {attempts: 1}
"#,
        );
        assert!(e.contains("spec.targetRef.sectionName"), "{e}");
        let e = errors(
            r#"
apiVersion: sinew.dev/v1alpha1
kind: RoutePolicy
metadata: {name: a, namespace: shop}
spec:
  targetRef: {kind: HTTPRoute, name: web}
  retry: {attempts: 1}
---
apiVersion: sinew.dev/v1alpha1
kind: RoutePolicy
metadata: {name: b, namespace: shop}
spec:
  targetRef: {kind: HTTPRoute, name: web}
  retry: {attempts: 20, hedge: {}}
  fault: {abort: {percent: 500}}
  timeouts: {request: 1s, backendRequest: 2s}
"#,
        );
        for want in [
            "HTTPRoute shop/web already has RoutePolicy a",
            "spec.retry.attempts",
            "spec.retry.hedge",
            "spec.fault.abort.percent",
            "spec.fault.abort",
            "spec.timeouts.backendRequest",
        ] {
            assert!(e.contains(want), "{want}: {e}");
        }
        let e = errors(
            r#"
apiVersion: sinew.dev/v1alpha1
kind: RoutePolicy
metadata: {name: empty, namespace: shop}
spec:
  targetRef: {group: example.com, kind: HTTPRoute, name: web}
"#,
        );
        assert!(e.contains("spec.targetRef.group"), "{e}");
        assert!(e.contains("the policy does nothing"), "{e}");
    }
}
