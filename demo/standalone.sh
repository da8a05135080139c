#!/usr/bin/env bash
# Standalone mode (no control plane): two catalog versions behind sidecars, a web sidecar in front,
# a canary split and header routing, all on loopback. `--once` runs the tour and exits
# (the test suite does that); without it the mesh stays up until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
once=false
[[ "${1:-}" == "--once" ]] && once=true

for tool in cargo python3 curl; do
  command -v "$tool" >/dev/null || { echo "demo: $tool is required (scripts/test installs it)" >&2; exit 1; }
done
echo "building sinew-proxy (a few minutes the first time)…" >&2
cargo build -p sinew-proxy
proxy=$(scripts/target-dir)/debug/sinew-proxy
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM

python3 demo/app.py catalog-v1 18081 & pids+=($!)
python3 demo/app.py catalog-v2 18082 & pids+=($!)
admin_port=14191
for name in catalog-v1 catalog-v2 web; do
  RUST_LOG=${RUST_LOG:-warn} "$proxy" --config demo/mesh.yaml --name "$name" \
    --admin "127.0.0.1:$admin_port" 2>"$work/$name.log" & pids+=($!)
  admin_port=$((admin_port + 1))
done

# Wait for every sidecar to report ready (and the apps to answer).
for port in 14191 14192 14193; do
  for _ in $(seq 1 200); do
    curl -fsS "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && break
    sleep 0.05
  done
  curl -fsS "http://127.0.0.1:$port/ready" >/dev/null || { echo "sidecar on admin $port not ready"; cat "$work"/*.log; exit 1; }
done
for port in 18081 18082; do
  for _ in $(seq 1 200); do curl -fsS "http://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.05; done
done

echo "== web -> catalog through two sidecars (binding 127.0.0.1:19001)"
curl -fsS -i http://127.0.0.1:19001/items | grep -iE '^(HTTP|x-app|x-mesh)|"app"'
echo
echo "== canary: 200 requests, 90/10 by weight"
v1=0; v2=0
for _ in $(seq 1 200); do
  case "$(curl -fsS http://127.0.0.1:19001/)" in *catalog-v1*) v1=$((v1+1));; *catalog-v2*) v2=$((v2+1));; esac
done
echo "catalog-v1: $v1   catalog-v2: $v2"
[[ $v1 -gt $v2 && $v2 -gt 0 ]] || { echo "demo: unexpected split"; exit 1; }
echo
echo "== header routing: x-version: v2 always reaches v2"
curl -fsS -H 'x-version: v2' http://127.0.0.1:19001/pinned
echo
echo "== http_proxy mode: route by Host"
http_proxy=http://127.0.0.1:14140 curl -fsS http://catalog.shop/via-proxy -H 'x-version: v2'
echo
echo "== a proxy-made error explains itself"
http_proxy=http://127.0.0.1:14140 curl -sS -i http://nowhere/ | grep -iE '^(HTTP|sinew-error)|unknown'
echo
echo "== web sidecar metrics (excerpt)"
curl -fsS http://127.0.0.1:14193/metrics | grep -E '^sinew_(http_requests|proxy_errors)_total' || true
if $once; then
  echo "demo: ok"
  exit 0
fi
echo
echo "The mesh is up: try curl http://127.0.0.1:19001/ or the admin ports 14191-14193 (/config, /metrics)."
echo "Edit demo/mesh.yaml and the sidecars reload it. Ctrl-C stops everything."
wait
