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
//! [`client`] has small hyper clients and [`wait`] a polling helper.

pub mod client;
pub mod grpc;
pub mod http;
pub mod tcp;
pub mod wait;
pub mod ws;

mod server;

/// Boxed error used throughout the test kit.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
