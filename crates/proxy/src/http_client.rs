//! The proxy's own outgoing HTTP(S) requests (JWKS fetches): hyper-util's legacy
//! client over hyper-rustls (ring, as everywhere else), with TLS settings from the
//! caller, and errors told as one line.

use std::error::Error as StdError;
use std::sync::Arc;

use http_body::Body;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;

/// A client for `http://` and `https://` URLs.
pub(crate) type Client<B> = hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, B>;

/// A client speaking HTTP/1.1 that trusts, over HTTPS, what `tls` trusts. No idle
/// connection is kept: each request opens one, closed after its response (requests
/// are minutes apart, and a rebuilt client picks up renewed CA certificates).
/// Redirects are not followed: a 3xx is the answer.
pub(crate) fn client<B>(tls: Arc<rustls::ClientConfig>) -> Client<B>
where
    B: Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let mut http = HttpConnector::new();
    // `https://` URLs reach the TLS layer through this connector.
    http.enforce_http(false);
    // From a pair, not the builder: the builder refuses preset ALPN and, for HTTP/1
    // only, offers none; `tls` offers http/1.1 (see `tls_config`).
    let https = HttpsConnector::from((http, tls));
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(https)
}

/// TLS client settings trusting `roots`: ring, the safe default protocol versions,
/// no client certificate, ALPN `http/1.1` (the only protocol [`client`] speaks).
pub(crate) fn tls_config(
    roots: rustls::RootCertStore,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The system's CA certificates, found by rustls-native-certs: `SSL_CERT_FILE` /
/// `SSL_CERT_DIR` when set, else the platform's bundle and certificate directory.
/// `Err` when none was found (saying why, when something could not be read).
pub(crate) async fn system_roots() -> Result<Vec<CertificateDer<'static>>, String> {
    // Blocking file reads: a bundle of some hundred certificates, or a directory.
    let found = tokio::task::spawn_blocking(rustls_native_certs::load_native_certs)
        .await
        .map_err(|e| format!("loading the system CA certificates: {e}"))?;
    if found.certs.is_empty() {
        let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        return Err(if errors.is_empty() {
            "no system CA bundle found".to_owned()
        } else {
            format!("no system CA bundle found ({})", errors.join("; "))
        });
    }
    if !found.errors.is_empty() {
        tracing::debug!(errors = ?found.errors, "some system CA certificates unreadable");
    }
    Ok(found.certs)
}

/// A failed request as one line: `connect: ...` (DNS, TCP), `TLS: ...` (handshake,
/// certificate) or `HTTP: ...` (the exchange), each with its causes.
pub(crate) fn error_text(e: &hyper_util::client::legacy::Error) -> String {
    let Some(source) = e.source() else {
        return format!("HTTP: {e}");
    };
    if !e.is_connect() {
        return format!("HTTP: {}", chain(source));
    }
    match tls_error(source) {
        Some(t) => format!("TLS: {t}"),
        None => format!("connect: {}", chain(source)),
    }
}

/// The rustls error among `e` and its sources. A failed handshake arrives as an
/// io::Error (hyper-rustls) holding an io::Error (tokio-rustls) holding it, and an
/// io::Error's `source` skips what it holds: those are opened with `get_ref`.
fn tls_error<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(t) = e.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        next = match e.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as &(dyn StdError + 'static)),
            None => e.source(),
        };
    }
    None
}

/// An error and its sources, joined with `: `.
fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        text.push_str(": ");
        text.push_str(&s.to_string());
        next = s.source();
    }
    text
}
