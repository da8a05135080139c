//! `sinew install --kubernetes`: prints the installation's manifests, or applies them
//! with server-side apply.
//!
//! Certificates: the mesh CA and the webhook's serving certificate are generated,
//! unless given as files, or (with `--apply`) unless the cluster already has them: a
//! second `install --apply` (an upgrade) keeps the mesh's root and the webhook's
//! certificate, so nothing in the mesh has to be re-issued.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use serde_json::Value;
use sinew_inject::install::{CA_SECRET, Definitions, InstallOptions, WEBHOOK_SECRET};

use crate::inject::InjectArgs;

/// `sinew install`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct InstallArgs {
    /// Install on Kubernetes (the only target so far).
    #[arg(long, required = true)]
    pub kubernetes: bool,
    /// The control plane's namespace.
    #[arg(short, long, default_value = "sinew-system")]
    pub namespace: String,
    /// The image holding `sinew` and `sinew-proxy` (default: this version's release).
    #[arg(long)]
    pub image: Option<String>,
    /// Control-plane replicas.
    #[arg(long, default_value_t = 2)]
    pub replicas: i32,
    /// The mesh's SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Ignore: if the webhook is down, new pods start without a sidecar (nothing is
    /// refused). Fail: new pods in opted-in namespaces wait for the webhook (no pod
    /// ever runs outside the mesh by accident).
    #[arg(long, default_value = "Ignore", value_parser = ["Ignore", "Fail"])]
    pub webhook_failure_policy: String,
    /// A directory with the webhook's tls.crt, tls.key and ca.crt (default: generated).
    #[arg(long)]
    pub webhook_tls_dir: Option<PathBuf>,
    /// The mesh CA certificate (PEM; default: generated).
    #[arg(long, requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The mesh CA key (PEM).
    #[arg(long, requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Also install minimal Gateway API HTTPRoute/GRPCRoute CRDs (for clusters without
    /// the Gateway API). With --apply, a CRD that exists without Sinew's
    /// `app.kubernetes.io/managed-by: sinew` label (e.g. the upstream one) is left alone.
    #[arg(long)]
    pub gateway_api_crds: bool,
    /// Also install minimal SMI TrafficSplit/TrafficTarget/HTTPRouteGroup CRDs.
    #[arg(long)]
    pub smi_crds: bool,
    /// Apply the manifests (server-side apply) instead of printing them.
    #[arg(long)]
    pub apply: bool,
    /// The kubeconfig for --apply (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, requires = "apply")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context for --apply (default: its current context).
    #[arg(long, requires = "apply")]
    pub context: Option<String>,
    #[command(flatten)]
    pub inject: InjectArgs,
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))
}

/// A client from the kubeconfig (the flag, $KUBECONFIG, ~/.kube/config, in-cluster).
pub async fn client(
    kubeconfig: Option<&Path>,
    context: Option<&str>,
) -> anyhow::Result<kube::Client> {
    let options = kube::config::KubeConfigOptions {
        context: context.map(str::to_owned),
        ..Default::default()
    };
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("{}: not a usable kubeconfig", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &options)
                .await
                .with_context(|| format!("{}: not a usable kubeconfig", path.display()))?
        }
        None if context.is_some() => kube::Config::from_kubeconfig(&options)
            .await
            .context("no usable kubeconfig")?,
        None => kube::Config::infer()
            .await
            .context("no usable kubeconfig (set --kubeconfig or KUBECONFIG)")?,
    };
    kube::Client::try_from(config).context("cannot build a Kubernetes client")
}

fn secret_text(s: &Secret, key: &str) -> Option<String> {
    let bytes = s.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// The options: flags, files, what the cluster already has, or generated.
async fn options(
    args: &InstallArgs,
    existing: Option<&kube::Client>,
) -> anyhow::Result<InstallOptions> {
    let image = args
        .image
        .clone()
        .unwrap_or_else(sinew_inject::config::default_image);
    let inject = args
        .inject
        .config(&image, &InstallOptions::control_plane_url(&args.namespace))?;
    let (mut ca, mut webhook) = (None, None);
    if let Some(client) = existing {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &args.namespace);
        let get = |name: &'static str| {
            let secrets = secrets.clone();
            async move {
                secrets
                    .get_opt(name)
                    .await
                    .with_context(|| format!("cannot read Secret {}/{name}", args.namespace))
            }
        };
        if let Some(s) = get(CA_SECRET).await? {
            ca = secret_text(&s, "ca.pem").zip(secret_text(&s, "ca-key.pem"));
        }
        if let Some(s) = get(WEBHOOK_SECRET).await?
            && let (Some(c), Some(k), Some(a)) = (
                secret_text(&s, "tls.crt"),
                secret_text(&s, "tls.key"),
                secret_text(&s, "ca.crt"),
            )
        {
            webhook = Some((c, k, a));
        }
    }
    if let (Some(c), Some(k)) = (&args.ca_cert, &args.ca_key) {
        let (c, k) = (read(c)?, read(k)?);
        sinew_tls::Ca::from_pem(&c, &k).map_err(|e| anyhow::anyhow!("--ca-cert/--ca-key: {e}"))?;
        ca = Some((c, k));
    }
    let (mesh_ca_pem, mesh_ca_key_pem) = match ca {
        Some(pair) => pair,
        None => {
            let ca = sinew_tls::Ca::generate(
                &args.trust_domain,
                Duration::from_secs(10 * 365 * 24 * 3600),
            )
            .map_err(|e| anyhow::anyhow!("mesh CA: {e}"))?;
            (ca.cert_pem(), ca.key_pem())
        }
    };
    if let Some(dir) = &args.webhook_tls_dir {
        webhook = Some((
            read(&dir.join("tls.crt"))?,
            read(&dir.join("tls.key"))?,
            read(&dir.join("ca.crt"))?,
        ));
    }
    let (webhook_cert_pem, webhook_key_pem, webhook_ca_pem) = match webhook {
        Some(t) => t,
        None => {
            let c = sinew_inject::cert::generate(
                &InstallOptions::webhook_names(&args.namespace),
                Duration::from_secs(10 * 365 * 24 * 3600),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            (c.cert_pem, c.key_pem, c.ca_pem)
        }
    };
    Ok(InstallOptions {
        namespace: args.namespace.clone(),
        image,
        replicas: args.replicas,
        trust_domain: args.trust_domain.clone(),
        failure_policy: args.webhook_failure_policy.clone(),
        inject,
        webhook_cert_pem,
        webhook_key_pem,
        webhook_ca_pem,
        mesh_ca_pem,
        mesh_ca_key_pem,
    })
}

/// Sinew's CustomResourceDefinitions (and, if asked, minimal Gateway API and SMI
/// ones) and the control plane's RBAC rules, as sinew-k8s defines them.
fn definitions(args: &InstallArgs) -> anyhow::Result<Definitions> {
    let mut crds = sinew_k8s::crds();
    if args.gateway_api_crds {
        crds.extend(sinew_k8s::crd::gateway_api_crds());
    }
    if args.smi_crds {
        crds.extend(sinew_k8s::crd::smi_crds());
    }
    let json = |what: &str, v: Result<Value, serde_json::Error>| v.with_context(|| what.to_owned());
    let crds = crds
        .iter()
        .map(|c| json("a CustomResourceDefinition", serde_json::to_value(c)))
        .collect::<anyhow::Result<_>>()?;
    let rules =
        |r: Option<Vec<k8s_openapi::api::rbac::v1::PolicyRule>>| -> anyhow::Result<Vec<Value>> {
            r.unwrap_or_default()
                .iter()
                .map(|p| json("an RBAC rule", serde_json::to_value(p)))
                .collect()
        };
    Ok(Definitions {
        crds,
        cluster_rules: rules(sinew_k8s::rbac::cluster_role().rules)?,
        namespace_rules: rules(sinew_k8s::rbac::lease_role(&args.namespace).rules)?,
    })
}

/// `sinew install --kubernetes [--apply]`.
pub async fn install(args: InstallArgs) -> anyhow::Result<i32> {
    if !args.kubernetes {
        bail!("say where to install: --kubernetes");
    }
    let client = if args.apply {
        Some(client(args.kubeconfig.as_deref(), args.context.as_deref()).await?)
    } else {
        None
    };
    let opts = options(&args, client.as_ref()).await?;
    let manifests = sinew_inject::install::manifests(&opts, &definitions(&args)?)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let Some(client) = client else {
        print!(
            "{}",
            sinew_inject::install::to_yaml(&manifests).map_err(|e| anyhow::anyhow!("{e}"))?
        );
        return Ok(0);
    };
    apply(&client, &manifests).await?;
    Ok(0)
}

/// Server-side applies each manifest in order, as field manager `sinew-install`.
pub async fn apply(client: &kube::Client, manifests: &[Value]) -> anyhow::Result<()> {
    let params = PatchParams::apply("sinew-install").force();
    for m in manifests {
        let s = |p: &str| m.pointer(p).and_then(Value::as_str).unwrap_or("");
        let (api_version, kind, name) = (s("/apiVersion"), s("/kind"), s("/metadata/name"));
        let what = format!("{kind} {name}");
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let (resource, caps) = kube::discovery::pinned_kind(client, &gvk)
            .await
            .with_context(|| {
                format!("{what}: the API server does not serve {api_version} {kind}")
            })?;
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Namespaced => {
                let ns = s("/metadata/namespace");
                Api::namespaced_with(client.clone(), ns, &resource)
            }
            Scope::Cluster => Api::all_with(client.clone(), &resource),
        };
        // A CRD another installer made (the upstream Gateway API's, say) is theirs:
        // replacing it would swap its schema for Sinew's stand-in.
        if kind == "CustomResourceDefinition"
            && let Some(existing) = api
                .get_opt(name)
                .await
                .with_context(|| format!("{what}: cannot read the existing one"))?
            && !sinew_k8s::crd::made_by_sinew(existing.metadata.labels.as_ref())
        {
            eprintln!(
                "{what}: exists and was not installed by Sinew (no {}: sinew label); left alone",
                sinew_k8s::crd::MANAGED_BY
            );
            continue;
        }
        api.patch(name, &params, &Patch::Apply(m))
            .await
            .with_context(|| format!("{what}: not applied"))?;
        eprintln!("{what}: applied");
    }
    Ok(())
}
