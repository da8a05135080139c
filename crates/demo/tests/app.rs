//! The demo app, served in-process on loopback and driven over HTTP/1.1, h2c and gRPC.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use sinew_api::demo::HelloRequest;
use sinew_api::demo::demo_client::DemoClient;
use sinew_demo::app::{AppArgs, RunningApp, start};
use sinew_demo::stats::Stats;

fn args(service: &str, calls: &[String]) -> AppArgs {
    AppArgs {
        service: service.to_owned(),
        version: "v1".to_owned(),
        instance: Some(format!("{service}-0")),
        http: Some("127.0.0.1:0".parse().unwrap()),
        grpc: Some("127.0.0.1:0".parse().unwrap()),
        calls: calls.to_vec(),
        latency: std::time::Duration::ZERO,
        latency_ms: None,
        jitter: std::time::Duration::ZERO,
        jitter_ms: None,
        error_rate: 0.0,
    }
}

fn base(app: &RunningApp) -> String {
    format!("http://{}", app.http_addr().unwrap())
}

async fn get(url: &str) -> (StatusCode, Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response = client
        .request(Request::get(url).body(Empty::new()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&body)
        .unwrap_or(Value::String(String::from_utf8_lossy(&body).into_owned()));
    (status, value)
}

async fn stats(app: &RunningApp) -> Stats {
    let (status, value) = get(&format!("{}/stats", base(app))).await;
    assert_eq!(status, StatusCode::OK);
    serde_json::from_value(value).unwrap()
}

async fn hello(addr: SocketAddr) -> Result<sinew_api::demo::HelloReply, tonic::Status> {
    let mut client = DemoClient::connect(format!("http://{addr}")).await.unwrap();
    client
        .hello(HelloRequest {
            caller: "test".into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn answers_healthz_root_and_stats() {
    let app = start(&args("ratings", &[])).await.unwrap();

    let (status, body) = get(&format!("{}/healthz", base(&app))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, Value::String("ok\n".into()));

    let (status, body) = get(&format!("{}/anything/at/all", base(&app))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["service"], "ratings");
    assert_eq!(body["version"], "v1");
    assert_eq!(body["instance"], "ratings-0");
    assert_eq!(body["downstream"], Value::Array(vec![]));

    let s = stats(&app).await;
    assert_eq!(
        (s.service.as_str(), s.instance.as_str()),
        ("ratings", "ratings-0")
    );
    // /healthz and /stats are not counted.
    assert_eq!(s.counters.requests, 1);
    assert_eq!(s.counters.errors, 0);
    let buckets = &s.counters.latency_ms_buckets;
    assert_eq!(buckets.counts.len(), buckets.le.len() + 1);
    assert_eq!(buckets.counts.iter().sum::<u64>(), 1);
    assert_eq!(app.stats(), stats(&app).await);
    app.shutdown().await;
}

#[tokio::test]
async fn speaks_h2c_on_the_http_port() {
    let app = start(&args("ratings", &[])).await.unwrap();
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<Bytes>>();
    let response = client
        .request(
            Request::get(format!("{}/", base(&app)))
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    app.shutdown().await;
}

#[tokio::test]
async fn calls_every_downstream_and_reports_their_answers() {
    let ratings = start(&args("ratings", &[])).await.unwrap();
    let mut catalog_args = args("catalog-v2", &[]);
    catalog_args.version = "v2".into();
    let catalog = start(&catalog_args).await.unwrap();
    let reviews = start(&args("reviews", &[base(&ratings)])).await.unwrap();
    let frontend = start(&args(
        "frontend",
        &[format!("{}/", base(&catalog)), base(&reviews)],
    ))
    .await
    .unwrap();

    let (status, body) = get(&format!("{}/", base(&frontend))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["service"], "frontend");
    let downstream = body["downstream"].as_array().unwrap();
    assert_eq!(downstream.len(), 2);
    assert_eq!(downstream[0]["service"], "catalog-v2");
    assert_eq!(downstream[0]["version"], "v2");
    assert_eq!(downstream[1]["service"], "reviews");
    assert_eq!(downstream[1]["downstream"][0]["service"], "ratings");

    // gRPC Hello does the same work and counts in the same stats.
    let reply = hello(frontend.grpc_addr().unwrap()).await.unwrap();
    assert_eq!(
        (
            reply.service.as_str(),
            reply.version.as_str(),
            reply.instance.as_str()
        ),
        ("frontend", "v1", "frontend-0")
    );
    assert_eq!(reply.downstream.len(), 2);
    let first: Value = serde_json::from_str(&reply.downstream[0]).unwrap();
    assert_eq!(first["service"], "catalog-v2");

    for (app, expected) in [(&frontend, 2), (&catalog, 2), (&reviews, 2), (&ratings, 2)] {
        let s = stats(app).await;
        assert_eq!(s.counters.requests, expected, "{}", s.service);
        assert_eq!(s.counters.errors, 0, "{}", s.service);
    }

    // A downstream that is gone: 502 with the reason, counted as an error.
    catalog.shutdown().await;
    let (status, body) = get(&format!("{}/", base(&frontend))).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let downstream = body["downstream"].as_array().unwrap();
    let error = downstream[0].as_str().unwrap();
    assert!(error.starts_with("http://127.0.0.1:"), "{error}");
    assert_eq!(downstream[1]["service"], "reviews");
    let status = hello(frontend.grpc_addr().unwrap()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let s = stats(&frontend).await;
    assert_eq!((s.counters.requests, s.counters.errors), (4, 2));

    for app in [frontend, reviews, ratings] {
        app.shutdown().await;
    }
}

#[tokio::test]
async fn downstream_errors_are_reported_with_status_and_reason() {
    let failing = {
        let mut a = args("broken", &[]);
        a.error_rate = 1.0;
        start(&a).await.unwrap()
    };
    let caller = start(&args("caller", &[base(&failing)])).await.unwrap();
    let (status, body) = get(&format!("{}/", base(&caller))).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let error = body["downstream"][0].as_str().unwrap();
    assert!(error.contains("HTTP 500"), "{error}");
    caller.shutdown().await;
    failing.shutdown().await;
}

#[tokio::test]
async fn error_rate_answers_that_fraction_with_500() {
    let mut a = args("flaky", &[]);
    a.error_rate = 1.0;
    let always = start(&a).await.unwrap();
    let (status, body) = get(&format!("{}/", base(&always))).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        body["error"].as_str().unwrap().contains("injected"),
        "{body}"
    );
    let status = hello(always.grpc_addr().unwrap()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal);
    let s = stats(&always).await;
    assert_eq!((s.counters.requests, s.counters.errors), (2, 2));
    always.shutdown().await;

    a.error_rate = 0.3;
    let sometimes = start(&a).await.unwrap();
    let mut failed = 0;
    for _ in 0..300 {
        let (status, _) = get(&format!("{}/", base(&sometimes))).await;
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            failed += 1;
        } else {
            assert_eq!(status, StatusCode::OK);
        }
    }
    // 300 draws at p = 0.3: mean 90, sd ~8; these bounds are > 5 sd away.
    assert!((45..=135).contains(&failed), "{failed}");
    let s = stats(&sometimes).await;
    assert_eq!((s.counters.requests, s.counters.errors), (300, failed));
    sometimes.shutdown().await;
}

#[tokio::test]
async fn latency_is_added_and_shows_in_the_histogram() {
    let mut a = args("slow", &[]);
    a.latency = std::time::Duration::from_millis(30);
    let app = start(&a).await.unwrap();
    let started = std::time::Instant::now();
    let (status, _) = get(&format!("{}/", base(&app))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(started.elapsed() >= std::time::Duration::from_millis(30));
    let s = stats(&app).await;
    let p50 = s.counters.quantile_ms(0.5).unwrap();
    assert!(p50 > 20.0, "{p50}");
    app.shutdown().await;
}

#[tokio::test]
async fn bad_arguments_are_refused_with_a_reason() {
    let mut a = args("x", &["ftp://nope".to_owned()]);
    let err = start(&a).await.unwrap_err().to_string();
    assert!(err.contains("--call ftp://nope"), "{err}");

    a.calls.clear();
    a.error_rate = 1.5;
    let err = start(&a).await.unwrap_err().to_string();
    assert!(err.contains("--error-rate"), "{err}");

    a.error_rate = 0.0;
    a.http = None;
    a.grpc = None;
    let err = start(&a).await.unwrap_err().to_string();
    assert!(err.contains("--http"), "{err}");
}
