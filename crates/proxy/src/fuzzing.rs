//! Entry points for the fuzz targets in `fuzz/`: not an API (hidden from the docs,
//! changed with the targets). Each one drives a private step that reads bytes a peer
//! controls, so the targets exercise the code the proxy runs rather than a copy of it.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// A client that sends `chunks`, one per read, then closes.
struct Chunks(VecDeque<Vec<u8>>);

impl AsyncRead for Chunks {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let chunks = &mut self.get_mut().0;
        // An empty read means the end of the stream: empty chunks are not reads.
        while chunks.front().is_some_and(Vec::is_empty) {
            chunks.pop_front();
        }
        if let Some(front) = chunks.front_mut() {
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front[..n]);
            front.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

/// The inbound listener's protocol detection on a connection whose client sends
/// `chunks` and closes: whether it took the connection for HTTP/2 (prior knowledge),
/// and every byte the HTTP server then reads through the stream that replays the
/// bytes read ahead, `read_size` bytes at a time at most. `None`: the client sent
/// nothing and the connection is dropped.
pub async fn sniff_inbound(chunks: Vec<Vec<u8>>, read_size: usize) -> Option<(bool, Vec<u8>)> {
    let mut stream = Chunks(chunks.into());
    let (prefix, h2) = crate::serve::http_version(&mut stream, Duration::from_secs(5)).await?;
    let mut replay = crate::serve::Prefixed::new(prefix, stream);
    let mut out = Vec::new();
    let mut buf = vec![0u8; read_size.max(1)];
    loop {
        match replay.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    Some((h2, out))
}
