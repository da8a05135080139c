//! `sinew demo` end to end: the control plane, five demo apps behind their sidecars and
//! a load generator, all real processes on loopback.
//!
//! Needs `sinew-proxy` next to `sinew` (`cargo build --bins`, or a workspace-wide
//! `cargo test`, builds it). Without it the test fails and says so; it never skips.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

/// Startup (up to the demo's own 60 s limit) + 20 s of load + shutdown, with room.
const DEADLINE: Duration = Duration::from_secs(240);
const SERVICES: [&str; 5] = ["frontend", "catalog-v1", "catalog-v2", "reviews", "ratings"];

fn proxy_next_to_sinew() -> PathBuf {
    let sinew = Path::new(env!("CARGO_BIN_EXE_sinew"));
    let proxy = sinew.with_file_name(format!("sinew-proxy{}", std::env::consts::EXE_SUFFIX));
    assert!(
        proxy.is_file(),
        "\n\nthe demo test needs the proxy binary at {}, next to sinew.\n\
         Build it first: `cargo build --bins` (or run the whole workspace's tests with \
         `cargo test`, which builds every binary).\n\n",
        proxy.display()
    );
    proxy
}

/// Collects a child's output lines in a thread.
fn collect(stream: impl Read + Send + 'static) -> (Arc<Mutex<Vec<String>>>, JoinHandle<()>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    let handle = std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            match line {
                Ok(line) => sink.lock().unwrap().push(line),
                Err(_) => break,
            }
        }
    });
    (lines, handle)
}

/// Waits for the child until the deadline; then asks it to stop (SIGTERM, so it
/// cleans up its own children), and finally kills it. A thread waits on the child,
/// so its exit ends the wait at once.
fn wait_with_deadline(child: Child) -> Result<ExitStatus, String> {
    let pid = child.id().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut child = child;
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let exited = |timeout| match rx.recv_timeout(timeout) {
        Ok(Ok(status)) => Some(Ok(status)),
        Ok(Err(e)) => Some(Err(format!("waiting for sinew demo: {e}"))),
        Err(_) => None,
    };
    if let Some(r) = exited(DEADLINE) {
        return r;
    }
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    if exited(Duration::from_secs(20)).is_none() {
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
        let _ = exited(Duration::from_secs(5));
    }
    Err(format!(
        "sinew demo did not finish within {}s",
        DEADLINE.as_secs()
    ))
}

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://")
        .trim_start_matches("https://")
        .parse()
        .unwrap()
}

/// The rows of the last `== summary` table: name → whitespace-separated fields.
fn summary_rows(stdout: &[String]) -> Vec<Vec<String>> {
    let start = stdout
        .iter()
        .rposition(|l| l.starts_with("== summary"))
        .expect("no `== summary` in the output");
    stdout[start + 1..]
        .iter()
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .filter(|fields| fields.first().is_some_and(|f| f != "SERVICE"))
        .collect()
}

#[test]
fn the_demo_mesh_comes_up_serves_every_service_and_cleans_up() {
    let proxy = proxy_next_to_sinew();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sinew"))
        .args(["demo", "--duration", "20s", "--json", "--rate", "40"])
        .env("SINEW_PROXY_BIN", &proxy)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (stdout, out_thread) = collect(child.stdout.take().unwrap());
    let (stderr, err_thread) = collect(child.stderr.take().unwrap());
    let status = wait_with_deadline(child);
    out_thread.join().unwrap();
    err_thread.join().unwrap();
    let stdout = stdout.lock().unwrap().clone();
    let stderr = stderr.lock().unwrap().clone();
    let context = format!(
        "\n--- stdout\n{}\n--- stderr\n{}\n",
        stdout.join("\n"),
        stderr.join("\n")
    );

    let status = status.unwrap_or_else(|e| panic!("{e}{context}"));
    assert!(status.success(), "sinew demo failed: {status}{context}");
    assert!(
        stdout.iter().any(|l| l == "demo: ok"),
        "no `demo: ok`{context}"
    );

    // The first line: one JSON object with what runs where.
    let first = stdout
        .first()
        .unwrap_or_else(|| panic!("no output{context}"));
    let info: Value = serde_json::from_str(first)
        .unwrap_or_else(|e| panic!("first line is not JSON ({e}){context}"));
    let control_plane = info["control_plane"].as_str().unwrap();
    let entry = info["entry"].as_str().unwrap();
    let data_dir = info["data_dir"].as_str().unwrap();
    assert!(control_plane.starts_with("https://127.0.0.1:"), "{info}");
    // The demo made its operator credential: where it says, owner-only.
    let credentials = info["credentials"].as_str().unwrap();
    assert!(credentials.starts_with(data_dir), "{info}");
    assert!(entry.starts_with("http://127.0.0.1:"), "{info}");
    assert!(!data_dir.is_empty(), "{info}");
    let proxies = info["proxies"].as_array().unwrap();
    for p in proxies {
        for key in [
            "name", "service", "version", "admin", "inbound", "app_http", "app_grpc",
        ] {
            assert!(p.get(key).is_some(), "proxy without {key}: {p}");
        }
        assert!(
            p["admin"]
                .as_str()
                .unwrap()
                .starts_with("http://127.0.0.1:")
        );
    }
    let names: Vec<&str> = proxies
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"loadgen"), "{names:?}");
    for service in SERVICES {
        let p = proxies
            .iter()
            .find(|p| p["service"] == service)
            .unwrap_or_else(|| panic!("no proxy for {service}: {info}"));
        for key in ["version", "inbound", "app_http", "app_grpc"] {
            assert!(p[key].is_string(), "{service} has no {key}: {p}");
        }
    }
    assert_eq!(
        proxies
            .iter()
            .find(|p| p["service"] == "catalog-v2")
            .unwrap()["version"],
        "v2"
    );

    // Live tables came every 2 s.
    assert!(
        stdout.iter().any(|l| l.starts_with("-- ")),
        "no live table{context}"
    );

    // The final summary: every service saw traffic, the entry point stayed healthy,
    // and the catalog split roughly 90/10.
    let rows = summary_rows(&stdout);
    let row = |name: &str| {
        rows.iter()
            .find(|r| r[0] == name)
            .unwrap_or_else(|| panic!("no {name} row in the summary{context}"))
            .clone()
    };
    let number = |fields: &[String], i: usize| -> f64 {
        fields[i]
            .trim_end_matches('%')
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {fields:?}{context}"))
    };
    for service in SERVICES {
        let r = row(service);
        assert_eq!(r.len(), 7, "{r:?}");
        assert!(number(&r, 2) > 0.0, "{service} had no requests{context}");
        assert!(number(&r, 3) > 0.0, "{service} had no rate{context}");
    }
    let entry_row = row("entry");
    assert!(number(&entry_row, 4) >= 99.0, "{entry_row:?}{context}");
    let v1 = number(&row("catalog-v1"), 2);
    let v2 = number(&row("catalog-v2"), 2);
    let share = v2 / (v1 + v2);
    assert!(
        (0.03..=0.25).contains(&share),
        "catalog-v2 got {:.1}% of catalog traffic, expected about 10%{context}",
        share * 100.0
    );

    // Everything it started is gone, and so is its directory.
    assert!(
        !Path::new(data_dir).exists(),
        "{data_dir} is still there{context}"
    );
    let mut addrs = vec![addr_of(control_plane), addr_of(entry)];
    for p in proxies {
        addrs.push(addr_of(p["admin"].as_str().unwrap()));
        if let Some(app) = p["app_http"].as_str() {
            addrs.push(addr_of(app));
        }
    }
    for addr in addrs {
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
            "{addr} still accepts connections after the demo ended{context}"
        );
    }
}
