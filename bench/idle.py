"""Memory per idle TLS connection: open N TLS connections to a proxy (handshake done, no
request), then report the growth of the proxy's resident memory per connection.

    python3 bench/idle.py PROXY HOST PORT N PID[,PID...]

Connections are opened by eight threads so all are open well within every proxy's idle
timeouts; any connection the proxy closed before the measurement fails the run.
Prints one JSON line in the format of bench/parse.py.
"""
import json
import select
import socket
import ssl
import sys
import threading
import time

proxy, host, port, n, pids = sys.argv[1:6]
port, n = int(port), int(n)
pids = [int(p) for p in pids.split(",") if p]


def rss_kib():
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return total


ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["http/1.1"])
conns, errors, lock = [], [], threading.Lock()


def opener(count):
    for _ in range(count):
        try:
            s = socket.create_connection((host, port), timeout=10)
            t = ctx.wrap_socket(s, server_hostname="localhost")
            with lock:
                conns.append(t)
        except Exception as e:  # noqa: BLE001
            with lock:
                errors.append(str(e))


before = rss_kib()
t0 = time.monotonic()
threads = [threading.Thread(target=opener, args=(n // 8 + (1 if i < n % 8 else 0),)) for i in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
opened_in = time.monotonic() - t0
time.sleep(1)
after = rss_kib()
# A connection the proxy closed reads as EOF or an alert; one still open has nothing for us
# (a TLS 1.3 session ticket is consumed without application data).
poller = select.poll()
for c in conns:
    poller.register(c, select.POLLIN)
by_fd = {c.fileno(): c for c in conns}
closed = 0
for fd, _ in poller.poll(0):
    c = by_fd[fd]
    c.setblocking(False)
    try:
        if c.recv(1) == b"":
            closed += 1
    except ssl.SSLWantReadError:
        pass
    except (OSError, ssl.SSLError):
        closed += 1
out = {"proxy": proxy, "tool": "idle", "idle_conns": len(conns), "opened_s": round(opened_in, 2),
       "rss_before_kib": before, "rss_after_kib": after,
       "kib_per_conn": (after - before) / len(conns) if conns else None,
       "errors": sorted(set(errors))[:3]}
if closed:
    out["errors"].append(f"{closed} connections closed by the proxy before the measurement")
if len(conns) < n:
    out["errors"].append(f"only {len(conns)} of {n} connections opened")
out["ok"] = not out["errors"]
print(json.dumps(out))
for c in conns:
    c.close()
