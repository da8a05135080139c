//! Sidecar injection for Kubernetes.
//!
//! - [`pod`]: the pure Pod mutation. Given a Pod (or a pod template) as JSON, it
//!   computes the RFC 6902 JSON Patch that adds the `sinew-proxy` sidecar, the
//!   `sinew-init` capture init container, the projected service-account token the
//!   proxy proves its identity with, and the `sinew.dev/injected` annotation. The patch
//!   only adds: it never rewrites what the user wrote, so it applies to the original
//!   object byte for byte.
//! - [`config`]: the installation's defaults and the per-pod annotations that override
//!   them (resources, ports, capture exclusions, image).
//! - [`yaml`]: `sinew inject -f`: the same mutation over multi-document YAML holding
//!   Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs.
//! - [`review`]: AdmissionReview v1 in, AdmissionReview v1 with the patch out.
//! - [`install`]: the manifests `sinew install --kubernetes` prints.
//! - `server` (feature `server`): the HTTPS webhook server and its certificates.
//!
//! Injection is idempotent (a Pod that already has the sidecar gets an empty patch),
//! skips host-network Pods (capture would rewrite the node's own rules) and Pods
//! annotated `sinew.dev/inject: disabled`.

#![forbid(unsafe_code)]

pub mod config;
pub mod install;
pub mod patch;
pub mod pod;
pub mod review;
pub mod yaml;

#[cfg(feature = "server")]
pub mod cert;
#[cfg(feature = "server")]
pub mod server;

pub use config::InjectConfig;
pub use pod::{Outcome, inject_pod};

/// A problem with the object being injected, naming the field and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InjectError {
    /// The field path, e.g. `metadata.annotations["sinew.dev/inbound-port"]`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl InjectError {
    pub(crate) fn new(field: impl Into<String>, reason: impl Into<String>) -> InjectError {
        InjectError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
