//! A small pooled HTTP/1.1 client (hyper-util's legacy client) with a per-request
//! deadline and a bounded body.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Largest response body read (bytes).
const MAX_BODY: usize = 1 << 20;

/// A pooled keep-alive HTTP client.
pub(crate) type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// A new pooled client with a short connect timeout.
pub(crate) fn new_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// A whole response.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

/// `GET uri`, reading the whole response, within `timeout`.
pub(crate) async fn get(
    client: &HttpClient,
    uri: &Uri,
    timeout: Duration,
) -> Result<Fetched, String> {
    let request = Request::get(uri.clone())
        .body(Empty::new())
        .map_err(|e| format!("invalid request: {e}"))?;
    let work = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| describe_client_error(&e))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?
            .to_bytes();
        Ok(Fetched {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(format!("no response within {} ms", timeout.as_millis())),
    }
}

/// The error with its causes, on one line.
fn describe_client_error(e: &hyper_util::client::legacy::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
