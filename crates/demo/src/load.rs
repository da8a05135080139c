//! A steady, bounded load generator: `GET /` on the entry point at a fixed rate.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::{StatusCode, Uri};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::{JoinHandle, JoinSet};

use crate::client::{get, new_client};
use crate::stats::{Counters, Recorder};

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Distinct failure descriptions kept; the rest count as "other".
const MAX_FAILURE_KINDS: usize = 16;

/// Failure descriptions and their counts.
pub(crate) type Failures = BTreeMap<String, u64>;

/// A running load generator.
pub(crate) struct LoadGen {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    recorder: Arc<Recorder>,
    failures: Arc<Mutex<Failures>>,
}

impl LoadGen {
    /// Starts sending `rate` requests per second to `target`. At most `2 × rate`
    /// (and at least 32) requests are in flight; a tick with none free counts as a
    /// failed request.
    pub(crate) fn start(target: Uri, rate: u32) -> LoadGen {
        let recorder = Arc::new(Recorder::new());
        let failures = Arc::new(Mutex::new(Failures::new()));
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(generate(
            target,
            rate.max(1),
            recorder.clone(),
            failures.clone(),
            stopped,
        ));
        LoadGen {
            stop: Some(stop),
            task,
            recorder,
            failures,
        }
    }

    /// The counters so far.
    pub(crate) fn snapshot(&self) -> Counters {
        self.recorder.snapshot()
    }

    /// Stops sending, waits for the requests in flight (each bounded by its timeout)
    /// and returns the final counters and failure kinds.
    pub(crate) async fn stop(mut self) -> (Counters, Failures) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // The task ends by itself once in-flight requests finish; a panic in it only
        // loses counts that the recorder already holds.
        let _ = (&mut self.task).await;
        let failures = self
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        (self.recorder.snapshot(), failures)
    }
}

impl Drop for LoadGen {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn note_failure(failures: &Mutex<Failures>, what: String) {
    let mut map = failures.lock().unwrap_or_else(PoisonError::into_inner);
    let key = if map.contains_key(&what) || map.len() < MAX_FAILURE_KINDS {
        what
    } else {
        "other".to_owned()
    };
    *map.entry(key).or_insert(0) += 1;
}

async fn generate(
    target: Uri,
    rate: u32,
    recorder: Arc<Recorder>,
    failures: Arc<Mutex<Failures>>,
    mut stopped: oneshot::Receiver<()>,
) {
    let client = new_client();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    let limit = Arc::new(Semaphore::new((rate as usize * 2).max(32)));
    let mut in_flight = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            _ = ticker.tick() => {
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    recorder.record_unanswered();
                    note_failure(&failures, "not sent: too many requests in flight".to_owned());
                    continue;
                };
                let (client, target) = (client.clone(), target.clone());
                let (recorder, failures) = (recorder.clone(), failures.clone());
                in_flight.spawn(async move {
                    let _permit = permit;
                    let started = Instant::now();
                    let result = get(&client, &target, REQUEST_TIMEOUT).await;
                    let elapsed = started.elapsed();
                    match result {
                        Ok(f) if f.status == StatusCode::OK => recorder.record(elapsed, true),
                        Ok(f) => {
                            recorder.record(elapsed, false);
                            let reason = f
                                .headers
                                .get("sinew-error")
                                .and_then(|v| v.to_str().ok())
                                .map(|r| format!(" (sinew-error: {r})"))
                                .unwrap_or_default();
                            note_failure(&failures, format!("HTTP {}{reason}", f.status.as_u16()));
                        }
                        Err(e) => {
                            recorder.record(elapsed, false);
                            note_failure(&failures, e.chars().take(120).collect());
                        }
                    }
                });
            }
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
    }
    while in_flight.join_next().await.is_some() {}
}
