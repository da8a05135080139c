//! `sinew install --kubernetes`: prints the installation's manifests, or applies them
//! with server-side apply.
//!
//! Keys: none is ever printed or applied from a render. The mesh CA (Secret
//! `sinew-ca`) and the webhook's serving certificate (Secret `sinew-webhook-tls`) are
//! made in the cluster by the first control-plane replica that starts, and kept by
//! every later install (an upgrade re-issues nothing). An operator's own CA goes into
//! the Secret with `--apply --ca-cert --ca-key` (created through the API, never
//! printed), or with `kubectl create secret generic sinew-ca --from-file=...`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
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
    /// With --apply: a directory with the webhook's tls.crt, tls.key and ca.crt, stored
    /// in its Secret (default: made in the cluster by the webhook).
    #[arg(long)]
    pub webhook_tls_dir: Option<PathBuf>,
    /// With --apply: the mesh CA certificate (PEM), stored in the Secret sinew-ca
    /// (default: a root made in the cluster by the control plane on first start).
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

/// The options from the flags; `version` is the cluster's (chooses the
/// PodDisruptionBudget's API).
fn options(args: &InstallArgs, version: Option<&str>) -> anyhow::Result<InstallOptions> {
    let image = args
        .image
        .clone()
        .unwrap_or_else(sinew_inject::config::default_image);
    // The webhook reads the cluster's version itself (an upgraded cluster gets native
    // sidecars without a re-install): the flag only shapes these manifests.
    let mut inject_args = args.inject.clone();
    inject_args.kubernetes_version = None;
    let inject = inject_args.config(&image, &InstallOptions::control_plane_url(&args.namespace))?;
    let pdb_api_version = match version {
        Some(v) if !policy_v1(v)? => "policy/v1beta1",
        _ => "policy/v1",
    };
    Ok(InstallOptions {
        namespace: args.namespace.clone(),
        image,
        replicas: args.replicas,
        trust_domain: args.trust_domain.clone(),
        failure_policy: args.webhook_failure_policy.clone(),
        inject,
        pdb_api_version: pdb_api_version.to_owned(),
    })
}

/// Whether a cluster of this version serves `policy/v1` PodDisruptionBudgets (1.21+).
fn policy_v1(version: &str) -> anyhow::Result<bool> {
    let v = version.trim().trim_start_matches('v');
    let mut parts = v.split('.');
    let number = |p: Option<&str>| -> Option<u32> {
        let digits: String = p?.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    match (number(parts.next()), number(parts.next())) {
        (Some(1), Some(minor)) => Ok(minor >= 21),
        (Some(major), Some(_)) if major > 1 => Ok(true),
        _ => bail!("--kubernetes-version {version:?}: not a Kubernetes version (e.g. v1.29.3)"),
    }
}

/// `--ca-cert/--ca-key` and `--webhook-tls-dir`, stored in their Secrets through the
/// API (created, never printed; a Secret already there is kept and must match).
async fn store_given_keys(client: &kube::Client, args: &InstallArgs) -> anyhow::Result<()> {
    let ns = &args.namespace;
    // (Secret name, its type, its keys and values)
    type Given<'a> = (&'a str, &'a str, Vec<(&'a str, String)>);
    let mut given: Vec<Given> = Vec::new();
    if let (Some(c), Some(k)) = (&args.ca_cert, &args.ca_key) {
        let (c, k) = (read(c)?, read(k)?);
        sinew_tls::Ca::from_pem(&c, &k).map_err(|e| anyhow::anyhow!("--ca-cert/--ca-key: {e}"))?;
        given.push((CA_SECRET, "Opaque", vec![("ca.pem", c), ("ca-key.pem", k)]));
    }
    if let Some(dir) = &args.webhook_tls_dir {
        given.push((
            WEBHOOK_SECRET,
            "kubernetes.io/tls",
            vec![
                ("tls.crt", read(&dir.join("tls.crt"))?),
                ("tls.key", read(&dir.join("tls.key"))?),
                ("ca.crt", read(&dir.join("ca.crt"))?),
            ],
        ));
    }
    if given.is_empty() {
        return Ok(());
    }
    // The namespace first: the Secrets live in it.
    apply(
        client,
        &[serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})],
    )
    .await?;
    for (name, type_, values) in given {
        let keys: Vec<&str> = values.iter().map(|(k, _)| *k).collect();
        let wanted: std::collections::BTreeMap<String, String> = values
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        let w = wanted.clone();
        let stored =
            sinew_k8s::ca::load_or_create(client, ns, name, type_, &keys, move || Ok(w)).await?;
        if stored != wanted {
            bail!(
                "Secret {ns}/{name} already holds other keys; it is kept (delete it first to replace it: every proxy's certificate then changes)"
            );
        }
        eprintln!("Secret {name}: stored");
    }
    Ok(())
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
    if client.is_none() && (args.ca_cert.is_some() || args.webhook_tls_dir.is_some()) {
        bail!(
            "--ca-cert/--ca-key and --webhook-tls-dir need --apply: keys are never printed. \
             Without --apply, create the Secrets yourself, e.g. `kubectl -n {ns} create secret generic {CA_SECRET} --from-file=ca.pem=CERT --from-file=ca-key.pem=KEY` \
             and `kubectl -n {ns} create secret generic {WEBHOOK_SECRET} --type=kubernetes.io/tls --from-file=tls.crt --from-file=tls.key --from-file=ca.crt`",
            ns = args.namespace
        );
    }
    let version = match (&args.inject.kubernetes_version, &client) {
        (Some(v), _) => Some(v.clone()),
        (None, Some(c)) => Some(
            sinew_k8s::ca::server_version(c)
                .await
                .context("cannot read the API server's version")?,
        ),
        (None, None) => None,
    };
    let opts = options(&args, version.as_deref())?;
    let manifests = sinew_inject::install::manifests(&opts, &definitions(&args)?)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let Some(client) = client else {
        out!(
            "{}",
            sinew_inject::install::to_yaml(&manifests).map_err(|e| anyhow::anyhow!("{e}"))?
        )?;
        return Ok(0);
    };
    store_given_keys(&client, &args).await?;
    apply(&client, &manifests).await?;
    // An upgrade from an installation that applied the caBundle itself drops it
    // (server-side apply removes what its manager no longer sets): put the webhook's
    // back at once rather than when the webhook next checks.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), &args.namespace);
    if let Some(ca) = secrets
        .get_opt(WEBHOOK_SECRET)
        .await
        .with_context(|| format!("cannot read Secret {}/{WEBHOOK_SECRET}", args.namespace))?
        .and_then(|s| s.data?.remove("ca.crt"))
        .and_then(|b| String::from_utf8(b.0).ok())
    {
        sinew_k8s::ca::set_ca_bundle(
            &client,
            sinew_inject::install::WEBHOOK_CONFIGURATION,
            sinew_inject::install::WEBHOOK_NAME,
            &ca,
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        eprintln!(
            "MutatingWebhookConfiguration {}: caBundle kept",
            sinew_inject::install::WEBHOOK_CONFIGURATION
        );
    }
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
