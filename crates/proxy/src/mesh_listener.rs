//! The inbound mesh listener: where peer sidecars' connections (mesh mTLS) are
//! accepted, and plaintext is refused or served as the inbound's mTLS mode says.
//! The request path goes on in `serve::mesh_tls` and [`crate::inbound`].
//!
//! (Inbound connections redirected by packet-filter rules are accepted in
//! [`crate::capture`].)

use std::sync::Arc;

use tokio::net::TcpStream;

use crate::accept::Acceptor;
use crate::serve::{mesh_tls, serve_http};
use crate::types::ConnCtx;

/// The accept loop of the inbound listener: each connection is served by
/// [`connection`].
pub async fn accept_loop(mut listener: Acceptor) {
    while let Some(conn) = listener.next().await {
        tokio::spawn(conn.serve(connection));
    }
}

/// Mesh TLS (first byte 0x16, the TLS handshake record) or plaintext. With an
/// identity, plaintext is refused in strict mode; TLS must negotiate the mesh ALPN.
pub async fn connection(ctx: Arc<ConnCtx>, stream: TcpStream) {
    let shared = ctx.shared.clone();
    let mut first = [0u8; 1];
    let peeked =
        tokio::time::timeout(shared.settings.header_read_timeout, stream.peek(&mut first)).await;
    if !matches!(peeked, Ok(Ok(1))) {
        return;
    }
    if first[0] == 0x16 {
        // Boxed: the handshake's state is large (about 6 KB) and only needed
        // while it runs; a keep-alive connection's task stays small.
        Box::pin(mesh_tls(ctx, stream)).await;
        return;
    }
    let strict = shared.mtls_enforced()
        && shared
            .snapshot
            .load()
            .as_ref()
            .and_then(|s| s.config.inbound.as_ref().map(|i| i.mtls))
            .is_none_or(|m| m == sinew_model::resource::MtlsMode::Strict);
    if strict {
        shared.metrics.error(
            crate::types::Direction::Inbound,
            crate::error::Reason::PlaintextRefused,
        );
        tracing::debug!(peer = %ctx.peer, "plaintext refused: mTLS is strict");
        return;
    }
    serve_http(ctx, stream).await;
}
