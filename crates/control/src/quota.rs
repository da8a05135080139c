//! Mesh-wide rate limits with no external service: the control plane shares each
//! global limit among the proxies that enforce it.
//!
//! Every proxy reports, each report interval, the arrival rate its global limits see
//! per key (admitted and refused alike), and gets back its leases. For one key of one
//! limit with rate `R` shared by `N` proxies whose demands add up to `D`, proxy `i`
//! with demand `d_i` is leased
//!
//! - `R * d_i / D` when `D >= R` (oversubscribed: every request has the same chance,
//!   as with one bucket for the whole mesh), else
//! - `d_i + (R - D) / N` (room to spare: each proxy can grow into its part of it),
//!
//! so the leases always add up to `R`. Bursts are split the same way (rounded up,
//! at least 1). A proxy that stops reporting is dropped after [`STALE`]; one whose
//! stream ends is dropped at once. A proxy cut off from the control plane, or whose
//! lease expires, keeps `1/N` of the limit.
//!
//! **Error bound.** Over any window of `W` seconds the mesh admits at most
//! `R * (W + T) + B + N` requests per key, where `T` is one report interval plus the
//! round trip (leases change hands one proxy at a time within an interval) and `B`
//! the burst (rounding each share up adds at most one per proxy). While the control
//! plane is away the `1/N` shares still add up to `R` unless proxies join meanwhile.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sinew_api::v1::{Demand, KeyLease, Leases, LimitLease};
use sinew_model::resource::{Resource, ResourceKey};

use crate::index::MeshState;

/// How long leases hold at the proxy (four report intervals): long enough to ride
/// out a late report, short enough that a lost control plane is noticed.
pub const LEASE_TTL: Duration = Duration::from_secs(1);

/// A proxy that has not reported for this long no longer shares the limit.
pub const STALE: Duration = Duration::from_secs(2);

/// Limits one report may name, and keys per limit (hostile reports stay bounded).
const MAX_LIMITS: usize = 64;
const MAX_KEYS: usize = 256;

/// Keys leased per limit in one answer (the busiest across the mesh).
const MAX_LEASED_KEYS: usize = 1024;

#[derive(Debug)]
struct Report {
    at: Instant,
    keys: HashMap<String, f64>,
}

/// The demand of every proxy, per global limit.
#[derive(Debug, Default)]
pub struct Quotas {
    limits: Mutex<HashMap<String, HashMap<String, Report>>>,
}

/// A global limit's rate and burst, as stored: `namespace/policy/name`, enforced
/// by the workloads of the policy's target Service.
fn global_limit(state: &MeshState, name: &str) -> Option<(ResourceKey, f64, u32)> {
    let mut parts = name.splitn(3, '/');
    let (ns, policy, limit) = (parts.next()?, parts.next()?, parts.next()?);
    let entry = state.docs.get(&ResourceKey {
        kind: "TrafficPolicy".into(),
        namespace: ns.to_owned(),
        name: policy.to_owned(),
    })?;
    let Resource::TrafficPolicy(p) = &entry.resource else {
        return None;
    };
    let r = p
        .spec
        .rate_limits
        .iter()
        .find(|r| r.global && r.name == limit)?;
    let burst = r.burst_or_default();
    let service = ResourceKey {
        kind: "Service".into(),
        namespace: ns.to_owned(),
        name: p.spec.target_ref.name.clone(),
    };
    Some((service, r.requests_per_second, burst))
}

/// One proxy's share of one key, given its demand, the total demand, the rate, and
/// how many share it.
pub fn share(rate: f64, proxies: usize, own: f64, total: f64) -> f64 {
    let n = proxies.max(1) as f64;
    if total >= rate && total > 0.0 {
        rate * own / total
    } else {
        own + (rate - total).max(0.0) / n
    }
}

impl Quotas {
    /// Records `proxy`'s demand and answers with its leases. Limits that are not a
    /// stored global limit of the proxy's own service are ignored.
    pub fn report(&self, proxy: &str, demand: &Demand, state: &MeshState, now: Instant) -> Leases {
        let own = crate::view::own_service(state, proxy);
        let mut limits = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        let mut answered = Vec::new();
        for d in demand.limits.iter().take(MAX_LIMITS) {
            let Some((service, rate, burst)) = global_limit(state, &d.limit) else {
                continue;
            };
            if own.as_ref() != Some(&service) {
                continue;
            }
            let keys = d
                .keys
                .iter()
                .filter(|(_, v)| v.is_finite() && **v > 0.0)
                .take(MAX_KEYS)
                // A proxy's word is bounded: no key can arrive faster, as far as
                // sharing goes, than the whole limit's rate (a demand of 1e300 would
                // otherwise take every share from the honest proxies).
                .map(|(k, v)| (k.clone(), v.min(rate)))
                .collect();
            let reports = limits.entry(d.limit.clone()).or_default();
            reports.insert(proxy.to_owned(), Report { at: now, keys });
            answered.push((d.limit.clone(), rate, burst));
        }
        // A limit this proxy no longer reports is no longer its to share.
        for (name, reports) in limits.iter_mut() {
            if !answered.iter().any(|(n, _, _)| n == name) {
                reports.remove(proxy);
            }
            reports.retain(|_, r| now.saturating_duration_since(r.at) < STALE);
        }
        limits.retain(|_, r| !r.is_empty());
        let mut out = Vec::with_capacity(answered.len());
        for (name, rate, burst) in answered {
            let Some(reports) = limits.get(&name) else {
                continue;
            };
            out.push(lease(proxy, reports, rate, burst, &name));
        }
        Leases {
            ttl_ms: LEASE_TTL.as_millis() as u64,
            limits: out,
        }
    }

    /// Drops a proxy whose stream ended.
    pub fn forget(&self, proxy: &str) {
        let mut limits = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        for reports in limits.values_mut() {
            reports.remove(proxy);
        }
        limits.retain(|_, r| !r.is_empty());
    }

    /// Proxies sharing each global limit now (for status and tests).
    pub fn sharing(&self) -> HashMap<String, usize> {
        let limits = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        limits.iter().map(|(k, r)| (k.clone(), r.len())).collect()
    }
}

fn lease(
    proxy: &str,
    reports: &HashMap<String, Report>,
    rate: f64,
    burst: u32,
    name: &str,
) -> LimitLease {
    let n = reports.len();
    let mut totals: HashMap<&str, f64> = HashMap::new();
    for r in reports.values() {
        for (k, v) in &r.keys {
            *totals.entry(k.as_str()).or_insert(0.0) += v;
        }
    }
    let mut keys: Vec<(&str, f64)> = totals.into_iter().collect();
    if keys.len() > MAX_LEASED_KEYS {
        keys.sort_by(|a, b| b.1.total_cmp(&a.1));
        keys.truncate(MAX_LEASED_KEYS);
    }
    let mine = reports.get(proxy);
    let leased = keys
        .into_iter()
        .map(|(k, total)| {
            let own = mine.and_then(|r| r.keys.get(k)).copied().unwrap_or(0.0);
            let s = share(rate, n, own, total);
            let b = ((f64::from(burst) * s / rate).ceil() as u32).max(1);
            (
                k.to_owned(),
                KeyLease {
                    requests_per_second: s,
                    burst: b,
                },
            )
        })
        .collect();
    LimitLease {
        limit: name.to_owned(),
        proxies: u32::try_from(n).unwrap_or(u32::MAX),
        keys: leased,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_to_the_rate_and_follow_demand() {
        // Oversubscribed: in proportion to demand.
        let d = [300.0, 100.0, 0.0];
        let total: f64 = d.iter().sum();
        let s: Vec<f64> = d.iter().map(|x| share(100.0, 3, *x, total)).collect();
        assert_eq!(s, vec![75.0, 25.0, 0.0]);
        // Room to spare: demand plus an equal part of the rest.
        let d = [30.0, 10.0, 0.0];
        let total: f64 = d.iter().sum();
        let s: Vec<f64> = d.iter().map(|x| share(100.0, 3, *x, total)).collect();
        assert_eq!(s, vec![50.0, 30.0, 20.0]);
        assert!((s.iter().sum::<f64>() - 100.0).abs() < 1e-9);
        // Nobody asks: equal parts.
        assert_eq!(share(90.0, 3, 0.0, 0.0), 30.0);
    }

    fn state_with_policy(global: bool) -> MeshState {
        let docs = sinew_model::load::parse_documents(
            "t.yaml",
            &format!(
                "apiVersion: sinew.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n  targetRef: {{kind: Service, name: api}}\n  rateLimits:\n    - {{name: all, requestsPerSecond: 90, burst: 30, global: {global}}}\n---\napiVersion: sinew.dev/v1alpha1\nkind: Workload\nmetadata: {{name: a, namespace: shop}}\nspec: {{service: api, address: 10.0.0.1, ports: {{http: 80}}}}\n---\napiVersion: sinew.dev/v1alpha1\nkind: Workload\nmetadata: {{name: b, namespace: shop}}\nspec: {{service: api, address: 10.0.0.2, ports: {{http: 80}}}}\n---\napiVersion: sinew.dev/v1alpha1\nkind: Workload\nmetadata: {{name: other, namespace: shop}}\nspec: {{service: web, address: 10.0.0.3, ports: {{http: 80}}}}\n"
            ),
        )
        .unwrap_or_else(|e| panic!("the test's documents: {e}"));
        let mut state = MeshState::default();
        for d in docs {
            let entry = crate::index::DocEntry::new(d.resource, "api", 1);
            state
                .docs
                .insert(entry.resource.key(), std::sync::Arc::new(entry));
        }
        state
    }

    fn demand(limit: &str, keys: &[(&str, f64)]) -> Demand {
        Demand {
            limits: vec![sinew_api::v1::LimitDemand {
                limit: limit.into(),
                keys: keys.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            }],
        }
    }

    #[test]
    fn proxies_of_the_service_share_a_global_limit() {
        let state = state_with_policy(true);
        let q = Quotas::default();
        let t = Instant::now();
        let l = q.report("shop/a", &demand("shop/p/all", &[("", 200.0)]), &state, t);
        assert_eq!(l.limits.len(), 1);
        assert_eq!(l.limits[0].proxies, 1);
        assert_eq!(l.limits[0].keys[""].requests_per_second, 90.0);
        // Demand counts at most at the limit's rate (90): 200 and 100 weigh 90 each.
        let l = q.report("shop/b", &demand("shop/p/all", &[("", 100.0)]), &state, t);
        assert_eq!(l.limits[0].proxies, 2);
        assert_eq!(l.limits[0].keys[""].requests_per_second, 45.0);
        assert_eq!(l.limits[0].keys[""].burst, 15);
        let l = q.report("shop/a", &demand("shop/p/all", &[("", 200.0)]), &state, t);
        assert_eq!(l.limits[0].keys[""].requests_per_second, 45.0);
        // Below the rate, demand is taken as reported: 60 against 90 of 90.
        let l = q.report("shop/b", &demand("shop/p/all", &[("", 60.0)]), &state, t);
        assert_eq!(l.limits[0].keys[""].requests_per_second, 36.0);
        // A demand of 1e300 takes no more than one of 90 would.
        let l = q.report("shop/a", &demand("shop/p/all", &[("", 1e300)]), &state, t);
        assert_eq!(l.limits[0].keys[""].requests_per_second, 54.0);
        // A proxy of another service cannot claim a share; nor can anyone of a
        // limit that does not exist.
        let l = q.report("shop/other", &demand("shop/p/all", &[("", 1e9)]), &state, t);
        assert!(l.limits.is_empty());
        let l = q.report("shop/a", &demand("shop/p/nope", &[("", 1.0)]), &state, t);
        assert!(l.limits.is_empty());
        // ...and that report said shop/a no longer enforces shop/p/all.
        assert_eq!(q.sharing().get("shop/p/all"), Some(&1));
        // A gone proxy is forgotten; a silent one goes stale.
        q.forget("shop/b");
        assert_eq!(q.sharing().get("shop/p/all"), None);
        q.report("shop/a", &demand("shop/p/all", &[]), &state, t);
        let l = q.report("shop/b", &demand("shop/p/all", &[]), &state, t + STALE);
        assert_eq!(l.limits[0].proxies, 1, "shop/a went stale");
        // Hostile numbers are ignored.
        let l = q.report(
            "shop/a",
            &demand(
                "shop/p/all",
                &[("", f64::NAN), ("x", f64::INFINITY), ("y", -5.0)],
            ),
            &state,
            t + STALE,
        );
        assert!(l.limits[0].keys.is_empty());
    }

    #[test]
    fn a_local_limit_is_not_shared() {
        let state = state_with_policy(false);
        let q = Quotas::default();
        let l = q.report(
            "shop/a",
            &demand("shop/p/all", &[("", 5.0)]),
            &state,
            Instant::now(),
        );
        assert!(l.limits.is_empty());
    }
}
