"""Aggregate benchmark runs: median (min-max) per proxy and workload, ratios to the better of
NGINX and HAProxy, as Markdown and JSON."""
import json
import platform
import statistics
import subprocess
import sys

import ratios as ratios_of

raw_path, control_path, out_prefix, duration, args = sys.argv[1:6]
runs = [json.loads(line) for line in open(raw_path) if line.strip()]
control = [json.loads(line) for line in open(control_path) if line.strip()]


def version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except Exception as e:  # noqa: BLE001
        return f"unknown ({e})"


meta = {
    "commit": version(["git", "rev-parse", "--short", "HEAD"]),
    "machine": f"{platform.machine()}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores, kernel {platform.release()}",
    "nginx": version(["nginx", "-v"]),
    "haproxy": version(["haproxy", "-v"]),
    "wrk": version(["wrk", "--version"]),
    "h2load": version(["h2load", "--version"]),
    "duration_s": int(duration),
    "command": f"bench/run {args}".strip(),
}


# Rounds: each round measures Sluice once per workload it covers (bench/run's ROUNDS).
rounds = max([sum(1 for r in runs if r["proxy"] == "sluice" and r["workload"] == w)
              for w in {r["workload"] for r in runs}] or [0])


def summary(proxy, workload, key):
    rs = [r for r in runs if r["proxy"] == proxy and r["workload"] == workload]
    if not rs:
        return None
    failed = [r for r in rs if not r["ok"]]
    vals = [r[key] for r in rs if r.get(key) is not None]
    if not failed and not vals:
        return None  # not measured for this proxy (like CPU for the direct baseline)
    if failed or not vals:
        return {"failed": True, "errors": sorted({e for r in failed for e in r["errors"]})}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "failed": False}


def cell(s, fmt):
    if s is None:
        return "-"
    if s["failed"]:
        return "FAILED (" + "; ".join(s["errors"]) + ")"
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"


rows = []
table = {}
for workload, metrics in (("h1", [("rps", "{:.0f}"), ("p50_ms", "{:.2f}"), ("p95_ms", "{:.2f}"),
                                  ("p99_ms", "{:.2f}"), ("p999_ms", "{:.2f}"),
                                  ("backend_switches_per_req", "{:.3f}")]),
                          ("h2", [("rps", "{:.0f}"), ("mean_ms", "{:.2f}"), ("p50_ms", "{:.2f}"), ("p95_ms", "{:.2f}"),
                                  ("p99_ms", "{:.2f}")]),
                          ("h2up", [("rps", "{:.0f}"), ("mean_ms", "{:.2f}"), ("p99_ms", "{:.2f}"),
                                    ("backend_conns", "{:.0f}")]),
                          ("passthrough", [("mb_s", "{:.0f}"), ("cpu_s_per_gb", "{:.2f}")]),
                          ("handshake_new", [("rps", "{:.0f}"), ("cpu_ms_per_handshake", "{:.3f}")]),
                          ("handshake_resumed", [("rps", "{:.0f}"), ("cpu_ms_per_handshake", "{:.3f}")]),
                          ("idle", [("kib_per_conn", "{:.1f}"), ("idle_conns", "{:.0f}")]),
                          ("buffer", [("mb_s", "{:.0f}"), ("cpu_s_per_gb", "{:.2f}")]),
                          ("window", [("mb_s", "{:.0f}"), ("cpu_s_per_gb", "{:.2f}")]),
                          ("pt_conns", [("rps", "{:.0f}"), ("cpu_ms_per_handshake", "{:.3f}")])):
    for proxy in ("sluice", "nginx", "haproxy", "direct", "sluice-8k", "sluice-16k", "sluice-64k",
                  "sluice-w64k", "sluice-w2048k", "sluice-w8192k"):
        sums = {k: summary(proxy, workload, k) for k, _ in metrics}
        if not any(r["proxy"] == proxy and r["workload"] == workload for r in runs):
            continue
        if all(v is None for v in sums.values()):
            continue
        table[(workload, proxy)] = sums
        rows.append((workload, proxy, [cell(sums[k], f) for k, f in metrics]))


def ratio(workload, key, higher_better=True):
    s = table.get((workload, "sluice"), {}).get(key)
    others = [table.get((workload, p), {}).get(key) for p in ("nginx", "haproxy")]
    others = [o for o in others if o and not o["failed"]]
    if not s or s["failed"] or not others:
        return None
    best = max(o["median"] for o in others) if higher_better else min(o["median"] for o in others)
    return s["median"] / best if best else None


def paired(workload, key, higher_better=True):
    """Sluice against the better of NGINX and HAProxy round by round (see ratios.py)."""
    per_round = ratios_of.per_round(runs, workload, key, higher_better)
    if not per_round:
        return None
    return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round),
            "rounds": len(per_round), "sluice_ahead": ratios_of.ahead(per_round, higher_better)}


paired_ratios = {
    "h1_rps_vs_best": paired("h1", "rps"),
    "h1_p99_vs_best": paired("h1", "p99_ms", higher_better=False),
    "h1_p95_vs_best": paired("h1", "p95_ms", higher_better=False),
    "h1_p999_vs_best": paired("h1", "p999_ms", higher_better=False),
    "h2_rps_vs_best": paired("h2", "rps"),
    "h2_p99_vs_best": paired("h2", "p99_ms", higher_better=False),
    "h2_p95_vs_best": paired("h2", "p95_ms", higher_better=False),
    "h2_backend_rps_vs_best": paired("h2up", "rps"),
    "passthrough_mb_s_vs_best": paired("passthrough", "mb_s"),
}
direct = summary("direct", "h1", "rps")

ratios = {
    "h1_rps_vs_best": ratio("h1", "rps"),
    "h1_p99_vs_best": ratio("h1", "p99_ms", higher_better=False),
    "h1_p95_vs_best": ratio("h1", "p95_ms", higher_better=False),
    "h1_p999_vs_best": ratio("h1", "p999_ms", higher_better=False),
    "h2_rps_vs_best": ratio("h2", "rps"),
    "h2_p99_vs_best": ratio("h2", "p99_ms", higher_better=False),
    "h2_p95_vs_best": ratio("h2", "p95_ms", higher_better=False),
    "h2_backend_rps_vs_best": ratio("h2up", "rps"),
    "h2_backend_connections_vs_fewest": ratio("h2up", "backend_conns", higher_better=False),
    "passthrough_mb_s_vs_best": ratio("passthrough", "mb_s"),
    "passthrough_cpu_per_gb_vs_best": ratio("passthrough", "cpu_s_per_gb", higher_better=False),
    "handshake_cpu_vs_best": ratio("handshake_new", "cpu_ms_per_handshake", higher_better=False),
    "resumed_handshake_cpu_vs_best": ratio("handshake_resumed", "cpu_ms_per_handshake", higher_better=False),
    "idle_kib_per_conn_vs_best": ratio("idle", "kib_per_conn", higher_better=False),
    "passthrough_conn_cpu_vs_best": ratio("pt_conns", "cpu_ms_per_handshake", higher_better=False),
}

md = ["# Benchmark results", "", f"Command: `{meta['command']}` at commit `{meta['commit']}`.", "",
      f"Machine: {meta['machine']}. Proxy pinned to core 0, load generator and backend to core 1; one worker "
      f"process/thread per proxy; {meta['duration_s']} s per run; {rounds} round(s), each running every proxy once per workload (after a 1 s warm-up), so the proxies take turns (the order turning by one each round); median (min-max).", "",
      f"Tools: {meta['nginx']}; {meta['haproxy']}; {meta['wrk']}; {meta['h2load']}.", "",
      "## Workload 1: HTTP/1.1 keep-alive through TLS termination (wrk -t1 -c50)", "",
      "| proxy | requests/s | p50 ms | p95 ms | p99 ms | p99.9 ms | backend switches per request |",
      "|---|---|---|---|---|---|---|"]
md += [f"| {p} | {' | '.join(c)} |" for w, p, c in rows if w == "h1"]
md += ["", "The backend shares the load core with wrk: its context switches are mostly sleeps in epoll, "
       "each ended by a wake-up that can take the core from wrk (bench/HISTORY.md, 8 Dec)."]
md += ["", "## Workload 2: HTTP/2 through TLS termination (h2load -c 64 -m 10; percentiles from its per-request log)", "",
       "| proxy | requests/s | mean ms | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|---|---|"]
md += [f"| {p} | {' | '.join(c)} |" for w, p, c in rows if w == "h2"]
md += ["", "## Workload 3: new TLS connections (full and resumed handshakes; a Python client, 4 threads, "
       "on the load core: the rate may be client-bound, the proxy's CPU per handshake is not)", "",
       "| proxy | full handshakes/s | CPU ms per full handshake | resumed/s | CPU ms per resumed |", "|---|---|---|---|---|"]
hs = {p: c for w, p, c in rows if w == "handshake_new"}
hr = {p: c for w, p, c in rows if w == "handshake_resumed"}
md += [f"| {p} | {' | '.join(hs[p])} | {' | '.join(hr.get(p, ['-', '-']))} |" for p in hs]
md += ["", "## Workload 4: many HTTP/2 clients to one backend (h2load -c 64 -m 10; Sluice `h2c` and HAProxy "
       "`proto h2` + `http-reuse always` to an h2c backend, NGINX 1.22 HTTP/1.1 keep-alive: it has no HTTP/2 "
       "upstream); backend connections counted with `ss` halfway through each run", "",
       "| proxy | requests/s | mean ms | p99 ms | backend connections |", "|---|---|---|---|---|"]
md += [f"| {p} | {' | '.join(c)} |" for w, p, c in rows if w == "h2up"]
md += ["", "## Workload 5: TLS passthrough by SNI, bulk download (wrk -c8, 64 MiB file from a TLS backend)", "",
       "| proxy | MB/s | proxy CPU s per GB |", "|---|---|---|"]
md += [f"| {p} | {' | '.join(c)} |" for w, p, c in rows if w == "passthrough"]
md += ["", "## Workload 5b: new passthrough connections (the TLS backend does the handshake; Python client, 4 threads)", "",
       "| proxy | connections/s | proxy CPU ms per connection |", "|---|---|---|"]
md += [f"| {p} | {' | '.join(c)} |" for w, p, c in rows if w == "pt_conns"]
md += ["", "## Passthrough copy buffer size (Sluice only, workload 5 with 8, 16 and 64 KiB per direction)", "",
       "| buffer | MB/s | proxy CPU s per GB |", "|---|---|---|"]
md += [f"| {p.removeprefix('sluice-')} | {' | '.join(c)} |" for w, p, c in rows if w == "buffer"]
md += ["", "## Upstream HTTP/2 receive window (Sluice only: 4 HTTP/2 clients x 2 streams downloading 64 MiB through one h2c backend connection; per-stream window, 8x per connection)", "",
       "| window | MB/s | proxy CPU s per GB |", "|---|---|---|"]
md += [f"| {p.removeprefix('sluice-w')} | {' | '.join(c)} |" for w, p, c in rows if w == "window"]
md += ["", f"## Workload 6: memory per idle TLS connection (handshake done, no request; one run)", "",
       "| proxy | RSS KiB per connection | connections |", "|---|---|---|"]
md += [f"| {p} | {' | '.join(c)} |" for w, p, c in rows if w == "idle"]
md += ["", "Sluice relative to the better of NGINX and HAProxy (requests/s: >1 is faster; p99: <1 is better):", ""]
md += [f"- {k}: {v:.2f}" if v is not None else f"- {k}: n/a" for k, v in ratios.items()]
md += ["", "Round by round (each round runs the three in turn, so the machine's drift between rounds "
       "cancels): Sluice over the better of the other two in that round, median (min-max), and the rounds "
       "where Sluice was at least level. The host's state matters: the direct baseline (wrk straight to the "
       f"backend) ran at {cell(direct, '{:.0f}')} requests/s in this run.", ""]
for k, v in paired_ratios.items():
    md.append(f"- {k}: {v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f}), Sluice level or ahead in "
              f"{v['sluice_ahead']} of {v['rounds']} rounds" if v else f"- {k}: n/a")
md += ["", "## Control plane (workload 7: a change to effect)", "", "| benchmark | result |", "|---|---|"]
reloads = {}
for c in control:
    if c["bench"] == "reload":
        reloads.setdefault((c["proxy"], c["hosts"]), []).append(c["ms"])
        continue
    if c["bench"] == "apply":
        md.append(f"| PUT /v1/config with {c['hosts']} hosts, {c['certificates']} certificates, {c['backends']} backends "
                  f"({c['document_bytes'] / 1e6:.1f} MB) | committed in {c['commit_ms']:.0f} ms; applied by the worker after {c['worker_applied_ms']:.0f} ms |")
    else:
        md.append(f"| write to every worker's Ack, {c['workers']} worker(s), {c['hosts']} hosts, {c['writes']} writes "
                  f"| p50 {c['p50_ms']:.1f} ms, p99 {c['p99_ms']:.1f} ms, max {c['max_ms']:.1f} ms (first write after the load, not counted: {c.get('first_ms', 0):.0f} ms); {c['bytes_per_push']} bytes per push |")
for (proxy, hosts), ms in sorted(reloads.items()):
    md.append(f"| {proxy}: rewrite the file and reload, {hosts} hosts, {len(ms)} changes | median {statistics.median(ms):.0f} ms "
              f"(min {min(ms):.0f}, max {max(ms):.0f}) until traffic sees the change |")
md.append("")


def drop_empty_tables(lines):
    """Leave out a section whose table has no rows (a run of some workloads only: ONLY=)."""
    out, i = [], 0
    while i < len(lines):
        if lines[i].startswith("## ") and i + 4 < len(lines) and lines[i + 2].startswith("| ") \
                and lines[i + 3].startswith("|---") and not lines[i + 4].startswith("|"):
            i += 5  # heading, blank, header, separator, and the blank that follows
            continue
        out.append(lines[i])
        i += 1
    return out


open(out_prefix + ".md", "w").write("\n".join(drop_empty_tables(md)))
json.dump({"meta": meta, "runs": runs, "control": control, "ratios": ratios, "paired_ratios": paired_ratios}, open(out_prefix + ".json", "w"), indent=2)
