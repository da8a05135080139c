//! Giving freed memory back to the system after bursts of work.
//!
//! glibc's allocator keeps what a burst freed (the garbage of parsing a large apply,
//! the pushes of a thousand proxies connecting at once) in its arenas, so the
//! control plane's RSS would stay at the burst's peak. Once a burst is over (nothing
//! happened for a quarter of a second), or every few seconds during a long one, the control plane
//! asks glibc to return free pages (`malloc_trim`). A trim takes a few milliseconds
//! on a blocking thread, never on the request path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static ACTIVITY: AtomicU64 = AtomicU64::new(0);

/// Records that a burst of allocation happened (a publication, a stream opening or
/// closing).
pub fn note() {
    ACTIVITY.fetch_add(1, Ordering::Relaxed);
}

/// Trims after activity: when it stops for a tick, and at least every 10 ticks while
/// it goes on. Runs until the runtime stops.
pub async fn run() {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut seen, mut trimmed, mut busy) = (0, 0, 0u32);
    loop {
        tick.tick().await;
        let now = ACTIVITY.load(Ordering::Relaxed);
        busy = if now == seen { 0 } else { busy + 1 };
        let quiet_after_work = now == seen && now != trimmed;
        seen = now;
        if quiet_after_work || busy >= 10 {
            trimmed = now;
            busy = 0;
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    }
}

/// Returns free heap pages to the system.
fn trim() {
    sinew_api::memory::trim();
}
