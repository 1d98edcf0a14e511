#!/usr/bin/env bash
# Workload 7, the NGINX and HAProxy side: how long a configuration change takes to reach traffic
# with 10 and 10,000 hosts when the proxy's file is rewritten and the proxy reloaded (NGINX
# `-s reload`, HAProxy master-worker `USR2`). Host h0's answer flips between "a" and "b"; the
# time runs from the reload command to the first request that sees the new answer. Sluice's
# side is `sluice-bench push` (API write to every worker's Ack).
#
#   bench/reload.sh WORKDIR PORT CORE RUNS   (called by bench/run; prints JSON lines)
set -euo pipefail
WORK=$1 PORT=$2 CORE=$3 RUNS=$4
DIR="$WORK/reload"
mkdir -p "$DIR"

now_ms() { date +%s%3N; }
# Poll h0 until it answers $1; print the milliseconds since $2.
wait_answer() {
  for _ in $(seq 1 3000); do
    if [[ $(curl -sk --max-time 1 --resolve "h0.example:$PORT:127.0.0.1" "https://h0.example:$PORT/" 2>/dev/null) == "$1" ]]; then
      echo $(($(now_ms) - $2)); return 0
    fi
    sleep 0.005
  done
  echo "h0 never answered $1" >&2; return 1
}

nginx_conf() { # hosts answer
  {
    echo "worker_processes 1; pid $DIR/nginx.pid; error_log $DIR/nginx-error.log warn;"
    echo "events { worker_connections 4096; }"
    echo "http { access_log off; server_names_hash_max_size 65536; server_names_hash_bucket_size 128;"
    echo "  ssl_certificate $WORK/cert.pem; ssl_certificate_key $WORK/key.pem;"
    for i in $(seq 0 $(($1 - 1))); do
      local body=x; [[ $i == 0 ]] && body=$2
      echo "  server { listen 127.0.0.1:$PORT ssl; server_name h$i.example; location / { return 200 \"$body\"; } }"
    done
    echo "}"
  } > "$DIR/nginx.conf"
}

haproxy_conf() { # hosts answer
  {
    echo "global"
    echo "  nbthread 1"
    echo "defaults"
    echo "  mode http"
    echo "  timeout connect 5s"
    echo "  timeout client 10s"
    echo "  timeout server 10s"
    echo "frontend fe"
    echo "  bind 127.0.0.1:$PORT ssl crt $WORK/combined.pem"
    for i in $(seq 0 $(($1 - 1))); do
      local body=x; [[ $i == 0 ]] && body=$2
      echo "  http-request return status 200 content-type text/plain string \"$body\" if { req.hdr(host),field(1,:) -i h$i.example }"
    done
    echo "  http-request return status 404"
  } > "$DIR/haproxy.cfg"
}

for hosts in ${RELOAD_HOSTS:-10 10000}; do
  # NGINX
  nginx_conf "$hosts" a
  taskset -c "$CORE" nginx -c "$DIR/nginx.conf" -p "$DIR"
  wait_answer a "$(now_ms)" > /dev/null
  answer=a
  for _ in $(seq 1 "$RUNS"); do
    [[ $answer == a ]] && answer=b || answer=a
    nginx_conf "$hosts" "$answer"
    start=$(now_ms)
    nginx -c "$DIR/nginx.conf" -p "$DIR" -s reload
    ms=$(wait_answer "$answer" "$start")
    echo "{\"bench\": \"reload\", \"proxy\": \"nginx\", \"hosts\": $hosts, \"ms\": $ms}"
  done
  nginx -c "$DIR/nginx.conf" -p "$DIR" -s stop
  sleep 0.5
  # HAProxy (master-worker, reloaded with USR2)
  haproxy_conf "$hosts" a
  taskset -c "$CORE" haproxy -W -D -f "$DIR/haproxy.cfg" -p "$DIR/haproxy.pid"
  wait_answer a "$(now_ms)" > /dev/null
  answer=a
  for _ in $(seq 1 "$RUNS"); do
    [[ $answer == a ]] && answer=b || answer=a
    haproxy_conf "$hosts" "$answer"
    start=$(now_ms)
    kill -USR2 "$(head -1 "$DIR/haproxy.pid")"
    ms=$(wait_answer "$answer" "$start")
    echo "{\"bench\": \"reload\", \"proxy\": \"haproxy\", \"hosts\": $hosts, \"ms\": $ms}"
  done
  kill "$(head -1 "$DIR/haproxy.pid")"
  sleep 0.5
done
