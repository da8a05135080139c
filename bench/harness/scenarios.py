"""The scenarios. Each returns a JSON-ready section with `rows` (one per table row,
each with an `id`) and `expected` (the row ids it must produce)."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import peers as P
from .idle import IdleConnections
from .load import LoadGen
from .procs import (HarnessError, busy_processes, cpu_seconds, rss_kb, pss_kb, settled_rss,
                    threads)
from .stats import alternate, median, median_ci, pct_list, round_ratios, spread
from .tools import ROOT, log

PCTS = ("p50_ms", "p90_ms", "p99_ms", "p99.9_ms", "max_ms")


@dataclass
class Ctx:
    env: P.Env
    load: LoadGen
    mode: str
    cfg: dict
    strict: bool
    problems: list = field(default_factory=list)
    busy_runs: int = 0
    runs: int = 0
    quiet_wait_s: float = 0.0     # how long to wait, before a run, for compilers to finish
    waited_s: float = 0.0

    def problem(self, msg: str) -> None:
        if self.strict:
            raise HarnessError(msg)
        log(f"WARNING: {msg}")
        self.problems.append(msg)


def _verify(ctx: Ctx, res: dict, what: str, rate: float | None,
            expect_bytes: int | None = 1024) -> None:
    bad = []
    if res["requests"] == 0:
        bad.append("no request completed")
    elif res["ok"] != res["requests"]:
        bad.append(f"non-200 answers: {res['statuses']}")
    elif expect_bytes and (res.get("bytes_per_request") or 0) < expect_bytes:
        bad.append(f"{res.get('bytes_per_request')} body bytes per response, "
                   f"expected {expect_bytes}")
    errors = dict(res.get("errors") or {})
    # Requests still in flight when the run's time is up (oha over HTTP/2 cuts them
    # off even with -w): at most one per stream, not a failure.
    aborted = errors.pop("aborted due to deadline", 0)
    if aborted:
        res["aborted_at_deadline"] = aborted
        if aborted > res.get("in_flight_max", 0):
            errors["aborted due to deadline"] = aborted
    if errors:
        bad.append(f"errors: {errors}")
    if bad:
        res["problem"] = "; ".join(bad)
        ctx.problem(f"{what}: {res['problem']}")
    if rate is not None and res["requests"] and res["rps"] < 0.9 * rate:
        # Not a failure (no timing threshold ever fails a run): marked in the results.
        res["rate_not_sustained"] = True


def wait_quiet(ctx: Ctx) -> list[str]:
    """Before a load run: waits (a while) for compilers on the machine to finish,
    counts the run, and returns the compilers still running."""
    # At most quiet_wait_s per run, and ten times that over the whole run.
    if ctx.quiet_wait_s > 0 and ctx.waited_s < 10 * ctx.quiet_wait_s and busy_processes():
        t0 = time.monotonic()
        while busy_processes() and time.monotonic() - t0 < ctx.quiet_wait_s:
            time.sleep(0.5)
        ctx.waited_s += time.monotonic() - t0
    busy = busy_processes()
    ctx.runs += 1
    ctx.busy_runs += bool(busy)
    return busy


def measured(ctx: Ctx, running: P.Running, what: str, *, h2load: dict | None = None,
             expect_bytes: int = 1024, **oha) -> dict:
    """One load run against a peer, with the peer's CPU time over the run."""
    running.check()
    busy = wait_quiet(ctx)
    pids = running.pids()
    c0 = cpu_seconds(pids) if pids else None
    # The shared backend does the same work per request behind every peer: its CPU
    # time per request is a gauge of how disturbed the machine was during the run.
    bpids = ctx.env.backend.pids() if ctx.env.backend is not None else []
    b0 = cpu_seconds(bpids) if bpids else None
    if h2load is not None:
        res = ctx.load.h2load(running.url + h2load.pop("path", ""), **h2load)
    else:
        res = ctx.load.oha(running.url + oha.pop("path", ""), **oha)
        res["in_flight_max"] = oha.get("conns", 16) * oha.get("parallel", 1)
    if pids:
        res["cpu_s"] = cpu_seconds(pids) - c0
        res["cpu_per_1k"] = res["cpu_s"] / (res["requests"] / 1000) if res["requests"] else None
    if bpids and res["requests"]:
        res["backend_cpu_us"] = (cpu_seconds(bpids) - b0) / res["requests"] * 1e6
    res["busy_processes"] = len(busy)
    running.check()
    _verify(ctx, res, what, oha.get("rate"), expect_bytes)
    return res


def warm(ctx: Ctx, running: P.Running, **kw) -> None:
    res = ctx.load.oha(running.url + kw.pop("path", ""), requests=ctx.cfg["warm_requests"],
                       conns=16, **kw)
    _verify(ctx, res, f"{running.name}: warm-up", None)


def _latency_rows(ctx, label, names, res, direct_name, rate):
    rows = []
    for n in names:
        rounds = res[n]
        row = {"id": f"{label}/{n}/{rate}", "peer": n, "rate": rate, "rounds": rounds}
        for k in PCTS:
            vals = [r[k] for r in rounds]
            row[k] = max(vals) if k == "max_ms" else median(vals)
        row["achieved_rps"] = median([r["rps"] for r in rounds])
        row["cpu_per_1k"] = median([r.get("cpu_per_1k") for r in rounds])
        row["backend_cpu_us"] = median([r.get("backend_cpu_us") for r in rounds])
        row["backend_cpu_us_max"] = spread([r.get("backend_cpu_us") for r in rounds])[1]
        row["rate_not_sustained"] = any(r.get("rate_not_sustained") for r in rounds)
        row["busy_rounds"] = busy_rounds(rounds)
        if direct_name and n != direct_name:
            for k in ("p50_ms", "p99_ms"):
                row[f"added_{k}"] = median([a[k] - d[k] for a, d in zip(rounds, res[direct_name])
                                            if a[k] is not None and d[k] is not None])
        rows.append(row)
    return rows


def busy_rounds(rounds) -> int:
    """How many of the rounds had compilers running beside them."""
    return sum(1 for r in rounds if r.get("busy_processes"))


def _ratios(ctx, scenario, a, others, res, metric, label, higher_is_better):
    out = []
    for b in others:
        per_round = round_ratios(res[a], res[b], metric)
        ci = median_ci(per_round)
        out.append({"scenario": scenario, "what": label, "metric": metric, "a": a, "b": b,
                    "per_round": per_round, "median": median(per_round),
                    "median_ci95": None if ci is None else [ci[0], ci[1]],
                    "range": spread(per_round), "higher_is_better": higher_is_better})
    return out


# -- Scenario 1 (and 5): one hop ---------------------------------------------------------

def s1_one_hop(ctx: Ctx) -> dict:
    env, cfg = ctx.env, ctx.cfg
    names = ["direct", "sinew", "envoy", "nginx", "haproxy"]
    running = {"direct": P.direct(env)}
    try:
        for n in names[1:]:
            running[n] = P.SINGLE_HOP[n](env)
        for n in names:
            warm(ctx, running[n])
        rows, ratios, orders = [], [], {}
        for rate in cfg["rates"]:
            log(f"s1: fixed rate {rate} rps, {cfg['rounds']} rounds of {cfg['duration']}s per peer")
            res, orders[f"rate {rate}"] = alternate(names, cfg["rounds"], lambda n, r: measured(
                ctx, running[n], f"s1 {n} at {rate} rps", duration_s=cfg["duration"],
                conns=cfg["fixed_conns"], rate=rate))
            rows += _latency_rows(ctx, "s1", names, res, "direct", rate)
            ratios += _ratios(ctx, "s1", "sinew", ["envoy", "nginx", "haproxy"], res, "p99_ms",
                              f"p99 at {rate} rps", False)
        log(f"s1: max rps, closed loop, {cfg['max_conns']} connections, "
            f"{cfg['max_rounds']} rounds of {cfg['max_duration']}s")
        res, orders["max rps"] = alternate(names, cfg["max_rounds"], lambda n, r: measured(
            ctx, running[n], f"s1 {n} max rps", duration_s=cfg["max_duration"],
            conns=cfg["max_conns"]))
        max_rows = []
        for n in names:
            lo, hi = spread([r["rps"] for r in res[n]])
            max_rows.append({"id": f"s1-max/{n}", "peer": n, "rounds": res[n],
                             "rps": median([r["rps"] for r in res[n]]), "rps_min": lo,
                             "rps_max": hi, "p99_ms": median([r["p99_ms"] for r in res[n]]),
                             "cpu_per_1k": median([r.get("cpu_per_1k") for r in res[n]]),
                             "busy_rounds": busy_rounds(res[n])})
        ratios += _ratios(ctx, "s1", "sinew", ["envoy", "nginx", "haproxy", "direct"], res, "rps",
                          "max rps, one worker", True)
        after = {n: {"rss_kb": rss_kb(running[n].pids()), "threads": threads(running[n].pids())}
                 for n in names[1:]}
    finally:
        for n in names[1:]:
            if n in running:
                P.stop(env, running[n])
    s1 = {"title": "Scenario 1: one proxy hop, HTTP/1.1 keep-alive, 1 KiB responses",
          "rows": rows, "max_rows": max_rows, "ratios": ratios, "orders": orders,
          "after_load": after,
          "expected": [f"s1/{n}/{r}" for r in cfg["rates"] for n in names]
                      + [f"s1-max/{n}" for n in names]}
    return s1


def s5_from_s1(s1: dict) -> dict:
    """Scenario 5, CPU seconds per 1,000 requests: scenario 1's proxies' CPU time per
    run, so it comes with every scenario-1 run (and can be derived from its JSON)."""
    rows, max_rows = s1["rows"], s1["max_rows"]
    names = list(dict.fromkeys(r["peer"] for r in rows if r["peer"] != "direct"))
    rates = list(dict.fromkeys(r["rate"] for r in rows))
    s5_rows = []
    for n in names:
        for row in rows:
            if row["peer"] == n:
                s5_rows.append({"id": f"s5/{n}/{row['rate']}", "peer": n, "load": f"{row['rate']} rps",
                                "cpu_per_1k": row["cpu_per_1k"],
                                "per_round": [r.get("cpu_per_1k") for r in row["rounds"]]})
        m = next(r for r in max_rows if r["peer"] == n)
        s5_rows.append({"id": f"s5/{n}/max", "peer": n, "load": "max rps (closed loop)",
                        "cpu_per_1k": m["cpu_per_1k"],
                        "per_round": [r.get("cpu_per_1k") for r in m["rounds"]]})
    return {"title": "Scenario 5: CPU seconds per 1,000 requests (one hop)", "rows": s5_rows,
            "expected": [f"s5/{n}/{r}" for n in names for r in [*rates, "max"]]}


# -- Scenario 4: memory -----------------------------------------------------------------

def symbol_order(binary: str) -> dict | None:
    """How much of the link order beside this sinew-proxy (symbol-order.txt, made by
    scripts/gen-symbol-order for the release build; crates/proxy/build.rs) names
    functions it has: all of them when scripts/release-build made it, none without
    it (then idle RSS reads ~2 MB higher), so the record says which."""
    listed_path = Path(binary).parent / "symbol-order.txt"
    if not listed_path.is_file():
        return None
    try:
        listed = {line.strip() for line in listed_path.read_text().splitlines() if line.strip()}
        out = subprocess.run(["nm", "--defined-only", binary], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    have = {p[2] for p in (line.split() for line in out.splitlines()) if len(p) == 3}
    return {"listed": len(listed), "present": len(listed & have)}


def s4_memory(ctx: Ctx) -> dict:
    env, cfg = ctx.env, ctx.cfg
    levels = cfg["idle_levels"]
    order = symbol_order(env.tools.sinew_proxy)
    if env.tools.profile == "release" and (not order or order["present"] < order["listed"]):
        ctx.problem("s4: this release sinew-proxy is not linked in its profiled order "
                    "(build it with scripts/release-build), and idle RSS reads ~2 MB high")
    rows = []
    for n in ["sinew", "envoy", "nginx", "haproxy"]:
        log(f"s4: {n}: idle RSS, then {', '.join(map(str, levels))} idle connections")
        running = P.SINGLE_HOP[n](env)
        holder = IdleConnections()
        try:
            pids = running.pids()
            row = {"id": f"s4/{n}", "peer": n, "processes": len(pids),
                   "threads": threads(pids), "idle_rss_kb": settled_rss(pids),
                   "idle_pss_kb": pss_kb(pids), "levels": []}
            held = 0
            for level in levels:
                target = level
                if n == "haproxy":
                    target = min(level, P.haproxy_maxconn(env) - 50)
                try:
                    holder.add(running.port, target - held)
                except RuntimeError as e:
                    ctx.problem(f"s4 {n}: opening {target} idle connections: {e}")
                    break
                held = target
                open_now = holder.still_open()
                if open_now != held:
                    ctx.problem(f"s4 {n}: {held - open_now} of {held} idle connections were "
                                "closed by the proxy")
                pids = running.pids()
                rss = settled_rss(pids)
                row["levels"].append({"level": level, "connections": held, "rss_kb": rss,
                                      "pss_kb": pss_kb(pids)})
                running.check()
            lv = row["levels"]
            if len(lv) >= 2:
                a, b = lv[0], lv[-1]
                row["per_conn_kb"] = (b["rss_kb"] - a["rss_kb"]) / (b["connections"] - a["connections"])
                row["per_conn_basis"] = f"slope {a['connections']} -> {b['connections']}"
            elif lv:
                row["per_conn_kb"] = (lv[0]["rss_kb"] - row["idle_rss_kb"]) / lv[0]["connections"]
                row["per_conn_basis"] = f"(RSS at {lv[0]['connections']} - idle) / {lv[0]['connections']}"
            rows.append(row)
        finally:
            holder.close()
            P.stop(env, running)
    return {"title": "Scenario 4: memory (VmRSS), idle and with idle keep-alive connections",
            "levels": levels, "rows": rows, "symbol_order": order,
            "expected": [f"s4/{n}" for n in ["sinew", "envoy", "nginx", "haproxy"]]}


# -- Scenario 7: start to ready -----------------------------------------------------------

def s7_startup(ctx: Ctx) -> dict:
    env, cfg = ctx.env, ctx.cfg
    cp = P.ControlPlane(env, "control-s7")
    cp.apply(P._sinew_service_docs(env.backend_port, None))
    reps = cfg["startup_reps"] + 1
    # One token for every start (each is a fresh proxy that bootstraps).
    token = cp.token_file("client", uses=reps)
    # Every start gets its own Proxy document (its own binding port), all applied
    # now: a document applied just before its proxy starts may not be published yet
    # (the control plane debounces), which would time the debounce, not the proxy.
    slots = [(f"startup-{i}", env.ports.take(), env.ports.take()) for i in range(reps)]
    cp.apply("---\n".join(P.sinew_cp_client_docs(port, name).split("---\n", 1)[1]
                          for name, port, _ in slots))
    free = iter(slots)

    def sinew_cp(_env: P.Env) -> P.Running:
        name, port, admin = next(free)
        t0 = time.monotonic()
        proc = P._sinew_proxy(env, "sinew-joined", [
            "--control-plane", cp.url, "--name", f"{P.NS}/{name}",
            "--join-token-file", str(token)], admin)
        P.wait_http(admin, "/ready", 30, [proc, cp.proc], what="sinew-proxy (joined) /ready")
        ready = time.monotonic() - t0
        P._first_ok(port, [proc], "sinew (joined)")
        r = P.Running("sinew-cp", port, [proc], admin_ports=[admin], ready_s=ready,
                      first_ok_s=time.monotonic() - t0)
        _, metrics = P.http_get("127.0.0.1", admin, "/metrics")
        if b"sinew_certificate_expiry_timestamp_seconds" not in metrics:
            raise HarnessError("the joined sinew-proxy was ready without a certificate")
        return r

    starters = {"sinew": P.sinew, "sinew+cp": sinew_cp, "envoy": P.envoy,
                "nginx": P.nginx, "haproxy": P.haproxy}
    names = list(starters)

    def once(n, r):
        running = starters[n](env)
        P.stop(env, running)
        return {"ready_s": running.ready_s, "first_ok_s": running.first_ok_s}

    try:
        log(f"s7: start to ready, {cfg['startup_reps']} starts per peer (after one unrecorded)")
        for n in names:  # binaries into the page cache, the CA warmed up: not recorded
            once(n, -1)
        res, orders = alternate(names, cfg["startup_reps"], once)
    finally:
        cp.stop()
    signal = {"sinew": "/ready (config loaded, listeners bound)",
              "sinew+cp": "/ready (certificate from the CA + config from the control plane)",
              "envoy": "admin /ready (LIVE)", "nginx": "(first proxied 200)",
              "haproxy": "(first proxied 200)"}
    rows = []
    for n in names:
        ready = pct_list([x["ready_s"] * 1000 for x in res[n]])
        first = pct_list([x["first_ok_s"] * 1000 for x in res[n]])
        rows.append({"id": f"s7/{n}", "peer": n, "signal": signal[n], "runs": len(res[n]),
                     "ready_ms": ready, "first_ok_ms": first, "rounds": res[n]})
    return {"title": "Scenario 7: time from process start to ready", "rows": rows,
            "orders": orders, "expected": [f"s7/{n}" for n in names]}
