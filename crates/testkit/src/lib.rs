//! Test support for Sinew's integration tests.
//!
//! Every server in this crate is a *real* server listening on a loopback
//! port (`127.0.0.1:0`) inside the test process:
//!
//! - [`http::HttpBackend`]: HTTP/1.1 and h2c (prior knowledge) on one port,
//!   with echo, status, delay, streaming, upload and trailer endpoints.
//! - [`grpc::EchoServer`]: a tonic gRPC echo service (unary, server
//!   streaming, bidirectional streaming, failing call).
//! - [`ws::WsEchoServer`]: a WebSocket echo server.
//! - [`tcp::TcpEchoServer`]: a raw TCP echo server, optionally
//!   server-speaks-first.
//!
//! Readiness guarantee: each `start` function binds its listener before it
//! returns, so the server accepts connections as soon as `start` returns. The
//! server runs in a spawned tokio task; dropping its handle (or calling its
//! `shutdown`) stops it accepting.
//!
//! [`client`] has small hyper clients and [`wait`] a polling helper. With the `kube`
//! feature, `kube::ApiServer` runs a real etcd + kube-apiserver (see that module).

pub mod client;
pub mod grpc;
pub mod http;
#[cfg(feature = "kube")]
pub mod kube;
pub mod tcp;
pub mod wait;
pub mod ws;

mod server;

/// Boxed error used throughout the test kit.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A loopback address whose port is free now and will not be handed out by the
/// kernel to anyone else: ports come from a per-process counter below the kernel's
/// ephemeral range (32768 and up), so they cannot collide with `bind(:0)` or with
/// outgoing connections, and two calls in one process never return the same port.
/// For configuring listeners that a test binds later.
pub fn free_addr() -> std::net::SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Spread concurrent test processes over different stretches of 10000..32000.
    let base = 10_000 + (std::process::id() % 110) * 200;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 10_000 + (base - 10_000 + n) % 22_000;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port as u16));
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
}
