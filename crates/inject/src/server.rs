//! The admission webhook's HTTPS server.
//!
//! - `POST /mutate`: AdmissionReview v1 in, AdmissionReview with a JSON Patch out.
//! - `GET /healthz`: `ok` (the Deployment's probes).
//!
//! The serving certificate comes from PEM files (the Secret `sinew install` writes,
//! mounted into the pod) and is re-read when the files change, so a renewed Secret
//! needs no restart; or from PEM text (tests, `--self-signed`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::InjectConfig;
use crate::review::{Decision, review};

/// The largest AdmissionReview read (a Pod is at most 1.5 MiB in etcd; the review
/// carries it once, and its old version on updates).
const MAX_BODY: usize = 4 << 20;
/// How often certificate files are checked for changes, by default.
pub const CERT_CHECK: Duration = Duration::from_secs(10);

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// PEM files, re-read when they change.
    Files {
        /// The certificate chain.
        cert: PathBuf,
        /// The private key.
        key: PathBuf,
    },
    /// PEM text.
    Pem {
        /// The certificate chain.
        cert: String,
        /// The private key.
        key: String,
    },
}

/// How to run the webhook.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    /// The HTTPS listener.
    pub listen: SocketAddr,
    /// The serving certificate.
    pub cert: CertSource,
    /// What to inject.
    pub config: InjectConfig,
    /// How often certificate files are checked for changes ([`CERT_CHECK`]).
    pub cert_check: Duration,
}

/// A running webhook.
pub struct Webhook {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn certified_key(cert_pem: &[u8], key_pem: &[u8], what: &str) -> Result<CertifiedKey, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what}: certificate: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what}: no certificate in the PEM"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("{what}: key: {e}"))?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(certs, key, &provider).map_err(|e| format!("{what}: {e}"))
}

fn read_files(cert: &PathBuf, key: &PathBuf) -> Result<CertifiedKey, String> {
    let c = std::fs::read(cert).map_err(|e| format!("{}: cannot read: {e}", cert.display()))?;
    let k = std::fs::read(key).map_err(|e| format!("{}: cannot read: {e}", key.display()))?;
    certified_key(&c, &k, &cert.display().to_string())
}

fn modified(paths: &[&PathBuf]) -> Vec<Option<SystemTime>> {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// Serves whichever certificate is current.
#[derive(Debug)]
struct Current(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

impl Webhook {
    /// Binds the listener and starts serving; returns once it accepts connections.
    pub async fn start(opts: WebhookOptions) -> Result<Webhook, String> {
        opts.config
            .validate()
            .map_err(|e| format!("injection settings: {e}"))?;
        let first = match &opts.cert {
            CertSource::Files { cert, key } => read_files(cert, key)?,
            CertSource::Pem { cert, key } => {
                certified_key(cert.as_bytes(), key.as_bytes(), "webhook certificate")?
            }
        };
        let current = Arc::new(Current(ArcSwap::from_pointee(first)));
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(current.clone());
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind(opts.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", opts.listen))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("listener address: {e}"))?;
        let (stop, mut stopped) = watch::channel(false);
        let config = Arc::new(opts.config);
        let cert_check = opts.cert_check.max(Duration::from_millis(10));
        let files = match opts.cert {
            CertSource::Files { cert, key } => Some((cert, key)),
            CertSource::Pem { .. } => None,
        };
        let task = tokio::spawn(async move {
            let mut check = tokio::time::interval(cert_check);
            let mut seen = files.as_ref().map(|(c, k)| modified(&[c, k]));
            loop {
                tokio::select! {
                    _ = stopped.changed() => return,
                    _ = check.tick(), if files.is_some() => {
                        if let Some((c, k)) = &files {
                            let now = Some(modified(&[c, k]));
                            if now != seen {
                                match read_files(c, k) {
                                    Ok(ck) => {
                                        current.0.store(Arc::new(ck));
                                        tracing::info!(cert = %c.display(), "webhook certificate reloaded");
                                        seen = now;
                                    }
                                    // Half-written files (a Secret being updated): keep
                                    // the old certificate and try again next time.
                                    Err(e) => tracing::warn!("webhook certificate not reloaded: {e}"),
                                }
                            }
                        }
                    }
                    accepted = listener.accept() => {
                        let Ok((tcp, peer)) = accepted else { continue };
                        let acceptor = acceptor.clone();
                        let config = config.clone();
                        tokio::spawn(async move {
                            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, "webhook TLS handshake failed: {e}");
                                    return;
                                }
                                Err(_) => return,
                            };
                            let svc = service_fn(move |req| handle(req, config.clone()));
                            let mut http = hyper::server::conn::http1::Builder::new();
                            http.timer(TokioTimer::new())
                                .header_read_timeout(Duration::from_secs(10));
                            if let Err(e) = http.serve_connection(TokioIo::new(tls), svc).await {
                                tracing::debug!(%peer, "webhook connection: {e}");
                            }
                        });
                    }
                }
            }
        });
        tracing::info!(%addr, "admission webhook listening");
        Ok(Webhook { addr, stop, task })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting connections.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

async fn handle(
    req: Request<Incoming>,
    config: Arc<InjectConfig>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::POST, "/mutate") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return Ok(text(
                        StatusCode::BAD_REQUEST,
                        format!("cannot read the request body (at most {MAX_BODY} bytes): {e}\n"),
                    ));
                }
            };
            match review(&body, &config) {
                Ok((out, decision)) => {
                    match &decision {
                        Decision::Injected(n) => tracing::info!(ops = n, "pod injected"),
                        Decision::Skipped(why) => tracing::info!("pod not injected: {why}"),
                        Decision::Refused(why) => tracing::warn!("pod refused: {why}"),
                        Decision::NotForUs => tracing::debug!("not a pod creation: allowed"),
                    }
                    let mut r = text(StatusCode::OK, out);
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    r
                }
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        (_, "/healthz" | "/mutate") => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    })
}
