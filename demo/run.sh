#!/usr/bin/env bash
# The demo mesh in one command: builds `sinew` and `sinew-proxy`, then runs
# `sinew demo`: a control plane, six demo apps (catalog in two versions, v2 twice) each
# behind its own sinew-proxy plus a load generator's sidecar, steady load, a guided tour
# (canary, retries rescuing a fault, an instance killed, a call denied) and a live
# per-service view. Arguments go to `sinew demo` (e.g. --no-tour, --act-duration 5s,
# --duration 30s, --json, --rate 100).
# `--capture` (as root) runs it with transparent capture instead: demo/capture.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
for arg in "$@"; do
  [[ $arg == --capture ]] && exec demo/capture.sh "$@"
done
command -v cargo >/dev/null || { echo "demo: cargo is required (Rust $(sed -n 's/channel = "\(.*\)"/\1/p' rust-toolchain.toml))" >&2; exit 1; }
echo "building sinew and sinew-proxy (a few minutes the first time)…" >&2
cargo build --bins
exec "$(scripts/target-dir)/debug/sinew" demo "$@"
