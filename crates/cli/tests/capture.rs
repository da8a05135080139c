//! Transparent capture on real (namespaced) Linux hosts: unmodified apps (curl,
//! python's http.server, a server-speaks-first TCP server) with their sidecars and
//! `sinew init` rules, joined by veth pairs. Needs root, iproute2, iptables,
//! tcpdump, curl, python3 and setpriv; fails loudly without them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod netns;

use netns::*;
use sinew_testkit::wait;

const PROXY_UID: u32 = 1337;
const ADMIN: u16 = 4191;
/// Protocol detection's timeout in these tests: long, so that a greeting arriving
/// before it proves detection was skipped, not merely quick.
const DETECT_SECS: f64 = 3.0;

fn sinew() -> &'static str {
    env!("CARGO_BIN_EXE_sinew")
}

fn proxy_bin() -> String {
    let p = std::path::Path::new(sinew()).with_file_name("sinew-proxy");
    assert!(
        p.is_file(),
        "\n\nthese tests need the proxy binary at {} (next to sinew): `cargo build --bins`\n\n",
        p.display()
    );
    p.display().to_string()
}

const GREETER: &str = r#"
import socket, sys, threading
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
def serve(c):
    try:
        c.sendall(b"+OK SINEW-GREETING\r\n")
        while True:
            d = c.recv(4096)
            if not d:
                break
            c.sendall(d)
    finally:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Connects, times the server's first bytes, sends a line and reads its echo.
const GREETER_CLIENT: &str = r#"
import socket, sys, time
t = time.monotonic()
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
first, echo = b"", b""
try:
    first = c.recv(100)
    elapsed = time.monotonic() - t
    c.sendall(b"PING\r\n")
    while b"\n" not in echo:
        d = c.recv(100)
        if not d:
            break
        echo += d
except OSError:
    elapsed = time.monotonic() - t
print("%.3f %s %s" % (elapsed, first.decode().strip(), echo.decode().strip()))
"#;

/// The hosts' resolver outside the mesh: answers every A query with 192.0.2.99.
const UPSTREAM_DNS: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
while True:
    q, peer = s.recvfrom(4096)
    i = 12
    while q[i] != 0:
        i += q[i] + 1
    question = q[12:i + 5]
    qtype = q[i + 1:i + 3]
    head = q[:2] + b"\x81\x80" + b"\x00\x01"
    if qtype == b"\x00\x01":
        answer = b"\xc0\x0c\x00\x01\x00\x01" + struct.pack(">I", 30) + b"\x00\x04" + socket.inet_aton("192.0.2.99")
        s.sendto(head + b"\x00\x01\x00\x00\x00\x00" + question + answer, peer)
    else:
        s.sendto(head + b"\x00\x00\x00\x00\x00\x00" + question, peer)
"#;

/// A mesh on four hosts: a client, two `catalog` instances (http.server) and a
/// `kv` instance (a server-speaks-first protocol), each with a sidecar driven by a
/// control plane in the hub, and capture rules installed by `sinew init`.
struct Mesh {
    // Processes first: they are killed before their namespaces go.
    procs: Vec<Proc>,
    lab: Lab,
    scratch: Scratch,
    marker: String,
}

const CLIENT: usize = 0;
const WEB1: usize = 1;
const WEB2: usize = 2;
const KV: usize = 3;

impl Mesh {
    async fn start(tag: &str) -> Mesh {
        require(&[
            "ip",
            "iptables-nft-restore",
            "ip6tables-nft-restore",
            "iptables-nft-save",
            "tcpdump",
            "curl",
            "python3",
            "setpriv",
        ]);
        let scratch = Scratch::new(tag);
        // Installed where the proxy's uid can run it, as on a real host: the build
        // directory may be private to root (a clone in `mktemp -d` is 0700).
        let proxy = scratch.path("sinew-proxy");
        std::fs::copy(proxy_bin(), &proxy).unwrap();
        let proxy = proxy.display().to_string();
        let lab = Lab::new(tag, &["client", "web1", "web2", "kv"]);
        let marker = format!("CATALOG-MARKER-{}", std::process::id());
        let mut procs = Vec::new();

        // The control plane and a server outside the mesh, in the hub.
        let url = format!("https://{HUB_IP}:15010");
        let data = scratch.path("cp");
        // The admin credential the control plane writes on first start.
        let cred = data.join("admin.credentials").display().to_string();
        procs.push(spawn(
            &lab.hub,
            None,
            &[
                sinew(),
                "control",
                "--listen",
                &format!("{HUB_IP}:15010"),
                "--data-dir",
                data.to_str().unwrap(),
            ],
            scratch.path("control.log"),
        ));
        scratch.write("outside/index.html", "OUTSIDE-MARKER\n");
        procs.push(spawn(
            &lab.hub,
            None,
            &[
                "python3",
                "-m",
                "http.server",
                "9000",
                "--bind",
                "::",
                "--directory",
                scratch.path("outside").to_str().unwrap(),
            ],
            scratch.path("outside.log"),
        ));
        let dns = scratch.write("upstream_dns.py", UPSTREAM_DNS);
        procs.push(spawn(
            &lab.hub,
            None,
            &["python3", dns.to_str().unwrap(), &HUB_IP.to_string()],
            scratch.path("upstream-dns.log"),
        ));
        lab.hosts[CLIENT].ns.resolv_conf(&format!(
            "nameserver {HUB_IP}\noptions timeout:2 attempts:1\n"
        ));
        until_ok(
            "control plane up",
            &lab.hub,
            &[sinew(), "--server", &url, "--credentials", &cred, "version"],
        )
        .await;
        until_ok(
            "control plane answers",
            &lab.hub,
            &[
                sinew(),
                "--server",
                &url,
                "--credentials",
                &cred,
                "get",
                "service",
            ],
        )
        .await;

        let docs = r#"apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {name: catalog}
spec:
  virtualIP: 10.96.0.10
  loadBalancer: RoundRobin
  ports: [{name: http, port: 80}]
---
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {name: kv}
spec:
  ports: [{name: redis, port: 6379}, {name: alt, port: 6380}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: catalog}
spec:
  parentRefs: [{kind: Service, name: catalog}]
  rules:
    - timeouts: {backendRequest: 700ms}
      retry: {attempts: 3, backoff: 1ms, budget: {ratio: 1.0}}
---
apiVersion: sinew.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: catalog}
spec:
  targetRef: {kind: Service, name: catalog}
  outlierDetection: {consecutiveFailures: 2, baseEjectionTime: 1s, maxEjectionPercent: 50}
---
apiVersion: sinew.dev/v1alpha1
kind: Proxy
metadata: {name: client}
spec:
  capture: {opaquePorts: [6379], detectTimeout: 3s, dnsPort: 15053}
---
apiVersion: sinew.dev/v1alpha1
kind: Proxy
metadata: {name: web1}
spec: {capture: {}}
---
apiVersion: sinew.dev/v1alpha1
kind: Proxy
metadata: {name: web2}
spec: {capture: {}}
---
apiVersion: sinew.dev/v1alpha1
kind: Proxy
metadata: {name: kv}
spec: {capture: {}}
"#;
        let f = scratch.write("mesh.yaml", docs);
        lab.hub.must(&[
            sinew(),
            "--server",
            &url,
            "--credentials",
            &cred,
            "apply",
            "-f",
            f.to_str().unwrap(),
        ]);

        // Apps: unmodified, knowing nothing of the mesh.
        for (i, name) in [(WEB1, "web1"), (WEB2, "web2")] {
            let dir = format!("{name}-www");
            scratch.write(&format!("{dir}/index.html"), &format!("{marker} {name}\n"));
            procs.push(spawn(
                &lab.hosts[i].ns,
                None,
                &[
                    "python3",
                    "-m",
                    "http.server",
                    "8080",
                    "--bind",
                    "0.0.0.0",
                    "--directory",
                    scratch.path(&dir).to_str().unwrap(),
                ],
                scratch.path(&format!("{name}-app.log")),
            ));
        }
        let greeter = scratch.write("greeter.py", GREETER);
        scratch.write("greeter_client.py", GREETER_CLIENT);
        procs.push(spawn(
            &lab.hosts[KV].ns,
            None,
            &["python3", greeter.to_str().unwrap(), "6379"],
            scratch.path("kv-app.log"),
        ));

        // Sidecars, as the proxy uid, each with its identity; then capture rules.
        for (i, name, service, ports) in [
            (CLIENT, "client", None, vec![]),
            (WEB1, "web1", Some("catalog"), vec!["http=8080"]),
            (WEB2, "web2", Some("catalog"), vec!["http=8080"]),
            (KV, "kv", Some("kv"), vec!["redis=6379", "alt=6379"]),
        ] {
            let host = &lab.hosts[i];
            let token = lab.hub.must(&[
                sinew(),
                "--server",
                &url,
                "--credentials",
                &cred,
                "token",
                "create",
                "--service-account",
                service.unwrap_or(name),
            ]);
            let token_file = scratch.write(&format!("{name}.token"), token.trim());
            let mut args: Vec<String> = vec![
                proxy.clone(),
                "--control-plane".into(),
                url.clone(),
                "--name".into(),
                format!("default/{name}"),
                "--join-token-file".into(),
                token_file.display().to_string(),
                "--admin".into(),
                format!("127.0.0.1:{ADMIN}"),
                "--connect-timeout-ms".into(),
                "500".into(),
                "--drain-timeout".into(),
                "1".into(),
            ];
            if let Some(svc) = service {
                args.extend([
                    "--service".into(),
                    svc.into(),
                    "--address".into(),
                    host.ip.to_string(),
                    "--inbound".into(),
                    format!("{}:4143", host.ip),
                ]);
                for p in ports {
                    args.extend(["--port".into(), p.into()]);
                }
            }
            // Capture first, as an init container would: the sidecar and the app
            // start with it in place.
            let uid = PROXY_UID.to_string();
            let admin = ADMIN.to_string();
            let mut init = vec![
                sinew(),
                "init",
                "--proxy-uid",
                &uid,
                "--inbound-port",
                "15006",
                "--outbound-port",
                "15001",
                "--exclude-inbound-ports",
                &admin,
            ];
            if i == CLIENT {
                init.extend(["--dns-port", "15053"]);
            }
            host.ns.must(&init);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            procs.push(spawn(
                &host.ns,
                Some(PROXY_UID),
                &args,
                scratch.path(&format!("{name}-proxy.log")),
            ));
        }
        let mesh = Mesh {
            procs,
            lab,
            scratch,
            marker,
        };
        for (i, name) in [
            (CLIENT, "client"),
            (WEB1, "web1"),
            (WEB2, "web2"),
            (KV, "kv"),
        ] {
            let ns = &mesh.lab.hosts[i].ns;
            let ready = wait::until(&format!("{name}'s sidecar ready"), TIMEOUT, || {
                let ok = ns
                    .exec(&["curl", "-sf", &format!("http://127.0.0.1:{ADMIN}/ready")])
                    .status
                    .success();
                async move { ok }
            })
            .await;
            if let Err(e) = ready {
                panic!("{e}\n{}", mesh.logs());
            }
        }
        // Each server's sidecar has its inbound (derived from its registration).
        for i in [WEB1, WEB2, KV] {
            let ns = &mesh.lab.hosts[i].ns;
            wait::until("a server sidecar has its inbound", TIMEOUT, || {
                let cfg = ns
                    .exec(&["curl", "-sf", &format!("http://127.0.0.1:{ADMIN}/config")])
                    .stdout;
                let has = serde_json::from_slice::<serde_json::Value>(&cfg)
                    .ok()
                    .and_then(|v| v.pointer("/config/inbound").cloned())
                    .is_some_and(|i| i.is_object());
                async move { has }
            })
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", mesh.logs()));
        }
        for i in [WEB1, WEB2] {
            until_ok(
                "app up",
                &mesh.lab.hosts[i].ns,
                &["curl", "-sf", "http://127.0.0.1:8080/"],
            )
            .await;
        }
        // The client knows both catalog endpoints before the tests begin.
        let client = &mesh.lab.hosts[CLIENT].ns;
        let seen = wait::until("the client's sidecar knows every endpoint", TIMEOUT, || {
            let cfg = client
                .exec(&["curl", "-sf", &format!("http://127.0.0.1:{ADMIN}/config")])
                .stdout;
            let cfg = String::from_utf8_lossy(&cfg).into_owned();
            async move {
                ["10.77.0.3:8080", "10.77.0.4:8080", "10.77.0.5:6379"]
                    .iter()
                    .all(|a| cfg.contains(a))
            }
        })
        .await;
        if let Err(e) = seen {
            panic!("{e}\n{}", mesh.logs());
        }
        mesh
    }

    fn ns(&self, i: usize) -> &Netns {
        &self.lab.hosts[i].ns
    }

    /// Every process's log, for a failure message.
    fn logs(&self) -> String {
        self.procs
            .iter()
            .map(|p| {
                let log = p.log();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                format!(
                    "--- {}\n{}",
                    p.log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `curl` in the client host (an unmodified app): the body, or the failure.
    fn curl(&self, url: &str) -> Result<String, String> {
        let out = self
            .ns(CLIENT)
            .exec(&["curl", "-sS", "--max-time", "10", url]);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "curl {url}: {}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ))
        }
    }

    fn metric(&self, i: usize, name: &str, labels: &[&str]) -> f64 {
        metric(self.ns(i), ADMIN, name, labels)
    }

    /// Runs the greeter client from the client host: (first-byte seconds, greeting, echo).
    fn greet(&self, host: &str, port: u16) -> (f64, String, String) {
        self.greet_from(self.ns(CLIENT), host, port)
    }

    /// Runs the greeter client in `ns` (an empty greeting: the connection closed).
    fn greet_from(&self, ns: &Netns, host: &str, port: u16) -> (f64, String, String) {
        let script = self.scratch.path("greeter_client.py");
        let out = ns.must(&["python3", script.to_str().unwrap(), host, &port.to_string()]);
        let mut parts = out.split_whitespace();
        let secs: f64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(-1.0);
        let rest: Vec<&str> = parts.collect();
        (
            secs,
            rest[..rest.len().saturating_sub(1)].join(" "),
            rest.last().copied().unwrap_or("").to_owned(),
        )
    }
}

/// An app that knows nothing of the mesh reaches a service by its virtual IP; the
/// request crosses both sidecars over mTLS (their metrics say so, and the wire
/// between hosts carries no plaintext of the response); a server-speaks-first
/// protocol gets its greeting without waiting on detection; unknown destinations
/// pass through (IPv4 and IPv6); the proxy's own connections are never captured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_traffic_crosses_hosts_over_mtls() {
    let mesh = Mesh::start("mtls").await;
    let client = mesh.ns(CLIENT);
    let mut app_connections = 0.0;

    // What goes over the client's wire, from the hub's side of its veth.
    let pcap = mesh.scratch.path("client.pcap");
    let mut dump = spawn(
        &mesh.lab.hub,
        None,
        &[
            "tcpdump",
            "-i",
            &mesh.lab.hosts[CLIENT].hub_if,
            "-U",
            "-n",
            "-w",
            pcap.to_str().unwrap(),
        ],
        mesh.scratch.path("tcpdump.log"),
    );
    wait::until("tcpdump listening", TIMEOUT, || {
        let up = dump.log().contains("listening on");
        async move { up }
    })
    .await
    .unwrap();

    // By virtual IP, with nothing but curl.
    let mut bodies = Vec::new();
    for _ in 0..6 {
        match mesh.curl("http://10.96.0.10/") {
            Ok(b) => bodies.push(b),
            Err(e) => panic!("{e}\n{}", mesh.logs()),
        }
        app_connections += 1.0;
    }
    assert!(
        bodies.iter().all(|b| b.contains(&mesh.marker)),
        "{bodies:?}"
    );
    // By name: the sidecar's DNS responder answers with the virtual IP.
    let by_name = mesh
        .curl("http://catalog.default.svc.cluster.local/")
        .unwrap_or_else(|e| panic!("{e}\n{}", mesh.logs()));
    assert!(by_name.contains(&mesh.marker), "{by_name}");
    app_connections += 1.0;
    let resolved = client.must(&[
        "python3",
        "-c",
        "import socket; print(socket.gethostbyname('catalog.default.svc.cluster.local'), socket.gethostbyname('elsewhere.example'))",
    ]);
    assert_eq!(
        resolved.trim(),
        "10.96.0.10 192.0.2.99",
        "mesh names get their virtual IP; other names are forwarded to the host's resolver"
    );

    // Outside the mesh: passes through as plain TCP (and is visible on the wire:
    // the control that shows the capture below can see plaintext at all).
    let outside = mesh.curl(&format!("http://{HUB_IP}:9000/")).unwrap();
    assert!(outside.contains("OUTSIDE-MARKER"), "{outside}");
    app_connections += 1.0;
    let outside6 = mesh.curl("http://[fd77::1]:9000/").unwrap();
    assert!(outside6.contains("OUTSIDE-MARKER"), "{outside6}");
    app_connections += 1.0;

    // Server speaks first: on a port declared opaque, the greeting does not wait
    // for detection (it arrives well before the detection timeout would end).
    let kv_vip = {
        let cfg = client.must(&["curl", "-sf", &format!("http://127.0.0.1:{ADMIN}/config")]);
        let v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
        let vip = find_vip(&v, "kv").unwrap_or_else(|| panic!("no virtual IP for kv in {cfg}"));
        assert!(
            vip.starts_with("240.240."),
            "kv's address is allocated from the default range: {vip}"
        );
        vip
    };
    let (secs, greeting, echo) = mesh.greet(&kv_vip, 6379);
    app_connections += 1.0;
    assert_eq!(greeting, "+OK SINEW-GREETING");
    assert_eq!(echo, "PING");
    assert!(
        (0.0..DETECT_SECS).contains(&secs),
        "first byte after {secs}s: detection was not skipped on an opaque port"
    );
    assert_eq!(
        mesh.metric(CLIENT, "sinew_protocol_detect_timeouts_total", &[]),
        0.0
    );
    // On an undeclared port, detection gives up after its timeout and the greeting
    // still comes (never a stall), and the timeout is counted.
    let (secs, greeting, echo) = mesh.greet(&kv_vip, 6380);
    app_connections += 1.0;
    assert_eq!(
        (greeting.as_str(), echo.as_str()),
        ("+OK SINEW-GREETING", "PING")
    );
    assert!(secs >= 0.0);
    assert_eq!(
        mesh.metric(CLIENT, "sinew_protocol_detect_timeouts_total", &[]),
        1.0
    );

    let _ = dump.child.kill().await;
    let _ = dump.child.wait().await;
    let text = mesh
        .lab
        .hub
        .must(&["tcpdump", "-r", pcap.to_str().unwrap(), "-A", "-n"]);
    assert!(
        text.contains("OUTSIDE-MARKER"),
        "the capture sees plaintext where there is some"
    );
    assert!(
        text.contains(".4143: "),
        "the capture holds the sidecars' connections (to port 4143)"
    );
    assert!(
        !text.contains(&mesh.marker),
        "the catalog's response crossed the wire in plaintext"
    );
    assert!(
        !text.contains("SINEW-GREETING"),
        "the kv greeting crossed the wire in plaintext"
    );

    // Both sidecars saw it: the client's outbound capture, the servers' inbound
    // over mTLS with the client's verified identity.
    let caller = "peer_identity=\"spiffe://cluster.local/ns/default/sa/client\"";
    let inbound: f64 = [WEB1, WEB2]
        .iter()
        .map(|i| {
            mesh.metric(
                *i,
                "sinew_requests_total",
                &["direction=\"inbound\"", caller, "status_code=\"200\""],
            )
        })
        .sum();
    assert_eq!(
        inbound, 7.0,
        "every request reached a catalog sidecar over mTLS"
    );
    assert_eq!(
        mesh.metric(
            CLIENT,
            "sinew_captured_connections_total",
            &["direction=\"outbound\"", "outcome=\"http\""]
        ),
        7.0
    );
    assert_eq!(
        mesh.metric(
            CLIENT,
            "sinew_captured_connections_total",
            &["direction=\"outbound\"", "outcome=\"passthrough\""]
        ),
        2.0,
        "IPv4 and IPv6 passthrough"
    );
    // Both kv connections were tunnelled through the client sidecar's mTLS
    // connection to kv's sidecar (HTTP/2 multiplexes them on one).
    assert!(
        mesh.metric(
            KV,
            "sinew_captured_connections_total",
            &["direction=\"inbound\"", "outcome=\"mtls\""]
        ) >= 1.0
    );

    // The proxy's own traffic is never captured: its connections (to the control
    // plane, to peer sidecars, passthrough) would show up as accepted on the
    // capture listener. Only the app's did.
    let proxy_user = client.must(&[
        "setpriv",
        "--reuid",
        &PROXY_UID.to_string(),
        "--regid",
        &PROXY_UID.to_string(),
        "--clear-groups",
        "--",
        "curl",
        "-sS",
        "--max-time",
        "10",
        &format!("http://{HUB_IP}:9000/"),
    ]);
    assert!(proxy_user.contains("OUTSIDE-MARKER"));
    assert_eq!(
        mesh.metric(
            CLIENT,
            "sinew_tcp_connections_total",
            &["listener=\"outbound-capture\""]
        ),
        app_connections,
        "connections accepted by capture: exactly the app's"
    );
    // A connection made to the capture listener itself is refused, never forwarded
    // to itself.
    let _ = client.exec(&["curl", "-sS", "--max-time", "5", "http://127.0.0.1:15001/"]);
    wait::until("the direct connection is refused", TIMEOUT, || {
        let n = mesh.metric(
            CLIENT,
            "sinew_captured_connections_total",
            &["direction=\"outbound\"", "outcome=\"refused\""],
        );
        async move { n == 1.0 }
    })
    .await
    .unwrap();

    // Plaintext from outside the mesh to a captured server: refused while mTLS is
    // STRICT (the greeting never comes), passed to the app (6379 is a declared
    // port) once PERMISSIVE. And with REGISTRY_ONLY egress, only mesh destinations are
    // reachable from the client.
    let kv_addr = mesh.lab.hosts[KV].ip.to_string();
    let (_, greeting, _) = mesh.greet_from(&mesh.lab.hub, &kv_addr, 6379);
    assert_eq!(greeting, "", "plaintext reached the app under STRICT mTLS");
    let policy = mesh.scratch.write(
        "mesh-config.yaml",
        "apiVersion: sinew.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec:\n  mtls: {mode: PERMISSIVE}\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n",
    );
    mesh.lab.hub.must(&[
        sinew(),
        "--server",
        &format!("https://{HUB_IP}:15010"),
        "--credentials",
        mesh.scratch
            .path("cp")
            .join("admin.credentials")
            .to_str()
            .unwrap(),
        "apply",
        "-f",
        policy.to_str().unwrap(),
    ]);
    let config_at = |i: usize, pointer: &str, want: &str| {
        let cfg = mesh
            .ns(i)
            .exec(&["curl", "-sf", &format!("http://127.0.0.1:{ADMIN}/config")])
            .stdout;
        serde_json::from_slice::<serde_json::Value>(&cfg)
            .ok()
            .and_then(|v| v.pointer(pointer).cloned())
            .is_some_and(|v| v == want)
    };
    wait::until("the new MeshConfig applied", TIMEOUT, || {
        let ok = config_at(KV, "/config/inbound/mtls", "PERMISSIVE")
            && config_at(CLIENT, "/config/egress", "REGISTRY_ONLY");
        async move { ok }
    })
    .await
    .unwrap();
    let (_, greeting, echo) = mesh.greet_from(&mesh.lab.hub, &kv_addr, 6379);
    assert_eq!(
        (greeting.as_str(), echo.as_str()),
        ("+OK SINEW-GREETING", "PING")
    );
    assert_eq!(
        mesh.metric(
            KV,
            "sinew_captured_connections_total",
            &["direction=\"inbound\"", "outcome=\"plaintext\""]
        ),
        1.0
    );
    assert!(
        mesh.curl(&format!("http://{HUB_IP}:9000/")).is_err(),
        "REGISTRY_ONLY: a destination outside the mesh is refused"
    );
    assert_eq!(
        mesh.metric(
            CLIENT,
            "sinew_proxy_errors_total",
            &["reason=\"egress-refused\""]
        ),
        1.0
    );
    let body = mesh.curl("http://10.96.0.10/").unwrap();
    assert!(
        body.contains(&mesh.marker),
        "mesh services stay reachable: {body}"
    );
}

fn find_vip(config: &serde_json::Value, service: &str) -> Option<String> {
    config
        .pointer("/config/services")
        .or_else(|| config.get("services"))
        .and_then(|s| s.get(format!("{service}.default")))
        .and_then(|s| s.get("virtualIp"))
        .and_then(|v| v.as_str())
        .map(str::to_owned)
}

/// Cutting one catalog host off (its veth down) and restoring it: requests to the
/// two-endpoint service keep succeeding (retries move them, outlier detection
/// ejects the unreachable one), and the host gets traffic again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_host_is_routed_around_and_rejoins() {
    let mesh = Mesh::start("part").await;
    let mut served = Vec::new();
    for _ in 0..4 {
        served.push(mesh.curl("http://10.96.0.10/").unwrap());
    }
    assert!(
        served.iter().any(|b| b.contains("web1")) && served.iter().any(|b| b.contains("web2")),
        "both endpoints serve before the cut: {served:?}"
    );
    let web1 = &mesh.lab.hosts[WEB1];
    mesh.lab.hub.ip(&["link", "set", &web1.hub_if, "down"]);
    let mut failures = Vec::new();
    for _ in 0..12 {
        match mesh.curl("http://10.96.0.10/") {
            Ok(b) if b.contains("web2") => {}
            Ok(b) => failures.push(format!("unexpected body {b:?}")),
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{failures:?}\n{}", mesh.logs());
    let retried = mesh.metric(CLIENT, "sinew_retries_total", &[]);
    let ejected = mesh.metric(CLIENT, "sinew_outlier_ejections_total", &[]);
    assert!(
        retried + ejected >= 1.0,
        "the unreachable endpoint was retried around or ejected (retries {retried}, ejections {ejected})"
    );
    let before = mesh.metric(WEB1, "sinew_requests_total", &["direction=\"inbound\""]);
    mesh.lab.hub.ip(&["link", "set", &web1.hub_if, "up"]);
    let back = wait::until("web1 serves again", TIMEOUT, || {
        let ok = mesh.curl("http://10.96.0.10/").is_ok();
        let n = mesh.metric(WEB1, "sinew_requests_total", &["direction=\"inbound\""]);
        async move { ok && n > before }
    })
    .await;
    if let Err(e) = back {
        panic!("{e}\n{}", mesh.logs());
    }
}

/// `sinew init` then `sinew init --uninstall` leaves iptables-save's output exactly
/// as it was (both families), with the legacy and the nft backends; a second
/// install is refused without touching anything.
#[test]
fn uninstall_restores_the_rules_exactly() {
    require(&[
        "ip",
        "iptables-legacy-save",
        "iptables-nft-save",
        "ip6tables-legacy-save",
        "ip6tables-nft-save",
    ]);
    for backend in ["legacy", "nft"] {
        let ns = Netns::new(format!("sn{}-rules-{backend}", std::process::id()));
        // A host's own rules, which must survive.
        let v4 = format!("iptables-{backend}");
        let v6 = format!("ip6tables-{backend}");
        ns.must(&[
            &v4,
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            "192.0.2.1",
            "-j",
            "RETURN",
        ]);
        ns.must(&[
            &v4, "-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "DROP",
        ]);
        ns.must(&[
            &v6,
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            "2001:db8::1",
            "-j",
            "RETURN",
        ]);
        let save4 = format!("{v4}-save");
        let save6 = format!("{v6}-save");
        let before = (rules(&ns, &save4), rules(&ns, &save6));
        ns.must(&[
            sinew(),
            "init",
            "--backend",
            backend,
            "--exclude-outbound-cidrs",
            "10.0.0.0/8,fd00::/8",
            "--exclude-inbound-ports",
            "22,8000:8100",
            "--exclude-outbound-ports",
            "5432",
        ]);
        let installed = (rules(&ns, &save4), rules(&ns, &save6));
        assert!(
            installed
                .0
                .contains("-A SINEW_OUTPUT -m owner --uid-owner 1337 -j RETURN"),
            "{}",
            installed.0
        );
        assert!(installed.0.contains("--to-ports 15001"), "{}", installed.0);
        assert!(
            installed.1.contains("-d fd00::/8 -j RETURN"),
            "{}",
            installed.1
        );
        let again = ns.exec(&[sinew(), "init", "--backend", backend]);
        assert!(!again.status.success());
        let err = String::from_utf8_lossy(&again.stderr);
        assert!(err.contains("already installed"), "{err}");
        assert_eq!(
            (rules(&ns, &save4), rules(&ns, &save6)),
            installed,
            "a refused install changes nothing"
        );
        ns.must(&[sinew(), "init", "--uninstall", "--backend", backend]);
        assert_eq!(
            (rules(&ns, &save4), rules(&ns, &save6)),
            before,
            "{backend}: uninstall restores the rules exactly"
        );
        // Nothing left to remove is not an error.
        let out = ns.must(&[sinew(), "init", "--uninstall", "--backend", backend]);
        assert!(out.contains("no capture rules"), "{out}");
    }
}

/// Bad flags are refused with the flag and the reason.
#[test]
fn bad_init_flags_name_what_is_wrong() {
    let out = run(
        sinew(),
        &["init", "--exclude-outbound-cidrs", "10.0.0.0/33"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--exclude-outbound-cidrs") && err.contains("prefix"),
        "{err}"
    );
    let out = run(sinew(), &["init", "--exclude-inbound-ports", "22,ssh"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--exclude-inbound-ports") && err.contains("ssh"),
        "{err}"
    );
}

/// `sinew run`: on two hosts, an http.server and a curl join the mesh with no other
/// setup than the service's document; curl reaches the server by name through both
/// sidecars, and when each app ends (curl exits; the server is stopped with
/// SIGTERM) its sidecar stops and its capture rules are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinew_run_brings_an_unmodified_app_into_the_mesh_and_cleans_up() {
    require(&["ip", "iptables-nft-restore", "curl", "python3", "kill"]);
    let scratch = Scratch::new("run");
    // Installed where the proxy's uid can run it, as on a real host: the build
    // directory may be private to root (a clone in `mktemp -d` is 0700).
    let proxy = scratch.path("sinew-proxy");
    std::fs::copy(proxy_bin(), &proxy).unwrap();
    let proxy = proxy.to_str().unwrap();
    let lab = Lab::new("run", &["server", "client"]);
    let url = format!("https://{HUB_IP}:15010");
    let cred = scratch
        .path("cp")
        .join("admin.credentials")
        .display()
        .to_string();
    let mut procs = vec![spawn(
        &lab.hub,
        None,
        &[
            sinew(),
            "control",
            "--listen",
            &format!("{HUB_IP}:15010"),
            "--data-dir",
            scratch.path("cp").to_str().unwrap(),
        ],
        scratch.path("control.log"),
    )];
    until_ok(
        "control plane answers",
        &lab.hub,
        &[
            sinew(),
            "--server",
            &url,
            "--credentials",
            &cred,
            "get",
            "service",
        ],
    )
    .await;
    let doc = scratch.write(
        "hello.yaml",
        "apiVersion: sinew.dev/v1alpha1\nkind: Service\nmetadata: {name: hello}\nspec:\n  ports: [{name: http, port: 80}]\n",
    );
    lab.hub.must(&[
        sinew(),
        "--server",
        &url,
        "--credentials",
        &cred,
        "apply",
        "-f",
        doc.to_str().unwrap(),
    ]);
    let (server, client) = (&lab.hosts[0].ns, &lab.hosts[1].ns);
    client.resolv_conf(&format!("nameserver {HUB_IP}\n"));
    let before = (
        effective_rules(server, "iptables-save"),
        effective_rules(client, "iptables-save"),
    );
    scratch.write("www/index.html", "HELLO-FROM-SINEW-RUN\n");
    let www = scratch.path("www");
    let mut srv = spawn(
        server,
        None,
        &[
            sinew(),
            "--server",
            &url,
            "--credentials",
            &cred,
            "run",
            "--proxy-bin",
            proxy,
            "--service",
            "hello",
            "--port",
            "http=8080",
            "--",
            "python3",
            "-m",
            "http.server",
            "8080",
            "--directory",
            www.to_str().unwrap(),
        ],
        scratch.path("server-run.log"),
    );
    let up = wait::until("the server's sidecar and app are up", TIMEOUT, || {
        let ok = server
            .exec(&["curl", "-sf", &format!("http://127.0.0.1:{ADMIN}/ready")])
            .status
            .success()
            && server
                .exec(&["curl", "-sf", "http://127.0.0.1:8080/"])
                .status
                .success();
        async move { ok }
    })
    .await;
    if let Err(e) = up {
        panic!("{e}\n{}", srv.log());
    }
    assert_ne!(
        effective_rules(server, "iptables-save"),
        before.0,
        "capture is installed while the app runs"
    );

    let cli = spawn(
        client,
        None,
        &[
            sinew(),
            "--server",
            &url,
            "--credentials",
            &cred,
            "run",
            "--proxy-bin",
            proxy,
            "--service",
            "caller",
            "--",
            "curl",
            "-sS",
            "--max-time",
            "10",
            "http://hello.default.svc.cluster.local/",
        ],
        scratch.path("client-run.log"),
    );
    procs.push(cli);
    let status = tokio::time::timeout(TIMEOUT, procs.last_mut().unwrap().child.wait())
        .await
        .expect("sinew run with curl ends when curl does")
        .unwrap();
    let log = procs.last().unwrap().log();
    assert!(
        status.success(),
        "sinew run exits with curl's status: {status}\n{log}"
    );
    assert!(log.contains("HELLO-FROM-SINEW-RUN"), "{log}");
    assert_eq!(
        effective_rules(client, "iptables-save"),
        before.1,
        "the client's capture rules are removed when its app ends"
    );
    let seen = metric(
        server,
        ADMIN,
        "sinew_requests_total",
        &[
            "direction=\"inbound\"",
            "peer_identity=\"spiffe://cluster.local/ns/default/sa/caller\"",
        ],
    );
    assert_eq!(
        seen, 1.0,
        "the request reached the server's sidecar over mTLS"
    );

    // SIGTERM to `sinew run`: the app and the sidecar stop, the rules go.
    let pid = srv.child.id().unwrap().to_string();
    must("kill", &["-TERM", &pid]);
    tokio::time::timeout(TIMEOUT, srv.child.wait())
        .await
        .expect("sinew run stops on SIGTERM")
        .unwrap();
    assert_eq!(
        effective_rules(server, "iptables-save"),
        before.0,
        "the server's capture rules are removed\n{}",
        srv.log()
    );
    assert!(
        !server
            .exec(&["curl", "-sf", "http://127.0.0.1:8080/"])
            .status
            .success(),
        "the app was stopped"
    );
}

/// An http.server that also says which `sinew-peer-identity` it received (in a
/// response header, `-` for none), so a test can see what reached the app.
const HEADER_APP: &str = r#"
import functools, http.server, sys
class H(http.server.SimpleHTTPRequestHandler):
    def end_headers(self):
        self.send_header("x-seen-peer-identity", self.headers.get("sinew-peer-identity", "-"))
        super().end_headers()
handler = functools.partial(H, directory=sys.argv[3])
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), handler).serve_forever()
"#;

/// An HTTP/1.1 server that switches to an echo protocol on `Upgrade: echo` (as a
/// WebSocket server would), else answers 426.
const UPGRADER: &str = r#"
import socket, sys, threading
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
def serve(c):
    try:
        head = b""
        while b"\r\n\r\n" not in head:
            d = c.recv(4096)
            if not d:
                return
            head += d
        if b"upgrade: echo" not in head.lower():
            c.sendall(b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            return
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: echo\r\nconnection: upgrade\r\n\r\n")
        while True:
            d = c.recv(4096)
            if not d:
                break
            c.sendall(d)
    finally:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Asks for `Upgrade: echo`, then sends a line: "<status line>|<echoed line>".
const UPGRADER_CLIENT: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
c.sendall(b"GET /ws HTTP/1.1\r\nhost: web\r\nupgrade: echo\r\nconnection: upgrade\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    d = c.recv(4096)
    if not d:
        break
    head += d
status, _, rest = head.partition(b"\r\n")
echo = head.partition(b"\r\n\r\n")[2]
try:
    c.sendall(b"PING\n")
    while b"\n" not in echo:
        d = c.recv(4096)
        if not d:
            break
        echo += d
except OSError:
    pass
print(status.decode() + "|" + echo.decode().strip())
"#;

/// One captured host's documents: its service (`mtls` override or none), workload
/// and proxy (application ports 8080, the upgrader's 8081 and the greeters' 6379 and
/// 6380), and `extra`.
fn plaintext_host_docs(ip: std::net::Ipv4Addr, mtls: Option<&str>, extra: &str) -> String {
    let mtls = mtls
        .map(|m| format!("  mtls: {{mode: {m}}}\n"))
        .unwrap_or_default();
    format!(
        r#"apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
{mtls}  ports: [{{name: http, port: 8080}}, {{name: ws, port: 8081}}, {{name: kv, port: 6379}}, {{name: kv2, port: 6380}}]
---
apiVersion: sinew.dev/v1alpha1
kind: Workload
metadata: {{name: web, namespace: default}}
spec: {{service: web, address: {ip}, ports: {{http: 8080, ws: 8081, kv: 6379, kv2: 6380}}}}
---
apiVersion: sinew.dev/v1alpha1
kind: Proxy
metadata: {{name: web, namespace: default}}
spec:
  inbound: {{bind: "{ip}:4143", ports: [8080, 8081, 6379, 6380]}}
  capture: {{}}
{extra}"#
    )
}

/// Plaintext captured on its way to an app is held to the mesh's rules. A sidecar
/// without an identity (standalone, from a file) under STRICT refuses it; under
/// PERMISSIVE, HTTP meets authorization (a DENY policy answers 403 naming itself)
/// and a forged `sinew-peer-identity` never reaches the app; opaque TCP meets L4
/// authorization (a denied port's connection is closed, an allowed one's greeting
/// comes); an undeclared port and a loopback-only service stay unreachable. Callers
/// are curl and a socket client in the hub, outside the mesh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_plaintext_meets_the_inbound_rules() {
    require(&[
        "ip",
        "iptables-nft-restore",
        "ip6tables-nft-restore",
        "curl",
        "python3",
        "setpriv",
    ]);
    let scratch = Scratch::new("plain");
    let proxy = scratch.path("sinew-proxy");
    std::fs::copy(proxy_bin(), &proxy).unwrap();
    let lab = Lab::new("plain", &["web"]);
    let host = &lab.hosts[0];
    let (ns, ip) = (&host.ns, host.ip);
    let marker = format!("PLAIN-MARKER-{}", std::process::id());
    scratch.write("www/index.html", &format!("{marker}\n"));
    scratch.write("www/admin/index.html", "ADMIN-PAGE\n");
    scratch.write("private/index.html", "LOOPBACK-ONLY\n");
    let app = scratch.write("header_app.py", HEADER_APP);
    let greeter = scratch.write("greeter.py", GREETER);
    scratch.write("greeter_client.py", GREETER_CLIENT);
    let upgrader = scratch.write("upgrader.py", UPGRADER);
    let upgrader_client = scratch.write("upgrader_client.py", UPGRADER_CLIENT);
    let config = scratch.write("web.yaml", &plaintext_host_docs(ip, None, ""));
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let www = s(&scratch.path("www"));
    let private = s(&scratch.path("private"));
    let mut procs = Vec::new();
    for (args, log) in [
        (
            vec!["python3", &s(&app), "0.0.0.0", "8080", &www],
            "app.log",
        ),
        // Loopback only, and on no declared port: never meant for other hosts.
        (
            vec!["python3", &s(&app), "127.0.0.1", "9090", &private],
            "private.log",
        ),
        (vec!["python3", &s(&upgrader), "8081"], "upgrader.log"),
        (vec!["python3", &s(&greeter), "6379"], "kv.log"),
        (vec!["python3", &s(&greeter), "6380"], "kv2.log"),
        // On every address, on a port the workload does not declare.
        (vec!["python3", &s(&greeter), "7000"], "undeclared.log"),
    ] {
        procs.push(spawn(ns, None, &args, scratch.path(log)));
    }
    let uid = PROXY_UID.to_string();
    let admin = ADMIN.to_string();
    ns.must(&[
        sinew(),
        "init",
        "--proxy-uid",
        &uid,
        "--inbound-port",
        "15006",
        "--outbound-port",
        "15001",
        "--exclude-inbound-ports",
        &admin,
    ]);
    procs.push(spawn(
        ns,
        Some(PROXY_UID),
        &[
            &s(&proxy),
            "--config",
            &s(&config),
            "--name",
            "default/web",
            "--admin",
            &format!("127.0.0.1:{ADMIN}"),
        ],
        scratch.path("proxy.log"),
    ));
    let logs = |procs: &[Proc]| {
        procs
            .iter()
            .map(|p| format!("--- {}\n{}", p.log.display(), p.log()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // Everything is up, as seen from the host itself (not captured there).
    until_ok(
        "the sidecar ready",
        ns,
        &["curl", "-sf", &format!("http://127.0.0.1:{ADMIN}/ready")],
    )
    .await;
    until_ok("the app up", ns, &["curl", "-sf", "http://127.0.0.1:8080/"]).await;
    until_ok(
        "the loopback-only service up",
        ns,
        &["curl", "-sf", "http://127.0.0.1:9090/"],
    )
    .await;
    for port in [8081, 6379, 6380, 7000] {
        until_ok(
            "a raw TCP server up",
            ns,
            &[
                "python3",
                "-c",
                &format!("import socket; socket.create_connection(('127.0.0.1', {port}))"),
            ],
        )
        .await;
    }
    let hub = &lab.hub;
    let curl = |args: &[&str]| {
        let mut all = vec!["curl", "-sS", "--max-time", "10"];
        all.extend_from_slice(args);
        let out = hub.exec(&all);
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let greet = |port: u16| {
        let out = hub.must(&[
            "python3",
            &s(&scratch.path("greeter_client.py")),
            &ip.to_string(),
            &port.to_string(),
        ]);
        // "<seconds> <greeting> <echo>"; nothing after the seconds: closed unheard.
        out.trim()
            .split_once(' ')
            .map_or("", |(_, rest)| rest.trim())
            .to_owned()
    };
    let app_url = format!("http://{ip}:8080/");

    // STRICT (the default) with no identity at all: plaintext is refused, HTTP and
    // TCP alike (it used to pass as if permissive).
    let (ok, out) = curl(&[&app_url]);
    assert!(!ok, "plaintext reached the app under STRICT: {out}");
    assert_eq!(
        greet(6380),
        "",
        "plaintext TCP reached the app under STRICT"
    );
    assert!(
        metric(
            ns,
            ADMIN,
            "sinew_proxy_errors_total",
            &["reason=\"plaintext-refused\""]
        ) >= 2.0
    );

    // PERMISSIVE, with a DENY policy for /admin and one for the port 6379.
    let policies = r#"---
apiVersion: sinew.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: default}
spec:
  targetRef: {kind: Service, name: web}
  action: DENY
  rules:
    # On its port only: a DENY rule with HTTP fields refuses all TCP it covers.
    - to: {ports: [8080], pathPrefixes: [/admin]}
---
apiVersion: sinew.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-kv, namespace: default}
spec:
  targetRef: {kind: Service, name: web}
  action: DENY
  rules:
    - to: {ports: [6379]}
"#;
    let tmp = scratch.write(
        "web.yaml.tmp",
        &plaintext_host_docs(ip, Some("PERMISSIVE"), policies),
    );
    std::fs::rename(&tmp, &config).unwrap();
    wait::until("PERMISSIVE applied", TIMEOUT, || {
        let cfg = ns
            .exec(&["curl", "-sf", &format!("http://127.0.0.1:{ADMIN}/config")])
            .stdout;
        let ok = serde_json::from_slice::<serde_json::Value>(&cfg)
            .ok()
            .and_then(|v| v.pointer("/config/inbound/mtls").cloned())
            .is_some_and(|m| m == "PERMISSIVE");
        async move { ok }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&procs)));

    // HTTP: served, but a caller's claim to be a mesh identity is not passed on.
    let (ok, out) = curl(&[
        "-i",
        "-H",
        "sinew-peer-identity: spiffe://cluster.local/ns/default/sa/admin",
        &app_url,
    ]);
    assert!(ok && out.contains(&marker), "{out}\n{}", logs(&procs));
    assert!(
        out.to_ascii_lowercase()
            .contains("x-seen-peer-identity: -\r\n"),
        "a forged sinew-peer-identity reached the app: {out}"
    );
    // A DENY policy applies to plaintext: 403, naming the policy and rule.
    let (ok, out) = curl(&["-i", &format!("http://{ip}:8080/admin/")]);
    assert!(ok, "{out}");
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(
        out.contains("sinew-error: forbidden: default/no-admin rule 0"),
        "{out}"
    );
    assert!(!out.contains("ADMIN-PAGE"), "{out}");
    // The caller cannot steer the request to another port either.
    let (ok, out) = curl(&["-H", "sinew-dst-port: 9090", &app_url]);
    assert!(ok && out.contains(&marker), "{out}");
    // An upgrade (as WebSocket does) is the app's to answer, and then carries bytes.
    let upgraded = hub.must(&["python3", &s(&upgrader_client), &ip.to_string(), "8081"]);
    assert_eq!(
        upgraded.trim(),
        "HTTP/1.1 101 Switching Protocols|PING",
        "{}",
        logs(&procs)
    );

    // Opaque TCP: an allowed port gets its greeting; the denied one is closed.
    assert_eq!(greet(6380), "+OK SINEW-GREETING PING", "{}", logs(&procs));
    assert_eq!(greet(6379), "", "a port denied by policy was reached");
    assert_eq!(
        metric(
            ns,
            ADMIN,
            "sinew_authz_decisions_total",
            &["decision=\"deny\"", "policy=\"default/no-kv\""]
        ),
        1.0
    );

    // Neither an undeclared port nor a loopback-only service is reachable.
    assert_eq!(greet(7000), "", "an undeclared port was reached");
    let (ok, out) = curl(&[&format!("http://{ip}:9090/")]);
    assert!(
        !ok && !out.contains("LOOPBACK-ONLY"),
        "a loopback-only service was reached: {out}"
    );
    assert!(
        metric(
            ns,
            ADMIN,
            "sinew_proxy_errors_total",
            &["reason=\"port-not-allowed\""]
        ) >= 2.0
    );
    drop(procs);
}
