"""Results: the Markdown table and the JSON record, and their validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .procs import HarnessError
from .stats import median_ci


def f(v, digits=2, unit=""):
    if v is None:
        return "n/a"
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return "n/a"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}{unit}"
    if abs(v) >= 1000:
        return f"{v:,.0f}{unit}"
    if abs(v) >= 100:
        return f"{v:.0f}{unit}"
    return f"{v:.{digits}f}{unit}"


def ms(v):
    return f(v, 3)


def pct(share, digits=3):
    """A share (0..1) as a percentage."""
    return "n/a" if share is None else f"{share * 100:.{digits}f}%"


def signed(v, digits=1):
    return "n/a" if v is None else f"{v:+,.{digits}f}"


def peer(r):
    """The row's label, marked † when a compiler ran beside one of its rounds."""
    return r["peer"] + (" †" if r.get("busy_rounds") else "")


BACKEND_NOTE = ("*backend µs / req*: the shared backend's CPU time per request over each run; "
                "it does the same work behind every peer, so a round where it rises is a "
                "round where the machine itself ran slow (see bench/README.md, \"Reading "
                "the tail\").")


def has_backend(rows) -> bool:
    """Whether the record has the backend-CPU column (older ones do not)."""
    return any(r.get("backend_cpu_us") is not None for r in rows)


BACKEND_HEAD = "backend µs / req (median; worst round)"


def backend_cell(r) -> str:
    return f"{f(r.get('backend_cpu_us'), 1)}; {f(r.get('backend_cpu_us_max'), 1)}"


def x(v):
    return "n/a" if v is None else f"{v:.2f}×"


def ci_text(r) -> str:
    """The 95% confidence interval of a ratio's median over rounds (order statistics,
    no assumption about the distribution), from its per-round values, so records
    written before it existed render it too."""
    ci = median_ci(r["per_round"])
    return "n/a (under 6 rounds)" if ci is None else f"{x(ci[0])} – {x(ci[1])}"


class Doc:
    """Markdown built line by line; table rows are keyed so validation can find them."""

    def __init__(self):
        self.lines: list[str] = []
        self.rows: dict[str, str] = {}       # row id -> rendered line
        self.tables: list[tuple[int, int]] = []  # (header columns, row count) per table

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, header: list[str], rows: list[tuple[str | None, list]]) -> None:
        self.lines.append("| " + " | ".join(header) + " |")
        self.lines.append("|" + "|".join("---" if i == 0 else "--:" for i in range(len(header))) + "|")
        for rid, cells in rows:
            if len(cells) != len(header):
                raise HarnessError(f"report: row {rid} has {len(cells)} cells, header {len(header)}")
            line = "| " + " | ".join(str(c) for c in cells) + " |"
            self.lines.append(line)
            if rid:
                self.rows[rid] = line
        self.lines.append("")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _pair(ratios, scenario, what, b):
    for r in ratios:
        if r["scenario"] == scenario and r["what"] == what and r["b"] == b:
            return r
    return None


def render(results: dict) -> Doc:
    d = Doc()
    m, t, s = results["machine"], results["tools"], results["settings"]
    sc = results["scenarios"]
    d.add(f"# Sinew benchmarks: {results['mode']} run, {results['started']}", "")
    if results["mode"] == "smoke":
        d.add("> Smoke run: tiny durations, to check the harness works. These figures mean nothing.", "")
    d.add("All peers ran in the same run on the same machine, each configured for the same job; "
          "runs alternate between peers (A B C …, then … C B A) in several short rounds, and "
          "ratios are computed round by round. Latencies are in milliseconds. "
          "† marks a row where a compiler (another build on this machine) ran during at "
          "least one of its rounds.", "")
    d.add("## Summary against the issue's targets", "")
    d.table(["target", "measured", "status"],
            [(f"summary/{i}", [r["target"], r["measured"], r["status"]])
             for i, r in enumerate(results["summary"])])
    d.add("## Machine and tools", "")
    d.table(["", ""], [
        (None, ["CPU", f"{m['cpu_model']} ({m['cores']} cores"
                       f"{', virtualised' if m['virtualized'] else ''})"]),
        (None, ["memory", f"{m['memory_gib']} GiB"]),
        (None, ["kernel / OS", f"{m['kernel']} / {m['os']}"]),
        (None, ["descriptor limit (hard)", m["nofile_hard_limit"]]),
        *[(None, [k, v]) for k, v in t["versions"].items()],
        (None, ["CPU placement", s["placement"]]),
        (None, ["load average (start → end)",
                f"{results['noise']['loadavg_start']} → {results['noise']['loadavg_end']}"]),
        (None, ["runs with compilers running beside",
                f"{results['noise']['busy_runs']} of {results['noise']['runs']} (waited "
                f"{results['noise'].get('waited_s', 0):.0f} s for quiet, at most "
                f"{results['settings'].get('quiet_wait_s', 0)} s before each run)"]),
        (None, ["duration of this run", f"{results['duration_s']:.0f} s"
                + (" (" + ", ".join(f"scenario {k}: {v:.0f} s"
                                    for k, v in results.get("scenario_seconds", {}).items())
                   + ")" if results.get("scenario_seconds") else "")]),
    ])
    d.add("Settings: " + ", ".join(f"`{k}={v}`" for k, v in s.items() if k != "placement"), "")

    if "s1" in sc:
        s1 = sc["s1"]
        s1_backend = has_backend(s1["rows"])
        d.add(f"## {s1['title']}", "",
              "Fixed rates with oha `-q RATE --latency-correction` (coordinated omission "
              "corrected), median over rounds (max: worst round). *added*: the peer minus "
              "direct, round by round. `*`: rate not sustained."
              + (" " + BACKEND_NOTE if s1_backend else ""), "")
        d.table(["peer", "rate", "p50", "p90", "p99", "p99.9", "max", "added p50", "added p99",
                 "CPU s / 1k req", *([BACKEND_HEAD] if s1_backend else [])],
                [(r["id"], [peer(r), f"{r['rate']}{'*' if r['rate_not_sustained'] else ''}",
                            ms(r["p50_ms"]), ms(r["p90_ms"]), ms(r["p99_ms"]), ms(r["p99.9_ms"]),
                            ms(r["max_ms"]), ms(r.get("added_p50_ms")),
                            ms(r.get("added_p99_ms")), f(r["cpu_per_1k"], 3),
                            *([backend_cell(r)] if s1_backend else [])])
                 for r in s1["rows"]])
        d.add(f"Max rps, closed loop ({s['max_conns']} connections), one proxy worker; "
              "direct is the load generator's ceiling on this placement.", "")
        d.table(["peer", "rps (median)", "rps range", "p99 at saturation", "CPU s / 1k req"],
                [(r["id"], [peer(r), f(r["rps"]), f"{f(r['rps_min'])} – {f(r['rps_max'])}",
                            ms(r["p99_ms"]), f(r["cpu_per_1k"], 3)]) for r in s1["max_rows"]])
        _ratio_table(d, s1["ratios"])
    if "s2" in sc:
        s2 = sc["s2"]
        s2_backend = has_backend(s2["rows"])
        d.add(f"## {s2['title']}", "", s2["description"]
              + (" " + BACKEND_NOTE if s2_backend else ""), "")
        for note in s2.get("notes", []):
            d.add(f"- {note}")
        d.add("")
        d.table(["path", "rate", "p50", "p90", "p99", "p99.9", "max", "added p50", "added p99",
                 "CPU s / 1k req (both sidecars)", *([BACKEND_HEAD] if s2_backend else [])],
                [(r["id"], [peer(r), f"{r['rate']}{'*' if r['rate_not_sustained'] else ''}",
                            ms(r["p50_ms"]), ms(r["p90_ms"]), ms(r["p99_ms"]), ms(r["p99.9_ms"]),
                            ms(r["max_ms"]), ms(r.get("added_p50_ms")),
                            ms(r.get("added_p99_ms")), f(r["cpu_per_1k"], 3),
                            *([backend_cell(r)] if s2_backend else [])])
                 for r in s2["rows"]])
        d.table(["path", "max rps (median)", "rps range", "p99 at saturation", "CPU s / 1k req"],
                [(r["id"], [peer(r), f(r["rps"]), f"{f(r['rps_min'])} – {f(r['rps_max'])}",
                            ms(r["p99_ms"]), f(r["cpu_per_1k"], 3)]) for r in s2["max_rows"]])
        _ratio_table(d, s2["ratios"])
    if "s3" in sc:
        s3 = sc["s3"]
        d.add(f"## {s3['title']}", "", s3["description"], "")
        d.table(["path", "load", "rps", "p50", "p90", "p99", "p99.9", "max", "CPU s / 1k req"],
                [(r["id"], [peer(r), r["load"], f(r["rps"]), ms(r["p50_ms"]), ms(r["p90_ms"]),
                            ms(r["p99_ms"]), ms(r["p99.9_ms"]), ms(r["max_ms"]),
                            f(r["cpu_per_1k"], 3)]) for r in s3["rows"]])
        _ratio_table(d, s3["ratios"])
    if "s4" in sc:
        s4 = sc["s4"]
        levels = s4["levels"]
        d.add(f"## {s4['title']}", "",
              "VmRSS summed over the proxy's processes (nginx: master and worker), read from "
              "/proc once it stops moving. Idle: after start and one request. Each idle "
              "connection carried one keep-alive request, then stayed open. PSS (shared pages "
              "split between processes) is in the JSON.", "")
        rows = []
        for r in s4["rows"]:
            by = {lv["level"]: lv for lv in r["levels"]}
            cells = [r["peer"], f(r["idle_rss_kb"] / 1024, 1)]
            for level in levels:
                lv = by.get(level)
                if lv is None:
                    cells.append("n/a")
                else:
                    capped = "" if lv["connections"] == level else f" ({lv['connections']:,} held: fd limit)"
                    cells.append(f(lv["rss_kb"] / 1024, 1) + capped)
            cells += [f(r.get("per_conn_kb"), 2), r.get("per_conn_basis", "n/a"),
                      f"{r['processes']} / {r['threads']}"]
            rows.append((r["id"], cells))
        d.table(["peer", "idle MB", *[f"{lvl:,} conns MB" for lvl in levels], "KB / conn",
                 "per-connection basis", "processes / threads"], rows)
        order = s4.get("symbol_order")
        if order:
            d.add("", f"sinew-proxy's code order (symbol-order.txt beside it, made by "
                      f"scripts/release-build): {order['present']:,} of {order['listed']:,} "
                      "listed functions found in this build.", "")
    if "s5" in sc:
        s5 = sc["s5"]
        if results.get("cpu_time") == "schedstat":
            how = ("CPU time of the proxy's threads (`/proc/PID/task/TID/schedstat`, in ns; "
                   "utime + stime from /proc/PID/stat, in 10 ms ticks, where a thread ended "
                   "during the run) before and after each scenario-1 run, divided by the "
                   "requests served; median over rounds. At a fixed rate this is also vCPU "
                   "per 1,000 rps.")
        else:
            how = ("utime + stime of the proxy's processes from /proc/PID/stat before and "
                   "after each scenario-1 run, divided by the requests served; median over "
                   "rounds. At a fixed rate this is also vCPU per 1,000 rps. Clock ticks are "
                   "10 ms, so short smoke runs read coarsely.")
        d.add(f"## {s5['title']}", "", how, "")
        d.table(["peer", "load", "CPU s / 1k requests", "per round"],
                [(r["id"], [r["peer"], r["load"], f(r["cpu_per_1k"], 4),
                            ", ".join(f(v, 4) for v in r["per_round"])]) for r in s5["rows"]])
    if "s6" in sc:
        s6 = sc["s6"]
        d.add(f"## {s6['title']}", "", s6["description"], "")
        d.table(["measure", "value"], [(r["id"], [r["label"], r["value"]]) for r in s6["rows"]])
    if "s7" in sc:
        s7 = sc["s7"]
        d.add(f"## {s7['title']}", "",
              "From just before the process is spawned until its readiness signal answers, "
              "and until the first request through it succeeds; polled every 2 ms.", "")
        d.table(["peer", "ready signal", "runs", "ready p50", "ready p90", "ready max",
                 "first 200 p50", "first 200 max"],
                [(r["id"], [r["peer"], r["signal"], r["runs"], ms(r["ready_ms"]["p50"]),
                            ms(r["ready_ms"]["p90"]), ms(r["ready_ms"]["max"]),
                            ms(r["first_ok_ms"]["p50"]), ms(r["first_ok_ms"]["max"])])
                 for r in s7["rows"]])
    if "s8" in sc:
        _render_s8(d, sc["s8"])
    if "s9" in sc:
        _render_s9(d, sc["s9"])
    d.add("## Peer configuration", "")
    for line in results["peer_notes"]:
        d.add(f"- {line}")
    d.add("")
    d.add("## Caveats", "")
    for line in results["caveats"]:
        d.add(f"- {line}")
    d.add("")
    if results["problems"]:
        d.add("## Problems seen in this run", "")
        for p in results["problems"]:
            d.add(f"- {p}")
        d.add("")
    if results.get("not_run"):
        d.add("## Not measured", "")
        for p in results["not_run"]:
            d.add(f"- {p}")
        d.add("")
    return d


def _render_s8(d: Doc, s8: dict) -> None:
    rows = s8["rows"]
    d.add(f"## {s8['title']}", "", "### A: one of three endpoints killed under load", "",
          s8["description_kill"], "", "Policy (besides the Service and its three Workloads):",
          "", "```yaml", *s8["config_kill"].rstrip().splitlines(), "```", "")
    d.add("Envoy (the peer row), the equivalent configuration:", "", "```text",
          *s8["config_kill_envoy"].rstrip().splitlines(), "```", "")
    kill = [r for r in rows if r.get("table") == "kill"]
    d.table(["proxy", "balancer", "rounds", "requests", "failed", "failure share median",
             "worst", "ejected after median (ms)", "worst (ms)", "retries after kill (median)",
             "last retry, worst (ms after kill)", "p99 median", "max (worst round)"],
            [(r["id"], [peer(r), r.get("config", ""), r["rounds"], f(r["requests"]),
                        f(r["failed"]), pct(r["failure_share_median"]),
                        pct(r["failure_share_worst"]),
                        f(r["ejected_ms_median"], 0) if not r["not_ejected_rounds"]
                        else f"not ejected in {r['not_ejected_rounds']} of {r['rounds']}",
                        f(r["ejected_ms_worst"], 0) if not r["not_ejected_rounds"] else "n/a",
                        f(r["retries_after_kill_median"], 0),
                        f(r["last_retry_ms_worst"], 0) if r["last_retry_ms_worst"] else "none",
                        ms(r["p99_ms_median"]), ms(r["max_ms_worst"])]) for r in kill])
    for r in kill:
        if r.get("note"):
            d.add(f"Note ({r['peer']}): {r['note']}", "")
    d.add("Round by round (the proxies took turns within each round):", "")
    d.table(["proxy", "round", "killed", "kill at (s)", "requests", "failed", "failure share",
             "ejected after (ms)", "retries before / after kill", "retries after ejection",
             "last retry (ms after kill)", "proxy-made answers", "p99", "max"],
            [(r["id"], [peer(dict(r, busy_rounds=r.get("busy_processes"))), r["round"],
                        r["killed"], f(r["kill_at_s"], 1), f(r["requests"]), f(r["failed"]),
                        pct(r["failure_share"]),
                        (f(r["ejected_ms"], 0) if r["ejected_ms"] is not None else "not ejected")
                        + (f" (log: {f(r['ejected_logged_ms'], 1)})"
                           if r.get("ejected_logged_ms") is not None else ""),
                        f"{r['retries_before_kill']} / {r['retries_after_kill']}",
                        f(r["retries_after_ejection"]),
                        f(r["last_retry_ms"], 0) if r["last_retry_ms"] is not None else "none",
                        ", ".join(f"{k}: {v}" for k, v in r["proxy_made"].items()) or "none",
                        ms(r["p99_ms"]), ms(r["max_ms"])])
             for r in rows if r.get("table") == "kill-round"])
    d.add("### B: policies configured but never triggered", "", s8["description_overhead"], "",
          "Policies of *sinew+policies* (*sinew* has the Service and Workload only):", "",
          "```yaml", *s8["config_overhead"].rstrip().splitlines(), "```", "")
    over = [r for r in rows if r.get("table") == "overhead"]
    d.table(["config", "rate", "p50", "p90", "p99", "CPU s / 1k req",
             "instructions / req (user + kernel)", "user", "kernel", "cycles / req",
             "cycles per instruction (user / kernel)"],
            [(r["id"], [peer(r), f"{r['rate']}{'*' if r['rate_not_sustained'] else ''}",
                        ms(r["p50_ms"]), ms(r["p90_ms"]), ms(r["p99_ms"]),
                        f(r["cpu_per_1k"], 3), f(r.get("instr_per_req"), 0),
                        f(r.get("instr_u_per_req"), 0), f(r.get("instr_k_per_req"), 0),
                        f(r.get("cycles_per_req"), 0),
                        f"{f(r.get('cpi_u'), 2)} / {f(r.get('cpi_k'), 2)}"]) for r in over])
    diff = next((r for r in rows if r.get("table") == "overhead-diff"), None)
    if diff:
        lo, hi = diff["p50_us_range"]
        cells = [
            ("p50, policies − none, per round (µs)",
             ", ".join(signed(v, 1) for v in diff["p50_us_per_round"])),
            ("p50 difference, median (range)",
             f"{signed(diff['p50_us'], 1)} µs ({signed(lo, 1)} – {signed(hi, 1)})"),
            ("p99 difference, median", f"{signed(diff['p99_us'], 1)} µs"),
        ]
        if diff.get("instr_per_req") is not None:
            cells += [
                ("instructions per request, policies − none, per round",
                 ", ".join(signed(v, 0) for v in diff["instr_per_req_per_round"])),
                ("instructions per request, median difference (user / kernel)",
                 f"{signed(diff['instr_per_req'], 0)} ({signed(diff['instr_u_per_req'], 0)} / "
                 f"{signed(diff['instr_k_per_req'], 0)})"),
                ("estimated time: (user Δ × user CPI + kernel Δ × kernel CPI) ÷ clock",
                 f"≈ {signed(diff['est_us'], 2)} µs (CPI {f(diff['cpi_u'], 2)} / "
                 f"{f(diff['cpi_k'], 2)} measured, {f(diff['cpu_mhz'], 0)} MHz nominal; "
                 "estimate)"),
                ("cross-check: Δ instructions × CPU time per instruction without perf (/proc)",
                 f"≈ {signed(diff.get('est_us_proc'), 2)} µs at "
                 f"{f(diff.get('ns_per_instr_proc'), 3)} ns per instruction (estimate)"),
                ("proxy CPU time per request, *sinew*: without perf / under perf (/proc)",
                 f"{f(diff.get('cpu_us_noperf'), 1)} µs / "
                 f"{f(diff.get('cpu_us_underperf'), 1)} µs"),
                ("cycles per request, median difference (noisy)",
                 f"{signed(diff.get('cycles_per_req'), 0)} "
                 "(per round " + ", ".join(signed(v, 0)
                                           for v in diff.get("cycles_per_req_per_round", []))
                 + ")"),
            ]
        else:
            cells.append(("instructions per request", f"not measured: {diff['instructions']}"))
        cells.append(("policy actions seen during the runs",
                      ", ".join(f"{k}: {v}" for k, v in diff["triggered"].items()) or "none"))
        d.table(["policies − no policies", "value"],
                [(diff["id"] if i == 0 else None, list(c)) for i, c in enumerate(cells)])
    pieces = [r for r in rows if r.get("table") == "piece"]
    if pieces:
        d.add("One piece of the policy set at a time (a proxy each, one run of "
              f"{pieces[0]['requests']:,} requests at the same rate; *added*: minus the first "
              "row, runs of the same length; the pieces need not add up to the whole):", "")
        d.table(["configured alone", "instructions / req", "added", "added (user only)",
                 "policy actions"],
                [(r["id"], [peer(r), f(r["instr_per_req"], 0), signed(r.get("instr_added"), 0),
                            signed(r.get("instr_u_added"), 0),
                            ", ".join(f"{k}: {v}" for k, v in r["triggered"].items()) or "none"])
                 for r in pieces])


def _render_s9(d: Doc, s9: dict) -> None:
    rows = s9["rows"]
    d.add(f"## {s9['title']}", "", s9["description"], "")
    conf = [r for r in rows if r.get("table") == "config"]
    noise = s9["noise"]

    def sw(dd):
        # Thread names as the kernel keeps them (15 characters).
        names = {"sinew-access-lo": "access-log"}
        items = [(names.get(k, k.replace("sinew-", "")), v) for k, v in (dd or {}).items()
                 if v >= 0.01]
        return ", ".join(f"{k} {v:.2f}" for k, v in items) or "< 0.01"

    def diff(r, kind):
        if r.get(f"{kind}_diff") is None:
            return "–"
        return (f"{signed(r[f'{kind}_diff'], 0)} ({pct(r.get(f'{kind}_diff_share'), 1)}); "
                + ", ".join(signed(v, 0) for v in r[f"{kind}_diff_per_round"]))

    d.add("Throughput, closed loop (max rps without perf; instructions in separate runs of "
          "the same load under `perf stat`):", "")
    d.table(["config", "max rps (median)", "rps range", "÷ sinew per round (median, range)",
             "p99 at saturation", "CPU s / 1k req", "context switches / req, by thread",
             "instructions / req at saturation (user + kernel)",
             "Δ vs sinew (median; per round)"],
            [(r["id"], [peer(r), f(r["rps"]), f"{f(r['rps_min'])} – {f(r['rps_max'])}",
                        "–" if r.get("rps_ratio") is None else
                        f"{x(r['rps_ratio'])} ({x(r['rps_ratio_range'][0])} – "
                        f"{x(r['rps_ratio_range'][1])})",
                        ms(r["p99_ms"]), f(r["cpu_per_1k"], 4), sw(r.get("switches_max")),
                        f(r.get("sat_instr_per_req"), 0)
                        + (f" (user {f(r.get('sat_instr_u_per_req'), 0)})"
                           if r.get("sat_instr_u_per_req") is not None else ""),
                        diff(r, "sat")]) for r in conf])
    if conf and conf[0].get("fixed_instr_per_req") is not None:
        d.add(f"At a fixed {s9_rate(s9)} rps (perf stat):", "")
        d.table(["config", "instructions / req (user + kernel)", "user", "kernel",
                 "Δ vs sinew (median; per round)", "cycles / req (noisy)",
                 "CPU µs / req under perf (/proc)", "context switches / req, by thread"],
                [(None, [peer(r), f(r["fixed_instr_per_req"], 0),
                         f(r["fixed_instr_u_per_req"], 0), f(r["fixed_instr_k_per_req"], 0),
                         diff(r, "fixed"), f(r.get("fixed_cycles_per_req"), 0),
                         f(r.get("fixed_proc_cpu_us_per_req"), 1), sw(r.get("fixed_switches"))])
                 for r in conf])
    base = conf[0]
    text = (f"Noise, plain *sinew* against itself from round to round: max rps "
            f"{f(base['rps_min'])} – {f(base['rps_max'])} ({pct(noise.get('rps_rel_range'), 0)} "
            "of its median)")
    for kind, label in (("sat", "at saturation"), ("fixed", f"at {s9_rate(s9)} rps")):
        if noise.get(f"{kind}_instr_range") is not None:
            lo, hi = base[f"{kind}_instr_range"]
            text += (f"; instructions per request {label} {f(lo, 0)} – {f(hi, 0)} (range "
                     f"{f(noise[f'{kind}_instr_range'], 0)}; user only "
                     f"{f(noise[f'{kind}_instr_u_range'], 0)})")
    if not s9["perf"]["usable"]:
        text += f"; instructions not counted: {s9['perf']['why_not']}"
    d.add(text + ".", "")
    checks = []
    for r in conf:
        rounds = r["rounds"] + r.get("sat_counts", []) + r.get("fixed_counts", [])
        if r.get("log_lines") is not None:
            lines = r["log_lines"] + r.get("sat_log_lines", 0) + r.get("fixed_log_lines", 0)
            answered = (r["log_answered"] + r.get("sat_log_answered", 0)
                        + r.get("fixed_log_answered", 0))
            dropped = (r["log_dropped"] + r.get("sat_log_dropped", 0)
                       + r.get("fixed_log_dropped", 0))
            checks.append(f"*{r['peer']}*: {lines:,} log lines for {answered:,} requests "
                          f"answered over all its runs, {dropped:,} dropped; "
                          f"{f(r.get('log_bytes_per_line'), 0)} bytes per line")
        if any("tap_events" in y for y in rounds):
            checks.append(f"*{r['peer']}*: the tap got "
                          f"{sum(y.get('tap_events', 0) for y in rounds)} events and "
                          f"{sum(y.get('tap_missed_notices', 0) for y in rounds)} missed-event "
                          f"notices over {sum(1 for y in rounds if 'tap_events' in y)} runs")
        if any("scrapes" in y for y in rounds):
            checks.append(f"*{r['peer']}*: {sum(y.get('scrapes', 0) for y in rounds)} scrapes "
                          f"({sum(y.get('scrape_failures', 0) for y in rounds)} failed), "
                          f"{f(max(y.get('scrape_bytes', 0) for y in rounds))} bytes each")
    if checks:
        d.add("Checks:", "", *[f"- {c}" for c in checks], "")
    cg = [r for r in rows if r.get("table") == "callgrind"]
    if cg:
        d.add("Under callgrind: instructions per request (user space) in each part of the "
              "proxy, and its share of all the proxy's instructions over the requests. "
              "*called*: the module's functions with everything they call; *inlined*: its "
              "code compiled into Sinew's other functions.", "")

        def mod(r, k):
            m = r["modules"][k]
            return (f"{f(m['per_req'], 1)} ({pct(m['share'], 2)}; called {f(m['called'] / r['requests'], 1)}"
                    f", inlined {f(m['inlined'] / r['requests'], 1)})")
        d.table(["proxy under callgrind", "requests (rps)", "instructions / req",
                 "metrics", "stats", "tap", "access"],
                [(r["id"], [r["peer"], f"{r['requests']:,} ({f(r['achieved_rps'], 0)})",
                            f(r["ir_per_req"], 0), mod(r, "metrics"), mod(r, "stats"),
                            mod(r, "tap"), mod(r, "access")]) for r in cg])
        so = s9.get("stats_on")
        if so:
            d.add("The modules overlap: `access::finish` calls `Stats::record`, and "
                  "`Tap::active` is inlined into `access::observe`. Stats on a joined proxy, "
                  f"all in: {f(so['per_req'], 0)} instructions per request "
                  f"({pct(so['share'], 2)}): the access module's growth over the standalone "
                  f"proxy ({f(so['access_growth'], 0)}: `observe` keeps the method and path, "
                  "`finish` calls `Stats::record`) plus the stats code not entered from it "
                  f"(the report every 2 s: {f(so['stats_elsewhere'], 1)}).", "")
        fn_rows = []
        for r in cg:
            for k, m in r["modules"].items():
                for fn in m["functions"]:
                    if fn["per_req"] >= 5:
                        fn_rows.append((None, [r["peer"], k, f"`{fn['fn']}`",
                                               f(fn["calls"] / r["requests"], 2),
                                               f(fn["per_req"], 1),
                                               pct(fn["ir"] / r["ir_per_req"] / r["requests"],
                                                   2)]))
                for fn in m["inlined_into"]:
                    if fn["per_req"] >= 5:
                        fn_rows.append((None, [r["peer"], k, f"inlined into `{fn['fn']}`", "–",
                                               f(fn["per_req"], 1),
                                               pct(fn["ir"] / r["ir_per_req"] / r["requests"],
                                                   2)]))
        if fn_rows:
            d.add("Where (functions of the four modules entered from the rest of the proxy, "
                  "and their inlined code, at ≥ 5 instructions per request; "
                  "`callgrind_annotate --inclusive=yes` rows are in the JSON):", "")
            d.table(["proxy", "module", "function", "calls / req (from outside the module)",
                     "instructions / req (its own, and its calls out of the module)", "share"],
                    fn_rows)
    elif not s9["callgrind"]["usable"]:
        d.add(f"Callgrind not run: {s9['callgrind']['why_not']}.", "")
    c = s9.get("combined") or {}
    if c.get("cost") is not None:
        d.add("Metrics and access logs together, against the throughput. On one core the "
              "proxy's throughput is the inverse of its work per request; counted in "
              f"instructions at saturation: plain Sinew {f(c['sat_base'], 0)} (perf, user + "
              f"kernel), the access log adds {signed(c['sat_log_diff'], 0)}, metrics take "
              f"{f(c['metrics_per_req'], 0)} of them (callgrind; {pct(c['metrics_share_user'], 2)}"
              " of its user-space instructions, "
              f"{pct(c['sat_metrics_share'], 2)} of all). Throughput with both ÷ with neither "
              "= (B − M) ÷ (B + Δ), so the cost is (Δ + M) ÷ (B + Δ) = "
              f"**{pct(c['cost'], 1)}** (at {s9_rate(s9)} rps: "
              f"{pct(c.get('fixed_cost'), 1)}). This assumes the added instructions run at "
              "the proxy's average speed; the access log's include a wakeup of its writer "
              "thread per request (system calls, context switches: see the table), slower "
              "than average, so it errs in Sinew's favour. Cross-check, max rps measured "
              f"directly: {f(c.get('log_ratio'), 3)} × (1 − {f(c.get('sat_metrics_share'), 4)})"
              f" → a cost of {pct(c.get('rps_cost'), 1)}, from rounds that swing with the "
              "host (above).", "")
    cp = s9.get("cp_stats")
    if cp:
        d.add("### Stats reporting on the control plane", "",
              f"`bench/cpsim` connects {cp['proxies']:,} simulated proxies (the real "
              "discovery protocol; no certificates) to `sinew control`, pinned to the proxy "
              f"CPU. They stay connected without reports for {cp['hold_s']} s, then each sends "
              "a typical stats report (4 inbound and 4 outbound rows, 20 paths: the shape of "
              "the unit test's) every "
              f"{cp['interval_ms'] / 1000:g} s, at its own offset, for {cp['hold_s']} s (the "
              "control plane keeps 60 s in 10 s slots, so by then every slot is full). RSS "
              "read from /proc once settled; sampled every second for the first 10 s of each "
              "phase, then every 5 s (in the JSON). RSS also counts what the unit test's heap "
              "figure (the telemetry window alone) leaves out: the allocator's overhead and "
              "the streams' transport buffers.", "")
        cw, cb = cp["count_without"], cp["count_with"]
        d.table(["measure", "value"], [
            ("s9-cp/stats", ["control-plane RSS, proxies connected and in sync",
                             f"{f(cp['rss_synced_kb'] / 1024, 1)} MB"]),
            (None, [f"after {cp['hold_s']} s without reports",
                    f"{f(cp['rss_without_kb'] / 1024, 1)} MB (CPU {f(cp['cpu_without_s'], 2)} s)"]),
            (None, [f"{f(cp.get('rss_10s_t'), 0)} s after the reports began",
                    "n/a" if cp.get("rss_10s_kb") is None
                    else f"{f(cp['rss_10s_kb'] / 1024, 1)} MB"]),
            (None, [f"after {cp['hold_s']} s with reports",
                    f"{f(cp['rss_with_kb'] / 1024, 1)} MB (CPU {f(cp['cpu_with_s'], 2)} s)"]),
            (None, ["difference, and per 100 proxies",
                    f"{signed(cp['delta_kb'] / 1024, 2)} MB; **{f(cp['per_100_kb'] / 1024, 3)} "
                    "MB per 100 proxies**"]),
            (None, ["reports sent; proxies the control plane's `Stat` counts (without / with)",
                    f"{cb['reports_sent']:,}; {cw['stat_proxies']:,} / {cb['stat_proxies']:,}"]),
            (None, ["unit test `a_hundred_proxies_cost_under_a_megabyte` (heap counted, "
                    "typical reports, 120 s)", "436 KiB per 100 proxies"]),
        ])


def s9_rate(s9: dict) -> str:
    return f"{s9['rate']:,}" if s9.get("rate") else "the fixed"


def _ratio_table(d: Doc, ratios: list) -> None:
    if not ratios:
        return
    d.add("Pair by pair (Sinew ÷ peer, per round, then the median; "
          "for latency lower is better, for rps higher; the median's 95% confidence "
          "interval is distribution-free, from the rounds' order statistics):", "")
    d.table(["measure", "Sinew ÷", "median", "95% CI of the median", "range over rounds",
             "rounds"],
            [(f"ratio/{r['scenario']}/{r['what']}/{r['b']}",
              [r["what"], r["b"], x(r["median"]), ci_text(r),
               f"{x(r['range'][0])} – {x(r['range'][1])}", verdict(r)])
             for r in ratios])


def verdict(r) -> str:
    """Whether every round points the same way (with so few rounds, the only claim a
    ratio can support)."""
    vals = [v for v in r["per_round"] if v is not None]
    if not vals:
        return "n/a"
    if all(v > 1 for v in vals):
        better = r["higher_is_better"]
    elif all(v < 1 for v in vals):
        better = not r["higher_is_better"]
    else:
        return f"mixed ({len(vals)})"
    return f"Sinew {'better' if better else 'worse'} in all {len(vals)}"


def write(results: dict, out_dir: Path, stem: str) -> tuple[Path, Path, Doc]:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = render(results)
    md = out_dir / f"{stem}.md"
    js = out_dir / f"{stem}.json"
    md.write_text(doc.text())
    js.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return md, js, doc


def validate(md: Path, js: Path, doc: Doc, results: dict) -> None:
    """The files parse, every expected row is in both, tables are rectangular, and
    every headline figure was measured."""
    data = json.loads(js.read_text())
    text = md.read_text()
    missing = []
    for key, section in results["scenarios"].items():
        if key not in data["scenarios"]:
            missing.append(f"JSON: scenario {key}")
            continue
        ids = set()
        for k in ("rows", "max_rows"):
            ids |= {r["id"] for r in data["scenarios"][key].get(k, [])}
        for rid in section["expected"]:
            if rid not in ids:
                missing.append(f"JSON: {key} row {rid}")
            line = doc.rows.get(rid)
            if line is None or line not in text:
                missing.append(f"Markdown: {key} row {rid}")
        for r in section.get("ratios", []):
            if f"ratio/{r['scenario']}/{r['what']}/{r['b']}" not in doc.rows:
                missing.append(f"Markdown: ratio {r['what']} vs {r['b']}")
    # Tables: every row has as many cells as its header.
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            cols = line.count("|")
            j = i + 1
            while j < len(lines) and lines[j].startswith("|"):
                if lines[j].count("|") != cols:
                    missing.append(f"Markdown: malformed table row at line {j + 1}")
                j += 1
    # Headline figures present.
    required = {
        "rows": {"s1": ["p50_ms", "p99_ms", "cpu_per_1k"], "s2": ["p50_ms", "p99_ms"],
                 "s3": ["rps", "p50_ms", "p99_ms"], "s4": ["idle_rss_kb", "per_conn_kb"],
                 "s5": ["cpu_per_1k"], "s6": ["value"]},
        "max_rows": {"s1": ["rps", "p99_ms"], "s2": ["rps", "p99_ms"]},
    }
    for key, section in results["scenarios"].items():
        for part, by in required.items():
            for r in section.get(part, []):
                for k in by.get(key, []):
                    if r.get(k) is None and not (k == "cpu_per_1k" and r.get("peer") == "direct"):
                        missing.append(f"{key} row {r['id']}: {k} not measured")
        if key == "s8":
            for r in section["rows"]:
                if r.get("table") == "kill" and not r["requests"]:
                    missing.append(f"s8 row {r['id']}: no request measured")
                if r.get("table") == "overhead" and r.get("p50_ms") is None:
                    missing.append(f"s8 row {r['id']}: p50 not measured")
                if r.get("table") == "overhead-diff" and r.get("p50_us") is None:
                    missing.append(f"s8 row {r['id']}: no p50 difference")
        if key == "s9":
            for r in section["rows"]:
                if r.get("table") == "config":
                    if r.get("rps") is None:
                        missing.append(f"s9 row {r['id']}: max rps not measured")
                    if section["perf"]["usable"] and (r.get("fixed_instr_per_req") is None
                                                      or r.get("sat_instr_per_req") is None):
                        missing.append(f"s9 row {r['id']}: instructions not counted")
                if r.get("table") == "callgrind" and not r.get("ir_per_req"):
                    missing.append(f"s9 row {r['id']}: no callgrind profile")
        if key == "s7":
            for r in section["rows"]:
                if r["ready_ms"]["p50"] is None or r["first_ok_ms"]["p50"] is None:
                    missing.append(f"s7 row {r['id']}: not measured")
    if missing:
        raise HarnessError("results incomplete:\n  " + "\n  ".join(missing))
