//! Who is calling: the API's TLS listener, and the checks every call makes.
//!
//! The listener accepts TCP, caps what an unauthenticated peer can hold (handshakes
//! in progress, overall and per address; connections per address; a handshake
//! deadline), and hands tonic only finished TLS 1.3 connections, each carrying the
//! verified client certificate, if any, as [`ApiPeer`].
//!
//! Operators ([`operator`]) are known by their certificate's SHA-256, stored with
//! their role when the credential was issued: revoking marks that record, and the
//! role never comes from the certificate, so a credential cannot claim more than it
//! was given. Proxies ([`workload`]) are their certificate's SPIFFE id.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use sinew_tls::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tonic::transport::server::Connected;
use tonic::{Request, Status};

/// Caps on what callers may hold before and after they are authenticated.
#[derive(Debug, Clone)]
pub struct Limits {
    /// TLS handshakes in progress at once (all peers); more wait for a slot until
    /// their deadline. Default 256.
    pub handshakes: usize,
    /// Handshakes in progress from one address; more wait (in their own queue, so
    /// a flood from one address holds no more of the shared slots than this) until
    /// their deadline. Default 64.
    pub handshakes_per_ip: usize,
    /// How long a handshake may take from accept. Default 10 s.
    pub handshake_timeout: Duration,
    /// Open connections from one address; more are closed at once. Default 4,096
    /// (a node's proxies may share one address).
    pub connections_per_ip: usize,
    /// Concurrent HTTP/2 streams per connection. Default 64.
    pub streams_per_connection: u32,
    /// The largest message accepted, bytes. Default 4 MiB.
    pub max_message_bytes: usize,
    /// The migration window from the plaintext API: a connection that does not
    /// start with a TLS handshake is served as plaintext HTTP/2, to proxies of
    /// earlier releases only (their claims unverified, as they were). Off by default.
    pub plaintext_window: bool,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            handshakes: 256,
            handshakes_per_ip: 64,
            handshake_timeout: Duration::from_secs(10),
            connections_per_ip: 4096,
            streams_per_connection: 64,
            max_message_bytes: sinew_api::limits::MAX_MESSAGE_BYTES,
            plaintext_window: false,
        }
    }
}

/// What the API knows of the other end of a connection.
#[derive(Debug, Clone)]
pub struct ApiPeer {
    /// The peer's address.
    pub remote: SocketAddr,
    /// The client certificate it presented (chain verified against the mesh roots,
    /// expiry not yet checked), if any.
    pub cert: Option<Arc<PeerCert>>,
    /// A plaintext connection of the migration window ([`Limits::plaintext_window`]).
    pub plaintext: bool,
}

/// A client certificate, read once when its connection is accepted: every call on
/// the connection decides from these fields without parsing it again.
#[derive(Debug)]
pub struct PeerCert {
    /// Its SPIFFE id, if it has exactly one.
    pub id: Option<SpiffeId>,
    /// SHA-256 of its DER (how operator credentials are recorded).
    pub fingerprint: String,
    /// Its validity, seconds since the epoch (0 when unreadable).
    pub not_before_unix: i64,
    /// Its expiry, seconds since the epoch (0 when unreadable: then expired).
    pub not_after_unix: i64,
}

impl PeerCert {
    fn read(der: &CertificateDer<'_>) -> PeerCert {
        let (not_before_unix, not_after_unix) = x509_parser::parse_x509_certificate(der)
            .map(|(_, c)| {
                let v = c.validity();
                (v.not_before.timestamp(), v.not_after.timestamp())
            })
            .unwrap_or((0, 0));
        PeerCert {
            id: sinew_tls::spiffe_of(der),
            fingerprint: sinew_tls::api::cert_hash(der),
            not_before_unix,
            not_after_unix,
        }
    }
}

/// Counts per address, released when the guard drops.
#[derive(Debug, Default)]
struct PerIp(Mutex<HashMap<IpAddr, usize>>);

struct IpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = t.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            table: self.clone(),
            ip,
        })
    }
}

/// A semaphore per address, dropped from the table when nobody holds or awaits it.
#[derive(Debug, Default)]
struct PerIpQueue(Mutex<HashMap<IpAddr, Arc<Semaphore>>>);

impl PerIpQueue {
    fn of(&self, ip: IpAddr, permits: usize) -> Arc<Semaphore> {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() > 1024 {
            // Only this table holds a reference: no handshake from there is pending.
            t.retain(|_, s| Arc::strong_count(s) > 1);
        }
        t.entry(ip)
            .or_insert_with(|| Arc::new(Semaphore::new(permits)))
            .clone()
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut t = self.table.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = t.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.ip);
            }
        }
    }
}

/// A finished TLS connection, as tonic serves it.
pub struct ApiConn {
    stream: Io,
    peer: ApiPeer,
    _slot: IpSlot,
}

/// TLS, or plaintext in the migration window.
enum Io {
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Plain(TcpStream),
}

impl Connected for ApiConn {
    type ConnectInfo = ApiPeer;

    fn connect_info(&self) -> ApiPeer {
        self.peer.clone()
    }
}

impl AsyncRead for ApiConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.stream {
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ApiConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.stream {
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.stream {
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.stream {
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.stream {
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Io::Tls(s) => s.is_write_vectored(),
            Io::Plain(s) => s.is_write_vectored(),
        }
    }
}

/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Accepts on `listener` and yields finished TLS connections, within `limits`.
/// Handshakes run in tasks of their own, so a slow or silent peer holds only its
/// slot, never the accept loop.
pub fn incoming(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: Limits,
) -> (
    tokio_stream::wrappers::ReceiverStream<Result<ApiConn, std::io::Error>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handshakes = Arc::new(Semaphore::new(limits.handshakes));
    let per_ip = PerIpQueue::default();
    let open = Arc::new(PerIp::default());
    let task = tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: back off a little, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(slot) = open.take(remote.ip(), limits.connections_per_ip) else {
                tracing::debug!(%remote, "refused: too many connections from this address");
                continue;
            };
            let own = per_ip.of(remote.ip(), limits.handshakes_per_ip);
            let _ = tcp.set_nodelay(true);
            let (acceptor, handshakes, tx) = (acceptor.clone(), handshakes.clone(), tx.clone());
            let deadline = limits.handshake_timeout;
            let window = limits.plaintext_window;
            tokio::spawn(async move {
                let done = tokio::time::timeout(deadline, async {
                    // Its address's slot first, then a shared one.
                    let _own = own.acquire().await.ok()?;
                    let _permit = handshakes.acquire().await.ok()?;
                    if window {
                        let mut first = [0u8; 1];
                        let n = tcp.peek(&mut first).await.ok()?;
                        if n == 1 && first[0] != TLS_HANDSHAKE {
                            return Some((Io::Plain(tcp), None));
                        }
                    }
                    let stream = acceptor.accept(tcp).await.ok()?;
                    let cert = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| Arc::new(PeerCert::read(c)));
                    Some((Io::Tls(Box::new(stream)), cert))
                })
                .await;
                drop(own);
                let Ok(Some((stream, cert))) = done else {
                    tracing::debug!(%remote, "TLS handshake failed or timed out");
                    return;
                };
                let plaintext = matches!(stream, Io::Plain(_));
                let conn = ApiConn {
                    stream,
                    peer: ApiPeer {
                        remote,
                        cert,
                        plaintext,
                    },
                    _slot: slot,
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), task)
}

/// The connection's peer, as the listener recorded it.
pub fn peer<T>(req: &Request<T>) -> Option<&ApiPeer> {
    req.extensions().get::<ApiPeer>()
}

/// The caller's verified certificate, or `Unauthenticated` saying what is missing.
fn caller_cert<T>(req: &Request<T>, for_what: &str) -> Result<Arc<PeerCert>, Status> {
    if peer(req).is_some_and(|p| p.plaintext) {
        return Err(Status::unauthenticated(
            "plaintext: the control plane's migration window serves proxies of earlier releases only; use https:// and a credential",
        ));
    }
    let cert = peer(req)
        .and_then(|p| p.cert.clone())
        .ok_or_else(|| Status::unauthenticated(format!("no client certificate: {for_what}")))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if cert.not_after_unix < now {
        let when = u64::try_from(cert.not_after_unix).unwrap_or(0);
        return Err(Status::unauthenticated(format!(
            "the client certificate expired at {} (unix {when})",
            rfc3339(when)
        )));
    }
    Ok(cert)
}

/// An operator's role. Each includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reads configuration, status and traffic summaries.
    Viewer,
    /// Also changes configuration and taps live traffic.
    Operator,
    /// Also issues identity: join tokens, credentials, CA rotation.
    Admin,
}

impl Role {
    /// As written in credentials and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Parses `viewer`, `operator` or `admin`.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// An authenticated operator.
#[derive(Debug, Clone)]
pub struct Operator {
    /// The credential's name.
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// The role and name in an operator credential's id,
/// `spiffe://<trust_domain>/operator/<role>/<name>`.
pub fn operator_id(id: &SpiffeId, trust_domain: &str) -> Option<(Role, String)> {
    if id.trust_domain() != trust_domain {
        return None;
    }
    let rest = id.path().strip_prefix("/operator/")?;
    let (role, name) = rest.split_once('/')?;
    if name.is_empty() || name.contains('/') {
        return None;
    }
    Some((Role::parse(role)?, name.to_owned()))
}

/// The operator calling `what`, if its credential (a client certificate from the
/// mesh CA naming an operator and a role) is unexpired, not revoked, and its role at
/// least `need`; otherwise `Unauthenticated` or `PermissionDenied` with the reason.
pub fn operator<T>(
    req: &Request<T>,
    shared: &dyn crate::shared::SharedState,
    trust_domain: &str,
    need: Role,
    what: &str,
) -> Result<Operator, Status> {
    let cert = caller_cert(
        req,
        "every operator call needs a credential (sinew --credentials FILE, or SINEW_CREDENTIALS)",
    )?;
    let Some((role, name)) = cert.id.as_ref().and_then(|i| operator_id(i, trust_domain)) else {
        let who = cert
            .id
            .as_ref()
            .map(|i| i.to_string())
            .unwrap_or_else(|| "a certificate without a SPIFFE id".into());
        return Err(Status::unauthenticated(format!(
            "{who} is not an operator credential of this control plane"
        )));
    };
    if shared.credential_revoked(&cert.fingerprint, &name, cert.not_before_unix) {
        return Err(Status::unauthenticated(format!(
            "the credential {name:?} was revoked"
        )));
    }
    if role < need {
        return Err(Status::permission_denied(format!(
            "{what} needs the {} role; the credential {name:?} is {}",
            need.as_str(),
            role.as_str()
        )));
    }
    Ok(Operator { name, role })
}

/// The proxy calling: the workload id in its certificate, in `trust_domain`.
pub fn workload<T>(req: &Request<T>, trust_domain: &str) -> Result<SpiffeId, Status> {
    let cert = caller_cert(
        req,
        "a proxy streams with its workload certificate (bootstrap first with a join token)",
    )?;
    let id = cert
        .id
        .clone()
        .ok_or_else(|| Status::unauthenticated("the client certificate has no SPIFFE id"))?;
    if id.workload_parts().is_none() {
        return Err(Status::permission_denied(format!(
            "{id} is not a workload identity"
        )));
    }
    if id.trust_domain() != trust_domain {
        return Err(Status::permission_denied(format!(
            "{id} is not in the trust domain {trust_domain}"
        )));
    }
    Ok(id)
}

/// `unix` seconds as an RFC 3339 UTC time.
pub fn rfc3339(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("unix {unix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_include_the_ones_below() {
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
        assert_eq!(Role::parse("operator"), Some(Role::Operator));
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_428_800), "2026-12-05T00:00:00Z");
    }
}
