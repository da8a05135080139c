//! Telemetry over the proxies' own streams, with no Prometheus: `sinew stat`, `top`,
//! `tap` and `edges`.
//!
//! Each proxy sends a stats report (deltas) every couple of seconds while it has
//! traffic, in a `Discovery.Report` call next to its stream; [`window::Window`] adds them into a short ring of time slots per proxy,
//! and [`query`] merges the proxies' windows when asked. Taps go the other way: the
//! Admin API's `Tap` sends the filter to every connected proxy over its stream
//! (`TapStart`), relays the events they send back, and stops them (`TapStop`) when
//! the caller goes away. Nothing runs on a proxy for taps until one is asked for.
//!
//! Memory: a proxy costs its [`window::Window`] (bounded by its caps) plus a small
//! entry; a proxy whose streams are gone is forgotten once its counts have left the
//! window. [`Telemetry::heap_bytes`] measures what is held; the unit test
//! `a_hundred_proxies_cost_under_a_megabyte` states the figure.
//!
//! The discovery stream calls [`Telemetry::connect`] when a proxy's stream starts,
//! and [`Connection::receive`] on what it returns for the messages meant for the
//! telemetry; dropping the [`Connection`] unregisters the stream.

pub mod query;
pub mod tap;
pub mod window;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sinew_api::v1::{ControlMessage, proxy_message};
use tokio::sync::mpsc;
use tonic::Status;

use window::{SLOT, SlotId, WINDOW, Window};

/// The way to one proxy stream: the discovery task's outgoing queue.
pub type Link = mpsc::Sender<Result<ControlMessage, Status>>;

/// What is known of one proxy.
#[derive(Debug)]
pub struct ProxyEntry {
    /// Its workload's service, `name.namespace` ("" if it registered none).
    pub service: Box<str>,
    /// Its SPIFFE id, from its latest report ("" without a certificate).
    pub identity: Box<str>,
    /// When its first stream started: counts begin there.
    pub since: Instant,
    /// Its live streams (usually one).
    links: Vec<(u64, Link)>,
    /// When its last stream ended, while none is live.
    gone_at: Option<Instant>,
    /// Its recent traffic.
    pub window: Window,
}

/// The control plane's telemetry; see the [module docs](self).
#[derive(Debug)]
pub struct Telemetry {
    epoch: Instant,
    proxies: Mutex<HashMap<String, ProxyEntry>>,
    /// Locked after `proxies`, never before.
    names: Mutex<window::Names>,
    taps: tap::Taps,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::new(Instant::now())
    }
}

/// A proxy's stream as registered with the telemetry; unregisters when dropped.
#[derive(Debug)]
pub struct Connection {
    telemetry: Arc<Telemetry>,
    proxy: String,
    stream: u64,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.telemetry
            .disconnect(&self.proxy, self.stream, Instant::now());
    }
}

impl Connection {
    /// Takes a message meant for the telemetry (stats, tapped events); others are
    /// ignored.
    pub fn receive(&self, msg: proxy_message::Kind) {
        match msg {
            proxy_message::Kind::Stats(report) => {
                self.telemetry
                    .add_report(&self.proxy, &report, Instant::now());
            }
            proxy_message::Kind::TapEvents(events) => self.tap_events(events),
            _ => {}
        }
    }
}

impl Connection {
    fn tap_events(&self, events: sinew_api::v1::TapEvents) {
        let id = events.id;
        if !self.telemetry.taps.deliver(&self.proxy, events) {
            // A tap that ended here but not there (its stop was lost).
            for l in self.telemetry.links(Some(&self.proxy)) {
                tap::send(&l, tap::stop(id));
            }
        }
    }
}

impl Telemetry {
    /// Telemetry whose slots count from `epoch`.
    pub fn new(epoch: Instant) -> Telemetry {
        Telemetry {
            epoch,
            proxies: Mutex::new(HashMap::new()),
            names: Mutex::new(window::Names::default()),
            taps: tap::Taps::default(),
        }
    }

    /// The slot `t` falls in.
    pub fn slot(&self, t: Instant) -> SlotId {
        let secs = t.saturating_duration_since(self.epoch).as_secs() / SLOT.as_secs();
        SlotId::try_from(secs).unwrap_or(SlotId::MAX - 1)
    }

    /// When slot `s` began.
    pub fn slot_start(&self, s: SlotId) -> Instant {
        self.epoch + SLOT * s
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ProxyEntry>> {
        self.proxies.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a proxy's stream (`proxy` is `namespace/name`, `service` its
    /// workload's service name or ""), and starts the taps in progress on it.
    pub fn connect(
        self: &Arc<Self>,
        proxy: &str,
        service: &str,
        stream: u64,
        link: Link,
    ) -> Connection {
        self.connect_at(proxy, service, stream, link.clone(), Instant::now());
        for start in self.taps.starts() {
            tap::send(&link, start);
        }
        Connection {
            telemetry: self.clone(),
            proxy: proxy.to_owned(),
            stream,
        }
    }

    fn connect_at(&self, proxy: &str, service: &str, stream: u64, link: Link, now: Instant) {
        let mut proxies = self.lock();
        sweep(&mut proxies, now);
        let ns = proxy.split_once('/').map_or("default", |(ns, _)| ns);
        let service: Box<str> = if service.is_empty() {
            "".into()
        } else {
            format!("{service}.{ns}").into()
        };
        let e = proxies
            .entry(proxy.to_owned())
            .or_insert_with(|| ProxyEntry {
                service: service.clone(),
                identity: "".into(),
                since: now,
                links: Vec::new(),
                gone_at: None,
                window: Window::default(),
            });
        e.service = service;
        e.gone_at = None;
        e.links.push((stream, link));
    }

    fn disconnect(&self, proxy: &str, stream: u64, now: Instant) {
        let mut proxies = self.lock();
        if let Some(e) = proxies.get_mut(proxy) {
            e.links.retain(|(s, _)| *s != stream);
            if e.links.is_empty() {
                e.gone_at = Some(now);
            }
        }
    }

    /// Adds a stats report from `proxy`, received at `now`. False (and nothing
    /// added) when the proxy has no stream: there is nothing to attribute it to.
    pub fn add_report(
        &self,
        proxy: &str,
        report: &sinew_api::v1::StatsReport,
        now: Instant,
    ) -> bool {
        let slot = self.slot(now);
        let mut proxies = self.lock();
        let Some(e) = proxies.get_mut(proxy).filter(|e| !e.links.is_empty()) else {
            return false;
        };
        if report.identity.len() <= window::MAX_IDENTITY && *e.identity != *report.identity {
            e.identity = report.identity.as_str().into();
        }
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        e.window.add(report, slot, &mut names);
        e.window.prune(slot);
        true
    }

    /// The streams of `proxy`, or of every proxy.
    fn links(&self, proxy: Option<&str>) -> Vec<Link> {
        let proxies = self.lock();
        proxies
            .iter()
            .filter(|(name, _)| proxy.is_none_or(|p| p == name.as_str()))
            .flat_map(|(_, e)| e.links.iter().map(|(_, l)| l.clone()))
            .collect()
    }

    /// Proxies known now (connected, or gone but still in the window).
    pub fn proxies(&self) -> usize {
        self.lock().len()
    }

    /// Bytes held on the heap for all proxies: the map, the entries' strings and
    /// their windows (capacities, as asked of the allocator; its own bookkeeping
    /// is not counted).
    pub fn heap_bytes(&self) -> usize {
        let proxies = self.lock();
        // A hash map holds its capacity in buckets of (key, value) plus one control
        // byte each, with 1/8 of the buckets kept free.
        let bucket = std::mem::size_of::<(String, ProxyEntry)>() + 1;
        let map = proxies.capacity() * bucket * 8 / 7;
        map + proxies
            .iter()
            .map(|(k, e)| {
                k.capacity()
                    + e.service.len()
                    + e.identity.len()
                    + e.links.capacity() * std::mem::size_of::<(u64, Link)>()
                    + e.window.heap_bytes()
            })
            .sum::<usize>()
            + self
                .names
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .heap_bytes()
    }
}

/// Forgets proxies whose streams ended longer ago than the window (their counts
/// have left it).
fn sweep(proxies: &mut HashMap<String, ProxyEntry>, now: Instant) {
    proxies.retain(|_, e| {
        e.gone_at
            .is_none_or(|t| now.saturating_duration_since(t) <= WINDOW + SLOT)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use sinew_api::v1::{PathRow, StatsReport, TrafficRow};
    use std::time::Duration;

    fn link() -> Link {
        mpsc::channel(1).0
    }

    /// A typical sidecar's report: 4 inbound rows (callers), 4 outbound rows
    /// (services it calls), 20 paths.
    fn typical(p: usize) -> StatsReport {
        let row = |inbound: bool, i: usize| TrafficRow {
            inbound,
            service: format!("service-{}.shop", if inbound { p } else { i }),
            route: if inbound {
                String::new()
            } else {
                format!("shop/route-{i}")
            },
            peer_identity: format!("spiffe://cluster.local/ns/shop/sa/caller-{i}"),
            mtls: true,
            requests: 1000,
            failures: 3,
            latency: vec![10, 200, 400, 300, 50, 20, 10, 5, 3, 2],
        };
        StatsReport {
            identity: format!("spiffe://cluster.local/ns/shop/sa/service-{p}"),
            rows: (0..4)
                .map(|i| row(true, i))
                .chain((0..4).map(|i| row(false, i)))
                .collect(),
            paths: (0..20)
                .map(|i| PathRow {
                    inbound: true,
                    service: format!("service-{p}.shop"),
                    method: "GET".into(),
                    path: format!("/api/v1/items/category-{i}"),
                    requests: 50,
                    failures: 0,
                    latency_sum_us: 50_000,
                    latency_max_us: 4_000,
                })
                .collect(),
            unreported: 0,
        }
    }

    /// The figure the issue asks for: stats reporting costs the control plane at
    /// most 1 MB per 100 proxies. Measured here for 100 proxies, each with a
    /// typical report (8 rows, 20 paths) arriving every 2 s for two minutes, so
    /// every slot of every ring is in use. The accounting was cross-checked once
    /// with a counting global allocator (outside the workspace, which forbids
    /// `unsafe`), before names were shared: 846,388 bytes allocated against 844,682
    /// counted. Names are shared now: only a proxy's own paths still cost it an
    /// allocation each (about 70 allocations per proxy before, 25 now).
    #[test]
    fn a_hundred_proxies_cost_under_a_megabyte() {
        let t0 = Instant::now();
        let tel = Telemetry::new(t0);
        for p in 0..100 {
            tel.connect_at(
                &format!("shop/service-{p}-0"),
                &format!("service-{p}"),
                1,
                link(),
                t0,
            );
        }
        let mut now = t0;
        while now < t0 + Duration::from_secs(120) {
            for p in 0..100 {
                tel.add_report(&format!("shop/service-{p}-0"), &typical(p), now);
            }
            now += Duration::from_secs(2);
        }
        let bytes = tel.heap_bytes();
        eprintln!(
            "telemetry for 100 proxies (8 rows, 20 paths each): {bytes} bytes ({:.0} KiB)",
            bytes as f64 / 1024.0
        );
        assert!(bytes <= 1_000_000, "{bytes} bytes for 100 proxies");
        // The worst case the caps allow (64 rows, 32 paths, every string at its
        // limit and different from every other proxy's, so none is shared) is
        // larger but bounded: stated in docs/observability.md.
        let worst = Telemetry::new(t0);
        for p in 0..100 {
            let name = format!("shop/p{p}");
            worst.connect_at(&name, "s", 1, link(), t0);
            for slot in 0..(window::SLOTS as u64) {
                let r = StatsReport {
                    identity: "i".repeat(window::MAX_IDENTITY),
                    rows: (0..window::MAX_ROWS)
                        .map(|i| TrafficRow {
                            inbound: false,
                            service: format!("{p:02}{i:02}{}", "s".repeat(window::MAX_NAME - 4)),
                            route: format!("{p:02}{i:02}{}", "r".repeat(window::MAX_NAME - 4)),
                            peer_identity: format!(
                                "{p:02}{i:02}{}",
                                "p".repeat(window::MAX_IDENTITY - 4)
                            ),
                            mtls: true,
                            requests: 1,
                            failures: 0,
                            latency: vec![1; 17],
                        })
                        .collect(),
                    paths: (0..window::REPORT_PATHS)
                        .map(|i| PathRow {
                            inbound: true,
                            service: format!("{p:02}{}", "s".repeat(window::MAX_NAME - 2)),
                            method: "GET".into(),
                            path: format!("{p:02}{slot}{i:03}{}", "p".repeat(window::MAX_PATH - 6)),
                            requests: 1 + slot,
                            failures: 0,
                            latency_sum_us: 1,
                            latency_max_us: 1,
                        })
                        .collect(),
                    unreported: 0,
                };
                worst.add_report(&name, &r, t0 + SLOT * slot as u32);
            }
        }
        let worst_bytes = worst.heap_bytes();
        eprintln!(
            "telemetry for 100 proxies at every cap: {worst_bytes} bytes ({:.1} MiB)",
            worst_bytes as f64 / (1024.0 * 1024.0)
        );
        assert!(worst_bytes <= 13 * 1024 * 1024, "{worst_bytes}");
    }

    #[test]
    fn gone_proxies_are_forgotten_after_the_window() {
        let t0 = Instant::now();
        let tel = Arc::new(Telemetry::new(t0));
        tel.connect_at("shop/a", "a", 1, link(), t0);
        tel.connect_at("shop/b", "b", 2, link(), t0);
        tel.add_report("shop/a", &typical(1), t0);
        tel.disconnect("shop/a", 1, t0 + Duration::from_secs(1));
        // Still there while its counts are in the window.
        tel.connect_at("shop/c", "c", 3, link(), t0 + Duration::from_secs(30));
        assert_eq!(tel.proxies(), 3);
        tel.connect_at(
            "shop/d",
            "d",
            4,
            link(),
            t0 + WINDOW + SLOT + Duration::from_secs(2),
        );
        assert_eq!(tel.proxies(), 3, "a is forgotten, b, c and d stay");
        // A report from a proxy that is not connected is not kept.
        tel.add_report("shop/a", &typical(1), t0 + WINDOW * 2);
        assert_eq!(tel.proxies(), 3);
    }
}
