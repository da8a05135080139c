//! A raw TCP echo server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::server::{ServerTask, accept_loop, bind};

/// A TCP echo server on loopback.
///
/// Every byte received is written back. When the client half-closes, the
/// server finishes echoing and half-closes too. With
/// [`start_server_first`](Self::start_server_first) it first writes a banner
/// on accept, like MySQL or SMTP servers do. Dropping it (or calling
/// [`shutdown`](Self::shutdown)) closes the listener and its connections.
#[derive(Debug)]
pub struct TcpEchoServer {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    task: ServerTask,
}

impl TcpEchoServer {
    /// Binds `127.0.0.1:0` and starts echoing; ready when this returns.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_inner(None).await
    }

    /// Like [`start`](Self::start), but writes `banner` to every connection
    /// as soon as it is accepted (server speaks first), then echoes.
    pub async fn start_server_first(banner: &str) -> std::io::Result<Self> {
        Self::start_inner(Some(Arc::from(banner.as_bytes()))).await
    }

    async fn start_inner(banner: Option<Arc<[u8]>>) -> std::io::Result<Self> {
        let (listener, addr) = bind().await?;
        let connections = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&connections);
        let task = ServerTask::spawn(accept_loop(listener, move |stream| {
            counter.fetch_add(1, Ordering::SeqCst);
            echo(stream, banner.clone())
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

    /// Connections accepted so far.
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

async fn echo(mut stream: TcpStream, banner: Option<Arc<[u8]>>) {
    if let Some(banner) = banner
        && stream.write_all(&banner).await.is_err()
    {
        return;
    }
    let (mut read, mut write) = stream.split();
    if tokio::io::copy(&mut read, &mut write).await.is_ok() {
        // Client half-closed: propagate it.
        let _ = write.shutdown().await;
    }
}
