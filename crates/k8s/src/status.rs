//! Validation results written back to the resources: an `Accepted` condition in each
//! custom resource's `status` (for Gateway API routes, in `status.parents`, one entry per
//! parent, as the Gateway API specifies), and a Warning Event when a resource is refused.
//!
//! Only the leader ([`crate::leader`]) writes, so replicas do not fight over statuses; a
//! status is written only when it differs from what the resource already says, so writing
//! (which the watches see) settles at once.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::crd::Kind;

/// The Gateway API controller name Sinew writes route statuses under.
pub const CONTROLLER_NAME: &str = "sinew.dev/mesh";

/// The validation result of one custom resource.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Its kind.
    pub kind: Kind,
    /// The source label of its documents.
    pub label: String,
    /// The object as last seen.
    pub object: Arc<DynamicObject>,
    /// Why it was refused (empty: accepted).
    pub problems: Vec<String>,
}

impl Outcome {
    fn condition(&self) -> (&'static str, &'static str, String) {
        if self.problems.is_empty() {
            (
                "True",
                "Accepted",
                "accepted by the Sinew control plane".to_owned(),
            )
        } else {
            // A policy whose target is missing says so in its reason (GEP-713).
            let reason = if self
                .problems
                .iter()
                .all(|p| p.contains(sinew_model::policy::TARGET_NOT_FOUND))
            {
                sinew_model::policy::TARGET_NOT_FOUND
            } else {
                "Invalid"
            };
            ("False", reason, self.problems.join("; "))
        }
    }
}

fn is_route(k: &Kind) -> bool {
    matches!(k.kind, "HTTPRoute" | "GRPCRoute")
}

/// The `Accepted` condition the object carries now (for routes: in Sinew's parent entry).
fn current(o: &Outcome) -> Option<Value> {
    let status = o.object.data.get("status")?;
    let conditions = if is_route(&o.kind) {
        status
            .get("parents")?
            .as_array()?
            .iter()
            .find(|p| p.get("controllerName").and_then(Value::as_str) == Some(CONTROLLER_NAME))?
            .get("conditions")?
    } else {
        status.get("conditions")?
    };
    conditions
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("Accepted"))
        .cloned()
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Writes statuses and events.
pub struct StatusWriter {
    client: Client,
    leader: watch::Receiver<bool>,
}

impl StatusWriter {
    /// A writer that writes while `leader` says this replica leads.
    pub fn new(client: Client, leader: watch::Receiver<bool>) -> StatusWriter {
        StatusWriter { client, leader }
    }

    /// Resolves when leadership changes (a new leader writes what is missing).
    pub async fn leadership_changed(&mut self) {
        if self.leader.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Brings every object's status up to date (a no-op unless this replica leads).
    pub async fn write(&mut self, objects: &[Outcome]) {
        if !*self.leader.borrow_and_update() {
            return;
        }
        for o in objects {
            if let Err(e) = self.write_one(o).await {
                tracing::warn!(object = %o.label, error = %e, "cannot write its status");
            }
        }
    }

    async fn write_one(&self, o: &Outcome) -> Result<(), kube::Error> {
        let (status, reason, message) = o.condition();
        let generation = o.object.metadata.generation.unwrap_or(0);
        let old = current(o);
        let same = |field: &str, v: &Value| old.as_ref().and_then(|c| c.get(field)) == Some(v);
        if same("status", &json!(status))
            && same("reason", &json!(reason))
            && same("message", &json!(message))
            && same("observedGeneration", &json!(generation))
        {
            return Ok(());
        }
        let transition = match &old {
            Some(c) if c.get("status") == Some(&json!(status)) => c
                .get("lastTransitionTime")
                .cloned()
                .unwrap_or_else(|| json!(now())),
            _ => json!(now()),
        };
        let condition = json!({
            "type": "Accepted",
            "status": status,
            "reason": reason,
            "message": message,
            "observedGeneration": generation,
            "lastTransitionTime": transition,
        });
        let mut patch = if is_route(&o.kind) {
            // Sinew's entries, one per Service parent, beside other controllers' (e.g. a
            // Gateway implementation's, for the route's Gateway parents), which stay.
            let mut parents: Vec<Value> = o
                .object
                .data
                .pointer("/status/parents")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|p| {
                    p.get("controllerName").and_then(Value::as_str) != Some(CONTROLLER_NAME)
                })
                .collect();
            parents.extend(
                o.object
                    .data
                    .pointer("/spec/parentRefs")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(crate::convert::is_service_parent)
                    .map(|p| json!({"parentRef": p, "controllerName": CONTROLLER_NAME, "conditions": [condition]})),
            );
            // The whole list is replaced: only if nobody changed it since it was read.
            json!({"metadata": {"resourceVersion": o.object.metadata.resource_version},
                   "status": {"parents": parents}})
        } else {
            json!({"status": {"conditions": [condition]}})
        };
        if patch["metadata"]["resourceVersion"].is_null()
            && let Some(m) = patch.as_object_mut()
        {
            m.remove("metadata");
        }
        let ns = o.object.metadata.namespace.as_deref().unwrap_or("default");
        let name = o.object.metadata.name.as_deref().unwrap_or_default();
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            ns,
            &crate::source::api_resource(&o.kind),
        );
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        tracing::info!(object = %o.label, accepted = status, %message, "status written");
        if !o.problems.is_empty() {
            self.event(o, ns, name, &message).await?;
        }
        Ok(())
    }

    async fn event(
        &self,
        o: &Outcome,
        ns: &str,
        name: &str,
        message: &str,
    ) -> Result<(), kube::Error> {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{name}.")),
                namespace: Some(ns.to_owned()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some(o.kind.api_version()),
                kind: Some(o.kind.kind.to_owned()),
                name: Some(name.to_owned()),
                namespace: Some(ns.to_owned()),
                uid: o.object.metadata.uid.clone(),
                resource_version: o.object.metadata.resource_version.clone(),
                ..ObjectReference::default()
            },
            reason: Some("Invalid".to_owned()),
            message: Some(message.to_owned()),
            type_: Some("Warning".to_owned()),
            source: Some(EventSource {
                component: Some("sinew-control".to_owned()),
                ..EventSource::default()
            }),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Event::default()
        };
        Api::<Event>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), &event)
            .await?;
        Ok(())
    }
}
