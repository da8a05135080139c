//! Capture that matches Kubernetes, against a real kube-apiserver (testkit's
//! `kube::ApiServer`): a Service's ClusterIP is the mesh service's virtual IP, so an
//! unmodified app in a "pod" (a network namespace with `sinew init` rules and a sidecar
//! run as on Kubernetes) that calls the Service by name is routed by the mesh over mTLS;
//! a headless Service's pods are reached at their own addresses, each over mTLS to its
//! sidecar; and workloads' zones come from EndpointSlices and Nodes.
//!
//! The netns test needs root, iproute2, iptables, curl and setpriv (it fails loudly
//! without them), and the proxy binary next to `sinew` (`cargo build --bins`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod mesh;
mod netns;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use kube::Client;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use serde_json::{Value, json};
use sinew_testkit::http::HttpBackend;
use sinew_testkit::kube::ApiServer;
use sinew_testkit::{client, wait};

const PROXY_UID: u32 = 1337;
const ADMIN: u16 = 4191;

/// An API server with Sinew's and the Gateway API's CRDs and a namespace `shop`.
async fn cluster() -> (ApiServer, Client) {
    let api = ApiServer::start()
        .await
        .expect("a real kube-apiserver (scripts/kube-envtest build)");
    let c = api.client().await.unwrap();
    let crds = [sinew_k8s::crds(), sinew_k8s::crd::gateway_api_crds()].concat();
    sinew_k8s::install_crds(&c, &crds).await.unwrap();
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "shop"}})).unwrap();
    Api::<Namespace>::all(c.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    (api, c)
}

fn ar(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// The 1.20 API server serves EndpointSlices only as v1beta1.
fn slices() -> ApiResource {
    ar(
        "discovery.k8s.io",
        "v1beta1",
        "EndpointSlice",
        "endpointslices",
    )
}

/// Creates (or replaces, by server-side apply) any object in `shop`.
async fn apply(c: &Client, r: &ApiResource, doc: Value) {
    let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
    let mut doc = doc;
    doc["apiVersion"] = json!(r.api_version);
    doc["kind"] = json!(r.kind);
    let obj: DynamicObject = serde_json::from_value(doc).unwrap();
    Api::<DynamicObject>::namespaced_with(c.clone(), "shop", r)
        .patch(
            &name,
            &PatchParams::apply("test").force(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap();
}

async fn create<K>(c: &Client, doc: Value)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
{
    let obj: K = serde_json::from_value(doc).unwrap();
    Api::<K>::namespaced(c.clone(), "shop")
        .create(&PostParams::default(), &obj)
        .await
        .unwrap();
}

/// A Pod of service account `sa`, whose sidecar's inbound port is `inbound` (if any).
async fn pod(c: &Client, name: &str, sa: &str, inbound: Option<u16>, node: Option<&str>) {
    let mut meta = json!({"name": name, "namespace": "shop", "labels": {"app": name}});
    if let Some(p) = inbound {
        meta["annotations"] = json!({"sinew.dev/inbound-port": p.to_string()});
    }
    let mut spec = json!({"serviceAccountName": sa, "containers": [{"name": "app", "image": "example.invalid/app"}]});
    if let Some(n) = node {
        spec["nodeName"] = json!(n);
    }
    create::<Pod>(c, json!({"metadata": meta, "spec": spec})).await;
}

/// An EndpointSlice of `service` with one ready endpoint for `pod` at `addr`, with this
/// v1beta1 `topology`.
async fn slice(
    c: &Client,
    name: &str,
    service: &str,
    pod: &str,
    addr: SocketAddr,
    topology: Value,
) {
    apply(
        c,
        &slices(),
        json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": addr.port(), "protocol": "TCP"}],
            "endpoints": [{
                "addresses": [addr.ip().to_string()],
                "conditions": {"ready": true},
                "topology": topology,
                "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop"}
            }]
        }),
    )
    .await;
}

/// A service-account token for the control plane's audience (what a pod's projected
/// token is).
async fn sa_token(c: &Client, sa: &str) -> String {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    let sas = Api::<ServiceAccount>::namespaced(c.clone(), "shop");
    if sas.get_opt(sa).await.unwrap().is_none() {
        let obj: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": sa, "namespace": "shop"}})).unwrap();
        sas.create(&PostParams::default(), &obj).await.unwrap();
    }
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["sinew".to_owned()],
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    sas.create_token_request(sa, &PostParams::default(), &req)
        .await
        .unwrap()
        .status
        .unwrap()
        .token
}

fn proxy_bin() -> String {
    let p = std::path::Path::new(env!("CARGO_BIN_EXE_sinew")).with_file_name("sinew-proxy");
    assert!(
        p.is_file(),
        "\n\nthis test needs the proxy binary at {} (next to sinew): `cargo build --bins`\n\n",
        p.display()
    );
    p.display().to_string()
}

/// A free TCP port on `ip`.
fn free_port(ip: IpAddr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A "pod": a network namespace joined to the host's network namespace by a veth pair
/// (the host's end has two addresses, `host` and `host2`, where the server "pods" of
/// the test listen: a node's pods, as the client pod sees them). Removed on drop.
struct PodNet {
    ns: netns::Netns,
    host_if: String,
    host: Ipv4Addr,
    host2: Ipv4Addr,
}

impl PodNet {
    fn new() -> PodNet {
        let pid = std::process::id();
        // A /24 of its own per test process, so parallel runs do not meet.
        let k = (pid % 200 + 20) as u8;
        let ns = netns::Netns::new(format!("sn{pid}-k8spod"));
        let host_if = format!("snk{pid}");
        let _ = netns::run("ip", &["link", "del", &host_if]);
        netns::must(
            "ip",
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.0,
            ],
        );
        let net = PodNet {
            ns,
            host_if,
            host: Ipv4Addr::new(10, 78, k, 1),
            host2: Ipv4Addr::new(10, 78, k, 3),
        };
        for ip in [net.host, net.host2] {
            netns::must(
                "ip",
                &["addr", "add", &format!("{ip}/24"), "dev", &net.host_if],
            );
        }
        netns::must("ip", &["link", "set", &net.host_if, "up"]);
        net.ns
            .ip(&["addr", "add", &format!("10.78.{k}.2/24"), "dev", "eth0"]);
        net.ns.ip(&["link", "set", "eth0", "up"]);
        net.ns
            .ip(&["route", "add", "default", "via", &net.host.to_string()]);
        net
    }
}

impl Drop for PodNet {
    fn drop(&mut self) {
        let _ = netns::run("ip", &["link", "del", &self.host_if]);
    }
}

/// A `sinew-proxy` process on the host in control-plane mode (a server pod's sidecar),
/// ready when this returns.
async fn host_sidecar(
    scratch: &netns::Scratch,
    proxy: &str,
    control: &str,
    roots: &std::path::Path,
    name: &str,
    token: &str,
) -> tokio::process::Child {
    let token_file = scratch.write(&format!("{}.token", name.replace('/', "-")), token);
    let admin = mesh::free_addr();
    let log =
        std::fs::File::create(scratch.path(&format!("{}.log", name.replace('/', "-")))).unwrap();
    let child = tokio::process::Command::new(proxy)
        .args(["--control-plane", control, "--name", name])
        .arg("--control-plane-ca")
        .arg(roots)
        .arg("--join-token-file")
        .arg(&token_file)
        .args(["--admin", &admin.to_string()])
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait::ready(&format!("{name} ready"), admin, netns::TIMEOUT)
        .await
        .unwrap();
    child
}

/// The cluster's DNS as the pod's resolver sees it (kube-dns' stand-in): answers every
/// A query with one address (argv[2]), bound at argv[1]:53.
const CLUSTER_DNS: &str = r#"
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
        answer = b"\xc0\x0c\x00\x01\x00\x01" + struct.pack(">I", 30) + b"\x00\x04" + socket.inet_aton(sys.argv[2])
        s.sendto(head + b"\x00\x01\x00\x00\x00\x00" + question + answer, peer)
    else:
        s.sendto(head + b"\x00\x00\x00\x00\x00\x00" + question, peer)
"#;

/// `curl` in the pod: the echo's JSON, or why it failed.
fn curl(ns: &netns::Netns, args: &[&str]) -> Result<Value, String> {
    let mut all = vec!["curl", "-sS", "--max-time", "10"];
    all.extend_from_slice(args);
    let out = ns.exec(&all);
    if !out.status.success() {
        return Err(format!(
            "curl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "curl {args:?}: not the echo ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// An unmodified app in a pod with `sinew init` rules and an injected-style sidecar
/// (`--capture --capture-dns-port`, identity from a service-account token) calls
/// `http://catalog`, resolved to the Service's ClusterIP as kube-dns would answer
/// (`curl --resolve` stands in for kube-dns: there is no cluster DNS here): the mesh
/// routes it (the HTTPRoute's header filter applies) over mTLS (the server's sidecar
/// hands the app the client's SPIFFE identity). The sidecar's own DNS answers the
/// Service's name with the same ClusterIP. A headless Service's pods, called at their
/// own addresses, and by a StatefulSet pod's DNS name (forwarded by the sidecar's DNS to
/// a kube-dns stand-in), are each reached over mTLS, the addressed one every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pod_calling_a_service_by_name_is_routed_over_mtls_by_cluster_ip() {
    netns::require(&[
        "ip",
        "iptables-nft-restore",
        "curl",
        "setpriv",
        "getent",
        "python3",
    ]);
    let scratch = netns::Scratch::new("k8s");
    let proxy = scratch.path("sinew-proxy");
    std::fs::copy(proxy_bin(), &proxy).unwrap();
    let proxy = proxy.display().to_string();
    let net = PodNet::new();
    let (api, c) = cluster().await;

    // Server "pods" on the node (the host): apps on loopback, reached only through
    // their sidecars, which listen on the pods' addresses.
    let catalog = HttpBackend::start("catalog-0").await.unwrap();
    let db0 = HttpBackend::start("db-0").await.unwrap();
    let db1 = HttpBackend::start("db-1").await.unwrap();
    let host = IpAddr::V4(net.host);
    let host2 = IpAddr::V4(net.host2);
    let (in_cat, in_db0, in_db1) = (free_port(host), free_port(host), free_port(host2));
    let ep_cat = SocketAddr::new(host, catalog.addr().port());
    let ep_db0 = SocketAddr::new(host, db0.addr().port());
    let ep_db1 = SocketAddr::new(host2, db1.addr().port());

    create::<Service>(
        &c,
        json!({"metadata": {"name": "catalog", "namespace": "shop"},
               "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP",
                                   "targetPort": ep_cat.port()}]}}),
    )
    .await;
    create::<Service>(
        &c,
        json!({"metadata": {"name": "db", "namespace": "shop"},
               "spec": {"clusterIP": "None",
                        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}),
    )
    .await;
    let cluster_ip = Api::<Service>::namespaced(c.clone(), "shop")
        .get("catalog")
        .await
        .unwrap()
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("the API server allocates a ClusterIP");
    pod(&c, "catalog-0", "catalog", Some(in_cat), None).await;
    pod(&c, "db-0", "db", Some(in_db0), None).await;
    pod(&c, "db-1", "db", Some(in_db1), None).await;
    pod(&c, "client-0", "web", None, None).await;
    slice(&c, "catalog-0", "catalog", "catalog-0", ep_cat, json!({})).await;
    slice(&c, "db-0", "db", "db-0", ep_db0, json!({})).await;
    slice(&c, "db-1", "db", "db-1", ep_db1, json!({})).await;
    apply(
        &c,
        &ar("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
        json!({"metadata": {"name": "catalog"},
               "spec": {"parentRefs": [{"kind": "Service", "group": "", "name": "catalog"}],
                        "rules": [{"filters": [{"type": "RequestHeaderModifier",
                            "requestHeaderModifier": {"add": [{"name": "x-mesh-route", "value": "catalog"}]}}]}]}}),
    )
    .await;

    // The control plane, reachable from the pod at the node's address.
    let cp_addr = SocketAddr::new(host, free_port(host));
    let data = mesh::Scratch::new();
    let kubeconfig = api.kubeconfig();
    let cp = mesh::Control::start_env(
        &data.0.join("data"),
        cp_addr,
        &["--kubernetes"],
        &[("KUBECONFIG", kubeconfig.as_os_str())],
    )
    .await;
    let roots = scratch.write(
        "roots.pem",
        &std::fs::read_to_string(cp.roots_file()).unwrap(),
    );
    let control = format!("https://{cp_addr}");
    let mut sidecars = Vec::new();
    for (name, sa) in [("catalog-0", "catalog"), ("db-0", "db"), ("db-1", "db")] {
        let token = sa_token(&c, sa).await;
        sidecars.push(
            host_sidecar(
                &scratch,
                &proxy,
                &control,
                &roots,
                &format!("shop/{name}"),
                &token,
            )
            .await,
        );
    }

    // The cluster's DNS, on the node: it answers a StatefulSet pod's name
    // (`db-1.db.shop.svc.cluster.local`) with that pod's address, as kube-dns does.
    let dns_script = scratch.write("cluster_dns.py", CLUSTER_DNS);
    let mut cluster_dns = tokio::process::Command::new("python3")
        .arg(&dns_script)
        .args([net.host.to_string(), net.host2.to_string()])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The client pod: capture first (the init container), then its sidecar as the
    // proxy's uid, as the injector sets them up.
    let pod_ns = &net.ns;
    pod_ns.resolv_conf(&format!(
        "search shop.svc.cluster.local svc.cluster.local cluster.local\nnameserver {}\noptions timeout:1 attempts:1\n",
        net.host
    ));
    let uid = PROXY_UID.to_string();
    let admin = ADMIN.to_string();
    pod_ns.must(&[
        env!("CARGO_BIN_EXE_sinew"),
        "init",
        "--proxy-uid",
        &uid,
        "--inbound-port",
        "15006",
        "--outbound-port",
        "15001",
        "--dns-port",
        "15053",
        "--exclude-inbound-ports",
        &admin,
    ]);
    let token = scratch.write("client-0.token", &sa_token(&c, "web").await);
    let client = netns::spawn(
        pod_ns,
        Some(PROXY_UID),
        &[
            &proxy,
            "--control-plane",
            &control,
            "--control-plane-ca",
            roots.to_str().unwrap(),
            "--name",
            "shop/client-0",
            "--join-token-file",
            token.to_str().unwrap(),
            "--capture",
            "--capture-dns-port",
            "15053",
            "--admin",
            &format!("127.0.0.1:{ADMIN}"),
        ],
        scratch.path("client-0.log"),
    );
    let logs = || {
        let mut s = format!("--- client-0\n{}", client.log());
        for n in ["shop-catalog-0", "shop-db-0", "shop-db-1"] {
            s += &format!(
                "\n--- {n}\n{}",
                std::fs::read_to_string(scratch.path(&format!("{n}.log"))).unwrap_or_default()
            );
        }
        s
    };
    let ready = wait::until(
        "the pod's sidecar knows the ClusterIP and every endpoint",
        netns::TIMEOUT,
        || {
            let cfg = pod_ns
                .exec(&["curl", "-sf", &format!("http://127.0.0.1:{ADMIN}/config")])
                .stdout;
            let cfg = String::from_utf8_lossy(&cfg).into_owned();
            let want = [
                format!("\"{cluster_ip}\""),
                format!("\"{ep_cat}\""),
                format!("\"{ep_db0}\""),
                format!("\"{ep_db1}\""),
            ];
            async move { want.iter().all(|w| cfg.contains(w.as_str())) }
        },
    )
    .await;
    if let Err(e) = ready {
        panic!("{e}\n{}", logs());
    }

    // By name, resolved to the ClusterIP as kube-dns answers.
    let resolve = format!("catalog:80:{cluster_ip}");
    let echo = curl(pod_ns, &["--resolve", &resolve, "http://catalog/"])
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert_eq!(echo["backend"], "catalog-0", "{echo}");
    assert_eq!(
        echo["headers"]["x-mesh-route"], "catalog",
        "the mesh's route applied: {echo}"
    );
    assert_eq!(
        echo["headers"]["sinew-peer-identity"], "spiffe://cluster.local/ns/shop/sa/web",
        "the server's sidecar saw the client's certificate (mTLS): {echo}"
    );

    // The sidecar's DNS agrees with kube-dns: the Service's name is its ClusterIP, and
    // the call through it is the mesh's too.
    let hosts = pod_ns.must(&["getent", "ahostsv4", "catalog.shop.svc.cluster.local"]);
    assert!(
        hosts.lines().all(|l| l.starts_with(&cluster_ip)) && !hosts.is_empty(),
        "mesh DNS answers the ClusterIP {cluster_ip}: {hosts}"
    );
    let echo = curl(pod_ns, &["http://catalog.shop.svc.cluster.local/"])
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert_eq!(echo["headers"]["x-mesh-route"], "catalog", "{echo}");

    // A headless Service's pods at their own addresses: each is reached, over mTLS, and
    // the addressed one every time (not balanced over the Service). Their apps listen on
    // loopback only: nothing but their sidecars could have answered.
    for (ep, name) in [(ep_db1, "db-1"), (ep_db0, "db-0")] {
        for _ in 0..5 {
            let echo = curl(pod_ns, &[&format!("http://{ep}/")])
                .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
            assert_eq!(echo["backend"], name, "{echo}");
            assert_eq!(
                echo["headers"]["sinew-peer-identity"], "spiffe://cluster.local/ns/shop/sa/web",
                "{echo}"
            );
        }
    }
    // A StatefulSet pod's DNS name: not a mesh name, so the sidecar's DNS forwards it to
    // the cluster's resolver, which answers the pod's address; the call is the mesh's.
    netns::until_ok(
        "the pod resolves a StatefulSet pod's name through its sidecar",
        pod_ns,
        &["getent", "ahostsv4", "db-1.db.shop.svc.cluster.local"],
    )
    .await;
    let hosts = pod_ns.must(&["getent", "ahostsv4", "db-1.db.shop.svc.cluster.local"]);
    assert!(hosts.starts_with(&net.host2.to_string()), "{hosts}");
    let url = format!("http://db-1.db.shop.svc.cluster.local:{}/", ep_db1.port());
    let echo = curl(pod_ns, &[&url]).unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert_eq!(echo["backend"], "db-1", "{echo}");
    assert_eq!(
        echo["headers"]["sinew-peer-identity"], "spiffe://cluster.local/ns/shop/sa/web",
        "{echo}"
    );
    let _ = cluster_dns.start_kill();
    drop(sidecars);
    drop(client);
    drop(cp);
}

/// Workloads' zones come from the cluster: the client's from its Pod's Node, the
/// servers' from their EndpointSlice (its `topology` zone, or its node's labels), and a
/// client proxy with `localityPreference` keeps to its own zone, following the slices
/// as they change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn locality_comes_from_endpoint_slices_and_nodes() {
    let (api, c) = cluster().await;
    for (name, zone) in [("node-a", "zone-a"), ("node-b", "zone-b")] {
        let node: Node = serde_json::from_value(json!({"metadata": {"name": name, "labels": {
            "topology.kubernetes.io/zone": zone, "topology.kubernetes.io/region": "region-1"}}}))
        .unwrap();
        Api::<Node>::all(c.clone())
            .create(&PostParams::default(), &node)
            .await
            .unwrap();
    }
    let a = HttpBackend::start("a").await.unwrap();
    let b = HttpBackend::start("b").await.unwrap();
    let web_app = HttpBackend::start("web").await.unwrap();
    for name in ["web", "catalog"] {
        create::<Service>(
            &c,
            json!({"metadata": {"name": name, "namespace": "shop"},
                   "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}),
        )
        .await;
    }
    // The client runs on node-a (its Pod says so; its slice does not).
    pod(&c, "client", "client", None, Some("node-a")).await;
    pod(&c, "cat-a", "catalog", None, None).await;
    pod(&c, "cat-b", "catalog", None, None).await;
    slice(&c, "web-client", "web", "client", web_app.addr(), json!({})).await;
    // cat-a's zone from its node's labels, cat-b's from the slice itself.
    slice(
        &c,
        "cat-a",
        "catalog",
        "cat-a",
        a.addr(),
        json!({"kubernetes.io/hostname": "node-a"}),
    )
    .await;
    slice(
        &c,
        "cat-b",
        "catalog",
        "cat-b",
        b.addr(),
        json!({"topology.kubernetes.io/zone": "zone-b"}),
    )
    .await;
    let sinew = |kind: &str, plural: &str| ar("sinew.dev", "v1alpha1", kind, plural);
    apply(
        &c,
        &sinew("TrafficPolicy", "trafficpolicies"),
        json!({"metadata": {"name": "catalog"},
               "spec": {"targetRef": {"kind": "Service", "name": "catalog"}, "localityPreference": true}}),
    )
    .await;
    // A second client, meshed (injected: the annotation) on node-b and no Service's
    // endpoint: its zone comes from its Pod's Node alone.
    let inbound2 = mesh::free_addr();
    pod(
        &c,
        "client-2",
        "client-2",
        Some(inbound2.port()),
        Some("node-b"),
    )
    .await;
    Api::<Pod>::namespaced(c.clone(), "shop")
        .patch_status(
            "client-2",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"podIP": inbound2.ip().to_string(), "phase": "Running"}}),
            ),
        )
        .await
        .unwrap();
    let (bind, bind2) = (mesh::free_addr(), mesh::free_addr());
    for (name, bind) in [("client", bind), ("client-2", bind2)] {
        apply(
            &c,
            &sinew("Proxy", "proxies"),
            json!({"metadata": {"name": name},
                   "spec": {"outbound": {"upstreams": [{"bind": bind.to_string(), "service": "catalog"}]}}}),
        )
        .await;
    }

    let dir = mesh::Scratch::new();
    let kubeconfig = api.kubeconfig();
    let cp = mesh::Control::start_env(
        &dir.0.join("data"),
        mesh::free_addr(),
        &["--kubernetes"],
        &[("KUBECONFIG", kubeconfig.as_os_str())],
    )
    .await;
    let proxy = mesh::proxy(&cp, "shop/client", None, Duration::from_millis(100)).await;
    let proxy2 = mesh::proxy(&cp, "shop/client-2", None, Duration::from_millis(100)).await;
    mesh::listening(bind).await;
    mesh::listening(bind2).await;

    // The workloads' zones and regions, as the control plane made them.
    let out = mesh::sinew_as(
        &cp.url,
        Some(&cp.credentials),
        &["get", "workloads", "-n", "shop", "-o", "json"],
    )
    .await;
    let text = mesh::text(&out).0;
    let docs: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let items = docs
        .as_array()
        .cloned()
        .or_else(|| docs["items"].as_array().cloned())
        .unwrap_or_else(|| panic!("{text}"));
    let zone_of = |name: &str| {
        items
            .iter()
            .find(|w| w["metadata"]["name"] == name)
            .map(|w| {
                (
                    w["metadata"]["labels"]["topology.kubernetes.io/zone"].clone(),
                    w["metadata"]["labels"]["topology.kubernetes.io/region"].clone(),
                )
            })
            .unwrap_or_else(|| panic!("no workload {name}: {text}"))
    };
    assert_eq!(zone_of("client"), (json!("zone-a"), json!("region-1")));
    assert_eq!(zone_of("client-2"), (json!("zone-b"), json!("region-1")));
    assert_eq!(zone_of("cat-a"), (json!("zone-a"), json!("region-1")));
    assert_eq!(zone_of("cat-b"), (json!("zone-b"), Value::Null));

    // The client is in zone-a: everything goes to cat-a.
    let who = |bind: SocketAddr| async move {
        let r = client::get(bind, "catalog", "/").await.ok()?;
        Some(r.headers.get("x-backend")?.to_str().ok()?.to_owned())
    };
    wait::until("requests reach cat-a", mesh::TIMEOUT, || async move {
        who(bind).await.as_deref() == Some("a")
    })
    .await
    .unwrap();
    let before = b.requests();
    for _ in 0..30 {
        assert_eq!(
            who(bind).await.as_deref(),
            Some("a"),
            "the client's zone first"
        );
    }
    assert_eq!(b.requests(), before, "nothing crossed to zone-b");
    // And client-2, in zone-b, to cat-b.
    wait::until(
        "client-2's requests reach cat-b",
        mesh::TIMEOUT,
        || async move { who(bind2).await.as_deref() == Some("b") },
    )
    .await
    .unwrap();
    let before = a.requests();
    for _ in 0..30 {
        assert_eq!(
            who(bind2).await.as_deref(),
            Some("b"),
            "client-2's zone first"
        );
    }
    assert_eq!(a.requests(), before, "nothing crossed to zone-a");

    // The slices move: cat-a's own zone (zone-b) overrides its node's, cat-b's is zone-a
    // now. Traffic follows.
    slice(
        &c,
        "cat-a",
        "catalog",
        "cat-a",
        a.addr(),
        json!({"kubernetes.io/hostname": "node-a", "topology.kubernetes.io/zone": "zone-b"}),
    )
    .await;
    slice(
        &c,
        "cat-b",
        "catalog",
        "cat-b",
        b.addr(),
        json!({"topology.kubernetes.io/zone": "zone-a"}),
    )
    .await;
    wait::until("requests move to cat-b", mesh::TIMEOUT, || async move {
        let mut all = true;
        for _ in 0..10 {
            all &= who(bind).await.as_deref() == Some("b");
        }
        all
    })
    .await
    .unwrap();
    wait::until(
        "client-2's requests move to cat-a",
        mesh::TIMEOUT,
        || async move {
            let mut all = true;
            for _ in 0..10 {
                all &= who(bind2).await.as_deref() == Some("a");
            }
            all
        },
    )
    .await
    .unwrap();
    drop((proxy, proxy2));
}

/// A control plane whose ClusterRole predates Nodes (an upgrade that kept the old role)
/// still serves the mesh: the source does not wait for a Node watch it may not open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_permission_on_nodes_the_rest_still_syncs() {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    let api = ApiServer::start_with_args(&["--authorization-mode=RBAC"])
        .await
        .expect("a real kube-apiserver (scripts/kube-envtest build)");
    let c = api.client().await.unwrap();
    sinew_k8s::install_crds(&c, &sinew_k8s::crds())
        .await
        .unwrap();
    let pp = PostParams::default();
    for ns in ["shop", "sinew-system"] {
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
        Api::<Namespace>::all(c.clone())
            .create(&pp, &ns)
            .await
            .unwrap();
    }
    let sa: ServiceAccount = serde_json::from_value(
        json!({"metadata": {"name": "sinew-control", "namespace": "sinew-system"}}),
    )
    .unwrap();
    let sas = Api::<ServiceAccount>::namespaced(c.clone(), "sinew-system");
    sas.create(&pp, &sa).await.unwrap();
    // The published role without `nodes`.
    let mut role = sinew_k8s::rbac::cluster_role();
    for rule in role.rules.iter_mut().flatten() {
        if let Some(r) = rule.resources.as_mut() {
            r.retain(|r| r != "nodes");
        }
    }
    Api::<ClusterRole>::all(c.clone())
        .create(&pp, &role)
        .await
        .unwrap();
    Api::<Role>::namespaced(c.clone(), "sinew-system")
        .create(&pp, &sinew_k8s::rbac::lease_role("sinew-system"))
        .await
        .unwrap();
    let subject =
        json!([{"kind": "ServiceAccount", "name": "sinew-control", "namespace": "sinew-system"}]);
    let crb: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "sinew-control"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "sinew-control"},
        "subjects": subject
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(c.clone())
        .create(&pp, &crb)
        .await
        .unwrap();
    let rb: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "sinew-control", "namespace": "sinew-system"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sinew-control"},
        "subjects": subject
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(c.clone(), "sinew-system")
        .create(&pp, &rb)
        .await
        .unwrap();
    let req = k8s_openapi::api::authentication::v1::TokenRequest {
        spec: k8s_openapi::api::authentication::v1::TokenRequestSpec {
            audiences: vec![sinew_testkit::kube::API_AUDIENCE.to_owned()],
            ..Default::default()
        },
        ..Default::default()
    };
    let token = sas
        .create_token_request("sinew-control", &pp, &req)
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let restricted = api.client_for("control", &token).await.unwrap();
    assert!(
        Api::<Node>::all(restricted)
            .list(&Default::default())
            .await
            .is_err(),
        "the role really cannot read Nodes"
    );

    let app = HttpBackend::start("catalog").await.unwrap();
    create::<Service>(
        &c,
        json!({"metadata": {"name": "catalog", "namespace": "shop"},
               "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}),
    )
    .await;
    pod(&c, "catalog-0", "catalog", None, Some("node-a")).await;
    slice(
        &c,
        "catalog-0",
        "catalog",
        "catalog-0",
        app.addr(),
        json!({}),
    )
    .await;
    let bind = mesh::free_addr();
    apply(
        &c,
        &ar("sinew.dev", "v1alpha1", "Proxy", "proxies"),
        json!({"metadata": {"name": "client"},
               "spec": {"outbound": {"upstreams": [{"bind": bind.to_string(), "service": "catalog"}]}}}),
    )
    .await;
    let dir = mesh::Scratch::new();
    let kubeconfig = api.kubeconfig_for_token("control", &token).unwrap();
    let cp = mesh::Control::start_env(
        &dir.0.join("data"),
        mesh::free_addr(),
        &["--kubernetes", "--lease-namespace", "sinew-system"],
        &[("KUBECONFIG", kubeconfig.as_os_str())],
    )
    .await;
    let _proxy = mesh::proxy(&cp, "shop/client", None, Duration::from_millis(100)).await;
    mesh::listening(bind).await;
    wait::until("the endpoint serves", mesh::TIMEOUT, || async move {
        client::get(bind, "catalog", "/")
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await
    .unwrap();
}
