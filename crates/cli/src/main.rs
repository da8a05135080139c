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
mod context;
mod health;
mod inject;
mod install;
mod run;
mod telemetry;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use sinew_model::duration::{flag_millis, flag_secs};

/// Sinew service mesh.
#[derive(Debug, Parser)]
#[command(name = "sinew", version, about)]
struct Cli {
    /// Where a client command's control plane is, given before the command
    /// (`sinew --server URL get ...`), as earlier releases took it: kept, hidden, and
    /// refused for commands that do not call the control plane. After the command
    /// is where they are documented.
    #[command(flatten)]
    client: TopClientArgs,
    #[command(subcommand)]
    command: Command,
}

/// The hidden spellings of [`ClientArgs`] before the command.
#[derive(Debug, Clone, Default, clap::Args)]
struct TopClientArgs {
    #[arg(long, hide = true)]
    server: Option<String>,
    #[arg(long, hide = true)]
    credentials: Option<PathBuf>,
    #[arg(long, hide = true)]
    context: Option<String>,
}

/// Which control plane a client command calls, and as whom: on every command that
/// calls it (and only there). Each is its flag, else its environment variable, else
/// the context's, else the default.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Control plane")]
struct ClientArgs {
    /// The control plane's URL, https://host:port [env: SINEW_SERVER; default: the
    /// context's, else the credential's, else https://127.0.0.1:15010].
    #[arg(long, value_name = "URL")]
    server: Option<String>,
    /// The operator credential file [env: SINEW_CREDENTIALS; default: the context's,
    /// else ~/.config/sinew/credentials, else ./sinew-data/admin.credentials].
    #[arg(long, value_name = "FILE")]
    credentials: Option<PathBuf>,
    /// The context to use (`sinew context list`) [env: SINEW_CONTEXT; default: the
    /// current context].
    #[arg(long, value_name = "NAME")]
    context: Option<String>,
}

/// The namespace a namespaced command looks at: one, or all.
#[derive(Debug, Clone, Default, clap::Args)]
struct NamespaceArgs {
    /// The namespace [env: SINEW_NAMESPACE; default: the context's, else `default`].
    #[arg(short = 'n', long, value_name = "NAMESPACE")]
    namespace: Option<String>,
    /// Every namespace.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    all_namespaces: bool,
}

impl NamespaceArgs {
    /// The namespace asked for, `None` for every namespace.
    fn scope(&self, target: &Target) -> Option<String> {
        if self.all_namespaces {
            None
        } else {
            Some(
                self.namespace
                    .clone()
                    .unwrap_or_else(|| target.namespace.clone()),
            )
        }
    }
}

/// A client command's resolved control plane and default namespace.
struct Target {
    server: client::Server,
    namespace: String,
}

/// Resolves the target field by field: flag (after the command, then before it),
/// environment, context, default. The context file is read only here, so a bad
/// one stops client commands only, with its path and field named.
fn resolve(top: &TopClientArgs, args: &ClientArgs) -> anyhow::Result<Target> {
    let file = context::path();
    let config = context::Config::load(&file)?;
    let name = args
        .context
        .clone()
        .or_else(|| top.context.clone())
        .or_else(|| context::env("SINEW_CONTEXT"));
    let ctx = config
        .select(name.as_deref(), &file)?
        .cloned()
        .unwrap_or_default();
    let server = args
        .server
        .clone()
        .or_else(|| top.server.clone())
        .or_else(|| context::env("SINEW_SERVER"))
        .or(ctx.server);
    let credentials = args
        .credentials
        .clone()
        .or_else(|| top.credentials.clone())
        .or_else(|| context::env("SINEW_CREDENTIALS").map(PathBuf::from))
        .or(ctx.credentials);
    let namespace = context::env("SINEW_NAMESPACE")
        .or(ctx.namespace)
        .unwrap_or_else(|| "default".to_owned());
    Ok(Target {
        server: client::Server::resolve(server, credentials)?,
        namespace,
    })
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
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token for spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
    Create {
        /// Namespace of the identity (and of the proxies that may use the token)
        /// [env: SINEW_NAMESPACE; default: the context's, else `default`].
        #[arg(short, long)]
        namespace: Option<String>,
        /// Service account of the identity.
        #[arg(long)]
        service_account: String,
        /// How long the token is valid, e.g. 30m, 24h (at most 7 days).
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        /// How many proxies may bootstrap with it (e.g. an autoscaling group).
        #[arg(long, default_value_t = 1)]
        uses: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List the tokens not yet used up or expired (never the tokens themselves).
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Revoke a token by its id (from `list` or `create`).
    Revoke {
        /// The token's id.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
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
        /// How long it is valid, e.g. 720h (at most 366 days).
        #[arg(long, value_name = "DURATION", default_value = "720h", value_parser = parse_duration)]
        ttl: Duration,
        /// Where to write it; default `<name>.credentials`.
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List every credential issued, with its role and state.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Revoke every credential of this name: its calls are refused from now on.
    Revoke {
        /// The credential's name.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
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
        /// How long a disconnected proxy's workload stays registered, e.g. 30s.
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = flag_secs)]
        grace_period: Duration,
        /// How long changes are gathered before proxies are told, e.g. 20ms.
        #[arg(long, value_name = "DURATION", default_value = "20ms", value_parser = flag_secs)]
        debounce: Duration,
        /// The old spelling of --debounce, in milliseconds.
        #[arg(long, hide = true, value_parser = flag_millis, conflicts_with = "debounce")]
        debounce_ms: Option<Duration>,
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
        #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
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
        /// How long the status-writer's Lease lasts without renewal (another replica
        /// takes over after that), e.g. 15s.
        #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration, requires = "kubernetes")]
        lease_duration: Duration,
        /// The old spelling of --lease-duration, in seconds.
        #[arg(long, hide = true, value_parser = parse_duration, requires = "kubernetes", conflicts_with = "lease_duration")]
        lease_duration_secs: Option<Duration>,
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
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show resources.
    #[command(
        after_help = "Examples:\n  sinew get services              (in the context's namespace, else default)\n  sinew get httproute catalog -n demo -o yaml\n  sinew get all -A"
    )]
    Get {
        /// Kind: service, workload, httproute, routepolicy, trafficpolicy,
        /// authorizationpolicy, requestauthentication, proxy, meshconfig, or all.
        kind: String,
        /// A name (optional).
        name: Option<String>,
        #[command(flatten)]
        ns: NamespaceArgs,
        /// Output format.
        #[arg(short, long, default_value = "table", value_parser = ["table", "yaml", "json"])]
        output: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete resources, by kind and name or by the documents in files.
    Delete {
        /// Kind (with NAME).
        kind: Option<String>,
        /// Name.
        name: Option<String>,
        /// The namespace of KIND NAME [env: SINEW_NAMESPACE; default: the context's,
        /// else `default`]. Documents in files name their own.
        #[arg(short, long)]
        namespace: Option<String>,
        /// Refused, as kubectl does: a name is deleted in one namespace at a time.
        #[arg(short = 'A', long, hide = true)]
        all_namespaces: bool,
        /// Delete what these files define.
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Every proxy: connected, in sync, last refusal.
    ///
    /// Each proxy's workload, whether it is connected, the configuration version it
    /// applied against the latest, and its last refusal (NACK).
    #[command(
        after_help = "Examples:\n  sinew proxy-status -n demo\n  sinew proxy-status -A -o json"
    )]
    ProxyStatus {
        #[command(flatten)]
        ns: NamespaceArgs,
        /// Output format.
        #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Success rate, requests/s and latency per service, workload or route.
    ///
    /// Golden signals (success rate, requests/s, latency percentiles) as the proxies
    /// report them: no Prometheus needed.
    #[command(
        after_help = "Examples:\n  sinew stat -n demo\n  sinew stat -A --by workload --window 30s\n  sinew stat -n demo --by route -o json"
    )]
    Stat {
        /// Group by service, workload or route.
        #[arg(long, default_value = "service", value_parser = ["service", "workload", "route"])]
        by: String,
        #[command(flatten)]
        ns: NamespaceArgs,
        /// How far back to look, e.g. 30s (at most 60s).
        #[arg(short, long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
        window: Duration,
        /// Read the servers' proxies (inbound) or the callers' (outbound); default:
        /// each group's servers when they have sidecars, else its callers.
        #[arg(long, value_parser = ["inbound", "outbound"])]
        direction: Option<String>,
        /// Output format.
        #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The busiest paths right now (the last 10 to 20 s), refreshed until Ctrl-C.
    #[command(
        after_help = "Examples:\n  sinew top -n demo\n  sinew top --service catalog -n demo --interval 5s"
    )]
    Top {
        /// Only this service (`name` or `name.namespace`).
        #[arg(long)]
        service: Option<String>,
        /// The old spelling of --service (a positional SERVICE).
        #[arg(hide = true, conflicts_with = "service")]
        service_positional: Option<String>,
        #[command(flatten)]
        ns: NamespaceArgs,
        /// Rows to show.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// How often to refresh, e.g. 2s.
        #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
        interval: Duration,
        /// Print once and exit (implied by -o json).
        #[arg(long)]
        once: bool,
        /// Output format.
        #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Live requests as the proxies see them, until Ctrl-C or --limit.
    ///
    /// Requests from the proxies of the namespace (or every one, -A), as they happen
    /// (no bodies; credentials redacted).
    #[command(
        after_help = "Examples:\n  sinew tap -n demo --service catalog --status 5xx\n  sinew tap -A --path /api --limit 10 -o json"
    )]
    Tap {
        /// Only requests to this service (`name` or `name.namespace`).
        #[arg(long)]
        service: Option<String>,
        // Only requests seen by the proxies of this namespace (or of every one, -A).
        #[command(flatten)]
        ns: NamespaceArgs,
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
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Who calls whom: callers, services, identities, mTLS, request counts.
    #[command(after_help = "Examples:\n  sinew edges -n demo\n  sinew edges -A --window 30s")]
    Edges {
        // Edges from or to this namespace's workloads.
        #[command(flatten)]
        ns: NamespaceArgs,
        /// How far back to look, e.g. 30s (at most 60s).
        #[arg(short, long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
        window: Duration,
        /// Output format.
        #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Check the installation: a pass/fail line per check; non-zero if any fails.
    #[command(after_help = "Examples:\n  sinew check\n  sinew check --wait 30s")]
    Check {
        /// How long to wait for proxies to catch up before calling them out of sync,
        /// e.g. 5s, 1m.
        #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = flag_secs)]
        wait: Duration,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Validate documents locally, without a control plane.
    Validate {
        /// Files or directories of .yaml/.yml files; `-` reads standard input.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Add the sidecar to Kubernetes workloads in YAML files, offline.
    ///
    /// Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs:
    /// prints every document, injected where it is a workload, e.g. `sinew inject -f
    /// app.yaml | kubectl apply -f -`.
    Inject {
        /// YAML files (multi-document); `-` reads standard input.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        inject: inject::InjectArgs,
    },
    /// Run the sidecar-injection admission webhook.
    ///
    /// HTTPS; `sinew install --kubernetes` runs it beside the control plane.
    Webhook(inject::WebhookArgs),
    /// Print (or --apply) the manifests that install Sinew on Kubernetes.
    ///
    /// CRDs, RBAC, the control plane, the injection webhook and their certificates.
    Install(install::InstallArgs),
    /// Run the demo mesh on loopback.
    ///
    /// A control plane, six demo apps behind seven sidecars and steady load, then a
    /// tour: a canary shifting, retries rescuing a fault, an instance killed with no
    /// failed request, a call denied by policy. `sinew demo env` points a second shell
    /// at it.
    Demo(sinew_demo::DemoArgs),
    /// The demo's sample workload: serves HTTP and gRPC and calls its downstreams.
    DemoApp(sinew_demo::app::AppArgs),
    /// Install transparent capture (iptables) here, for a sidecar. Needs root.
    ///
    /// Rules (iptables, ip6tables) in the current network namespace: the workload's
    /// inbound and outbound TCP go to its sidecar, with no change to the application.
    /// Needs CAP_NET_ADMIN.
    Init(InitArgs),
    /// Run an unmodified app in the mesh on this Linux host. Needs root.
    ///
    /// Installs capture in the current network namespace, starts the sidecar as the
    /// proxy uid, then the app (`sinew run --service catalog --port http=8080 --
    /// ./app args`); when the app exits, stops the sidecar and removes the rules.
    Run {
        #[command(flatten)]
        args: run::RunArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the version (and the control plane's, if reachable).
    Version {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Named control planes, credentials and namespaces; pick one with `use`.
    ///
    /// Kept in $SINEW_CONFIG, else $XDG_CONFIG_HOME/sinew/config.yaml, else
    /// ~/.config/sinew/config.yaml. A client command takes each of server,
    /// credentials and namespace from its flag, else SINEW_SERVER, SINEW_CREDENTIALS,
    /// SINEW_NAMESPACE, else the context (--context, SINEW_CONTEXT, else the current
    /// one), else the default.
    #[command(
        after_help = "Examples:\n  sinew context set demo --server https://127.0.0.1:15010 --credentials sinew-data/admin.credentials --namespace demo --use\n  sinew context list\n  sinew context use prod\n  sinew get services --context demo"
    )]
    Context {
        #[command(subcommand)]
        command: context::ContextCommand,
    },
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

/// A duration flag that must be more than zero: the one grammar of duration flags
/// ([`flag_secs`]: `30s`, `100ms`, `24h`, `1m30s`, or a number of seconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
    match flag_secs(s)? {
        d if d.is_zero() => Err("must be more than zero".into()),
        d => Ok(d),
    }
}

/// The topics of `sinew --help`, in order; every visible command is in exactly one
/// (a test checks), so the list cannot go stale.
const GROUPS: &[(&str, &[&str])] = &[
    (
        "Mesh",
        &[
            "apply",
            "get",
            "delete",
            "validate",
            "check",
            "proxy-status",
            "version",
        ],
    ),
    ("Traffic", &["stat", "top", "tap", "edges"]),
    ("Identity", &["ca", "token", "credentials"]),
    ("Kubernetes", &["install", "inject", "webhook"]),
    ("Hosts", &["control", "run", "init", "demo", "demo-app"]),
    ("Setup", &["context", "completions", "help"]),
];

const EXAMPLES: &str = "\
Examples:
  sinew demo                                   a whole mesh on loopback
  sinew context set demo --server https://127.0.0.1:15010 \\
      --credentials sinew-data/admin.credentials --namespace demo --use
  sinew get services                           in the context's namespace
  sinew get all -A                             in every namespace
  sinew stat -n demo --by route --window 30s
  sinew top --service frontend -n demo
  sinew tap --service catalog -n demo --limit 10
  sinew apply -f route.yaml

Each client command's control plane, credential and namespace: its flag, else
SINEW_SERVER, SINEW_CREDENTIALS, SINEW_NAMESPACE, else the context (--context,
SINEW_CONTEXT, else the current one in $SINEW_CONFIG or ~/.config/sinew/config.yaml),
else https://127.0.0.1:15010 and namespace `default`. Durations take units: 30s, 100ms,
24h, 1m30s.";

/// The commands, listed by topic for the top-level help.
fn grouped_commands(cmd: &clap::Command) -> String {
    let about = |name: &str| -> Option<String> {
        if name == "help" {
            return Some("Print this message or the help of the given command".into());
        }
        let sub = cmd.find_subcommand(name)?;
        Some(sub.get_about().map(|a| a.to_string()).unwrap_or_default())
    };
    let mut out = String::new();
    let mut listed: Vec<&str> = Vec::new();
    for (group, names) in GROUPS {
        out.push_str(&format!("{group}:\n"));
        for name in *names {
            if let Some(a) = about(name) {
                out.push_str(&format!("  {name:<14} {a}\n"));
                listed.push(name);
            }
        }
        out.push('\n');
    }
    // A command left out of GROUPS still shows (and the test fails).
    let rest: Vec<String> = cmd
        .get_subcommands()
        .filter(|c| !c.is_hide_set() && !listed.contains(&c.get_name()))
        .map(|c| {
            format!(
                "  {:<14} {}\n",
                c.get_name(),
                c.get_about().map(|a| a.to_string()).unwrap_or_default()
            )
        })
        .collect();
    if !rest.is_empty() {
        out.push_str(&format!("Other:\n{}\n", rest.concat()));
    }
    out
}

/// `sinew`'s command line: the derived one, its help grouped by topic.
fn command() -> clap::Command {
    let cmd = Cli::command();
    let commands = grouped_commands(&cmd);
    cmd.help_template(format!(
        "{{about-with-newline}}\n{{usage-heading}} {{usage}}\n\n{commands}Options:\n{{options}}{{after-help}}"
    ))
    .after_help(EXAMPLES)
}

fn main() {
    let matches = command().get_matches();
    let name = matches.subcommand_name().unwrap_or_default().to_owned();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
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
        Ok(rt) => rt.block_on(run(cli, name)),
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

/// The control-plane flags of `command`, when it calls the control plane.
fn client_args(command: &Command) -> Option<&ClientArgs> {
    match command {
        Command::Ca {
            command: CaCommand::Rotate { client, .. },
        }
        | Command::Token {
            command:
                TokenCommand::Create { client, .. }
                | TokenCommand::List { client }
                | TokenCommand::Revoke { client, .. },
        }
        | Command::Credentials {
            command:
                CredentialsCommand::Create { client, .. }
                | CredentialsCommand::List { client }
                | CredentialsCommand::Revoke { client, .. },
        }
        | Command::Apply { client, .. }
        | Command::Get { client, .. }
        | Command::Delete { client, .. }
        | Command::ProxyStatus { client, .. }
        | Command::Stat { client, .. }
        | Command::Top { client, .. }
        | Command::Tap { client, .. }
        | Command::Edges { client, .. }
        | Command::Check { client, .. }
        | Command::Run { client, .. }
        | Command::Version { client } => Some(client),
        Command::Control { .. }
        | Command::Validate { .. }
        | Command::Inject { .. }
        | Command::Webhook(_)
        | Command::Install(_)
        | Command::Demo(_)
        | Command::DemoApp(_)
        | Command::Init(_)
        | Command::Context { .. }
        | Command::Completions { .. } => None,
    }
}

async fn run(cli: Cli, name: String) -> anyhow::Result<i32> {
    // The control plane, for the commands that call it; the others refuse the
    // hidden before-the-command spellings rather than ignore them.
    // An error resolving it is reported by the command that needs it (`version`
    // prints its own first).
    let target = match client_args(&cli.command) {
        Some(args) => Some(resolve(&cli.client, args)),
        None => {
            let t = &cli.client;
            if t.server.is_some() || t.credentials.is_some() || t.context.is_some() {
                anyhow::bail!(
                    "`sinew {name}` does not call the control plane: --server, --credentials and --context do not apply to it"
                );
            }
            None
        }
    };
    // Set for exactly the commands `client_args` names.
    let target = move || {
        target.ok_or_else(|| anyhow::anyhow!("`sinew {name}`: no control plane resolved"))?
    };
    match cli.command {
        Command::Control {
            listen,
            data_dir,
            config_dir,
            grace_period,
            debounce,
            debounce_ms,
            trust_domain,
            ca_cert,
            ca_key,
            ca_dir,
            cert_ttl,
            kubernetes,
            lease_namespace,
            token_audience,
            lease_duration,
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
            opts.grace_period = grace_period;
            opts.debounce = debounce_ms.unwrap_or(debounce);
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
                k.source.lease_duration = lease_duration_secs.unwrap_or(lease_duration);
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
                    ..
                },
        } => {
            client::rotate_ca(
                &target()?.server,
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
                    ..
                },
        } => {
            let t = target()?;
            let namespace = namespace.unwrap_or(t.namespace);
            client::create_token(&t.server, &namespace, &service_account, ttl, uses).await
        }
        Command::Token {
            command: TokenCommand::List { .. },
        } => client::list_tokens(&target()?.server).await,
        Command::Token {
            command: TokenCommand::Revoke { id, .. },
        } => client::revoke_token(&target()?.server, &id).await,
        Command::Credentials {
            command:
                CredentialsCommand::Create {
                    name,
                    role,
                    ttl,
                    output,
                    ..
                },
        } => {
            client::create_credential(&target()?.server, &name, &role, ttl, output.as_deref()).await
        }
        Command::Credentials {
            command: CredentialsCommand::List { .. },
        } => client::list_credentials(&target()?.server).await,
        Command::Credentials {
            command: CredentialsCommand::Revoke { name, .. },
        } => client::revoke_credential(&target()?.server, &name).await,
        Command::Apply { files, dry_run, .. } => {
            client::apply(&target()?.server, &files, dry_run).await
        }
        Command::Get {
            kind,
            name,
            ns,
            output,
            ..
        } => {
            let t = target()?;
            let scope = ns.scope(&t);
            client::get(&t.server, &kind, name.as_deref(), scope.as_deref(), &output).await
        }
        Command::Delete {
            kind,
            name,
            namespace,
            all_namespaces,
            files,
            ..
        } => {
            if all_namespaces {
                anyhow::bail!(
                    "delete: -A is refused (as by kubectl): a name is deleted in one namespace at a time; give -n NAMESPACE"
                );
            }
            let t = target()?;
            let namespace = namespace.unwrap_or(t.namespace);
            client::delete(
                &t.server,
                kind.as_deref(),
                name.as_deref(),
                &namespace,
                &files,
            )
            .await
        }
        Command::ProxyStatus { ns, output, .. } => {
            let t = target()?;
            client::proxy_status(&t.server, ns.scope(&t).as_deref(), &output).await
        }
        Command::Stat {
            by,
            ns,
            window,
            direction,
            output,
            ..
        } => {
            let t = target()?;
            telemetry::stat(
                &t.server,
                &by,
                ns.scope(&t).as_deref(),
                window,
                direction.as_deref(),
                &output,
            )
            .await
        }
        Command::Top {
            service,
            service_positional,
            ns,
            limit,
            interval,
            once,
            output,
            ..
        } => {
            let t = target()?;
            telemetry::top(
                &t.server,
                ns.scope(&t).as_deref(),
                service.or(service_positional).as_deref(),
                limit,
                interval,
                once,
                &output,
            )
            .await
        }
        Command::Tap {
            service,
            ns,
            path,
            method,
            status,
            direction,
            limit,
            output,
            ..
        } => {
            let t = target()?;
            let filter = sinew_api::v1::TapFilter {
                direction: direction.unwrap_or_default(),
                service: service.unwrap_or_default(),
                path: path.unwrap_or_default(),
                method: method.unwrap_or_default(),
                status: status.unwrap_or_default(),
                limit: limit.unwrap_or(0),
            };
            telemetry::tap(&t.server, filter, ns.scope(&t).as_deref(), &output).await
        }
        Command::Edges {
            ns, window, output, ..
        } => {
            let t = target()?;
            telemetry::edges(&t.server, ns.scope(&t).as_deref(), window, &output).await
        }
        Command::Check { wait, .. } => client::check(&target()?.server, wait).await,
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
        Command::Run { args, .. } => {
            let t = target()?;
            run::run(&t.server, args, &t.namespace).await
        }
        Command::Version { .. } => {
            outln!("sinew {}", env!("CARGO_PKG_VERSION"))?;
            let server = target()?.server;
            if let Ok(v) = client::server_version(&server).await {
                outln!("control plane {v} at {server}")?;
            }
            Ok(0)
        }
        Command::Context { command } => context::run(command),
        Command::Completions { shell } => {
            // Generated into memory first: clap_complete panics when a write fails.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command(), "sinew", &mut script);
            std::io::Write::write_all(&mut std::io::stdout().lock(), &script)?;
            Ok(0)
        }
    }
}

/// Puts the CA from its Secret into `dir` (`ca.pem`, `ca-key.pem` owner-only), where
/// the control plane loads it. The Secret wins over what a reused disk holds.
fn write_ca(dir: &std::path::Path, cert: &str, key: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
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
    sinew_tls::private_file::write(&key_path, key.as_bytes())?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every visible command is listed under exactly one topic of `sinew --help`, and
    /// every name listed there is a command.
    #[test]
    fn help_groups_cover_every_command_once() {
        let cmd = command();
        let listed: Vec<&str> = GROUPS
            .iter()
            .flat_map(|(_, names)| names.iter().copied())
            .collect();
        for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
            let n = listed.iter().filter(|l| **l == sub.get_name()).count();
            assert_eq!(n, 1, "{} is listed {n} times in GROUPS", sub.get_name());
        }
        for name in &listed {
            assert!(
                *name == "help" || cmd.find_subcommand(name).is_some_and(|c| !c.is_hide_set()),
                "GROUPS lists {name}, which is no visible command"
            );
        }
        let help = cmd.clone().render_help().to_string();
        assert!(!help.contains("Other:"), "{help}");
        for (group, _) in GROUPS {
            assert!(help.contains(&format!("\n{group}:\n")), "{help}");
        }
    }

    /// clap's own consistency checks (ids, conflicts, flattened duplicates).
    #[test]
    fn the_command_line_is_consistent() {
        command().debug_assert();
    }

    /// The hidden spellings before the command are taken by client commands only;
    /// the control-plane flags exist exactly on the commands that call it.
    #[test]
    fn control_plane_flags_only_where_they_apply() {
        let cmd = command();
        let has = |path: &[&str]| {
            let mut c = &cmd;
            for p in path {
                c = c.find_subcommand(p).unwrap_or_else(|| panic!("{p}"));
            }
            c.get_arguments().any(|a| a.get_long() == Some("server"))
        };
        for path in [
            &["get"][..],
            &["apply"],
            &["delete"],
            &["stat"],
            &["top"],
            &["tap"],
            &["edges"],
            &["proxy-status"],
            &["check"],
            &["version"],
            &["run"],
            &["ca", "rotate"],
            &["token", "create"],
            &["credentials", "list"],
        ] {
            assert!(has(path), "{path:?} lacks --server");
        }
        for path in [
            &["control"][..],
            &["validate"],
            &["completions"],
            &["demo"],
            &["inject"],
            &["install"],
            &["init"],
            &["webhook"],
            &["context", "list"],
        ] {
            assert!(!has(path), "{path:?} has --server");
        }
        let parse = |args: &[&str]| {
            let m = command()
                .try_get_matches_from(args)
                .map_err(|e| e.to_string())?;
            Cli::from_arg_matches(&m).map_err(|e| e.to_string())
        };
        let cli = parse(&["sinew", "--server", "https://a:1", "get", "svc"]).unwrap();
        assert_eq!(cli.client.server.as_deref(), Some("https://a:1"));
        assert!(parse(&["sinew", "validate", "--server", "x", "-f", "a"]).is_err());
    }
}
