#!/bin/sh
# Load the seed scenario into a Sluice API with curl, in one idempotent request
# (PUT /v1/config): run it again and nothing changes.
#
#   redmine.beerme  terminated with the *.beerme certificate, HTTP/2 to clients, round robin
#                   over HTTP/1.1 backends that learn the client from X-Forwarded-* headers
#   odoo.beerme     passed through by SNI to TLS backends that hold their own certificate
#   grpc.beerme     terminated, one shared HTTP/2 (h2c) connection per backend server
#
# Environment:
#   SLUICE_API          API base URL (default http://127.0.0.1:9000)
#   SLUICE_ADMIN_TOKEN  admin bearer token (required)
#   CERT_DIR            directory from `sluice-api demo-certs` (edge.pem, edge.key)
#   REDMINE_SERVERS, ODOO_SERVERS, GRPC_SERVERS
#                       space-separated host:port lists
#
# The compose stack's init job runs this script; CI runs it against a locally started stack.
set -eu

: "${SLUICE_API:=http://127.0.0.1:9000}"
: "${SLUICE_ADMIN_TOKEN:?set SLUICE_ADMIN_TOKEN}"
: "${CERT_DIR:?set CERT_DIR to a directory made by sluice-api demo-certs}"
: "${REDMINE_SERVERS:?set REDMINE_SERVERS (host:port ...)}"
: "${ODOO_SERVERS:?set ODOO_SERVERS (host:port ...)}"
: "${GRPC_SERVERS:?set GRPC_SERVERS (host:port ...)}"

# A file's contents as a JSON string.
json_file() {
  awk 'BEGIN { ORS = ""; print "\"" } { gsub(/\\/, "\\\\"); gsub(/"/, "\\\""); print $0 "\\n" } END { print "\"" }' "$1"
}
# "a:1 b:2" as [{"address":"a:1"},{"address":"b:2"}].
servers() {
  sep=""
  printf '['
  for address in $1; do
    printf '%s{"address":"%s"}' "$sep" "$address"
    sep=","
  done
  printf ']'
}

tries=0
until curl -fsS "$SLUICE_API/healthz" > /dev/null 2>&1; do
  tries=$((tries + 1))
  if [ "$tries" -ge 60 ]; then
    echo "seed: the API at $SLUICE_API did not come up" >&2
    exit 1
  fi
  sleep 1
done

cat > "${TMPDIR:-/tmp}/sluice-seed.$$.json" <<JSON
{
  "certificates": [
    {"name": "beerme", "cert_pem": $(json_file "$CERT_DIR/edge.pem"), "key_pem": $(json_file "$CERT_DIR/edge.key")}
  ],
  "backends": [
    {"name": "redmine", "protocol": "http", "balance": "round_robin", "servers": $(servers "$REDMINE_SERVERS"),
     "health_check": {"kind": "http", "path": "/"}},
    {"name": "odoo", "protocol": "tcp", "servers": $(servers "$ODOO_SERVERS")},
    {"name": "grpc", "protocol": "h2c", "servers": $(servers "$GRPC_SERVERS")}
  ],
  "hosts": [
    {"hostname": "redmine.beerme", "mode": "terminate", "backend": "redmine", "certificate": "beerme"},
    {"hostname": "odoo.beerme", "mode": "passthrough", "backend": "odoo"},
    {"hostname": "grpc.beerme", "mode": "terminate", "backend": "grpc", "certificate": "beerme"}
  ]
}
JSON
trap 'rm -f "${TMPDIR:-/tmp}/sluice-seed.$$.json"' EXIT

status=$(curl -sS -o "${TMPDIR:-/tmp}/sluice-seed.$$.out" -w '%{http_code}' -X PUT \
  -H "Authorization: Bearer $SLUICE_ADMIN_TOKEN" -H 'Content-Type: application/json' \
  --data-binary "@${TMPDIR:-/tmp}/sluice-seed.$$.json" "$SLUICE_API/v1/config")
body=$(cat "${TMPDIR:-/tmp}/sluice-seed.$$.out")
rm -f "${TMPDIR:-/tmp}/sluice-seed.$$.out"
if [ "$status" != 200 ]; then
  echo "seed: PUT /v1/config answered $status: $body" >&2
  exit 1
fi
echo "seed: $body"
