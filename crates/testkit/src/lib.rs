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
//! [`client`] has small hyper clients, [`wait`] a polling helper, [`mesh`] typed
//! builders for the mesh's documents, [`jwt`] signed test tokens, and [`metrics`]
//! samples read from a `/metrics` page. With the `kube`
//! feature, `kube::ApiServer` runs a real etcd + kube-apiserver (see that module).

pub mod client;
pub mod grpc;
pub mod http;
pub mod jwt;
#[cfg(feature = "kube")]
pub mod kube;
pub mod mesh;
pub mod metrics;
pub mod tcp;
pub mod wait;
pub mod ws;

mod server;

/// Boxed error used throughout the test kit.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Sinew's own fixed ports (15001 outbound capture, 15006 inbound capture, 15010
/// control plane, 15053 DNS, and the block around them). Tests run the product with
/// these defaults (an injected sidecar binds 0.0.0.0:15006), so a port handed out to
/// another listener in the same run must never be one of them.
pub const SINEW_PORTS: std::ops::Range<u32> = 15_000..15_100;

/// The `n`th port `free_addr` tries in process `pid`, unless it is one of Sinew's.
fn candidate_port(pid: u32, n: u32) -> Option<u16> {
    // Spread concurrent test processes over different stretches of 10000..32000.
    let base = (pid % 110) * 200;
    let port = 10_000 + (base + n) % 22_000;
    (!SINEW_PORTS.contains(&port)).then_some(port as u16)
}

/// A loopback address whose port is free now and will not be handed out by the
/// kernel to anyone else: ports come from a per-process counter below the kernel's
/// ephemeral range (32768 and up), so they cannot collide with `bind(:0)` or with
/// outgoing connections, and two calls in one process never return the same port.
/// For configuring listeners that a test binds later. Never in `SINEW_PORTS`.
pub fn free_addr() -> std::net::SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let Some(port) = candidate_port(std::process::id(), n) else {
            continue;
        };
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_process_is_handed_sinew_s_own_ports() {
        // A process whose stretch starts at 15000 (pid % 110 == 25) once got 15001
        // and 15006, and an injected sidecar's capture listeners then failed to bind.
        let ports: Vec<u16> = (0..400).filter_map(|n| candidate_port(25, n)).collect();
        assert!(!ports.is_empty());
        for p in [15_001, 15_006, 15_010, 15_053] {
            assert!(!ports.contains(&p), "{p} handed out");
        }
        assert_eq!(ports.first(), Some(&15_100));
        // Every other stretch is as before.
        assert_eq!(candidate_port(0, 0), Some(10_000));
        assert_eq!(
            candidate_port(109, 399),
            Some(10_000 + (21_800 + 399) % 22_000)
        );
    }

    /// `/upload`'s checksum is FNV-1a 64 (published vectors), in any chunking.
    #[test]
    fn upload_checksums_are_fnv1a_64() {
        use crate::http::{FNV_OFFSET, fnv1a64};
        assert_eq!(fnv1a64(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(
            fnv1a64(fnv1a64(FNV_OFFSET, b"foo"), b"bar"),
            0x8594_4171_f739_67e8
        );
    }
}
