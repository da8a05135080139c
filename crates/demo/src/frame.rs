//! What the demo shows at one moment: the data of one screen of the live view, built
//! by the tour from the mesh's own telemetry and drawn by the view (in place on a
//! terminal, as plain lines otherwise).

/// One screen of the demo's live view.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Frame {
    /// How long the demo has been running, in seconds.
    pub elapsed_secs: u64,
    /// The act being played, e.g. "2/5 canary: 50/50"; empty before the tour starts.
    pub act: String,
    /// One line saying what the act shows and what to look at.
    pub caption: String,
    /// One row per service, sorted by namespace then name.
    pub rows: Vec<Row>,
    /// The most recent events, oldest first (at most a dozen), e.g.
    /// "applied catalog route: v1 50%, v2 50%".
    pub events: Vec<String>,
    /// Commands to try from a second shell (the first is the `eval "$(sinew demo env)"` line).
    pub try_next: Vec<String>,
}

/// One service's golden signals over the last window, as the mesh's proxies report them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    /// Service name.
    pub service: String,
    /// Its namespace.
    pub namespace: String,
    /// Requests per second.
    pub rps: f64,
    /// Share of requests that succeeded, 0.0..=1.0; `None` without requests.
    pub success: Option<f64>,
    /// Median latency in milliseconds.
    pub p50_ms: Option<f64>,
    /// 99th-percentile latency in milliseconds.
    pub p99_ms: Option<f64>,
    /// Share of requests carried over mutual TLS, 0.0..=1.0; `None` without requests.
    pub mtls: Option<f64>,
    /// Traffic split across versions, e.g. "v1 90% · v2 10%"; empty when not split.
    pub split: String,
}
