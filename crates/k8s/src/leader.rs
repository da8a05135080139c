//! Leader election with a `coordination.k8s.io/v1` Lease, for what must have a single
//! writer (status conditions and events). Everything else (serving proxies, issuing
//! certificates) runs on every replica.
//!
//! The leader renews the Lease every third of its duration; another replica takes it over
//! once it has not been renewed for its whole duration. Updates carry the Lease's
//! `resourceVersion`, so two replicas can never both win the same takeover.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;

/// The Lease's name.
pub const LEASE_NAME: &str = "sinew-control";

/// Starts taking part in the election; the receiver says whether this replica leads.
pub fn spawn(
    client: Client,
    namespace: String,
    holder: String,
    duration: Duration,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let api: Api<Lease> = Api::namespaced(client, &namespace);
        let mut renewed_at: Option<tokio::time::Instant> = None;
        loop {
            let leads = match attempt(&api, &holder, duration).await {
                Ok(leads) => {
                    if leads {
                        renewed_at = Some(tokio::time::Instant::now());
                    }
                    leads
                }
                Err(e) => {
                    tracing::warn!(error = %e, lease = %format!("{namespace}/{LEASE_NAME}"), "leader election");
                    // Keep leading only while the lease we last renewed is still ours.
                    renewed_at.is_some_and(|t| t.elapsed() < duration)
                }
            };
            if *tx.borrow() != leads {
                tracing::info!(%holder, leads, "leadership changed");
                let _ = tx.send(leads);
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(duration / 3).await;
        }
    });
    rx
}

async fn attempt(api: &Api<Lease>, holder: &str, duration: Duration) -> Result<bool, kube::Error> {
    let now = k8s_openapi::jiff::Timestamp::now();
    let secs = i32::try_from(duration.as_secs()).unwrap_or(i32::MAX).max(1);
    let mine = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(holder.to_owned()),
        lease_duration_seconds: Some(secs),
        acquire_time: acquired.or(Some(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    };
    let Some(mut lease) = api.get_opt(LEASE_NAME).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(mine(0, None)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let transitions = spec.lease_transitions.unwrap_or(0);
    let next = if spec.holder_identity.as_deref() == Some(holder) {
        mine(transitions, spec.acquire_time.clone())
    } else {
        let held_for = i64::from(spec.lease_duration_seconds.unwrap_or(secs));
        let expired = spec
            .renew_time
            .as_ref()
            .is_none_or(|t| t.0.as_second() + held_for < now.as_second());
        if !expired {
            return Ok(false);
        }
        mine(transitions + 1, None)
    };
    lease.spec = Some(next);
    match api
        .replace(LEASE_NAME, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        // Someone else updated it first.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
