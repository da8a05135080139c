"""Results: the Markdown table and the JSON record, and their validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .procs import HarnessError


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


def x(v):
    return "n/a" if v is None else f"{v:.2f}×"


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
        d.add(f"## {s1['title']}", "",
              "Fixed rates with oha `-q RATE --latency-correction` (coordinated omission "
              "corrected), median over rounds (max: worst round). *added*: the peer minus "
              "direct, round by round. `*`: rate not sustained.", "")
        d.table(["peer", "rate", "p50", "p90", "p99", "p99.9", "max", "added p50", "added p99",
                 "CPU s / 1k req"],
                [(r["id"], [peer(r), f"{r['rate']}{'*' if r['rate_not_sustained'] else ''}",
                            ms(r["p50_ms"]), ms(r["p90_ms"]), ms(r["p99_ms"]), ms(r["p99.9_ms"]),
                            ms(r["max_ms"]), ms(r.get("added_p50_ms")),
                            ms(r.get("added_p99_ms")), f(r["cpu_per_1k"], 3)])
                 for r in s1["rows"]])
        d.add(f"Max rps, closed loop ({s['max_conns']} connections), one proxy worker; "
              "direct is the load generator's ceiling on this placement.", "")
        d.table(["peer", "rps (median)", "rps range", "p99 at saturation", "CPU s / 1k req"],
                [(r["id"], [peer(r), f(r["rps"]), f"{f(r['rps_min'])} – {f(r['rps_max'])}",
                            ms(r["p99_ms"]), f(r["cpu_per_1k"], 3)]) for r in s1["max_rows"]])
        _ratio_table(d, s1["ratios"])
    if "s2" in sc:
        s2 = sc["s2"]
        d.add(f"## {s2['title']}", "", s2["description"], "")
        for note in s2.get("notes", []):
            d.add(f"- {note}")
        d.add("")
        d.table(["path", "rate", "p50", "p90", "p99", "p99.9", "max", "added p50", "added p99",
                 "CPU s / 1k req (both sidecars)"],
                [(r["id"], [peer(r), f"{r['rate']}{'*' if r['rate_not_sustained'] else ''}",
                            ms(r["p50_ms"]), ms(r["p90_ms"]), ms(r["p99_ms"]), ms(r["p99.9_ms"]),
                            ms(r["max_ms"]), ms(r.get("added_p50_ms")),
                            ms(r.get("added_p99_ms")), f(r["cpu_per_1k"], 3)])
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
    if "s5" in sc:
        s5 = sc["s5"]
        d.add(f"## {s5['title']}", "",
              "utime + stime of the proxy's processes from /proc/PID/stat before and after "
              "each scenario-1 run, divided by the requests served; median over rounds. At a "
              "fixed rate this is also vCPU per 1,000 rps. Clock ticks are 10 ms, so short "
              "smoke runs read coarsely.", "")
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


def _ratio_table(d: Doc, ratios: list) -> None:
    if not ratios:
        return
    d.add("Pair by pair (Sinew ÷ peer, per round, then the median; "
          "for latency lower is better, for rps higher):", "")
    d.table(["measure", "Sinew ÷", "median", "range over rounds", "rounds"],
            [(f"ratio/{r['scenario']}/{r['what']}/{r['b']}",
              [r["what"], r["b"], x(r["median"]), f"{x(r['range'][0])} – {x(r['range'][1])}",
               verdict(r)])
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
        if key == "s7":
            for r in section["rows"]:
                if r["ready_ms"]["p50"] is None or r["first_ok_ms"]["p50"] is None:
                    missing.append(f"s7 row {r['id']}: not measured")
    if missing:
        raise HarnessError("results incomplete:\n  " + "\n  ".join(missing))
