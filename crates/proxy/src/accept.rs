//! Accepting connections without letting a flood take the proxy down: accept
//! errors back off (out of descriptors, `EMFILE`/`ENFILE`, is answered by waiting,
//! not by spinning) with rate-limited logging, and listeners cap their connections.
//!
//! The small parts every listener kind's accept loop shares: [`Acceptor`] (accept
//! with backoff, the connection cap, stop and drain) and [`Accepted`]. The loops
//! themselves live next to their kind's handler (see [`crate::listeners`]).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::drain;
use crate::state::Shared;
use crate::types::{ConnCtx, Role};

/// The longest pause after repeated accept failures.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// At most one log line per listener in this period; the rest are counted in it.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// One listener's accept errors: how long to pause next, and when it last logged.
#[derive(Debug)]
pub struct AcceptErrors {
    what: &'static str,
    bind: SocketAddr,
    backoff: Duration,
    last_log: Option<Instant>,
    suppressed: u64,
}

impl AcceptErrors {
    /// For the listener `what` on `bind`.
    pub fn new(what: &'static str, bind: SocketAddr) -> AcceptErrors {
        AcceptErrors {
            what,
            bind,
            backoff: Duration::ZERO,
            last_log: None,
            suppressed: 0,
        }
    }

    /// An accept succeeded: the next failure starts small again.
    pub fn ok(&mut self) {
        self.backoff = Duration::ZERO;
    }

    /// An accept failed: logs (rate-limited) and pauses. Out of descriptors or
    /// memory, the pause doubles up to [`MAX_BACKOFF`] (connections must close
    /// before another accept can succeed); other errors (a client that reset
    /// before its accept) are the client's and cost no pause.
    pub async fn failed(&mut self, e: &std::io::Error) {
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
        {
            tracing::warn!(
                listener = self.what,
                bind = %self.bind,
                error = %e,
                suppressed = self.suppressed,
                "accept failed (logged at most every {LOG_EVERY:?})"
            );
            self.last_log = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
        if resource_exhausted(e) {
            self.backoff = (self.backoff * 2)
                .max(Duration::from_millis(5))
                .min(MAX_BACKOFF);
            tokio::time::sleep(self.backoff).await;
        }
    }
}

/// Out of descriptors (process or system), buffers or memory.
fn resource_exhausted(e: &std::io::Error) -> bool {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    const ENOBUFS: i32 = 105;
    const ENOMEM: i32 = 12;
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE | ENOBUFS | ENOMEM))
}

/// Accepts the next connection, pausing on errors as [`AcceptErrors`] says.
pub async fn next(listener: &TcpListener, errors: &mut AcceptErrors) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(c) => {
                errors.ok();
                return c;
            }
            Err(e) => errors.failed(&e).await,
        }
    }
}

/// A data-plane listener's accept side: its socket, its connection cap, its stop
/// signal (the listener was removed from the configuration) and the drain.
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    bind: SocketAddr,
    role: Role,
    shared: std::sync::Arc<Shared>,
    errors: AcceptErrors,
    /// The listener's connection cap: at it, accepting waits for a connection to
    /// close (new clients wait in the kernel's backlog), so a flood on one listener
    /// cannot take every descriptor the proxy has.
    cap: std::sync::Arc<Semaphore>,
    stop: oneshot::Receiver<()>,
}

/// An accepted connection: its context, its stream, and what it holds until it
/// ends (a slot of its listener's cap, the drain's guard).
#[derive(Debug)]
pub struct Accepted {
    /// The connection's context (role, listener, peer).
    pub ctx: std::sync::Arc<ConnCtx>,
    /// The client's stream.
    pub stream: TcpStream,
    held: (OwnedSemaphorePermit, drain::Guard),
}

impl Acceptor {
    /// Takes over the bound `std` listener (configured as `bind`) on the current
    /// runtime; `None` (logged) when it cannot be registered.
    pub fn start(
        std: std::net::TcpListener,
        bind: SocketAddr,
        role: Role,
        shared: &std::sync::Arc<Shared>,
        stop: oneshot::Receiver<()>,
    ) -> Option<Acceptor> {
        let listener = match TcpListener::from_std(std) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(%bind, error = %e, "listener could not start");
                return None;
            }
        };
        tracing::info!(%bind, role = role.label(), "listening");
        Some(Acceptor {
            listener,
            bind,
            role,
            shared: shared.clone(),
            errors: AcceptErrors::new(role.label(), bind),
            cap: std::sync::Arc::new(Semaphore::new(shared.settings.max_connections)),
            stop,
        })
    }

    /// The next connection, once the cap has room; `None` once the listener is
    /// removed or the proxy drains: the accept loop then ends (and the socket
    /// closes with it).
    pub async fn next(&mut self) -> Option<Accepted> {
        let drain = &self.shared.drain;
        let permit = tokio::select! {
            _ = &mut self.stop => return None,
            _ = drain.draining() => return None,
            p = self.cap.clone().acquire_owned() => p.ok()?,
        };
        let (stream, peer) = tokio::select! {
            _ = &mut self.stop => return None,
            _ = drain.draining() => return None,
            c = next(&self.listener, &mut self.errors) => c,
        };
        let guard = drain.guard()?;
        let _ = stream.set_nodelay(true);
        let ctx = std::sync::Arc::new(ConnCtx::new(
            self.shared.clone(),
            self.role,
            self.bind,
            peer,
        ));
        Some(Accepted {
            ctx,
            stream,
            held: (permit, guard),
        })
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        tracing::info!(bind = %self.bind, "stopped listening");
    }
}

impl Accepted {
    /// The connection's task: `handler` from accept to close, counted in its
    /// listener's open connections, holding its cap slot and drain guard until
    /// it ends.
    pub async fn serve<F, Fut>(self, handler: F)
    where
        F: FnOnce(std::sync::Arc<ConnCtx>, TcpStream) -> Fut,
        Fut: Future<Output = ()>,
    {
        let Accepted { ctx, stream, held } = self;
        let _open = ctx.shared.metrics.connection(ctx.role.label());
        handler(ctx, stream).await;
        drop(held);
    }
}

/// Connections of a listener that may be closed to make room: those that have not
/// sent a request yet. At its cap, a listener closes the oldest of them for a new
/// connection, so idle or slow clients (however many) can never keep a prober out.
#[derive(Debug)]
pub struct Evictable {
    cap: usize,
    open: AtomicU64,
    next_id: AtomicU64,
    waiting: Mutex<VecDeque<(u64, tokio::sync::oneshot::Sender<()>)>>,
}

/// A connection counted by [`Evictable`]: open until dropped.
#[derive(Debug)]
pub struct Slot {
    owner: std::sync::Arc<Evictable>,
    id: u64,
}

/// Fires when a connection is evicted.
pub type Evicted = tokio::sync::oneshot::Receiver<()>;

impl Evictable {
    /// At most `cap` connections open at once.
    pub fn new(cap: usize) -> Evictable {
        Evictable {
            cap: cap.max(1),
            open: AtomicU64::new(0),
            next_id: AtomicU64::new(0),
            waiting: Mutex::new(VecDeque::new()),
        }
    }

    /// Counts a new connection, evicting the oldest one still waiting for its first
    /// request when at the cap. `None`: at the cap with nothing to evict (every
    /// connection is busy): close the new one.
    pub fn admit(self: &std::sync::Arc<Self>) -> Option<(Slot, Evicted)> {
        let open = self.open.fetch_add(1, Ordering::AcqRel) as usize;
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if open >= self.cap {
            match waiting.pop_front() {
                // Its slot is given back when its task sees the signal and ends.
                Some((_, evict)) => {
                    let _ = evict.send(());
                }
                None => {
                    drop(waiting);
                    self.open.fetch_sub(1, Ordering::AcqRel);
                    return None;
                }
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        waiting.push_back((id, tx));
        Some((
            Slot {
                owner: self.clone(),
                id,
            },
            rx,
        ))
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire) as usize
    }
}

impl Slot {
    /// The connection sent a request: it is no longer evictable.
    pub fn busy(&self) {
        let mut waiting = self.owner.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting.retain(|(id, _)| *id != self.id);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.busy();
        self.owner.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn at_the_cap_the_oldest_waiting_connection_makes_room() {
        let ev = std::sync::Arc::new(Evictable::new(2));
        let (a, mut a_evicted) = ev.admit().unwrap();
        let (b, _) = ev.admit().unwrap();
        b.busy();
        assert_eq!(ev.open(), 2);
        // A third: `a` (waiting) is told to go; `b` (busy) is kept.
        let (c, _) = ev.admit().unwrap();
        assert!(a_evicted.try_recv().is_ok());
        assert!(ev.open() == 3, "a's slot frees when its task drops it");
        drop(a);
        assert_eq!(ev.open(), 2);
        c.busy();
        // Everything busy: a new connection is refused, nothing is evicted.
        assert!(ev.admit().is_none());
        assert_eq!(ev.open(), 2);
        drop(b);
        drop(c);
        assert_eq!(ev.open(), 0);
    }

    #[test]
    fn only_exhaustion_errors_pause() {
        assert!(resource_exhausted(&std::io::Error::from_raw_os_error(24)));
        assert!(resource_exhausted(&std::io::Error::from_raw_os_error(23)));
        assert!(!resource_exhausted(&std::io::Error::from_raw_os_error(103)));
    }
}
