#!/usr/bin/env bash
# The demo mesh in transparent-capture mode (needs root, ip and iptables): every demo
# service on its own "host" (a network namespace on a bridge), each an unmodified
# `sinew demo-app` started with `sinew run`, which installs the capture rules and the
# sidecar. The apps call each other by plain service name (http://catalog/): the
# sidecar's DNS answers with the service's virtual IP and the capture rules hand the
# connection to the sidecar, which carries it over mTLS to the callee's sidecar.
#
#   hub      10.78.0.1   the control plane (and the bridge)
#   client   10.78.0.2   `sinew run --service client -- sleep`: run curl here
#   frontend 10.78.0.3   calls catalog (90% v1, 10% v2) and reviews
#   catalog-v1/-v2, reviews (calls ratings), ratings: 10.78.0.4 ...
#
# `--once` checks one request end to end and exits (the test suite does that);
# without it the mesh stays up until Ctrl-C. Namespaces, rules and processes are
# removed at exit, on failure and on Ctrl-C.
# Environment: SINEW_BIN_DIR (where sinew and sinew-proxy are; default: build them
# with cargo into its target directory), SINEW_DEMO_PREFIX (namespace names; default sinew-demo).
set -euo pipefail
cd "$(dirname "$0")/.."
once=false
for arg in "$@"; do
  case "$arg" in
    --once) once=true ;;
    --capture) ;; # from demo/run.sh --capture
    *) echo "demo: unknown argument $arg (expected --once)" >&2; exit 2 ;;
  esac
done

die() { echo "demo --capture: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "transparent capture needs root (network namespaces, iptables): run it with sudo; or run the loopback demo without --capture"
PATH=$PATH:/usr/sbin:/sbin
for tool in ip iptables curl; do
  command -v "$tool" >/dev/null || die "$tool is required (apt-get install iproute2 iptables curl)"
done

if [[ -n "${SINEW_BIN_DIR:-}" ]]; then
  bin=$SINEW_BIN_DIR
elif command -v cargo >/dev/null; then
  echo "building sinew and sinew-proxy (a few minutes the first time)…" >&2
  cargo build --bins
  bin=$(scripts/target-dir)/debug
elif [[ -x target/debug/sinew && -x target/debug/sinew-proxy ]]; then
  bin=target/debug
else
  die "cargo is not on root's PATH and target/debug has no sinew: build with \`cargo build --bins\` first, or say where the binaries are with SINEW_BIN_DIR"
fi
bin=$(cd "$bin" && pwd)
sinew=$bin/sinew
[[ -x $sinew && -x $bin/sinew-proxy ]] || die "no sinew and sinew-proxy in $bin"

prefix=${SINEW_DEMO_PREFIX:-sinew-demo}
hub=$prefix-hub
hub_ip=10.78.0.1
cp_url=https://$hub_ip:15010
# host name, then `sinew demo-app` flags.
hosts=(client frontend catalog-v1 catalog-v2 reviews ratings)
ip netns list | grep -q "^$hub\b" && die "namespace $hub exists: is a capture demo already running? (or: ip netns del $hub)"

work=$(mktemp -d)
chmod 755 "$work"
pids=()      # `sinew run` for every host (they remove their rules on SIGTERM)
cp_pid=""
made=()      # namespaces created
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  # A Ctrl-C can land while a command's `2>/dev/null` is in effect (the load loop
  # below): say what happens on the script's own standard error.
  exec 2>&3
  echo "demo: stopping the apps and sidecars, removing capture rules and namespaces" >&2
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  local left=0
  for ns in "${made[@]}"; do
    [[ $ns == "$hub" ]] && continue
    if ip netns exec "$ns" iptables-save 2>/dev/null | grep -q SINEW; then
      echo "demo: capture rules still in $ns" >&2
      left=$((left + 1))
    fi
  done
  [[ $left -eq 0 ]] && echo "demo: capture rules removed from every host" >&2
  [[ -n $cp_pid ]] && { kill -TERM "$cp_pid" 2>/dev/null || true; wait "$cp_pid" 2>/dev/null || true; }
  for ns in "${made[@]}"; do
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "/etc/netns/$ns"
  done
  if [[ $status -ne 0 && $status -ne 130 && $status -ne 143 ]]; then
    for f in "$work"/*.log; do [[ -f $f ]] && { echo "--- $(basename "$f")" >&2; tail -n 15 "$f" >&2; }; done
  fi
  rm -rf "$work"
  [[ $left -eq 0 ]] || status=1
  exit "$status"
}
exec 3>&2
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The sidecars run as the proxy uid, which may not reach the build directory (a
# checkout in a private home or a `mktemp -d` is 0700): installed here, as on a host.
cp "$bin/sinew-proxy" "$work/sinew-proxy"
chmod 755 "$work/sinew-proxy"
export SINEW_PROXY_BIN=$work/sinew-proxy

# -- Hosts: one namespace each, a veth to the hub's bridge.
ip netns add "$hub"; made+=("$hub")
ip -n "$hub" link set lo up
ip -n "$hub" link add br0 type bridge
ip -n "$hub" addr add $hub_ip/24 dev br0
ip -n "$hub" link set br0 up
n=2
for h in "${hosts[@]}"; do
  ns=$prefix-$h
  ip netns add "$ns"; made+=("$ns")
  ip -n "$ns" link set lo up
  ip -n "$hub" link add "v$n" type veth peer name eth0 netns "$ns"
  ip -n "$hub" link set "v$n" master br0 up
  ip -n "$ns" addr add "10.78.0.$n/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" route add default via $hub_ip
  # Short names (http://catalog/) resolve through the search list; the capture
  # rules send the queries to the sidecar's DNS.
  mkdir -p "/etc/netns/$ns"
  printf 'nameserver %s\nsearch demo.svc.cluster.local svc.cluster.local cluster.local\noptions timeout:2 attempts:2\n' \
    $hub_ip >"/etc/netns/$ns/resolv.conf"
  n=$((n + 1))
done
echo "demo: ${#hosts[@]} hosts (network namespaces $prefix-*) on a bridge in $hub" >&2

# -- The control plane, in the hub.
ip netns exec "$hub" "$sinew" control --listen $hub_ip:15010 --data-dir "$work/cp" >"$work/control.log" 2>&1 &
cp_pid=$!
# The control plane writes its admin credential on first start; every call below is
# authenticated with it (ip netns exec passes the environment on).
export SINEW_CREDENTIALS="$work/cp/admin.credentials"
for _ in $(seq 1 300); do
  ip netns exec "$hub" "$sinew" --server $cp_url get service >/dev/null 2>&1 && break
  sleep 0.1
done
ip netns exec "$hub" "$sinew" --server $cp_url get service >/dev/null || die "the control plane did not come up"

cat >"$work/demo.yaml" <<'EOF'
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {name: frontend, namespace: demo}
spec: {ports: [{name: http, port: 80, protocol: HTTP}]}
---
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {name: catalog, namespace: demo}
spec: {ports: [{name: http, port: 80, protocol: HTTP}]}
---
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {name: catalog-v1, namespace: demo}
spec: {ports: [{name: http, port: 80, protocol: HTTP}]}
---
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {name: catalog-v2, namespace: demo}
spec: {ports: [{name: http, port: 80, protocol: HTTP}]}
---
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {name: reviews, namespace: demo}
spec: {ports: [{name: http, port: 80, protocol: HTTP}]}
---
apiVersion: sinew.dev/v1alpha1
kind: Service
metadata: {name: ratings, namespace: demo}
spec: {ports: [{name: http, port: 80, protocol: HTTP}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: catalog, namespace: demo}
spec:
  parentRefs: [{kind: Service, name: catalog}]
  rules:
    - backendRefs: [{name: catalog-v1, weight: 90}, {name: catalog-v2, weight: 10}]
EOF
ip netns exec "$hub" "$sinew" --server $cp_url apply -f "$work/demo.yaml" >/dev/null

# -- Every app, unmodified, with `sinew run` on its host. Calls name services only.
start() { # host service version app-flags...
  local h=$1 service=$2 version=$3
  shift 3
  ip netns exec "$prefix-$h" "$sinew" --server $cp_url run -n demo --service "$service" --name "$h" \
    --port http=8080 -- "$sinew" demo-app --service "$service" --version "$version" --instance "$h" \
    --http 0.0.0.0:8080 "$@" >"$work/$h.log" 2>&1 &
  pids+=($!)
}
start ratings ratings v1 --latency-ms 1
start reviews reviews v1 --latency-ms 3 --call http://ratings
start catalog-v1 catalog-v1 v1 --latency-ms 4
start catalog-v2 catalog-v2 v2 --latency-ms 12
start frontend frontend v1 --call http://catalog --call http://reviews
# The client host: a sidecar with nothing behind it; anything run there is meshed.
ip netns exec "$prefix-client" "$sinew" --server $cp_url run -n demo --service client --name client \
  -- sleep infinity >"$work/client.log" 2>&1 &
pids+=($!)
echo "demo: started 5 demo apps and a client, each with \`sinew run\`" >&2

# -- Ready when a request from the client host crosses the whole mesh.
in_client() { ip netns exec "$prefix-client" "$@"; }
body=""
for _ in $(seq 1 600); do
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || die "a \`sinew run\` exited during startup"; done
  body=$(in_client curl -fsS --max-time 5 http://frontend/ 2>/dev/null) && [[ $body == *'"ratings"'* ]] && break
  body=""
  sleep 0.1
done
[[ -n $body ]] || die "the frontend did not answer through the mesh within 60 s"

metric() { # host, then substrings a sample's line must all contain; prints the sum
  local text
  text=$(ip netns exec "$prefix-$1" curl -fsS --max-time 5 http://127.0.0.1:4191/metrics) || { echo 0; return; }
  shift
  awk -v pats="$(printf '%s\n' "$@")" '
    BEGIN { n = split(pats, p, "\n") - 1 }
    /^sinew_requests_total[{ ]/ { ok = 1; for (i = 1; i <= n; i++) if (index($0, p[i]) == 0) ok = 0; if (ok) s += $NF }
    END { print s + 0 }' <<<"$text"
}

if $once; then
  echo "== client -> frontend -> reviews -> ratings, by service name"
  echo "$body"
  # Each hop was received by the callee's sidecar from the caller's identity (mTLS).
  for hop in frontend:client reviews:frontend ratings:reviews; do
    callee=${hop%:*} caller=${hop#*:}
    seen=$(metric "$callee" 'direction="inbound"' "peer_identity=\"spiffe://cluster.local/ns/demo/sa/$caller\"")
    echo "mtls: $callee's sidecar received $seen request(s) from $caller's identity"
    [[ $seen != 0 ]] || die "no mTLS request from $caller at $callee's sidecar"
  done
  echo "demo: ok"
  exit 0
fi

cat <<EOF

Sinew demo mesh with transparent capture is up (namespace demo, hosts $prefix-*):
  hub 10.78.0.1 (control plane $cp_url), client 10.78.0.2, frontend 10.78.0.3,
  catalog-v1 .4, catalog-v2 .5, reviews .6, ratings .7; every app runs under \`sinew run\`.

Try (as root, in another terminal):
  ip netns exec $prefix-client curl http://frontend/            # by name, through both sidecars
  ip netns exec $prefix-client getent hosts catalog              # the virtual IP the sidecar's DNS gives
  SINEW_CREDENTIALS=$SINEW_CREDENTIALS ip netns exec $prefix-hub $sinew --server $cp_url stat -n demo
  SINEW_CREDENTIALS=$SINEW_CREDENTIALS ip netns exec $prefix-hub $sinew --server $cp_url edges -n demo
  ip netns exec $prefix-frontend iptables-save -t nat           # the capture rules
Logs: $work. Ctrl-C stops everything and removes the namespaces and rules.
EOF
# Steady light load from the client host, so stat and edges have something to show.
while true; do
  in_client curl -fsS --max-time 5 -o /dev/null http://frontend/ 2>/dev/null || true
  sleep 0.2
done
