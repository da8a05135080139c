"""Load generators: oha (HTTP/1.1 and HTTP/2, fixed rate with latency correction, or
closed loop) and h2load (HTTP/2 and gRPC-shaped), with their outputs parsed."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

from .procs import HarnessError


class LoadGen:
    def __init__(self, oha: str, h2load: str, pin: bool, cpus: str, threads: int):
        self.oha_path = oha
        self.h2load_path = h2load
        self.pin = pin
        self.cpus = cpus
        self.threads = threads

    def _prefix(self) -> list[str]:
        return ["taskset", "-c", self.cpus] if self.pin else []

    def oha_argv(self, url: str, *, duration_s: float | None = None,
                 requests: int | None = None, conns: int = 16, rate: float | None = None,
                 http2: bool = False, parallel: int = 1, method: str = "GET",
                 body_file: Path | None = None, headers: list[str] = (),
                 wrap: list[str] = ()) -> list[str]:
        """The oha command line (after `wrap`, e.g. `perf stat ... --`)."""
        argv = [*self._prefix(), *wrap, self.oha_path, "--no-tui", "--output-format", "json",
                "--worker-threads", str(self.threads), "-c", str(conns), "-m", method]
        if duration_s is not None:
            # -w: requests in flight at the deadline finish and count, none are aborted.
            argv += ["-z", f"{duration_s}s", "-w"]
        else:
            argv += ["-n", str(requests or 1000)]
        if rate is not None:
            argv += ["-q", str(rate), "--latency-correction"]
        if http2:
            argv += ["--http2", "-p", str(parallel)]
        if body_file is not None:
            argv += ["-D", str(body_file)]
        for h in headers:
            argv += ["-H", h]
        argv.append(url)
        return argv

    def oha(self, url: str, **kw) -> dict:
        """One oha run; returns the parsed result (latencies in milliseconds).

        With `rate`, requests are sent on a fixed schedule and latency is measured
        from each request's scheduled time (--latency-correction), so a stalled
        server is charged for the requests it delayed (coordinated omission)."""
        argv = self.oha_argv(url, **kw)
        timeout = (kw.get("duration_s") or 30) + 60
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise HarnessError(f"oha against {url} did not finish within {timeout:.0f}s") from e
        if done.returncode != 0:
            raise HarnessError(f"oha against {url} failed (exit {done.returncode}): "
                               f"{done.stderr.strip()[-800:]}")
        return oha_json(done.stdout, url)

    def oha_start(self, pm, name: str, url: str, out: Path, **kw):
        """Starts oha in the background (its own process group, stopped with the
        harness), its JSON going to `out`; `oha_finish` waits for and parses it."""
        return pm.start(name, self.oha_argv(url, **kw), stdout=out)

    @staticmethod
    def oha_finish(pm, proc, out: Path, url: str, timeout: float) -> dict:
        try:
            code = proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            pm.stop(proc)
            raise HarnessError(f"oha against {url} did not finish within {timeout:.0f}s") from e
        pm.stop(proc)
        if code != 0:
            raise HarnessError(f"oha against {url} failed (exit {code}):\n{proc.log_tail()}")
        return oha_json(out.read_text(), url)

    def h2load(self, url: str, *, duration_s: float, clients: int, streams: int,
               log_file: Path, data_file: Path | None = None, headers: list[str] = (),
               rps_per_client: float | None = None) -> dict:
        """One h2load run (h2c with prior knowledge). Latencies come from its
        per-request log, so percentiles are exact (not latency-corrected)."""
        argv = [*self._prefix(), self.h2load_path, "-c", str(clients), "-m", str(streams),
                "-t", str(min(self.threads, clients)), "-D", str(int(math.ceil(duration_s))),
                "--log-file", str(log_file)]
        if rps_per_client is not None:
            argv += ["--rps", str(rps_per_client)]
        if data_file is not None:
            argv += ["-d", str(data_file)]
        for h in headers:
            argv += ["-H", h]
        argv.append(url)
        timeout = duration_s + 60
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise HarnessError(f"h2load against {url} did not finish within {timeout:.0f}s") from e
        if done.returncode != 0:
            raise HarnessError(f"h2load against {url} failed (exit {done.returncode}): "
                               f"{(done.stdout + done.stderr).strip()[-800:]}")
        return parse_h2load(done.stdout, log_file, url)


def oha_json(text: str, url: str) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise HarnessError(f"oha against {url}: output is not JSON: {text[:300]!r}") from e
    return parse_oha(data, url)


def parse_oha(data: dict, url: str) -> dict:
    try:
        summary = data["summary"]
        pct = data["latencyPercentiles"]
        statuses = {str(k): int(v) for k, v in (data.get("statusCodeDistribution") or {}).items()}
        errors = {str(k): int(v) for k, v in (data.get("errorDistribution") or {}).items()}
        total = sum(statuses.values())
        ms = lambda v: None if v is None else float(v) * 1000.0  # noqa: E731
        out = {
            "requests": total,
            "ok": statuses.get("200", 0),
            "statuses": statuses,
            "errors": errors,
            "duration_s": float(summary["total"]),
            "rps": total / float(summary["total"]) if summary["total"] else 0.0,
            "p50_ms": ms(pct.get("p50")),
            "p90_ms": ms(pct.get("p90")),
            "p99_ms": ms(pct.get("p99")),
            "p99.9_ms": ms(pct.get("p99.9")),
            "max_ms": ms(summary.get("slowest")),
            "bytes_per_request": (float(summary["totalData"]) / total
                                  if total and summary.get("totalData") is not None else None),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise HarnessError(f"oha against {url}: unexpected JSON ({e})") from e
    return out


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


def parse_h2load(text: str, log_file: Path, url: str) -> dict:
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", text)
    r = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", text)
    s = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if not (m and r and s):
        raise HarnessError(f"h2load against {url}: cannot parse its output:\n{text[-800:]}")
    t = re.search(r"\((\d+)\) data", text)
    lat = []
    statuses: dict[str, int] = {}
    try:
        for line in log_file.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3:
                statuses[parts[1]] = statuses.get(parts[1], 0) + 1
                lat.append(int(parts[2]) / 1000.0)
    except OSError as e:
        raise HarnessError(f"h2load against {url}: no request log ({e})") from e
    lat.sort()
    secs = float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0)
    done = len(lat)
    return {
        "requests": done,
        # From the per-request log: the summary's status counts also include
        # responses whose headers came but which were cut off at the deadline.
        "ok": statuses.get("200", 0),
        "failed": int(r.group(5)) + int(r.group(6)) + int(r.group(7)),
        "statuses": statuses,
        "errors": {} if int(r.group(5)) + int(r.group(6)) + int(r.group(7)) == 0 else
                  {"failed": int(r.group(5)), "errored": int(r.group(6)),
                   "timeout": int(r.group(7))},
        "duration_s": secs,
        "rps": float(m.group(3)),
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "p99.9_ms": percentile(lat, 99.9),
        "max_ms": lat[-1] if lat else None,
        "bytes_per_request": int(t.group(1)) / done if t and done else None,
    }
