"""Pool the rounds of several benchmark results: Sluice over the better of NGINX and HAProxy,
round by round, across runs. One 5-round run on these shared machines cannot tell a level
result from a small lead or lag (the same proxy's requests/s move by up to a third between
rounds); pooled rounds can, within what the interval printed says.

    python3 bench/pool.py bench/results/A.json bench/results/B.json ...

Per figure: the rounds pooled, their median ratio with a 90% bootstrap interval of that median
(rounds resampled with replacement, 10,000 times, fixed seed so a rerun prints the same), the
rounds Sluice was level or ahead, and the median of each file. Ratios are taken within a round,
where the three proxies ran minutes apart, so a host that was slower in one run than another
moves the three alike; a figure a file did not measure is skipped for it."""
import json
import random
import statistics
import sys

import ratios

FIGURES = [  # name, workload, key, higher is better
    ("HTTP/1.1 requests/s", "h1", "rps", True),
    ("HTTP/1.1 p99", "h1", "p99_ms", False),
    ("HTTP/1.1 p95", "h1", "p95_ms", False),
    ("HTTP/2 requests/s", "h2", "rps", True),
    ("HTTP/2 p99", "h2", "p99_ms", False),
    ("HTTP/2 p95", "h2", "p95_ms", False),
]


def interval(values, level=0.90, draws=10_000):
    rng = random.Random(1)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    tail = (1 - level) / 2
    return medians[int(tail * draws)], medians[int((1 - tail) * draws) - 1]


def main(paths):
    results = [json.load(open(p))["runs"] for p in paths]
    print("Sluice over the better of NGINX and HAProxy, rounds pooled from", len(results), "runs")
    print("(requests/s: above 1 is ahead; latency: below 1 is ahead)\n")
    for name, workload, key, higher in FIGURES:
        pooled, per_file = [], []
        for runs in results:
            r = ratios.per_round(runs, workload, key, higher)
            if r:
                pooled += r
                per_file.append(f"{statistics.median(r):.2f}")
        if not pooled:
            print(f"{name}: not measured")
            continue
        lo, hi = interval(pooled)
        print(f"{name}: {len(pooled)} rounds, median {statistics.median(pooled):.3f} "
              f"(90% interval {lo:.3f}-{hi:.3f}), level or ahead in "
              f"{ratios.ahead(pooled, higher)}; by run {' '.join(per_file)}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
