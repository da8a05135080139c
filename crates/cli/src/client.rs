//! Client commands: each reads its input, calls the Admin API, prints a result.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sinew_api::v1::admin_client::AdminClient;
use sinew_api::v1::{
    ApplyRequest, CreateJoinTokenRequest, DeleteRequest, GetRequest, HealthRequest,
    ProxyStatusRequest, ResourceKey, RotateCaRequest, Source,
};
use sinew_control::credentials::CredentialFile;
use sinew_model::{Resources, parse_apply, parse_documents, parse_sources};
use tonic::transport::Channel;

/// The control plane a client command talks to, and the operator credential it
/// shows: `--server` (or `SINEW_SERVER`), else the credential's `server`.
#[derive(Debug, Clone)]
pub struct Server {
    /// The URL, `https://host:port`.
    pub url: String,
    /// The credential, or why there is none (said only when a command needs it).
    credential: Result<(PathBuf, CredentialFile), String>,
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

impl Server {
    /// Finds the credential (`--credentials`, `SINEW_CREDENTIALS`, then the default
    /// paths) and the URL. A credential file that exists but cannot be read is an
    /// error at once; a missing one only when a command needs it.
    pub fn resolve(server: Option<String>, credentials: Option<PathBuf>) -> anyhow::Result<Server> {
        let credential = match credentials {
            Some(p) => Ok((
                p.clone(),
                CredentialFile::read(&p).map_err(|e| anyhow::anyhow!(e))?,
            )),
            None => match sinew_control::credentials::default_paths()
                .into_iter()
                .find(|p| p.exists())
            {
                Some(p) => Ok((
                    p.clone(),
                    CredentialFile::read(&p).map_err(|e| anyhow::anyhow!(e))?,
                )),
                None => Err(format!(
                    "no operator credential: pass --credentials FILE or set SINEW_CREDENTIALS (the control plane writes <data-dir>/{} on first start; `sinew credentials create` issues more); looked in {}",
                    sinew_control::credentials::ADMIN_FILE,
                    sinew_control::credentials::default_paths()
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            },
        };
        let url = server
            .or_else(|| credential.as_ref().ok().map(|(_, c)| c.server.clone()))
            .unwrap_or_else(|| "https://127.0.0.1:15010".to_owned());
        Ok(Server { url, credential })
    }

    /// The TLS config: the credential's roots verify the control plane, its
    /// certificate proves who calls.
    pub fn tls(&self) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
        let (path, c) = self
            .credential
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let trust = sinew_tls::api::ControlTrust::from_pem("roots", &c.roots)
            .with_context(|| format!("{}: roots", path.display()))?;
        sinew_tls::api::control_client_config(
            trust,
            sinew_tls::api::ClientAuth::Static {
                chain_pem: c.certificate.clone(),
                key_pem: c.key.clone(),
            },
        )
        .with_context(|| format!("{}: certificate or key", path.display()))
    }
}

pub(crate) async fn connect(server: &Server) -> anyhow::Result<AdminClient<Channel>> {
    connect_with(server, Some(Duration::from_secs(30))).await
}

/// Connects with a deadline per call (`None` for streams that last as long as the
/// user wants, such as `sinew tap`).
pub(crate) async fn connect_with(
    server: &Server,
    timeout: Option<Duration>,
) -> anyhow::Result<AdminClient<Channel>> {
    let tls = server.tls()?;
    let mut endpoint = sinew_api::channel::endpoint(&server.url)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .connect_timeout(Duration::from_secs(5));
    if let Some(t) = timeout {
        endpoint = endpoint.timeout(t);
    }
    match sinew_api::channel::connect(endpoint, tls).await {
        Ok(ch) => Ok(AdminClient::new(ch)),
        Err(e) => {
            let why = sinew_api::channel::error_chain(&e);
            bail!(
                "cannot reach the control plane at {} ({why}; is `sinew control` running? set --server or SINEW_SERVER)",
                server.url
            )
        }
    }
}

/// A failed call as one sentence.
pub(crate) fn status(e: tonic::Status) -> anyhow::Error {
    match e.code() {
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
            anyhow::anyhow!("refused; nothing was changed:\n{}", e.message())
        }
        tonic::Code::Unavailable => {
            anyhow::anyhow!("the control plane is unavailable: {}", e.message())
        }
        tonic::Code::Unauthenticated => anyhow::anyhow!("not authenticated: {}", e.message()),
        tonic::Code::PermissionDenied => anyhow::anyhow!("permission denied: {}", e.message()),
        _ => anyhow::anyhow!("{}", e.message()),
    }
}

fn yaml_files(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() || matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
            {
                yaml_files(&p, out)?;
            }
        }
    } else {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// Reads files, directories and `-` into `(label, text)` sources.
fn read_sources(paths: &[PathBuf]) -> anyhow::Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    for p in paths {
        if p.as_os_str() == "-" {
            files.push(p.clone());
            continue;
        }
        if !p.exists() {
            bail!("{}: no such file or directory", p.display());
        }
        yaml_files(p, &mut files).with_context(|| format!("{}: cannot list", p.display()))?;
    }
    let mut out = Vec::new();
    for f in files {
        if f.as_os_str() == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("cannot read standard input")?;
            out.push(("<stdin>".to_owned(), s));
        } else {
            let text = std::fs::read_to_string(&f)
                .with_context(|| format!("{}: cannot read", f.display()))?;
            out.push((f.display().to_string(), text));
        }
    }
    if out.is_empty() {
        bail!(
            "no .yaml or .yml files found in {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(out)
}

/// `sinew apply`.
pub async fn apply(server: &Server, paths: &[PathBuf], dry_run: bool) -> anyhow::Result<i32> {
    let sources = read_sources(paths)?;
    // The control plane's size limit, checked here: its own refusal is a bare gRPC
    // error that names neither the file nor the limit.
    let size =
        sinew_api::limits::apply_bytes(sources.iter().map(|(l, t)| (l.as_str(), t.as_str())));
    if size > sinew_api::limits::MAX_MESSAGE_BYTES {
        let big: Vec<String> = sources
            .iter()
            .filter_map(|(l, t)| sinew_api::limits::too_large(l, t))
            .collect();
        if big.is_empty() {
            bail!(
                "refused; nothing was changed:\n{} files together are {size} bytes, more than the control plane accepts in one apply ({} bytes, 4 MiB); apply them in parts",
                sources.len(),
                sinew_api::limits::MAX_MESSAGE_BYTES
            );
        }
        bail!("refused; nothing was changed:\n{}", big.join("\n"));
    }
    // Parse locally first: a syntax error or an empty file is reported without a
    // round trip.
    let count = parse_apply(sources.iter().map(|(l, t)| (l.as_str(), t.as_str())))
        .map_err(|errors| anyhow::anyhow!("refused; nothing was changed:\n{errors}"))?
        .len();
    if count > 20 {
        eprintln!("applying {count} documents from {} files…", sources.len());
    }
    let mut client = connect(server).await?;
    let resp = client
        .apply(ApplyRequest {
            sources: sources
                .into_iter()
                .map(|(label, text)| Source { label, text })
                .collect(),
            dry_run,
        })
        .await
        .map_err(status)?
        .into_inner();
    for r in &resp.results {
        if let Some(k) = &r.key {
            let suffix = if dry_run { " (dry run)" } else { "" };
            outln!("{} {}/{} {}{suffix}", k.kind, k.namespace, k.name, r.action)?;
        }
    }
    if !dry_run {
        eprintln!("revision {}", resp.revision);
    }
    Ok(0)
}

fn summary(kind: &str, v: &serde_json::Value) -> String {
    let spec = &v["spec"];
    match kind {
        "Service" => spec["ports"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .map(|p| {
                        format!(
                            "{}:{}/{}",
                            p["name"].as_str().unwrap_or(""),
                            p["port"],
                            p["protocol"].as_str().unwrap_or("HTTP")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default(),
        "Workload" => format!(
            "{} {}{}",
            spec["service"].as_str().unwrap_or("-"),
            spec["address"].as_str().unwrap_or(""),
            spec["sidecar"]["port"]
                .as_u64()
                .map(|p| format!(" sidecar:{p}"))
                .unwrap_or_default()
        ),
        "HTTPRoute" => format!(
            "parents={} rules={}",
            spec["parentRefs"]
                .as_array()
                .map(|a| a
                    .iter()
                    .filter_map(|p| p["name"].as_str())
                    .collect::<Vec<_>>()
                    .join(","))
                .unwrap_or_default(),
            spec["rules"].as_array().map_or(0, Vec::len)
        ),
        "RoutePolicy" => format!(
            "target={}/{}{}{}",
            spec["targetRef"]["kind"].as_str().unwrap_or("-"),
            spec["targetRef"]["name"].as_str().unwrap_or("-"),
            spec["targetRef"]["sectionName"]
                .as_str()
                .map(|s| format!("#{s}"))
                .unwrap_or_default(),
            ["retry", "fault", "timeouts"]
                .iter()
                .filter(|f| spec[**f].is_object())
                .map(|f| format!(" {f}"))
                .collect::<String>()
        ),
        "Proxy" => format!(
            "upstreams={}{}{}",
            spec["outbound"]["upstreams"].as_array().map_or(0, Vec::len),
            if spec["outbound"]["httpProxy"].is_object() {
                " http-proxy"
            } else {
                ""
            },
            if spec["inbound"].is_object() {
                " inbound"
            } else {
                ""
            }
        ),
        _ => String::new(),
    }
}

/// Says on stderr where else there is something, when a table in `namespace` came
/// out empty: `no services in namespace default; 6 in demo: try -n demo or -A`.
/// `counts` are per namespace, over every namespace.
pub(crate) fn hint_elsewhere(
    what: &str,
    namespace: &str,
    counts: &std::collections::BTreeMap<String, usize>,
) {
    let mut others: Vec<(&String, &usize)> = counts
        .iter()
        .filter(|(ns, n)| ns.as_str() != namespace && **n > 0)
        .collect();
    if others.is_empty() {
        return;
    }
    // The fullest namespace first: the likeliest to be meant.
    others.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let list: Vec<String> = others
        .iter()
        .map(|(ns, n)| format!("{n} in {ns}"))
        .collect();
    eprintln!(
        "no {what} in namespace {namespace}; {}: try -n {} or -A",
        list.join(", "),
        others[0].0
    );
}

/// `sinew get`: `namespace` `None` for every namespace.
pub async fn get(
    server: &Server,
    kind: &str,
    name: Option<&str>,
    namespace: Option<&str>,
    output: &str,
) -> anyhow::Result<i32> {
    let kind = if kind.eq_ignore_ascii_case("all") {
        ""
    } else {
        kind
    };
    if sinew_control::admin::canonical_kind(kind).is_none() {
        bail!(
            "unknown kind {kind:?}: use service, workload, httproute, routepolicy, trafficpolicy, proxy, meshconfig, authorizationpolicy, requestauthentication or all"
        );
    }
    let mut client = connect(server).await?;
    let request = |namespace: Option<&str>| GetRequest {
        kind: kind.to_owned(),
        namespace: namespace.unwrap_or_default().to_owned(),
        name: name.unwrap_or("").to_owned(),
    };
    let resp = client
        .get(request(namespace))
        .await
        .map_err(status)?
        .into_inner();
    // Nothing here: look in every namespace, to say where there is something.
    let elsewhere = match (resp.resources.is_empty(), namespace) {
        (true, Some(ns)) => {
            let all = client
                .get(request(None))
                .await
                .map_err(status)?
                .into_inner();
            let mut counts = std::collections::BTreeMap::<String, usize>::new();
            for r in &all.resources {
                if let Some(k) = r.resource.as_ref().and_then(|r| r.key.as_ref()) {
                    *counts.entry(k.namespace.clone()).or_default() += 1;
                }
            }
            Some((ns, counts))
        }
        _ => None,
    };
    if let Some(n) = name
        && resp.resources.is_empty()
    {
        let kind = if kind.is_empty() { "resource" } else { kind };
        match &elsewhere {
            Some((ns, counts)) if !counts.is_empty() => bail!(
                "{kind} {ns}/{n} not found; there is one in {}: try -n {} or -A",
                counts.keys().cloned().collect::<Vec<_>>().join(", "),
                counts.keys().next().map_or("", String::as_str)
            ),
            _ => bail!(
                "{kind} {}/{n} not found",
                namespace.unwrap_or("(every namespace)")
            ),
        }
    }
    let docs: Vec<(String, serde_json::Value, String, u64)> = resp
        .resources
        .iter()
        .filter_map(|r| {
            let res = r.resource.as_ref()?;
            let key = res.key.as_ref()?;
            let v = serde_json::from_str(&res.json).ok()?;
            Some((key.kind.clone(), v, r.source.clone(), r.revision))
        })
        .collect();
    match output {
        "json" => {
            let items: Vec<&serde_json::Value> = docs.iter().map(|(_, v, _, _)| v).collect();
            outln!("{}", serde_json::to_string_pretty(&items)?)?;
        }
        "yaml" => {
            for (_, v, _, _) in &docs {
                outln!("---\n{}", serde_norway::to_string(v)?.trim_end())?;
            }
        }
        _ => {
            let rows: Vec<[String; 6]> = docs
                .iter()
                .map(|(k, v, src, rev)| {
                    [
                        k.clone(),
                        v["metadata"]["namespace"]
                            .as_str()
                            .unwrap_or("default")
                            .to_owned(),
                        v["metadata"]["name"].as_str().unwrap_or("").to_owned(),
                        src.clone(),
                        if *rev == 0 {
                            "-".into()
                        } else {
                            rev.to_string()
                        },
                        summary(k, v),
                    ]
                })
                .collect();
            print_table(
                &["KIND", "NAMESPACE", "NAME", "SOURCE", "REVISION", "SUMMARY"],
                &rows,
            )?;
        }
    }
    if let Some((ns, counts)) = &elsewhere {
        let what = match sinew_control::admin::canonical_kind(kind) {
            Some("") | None => "resources".to_owned(),
            Some(k) => plural(k),
        };
        hint_elsewhere(&what, ns, counts);
    }
    Ok(0)
}

/// `Service` -> `services`, `RoutePolicy` -> `routepolicies`, `Proxy` -> `proxies`.
fn plural(kind: &str) -> String {
    let k = kind.to_ascii_lowercase();
    if let Some(stem) = k.strip_suffix('y') {
        format!("{stem}ies")
    } else {
        format!("{k}s")
    }
}

/// Prints a table: left-aligned columns two spaces apart, like `kubectl`.
pub(crate) fn print_table<const N: usize>(
    header: &[&str; N],
    rows: &[[String; N]],
) -> std::io::Result<()> {
    let mut widths = header.map(str::len);
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        outln!("{}", s.join("  ").trim_end())
    };
    line(header.to_vec())?;
    for r in rows {
        line(r.iter().map(String::as_str).collect())?;
    }
    Ok(())
}

/// `sinew delete`.
pub async fn delete(
    server: &Server,
    kind: Option<&str>,
    name: Option<&str>,
    namespace: &str,
    files: &[PathBuf],
) -> anyhow::Result<i32> {
    let mut keys = Vec::new();
    match (kind, name, files.is_empty()) {
        (Some(k), Some(n), true) => {
            let kind = sinew_control::admin::canonical_kind(k)
                .filter(|k| !k.is_empty())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "unknown kind {k:?}: use service, workload, httproute, routepolicy, trafficpolicy, proxy, meshconfig, authorizationpolicy or requestauthentication"
                    )
                })?;
            keys.push(ResourceKey {
                kind: kind.to_owned(),
                namespace: namespace.to_owned(),
                name: n.to_owned(),
            });
        }
        (None, None, false) => {
            for (label, text) in read_sources(files)? {
                let docs = parse_documents(&label, &text).map_err(|e| anyhow::anyhow!("{e}"))?;
                for d in docs {
                    let k = d.resource.key();
                    keys.push(ResourceKey {
                        kind: k.kind,
                        namespace: k.namespace,
                        name: k.name,
                    });
                }
            }
        }
        _ => bail!("give KIND NAME, or -f FILE"),
    }
    let mut client = connect(server).await?;
    let resp = client
        .delete(DeleteRequest { keys: keys.clone() })
        .await
        .map_err(status)?
        .into_inner();
    for k in &keys {
        let gone = resp.deleted.iter().any(|d| d == k);
        let what = if gone { "deleted" } else { "not found" };
        outln!("{} {}/{} {what}", k.kind, k.namespace, k.name)?;
    }
    Ok(if resp.deleted.len() == keys.len() {
        0
    } else {
        1
    })
}

/// `sinew proxy-status`: the proxies of `namespace` (`None`: of every namespace).
pub async fn proxy_status(
    server: &Server,
    namespace: Option<&str>,
    output: &str,
) -> anyhow::Result<i32> {
    let mut client = connect(server).await?;
    let mut resp = client
        .proxy_status(ProxyStatusRequest {})
        .await
        .map_err(status)?
        .into_inner();
    // The API lists every proxy (they are few); the namespace is chosen here.
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for p in &resp.proxies {
        *counts.entry(p.namespace.clone()).or_default() += 1;
    }
    if let Some(ns) = namespace {
        resp.proxies.retain(|p| p.namespace == ns);
    }
    let hint = || {
        if let Some(ns) = namespace
            && resp.proxies.is_empty()
        {
            hint_elsewhere("proxies", ns, &counts);
        }
    };
    if output == "json" {
        let items: Vec<serde_json::Value> = resp
            .proxies
            .iter()
            .map(|p| {
                serde_json::json!({
                    "proxy": format!("{}/{}", p.namespace, p.name),
                    "workload": p.workload,
                    "connected": p.connected,
                    "applied": p.applied_version,
                    "latest": p.latest_version,
                    "inSync": p.connected && !p.latest_version.is_empty() && p.applied_version == p.latest_version,
                    "ackMs": p.ack_latency_ms,
                    "lastNack": p.last_nack,
                })
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&items)?)?;
        hint();
        return Ok(0);
    }
    let rows: Vec<[String; 7]> = resp
        .proxies
        .iter()
        .map(|p| {
            let sync = if !p.connected {
                "-"
            } else if p.applied_version == p.latest_version && !p.applied_version.is_empty() {
                "SYNCED"
            } else if !p.last_nack.is_empty() {
                "NACKED"
            } else {
                "PENDING"
            };
            [
                format!("{}/{}", p.namespace, p.name),
                if p.workload.is_empty() {
                    "-".into()
                } else {
                    p.workload.clone()
                },
                if p.connected {
                    "yes".into()
                } else {
                    "no".into()
                },
                format!(
                    "{} / {}",
                    short(&p.applied_version),
                    short(&p.latest_version)
                ),
                sync.to_owned(),
                if p.ack_latency_ms > 0 || sync == "SYNCED" {
                    format!("{}ms", p.ack_latency_ms)
                } else {
                    "-".into()
                },
                if p.last_nack.is_empty() {
                    "-".into()
                } else {
                    p.last_nack.clone()
                },
            ]
        })
        .collect();
    print_table(
        &[
            "PROXY",
            "WORKLOAD",
            "CONNECTED",
            "APPLIED / LATEST",
            "SYNC",
            "ACK",
            "LAST NACK",
        ],
        &rows,
    )?;
    hint();
    Ok(0)
}

fn short(v: &str) -> &str {
    if v.is_empty() {
        "-"
    } else {
        v.get(..8).unwrap_or(v)
    }
}

/// `sinew check`.
pub async fn check(server: &Server, wait: Duration) -> anyhow::Result<i32> {
    let mut failed = false;
    let mut line = |ok: bool, what: String| {
        // A closed stdout is no failed check: the lines are few, the verdict is the
        // exit status.
        let _ = outln!("{} {what}", if ok { "PASS" } else { "FAIL" });
        failed |= !ok;
    };
    let mut client = match connect(server).await {
        Ok(c) => c,
        Err(e) => {
            line(false, format!("control plane reachable: {e}"));
            return Ok(1);
        }
    };
    let health = match client.health(HealthRequest {}).await {
        Ok(h) => h.into_inner(),
        Err(e) => {
            line(
                false,
                format!("control plane reachable at {server}: {}", e.message()),
            );
            return Ok(1);
        }
    };
    line(
        true,
        format!(
            "control plane reachable at {server} (version {}, revision {})",
            health.version, health.revision
        ),
    );
    line(
        health.store_ok,
        if health.store_ok {
            "store healthy".to_owned()
        } else {
            format!("store unhealthy: {}", health.store_error)
        },
    );
    match health.rotation_phase.as_str() {
        "" | "idle" => {}
        phase => line(
            health.proxies_on_signing_root == health.proxies_with_certificates,
            format!(
                "trust-anchor rotation {phase}: {} of {} proxies hold a certificate from the signing root",
                health.proxies_on_signing_root, health.proxies_with_certificates
            ),
        ),
    }
    if !health.config_dir_error.is_empty() {
        line(
            false,
            format!("config directory applied: {}", health.config_dir_error),
        );
    }
    // Proxies may be catching up with a change made a moment ago: give them `wait`.
    let deadline = Instant::now() + wait;
    loop {
        let status = client
            .proxy_status(ProxyStatusRequest {})
            .await
            .map_err(status)?
            .into_inner();
        let connected: Vec<_> = status.proxies.iter().filter(|p| p.connected).collect();
        let behind: Vec<String> = connected
            .iter()
            .filter(|p| p.applied_version.is_empty() || p.applied_version != p.latest_version)
            .map(|p| {
                let why = if p.last_nack.is_empty() {
                    "not yet applied".to_owned()
                } else {
                    format!("refused: {}", p.last_nack)
                };
                format!("{}/{} ({why})", p.namespace, p.name)
            })
            .collect();
        if behind.is_empty() || Instant::now() >= deadline {
            if behind.is_empty() {
                line(
                    true,
                    format!("proxies in sync ({} connected)", connected.len()),
                );
            } else {
                line(
                    false,
                    format!(
                        "proxies in sync: {} of {} behind: {}",
                        behind.len(),
                        connected.len(),
                        behind.join("; ")
                    ),
                );
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(if failed { 1 } else { 0 })
}

/// The control plane's version.
pub async fn server_version(server: &Server) -> anyhow::Result<String> {
    let mut client = connect(server).await?;
    Ok(client
        .health(HealthRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .version)
}

/// `sinew validate`: local validation, no control plane.
pub fn validate(paths: &[PathBuf]) -> anyhow::Result<i32> {
    let sources = read_sources(paths)?;
    let docs = match parse_sources(sources.iter().map(|(l, t)| (l.as_str(), t.as_str()))) {
        Ok(docs) => docs,
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(1);
        }
    };
    let n = docs.len();
    match Resources::from_documents(docs) {
        Ok(_) => {
            outln!("{n} documents valid")?;
            Ok(0)
        }
        Err(e) => {
            eprintln!("{e}");
            Ok(1)
        }
    }
}

/// `sinew token create`: prints the token alone on stdout (for scripts), what it is
/// for on stderr.
pub async fn create_token(
    server: &Server,
    namespace: &str,
    account: &str,
    ttl: Duration,
    uses: u32,
) -> anyhow::Result<i32> {
    let mut client = connect(server).await?;
    let t = client
        .create_join_token(CreateJoinTokenRequest {
            namespace: namespace.to_owned(),
            service_account: account.to_owned(),
            ttl_seconds: ttl.as_secs(),
            uses,
        })
        .await
        .map_err(status)?
        .into_inner();
    outln!("{}", t.token)?;
    eprintln!(
        "join token {} for {} ({} use{}, until {}); give it to sinew-proxy --join-token-file",
        t.id,
        t.spiffe_id,
        t.uses,
        if t.uses == 1 { "" } else { "s" },
        unix_time(t.expires_unix)
    );
    Ok(0)
}

fn unix_time(t: i64) -> String {
    sinew_control::auth::rfc3339(u64::try_from(t).unwrap_or(0))
}

/// `sinew token list`.
pub async fn list_tokens(server: &Server) -> anyhow::Result<i32> {
    let mut client = connect(server).await?;
    let tokens = client
        .list_join_tokens(sinew_api::v1::ListJoinTokensRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .tokens;
    outln!(
        "{:<14} {:<52} {:>5} {:<22} CREATED BY",
        "ID",
        "IDENTITY",
        "USES",
        "EXPIRES"
    )?;
    for t in tokens {
        outln!(
            "{:<14} {:<52} {:>5} {:<22} {}",
            t.id,
            t.spiffe_id,
            t.uses_left,
            unix_time(t.expires_unix),
            if t.created_by.is_empty() {
                "-"
            } else {
                &t.created_by
            }
        )?;
    }
    Ok(0)
}

/// `sinew token revoke ID`.
pub async fn revoke_token(server: &Server, id: &str) -> anyhow::Result<i32> {
    let mut client = connect(server).await?;
    client
        .revoke_join_token(sinew_api::v1::RevokeJoinTokenRequest { id: id.to_owned() })
        .await
        .map_err(status)?;
    eprintln!("join token {id} revoked");
    Ok(0)
}

/// `sinew credentials create NAME --role ROLE`: the key is made here and never
/// leaves this host; the file is written owner-only.
pub async fn create_credential(
    server: &Server,
    name: &str,
    role: &str,
    ttl: Duration,
    out: Option<&Path>,
) -> anyhow::Result<i32> {
    let (key, csr_der) = sinew_tls::new_key_and_csr()?;
    let mut client = connect(server).await?;
    let c = client
        .create_credential(sinew_api::v1::CreateCredentialRequest {
            name: name.to_owned(),
            role: role.to_owned(),
            csr_der,
            ttl_seconds: ttl.as_secs(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let path = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(format!("{name}.credentials")));
    CredentialFile {
        server: server.url.clone(),
        name: c.name.clone(),
        role: c.role.clone(),
        trust_domain: c.trust_domain,
        expires: unix_time(c.expires_unix),
        certificate: c.certificate_pem,
        key,
        roots: c.roots_pem,
    }
    .write(&path)
    .map_err(|e| anyhow::anyhow!(e))?;
    eprintln!(
        "credential {} ({} role, until {}) written to {} (0600): sinew --credentials {}",
        c.name,
        c.role,
        unix_time(c.expires_unix),
        path.display(),
        path.display()
    );
    Ok(0)
}

/// `sinew credentials list`.
pub async fn list_credentials(server: &Server) -> anyhow::Result<i32> {
    let mut client = connect(server).await?;
    let list = client
        .list_credentials(sinew_api::v1::ListCredentialsRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .credentials;
    outln!(
        "{:<24} {:<9} {:<22} {:<8} FINGERPRINT",
        "NAME",
        "ROLE",
        "EXPIRES",
        "STATE"
    )?;
    for c in list {
        outln!(
            "{:<24} {:<9} {:<22} {:<8} {}",
            c.name,
            c.role,
            unix_time(c.expires_unix),
            if c.revoked { "revoked" } else { "valid" },
            c.fingerprint.get(..16).unwrap_or(&c.fingerprint)
        )?;
    }
    Ok(0)
}

/// `sinew credentials revoke NAME`.
pub async fn revoke_credential(server: &Server, name: &str) -> anyhow::Result<i32> {
    let mut client = connect(server).await?;
    let n = client
        .revoke_credential(sinew_api::v1::RevokeCredentialRequest {
            name: name.to_owned(),
        })
        .await
        .map_err(status)?
        .into_inner()
        .revoked;
    eprintln!(
        "revoked the credential name {name} ({n} issued here); every certificate of that name issued until now is refused"
    );
    Ok(0)
}

/// `sinew ca rotate PHASE`.
pub async fn rotate_ca(
    server: &Server,
    phase: &str,
    ca_cert: Option<&Path>,
    ca_key: Option<&Path>,
    force: bool,
) -> anyhow::Result<i32> {
    let abs = |p: Option<&Path>| -> anyhow::Result<String> {
        Ok(match p {
            Some(p) => std::path::absolute(p)?.display().to_string(),
            None => String::new(),
        })
    };
    let mut client = connect(server).await?;
    let resp = client
        .rotate_ca(RotateCaRequest {
            phase: phase.to_owned(),
            ca_cert_path: abs(ca_cert)?,
            ca_key_path: abs(ca_key)?,
            force,
        })
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?
        .into_inner();
    outln!("{} (phase: {})", resp.message, resp.phase)?;
    Ok(0)
}
