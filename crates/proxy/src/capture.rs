//! Transparent capture: connections redirected to the proxy by packet-filter rules
//! (`sinew init`), routed by their original destination (`SO_ORIGINAL_DST`).
//!
//! Outbound: a service's virtual IP (on Kubernetes, a ClusterIP) or a workload's
//! address:port names a mesh service; its traffic is then detected (HTTP, else opaque
//! TCP) and goes the usual way (routes, balancing, mTLS to the peer sidecar), except
//! that a connection to a workload's own address (a headless Service's pod) goes to
//! that workload only. Anything else passes through
//! as plain TCP, or is refused when `MeshConfig.spec.outboundTrafficPolicy` is
//! `REGISTRY_ONLY`. Detection is bounded by bytes and time: a client that sends
//! nothing (the server speaks first: MySQL, SMTP, Redis-style greetings) is treated
//! as opaque TCP after the detection timeout, and declared opaque ports skip it.
//!
//! Inbound: mesh mTLS is terminated as on the inbound listener. Plaintext is
//! refused under `STRICT` (always: also before the proxy has its identity) and,
//! under `PERMISSIVE`, held to the same rules as mesh traffic: only to a declared
//! application port (the inbound's `ports`, at its `appAddress`), never to another
//! port or a loopback-only service; HTTP (detected as outbound detects it) goes
//! through the inbound's request path (authorization for an unauthenticated caller,
//! `sinew-peer-identity` removed), anything else through its L4 authorization.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use sinew_model::resource::{EgressMode, MtlsMode};
use tokio::net::TcpStream;

use crate::accept::Acceptor;
use crate::error::Reason;
use crate::serve::{mesh_tls, serve_http};
use crate::stream::spawn_splice;
use crate::types::ConnCtx;
use crate::types::Direction;

/// The addresses a capture listener binds: loopback for outbound (the OUTPUT
/// chain's REDIRECT sends there), every address for inbound (PREROUTING's REDIRECT
/// sends to the receiving interface's address). One listener per address family,
/// since the original destination is read per family.
pub fn listen_addrs(port: u16, outbound: bool) -> [SocketAddr; 2] {
    if outbound {
        [
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
        ]
    } else {
        [
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
        ]
    }
}

/// Where a redirected connection was going: `SO_ORIGINAL_DST` (IPv4) or
/// `IP6T_SO_ORIGINAL_DST` (IPv6), chosen by the accepted socket's family.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let local = stream.local_addr()?;
    let addr = match local {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some() => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "the original destination is not an IP address",
        )
    })
}

/// What the client's first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// An HTTP/1 request line or the HTTP/2 preface.
    Http,
    /// Something else: opaque TCP.
    Opaque,
    /// Nothing within the timeout: opaque TCP (the server may speak first).
    Timeout,
    /// The client closed (or failed) before sending anything.
    Closed,
}

/// The HTTP/2 preface's request line: enough to tell HTTP/2.
const H2_PREFACE: &[u8] = crate::serve::H2_PREFACE.split_at(16).0;
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

/// Classifies a prefix of the client's bytes: `Some` once it is decided, `None`
/// while it could still be either.
pub fn classify(bytes: &[u8]) -> Option<Detected> {
    let mut undecided = false;
    for sig in METHODS.iter().copied().chain([H2_PREFACE]) {
        let n = bytes.len().min(sig.len());
        if bytes[..n] == sig[..n] {
            if n == sig.len() {
                return Some(Detected::Http);
            }
            undecided = true;
        }
    }
    (!undecided).then_some(Detected::Opaque)
}

/// Peeks at the client's first bytes (at most the HTTP/2 preface's length) for up
/// to `timeout`, without consuming them.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> Detected {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut seen = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Err(_) => {
                return if seen == 0 {
                    Detected::Timeout
                } else {
                    Detected::Opaque
                };
            }
            Ok(Err(_)) | Ok(Ok(0)) => return Detected::Closed,
            Ok(Ok(n)) => n,
        };
        if let Some(d) = classify(&buf[..n]) {
            return d;
        }
        if n == buf.len() {
            return Detected::Opaque;
        }
        // A partial prefix: peek returns at once while those bytes wait, so give
        // the client a moment to send more (rare: request lines come whole).
        seen = n;
        if tokio::time::Instant::now() >= deadline {
            return Detected::Opaque;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// True when `dst` is the capture listener itself (a client connected to it
/// directly, or a redirect loop): such a connection is never forwarded.
fn is_self(dst: SocketAddr, local: SocketAddr, listener_port: u16) -> bool {
    dst == local
        || (dst.port() == listener_port
            && (dst.ip().is_loopback() || dst.ip().is_unspecified() || dst.ip() == local.ip()))
}

fn with_dst(ctx: &Arc<ConnCtx>, dst: SocketAddr) -> Arc<ConnCtx> {
    Arc::new(ConnCtx {
        orig_dst: Some(dst),
        ..ConnCtx::new(ctx.shared.clone(), ctx.role, ctx.bind, ctx.peer)
    })
}

/// The context of captured plaintext to the application's `port`: no identity, and
/// its requests pinned to that port.
fn plaintext(ctx: &Arc<ConnCtx>, dst: SocketAddr) -> Arc<ConnCtx> {
    Arc::new(ConnCtx {
        orig_dst: Some(dst),
        plaintext_port: Some(dst.port()),
        ..ConnCtx::new(ctx.shared.clone(), ctx.role, ctx.bind, ctx.peer)
    })
}

/// The accept loop of an outbound capture listener: each connection the
/// application opened, redirected by the OUTPUT chain, is served by [`outbound`].
pub async fn accept_outbound(mut listener: Acceptor) {
    while let Some(conn) = listener.next().await {
        tokio::spawn(conn.serve(outbound));
    }
}

/// The accept loop of an inbound capture listener: each connection redirected by
/// the PREROUTING chain is served by [`inbound`].
pub async fn accept_inbound(mut listener: Acceptor) {
    while let Some(conn) = listener.next().await {
        tokio::spawn(conn.serve(inbound));
    }
}

/// A connection the application opened, redirected by the OUTPUT chain.
pub async fn outbound(ctx: Arc<ConnCtx>, stream: TcpStream) {
    let shared = &ctx.shared;
    let dst = match original_dst(&stream) {
        Ok(d) => d,
        Err(e) => {
            shared.metrics.captured(Direction::Outbound, "refused");
            tracing::warn!(peer = %ctx.peer, error = %e, "captured connection without an original destination");
            return;
        }
    };
    let local = stream.local_addr().unwrap_or(ctx.bind);
    if is_self(dst, local, ctx.bind.port()) {
        shared.metrics.captured(Direction::Outbound, "refused");
        tracing::warn!(peer = %ctx.peer, %dst, "connection to the capture listener itself refused");
        return;
    }
    let Some(snap) = shared.snapshot.load_full() else {
        return;
    };
    let Some(capture) = snap.config.capture.as_ref() else {
        return;
    };
    let Some((key, port)) = snap.captured(dst) else {
        if snap.config.egress == EgressMode::RegistryOnly {
            shared.metrics.captured(Direction::Outbound, "refused");
            shared
                .metrics
                .error(Direction::Outbound, Reason::EgressRefused);
            tracing::debug!(%dst, "refused: not a mesh destination and egress is REGISTRY_ONLY");
            return;
        }
        let connect_timeout = shared.settings.connect_timeout;
        drop(snap);
        passthrough(&ctx, stream, dst, connect_timeout).await;
        return;
    };
    let protocol = snap
        .config
        .service(key)
        .and_then(|s| s.port(port))
        .map(|p| p.protocol);
    let opaque = capture.opaque_ports.contains(&dst.port())
        || capture.opaque_ports.contains(&port)
        || protocol.is_none_or(|p| !p.is_http());
    let kind = if opaque {
        Detected::Opaque
    } else {
        let d = detect(&stream, capture.detect_timeout).await;
        if d == Detected::Timeout {
            shared.metrics.detect_timeouts.inc();
        }
        d
    };
    match kind {
        Detected::Closed => {}
        Detected::Http => {
            shared.metrics.captured(Direction::Outbound, "http");
            drop(snap);
            serve_http(with_dst(&ctx, dst), stream).await;
        }
        Detected::Opaque | Detected::Timeout => {
            let Some(balancer) = snap.balancer(key, port).cloned() else {
                return;
            };
            let ctx = with_dst(&ctx, dst);
            let pinned = crate::outbound::pinned_endpoint(&ctx, &snap, &balancer);
            let service = key.to_owned();
            drop(snap);
            shared.metrics.captured(Direction::Outbound, "tcp");
            // To a workload's own address: that workload, nowhere else. Otherwise
            // an endpoint that cannot be reached is reported to outlier detection
            // and another one is tried.
            if let Err(e) = crate::outbound::tcp_to(&ctx, stream, &balancer, &service, pinned).await
            {
                tracing::debug!(error = %e, "captured TCP: no endpoint reached");
            }
        }
    }
}

/// Plain TCP to a destination outside the mesh. The proxy's own connections are
/// exempt from capture (by uid), so this does not come back.
async fn passthrough(ctx: &ConnCtx, stream: TcpStream, dst: SocketAddr, timeout: Duration) {
    match tokio::time::timeout(timeout, TcpStream::connect(dst)).await {
        Ok(Ok(up)) => {
            let _ = up.set_nodelay(true);
            ctx.shared
                .metrics
                .captured(Direction::Outbound, "passthrough");
            spawn_splice(&ctx.shared, stream, up);
        }
        Ok(Err(e)) => {
            ctx.shared
                .metrics
                .error(Direction::Outbound, Reason::PassthroughFailed);
            tracing::debug!(%dst, error = %e, "passthrough connection failed");
        }
        Err(_) => {
            ctx.shared
                .metrics
                .error(Direction::Outbound, Reason::PassthroughFailed);
            tracing::debug!(%dst, "passthrough connection timed out");
        }
    }
}

/// A connection to this workload, redirected by the PREROUTING chain.
pub async fn inbound(ctx: Arc<ConnCtx>, stream: TcpStream) {
    let shared = ctx.shared.clone();
    let local = stream.local_addr().unwrap_or(ctx.bind);
    // Without conntrack state (a connection made to the port directly) the local
    // address is where it was going.
    let dst = original_dst(&stream).unwrap_or(local);
    let Some(snap) = shared.snapshot.load_full() else {
        return;
    };
    let (timeout, opaque_port) = snap
        .config
        .capture
        .as_ref()
        .map_or((sinew_model::compile::DEFAULT_DETECT_TIMEOUT, false), |c| {
            (c.detect_timeout, c.opaque_ports.contains(&dst.port()))
        });
    let started = tokio::time::Instant::now();
    // Mesh clients always speak first (a TLS ClientHello); a client that says
    // nothing is waiting for a server that speaks first.
    let mut first = [0u8; 1];
    let tls = match tokio::time::timeout(timeout, stream.peek(&mut first)).await {
        Ok(Ok(1)) => Some(first[0] == 0x16),
        Ok(_) => return,
        Err(_) => {
            shared.metrics.detect_timeouts.inc();
            None
        }
    };
    if tls == Some(true) {
        shared.metrics.captured(Direction::Inbound, "mtls");
        drop(snap);
        // Boxed, as on the inbound listener (`mesh_listener::connection`).
        Box::pin(mesh_tls(with_dst(&ctx, dst), stream)).await;
        return;
    }
    // Plaintext: only under PERMISSIVE, and only to a declared port. STRICT refuses
    // it whether or not the proxy has an identity yet: a sidecar waiting for its
    // certificate must not serve unauthenticated callers meanwhile.
    let refusal = match snap.config.inbound.as_ref() {
        _ if is_self(dst, local, ctx.bind.port()) => Some(Reason::PlaintextRefused),
        Some(inb) if inb.mtls == MtlsMode::Permissive => {
            (!inb.ports.contains(&dst.port())).then_some(Reason::PortNotAllowed)
        }
        _ => Some(Reason::PlaintextRefused),
    };
    drop(snap);
    if let Some(reason) = refusal {
        shared.metrics.captured(Direction::Inbound, "refused");
        shared.metrics.error(Direction::Inbound, reason);
        tracing::debug!(peer = %ctx.peer, %dst, %reason, "captured plaintext refused");
        return;
    }
    shared.metrics.captured(Direction::Inbound, "plaintext");
    let kind = match tls {
        None => Detected::Timeout,
        Some(_) if opaque_port => Detected::Opaque,
        Some(_) => detect(&stream, timeout.saturating_sub(started.elapsed())).await,
    };
    match kind {
        Detected::Closed => {}
        Detected::Http => serve_http(plaintext(&ctx, dst), stream).await,
        Detected::Opaque | Detected::Timeout => {
            crate::inbound::plaintext_tcp(&plaintext(&ctx, dst), stream).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_decides_on_few_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http));
        assert_eq!(classify(b"POST "), Some(Detected::Http));
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http));
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Some(Detected::Opaque));
        assert_eq!(classify(b"\x16\x03\x01"), Some(Detected::Opaque));
        assert_eq!(classify(b"GETX"), Some(Detected::Opaque));
    }

    #[test]
    fn the_listener_itself_is_never_a_destination() {
        let local: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        assert!(is_self(local, local, 15001));
        let other: SocketAddr = "127.0.0.5:15001".parse().unwrap();
        assert!(is_self(other, local, 15001));
        let remote: SocketAddr = "10.0.0.2:15001".parse().unwrap();
        assert!(!is_self(remote, local, 15001));
    }

    /// A client that sends nothing is not waited on past the timeout; one that
    /// sends an HTTP request line is recognised at once.
    #[tokio::test]
    async fn detection_is_bounded_by_time() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _silent = TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert_eq!(
            detect(&s, Duration::from_millis(50)).await,
            Detected::Timeout
        );
        let mut talker = TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut talker, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert_eq!(detect(&s, Duration::from_secs(30)).await, Detected::Http);
    }
}
