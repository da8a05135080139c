//! Polling helper: wait for a condition instead of sleeping.

use std::future::Future;
use std::time::Duration;

use tokio::time::MissedTickBehavior;

use crate::BoxError;

/// How often [`until`] polls.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Polls `f` about every 10 ms until it returns `true`.
///
/// `f` is called once immediately. Returns an error naming `what` if the
/// condition is still false after `timeout`.
///
/// ```no_run
/// # async fn demo(backend: &sinew_testkit::http::HttpBackend) -> Result<(), sinew_testkit::BoxError> {
/// use std::time::Duration;
/// sinew_testkit::wait::until("backend saw 3 requests", Duration::from_secs(5), || async {
///     backend.requests() >= 3
/// })
/// .await?;
/// # Ok(()) }
/// ```
pub async fn until<F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<(), BoxError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let mut interval = tokio::time::interval(POLL_INTERVAL);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let poll = async {
        loop {
            interval.tick().await;
            if f().await {
                return;
            }
        }
    };
    tokio::time::timeout(timeout, poll)
        .await
        .map_err(|_| format!("timed out after {timeout:?} waiting for {what}").into())
}

/// Polls the admin listener at `admin` until `/ready` answers 200 (a proxy's, or
/// anything serving Sinew's admin API). Returns an error naming `what` after
/// `timeout`.
pub async fn ready(
    what: &str,
    admin: std::net::SocketAddr,
    timeout: Duration,
) -> Result<(), BoxError> {
    until(what, timeout, || async move {
        matches!(crate::client::get(admin, "admin", "/ready").await, Ok(r) if r.status == 200)
    })
    .await
}
