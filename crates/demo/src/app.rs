//! `sinew demo-app`: the sample workload of the demo mesh.
//!
//! One process serves one instance of one service version:
//!
//! | endpoint | answer |
//! |---|---|
//! | HTTP `GET /healthz` | `200 ok` |
//! | HTTP `GET /stats` | [`Stats`]: cumulative counters and a latency histogram |
//! | HTTP, any other path | calls every `--call` downstream (`GET <url>/`) concurrently; `200` JSON `{"service","version","instance","downstream":[..]}`, `502` when a downstream failed, `500` per `--error-rate` |
//! | gRPC `sinew.demo.v1.Demo/Hello` | the same work; `HelloReply` with each downstream's JSON as a string |
//!
//! The HTTP listener speaks HTTP/1.1 and h2c; the gRPC listener is a tonic server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use sinew_api::demo::demo_server::{Demo, DemoServer};
use sinew_api::demo::{HelloReply, HelloRequest};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tonic::transport::server::TcpIncoming;

use crate::client::{HttpClient, get, new_client};
use crate::stats::{Recorder, Stats};

/// How long one downstream call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// `sinew demo-app`: run one instance of a demo service.
#[derive(Debug, Clone, clap::Args)]
pub struct AppArgs {
    /// Service name this instance reports (e.g. `catalog-v1`).
    #[arg(long)]
    pub service: String,
    /// Version this instance reports.
    #[arg(long, default_value = "v1")]
    pub version: String,
    /// Instance id this instance reports (default `<service>-<pid>`).
    #[arg(long)]
    pub instance: Option<String>,
    /// HTTP listener (HTTP/1.1 and h2c), e.g. `127.0.0.1:8080`.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<SocketAddr>,
    /// gRPC listener (`sinew.demo.v1.Demo`), e.g. `127.0.0.1:9090`.
    #[arg(long, value_name = "ADDR")]
    pub grpc: Option<SocketAddr>,
    /// Downstream HTTP base URL to call on every request (repeatable), e.g. the local
    /// sidecar's outbound binding `http://127.0.0.1:19002`.
    #[arg(long = "call", value_name = "URL")]
    pub calls: Vec<String>,
    /// Latency added to every request, e.g. 5ms.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = sinew_model::duration::flag_secs)]
    pub latency: std::time::Duration,
    /// The old spelling of --latency, in milliseconds.
    #[arg(long, hide = true, value_parser = sinew_model::duration::flag_millis, conflicts_with = "latency")]
    pub latency_ms: Option<std::time::Duration>,
    /// Random extra latency per request, uniform in 0..=DURATION, e.g. 5ms.
    #[arg(long, value_name = "DURATION", default_value = "5ms", value_parser = sinew_model::duration::flag_secs)]
    pub jitter: std::time::Duration,
    /// The old spelling of --jitter, in milliseconds.
    #[arg(long, hide = true, value_parser = sinew_model::duration::flag_millis, conflicts_with = "jitter")]
    pub jitter_ms: Option<std::time::Duration>,
    /// Fraction of requests (0 to 1) answered with an error (HTTP 500, gRPC INTERNAL).
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    pub error_rate: f64,
}

/// Runs the demo app until Ctrl-C or SIGTERM (or until a listener fails).
pub async fn run(args: AppArgs) -> anyhow::Result<()> {
    let mut signals = crate::signal::Signals::install()?;
    let mut app = start(&args).await?;
    let listening: Vec<String> = [
        app.http_addr().map(|a| format!("http on {a}")),
        app.grpc_addr().map(|a| format!("grpc on {a}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    eprintln!(
        "demo-app {} {} ({}): {}; calls: [{}]",
        app.state.service,
        app.state.version,
        app.state.instance,
        listening.join(", "),
        args.calls.join(", ")
    );
    tokio::select! {
        result = app.failed() => result,
        signal = signals.recv() => {
            eprintln!("demo-app {}: {signal}, stopping", app.state.instance);
            app.shutdown().await;
            Ok(())
        }
    }
}

/// Binds the listeners and starts serving; ready when this returns. Port 0 in
/// `--http`/`--grpc` picks a free port (see [`RunningApp::http_addr`]).
pub async fn start(args: &AppArgs) -> anyhow::Result<RunningApp> {
    let state = Arc::new(AppState::from_args(args)?);
    let mut tasks = JoinSet::new();
    let mut http = None;
    if let Some(addr) = args.http {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--http)"))?;
        let bound = listener.local_addr()?;
        http = Some(bound);
        tasks.spawn(serve_http(listener, state.clone()));
    }
    let mut grpc = None;
    if let Some(addr) = args.grpc {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--grpc)"))?;
        let bound = listener.local_addr()?;
        grpc = Some(bound);
        let router = tonic::transport::Server::builder().add_service(DemoServer::new(GrpcDemo {
            state: state.clone(),
        }));
        tasks.spawn(async move {
            router
                .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
                .await
                .map_err(|e| anyhow!("gRPC server on {bound} failed: {e}"))
        });
    }
    Ok(RunningApp {
        http,
        grpc,
        state,
        tasks,
    })
}

/// A demo app serving in this process. Dropping it stops the listeners.
#[derive(Debug)]
pub struct RunningApp {
    http: Option<SocketAddr>,
    grpc: Option<SocketAddr>,
    state: Arc<AppState>,
    tasks: JoinSet<anyhow::Result<()>>,
}

impl RunningApp {
    /// The bound HTTP listener address, if any.
    #[must_use]
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
    }

    /// The bound gRPC listener address, if any.
    #[must_use]
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc
    }

    /// The counters as `GET /stats` would answer them now.
    #[must_use]
    pub fn stats(&self) -> Stats {
        self.state.stats()
    }

    /// Stops the listeners and waits until they are closed.
    pub async fn shutdown(mut self) {
        self.tasks.shutdown().await;
    }

    /// Resolves when a listener stops serving (which it only does on failure).
    async fn failed(&mut self) -> anyhow::Result<()> {
        match self.tasks.join_next().await {
            Some(Ok(Ok(()))) => Err(anyhow!("a listener stopped unexpectedly")),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(e)) => Err(anyhow!("a listener task failed: {e}")),
            None => std::future::pending().await,
        }
    }
}

/// What every request handler shares.
#[derive(Debug)]
struct AppState {
    service: String,
    version: String,
    instance: String,
    /// Full downstream URLs (`<base>/`), with the base as given for messages.
    calls: Vec<(String, Uri)>,
    latency_ms: u64,
    jitter_ms: u64,
    error_rate: f64,
    recorder: Recorder,
    client: HttpClient,
}

/// One downstream call's result: its JSON answer, or why it failed.
type DownstreamResult = Result<Value, String>;

/// The outcome of one `GET /` or `Hello`.
enum Outcome {
    /// Every downstream answered.
    Ok(Vec<DownstreamResult>),
    /// `--error-rate` picked this request.
    Injected,
    /// At least one downstream failed.
    DownstreamFailed(Vec<DownstreamResult>),
}

impl AppState {
    fn from_args(args: &AppArgs) -> anyhow::Result<AppState> {
        if args.service.trim().is_empty() {
            bail!("--service must not be empty");
        }
        if args.http.is_none() && args.grpc.is_none() {
            bail!("give at least one listener: --http ADDR and/or --grpc ADDR");
        }
        if !(0.0..=1.0).contains(&args.error_rate) {
            bail!(
                "--error-rate must be between 0 and 1, got {}",
                args.error_rate
            );
        }
        let calls = args
            .calls
            .iter()
            .map(|base| parse_call(base).map(|uri| (base.clone(), uri)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let instance = args
            .instance
            .clone()
            .unwrap_or_else(|| format!("{}-{}", args.service, std::process::id()));
        Ok(AppState {
            service: args.service.clone(),
            version: args.version.clone(),
            instance,
            calls,
            latency_ms: millis(args.latency_ms.unwrap_or(args.latency)),
            jitter_ms: millis(args.jitter_ms.unwrap_or(args.jitter)),
            error_rate: args.error_rate,
            recorder: Recorder::new(),
            client: new_client(),
        })
    }

    fn stats(&self) -> Stats {
        Stats {
            service: self.service.clone(),
            version: self.version.clone(),
            instance: self.instance.clone(),
            counters: self.recorder.snapshot(),
        }
    }

    /// The work of one request: latency, maybe an injected error, the downstream calls.
    async fn answer(&self) -> Outcome {
        let delay = self.latency_ms
            + if self.jitter_ms > 0 {
                fastrand::u64(0..=self.jitter_ms)
            } else {
                0
            };
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.error_rate > 0.0 && fastrand::f64() < self.error_rate {
            return Outcome::Injected;
        }
        let results: Vec<DownstreamResult> = futures_util::future::join_all(
            self.calls
                .iter()
                .map(|(base, uri)| async move { call(&self.client, base, uri).await }),
        )
        .await;
        if results.iter().all(Result::is_ok) {
            Outcome::Ok(results)
        } else {
            Outcome::DownstreamFailed(results)
        }
    }

    fn identity(&self) -> serde_json::Map<String, Value> {
        let mut map = serde_json::Map::new();
        map.insert("service".into(), Value::from(self.service.as_str()));
        map.insert("version".into(), Value::from(self.version.as_str()));
        map.insert("instance".into(), Value::from(self.instance.as_str()));
        map
    }
}

/// Checks a `--call` base URL and returns the URL to `GET` (`<base>/`).
/// A flag's duration as the whole milliseconds the app sleeps.
fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn parse_call(base: &str) -> anyhow::Result<Uri> {
    let full = format!("{}/", base.trim_end_matches('/'));
    let uri: Uri = full
        .parse()
        .with_context(|| format!("--call {base}: not a URL"))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        bail!("--call {base}: expected an http:// URL such as http://127.0.0.1:19002");
    }
    Ok(uri)
}

/// `GET <base>/`: the downstream's JSON, or `"<base>: <why>"`.
async fn call(client: &HttpClient, base: &str, uri: &Uri) -> DownstreamResult {
    let fetched = get(client, uri, CALL_TIMEOUT)
        .await
        .map_err(|e| format!("{base}: {e}"))?;
    if fetched.status != StatusCode::OK {
        let reason = fetched
            .headers
            .get("sinew-error")
            .and_then(|v| v.to_str().ok())
            .map(|r| format!(" (sinew-error: {r})"))
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&fetched.body);
        let first_line: String = text
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(160)
            .collect();
        return Err(format!(
            "{base}: HTTP {}{reason}: {first_line}",
            fetched.status.as_u16()
        ));
    }
    serde_json::from_slice(&fetched.body).map_err(|e| format!("{base}: invalid JSON answer: {e}"))
}

fn downstream_json(results: Vec<DownstreamResult>) -> Value {
    Value::Array(
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(Value::String))
            .collect(),
    )
}

/// Accepts HTTP/1.1 and h2c connections until the task is aborted; connections live
/// in this task's set, so they end with it.
async fn serve_http(listener: TcpListener, state: Arc<AppState>) -> anyhow::Result<()> {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    // Best effort: small messages, lower latency.
                    let _ = stream.set_nodelay(true);
                    let state = state.clone();
                    conns.spawn(async move {
                        let service = service_fn(move |req| handle(state.clone(), req));
                        // A connection error (reset, bad request) ends only that connection.
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                // Transient accept errors (out of file descriptors): back off briefly
                // rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match req.uri().path() {
        "/healthz" => response(StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
        "/stats" => json_response(StatusCode::OK, &json!(state.stats())),
        _ => {
            drop(req);
            let started = Instant::now();
            let outcome = state.answer().await;
            let mut body = state.identity();
            let status = match outcome {
                Outcome::Ok(results) => {
                    body.insert("downstream".into(), downstream_json(results));
                    StatusCode::OK
                }
                Outcome::Injected => {
                    body.insert("downstream".into(), Value::Array(Vec::new()));
                    body.insert(
                        "error".into(),
                        Value::from(format!(
                            "injected error (--error-rate {})",
                            state.error_rate
                        )),
                    );
                    StatusCode::INTERNAL_SERVER_ERROR
                }
                Outcome::DownstreamFailed(results) => {
                    body.insert("downstream".into(), downstream_json(results));
                    body.insert("error".into(), Value::from("a downstream call failed"));
                    StatusCode::BAD_GATEWAY
                }
            };
            state
                .recorder
                .record(started.elapsed(), !status.is_server_error());
            json_response(status, &Value::Object(body))
        }
    })
}

fn json_response(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    let mut text = value.to_string();
    text.push('\n');
    response(status, "application/json", Bytes::from(text))
}

fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

/// The gRPC face of the same app.
struct GrpcDemo {
    state: Arc<AppState>,
}

#[tonic::async_trait]
impl Demo for GrpcDemo {
    async fn hello(
        &self,
        _request: tonic::Request<HelloRequest>,
    ) -> Result<tonic::Response<HelloReply>, tonic::Status> {
        let started = Instant::now();
        let outcome = self.state.answer().await;
        let result = match outcome {
            Outcome::Ok(results) => Ok(tonic::Response::new(HelloReply {
                service: self.state.service.clone(),
                version: self.state.version.clone(),
                instance: self.state.instance.clone(),
                downstream: results
                    .into_iter()
                    .map(|r| match r {
                        Ok(v) => v.to_string(),
                        Err(e) => e,
                    })
                    .collect(),
            })),
            Outcome::Injected => Err(tonic::Status::internal(format!(
                "injected error (--error-rate {})",
                self.state.error_rate
            ))),
            Outcome::DownstreamFailed(results) => {
                let first = results
                    .into_iter()
                    .find_map(Result::err)
                    .unwrap_or_default();
                Err(tonic::Status::unavailable(format!(
                    "a downstream call failed: {first}"
                )))
            }
        };
        self.state
            .recorder
            .record(started.elapsed(), result.is_ok());
        result
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn call_urls_are_checked_and_get_a_trailing_slash() {
        assert_eq!(
            parse_call("http://127.0.0.1:19002").unwrap().to_string(),
            "http://127.0.0.1:19002/"
        );
        assert_eq!(
            parse_call("http://127.0.0.1:19002/api/")
                .unwrap()
                .to_string(),
            "http://127.0.0.1:19002/api/"
        );
        assert!(parse_call("https://x:1").is_err());
        assert!(parse_call("127.0.0.1:1").is_err());
    }
}
