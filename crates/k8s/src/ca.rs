//! Keys that live in the cluster, never in a printed manifest: the mesh CA (Secret
//! `sinew-ca`) and the webhook's serving certificate (Secret `sinew-webhook-tls`).
//!
//! Each is read from its Secret; when the Secret is absent, one is generated and the
//! Secret *created* (not applied): when replicas start together, one create wins and
//! the others get 409 AlreadyExists and read the winner's, so every replica uses the
//! same keys. A restarted replica (a fresh disk) reads them again.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};

/// The mesh CA Secret's default name.
pub const CA_SECRET: &str = "sinew-ca";
/// The CA certificate's key in it (PEM).
pub const CA_CERT_KEY: &str = "ca.pem";
/// The CA private key's key in it (PEM).
pub const CA_KEY_KEY: &str = "ca-key.pem";

/// The Secret holding the operator's first admin credential (a `sinew --credentials`
/// file), created by the first replica to start; `kubectl get secret` reads it.
pub const ADMIN_CREDENTIAL_SECRET: &str = "sinew-admin-credential";
/// The credential file's key in it.
pub const ADMIN_CREDENTIAL_KEY: &str = "admin.credentials";

/// A Secret that could not be read, created or used, naming it.
#[derive(Debug, thiserror::Error)]
#[error("Secret {namespace}/{name}: {reason}")]
pub struct SecretError {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// What went wrong.
    pub reason: String,
}

fn text(s: &Secret, key: &str) -> Option<String> {
    let bytes = s.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// The values of `keys` in the Secret `namespace/name`; when it does not exist, the
/// values `generate` makes are stored in a new Secret of type `type_` (labelled as
/// Sinew's) and returned, unless another writer created it first: then its values.
/// A Secret lacking one of `keys` is an error naming the key (never overwritten: an
/// operator's Secret is theirs).
pub async fn load_or_create(
    client: &Client,
    namespace: &str,
    name: &str,
    type_: &str,
    keys: &[&str],
    generate: impl FnOnce() -> Result<BTreeMap<String, String>, String>,
) -> Result<BTreeMap<String, String>, SecretError> {
    let err = |reason: String| SecretError {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        reason,
    };
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let read = |s: &Secret| -> Result<BTreeMap<String, String>, SecretError> {
        keys.iter()
            .map(|k| {
                text(s, k)
                    .map(|v| ((*k).to_owned(), v))
                    .ok_or_else(|| err(format!("has no UTF-8 value under {k:?}")))
            })
            .collect()
    };
    if let Some(s) = api
        .get_opt(name)
        .await
        .map_err(|e| err(format!("cannot be read: {e}")))?
    {
        return read(&s);
    }
    let values = generate().map_err(|e| err(format!("cannot be generated: {e}")))?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some([("app.kubernetes.io/part-of".to_owned(), "sinew".to_owned())].into()),
            ..ObjectMeta::default()
        },
        type_: Some(type_.to_owned()),
        data: Some(
            values
                .iter()
                .map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes())))
                .collect(),
        ),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(namespace, name, "created the Secret");
            Ok(values)
        }
        // Another replica was first: use its values, as it does.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let s = api
                .get(name)
                .await
                .map_err(|e| err(format!("cannot be read after a lost create race: {e}")))?;
            read(&s)
        }
        Err(e) => Err(err(format!("cannot be created: {e}"))),
    }
}

/// The mesh CA (certificate, key; PEM) from the Secret `namespace/name`, generated
/// for `trust_domain` (a root valid ten years) and stored there on the first start.
pub async fn load_or_create_ca(
    client: &Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
) -> Result<(String, String), SecretError> {
    let mut v = load_or_create(
        client,
        namespace,
        name,
        "Opaque",
        &[CA_CERT_KEY, CA_KEY_KEY],
        || {
            let ca = sinew_tls::Ca::generate(
                trust_domain,
                std::time::Duration::from_secs(10 * 365 * 24 * 3600),
            )
            .map_err(|e| e.to_string())?;
            Ok([
                (CA_CERT_KEY.to_owned(), ca.cert_pem()),
                (CA_KEY_KEY.to_owned(), ca.key_pem()),
            ]
            .into())
        },
    )
    .await?;
    let cert = v.remove(CA_CERT_KEY).unwrap_or_default();
    let key = v.remove(CA_KEY_KEY).unwrap_or_default();
    // A Secret holding something else is named now, not at the first signature.
    sinew_tls::Ca::from_pem(&cert, &key).map_err(|e| SecretError {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        reason: format!("{CA_CERT_KEY}/{CA_KEY_KEY} are not a usable CA: {e}"),
    })?;
    Ok((cert, key))
}

/// Sets the `caBundle` of the webhook `webhook` in the MutatingWebhookConfiguration
/// `configuration` to `ca_pem` (a strategic merge on the webhook's name: nothing else
/// in it changes). `sinew install` leaves the field out, so the serving certificate,
/// made in the cluster, is trusted once its Secret exists.
pub async fn set_ca_bundle(
    client: &Client,
    configuration: &str,
    webhook: &str,
    ca_pem: &str,
) -> Result<(), String> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let patch = serde_json::json!({
        "webhooks": [{
            "name": webhook,
            "clientConfig": {
                // ByteString serialises as base64, as the API wants it.
                "caBundle": ByteString(ca_pem.as_bytes().to_vec()),
            },
        }],
    });
    api.patch(
        configuration,
        &PatchParams::default(),
        &Patch::Strategic(patch),
    )
    .await
    .map(|_| ())
    .map_err(|e| format!("MutatingWebhookConfiguration {configuration}: caBundle not set: {e}"))
}

/// The API server's version (`/version`'s `gitVersion`, e.g. `v1.29.3`).
pub async fn server_version(client: &Client) -> Result<String, kube::Error> {
    Ok(client.apiserver_version().await?.git_version)
}
