"""Scenarios over the full mesh path (2: HTTP/1.1 latency and throughput, plaintext and
mTLS; 3: HTTP/2 and gRPC-shaped), and the control plane at scale (6)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path

from . import peers as P
from .procs import HarnessError, cpu_seconds, settled_rss
from .report import ms
from .scenarios import Ctx, _latency_rows, _ratios, busy_rounds, measured, warm
from .stats import alternate, median, pct_list, spread
from .tools import BENCH, log, target_dir

VARIANTS = ["direct", "sinew plain", "envoy plain", "sinew mTLS", "envoy mTLS"]


def _start_paths(ctx: Ctx, app_h2: bool, tag: str) -> tuple[dict, P.ControlPlane]:
    env = ctx.env
    running = {"direct": P.direct(env)}
    cp = P.ControlPlane(env, f"control-{tag}")
    running["sinew plain"] = P.sinew_mesh_plain(env)
    running["envoy plain"] = P.envoy_mesh(env, mtls=False, app_h2=app_h2)
    running["sinew mTLS"] = P.sinew_mesh_mtls(env, cp)
    running["envoy mTLS"] = P.envoy_mesh(env, mtls=True, app_h2=app_h2)
    for name, r in running.items():
        r.name = name
    return running, cp


def _stop_paths(ctx: Ctx, running: dict, cp: P.ControlPlane | None) -> None:
    for r in running.values():
        P.stop(ctx.env, r)
    if cp is not None:
        cp.stop()


def _with_added(res: dict, key: str) -> None:
    """Adds `added_<key>` (the path minus direct, same round) to every round."""
    for name, rounds in res.items():
        for a, d in zip(rounds, res["direct"]):
            if a.get(key) is not None and d.get(key) is not None:
                a[f"added_{key}"] = a[key] - d[key]


def s2_mesh(ctx: Ctx) -> dict:
    cfg = ctx.cfg
    running, cp = {}, None
    try:
        running, cp = _start_paths(ctx, app_h2=False, tag="s2")
        notes = [n for r in running.values() for n in r.notes]
        for r in running.values():
            warm(ctx, r)
        rows, ratios, orders = [], [], {}
        for rate in cfg["mesh_rates"]:
            log(f"s2: mesh path at {rate} rps, {cfg['mesh_rounds']} rounds of {cfg['duration']}s")
            res, orders[f"rate {rate}"] = alternate(VARIANTS, cfg["mesh_rounds"], lambda n, r: measured(
                ctx, running[n], f"s2 {n} at {rate} rps", duration_s=cfg["duration"],
                conns=cfg["fixed_conns"], rate=rate))
            _with_added(res, "p99_ms")
            rows += [dict(r, id=f"s2/{r['peer']}/{rate}")
                     for r in _latency_rows(ctx, "s2", VARIANTS, res, "direct", rate)]
            for sec in ("plain", "mTLS"):
                ratios += _ratios(ctx, "s2", f"sinew {sec}", [f"envoy {sec}"], res, "p99_ms",
                                  f"{sec}: p99 at {rate} rps", False)
                ratios += _ratios(ctx, "s2", f"sinew {sec}", [f"envoy {sec}"], res,
                                  "added_p99_ms", f"{sec}: added p99 at {rate} rps", False)
        log(f"s2: mesh path max rps, {cfg['mesh_max_rounds']} rounds of {cfg['max_duration']}s")
        res, orders["max rps"] = alternate(VARIANTS, cfg["mesh_max_rounds"], lambda n, r: measured(
            ctx, running[n], f"s2 {n} max rps", duration_s=cfg["max_duration"],
            conns=cfg["max_conns"]))
        max_rows = []
        for n in VARIANTS:
            lo, hi = spread([r["rps"] for r in res[n]])
            max_rows.append({"id": f"s2-max/{n}", "peer": n, "rounds": res[n],
                             "rps": median([r["rps"] for r in res[n]]), "rps_min": lo,
                             "rps_max": hi, "p99_ms": median([r["p99_ms"] for r in res[n]]),
                             "cpu_per_1k": median([r.get("cpu_per_1k") for r in res[n]]),
                             "busy_rounds": busy_rounds(res[n])})
        for sec in ("plain", "mTLS"):
            ratios += _ratios(ctx, "s2", f"sinew {sec}", [f"envoy {sec}"], res, "rps",
                              f"{sec}: max rps", True)
    finally:
        _stop_paths(ctx, running, cp)
    return {
        "title": "Scenario 2: the mesh path, client → outbound sidecar → inbound sidecar → server",
        "description": "HTTP/1.1 keep-alive from the client, 1 KiB responses; each sidecar has "
                       "one worker; the sidecar-to-sidecar hop is one HTTP/2 connection for "
                       "both Sinew and Envoy. *added*: the path minus direct, round by round. "
                       "Both sidecars share the proxy CPU.",
        "notes": notes, "rates": cfg["mesh_rates"], "rows": rows, "max_rows": max_rows,
        "ratios": ratios, "orders": orders,
        "expected": [f"s2/{n}/{r}" for r in cfg["mesh_rates"] for n in VARIANTS]
                    + [f"s2-max/{n}" for n in VARIANTS],
    }


GRPC_PATH = "bench.Bench/Call"


def s3_h2(ctx: Ctx) -> dict:
    cfg, env = ctx.cfg, ctx.env
    grpc_body = env.work / "grpc-request.bin"
    payload = bytes(100)
    grpc_body.write_bytes(b"\x00" + len(payload).to_bytes(4, "big") + payload)
    loads = {
        "h2 GET, h2load 4×16 streams": dict(kind="h2load", data=None, path="", expect=1024),
        "gRPC unary, h2load 4×16 streams": dict(kind="h2load", data=grpc_body, path=GRPC_PATH,
                                                 expect=1029),
        f"h2 GET, {cfg['h2_rate']} rps (oha, corrected)": dict(kind="oha", path="", expect=1024),
    }
    running, cp = {}, None
    rows, ratios = [], []
    try:
        running, cp = _start_paths(ctx, app_h2=True, tag="s3")
        for r in running.values():
            warm(ctx, r, http2=True, parallel=4)
        for label, spec in loads.items():
            log(f"s3: {label}, {cfg['h2_rounds']} rounds of {cfg['h2_duration']}s")

            def one(n, rnd, spec=spec, label=label):
                logf = env.work / f"h2load-{len(rows)}-{n.replace(' ', '-')}-{rnd}.log"
                if spec["kind"] == "h2load":
                    headers = (["content-type: application/grpc", "te: trailers"]
                               if spec["data"] else [])
                    return measured(ctx, running[n], f"s3 {n} {label}", expect_bytes=spec["expect"],
                                    h2load=dict(path=spec["path"], duration_s=cfg["h2_duration"],
                                                clients=4, streams=16, log_file=logf,
                                                data_file=spec["data"], headers=headers))
                return measured(ctx, running[n], f"s3 {n} {label}", expect_bytes=spec["expect"],
                                duration_s=cfg["h2_duration"], conns=2, http2=True, parallel=8,
                                rate=cfg["h2_rate"])
            res, _ = alternate(VARIANTS, cfg["h2_rounds"], one)
            for n in VARIANTS:
                rr = res[n]
                row = {"id": f"s3/{n}/{label}", "peer": n, "load": label, "rounds": rr,
                       "rps": median([r["rps"] for r in rr]),
                       "cpu_per_1k": median([r.get("cpu_per_1k") for r in rr]),
                       "busy_rounds": busy_rounds(rr)}
                for k in ("p50_ms", "p90_ms", "p99_ms", "p99.9_ms"):
                    row[k] = median([r[k] for r in rr])
                row["max_ms"] = max((r["max_ms"] for r in rr if r["max_ms"] is not None),
                                    default=None)
                rows.append(row)
            metric, better = (("rps", True) if spec["kind"] == "h2load" else ("p99_ms", False))
            for sec in ("plain", "mTLS"):
                ratios += _ratios(ctx, "s3", f"sinew {sec}", [f"envoy {sec}"], res, metric,
                                  f"{sec}: {label} ({'rps' if better else 'p99'})", better)
    finally:
        _stop_paths(ctx, running, cp)
    return {
        "title": "Scenario 3: HTTP/2 and gRPC-shaped load through the mesh path",
        "description": "The client speaks h2c (prior knowledge) to the outbound sidecar; the "
                       "inbound sidecar speaks HTTP/2 to the backend (Sinew keeps the client's "
                       "protocol; the Envoy inbound here is configured for HTTP/2 upstream). "
                       "gRPC-shaped: unary POST of a 100-byte message with `content-type: "
                       "application/grpc` and `te: trailers`, answered by one 1 KiB message and "
                       "a `grpc-status` trailer. h2load latencies come from its per-request log "
                       "(closed loop, so not corrected for coordinated omission); the oha row "
                       "is a fixed rate with correction.",
        "rows": rows, "ratios": ratios,
        "expected": [f"s3/{n}/{label}" for label in loads for n in VARIANTS],
    }


def control_plane_on_proxy_cpu(env, tag: str) -> P.ControlPlane:
    """A control plane that is what a scenario measures: it gets the proxy CPU."""
    saved = env.load_cpus
    env.load_cpus = env.proxy_cpus
    try:
        return P.ControlPlane(env, tag)
    finally:
        env.load_cpus = saved


def build_cpsim(ctx: Ctx) -> str:
    """Builds bench/cpsim (its own workspace) into the shared target directory."""
    target = target_dir()
    env = dict(os.environ, CARGO_TARGET_DIR=str(target))
    profile = ctx.env.tools.profile
    done = subprocess.run(["cargo", "build", "--quiet", "--profile", profile, "--locked",
                           "--manifest-path", str(BENCH / "cpsim" / "Cargo.toml")],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise HarnessError("building the control-plane simulator (bench/cpsim) failed:\n"
                           + "\n".join(done.stderr.splitlines()[-20:]))
    return str(target / ("debug" if profile == "dev" else profile) / "sinew-cpsim")


def _read_json_line(proc: subprocess.Popen, deadline_s: float, what: str) -> dict:
    end = time.monotonic() + deadline_s
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise HarnessError(f"cpsim: no {what} within {deadline_s:.0f}s")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            line = proc.stdout.readline()
            if not line:
                err = proc.stderr.read() if proc.poll() is not None else ""
                raise HarnessError(f"cpsim exited before {what}: {err.strip()[-800:]}")
            try:
                return json.loads(line)
            except json.JSONDecodeError as e:
                raise HarnessError(f"cpsim: not JSON: {line[:200]!r}") from e


def _hwm_kb(pid: int) -> int | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def s6_control_plane(ctx: Ctx):
    cfg, env = ctx.cfg, ctx.env
    n = cfg["cp_proxies"]
    log(f"s6: building the simulator; {n} proxies, {cfg['cp_endpoints']} endpoints, "
        f"{cfg['cp_changes']} changes")
    sim = build_cpsim(ctx)
    cp = control_plane_on_proxy_cpu(env, "control-s6")
    argv = [sim, *cp.cpsim_args(), "--proxies", str(n), "--services", str(cfg["cp_services"]),
            "--endpoints", str(cfg["cp_endpoints"]), "--changes", str(cfg["cp_changes"])]
    if env.load_cpus and env.pm.pin:
        argv = ["taskset", "-c", env.load_cpus, *argv]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        applied = _read_json_line(proc, 300, "apply")
        cp.proc.check()
        pids = cp.proc.pids()
        rss_docs = settled_rss(pids)
        cpu0 = cpu_seconds(pids)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        # The simulator has its own deadlines (storm 120 s, each change 60 s + 60 s).
        done = _read_json_line(proc, 240 + 130 * cfg["cp_changes"], "results")
        cp.proc.check()
        cpu = cpu_seconds(pids) - cpu0
        rss_conn = settled_rss(pids)
        hwm = _hwm_kb(cp.proc.pid)
        proc.stdin.close()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        cp.stop()
    st, ro, en = done["storm"], done["route"], done["endpoint"]

    def p(d):
        return f"p50 {ms(d['p50'])}, p99 {ms(d['p99'])}, max {ms(d['max'])} ms"
    rows = [
        ("mesh", "simulated proxies / endpoints / documents",
         f"{n:,} / {applied['endpoints']:,} / {applied['documents']:,} "
         f"(applied in {applied['apply_ms']:.0f} ms)"),
        ("rss_docs", "control-plane RSS, mesh applied, no proxy connected",
         f"{rss_docs / 1024:.1f} MB"),
        ("rss_conn", f"control-plane RSS, {n:,} proxies connected and in sync (peak)",
         f"{rss_conn / 1024:.1f} MB ({(hwm or 0) / 1024:.1f} MB)"),
        ("cpu", "control-plane CPU over the storm and the changes", f"{cpu:.2f} s"),
        ("storm", "connect storm: each proxy's full push", p(st["first_push"])),
        ("storm_all", f"connect storm: all {n:,} pushed / control plane reports all in sync",
         f"{st['all_pushed_ms']:.0f} ms / {st['all_synced_ms']:.0f} ms"),
        ("storm_retries", "connect storm: failed connection attempts (retried with the proxy's "
                          "backoff) / streams dropped after a push",
         f"{st['failed_attempts']:,} / {st['dropped_streams']:,}"),
        ("push_size", "full push size (median)",
         f"{st['full_push_resources']['p50']:.0f} resources"),
        ("route", f"route change ACKed by all (over {ro['all_acked']['n']} changes)",
         p(ro["all_acked"])),
        ("route_each", "route change, per proxy", p(ro["per_proxy"])),
        ("endpoint", f"endpoint change ACKed by all (over {en['all_acked']['n']} changes)",
         p(en["all_acked"]) if en["all_acked"]["n"] else "n/a"),
        ("endpoint_each", "endpoint change, per proxy",
         p(en["per_proxy"]) if en["all_acked"]["n"] else "n/a"),
        ("after_storm", "during the changes: failed attempts / dropped streams",
         f"{done['after_storm']['failed_attempts']:,} / {done['after_storm']['dropped_streams']:,}"),
        ("cp_acks", "control plane reports every ACK (ProxyStatus polled every 10 ms), per change",
         ", ".join(f"{c['cp_saw_all_acks_ms']:.0f}" for c in done["changes"]) + " ms"),
    ]
    alls = [c["all_acked_ms"] for c in done["changes"]]
    all_p99 = pct_list(alls, (99,))["p99"] if alls else None
    targets = [
        {"target": f"control plane ≤ 150 MB with {n:,} proxies",
         "measured": f"{rss_conn / 1024:.1f} MB (peak {(hwm or 0) / 1024:.1f} MB)",
         "status": "met" if rss_conn / 1024 <= 150 else "not met"},
        {"target": f"a change ACKed by all {n:,} proxies in ≤ 100 ms p99",
         "measured": f"p99 {ms(all_p99)} ms over {len(alls)} changes (debounce 20 ms included)",
         "status": "n/a" if all_p99 is None else ("met" if all_p99 <= 100 else "not met")},
    ]
    return {
        "title": "Scenario 6: the control plane at scale",
        "description": "`sinew-cpsim` (bench/cpsim) opens one gRPC stream per simulated proxy, "
                       "each on its own connection, speaking the real discovery protocol (Hello, "
                       "then an ACK per push; no config is compiled), all at once (the connect "
                       "storm); a failed attempt is retried with the real proxy's backoff (100 ms "
                       "doubling to 5 s, full jitter). Every proxy binds a "
                       "`common` service and 4 of the others. Changes alternate a route change "
                       "(the `common` HTTPRoute) and an endpoint change (a new `common` "
                       "Workload), timed from the Apply call until every proxy has ACKed. The "
                       "control plane runs on the proxy CPU, the simulator on the other.",
        "rows": [{"id": f"s6/{k}", "label": label, "value": v} for k, label, v in rows],
        "raw": {"applied": applied, "done": done, "rss_docs_kb": rss_docs,
                "rss_connected_kb": rss_conn, "hwm_kb": hwm, "cpu_s": cpu},
        "targets": targets,
        "expected": [f"s6/{k}" for k, _, _ in rows],
    }
