//! `sinew inject` (offline) and `sinew webhook` (the admission webhook).

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use sinew_inject::InjectConfig;
use sinew_inject::server::{CertSource, Webhook, WebhookOptions};

/// What the sidecar looks like: the installation-wide injection settings (pods
/// override most of them with `sinew.dev/...` annotations).
#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// The image holding `sinew` and `sinew-proxy` (default: this version's release).
    #[arg(long)]
    pub proxy_image: Option<String>,
    /// imagePullPolicy of the injected containers.
    #[arg(long, value_parser = ["Always", "IfNotPresent", "Never"])]
    pub proxy_image_pull_policy: Option<String>,
    /// The control plane's address as proxies reach it (default: the Service
    /// `sinew install` creates).
    #[arg(long)]
    pub control_plane_address: Option<String>,
    /// The audience of the proxies' projected service-account tokens.
    #[arg(long, default_value = "sinew")]
    pub token_audience: String,
    /// The uid the proxy runs as (its own traffic is never captured).
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: i64,
    /// The proxy's log filter.
    #[arg(long, default_value = "info")]
    pub proxy_log_level: String,
    /// The proxy's CPU request.
    #[arg(long, default_value = "100m")]
    pub proxy_cpu_request: String,
    /// The proxy's CPU limit (none by default).
    #[arg(long)]
    pub proxy_cpu_limit: Option<String>,
    /// The proxy's memory request.
    #[arg(long, default_value = "64Mi")]
    pub proxy_memory_request: String,
    /// The proxy's memory limit.
    #[arg(long, default_value = "256Mi")]
    pub proxy_memory_limit: String,
    /// Inbound ports never captured, in every pod (comma-separated ports or ranges).
    #[arg(long, value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<String>,
    /// Outbound ports never captured, in every pod.
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<String>,
    /// Outbound networks never captured, in every pod (e.g. 169.254.169.254/32).
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<String>,
    /// The cluster's Kubernetes version (e.g. v1.29.3): from 1.29 the proxy is a
    /// native sidecar (an init container with restartPolicy Always), before that a
    /// regular container (Jobs end it with POST /shutdown on its admin port).
    /// Default: `sinew webhook --kubernetes` asks the API server; otherwise the layout
    /// for every version (regular container). Nodes must run kubelets of that version
    /// too (give 1.28 while older kubelets remain). For `sinew install` it chooses the
    /// PodDisruptionBudget's API (`--apply` asks the server); the installed webhook
    /// asks the API server itself.
    #[arg(long)]
    pub kubernetes_version: Option<String>,
    /// Namespaces never injected (repeatable), besides kube-system, kube-public and
    /// kube-node-lease.
    #[arg(long)]
    pub exclude_namespace: Vec<String>,
}

impl InjectArgs {
    /// The settings, checked; `image` and `control_plane` are the defaults for the
    /// flags left out.
    pub fn config(&self, image: &str, control_plane: &str) -> anyhow::Result<InjectConfig> {
        let mut c = InjectConfig {
            image: self.proxy_image.clone().unwrap_or_else(|| image.to_owned()),
            image_pull_policy: self.proxy_image_pull_policy.clone(),
            control_plane: self
                .control_plane_address
                .clone()
                .unwrap_or_else(|| control_plane.to_owned()),
            token_audience: self.token_audience.clone(),
            proxy_uid: self.proxy_uid,
            log_level: self.proxy_log_level.clone(),
            exclude_inbound_ports: self.exclude_inbound_ports.clone(),
            exclude_outbound_ports: self.exclude_outbound_ports.clone(),
            exclude_outbound_cidrs: self.exclude_outbound_cidrs.clone(),
            ..InjectConfig::default()
        };
        c.resources.cpu_request = Some(self.proxy_cpu_request.clone());
        c.resources.cpu_limit = self.proxy_cpu_limit.clone();
        c.resources.memory_request = Some(self.proxy_memory_request.clone());
        c.resources.memory_limit = Some(self.proxy_memory_limit.clone());
        if let Some(v) = &self.kubernetes_version {
            c.native_sidecar = sinew_inject::config::native_sidecars(v)
                .map_err(|e| anyhow::anyhow!("--kubernetes-version: {e}"))?;
        }
        for ns in &self.exclude_namespace {
            if !c.excluded_namespaces.contains(ns) {
                c.excluded_namespaces.push(ns.clone());
            }
        }
        if !(1..=i64::from(u32::MAX)).contains(&c.proxy_uid) {
            bail!("--proxy-uid {}: must be a non-root uid", c.proxy_uid);
        }
        c.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(c)
    }
}

/// `sinew inject -f FILE...`: prints every document, workloads injected; what happened
/// to each on stderr. Nothing is printed if any document is bad.
pub fn inject(files: &[PathBuf], args: &InjectArgs) -> anyhow::Result<i32> {
    let default = InjectConfig::default();
    let config = args.config(&default.image, &default.control_plane)?;
    let mut outputs = Vec::new();
    for path in files {
        let (label, text) = if path == Path::new("-") {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("cannot read standard input")?;
            ("-".to_owned(), s)
        } else {
            let label = path.display().to_string();
            let text =
                std::fs::read_to_string(path).with_context(|| format!("{label}: cannot read"))?;
            (label, text)
        };
        match sinew_inject::yaml::inject_yaml(&label, &text, &config) {
            Ok(out) => {
                for r in &out.reports {
                    eprintln!(
                        "{label}: document {} ({}): {}",
                        r.document, r.what, r.result
                    );
                }
                if !out.output.is_empty() {
                    outputs.push(out.output);
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(1);
            }
        }
    }
    out!("{}", outputs.join("---\n"))?;
    Ok(0)
}

/// `sinew webhook`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    /// The HTTPS listener (the API server calls POST /mutate; GET /healthz for probes).
    #[arg(long, default_value = "0.0.0.0:9443")]
    pub listen: SocketAddr,
    /// The serving certificate (PEM; re-read when it changes).
    #[arg(
        long,
        requires = "tls_key",
        required_unless_present_any = ["self_signed", "tls_secret"]
    )]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Instead of files: generate a certificate for these names (DNS names or IP
    /// addresses; repeatable) and write its CA, the caBundle, to --ca-out.
    #[arg(long, conflicts_with = "tls_cert", requires = "ca_out")]
    pub self_signed: Vec<String>,
    /// Where --self-signed writes the CA certificate (PEM).
    #[arg(long, requires = "self_signed")]
    pub ca_out: Option<PathBuf>,
    /// Use the Kubernetes API (KUBECONFIG, ~/.kube/config or in-cluster): the
    /// cluster's version chooses the sidecar layout (unless --kubernetes-version), and
    /// --tls-secret works.
    #[arg(long)]
    pub kubernetes: bool,
    /// The serving certificate's Secret (kubernetes.io/tls with ca.crt) in
    /// --namespace, made there (for the --service's names) if absent; the caBundle of
    /// --webhook-configuration is kept equal to its ca.crt. No key in a manifest.
    #[arg(long, requires = "kubernetes", conflicts_with_all = ["tls_cert", "self_signed"])]
    pub tls_secret: Option<String>,
    /// The MutatingWebhookConfiguration whose caBundle --tls-secret sets.
    #[arg(long, default_value = "sinew-injector", requires = "tls_secret")]
    pub webhook_configuration: String,
    /// The Service the API server calls the webhook through (its DNS names go into a
    /// certificate made for --tls-secret).
    #[arg(long, default_value = "sinew-control", requires = "tls_secret")]
    pub service: String,
    /// The namespace of --tls-secret and --service.
    #[arg(long, env = "POD_NAMESPACE", default_value = "sinew-system")]
    pub namespace: String,
    #[command(flatten)]
    pub inject: InjectArgs,
}

/// The serving certificate from its Secret (made if absent: certificate, key, CA).
async fn certificate_from_secret(
    client: &kube::Client,
    args: &WebhookArgs,
    secret: &str,
) -> anyhow::Result<(String, String, String)> {
    let ns = &args.namespace;
    let names = sinew_inject::install::InstallOptions::webhook_names_for(&args.service, ns);
    let mut v = sinew_k8s::ca::load_or_create(
        client,
        ns,
        secret,
        "kubernetes.io/tls",
        &["tls.crt", "tls.key", "ca.crt"],
        || {
            let c =
                sinew_inject::cert::generate(&names, Duration::from_secs(10 * 365 * 24 * 3600))?;
            Ok([
                ("tls.crt".to_owned(), c.cert_pem),
                ("tls.key".to_owned(), c.key_pem),
                ("ca.crt".to_owned(), c.ca_pem),
            ]
            .into())
        },
    )
    .await?;
    let mut take = |k: &str| v.remove(k).unwrap_or_default();
    Ok((take("tls.crt"), take("tls.key"), take("ca.crt")))
}

/// Keeps the webhook configuration's caBundle equal to `ca`: at start, and again
/// every ten seconds (the configuration may be applied after the webhook starts, or
/// re-applied).
async fn keep_ca_bundle(client: kube::Client, configuration: String, ca: String) {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let api: kube::Api<MutatingWebhookConfiguration> = kube::Api::all(client.clone());
    let name = sinew_inject::install::WEBHOOK_NAME;
    let mut warned = false;
    loop {
        let current = api.get_opt(&configuration).await;
        let matches = |m: &MutatingWebhookConfiguration| {
            m.webhooks.iter().flatten().any(|w| {
                w.name == name
                    && w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice())
                        == Some(ca.as_bytes())
            })
        };
        let outcome = match current {
            Ok(Some(m)) if matches(&m) => Ok(false),
            Ok(Some(_)) => sinew_k8s::ca::set_ca_bundle(&client, &configuration, name, &ca)
                .await
                .map(|()| true),
            Ok(None) => Err(format!(
                "MutatingWebhookConfiguration {configuration} does not exist (yet)"
            )),
            Err(e) => Err(format!(
                "MutatingWebhookConfiguration {configuration}: cannot be read: {e}"
            )),
        };
        match outcome {
            Ok(true) => {
                tracing::info!(configuration, "webhook caBundle set");
                warned = false;
            }
            Ok(false) => warned = false,
            Err(e) if !warned => {
                tracing::warn!("{e}; trying again");
                warned = true;
            }
            Err(_) => {}
        }
        // Soon while it is missing, then every ten seconds (a re-applied
        // configuration may have dropped it).
        let wait = if warned { 2 } else { 10 };
        tokio::time::sleep(Duration::from_secs(wait)).await;
    }
}

/// `sinew webhook`: serves until SIGTERM or SIGINT.
pub async fn webhook(args: WebhookArgs) -> anyhow::Result<Webhook> {
    let default = InjectConfig::default();
    let mut config = args.inject.config(&default.image, &default.control_plane)?;
    let client = if args.kubernetes {
        Some(
            kube::Client::try_default()
                .await
                .context("--kubernetes: no usable kubeconfig or in-cluster account")?,
        )
    } else {
        None
    };
    if let (Some(client), None) = (&client, &args.inject.kubernetes_version) {
        let version = sinew_k8s::ca::server_version(client).await.context(
            "--kubernetes: cannot read the API server's version (or give --kubernetes-version)",
        )?;
        config.native_sidecar = sinew_inject::config::native_sidecars(&version)
            .map_err(|e| anyhow::anyhow!("the API server's version: {e}"))?;
        tracing::info!(
            %version,
            native_sidecar = config.native_sidecar,
            "sidecar layout chosen from the API server's version"
        );
    }
    let mut ca_pem = None;
    let mut bundle = None;
    let cert = match (&args.tls_cert, &args.tls_key, &args.tls_secret, &client) {
        (Some(cert), Some(key), _, _) => CertSource::Files {
            cert: cert.clone(),
            key: key.clone(),
        },
        (_, _, Some(secret), Some(client)) => {
            let (cert, key, ca) = certificate_from_secret(client, &args, secret).await?;
            bundle = Some((client.clone(), ca));
            CertSource::Pem { cert, key }
        }
        _ => {
            let certs = sinew_inject::cert::generate(
                &args.self_signed,
                Duration::from_secs(365 * 24 * 3600),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            ca_pem = Some(certs.ca_pem);
            CertSource::Pem {
                cert: certs.cert_pem,
                key: certs.key_pem,
            }
        }
    };
    let hook = Webhook::start(WebhookOptions {
        listen: args.listen,
        cert,
        config,
        cert_check: sinew_inject::server::CERT_CHECK,
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    // Written once the listener is up: a script that waits for the file can connect.
    if let (Some(out), Some(ca)) = (&args.ca_out, ca_pem) {
        std::fs::write(out, ca).with_context(|| format!("{}: cannot write", out.display()))?;
    }
    // Once it serves: the API server may call it as soon as it trusts it.
    if let Some((client, ca)) = bundle {
        tokio::spawn(keep_ca_bundle(
            client,
            args.webhook_configuration.clone(),
            ca,
        ));
    }
    Ok(hook)
}
