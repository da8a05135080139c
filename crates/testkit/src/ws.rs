//! A WebSocket echo server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::server::{ServerTask, accept_loop, bind};

/// A WebSocket echo server on loopback (plain TCP, no TLS).
///
/// It accepts the WebSocket handshake on any path, echoes every text and
/// binary message back unchanged, answers pings, and answers a close frame
/// with a close frame. Dropping it (or calling [`shutdown`](Self::shutdown))
/// closes the listener and its connections.
///
/// Tests connect with `tokio_tungstenite::client_async` over a `TcpStream`
/// they open themselves (directly or through the proxy).
#[derive(Debug)]
pub struct WsEchoServer {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    task: ServerTask,
}

impl WsEchoServer {
    /// Binds `127.0.0.1:0` and starts serving; ready when this returns.
    pub async fn start() -> std::io::Result<Self> {
        let (listener, addr) = bind().await?;
        let connections = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&connections);
        let task = ServerTask::spawn(accept_loop(listener, move |stream| {
            counter.fetch_add(1, Ordering::SeqCst);
            echo(stream)
        }));
        Ok(Self {
            addr,
            connections,
            task,
        })
    }

    /// The address the server listens on.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// TCP connections accepted so far (including failed handshakes).
    #[must_use]
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Stops the server: when this returns the listener is closed and the
    /// accepted connections are dropped.
    pub async fn shutdown(mut self) {
        self.task.stop().await;
    }
}

async fn echo(stream: TcpStream) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    while let Some(msg) = ws.next().await {
        let Ok(msg) = msg else {
            return;
        };
        match msg {
            Message::Text(_) | Message::Binary(_) => {
                if ws.send(msg).await.is_err() {
                    return;
                }
            }
            // tungstenite queues the pong / the close reply itself; the next
            // read flushes it (and then reports the end of the stream).
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => {}
        }
    }
}
