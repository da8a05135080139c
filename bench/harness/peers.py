"""The peers, each configured for the same job, and how to start them.

Single hop (client -> proxy -> backend, HTTP/1.1 keep-alive to the backend, one worker):
  direct   the client talks to the backend itself (the floor)
  sinew    sinew-proxy --workers 1, an outbound upstream binding to the backend
  envoy    --concurrency 1, static listener -> cluster
  nginx    worker_processes 1, upstream keepalive
  haproxy  nbthread 1, http-reuse always

Mesh path (client -> outbound sidecar -> inbound sidecar -> backend), one worker each:
  sinew    two sinew-proxy; plaintext from a file, mTLS through the control plane and
           join tokens (certificates from Sinew's CA); the hop is HTTP/2
  envoy    two Envoys; the hop is HTTP/2 (plaintext, or TLS 1.3 with client
           certificates and SPIFFE SAN checks, certificates made with openssl)
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .procs import HarnessError, Ports, Proc, ProcessManager, http_get, wait_http, wait_until
from .tools import Tools

NS = "bench"
TRUST_DOMAIN = "cluster.local"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/{NS}/sa/backend"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/{NS}/sa/client"


@dataclass
class Env:
    """What every peer needs: tools, processes, ports, where to write, CPU placement."""
    tools: Tools
    pm: ProcessManager
    ports: Ports
    work: Path
    proxy_cpus: str      # where proxies run (pinned)
    load_cpus: str       # where the load generator, backend and control plane run
    nofile: int          # the descriptor limit proxies inherit
    backend_port: int = 0
    backend: Proc | None = None   # the shared backend (its CPU per request gauges noise)


@dataclass
class Running:
    """A started peer: where clients send, and the processes to measure."""
    name: str
    port: int
    procs: list[Proc] = field(default_factory=list)   # measured (RSS, CPU)
    aux: list[Proc] = field(default_factory=list)     # started for it, not measured
    admin_ports: list[int] = field(default_factory=list)
    ready_s: float | None = None       # spawn -> the peer's own readiness signal
    first_ok_s: float | None = None    # spawn -> first proxied 200
    notes: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def pids(self) -> list[int]:
        out: list[int] = []
        for p in self.procs:
            out.extend(p.pids())
        return out

    def check(self) -> None:
        for p in self.procs + self.aux:
            p.check()


def stop(env: Env, running: Running) -> None:
    for p in running.procs + running.aux:
        env.pm.stop(p)


def _first_ok(port: int, procs: list[Proc], what: str, deadline_s: float = 30.0) -> float:
    return wait_http(port, "/", deadline_s, procs, what=f"{what}: first proxied request")


# -- The backend ----------------------------------------------------------------------

def backend(env: Env, name: str = "backend", body_bytes: int = 1024) -> tuple[Proc, int]:
    """A bench-backend on a fresh port, answering: (process, port)."""
    port = env.ports.take()
    proc = env.pm.start(name, [env.tools.backend, "--listen", f"127.0.0.1:{port}",
                               "--body-bytes", str(body_bytes), "--workers", "1"],
                        cpus=env.load_cpus)
    wait_http(port, "/", 20, [proc], what="bench-backend")
    status, body = http_get("127.0.0.1", port, "/")
    if status != 200 or len(body) != body_bytes:
        raise HarnessError(f"bench-backend answered {status} with {len(body)} bytes, "
                           f"expected 200 with {body_bytes}")
    return proc, port


def start_backend(env: Env, body_bytes: int = 1024) -> Proc:
    """The run's shared backend (env.backend_port)."""
    proc, env.backend_port = backend(env, "backend", body_bytes)
    env.backend = proc
    return proc


def direct(env: Env) -> Running:
    return Running("direct", env.backend_port)


# -- Sinew ----------------------------------------------------------------------------

SINEW_ENV = {"RUST_LOG": "warn"}


def _sinew_service_docs(backend_port: int, sidecar_port: int | None) -> str:
    sidecar = f", sidecar: {{port: {sidecar_port}}}" if sidecar_port else ""
    return f"""\
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {{name: backend, namespace: {NS}}}
spec:
  ports: [{{name: http, port: 80, protocol: HTTP}}]
---
apiVersion: sinew.dev/v1alpha1
kind: Workload
metadata: {{name: backend-0, namespace: {NS}}}
spec: {{service: backend, address: 127.0.0.1, ports: {{http: {backend_port}}}{sidecar}}}
"""


def _sinew_proxy(env: Env, name: str, args: list[str], admin: int,
                 stdout: Path | None = None, wrap: list[str] = ()) -> Proc:
    """sinew-proxy with one worker; `wrap` goes before it (valgrind), and `stdout`
    (access logs) to that file, opened for appending."""
    return env.pm.start(name, [*wrap, env.tools.sinew_proxy, *args, "--workers", "1",
                               "--admin", f"127.0.0.1:{admin}"],
                        cpus=env.proxy_cpus, env=SINEW_ENV, stdout=stdout, append=True)


def sinew(env: Env, tag: str = "sinew", docs: str | None = None, spec_extra: str = "",
          stdout: Path | None = None, wrap: list[str] = (),
          ready_deadline_s: float = 30) -> Running:
    """One outbound binding to Service `backend`; `docs` (Service, Workloads,
    policies) default to the shared backend as the one Workload. `spec_extra`: more
    of the Proxy's spec (e.g. `accessLog: {format: json}`), as YAML lines."""
    port, admin = env.ports.take(), env.ports.take()
    cfg = env.work / f"{tag}-{port}.yaml"
    cfg.write_text(f"""\
apiVersion: sinew.dev/v1alpha1
kind: Proxy
metadata: {{name: edge, namespace: {NS}}}
spec:
  outbound:
    upstreams: [{{bind: "127.0.0.1:{port}", service: backend, port: http}}]
{spec_extra}---
""" + (docs if docs is not None else _sinew_service_docs(env.backend_port, None)))
    t0 = time.monotonic()
    proc = _sinew_proxy(env, tag, ["--config", str(cfg)], admin, stdout=stdout, wrap=wrap)
    wait_http(admin, "/ready", ready_deadline_s, [proc], what=f"{tag} /ready")
    ready = time.monotonic() - t0
    _first_ok(port, [proc], tag)
    return Running("sinew", port, [proc], admin_ports=[admin], ready_s=ready,
                   first_ok_s=time.monotonic() - t0)


def sinew_mesh_plain(env: Env) -> Running:
    port, inbound = env.ports.take(), env.ports.take()
    admins = [env.ports.take(), env.ports.take()]
    cfg = env.work / f"sinew-mesh-{port}.yaml"
    cfg.write_text(f"""\
apiVersion: sinew.dev/v1alpha1
kind: Proxy
metadata: {{name: client, namespace: {NS}}}
spec:
  outbound:
    upstreams: [{{bind: "127.0.0.1:{port}", service: backend, port: http}}]
---
apiVersion: sinew.dev/v1alpha1
kind: Proxy
metadata: {{name: server, namespace: {NS}}}
spec:
  inbound: {{bind: "127.0.0.1:{inbound}", appAddress: 127.0.0.1, ports: [{env.backend_port}]}}
---
""" + _sinew_service_docs(env.backend_port, inbound))
    server = _sinew_proxy(env, "sinew-inbound", ["--config", str(cfg), "--name", f"{NS}/server"],
                          admins[1])
    client = _sinew_proxy(env, "sinew-outbound", ["--config", str(cfg), "--name", f"{NS}/client"],
                          admins[0])
    for a in admins:
        wait_http(a, "/ready", 30, [server, client], what="sinew-proxy /ready")
    _first_ok(port, [server, client], "sinew mesh")
    return Running("sinew", port, [client, server], admin_ports=admins)


class ControlPlane:
    """`sinew control` on loopback, with a fresh data directory, and the CLI with the
    admin credential it writes on first start (the API is TLS only, every call
    authenticated)."""

    def __init__(self, env: Env, tag: str = "control"):
        self.env = env
        self.port = env.ports.take()
        self.url = f"https://127.0.0.1:{self.port}"
        self.dir = env.work / f"{tag}-{self.port}"
        self.dir.mkdir(parents=True)
        self.credentials = self.dir / "data" / "admin.credentials"
        self.tokens = 0
        self.proc = env.pm.start(tag, [env.tools.sinew, "control", "--listen",
                                       f"127.0.0.1:{self.port}", "--data-dir",
                                       str(self.dir / "data")],
                                 cpus=env.load_cpus, env=SINEW_ENV)
        wait_until(self._reachable, 30, "the control plane", [self.proc])

    def _cli_env(self) -> dict:
        return {**os.environ, "SINEW_CREDENTIALS": str(self.credentials)}

    def _reachable(self) -> bool:
        if not self.credentials.exists():
            return False
        done = subprocess.run([self.env.tools.sinew, "--server", self.url, "check"],
                              capture_output=True, text=True, env=self._cli_env())
        return done.returncode == 0

    def cli(self, *args: str, stdin: str | None = None) -> str:
        done = subprocess.run([self.env.tools.sinew, "--server", self.url, *args],
                              input=stdin, capture_output=True, text=True, env=self._cli_env())
        if done.returncode != 0:
            raise HarnessError(f"sinew {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def apply(self, docs: str) -> None:
        self.cli("apply", "-f", "-", stdin=docs)

    def token_file(self, account: str, uses: int = 1, ns: str = NS) -> Path:
        """A new join token for `ns`/`account` good for `uses` bootstraps, in an
        owner-only file (tokens are single-use by default: one per proxy start)."""
        self.tokens += 1
        path = self.dir / f"token-{ns}-{account}-{self.tokens}"
        token = self.cli("token", "create", "-n", ns, "--service-account", account,
                         "--uses", str(uses))
        token = token.strip().splitlines()[0]
        path.write_text(token + "\n")
        os.chmod(path, 0o600)
        return path

    def cpsim_args(self) -> list[str]:
        """bench/cpsim's flags: where, the admin credential, and a join token for its
        simulated proxies' one identity."""
        return ["--server", self.url, "--credentials", str(self.credentials),
                "--join-token-file", str(self.token_file("cpsim", ns="sim"))]

    def stop(self) -> None:
        self.env.pm.stop(self.proc)


def sinew_cp_client_docs(port: int, name: str = "client") -> str:
    return f"""\
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {{name: backend, namespace: {NS}}}
spec:
  ports: [{{name: http, port: 80, protocol: HTTP}}]
---
apiVersion: sinew.dev/v1alpha1
kind: Proxy
metadata: {{name: {name}, namespace: {NS}}}
spec:
  outbound:
    upstreams: [{{bind: "127.0.0.1:{port}", service: backend, port: http}}]
"""


def sinew_mesh_mtls(env: Env, cp: ControlPlane) -> Running:
    """Both sidecars join with tokens; the hop is mTLS with certificates from the CA."""
    port, inbound = env.ports.take(), env.ports.take()
    admins = [env.ports.take(), env.ports.take()]
    cp.apply(sinew_cp_client_docs(port))
    server = _sinew_proxy(env, "sinew-inbound-mtls", [
        "--control-plane", cp.url, "--name", f"{NS}/backend-0", "--service", "backend",
        "--port", f"http={env.backend_port}", "--inbound", f"127.0.0.1:{inbound}",
        "--join-token-file", str(cp.token_file("backend"))], admins[1])
    client = _sinew_proxy(env, "sinew-outbound-mtls", [
        "--control-plane", cp.url, "--name", f"{NS}/client",
        "--join-token-file", str(cp.token_file("client"))], admins[0])
    procs = [client, server]
    for a in admins:
        wait_http(a, "/ready", 30, procs + [cp.proc], what="sinew-proxy (mTLS) /ready")
    # Ready means "has a config and a certificate"; the client learns the server's
    # endpoint once the server has registered, so poll for the first proxied 200.
    _first_ok(port, procs, "sinew mesh (mTLS)")
    running = Running("sinew", port, procs, aux=[], admin_ports=admins)
    running.notes.append(_verify_sinew_mtls(inbound, admins))
    return running


def _verify_sinew_mtls(inbound: int, admins: list[int]) -> str:
    """Checks the hop really is mTLS: both proxies hold a certificate, and the inbound
    refuses a plaintext request."""
    for a in admins:
        _, metrics = http_get("127.0.0.1", a, "/metrics")
        if b"sinew_certificate_expiry_timestamp_seconds" not in metrics:
            raise HarnessError(f"sinew-proxy (admin {a}) holds no certificate: not mTLS")
    try:
        status, _ = http_get("127.0.0.1", inbound, "/", timeout=2.0)
    except OSError:
        status = None
    except Exception:  # noqa: BLE001 - any protocol failure means plaintext was refused
        status = None
    if status == 200:
        raise HarnessError("the Sinew inbound answered a plaintext request: not strict mTLS")
    return "mTLS verified: both sidecars hold CA certificates; the inbound refuses plaintext"


# -- Envoy ----------------------------------------------------------------------------

def _hcm(cluster: str, stat: str) -> dict:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                     "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat,
            "codec_type": "AUTO",
            # Sinew neither generates request ids nor adds x-envoy-* headers.
            "generate_request_id": False,
            "route_config": {"name": "r", "virtual_hosts": [{
                "name": "all", "domains": ["*"],
                "routes": [{"match": {"prefix": "/"},
                            "route": {"cluster": cluster, "timeout": "0s"}}]}]},
            "http_filters": [{
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http."
                                          "router.v3.Router",
                                 "suppress_envoy_headers": True}}],
        },
    }


def _cluster(name: str, port: int, h2: bool = False, tls: dict | None = None) -> dict:
    c = {
        "name": name, "type": "STATIC", "connect_timeout": "5s", "lb_policy": "ROUND_ROBIN",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                        "port_value": port}}}}]}]},
    }
    if h2:
        c["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                         "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}
    if tls:
        c["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
    return c


def _listener(port: int, cluster: str, tls: dict | None = None) -> dict:
    chain = {"filters": [_hcm(cluster, f"l{port}")]}
    if tls:
        chain["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
    return {"name": f"l{port}",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [chain]}


def _envoy_config(admin: int, listeners: list[dict], clusters: list[dict]) -> dict:
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                     "port_value": admin}}},
            "static_resources": {"listeners": listeners, "clusters": clusters}}


def _start_envoy(env: Env, tag: str, config: dict, admin: int) -> tuple[Proc, float]:
    path = env.work / f"{tag}-{admin}.json"
    path.write_text(json.dumps(config, indent=1))
    t0 = time.monotonic()
    proc = env.pm.start(tag, [env.tools.envoy, "-c", str(path), "--concurrency", "1",
                              "--disable-hot-restart", "-l", "warning"],
                        cpus=env.proxy_cpus)
    wait_http(admin, "/ready", 60, [proc], what=f"{tag} /ready")
    return proc, time.monotonic() - t0


def envoy(env: Env) -> Running:
    port, admin = env.ports.take(), env.ports.take()
    t0 = time.monotonic()
    proc, ready = _start_envoy(env, "envoy", _envoy_config(
        admin, [_listener(port, "backend")], [_cluster("backend", env.backend_port)]), admin)
    _first_ok(port, [proc], "envoy")
    return Running("envoy", port, [proc], admin_ports=[admin], ready_s=ready,
                   first_ok_s=time.monotonic() - t0)


def make_certs(env: Env) -> Path:
    """A P-256 CA and two leaf certificates with SPIFFE URI SANs, like Sinew's."""
    d = env.work / "certs"
    if (d / "client.pem").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    ossl = env.tools.openssl

    def run(*args):
        done = subprocess.run([ossl, *args], cwd=d, capture_output=True, text=True)
        if done.returncode != 0:
            raise HarnessError(f"openssl {' '.join(args)}: {done.stderr.strip()}")
    run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "ca.key")
    run("req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", "2", "-subj", "/CN=bench-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", "ca.pem")
    for name, spiffe in (("server", SERVER_ID), ("client", CLIENT_ID)):
        (d / f"{name}.ext").write_text(
            f"subjectAltName=URI:{spiffe}\nextendedKeyUsage=serverAuth,clientAuth\n"
            "keyUsage=critical,digitalSignature\nbasicConstraints=critical,CA:FALSE\n")
        run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-out", f"{name}.key")
        run("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-sha256", "-extfile", f"{name}.ext",
            "-out", f"{name}.pem")
    return d


def _tls_common(certs: Path, me: str, peer_id: str) -> dict:
    return {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3",
                       "tls_maximum_protocol_version": "TLSv1_3"},
        "alpn_protocols": ["h2"],
        "tls_certificates": [{"certificate_chain": {"filename": str(certs / f"{me}.pem")},
                              "private_key": {"filename": str(certs / f"{me}.key")}}],
        "validation_context": {
            "trusted_ca": {"filename": str(certs / "ca.pem")},
            "match_typed_subject_alt_names": [{"san_type": "URI",
                                               "matcher": {"exact": peer_id}}]},
    }


def envoy_mesh(env: Env, mtls: bool, app_h2: bool = False) -> Running:
    port, inbound = env.ports.take(), env.ports.take()
    admins = [env.ports.take(), env.ports.take()]
    up_tls = down_tls = None
    if mtls:
        certs = make_certs(env)
        up_tls = {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                           "UpstreamTlsContext",
                  "sni": "backend.bench",
                  "common_tls_context": _tls_common(certs, "client", SERVER_ID)}
        down_tls = {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                             "DownstreamTlsContext",
                    "require_client_certificate": True,
                    "common_tls_context": _tls_common(certs, "server", CLIENT_ID)}
    tag = ("envoy-mtls" if mtls else "envoy-mesh") + ("-h2" if app_h2 else "")
    server, _ = _start_envoy(env, f"{tag}-inbound", _envoy_config(
        admins[1], [_listener(inbound, "app", down_tls)],
        [_cluster("app", env.backend_port, h2=app_h2)]), admins[1])
    client, _ = _start_envoy(env, f"{tag}-outbound", _envoy_config(
        admins[0], [_listener(port, "peer")],
        [_cluster("peer", inbound, h2=True, tls=up_tls)]), admins[0])
    _first_ok(port, [client, server], f"envoy mesh{' (mTLS)' if mtls else ''}")
    running = Running("envoy", port, [client, server], admin_ports=admins)
    if mtls:
        running.notes.append(_verify_envoy_mtls(admins[0], inbound))
    return running


def _verify_envoy_mtls(client_admin: int, inbound: int) -> str:
    _, stats = http_get("127.0.0.1", client_admin, "/stats?filter=cluster.peer.ssl.handshake")
    handshakes = [int(line.split(":")[1]) for line in stats.decode().splitlines()
                  if line.startswith("cluster.peer.ssl.handshake:")]
    if not handshakes or handshakes[0] < 1:
        raise HarnessError(f"outbound Envoy made no TLS handshake to its peer: {stats!r}")
    try:
        status, _ = http_get("127.0.0.1", inbound, "/", timeout=2.0)
    except Exception:  # noqa: BLE001 - refused, reset or garbage: plaintext refused
        status = None
    if status == 200:
        raise HarnessError("the inbound Envoy answered a plaintext request: not mTLS")
    return "mTLS verified: the outbound Envoy completed TLS handshakes; the inbound refuses plaintext"


# -- nginx and HAProxy -------------------------------------------------------------------

def nginx(env: Env) -> Running:
    port = env.ports.take()
    d = env.work / f"nginx-{port}"
    (d / "logs").mkdir(parents=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    conns = max(1024, env.nofile - 200)
    (d / "nginx.conf").write_text(f"""\
{user}worker_processes 1;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
worker_rlimit_nofile {env.nofile};
events {{ worker_connections {conns}; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 600s;
  upstream backend {{
    server 127.0.0.1:{env.backend_port};
    keepalive 64;
    keepalive_requests 10000000;
    keepalive_timeout 600s;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=16384;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
""")
    t0 = time.monotonic()
    proc = env.pm.start("nginx", [env.tools.nginx, "-p", str(d), "-c", str(d / "nginx.conf"),
                                  "-e", str(d / "logs" / "error.log")], cpus=env.proxy_cpus)
    _first_ok(port, [proc], "nginx")
    first = time.monotonic() - t0
    return Running("nginx", port, [proc], ready_s=first, first_ok_s=first)


def haproxy_maxconn(env: Env) -> int:
    """The most connections HAProxy accepts under the descriptor limit (it reserves
    two descriptors per connection)."""
    return max(1000, (env.nofile - 200) // 2)


def haproxy(env: Env) -> Running:
    port = env.ports.take()
    path = env.work / f"haproxy-{port}.cfg"
    path.write_text(f"""\
global
  nbthread 1
  maxconn {haproxy_maxconn(env)}
defaults
  mode http
  timeout connect 5s
  timeout client 600s
  timeout server 600s
  timeout http-keep-alive 600s
  option http-keep-alive
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  http-reuse always
  server b1 127.0.0.1:{env.backend_port}
""")
    t0 = time.monotonic()
    proc = env.pm.start("haproxy", [env.tools.haproxy, "-f", str(path), "-db"],
                        cpus=env.proxy_cpus)
    _first_ok(port, [proc], "haproxy")
    first = time.monotonic() - t0
    return Running("haproxy", port, [proc], ready_s=first, first_ok_s=first)


SINGLE_HOP = {"sinew": sinew, "envoy": envoy, "nginx": nginx, "haproxy": haproxy}
