#!/usr/bin/env bash
# Shared by bench/run and bench/profile (sourced, not run): installs the tools, builds Sluice in
# release mode, generates the certificate, starts the backends, and defines how each proxy is
# started and each workload measured. Expects ROOT, DUR and the working directory set.
PROXY_CORE=0
LOAD_CORE=1
IDLE_CONNS=5000
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

missing=()
command -v nginx >/dev/null || missing+=(nginx)
command -v haproxy >/dev/null || missing+=(haproxy)
[[ -f /usr/lib/nginx/modules/ngx_stream_module.so ]] || missing+=(libnginx-mod-stream)
command -v wrk >/dev/null || missing+=(wrk)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v openssl >/dev/null || missing+=(openssl)
command -v curl >/dev/null || missing+=(curl)
if ((${#missing[@]})); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

cargo build --release -q -p sluice-api -p sluice-bench
BIN="$ROOT/target/release/sluice-api"
WORK=$(mktemp -d)
RAW="$WORK/raw.jsonl"
: > "$RAW"
cleanup() {
  for p in "$WORK"/*.pid; do [[ -f "$p" ]] && kill "$(cat "$p")" 2>/dev/null || true; done
  jobs -p | xargs -r kill 2>/dev/null || true
  wait 2>/dev/null || true
  # The work directory holds the 64 MiB download file and per-proxy logs: about 65 MiB a run.
  [[ -n "${SLUICE_BENCH_KEEP:-}" ]] || rm -rf "$WORK"
}
trap cleanup EXIT

BACKEND_PORT=18000
TLS_BACKEND_PORT=18444
H2_BACKEND_PORT=18002
PROXY_PORT=18443
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost" -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
cat "$WORK/cert.pem" "$WORK/key.pem" > "$WORK/combined.pem"

render() {
  sed -e "s|__DIR__|$WORK|g" -e "s|__BACKEND_PORT__|$BACKEND_PORT|g" -e "s|__PROXY_PORT__|$PROXY_PORT|g" \
    -e "s|__TLS_BACKEND_PORT__|$TLS_BACKEND_PORT|g" -e "s|__H2_BACKEND_PORT__|$H2_BACKEND_PORT|g" "$1" > "$2"
}
wait_port() {
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "port $1 never opened" >&2; return 1
}

render bench/configs/backend-nginx.conf "$WORK/backend.conf"
taskset -c $LOAD_CORE nginx -c "$WORK/backend.conf" -p "$WORK"
wait_port $BACKEND_PORT
BACKEND_WORKERS=$(pgrep -P "$(cat "$WORK/backend.pid")" | tr '\n' ' ')
# Context switches (voluntary and not) of these pids so far, from /proc.
switches_of() { local t=0 p; for p in "$@"; do
  t=$((t + $(awk '/ctxt_switches/ { n += $2 } END { print n + 0 }' "/proc/$p/status"))); done; echo $t; }

# One measured run: prints a JSON line. With the backend's context switches per request: it
# shares the load core with wrk, and when it is woken it can take that core from wrk, which then
# reads its responses late (see bench/HISTORY.md, 8 Dec).
wrk_run() { # proxy url
  local out s0 s1
  # shellcheck disable=SC2086 # one pid per word
  s0=$(switches_of $BACKEND_WORKERS)
  out=$(taskset -c $LOAD_CORE wrk -t1 -c50 -d${DUR}s --latency -s bench/latency.lua "$2" 2>&1 || true)
  # shellcheck disable=SC2086
  s1=$(switches_of $BACKEND_WORKERS)
  python3 bench/parse.py wrk "$1" --backend-switches=$((s1 - s0)) <<<"$out"
}
# h2load reports only the mean and spread of its request times; the percentiles come from its
# per-request log (start, status, microseconds to the end of the response; no coordinated-omission
# correction). Writing it does not change the rate (28.3k against 28.2k requests/s, 2 runs).
h2load_run() { # proxy url
  local out
  rm -f "$WORK/h2load.tsv"
  out=$(taskset -c $LOAD_CORE h2load -c 64 -m 10 -D $DUR --log-file="$WORK/h2load.tsv" "$2" 2>&1 || true)
  python3 bench/parse.py h2load "$1" --log="$WORK/h2load.tsv" <<<"$out"
}
bulk_run() { # proxy url: 8 connections downloading a 64 MiB file through the proxy; with the
  # proxy's CPU seconds over the run (none for the direct baseline). wrk's default 2 s timeout
  # would count a 64 MiB answer slowed by a busy machine as a socket error.
  local out pids cpu0=0 cpu1=0
  pids=$(proxy_pids "$1" | tr ',' ' ')
  [[ -n $pids ]] && cpu0=$(cpu_of $pids)
  out=$(taskset -c $LOAD_CORE wrk -t1 -c8 -d${DUR}s --timeout 30s "$2" 2>&1 || true)
  [[ -n $pids ]] && cpu1=$(cpu_of $pids)
  python3 bench/parse.py bulk "$1" "" "$(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN { print b - a }')" "$DUR" <<<"$out"
}
h2up_run() { # proxy url: h2load as in workload 2, counting the proxy's backend connections
  # (to $UPSTREAM_PORT) halfway through the run
  local out="$WORK/h2up.out" pid conns
  rm -f "$WORK/h2load.tsv"
  taskset -c $LOAD_CORE h2load -c 64 -m 10 -D $DUR --log-file="$WORK/h2load.tsv" "$2" > "$out" 2>&1 &
  pid=$!
  sleep "$(awk "BEGIN { print $DUR / 2 }")"
  conns=$(ss -Htn state established "( dport = :$UPSTREAM_PORT )" | wc -l)
  wait $pid || true
  python3 bench/parse.py h2load "$1" "$conns" --log="$WORK/h2load.tsv" < "$out"
}
h2bulk_run() { # proxy url: 4 HTTP/2 clients x 2 streams downloading the 64 MiB file, with the
  # proxy's CPU seconds over the run
  local out pids cpu0 cpu1
  pids=$(proxy_pids "$1" | tr ',' ' ')
  cpu0=$(cpu_of $pids)
  out=$(taskset -c $LOAD_CORE h2load -c 4 -m 2 -D $DUR "$2" 2>&1 || true)
  cpu1=$(cpu_of $pids)
  python3 bench/parse.py h2bulk "$1" "" "$(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN { print b - a }')" "$DUR" <<<"$out"
}
measure() { # proxy workload url
  local proxy=$1 workload=$2 url=$3 fn
  fn=wrk_run; [[ $workload == h2 ]] && fn=h2load_run
  [[ $workload == passthrough || $workload == buffer ]] && fn=bulk_run
  [[ $workload == h2up ]] && fn=h2up_run
  [[ $workload == window ]] && fn=h2bulk_run
  DUR=1 $fn "$proxy" "$url" > /dev/null # warm-up (connections, caches), discarded
  for _ in $(seq 1 $RUNS); do
    $fn "$proxy" "$url" | python3 -c "import json,sys; d=json.load(sys.stdin); d['workload']='$workload'; print(json.dumps(d))" >> "$RAW"
  done
}
# For the scripts that take COMPARE="BINARY...": an entry of their proxy list that is a path is
# that Sluice build. Sets p (the start_/stop_ suffix), label (what the report calls it) and BIN.
proxy_entry() { # entry
  p=$1 label=$1
  if [[ $p == /* ]]; then
    BIN=$p p=sluice label=sluice
    [[ -n ${COMPARE:-} ]] && label=$(basename "$BIN")
  fi
  return 0
}
# CPU seconds (user + system) of these pids, from /proc (10 ms resolution).
cpu_of() { local t=0; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  awk -v t="$t" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t / hz }'; }
# The pids doing the proxy's work, comma-separated: Sluice's worker, NGINX's worker, HAProxy.
proxy_pids() {
  case $1 in
    sluice*) cat "$WORK/sluice-worker.pid" ;;
    nginx) pgrep -P "$(cat "$WORK/nginx.pid" 2>/dev/null || cat "$WORK/nginx-pt.pid")" | paste -sd, ;;
    haproxy) cat "$WORK"/haproxy*.pid 2>/dev/null | head -1 ;;
  esac
}
# Workload 3: full and resumed TLS handshakes per second, and the proxy's CPU per handshake.
handshakes() { # proxy
  local pids; pids=$(proxy_pids "$1")
  for mode in new resumed; do
    taskset -c $LOAD_CORE python3 bench/tls_conns.py "$1" 127.0.0.1 $PROXY_PORT $mode 1 "$pids" > /dev/null # warm-up
    for _ in $(seq 1 $RUNS); do
      taskset -c $LOAD_CORE python3 bench/tls_conns.py "$1" 127.0.0.1 $PROXY_PORT $mode $DUR "$pids" |
        python3 -c "import json,sys; d=json.load(sys.stdin); d['workload']='handshake_$mode'; print(json.dumps(d))" >> "$RAW"
    done
  done
}
# Workload 5b: new passthrough connections per second (the backend does the handshake) and the
# proxy's CPU per connection.
pt_conns() { # proxy
  local pids; pids=$(proxy_pids "$1")
  taskset -c $LOAD_CORE python3 bench/tls_conns.py "$1" 127.0.0.1 $PROXY_PORT new 1 "$pids" > /dev/null # warm-up
  for _ in $(seq 1 $RUNS); do
    taskset -c $LOAD_CORE python3 bench/tls_conns.py "$1" 127.0.0.1 $PROXY_PORT new $DUR "$pids" |
      python3 -c "import json,sys; d=json.load(sys.stdin); d['workload']='pt_conns'; print(json.dumps(d))" >> "$RAW"
  done
}
# Workload 6: resident memory per idle TLS connection (one run: it is a count, not a rate).
idle_memory() { # proxy
  taskset -c $LOAD_CORE python3 bench/idle.py "$1" 127.0.0.1 $PROXY_PORT $IDLE_CONNS "$(proxy_pids "$1")" |
    python3 -c "import json,sys; d=json.load(sys.stdin); d['workload']='idle'; print(json.dumps(d))" >> "$RAW"
}

start_sluice() { # [copy buffer KiB] [upstream HTTP/2 stream window KiB]
  export SLUICE_COPY_BUFFER_KIB=${1:-16}
  if [[ -n ${2:-} ]]; then export SLUICE_UPSTREAM_H2_WINDOW_KIB=$2; else unset SLUICE_UPSTREAM_H2_WINDOW_KIB; fi
  rm -rf "$WORK/sluice" "$WORK/sluice-worker" # a fresh control plane each time
  RUST_LOG=warn taskset -c $LOAD_CORE "$BIN" --listen 127.0.0.1:19000 --data-dir "$WORK/sluice" --workers 0 \
    > "$WORK/sluice-api.log" 2>&1 &
  echo $! > "$WORK/sluice-api.pid"
  wait_port 19000
  local token; token=$(cat "$WORK/sluice/worker.token")
  SLUICE_WORKER_TOKEN=$token RUST_LOG=warn taskset -c $PROXY_CORE "$BIN" worker --api http://127.0.0.1:19000 \
    --threads 1 --https 127.0.0.1:$PROXY_PORT --http 127.0.0.1:18080 --admin 127.0.0.1:19100 \
    --state-dir "$WORK/sluice-worker" > "$WORK/sluice-worker.log" 2>&1 &
  echo $! > "$WORK/sluice-worker.pid"
  local auth=(-sf -H "Authorization: Bearer $(cat "$WORK/sluice/admin.token")" -H "Content-Type: application/json")
  local cert backend
  cert=$(python3 -c "import json,sys; print(json.dumps({'name':'bench','cert_pem':open('$WORK/cert.pem').read(),'key_pem':open('$WORK/key.pem').read()}))" |
    curl "${auth[@]}" -d @- http://127.0.0.1:19000/v1/certificates | python3 -c "import json,sys; print(json.load(sys.stdin)['id'])")
  backend=$(curl "${auth[@]}" http://127.0.0.1:19000/v1/backends \
    -d "{\"name\":\"be\",\"protocol\":\"http\",\"servers\":[{\"address\":\"127.0.0.1:$BACKEND_PORT\"}]}" |
    python3 -c "import json,sys; print(json.load(sys.stdin)['id'])")
  curl "${auth[@]}" http://127.0.0.1:19000/v1/hosts \
    -d "{\"hostname\":\"localhost\",\"mode\":\"terminate\",\"backend_id\":\"$backend\",\"certificate_id\":\"$cert\"}" > /dev/null
  for _ in $(seq 1 200); do
    curl -sf http://127.0.0.1:19100/status | grep -q '"hosts":1' && break
    sleep 0.05
  done
  wait_port $PROXY_PORT
}
# Replace Sluice's whole configuration with this JSON document; wait until the worker has it.
sluice_apply() {
  local auth=(-sf -H "Authorization: Bearer $(cat "$WORK/sluice/admin.token")" -H "Content-Type: application/json")
  curl "${auth[@]}" -X PUT http://127.0.0.1:19000/v1/config -d "$1" > /dev/null
  local v; v=$(curl "${auth[@]}" http://127.0.0.1:19000/v1/config | python3 -c "import json,sys; print(json.load(sys.stdin)['version'])")
  for _ in $(seq 1 200); do
    curl -sf http://127.0.0.1:19100/status | grep -q "\"applied_version\":$v" && break
    sleep 0.05
  done
}
# Switch Sluice's `localhost` host to passthrough (to the TLS backend).
sluice_passthrough() {
  sluice_apply "{\"backends\":[{\"name\":\"tls\",\"protocol\":\"tcp\",
    \"servers\":[{\"address\":\"127.0.0.1:$TLS_BACKEND_PORT\"}]}],
    \"hosts\":[{\"hostname\":\"localhost\",\"mode\":\"passthrough\",\"backend\":\"tls\"}]}"
}
# Point Sluice's `localhost` host (still terminated, same certificate: its key is kept) at the
# h2c backend.
sluice_h2up() {
  sluice_apply "$(python3 -c "import json; print(json.dumps({
    'certificates': [{'name': 'bench', 'cert_pem': open('$WORK/cert.pem').read()}],
    'backends': [{'name': 'h2', 'protocol': 'h2c', 'servers': [{'address': '127.0.0.1:$H2_BACKEND_PORT'}]}],
    'hosts': [{'hostname': 'localhost', 'mode': 'terminate', 'backend': 'h2', 'certificate': 'bench'}]}))")"
}
stop_sluice() {
  kill "$(cat "$WORK/sluice-worker.pid")" "$(cat "$WORK/sluice-api.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -f "$WORK/sluice-worker.pid" "$WORK/sluice-api.pid"
}
start_nginx() {
  render bench/configs/nginx.conf "$WORK/nginx.conf"
  taskset -c $PROXY_CORE nginx -c "$WORK/nginx.conf" -p "$WORK"
  wait_port $PROXY_PORT
}
stop_nginx() { nginx -c "$WORK/nginx.conf" -p "$WORK" -s stop; sleep 0.5; }
start_haproxy() {
  render bench/configs/haproxy.cfg "$WORK/haproxy.cfg"
  taskset -c $PROXY_CORE haproxy -D -f "$WORK/haproxy.cfg"
  wait_port $PROXY_PORT
}
stop_haproxy() { kill "$(cat "$WORK/haproxy.pid")"; rm -f "$WORK/haproxy.pid"; sleep 0.5; }

start_nginx_pt() {
  render bench/configs/nginx-passthrough.conf "$WORK/nginx-pt.conf"
  taskset -c $PROXY_CORE nginx -c "$WORK/nginx-pt.conf" -p "$WORK"
  wait_port $PROXY_PORT
}
stop_nginx_pt() { nginx -c "$WORK/nginx-pt.conf" -p "$WORK" -s stop; sleep 0.5; }
start_haproxy_pt() {
  render bench/configs/haproxy-passthrough.cfg "$WORK/haproxy-pt.cfg"
  taskset -c $PROXY_CORE haproxy -D -f "$WORK/haproxy-pt.cfg"
  wait_port $PROXY_PORT
}
stop_haproxy_pt() { kill "$(cat "$WORK/haproxy-pt.pid")"; rm -f "$WORK/haproxy-pt.pid"; sleep 0.5; }
start_haproxy_h2up() {
  render bench/configs/haproxy-h2up.cfg "$WORK/haproxy-h2up.cfg"
  taskset -c $PROXY_CORE haproxy -D -f "$WORK/haproxy-h2up.cfg"
  wait_port $PROXY_PORT
}
stop_haproxy_h2up() { kill "$(cat "$WORK/haproxy.pid")"; rm -f "$WORK/haproxy.pid"; sleep 0.5; }

mkdir -p "$WORK/www"
head -c $((64 * 1024 * 1024)) /dev/zero > "$WORK/www/big"
chmod 755 "$WORK" "$WORK/www" && chmod 644 "$WORK/www/big" # NGINX workers run as www-data
render bench/configs/backend-tls-nginx.conf "$WORK/backend-tls.conf"
taskset -c $LOAD_CORE nginx -c "$WORK/backend-tls.conf" -p "$WORK"
wait_port $TLS_BACKEND_PORT
render bench/configs/backend-h2-nginx.conf "$WORK/backend-h2.conf"
taskset -c $LOAD_CORE nginx -c "$WORK/backend-h2.conf" -p "$WORK"
wait_port $H2_BACKEND_PORT
