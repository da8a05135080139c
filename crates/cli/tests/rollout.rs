//! Rollouts and crashes under load lose no request: a draining sidecar leaves the
//! mesh before it stops accepting, and a request no endpoint saw goes elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod mesh;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use mesh::*;
use sinew_testkit::http::HttpBackend;
use sinew_testkit::{client, wait};

/// Runs `h2load` (nghttp2, a third-party load generator) over HTTP/1.1 through
/// `bind`; returns its report. The suite installs it (`scripts/test`): a missing
/// `h2load` fails the test.
fn h2load(bind: SocketAddr, path: &str, requests: u32, clients: u32) -> tokio::process::Child {
    tokio::process::Command::new("h2load")
        .args([
            "--h1",
            "-n",
            &requests.to_string(),
            "-c",
            &clients.to_string(),
            "-T",
            "10",
            &format!("http://{bind}{path}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect(
            "h2load (Debian package nghttp2-client) must be installed: scripts/test installs it",
        )
}

/// `(succeeded, total)` from h2load's report, asserting 2xx for every success.
fn h2load_result(out: &std::process::Output) -> (u64, u64, String) {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .unwrap_or_else(|| panic!("no status line in h2load's report:\n{text}"));
    // "status codes: 3000 2xx, 0 3xx, 0 4xx, 0 5xx"
    let ok: u64 = line
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read {line:?}"));
    let total: u64 = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no requests line in h2load's report:\n{text}"));
    (ok, total, text)
}

/// Waits until a request through `bind` gets a 200.
async fn serving(bind: SocketAddr, path: &str) {
    listening(bind).await;
    wait::until("path serves", TIMEOUT, || async move {
        client::get(bind, "catalog", path)
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_server_sidecars_under_load_fails_no_request() {
    let scratch = Scratch::new();
    let cp = Control::start(&scratch.0.join("data"), free_addr(), &[]).await;
    let bind = free_addr();
    apply(
        &cp,
        &scratch,
        &format!(
            "{}{}",
            service("shop", "catalog"),
            proxy_doc("shop", "web", &[(bind, "catalog")])
        ),
    )
    .await;
    // A slow app (100 ms a request), so requests are in flight at every moment.
    let app1 = HttpBackend::start("one").await.unwrap();
    let app2 = HttpBackend::start("two").await.unwrap();
    let (in1, in2) = (free_addr(), free_addr());
    let quick = Duration::from_millis(50);
    let side1 = proxy(
        &cp,
        "shop/catalog-1",
        Some(registration("catalog", app1.addr(), in1, "v1")),
        quick,
    )
    .await;
    let side2 = proxy(
        &cp,
        "shop/catalog-2",
        Some(registration("catalog", app2.addr(), in2, "v1")),
        quick,
    )
    .await;
    let web = proxy(&cp, "shop/web", None, quick).await;
    wait::until("in sync", TIMEOUT, || async { cp.all_in_sync(3).await })
        .await
        .unwrap();
    serving(bind, "/delay/100").await;
    wait::until("both endpoints serve", TIMEOUT, || async {
        let _ = client::get(bind, "catalog", "/").await;
        app1.requests() > 0 && app2.requests() > 0
    })
    .await
    .unwrap();

    // About 200 requests a second: 20 clients, 100 ms each.
    let load = h2load(bind, "/delay/100", 3000, 20);
    let (a1, a2) = (app1.requests(), app2.requests());
    wait::until("load reaches both", TIMEOUT, || async {
        app1.requests() > a1 + 50 && app2.requests() > a2 + 50
    })
    .await
    .unwrap();

    // Roll catalog-1: SIGTERM's path (shutdown), then its replacement, same name.
    side1.shutdown().await;
    let served = app1.requests();
    let side1 = proxy(
        &cp,
        "shop/catalog-1",
        Some(registration("catalog", app1.addr(), in1, "v2")),
        quick,
    )
    .await;
    wait::until("the replacement serves", TIMEOUT, || async {
        app1.requests() > served + 50
    })
    .await
    .unwrap();
    // Then catalog-2.
    side2.shutdown().await;

    let out = load.wait_with_output().await.unwrap();
    let (ok, total, report) = h2load_result(&out);
    assert_eq!(total, 3000, "{report}");
    assert_eq!(
        ok, total,
        "every request of a rolling restart succeeds:\n{report}"
    );
    web.shutdown().await;
    side1.shutdown().await;
}

/// Steady HTTP/1.1 load through `bind`, counting answers by status.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU32>,
    failed: Arc<AtomicU32>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    async fn start(bind: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU32::new(0));
        let failed = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                let mut c = client::h1(bind).await.unwrap();
                while !stop.load(Ordering::Relaxed) {
                    match c.get("catalog", "/").await {
                        Ok(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => {
                            eprintln!(
                                "failed: {} {:?} {}",
                                r.status,
                                r.header("sinew-error"),
                                r.text().trim()
                            );
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("failed: {e}");
                            failed.fetch_add(1, Ordering::Relaxed);
                            c = client::h1(bind).await.unwrap();
                        }
                    }
                }
            }));
        }
        Load {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    fn counts(&self) -> (u32, u32) {
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    async fn progress(&self, n: u32) {
        let target = self.counts().0 + n;
        wait::until("load makes progress", TIMEOUT, || async move {
            self.counts().0 >= target
        })
        .await
        .unwrap();
    }

    async fn finish(mut self) -> (u32, u32) {
        self.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.tasks) {
            t.await.unwrap();
        }
        self.counts()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_three_apps_under_load_fails_at_most_one_in_a_thousand_every_time() {
    let scratch = Scratch::new();
    let cp = Control::start(&scratch.0.join("data"), free_addr(), &[]).await;
    let bind = free_addr();
    // No TrafficPolicy: a refusing endpoint is ejected by default.
    apply(
        &cp,
        &scratch,
        &format!(
            "{}{}",
            service("shop", "catalog"),
            proxy_doc("shop", "web", &[(bind, "catalog")])
        ),
    )
    .await;
    let quick = Duration::from_millis(50);
    let mut apps = Vec::new();
    let mut sides = Vec::new();
    for i in 0..3 {
        let addr = free_addr();
        apps.push((addr, Some(python_app(&scratch.0, addr).await)));
        sides.push(
            proxy(
                &cp,
                &format!("shop/catalog-{i}"),
                Some(registration("catalog", addr, free_addr(), "v1")),
                quick,
            )
            .await,
        );
    }
    let web = proxy(&cp, "shop/web", None, quick).await;
    wait::until("in sync", TIMEOUT, || async { cp.all_in_sync(4).await })
        .await
        .unwrap();
    serving(bind, "/").await;

    let load = Load::start(bind, 6).await;
    load.progress(200).await;
    for run in 0..10 {
        let victim = run % 3;
        let before = load.counts();
        // kill -9: the app is gone at once, its sidecar stays.
        if let Some(mut child) = apps[victim].1.take() {
            child.kill().await.unwrap();
        }
        // Requests in flight at the victim when it dies may fail (it may have seen
        // them); everything after must not.
        load.progress(3000).await;
        let after = load.counts();
        let (ok, failed) = (after.0 - before.0, after.1 - before.1);
        eprintln!("run {run}: {failed} of {} failed", ok + failed);
        assert!(
            u64::from(failed) * 1000 <= u64::from(ok + failed),
            "run {run}: {failed} of {} requests failed after app {victim} was killed",
            ok + failed
        );
        // Back for the next run (ejected for a while, which is fine).
        apps[victim].1 = Some(python_app(&scratch.0, apps[victim].0).await);
    }
    let (ok, failed) = load.finish().await;
    eprintln!("{ok} requests succeeded, {failed} failed over 10 kills");
    web.shutdown().await;
    for s in sides {
        s.shutdown().await;
    }
}
