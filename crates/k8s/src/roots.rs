//! The mesh roots, published as the ConfigMap `sinew-root` (key `roots.pem`) in every
//! namespace, as Istio does with `istio-ca-root-cert`: an injected sidecar mounts it
//! and verifies the control plane with it before it presents its service-account
//! token (no trust on first use). Written at start, when the roots change (a
//! rotation), and when a namespace appears.

use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use sinew_control::identity::Identity;

/// The ConfigMap's name.
pub const ROOT_CONFIGMAP: &str = "sinew-root";
/// Its key.
pub const ROOT_KEY: &str = "roots.pem";

fn config_map(ns: &str, roots: &str) -> ConfigMap {
    ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(ROOT_CONFIGMAP.to_owned()),
            namespace: Some(ns.to_owned()),
            labels: Some([("app.kubernetes.io/part-of".to_owned(), "sinew".to_owned())].into()),
            ..Default::default()
        },
        data: Some([(ROOT_KEY.to_owned(), roots.to_owned())].into()),
        ..Default::default()
    }
}

async fn write(client: &Client, ns: &str, roots: &str) {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let pp = PatchParams::apply("sinew-control").force();
    if let Err(e) = api
        .patch(ROOT_CONFIGMAP, &pp, &Patch::Apply(config_map(ns, roots)))
        .await
    {
        tracing::warn!(namespace = ns, error = %e, "cannot publish the mesh roots");
    }
}

/// Keeps `sinew-root` current in every namespace until the task is dropped.
pub async fn publish(client: Client, identity: Arc<Identity>) {
    let mut bundle = identity.bundle();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut known: Vec<String> = Vec::new();
    let mut events = watcher(namespaces, watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(Ok(ns)) => {
                    let Some(name) = ns.metadata.name else { continue };
                    if !known.contains(&name) {
                        known.push(name.clone());
                    }
                    let roots = bundle.borrow().roots_pem.clone();
                    write(&client, &name, &roots).await;
                }
                Some(Err(e)) => tracing::warn!(error = %e, "namespace watch"),
                None => return,
            },
            changed = bundle.changed() => {
                if changed.is_err() {
                    return;
                }
                let roots = bundle.borrow_and_update().roots_pem.clone();
                for ns in &known {
                    write(&client, ns, &roots).await;
                }
            }
        }
    }
}
