//! A gRPC channel to the control plane over TLS: the one way proxies and the CLI
//! reach it.
//!
//! tonic's own TLS would verify the server by its DNS name against fixed roots; the
//! control plane is verified by its SPIFFE id against the mesh roots (or a join
//! token's root hash), so the TLS config is the caller's (see `sinew_tls::api`) and
//! the handshake is done here, under tonic's connect timeout.

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tonic::transport::{Channel, Endpoint, Uri};

/// Why a channel could not be set up.
#[derive(Debug)]
pub struct ConnectError(pub String);

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectError {}

/// The `https://host:port` URL of the control plane as an endpoint; a plain
/// `http://` URL is refused, naming the fix.
pub fn endpoint(url: &str) -> Result<Endpoint, ConnectError> {
    let uri: Uri = url
        .parse()
        .map_err(|e| ConnectError(format!("{url:?} is not a valid control-plane URL: {e}")))?;
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") => {
            return Err(ConnectError(format!(
                "{url}: the control plane serves TLS only; use https://{}",
                uri.authority().map_or("", |a| a.as_str())
            )));
        }
        _ => {
            return Err(ConnectError(format!("{url:?}: expected https://host:port")));
        }
    }
    if uri.host().is_none() {
        return Err(ConnectError(format!("{url:?} has no host")));
    }
    Endpoint::from_shared(url.to_owned())
        .map_err(|e| ConnectError(format!("{url:?} is not a valid control-plane URL: {e}")))
}

/// The server name sent in the handshake (SNI): the URL's host. The server is
/// verified by its SPIFFE id, not by this name.
fn server_name(uri: &Uri) -> Result<ServerName<'static>, std::io::Error> {
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{host:?} is not a host name: {e}"),
        )
    })
}

/// An error with its sources, on one line: for a connection the useful part is in
/// the sources (a refused handshake, an unknown issuer), not in tonic's "transport
/// error".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Connects `endpoint` (from [`endpoint`], tuned by the caller) with `tls`, now.
pub async fn connect(
    endpoint: Endpoint,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    endpoint.connect_with_connector(connector(tls)).await
}

/// Like [`connect`], connecting on first use.
pub fn connect_lazy(endpoint: Endpoint, tls: Arc<rustls::ClientConfig>) -> Channel {
    endpoint.connect_with_connector_lazy(connector(tls))
}

type Io = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

fn connector(
    tls: Arc<rustls::ClientConfig>,
) -> impl tower::Service<
    Uri,
    Response = Io,
    Error = std::io::Error,
    Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Io, std::io::Error>> + Send>,
    >,
> + Clone
+ Send
+ 'static {
    let tls = tokio_rustls::TlsConnector::from(tls);
    tower::service_fn(move |uri: Uri| {
        let tls = tls.clone();
        let fut: std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Io, std::io::Error>> + Send>,
        > = Box::pin(async move {
            let name = server_name(&uri)?;
            let host = uri.host().unwrap_or_default().to_owned();
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            // Pushes and answers are small writes; Nagle would hold them for the
            // peer's delayed ACK.
            tcp.set_nodelay(true)?;
            let stream = tls.connect(name, tcp).await?;
            Ok(TokioIo::new(stream))
        });
        fut
    })
}
