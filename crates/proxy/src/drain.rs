//! The drain: how the proxy stops. One [`Drain`] per proxy, held in
//! [`crate::state::Shared::drain`]; everything that must stop in order goes
//! through it, and nothing else signals a shutdown.
//!
//! Three phases, as in ztunnel's `drain` module:
//! 1. **Running.** Listeners accept; every accepted connection (and every relay
//!    task it spawns) holds a [`Guard`], counted by the drain's tracker.
//! 2. **Draining** ([`Drain::draining`]), from [`Drain::shutdown`] on: listeners
//!    stop accepting, no new guard is handed out (so a connection opened before
//!    cannot start new relays), HTTP connections go graceful (in-flight requests
//!    finish, then they close), `/ready` answers not ready. Shutdown waits until
//!    the last guard is dropped, or the deadline.
//! 3. **Closing** ([`Drain::closing`]), past the deadline: whatever is left is
//!    cut (HTTP connections and TCP relays watch it). Closing implies draining.
//!
//! Who uses it: the accept loops ([`crate::accept::Acceptor`]), HTTP connections
//! ([`Drain::serve_http`]), TCP relays ([`crate::stream::spawn_splice`]), readiness
//! ([`crate::state::Shared::is_ready`]), the admin API's `POST /shutdown`
//! ([`Drain::request_shutdown`]), and `main.rs`, which on SIGTERM or that request
//! calls [`crate::Proxy::shutdown`], which runs [`Drain::shutdown`].
//!
//! Built on tokio-util: two `CancellationToken`s for the signals (closing is the
//! parent, draining its child, so closing cancels both) and a `TaskTracker` that
//! counts guards. The tracker's `wait` is exactly "closed and empty"; the hand-made
//! equivalent before was an `mpsc` sender cloned per connection and a
//! `watch::Sender<DrainState>`.

use std::time::Duration;

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

/// After the deadline, how long cut connections get to notice and end before
/// shutdown returns anyway.
const AFTER_CLOSING: Duration = Duration::from_secs(1);

/// The proxy's drain: its two signals and the count of live connections. Cloning
/// is cheap (three reference counts); every clone is the same drain.
#[derive(Debug, Clone)]
pub struct Drain {
    /// Cancelled when the drain starts (or when closing: it is closing's child).
    draining: CancellationToken,
    /// Cancelled past the deadline, or when the proxy is dropped.
    closing: CancellationToken,
    /// Counts [`Guard`]s; closed when the drain starts.
    tracker: TaskTracker,
    /// Cancelled by the admin API's `POST /shutdown`; `main.rs` then shuts down
    /// as on SIGTERM.
    requested: CancellationToken,
}

/// A live connection or task the drain waits for; dropping it says it is done.
#[derive(Debug)]
#[must_use = "the drain counts the connection only while its guard is held"]
pub struct Guard(#[allow(dead_code)] TaskTrackerToken);

impl Default for Drain {
    fn default() -> Self {
        Drain::new()
    }
}

impl Drain {
    /// A running drain: nothing signalled, nothing counted.
    pub fn new() -> Drain {
        let closing = CancellationToken::new();
        Drain {
            draining: closing.child_token(),
            closing,
            tracker: TaskTracker::new(),
            requested: CancellationToken::new(),
        }
    }

    /// True once the drain has started (and after).
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// True once past the deadline.
    pub fn is_closing(&self) -> bool {
        self.closing.is_cancelled()
    }

    /// Resolves once the drain starts: stop accepting, finish gracefully.
    pub fn draining(&self) -> WaitForCancellationFuture<'_> {
        self.draining.cancelled()
    }

    /// Resolves once past the deadline: close now.
    pub fn closing(&self) -> WaitForCancellationFuture<'_> {
        self.closing.cancelled()
    }

    /// A guard for a new connection or task, or `None` once draining: the caller
    /// then does not start it.
    pub fn guard(&self) -> Option<Guard> {
        // Checked before the token is taken: shutdown cancels `draining` before it
        // waits, so a guard taken in between is still waited for.
        (!self.is_draining()).then(|| Guard(self.tracker.token()))
    }

    /// Guards held now.
    pub fn live(&self) -> usize {
        self.tracker.len()
    }

    /// Drains: signals draining, waits up to `deadline` for every guard to be
    /// dropped, then signals closing (always: nothing may outlive shutdown) and
    /// gives what was cut a moment (`AFTER_CLOSING`) to end. True when everything ended
    /// before the deadline.
    pub async fn shutdown(&self, deadline: Duration) -> bool {
        self.draining.cancel();
        self.tracker.close();
        let clean = tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok();
        if !clean {
            tracing::warn!(
                live = self.live(),
                "drain deadline passed; closing remaining connections"
            );
        }
        self.closing.cancel();
        if !clean {
            let _ = tokio::time::timeout(AFTER_CLOSING, self.tracker.wait()).await;
        }
        clean
    }

    /// Serves the HTTP connection `conn` until it ends, or until the drain starts
    /// or `idle` resolves: then gracefully (`graceful`: in-flight requests
    /// complete, new ones are refused, it closes once idle) until it ends or the
    /// drain is closing.
    ///
    /// An adapter, kept here rather than hyper-util's `server::graceful`
    /// (`GracefulConnection`, `GracefulShutdown::watch`), which does not fit.
    /// Observed with hyper-util 0.1.21: `GracefulConnection` is sealed and
    /// implemented for hyper's `http1::Connection` but not for the
    /// `http1::UpgradeableConnection` the proxy serves (WebSocket and CONNECT need
    /// upgrades): the bound fails to compile (E0277). Its
    /// `auto::UpgradeableConnection`, which does implement it, is 1,584 bytes
    /// against 704 for the HTTP/1.1 connection (`size_of` with `serve.rs`'s IO and
    /// service), held inline by every keep-alive connection's task. And `watch`
    /// only reacts to one shutdown of all connections, while this also closes an
    /// idle HTTP/2 connection on its own and cuts everything at closing.
    pub(crate) async fn serve_http<C>(
        &self,
        conn: C,
        graceful: fn(std::pin::Pin<&mut C>),
        idle: impl Future<Output = ()>,
    ) where
        C: Future<Output = Result<(), hyper::Error>>,
    {
        tokio::pin!(conn);
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = idle => {}
            _ = self.draining() => {}
        }
        graceful(conn.as_mut());
        tokio::select! {
            _ = conn.as_mut() => {}
            _ = self.closing() => {}
        }
    }

    /// Asks for a shutdown (the admin API's `POST /shutdown`, loopback callers
    /// only): the process then shuts down as on SIGTERM. A Job's command calls it
    /// when its work is done, so the pod completes where the proxy cannot be a
    /// native sidecar (Kubernetes < 1.29). Only asks: the drain starts when the
    /// program owning the proxy calls [`crate::Proxy::shutdown`].
    pub fn request_shutdown(&self) {
        self.requested.cancel();
    }

    /// Resolves once a shutdown was asked for ([`Drain::request_shutdown`]).
    pub fn shutdown_requested(&self) -> WaitForCancellationFuture<'_> {
        self.requested.cancelled()
    }

    /// Closes now, without a drain (the proxy is being dropped).
    pub fn close(&self) {
        self.tracker.close();
        self.closing.cancel();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test(start_paused = true)]
    async fn the_tracker_counts_guards_and_none_is_given_once_draining() {
        let drain = Drain::new();
        assert_eq!(drain.live(), 0);
        let a = drain.guard().expect("running: a guard");
        let b = drain.guard().expect("running: a guard");
        assert_eq!(drain.live(), 2);
        drop(a);
        assert_eq!(drain.live(), 1);
        assert!(!drain.is_draining() && !drain.is_closing());

        let d = drain.clone();
        let shutdown = tokio::spawn(async move { d.shutdown(Duration::from_secs(30)).await });
        drain.draining().await;
        assert!(drain.is_draining());
        assert!(drain.guard().is_none(), "draining: no new connection");
        assert!(!drain.is_closing(), "before the deadline, not closing");
        drop(b);
        assert!(shutdown.await.unwrap(), "clean: the last guard went");
        assert_eq!(drain.live(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_work_finishes_before_the_deadline() {
        let drain = Drain::new();
        let finished = Arc::new(AtomicBool::new(false));
        let guard = drain.guard().unwrap();
        let (d, done) = (drain.clone(), finished.clone());
        tokio::spawn(async move {
            // In flight when the drain starts; not cut, as closing never comes.
            d.draining().await;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => done.store(true, Ordering::SeqCst),
                _ = d.closing() => {}
            }
            drop(guard);
        });
        let start = tokio::time::Instant::now();
        assert!(drain.shutdown(Duration::from_secs(10)).await);
        assert!(finished.load(Ordering::SeqCst), "the work ran to its end");
        assert_eq!(start.elapsed(), Duration::from_secs(2), "no wait past it");
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_forces_closing() {
        let drain = Drain::new();
        let guard = drain.guard().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let (d, was_cut) = (drain.clone(), cut.clone());
        tokio::spawn(async move {
            // Would run for an hour: only closing ends it.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
                _ = d.closing() => was_cut.store(true, Ordering::SeqCst),
            }
            drop(guard);
        });
        let start = tokio::time::Instant::now();
        assert!(!drain.shutdown(Duration::from_secs(5)).await, "not clean");
        assert!(drain.is_closing());
        assert!(cut.load(Ordering::SeqCst), "cut at the deadline");
        assert_eq!(
            drain.live(),
            0,
            "the cut task ended before shutdown returned"
        );
        assert!(start.elapsed() < Duration::from_secs(5) + AFTER_CLOSING);
    }

    #[tokio::test(start_paused = true)]
    async fn closing_without_a_drain_also_signals_draining() {
        let drain = Drain::new();
        drain.close();
        assert!(drain.is_draining() && drain.is_closing());
        drain.draining().await;
        assert!(drain.guard().is_none());
    }

    /// `/ready` (`Shared::is_ready`) answers not ready from the drain's start on.
    #[tokio::test]
    async fn readiness_goes_once_draining() {
        let shared = crate::state::Shared::new(crate::state::Settings::for_tests());
        let yaml = r#"
apiVersion: sinew.dev/v1alpha1
kind: Proxy
metadata: {name: web-0, namespace: shop}
spec:
  inbound: {bind: "127.0.0.1:4143", ports: [8080]}
"#;
        let config = sinew_model::compile::compile_text("t.yaml", yaml, None).unwrap();
        let snap = crate::state::SnapshotBuilder::default().build(
            config,
            "v1".into(),
            &shared.settings,
            &shared.certs,
        );
        shared.snapshot.store(Some(Arc::new(snap)));
        assert!(shared.is_ready(), "configured and running: ready");
        let drain = shared.drain.clone();
        let (hold, done) = (drain.guard().unwrap(), drain.clone());
        let shutdown = tokio::spawn(async move { done.shutdown(Duration::from_secs(30)).await });
        drain.draining().await;
        assert!(!shared.is_ready(), "draining: not ready");
        drop(hold);
        assert!(shutdown.await.unwrap());
        assert!(!shared.is_ready(), "drained: still not ready");
    }

    /// Through a real listener: a connection accepted before the drain is served
    /// to its end; once draining, the listener accepts nothing more.
    #[tokio::test]
    async fn draining_stops_new_accepts_and_in_flight_connections_finish() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let shared = Arc::new(crate::state::Shared::new(
            crate::state::Settings::for_tests(),
        ));
        let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std.set_nonblocking(true).unwrap();
        let addr = std.local_addr().unwrap();
        let (_stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let mut acceptor = crate::accept::Acceptor::start(
            std,
            addr,
            crate::types::Role::Upstream,
            &shared,
            stop_rx,
        )
        .unwrap();
        let accepting = tokio::spawn(async move {
            // An echo of one line per connection, each on its own task.
            while let Some(conn) = acceptor.next().await {
                tokio::spawn(conn.serve(|_ctx, mut stream| async move {
                    let mut buf = [0u8; 5];
                    if stream.read_exact(&mut buf).await.is_ok() {
                        let _ = stream.write_all(&buf).await;
                    }
                }));
            }
        });
        let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Accepted (and counted) before the drain starts.
        while shared.drain.live() == 0 {
            tokio::task::yield_now().await;
        }
        let drain = shared.drain.clone();
        let shutdown = tokio::spawn(async move { drain.shutdown(Duration::from_secs(30)).await });
        shared.drain.draining().await;
        tokio::time::timeout(Duration::from_secs(10), accepting)
            .await
            .expect("the accept loop ends once draining")
            .unwrap();
        // The accept loop ended (its listener is closed): new clients are refused.
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        // The connection in flight is still served.
        first.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        first.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        assert!(shutdown.await.unwrap(), "clean: it ended on its own");
    }
}
