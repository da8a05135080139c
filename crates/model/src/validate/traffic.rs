//! `TrafficPolicy` documents.

use std::collections::BTreeMap;

use crate::error::ConfigErrors;
use crate::set::Resources;

impl Resources {
    pub(super) fn validate_traffic_policies(&self, errors: &mut ConfigErrors) {
        // A Service has one TrafficPolicy: the first valid one in name order. An
        // invalid policy claims nothing, so it never pushes a valid one out.
        let mut targeted: BTreeMap<(String, String), String> = BTreeMap::new();
        for (k, p) in &self.traffic_policies {
            let mut c = self.checker(errors, "TrafficPolicy", k);
            let before = c.errors.0.len();
            let t = &p.spec.target_ref;
            if t.kind.as_deref().is_some_and(|kind| kind != "Service") {
                c.fail("spec.targetRef.kind", "only Service targets are supported");
            } else if !self.services.contains_key(&(k.0.clone(), t.name.clone())) {
                c.fail(
                    "spec.targetRef.name",
                    format!("service {}/{} does not exist", k.0, t.name),
                );
            }
            if let Some(b) = &p.spec.circuit_breaker {
                for (field, v) in [
                    ("maxRequests", b.max_requests),
                    ("maxRequestsPerEndpoint", b.max_requests_per_endpoint),
                    ("maxConnectionsPerEndpoint", b.max_connections_per_endpoint),
                ] {
                    if v == Some(0) {
                        c.fail(
                            format!("spec.circuitBreaker.{field}"),
                            "must be at least 1 (leave it out for no limit)",
                        );
                    }
                }
                if b.max_pending_requests_per_endpoint.is_some()
                    && b.max_connections_per_endpoint.is_none()
                {
                    c.fail(
                        "spec.circuitBreaker.maxPendingRequestsPerEndpoint",
                        "requests wait only for a capped pool: set maxConnectionsPerEndpoint too",
                    );
                }
            }
            if let Some(r) = &p.spec.ring_hash {
                let given = usize::from(r.header.is_some())
                    + usize::from(r.cookie.is_some())
                    + usize::from(r.source_ip);
                if given != 1 {
                    c.fail(
                        "spec.ringHash",
                        "give exactly one of header, cookie or sourceIp: true",
                    );
                }
            }
            if let Some(h) = &p.spec.health_check {
                for (field, v) in [("interval", &h.interval), ("timeout", &h.timeout)] {
                    if v.as_ref().is_some_and(|d| d.is_zero()) {
                        c.fail(
                            format!("spec.healthCheck.{field}"),
                            "must be more than zero",
                        );
                    }
                }
                for (field, v) in [
                    ("unhealthyThreshold", h.unhealthy_threshold),
                    ("healthyThreshold", h.healthy_threshold),
                ] {
                    if v == Some(0) {
                        c.fail(format!("spec.healthCheck.{field}"), "must be at least 1");
                    }
                }
            }
            for (i, r) in p.spec.rate_limits.iter().enumerate() {
                let f = format!("spec.rateLimits[{i}]");
                if !(r.requests_per_second > 0.0 && r.requests_per_second.is_finite()) {
                    c.fail(format!("{f}.requestsPerSecond"), "must be more than zero");
                }
                if r.burst == Some(0) {
                    c.fail(format!("{f}.burst"), "must be at least 1");
                }
                if let Some(k) = &r.key
                    && k.header.is_some() == k.identity
                {
                    c.fail(
                        format!("{f}.key"),
                        "give exactly one of header or identity: true",
                    );
                }
                if p.spec
                    .rate_limits
                    .iter()
                    .filter(|o| o.name == r.name)
                    .count()
                    > 1
                {
                    c.fail(
                        format!("{f}.name"),
                        format!("duplicate rate limit name {:?}", r.name),
                    );
                }
            }
            if let Some(o) = &p.spec.outlier_detection {
                for (field, v) in [
                    ("failurePercent", o.failure_percent),
                    ("maxEjectionPercent", o.max_ejection_percent),
                ] {
                    if v.is_some_and(|v| v > 100) {
                        c.fail(format!("spec.outlierDetection.{field}"), "must be 0-100");
                    }
                }
                for (field, v) in [
                    ("consecutiveFailures", o.consecutive_failures),
                    ("consecutiveRefusals", o.consecutive_refusals),
                ] {
                    if v == Some(0) {
                        c.fail(
                            format!("spec.outlierDetection.{field}"),
                            "must be at least 1",
                        );
                    }
                }
            }
            if c.errors.0.len() == before {
                match targeted.entry((k.0.clone(), t.name.clone())) {
                    std::collections::btree_map::Entry::Occupied(other) => c.fail(
                        "spec.targetRef",
                        format!(
                            "service {}/{} already has TrafficPolicy {}",
                            k.0,
                            t.name,
                            other.get()
                        ),
                    ),
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(k.1.clone());
                    }
                }
            }
        }
    }
}
