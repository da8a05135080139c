//! Kubernetes as a source for Sinew's control plane (`sinew control --kubernetes`).
//!
//! - [`source`]: watches Services, EndpointSlices (or Endpoints) and Pods, and Sinew's,
//!   Gateway API and SMI custom resources, and keeps the control plane's documents equal
//!   to them ([`convert`] says how each object maps).
//! - [`crd`]: the CustomResourceDefinitions ([`crds`] for Sinew's own kinds).
//! - [`status`]: validation results in each resource's status, and Events.
//! - [`leader`]: a Lease, so only one replica writes statuses.
//! - [`review`]: service-account tokens checked with TokenReview, for the CA.
//! - [`ca`]: the mesh CA and the webhook's certificate, kept in Secrets (made in the
//!   cluster on first start, never printed by `sinew install`).
//! - [`rbac`]: the least privilege it needs (ClusterRole, and a Role for its Lease).
//!
//! Kept in a crate of its own so the heavy Kubernetes code (kube-rs, k8s-openapi) is built
//! only by what needs it: the proxy never depends on it.

pub mod ca;
pub mod convert;
pub mod crd;
pub mod leader;
pub mod rbac;
pub mod review;
pub mod roots;
pub mod schema;
pub mod source;
pub mod status;

pub use crd::crds;
pub use review::KubeTokenReviewer;
pub use source::{SourceOptions, run};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};

/// Field manager name for what Sinew applies.
pub const FIELD_MANAGER: &str = "sinew";

/// Applies (server-side) the given CustomResourceDefinitions and waits until the API
/// server serves each of them.
pub async fn install_crds(
    client: &Client,
    crds: &[CustomResourceDefinition],
) -> Result<(), kube::Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    for crd in crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &pp, &Patch::Apply(crd)).await?;
    }
    for crd in crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let cond = kube::runtime::conditions::is_crd_established();
        kube::runtime::wait::await_condition(api.clone(), &name, cond)
            .await
            .map_err(|e| kube::Error::Service(Box::new(e)))?;
    }
    Ok(())
}

/// How `sinew control --kubernetes` runs.
#[derive(Debug, Clone, Default)]
pub struct KubernetesOptions {
    /// The source's settings.
    pub source: SourceOptions,
    /// The audience proxies' service-account tokens must carry; default
    /// [`review::DEFAULT_AUDIENCE`].
    pub token_audience: Option<String>,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Connects to the API server (`KUBECONFIG`, `~/.kube/config`, or the in-cluster service
/// account), makes the control plane's CA accept service-account tokens (TokenReview), and
/// starts the Kubernetes source feeding `control`. Returns the source's task; it ends
/// when the control plane does (or with the error that stopped it).
pub async fn start(
    control: &sinew_control::ControlPlane,
    opts: KubernetesOptions,
) -> Result<tokio::task::JoinHandle<Result<(), source::SourceError>>, kube::Error> {
    let client = Client::try_default().await?;
    let control_index = control.index();
    let audience = opts
        .token_audience
        .unwrap_or_else(|| review::DEFAULT_AUDIENCE.to_owned());
    control
        .identity()
        .set_token_reviewer(std::sync::Arc::new(KubeTokenReviewer::new(
            client.clone(),
            audience,
        )));
    let roots = tokio::spawn(roots::publish(client.clone(), control.identity()));
    Ok(tokio::spawn(async move {
        // The roots' publisher lives as long as the source.
        let _roots = AbortOnDrop(roots);
        run(client, control_index, opts.source).await
    }))
}
