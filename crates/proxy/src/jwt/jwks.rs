//! Key sets kept fresh in the background: key files re-read when they change, `uri`
//! key sets fetched over HTTP or HTTPS every refresh interval. A failed refresh
//! keeps the last good set and is counted.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};

use super::Inner;
use super::keys::{KeySet, parse_jwks};
use crate::http_client;

/// How often key files are checked for changes.
const FILE_POLL: Duration = Duration::from_secs(1);
/// Time allowed for one JWKS fetch (connect, TLS, response, body).
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// First retry delay after a failed fetch; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest retry delay after failed fetches (never longer than the refresh interval).
const MAX_RETRY: Duration = Duration::from_secs(30);

/// What tells a changed file: modification time, size and (on Unix) inode.
pub(super) type FileSig = (Option<SystemTime>, u64, u64);

/// The signature of a file with this metadata.
pub(super) fn file_sig(m: &std::fs::Metadata) -> FileSig {
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(m);
    #[cfg(not(unix))]
    let ino = 0;
    (m.modified().ok(), m.len(), ino)
}

/// Counts a refused key file or JWKS answer.
fn refused(weak: &Weak<Inner>) {
    if let Some(inner) = weak.upgrade() {
        inner.refusals.fetch_add(1, Ordering::Relaxed);
    }
}

fn store(weak: &Weak<Inner>, i: usize, keys: KeySet) -> bool {
    match weak.upgrade() {
        Some(inner) => {
            if let Some(r) = inner.rules.get(i) {
                r.keys.store(Some(Arc::new(keys)));
            }
            true
        }
        None => false,
    }
}

/// Re-reads a key file when its modification time, size or inode changes, and
/// while it has never been loaded.
pub(super) async fn watch_file(
    weak: Weak<Inner>,
    i: usize,
    path: String,
    mut last: Option<FileSig>,
) {
    let mut reported = false;
    loop {
        tokio::time::sleep(FILE_POLL).await;
        let Some(loaded) = weak
            .upgrade()
            .map(|inner| inner.rules.get(i).is_some_and(|r| r.keys.load().is_some()))
        else {
            return;
        };
        let sig = match tokio::fs::metadata(&path).await {
            Ok(m) => file_sig(&m),
            Err(e) => {
                if !reported {
                    tracing::warn!(%path, error = %e, "JWKS file unreadable; keeping the last good keys");
                    reported = true;
                }
                last = None;
                continue;
            }
        };
        if loaded && last == Some(sig) {
            continue;
        }
        last = Some(sig);
        match tokio::fs::read_to_string(&path)
            .await
            .map_err(|e| e.to_string())
            .and_then(|t| parse_jwks(&t))
        {
            Ok(keys) => {
                reported = false;
                tracing::info!(%path, keys = keys.keys.len(), "JWKS file loaded");
                if !store(&weak, i, keys) {
                    return;
                }
            }
            Err(e) => {
                refused(&weak);
                // Once per change; once in all while nothing was ever loaded.
                if loaded || !reported {
                    tracing::warn!(%path, error = %e, "JWKS file refused; keeping the last good keys");
                    reported = true;
                }
            }
        }
    }
}

/// Fetches a key set now and every `refresh`, retrying sooner after a failure.
pub(super) async fn poll_uri(
    weak: Weak<Inner>,
    i: usize,
    uri: http::Uri,
    ca_file: Option<String>,
    refresh: Duration,
) {
    let refresh = refresh.max(Duration::from_secs(1));
    let mut retry = FIRST_RETRY;
    loop {
        if weak.strong_count() == 0 {
            return;
        }
        let res = fetch_jwks(&uri, ca_file.as_deref())
            .await
            .and_then(|t| parse_jwks(&t));
        let wait = match res {
            Ok(keys) => {
                tracing::debug!(uri = %redact(&uri), keys = keys.keys.len(), "JWKS fetched");
                if !store(&weak, i, keys) {
                    return;
                }
                retry = FIRST_RETRY;
                refresh
            }
            Err(e) => {
                refused(&weak);
                tracing::warn!(uri = %redact(&uri), error = %e, retry_in = ?retry, "JWKS fetch failed; keeping the last good keys");
                let w = retry.min(refresh);
                retry = (retry * 2).min(MAX_RETRY);
                w
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// A URL without user info or query, for logs.
fn redact(u: &http::Uri) -> String {
    format!(
        "{}://{}{}",
        u.scheme_str().unwrap_or(""),
        u.host().unwrap_or(""),
        u.port().map(|p| format!(":{p}")).unwrap_or_default()
    ) + u.path()
}

/// GETs a JWKS over HTTP or HTTPS, within [`FETCH_TIMEOUT`].
pub(super) async fn fetch_jwks(uri: &http::Uri, ca_file: Option<&str>) -> Result<String, String> {
    tokio::time::timeout(FETCH_TIMEOUT, fetch(uri, ca_file))
        .await
        .map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))?
}

/// `uri` was parsed when its document was read (the model accepts only https://;
/// plain http:// is here for tests).
async fn fetch(u: &http::Uri, ca_file: Option<&str>) -> Result<String, String> {
    let https = match u.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("the URL must be http:// or https://".into()),
    };
    if u.host().is_none() {
        return Err("the URL has no host".into());
    }
    let roots = if https {
        ca_roots(ca_file).await?
    } else {
        // Never used: the URL is plain HTTP.
        rustls::RootCertStore::empty()
    };
    let tls = http_client::tls_config(roots).map_err(|e| format!("TLS: {e}"))?;
    let client = http_client::client(tls);
    let req = http::Request::get(u.clone())
        .header(
            http::header::ACCEPT,
            "application/json, application/jwk-set+json",
        )
        .header(http::header::USER_AGENT, "sinew-proxy")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| http_client::error_text(&e))?;
    if resp.status() != http::StatusCode::OK {
        return Err(format!("HTTP status {}", resp.status()));
    }
    let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    String::from_utf8(body.to_vec()).map_err(|_| "the body is not UTF-8".to_owned())
}

/// The CAs trusted for a JWKS over HTTPS: `ca_file`, else the system's. Both are read
/// on every fetch, so a renewed bundle counts from the next refresh.
async fn ca_roots(ca_file: Option<&str>) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let certs = match ca_file {
        Some(path) => {
            let pem = tokio::fs::read(path)
                .await
                .map_err(|e| format!("caFile {path}: {e}"))?;
            CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("CA certificates: {e}"))?
        }
        None => http_client::system_roots()
            .await
            .map_err(|e| format!("no caFile given and {e}"))?,
    };
    let mut roots = rustls::RootCertStore::empty();
    // A bundle may hold certificates rustls cannot use; those are skipped.
    roots.add_parsable_certificates(certs);
    if roots.is_empty() {
        return Err("no usable CA certificate".into());
    }
    Ok(roots)
}
