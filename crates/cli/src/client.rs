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
use sinew_model::{Resources, parse_documents, parse_sources};
use tonic::transport::Channel;

pub(crate) async fn connect(server: &str) -> anyhow::Result<AdminClient<Channel>> {
    connect_with(server, Some(Duration::from_secs(30))).await
}

/// Connects with a deadline per call (`None` for streams that last as long as the
/// user wants, such as `sinew tap`).
pub(crate) async fn connect_with(
    server: &str,
    timeout: Option<Duration>,
) -> anyhow::Result<AdminClient<Channel>> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(server.to_owned())
        .with_context(|| format!("{server:?} is not a valid control-plane address"))?
        .connect_timeout(Duration::from_secs(3));
    if let Some(t) = timeout {
        endpoint = endpoint.timeout(t);
    }
    match endpoint.connect().await {
        Ok(ch) => Ok(AdminClient::new(ch)),
        Err(_) => bail!(
            "cannot reach the control plane at {server} (is `sinew control` running? set --server or SINEW_SERVER)"
        ),
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
pub async fn apply(server: &str, paths: &[PathBuf], dry_run: bool) -> anyhow::Result<i32> {
    let sources = read_sources(paths)?;
    // Parse locally first: a syntax error is reported without a round trip.
    let count = parse_sources(sources.iter().map(|(l, t)| (l.as_str(), t.as_str())))
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
            println!("{} {}/{} {}{suffix}", k.kind, k.namespace, k.name, r.action);
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

/// `sinew get`.
pub async fn get(
    server: &str,
    kind: &str,
    name: Option<&str>,
    namespace: &str,
    output: &str,
) -> anyhow::Result<i32> {
    let kind = if kind.eq_ignore_ascii_case("all") {
        ""
    } else {
        kind
    };
    if sinew_control::admin::canonical_kind(kind).is_none() {
        bail!(
            "unknown kind {kind:?}: use service, workload, httproute, proxy, meshconfig, authorizationpolicy, requestauthentication or all"
        );
    }
    let mut client = connect(server).await?;
    let resp = client
        .get(GetRequest {
            kind: kind.to_owned(),
            namespace: namespace.to_owned(),
            name: name.unwrap_or("").to_owned(),
        })
        .await
        .map_err(status)?
        .into_inner();
    if resp.resources.is_empty()
        && let Some(n) = name
    {
        bail!("{kind} {namespace}/{n} not found");
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
            println!("{}", serde_json::to_string_pretty(&items)?);
        }
        "yaml" => {
            for (_, v, _, _) in &docs {
                println!("---\n{}", serde_norway::to_string(v)?.trim_end());
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
            );
        }
    }
    Ok(0)
}

fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
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
        println!("{}", s.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// `sinew delete`.
pub async fn delete(
    server: &str,
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
                        "unknown kind {k:?}: use service, workload, httproute, proxy or meshconfig"
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
        println!("{} {}/{} {what}", k.kind, k.namespace, k.name);
    }
    Ok(if resp.deleted.len() == keys.len() {
        0
    } else {
        1
    })
}

/// `sinew proxy-status`.
pub async fn proxy_status(server: &str, output: &str) -> anyhow::Result<i32> {
    let mut client = connect(server).await?;
    let resp = client
        .proxy_status(ProxyStatusRequest {})
        .await
        .map_err(status)?
        .into_inner();
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
        println!("{}", serde_json::to_string_pretty(&items)?);
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
    );
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
pub async fn check(server: &str, wait: Duration) -> anyhow::Result<i32> {
    let mut failed = false;
    let mut line = |ok: bool, what: String| {
        println!("{} {what}", if ok { "PASS" } else { "FAIL" });
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
            format!("store healthy: {}", health.store_error)
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
pub async fn server_version(server: &str) -> anyhow::Result<String> {
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
            println!("{n} documents valid");
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
    server: &str,
    namespace: &str,
    account: &str,
    ttl_days: u64,
) -> anyhow::Result<i32> {
    let mut client = connect(server).await?;
    let t = client
        .create_join_token(CreateJoinTokenRequest {
            namespace: namespace.to_owned(),
            service_account: account.to_owned(),
            ttl_seconds: ttl_days.max(1) * 86_400,
        })
        .await
        .map_err(status)?
        .into_inner();
    println!("{}", t.token);
    eprintln!(
        "join token for {} (valid {ttl_days} days); pass it to sinew-proxy --join-token",
        t.spiffe_id
    );
    Ok(0)
}

/// `sinew ca rotate PHASE`.
pub async fn rotate_ca(
    server: &str,
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
    println!("{} (phase: {})", resp.message, resp.phase);
    Ok(0)
}
