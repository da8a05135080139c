//! `sinew stat`, `top`, `tap` and `edges`: traffic as the proxies report it to the
//! control plane, with no Prometheus.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::bail;
use sinew_api::v1::{
    Edge, EdgesRequest, StatRequest, StatRow, TapEvent, TapFilter, TapRequest, TopRequest, TopRow,
    tap_response,
};

use std::collections::BTreeMap;

use crate::client::{connect, connect_with, hint_elsewhere, status};

/// The longest window the control plane keeps.
const MAX_WINDOW: Duration = Duration::from_secs(60);

fn window_secs(w: Duration) -> anyhow::Result<u32> {
    if w > MAX_WINDOW {
        bail!("--window {w:?}: at most 60s (the control plane keeps the last minute)");
    }
    Ok(w.as_secs().max(1) as u32)
}

/// Prints a table: left-aligned columns two spaces apart, like `kubectl`.
fn print_table(header: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        outln!("{}", s.join("  ").trim_end())
    };
    line(header.to_vec())?;
    for r in rows {
        line(r.iter().map(String::as_str).collect())?;
    }
    Ok(())
}

/// `12ms`, `3.1ms`, `0.42ms`, `1.20s`; `-` when unknown.
pub fn ms(v: f64) -> String {
    if v <= 0.0 || !v.is_finite() {
        "-".into()
    } else if v >= 1000.0 {
        format!("{:.2}s", v / 1000.0)
    } else if v >= 10.0 {
        format!("{v:.0}ms")
    } else if v >= 1.0 {
        format!("{v:.1}ms")
    } else {
        format!("{v:.2}ms")
    }
}

/// `99.50%`, or `-` without requests.
pub fn success(requests: u64, failures: u64) -> String {
    if requests == 0 {
        return "-".into();
    }
    format!(
        "{:.2}%",
        100.0 * (requests - failures.min(requests)) as f64 / requests as f64
    )
}

fn rate(rps: f64) -> String {
    if rps >= 10.0 {
        format!("{rps:.1}")
    } else {
        format!("{rps:.2}")
    }
}

fn success_ratio(requests: u64, failures: u64) -> Option<f64> {
    (requests > 0).then(|| (requests - failures.min(requests)) as f64 / requests as f64)
}

/// `name.namespace` → `name`; `namespace/name` → `name`.
fn short(name: &str) -> &str {
    name.rsplit_once('/')
        .map(|(_, n)| n)
        .or_else(|| name.split_once('.').map(|(n, _)| n))
        .unwrap_or(name)
}

/// `sinew stat`.
pub async fn stat(
    server: &crate::client::Server,
    by: &str,
    namespace: Option<&str>,
    window: Duration,
    direction: Option<&str>,
    output: &str,
) -> anyhow::Result<i32> {
    let window_seconds = window_secs(window)?;
    let mut client = connect(server).await?;
    let request = |namespace: Option<&str>| StatRequest {
        by: by.to_owned(),
        namespace: namespace.unwrap_or_default().to_owned(),
        window_seconds,
        direction: direction.unwrap_or_default().to_owned(),
    };
    let resp = client
        .stat(request(namespace))
        .await
        .map_err(status)?
        .into_inner();
    if output == "json" {
        let rows: Vec<serde_json::Value> = resp.rows.iter().map(stat_json).collect();
        let doc = serde_json::json!({
            "by": by,
            "windowSeconds": resp.window_seconds,
            "proxies": resp.proxies,
            "rows": rows,
        });
        outln!("{}", serde_json::to_string_pretty(&doc)?)?;
        return Ok(0);
    }
    let route = by == "route";
    let mut header = vec!["NAME", "NAMESPACE"];
    if route {
        header.push("SERVICE");
    }
    header.extend([
        "SUCCESS",
        "RPS",
        "LATENCY_P50",
        "LATENCY_P95",
        "LATENCY_P99",
        "REQUESTS",
        "MTLS",
        "SEEN_BY",
    ]);
    let rows: Vec<Vec<String>> = resp
        .rows
        .iter()
        .map(|r| {
            let mut row = vec![short(&r.name).to_owned(), r.namespace.clone()];
            if route {
                row.push(short(&r.service).to_owned());
            }
            row.extend([
                success(r.requests, r.failures),
                rate(r.rps),
                ms(r.p50_ms),
                ms(r.p95_ms),
                ms(r.p99_ms),
                r.requests.to_string(),
                format!(
                    "{:.0}%",
                    100.0 * r.mtls_requests as f64 / r.requests.max(1) as f64
                ),
                if r.direction == "inbound" {
                    "server".into()
                } else {
                    "client".into()
                },
            ]);
            row
        })
        .collect();
    print_table(&header, &rows)?;
    if rows.is_empty() {
        let elsewhere = match namespace {
            Some(ns) => {
                let all = client
                    .stat(request(None))
                    .await
                    .map_err(status)?
                    .into_inner();
                Some((ns, count(all.rows.iter().map(|r| r.namespace.clone()))))
            }
            None => None,
        };
        match elsewhere {
            Some((ns, counts)) if counts.keys().any(|n| n != ns) => {
                hint_elsewhere(&format!("{by}s with traffic"), ns, &counts)
            }
            _ => eprintln!(
                "no traffic reported in the last {}s{} (proxies report every 2s while they have traffic)",
                resp.window_seconds,
                namespace
                    .map(|n| format!(" in namespace {n}"))
                    .unwrap_or_default()
            ),
        }
    }
    Ok(0)
}

fn stat_json(r: &StatRow) -> serde_json::Value {
    serde_json::json!({
        "name": r.name,
        "namespace": r.namespace,
        "service": r.service,
        "direction": r.direction,
        "requests": r.requests,
        "failures": r.failures,
        "successRate": success_ratio(r.requests, r.failures),
        "rps": r.rps,
        "latencyMs": {"p50": r.p50_ms, "p95": r.p95_ms, "p99": r.p99_ms},
        "mtlsRequests": r.mtls_requests,
        "proxies": r.proxies,
    })
}

fn top_json(r: &TopRow) -> serde_json::Value {
    serde_json::json!({
        "service": r.service,
        "method": r.method,
        "path": r.path,
        "direction": r.direction,
        "requests": r.requests,
        "failures": r.failures,
        "successRate": success_ratio(r.requests, r.failures),
        "rps": r.rps,
        "meanMs": r.mean_ms,
        "maxMs": r.max_ms,
    })
}

/// How many of each namespace.
fn count(namespaces: impl Iterator<Item = String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for ns in namespaces {
        *counts.entry(ns).or_default() += 1;
    }
    counts
}

/// The namespace of `name.namespace`.
fn service_namespace(service: &str) -> String {
    service
        .rsplit_once('.')
        .map(|(_, ns)| ns)
        .unwrap_or_default()
        .to_owned()
}

/// `sinew top`: the busiest paths, refreshed every `every` until Ctrl-C (or once).
pub async fn top(
    server: &crate::client::Server,
    namespace: Option<&str>,
    service: Option<&str>,
    limit: u32,
    every: Duration,
    once: bool,
    output: &str,
) -> anyhow::Result<i32> {
    let mut client = connect(server).await?;
    let json = output == "json";
    let tty = std::io::stdout().is_terminal();
    let request = |namespace: Option<&str>| TopRequest {
        namespace: namespace.unwrap_or_default().to_owned(),
        service: service.unwrap_or_default().to_owned(),
        window_seconds: 0,
        limit,
    };
    loop {
        let resp = client
            .top(request(namespace))
            .await
            .map_err(status)?
            .into_inner();
        if json {
            let rows: Vec<serde_json::Value> = resp.rows.iter().map(top_json).collect();
            let doc = serde_json::json!({"windowSeconds": resp.window_seconds, "rows": rows});
            outln!("{}", serde_json::to_string_pretty(&doc)?)?;
            return Ok(0);
        }
        if tty && !once {
            // Clear the screen and go home, like top(1).
            out!("\x1b[2J\x1b[H")?;
            outln!(
                "busiest paths over the last {}s (every {:?}; Ctrl-C to stop)\n",
                resp.window_seconds,
                every
            )?;
        }
        let rows: Vec<Vec<String>> = resp
            .rows
            .iter()
            .map(|r| {
                vec![
                    r.service.clone(),
                    r.method.clone(),
                    r.path.clone(),
                    r.requests.to_string(),
                    rate(r.rps),
                    success(r.requests, r.failures),
                    ms(r.mean_ms),
                    ms(r.max_ms),
                ]
            })
            .collect();
        print_table(
            &[
                "SERVICE", "METHOD", "PATH", "COUNT", "RPS", "SUCCESS", "MEAN", "MAX",
            ],
            &rows,
        )?;
        if rows.is_empty() {
            let mut hinted = false;
            if let Some(ns) = namespace {
                let all = client
                    .top(request(None))
                    .await
                    .map_err(status)?
                    .into_inner();
                let counts = count(all.rows.iter().map(|r| service_namespace(&r.service)));
                hinted = counts.keys().any(|n| n != ns);
                hint_elsewhere("paths with traffic", ns, &counts);
            }
            if !hinted {
                eprintln!("no requests in the last {}s", resp.window_seconds);
            }
        }
        if once {
            return Ok(0);
        }
        if !tty {
            outln!()?;
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = tokio::signal::ctrl_c() => return Ok(0),
        }
    }
}

/// What `sinew tap` shows of a request, one line.
pub fn tap_line(e: &TapEvent) -> String {
    let mut s = format!(
        "{} {:<8} {} {} {}{} -> {} {}",
        e.start,
        e.direction,
        e.proxy,
        e.method,
        e.authority,
        e.path,
        e.status,
        ms(e.duration_ms)
    );
    let mut field = |k: &str, v: &str| {
        if !v.is_empty() {
            s.push_str(&format!(" {k}={v}"));
        }
    };
    field("service", &e.service);
    field("route", &e.route);
    field("grpc-status", &e.grpc_status);
    field("peer", &e.peer_identity);
    field("upstream", &e.upstream);
    field("error", &e.error);
    field("trace", &e.trace_id);
    s
}

fn tap_json(e: &TapEvent) -> serde_json::Value {
    let opt = |v: &str| (!v.is_empty()).then(|| v.to_owned());
    serde_json::json!({
        "proxy": e.proxy,
        "start": e.start,
        "direction": e.direction,
        "method": e.method,
        "authority": e.authority,
        "path": e.path,
        "protocol": e.protocol,
        "status": e.status,
        "grpcStatus": opt(&e.grpc_status),
        "durationMs": e.duration_ms,
        "service": opt(&e.service),
        "route": opt(&e.route),
        "upstream": opt(&e.upstream),
        "client": e.client,
        "peerIdentity": opt(&e.peer_identity),
        "traceId": opt(&e.trace_id),
        "error": opt(&e.error),
        "headers": e.headers,
    })
}

/// `sinew tap`: live requests until Ctrl-C or `filter.limit` of them.
///
/// With a `namespace`, only the events of that namespace's proxies are shown; the
/// control plane taps every proxy, so the limit is counted here.
pub async fn tap(
    server: &crate::client::Server,
    mut filter: TapFilter,
    namespace: Option<&str>,
    output: &str,
) -> anyhow::Result<i32> {
    // No deadline: a tap lasts as long as the user wants.
    let mut client = connect_with(server, None).await?;
    let limit = filter.limit;
    if namespace.is_some() {
        filter.limit = 0;
    }
    // Requests are counted as the control plane counts them for the limit.
    let counting = TapFilter {
        direction: filter.direction.clone(),
        ..Default::default()
    };
    let mut stream = client
        .tap(TapRequest {
            filter: Some(filter),
        })
        .await
        .map_err(status)?
        .into_inner();
    let json = output == "json";
    let mut seen = 0u64;
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = tokio::signal::ctrl_c() => return Ok(0),
        };
        let msg = match msg {
            Ok(Some(m)) => m,
            Ok(None) if limit > 0 && seen >= limit => return Ok(0),
            Ok(None) => bail!("the control plane ended the tap"),
            Err(e) => return Err(status(e)),
        };
        match msg.kind {
            Some(tap_response::Kind::Started(0)) => {
                eprintln!("tapping: no proxies connected yet; proxies that connect will be tapped")
            }
            Some(tap_response::Kind::Started(n)) => match namespace {
                Some(ns) => eprintln!(
                    "tapping {n} proxies, showing those in namespace {ns} (Ctrl-C to stop)"
                ),
                None => eprintln!("tapping {n} proxies (Ctrl-C to stop)"),
            },
            Some(tap_response::Kind::Missed(n)) => {
                eprintln!("({n} events missed: too many to relay)")
            }
            Some(tap_response::Kind::Event(e)) => {
                let mut counted = sinew_control::telemetry::tap::counts(&counting, &e);
                if let Some(ns) = namespace {
                    if proxy_namespace(&e.proxy) != ns {
                        continue;
                    }
                    // The caller's side is shown only when its proxy is here too.
                    counted |= identity_namespace(&e.peer_identity) != Some(ns);
                }
                if json {
                    outln!("{}", tap_json(&e))?;
                } else {
                    outln!("{}", tap_line(&e))?;
                }
                seen += u64::from(counted);
                if namespace.is_some() && limit > 0 && seen >= limit {
                    return Ok(0);
                }
            }
            None => {}
        }
    }
}

/// The namespace of a proxy's `namespace/name`.
fn proxy_namespace(proxy: &str) -> &str {
    proxy.split_once('/').map_or("", |(ns, _)| ns)
}

/// The namespace of `spiffe://<trust-domain>/ns/<namespace>/sa/<account>`.
fn identity_namespace(id: &str) -> Option<&str> {
    let rest = id.split_once("/ns/")?.1;
    Some(rest.split_once('/').map_or(rest, |(ns, _)| ns))
}

fn edge_json(e: &Edge) -> serde_json::Value {
    serde_json::json!({
        "src": e.src,
        "srcService": e.src_service,
        "clientIdentity": e.client_identity,
        "dst": e.dst,
        "dstWorkloads": e.dst_workloads,
        "serverIdentities": e.server_identities,
        "requests": e.requests,
        "failures": e.failures,
        "successRate": success_ratio(e.requests, e.failures),
        "mtlsRequests": e.mtls_requests,
        "mtls": e.requests > 0 && e.mtls_requests == e.requests,
        "verifiedByServer": e.verified_by_server,
    })
}

/// `sinew edges`: who calls whom.
pub async fn edges(
    server: &crate::client::Server,
    namespace: Option<&str>,
    window: Duration,
    output: &str,
) -> anyhow::Result<i32> {
    let window_seconds = window_secs(window)?;
    let mut client = connect(server).await?;
    let request = |namespace: Option<&str>| EdgesRequest {
        namespace: namespace.unwrap_or_default().to_owned(),
        window_seconds,
    };
    let resp = client
        .edges(request(namespace))
        .await
        .map_err(status)?
        .into_inner();
    if output == "json" {
        let edges: Vec<serde_json::Value> = resp.edges.iter().map(edge_json).collect();
        let doc = serde_json::json!({"windowSeconds": resp.window_seconds, "edges": edges});
        outln!("{}", serde_json::to_string_pretty(&doc)?)?;
        return Ok(0);
    }
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    let rows: Vec<Vec<String>> = resp
        .edges
        .iter()
        .map(|e| {
            let mtls = match (e.mtls_requests, e.requests) {
                (m, r) if m == r && r > 0 => "yes".to_owned(),
                (0, _) => "no".to_owned(),
                (m, r) => format!("{:.0}%", 100.0 * m as f64 / r as f64),
            };
            vec![
                if e.src.is_empty() {
                    "(no proxy)".to_owned()
                } else {
                    e.src.clone()
                },
                e.dst.clone(),
                dash(&e.client_identity),
                dash(&e.server_identities.join(",")),
                mtls,
                e.requests.to_string(),
                success(e.requests, e.failures),
            ]
        })
        .collect();
    print_table(
        &[
            "SRC",
            "DST",
            "CLIENT_ID",
            "SERVER_ID",
            "MTLS",
            "REQUESTS",
            "SUCCESS",
        ],
        &rows,
    )?;
    if rows.is_empty() {
        let mut hinted = false;
        if let Some(ns) = namespace {
            let all = client
                .edges(request(None))
                .await
                .map_err(status)?
                .into_inner();
            // An edge counts for the namespaces of both of its ends.
            let counts = count(all.edges.iter().flat_map(|e| {
                let (src, dst) = (
                    proxy_namespace(&e.src).to_owned(),
                    service_namespace(&e.dst),
                );
                if src == dst || src.is_empty() {
                    vec![dst]
                } else {
                    vec![src, dst]
                }
            }));
            hinted = counts.keys().any(|n| n != ns);
            hint_elsewhere("edges", ns, &counts);
        }
        if !hinted {
            eprintln!("no traffic reported in the last {}s", resp.window_seconds);
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(ms(0.0), "-");
        assert_eq!(ms(0.4213), "0.42ms");
        assert_eq!(ms(3.12), "3.1ms");
        assert_eq!(ms(123.4), "123ms");
        assert_eq!(ms(1500.0), "1.50s");
        assert_eq!(success(0, 0), "-");
        assert_eq!(success(200, 3), "98.50%");
        assert_eq!(short("catalog.shop"), "catalog");
        assert_eq!(short("shop/catalog-1"), "catalog-1");
        assert_eq!(short("default"), "default");
    }
}
