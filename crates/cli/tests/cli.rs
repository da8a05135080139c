//! The `sinew` binary as a user runs it.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod mesh;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use mesh::*;
use sinew_testkit::http::HttpBackend;
use sinew_testkit::{client, wait};

fn sinew(args: &[&str], dir: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sinew"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

#[test]
fn validate_accepts_a_good_directory_and_names_what_is_wrong() {
    let dir = std::env::temp_dir().join(format!("sinew-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("svc.yaml"),
        "apiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {name: catalog}\nspec:\n  ports: [{name: http, port: 80}]\n",
    )
    .unwrap();
    let ok = sinew(&["validate", "-f", "."], &dir);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout).trim(),
        "1 documents valid"
    );

    std::fs::write(
        dir.join("route.yaml"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: catalog}]\n  rules:\n    - backendRefs: [{name: catalog, weight: 0}]\n",
    )
    .unwrap();
    let bad = sinew(&["validate", "-f", "."], &dir);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("./route.yaml:1: HTTPRoute default/r: spec.rules[0].backendRefs: all backend weights are zero"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Steady load through a binding: counts successes and failures until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU32>,
    failed: Arc<AtomicU32>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    async fn start(bind: std::net::SocketAddr, clients: usize) -> Load {
        listening(bind).await;
        // The path is up when a request gets through end to end (a proxy is ready on
        // its first push, which may predate a registration by the debounce window).
        wait::until("path serves", TIMEOUT, || async move {
            client::get(bind, "catalog", "/")
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU32::new(0));
        let failed = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            let mut c = client::h1(bind).await.unwrap();
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match c.get("catalog", "/").await {
                        Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        Ok(r) => {
                            eprintln!("failed request: {} {:?}", r.status, r.header("sinew-error"));
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(e) => {
                            // The connection is gone: count it once and stop, rather
                            // than spin on a dead connection.
                            eprintln!("failed request: {e}");
                            failed.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    };
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

    fn ok(&self) -> u32 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits for `n` more successful requests.
    async fn progress(&self, n: u32) {
        let target = self.ok() + n;
        wait::until("load makes progress", TIMEOUT, || async move {
            self.ok() >= target
        })
        .await
        .unwrap();
    }

    async fn finish(self) -> (u32, u32) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_moves_traffic_with_no_failed_request_in_flight() {
    let scratch = Scratch::new();
    // A long debounce, so propagation latency measured from the change shows it.
    let cp = Control::start(
        &scratch.0.join("data"),
        free_addr(),
        &["--debounce-ms", "200"],
    )
    .await;
    let v1 = HttpBackend::start("v1").await.unwrap();
    let v2 = HttpBackend::start("v2").await.unwrap();
    let bind = free_addr();
    let base = format!(
        "{}{}{}{}{}{}",
        service("shop", "catalog"),
        service("shop", "catalog-v1"),
        service("shop", "catalog-v2"),
        static_workload("shop", "v1", "catalog-v1", v1.addr()),
        static_workload("shop", "v2", "catalog-v2", v2.addr()),
        proxy_doc("shop", "web", &[(bind, "catalog")]),
    );
    let f = scratch.write(
        "mesh.yaml",
        &format!("{base}{}", route_to("shop", "catalog", "catalog-v1")),
    );
    let out = cp.sinew(&["apply", "-f", f.to_str().unwrap()]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(text(&out).0.contains("HTTPRoute shop/catalog created"));
    let web = proxy(&cp, "shop/web", None, Duration::from_millis(50)).await;
    let load = Load::start(bind, 4).await;
    load.progress(50).await;
    assert_eq!(v2.requests(), 0);

    let f = scratch.write(
        "mesh.yaml",
        &format!("{base}{}", route_to("shop", "catalog", "catalog-v2")),
    );
    let out = cp.sinew(&["apply", "-f", f.to_str().unwrap()]).await;
    assert!(
        text(&out).0.contains("HTTPRoute shop/catalog configured"),
        "{:?}",
        text(&out)
    );
    // Traffic follows within a bound (generous: this is not a timing test).
    wait::until("traffic reaches v2", Duration::from_secs(10), || async {
        v2.requests() > 0
    })
    .await
    .unwrap();
    // Requests already in flight to v1 when the route moved still land there: let
    // them finish (each client has sent more since) before counting.
    load.progress(20).await;
    let settled = v1.requests();
    load.progress(50).await;
    assert_eq!(
        v1.requests(),
        settled,
        "v1 gets nothing once the route moved"
    );
    let (ok, failed) = load.finish().await;
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    let out = cp.sinew(&["check"]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    // proxy-status tells how long the change took to be ACKed: from the apply, so
    // at least the debounce.
    let (s, _) = text(&cp.sinew(&["proxy-status", "-A", "-o", "json"]).await);
    let v: serde_json::Value = serde_json::from_str(&s).unwrap();
    let web_status = v
        .as_array()
        .and_then(|a| a.iter().find(|p| p["proxy"] == "shop/web"))
        .unwrap_or_else(|| panic!("{s}"));
    assert_eq!(web_status["inSync"], true, "{s}");
    let ack = web_status["ackMs"].as_u64().unwrap_or(0);
    assert!(ack >= 200, "propagation measured from the change: {ack} ms");
    web.shutdown().await;
}

/// Addresses of the bulk service's endpoints that the proxy's running config holds.
async fn bulk_endpoints(p: &sinew_proxy::Proxy) -> std::collections::BTreeSet<String> {
    let config = client::get(p.admin_addr(), "admin", "/config")
        .await
        .map(|r| r.text())
        .unwrap_or_default();
    config
        .split('"')
        .filter(|s| s.starts_with("10.9."))
        .map(|s| s.split(':').next().unwrap_or(s).to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_sent_in_parts_arrives_whole_full_and_as_a_delta() {
    // 300 endpoints make a full push of about 60 KiB: the control plane sends it in
    // parts of 8 KiB, and the proxy must apply it only once whole.
    let scratch = Scratch::new();
    let cp = Control::start(&scratch.0.join("data"), free_addr(), &[]).await;
    let backend = HttpBackend::start("catalog").await.unwrap();
    let (bind, bulk_bind) = (free_addr(), free_addr());
    let bulk: String = (0..300)
        .map(|i| {
            let addr: std::net::SocketAddr = format!("10.9.{}.{}:80", i / 200, i % 200 + 1)
                .parse()
                .unwrap();
            static_workload("shop", &format!("bulk-{i}"), "bulk", addr)
        })
        .collect();
    let base = format!(
        "{}{}{}{}",
        service("shop", "catalog"),
        service("shop", "bulk"),
        static_workload("shop", "c1", "catalog", backend.addr()),
        proxy_doc("shop", "web", &[(bind, "catalog"), (bulk_bind, "bulk")]),
    );
    let f = scratch.write("mesh.yaml", &format!("{base}{bulk}"));
    let out = cp.sinew(&["apply", "-f", f.to_str().unwrap()]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    let web = proxy(&cp, "shop/web", None, Duration::from_millis(50)).await;
    wait::until("all 300 endpoints applied", TIMEOUT, || async {
        bulk_endpoints(&web).await.len() == 300
    })
    .await
    .unwrap();
    let load = Load::start(bind, 2).await;
    load.progress(20).await;
    // A delta: one endpoint gone, every other unchanged.
    let out = cp
        .sinew(&["delete", "workload", "bulk-7", "-n", "shop"])
        .await;
    assert!(out.status.success(), "{:?}", text(&out));
    wait::until("the removal applied", TIMEOUT, || async {
        let held = bulk_endpoints(&web).await;
        held.len() == 299 && !held.contains("10.9.0.8")
    })
    .await
    .unwrap();
    let (s, _) = text(&cp.sinew(&["proxy-status", "-A", "-o", "json"]).await);
    let v: serde_json::Value = serde_json::from_str(&s).unwrap();
    assert_eq!(v[0]["inSync"], true, "{s}");
    let (ok, failed) = load.finish().await;
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    web.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_push_leaves_traffic_alone_and_check_reports_it() {
    let scratch = Scratch::new();
    let cp = Control::start(&scratch.0.join("data"), free_addr(), &[]).await;
    let app = HttpBackend::start("app").await.unwrap();
    let (bind, busy) = (free_addr(), app.addr());
    let base = format!(
        "{}{}",
        service("shop", "catalog"),
        static_workload("shop", "c1", "catalog", app.addr())
    );
    let f = scratch.write(
        "a.yaml",
        &format!("{base}{}", proxy_doc("shop", "web", &[(bind, "catalog")])),
    );
    assert!(
        cp.sinew(&["apply", "-f", f.to_str().unwrap()])
            .await
            .status
            .success()
    );
    let web = proxy(&cp, "shop/web", None, Duration::from_millis(50)).await;
    let load = Load::start(bind, 2).await;
    load.progress(20).await;

    // A second binding on a port that is taken: valid to the control plane, refused by the proxy.
    let f = scratch.write(
        "a.yaml",
        &format!(
            "{base}{}",
            proxy_doc("shop", "web", &[(bind, "catalog"), (busy, "catalog")])
        ),
    );
    assert!(
        cp.sinew(&["apply", "-f", f.to_str().unwrap()])
            .await
            .status
            .success()
    );
    wait::until("NACK recorded", TIMEOUT, || async {
        text(&cp.sinew(&["proxy-status", "-A"]).await)
            .0
            .contains("NACKED")
    })
    .await
    .unwrap();
    let (status, _) = text(&cp.sinew(&["proxy-status", "-A"]).await);
    assert!(
        status.contains(&format!("cannot listen on {busy}")),
        "{status}"
    );
    let check = cp.sinew(&["check", "--wait", "0"]).await;
    assert!(!check.status.success());
    let (out, _) = text(&check);
    assert!(
        out.contains("FAIL proxies in sync: 1 of 1 behind: shop/web (refused: cannot listen on"),
        "{out}"
    );
    assert!(out.contains("PASS store healthy"), "{out}");
    load.progress(20).await;

    // The fix is applied and the proxy catches up.
    let f = scratch.write(
        "a.yaml",
        &format!("{base}{}", proxy_doc("shop", "web", &[(bind, "catalog")])),
    );
    assert!(
        cp.sinew(&["apply", "-f", f.to_str().unwrap()])
            .await
            .status
            .success()
    );
    let check = cp.sinew(&["check", "--wait", "10"]).await;
    assert!(check.status.success(), "{:?}", text(&check));
    let (ok, failed) = load.finish().await;
    assert_eq!(failed, 0, "{failed} of {} failed", ok + failed);
    web.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_down_fails_no_request_and_a_restart_resyncs_without_dropping_endpoints() {
    let scratch = Scratch::new();
    let data = scratch.0.join("data");
    let cp_addr = free_addr();
    let cp = Control::start(&data, cp_addr, &[]).await;
    let app = HttpBackend::start("app").await.unwrap();
    let (bind, inbound) = (free_addr(), free_addr());
    let f = scratch.write(
        "m.yaml",
        &format!(
            "{}{}",
            service("shop", "catalog"),
            proxy_doc("shop", "web", &[(bind, "catalog")])
        ),
    );
    assert!(
        cp.sinew(&["apply", "-f", f.to_str().unwrap()])
            .await
            .status
            .success()
    );
    // The catalog sidecar reconnects slowly, so after the restart the web proxy is
    // resynced while catalog's registration is known only from the store.
    let catalog = proxy(
        &cp,
        "shop/catalog-1",
        Some(registration("catalog", app.addr(), inbound, "v1")),
        Duration::from_secs(3),
    )
    .await;
    let web = proxy(&cp, "shop/web", None, Duration::from_millis(50)).await;
    wait::until("in sync", TIMEOUT, || async { cp.all_in_sync(2).await })
        .await
        .unwrap();
    let load = Load::start(bind, 4).await;
    load.progress(50).await;

    cp.kill().await;
    load.progress(200).await; // serving on what they have

    let cp = Control::start(&data, cp_addr, &[]).await;
    wait::until("web resynced", TIMEOUT, || async {
        let (s, _) = text(&cp.sinew(&["proxy-status", "-A", "-o", "json"]).await);
        serde_json::from_str::<serde_json::Value>(&s).is_ok_and(|v| {
            v.as_array().is_some_and(|a| {
                a.iter()
                    .any(|p| p["proxy"] == "shop/web" && p["inSync"] == true)
            })
        })
    })
    .await
    .unwrap();
    load.progress(100).await;
    wait::until("both in sync", TIMEOUT, || async {
        cp.all_in_sync(2).await
    })
    .await
    .unwrap();
    load.progress(50).await;
    let (ok, failed) = load.finish().await;
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed across the outage and restart",
        ok + failed
    );
    web.shutdown().await;
    catalog.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_resources_survive_kill_9() {
    let scratch = Scratch::new();
    let data = scratch.0.join("data");
    let addr = free_addr();
    let cp = Control::start(&data, addr, &[]).await;
    let mut yaml = String::new();
    for i in 0..30 {
        yaml.push_str(&service(&format!("ns{}", i % 3), &format!("svc-{i}")));
    }
    yaml.push_str(&route_to("ns0", "svc-0", "svc-3"));
    let f = scratch.write("many.yaml", &yaml);
    assert!(
        cp.sinew(&["apply", "-f", f.to_str().unwrap()])
            .await
            .status
            .success()
    );
    let out = cp.sinew(&["delete", "service", "svc-1", "-n", "ns1"]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    let before = text(&cp.sinew(&["get", "all", "-A", "-o", "json"]).await).0;
    cp.kill().await;
    let cp = Control::start(&data, addr, &[]).await;
    let after = text(&cp.sinew(&["get", "all", "-A", "-o", "json"]).await).0;
    let items: serde_json::Value = serde_json::from_str(&after).unwrap();
    assert_eq!(
        items.as_array().map(Vec::len),
        Some(30),
        "29 services and a route"
    );
    assert_eq!(before, after);
}

/// `sinew-proxy` (built next to `sinew`), run with `args`.
fn sinew_proxy(args: &[&str]) -> std::process::Output {
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_sinew")).with_file_name("sinew-proxy");
    assert!(
        binary.is_file(),
        "this test runs the real sinew-proxy and needs {} (`cargo build --bins`)",
        binary.display()
    );
    Command::new(binary).args(args).output().unwrap()
}

/// An apply of no documents is refused naming the file, by the CLI and by the API;
/// one over the control plane's message limit is refused naming the file, its size
/// and the limit, and `sinew-proxy --check` draws the line at the same byte: the
/// largest file it passes, the control plane takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_or_oversized_apply_is_refused_naming_the_file_size_and_limit() {
    use sinew_api::limits::{MAX_MESSAGE_BYTES, apply_bytes};
    let scratch = Scratch::new();
    let cp = Control::start(&scratch.0.join("data"), free_addr(), &[]).await;

    let empty = scratch.write("empty.yaml", "# nothing here yet\n---\n");
    let out = cp.sinew(&["apply", "-f", empty.to_str().unwrap()]).await;
    assert!(!out.status.success(), "{:?}", text(&out));
    assert!(
        text(&out)
            .1
            .contains(&format!("{}: no documents", empty.display())),
        "{:?}",
        text(&out)
    );
    // The control plane refuses it too, for callers other than the CLI.
    let mut admin = cp.admin().await;
    let e = admin
        .apply(sinew_api::v1::ApplyRequest {
            sources: vec![sinew_api::v1::Source {
                label: "api.yaml".into(),
                text: "\n".into(),
            }],
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("api.yaml: no documents"), "{e:?}");
    let e = admin
        .apply(sinew_api::v1::ApplyRequest::default())
        .await
        .unwrap_err();
    assert!(e.message().contains("nothing to apply"), "{e:?}");

    // A valid mesh (so the check passes on content), padded with a comment.
    let docs = format!(
        "{}{}",
        service("shop", "catalog"),
        proxy_doc("shop", "load", &[(free_addr(), "catalog")])
    );
    let padded = |len: usize| {
        let mut t = docs.clone();
        t.push_str("# ");
        t.push_str(&"p".repeat(len - t.len()));
        t
    };
    let big = scratch.write("big.yaml", &padded(5 * 1024 * 1024));
    let big_s = big.to_str().unwrap();
    let out = cp.sinew(&["apply", "-f", big_s]).await;
    assert!(!out.status.success());
    let why = format!(
        "{big_s}: 5242880 bytes, more than the control plane accepts in one apply ({MAX_MESSAGE_BYTES} bytes"
    );
    assert!(text(&out).1.contains(&why), "{:?}", text(&out));
    let out = sinew_proxy(&["--check", "--config", big_s]);
    assert!(!out.status.success());
    assert!(text(&out).1.contains(&why), "{:?}", text(&out));

    // The boundary: the largest file whose apply fits, and one byte more.
    let edge = scratch.0.join("edge.yaml");
    let edge_s = edge.to_str().unwrap();
    let mut len = MAX_MESSAGE_BYTES - 64;
    while apply_bytes([(edge_s, padded(len + 1).as_str())]) <= MAX_MESSAGE_BYTES {
        len += 1;
    }
    std::fs::write(&edge, padded(len)).unwrap();
    let out = sinew_proxy(&["--check", "--config", edge_s]);
    assert!(out.status.success(), "{:?}", text(&out));
    let out = cp.sinew(&["apply", "--dry-run", "-f", edge_s]).await;
    assert!(
        out.status.success(),
        "the control plane takes it: {:?}",
        text(&out)
    );
    std::fs::write(&edge, padded(len + 1)).unwrap();
    let out = sinew_proxy(&["--check", "--config", edge_s]);
    assert!(!out.status.success(), "{:?}", text(&out));
    assert!(
        text(&out)
            .1
            .contains(&format!("{edge_s}: {} bytes", len + 1))
    );
    let out = cp.sinew(&["apply", "--dry-run", "-f", edge_s]).await;
    assert!(!out.status.success(), "{:?}", text(&out));
    assert!(
        text(&out)
            .1
            .contains(&format!("{edge_s}: {} bytes", len + 1))
    );
    // And the control plane itself refuses that byte more.
    let e = admin
        .apply(sinew_api::v1::ApplyRequest {
            sources: vec![sinew_api::v1::Source {
                label: edge_s.into(),
                text: padded(len + 1),
            }],
            dry_run: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");

    // Files that fit alone but not together: the apply says to split it.
    let half = scratch.write("half.yaml", &padded(3 * 1024 * 1024));
    let other = scratch.write("other.yaml", &padded(3 * 1024 * 1024));
    let out = cp
        .sinew(&[
            "apply",
            "-f",
            half.to_str().unwrap(),
            "-f",
            other.to_str().unwrap(),
        ])
        .await;
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("2 files together are")
            && text(&out).1.contains("apply them in parts"),
        "{:?}",
        text(&out)
    );
}

/// A tmpfs mounted at a directory (we run as root), unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .expect("mount(8) is needed for this test");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs at {} (this test needs root): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: the killed control plane may still hold the database open a moment.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem holding `dir` with one file until a write fails with ENOSPC.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    loop {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // Byte by byte the last partial chunk: not a byte is left.
    while f.write_all(&[0]).is_ok() {}
    path
}

/// The store survives a transient write error (a full disk) without a restart: the
/// apply that hit it is refused whole, `sinew check` fails while writes fail, and
/// once space is freed the next apply is stored; what was applied before is kept
/// on disk, and the refused apply left nothing behind (the revision says so too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_heals_after_a_full_disk_without_a_restart() {
    let scratch = Scratch::new();
    let data = scratch.0.join("data");
    let _tmpfs = Tmpfs::mount(&data, "24m");
    let addr = free_addr();
    let cp = Control::start(&data, addr, &[]).await;
    let before = scratch.write("before.yaml", &service("shop", "before"));
    let out = cp.sinew(&["apply", "-f", before.to_str().unwrap()]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    // Large enough to need fresh pages in the database file.
    let mut yaml = String::new();
    for i in 0..1500 {
        yaml.push_str(&service("bulk", &format!("svc-{i}")));
    }
    let bulk = scratch.write("bulk.yaml", &yaml);

    let filler = fill(&data);
    let out = cp.sinew(&["apply", "-f", bulk.to_str().unwrap()]).await;
    let (_, err) = text(&out);
    assert!(!out.status.success(), "applied onto a full disk: {err}");
    assert!(
        err.contains("nothing was applied") && err.contains("No space left on device"),
        "{err}"
    );
    let out = cp.sinew(&["check"]).await;
    let (stdout, _) = text(&out);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("FAIL store") && stdout.contains("No space left on device"),
        "{stdout}"
    );
    assert!(
        stdout.contains("revision 1)"),
        "the refused apply made no revision: {stdout}"
    );

    // The disk has room again: the same control plane takes the next apply.
    std::fs::remove_file(&filler).unwrap();
    let out = cp.sinew(&["check"]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(
        text(&out).0.contains("PASS store healthy"),
        "{:?}",
        text(&out)
    );
    let out = cp.sinew(&["apply", "-f", bulk.to_str().unwrap()]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(text(&out).1.contains("revision 2"), "{:?}", text(&out));

    // On disk: the first document, the bulk, and nothing of the refused attempt.
    cp.kill().await;
    let cp = Control::start(&data, addr, &[]).await;
    let all = text(&cp.sinew(&["get", "svc", "-A", "-o", "json"]).await).0;
    let items: serde_json::Value = serde_json::from_str(&all).unwrap();
    let names: std::collections::BTreeSet<String> = items
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names.len(), 1501, "one before, 1500 after");
    assert!(names.contains("before") && names.contains("svc-1499"));
    let out = cp.sinew(&["check"]).await;
    assert!(text(&out).0.contains("revision 2)"), "{:?}", text(&out));
}

/// A proxy whose first configuration is refused (one of its bindings is on a port
/// that is taken: only the proxy can know) stays unready and keeps asking for a
/// full configuration; once the document is fixed it gets one, whole, and is ready.
/// Deltas built on the refused push would be applied to nothing and refused forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_refused_its_first_config_heals_when_it_is_fixed() {
    let scratch = Scratch::new();
    let cp = Control::start(&scratch.0.join("data"), free_addr(), &[]).await;
    let app = HttpBackend::start("app").await.unwrap();
    let (bind, busy) = (free_addr(), app.addr());
    let base = format!(
        "{}{}{}",
        service("shop", "catalog"),
        service("shop", "other"),
        static_workload("shop", "c1", "catalog", app.addr())
    );
    let bad = proxy_doc("shop", "web", &[(bind, "catalog"), (busy, "catalog")]);
    let f = scratch.write("a.yaml", &format!("{base}{bad}"));
    let out = cp.sinew(&["apply", "-f", f.to_str().unwrap()]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    // Its first push must be the refused one: connecting before the apply is
    // published, it would get (and accept) the empty mesh before it.
    let revision: u64 = text(&out)
        .1
        .split_whitespace()
        .skip_while(|w| *w != "revision")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no revision in {:?}", text(&out)));
    cp.published(revision).await;
    let web = proxy_unready(&cp, "shop/web", Duration::from_millis(50)).await;
    wait::until("the first push is refused", TIMEOUT, || async {
        text(&cp.sinew(&["proxy-status", "-A"]).await)
            .0
            .contains(&format!("cannot listen on {busy}"))
    })
    .await
    .unwrap();
    let (status, body) = ready(&web).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(&format!("cannot listen on {busy}")), "{body}");

    // A change elsewhere in its view (another upstream's service) while it is still
    // refused: still refused for the same reason, never for a missing base.
    let f = scratch.write(
        "a.yaml",
        &format!(
            "{base}{}",
            proxy_doc(
                "shop",
                "web",
                &[(bind, "catalog"), (busy, "catalog"), (free_addr(), "other")]
            )
        ),
    );
    let out = cp.sinew(&["apply", "-f", f.to_str().unwrap()]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    wait::until("the changed push is refused too", TIMEOUT, || async {
        nacked(&web).await == 2
    })
    .await
    .unwrap();
    let (status, body) = ready(&web).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&format!("cannot listen on {busy}")),
        "refused for what it holds, not for a missing base: {body}"
    );

    // Fixed: the next push is full, the proxy takes it and is ready; traffic flows.
    let f = scratch.write(
        "a.yaml",
        &format!("{base}{}", proxy_doc("shop", "web", &[(bind, "catalog")])),
    );
    let out = cp.sinew(&["apply", "-f", f.to_str().unwrap()]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    wait::until("the proxy is ready", TIMEOUT, || async {
        ready(&web).await.0 == 200
    })
    .await
    .unwrap();
    let r = client::get(bind, "catalog", "/").await.unwrap();
    assert_eq!(r.status, 200);
    let check = cp.sinew(&["check", "--wait", "10"]).await;
    assert!(check.status.success(), "{:?}", text(&check));
    web.shutdown().await;
}

/// What every proxy would refuse is refused at `sinew apply`, naming the document,
/// the field and the reason: a backend port the Service does not have (given, or
/// defaulted from the parent's), and a change to a Service that would leave a route
/// on a port it no longer has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_refuses_a_route_every_proxy_would_refuse() {
    let scratch = Scratch::new();
    let cp = Control::start(&scratch.0.join("data"), free_addr(), &[]).await;
    let svc = |name: &str, port: u16| {
        format!(
            "---\napiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  ports: [{{name: http, port: {port}}}]\n"
        )
    };
    let good = scratch.write(
        "good.yaml",
        &format!("{}{}", svc("catalog", 8080), svc("catalog-v2", 8080)),
    );
    let out = cp.sinew(&["apply", "-f", good.to_str().unwrap()]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    let route = |backend: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\nspec:\n  parentRefs: [{{name: catalog}}]\n  rules:\n    - backendRefs: [{backend}]\n"
        )
    };
    for (file, body, expected) in [
        (
            "port.yaml",
            route("{name: catalog-v2, port: 9999}"),
            "port.yaml:1: HTTPRoute shop/r: spec.rules[0].backendRefs[0].port: service shop/catalog-v2 has no port 9999",
        ),
        (
            "other.yaml",
            format!("{}---\n{}", svc("other", 9090), route("{name: other}")),
            "HTTPRoute shop/r: spec.rules[0].backendRefs[0].port: service shop/other has no port 8080 (the port defaults to the parent's port 8080",
        ),
    ] {
        let f = scratch.write(file, &body);
        let out = cp.sinew(&["apply", "-f", f.to_str().unwrap()]).await;
        let (_, err) = text(&out);
        assert!(!out.status.success(), "{file} was accepted");
        assert!(
            err.contains(expected),
            "{file}: expected {expected:?} in:\n{err}"
        );
    }
    let (all, _) = text(&cp.sinew(&["get", "all", "-A"]).await);
    assert!(
        !all.contains("other"),
        "nothing of a refused apply is kept:\n{all}"
    );

    // A good route, then a change of its backend's port that would break it.
    let f = scratch.write("route.yaml", &route("{name: catalog-v2}"));
    let out = cp.sinew(&["apply", "-f", f.to_str().unwrap()]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    let f = scratch.write("v2.yaml", &svc("catalog-v2", 9090));
    let out = cp.sinew(&["apply", "-f", f.to_str().unwrap()]).await;
    assert!(!out.status.success(), "the Service change was accepted");
    let (_, err) = text(&out);
    assert!(
        err.contains("HTTPRoute shop/r: spec.rules[0].backendRefs[0].port: service shop/catalog-v2 has no port 8080"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_whole_with_file_line_field_and_reason() {
    let scratch = Scratch::new();
    let cp = Control::start(&scratch.0.join("data"), free_addr(), &[]).await;
    let good = scratch.write("good.yaml", &service("shop", "catalog"));
    assert!(
        cp.sinew(&["apply", "-f", good.to_str().unwrap()])
            .await
            .status
            .success()
    );
    let route = |body: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\nspec:\n  parentRefs: [{{name: catalog}}]\n  rules:\n{body}"
        )
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("bad-yaml.yaml", "apiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {name: [\n".into(), "bad-yaml.yaml:4: invalid YAML: did not find expected node content"),
        ("unknown-kind.yaml", "apiVersion: sinew.dev/v1alpha1\nkind: Gadget\nmetadata: {name: g}\n".into(), "unknown-kind.yaml:1: kind: unknown kind \"Gadget\""),
        ("unknown-field.yaml", "apiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {name: s, namespace: shop}\nspec:\n  ports: [{name: http, port: 80}]\n  colour: blue\n".into(), "unknown-field.yaml:6: spec.colour: unknown field `colour`"),
        ("missing-service.yaml", route("    - backendRefs: [{name: ghost}]\n"), "missing-service.yaml:1: HTTPRoute shop/r: spec.rules[0].backendRefs[0].name: service shop/ghost does not exist"),
        ("zero-weights.yaml", route("    - backendRefs: [{name: catalog, weight: 0}]\n"), "spec.rules[0].backendRefs: all backend weights are zero"),
        ("bad-regex.yaml", route("    - matches: [{path: {type: RegularExpression, value: \"/(a\"}}]\n"), "spec.rules[0].matches[0].path.value: invalid regular expression: unclosed group"),
        // YAML as a user writes it (the line numbers are what is tested).
        ("duplicate.yaml", "---\napiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {name: dup, namespace: shop}\nspec:\n  ports: [{name: http, port: 80}]\n".repeat(2), "duplicate.yaml:8: Service shop/dup: metadata.name: duplicate Service shop/dup: already defined at"),
    ];
    for (file, body, expected) in cases {
        let f = scratch.write(file, &body);
        // Alongside a good document: the apply is all or nothing.
        let extra = scratch.write("extra.yaml", &service("shop", "innocent"));
        let out = cp
            .sinew(&[
                "apply",
                "-f",
                f.to_str().unwrap(),
                "-f",
                extra.to_str().unwrap(),
            ])
            .await;
        let (_, err) = text(&out);
        assert!(!out.status.success(), "{file} was accepted");
        assert!(
            err.contains(expected),
            "{file}: expected {expected:?} in:\n{err}"
        );
        assert_eq!(
            err.lines().next(),
            Some("error: refused; nothing was changed:"),
            "{err}"
        );
    }
    let (all, _) = text(&cp.sinew(&["get", "all", "-A"]).await);
    assert!(
        !all.contains("innocent"),
        "nothing of a refused apply is kept:\n{all}"
    );
    // Deleting what others need is refused too.
    let f = scratch.write("route.yaml", &route_to("shop", "catalog", "catalog"));
    assert!(
        cp.sinew(&["apply", "-f", f.to_str().unwrap()])
            .await
            .status
            .success()
    );
    let out = cp.sinew(&["delete", "svc", "catalog", "-n", "shop"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out)
            .1
            .contains("spec.parentRefs[0].name: service shop/catalog does not exist"),
        "{:?}",
        text(&out)
    );
}

/// A registering sidecar is ready only once its inbound listener is up: its first
/// push waits for the control plane to publish its registration. A long debounce
/// makes that wait long enough to see: without it, the first push would come from
/// the state before the registration, with no inbound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registering_sidecar_is_ready_with_its_inbound_up() {
    let scratch = Scratch::new();
    let cp = Control::start(
        &scratch.0.join("data"),
        free_addr(),
        &["--debounce-ms", "1000"],
    )
    .await;
    let f = scratch.write("s.yaml", &service("shop", "catalog"));
    assert!(
        cp.sinew(&["apply", "-f", f.to_str().unwrap()])
            .await
            .status
            .success()
    );
    let app = HttpBackend::start("app").await.unwrap();
    let inbound = free_addr();
    let _p = proxy(
        &cp,
        "shop/catalog-1",
        Some(registration("catalog", app.addr(), inbound, "v1")),
        Duration::from_millis(50),
    )
    .await;
    // Ready: the inbound (mTLS only: the proxy has its identity) accepts at once,
    // with no waiting for it.
    tokio::net::TcpStream::connect(inbound)
        .await
        .unwrap_or_else(|e| panic!("the ready sidecar's inbound {inbound}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_proxy_is_unregistered_after_the_grace_period() {
    let scratch = Scratch::new();
    let cp = Control::start(
        &scratch.0.join("data"),
        free_addr(),
        &["--grace-period", "1"],
    )
    .await;
    let f = scratch.write("s.yaml", &service("shop", "catalog"));
    assert!(
        cp.sinew(&["apply", "-f", f.to_str().unwrap()])
            .await
            .status
            .success()
    );
    let app = HttpBackend::start("app").await.unwrap();
    let p = proxy(
        &cp,
        "shop/catalog-1",
        Some(registration("catalog", app.addr(), free_addr(), "v2")),
        Duration::from_millis(50),
    )
    .await;
    let (wl, _) = text(
        &cp.sinew(&["get", "workload", "catalog-1", "-n", "shop", "-o", "yaml"])
            .await,
    );
    assert!(
        wl.contains("version: v2") && wl.contains("service: catalog"),
        "{wl}"
    );
    let (status, _) = text(&cp.sinew(&["proxy-status", "-A"]).await);
    assert!(
        status.contains("shop/catalog-1") && status.contains("yes"),
        "{status}"
    );
    p.shutdown().await;
    wait::until("unregistered", TIMEOUT, || async {
        !text(&cp.sinew(&["get", "workload", "-A"]).await)
            .0
            .contains("catalog-1")
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_directory_is_watched_and_owns_its_documents() {
    let scratch = Scratch::new();
    let dir = scratch.0.join("conf");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.yaml"), service("shop", "from-dir-a")).unwrap();
    let cp = Control::start(
        &scratch.0.join("data"),
        free_addr(),
        &["--config-dir", dir.to_str().unwrap()],
    )
    .await;
    wait::until("dir applied", TIMEOUT, || async {
        text(&cp.sinew(&["get", "svc", "-A"]).await)
            .0
            .contains("from-dir-a")
    })
    .await
    .unwrap();
    std::fs::write(dir.join("b.yml"), service("shop", "from-dir-b")).unwrap();
    std::fs::remove_file(dir.join("a.yaml")).unwrap();
    wait::until("dir change applied", TIMEOUT, || async {
        let (s, _) = text(&cp.sinew(&["get", "svc", "-A"]).await);
        s.contains("from-dir-b") && !s.contains("from-dir-a")
    })
    .await
    .unwrap();
    let (s, _) = text(&cp.sinew(&["get", "svc", "from-dir-b", "-n", "shop"]).await);
    assert!(s.contains(" dir "), "source column says dir: {s}");
    // A broken directory is refused whole and reported by check.
    std::fs::write(dir.join("c.yaml"), "apiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {name: c, namespace: shop}\nspec: {ports: [{name: http, port: 0}]}\n").unwrap();
    wait::until("check reports the directory", TIMEOUT, || async {
        text(&cp.sinew(&["check", "--wait", "0"]).await)
            .0
            .contains("FAIL config directory applied")
    })
    .await
    .unwrap();
    assert!(
        text(&cp.sinew(&["get", "svc", "-A"]).await)
            .0
            .contains("from-dir-b")
    );
}

/// The README's scripts find the binaries where cargo puts them: `scripts/target-dir`
/// (what demo/run.sh, demo/standalone.sh and demo/capture.sh use) follows
/// `CARGO_TARGET_DIR`, and no script names `target/debug` as where its build went.
#[test]
fn the_demo_scripts_find_binaries_wherever_cargo_builds_them() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let elsewhere = std::env::temp_dir().join(format!("sinew-target-{}", std::process::id()));
    let out = Command::new(root.join("scripts/target-dir"))
        .env("CARGO_TARGET_DIR", &elsewhere)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        elsewhere.to_string_lossy()
    );
    let out = Command::new(root.join("scripts/target-dir"))
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap();
    // `target/` need not exist: the suite itself may run with CARGO_TARGET_DIR elsewhere.
    let default = std::fs::canonicalize(&root).unwrap().join("target");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        default.to_string_lossy(),
        "{out:?}"
    );
    for script in ["demo/run.sh", "demo/standalone.sh", "demo/capture.sh"] {
        let text = std::fs::read_to_string(root.join(script)).unwrap();
        assert!(text.contains("scripts/target-dir"), "{script}");
        for line in text.lines().filter(|l| l.contains("cargo build")) {
            assert!(
                !line.contains("--quiet"),
                "{script}: the build shows its progress: {line}"
            );
        }
    }
}

/// `sinew-proxy` with neither mode names both, and its help is grouped by mode.
#[test]
fn sinew_proxy_without_a_mode_names_both_and_groups_its_help_by_mode() {
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_sinew")).with_file_name("sinew-proxy");
    let out = Command::new(&binary)
        .env_remove("SINEW_PROXY_CONFIG")
        .env_remove("SINEW_CONTROL_PLANE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--config") && err.contains("--control-plane"),
        "{err}"
    );
    let help = Command::new(&binary).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let at = |h: &str| {
        help.find(h)
            .unwrap_or_else(|| panic!("no {h:?} in\n{help}"))
    };
    // Each flag under its mode's heading.
    assert!(
        at("Standalone mode") < at("-c, --config") && at("-c, --config") < at("Control-plane mode")
    );
    assert!(at("Control-plane mode") < at("--join-token-file"));
    assert!(at("Transparent capture") < at("--capture-dns-port"));
    assert!(at("Every mode") < at("--max-connections"));
}

/// Output to a reader that is already gone (`sinew completions bash | head -1`, the
/// reader closed before the first write) ends the command quietly with success: no
/// panic, no message. The read end is closed before the child can write, so every
/// write fails with EPIPE.
#[test]
fn output_to_a_closed_pipe_ends_quietly_never_with_a_panic() {
    for args in [
        &["completions", "bash"][..],
        &["completions", "zsh"][..],
        &["install", "--kubernetes"][..],
        &["version"][..],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sinew"))
            .args(args)
            .env("SINEW_SERVER", "https://127.0.0.1:9")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !err.contains("panicked"),
            "sinew {}: {:?}\n{err}",
            args.join(" "),
            out.status
        );
    }
    // Through a real `head -1`, as a user types it.
    let sh = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; '{}' completions bash | head -1",
            env!("CARGO_BIN_EXE_sinew")
        ))
        .output()
        .unwrap();
    assert!(
        sh.status.success() && !String::from_utf8_lossy(&sh.stderr).contains("panicked"),
        "{sh:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_basics_version_completions_and_unreachable_server() {
    let out = sinew_at("https://127.0.0.1:9", &["version"]).await;
    assert!(text(&out).0.starts_with("sinew "));
    let out = sinew_at("https://127.0.0.1:9", &["completions", "bash"]).await;
    assert!(out.status.success() && text(&out).0.contains("proxy-status"));
    // No credential anywhere: said before anything is dialled.
    let out = sinew_at("https://127.0.0.1:9", &["get", "svc"]).await;
    assert!(!out.status.success());
    let (_, err) = text(&out);
    assert!(
        err.starts_with(
            "error: no operator credential: pass --credentials FILE or set SINEW_CREDENTIALS"
        ),
        "{err}"
    );
    // A credential, and nobody at the address.
    let scratch = Scratch::new();
    let cp = Control::start(&scratch.0.join("data"), free_addr(), &[]).await;
    let out = sinew_as(
        "https://127.0.0.1:9",
        Some(&cp.credentials),
        &["get", "svc"],
    )
    .await;
    assert!(!out.status.success());
    let (_, err) = text(&out);
    assert!(
        err.starts_with("error: cannot reach the control plane at https://127.0.0.1:9 (")
            && err.contains("is `sinew control` running? set --server or SINEW_SERVER)"),
        "{err}"
    );
    // Plaintext is not a way in: the CLI says so, and the server refuses it anyway.
    let plain = format!("http://{}", cp.addr);
    let out = sinew_as(&plain, Some(&cp.credentials), &["get", "svc"]).await;
    assert!(!out.status.success());
    assert_eq!(
        text(&out).1.trim(),
        format!(
            "error: {plain}: the control plane serves TLS only; use https://{}",
            cp.addr
        )
    );
    let out = sinew_as("https://127.0.0.1:9", Some(&cp.credentials), &["check"]).await;
    assert!(!out.status.success());
    assert!(text(&out).0.starts_with("FAIL control plane reachable"));
}

/// A mesh with identities: web → catalog, both with certificates.
struct IdentityMesh {
    _scratch: Scratch,
    cp: Control,
    app: HttpBackend,
    web: sinew_proxy::Proxy,
    catalog: sinew_proxy::Proxy,
    bind: std::net::SocketAddr,
    inbound: std::net::SocketAddr,
    data: std::path::PathBuf,
}

async fn identity_mesh(extra: &[&str]) -> IdentityMesh {
    let scratch = Scratch::new();
    let data = scratch.0.join("data");
    let cp = Control::start(&data, free_addr(), extra).await;
    let app = HttpBackend::start("catalog-app").await.unwrap();
    let (bind, inbound) = (free_addr(), free_addr());
    let f = scratch.write(
        "m.yaml",
        &format!(
            "{}{}",
            service("shop", "catalog"),
            proxy_doc("shop", "web", &[(bind, "catalog")])
        ),
    );
    assert!(
        cp.sinew(&["apply", "-f", f.to_str().unwrap()])
            .await
            .status
            .success()
    );
    let (t_web, t_cat) = (
        token(&cp, "shop", "web").await,
        token(&cp, "shop", "catalog").await,
    );
    let catalog = proxy_with_token(
        &cp,
        "shop/catalog-1",
        Some(registration("catalog", app.addr(), inbound, "v1")),
        Duration::from_millis(50),
        Some(t_cat),
    )
    .await;
    let web = proxy_with_token(
        &cp,
        "shop/web",
        None,
        Duration::from_millis(50),
        Some(t_web),
    )
    .await;
    listening(bind).await;
    listening(inbound).await;
    wait::until("mesh path serves", TIMEOUT, || async move {
        client::get(bind, "catalog", "/")
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await
    .unwrap();
    IdentityMesh {
        _scratch: scratch,
        cp,
        app,
        web,
        catalog,
        bind,
        inbound,
        data,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_carries_the_verified_caller_identity_and_it_cannot_be_spoofed() {
    let m = identity_mesh(&[]).await;
    assert_eq!(
        m.web
            .shared()
            .certs
            .identity()
            .map(|i| i.to_string())
            .as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/web")
    );
    let mut c = client::h1(m.bind).await.unwrap();
    let req = http::Request::get("/who")
        .header("host", "catalog")
        .header(
            "sinew-peer-identity",
            "spiffe://cluster.local/ns/kube-system/sa/admin",
        )
        .body(sinew_testkit::client::empty())
        .unwrap();
    let r = client::collect(c.send(req).await.unwrap()).await.unwrap();
    assert_eq!(r.status, 200);
    let seen = r.json().unwrap();
    assert_eq!(
        seen["headers"]["sinew-peer-identity"], "spiffe://cluster.local/ns/shop/sa/web",
        "the proxy's word, not the client's"
    );
    // Both requests (the readiness probe and this one) crossed the inbound, over TLS:
    // only TLS yields an identity.
    let metrics = sinew_testkit::client::get(m.catalog.admin_addr(), "admin", "/metrics")
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains("sinew_http_requests_total{direction=\"inbound\",class=\"2xx\"} 2"),
        "{metrics}"
    );
    m.web.shutdown().await;
    m.catalog.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_inbound_refuses_plaintext_and_foreign_certificates_and_openssl_agrees() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let m = identity_mesh(&[]).await;
    let served = m.app.requests(); // the readiness probe
    // Plaintext HTTP to the inbound: closed without an answer.
    let mut s = tokio::net::TcpStream::connect(m.inbound).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: catalog\r\nsinew-dst-port: 1\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    assert!(
        out.is_empty(),
        "plaintext got an answer: {:?}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(m.app.requests(), served, "nothing refused reached the app");

    // openssl, a client no one here wrote, with a certificate from the mesh CA.
    let dir = m._scratch.0.join("openssl");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = sinew_tls::Ca::load_or_generate(&m.data.join("ca"), "cluster.local").unwrap();
    let issue_in = |ca: &sinew_tls::Ca, td: &str, name: &str| {
        let (key, csr) = sinew_tls::new_key_and_csr().unwrap();
        let id = sinew_tls::SpiffeId::workload(td, "shop", name);
        let chain = ca
            .sign_csr(&csr, &id, Duration::from_secs(3600))
            .unwrap()
            .chain_pem;
        let (k, c) = (
            dir.join(format!("{name}.key")),
            dir.join(format!("{name}.pem")),
        );
        std::fs::write(&k, key).unwrap();
        std::fs::write(&c, chain).unwrap();
        (k, c)
    };
    let issue = |ca: &sinew_tls::Ca, name: &str| issue_in(ca, "cluster.local", name);
    let roots = dir.join("roots.pem");
    std::fs::write(&roots, ca.roots_pem()).unwrap();
    let (k, c) = issue(&ca, "openssl");
    let (ok, out) = s_client(
        m.inbound,
        &[
            "-cert",
            c.to_str().unwrap(),
            "-key",
            k.to_str().unwrap(),
            "-CAfile",
            roots.to_str().unwrap(),
            "-verify_return_error",
        ],
    )
    .await;
    assert!(ok, "{out}");
    assert!(
        out.contains("New, TLSv1.3") && out.contains("ALPN protocol: sinew-h2"),
        "{out}"
    );
    assert!(
        out.contains("Verify return code: 0 (ok)"),
        "openssl verified the sidecar's certificate: {out}"
    );
    // No client certificate: refused.
    let (_, out) = s_client(m.inbound, &["-ign_eof", "-CAfile", roots.to_str().unwrap()]).await;
    assert!(
        out.contains("alert") || out.contains("error"),
        "no client certificate must be refused: {out}"
    );
    // A certificate from another CA: refused.
    let other = sinew_tls::Ca::generate("cluster.local", Duration::from_secs(3600)).unwrap();
    let (k2, c2) = issue(&other, "rogue");
    let (_, out) = s_client(
        m.inbound,
        &[
            "-ign_eof",
            "-cert",
            c2.to_str().unwrap(),
            "-key",
            k2.to_str().unwrap(),
            "-CAfile",
            roots.to_str().unwrap(),
        ],
    )
    .await;
    assert!(
        out.contains("alert") || out.contains("error"),
        "a foreign certificate must be refused: {out}"
    );
    // The mesh CA's own signature on an id of another trust domain: the chain
    // verifies, the trust domain does not, and the connection is closed with its
    // own reason.
    let (k3, c3) = issue_in(&ca, "evil.example", "web");
    let (_, out) = s_client(
        m.inbound,
        &[
            "-ign_eof",
            "-cert",
            c3.to_str().unwrap(),
            "-key",
            k3.to_str().unwrap(),
            "-CAfile",
            roots.to_str().unwrap(),
        ],
    )
    .await;
    assert!(
        out.contains("Verify return code: 0 (ok)"),
        "the handshake itself is fine: {out}"
    );
    let metrics_text = || async {
        sinew_testkit::client::get(m.catalog.admin_addr(), "admin", "/metrics")
            .await
            .map(|r| r.text())
            .unwrap_or_default()
    };
    wait::until("the foreign trust domain is counted", TIMEOUT, || async {
        metrics_text()
            .await
            .contains("reason=\"foreign-trust-domain\"} 1")
    })
    .await
    .unwrap();
    assert_eq!(m.app.requests(), served, "nothing refused reached the app");
    let metrics = metrics_text().await;
    assert!(
        metrics.contains("reason=\"plaintext-refused\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("reason=\"tls-failed\""), "{metrics}");
    m.web.shutdown().await;
    m.catalog.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbound_refuses_a_peer_with_the_wrong_spiffe_id() {
    let m = identity_mesh(&[]).await;
    // A workload that claims service account "billing" but holds a certificate for
    // "intruder": its sidecar is not who the mesh expects at that address.
    let app = HttpBackend::start("billing-app").await.unwrap();
    let (bind, inbound) = (free_addr(), free_addr());
    let f = m._scratch.write(
        "b.yaml",
        &format!(
            "{}{}",
            service("shop", "billing"),
            proxy_doc("shop", "web", &[(m.bind, "catalog"), (bind, "billing")])
        ),
    );
    assert!(
        m.cp.sinew(&["apply", "-f", f.to_str().unwrap()])
            .await
            .status
            .success()
    );
    // The control plane does not let it register as billing (tests/security.rs
    // covers that path); an operator's static Workload says billing runs there,
    // behind a sidecar, as service account billing. The sidecar there is the
    // intruder's: its certificate says intruder.
    let intruder = proxy(
        &m.cp,
        "shop/intruder-1",
        Some(registration("intruder", app.addr(), inbound, "v1")),
        Duration::from_millis(50),
    )
    .await;
    let w = m._scratch.write(
        "w.yaml",
        &format!(
            "---\napiVersion: sinew.dev/v1alpha1\nkind: Workload\nmetadata: {{name: billing-1, namespace: shop}}\nspec: {{service: billing, address: {}, ports: {{http: {}}}, sidecar: {{port: {}}}, serviceAccount: billing}}\n",
            inbound.ip(),
            app.addr().port(),
            inbound.port()
        ),
    );
    let out = m.cp.sinew(&["apply", "-f", w.to_str().unwrap()]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    listening(inbound).await;
    listening(bind).await;
    wait::until("billing endpoint known", TIMEOUT, || async {
        client::get(bind, "billing", "/")
            .await
            .is_ok_and(|r| r.status != 503)
    })
    .await
    .unwrap();
    let r = client::get(bind, "billing", "/").await.unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(r.header("sinew-error"), Some("tls-failed"));
    assert!(
        r.text().contains("billing") && r.text().contains("intruder"),
        "{}",
        r.text()
    );
    assert_eq!(app.requests(), 0, "nothing reached the impostor's app");
    // The real catalog is still reached.
    assert_eq!(
        client::get(m.bind, "catalog", "/").await.unwrap().status,
        200
    );
    intruder.shutdown().await;
    m.web.shutdown().await;
    m.catalog.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_request() {
    let m = identity_mesh(&["--cert-ttl", "4s"]).await;
    let expiry = |p: &sinew_proxy::Proxy| p.shared().certs.not_after();
    let (web0, cat0) = (expiry(&m.web), expiry(&m.catalog));
    let load = Load::start(m.bind, 4).await;
    // Two rotations of each proxy's certificate (renewal at ~70% of 4 s).
    wait::until("rotated twice", TIMEOUT, || async {
        let (w, c) = (expiry(&m.web), expiry(&m.catalog));
        w > web0.map(|t| t + Duration::from_secs(2)) && c > cat0.map(|t| t + Duration::from_secs(2))
    })
    .await
    .unwrap();
    load.progress(100).await;
    let (ok, failed) = load.finish().await;
    assert_eq!(
        failed,
        0,
        "{failed} of {} failed across certificate rotations",
        ok + failed
    );
    m.web.shutdown().await;
    m.catalog.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_key_is_owner_only_and_never_logged() {
    use std::os::unix::fs::PermissionsExt;
    let scratch = Scratch::new();
    let data = scratch.0.join("data");
    let log = std::fs::File::create(scratch.0.join("cp.log")).unwrap();
    let addr = free_addr();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sinew"))
        .args([
            "control",
            "--listen",
            &addr.to_string(),
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .env("RUST_LOG", "trace")
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("https://{addr}");
    let cred = data.join("admin.credentials");
    wait::until("up", TIMEOUT, || async {
        cred.exists()
            && sinew_as(&url, Some(&cred), &["check", "--wait", "0"])
                .await
                .status
                .success()
    })
    .await
    .unwrap();
    let t = text(
        &sinew_as(
            &url,
            Some(&cred),
            &["token", "create", "-n", "shop", "--service-account", "web"],
        )
        .await,
    )
    .0;
    // The admin credential holds a key: owner-only, like the CA's.
    assert_eq!(
        std::fs::metadata(&cred).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let key_path = data.join("ca").join("ca-key.pem");
    assert_eq!(
        std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(data.join("ca"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    child.kill().await.unwrap();
    let key = std::fs::read_to_string(&key_path).unwrap();
    let logged = std::fs::read_to_string(scratch.0.join("cp.log")).unwrap();
    assert!(!logged.is_empty());
    for line in key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!logged.contains(line), "a CA key line appears in the log");
    }
    assert!(
        !logged.contains(t.trim()),
        "a join token appears in the log"
    );
    let admin_key = sinew_control::credentials::CredentialFile::read(&cred)
        .unwrap()
        .key;
    for line in admin_key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!logged.contains(line), "the admin key appears in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trust_anchor_rotates_under_load_without_a_failed_request() {
    let m = identity_mesh(&[]).await;
    let roots = |p: &sinew_proxy::Proxy| p.shared().certs.roots();
    let old_root = roots(&m.web);
    assert_eq!(old_root.len(), 1);
    let load = Load::start(m.bind, 4).await;

    let out = m.cp.sinew(&["ca", "rotate", "start"]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    wait::until("both proxies trust both roots", TIMEOUT, || async {
        roots(&m.web).len() == 2 && roots(&m.catalog).len() == 2
    })
    .await
    .unwrap();
    let early = m.cp.sinew(&["ca", "rotate", "finish"]).await;
    assert!(!early.status.success(), "finish before reissue is refused");
    assert!(
        text(&early)
            .1
            .contains("nothing to finish: the rotation is started"),
        "{:?}",
        text(&early)
    );
    load.progress(50).await;

    let out = m.cp.sinew(&["ca", "rotate", "reissue"]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    wait::until("everyone on the new root", TIMEOUT, || async {
        let (out, _) = text(&m.cp.sinew(&["check", "--wait", "0"]).await);
        out.contains("PASS trust-anchor rotation reissuing: 2 of 2 proxies hold a certificate from the signing root")
    })
    .await
    .unwrap();
    load.progress(50).await;

    let out = m.cp.sinew(&["ca", "rotate", "finish"]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    wait::until("old root retired everywhere", TIMEOUT, || async {
        let (w, c) = (roots(&m.web), roots(&m.catalog));
        w.len() == 1 && c.len() == 1 && w != old_root && c != old_root
    })
    .await
    .unwrap();
    load.progress(100).await;
    let (ok, failed) = load.finish().await;
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed across the root rotation",
        ok + failed
    );
    let (out, _) = text(&m.cp.sinew(&["check"]).await);
    assert!(
        !out.contains("trust-anchor rotation"),
        "rotation done: {out}"
    );
    m.web.shutdown().await;
    m.catalog.shutdown().await;
}

fn policy_doc(name: &str, body: &str) -> String {
    format!(
        "---\napiVersion: sinew.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n{body}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_allows_by_identity_and_deny_wins() {
    let m = identity_mesh(&[]).await;
    // A second caller, billing, with its own identity and a binding to catalog.
    let bbind = free_addr();
    let base = format!(
        "{}{}{}",
        service("shop", "catalog"),
        proxy_doc("shop", "web", &[(m.bind, "catalog")]),
        proxy_doc("shop", "billing", &[(bbind, "catalog")]),
    );
    let policies = format!(
        "{}{}",
        policy_doc(
            "catalog-callers",
            "  targetRef: {kind: Service, name: catalog}\n  action: ALLOW\n  rules:\n    - from: {principals: [spiffe://cluster.local/ns/shop/sa/web]}"
        ),
        policy_doc(
            "no-admin",
            "  targetRef: {kind: Service, name: catalog}\n  action: DENY\n  rules:\n    - to: {pathPrefixes: [/admin]}"
        ),
    );
    let f = m._scratch.write("p.yaml", &format!("{base}{policies}"));
    let out = m.cp.sinew(&["apply", "-f", f.to_str().unwrap()]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    let billing = proxy_with_token(
        &m.cp,
        "shop/billing",
        None,
        Duration::from_millis(50),
        Some(token(&m.cp, "shop", "billing").await),
    )
    .await;
    listening(bbind).await;
    wait::until("policy in force", TIMEOUT, || async {
        client::get(bbind, "catalog", "/")
            .await
            .is_ok_and(|r| r.status == 403)
    })
    .await
    .unwrap();
    let r = client::get(bbind, "catalog", "/items").await.unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(
        r.header("sinew-error"),
        Some("forbidden: no ALLOW rule matched")
    );
    assert!(
        r.text().contains("shop/catalog-callers"),
        "the refusal names the policy: {}",
        r.text()
    );
    let r = client::get(m.bind, "catalog", "/items").await.unwrap();
    assert_eq!(r.status, 200, "web is allowed");
    let r = client::get(m.bind, "catalog", "/admin/users")
        .await
        .unwrap();
    assert_eq!(r.status, 403, "deny wins over allow");
    assert!(r.text().contains("shop/no-admin"), "{}", r.text());
    assert_eq!(
        r.header("sinew-error"),
        Some("forbidden: shop/no-admin rule 0"),
        "sinew-error names the rule"
    );
    // Every decision is counted by policy and rule.
    let metrics = sinew_testkit::client::get(m.catalog.admin_addr(), "admin", "/metrics")
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains(
            "sinew_authz_decisions_total{decision=\"deny\",policy=\"shop/no-admin\",rule=\"0\"} 1"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("sinew_authz_decisions_total{decision=\"allow\",policy=\"shop/catalog-callers\",rule=\"0\"}"), "{metrics}");
    assert!(
        metrics.contains(
            "sinew_authz_decisions_total{decision=\"deny\",policy=\"no-allow-match\",rule=\"\"}"
        ),
        "{metrics}"
    );
    billing.shutdown().await;
    m.web.shutdown().await;
    m.catalog.shutdown().await;
}

/// curl, sending `path` byte for byte (`--path-as-is`) to a sidecar's outbound
/// binding for catalog: (status, the body as JSON when there is one).
async fn curl_as_is(bind: std::net::SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--path-as-is",
            "--max-time",
            "10",
            "-H",
            "host: catalog",
        ])
        .args(["-w", "\n%{http_code}"])
        .arg(format!("http://{bind}{path}"))
        .output()
        .await
        .expect("curl is required for these tests (scripts/test installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "curl {path}: {out:?}");
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code = code
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("curl {path}: {text}"));
    (
        code,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_judges_whole_segments_and_the_app_gets_the_judged_path() {
    let m = identity_mesh(&[]).await;
    let policy = policy_doc(
        "api-only",
        "  targetRef: {kind: Service, name: catalog}\n  action: ALLOW\n  rules:\n    - to: {pathPrefixes: [/api]}",
    );
    let f = m._scratch.write("p.yaml", &policy);
    let out = m.cp.sinew(&["apply", "-f", f.to_str().unwrap()]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    wait::until("policy in force", TIMEOUT, || async {
        client::get(m.bind, "catalog", "/")
            .await
            .is_ok_and(|r| r.status == 403)
    })
    .await
    .unwrap();
    let served = m.app.requests();
    // Outside /api by a segment, or by an encoded walk out of it: refused, and the
    // app sees none of it.
    for path in [
        "/apiadmin",
        "/api/../admin",
        "/api/%2e%2e/admin",
        "/api%2F..%2Fadmin",
        "/api%2f%2E%2E%2fadmin/users",
    ] {
        assert_eq!(curl_as_is(m.bind, path).await.0, 403, "{path}");
    }
    assert_eq!(m.app.requests(), served, "nothing refused reached the app");
    // Inside /api: allowed, and the app gets the path that was judged (normalised),
    // with the query as sent.
    for (path, judged, query) in [
        ("/api", "/api", None),
        ("/api/x/./y//z?q=a/../b", "/api/x/y/z", Some("q=a/../b")),
        ("/api%2Fitems", "/api/items", None),
        ("/x/../api/ok", "/api/ok", None),
        ("//%61pi/items", "/api/items", None),
    ] {
        let (status, seen) = curl_as_is(m.bind, path).await;
        assert_eq!(status, 200, "{path}: {seen}");
        assert_eq!(seen["path"], judged, "{path}");
        assert_eq!(seen["query"].as_str(), query, "{path}");
    }
    m.web.shutdown().await;
    m.catalog.shutdown().await;
}

/// Unpadded base64url, as JWTs spell their parts.
fn b64url(d: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_tokens_are_verified_at_the_inbound_and_claims_reach_the_app() {
    let m = identity_mesh(&[]).await;
    let jwks = sinew_testkit::jwt::jwks(&[&sinew_testkit::jwt::K1]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let jwks_yaml = jwks.replace('\'', "''");
    let docs = format!(
        "{}{}---\napiVersion: sinew.dev/v1alpha1\nkind: RequestAuthentication\nmetadata: {{name: users, namespace: shop}}\nspec:\n  targetRef: {{kind: Service, name: catalog}}\n  jwtRules:\n    - issuer: https://issuer.example\n      audiences: [catalog]\n      jwks: {{inline: '{jwks_yaml}'}}\n      forwardClaims: [{{claim: sub, header: x-user}}]\n{}",
        service("shop", "catalog"),
        proxy_doc("shop", "web", &[(m.bind, "catalog")]),
        policy_doc(
            "users-or-public",
            "  targetRef: {kind: Service, name: catalog}\n  action: ALLOW\n  rules:\n    - from: {requestPrincipals: [\"https://issuer.example/alice\"]}\n    - to: {pathPrefixes: [/public]}"
        ),
    );
    let f = m._scratch.write("jwt.yaml", &docs);
    let out = m.cp.sinew(&["apply", "-f", f.to_str().unwrap()]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    let sign = |claims: serde_json::Value| sinew_testkit::jwt::K1.sign(&claims).unwrap();
    let get = |path: &'static str, token: Option<String>| async move {
        let mut c = client::h1(m.bind).await.unwrap();
        let mut b = http::Request::get(path)
            .header("host", "catalog")
            .header("x-user", "forged");
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        client::collect(
            c.send(b.body(sinew_testkit::client::empty()).unwrap())
                .await
                .unwrap(),
        )
        .await
        .unwrap()
    };
    let claims = |sub: &str, iss: &str, exp: u64| serde_json::json!({"sub": sub, "iss": iss, "aud": "catalog", "exp": exp, "iat": now});
    wait::until("authentication in force", TIMEOUT, || async {
        get("/items", None).await.status == 403
    })
    .await
    .unwrap();
    // A valid token: allowed, and its claim (not the forged header) reaches the app.
    let r = get(
        "/items",
        Some(sign(claims("alice", "https://issuer.example", now + 600))),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["headers"]["x-user"], "alice");
    assert!(
        r.json().unwrap()["headers"].get("authorization").is_none(),
        "the token itself is not forwarded"
    );
    // No token: authentication passes, authorization needs a principal (except /public).
    let r = get("/public/x", None).await;
    assert_eq!(r.status, 200);
    assert!(
        r.json().unwrap()["headers"].get("x-user").is_none(),
        "a forged claim header is removed"
    );
    let r = get("/items", None).await;
    assert_eq!(
        (r.status.as_u16(), r.header("sinew-error")),
        (403, Some("forbidden: no ALLOW rule matched"))
    );
    // Refused tokens, each with its reason.
    let cases = [
        (
            sign(claims("alice", "https://issuer.example", now - 3600)),
            "jwt-expired",
        ),
        (
            sign(claims("alice", "https://evil.example", now + 600)),
            "jwt-wrong-issuer",
        ),
        (
            format!(
                "{}.{}.",
                b64url(br#"{"alg":"none","kid":"k1"}"#),
                b64url(
                    serde_json::to_string(&claims("alice", "https://issuer.example", now + 600))
                        .unwrap()
                        .as_bytes()
                )
            ),
            "jwt-alg-none",
        ),
    ];
    for (token, reason) in cases {
        let r = get("/items", Some(token)).await;
        assert_eq!(r.status, 401, "{reason}: {}", r.text());
        assert_eq!(r.header("sinew-error"), Some(reason));
    }
    m.web.shutdown().await;
    m.catalog.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_mode_accepts_plaintext_and_certificates_outlive_the_control_plane() {
    let m = identity_mesh(&[]).await;
    let mesh = "---\napiVersion: sinew.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh, namespace: default}\nspec:\n  mtls: {mode: PERMISSIVE}\n";
    let f = m._scratch.write("mesh.yaml", mesh);
    let out = m.cp.sinew(&["apply", "-f", f.to_str().unwrap()]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    // Plaintext straight to the inbound (a client migrating into the mesh): accepted,
    // with no caller identity.
    let app_port = m.app.addr().port().to_string();
    wait::until("permissive in force", TIMEOUT, || {
        let p = app_port.clone();
        async move {
            let Ok(h2) = sinew_testkit::client::h2(m.inbound).await else {
                return false;
            };
            let req = http::Request::get("http://catalog/plain")
                .header("sinew-dst-port", p)
                .header(
                    "sinew-peer-identity",
                    "spiffe://cluster.local/ns/shop/sa/forged",
                )
                .body(sinew_testkit::client::empty())
                .unwrap();
            match h2.send(req).await {
                Ok(r) => match client::collect(r).await {
                    Ok(c) if c.status == 200 => c.json().unwrap()["headers"]
                        .get("sinew-peer-identity")
                        .is_none(),
                    _ => false,
                },
                Err(_) => false,
            }
        }
    })
    .await
    .unwrap();
    // Mesh traffic is still mTLS, and keeps working without the control plane: the
    // proxies keep their certificates.
    let load = Load::start(m.bind, 2).await;
    m.cp.kill().await;
    load.progress(200).await;
    let (ok, failed) = load.finish().await;
    assert_eq!(
        failed,
        0,
        "{failed} of {} failed with the control plane away",
        ok + failed
    );
    assert!(m.web.shared().certs.is_ready() && m.catalog.shared().certs.is_ready());
    let r = client::get(m.bind, "catalog", "/").await.unwrap();
    assert_eq!(
        r.json().unwrap()["headers"]["sinew-peer-identity"],
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    m.web.shutdown().await;
    m.catalog.shutdown().await;
}

/// Sends `rps` requests a second to a sidecar's inbound until stopped; records when
/// each was sent and its status.
struct Paced {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<Vec<(std::time::Instant, u16)>>,
}

impl Paced {
    async fn start(inbound: std::net::SocketAddr, rps: u32) -> Paced {
        let stop = Arc::new(AtomicBool::new(false));
        let mut c = client::h1(inbound).await.unwrap();
        let s = stop.clone();
        let sent = Arc::new(AtomicU32::new(0));
        let n = sent.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rps);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seen = Vec::new();
            while !s.load(Ordering::Relaxed) {
                tick.tick().await;
                let t = std::time::Instant::now();
                let r = c.get("api", "/").await.unwrap();
                if r.status == 429 {
                    assert_eq!(r.header("sinew-error"), Some("rate-limited: shop/api/all"));
                } else {
                    assert_eq!(r.status, 200, "{:?}", r.header("sinew-error"));
                }
                seen.push((t, r.status.as_u16()));
                n.fetch_add(1, Ordering::Relaxed);
            }
            seen
        });
        Paced { stop, sent, task }
    }

    /// A measurement window: waits until `n` more requests have been sent (their
    /// count, not a clock, ends it; the bounds use the measured duration).
    async fn window(&self, n: u32) {
        let target = self.sent.load(Ordering::Relaxed) + n;
        wait::until("the measurement window", TIMEOUT, || async {
            self.sent.load(Ordering::Relaxed) >= target
        })
        .await
        .unwrap();
    }

    async fn finish(self) -> Vec<(std::time::Instant, u16)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// (sent, admitted) among `seen` in `[from, to)`.
fn window(
    seen: &[(std::time::Instant, u16)],
    from: std::time::Instant,
    to: std::time::Instant,
) -> (usize, usize) {
    let w: Vec<_> = seen.iter().filter(|(t, _)| *t >= from && *t < to).collect();
    (w.len(), w.iter().filter(|(_, s)| *s == 200).count())
}

async fn rate_status(p: &sinew_proxy::Proxy) -> serde_json::Value {
    let r = client::get(p.admin_addr(), "admin", "/ratelimits")
        .await
        .unwrap();
    r.json().unwrap()[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_wide_rate_limit_holds_across_three_proxies_and_fails_safe_to_a_third() {
    const RATE: f64 = 60.0;
    const BURST: f64 = 10.0;
    let scratch = Scratch::new();
    let cp = Control::start(&scratch.0.join("data"), free_addr(), &[]).await;
    let f = scratch.write(
        "m.yaml",
        &format!(
            // PERMISSIVE: the load comes straight to the inbounds, as plaintext.
            "{}---\napiVersion: sinew.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: api, namespace: shop}}\nspec:\n  targetRef: {{kind: Service, name: api}}\n  rateLimits:\n    - {{name: all, requestsPerSecond: {RATE}, burst: {BURST}, global: true}}\n---\napiVersion: sinew.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh, namespace: default}}\nspec:\n  mtls: {{mode: PERMISSIVE}}\n",
            service("shop", "api")
        ),
    );
    let out = cp.sinew(&["apply", "-f", f.to_str().unwrap()]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    let mut apps = Vec::new();
    let mut proxies = Vec::new();
    let mut inbounds = Vec::new();
    for i in 0..3 {
        let app = HttpBackend::start("app").await.unwrap();
        let inbound = free_addr();
        let reg = registration("api", app.addr(), inbound, "v1");
        let name = format!("shop/api-{i}");
        proxies.push(proxy(&cp, &name, Some(reg), Duration::from_millis(50)).await);
        listening(inbound).await;
        apps.push(app);
        inbounds.push(inbound);
    }
    // Ready: every proxy holds a lease and knows that three share the limit.
    wait::until("three proxies share the limit", TIMEOUT, || async {
        let mut all = true;
        for p in &proxies {
            let s = rate_status(p).await;
            all &= s["proxies"] == 3 && s["leased"] == true;
        }
        all
    })
    .await
    .unwrap();

    // Uneven demand: 200 rps at the first proxy, 100 at the second, none at the
    // third. Enforced per proxy the mesh would admit 120 rps; split evenly and
    // statically, 40 (20 + 20). Shared by demand: the limit, 60.
    let a = Paced::start(inbounds[0], 200).await;
    let b = Paced::start(inbounds[1], 100).await;
    wait::until("leases follow demand", TIMEOUT, || async {
        let (sa, sb) = (
            rate_status(&proxies[0]).await,
            rate_status(&proxies[1]).await,
        );
        let share = |s: &serde_json::Value| s["shares"][""]["requestsPerSecond"].as_f64();
        share(&sa).is_some_and(|r| r > RATE / 2.0) && share(&sb).is_some_and(|r| r > 5.0)
    })
    .await
    .unwrap();
    let t0 = std::time::Instant::now();
    a.window(800).await; // about 4 s at 200 rps
    let t1 = std::time::Instant::now();

    // The control plane goes away: every proxy falls back to a third of the limit.
    cp.kill().await;
    wait::until("leases lapse", TIMEOUT, || async {
        let s = rate_status(&proxies[0]).await;
        s["leased"] == false && s["shares"][""]["requestsPerSecond"].as_f64() == Some(RATE / 3.0)
    })
    .await
    .unwrap();
    let t2 = std::time::Instant::now();
    a.window(600).await; // about 3 s at 200 rps
    let t3 = std::time::Instant::now();
    let (seen_a, seen_b) = (a.finish().await, b.finish().await);

    // Shared: within the stated bound, R * (W + T) + B + N, with T = 0.5 s (one
    // report interval and the round trip), and at least 75% of what was asked of
    // the limit (a static even split could give at most 2/3 of it here).
    let w = (t1 - t0).as_secs_f64();
    let (sent_a, ok_a) = window(&seen_a, t0, t1);
    let (sent_b, ok_b) = window(&seen_b, t0, t1);
    let admitted = (ok_a + ok_b) as f64;
    let offered = (sent_a + sent_b) as f64 / w;
    let upper = RATE * (w + 0.5) + BURST + 3.0;
    let lower = 0.75 * RATE.min(offered) * w;
    assert!(
        admitted <= upper && admitted >= lower,
        "shared: admitted {admitted} in {w:.2}s (a {ok_a}/{sent_a}, b {ok_b}/{sent_b}); bounds [{lower:.0}, {upper:.0}]"
    );
    eprintln!(
        "shared: admitted {admitted} in {w:.2}s (a {ok_a}/{sent_a}, b {ok_b}/{sent_b}); bounds [{lower:.0}, {upper:.0}]"
    );
    assert!(ok_a > ok_b, "the busier proxy got the bigger share");

    // Fail-safe: each proxy enforces a third of the limit (burst ceil(10/3) = 4).
    let w = (t3 - t2).as_secs_f64();
    for (name, seen) in [("a", &seen_a), ("b", &seen_b)] {
        let (sent, ok) = window(seen, t2, t3);
        let share = RATE / 3.0;
        let upper = share * w + 4.0 + 1.0;
        let lower = 0.75 * share.min(sent as f64 / w) * w;
        eprintln!(
            "fail-safe {name}: admitted {ok} of {sent} in {w:.2}s; bounds [{lower:.0}, {upper:.0}]"
        );
        assert!(
            (ok as f64) <= upper && (ok as f64) >= lower,
            "fail-safe {name}: admitted {ok} of {sent} in {w:.2}s; bounds [{lower:.0}, {upper:.0}]"
        );
    }
    for p in proxies {
        p.shutdown().await;
    }
}

// One CLI grammar (issue 22): namespaces, contexts, durations, help by topic.

/// `sinew` as a user with none of Sinew's environment variables and no home (so no
/// context file or credential of the machine's), plus `env`.
fn sinew_clean(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sinew"));
    cmd.args(args)
        .env("HOME", "/nonexistent")
        .env("RUST_LOG", "warn")
        .env_remove("XDG_CONFIG_HOME")
        .current_dir(std::env::temp_dir());
    for v in [
        "SINEW_SERVER",
        "SINEW_CREDENTIALS",
        "SINEW_NAMESPACE",
        "SINEW_CONTEXT",
        "SINEW_CONFIG",
    ] {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn out_err(o: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Every namespaced command takes `-n NS` and `-A` (none is refused by the command
/// line), with one default, the context's namespace (here none: `default`); an empty
/// table in the namespace asked for says where there is something.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaced_commands_take_n_and_a_and_an_empty_namespace_says_where_to_look() {
    let scratch = Scratch::new();
    let cp = Control::start(&scratch.0.join("data"), free_addr(), &[]).await;
    apply(
        &cp,
        &scratch,
        &format!(
            "{}{}",
            service("demo", "catalog"),
            service("demo", "reviews")
        ),
    )
    .await;
    let web = proxy(&cp, "demo/web", None, Duration::from_millis(50)).await;

    for cmd in [
        &["get", "services"][..],
        &["stat"],
        &["stat", "--by", "route"],
        &["top", "--once"],
        &["edges"],
        &["proxy-status"],
    ] {
        for scope in [
            &["-n", "demo"][..],
            &["-A"],
            &["--namespace", "demo"],
            &["--all-namespaces"],
        ] {
            let args: Vec<&str> = cmd.iter().chain(scope).copied().collect();
            let out = cp.sinew(&args).await;
            assert!(out.status.success(), "sinew {args:?}: {:?}", text(&out));
        }
    }
    // delete: -n (a name is deleted in one namespace at a time, as with kubectl).
    let out = cp
        .sinew(&["delete", "service", "nothing", "-n", "demo"])
        .await;
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert!(
        text(&out).0.contains("Service demo/nothing not found"),
        "{:?}",
        text(&out)
    );
    let out = cp.sinew(&["delete", "service", "catalog", "-A"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("give -n NAMESPACE"),
        "{:?}",
        text(&out)
    );
    // token create: -n is the identity's namespace.
    let out = cp
        .sinew(&["token", "create", "-n", "demo", "--service-account", "web"])
        .await;
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(text(&out).1.contains("/ns/demo/sa/web"), "{:?}", text(&out));
    // tap: -n and -A start a tap (the one proxy is asked either way).
    for scope in [["-n", "demo"], ["-A", "--limit=1"]] {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sinew"))
            .arg("tap")
            .args(scope)
            .env("SINEW_SERVER", &cp.url)
            .env("SINEW_CREDENTIALS", &cp.credentials)
            .env("HOME", "/nonexistent")
            .env("RUST_LOG", "warn")
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
            child.stderr.take().unwrap(),
        ));
        let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("tap said nothing")
            .unwrap()
            .unwrap_or_default();
        assert!(
            first.starts_with("tapping 1 proxies"),
            "tap {scope:?}: {first}"
        );
        child.kill().await.unwrap();
    }

    // The default namespace is empty: each table says where things are.
    let out = cp.sinew(&["get", "services"]).await;
    let (table, err) = text(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(table.lines().count(), 1, "only the header: {table}");
    assert_eq!(
        err.trim(),
        "no services in namespace default; 2 in demo: try -n demo or -A"
    );
    let (_, err) = text(&cp.sinew(&["get", "all"]).await);
    assert!(
        err.contains("no resources in namespace default;")
            && err.contains("in demo: try -n demo or -A"),
        "{err}"
    );
    let (_, err) = text(&cp.sinew(&["proxy-status"]).await);
    assert_eq!(
        err.trim(),
        "no proxies in namespace default; 1 in demo: try -n demo or -A"
    );
    let out = cp.sinew(&["get", "service", "catalog"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out)
            .1
            .contains("service default/catalog not found; there is one in demo: try -n demo or -A"),
        "{:?}",
        text(&out)
    );
    // Where there is something: no hint.
    let (table, err) = text(&cp.sinew(&["get", "services", "-n", "demo"]).await);
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(err.is_empty(), "{err}");
    let (table, _) = text(&cp.sinew(&["get", "services", "-A"]).await);
    assert!(
        table.contains("catalog") && table.contains("reviews"),
        "{table}"
    );
    let (table, _) = text(&cp.sinew(&["proxy-status", "-n", "demo"]).await);
    assert!(table.contains("demo/web"), "{table}");
    web.shutdown().await;
}

/// Each of server, credentials and namespace: flag, then environment, then context,
/// then the default; the context file's errors name the file and the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contexts_and_their_precedence_flag_env_context_default() {
    let scratch = Scratch::new();
    let cp = Control::start(&scratch.0.join("data"), free_addr(), &[]).await;
    apply(&cp, &scratch, &service("demo", "catalog")).await;
    let config = scratch.0.join("config.yaml");
    let cfg = config.as_os_str();
    let creds = cp.credentials.to_str().unwrap();
    let dead = "https://127.0.0.1:9";
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut all: Vec<(&str, &std::ffi::OsStr)> = vec![("SINEW_CONFIG", cfg)];
        all.extend(env.iter().map(|(k, v)| (*k, std::ffi::OsStr::new(*v))));
        sinew_clean(args, &all)
    };
    let lists_catalog =
        |o: &std::process::Output| o.status.success() && out_err(o).0.contains("catalog");
    let unreachable = |o: &std::process::Output| {
        !o.status.success()
            && out_err(o)
                .1
                .contains("cannot reach the control plane at https://127.0.0.1:9")
    };

    // Made through the CLI.
    let out = run(
        &[
            "context",
            "set",
            "good",
            "--server",
            &cp.url,
            "--credentials",
            creds,
            "-n",
            "demo",
            "--use",
        ],
        &[],
    );
    assert!(out.status.success(), "{:?}", out_err(&out));
    let out = run(
        &[
            "context",
            "set",
            "dead",
            "--server",
            dead,
            "--credentials",
            creds,
        ],
        &[],
    );
    assert!(out.status.success(), "{:?}", out_err(&out));
    assert_eq!(out_err(&run(&["context", "current"], &[])).0.trim(), "good");
    let (list, _) = out_err(&run(&["context", "list"], &[]));
    assert!(
        list.lines()
            .any(|l| l.starts_with("*") && l.contains("good") && l.contains("demo")),
        "{list}"
    );
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("current-context: good"), "{text}");

    // The context alone: its server, credential and namespace.
    let out = run(&["get", "services"], &[]);
    assert!(lists_catalog(&out), "{:?}", out_err(&out));
    // Environment over context; flag over environment (after or before the command).
    assert!(unreachable(&run(
        &["get", "services"],
        &[("SINEW_SERVER", dead)]
    )));
    let out = run(
        &["get", "services", "--server", &cp.url],
        &[("SINEW_SERVER", dead)],
    );
    assert!(lists_catalog(&out), "{:?}", out_err(&out));
    let out = run(
        &["--server", &cp.url, "get", "services"],
        &[("SINEW_SERVER", dead)],
    );
    assert!(lists_catalog(&out), "{:?}", out_err(&out));
    // The namespace the same way.
    let out = run(&["get", "services"], &[("SINEW_NAMESPACE", "default")]);
    assert!(
        out.status.success() && !out_err(&out).0.contains("catalog"),
        "{:?}",
        out_err(&out)
    );
    assert!(
        out_err(&out).1.contains("try -n demo or -A"),
        "{:?}",
        out_err(&out)
    );
    let out = run(
        &["get", "services", "-n", "demo"],
        &[("SINEW_NAMESPACE", "default")],
    );
    assert!(lists_catalog(&out), "{:?}", out_err(&out));
    // The context chosen: --context over SINEW_CONTEXT over the current one.
    assert!(unreachable(&run(
        &["get", "services", "--context", "dead"],
        &[]
    )));
    assert!(unreachable(&run(
        &["get", "services"],
        &[("SINEW_CONTEXT", "dead")]
    )));
    let out = run(
        &["get", "services", "--context", "good"],
        &[("SINEW_CONTEXT", "dead")],
    );
    assert!(lists_catalog(&out), "{:?}", out_err(&out));
    let out = run(&["get", "services", "--context", "nope"], &[]);
    assert!(!out.status.success());
    assert!(
        out_err(&out).1.contains(&format!(
            "no context named \"nope\" in {}",
            config.display()
        )),
        "{:?}",
        out_err(&out)
    );
    // `use` switches; `delete` removes (and the current one with it).
    assert!(run(&["context", "use", "dead"], &[]).status.success());
    assert!(unreachable(&run(&["get", "services"], &[])));
    assert!(run(&["context", "delete", "dead"], &[]).status.success());
    assert!(!run(&["context", "current"], &[]).status.success());
    // No context: the built-in defaults (the dead server is named by the flag only).
    let out = run(
        &[
            "get",
            "services",
            "--server",
            &cp.url,
            "--credentials",
            creds,
        ],
        &[],
    );
    assert!(
        out.status.success() && !out_err(&out).0.contains("catalog"),
        "{:?}",
        out_err(&out)
    );

    // A bad file: its path and the field.
    std::fs::write(&config, "contexts:\n  good:\n    namespace: [demo]\n").unwrap();
    let out = run(&["get", "services"], &[]);
    assert!(!out.status.success());
    assert!(
        out_err(&out).1.contains(&format!(
            "{}: contexts.good.namespace: expected a string",
            config.display()
        )),
        "{:?}",
        out_err(&out)
    );
    std::fs::write(&config, "contexts:\n  good:\n    sever: x\n").unwrap();
    assert!(
        out_err(&run(&["context", "list"], &[]))
            .1
            .contains("contexts.good.sever: unknown field")
    );

    // The control-plane flags are refused where they do not apply.
    let out = sinew_clean(&["--server", &cp.url, "validate", "-f", "x.yaml"], &[]);
    assert!(
        !out.status.success() && out_err(&out).1.contains("does not call the control plane"),
        "{:?}",
        out_err(&out)
    );
    for args in [
        &["validate", "--server", "x", "-f", "x.yaml"][..],
        &["completions", "bash", "--server", "x"],
        &["control", "--credentials", "x"],
    ] {
        let out = sinew_clean(args, &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {:?}", out_err(&out));
        assert!(
            out_err(&out).1.contains("unexpected argument"),
            "{:?}",
            out_err(&out)
        );
    }
}

/// A command's `--help`, which must succeed.
fn help_of(bin: &str, path: &[&str]) -> String {
    let out = Command::new(bin).args(path).arg("--help").output().unwrap();
    assert!(
        out.status.success(),
        "{bin} {path:?} --help: {:?}",
        out_err(&out)
    );
    out_err(&out).0
}

/// The subcommands a help text lists (under a `Name:` heading, two-space indented),
/// without `help`.
fn listed_commands(help: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_list = false;
    for line in help.lines() {
        if line.ends_with(':') && !line.starts_with(' ') {
            in_list = !matches!(line, "Options:" | "Arguments:" | "Examples:")
                && !line.contains("mode")
                && !line.contains("capture")
                && line != "Control plane:";
            continue;
        }
        if line.is_empty() {
            continue;
        }
        // A command's line: two spaces, its name (a flag or a wrapped line is not).
        if in_list
            && !line.starts_with("   ")
            && let Some(name) = line
                .strip_prefix("  ")
                .and_then(|l| l.split_whitespace().next())
            && !name.starts_with('-')
            && name != "help"
        {
            out.push(name.to_owned());
        }
    }
    out
}

/// The flags of a help text that take a duration: (flag, value name, help line),
/// by name, value name or description (duration, timeout, interval, ttl, wait,
/// period, debounce, latency, seconds, milliseconds).
fn duration_flags(help: &str) -> Vec<(String, String, String)> {
    let lines: Vec<&str> = help.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        if !t.starts_with('-') {
            continue;
        }
        let Some(long) = t.split_whitespace().find(|w| w.starts_with("--")) else {
            continue;
        };
        let long = long.trim_end_matches(',').to_owned();
        let Some(value) = t
            .split_once('<')
            .and_then(|(_, v)| v.split_once('>'))
            .map(|(v, _)| v.to_owned())
        else {
            continue;
        };
        // The description: the rest of the line, or the next line (long help).
        let mut desc = t.to_owned();
        if let Some(next) = lines.get(i + 1).filter(|n| n.starts_with("          ")) {
            desc.push(' ');
            desc.push_str(next.trim());
        }
        let d = desc.to_ascii_lowercase();
        let in_name = [
            "duration", "timeout", "interval", "ttl", "wait", "period", "debounce", "latency",
            "jitter", "window", "-ms", "-secs",
        ];
        let in_help = [
            "how long",
            "how often",
            "duration",
            "timeout",
            "interval",
            "seconds",
            "milliseconds",
        ];
        if in_name.iter().any(|w| long.contains(w))
            || in_help.iter().any(|w| d.contains(w))
            || ["MS", "SECS", "SECONDS"].contains(&value.as_str())
        {
            out.push((long, value, desc));
        }
    }
    out
}

/// Every duration flag of `sinew` (every command and subcommand, found from the help
/// itself, so a new one cannot be missed) and of `sinew-proxy` says DURATION and
/// takes units; a bad one is refused; the old spellings still parse, unlisted.
#[test]
fn every_duration_flag_takes_units_and_old_spellings_still_parse() {
    let sinew = env!("CARGO_BIN_EXE_sinew");
    // sinew-proxy is another package's binary: built beside sinew by `cargo build
    // --bins` (or a workspace-wide `cargo test`).
    let proxy_path = std::path::Path::new(sinew).with_file_name("sinew-proxy");
    assert!(
        proxy_path.is_file(),
        "needs {} (cargo build --bins)",
        proxy_path.display()
    );
    let proxy = proxy_path.to_str().unwrap();
    let mut paths: Vec<Vec<String>> = Vec::new();
    for c in listed_commands(&help_of(sinew, &[])) {
        let help = help_of(sinew, &[c.as_str()]);
        let subs = if help.contains("\nCommands:\n") {
            listed_commands(&help)
        } else {
            Vec::new()
        };
        paths.push(vec![c.clone()]);
        paths.extend(subs.into_iter().map(|s| vec![c.clone(), s]));
    }
    assert!(paths.len() > 30, "{paths:?}");
    let mut found = Vec::new();
    for (bin, path) in paths
        .iter()
        .map(|p| (sinew, p.clone()))
        .chain([(proxy, Vec::new())])
    {
        let path: Vec<&str> = path.iter().map(String::as_str).collect();
        for (flag, value, desc) in duration_flags(&help_of(bin, &path)) {
            assert_eq!(value, "DURATION", "{bin} {path:?} {flag}: {desc}");
            for good in ["1m30s", "100ms", "24h", "2s"] {
                let out = Command::new(bin)
                    .args(&path)
                    .args([flag.as_str(), good, "--help"])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{bin} {path:?} {flag} {good}: {:?}",
                    out_err(&out)
                );
            }
            let out = Command::new(bin)
                .args(&path)
                .args([flag.as_str(), "1x", "--help"])
                .output()
                .unwrap();
            assert!(!out.status.success(), "{bin} {path:?} {flag} 1x was taken");
            assert!(
                out_err(&out).1.contains("invalid duration \"1x\""),
                "{:?}",
                out_err(&out)
            );
            found.push(format!(
                "{} {flag}",
                path.first().copied().unwrap_or("sinew-proxy")
            ));
        }
    }
    for known in [
        "control --grace-period",
        "control --debounce",
        "control --cert-ttl",
        "control --lease-duration",
        "check --wait",
        "stat --window",
        "top --interval",
        "edges --window",
        "token --ttl",
        "credentials --ttl",
        "demo --duration",
        "demo-app --latency",
        "sinew-proxy --drain-timeout",
        "sinew-proxy --stats-interval",
        "sinew-proxy --reload-interval",
        "sinew-proxy --connect-timeout",
        "sinew-proxy --detect-timeout",
    ] {
        assert!(
            found.iter().any(|f| f == known),
            "{known} not found among {found:?}"
        );
    }
    // The old spellings, in their old units, hidden.
    for (bin, path, flag, value) in [
        (sinew, &["control"][..], "--debounce-ms", "20"),
        (sinew, &["control"], "--lease-duration-secs", "15"),
        (sinew, &["demo-app"], "--latency-ms", "5"),
        (proxy, &[], "--stats-interval-ms", "2000"),
        (proxy, &[], "--reload-interval-ms", "1000"),
        (proxy, &[], "--connect-timeout-ms", "5000"),
    ] {
        let out = Command::new(bin)
            .args(path)
            .args([flag, value, "--help"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{bin} {path:?} {flag} {value}: {:?}",
            out_err(&out)
        );
        assert!(
            !out_err(&out).0.contains(flag),
            "{flag} is listed in {path:?} --help"
        );
    }
    // A bare number on the new spellings is seconds (as the old seconds flags were).
    let out = Command::new(sinew)
        .args(["check", "--wait", "5", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
}

/// `sinew --help` lists the commands by topic, each once; `top` takes `--service`
/// as `tap` does (the positional of earlier releases still parses).
#[test]
fn help_is_grouped_by_topic_and_service_is_one_flag() {
    let sinew = env!("CARGO_BIN_EXE_sinew");
    let help = help_of(sinew, &[]);
    let mut at = 0;
    for group in ["Mesh:", "Traffic:", "Identity:", "Kubernetes:", "Hosts:"] {
        let i = help
            .find(&format!("\n{group}\n"))
            .unwrap_or_else(|| panic!("{group}: {help}"));
        assert!(i > at, "{group} out of order: {help}");
        at = i;
    }
    assert!(
        !help.contains("Other:"),
        "a command outside every topic: {help}"
    );
    let commands = listed_commands(&help);
    let mut unique = commands.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), commands.len(), "{commands:?}");
    for c in [
        "get", "stat", "tap", "token", "install", "control", "context",
    ] {
        assert!(commands.iter().any(|x| x == c), "{c}: {commands:?}");
    }
    assert!(help.contains("Examples:"), "{help}");
    for cmd in ["top", "tap"] {
        assert!(
            help_of(sinew, &[cmd]).contains("--service <SERVICE>"),
            "{cmd}"
        );
    }
    let out = Command::new(sinew)
        .args(["top", "catalog", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", out_err(&out));
}
