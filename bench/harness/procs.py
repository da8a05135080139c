"""Processes the harness starts: start, readiness polling, /proc readings, cleanup.

Every process is started in its own session (its own process group), recorded, and
stopped by its group id when the harness is done with it, when the harness fails,
and at exit. Readiness is always polled against a deadline, never a fixed sleep.
"""

from __future__ import annotations

import atexit
import http.client
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


class HarnessError(Exception):
    """A failure the harness reports as one clear line (and a non-zero exit)."""


class Proc:
    """One started process (and its process group)."""

    def __init__(self, name: str, popen: subprocess.Popen, log: Path):
        self.name = name
        self.popen = popen
        self.pid = popen.pid
        self.log = log

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in text[-lines:])

    def check(self) -> None:
        """Raises HarnessError if the process has exited."""
        if not self.alive():
            raise HarnessError(
                f"{self.name} exited with status {self.popen.returncode}; "
                f"its log ({self.log}):\n{self.log_tail()}"
            )

    def pids(self) -> list[int]:
        """The process and its descendants (nginx: master and worker)."""
        return tree_pids(self.pid)


class ProcessManager:
    """Starts processes and guarantees they are stopped."""

    def __init__(self, logdir: Path, pin: bool):
        self.logdir = logdir
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []
        self.pin = pin
        self._counter = 0
        atexit.register(self.stop_all)

    def start(self, name: str, argv: list[str], cpus: str | None = None,
              env: dict | None = None, cwd: Path | None = None,
              stdout: Path | None = None, append: bool = False) -> Proc:
        """Starts argv; with pinning on, on the given CPU list (taskset execs, so
        the pid is the program's own). Output goes to the process's log, or with
        `stdout`, standard output to that file (with `append`, opened O_APPEND, so
        that the harness may truncate it while the process writes) and standard
        error to the log."""
        self._counter += 1
        log = self.logdir / f"{self._counter:03d}-{name}.log"
        if self.pin and cpus is not None:
            argv = ["taskset", "-c", cpus, *argv]
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        mode = "ab" if append and stdout else "wb"
        with open(log, "wb") as err, open(stdout or os.devnull, mode) as out:
            popen = subprocess.Popen(
                argv, stdout=out if stdout else err,
                stderr=err if stdout else subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=full_env, cwd=cwd, start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 5.0) -> None:
        """SIGTERM to the process group, then SIGKILL after `timeout`."""
        if proc in self.procs:
            self.procs.remove(proc)
        if proc.popen.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.popen.wait(timeout=5)
        # Children that outlived their parent (same group): gone too.
        _signal_group(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            try:
                self.stop(proc, timeout=3.0)
            except Exception:  # noqa: BLE001 - cleanup must go on
                pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# -- Readiness -----------------------------------------------------------------------

def http_get(host: str, port: int, path: str = "/", timeout: float = 1.0,
             headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_http(port: int, path: str = "/", deadline_s: float = 30.0,
              procs: list[Proc] = (), what: str = "", host: str = "127.0.0.1",
              poll_s: float = 0.002, expect: int = 200) -> float:
    """Polls GET http://host:port/path until it answers `expect`; returns the
    seconds it took. Fails early if one of `procs` exits."""
    start = time.monotonic()
    end = start + deadline_s
    last = "no answer"
    while True:
        try:
            status, _ = http_get(host, port, path, timeout=1.0)
            if status == expect:
                return time.monotonic() - start
            last = f"status {status}"
        except (OSError, http.client.HTTPException) as e:
            last = f"{type(e).__name__}: {e}"
        for p in procs:
            p.check()
        if time.monotonic() > end:
            raise HarnessError(
                f"{what or f'port {port}'}: http://{host}:{port}{path} not {expect} "
                f"within {deadline_s:.0f}s (last: {last})"
                + "".join(f"\n  {p.name} log:\n{p.log_tail()}" for p in procs)
            )
        time.sleep(poll_s)


def wait_until(cond, deadline_s: float, what: str, procs: list[Proc] = (),
               poll_s: float = 0.01):
    """Polls `cond()` until it returns a true value (returned)."""
    end = time.monotonic() + deadline_s
    while True:
        value = cond()
        if value:
            return value
        for p in procs:
            p.check()
        if time.monotonic() > end:
            raise HarnessError(f"timed out after {deadline_s:.0f}s waiting for {what}")
        time.sleep(poll_s)


# -- Ports --------------------------------------------------------------------------

class Ports:
    """Loopback ports below the kernel's ephemeral range, checked free when handed
    out, never the same twice in one run."""

    def __init__(self, start: int = 21000):
        self.next = start

    def take(self) -> int:
        while True:
            port = self.next
            self.next += 1
            if self.next > 32000:
                self.next = 21000
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port


# -- /proc --------------------------------------------------------------------------

def _ppid_map() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        rest = stat.rsplit(")", 1)[1].split()
        out[int(entry)] = int(rest[1])
    return out


def tree_pids(root: int) -> list[int]:
    parents = _ppid_map()
    pids = [root]
    frontier = [root]
    while frontier:
        nxt = [pid for pid, ppid in parents.items() if ppid in frontier]
        pids.extend(nxt)
        frontier = nxt
    return pids


def rss_kb(pids: list[int]) -> int:
    """Sum of VmRSS over the processes (kB)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def pss_kb(pids: list[int]) -> int | None:
    """Sum of Pss (shared pages divided among sharers) over the processes (kB)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            return None
    return total


class CpuReading:
    """CPU time of some processes at one moment; `later - earlier` is the seconds used
    between the two readings.

    Precise (nanoseconds, each thread's `/proc/PID/task/TID/schedstat`) when the same
    threads are alive at both readings. When a thread ended in between, its time is
    gone from the per-thread sum, so the difference falls back to utime + stime from
    `/proc/PID/stat`, which keeps ended threads' time but counts in 10 ms clock ticks."""

    def __init__(self, pids: list[int]):
        self.ticks = 0
        self.procs = 0
        self.threads: dict[int, int] = {}
        self.precise = True
        for pid in pids:
            try:
                rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # After the comm field: state is rest[0]; utime and stime are fields 14 and 15.
            self.ticks += int(rest[11]) + int(rest[12])
            self.procs += 1
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                self.precise = False
                continue
            for tid in tids:
                try:
                    ns = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]
                    self.threads[tid] = int(ns)
                except (OSError, IndexError, ValueError):
                    # Ended between listing and reading, or no schedstat here.
                    self.precise = False

    def __sub__(self, earlier: "CpuReading") -> float:
        coarse = (self.ticks - earlier.ticks) / CLK_TCK
        if (self.precise and earlier.precise and earlier.threads
                and set(earlier.threads) <= set(self.threads)):
            # Threads started in between count from zero: their whole runtime is new.
            fine = sum(ns - earlier.threads.get(tid, 0)
                       for tid, ns in self.threads.items()) / 1e9
            # A thread that started and ended between the readings is in neither
            # per-thread sum but is in utime + stime, which agree with the per-thread
            # sum to within a tick per process per reading.
            if coarse - fine <= (2 * max(self.procs, 1) + 1) / CLK_TCK + 0.05 * coarse:
                return fine
        return coarse


def cpu_seconds(pids: list[int]) -> CpuReading:
    """A reading of the processes' CPU time (all their threads); subtract two readings
    for the seconds used between them."""
    return CpuReading(pids)


def threads(pids: list[int]) -> int:
    n = 0
    for pid in pids:
        try:
            n += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
    return n


def settled_rss(pids: list[int], deadline_s: float = 3.0) -> int:
    """RSS once it stops moving (three readings 50 ms apart within 0.5%), or the
    last reading at the deadline."""
    end = time.monotonic() + deadline_s
    readings = [rss_kb(pids)]
    while time.monotonic() < end:
        time.sleep(0.05)
        readings.append(rss_kb(pids))
        last = readings[-3:]
        if len(last) == 3 and max(last) - min(last) <= 0.005 * max(last):
            break
    return readings[-1]


# -- Noise --------------------------------------------------------------------------

BUSY_NAMES = {"rustc", "cargo", "cc1", "cc1plus", "ld", "clippy-driver", "rust-lld", "lld"}


def busy_processes(exclude: set[int] = frozenset()) -> list[str]:
    """Compiler-like processes running now that the harness did not start."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
        except OSError:
            continue
        if comm in BUSY_NAMES:
            found.append(comm)
    return found


def cargo_test_running() -> bool:
    try:
        out = subprocess.run(["pgrep", "-f", "cargo test"], capture_output=True, text=True)
    except FileNotFoundError:
        return False
    mine = {os.getpid(), os.getppid()}
    return any(int(p) not in mine for p in out.stdout.split())


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
