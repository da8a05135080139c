//! `sinew`: the control plane (`sinew control`) and the operator CLI.
//!
//! Client commands talk to the control plane's Admin API over TLS (`--server`, else
//! the credential's server, else `https://127.0.0.1:15010`), with an operator
//! credential (`--credentials`, `SINEW_CREDENTIALS`, `~/.config/sinew/credentials`,
//! or `sinew-data/admin.credentials`). Every failure is one sentence on stderr and a
//! non-zero exit. Output to a reader that went away (`sinew get pods | head -1`) ends
//! the command quietly with success, never with a panic.

/// `println!` that returns the write's `io::Result` instead of panicking: every
/// command's output goes through it (or [`out!`]), and `main` takes a broken pipe for
/// the reader being done.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

/// `print!` that returns the write's `io::Result` (see [`outln!`]).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*)
    }};
}

mod client;
mod health;
mod inject;
mod install;
mod run;
mod telemetry;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};

/// Sinew service mesh.
#[derive(Debug, Parser)]
#[command(name = "sinew", version, about)]
struct Cli {
    /// The control plane's address (https://host:port); default: the credential's,
    /// else https://127.0.0.1:15010.
    #[arg(long, global = true, env = "SINEW_SERVER")]
    server: Option<String>,
    /// The operator credential file (written by `sinew control` on first start as
    /// <data-dir>/admin.credentials, or by `sinew credentials create`).
    #[arg(long, global = true, env = "SINEW_CREDENTIALS")]
    credentials: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Rotate the trust anchor with no downtime: `start` (trust a new root beside
    /// the old one), `reissue` (the new root signs; every proxy renews now),
    /// `finish` (retire the old root). `sinew check` shows the progress.
    Rotate {
        /// start, reissue or finish.
        #[arg(value_parser = ["start", "reissue", "finish"])]
        phase: String,
        /// For start: an operator's new CA certificate (a path on the control plane's host).
        #[arg(long, requires = "ca_key")]
        ca_cert: Option<PathBuf>,
        /// For start: its key (a path on the control plane's host; never sent).
        #[arg(long, requires = "ca_cert")]
        ca_key: Option<PathBuf>,
        /// For finish: retire the old root even if proxies still use it.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token for spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
    Create {
        /// Namespace of the identity (and of the proxies that may use the token).
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// Service account of the identity.
        #[arg(long)]
        service_account: String,
        /// How long the token is valid (at most 7 days).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        /// How many proxies may bootstrap with it (e.g. an autoscaling group).
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
    /// List the tokens not yet used up or expired (never the tokens themselves).
    List,
    /// Revoke a token by its id (from `list` or `create`).
    Revoke {
        /// The token's id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum CredentialsCommand {
    /// Issue a credential: the key is made here, the file written 0600.
    Create {
        /// Who holds it (lowercase letters, digits, '-', '.').
        name: String,
        /// viewer (read), operator (also apply, delete, tap) or admin (also tokens,
        /// CA rotation, credentials).
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
        /// How long it is valid (at most 366 days).
        #[arg(long, default_value = "720h", value_parser = parse_duration)]
        ttl: Duration,
        /// Where to write it; default `<name>.credentials`.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// List every credential issued, with its role and state.
    List,
    /// Revoke every credential of this name: its calls are refused from now on.
    Revoke {
        /// The credential's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane.
    Control {
        /// gRPC listener for proxies and the CLI.
        #[arg(long, default_value = "127.0.0.1:15010")]
        listen: std::net::SocketAddr,
        /// Where applied resources are stored (created with owner-only permissions).
        #[arg(long, default_value = "sinew-data")]
        data_dir: PathBuf,
        /// A directory of YAML documents to watch and apply.
        #[arg(long)]
        config_dir: Option<PathBuf>,
        /// Seconds a disconnected proxy's workload stays registered.
        #[arg(long, default_value_t = 30)]
        grace_period: u64,
        /// Milliseconds changes are gathered before proxies are told.
        #[arg(long, default_value_t = 20)]
        debounce_ms: u64,
        /// SPIFFE trust domain of the mesh.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// An operator-provided CA certificate (an intermediate followed by its chain to
        /// the root); default: a root generated under <data-dir>/ca on first start.
        #[arg(long, requires = "ca_key")]
        ca_cert: Option<PathBuf>,
        /// The CA's private key (PEM); keep it owner-only.
        #[arg(long, requires = "ca_cert")]
        ca_key: Option<PathBuf>,
        /// A directory holding the CA (ca.pem, ca-key.pem; a root is generated there
        /// if it is empty); default <data-dir>/ca. Rotation state is kept there too.
        #[arg(long, conflicts_with = "ca_cert")]
        ca_dir: Option<PathBuf>,
        /// How long a workload certificate is valid (e.g. 24h, 1h30m); proxies renew
        /// at about 70% of it.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        cert_ttl: Duration,
        /// Take Services, endpoints, Pods and Sinew/Gateway API/SMI custom resources from
        /// the Kubernetes API (KUBECONFIG, ~/.kube/config, or in-cluster), and accept
        /// proxies' service-account tokens (checked with TokenReview). What `sinew
        /// apply` writes becomes custom resources, and join tokens and operator
        /// credentials live in the control plane's namespace there: every replica
        /// shares them.
        #[arg(long)]
        kubernetes: bool,
        /// The control plane's namespace in the cluster: where the Lease that elects the
        /// replica writing resource statuses is, and the join-token Secrets and the
        /// operator credentials ConfigMap.
        #[arg(
            long,
            env = "POD_NAMESPACE",
            default_value = "default",
            requires = "kubernetes"
        )]
        lease_namespace: String,
        /// The audience proxies' service-account tokens must be issued for.
        #[arg(long, default_value = "sinew", requires = "kubernetes")]
        token_audience: String,
        /// Seconds the status-writer's Lease lasts without renewal (another replica
        /// takes over after that).
        #[arg(long, default_value_t = 15, requires = "kubernetes")]
        lease_duration_secs: u64,
        /// The control plane's namespace: its certificate is
        /// spiffe://<trust-domain>/ns/<namespace>/sa/sinew-control.
        #[arg(long, env = "POD_NAMESPACE", default_value = "sinew-system")]
        namespace: String,
        /// A DNS name or address clients reach the control plane by (repeatable); it
        /// goes into its certificate beside localhost, the host name and loopback.
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        /// Where the admin credential is written on first start (when no file is
        /// there); default <data-dir>/admin.credentials.
        #[arg(long)]
        admin_credentials: Option<PathBuf>,
        /// The URL written into the admin credential; default https://<listen>.
        #[arg(long)]
        advertise: Option<String>,
        /// Migration from the plaintext API: also serve proxies of earlier releases
        /// over plaintext on the same port (their claims unverified, as before).
        /// Off by default; for the upgrade window only.
        #[arg(long)]
        plaintext_window: bool,
        /// With --kubernetes: the Secret (in --namespace) holding the mesh CA (ca.pem,
        /// ca-key.pem), as `sinew install` sets it up (sinew-ca). Every replica reads
        /// it; the first to start with none generates a root and creates it, so all
        /// replicas, and any replica restarted on a fresh disk, share one CA.
        #[arg(long, requires = "kubernetes", conflicts_with_all = ["ca_cert", "ca_dir"])]
        ca_secret: Option<String>,
        /// Serve plain-HTTP /live and /ready here, for the kubelet's probes.
        #[arg(long)]
        health_listen: Option<SocketAddr>,
    },
    /// The certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Join tokens: the credential a proxy presents once to get its certificate.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Operator credentials: who may call the control plane, and with which role.
    Credentials {
        #[command(subcommand)]
        command: CredentialsCommand,
    },
    /// Validate documents and store them (all or nothing).
    Apply {
        /// Files or directories of .yaml/.yml files; `-` reads standard input.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Validate against what is stored, but store nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show resources.
    Get {
        /// Kind: service, workload, httproute, routepolicy, trafficpolicy, proxy,
        /// meshconfig, or all.
        kind: String,
        /// A name (optional).
        name: Option<String>,
        /// Namespace.
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Output format.
        #[arg(short, long, default_value = "table", value_parser = ["table", "yaml", "json"])]
        output: String,
    },
    /// Delete resources, by kind and name or by the documents in files.
    Delete {
        /// Kind (with NAME).
        kind: Option<String>,
        /// Name.
        name: Option<String>,
        /// Namespace.
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// Delete what these files define.
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
    },
    /// Every proxy: workload, connected or not, applied version against the latest,
    /// last refusal.
    ProxyStatus {
        /// Output format.
        #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Golden signals (success rate, requests/s, latency percentiles) per service,
    /// workload or route, as the proxies report them: no Prometheus needed.
    Stat {
        /// Group by service, workload or route.
        #[arg(long, default_value = "service", value_parser = ["service", "workload", "route"])]
        by: String,
        /// Only this namespace (default: every namespace).
        #[arg(short, long)]
        namespace: Option<String>,
        /// How far back to look, e.g. 30s (at most 60s).
        #[arg(short, long, default_value = "60s", value_parser = parse_duration)]
        window: Duration,
        /// Read the servers' proxies (inbound) or the callers' (outbound); default:
        /// each group's servers when they have sidecars, else its callers.
        #[arg(long, value_parser = ["inbound", "outbound"])]
        direction: Option<String>,
        /// Output format.
        #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// The busiest paths right now (the last 10 to 20 s), refreshed until Ctrl-C.
    Top {
        /// Only this service (`name` or `name.namespace`).
        service: Option<String>,
        /// Only this namespace.
        #[arg(short, long)]
        namespace: Option<String>,
        /// Rows to show.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// How often to refresh, e.g. 2s.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        interval: Duration,
        /// Print once and exit (implied by -o json).
        #[arg(long)]
        once: bool,
        /// Output format.
        #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Live requests from every proxy, as they happen (no bodies; credentials
    /// redacted), until Ctrl-C or --limit.
    Tap {
        /// Only requests to this service (`name` or `name.namespace`).
        #[arg(long)]
        service: Option<String>,
        /// Only paths starting with this.
        #[arg(long)]
        path: Option<String>,
        /// Only this method.
        #[arg(long)]
        method: Option<String>,
        /// Only this status (503) or class (5xx).
        #[arg(long)]
        status: Option<String>,
        /// Only as seen by the servers' proxies (inbound) or the callers' (outbound).
        #[arg(long, value_parser = ["inbound", "outbound"])]
        direction: Option<String>,
        /// Stop after this many requests.
        #[arg(long)]
        limit: Option<u64>,
        /// Output format: one line, or one JSON object, per request.
        #[arg(short, long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
    /// Who calls whom: callers, services, identities, mTLS, request counts.
    Edges {
        /// Only edges from or to this namespace.
        #[arg(short, long)]
        namespace: Option<String>,
        /// How far back to look, e.g. 30s (at most 60s).
        #[arg(short, long, default_value = "60s", value_parser = parse_duration)]
        window: Duration,
        /// Output format.
        #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Check the installation: one pass/fail line per check; non-zero if any fails.
    Check {
        /// Seconds to wait for proxies to catch up before calling them out of sync.
        #[arg(long, default_value_t = 5)]
        wait: u64,
    },
    /// Validate documents locally, without a control plane.
    Validate {
        /// Files or directories of .yaml/.yml files; `-` reads standard input.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Add the sidecar to Kubernetes workloads (Pods, Deployments, StatefulSets,
    /// DaemonSets, ReplicaSets, Jobs, CronJobs) in YAML files, offline: prints every
    /// document, injected where it is a workload, e.g. `sinew inject -f app.yaml |
    /// kubectl apply -f -`.
    Inject {
        /// YAML files (multi-document); `-` reads standard input.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        inject: inject::InjectArgs,
    },
    /// Run the sidecar-injection admission webhook (HTTPS; `sinew install
    /// --kubernetes` runs it beside the control plane).
    Webhook(inject::WebhookArgs),
    /// Print (or --apply) the manifests that install Sinew: CRDs, RBAC, the control
    /// plane, the injection webhook and their certificates.
    Install(install::InstallArgs),
    /// Run the demo mesh on loopback: a control plane, four services (one in two
    /// versions) each behind its own sinew-proxy, a 90/10 canary and steady load.
    Demo(sinew_demo::DemoArgs),
    /// The demo's sample workload: serves HTTP and gRPC and calls its downstreams.
    DemoApp(sinew_demo::app::AppArgs),
    /// Install transparent capture rules (iptables, ip6tables) in the current network
    /// namespace: the workload's inbound and outbound TCP go to its sidecar, with no
    /// change to the application. Needs root (CAP_NET_ADMIN).
    Init(InitArgs),
    /// Run an unmodified app in the mesh on this Linux host: installs capture in the
    /// current network namespace, starts the sidecar as the proxy uid, then the app
    /// (`sinew run --service catalog --port http=8080 -- ./app args`); when the app
    /// exits, stops the sidecar and removes the rules. Needs root.
    Run(run::RunArgs),
    /// Print the version (and the control plane's, if reachable).
    Version,
    /// Print shell completions.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// `sinew init`'s flags.
#[derive(Debug, clap::Args)]
struct InitArgs {
    /// The proxy's uid: its own traffic is never captured.
    #[arg(long, default_value_t = sinew_capture::DEFAULT_PROXY_UID)]
    proxy_uid: u32,
    /// Where inbound TCP is redirected (the proxy's inbound capture port).
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// Where outbound TCP is redirected (the proxy's outbound capture port).
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    /// Where outbound DNS (UDP 53) is redirected (the proxy's DNS port); default: DNS
    /// is not captured.
    #[arg(long)]
    dns_port: Option<u16>,
    /// Inbound ports left alone, comma-separated (ranges as 8000:8100), e.g. 22.
    #[arg(long, default_value = "", value_parser = sinew_capture::parse_ports)]
    exclude_inbound_ports: std::vec::Vec<sinew_capture::PortRange>,
    /// Outbound destination ports left alone, comma-separated.
    #[arg(long, default_value = "", value_parser = sinew_capture::parse_ports)]
    exclude_outbound_ports: std::vec::Vec<sinew_capture::PortRange>,
    /// Outbound destinations left alone, comma-separated CIDRs (IPv4 and IPv6).
    #[arg(long, default_value = "", value_parser = sinew_capture::parse_cidrs)]
    exclude_outbound_cidrs: std::vec::Vec<sinew_model::vip::Cidr>,
    /// IPv4 only: leave IPv6 (ip6tables) alone.
    #[arg(long)]
    no_ipv6: bool,
    /// Which iptables programs: auto (the system's `iptables-restore`), legacy or nft.
    #[arg(long, default_value = "auto")]
    backend: sinew_capture::Backend,
    /// Remove the capture rules (exactly those `sinew init` installed) instead.
    #[arg(long)]
    uninstall: bool,
}

impl InitArgs {
    fn options(&self) -> sinew_capture::Options {
        sinew_capture::Options {
            proxy_uid: self.proxy_uid,
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            dns_port: self.dns_port,
            exclude_inbound_ports: self.exclude_inbound_ports.clone(),
            exclude_outbound_ports: self.exclude_outbound_ports.clone(),
            exclude_outbound_cidrs: self.exclude_outbound_cidrs.clone(),
            ipv6: !self.no_ipv6,
            backend: self.backend,
        }
    }
}

fn init(args: &InitArgs) -> anyhow::Result<i32> {
    if args.uninstall {
        let removed = sinew_capture::uninstall(args.backend, !args.no_ipv6)?;
        outln!(
            "{}",
            if removed {
                "capture rules removed"
            } else {
                "no capture rules were installed"
            }
        )?;
    } else {
        sinew_capture::install(&args.options())?;
        outln!(
            "capture rules installed: inbound TCP -> :{}, outbound TCP -> :{}, uid {} exempt",
            args.inbound_port,
            args.outbound_port,
            args.proxy_uid
        )?;
    }
    Ok(0)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    match sinew_model::duration::parse(s)? {
        d if d.is_zero() => Err("must be more than zero".into()),
        d => Ok(d),
    }
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(run(cli)),
        Err(e) => Err(anyhow::anyhow!("cannot start the runtime: {e}")),
    };
    match result {
        Ok(code) => std::process::exit(code),
        // The reader of our output is done (`| head`): so are we.
        Err(e) if broken_pipe(&e) => std::process::exit(0),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Whether `e` is, or was caused by, a write to a pipe whose reader has gone.
fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let server = client::Server::resolve(cli.server, cli.credentials)?;
    match cli.command {
        Command::Control {
            listen,
            data_dir,
            config_dir,
            grace_period,
            debounce_ms,
            trust_domain,
            ca_cert,
            ca_key,
            ca_dir,
            cert_ttl,
            kubernetes,
            lease_namespace,
            token_audience,
            lease_duration_secs,
            namespace,
            server_names,
            admin_credentials,
            advertise,
            plaintext_window,
            ca_secret,
            health_listen,
        } => {
            let health = match health_listen {
                Some(addr) => Some(health::Health::start(addr).await?),
                None => None,
            };
            // On Kubernetes the CA lives in its Secret (shared by every replica, kept
            // when a pod's disk is not); it is copied into the CA directory the
            // control plane loads, which keeps rotation working there.
            if let Some(ca_secret) = &ca_secret {
                let client = kube::Client::try_default()
                    .await
                    .context("--kubernetes: no usable kubeconfig or in-cluster account")?;
                let (cert, key) =
                    sinew_k8s::ca::load_or_create_ca(&client, &namespace, ca_secret, &trust_domain)
                        .await?;
                write_ca(&data_dir.join("ca"), &cert, &key)?;
            }
            let admin_file = admin_credentials
                .clone()
                .unwrap_or_else(|| data_dir.join(sinew_control::credentials::ADMIN_FILE));
            let mut opts = sinew_control::ControlOptions::new(data_dir);
            opts.trust_domain = trust_domain.clone();
            opts.ca_files = ca_cert.zip(ca_key);
            opts.ca_dir = ca_dir;
            opts.cert_ttl = cert_ttl;
            opts.listen = listen;
            opts.config_dir = config_dir;
            opts.grace_period = Duration::from_secs(grace_period);
            opts.debounce = Duration::from_millis(debounce_ms);
            opts.namespace = namespace.clone();
            opts.server_names = server_names;
            opts.admin_credentials = admin_credentials;
            opts.advertise = advertise;
            opts.limits.plaintext_window = plaintext_window;
            if plaintext_window {
                tracing::warn!(
                    "--plaintext-window: proxies of earlier releases are served over plaintext, unauthenticated; upgrade them and restart without it"
                );
            }
            if kubernetes {
                // Applied documents, join tokens and operator credentials live in the
                // API server, beside the Lease: every replica serves the same, and one
                // with a fresh disk loses nothing.
                let shared = sinew_k8s::shared_state(&lease_namespace)
                    .await
                    .map_err(|e| anyhow::anyhow!("--kubernetes: {e}"))?;
                opts.shared = Some(shared);
            }
            let cp = sinew_control::ControlPlane::start(opts).await?;
            if let Some(ca_secret) = &ca_secret {
                // Every replica signs with the Secret's CA; a rotation through one
                // would move that replica alone. Not supported yet: said, not done.
                cp.identity().refuse_rotation(format!(
                    "the CA comes from the Secret {namespace}/{ca_secret}, shared by every replica: rotating it through one replica is not supported yet"
                ));
            }
            let mut source = None;
            if kubernetes {
                // The operator's first credential, where kubectl can read it (the image
                // has no shell to `cat` a file): the first replica's, in a Secret of its
                // namespace; RBAC on Secrets guards it, as Argo CD's initial admin secret.
                let file = std::fs::read_to_string(&admin_file)
                    .with_context(|| format!("the admin credential {}", admin_file.display()))?;
                let client = kube::Client::try_default()
                    .await
                    .context("--kubernetes: no usable kubeconfig or in-cluster account")?;
                sinew_k8s::ca::load_or_create(
                    &client,
                    &lease_namespace,
                    sinew_k8s::ca::ADMIN_CREDENTIAL_SECRET,
                    "Opaque",
                    &[sinew_k8s::ca::ADMIN_CREDENTIAL_KEY],
                    || Ok([(sinew_k8s::ca::ADMIN_CREDENTIAL_KEY.to_owned(), file)].into()),
                )
                .await?;
                let mut k = sinew_k8s::KubernetesOptions::default();
                k.source.lease_namespace = lease_namespace;
                k.source.trust_domain = trust_domain;
                k.source.lease_duration = Duration::from_secs(lease_duration_secs.max(1));
                k.token_audience = Some(token_audience);
                // Ready once the cluster's state is in (not merely once serving).
                k.source.synced = health.as_ref().map(health::Health::flag);
                source = Some(
                    sinew_k8s::start(&cp, k)
                        .await
                        .map_err(|e| anyhow::anyhow!("--kubernetes: {e}"))?,
                );
            }
            if let (Some(h), None) = (&health, &source) {
                h.set_ready(true);
            }
            match source {
                Some(mut task) => tokio::select! {
                    r = wait_for_signal() => r?,
                    r = &mut task => match r {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => anyhow::bail!("--kubernetes: {e}"),
                        Err(e) => anyhow::bail!("--kubernetes: the source stopped: {e}"),
                    },
                },
                None => wait_for_signal().await?,
            }
            tracing::info!("stopping");
            if let Some(h) = &health {
                h.set_ready(false);
            }
            cp.shutdown().await;
            Ok(0)
        }
        Command::Ca {
            command:
                CaCommand::Rotate {
                    phase,
                    ca_cert,
                    ca_key,
                    force,
                },
        } => {
            client::rotate_ca(
                &server,
                &phase,
                ca_cert.as_deref(),
                ca_key.as_deref(),
                force,
            )
            .await
        }
        Command::Token {
            command:
                TokenCommand::Create {
                    namespace,
                    service_account,
                    ttl,
                    uses,
                },
        } => client::create_token(&server, &namespace, &service_account, ttl, uses).await,
        Command::Token {
            command: TokenCommand::List,
        } => client::list_tokens(&server).await,
        Command::Token {
            command: TokenCommand::Revoke { id },
        } => client::revoke_token(&server, &id).await,
        Command::Credentials {
            command:
                CredentialsCommand::Create {
                    name,
                    role,
                    ttl,
                    output,
                },
        } => client::create_credential(&server, &name, &role, ttl, output.as_deref()).await,
        Command::Credentials {
            command: CredentialsCommand::List,
        } => client::list_credentials(&server).await,
        Command::Credentials {
            command: CredentialsCommand::Revoke { name },
        } => client::revoke_credential(&server, &name).await,
        Command::Apply { files, dry_run } => client::apply(&server, &files, dry_run).await,
        Command::Get {
            kind,
            name,
            namespace,
            all_namespaces,
            output,
        } => {
            let ns = if all_namespaces {
                String::new()
            } else {
                namespace
            };
            client::get(&server, &kind, name.as_deref(), &ns, &output).await
        }
        Command::Delete {
            kind,
            name,
            namespace,
            files,
        } => {
            client::delete(
                &server,
                kind.as_deref(),
                name.as_deref(),
                &namespace,
                &files,
            )
            .await
        }
        Command::ProxyStatus { output } => client::proxy_status(&server, &output).await,
        Command::Stat {
            by,
            namespace,
            window,
            direction,
            output,
        } => {
            telemetry::stat(
                &server,
                &by,
                namespace.as_deref(),
                window,
                direction.as_deref(),
                &output,
            )
            .await
        }
        Command::Top {
            service,
            namespace,
            limit,
            interval,
            once,
            output,
        } => {
            telemetry::top(
                &server,
                namespace.as_deref(),
                service.as_deref(),
                limit,
                interval,
                once,
                &output,
            )
            .await
        }
        Command::Tap {
            service,
            path,
            method,
            status,
            direction,
            limit,
            output,
        } => {
            let filter = sinew_api::v1::TapFilter {
                direction: direction.unwrap_or_default(),
                service: service.unwrap_or_default(),
                path: path.unwrap_or_default(),
                method: method.unwrap_or_default(),
                status: status.unwrap_or_default(),
                limit: limit.unwrap_or(0),
            };
            telemetry::tap(&server, filter, &output).await
        }
        Command::Edges {
            namespace,
            window,
            output,
        } => telemetry::edges(&server, namespace.as_deref(), window, &output).await,
        Command::Check { wait } => client::check(&server, Duration::from_secs(wait)).await,
        Command::Validate { files } => client::validate(&files),
        Command::Inject { files, inject } => inject::inject(&files, &inject),
        Command::Webhook(args) => {
            let hook = inject::webhook(args).await?;
            wait_for_signal().await?;
            tracing::info!("stopping");
            hook.shutdown().await;
            Ok(0)
        }
        Command::Install(args) => install::install(args).await,
        Command::Demo(args) => sinew_demo::run(args).await.map(|()| 0),
        Command::DemoApp(args) => sinew_demo::app::run(args).await.map(|()| 0),
        Command::Init(args) => init(&args),
        Command::Run(args) => run::run(&server, args).await,
        Command::Version => {
            outln!("sinew {}", env!("CARGO_PKG_VERSION"))?;
            if let Ok(v) = client::server_version(&server).await {
                outln!("control plane {v} at {server}")?;
            }
            Ok(0)
        }
        Command::Completions { shell } => {
            // Generated into memory first: clap_complete panics when a write fails.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "sinew", &mut script);
            std::io::Write::write_all(&mut std::io::stdout().lock(), &script)?;
            Ok(0)
        }
    }
}

/// Puts the CA from its Secret into `dir` (`ca.pem`, `ca-key.pem` owner-only), where
/// the control plane loads it. The Secret wins over what a reused disk holds.
fn write_ca(dir: &std::path::Path, cert: &str, key: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("{}: cannot restrict", dir.display()))?;
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    let same = std::fs::read_to_string(&cert_path).is_ok_and(|c| c == cert)
        && std::fs::read_to_string(&key_path).is_ok_and(|k| k == key);
    if same {
        return Ok(());
    }
    if cert_path.exists() {
        tracing::warn!(dir = %dir.display(), "the CA on disk differs from its Secret's: using the Secret's");
    }
    let _ = std::fs::remove_file(&key_path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .with_context(|| format!("{}: cannot write", key_path.display()))?;
    std::io::Write::write_all(&mut f, key.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("{}: cannot write", key_path.display()))?;
    std::fs::write(&cert_path, cert)
        .with_context(|| format!("{}: cannot write", cert_path.display()))?;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
