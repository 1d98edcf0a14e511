"""Reads `perf script -F pid,time,event,trace` of a proxy and the benchmark backend (bench/writes)
and prints how the proxy spaced its writes to the backend and how often the backend went back to
epoll_wait and slept there.

    python3 bench/writes.py LABEL PROXY_PID FDS TCP BACKEND_PORT PROXY_PORT < perf-script-output

FDS holds `fd target` lines of the proxy's /proc/PID/fd, TCP /proc/net/tcp and tcp6 (for the
ports of each socket inode).
"""
import re
import sys

WRITES = {"writev", "sendto", "write", "sendmsg"}
SLEEP_S = 20e-6  # an epoll_wait longer than this slept


def socket_kinds(fds_path, tcp_path, backend_port, proxy_port):
    """fd -> 'backend' or 'client', for the proxy's TCP sockets."""
    ports = {}
    for line in open(tcp_path):
        f = line.split()
        if len(f) < 10 or f[0] == "sl":
            continue
        ports[f[9]] = (int(f[1].split(":")[1], 16), int(f[2].split(":")[1], 16))
    kinds = {}
    for line in open(fds_path):
        fd, target = line.split(maxsplit=1)
        m = re.match(r"socket:\[(\d+)\]", target)
        if not m or m[1] not in ports:
            continue
        local, remote = ports[m[1]]
        if remote == backend_port:
            kinds[int(fd)] = "backend"
        elif local == proxy_port:
            kinds[int(fd)] = "client"
    return kinds


def percentile(sorted_values, q):
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def main():
    label, proxy = sys.argv[1], int(sys.argv[2])
    kinds = socket_kinds(sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    pattern = re.compile(r"\s*(\d+)\s+([\d.]+):\s+syscalls:sys_(enter|exit)_(\w+):\s*(.*)")
    writes = []  # (time, 'U' to the backend or 'C' to a client)
    backend_epolls = backend_sleeps = 0
    entered = None
    start = end = None
    for line in sys.stdin:
        m = pattern.match(line)
        if not m:
            continue
        pid, t, edge, call, args = int(m[1]), float(m[2]), m[3], m[4], m[5]
        start = t if start is None else start
        end = t
        if pid == proxy:
            fd = re.search(r"fd: (0x[0-9a-f]+)", args)
            kind = kinds.get(int(fd[1], 16)) if fd else None
            if edge == "enter" and call in WRITES and kind:
                writes.append((t, "U" if kind == "backend" else "C"))
        elif call.startswith("epoll"):
            if edge == "enter":
                backend_epolls += 1
                entered = t
            elif entered is not None:
                backend_sleeps += t - entered > SLEEP_S
                entered = None
    upstream = [t for t, k in writes if k == "U"]
    if len(upstream) < 2:
        print(f"{label:<10} no writes to the backend seen")
        return
    gaps = sorted((b - a) * 1e6 for a, b in zip(upstream, upstream[1:]))
    order = "".join(k for _, k in writes)
    # The length of the run (backend writes with no client write between) that the median
    # backend write belongs to.
    runs = sorted(len(r) for r in re.findall(r"U+", order))
    covered, run_median = 0, runs[-1]
    for length in runs:
        covered += length
        if covered * 2 >= len(upstream):
            run_median = length
            break
    n = len(upstream)
    print(
        f"{label:<10} {n / (end - start):7.0f} requests/s traced; gap between backend writes us "
        f"p10 {percentile(gaps, 0.1):.0f} p50 {percentile(gaps, 0.5):.0f} "
        f"p90 {percentile(gaps, 0.9):.0f}; median run {run_median}; "
        f"backend epoll_wait {backend_epolls / n:.3f}, slept {backend_sleeps / n:.3f} per request"
    )


if __name__ == "__main__":
    main()
