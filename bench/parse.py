"""Parse one wrk or h2load run into a JSON line: requests/s (or MB/s), latencies, and whether it
failed."""
import json
import re
import sys

# --log=FILE: h2load's per-request log (start, status, microseconds), for its percentiles
logs = [a.removeprefix("--log=") for a in sys.argv if a.startswith("--log=")]
# --backend-switches=N: the benchmark backend's context switches over a wrk run
switches = [int(a.removeprefix("--backend-switches=")) for a in sys.argv
            if a.startswith("--backend-switches=")]
argv = [a for a in sys.argv if not a.startswith(("--log=", "--backend-switches="))]
tool, proxy = argv[1], argv[2]
text = sys.stdin.read()
out = {"proxy": proxy, "tool": tool, "ok": True, "errors": []}
if len(argv) > 3 and argv[3]:  # the proxy's backend connections, counted with `ss`
    out["backend_conns"] = int(argv[3])


def ms(value, unit):
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk_errors(text):
    """Non-2xx answers and socket errors that wrk reports."""
    errors = []
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m:
        errors.append(f"{m.group(1)} non-2xx/3xx")
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m and any(int(x) for x in m.groups()):
        errors.append("socket errors " + "/".join(m.groups()))
    return errors


def mbps(value, unit):
    return float(value) * {"B": 1e-6, "KB": 1.024e-3, "MB": 1.048576, "GB": 1073.741824}[unit]


if tool == "bulk":
    m = re.search(r"Transfer/sec:\s+([\d.]+)(B|KB|MB|GB)", text)
    out["mb_s"] = mbps(*m.groups()) if m else 0.0
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["rps"] = float(m.group(1)) if m else 0.0
    out["errors"] += wrk_errors(text)
    if len(argv) > 5 and out["mb_s"]:  # the proxy's CPU seconds over the run, and its length
        gb = out["mb_s"] * float(argv[5]) / 1000
        cpu = float(argv[4])
        out["cpu_s_per_gb"] = cpu / gb if cpu > 0 and gb else None
elif tool == "wrk":
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["rps"] = float(m.group(1)) if m else 0.0
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        out[f"p{pct}_ms"] = ms(*m.groups()) if m else None
    # bench/latency.lua's line (workload 1 and its direct baseline; bulk runs use no script)
    m = re.search(r"^sluice-bench p95_us (\d+) p999_us (\d+)$", text, re.M)
    if m:
        out["p95_ms"], out["p999_ms"] = int(m.group(1)) / 1000, int(m.group(2)) / 1000
    m = re.search(r"^\s*(\d+) requests in", text, re.M)
    if switches and m and int(m.group(1)):
        out["backend_switches_per_req"] = switches[0] / int(m.group(1))
    out["errors"] += wrk_errors(text)
else:
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)
    out["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", text)
    if m and (int(m.group(5)) or int(m.group(6))):
        out["errors"].append(f"{m.group(5)} failed, {m.group(6)} errored")
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if m and (int(m.group(3)) or int(m.group(4))):
        out["errors"].append(f"{m.group(3)} 4xx, {m.group(4)} 5xx")
    m = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", text)
    out["mean_ms"] = ms(m.group(5), m.group(6)) if m else None
    out["max_ms"] = ms(m.group(3), m.group(4)) if m else None
    if tool == "h2bulk":  # large downloads: MB/s and the proxy's CPU seconds per GB
        m = re.search(r"req/s, ([\d.]+)(B|KB|MB|GB)/s", text)
        out["mb_s"] = mbps(*m.groups()) if m else 0.0
        if len(argv) > 5 and out["mb_s"]:
            gb = out["mb_s"] * float(argv[5]) / 1000
            cpu = float(argv[4])
            out["cpu_s_per_gb"] = cpu / gb if cpu > 0 and gb else None
    if logs:
        try:
            rows = [line.split("\t") for line in open(logs[0]) if line.strip()]
        except OSError:
            rows = []
        lat = sorted(int(r[2]) for r in rows if r[1] == "200")
        if len(lat) < len(rows):
            out["errors"].append(f"{len(rows) - len(lat)} logged responses not 200")
        for name, q in (("p50", .5), ("p95", .95), ("p99", .99), ("p999", .999)):
            out[f"{name}_ms"] = lat[min(len(lat) - 1, int(q * len(lat)))] / 1000 if lat else None
if out["rps"] == 0.0:
    out["errors"].append("no throughput reported")
out["ok"] = not out["errors"]
print(json.dumps(out))
