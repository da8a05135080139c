//! Shared plumbing for the loopback servers: binding and the accept loop.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Binds a listener on `127.0.0.1:0` and returns it with its address.
pub(crate) async fn bind() -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// Owns a server's background task; aborting it drops the listener.
#[derive(Debug)]
pub(crate) struct ServerTask {
    handle: Option<JoinHandle<()>>,
}

impl ServerTask {
    /// Spawns `fut` as the server task.
    pub(crate) fn spawn<F>(fut: F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        Self {
            handle: Some(tokio::spawn(fut)),
        }
    }

    /// Aborts the task and waits until it is gone (listener closed).
    pub(crate) async fn stop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
            // The result is a cancellation error (or the task's own end);
            // either way the task no longer runs.
            let _ = handle.await;
        }
    }
}

impl Drop for ServerTask {
    fn drop(&mut self) {
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}

/// Accepts connections forever, running `on_conn` for each in a task owned by
/// this loop: when the loop's task is aborted, its connections are too.
pub(crate) async fn accept_loop<F, Fut>(listener: TcpListener, mut on_conn: F)
where
    F: FnMut(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    // Best effort: lower latency for small test messages.
                    let _ = stream.set_nodelay(true);
                    conns.spawn(on_conn(stream));
                }
                // Transient accept errors (e.g. out of file descriptors):
                // back off briefly instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}
