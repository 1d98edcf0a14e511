"""New TLS connections per second against a proxy, and the proxy's CPU per handshake.

    python3 bench/tls_conns.py PROXY HOST PORT new|resumed SECONDS PID[,PID...]

Four client threads each connect, complete the handshake (SNI `localhost`, ALPN http/1.1)
and close, for SECONDS. `new` makes full handshakes; `resumed` resumes the first session (TLS
1.2 session tickets, so the session exists right after the handshake on every proxy). The
proxy's CPU time (utime + stime of the given pids, from /proc) over the run divided by the
handshakes gives CPU per handshake, which does not depend on how fast this client is.
Prints one JSON line in the format of bench/parse.py.
"""
import json
import os
import socket
import ssl
import sys
import threading
import time

proxy, host, port, mode, seconds, pids = sys.argv[1:7]
port, seconds = int(port), float(seconds)
pids = [int(p) for p in pids.split(",") if p]
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds():
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["http/1.1"])
if mode == "resumed":
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2


def connect(session=None):
    s = socket.create_connection((host, port), timeout=5)
    t = ctx.wrap_socket(s, server_hostname="localhost", session=session)
    return t


first = connect()
session = first.session if mode == "resumed" else None
first.close()
counts, errors, resumed = [0] * 4, [], [0] * 4
deadline = time.monotonic() + seconds


def run(i):
    while time.monotonic() < deadline:
        try:
            t = connect(session)
            if t.session_reused:
                resumed[i] += 1
            counts[i] += 1
            t.close()
        except Exception as e:  # noqa: BLE001
            errors.append(str(e))
            if len(errors) > 100:
                return


cpu0, t0 = cpu_seconds(), time.monotonic()
threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
elapsed, cpu = time.monotonic() - t0, cpu_seconds() - cpu0
n = sum(counts)
out = {"proxy": proxy, "tool": "tls_conns", "mode": mode, "handshakes": n,
       "rps": n / elapsed if elapsed else 0.0,
       "cpu_ms_per_handshake": cpu * 1000 / n if n else None,
       "errors": sorted(set(errors))[:3]}
if mode == "resumed" and n and sum(resumed) < n * 0.9:
    out["errors"].append(f"only {sum(resumed)} of {n} handshakes resumed")
if n == 0:
    out["errors"].append("no handshake completed")
out["ok"] = not out["errors"]
print(json.dumps(out))
