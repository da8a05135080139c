//! The tap relay: a caller's filter goes out to every connected proxy (and to proxies
//! that connect while it runs) as a `TapStart`; their batches of events come back
//! over their streams and go out to the caller, each named with the proxy that saw
//! it. When the caller goes away, or has its `limit` of requests, every proxy gets a
//! `TapStop`. A proxy that keeps sending for a tap that is over is told to stop again.
//!
//! A request between two meshed workloads is seen twice, by the caller's sidecar
//! (outbound) and by the server's (inbound, with the caller's verified identity):
//! the limit counts it once, at the caller's side (see [`counts`]).
//!
//! Queues are bounded all the way: a slow caller makes events be dropped (and says
//! how many), never the proxies' streams wait.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sinew_api::v1::{
    ControlMessage, TapEvent, TapEvents, TapFilter, TapResponse, TapStart, TapStop,
    control_message, tap_response,
};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tonic::Status;

use super::{Link, Telemetry};

/// Batches queued from the proxies for one tap before its events are dropped.
const RELAY_QUEUE: usize = 64;
/// Messages queued for the caller.
const CALLER_QUEUE: usize = 256;
/// How long a control message may wait for room on a busy proxy stream.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Taps running at once on the control plane.
pub const MAX_TAPS: usize = 16;
/// Longest filter value accepted.
const MAX_FILTER: usize = 512;

#[derive(Debug)]
struct Active {
    start: TapStart,
    events: mpsc::Sender<(String, TapEvents)>,
    /// Events dropped because the relay queue was full.
    missed: Arc<AtomicU64>,
}

/// The taps in progress.
#[derive(Debug, Default)]
pub struct Taps {
    next: AtomicU64,
    active: Mutex<HashMap<u64, Active>>,
}

/// Sends `msg` on a proxy stream without waiting: when the stream's queue is full,
/// a task waits for room (a while at most).
pub fn send(link: &Link, msg: ControlMessage) {
    match link.try_send(Ok(msg)) {
        Ok(()) | Err(TrySendError::Closed(_)) => {}
        Err(TrySendError::Full(msg)) => {
            let link = link.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(SEND_TIMEOUT, link.send(msg)).await;
            });
        }
    }
}

/// `TapStop` for tap `id`.
pub fn stop(id: u64) -> ControlMessage {
    ControlMessage {
        kind: Some(control_message::Kind::TapStop(TapStop { id })),
    }
}

/// Checks a filter as the proxies will (they refuse a bad one silently), so the
/// caller hears what is wrong; normalises the method.
pub fn check(f: &mut TapFilter) -> Result<(), String> {
    for (name, v) in [
        ("service", &f.service),
        ("path", &f.path),
        ("method", &f.method),
    ] {
        if v.len() > MAX_FILTER {
            return Err(format!("{name}: longer than {MAX_FILTER} bytes"));
        }
    }
    if !matches!(f.direction.as_str(), "" | "inbound" | "outbound") {
        return Err(format!(
            "direction {:?}: use inbound or outbound",
            f.direction
        ));
    }
    let s = f.status.as_bytes();
    let status_ok = s.is_empty()
        || (s.len() == 3
            && s[0].is_ascii_digit()
            && (s[1..].iter().all(u8::is_ascii_digit) || &s[1..] == b"xx"));
    if !status_ok {
        return Err(format!(
            "status {:?}: use a status (503) or a class (5xx)",
            f.status
        ));
    }
    f.method = f.method.to_ascii_uppercase();
    Ok(())
}

/// Whether `e` counts as a request of its own towards a tap's limit. A request
/// from one meshed workload to another is tapped on both sides; it counts at the
/// caller's sidecar (outbound), so its server-side event (inbound, carrying the
/// caller's verified identity) does not. An inbound request from outside the mesh
/// (no verified caller) has only that side and counts there; with a `direction`
/// every event is the one side of its request that is tapped.
///
/// A limitation: a request rewritten on the way (a route's `URLRewrite`) can match
/// a path filter on its server side only; it is then shown but not counted.
pub fn counts(filter: &TapFilter, e: &TapEvent) -> bool {
    !filter.direction.is_empty() || e.direction != "inbound" || e.peer_identity.is_empty()
}

impl Taps {
    /// The `TapStart` of every tap in progress (for a proxy that just connected).
    pub fn starts(&self) -> Vec<ControlMessage> {
        let active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        active
            .values()
            .map(|a| ControlMessage {
                kind: Some(control_message::Kind::TapStart(a.start.clone())),
            })
            .collect()
    }

    /// Hands a proxy's batch to its tap; false when there is no such tap.
    pub fn deliver(&self, proxy: &str, events: TapEvents) -> bool {
        let active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        let Some(a) = active.get(&events.id) else {
            return false;
        };
        let n = events.events.len() as u64;
        if let Err(TrySendError::Full(_)) = a.events.try_send((proxy.to_owned(), events)) {
            a.missed.fetch_add(n, Ordering::Relaxed);
        }
        true
    }

    fn remove(&self, id: u64) {
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
}

impl Telemetry {
    /// Starts a tap: the caller's messages, first `started` (with the number of
    /// proxies asked), then events as they come, until it drops the receiver or
    /// the events of `filter.limit` requests were sent (each counted once, see
    /// [`counts`]; server-side events not counted are sent up to the limit too).
    pub fn tap(
        self: &Arc<Self>,
        mut filter: TapFilter,
    ) -> Result<mpsc::Receiver<Result<TapResponse, Status>>, String> {
        check(&mut filter)?;
        let id = self.taps.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (events_tx, mut events) = mpsc::channel(RELAY_QUEUE);
        let missed = Arc::new(AtomicU64::new(0));
        let start = TapStart {
            id,
            filter: Some(filter.clone()),
        };
        {
            let mut active = self.taps.active.lock().unwrap_or_else(|e| e.into_inner());
            if active.len() >= MAX_TAPS {
                return Err(format!(
                    "{MAX_TAPS} taps are running already; stop one first"
                ));
            }
            active.insert(
                id,
                Active {
                    start: start.clone(),
                    events: events_tx,
                    missed: missed.clone(),
                },
            );
        }
        let links = self.links(None);
        let asked = links.len() as u32;
        for l in &links {
            send(
                l,
                ControlMessage {
                    kind: Some(control_message::Kind::TapStart(start.clone())),
                },
            );
        }
        let (out, rx) = mpsc::channel(CALLER_QUEUE);
        let telemetry = self.clone();
        let limit = match filter.limit {
            0 => u64::MAX,
            n => n,
        };
        tokio::spawn(async move {
            let msg = |kind| Ok(TapResponse { kind: Some(kind) });
            // Requests counted, and server-side events of meshed requests sent: those
            // are capped at the limit too, so a batch from the servers arriving
            // before the callers' does not show more requests than asked for.
            let (mut requests, mut server_side) = (0u64, 0u64);
            if out
                .send(msg(tap_response::Kind::Started(asked)))
                .await
                .is_ok()
            {
                'relay: while requests < limit {
                    let batch = tokio::select! {
                        _ = out.closed() => break,
                        b = events.recv() => b,
                    };
                    let Some((proxy, batch)) = batch else { break };
                    let lost = batch.missed + missed.swap(0, Ordering::Relaxed);
                    if lost > 0
                        && out
                            .send(msg(tap_response::Kind::Missed(lost)))
                            .await
                            .is_err()
                    {
                        break;
                    }
                    for mut e in batch.events {
                        let counted = counts(&filter, &e);
                        if !counted && server_side >= limit {
                            continue;
                        }
                        e.proxy.clone_from(&proxy);
                        if out.send(msg(tap_response::Kind::Event(e))).await.is_err() {
                            break 'relay;
                        }
                        if counted {
                            requests += 1;
                        } else {
                            server_side += 1;
                        }
                        if requests >= limit {
                            break 'relay;
                        }
                    }
                }
            }
            telemetry.taps.remove(id);
            for l in telemetry.links(None) {
                send(&l, stop(id));
            }
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_checked_as_the_proxies_will() {
        let mut f = TapFilter {
            method: "post".into(),
            status: "5xx".into(),
            ..Default::default()
        };
        assert_eq!(check(&mut f), Ok(()));
        assert_eq!(f.method, "POST");
        for bad in [
            TapFilter {
                status: "5".into(),
                ..Default::default()
            },
            TapFilter {
                status: "x00".into(),
                ..Default::default()
            },
            TapFilter {
                direction: "sideways".into(),
                ..Default::default()
            },
            TapFilter {
                path: "/".repeat(MAX_FILTER + 1),
                ..Default::default()
            },
        ] {
            let mut b = bad;
            assert!(check(&mut b).is_err(), "{b:?}");
        }
    }

    #[tokio::test]
    async fn a_tap_reaches_every_proxy_relays_their_events_and_stops_them() {
        let tel = Arc::new(Telemetry::default());
        let (a_tx, mut a_rx) = mpsc::channel(8);
        let (b_tx, mut b_rx) = mpsc::channel(8);
        let a = tel.connect("shop/a", "a", 1, a_tx);
        let _b = tel.connect("shop/b", "b", 2, b_tx);
        let mut caller = tel
            .tap(TapFilter {
                path: "/api".into(),
                limit: 3,
                ..Default::default()
            })
            .unwrap();
        let first = caller
            .recv()
            .await
            .and_then(Result::ok)
            .and_then(|m| m.kind);
        assert_eq!(first, Some(tap_response::Kind::Started(2)));
        let id = match a_rx.recv().await.and_then(Result::ok).and_then(|m| m.kind) {
            Some(control_message::Kind::TapStart(s)) => {
                assert_eq!(s.filter.map(|f| f.path).as_deref(), Some("/api"));
                s.id
            }
            other => panic!("expected TapStart, got {other:?}"),
        };
        assert!(matches!(
            b_rx.recv().await.and_then(Result::ok).and_then(|m| m.kind),
            Some(control_message::Kind::TapStart(_))
        ));
        let ev = |path: &str| sinew_api::v1::TapEvent {
            path: path.into(),
            ..Default::default()
        };
        a.receive(sinew_api::v1::proxy_message::Kind::TapEvents(TapEvents {
            id,
            events: vec![ev("/api/1"), ev("/api/2"), ev("/api/3"), ev("/api/4")],
            missed: 2,
        }));
        let mut got = Vec::new();
        while let Some(Ok(m)) = caller.recv().await {
            got.push(m.kind);
        }
        assert_eq!(
            got.len(),
            4,
            "missed, then three events (the limit): {got:?}"
        );
        assert_eq!(got[0], Some(tap_response::Kind::Missed(2)));
        match &got[1] {
            Some(tap_response::Kind::Event(e)) => {
                assert_eq!((e.proxy.as_str(), e.path.as_str()), ("shop/a", "/api/1"));
            }
            other => panic!("{other:?}"),
        }
        // At its limit the tap is over: every proxy is told to stop.
        for rx in [&mut a_rx, &mut b_rx] {
            assert_eq!(
                rx.recv().await.and_then(Result::ok).and_then(|m| m.kind),
                Some(control_message::Kind::TapStop(TapStop { id }))
            );
        }
        // Late events for it make that proxy be told again.
        a.receive(sinew_api::v1::proxy_message::Kind::TapEvents(TapEvents {
            id,
            events: vec![ev("/api/5")],
            missed: 0,
        }));
        assert_eq!(
            a_rx.recv().await.and_then(Result::ok).and_then(|m| m.kind),
            Some(control_message::Kind::TapStop(TapStop { id }))
        );
    }

    /// Runs a tap with `filter` over one proxy's `batch`; the events it relayed.
    async fn run(
        tel: &Arc<Telemetry>,
        a: &super::super::Connection,
        a_rx: &mut mpsc::Receiver<Result<ControlMessage, Status>>,
        filter: TapFilter,
        batch: Vec<sinew_api::v1::TapEvent>,
    ) -> Vec<String> {
        let mut caller = tel.tap(filter).unwrap();
        let _started = caller.recv().await;
        let id = match a_rx.recv().await.and_then(Result::ok).and_then(|m| m.kind) {
            Some(control_message::Kind::TapStart(s)) => s.id,
            other => panic!("expected TapStart, got {other:?}"),
        };
        a.receive(sinew_api::v1::proxy_message::Kind::TapEvents(TapEvents {
            id,
            events: batch,
            missed: 0,
        }));
        let mut got = Vec::new();
        while let Some(Ok(m)) = caller.recv().await {
            if let Some(tap_response::Kind::Event(e)) = m.kind {
                got.push(format!("{} {}", e.direction, e.path));
            }
        }
        // The tap is over: its stop reaches the proxy.
        assert!(matches!(
            a_rx.recv().await.and_then(Result::ok).and_then(|m| m.kind),
            Some(control_message::Kind::TapStop(_))
        ));
        got
    }

    #[tokio::test]
    async fn the_limit_counts_requests_not_the_two_sides_of_one() {
        let tel = Arc::new(Telemetry::default());
        let (a_tx, mut a_rx) = mpsc::channel(8);
        let a = tel.connect("shop/a", "a", 1, a_tx);
        let ev = |direction: &str, peer: &str, path: &str| sinew_api::v1::TapEvent {
            direction: direction.into(),
            peer_identity: peer.into(),
            path: path.into(),
            ..Default::default()
        };
        let caller_id = "spiffe://cluster.local/ns/shop/sa/web";
        // Server sides of meshed requests, their callers' sides, and a request from
        // outside the mesh (inbound, no verified caller).
        let batch = vec![
            ev("inbound", caller_id, "/1"),
            ev("outbound", "", "/1"),
            ev("inbound", caller_id, "/2"),
            ev("inbound", caller_id, "/3"),
            ev("inbound", "", "/outside"),
            ev("outbound", "", "/2"),
            ev("outbound", "", "/3"),
        ];
        // Three requests: /1, /2 and the outside one; the server side of /3 is past
        // the limit of server sides shown.
        let got = run(
            &tel,
            &a,
            &mut a_rx,
            TapFilter {
                limit: 3,
                ..Default::default()
            },
            batch.clone(),
        )
        .await;
        assert_eq!(
            got,
            [
                "inbound /1",
                "outbound /1",
                "inbound /2",
                "inbound /3",
                "inbound /outside",
                "outbound /2"
            ]
        );
        let got = run(
            &tel,
            &a,
            &mut a_rx,
            TapFilter {
                limit: 1,
                ..Default::default()
            },
            batch.clone(),
        )
        .await;
        assert_eq!(got, ["inbound /1", "outbound /1"]);
        // One side only (the proxies send no other): each event is a request.
        let inbound: Vec<_> = batch
            .into_iter()
            .filter(|e| e.direction == "inbound")
            .collect();
        let got = run(
            &tel,
            &a,
            &mut a_rx,
            TapFilter {
                limit: 2,
                direction: "inbound".into(),
                ..Default::default()
            },
            inbound,
        )
        .await;
        assert_eq!(got, ["inbound /1", "inbound /2"]);
    }

    #[tokio::test]
    async fn a_caller_going_away_stops_the_tap() {
        let tel = Arc::new(Telemetry::default());
        let (a_tx, mut a_rx) = mpsc::channel(8);
        let _a = tel.connect("shop/a", "a", 1, a_tx);
        let caller = tel.tap(TapFilter::default()).unwrap();
        assert!(matches!(
            a_rx.recv().await.and_then(Result::ok).and_then(|m| m.kind),
            Some(control_message::Kind::TapStart(_))
        ));
        drop(caller);
        assert!(matches!(
            a_rx.recv().await.and_then(Result::ok).and_then(|m| m.kind),
            Some(control_message::Kind::TapStop(_))
        ));
        // A proxy connecting now is not asked to tap.
        let (c_tx, mut c_rx) = mpsc::channel(8);
        let _c = tel.connect("shop/c", "c", 2, c_tx);
        assert!(c_rx.try_recv().is_err());
    }
}
