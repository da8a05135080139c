"""Scenario 8: resilience (issue 6).

A. One of three endpoints killed under load: three `bench-backend`s as three Workloads
   of Service `backend`, one proxy with retries, a per-try timeout and outlier
   detection for the service (Sinew with its default balancer, Sinew with round robin,
   and Envoy configured alike); oha at a fixed 1,000 rps; after a warm-up one backend
   gets SIGKILL. Recorded per round: requests, failures (non-2xx answers and oha
   errors), the time from the kill until the proxy's ejection counter moves (polled
   every 10 ms), and the retries the dead endpoint cost. Every round starts a fresh
   proxy (no ejection history, an empty retry budget) and the killed backend returns.
B. Policy overhead when configured but never triggered: the scenario-1 one-hop setup,
   Sinew without any policy against Sinew with a full policy set whose limits are far
   above the load; p50 at a fixed rate, rounds alternating; and, because a few
   microseconds are inside the noise of a shared VM, the proxy's instructions per
   request counted with `perf stat` (repeatable where timings are not), in all and
   one policy at a time.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

from . import peers as P
from .load import oha_json
from .procs import HarnessError, cpu_seconds, http_get, wait_until
from .scenarios import Ctx, busy_rounds, measured, wait_quiet, warm
from .stats import alternate, median, spread
from .tools import log, machine

# -- Configuration --------------------------------------------------------------------

# Retries on connect failures and resets (always retried for idempotent requests) and
# on 502/503/504; a per-try timeout; outlier detection on consecutive failures.
ROUTE_A = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: backend, namespace: bench}
spec:
  parentRefs: [{kind: Service, name: backend}]
  rules:
  - timeouts: {request: 5s, backendRequest: 1s}
    retry: {attempts: 2, codes: [502, 503, 504], backoff: 5ms,
            budget: {ratio: 0.2, minPerSecond: 10}}
"""
POLICY_A = """\
apiVersion: sinew.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: backend, namespace: bench}
spec:
  targetRef: {kind: Service, name: backend}
  outlierDetection: {consecutiveFailures: 3, baseEjectionTime: 30s, maxEjectionPercent: 50}
"""

# Everything configured, nothing triggered at 1,000 rps of 50 µs requests: timeouts of
# seconds, a retry budget, a hedge after 1 s, circuit-breaker limits in the thousands,
# outlier detection, a rate limit of 1,000,000 rps, and fault injection only for a
# header the load never sends plus a 0% abort/delay on every request. Built from
# pieces, so that each can also be measured alone.
CHAOS_RULE = """\
  - matches: [{headers: [{name: x-chaos, value: "on"}]}]
    filters: [{type: Fault, fault: {abort: {httpStatus: 503, percent: 100}}}]
"""
TIMEOUTS = "timeouts: {request: 10s, backendRequest: 5s}"
RETRY = ("retry: {attempts: 2, codes: [502, 503, 504], backoff: 25ms,\n"
         "            budget: {ratio: 0.2, minPerSecond: 10}}")
RETRY_HEDGE = ("retry: {attempts: 2, codes: [502, 503, 504], backoff: 25ms,\n"
               "            budget: {ratio: 0.2, minPerSecond: 10}, hedge: {delay: 1s}}")
FAULT_0 = ("filters: [{type: Fault, fault: {abort: {httpStatus: 503, percent: 0},\n"
           "                                    delay: {fixedDelay: 1s, percent: 0}}}]")
BREAKER = ("circuitBreaker: {maxRequests: 100000, maxRequestsPerEndpoint: 100000,\n"
           "                   maxConnectionsPerEndpoint: 10000, "
           "maxPendingRequestsPerEndpoint: 1000}")
OUTLIER = ("outlierDetection: {consecutiveFailures: 5, failurePercent: 50, "
           "minimumRequests: 100,\n"
           "                     interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 50}")
RATE_LIMIT = "rateLimits: [{name: backend-local, requestsPerSecond: 1000000, burst: 1000000}]"


def route_doc(rule: list[str], chaos: bool = False) -> str:
    """An HTTPRoute for Service backend: the optional chaos rule, then one rule for
    everything with the given settings."""
    body = "\n    ".join(rule) if rule else "{}"
    return f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: backend, namespace: bench}}
spec:
  parentRefs: [{{kind: Service, name: backend}}]
  rules:
{CHAOS_RULE if chaos else ""}  - {body}
"""


def policy_doc(parts: list[str]) -> str:
    body = "".join(f"  {x}\n" for x in parts)
    return f"""\
apiVersion: sinew.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: backend, namespace: bench}}
spec:
  targetRef: {{kind: Service, name: backend}}
{body}"""


ROUTE_B = route_doc([TIMEOUTS, RETRY_HEDGE, FAULT_0], chaos=True)
POLICY_B = policy_doc([BREAKER, OUTLIER, RATE_LIMIT])

# One piece at a time (instructions only): where the cost is.
BREAKDOWN = {
    "nothing (the baseline of this table)": "",
    "an HTTPRoute with one empty rule": route_doc([]),
    "timeouts (request + per try)": route_doc([TIMEOUTS]),
    "retries + budget": route_doc([RETRY]),
    "retries + budget + hedge (1 s)": route_doc([RETRY_HEDGE]),
    "fault injection (0% + a header-matched rule)": route_doc([FAULT_0], chaos=True),
    "circuit breaker": policy_doc([BREAKER]),
    "outlier detection": policy_doc([OUTLIER]),
    "rate limit (enforced at inbounds only)": policy_doc([RATE_LIMIT]),
}


def _service_docs(ports: list[int], lb: str | None = None) -> str:
    balancer = f"\n  loadBalancer: {lb}" if lb else ""
    docs = [f"""\
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {{name: backend, namespace: {P.NS}}}
spec:{balancer}
  ports: [{{name: http, port: 80, protocol: HTTP}}]
"""]
    for i, port in enumerate(ports):
        docs.append(f"""\
apiVersion: sinew.dev/v1alpha1
kind: Workload
metadata: {{name: backend-{i}, namespace: {P.NS}}}
spec: {{service: backend, address: 127.0.0.1, ports: {{http: {port}}}}}
""")
    return "---\n".join(docs)


# -- Metrics ----------------------------------------------------------------------------

def scrape(admin: int) -> dict[str, float]:
    """The proxy's /metrics (Prometheus text) as {series: value}."""
    status, body = http_get("127.0.0.1", admin, "/metrics", timeout=2.0)
    if status != 200:
        raise HarnessError(f"sinew-proxy admin {admin}: /metrics answered {status}")
    out = {}
    for line in body.decode(errors="replace").splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        try:
            out[series] = float(value)
        except ValueError:
            continue
    return out


def metric(m: dict[str, float], name: str, **labels: str) -> float:
    """The sum of `name`'s series whose labels include `labels`."""
    total = 0.0
    for series, v in m.items():
        n, _, rest = series.partition("{")
        if n == name and all(f'{k}="{val}"' in rest for k, val in labels.items()):
            total += v
    return total


def _errors_by_reason(m0: dict, m1: dict) -> dict[str, int]:
    out = {}
    for series, v in m1.items():
        if series.startswith("sinew_proxy_errors_total{"):
            d = int(v - m0.get(series, 0))
            if d:
                reason = series.split('reason="', 1)[-1].split('"', 1)[0]
                out[reason] = out.get(reason, 0) + d
    return out


def _answered(m: dict) -> float:
    return metric(m, "sinew_http_requests_total", direction="outbound")


def _failed(res: dict) -> tuple[int, int]:
    """(requests attempted, failed): non-2xx answers plus oha errors."""
    errors = sum((res.get("errors") or {}).values())
    ok = sum(v for k, v in res["statuses"].items() if k.startswith("2"))
    return res["requests"] + errors, res["requests"] - ok + errors


# -- A: an endpoint killed under load ----------------------------------------------------

@dataclass
class KillPeer:
    """A proxy for scenario A: how to start it over three backends, and how to read
    its counters (answered requests, ejections, retries, answers it made itself)."""
    name: str
    start: Callable[[P.Env, list[int]], P.Running]
    state: Callable[[P.Running], dict]
    config: str
    # Wall-clock times of ejections the proxy logged, when it logs them.
    logged_ejections: Callable[[P.Running], list[float]] | None = None


def _sinew_kill(lb: str | None) -> Callable[[P.Env, list[int]], P.Running]:
    def start(env: P.Env, ports: list[int]) -> P.Running:
        docs = _service_docs(ports, lb) + "---\n" + ROUTE_A + "---\n" + POLICY_A
        return P.sinew(env, "sinew-res" + ("-rr" if lb else ""), docs=docs)
    return start


def _sinew_state(running: P.Running) -> dict:
    m = scrape(running.admin_ports[0])
    made = {}
    for series, v in m.items():
        if series.startswith("sinew_proxy_errors_total{") and v:
            reason = series.split('reason="', 1)[-1].split('"', 1)[0]
            made[reason] = made.get(reason, 0) + int(v)
    return {"answered": _answered(m), "ejections": metric(m, "sinew_outlier_ejections_total"),
            "retries": metric(m, "sinew_retries_total"), "made": made}


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _sinew_logged_ejections(running: P.Running) -> list[float]:
    """When the proxy logged `endpoint ejected` (its WARN line's UTC timestamp)."""
    out = []
    try:
        text = running.procs[0].log.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        line = ANSI.sub("", line)
        if "endpoint ejected" in line:
            try:
                out.append(dt.datetime.fromisoformat(line.split()[0]).timestamp())
            except (ValueError, IndexError):
                continue
    return out


ENVOY_A = """\
cluster backend: ROUND_ROBIN over the three backends, connect_timeout 1s,
  outlier_detection {consecutive_5xx: 3, base_ejection_time: 30s, max_ejection_percent: 50}
  (connect failures and resets count as 5xx: split_external_local_origin_errors false),
  circuit_breakers retry_budget {budget_percent: 20, min_retry_concurrency: 10}
route: timeout 5s, retry_policy {retry_on: connect-failure,reset,5xx, num_retries: 2,
  per_try_timeout: 1s, retry_back_off {base_interval: 5ms}, retry_host_predicate:
  previous_hosts, host_selection_retry_max_attempts: 3}
"""


def _envoy_kill(env: P.Env, ports: list[int]) -> P.Running:
    port, admin = env.ports.take(), env.ports.take()
    hcm = P._hcm("backend", f"l{port}")
    hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]["route"] = {
        "cluster": "backend", "timeout": "5s",
        "retry_policy": {
            "retry_on": "connect-failure,reset,5xx", "num_retries": 2,
            "per_try_timeout": "1s",
            "retry_back_off": {"base_interval": "0.005s"},
            "retry_host_predicate": [{
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host."
                                          "previous_hosts.v3.PreviousHostsPredicate"}}],
            "host_selection_retry_max_attempts": 3}}
    cluster = P._cluster("backend", ports[0])
    cluster["connect_timeout"] = "1s"
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
        for p in ports]
    cluster["outlier_detection"] = {"consecutive_5xx": 3, "base_ejection_time": "30s",
                                    "max_ejection_percent": 50}
    cluster["circuit_breakers"] = {"thresholds": [{"retry_budget": {
        "budget_percent": {"value": 20.0}, "min_retry_concurrency": 10}}]}
    listener = {"name": f"l{port}",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [hcm]}]}
    proc, ready = P._start_envoy(env, "envoy-res", P._envoy_config(admin, [listener], [cluster]),
                                 admin)
    P._first_ok(port, [proc], "envoy-res")
    return P.Running("envoy", port, [proc], admin_ports=[admin], ready_s=ready)


def _envoy_state(running: P.Running) -> dict:
    status, body = http_get("127.0.0.1", running.admin_ports[0],
                            "/stats?filter=^(cluster\\.backend\\.|http\\.l)", timeout=2.0)
    if status != 200:
        raise HarnessError(f"envoy admin /stats answered {status}")
    st = {}
    for line in body.decode(errors="replace").splitlines():
        k, _, v = line.partition(": ")
        if v.strip().isdigit():
            st[k.strip()] = int(v)
    get = lambda suffix: sum(v for k, v in st.items() if k.endswith(suffix))  # noqa: E731
    made = {"downstream 5xx": get(".downstream_rq_5xx"),
            "retry overflow": st.get("cluster.backend.upstream_rq_retry_overflow", 0)}
    return {"answered": get(".downstream_rq_completed"),
            "ejections": st.get("cluster.backend.outlier_detection.ejections_enforced_total", 0),
            "retries": st.get("cluster.backend.upstream_rq_retry", 0),
            "made": {k: v for k, v in made.items() if v}}


KILL_PEERS = [
    KillPeer("sinew", _sinew_kill(None), _sinew_state,
             "default balancer (peak EWMA, power of two choices)", _sinew_logged_ejections),
    KillPeer("sinew round robin", _sinew_kill("RoundRobin"), _sinew_state,
             "`loadBalancer: RoundRobin` on the Service", _sinew_logged_ejections),
    KillPeer("envoy", _envoy_kill, _envoy_state, "Envoy 1.40, round robin (configuration above)"),
]


def _kill_round(ctx: Ctx, peer: KillPeer, r: int, backends: list, victim: int) -> dict:
    env, cfg = ctx.env, ctx.cfg
    rate, duration = cfg["res_rate"], cfg["res_duration"]
    running = peer.start(env, [port for _, port in backends])
    running.name = peer.name
    try:
        warm(ctx, running)
        busy = len(wait_quiet(ctx))
        s0 = peer.state(running)
        out = env.work / f"s8-kill-{peer.name.replace(' ', '-')}-{r}.json"
        t0 = time.monotonic()
        oha = ctx.load.oha_start(env.pm, "oha-s8", running.url, out, duration_s=duration,
                                 conns=cfg["fixed_conns"], rate=rate)
        # The warm-up under load: until the proxy has answered `res_kill_after`
        # requests of this run (polled), then the kill.
        wait_until(lambda: peer.state(running)["answered"] - s0["answered"]
                   >= cfg["res_kill_after"], duration,
                   f"{peer.name}: {cfg['res_kill_after']} requests before the kill",
                   [oha, *running.procs])
        proc, _ = backends[victim]
        s_kill = peer.state(running)
        t_kill, wall_kill = time.monotonic(), time.time()
        os.killpg(proc.pid, signal.SIGKILL)
        # Every 10 ms while the load runs: when the ejection counter moves, and
        # when the retries (tries that met the dead endpoint) last moved.
        ejected_s = ejected_lo_s = last_retry_s = None
        s_ej = None
        polls = 0
        prev_sent, last = t_kill, s_kill
        while oha.alive() and time.monotonic() < t0 + duration + 5:
            sent = time.monotonic()
            st = peer.state(running)
            seen = time.monotonic()
            polls += 1
            if ejected_s is None and st["ejections"] > s_kill["ejections"]:
                # Between the previous poll's request and this one's answer.
                ejected_s, ejected_lo_s, s_ej = seen - t_kill, prev_sent - t_kill, st
            if st["retries"] > last["retries"]:
                last_retry_s = seen - t_kill
            prev_sent, last = sent, st
            running.check()
            time.sleep(0.01)
        res = ctx.load.oha_finish(env.pm, oha, out, running.url, duration + 60)
        s1 = peer.state(running)
        running.check()
        logged = peer.logged_ejections(running) if peer.logged_ejections else None
        proc.popen.wait(timeout=5)
        env.pm.stop(proc)
    finally:
        P.stop(env, running)
    attempted, failed = _failed(res)
    made = {k: v - s0["made"].get(k, 0) for k, v in s1["made"].items()
            if v - s0["made"].get(k, 0)}
    row = {
        "round": r + 1, "peer": peer.name, "killed": f"backend-{victim}", "rate": rate,
        "duration_s": duration, "kill_at_s": t_kill - t0, "requests": attempted,
        "failed": failed, "failure_share": failed / attempted if attempted else None,
        "statuses": res["statuses"], "errors": res["errors"],
        "ejected_ms": None if ejected_s is None else ejected_s * 1000,
        "ejected_after_ms": None if ejected_lo_s is None else ejected_lo_s * 1000,
        # From the proxy's own log line, when it writes one (wall clock, µs).
        "ejected_logged_ms": None if not logged else (min(logged) - wall_kill) * 1000,
        "last_retry_ms": None if last_retry_s is None else last_retry_s * 1000,
        "polls": polls, "ejections": int(s1["ejections"] - s0["ejections"]),
        "retries_before_kill": int(s_kill["retries"] - s0["retries"]),
        "retries_after_kill": int(s1["retries"] - s_kill["retries"]),
        "retries_after_ejection": None if s_ej is None
        else int(s1["retries"] - s_ej["retries"]),
        "proxy_made": made,
        "p50_ms": res["p50_ms"], "p99_ms": res["p99_ms"], "p99.9_ms": res["p99.9_ms"],
        "max_ms": res["max_ms"], "achieved_rps": res["rps"], "busy_processes": busy,
    }
    log(f"s8: {peer.name}: round {r + 1}: killed backend-{victim} at {row['kill_at_s']:.1f} s; "
        f"{failed} of {attempted} failed; ejected "
        + ("never" if ejected_s is None else f"after {ejected_s * 1000:.0f} ms")
        + f"; {row['retries_after_kill']} retries after the kill")
    return row


def _kill_summary(name: str, rounds: list[dict]) -> dict:
    shares = [x["failure_share"] for x in rounds]
    ejected = [x["ejected_ms"] for x in rounds]
    never = sum(1 for v in ejected if v is None)
    return {
        "id": f"s8-kill/{name}", "table": "kill", "peer": name, "rounds": len(rounds),
        "busy_rounds": busy_rounds(rounds),
        "requests": sum(x["requests"] for x in rounds),
        "failed": sum(x["failed"] for x in rounds),
        "failure_share_median": median(shares), "failure_share_worst": max(shares),
        "ejected_ms_median": None if never else median(ejected),
        "ejected_ms_worst": None if never else max(ejected),
        "ejected_ms_median_of_ejected": median(ejected),
        "not_ejected_rounds": never,
        "last_retry_ms_worst": max((x["last_retry_ms"] or 0) for x in rounds),
        "retries_after_kill_median": median([x["retries_after_kill"] for x in rounds]),
        "retries_after_ejection_max": max((x["retries_after_ejection"] or 0) for x in rounds),
        "p99_ms_median": median([x["p99_ms"] for x in rounds]),
        "max_ms_worst": max(x["max_ms"] for x in rounds),
    }


def kill_under_load(ctx: Ctx) -> tuple[list[dict], list[dict], list]:
    env, cfg = ctx.env, ctx.cfg
    peers = KILL_PEERS
    log(f"s8: one of three endpoints killed at {cfg['res_rate']} rps, {cfg['res_rounds']} "
        f"rounds of {cfg['res_duration']} s per proxy (kill after {cfg['res_kill_after']} "
        "requests)")
    backends = [P.backend(env, f"res-backend-{i}") for i in range(3)]
    by_peer = {p.name: [] for p in peers}
    orders = []
    try:
        for r in range(cfg["res_rounds"]):
            victim = r % 3
            order = peers if r % 2 == 0 else list(reversed(peers))
            orders.append([p.name for p in order])
            for peer in order:
                by_peer[peer.name].append(_kill_round(ctx, peer, r, backends, victim))
                # The killed backend comes back (on a fresh port) for the next run.
                backends[victim] = P.backend(env, f"res-backend-{victim}")
    finally:
        for proc, _ in backends:
            env.pm.stop(proc)
    summary = [dict(_kill_summary(p.name, by_peer[p.name]), config=p.config) for p in peers]
    d = summary[0]
    if d["not_ejected_rounds"] and (d["retries_after_kill_median"] or 0) < 3:
        d["note"] = (
            "Sinew's default balancer charges a failed try a 1 s latency penalty (peak EWMA, "
            "crates/proxy/src/balance.rs), so after the dead endpoint's first failure the "
            "power-of-two-choices draw never picks it again until the penalty decays (tens "
            "of seconds): outlier detection, which needs 3 failures in a row, has nothing to "
            "count, and the endpoint is avoided rather than ejected (here after "
            f"{d['retries_after_kill_median']:.0f} failed try, median).")
    rows = [dict(x, id=f"s8-kill/{x['peer']}/{x['round']}", table="kill-round")
            for p in peers for x in by_peer[p.name]]
    return summary, rows, orders


# -- B: policies configured, never triggered -----------------------------------------------

def perf_usable(perf: str) -> str | None:
    """None when `perf stat` can count this user's instructions, else why not."""
    if not perf:
        return "perf is not installed (apt-get install linux-perf)"
    try:
        done = subprocess.run([perf, "stat", "-x,", "-e", "instructions:u", "true"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"perf not usable: {e}"
    line = next((x for x in done.stderr.splitlines() if "instructions" in x), "")
    if done.returncode != 0 or not line or not line.split(",")[0].isdigit():
        return f"perf stat cannot count instructions here: {done.stderr.strip()[-200:]}"
    return None


PERF_EVENTS = "instructions:u,instructions:k,cycles:u,cycles:k,task-clock"


def _count(ctx: Ctx, running: P.Running, requests: int, rate: int | None = None,
           label: str = "s8", closed_loop: bool = False, conns: int | None = None) -> dict:
    """The proxy's instructions over `requests` requests at the fixed rate (default
    `res_rate`; with `closed_loop`, as fast as it answers), with `perf stat -p PID`
    around an oha run. Every thread of the proxy counts (workers, admin, access-log
    writer)."""
    rate = None if closed_loop else rate or ctx.cfg["res_rate"]
    out = ctx.env.work / f"{label}-perf-{running.port}-{time.monotonic_ns()}.csv"
    pid = running.procs[0].pid
    running.check()
    busy = wait_quiet(ctx)
    m0 = scrape(running.admin_ports[0])
    cpu0 = cpu_seconds(running.pids())
    perf = [ctx.env.tools.perf, "stat", "-x,", "-o", str(out), "-e", PERF_EVENTS,
            "-p", str(pid), "--"]
    argv = ctx.load.oha_argv(running.url, requests=requests,
                             conns=conns or ctx.cfg["fixed_conns"], rate=rate, wrap=perf)
    done = subprocess.run(argv, capture_output=True, text=True,
                          timeout=requests / (rate or 10_000) + 60)
    if done.returncode != 0:
        raise HarnessError(f"perf stat around oha failed (exit {done.returncode}): "
                           f"{done.stderr.strip()[-400:]}")
    res = oha_json(done.stdout, running.url)
    cpu1 = cpu_seconds(running.pids())
    m1 = scrape(running.admin_ports[0])
    running.check()
    counts = {}
    for line in out.read_text().splitlines():
        parts = line.split(",")
        if len(parts) >= 3 and not line.startswith("#"):
            try:
                counts[parts[2]] = float(parts[0])
            except ValueError:  # <not counted>, <not supported>
                counts[parts[2]] = None
    need = ["instructions:u", "task-clock"]
    if any(counts.get(k) is None for k in need):
        raise HarnessError(f"perf stat counted no {need}: {out.read_text()[:400]!r}")
    if counts.get("instructions:k") is None:  # kernel counting not allowed: user only
        counts["instructions:k"] = 0.0
    answered = int(_answered(m1) - _answered(m0))
    attempted, failed = _failed(res)
    if failed or not answered:
        ctx.problem(f"{label} instruction count {running.name}: {failed} of {attempted} "
                    "failed")
    n = res["requests"]
    instr = counts["instructions:u"] + counts["instructions:k"]
    return {
        "requests": n, "proxy_answered": answered, "busy_processes": len(busy),
        "achieved_rps": res["rps"],
        "instructions_u": counts["instructions:u"], "instructions_k": counts["instructions:k"],
        "cycles_u": counts.get("cycles:u"), "cycles_k": counts.get("cycles:k"),
        "task_clock_ms": counts["task-clock"],
        "instr_per_req": instr / n, "instr_u_per_req": counts["instructions:u"] / n,
        "instr_k_per_req": counts["instructions:k"] / n,
        "cycles_per_req": (counts["cycles:u"] + counts["cycles:k"]) / n
        if counts.get("cycles:u") is not None and counts.get("cycles:k") is not None else None,
        "cpi_u": counts["cycles:u"] / counts["instructions:u"]
        if counts.get("cycles:u") and counts["instructions:u"] else None,
        "cpi_k": counts["cycles:k"] / counts["instructions:k"]
        if counts.get("cycles:k") and counts["instructions:k"] else None,
        # CPU time under perf: inflated by perf's own counter switching (see the text).
        "perf_task_clock_us_per_req": counts["task-clock"] * 1000 / n,
        "proc_cpu_us_per_req": (cpu1 - cpu0) * 1e6 / n,
        "instr_total": instr,
    }


def _triggered(m0: dict, m1: dict) -> dict[str, int]:
    """Anything a policy did between two scrapes (should be nothing)."""
    d = lambda name, **kw: int(metric(m1, name, **kw) - metric(m0, name, **kw))  # noqa: E731
    out = {"retries": d("sinew_retries_total"), "hedges": d("sinew_hedges_total"),
           "ejections": d("sinew_outlier_ejections_total"),
           "5xx": d("sinew_http_requests_total", direction="outbound", **{"class": "5xx"})}
    out.update(_errors_by_reason(m0, m1))
    return {k: v for k, v in out.items() if v}


def overhead(ctx: Ctx) -> tuple[list[dict], dict]:
    env, cfg = ctx.env, ctx.cfg
    names = ["sinew", "sinew+policies"]
    rate = cfg["res_rate"]
    running = {}
    try:
        running["sinew"] = P.sinew(env, "sinew-nopolicy")
        running["sinew+policies"] = P.sinew(
            env, "sinew-policies", docs=_service_docs([env.backend_port]) + "---\n" + ROUTE_B
            + "---\n" + POLICY_B)
        for n in names:
            running[n].name = n
            warm(ctx, running[n])
        _check_policies_loaded(running["sinew+policies"])
        m0 = {n: scrape(running[n].admin_ports[0]) for n in names}
        log(f"s8: policy overhead: {cfg['res_b_rounds']} rounds of {cfg['res_b_duration']} s "
            f"at {rate} rps per config")
        res, order = alternate(names, cfg["res_b_rounds"], lambda n, r: measured(
            ctx, running[n], f"s8 {n} at {rate} rps", duration_s=cfg["res_b_duration"],
            conns=cfg["fixed_conns"], rate=rate))
        why_not = perf_usable(env.tools.perf)
        counts, count_order = None, None
        if why_not is None:
            log(f"s8: instructions per request (perf stat), {cfg['res_instr_rounds']} rounds of "
                f"{cfg['res_instr_requests']} requests at {rate} rps per config")
            counts, count_order = alternate(names, cfg["res_instr_rounds"], lambda n, r: _count(
                ctx, running[n], cfg["res_instr_requests"]))
        m1 = {n: scrape(running[n].admin_ports[0]) for n in names}
    finally:
        for r in running.values():
            P.stop(env, r)
    breakdown = _breakdown(ctx) if why_not is None and cfg["res_breakdown_requests"] else []
    triggered = _triggered(m0["sinew+policies"], m1["sinew+policies"])
    if triggered:
        ctx.problem(f"s8: the policies were meant never to trigger, but: {triggered}")
    rows = []
    for n in names:
        rounds = res[n]
        row = {"id": f"s8-overhead/{n}", "table": "overhead", "peer": n, "rate": rate,
               "rounds": rounds, "busy_rounds": busy_rounds(rounds),
               "rate_not_sustained": any(x.get("rate_not_sustained") for x in rounds)}
        for k in ("p50_ms", "p90_ms", "p99_ms"):
            row[k] = median([x[k] for x in rounds])
        row["cpu_per_1k"] = median([x.get("cpu_per_1k") for x in rounds])
        if counts:
            c = counts[n]
            for k in ("instr_per_req", "instr_u_per_req", "instr_k_per_req", "cycles_per_req",
                      "cpi_u", "cpi_k", "perf_task_clock_us_per_req"):
                row[k] = median([x[k] for x in c])
            row["instr_per_req_range"] = spread([x["instr_per_req"] for x in c])
            row["counts"] = c
            row["busy_rounds"] += busy_rounds(c)
        rows.append(row)
    a, b = res["sinew"], res["sinew+policies"]
    diffs = [None if x["p50_ms"] is None or y["p50_ms"] is None
             else (y["p50_ms"] - x["p50_ms"]) * 1000 for x, y in zip(a, b)]
    diff = {"id": "s8-overhead/difference", "table": "overhead-diff",
            "p50_us_per_round": diffs, "p50_us": median(diffs), "p50_us_range": spread(diffs),
            "p99_us_per_round": [(y["p99_ms"] - x["p99_ms"]) * 1000 for x, y in zip(a, b)
                                 if x["p99_ms"] is not None and y["p99_ms"] is not None],
            "order": order, "triggered": triggered,
            "instructions": "perf stat" if counts else why_not}
    diff["p99_us"] = median(diff["p99_us_per_round"])
    if counts:
        per_round = [y["instr_per_req"] - x["instr_per_req"]
                     for x, y in zip(counts["sinew"], counts["sinew+policies"])]
        per_round_u = [y["instr_u_per_req"] - x["instr_u_per_req"]
                       for x, y in zip(counts["sinew"], counts["sinew+policies"])]
        pairs = list(zip(counts["sinew"], counts["sinew+policies"]))
        per_round_k = [y["instr_k_per_req"] - x["instr_k_per_req"] for x, y in pairs]
        cycles = [y["cycles_per_req"] - x["cycles_per_req"] for x, y in pairs
                  if x["cycles_per_req"] is not None and y["cycles_per_req"] is not None]
        both = counts["sinew"] + counts["sinew+policies"]
        cpi_u, cpi_k = median([x["cpi_u"] for x in both]), median([x["cpi_k"] for x in both])
        mhz = machine().get("cpu_mhz")
        d_u, d_k = median(per_round_u), median(per_round_k)
        est = None
        if None not in (cpi_u, cpi_k, mhz, d_u, d_k):
            # The added instructions at the proxy's measured cycles per instruction (user
            # and kernel apart), at the nominal clock.
            est = (d_u * cpi_u + d_k * cpi_k) / (mhz * 1e6) * 1e6
        # Cross-check: at the CPU time per instruction of the runs without perf (/proc).
        cpu_noperf = median([x.get("cpu_per_1k") for x in res["sinew"]])
        base_instr = median([x["instr_per_req"] for x in counts["sinew"]])
        ns_proc = None if cpu_noperf is None else cpu_noperf * 1e6 / base_instr
        diff.update(cpu_us_noperf=None if cpu_noperf is None else cpu_noperf * 1000,
                    cpu_us_underperf=median([x["proc_cpu_us_per_req"] for x in counts["sinew"]]),
                    instr_per_req=median(per_round), instr_per_req_per_round=per_round,
                    instr_u_per_req=d_u, instr_k_per_req=d_k, cpi_u=cpi_u, cpi_k=cpi_k,
                    cpu_mhz=mhz, est_us=est,
                    ns_per_instr_proc=ns_proc,
                    est_us_proc=None if ns_proc is None else median(per_round) * ns_proc / 1000,
                    cycles_per_req=median(cycles), cycles_per_req_per_round=cycles,
                    count_order=count_order)
    rows.append(diff)
    # Against the table's own baseline: runs of the same length (a run's fixed costs,
    # accepting oha's connections, spread over its requests).
    for b in breakdown:
        b["instr_added"] = b["instr_per_req"] - breakdown[0]["instr_per_req"]
        b["instr_u_added"] = b["instr_u_per_req"] - breakdown[0]["instr_u_per_req"]
    rows += breakdown
    return rows, {"perf": why_not is None, "why_not": why_not}


def _breakdown(ctx: Ctx) -> list[dict]:
    """Each piece of the policy set alone, one proxy at a time: instructions per
    request (one run each: the counts repeat to within a fraction of a percent)."""
    env, cfg = ctx.env, ctx.cfg
    n = cfg["res_breakdown_requests"]
    log(f"s8: instructions per request, one policy at a time ({len(BREAKDOWN)} configs, "
        f"{n} requests each)")
    rows = []
    for i, (label, doc) in enumerate(BREAKDOWN.items()):
        running = P.sinew(env, f"sinew-piece-{i}", docs=_service_docs([env.backend_port])
                          + ("---\n" + doc if doc else ""))
        running.name = label
        try:
            warm(ctx, running)
            m0 = scrape(running.admin_ports[0])
            c = _count(ctx, running, n)
            triggered = _triggered(m0, scrape(running.admin_ports[0]))
        finally:
            P.stop(env, running)
        if triggered:
            ctx.problem(f"s8: {label}: meant never to trigger, but: {triggered}")
        rows.append(dict(c, id=f"s8-piece/{i}", table="piece", peer=label,
                         busy_rounds=int(bool(c["busy_processes"])), triggered=triggered))
    return rows


def _check_policies_loaded(running: P.Running) -> None:
    """The policy proxy's applied configuration holds the route and the policy (a
    typo would otherwise measure nothing)."""
    _, body = http_get("127.0.0.1", running.admin_ports[0], "/config", timeout=2.0)
    text = body.decode(errors="replace")
    for needle in ("retry", "hedge", "outlier", "x-chaos"):
        if needle not in text.lower():
            raise HarnessError(f"s8: the policy proxy's /config does not mention {needle!r}")


# -- The scenario ------------------------------------------------------------------------

def s8_resilience(ctx: Ctx) -> dict:
    kill_rows, kill_rounds, kill_orders = kill_under_load(ctx)
    over_rows, over_info = overhead(ctx)
    cfg = ctx.cfg
    return {
        "title": "Scenario 8: resilience, an endpoint killed under load, and the cost of "
                 "policies that never trigger",
        "description_kill": (
            "Three `bench-backend`s are three Workloads of Service `backend`. The proxy "
            "(one worker, pinned like every proxy here) retries and ejects as configured "
            f"below. oha sends a fixed {cfg['res_rate']} rps (`-q {cfg['res_rate']} "
            f"--latency-correction`, {cfg['fixed_conns']} connections, idempotent GETs) "
            f"for {cfg['res_duration']} s; once the proxy has answered "
            f"{cfg['res_kill_after']:,} of them (polled), one backend gets SIGKILL. "
            "*failed*: non-2xx answers plus oha errors, over the whole run. *ejected "
            "after*: from the kill "
            "until the proxy's ejection counter moved (Sinew "
            "`sinew_outlier_ejections_total`, Envoy "
            "`outlier_detection.ejections_enforced_total`), polled every 10 ms; an upper "
            "bound (the previous poll, a lower bound, is in the JSON); *log*: Sinew's own "
            "`endpoint ejected` log line's timestamp minus the kill's. *retries after "
            "kill*: the proxy's retry counter; in this setup only the dead endpoint fails, "
            "so these are the tries that met it (each sent again elsewhere). *last retry*: "
            "when that counter last moved, i.e. roughly the last try sent to the dead "
            "endpoint (Sinew counts a retry when it decides on it, Envoy when it sends it, "
            "after the backoff: so Envoy's last retry, and its one *retry after ejection*, "
            "are the rescue of the try that triggered the ejection). Sinew runs twice: with"
            " its default balancer (peak EWMA, power of two choices) and with round robin, "
            "the balancer Envoy uses here. With the default balancer the first try at the "
            "dead endpoint ejects it at once (a refused connect, or a broken connection "
            "and a refused probe); when that try "
            "comes depends on the draw, which never picks the costliest of three "
            "endpoints, so the ejection time varies from round to round while no request "
            "fails (bench/README.md, scenario 8). Each round starts a fresh proxy (no ejection "
            "history, an empty retry budget), the proxies take turns (A B C, then C B A), "
            "each round kills the next backend, and the killed backend is restarted before "
            "the next run. The 10 ms polling of the admin port runs on the proxy's core, "
            "the same for every proxy."),
        "config_kill": ROUTE_A + "---\n" + POLICY_A,
        "config_kill_envoy": ENVOY_A, "kill_orders": kill_orders,
        "description_overhead": (
            "The scenario-1 one-hop setup (one backend). *sinew*: no policy; "
            "*sinew+policies*: the route and TrafficPolicy below, whose limits are far above "
            f"the load, so nothing triggers (checked: no retries, hedges, ejections, 5xx or "
            f"proxy-made answers). Fixed {cfg['res_rate']} rps, {cfg['res_b_rounds']} rounds "
            f"of {cfg['res_b_duration']} s, alternating. Instructions: `perf stat -e "
            f"{PERF_EVENTS} -p PID` on the proxy while oha sends "
            f"{cfg['res_instr_requests']:,} requests at {cfg['res_rate']} rps, "
            f"{cfg['res_instr_rounds']} rounds alternating; per request = instructions ÷ "
            "requests; everything the proxy did meanwhile counts (its timers too, the same "
            "for both). User-space counts repeat to within a fraction of a percent; kernel "
            "counts less so. The µs estimate converts the instruction difference at the "
            "cycles per instruction measured in the same runs (user and kernel apart) and "
            "the nominal clock from /proc/cpuinfo: an estimate, not a measurement; it "
            "assumes the added instructions run at the proxy's average speed and all lie on "
            "the request's path. perf's own time is not used: counting four hardware "
            "events makes the kernel switch counters at every context switch, which in a VM "
            "costs a lot (the table shows the proxy's CPU time per request with and without "
            "perf, from /proc), so task-clock under perf says little, and cycles are "
            "somewhat inflated too (a conservative CPI). The cross-check uses "
            "the CPU time per request of the latency rounds (no perf; /proc, 10 ms ticks) "
            "divided by instructions per request. The summary judges the target on the "
            "estimate, since a p50 difference of a few µs is inside the round-to-round "
            "noise here. The rate limit is enforced at the inbound of the Service's "
            "workloads (sidecars), so on this outbound-only path it is configured but not "
            "on the request path."),
        "config_overhead": ROUTE_B + "---\n" + POLICY_B,
        "perf": over_info,
        "rows": kill_rows + kill_rounds + over_rows,
        "expected": ([r["id"] for r in kill_rows] + [r["id"] for r in kill_rounds]
                     + ["s8-overhead/sinew", "s8-overhead/sinew+policies",
                        "s8-overhead/difference"]
                     + [r["id"] for r in over_rows if r.get("table") == "piece"]),
    }
