//! A hostile caller against the real `sinew-proxy` binary: floods and descriptor
//! exhaustion must not take the sidecar down for anyone else.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use sinew_testkit::client;
use sinew_testkit::http::HttpBackend;
use sinew_testkit::mesh::{self, Service, Workload};
use sinew_testkit::wait;
use support::*;

/// CPU time (user + system) the process `pid` has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces, in parentheses).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // Clock ticks are 100 a second on Linux (sysconf(_SC_CLK_TCK)).
    Duration::from_millis(ticks * 10)
}

/// Holds `n` idle TCP connections to `addr` from a Python process (its own
/// descriptor limit raised as far as allowed): the flood's sockets are in a
/// process of their own, as an attacker's would be.
fn flood(addr: SocketAddr, n: usize) -> std::process::Child {
    let script = format!(
        r#"
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
held = []
for _ in range({n}):
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect(("{ip}", {port}))
    except OSError:
        pass
    held.append(s)
print("holding", len(held), flush=True)
sys.stdin.read()
"#,
        ip = addr.ip(),
        port = addr.port()
    );
    Command::new("python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_past_the_descriptor_limit_leave_the_sidecar_ready_and_quiet() {
    let app = HttpBackend::start("app").await.unwrap();
    let bind = free_addr();
    let admin = free_addr();
    let file = config_file(
        &shop()
            .with(client_proxy(bind, "catalog"))
            .with(Service::http("catalog"))
            .with(Workload::new("a", "catalog", app.addr())),
    );
    let log = tempfile_path("proxy.log");
    // The sidecar at a 1,024-descriptor limit (prlimit, util-linux).
    let mut proxy = Command::new("prlimit")
        .args(["--nofile=1024:1024", "--"])
        .arg(env!("CARGO_BIN_EXE_sinew-proxy"))
        .args(["--config"])
        .arg(&file.path)
        .args(["--name", "shop/client", "--admin", &admin.to_string()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("prlimit (util-linux) and the sinew-proxy binary");
    let pid = proxy.id();
    wait::ready("proxy ready", admin, TIMEOUT).await.unwrap();

    let cpu_before = cpu_time(pid);
    let started = Instant::now();
    let mut attacker = flood(admin, 1100);
    let mut line = String::new();
    BufReader::new(attacker.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("holding 1100"), "{line}");
    // While they are held: probes and traffic are answered.
    for _ in 0..20 {
        let ready = client::get(admin, "admin", "/ready").await.unwrap();
        assert_eq!(ready.status, 200, "the sidecar stays ready");
        let r = client::get(bind, "catalog", "/").await.unwrap();
        assert_eq!(r.status, 200, "traffic still flows");
    }
    let wall = started.elapsed();
    let cpu = cpu_time(pid) - cpu_before;
    // An accept loop spinning on EMFILE burns a whole core; a bounded one, little.
    assert!(
        cpu < wall / 2 + Duration::from_millis(200),
        "the sidecar used {cpu:?} of CPU in {wall:?} under the flood"
    );
    attacker.stdin.take().unwrap().write_all(b"").unwrap();
    let _ = attacker.kill();
    let _ = attacker.wait();
    let _ = proxy.kill();
    let _ = proxy.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let accept_lines = text.lines().filter(|l| l.contains("accept failed")).count();
    assert!(
        accept_lines <= 10,
        "{accept_lines} accept-failure lines: logging is rate-limited"
    );
    assert!(
        text.len() < 1 << 20,
        "the log stays small: {} bytes",
        text.len()
    );
}

fn tempfile_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sinew-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Runs `cmd` and returns its output; panics naming it when it cannot run.
fn sh(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} {args:?}: {e}"))
}

/// A network namespace with loopback up and `addr` on it, removed on drop: a
/// host whose only non-loopback address is `addr` (no change to this machine).
struct Netns(String);

impl Netns {
    fn new(addr: &str) -> Netns {
        let name = format!("sinew-hostile-{}", std::process::id());
        let out = sh("ip", &["netns", "add", &name]);
        assert!(out.status.success(), "ip netns add (needs root): {out:?}");
        let ns = Netns(name);
        for args in [
            vec!["-n", &ns.0, "link", "set", "lo", "up"],
            vec!["-n", &ns.0, "addr", "add", addr, "dev", "lo"],
        ] {
            let out = sh("ip", &args);
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        }
        ns
    }

    fn exec(&self, cmd: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, cmd]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "delete", &self.0]);
    }
}

#[test]
fn admin_endpoints_that_reveal_traffic_answer_loopback_callers_only() {
    let ns = Netns::new("192.0.2.10/32");
    let file = config_file(&shop().with(mesh::Proxy::new("client")));
    let mut proxy = ns
        .exec(env!("CARGO_BIN_EXE_sinew-proxy"))
        .args(["--config"])
        .arg(&file.path)
        .args(["--name", "shop/client", "--admin", "0.0.0.0:4191"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let curl = |url: &str| {
        let out = ns
            .exec("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--retry-connrefused",
                "--retry",
                "50",
                "--retry-delay",
                "0",
                "--retry-max-time",
                "20",
                url,
            ])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Probes and metrics from another address: served.
    assert_eq!(curl("http://192.0.2.10:4191/ready"), "200");
    assert_eq!(curl("http://192.0.2.10:4191/metrics"), "200");
    // Configuration and live traffic: refused to a caller that is not loopback...
    for path in ["/config", "/tap", "/ratelimits"] {
        assert_eq!(
            curl(&format!("http://192.0.2.10:4191{path}")),
            "403",
            "{path}"
        );
    }
    // ...and served on loopback.
    assert_eq!(curl("http://127.0.0.1:4191/config"), "200");

    // `POST /shutdown` (a Job's last step): refused from another address, the proxy
    // stays up; from loopback the proxy exits, cleanly.
    let post = |url: &str| {
        let out = ns
            .exec("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                url,
            ])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(post("http://192.0.2.10:4191/shutdown"), "403");
    assert_eq!(curl("http://192.0.2.10:4191/live"), "200");
    assert!(
        proxy.try_wait().unwrap().is_none(),
        "exited on a refused /shutdown"
    );
    assert_eq!(
        curl("http://127.0.0.1:4191/shutdown"),
        "405",
        "GET /shutdown"
    );
    assert_eq!(post("http://127.0.0.1:4191/shutdown"), "200");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(s) = proxy.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the proxy did not exit after POST /shutdown"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

/// curl's status code for a request through `bind` (extra arguments first).
async fn curl_status(args: &[&str], url: &str) -> String {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .await
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_listener_limits_answer_413_and_431_where_the_request_arrives() {
    let app = HttpBackend::start("app").await.unwrap();
    let (strict, roomy) = (free_addr(), free_addr());
    // The proxy: bodies up to 1 KiB, 20 headers; the strict binding also caps
    // headers at 4 KiB.
    let file = config_file(
        &shop()
            .with(
                mesh::Proxy::new("client")
                    .field(
                        "limits",
                        json!({"maxRequestBodyBytes": 1024, "maxRequestHeaders": 20}),
                    )
                    .binding(json!({
                        "bind": strict.to_string(),
                        "service": "catalog",
                        "limits": {"maxRequestHeadersKb": 4},
                    }))
                    .upstream(roomy, "catalog"),
            )
            .with(Service::http("catalog"))
            .with(Workload::new("a", "catalog", app.addr())),
    );
    let proxy = start(&file, "client").await;
    let dir = std::env::temp_dir().join(format!("sinew-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let five_kib = dir.join("five-kib-header");
    std::fs::write(&five_kib, format!("x-big: {}\n", "a".repeat(5 * 1024))).unwrap();
    let big_body = dir.join("body-2000");
    std::fs::write(&big_body, vec![b'x'; 2000]).unwrap();
    let small_body = dir.join("body-500");
    std::fs::write(&small_body, vec![b'x'; 500]).unwrap();
    let header = format!("@{}", five_kib.display());
    let url = |b: SocketAddr| format!("http://{b}/upload");

    // Headers: the binding's own limit, then the proxy's.
    assert_eq!(curl_status(&["-H", &header], &url(strict)).await, "431");
    assert_eq!(curl_status(&["-H", &header], &url(roomy)).await, "200");
    let many: Vec<String> = (0..25).map(|i| format!("x-h{i}: v")).collect();
    let mut args: Vec<&str> = Vec::new();
    for h in &many {
        args.extend(["-H", h]);
    }
    assert_eq!(curl_status(&args, &url(roomy)).await, "431");
    let before = app.requests();
    // Bodies: declared too long, streamed (chunked) too long, and within the limit.
    let big = format!("@{}", big_body.display());
    let small = format!("@{}", small_body.display());
    for b in [strict, roomy] {
        assert_eq!(curl_status(&["--data-binary", &big], &url(b)).await, "413");
        assert_eq!(
            curl_status(
                &["-H", "transfer-encoding: chunked", "--data-binary", &big],
                &url(b)
            )
            .await,
            "413"
        );
        assert_eq!(
            curl_status(
                &["-H", "transfer-encoding: chunked", "--data-binary", &small],
                &url(b)
            )
            .await,
            "200"
        );
    }
    // The declared-too-long ones never reached the app.
    assert!(app.requests() - before <= 4, "{}", app.requests() - before);
    // Nothing counted against the endpoint.
    let m = admin(&proxy, "/metrics").await.text();
    assert!(
        !m.lines()
            .any(|l| l.starts_with("sinew_outlier_ejections_total") && !l.ends_with(" 0")),
        "{m}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_are_closed_and_the_mesh_hop_reconnects_without_a_failure() {
    let app = HttpBackend::start("app").await.unwrap();
    let (bind, inbound) = (free_addr(), free_addr());
    let file = config_file(
        &shop()
            .with(client_proxy(bind, "catalog"))
            .with(mesh::Proxy::new("server").inbound(inbound, &[app.addr().port()]))
            .with(Service::http("catalog"))
            .with(Workload::new("catalog-1", "catalog", app.addr()).sidecar(inbound.port())),
    );
    // Both sidecars close HTTP/2 connections idle for 300 ms.
    let quick = |name: &str| {
        let mut o = options(&file.path, name);
        o.idle_timeout = Duration::from_millis(300);
        o
    };
    let server = start_with(quick("server")).await;
    let client_side = start_with(quick("client")).await;
    // A client's own HTTP/2 connection, idle: closed by its sidecar.
    let h2 = client::h2(bind).await.unwrap();
    assert_eq!(h2.get("catalog", "/").await.unwrap().status, 200);
    wait::until("the idle HTTP/2 connection is closed", TIMEOUT, || async {
        h2.is_closed()
    })
    .await
    .unwrap();
    // The sidecar-to-sidecar connection goes idle and is closed too (GOAWAY): every
    // request after that still succeeds, on a new connection.
    let conns = app.connections();
    let mut c = client::h1(bind).await.unwrap();
    for round in 0..5 {
        for _ in 0..20 {
            let r = c.get("catalog", "/").await.unwrap();
            assert_eq!(
                r.status,
                200,
                "round {round}: {:?}",
                r.header("sinew-error")
            );
        }
        // The server sidecar closes the idle HTTP/2 hop (its inbound holds no
        // connection any more) before the next round.
        wait::until("the idle mesh hop is closed", TIMEOUT, || async {
            metric(&server, "sinew_tcp_connections_open{listener=\"inbound\"}").await == Some(0.0)
        })
        .await
        .unwrap();
    }
    assert!(app.connections() >= conns, "the app was reached");
    client_side.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tcp_stream_is_closed_after_its_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = sinew_testkit::tcp::TcpEchoServer::start().await.unwrap();
    let bind = free_addr();
    let file = config_file(
        &shop()
            .with(client_proxy(bind, "db"))
            .with(Service::new("db", "TCP"))
            .with(Workload::new("db-1", "db", echo.addr())),
    );
    let mut o = options(&file.path, "client");
    o.tcp_idle_timeout = Duration::from_millis(300);
    let proxy = start_with(o).await;
    let mut s = tokio::net::TcpStream::connect(bind).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    // Then nothing either way: the proxy closes the stream (read returns 0).
    let started = Instant::now();
    let n = tokio::time::timeout(TIMEOUT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed, not data");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "not before the timeout"
    );
    proxy.shutdown().await;
}

/// Resident memory of the process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_goes_back_after_a_large_configuration_is_reverted() {
    let app = HttpBackend::start("app").await.unwrap();
    let bind = free_addr();
    let admin = free_addr();
    let small = shop()
        .with(client_proxy(bind, "catalog"))
        .with(Service::http("catalog"))
        .with(Workload::new("a", "catalog", app.addr()));
    let mut large = small.clone();
    for i in 0..5000 {
        large.add(Service::http(&format!("svc-{i}")));
        large.add(Workload::new(
            &format!("w-{i}"),
            &format!("svc-{i}"),
            app.addr(),
        ));
    }
    let (small, large) = (small.yaml(), large.yaml());
    let file = ConfigFile::new(&small);
    let mut proxy = Command::new(env!("CARGO_BIN_EXE_sinew-proxy"))
        .args(["--config"])
        .arg(&file.path)
        .args([
            "--name",
            "shop/client",
            "--admin",
            &admin.to_string(),
            "--reload-interval-ms",
            "50",
            "--workers",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = proxy.id();
    let generation = || async move {
        let m = client::get(admin, "admin", "/metrics").await.ok()?.text();
        sinew_testkit::metrics::value(&m, "sinew_config_generation")
    };
    wait::ready("ready", admin, TIMEOUT).await.unwrap();
    let first = generation().await.unwrap();
    let base = rss_kib(pid);
    file.replace(&large);
    wait::until(
        "the large configuration is applied",
        TIMEOUT,
        || async move { generation().await.is_some_and(|g| g > first) },
    )
    .await
    .unwrap();
    let peak = rss_kib(pid);
    let second = generation().await.unwrap();
    file.replace(&small);
    wait::until(
        "the small configuration is applied",
        TIMEOUT,
        || async move { generation().await.is_some_and(|g| g > second) },
    )
    .await
    .unwrap();
    // Freed memory goes back to the system (glibc keeps it in its arenas otherwise:
    // without the trim, RSS stays at the peak, measured at 56 MiB of 56). How much
    // comes back depends on what stays live among the freed pages: about two thirds
    // on a quiet machine, under half seen once beside the rest of the suite. A third
    // is the bar.
    let result = wait::until("memory goes back", TIMEOUT, || async move {
        rss_kib(pid) < peak - (peak - base) / 3
    })
    .await;
    let now = rss_kib(pid);
    let _ = proxy.kill();
    let _ = proxy.wait();
    assert!(
        result.is_ok(),
        "RSS {base} KiB before, {peak} KiB with 10,000 documents, {now} KiB after the revert"
    );
}
