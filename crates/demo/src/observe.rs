//! The mesh's own telemetry, as the demo reads it: the control plane's `Stat` (what
//! `sinew stat` shows: golden signals per service, workload or route, with the mTLS
//! share) and the sidecars' cumulative Prometheus counters (`/metrics` on their admin
//! listener), which give exact counts over an act however short.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use http::{StatusCode, Uri};
use sinew_api::v1::admin_client::AdminClient;
use sinew_api::v1::{StatRequest, StatRow};
use tonic::transport::Channel;

use crate::client::{HttpClient, get};

/// Longest wait for one scrape or one `Stat`.
const TIMEOUT: Duration = Duration::from_secs(5);

/// One sample of a Prometheus text exposition: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    pub(crate) name: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) value: f64,
}

impl Sample {
    /// A label's value ("" when absent).
    pub(crate) fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// Parses the text format (`name{a="b",c="d"} 12`); comments and lines it cannot
/// read are skipped.
pub(crate) fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = value.trim().parse().ok()?;
    let (name, labels) = match head.split_once('{') {
        None => (head.trim(), BTreeMap::new()),
        Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `a="b",c="d \"q\""` → map (escapes `\"`, `\\`, `\n` undone).
fn parse_labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                other => value.push(other),
            }
        };
        map.insert(key.trim_start_matches(',').trim().to_owned(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    Some(map)
}

/// A sidecar's `/metrics`.
pub(crate) async fn scrape(client: &HttpClient, admin: SocketAddr) -> Result<Vec<Sample>, String> {
    let uri: Uri = format!("http://{admin}/metrics")
        .parse()
        .map_err(|e| format!("http://{admin}/metrics: {e}"))?;
    let f = get(client, &uri, TIMEOUT).await?;
    if f.status != StatusCode::OK {
        return Err(format!("{uri}: {}", f.status));
    }
    Ok(parse_metrics(&String::from_utf8_lossy(&f.body)))
}

/// The sum of the samples named `name` whose labels pass `keep`.
pub(crate) fn sum(samples: &[Sample], name: &str, keep: impl Fn(&Sample) -> bool) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && keep(s))
        .map(|s| s.value)
        .sum()
}

/// HTTP requests a sidecar counted (`sinew_requests_total`).
pub(crate) const REQUESTS: &str = "sinew_requests_total";
/// Retries a sidecar sent.
pub(crate) const RETRIES: &str = "sinew_retries_total";
/// Endpoints a sidecar's outlier detection ejected.
pub(crate) const EJECTIONS: &str = "sinew_outlier_ejections_total";

/// The control plane's `Stat` (what `sinew stat --by BY -n demo --window W` asks).
pub(crate) async fn stat(
    admin: &AdminClient<Channel>,
    by: &str,
    namespace: &str,
    window: Duration,
) -> Result<Vec<StatRow>, String> {
    let mut admin = admin.clone();
    let call = admin.stat(StatRequest {
        by: by.to_owned(),
        namespace: namespace.to_owned(),
        window_seconds: window.as_secs().clamp(1, 60) as u32,
        direction: String::new(),
    });
    match tokio::time::timeout(TIMEOUT, call).await {
        Ok(Ok(r)) => Ok(r.into_inner().rows),
        Ok(Err(s)) => Err(format!("Stat: {:?}: {}", s.code(), s.message())),
        Err(_) => Err(format!("Stat: no answer within {}s", TIMEOUT.as_secs())),
    }
}

/// `name.namespace` or `namespace/name` → `name`.
pub(crate) fn short(name: &str) -> &str {
    name.rsplit_once('/')
        .map(|(_, n)| n)
        .or_else(|| name.split_once('.').map(|(n, _)| n))
        .unwrap_or(name)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn reads_the_text_format() {
        let text = "# HELP sinew_retries Retries\n# TYPE sinew_retries counter\n\
                    sinew_retries_total 7\n\
                    sinew_requests_total{direction=\"inbound\",service=\"catalog-v1.demo\",route=\"\",peer_identity=\"spiffe://x/ns/demo/sa/frontend\",status_code=\"200\",grpc_status=\"\"} 12\n\
                    sinew_requests_total{direction=\"outbound\",service=\"a\\\"b\",route=\"demo/ratings\",peer_identity=\"\",status_code=\"503\",grpc_status=\"\"} 3\n\
                    garbage\n";
        let samples = parse_metrics(text);
        assert_eq!(samples.len(), 3, "{samples:?}");
        assert_eq!(sum(&samples, RETRIES, |_| true), 7.0);
        assert_eq!(
            sum(&samples, REQUESTS, |s| s.label("direction") == "inbound"),
            12.0
        );
        let out = &samples[2];
        assert_eq!(out.label("service"), "a\"b");
        assert_eq!(out.label("route"), "demo/ratings");
        assert_eq!(out.label("status_code"), "503");
        assert_eq!(out.label("missing"), "");
        assert_eq!(short("catalog.demo"), "catalog");
        assert_eq!(short("demo/ratings"), "ratings");
    }
}
