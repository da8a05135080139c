//! Outbound listeners: where a local application's connection is accepted and
//! served. A binding is one service port on a local address (`127.0.0.1:9001 →
//! catalog:http`), HTTP or opaque TCP as the service port is declared; the HTTP
//! forward-proxy port routes by Host, for `HTTP_PROXY`. Each has its accept loop
//! here, beside its connection handler; the request path goes on in
//! `serve::serve_http` and [`crate::outbound`].
//!
//! (Captured outbound connections, redirected by packet-filter rules, are accepted
//! in [`crate::capture`].)

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::accept::Acceptor;
use crate::capture::{Detected, detect};
use crate::outbound;
use crate::serve::serve_http;
use crate::types::ConnCtx;

/// The accept loop of a binding declared HTTP: each connection is detected
/// ([`http_connection`]) and served as HTTP, or as opaque TCP when the client
/// waits for the server to speak first.
pub async fn http_binding(mut listener: Acceptor) {
    while let Some(conn) = listener.next().await {
        tokio::spawn(conn.serve(http_connection));
    }
}

/// The accept loop of a binding declared opaque TCP: each connection is relayed
/// to an endpoint of the service ([`outbound::tcp`]).
pub async fn tcp_binding(mut listener: Acceptor) {
    while let Some(conn) = listener.next().await {
        tokio::spawn(conn.serve(outbound::tcp));
    }
}

/// The accept loop of the HTTP forward-proxy port: each connection is HTTP,
/// routed by each request's Host (or `CONNECT` target).
pub async fn http_proxy(mut listener: Acceptor) {
    while let Some(conn) = listener.next().await {
        tokio::spawn(conn.serve(serve_http::<TcpStream>));
    }
}

/// How long a connection to a binding declared HTTP may stay silent before it is
/// taken for a server-speaks-first protocol (opaque TCP).
pub const BINDING_DETECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A connection to a binding declared HTTP. Detected as capture detects: a client
/// that says nothing within the detection timeout is waiting for a server that
/// speaks first (MySQL, SMTP), so the connection becomes opaque TCP to the service
/// instead of waiting for a request head that never comes. A client that speaks
/// first is served as HTTP, whatever it sends (not HTTP: hyper answers 400).
///
/// The wait is longer than capture's (100 ms): the binding was declared HTTP, so a
/// client that opens its connection a moment before using it (a pool warming up)
/// keeps HTTP routing, retries and policy; a server-speaks-first client gets its
/// greeting after [`BINDING_DETECT_TIMEOUT`] rather than never.
pub async fn http_connection(ctx: Arc<ConnCtx>, stream: TcpStream) {
    match detect(&stream, BINDING_DETECT_TIMEOUT).await {
        Detected::Closed => {}
        Detected::Timeout => {
            ctx.shared.metrics.detect_timeouts.inc();
            // Boxed: the rare path; every HTTP connection's task would otherwise
            // hold room for the TCP relay's state for its whole life.
            Box::pin(outbound::tcp(ctx, stream)).await;
        }
        Detected::Http | Detected::Opaque => {
            serve_http(ctx, stream).await;
        }
    }
}
